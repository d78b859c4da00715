//! Cross-cloud traffic end to end, with real Envoys on two networks and certificates from a test CA:
//! locality failover from AWS to Azure through Azure's east-west gateway over mTLS (by EndpointSlice
//! readiness, and by outlier detection when the AWS backends die with no EndpointSlice change), recovery,
//! and `distribute` 80/20 across the clouds.
//!
//! Topology (everything on loopback, `127.<octet>.0.0/16`, see `meshfed_testkit::server::copy_demo`, which
//! keeps the demo's two networks, aws-net and azure-net):
//!
//! ```text
//!  test ──HTTP──▶ client sidecar (aws-net, us-east-1a, 127.o.50.1, mTLS identity sa/client)
//!                   │ plaintext (the AWS pods' tlsMode label is removed)      │ mTLS, SNI outbound_.9080_._.FQDN
//!                   ▼                                                         ▼
//!          AWS backends 127.o.{1,2}.x:9080               east-west gateway (router, azure-net, 127.o.20.1:15443)
//!          (us-east-1a / us-east-1b)                                          │ TLS passed through by SNI
//!                                                                             ▼
//!                                       Azure sidecar 127.o.{3,4}.x:9080 (inbound mTLS, identity sa/<service>)
//!                                                                             │ plaintext
//!                                                                             ▼
//!                                       Azure app 127.o.{103,104}.x:9080, answering "127.o.{3,4}.x:9080"
//! ```
//!
//! Every backend answers with the address of the endpoint it stands for, so each response tells which
//! endpoint Envoy picked. The copied demo is adjusted by the test: the AWS pods lose
//! `security.istio.io/tlsMode` (the AWS backends are plain HTTP servers, so the client must talk
//! plaintext to them), the second Azure endpoint of each zone (`.22`, `.32`) is removed (fewer Envoys),
//! and the `reviews` DestinationRule's `baseEjectionTime` is cut from 30s to 3s so that recovery after
//! an ejection fits in a bounded test.
//!
//! The client sidecar's EDS must hold, for the Azure localities, only the gateway's address: that is how
//! the test knows Azure is reached through the gateway (split horizon), and the gateway's and the Azure
//! sidecars' stats prove the path (the gateway's SNI-named cluster, TLS handshakes on the sidecars'
//! inbound listeners).
//!
//! Needs Envoy (see `support::envoy_path`); a missing Envoy fails the tests.

use meshfed_testkit as support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use support::slices::SliceDocs;
use support::{
    Backend, BootstrapSpec, Envoy, HostDetail, MeshIdentity, Meshfed, TestCa, addr4, bootstrap_with, http_get, ip4,
    poll_until, start_envoy, start_meshfed,
};

/// The HTTP port of reviews and ratings.
const PORT: u16 = 9080;
const REVIEWS: &str = "reviews.shop.svc.cluster.local";
const RATINGS: &str = "ratings.shop.svc.cluster.local";
/// The east-west gateways' port.
const GATEWAY_PORT: u16 = 15443;
/// Cap of each step (file watcher + debounce + push + Envoy applying EDS; or outlier ejection).
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// Cap of the recovery step: the ejections of the dead hosts must expire first (baseEjectionTime 3s
/// times the number of times each host was ejected, checked every interval of 1s).
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(40);
/// Requests of a probe while waiting for a step to take effect: enough that a priority level still
/// partly unavailable (e.g. 70/30 between two levels) is never mistaken for the final state. (Envoy
/// applies host health changes, such as the end of an ejection, to its load balancers in batches of up
/// to `update_merge_window`, 1s by default, after the admin API already shows them.)
const PROBE_REQUESTS: usize = 24;
/// Requests checked once a step has taken effect.
const REQUESTS: usize = 40;

/// The demo's zones, by the third octet of their addresses.
const US_EAST_1A: u8 = 1;
const US_EAST_1B: u8 = 2;
const WESTEUROPE_1: u8 = 3;
const WESTEUROPE_2: u8 = 4;
/// The Azure east-west gateway's load balancer address is `127.<octet>.20.1`.
const AZURE_GATEWAY: (u8, u8) = (20, 1);
/// The client sidecar's address is `127.<octet>.50.1`.
const CLIENT: (u8, u8) = (50, 1);
/// An Azure app listens on `127.<octet>.<APP_OFFSET + zone>.<host>` behind the sidecar that owns the
/// endpoint address `127.<octet>.<zone>.<host>`.
const APP_OFFSET: u8 = 100;

