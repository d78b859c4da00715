//! The load client: many Envoy-like ADS streams, each on its own HTTP/2 connection (as Envoy keeps one
//! connection per proxy to its xDS server), half SotW and half Delta by default.
//!
//! Each proxy subscribes as Envoy does: CDS wildcard, then EDS for every EDS cluster it received; after the
//! first EDS answer, LDS wildcard, then RDS for the route names in the listeners' HTTP connection managers.
//! It ACKs every response (SotW ACKs repeat the subscribed names, as Envoy's do) and records, in a shared
//! [`Recorder`], the bytes and resources it received per type, when its full config was first ACKed, and
//! when it ACKed a watched resource (for change -> ACK latencies).
//!
//! The client reads responses field by field ([`super::wire`]) and writes SotW name lists from bytes
//! encoded once and shared by every proxy with the same list, to leave the CPU to the server.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use tokio::sync::{Notify, Semaphore, watch};

use super::wire::{self, GrpcReader};
use meshfed::type_url::ResourceType;

pub const SOTW_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
pub const DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// HTTP/2 receive windows of the load client (Envoy's xDS connections use large windows too).
pub const DEFAULT_WINDOW: u32 = 16 * 1024 * 1024;

/// Per-proxy counters.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// bytes of responses received, per type (indexed by [`ResourceType::index`])
    pub bytes: [AtomicU64; 4],
    pub responses: [AtomicU64; 4],
    pub resources: [AtomicU64; 4],
    /// microseconds after the stream started until its full config (CDS, EDS, LDS, RDS) was ACKed; 0: not yet
    pub ready_us: AtomicU64,
    /// like `ready_us`, but kept after the stream ends (the last stream's time to full config)
    pub last_ready_us: AtomicU64,
    /// the last watch epoch this proxy ACKed a watched resource in
    hit_epoch: AtomicU64,
    pub nacks_sent: AtomicU64,
    /// responses that carried a version this proxy had NACKed (a re-send of a rejected version)
    pub rejected_resent: AtomicU64,
    /// responses after a NACK that carried new content for the rejected resource
    pub accepted_after_nack: AtomicU64,
}

/// One ACK of a watched resource.
#[derive(Clone, Debug)]
pub struct Hit {
    pub proxy: u32,
    pub epoch: u64,
    /// when the ACK was written
    pub at: Instant,
    pub name: Arc<str>,
    /// xxh3 of the resource's `Any` bytes
    pub hash: u64,
}

/// Resources being watched for a change.
#[derive(Debug)]
pub struct Watch {
    pub epoch: u64,
    pub names: HashSet<Arc<str>>,
    /// only proxies with a lower index record hits
    pub below: u32,
}

/// A plan to NACK: proxies in `proxies` NACK the first response carrying `name`, and count re-sends of it.
#[derive(Debug)]
pub struct NackPlan {
    pub name: Arc<str>,
    pub proxies: HashSet<u32>,
    /// proxy -> hash of the version it rejected
    pub rejected: Mutex<HashMap<u32, u64>>,
}

