//! The debug HTTP surface (default 127.0.0.1:15014): health, readiness, istiod-compatible debug
//! endpoints, Prometheus metrics and a live web UI, all reading the same state the xDS streams read.
//!
//! | path | what |
//! |---|---|
//! | `/` , `/ui/proxy?id=POD.NS`, `/ui/traffic` | the web UI (static, embedded; polls the JSON endpoints) |
//! | `/debug` | HTML index of the endpoints; `/debug/list` the same as JSON |
//! | `/debug/config_dump?proxyID=POD.NS[&include_eds=true]` | the proxy's `envoy.admin.v3.ConfigDump` |
//! | `/debug/syncz` | istiod's sync status per proxy, plus per-type status |
//! | `/debug/registryz`, `/debug/endpointz` | federated services, their endpoints |
//! | `/debug/clusterz` | per Kubernetes cluster: source, sync status, restored last-known state and its age, counts |
//! | `/debug/adsz` | connections and their subscriptions |
//! | `/debug/push_status` | the last pushes ([`crate::push::log`]) |
//! | `/debug/explain?proxyID=POD.NS` | each locality's priority for the proxy, and why |
//! | `/debug/whatif?proxyID=POD.NS&host=FQDN[&drain=C][&down=C]` | each cluster's and locality's share of the proxy's requests, now and under a hypothesis ([`whatif`]) |
//! | `/debug/trafficz` | the traffic policy's decisions, reasons and failover state |
//! | `/debug/drillz` | drills: steps, when every proxy had ACKed each, the abort or the end ([`crate::traffic::drill`]) |
//! | `/metrics` | Prometheus text format ([`crate::metrics`]) |
//!
//! Every JSON endpoint indents its output with `?pretty`.
//!
//! The surface only reads: it holds handles to the push loop's snapshots ([`PushHandle`]), the connected
//! proxies' status ([`Connections`]) and the sources' health, and owns none of that state. Its parts:
//! [`auth`] (bearer token, TLS), [`config_dump`] (istiod's config dumps and the istioctl types over ADS),
//! [`explain`] (locality priorities and why), [`traffic`] (the decisions as a table of shares), [`whatif`]
//! (shares now and under a hypothesis), [`ui`] (the web UI's files).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use serde_json::{Value, json};

use crate::model::ClusterId;
use crate::push::PushHandle;
use crate::source::{ClusterHealth, ClusterStatus};
use crate::type_url::ResourceType;
use crate::xds::connections::{ConfigState, Connection, Connections};

pub mod auth;
pub mod config_dump;
pub mod explain;
pub mod time;
pub mod traffic;
pub mod ui;
pub mod whatif;

pub use auth::DebugAccess;
pub use time::rfc3339;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no proxyID given")]
    MissingProxyId,
    #[error("proxy {0} is not connected to this meshfed")]
    NotConnected(String),
    #[error(transparent)]
    ConfigDump(#[from] config_dump::Error),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::Error),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    WhatIf(#[from] whatif::Error),
}

