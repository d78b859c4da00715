//! Beside istiod, end to end with a real Envoy 1.40: its clusters, listeners and routes come from an
//! istiod-shaped source, its endpoints from meshfed over the per-type EDS service.
//!
//! istiod cannot run here, so its part is played by files Envoy watches (`path_config_source`) holding
//! what istiod renders for a sidecar in aws-use1: the clusters `outbound|9080||reviews`, `...|v1|...` and
//! `...|v2|...` (istiod's `reviews-9080` cluster of `tests/fixtures/istiod/`, one per DestinationRule
//! subset, without the mTLS transport socket: the demo's backends are plain HTTP) patched with the MERGE
//! `meshfed istio` prints, and a listener whose route splits 90/10 between the subsets as a
//! VirtualService renders. `meshfed-xds` is the cluster `meshfed istio` ADDs (Delta: it comes by CDS,
//! as an EnvoyFilter adds it) or the static cluster of its bootstrap-override form (SotW: Envoy wants it
//! static). Over mTLS, its certificates come from a test CA under istio-agent's SDS names `default` and
//! `ROOTCA` (static secrets here), and meshfed checks the client identity.
//!
//! Checked: each subset cluster holds exactly its pods' endpoints from both clouds with istiod's
//! failover priorities; the 90/10 split holds within ±5 points over 400 requests; an EndpointSlice edit
//! reaches Envoy; meshfed killed -> Envoy keeps its endpoints and traffic flows; meshfed back (same
//! address) -> Envoy resubscribes and converges; no update is rejected.

use meshfed_testkit as support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use clap::Parser;
use meshfed::istio::{Inventory, IstioArgs, Options, Plan};
use meshfed::mesh_config::MeshConfig;
use serde_json::{Value, json};
use support::{
    Envoy, Meshfed, MeshfedOptions, TestCa, addr4, free_port, http_get, ip4, poll_until, start_backends, start_envoy,
    start_meshfed_with,
};

const SERVICE: &str = "reviews.shop.svc.cluster.local";
const PORT: u16 = 9080;
const V1: &str = "outbound|9080|v1|reviews.shop.svc.cluster.local";
const V2: &str = "outbound|9080|v2|reviews.shop.svc.cluster.local";
const ALL: &str = "outbound|9080||reviews.shop.svc.cluster.local";
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// requests checked for the 90/10 split (acceptance: 400 or more, within ±5 points; 1,000 make a 5-point
/// miss a 5-sigma event: the binomial standard deviation of a 10% share is 0.95 points)
const SPLIT_REQUESTS: usize = 1000;

/// The demo's zones, by the third octet of their addresses: us-east-1a, us-east-1b (aws-use1),
/// westeurope-1, westeurope-2 (azure-weu). In each, host .21 runs reviews v1 and .22 reviews v2.
const ZONES: [u8; 4] = [1, 2, 3, 4];
const V1_HOST: u8 = 21;
const V2_HOST: u8 = 22;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: IstioArgs,
}

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/istiod").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("fixture is JSON")
}

/// What `meshfed istio ARGV` plans for the mesh config `mesh`.
async fn plan(mesh: &Path, argv: &[&str]) -> Plan {
    let mut full = vec!["istio"];
    full.extend_from_slice(argv);
    let mut a = Cli::try_parse_from(full).expect("valid arguments").args;
    a.mesh_config = Some(mesh.to_path_buf());
    let config = MeshConfig::load(mesh).expect("mesh config");
    let options = Options::from_args(&a, &config).expect("options");
    let inventory = Inventory::load(&config, false).await.expect("inventory");
    meshfed::istio::plan(&inventory, &config, &options).expect("a plan")
}

/// The values of the patches with `operation` in the proxy context of `who`.
fn patch_values<'a>(plan: &'a Plan, who: Who, operation: &str) -> Vec<&'a Value> {
    plan.objects
        .iter()
        .filter(|o| o["kind"] == "EnvoyFilter")
        .flat_map(|o| o["spec"]["configPatches"].as_array().expect("configPatches"))
        .filter(|p| p["patch"]["operation"] == operation && p["match"]["context"] == who.context())
        .map(|p| &p["patch"]["value"])
        .collect()
}

