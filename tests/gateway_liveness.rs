//! Gateway probes end to end, with real listeners on loopback: the demo's east-west gateways (a TCP
//! listener on each gateway port, 15443, and a tiny HTTP server answering `GET /healthz/ready` with 200 on
//! the status port, 15021, at the demo's gateway addresses `127.<octet>.10.1` and `127.<octet>.20.1`)
//! and an in-process meshfed whose mesh config has `gatewayProbes` with short intervals.
//!
//! Azure's gateway listener stops: an AWS proxy's EDS (read over ADS) moves Azure's endpoints (its
//! gateway) to the last priority within failureThreshold x interval + a push. It comes back: the priority
//! returns once the hold-down has passed, and stays.

use meshfed_testkit as support;

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, anyhow, ensure};
use envoy_types::pb::envoy::config::core::v3::address;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// this test's loopback addresses: 127.233.X.Y
const OCTET: u8 = 233;
const REVIEWS_EDS: &str = "outbound|9080||reviews.shop.svc.cluster.local";
const INTERVAL: Duration = Duration::from_millis(200);
const FAILURE_THRESHOLD: u32 = 3;
const HOLD_DOWN: Duration = Duration::from_secs(3);
/// failureThreshold x interval (+10% jitter) + a push, with room for a loaded machine
const FENCE_BOUND: Duration = Duration::from_secs(5);
/// hold-down + successThreshold x interval + a push, with room for a loaded machine
const RECOVERY_BOUND: Duration = Duration::from_secs(12);

/// A listener serving until dropped (the port refuses connections at once after).
struct Serving {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Serving {
    /// Accepts on `addr`; with `http`, answers each request `HTTP/1.1 200 OK`, else closes at once.
    async fn start(addr: SocketAddr, http: bool) -> Result<Serving> {
        let listener = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    accepted = listener.accept() => {
                        let Ok((mut s, _)) = accepted else { continue };
                        if http {
                            tokio::spawn(async move {
                                let mut buf = [0u8; 1024];
                                let _ = s.read(&mut buf).await;
                                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
                            });
                        }
                    }
                }
            }
        });
        Ok(Serving { stop: Some(stop), task })
    }

    /// Stops accepting and closes the listening socket (waits for it).
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn addr(s: String) -> SocketAddr {
    s.parse().expect("a socket address")
}

/// Priority of each host of the AWS proxy's `reviews` assignment, as `(address:port, priority)`.
async fn reviews_priorities(xds: SocketAddr) -> Result<Vec<(String, u32)>> {
    let node = format!("sidecar~127.{OCTET}.50.1~client.shop~shop.svc.cluster.local");
    let all = support::ads::fetch_all(xds, support::ads::Flavor::Sotw, &node).await?;
    let eds = all.get(meshfed::type_url::ENDPOINT).ok_or_else(|| anyhow!("no EDS"))?;
    let held =
        eds.resources.get(REVIEWS_EDS).ok_or_else(|| anyhow!("no {REVIEWS_EDS} in {:?}", eds.resources.keys()))?;
    let cla = ClusterLoadAssignment::decode(held.body.as_slice())?;
    let mut out = Vec::new();
    for l in &cla.endpoints {
        for e in &l.lb_endpoints {
            let Some(HostIdentifier::Endpoint(pe)) = &e.host_identifier else { continue };
            let Some(address::Address::SocketAddress(sa)) = pe.address.as_ref().and_then(|a| a.address.clone()) else {
                continue;
            };
            let Some(PortSpecifier::PortValue(port)) = sa.port_specifier else { continue };
            out.push((format!("{}:{port}", sa.address), l.priority));
        }
    }
    Ok(out)
}

/// (the Azure gateway's priority, the highest priority of the other hosts)
async fn azure_vs_rest(xds: SocketAddr, azure_gateway: &str) -> Result<(u32, u32)> {
    let p = reviews_priorities(xds).await?;
    let azure = p.iter().find(|(h, _)| h == azure_gateway).map(|(_, p)| *p);
    let azure = azure.ok_or_else(|| anyhow!("the Azure gateway {azure_gateway} is not in {p:?}"))?;
    let rest = p.iter().filter(|(h, _)| h != azure_gateway).map(|(_, p)| *p).max().unwrap_or(0);
    ensure!(p.iter().any(|(h, _)| h != azure_gateway), "no AWS endpoint in {p:?}");
    Ok((azure, rest))
}

