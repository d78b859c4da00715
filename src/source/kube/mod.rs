//! The Kubernetes source: each cluster's objects come from its API server, watched with kube-rs.
//!
//! Per cluster, one task runs a [`watcher`] per kind meshfed reads (Namespaces, Services,
//! EndpointSlices, Pods that are not Failed, Nodes, and Istio DestinationRules when that CRD is
//! installed), plus a reachability probe (`GET /version`). Objects are converted with the same
//! converters as manifest files ([`TopologyObject::from_kube`]) and only their compact forms are kept
//! (the full objects, managedFields and all, are dropped at once), in a reflector-like store per kind.
//! What reaches the registry (the same channel the file source uses):
//!
//! - a [`SourceEvent::Sync`] of all the cluster's objects once every kind has been listed, and again
//!   whenever one kind is relisted (after a 410 Gone, or when the API comes back): the registry then
//!   reconciles exactly, so objects deleted meanwhile go and nothing is duplicated;
//! - [`SourceEvent::Upsert`] / [`SourceEvent::Delete`] for watch events in between;
//! - [`SourceEvent::ClusterReachability`] when the API server stops or starts answering. The objects are
//!   kept: an unreachable cluster's last-known endpoints keep being served, and the push loop demotes them
//!   after the grace period.
//!
//! An object that cannot be converted (a malformed or invalid one) is reported in [`ClusterHealth`]
//! (`objectErrors`) and its last good version, if any, is kept; the rest of the cluster is unaffected.
//!
//! ## Backoff and recovery
//!
//! kube-rs's default backoff resets on every `Ok` item, and a failing initial list emits an `Ok(Init)`
//! before each attempt, so an unreachable cluster would be retried about once a second forever. Here each
//! kind's watcher waits [`WATCH_BACKOFF`] after an error: 1 s doubling to 30 s, ±20% jitter, reset only
//! when a list completes (`InitDone`). While any request fails, the cluster's probe asks `GET /version`
//! with [`PROBE_BACKOFF`] (0.5 s doubling to 5 s, ±20%); the first answer wakes every waiting watcher at
//! once. So after an API server comes back, meshfed retries within at most [`MAX_RECOVERY_DELAY`]
//! (6 s) whatever the outage's length, and then reconciles with one watch (replaying what changed) or
//! one relist; healthy clusters are probed every [`PROBE_INTERVAL`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::mesh_config::{ClusterSource, MeshConfig};
use crate::model::ClusterId;
use crate::source::{ClusterHealth, SourceEvent, SyncState};
use crate::topology::{self, KubeObject, ObjectKey, TopologyObject};

/// Backoff of a kind's watcher after an error (reset when a list completes).
pub const WATCH_BACKOFF: BackoffPolicy =
    BackoffPolicy { initial: Duration::from_secs(1), max: Duration::from_secs(30), jitter: 0.2 };
/// Backoff of the reachability probe while the API server does not answer.
pub const PROBE_BACKOFF: BackoffPolicy =
    BackoffPolicy { initial: Duration::from_millis(500), max: Duration::from_secs(5), jitter: 0.2 };
/// Probe interval while the API server answers.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// Cap of one probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest meshfed waits, after a cluster's API server answers again, before retrying its watches:
/// the probe's largest delay with jitter.
pub const MAX_RECOVERY_DELAY: Duration = Duration::from_secs(6);
/// Connect timeout of the clients (an unreachable address fails in this time rather than the OS's).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a DestinationRule CRD that is not installed is looked for again.
pub const ABSENT_CRD_RECHECK: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A kubeconfig file cannot be read or parsed.
    #[error("cannot read kubeconfig {}: {source}", .path.display())]
    ReadKubeconfig { path: PathBuf, source: kube::config::KubeconfigError },
    /// A kubeconfig cannot be parsed or used (no such context, bad certificate data...).
    #[error("invalid kubeconfig: {0}")]
    Kubeconfig(#[source] kube::config::KubeconfigError),
    /// A kubeconfig user runs a command or an auth plugin, which is refused unless allowed.
    #[error(
        "kubeconfig user {user:?} authenticates with {mechanism}, which meshfed refuses by default (as Istio does): \
         use a service account token instead, or allow it with `allowExecAuth: true` in the mesh config or --allow-exec-auth"
    )]
    ExecAuth { user: String, mechanism: &'static str },
    /// A kubeconfig from a remote secret names a file on meshfed's file system.
    #[error(
        "kubeconfig {what} {name:?} refers to a local file ({field}), which a remote secret may not do: embed the data instead"
    )]
    FileReference { what: &'static str, name: String, field: &'static str },
    /// The in-cluster configuration (service account token, KUBERNETES_SERVICE_HOST) is not available.
    #[error("in-cluster config: {0}")]
    InCluster(#[source] kube::config::InClusterError),
    /// The client cannot be built from the configuration.
    #[error("cannot create a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

// ---- backoff ----

/// Exponential backoff: `initial` doubling up to `max`, each delay scaled by a random factor in
/// `1 ± jitter`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub jitter: f64,
}

