//! The debug surface as operators and their tools see it, against `meshfed serve` on a copy of the
//! two-clouds demo:
//!
//! - `/debug/config_dump` of a real Envoy sidecar and of an east-west gateway (a scripted ADS client),
//!   with and without EDS, parsed strictly as `envoy.admin.v3.ConfigDump` by Python protobuf with the
//!   xds-protos Envoy APIs (`tests/python/parse_config_dump.py`), every Any resolved;
//! - `/debug/syncz` moving NOT SENT -> SYNCED -> STALE -> ERROR with scripted clients, SYNCED for Envoy,
//!   and the same over ADS (`istio.io/debug/syncz`, `istio.io/debug/config_dump`);
//! - `/metrics` parsed by Prometheus' Python client (`tests/python/parse_metrics.py`), with the values
//!   the test caused;
//! - the web UI in headless Chromium (`tests/ui/ui_test.mjs`, playwright-core), with screenshots in
//!   `tests/artifacts/`: the overview, a proxy's page, and the traffic page (ratings split 70/30, the
//!   what-if form for the sidecar with Azure drained, a drill started while the page is open).
//!
//! Needs `.venv` or `$MESHFED_ENVOY` and `$MESHFED_PYTHON` (Envoy; Python with xds-protos and
//! prometheus-client), Node.js with `tests/ui/node_modules`, and
//! `/usr/bin/chromium`, all installed by `scripts/test-all.sh`; anything missing fails the test (never
//! skips). Each test uses its own loopback octet (see `meshfed_testkit::server::copy_demo`).

use meshfed_testkit as support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use envoy_types::pb::envoy::admin::v3::{ClustersConfigDump, ConfigDump};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::status::v3::{ClientConfig, ConfigStatus};
use envoy_types::pb::google::protobuf::value::Kind;
use prost::Message;
use serde_json::Value;
use support::ads::{AdsClient, Flavor, Response};
use support::fixtures::node;
use support::{ChildGuard, Meshfed, bootstrap, poll_until, start_envoy};

/// Bound on waiting for something that must happen.
const TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on the headless browser test.
const UI_TIMEOUT: Duration = Duration::from_secs(120);

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const REVIEWS: &str = "outbound|9080||reviews.shop.svc.cluster.local";

const SECTIONS: [&str; 7] = [
    "envoy.admin.v3.BootstrapConfigDump",
    "envoy.admin.v3.ClustersConfigDump",
    "envoy.admin.v3.ListenersConfigDump",
    "envoy.admin.v3.ScopedRoutesConfigDump",
    "envoy.admin.v3.RoutesConfigDump",
    "envoy.admin.v3.SecretsConfigDump",
    "envoy.admin.v3.EcdsConfigDump",
];

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `tests/python/<script> <file>` and parses its stdout as JSON.
fn run_python(script: &str, file: &Path) -> Result<Value> {
    let mut cmd = Command::new(support::python_path());
    cmd.arg(crate_dir().join("tests/python").join(script)).arg(file);
    let out = support::run_command(script, &mut cmd)?;
    serde_json::from_str(&out).with_context(|| format!("{script}: not JSON: {out}"))
}

/// A copy of the demo on 127.<octet>.0.0/16 and meshfed serving it.
struct Setup {
    dir: tempfile::TempDir,
    octet: u8,
    meshfed: Meshfed,
}

impl Setup {
    async fn start(octet: u8) -> Setup {
        Setup::start_with(octet, &support::MeshfedOptions::default()).await
    }

    async fn start_with(octet: u8, options: &support::MeshfedOptions) -> Setup {
        Setup::start_with_mesh(octet, options, "").await
    }

    /// [`Setup::start_with`], with `extra` appended to the demo's mesh config (e.g. a `traffic:` section).
    async fn start_with_mesh(octet: u8, options: &support::MeshfedOptions, extra: &str) -> Setup {
        let dir = tempfile::Builder::new().prefix("meshfed-debug-surface-").tempdir().expect("temp dir");
        let mesh = meshfed_testkit::server::copy_demo(dir.path(), octet);
        if !extra.is_empty() {
            let text = std::fs::read_to_string(&mesh).expect("read mesh config");
            support::write_atomically(&mesh, &format!("{text}{extra}")).expect("write mesh config");
        }
        let meshfed = support::start_meshfed_with(&mesh, options).await.expect("meshfed starts");
        Setup { dir, octet, meshfed }
    }

