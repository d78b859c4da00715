//! The push loop: applies source events to the registry, debounces, translates what changed for every
//! attached scope, and publishes the next [`Snapshot`]. One task owns the registry, so only one push
//! runs at a time and nothing on the xDS path takes a lock.

pub mod log;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::cache::{self, Changes, Resource, Resources, Snapshot};
use crate::mesh_config::{Debounce, MeshConfig};
use crate::model::ServiceKey;
use crate::registry::{ChangeKind, Registry, RegistryChange};
use crate::source::SourceEvent;
use crate::translate::{self, ClusterScope, Context, EndpointScope, InboundScope, ListenerScope, RouteScope, View};
use crate::type_url::ResourceType;

/// Requests from xDS streams to the push loop.
#[derive(Debug)]
pub enum Command {
    /// A proxy with this view connected: make sure its scopes are translated. Replies with a snapshot
    /// of the current generation that holds them.
    Attach { view: View, reply: oneshot::Sender<Arc<Snapshot>> },
    /// A proxy with this view disconnected.
    Detach { view: View },
    /// The gateway resolver's latest answers for gateway hostnames.
    ResolvedGateways(std::collections::BTreeMap<String, Vec<std::net::IpAddr>>),
    /// The gateway probes' new verdict ([`crate::liveness`]).
    GatewayVerdict(crate::liveness::Verdict),
    /// A new (validated) traffic policy ([`crate::traffic`]).
    TrafficPolicy(crate::traffic::TrafficPolicy),
    /// New mesh-wide settings from a reloaded mesh config ([`crate::config_watch`]).
    Settings(LiveSettings),
}

/// The mesh config's settings besides `traffic` that change while meshfed runs (everything is translated
/// again when they change).
#[derive(Clone, Debug, PartialEq)]
pub struct LiveSettings {
    pub defaults: crate::policy::MeshDefaults,
    pub send_unhealthy_endpoints: bool,
}

/// A handle to the push loop for xDS streams and the debug surface.
#[derive(Clone, Debug)]
pub struct PushHandle {
    commands: mpsc::UnboundedSender<Command>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// the published snapshot plus the scopes attached since (never awaited: attaching wakes no stream)
    latest: watch::Receiver<Arc<Snapshot>>,
    warnings: watch::Receiver<Arc<Vec<translate::diagnostics::Warning>>>,
    ready: Arc<AtomicBool>,
    push_log: log::PushLog,
}

impl PushHandle {
    /// The most recent pushes (for the debug surface).
    pub fn push_log(&self) -> &log::PushLog {
        &self.push_log
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }

    /// The newest snapshot, with every attached proxy's scopes (the debug surface's view).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.latest.borrow().clone()
    }

    /// Hands the gateway resolver's answers to the push loop (it re-pushes EDS if they changed).
    pub fn set_resolved_gateways(&self, resolved: std::collections::BTreeMap<String, Vec<std::net::IpAddr>>) {
        let _ = self.commands.send(Command::ResolvedGateways(resolved));
    }

    /// Hands the gateway probes' verdict to the push loop (it re-pushes the EDS of the services with
    /// endpoints in the networks whose verdict changed, at once).
    pub fn set_gateway_verdict(&self, verdict: crate::liveness::Verdict) {
        let _ = self.commands.send(Command::GatewayVerdict(verdict));
    }

    /// Hands a new, validated traffic policy to the push loop (the mesh config's `traffic:`); it decides
    /// again and pushes what changed. A policy that does not validate never gets here: the last good one
    /// keeps serving.
    pub fn set_traffic_policy(&self, policy: crate::traffic::TrafficPolicy) {
        let _ = self.commands.send(Command::TrafficPolicy(policy));
    }

    /// Hands new mesh-wide settings (`defaults`, `sendUnhealthyEndpoints`) to the push loop; it
    /// translates everything again if they changed.
    pub fn set_live_settings(&self, settings: LiveSettings) {
        let _ = self.commands.send(Command::Settings(settings));
    }

    /// The mesh-wide configuration warnings ([`translate::diagnostics`]), as of the last push (at most
    /// [`WARNINGS_DELAY`] later for endpoint-only changes).
    pub fn warnings(&self) -> Arc<Vec<translate::diagnostics::Warning>> {
        self.warnings.borrow().clone()
    }

    /// True once the first full state from every source has been translated and published.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Attaches a view: its scopes are translated if no other proxy has them. Returns a guard that
    /// detaches the view when dropped, and a snapshot of the current generation holding its scopes.
    /// Other streams are not woken: an attach changes nothing they hold.
    pub async fn attach(&self, view: View) -> Option<(Attachment, Arc<Snapshot>)> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Attach { view: view.clone(), reply }).ok()?;
        let snapshot = rx.await.ok()?;
        Some((Attachment { view, commands: self.commands.clone() }, snapshot))
    }
}

/// Keeps a view's scopes alive while a proxy with that view is connected.
#[derive(Debug)]
pub struct Attachment {
    view: View,
    commands: mpsc::UnboundedSender<Command>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Detach { view: self.view.clone() });
    }
}

/// How long the scopes no proxy uses any more are kept, and kept up to date, before they are dropped: a
/// proxy that comes back (an Envoy restart, a connection the load balancer moved, a replica draining)
/// finds its configuration translated instead of waiting for it, and does not stall the push loop with
/// that translation. Memory follows the fleet this much later.
pub const SCOPE_LINGER: std::time::Duration = std::time::Duration::from_secs(10);
/// Unused scopes kept per resource type at most (the oldest go first).
pub const MAX_LINGERING: usize = 64;

/// Scopes of one resource type that proxies are attached to, with their resources. The map is
/// persistent: a snapshot takes it in O(1), and a push copies only what it changes. A scope whose last
/// proxy left lingers for [`SCOPE_LINGER`] (see [`ScopeTable::sweep`]).
struct ScopeTable<S: Clone + Eq + Hash> {
    scopes: imbl::HashMap<S, Resources>,
    refs: HashMap<S, usize>,
    /// scopes in `scopes` that no proxy uses, with when their last proxy left (oldest first)
    lingering: indexmap::IndexMap<S, Instant>,
}

impl<S: Clone + Eq + Hash> ScopeTable<S> {
    fn new() -> Self {
        Self { scopes: imbl::HashMap::new(), refs: HashMap::new(), lingering: indexmap::IndexMap::new() }
    }

    /// Adds a reference; returns true if the scope is new and must be translated.
    fn attach(&mut self, scope: &S) -> bool {
        let n = self.refs.entry(scope.clone()).or_default();
        *n += 1;
        if *n > 1 || self.lingering.shift_remove(scope).is_some() {
            return false;
        }
        self.scopes.insert(scope.clone(), Resources::new());
        true
    }

    /// Drops a reference; a scope that loses its last one lingers from `now`. Returns true if that
    /// pushed an older lingering scope out (it is gone).
    fn detach(&mut self, scope: &S, now: Instant) -> bool {
        let Some(n) = self.refs.get_mut(scope) else { return false };
        *n -= 1;
        if *n > 0 {
            return false;
        }
        self.refs.remove(scope);
        self.lingering.insert(scope.clone(), now);
        self.drop_oldest_while(|lingering, _| lingering > MAX_LINGERING)
    }

    /// Drops the scopes that lingered `linger` by `now`; returns true if any went.
    fn sweep(&mut self, now: Instant, linger: std::time::Duration) -> bool {
        self.drop_oldest_while(|_, since| now.saturating_duration_since(since) >= linger)
    }

    /// Drops the longest-lingering scope while `drop(how many linger, since when it lingers)`; returns
    /// true if any went.
    fn drop_oldest_while(&mut self, drop: impl Fn(usize, Instant) -> bool) -> bool {
        let mut gone = false;
        while let Some((_, since)) = self.lingering.first()
            && drop(self.lingering.len(), *since)
        {
            if let Some((old, _)) = self.lingering.shift_remove_index(0) {
                self.scopes.remove(&old);
                gone = true;
            }
        }
        gone
    }

    /// When the oldest lingering scope is due to go.
    fn next_sweep(&self, linger: std::time::Duration) -> Option<Instant> {
        self.lingering.first().map(|(_, since)| *since + linger)
    }

    fn resources(&mut self, scope: &S) -> &mut Resources {
        self.scopes.get_mut(scope).expect("attached")
    }

    fn published(&self) -> imbl::HashMap<S, Resources> {
        self.scopes.clone()
    }
}

