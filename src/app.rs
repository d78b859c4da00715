//! The application, wired once: sources -> federated registry -> push loop (translation, cache) -> xDS
//! listeners and the debug server, built from [`Options`].
//!
//! `meshfed serve`, the tests' in-process servers, the benchmark server and
//! the fuzz harness all start meshfed with [`App::start`]; nothing else assembles these pieces. The order
//! is the one a proxy must see: the sources' initial state is queued before the push loop starts (the first
//! push is the complete state), and the xDS listeners accept only once that first snapshot exists, so a
//! proxy never sees a partial mesh.
//!
//! With the mesh config's `lastKnownState`, the restored last-known state is queued first of all (before
//! any source starts), and the sources' events pass through the store's tap on their way to the push loop
//! ([`crate::source::last_known`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::debug::{DebugAccess, DebugState};
use crate::mesh_config::MeshConfig;
use crate::push::PushHandle;
use crate::source::last_known::LastKnown;
use crate::source::{ClusterHealth, SourceEvent};
use crate::xds::connections::Connections;
use crate::xds::server::ServeOptions;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding the {what} address {addr}: {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("starting the file source: {0}")]
    Files(#[from] crate::source::files::Error),
    #[error("the push loop ended before its first snapshot")]
    PushLoop,
    #[error("mesh config: {0}")]
    GatewayProbes(String),
}

/// Where the cluster state comes from.
#[derive(Debug)]
pub enum Sources {
    /// The clusters the mesh config names: manifest directories (watched) and Kubernetes API servers
    /// (kubeconfigs, in-cluster, remote secrets), as `meshfed serve` runs.
    Mesh {
        /// accept kubeconfigs whose users run a command (`exec`) or an auth-provider plugin
        allow_exec_auth: bool,
    },
    /// Only these events, then whatever is sent to [`App::events`] (in-process tests, benchmarks, fuzzing).
    Events(Vec<SourceEvent>),
}

/// A listening address, or a listener already bound (tests bind port 0 themselves when they must know it
/// before starting).
#[derive(Debug)]
pub enum Listen {
    Address(SocketAddr),
    Bound(tokio::net::TcpListener),
}

impl Listen {
    /// An ephemeral port on 127.0.0.1.
    pub fn loopback() -> Listen {
        Listen::Address(([127, 0, 0, 1], 0).into())
    }

    fn bind_xds(self) -> std::io::Result<tokio::net::TcpListener> {
        match self {
            Listen::Bound(l) => Ok(l),
            Listen::Address(a) => crate::xds::bind_listener(a),
        }
    }

    async fn bind(self) -> std::io::Result<tokio::net::TcpListener> {
        match self {
            Listen::Bound(l) => Ok(l),
            Listen::Address(a) => tokio::net::TcpListener::bind(a).await,
        }
    }

    fn address(&self) -> Option<SocketAddr> {
        match self {
            Listen::Bound(l) => l.local_addr().ok(),
            Listen::Address(a) => Some(*a),
        }
    }
}

/// One xDS listener (ADS and the per-type services).
#[derive(Debug)]
pub struct XdsListener {
    pub listen: Listen,
    /// limits, TLS, counters
    pub options: ServeOptions,
}

impl XdsListener {
    /// Plaintext on an ephemeral loopback port, without connection, stream or rate limits (tests,
    /// benchmarks).
    pub fn loopback_unlimited() -> XdsListener {
        XdsListener {
            listen: Listen::loopback(),
            options: ServeOptions { limits: crate::xds::limits::Limits::unlimited(), ..Default::default() },
        }
    }
}

/// The debug server.
#[derive(Debug)]
pub struct DebugListener {
    pub listen: Listen,
    pub access: DebugAccess,
    /// meshfed serves the built-in demo (no mesh config given): the debug surface says so on every page
    pub demo: bool,
}

/// Everything [`App::start`] needs.
#[derive(Debug)]
pub struct Options {
    pub mesh: MeshConfig,
    pub sources: Sources,
    /// xDS listeners, served in this order once the first snapshot exists (none: in-process use only)
    pub xds: Vec<XdsListener>,
    pub debug: Option<DebugListener>,
    /// how often east-west gateways' host names are resolved again (None: never; tests)
    pub gateway_dns_interval: Option<Duration>,
    /// meshfed's mesh certificate and root (those it serves xDS over mTLS with): the gateway probes'
    /// mTLS stage presents it unless `gatewayProbes.mtls` names files of its own
    pub mesh_certificate: Option<crate::tls::MeshCertificate>,
    /// the global DNS health endpoint (`GET /global/health`, [`crate::global_health`]), no token
    pub global_health: Option<Listen>,
    /// watch the mesh config's file (`mesh.path`) and apply its edits live ([`crate::config_watch`])
    pub watch_mesh_config: bool,
}