/// What all proxies of a run share.
#[derive(Debug)]
pub struct Recorder {
    pub stats: Vec<ProxyStats>,
    watch: RwLock<Option<Arc<Watch>>>,
    hits: Mutex<Vec<Hit>>,
    epoch_hits: AtomicUsize,
    hit_notify: Notify,
    nack: RwLock<Option<Arc<NackPlan>>>,
    /// proxies whose full config is ACKed (since they last connected)
    pub ready: AtomicUsize,
    ready_notify: Notify,
    /// streams currently open
    pub open: AtomicUsize,
    pub errors: AtomicU64,
    /// reconnections after a failed or ended stream
    pub retries: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Recorder {
    pub fn new(proxies: usize) -> Arc<Recorder> {
        Arc::new(Recorder {
            stats: (0..proxies).map(|_| ProxyStats::default()).collect(),
            watch: RwLock::new(None),
            hits: Mutex::new(Vec::new()),
            epoch_hits: AtomicUsize::new(0),
            hit_notify: Notify::new(),
            nack: RwLock::new(None),
            ready: AtomicUsize::new(0),
            ready_notify: Notify::new(),
            open: AtomicUsize::new(0),
            errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            last_error: Mutex::new(None),
        })
    }

    /// Starts watching `names` under a new epoch (hits of earlier epochs stay recorded).
    pub fn watch(&self, epoch: u64, names: impl IntoIterator<Item = Arc<str>>) {
        self.watch_below(epoch, names, u32::MAX);
    }

    /// [`Self::watch`], recording only proxies with an index below `below`.
    pub fn watch_below(&self, epoch: u64, names: impl IntoIterator<Item = Arc<str>>, below: u32) {
        self.epoch_hits.store(0, Ordering::SeqCst);
        let w = Watch { epoch, names: names.into_iter().collect(), below };
        *self.watch.write().expect("watch lock") = Some(Arc::new(w));
    }

    pub fn unwatch(&self) {
        *self.watch.write().expect("watch lock") = None;
    }

    /// Proxies that ACKed a watched resource in the current epoch.
    pub fn epoch_hits(&self) -> usize {
        self.epoch_hits.load(Ordering::SeqCst)
    }

    /// Every hit recorded so far (and forgets them).
    pub fn take_hits(&self) -> Vec<Hit> {
        std::mem::take(&mut *self.hits.lock().expect("hits lock"))
    }

    pub fn set_nack_plan(&self, plan: Option<NackPlan>) {
        *self.nack.write().expect("nack lock") = plan.map(Arc::new);
    }

    pub fn nack_plan(&self) -> Option<Arc<NackPlan>> {
        self.nack.read().expect("nack lock").clone()
    }

    /// The watch proxy `index` records hits for, if any.
    pub(crate) fn watch_for(&self, index: u32) -> Option<Arc<Watch>> {
        self.watch.read().expect("watch lock").clone().filter(|w| index < w.below)
    }

    /// Records that proxy `index` ACKed the watched resources `watched` (name, xxh3 of the `Any`) now.
    pub(crate) fn record_hits(&self, index: u32, w: &Watch, watched: Vec<(Arc<str>, u64)>) {
        if watched.is_empty() {
            return;
        }
        let at = Instant::now();
        let mut hits = self.hits.lock().expect("hits lock");
        for (name, hash) in watched {
            hits.push(Hit { proxy: index, epoch: w.epoch, at, name, hash });
        }
        drop(hits);
        // counted after the hit is recorded: a waiter that sees the count finds the hit
        if self.stats[index as usize].hit_epoch.swap(w.epoch, Ordering::SeqCst) != w.epoch {
            self.epoch_hits.fetch_add(1, Ordering::SeqCst);
        }
        self.hit_notify.notify_waiters();
    }

    /// Proxy `index` has its full config ACKed, `us` microseconds after its stream(s) started.
    pub(crate) fn set_ready(&self, index: usize, us: u64) {
        self.stats[index].ready_us.store(us.max(1), Ordering::Relaxed);
        self.stats[index].last_ready_us.store(us.max(1), Ordering::Relaxed);
        self.ready.fetch_add(1, Ordering::SeqCst);
        self.ready_notify.notify_waiters();
    }

    /// Proxy `index` is gone: it no longer counts as ready.
    pub(crate) fn clear_ready(&self, index: usize) {
        if self.stats[index].ready_us.swap(0, Ordering::Relaxed) != 0 {
            self.ready.fetch_sub(1, Ordering::SeqCst);
        }
    }

    pub(crate) fn error(&self, e: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().expect("error lock") = Some(e);
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("error lock").clone()
    }

    /// Waits until `n` proxies are ready or `timeout` passes; returns whether they are.
    pub async fn wait_ready(&self, n: usize, timeout: Duration) -> bool {
        self.wait(&self.ready_notify, timeout, || self.ready.load(Ordering::SeqCst) >= n).await
    }

    /// Waits until `n` proxies ACKed a watched resource in the current epoch, or `timeout` passes.
    pub async fn wait_hits(&self, n: usize, timeout: Duration) -> bool {
        self.wait(&self.hit_notify, timeout, || self.epoch_hits() >= n).await
    }

    async fn wait(&self, notify: &Notify, timeout: Duration, cond: impl Fn() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = notify.notified();
            if cond() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return cond();
            }
        }
    }

    /// Sums of the per-type counters over all proxies: (bytes, responses, resources) per type.
    pub fn totals(&self) -> [[u64; 3]; 4] {
        let mut t = [[0u64; 3]; 4];
        for s in &self.stats {
            for (i, row) in t.iter_mut().enumerate() {
                row[0] += s.bytes[i].load(Ordering::Relaxed);
                row[1] += s.responses[i].load(Ordering::Relaxed);
                row[2] += s.resources[i].load(Ordering::Relaxed);
            }
        }
        t
    }

    pub fn sum(&self, f: impl Fn(&ProxyStats) -> &AtomicU64) -> u64 {
        self.stats.iter().map(|s| f(s).load(Ordering::Relaxed)).sum()
    }
}

