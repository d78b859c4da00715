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
//! By default it serves through tonic (hyper/h2), writing responses with tonic's stock encoder and
//! decoding requests with prost: what a plain tonic server does. With `--zero-copy` (server kind
//! `floor-zero-copy`) it uses meshfed's own transport and wire code instead ([`meshfed::grpc`]: one task per
//! connection, responses written as chunks that share the resources' bytes; [`meshfed::xds::codec`]: SotW
//! names fingerprinted without decoding): the floor for meshfed as it is built.
//!
//! The zero-copy floor also serves the per-type EDS service (`StreamEndpoints`, `DeltaEndpoints`: one
//! stream per cluster beside istiod). Such a stream keeps the one piece of state it cannot do without: the
//! names its first request subscribed (decoded once). It is answered with those names' assignments, and
//! sent a change only when the change touched one of them; later requests are ignored as above.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Result;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use std::marker::PhantomData;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use bytes::Buf as _;
use prost::Message;
use tonic::Status;
use tonic::body::Body;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, http};
use tonic::server::{Grpc, NamedService, StreamingService};

use super::server::{ControlHandler, mesh_config, serve_control};
use super::topo::{Change, ProxyIdentity, Size, Topology, proxy_node};
use meshfed::cache::Resource;
use meshfed::registry::Registry;
use meshfed::translate::{self, Context as TContext, View};
use meshfed::type_url::ResourceType;
use meshfed::xds::codec::{Batch, DeltaResponse, Payload, Response, SotwRequest, SotwResponse};

/// What the floor serves at one generation.
#[derive(Debug)]
pub struct FloorState {
    pub generation: u64,
    /// every resource per type (wildcard ones only for CDS/LDS)
    pub all: [Vec<Arc<Resource>>; 4],
    /// the assignments the latest change touched
    pub changed: Vec<Arc<Resource>>,
    /// the same, encoded once as the entries of a SotW and of a Delta response (what every stream
    /// subscribed to everything writes)
    pub changed_batches: [Arc<Batch>; 2],
}

impl FloorState {
    fn new(generation: u64, all: [Vec<Arc<Resource>>; 4], changed: Vec<Arc<Resource>>) -> FloorState {
        let changed_batches = [Arc::new(Batch::sotw(changed.clone())), Arc::new(Batch::delta(changed.clone()))];
        FloorState { generation, all, changed, changed_batches }
    }
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

impl FloorControl {
    /// Re-translates the assignments of `services` (once, for the one view) and sends them to every
    /// stream that asked for EDS.
    fn publish(&mut self, services: impl IntoIterator<Item = meshfed::model::ServiceKey>) {
        let mut changed = Vec::new();
        for k in services {
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
        self.state.send_replace(Arc::new(FloorState::new(prev.generation + 1, all, changed)));
    }
}

impl ControlHandler for FloorControl {
    fn change(&mut self, change: &Change) {
        let mut keys = Vec::new();
        for e in self.topology.apply(change) {
            let c = self.registry.apply(e);
            keys.extend(c.services.into_keys());
        }
        self.publish(keys);
    }

