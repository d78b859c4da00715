//! Performance behaviour (not time): what fleet-scale load must never do, checked with the load client
//! of `meshfed-load` against an in-process meshfed.
//!
//! - A proxy that never reads its stream does not delay the others' pushes, and what the server keeps
//!   for it stays bounded.
//! - An endpoint-only change sends no CDS, LDS or RDS bytes, and EDS carries only the changed assignment.
//!
//! Every wait is bounded by [`TIMEOUT`]; nothing here asserts how long anything takes.

use std::sync::Arc;
use std::time::Duration;

use meshfed_load::client::{self, ClientOptions, Recorder};
use meshfed_load::procfs;
use meshfed_load::server::mesh_config;
use meshfed_load::topo::{self, Change, ProxyIdentity, Size, Topology};
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
