//! The xDS listener's defences, in process (meshfed::xds::server over the demo, real gRPC clients on
//! loopback): TLS with certificate reload, mTLS identities checked against node ids, the message size,
//! connection, stream and request-rate limits with their statuses, and the graceful drain (GOAWAY, streams
//! ended, stragglers closed at the deadline); the debug server's bearer token and TLS; `meshfed serve`'s
//! refusals of unsafe flag combinations.
//!
//! Every wait is bounded by [`TIMEOUT`]. [`QUIET`] is only used to look for something that must not happen
//! (a weaker check on a slow machine, never a flaky one).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use meshfed::grpc::frame::{self, Frame, Head, Reason, setting};
use meshfed::tls::{ReloadingCert, ServerTls};
use meshfed::xds::connections::Connections;
use meshfed::xds::limits::{Limits, ServerStats};
use meshfed::xds::server::{ServeOptions, TlsOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::{Code, Status};

use meshfed_testkit as support;
use support::ads::{AdsClient, Error, Flavor, Request, Response};
use support::fixtures::sidecar_node;

const TIMEOUT: Duration = Duration::from_secs(20);
const QUIET: Duration = Duration::from_millis(400);
const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, fut).await.unwrap_or_else(|_| panic!("timed out after {TIMEOUT:?}: {what}"))
}

/// The demo's meshfed ([`meshfed::app::App`]) with one xDS listener on 127.0.0.1.
struct Server {
    addr: SocketAddr,
    stats: Arc<ServerStats>,
    connections: Arc<Connections>,
    push: meshfed::push::PushHandle,
    app: Option<meshfed::app::App>,
}

impl Server {
    async fn start(limits: Limits, tls: Option<TlsOptions>) -> Server {
        let (mesh, initial) = support::demo::demo_events();
        let stats = Arc::new(ServerStats::default());
        let mut options = meshfed::app::Options::in_process(mesh, initial);
        options.xds.push(meshfed::app::XdsListener {
            listen: meshfed::app::Listen::loopback(),
            options: ServeOptions { limits, tls, stats: stats.clone() },
        });
        let app = meshfed::app::App::start(options).await.unwrap();
        Server {
            addr: app.xds_address(),
            stats,
            connections: app.connections.clone(),
            push: app.push.clone(),
            app: Some(app),
        }
    }

    fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr)).unwrap().connect_lazy()
    }

    /// Shuts down and waits (bounded) for the listener to finish draining.
    async fn stop(&mut self) {
        if let Some(app) = self.app.take() {
            bounded("the server to drain", app.shutdown(Duration::from_secs(10))).await;
        }
    }
}

const SHOP_NODE: &str = "sidecar~127.0.50.1~client-0.shop~shop.svc.cluster.local";
const BANK_NODE: &str = "sidecar~127.0.50.2~teller-0.bank~bank.svc.cluster.local";

fn cds_request(node_id: Option<&str>) -> Request {
    Request { node: node_id.map(sidecar_node), ..Request::new(CLUSTER) }
}

/// A SotW stream on `channel` whose requests carry their own node.
async fn open(channel: Channel) -> Result<AdsClient, Error> {
    Ok(AdsClient::open(channel, Flavor::Sotw, None).await?.with_timeouts(TIMEOUT, QUIET))
}

/// Opens a stream and fetches the clusters as `node_id`: the first response or the refusal. (A refused
/// stream may already be closed when the request is sent: its status comes with the response.) Fails
/// the test if either takes longer than [`TIMEOUT`]: a hanging server is neither a response nor a refusal.
async fn fetch(channel: Channel, node_id: &str) -> Result<Response, Error> {
    let fetched = async {
        let mut s = open(channel).await?;
        let _ = s.send(cds_request(Some(node_id))).await;
        s.recv().await
    }
    .await;
    if let Err(e @ Error::Timeout { .. }) = &fetched {
        panic!("fetching the clusters as {node_id}: {e}");
    }
    fetched
}

