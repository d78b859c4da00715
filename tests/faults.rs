//! Faults, with the real meshfed binary and real Envoys (see meshfed-testkit):
//!
//! - a reconnect storm: 8 Envoys, each restarted several times in quick succession (some killed before
//!   their first config is applied), all converge with no rejected update, and meshfed holds exactly their
//!   8 connections afterwards;
//! - meshfed killed (SIGKILL) under churn and restarted on the same ports: the Envoys keep their config
//!   while it is down and reconnect; a Delta client reconnecting with `initial_resource_versions` gets
//!   nothing, as nothing it holds changed;
//! - two replicas on the same input serve byte-identical resources and versions, so a Delta client moving
//!   from one to the other gets nothing;
//! - a half-written manifest file: reported, and the last good state keeps being served until the file is
//!   complete;
//! - a Kubernetes API server (`meshfed_testkit::kube_standin`) that fails every request, answers slowly, goes
//!   away mid-watch, and cuts its watch streams short (mid-way through an event line, or between lines,
//!   without the chunked body's end): the last known state is served throughout (nothing withdrawn), the
//!   cluster's watch error is reported in `/debug/clusterz`, and changes made meanwhile arrive once it
//!   answers whole again.
//!
//! Each test has its own loopback octet (`127.<octet>.0.0/16`). Every wait is bounded by [`TIMEOUT`];
//! [`QUIET`] only bounds looking for something that must not arrive.

use meshfed_testkit as support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use meshfed::type_url;
use support::ads::{AdsClient, Flavor, Held, QUIET, Response, TIMEOUT, TYPES, delta_reconnect, fetch_all};
use support::fixtures::{endpoint_addresses, sidecar_node};
use support::slices::{SlicesFile, set_ready};
use support::{BootstrapSpec, Envoy, Meshfed, MeshfedOptions, bootstrap_with, poll_until, start_envoy, start_meshfed};

const REVIEWS: &str = "outbound|9080||reviews.shop.svc.cluster.local";

/// The two tests that run several Envoys take turns: on a 2-core machine, 11 Envoys starting at once would
/// mostly measure the machine.
static ENVOY_HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn demo(octet: u8) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mesh = meshfed_testkit::server::copy_demo(dir.path(), octet);
    (dir, mesh)
}

fn sidecar_spec(octet: u8, i: u8, xds_port: u16, delta: bool) -> BootstrapSpec {
    let (cluster, network, locality) = if i.is_multiple_of(2) {
        ("aws-use1", "aws-net", "us-east-1/us-east-1a")
    } else {
        ("azure-weu", "azure-net", "westeurope/westeurope-1")
    };
    BootstrapSpec {
        delta,
        cluster_id: Some(cluster.into()),
        network: Some(network.into()),
        locality: Some(locality.into()),
        ..BootstrapSpec::new(&format!("sidecar~127.{octet}.50.{i}~client-{i}.shop~shop.svc.cluster.local"), xds_port)
    }
}

/// Envoy has `REVIEWS` with hosts, and never rejected an update.
async fn envoy_converged(envoy: &Envoy) -> Result<()> {
    let hosts = envoy.cluster_hosts(REVIEWS).await?;
    ensure!(!hosts.is_empty(), "Envoy has no hosts for {REVIEWS}");
    for (name, value) in envoy.update_rejected_stats().await? {
        ensure!(value == 0, "{name} = {value}");
    }
    Ok(())
}

/// The proxies meshfed has connections for, from `/debug/adsz` (node ids, with repetitions).
async fn connected(meshfed: &Meshfed) -> Result<Vec<String>> {
    let adsz = meshfed.debug_json("/debug/adsz").await?;
    let conns = adsz["connections"].as_array().ok_or_else(|| anyhow!("no connections in {adsz}"))?;
    Ok(conns.iter().filter_map(|c| c["proxy"].as_str().map(str::to_string)).collect())
}