impl BackoffPolicy {
    /// The largest delay this policy can produce.
    pub fn max_delay(&self) -> Duration {
        self.max.mul_f64(1.0 + self.jitter)
    }
}

/// The state of a [`BackoffPolicy`].
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: BackoffPolicy,
    current: Option<Duration>,
    rng: u64,
}

impl Backoff {
    pub fn new(policy: BackoffPolicy) -> Backoff {
        // a different jitter sequence per instance (no need for a cryptographic source)
        static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQUENCE.fetch_add(0x9e37_79b9_7f4a_7c15, std::sync::atomic::Ordering::Relaxed);
        let seed = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        Backoff { policy, current: None, rng: (seed ^ n) | 1 }
    }

    /// The next delay (the un-jittered delay doubles each time, up to the policy's max).
    pub fn next_delay(&mut self) -> Duration {
        let base = match self.current {
            None => self.policy.initial,
            Some(c) => (c * 2).min(self.policy.max),
        };
        self.current = Some(base);
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
        base.mul_f64(1.0 + self.policy.jitter * (2.0 * r - 1.0))
    }

    /// Back to the initial delay.
    pub fn reset(&mut self) {
        self.current = None;
    }
}

// ---- clients ----

/// How to reach one cluster's API server.
#[derive(Clone, Debug)]
pub enum ClientSpec {
    /// a kubeconfig file (read when the cluster starts, and again after a failure)
    File { path: PathBuf, context: Option<String> },
    /// the pod's service account
    InCluster,
    /// a kubeconfig held in memory (a remote secret): no exec or auth-provider unless allowed, and no
    /// references to local files
    Inline { kubeconfig: Box<Kubeconfig>, context: Option<String> },
}

impl ClientSpec {
    pub fn from_source(source: &ClusterSource) -> Option<ClientSpec> {
        match source {
            ClusterSource::Manifests(_) => None,
            ClusterSource::Kubeconfig { path, context } => {
                Some(ClientSpec::File { path: path.clone(), context: context.clone() })
            }
            ClusterSource::InCluster => Some(ClientSpec::InCluster),
        }
    }

    /// Whether a failure to build a client may go away by itself (a file being fixed).
    fn retryable(&self) -> bool {
        !matches!(self, ClientSpec::Inline { .. })
    }
}

/// Refuses kubeconfigs whose users run commands (`exec`) or auth plugins (`auth-provider`) unless
/// `allow_exec`, and (with `allow_files: false`, for remote secrets) any reference to a local file.
pub fn check_kubeconfig(kc: &Kubeconfig, allow_exec: bool, allow_files: bool) -> Result<(), Error> {
    for user in &kc.auth_infos {
        let Some(a) = &user.auth_info else { continue };
        if !allow_exec {
            if a.exec.is_some() {
                return Err(Error::ExecAuth { user: user.name.clone(), mechanism: "exec (a command)" });
            }
            if a.auth_provider.is_some() {
                return Err(Error::ExecAuth { user: user.name.clone(), mechanism: "an auth-provider plugin" });
            }
        }
        if !allow_files {
            for (field, set) in [
                ("tokenFile", a.token_file.is_some()),
                ("client-certificate", a.client_certificate.is_some()),
                ("client-key", a.client_key.is_some()),
            ] {
                if set {
                    return Err(Error::FileReference { what: "user", name: user.name.clone(), field });
                }
            }
        }
    }
    if !allow_files {
        for c in &kc.clusters {
            if c.cluster.as_ref().is_some_and(|c| c.certificate_authority.is_some()) {
                return Err(Error::FileReference {
                    what: "cluster",
                    name: c.name.clone(),
                    field: "certificate-authority",
                });
            }
        }
    }
    Ok(())
}

/// Builds a client for `spec` (see [`check_kubeconfig`] for what is refused).
pub async fn build_client(spec: &ClientSpec, allow_exec: bool) -> Result<kube::Client, Error> {
    build_guarded_client(spec, allow_exec, WatchCuts::new()).await
}

