//! The limits of an xDS listener and what each connection carries under them: [`Limits`] (every one with a
//! flag and a default in `meshfed serve`; see [`super::server`] for how each is enforced), the connection's
//! [`ConnState`] (verified identity, admission under the connection limit, open streams, request-rate
//! bucket) and the listener's counters ([`ServerStats`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::Refusal;
use crate::tls::PeerAuth;

/// Sockets accepted beyond `max_connections` (TLS handshakes, connections not yet admitted).
pub const PENDING_CONNECTIONS: usize = 256;
/// Default of [`Limits::admission_timeout`].
pub const DEFAULT_ADMISSION_TIMEOUT: Duration = Duration::from_secs(30);

/// Defaults of [`Limits`] (and of `meshfed serve`'s flags).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
/// One ADS stream per proxy standalone; beside istiod, one EDS stream per federated service per proxy, all
/// on the proxy's one connection (and gRPC's HTTP/2 clients queue beyond the advertised limit).
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 1_000;
pub const DEFAULT_REQUEST_RATE: u32 = 100;
pub const DEFAULT_REQUEST_BURST: u32 = 1_000;
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// istiod's defaults (`--keepaliveInterval`, `--keepaliveTimeout`).
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The limits of an xDS listener. `0` disables a limit (for the message size: the 4 MiB default).
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// largest request message accepted, bytes
    pub max_message_size: usize,
    /// admitted connections (those with an ADS stream)
    pub max_connections: usize,
    /// HTTP/2 concurrent streams per connection
    pub max_streams_per_connection: u32,
    /// sustained requests per second per open stream of a connection (a connection's bucket scales with
    /// its streams: beside istiod one proxy holds one EDS stream per federated service)
    pub request_rate: u32,
    /// requests per open stream a connection may send at once above the sustained rate
    pub request_burst: u32,
    /// how long a shutdown waits for connections to close
    pub drain_timeout: Duration,
    /// a connection that has not opened an admitted stream this long after it was accepted is closed
    pub admission_timeout: Duration,
    /// a connection quiet this long gets an HTTP/2 PING (`Duration::ZERO`: never)
    pub keepalive_interval: Duration,
    /// a PING not answered this long closes the connection
    pub keepalive_timeout: Duration,
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
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
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
    /// xDS streams open on this connection
    streams: Arc<AtomicU32>,
    bucket: Option<Mutex<TokenBucket>>,
    pub(super) limits: Arc<Limits>,
    stats: Arc<ServerStats>,
    /// the proxies of this connection's per-type streams
    pub sessions: super::session::Sessions,
}

impl ConnState {
    pub(super) fn new(
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
            sessions: Default::default(),
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
                "meshfed: stream limit reached on this connection ({max} streams): one ADS stream per proxy, or one EDS stream per federated service (--max-streams-per-connection)"
            )));
        }
        Ok(StreamSlot(self.streams.clone()))
    }

    /// Counts a stream refused over the stream limit (`meshfed_xds_refused_total{reason="streams"}`).
    pub(super) fn count_refused_stream(&self) {
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

    /// Takes a token for one request: RESOURCE_EXHAUSTED when the connection is over its rate (the rate
    /// and burst per open stream, times its open streams).
    pub fn take_request_token(&self) -> Result<(), tonic::Status> {
        let Some(bucket) = &self.bucket else { return Ok(()) };
        let streams = self.streams.load(Ordering::Acquire).max(1);
        let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
        if b.take_scaled(Instant::now(), streams) {
            return Ok(());
        }
        self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
        crate::metrics::global().record_refusal(Refusal::RequestRate);
        Err(tonic::Status::resource_exhausted(format!(
            "meshfed: request rate limit exceeded on this connection ({} requests/s and burst {} per stream)",
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
        self.take_scaled(now, 1)
    }

    /// Takes one token at time `now` from a bucket `scale` times as large and as fast (a connection's
    /// bucket with `scale` open streams). A bucket that shrinks keeps at most its new size.
    pub fn take_scaled(&mut self, now: Instant, scale: u32) -> bool {
        let scale = f64::from(scale.max(1));
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.rate * scale).min(self.burst * scale);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
