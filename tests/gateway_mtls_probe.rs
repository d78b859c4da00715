//! The gateway probes' mTLS stage end to end (`gatewayProbes.mtls`), with real Envoys and certificates from
//! a test CA: only a handshake through the gateway with a service's SNI sees that the gateway has no backend.
//!
//! Topology (loopback, `127.99.0.0/16`, a copy of the two-clouds demo):
//!
//! ```text
//!  meshfed (`meshfed serve`, gatewayProbes.mtls for azure-net: reviews:9080, its own mesh certificate)
//!     │ TCP connect 127.99.20.1:15443, GET 127.99.20.1:15021/healthz/ready, then mTLS with
//!     │ SNI outbound_.9080_._.reviews.shop.svc.cluster.local
//!     ▼
//!  east-west gateway Envoy (router, azure-net, 127.99.20.1:15443; readiness 200 on :15021 from the test)
//!     │ TLS passed through by SNI
//!     ▼
//!  Azure reviews sidecar Envoy (127.99.3.21:9080, inbound mTLS, identity sa/reviews)
//!     │ plaintext
//!     ▼
//!  the app (127.99.103.21:9080)
//! ```
//!
//! The AWS gateway (127.99.10.1) is a plain listener with readiness 200: aws-net has no mTLS target, so it is
//! probed by TCP and readiness only, and stays up. The Azure reviews slice keeps only 127.99.3.21 (one
//! sidecar: the gateway's SNI cluster has exactly the backend the test kills).
//!
//! Kill the sidecar: the gateway still accepts on 15443 and its readiness still answers 200, yet the
//! Azure gateway address goes down within failureThreshold x interval + slack, and `/debug/clusterz` names
//! the TLS stage. Start the sidecar again: the address is up again after the hold-down.
//!
//! Needs Envoy (see `support::envoy_path`); a missing Envoy fails the test.

use meshfed_testkit as support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, ensure};
use support::slices::SliceDocs;
use support::{Backend, BootstrapSpec, Envoy, Meshfed, TestCa, addr4, bootstrap_with, ip4, poll_until, start_envoy};

const OCTET: u8 = 99;
const REVIEWS: &str = "reviews.shop.svc.cluster.local";
const PORT: u16 = 9080;
/// The Azure reviews endpoint the test keeps (its sidecar owns it), `127.99.3.21`.
const ENDPOINT: (u8, u8) = (3, 21);
const APP: (u8, u8) = (103, 21);
const AZURE_GATEWAY: (u8, u8) = (20, 1);
const AWS_GATEWAY: (u8, u8) = (10, 1);
const GATEWAY_PORT: u16 = 15443;
const STATUS_PORT: u16 = 15021;

const INTERVAL: Duration = Duration::from_millis(500);
const TIMEOUT: Duration = Duration::from_millis(400);
const FAILURE_THRESHOLD: u32 = 3;
const SUCCESS_THRESHOLD: u32 = 2;
const HOLD_DOWN: Duration = Duration::from_secs(3);
/// Envoys connected and configured, then successThreshold probes
const FIRST_UP_BOUND: Duration = Duration::from_secs(40);
/// failureThreshold x interval (+10% jitter) + a probe's timeout, with room for a loaded machine
const DOWN_BOUND: Duration = Duration::from_secs(6);
/// the sidecar starting, hold-down, successThreshold x interval, with room for a loaded machine
const RECOVERY_BOUND: Duration = Duration::from_secs(25);

fn sni() -> String {
    format!("outbound_.{PORT}_._.{REVIEWS}")
}

/// The Azure gateway address's entry of `/debug/clusterz` (cluster azure-weu).
async fn azure_gateway_evidence(meshfed: &Meshfed) -> Result<serde_json::Value> {
    let clusters = meshfed.debug_json("/debug/clusterz").await?;
    let azure = clusters
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["id"] == "azure-weu")
        .ok_or_else(|| anyhow!("no azure-weu in {clusters}"))?;
    let gateway = addr4(OCTET, AZURE_GATEWAY.0, AZURE_GATEWAY.1, GATEWAY_PORT).to_string();
    azure["gateways"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["address"] == gateway.as_str())
        .cloned()
        .ok_or_else(|| anyhow!("no gateway address {gateway} in {azure}"))
}

