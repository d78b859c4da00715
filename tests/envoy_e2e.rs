//! End to end with a real Envoy, once over state-of-the-world ADS (GRPC) and once over Delta ADS
//! (DELTA_GRPC): a sidecar in aws-use1/us-east-1a calls `reviews` through its outbound listener, and
//! meshfed's locality failover priorities decide which backends answer while the test edits the demo's
//! EndpointSlices on disk: us-east-1a first, then us-east-1b, then the other cloud (Azure), then a
//! scaled-out endpoint, then back.
//!
//! The backends are in-process HTTP servers bound on the endpoint addresses; each answers with its own
//! address, so every response tells which endpoint Envoy picked. Each test has its own loopback octet
//! (`127.<octet>.0.0/16`, see `meshfed_testkit::server::copy_demo`), so the tests run in parallel.
//!
//! Needs Envoy (see `support::envoy_path`); a missing Envoy fails the tests.

use meshfed_testkit as support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use support::slices::SliceDocs;
use support::{
    Envoy, Meshfed, addr4, bootstrap, http_get, ip4, poll_until, start_backends, start_envoy, start_meshfed,
};

/// Envoy's cluster for reviews:9080.
const REVIEWS_CLUSTER: &str = "outbound|9080||reviews.shop.svc.cluster.local";
const REVIEWS_PORT: u16 = 9080;
/// Cap of each step (file watcher + debounce + push + Envoy applying EDS).
const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// Requests of a probe while waiting for a step to take effect.
const PROBE_REQUESTS: usize = 8;
/// Requests checked once a step has taken effect.
const REQUESTS: usize = 48;
/// The node the new endpoint of the scale-out step runs on (us-east-1a).
const ZONE_A_NODE: &str = "ip-10-0-1-10.ec2.internal";

/// The demo's zones, by the third octet of their addresses.
const US_EAST_1A: u8 = 1;
const US_EAST_1B: u8 = 2;
const WESTEUROPE_1: u8 = 3;
const WESTEUROPE_2: u8 = 4;

/// A copy of the demo with addresses on 127.<octet>.0.0/16.
struct Demo {
    octet: u8,
    /// aws-use1's EndpointSlices file, and its original content
    slices: PathBuf,
    original: String,
}

impl Demo {
    /// `reviews` endpoint `127.<octet>.<zone>.<host>:9080`
    fn reviews(&self, zone: u8, host: u8) -> SocketAddr {
        addr4(self.octet, zone, host, REVIEWS_PORT)
    }

    /// The two `reviews` endpoints of a zone.
    fn zone(&self, zone: u8) -> BTreeSet<SocketAddr> {
        [21, 22].into_iter().map(|h| self.reviews(zone, h)).collect()
    }

    /// Rewrites aws-use1's EndpointSlices from the original: the `reviews` endpoints at `not_ready` get
    /// `ready: false, serving: false`, and a ready endpoint in us-east-1a is added for each of `added`.
    fn write_reviews_slice(&self, not_ready: &BTreeSet<SocketAddr>, added: &[SocketAddr]) -> Result<()> {
        let mut docs = SliceDocs::parse(&self.original)?;
        let marked =
            docs.set_ready_where("reviews", false, |ip| not_ready.contains(&SocketAddr::new(ip, REVIEWS_PORT)))?;
        ensure!(marked == not_ready.len(), "only {marked} of {not_ready:?} are in the reviews slice");
        for addr in added {
            docs.add_endpoint("reviews", addr.ip(), ZONE_A_NODE, "us-east-1a")?;
        }
        support::write_atomically(&self.slices, &docs.to_yaml()?)
    }

    fn restore(&self) -> Result<()> {
        support::write_atomically(&self.slices, &self.original)
    }
}

/// Sends `n` requests to the sidecar's outbound listener, with the three Host forms that route to
/// reviews (FQDN, `name.namespace`, and `name` from the same namespace); returns the answering
/// backends. Fails on any non-200 or unexpected body.
async fn send_requests(listener: SocketAddr, n: usize) -> Result<Vec<SocketAddr>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let host = match i % 4 {
            1 => "reviews",
            3 => "reviews.shop",
            _ => "reviews.shop.svc.cluster.local",
        };
        let (status, body) = http_get(listener, host, "/reviews").await?;
        if status != 200 {
            bail!("request {i} (Host {host}): status {status}: {body}");
        }
        let backend = body.trim().parse().with_context(|| format!("request {i} (Host {host}): body {body:?}"))?;
        out.push(backend);
    }
    Ok(out)
}

