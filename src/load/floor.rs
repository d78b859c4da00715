//! The floor: a minimal ADS server that only writes pre-encoded responses, to measure what the transport
//! (tonic/h2, the same response codec, the same client) costs on its own.
//!
//! It translates the generated topology once, for one representative proxy, with meshfed's own
//! translation and encodes every resource once. Every stream gets the same bytes: the first request of
//! each type is answered with every resource of that type; every later request (ACKs, NACKs, new
//! subscriptions) is ignored. A change re-translates the one assignment it touches, once, and every stream
//! that asked for EDS is sent just that assignment. No per-stream subscription state, no versions, no
//! push loop: this is the least any ADS server on this stack can do for the same client.
//!
//! With `--zero-copy` (server kind `floor-zero-copy`) it also bypasses tonic's response encoder — each
//! response is written as chunks that reference the shared resource bytes, so no per-stream buffer keeps
//! the largest response — and reads SotW requests without their resource names ([`SotwHead`]): the two
//! changes BENCHMARKS.md proposes for meshfed, measured on the floor.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Result;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, http};
use tonic::server::{Grpc, NamedService, StreamingService};

use super::server::{ControlHandler, mesh_config, serve_control};
use super::topo::{Change, ProxyIdentity, Size, Topology, proxy_node};
use crate::cache::Resource;
use crate::registry::Registry;
use crate::translate::{self, Context as TContext, View};
use crate::type_url::ResourceType;
use crate::xds::codec::{DeltaResponse, Response, SotwResponse, XdsCodec};

/// What the floor serves at one generation.
#[derive(Debug, Default)]
pub struct FloorState {
    pub generation: u64,
    /// every resource per type (wildcard ones only for CDS/LDS)
    pub all: [Vec<Arc<Resource>>; 4],
    /// the assignments the latest change touched
    pub changed: Vec<Arc<Resource>>,
}

/// Builds the floor's resources for `registry`, for the view of load proxy 0.
pub fn resources(ctx: &TContext, registry: &Registry, view: &View) -> [Vec<Arc<Resource>>; 4] {
    let cds = translate::cluster::clusters(ctx, &view.clusters, registry).into_iter().map(Resource::encode);
    let eds = registry
        .services()
        .values()
        .flat_map(|s| translate::endpoint::service_load_assignments(ctx, &view.endpoints, s))
        .map(Resource::encode);
    let lds = translate::listener::listeners(ctx, &view.listeners, registry).into_iter().map(Resource::encode);
    let rds = translate::route::routes(ctx, &view.routes, registry).into_iter().map(Resource::encode);
    [cds.filter(|r| r.wildcard).collect(), eds.collect(), lds.filter(|r| r.wildcard).collect(), rds.collect()]
}

struct FloorControl {
    topology: Topology,
    registry: Registry,
    ctx: TContext,
    view: View,
    state: watch::Sender<Arc<FloorState>>,
}

impl ControlHandler for FloorControl {
    fn change(&mut self, change: &Change) {
        let mut keys = Vec::new();
        for e in self.topology.apply(change) {
            let c = self.registry.apply(e);
            keys.extend(c.services.into_keys());
        }
        let mut changed = Vec::new();
        for k in keys {
            if let Some(s) = self.registry.service(&k) {
                changed.extend(
                    translate::endpoint::service_load_assignments(&self.ctx, &self.view.endpoints, s)
                        .into_iter()
                        .map(Resource::encode),
                );
            }
        }
        let prev = self.state.borrow().clone();
        let mut all = prev.all.clone();
        for r in &changed {
            if let Some(slot) = all[1].iter_mut().find(|x| x.name == r.name) {
                *slot = r.clone();
            }
        }
        self.state.send_replace(Arc::new(FloorState { generation: prev.generation + 1, all, changed }));
    }