/// [`build_client`], with its watch requests going through `cuts` (see [`WatchCuts`]).
async fn build_guarded_client(
    spec: &ClientSpec,
    allow_exec: bool,
    cuts: Arc<WatchCuts>,
) -> Result<kube::Client, Error> {
    let mut config = match spec {
        ClientSpec::File { path, context } => {
            let kc =
                Kubeconfig::read_from(path).map_err(|source| Error::ReadKubeconfig { path: path.clone(), source })?;
            check_kubeconfig(&kc, allow_exec, true)?;
            let options = KubeConfigOptions { context: context.clone(), ..Default::default() };
            kube::Config::from_custom_kubeconfig(kc, &options).await.map_err(Error::Kubeconfig)?
        }
        ClientSpec::InCluster => kube::Config::incluster().map_err(Error::InCluster)?,
        ClientSpec::Inline { kubeconfig, context } => {
            check_kubeconfig(kubeconfig, allow_exec, false)?;
            let options = KubeConfigOptions { context: context.clone(), ..Default::default() };
            kube::Config::from_custom_kubeconfig((**kubeconfig).clone(), &options).await.map_err(Error::Kubeconfig)?
        }
    };
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    // retries are ours (capped, jittered backoff; see the module doc), not the client's per request
    config.default_retry = false;
    let builder = kube::client::ClientBuilder::try_from(config).map_err(Error::Client)?;
    Ok(builder.with_layer(&WatchGuardLayer { cuts }).build())
}

// ---- watch streams cut short ----

/// Watch streams of one cluster that end in an error (the connection dropped mid-body, without the
/// chunked body's end; possibly mid-way through an event line). kube-rs treats such an end as a watch
/// that timed out and watches again at once, without telling its caller, so an API server (or a proxy in
/// front of it) that keeps cutting watches would be asked again in a tight loop, and nothing would show
/// that the cluster's changes no longer arrive. Every watch request of the cluster's client passes
/// through [`WatchGuardLayer`], which records cuts here, per resource (its plural): a watch of a
/// resource whose last watch was cut waits [`WATCH_BACKOFF`] first, and the cut is reported as the
/// kind's watch error (in the cluster's `lastError`) until a watch of it delivers a whole line again.
/// Deliveries are also what clears a kind's earlier watch error (say, from the API server being down)
/// when its watch resumes without a relist and nothing changes (only BOOKMARKs arrive).
#[derive(Debug)]
pub struct WatchCuts {
    state: std::sync::Mutex<BTreeMap<String, CutState>>,
    /// resources whose watches delivered a whole line since [`Self::take_delivered`]
    delivered: std::sync::Mutex<BTreeSet<String>>,
    /// bumped when an error appears or clears, or a resource is added to `delivered`
    changed: watch::Sender<u64>,
}

#[derive(Debug)]
struct CutState {
    backoff: Backoff,
    error: Option<String>,
}