    /// The floor of a drain step: meshfed's decision for the covered services (the same pure function),
    /// their assignments re-translated once and sent to every EDS stream — no push loop, no per-proxy
    /// state, no diff against what a proxy holds.
    fn drain(&mut self, capacity: u32, services: usize) -> Result<(), String> {
        let now = std::time::SystemTime::now();
        let policy = super::server::drain_policy(capacity, services, now).map_err(|e| e.to_string())?;
        let clusters = super::topo::CLUSTERS.iter().map(|c| meshfed::model::ClusterId::new(c.0));
        let all = meshfed::traffic::decide_all(
            &policy,
            clusters,
            self.registry.services().values().map(|s| &**s),
            now,
            &Default::default(),
        );
        let covered: Vec<_> = self
            .registry
            .services()
            .iter()
            .filter(|(_, s)| all.decisions.services.contains_key(&s.hostname))
            .map(|(k, _)| k.clone())
            .collect();
        self.ctx.traffic = Arc::new(all.decisions);
        self.publish(covered);
        Ok(())
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

/// The stock floor: tonic's server and encoder.
#[derive(Clone)]
struct FloorService {
    state: watch::Receiver<Arc<FloorState>>,
}

type ResponseStream = ReceiverStream<Result<Response, Status>>;

fn response(delta: bool, t: ResourceType, nonce: u64, resources: impl Into<Payload>) -> Response {
    let resources = resources.into();
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

/// One request as the floor sees it.
struct FloorReq {
    t: Option<ResourceType>,
    /// not an ACK/NACK (no response nonce)
    initial: bool,
    /// per-type streams: the names an initial request subscribes (None: not decoded)
    names: Option<Vec<String>>,
}

/// How a floor stream reads its requests and writes its responses.
trait FloorIo {
    /// The next request; None when the stream ends.
    async fn next(&mut self) -> Option<FloorReq>;
    /// Whether the response could be written.
    async fn send(&mut self, r: Response) -> bool;
}

/// A tonic stream (the stock floor).
struct TonicIo<S> {
    requests: S,
    out: mpsc::Sender<Result<Response, Status>>,
}

impl<S, R> FloorIo for TonicIo<S>
where
    S: futures::Stream<Item = Result<R, Status>> + Unpin + Send,
    R: FloorRequest,
{
    async fn next(&mut self) -> Option<FloorReq> {
        use futures::StreamExt;
        let Some(Ok(req)) = self.requests.next().await else { return None };
        Some(FloorReq { t: ResourceType::from_type_url(req.type_url()), initial: req.is_initial(), names: None })
    }

    async fn send(&mut self, r: Response) -> bool {
        self.out.send(Ok(r)).await.is_ok()
    }
}

/// A stream of meshfed's transport (the zero-copy floor).
struct GrpcIo {
    messages: meshfed::grpc::Messages,
    responses: meshfed::grpc::Responses,
    delta: bool,
    /// a per-type EDS stream (its initial requests' names are decoded)
    per_type: bool,
}

impl FloorIo for GrpcIo {
    async fn next(&mut self) -> Option<FloorReq> {
        let raw = self.messages.message().await.ok()??;
        if self.delta {
            let req = <DeltaDiscoveryRequest as prost::Message>::decode(raw).ok()?;
            let initial = req.is_initial();
            let t =
                if self.per_type { Some(ResourceType::Endpoint) } else { ResourceType::from_type_url(req.type_url()) };
            let names = (self.per_type && initial).then_some(req.resource_names_subscribe);
            Some(FloorReq { t, initial, names })
        } else {
            let req = SotwRequest::decode(raw).ok()?;
            let initial = req.is_initial();
            let t =
                if self.per_type { Some(ResourceType::Endpoint) } else { ResourceType::from_type_url(req.type_url()) };
            let names = if self.per_type && initial { Some(req.names().ok()?) } else { None };
            Some(FloorReq { t, initial, names })
        }
    }

    async fn send(&mut self, r: Response) -> bool {
        let mut chunks = std::collections::VecDeque::new();
        r.grpc_chunks(&mut chunks);
        self.responses.send(chunks).await.is_ok()
    }
}

/// One floor stream: the first request of each type gets every resource of the type; after that, every
/// change gets the assignments it touched. A per-type stream: only those of the names it subscribed.
async fn run_stream(mut io: impl FloorIo, mut state: watch::Receiver<Arc<FloorState>>, delta: bool) {
    let mut answered = [false; 4];
    let mut nonce = 0u64;
    let mut generation = state.borrow_and_update().generation;
    // per-type streams: the names subscribed (None: every resource)
    let mut only: Option<std::collections::HashSet<String>> = None;
    let filter = |only: &Option<std::collections::HashSet<String>>, v: &[Arc<Resource>]| match only {
        None => v.to_vec(),
        Some(names) => v.iter().filter(|r| names.contains(&*r.name)).cloned().collect(),
    };
    loop {
        tokio::select! {
            req = io.next() => {
                let Some(req) = req else { return };
                let Some(t) = req.t else { continue };
                if !req.initial || answered[t.index()] {
                    continue;
                }
                answered[t.index()] = true;
                if let Some(names) = req.names {
                    only = Some(names.into_iter().collect());
                }
                nonce += 1;
                let all = filter(&only, &state.borrow().all[t.index()]);
                if !io.send(response(delta, t, nonce, all)).await {
                    return;
                }
            }
            changed = state.changed() => {
                if changed.is_err() { return }
                let s = state.borrow_and_update().clone();
                // a stream that missed a generation (the watch keeps only the latest) gets every assignment;
                // one subscribed to everything writes the change's entries encoded once
                let next = s.generation == generation + 1;
                let resources = match (&only, next) {
                    (None, true) => Payload::Batch(s.changed_batches[usize::from(delta)].clone()),
                    (_, true) => filter(&only, &s.changed).into(),
                    (_, false) => filter(&only, &s.all[1]).into(),
                };
                generation = s.generation;
                if answered[1] && !resources.resources().is_empty() {
                    nonce += 1;
                    if !io.send(response(delta, ResourceType::Endpoint, nonce, resources)).await {
                        return;
                    }
                }
            }
        }
    }
}

/// The zero-copy floor's streams on one connection.
struct FloorConnection(watch::Receiver<Arc<FloorState>>);

impl meshfed::grpc::Handler for FloorConnection {
    fn open(
        &mut self,
        head: meshfed::grpc::RequestHead,
        messages: meshfed::grpc::Messages,
        responses: meshfed::grpc::Responses,
    ) -> Result<meshfed::grpc::StreamFuture, Status> {
        let (delta, per_type) = match head.path.as_str() {
            super::client::SOTW_PATH => (false, false),
            super::client::DELTA_PATH => (true, false),
            super::eds::EDS_SOTW_PATH => (false, true),
            super::eds::EDS_DELTA_PATH => (true, true),
            _ => return Err(Status::unimplemented("unknown method")),
        };
        Ok(Box::pin(run_stream(GrpcIo { messages, responses, delta, per_type }, self.0.clone(), delta)))
    }
}

impl FloorRequest for SotwRequest {
    fn type_url(&self) -> &str {
        &self.head.type_url
    }
    fn is_initial(&self) -> bool {
        self.head.response_nonce.is_empty()
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
            tokio::spawn(run_stream(TonicIo { requests: request.into_inner(), out: tx }, state, false));
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
            tokio::spawn(run_stream(TonicIo { requests: request.into_inner(), out: tx }, state, true));
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
    const NAME: &'static str = meshfed::xds::SERVICE_NAME;
}

/// Runs the floor on a generated topology of `size`; prints `READY ...` and serves until killed.
pub async fn serve_floor(size: Size, zero_copy: bool, keepalive_timeout: std::time::Duration) -> Result<()> {
    let topology = Topology::new(size);
    let mesh = mesh_config(&topology, "0ms", "0ms")?;
    let mut registry = Registry::new(&mesh);
    for e in topology.initial_events() {
        registry.apply(e);
    }
    let ctx = TContext::from_mesh(&mesh).with_registry(&registry);
    let proxy = meshfed::proxy::Proxy::from_node(Some(&proxy_node(0, &ProxyIdentity::default())))?;
    let view = View::of(&proxy, &registry);
    let all = resources(&ctx, &registry, &view);
    let (state_tx, state_rx) = watch::channel(Arc::new(FloorState::new(1, all, Vec::new())));
    // meshfed's accept queue depth (a fleet of 10,000 connecting through a 1,024-deep queue loses some)
    let listener = meshfed::xds::bind_listener(([127, 0, 0, 1], 0).into())?;
    let xds = listener.local_addr()?;
    if zero_copy {
        // meshfed's transport, with the settings of its ADS listeners
        let config = Arc::new(meshfed::grpc::Config { keepalive_timeout, ..Default::default() });
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let handler = FloorConnection(state_rx.clone());
                tokio::spawn(meshfed::grpc::serve(tcp, handler, config.clone(), std::future::pending()));
            }
        });
        let control = TcpListener::bind("127.0.0.1:0").await?;
        println!("READY xds={xds} control={}", control.local_addr()?);
        return serve_control(control, FloorControl { topology, registry, ctx, view, state: state_tx }).await;
    }
    let svc = FloorService { state: state_rx };
    // the same transport settings as meshfed's ADS server had on tonic (TCP_NODELAY, HTTP/2 keepalive)
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(keepalive_timeout))
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await;
    });
    let control = TcpListener::bind("127.0.0.1:0").await?;
    println!("READY xds={xds} control={}", control.local_addr()?);
    serve_control(control, FloorControl { topology, registry, ctx, view, state: state_tx }).await
}

