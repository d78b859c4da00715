//! Performance behaviour (not time): what fleet-scale load must never do, checked with the load client
//! of `meshfed-load` against an in-process meshfed.
//!
//! - A proxy that never reads its stream does not delay the others' pushes, and what the server keeps
//!   for it stays bounded.
//! - An endpoint-only change sends no CDS, LDS or RDS bytes, and EDS carries only the changed assignment.
//! - A push that changes every assignment (a drain step), which meshfed works out once for all the
//!   streams alike and writes to them as one shared block, leaves every proxy holding exactly what a new
//!   proxy gets; a proxy that rejects it keeps what it had and gets the next one.
//!
//! Every wait is bounded by [`TIMEOUT`]; nothing here asserts how long anything takes.

use std::sync::Arc;
use std::time::Duration;

use meshfed_load::client::{self, ClientOptions, Recorder};
use meshfed_load::procfs;
use meshfed_load::server::mesh_config;
use meshfed_load::topo::{self, Change, ProxyIdentity, Size, Topology};
use meshfed_testkit::ads::{AdsClient, Flavor};
use meshfed_testkit::server::TestServer;

/// Bound on waiting for something that must happen.
const TIMEOUT: Duration = Duration::from_secs(30);

async fn start(size: Size) -> (TestServer, Topology) {
    let topology = Topology::new(size);
    let mesh = mesh_config(&topology, "0ms", "0ms").expect("mesh config");
    let server = TestServer::start(&mesh, topology.initial_events()).await;
    (server, topology)
}