    fn stats(&mut self) -> serde_json::Value {
        let metrics = tokio::runtime::Handle::current().metrics();
        serde_json::json!({
            "connections": self.state.receiver_count().saturating_sub(1),
            "tasks": metrics.num_alive_tasks(),
            "generation": self.state.borrow().generation,
        })
    }
}

#[derive(Clone)]
struct FloorService {
    state: watch::Receiver<Arc<FloorState>>,
    /// write responses as chunks that reference the shared resource bytes, instead of through tonic's
    /// encoder (which copies every response into a per-stream buffer that keeps its largest size)
    zero_copy: bool,
}

/// A response body that writes [`Response`]s as gRPC messages made of shared chunks: small pieces
/// (envelope fields, small resources) are gathered into chunks of up to [`CHUNK`] bytes, resources of
/// [`SHARE_MIN`] bytes or more are passed by reference. Nothing is kept per stream between responses.
struct ChunkBody {
    rx: mpsc::Receiver<Result<Response, Status>>,
    pending: std::collections::VecDeque<bytes::Bytes>,
    done: bool,
}

const CHUNK: usize = 16 * 1024;
const SHARE_MIN: usize = 2 * 1024;

fn chunks(r: &Response) -> Vec<bytes::Bytes> {
    use bytes::BufMut;
    use prost::encoding::{WireType, encode_key, encode_varint};
    let mut out = Vec::new();
    let mut cur = bytes::BytesMut::with_capacity(CHUNK);
    let len = r.encoded_len();
    cur.put_u8(0);
    cur.put_u32(len as u32);
    let flush = |cur: &mut bytes::BytesMut, out: &mut Vec<bytes::Bytes>| {
        if !cur.is_empty() {
            out.push(cur.split().freeze());
        }
    };
    let put_str = |cur: &mut bytes::BytesMut, tag: u32, s: &str| {
        if !s.is_empty() {
            encode_key(tag, WireType::LengthDelimited, cur);
            encode_varint(s.len() as u64, cur);
            cur.put_slice(s.as_bytes());
        }
    };
    let put_body = |cur: &mut bytes::BytesMut, out: &mut Vec<bytes::Bytes>, body: &bytes::Bytes| {
        if body.len() >= SHARE_MIN {
            flush(cur, out);
            out.push(body.clone());
        } else {
            if cur.len() + body.len() > CHUNK {
                flush(cur, out);
            }
            cur.put_slice(body);
        }
    };
    match r {
        Response::Sotw(s) => {
            put_str(&mut cur, 1, &s.version_info);
            for x in &s.resources {
                encode_key(2, WireType::LengthDelimited, &mut cur);
                encode_varint(x.body.len() as u64, &mut cur);
                put_body(&mut cur, &mut out, &x.body);
            }
            put_str(&mut cur, 4, s.type_url);
            put_str(&mut cur, 5, &s.nonce);
        }
        Response::Delta(d) => {
            put_str(&mut cur, 1, &d.system_version_info);
            for x in &d.resources {
                let vlen = if x.version.is_empty() {
                    0
                } else {
                    1 + prost::encoding::encoded_len_varint(x.version.len() as u64) + x.version.len()
                };
                let blen = 1 + prost::encoding::encoded_len_varint(x.body.len() as u64) + x.body.len();
                let nlen = if x.name.is_empty() {
                    0
                } else {
                    1 + prost::encoding::encoded_len_varint(x.name.len() as u64) + x.name.len()
                };
                encode_key(2, WireType::LengthDelimited, &mut cur);
                encode_varint((vlen + blen + nlen) as u64, &mut cur);
                put_str(&mut cur, 1, &x.version);
                encode_key(2, WireType::LengthDelimited, &mut cur);
                encode_varint(x.body.len() as u64, &mut cur);
                put_body(&mut cur, &mut out, &x.body);
                put_str(&mut cur, 3, &x.name);
            }
            put_str(&mut cur, 4, d.type_url);
            put_str(&mut cur, 5, &d.nonce);
            for n in &d.removed_resources {
                put_str(&mut cur, 6, n);
            }
        }
        Response::Raw(b) => put_body(&mut cur, &mut out, b),
    }
    flush(&mut cur, &mut out);
    out
}

