//! The xDS protocol state machine of one ADS stream, SotW or Delta, per Envoy's xDS protocol document.
//!
//! Per resource type the stream tracks the subscription (wildcard and/or names), what the client holds
//! (name -> resource/version; optimistic while a response is in flight, rolled back on NACK), the
//! versions the client rejected (never re-sent until their content changes) and the nonces in flight.
//! Pushes come from the cache's snapshot channel; a stream that falls behind reads the newest snapshot
//! and diffs against what its client holds, so it always converges on the latest state.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tokio::sync::{mpsc, watch};
use tonic::Status;
use tracing::{debug, info, warn};

use super::codec::{DeltaResponse, Response, SotwRequest, SotwResponse};
use super::connections::{Connection, ConnectionGuard, Connections, Flavor};
use super::server::ConnInfo;
use super::subscription::{self, NameSet};
use crate::cache::{Resource, Resources, Snapshot};
use crate::grpc;
use crate::proxy::Proxy;
use crate::push::{Attachment, PushHandle};
use crate::tls::PeerAuth;
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

/// At most this many Delta responses are tracked awaiting ACK per type; older ones count as ACKed.
const MAX_PENDING: usize = 16;
/// SotW responses kept until answered: a NACK that races newer pushes is still recorded. Fewer than
/// Delta keeps, since every full-state SotW response holds the type's whole state.
const MAX_PENDING_SOTW: usize = 4;

/// What the client holds of one resource: the resource sent, or (for a version a Delta client reported
/// on reconnect, `initial_resource_versions`) a stand-in with that version ([`Resource::reported`]).
type Held = Arc<Resource>;

fn entry_hash(name: &str, version: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes()) ^ xxhash_rust::xxh3::xxh3_64(version.as_bytes()).rotate_left(1)
}

/// A response in flight: what each name held before it, to roll back on NACK.
type Inflight = Vec<(Arc<str>, Option<Held>)>;

#[derive(Debug)]
struct TypeState {
    wildcard: bool,
    /// the names subscribed, shared with every stream subscribed to the same names
    names: Arc<NameSet>,
    /// what the client holds, by name. A persistent map: while the client holds exactly what its scope
    /// has, this is the snapshot's own map (`synced`), shared by every such stream.
    held: Resources,
    /// xor of entry hashes of `held`: an order-independent, content-derived SotW version
    held_hash: u64,
    /// `held` equals (is) the scope's map of this snapshot generation
    synced: Option<u64>,
    rejected: HashMap<Arc<str>, Arc<str>>,
    /// names to send again at the next push even if unchanged (EDS after its cluster changed)
    dirty: HashSet<Arc<str>>,
    /// every unanswered response (nonce, what it carried), oldest first (at most [`MAX_PENDING_SOTW`] /
    /// [`MAX_PENDING`])
    pending: VecDeque<(String, Inflight)>,
    /// SotW: the nonce of the latest response sent (kept after its ACK: later requests carry it too)
    last_nonce: Option<String>,
    /// SotW: fingerprint of the last requested name list (see [`SotwRequest::names_fingerprint`])
    names_fingerprint: u64,
    /// the client ACKed a response of this type
    acked: bool,
}

impl TypeState {
    fn new() -> Self {
        TypeState {
            wildcard: false,
            names: subscription::empty(),
            held: Resources::new(),
            held_hash: 0,
            synced: None,
            rejected: HashMap::new(),
            dirty: HashSet::new(),
            pending: VecDeque::new(),
            last_nonce: None,
            names_fingerprint: 0,
            acked: false,
        }
    }

    fn wants(&self, name: &str, r: Option<&Resource>) -> bool {
        self.names.contains(name) || (self.wildcard && r.is_none_or(|r| r.wildcard))
    }

    fn set_held(&mut self, name: Arc<str>, held: Option<Held>) -> Option<Held> {
        self.synced = None;
        let old = match held {
            Some(h) => {
                self.held_hash ^= entry_hash(&name, &h.version);
                self.held.insert(name.clone(), h)
            }
            None => self.held.remove(&name),
        };
        if let Some(o) = &old {
            self.held_hash ^= entry_hash(&name, &o.version);
        }
        old
    }

    fn sotw_version(&self) -> String {
        format!("{:016x}", self.held_hash)
    }

    /// Is `r` something to send: different from what the client holds (or to be sent again), and not a
    /// version it rejected?
    fn needs(&self, r: &Resource) -> bool {
        (self.dirty.contains(&r.name) || self.held.get(&r.name).is_none_or(|h| h.version != r.version))
            && self.rejected.get(&r.name).is_none_or(|v| *v != r.version)
    }