/// How long after an endpoint-only push the warnings are recomputed (see [`Pusher::refresh_warnings`]).
pub const WARNINGS_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// The push loop's state.
pub struct Pusher {
    ctx: Context,
    registry: Registry,
    debounce: Debounce,
    clusters: ScopeTable<ClusterScope>,
    inbound: ScopeTable<InboundScope>,
    endpoints: ScopeTable<EndpointScope>,
    listeners: ScopeTable<ListenerScope>,
    routes: ScopeTable<RouteScope>,
    /// every sidecar's gRPC api_listeners (one set for all scopes)
    api_listeners: Resources,
    /// each service's hostname and ports at the last translation (to remove the assignments of ports
    /// that went away)
    eds_ports: HashMap<ServiceKey, (Arc<str>, Vec<u16>)>,
    /// each service's endpoint addresses at the last translation
    service_ips: HashMap<ServiceKey, Vec<std::net::IpAddr>>,
    /// the translation context changed outside the registry (gateway DNS, demotions): retranslate all
    context_changed: bool,
    warnings: watch::Sender<Arc<Vec<translate::diagnostics::Warning>>>,
    /// endpoint-only pushes recompute the warnings (a walk of the whole registry) at most once per
    /// [`WARNINGS_DELAY`], off the push path; structural changes at once
    warnings_due: Option<Instant>,
    /// what views depend on ([`Context::view_keys`])
    view_keys: Arc<translate::ViewKeys>,
    generation: u64,
    /// the changes of the last generations ([`Snapshot::recent`])
    recent: Arc<Vec<(u64, Arc<Changes>)>>,
    publisher: watch::Sender<Arc<Snapshot>>,
    /// `publisher`'s snapshot plus the scopes attached since ([`PushHandle::snapshot`])
    latest: watch::Sender<Arc<Snapshot>>,
    ready: Arc<AtomicBool>,
    /// recent pushes, for the debug surface
    push_log: log::PushLog,
    /// when the change being debounced was first seen
    change_seen: Option<Instant>,
    /// source events applied since the last push
    events_in_push: u64,
    /// the mesh config's `unreachableGracePeriod`: a cluster unreachable this long is demoted
    unreachable_grace: std::time::Duration,
    /// the mesh config has `gatewayProbes`: a cluster whose network's gateways are up is not demoted
    /// for its API alone
    gateway_probes: bool,
    /// the traffic policy, the failover state and when the decisions change next by themselves
    traffic: Arc<crate::traffic::Status>,
    /// the translation context as last published (shared with the snapshots)
    published_ctx: Arc<Context>,
}

/// Below this many (scope, service) pairs a push translates on its own thread only.
const PARALLEL_MIN: usize = 512;

/// `f` of every (scope, item) pair, per scope in the items' order. Many pairs (a policy change or a
/// lost cloud re-translates every service for every scope) are split over the machine's cores, the push
/// loop's own thread among them; few are translated in place.
fn translate_pairs<S: Sync, I: Sync, T: Send>(
    scopes: &[S],
    items: &[I],
    f: impl Fn(&S, &I) -> T + Sync,
) -> Vec<Vec<T>> {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pairs = scopes.len() * items.len();
    let threads = cores.min(pairs / PARALLEL_MIN).max(1);
    if threads == 1 {
        return scopes.iter().map(|scope| items.iter().map(|i| f(scope, i)).collect()).collect();
    }
    // contiguous runs of the pairs (scope-major), one per thread
    let per = pairs.div_ceil(threads);
    let run = |k: usize| -> Vec<T> {
        (k * per..((k + 1) * per).min(pairs)).map(|p| f(&scopes[p / items.len()], &items[p % items.len()])).collect()
    };
    let run = &run;
    let flat: Vec<T> = std::thread::scope(|sc| {
        let spawned: Vec<_> = (1..threads)
            .map(|k| std::thread::Builder::new().name("meshfed-translate".into()).spawn_scoped(sc, move || run(k)))
            .collect();
        let mut out = run(0);
        for (k, h) in (1..threads).zip(spawned) {
            match h {
                Ok(h) => out.extend(h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))),
                // no thread to be had: that run is translated here
                Err(_) => out.extend(run(k)),
            }
        }
        out
    });
    let mut flat = flat.into_iter();
    scopes.iter().map(|_| flat.by_ref().take(items.len()).collect()).collect()
}

fn encode_all<M: prost::Message + prost::Name>(items: Vec<translate::Named<M>>) -> Vec<Arc<Resource>> {
    items.into_iter().map(Resource::encode).collect()
}