/// Flaps an endpoint of `svc` and waits until `n` proxies ACKed the new version of its assignment.
async fn flap_and_wait(server: &TestServer, topology: &mut Topology, rec: &Recorder, epoch: u64, svc: usize, n: usize) {
    rec.watch(epoch, [Arc::from(topo::cluster_name(svc))]);
    for e in topology.apply(&Change::Flap { svc, cluster: (epoch % 2) as usize, ep: 0 }) {
        server.events.send(e).expect("push loop alive");
    }
    let ok = rec.wait_hits(n, TIMEOUT).await;
    rec.unwatch();
    assert!(ok, "change {epoch} (service {svc}) reached {} of {n} proxies within {TIMEOUT:?}", rec.epoch_hits());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_never_reads_does_not_delay_others_and_stays_bounded() {
    // S-sized: the initial EDS answer (~1,000 assignments) is far larger than the stalled stream's 64 KiB
    // HTTP/2 windows, so its writer is blocked from the first response on.
    let (server, mut topology) = start(Size::S).await;
    let identity = ProxyIdentity::default();
    let names = topo::eds_names(&topology);
    let _stalled = client::open_stalled_stream(server.xds_addr, topo::proxy_node(7, &identity), &names)
        .await
        .expect("stalled stream opens");

    let rec = Recorder::new(2);
    let opts = Arc::new(ClientOptions::new(server.xds_addr));
    let _sotw = client::spawn_proxy(&opts, &rec, 0, topo::proxy_node(0, &identity), false, None);
    let _delta = client::spawn_proxy(&opts, &rec, 1, topo::proxy_node(1, &identity), true, None);
    assert!(rec.wait_ready(2, TIMEOUT).await, "the reading proxies got their config: {:?}", rec.last_error());
    // the stalled stream is connected (its requests were read) even though it never reads
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while server.connections.len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "the stalled stream was registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let rss_before = procfs::rss_kb(std::process::id());
    for i in 0..200u64 {
        flap_and_wait(&server, &mut topology, &rec, i + 1, (i as usize * 7) % Size::S.services, 2).await;
    }
    let rss_after = procfs::rss_kb(std::process::id());
    assert_eq!(rec.errors.load(std::sync::atomic::Ordering::Relaxed), 0, "{:?}", rec.last_error());
    assert_eq!(server.connections.len(), 3, "the stalled stream is still open, not dropped");
    // 200 pushes the stalled proxy never read: nothing may queue up per push. A generous bound (the whole
    // test process, client included): a per-push backlog of its ~1 MB EDS state would exceed it.
    let growth_mb = rss_after.saturating_sub(rss_before) as f64 / 1024.0;
    assert!(growth_mb < 96.0, "process RSS grew by {growth_mb:.1} MB over 200 pushes with a stalled stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_only_change_sends_no_cds_lds_rds_bytes() {
    let (server, mut topology) = start(Size { services: 20, endpoints: 4 }).await;
    let identity = ProxyIdentity::default();
    let rec = Recorder::new(2);
    let opts = Arc::new(ClientOptions::new(server.xds_addr));
    let _sotw = client::spawn_proxy(&opts, &rec, 0, topo::proxy_node(0, &identity), false, None);
    let _delta = client::spawn_proxy(&opts, &rec, 1, topo::proxy_node(1, &identity), true, None);
    assert!(rec.wait_ready(2, TIMEOUT).await, "both proxies got their config: {:?}", rec.last_error());
    let before = rec.totals();
    flap_and_wait(&server, &mut topology, &rec, 1, 5, 2).await;
    // a witness: a stream sends a push's types in order (CDS, EDS, LDS, RDS) and pushes in order, so
    // once the next change's EDS arrived, anything else the first change caused has arrived too
    flap_and_wait(&server, &mut topology, &rec, 2, 6, 2).await;
    let after = rec.totals();
    let diff = |t: usize, k: usize| after[t][k] - before[t][k];
    for (t, name) in [(0, "CDS"), (2, "LDS"), (3, "RDS")] {
        assert_eq!(diff(t, 0), 0, "{name} bytes sent for endpoint-only changes");
    }
    assert_eq!(diff(1, 1), 4, "one EDS response per change per proxy");
    assert_eq!(diff(1, 2), 4, "each EDS response carries only the changed assignment");
}

/// A load proxy `k` of `flavor` subscribed to CDS and to every assignment, both ACKed.
async fn eds_client(server: &TestServer, flavor: Flavor, k: usize, names: &[String]) -> AdsClient {
    let node = topo::proxy_node(k, &ProxyIdentity::default());
    let mut c = AdsClient::connect(server.xds_addr, flavor, node)
        .await
        .expect("connects")
        .with_timeouts(TIMEOUT, Duration::from_millis(300));
    c.subscribe_and_ack::<&str>(meshfed::type_url::CLUSTER, &[]).await.expect("CDS");
    let eds = c.subscribe_and_ack(meshfed::type_url::ENDPOINT, names).await.expect("EDS");
    assert_eq!(eds.resources.len(), names.len());
    c
}

/// meshfed's count of EDS responses written from an update worked out once for every stream alike (this
/// process's metrics: other tests here only add to it).
fn shared_eds_responses() -> u64 {
    let text = meshfed::metrics::global().encode().expect("metrics");
    let line = text.lines().find(|l| l.starts_with("meshfed_xds_shared_responses_total{type=\"eds\"}"));
    line.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Name -> encoded assignment a client holds.
fn assignments(c: &AdsClient) -> std::collections::BTreeMap<String, Vec<u8>> {
    let held = c.held().get(meshfed::type_url::ENDPOINT).expect("EDS held");
    held.resources.iter().map(|(n, r)| (n.clone(), r.body.clone())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_step_of_every_service_leaves_every_proxy_with_the_servers_state() {
    let (server, topology) = start(Size { services: 40, endpoints: 4 }).await;
    let names: Vec<String> = topo::eds_names(&topology).iter().map(|n| n.to_string()).collect();
    // proxies 0, 6, 12, 18 share a placement (aws-use1, us-east-1a: one EDS scope); 1 and 7 another
    let mut clients = Vec::new();
    for (flavor, k) in [
        (Flavor::Sotw, 0),
        (Flavor::Sotw, 6),
        (Flavor::Sotw, 1),
        (Flavor::Delta, 12),
        (Flavor::Delta, 18),
        (Flavor::Delta, 7),
    ] {
        clients.push(eds_client(&server, flavor, k, &names).await);
    }
    // what a proxy that connects now gets, per placement
    let fresh = |k: usize| {
        let names = names.clone();
        let server = &server;
        async move { assignments(&eds_client(server, Flavor::Delta, k, &names).await) }
    };
    let placement = [24, 24, 13, 24, 24, 13];
    let shared_before = shared_eds_responses();
    // the split installed, then drain steps; at the second the first proxy of each flavor rejects it
    for (step, capacity) in [100u32, 50, 25].into_iter().enumerate() {
        let policy = meshfed_load::server::drain_policy(capacity, 0, std::time::SystemTime::now()).expect("policy");
        server.push.set_traffic_policy(policy);
        for (i, c) in clients.iter_mut().enumerate() {
            let r = c.skip_to(meshfed::type_url::ENDPOINT).await.expect("the step's EDS response");
            assert_eq!(r.resources.len(), names.len(), "step {step}: proxy {i} gets every assignment in one response");
            assert!(r.removed.is_empty());
            if step == 1 && (i == 0 || i == 3) {
                c.nack(&r, "rejected by the test").await.expect("NACK");
            } else {
                c.ack(&r).await.expect("ACK");
            }
        }
        let want = [fresh(24).await, fresh(13).await];
        for (i, c) in clients.iter().enumerate() {
            let want = &want[usize::from(placement[i] == 13)];
            if step == 1 && (i == 0 || i == 3) {
                assert_ne!(&assignments(c), want, "step {step}: proxy {i} rejected the step and kept what it had");
            } else {
                assert_eq!(&assignments(c), want, "step {step}: proxy {i} holds what a new proxy gets");
            }
        }
    }
    // the first drain step reached all six from the update worked out once per scope and flavor
    assert!(shared_eds_responses() >= shared_before + 6, "shared EDS responses");
    // nothing else is sent: every stream holds the server's state
    for c in clients.iter_mut() {
        c.expect_silence("after the last step").await.expect("silence");
    }
}