impl Options {
    /// In-process: the given events as the sources, no listeners, no gateway DNS.
    pub fn in_process(mesh: MeshConfig, initial: Vec<SourceEvent>) -> Options {
        Options {
            mesh,
            sources: Sources::Events(initial),
            xds: Vec::new(),
            debug: None,
            gateway_dns_interval: None,
            mesh_certificate: None,
            global_health: None,
            watch_mesh_config: false,
        }
    }
}

/// meshfed running: its state handles and its tasks. Dropping it stops everything at once;
/// [`App::shutdown`] drains the xDS listeners first.
pub struct App {
    pub push: PushHandle,
    pub connections: Arc<Connections>,
    /// every cluster's source status
    pub clusters: ClusterHealth,
    /// feeds the push loop as a source would (tests, benchmarks)
    pub events: mpsc::UnboundedSender<SourceEvent>,
    xds_addresses: Vec<SocketAddr>,
    debug_address: Option<SocketAddr>,
    global_health_address: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    xds_tasks: Vec<JoinHandle<Result<(), crate::xds::server::Error>>>,
    debug_task: Option<JoinHandle<std::io::Result<()>>>,
    global_health_task: Option<JoinHandle<std::io::Result<()>>>,
    push_task: JoinHandle<()>,
    gateway_dns_task: Option<JoinHandle<()>>,
    /// the gateway probes' latest report (the mesh config has `gatewayProbes`)
    pub gateway_probes: Option<watch::Receiver<Arc<crate::liveness::Report>>>,
    gateway_probes_task: Option<JoinHandle<()>>,
    /// reloads the gateway probes' own client certificate (`gatewayProbes.mtls.certFile`)
    gateway_probes_cert_task: Option<JoinHandle<()>>,
    /// the last-known state's tap and writer (the mesh config has `lastKnownState`)
    last_known_tasks: Vec<JoinHandle<()>>,
    last_known: Option<Arc<LastKnown>>,
    /// the mesh config's watcher (`meshfed serve --mesh-config`)
    _config_watch: Option<crate::config_watch::ConfigWatch>,
    /// the `TrafficPolicy` custom resource's watch (mesh config `trafficPolicy`)
    _traffic_policy: Option<crate::traffic_policy::watch::TrafficPolicyWatch>,
    _abort_recorder: Option<crate::traffic_policy::abort_record::AbortRecorder>,
    /// the sources run as long as these are held
    _files: Option<crate::source::files::FileSourceHandle>,
    _kube: Option<crate::source::kube::KubeSource>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("xds", &self.xds_addresses).field("debug", &self.debug_address).finish()
    }
}