impl Pusher {
    pub fn new(mesh: &MeshConfig) -> (Pusher, watch::Receiver<Arc<Snapshot>>) {
        let (publisher, rx) = watch::channel(Arc::new(Snapshot::default()));
        let pusher = Pusher {
            ctx: Context::from_mesh(mesh),
            registry: Registry::new(mesh),
            debounce: mesh.debounce,
            clusters: ScopeTable::new(),
            inbound: ScopeTable::new(),
            endpoints: ScopeTable::new(),
            listeners: ScopeTable::new(),
            routes: ScopeTable::new(),
            api_listeners: Resources::new(),
            eds_ports: HashMap::new(),
            service_ips: HashMap::new(),
            context_changed: false,
            warnings: watch::channel(Arc::default()).0,
            warnings_due: None,
            view_keys: Arc::default(),
            generation: 0,
            recent: Arc::default(),
            publisher,
            latest: watch::channel(Arc::new(Snapshot::default())).0,
            ready: Arc::new(AtomicBool::new(false)),
            push_log: log::PushLog::default(),
            change_seen: None,
            events_in_push: 0,
            unreachable_grace: mesh.unreachable_grace_period,
            gateway_probes: mesh.gateway_probes.is_some(),
            traffic: Arc::new(crate::traffic::Status {
                policy: {
                    let mut p = mesh.traffic.clone();
                    p.stamp(&crate::traffic::TrafficPolicy::default(), std::time::SystemTime::now());
                    p
                },
                ..Default::default()
            }),
            published_ctx: Arc::default(),
        };
        (pusher, rx)
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Applies a source event to the registry (translation happens at the next push).
    pub fn apply(&mut self, event: SourceEvent) -> RegistryChange {
        self.events_in_push += 1;
        self.registry.apply(event)
    }

    fn translate_scope_eds(&self, scope: &EndpointScope) -> Vec<Arc<Resource>> {
        let mut out = Vec::new();
        for s in self.registry.services().values() {
            out.extend(encode_all(translate::endpoint::service_load_assignments(&self.ctx, scope, s)));
        }
        out
    }

    /// Attaches a view; returns true if any of its scopes was new (a publish is needed).
    pub fn attach(&mut self, view: &View) -> bool {
        self.sync_context();
        let mut new = false;
        if self.clusters.attach(&view.clusters) {
            let r = encode_all(translate::cluster::clusters(&self.ctx, &view.clusters, &self.registry));
            cache::replace_all(self.clusters.resources(&view.clusters), r);
            new = true;
        }
        if let Some(i) = &view.inbound
            && self.inbound.attach(i)
        {
            let r = encode_all(translate::cluster::inbound_clusters(i, &self.registry));
            cache::replace_all(self.inbound.resources(i), r);
            new = true;
        }
        if self.endpoints.attach(&view.endpoints) {
            let r = self.translate_scope_eds(&view.endpoints);
            cache::replace_all(self.endpoints.resources(&view.endpoints), r);
            new = true;
        }
        if self.listeners.attach(&view.listeners) {
            let r = encode_all(translate::listener::scope_listeners(&self.ctx, &view.listeners, &self.registry));
            cache::replace_all(self.listeners.resources(&view.listeners), r);
            new = true;
        }
        if self.routes.attach(&view.routes) {
            let r = encode_all(translate::route::routes(&self.ctx, &view.routes, &self.registry));
            cache::replace_all(self.routes.resources(&view.routes), r);
            new = true;
        }
        new
    }

    /// Detaches a view: its scopes no other proxy uses linger ([`SCOPE_LINGER`]). Returns true if a
    /// scope was dropped (one lingering longest, over [`MAX_LINGERING`]).
    pub fn detach(&mut self, view: &View) -> bool {
        let now = Instant::now();
        let mut gone = self.clusters.detach(&view.clusters, now);
        if let Some(i) = &view.inbound {
            gone |= self.inbound.detach(i, now);
        }
        gone |= self.endpoints.detach(&view.endpoints, now);
        gone |= self.listeners.detach(&view.listeners, now);
        gone |= self.routes.detach(&view.routes, now);
        gone
    }

    /// Drops the scopes that lingered [`SCOPE_LINGER`] by `now`; returns true if any went.
    fn sweep_lingering(&mut self, now: Instant) -> bool {
        let mut gone = self.clusters.sweep(now, SCOPE_LINGER);
        gone |= self.inbound.sweep(now, SCOPE_LINGER);
        gone |= self.endpoints.sweep(now, SCOPE_LINGER);
        gone |= self.listeners.sweep(now, SCOPE_LINGER);
        gone |= self.routes.sweep(now, SCOPE_LINGER);
        gone
    }

    /// When the next lingering scope is due to be dropped.
    fn next_sweep(&self) -> Option<Instant> {
        [
            self.clusters.next_sweep(SCOPE_LINGER),
            self.inbound.next_sweep(SCOPE_LINGER),
            self.endpoints.next_sweep(SCOPE_LINGER),
            self.listeners.next_sweep(SCOPE_LINGER),
            self.routes.next_sweep(SCOPE_LINGER),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// After scopes were dropped: the current snapshots without them, so their resources are freed. The same generation with the same changes, swapped in without waking any
    /// stream (none of them uses those scopes).
    fn drop_detached_scopes(&mut self) {
        let snapshot = self.refresh_latest();
        self.publisher.send_if_modified(|current| {
            if current.generation == snapshot.generation {
                *current = snapshot;
            }
            false
        });
    }

    /// Brings the translation context up to date with the registry (rules, gateways).
    fn sync_context(&mut self) {
        self.ctx.update_from(&self.registry);
    }

    /// Translates what `change` touched for every attached scope. Returns the changed names per type.
    pub fn translate(&mut self, change: &RegistryChange) -> Changes {
        let mut changes = Changes::default();
        self.sync_context();
        if change.is_empty() && !self.context_changed {
            return changes;
        }
        let ctx = &self.ctx;
        let reg = &self.registry;
        // Addresses of the changed services' endpoints, before and after: a sidecar whose own address is
        // among them may serve a different set of inbound ports now.
        let mut touched_ips: std::collections::BTreeSet<std::net::IpAddr> = Default::default();
        for key in change.services.keys() {
            if let Some(old) = self.service_ips.remove(key) {
                touched_ips.extend(old);
            }
            if let Some(s) = reg.service(key) {
                let ips: Vec<std::net::IpAddr> = s.endpoints.iter().map(|e| e.address).collect();
                touched_ips.extend(ips.iter().copied());
                self.service_ips.insert(key.clone(), ips);
            }
        }
        let full = change.has_shape_change() || self.context_changed;
        let inbound_touched = |ip: Option<std::net::IpAddr>| ip.is_some_and(|ip| touched_ips.contains(&ip));
        if full {
            for (scope, res) in self.clusters.scopes.iter_mut() {
                let new = encode_all(translate::cluster::clusters(ctx, scope, reg));
                changes.add(ResourceType::Cluster, cache::replace_all(res, new));
            }
        }
        for (scope, res) in self.inbound.scopes.iter_mut() {
            if full || inbound_touched(Some(scope.ip)) {
                let new = encode_all(translate::cluster::inbound_clusters(scope, reg));
                changes.add(ResourceType::Cluster, cache::replace_all(res, new));
            }
        }
        for (scope, res) in self.listeners.scopes.iter_mut() {
            if full || inbound_touched(scope.inbound.as_ref().map(|i| i.ip)) {
                let new = encode_all(translate::listener::scope_listeners(ctx, scope, reg));
                changes.add(ResourceType::Listener, cache::replace_all(res, new));
            }
        }
        if full {
            let new = encode_all(translate::listener::api_listeners(reg));
            changes.add(ResourceType::Listener, cache::replace_all(&mut self.api_listeners, new));
            for (scope, res) in self.routes.scopes.iter_mut() {
                let new = encode_all(translate::route::routes(ctx, scope, reg));
                changes.add(ResourceType::Route, cache::replace_all(res, new));
            }
        }
        // EDS: every assignment when policies, gateways or the context changed (priorities and gateway
        // endpoints depend on them); otherwise only the assignments of the services that changed.
        // (a policy change or a lost cloud re-translates every service of every scope: the pairs are
        // translated on the machine's cores, see `translate_pairs`)
        let scopes: Vec<EndpointScope> = self.endpoints.scopes.keys().cloned().collect();
        if change.policies || change.gateways || self.context_changed {
            let services: Vec<&Arc<crate::model::Service>> = self.registry.services().values().collect();
            let translated = translate_pairs(&scopes, &services, |scope, s| {
                encode_all(translate::endpoint::service_load_assignments(&self.ctx, scope, s))
            });
            for (scope, per_service) in scopes.iter().zip(translated) {
                let new = per_service.into_iter().flatten().collect();
                changes.add(ResourceType::Endpoint, cache::replace_all(self.endpoints.resources(scope), new));
            }
        } else {
            let keys: Vec<&ServiceKey> = change.services.keys().collect();
            let (ctx, registry, eds_ports) = (&self.ctx, &self.registry, &self.eds_ports);
            let translated = translate_pairs(&scopes, &keys, |scope, key| {
                let new = match registry.service(key) {
                    Some(s) => encode_all(translate::endpoint::service_load_assignments(ctx, scope, s)),
                    None => Vec::new(),
                };
                // (the rules did not change: the old assignments had the same subsets)
                let removals: Vec<Arc<str>> = match eds_ports.get(*key) {
                    Some((host, ports)) => {
                        translate::endpoint::assignment_names(ctx, scope, &key.namespace, host, ports)
                            .into_iter()
                            .map(Arc::<str>::from)
                            .filter(|n| !new.iter().any(|r| r.name == *n))
                            .collect()
                    }
                    None => Vec::new(),
                };
                (new, removals)
            });
            for (scope, per_service) in scopes.iter().zip(translated) {
                let (mut upserts, mut removals) = (Vec::new(), Vec::new());
                for (new, gone) in per_service {
                    upserts.extend(new);
                    removals.extend(gone);
                }
                changes.add(ResourceType::Endpoint, cache::update(self.endpoints.resources(scope), upserts, &removals));
            }
        }
        for key in change.services.keys() {
            match self.registry.service(key) {
                Some(s) => {
                    self.eds_ports.insert(key.clone(), (s.hostname.clone(), s.ports.iter().map(|p| p.port).collect()));
                }
                None => {
                    self.eds_ports.remove(key);
                }
            }
        }
        self.context_changed = false;
        changes
    }

    /// Recomputes the mesh-wide warnings, logging new ones.
    fn refresh_warnings(&mut self) {
        self.warnings_due = None;
        let warnings = translate::diagnostics::warnings(&self.ctx, &self.registry);
        let old = self.warnings.borrow().clone();
        for w in warnings.iter().filter(|w| !old.contains(w)) {
            tracing::warn!(kind = w.kind, subject = %w.subject, "{}", w.message);
        }
        if *old != warnings {
            self.warnings.send_replace(Arc::new(warnings));
        }
    }

    /// Recomputes what views depend on ([`Context::view_keys`]: from the rules and the services' names,
    /// so only after structural changes).
    fn refresh_view_keys(&mut self) {
        let keys = self.ctx.view_keys(&self.registry);
        if *self.view_keys != keys {
            self.view_keys = Arc::new(keys);
        }
    }

    /// New gateway hostname resolutions (from the gateway resolver).
    pub fn set_resolved_gateways(&mut self, resolved: std::collections::BTreeMap<String, Vec<std::net::IpAddr>>) {
        if *self.ctx.resolved != resolved {
            self.ctx.resolved = Arc::new(resolved);
            self.context_changed = true;
        }
    }

    /// Clusters whose endpoints go below every reachable cluster's (unreachable past the grace period).
    pub fn set_demoted_clusters(&mut self, demoted: std::collections::BTreeSet<crate::model::ClusterId>) {
        if *self.ctx.demoted_clusters != demoted {
            self.ctx.demoted_clusters = Arc::new(demoted);
            self.context_changed = true;
        }
    }

    /// The gateway probes' verdict: updates `ctx.gateway_verdict` and returns the services with endpoints
    /// in a network whose verdict changed, as endpoint changes (only their EDS is translated again).
    pub fn set_gateway_verdict(&mut self, verdict: crate::liveness::Verdict) -> RegistryChange {
        let mut change = RegistryChange::default();
        let networks = verdict.networks_changed(&self.ctx.gateway_verdict);
        if networks.is_empty() && *self.ctx.gateway_verdict == verdict {
            return change;
        }
        for s in self.registry.services().values() {
            if s.endpoints.iter().any(|e| networks.contains(&e.network)) {
                change.services.insert(s.key.clone(), ChangeKind::Endpoints);
            }
        }
        info!(fenced = ?verdict.fenced, down = ?verdict.down, "gateway verdict changed");
        self.ctx.gateway_verdict = Arc::new(verdict);
        change
    }

    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// New mesh-wide settings: everything is translated again at the next push if they changed.
    pub fn set_live_settings(&mut self, settings: LiveSettings) {
        if self.ctx.defaults != settings.defaults
            || self.ctx.send_unhealthy_endpoints != settings.send_unhealthy_endpoints
        {
            info!(send_unhealthy_endpoints = settings.send_unhealthy_endpoints, "mesh-wide settings changed");
            self.ctx.defaults = settings.defaults;
            self.ctx.send_unhealthy_endpoints = settings.send_unhealthy_endpoints;
            self.context_changed = true;
        }
    }

    /// A new traffic policy: drains keep their start if the previous policy had them. Returns whether it
    /// changed; the next push decides again and translates what the decisions changed: the EDS of the
    /// services whose decision differs, or everything when the covered services or `lastResort` change
    /// ([`Self::refresh_traffic`]).
    pub fn set_traffic_policy(&mut self, mut policy: crate::traffic::TrafficPolicy) -> bool {
        let now = std::time::SystemTime::now();
        policy.stamp(&self.traffic.policy, now);
        if policy == self.traffic.policy {
            return false;
        }
        info!(policies = policy.policies.len(), drains = policy.drains.len(), "traffic policy changed");
        self.traffic = Arc::new(crate::traffic::Status { policy, ..(*self.traffic).clone() });
        true
    }

    /// The traffic state of an earlier run (the last-known state), as if this replica had never stopped:
    /// a cluster failed over then stays away until it has been healthy for `failbackAfter`, and a drill
    /// aborted then is aborted from the start (its drain does not apply; its report keeps the abort's
    /// time and reason). Call before the first push.
    pub fn restore(&mut self, restored: crate::traffic::Durable) {
        let crate::traffic::Durable { failover, drill_aborts } = restored;
        self.traffic =
            Arc::new(crate::traffic::Status { failover, restored_aborts: drill_aborts, ..(*self.traffic).clone() });
    }

    /// Decides the traffic of every covered service at `now` ([`crate::traffic::decide_all`]): updates
    /// `ctx.traffic` and the failover state, and returns the services whose decision changed as endpoint
    /// changes (a service that became covered or uncovered changes its cluster too: everything is
    /// translated again).
    pub fn refresh_traffic(&mut self, now: std::time::SystemTime) -> RegistryChange {
        let mut change = RegistryChange::default();
        let status = &self.traffic;
        if status.policy.is_empty()
            && self.ctx.traffic.services.is_empty()
            && status.failover.is_empty()
            && status.drained.is_empty()
            && status.drills.values().all(|r| !r.active() && r.steps.iter().all(|s| s.published_at.is_some()))
        {
            return change;
        }
        let now_wall = now;
        let drills = self.refresh_drills(now_wall);
        let status = &self.traffic;
        let effective = crate::traffic::effective_policy(&status.policy, &drills);
        let all = crate::traffic::decide_all(
            &effective,
            self.registry.cluster_ids(),
            self.registry.services().values().map(|s| &**s),
            now,
            &status.failover,
        );
        let old = &self.ctx.traffic;
        if old.last_resort != all.decisions.last_resort || !old.services.keys().eq(all.decisions.services.keys()) {
            self.context_changed = true;
        } else {
            for s in self.registry.services().values() {
                if old.services.get(&s.hostname) != all.decisions.services.get(&s.hostname) {
                    change.services.insert(s.key.clone(), ChangeKind::Endpoints);
                }
            }
        }
        if *self.ctx.traffic != all.decisions {
            debug!(services = all.decisions.services.len(), "traffic decisions changed");
            self.ctx.traffic = Arc::new(all.decisions);
        }
        // a restored abort is kept until its drill's report carries it, or that drill has expired
        let mut restored_aborts = status.restored_aborts.clone();
        restored_aborts.retain(|key, a| !drills.contains_key(key) && now < a.at + status.policy.max_drain_duration);
        if status.failover != all.failover
            || status.next_change != all.next_change
            || status.drained != all.drained
            || status.drills != drills
            || status.restored_aborts != restored_aborts
        {
            self.traffic = Arc::new(crate::traffic::Status {
                policy: status.policy.clone(),
                failover: all.failover,
                next_change: all.next_change,
                drained: all.drained,
                drills,
                restored_aborts,
            });
        }
        change
    }

    /// The drills at `now` ([`crate::traffic::drill`]): new ones get a report, an active one whose receiving
    /// clusters fall below its threshold is aborted (its drain stops applying in this push), the ones
    /// expired or gone from the policy end; each active drill's capacity is recorded as a step when it
    /// changes (published with the next push).
    fn refresh_drills(&self, now: std::time::SystemTime) -> BTreeMap<String, crate::traffic::drill::Report> {
        use crate::traffic::drill;
        let status = &self.traffic;
        let mut drills = status.drills.clone();
        let listed: BTreeSet<String> =
            status.policy.drains.iter().filter(|d| d.drill.is_some()).map(drill::key).collect();
        let mut health: Option<Vec<(Arc<str>, crate::traffic::ServiceHealth)>> = None;
        for d in status.policy.drains.iter().filter(|d| d.drill.is_some()) {
            let Some(start) = d.start else { continue };
            let key = drill::key(d);
            let r = drills.entry(key.clone()).or_insert_with(|| drill::Report::new(d, start));
            // aborted before (by this replica or another, before a restart): recorded in the TrafficPolicy,
            // or kept in this replica's last-known state
            if r.active() {
                let recorded = d.drill.as_ref().and_then(|x| x.aborted.as_ref());
                let before = match recorded {
                    Some(rec) => Some(drill::Abort { at: rec.at, reason: rec.reason.clone() }),
                    None => status.restored_aborts.get(&key).cloned(),
                };
                if let Some(abort) = before {
                    if recorded.is_none() {
                        info!(drill = %key, reason = %abort.reason, "drill aborted before the restart (last-known state): not applied");
                    }
                    r.aborted = Some(abort);
                    r.record(100, now);
                    continue;
                }
            }
            if !r.active() || now < start {
                continue;
            }
            if d.expired(now) {
                r.ended = Some(drill::End { at: now, how: "expired".into() });
                r.record(100, now);
                continue;
            }
            if d.drill.as_ref().is_some_and(|x| x.abort_below_healthy == 0) {
                r.record(d.capacity_at(now), now);
                continue;
            }
            let services = health.get_or_insert_with(|| {
                self.registry
                    .services()
                    .values()
                    .map(|s| (s.hostname.clone(), crate::traffic::service_health(s)))
                    .collect()
            });
            if let Some(reason) = drill::abort_reason(&status.policy, d, services.iter().map(|(h, sh)| (&**h, sh))) {
                warn!(drill = %key, %reason, "drill aborted");
                crate::metrics::global().record_drill_abort(&r.label);
                r.aborted = Some(drill::Abort { at: now, reason });
                r.record(100, now);
                continue;
            }
            r.record(d.capacity_at(now), now);
        }
        for (key, r) in drills.iter_mut() {
            if r.active() && !listed.contains(key) {
                r.ended = Some(drill::End { at: now, how: "removed from the mesh config".into() });
                r.record(100, now);
            }
        }
        // bounded: the oldest ended drills go, but never one the policy still lists (its report is what
        // keeps an aborted drill from applying again)
        let ended: Vec<String> =
            drills.iter().filter(|(k, r)| !r.active() && !listed.contains(*k)).map(|(k, _)| k.clone()).collect();
        if ended.len() > drill::KEEP_ENDED {
            let mut by_start: Vec<(std::time::SystemTime, String)> =
                ended.into_iter().map(|k| (drills[&k].start, k)).collect();
            by_start.sort();
            for (_, k) in by_start.iter().take(by_start.len() - drill::KEEP_ENDED) {
                drills.remove(k);
            }
        }
        drills
    }

    /// When the traffic decisions change next by themselves.
    fn next_traffic_change(&self) -> Option<tokio::time::Instant> {
        let at = self.traffic.next_change?;
        let wait = at.duration_since(std::time::SystemTime::now()).unwrap_or_default();
        Some(tokio::time::Instant::now() + wait)
    }

    /// Demotes the clusters unreachable for at least the grace period at `now` (and restores those that
    /// are reachable again): updates `ctx.demoted_clusters` and returns the services with endpoints in a
    /// cluster whose demotion changed, as endpoint changes.
    pub fn refresh_demoted(&mut self, now: std::time::SystemTime) -> RegistryChange {
        // a little slack, so that a timer firing on the deadline does not find it a hair early
        let now = now + std::time::Duration::from_millis(5);
        let kept = self.kept_by_gateways();
        let desired: BTreeSet<crate::model::ClusterId> = self
            .registry
            .unreachable_clusters()
            .into_iter()
            .filter(|(id, since)| *since + self.unreachable_grace <= now && !kept.contains(id))
            .map(|(id, _)| id)
            .collect();
        let mut change = RegistryChange::default();
        if *self.ctx.demoted_clusters == desired {
            return change;
        }
        let flipped: BTreeSet<_> = desired.symmetric_difference(&self.ctx.demoted_clusters).cloned().collect();
        for s in self.registry.services().values() {
            if s.endpoints.iter().any(|e| flipped.contains(&e.cluster)) {
                change.services.insert(s.key.clone(), ChangeKind::Endpoints);
            }
        }
        info!(demoted = ?desired, "clusters demoted for being unreachable longer than the grace period changed");
        self.set_demoted_clusters(desired);
        change
    }

    /// With gateway probes: the clusters whose network has probed gateways, which an API server that does
    /// not answer does not demote: the data plane's evidence decides instead. Gateways up: "API
    /// unreachable, gateways up", keep serving at normal priorities; all down: the network is fenced for
    /// proxies on other networks, and its own proxies keep their local endpoints. A cluster whose network
    /// has no gateways is demoted as without probes.
    fn kept_by_gateways(&self) -> BTreeSet<crate::model::ClusterId> {
        if !self.gateway_probes {
            return BTreeSet::new();
        }
        let v = &self.ctx.gateway_verdict;
        self.registry
            .cluster_summaries()
            .into_iter()
            .filter(|c| v.reachable.contains(&c.network) || v.fenced.contains(&c.network))
            .map(|c| c.id)
            .collect()
    }

    /// When the next unreachable cluster's grace period ends (None: no cluster is waiting for demotion).
    pub fn next_demotion(&self) -> Option<tokio::time::Instant> {
        let now = std::time::SystemTime::now();
        let kept = self.kept_by_gateways();
        self.registry
            .unreachable_clusters()
            .into_iter()
            .filter(|(id, _)| !self.ctx.demoted_clusters.contains(id) && !kept.contains(id))
            .map(|(_, since)| {
                let wait = (since + self.unreachable_grace).duration_since(now).unwrap_or_default();
                tokio::time::Instant::now() + wait
            })
            .min()
    }

    /// Publishes the current scopes as the next snapshot.
    pub fn publish(&mut self, mut changes: Changes) -> u64 {
        self.generation += 1;
        if self.traffic.drills.values().any(|r| r.steps.iter().any(|s| s.published_at.is_none())) {
            let now = std::time::SystemTime::now();
            let generation = self.generation;
            for r in Arc::make_mut(&mut self.traffic).drills.values_mut() {
                r.published(generation, now);
            }
        }
        // (cheap: shared parts)
        self.published_ctx = Arc::new(self.ctx.clone());
        for c in changes.by_type.iter_mut() {
            if c.as_ref().is_some_and(|c| c.0.is_empty()) {
                *c = None;
            }
        }
        let changes = Arc::new(changes);
        let mut recent: Vec<(u64, Arc<Changes>)> = self.recent.iter().cloned().collect();
        recent.push((self.generation, changes.clone()));
        if recent.len() > crate::cache::RECENT_CHANGES {
            recent.remove(0);
        }
        self.recent = Arc::new(recent);
        let snapshot = Arc::new(self.build_snapshot(changes));
        self.latest.send_replace(snapshot.clone());
        self.publisher.send_replace(snapshot);
        self.generation
    }

    /// Every network's east-west gateway addresses (hostnames as resolved), what the gateway probes probe.
    fn gateway_addresses(&self) -> crate::cache::GatewayAddresses {
        let mut out = crate::cache::GatewayAddresses::new();
        for g in self.registry.gateways().iter() {
            let addresses = self.ctx.gateway_addresses(g).into_iter().map(|ip| std::net::SocketAddr::new(ip, g.port));
            out.entry(g.network.clone()).or_default().extend(addresses);
        }
        out
    }

    /// The current generation's snapshot, with `changes`.
    fn build_snapshot(&self, changes: Arc<Changes>) -> Snapshot {
        Snapshot {
            generation: self.generation,
            clusters: self.clusters.published(),
            inbound_clusters: self.inbound.published(),
            endpoints: self.endpoints.published(),
            listeners: self.listeners.published(),
            routes: self.routes.published(),
            api_listeners: self.api_listeners.clone(),
            changes,
            recent: self.recent.clone(),
            services: self.registry.services().clone(),
            gateways: self.registry.gateways().clone(),
            gateway_addresses: Arc::new(self.gateway_addresses()),
            gateway_verdict: self.ctx.gateway_verdict.clone(),
            clusters_summary: Arc::new(self.registry.cluster_summaries()),
            view_keys: self.view_keys.clone(),
            context: self.published_ctx.clone(),
            traffic: self.traffic.clone(),
        }
    }

    /// After an attach: the current generation with every attached scope, for the attaching stream and
    /// the debug surface. Not published to the streams, which hold nothing it changes.
    fn refresh_latest(&mut self) -> Arc<Snapshot> {
        let changes = self.publisher.borrow().changes.clone();
        let snapshot = Arc::new(self.build_snapshot(changes));
        self.latest.send_replace(snapshot.clone());
        snapshot
    }

    /// Runs the loop until every command sender is gone. The events queued before it starts are the
    /// first full state: they are pushed at once, and that push marks the server ready.
    pub async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<SourceEvent>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) {
        // The first full state: everything the sources queued before the loop started.
        let mut initial = RegistryChange::default();
        while let Ok(ev) = events.try_recv() {
            initial.merge(self.apply(ev));
        }
        self.push(initial, true);

        let mut pending = RegistryChange::default();
        let mut first_change: Option<Instant> = None;
        let mut last_change = Instant::now();
        let mut events_open = true;
        loop {
            let deadline = first_change.map(|first| {
                let quiet = last_change + self.debounce.quiet;
                let max = first + self.debounce.max;
                tokio::time::Instant::from_std(quiet.min(max))
            });
            let demotion = self.next_demotion();
            let warnings_due = self.warnings_due;
            let sweep = self.next_sweep();
            let traffic_due = self.next_traffic_change();
            tokio::select! {
                biased;
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { break };
                    self.handle(cmd);
                }
                _ = async { tokio::time::sleep_until(tokio::time::Instant::from_std(sweep.expect("guarded"))).await }, if sweep.is_some() => {
                    if self.sweep_lingering(Instant::now()) {
                        self.drop_detached_scopes();
                    }
                }
                ev = events.recv(), if events_open => {
                    let Some(ev) = ev else { events_open = false; continue };
                    let cluster = ev.cluster().clone();
                    let change = self.apply(ev);
                    debug!(%cluster, services = change.services.len(), "source event applied");
                    // Drain whatever else is queued before deciding (bursts coalesce).
                    pending.merge(change);
                    while let Ok(ev) = events.try_recv() {
                        pending.merge(self.apply(ev));
                    }
                    // a cluster reachable again leaves the demoted set at once
                    pending.merge(self.refresh_demoted(std::time::SystemTime::now()));
                    last_change = Instant::now();
                    first_change.get_or_insert(last_change);
                }
                _ = async { tokio::time::sleep_until(demotion.expect("guarded")).await }, if demotion.is_some() => {
                    let change = self.refresh_demoted(std::time::SystemTime::now());
                    if !change.is_empty() || self.context_changed {
                        pending.merge(change);
                        last_change = Instant::now();
                        first_change.get_or_insert(last_change);
                    }
                }
                _ = async { tokio::time::sleep_until(traffic_due.expect("guarded")).await }, if traffic_due.is_some() => {
                    // a ramp step, an expiry or a failback is due: push now (the decision is the change)
                    let mut change = std::mem::take(&mut pending);
                    // a little slack, so that a timer firing on the deadline does not find it a hair early
                    change.merge(self.refresh_traffic(std::time::SystemTime::now() + std::time::Duration::from_millis(5)));
                    first_change = None;
                    self.push(change, false);
                }
                _ = async { tokio::time::sleep_until(tokio::time::Instant::from_std(warnings_due.expect("guarded"))).await }, if warnings_due.is_some() => {
                    self.refresh_warnings();
                }
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                    let change = std::mem::take(&mut pending);
                    self.change_seen = first_change.take();
                    self.push(change, false);
                }
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Attach { view, reply } => {
                let snapshot = if self.attach(&view) { self.refresh_latest() } else { self.latest.borrow().clone() };
                let _ = reply.send(snapshot);
            }
            Command::Detach { view } => {
                if self.detach(&view) {
                    self.drop_detached_scopes();
                }
            }
            Command::ResolvedGateways(resolved) => {
                self.set_resolved_gateways(resolved);
                if self.context_changed {
                    self.push(RegistryChange::default(), false);
                }
            }
            Command::TrafficPolicy(policy) => {
                if self.set_traffic_policy(policy) {
                    self.push(RegistryChange::default(), false);
                }
            }
            Command::Settings(settings) => {
                self.set_live_settings(settings);
                if self.context_changed {
                    self.push(RegistryChange::default(), false);
                }
            }
            Command::GatewayVerdict(verdict) => {
                let mut change = self.set_gateway_verdict(verdict);
                change.merge(self.refresh_demoted(std::time::SystemTime::now()));
                if !change.is_empty() || self.context_changed {
                    self.push(change, false);
                }
            }
        }
    }

    fn push(&mut self, mut change: RegistryChange, initial: bool) {
        let started = Instant::now();
        // the traffic decisions follow the registry in the same push (a cluster below minHealthy loses
        // its share in the push that brings its endpoints' health)
        change.merge(self.refresh_traffic(std::time::SystemTime::now()));
        let structural =
            initial || change.has_shape_change() || change.policies || change.gateways || self.context_changed;
        let mut changes = self.translate(&change);
        if structural {
            self.refresh_view_keys();
        }
        if structural {
            self.refresh_warnings();
        } else if self.warnings_due.is_none() {
            self.warnings_due = Some(Instant::now() + WARNINGS_DELAY);
        }
        changes.trigger = describe(&change);
        changes.seen = Some(self.change_seen.take().unwrap_or(started));
        let trigger = changes.trigger.clone();
        let counts = log::PushLog::counts(&changes);
        let types: BTreeSet<&str> = ResourceType::ALL
            .iter()
            .filter(|t| changes.get(**t).is_some_and(|c| !c.0.is_empty()))
            .map(|t| t.short())
            .collect();
        let generation = self.publish(changes);
        let merged = std::mem::take(&mut self.events_in_push).saturating_sub(1);
        crate::metrics::global().record_push(&counts, started.elapsed(), merged);
        self.push_log.record(generation, trigger, counts, started.elapsed());
        if initial {
            self.ready.store(true, Ordering::Release);
            info!(generation, services = self.registry.services().len(), "first full state built; ready");
        }
        debug!(generation, ?types, elapsed_us = started.elapsed().as_micros() as u64, "pushed");
    }

    /// Creates the handle streams use. Call before `run`.
    pub fn handle_for(&self, commands: mpsc::UnboundedSender<Command>) -> PushHandle {
        PushHandle {
            commands,
            snapshots: self.publisher.subscribe(),
            latest: self.latest.subscribe(),
            warnings: self.warnings.subscribe(),
            ready: self.ready.clone(),
            push_log: self.push_log.clone(),
        }
    }
}

fn describe(change: &RegistryChange) -> String {
    let mut parts: Vec<String> = change
        .services
        .iter()
        .take(5)
        .map(|(k, kind)| format!("{k} ({})", if *kind == ChangeKind::Shape { "service" } else { "endpoints" }))
        .collect();
    if change.services.len() > 5 {
        parts.push(format!("and {} more", change.services.len() - 5));
    }
    if change.gateways {
        parts.push("gateways".into());
    }
    parts.join(", ")
}

/// Starts the push loop on the current runtime, reading source events from `events` (queue the
/// sources' initial state first: the first push then carries the complete state), with the traffic state
/// `restored` from an earlier run ([`Pusher::restore`]).
pub fn start(
    mesh: &MeshConfig,
    events: mpsc::UnboundedReceiver<SourceEvent>,
    restored: crate::traffic::Durable,
) -> (PushHandle, tokio::task::JoinHandle<()>) {
    let (commands_tx, commands_rx) = mpsc::unbounded_channel();
    let (mut pusher, _rx) = Pusher::new(mesh);
    pusher.restore(restored);
    let handle = pusher.handle_for(commands_tx);
    let task = tokio::spawn(pusher.run(events, commands_rx));
    (handle, task)
}

/// A push loop (not running) on a copy of the demo whose mesh config has `mesh_extra` appended, its
/// first push made; the snapshots' receiver and the copy's directory (for tests).
#[cfg(test)]
pub(crate) fn demo_pusher(mesh_extra: &str) -> (Pusher, watch::Receiver<Arc<Snapshot>>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    crate::demo::write_to(dir.path()).unwrap();
    let path = dir.path().join("mesh.yaml");
    let text = std::fs::read_to_string(&path).unwrap() + mesh_extra;
    std::fs::write(&path, text).unwrap();
    let mesh = MeshConfig::load(&path).unwrap();
    let (mut pusher, rx) = Pusher::new(&mesh);
    let mut change = RegistryChange::default();
    for c in &mesh.clusters {
        let crate::mesh_config::ClusterSource::Manifests(d) = &c.source else { continue };
        let (objects, errors) = crate::source::files::load_cluster_dir(d);
        assert!(errors.is_empty(), "{errors:?}");
        change.merge(pusher.apply(SourceEvent::Sync { cluster: c.id.clone(), objects }));
    }
    pusher.push(change, true);
    (pusher, rx, dir)
}

#[cfg(test)]
mod tests {
    #[test]
    fn pairs_are_translated_per_scope_in_order_on_one_thread_or_several() {
        for (scopes, items) in [(1usize, 10usize), (3, 100), (6, 1000), (1, 5000), (7, 333)] {
            let scopes: Vec<String> = (0..scopes).map(|s| format!("scope-{s}")).collect();
            let items: Vec<usize> = (0..items).collect();
            let threads = std::sync::Mutex::new(std::collections::HashSet::new());
            let got = super::translate_pairs(&scopes, &items, |scope, i| {
                threads.lock().unwrap().insert(std::thread::current().id());
                format!("{scope}/{i}")
            });
            let want: Vec<Vec<String>> =
                scopes.iter().map(|s| items.iter().map(|i| format!("{s}/{i}")).collect()).collect();
            assert_eq!(got, want);
            let many = scopes.len() * items.len() >= 2 * super::PARALLEL_MIN;
            if many && std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
                assert!(threads.lock().unwrap().len() > 1, "{} pairs on several threads", scopes.len() * items.len());
            } else if !many {
                assert_eq!(threads.lock().unwrap().len(), 1, "few pairs in place");
            }
        }
    }

