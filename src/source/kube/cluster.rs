//! The cluster loop: one cluster's watch pipeline ([`ClusterWatch`]). It builds the cluster's client
//! (retrying while its kubeconfig cannot be used, unless that cannot change), runs a watcher per
//! [kind](WatchedKind) with [`WATCH_BACKOFF`] and the reachability probe, keeps a store per kind,
//! sends [`SourceEvent`]s to the registry, and reports the cluster's health (sync state,
//! reachability, errors, objects that cannot be converted) in [`ClusterHealth`].
//!
//! Uses the client, the watch guard, the watched kinds and the retry timing; used by [`super::start`]
//! and the remote-secret watcher, which start cluster watches.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use kube::api::{Api, DynamicObject};
use kube::runtime::watcher;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::backoff::{ABSENT_CRD_RECHECK, Backoff, PROBE_BACKOFF, PROBE_INTERVAL, PROBE_TIMEOUT, WATCH_BACKOFF};
use super::client::{ClientSpec, build_guarded_client};
use super::kinds::{WatchedKind, describe};
use super::watch_guard::WatchCuts;
use crate::mesh_config::MeshConfig;
use crate::model::ClusterId;
use crate::source::{ClusterHealth, SourceEvent, SyncState};
use crate::topology::{ObjectKey, TopologyObject};

/// Options of the Kubernetes sources.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// accept kubeconfigs with `exec` / `auth-provider` users
    pub allow_exec_auth: bool,
    /// a cluster whose kinds are not all listed after this long sends what it has (and more as it comes)
    pub ready_timeout: Duration,
}

impl KubeOptions {
    pub fn from_mesh(mesh: &MeshConfig) -> KubeOptions {
        KubeOptions { allow_exec_auth: mesh.allow_exec_auth, ready_timeout: mesh.ready_timeout }
    }
}

/// A running watch of one cluster. Dropping it stops the watch (its objects stay in the registry).
pub struct ClusterWatch {
    pub id: ClusterId,
    task: JoinHandle<()>,
}

impl ClusterWatch {
    /// Starts watching cluster `id` through `spec`, sending events on `tx` and reporting in `health`
    /// (the cluster must be registered there by the caller).
    pub fn spawn(
        id: ClusterId,
        spec: ClientSpec,
        options: KubeOptions,
        tx: UnboundedSender<SourceEvent>,
        health: ClusterHealth,
    ) -> ClusterWatch {
        let task = tokio::spawn(run_cluster(id.clone(), spec, options, tx, health));
        ClusterWatch { id, task }
    }