/// `outbound|9080||FQDN`: the client sidecar's cluster.
fn outbound_cluster(fqdn: &str) -> String {
    format!("outbound|{PORT}||{fqdn}")
}

/// `outbound_.9080_._.FQDN`: the SNI of mTLS to the service, and the gateway's cluster of that name.
fn sni(fqdn: &str) -> String {
    format!("outbound_.{PORT}_._.{fqdn}")
}

/// One of the demo's services, as this test uses it.
#[derive(Clone, Copy)]
struct Svc {
    /// the last octet of its first endpoint in each zone (21 reviews, 31 ratings; the second is +1)
    host: u8,
    /// its pods' service account
    account: &'static str,
    /// its Azure pods' names in westeurope-1 and westeurope-2
    azure_pods: [&'static str; 2],
}

const REVIEWS_SVC: Svc =
    Svc { host: 21, account: "reviews", azure_pods: ["reviews-v1-9d2f4-a1", "reviews-v1-9d2f4-b1"] };
const RATINGS_SVC: Svc =
    Svc { host: 31, account: "ratings", azure_pods: ["ratings-v1-4c7d5-a1", "ratings-v1-4c7d5-b1"] };

// ---- the copied demo ----

/// Adjusts the copied demo in `dir` for this test (see the module docs).
fn prepare_demo(dir: &Path) -> Result<()> {
    meshfed_testkit::demo::plain_aws_one_azure_endpoint_per_zone(dir)?;

    // Ejections of 3s instead of 30s: recovery after outlier ejection fits in a bounded test.
    let rules = dir.join("aws-use1/destinationrules.yaml");
    let text = std::fs::read_to_string(&rules)?;
    let short = text.replacen("baseEjectionTime: 30s", "baseEjectionTime: 3s", 1);
    ensure!(short != text, "no baseEjectionTime: 30s in {}", rules.display());
    std::fs::write(&rules, short)?;
    Ok(())
}

/// aws-use1's EndpointSlices file and its original content.
struct AwsSlices {
    path: PathBuf,
    original: String,
}

impl AwsSlices {
    fn new(dir: &Path) -> Result<AwsSlices> {
        let path = dir.join("aws-use1/endpointslices.yaml");
        let original = std::fs::read_to_string(&path)?;
        Ok(AwsSlices { path, original })
    }

    /// Rewrites the file from the original with the endpoints of `service` at `not_ready` not ready
    /// (atomically: the watcher never sees a partial file).
    fn set_not_ready(&self, service: &str, not_ready: &BTreeSet<SocketAddr>) -> Result<()> {
        let mut docs = SliceDocs::parse(&self.original)?;
        let marked = docs.set_ready_where(service, false, |ip| not_ready.contains(&SocketAddr::new(ip, PORT)))?;
        ensure!(marked == not_ready.len(), "only {marked} of {not_ready:?} are in the {service} slice");
        support::write_atomically(&self.path, &docs.to_yaml()?)
    }