    use super::*;
    use crate::proxy::Proxy;
    use prost::Message;

    fn demo_pusher() -> (Pusher, watch::Receiver<Arc<Snapshot>>, tempfile::TempDir) {
        super::demo_pusher("")
    }

    /// A sidecar with interception NONE on its own address (its own listener scope).
    fn sidecar(ip: &str) -> View {
        use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
        let meta = [("CLUSTER_ID", "aws-use1"), ("NETWORK", "aws-net"), ("INTERCEPTION_MODE", "NONE")];
        let node = envoy_types::pb::envoy::config::core::v3::Node {
            id: format!("sidecar~{ip}~client.shop~shop.svc.cluster.local"),
            metadata: Some(Struct {
                fields: meta
                    .iter()
                    .map(|(k, v)| (k.to_string(), Value { kind: Some(Kind::StringValue(v.to_string())) }))
                    .collect(),
            }),
            ..Default::default()
        };
        let proxy = Proxy::from_node(Some(&node)).unwrap();
        View::with_network(&proxy, proxy.network.clone(), &Default::default())
    }

    #[test]
    fn api_listeners_are_stored_once_and_merged_into_every_sidecars_lds() {
        let (mut pusher, _rx, _dir) = demo_pusher();
        let (a, b) = (sidecar("127.0.50.1"), sidecar("127.0.50.2"));
        assert_ne!(a.listeners, b.listeners, "own bind addresses, own scopes");
        pusher.attach(&a);
        pusher.attach(&b);
        let snapshot = pusher.refresh_latest();
        assert!(!snapshot.api_listeners.is_empty());
        for view in [&a, &b] {
            let own = &snapshot.listeners[&view.listeners];
            assert!(own.values().all(|r| r.wildcard), "the scope holds no api_listener");
            let lds = snapshot.resources(view, ResourceType::Listener).unwrap();
            assert_eq!(lds.len(), own.len() + snapshot.api_listeners.len());
            // the same shared resources, not copies
            for (name, r) in snapshot.api_listeners.iter() {
                assert!(Arc::ptr_eq(r, &lds[name]));
            }
        }
    }

