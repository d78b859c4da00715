//! One xDS stream, SotW or Delta, per Envoy's xDS protocol document: its loop (requests, pushes, drain),
//! the proxy it serves (identified by the first request's node), ACK/NACK bookkeeping and the status the
//! debug surface reports. The protocol flavors are in [`super::sotw`] and [`super::delta`], the per-type
//! state in [`super::type_state`], the stream's connection and outbox in [`super::context`].
//!
//! Pushes come from the cache's snapshot channel; a stream that falls behind reads the newest snapshot
//! and diffs against what its client holds, so it always converges on the latest state.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tokio::sync::watch;
use tonic::Status;
use tracing::{debug, info, warn};

use super::codec::{Response, SotwRequest};
use super::connections::{Connection, Connections, Flavor, TypeStatus, XdsService};
pub use super::context::{Outbox, StreamContext, StreamResult};
use super::context::{drained, proxy_namespace, request_error};
use super::session::{ProxySession, Sessions};
use super::shared_push::{self, SharedPushes};
use super::type_state::TypeState;
use crate::cache::{Resources, Snapshot};
use crate::grpc;
use crate::proxy::Proxy;
use crate::push::PushHandle;
use crate::translate::View;
use crate::type_url::ResourceType;

/// Streams that send their initial configuration at once. A proxy's first configuration is its largest
/// (at S, ~1.5 MB per sidecar); a fleet reconnecting at once (a restart, a failover) would otherwise
/// queue thousands of them ahead of the pushes to proxies already connected. istiod bounds concurrent
/// pushes the same way (`PILOT_PUSH_THROTTLE`).
pub const WARMING_STREAMS: usize = 16;
/// A stream counts as warming until its client ACKed every type it asked for, or this long.
const WARM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

static WARMING: std::sync::LazyLock<Arc<tokio::sync::Semaphore>> =
    std::sync::LazyLock::new(|| Arc::new(tokio::sync::Semaphore::new(WARMING_STREAMS)));

/// Where a stream is in sending its first configuration.
#[derive(Debug, Default)]
enum Warmth {
    /// nothing sent yet
    #[default]
    Cold,
    /// sending it, under a [`WARMING`] permit, until the deadline at the latest
    Warming {
        _permit: tokio::sync::OwnedSemaphorePermit,
        deadline: tokio::time::Instant,
    },
    Warm,
}

/// Type URLs that are not resource types a stream answers at most (istioctl asks for one or two).
const MAX_OTHER_TYPES: usize = 8;

/// Per-type streams get ids for their lines in their proxy's status.
static NEXT_STREAM_ID: AtomicU64 = AtomicU64::new(1);

pub struct Stream {
    pub(super) flavor: Flavor,
    /// ADS (every type), or the per-type EDS service (ClusterLoadAssignments only)
    pub(super) service: XdsService,
    /// this stream's line in its proxy's status (per-type streams)
    pub(super) id: u64,
    pub(super) push: PushHandle,
    pub(super) connections: Arc<Connections>,
    pub(super) out: Outbox,
    /// the proxy, once the first request identified it (shared by a proxy's per-type streams)
    pub(super) session: Option<Arc<ProxySession>>,
    /// the session's view when this stream last looked (read on every push)
    pub(super) view: Option<View>,
    pub(super) snapshots: watch::Receiver<Arc<Snapshot>>,
    pub(super) snapshot: Arc<Snapshot>,
    pub(super) types: [Option<Box<TypeState>>; 4],
    pub(super) nonce: u64,
    /// the view keys (failoverPriority labels, DestinationRule namespaces and selectors) the view was
    /// built with
    pub(super) view_keys: Arc<crate::translate::ViewKeys>,
    /// type URLs that are not resource types (istioctl's debug types) this stream has answered
    pub(super) other_types: Vec<Box<str>>,
    /// the connection (identity, limits) and the listener's drain signal
    pub(super) context: StreamContext,
    warmth: Warmth,
    /// the generation the stream held before the push it is making
    pub(super) pushed_from: u64,
    /// what a push does to the streams it does the same to, worked out once ([`super::shared_push`])
    pub(super) shared: Arc<SharedPushes>,
}

