//! The ADS server: `StreamAggregatedResources` (SotW) and `DeltaAggregatedResources` (Delta) on one
//! gRPC port. Protocol state lives in [`stream`]; responses are written from shared, pre-encoded
//! resources by [`codec`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use tonic::Status;
use tonic::body::Body;
use tonic::codec::Streaming;
use tonic::codegen::{BoxFuture, http};
use tonic::server::NamedService;

use crate::push::PushHandle;

pub mod codec;
pub mod connections;
pub mod server;
pub mod stream;

use codec::{RequestDecoder, ResponseBody, SotwDecoder};
use connections::{Connections, Flavor};

pub const SERVICE_NAME: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const SOTW_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Responses queued per stream beyond the one being written. Small on purpose: a stream that cannot
/// write waits, and when it can, it reads the newest snapshot rather than a backlog.
const STREAM_QUEUE: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot serve xDS on {addr}: {source}")]
    Serve { addr: SocketAddr, source: tonic::transport::Error },
    #[error(transparent)]
    Listener(#[from] server::Error),
}

/// The ADS gRPC service.
#[derive(Clone, Debug)]
pub struct AdsService {
    push: PushHandle,
    connections: Arc<Connections>,
    /// largest request accepted (see [`server::Limits`])
    max_message_size: usize,
    /// becomes true when the listener drains: every stream ends with UNAVAILABLE
    drain: Option<tokio::sync::watch::Receiver<bool>>,
}

impl AdsService {
    pub fn new(push: PushHandle, connections: Arc<Connections>) -> AdsService {
        AdsService { push, connections, max_message_size: server::DEFAULT_MAX_MESSAGE_SIZE, drain: None }
    }

    /// The service as a listener runs it: its message size limit and drain signal.
    pub fn with_listener(mut self, max_message_size: usize, drain: tokio::sync::watch::Receiver<bool>) -> AdsService {
        if max_message_size > 0 {
            self.max_message_size = max_message_size;
        }
        self.drain = Some(drain);
        self
    }

    /// Per stream: the connection's info (identity, limits; refused over the connection limit) and the
    /// drain signal.
    fn stream_context(&self, conn: Option<&server::ConnInfo>) -> Result<stream::StreamContext, Status> {
        let slot = match conn {
            Some(c) => {
                c.0.admit()?;
                Some(Arc::new(c.0.open_stream()?))
            }
            None => None,
        };
        Ok(stream::StreamContext { conn: conn.cloned(), slot, drain: self.drain.clone() })
    }

    pub fn connections(&self) -> &Arc<Connections> {
        &self.connections
    }
}

impl AdsService {
    /// Opens one ADS stream of `flavor`: refused (as a trailers-only gRPC response) when the connection
    /// is over its stream limit or asks for a compression meshfed does not speak; otherwise the requests
    /// are read by a [`stream::Stream`] task and its responses written by a [`ResponseBody`].
    fn open<B>(&self, req: http::Request<B>, flavor: Flavor) -> http::Response<Body>
    where
        B: http_body::Body + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
    {
        if let Some(enc) = req.headers().get("grpc-encoding")
            && enc != "identity"
        {
            let enc = String::from_utf8_lossy(enc.as_bytes());
            return Status::unimplemented(format!("request compression {enc:?} is not supported")).into_http();
        }
        let context = match self.stream_context(req.extensions().get::<server::ConnInfo>()) {
            Ok(c) => c,
            Err(status) => return status.into_http(),
        };
        let ua = req.headers().get("user-agent").and_then(|v| v.to_str().ok()).map(str::to_string);
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_QUEUE);
        let stream =
            stream::Stream::new(flavor, self.push.clone(), self.connections.clone(), tx, ua).with_context(context);
        let body = req.into_body();
        let max = Some(self.max_message_size);
        match flavor {
            Flavor::Sotw => {
                tokio::spawn(stream.run_sotw(Streaming::new_request(SotwDecoder, body, None, max)));
            }
            Flavor::Delta => {
                let decoder = RequestDecoder::<DeltaDiscoveryRequest>::default();
                tokio::spawn(stream.run_delta(Streaming::new_request(decoder, body, None, max)));
            }
        }
        ResponseBody::new(rx).into_http()
    }
}

impl<B> tower::Service<http::Request<B>> for AdsService
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let svc = self.clone();
        match req.uri().path() {
            SOTW_PATH => Box::pin(async move { Ok(svc.open(req, Flavor::Sotw)) }),
            DELTA_PATH => Box::pin(async move { Ok(svc.open(req, Flavor::Delta)) }),
            _ => Box::pin(async move { Ok(Status::unimplemented("unknown method").into_http()) }),
        }
    }
}

impl NamedService for AdsService {
    const NAME: &'static str = SERVICE_NAME;
}

/// Pending connections the xDS listeners queue (the kernel caps it at `net.core.somaxconn`). A fleet
/// reconnecting at once (a meshfed restart, a failover) would overflow the usual 128, and every refused
/// proxy waits out its back-off.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds an xDS listener on `addr` with a [`LISTEN_BACKLOG`] deep accept queue.
pub fn bind_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves ADS in plaintext on `listener` until `shutdown` resolves, then drains; without connection,
/// stream or rate limits ([`server::Limits::unlimited`]: tests and benchmarks). `meshfed serve` uses
/// [`server::serve`] with its limits and TLS.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: AdsService,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    let options = server::ServeOptions { limits: server::Limits::unlimited(), ..Default::default() };
    Ok(server::serve(listener, service, options, shutdown).await?)
}
