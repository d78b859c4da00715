//! Traffic control ([`meshfed::traffic`]) with real Envoys across two clouds on loopback: an active-active
//! split of ratings:9080 70/30 between aws-use1 and azure-weu measured over 2,000 requests, a drain of
//! azure-weu (capacity 50), a drain with a 25-point ramp measured at each step (Azure 22.5%, 15%, 7.5%,
//! then 0% when the push loop's timer takes the last step) and its undrain back to 70/30,
//! `/debug/whatif`'s prediction against what Envoy really sent (in every state), failover of a cluster
//! whose healthy endpoints fall below `minHealthy` in one push and its failback only after
//! `failbackAfter`, and a drain that reverts by itself at its expiry.
//!
//! Each measured state of the split, the drain and the ramp is waited for the same way before a
//! request is sent: meshfed pushed a snapshot with the state's decision, the client ACKed EDS of that
//! generation (as a drill's report counts the ACK of a step), and the client's config dump holds
//! locality weights giving Azure the state's share. Requests are counted only then, so a share measured
//! is the share of that state, not a mix with the one before; after the count the decision must still
//! be the state's.
//!
//! Topology as in `tests/cross_cloud.rs` (see there), with meshfed in process (the traffic policy is
//! handed to the push loop as the mesh config's live reload will hand it: `PushHandle::set_traffic_policy`):
//! a client sidecar in us-east-1a (aws-net); AWS backends 127.o.{1,2}.{31,32}:9080 (plain HTTP); Azure
//! reached through its east-west gateway 127.o.20.1:15443 over mTLS, two Azure sidecars 127.o.{3,4}.31
//! in front of their apps. Every backend answers with the endpoint address it stands for. Beside the
//! client, an ingress gateway (a `router` in Istio's standard mode, us-east-1b, with mesh certificates)
//! serves the same requests in the split, the 50% drain and the drain to 0: it gets the same decisions
//! for us-east-1, through its own EDS, and `/debug/whatif` for it predicts what it sent.
//!
//! Needs Envoy (see `support::envoy_path`); a missing Envoy fails the test.

use meshfed_testkit as support;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use meshfed::app::{DebugListener, Listen, Options, XdsListener};
use meshfed::mesh_config::MeshConfig;
use meshfed::model::ClusterId;
use meshfed::source::SourceEvent;
use meshfed::topology::TopologyObject;
use meshfed::traffic::TrafficPolicy;
use meshfed::traffic::decide::time_str;
use support::eds_shares::{envoy_region_weights, percent};
use support::server::TestServer;
use support::{Backend, BootstrapSpec, Envoy, TestCa, addr4, bootstrap_with, http_get, ip4, poll_until, start_envoy};

const PORT: u16 = 9080;
const RATINGS: &str = "ratings.shop.svc.cluster.local";
const OCTET: u8 = 93;
/// ratings' first endpoint in each zone (the second is +1)
const HOST: u8 = 31;
const AZURE_PODS: [&str; 2] = ["ratings-v1-4c7d5-a1", "ratings-v1-4c7d5-b1"];
const APP_OFFSET: u8 = 100;
const TOTAL: usize = 2000;
/// points the measured share may differ from the expected one
const TOLERANCE: f64 = 5.0;
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// `failbackAfter` of the policy: long enough to see the share stay away, short enough for a test
const FAILBACK: Duration = Duration::from_secs(8);
/// the ramp's `every`: no step falls due by itself while the test measures one (the test moves the
/// ramp by its `start`, see [`ramp`])
const RAMP_EVERY: Duration = Duration::from_secs(3600);
/// the last step of the ramp is taken by the push loop's timer this long after the policy arrives
const TIMER_LEAD: Duration = Duration::from_secs(2);
/// points the client's EDS locality weights may differ from the decided share (weights are rounded)
const WEIGHT_TOLERANCE: f64 = 1.0;

