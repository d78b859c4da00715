//! The gateway prober: every interval (±10% jitter, rounds on a fixed cadence), each east-west gateway address gets a TCP connect on
//! its gateway port and, when a status port is configured, an HTTP/1.1 `GET /healthz/ready` on that port
//! of the same IP, expecting 200 (Istio's east-west gateway Service exposes `status-port` 15021). With
//! `gatewayProbes.mtls`, the connection to the gateway port then carries an Istio mTLS handshake with a
//! known service's SNI (`outbound_.PORT_._.FQDN`): the gateway passes it through to one of the service's
//! sidecars, so a completed handshake (a server certificate from the mesh root naming a workload of the
//! trust domain) proves the path to a backend. At most `concurrency` probes are in flight, each bounded
//! by `timeout`. The results feed [`Evidence`]; a changed verdict goes to the push loop.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{info, warn};

use super::evidence::{AddressState, Evidence, ProbeResult, Thresholds, Verdict};
use crate::mesh_config::{GatewayMtls, GatewayProbes};
use crate::model::NetworkId;

/// The path of the gateway's readiness endpoint on its status port.
pub const READY_PATH: &str = "/healthz/ready";
/// The status line and headers of the readiness response are read up to this many bytes.
const MAX_RESPONSE_HEAD: usize = 4096;

/// What the prober knows, for the debug surface.
#[derive(Clone, Debug)]
pub struct Report {
    pub config: GatewayProbes,
    pub evidence: Evidence,
    pub verdict: Verdict,
    /// rounds of probes done
    pub rounds: u64,
}

/// The mTLS stage of the probes: meshfed's mesh client configuration and the services to reach per
/// network (`gatewayProbes.mtls`).
#[derive(Clone, Debug)]
pub struct MtlsProbes {
    /// presents meshfed's mesh certificate, verifies the mesh root and trust domain, offers Istio's ALPN
    pub client: Arc<rustls::ClientConfig>,
    pub targets: GatewayMtls,
}

impl MtlsProbes {
    /// The mTLS stage `targets` asks for, with its certificate from `certFile`/`keyFile` and its root
    /// from `caFile`, else meshfed's mesh certificate (the one it serves xDS with) and root. Also
    /// returns the certificate it loaded from `certFile`/`keyFile` (the caller reloads it as it rotates).
    /// The error names the setting to fix.
    pub fn new(
        targets: &GatewayMtls,
        trust_domain: &str,
        mesh: Option<&crate::tls::MeshCertificate>,
    ) -> Result<(MtlsProbes, Option<Arc<crate::tls::ReloadingCert>>), String> {
        use crate::tls::{ReloadingCert, load_roots, mesh_client_config, provider};
        let (cert, loaded) = match (&targets.cert, mesh) {
            (Some((cert, key)), _) => {
                let c = Arc::new(
                    ReloadingCert::load(cert, key, provider())
                        .map_err(|e| format!("gatewayProbes.mtls.certFile/keyFile: {e}"))?,
                );
                (c.clone(), Some(c))
            }
            (None, Some(m)) => (m.cert.clone(), None),
            (None, None) => {
                return Err("gatewayProbes.mtls: no client certificate: set certFile and keyFile (and caFile), or \
                     serve xDS over mTLS (--xds-tls-cert/--xds-tls-key/--xds-client-ca) so that the probes present \
                     meshfed's mesh certificate"
                    .into());
            }
        };
        let root = match (&targets.ca, mesh.and_then(|m| m.root.as_ref())) {
            (Some(ca), _) => load_roots(ca).map_err(|e| format!("gatewayProbes.mtls.caFile: {e}"))?,
            (None, Some(root)) => load_roots(root).map_err(|e| format!("--xds-client-ca (the mesh root): {e}"))?,
            (None, None) => {
                return Err("gatewayProbes.mtls.caFile: missing: the mesh root the backends' certificates chain to \
                     (or pass --xds-client-ca)"
                    .into());
            }
        };
        let client = mesh_client_config(cert, Arc::new(root), trust_domain, &crate::tls::ISTIO_ALPN)
            .map_err(|e| format!("gatewayProbes.mtls: {e}"))?;
        Ok((MtlsProbes { client, targets: targets.clone() }, loaded))
    }