// ---- shared name lists ----

/// A sorted list of resource names and its encoding as repeated field 3 (SotW `resource_names`, Delta
/// `resource_names_subscribe`). Proxies with the same list share one.
#[derive(Debug, PartialEq, Eq)]
pub struct NameList {
    pub names: Vec<Arc<str>>,
    pub encoded: Bytes,
}

static NAME_LISTS: LazyLock<Mutex<HashMap<u64, Vec<Arc<NameList>>>>> = LazyLock::new(Default::default);

/// The shared list of these names (sorted, deduplicated).
pub fn intern(names: impl IntoIterator<Item = Bytes>) -> Arc<NameList> {
    let set: BTreeSet<Bytes> = names.into_iter().collect();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for n in &set {
        h.update(n);
        h.update(&[0]);
    }
    let key = h.digest();
    let mut lists = NAME_LISTS.lock().expect("name lists");
    let bucket = lists.entry(key).or_default();
    if let Some(l) = bucket
        .iter()
        .find(|l| l.names.len() == set.len() && l.names.iter().zip(&set).all(|(a, b)| a.as_bytes() == &b[..]))
    {
        return l.clone();
    }
    let names: Vec<Arc<str>> = set.iter().map(|b| Arc::from(String::from_utf8_lossy(b).as_ref())).collect();
    let encoded = wire::encode_names(3, names.iter().map(|n| &**n));
    let l = Arc::new(NameList { names, encoded });
    bucket.push(l.clone());
    l
}

fn empty_list() -> Arc<NameList> {
    intern(std::iter::empty())
}

// ---- one proxy ----

/// Where and how proxies connect.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub addr: SocketAddr,
    /// HTTP/2 stream and connection receive window
    pub window: u32,
}

impl ClientOptions {
    pub fn new(addr: SocketAddr) -> ClientOptions {
        ClientOptions { addr, window: DEFAULT_WINDOW }
    }
}

#[derive(Default)]
struct TypeState {
    version: String,
    nonce: String,
    acked: bool,
    requested: bool,
}

/// A resource of a response: its name and its `google.protobuf.Any` bytes.
struct Item {
    name: Bytes,
    any: Bytes,
}

fn any_value(any: &Bytes) -> Bytes {
    wire::fields(any.clone()).find(|f| f.number == 2).map(|f| f.bytes).unwrap_or_default()
}