/// A `traffic:` section: ratings from us-east-1 70/30, failover below 50% healthy (failback after
/// [`FAILBACK`]), and `drains` (YAML list items, or empty).
fn policy(drains: &str) -> Result<TrafficPolicy> {
    let yaml = format!(
        "policies:\n  - hosts: [{RATINGS}]\n    split:\n      us-east-1: {{aws-use1: 70, azure-weu: 30}}\n      westeurope: {{azure-weu: 70, aws-use1: 30}}\n    failover: {{minHealthy: 50, failbackAfter: {}s}}\ndrains: [{drains}]\n",
        FAILBACK.as_secs()
    );
    let ids = [ClusterId::new("aws-use1"), ClusterId::new("azure-weu")];
    Ok(TrafficPolicy::parse(&serde_yaml::from_str(&yaml)?, &ids, SystemTime::now())?)
}

fn expires() -> String {
    time_str(SystemTime::now() + Duration::from_secs(3600))
}

/// A drain of azure-weu to 0 in 25-point steps every [`RAMP_EVERY`] from `start`: at `start + k *
/// RAMP_EVERY` (k = 0..3) its capacity becomes 75, 50, 25, 0% (see `Drain::capacity_at`).
fn ramp(start: SystemTime) -> String {
    format!(
        "{{cluster: azure-weu, capacity: 0, ramp: {{step: 25, every: {}s}}, start: '{}', expires: '{}', reason: ramp}}",
        RAMP_EVERY.as_secs(),
        time_str(start),
        expires()
    )
}

/// The start that puts [`ramp`] half-way through step `k` now (0: capacity 75%, 3: 0%): a step is
/// an hour long, so none falls due by itself while the test measures it.
fn ramp_at_step(k: u32) -> SystemTime {
    SystemTime::now() - RAMP_EVERY * k - RAMP_EVERY / 2
}

/// Who sends the requests measured: the client sidecar, or the ingress gateway beside it (a `router`
/// in standard mode, on aws-net in us-east-1b: it reaches Azure through Azure's east-west gateway).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Client,
    Ingress,
}

impl Via {
    /// the proxy key (`POD.NS`)
    fn key(self) -> &'static str {
        match self {
            Via::Client => "client-0.shop",
            Via::Ingress => "istio-ingressgateway-0.istio-system",
        }
    }

    /// its outbound listener for ratings' port
    fn listener(self) -> SocketAddr {
        match self {
            Via::Client => addr4(OCTET, 50, 1, PORT),
            Via::Ingress => addr4(OCTET, 60, 1, PORT),
        }
    }
}

struct Mesh {
    client: Envoy,
    ingress: Envoy,
    _azure: Vec<(Envoy, Backend)>,
    _gateway: Envoy,
    _aws: Vec<Backend>,
    server: TestServer,
    mesh: MeshConfig,
    _dir: tempfile::TempDir,
}