fn assert_nothing_resent(responses: &[Response], held: &Held) {
    assert_eq!(responses.len(), TYPES.len(), "one (empty) answer per type, nothing more: {responses:#?}");
    for r in responses {
        let held = held.names(&r.type_url).len();
        assert!(held > 0 || r.type_url == type_url::ROUTE, "the client held no {}", r.type_url);
        assert!(
            r.resources.is_empty() && r.removed.is_empty(),
            "{}: {} resources re-sent, {} removed, though the client holds them at the current versions: {:?}",
            r.type_url,
            r.resources.len(),
            r.removed.len(),
            r.names()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_of_envoys_converges() {
    const OCTET: u8 = 111;
    const ENVOYS: u8 = 8;
    const RESTARTS: u64 = 3;
    let _turn = ENVOY_HEAVY.lock().await;
    let (_dir, mesh) = demo(OCTET);
    let meshfed = start_meshfed(&mesh).await.expect("meshfed");
    let xds = meshfed.xds_port;
    let (live_kills, early_kills) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let storm = (0..ENVOYS).map(|i| {
        let (live_kills, early_kills) = (live_kills.clone(), early_kills.clone());
        async move {
            let yaml = bootstrap_with(&sidecar_spec(OCTET, i, xds, i % 2 == 1));
            for r in 0..RESTARTS {
                // the first start is killed before its config is applied, the others once LIVE
                let cut = if r == 0 { Duration::from_millis(150 + u64::from(i) * 40) } else { TIMEOUT };
                match tokio::time::timeout(cut, start_envoy(&yaml)).await {
                    Ok(Ok(envoy)) => {
                        live_kills.fetch_add(1, Ordering::Relaxed);
                        drop(envoy)
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        early_kills.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            start_envoy(&yaml).await
        }
    });
    let envoys: Vec<Envoy> = futures::future::join_all(storm)
        .await
        .into_iter()
        .collect::<Result<_>>()
        .unwrap_or_else(|e| panic!("an Envoy did not start: {e:#}"));
    eprintln!(
        "storm: {} Envoys killed once LIVE, {} killed while starting, then {ENVOYS} started for good",
        live_kills.load(Ordering::Relaxed),
        early_kills.load(Ordering::Relaxed)
    );
    for envoy in &envoys {
        poll_until(TIMEOUT, || envoy_converged(envoy)).await.unwrap_or_else(|e| panic!("{e:#}"));
    }
    // the connections of the killed Envoys are gone: one per live Envoy
    poll_until(TIMEOUT, || async {
        let mut proxies = connected(&meshfed).await?;
        proxies.sort();
        ensure!(proxies.len() == usize::from(ENVOYS), "{} connections: {proxies:?}", proxies.len());
        proxies.dedup();
        ensure!(proxies.len() == usize::from(ENVOYS), "duplicate connections");
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    meshfed.assert_no_nacks().await.unwrap();
}

/// Rewrites aws-use1's EndpointSlices with the first `ratings` endpoint ready or not.
fn set_ratings_ready(slices: &SlicesFile, ready: bool) -> Result<()> {
    slices.rewrite(|docs| {
        let first = docs.endpoints_mut("ratings")?.first_mut().ok_or_else(|| anyhow!("ratings has no endpoints"))?;
        set_ready(first, ready);
        Ok(())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshfed_killed_under_churn_and_restarted() {
    const OCTET: u8 = 112;
    let _turn = ENVOY_HEAVY.lock().await;
    let (dir, mesh) = demo(OCTET);
    let slices = SlicesFile::of_cluster(dir.path(), "aws-use1").unwrap();
    let mut meshfed = start_meshfed(&mesh).await.expect("meshfed");
    let ports = (meshfed.xds_port, meshfed.debug_port);
    let mut envoys = Vec::new();
    let mut ids = Vec::new();
    for i in 0..3u8 {
        let spec = sidecar_spec(OCTET, i, ports.0, i == 2);
        ids.push(spec.node_id.clone());
        envoys.push(start_envoy(&bootstrap_with(&spec)).await.expect("Envoy"));
    }
    for e in &envoys {
        poll_until(TIMEOUT, || envoy_converged(e)).await.unwrap_or_else(|e| panic!("{e:#}"));
    }
    let script = format!("sidecar~127.{OCTET}.60.1~script-0.shop~shop.svc.cluster.local");
    let mut held = fetch_all(meshfed.xds_address(), Flavor::Delta, &script).await.unwrap();
    assert!(held.names(type_url::ENDPOINT).contains(REVIEWS));
    // ratings' endpoints are about to churn: the client does not follow them
    held.retain(type_url::ENDPOINT, |name| !name.contains("ratings"));

    // churn: ratings' endpoint flaps (reviews, the clusters, listeners and routes stay as they are)
    let churning = Arc::new(AtomicBool::new(true));
    let churn = tokio::spawn({
        let (churning, slices) = (churning.clone(), slices.clone());
        async move {
            let mut ready = false;
            for _ in 0..2_000 {
                if !churning.load(Ordering::Relaxed) {
                    break;
                }
                set_ratings_ready(&slices, ready).expect("rewrite the slices");
                ready = !ready;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    meshfed.guard.kill();

    // while meshfed is down, every Envoy keeps serving its config
    for e in &envoys {
        let hosts = e.cluster_hosts(REVIEWS).await.unwrap();
        assert!(!hosts.is_empty(), "an Envoy lost {REVIEWS} while meshfed was down");
    }
    // restart on the same ports, still under churn; the Envoys reconnect on their own
    let options = MeshfedOptions { ports: Some(ports), ..Default::default() };
    let meshfed = start_meshfed_with_retry(&mesh, &options).await;
    poll_until(TIMEOUT, || async {
        let proxies = connected(&meshfed).await?;
        for id in &ids {
            ensure!(proxies.contains(id), "{id} has not reconnected: {proxies:?}");
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    churning.store(false, Ordering::Relaxed);
    churn.await.unwrap();
    for e in &envoys {
        poll_until(TIMEOUT, || envoy_converged(e)).await.unwrap_or_else(|e| panic!("{e:#}"));
    }
    meshfed.assert_no_nacks().await.unwrap();

    // a Delta client reconnecting with what it held gets nothing: none of it changed
    let responses = delta_reconnect(meshfed.xds_address(), &script, &held).await.unwrap();
    assert_nothing_resent(&responses, &held);
}

/// Restarts meshfed on fixed ports; the old process's port can take a moment to be free again.
async fn start_meshfed_with_retry(mesh: &Path, options: &MeshfedOptions) -> Meshfed {
    let mut last = None;
    for _ in 0..20 {
        match support::start_meshfed_with(mesh, options).await {
            Ok(m) => return m,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("meshfed did not restart: {:#}", last.unwrap_or_else(|| anyhow!("no attempt")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_serve_identical_resources_so_moving_between_them_pushes_nothing() {
    const OCTET: u8 = 113;
    let (_dir, mesh) = demo(OCTET);
    let a = start_meshfed(&mesh).await.expect("replica A");
    let b = start_meshfed(&mesh).await.expect("replica B");
    for node in [
        format!("sidecar~127.{OCTET}.50.1~client-0.shop~shop.svc.cluster.local"),
        format!("router~127.{OCTET}.10.2~istio-eastwestgateway-0.istio-system~istio-system.svc.cluster.local"),
    ] {
        let from_a = fetch_all(a.xds_address(), Flavor::Sotw, &node).await.unwrap();
        let from_b = fetch_all(b.xds_address(), Flavor::Sotw, &node).await.unwrap();
        for t in TYPES {
            let (ha, hb) = (from_a.get(t).cloned().unwrap_or_default(), from_b.get(t).cloned().unwrap_or_default());
            let (ra, rb) = (&ha.resources, &hb.resources);
            assert_eq!(ra.keys().collect::<Vec<_>>(), rb.keys().collect::<Vec<_>>(), "{node}: {t} names differ");
            for (name, r) in ra {
                assert!(r.body == rb[name].body, "{node}: {t} {name} differs between the replicas");
            }
            assert_eq!(ha.version, hb.version, "{node}: {t} version_info differs");
        }
        // Delta: the versions of each resource are the same, so a proxy moving from A to B gets nothing
        let held = fetch_all(a.xds_address(), Flavor::Delta, &node).await.unwrap();
        let responses = delta_reconnect(b.xds_address(), &node, &held).await.unwrap();
        assert_nothing_resent(&responses, &held);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_manifest_keeps_the_last_good_state() {
    const OCTET: u8 = 114;
    let (dir, mesh) = demo(OCTET);
    let slices = SlicesFile::of_cluster(dir.path(), "aws-use1").unwrap();
    let original = &slices.original;
    let meshfed = start_meshfed(&mesh).await.expect("meshfed");
    let node = format!("sidecar~127.{OCTET}.50.1~client-0.shop~shop.svc.cluster.local");

    // a Delta client watching reviews' endpoints
    let mut client = AdsClient::connect(meshfed.xds_address(), Flavor::Delta, sidecar_node(&node)).await.unwrap();
    let first = client.subscribe_and_ack(type_url::ENDPOINT, &[REVIEWS]).await.unwrap();
    assert_eq!(first.resources.len(), 1);
    let version = first.resources[0].version.clone();
    let endpoints_before = meshfed.debug_json("/debug/endpointz").await.unwrap();

    // the file written halfway (not atomically): cut inside a mapping, so it does not parse
    let middle = original.len() / 2;
    let cut = middle + original[middle..].find("conditions:").expect("a conditions key") + "condi".len();
    slices.write(&original[..cut]).unwrap();
    poll_until(TIMEOUT, || async {
        let errors = meshfed.debug_json("/debug/source_errors").await?;
        let text = errors.to_string();
        ensure!(text.contains("endpointslices.yaml"), "no error reported yet: {text}");
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    // the last good state is still served: nothing new for reviews, the registry unchanged
    if let Ok(Some(r)) = client.recv_within(QUIET).await {
        panic!("reviews' endpoints were pushed from a half-written file: {}", r.summary());
    }
    assert_eq!(meshfed.debug_json("/debug/endpointz").await.unwrap(), endpoints_before);

    // the file completed, with one reviews endpoint no longer ready: error cleared, the change pushed
    slices
        .rewrite(|docs| {
            let first =
                docs.endpoints_mut("reviews")?.first_mut().ok_or_else(|| anyhow!("reviews has no endpoints"))?;
            set_ready(first, false);
            Ok(())
        })
        .unwrap();
    let r = client.recv().await.unwrap();
    assert_eq!(r.resources.len(), 1);
    assert_ne!(r.resources[0].version, version);
    poll_until(TIMEOUT, || async {
        let errors = meshfed.debug_json("/debug/source_errors").await?;
        ensure!(!errors.to_string().contains("endpointslices.yaml"), "still reported: {errors}");
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
}

// ---------------------------------------------------------------------------------------------
// A Kubernetes API server that fails, slows down and cuts its watches
// ---------------------------------------------------------------------------------------------

/// A Delta client following reviews' endpoints: the endpoint addresses of each assignment it receives.
struct EdsFollower(AdsClient);

impl EdsFollower {
    async fn start(addr: std::net::SocketAddr, node: envoy_types::pb::envoy::config::core::v3::Node) -> Result<Self> {
        let mut client = AdsClient::connect(addr, Flavor::Delta, node).await?;
        client.subscribe(type_url::ENDPOINT, &[REVIEWS]).await?;
        Ok(EdsFollower(client))
    }

    /// The addresses of the next assignment of reviews (ACKed).
    async fn next(&mut self, within: Duration) -> Result<Option<std::collections::BTreeSet<String>>> {
        let Some(r) = self.0.recv_within(within).await? else { return Ok(None) };
        self.0.ack(&r).await?;
        let mut out = std::collections::BTreeSet::new();
        for cla in r.decode_all::<ClusterLoadAssignment>()? {
            out.extend(endpoint_addresses(&cla));
        }
        Ok(Some(out))
    }

    /// Reads assignments until one has exactly `expected` (bounded by [`TIMEOUT`]).
    async fn until(&mut self, what: &str, expected: &[&str]) -> Result<()> {
        let expected: std::collections::BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let mut last = None;
        while tokio::time::Instant::now() < deadline {
            match self.next(deadline - tokio::time::Instant::now()).await? {
                Some(got) if got == expected => return Ok(()),
                Some(got) => last = Some(got),
                None => break,
            }
        }
        anyhow::bail!("{what}: reviews never became {expected:?} (last: {last:?})")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_slow_and_cut_kubernetes_api_is_ridden_out() {
    use meshfed_testkit::kube_standin::{KubeStandin, WatchCut, objects};
    const OCTET: u8 = 116;
    let ip = |h: u8| format!("127.{OCTET}.1.{h}");
    let (a1, a2, a3) = (ip(1), ip(2), ip(3));
    let dir = tempfile::tempdir().unwrap();
    let api = KubeStandin::start().await.expect("the API stand-in");
    let kubeconfig = dir.path().join("kc.kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig("kc", None)).unwrap();
    let slice = |addrs: &[&str]| {
        let eps: Vec<(&str, &str)> = addrs.iter().map(|a| (*a, "kc-node-1")).collect();
        objects::endpoint_slice("shop", "reviews-kc", "reviews", ("http", 9080), &eps)
    };
    api.apply(objects::namespace("shop", None)).unwrap();
    api.apply(objects::node("kc-node-1", "us-east-1", "us-east-1a")).unwrap();
    api.apply(objects::service("shop", "reviews", &[("http", 9080)])).unwrap();
    api.apply(slice(&[&a1, &a2])).unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "clusters:\n  - id: kc\n    network: net\n    kubeconfig: {}\nreadyTimeout: 20s\n",
            kubeconfig.display()
        ),
    )
    .unwrap();
    let meshfed = start_meshfed(&mesh).await.expect("meshfed");
    let node = support::fixtures::node(
        &format!("sidecar~127.{OCTET}.50.1~client-0.shop~shop.svc.cluster.local"),
        &[("CLUSTER_ID", "kc"), ("NETWORK", "net"), ("INTERCEPTION_MODE", "NONE")],
        None,
    );
    let mut eds = EdsFollower::start(meshfed.xds_address(), node).await.unwrap();
    eds.until("the initial state", &[&a1, &a2]).await.unwrap();

    // 1. errors: every request fails (500), and the watches are cut so meshfed must relist; meanwhile a
    //    third endpoint appears. The last known state keeps being served (nothing is withdrawn)...
    api.set_failure(Some(500));
    let before = api.requests().len();
    api.expire_watches();
    // once meshfed has asked again (and been refused), its old watch is gone: only then the change
    poll_until(TIMEOUT, || async {
        let asked = api.requests().iter().skip(before).any(|r| r.contains("endpointslices"));
        ensure!(asked, "meshfed has not asked for the EndpointSlices again yet");
        Ok(())
    })
    .await
    .unwrap();
    api.apply(slice(&[&a1, &a2, &a3])).unwrap();
    if let Some(got) = eds.next(QUIET * 4).await.unwrap() {
        panic!("an assignment was pushed while the API failed every request: {got:?}");
    }
    // ... and once the API answers again, the change arrives
    api.set_failure(None);
    eds.until("recovery from errors", &[&a1, &a2, &a3]).await.unwrap();

    // 2. slow answers: every response of the API takes 2 s; changes still arrive
    api.set_delay(Duration::from_secs(2));
    api.expire_watches();
    api.apply(slice(&[&a2, &a3])).unwrap();
    eds.until("a slow API", &[&a2, &a3]).await.unwrap();
    api.set_delay(Duration::ZERO);

    // 3. cut watch streams: the API goes away mid-watch (every connection closed), changes are made
    //    meanwhile, and it comes back on the same port; meshfed reconciles exactly
    api.stop().await;
    api.apply(slice(&[&a1])).unwrap();
    if let Some(got) = eds.next(QUIET * 2).await.unwrap() {
        panic!("an assignment was pushed while the API was down: {got:?}");
    }
    api.restart().await.unwrap();
    eds.until("reconnection after cut watches", &[&a1]).await.unwrap();
    assert!(meshfed.guard.id().is_some());
    let clusterz = meshfed.debug_json("/debug/clusterz").await.unwrap();
    assert!(clusterz.to_string().contains("synced"), "{clusterz}");

    // 4. truncated watch streams, the API otherwise answering: every watch is cut, first mid-way through
    //    an event line, then between lines, the connection dropping without the chunked body's
    //    terminating chunk; a change made meanwhile does not arrive whole, so meshfed must not act on it:
    //    it keeps serving the last good state (nothing withdrawn), reports the cluster's watch error, and
    //    picks the change up once the watches are whole again.
    for cut in [WatchCut::MidLine, WatchCut::Abort] {
        let expected: &[&str] = if cut == WatchCut::MidLine { &[&a1] } else { &[&a1, &a2] };
        let change: &[&str] = if cut == WatchCut::MidLine { &[&a1, &a2] } else { &[&a1] };
        let watches = |from: usize| {
            api.requests()
                .iter()
                .skip(from)
                .filter(|r| r.contains("endpointslices") && r.contains("watch=true"))
                .count()
        };
        let before = api.requests().len();
        api.set_watch_cut(Some(cut));
        api.apply(slice(change)).unwrap();
        // meshfed's watch of EndpointSlices was cut (it carried the change) and it has watched again (and
        // been cut again): it rides the cuts out by retrying
        poll_until(TIMEOUT, || async {
            let n = watches(before);
            ensure!(n >= 2, "{cut:?}: {n} EndpointSlice watches since the cut began");
            Ok(())
        })
        .await
        .unwrap();
        if let Some(got) = eds.next(QUIET * 2).await.unwrap() {
            panic!("{cut:?}: an assignment was pushed while every watch was cut: {got:?} (serving {expected:?})");
        }
        // the cluster's health says what is wrong, and the cluster stays in the mesh
        let health = poll_until(TIMEOUT, || async {
            let clusterz = meshfed.debug_json("/debug/clusterz").await?;
            let text = clusterz.to_string();
            ensure!(text.contains("EndpointSlice watch"), "{cut:?}: no watch error reported: {clusterz}");
            Ok(clusterz)
        })
        .await
        .unwrap();
        eprintln!("{cut:?}: /debug/clusterz while watches are cut: {health}");
        // and meshfed backs off between its watches instead of asking again at once (kube-rs alone
        // would re-watch immediately after each cut, tens of times a second): at most a handful, however
        // long this phase took (the backoff doubles from 1 s)
        let n = watches(before);
        eprintln!("{cut:?}: {n} EndpointSlice watches while cut");
        assert!(n <= 20, "{cut:?}: {n} EndpointSlice watches while every watch was cut: no backoff");
        // whole watches again: the change arrives
        api.set_watch_cut(None);
        eds.until(&format!("recovery from {cut:?} watch cuts"), change).await.unwrap();
        // and the cluster's errors are cleared once its watches deliver again (also the kinds that
        // did not change: their watches resume without a relist)
        poll_until(TIMEOUT, || async {
            let clusterz = meshfed.debug_json("/debug/clusterz").await?;
            let kc = &clusterz[0];
            ensure!(kc["lastError"].is_null() && kc["syncStatus"] == "synced", "{cut:?}: not healthy again: {kc}");
            Ok(())
        })
        .await
        .unwrap();
    }
    assert!(meshfed.guard.id().is_some());
}