/// Resolves when a warming stream's deadline passes (never for another stream).
async fn warm_deadline(warmth: &Warmth) {
    match warmth {
        Warmth::Warming { deadline, .. } => tokio::time::sleep_until(*deadline).await,
        _ => std::future::pending().await,
    }
}

impl Stream {
    pub fn new(flavor: Flavor, push: PushHandle, connections: Arc<Connections>, out: Outbox) -> Stream {
        let snapshots = push.subscribe();
        let snapshot = snapshots.borrow().clone();
        Stream {
            flavor,
            service: XdsService::Ads,
            id: 0,
            push,
            connections,
            out,
            session: None,
            view: None,
            snapshots,
            snapshot,
            types: Default::default(),
            nonce: 0,
            view_keys: Default::default(),
            other_types: Vec::new(),
            context: StreamContext::default(),
            warmth: Warmth::Cold,
            pushed_from: 0,
            shared: Arc::default(),
        }
    }

    /// Shares what pushes work out with the other streams of `shared` (the server's).
    pub fn sharing(mut self, shared: Arc<SharedPushes>) -> Stream {
        self.shared = shared;
        self
    }

    /// Sets the connection and listener the stream runs on.
    pub fn with_context(mut self, context: StreamContext) -> Stream {
        self.context = context;
        self
    }

    /// A stream of the per-type service `service` (EDS beside istiod): it serves that service's type
    /// only, shares its proxy's session with the proxy's other streams on the connection, and does not
    /// wait for a warming slot (its first response is one assignment).
    pub fn for_service(mut self, service: XdsService) -> Stream {
        self.service = service;
        if service != XdsService::Ads {
            self.id = NEXT_STREAM_ID.fetch_add(1, Ordering::Relaxed);
            self.warmth = Warmth::Warm;
        }
        self
    }

    /// The proxy's entry in the connection status.
    pub(super) fn conn(&self) -> Option<&Arc<Connection>> {
        self.session.as_ref().map(|s| s.entry())
    }

    pub(super) fn proxy(&self) -> Option<&Proxy> {
        self.session.as_ref().map(|s| &s.proxy)
    }

    /// Updates this stream's status of type `t`: the ADS stream's line of its proxy, or this per-type
    /// stream's own line.
    pub(super) fn update_status(&self, t: ResourceType, f: impl FnOnce(&mut TypeStatus)) {
        let Some(c) = self.conn() else { return };
        match self.service {
            XdsService::Ads => c.update(t, f),
            _ => c.update_stream(self.id, f),
        }
    }

    /// The resource type a request asks for: None for a type meshfed does not serve as a resource type
    /// (istioctl's debug types, anything unknown: the caller answers those). A per-type stream serves its
    /// type only (a request without a type URL asks for it); another type ends it with INVALID_ARGUMENT.
    pub(super) fn request_type(&self, type_url: &str) -> Result<Option<ResourceType>, Status> {
        let Some(only) = self.served_type() else { return Ok(ResourceType::from_type_url(type_url)) };
        if type_url.is_empty() || type_url == only.type_url() {
            return Ok(Some(only));
        }
        Err(Status::invalid_argument(format!(
            "meshfed: this {} stream serves {} only, not {type_url:?}",
            self.service.as_str(),
            only.type_url()
        )))
    }

    /// Whether a request of a type that is not a resource type is the first of its type on this stream
    /// (then it is answered; later ones answer that response).
    pub(super) fn first_of_other_type(&mut self, type_url: &str) -> bool {
        if self.other_types.iter().any(|t| &**t == type_url) {
            return false;
        }
        // bounded: a client cycling through made-up type URLs gets no more answers
        if self.other_types.len() >= MAX_OTHER_TYPES {
            return false;
        }
        self.other_types.push(type_url.into());
        true
    }