impl App {
    /// Starts meshfed: the sources (their initial state queued first), the push loop, the debug server, and
    /// — once the first snapshot is published — the xDS listeners.
    pub async fn start(options: Options) -> Result<App, Error> {
        let Options {
            mesh,
            sources,
            xds,
            debug,
            gateway_dns_interval,
            mesh_certificate,
            global_health,
            watch_mesh_config,
        } = options;
        // the gateway probes' mTLS stage is checked before anything starts: a missing or bad certificate is
        // fatal at start
        let mut gateway_probes_cert = None;
        let mtls_probes = match mesh.gateway_probes.as_ref().and_then(|g| g.mtls.as_ref()) {
            None => None,
            Some(m) => {
                let (probes, own_cert) =
                    crate::liveness::probe::MtlsProbes::new(m, &mesh.trust_domain, mesh_certificate.as_ref())
                        .map_err(Error::GatewayProbes)?;
                gateway_probes_cert = own_cert;
                Some(probes)
            }
        };
        let (events, mut events_rx) = mpsc::unbounded_channel();
        let clusters = ClusterHealth::new(mesh.unreachable_grace_period);
        // The last-known state: restored clusters are queued for the push loop before any source starts;
        // the sources' events reach the push loop through the store's tap.
        let last_known = mesh.last_known_state.as_ref().map(|config| {
            let (store, restored) = LastKnown::open(config, &mesh, &clusters, SystemTime::now());
            let (push_tx, push_rx) = mpsc::unbounded_channel();
            for e in restored {
                let _ = push_tx.send(e);
            }
            (Arc::new(store), push_tx, push_rx)
        });
        let cli_allow_exec_auth = matches!(sources, Sources::Mesh { allow_exec_auth: true });
        let (files, kube) = match sources {
            Sources::Events(initial) => {
                for e in initial {
                    let _ = events.send(e);
                }
                (None, None)
            }
            Sources::Mesh { allow_exec_auth } => {
                let files = crate::source::files::run_with_health(&mesh, events.clone(), clusters.clone()).await?;
                // Kubernetes clusters' initial lists are queued too; an unreachable one delays readiness by
                // at most readyTimeout and joins when it syncs.
                let mut kube_options = crate::source::kube::KubeOptions::from_mesh(&mesh);
                kube_options.allow_exec_auth |= allow_exec_auth;
                let kube = crate::source::kube::start(&mesh, kube_options, events.clone(), clusters.clone());
                if !kube.is_empty() {
                    let timed_out = kube.wait_ready(mesh.ready_timeout).await;
                    info!(timed_out = ?timed_out, "Kubernetes clusters' initial lists done");
                }
                (Some(files), Some(kube))
            }
        };
        let mut last_known_tasks = Vec::new();
        let last_known_store = last_known.as_ref().map(|(store, _, _)| store.clone());
        let push_events = match last_known {
            None => events_rx,
            Some((store, push_tx, push_rx)) => {
                // what the sources queued so far goes through the tap now, so the push loop's first
                // snapshot holds it; the rest as it comes
                while let Ok(e) = events_rx.try_recv() {
                    store.observe(&e, SystemTime::now());
                    let _ = push_tx.send(e);
                }
                last_known_tasks.push(tokio::spawn(tap(events_rx, push_tx, store.clone())));
                last_known_tasks.push(tokio::spawn(store.run_writer()));
                push_rx
            }
        };
        // the traffic state a restart must not lose (failover, drill aborts) is kept in the last-known state
        let restored_traffic = last_known_store.as_ref().map(|s| s.restored_traffic()).unwrap_or_default();
        let (push, push_task) = crate::push::start(&mesh, push_events, restored_traffic);
        if let Some(store) = &last_known_store {
            last_known_tasks.push(tokio::spawn(keep_traffic_state(push.subscribe(), store.clone())));
        }
        let connections = Arc::new(Connections::default());
        let gateway_dns_task =
            gateway_dns_interval.map(|every| tokio::spawn(crate::gateway_dns::run(push.clone(), every)));
        let (gateway_probes, gateway_probes_task) = match &mesh.gateway_probes {
            None => (None, None),
            Some(config) => {
                let (targets, verdicts, mut first) = (push.clone(), push.clone(), push.subscribe());
                let (report, task) = crate::liveness::probe::start(
                    config.clone(),
                    mtls_probes,
                    async move {
                        let _ = first.wait_for(|s| s.generation > 0).await;
                    },
                    move || targets.snapshot().gateway_addresses.as_ref().clone(),
                    move |verdict| verdicts.set_gateway_verdict(verdict),
                );
                info!(?config, "probing the east-west gateways");
                (Some(report), Some(task))
            }
        };
        // one owner decides which traffic policy is in force: the file's `traffic:` or the custom resource
        let traffic_owner = crate::traffic_policy::owner::TrafficOwner::new(push.clone(), mesh.traffic.clone());
        let config_watch = match (&mesh.path, watch_mesh_config) {
            (Some(path), true) => {
                Some(crate::config_watch::start(path, mesh.clone(), push.clone(), traffic_owner.clone()))
            }
            _ => None,
        };
        let traffic_policy = mesh.traffic_policy.as_ref().and_then(|reference| {
            let cluster = mesh.clusters.iter().find(|c| c.id == reference.cluster)?;
            let client = crate::source::kube::ClientSpec::from_source(&cluster.source)?;
            info!(cluster = %reference.cluster, namespace = %reference.namespace, name = %reference.name, "watching the TrafficPolicy custom resource");
            Some(crate::traffic_policy::watch::TrafficPolicyWatch::spawn(
                client,
                mesh.allow_exec_auth || cli_allow_exec_auth,
                reference.clone(),
                mesh.clusters.iter().map(|c| c.id.clone()).collect(),
                mesh.remote_secrets.is_some(),
                traffic_owner.clone(),
            ))
        });
        // drill aborts recorded in the custom resource (while it is the policy in force)
        let abort_recorder = mesh.traffic_policy.as_ref().and_then(|reference| {
            let cluster = mesh.clusters.iter().find(|c| c.id == reference.cluster)?;
            let client = crate::source::kube::ClientSpec::from_source(&cluster.source)?;
            Some(crate::traffic_policy::abort_record::AbortRecorder::spawn(
                client,
                mesh.allow_exec_auth || cli_allow_exec_auth,
                reference.clone(),
                traffic_owner.clone(),
                push.clone(),
            ))
        });
        if let Some(w) = &traffic_policy {
            // a replica (re)starting serves the policy in force, not the file's, when the object can be read
            let mut listed = w.listed();
            if tokio::time::timeout(mesh.ready_timeout, listed.wait_for(|l| *l)).await.is_err() {
                warn!(timeout = ?mesh.ready_timeout, "the TrafficPolicy custom resource could not be read yet; serving meanwhile");
            }
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|v| *v).await;
        };