struct Proxy {
    index: u32,
    delta: bool,
    node: Option<Node>,
    types: [TypeState; 4],
    eds: Arc<NameList>,
    rds: Arc<NameList>,
    /// Delta: the EDS clusters received over CDS, and each listener's route names
    cds_eds: BTreeMap<Bytes, ()>,
    listener_routes: BTreeMap<Bytes, Vec<Bytes>>,
    ready: bool,
    started: Instant,
    rec: Arc<Recorder>,
    tx: h2::SendStream<Bytes>,
}

fn str_of(b: &Bytes) -> &str {
    std::str::from_utf8(b).unwrap_or("")
}

impl Proxy {
    fn send(&mut self, head: Vec<u8>, tail: Option<&Bytes>) -> Result<(), String> {
        let total = head.len() + tail.map_or(0, |t| t.len());
        let mut first = BytesMut::with_capacity(5 + head.len());
        first.put_slice(&wire::grpc_header(total));
        first.put_slice(&head);
        self.tx.send_data(first.freeze(), false).map_err(|e| format!("send: {e}"))?;
        if let Some(t) = tail.filter(|t| !t.is_empty()) {
            self.tx.send_data(t.clone(), false).map_err(|e| format!("send: {e}"))?;
        }
        Ok(())
    }

    /// SotW request for `t`: the current version and nonce, `names` (None: wildcard), optionally a NACK.
    fn sotw_request(
        &mut self,
        t: ResourceType,
        names: Option<Arc<NameList>>,
        error: Option<String>,
    ) -> Result<(), String> {
        let ts = &self.types[t.index()];
        let req = DiscoveryRequest {
            version_info: ts.version.clone(),
            node: self.node.take(),
            type_url: t.type_url().into(),
            response_nonce: ts.nonce.clone(),
            error_detail: error.map(|message| RpcStatus { code: 3, message, details: vec![] }),
            ..Default::default()
        };
        self.types[t.index()].requested = true;
        self.send(req.encode_to_vec(), names.as_ref().map(|n| &n.encoded))
    }

    fn delta_request(
        &mut self,
        t: ResourceType,
        subscribe: Option<Bytes>,
        unsubscribe: Vec<String>,
        nonce: String,
        error: Option<String>,
    ) -> Result<(), String> {
        let req = DeltaDiscoveryRequest {
            node: self.node.take(),
            type_url: t.type_url().into(),
            resource_names_unsubscribe: unsubscribe,
            response_nonce: nonce,
            error_detail: error.map(|message| RpcStatus { code: 3, message, details: vec![] }),
            ..Default::default()
        };
        self.types[t.index()].requested = true;
        self.send(req.encode_to_vec(), subscribe.as_ref())
    }

    fn subscription(&self, t: ResourceType) -> Option<Arc<NameList>> {
        match t {
            ResourceType::Endpoint => Some(self.eds.clone()),
            ResourceType::Route => Some(self.rds.clone()),
            _ => None,
        }
    }

    /// Subscribes to `t`'s new name list (EDS, RDS) as Envoy does.
    fn resubscribe(&mut self, t: ResourceType, new: Arc<NameList>) -> Result<(), String> {
        let old = match t {
            ResourceType::Endpoint => std::mem::replace(&mut self.eds, new.clone()),
            _ => std::mem::replace(&mut self.rds, new.clone()),
        };
        if Arc::ptr_eq(&old, &new) && self.types[t.index()].requested {
            return Ok(());
        }
        if self.delta {
            let old_set: HashSet<&Arc<str>> = old.names.iter().collect();
            let new_set: HashSet<&Arc<str>> = new.names.iter().collect();
            let sub: Vec<&str> = new.names.iter().filter(|n| !old_set.contains(n)).map(|n| &**n).collect();
            let unsub: Vec<String> = old.names.iter().filter(|n| !new_set.contains(n)).map(|n| n.to_string()).collect();
            if sub.is_empty() && unsub.is_empty() && self.types[t.index()].requested {
                return Ok(());
            }
            let sub = if sub.len() == new.names.len() { new.encoded.clone() } else { wire::encode_names(3, sub) };
            self.delta_request(t, Some(sub), unsub, String::new(), None)
        } else {
            self.sotw_request(t, Some(new), None)
        }
    }

