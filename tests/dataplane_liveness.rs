//! Data-plane evidence end to end (issue 16's acceptance), with the meshfed binary, real Envoys and a
//! Kubernetes API stand-in for Azure:
//!
//! - Azure's API server stops answering for two minutes while its east-west gateway answers: no endpoint
//!   of the AWS client changes priority, and the traffic split (ratings' `distribute` 80/20) is unchanged.
//! - Azure's gateway dies while Azure's API answers: the AWS client stops sending there within
//!   failureThreshold x interval + one push; the requests that failed in that window are counted and none
//!   fails after it. The gateway comes back: traffic returns after the hold-down, once (no flapping).
//!
//! Topology (loopback, `127.<octet>.0.0/16`, from the demo; see tests/cross_cloud.rs for the same mesh
//! with both clouds from files):
//!
//! ```text
//!  test ──HTTP──▶ client sidecar (aws-net, us-east-1a, 127.o.50.1) ──plaintext──▶ AWS backends 127.o.{1,2}.x
//!                   │ mTLS, SNI outbound_.9080_._.ratings...
//!                   ▼
//!     Azure east-west gateway Envoy 127.o.20.1:15443 (+ its status port 15021, GET /healthz/ready)
//!                   ▼
//!     Azure sidecars 127.o.{3,4}.31 ──▶ Azure apps 127.o.{103,104}.31
//! ```
//!
//! meshfed reads aws-use1 from files and azure-weu from the API stand-in (the demo's azure-weu objects),
//! with `unreachableGracePeriod: 5s` (an outage of two minutes is far past it: without gateway evidence
//! Azure would be demoted) and `gatewayProbes` at their defaults except `holdDown` (5 s instead of 30 s, so
//! that recovery fits in a bounded test; the hold-down only delays the return). The mesh default outlier
//! detection ejects for 2 s instead of 30 s: under the test's traffic Envoy ejects the dead gateway host
//! within milliseconds, and the ejection must end soon after the gateway is back.
//!
//! `MESHFED_LIVENESS_RUNS=N cargo test --release --test dataplane_liveness -- --ignored gateway_death_timing`
//! repeats the gateway's death N times and prints the time until the client stopped sending there
//! (BENCHMARKS.md, "Gateway death").

use meshfed_testkit as support;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, ensure};
use support::kube_standin::KubeStandin;
use support::{
    Backend, BootstrapSpec, Envoy, HostDetail, MeshIdentity, Meshfed, TestCa, addr4, bootstrap_with, http_get, ip4,
    poll_until, start_envoy, start_meshfed,
};

const PORT: u16 = 9080;
const RATINGS: &str = "ratings.shop.svc.cluster.local";
const CLUSTER: &str = "outbound|9080||ratings.shop.svc.cluster.local";
/// ratings' first endpoint in each zone ends in .31
const HOST: u8 = 31;
const AZURE_PODS: [&str; 2] = ["ratings-v1-4c7d5-a1", "ratings-v1-4c7d5-b1"];
const US_EAST_1A: u8 = 1;
const US_EAST_1B: u8 = 2;
const WESTEUROPE_1: u8 = 3;
const WESTEUROPE_2: u8 = 4;
const APP_OFFSET: u8 = 100;
const AWS_GATEWAY: (u8, u8) = (10, 1);
const AZURE_GATEWAY: (u8, u8) = (20, 1);
const CLIENT: (u8, u8) = (50, 1);
const GATEWAY_PORT: u16 = 15443;
const STATUS_PORT: u16 = 15021;

/// The probe settings: the defaults (interval 1 s, timeout 1 s, 3 failures down, 3 successes up), with a
/// hold-down of 5 s.
const INTERVAL: Duration = Duration::from_secs(1);
const FAILURE_THRESHOLD: u32 = 3;
const HOLD_DOWN: Duration = Duration::from_secs(5);
/// The debounce of the demo's mesh config (`max: 1s`): the longest a push waits.
const PUSH: Duration = Duration::from_secs(1);
/// Envoy applying an EDS update and the test noticing, on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(3);
/// How long an Azure API outage lasts.
const OUTAGE: Duration = Duration::from_secs(120);
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