    /// Records that the client will hold `sent` (entries of `current`) and no longer `removed`; returns
    /// what each held before (to roll back on NACK). `current` is the scope's map at `generation`; `considered` the names the
    /// update looked at (None: all of them). When the client then holds exactly `current`, `held` becomes
    /// `current` itself: O(1), and shared with the snapshot instead of a copy per stream.
    fn record(
        &mut self,
        sent: &[Arc<Resource>],
        removed: &[Arc<str>],
        current: &Resources,
        considered: Option<&BTreeSet<Arc<str>>>,
        from: u64,
        generation: u64,
    ) -> Inflight {
        let mut inflight: Inflight = Vec::with_capacity(sent.len() + removed.len());
        inflight.extend(sent.iter().map(|r| (r.name.clone(), self.held.get(&r.name).cloned())));
        inflight.extend(removed.iter().map(|n| (n.clone(), self.held.get(n).cloned())));
        self.dirty.clear();
        // The first answer of a type: the client held nothing and gets all of `current` (the responders
        // take `sent` from `current`).
        if considered.is_none() && self.held.is_empty() && removed.is_empty() && sent.len() == current.len() {
            for r in sent {
                self.held_hash ^= entry_hash(&r.name, &r.version);
            }
            self.held = current.clone();
            self.synced = Some(generation);
            return inflight;
        }
        // An update of a client that held the map of generation `from`, considering every name changed
        // since: only those can differ, so checking them says whether it holds the new map.
        if let Some(c) = considered
            && self.synced == Some(from)
        {
            // (a push changes a few names: a map only when there are many)
            let by_name: Option<HashMap<&str, &str>> =
                (sent.len() > 8).then(|| sent.iter().map(|r| (&*r.name, &*r.version)).collect());
            let after = |n: &Arc<str>| -> Option<&str> {
                let found = match &by_name {
                    Some(m) => m.get(&**n).copied(),
                    None => sent.iter().find(|r| r.name == *n).map(|r| &*r.version),
                };
                if let Some(v) = found {
                    return Some(v);
                }
                if removed.contains(n) {
                    return None;
                }
                self.held.get(n).map(|r| &*r.version)
            };
            if c.iter().all(|n| after(n) == current.get(n).map(|r| &*r.version)) {
                for (name, prev) in &inflight {
                    if let Some(p) = prev {
                        self.held_hash ^= entry_hash(name, &p.version);
                    }
                }
                for r in sent {
                    self.held_hash ^= entry_hash(&r.name, &r.version);
                }
                self.held = current.clone();
                self.synced = Some(generation);
                return inflight;
            }
        }
        for r in sent {
            self.set_held(r.name.clone(), Some(r.clone()));
        }
        for n in removed {
            self.set_held(n.clone(), None);
        }
        if considered.is_none() {
            self.resync(current, generation);
        }
        inflight
    }

    /// Shares `current` as `held` if the client holds exactly what it has (O(n): after full evaluations
    /// and subscription changes only).
    fn resync(&mut self, current: &Resources, generation: u64) {
        if self.held.len() == current.len()
            && current.iter().all(|(n, r)| self.held.get(n).is_some_and(|h| h.version == r.version))
        {
            self.held = current.clone();
            self.synced = Some(generation);
        } else {
            tracing::trace!(held = self.held.len(), scope = current.len(), "client holds other than its scope");
            self.synced = None;
        }
    }

    /// An update that sent nothing: whether the client holds exactly `current` now (the considered
    /// names checked, or all of them).
    fn unchanged(&mut self, current: &Resources, considered: Option<&BTreeSet<Arc<str>>>, from: u64, generation: u64) {
        self.dirty.clear();
        let Some(c) = considered else { return self.resync(current, generation) };
        let same = |n: &Arc<str>| self.held.get(n).map(|r| &r.version) == current.get(n).map(|r| &r.version);
        if self.synced == Some(from) && c.iter().all(same) {
            self.held = current.clone();
            self.synced = Some(generation);
        } else {
            self.synced = None;
        }
    }

    /// Nothing of this type changed since generation `from`: a synced client holds its scope's new map.
    fn advance(&mut self, current: &Resources, from: u64, generation: u64) {
        if self.synced == Some(from) {
            self.held = current.clone();
            self.synced = Some(generation);
        }
    }
}

/// Outcome of processing, when the stream must end.
pub type StreamResult = Result<(), Status>;

pub struct Stream {
    flavor: Flavor,
    push: PushHandle,
    connections: Arc<Connections>,
    out: Outbox,
    proxy: Option<Proxy>,
    view: Option<View>,
    conn: Option<ConnectionGuard>,
    _attachment: Option<Attachment>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    snapshot: Arc<Snapshot>,
    types: [Option<TypeState>; 4],
    nonce: u64,
    /// the proxy's resolved network
    network: crate::model::NetworkId,
    /// the view keys (failoverPriority labels, DestinationRule namespaces and selectors) the view was
    /// built with
    label_keys: Arc<crate::translate::ViewKeys>,
    /// the connection (identity, limits) and the listener's drain signal
    context: StreamContext,
    warmth: Warmth,
    /// the generation the stream held before the push it is making
    pushed_from: u64,
}

/// What a stream knows of its connection and listener.
#[derive(Clone, Debug, Default)]
pub struct StreamContext {
    /// None outside a listener (in-process use)
    pub conn: Option<ConnInfo>,
    /// this stream's place under the connection's stream limit
    pub slot: Option<std::sync::Arc<super::server::StreamSlot>>,
    /// becomes true when the listener drains
    pub drain: Option<watch::Receiver<bool>>,
}

impl StreamContext {
    fn peer(&self) -> &PeerAuth {
        self.conn.as_ref().map(|c| &c.0.peer).unwrap_or(&PeerAuth::Anonymous)
    }

    /// With mTLS, a proxy may only ask for the config of its own namespace: the namespace of its node
    /// id must be the one of its certificate's SPIFFE identity.
    fn check_identity(&self, proxy: &Proxy) -> StreamResult {
        match self.peer() {
            PeerAuth::Anonymous => Ok(()),
            PeerAuth::Unusable(reason) => Err(Status::permission_denied(format!("meshfed: {reason}"))),
            PeerAuth::Workload(id) if id.namespace == *proxy.namespace => Ok(()),
            PeerAuth::Workload(id) => Err(Status::permission_denied(format!(
                "meshfed: identity {id} may not ask for the config of namespace {:?} (node id {})",
                &*proxy.namespace, proxy.id
            ))),
        }
    }