/// The gateway metrics are process-wide (one prober per meshfed process): the tests of this file, which
/// run probers in one test process, take turns.
static ONE_PROBER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_gateway_fences_its_network_for_other_networks_and_recovers_after_the_hold_down() -> Result<()> {
    let _turn = ONE_PROBER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir()?;
    let mesh_path = support::server::copy_demo(dir.path(), OCTET);
    let mut mesh = std::fs::read_to_string(&mesh_path)?;
    mesh.push_str(&format!(
        "gatewayProbes: {{interval: {}ms, timeout: 150ms, failureThreshold: {FAILURE_THRESHOLD}, successThreshold: 2, holdDown: {}s, statusPort: 15021, concurrency: 4}}\n",
        INTERVAL.as_millis(),
        HOLD_DOWN.as_secs()
    ));
    std::fs::write(&mesh_path, mesh)?;

    // both networks' gateways answer: the gateway port and the status port
    let aws_gateway = format!("127.{OCTET}.10.1:15443");
    let azure_gateway = format!("127.{OCTET}.20.1:15443");
    let _aws = Serving::start(addr(aws_gateway.clone()), false).await?;
    let _aws_status = Serving::start(addr(format!("127.{OCTET}.10.1:15021")), true).await?;
    let azure = Serving::start(addr(azure_gateway.clone()), false).await?;
    let _azure_status = Serving::start(addr(format!("127.{OCTET}.20.1:15021")), true).await?;

    let mesh = meshfed::mesh_config::MeshConfig::load(&mesh_path)?;
    let mut options = meshfed::app::Options::in_process(mesh.clone(), support::server::files_events(&mesh));
    options.xds.push(meshfed::app::XdsListener::loopback_unlimited());
    options.debug = Some(meshfed::app::DebugListener {
        listen: meshfed::app::Listen::loopback(),
        access: Default::default(),
        demo: false,
    });
    let server = support::server::TestServer::with_options(options).await;
    let debug = server.app.debug_address().ok_or_else(|| anyhow!("a debug listener"))?;
    let report = server.app.gateway_probes.clone().ok_or_else(|| anyhow!("gatewayProbes on: the prober runs"))?;

    // a proxy without locality: every endpoint at priority 0 while both networks' gateways are up
    let (a, rest) =
        support::poll_until(Duration::from_secs(10), || async { azure_vs_rest(server.xds_addr, &azure_gateway).await })
            .await?;
    assert_eq!((a, rest), (0, 0), "both networks at the same priority while the gateways answer");
    // the prober saw both gateways up
    support::poll_until(Duration::from_secs(5), || async {
        let r = report.borrow().clone();
        ensure!(r.verdict.reachable.len() == 2 && r.verdict.fenced.is_empty(), "{:?}", r.verdict);
        Ok(())
    })
    .await?;

    // Azure's API server stops answering (long past the grace period) while its gateway answers: nothing
    // moves ("API unreachable, gateways up"; without probes the cluster would be demoted at this push)
    let azure_weu = meshfed::model::ClusterId::new("azure-weu");
    let reachability = |reachable: bool| meshfed::source::SourceEvent::ClusterReachability {
        cluster: azure_weu.clone(),
        reachable,
        since: SystemTime::now() - 2 * mesh.unreachable_grace_period,
    };
    let generation = server.push.snapshot().generation;
    server.events.send(reachability(false))?;
    tokio::time::timeout(Duration::from_secs(5), server.wait_generation_after(generation)).await?;
    assert_eq!(azure_vs_rest(server.xds_addr, &azure_gateway).await?, (0, 0), "API unreachable, gateways up");
    server.events.send(reachability(true))?;

    // Azure's gateway listener stops: within failureThreshold x interval + a push, its endpoints are last
    azure.stop().await;
    let stopped = Instant::now();
    support::poll_until(FENCE_BOUND, || async {
        let (a, rest) = azure_vs_rest(server.xds_addr, &azure_gateway).await?;
        ensure!(a > rest, "the Azure gateway at {a}, the others up to {rest}");
        Ok(())
    })
    .await
    .context("Azure's endpoints moved to the last priority")?;
    let fenced_after = stopped.elapsed();
    eprintln!(
        "fenced after {fenced_after:?} (bound: failureThreshold {FAILURE_THRESHOLD} x interval {INTERVAL:?} = {:?}, + a push)",
        INTERVAL * FAILURE_THRESHOLD
    );
    assert!(fenced_after < FENCE_BOUND);
    {
        let r = report.borrow().clone();
        assert!(r.verdict.fenced.iter().any(|n| n.as_str() == "azure-net"), "{:?}", r.verdict);
        assert!(r.verdict.reachable.iter().any(|n| n.as_str() == "aws-net"), "AWS is not affected: {:?}", r.verdict);
    }

    // the debug surface shows the evidence, the metrics the verdict
    let (status, body) = support::http_get(debug, "localhost", "/debug/clusterz").await?;
    assert_eq!(status, 200, "{body}");
    let clusters: serde_json::Value = serde_json::from_str(&body)?;
    let by_id =
        |id: &str| clusters.as_array().into_iter().flatten().find(|c| c["id"] == id).cloned().unwrap_or_default();
    let azure_weu = by_id("azure-weu");
    let g = &azure_weu["gateways"];
    assert_eq!(g["probing"], true, "{azure_weu}");
    assert_eq!(g["fenced"], true, "{azure_weu}");
    let a = &g["addresses"][0];
    assert_eq!(a["address"], azure_gateway.as_str(), "{azure_weu}");
    assert_eq!(a["state"], "down", "{azure_weu}");
    assert!(a["consecutiveFailures"].as_u64().unwrap_or(0) >= u64::from(FAILURE_THRESHOLD), "{azure_weu}");
    assert_eq!(a["lastProbe"]["ok"], false, "{azure_weu}");
    assert!(a["lastProbe"]["error"].as_str().is_some_and(|e| e.contains(&azure_gateway)), "{azure_weu}");
    assert!(a["lastProbe"]["at"].is_string() && a["downSince"].is_string(), "{azure_weu}");
    let aws_use1 = by_id("aws-use1");
    assert_eq!(aws_use1["gateways"]["fenced"], false, "{aws_use1}");
    assert_eq!(aws_use1["gateways"]["addresses"][0]["state"], "up", "{aws_use1}");
    let (status, metrics) = support::http_get(debug, "localhost", "/metrics").await?;
    assert_eq!(status, 200);
    assert!(metrics.contains("meshfed_network_fenced{network=\"azure-net\"} 1\n"), "{metrics}");
    assert!(metrics.contains("meshfed_network_fenced{network=\"aws-net\"} 0\n"), "{metrics}");
    assert!(
        metrics.contains(&format!("meshfed_gateway_up{{network=\"azure-net\",address=\"{azure_gateway}\"}} 0\n")),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("meshfed_gateway_up{{network=\"aws-net\",address=\"{aws_gateway}\"}} 1\n")),
        "{metrics}"
    );

    // back: the priority returns, not before the hold-down since the address went down
    let down_since = {
        let r = report.borrow().clone();
        let nets = r.evidence.networks();
        let azure_net = nets.iter().find(|(n, _)| n.as_str() == "azure-net").map(|(_, a)| a);
        let e = azure_net.and_then(|a| a.get(&addr(azure_gateway.clone()))).ok_or_else(|| anyhow!("no evidence"))?;
        e.down_since_wall.ok_or_else(|| anyhow!("the address is down, with its time"))?
    };
    let _azure = Serving::start(addr(azure_gateway.clone()), false).await?;
    let restarted = Instant::now();
    let mut returned = None;
    let mut reads_within_hold_down = 0;
    while restarted.elapsed() < RECOVERY_BOUND {
        let (a, rest) = azure_vs_rest(server.xds_addr, &azure_gateway).await?;
        let read_done = SystemTime::now();
        if read_done < down_since + HOLD_DOWN {
            reads_within_hold_down += 1;
            assert!(a > rest, "fenced during the hold-down (read {read_done:?}, down since {down_since:?})");
        }
        if (a, rest) == (0, 0) {
            returned = Some(restarted.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let returned = returned.ok_or_else(|| anyhow!("Azure's priority did not return within {RECOVERY_BOUND:?}"))?;
    eprintln!("back after {returned:?} ({reads_within_hold_down} reads during the hold-down saw it fenced)");
    // once: it stays for several probe rounds
    let until = Instant::now() + INTERVAL * 5;
    while Instant::now() < until {
        assert_eq!(azure_vs_rest(server.xds_addr, &azure_gateway).await?, (0, 0), "stays back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = report.borrow().clone();
    assert!(r.verdict.fenced.is_empty() && r.verdict.down.is_empty(), "{:?}", r.verdict);
    Ok(())
}

/// Replicas decide alike: two meshfeds with the same mesh config, probing the same gateways on their
/// own, reach the same verdicts — Azure fenced, then back — and the time between their decisions stays
/// within the bound README gives ("Replicas"): (0.2 x max(failureThreshold, successThreshold) + 0.9) x
/// interval, the spread of their probe rounds (jitter ±10%, rounds not aligned), plus the push debounce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_reach_the_same_verdicts_within_the_stated_bound() -> Result<()> {
    let _turn = ONE_PROBER_AT_A_TIME.lock().await;
    const OCTET: u8 = 234;
    let dir = tempfile::tempdir()?;
    let mesh_path = support::server::copy_demo(dir.path(), OCTET);
    let mut text = std::fs::read_to_string(&mesh_path)?;
    text.push_str(&format!(
        "gatewayProbes: {{interval: {}ms, timeout: 150ms, failureThreshold: {FAILURE_THRESHOLD}, successThreshold: 2, holdDown: {}s, statusPort: 15021, concurrency: 4}}\n",
        INTERVAL.as_millis(),
        HOLD_DOWN.as_secs()
    ));
    std::fs::write(&mesh_path, text)?;
    let azure_gateway = addr(format!("127.{OCTET}.20.1:15443"));
    let _aws = Serving::start(addr(format!("127.{OCTET}.10.1:15443")), false).await?;
    let _aws_status = Serving::start(addr(format!("127.{OCTET}.10.1:15021")), true).await?;
    let azure = Serving::start(azure_gateway, false).await?;
    let _azure_status = Serving::start(addr(format!("127.{OCTET}.20.1:15021")), true).await?;

    let mesh = meshfed::mesh_config::MeshConfig::load(&mesh_path)?;
    let probes = mesh.gateway_probes.clone().ok_or_else(|| anyhow!("gatewayProbes set"))?;
    let bound = INTERVAL.mul_f64(0.2 * f64::from(probes.failure_threshold.max(probes.success_threshold)) + 0.9)
        + mesh.debounce.max;
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let server = support::server::TestServer::start(&mesh, support::server::files_events(&mesh)).await;
        let report = server.app.gateway_probes.clone().ok_or_else(|| anyhow!("the prober runs"))?;
        replicas.push((server, report));
    }
    // Both see both networks reachable.
    for (_, report) in &replicas {
        support::poll_until(Duration::from_secs(5), || async {
            let v = report.borrow().verdict.clone();
            ensure!(v.reachable.len() == 2 && v.fenced.is_empty(), "{v:?}");
            Ok(())
        })
        .await?;
    }

    // When did each replica publish a snapshot with `fenced(azure-net) == want`?
    async fn decided(server: &support::server::TestServer, want: bool, within: Duration) -> Result<Instant> {
        let mut rx = server.app.push.subscribe();
        tokio::time::timeout(within, async {
            loop {
                let fenced = rx.borrow_and_update().gateway_verdict.fenced.iter().any(|n| n.as_str() == "azure-net");
                if fenced == want {
                    return Ok(Instant::now());
                }
                rx.changed().await.map_err(|_| anyhow!("push loop ended"))?;
            }
        })
        .await
        .map_err(|_| anyhow!("no decision fenced={want} within {within:?}"))?
    }

    azure.stop().await;
    let (a, b) = tokio::join!(
        decided(&replicas[0].0, true, FENCE_BOUND + bound),
        decided(&replicas[1].0, true, FENCE_BOUND + bound)
    );
    let (a, b) = (a?, b?);
    let gap = a.max(b) - a.min(b);
    eprintln!("fence: the replicas decided {gap:?} apart (bound {bound:?})");
    assert!(gap <= bound, "the replicas fenced {gap:?} apart, more than {bound:?}");
    let (va, vb) = (replicas[0].1.borrow().verdict.clone(), replicas[1].1.borrow().verdict.clone());
    assert_eq!(va, vb, "the same verdict from the same evidence");

    let _azure = Serving::start(azure_gateway, false).await?;
    let (a, b) = tokio::join!(
        decided(&replicas[0].0, false, RECOVERY_BOUND + bound),
        decided(&replicas[1].0, false, RECOVERY_BOUND + bound)
    );
    let (a, b) = (a?, b?);
    let gap = a.max(b) - a.min(b);
    eprintln!("return: the replicas decided {gap:?} apart (bound {bound:?})");
    assert!(gap <= bound, "the replicas unfenced {gap:?} apart, more than {bound:?}");
    Ok(())
}