    fn mesh_config(&self) -> PathBuf {
        self.dir.path().join("mesh.yaml")
    }

    /// Adds a ready `reviews` endpoint `127.<octet>.1.<host>` in aws-use1/us-east-1a (a new file).
    fn add_reviews_endpoint(&self, host: u8) {
        let yaml = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: reviews-extra\n  namespace: shop\n  \
             labels:\n    kubernetes.io/service-name: reviews\naddressType: IPv4\nendpoints:\n- addresses:\n  - 127.{}.1.{host}\n  \
             conditions:\n    ready: true\n    serving: true\n    terminating: false\n  nodeName: ip-10-0-1-10.ec2.internal\n  \
             zone: us-east-1a\nports:\n- name: http\n  port: 9080\n  protocol: TCP\n",
            self.octet
        );
        support::write_atomically(&self.dir.path().join("aws-use1/reviews-extra.yaml"), &yaml).expect("write slice");
    }

    async fn json(&self, path: &str) -> Result<Value> {
        self.meshfed.debug_json(path).await
    }

    /// The `/debug/syncz` entry of `key` (POD.NS).
    async fn syncz(&self, key: &str) -> Result<Value> {
        let all = self.json("/debug/syncz").await?;
        all.as_array()
            .ok_or_else(|| anyhow!("/debug/syncz is not an array: {all}"))?
            .iter()
            .find(|e| e["proxy"] == key)
            .cloned()
            .ok_or_else(|| anyhow!("{key} not in /debug/syncz: {all}"))
    }

    /// Waits until `key`'s per-type statuses (CDS, EDS, LDS, RDS) are `want`; returns its entry.
    async fn wait_status(&self, key: &str, want: [&str; 4]) -> Value {
        poll_until(TIMEOUT, || async {
            let e = self.syncz(key).await?;
            let got: Vec<&str> =
                ["CDS", "EDS", "LDS", "RDS"].iter().map(|t| e["status"][t].as_str().unwrap_or("")).collect();
            ensure!(got == want, "{key}: status {got:?}, want {want:?}: {e}");
            Ok(e)
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Scripted ADS clients
// ---------------------------------------------------------------------------------------------

/// A sidecar in aws-use1, us-east-1a.
fn sidecar_node(octet: u8, pod: &str) -> Node {
    node(
        &format!("sidecar~127.{octet}.50.9~{pod}.shop~shop.svc.cluster.local"),
        &[
            ("CLUSTER_ID", "aws-use1"),
            ("NETWORK", "aws-net"),
            ("INTERCEPTION_MODE", "NONE"),
            ("ISTIO_VERSION", "1.27.0"),
        ],
        Some(("us-east-1", "us-east-1a")),
    )
}

/// aws-use1's east-west gateway.
fn gateway_node(octet: u8) -> Node {
    node(
        &format!("router~127.{octet}.10.2~istio-eastwestgateway-0.istio-system~istio-system.svc.cluster.local"),
        &[("CLUSTER_ID", "aws-use1"), ("NETWORK", "aws-net"), ("REQUESTED_NETWORK_VIEW", "aws-net")],
        Some(("us-east-1", "us-east-1a")),
    )
}

/// istioctl's kind of client (node metadata GENERATOR=event).
fn debug_node(octet: u8) -> Node {
    node(
        &format!("sidecar~127.{octet}.60.1~istioctl-1.istio-system~istio-system.svc.cluster.local"),
        &[("GENERATOR", "event")],
        None,
    )
}

/// A client of `flavor` connected to meshfed as `node`, its steps bounded by [`TIMEOUT`].
async fn connect(meshfed: &Meshfed, flavor: Flavor, node: Node) -> AdsClient {
    AdsClient::connect(meshfed.xds_address(), flavor, node)
        .await
        .unwrap_or_else(|e| panic!("connecting to meshfed: {e}"))
        .with_timeouts(TIMEOUT, support::ads::QUIET)
}

/// Subscribes `client` to `type_url` (`names`; empty: wildcard), skips to the response of that type and
/// ACKs it.
async fn subscribe_and_ack(client: &mut AdsClient, type_url: &str, names: &[&str]) -> Response {
    client.subscribe(type_url, names).await.expect("subscribing");
    let r = client.skip_to(type_url).await.expect("a response");
    client.ack(&r).await.expect("ACKing");
    r
}

fn cluster_names(r: &Response) -> Vec<String> {
    r.decode_all::<Cluster>().expect("Clusters").into_iter().map(|c| c.name).collect()
}

/// An EDS-type cluster's name as its ClusterLoadAssignment is named.
fn eds_names(r: &Response) -> Vec<String> {
    r.decode_all::<Cluster>()
        .expect("Clusters")
        .into_iter()
        .filter(|c| c.eds_cluster_config.is_some())
        .map(|c| {
            let service_name = c.eds_cluster_config.map(|e| e.service_name).unwrap_or_default();
            if service_name.is_empty() { c.name } else { service_name }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Config dumps
// ---------------------------------------------------------------------------------------------

/// Fetches a config dump, has Python parse it strictly, and checks its sections; returns the summary.
async fn checked_dump(setup: &Setup, key: &str, include_eds: bool) -> Value {
    let path = format!("/debug/config_dump?proxyID={key}{}", if include_eds { "&include_eds=true" } else { "" });
    let (status, body) = setup.meshfed.debug_get(&path).await.expect("GET config_dump");
    assert_eq!(status, 200, "{path}: {body}");
    let file = setup.dir.path().join(format!("dump-{key}-{include_eds}.json"));
    std::fs::write(&file, &body).expect("write dump");
    let summary = run_python("parse_config_dump.py", &file).unwrap_or_else(|e| panic!("{path}: {e:#}"));
    let mut want: Vec<&str> = SECTIONS.to_vec();
    if include_eds {
        want.insert(2, "envoy.admin.v3.EndpointsConfigDump");
    }
    assert_eq!(summary["sections"], serde_json::json!(want), "{path}: sections in istiod's order");
    let value: Value = serde_json::from_str(&body).expect("JSON");
    assert!(
        value["configs"][1]["dynamic_active_clusters"].is_array(),
        "{path}: Envoy's (proto) field names: {}",
        &body[..body.len().min(400)]
    );
    summary
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dumps_of_a_sidecar_and_a_gateway_parse_strictly() {
    support::envoy_path();
    support::python_path(); // (with xds-protos and prometheus-client)
    let setup = Setup::start(81).await;
    let xds_port = setup.meshfed.xds_port;
    let sidecar_id = "sidecar~127.81.50.1~client-0.shop~shop.svc.cluster.local";
    let yaml = bootstrap(sidecar_id, xds_port, false, 0, "aws-use1", "aws-net", "us-east-1/us-east-1a");
    let envoy = start_envoy(&yaml).await.expect("Envoy starts");

    // The east-west gateway: a scripted client that subscribes like Envoy and ACKs.
    let mut gw = connect(&setup.meshfed, Flavor::Sotw, gateway_node(81)).await;
    let cds = subscribe_and_ack(&mut gw, CDS, &[]).await;
    let eds = eds_names(&cds);
    if !eds.is_empty() {
        let names: Vec<&str> = eds.iter().map(String::as_str).collect();
        subscribe_and_ack(&mut gw, EDS, &names).await;
    }
    subscribe_and_ack(&mut gw, LDS, &[]).await;

    // A real Envoy is SYNCED on every type.
    setup.wait_status("client-0.shop", ["SYNCED"; 4]).await;

    // 400 without a proxy, 404 for one that is not connected.
    assert_eq!(setup.meshfed.debug_get("/debug/config_dump").await.unwrap().0, 400);
    assert_eq!(setup.meshfed.debug_get("/debug/config_dump?proxyID=nobody.shop").await.unwrap().0, 404);

    let without = checked_dump(&setup, "client-0.shop", false).await;
    let with = checked_dump(&setup, "client-0.shop", true).await;
    let clusters = strings(&with["clusters"]);
    assert!(clusters.contains(REVIEWS), "sidecar dump has {REVIEWS}: {clusters:?}");
    assert_eq!(strings(&without["clusters"]), clusters);
    assert!(strings(&without["endpoints"]).is_empty());
    assert!(strings(&with["endpoints"]).contains(REVIEWS), "EDS in the dump: {with}");
    assert!(!strings(&with["listeners"]).is_empty(), "sidecar listeners: {with}");
    assert!(!strings(&with["routes"]).is_empty(), "sidecar routes: {with}");
    let any_types = strings(&with["any_types"]);
    assert!(
        any_types.iter().any(|t| t.ends_with("HttpConnectionManager")),
        "nested typed_config Anys are dumped with @type and resolved: {any_types:?}"
    );

    // What meshfed dumps is what the Envoy holds.
    let envoy_dump: Value = serde_json::from_str(&envoy.admin_get("/config_dump").await.unwrap()).unwrap();
    let envoy_clusters: BTreeSet<String> = envoy_dump["configs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["@type"] == "type.googleapis.com/envoy.admin.v3.ClustersConfigDump")
        .flat_map(|c| c["dynamic_active_clusters"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["cluster"]["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(envoy_clusters, clusters, "Envoy's own dynamic clusters");

    // The gateway's dumps parse too, and hold what it was sent.
    let gw_key = "istio-eastwestgateway-0.istio-system";
    let gw_with = checked_dump(&setup, gw_key, true).await;
    checked_dump(&setup, gw_key, false).await;
    assert_eq!(strings(&gw_with["clusters"]), cluster_names(&cds).into_iter().collect::<BTreeSet<_>>());
    let gw_eds_status = if eds.is_empty() { "NOT SENT" } else { "SYNCED" };
    assert_eq!(strings(&gw_with["endpoints"]), eds.into_iter().collect::<BTreeSet<_>>());
    assert!(strings(&gw_with["routes"]).is_empty(), "the gateway did not subscribe to RDS");
    setup.wait_status(gw_key, ["SYNCED", gw_eds_status, "SYNCED", "NOT SENT"]).await;
    drop(envoy);
}

// ---------------------------------------------------------------------------------------------
// Sync status and metrics
// ---------------------------------------------------------------------------------------------

/// The value of the sample of `family` whose labels include `labels` (None if there is none).
fn sample(metrics: &Value, family: &str, suffix: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics[family]["samples"].as_array()?.iter().find_map(|s| {
        let name = s[0].as_str()?;
        let ok = name == format!("{family}{suffix}") && labels.iter().all(|(k, v)| s[1][*k].as_str() == Some(*v));
        if ok { s[2].as_f64() } else { None }
    })
}

/// The sum of every sample of `family` named `family + suffix`.
fn total(metrics: &Value, family: &str, suffix: &str) -> f64 {
    metrics[family]["samples"]
        .as_array()
        .map(|a| {
            a.iter().filter(|s| s[0].as_str() == Some(&format!("{family}{suffix}"))).filter_map(|s| s[2].as_f64()).sum()
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncz_follows_acks_and_nacks_and_metrics_count_them() {
    support::python_path(); // (with xds-protos and prometheus-client)
    let setup = Setup::start(82).await;

    // Connected, but nothing sent: a named RDS subscription to a route that does not exist.
    let mut a = connect(&setup.meshfed, Flavor::Sotw, sidecar_node(82, "client-a")).await;
    a.subscribe(RDS, &["no-such-route"]).await.unwrap();
    setup.wait_status("client-a.shop", ["NOT SENT"; 4]).await;

    // Sent and ACKed: SYNCED.
    a.subscribe(EDS, &[REVIEWS]).await.unwrap();
    let first = a.skip_to(EDS).await.unwrap();
    assert_eq!(first.resources.len(), 1);
    a.ack(&first).await.unwrap();
    let e = setup.wait_status("client-a.shop", ["NOT SENT", "SYNCED", "NOT SENT", "NOT SENT"]).await;
    assert_eq!(e["endpoint_sent"], first.nonce.as_str(), "istiod's nonce fields: {e}");
    assert_eq!(e["endpoint_acked"], first.nonce.as_str());
    assert_eq!(e["proxy_type"], "sidecar");
    assert_eq!(e["cluster_id"], "aws-use1");
    assert_eq!(e["istio_version"], "1.27.0");

    // A second proxy (the gateway) that ACKs everything.
    let mut gw = connect(&setup.meshfed, Flavor::Sotw, gateway_node(82)).await;
    let cds = subscribe_and_ack(&mut gw, CDS, &[]).await;
    let gw_eds = eds_names(&cds);
    let gw_reviews: Vec<&str> = gw_eds.iter().map(String::as_str).filter(|n| n.contains("reviews")).collect();
    assert!(!gw_reviews.is_empty(), "the east-west gateway gets reviews' clusters: {gw_eds:?}");
    subscribe_and_ack(&mut gw, EDS, &gw_reviews).await;

    // A change: a new reviews endpoint. The sidecar does not ACK it: STALE.
    setup.add_reviews_endpoint(29);
    let update = a.skip_to(EDS).await.unwrap();
    assert_ne!(update.nonce, first.nonce);
    setup.wait_status("client-a.shop", ["NOT SENT", "STALE", "NOT SENT", "NOT SENT"]).await;
    // The gateway ACKs its update: a convergence.
    let r = gw.skip_to(EDS).await.unwrap();
    gw.ack(&r).await.unwrap();

    // The sidecar NACKs it (keeping the first version): ERROR, with the message.
    a.nack(&update, "test rejects this assignment").await.unwrap();
    let e = setup.wait_status("client-a.shop", ["NOT SENT", "ERROR", "NOT SENT", "NOT SENT"]).await;
    assert_eq!(e["resources"][EDS]["lastError"], "test rejects this assignment", "{e}");

    // Over ADS, as istioctl asks: one ClientConfig per proxy (not the asking client itself).
    let mut dbg = connect(&setup.meshfed, Flavor::Sotw, debug_node(82)).await;
    dbg.subscribe::<&str>("istio.io/debug/syncz", &[]).await.unwrap();
    let r = dbg.skip_to("istio.io/debug/syncz").await.unwrap();
    let configs: BTreeMap<String, ClientConfig> = r
        .resources
        .iter()
        .map(|a| {
            assert_eq!(a.body.type_url, "type.googleapis.com/envoy.service.status.v3.ClientConfig");
            let c = ClientConfig::decode(&a.body.value[..]).expect("ClientConfig");
            (c.node.as_ref().expect("node").id.clone(), c)
        })
        .collect();
    assert_eq!(
        configs.keys().cloned().collect::<Vec<_>>(),
        ["client-a.shop", "istio-eastwestgateway-0.istio-system"],
        "one ClientConfig per proxy"
    );
    let status_of = |key: &str, url: &str| {
        configs[key].generic_xds_configs.iter().find(|g| g.type_url == url).map(|g| g.config_status)
    };
    assert_eq!(status_of("client-a.shop", EDS), Some(ConfigStatus::Error as i32));
    assert_eq!(status_of("client-a.shop", CDS), Some(ConfigStatus::NotSent as i32));
    assert_eq!(status_of("istio-eastwestgateway-0.istio-system", CDS), Some(ConfigStatus::Synced as i32));
    let a_node = configs["client-a.shop"].node.clone().unwrap();
    let meta = a_node.metadata.unwrap().fields;
    assert_eq!(meta["CLUSTER_ID"].kind, Some(Kind::StringValue("aws-use1".into())));
    assert_eq!(meta["NAMESPACE"].kind, Some(Kind::StringValue("shop".into())));
    let eds_state = configs["client-a.shop"].generic_xds_configs.iter().find(|g| g.type_url == EDS).unwrap();
    assert_eq!(eds_state.error_state.as_ref().map(|e| e.details.as_str()), Some("test rejects this assignment"));

    dbg.subscribe("istio.io/debug/config_dump", &["istio-eastwestgateway-0.istio-system"]).await.unwrap();
    let r = dbg.skip_to("istio.io/debug/config_dump").await.unwrap();
    assert_eq!(r.resources.len(), 1);
    assert_eq!(r.resources[0].body.type_url, "type.googleapis.com/envoy.admin.v3.ConfigDump");
    let dump = ConfigDump::decode(&r.resources[0].body.value[..]).expect("ConfigDump");
    let clusters = ClustersConfigDump::decode(&dump.configs[1].value[..]).expect("ClustersConfigDump");
    assert_eq!(clusters.dynamic_active_clusters.len(), cds.resources.len());

    // ... and over Delta.
    let mut delta = connect(&setup.meshfed, Flavor::Delta, debug_node(82)).await;
    delta.subscribe::<&str>("istio.io/debug/syncz", &[]).await.unwrap();
    let r = delta.recv().await.expect("delta answer");
    let names: BTreeSet<&str> = r.resources.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["client-a.shop", "istio-eastwestgateway-0.istio-system"]));
    drop((delta, dbg));

    // The metrics show what happened.
    let metrics = poll_until(TIMEOUT, || async {
        let (status, body) = setup.meshfed.debug_get("/metrics").await?;
        ensure!(status == 200, "/metrics: {status}");
        let file = setup.dir.path().join("metrics.txt");
        std::fs::write(&file, &body)?;
        let m = run_python("parse_metrics.py", &file)?;
        let clients = total(&m, "pilot_xds", "");
        ensure!(clients == 2.0, "pilot_xds: {clients} connected, want 2 (debug clients are not proxies)\n{body}");
        // the gateway's ACK of the change is processed on its own stream
        let converged = total(&m, "pilot_proxy_convergence_time", "_count");
        ensure!(converged >= 1.0, "pilot_proxy_convergence_time: {converged} observations\n{body}");
        Ok(m)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(sample(&metrics, "pilot_xds", "", &[("type", "sidecar"), ("flavor", "sotw")]), Some(1.0));
    assert_eq!(sample(&metrics, "pilot_xds", "", &[("type", "router"), ("flavor", "sotw")]), Some(1.0));
    assert_eq!(metrics["pilot_xds_pushes"]["type"], "counter");
    let eds_pushes = sample(&metrics, "pilot_xds_pushes", "_total", &[("type", "eds")]).unwrap_or(0.0);
    assert!(eds_pushes >= 2.0, "EDS responses sent: {eds_pushes}");
    let nacks = sample(&metrics, "pilot_total_xds_rejects", "_total", &[("type", "eds")]).unwrap_or(0.0);
    assert!(nacks >= 1.0, "NACKs: {nacks}");
    assert!(total(&metrics, "pilot_xds_push_time", "_count") >= 1.0, "push time observed");
    assert!(total(&metrics, "meshfed_xds_resources_sent", "_total") >= 2.0);
    assert!(total(&metrics, "meshfed_xds_bytes_sent", "_total") > 0.0);
    assert!(total(&metrics, "meshfed_pushes", "_total") >= 2.0, "initial push and the change");
    assert!(total(&metrics, "meshfed_debounce_merged_events", "_total") >= 1.0, "the initial syncs merged");
    assert!(total(&metrics, "pilot_services", "") >= 3.0);
    for cluster in ["aws-use1", "azure-weu"] {
        assert_eq!(
            sample(&metrics, "meshfed_cluster_watch_state", "", &[("cluster", cluster), ("state", "synced")]),
            Some(1.0),
            "{cluster} synced"
        );
        let age = sample(&metrics, "meshfed_cluster_last_event_age_seconds", "", &[("cluster", cluster)]);
        assert!(age.is_some_and(|a| a >= 0.0), "{cluster}: last event age {age:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The web UI in headless Chromium
// ---------------------------------------------------------------------------------------------

/// The priority of each locality (`REGION/ZONE`) of `cluster` in a config dump with EDS.
fn eds_priorities(dump: &Value, cluster: &str) -> BTreeMap<String, u64> {
    let cla = dump["configs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["@type"] == "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump")
        .flat_map(|c| c["dynamic_endpoint_configs"].as_array().cloned().unwrap_or_default())
        .map(|e| e["endpoint_config"].clone())
        .find(|c| c["cluster_name"] == cluster)
        .unwrap_or_else(|| panic!("{cluster} in the dump"));
    cla["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let loc = &l["locality"];
            let mut name = format!("{}/{}", loc["region"].as_str().unwrap_or("?"), loc["zone"].as_str().unwrap_or("?"));
            if let Some(s) = loc["sub_zone"].as_str().filter(|s| !s.is_empty()) {
                name = format!("{name}/{s}");
            }
            (name, l["priority"].as_u64().unwrap_or(0))
        })
        .collect()
}

const RATINGS_HOST: &str = "ratings.shop.svc.cluster.local";
const RATINGS: &str = "outbound|9080||ratings.shop.svc.cluster.local";

/// ratings split 70/30 from us-east-1 and 30/70 from westeurope (the traffic page's table).
const RATINGS_SPLIT: &str = "traffic:\n  policies:\n    - hosts: [ratings.shop.svc.cluster.local]\n      split:\n        us-east-1: {aws-use1: 70, azure-weu: 30}\n        westeurope: {azure-weu: 70, aws-use1: 30}\n";

/// `/debug/whatif`'s `byCluster` of `part` (`now`, `whatIf`) as cluster -> percent.
fn by_cluster(w: &Value, part: &str) -> BTreeMap<String, f64> {
    w[part]["byCluster"]
        .as_object()
        .map(|o| o.iter().filter_map(|(c, v)| Some((c.clone(), v.as_f64()?))).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_ui_in_headless_chromium() {
    support::envoy_path();
    let chromium = PathBuf::from(std::env::var("MESHFED_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    assert!(chromium.is_file(), "{} is missing: scripts/test-all.sh installs Debian's chromium", chromium.display());
    let ui_dir = crate_dir().join("tests/ui");
    assert!(
        ui_dir.join("node_modules/playwright-core").is_dir(),
        "tests/ui/node_modules is missing: run `npm ci` in tests/ui (scripts/test-all.sh does)"
    );

    // as deployed: the debug surface behind a token, which the page asks for
    let token = "ui-test-token-0123456789abcdef";
    let options = support::MeshfedOptions { debug_token: Some(token.to_string()), ..Default::default() };
    let setup = Setup::start_with_mesh(83, &options, RATINGS_SPLIT).await;
    let sidecar_id = "sidecar~127.83.50.1~client-0.shop~shop.svc.cluster.local";
    let yaml = bootstrap(sidecar_id, setup.meshfed.xds_port, false, 0, "aws-use1", "aws-net", "us-east-1/us-east-1a");
    let _envoy = start_envoy(&yaml).await.expect("Envoy starts");
    setup.wait_status("client-0.shop", ["SYNCED"; 4]).await;

    let dump = setup.json("/debug/config_dump?proxyID=client-0.shop&include_eds=true").await.expect("dump");
    let priorities = eds_priorities(&dump, REVIEWS);
    assert!(priorities.values().any(|p| *p > 0), "the demo has failover priorities: {priorities:?}");
    // A sidecar with mesh certificates in us-east-1 (scripted: it ACKs every response until the test
    // ends), which reaches Azure's ratings through the east-west gateway; the Envoy, without them, does not.
    let mut mtls = connect(&setup.meshfed, Flavor::Sotw, sidecar_node(83, "client-1")).await;
    subscribe_and_ack(&mut mtls, CDS, &[]).await;
    subscribe_and_ack(&mut mtls, EDS, &[RATINGS]).await;
    let acker = tokio::spawn(async move {
        let until = tokio::time::Instant::now() + UI_TIMEOUT + TIMEOUT;
        while let Ok(Some(r)) = mtls.recv_until(until).await {
            if mtls.ack(&r).await.is_err() {
                break;
            }
        }
    });
    // What the what-if form must show: ratings 70/30 for the mTLS sidecar now, all to AWS with Azure
    // drained; all to AWS for the Envoy either way (the split decides; the EDS it can use is AWS's).
    let mut whatifs = Vec::new();
    for (proxy, now_aws) in [("client-1.shop", 70.0), ("client-0.shop", 100.0)] {
        let path = format!("/debug/whatif?proxyID={proxy}&host={RATINGS_HOST}&drain=azure-weu");
        let w = setup.json(&path).await.expect("whatif");
        let (now, drained) = (by_cluster(&w, "now"), by_cluster(&w, "whatIf"));
        assert_eq!(now.get("aws-use1").map(|x| x.round()), Some(now_aws), "{proxy}: {w:#}");
        assert_eq!(now.get("azure-weu").map(|x| x.round()), Some(100.0 - now_aws), "{proxy}: {w:#}");
        assert_eq!(drained.get("aws-use1"), Some(&100.0), "{proxy}: {w:#}");
        assert_eq!(drained.get("azure-weu").copied().unwrap_or(0.0), 0.0, "{proxy}: {w:#}");
        whatifs.push(serde_json::json!({ "proxy": proxy, "now": now, "drained": drained }));
    }
    let artifacts = crate_dir().join("tests/artifacts");
    let new_endpoint = "127.83.1.29";
    let expected = serde_json::json!({
        "base": format!("http://{}", setup.meshfed.debug_address()),
        "proxy": "client-0.shop",
        "cluster": REVIEWS,
        "priorities": priorities,
        "newEndpoint": new_endpoint,
        "artifacts": artifacts,
        "chromium": chromium,
        "token": token,
        "traffic": {
            "host": RATINGS_HOST,
            // the split's rows, then (after the drill at 50%) Azure's half of its split share goes to AWS
            "shares": {"us-east-1": {"aws-use1": 70, "azure-weu": 30}, "westeurope": {"aws-use1": 30, "azure-weu": 70}},
            "drilled": {"us-east-1": {"aws-use1": 85, "azure-weu": 15}, "westeurope": {"aws-use1": 65, "azure-weu": 35}},
            "drain": "azure-weu",
            "whatif": whatifs,
            "proxies": 2,
        },
    });
    let expected_file = setup.dir.path().join("ui-expected.json");
    std::fs::write(&expected_file, expected.to_string()).unwrap();

    let mut cmd = Command::new("node");
    cmd.arg(ui_dir.join("ui_test.mjs")).arg(&expected_file).current_dir(&ui_dir);
    let mut node =
        ChildGuard::spawn("ui-test", &mut cmd).expect("node runs (Node.js is installed by scripts/test-all.sh)");
    // Once the overview is up, add an endpoint: the page must show it without a reload. Once the traffic
    // page has shown the split, start a drill: the page must show it, its step, and the new shares.
    let mesh_file = setup.mesh_config();
    let mesh_file = mesh_file.to_str().expect("utf-8 path");
    let deadline = Instant::now() + UI_TIMEOUT;
    let (mut ready, mut drill) = (false, false);
    while !drill {
        let out = node.stdout();
        if !ready && out.lines().any(|l| l == "READY") {
            setup.add_reviews_endpoint(29);
            ready = true;
        }
        if !drill && out.lines().any(|l| l == "DRILL") {
            let args = ["drill", "--cluster", "azure-weu", "--duration", "1h", "--ramp-step", "50", "--ramp-every"];
            let more = ["1h", "--abort-below-healthy", "10", "--reason", "UI test drill", "--mesh-config", mesh_file];
            let args: Vec<&str> = args.into_iter().chain(more).collect();
            support::meshfed::traffic_cmd(&args).unwrap_or_else(|e| panic!("{e:#}"));
            drill = true;
        }
        if let Some(status) = node.try_exited() {
            panic!("UI test exited early ({status})\n{}", node.log_tail());
        }
        let what = if ready { "DRILL" } else { "READY" };
        assert!(Instant::now() < deadline, "UI test not {what} within {UI_TIMEOUT:?}\n{}", node.log_tail());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = node.wait_exit(deadline.saturating_duration_since(Instant::now())).expect("UI test finishes");
    assert!(status.success(), "UI test failed ({status})\n{}", node.log_tail());
    assert!(node.stdout().lines().any(|l| l == "PASS"), "{}", node.log_tail());
    for shot in ["debug-ui-overview.png", "debug-ui-proxy.png", "debug-ui-traffic.png"] {
        let meta = std::fs::metadata(artifacts.join(shot)).unwrap_or_else(|e| panic!("{shot}: {e}"));
        assert!(meta.len() > 10_000, "{shot} is {} bytes", meta.len());
    }
    // The endpoint the page showed is in the proxy's EDS too.
    eds_has(&setup, new_endpoint).await.unwrap_or_else(|e| panic!("{e:#}"));
    acker.abort();
}

/// The sidecar's EDS (in its config dump) has `endpoint`.
async fn eds_has(setup: &Setup, endpoint: &str) -> Result<()> {
    poll_until(TIMEOUT, || async {
        let (_, body) = setup.meshfed.debug_get("/debug/config_dump?proxyID=client-0.shop&include_eds=true").await?;
        if !body.contains(endpoint) {
            bail!("{endpoint} not in the EDS yet");
        }
        Ok(())
    })
    .await
}
