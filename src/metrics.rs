//! Prometheus metrics (`/metrics` on the debug address), with Istio's names where istiod has the
//! metric (`pilot_xds`, `pilot_xds_pushes`, `pilot_xds_push_time`, `pilot_proxy_convergence_time`,
//! `pilot_total_xds_rejects`, `pilot_services`) and `meshfed_` names for the rest. The list, with
//! meanings and labels, is in README.md ("Metrics").
//!
//! One registry per process ([`global`]): the push loop and the xDS streams record into it with
//! one-line calls; values that are a view of current state (connected proxies, services, cluster
//! watch state) are set when `/metrics` is scraped ([`Metrics::refresh`]).
//!
//! The exposition is the Prometheus text format 0.0.4. istiod exposes its counters without the
//! `_total` suffix (`pilot_xds_pushes`), so those keep Istio's exact names; meshfed's own counters end
//! in `_total`.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::proxy::ProxyKind;
use crate::source::{ClusterStatus, SyncState};
use crate::type_url::ResourceType;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot encode the metrics: {0}")]
    Encode(#[from] std::fmt::Error),
}

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// istiod's buckets for `pilot_xds_push_time` (seconds).
const PUSH_TIME_BUCKETS: [f64; 8] = [0.01, 0.1, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0];
/// istiod's buckets for `pilot_proxy_convergence_time` (seconds).
const CONVERGENCE_BUCKETS: [f64; 8] = [0.1, 0.5, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0];

/// Counters that istiod exposes without the `_total` suffix.
const ISTIO_COUNTERS: [&str; 2] = ["pilot_xds_pushes", "pilot_total_xds_rejects"];