fn describe_hosts(hosts: &BTreeMap<SocketAddr, support::HostStatus>) -> String {
    hosts
        .iter()
        .map(|(a, h)| format!("{a} (priority {}, {})", h.get("priority").unwrap_or("?"), h.health_flags()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Waits (bounded) until Envoy's reviews cluster has exactly the healthy hosts `hosts`, with priority 0
/// for exactly `primary`, and until traffic reaches only `primary`; then checks that [`REQUESTS`]
/// requests all land on `primary` and reach each of them, and that Envoy rejected no update.
async fn expect_state(
    envoy: &Envoy,
    listener: SocketAddr,
    hosts: &BTreeSet<SocketAddr>,
    primary: &BTreeSet<SocketAddr>,
) -> Result<()> {
    poll_until(STEP_TIMEOUT, || async {
        let got = envoy.cluster_hosts(REVIEWS_CLUSTER).await?;
        let addrs: BTreeSet<SocketAddr> = got.keys().copied().collect();
        let ok = &addrs == hosts
            && got.values().all(support::HostStatus::is_healthy)
            && got.iter().all(|(a, h)| (h.priority() == Some(0)) == primary.contains(a));
        if ok { Ok(()) } else { Err(anyhow!("Envoy's {REVIEWS_CLUSTER} hosts: {}", describe_hosts(&got))) }
    })
    .await
    .with_context(|| format!("waiting for hosts {hosts:?} with priority 0 for {primary:?}"))?;

    poll_until(STEP_TIMEOUT, || async {
        let seen = send_requests(listener, PROBE_REQUESTS).await?;
        let stray: Vec<_> = seen.iter().filter(|b| !primary.contains(b)).collect();
        if stray.is_empty() { Ok(()) } else { Err(anyhow!("answered by {stray:?}")) }
    })
    .await
    .with_context(|| format!("waiting for traffic to reach only {primary:?}"))?;

    let seen = send_requests(listener, REQUESTS).await?;
    let mut counts: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for b in &seen {
        *counts.entry(*b).or_default() += 1;
    }
    let stray: BTreeMap<_, _> = counts.iter().filter(|(b, _)| !primary.contains(b)).collect();
    ensure!(stray.is_empty(), "{REQUESTS} requests: some answered outside {primary:?}: {counts:?}");
    let missed: Vec<_> = primary.iter().filter(|b| !counts.contains_key(b)).collect();
    ensure!(missed.is_empty(), "{REQUESTS} requests never reached {missed:?}: {counts:?}");

    envoy.assert_no_rejected_updates().await
}

/// meshfed lists the proxy's ADS connection with the expected flavour, and no NACK.
async fn expect_ads_connection(meshfed: &Meshfed, node_id: &str, delta: bool) -> Result<()> {
    let flavor = if delta { "delta" } else { "sotw" };
    let conn = poll_until(STEP_TIMEOUT, || async {
        meshfed.ads_connection(node_id).await?.ok_or_else(|| anyhow!("{node_id} not in /debug/adsz"))
    })
    .await?;
    ensure!(conn["flavor"] == flavor, "expected a {flavor} connection: {conn}");
    let types = conn["types"].as_object().ok_or_else(|| anyhow!("no types in {conn}"))?;
    for (t, status) in types {
        ensure!(status["nacks"].as_u64().unwrap_or(0) == 0, "{t}: NACKed: {status}");
        ensure!(status["last_error"].is_null(), "{t}: error: {status}");
    }
    Ok(())
}

/// The whole scenario; `octet` must be unique among the tests running at the same time.
async fn locality_failover_follows_endpoint_slices(delta: bool, octet: u8) {
    support::envoy_path(); // fail fast, before starting anything, if Envoy is missing
    let dir = tempfile::Builder::new().prefix("meshfed-envoy-e2e-").tempdir().expect("temp dir");
    let mesh = meshfed_testkit::server::copy_demo_single_network(dir.path(), octet);
    let slices = dir.path().join("aws-use1/endpointslices.yaml");
    let original = std::fs::read_to_string(&slices).expect("demo EndpointSlices");
    let demo = Demo { octet, slices, original };

    let zone_a = demo.zone(US_EAST_1A);
    let zone_b = demo.zone(US_EAST_1B);
    let azure: BTreeSet<_> = demo.zone(WESTEUROPE_1).union(&demo.zone(WESTEUROPE_2)).copied().collect();
    let all: BTreeSet<_> = zone_a.iter().chain(&zone_b).chain(&azure).copied().collect();
    let scaled_out = demo.reviews(US_EAST_1A, 23);

    let backends =
        start_backends(all.iter().copied().chain([scaled_out])).await.unwrap_or_else(|e| panic!("backends: {e:#}"));
    let meshfed = start_meshfed(&mesh).await.unwrap_or_else(|e| panic!("starting meshfed: {e:#}"));
    let node_ip = ip4(octet, 50, 1);
    let node_id = format!("sidecar~{node_ip}~client-0.shop~shop.svc.cluster.local");
    let yaml = bootstrap(&node_id, meshfed.xds_port, delta, 0, "aws-use1", "aws-net", "us-east-1/us-east-1a");
    let envoy = start_envoy(&yaml).await.unwrap_or_else(|e| panic!("starting Envoy: {e:#}"));
    let listener = SocketAddr::new(node_ip, REVIEWS_PORT);

    expect_ads_connection(&meshfed, &node_id, delta).await.unwrap_or_else(|e| panic!("ADS connection: {e:#}"));

    let step = |name: &'static str| move |e: anyhow::Error| panic!("step {name:?}: {e:#}");

    // 1. Everything ready: the proxy's own zone serves.
    expect_state(&envoy, listener, &all, &zone_a).await.unwrap_or_else(step("initial: us-east-1a"));

    // 2. us-east-1a not ready: meshfed drops it from EDS, us-east-1b (same region) takes over.
    demo.write_reviews_slice(&zone_a, &[]).expect("editing the slice");
    let hosts: BTreeSet<_> = all.difference(&zone_a).copied().collect();
    expect_state(&envoy, listener, &hosts, &zone_b).await.unwrap_or_else(step("us-east-1a not ready"));

    // 3. us-east-1b not ready either: the other cloud (azure-weu, both zones) takes over.
    let not_ready: BTreeSet<_> = zone_a.union(&zone_b).copied().collect();
    demo.write_reviews_slice(&not_ready, &[]).expect("editing the slice");
    expect_state(&envoy, listener, &azure, &azure).await.unwrap_or_else(step("us-east-1a and us-east-1b not ready"));

    // 4. Scale out: a new ready endpoint in us-east-1a gets all the traffic...
    demo.write_reviews_slice(&not_ready, &[scaled_out]).expect("editing the slice");
    let mut hosts = azure.clone();
    hosts.insert(scaled_out);
    expect_state(&envoy, listener, &hosts, &BTreeSet::from([scaled_out]))
        .await
        .unwrap_or_else(step("new endpoint in us-east-1a"));

    // ... and none once it is removed again.
    demo.write_reviews_slice(&not_ready, &[]).expect("editing the slice");
    expect_state(&envoy, listener, &azure, &azure).await.unwrap_or_else(step("new endpoint removed"));

    // 5. Restored: back to us-east-1a.
    demo.restore().expect("restoring the slice");
    expect_state(&envoy, listener, &all, &zone_a).await.unwrap_or_else(step("restored"));

    // Every backend, in both clusters, answered at some step.
    for b in &backends {
        assert!(b.hits() > 0, "backend {} never answered", b.addr());
    }
    envoy.assert_no_rejected_updates().await.unwrap_or_else(|e| panic!("{e:#}"));
    let complaints = envoy.log_complaints();
    assert!(complaints.is_empty(), "Envoy logged warnings or errors:\n{}", complaints.join("\n"));
    expect_ads_connection(&meshfed, &node_id, delta)
        .await
        .unwrap_or_else(|e| panic!("ADS connection at the end: {e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sotw_locality_failover_follows_endpoint_slices() {
    locality_failover_follows_endpoint_slices(false, 61).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delta_locality_failover_follows_endpoint_slices() {
    locality_failover_follows_endpoint_slices(true, 62).await;
}