impl http_body::Body for ChunkBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        loop {
            if let Some(c) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(c))));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(r))) => {
                    let c = chunks(&r);
                    self.pending.extend(c);
                }
                Poll::Ready(Some(Err(status))) => {
                    self.done = true;
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", (status.code() as i32).into());
                    return Poll::Ready(Some(Ok(http_body::Frame::trailers(t))));
                }
                Poll::Ready(None) => {
                    self.done = true;
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", http::HeaderValue::from_static("0"));
                    return Poll::Ready(Some(Ok(http_body::Frame::trailers(t))));
                }
            }
        }
    }
}

fn zero_copy_call<Req, B>(svc: FloorService, req: http::Request<B>, delta: bool) -> http::Response<Body>
where
    Req: prost::Message + Default + FloorRequest + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    use tonic::codec::Codec;
    let body = req.into_body();
    let requests = tonic::codec::Streaming::<Req>::new_request(XdsCodec::<Req>::default().decoder(), body, None, None);
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(run_stream(requests, svc.state.clone(), delta, tx));
    let body = ChunkBody { rx, pending: Default::default(), done: false };
    let mut resp = http::Response::new(Body::new(body));
    resp.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
    resp
}

type ResponseStream = ReceiverStream<Result<Response, Status>>;

fn response(delta: bool, t: ResourceType, nonce: u64, resources: Vec<Arc<Resource>>) -> Response {
    if delta {
        Response::Delta(DeltaResponse {
            system_version_info: String::new(),
            type_url: t.type_url(),
            nonce: nonce.to_string(),
            resources,
            removed_resources: Vec::new(),
        })
    } else {
        Response::Sotw(SotwResponse {
            version_info: nonce.to_string(),
            type_url: t.type_url(),
            nonce: nonce.to_string(),
            resources,
        })
    }
}

/// One floor stream: `requests` yields (type URL, is-initial) per request.
async fn run_stream<S, R>(
    mut requests: S,
    mut state: watch::Receiver<Arc<FloorState>>,
    delta: bool,
    out: mpsc::Sender<Result<Response, Status>>,
) where
    S: futures::Stream<Item = Result<R, Status>> + Unpin,
    R: FloorRequest,
{
    use futures::StreamExt;
    let mut answered = [false; 4];
    let mut nonce = 0u64;
    state.borrow_and_update();
    loop {
        tokio::select! {
            req = requests.next() => {
                let Some(Ok(req)) = req else { return };
                let Some(t) = ResourceType::from_type_url(req.type_url()) else { continue };
                if !req.is_initial() || answered[t.index()] {
                    continue;
                }
                answered[t.index()] = true;
                nonce += 1;
                let all = state.borrow().all[t.index()].clone();
                if out.send(Ok(response(delta, t, nonce, all))).await.is_err() {
                    return;
                }
            }
            changed = state.changed() => {
                if changed.is_err() { return }
                let s = state.borrow_and_update().clone();
                if answered[1] && !s.changed.is_empty() {
                    nonce += 1;
                    if out.send(Ok(response(delta, ResourceType::Endpoint, nonce, s.changed.clone()))).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// A SotW request read without its resource names (the zero-copy floor never needs them): what not
/// decoding the names of an unchanged SotW ACK would save.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SotwHead {
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub response_nonce: String,
}

impl FloorRequest for SotwHead {
    fn type_url(&self) -> &str {
        &self.type_url
    }
    fn is_initial(&self) -> bool {
        self.response_nonce.is_empty()
    }
}

pub trait FloorRequest {
    fn type_url(&self) -> &str;
    /// a request that is not an ACK/NACK (no response nonce)
    fn is_initial(&self) -> bool;
}

impl FloorRequest for DiscoveryRequest {
    fn type_url(&self) -> &str {
        &self.type_url
    }
    fn is_initial(&self) -> bool {
        self.response_nonce.is_empty()
    }
}

impl FloorRequest for DeltaDiscoveryRequest {
    fn type_url(&self) -> &str {
        &self.type_url
    }
    fn is_initial(&self) -> bool {
        self.response_nonce.is_empty()
    }
}

struct Sotw(FloorService);
struct Delta(FloorService);

impl StreamingService<DiscoveryRequest> for Sotw {
    type Response = Response;
    type ResponseStream = ResponseStream;
    type Future = BoxFuture<tonic::Response<ResponseStream>, Status>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<DiscoveryRequest>>) -> Self::Future {
        let state = self.0.state.clone();
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(2);
            tokio::spawn(run_stream(request.into_inner(), state, false, tx));
            Ok(tonic::Response::new(ReceiverStream::new(rx)))
        })
    }
}

impl StreamingService<DeltaDiscoveryRequest> for Delta {
    type Response = Response;
    type ResponseStream = ResponseStream;
    type Future = BoxFuture<tonic::Response<ResponseStream>, Status>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let state = self.0.state.clone();
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(2);
            tokio::spawn(run_stream(request.into_inner(), state, true, tx));
            Ok(tonic::Response::new(ReceiverStream::new(rx)))
        })
    }
}