/// Where Envoy's `meshfed-xds` cluster points and how it authenticates.
struct XdsTarget {
    port: u16,
    /// (client certificate, key, root) as istio-agent would serve them over SDS; None: plaintext
    tls: Option<support::MeshIdentity>,
}

/// `meshfed-xds` as `meshfed istio` ADDs it, pointed at the test's meshfed: over mTLS with the SDS
/// secrets `default`/`ROOTCA` taken from the bootstrap's static secrets (istio-agent's stand-in), or
/// plaintext.
fn meshfed_xds_cluster(plan: &Plan, who: Who, target: &XdsTarget) -> Value {
    // the EnvoyFilter's ADD (Delta), or the static cluster of the bootstrap override (SotW)
    let mut c = match patch_values(plan, who, "ADD").first() {
        Some(v) => (*v).clone(),
        None => {
            let cm = plan.objects.iter().find(|o| o["kind"] == "ConfigMap").expect("a bootstrap ConfigMap");
            let text = cm["data"][meshfed::istio::envoy_filter::CUSTOM_BOOTSTRAP_KEY].as_str().expect("the override");
            let bootstrap: Value = serde_json::from_str(text).expect("the override is JSON");
            bootstrap["static_resources"]["clusters"][0].clone()
        }
    };
    assert_eq!(c["name"], "meshfed-xds");
    c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] =
        json!({ "address": "127.0.0.1", "port_value": target.port });
    let ctx = &mut c["transport_socket"]["typed_config"]["common_tls_context"];
    assert_eq!(ctx["tls_certificate_sds_secret_configs"][0]["name"], "default");
    assert_eq!(ctx["combined_validation_context"]["validation_context_sds_secret_config"]["name"], "ROOTCA");
    match target.tls {
        Some(_) => {
            // the same secret names, served by the bootstrap's static secrets instead of istio-agent
            ctx["tls_certificate_sds_secret_configs"][0].as_object_mut().unwrap().remove("sds_config");
            ctx["combined_validation_context"]["validation_context_sds_secret_config"]
                .as_object_mut()
                .unwrap()
                .remove("sds_config");
        }
        None => {
            c.as_object_mut().unwrap().remove("transport_socket");
        }
    }
    c
}

/// istiod's cluster for `name` (a subset or the whole service), with the MERGE applied as istiod does.
fn istiod_cluster(plan: &Plan, who: Who, name: &str) -> Value {
    let mut c = fixture("reviews-9080.cluster.json");
    c["name"] = json!(name);
    c["alt_stat_name"] = json!(format!("{name};"));
    c["eds_cluster_config"]["service_name"] = json!(name);
    // mTLS to the workloads is istiod's business and off here: the demo's backends are plain HTTP
    c.as_object_mut().unwrap().remove("transport_socket_matches");
    let merge = patch_values(plan, who, "MERGE").into_iter().next().expect("a MERGE patch");
    let mut merged = meshfed::istio::merge::merge_json(&c, merge).expect("istiod's merge");
    // (a finite fetch timeout as meshfed istio writes it; shorter here only so a failing test fails sooner)
    assert!(merged["eds_cluster_config"]["eds_config"]["initial_fetch_timeout"].is_string());
    merged["@type"] = json!("type.googleapis.com/envoy.config.cluster.v3.Cluster");
    merged
}

/// istiod's outbound listener for reviews:9080 on the proxy's address, its route splitting 90/10
/// between the subsets (a VirtualService with two weighted destinations; on an ingress gateway, one
/// bound to its Gateway renders the same route).
fn istiod_listener(address: IpAddr) -> Value {
    json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": format!("{address}_{PORT}"),
        "address": { "socket_address": { "address": address.to_string(), "port_value": PORT } },
        "filter_chains": [{ "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "outbound_0.0.0.0_9080",
                "http_filters": [{ "name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" } }],
                "route_config": {
                    "name": "9080",
                    "virtual_hosts": [{
                        "name": "reviews.shop.svc.cluster.local:9080",
                        "domains": ["*"],
                        "routes": [{
                            "name": "reviews-split",
                            "match": { "prefix": "/" },
                            "route": { "weighted_clusters": { "clusters": [
                                { "name": V1, "weight": 90 },
                                { "name": V2, "weight": 10 }
                            ] }, "timeout": "0s" }
                        }]
                    }]
                }
            }
        }] }]
    })
}