    /// The handshake to make through a gateway address of `networks` (the first that has a service).
    fn handshake_for<'a>(&self, networks: impl IntoIterator<Item = &'a NetworkId>) -> Option<Handshake> {
        let target = networks.into_iter().find_map(|n| self.targets.target(n))?;
        let sni = target.sni();
        let name = rustls::pki_types::ServerName::try_from(sni.clone()).ok()?;
        Some(Handshake { client: self.client.clone(), name, sni })
    }
}

/// An Istio mTLS handshake through a gateway: the client configuration and the SNI to send.
#[derive(Clone, Debug)]
pub struct Handshake {
    pub client: Arc<rustls::ClientConfig>,
    pub name: rustls::pki_types::ServerName<'static>,
    /// `outbound_.PORT_._.FQDN`
    pub sni: String,
}

/// Where a probe is (what a timeout interrupted).
#[derive(Clone, Copy)]
enum Stage {
    Connect,
    Readiness(SocketAddr),
    Handshake,
}

/// Probes `address`: a TCP connect to it, then (status port not 0) `GET /healthz/ready` on its IP's status
/// port, expecting 200, then (with `handshake`) an Istio mTLS handshake on the gateway connection. The
/// whole probe is bounded by `timeout`. The error says which stage failed.
pub async fn probe(
    address: SocketAddr,
    status_port: u16,
    handshake: Option<&Handshake>,
    timeout: Duration,
) -> Result<(), String> {
    let mut stage = Stage::Connect;
    let result = tokio::time::timeout(timeout, probe_unbounded(address, status_port, handshake, &mut stage)).await;
    match result {
        Ok(r) => r,
        Err(_) => Err(match (stage, handshake) {
            (Stage::Connect, _) => format!("connect {address}: timed out after {timeout:?}"),
            (Stage::Readiness(status), _) => format!("GET http://{status}{READY_PATH}: timed out after {timeout:?}"),
            (Stage::Handshake, Some(h)) => {
                format!("TLS handshake through the gateway {address} with SNI {}: timed out after {timeout:?}", h.sni)
            }
            (Stage::Handshake, None) => format!("timed out after {timeout:?}"),
        }),
    }
}

async fn probe_unbounded(
    address: SocketAddr,
    status_port: u16,
    handshake: Option<&Handshake>,
    stage: &mut Stage,
) -> Result<(), String> {
    let gateway = TcpStream::connect(address).await.map_err(|e| format!("connect {address}: {e}"))?;
    if status_port != 0 {
        let status = SocketAddr::new(address.ip(), status_port);
        *stage = Stage::Readiness(status);
        readiness(status).await?;
    }
    let Some(h) = handshake else { return Ok(()) };
    *stage = Stage::Handshake;
    let connector = tokio_rustls::TlsConnector::from(h.client.clone());
    let mut tls = connector.connect(h.name.clone(), gateway).await.map_err(|e| {
        format!("TLS handshake through the gateway {address} with SNI {}: {}", h.sni, handshake_error(&e))
    })?;
    // close_notify; the backend's answer is not awaited
    let _ = tls.shutdown().await;
    Ok(())
}

/// A handshake error as the operator needs it: a closed connection is what a gateway does with an SNI it
/// has no route for, or when it cannot reach a backend.
fn handshake_error(e: &std::io::Error) -> String {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    if let Some(rustls::Error::General(reason)) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        // what the mesh verifier found wrong with the backend's certificate
        return format!("invalid peer certificate: {reason}");
    }
    match e.kind() {
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => format!(
            "closed before the handshake completed ({e}): the gateway has no route for this SNI, or no backend behind it answers"
        ),
        _ => e.to_string(),
    }
}

