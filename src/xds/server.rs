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
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::limits::{ConnInfo, ConnState, Limits, PENDING_CONNECTIONS, ServerStats};
use super::service::{AdsConnection, AdsService};
use crate::metrics::Refusal;
use crate::tls::PeerAuth;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("xDS TLS: {0}")]
    Tls(#[from] crate::tls::Error),
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
        keepalive_interval: (!limits.keepalive_interval.is_zero()).then_some(limits.keepalive_interval),
        keepalive_timeout: limits.keepalive_timeout,
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
    service: AdsConnection,
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