    #[test]
    fn a_traffic_policy_is_decided_in_the_push_and_a_ramp_step_changes_only_its_services() {
        let (mut pusher, _rx, _dir) = demo_pusher();
        let view = {
            let mut v = sidecar("127.0.50.1");
            v.endpoints.locality = crate::model::Locality::parse("us-east-1/us-east-1a");
            v
        };
        pusher.attach(&view);
        let now = std::time::SystemTime::now();
        let expires = crate::traffic::decide::time_str(now + std::time::Duration::from_secs(3600));
        let yaml = format!(
            "policies: [{{hosts: [reviews.shop.svc.cluster.local], split: {{us-east-1: {{aws-use1: 70, azure-weu: 30}}}}}}]\n\
             drains: [{{cluster: azure-weu, capacity: 0, ramp: {{step: 50, every: 30s}}, expires: '{expires}'}}]\n"
        );
        let ids = [crate::model::ClusterId::new("aws-use1"), crate::model::ClusterId::new("azure-weu")];
        let policy = crate::traffic::TrafficPolicy::parse(&serde_yaml::from_str(&yaml).unwrap(), &ids, now).unwrap();
        pusher.set_traffic_policy(policy);
        pusher.push(RegistryChange::default(), false);
        let reviews = "reviews.shop.svc.cluster.local";
        let shares = |p: &Pusher| {
            p.context()
                .traffic
                .shares(reviews, "us-east-1")
                .unwrap()
                .values()
                .map(|s| s.share.round() as u32)
                .collect::<Vec<_>>()
        };
        assert_eq!(shares(&pusher), vec![85, 15], "first ramp step: azure at 50% of 30");
        assert!(!pusher.context().traffic.services.contains_key("ratings.shop.svc.cluster.local"));
        let due = pusher.traffic.next_change.expect("the next ramp step");
        assert!(due > now && due <= now + std::time::Duration::from_secs(31), "{due:?}");
        // the EDS of the us-east-1 sidecar: the split at priority 0
        let snapshot = pusher.refresh_latest();
        let eds = snapshot.resources(&view, ResourceType::Endpoint).unwrap();
        let body = &eds[&*format!("outbound|9080||{reviews}")].body;
        let any = prost_types_any(body);
        let cla = envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(&*any).unwrap();
        let p0: u32 =
            cla.endpoints.iter().filter(|l| l.priority == 0).map(|l| l.load_balancing_weight.unwrap().value).sum();
        assert_eq!(p0, 100_000, "{cla:?}");
        // at the step: only reviews changes
        let change = pusher.refresh_traffic(due + std::time::Duration::from_millis(1));
        assert_eq!(change.services.keys().map(|k| k.to_string()).collect::<Vec<_>>(), vec!["shop/reviews".to_string()]);
        assert_eq!(shares(&pusher), vec![100, 0]);
        assert_eq!(pusher.traffic.next_change, Some(pusher.traffic.policy.drains[0].expires), "then the expiry");
        // the policy removed: everything back as before, and re-translated
        pusher.set_traffic_policy(crate::traffic::TrafficPolicy::default());
        let change = pusher.refresh_traffic(due);
        assert!(change.services.is_empty() && pusher.context_changed, "uncovered: a full translation");
        assert!(pusher.context().traffic.services.is_empty());
    }