impl Error {
    fn status(&self) -> StatusCode {
        match self {
            Error::MissingProxyId | Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::WhatIf(_) => StatusCode::NOT_FOUND,
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
    /// the gateway probes' latest report (None: probing off)
    pub gateway_probes: Option<tokio::sync::watch::Receiver<Arc<crate::liveness::Report>>>,
    /// the live mesh config's reload status (None: not watched)
    pub mesh_config: Option<tokio::sync::watch::Receiver<Arc<crate::config_watch::Status>>>,
    /// the `TrafficPolicy` custom resource's watch (None: mesh config without `trafficPolicy`)
    pub traffic_policy: Option<tokio::sync::watch::Receiver<crate::traffic_policy::watch::Status>>,
    /// serving the built-in demo (no mesh config given): every page and `/debug/warnings` say so
    pub demo: bool,
}

/// The warning (and banner) of a meshfed serving its built-in demo.
pub const DEMO_WARNING: &str = "meshfed serves its BUILT-IN DEMO topology (no --mesh-config was given), not your \
     clusters: in production, mount the mesh config and pass --mesh-config";

// ---------------------------------------------------------------------------------------------
// Sync status (istiod's /debug/syncz)
// ---------------------------------------------------------------------------------------------

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
    // "ads": every type on one stream; "eds": beside istiod, only endpoints, one stream per cluster
    entry.insert("service".into(), json!(c.service.as_str()));
    if c.service != crate::xds::connections::XdsService::Ads {
        entry.insert("streams".into(), json!(c.stream_status().len()));
    }
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
// HTTP
// ---------------------------------------------------------------------------------------------

/// The debug endpoints: (path, description), for `/debug` and `/debug/list`.
pub const ENDPOINTS: &[(&str, &str)] = &[
    ("/", "web UI: clusters, services, proxies, pushes"),
    ("/ui/traffic", "web UI: shares per service and source region, drains, drills, what-if"),
    ("/debug/syncz", "sync status of each connected proxy (istioctl proxy-status)"),
    ("/debug/config_dump?proxyID=POD.NS", "a proxy's envoy.admin.v3.ConfigDump (add &include_eds=true for EDS)"),
    ("/debug/explain?proxyID=POD.NS", "the priority each locality has for a proxy, and why"),
    (
        "/debug/whatif?proxyID=POD.NS&host=FQDN",
        "each cluster's share of a proxy's requests now and with &drain=CLUSTER or &down=CLUSTER (or &region=R instead of proxyID)",
    ),
    ("/debug/trafficz", "the traffic policy's decisions: each cluster's share per source region, and why"),
    ("/debug/drillz", "drills: each step, when every proxy connected then had ACKed its EDS, the abort or the end"),
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

/// Every route of the debug server: the web UI ([`ui`]) and the endpoints of [`ENDPOINTS`].
pub fn router(state: DebugState) -> Router {
    ui::routes(Router::new())
        .route("/healthz", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/debug", get(index))
        .route("/debug/", get(index))
        .route("/debug/list", get(list))
        .route("/debug/syncz", get(syncz))
        .route("/debug/config_dump", get(config_dump))
        .route("/debug/explain", get(explain_handler))
        .route("/debug/whatif", get(whatif_handler))
        .route("/debug/trafficz", get(trafficz))
        .route("/debug/drillz", get(drillz))
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
    let snapshot = s.push.snapshot();
    m.refresh(&s.connections.proxy_counts(), snapshot.services.len(), &s.clusters.list());
    m.set_global_health(&crate::global_health::all(&snapshot));
    let reports = drill_reports(&s, &snapshot);
    let mut by_target: BTreeMap<String, (bool, Option<f64>)> = BTreeMap::new();
    for r in &reports {
        // the latest drill of a target (reports are in start order per target)
        let e = by_target.entry(r.label.clone()).or_default();
        e.0 |= r.active;
        if let Some(ack) = r.steps.iter().rev().find_map(|s| s.acks.as_ref().and_then(|a| a.ack_seconds)) {
            e.1 = Some(ack);
        }
    }
    m.set_drills(&by_target.into_iter().map(|(t, (a, ack))| (t, a, ack)).collect::<Vec<_>>());
    let text = m.encode()?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

async fn index(State(s): State<DebugState>) -> Html<String> {
    let banner = if s.demo {
        format!("<p class=\"banner\" role=\"alert\">{}</p>", html_escape(DEMO_WARNING))
    } else {
        String::new()
    };
    let mut rows = String::new();
    for (path, what) in ENDPOINTS {
        let href = path.split('?').next().unwrap_or(path);
        rows.push_str(&format!("<tr><td><a href=\"{href}\">{}</a></td><td>{what}</td></tr>\n", html_escape(path)));
    }
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>meshfed debug</title><link rel=\"icon\" href=\"/favicon.ico\">\
         <link rel=\"stylesheet\" href=\"/ui/style.css\"></head><body class=\"plain\">{banner}<h1>meshfed debug</h1>\
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
    let entries: Vec<Value> = s.connections.proxies().iter().map(|c| syncz_entry(c)).collect();
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
    let conn = s.connections.find_proxy(id).ok_or_else(|| Error::NotConnected(id.to_string()))?;
    let include_eds = q.get("include_eds").is_some_and(|v| v == "true");
    let dump = config_dump::config_dump(&conn, &s.push.snapshot(), include_eds)?;
    let value = config_dump::to_json(&dump)?;
    Ok(json_out(&q, &value))
}

async fn explain_handler(State(s): State<DebugState>, Query(q): Params) -> Result<Response, Error> {
    let id = proxy_param(&q)?;
    let conn = s.connections.find_proxy(id).ok_or_else(|| Error::NotConnected(id.to_string()))?;
    let e = explain::explain(&conn, &s.push.snapshot(), &s.clusters);
    Ok(json_out(&q, &e))
}

async fn whatif_handler(State(s): State<DebugState>, Query(q): Params) -> Result<Response, Error> {
    use crate::proxy::{ProxyKind, TlsSupport};
    let host = q.get("host").filter(|h| !h.is_empty()).ok_or_else(|| Error::BadRequest("no host given".into()))?;
    let port = match q.get("port") {
        None => None,
        Some(p) => Some(p.parse::<u16>().map_err(|_| Error::BadRequest(format!("port {p:?} is not a port")))?),
    };
    let cluster = |k: &str| q.get(k).filter(|v| !v.is_empty()).map(ClusterId::new);
    let hypothesis = whatif::Hypothesis { drain: cluster("drain"), down: cluster("down") };
    let snapshot = s.push.snapshot();
    let (scope, clusters) = match (proxy_param(&q), q.get("region").filter(|r| !r.is_empty())) {
        (Ok(id), _) => {
            let conn = s.connections.find_proxy(id).ok_or_else(|| Error::NotConnected(id.to_string()))?;
            let view = conn.view();
            (view.endpoints, view.clusters)
        }
        (Err(_), Some(region)) => {
            // a sidecar with mesh certificates in that region (and `network`, if given)
            let zone = q.get("zone").map(String::as_str).unwrap_or("");
            let scope = crate::translate::EndpointScope {
                kind: ProxyKind::Sidecar,
                network: crate::model::NetworkId::new(q.get("network").map(String::as_str).unwrap_or("")),
                locality: crate::model::Locality::new(region, zone, ""),
                cluster_id: None,
                labels: Vec::new(),
                tls: TlsSupport::Agent,
                rules: Default::default(),
            };
            let clusters = crate::translate::ClusterScope {
                kind: ProxyKind::Sidecar,
                tls: TlsSupport::Agent,
                rules: Default::default(),
            };
            (scope, clusters)
        }
        (Err(e), None) => return Err(e),
    };
    let w = whatif::whatif(&snapshot, &scope, &clusters, host, port, &hypothesis, SystemTime::now())?;
    Ok(json_out(&q, &w))
}

async fn trafficz(State(s): State<DebugState>, Query(q): Params) -> Response {
    let snapshot = s.push.snapshot();
    let now = SystemTime::now();
    let drains: Vec<Value> = snapshot
        .traffic
        .policy
        .drains
        .iter()
        .map(|d| {
            json!({
                "target": d.target.to_string(),
                "capacity": d.capacity,
                "capacityNow": if d.expired(now) { 100 } else { d.capacity_at(now) },
                "ramp": d.ramp.map(|r| format!("-{}% every {:?}", r.step, r.every)),
                "rampStep": d.ramp.map(|r| r.step),
                "rampEverySeconds": d.ramp.map(|r| r.every.as_secs_f64()),
                "start": d.start.map(crate::traffic::decide::time_str),
                "expires": crate::traffic::decide::time_str(d.expires),
                "expired": d.expired(now),
                "reason": d.reason,
                "drill": d.drill.as_ref().map(|x| {
                    let key = crate::traffic::drill::key(d);
                    let aborted = snapshot.traffic.drills.get(&key).is_some_and(|r| r.aborted.is_some());
                    let recorded = x.aborted.is_some();
                    json!({ "abortBelowHealthy": x.abort_below_healthy, "key": key, "aborted": aborted, "abortRecorded": recorded })
                }),
            })
        })
        .collect();
    let unknown_clusters = unknown_traffic_clusters(&snapshot);
    let mut out = json!({
        "decisions": &*snapshot.context.traffic,
        "shares": traffic::shares(&snapshot.context.traffic, snapshot.clusters_summary.iter().map(|c| (&c.id, &c.network))),
        "status": &*snapshot.traffic,
        "drains": drains,
        "drills": drill_reports(&s, &snapshot),
        "unknownClusters": unknown_clusters.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
    });
    if let Some(status) = &s.mesh_config {
        out["meshConfig"] = json!(&**status.borrow());
    }
    if let Some(status) = &s.traffic_policy {
        out["trafficPolicy"] = json!(&*status.borrow());
    }
    json_out(&q, &out)
}

/// A drill's report with, per step, when every proxy connected at its publish had ACKed its EDS.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct DrillView<'a> {
    key: &'a str,
    active: bool,
    #[serde(skip)]
    label: String,
    #[serde(flatten)]
    report: &'a crate::traffic::drill::Report,
    #[serde(rename = "stepAcks")]
    steps: Vec<StepView<'a>>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct StepView<'a> {
    #[serde(flatten)]
    step: &'a crate::traffic::drill::Step,
    /// None: not published yet
    acks: Option<crate::traffic::drill::StepAcks>,
}

fn drill_reports<'a>(s: &DebugState, snapshot: &'a crate::cache::Snapshot) -> Vec<DrillView<'a>> {
    use crate::traffic::drill;
    let proxies: Vec<drill::ProxyAcks> = s.connections.proxies().iter().map(|c| c.eds_acks()).collect();
    snapshot
        .traffic
        .drills
        .iter()
        .map(|(key, r)| DrillView {
            key,
            active: r.active(),
            label: r.label.clone(),
            report: r,
            steps: r.steps.iter().map(|st| StepView { step: st, acks: drill::step_acks(st, &proxies) }).collect(),
        })
        .collect()
}

async fn drillz(State(s): State<DebugState>, Query(q): Params) -> Response {
    let snapshot = s.push.snapshot();
    let reports = drill_reports(&s, &snapshot);
    json_out(&q, &json!({ "drills": reports }))
}

/// The clusters the traffic policy names that the registry does not know (with remote secrets, a policy
/// may name a cluster before its secret is read).
fn unknown_traffic_clusters(snapshot: &crate::cache::Snapshot) -> Vec<ClusterId> {
    snapshot.traffic.policy.unknown_clusters(snapshot.clusters_summary.iter().map(|c| &c.id))
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
    let report = s.gateway_probes.as_ref().map(|r| r.borrow().clone());
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
                "restoredFrom": crate::source::restored_json(st.restored_from, now),
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
                "gateways": summary.map(|c| gateway_evidence(report.as_deref(), &c.network, st.unreachable_since.is_some())),
            })
        })
        .collect();
    json_out(&q, &out)
}