        let mut debug_address = None;
        let debug_task = match debug {
            None => None,
            Some(DebugListener { listen, access, demo }) => {
                let addr = listen.address().unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
                let listener = listen.bind().await.map_err(|source| Error::Bind { what: "debug", addr, source })?;
                debug_address = listener.local_addr().ok();
                let state = DebugState {
                    push: push.clone(),
                    connections: connections.clone(),
                    source_errors: source_errors(files.as_ref(), &clusters),
                    clusters: clusters.clone(),
                    gateway_probes: gateway_probes.clone(),
                    mesh_config: config_watch.as_ref().map(|w| w.subscribe()),
                    traffic_policy: traffic_policy.as_ref().map(|w| w.subscribe()),
                    demo,
                };
                info!(address = ?debug_address, "debug server listening");
                Some(tokio::spawn(crate::debug::serve_with(listener, state, access, stopped(shutdown_rx.clone()))))
            }
        };

        let mut global_health_address = None;
        let global_health_task = match global_health {
            None => None,
            Some(listen) => {
                let addr = listen.address().unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
                let listener =
                    listen.bind().await.map_err(|source| Error::Bind { what: "global health", addr, source })?;
                global_health_address = listener.local_addr().ok();
                info!(address = ?global_health_address, "global health endpoint listening");
                Some(tokio::spawn(crate::global_health::serve(listener, push.clone(), stopped(shutdown_rx.clone()))))
            }
        };

        // Serve xDS once the first full state is built: a proxy never sees a partial mesh.
        push.subscribe().wait_for(|s| s.generation > 0).await.map_err(|_| Error::PushLoop)?;
        let debug_types = crate::debug::config_dump::AdsDebug { connections: connections.clone(), push: push.clone() };
        let ads = crate::xds::AdsService::new(push.clone(), connections.clone()).with_debug(Arc::new(debug_types));
        let mut xds_addresses = Vec::new();
        let mut xds_tasks = Vec::new();
        for XdsListener { listen, options } in xds {
            let addr = listen.address().unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
            let listener = listen.bind_xds().map_err(|source| Error::Bind { what: "xDS", addr, source })?;
            let local = listener.local_addr().unwrap_or(addr);
            info!(address = %local, tls = options.tls.is_some(), "xDS server listening");
            xds_addresses.push(local);
            xds_tasks.push(tokio::spawn(crate::xds::server::serve(
                listener,
                ads.clone(),
                options,
                stopped(shutdown_rx.clone()),
            )));
        }
        let gateway_probes_cert_task = gateway_probes_cert
            .map(|c| crate::tls::watch_files(c, crate::tls::DEFAULT_RELOAD_INTERVAL, "gateway probes (client)"));
        Ok(App {
            push,
            connections,
            clusters,
            events,
            xds_addresses,
            debug_address,
            global_health_address,
            shutdown,
            xds_tasks,
            debug_task,
            global_health_task,
            push_task,
            gateway_dns_task,
            gateway_probes,
            gateway_probes_task,
            gateway_probes_cert_task,
            last_known_tasks,
            last_known: last_known_store,
            _config_watch: config_watch,
            _traffic_policy: traffic_policy,
            _abort_recorder: abort_recorder,
            _files: files,
            _kube: kube,
        })
    }

    /// The address of the first xDS listener.
    ///
    /// # Panics
    /// When the app was started without xDS listeners.
    pub fn xds_address(&self) -> SocketAddr {
        self.xds_addresses[0]
    }

    /// Every xDS listener's address, in the order of [`Options::xds`].
    pub fn xds_addresses(&self) -> &[SocketAddr] {
        &self.xds_addresses
    }

    pub fn debug_address(&self) -> Option<SocketAddr> {
        self.debug_address
    }

    /// The global DNS health endpoint's address ([`Options::global_health`]).
    pub fn global_health_address(&self) -> Option<SocketAddr> {
        self.global_health_address
    }

    /// Waits until a snapshot newer than `generation` is published; returns its generation.
    pub async fn wait_generation_after(&self, generation: u64) -> u64 {
        let mut rx = self.push.subscribe();
        match rx.wait_for(|s| s.generation > generation).await {
            Ok(s) => s.generation,
            Err(_) => generation,
        }
    }

    /// Stops: the xDS listeners stop accepting, send GOAWAY, end their streams with UNAVAILABLE and wait up to
    /// their drain timeout for the connections to close (bounded here by `drain_timeout` + 2 s); then the
    /// debug server, the push loop and the sources stop. The last-known state is written a last time if
    /// something is due.
    pub async fn shutdown(mut self, drain_timeout: Duration) {
        let _ = self.shutdown.send(true);
        let xds = std::mem::take(&mut self.xds_tasks);
        let debug = self.debug_task.take();
        let global_health = self.global_health_task.take();
        let _ = tokio::time::timeout(drain_timeout + Duration::from_secs(2), async {
            for t in xds {
                if let Ok(Err(e)) = t.await {
                    error!("{e}");
                }
            }
            if let Some(t) = debug {
                let _ = t.await;
            }
            if let Some(t) = global_health {
                let _ = t.await;
            }
        })
        .await;
        if let Some(store) = self.last_known.take() {
            let written = tokio::task::spawn_blocking(move || store.write_now(SystemTime::now())).await;
            if let Ok(Err(e)) = written {
                error!("{e}");
            }
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in &self.xds_tasks {
            t.abort();
        }
        if let Some(t) = &self.debug_task {
            t.abort();
        }
        if let Some(t) = &self.global_health_task {
            t.abort();
        }
        if let Some(t) = &self.gateway_dns_task {
            t.abort();
        }
        if let Some(t) = &self.gateway_probes_task {
            t.abort();
        }
        if let Some(t) = &self.gateway_probes_cert_task {
            t.abort();
        }
        for t in &self.last_known_tasks {
            t.abort();
        }
        self.push_task.abort();
    }
}