// ---------------------------------------------------------------------------------------------
// tonic's codec, for the stock floor
// ---------------------------------------------------------------------------------------------

/// Encodes [`Response`]s through tonic's encoder (a per-stream buffer), decodes requests of type `Req` with
/// prost: what a plain tonic server does (meshfed writes [`Response::grpc_chunks`] instead).
#[derive(Debug)]
pub struct XdsCodec<Req>(PhantomData<fn() -> Req>);

impl<Req> Default for XdsCodec<Req> {
    fn default() -> Self {
        XdsCodec(PhantomData)
    }
}

impl<Req: Message + Default + Send + 'static> Codec for XdsCodec<Req> {
    type Encode = Response;
    type Decode = Req;
    type Encoder = ResponseEncoder;
    type Decoder = RequestDecoder<Req>;

    fn encoder(&mut self) -> Self::Encoder {
        ResponseEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(PhantomData)
    }
}

#[derive(Debug)]
pub struct ResponseEncoder;

impl Encoder for ResponseEncoder {
    type Item = Response;
    type Error = Status;

    fn encode(&mut self, item: Response, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.encoded_len());
        item.encode(dst);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        // Small initial buffer: large responses grow it only while they are written.
        BufferSettings::new(4 * 1024, 32 * 1024)
    }
}

#[derive(Debug)]
pub struct RequestDecoder<Req>(PhantomData<fn() -> Req>);

impl<Req> Default for RequestDecoder<Req> {
    fn default() -> Self {
        RequestDecoder(PhantomData)
    }
}

impl<Req: Message + Default> Decoder for RequestDecoder<Req> {
    type Item = Req;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Req>, Status> {
        let msg = Req::decode(src.copy_to_bytes(src.remaining()))
            .map_err(|e| Status::invalid_argument(format!("malformed xDS request: {e}")))?;
        Ok(Some(msg))
    }
}