    /// The message in an encoded `Any`.
    #[test]
    fn a_drill_records_its_steps_and_aborts_in_the_push_that_brings_its_receivers_down() {
        let (mut pusher, _rx, dir) = demo_pusher();
        let now = std::time::SystemTime::now();
        let expires = crate::traffic::decide::time_str(now + std::time::Duration::from_secs(3600));
        let yaml = format!(
            "policies: [{{hosts: [reviews.shop.svc.cluster.local], split: {{us-east-1: {{aws-use1: 70, azure-weu: 30}}}}}}]\n\
             drains: [{{cluster: azure-weu, capacity: 0, ramp: {{step: 50, every: 30s}}, expires: '{expires}', \
             drill: {{abortBelowHealthy: 50}}}}]\n"
        );
        let ids = [crate::model::ClusterId::new("aws-use1"), crate::model::ClusterId::new("azure-weu")];
        let policy = crate::traffic::TrafficPolicy::parse(&serde_yaml::from_str(&yaml).unwrap(), &ids, now).unwrap();
        pusher.set_traffic_policy(policy);
        pusher.push(RegistryChange::default(), false);
        let reviews = "reviews.shop.svc.cluster.local";
        let azure = crate::model::ClusterId::new("azure-weu");
        let azure_share =
            |p: &Pusher| p.context().traffic.shares(reviews, "us-east-1").unwrap().get(&azure).map(|s| s.share.round());
        assert_eq!(azure_share(&pusher), Some(15.0), "the first step: 50% of 30");
        let report = |p: &Pusher| p.traffic.drills.values().next().cloned().expect("a drill report");
        let r = report(&pusher);
        assert!(r.active());
        assert_eq!(r.steps.len(), 1);
        assert_eq!((r.steps[0].capacity, r.steps[0].generation), (50, pusher.generation));
        assert!(r.steps[0].published_at.is_some());
        // a push without a change of the drill adds no step
        pusher.push(RegistryChange::default(), false);
        assert_eq!(report(&pusher).steps.len(), 1);
        // every aws-use1 endpoint not ready: the cluster taking azure's traffic is below 50%
        let slices = dir.path().join("aws-use1/endpointslices.yaml");
        let text = std::fs::read_to_string(&slices).unwrap().replace("ready: true", "ready: false");
        std::fs::write(&slices, text).unwrap();
        let (objects, errors) = crate::source::files::load_cluster_dir(&dir.path().join("aws-use1"));
        assert!(errors.is_empty(), "{errors:?}");
        let change = pusher.apply(SourceEvent::Sync { cluster: crate::model::ClusterId::new("aws-use1"), objects });
        pusher.push(change, false);
        let r = report(&pusher);
        let abort = r.aborted.clone().expect("aborted in that push");
        assert!(abort.reason.contains("aws-use1") && abort.reason.contains("below abortBelowHealthy 50%"), "{abort:?}");
        assert_eq!(azure_share(&pusher), Some(100.0), "the drain no longer applies: azure takes what aws cannot");
        assert_eq!(r.steps.last().map(|s| (s.capacity, s.generation)), Some((100, pusher.generation)));
        assert!(pusher.traffic.drained.is_empty());
        // it stays aborted though the policy still lists it, and a later push changes nothing
        pusher.push(RegistryChange::default(), false);
        assert_eq!(report(&pusher), r);
        assert_eq!(azure_share(&pusher), Some(100.0));
        // removed from the mesh config: the report stays (aborted, not "removed")
        pusher.set_traffic_policy(crate::traffic::TrafficPolicy::default());
        pusher.push(RegistryChange::default(), false);
        assert_eq!(report(&pusher).aborted, Some(abort));
        assert!(report(&pusher).ended.is_none());
    }