async fn aws_gateway_state(meshfed: &Meshfed) -> Result<String> {
    let clusters = meshfed.debug_json("/debug/clusterz").await?;
    let aws = clusters.as_array().into_iter().flatten().find(|c| c["id"] == "aws-use1").cloned().unwrap_or_default();
    Ok(aws["gateways"]["addresses"][0]["state"].as_str().unwrap_or_default().to_string())
}

/// Keeps only the Azure reviews endpoint the sidecar stands for.
fn keep_one_azure_reviews_endpoint(dir: &std::path::Path) -> Result<()> {
    let slices = dir.join("azure-weu/endpointslices.yaml");
    let mut docs = SliceDocs::parse(&std::fs::read_to_string(&slices)?)?;
    let keep = ip4(OCTET, ENDPOINT.0, ENDPOINT.1).to_string();
    let endpoints = docs.endpoints_mut("reviews")?;
    endpoints.retain(|ep| ep["addresses"][0].as_str() == Some(keep.as_str()));
    ensure!(endpoints.len() == 1, "no Azure reviews endpoint {keep}");
    support::write_atomically(&slices, &docs.to_yaml()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_mtls_probe_sees_a_gateway_without_its_backend() -> Result<()> {
    support::envoy_path(); // fail fast if Envoy is missing
    let dir = tempfile::Builder::new().prefix("meshfed-gateway-mtls-").tempdir()?;
    let mesh_path = support::server::copy_demo(dir.path(), OCTET);
    keep_one_azure_reviews_endpoint(dir.path())?;
    let ca = TestCa::new(&dir.path().join("certs"))?;
    let spiffe = |ns: &str, sa: &str| format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
    let meshfed_id = ca.issue("meshfed", &spiffe("istio-system", "meshfed"))?;
    let reviews_id = ca.issue("reviews", &spiffe("shop", "reviews"))?;
    let mut mesh = std::fs::read_to_string(&mesh_path)?;
    mesh.push_str(&format!(
        "gatewayProbes:\n  interval: {}ms\n  timeout: {}ms\n  failureThreshold: {FAILURE_THRESHOLD}\n  successThreshold: {SUCCESS_THRESHOLD}\n  holdDown: {}s\n  statusPort: {STATUS_PORT}\n  concurrency: 4\n  mtls:\n    networks: {{azure-net: {{host: {REVIEWS}, port: {PORT}}}}}\n    certFile: {}\n    keyFile: {}\n    caFile: {}\n",
        INTERVAL.as_millis(),
        TIMEOUT.as_millis(),
        HOLD_DOWN.as_secs(),
        meshfed_id.cert.display(),
        meshfed_id.key.display(),
        meshfed_id.root.display(),
    ));
    std::fs::write(&mesh_path, mesh)?;

    // the gateways' readiness (as Istio's status-port) and the AWS gateway port: always up
    let azure_status = Backend::start(addr4(OCTET, AZURE_GATEWAY.0, AZURE_GATEWAY.1, STATUS_PORT)).await?;
    let _aws_status = Backend::start(addr4(OCTET, AWS_GATEWAY.0, AWS_GATEWAY.1, STATUS_PORT)).await?;
    let _aws_gateway = Backend::start(addr4(OCTET, AWS_GATEWAY.0, AWS_GATEWAY.1, GATEWAY_PORT)).await?;
    let endpoint = addr4(OCTET, ENDPOINT.0, ENDPOINT.1, PORT);
    let app_ip = ip4(OCTET, APP.0, APP.1);
    let _app = Backend::start_with_reply(SocketAddr::new(app_ip, PORT), &endpoint.to_string()).await?;

    let meshfed = support::start_meshfed(&mesh_path).await?;
    let gateway_ip = ip4(OCTET, AZURE_GATEWAY.0, AZURE_GATEWAY.1);
    let gateway_spec = BootstrapSpec::azure_east_west_gateway(gateway_ip, meshfed.xds_port);
    let sidecar_spec = BootstrapSpec {
        cluster_id: Some("azure-weu".into()),
        network: Some("azure-net".into()),
        locality: Some("westeurope/westeurope-1".into()),
        tls: Some(reviews_id.clone()),
        inbound_address: Some(app_ip),
        ..BootstrapSpec::new(
            &format!("sidecar~{}~reviews-v1-9d2f4-a1.shop~shop.svc.cluster.local", endpoint.ip()),
            meshfed.xds_port,
        )
    };
    let sidecar_yaml = bootstrap_with(&sidecar_spec);
    let (gateway, sidecar) =
        futures::future::try_join(start_envoy(&bootstrap_with(&gateway_spec)), start_envoy(&sidecar_yaml)).await?;
    let result = run(&meshfed, &gateway, sidecar, &sidecar_yaml, &azure_status).await;
    if result.is_err() {
        meshfed.guard.dump_logs();
        gateway.guard.dump_logs();
    }
    result
}

async fn run(meshfed: &Meshfed, gateway: &Envoy, sidecar: Envoy, sidecar_yaml: &str, status: &Backend) -> Result<()> {
    let gateway_addr = addr4(OCTET, AZURE_GATEWAY.0, AZURE_GATEWAY.1, GATEWAY_PORT);

    // up: the handshakes through the gateway reach the sidecar
    poll_until(FIRST_UP_BOUND, || async {
        let a = azure_gateway_evidence(meshfed).await?;
        ensure!(a["state"] == "up" && a["lastProbe"]["ok"] == true, "{a}");
        Ok(())
    })
    .await
    .context("the Azure gateway address is up through the mTLS probe")?;
    // the probes went through the gateway's SNI cluster and were terminated by the sidecar
    let sni_cx = gateway.stat(&format!("cluster.{}.upstream_cx_total", sni())).await?;
    ensure!(sni_cx > 0, "the gateway's {} cluster saw no connection", sni());
    let handshakes = sidecar.stats("ssl.handshake").await?;
    ensure!(handshakes.iter().any(|(k, v)| k.starts_with("listener.") && *v > 0), "sidecar: {handshakes:?}");
    ensure!(aws_gateway_state(meshfed).await? == "up", "aws-net (TCP + readiness only) is up");

    // the sidecar dies; the gateway still listens and is still ready
    drop(sidecar);
    let killed = Instant::now();
    let a = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(gateway_addr)).await;
    ensure!(matches!(a, Ok(Ok(_))), "the gateway still accepts on {gateway_addr}: {a:?}");
    let (code, _) = support::http_get(status.addr(), "localhost", "/healthz/ready").await?;
    ensure!(code == 200, "the gateway's readiness still answers 200");
    let down = poll_until(DOWN_BOUND, || async {
        let a = azure_gateway_evidence(meshfed).await?;
        ensure!(a["state"] == "down", "{a}");
        Ok(a)
    })
    .await
    .context("the Azure gateway address goes down when its backend dies")?;
    let down_after = killed.elapsed();
    eprintln!("down after {down_after:?}: {down}");
    let error = down["lastProbe"]["error"].as_str().unwrap_or_default();
    ensure!(
        error.starts_with(&format!("TLS handshake through the gateway {gateway_addr} with SNI {}: ", sni())),
        "the error names the TLS stage: {error:?}"
    );
    ensure!(aws_gateway_state(meshfed).await? == "up", "aws-net is not affected");

    // the sidecar is back: up again, not before the hold-down
    let _sidecar = start_envoy(sidecar_yaml).await?;
    let restarted = Instant::now();
    poll_until(RECOVERY_BOUND, || async {
        let a = azure_gateway_evidence(meshfed).await?;
        ensure!(a["state"] == "up", "{a}");
        Ok(())
    })
    .await
    .context("the Azure gateway address is up again once its backend is back")?;
    let up_after = killed.elapsed();
    eprintln!("up again {:?} after the restart, {up_after:?} after the kill", restarted.elapsed());
    ensure!(up_after >= HOLD_DOWN, "up again after {up_after:?}, before the hold-down {HOLD_DOWN:?}");
    Ok(())
}
