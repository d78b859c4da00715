//! The ADS server: `StreamAggregatedResources` (SotW) and `DeltaAggregatedResources` (Delta) on one
//! gRPC port. Protocol state lives in [`stream`]; responses are written from shared, pre-encoded
//! resources by [`codec`].

use std::net::SocketAddr;
use std::sync::Arc;

use tonic::Status;

use crate::grpc;
use crate::push::PushHandle;

pub mod codec;
pub mod connections;
pub mod server;
pub mod stream;
pub mod subscription;

use connections::{Connections, Flavor};

pub const SERVICE_NAME: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const SOTW_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Listener(#[from] server::Error),
}

/// The ADS gRPC service.
#[derive(Clone, Debug)]
pub struct AdsService {
    push: PushHandle,
    connections: Arc<Connections>,
    /// becomes true when the listener drains: every stream ends with UNAVAILABLE
    drain: Option<tokio::sync::watch::Receiver<bool>>,
}

impl AdsService {
    pub fn new(push: PushHandle, connections: Arc<Connections>) -> AdsService {
        AdsService { push, connections, drain: None }
    }

    /// The service as a listener runs it: with its drain signal.
    pub fn with_drain(mut self, drain: tokio::sync::watch::Receiver<bool>) -> AdsService {
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

    /// The service for the streams of one connection.
    pub fn for_connection(&self, conn: Option<server::ConnInfo>) -> AdsConnection {
        AdsConnection { service: self.clone(), conn }
    }
}

/// The ADS service on one connection: opens its streams.
#[derive(Debug)]
pub struct AdsConnection {
    service: AdsService,
    conn: Option<server::ConnInfo>,
}

impl grpc::Handler for AdsConnection {
    /// Opens one ADS stream: refused (a trailers-only response) for an unknown method, over the
    /// connection's stream limit, or with a request compression meshfed does not speak; otherwise a
    /// [`stream::Stream`] runs it.
    fn open(
        &mut self,
        head: grpc::RequestHead,
        messages: grpc::Messages,
        responses: grpc::Responses,
    ) -> Result<grpc::StreamFuture, Status> {
        let flavor = match head.path.as_str() {
            SOTW_PATH => Flavor::Sotw,
            DELTA_PATH => Flavor::Delta,
            _ => return Err(Status::unimplemented(format!("unknown method {}", head.path))),
        };
        if let Some(enc) = head.grpc_encoding.as_deref()
            && enc != "identity"
        {
            return Err(Status::unimplemented(format!("request compression {enc:?} is not supported")));
        }
        let context = self.service.stream_context(self.conn.as_ref())?;
        let svc = &self.service;
        let stream =
            stream::Stream::new(flavor, svc.push.clone(), svc.connections.clone(), stream::Outbox::Grpc(responses))
                .with_context(context);
        Ok(Box::pin(stream.run(messages)))
    }
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