/// The gateway probes' evidence about a cluster's network, for `/debug/clusterz`.
fn gateway_evidence(
    report: Option<&crate::liveness::Report>,
    network: &crate::model::NetworkId,
    api_unreachable: bool,
) -> Value {
    let Some(report) = report else { return json!({"probing": false}) };
    let addresses: Vec<Value> = report
        .evidence
        .networks()
        .get(network)
        .into_iter()
        .flatten()
        .map(|(address, e)| {
            json!({
                "address": address.to_string(),
                "state": e.state,
                "consecutiveFailures": e.consecutive_failures,
                "consecutiveSuccesses": e.consecutive_successes,
                "downSince": e.down_since_wall.map(rfc3339),
                "lastProbe": e.last.as_ref().map(|p| json!({"ok": p.ok, "at": rfc3339(p.at), "error": p.error})),
            })
        })
        .collect();
    let fenced = report.verdict.fenced.contains(network);
    let reachable = report.verdict.reachable.contains(network);
    let verdict = match (fenced, reachable, api_unreachable) {
        (true, _, true) => "API unreachable, gateways down: fenced, last resort for other networks",
        (true, _, false) => "fenced: every gateway address down; last resort for other networks",
        (false, true, true) => "API unreachable, gateways up: serving at normal priorities",
        (false, true, false) => "gateways up",
        (false, false, true) => "API unreachable, no gateway addresses to probe: demoted after the grace period",
        (false, false, false) => "no gateway addresses to probe",
    };
    json!({
        "probing": true,
        "fenced": fenced,
        "verdict": verdict,
        "rounds": report.rounds,
        "addresses": addresses,
    })
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
                "service": c.service.as_str(),
                "kind": c.proxy.kind,
                "client": c.proxy.client,
                "clusterId": c.proxy.cluster_id,
                "network": c.view().endpoints.network,
                "locality": c.proxy.locality,
                "connectedAt": rfc3339(c.connected_at),
                "types": ResourceType::ALL.iter().zip(c.status()).map(|(t, st)| (t.short(), st)).collect::<BTreeMap<_, _>>(),
                // per-type streams (beside istiod): one line per stream
                "streams": c.stream_status().into_iter().map(|(id, st)| json!({"id": id, "status": st})).collect::<Vec<_>>(),
            })
        })
        .collect();
    json_out(&q, &json!({ "totalClients": conns.len(), "connections": conns }))
}