    /// The type a per-type stream serves (None: ADS, every type).
    pub(super) fn served_type(&self) -> Option<ResourceType> {
        match self.service {
            XdsService::Ads => None,
            XdsService::Endpoints => Some(ResourceType::Endpoint),
        }
    }

    pub(super) fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        self.nonce.to_string()
    }

    /// Identifies the proxy from the first request's node and attaches its view (a per-type stream joins
    /// the session of its node on the connection, if another stream made one).
    pub(super) async fn init(&mut self, node: Option<&envoy_types::pb::envoy::config::core::v3::Node>) -> StreamResult {
        if self.session.is_some() {
            return Ok(());
        }
        let shared = match (self.service, node, self.context.conn.as_ref()) {
            (XdsService::Endpoints, Some(node), Some(conn)) => Some((Sessions::key(node), conn.0.clone())),
            _ => None,
        };
        if let Some((key, conn)) = &shared
            && let Some(session) = conn.sessions.find(key)
        {
            self.context.check_identity(&session.proxy)?;
            let (view, keys) = session.view();
            self.view = Some(view);
            self.view_keys = keys;
            let attached = session.attached_snapshot();
            self.session = Some(session);
            self.take_snapshot(attached);
            return Ok(());
        }
        let proxy = Proxy::from_node(node).map_err(|e| {
            warn!(error = %e, "refusing xDS stream");
            Status::invalid_argument(e.to_string())
        })?;
        self.context.check_identity(&proxy).inspect_err(|status| {
            warn!(proxy = %proxy.id, reason = status.message(), "refusing xDS stream: identity");
        })?;
        let (session, attached) = ProxySession::attach(proxy, &self.push, &self.connections, self.flavor, self.service)
            .await
            .ok_or_else(|| Status::unavailable("server shutting down"))?;
        let session = match shared {
            Some((key, conn)) => conn.sessions.insert(key, session),
            None => session,
        };
        let p = &session.proxy;
        info!(proxy = %p.id, flavor = self.flavor.as_str(), service = self.service.as_str(), client = ?p.client, "proxy connected");
        let (view, keys) = session.view();
        self.view = Some(view);
        self.view_keys = keys;
        self.session = Some(session);
        self.take_snapshot(attached);
        Ok(())
    }

    /// Takes the snapshot an attach returned, or the published one if that is newer (it was built after
    /// the attach, so it holds this stream's scopes too).
    pub(super) fn take_snapshot(&mut self, attached: Arc<Snapshot>) {
        let published = self.snapshots.borrow_and_update().clone();
        self.snapshot = if published.generation > attached.generation { published } else { attached };
    }

    /// Runs the stream until the client goes away or an error ends it.
    pub async fn run(mut self, mut requests: grpc::Messages) {
        use tokio_stream::StreamExt as _;
        let mut drain = self.context.drain.take();
        // Created once: the stream's loop polls them on every event without registering again.
        let drained = drained(&mut drain);
        let mut changes = tokio_stream::wrappers::WatchStream::from_changes(self.snapshots.clone());
        tokio::pin!(drained);
        let result = async {
            loop {
                tokio::select! {
                    req = requests.message() => match req {
                        Ok(Some(raw)) => self.handle_raw(raw).await?,
                        Ok(None) => return Ok(()),
                        Err(e) => return request_error(e),
                    },
                    _ = &mut drained => {
                        return Err(Status::unavailable("meshfed is shutting down: reconnect"));
                    }
                    changed = changes.next(), if self.view.is_some() => {
                        if changed.is_none() { return Err(Status::unavailable("server shutting down")) }
                        self.on_snapshot().await?;
                    }
                    _ = warm_deadline(&self.warmth) => {
                        // not all ACKed in time: the next stream may go ahead
                        self.warmth = Warmth::Warm;
                    }
                }
            }
        }
        .await;
        self.finish(result).await;
    }

    /// Decodes and handles one request message.
    pub(super) async fn handle_raw(&mut self, raw: bytes::Bytes) -> StreamResult {
        let malformed = |e: &dyn std::fmt::Display| Status::invalid_argument(format!("malformed xDS request: {e}"));
        match self.flavor {
            Flavor::Sotw => {
                let req = SotwRequest::decode(raw).map_err(|e| malformed(&e))?;
                self.handle_sotw_request(req).await
            }
            Flavor::Delta => {
                let req = <DeltaDiscoveryRequest as prost::Message>::decode(raw).map_err(|e| malformed(&e))?;
                self.handle_delta(req).await
            }
        }
    }

    /// Handles one SotW request as the stream loop does (rate limit, then the protocol). Public for
    /// in-process drivers such as the fuzz targets (`meshfed-testkit`'s `fuzz`).
    pub async fn handle_sotw(&mut self, req: DiscoveryRequest) -> StreamResult {
        self.handle_sotw_request(req.into()).await
    }

    pub(super) async fn handle_sotw_request(&mut self, req: SotwRequest) -> StreamResult {
        self.context.admit_request()?;
        self.on_sotw_request(req).await
    }

    /// Handles one Delta request as the stream loop does.
    pub async fn handle_delta(&mut self, req: DeltaDiscoveryRequest) -> StreamResult {
        self.context.admit_request()?;
        self.on_delta_request(req).await
    }

    /// Takes the newest snapshot and pushes what changed, as the stream loop does on a new snapshot.
    pub async fn handle_snapshot(&mut self) -> StreamResult {
        if self.view.is_none() {
            return Ok(());
        }
        self.on_snapshot().await
    }

    pub(super) async fn finish(mut self, result: StreamResult) {
        if let Some(session) = &self.session {
            if self.service == XdsService::Ads {
                info!(proxy = %session.proxy.id, flavor = self.flavor.as_str(), "proxy disconnected");
            } else {
                session.entry().remove_stream(self.id);
            }
        }
        let status = result.err().unwrap_or_else(|| Status::ok(""));
        self.out.finish(status).await;
    }

    pub(super) async fn send(
        &mut self,
        t: ResourceType,
        response: Response,
        nonce: &str,
        version: &str,
    ) -> StreamResult {
        if let Warmth::Cold = self.warmth {
            // the first configuration waits its turn (see WARMING_STREAMS)
            if let Ok(permit) = WARMING.clone().acquire_owned().await {
                self.warmth = Warmth::Warming { _permit: permit, deadline: tokio::time::Instant::now() + WARM_TIMEOUT };
            }
        }
        let bytes = response.encoded_len() as u64;
        let (count, shared) = match &response {
            Response::Sotw(r) => (r.resources.resources().len(), r.resources.is_batch()),
            Response::Delta(r) => (r.resources.resources().len(), r.resources.is_batch()),
            Response::Raw(_) => (0, false),
        };
        let held = self.types[t.index()].as_ref().map(|s| s.held.len()).unwrap_or(0);
        let generation = self.snapshot.generation;
        crate::metrics::global().record_response(t, count, bytes, shared);
        if let Some(c) = self.conn() {
            // a change seen after the proxy connected: its ACK ends a convergence (metrics)
            let seen = self.snapshot.changes.seen.filter(|seen| *seen >= c.connected);
            self.update_status(t, |s| {
                s.sent_change_seen = seen;
                s.sent_nonce = nonce.to_string();
                s.sent_version = version.to_string();
                s.sent_generation = generation;
                s.sent_at = Some(SystemTime::now());
                s.responses_sent += 1;
                s.bytes_sent += bytes;
                s.resources = held;
            });
        }
        debug!(type_url = t.short(), nonce, count, bytes, "sending");
        self.out.send(response).await
    }

    pub(super) fn record_ack(&mut self, t: ResourceType, nonce: &str) {
        if let Some(ts) = self.types[t.index()].as_mut() {
            ts.acked = true;
        }
        if matches!(self.warmth, Warmth::Warming { .. }) && self.types.iter().flatten().all(|ts| ts.acked) {
            self.warmth = Warmth::Warm;
        }
        self.update_status(t, |s| {
            if let Some(seen) = s.ack(nonce) {
                crate::metrics::global().record_convergence(seen);
            }
        });
    }

    pub(super) fn record_nack(&self, t: ResourceType, nonce: &str, message: &str) {
        if let Some(p) = self.proxy() {
            warn!(proxy = %p.id, type_url = t.short(), nonce, error = message, "NACK");
        }
        crate::metrics::global().record_nack(t);
        self.update_status(t, |s| {
            s.last_error = Some(message.to_string());
            s.nacks += 1;
        });
    }

    /// Records a subscription change, and reports the names subscribed that meshfed does not serve (beside
    /// istiod: an EnvoyFilter selecting a service meshfed does not know); they get no resource, as the
    /// protocol says for resources that do not exist.
    pub(super) fn update_subscription_status(&mut self, t: ResourceType) {
        self.refresh_missing(t);
        let Some(ts) = &self.types[t.index()] else { return };
        let names = ts.names.clone();
        let wildcard = ts.wildcard;
        // the subscription is answered from the current snapshot: the stream has seen its generation
        // (what `record_seen` records at pushes)
        let generation = self.snapshot.generation;
        self.update_status(t, |s| {
            s.subscribed = true;
            s.wildcard = wildcard;
            s.subscribed_names = names.len();
            s.names = names;
            if t == ResourceType::Endpoint {
                s.seen_generation = generation;
            }
        });
    }

    /// Recomputes which subscribed names meshfed does not serve (at subscription changes, and at pushes
    /// while some are missing: a service can appear later); names newly missing are logged and counted.
    pub(super) fn refresh_missing(&mut self, t: ResourceType) {
        let current = self.current(t);
        let Some(ts) = self.types[t.index()].as_mut() else { return };
        let missing: Vec<Arc<str>> = ts.names.iter().filter(|n| !current.contains_key(&***n)).cloned().collect();
        if missing == ts.missing {
            return;
        }
        let new: Vec<&Arc<str>> = missing.iter().filter(|n| !ts.missing.contains(n)).collect();
        if !new.is_empty() {
            crate::metrics::global().record_unknown_resources(t, new.len());
            if let Some(p) = self.session.as_ref().map(|s| &s.proxy) {
                warn!(proxy = %p.id, type_url = t.short(), names = ?new, "subscribed to resources meshfed does not serve");
            }
        }
        ts.missing = missing.clone();
        self.update_status(t, |s| s.missing = missing);
    }

    /// The answer to an istioctl debug type, limited to the proxies the client may see
    /// ([`StreamContext::debug_scope`]).
    pub(super) fn debug_resources(
        &self,
        type_url: &str,
        names: &[String],
    ) -> Result<Vec<(String, envoy_types::pb::google::protobuf::Any)>, Status> {
        if !crate::type_url::is_debug_type(type_url) {
            return Ok(Vec::new());
        }
        let scope = self.context.debug_scope()?;
        let allowed = |name: &str| scope.is_none_or(|ns| proxy_namespace(name).as_deref() == Some(ns));
        let names: Vec<String> = names.iter().filter(|n| allowed(n)).cloned().collect();
        let Some(debug) = &self.context.debug else { return Ok(Vec::new()) };
        let mut out = debug.resources(type_url, &names);
        if type_url == crate::type_url::TYPE_DEBUG_SYNCZ {
            out.retain(|(name, _)| allowed(name));
        }
        Ok(out)
    }

    pub(super) fn current(&self, t: ResourceType) -> Resources {
        self.view.as_ref().and_then(|v| self.snapshot.resources(v, t)).unwrap_or_default()
    }

    /// After a cluster changes, Envoy re-initialises it and waits for its endpoints: make sure they are
    /// sent again (as istiod does by pushing EDS with CDS).
    pub(super) fn mark_endpoints_dirty(&mut self, clusters: &[Arc<str>]) {
        if let Some(eds) = self.types[ResourceType::Endpoint.index()].as_mut() {
            for c in clusters {
                if eds.held.contains_key(c) {
                    eds.dirty.insert(c.clone());
                }
            }
        }
    }

    // ---------------- pushes ----------------

    pub(super) async fn on_snapshot(&mut self) -> StreamResult {
        let next = self.snapshots.borrow_and_update().clone();
        if next.generation <= self.snapshot.generation {
            // already taken (an attach returns a snapshot newer than the last one published)
            return Ok(());
        }
        // the changes since the stream's snapshot: a stream that fell a few generations behind diffs
        // only what they changed
        let from = self.snapshot.generation;
        let changes = next.changes_since(from);
        // failoverPriority rules now read other labels, or DestinationRules make other namespaces or
        // labels matter: this proxy's view may change.
        if *next.view_keys != *self.view_keys
            && let Some(session) = self.session.clone()
        {
            let (view, attached) = session
                .view_for(&next.view_keys, &self.push)
                .await
                .ok_or_else(|| Status::unavailable("server shutting down"))?;
            self.view_keys = next.view_keys.clone();
            if self.view.as_ref() != Some(&view) {
                self.view = Some(view);
                match attached {
                    Some(attached) => self.take_snapshot(attached),
                    None => self.snapshot = next,
                }
                self.push_all(None, from).await?;
                self.record_seen();
                return Ok(());
            }
        }
        self.snapshot = next;
        self.push_all(changes, from).await?;
        self.record_seen();
        Ok(())
    }

    /// The stream has looked at its snapshot's generation (sent what it changed, if anything): drill
    /// reports count a proxy that had nothing to receive as having it.
    fn record_seen(&self) {
        let generation = self.snapshot.generation;
        if self.types[ResourceType::Endpoint.index()].is_some() {
            self.update_status(ResourceType::Endpoint, |s| s.seen_generation = generation);
        }
    }

    /// Sends what the current snapshot changed (`contiguous`: it follows the previous one, so its change
    /// list is complete) or, otherwise, whatever differs from what the client holds.
    pub(super) async fn push_all(
        &mut self,
        changes: Option<Vec<Arc<crate::cache::Changes>>>,
        from: u64,
    ) -> StreamResult {
        let generation = self.snapshot.generation;
        self.pushed_from = from;
        for t in ResourceType::ALL {
            let Some(ts) = self.types[t.index()].as_ref() else { continue };
            // the names changed since generation `from` (borrowed from the snapshot when one generation
            // changed them), with the ones to send again
            let candidates: Option<std::borrow::Cow<'_, BTreeSet<Arc<str>>>> = match &changes {
                Some(changes) => {
                    let mut changed = changes.iter().filter_map(|c| c.get(t)).map(|ch| &ch.0);
                    let (first, second) = (changed.next(), changed.next());
                    let c = match (first, second) {
                        (Some(one), None) if ts.dirty.is_empty() => std::borrow::Cow::Borrowed(one),
                        _ => {
                            let mut c: BTreeSet<Arc<str>> = ts.dirty.iter().cloned().collect();
                            for ch in first.into_iter().chain(second).chain(changed) {
                                c.extend(ch.iter().cloned());
                            }
                            std::borrow::Cow::Owned(c)
                        }
                    };
                    if c.is_empty() {
                        // nothing of this type changed: a synced client still holds its scope's map
                        if ts.synced == Some(from) {
                            let current = self.current(t);
                            if let Some(ts) = self.types[t.index()].as_mut() {
                                ts.advance(&current, from, generation);
                            }
                        }
                        continue;
                    }
                    Some(c)
                }
                None => None,
            };
            // A stream subscribed to a few names (beside istiod: one EDS stream per cluster) looks at
            // those of them that changed, not at every changed name. (Not for a client that holds its whole
            // scope: checking every changed name is what keeps it marked so.)
            let candidates = match candidates {
                Some(c) if !ts.wildcard && ts.synced.is_none() && ts.names.len() < c.len() => {
                    Some(std::borrow::Cow::Owned(ts.names.iter().filter(|n| c.contains(*n)).cloned().collect()))
                }
                c => c,
            };
            let missing = !ts.missing.is_empty();
            // a push that changes several names: what it does to a synced stream is worked out once
            let shared = match &candidates {
                Some(std::borrow::Cow::Borrowed(changed)) if shared_push::shares(t) => {
                    let current = self.current(t);
                    self.shared
                        .outcome(self.flavor, t, (from, generation), ts, &current, changed)
                        .map(|outcome| (outcome, current))
                }
                _ => None,
            };
            match (shared, self.flavor) {
                (Some((outcome, current)), _) => self.push_shared(t, &outcome, current).await?,
                (None, Flavor::Sotw) => self.sotw_respond(t, candidates.as_deref(), false).await?,
                (None, Flavor::Delta) => self.delta_respond(t, candidates.as_deref(), false).await?,
            }
            if missing {
                self.refresh_missing(t);
            }
        }
        Ok(())
    }

    /// Makes a push whose outcome for this stream was worked out for every stream like it: the client
    /// holds the scope's map of the push's generation afterwards.
    async fn push_shared(
        &mut self,
        t: ResourceType,
        outcome: &shared_push::Outcome,
        current: Resources,
    ) -> StreamResult {
        let generation = self.snapshot.generation;
        let Some(ts) = self.types[t.index()].as_mut() else { return Ok(()) };
        ts.clear_dirty();
        ts.held = current;
        ts.synced = Some(generation);
        let shared_push::Outcome::Send(update) = outcome else { return Ok(()) };
        ts.held_hash ^= update.hash_delta;
        let resources = super::codec::Payload::Batch(update.batch.clone());
        self.send_update(t, update.inflight.clone(), resources, update.removed.clone()).await
    }

    /// Sends `resources` of type `t` (Delta: and `removed`) as the stream's next response, whose answer
    /// rolls `inflight` back if it is a NACK. What the client will hold is recorded already.
    pub(super) async fn send_update(
        &mut self,
        t: ResourceType,
        inflight: super::type_state::Inflight,
        resources: super::codec::Payload,
        removed: Vec<Arc<str>>,
    ) -> StreamResult {
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let Some(ts) = self.types[t.index()].as_mut() else { return Ok(()) };
        ts.pending.push_back((nonce.clone(), inflight));
        let (response, version) = match self.flavor {
            Flavor::Sotw => {
                while ts.pending.len() > super::type_state::MAX_PENDING_SOTW {
                    ts.pending.pop_front();
                }
                ts.last_nonce = Some(nonce.clone());
                let version = ts.sotw_version();
                let r = super::codec::SotwResponse {
                    version_info: version.clone(),
                    type_url: t.type_url(),
                    nonce: nonce.clone(),
                    resources,
                };
                (Response::Sotw(r), version)
            }
            Flavor::Delta => {
                while ts.pending.len() > super::type_state::MAX_PENDING {
                    ts.pending.pop_front();
                }
                let r = super::codec::DeltaResponse {
                    system_version_info: String::new(),
                    type_url: t.type_url(),
                    nonce: nonce.clone(),
                    resources,
                    removed_resources: removed,
                };
                (Response::Delta(r), String::new())
            }
        };
        self.send(t, response, &nonce, &version).await
    }
}