    fn ack(&mut self, t: ResourceType, version: String, nonce: String) -> Result<(), String> {
        if self.delta {
            self.delta_request(t, None, Vec::new(), nonce, None)?;
        } else {
            let ts = &mut self.types[t.index()];
            ts.version = version;
            ts.nonce = nonce;
            let names = self.subscription(t);
            self.sotw_request(t, names, None)?;
        }
        self.types[t.index()].acked = true;
        self.check_ready();
        Ok(())
    }

    fn nack(&mut self, t: ResourceType, nonce: String, message: String) -> Result<(), String> {
        self.rec.stats[self.index as usize].nacks_sent.fetch_add(1, Ordering::Relaxed);
        if self.delta {
            self.delta_request(t, None, Vec::new(), nonce, Some(message))
        } else {
            // the version stays the last one ACKed
            self.types[t.index()].nonce = nonce;
            let names = self.subscription(t);
            self.sotw_request(t, names, Some(message))
        }
    }

    fn check_ready(&mut self) {
        if self.ready {
            return;
        }
        let rds_done = self.types[3].acked || (self.types[2].acked && self.rds.names.is_empty());
        if self.types[0].acked && self.types[1].acked && self.types[2].acked && rds_done {
            self.ready = true;
            self.rec.set_ready(self.index as usize, self.started.elapsed().as_micros() as u64);
        }
    }

    fn on_message(&mut self, msg: Bytes) -> Result<(), String> {
        let mut version = String::new();
        let mut type_url = Bytes::new();
        let mut nonce = String::new();
        let mut items: Vec<Item> = Vec::new();
        let mut removed: Vec<Bytes> = Vec::new();
        for f in wire::fields(msg.clone()) {
            match f.number {
                1 => version = String::from_utf8_lossy(&f.bytes).into_owned(),
                2 if self.delta => {
                    let mut it = Item { name: Bytes::new(), any: Bytes::new() };
                    for g in wire::fields(f.bytes) {
                        match g.number {
                            3 => it.name = g.bytes,
                            2 => it.any = g.bytes,
                            _ => {}
                        }
                    }
                    items.push(it);
                }
                2 => {
                    let name =
                        wire::fields(any_value(&f.bytes)).find(|g| g.number == 1).map(|g| g.bytes).unwrap_or_default();
                    items.push(Item { name, any: f.bytes });
                }
                4 => type_url = f.bytes,
                5 => nonce = String::from_utf8_lossy(&f.bytes).into_owned(),
                6 if self.delta => removed.push(f.bytes),
                _ => {}
            }
        }
        let Some(t) = ResourceType::from_type_url(str_of(&type_url)) else { return Ok(()) };
        let stats = &self.rec.stats[self.index as usize];
        stats.bytes[t.index()].fetch_add(msg.len() as u64, Ordering::Relaxed);
        stats.responses[t.index()].fetch_add(1, Ordering::Relaxed);
        stats.resources[t.index()].fetch_add(items.len() as u64, Ordering::Relaxed);
        match t {
            ResourceType::Cluster => self.on_clusters(items, removed, version, nonce),
            ResourceType::Endpoint => self.on_endpoints(items, version, nonce),
            ResourceType::Listener => self.on_listeners(items, removed, version, nonce),
            ResourceType::Route => self.ack(t, version, nonce),
        }
    }

