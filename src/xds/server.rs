//! The xDS listeners: accept loop, TLS termination, limits and graceful drain.
//!
//! meshfed terminates TLS itself (tokio-rustls) and serves each connection with its own gRPC transport
//! ([`crate::grpc`]), one task per connection. Each connection carries a [`ConnInfo`] with the client's
//! verified identity ([`PeerAuth`]), its admission under the connection limit and its request-rate
//! bucket; the ADS service sees it when it opens a stream.
//!
//! Limits ([`Limits`], every one with a flag and a default in `meshfed serve`):
//! - **message size**: requests larger than `max_message_size` end their stream with RESOURCE_EXHAUSTED
//!   (refused from the gRPC length prefix, before they are buffered);
//! - **streams per connection**: HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` is the limit, so a client
//!   (Envoy, gRPC, tonic) queues its further streams until one ends; a stream opened beyond it anyway is
//!   refused by the transport (RST_STREAM REFUSED_STREAM, RFC 9113 §5.1.2: not processed, retryable) and
//!   counted. [`ConnState::open_stream`] keeps the same limit on the ADS streams themselves
//!   (RESOURCE_EXHAUSTED), for a stream whose HTTP/2 side has closed while its work is still ending;
//! - **connections**: a connection is admitted when it opens its first stream, while fewer than
//!   `max_connections` are; otherwise that stream (and every later one, until a slot frees) gets
//!   RESOURCE_EXHAUSTED. Sockets beyond `max_connections + PENDING_CONNECTIONS` are closed at accept, and a
//!   connection that opens no admitted stream within `admission_timeout` (30 s) is closed;
//! - **request rate**: a token bucket per connection (`request_rate` per second, `request_burst`); a
//!   request over it ends its stream with RESOURCE_EXHAUSTED. Other connections are unaffected.
//!
//! Graceful shutdown ([`serve`]): when `shutdown` resolves the listener is closed (no new connections),
//! every connection is sent an HTTP/2 GOAWAY, every ADS stream is ended with UNAVAILABLE so its proxy
//! reconnects — to another replica, as this one no longer accepts — and the connections get
//! `drain_timeout` to close; whatever is left then is closed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::AdsService;
use crate::metrics::Refusal;
use crate::tls::PeerAuth;

/// Sockets accepted beyond `max_connections` (TLS handshakes, connections not yet admitted).
pub const PENDING_CONNECTIONS: usize = 256;
/// Default of [`Limits::admission_timeout`].
pub const DEFAULT_ADMISSION_TIMEOUT: Duration = Duration::from_secs(30);

/// Defaults of [`Limits`] (and of `meshfed serve`'s flags).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 100;
pub const DEFAULT_REQUEST_RATE: u32 = 100;
pub const DEFAULT_REQUEST_BURST: u32 = 1_000;
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("xDS TLS: {0}")]
    Tls(#[from] crate::tls::Error),
}

/// The limits of an xDS listener. `0` disables a limit (for the message size: the 4 MiB default).
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// largest request message accepted, bytes
    pub max_message_size: usize,
    /// admitted connections (those with an ADS stream)
    pub max_connections: usize,
    /// HTTP/2 concurrent streams per connection
    pub max_streams_per_connection: u32,
    /// sustained requests per second per connection
    pub request_rate: u32,
    /// requests a connection may send at once above the sustained rate
    pub request_burst: u32,
    /// how long a shutdown waits for connections to close
    pub drain_timeout: Duration,
    /// a connection that has not opened an admitted stream this long after it was accepted is closed
    pub admission_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            request_rate: DEFAULT_REQUEST_RATE,
            request_burst: DEFAULT_REQUEST_BURST,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            admission_timeout: DEFAULT_ADMISSION_TIMEOUT,
        }
    }
}

impl Limits {
    /// No connection, stream or rate limit (tests and benchmarks that open many streams per connection);
    /// the message size stays at its default.
    pub fn unlimited() -> Limits {
        Limits {
            max_connections: 0,
            max_streams_per_connection: 0,
            request_rate: 0,
            request_burst: 0,
            ..Limits::default()
        }
    }
}

/// Counters of one listener (for tests and the debug surface).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// open sockets (handshaking, pending or admitted)
    pub sockets: AtomicUsize,
    /// admitted connections
    pub admitted: AtomicUsize,
    /// sockets closed at accept because of the connection limit
    pub refused_sockets: AtomicU64,
    /// streams refused because of the connection limit
    pub refused_streams: AtomicU64,
    /// streams ended because their connection exceeded its request rate
    pub rate_limited: AtomicU64,
    /// TLS handshakes that failed or timed out
    pub failed_handshakes: AtomicU64,
}