impl Mesh {
    async fn start() -> Result<Mesh> {
        support::envoy_path();
        let dir = tempfile::Builder::new().prefix("meshfed-traffic-").tempdir()?;
        let mesh_path = support::server::copy_demo(dir.path(), OCTET);
        support::demo::plain_aws_one_azure_endpoint_per_zone(dir.path())?;
        // the policy from the mesh config, as `meshfed serve` reads it
        let text = std::fs::read_to_string(&mesh_path)?;
        let section = format!(
            "traffic:\n  policies:\n    - hosts: [{RATINGS}]\n      split:\n        us-east-1: {{aws-use1: 70, azure-weu: 30}}\n        westeurope: {{azure-weu: 70, aws-use1: 30}}\n      failover: {{minHealthy: 50, failbackAfter: {}s}}\n",
            FAILBACK.as_secs()
        );
        std::fs::write(&mesh_path, format!("{text}\n{section}"))?;
        let mesh = MeshConfig::load(&mesh_path)?;
        ensure!(mesh.traffic == policy("")?, "the mesh config's traffic: section");
        let mut options = Options::in_process(mesh.clone(), support::server::files_events(&mesh));
        options.xds.push(XdsListener::loopback_unlimited());
        options.debug = Some(DebugListener { listen: Listen::loopback(), access: Default::default(), demo: false });
        let server = TestServer::with_options(options).await;
        let xds = server.xds_addr.port();

        let ca = TestCa::new(&dir.path().join("certs"))?;
        let spiffe = |sa: &str| format!("spiffe://cluster.local/ns/shop/sa/{sa}");
        let client_id = ca.issue("client", &spiffe("client"))?;
        let ingress_id =
            ca.issue("ingress", "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account")?;
        let workload_id = ca.issue("ratings", &spiffe("ratings"))?;
        let gateway_ip = ip4(OCTET, 20, 1);
        let mut specs = vec![
            BootstrapSpec::azure_east_west_gateway(gateway_ip, xds),
            BootstrapSpec {
                cluster_id: Some("aws-use1".into()),
                network: Some("aws-net".into()),
                locality: Some("us-east-1/us-east-1a".into()),
                tls: Some(client_id),
                ..BootstrapSpec::new(
                    &format!("sidecar~{}~client-0.shop~shop.svc.cluster.local", ip4(OCTET, 50, 1)),
                    xds,
                )
            },
            BootstrapSpec {
                cluster_id: Some("aws-use1".into()),
                network: Some("aws-net".into()),
                locality: Some("us-east-1/us-east-1b".into()),
                router_mode: Some("standard"),
                tls: Some(ingress_id),
                ..BootstrapSpec::new(
                    &format!(
                        "router~{}~{}~istio-system.svc.cluster.local",
                        Via::Ingress.listener().ip(),
                        Via::Ingress.key()
                    ),
                    xds,
                )
            },
        ];
        let mut apps = Vec::new();
        for (zone, pod) in [3u8, 4].into_iter().zip(AZURE_PODS) {
            let endpoint = addr4(OCTET, zone, HOST, PORT);
            let app_ip = ip4(OCTET, APP_OFFSET + zone, HOST);
            apps.push(Backend::start_with_reply(SocketAddr::new(app_ip, PORT), &endpoint.to_string()).await?);
            specs.push(BootstrapSpec {
                cluster_id: Some("azure-weu".into()),
                network: Some("azure-net".into()),
                locality: Some(format!("westeurope/westeurope-{}", zone - 2)),
                tls: Some(workload_id.clone()),
                inbound_address: Some(app_ip),
                ..BootstrapSpec::new(&format!("sidecar~{}~{pod}.shop~shop.svc.cluster.local", endpoint.ip()), xds)
            });
        }
        let yamls: Vec<String> = specs.iter().map(bootstrap_with).collect();
        let mut envoys = futures::future::try_join_all(yamls.iter().map(|y| start_envoy(y))).await?.into_iter();
        let (gateway, client) = (envoys.next().expect("gateway"), envoys.next().expect("client"));
        let ingress = envoys.next().expect("ingress");
        let azure = envoys.zip(apps).collect();
        let aws = support::start_backends(aws_endpoints()).await?;
        Ok(Mesh { client, ingress, _azure: azure, _gateway: gateway, _aws: aws, server, mesh, _dir: dir })
    }

    fn listener(&self) -> SocketAddr {
        Via::Client.listener()
    }

    fn envoy(&self, via: Via) -> &Envoy {
        match via {
            Via::Client => &self.client,
            Via::Ingress => &self.ingress,
        }
    }

    /// Hands `policy` to the push loop and waits for the push it causes.
    async fn set_policy(&self, policy: TrafficPolicy) -> Result<()> {
        let before = self.server.push.snapshot().generation;
        self.server.push.set_traffic_policy(policy);
        let mut rx = self.server.push.subscribe();
        tokio::time::timeout(STEP_TIMEOUT, rx.wait_for(|s| s.generation > before)).await??;
        Ok(())
    }