// ---- the mesh ----

/// Every object of the YAML files in `dir` (multi-document, `kind: List` flattened), as JSON.
fn objects_of_dir(dir: &Path) -> Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for file in files.iter().filter(|f| f.extension().is_some_and(|e| e == "yaml")) {
        let text = std::fs::read_to_string(file)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = <serde_json::Value as serde::Deserialize>::deserialize(doc)
                .with_context(|| format!("parsing {}", file.display()))?;
            if value.is_null() {
                continue;
            }
            if value["kind"] == "List" {
                out.extend(value["items"].as_array().cloned().unwrap_or_default());
            } else {
                out.push(value);
            }
        }
    }
    Ok(out)
}

struct AzureWorkload {
    _sidecar: Envoy,
    _app: Backend,
}

/// meshfed, the API stand-in serving azure-weu, both gateways' listeners, the Azure workloads and the AWS
/// client sidecar. (Fields drop in order: the Envoys before meshfed.)
struct Mesh {
    client: Envoy,
    gateway: Option<Envoy>,
    gateway_yaml: String,
    _azure: Vec<AzureWorkload>,
    _status: Vec<Backend>,
    _aws_gateway: Backend,
    _aws_backends: Vec<Backend>,
    meshfed: Meshfed,
    api: KubeStandin,
    _dir: tempfile::TempDir,
    octet: u8,
}

