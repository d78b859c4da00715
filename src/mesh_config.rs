//! The mesh config file: which clusters form the mesh, where their objects come from, and mesh-wide
//! defaults. YAML, documented in README.md. Relative paths are resolved against the file's directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::model::{ClusterId, NetworkId};
use crate::policy::MeshDefaults;

// at its path from before it moved to `crate::duration` (the CLI names it here)
use crate::duration::parse_duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read mesh config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("mesh config {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("mesh config {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The parsed, validated mesh config.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshConfig {
    /// where it was read from (None for built-in / in-memory configs)
    pub path: Option<PathBuf>,
    /// Kubernetes DNS domain suffix, default `cluster.local`
    pub domain_suffix: String,
    pub clusters: Vec<ClusterConfig>,
    pub debounce: Debounce,
    /// Send endpoints that are not ready (as UNHEALTHY / DRAINING). istiod's default is not to.
    pub send_unhealthy_endpoints: bool,
    /// Mesh-wide traffic policy: outlier detection and locality load balancing for every service that
    /// no DestinationRule (or no rule field) covers.
    pub defaults: MeshDefaults,
    /// SPIFFE trust domain of workload identities (`spiffe://<trustDomain>/ns/NS/sa/SA`)
    pub trust_domain: String,
    /// Discover more clusters from Istio remote secrets in a config cluster (None: none).
    pub remote_secrets: Option<RemoteSecrets>,
    /// How long meshfed waits for the initial list of every Kubernetes cluster before it becomes ready
    /// without the ones that did not answer (they join when they do), default 30 s.
    pub ready_timeout: Duration,
    /// How long a cluster's API server may be unreachable before its last-known endpoints are moved to a
    /// priority below every reachable cluster's, default 60 s.
    pub unreachable_grace_period: Duration,
    /// Accept kubeconfigs whose users run a command (`exec`) or an `auth-provider` plugin. Off by default,
    /// as in Istio (a remote secret could otherwise run commands in meshfed's container).
    pub allow_exec_auth: bool,
    /// `gatewayProbes`: probe every network's east-west gateway addresses and fence networks whose
    /// gateways all fail (None: no probing; API reachability alone demotes clusters).
    pub gateway_probes: Option<GatewayProbes>,
    /// `lastKnownState`: persist the Kubernetes clusters' last good state and serve it at start for the
    /// clusters that cannot be listed yet (None: off; see [`crate::source::last_known`]).
    pub last_known_state: Option<LastKnownState>,
    /// `traffic`: splits between clusters, failover by healthy share, drains ([`crate::traffic`]).
    pub traffic: crate::traffic::TrafficPolicy,
    /// `trafficPolicy`: read the traffic policy from a `TrafficPolicy` custom resource (group
    /// `meshfed.io`) in a Kubernetes cluster instead; while that object exists and is valid it replaces
    /// `traffic` (None: `traffic` alone; see [`crate::traffic_policy::watch`]).
    pub traffic_policy: Option<TrafficPolicyRef>,
}

/// `trafficPolicy`: the `TrafficPolicy` custom resource every replica reads its traffic policy from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficPolicyRef {
    /// a cluster of `clusters` with a Kubernetes source; default `remoteSecrets.configCluster`
    pub cluster: ClusterId,
    /// default `istio-system`
    pub namespace: String,
    /// default `default`
    pub name: String,
}

/// `lastKnownState`: where and how meshfed keeps its last good federated state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastKnownState {
    /// the state file (relative paths resolve against the mesh config's directory), default
    /// `/var/lib/meshfed/last-known.json`
    pub path: PathBuf,
    /// restored state last observed longer ago than this is not served, default 24 h
    pub max_age: Duration,
    /// the file is written at most this often (and only when something changed), default 5 s
    pub write_interval: Duration,
}

/// Default of `lastKnownState.path`.
pub const DEFAULT_LAST_KNOWN_STATE_PATH: &str = "/var/lib/meshfed/last-known.json";

impl Default for LastKnownState {
    fn default() -> Self {
        LastKnownState {
            path: PathBuf::from(DEFAULT_LAST_KNOWN_STATE_PATH),
            max_age: Duration::from_secs(24 * 3600),
            write_interval: Duration::from_secs(5),
        }
    }
}