    fn restore(&self) -> Result<()> {
        support::write_atomically(&self.path, &self.original)
    }
}

// ---- the topology ----

/// An Azure workload: its sidecar (owning the endpoint address) and the app behind it.
struct AzureWorkload {
    /// the endpoint address, `127.o.<zone>.<host>:9080`
    endpoint: SocketAddr,
    sidecar: Envoy,
    app: Backend,
}

/// meshfed, the Azure east-west gateway, the Azure workloads of one service and the client sidecar.
/// (Fields drop in order: the Envoys go before meshfed, so they never see their ADS server vanish.)
struct Mesh {
    client: Envoy,
    azure: Vec<AzureWorkload>,
    gateway: Envoy,
    meshfed: Meshfed,
    dir: tempfile::TempDir,
    octet: u8,
}

impl Mesh {
    /// Copies and prepares the demo, makes the CA and certificates, and starts everything but the AWS
    /// backends (the test owns those).
    async fn start(octet: u8, svc: Svc) -> Result<Mesh> {
        support::envoy_path(); // fail fast, before starting anything, if Envoy is missing
        let dir = tempfile::Builder::new().prefix("meshfed-cross-cloud-").tempdir()?;
        let mesh_config = meshfed_testkit::server::copy_demo(dir.path(), octet);
        prepare_demo(dir.path())?;
        let ca = TestCa::new(&dir.path().join("certs"))?;
        let spiffe = |sa: &str| format!("spiffe://cluster.local/ns/shop/sa/{sa}");
        let client_id = ca.issue("client", &spiffe("client"))?;
        let workload_id = ca.issue(svc.account, &spiffe(svc.account))?;

        let meshfed = start_meshfed(&mesh_config).await?;
        let xds = meshfed.xds_port;

        let gateway_ip = ip4(octet, AZURE_GATEWAY.0, AZURE_GATEWAY.1);
        let gateway = BootstrapSpec::azure_east_west_gateway(gateway_ip, xds);

        let mut apps = Vec::new();
        let mut sidecars = Vec::new();
        for (zone, pod) in [WESTEUROPE_1, WESTEUROPE_2].into_iter().zip(svc.azure_pods) {
            let endpoint = addr4(octet, zone, svc.host, PORT);
            let app_ip = ip4(octet, APP_OFFSET + zone, svc.host);
            apps.push((
                endpoint,
                Backend::start_with_reply(SocketAddr::new(app_ip, PORT), &endpoint.to_string()).await?,
            ));
            sidecars.push(BootstrapSpec {
                cluster_id: Some("azure-weu".into()),
                network: Some("azure-net".into()),
                locality: Some(format!("westeurope/westeurope-{}", zone - WESTEUROPE_1 + 1)),
                tls: Some(workload_id.clone()),
                inbound_address: Some(app_ip),
                ..BootstrapSpec::new(&format!("sidecar~{}~{pod}.shop~shop.svc.cluster.local", endpoint.ip()), xds)
            });
        }

        let client_ip = ip4(octet, CLIENT.0, CLIENT.1);
        let client = client_spec(client_ip, xds, client_id);

        // Start the Envoys at the same time.
        let specs: Vec<BootstrapSpec> = [gateway, client].into_iter().chain(sidecars).collect();
        let yamls: Vec<String> = specs.iter().map(bootstrap_with).collect();
        let mut envoys = futures::future::try_join_all(yamls.iter().map(|y| start_envoy(y))).await?.into_iter();
        let (gateway, client) = (envoys.next().expect("gateway"), envoys.next().expect("client"));
        let azure = apps
            .into_iter()
            .zip(envoys)
            .map(|((endpoint, app), sidecar)| AzureWorkload { endpoint, sidecar, app })
            .collect();
        Ok(Mesh { octet, dir, meshfed, gateway, azure, client })
    }

    fn client_listener(&self) -> SocketAddr {
        addr4(self.octet, CLIENT.0, CLIENT.1, PORT)
    }

    fn gateway_address(&self) -> SocketAddr {
        addr4(self.octet, AZURE_GATEWAY.0, AZURE_GATEWAY.1, GATEWAY_PORT)
    }

    /// `127.o.<zone>.<host>:9080`, `127.o.<zone>.<host+1>:9080`
    fn zone(&self, zone: u8, svc: Svc) -> BTreeSet<SocketAddr> {
        [svc.host, svc.host + 1].into_iter().map(|h| addr4(self.octet, zone, h, PORT)).collect()
    }

    fn azure_endpoints(&self) -> BTreeSet<SocketAddr> {
        self.azure.iter().map(|w| w.endpoint).collect()
    }

    fn envoys(&self) -> Vec<(&'static str, &Envoy)> {
        let mut out = vec![("client", &self.client), ("gateway", &self.gateway)];
        out.extend(self.azure.iter().map(|w| ("azure sidecar", &w.sidecar)));
        out
    }

