//! The debug HTTP surface (default 127.0.0.1:15014): health, readiness, istiod-compatible debug
//! endpoints, Prometheus metrics and a live web UI, all reading the same state the xDS streams read.
//!
//! | path | what |
//! |---|---|
//! | `/` , `/ui/proxy?id=POD.NS` | the web UI (static, embedded; polls the JSON endpoints) |
//! | `/debug` | HTML index of the endpoints; `/debug/list` the same as JSON |
//! | `/debug/config_dump?proxyID=POD.NS[&include_eds=true]` | the proxy's `envoy.admin.v3.ConfigDump` |
//! | `/debug/syncz` | istiod's sync status per proxy, plus per-type status |
//! | `/debug/registryz`, `/debug/endpointz` | federated services, their endpoints |
//! | `/debug/clusterz` | per Kubernetes cluster: source, sync status, counts |
//! | `/debug/adsz` | connections and their subscriptions |
//! | `/debug/push_status` | the last [`PUSH_LOG_SIZE`] pushes |
//! | `/debug/explain?proxyID=POD.NS` | each locality's priority for the proxy, and why |
//! | `/metrics` | Prometheus text format ([`crate::metrics`]) |
//!
//! Every JSON endpoint indents its output with `?pretty`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use serde::Serialize;
use serde_json::{Value, json};

use crate::cache::{Changes, Snapshot};
use crate::model::{ClusterId, Locality};
use crate::proxy::ClientKind;
use crate::push::PushHandle;
use crate::source::{ClusterHealth, ClusterStatus};
use crate::translate::endpoint::{compact_priorities, lb_priority};
use crate::type_url::ResourceType;
use crate::xds::connections::{Connection, Connections, TypeStatus};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no proxyID given")]
    MissingProxyId,
    #[error("proxy {0} is not connected to this meshfed")]
    NotConnected(String),
    #[error(transparent)]
    ConfigDump(#[from] crate::config_dump::Error),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::Error),
}