    /// With a workload identity outside the system namespace, the istioctl debug types only show the
    /// proxies of the identity's namespace.
    fn debug_scope(&self) -> Option<&str> {
        match self.peer() {
            PeerAuth::Workload(id) if id.namespace != crate::registry::SYSTEM_NAMESPACE => Some(&id.namespace),
            _ => None,
        }
    }

    /// Takes a request token from the connection's rate limit.
    fn admit_request(&self) -> StreamResult {
        match &self.conn {
            Some(c) => c.0.take_request_token(),
            None => Ok(()),
        }
    }
}

/// The namespace of a proxy named `POD.NS` or by its full node id.
fn proxy_namespace(name: &str) -> Option<String> {
    if name.contains('~') {
        crate::bootstrap::parse_node_id(name).ok().map(|p| p.namespace)
    } else {
        name.rsplit_once('.').map(|(_, ns)| ns.to_string())
    }
}

/// How a stream whose requests fail to arrive ends: a request over the size limit is refused with
/// RESOURCE_EXHAUSTED, a compressed one with INTERNAL (compression was not negotiated); anything else is
/// the client going away.
fn request_error(e: grpc::RecvError) -> StreamResult {
    match e {
        grpc::RecvError::TooLarge { .. } => {
            warn!(error = %e, "request over the message size limit");
            crate::metrics::global().record_refusal(crate::metrics::Refusal::MessageSize);
            Err(Status::resource_exhausted(format!("meshfed: {e}")))
        }
        grpc::RecvError::Compressed => Err(Status::internal(format!("meshfed: {e}"))),
        _ => {
            debug!(error = %e, "stream ended by the client");
            Ok(())
        }
    }
}

/// Where a stream's responses go: the gRPC stream, or (in-process drivers such as the fuzz targets) a
/// channel.
#[derive(Debug)]
pub enum Outbox {
    Grpc(grpc::Responses),
    Channel(mpsc::Sender<Result<Response, Status>>),
}

impl Outbox {
    async fn send(&mut self, response: Response) -> StreamResult {
        let gone = || Status::cancelled("client went away");
        match self {
            Outbox::Grpc(r) => {
                let mut chunks = std::collections::VecDeque::new();
                response.grpc_chunks(&mut chunks);
                r.send(chunks).await.map_err(|_| gone())
            }
            Outbox::Channel(tx) => tx.send(Ok(response)).await.map_err(|_| gone()),
        }
    }

    /// Ends the stream with `status`.
    async fn finish(&mut self, status: Status) {
        match self {
            Outbox::Grpc(r) => r.finish(status.code() as i32, status.message()),
            Outbox::Channel(tx) => {
                if status.code() != tonic::Code::Ok {
                    let _ = tx.send(Err(status)).await;
                }
            }
        }
    }
}

/// Resolves when a warming stream's deadline passes (never for another stream).
async fn warm_deadline(warmth: &Warmth) {
    match warmth {
        Warmth::Warming { deadline, .. } => tokio::time::sleep_until(*deadline).await,
        _ => std::future::pending().await,
    }
}

/// Resolves when the listener drains (never without a drain signal).
async fn drained(drain: &mut Option<watch::Receiver<bool>>) {
    match drain {
        Some(rx) => {
            let _ = rx.wait_for(|d| *d).await;
        }
        None => std::future::pending().await,
    }
}

impl Stream {
    pub fn new(flavor: Flavor, push: PushHandle, connections: Arc<Connections>, out: Outbox) -> Stream {
        let snapshots = push.subscribe();
        let snapshot = snapshots.borrow().clone();
        Stream {
            flavor,
            push,
            connections,
            out,
            proxy: None,
            view: None,
            conn: None,
            _attachment: None,
            snapshots,
            snapshot,
            types: Default::default(),
            nonce: 0,
            network: Default::default(),
            label_keys: Default::default(),
            context: StreamContext::default(),
            warmth: Warmth::Cold,
            pushed_from: 0,
        }
    }

    /// Sets the connection and listener the stream runs on.
    pub fn with_context(mut self, context: StreamContext) -> Stream {
        self.context = context;
        self
    }

    fn conn(&self) -> Option<&Arc<Connection>> {
        self.conn.as_ref().map(|g| &g.conn)
    }

    fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        self.nonce.to_string()
    }

    /// Identifies the proxy from the first request's node and attaches its view.
    async fn init(&mut self, node: Option<&envoy_types::pb::envoy::config::core::v3::Node>) -> StreamResult {
        if self.proxy.is_some() {
            return Ok(());
        }
        let proxy = Proxy::from_node(node).map_err(|e| {
            warn!(error = %e, "refusing xDS stream");
            Status::invalid_argument(e.to_string())
        })?;
        self.context.check_identity(&proxy).inspect_err(|status| {
            warn!(proxy = %proxy.id, reason = status.message(), "refusing xDS stream: identity");
        })?;
        // The proxy's network: node metadata NETWORK, else its cluster's network.
        let network = if proxy.network.is_empty() {
            let snap = self.push.snapshot();
            proxy
                .cluster_id
                .as_ref()
                .and_then(|c| snap.clusters_summary.iter().find(|s| &s.id == c))
                .map(|s| s.network.clone())
                .unwrap_or_default()
        } else {
            proxy.network.clone()
        };
        let label_keys = self.push.snapshot().view_keys.clone();
        let view = View::with_network(&proxy, network.clone(), &label_keys);
        self.network = network;
        self.label_keys = label_keys;
        let (attachment, attached) =
            self.push.attach(view.clone()).await.ok_or_else(|| Status::unavailable("server shutting down"))?;
        info!(proxy = %proxy.id, flavor = self.flavor.as_str(), client = ?proxy.client, "proxy connected");
        self.conn = Some(self.connections.register(proxy.clone(), self.flavor, view.clone()));
        self.proxy = Some(proxy);
        self.view = Some(view);
        self._attachment = Some(attachment);
        self.take_snapshot(attached);
        Ok(())
    }

    /// Takes the snapshot an attach returned, or the published one if that is newer (it was built after
    /// the attach, so it holds this stream's scopes too).
    fn take_snapshot(&mut self, attached: Arc<Snapshot>) {
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
    async fn handle_raw(&mut self, raw: bytes::Bytes) -> StreamResult {
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

    async fn handle_sotw_request(&mut self, req: SotwRequest) -> StreamResult {
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

    async fn finish(mut self, result: StreamResult) {
        if let Some(p) = &self.proxy {
            info!(proxy = %p.id, flavor = self.flavor.as_str(), "proxy disconnected");
        }
        let status = result.err().unwrap_or_else(|| Status::ok(""));
        self.out.finish(status).await;
    }

    async fn send(&mut self, t: ResourceType, response: Response, nonce: &str, version: &str) -> StreamResult {
        if let Warmth::Cold = self.warmth {
            // the first configuration waits its turn (see WARMING_STREAMS)
            if let Ok(permit) = WARMING.clone().acquire_owned().await {
                self.warmth = Warmth::Warming { _permit: permit, deadline: tokio::time::Instant::now() + WARM_TIMEOUT };
            }
        }
        let bytes = response.encoded_len() as u64;
        let count = match &response {
            Response::Sotw(r) => r.resources.len(),
            Response::Delta(r) => r.resources.len(),
            Response::Raw(_) => 0,
        };
        let held = self.types[t.index()].as_ref().map(|s| s.held.len()).unwrap_or(0);
        crate::metrics::global().record_response(t, count, bytes);
        if let Some(c) = self.conn() {
            // a change seen after the proxy connected: its ACK ends a convergence (metrics)
            let seen = self.snapshot.changes.seen.filter(|seen| *seen >= c.connected);
            c.update(t, |s| {
                s.sent_change_seen = seen;
                s.sent_nonce = nonce.to_string();
                s.sent_version = version.to_string();
                s.sent_at = Some(SystemTime::now());
                s.responses_sent += 1;
                s.bytes_sent += bytes;
                s.resources = held;
            });
        }
        debug!(type_url = t.short(), nonce, count, bytes, "sending");
        self.out.send(response).await
    }

    fn record_ack(&mut self, t: ResourceType, nonce: &str) {
        if let Some(ts) = self.types[t.index()].as_mut() {
            ts.acked = true;
        }
        if matches!(self.warmth, Warmth::Warming { .. }) && self.types.iter().flatten().all(|ts| ts.acked) {
            self.warmth = Warmth::Warm;
        }
        if let Some(c) = self.conn() {
            c.update(t, |s| {
                crate::metrics::global().record_ack(s, nonce);
                s.acked_nonce = nonce.to_string();
                s.last_error = None;
            });
        }
    }

    fn record_nack(&self, t: ResourceType, nonce: &str, message: &str) {
        if let Some(p) = &self.proxy {
            warn!(proxy = %p.id, type_url = t.short(), nonce, error = message, "NACK");
        }
        crate::metrics::global().record_nack(t);
        if let Some(c) = self.conn() {
            c.update(t, |s| {
                s.last_error = Some(message.to_string());
                s.nacks += 1;
            });
        }
    }

    fn update_subscription_status(&self, t: ResourceType) {
        if let (Some(c), Some(ts)) = (self.conn(), &self.types[t.index()]) {
            c.update(t, |s| {
                s.subscribed = true;
                s.wildcard = ts.wildcard;
                s.subscribed_names = ts.names.len();
                s.names = ts.names.clone();
            });
        }
    }

    /// The answer to an istioctl debug type, limited to the proxies the client may see
    /// ([`StreamContext::debug_scope`]).
    fn debug_resources(
        &self,
        type_url: &str,
        names: &[String],
    ) -> Vec<(String, envoy_types::pb::google::protobuf::Any)> {
        let scope = self.context.debug_scope();
        let allowed = |name: &str| scope.is_none_or(|ns| proxy_namespace(name).as_deref() == Some(ns));
        let names: Vec<String> = names.iter().filter(|n| allowed(n)).cloned().collect();
        let mut out = crate::config_dump::ads_debug_resources(type_url, &names, &self.connections, &self.push);
        if type_url == crate::config_dump::TYPE_DEBUG_SYNCZ {
            out.retain(|(name, _)| allowed(name));
        }
        out
    }

    fn current(&self, t: ResourceType) -> Resources {
        self.view.as_ref().and_then(|v| self.snapshot.resources(v, t)).unwrap_or_default()
    }

    // ---------------- SotW ----------------

    async fn on_sotw_request(&mut self, request: SotwRequest) -> StreamResult {
        let req = &request.head;
        self.init(req.node.as_ref()).await?;
        let Some(t) = ResourceType::from_type_url(&req.type_url) else {
            // Unknown types get an empty response, so the client is not left waiting. Only the initial
            // request is answered: a request carrying a nonce ACKs (or NACKs) such a response, and
            // answering it would start an endless ACK / response exchange.
            if !req.response_nonce.is_empty() {
                return Ok(());
            }
            debug!(type_url = %req.type_url, "unknown type URL");
            let nonce = self.next_nonce();
            // istioctl-style debug types (istio.io/debug/syncz, istio.io/debug/config_dump) get their
            // answer; any other unknown type an empty one.
            let names = request.names().map_err(|e| Status::invalid_argument(format!("malformed xDS request: {e}")))?;
            let resources = self.debug_resources(&req.type_url, &names).into_iter().map(|(_, any)| any).collect();
            let raw = envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse {
                type_url: req.type_url.clone(),
                nonce,
                resources,
                ..Default::default()
            };
            let bytes = prost::Message::encode_to_vec(&raw);
            return self.out.send(Response::Raw(bytes.into())).await;
        };
        let first = self.types[t.index()].is_none();
        let ts = self.types[t.index()].get_or_insert_with(TypeState::new);
        // A nonce on the first request of a type is from an earlier stream (a reconnect): the request is
        // an initial one. Otherwise only a request answering the latest response counts; every request
        // after that response carries its nonce, also after its ACK.
        if !first && !req.response_nonce.is_empty() {
            // The answer to a response still in flight: an ACK or NACK of an older response arrives after
            // a newer one was sent when a push races the client. The client applied (or rejected) that
            // response, and every older one before it; a rejection is recorded even then.
            if let Some(i) = ts.pending.iter().position(|(n, _)| *n == req.response_nonce) {
                let (nonce, inflight) = ts.pending.remove(i).expect("found");
                ts.pending.drain(..i);
                match &req.error_detail {
                    Some(err) => {
                        let inflight = hand_over_superseded(ts, 0, inflight);
                        rollback(ts, inflight);
                        let msg = err.message.clone();
                        self.record_nack(t, &nonce, &msg);
                    }
                    None => self.record_ack(t, &nonce),
                }
            }
            // Only a request answering the latest response can change the subscription.
            let ts = self.types[t.index()].as_mut().expect("inserted");
            if ts.last_nonce.as_deref() != Some(req.response_nonce.as_str()) {
                debug!(type_url = t.short(), nonce = %req.response_nonce, "stale nonce: subscription ignored");
                return Ok(());
            }
        }
        let ts = self.types[t.index()].as_mut().expect("inserted");
        // Subscription: the first request's empty list (or "*") means wildcard; afterwards an empty
        // list unsubscribes everything named, unless the stream is wildcard.
        let star = request.has_star;
        let no_names = request.name_count == 0;
        let wildcard = if first { no_names || star } else { star || (ts.wildcard && no_names) };
        // Most requests repeat the subscription (every SotW ACK lists all names again): the decoder
        // fingerprinted the names without decoding them; they become strings only when it differs.
        let fingerprint = request.names_fingerprint;
        if !first && wildcard == ts.wildcard && fingerprint == ts.names_fingerprint {
            return Ok(());
        }
        let requested = request.names().map_err(|e| Status::invalid_argument(format!("malformed xDS request: {e}")))?;
        // names the snapshot has share its strings (one copy per server, not per stream)
        let current = self.current(t);
        let names: subscription::Names = requested
            .iter()
            .filter(|n| *n != "*")
            .map(|n| current.get_key_value(n.as_str()).map(|(k, _)| k.clone()).unwrap_or_else(|| Arc::from(n.as_str())))
            .collect();
        let names = subscription::intern(names);
        let ts = self.types[t.index()].as_mut().expect("inserted");
        ts.names_fingerprint = fingerprint;
        let changed = first || wildcard != ts.wildcard || !Arc::ptr_eq(&names, &ts.names);
        if !changed {
            return Ok(());
        }
        ts.wildcard = wildcard;
        ts.names = names;
        // Forget what is no longer subscribed.
        let dropped: Vec<Arc<str>> =
            ts.held.keys().filter(|n| !ts.wants(n, current.get(*n).map(|r| &**r))).cloned().collect();
        for n in dropped {
            ts.set_held(n, None);
        }
        self.update_subscription_status(t);
        self.sotw_respond(t, None, true).await
    }

    /// Sends what type `t`'s subscription needs from the current snapshot. `candidates` limits the
    /// names considered (None: all); `requested` is true when answering a request (full state).
    async fn sotw_respond(
        &mut self,
        t: ResourceType,
        candidates: Option<&BTreeSet<Arc<str>>>,
        requested: bool,
    ) -> StreamResult {
        let current = self.current(t);
        let (from, generation) = (self.pushed_from, self.snapshot.generation);
        let Some(ts) = self.types[t.index()].as_mut() else { return Ok(()) };
        let full_state = t.sotw_full_state();
        let mut changed = requested;
        let mut to_send: Vec<Arc<Resource>> = Vec::new();
        if full_state {
            // Has anything this subscription covers changed?
            if !changed {
                let check = |n: &Arc<str>| {
                    let r = current.get(n);
                    let wanted = ts.wants(n, r.map(|r| &**r));
                    match (r, ts.held.get(n)) {
                        (Some(r), _) if wanted => ts.needs(r),
                        (None, Some(_)) => true,
                        (Some(_), Some(_)) => true, // no longer wanted
                        _ => false,
                    }
                };
                changed = match candidates {
                    Some(c) => c.iter().any(check),
                    None => current.keys().any(check) || ts.held.keys().any(|n| !current.contains_key(n)),
                };
            }
            if !changed {
                ts.unchanged(&current, candidates, from, generation);
                return Ok(());
            }
            for (name, r) in current.iter() {
                if !ts.wants(name, Some(r)) {
                    continue;
                }
                // The complete state must include everything wanted, a rejected resource too: its
                // rejection alone never triggers a response, but omitting it would delete it.
                to_send.push(r.clone());
            }
        } else {
            let mut consider = |r: &Arc<Resource>| {
                if ts.wants(&r.name, Some(r))
                    && (requested || ts.needs(r))
                    && ts.rejected.get(&r.name).is_none_or(|v| *v != r.version)
                {
                    to_send.push(r.clone());
                }
            };
            match candidates {
                Some(c) => c.iter().filter_map(|n| current.get(n)).for_each(&mut consider),
                None => current.values().for_each(&mut consider),
            }
            if to_send.is_empty() {
                ts.unchanged(&current, candidates, from, generation);
                return Ok(());
            }
        }
        // Record what the client will hold.
        let removed: Vec<Arc<str>> = if full_state {
            let sent: HashSet<&Arc<str>> = to_send.iter().map(|r| &r.name).collect();
            ts.held.keys().filter(|n| !sent.contains(n)).cloned().collect()
        } else {
            Vec::new()
        };
        let changed_names: Vec<Arc<str>> = to_send
            .iter()
            .filter(|r| ts.held.get(&r.name).is_none_or(|p| p.version != r.version))
            .map(|r| r.name.clone())
            .collect();
        let inflight = ts.record(&to_send, &removed, &current, candidates, from, generation);
        let version = ts.sotw_version();
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let ts = self.types[t.index()].as_mut().expect("present");
        ts.pending.push_back((nonce.clone(), inflight));
        while ts.pending.len() > MAX_PENDING_SOTW {
            ts.pending.pop_front();
        }
        ts.last_nonce = Some(nonce.clone());
        if t == ResourceType::Cluster {
            self.mark_endpoints_dirty(&changed_names);
        }
        let response = Response::Sotw(SotwResponse {
            version_info: version.clone(),
            type_url: t.type_url(),
            nonce: nonce.clone(),
            resources: to_send,
        });
        self.send(t, response, &nonce, &version).await
    }

    /// After a cluster changes, Envoy re-initialises it and waits for its endpoints: make sure they are
    /// sent again (as istiod does by pushing EDS with CDS).
    fn mark_endpoints_dirty(&mut self, clusters: &[Arc<str>]) {
        if let Some(eds) = self.types[ResourceType::Endpoint.index()].as_mut() {
            for c in clusters {
                if eds.held.contains_key(c) {
                    eds.dirty.insert(c.clone());
                }
            }
        }
    }

    // ---------------- Delta ----------------

    async fn on_delta_request(&mut self, req: DeltaDiscoveryRequest) -> StreamResult {
        self.init(req.node.as_ref()).await?;
        let Some(t) = ResourceType::from_type_url(&req.type_url) else {
            // istioctl-style debug types are answered (once per request that is not an ACK)
            if req.response_nonce.is_empty() && crate::config_dump::is_ads_debug_type(&req.type_url) {
                let resources = self.debug_resources(&req.type_url, &req.resource_names_subscribe);
                let raw = envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse {
                    type_url: req.type_url.clone(),
                    nonce: self.next_nonce(),
                    resources: resources
                        .into_iter()
                        .map(|(name, any)| envoy_types::pb::envoy::service::discovery::v3::Resource {
                            name,
                            resource: Some(any),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                };
                let bytes = prost::Message::encode_to_vec(&raw);
                return self.out.send(Response::Raw(bytes.into())).await;
            }
            debug!(type_url = %req.type_url, "unknown type URL ignored (delta)");
            return Ok(());
        };
        let first = self.types[t.index()].is_none();
        let ts = self.types[t.index()].get_or_insert_with(TypeState::new);
        if !req.response_nonce.is_empty() {
            match ts.pending.iter().position(|(n, _)| *n == req.response_nonce) {
                None => debug!(type_url = t.short(), nonce = %req.response_nonce, "unknown or stale nonce ignored"),
                Some(i) => {
                    let (nonce, inflight) = ts.pending.remove(i).expect("found");
                    match &req.error_detail {
                        Some(err) => {
                            let inflight = hand_over_superseded(ts, i, inflight);
                            rollback(ts, inflight);
                            let msg = err.message.clone();
                            self.record_nack(t, &nonce, &msg);
                        }
                        None => self.record_ack(t, &nonce),
                    }
                }
            }
        }
        let ts = self.types[t.index()].as_mut().expect("inserted");
        let mut newly: BTreeSet<Arc<str>> = BTreeSet::new();
        let mut sub_changed = first;
        if first {
            // An empty first subscribe list (or "*") is a wildcard subscription.
            if req.resource_names_subscribe.is_empty() {
                ts.wildcard = true;
            }
            for (name, version) in &req.initial_resource_versions {
                ts.set_held(Arc::from(name.as_str()), Some(Resource::reported(name, version)));
            }
        }
        if !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty() {
            sub_changed = true;
            let mut names = ts.names.to_set();
            for n in &req.resource_names_subscribe {
                if n == "*" {
                    ts.wildcard = true;
                } else if !names.contains(n.as_str()) {
                    let n: Arc<str> = Arc::from(n.as_str());
                    names.insert(n.clone());
                    newly.insert(n);
                }
            }
            for n in &req.resource_names_unsubscribe {
                if n == "*" {
                    ts.wildcard = false;
                } else {
                    names.remove(n.as_str());
                }
            }
            ts.names = subscription::intern(names);
        }
        if !sub_changed {
            return Ok(());
        }
        // Forget what is no longer subscribed (the client drops it on unsubscribe).
        let current = self.current(t);
        let ts = self.types[t.index()].as_mut().expect("inserted");
        let dropped: Vec<Arc<str>> = ts
            .held
            .keys()
            .filter(|n| {
                !ts.wants(n, current.get(*n).map(|r| &**r)) && !req.initial_resource_versions.contains_key(&***n)
            })
            .cloned()
            .collect();
        for n in dropped {
            ts.set_held(n, None);
        }
        self.update_subscription_status(t);
        let result = if first {
            self.delta_respond(t, None, true).await
        } else if !newly.is_empty() {
            self.delta_respond(t, Some(&newly), true).await
        } else {
            Ok(())
        };
        // the subscription changed: does the client now hold exactly its scope's resources?
        let generation = self.snapshot.generation;
        if let Some(ts) = self.types[t.index()].as_mut()
            && ts.synced != Some(generation)
        {
            ts.resync(&current, generation);
        }
        result
    }

    async fn delta_respond(
        &mut self,
        t: ResourceType,
        candidates: Option<&BTreeSet<Arc<str>>>,
        requested: bool,
    ) -> StreamResult {
        let current = self.current(t);
        let (from, generation) = (self.pushed_from, self.snapshot.generation);
        let Some(ts) = self.types[t.index()].as_mut() else { return Ok(()) };
        let mut to_send: Vec<Arc<Resource>> = Vec::new();
        let mut removed: Vec<Arc<str>> = Vec::new();
        let mut consider = |name: &Arc<str>, ts: &TypeState| match current.get(name) {
            Some(r) if ts.wants(name, Some(r)) => {
                if ts.needs(r) {
                    to_send.push(r.clone());
                }
            }
            _ => {
                if ts.held.contains_key(name) {
                    removed.push(name.clone());
                }
            }
        };
        match candidates {
            Some(c) => c.iter().for_each(|n| consider(n, ts)),
            None => {
                current.keys().for_each(|n| consider(n, ts));
                ts.held.keys().filter(|n| !current.contains_key(*n)).for_each(|n| consider(n, ts));
            }
        }
        // An empty answer is sent only to a stream's first request, so that its initial fetch completes.
        if to_send.is_empty() && removed.is_empty() && !(requested && candidates.is_none()) {
            ts.unchanged(&current, candidates, from, generation);
            return Ok(());
        }
        let changed_names: Vec<Arc<str>> = to_send.iter().map(|r| r.name.clone()).collect();
        let inflight = ts.record(&to_send, &removed, &current, candidates, from, generation);
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let ts = self.types[t.index()].as_mut().expect("present");
        ts.pending.push_back((nonce.clone(), inflight));
        while ts.pending.len() > MAX_PENDING {
            ts.pending.pop_front();
        }
        if t == ResourceType::Cluster {
            self.mark_endpoints_dirty(&changed_names);
        }
        let response = Response::Delta(DeltaResponse {
            system_version_info: String::new(),
            type_url: t.type_url(),
            nonce: nonce.clone(),
            resources: to_send,
            removed_resources: removed,
        });
        self.send(t, response, &nonce, "").await
    }

    // ---------------- pushes ----------------

    async fn on_snapshot(&mut self) -> StreamResult {
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
        if *next.view_keys != *self.label_keys
            && let Some(proxy) = &self.proxy
        {
            let view = View::with_network(proxy, self.network.clone(), &next.view_keys);
            self.label_keys = next.view_keys.clone();
            if self.view.as_ref() != Some(&view) {
                let (attachment, attached) =
                    self.push.attach(view.clone()).await.ok_or_else(|| Status::unavailable("server shutting down"))?;
                self._attachment = Some(attachment);
                if let Some(c) = self.conn() {
                    c.set_view(view.clone());
                }
                self.view = Some(view);
                self.take_snapshot(attached);
                return self.push_all(None, from).await;
            }
        }
        self.snapshot = next;
        self.push_all(changes, from).await
    }

    /// Sends what the current snapshot changed (`contiguous`: it follows the previous one, so its change
    /// list is complete) or, otherwise, whatever differs from what the client holds.
    async fn push_all(&mut self, changes: Option<Vec<Arc<crate::cache::Changes>>>, from: u64) -> StreamResult {
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
            match self.flavor {
                Flavor::Sotw => self.sotw_respond(t, candidates.as_deref(), false).await?,
                Flavor::Delta => self.delta_respond(t, candidates.as_deref(), false).await?,
            }
        }
        Ok(())
    }
}

/// Of a NACKed response (`inflight`, formerly at `pending[i]`), the names that a newer response
/// still in flight carries again. The client's state for those follows the newer response, so they
/// must not be rolled back (that would overwrite what the newer response recorded); instead the newer
/// response takes over what the client kept, in case it is NACKed too. Returns the other names.
fn hand_over_superseded(ts: &mut TypeState, i: usize, inflight: Inflight) -> Inflight {
    let mut own = Inflight::new();
    for (name, prev) in inflight {
        let newer = ts.pending.iter_mut().skip(i).find_map(|(_, f)| f.iter_mut().find(|(n, _)| *n == name));
        match newer {
            Some((_, newer_prev)) => {
                // The newer response's predecessor is what the NACKed one sent: the rejected version.
                if let Some(sent) = newer_prev.as_ref()
                    && prev.as_ref().is_none_or(|p| p.version != sent.version)
                {
                    ts.rejected.insert(name.clone(), sent.version.clone());
                }
                *newer_prev = prev;
            }
            None => own.push((name, prev)),
        }
    }
    own
}

/// Undoes a NACKed response: the client kept what it had; the versions it rejected are remembered.
fn rollback(ts: &mut TypeState, inflight: Inflight) {
    for (name, prev) in inflight.into_iter().rev() {
        if let Some(sent) = ts.held.get(&name).cloned()
            && prev.as_ref().is_none_or(|p| p.version != sent.version)
        {
            ts.rejected.insert(name.clone(), sent.version.clone());
        }
        ts.set_held(name, prev);
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;

    use super::*;
    use crate::translate::Named;

    fn cla(name: &str, n: usize) -> Arc<Resource> {
        let c = ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![Default::default(); n],
            ..Default::default()
        };
        Resource::encode(Named::new(name, c))
    }

    fn scope(entries: &[Arc<Resource>]) -> Resources {
        entries.iter().map(|r| (r.name.clone(), r.clone())).collect()
    }

    fn subscribed(names: &[&str]) -> TypeState {
        let mut ts = TypeState::new();
        ts.names = subscription::intern(names.iter().map(|n| Arc::from(*n)).collect());
        ts
    }

    fn hash_of(held: &Resources) -> u64 {
        held.iter().fold(0, |h, (n, r)| h ^ entry_hash(n, &r.version))
    }

    fn set(names: &[&str]) -> BTreeSet<Arc<str>> {
        names.iter().map(|n| Arc::from(*n)).collect()
    }

    #[test]
    fn a_client_holding_its_scope_shares_the_snapshot_map() {
        let (a, b, c) = (cla("a", 1), cla("b", 1), cla("c", 1));
        let g1 = scope(&[a.clone(), b.clone(), c.clone()]);
        let mut ts = subscribed(&["a", "b", "c"]);
        // the initial full answer
        let inflight = ts.record(&[a.clone(), b.clone(), c.clone()], &[], &g1, None, 0, 1);
        assert_eq!(inflight.len(), 3);
        assert_eq!(ts.synced, Some(1));
        assert!(ts.held.ptr_eq(&g1), "held is the snapshot's map itself");
        assert_eq!(ts.held_hash, hash_of(&g1));
        // one assignment changes in the next snapshot: sent, and still shared
        let b2 = cla("b", 2);
        let mut g2 = g1.clone();
        g2.insert(b2.name.clone(), b2.clone());
        let inflight = ts.record(std::slice::from_ref(&b2), &[], &g2, Some(&set(&["b"])), 1, 2);
        assert_eq!(inflight[0].1.as_ref().map(|r| r.version.clone()), Some(b.version.clone()));
        assert_eq!(ts.synced, Some(2));
        assert!(ts.held.ptr_eq(&g2));
        assert_eq!(ts.held_hash, hash_of(&g2));
        // a removal
        let mut g3 = g2.clone();
        g3.remove("c");
        ts.record(&[], &["c".into()], &g3, Some(&set(&["c"])), 2, 3);
        assert!(ts.held.ptr_eq(&g3));
        assert_eq!(ts.held_hash, hash_of(&g3));
        // a snapshot that changes nothing of the type
        let g4 = g3.clone();
        ts.advance(&g4, 3, 4);
        assert_eq!(ts.synced, Some(4));
    }

    #[test]
    fn a_client_holding_something_else_keeps_its_own_state() {
        let (a, b) = (cla("a", 1), cla("b", 1));
        let g1 = scope(&[a.clone(), b.clone()]);
        // subscribed to `a` only: it never holds the whole scope
        let mut ts = subscribed(&["a"]);
        ts.record(std::slice::from_ref(&a), &[], &g1, None, 0, 1);
        assert_eq!(ts.synced, None);
        assert_eq!(ts.held.len(), 1);
        // a rejected version is not held: not synced, and the held version stays the old one
        let mut ts = subscribed(&["a", "b"]);
        ts.record(&[a.clone(), b.clone()], &[], &g1, None, 0, 1);
        assert_eq!(ts.synced, Some(1));
        let a2 = cla("a", 2);
        let mut g2 = g1.clone();
        g2.insert(a2.name.clone(), a2.clone());
        ts.rejected.insert(a2.name.clone(), a2.version.clone());
        ts.unchanged(&g2, Some(&set(&["a"])), 1, 2);
        assert_eq!(ts.synced, None);
        assert_eq!(ts.held.get("a").unwrap().version, a.version);
        assert_eq!(ts.held_hash, hash_of(&ts.held));
        // an update that skipped a generation cannot be trusted to be complete
        let mut ts = subscribed(&["a", "b"]);
        ts.record(&[a.clone(), b.clone()], &[], &g1, None, 0, 1);
        ts.record(std::slice::from_ref(&a2), &[], &g2, Some(&set(&["a"])), 4, 5);
        assert_eq!(ts.synced, None);
        assert_eq!(ts.held.get("a").unwrap().version, a2.version);
        // a full evaluation finds it in sync again
        ts.resync(&g2, 5);
        assert!(ts.held.ptr_eq(&g2));
    }

    #[test]
    fn a_nack_rolls_back_out_of_sync_and_reported_versions_resync() {
        let (a, b) = (cla("a", 1), cla("b", 1));
        let g1 = scope(&[a.clone(), b.clone()]);
        let mut ts = subscribed(&["a", "b"]);
        ts.record(&[a.clone(), b.clone()], &[], &g1, None, 0, 1);
        let a2 = cla("a", 2);
        let mut g2 = g1.clone();
        g2.insert(a2.name.clone(), a2.clone());
        let inflight = ts.record(std::slice::from_ref(&a2), &[], &g2, Some(&set(&["a"])), 1, 2);
        assert!(ts.held.ptr_eq(&g2));
        rollback(&mut ts, inflight);
        assert_eq!(ts.synced, None);
        assert_eq!(ts.held.get("a").unwrap().version, a.version);
        assert_eq!(ts.rejected.get("a"), Some(&a2.version));
        assert_eq!(ts.held_hash, hash_of(&ts.held));
        // a Delta client reporting exactly the scope's versions is in sync without being sent anything
        let mut ts = subscribed(&["a", "b"]);
        ts.set_held("a".into(), Some(Resource::reported("a", &a.version)));
        ts.set_held("b".into(), Some(Resource::reported("b", &b.version)));
        ts.unchanged(&g1, None, 0, 1);
        assert_eq!(ts.synced, Some(1));
        assert!(ts.held.ptr_eq(&g1));
    }
}