/// Writes an xDS file Envoy watches (atomically, as Envoy wants: a rename into place).
fn write_resources(path: &Path, version: &str, resources: &[Value]) {
    let text = json!({ "version_info": version, "resources": resources }).to_string();
    support::write_atomically(path, &text).expect("writing an xDS file");
}

/// The Envoy bootstrap: istiod's sidecar bootstrap (an ingress gateway's node as Istio's gateway chart
/// renders it) with CDS and LDS from files, and (SotW) the static `meshfed-xds`, or (mTLS) the static
/// secrets standing in for istio-agent.
fn envoy_bootstrap(dir: &Path, who: Who, node_ip: IpAddr, static_xds: Option<&Value>, target: &XdsTarget) -> String {
    let mut b = fixture("sidecar-bootstrap.json");
    b["node"]["id"] = json!(who.node_id(node_ip));
    if who == Who::IngressGateway {
        let meta = b["node"]["metadata"].as_object_mut().expect("node metadata");
        meta.remove("INTERCEPTION_MODE");
        meta.insert("ROUTER_MODE".into(), json!("standard"));
        meta.insert("NAMESPACE".into(), json!("istio-system"));
        meta.insert("WORKLOAD_NAME".into(), json!("istio-ingressgateway"));
        meta.insert("SERVICE_ACCOUNT".into(), json!("istio-ingressgateway-service-account"));
        meta.insert("LABELS".into(), json!({ "app": "istio-ingressgateway", "istio": "ingressgateway" }));
        b["node"]["cluster"] = json!("istio-ingressgateway.istio-system");
    }
    // no istio-agent, no istiod: their clusters are not used
    b["static_resources"]["clusters"] = json!(static_xds.into_iter().cloned().collect::<Vec<_>>());
    if let Some(id) = &target.tls {
        b["static_resources"]["secrets"] = json!([
            { "name": "default", "tls_certificate": {
                "certificate_chain": { "filename": id.cert }, "private_key": { "filename": id.key } } },
            { "name": "ROOTCA", "validation_context": { "trusted_ca": { "filename": id.root } } }
        ]);
    }
    b["dynamic_resources"] = json!({
        "cds_config": { "path_config_source": { "path": dir.join("cds.json") }, "resource_api_version": "V3" },
        "lds_config": { "path_config_source": { "path": dir.join("lds.json") }, "resource_api_version": "V3" }
    });
    b["admin"]["address"]["socket_address"] = json!({ "address": "127.0.0.1", "port_value": 0 });
    b.to_string()
}

struct Setup {
    octet: u8,
    dir: tempfile::TempDir,
    mesh: PathBuf,
    slices: PathBuf,
    original_slices: String,
}

impl Setup {
    fn addr(&self, zone: u8, host: u8) -> SocketAddr {
        addr4(self.octet, zone, host, PORT)
    }

    fn subset(&self, host: u8) -> BTreeSet<SocketAddr> {
        ZONES.iter().map(|z| self.addr(*z, host)).collect()
    }

    /// Marks `addr` not ready in aws-use1's reviews EndpointSlice (or restores the original).
    fn set_not_ready(&self, addr: Option<SocketAddr>) -> Result<()> {
        let Some(addr) = addr else { return support::write_atomically(&self.slices, &self.original_slices) };
        let mut docs: Vec<serde_yaml::Value> = Vec::new();
        for d in serde_yaml::Deserializer::from_str(&self.original_slices) {
            docs.push(serde::Deserialize::deserialize(d)?);
        }
        let mut marked = 0;
        for d in &mut docs {
            if d["metadata"]["labels"]["kubernetes.io/service-name"].as_str() != Some("reviews") {
                continue;
            }
            for ep in d["endpoints"].as_sequence_mut().into_iter().flatten() {
                if ep["addresses"][0].as_str() == Some(&addr.ip().to_string()) {
                    ep["conditions"] = serde_yaml::from_str("{ready: false, serving: false, terminating: false}")?;
                    marked += 1;
                }
            }
        }
        ensure!(marked == 1, "{addr} is not in aws-use1's reviews slice");
        let text = docs.iter().map(serde_yaml::to_string).collect::<Result<Vec<_>, _>>()?.join("---\n");
        support::write_atomically(&self.slices, &text)
    }
}