/// The status of a refused or failed stream.
fn refusal(e: Error) -> Status {
    match e {
        Error::Status(s) => s,
        other => panic!("expected a status, got: {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// TLS and mTLS
// ---------------------------------------------------------------------------------------------

struct Pki {
    _dir: tempfile::TempDir,
    ca: support::TestCa,
    server: support::MeshIdentity,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = support::TestCa::new(dir.path()).unwrap();
        let server = ca.issue_server("xds", &["meshfed.test"], &["127.0.0.1".parse().unwrap()]).unwrap();
        Pki { _dir: dir, ca, server }
    }

    fn tls(&self, mtls: bool) -> (Arc<ReloadingCert>, TlsOptions) {
        let cert =
            Arc::new(ReloadingCert::load(&self.server.cert, &self.server.key, meshfed::tls::provider()).unwrap());
        let tls = ServerTls {
            cert: cert.clone(),
            client_ca: mtls.then(|| self.ca.root().to_path_buf()),
            alpn: vec![b"h2".to_vec()],
        };
        (cert, TlsOptions { config: tls.server_config().unwrap(), trust_domain: "cluster.local".into() })
    }

    fn channel(&self, addr: SocketAddr, client: Option<&support::MeshIdentity>) -> Channel {
        let config = meshfed_testkit::tls_client::client_config(
            self.ca.root(),
            client.map(|c| (c.cert.as_path(), c.key.as_path())),
        )
        .unwrap();
        meshfed_testkit::tls_client::grpc_channel(addr, "127.0.0.1", config).unwrap()
    }
}

/// The certificate a fresh TLS handshake with `addr` gets (DER of the leaf).
async fn served_certificate(addr: SocketAddr, ca: &Path) -> Vec<u8> {
    let config = meshfed_testkit::tls_client::client_config(ca, None).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = bounded("a TLS handshake", tokio_rustls::TlsConnector::from(config).connect(name, tcp)).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn pem_leaf(path: &Path) -> Vec<u8> {
    meshfed::tls::load_certs(path).unwrap()[0].to_vec()
}

#[tokio::test]
async fn tls_serves_ads_and_reloads_the_certificate() {
    let pki = Pki::new();
    let (cert, tls) = pki.tls(false);
    let server = Server::start(Limits::default(), Some(tls)).await;
    let watcher = meshfed::tls::watch_files(cert.clone(), Duration::from_millis(50), "test");

    let mut old = open(pki.channel(server.addr, None)).await.unwrap();
    old.send(cds_request(Some(SHOP_NODE))).await.unwrap();
    let first = old.recv().await.unwrap();
    assert!(!first.resources.is_empty(), "clusters over TLS");
    assert_eq!(served_certificate(server.addr, pki.ca.root()).await, pem_leaf(&pki.server.cert));

    // rotate: a new certificate for the same names, written over the files
    let renewed = pki.ca.issue_server("xds-renewed", &["meshfed.test"], &["127.0.0.1".parse().unwrap()]).unwrap();
    // half a rotation (new certificate, old key) is not served
    std::fs::copy(&renewed.cert, &pki.server.cert).unwrap();
    tokio::time::sleep(QUIET).await;
    let served = served_certificate(server.addr, pki.ca.root()).await;
    assert_ne!(served, pem_leaf(&renewed.cert), "a certificate without its key must not be served");
    std::fs::copy(&renewed.key, &pki.server.key).unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if served_certificate(server.addr, pki.ca.root()).await == pem_leaf(&renewed.cert) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the renewed certificate was not served within {TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // the established connection keeps working: a new stream on it gets its clusters
    let _ = old.send(Request { nonce: first.nonce.clone(), ..cds_request(None) }).await;
    let again = fetch(pki.channel(server.addr, None), SHOP_NODE).await.unwrap();
    assert_eq!(again.resources.len(), first.resources.len());
    watcher.abort();
}

#[tokio::test]
async fn mtls_checks_the_identity_against_the_node_id() {
    let pki = Pki::new();
    let (_cert, tls) = pki.tls(true);
    let server = Server::start(Limits::default(), Some(tls)).await;
    let shop = pki.ca.issue("shop", "spiffe://cluster.local/ns/shop/sa/default").unwrap();
    let system = pki.ca.issue("system", "spiffe://cluster.local/ns/istio-system/sa/istiod").unwrap();
    let foreign = pki.ca.issue("foreign", "spiffe://other.domain/ns/shop/sa/default").unwrap();

    // the right identity for its namespace: served
    let ok = fetch(pki.channel(server.addr, Some(&shop)), SHOP_NODE).await.unwrap();
    assert!(!ok.resources.is_empty());
    // a shop identity asking for bank's config: PERMISSION_DENIED, naming both
    let denied = refusal(fetch(pki.channel(server.addr, Some(&shop)), BANK_NODE).await.unwrap_err());
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("ns/shop") && denied.message().contains("bank"), "{denied:?}");
    // even the system namespace's identity gets only its own namespace's view
    let denied = refusal(fetch(pki.channel(server.addr, Some(&system)), SHOP_NODE).await.unwrap_err());
    assert_eq!(denied.code(), Code::PermissionDenied);
    // another trust domain: refused
    let denied = refusal(fetch(pki.channel(server.addr, Some(&foreign)), SHOP_NODE).await.unwrap_err());
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("trust domain"), "{denied:?}");
    // no client certificate, or one from another CA: no TLS session, so no stream
    let err = refusal(fetch(pki.channel(server.addr, None), SHOP_NODE).await.unwrap_err());
    assert_ne!(err.code(), Code::Ok);
    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = support::TestCa::new(other_dir.path()).unwrap();
    let stranger = other_ca.issue("stranger", "spiffe://cluster.local/ns/shop/sa/default").unwrap();
    let err = refusal(fetch(pki.channel(server.addr, Some(&stranger)), SHOP_NODE).await.unwrap_err());
    assert_ne!(err.code(), Code::Ok);
    assert!(server.stats.failed_handshakes.load(Ordering::Relaxed) >= 2);

    // istioctl's debug types over ADS show a workload identity only its own namespace's proxies
    let mut keep = open(pki.channel(server.addr, Some(&shop))).await.unwrap();
    keep.send(cds_request(Some(SHOP_NODE))).await.unwrap();
    keep.recv().await.unwrap();
    let bank = pki.ca.issue("bank", "spiffe://cluster.local/ns/bank/sa/default").unwrap();
    let mut bank_stream = open(pki.channel(server.addr, Some(&bank))).await.unwrap();
    bank_stream.send(cds_request(Some(BANK_NODE))).await.unwrap();
    bank_stream.recv().await.unwrap();
    let syncz = |id: &'static str| Request {
        node: Some(support::fixtures::node(id, &[("GENERATOR", "event")], None)),
        ..Request::new(meshfed::type_url::TYPE_DEBUG_SYNCZ)
    };
    let mut debug = open(pki.channel(server.addr, Some(&bank))).await.unwrap();
    debug.send(syncz("sidecar~127.0.50.3~istioctl.bank~bank.svc.cluster.local")).await.unwrap();
    let seen = debug.recv().await.unwrap();
    assert_eq!(seen.resources.len(), 1, "bank's identity sees bank's proxy only");
    let mut debug = open(pki.channel(server.addr, Some(&system))).await.unwrap();
    debug.send(syncz("sidecar~127.0.50.4~istioctl.istio-system~istio-system.svc.cluster.local")).await.unwrap();
    let seen = debug.recv().await.unwrap();
    assert!(seen.resources.len() >= 2, "the system namespace's identity sees every proxy");

    // config dumps carry no secrets: meshfed serves none, and the dump's SecretsConfigDump stays empty
    let conn = server.connections.find("client-0.shop").expect("shop's proxy is connected");
    let dump = meshfed::debug::config_dump::config_dump(&conn, &server.push.snapshot(), true).unwrap();
    let secrets: Vec<_> = dump.configs.iter().filter(|a| a.type_url.ends_with("SecretsConfigDump")).collect();
    assert_eq!(secrets.len(), 1);
    use prost::Message as _;
    let secrets = envoy_types::pb::envoy::admin::v3::SecretsConfigDump::decode(secrets[0].value.as_slice()).unwrap();
    assert!(secrets.static_secrets.is_empty() && secrets.dynamic_active_secrets.is_empty());
    assert!(secrets.dynamic_warming_secrets.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

/// `meshfed_xds_refused_total{reason="REASON"}` in the exposition `/metrics` serves (these tests run the
/// server in process, so its registry is this process's; tests running in parallel only add to it).
fn refused(reason: &str) -> u64 {
    let text = meshfed::metrics::global().encode().unwrap();
    let series = format!("meshfed_xds_refused_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series}in /metrics:\n{text}"))
}

#[tokio::test]
async fn an_oversized_request_gets_resource_exhausted_and_others_are_unaffected() {
    let server = Server::start(Limits { max_message_size: 1024, ..Limits::default() }, None).await;
    let counted = refused("message_size");
    let mut big = open(server.channel()).await.unwrap();
    let mut req = cds_request(Some(SHOP_NODE));
    req.names = (0..100).map(|i| format!("outbound|9080||service-{i}.shop.svc.cluster.local")).collect();
    let _ = big.send(req).await;
    let err = refusal(big.recv().await.unwrap_err());
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("1024"), "{err:?}");
    assert!(refused("message_size") > counted, "the refusal is counted in meshfed_xds_refused_total");
    // another client on another connection is served as usual
    assert!(!fetch(server.channel(), SHOP_NODE).await.unwrap().resources.is_empty());
}

#[tokio::test]
async fn connections_over_the_limit_get_resource_exhausted_until_a_slot_frees() {
    let limits = Limits { max_connections: 2, ..Limits::default() };
    let server = Server::start(limits, None).await;
    let mut a = open(server.channel()).await.unwrap();
    a.send(cds_request(Some(SHOP_NODE))).await.unwrap();
    a.recv().await.unwrap();
    let b_channel = server.channel();
    let mut b = open(b_channel.clone()).await.unwrap();
    b.send(cds_request(Some(SHOP_NODE))).await.unwrap();
    b.recv().await.unwrap();
    // a third connection: refused with RESOURCE_EXHAUSTED (and counted), the two others keep working
    let counted = refused("connections");
    let third = server.channel();
    let err = refusal(fetch(third.clone(), SHOP_NODE).await.unwrap_err());
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("connection limit"), "{err:?}");
    assert!(refused("connections") > counted, "the refusal is counted in meshfed_xds_refused_total");
    assert!(fetch(b_channel.clone(), SHOP_NODE).await.is_ok(), "an admitted connection opens more streams");
    // the first client leaves: its slot goes to the third connection (retrying on the same connection)
    drop(a);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        match fetch(third.clone(), SHOP_NODE).await {
            Ok(r) => {
                assert!(!r.resources.is_empty());
                break;
            }
            Err(e) => {
                let e = refusal(e);
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no slot freed within {TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(b);
    assert!(server.stats.refused_streams.load(Ordering::Relaxed) >= 1);
}

#[tokio::test]
async fn streams_over_the_connection_limit_wait_for_a_slot_and_a_client_ignoring_the_limit_is_refused() {
    let server = Server::start(Limits { max_streams_per_connection: 2, ..Limits::default() }, None).await;
    let channel = server.channel();
    let mut s1 = open(channel.clone()).await.unwrap();
    let mut s2 = open(channel.clone()).await.unwrap();
    s1.send(cds_request(Some(SHOP_NODE))).await.unwrap();
    s1.recv().await.unwrap();
    // HTTP/2 advertises the limit: a third concurrent stream waits in the client (tonic/h2), not refused
    let counted = refused("streams");
    let third = tokio::spawn(fetch(channel.clone(), SHOP_NODE));
    tokio::time::sleep(QUIET).await;
    assert!(!third.is_finished(), "the third stream waits for a slot");
    // the two open streams are unaffected
    s2.send(cds_request(Some(SHOP_NODE))).await.unwrap();
    assert!(!s2.recv().await.unwrap().resources.is_empty());
    // a slot frees when a stream ends, and the waiting stream is served
    drop(s1);
    let r = bounded("the waiting stream", third).await.unwrap().unwrap();
    assert!(!r.resources.is_empty());
    assert_eq!(refused("streams"), counted, "a client that waits for a slot is not refused");

    // a client that ignores the advertised limit has its extra stream refused by HTTP/2 (REFUSED_STREAM:
    // not processed, so it may be retried), and counted
    let mut raw = RawH2::connect(server.addr).await;
    let settings = raw.settings().await;
    assert!(settings.contains(&(setting::MAX_CONCURRENT_STREAMS, 2)), "{settings:?}");
    for stream in [1, 3, 5] {
        raw.open_ads_stream(stream).await;
    }
    assert_eq!(raw.reset().await, (5, Reason::RefusedStream as u32));
    assert!(refused("streams") > counted, "the refusal is counted in meshfed_xds_refused_total");
    assert!(server.stats.refused_streams.load(Ordering::Relaxed) >= 1);
}

/// A raw HTTP/2 client: what a well-behaved client (tonic, Envoy) never sends.
struct RawH2 {
    tcp: tokio::net::TcpStream,
    buf: BytesMut,
}

impl RawH2 {
    async fn connect(addr: SocketAddr) -> RawH2 {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut b = BytesMut::from(&frame::PREFACE[..]);
        frame::settings(&mut b, &[]);
        tcp.write_all(&b).await.unwrap();
        RawH2 { tcp, buf: BytesMut::new() }
    }

    async fn next(&mut self) -> Frame {
        loop {
            if let Some(h) = Head::parse(&self.buf)
                && self.buf.len() >= frame::HEADER_LEN + h.len as usize
            {
                let _ = self.buf.split_to(frame::HEADER_LEN);
                let payload = self.buf.split_to(h.len as usize).freeze();
                return frame::parse(h, payload).unwrap();
            }
            let n = bounded("a frame", self.tcp.read_buf(&mut self.buf)).await.unwrap();
            assert!(n > 0, "the server closed the connection");
        }
    }

    /// The server's SETTINGS.
    async fn settings(&mut self) -> Vec<(u16, u32)> {
        loop {
            if let Frame::Settings { ack: false, params } = self.next().await {
                return params;
            }
        }
    }

    /// The next RST_STREAM: (stream, code).
    async fn reset(&mut self) -> (u32, u32) {
        loop {
            if let Frame::RstStream { stream, code } = self.next().await {
                return (stream, code);
            }
        }
    }

    /// Opens an ADS stream (its header block in literals, no HPACK table).
    async fn open_ads_stream(&mut self, stream: u32) {
        let fields = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"),
            (":authority", "meshfed"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ];
        let mut block = Vec::new();
        for (name, value) in fields {
            block.extend_from_slice(&[0, name.len() as u8]);
            block.extend_from_slice(name.as_bytes());
            block.push(value.len() as u8);
            block.extend_from_slice(value.as_bytes());
        }
        let mut b = BytesMut::new();
        frame::headers(&mut b, stream, &block, false);
        self.tcp.write_all(&b).await.unwrap();
    }
}

#[tokio::test]
async fn a_client_over_its_request_rate_gets_resource_exhausted_and_others_are_unaffected() {
    let limits = Limits { request_rate: 1, request_burst: 5, ..Limits::default() };
    let server = Server::start(limits, None).await;
    let mut calm = open(server.channel()).await.unwrap();
    calm.send(cds_request(Some(SHOP_NODE))).await.unwrap();
    let first = calm.recv().await.unwrap();

    let counted = refused("request_rate");
    let mut noisy = open(server.channel()).await.unwrap();
    noisy.send(cds_request(Some(SHOP_NODE))).await.unwrap();
    let r = noisy.recv().await.unwrap();
    // 50 requests (ACKs of the same response: each is processed, none answered)
    for _ in 0..50 {
        let _ = noisy.send(Request { nonce: r.nonce.clone(), ..cds_request(None) }).await;
    }
    let err = refusal(noisy.recv().await.unwrap_err());
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("rate"), "{err:?}");
    assert!(server.stats.rate_limited.load(Ordering::Relaxed) >= 1);
    assert!(refused("request_rate") > counted, "the refusal is counted in meshfed_xds_refused_total");
    // the calm client's stream is still served: it ACKs and subscribes to endpoints
    calm.send(Request { nonce: first.nonce.clone(), ..cds_request(None) }).await.unwrap();
    let eds = Request::new(meshfed::type_url::ENDPOINT).names(&["outbound|9080||reviews.shop.svc.cluster.local"]);
    calm.send(eds).await.unwrap();
    let eds = calm.recv().await.unwrap();
    assert_eq!(eds.resources.len(), 1);
}

#[test]
fn token_bucket_refills_at_its_rate() {
    use meshfed::xds::limits::TokenBucket;
    let mut b = TokenBucket::new(10, 3);
    let t0 = std::time::Instant::now();
    assert!(b.take(t0) && b.take(t0) && b.take(t0));
    assert!(!b.take(t0), "the burst is spent");
    assert!(!b.take(t0 + Duration::from_millis(50)), "half a token");
    assert!(b.take(t0 + Duration::from_millis(110)), "one token after 100 ms");
    assert!(b.take(t0 + Duration::from_secs(60)) && b.take(t0 + Duration::from_secs(60)));
    assert!(b.take(t0 + Duration::from_secs(60)));
    assert!(!b.take(t0 + Duration::from_secs(60)), "never more than the burst");
}

/// Reads (and drops) whatever the server sends until it closes the connection (EOF or a reset), bounded
/// by [`TIMEOUT`].
async fn closed_by_server(tcp: &mut tokio::net::TcpStream, what: &str) {
    let mut buf = [0u8; 4096];
    bounded(what, async {
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_admission_timeout() {
    let limits = Limits { admission_timeout: Duration::from_millis(300), ..Limits::default() };
    let server = Server::start(limits, None).await;
    let counted = refused("admission_timeout");
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // the server's HTTP/2 preface may arrive first; then EOF (or a reset) once the timeout closes it
    closed_by_server(&mut tcp, "the idle connection to be closed").await;
    // counted as the timer closed it
    assert!(refused("admission_timeout") > counted, "the closing is counted in meshfed_xds_refused_total");
}

/// `--keepalive-interval` / `--keepalive-timeout` reach the transport: a client that completes the
/// handshake and then never answers a PING is closed after interval + timeout; with the interval at 0s
/// no PING is sent at all.
#[tokio::test]
async fn the_keepalive_limits_close_a_client_that_never_answers_a_ping() {
    let limits = Limits {
        keepalive_interval: Duration::from_millis(100),
        keepalive_timeout: Duration::from_millis(100),
        ..Limits::unlimited()
    };
    let server = Server::start(limits, None).await;
    let mut h2 = RawH2::connect(server.addr).await;
    h2.settings().await;
    h2.open_ads_stream(1).await;
    let pinged = bounded("the server's keepalive PING", async {
        loop {
            if let Frame::Ping { ack: false, .. } = h2.next().await {
                return Instant::now();
            }
        }
    })
    .await;
    // unanswered: the connection is closed once the timeout has passed
    closed_by_server(&mut h2.tcp, "the connection to be closed for its unanswered PING").await;
    assert!(pinged.elapsed() >= Duration::from_millis(90), "closed {:?} after the PING", pinged.elapsed());

    let quiet = Limits { keepalive_interval: Duration::ZERO, ..Limits::unlimited() };
    let server = Server::start(quiet, None).await;
    let mut h2 = RawH2::connect(server.addr).await;
    h2.settings().await;
    h2.open_ads_stream(1).await;
    let ping = tokio::time::timeout(Duration::from_millis(600), async {
        loop {
            if let Frame::Ping { ack: false, .. } = h2.next().await {
                return;
            }
        }
    })
    .await;
    assert!(ping.is_err(), "no keepalive PING with the interval at 0s");
}

// ---------------------------------------------------------------------------------------------
// Drain
// ---------------------------------------------------------------------------------------------

/// Reads HTTP/2 frames from a raw connection until a GOAWAY (type 7) arrives; false on EOF first.
async fn read_until_goaway(tcp: &mut tokio::net::TcpStream) -> bool {
    loop {
        let mut header = [0u8; 9];
        if tcp.read_exact(&mut header).await.is_err() {
            return false;
        }
        let len = (usize::from(header[0]) << 16) | (usize::from(header[1]) << 8) | usize::from(header[2]);
        let mut payload = vec![0u8; len];
        if tcp.read_exact(&mut payload).await.is_err() {
            return false;
        }
        if header[3] == 7 {
            return true;
        }
    }
}

/// A raw HTTP/2 client connection: the preface, an empty SETTINGS frame, and a PING whose ACK shows that
/// the server has completed its side of the handshake.
async fn raw_h2(addr: SocketAddr) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    tcp.write_all(&[0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]).await.unwrap();
    bounded("the PING's ACK", async {
        loop {
            let mut header = [0u8; 9];
            tcp.read_exact(&mut header).await.unwrap();
            let len = (usize::from(header[0]) << 16) | (usize::from(header[1]) << 8) | usize::from(header[2]);
            let mut payload = vec![0u8; len];
            tcp.read_exact(&mut payload).await.unwrap();
            match (header[3], header[4] & 1) {
                // SETTINGS from the server: ACK it, as a client must
                (4, 0) => tcp.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await.unwrap(),
                (6, 1) => return,
                _ => {}
            }
        }
    })
    .await;
    tcp
}

#[tokio::test]
async fn shutdown_sends_goaway_ends_streams_and_stops_accepting() {
    let mut server = Server::start(Limits::default(), None).await;
    let mut stream = open(server.channel()).await.unwrap();
    stream.send(cds_request(Some(SHOP_NODE))).await.unwrap();
    stream.recv().await.unwrap();
    let mut raw = raw_h2(server.addr).await;
    let addr = server.addr;

    let stop = async { server.stop().await };
    let checks = async {
        assert!(bounded("a GOAWAY", read_until_goaway(&mut raw)).await, "the connection closed without GOAWAY");
        let err = refusal(stream.recv().await.unwrap_err());
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(err.message().contains("shutting down"), "{err:?}");
    };
    tokio::join!(stop, checks);
    // no new connections: the listener is closed
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "still accepting after the drain");
}

#[tokio::test]
async fn the_drain_deadline_closes_connections_that_linger() {
    let limits = Limits { drain_timeout: Duration::from_millis(500), ..Limits::default() };
    let mut server = Server::start(limits, None).await;
    // a raw client that opens a stream and never finishes it
    let mut raw = raw_h2(server.addr).await;
    // HEADERS (HPACK, no Huffman): :method POST, :scheme http, then literals without indexing
    let mut block = vec![0x83u8, 0x86];
    let mut literal = |name_index: u8, name: &[u8], value: &[u8]| {
        block.push(name_index);
        if name_index == 0 {
            block.push(name.len() as u8);
            block.extend_from_slice(name);
        }
        block.push(value.len() as u8);
        block.extend_from_slice(value);
    };
    literal(4, b"", b"/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources");
    literal(1, b"", b"127.0.0.1");
    literal(0, b"content-type", b"application/grpc");
    literal(0, b"te", b"trailers");
    let len = block.len();
    let mut frame = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, 1, 0x4, 0, 0, 0, 1];
    frame.extend_from_slice(&block);
    raw.write_all(&frame).await.unwrap();
    bounded("a stream to be opened", async {
        while server.stats.admitted.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // the server drains, the client ignores it: the deadline closes the connection and serve returns
    server.stop().await;
    closed_by_server(&mut raw, "the lingering connection to be closed").await;
}

// ---------------------------------------------------------------------------------------------
// The debug server
// ---------------------------------------------------------------------------------------------

async fn debug_server(access: meshfed::debug::DebugAccess) -> meshfed::app::App {
    let (mesh, initial) = support::demo::demo_events();
    let mut options = meshfed::app::Options::in_process(mesh, initial);
    options.debug = Some(meshfed::app::DebugListener { listen: meshfed::app::Listen::loopback(), access, demo: false });
    meshfed::app::App::start(options).await.unwrap()
}

async fn raw_get(
    stream: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = bounded("a debug response", stream.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn the_debug_server_requires_its_bearer_token() {
    let token = "0123456789abcdef-test-token";
    let access = meshfed::debug::DebugAccess { token: Some(token.into()), tls: None };
    let app = debug_server(access).await;
    let addr = app.debug_address().unwrap();
    let get = |path: &'static str, token: Option<&'static str>| async move {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        raw_get(&mut tcp, path, token).await.0
    };
    assert_eq!(get("/debug/syncz", None).await, 401);
    assert_eq!(get("/debug/syncz", Some("wrong-token-0123456789")).await, 401);
    assert_eq!(get("/debug/config_dump?proxyID=a.b", Some("0123456789abcdef-test-toke")).await, 401);
    assert_eq!(get("/debug/syncz", Some(token)).await, 200);
    assert_eq!(get("/metrics", None).await, 401);
    // the probes stay open, and the web UI's static files (they hold no data; the page asks for the token)
    for open in ["/healthz", "/ready", "/", "/ui/proxy", "/ui/app.js", "/ui/style.css", "/favicon.ico"] {
        assert_eq!(get(open, None).await, 200, "{open}");
    }
    // the web UI's cookie carries the token as well as the Authorization header
    let cookie_get = |path: &'static str, cookie: &'static str| async move {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let _ = bounded("a debug response", tcp.read_to_end(&mut raw)).await;
        String::from_utf8_lossy(&raw).split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok()).unwrap_or(0)
    };
    assert_eq!(cookie_get("/debug/syncz", "a=b; meshfed-debug-token=0123456789abcdef-test-token").await, 200);
    assert_eq!(cookie_get("/metrics", "meshfed-debug-token=0123456789abcdef-test-token").await, 200);
    assert_eq!(cookie_get("/debug/syncz", "meshfed-debug-token=wrong-token-0123456789").await, 401);
    assert_eq!(cookie_get("/debug/syncz", "other-meshfed-debug-token=0123456789abcdef-test-token").await, 401);
}

#[tokio::test]
async fn the_debug_server_serves_https() {
    let dir = tempfile::tempdir().unwrap();
    let ca = support::TestCa::new(dir.path()).unwrap();
    let id = ca.issue_server("debug", &[], &["127.0.0.1".parse().unwrap()]).unwrap();
    let cert = Arc::new(ReloadingCert::load(&id.cert, &id.key, meshfed::tls::provider()).unwrap());
    let tls = ServerTls { cert, client_ca: None, alpn: vec![b"http/1.1".to_vec()] };
    let access = meshfed::debug::DebugAccess { token: None, tls: Some(tls.server_config().unwrap()) };
    let app = debug_server(access).await;
    let addr = app.debug_address().unwrap();
    let mut config = (*meshfed_testkit::tls_client::client_config(ca.root(), None).unwrap()).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    let (status, body) = raw_get(&mut tls, "/debug/syncz", None).await;
    assert_eq!(status, 200, "{body}");
    // plain HTTP on the HTTPS port gets no answer
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (status, _) = raw_get(&mut tcp, "/debug/syncz", None).await;
    assert_ne!(status, 200);
}

// ---------------------------------------------------------------------------------------------
// `meshfed serve` refuses unsafe flag combinations
// ---------------------------------------------------------------------------------------------

fn serve_fails_with(args: &[&str], expected: &str) {
    let mut cmd = std::process::Command::new(support::meshfed_path());
    cmd.arg("serve").args(args);
    let mut guard = support::ChildGuard::spawn("meshfed-refuses", &mut cmd).unwrap();
    let status = guard.wait_exit(TIMEOUT).unwrap();
    assert!(!status.success(), "meshfed serve {args:?} started");
    let stderr = guard.stderr();
    assert!(stderr.contains(expected), "meshfed serve {args:?}: expected {expected:?} in\n{stderr}");
}

#[test]
fn serve_refuses_an_exposed_debug_server_without_protection() {
    let xds = format!("127.0.0.1:{}", support::free_port());
    serve_fails_with(&["--xds-address", &xds, "--debug-address", "0.0.0.0:0"], "--debug-expose");
    serve_fails_with(&["--xds-address", &xds, "--debug-address", "0.0.0.0:0", "--debug-expose"], "needs TLS");
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("token");
    std::fs::write(&short, "short\n").unwrap();
    serve_fails_with(
        &["--debug-address", "0.0.0.0:0", "--debug-expose", "--debug-token-file", short.to_str().unwrap()],
        "shorter than 16",
    );
    serve_fails_with(&["--no-plaintext-xds"], "--no-plaintext-xds needs --xds-tls-cert");
    serve_fails_with(&["--xds-address", &xds, "--keepalive-timeout", "0s"], "--keepalive-timeout 0s");
    let missing = PathBuf::from("/nonexistent/meshfed.pem");
    serve_fails_with(
        &[
            "--xds-address",
            &xds,
            "--debug-address",
            "127.0.0.1:0",
            "--xds-tls-address",
            "127.0.0.1:0",
            "--xds-tls-cert",
            missing.to_str().unwrap(),
            "--xds-tls-key",
            missing.to_str().unwrap(),
            "--tls-wait",
            "0s",
        ],
        "does not exist",
    );
}

/// The mesh certificate istio-agent writes shortly after meshfed's container starts: meshfed waits for it
/// (--tls-wait) instead of exiting, then serves mTLS with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_waits_for_the_mesh_certificate_files() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = meshfed_testkit::server::copy_demo(dir.path(), 118);
    let pki = Pki::new();
    let later = dir.path().join("istio-output-certs");
    let (cert, key) = (later.join("cert-chain.pem"), later.join("key.pem"));
    let options = support::MeshfedOptions {
        xds_tls: Some((cert.clone(), key.clone(), Some(pki.ca.root().to_path_buf()))),
        ..Default::default()
    };
    let (server_cert, server_key) = (pki.server.cert.clone(), pki.server.key.clone());
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        std::fs::create_dir_all(&later).unwrap();
        std::fs::copy(&server_key, &key).unwrap();
        std::fs::copy(&server_cert, &cert).unwrap();
    });
    let meshfed = support::start_meshfed_with(&mesh, &options).await.expect("meshfed starts once the files exist");
    writer.await.unwrap();
    let log = meshfed.guard.stderr() + &meshfed.guard.stdout();
    assert!(log.contains("waiting for the TLS files"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// A real Envoy over mTLS (the `meshfed bootstrap --xds-tls-*` output, end to end)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_envoy_gets_its_config_over_mtls_only() {
    const OCTET: u8 = 115;
    let dir = tempfile::tempdir().unwrap();
    let mesh = meshfed_testkit::server::copy_demo(dir.path(), OCTET);
    let pki = Pki::new();
    let options = support::MeshfedOptions {
        xds_tls: Some((pki.server.cert.clone(), pki.server.key.clone(), Some(pki.ca.root().to_path_buf()))),
        ..Default::default()
    };
    let meshfed = support::start_meshfed_with(&mesh, &options).await.expect("meshfed with mTLS");
    let identity = pki.ca.issue("envoy-shop", "spiffe://cluster.local/ns/shop/sa/default").unwrap();
    let node = format!("sidecar~127.{OCTET}.50.1~client-0.shop~shop.svc.cluster.local");
    let spec = support::BootstrapSpec {
        cluster_id: Some("aws-use1".into()),
        network: Some("aws-net".into()),
        locality: Some("us-east-1/us-east-1a".into()),
        xds_tls: Some(support::XdsTlsSpec { ca: pki.ca.root().to_path_buf(), client: Some(identity) }),
        ..support::BootstrapSpec::new(&node, meshfed.xds_port)
    };
    let envoy = support::start_envoy(&support::bootstrap_with(&spec)).await.expect("Envoy over mTLS");
    let hosts = envoy.cluster_hosts("outbound|9080||reviews.shop.svc.cluster.local").await.unwrap();
    assert!(!hosts.is_empty(), "Envoy got no endpoints over mTLS");
    assert!(meshfed.ads_connection(&node).await.unwrap().is_some());
    meshfed.assert_no_nacks().await.unwrap();
    for (name, value) in envoy.update_rejected_stats().await.unwrap() {
        assert_eq!(value, 0, "{name}");
    }
    // the same port refuses a plaintext client: no TLS, no stream
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", meshfed.xds_address())).unwrap();
    let refused = match tokio::time::timeout(TIMEOUT, plain.connect()).await {
        Ok(Ok(channel)) => fetch(channel, &node).await.is_err(),
        _ => true,
    };
    assert!(refused, "a plaintext client was served on the mTLS port");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_binary_and_exits() {
    const OCTET: u8 = 117;
    let dir = tempfile::tempdir().unwrap();
    let mesh = meshfed_testkit::server::copy_demo(dir.path(), OCTET);
    let options = support::MeshfedOptions { args: vec!["--drain-timeout".into(), "3s".into()], ..Default::default() };
    let mut meshfed = support::start_meshfed_with(&mesh, &options).await.expect("meshfed");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", meshfed.xds_address())).unwrap();
    let mut stream = open(channel.connect_lazy()).await.unwrap();
    stream
        .send(cds_request(Some(&format!("sidecar~127.{OCTET}.50.1~client-0.shop~shop.svc.cluster.local"))))
        .await
        .unwrap();
    stream.recv().await.unwrap();
    let pid = meshfed.guard.id().expect("running");
    let status = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(status.success());
    // the stream is ended so that the proxy reconnects elsewhere, and meshfed exits cleanly
    let err = refusal(stream.recv().await.unwrap_err());
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let exit = meshfed.guard.wait_exit(TIMEOUT).unwrap();
    assert!(exit.success(), "meshfed exited with {exit}");
    assert!(meshfed.guard.stderr().contains("drained"), "{}", meshfed.guard.stderr());
}