/// What meshfed knows about a connection; in every request's extensions.
#[derive(Clone, Debug)]
pub struct ConnInfo(pub Arc<ConnState>);

/// One open stream of a connection (see [`ConnState::open_stream`]).
#[derive(Debug)]
pub struct StreamSlot(Arc<AtomicU32>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
pub struct ConnState {
    pub remote: Option<SocketAddr>,
    pub peer: PeerAuth,
    pub tls: bool,
    admitted: AtomicBool,
    /// ADS streams open on this connection
    streams: Arc<AtomicU32>,
    bucket: Option<Mutex<TokenBucket>>,
    limits: Arc<Limits>,
    stats: Arc<ServerStats>,
}

impl ConnState {
    fn new(
        remote: Option<SocketAddr>,
        peer: PeerAuth,
        tls: bool,
        limits: Arc<Limits>,
        stats: Arc<ServerStats>,
    ) -> Self {
        let bucket = (limits.request_rate > 0)
            .then(|| Mutex::new(TokenBucket::new(limits.request_rate, limits.request_burst.max(1))));
        ConnState {
            remote,
            peer,
            tls,
            admitted: AtomicBool::new(false),
            streams: Arc::default(),
            bucket,
            limits,
            stats,
        }
    }

    /// A connection outside any listener (in-process use): anonymous, unlimited.
    pub fn unlimited() -> ConnInfo {
        ConnInfo(Arc::new(ConnState::new(
            None,
            PeerAuth::Anonymous,
            false,
            Arc::new(Limits::unlimited()),
            Arc::default(),
        )))
    }

    /// A connection outside any listener with this peer and these limits (tests, fuzzing).
    pub fn for_peer(peer: PeerAuth, limits: Limits) -> ConnInfo {
        ConnInfo(Arc::new(ConnState::new(None, peer, true, Arc::new(limits), Arc::default())))
    }

    /// Opens a stream under the connection's stream limit; the slot is freed when the guard drops.
    pub fn open_stream(&self) -> Result<StreamSlot, tonic::Status> {
        let max = self.limits.max_streams_per_connection;
        let ok = self
            .streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (max == 0 || n < max).then_some(n + 1))
            .is_ok();
        if !ok {
            self.count_refused_stream();
            return Err(tonic::Status::resource_exhausted(format!(
                "meshfed: stream limit reached on this connection ({max} streams); one ADS stream per proxy is enough"
            )));
        }
        Ok(StreamSlot(self.streams.clone()))
    }

    /// Counts a stream refused over the stream limit (`meshfed_xds_refused_total{reason="streams"}`).
    fn count_refused_stream(&self) {
        self.stats.refused_streams.fetch_add(1, Ordering::Relaxed);
        crate::metrics::global().record_refusal(Refusal::Streams);
    }

    /// Admits the connection under the connection limit (once; later calls are free).
    pub fn admit(&self) -> Result<(), tonic::Status> {
        if self.admitted.load(Ordering::Acquire) {
            return Ok(());
        }
        let max = self.limits.max_connections;
        let ok = self
            .stats
            .admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (max == 0 || n < max).then_some(n + 1))
            .is_ok();
        if !ok {
            self.stats.refused_streams.fetch_add(1, Ordering::Relaxed);
            crate::metrics::global().record_refusal(Refusal::Connections);
            return Err(tonic::Status::resource_exhausted(format!(
                "meshfed: connection limit reached ({max} connections); retry later or use another replica"
            )));
        }
        if self.admitted.swap(true, Ordering::AcqRel) {
            // admitted concurrently by another stream: give the extra slot back
            self.stats.admitted.fetch_sub(1, Ordering::AcqRel);
        }
        Ok(())
    }

    pub fn is_admitted(&self) -> bool {
        self.admitted.load(Ordering::Acquire)
    }

    /// Takes a token for one request: RESOURCE_EXHAUSTED when the connection is over its rate.
    pub fn take_request_token(&self) -> Result<(), tonic::Status> {
        let Some(bucket) = &self.bucket else { return Ok(()) };
        let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
        if b.take(Instant::now()) {
            return Ok(());
        }
        self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
        crate::metrics::global().record_refusal(Refusal::RequestRate);
        Err(tonic::Status::resource_exhausted(format!(
            "meshfed: request rate limit exceeded on this connection ({} requests/s, burst {})",
            self.limits.request_rate,
            self.limits.request_burst.max(1)
        )))
    }
}