async fn push_status(State(s): State<DebugState>, Query(q): Params) -> Response {
    let snap = s.push.snapshot();
    let pushes: Vec<Value> = s
        .push
        .push_log()
        .list()
        .iter()
        .rev()
        .map(|p| {
            json!({
                "generation": p.generation,
                "trigger": p.trigger,
                "types": p.types,
                "time": rfc3339(p.time),
                "durationMs": (p.duration.as_secs_f64() * 1e6).round() / 1e3,
            })
        })
        .collect();
    json_out(&q, &json!({ "generation": snap.generation, "ready": s.push.is_ready(), "pushes": pushes }))
}

async fn source_errors(State(s): State<DebugState>, Query(q): Params) -> Response {
    json_out(&q, &(s.source_errors)())
}

/// Problems translation works around (failover without outlier detection, networks without a gateway,
/// endpoints without mTLS, unresolved gateway hostnames, invalid DestinationRules), and resources proxies
/// subscribe to that meshfed does not serve (`unknown-resource`: beside istiod, an EnvoyFilter that selects
/// a service meshfed does not know).
async fn warnings(State(s): State<DebugState>, Query(q): Params) -> Response {
    let mut out: Vec<Value> = s.push.warnings().iter().map(|w| json!(w)).collect();
    if s.demo {
        out.insert(0, json!({ "kind": "built-in-demo", "subject": "mesh config", "message": DEMO_WARNING }));
    }
    if let Some(status) = &s.traffic_policy {
        out.extend(status.borrow().warnings());
    }
    if let Some(status) = &s.mesh_config {
        out.extend(status.borrow().warnings());
    }
    let snapshot = s.push.snapshot();
    for id in unknown_traffic_clusters(&snapshot) {
        out.push(json!({
            "kind": "traffic-unknown-cluster",
            "subject": id.as_str(),
            "message": format!(
                "the traffic policy names cluster {id:?}, which the registry does not know (not listed, no \
                 remote secret for it yet): its shares go to no endpoint until it joins"
            ),
        }));
    }
    for c in s.connections.list() {
        for (t, st) in ResourceType::ALL.iter().zip(c.status()) {
            if st.missing.is_empty() {
                continue;
            }
            let names: Vec<&str> = st.missing.iter().map(|n| &**n).collect();
            out.push(json!({
                "kind": "unknown-resource",
                "subject": &*c.proxy.id,
                "message": format!(
                    "proxy {} subscribes to {} {} that meshfed does not serve: {}; they get the protocol's \
                     answer for a resource that does not exist (is the service federated, is its EnvoyFilter \
                     selecting the right hosts?)",
                    c.proxy.id,
                    names.len(),
                    t.short(),
                    names.join(", ")
                ),
            }));
        }
    }
    json_out(&q, &out)
}