    /// Waits until the proxy `via` holds the EDS that gives Azure `want`% of ratings: a snapshot
    /// with that decision for us-east-1 was pushed, the client ACKed EDS of that generation (meshfed's
    /// view, as a drill's report counts the ACK of a step: `ProxyAcks::has`), and the client's config dump
    /// has locality weights giving westeurope `want`% (± [`WEIGHT_TOLERANCE`]). Returns the snapshot's
    /// generation.
    async fn holds(&self, via: Via, want: f64) -> Result<u64> {
        let mut rx = self.server.push.subscribe();
        let generation = tokio::time::timeout(STEP_TIMEOUT, rx.wait_for(|s| decides(s, want)))
            .await
            .with_context(|| format!("no push decides {want}% for azure-weu in {STEP_TIMEOUT:?}"))??
            .generation;
        poll_until(STEP_TIMEOUT, || async {
            let c = self.server.connections.find_proxy(via.key()).with_context(|| format!("{via:?} not connected"))?;
            // as a drill's report counts a proxy's ACK of a step
            let acks = c.eds_acks();
            ensure!(
                acks.has(generation, SystemTime::now()).is_some(),
                "{via:?} has not ACKed EDS of generation {generation}: {acks:?}"
            );
            Ok(())
        })
        .await?;
        let cluster = format!("outbound|{PORT}||{RATINGS}");
        poll_until(STEP_TIMEOUT, || async {
            let weights = envoy_region_weights(self.envoy(via), &cluster).await?;
            let azure = percent(&weights, "westeurope");
            ensure!((azure - want).abs() <= WEIGHT_TOLERANCE, "{via:?}'s EDS gives Azure {azure:.2}% ({weights:?})");
            Ok(())
        })
        .await?;
        Ok(generation)
    }

    /// One state, through the client sidecar: [`Self::expect_share_via`].
    async fn expect_share(&self, name: &str, want: f64) -> Result<f64> {
        self.expect_share_via(Via::Client, name, want).await
    }

    /// One state: waits until the proxy `via` holds its EDS ([`Self::holds`]), measures Azure's share
    /// over [`TOTAL`] requests ([`measure`]: within ± [`TOLERANCE`] of `want`; exactly 0 when `want` is
    /// 0), and checks that `/debug/whatif` predicted the measured share (± [`TOLERANCE`]). Returns the
    /// measured share.
    async fn expect_share_via(&self, via: Via, name: &str, want: f64) -> Result<f64> {
        let generation = self.holds(via, want).await.with_context(|| format!("{name}: {via:?}'s EDS"))?;
        let measured = measure(via.listener(), want).await.with_context(|| format!("{name}: the measured share"))?;
        // the state did not change while it was measured (a ramp step falling due, say)
        let now = self.server.push.snapshot();
        ensure!(decides(&now, want), "{name}: the decision changed while measuring (generation {})", now.generation);
        ensure!(want > 0.0 || measured == 0.0, "{name}: drained, yet Azure got {measured:.2}% of {TOTAL} requests");
        let w = self.whatif_of(via, "").await?;
        let predicted = whatif_azure(&w, "now")?;
        eprintln!(
            "{name}: Azure via {via:?}: want {want}%, measured {measured:.1}%, whatif {predicted}% (generation {generation})"
        );
        ensure!(
            (predicted - measured).abs() <= TOLERANCE,
            "{name}: whatif {predicted}% vs measured {measured:.1}%: {w:#}"
        );
        Ok(measured)
    }

    /// `/debug/whatif` for the client sidecar.
    async fn whatif(&self, query: &str) -> Result<serde_json::Value> {
        self.whatif_of(Via::Client, query).await
    }