    /// Whether the watch ended (a kubeconfig that cannot work, or nobody listens any more).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for ClusterWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run_cluster(
    id: ClusterId,
    spec: ClientSpec,
    options: KubeOptions,
    tx: UnboundedSender<SourceEvent>,
    health: ClusterHealth,
) {
    let mut backoff = Backoff::new(WATCH_BACKOFF);
    let cuts = WatchCuts::new();
    let client = loop {
        match build_guarded_client(&spec, options.allow_exec_auth, cuts.clone()).await {
            Ok(c) => break c,
            Err(e) => {
                let message = e.to_string();
                let retry = spec.retryable();
                warn!(cluster = %id, "{message}{}", if retry { "; retrying" } else { "" });
                health.update(&id, |s| {
                    s.last_error = Some(message);
                    if !retry {
                        s.sync = SyncState::Closed;
                    }
                });
                if !retry {
                    return;
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    };
    info!(cluster = %id, "watching the cluster's API server");
    health.update(&id, |s| s.last_error = None);
    let mut cluster = ClusterState::new(id, tx, health, options.ready_timeout);
    cluster.cuts = cuts;
    cluster.run(client).await;
}

/// What the merged streams of one cluster yield.
enum Msg {
    Watch(WatchedKind, Box<Result<watcher::Event<DynamicObject>, watcher::Error>>),
    Probe(Result<(), ProbeError>),
}

#[derive(Debug)]
struct ProbeError {
    message: String,
    unreachable: bool,
}

type MsgStream = Pin<Box<dyn Stream<Item = Msg> + Send>>;

/// A kind's watcher with [`WATCH_BACKOFF`] after errors, cut short when `wake` changes.
fn kind_stream(client: kube::Client, kind: WatchedKind, wake: watch::Receiver<u64>) -> MsgStream {
    let api: Api<DynamicObject> = Api::all_with(client, &kind.api_resource());
    let stream = watcher(api, kind.watcher_config()).boxed();
    struct St {
        stream: Pin<Box<dyn Stream<Item = Result<watcher::Event<DynamicObject>, watcher::Error>> + Send>>,
        backoff: Backoff,
        wait: Option<Duration>,
        wake: watch::Receiver<u64>,
    }
    let st = St { stream, backoff: Backoff::new(WATCH_BACKOFF), wait: None, wake };
    futures::stream::unfold(st, move |mut st| async move {
        if let Some(delay) = st.wait.take() {
            st.wake.borrow_and_update();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                changed = st.wake.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
        let item = st.stream.next().await?;
        match &item {
            Ok(watcher::Event::InitDone) => st.backoff.reset(),
            Err(e) if kind.optional() && is_not_found(e) => st.wait = Some(ABSENT_CRD_RECHECK),
            Err(_) => st.wait = Some(st.backoff.next_delay()),
            Ok(_) => {}
        }
        Some((Msg::Watch(kind, Box::new(item)), st))
    })
    .boxed()
}

/// `GET /version` now and then: every [`PROBE_INTERVAL`] while it answers, with [`PROBE_BACKOFF`]
/// while it does not, and at once when `now` is notified.
fn probe_stream(client: kube::Client, now: Arc<Notify>) -> MsgStream {
    struct St {
        client: kube::Client,
        backoff: Backoff,
        delay: Duration,
        now: Arc<Notify>,
        first: bool,
    }
    let st = St { client, backoff: Backoff::new(PROBE_BACKOFF), delay: PROBE_INTERVAL, now, first: true };
    futures::stream::unfold(st, |mut st| async move {
        if !st.first {
            tokio::select! {
                _ = tokio::time::sleep(st.delay) => {}
                _ = st.now.notified() => {}
            }
        }
        st.first = false;
        let result = match tokio::time::timeout(PROBE_TIMEOUT, st.client.apiserver_version()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(ProbeError { unreachable: is_unreachable(&e), message: e.to_string() }),
            Err(_) => Err(ProbeError { unreachable: true, message: format!("no answer within {PROBE_TIMEOUT:?}") }),
        };
        st.delay = match &result {
            Err(e) if e.unreachable => st.backoff.next_delay(),
            _ => {
                st.backoff.reset();
                PROBE_INTERVAL
            }
        };
        Some((Msg::Probe(result), st))
    })
    .boxed()
}

/// A transport failure, or an answer saying the server cannot serve (5xx, 429): the API is unreachable.
/// Other answers (401, 403, 404, bad data) mean it is reachable but refuses or breaks something.
fn is_unreachable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => status.code >= 500 || status.code == 429,
        kube::Error::SerdeError(_) | kube::Error::BuildRequest(_) | kube::Error::HttpError(_) => false,
        _ => true,
    }
}

fn watcher_source_error(e: &watcher::Error) -> Option<&kube::Error> {
    match e {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            Some(e)
        }
        _ => None,
    }
}

fn is_not_found(e: &watcher::Error) -> bool {
    matches!(watcher_source_error(e), Some(kube::Error::Api(s)) if s.code == 404)
}

/// The state of one cluster's watch: a store per kind, what is being relisted, errors.
struct ClusterState {
    id: ClusterId,
    tx: UnboundedSender<SourceEvent>,
    health: ClusterHealth,
    ready_timeout: Duration,
    /// the objects of each kind as last listed and watched (what the registry has)
    stores: BTreeMap<WatchedKind, BTreeMap<ObjectKey, TopologyObject>>,
    /// relists in progress
    listing: BTreeMap<WatchedKind, BTreeMap<ObjectKey, TopologyObject>>,
    listing_errors: BTreeMap<WatchedKind, BTreeMap<ObjectKey, String>>,
    /// kinds listed at least once (or known absent)
    listed: BTreeSet<WatchedKind>,
    /// the first Sync went out (before it, events only fill the stores)
    initial_sent: bool,
    /// the ready timeout passed while the cluster served restored last-known state and had listed no
    /// kind: the first kind listed sends what there is (a partial state replaces the restored one only
    /// once the cluster answers)
    deadline_passed: bool,
    /// objects that could not be converted, by kind and key
    object_errors: BTreeMap<WatchedKind, BTreeMap<ObjectKey, String>>,
    /// the current error of each kind's watcher, and of the probe
    kind_errors: BTreeMap<WatchedKind, String>,
    probe_error: Option<String>,
    unreachable_since: Option<SystemTime>,
    absent: BTreeSet<WatchedKind>,
    /// wakes watchers waiting in backoff (bumped when the API answers again)
    wake: watch::Sender<u64>,
    /// asks the probe to run now
    probe_now: Arc<Notify>,
    closed: bool,
    /// the watch streams of this cluster's client that were cut short
    cuts: Arc<WatchCuts>,
}

impl ClusterState {
    fn new(id: ClusterId, tx: UnboundedSender<SourceEvent>, health: ClusterHealth, ready_timeout: Duration) -> Self {
        ClusterState {
            id,
            tx,
            health,
            ready_timeout,
            stores: BTreeMap::new(),
            listing: BTreeMap::new(),
            listing_errors: BTreeMap::new(),
            listed: BTreeSet::new(),
            initial_sent: false,
            deadline_passed: false,
            object_errors: BTreeMap::new(),
            kind_errors: BTreeMap::new(),
            probe_error: None,
            unreachable_since: None,
            absent: BTreeSet::new(),
            wake: watch::channel(0).0,
            probe_now: Arc::new(Notify::new()),
            closed: false,
            cuts: WatchCuts::new(),
        }
    }

    async fn run(&mut self, client: kube::Client) {
        let mut streams: Vec<MsgStream> =
            WatchedKind::ALL.iter().map(|k| kind_stream(client.clone(), *k, self.wake.subscribe())).collect();
        streams.push(probe_stream(client, self.probe_now.clone()));
        let mut merged = futures::stream::select_all(streams);
        let initial_deadline = tokio::time::Instant::now() + self.ready_timeout;
        let mut cuts_changed = self.cuts.changed.subscribe();
        while !self.closed {
            tokio::select! {
                Ok(()) = cuts_changed.changed() => self.on_watch_streams(),
                msg = merged.next() => match msg {
                    Some(Msg::Watch(kind, item)) => self.on_watch(kind, *item),
                    Some(Msg::Probe(result)) => self.on_probe(result),
                    None => break,
                },
                _ = tokio::time::sleep_until(initial_deadline), if !self.initial_sent && !self.deadline_passed => {
                    let missing: Vec<&str> =
                        WatchedKind::ALL.iter().filter(|k| !self.listed.contains(k)).map(|k| k.name()).collect();
                    let restored = self.health.get(&self.id).is_some_and(|s| s.restored_from.is_some());
                    if restored && self.listed.is_empty() {
                        warn!(cluster = %self.id, ?missing, "no kind listed within the ready timeout; serving the restored last-known state until the cluster answers");
                        self.deadline_passed = true;
                    } else {
                        warn!(cluster = %self.id, ?missing, "not every kind listed within the ready timeout; serving what is");
                        self.send_sync();
                    }
                }
            }
        }
    }

    fn send(&mut self, event: SourceEvent) {
        if self.tx.send(event).is_err() {
            // nobody listens any more: stop
            self.closed = true;
        }
    }

    fn all_objects(&self) -> Vec<TopologyObject> {
        self.stores.values().flat_map(|m| m.values().cloned()).collect()
    }

    fn send_sync(&mut self) {
        let objects = self.all_objects();
        debug!(cluster = %self.id, objects = objects.len(), "syncing cluster");
        self.initial_sent = true;
        self.send(SourceEvent::Sync { cluster: self.id.clone(), objects });
    }

    fn on_watch(&mut self, kind: WatchedKind, item: Result<watcher::Event<DynamicObject>, watcher::Error>) {
        // a watch that delivers again (after being cut, it resumes from its resource version without a
        // relist) is over its last error
        if matches!(item, Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)))
            && self.kind_errors.remove(&kind).is_some()
        {
            self.publish_error();
        }
        match item {
            Ok(watcher::Event::Init) => {
                self.listing.insert(kind, BTreeMap::new());
                self.listing_errors.insert(kind, BTreeMap::new());
            }
            Ok(watcher::Event::InitApply(obj)) => {
                let key = kind.key(&obj);
                let converted = kind.convert(&obj);
                let listing = self.listing.entry(kind).or_default();
                match converted {
                    Ok(Some(o)) => {
                        listing.insert(o.key(), o);
                    }
                    Ok(None) => {}
                    Err(reason) => {
                        let message = format!("{}: {reason}", describe(kind, key.as_ref()));
                        warn!(cluster = %self.id, "{message}; keeping its last good version, if any");
                        if let Some(key) = key {
                            // keep the last good version
                            if let Some(old) = self.stores.get(&kind).and_then(|s| s.get(&key)) {
                                listing.insert(key.clone(), old.clone());
                            }
                            self.listing_errors.entry(kind).or_default().insert(key, message);
                        }
                    }
                }
            }
            Ok(watcher::Event::InitDone) => {
                let listed = self.listing.remove(&kind).unwrap_or_default();
                let errors = self.listing_errors.remove(&kind).unwrap_or_default();
                self.absent.remove(&kind);
                self.finish_list(kind, listed, errors);
            }
            Ok(watcher::Event::Apply(obj)) => {
                let key = kind.key(&obj);
                match kind.convert(&obj) {
                    Ok(Some(o)) => {
                        let key = o.key();
                        self.clear_object_error(kind, &key);
                        let old = self.stores.entry(kind).or_default().insert(key, o.clone());
                        if self.initial_sent && old.as_ref() != Some(&o) {
                            self.send(SourceEvent::Upsert { cluster: self.id.clone(), object: o });
                        }
                    }
                    Ok(None) => {
                        if let Some(key) = key {
                            self.clear_object_error(kind, &key);
                            self.remove(kind, &key);
                        }
                    }
                    Err(reason) => {
                        let message = format!("{}: {reason}", describe(kind, key.as_ref()));
                        warn!(cluster = %self.id, "{message}; keeping its last good version, if any");
                        if let Some(key) = key {
                            self.object_errors.entry(kind).or_default().insert(key, message);
                            self.publish_object_errors();
                        }
                    }
                }
                self.touch();
            }
            Ok(watcher::Event::Delete(obj)) => {
                if let Some(key) = kind.key(&obj) {
                    self.clear_object_error(kind, &key);
                    self.remove(kind, &key);
                }
                self.touch();
            }
            Err(e) => self.on_error(kind, e),
        }
    }

    fn remove(&mut self, kind: WatchedKind, key: &ObjectKey) {
        let existed = self.stores.get_mut(&kind).and_then(|s| s.remove(key)).is_some();
        if existed && self.initial_sent {
            self.send(SourceEvent::Delete { cluster: self.id.clone(), key: key.clone() });
        }
    }

    /// A kind's (re)list completed: it replaces the kind's store, and the cluster is synced (exactly).
    fn finish_list(
        &mut self,
        kind: WatchedKind,
        listed: BTreeMap<ObjectKey, TopologyObject>,
        errors: BTreeMap<ObjectKey, String>,
    ) {
        let changed = self.stores.get(&kind) != Some(&listed);
        debug!(cluster = %self.id, kind = kind.name(), objects = listed.len(), changed, "listed");
        self.stores.insert(kind, listed);
        self.object_errors.insert(kind, errors);
        self.publish_object_errors();
        self.listed.insert(kind);
        self.kind_errors.remove(&kind);
        self.reachable();
        let complete = WatchedKind::ALL.iter().all(|k| self.listed.contains(k));
        if !self.initial_sent {
            if complete || self.deadline_passed {
                let objects = self.stores.values().map(BTreeMap::len).sum::<usize>();
                if complete {
                    info!(cluster = %self.id, objects, "cluster synced");
                } else {
                    warn!(cluster = %self.id, objects, kind = kind.name(), "the cluster answers, not every kind listed yet; serving what is instead of the restored state");
                }
                self.send_sync();
            }
        } else if changed {
            self.send_sync();
        }
        let error = self.current_error();
        self.health.update(&self.id, |s| {
            if complete {
                s.sync = SyncState::Synced;
            }
            s.last_event = Some(SystemTime::now());
            s.last_error = error;
        });
    }

    fn on_error(&mut self, kind: WatchedKind, e: watcher::Error) {
        if let watcher::Error::WatchError(status) = &e
            && status.code == 410
        {
            // the watcher relists by itself: the relist reconciles
            debug!(cluster = %self.id, kind = kind.name(), "watch expired (410 Gone); relisting");
            return;
        }
        if kind.optional() && is_not_found(&e) {
            if self.absent.insert(kind) {
                info!(cluster = %self.id, kind = kind.name(), "not served by this cluster (CRD not installed); none used");
            }
            self.listing.remove(&kind);
            self.listing_errors.remove(&kind);
            self.finish_list(kind, BTreeMap::new(), BTreeMap::new());
            return;
        }
        let unreachable = watcher_source_error(&e).is_none_or(is_unreachable)
            && !matches!(e, watcher::Error::WatchError(_) | watcher::Error::NoResourceVersion);
        let message = format!("{} watch: {e}", kind.name());
        if self.kind_errors.get(&kind) != Some(&message) {
            warn!(cluster = %self.id, "{message}");
        }
        self.kind_errors.insert(kind, message);
        // the error first: a reader seeing the cluster unreachable also sees why
        self.publish_error();
        if unreachable {
            self.unreachable();
        }
    }

    fn on_probe(&mut self, result: Result<(), ProbeError>) {
        match result {
            Ok(()) => {
                self.probe_error = None;
                self.publish_error();
                self.reachable();
            }
            Err(e) => {
                let message = format!("GET /version: {}", e.message);
                if self.probe_error.as_ref() != Some(&message) {
                    debug!(cluster = %self.id, "{message}");
                }
                self.probe_error = Some(message);
                self.publish_error();
                if e.unreachable {
                    self.unreachable();
                }
            }
        }
    }

    fn unreachable(&mut self) {
        if self.unreachable_since.is_some() {
            return;
        }
        let since = SystemTime::now();
        self.unreachable_since = Some(since);
        warn!(cluster = %self.id, "API server unreachable; serving its last-known endpoints");
        self.probe_now.notify_one();
        self.health.update(&self.id, |s| s.unreachable_since = Some(since));
        self.send(SourceEvent::ClusterReachability { cluster: self.id.clone(), reachable: false, since });
    }

    fn reachable(&mut self) {
        let Some(since) = self.unreachable_since.take() else { return };
        let now = SystemTime::now();
        info!(
            cluster = %self.id,
            unreachable_for = ?now.duration_since(since).unwrap_or_default(),
            "API server reachable again; resuming watches"
        );
        // watchers waiting in backoff retry now
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
        self.health.update(&self.id, |s| s.unreachable_since = None);
        self.send(SourceEvent::ClusterReachability { cluster: self.id.clone(), reachable: true, since: now });
    }

    fn touch(&self) {
        self.health.update(&self.id, |s| s.last_event = Some(SystemTime::now()));
    }

    /// A watch stream was cut, or delivered: a kind whose watch delivers again is over its watch error.
    fn on_watch_streams(&mut self) {
        for kind in self.cuts.take_delivered() {
            if self.kind_errors.get(&kind).is_some_and(|e| e.contains(" watch: ")) {
                self.kind_errors.remove(&kind);
            }
        }
        self.publish_error();
    }

    fn current_error(&self) -> Option<String> {
        let cut = self.cuts.errors();
        let mut parts: Vec<&str> = self.kind_errors.values().map(String::as_str).collect();
        parts.extend(cut.iter().map(String::as_str));
        parts.extend(self.probe_error.as_deref());
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    fn publish_error(&self) {
        let error = self.current_error();
        self.health.update(&self.id, |s| {
            if s.last_error != error {
                s.last_error = error;
            }
        });
    }

    fn clear_object_error(&mut self, kind: WatchedKind, key: &ObjectKey) {
        if self.object_errors.get_mut(&kind).and_then(|m| m.remove(key)).is_some() {
            self.publish_object_errors();
        }
    }

    fn publish_object_errors(&self) {
        let list: Vec<String> = self.object_errors.values().flat_map(|m| m.values().cloned()).collect();
        self.health.update(&self.id, |s| {
            if s.object_errors != list {
                s.object_errors = list;
            }
        });
    }
}