    /// A policy splitting reviews 70/30 in us-east-1 with a drill draining azure-weu to 0, started two
    /// minutes ago, and a time one minute ago (RFC 3339); `recorded`: the policy records the drill's
    /// abort then, with this reason.
    fn drill_policy(recorded: Option<&str>) -> (crate::traffic::TrafficPolicy, String) {
        let now = std::time::SystemTime::now();
        let time = crate::traffic::decide::time_str;
        let (start, at) =
            (time(now - std::time::Duration::from_secs(120)), time(now - std::time::Duration::from_secs(60)));
        let expires = time(now + std::time::Duration::from_secs(3600));
        let aborted = recorded.map(|r| format!(", aborted: {{at: '{at}', reason: '{r}'}}")).unwrap_or_default();
        let yaml = format!(
            "policies: [{{hosts: [reviews.shop.svc.cluster.local], split: {{us-east-1: {{aws-use1: 70, azure-weu: 30}}}}}}]\n\
             drains: [{{cluster: azure-weu, capacity: 0, start: '{start}', expires: '{expires}', \
             drill: {{abortBelowHealthy: 50{aborted}}}}}]\n"
        );
        let ids = [crate::model::ClusterId::new("aws-use1"), crate::model::ClusterId::new("azure-weu")];
        (crate::traffic::TrafficPolicy::parse(&serde_yaml::from_str(&yaml).unwrap(), &ids, now).unwrap(), at)
    }

    /// azure-weu's share of reviews for us-east-1 (rounded), and the one drill's report.
    fn azure_share_and_drill(p: &Pusher) -> (Option<f64>, crate::traffic::drill::Report) {
        let azure = crate::model::ClusterId::new("azure-weu");
        let shares = p.context().traffic.shares("reviews.shop.svc.cluster.local", "us-east-1").unwrap();
        let report = p.traffic.drills.values().next().cloned().expect("a drill report");
        (shares.get(&azure).map(|s| s.share.round()), report)
    }

    #[test]
    fn a_drill_whose_abort_the_policy_records_is_aborted_from_the_start() {
        // a replica (re)starting on a TrafficPolicy that records the drill's abort: the receivers are
        // healthy, yet the drill does not apply, and the report says when and why it aborted
        let (mut pusher, _rx, _dir) = demo_pusher();
        let (policy, at) = drill_policy(Some("aws-use1 below 50%"));
        pusher.set_traffic_policy(policy);
        pusher.push(RegistryChange::default(), false);
        let (azure, r) = azure_share_and_drill(&pusher);
        assert_eq!(azure, Some(30.0), "the split, not the drill");
        assert!(pusher.traffic.drained.is_empty());
        let abort = r.aborted.expect("aborted");
        assert_eq!((crate::traffic::decide::time_str(abort.at), abort.reason.as_str()), (at, "aws-use1 below 50%"));
    }

    #[test]
    fn an_aborted_drill_the_policy_still_lists_outlives_the_pruning_of_ended_drills() {
        // a drill aborted in this run (not recorded anywhere else) while the policy still lists it, and
        // more ended drills than are kept, all newer: the oldest ended ones go, not this one's report,
        // which is what keeps its drain from applying again
        use crate::traffic::drill;
        let (mut pusher, _rx, _dir) = demo_pusher();
        let (policy, _) = drill_policy(None);
        let key = drill::key(&policy.drains[0]);
        pusher.set_traffic_policy(policy);
        pusher.push(RegistryChange::default(), false);
        assert_eq!(azure_share_and_drill(&pusher).0, Some(0.0), "the drill applies");
        let mut status = (*pusher.traffic).clone();
        let report = status.drills.get_mut(&key).expect("its report");
        report.aborted = Some(drill::Abort { at: std::time::SystemTime::now(), reason: "test".into() });
        let ended = report.clone();
        for i in 0..drill::KEEP_ENDED + 3 {
            let mut other = ended.clone();
            other.start += std::time::Duration::from_secs(1 + i as u64);
            status.drills.insert(format!("removed drill {i}"), other);
        }
        pusher.traffic = Arc::new(status);
        pusher.push(RegistryChange::default(), false);
        let (azure, r) = azure_share_and_drill(&pusher);
        assert_eq!(azure, Some(30.0), "the aborted drill does not apply again");
        assert!(r.aborted.is_some());
        assert!(pusher.traffic.drills.contains_key(&key));
        assert_eq!(pusher.traffic.drills.len(), drill::KEEP_ENDED + 1, "the listed one and the newest ended");
    }

    #[test]
    fn a_drill_whose_abort_the_last_known_state_keeps_is_aborted_from_the_start() {
        // meshfed restarting with the file's traffic policy (which it does not edit): the abort restored
        // from the last-known state; the receivers are healthy, yet the drill does not apply
        use crate::traffic::drill;
        let (policy, at) = drill_policy(None);
        let key = drill::key(&policy.drains[0]);
        let at_time: std::time::SystemTime = at.parse::<jiff::Timestamp>().unwrap().into();
        let abort = drill::Abort { at: at_time, reason: "aws-use1: 0 of 2 endpoints healthy".into() };
        let (mut pusher, _rx, _dir) = demo_pusher();
        pusher.restore(crate::traffic::Durable {
            drill_aborts: [(key.clone(), abort.clone())].into(),
            ..Default::default()
        });
        pusher.set_traffic_policy(policy.clone());
        pusher.push(RegistryChange::default(), false);
        let (azure, r) = azure_share_and_drill(&pusher);
        assert_eq!(azure, Some(30.0), "the split, not the drill");
        assert!(pusher.traffic.drained.is_empty());
        assert_eq!(r.aborted.as_ref(), Some(&abort), "the restored time and reason");
        assert_eq!(r.steps.iter().map(|s| s.capacity).collect::<Vec<_>>(), vec![100], "no drain step");
        // and it is kept: the snapshot's durable state holds it for the next write
        assert_eq!(pusher.traffic.durable().drill_aborts, [(key, abort)].into());
        pusher.push(RegistryChange::default(), false);
        assert_eq!(azure_share_and_drill(&pusher).0, Some(30.0));

        // an abort of another drill (another start) does not touch this one: it applies
        let (mut other, _rx, _dir) = demo_pusher();
        let old = drill::Abort { at: at_time, reason: "another drill".into() };
        other.restore(crate::traffic::Durable {
            drill_aborts: [("cluster azure-weu @ 2020-01-01T00:00:00Z".to_string(), old)].into(),
            ..Default::default()
        });
        other.set_traffic_policy(policy);
        other.push(RegistryChange::default(), false);
        let (azure, r) = azure_share_and_drill(&other);
        assert_eq!(azure, Some(0.0), "the drill applies");
        assert!(r.active(), "{r:?}");
        // the abort of a drill the policy in force does not list is kept for the next restart (in
        // custom-resource mode the file's policy serves until the object is read), until that drill must
        // have expired: maxDrainDuration after the abort
        assert_eq!(other.traffic.durable().drill_aborts.len(), 1, "kept while its drill may still be listed");
        let later = at_time + other.traffic.policy.max_drain_duration + std::time::Duration::from_secs(1);
        other.refresh_traffic(later);
        assert!(other.traffic.durable().drill_aborts.is_empty(), "dropped once that drill has expired");
    }

    fn prost_types_any(body: &[u8]) -> Vec<u8> {
        let any = envoy_types::pb::google::protobuf::Any::decode(body).unwrap();
        any.value
    }