type TypeLabel = [(&'static str, &'static str); 1];
type ProxyLabels = [(&'static str, &'static str); 2];
type ClusterLabel = [(&'static str, String); 1];
type ClusterStateLabels = [(&'static str, String); 2];
type ReasonLabel = [(&'static str, &'static str); 1];
type NetworkLabel = [(&'static str, String); 1];
type NetworkAddressLabels = [(&'static str, String); 2];

/// Why an xDS listener refused a client (the `reason` label of `meshfed_xds_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// a stream of a connection over `--max-connections` (RESOURCE_EXHAUSTED)
    Connections,
    /// a socket closed at accept: `--max-connections` + the pending allowance are open
    Sockets,
    /// a stream over the connection's `--max-streams-per-connection`: RST_STREAM(REFUSED_STREAM) over the
    /// advertised SETTINGS_MAX_CONCURRENT_STREAMS, RESOURCE_EXHAUSTED for an in-process stream
    Streams,
    /// a request over `--max-message-size` (RESOURCE_EXHAUSTED)
    MessageSize,
    /// a request over the connection's `--max-request-rate` / `--max-request-burst` (RESOURCE_EXHAUSTED)
    RequestRate,
    /// a connection closed because it opened no admitted stream in time
    AdmissionTimeout,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::Connections,
        Refusal::Sockets,
        Refusal::Streams,
        Refusal::MessageSize,
        Refusal::RequestRate,
        Refusal::AdmissionTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Connections => "connections",
            Refusal::Sockets => "sockets",
            Refusal::Streams => "streams",
            Refusal::MessageSize => "message_size",
            Refusal::RequestRate => "request_rate",
            Refusal::AdmissionTimeout => "admission_timeout",
        }
    }
}

fn new_push_time() -> Histogram {
    Histogram::new(PUSH_TIME_BUCKETS)
}

/// Istio's lower-case type label (`cds`, `eds`, `lds`, `rds`).
pub fn type_label(t: ResourceType) -> &'static str {
    match t {
        ResourceType::Cluster => "cds",
        ResourceType::Endpoint => "eds",
        ResourceType::Listener => "lds",
        ResourceType::Route => "rds",
    }
}

/// The counters one xDS response moves.
#[derive(Debug)]
struct SentCounters {
    pushes: Counter,
    resources: Counter,
    bytes: Counter,
    shared: Counter,
}

/// Every metric meshfed exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `pilot_xds{type=sidecar|router, flavor=sotw|delta}`: connected proxies
    pub xds_clients: Family<ProxyLabels, Gauge>,
    /// `pilot_xds_pushes{type}`: xDS responses sent
    pub xds_pushes: Family<TypeLabel, Counter>,
    /// `pilot_xds_push_time{type}`: time of a push of the push loop (translation and publication)
    /// that changed resources of the type
    pub xds_push_time: Family<TypeLabel, Histogram, fn() -> Histogram>,
    /// `pilot_proxy_convergence_time`: change seen by the push loop -> the proxy ACKs a response
    /// carrying it
    pub proxy_convergence_time: Histogram,
    /// `pilot_total_xds_rejects{type}`: NACKs
    pub xds_rejects: Family<TypeLabel, Counter>,
    /// `meshfed_xds_resources_sent_total{type}`
    pub resources_sent: Family<TypeLabel, Counter>,
    /// `meshfed_xds_bytes_sent_total{type}`
    pub bytes_sent: Family<TypeLabel, Counter>,
    /// `meshfed_xds_shared_responses_total{type}`: responses written from an update worked out once for
    /// every stream alike ([`crate::xds::SharedPushes`])
    pub shared_responses: Family<TypeLabel, Counter>,
    /// the per-type counters of the response path, looked up once (a family lookup locks and hashes)
    sent_by_type: [SentCounters; 4],
    /// `meshfed_pushes_total`: pushes of the push loop
    pub pushes: Counter,
    /// `meshfed_debounce_merged_events_total`: source events merged into a push another event started
    pub debounce_merged_events: Counter,
    /// `meshfed_cluster_last_event_age_seconds{cluster}`
    pub cluster_last_event_age: Family<ClusterLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// `meshfed_cluster_watch_state{cluster, state}`: 1 for the cluster's current state, 0 otherwise
    pub cluster_watch_state: Family<ClusterStateLabels, Gauge>,
    /// `meshfed_cluster_api_reachable{cluster}`: per Kubernetes cluster, 1 while its API server answers,
    /// 0 while every request fails
    pub cluster_api_reachable: Family<ClusterLabel, Gauge>,
    /// `meshfed_cluster_restored_state_age_seconds{cluster}`: the age of the restored last-known state a
    /// cluster is served from; absent when the cluster is served live
    pub cluster_restored_state_age: Family<ClusterLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// `pilot_services`: federated services
    pub services: Gauge,
    /// `meshfed_xds_refused_total{reason}`: clients refused by a limit of an xDS listener
    pub xds_refused: Family<ReasonLabel, Counter>,
    /// `meshfed_tasks`: tasks alive on the runtime (set when scraped)
    pub tasks: Gauge,
    /// `meshfed_xds_unknown_resources_total{type}`: names proxies subscribed to that meshfed does not
    /// serve (beside istiod: an EnvoyFilter selecting a service meshfed does not know)
    pub unknown_resources: Family<TypeLabel, Counter>,
    /// `meshfed_gateway_up{network, address}`: 1 if the east-west gateway address is not down (probing on)
    pub gateway_up: Family<NetworkAddressLabels, Gauge>,
    /// `meshfed_network_fenced{network}`: 1 if every gateway address of the network is down
    pub network_fenced: Family<NetworkLabel, Gauge>,
    /// `meshfed_global_health{cluster}`: 1 if `/global/health?cluster=ID` answers 200 (set when scraped)
    pub global_health: Family<ClusterLabel, Gauge>,
    /// `meshfed_mesh_config_reload_errors_total`: edits of the mesh config that did not load (the last
    /// good config kept serving)
    pub mesh_config_reload_errors: Counter,
    /// `meshfed_mesh_config_last_reload_success`: 1 if the mesh config's current content is the one
    /// serving (or its last edit loaded), 0 after an edit that did not load
    pub mesh_config_last_reload_success: Gauge,
    /// `meshfed_drill_active{cluster}`: 1 while a drill of the target is active (set when scraped)
    pub drill_active: Family<ClusterLabel, Gauge>,
    /// `meshfed_drill_aborts_total{cluster}`: drills aborted by themselves
    pub drill_aborts: Family<ClusterLabel, Counter>,
    /// `meshfed_drill_step_ack_seconds{cluster}`: the last all-ACKed step of the target's latest drill,
    /// from its publish to the last ACK of a proxy connected then (set when scraped)
    pub drill_step_ack: Family<ClusterLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let xds_clients = Family::<ProxyLabels, Gauge>::default();
        registry.register(
            "pilot_xds",
            "Number of endpoints connected to this pilot using XDS, by proxy type and xDS flavour",
            xds_clients.clone(),
        );
        let xds_pushes = Family::<TypeLabel, Counter>::default();
        registry.register("pilot_xds_pushes", "xDS responses sent, by type (cds, eds, lds, rds)", xds_pushes.clone());
        let xds_push_time = Family::<TypeLabel, Histogram, fn() -> Histogram>::new_with_constructor(new_push_time);
        registry.register(
            "pilot_xds_push_time",
            "Total time in seconds a push takes (translation and publication), by resource type changed",
            xds_push_time.clone(),
        );
        let proxy_convergence_time = Histogram::new(CONVERGENCE_BUCKETS);
        registry.register(
            "pilot_proxy_convergence_time",
            "Delay in seconds between a change seen by the push loop and a proxy acknowledging it",
            proxy_convergence_time.clone(),
        );
        let xds_rejects = Family::<TypeLabel, Counter>::default();
        registry.register(
            "pilot_total_xds_rejects",
            "Total number of xDS responses rejected (NACKed)",
            xds_rejects.clone(),
        );
        let services = Gauge::default();
        registry.register("pilot_services", "Total services known to pilot", services.clone());
        let resources_sent = Family::<TypeLabel, Counter>::default();
        registry.register(
            "meshfed_xds_resources_sent",
            "Resources sent in xDS responses, by type",
            resources_sent.clone(),
        );
        let bytes_sent = Family::<TypeLabel, Counter>::default();
        registry.register("meshfed_xds_bytes_sent", "Bytes of xDS responses sent, by type", bytes_sent.clone());
        let shared_responses = Family::<TypeLabel, Counter>::default();
        registry.register(
            "meshfed_xds_shared_responses",
            "xDS responses of a push written from one update worked out once for every stream alike (its client held the scope's previous map through the same subscription), by type",
            shared_responses.clone(),
        );
        let pushes = Counter::default();
        registry.register("meshfed_pushes", "Pushes of the push loop", pushes.clone());
        let unknown_resources = Family::<TypeLabel, Counter>::default();
        registry.register(
            "meshfed_xds_unknown_resources",
            "Resource names proxies subscribed to that meshfed does not serve, by type",
            unknown_resources.clone(),
        );
        let debounce_merged_events = Counter::default();
        registry.register(
            "meshfed_debounce_merged_events",
            "Source events merged by debouncing into a push that another event started",
            debounce_merged_events.clone(),
        );
        let cluster_last_event_age = Family::<ClusterLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "meshfed_cluster_last_event_age_seconds",
            "Seconds since the last event from the cluster's source",
            cluster_last_event_age.clone(),
        );
        let cluster_watch_state = Family::<ClusterStateLabels, Gauge>::default();
        registry.register(
            "meshfed_cluster_watch_state",
            "State of the cluster's watch (synced, syncing, timeout, closed): 1 for the current state",
            cluster_watch_state.clone(),
        );
        let cluster_api_reachable = Family::<ClusterLabel, Gauge>::default();
        registry.register(
            "meshfed_cluster_api_reachable",
            "1 while the Kubernetes cluster's API server answers, 0 while every request to it fails",
            cluster_api_reachable.clone(),
        );
        let cluster_restored_state_age = Family::<ClusterLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "meshfed_cluster_restored_state_age_seconds",
            "Age in seconds of the restored last-known state the cluster is served from (absent when served live)",
            cluster_restored_state_age.clone(),
        );
        let xds_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "meshfed_xds_refused",
            "Clients refused by a limit of an xDS listener, by reason (connections, sockets, message_size, \
             request_rate, admission_timeout)",
            xds_refused.clone(),
        );
        // every reason is exported from the start (at 0), so a rate() over it is defined
        for r in Refusal::ALL {
            let _ = xds_refused.get_or_create(&[("reason", r.as_str())]);
        }
        let gateway_up = Family::<NetworkAddressLabels, Gauge>::default();
        registry.register(
            "meshfed_gateway_up",
            "1 if the network's east-west gateway address answers its probes (not down), 0 if it is down",
            gateway_up.clone(),
        );
        let network_fenced = Family::<NetworkLabel, Gauge>::default();
        registry.register(
            "meshfed_network_fenced",
            "1 if every east-west gateway address of the network is down (its endpoints are last resort for other networks)",
            network_fenced.clone(),
        );
        let global_health = Family::<ClusterLabel, Gauge>::default();
        registry.register(
            "meshfed_global_health",
            "1 if the cluster should receive traffic (what /global/health?cluster=ID answers: 200), 0 if not",
            global_health.clone(),
        );
        let mesh_config_reload_errors = Counter::default();
        registry.register(
            "meshfed_mesh_config_reload_errors",
            "Edits of the mesh config that did not load (invalid or unreadable); the last good config kept serving",
            mesh_config_reload_errors.clone(),
        );
        let mesh_config_last_reload_success = Gauge::default();
        registry.register(
            "meshfed_mesh_config_last_reload_success",
            "1 if the mesh config's last edit loaded (or none was made since the start), 0 if it did not",
            mesh_config_last_reload_success.clone(),
        );
        let drill_active = Family::<ClusterLabel, Gauge>::default();
        registry.register(
            "meshfed_drill_active",
            "1 while a drill of the target (cluster or region) is active",
            drill_active.clone(),
        );
        let drill_aborts = Family::<ClusterLabel, Counter>::default();
        registry.register(
            "meshfed_drill_aborts",
            "Drills aborted by themselves (a cluster taking the drained traffic fell below abortBelowHealthy)",
            drill_aborts.clone(),
        );
        let drill_step_ack = Family::<ClusterLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "meshfed_drill_step_ack_seconds",
            "The latest drill step's time from its push's publish until every proxy connected then had ACKed its EDS",
            drill_step_ack.clone(),
        );
        let tasks = Gauge::default();
        registry.register("meshfed_tasks", "Tasks alive on meshfed's async runtime", tasks.clone());
        let sent_by_type = ResourceType::ALL.map(|t| {
            let label = [("type", type_label(t))];
            SentCounters {
                pushes: xds_pushes.get_or_create(&label).clone(),
                resources: resources_sent.get_or_create(&label).clone(),
                bytes: bytes_sent.get_or_create(&label).clone(),
                shared: shared_responses.get_or_create(&label).clone(),
            }
        });
        Metrics {
            sent_by_type,
            registry,
            xds_clients,
            xds_pushes,
            xds_push_time,
            proxy_convergence_time,
            xds_rejects,
            resources_sent,
            bytes_sent,
            shared_responses,
            pushes,
            debounce_merged_events,
            cluster_last_event_age,
            cluster_watch_state,
            cluster_api_reachable,
            cluster_restored_state_age,
            services,
            xds_refused,
            tasks,
            unknown_resources,
            gateway_up,
            network_fenced,
            global_health,
            mesh_config_reload_errors,
            mesh_config_last_reload_success,
            drill_active,
            drill_aborts,
            drill_step_ack,
        }
    }

    /// A drill of `target` aborted by itself.
    pub fn record_drill_abort(&self, target: &str) {
        self.drill_aborts.get_or_create(&[("cluster", target.to_string())]).inc();
    }

    /// Sets the drills' gauges: per target, whether a drill is active and the last all-ACKed step's time
    /// (targets not given any more are dropped).
    pub fn set_drills(&self, drills: &[(String, bool, Option<f64>)]) {
        self.drill_active.clear();
        self.drill_step_ack.clear();
        for (target, active, ack) in drills {
            let label = [("cluster", target.clone())];
            self.drill_active.get_or_create(&label).set(i64::from(*active));
            if let Some(ack) = ack {
                self.drill_step_ack.get_or_create(&label).set(*ack);
            }
        }
    }

    /// Sets every cluster's global DNS health (clusters not given any more are dropped).
    pub fn set_global_health(&self, clusters: &[(String, bool)]) {
        self.global_health.clear();
        for (cluster, healthy) in clusters {
            self.global_health.get_or_create(&[("cluster", cluster.clone())]).set(i64::from(*healthy));
        }
    }

    /// Sets the gateway probes' evidence: per (network, address) whether it is up, per network whether it
    /// is fenced. Addresses and networks not given any more are dropped.
    pub fn set_gateway_evidence(&self, addresses: &[(String, String, bool)], networks: &[(String, bool)]) {
        self.gateway_up.clear();
        for (network, address, up) in addresses {
            self.gateway_up
                .get_or_create(&[("network", network.clone()), ("address", address.clone())])
                .set(i64::from(*up));
        }
        self.network_fenced.clear();
        for (network, fenced) in networks {
            self.network_fenced.get_or_create(&[("network", network.clone())]).set(i64::from(*fenced));
        }
    }

    /// An xDS listener refused a client because of a limit.
    pub fn record_refusal(&self, reason: Refusal) {
        self.xds_refused.get_or_create(&[("reason", reason.as_str())]).inc();
    }

    /// An xDS response of type `t` carrying `resources` resources in `bytes` bytes was sent; `shared`:
    /// written from an update worked out once for every stream alike.
    pub fn record_response(&self, t: ResourceType, resources: usize, bytes: u64, shared: bool) {
        let c = &self.sent_by_type[t.index()];
        c.pushes.inc();
        c.resources.inc_by(resources as u64);
        c.bytes.inc_by(bytes);
        if shared {
            c.shared.inc();
        }
    }

    /// A proxy subscribed to `n` names of type `t` that meshfed does not serve.
    pub fn record_unknown_resources(&self, t: ResourceType, n: usize) {
        self.unknown_resources.get_or_create(&[("type", type_label(t))]).inc_by(n as u64);
    }

    /// A proxy NACKed a response of type `t`.
    pub fn record_nack(&self, t: ResourceType) {
        self.xds_rejects.get_or_create(&[("type", type_label(t))]).inc();
    }

    /// A proxy ACKed the response that carried a change the push loop first saw at `seen`: the change has
    /// converged on that proxy.
    pub fn record_convergence(&self, seen: std::time::Instant) {
        self.proxy_convergence_time.observe(seen.elapsed().as_secs_f64());
    }

    /// The push loop pushed: `changed` resources per type, in `took`; `merged` events were merged into it.
    pub fn record_push(&self, changed: &[(ResourceType, usize)], took: Duration, merged: u64) {
        self.pushes.inc();
        self.debounce_merged_events.inc_by(merged);
        for (t, _) in changed {
            self.xds_push_time.get_or_create(&[("type", type_label(*t))]).observe(took.as_secs_f64());
        }
    }

    /// Sets the metrics that mirror current state: connected proxies by kind and xDS flavor (`sotw`,
    /// `delta`; debug clients such as istioctl are not proxies), federated services, and the clusters'
    /// watch state, API reachability and restored state.
    pub fn refresh(&self, proxies: &[(ProxyKind, &'static str, usize)], services: usize, clusters: &[ClusterStatus]) {
        for (kind, flavor, n) in proxies {
            self.xds_clients.get_or_create(&[("type", kind.as_str()), ("flavor", flavor)]).set(*n as i64);
        }
        self.services.set(services as i64);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            self.tasks.set(rt.metrics().num_alive_tasks() as i64);
        }
        let now = SystemTime::now();
        for c in clusters {
            let id = c.id.to_string();
            if let Some(last) = c.last_event {
                let age = now.duration_since(last).unwrap_or_default().as_secs_f64();
                self.cluster_last_event_age.get_or_create(&[("cluster", id.clone())]).set(age);
            }
            for state in [SyncState::Syncing, SyncState::Synced, SyncState::Timeout, SyncState::Closed] {
                let v = i64::from(c.sync == state);
                self.cluster_watch_state
                    .get_or_create(&[("cluster", id.clone()), ("state", state.as_str().into())])
                    .set(v);
            }
            let label = [("cluster", id.clone())];
            if !c.source.starts_with("manifests:") {
                self.cluster_api_reachable.get_or_create(&label).set(i64::from(c.unreachable_since.is_none()));
            }
            match c.restored_from {
                Some(observed_at) => {
                    let age = now.duration_since(observed_at).unwrap_or_default().as_secs_f64();
                    self.cluster_restored_state_age.get_or_create(&label).set(age);
                }
                None => {
                    self.cluster_restored_state_age.remove(&label);
                }
            }
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn encode(&self) -> Result<String, Error> {
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry)?;
        Ok(istio_counter_names(&text))
    }
}

/// Renames `<name>_total` to `<name>` for the counters istiod exposes without the suffix (in HELP and
/// TYPE lines and samples).
fn istio_counter_names(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let mut renamed = None;
        for name in ISTIO_COUNTERS {
            let total = format!("{name}_total");
            let (prefix, rest) = if let Some(rest) = line.strip_prefix("# HELP ") {
                ("# HELP ", rest)
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                ("# TYPE ", rest)
            } else {
                ("", line)
            };
            if let Some(after) = rest.strip_prefix(&total)
                && (after.starts_with(' ') || after.starts_with('{'))
            {
                renamed = Some(format!("{prefix}{name}{after}"));
                break;
            }
        }
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
    }
    out
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_counters_keep_istio_names() {
        let m = Metrics::new();
        m.record_response(ResourceType::Cluster, 3, 100, false);
        m.record_response(ResourceType::Endpoint, 2, 10, true);
        m.record_nack(ResourceType::Endpoint);
        m.record_push(&[(ResourceType::Endpoint, 2)], Duration::from_millis(3), 4);
        let text = m.encode().unwrap();
        assert!(text.contains("# TYPE pilot_xds_pushes counter\n"), "{text}");
        assert!(text.contains("pilot_xds_pushes{type=\"cds\"} 1\n"), "{text}");
        assert!(text.contains("pilot_total_xds_rejects{type=\"eds\"} 1\n"), "{text}");
        assert!(text.contains("meshfed_xds_resources_sent_total{type=\"cds\"} 3\n"), "{text}");
        assert!(text.contains("meshfed_xds_bytes_sent_total{type=\"cds\"} 100\n"), "{text}");
        assert!(text.contains("meshfed_xds_shared_responses_total{type=\"eds\"} 1\n"), "{text}");
        assert!(text.contains("meshfed_xds_shared_responses_total{type=\"cds\"} 0\n"), "{text}");
        assert!(text.contains("meshfed_debounce_merged_events_total 4\n"), "{text}");
        assert!(text.contains("pilot_xds_push_time_count{type=\"eds\"} 1\n"), "{text}");
        assert!(!text.contains("pilot_xds_pushes_total"), "{text}");
    }

    #[test]
    fn gateway_evidence_is_exported_and_replaced() {
        let m = Metrics::new();
        m.set_gateway_evidence(
            &[("azure-net".into(), "10.0.0.1:15443".into(), false), ("aws-net".into(), "10.1.0.1:15443".into(), true)],
            &[("azure-net".into(), true), ("aws-net".into(), false)],
        );
        let text = m.encode().unwrap();
        assert!(text.contains("# TYPE meshfed_gateway_up gauge\n"), "{text}");
        assert!(text.contains("meshfed_gateway_up{network=\"azure-net\",address=\"10.0.0.1:15443\"} 0\n"), "{text}");
        assert!(text.contains("meshfed_gateway_up{network=\"aws-net\",address=\"10.1.0.1:15443\"} 1\n"), "{text}");
        assert!(text.contains("meshfed_network_fenced{network=\"azure-net\"} 1\n"), "{text}");
        assert!(text.contains("meshfed_network_fenced{network=\"aws-net\"} 0\n"), "{text}");
        m.set_gateway_evidence(&[], &[]);
        let text = m.encode().unwrap();
        assert!(!text.contains("azure-net"), "gone gateways are dropped: {text}");
    }

    #[test]
    fn cluster_reachability_and_restored_state_age() {
        let m = Metrics::new();
        let mut kube = ClusterStatus::new(crate::model::ClusterId::new("aws"), "kubeconfig:/k");
        kube.unreachable_since = Some(SystemTime::now());
        kube.restored_from = Some(SystemTime::now() - Duration::from_secs(90));
        let files = ClusterStatus::new(crate::model::ClusterId::new("local"), "manifests:/m");
        m.refresh(&[], 0, &[kube.clone(), files]);
        let text = m.encode().unwrap();
        assert!(text.contains("meshfed_cluster_api_reachable{cluster=\"aws\"} 0\n"), "{text}");
        assert!(!text.contains("meshfed_cluster_api_reachable{cluster=\"local\"}"), "no API: {text}");
        let age: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("meshfed_cluster_restored_state_age_seconds{cluster=\"aws\"} "))
            .expect("restored age exported")
            .parse()
            .unwrap();
        assert!((90.0..100.0).contains(&age), "{age}");
        kube.unreachable_since = None;
        kube.restored_from = None;
        m.refresh(&[], 0, &[kube]);
        let text = m.encode().unwrap();
        assert!(text.contains("meshfed_cluster_api_reachable{cluster=\"aws\"} 1\n"), "{text}");
        assert!(!text.contains("meshfed_cluster_restored_state_age_seconds{"), "live: absent: {text}");
    }

    #[test]
    fn global_health_is_exported_and_replaced() {
        let m = Metrics::new();
        m.set_global_health(&[("aws-use1".into(), true), ("azure-weu".into(), false)]);
        let text = m.encode().unwrap();
        assert!(text.contains("# TYPE meshfed_global_health gauge\n"), "{text}");
        assert!(text.contains("meshfed_global_health{cluster=\"aws-use1\"} 1\n"), "{text}");
        assert!(text.contains("meshfed_global_health{cluster=\"azure-weu\"} 0\n"), "{text}");
        m.set_global_health(&[("aws-use1".into(), true)]);
        assert!(!m.encode().unwrap().contains("azure-weu"));
    }

    #[test]
    fn convergence_is_observed() {
        let m = Metrics::new();
        m.record_convergence(std::time::Instant::now());
        let text = m.encode().unwrap();
        assert!(text.contains("pilot_proxy_convergence_time_count 1\n"), "{text}");
    }

    #[test]
    fn rename_only_touches_whole_names() {
        let text =
            "# HELP pilot_xds_pushes_total x.\npilot_xds_pushes_total{type=\"cds\"} 1\npilot_xds_pushes_totalx 2\n";
        assert_eq!(
            istio_counter_names(text),
            "# HELP pilot_xds_pushes x.\npilot_xds_pushes{type=\"cds\"} 1\npilot_xds_pushes_totalx 2\n"
        );
    }
}