    /// Every Envoy rejected no update and logged no warning, and meshfed recorded no NACK from any of
    /// them.
    async fn assert_clean(&self) -> Result<()> {
        for (what, envoy) in self.envoys() {
            envoy.assert_no_rejected_updates().await.with_context(|| format!("{what} (admin {})", envoy.admin_port))?;
            let complaints = envoy.log_complaints();
            ensure!(complaints.is_empty(), "{what} logged warnings or errors:\n{}", complaints.join("\n"));
        }
        let n = self.meshfed.assert_no_nacks().await?;
        ensure!(n == self.envoys().len(), "/debug/adsz lists {n} connections, expected {}", self.envoys().len());
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

/// Sends `n` requests for `fqdn` to the client sidecar's listener, `concurrency` at a time; returns the
/// endpoint that answered each. Fails on any failed request, non-200 or unexpected body.
async fn send_requests(listener: SocketAddr, fqdn: &str, n: usize, concurrency: usize) -> Result<Vec<SocketAddr>> {
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let count = n / concurrency + usize::from(worker < n % concurrency);
        let host = fqdn.to_string();
        tasks.spawn(async move {
            let mut out = Vec::with_capacity(count);
            for i in 0..count {
                let (status, body) = http_get(listener, &host, "/").await?;
                if status != 200 {
                    bail!("request {i} (Host {host}): status {status}: {body}");
                }
                let endpoint: SocketAddr =
                    body.trim().parse().with_context(|| format!("request {i} (Host {host}): body {body:?}"))?;
                out.push(endpoint);
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

fn count(seen: &[SocketAddr]) -> BTreeMap<SocketAddr, usize> {
    let mut counts = BTreeMap::new();
    for s in seen {
        *counts.entry(*s).or_default() += 1;
    }
    counts
}

/// Waits (bounded by `timeout`) until traffic for `fqdn` reaches only `expected`, then checks that
/// [`REQUESTS`] requests all land there (and, with `reach_all`, reach each of them: round robin over
/// plain backends; through the gateway, pooled connections may stick to one Azure endpoint).
async fn expect_traffic(
    mesh: &Mesh,
    fqdn: &str,
    expected: &BTreeSet<SocketAddr>,
    reach_all: bool,
    timeout: Duration,
) -> Result<BTreeMap<SocketAddr, usize>> {
    let listener = mesh.client_listener();
    poll_until(timeout, || async {
        let seen = send_requests(listener, fqdn, PROBE_REQUESTS, 1).await?;
        let stray: Vec<_> = seen.iter().filter(|b| !expected.contains(b)).collect();
        if stray.is_empty() { Ok(()) } else { Err(anyhow!("answered by {stray:?}")) }
    })
    .await
    .with_context(|| format!("waiting for traffic to reach only {expected:?}"))?;
    let counts = count(&send_requests(listener, fqdn, REQUESTS, 1).await?);
    let stray: BTreeMap<_, _> = counts.iter().filter(|(b, _)| !expected.contains(b)).collect();
    ensure!(stray.is_empty(), "{REQUESTS} requests: some answered outside {expected:?}: {counts:?}");
    if reach_all {
        let missed: Vec<_> = expected.iter().filter(|b| !counts.contains_key(b)).collect();
        ensure!(missed.is_empty(), "{REQUESTS} requests never reached {missed:?}: {counts:?}");
    }
    Ok(counts)
}

fn describe(hosts: &[HostDetail]) -> String {
    hosts
        .iter()
        .map(|h| {
            format!(
                "{} ({}/{}, priority {}, weight {}, {}{})",
                h.address,
                h.region,
                h.zone,
                h.priority,
                h.weight,
                h.eds_health,
                if h.failed_outlier_check { ", ejected" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Split horizon, as the client sidecar holds it: `aws` endpoints as they are, and for Azure only the
/// Azure gateway's address, standing for (weighted by) Azure's two endpoints. (Envoy keeps one host per
/// address and priority, so Azure's two zones, in one priority, are one locality for the client.)
/// `priorities` gives the expected priority per zone (third octet of the address; the gateway counts as
/// westeurope-1).
async fn expect_split_horizon(
    mesh: &Mesh,
    fqdn: &str,
    aws: &BTreeSet<SocketAddr>,
    priorities: &BTreeMap<u8, u32>,
) -> Result<Vec<HostDetail>> {
    let cluster = outbound_cluster(fqdn);
    let gateway = mesh.gateway_address();
    let result = poll_until(STEP_TIMEOUT, || async {
        let hosts = mesh.client.cluster_host_details(&cluster).await?;
        let check = || -> Result<()> {
            let direct: BTreeSet<SocketAddr> =
                hosts.iter().filter(|h| h.region == "us-east-1").map(|h| h.address).collect();
            ensure!(&direct == aws, "us-east-1 hosts {direct:?}, expected {aws:?}");
            let azure: Vec<&HostDetail> = hosts.iter().filter(|h| h.region == "westeurope").collect();
            let azure_endpoints = mesh.azure.len() as u32;
            ensure!(
                azure.len() == 1 && azure[0].address == gateway && azure[0].weight == azure_endpoints,
                "expected for Azure only the gateway {gateway}, weight {azure_endpoints}"
            );
            ensure!(hosts.len() == aws.len() + 1, "unexpected hosts");
            ensure!(hosts.iter().all(|h| h.eds_health == "HEALTHY"), "every host must be HEALTHY");
            for h in &hosts {
                let IpAddr::V4(ip) = h.address.ip() else { bail!("not IPv4: {}", h.address) };
                let zone = if h.address == gateway { WESTEUROPE_1 } else { ip.octets()[2] };
                let want = priorities.get(&zone).copied();
                ensure!(want == Some(h.priority), "{}: priority {}, expected {want:?}", h.address, h.priority);
            }
            Ok(())
        };
        check().map(|()| hosts.clone()).map_err(|e| anyhow!("{cluster}: {e:#}: {}", describe(&hosts)))
    })
    .await;
    if result.is_err() {
        let eds = mesh.client.admin_get("/config_dump?include_eds&resource=dynamic_endpoint_configs").await;
        return result.map_err(|e| anyhow!("{e:#}\nthe client's EDS: {eds:#?}"));
    }
    result
}

/// The gateway's SNI-named cluster for `fqdn` holds exactly the Azure endpoints (its own network's).
async fn expect_gateway_cluster(mesh: &Mesh, fqdn: &str) -> Result<()> {
    let cluster = sni(fqdn);
    let want = mesh.azure_endpoints();
    poll_until(STEP_TIMEOUT, || async {
        let hosts = mesh.gateway.cluster_host_details(&cluster).await?;
        let got: BTreeSet<SocketAddr> = hosts.iter().map(|h| h.address).collect();
        if got == want && hosts.len() == want.len() {
            Ok(())
        } else {
            Err(anyhow!("gateway's {cluster}: {}, expected {want:?}", describe(&hosts)))
        }
    })
    .await
}

/// The mTLS path was used: the client made TLS connections on its cluster, the gateway forwarded by SNI
/// on the cluster of that name, and the Azure sidecars that served requests terminated TLS on their
/// inbound listener and forwarded to their app.
async fn expect_mtls_path(mesh: &Mesh, fqdn: &str) -> Result<()> {
    let client_cluster = outbound_cluster(fqdn);
    let handshakes = mesh.client.stat(&format!("cluster.{client_cluster}.ssl.handshake")).await?;
    ensure!(handshakes > 0, "client: no TLS handshake on {client_cluster}");
    let san_failures = mesh.client.stat(&format!("cluster.{client_cluster}.ssl.fail_verify_san")).await?;
    ensure!(san_failures == 0, "client: {san_failures} SAN verification failures on {client_cluster}");

    let gateway_cx = mesh.gateway.stat(&format!("cluster.{}.upstream_cx_total", sni(fqdn))).await?;
    ensure!(gateway_cx > 0, "gateway: no connection on cluster {}", sni(fqdn));

    let mut served = 0;
    for w in &mesh.azure {
        if w.app.hits() == 0 {
            continue;
        }
        served += 1;
        let listener = format!("{}_{}", w.endpoint.ip(), w.endpoint.port());
        let tls = w.sidecar.stat(&format!("listener.{listener}.ssl.handshake")).await?;
        ensure!(tls > 0, "Azure sidecar {}: no TLS handshake on its inbound listener {listener}", w.endpoint);
        let inbound = w.sidecar.stat(&format!("cluster.inbound|{PORT}||.upstream_cx_total")).await?;
        ensure!(inbound > 0, "Azure sidecar {}: nothing forwarded to its app", w.endpoint);
    }
    ensure!(served > 0, "no Azure app served a request");
    Ok(())
}

// ---- the tests ----

/// Fails the test with the step's name and the error.
fn step<T>(name: &'static str) -> impl FnOnce(anyhow::Error) -> T {
    move |e| panic!("step {name:?}: {e:#}")
}

/// Locality failover from us-east-1a to us-east-1b to Azure (through the east-west gateway over mTLS),
/// by EndpointSlice readiness and by outlier detection, then recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reviews_fail_over_across_clouds_through_the_east_west_gateway() {
    let octet = 91;
    let mesh = Mesh::start(octet, REVIEWS_SVC).await.unwrap_or_else(|e| panic!("starting the mesh: {e:#}"));
    let slices = AwsSlices::new(mesh.dir.path()).expect("aws-use1 EndpointSlices");
    let zone_a = mesh.zone(US_EAST_1A, REVIEWS_SVC);
    let zone_b = mesh.zone(US_EAST_1B, REVIEWS_SVC);
    let aws: BTreeSet<_> = zone_a.union(&zone_b).copied().collect();
    let azure = mesh.azure_endpoints();
    let mut backends: BTreeMap<SocketAddr, Backend> = BTreeMap::new();
    for addr in &aws {
        backends.insert(*addr, Backend::start(*addr).await.unwrap_or_else(|e| panic!("backend: {e:#}")));
    }

    // Split horizon: the client holds the AWS endpoints and, for Azure, only the gateway, with istiod's
    // priorities (0 same zone, 1 same region, 2 the failover region); the gateway holds Azure's own.
    let priorities = BTreeMap::from([(US_EAST_1A, 0), (US_EAST_1B, 1), (WESTEUROPE_1, 2), (WESTEUROPE_2, 2)]);
    expect_split_horizon(&mesh, REVIEWS, &aws, &priorities).await.unwrap_or_else(step("split horizon"));
    expect_gateway_cluster(&mesh, REVIEWS).await.unwrap_or_else(step("gateway cluster"));

    // (a) all requests to us-east-1a while it is healthy.
    expect_traffic(&mesh, REVIEWS, &zone_a, true, STEP_TIMEOUT).await.unwrap_or_else(step("(a) us-east-1a"));

    // (b) us-east-1a not ready: us-east-1b.
    slices.set_not_ready("reviews", &zone_a).expect("editing the slice");
    expect_traffic(&mesh, REVIEWS, &zone_b, true, STEP_TIMEOUT).await.unwrap_or_else(step("(b) us-east-1b"));

    // (c1) no AWS endpoint ready: Azure, through the gateway, over mTLS.
    slices.set_not_ready("reviews", &aws).expect("editing the slice");
    expect_traffic(&mesh, REVIEWS, &azure, false, STEP_TIMEOUT).await.unwrap_or_else(step("(c1) Azure by readiness"));
    expect_mtls_path(&mesh, REVIEWS).await.unwrap_or_else(step("(c1) mTLS path"));

    // (c2) ready again (back to us-east-1a), then every AWS backend dies with no EndpointSlice change:
    // outlier detection ejects them and traffic goes to Azure.
    slices.restore().expect("restoring the slice");
    expect_traffic(&mesh, REVIEWS, &zone_a, true, STEP_TIMEOUT).await.unwrap_or_else(step("(c2) restored"));
    let azure_hits_before: u64 = mesh.azure.iter().map(|w| w.app.hits()).sum();
    backends.clear(); // stops the servers and closes their connections
    let listener = mesh.client_listener();
    let cluster = outbound_cluster(REVIEWS);
    // every AWS host seen ejected so far (they come back after baseEjectionTime, fail, are ejected again)
    let ejected = std::cell::RefCell::new(BTreeSet::new());
    poll_until(STEP_TIMEOUT, || async {
        let hosts = mesh.client.cluster_host_details(&cluster).await?;
        ejected.borrow_mut().extend(hosts.iter().filter(|h| h.failed_outlier_check).map(|h| h.address));
        // The dead hosts stay in EDS, healthy as far as Kubernetes knows.
        let in_eds: BTreeSet<_> = hosts.iter().filter(|h| h.eds_health == "HEALTHY").map(|h| h.address).collect();
        ensure!(aws.is_subset(&in_eds), "AWS hosts left EDS: {}", describe(&hosts));
        let seen = send_requests(listener, REVIEWS, PROBE_REQUESTS, 1).await?;
        ensure!(seen.iter().all(|b| azure.contains(b)), "answered by {seen:?}");
        let so_far = ejected.borrow().clone();
        ensure!(aws.is_subset(&so_far), "ejected so far: {so_far:?}; now: {}", describe(&hosts));
        Ok(())
    })
    .await
    .unwrap_or_else(step("(c2) outlier ejection"));
    let ejections = mesh
        .client
        .stat(&format!("cluster.{cluster}.outlier_detection.ejections_enforced_total"))
        .await
        .expect("stats");
    assert!(ejections >= aws.len() as u64, "(c2): {ejections} ejections enforced, expected >= {}", aws.len());
    let counts = expect_traffic(&mesh, REVIEWS, &azure, false, STEP_TIMEOUT)
        .await
        .unwrap_or_else(step("(c2) Azure by outlier detection"));
    let azure_hits_after: u64 = mesh.azure.iter().map(|w| w.app.hits()).sum();
    assert!(azure_hits_after >= azure_hits_before + REQUESTS as u64, "(c2): the Azure apps did not serve {counts:?}");

    // (d) us-east-1a comes back: once the ejections expire, traffic returns to it.
    for addr in &zone_a {
        backends.insert(*addr, Backend::start(*addr).await.unwrap_or_else(|e| panic!("backend: {e:#}")));
    }
    poll_until(RECOVERY_TIMEOUT, || async {
        let hosts = mesh.client.cluster_host_details(&cluster).await?;
        let back = hosts.iter().filter(|h| zone_a.contains(&h.address) && !h.failed_outlier_check).count();
        ensure!(back == zone_a.len(), "us-east-1a still ejected: {}", describe(&hosts));
        Ok(())
    })
    .await
    .unwrap_or_else(step("(d) ejections expire"));
    expect_traffic(&mesh, REVIEWS, &zone_a, true, STEP_TIMEOUT).await.unwrap_or_else(step("(d) recovery"));

    mesh.assert_clean().await.unwrap_or_else(|e| panic!("{e:#}"));
}

/// `distribute` 80/20 across the clouds for ratings:9080: 2,000 requests from us-east-1a give 80% to
/// us-east-1 (plaintext) and 20% to westeurope (through the gateway), within 5 points.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ratings_distribute_80_20_across_clouds() {
    const TOTAL: usize = 2000;
    let octet = 92;
    let mesh = Mesh::start(octet, RATINGS_SVC).await.unwrap_or_else(|e| panic!("starting the mesh: {e:#}"));
    let aws: BTreeSet<_> =
        mesh.zone(US_EAST_1A, RATINGS_SVC).union(&mesh.zone(US_EAST_1B, RATINGS_SVC)).copied().collect();
    let azure = mesh.azure_endpoints();
    let _backends = support::start_backends(aws.iter().copied()).await.unwrap_or_else(|e| panic!("backends: {e:#}"));

    // distribute: no failover priorities, every locality at priority 0.
    let priorities = BTreeMap::from([(US_EAST_1A, 0), (US_EAST_1B, 0), (WESTEUROPE_1, 0), (WESTEUROPE_2, 0)]);
    expect_split_horizon(&mesh, RATINGS, &aws, &priorities).await.unwrap_or_else(|e| panic!("split horizon: {e:#}"));
    expect_gateway_cluster(&mesh, RATINGS).await.unwrap_or_else(|e| panic!("gateway cluster: {e:#}"));
    // Every locality answers before counting (Azure through the gateway and a sidecar).
    let all: BTreeSet<_> = aws.union(&azure).copied().collect();
    poll_until(STEP_TIMEOUT, || async {
        let seen = send_requests(mesh.client_listener(), RATINGS, 100, 4).await?;
        let stray: Vec<_> = seen.iter().filter(|b| !all.contains(b)).collect();
        ensure!(stray.is_empty(), "answered by {stray:?}");
        ensure!(seen.iter().any(|b| azure.contains(b)), "Azure never answered: {:?}", count(&seen));
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("warm-up: {e:#}"));

    let seen = send_requests(mesh.client_listener(), RATINGS, TOTAL, 8).await.unwrap_or_else(|e| panic!("{e:#}"));
    let counts = count(&seen);
    let to_aws = seen.iter().filter(|b| aws.contains(b)).count();
    let to_azure = seen.iter().filter(|b| azure.contains(b)).count();
    assert_eq!(to_aws + to_azure, TOTAL, "answered outside the mesh's endpoints: {counts:?}");
    let share = to_aws as f64 / TOTAL as f64;
    assert!(
        (0.75..=0.85).contains(&share),
        "us-east-1 got {to_aws}/{TOTAL} ({share:.3}), expected 80% ± 5: {counts:?}"
    );
    expect_mtls_path(&mesh, RATINGS).await.unwrap_or_else(|e| panic!("mTLS path: {e:#}"));
    mesh.assert_clean().await.unwrap_or_else(|e| panic!("{e:#}"));
}