    #[test]
    fn attaching_a_proxy_publishes_nothing_to_connected_streams() {
        let (mut pusher, mut rx, _dir) = demo_pusher();
        rx.borrow_and_update();
        let view = sidecar("127.0.50.3");
        let (reply, mut replied) = oneshot::channel();
        pusher.handle(Command::Attach { view: view.clone(), reply });
        let attached = replied.try_recv().expect("answered at once");
        assert!(attached.listeners.contains_key(&view.listeners), "the attaching stream gets its scopes");
        assert_eq!(attached.generation, rx.borrow().generation, "same generation: nothing changed for others");
        assert!(!rx.has_changed().unwrap(), "connected streams are not woken");
        // the debug surface sees the new scope
        let (commands, _) = mpsc::unbounded_channel();
        let handle = pusher.handle_for(commands);
        assert!(handle.snapshot().listeners.contains_key(&view.listeners));
        // the last proxy of a scope goes: the scope lingers, then is dropped from the snapshots, still
        // without a wake-up
        pusher.handle(Command::Detach { view: view.clone() });
        assert!(handle.snapshot().listeners.contains_key(&view.listeners), "lingers");
        let due = pusher.next_sweep().expect("a sweep is due");
        assert!(!pusher.sweep_lingering(due - std::time::Duration::from_millis(1)), "not before its time");
        assert!(pusher.sweep_lingering(due));
        pusher.drop_detached_scopes();
        assert!(!handle.snapshot().listeners.contains_key(&view.listeners));
        assert!(!rx.borrow().listeners.contains_key(&view.listeners));
        assert!(!rx.has_changed().unwrap(), "connected streams are not woken");
        assert_eq!(pusher.next_sweep(), None);
    }

    #[test]
    fn a_proxy_that_comes_back_finds_its_lingering_scopes_translated_and_current() {
        let (mut pusher, _rx, _dir) = demo_pusher();
        let view = sidecar("127.0.50.4");
        assert!(pusher.attach(&view), "first attach: scopes translated");
        pusher.detach(&view);
        // while no proxy uses them, a change still reaches them: one cluster loses an EndpointSlice
        let before = pusher.refresh_latest().endpoints[&view.endpoints].clone();
        let dir = tempfile::tempdir().unwrap();
        let mesh = {
            crate::demo::write_to(dir.path()).unwrap();
            MeshConfig::load(&dir.path().join("mesh.yaml")).unwrap()
        };
        let c = &mesh.clusters[0];
        let crate::mesh_config::ClusterSource::Manifests(d) = &c.source else { panic!("demo clusters are files") };
        let (mut objects, _) = crate::source::files::load_cluster_dir(d);
        let slice = objects.iter().position(|o| matches!(o, crate::topology::TopologyObject::EndpointSlice(_)));
        objects.remove(slice.expect("the demo has EndpointSlices"));
        let change = pusher.apply(SourceEvent::Sync { cluster: c.id.clone(), objects });
        pusher.push(change, false);
        assert!(!pusher.attach(&view), "back within the linger: nothing to translate");
        let after = pusher.refresh_latest().endpoints[&view.endpoints].clone();
        let changed = after.iter().filter(|(n, r)| before.get(*n).is_none_or(|b| b.version != r.version)).count();
        assert!(changed > 0, "the lingering scope was kept up to date");
        assert_eq!(pusher.next_sweep(), None, "in use again: nothing lingers");
    }

    /// The demo with `gatewayProbes` on.
    fn probing_pusher() -> (Pusher, watch::Receiver<Arc<Snapshot>>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        crate::demo::write_to(dir.path()).unwrap();
        let mut mesh = MeshConfig::load(&dir.path().join("mesh.yaml")).unwrap();
        mesh.gateway_probes = Some(crate::mesh_config::GatewayProbes::default());
        let (mut pusher, rx) = Pusher::new(&mesh);
        let mut change = RegistryChange::default();
        for c in &mesh.clusters {
            let crate::mesh_config::ClusterSource::Manifests(d) = &c.source else { continue };
            let (objects, _) = crate::source::files::load_cluster_dir(d);
            change.merge(pusher.apply(SourceEvent::Sync { cluster: c.id.clone(), objects }));
        }
        pusher.push(change, true);
        (pusher, rx, dir)
    }

    fn azure_verdict(fenced: bool) -> crate::liveness::Verdict {
        let n = crate::model::NetworkId::new("azure-net");
        let mut v = crate::liveness::Verdict::default();
        v.reachable.insert(crate::model::NetworkId::new("aws-net"));
        if fenced {
            v.down.insert(n.clone(), ["127.0.20.1:15443".parse().unwrap()].into());
            v.fenced.insert(n);
        } else {
            v.reachable.insert(n);
        }
        v
    }

    #[test]
    fn with_probes_only_a_network_without_gateway_evidence_is_demoted_for_its_api() {
        let (mut pusher, _rx, _dir) = probing_pusher();
        let azure = crate::model::ClusterId::new("azure-weu");
        let long_ago = std::time::SystemTime::now() - 2 * pusher.unreachable_grace;
        pusher.apply(SourceEvent::ClusterReachability { cluster: azure.clone(), reachable: false, since: long_ago });
        let mut change = pusher.set_gateway_verdict(azure_verdict(false));
        change.merge(pusher.refresh_demoted(std::time::SystemTime::now()));
        assert!(pusher.context().demoted_clusters.is_empty(), "API unreachable, gateways up: not demoted");
        assert_eq!(pusher.next_demotion(), None, "no demotion is due either");
        // the network's gateways all down: fenced for proxies on other networks (the verdict), not demoted
        // for every proxy (its own proxies keep their local endpoints)
        pusher.set_gateway_verdict(azure_verdict(true));
        pusher.refresh_demoted(std::time::SystemTime::now());
        assert!(pusher.context().demoted_clusters.is_empty());
        assert!(pusher.context().gateway_verdict.fenced.contains(&crate::model::NetworkId::new("azure-net")));
        // no gateway evidence about the network (no gateways to probe): demoted as without probes
        let mut no_gateways = azure_verdict(false);
        no_gateways.reachable.remove(&crate::model::NetworkId::new("azure-net"));
        pusher.set_gateway_verdict(no_gateways);
        pusher.refresh_demoted(std::time::SystemTime::now());
        assert!(pusher.context().demoted_clusters.contains(&azure));
        assert!(pusher.next_demotion().is_none(), "already demoted");
        // gateways up again: the demotion ends
        pusher.set_gateway_verdict(azure_verdict(false));
        pusher.refresh_demoted(std::time::SystemTime::now());
        assert!(pusher.context().demoted_clusters.is_empty());
        // probing off: today's behaviour, demoted whatever the verdict
        let (mut off, _rx, _dir) = demo_pusher();
        off.apply(SourceEvent::ClusterReachability { cluster: azure.clone(), reachable: false, since: long_ago });
        off.set_gateway_verdict(azure_verdict(false));
        off.refresh_demoted(std::time::SystemTime::now());
        assert!(off.context().demoted_clusters.contains(&azure));
    }

    #[test]
    fn a_verdict_change_retranslates_only_the_services_with_endpoints_in_that_network() {
        let (mut pusher, mut rx, _dir) = probing_pusher();
        let view = sidecar("127.0.50.9");
        pusher.attach(&view);
        pusher.handle(Command::GatewayVerdict(azure_verdict(false)));
        let generation = rx.borrow_and_update().generation;
        pusher.handle(Command::GatewayVerdict(azure_verdict(false)));
        assert_eq!(rx.borrow_and_update().generation, generation, "the same verdict pushes nothing");
        pusher.handle(Command::GatewayVerdict(azure_verdict(true)));
        let snapshot = rx.borrow_and_update().clone();
        assert_eq!(snapshot.generation, generation + 1, "a changed verdict pushes at once");
        let eds = snapshot.changes.get(ResourceType::Endpoint).expect("EDS changed");
        assert!(
            snapshot.changes.get(ResourceType::Cluster).is_none()
                && snapshot.changes.get(ResourceType::Listener).is_none()
        );
        let azure = crate::model::NetworkId::new("azure-net");
        let in_azure: BTreeSet<String> = pusher
            .registry()
            .services()
            .values()
            .filter(|s| s.endpoints.iter().any(|e| e.network == azure))
            .map(|s| s.hostname.to_string())
            .collect();
        assert!(!eds.0.is_empty());
        for name in &eds.0 {
            let host = name.rsplit('|').next().unwrap();
            assert!(in_azure.contains(host), "{name} has no endpoint in azure-net");
        }
        let not_in_azure = pusher.registry().services().values().any(|s| !in_azure.contains(&*s.hostname));
        if not_in_azure {
            assert!(
                snapshot.endpoints[&view.endpoints].len() > eds.0.len(),
                "services without endpoints in azure-net were not translated again"
            );
        }
    }

    #[test]
    fn lingering_scopes_are_bounded_and_swept_in_order() {
        let mut table: ScopeTable<u32> = ScopeTable::new();
        let t0 = Instant::now();
        for i in 0..(MAX_LINGERING as u32 + 3) {
            assert!(table.attach(&i));
            let gone = table.detach(&i, t0 + std::time::Duration::from_millis(i as u64));
            // over the bound, the oldest goes at once
            assert_eq!(gone, i as usize >= MAX_LINGERING, "detach {i}");
        }
        assert_eq!(table.scopes.len(), MAX_LINGERING);
        assert!(!table.scopes.contains_key(&0) && !table.scopes.contains_key(&2) && table.scopes.contains_key(&3));
        // a second proxy of a scope: it lingers only when both left
        assert!(table.attach(&1000));
        assert!(!table.attach(&1000));
        table.detach(&1000, t0);
        assert!(!table.lingering.contains_key(&1000));
        let linger = std::time::Duration::from_secs(10);
        assert_eq!(table.next_sweep(linger), Some(t0 + std::time::Duration::from_millis(3) + linger));
        assert!(table.sweep(t0 + std::time::Duration::from_millis(10) + linger, linger));
        assert_eq!(table.scopes.len(), MAX_LINGERING + 3 - 11 + 1, "those that lingered long enough went");
    }
}