impl Mesh {
    async fn start(octet: u8) -> Result<Mesh> {
        support::envoy_path();
        let dir = tempfile::Builder::new().prefix("meshfed-dataplane-liveness-").tempdir()?;
        let mesh_path = support::server::copy_demo(dir.path(), octet);
        support::demo::plain_aws_one_azure_endpoint_per_zone(dir.path())?;

        // azure-weu comes from the API stand-in, with the demo's objects
        let api = KubeStandin::start().await?;
        for object in objects_of_dir(&dir.path().join("azure-weu"))? {
            api.apply(object)?;
        }
        let kubeconfig = dir.path().join("azure-weu.kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig("azure-weu", Some("token-of-meshfed")))?;
        let mesh = std::fs::read_to_string(&mesh_path)?;
        let mesh =
            mesh.replacen("    manifests: azure-weu\n", &format!("    kubeconfig: {}\n", kubeconfig.display()), 1);
        ensure!(mesh.contains("kubeconfig:"), "no azure-weu manifests line in the demo's mesh config");
        // outlier detection ejects the dead gateway host at once under this traffic; short ejections, so
        // that it serves again soon after it is back (the demo's 30 s, multiplied per ejection, would not)
        let mesh = mesh.replacen(
            "    interval: 10s\n    baseEjectionTime: 30s\n",
            "    interval: 1s\n    baseEjectionTime: 2s\n",
            1,
        );
        ensure!(mesh.contains("baseEjectionTime: 2s"), "no default outlierDetection in the demo's mesh config");
        let mut mesh = mesh;
        mesh.push_str(&format!("unreachableGracePeriod: 5s\ngatewayProbes:\n  holdDown: {}s\n", HOLD_DOWN.as_secs()));
        std::fs::write(&mesh_path, mesh)?;

        let ca = TestCa::new(&dir.path().join("certs"))?;
        let spiffe = |sa: &str| format!("spiffe://cluster.local/ns/shop/sa/{sa}");
        let client_id = ca.issue("client", &spiffe("client"))?;
        let workload_id = ca.issue("ratings", &spiffe("ratings"))?;

        // Both gateways' status ports answer (pilot-agent's readiness); AWS's gateway port accepts.
        let mut status = Vec::new();
        for (a, b) in [AWS_GATEWAY, AZURE_GATEWAY] {
            status.push(Backend::start(addr4(octet, a, b, STATUS_PORT)).await?);
        }
        let aws_gateway = Backend::start(addr4(octet, AWS_GATEWAY.0, AWS_GATEWAY.1, GATEWAY_PORT)).await?;
        let mut aws_backends = Vec::new();
        for zone in [US_EAST_1A, US_EAST_1B] {
            for h in [HOST, HOST + 1] {
                aws_backends.push(Backend::start(addr4(octet, zone, h, PORT)).await?);
            }
        }

        let meshfed = start_meshfed(&mesh_path).await?;
        let xds = meshfed.xds_port;

        let gateway_ip = ip4(octet, AZURE_GATEWAY.0, AZURE_GATEWAY.1);
        let gateway_yaml = bootstrap_with(&BootstrapSpec::azure_east_west_gateway(gateway_ip, xds));
        let mut yamls =
            vec![gateway_yaml.clone(), bootstrap_with(&client_spec(ip4(octet, CLIENT.0, CLIENT.1), xds, client_id))];
        let mut apps = Vec::new();
        for (zone, pod) in [WESTEUROPE_1, WESTEUROPE_2].into_iter().zip(AZURE_PODS) {
            let endpoint = addr4(octet, zone, HOST, PORT);
            let app_ip = ip4(octet, APP_OFFSET + zone, HOST);
            apps.push(Backend::start_with_reply(SocketAddr::new(app_ip, PORT), &endpoint.to_string()).await?);
            yamls.push(bootstrap_with(&BootstrapSpec {
                cluster_id: Some("azure-weu".into()),
                network: Some("azure-net".into()),
                locality: Some(format!("westeurope/westeurope-{}", zone - WESTEUROPE_1 + 1)),
                tls: Some(workload_id.clone()),
                inbound_address: Some(app_ip),
                ..BootstrapSpec::new(&format!("sidecar~{}~{pod}.shop~shop.svc.cluster.local", endpoint.ip()), xds)
            }));
        }
        let mut envoys = futures::future::try_join_all(yamls.iter().map(|y| start_envoy(y))).await?.into_iter();
        let (gateway, client) = (envoys.next().expect("gateway"), envoys.next().expect("client"));
        let azure =
            apps.into_iter().zip(envoys).map(|(app, sidecar)| AzureWorkload { _sidecar: sidecar, _app: app }).collect();
        Ok(Mesh {
            client,
            gateway: Some(gateway),
            gateway_yaml,
            _azure: azure,
            _status: status,
            _aws_gateway: aws_gateway,
            _aws_backends: aws_backends,
            meshfed,
            api,
            _dir: dir,
            octet,
        })
    }

    fn listener(&self) -> SocketAddr {
        addr4(self.octet, CLIENT.0, CLIENT.1, PORT)
    }

    fn gateway_address(&self) -> SocketAddr {
        addr4(self.octet, AZURE_GATEWAY.0, AZURE_GATEWAY.1, GATEWAY_PORT)
    }

    fn aws(&self) -> BTreeSet<SocketAddr> {
        [US_EAST_1A, US_EAST_1B]
            .into_iter()
            .flat_map(|z| [HOST, HOST + 1].map(|h| addr4(self.octet, z, h, PORT)))
            .collect()
    }

    fn azure(&self) -> BTreeSet<SocketAddr> {
        [WESTEUROPE_1, WESTEUROPE_2].into_iter().map(|z| addr4(self.octet, z, HOST, PORT)).collect()
    }

    /// The client's hosts of ratings:9080 as (address, priority), sorted.
    async fn priorities(&self) -> Result<Vec<(SocketAddr, u32)>> {
        let hosts = self.client.cluster_host_details(CLUSTER).await?;
        let mut out: Vec<_> = hosts.iter().map(|h| (h.address, h.priority)).collect();
        out.sort();
        Ok(out)
    }

    /// The Azure gateway's priority and the highest priority of the AWS hosts, in the client.
    async fn gateway_vs_aws(&self) -> Result<(u32, u32)> {
        let p = self.priorities().await?;
        let gateway = self.gateway_address();
        let g = p.iter().find(|(a, _)| *a == gateway).map(|(_, p)| *p);
        let g = g.ok_or_else(|| anyhow!("the Azure gateway {gateway} is not among the client's hosts {p:?}"))?;
        let aws = p.iter().filter(|(a, _)| *a != gateway).map(|(_, p)| *p).max();
        Ok((g, aws.ok_or_else(|| anyhow!("no AWS host in {p:?}"))?))
    }

    /// The Azure gateway host's connection attempts, as the client counts them (`cx_total` plus
    /// `cx_connect_fail` of that host in `/clusters`).
    async fn attempts_to_gateway(&self) -> Result<u64> {
        let hosts = self.client.cluster_hosts(CLUSTER).await?;
        let h = hosts.get(&self.gateway_address()).ok_or_else(|| anyhow!("no gateway host"))?;
        let n = |k: &str| h.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        Ok(n("cx_total") + n("cx_connect_fail") + n("rq_total"))
    }

    /// Waits until both clouds answer and the client holds the AWS endpoints and the gateway at
    /// priority 0 (`distribute`).
    async fn wait_steady(&self) -> Result<Vec<(SocketAddr, u32)>> {
        let want: Vec<(SocketAddr, u32)> = {
            let mut v: Vec<_> = self.aws().into_iter().map(|a| (a, 0)).collect();
            v.push((self.gateway_address(), 0));
            v.sort();
            v
        };
        let all: BTreeSet<_> = self.aws().union(&self.azure()).copied().collect();
        poll_until(STEP_TIMEOUT, || async {
            // meshfed's prober has seen Azure's gateway up (not only not yet failed: it started after
            // meshfed, so the first probes may have failed)
            let azure = self.cluster_status("azure-weu").await?;
            let state = &azure["gateways"]["addresses"][0]["state"];
            ensure!(state == "up", "Azure's gateway address is {state} for meshfed");
            let p = self.priorities().await?;
            ensure!(p == want, "client hosts {p:?}, expected {want:?}");
            let seen = send(self.listener(), 100, 4).await;
            ensure!(seen.iter().all(|r| r.endpoint.is_some_and(|e| all.contains(&e))), "stray or failed: {seen:?}");
            ensure!(seen.iter().any(|r| r.endpoint.is_some_and(|e| self.azure().contains(&e))), "Azure never answered");
            Ok(p)
        })
        .await
    }

    /// `cluster`'s entry of meshfed's /debug/clusterz.
    async fn cluster_status(&self, cluster: &str) -> Result<serde_json::Value> {
        let clusters = self.meshfed.debug_json("/debug/clusterz").await?;
        let found = clusters.as_array().into_iter().flatten().find(|c| c["id"] == cluster).cloned();
        found.ok_or_else(|| anyhow!("no {cluster} in /debug/clusterz: {clusters}"))
    }

    async fn kill_gateway(&mut self) {
        self.gateway.take();
    }

    async fn restart_gateway(&mut self) -> Result<()> {
        self.gateway = Some(start_envoy(&self.gateway_yaml).await?);
        Ok(())
    }
}

fn client_spec(ip: IpAddr, xds_port: u16, identity: MeshIdentity) -> BootstrapSpec {
    BootstrapSpec {
        cluster_id: Some("aws-use1".into()),
        network: Some("aws-net".into()),
        locality: Some("us-east-1/us-east-1a".into()),
        tls: Some(identity),
        ..BootstrapSpec::new(&format!("sidecar~{ip}~client-0.shop~shop.svc.cluster.local"), xds_port)
    }
}

// ---- requests ----

#[derive(Debug, Clone)]
struct Outcome {
    /// when the request ended
    at: Instant,
    /// the endpoint that answered; None: the request failed
    endpoint: Option<SocketAddr>,
}

/// Sends `n` requests for ratings through the client sidecar, `concurrency` at a time; failures are
/// outcomes, not errors.
async fn send(listener: SocketAddr, n: usize, concurrency: usize) -> Vec<Outcome> {
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let count = n / concurrency + usize::from(worker < n % concurrency);
        tasks.spawn(async move {
            let mut out = Vec::with_capacity(count);
            for _ in 0..count {
                out.push(one(listener).await);
            }
            out
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        out.extend(r.unwrap_or_default());
    }
    out
}

async fn one(listener: SocketAddr) -> Outcome {
    let endpoint = match http_get(listener, RATINGS, "/").await {
        Ok((200, body)) => body.trim().parse().ok(),
        _ => None,
    };
    Outcome { at: Instant::now(), endpoint }
}

/// Sends requests without pause until `stop` is set, `concurrency` at a time.
fn send_until(listener: SocketAddr, concurrency: usize, stop: Arc<AtomicBool>) -> tokio::task::JoinSet<Vec<Outcome>> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                out.push(one(listener).await);
            }
            out
        });
    }
    tasks
}

