//! The ADS server: `StreamAggregatedResources` (SotW) and `DeltaAggregatedResources` (Delta) on one
//! gRPC port. Protocol state lives in [`stream`]; responses are written from shared, pre-encoded
//! resources by [`codec`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, http};
use tonic::server::{Grpc, NamedService, StreamingService};

use crate::push::PushHandle;

pub mod codec;
pub mod connections;
pub mod stream;

use codec::{Response, XdsCodec};
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
}

/// The ADS gRPC service.
#[derive(Clone, Debug)]
pub struct AdsService {
    push: PushHandle,
    connections: Arc<Connections>,
}

impl AdsService {
    pub fn new(push: PushHandle, connections: Arc<Connections>) -> AdsService {
        AdsService { push, connections }
    }

    pub fn connections(&self) -> &Arc<Connections> {
        &self.connections
    }
}

type ResponseStream = ReceiverStream<Result<Response, Status>>;

fn user_agent<T>(req: &tonic::Request<T>) -> Option<String> {
    req.metadata().get("user-agent").and_then(|v| v.to_str().ok()).map(str::to_string)
}

struct Sotw(AdsService);

impl StreamingService<DiscoveryRequest> for Sotw {
    type Response = Response;
    type ResponseStream = ResponseStream;
    type Future = BoxFuture<tonic::Response<ResponseStream>, Status>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<DiscoveryRequest>>) -> Self::Future {
        let svc = self.0.clone();
        Box::pin(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(STREAM_QUEUE);
            let ua = user_agent(&request);
            let stream = stream::Stream::new(Flavor::Sotw, svc.push.clone(), svc.connections.clone(), tx, ua);
            tokio::spawn(stream.run_sotw(request.into_inner()));
            Ok(tonic::Response::new(ReceiverStream::new(rx)))
        })
    }
}

struct Delta(AdsService);

impl StreamingService<DeltaDiscoveryRequest> for Delta {
    type Response = Response;
    type ResponseStream = ResponseStream;
    type Future = BoxFuture<tonic::Response<ResponseStream>, Status>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let svc = self.0.clone();
        Box::pin(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(STREAM_QUEUE);
            let ua = user_agent(&request);
            let stream = stream::Stream::new(Flavor::Delta, svc.push.clone(), svc.connections.clone(), tx, ua);
            tokio::spawn(stream.run_delta(request.into_inner()));
            Ok(tonic::Response::new(ReceiverStream::new(rx)))
        })
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
            SOTW_PATH => Box::pin(async move {
                let mut grpc = Grpc::new(XdsCodec::<DiscoveryRequest>::default());
                Ok(grpc.streaming(Sotw(svc), req).await)
            }),
            DELTA_PATH => Box::pin(async move {
                let mut grpc = Grpc::new(XdsCodec::<DeltaDiscoveryRequest>::default());
                Ok(grpc.streaming(Delta(svc), req).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("unknown method").into_http()) }),
        }
    }
}

impl NamedService for AdsService {
    const NAME: &'static str = SERVICE_NAME;
}

/// Serves ADS on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: AdsService,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    let addr = listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(service)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(|source| Error::Serve { addr, source })
}