/// Hands the push loop's durable traffic state (the failover state, the drills' aborts:
/// [`crate::traffic::Durable`]) to the last-known store whenever a snapshot is published.
async fn keep_traffic_state(mut snapshots: watch::Receiver<Arc<crate::cache::Snapshot>>, store: Arc<LastKnown>) {
    loop {
        let traffic = snapshots.borrow_and_update().traffic.durable();
        store.set_traffic(&traffic);
        if snapshots.changed().await.is_err() {
            return;
        }
    }
}

/// The last-known state's tap: every source event is observed, then handed to the push loop, in order; restored
/// state that reaches `maxAge` before its cluster answers is dropped then (an empty `Sync`).
async fn tap(
    mut events: mpsc::UnboundedReceiver<SourceEvent>,
    push: mpsc::UnboundedSender<SourceEvent>,
    store: Arc<LastKnown>,
) {
    loop {
        // restored state reaching maxAge before its cluster answers is dropped then
        let expiry = store.next_expiry().map(|at| {
            let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::Instant::now() + wait.min(Duration::from_secs(24 * 3600))
        });
        tokio::select! {
            e = events.recv() => {
                let Some(e) = e else { return };
                store.observe(&e, SystemTime::now());
                if push.send(e).is_err() {
                    return;
                }
            }
            () = async { tokio::time::sleep_until(expiry.unwrap_or_else(tokio::time::Instant::now)).await }, if expiry.is_some() => {
                for cluster in store.expire_restored(SystemTime::now()) {
                    if push.send(SourceEvent::Sync { cluster, objects: Vec::new() }).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// The sources' current problems for the debug surface: the file source's parse errors, then the
/// Kubernetes sources' (the file source reports its own clusters' errors above).
fn source_errors(
    files: Option<&crate::source::files::FileSourceHandle>,
    clusters: &ClusterHealth,
) -> Arc<dyn Fn() -> Vec<String> + Send + Sync> {
    let files_errors = files.map(|f| f.subscribe_errors());
    let health = clusters.clone();
    Arc::new(move || {
        let mut errors: Vec<String> =
            files_errors.as_ref().map(|rx| rx.borrow().iter().map(|e| e.to_string()).collect()).unwrap_or_default();
        errors.extend(health.errors_where(|s| !s.source.starts_with("manifests:")));
        errors
    })
}