    /// `/debug/whatif` for the proxy `via`.
    async fn whatif_of(&self, via: Via, query: &str) -> Result<serde_json::Value> {
        let debug = self.server.app.debug_address().context("debug server")?;
        let path = format!("/debug/whatif?proxyID={}&host={RATINGS}{query}", via.key());
        let (status, body) = http_get(debug, "127.0.0.1", &path).await?;
        ensure!(status == 200, "{path}: {status}: {body}");
        Ok(serde_json::from_str(&body)?)
    }
}

/// Whether `snapshot` decides `want`% of ratings for azure-weu from us-east-1 (the client's region).
fn decides(snapshot: &meshfed::cache::Snapshot, want: f64) -> bool {
    let azure = ClusterId::new("azure-weu");
    snapshot
        .context
        .traffic
        .shares(RATINGS, "us-east-1")
        .and_then(|shares| shares.get(&azure))
        .is_some_and(|share| (share.share - want).abs() < 0.01)
}

fn aws_endpoints() -> BTreeSet<SocketAddr> {
    [1u8, 2].into_iter().flat_map(|z| [HOST, HOST + 1].map(|h| addr4(OCTET, z, h, PORT))).collect()
}

fn azure_endpoints() -> BTreeSet<SocketAddr> {
    [3u8, 4].into_iter().map(|z| addr4(OCTET, z, HOST, PORT)).collect()
}