    fn on_clusters(
        &mut self,
        items: Vec<Item>,
        removed: Vec<Bytes>,
        version: String,
        nonce: String,
    ) -> Result<(), String> {
        let mut eds: Vec<Bytes> = Vec::new();
        if !self.delta {
            self.cds_eds.clear();
        }
        for r in &removed {
            self.cds_eds.remove(r);
        }
        for it in items {
            let mut is_eds = false;
            let mut name = it.name;
            for f in wire::fields(any_value(&it.any)) {
                match f.number {
                    1 => name = f.bytes,
                    2 => is_eds = f.varint == 3,
                    _ => {}
                }
            }
            if is_eds {
                eds.push(name.clone());
                self.cds_eds.insert(name, ());
            } else {
                self.cds_eds.remove(&name);
            }
        }
        let list = intern(self.cds_eds.keys().cloned());
        // Envoy asks for the new clusters' endpoints, then ACKs the clusters.
        self.resubscribe(ResourceType::Endpoint, list)?;
        self.ack(ResourceType::Cluster, version, nonce)
    }

    fn on_endpoints(&mut self, items: Vec<Item>, version: String, nonce: String) -> Result<(), String> {
        let watch = self.rec.watch_for(self.index);
        let plan = self.rec.nack_plan().filter(|p| p.proxies.contains(&self.index));
        let mut watched: Vec<(Arc<str>, u64)> = Vec::new();
        let mut nack: Option<String> = None;
        for it in &items {
            let name = str_of(&it.name);
            if let Some(w) = &watch
                && let Some(n) = w.names.get(name)
            {
                watched.push((n.clone(), xxhash_rust::xxh3::xxh3_64(&it.any)));
            }
            if let Some(p) = &plan
                && &*p.name == name
            {
                let hash = xxhash_rust::xxh3::xxh3_64(&it.any);
                let mut rejected = p.rejected.lock().expect("nack lock");
                let stats = &self.rec.stats[self.index as usize];
                match rejected.get(&self.index) {
                    None => {
                        rejected.insert(self.index, hash);
                        nack = Some(format!("meshfed-load: rejecting {name} (planned NACK)"));
                    }
                    Some(h) if *h == hash => {
                        stats.rejected_resent.fetch_add(1, Ordering::Relaxed);
                        nack = Some(format!("meshfed-load: rejecting {name} again"));
                    }
                    Some(_) => {
                        stats.accepted_after_nack.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        match nack {
            Some(message) => self.nack(ResourceType::Endpoint, nonce, message)?,
            None => self.ack(ResourceType::Endpoint, version, nonce)?,
        }
        if let Some(w) = &watch {
            self.rec.record_hits(self.index, w, watched);
        }
        if !self.types[ResourceType::Listener.index()].requested {
            if self.delta {
                self.delta_request(ResourceType::Listener, None, Vec::new(), String::new(), None)?;
            } else {
                self.sotw_request(ResourceType::Listener, None, None)?;
            }
        }
        Ok(())
    }

    fn on_listeners(
        &mut self,
        items: Vec<Item>,
        removed: Vec<Bytes>,
        version: String,
        nonce: String,
    ) -> Result<(), String> {
        if !self.delta {
            self.listener_routes.clear();
        }
        for r in &removed {
            self.listener_routes.remove(r);
        }
        for it in items {
            let l = Listener::decode(any_value(&it.any)).map_err(|e| format!("bad listener: {e}"))?;
            let mut routes = Vec::new();
            for fc in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
                for f in &fc.filters {
                    let Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(any)) =
                        &f.config_type
                    else {
                        continue;
                    };
                    if any.type_url != HCM_TYPE {
                        continue;
                    }
                    let hcm = HttpConnectionManager::decode(&any.value[..]).map_err(|e| format!("bad HCM: {e}"))?;
                    if let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier {
                        routes.push(Bytes::from(rds.route_config_name));
                    }
                }
            }
            self.listener_routes.insert(Bytes::from(l.name), routes);
        }
        let list = intern(self.listener_routes.values().flatten().cloned());
        if !list.names.is_empty() {
            self.resubscribe(ResourceType::Route, list)?;
        } else {
            self.rds = list;
        }
        self.ack(ResourceType::Listener, version, nonce)
    }
}

/// Connects one proxy and runs its stream until `stop` turns true, the server ends it, or an error.
/// `connect_permit` is held until the stream is open (to bound concurrent connection setups).
pub async fn run_proxy(
    opts: Arc<ClientOptions>,
    rec: Arc<Recorder>,
    index: usize,
    node: Node,
    delta: bool,
    mut stop: watch::Receiver<bool>,
    connect_permit: Option<Arc<Semaphore>>,
) {
    let started = Instant::now();
    let permit = match &connect_permit {
        Some(s) => s.clone().acquire_owned().await.ok(),
        None => None,
    };
    rec.stats[index].ready_us.store(0, Ordering::Relaxed);
    let result = async {
        let tcp = tokio::net::TcpStream::connect(opts.addr).await.map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (send_req, conn) = h2::client::Builder::new()
            .initial_window_size(opts.window)
            .initial_connection_window_size(opts.window)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let conn_task = tokio::spawn(async move {
            let _ = conn.await;
        });
        let _abort = AbortOnDrop(conn_task);
        let mut send_req = send_req.ready().await.map_err(|e| format!("h2: {e}"))?;
        let path = if delta { DELTA_PATH } else { SOTW_PATH };
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}{path}", opts.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .map_err(|e| e.to_string())?;
        let (resp, tx) = send_req.send_request(req, false).map_err(|e| format!("request: {e}"))?;
        rec.open.fetch_add(1, Ordering::SeqCst);
        let _open = OpenGuard(rec.clone());
        let mut p = Proxy {
            index: index as u32,
            delta,
            node: Some(node),
            types: Default::default(),
            eds: empty_list(),
            rds: empty_list(),
            cds_eds: BTreeMap::new(),
            listener_routes: BTreeMap::new(),
            ready: false,
            started,
            rec: rec.clone(),
            tx,
        };
        if delta {
            p.delta_request(ResourceType::Cluster, None, Vec::new(), String::new(), None)?;
        } else {
            p.sotw_request(ResourceType::Cluster, None, None)?;
        }
        let resp = tokio::select! {
            r = resp => r.map_err(|e| format!("response: {e}"))?,
            _ = wait_stop(&mut stop) => return Ok(()),
        };
        drop(permit);
        if let Some(status) = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok())
            && status != "0"
        {
            let msg = resp.headers().get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or("");
            return Err(format!("grpc-status {status}: {msg}"));
        }
        let mut body = resp.into_body();
        let mut reader = GrpcReader::default();
        loop {
            tokio::select! {
                biased;
                _ = wait_stop(&mut stop) => return Ok(()),
                chunk = body.data() => match chunk {
                    None => {
                        let trailers = body.trailers().await.ok().flatten();
                        let status = trailers.as_ref().and_then(|t| t.get("grpc-status")).and_then(|v| v.to_str().ok()).unwrap_or("?").to_string();
                        let msg = trailers.as_ref().and_then(|t| t.get("grpc-message")).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                        return Err(format!("stream ended by the server: grpc-status {status} {msg}"));
                    }
                    Some(Err(e)) => return Err(format!("stream: {e}")),
                    Some(Ok(c)) => {
                        let _ = body.flow_control().release_capacity(c.len());
                        reader.push(&c);
                        while let Some(m) = reader.next_message()? {
                            p.on_message(m)?;
                        }
                    }
                }
            }
        }
    }
    .await;
    rec.clear_ready(index);
    if let Err(e) = result
        && !*stop.borrow()
    {
        rec.error(format!("proxy {index}: {e}"));
    }
}