/// Envoy's hosts of `cluster`: address -> (priority, healthy).
async fn hosts(envoy: &Envoy, cluster: &str) -> Result<BTreeMap<SocketAddr, (u32, bool)>> {
    Ok(envoy
        .cluster_hosts(cluster)
        .await?
        .into_iter()
        .map(|(a, h)| (a, (h.priority().unwrap_or(u32::MAX), h.is_healthy())))
        .collect())
}

/// istiod's priorities for the reviews DestinationRule (failover us-east-1 -> westeurope, with outlier
/// detection) seen from us-east-1a: the zone 0, the region 1, the other cloud 2 — before they are made
/// contiguous ([`compacted`]).
fn expected_priority(addr: &SocketAddr) -> u32 {
    match addr.ip() {
        IpAddr::V4(ip) => match ip.octets()[2] {
            1 => 0,
            2 => 1,
            _ => 2,
        },
        IpAddr::V6(_) => u32::MAX,
    }
}

/// The priority of `addr` in a cluster whose hosts are `hosts`: istiod (and meshfed) number the
/// priorities present 0..N without gaps, as Envoy requires (a subset with no endpoint left in the proxy's
/// zone has its region's at priority 0).
fn compacted(addr: &SocketAddr, hosts: &BTreeSet<SocketAddr>) -> u32 {
    let present: BTreeSet<u32> = hosts.iter().map(expected_priority).collect();
    present.iter().position(|p| *p == expected_priority(addr)).map_or(u32::MAX, |i| i as u32)
}

async fn expect_subsets(envoy: &Envoy, s: &Setup, not_ready: Option<SocketAddr>) -> Result<()> {
    poll_until(STEP_TIMEOUT, || async {
        for (cluster, expected) in [
            (V1, s.subset(V1_HOST)),
            (V2, s.subset(V2_HOST)),
            (ALL, s.subset(V1_HOST).union(&s.subset(V2_HOST)).copied().collect()),
        ] {
            let expected: BTreeSet<SocketAddr> = expected.into_iter().filter(|a| Some(*a) != not_ready).collect();
            let got = hosts(envoy, cluster).await?;
            let addrs: BTreeSet<SocketAddr> = got.keys().copied().collect();
            ensure!(addrs == expected, "{cluster}: hosts {got:?}, expected {expected:?}");
            for (a, (priority, healthy)) in &got {
                ensure!(*healthy, "{cluster}: {a} not healthy");
                ensure!(*priority == compacted(a, &expected), "{cluster}: {a} at priority {priority}: {got:?}");
            }
        }
        Ok(())
    })
    .await
}

/// Sends `n` requests through the listener: the answering backends, counted.
async fn send(listener: SocketAddr, n: usize) -> Result<BTreeMap<SocketAddr, usize>> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let (status, body) = http_get(listener, SERVICE, "/reviews").await?;
        if status != 200 {
            bail!("request {i}: status {status}: {body}");
        }
        let backend: SocketAddr = body.trim().parse().with_context(|| format!("request {i}: body {body:?}"))?;
        *counts.entry(backend).or_insert(0) += 1;
    }
    Ok(counts)
}

/// 400 requests split 90/10 (±5 points) between v1 and v2 of the local zone.
async fn expect_split(listener: SocketAddr, v1: SocketAddr, v2: SocketAddr) -> Result<()> {
    let counts = send(listener, SPLIT_REQUESTS).await?;
    let (a, b) = (counts.get(&v1).copied().unwrap_or(0), counts.get(&v2).copied().unwrap_or(0));
    ensure!(a + b == SPLIT_REQUESTS, "requests answered outside {v1} and {v2}: {counts:?}");
    let share = b as f64 * 100.0 / SPLIT_REQUESTS as f64;
    ensure!(
        (5.0..=15.0).contains(&share),
        "v2 got {share:.1}% of {SPLIT_REQUESTS} requests (10 ± 5 expected): {counts:?}"
    );
    Ok(())
}