/// `gatewayProbes`: how meshfed probes the east-west gateways (see [`crate::liveness`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayProbes {
    /// time between the starts of two rounds of probes (jittered by ±10%), default 1 s
    pub interval: Duration,
    /// how long one probe (TCP connect, then the readiness request) may take, default 1 s
    pub timeout: Duration,
    /// failed probes in a row after which an address is down, default 3
    pub failure_threshold: u32,
    /// successful probes in a row after which a down address is up again (and `hold_down` passed), default 3
    pub success_threshold: u32,
    /// how long an address that went down stays down at least, default 30 s
    pub hold_down: Duration,
    /// the gateway's status port for `GET /healthz/ready` (0: TCP connect only), default 15021
    pub status_port: u16,
    /// probes in flight at most, default 16
    pub concurrency: usize,
    /// `mtls`: after the connect (and readiness), an Istio mTLS handshake through the gateway with a
    /// known service's SNI (None: no such stage)
    pub mtls: Option<GatewayMtls>,
}

/// `gatewayProbes.mtls`: which service an mTLS handshake through each network's gateway reaches, and the
/// client certificate it presents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayMtls {
    /// the service of every network not in `networks` (None: those networks get no mTLS stage)
    pub default: Option<MtlsTarget>,
    /// per network: the service to reach through that network's gateways
    pub networks: BTreeMap<NetworkId, MtlsTarget>,
    /// `certFile`/`keyFile`: the client certificate chain and key (None: the certificate meshfed serves
    /// xDS over mTLS with, `--xds-tls-cert`/`--xds-tls-key`)
    pub cert: Option<(PathBuf, PathBuf)>,
    /// `caFile`: the mesh root the backends' certificates chain to (None: `--xds-client-ca`)
    pub ca: Option<PathBuf>,
}

impl GatewayMtls {
    /// The service an mTLS probe through `network`'s gateways reaches, if any.
    pub fn target(&self, network: &NetworkId) -> Option<&MtlsTarget> {
        self.networks.get(network).or(self.default.as_ref())
    }
}

/// A service port reached through an east-west gateway: `host` (its FQDN) and `port`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MtlsTarget {
    pub host: String,
    pub port: u16,
}

impl MtlsTarget {
    /// The SNI Istio's sidecars send to this service, which the gateway routes by:
    /// `outbound_.PORT_._.FQDN`.
    pub fn sni(&self) -> String {
        format!("outbound_.{}_._.{}", self.port, self.host)
    }
}

impl Default for GatewayProbes {
    fn default() -> Self {
        GatewayProbes {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            failure_threshold: 3,
            success_threshold: 3,
            hold_down: Duration::from_secs(30),
            status_port: 15021,
            concurrency: 16,
            mtls: None,
        }
    }
}

/// `remoteSecrets`: Istio remote secrets (Secrets labelled `istio/multiCluster=true`, each data key a
/// cluster id and its value a kubeconfig) in `namespace` of the cluster `config_cluster`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSecrets {
    /// a cluster of `clusters` with a Kubernetes source (`kubeconfig` or `inCluster`)
    pub config_cluster: ClusterId,
    /// meshfed's namespace in the config cluster, default `istio-system`
    pub namespace: String,
}

/// Default of `readyTimeout`.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of `unreachableGracePeriod`.
pub const DEFAULT_UNREACHABLE_GRACE_PERIOD: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq)]
pub struct ClusterConfig {
    pub id: ClusterId,
    /// the cluster's default network (a `topology.istio.io/network` label on a Pod overrides it)
    pub network: NetworkId,
    /// where this cluster's Kubernetes objects come from
    pub source: ClusterSource,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ClusterSource {
    /// a directory of Kubernetes manifests (YAML, as `kubectl get -o yaml` prints them), watched for edits
    Manifests(PathBuf),
    /// a Kubernetes API server reached through a kubeconfig file (its current context, or `context`)
    Kubeconfig { path: PathBuf, context: Option<String> },
    /// the Kubernetes API server of the cluster meshfed runs in (its pod's service account)
    InCluster,
}

impl ClusterSource {
    /// Whether the objects come from a Kubernetes API server.
    pub fn is_kubernetes(&self) -> bool {
        !matches!(self, ClusterSource::Manifests(_))
    }