impl<B> tower::Service<http::Request<B>> for FloorService
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
        if svc.zero_copy {
            let path = req.uri().path().to_string();
            return Box::pin(async move {
                Ok(match path.as_str() {
                    super::client::SOTW_PATH => zero_copy_call::<SotwHead, B>(svc, req, false),
                    super::client::DELTA_PATH => zero_copy_call::<DeltaDiscoveryRequest, B>(svc, req, true),
                    _ => Status::unimplemented("unknown method").into_http(),
                })
            });
        }
        match req.uri().path() {
            super::client::SOTW_PATH => Box::pin(async move {
                let mut grpc = Grpc::new(XdsCodec::<DiscoveryRequest>::default());
                Ok(grpc.streaming(Sotw(svc), req).await)
            }),
            super::client::DELTA_PATH => Box::pin(async move {
                let mut grpc = Grpc::new(XdsCodec::<DeltaDiscoveryRequest>::default());
                Ok(grpc.streaming(Delta(svc), req).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("unknown method").into_http()) }),
        }
    }
}

impl NamedService for FloorService {
    const NAME: &'static str = crate::xds::SERVICE_NAME;
}

/// Runs the floor on a generated topology of `size`; prints `READY ...` and serves until killed.
pub async fn serve_floor(size: Size, zero_copy: bool) -> Result<()> {
    let topology = Topology::new(size);
    let mesh = mesh_config(&topology, "0ms", "0ms")?;
    let mut registry = Registry::new(&mesh);
    for e in topology.initial_events() {
        registry.apply(e);
    }
    let ctx = TContext::from_mesh(&mesh).with_registry(&registry);
    let proxy = crate::proxy::Proxy::from_node(Some(&proxy_node(0, &ProxyIdentity::default())), None)?;
    let view = View::of(&proxy, &registry);
    let all = resources(&ctx, &registry, &view);
    let (state_tx, state_rx) = watch::channel(Arc::new(FloorState { generation: 1, all, changed: Vec::new() }));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let xds = listener.local_addr()?;
    let svc = FloorService { state: state_rx, zero_copy };
    // the same transport settings as meshfed's ADS server (TCP_NODELAY, HTTP/2 keepalive)
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await;
    });
    let control = TcpListener::bind("127.0.0.1:0").await?;
    println!("READY xds={xds} control={}", control.local_addr()?);
    serve_control(control, FloorControl { topology, registry, ctx, view, state: state_tx }).await
}