/// [`run_proxy`], reconnecting after a failed or ended stream as Envoy does (after 0.5-1 s, at most
/// `retries` times); every failure is still counted in [`Recorder::errors`].
#[allow(clippy::too_many_arguments)]
pub async fn run_proxy_retrying(
    opts: Arc<ClientOptions>,
    rec: Arc<Recorder>,
    index: usize,
    node: Node,
    delta: bool,
    stop: watch::Receiver<bool>,
    connect_permit: Option<Arc<Semaphore>>,
    retries: usize,
) {
    for attempt in 0..=retries {
        run_proxy(opts.clone(), rec.clone(), index, node.clone(), delta, stop.clone(), connect_permit.clone()).await;
        if !pause_before_retry(&rec, index, attempt, retries, &stop).await {
            return;
        }
    }
}

/// After proxy `index`'s attempt `attempt` ended: false when it is not to be retried (the run stops, or
/// it was the last of `retries`); else counts the retry and waits 0.5-1 s (Envoy's reconnect backoff,
/// jittered per proxy and attempt), false if the run stops meanwhile.
pub(crate) async fn pause_before_retry(
    rec: &Recorder,
    index: usize,
    attempt: usize,
    retries: usize,
    stop: &watch::Receiver<bool>,
) -> bool {
    if *stop.borrow() || attempt == retries {
        return false;
    }
    rec.retries.fetch_add(1, Ordering::Relaxed);
    let jitter = xxhash_rust::xxh3::xxh3_64(&((index as u64) << 8 | attempt as u64).to_le_bytes()) % 500;
    let mut stop = stop.clone();
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(500 + jitter)) => true,
        _ = wait_stop(&mut stop) => false,
    }
}