    /// A short description for logs and the debug surface (`manifests:DIR`, `kubeconfig:FILE`, `in-cluster`).
    pub fn describe(&self) -> String {
        match self {
            ClusterSource::Manifests(dir) => format!("manifests:{}", dir.display()),
            ClusterSource::Kubeconfig { path, context: None } => format!("kubeconfig:{}", path.display()),
            ClusterSource::Kubeconfig { path, context: Some(c) } => {
                format!("kubeconfig:{} (context {c})", path.display())
            }
            ClusterSource::InCluster => "in-cluster".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Debounce {
    /// push after this long without a new change (Istio's PILOT_DEBOUNCE_AFTER), default 100 ms
    pub quiet: Duration,
    /// push at the latest this long after the first change (PILOT_DEBOUNCE_MAX), default 1 s
    pub max: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Self { quiet: Duration::from_millis(100), max: Duration::from_secs(1) }
    }
}

// ---- the file format ----

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawMeshConfig {
    #[serde(default)]
    domain_suffix: Option<String>,
    clusters: Vec<RawCluster>,
    #[serde(default)]
    debounce: Option<RawDebounce>,
    #[serde(default)]
    send_unhealthy_endpoints: bool,
    #[serde(default)]
    defaults: Option<RawDefaults>,
    #[serde(default)]
    trust_domain: Option<String>,
    #[serde(default)]
    remote_secrets: Option<RawRemoteSecrets>,
    #[serde(default)]
    ready_timeout: Option<String>,
    #[serde(default)]
    unreachable_grace_period: Option<String>,
    #[serde(default)]
    allow_exec_auth: bool,
    #[serde(default)]
    gateway_probes: Option<RawGatewayProbes>,
    #[serde(default)]
    last_known_state: Option<RawLastKnownState>,
    #[serde(default)]
    traffic: Option<serde_yaml::Value>,
    #[serde(default)]
    traffic_policy: Option<RawTrafficPolicyRef>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTrafficPolicyRef {
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawLastKnownState {
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    max_age: Option<String>,
    #[serde(default)]
    write_interval: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawGatewayProbes {
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    failure_threshold: Option<u32>,
    #[serde(default)]
    success_threshold: Option<u32>,
    #[serde(default)]
    hold_down: Option<String>,
    #[serde(default)]
    status_port: Option<u16>,
    #[serde(default)]
    concurrency: Option<usize>,
    #[serde(default)]
    mtls: Option<RawGatewayMtls>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawGatewayMtls {
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    networks: BTreeMap<String, RawMtlsTarget>,
    #[serde(default)]
    cert_file: Option<PathBuf>,
    #[serde(default)]
    key_file: Option<PathBuf>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawMtlsTarget {
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    port: Option<u16>,
}

/// A service's host and port (`field` names them in errors: `gatewayProbes.mtls`,
/// `gatewayProbes.mtls.networks.NET`): both or neither.
fn mtls_target(field: &str, host: Option<String>, port: Option<u16>) -> Result<Option<MtlsTarget>, String> {
    let host = match (host, port) {
        (None, None) => return Ok(None),
        (Some(_), None) => return Err(format!("{field}.port: missing (the service port, with {field}.host)")),
        (None, Some(_)) => return Err(format!("{field}.host: missing (the service's FQDN, with {field}.port)")),
        (Some(h), Some(_)) => h,
    };
    let port = port.unwrap_or_default();
    if port == 0 {
        return Err(format!("{field}.port: must be 1 to 65535"));
    }
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(valid_label) {
        return Err(format!(
            "{field}.host: {host:?} is not a DNS name (the service's FQDN, e.g. reviews.shop.svc.cluster.local)"
        ));
    }
    Ok(Some(MtlsTarget { host: host.to_ascii_lowercase(), port }))
}

impl RawGatewayMtls {
    fn parse(self, base: &Path) -> Result<GatewayMtls, String> {
        let field = "gatewayProbes.mtls";
        let default = mtls_target(field, self.host, self.port)?;
        let mut networks = BTreeMap::new();
        for (name, t) in self.networks {
            let f = format!("{field}.networks.{name}");
            if name.is_empty() {
                return Err(format!("{field}.networks: a network name is empty"));
            }
            let target = mtls_target(&f, t.host, t.port)?
                .ok_or_else(|| format!("{f}: needs host and port (the service reached through its gateways)"))?;
            networks.insert(NetworkId::new(&name), target);
        }
        if default.is_none() && networks.is_empty() {
            return Err(format!(
                "{field}: needs host and port (a service every network serves), or networks (a service per network)"
            ));
        }
        let resolve = |f: &str, p: PathBuf| {
            if p.as_os_str().is_empty() {
                Err(format!("{field}.{f}: must not be empty"))
            } else if p.is_absolute() {
                Ok(p)
            } else {
                Ok(base.join(p))
            }
        };
        let cert = match (self.cert_file, self.key_file) {
            (None, None) => None,
            (Some(c), Some(k)) => Some((resolve("certFile", c)?, resolve("keyFile", k)?)),
            (Some(_), None) => return Err(format!("{field}.keyFile: missing (the key of {field}.certFile)")),
            (None, Some(_)) => return Err(format!("{field}.certFile: missing (the certificate of {field}.keyFile)")),
        };
        let ca = self.ca_file.map(|c| resolve("caFile", c)).transpose()?;
        Ok(GatewayMtls { default, networks, cert, ca })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRemoteSecrets {
    config_cluster: String,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCluster {
    id: String,
    network: String,
    manifests: Option<PathBuf>,
    #[serde(default)]
    kubeconfig: Option<PathBuf>,
    #[serde(default)]
    context: Option<String>,
    #[serde(default)]
    in_cluster: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDebounce {
    #[serde(default)]
    quiet: Option<String>,
    #[serde(default)]
    max: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDefaults {
    #[serde(default)]
    outlier_detection: Option<serde_yaml::Value>,
    #[serde(default)]
    locality_lb_setting: Option<serde_yaml::Value>,
}

impl MeshConfig {
    /// Reads and validates a mesh config file.
    pub fn load(path: &Path) -> Result<MeshConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.into(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut cfg = Self::parse(&text, base).map_err(|e| match e {
            Error::Parse { reason, .. } => Error::Parse { path: path.into(), reason },
            Error::Invalid { reason, .. } => Error::Invalid { path: path.into(), reason },
            other => other,
        })?;
        cfg.path = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Parses a mesh config from text; relative manifest paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<MeshConfig, Error> {
        let path = PathBuf::from("<mesh config>");
        let raw: RawMeshConfig = serde_yaml::from_str(text).map_err(|e| Error::Parse {
            path: path.clone(),
            reason: match e.location() {
                Some(l) => format!("line {}, column {}: {e}", l.line(), l.column()),
                None => e.to_string(),
            },
        })?;
        let invalid = |reason: String| Error::Invalid { path: path.clone(), reason };
        let mut clusters = Vec::new();
        for c in raw.clusters {
            if c.id.is_empty() {
                return Err(invalid("a cluster has an empty id".into()));
            }
            if clusters.iter().any(|x: &ClusterConfig| x.id.as_str() == c.id) {
                return Err(invalid(format!("cluster {:?} is listed twice", c.id)));
            }
            let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
            if c.context.is_some() && c.kubeconfig.is_none() {
                return Err(invalid(format!("cluster {:?}: `context` needs `kubeconfig`", c.id)));
            }
            let source = match (c.manifests, c.kubeconfig, c.in_cluster) {
                (Some(dir), None, false) => ClusterSource::Manifests(resolve(dir)),
                (None, Some(path), false) => ClusterSource::Kubeconfig { path: resolve(path), context: c.context },
                (None, None, true) => ClusterSource::InCluster,
                (None, None, false) => {
                    return Err(invalid(format!(
                        "cluster {:?} has no source (set `manifests: DIR`, `kubeconfig: FILE` or `inCluster: true`)",
                        c.id
                    )));
                }
                _ => {
                    return Err(invalid(format!(
                        "cluster {:?} has more than one source (use one of `manifests`, `kubeconfig`, `inCluster`)",
                        c.id
                    )));
                }
            };
            clusters.push(ClusterConfig { id: ClusterId::new(&c.id), network: NetworkId::new(&c.network), source });
        }
        let mut debounce = Debounce::default();
        if let Some(d) = raw.debounce {
            if let Some(q) = d.quiet {
                debounce.quiet =
                    parse_duration(&q).ok_or_else(|| invalid(format!("debounce.quiet: invalid duration {q:?}")))?;
            }
            if let Some(m) = d.max {
                debounce.max =
                    parse_duration(&m).ok_or_else(|| invalid(format!("debounce.max: invalid duration {m:?}")))?;
            }
        }
        let mut defaults = MeshDefaults::default();
        if let Some(d) = raw.defaults {
            if let Some(v) = &d.outlier_detection {
                defaults.outlier_detection = Some(
                    crate::policy::parse_outlier_value(v, "defaults.outlierDetection")
                        .map_err(|e| invalid(format!("{}: {}", e.field, e.reason)))?,
                );
            }
            if let Some(v) = &d.locality_lb_setting {
                defaults.locality_lb = crate::policy::parse_locality_lb_value(v, "defaults.localityLbSetting")
                    .map_err(|e| invalid(format!("{}: {}", e.field, e.reason)))?;
            }
        }
        let remote_secrets = match raw.remote_secrets {
            None => None,
            Some(r) => {
                let config = clusters.iter().find(|c| c.id.as_str() == r.config_cluster).ok_or_else(|| {
                    invalid(format!("remoteSecrets.configCluster: {:?} is not a listed cluster", r.config_cluster))
                })?;
                if !config.source.is_kubernetes() {
                    return Err(invalid(format!(
                        "remoteSecrets.configCluster: cluster {:?} must have a Kubernetes source (`kubeconfig` or `inCluster`)",
                        r.config_cluster
                    )));
                }
                let namespace = r.namespace.filter(|n| !n.is_empty()).unwrap_or_else(|| "istio-system".into());
                Some(RemoteSecrets { config_cluster: config.id.clone(), namespace })
            }
        };
        let traffic_policy = match raw.traffic_policy {
            None => None,
            Some(t) => {
                let id = match (t.cluster.filter(|c| !c.is_empty()), &remote_secrets) {
                    (Some(c), _) => c,
                    (None, Some(r)) => r.config_cluster.as_str().to_string(),
                    (None, None) => {
                        return Err(invalid(
                            "trafficPolicy.cluster: required (there is no remoteSecrets.configCluster to default to)"
                                .into(),
                        ));
                    }
                };
                let cluster = clusters
                    .iter()
                    .find(|c| c.id.as_str() == id)
                    .ok_or_else(|| invalid(format!("trafficPolicy.cluster: {id:?} is not a listed cluster")))?;
                if !cluster.source.is_kubernetes() {
                    return Err(invalid(format!(
                        "trafficPolicy.cluster: cluster {id:?} must have a Kubernetes source (`kubeconfig` or `inCluster`)"
                    )));
                }
                let or = |v: Option<String>, d: &str| v.filter(|v| !v.is_empty()).unwrap_or_else(|| d.into());
                Some(TrafficPolicyRef {
                    cluster: cluster.id.clone(),
                    namespace: or(t.namespace, "istio-system"),
                    name: or(t.name, "default"),
                })
            }
        };
        let duration = |field: &str, value: Option<String>, default: Duration| match value {
            None => Ok(default),
            Some(v) => parse_duration(&v).ok_or_else(|| invalid(format!("{field}: invalid duration {v:?}"))),
        };
        let ready_timeout = duration("readyTimeout", raw.ready_timeout, DEFAULT_READY_TIMEOUT)?;
        let unreachable_grace_period =
            duration("unreachableGracePeriod", raw.unreachable_grace_period, DEFAULT_UNREACHABLE_GRACE_PERIOD)?;
        let gateway_probes = match raw.gateway_probes {
            None => None,
            Some(g) => {
                let d = GatewayProbes::default();
                let probes = GatewayProbes {
                    interval: duration("gatewayProbes.interval", g.interval, d.interval)?,
                    timeout: duration("gatewayProbes.timeout", g.timeout, d.timeout)?,
                    failure_threshold: g.failure_threshold.unwrap_or(d.failure_threshold),
                    success_threshold: g.success_threshold.unwrap_or(d.success_threshold),
                    hold_down: duration("gatewayProbes.holdDown", g.hold_down, d.hold_down)?,
                    status_port: g.status_port.unwrap_or(d.status_port),
                    concurrency: g.concurrency.unwrap_or(d.concurrency),
                    mtls: g.mtls.map(|m| m.parse(base)).transpose().map_err(invalid)?,
                };
                if probes.interval.is_zero() {
                    return Err(invalid("gatewayProbes.interval: must be more than 0".into()));
                }
                if probes.timeout.is_zero() {
                    return Err(invalid("gatewayProbes.timeout: must be more than 0".into()));
                }
                if probes.timeout > probes.interval {
                    return Err(invalid(format!(
                        "gatewayProbes.timeout: {:?} is longer than gatewayProbes.interval {:?}",
                        probes.timeout, probes.interval
                    )));
                }
                if probes.failure_threshold == 0 {
                    return Err(invalid("gatewayProbes.failureThreshold: must be at least 1".into()));
                }
                if probes.success_threshold == 0 {
                    return Err(invalid("gatewayProbes.successThreshold: must be at least 1".into()));
                }
                if probes.concurrency == 0 {
                    return Err(invalid("gatewayProbes.concurrency: must be at least 1".into()));
                }
                Some(probes)
            }
        };
        let last_known_state = match raw.last_known_state {
            None => None,
            Some(l) => {
                let d = LastKnownState::default();
                let path = match l.path {
                    None => d.path,
                    Some(p) if p.as_os_str().is_empty() => {
                        return Err(invalid("lastKnownState.path: must not be empty".into()));
                    }
                    Some(p) if p.is_absolute() => p,
                    Some(p) => base.join(p),
                };
                if path.file_name().is_none() {
                    return Err(invalid(format!("lastKnownState.path: {} names no file", path.display())));
                }
                let state = LastKnownState {
                    path,
                    max_age: duration("lastKnownState.maxAge", l.max_age, d.max_age)?,
                    write_interval: duration("lastKnownState.writeInterval", l.write_interval, d.write_interval)?,
                };
                if state.max_age.is_zero() {
                    return Err(invalid("lastKnownState.maxAge: must be more than 0".into()));
                }
                if state.write_interval.is_zero() {
                    return Err(invalid("lastKnownState.writeInterval: must be more than 0".into()));
                }
                Some(state)
            }
        };
        let traffic = match &raw.traffic {
            None => crate::traffic::TrafficPolicy::default(),
            Some(v) => {
                let ids: Vec<ClusterId> = clusters.iter().map(|c| c.id.clone()).collect();
                // the clock bounds the drains' expiry only (maxDrainDuration ahead at most)
                // clusters from remote secrets are discovered: their ids cannot be checked here
                crate::traffic::TrafficPolicy::parse_with(
                    v,
                    &ids,
                    remote_secrets.is_some(),
                    std::time::SystemTime::now(),
                )
                .map_err(|e| invalid(e.to_string()))?
            }
        };
        Ok(MeshConfig {
            path: None,
            domain_suffix: raw.domain_suffix.unwrap_or_else(|| "cluster.local".into()),
            clusters,
            debounce,
            send_unhealthy_endpoints: raw.send_unhealthy_endpoints,
            defaults,
            trust_domain: raw.trust_domain.unwrap_or_else(|| "cluster.local".into()),
            remote_secrets,
            ready_timeout,
            unreachable_grace_period,
            allow_exec_auth: raw.allow_exec_auth,
            gateway_probes,
            last_known_state,
            traffic,
            traffic_policy,
        })
    }
}

#[cfg(test)]
mod gateway_probes_tests {
    use super::*;

    fn parse(section: &str) -> Result<MeshConfig, Error> {
        MeshConfig::parse(&format!("clusters: []\n{section}"), Path::new("."))
    }

    #[test]
    fn absent_means_off_and_empty_means_the_defaults() {
        assert_eq!(parse("").unwrap().gateway_probes, None);
        assert_eq!(parse("gatewayProbes: {}\n").unwrap().gateway_probes, Some(GatewayProbes::default()));
        let g = parse(
            "gatewayProbes: {interval: 200ms, timeout: 100ms, failureThreshold: 2, successThreshold: 4, holdDown: 1s, statusPort: 0, concurrency: 3}\n",
        )
        .unwrap()
        .gateway_probes
        .unwrap();
        assert_eq!(
            g,
            GatewayProbes {
                interval: Duration::from_millis(200),
                timeout: Duration::from_millis(100),
                failure_threshold: 2,
                success_threshold: 4,
                hold_down: Duration::from_secs(1),
                status_port: 0,
                concurrency: 3,
                mtls: None,
            }
        );
    }

    #[test]
    fn mtls_targets_and_certificate_files() {
        let g = parse("gatewayProbes: {mtls: {host: reviews.shop.svc.cluster.local, port: 9080}}\n")
            .unwrap()
            .gateway_probes
            .unwrap();
        let m = g.mtls.unwrap();
        let reviews = MtlsTarget { host: "reviews.shop.svc.cluster.local".into(), port: 9080 };
        assert_eq!(m, GatewayMtls { default: Some(reviews.clone()), networks: BTreeMap::new(), cert: None, ca: None });
        assert_eq!(m.target(&NetworkId::new("any-net")), Some(&reviews));
        assert_eq!(reviews.sni(), "outbound_.9080_._.reviews.shop.svc.cluster.local");

        let m = parse(
            "gatewayProbes:\n  mtls:\n    networks: {azure-net: {host: Ratings.shop.svc.cluster.local, port: 9080}}\n    certFile: certs/cert.pem\n    keyFile: /etc/certs/key.pem\n    caFile: certs/root.pem\n",
        )
        .unwrap()
        .gateway_probes
        .unwrap()
        .mtls
        .unwrap();
        assert_eq!(m.default, None);
        let ratings = MtlsTarget { host: "ratings.shop.svc.cluster.local".into(), port: 9080 };
        assert_eq!(m.target(&NetworkId::new("azure-net")), Some(&ratings));
        assert_eq!(m.target(&NetworkId::new("aws-net")), None, "a network not listed, no default: no mTLS stage");
        assert_eq!(m.cert, Some((PathBuf::from("./certs/cert.pem"), PathBuf::from("/etc/certs/key.pem"))));
        assert_eq!(m.ca, Some(PathBuf::from("./certs/root.pem")));
    }

    #[test]
    fn invalid_mtls_settings_name_their_field() {
        for (section, field) in [
            ("mtls: {}", "gatewayProbes.mtls: needs host and port"),
            ("mtls: {host: reviews.shop.svc.cluster.local}", "gatewayProbes.mtls.port"),
            ("mtls: {port: 9080}", "gatewayProbes.mtls.host"),
            ("mtls: {host: reviews.shop.svc.cluster.local, port: 0}", "gatewayProbes.mtls.port"),
            ("mtls: {host: 'reviews shop', port: 9080}", "gatewayProbes.mtls.host"),
            ("mtls: {host: 'outbound_.9080_._.reviews', port: 9080}", "gatewayProbes.mtls.host"),
            ("mtls: {host: '', port: 9080}", "gatewayProbes.mtls.host"),
            ("mtls: {networks: {azure-net: {}}}", "gatewayProbes.mtls.networks.azure-net"),
            ("mtls: {networks: {azure-net: {host: r.shop}}}", "gatewayProbes.mtls.networks.azure-net.port"),
            ("mtls: {networks: {azure-net: {host: a..b, port: 1}}}", "gatewayProbes.mtls.networks.azure-net.host"),
            ("mtls: {host: r.shop, port: 1, certFile: c.pem}", "gatewayProbes.mtls.keyFile"),
            ("mtls: {host: r.shop, port: 1, keyFile: k.pem}", "gatewayProbes.mtls.certFile"),
            ("mtls: {host: r.shop, port: 1, caFile: ''}", "gatewayProbes.mtls.caFile"),
            ("mtls: {host: r.shop, port: 70000}", "port"),
            ("mtls: {host: r.shop, port: 1, sni: x}", "sni"),
        ] {
            let e = parse(&format!("gatewayProbes: {{{section}}}\n")).unwrap_err().to_string();
            assert!(e.contains(field), "{section}: {e}");
        }
    }

    #[test]
    fn invalid_values_name_their_field() {
        for (section, field) in [
            ("gatewayProbes: {interval: soon}", "gatewayProbes.interval"),
            ("gatewayProbes: {interval: 0s}", "gatewayProbes.interval"),
            ("gatewayProbes: {timeout: 0s}", "gatewayProbes.timeout"),
            ("gatewayProbes: {interval: 1s, timeout: 2s}", "gatewayProbes.timeout"),
            ("gatewayProbes: {holdDown: forever}", "gatewayProbes.holdDown"),
            ("gatewayProbes: {failureThreshold: 0}", "gatewayProbes.failureThreshold"),
            ("gatewayProbes: {successThreshold: 0}", "gatewayProbes.successThreshold"),
            ("gatewayProbes: {concurrency: 0}", "gatewayProbes.concurrency"),
        ] {
            let e = parse(&format!("{section}\n")).unwrap_err().to_string();
            assert!(e.contains(field), "{section}: {e}");
        }
        let e = parse("gatewayProbes: {statusPort: 70000}\n").unwrap_err().to_string();
        assert!(e.contains("statusPort"), "{e}");
        let e = parse("gatewayProbes: {intervall: 1s}\n").unwrap_err().to_string();
        assert!(e.contains("intervall"), "{e}");
    }
}

#[cfg(test)]
mod last_known_state_tests {
    use super::*;

    fn parse(section: &str) -> Result<MeshConfig, Error> {
        MeshConfig::parse(&format!("clusters: []\n{section}"), Path::new("/etc/meshfed"))
    }

    #[test]
    fn absent_means_off_and_values_are_read() {
        assert_eq!(parse("").unwrap().last_known_state, None);
        assert_eq!(parse("lastKnownState: {}\n").unwrap().last_known_state, Some(LastKnownState::default()));
        let l = parse("lastKnownState: {path: state/lk.json, maxAge: 2h, writeInterval: 250ms}\n")
            .unwrap()
            .last_known_state
            .unwrap();
        assert_eq!(
            l,
            LastKnownState {
                path: PathBuf::from("/etc/meshfed/state/lk.json"),
                max_age: Duration::from_secs(7200),
                write_interval: Duration::from_millis(250),
            }
        );
    }

    #[test]
    fn invalid_values_name_their_field() {
        for (section, field) in [
            ("lastKnownState: {maxAge: forever}", "lastKnownState.maxAge"),
            ("lastKnownState: {maxAge: 0s}", "lastKnownState.maxAge"),
            ("lastKnownState: {writeInterval: often}", "lastKnownState.writeInterval"),
            ("lastKnownState: {writeInterval: 0s}", "lastKnownState.writeInterval"),
            ("lastKnownState: {path: ''}", "lastKnownState.path"),
            ("lastKnownState: {path: /}", "lastKnownState.path"),
            ("lastKnownState: {maxage: 1h}", "maxage"),
        ] {
            let e = parse(&format!("{section}\n")).unwrap_err().to_string();
            assert!(e.contains(field), "{section}: {e}");
        }
    }
}

#[cfg(test)]
mod traffic_policy_tests {
    use super::*;

    const CLUSTERS: &str =
        "clusters:\n  - {id: k, network: n, kubeconfig: k.yaml}\n  - {id: files, network: n, manifests: m}\n";

    fn parse(section: &str) -> Result<MeshConfig, Error> {
        MeshConfig::parse(&format!("{CLUSTERS}{section}"), Path::new("/etc/meshfed"))
    }

    #[test]
    fn the_traffic_policy_object_defaults_and_checks() {
        assert_eq!(parse("").unwrap().traffic_policy, None);
        let t = parse("trafficPolicy: {cluster: k}\n").unwrap().traffic_policy.unwrap();
        assert_eq!(
            t,
            TrafficPolicyRef { cluster: ClusterId::new("k"), namespace: "istio-system".into(), name: "default".into() }
        );
        // default: the remote secrets' config cluster
        let t = parse("remoteSecrets: {configCluster: k}\ntrafficPolicy: {namespace: meshfed, name: prod}\n")
            .unwrap()
            .traffic_policy
            .unwrap();
        assert_eq!((t.cluster.as_str(), t.namespace.as_str(), t.name.as_str()), ("k", "meshfed", "prod"));
        for (section, words) in [
            ("trafficPolicy: {}\n", "trafficPolicy.cluster: required"),
            ("trafficPolicy: {cluster: nope}\n", "not a listed cluster"),
            ("trafficPolicy: {cluster: files}\n", "must have a Kubernetes source"),
            ("trafficPolicy: {cluster: k, nam: x}\n", "nam"),
        ] {
            let e = parse(section).unwrap_err().to_string();
            assert!(e.contains(words), "{section}: {e}");
        }
    }
}