/// Serves the debug surface on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: DebugState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
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
        app = auth::require_bearer_token(app, token);
    }
    match access.tls {
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
        Some(config) => {
            let listener = crate::tls::TlsListener::new(listener, config)?;
            axum::serve(listener, app).with_graceful_shutdown(shutdown).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::liveness::evidence::{Evidence, ProbeResult, Thresholds, Verdict};
    use crate::model::NetworkId;

    fn report(fail: bool) -> crate::liveness::Report {
        let mut evidence = Evidence::default();
        let a: std::net::SocketAddr = "10.0.0.1:15443".parse().unwrap();
        evidence.set_targets(&[(NetworkId::new("azure-net"), [a].into())].into());
        let t = Thresholds { failure: 1, success: 1, hold_down: std::time::Duration::ZERO };
        let at = SystemTime::UNIX_EPOCH;
        let r =
            if fail { ProbeResult::failure(at, "connect 10.0.0.1:15443: refused") } else { ProbeResult::success(at) };
        evidence.record(a, r, std::time::Instant::now(), t);
        let verdict: Verdict = evidence.verdict();
        crate::liveness::Report { config: Default::default(), evidence, verdict, rounds: 1 }
    }

    #[test]
    fn clusterz_gateway_evidence_says_what_decides_the_clusters_priorities() {
        let azure = NetworkId::new("azure-net");
        assert_eq!(gateway_evidence(None, &azure, true), json!({"probing": false}));
        let up = report(false);
        let v = gateway_evidence(Some(&up), &azure, true);
        assert_eq!(v["verdict"], "API unreachable, gateways up: serving at normal priorities", "{v}");
        assert_eq!(v["fenced"], false);
        assert_eq!(v["addresses"][0]["state"], "up", "{v}");
        assert_eq!(gateway_evidence(Some(&up), &azure, false)["verdict"], "gateways up");
        let down = report(true);
        let v = gateway_evidence(Some(&down), &azure, false);
        assert_eq!(v["fenced"], true, "{v}");
        assert_eq!(v["addresses"][0]["state"], "down");
        assert_eq!(v["addresses"][0]["lastProbe"]["error"], "connect 10.0.0.1:15443: refused");
        assert_eq!(v["addresses"][0]["lastProbe"]["at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["addresses"][0]["consecutiveFailures"], 1);
        assert!(
            gateway_evidence(Some(&down), &azure, true)["verdict"]
                .as_str()
                .unwrap()
                .starts_with("API unreachable, gateways down")
        );
        let v = gateway_evidence(Some(&up), &NetworkId::new("gcp-net"), true);
        assert_eq!(v["addresses"], json!([]));
        assert!(v["verdict"].as_str().unwrap().contains("demoted after the grace period"), "{v}");
    }
}