/// meshfed's view of the proxy: an EDS-only client with one stream per cluster, none NACKed.
async fn expect_eds_proxy(meshfed: &Meshfed, who: Who, delta: bool) -> Result<()> {
    poll_until(STEP_TIMEOUT, || async {
        let syncz = meshfed.debug_json("/debug/syncz").await?;
        let entry = syncz
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["proxy"] == who.key())
            .ok_or_else(|| anyhow!("{} not in /debug/syncz: {syncz}", who.key()))?;
        ensure!(entry["service"] == "eds", "{entry}");
        ensure!(entry["flavor"] == if delta { "delta" } else { "sotw" }, "{entry}");
        ensure!(entry["streams"] == 3, "one stream per cluster: {entry}");
        ensure!(entry["status"]["EDS"] == "SYNCED", "{entry}");
        ensure!(entry["resources"][meshfed::type_url::ENDPOINT]["nacks"] == 0, "{entry}");
        Ok(())
    })
    .await
}

/// The proxy istiod configures: a sidecar (`SIDECAR_OUTBOUND`) or an ingress gateway (`GATEWAY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Sidecar,
    IngressGateway,
}

impl Who {
    fn context(self) -> &'static str {
        match self {
            Who::Sidecar => "SIDECAR_OUTBOUND",
            Who::IngressGateway => "GATEWAY",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Who::Sidecar => "client-1.shop",
            Who::IngressGateway => "istio-ingressgateway-5c4f9-xk2lp.istio-system",
        }
    }

    fn node_id(self, ip: IpAddr) -> String {
        match self {
            Who::Sidecar => format!("sidecar~{ip}~{}~shop.svc.cluster.local", self.key()),
            Who::IngressGateway => format!("router~{ip}~{}~istio-system.svc.cluster.local", self.key()),
        }
    }
}