pub(crate) async fn wait_stop(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(crate) struct OpenGuard(pub(crate) Arc<Recorder>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running proxy: stop it by dropping the handle or calling [`ProxyHandle::stop`].
pub struct ProxyHandle {
    pub(crate) stop: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<()>,
}

impl ProxyHandle {
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let _ = (&mut self.task).await;
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Starts proxy `index` in the background.
pub fn spawn_proxy(
    opts: &Arc<ClientOptions>,
    rec: &Arc<Recorder>,
    index: usize,
    node: Node,
    delta: bool,
    connect_permit: Option<Arc<Semaphore>>,
) -> ProxyHandle {
    let (stop, stop_rx) = watch::channel(false);
    let task =
        tokio::spawn(run_proxy_retrying(opts.clone(), rec.clone(), index, node, delta, stop_rx, connect_permit, 20));
    ProxyHandle { stop, task }
}

/// An ADS stream that never reads: it sends a CDS wildcard request and an EDS request for `eds_names`
/// over a connection with 64 KiB windows, and never polls the response. Holding it keeps the stream open.
pub struct StalledStream {
    _send_req: h2::client::SendRequest<Bytes>,
    _tx: h2::SendStream<Bytes>,
    _response: h2::client::ResponseFuture,
    _conn: AbortOnDrop,
}

pub async fn open_stalled_stream(
    addr: SocketAddr,
    node: Node,
    eds_names: &[Arc<str>],
) -> Result<StalledStream, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let (send_req, conn) = h2::client::Builder::new()
        .initial_window_size(65_535)
        .initial_connection_window_size(65_535)
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let mut send_req = send_req.ready().await.map_err(|e| format!("h2: {e}"))?;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{SOTW_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
    let (response, mut tx) = send_req.send_request(req, false).map_err(|e| format!("request: {e}"))?;
    let cds = DiscoveryRequest { node: Some(node), type_url: meshfed::type_url::CLUSTER.into(), ..Default::default() };
    let eds = DiscoveryRequest {
        type_url: meshfed::type_url::ENDPOINT.into(),
        resource_names: eds_names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    };
    for m in [cds.encode_to_vec(), eds.encode_to_vec()] {
        let mut b = BytesMut::with_capacity(5 + m.len());
        b.put_slice(&wire::grpc_header(m.len()));
        b.put_slice(&m);
        tx.send_data(b.freeze(), false).map_err(|e| format!("send: {e}"))?;
    }
    Ok(StalledStream { _send_req: send_req, _tx: tx, _response: response, _conn: conn })
}