impl Drop for ConnState {
    fn drop(&mut self) {
        if *self.admitted.get_mut() {
            self.stats.admitted.fetch_sub(1, Ordering::AcqRel);
        }
        if self.remote.is_some() {
            self.stats.sockets.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A token bucket: `rate` tokens per second, at most `burst` stored.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32) -> TokenBucket {
        TokenBucket { rate: f64::from(rate), burst: f64::from(burst), tokens: f64::from(burst), last: Instant::now() }
    }

    /// Takes one token at time `now`, if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------------------------

/// How one xDS listener serves.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    pub limits: Limits,
    /// TLS (None: plaintext)
    pub tls: Option<TlsOptions>,
    /// counters (shared with whoever wants to read them)
    pub stats: Arc<ServerStats>,
}

/// TLS on an xDS listener.
#[derive(Clone, Debug)]
pub struct TlsOptions {
    pub config: Arc<rustls::ServerConfig>,
    /// the mesh's trust domain: client identities outside it are refused (mTLS)
    pub trust_domain: Arc<str>,
}

/// The HTTP/2 settings of an xDS connection under `limits`.
fn transport_config(limits: &Limits) -> crate::grpc::Config {
    let mut c = crate::grpc::Config {
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    if limits.max_message_size > 0 {
        c.max_message_size = limits.max_message_size;
    }
    // advertised as enforced: clients queue their streams over the limit instead of having them fail
    c.max_concurrent_streams = limits.max_streams_per_connection;
    c
}

/// The ADS service of one connection, with the streams the transport refuses over the stream limit
/// counted as [`ConnState::open_stream`]'s refusals are.
struct CountRefusals {
    service: super::AdsConnection,
    state: Arc<ConnState>,
}

impl crate::grpc::Handler for CountRefusals {
    fn open(
        &mut self,
        head: crate::grpc::RequestHead,
        messages: crate::grpc::Messages,
        responses: crate::grpc::Responses,
    ) -> Result<crate::grpc::StreamFuture, tonic::Status> {
        crate::grpc::Handler::open(&mut self.service, head, messages, responses)
    }

    fn refused(&mut self) {
        self.state.count_refused_stream();
    }
}

/// Counts the connections being served; [`Tracker::idle`] resolves when there are none.
#[derive(Clone, Debug, Default)]
struct Tracker(Arc<(AtomicUsize, tokio::sync::Notify)>);

struct Tracked(Tracker);

impl Tracker {
    fn track(&self) -> Tracked {
        self.0.0.fetch_add(1, Ordering::AcqRel);
        Tracked(self.clone())
    }

    async fn idle(&self) {
        loop {
            let notified = self.0.1.notified();
            if self.0.0.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.0.0.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.0.1.notify_waiters();
        }
    }
}

/// What every connection of a listener shares.
struct Shared {
    service: AdsService,
    config: Arc<crate::grpc::Config>,
    /// GOAWAY: no new streams
    graceful: watch::Receiver<bool>,
    /// close now
    kill: watch::Receiver<bool>,
    tracker: Tracker,
}

/// Serves one accepted (and, with TLS, handshaken) connection until it ends, the listener kills it, or
/// it opens no admitted stream within the admission timeout.
async fn serve_connection<IO>(io: IO, info: ConnInfo, shared: Arc<Shared>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _tracked = shared.tracker.track();
    let state = info.0.clone();
    let remote = state.remote;
    let mut graceful = shared.graceful.clone();
    let handler = CountRefusals { service: shared.service.for_connection(Some(info)), state: state.clone() };
    let conn = crate::grpc::serve(io, handler, shared.config.clone(), async move {
        let _ = graceful.wait_for(|g| *g).await;
    });
    let mut kill = shared.kill.clone();
    let admission = tokio::time::sleep(state.limits.admission_timeout);
    tokio::pin!(conn, admission);
    let mut admission_pending = true;
    loop {
        tokio::select! {
            biased;
            result = &mut conn => {
                if let Err(e) = result {
                    debug!(remote = ?remote, error = %e, "xDS connection ended");
                }
                return;
            }
            _ = kill.wait_for(|k| *k) => return,
            _ = &mut admission, if admission_pending => {
                admission_pending = false;
                // A connection that never gets admitted (no stream, or refused over the limit) is
                // closed, so idle sockets cannot hold the pending slots.
                if !state.is_admitted() {
                    debug!(remote = ?remote, "closing a connection that opened no admitted stream");
                    crate::metrics::global().record_refusal(Refusal::AdmissionTimeout);
                    return;
                }
            }
        }
    }
}

/// Serves ADS on `listener` with `options` until `shutdown` resolves, then drains (see the module docs).
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: AdsService,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    let addr = listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let limits = Arc::new(options.limits.clone());
    let stats = options.stats.clone();
    let (kill_tx, kill_rx) = watch::channel(false);
    let (drain_tx, drain_rx) = watch::channel(false);
    let (graceful_tx, graceful_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        service: service.with_drain(drain_rx),
        config: Arc::new(transport_config(&limits)),
        graceful: graceful_rx,
        kill: kill_rx,
        tracker: Tracker::default(),
    });
    let tracker = shared.tracker.clone();