async fn collect(mut tasks: tokio::task::JoinSet<Vec<Outcome>>) -> Vec<Outcome> {
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        out.extend(r.unwrap_or_default());
    }
    out.sort_by_key(|o| o.at);
    out
}

/// The share of answered requests that Azure served.
fn azure_share(outcomes: &[Outcome], azure: &BTreeSet<SocketAddr>) -> f64 {
    let answered: Vec<_> = outcomes.iter().filter_map(|o| o.endpoint).collect();
    let to_azure = answered.iter().filter(|e| azure.contains(e)).count();
    to_azure as f64 / answered.len().max(1) as f64
}

fn describe(hosts: &[HostDetail]) -> String {
    hosts
        .iter()
        .map(|h| format!("{} p{} w{} {}", h.address, h.priority, h.weight, h.eds_health))
        .collect::<Vec<_>>()
        .join("; ")
}

// ---- the tests ----

/// Azure's API server stops answering for two minutes while its gateway answers: no priority of any of
/// the client's hosts changes, nothing fails, and the 80/20 split holds (2,000 requests during the outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_outage_with_gateways_up_moves_no_endpoint() {
    let mesh = Mesh::start(96).await.unwrap_or_else(|e| panic!("starting the mesh: {e:#}"));
    let before = mesh.wait_steady().await.unwrap_or_else(|e| panic!("steady state: {e:#}"));
    let azure = mesh.azure();

    mesh.api.stop().await;
    let stopped = Instant::now();
    // meshfed notices (its watches end, relists fail): /debug/clusterz says so
    poll_until(STEP_TIMEOUT, || async {
        let azure = mesh.cluster_status("azure-weu").await?;
        ensure!(azure["unreachableSince"].is_string(), "azure-weu not unreachable yet: {azure}");
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("meshfed sees the outage: {e:#}"));

    let mut outcomes = Vec::new();
    let mut checks = 0;
    while stopped.elapsed() < OUTAGE {
        let now = mesh.priorities().await.unwrap_or_else(|e| panic!("client's hosts: {e:#}"));
        assert_eq!(now, before, "a priority changed {:?} into the outage", stopped.elapsed());
        checks += 1;
        outcomes.extend(send(mesh.listener(), 80, 4).await);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let failed = outcomes.iter().filter(|o| o.endpoint.is_none()).count();
    assert_eq!(failed, 0, "{failed} of {} requests failed during the API outage", outcomes.len());
    let share = azure_share(&outcomes, &azure);
    eprintln!(
        "API outage of {OUTAGE:?}: {checks} checks of the priorities, {} requests, Azure share {share:.3}",
        outcomes.len()
    );
    assert!(outcomes.len() >= 2000, "only {} requests", outcomes.len());
    assert!((0.15..=0.25).contains(&share), "Azure got {share:.3} during the outage, expected 20% ± 5");

    // meshfed says why nothing moved: the API is unreachable, the gateways are up, the network not fenced
    let azure_weu = mesh.cluster_status("azure-weu").await.unwrap_or_else(|e| panic!("{e:#}"));
    assert!(azure_weu["unreachableSince"].is_string(), "{azure_weu}");
    assert_eq!(azure_weu["gateways"]["fenced"], false, "{azure_weu}");
    assert_eq!(azure_weu["gateways"]["addresses"][0]["state"], "up", "{azure_weu}");

    // the API answers again: still nothing moves
    mesh.api.restart().await.unwrap_or_else(|e| panic!("restarting the API: {e:#}"));
    poll_until(STEP_TIMEOUT, || async {
        let azure = mesh.cluster_status("azure-weu").await?;
        ensure!(azure["unreachableSince"].is_null(), "azure-weu still unreachable: {azure}");
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("meshfed sees the API back: {e:#}"));
    assert_eq!(mesh.priorities().await.unwrap_or_else(|e| panic!("{e:#}")), before);
    mesh.meshfed.assert_no_nacks().await.unwrap_or_else(|e| panic!("{e:#}"));
}

/// What one death of Azure's gateway looked like from the client.
#[derive(Debug)]
struct Death {
    /// when the gateway was killed
    killed: Instant,
    /// gateway killed -> the client's last connection attempt to it
    last_attempt: Duration,
    /// gateway killed -> the client holds it below every AWS host
    fenced: Duration,
    /// requests that failed (all of them before `window`)
    failed: usize,
    requests: usize,
}

/// Kills Azure's gateway while requests flow, and measures until the client stops sending there.
async fn gateway_death(mesh: &mut Mesh, window: Duration) -> Result<Death> {
    let stop = Arc::new(AtomicBool::new(false));
    let load = send_until(mesh.listener(), 4, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut attempts = mesh.attempts_to_gateway().await?;
    mesh.kill_gateway().await;
    let killed = Instant::now();
    let mut last_attempt = Duration::ZERO;
    let mut fenced = None;
    // Watch the client's counters and priorities until well after the window.
    while killed.elapsed() < window + SLACK {
        let now = mesh.attempts_to_gateway().await?;
        if now != attempts {
            attempts = now;
            last_attempt = killed.elapsed();
        }
        if fenced.is_none() {
            let (g, aws) = mesh.gateway_vs_aws().await?;
            if g > aws {
                fenced = Some(killed.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let outcomes = collect(load).await;
    let fenced = fenced.ok_or_else(|| anyhow!("the gateway was not fenced within {:?}", window + SLACK))?;
    let late: Vec<_> = outcomes.iter().filter(|o| o.endpoint.is_none() && o.at > killed + window).collect();
    ensure!(late.is_empty(), "{} requests failed after the window of {window:?}", late.len());
    let to_azure_late = outcomes
        .iter()
        .filter(|o| o.at > killed + window && o.endpoint.is_some_and(|e| mesh.azure().contains(&e)))
        .count();
    ensure!(to_azure_late == 0, "{to_azure_late} requests reached Azure after the window (its gateway is dead)");
    let failed = outcomes.iter().filter(|o| o.endpoint.is_none() && o.at > killed).count();
    Ok(Death { killed, last_attempt, fenced, failed, requests: outcomes.iter().filter(|o| o.at > killed).count() })
}

/// Brings Azure's gateway back and checks that traffic returns after the hold-down (counted from
/// meshfed's "down", which is after `killed`), once.
async fn gateway_return(mesh: &mut Mesh, killed: Instant) -> Result<Duration> {
    mesh.restart_gateway().await?;
    let restarted = Instant::now();
    let mut transitions = Vec::new();
    let mut last = mesh.gateway_vs_aws().await?;
    ensure!(last.0 > last.1, "the gateway is fenced when it comes back: {last:?}");
    let mut returned = None;
    // watch the priority until well after the return: it changes exactly once
    let bound = HOLD_DOWN + INTERVAL * 4 + PUSH + SLACK;
    while restarted.elapsed() < bound || returned.is_some_and(|r: Duration| restarted.elapsed() < r + INTERVAL * 5) {
        let now = mesh.gateway_vs_aws().await?;
        if now != last {
            transitions.push((restarted.elapsed(), now));
            if now.0 <= now.1 && returned.is_none() {
                returned = Some(restarted.elapsed());
                ensure!(
                    killed.elapsed() >= HOLD_DOWN,
                    "back {:?} after it went down, before the hold-down",
                    killed.elapsed()
                );
            }
            last = now;
        }
        if restarted.elapsed() > bound && returned.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let returned = returned.ok_or_else(|| anyhow!("no return within {bound:?}: {transitions:?}"))?;
    ensure!(transitions.len() == 1, "the gateway's priority changed {} times: {transitions:?}", transitions.len());
    Ok(returned)
}

/// Azure's gateway dies while its API answers: the client stops sending there within
/// failureThreshold x interval + one push, no request fails after that, and once the gateway is back the
/// traffic returns after the hold-down, once, with the 80/20 split.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_gateway_stops_traffic_there_within_the_probe_window_and_returns_once() {
    let mut mesh = Mesh::start(97).await.unwrap_or_else(|e| panic!("starting the mesh: {e:#}"));
    mesh.wait_steady().await.unwrap_or_else(|e| panic!("steady state: {e:#}"));

    // the window: failureThreshold rounds (+10% jitter) + a push, + Envoy applying it
    let window = (INTERVAL * FAILURE_THRESHOLD).mul_f64(1.1) + PUSH + SLACK;
    let death = gateway_death(&mut mesh, window).await.unwrap_or_else(|e| panic!("gateway death: {e:#}"));
    eprintln!(
        "gateway death: last attempt after {:?}, fenced in the client after {:?}; {} of {} requests failed (all within {window:?})",
        death.last_attempt, death.fenced, death.failed, death.requests
    );
    assert!(death.fenced <= window, "fenced after {:?}, window {window:?}", death.fenced);
    assert!(death.last_attempt <= window, "the client tried the dead gateway {:?} after it died", death.last_attempt);
    let hosts = mesh.client.cluster_host_details(CLUSTER).await.unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("fenced: {}", describe(&hosts));
    // meshfed's evidence
    let azure_weu = mesh.cluster_status("azure-weu").await.unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(azure_weu["gateways"]["fenced"], true, "{azure_weu}");
    assert!(azure_weu["unreachableSince"].is_null(), "Azure's API answers: {azure_weu}");
    let returned = gateway_return(&mut mesh, death.killed).await.unwrap_or_else(|e| panic!("gateway return: {e:#}"));
    eprintln!("traffic returned {returned:?} after the gateway came back");
    let steady = mesh.wait_steady().await.unwrap_or_else(|e| panic!("steady again: {e:#}"));
    assert!(steady.iter().all(|(_, p)| *p == 0));
    let outcomes = send(mesh.listener(), 1000, 8).await;
    assert!(outcomes.iter().all(|o| o.endpoint.is_some()), "failed requests after the return");
    let share = azure_share(&outcomes, &mesh.azure());
    assert!((0.15..=0.25).contains(&share), "Azure got {share:.3} after the return, expected 20% ± 5");
    mesh.meshfed.assert_no_nacks().await.unwrap_or_else(|e| panic!("{e:#}"));
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// BENCHMARKS.md "Gateway death": repeats the gateway's death `MESHFED_LIVENESS_RUNS` times (default 10)
/// and prints p50/p99 of the time until the client's last attempt there and until it held the gateway
/// below AWS.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a benchmark: MESHFED_LIVENESS_RUNS=N cargo test --release --test dataplane_liveness -- --ignored"]
async fn gateway_death_timing() {
    let runs: usize = std::env::var("MESHFED_LIVENESS_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let mut mesh = Mesh::start(98).await.unwrap_or_else(|e| panic!("starting the mesh: {e:#}"));
    mesh.wait_steady().await.unwrap_or_else(|e| panic!("steady state: {e:#}"));
    let window = (INTERVAL * FAILURE_THRESHOLD).mul_f64(1.1) + PUSH + SLACK;
    let (mut last, mut fenced, mut failed, mut requests) = (Vec::new(), Vec::new(), 0, 0);
    for run in 0..runs {
        let d = gateway_death(&mut mesh, window).await.unwrap_or_else(|e| panic!("run {run}: {e:#}"));
        eprintln!("run {run}: {d:?}");
        last.push(d.last_attempt);
        fenced.push(d.fenced);
        failed += d.failed;
        requests += d.requests;
        gateway_return(&mut mesh, d.killed).await.unwrap_or_else(|e| panic!("run {run}: {e:#}"));
        mesh.wait_steady().await.unwrap_or_else(|e| panic!("run {run}: {e:#}"));
    }
    last.sort();
    fenced.sort();
    let line = serde_json::json!({
        "bench": "gateway-death",
        "runs": runs,
        "last_attempt_ms": {"p50": percentile(&last, 0.5).as_millis(), "p99": percentile(&last, 0.99).as_millis(), "max": last.last().map(|d| d.as_millis())},
        "fenced_ms": {"p50": percentile(&fenced, 0.5).as_millis(), "p99": percentile(&fenced, 0.99).as_millis()},
        "failed_requests": failed,
        "requests": requests,
    });
    println!("{line}");
}