impl Error {
    fn status(&self) -> StatusCode {
        match self {
            Error::MissingProxyId => StatusCode::BAD_REQUEST,
            Error::NotConnected(_) => StatusCode::NOT_FOUND,
            Error::ConfigDump(_) | Error::Metrics(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        (self.status(), format!("{self}\n")).into_response()
    }
}

#[derive(Clone)]
pub struct DebugState {
    pub push: PushHandle,
    pub connections: Arc<Connections>,
    /// current source errors (e.g. a topology file that does not parse)
    pub source_errors: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
    /// every cluster's source status (sync state, reachability, last event)
    pub clusters: ClusterHealth,
}

// ---------------------------------------------------------------------------------------------
// Push log
// ---------------------------------------------------------------------------------------------

/// How many pushes `/debug/push_status` keeps.
pub const PUSH_LOG_SIZE: usize = 100;

/// One push of the push loop.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PushRecord {
    pub generation: u64,
    /// what caused it (the services and gateways that changed)
    pub trigger: String,
    /// resources changed, by type (CDS, EDS, LDS, RDS); types without changes are absent
    pub types: BTreeMap<&'static str, usize>,
    #[serde(serialize_with = "ser_time")]
    pub time: SystemTime,
    /// translation and publication
    #[serde(rename = "durationMs", serialize_with = "ser_millis")]
    pub duration: Duration,
}

/// The last [`PUSH_LOG_SIZE`] pushes, oldest first. Cloning shares the log.
#[derive(Clone, Debug, Default)]
pub struct PushLog(Arc<Mutex<VecDeque<PushRecord>>>);

impl PushLog {
    /// The number of changed resources per type of a push (types without changes left out).
    pub fn counts(changes: &Changes) -> Vec<(ResourceType, usize)> {
        ResourceType::ALL
            .iter()
            .filter_map(|t| changes.get(*t).map(|c| (*t, c.0.len())))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    pub fn record(&self, generation: u64, trigger: String, counts: Vec<(ResourceType, usize)>, duration: Duration) {
        let record = PushRecord {
            generation,
            trigger,
            types: counts.into_iter().map(|(t, n)| (t.short(), n)).collect(),
            time: SystemTime::now(),
            duration,
        };
        if let Ok(mut log) = self.0.lock() {
            log.push_back(record);
            while log.len() > PUSH_LOG_SIZE {
                log.pop_front();
            }
        }
    }

    pub fn list(&self) -> Vec<PushRecord> {
        self.0.lock().map(|l| l.iter().cloned().collect()).unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// Sync status (istiod's proxy-status)
// ---------------------------------------------------------------------------------------------

/// A proxy's sync state for one type, as `istioctl proxy-status` computes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ConfigState {
    #[serde(rename = "SYNCED")]
    Synced,
    #[serde(rename = "STALE")]
    Stale,
    #[serde(rename = "NOT SENT")]
    NotSent,
    #[serde(rename = "ERROR")]
    Error,
}

impl ConfigState {
    /// ERROR if the last response was NACKed, NOT SENT if nothing was sent, SYNCED if the latest
    /// response was ACKed, else STALE.
    pub fn of(s: &TypeStatus) -> ConfigState {
        if s.last_error.is_some() {
            ConfigState::Error
        } else if s.sent_nonce.is_empty() {
            ConfigState::NotSent
        } else if s.acked_nonce == s.sent_nonce {
            ConfigState::Synced
        } else {
            ConfigState::Stale
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConfigState::Synced => "SYNCED",
            ConfigState::Stale => "STALE",
            ConfigState::NotSent => "NOT SENT",
            ConfigState::Error => "ERROR",
        }
    }
}

/// Proxies, not debug clients (istioctl) connected to ask questions.
pub fn proxies(connections: &Connections) -> Vec<Arc<Connection>> {
    connections.list().into_iter().filter(|c| c.proxy.client != ClientKind::Debug).collect()
}

/// The connection of `proxy_id` (`POD.NS`, or a full node id).
pub fn find_proxy(connections: &Connections, proxy_id: &str) -> Option<Arc<Connection>> {
    if proxy_id.contains('~') {
        connections.list().into_iter().rev().find(|c| &*c.proxy.id == proxy_id)
    } else {
        connections.find(proxy_id)
    }
}

/// istiod's `/debug/syncz` entry of one connection, with meshfed's extras (node_id, flavor, status).
pub fn syncz_entry(c: &Connection) -> Value {
    let status = c.status();
    let mut entry = serde_json::Map::new();
    let p = &c.proxy;
    if let Some(id) = &p.cluster_id {
        entry.insert("cluster_id".into(), json!(id));
    }
    entry.insert("proxy".into(), json!(&*p.key));
    entry.insert("proxy_type".into(), json!(p.kind.as_str()));
    if !p.istio_version.is_empty() {
        entry.insert("istio_version".into(), json!(&*p.istio_version));
    }
    for (t, prefix) in [
        (ResourceType::Cluster, "cluster"),
        (ResourceType::Listener, "listener"),
        (ResourceType::Route, "route"),
        (ResourceType::Endpoint, "endpoint"),
    ] {
        let s = &status[t.index()];
        if !s.sent_nonce.is_empty() {
            entry.insert(format!("{prefix}_sent"), json!(s.sent_nonce));
        }
        if !s.acked_nonce.is_empty() {
            entry.insert(format!("{prefix}_acked"), json!(s.acked_nonce));
        }
    }
    let mut resources = serde_json::Map::new();
    let mut states = serde_json::Map::new();
    for t in ResourceType::ALL {
        let s = &status[t.index()];
        let state = ConfigState::of(s);
        resources.insert(
            t.type_url().into(),
            json!({
                "sent": s.sent_nonce,
                "acked": s.acked_nonce,
                "sentTime": s.sent_at.map(rfc3339),
                "lastError": s.last_error,
                "status": state.as_str(),
                "subscribed": s.subscribed,
                "nacks": s.nacks,
            }),
        );
        states.insert(t.short().into(), json!(state.as_str()));
    }
    entry.insert("resources".into(), Value::Object(resources));
    entry.insert("node_id".into(), json!(&*p.id));
    entry.insert("flavor".into(), json!(c.flavor.as_str()));
    entry.insert("status".into(), Value::Object(states));
    entry.insert(
        "locality".into(),
        json!({ "region": &*p.locality.region, "zone": &*p.locality.zone, "subzone": &*p.locality.subzone }),
    );
    entry.insert("network".into(), json!(c.view().endpoints.network));
    entry.insert("connected_at".into(), json!(rfc3339(c.connected_at)));
    Value::Object(entry)
}

// ---------------------------------------------------------------------------------------------
// Explain: each locality's priority for a proxy, and why
// ---------------------------------------------------------------------------------------------

/// Why a locality has its priority for a proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// same region and zone as the proxy
    SameZone,
    /// same region, another zone
    SameRegion,
    /// another region
    OtherRegion,
    /// another region that a failover rule names for the proxy's region
    FailoverTarget,
    /// another region, after the failover target
    AfterFailoverTarget,
    /// failoverPriority: endpoints whose labels match the proxy's come first
    FailoverPriority,
    /// demoted because the endpoints' cluster is unreachable
    DemotedUnreachable,
    /// no priorities: the proxy has no locality, or locality failover is off
    NoPriorities,
    /// a policy meshfed cannot explain from the proxy's locality alone
    Policy,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExplainEndpoint {
    pub address: String,
    pub port: u32,
    pub health: String,
    /// the Kubernetes cluster the endpoint is in (for a gateway: the gateway's cluster)
    pub cluster: Option<String>,
    /// set when the endpoint is an east-west gateway standing for the remote endpoints
    pub via_gateway: Option<String>,
    pub weight: u32,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExplainLocality {
    pub locality: Locality,
    pub priority: u32,
    pub weight: Option<u32>,
    pub clusters: Vec<String>,
    pub endpoints: Vec<ExplainEndpoint>,
    pub rule: Rule,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExplainCluster {
    /// the Envoy cluster (`outbound|PORT||FQDN`)
    pub name: String,
    pub service: Option<String>,
    pub port: Option<u16>,
    /// localities by priority
    pub localities: Vec<ExplainLocality>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explain {
    pub proxy: String,
    pub node_id: String,
    pub proxy_type: &'static str,
    pub cluster_id: Option<String>,
    pub network: String,
    pub locality: Locality,
    /// whether the EDS carries priorities other than 0
    pub priorities_in_use: bool,
    pub summary: String,
    pub clusters: Vec<ExplainCluster>,
}

fn same_locality(a: &Locality, b: &Locality) -> bool {
    a.region == b.region && a.zone == b.zone && a.subzone == b.subzone
}

fn health_name(h: i32) -> String {
    use envoy_types::pb::envoy::config::core::v3::HealthStatus;
    HealthStatus::try_from(h).map(|h| h.as_str_name().to_string()).unwrap_or_else(|_| h.to_string())
}

/// Where endpoint addresses are: workload endpoints by address, gateways by address and port.
struct AddressBook {
    workloads: HashMap<IpAddr, String>,
    gateways: HashMap<(String, u32), (String, String)>,
    /// the clusters with endpoints in each locality
    localities: HashMap<Locality, std::collections::BTreeSet<String>>,
}

impl AddressBook {
    fn new(snapshot: &Snapshot) -> AddressBook {
        let mut workloads = HashMap::new();
        let mut localities: HashMap<Locality, std::collections::BTreeSet<String>> = HashMap::new();
        for s in snapshot.services.values() {
            for e in &s.endpoints {
                workloads.entry(e.address).or_insert_with(|| e.cluster.to_string());
                localities.entry(e.locality.clone()).or_default().insert(e.cluster.to_string());
            }
        }
        let gateways = snapshot
            .gateways
            .iter()
            .map(|g| ((g.address.to_string(), u32::from(g.port)), (g.cluster.to_string(), g.network.to_string())))
            .collect();
        AddressBook { workloads, gateways, localities }
    }
}

/// Explains the priorities in the ClusterLoadAssignments `proxy` is served: the priorities are read
/// from its EDS; the reasons derive from its locality as istiod's rules do (see
/// [`crate::translate::endpoint::lb_priority`]). Where the priorities in the EDS differ from what the
/// locality alone gives, a policy made them: failover (another region ranked before the others),
/// failoverPriority (one locality at several priorities), a demoted unreachable cluster, or "policy".
pub fn explain(conn: &Connection, snapshot: &Snapshot, health: &ClusterHealth) -> Explain {
    let proxy_loc = conn.view().endpoints.locality.clone();
    let book = AddressBook::new(snapshot);
    let demoted = health.demoted(SystemTime::now());
    let unreachable: HashMap<String, SystemTime> = health
        .list()
        .into_iter()
        .filter(|c| demoted.contains(&c.id))
        .filter_map(|c| c.unreachable_since.map(|t| (c.id.to_string(), t)))
        .collect();
    let mut out_clusters = Vec::new();
    let mut priorities_in_use = false;
    for r in crate::config_dump::served(conn, snapshot, ResourceType::Endpoint) {
        let Some(cla) = crate::config_dump::decode_resource::<ClusterLoadAssignment>(&r) else { continue };
        let explained = explain_cla(&proxy_loc, &cla, &book, &unreachable);
        priorities_in_use |= explained.localities.iter().any(|l| l.priority > 0);
        out_clusters.push(explained);
    }
    let p = &conn.proxy;
    let summary = if proxy_loc.is_empty() {
        "the proxy has no locality: every locality has priority 0".to_string()
    } else if !priorities_in_use {
        "every locality has priority 0: locality failover is off (istiod assigns failover priorities only \
         with outlierDetection), or all endpoints are in one locality"
            .to_string()
    } else {
        format!(
            "priorities relative to the proxy's locality {}/{}{}: 0 is used first; a higher priority takes \
             traffic when the lower ones are unhealthy",
            proxy_loc.region,
            proxy_loc.zone,
            if proxy_loc.subzone.is_empty() { String::new() } else { format!("/{}", proxy_loc.subzone) }
        )
    };
    Explain {
        proxy: p.key.to_string(),
        node_id: p.id.to_string(),
        proxy_type: p.kind.as_str(),
        cluster_id: p.cluster_id.as_ref().map(|c| c.to_string()),
        network: conn.view().endpoints.network.to_string(),
        locality: proxy_loc,
        priorities_in_use,
        summary,
        clusters: out_clusters,
    }
}

fn explain_cla(
    proxy_loc: &Locality,
    cla: &ClusterLoadAssignment,
    book: &AddressBook,
    unreachable: &HashMap<String, SystemTime>,
) -> ExplainCluster {
    let parsed = crate::translate::parse_outbound_cluster_name(&cla.cluster_name);
    let mut localities: Vec<ExplainLocality> = cla
        .endpoints
        .iter()
        .map(|l| {
            let loc = l.locality.as_ref().map(|x| Locality::new(&x.region, &x.zone, &x.sub_zone)).unwrap_or_default();
            let endpoints: Vec<ExplainEndpoint> = l
                .lb_endpoints
                .iter()
                .map(|e| {
                    let sa = match &e.host_identifier {
                        Some(HostIdentifier::Endpoint(ep)) => ep.address.as_ref().and_then(|a| match &a.address {
                            Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(sa)) => {
                                Some(sa)
                            }
                            _ => None,
                        }),
                        _ => None,
                    };
                    let address = sa.map(|s| s.address.clone()).unwrap_or_default();
                    let port = match sa.and_then(|s| s.port_specifier.as_ref()) {
                        Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p)) => {
                            *p
                        }
                        _ => 0,
                    };
                    let gateway = book.gateways.get(&(address.clone(), port));
                    let cluster = match gateway {
                        Some((c, _)) => Some(c.clone()),
                        None => address.parse::<IpAddr>().ok().and_then(|ip| book.workloads.get(&ip).cloned()),
                    };
                    ExplainEndpoint {
                        address,
                        port,
                        health: health_name(e.health_status),
                        cluster,
                        via_gateway: gateway.map(|(_, network)| format!("east-west gateway of network {network}")),
                        weight: e.load_balancing_weight.map(|w| w.value).unwrap_or(1),
                    }
                })
                .collect();
            let mut clusters: Vec<String> = endpoints.iter().filter_map(|e| e.cluster.clone()).collect();
            clusters.sort();
            clusters.dedup();
            if clusters.is_empty() {
                clusters = book.localities.get(&loc).map(|c| c.iter().cloned().collect()).unwrap_or_default();
            }
            ExplainLocality {
                locality: loc,
                priority: l.priority,
                weight: l.load_balancing_weight.map(|w| w.value),
                clusters,
                endpoints,
                rule: Rule::Policy,
                reason: String::new(),
            }
        })
        .collect();
    assign_reasons(proxy_loc, &mut localities, unreachable);
    for l in localities.iter_mut() {
        let endpoints: u32 = l.endpoints.iter().map(|e| e.weight).sum();
        if let Some(w) = l.weight.filter(|w| *w != endpoints) {
            l.reason.push_str(&format!(
                "; weight {w} (not its {endpoints} endpoint weight) comes from a localityLbSetting distribute rule"
            ));
        }
    }
    localities.sort_by(|a, b| a.priority.cmp(&b.priority).then_with(|| a.locality.cmp(&b.locality)));
    ExplainCluster {
        name: cla.cluster_name.clone(),
        service: parsed.map(|(_, _, fqdn)| fqdn.to_string()),
        port: parsed.map(|(port, _, _)| port),
        localities,
    }
}

fn locality_text(l: &Locality) -> String {
    let mut s = format!("{}/{}", l.region, l.zone);
    if !l.subzone.is_empty() {
        s.push('/');
        s.push_str(&l.subzone);
    }
    s
}

/// Sets `rule` and `reason` of every locality (priorities as in the EDS).
fn assign_reasons(proxy: &Locality, localities: &mut [ExplainLocality], unreachable: &HashMap<String, SystemTime>) {
    let raw: Vec<u32> = localities.iter().map(|l| lb_priority(proxy, &l.locality)).collect();
    let actual: Vec<u32> = localities.iter().map(|l| l.priority).collect();
    let mut expected = raw.clone();
    compact_priorities(&mut expected);
    if actual.iter().all(|p| *p == 0) && (proxy.is_empty() || expected.iter().any(|p| *p != 0)) {
        let reason = if proxy.is_empty() {
            "priority 0: the proxy has no locality, so every locality has the same priority"
        } else {
            "priority 0: no failover priorities for this service (istiod assigns them only with outlierDetection, \
             and not with a distribute rule)"
        };
        for l in localities.iter_mut() {
            l.rule = Rule::NoPriorities;
            l.reason = reason.to_string();
        }
        return;
    }
    let consistent = actual == expected;
    // Other-region localities at more than one priority: a failover rule ranked one region first.
    let other_region: Vec<u32> = raw.iter().zip(&actual).filter(|(r, _)| **r == 3).map(|(_, a)| *a).collect();
    let first_other = other_region.iter().min().copied();
    let failover_split = other_region.iter().any(|a| Some(*a) != first_other);
    for i in 0..localities.len() {
        let l = &localities[i];
        let loc = locality_text(&l.locality);
        let (rule, reason) = if consistent {
            base_reason(raw[i], &loc, proxy)
        } else if localities.iter().enumerate().any(|(j, o)| j != i && same_locality(&o.locality, &l.locality)) {
            (
                Rule::FailoverPriority,
                format!(
                    "failoverPriority: {loc} appears at several priorities; endpoints whose labels match the \
                     proxy's get the lower one"
                ),
            )
        } else if let Some((cluster, since)) = l
            .clusters
            .iter()
            .find_map(|c| unreachable.get(c).map(|t| (c.clone(), *t)))
            .filter(|_| actual[i] > expected[i])
        {
            (
                Rule::DemotedUnreachable,
                format!("demoted: cluster {cluster} has been unreachable since {}", rfc3339(since)),
            )
        } else if raw[i] == 3 && failover_split && Some(actual[i]) == first_other {
            (
                Rule::FailoverTarget,
                format!(
                    "failover target: {} is where a failover rule sends traffic from {} when it has no healthy endpoints",
                    l.locality.region, proxy.region
                ),
            )
        } else if raw[i] == 3 && failover_split {
            (Rule::AfterFailoverTarget, format!("other region ({}), after the failover target", l.locality.region))
        } else if actual[i] == expected[i] {
            base_reason(raw[i], &loc, proxy)
        } else {
            (Rule::Policy, format!("{loc}: priority set by policy"))
        };
        localities[i].rule = rule;
        localities[i].reason = reason;
    }
}

fn base_reason(raw: u32, loc: &str, proxy: &Locality) -> (Rule, String) {
    match raw {
        0 => (Rule::SameZone, format!("same zone: {loc} is the proxy's region and zone")),
        1 => {
            (Rule::SameZone, format!("same zone, other subzone: {loc} (the proxy is in subzone {:?})", &*proxy.subzone))
        }
        2 => (Rule::SameRegion, format!("same region, other zone: {loc} is in the proxy's region {}", proxy.region)),
        _ => (Rule::OtherRegion, format!("other region: {loc} is outside the proxy's region {}", proxy.region)),
    }
}

// ---------------------------------------------------------------------------------------------
// Time formatting
// ---------------------------------------------------------------------------------------------

/// RFC 3339 in UTC with milliseconds, e.g. `2025-01-31T12:34:56.789Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil from days (H. Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

fn ser_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1e6).round() / 1e3)
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

const INDEX_HTML: &str = include_str!("debug_ui/index.html");
const APP_JS: &str = include_str!("debug_ui/app.js");
const STYLE_CSS: &str = include_str!("debug_ui/style.css");
const FAVICON_SVG: &str = include_str!("debug_ui/favicon.svg");

/// The debug endpoints: (path, description), for `/debug` and `/debug/list`.
pub const ENDPOINTS: &[(&str, &str)] = &[
    ("/", "web UI: clusters, services, proxies, pushes"),
    ("/debug/syncz", "sync status of each connected proxy (istioctl proxy-status)"),
    ("/debug/config_dump?proxyID=POD.NS", "a proxy's envoy.admin.v3.ConfigDump (add &include_eds=true for EDS)"),
    ("/debug/explain?proxyID=POD.NS", "the priority each locality has for a proxy, and why"),
    ("/debug/registryz", "federated services"),
    ("/debug/endpointz", "endpoints of every federated service, with cluster, network, locality and health"),
    ("/debug/clusterz", "Kubernetes clusters: source and sync status"),
    ("/debug/adsz", "ADS connections and their subscriptions"),
    ("/debug/push_status", "recent pushes and what triggered them"),
    ("/debug/source_errors", "current errors of the cluster sources"),
    (
        "/debug/warnings",
        "what translation works around (failover without outlier detection, networks without a gateway, ...)",
    ),
    ("/debug/list", "this list, as JSON"),
    ("/metrics", "Prometheus metrics"),
    ("/ready", "readiness"),
    ("/healthz", "liveness"),
];

pub fn router(state: DebugState) -> Router {
    Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/ui/proxy", get(|| async { Html(INDEX_HTML) }))
        .route("/ui/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS) }))
        .route("/ui/style.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE_CSS) }))
        .route("/favicon.ico", get(|| async { ([(header::CONTENT_TYPE, "image/svg+xml")], FAVICON_SVG) }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/debug", get(index))
        .route("/debug/", get(index))
        .route("/debug/list", get(list))
        .route("/debug/syncz", get(syncz))
        .route("/debug/config_dump", get(config_dump))
        .route("/debug/explain", get(explain_handler))
        .route("/debug/registryz", get(registryz))
        .route("/debug/endpointz", get(endpointz))
        .route("/debug/clusterz", get(clusterz))
        .route("/debug/adsz", get(adsz))
        .route("/debug/push_status", get(push_status))
        .route("/debug/source_errors", get(source_errors))
        .route("/debug/warnings", get(warnings))
        .with_state(state)
}

type Params = Query<HashMap<String, String>>;

/// JSON, indented with `?pretty`.
fn json_out(params: &HashMap<String, String>, value: &impl Serialize) -> Response {
    let body =
        if params.contains_key("pretty") { serde_json::to_string_pretty(value) } else { serde_json::to_string(value) };
    match body {
        Ok(mut b) => {
            b.push('\n');
            ([(header::CONTENT_TYPE, "application/json")], b).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode JSON: {e}\n")).into_response(),
    }
}

async fn ready(State(s): State<DebugState>) -> impl IntoResponse {
    if s.push.is_ready() { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") }
}

async fn metrics(State(s): State<DebugState>) -> Result<Response, Error> {
    let m = crate::metrics::global();
    m.refresh(&s.connections.list(), s.push.snapshot().services.len(), &s.clusters.list());
    let text = m.encode()?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

async fn index() -> Html<String> {
    let mut rows = String::new();
    for (path, what) in ENDPOINTS {
        let href = path.split('?').next().unwrap_or(path);
        rows.push_str(&format!("<tr><td><a href=\"{href}\">{}</a></td><td>{what}</td></tr>\n", html_escape(path)));
    }
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>meshfed debug</title><link rel=\"icon\" href=\"/favicon.ico\">\
         <link rel=\"stylesheet\" href=\"/ui/style.css\"></head><body class=\"plain\"><h1>meshfed debug</h1>\
         <table class=\"grid\"><thead><tr><th>endpoint</th><th>what</th></tr></thead><tbody>{rows}</tbody></table>\
         <p>JSON endpoints indent their output with <code>?pretty</code>.</p></body></html>"
    ))
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

async fn list(Query(q): Params) -> Response {
    let items: Vec<Value> = ENDPOINTS.iter().map(|(path, what)| json!({ "name": path, "help": what })).collect();
    json_out(&q, &items)
}

async fn syncz(State(s): State<DebugState>, Query(q): Params) -> Response {
    let entries: Vec<Value> = proxies(&s.connections).iter().map(|c| syncz_entry(c)).collect();
    json_out(&q, &entries)
}

fn proxy_param(q: &HashMap<String, String>) -> Result<&str, Error> {
    q.get("proxyID")
        .or_else(|| q.get("proxy"))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or(Error::MissingProxyId)
}

async fn config_dump(State(s): State<DebugState>, Query(q): Params) -> Result<Response, Error> {
    let id = proxy_param(&q)?;
    let conn = find_proxy(&s.connections, id).ok_or_else(|| Error::NotConnected(id.to_string()))?;
    let include_eds = q.get("include_eds").is_some_and(|v| v == "true");
    let dump = crate::config_dump::config_dump(&conn, &s.push.snapshot(), include_eds)?;
    let value = crate::config_dump::to_json(&dump)?;
    Ok(json_out(&q, &value))
}

async fn explain_handler(State(s): State<DebugState>, Query(q): Params) -> Result<Response, Error> {
    let id = proxy_param(&q)?;
    let conn = find_proxy(&s.connections, id).ok_or_else(|| Error::NotConnected(id.to_string()))?;
    let e = explain(&conn, &s.push.snapshot(), &s.clusters);
    Ok(json_out(&q, &e))
}

async fn registryz(State(s): State<DebugState>, Query(q): Params) -> Response {
    let snap = s.push.snapshot();
    let services: Vec<_> = snap.services.values().map(|s| &**s).collect();
    let mut by_cluster: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for svc in snap.services.values() {
        for c in &svc.clusters {
            by_cluster.entry(c.to_string()).or_default().push(svc.hostname.to_string());
        }
    }
    json_out(
        &q,
        &json!({
            "generation": snap.generation,
            "clusters": &*snap.clusters_summary,
            "services": services,
            "servicesByCluster": by_cluster,
            "gateways": &*snap.gateways,
        }),
    )
}

async fn endpointz(State(s): State<DebugState>, Query(q): Params) -> Response {
    let snap = s.push.snapshot();
    let out: Vec<Value> = snap
        .services
        .values()
        .map(|svc| {
            let endpoints: Vec<Value> = svc
                .endpoints
                .iter()
                .map(|e| {
                    json!({
                        "address": e.address,
                        "ports": e.ports.iter().map(|(n, p)| json!({ "name": n, "port": p })).collect::<Vec<_>>(),
                        "cluster": e.cluster,
                        "network": e.network,
                        "locality": e.locality,
                        "health": e.health,
                        "workload": e.workload.as_ref().map(|w| json!({ "name": w.name, "namespace": w.namespace, "serviceAccount": w.service_account })),
                        "tlsMode": e.tls_mode(),
                    })
                })
                .collect();
            json!({
                "service": svc.key.to_string(),
                "hostname": svc.hostname,
                "ports": svc.ports,
                "clusters": svc.clusters,
                "endpoints": endpoints,
            })
        })
        .collect();
    json_out(&q, &out)
}

async fn clusterz(State(s): State<DebugState>, Query(q): Params) -> Response {
    let snap = s.push.snapshot();
    let errors = (s.source_errors)();
    let mut statuses: BTreeMap<ClusterId, ClusterStatus> =
        s.clusters.list().into_iter().map(|c| (c.id.clone(), c)).collect();
    for c in snap.clusters_summary.iter() {
        statuses.entry(c.id.clone()).or_insert_with(|| ClusterStatus::new(c.id.clone(), ""));
    }
    let now = SystemTime::now();
    let out: Vec<Value> = statuses
        .values()
        .map(|st| {
            let summary = snap.clusters_summary.iter().find(|c| c.id == st.id);
            let prefix = format!("cluster {}: ", st.id);
            let errs: Vec<&str> = errors.iter().filter_map(|e| e.strip_prefix(&prefix)).collect();
            let (mut endpoints, mut healthy) = (0usize, 0usize);
            let mut regions: std::collections::BTreeSet<String> = Default::default();
            for svc in snap.services.values() {
                for e in svc.endpoints.iter().filter(|e| e.cluster == st.id) {
                    endpoints += 1;
                    healthy += usize::from(e.health == crate::model::Health::Healthy);
                    if !e.locality.region.is_empty() {
                        regions.insert(e.locality.region.to_string());
                    }
                }
            }
            json!({
                "id": st.id,
                "secretName": st.secret_name.clone().unwrap_or_default(),
                "source": st.source,
                "syncStatus": st.sync,
                "network": summary.map(|c| c.network.to_string()).unwrap_or_default(),
                "regions": regions,
                "lastEvent": st.last_event.map(rfc3339),
                "lastEventAgeSeconds": st.last_event.map(|t| now.duration_since(t).unwrap_or_default().as_secs_f64()),
                "unreachableSince": st.unreachable_since.map(rfc3339),
                "lastError": st.last_error,
                "objectErrors": st.object_errors,
                "errors": errs,
                "objects": summary.map(|c| json!({
                    "namespaces": c.namespaces,
                    "services": c.services,
                    "endpointSlices": c.endpoint_slices,
                    "nodes": c.nodes,
                    "pods": c.pods,
                })),
                "endpoints": endpoints,
                "healthyEndpoints": healthy,
            })
        })
        .collect();
    json_out(&q, &out)
}

async fn adsz(State(s): State<DebugState>, Query(q): Params) -> Response {
    let conns: Vec<_> = s
        .connections
        .list()
        .iter()
        .map(|c| {
            json!({
                "id": c.id,
                "proxy": &*c.proxy.id,
                "key": &*c.proxy.key,
                "flavor": c.flavor.as_str(),
                "kind": c.proxy.kind,
                "client": c.proxy.client,
                "clusterId": c.proxy.cluster_id,
                "network": c.view().endpoints.network,
                "locality": c.proxy.locality,
                "connectedAt": rfc3339(c.connected_at),
                "types": ResourceType::ALL.iter().zip(c.status()).map(|(t, st)| (t.short(), st)).collect::<BTreeMap<_, _>>(),
            })
        })
        .collect();
    json_out(&q, &json!({ "totalClients": conns.len(), "connections": conns }))
}

async fn push_status(State(s): State<DebugState>, Query(q): Params) -> Response {
    let snap = s.push.snapshot();
    let mut pushes = s.push.push_log().list();
    pushes.reverse();
    json_out(&q, &json!({ "generation": snap.generation, "ready": s.push.is_ready(), "pushes": pushes }))
}

async fn source_errors(State(s): State<DebugState>, Query(q): Params) -> Response {
    json_out(&q, &(s.source_errors)())
}

/// Problems translation works around (failover without outlier detection, networks without a gateway,
/// endpoints without mTLS, unresolved gateway hostnames, invalid DestinationRules).
async fn warnings(State(s): State<DebugState>, Query(q): Params) -> Response {
    json_out(&q, &*s.push.warnings())
}

/// Serves the debug surface on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: DebugState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}

/// How the debug server is protected when it is exposed beyond loopback (`meshfed serve` requires one
/// of the two there).
#[derive(Clone, Debug, Default)]
pub struct DebugAccess {
    /// every request but `/healthz` and `/ready` must carry `Authorization: Bearer <token>`
    pub token: Option<Arc<str>>,
    /// serve HTTPS with this configuration
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// [`serve`] with a bearer token and/or TLS.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: DebugState,
    access: DebugAccess,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut app = router(state);
    if let Some(token) = access.token {
        app = require_bearer_token(app, token);
    }
    match access.tls {
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
        Some(config) => {
            let listener = crate::tls::TlsListener::new(listener, config)?;
            axum::serve(listener, app).with_graceful_shutdown(shutdown).await
        }
    }
}

/// Requires `Authorization: Bearer <token>` on every path but the probes (`/healthz`, `/ready`); 401
/// otherwise. The comparison takes the same time wherever the tokens differ.
pub fn require_bearer_token(router: Router, token: Arc<str>) -> Router {
    router.layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
        let token = token.clone();
        async move {
            let path = req.uri().path();
            let presented = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            let ok = matches!(path, "/healthz" | "/ready")
                || presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes()));
            if ok {
                next.run(req).await
            } else {
                (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "a bearer token is required\n")
                    .into_response()
            }
        }
    }))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(s: &str) -> Locality {
        Locality::parse(s)
    }

    fn l(s: &str, priority: u32, clusters: &[&str]) -> ExplainLocality {
        ExplainLocality {
            locality: loc(s),
            priority,
            weight: Some(1),
            clusters: clusters.iter().map(|c| c.to_string()).collect(),
            endpoints: Vec::new(),
            rule: Rule::Policy,
            reason: String::new(),
        }
    }

    fn rules(proxy: &str, ls: &mut [ExplainLocality], unreachable: &HashMap<String, SystemTime>) -> Vec<Rule> {
        assign_reasons(&loc(proxy), ls, unreachable);
        ls.iter().map(|l| l.rule).collect()
    }

    #[test]
    fn reasons_follow_the_locality_rules() {
        let mut ls = [
            l("us-east-1/us-east-1a", 0, &["aws"]),
            l("us-east-1/us-east-1b", 1, &["aws"]),
            l("westeurope/westeurope-1", 2, &["azure"]),
        ];
        assert_eq!(
            rules("us-east-1/us-east-1a", &mut ls, &HashMap::new()),
            [Rule::SameZone, Rule::SameRegion, Rule::OtherRegion]
        );
        assert!(ls[2].reason.contains("other region"), "{}", ls[2].reason);
    }

    #[test]
    fn all_zero_priorities_mean_no_failover() {
        let mut ls = [l("us-east-1/us-east-1a", 0, &[]), l("westeurope/westeurope-1", 0, &[])];
        assert_eq!(rules("us-east-1/us-east-1a", &mut ls, &HashMap::new()), [Rule::NoPriorities; 2]);
        let mut ls = [l("us-east-1/us-east-1a", 0, &[]), l("westeurope/westeurope-1", 0, &[])];
        assert_eq!(rules("", &mut ls, &HashMap::new()), [Rule::NoPriorities; 2]);
    }

    #[test]
    fn policies_are_recognised() {
        // failover: westeurope before ap-south-1 for us-east-1
        let mut ls = [
            l("us-east-1/us-east-1a", 0, &[]),
            l("westeurope/westeurope-1", 1, &[]),
            l("ap-south-1/ap-south-1a", 2, &[]),
        ];
        assert_eq!(
            rules("us-east-1/us-east-1a", &mut ls, &HashMap::new()),
            [Rule::SameZone, Rule::FailoverTarget, Rule::AfterFailoverTarget]
        );
        // failoverPriority: one locality at two priorities
        let mut ls = [l("us-east-1/us-east-1a", 0, &[]), l("us-east-1/us-east-1a", 1, &[]), l("westeurope/w1", 2, &[])];
        assert_eq!(rules("us-east-1/us-east-1a", &mut ls, &HashMap::new())[..2], [Rule::FailoverPriority; 2]);
        // a demoted unreachable cluster
        let unreachable: HashMap<String, SystemTime> = [("aws-b".to_string(), UNIX_EPOCH)].into();
        let mut ls = [
            l("us-east-1/us-east-1a", 0, &["aws-a"]),
            l("us-east-1/us-east-1b", 2, &["aws-b"]),
            l("westeurope/w1", 1, &["az"]),
        ];
        let r = rules("us-east-1/us-east-1a", &mut ls, &unreachable);
        assert_eq!(r[1], Rule::DemotedUnreachable);
        assert_eq!(r[2], Rule::Policy);
    }

    #[test]
    fn states_follow_istioctl() {
        let mut s = TypeStatus::default();
        assert_eq!(ConfigState::of(&s), ConfigState::NotSent);
        s.sent_nonce = "1".into();
        assert_eq!(ConfigState::of(&s), ConfigState::Stale);
        s.acked_nonce = "1".into();
        assert_eq!(ConfigState::of(&s), ConfigState::Synced);
        s.sent_nonce = "2".into();
        assert_eq!(ConfigState::of(&s), ConfigState::Stale);
        s.last_error = Some("bad".into());
        assert_eq!(ConfigState::of(&s), ConfigState::Error);
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789); // 2024-02-29 12:34:56.789
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.789Z");
    }

    #[test]
    fn push_log_is_bounded() {
        let log = PushLog::default();
        for g in 0..(PUSH_LOG_SIZE as u64 + 10) {
            log.record(g, "t".into(), vec![(ResourceType::Endpoint, 1)], Duration::ZERO);
        }
        let l = log.list();
        assert_eq!(l.len(), PUSH_LOG_SIZE);
        assert_eq!(l[0].generation, 10);
    }
}