    // The accept loop never waits for a handshake: each connection is handshaken and served by its
    // own task.
    let (stop_accept_tx, mut stop_accept_rx) = watch::channel(false);
    let acceptor = options.tls.as_ref().map(|t| (TlsAcceptor::from(t.config.clone()), t.trust_domain.clone()));
    let accept_task = tokio::spawn({
        let (limits, stats, shared) = (limits.clone(), stats.clone(), shared.clone());
        async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stop_accept_rx.wait_for(|s| *s) => break,
                };
                let (tcp, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // e.g. out of file descriptors: do not spin
                        debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let cap = if limits.max_connections == 0 {
                    usize::MAX
                } else {
                    limits.max_connections.saturating_add(PENDING_CONNECTIONS)
                };
                if stats.sockets.load(Ordering::Acquire) >= cap {
                    stats.refused_sockets.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::global().record_refusal(Refusal::Sockets);
                    debug!(%remote, "connection refused: too many open connections");
                    drop(tcp);
                    continue;
                }
                stats.sockets.fetch_add(1, Ordering::AcqRel);
                let _ = tcp.set_nodelay(true);
                let (limits, stats, shared) = (limits.clone(), stats.clone(), shared.clone());
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        None => {
                            let state = ConnState::new(Some(remote), PeerAuth::Anonymous, false, limits, stats);
                            serve_connection(tcp, ConnInfo(Arc::new(state)), shared).await;
                        }
                        Some((acceptor, trust_domain)) => {
                            let _tracked = shared.tracker.track();
                            match tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                                Ok(Ok(tls)) => {
                                    let peer = match tls.get_ref().1.peer_certificates() {
                                        Some([leaf, ..]) => crate::tls::peer_auth(leaf, &trust_domain),
                                        _ => PeerAuth::Anonymous,
                                    };
                                    let state = ConnState::new(Some(remote), peer, true, limits, stats);
                                    serve_connection(tls, ConnInfo(Arc::new(state)), shared).await;
                                }
                                Ok(Err(e)) => {
                                    stats.failed_handshakes.fetch_add(1, Ordering::Relaxed);
                                    stats.sockets.fetch_sub(1, Ordering::AcqRel);
                                    debug!(%remote, error = %e, "TLS handshake failed");
                                }
                                Err(_) => {
                                    stats.failed_handshakes.fetch_add(1, Ordering::Relaxed);
                                    stats.sockets.fetch_sub(1, Ordering::AcqRel);
                                    debug!(%remote, "TLS handshake timed out");
                                }
                            }
                        }
                    }
                });
            }
        }
    });

    shutdown.await;
    // Drain: stop accepting, GOAWAY on every connection, end the streams, wait, then close the rest.
    info!(%addr, open = stats.sockets.load(Ordering::Relaxed), "xDS server draining");
    let _ = stop_accept_tx.send(true);
    let _ = accept_task.await;
    let _ = graceful_tx.send(true);
    // Let the GOAWAYs go out before the streams end, so clients reconnect on a new connection.
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = drain_tx.send(true);
    let outcome = tokio::time::timeout(limits.drain_timeout, tracker.idle()).await;
    let _ = kill_tx.send(true);
    match outcome {
        Ok(()) => info!(%addr, "xDS server drained"),
        Err(_) => {
            warn!(%addr, open = stats.sockets.load(Ordering::Relaxed), timeout = ?limits.drain_timeout,
                "drain timeout: closing the remaining connections");
            // the connections see the kill signal and end; give them a moment
            let _ = tokio::time::timeout(Duration::from_secs(1), tracker.idle()).await;
        }
    }
    Ok(())
}