/// Sends `n` requests, `concurrency` at a time; returns the endpoints that answered.
async fn send(listener: SocketAddr, n: usize, concurrency: usize) -> Result<Vec<SocketAddr>> {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let count = n / concurrency + usize::from(w < n % concurrency);
        tasks.spawn(async move {
            let mut out = Vec::with_capacity(count);
            for i in 0..count {
                let (status, body) = http_get(listener, RATINGS, "/").await?;
                if status != 200 {
                    bail!("request {i}: status {status}: {body}");
                }
                out.push(body.trim().parse::<SocketAddr>().with_context(|| format!("body {body:?}"))?);
            }
            Ok::<_, anyhow::Error>(out)
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        out.extend(r??);
    }
    Ok(out)
}

/// The percentage of `seen` answered by Azure (fails on an endpoint of neither cloud).
fn azure_share(seen: &[SocketAddr]) -> Result<f64> {
    let (aws, azure) = (aws_endpoints(), azure_endpoints());
    let to_azure = seen.iter().filter(|b| azure.contains(b)).count();
    let stray: Vec<_> = seen.iter().filter(|b| !azure.contains(b) && !aws.contains(b)).collect();
    ensure!(stray.is_empty(), "answered outside the mesh: {stray:?}");
    Ok(100.0 * to_azure as f64 / seen.len().max(1) as f64)
}

/// Waits until Envoy's share for Azure (over probes of 200 requests) is within the tolerance of `want`,
/// then measures it over [`TOTAL`] requests sent to `listener`; returns the measured share.
async fn measure(listener: SocketAddr, want: f64) -> Result<f64> {
    poll_until(STEP_TIMEOUT, || async {
        let share = azure_share(&send(listener, 200, 8).await?)?;
        // (a loose check: 200 requests only tell whether the new weights arrived)
        ensure!((share - want).abs() <= 2.0 * TOLERANCE, "Azure got {share:.1}%, waiting for {want}%");
        Ok(())
    })
    .await?;
    let share = azure_share(&send(listener, TOTAL, 8).await?)?;
    ensure!(
        (share - want).abs() <= TOLERANCE,
        "Azure got {share:.1}% of {TOTAL} requests, expected {want}% ± {TOLERANCE}"
    );
    Ok(share)
}

fn whatif_azure(w: &serde_json::Value, key: &str) -> Result<f64> {
    w[key]["byCluster"]["azure-weu"].as_f64().ok_or_else(|| anyhow!("no {key}.byCluster.azure-weu in {w}"))
}

fn step<T>(name: &'static str) -> impl FnOnce(anyhow::Error) -> T {
    move |e| panic!("step {name:?}: {e:#}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_drain_whatif_and_failover_with_real_envoys() {
    let mesh = Mesh::start().await.unwrap_or_else(step("starting the mesh"));

    // (1) the split from the mesh config: 70/30, as whatif predicts; Envoy weighs localities
    let measured = mesh.expect_share("(1) split 70/30", 30.0).await.unwrap_or_else(step("(1) split 70/30"));
    let clusters = mesh.client.admin_get("/config_dump?resource=dynamic_active_clusters").await.unwrap();
    let ratings = clusters.split("\"name\": \"outbound|9080||ratings").nth(1).expect("the client's ratings cluster");
    let ratings = ratings.split("\"name\": \"outbound|").next().unwrap_or(ratings);
    assert!(ratings.contains("locality_weighted_lb_config"), "(1) no locality_weighted_lb_config: {ratings}");
    let w = mesh.whatif("&drain=azure-weu").await.unwrap_or_else(step("(1) whatif"));
    let predicted = whatif_azure(&w, "now").unwrap_or_else(step("(1) whatif now"));
    assert!((predicted - measured).abs() <= TOLERANCE, "(1) whatif {predicted}% vs measured {measured:.1}%: {w:#}");
    assert_eq!(whatif_azure(&w, "whatIf").unwrap(), 0.0, "(1) drained to 0: {w:#}");
    assert!(w["now"]["decision"]["aws-use1"]["reason"].as_str().unwrap_or("").contains("split 70%"), "{w:#}");
    // the ingress gateway in us-east-1: the same split, reaching Azure through its east-west gateway
    mesh.expect_share_via(Via::Ingress, "(1) split 70/30 via the ingress gateway", 30.0)
        .await
        .unwrap_or_else(step("(1) ingress"));

    // (2) azure-weu drained to 50%: 15%, as whatif predicts
    let drain = format!("{{cluster: azure-weu, capacity: 50, expires: '{}', reason: DR drill}}", expires());
    mesh.set_policy(policy(&drain).unwrap()).await.unwrap_or_else(step("(2) policy"));
    mesh.expect_share("(2) drain 50", 15.0).await.unwrap_or_else(step("(2) drain 50"));
    mesh.expect_share_via(Via::Ingress, "(2) drain 50 via the ingress gateway", 15.0)
        .await
        .unwrap_or_else(step("(2) ingress"));
    let w = mesh.whatif("").await.unwrap_or_else(step("(2) whatif"));
    assert!(w["now"]["decision"]["azure-weu"]["reason"].as_str().unwrap_or("").contains("DR drill"), "{w:#}");
    // /debug/explain says why each locality has its share
    let debug = mesh.server.app.debug_address().unwrap();
    let (status, body) = http_get(debug, "127.0.0.1", "/debug/explain?proxyID=client-0.shop").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let explain: serde_json::Value = serde_json::from_str(&body).unwrap();
    let cluster = explain["clusters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == format!("outbound|{PORT}||{RATINGS}")))
        .unwrap_or_else(|| panic!("(2) no ratings cluster in {explain:#}"));
    let localities = cluster["localities"].as_array().unwrap();
    assert!(localities.iter().all(|l| l["rule"] == "traffic_split"), "(2) {cluster:#}");
    assert!(localities.iter().any(|l| l["reason"].as_str().unwrap_or("").contains("DR drill")), "(2) {cluster:#}");

    // (3) a drain with a 25-point ramp: azure-weu's 30% at 75, 50, 25% of it, each step measured and
    // compared with whatif. The ramp's `every` is an hour and the test moves it by its `start` (the
    // step is known when the policy is handed over and none falls due while it is measured); the last
    // step, to 0, is left to the push loop's timer: due TIMER_LEAD after the policy arrives
    for (k, want) in [(0u32, 22.5), (1, 15.0), (2, 7.5)] {
        let name = format!("(3) ramp step {k}, capacity {}%", 75 - 25 * k);
        let policy = policy(&ramp(ramp_at_step(k))).unwrap();
        mesh.set_policy(policy).await.unwrap_or_else(|e| panic!("{name}: policy: {e:#}"));
        mesh.expect_share(&name, want).await.unwrap_or_else(|e| panic!("{e:#}"));
    }
    let due = SystemTime::now() + TIMER_LEAD;
    mesh.set_policy(policy(&ramp(due - RAMP_EVERY * 3)).unwrap()).await.unwrap_or_else(step("(3) last step's policy"));
    let snapshot = mesh.server.push.snapshot();
    if SystemTime::now() < due {
        assert!(decides(&snapshot, 7.5), "(3) still at capacity 25% until the last step is due");
    }
    let mut rx = mesh.server.push.subscribe();
    tokio::time::timeout(STEP_TIMEOUT, rx.wait_for(|s| decides(s, 0.0))).await.unwrap().unwrap();
    assert!(SystemTime::now() >= due, "(3) the ramp reached 0 before its last step was due");
    mesh.expect_share_via(Via::Ingress, "(3) drained to 0 via the ingress gateway", 0.0)
        .await
        .unwrap_or_else(step("(3) ingress"));
    mesh.expect_share("(3) ramp step 3 (the timer's), capacity 0%", 0.0).await.unwrap_or_else(step("(3) ramp to 0"));

    // (3b) undrain: 70/30 again
    mesh.set_policy(policy("").unwrap()).await.unwrap_or_else(step("(3b) policy"));
    mesh.expect_share("(3b) undrained", 30.0).await.unwrap_or_else(step("(3b) undrain"));
    // the steps above reached the real Envoys (at least in part) as EDS responses worked out once for
    // every stream alike and written from one shared encoding (this binary runs this one test)
    let metrics = meshfed::metrics::global().encode().unwrap();
    let shared = metrics.lines().find(|l| l.starts_with("meshfed_xds_shared_responses_total{type=\"eds\"}"));
    let shared: u64 = shared.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(shared > 0, "(3b) no shared EDS response was sent");

    // (4) 3 of aws-use1's 4 ratings endpoints not ready (25% < minHealthy 50%): in the push that brings
    // it, aws-use1's share goes to azure-weu
    let mut objects = support::server::files_events(&mesh.mesh)
        .into_iter()
        .find_map(|e| match e {
            SourceEvent::Sync { cluster, objects } if cluster.as_str() == "aws-use1" => Some(objects),
            _ => None,
        })
        .expect("aws-use1's objects");
    let keep: IpAddr = ip4(OCTET, 1, HOST);
    let mut marked = 0;
    for o in &mut objects {
        if let TopologyObject::EndpointSlice(s) = o
            && &*s.service == "ratings"
        {
            for ep in &mut s.endpoints {
                if ep.addresses[0] != keep {
                    ep.ready = Some(false);
                    marked += 1;
                }
            }
        }
    }
    assert_eq!(marked, 3);
    let before = mesh.server.push.snapshot().generation;
    mesh.server.events.send(SourceEvent::Sync { cluster: ClusterId::new("aws-use1"), objects }).unwrap();
    let mut rx = mesh.server.push.subscribe();
    let pushed =
        tokio::time::timeout(STEP_TIMEOUT, rx.wait_for(|s| s.generation > before)).await.unwrap().unwrap().clone();
    let shares = pushed.context.traffic.shares(RATINGS, "us-east-1").expect("a decision").clone();
    assert_eq!(shares[&ClusterId::new("aws-use1")].share, 0.0, "in one push: {shares:?}");
    assert!(shares[&ClusterId::new("aws-use1")].reason.contains("below minHealthy"), "{shares:?}");
    let measured = measure(mesh.listener(), 100.0).await.unwrap_or_else(step("(4) failover"));
    let predicted = whatif_azure(&mesh.whatif("").await.unwrap(), "now").unwrap();
    assert!((predicted - measured).abs() <= TOLERANCE, "(4) whatif {predicted}% vs measured {measured:.1}%");

    // (5) aws-use1's endpoints ready again: its share stays with azure-weu until failbackAfter has passed
    // (no flapping back at the first good push), then returns, once
    let healthy = support::server::files_events(&mesh.mesh)
        .into_iter()
        .find_map(|e| match e {
            SourceEvent::Sync { cluster, objects } if cluster.as_str() == "aws-use1" => Some(objects),
            _ => None,
        })
        .expect("aws-use1's objects");
    let before = mesh.server.push.snapshot().generation;
    mesh.server.events.send(SourceEvent::Sync { cluster: ClusterId::new("aws-use1"), objects: healthy }).unwrap();
    let back_at = std::time::Instant::now();
    let pushed =
        tokio::time::timeout(STEP_TIMEOUT, rx.wait_for(|s| s.generation > before)).await.unwrap().unwrap().clone();
    let shares = pushed.context.traffic.shares(RATINGS, "us-east-1").expect("a decision").clone();
    let aws = &shares[&ClusterId::new("aws-use1")];
    assert_eq!(aws.share, 0.0, "(5) no failback before failbackAfter: {shares:?}");
    assert!(aws.reason.contains("returns after failbackAfter"), "(5) {shares:?}");
    // while failbackAfter runs, Envoy still sends everything to Azure
    let share = azure_share(&send(mesh.listener(), 200, 8).await.unwrap()).unwrap();
    if back_at.elapsed() < FAILBACK {
        assert_eq!(share, 100.0, "(5) Azure got {share}% before failbackAfter");
    }
    let measured = measure(mesh.listener(), 30.0).await.unwrap_or_else(step("(5) failback"));
    assert!(back_at.elapsed() >= FAILBACK, "(5) back to 70/30 after {:?}, before failbackAfter", back_at.elapsed());
    let predicted = whatif_azure(&mesh.whatif("").await.unwrap(), "now").unwrap();
    assert!((predicted - measured).abs() <= TOLERANCE, "(5) whatif {predicted}% vs measured {measured:.1}%");

    // (6) a drain that expires reverts by itself: azure-weu at 0 until the expiry, then 30% again
    let expiry = SystemTime::now() + Duration::from_secs(6);
    let expiring =
        format!("{{cluster: azure-weu, capacity: 0, expires: '{}', reason: short maintenance}}", time_str(expiry));
    mesh.set_policy(policy(&expiring).unwrap()).await.unwrap_or_else(step("(6) policy"));
    // Envoy applies the drain (the push is out when set_policy returns; Envoy takes a moment more)
    poll_until(Duration::from_secs(4), || async {
        let share = azure_share(&send(mesh.listener(), 100, 4).await?)?;
        ensure!(share == 0.0, "Azure still gets {share:.1}%");
        Ok(())
    })
    .await
    .unwrap_or_else(step("(6) drained to 0"));
    assert!(SystemTime::now() < expiry, "(6) the drain took effect only after its expiry");
    let predicted = whatif_azure(&mesh.whatif("").await.unwrap(), "now").unwrap();
    assert!(SystemTime::now() >= expiry || predicted == 0.0, "(6) whatif while drained: {predicted}%");
    let measured = measure(mesh.listener(), 30.0).await.unwrap_or_else(step("(6) expiry reverts the drain"));
    assert!(SystemTime::now() >= expiry, "(6) back before the drain expired");
    let predicted = whatif_azure(&mesh.whatif("").await.unwrap(), "now").unwrap();
    assert!((predicted - measured).abs() <= TOLERANCE, "(6) whatif {predicted}% vs measured {measured:.1}%");

    for (what, e) in [("client", &mesh.client)] {
        e.assert_no_rejected_updates().await.unwrap_or_else(|e| panic!("{what}: {e:#}"));
    }
}