async fn beside_istiod(who: Who, delta: bool, mtls: bool, octet: u8) {
    support::envoy_path();
    let dir = tempfile::Builder::new().prefix("meshfed-beside-istiod-").tempdir().expect("temp dir");
    let mesh = meshfed_testkit::server::copy_demo_single_network(dir.path(), octet);
    let slices = dir.path().join("aws-use1/endpointslices.yaml");
    let original_slices = std::fs::read_to_string(&slices).expect("slices");
    let s = Setup { octet, dir, mesh, slices, original_slices };
    let step = |name: &'static str| move |e: anyhow::Error| panic!("step {name:?}: {e:#}");

    let backends = start_backends(s.subset(V1_HOST).into_iter().chain(s.subset(V2_HOST)))
        .await
        .unwrap_or_else(|e| panic!("backends: {e:#}"));

    // meshfed (over mTLS: a certificate with its SPIFFE identity, the mesh CA for clients)
    let ca = TestCa::new(s.dir.path()).expect("test CA");
    let mut options = MeshfedOptions { ports: Some((free_port(), free_port())), ..Default::default() };
    let client_identity = mtls.then(|| ca.issue("client", "spiffe://cluster.local/ns/shop/sa/client").unwrap());
    if mtls {
        let server = ca.issue("meshfed", "spiffe://cluster.local/ns/istio-system/sa/meshfed").unwrap();
        options.xds_tls = Some((server.cert, server.key, Some(ca.root().to_path_buf())));
    }
    let mut meshfed = start_meshfed_with(&s.mesh, &options).await.unwrap_or_else(|e| panic!("meshfed: {e:#}"));
    let target = XdsTarget { port: meshfed.xds_port, tls: client_identity };

    // what `meshfed istio --host reviews.shop` prints (SotW: the bootstrap-override form)
    let address = format!("127.0.0.1:{}", meshfed.xds_port);
    let mut argv = vec!["--host", "reviews.shop", "--meshfed-address", &address];
    if who == Who::IngressGateway {
        argv.extend(["--context", "gateway", "--scope", "mesh"]);
    }
    if !delta {
        argv.extend(["--sotw", "--static-cluster"]);
    }
    let plan = plan(&s.mesh, &argv).await;
    let xds_cluster = meshfed_xds_cluster(&plan, who, &target);

    // istiod's part: CDS and LDS files
    let node_ip = ip4(octet, 50, 1);
    let mut clusters: Vec<Value> = [ALL, V1, V2].iter().map(|n| istiod_cluster(&plan, who, n)).collect();
    if delta {
        let mut c = xds_cluster.clone();
        c["@type"] = json!("type.googleapis.com/envoy.config.cluster.v3.Cluster");
        clusters.push(c);
    }
    write_resources(&s.dir.path().join("cds.json"), "1", &clusters);
    write_resources(&s.dir.path().join("lds.json"), "1", &[istiod_listener(node_ip)]);
    let bootstrap = envoy_bootstrap(s.dir.path(), who, node_ip, (!delta).then_some(&xds_cluster), &target);
    let envoy = start_envoy(&bootstrap).await.unwrap_or_else(|e| panic!("Envoy: {e:#}"));
    let listener = SocketAddr::new(node_ip, PORT);

    // 1. each subset cluster holds exactly its pods' endpoints from both clouds, at istiod's priorities
    expect_subsets(&envoy, &s, None).await.unwrap_or_else(step("subsets"));
    expect_eds_proxy(&meshfed, who, delta).await.unwrap_or_else(step("meshfed's view of the proxy"));
    // 2. the VirtualService's 90/10 split between the subsets
    expect_split(listener, s.addr(1, V1_HOST), s.addr(1, V2_HOST)).await.unwrap_or_else(step("90/10"));

    // 3. an EndpointSlice edit: v2 in us-east-1a not ready -> v2's share goes to us-east-1b's v2
    s.set_not_ready(Some(s.addr(1, V2_HOST))).unwrap();
    expect_subsets(&envoy, &s, Some(s.addr(1, V2_HOST))).await.unwrap_or_else(step("EndpointSlice edit"));
    expect_split(listener, s.addr(1, V1_HOST), s.addr(2, V2_HOST)).await.unwrap_or_else(step("90/10 after the edit"));

    // 4. meshfed killed: Envoy keeps its endpoints and traffic keeps flowing
    meshfed.guard.kill();
    expect_split(listener, s.addr(1, V1_HOST), s.addr(2, V2_HOST)).await.unwrap_or_else(step("meshfed down"));
    expect_subsets(&envoy, &s, Some(s.addr(1, V2_HOST))).await.unwrap_or_else(step("endpoints kept"));

    // 5. meshfed back on its address, the slice restored meanwhile: Envoy resubscribes and converges
    s.set_not_ready(None).unwrap();
    meshfed = start_meshfed_with(&s.mesh, &options).await.unwrap_or_else(|e| panic!("meshfed again: {e:#}"));
    expect_subsets(&envoy, &s, None).await.unwrap_or_else(step("resubscribed"));
    expect_eds_proxy(&meshfed, who, delta).await.unwrap_or_else(step("meshfed's view after the restart"));
    expect_split(listener, s.addr(1, V1_HOST), s.addr(1, V2_HOST)).await.unwrap_or_else(step("90/10 at the end"));

    envoy.assert_no_rejected_updates().await.unwrap_or_else(|e| panic!("{e:#}"));
    let used = backends.iter().filter(|b| b.hits() > 0).count();
    assert!(used >= 3, "v1 and v2 of us-east-1a and v2 of us-east-1b answered");
    drop(meshfed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_endpoints_beside_istiod() {
    beside_istiod(Who::Sidecar, false, false, 141).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delta_endpoints_beside_istiod() {
    beside_istiod(Who::Sidecar, true, false, 142).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delta_endpoints_beside_istiod_over_mtls() {
    beside_istiod(Who::Sidecar, true, true, 143).await;
}

/// An ingress gateway istiod configures (node type router, ROUTER_MODE standard) with the `GATEWAY`
/// patches of `meshfed istio --context gateway`: the same endpoints as a sidecar beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delta_endpoints_beside_istiod_for_an_ingress_gateway() {
    beside_istiod(Who::IngressGateway, true, false, 144).await;
}