impl WatchCuts {
    pub fn new() -> Arc<WatchCuts> {
        Arc::new(WatchCuts {
            state: std::sync::Mutex::default(),
            delivered: std::sync::Mutex::default(),
            changed: watch::channel(0).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, CutState>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long a new watch of `plural` waits first (its last watch was cut).
    fn delay(&self, plural: &str) -> Option<Duration> {
        let mut st = self.lock();
        let s = st.get_mut(plural)?;
        s.error.is_some().then(|| s.backoff.next_delay())
    }

    fn cut(&self, plural: &str, error: String) {
        let mut st = self.lock();
        let s = st
            .entry(plural.to_string())
            .or_insert_with(|| CutState { backoff: Backoff::new(WATCH_BACKOFF), error: None });
        if s.error.is_none() {
            warn!(resource = plural, %error, "watch stream cut short; watching again after a backoff");
        }
        s.error = Some(error);
        drop(st);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn delivered(&self, plural: &str) {
        let mut changed = false;
        if let Some(s) = self.lock().get_mut(plural)
            && s.error.take().is_some()
        {
            s.backoff.reset();
            changed = true;
        }
        changed |= self.delivered.lock().unwrap_or_else(|e| e.into_inner()).insert(plural.to_string());
        if changed {
            self.changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// The kinds whose watches delivered a whole line since the last call.
    fn take_delivered(&self) -> Vec<WatchedKind> {
        let plurals = std::mem::take(&mut *self.delivered.lock().unwrap_or_else(|e| e.into_inner()));
        WatchedKind::ALL.into_iter().filter(|k| plurals.contains(&k.api_resource().plural)).collect()
    }

    /// The current errors, as `Kind watch: ...` lines.
    fn errors(&self) -> Vec<String> {
        let st = self.lock();
        st.iter()
            .filter_map(|(plural, s)| {
                let e = s.error.as_ref()?;
                let kind = WatchedKind::ALL
                    .iter()
                    .find(|k| k.api_resource().plural == *plural)
                    .map_or(plural.as_str(), |k| k.name());
                Some(format!("{kind} watch: the API server cut the watch stream short ({e})"))
            })
            .collect()
    }
}

/// The plural of a watch request (`...?watch=true` or `watch=1`), None for other requests.
fn watch_resource(uri: &http::Uri) -> Option<String> {
    let watching = uri.query()?.split('&').any(|kv| kv == "watch=true" || kv == "watch=1");
    watching.then(|| uri.path().rsplit('/').next().unwrap_or_default().to_string())
}

/// See [`WatchCuts`].
#[derive(Clone, Debug)]
struct WatchGuardLayer {
    cuts: Arc<WatchCuts>,
}

impl<S> tower::Layer<S> for WatchGuardLayer {
    type Service = WatchGuard<S>;

    fn layer(&self, inner: S) -> WatchGuard<S> {
        WatchGuard { inner, cuts: self.cuts.clone() }
    }
}

struct WatchGuard<S> {
    inner: S,
    cuts: Arc<WatchCuts>,
}

impl<S, B> tower::Service<http::Request<kube::client::Body>> for WatchGuard<S>
where
    S: tower::Service<http::Request<kube::client::Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    type Response = http::Response<WatchBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let resource = watch_resource(req.uri());
        let delay = resource.as_deref().and_then(|r| self.cuts.delay(r));
        // the inner future does nothing until polled: the request waits out the delay
        let response = self.inner.call(req);
        let cuts = self.cuts.clone();
        Box::pin(async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            let response = response.await?;
            Ok(response.map(|inner| WatchBody { inner, watch: resource.map(|r| (r, cuts)) }))
        })
    }
}

/// A response body; for a watch, reports a cut (the body failing) and delivery (a whole line).
struct WatchBody<B> {
    inner: B,
    watch: Option<(String, Arc<WatchCuts>)>,
}

impl<B> http_body::Body for WatchBody<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, B::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some((resource, cuts)) = &this.watch {
            match &frame {
                Some(Ok(f)) if f.data_ref().is_some_and(|d| d.contains(&b'\n')) => cuts.delivered(resource),
                Some(Err(e)) => cuts.cut(resource, e.to_string()),
                _ => {}
            }
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

// ---- the kinds ----

/// A kind meshfed watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WatchedKind {
    Namespace,
    Node,
    Service,
    EndpointSlice,
    Pod,
    DestinationRule,
}

impl WatchedKind {
    pub const ALL: [WatchedKind; 6] = [
        WatchedKind::Namespace,
        WatchedKind::Node,
        WatchedKind::Service,
        WatchedKind::EndpointSlice,
        WatchedKind::Pod,
        WatchedKind::DestinationRule,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WatchedKind::Namespace => "Namespace",
            WatchedKind::Node => "Node",
            WatchedKind::Service => "Service",
            WatchedKind::EndpointSlice => "EndpointSlice",
            WatchedKind::Pod => "Pod",
            WatchedKind::DestinationRule => "DestinationRule",
        }
    }

    fn topology_kind(self) -> topology::Kind {
        match self {
            WatchedKind::Namespace => topology::Kind::Namespace,
            WatchedKind::Node => topology::Kind::Node,
            WatchedKind::Service => topology::Kind::Service,
            WatchedKind::EndpointSlice => topology::Kind::EndpointSlice,
            WatchedKind::Pod => topology::Kind::Pod,
            WatchedKind::DestinationRule => topology::Kind::DestinationRule,
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, WatchedKind::Namespace | WatchedKind::Node)
    }

    pub fn api_resource(self) -> ApiResource {
        match self {
            WatchedKind::Namespace => ApiResource::erase::<Namespace>(&()),
            WatchedKind::Node => ApiResource::erase::<Node>(&()),
            WatchedKind::Service => ApiResource::erase::<Service>(&()),
            WatchedKind::EndpointSlice => ApiResource::erase::<EndpointSlice>(&()),
            WatchedKind::Pod => ApiResource::erase::<Pod>(&()),
            WatchedKind::DestinationRule => ApiResource {
                group: "networking.istio.io".into(),
                version: "v1".into(),
                api_version: "networking.istio.io/v1".into(),
                kind: "DestinationRule".into(),
                plural: "destinationrules".into(),
            },
        }
    }

    /// The watcher configuration: Failed pods are filtered by the API server (istiod ignores them).
    pub fn watcher_config(self) -> watcher::Config {
        match self {
            WatchedKind::Pod => watcher::Config::default().fields("status.phase!=Failed"),
            _ => watcher::Config::default(),
        }
    }

    /// Whether the kind may not be served at all (a CRD that is not installed): a 404 then means "none".
    fn optional(self) -> bool {
        self == WatchedKind::DestinationRule
    }

    /// The key of an object from its metadata (for deletes and errors; no conversion).
    fn key(self, obj: &DynamicObject) -> Option<ObjectKey> {
        let name = obj.metadata.name.as_deref().filter(|n| !n.is_empty())?;
        let namespace = if self.namespaced() {
            obj.metadata.namespace.as_deref().filter(|n| !n.is_empty()).unwrap_or("default")
        } else {
            ""
        };
        Some(ObjectKey { kind: self.topology_kind(), namespace: namespace.into(), name: name.into() })
    }

    /// Converts an object with the same converters as manifest files. `Ok(None)`: not used.
    pub fn convert(self, obj: &DynamicObject) -> Result<Option<TopologyObject>, String> {
        match self {
            WatchedKind::Namespace => convert_typed::<Namespace>(obj),
            WatchedKind::Node => convert_typed::<Node>(obj),
            WatchedKind::Service => convert_typed::<Service>(obj),
            WatchedKind::EndpointSlice => convert_typed::<EndpointSlice>(obj),
            WatchedKind::Pod => convert_typed::<Pod>(obj),
            WatchedKind::DestinationRule => {
                let mut value = serde_json::to_value(obj).map_err(|e| e.to_string())?;
                if let serde_json::Value::Object(m) = &mut value {
                    m.insert("apiVersion".into(), "networking.istio.io/v1".into());
                    m.insert("kind".into(), "DestinationRule".into());
                }
                let yaml = serde_yaml::to_value(&value).map_err(|e| e.to_string())?;
                topology::DestinationRuleInfo::from_value(yaml).map(|d| Some(TopologyObject::DestinationRule(d)))
            }
        }
    }
}

fn describe(kind: WatchedKind, key: Option<&ObjectKey>) -> String {
    match key {
        Some(k) if k.namespace.is_empty() => format!("{} {}", kind.name(), k.name),
        Some(k) => format!("{} {}/{}", kind.name(), k.namespace, k.name),
        None => format!("{} <no name>", kind.name()),
    }
}

fn convert_typed<K>(obj: &DynamicObject) -> Result<Option<TopologyObject>, String>
where
    K: KubeObject + k8s_openapi::Resource,
{
    let mut value = serde_json::to_value(obj).map_err(|e| e.to_string())?;
    if let serde_json::Value::Object(m) = &mut value {
        m.insert("apiVersion".into(), <K as k8s_openapi::Resource>::API_VERSION.into());
        m.insert("kind".into(), <K as k8s_openapi::Resource>::KIND.into());
    }
    let typed: K = serde_path_to_error::deserialize(value).map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
    TopologyObject::from_kube(&typed).map_err(|e| match e {
        // the converter's message names the kind and object already
        topology::Error::Invalid { field, reason, .. } => format!("{field}: {reason}"),
        other => other.to_string(),
    })
}

// ---- one cluster ----

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
                _ = tokio::time::sleep_until(initial_deadline), if !self.initial_sent => {
                    let missing: Vec<&str> =
                        WatchedKind::ALL.iter().filter(|k| !self.listed.contains(k)).map(|k| k.name()).collect();
                    warn!(cluster = %self.id, ?missing, "not every kind listed within the ready timeout; serving what is");
                    self.send_sync();
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
            if complete {
                info!(cluster = %self.id, objects = self.stores.values().map(BTreeMap::len).sum::<usize>(), "cluster synced");
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

// ---- all Kubernetes clusters of a mesh config ----

/// The Kubernetes sources of a mesh config: every cluster with a `kubeconfig` or `inCluster` source,
/// and the clusters of the remote secrets. Dropping it stops every watch.
pub struct KubeSource {
    clusters: Vec<ClusterWatch>,
    secrets: Option<super::remote_secrets::RemoteSecretsWatch>,
    health: ClusterHealth,
}

/// Starts watching every Kubernetes cluster of `mesh` (see [`KubeSource`]); returns at once.
pub fn start(
    mesh: &MeshConfig,
    options: KubeOptions,
    tx: UnboundedSender<SourceEvent>,
    health: ClusterHealth,
) -> KubeSource {
    let mut clusters = Vec::new();
    for c in &mesh.clusters {
        let Some(spec) = ClientSpec::from_source(&c.source) else { continue };
        health.register(&c.id, c.source.describe(), None);
        clusters.push(ClusterWatch::spawn(c.id.clone(), spec, options.clone(), tx.clone(), health.clone()));
    }
    let secrets = mesh.remote_secrets.as_ref().and_then(|rs| {
        let config = mesh.clusters.iter().find(|c| c.id == rs.config_cluster)?;
        let spec = ClientSpec::from_source(&config.source)?;
        let static_ids = mesh.clusters.iter().map(|c| c.id.clone()).collect();
        Some(super::remote_secrets::RemoteSecretsWatch::spawn(
            spec,
            rs.namespace.clone(),
            static_ids,
            options.clone(),
            tx.clone(),
            health.clone(),
        ))
    });
    KubeSource { clusters, secrets, health }
}

impl KubeSource {
    /// Whether there is any Kubernetes cluster or remote secret source.
    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty() && self.secrets.is_none()
    }

    /// Waits until the remote secrets are listed and every Kubernetes cluster known by then has synced (or
    /// was closed), at most `timeout`. Clusters still syncing then are marked [`SyncState::Timeout`] (they
    /// join when they sync) and returned.
    pub async fn wait_ready(&self, timeout: Duration) -> Vec<ClusterId> {
        let deadline = tokio::time::Instant::now() + timeout;
        if let Some(secrets) = &self.secrets {
            let mut listed = secrets.listed();
            let _ = tokio::time::timeout_at(deadline, listed.wait_for(|l| *l)).await;
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let pending = |s: &super::ClusterStatus| !s.source.starts_with("manifests:") && s.sync == SyncState::Syncing;
        self.health.wait_for(remaining, |list| !list.iter().any(pending)).await;
        let mut timed_out = Vec::new();
        for s in self.health.list() {
            if pending(&s) {
                warn!(cluster = %s.id, timeout = ?timeout, "initial list not complete within readyTimeout; ready without it, it joins when it syncs");
                self.health.update(&s.id, |st| {
                    if st.sync == SyncState::Syncing {
                        st.sync = SyncState::Timeout;
                    }
                });
                timed_out.push(s.id);
            }
        }
        timed_out
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn watch_requests_and_cuts_are_recognised() {
        let uri = |s: &str| s.parse::<http::Uri>().unwrap();
        assert_eq!(
            watch_resource(&uri("https://k:6443/apis/discovery.k8s.io/v1/endpointslices?watch=true&resourceVersion=7")),
            Some("endpointslices".into())
        );
        assert_eq!(watch_resource(&uri("/api/v1/namespaces/a/pods?timeoutSeconds=290&watch=1")), Some("pods".into()));
        assert_eq!(watch_resource(&uri("/api/v1/pods?limit=500")), None);
        assert_eq!(watch_resource(&uri("/api/v1/pods?watch=false")), None);

        let cuts = WatchCuts::new();
        assert_eq!(cuts.delay("endpointslices"), None, "no cut, no delay");
        cuts.cut("endpointslices", "error reading a body from connection".into());
        let first = cuts.delay("endpointslices").unwrap();
        let second = cuts.delay("endpointslices").unwrap();
        assert!(first <= WATCH_BACKOFF.initial.mul_f64(1.2) && second > first, "{first:?} then {second:?}");
        assert_eq!(
            cuts.errors(),
            vec![
                "EndpointSlice watch: the API server cut the watch stream short (error reading a body from connection)"
            ]
        );
        assert_eq!(cuts.delay("pods"), None, "per resource");
        cuts.delivered("endpointslices");
        assert!(cuts.errors().is_empty());
        assert_eq!(cuts.delay("endpointslices"), None);
        assert_eq!(cuts.take_delivered(), vec![WatchedKind::EndpointSlice]);
        assert!(cuts.take_delivered().is_empty());
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter_and_resets() {
        let mut b = Backoff::new(WATCH_BACKOFF);
        let bounds = |base: f64| (base * 0.8 - 1e-9, base * 1.2 + 1e-9);
        for base in [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0] {
            let d = b.next_delay().as_secs_f64();
            let (lo, hi) = bounds(base);
            assert!((lo..=hi).contains(&d), "{d} not within {base} ±20%");
        }
        b.reset();
        let d = b.next_delay().as_secs_f64();
        assert!((0.8..=1.2).contains(&d), "{d}");
        assert!(PROBE_BACKOFF.max_delay() <= MAX_RECOVERY_DELAY);
        // jitter differs between instances (not every delay equal)
        let delays: BTreeSet<u128> = (0..8).map(|_| Backoff::new(WATCH_BACKOFF).next_delay().as_nanos()).collect();
        assert!(delays.len() > 1);
    }

    fn kubeconfig(user: &str) -> Kubeconfig {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://example.invalid\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user:\n{user}"
        );
        Kubeconfig::from_yaml(&text).expect("valid kubeconfig")
    }

    #[test]
    fn exec_and_auth_provider_users_are_refused_unless_allowed() {
        let eks = kubeconfig(
            "    exec:\n      apiVersion: client.authentication.k8s.io/v1beta1\n      command: aws\n      args: [eks, get-token, --cluster-name, prod]\n",
        );
        let e = check_kubeconfig(&eks, false, true).unwrap_err().to_string();
        assert!(e.contains("user \"u\" authenticates with exec"), "{e}");
        assert!(e.contains("allowExecAuth"), "{e}");
        assert!(check_kubeconfig(&eks, true, true).is_ok());
        let gcp = kubeconfig("    auth-provider:\n      name: gcp\n");
        assert!(check_kubeconfig(&gcp, false, true).unwrap_err().to_string().contains("auth-provider"));
        let token = kubeconfig("    token: abc\n");
        assert!(check_kubeconfig(&token, false, false).is_ok());
    }

    #[test]
    fn remote_secret_kubeconfigs_may_not_name_local_files() {
        let file = kubeconfig("    tokenFile: /var/run/secrets/token\n");
        let e = check_kubeconfig(&file, false, false).unwrap_err().to_string();
        assert!(e.contains("tokenFile"), "{e}");
        assert!(check_kubeconfig(&file, false, true).is_ok());
    }

    #[test]
    fn mesh_config_kubernetes_sources() {
        let text = "clusters:\n  - id: config\n    network: n1\n    inCluster: true\n  - id: aws\n    network: n2\n    kubeconfig: kc/aws.yaml\n    context: prod\nremoteSecrets:\n  configCluster: config\nreadyTimeout: 5s\nunreachableGracePeriod: 2m\nallowExecAuth: true\n";
        let cfg = MeshConfig::parse(text, Path::new("/etc/meshfed")).expect("valid");
        assert_eq!(cfg.clusters[0].source, ClusterSource::InCluster);
        assert_eq!(
            cfg.clusters[1].source,
            ClusterSource::Kubeconfig { path: "/etc/meshfed/kc/aws.yaml".into(), context: Some("prod".into()) }
        );
        let rs = cfg.remote_secrets.as_ref().expect("remote secrets");
        assert_eq!((rs.config_cluster.as_str(), rs.namespace.as_str()), ("config", "istio-system"));
        assert_eq!(cfg.ready_timeout, Duration::from_secs(5));
        assert_eq!(cfg.unreachable_grace_period, Duration::from_secs(120));
        assert!(cfg.allow_exec_auth);

        let defaults = MeshConfig::parse("clusters: []\n", Path::new(".")).unwrap();
        assert_eq!(
            (defaults.ready_timeout, defaults.unreachable_grace_period),
            (Duration::from_secs(30), Duration::from_secs(60))
        );
        assert!(!defaults.allow_exec_auth && defaults.remote_secrets.is_none());

        for (bad, why) in [
            ("clusters:\n  - id: a\n    network: n\n    manifests: a\n    inCluster: true\n", "more than one source"),
            (
                "clusters:\n  - id: a\n    network: n\n    manifests: a\n    context: x\n",
                "`context` needs `kubeconfig`",
            ),
            (
                "clusters:\n  - id: a\n    network: n\n    manifests: a\nremoteSecrets:\n  configCluster: a\n",
                "must have a Kubernetes source",
            ),
            ("clusters: []\nremoteSecrets:\n  configCluster: x\n", "not a listed cluster"),
            ("clusters: []\nreadyTimeout: soon\n", "readyTimeout"),
        ] {
            let e = MeshConfig::parse(bad, Path::new(".")).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    fn dynamic(value: serde_json::Value) -> DynamicObject {
        serde_json::from_value(value).expect("a Kubernetes object")
    }

    #[test]
    fn conversion_uses_the_file_converters_and_names_bad_objects() {
        let svc = dynamic(serde_json::json!({
            "metadata": {"name": "reviews", "namespace": "shop", "managedFields": [{"manager": "kubectl"}]},
            "spec": {"ports": [{"name": "http", "port": 9080}]},
        }));
        let Ok(Some(TopologyObject::Service(s))) = WatchedKind::Service.convert(&svc) else { panic!("a service") };
        assert_eq!((&*s.namespace, &*s.name, s.ports[0].port), ("shop", "reviews", 9080));

        let bad = dynamic(serde_json::json!({
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": "nine"}]},
        }));
        let e = WatchedKind::Service.convert(&bad).unwrap_err();
        assert!(e.contains("spec.ports[0].port"), "{e}");
        let key = WatchedKind::Service.key(&bad).unwrap();
        assert_eq!(describe(WatchedKind::Service, Some(&key)), "Service shop/reviews");

        let fqdn = dynamic(serde_json::json!({
            "metadata": {"name": "x", "namespace": "shop", "labels": {"kubernetes.io/service-name": "x"}},
            "addressType": "FQDN", "endpoints": [],
        }));
        assert_eq!(WatchedKind::EndpointSlice.convert(&fqdn), Ok(None));

        let node =
            dynamic(serde_json::json!({"metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z"}}}));
        assert_eq!(WatchedKind::Node.key(&node).unwrap().namespace.as_ref(), "");
        assert!(matches!(WatchedKind::Node.convert(&node), Ok(Some(TopologyObject::Node(_)))));

        let dr = dynamic(serde_json::json!({
            "metadata": {"name": "r", "namespace": "shop"},
            "spec": {"host": "reviews", "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 3}}},
        }));
        let Ok(Some(TopologyObject::DestinationRule(d))) = WatchedKind::DestinationRule.convert(&dr) else {
            panic!("a destination rule")
        };
        assert!(d.rule.is_ok(), "{:?}", d.rule);
    }

    #[test]
    fn reachability_drives_demotion_in_the_push_loop() {
        use crate::push::Pusher;
        let mesh = MeshConfig::parse(
            "clusters:\n  - id: a\n    network: n\n    manifests: a\nunreachableGracePeriod: 60s\n",
            Path::new("/nonexistent"),
        )
        .unwrap();
        let (mut pusher, _rx) = Pusher::new(&mesh);
        let a = ClusterId::new("a");
        let svc = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "reviews", "namespace": "shop", "labels": {"app": "reviews"}},
            "spec": {
                "type": "ClusterIP",
                "ports": [{"name": "http", "port": 9080, "protocol": "TCP", "targetPort": 9080}],
                "selector": {"app": "reviews"},
            },
        });
        let slice = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "reviews-a", "namespace": "shop", "labels": {"kubernetes.io/service-name": "reviews"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}],
            "endpoints": [{
                "addresses": ["10.0.0.1"],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": "n1",
            }],
        });
        let objects = vec![
            WatchedKind::Service.convert(&dynamic(svc)).unwrap().unwrap(),
            WatchedKind::EndpointSlice.convert(&dynamic(slice)).unwrap().unwrap(),
        ];
        pusher.apply(SourceEvent::Sync { cluster: a.clone(), objects });
        let t0 = SystemTime::now();
        pusher.apply(SourceEvent::ClusterReachability { cluster: a.clone(), reachable: false, since: t0 });
        assert!(pusher.refresh_demoted(t0 + Duration::from_secs(30)).is_empty(), "within the grace period");
        assert!(pusher.next_demotion().is_some());
        let change = pusher.refresh_demoted(t0 + Duration::from_secs(61));
        assert_eq!(change.services.len(), 1, "{change:?}");
        assert!(pusher.context().demoted_clusters.contains(&a));
        assert!(pusher.next_demotion().is_none(), "already demoted");
        pusher.apply(SourceEvent::ClusterReachability {
            cluster: a.clone(),
            reachable: true,
            since: SystemTime::now(),
        });
        let change = pusher.refresh_demoted(SystemTime::now());
        assert_eq!(change.services.len(), 1);
        assert!(pusher.context().demoted_clusters.is_empty());
    }
}