/// `GET /healthz/ready` on `status`, expecting 200.
async fn readiness(status: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect(status).await.map_err(|e| format!("connect {status}: {e}"))?;
    let request = format!(
        "GET {READY_PATH} HTTP/1.1\r\nHost: {status}\r\nUser-Agent: meshfed\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.map_err(|e| format!("GET http://{status}{READY_PATH}: {e}"))?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < MAX_RESPONSE_HEAD {
        let n = s.read(&mut buf).await.map_err(|e| format!("GET http://{status}{READY_PATH}: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().splitn(3, ' ');
    match (parts.next(), parts.next()) {
        (Some(v), Some("200")) if v.starts_with("HTTP/1.") => Ok(()),
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => {
            Err(format!("GET http://{status}{READY_PATH}: status {code}, expected 200"))
        }
        _ if head.is_empty() => Err(format!("GET http://{status}{READY_PATH}: closed without a response")),
        _ => Err(format!("GET http://{status}{READY_PATH}: not an HTTP/1.x response: {:?}", line.trim_end())),
    }
}

/// A small random source for the jitter (xorshift64*, seeded from the clock).
struct Jitter(u64);

impl Jitter {
    fn new() -> Jitter {
        let seed = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        Jitter(seed | 1)
    }

    /// `d` scaled by a random factor in [0.9, 1.1].
    fn around(&mut self, d: Duration) -> Duration {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
        d.mul_f64(0.9 + 0.2 * r)
    }
}

/// Once `ready` completes (the first full state is built), probes the gateway addresses `targets()`
/// returns (per network), every interval, until the returned task is aborted. `on_verdict` gets the first
/// verdict and every changed one; the report (for the debug surface) is updated after every round.
pub fn start(
    config: GatewayProbes,
    mtls: Option<MtlsProbes>,
    ready: impl std::future::Future<Output = ()> + Send + 'static,
    targets: impl Fn() -> BTreeMap<NetworkId, BTreeSet<SocketAddr>> + Send + 'static,
    on_verdict: impl Fn(Verdict) + Send + 'static,
) -> (watch::Receiver<Arc<Report>>, tokio::task::JoinHandle<()>) {
    let (report_tx, report_rx) = watch::channel(Arc::new(Report {
        config: config.clone(),
        evidence: Evidence::default(),
        verdict: Verdict::default(),
        rounds: 0,
    }));
    let task = tokio::spawn(async move {
        ready.await;
        let thresholds = Thresholds::from(&config);
        let mut evidence = Evidence::default();
        let mut last: Option<Verdict> = None;
        let mut jitter = Jitter::new();
        let mut rounds = 0u64;
        loop {
            // Rounds start every interval (jittered) whatever their probes take (each is bounded by the
            // timeout, at most the interval), so a blackholed gateway is detected as fast as a refusing one.
            let next_round = tokio::time::Instant::now() + jitter.around(config.interval);
            evidence.set_targets(&targets());
            let probes: Vec<(SocketAddr, Option<Handshake>)> = evidence
                .addresses()
                .into_iter()
                .map(|a| (a, mtls.as_ref().and_then(|m| m.handshake_for(&evidence.networks_of(&a)))))
                .collect();
            let (status_port, timeout) = (config.status_port, config.timeout);
            let results: Vec<(SocketAddr, ProbeResult)> = futures::stream::iter(probes)
                .map(|(a, handshake)| async move {
                    let r = probe(a, status_port, handshake.as_ref(), timeout).await;
                    let at = SystemTime::now();
                    (a, r.map_or_else(|e| ProbeResult::failure(at, e), |()| ProbeResult::success(at)))
                })
                .buffer_unordered(config.concurrency.max(1))
                .collect()
                .await;
            let now = Instant::now();
            for (a, r) in results {
                let error = r.error.clone();
                if evidence.record(a, r, now, thresholds) {
                    log_change(&evidence, a, error.as_deref());
                }
            }
            let verdict = evidence.verdict();
            if last.as_ref() != Some(&verdict) {
                if let Some(old) = &last {
                    for n in verdict.fenced.difference(&old.fenced) {
                        warn!(network = %n, "every east-west gateway address of the network is down: fenced");
                    }
                    for n in old.fenced.difference(&verdict.fenced) {
                        info!(network = %n, "an east-west gateway address of the network is up again: unfenced");
                    }
                }
                on_verdict(verdict.clone());
                last = Some(verdict.clone());
            }
            rounds += 1;
            export_metrics(&evidence, &verdict);
            report_tx.send_replace(Arc::new(Report {
                config: config.clone(),
                evidence: evidence.clone(),
                verdict,
                rounds,
            }));
            tokio::time::sleep_until(next_round).await;
        }
    });
    (report_rx, task)
}

fn log_change(evidence: &Evidence, address: SocketAddr, error: Option<&str>) {
    for (network, addresses) in evidence.networks() {
        let Some(e) = addresses.get(&address) else { continue };
        match e.state {
            AddressState::Down => {
                warn!(%network, %address, failures = e.consecutive_failures, error, "east-west gateway address down")
            }
            AddressState::Up => info!(%network, %address, "east-west gateway address up"),
            AddressState::Unknown => {}
        }
    }
}

fn export_metrics(evidence: &Evidence, verdict: &Verdict) {
    let mut addresses = Vec::new();
    let mut networks = Vec::new();
    for (network, a) in evidence.networks() {
        for (address, e) in a {
            addresses.push((network.to_string(), address.to_string(), !e.is_down()));
        }
        networks.push((network.to_string(), verdict.fenced.contains(network)));
    }
    crate::metrics::global().set_gateway_evidence(&addresses, &networks);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn http_server(status_line: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(format!("{status_line}\r\nContent-Length: 0\r\n\r\n").as_bytes()).await;
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn a_listening_gateway_with_a_ready_status_port_passes() {
        let gw = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (status, _t) = http_server("HTTP/1.1 200 OK").await;
        let addr = gw.local_addr().unwrap();
        assert_eq!(probe(addr, status.port(), None, Duration::from_secs(2)).await, Ok(()));
        // TCP only
        assert_eq!(probe(addr, 0, None, Duration::from_secs(2)).await, Ok(()));
    }

    #[tokio::test]
    async fn failures_say_what_failed() {
        let gw = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = gw.local_addr().unwrap();
        let (not_ready, _t) = http_server("HTTP/1.1 503 Service Unavailable").await;
        let e = probe(addr, not_ready.port(), None, Duration::from_secs(2)).await.unwrap_err();
        assert!(e.contains("status 503"), "{e}");
        // the gateway port closed
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let e = probe(closed, 0, None, Duration::from_secs(2)).await.unwrap_err();
        assert!(e.starts_with(&format!("connect {closed}")), "{e}");
        // the status port closed
        let e = probe(addr, closed.port(), None, Duration::from_secs(2)).await.unwrap_err();
        assert!(e.contains(&format!("connect 127.0.0.1:{}", closed.port())), "{e}");
        // a status port that accepts and never answers: bounded by the timeout
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let started = Instant::now();
        let e = probe(addr, silent.local_addr().unwrap().port(), None, Duration::from_millis(200)).await.unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    use crate::mesh_config::{GatewayMtls, MtlsTarget};
    use crate::tls::test_ca::{Ca, Leaf};

    const SNI: &str = "outbound_.9080_._.reviews.shop.svc.cluster.local";

    /// A sidecar's inbound mTLS listener as Istio's: the workload certificate `leaf`, client certificates
    /// from `client_root` required, Istio's ALPN. Each accepted handshake reports (SNI, ALPN).
    async fn sidecar(
        leaf: &Leaf,
        client_root: &Ca,
    ) -> (
        SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<(Option<String>, Option<Vec<u8>>)>,
        tokio::task::JoinHandle<()>,
    ) {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(client_root.roots(), crate::tls::provider())
                .build()
                .unwrap();
        let ck = leaf.certified_key();
        let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(ck.as_ref().clone())));
        config.alpn_protocols = crate::tls::INBOUND_MTLS_ALPN.iter().map(|a| a.as_bytes().to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(s).await {
                        let (_, conn) = tls.get_ref();
                        let _ =
                            tx.send((conn.server_name().map(str::to_string), conn.alpn_protocol().map(<[u8]>::to_vec)));
                        let mut buf = [0u8; 64];
                        let _ = tls.read(&mut buf).await;
                    }
                });
            }
        });
        (addr, rx, task)
    }

    /// meshfed's mTLS stage with a certificate of `ca` (files in `dir`), reaching reviews:9080.
    fn mtls_probes(dir: &std::path::Path, ca: &Ca) -> MtlsProbes {
        let me = ca.issue(&["spiffe://cluster.local/ns/istio-system/sa/meshfed"]);
        let (cert, key, root) = (dir.join("cert.pem"), dir.join("key.pem"), dir.join("root.pem"));
        std::fs::write(&cert, &me.cert_pem).unwrap();
        std::fs::write(&key, &me.key_pem).unwrap();
        std::fs::write(&root, &ca.root_pem).unwrap();
        let targets = GatewayMtls {
            default: Some(MtlsTarget { host: "reviews.shop.svc.cluster.local".into(), port: 9080 }),
            networks: Default::default(),
            cert: Some((cert, key)),
            ca: Some(root),
        };
        let (probes, own) = MtlsProbes::new(&targets, "cluster.local", None).unwrap();
        assert!(own.is_some(), "the certificate from the files is returned to be reloaded");
        probes
    }

    #[tokio::test]
    async fn the_mtls_stage_reaches_a_mesh_backend_with_the_service_sni() {
        let dir = tempfile::tempdir().unwrap();
        let mesh = Ca::new("mesh root");
        let probes = mtls_probes(dir.path(), &mesh);
        let h = probes.handshake_for([&NetworkId::new("azure-net")]).unwrap();
        assert_eq!(h.sni, SNI);
        let (addr, mut seen, _t) = sidecar(&mesh.issue(&["spiffe://cluster.local/ns/shop/sa/reviews"]), &mesh).await;
        assert_eq!(probe(addr, 0, Some(&h), Duration::from_secs(5)).await, Ok(()));
        let (sni, alpn) = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await.unwrap().unwrap();
        assert_eq!(sni.as_deref(), Some(SNI));
        assert_eq!(alpn.as_deref(), Some(b"istio-peer-exchange".as_slice()), "Istio's ALPN, first choice");
        // with readiness too
        let (status, _s) = http_server("HTTP/1.1 200 OK").await;
        assert_eq!(probe(addr, status.port(), Some(&h), Duration::from_secs(5)).await, Ok(()));
        // no session is resumed: every probe is a full handshake with the certificate verified
        assert_eq!(probe(addr, 0, Some(&h), Duration::from_secs(5)).await, Ok(()));
    }

    #[tokio::test]
    async fn the_mtls_stage_fails_on_anything_but_a_mesh_backend_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let mesh = Ca::new("mesh root");
        let foreign = Ca::new("another root");
        let h = mtls_probes(dir.path(), &mesh).handshake_for([&NetworkId::new("azure-net")]).unwrap();
        let stage = |addr: SocketAddr| format!("TLS handshake through the gateway {addr} with SNI {SNI}: ");

        // a backend whose certificate another CA issued
        let (addr, _, _t) = sidecar(&foreign.issue(&["spiffe://cluster.local/ns/shop/sa/reviews"]), &mesh).await;
        let e = probe(addr, 0, Some(&h), Duration::from_secs(5)).await.unwrap_err();
        assert!(e.starts_with(&stage(addr)) && e.contains("UnknownIssuer"), "{e}");
        // a mesh certificate of another trust domain
        let (addr, _, _t) = sidecar(&mesh.issue(&["spiffe://other.domain/ns/shop/sa/reviews"]), &mesh).await;
        let e = probe(addr, 0, Some(&h), Duration::from_secs(5)).await.unwrap_err();
        assert!(
            e.starts_with(&stage(addr)) && e.contains("invalid peer certificate: ") && e.contains("trust domain"),
            "{e}"
        );
        // a gateway with no route for the SNI, or no backend: it accepts and closes
        let closing = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closing.local_addr().unwrap();
        let _c = tokio::spawn(async move {
            while let Ok((s, _)) = closing.accept().await {
                drop(s);
            }
        });
        let e = probe(addr, 0, Some(&h), Duration::from_secs(5)).await.unwrap_err();
        assert!(e.starts_with(&stage(addr)) && e.contains("closed before the handshake completed"), "{e}");
        // a peer that answers garbage
        let garbage = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = garbage.local_addr().unwrap();
        let _g = tokio::spawn(async move {
            while let Ok((mut s, _)) = garbage.accept().await {
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n\x16\x03\x03\xff\xff").await;
            }
        });
        let e = probe(addr, 0, Some(&h), Duration::from_secs(5)).await.unwrap_err();
        assert!(e.starts_with(&stage(addr)), "{e}");
        // a gateway that never answers: bounded by the timeout, which names the stage
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let started = Instant::now();
        let e = probe(addr, 0, Some(&h), Duration::from_millis(300)).await.unwrap_err();
        assert!(e.starts_with(&stage(addr)) && e.contains("timed out"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        // the earlier stages still come first
        let (not_ready, _n) = http_server("HTTP/1.1 503 Service Unavailable").await;
        let e = probe(addr, not_ready.port(), Some(&h), Duration::from_secs(2)).await.unwrap_err();
        assert!(e.contains("status 503"), "{e}");
    }

    #[test]
    fn the_mtls_stage_needs_a_certificate_and_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let target = Some(MtlsTarget { host: "reviews.shop.svc.cluster.local".into(), port: 9080 });
        let none = GatewayMtls { default: target, networks: Default::default(), cert: None, ca: None };
        let e = MtlsProbes::new(&none, "cluster.local", None).unwrap_err();
        assert!(e.contains("certFile") && e.contains("--xds-tls-cert"), "{e}");
        // meshfed's mesh certificate without a root: the root must come from caFile
        let mesh = Ca::new("mesh root");
        let me = mesh.issue(&["spiffe://cluster.local/ns/istio-system/sa/meshfed"]);
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, &me.cert_pem).unwrap();
        std::fs::write(&key, &me.key_pem).unwrap();
        let xds_cert = Arc::new(crate::tls::ReloadingCert::load(&cert, &key, crate::tls::provider()).unwrap());
        let mut mc = crate::tls::MeshCertificate { cert: xds_cert, root: None };
        let e = MtlsProbes::new(&none, "cluster.local", Some(&mc)).unwrap_err();
        assert!(e.contains("gatewayProbes.mtls.caFile"), "{e}");
        // with the xDS client CA as the root: reused, nothing loaded of its own
        let root = dir.path().join("root.pem");
        std::fs::write(&root, &mesh.root_pem).unwrap();
        mc.root = Some(root);
        let (_, own) = MtlsProbes::new(&none, "cluster.local", Some(&mc)).unwrap();
        assert!(own.is_none());
        // unreadable or unusable files name their setting
        let missing = GatewayMtls { cert: Some((dir.path().join("nope.pem"), key.clone())), ..none.clone() };
        let e = MtlsProbes::new(&missing, "cluster.local", Some(&mc)).unwrap_err();
        assert!(e.contains("certFile") && e.contains("nope.pem"), "{e}");
        let bad_ca = GatewayMtls { ca: Some(key.clone()), ..none.clone() };
        let e = MtlsProbes::new(&bad_ca, "cluster.local", Some(&mc)).unwrap_err();
        assert!(e.contains("gatewayProbes.mtls.caFile"), "{e}");
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let mut j = Jitter::new();
        for _ in 0..1000 {
            let d = j.around(Duration::from_secs(5));
            assert!(d >= Duration::from_millis(4500) && d <= Duration::from_millis(5500), "{d:?}");
        }
    }
}
