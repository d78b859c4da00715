//! The ADS protocol as a client sees it: SotW and Delta streams against an in-process meshfed
//! ([`meshfed_testkit::server::TestServer`]) fed the two-clouds demo, with changes injected as source events.
//!
//! Waits are bounded: [`TIMEOUT`] bounds waiting for something that must happen, and [`QUIET`] is how
//! long a test listens to check that nothing arrives. `QUIET` is only a bound on how long a test looks
//! for a stray response, never a timing assertion: a slow machine can only make such a check weaker,
//! not make it fail. Where possible, a "nothing arrives" check follows a witness (another stream, or
//! the push loop) that proves the change in question was already published.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Any, Struct};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use meshfed::mesh_config::{ClusterSource, MeshConfig};
use meshfed::model::ClusterId;
use meshfed::proxy::string_value;
use meshfed::source::SourceEvent;
use meshfed::topology::{SliceInfo, TopologyObject};
use meshfed::type_url::{self, ResourceType};
use meshfed_testkit::server::{TestServer, copy_demo};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

/// Bound on waiting for something that must happen.
const TIMEOUT: Duration = Duration::from_secs(20);
/// How long a test listens to check that no response arrives (a bound, not a timing assertion).
const QUIET: Duration = Duration::from_millis(400);

const AWS: &str = "aws-use1";
const AZURE: &str = "azure-weu";

const REVIEWS: &str = "outbound|9080||reviews.shop.svc.cluster.local";
const FRONTEND: &str = "outbound|8080||frontend.shop.svc.cluster.local";
const RATINGS_HTTP: &str = "outbound|9080||ratings.shop.svc.cluster.local";
const RATINGS_GRPC: &str = "outbound|9091||ratings.shop.svc.cluster.local";
const REVIEWS_API: &str = "reviews.shop.svc.cluster.local:9080";

/// Awaits `fut`, failing the test if it takes longer than [`TIMEOUT`].
async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {TIMEOUT:?} waiting for {what}"),
    }
}

/// Polls `f` until it returns Some, failing the test after [`TIMEOUT`].
async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {TIMEOUT:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn set<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    names.into_iter().map(str::to_string).collect()
}

// ---------------------------------------------------------------------------------------------
// The demo and changes to it
// ---------------------------------------------------------------------------------------------

/// A copy of the two-clouds demo whose objects tests edit and feed to a server as source events.
struct Demo {
    _dir: tempfile::TempDir,
    mesh: MeshConfig,
    objects: BTreeMap<String, Vec<TopologyObject>>,
}

impl Demo {
    fn load() -> Demo {
        let dir = tempfile::tempdir().expect("tempdir");
        let mesh_path = copy_demo(dir.path(), 0);
        let mesh = MeshConfig::load(&mesh_path).expect("demo mesh config");
        let mut objects = BTreeMap::new();
        for c in &mesh.clusters {
            let ClusterSource::Manifests(path) = &c.source else { panic!("the demo's clusters are manifests") };
            let (objs, errors) = meshfed::source::files::load_cluster_dir(path);
            assert!(errors.is_empty(), "demo files must parse: {errors:?}");
            objects.insert(c.id.to_string(), objs);
        }
        Demo { _dir: dir, mesh, objects }
    }

    fn sync_event(&self, cluster: &str) -> SourceEvent {
        SourceEvent::Sync { cluster: ClusterId::new(cluster), objects: self.objects[cluster].clone() }
    }

    async fn start(&self) -> TestServer {
        let initial = self.objects.keys().map(|c| self.sync_event(c)).collect();
        bounded("the test server to start", TestServer::start(&self.mesh, initial)).await
    }

    fn slice_mut(&mut self, cluster: &str, service: &str) -> &mut SliceInfo {
        self.objects
            .get_mut(cluster)
            .expect("known cluster")
            .iter_mut()
            .find_map(|o| match o {
                TopologyObject::EndpointSlice(s) if &*s.service == service => Some(s),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{cluster} has an EndpointSlice of {service}"))
    }

    /// Drops one endpoint of `service`'s slice in `cluster` (an endpoints-only change).
    fn drop_endpoint(&mut self, cluster: &str, service: &str) {
        let slice = self.slice_mut(cluster, service);
        assert!(slice.endpoints.len() > 1, "{service} in {cluster} has endpoints left to drop");
        slice.endpoints.pop();
    }

    /// Removes `service` (its Service and EndpointSlices) from `cluster`.
    fn remove_service(&mut self, cluster: &str, service: &str) {
        let objs = self.objects.get_mut(cluster).expect("known cluster");
        let before = objs.len();
        objs.retain(|o| match o {
            TopologyObject::Service(s) => &*s.name != service,
            TopologyObject::EndpointSlice(s) => &*s.service != service,
            _ => true,
        });
        assert!(objs.len() < before, "{service} was in {cluster}");
    }

    /// Sends the current objects of `clusters` to `server` and waits until the push loop published a
    /// snapshot built from them (that is, a push after the events, not a snapshot published because a
    /// proxy attached).
    async fn publish(&self, server: &TestServer, clusters: &[&str]) {
        let before = server.push.snapshot().generation;
        for c in clusters {
            server.events.send(self.sync_event(c)).expect("push loop alive");
        }
        let mut rx = server.push.subscribe();
        bounded(
            "the change to be pushed",
            rx.wait_for(|s| s.generation > before && s.changes.trigger != "proxy attached"),
        )
        .await
        .expect("push loop alive");
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------------------------

/// A sidecar in aws-use1 (network aws-net, us-east-1a) without traffic interception. `n` makes its
/// node id (pod `client-<n>`, IP 127.0.50.<n>) unique.
fn node(n: u8) -> Node {
    let meta = [("CLUSTER_ID", AWS), ("NETWORK", "aws-net"), ("INTERCEPTION_MODE", "NONE")];
    Node {
        id: format!("sidecar~127.0.50.{n}~client-{n}.shop~shop.svc.cluster.local"),
        metadata: Some(Struct { fields: meta.iter().map(|(k, v)| (k.to_string(), string_value(v))).collect() }),
        locality: Some(Locality { region: "us-east-1".into(), zone: "us-east-1a".into(), sub_zone: String::new() }),
        ..Default::default()
    }
}

/// The same placement as [`node`], identifying as a proxyless gRPC client.
fn grpc_node(n: u8) -> Node {
    let mut node = node(n);
    node.metadata.as_mut().expect("set").fields.insert("GENERATOR".into(), string_value("grpc"));
    node.user_agent_name = "gRPC Go".into();
    node
}

fn nack_detail(message: &str) -> Option<RpcStatus> {
    Some(RpcStatus { code: Code::InvalidArgument as i32, message: message.into(), details: Vec::new() })
}

// ---------------------------------------------------------------------------------------------
// Decoding resources
// ---------------------------------------------------------------------------------------------

/// The name of a resource of type `type_url` (checking its Any type URL).
fn resource_name(any: &Any, type_url: &str) -> String {
    assert_eq!(any.type_url, type_url, "resource type URL matches the response's");
    match ResourceType::from_type_url(type_url).expect("a served type") {
        ResourceType::Cluster => Cluster::decode(&any.value[..]).expect("Cluster").name,
        ResourceType::Endpoint => ClusterLoadAssignment::decode(&any.value[..]).expect("CLA").cluster_name,
        ResourceType::Listener => Listener::decode(&any.value[..]).expect("Listener").name,
        ResourceType::Route => {
            envoy_types::pb::envoy::config::route::v3::RouteConfiguration::decode(&any.value[..])
                .expect("RouteConfiguration")
                .name
        }
    }
}

fn sotw_names(r: &DiscoveryResponse) -> BTreeSet<String> {
    r.resources.iter().map(|a| resource_name(a, &r.type_url)).collect()
}

fn delta_names(r: &DeltaDiscoveryResponse) -> BTreeSet<String> {
    r.resources
        .iter()
        .map(|x| {
            let any = x.resource.as_ref().expect("a Delta resource carries its body");
            assert_eq!(resource_name(any, &r.type_url), x.name, "Resource.name is the resource's name");
            x.name.clone()
        })
        .collect()
}

fn delta_versions(r: &DeltaDiscoveryResponse) -> BTreeMap<String, String> {
    r.resources.iter().map(|x| (x.name.clone(), x.version.clone())).collect()
}

fn delta_removed(r: &DeltaDiscoveryResponse) -> BTreeSet<String> {
    r.removed_resources.iter().cloned().collect()
}

/// The ClusterLoadAssignment `name` in a SotW EDS response.
fn sotw_cla(r: &DiscoveryResponse, name: &str) -> ClusterLoadAssignment {
    r.resources
        .iter()
        .map(|a| ClusterLoadAssignment::decode(&a.value[..]).expect("CLA"))
        .find(|c| c.cluster_name == name)
        .unwrap_or_else(|| panic!("response carries {name}"))
}

fn lb_endpoint_count(cla: &ClusterLoadAssignment) -> usize {
    cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum()
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

async fn grpc_client(server: &TestServer) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel> {
    bounded("connecting", AggregatedDiscoveryServiceClient::connect(format!("http://{}", server.xds_addr)))
        .await
        .expect("connect to the test server")
}

/// Opens a SotW stream whose first request is `first`; the error, if the server refuses the call.
async fn open_sotw(
    server: &TestServer,
    first: Option<DiscoveryRequest>,
) -> (mpsc::Sender<DiscoveryRequest>, Result<Streaming<DiscoveryResponse>, Status>) {
    let mut client = grpc_client(server).await;
    let (tx, rx) = mpsc::channel(16);
    if let Some(first) = first {
        tx.send(first).await.expect("queued");
    }
    let result = bounded("the SotW stream to open", client.stream_aggregated_resources(ReceiverStream::new(rx))).await;
    (tx, result.map(tonic::Response::into_inner))
}

async fn open_delta(
    server: &TestServer,
    first: Option<DeltaDiscoveryRequest>,
) -> (mpsc::Sender<DeltaDiscoveryRequest>, Result<Streaming<DeltaDiscoveryResponse>, Status>) {
    let mut client = grpc_client(server).await;
    let (tx, rx) = mpsc::channel(16);
    if let Some(first) = first {
        tx.send(first).await.expect("queued");
    }
    let result = bounded("the Delta stream to open", client.delta_aggregated_resources(ReceiverStream::new(rx))).await;
    (tx, result.map(tonic::Response::into_inner))
}

/// Reads one message, `None` if nothing arrives within `dur`; panics if the stream ends or fails.
async fn recv_within<T>(rx: &mut Streaming<T>, dur: Duration) -> Option<T> {
    match tokio::time::timeout(dur, rx.message()).await {
        Err(_) => None,
        Ok(Ok(Some(m))) => Some(m),
        Ok(Ok(None)) => panic!("the server ended the stream"),
        Ok(Err(status)) => panic!("the stream failed: {status:?}"),
    }
}

/// The status a stream ends with: from opening it, or from its first message.
async fn expect_failure<T: std::fmt::Debug>(opened: Result<Streaming<T>, Status>) -> Status {
    let mut rx = match opened {
        Err(status) => return status,
        Ok(rx) => rx,
    };
    match bounded("the stream to fail", rx.message()).await {
        Err(status) => status,
        Ok(other) => panic!("expected the stream to fail, got {other:?}"),
    }
}

/// A SotW ADS client. The node goes with the first request only (as Envoy sends it).
struct SotwClient {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
    node: Option<Node>,
}

impl SotwClient {
    async fn connect(server: &TestServer, node: Node) -> SotwClient {
        let (tx, rx) = open_sotw(server, None).await;
        SotwClient { tx, rx: rx.expect("stream opens"), node: Some(node) }
    }

    async fn send(&mut self, mut req: DiscoveryRequest) {
        if let Some(node) = self.node.take() {
            req.node = Some(node);
        }
        bounded("sending a request", self.tx.send(req)).await.expect("request stream open");
    }

    /// Subscribes (or changes the subscription of) `type_url` to `names` (empty: wildcard on the first
    /// request), acknowledging `nonce`.
    async fn request(&mut self, type_url: &str, names: &[&str], version: &str, nonce: &str) {
        self.send(DiscoveryRequest {
            version_info: version.into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            type_url: type_url.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        })
        .await
    }

    async fn ack(&mut self, resp: &DiscoveryResponse, names: &[&str]) {
        self.request(&resp.type_url, names, &resp.version_info, &resp.nonce).await
    }

    /// Rejects `resp`, keeping `accepted_version` (the last version this client accepted).
    async fn nack(&mut self, resp: &DiscoveryResponse, names: &[&str], accepted_version: &str, message: &str) {
        self.send(DiscoveryRequest {
            version_info: accepted_version.into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail: nack_detail(message),
            ..Default::default()
        })
        .await
    }

    async fn recv_timeout(&mut self, dur: Duration) -> Option<DiscoveryResponse> {
        recv_within(&mut self.rx, dur).await
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        self.recv_timeout(TIMEOUT).await.unwrap_or_else(|| panic!("no response within {TIMEOUT:?}"))
    }

    /// Receives the next response and checks its type.
    async fn recv_type(&mut self, type_url: &str) -> DiscoveryResponse {
        let r = self.recv().await;
        assert_eq!(r.type_url, type_url, "response type (resources: {:?})", sotw_names(&r));
        assert!(!r.nonce.is_empty(), "responses carry a nonce");
        r
    }

    /// Subscribes `type_url` to `names`, receives the response and ACKs it.
    async fn subscribe_and_ack(&mut self, type_url: &str, names: &[&str]) -> DiscoveryResponse {
        self.request(type_url, names, "", "").await;
        let r = self.recv_type(type_url).await;
        self.ack(&r, names).await;
        r
    }

    /// Checks that no response arrives within [`QUIET`].
    async fn expect_silence(&mut self, context: &str) {
        if let Some(r) = self.recv_timeout(QUIET).await {
            panic!("{context}: unexpected {} response with {:?}", r.type_url, sotw_names(&r));
        }
    }
}

/// A Delta ADS client. The node goes with the first request only.
struct DeltaClient {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
    node: Option<Node>,
}

impl DeltaClient {
    async fn connect(server: &TestServer, node: Node) -> DeltaClient {
        let (tx, rx) = open_delta(server, None).await;
        DeltaClient { tx, rx: rx.expect("stream opens"), node: Some(node) }
    }

    async fn send(&mut self, mut req: DeltaDiscoveryRequest) {
        if let Some(node) = self.node.take() {
            req.node = Some(node);
        }
        bounded("sending a request", self.tx.send(req)).await.expect("request stream open");
    }

    async fn subscribe(&mut self, type_url: &str, names: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        })
        .await
    }

    async fn unsubscribe(&mut self, type_url: &str, names: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_unsubscribe: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        })
        .await
    }

    async fn ack(&mut self, resp: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await
    }

    async fn nack(&mut self, resp: &DeltaDiscoveryResponse, message: &str) {
        self.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail: nack_detail(message),
            ..Default::default()
        })
        .await
    }

    async fn recv_timeout(&mut self, dur: Duration) -> Option<DeltaDiscoveryResponse> {
        recv_within(&mut self.rx, dur).await
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        self.recv_timeout(TIMEOUT).await.unwrap_or_else(|| panic!("no response within {TIMEOUT:?}"))
    }

    async fn recv_type(&mut self, type_url: &str) -> DeltaDiscoveryResponse {
        let r = self.recv().await;
        assert_eq!(
            r.type_url,
            type_url,
            "response type (resources: {:?}, removed: {:?})",
            delta_names(&r),
            r.removed_resources
        );
        assert!(!r.nonce.is_empty(), "responses carry a nonce");
        r
    }

    async fn subscribe_and_ack(&mut self, type_url: &str, names: &[&str]) -> DeltaDiscoveryResponse {
        self.subscribe(type_url, names).await;
        let r = self.recv_type(type_url).await;
        self.ack(&r).await;
        r
    }

    async fn expect_silence(&mut self, context: &str) {
        if let Some(r) = self.recv_timeout(QUIET).await {
            panic!(
                "{context}: unexpected {} response with {:?}, removed {:?}",
                r.type_url,
                delta_names(&r),
                r.removed_resources
            );
        }
    }
}

/// The sync status of `t` on the connection of proxy `client-<n>.shop`.
fn status(server: &TestServer, n: u8, t: ResourceType) -> Option<meshfed::xds::connections::TypeStatus> {
    let conn = server.connections.find(&format!("client-{n}.shop"))?;
    Some(conn.status()[t.index()].clone())
}

// ---------------------------------------------------------------------------------------------
// 1. SotW subscriptions and ACKs
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sotw_cds_wildcard_and_named_eds_are_answered_once() {
    let demo = Demo::load();
    let server = demo.start().await;
    let mut c = SotwClient::connect(&server, node(1)).await;

    c.request(type_url::CLUSTER, &[], "", "").await;
    let cds = c.recv_type(type_url::CLUSTER).await;
    let clusters = sotw_names(&cds);
    for name in [REVIEWS, FRONTEND, RATINGS_HTTP, RATINGS_GRPC] {
        assert!(clusters.contains(name), "CDS wildcard carries {name}: {clusters:?}");
    }
    assert!(!cds.version_info.is_empty(), "SotW responses carry a version");
    c.ack(&cds, &[]).await;
    c.expect_silence("after the CDS ACK").await;

    let names = [REVIEWS, FRONTEND];
    c.request(type_url::ENDPOINT, &names, "", "").await;
    let eds = c.recv_type(type_url::ENDPOINT).await;
    assert_eq!(sotw_names(&eds), set(names), "EDS answers exactly the named assignments");
    assert_eq!(eds.resources.len(), 2, "each assignment once");
    assert!(lb_endpoint_count(&sotw_cla(&eds, REVIEWS)) > 0, "reviews has endpoints");
    c.ack(&eds, &names).await;
    c.expect_silence("after the EDS ACK").await;

    let st = eventually("the EDS ACK to be recorded", || {
        status(&server, 1, ResourceType::Endpoint).filter(|s| s.acked_nonce == eds.nonce)
    })
    .await;
    assert!(st.last_error.is_none());
    assert_eq!(st.subscribed_names, 2);
    assert!(!st.wildcard);

    // After the ACK, requests still carry the latest nonce: a changed list is answered.
    let more = [REVIEWS, FRONTEND, RATINGS_HTTP];
    c.request(type_url::ENDPOINT, &more, &eds.version_info, &eds.nonce).await;
    let eds2 = c.recv_type(type_url::ENDPOINT).await;
    assert!(sotw_names(&eds2).contains(RATINGS_HTTP), "{:?}", sotw_names(&eds2));
    assert!(sotw_names(&eds2).is_subset(&set(more)), "{:?}", sotw_names(&eds2));
    c.ack(&eds2, &more).await;
    c.expect_silence("after the second EDS ACK").await;
}

/// A client that reconnects may send the nonce it last saw on its previous stream: the first request
/// of a type on a stream is an initial request whatever its nonce.
#[tokio::test]
async fn sotw_first_request_with_a_nonce_from_an_earlier_stream_is_answered() {
    let demo = Demo::load();
    let server = demo.start().await;
    let cds = {
        let mut c = SotwClient::connect(&server, node(1)).await;
        c.subscribe_and_ack(type_url::CLUSTER, &[]).await
    };
    let mut c = SotwClient::connect(&server, node(1)).await;
    c.request(type_url::CLUSTER, &[], &cds.version_info, &cds.nonce).await;
    let again = c.recv_type(type_url::CLUSTER).await;
    assert_eq!(sotw_names(&again), sotw_names(&cds), "the complete state again");
    c.ack(&again, &[]).await;
    c.expect_silence("after the ACK").await;
}

// ---------------------------------------------------------------------------------------------
// 2. NACK
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sotw_nack_is_recorded_and_not_resent_until_content_changes() {
    let mut demo = Demo::load();
    let server = demo.start().await;
    let mut c = SotwClient::connect(&server, node(1)).await;
    c.subscribe_and_ack(type_url::CLUSTER, &[]).await;

    let names = [REVIEWS, FRONTEND];
    c.request(type_url::ENDPOINT, &names, "", "").await;
    let rejected = c.recv_type(type_url::ENDPOINT).await;
    assert_eq!(sotw_names(&rejected), set(names));
    let endpoints_before = lb_endpoint_count(&sotw_cla(&rejected, REVIEWS));
    c.nack(&rejected, &names, "", "test rejects these assignments").await;

    let st = eventually("the NACK to be recorded", || {
        status(&server, 1, ResourceType::Endpoint).filter(|s| s.last_error.is_some())
    })
    .await;
    assert_eq!(st.last_error.as_deref(), Some("test rejects these assignments"));
    assert_eq!(st.nacks, 1);
    assert_eq!(
        server.connections.list()[0].status()[ResourceType::Endpoint.index()].last_error.as_deref(),
        Some("test rejects these assignments")
    );
    c.expect_silence("after a NACK, the rejected version is not sent again").await;

    // A real change of reviews' assignment is a new version: it is sent (and only it: frontend's
    // rejected version did not change).
    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;
    let update = c.recv_type(type_url::ENDPOINT).await;
    assert_eq!(sotw_names(&update), set([REVIEWS]), "only the changed assignment is sent");
    assert_eq!(lb_endpoint_count(&sotw_cla(&update, REVIEWS)), endpoints_before - 1);
    assert_ne!(update.version_info, rejected.version_info, "a new version");
    assert_ne!(update.nonce, rejected.nonce, "a new nonce");
    c.ack(&update, &names).await;
    eventually("the ACK to clear the error", || {
        status(&server, 1, ResourceType::Endpoint).filter(|s| s.acked_nonce == update.nonce && s.last_error.is_none())
    })
    .await;
    c.expect_silence("after the ACK").await;
}

#[tokio::test]
async fn delta_nack_is_recorded_and_not_resent_until_content_changes() {
    let mut demo = Demo::load();
    let server = demo.start().await;
    let mut c = DeltaClient::connect(&server, node(1)).await;
    c.subscribe_and_ack(type_url::CLUSTER, &[]).await;

    let names = [REVIEWS, FRONTEND];
    c.subscribe(type_url::ENDPOINT, &names).await;
    let rejected = c.recv_type(type_url::ENDPOINT).await;
    assert_eq!(delta_names(&rejected), set(names));
    c.nack(&rejected, "test rejects these assignments").await;
    let st = eventually("the NACK to be recorded", || {
        status(&server, 1, ResourceType::Endpoint).filter(|s| s.last_error.is_some())
    })
    .await;
    assert_eq!(st.last_error.as_deref(), Some("test rejects these assignments"));
    c.expect_silence("after a NACK, the rejected versions are not sent again").await;

    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;
    let update = c.recv_type(type_url::ENDPOINT).await;
    assert_eq!(delta_names(&update), set([REVIEWS]), "only the changed assignment is sent");
    assert!(update.removed_resources.is_empty());
    assert_ne!(
        delta_versions(&update)[REVIEWS],
        delta_versions(&rejected)[REVIEWS],
        "the changed assignment has a new version"
    );
    c.ack(&update).await;
    eventually("the ACK to clear the error", || {
        status(&server, 1, ResourceType::Endpoint).filter(|s| s.acked_nonce == update.nonce && s.last_error.is_none())
    })
    .await;
    c.expect_silence("after the ACK").await;
}

/// Delta lets several responses be in flight. A client that NACKs a response after the server sent a
/// newer one for the same resource holds what that newer response carried (once it ACKs it): the
/// NACK must not make the server believe the client went back to the version before the NACKed one,
/// or a later change back to exactly that version would never be sent.
#[tokio::test]
async fn delta_nack_of_a_superseded_response_keeps_the_newer_state() {
    let mut demo = Demo::load();
    let original = demo.objects.clone();
    let server = demo.start().await;
    let mut c = DeltaClient::connect(&server, node(1)).await;
    c.subscribe_and_ack(type_url::CLUSTER, &[]).await;
    let v0 = c.subscribe_and_ack(type_url::ENDPOINT, &[REVIEWS]).await;

    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;
    let n1 = c.recv_type(type_url::ENDPOINT).await;
    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;
    let n2 = c.recv_type(type_url::ENDPOINT).await;
    assert_eq!(delta_names(&n2), set([REVIEWS]));
    c.nack(&n1, "test rejects the first update").await;
    c.ack(&n2).await;
    eventually("the ACK of the newer response", || {
        status(&server, 1, ResourceType::Endpoint).filter(|s| s.acked_nonce == n2.nonce)
    })
    .await;

    // The client holds n2's version; the original content is a change for it.
    demo.objects = original;
    demo.publish(&server, &[AWS]).await;
    let back = c.recv_type(type_url::ENDPOINT).await;
    assert_eq!(delta_versions(&back)[REVIEWS], delta_versions(&v0)[REVIEWS], "the original content again");
    c.ack(&back).await;
    c.expect_silence("after the ACK").await;
}

/// The SotW counterpart: the NACK of an older response is stale and ignored; the newer one counts.
#[tokio::test]
async fn sotw_nack_of_a_superseded_response_keeps_the_newer_state() {
    let mut demo = Demo::load();
    let original = demo.objects.clone();
    let server = demo.start().await;
    let mut c = SotwClient::connect(&server, node(1)).await;
    c.subscribe_and_ack(type_url::CLUSTER, &[]).await;
    let v0 = c.subscribe_and_ack(type_url::ENDPOINT, &[REVIEWS]).await;
    let endpoints_v0 = lb_endpoint_count(&sotw_cla(&v0, REVIEWS));

    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;
    let n1 = c.recv_type(type_url::ENDPOINT).await;
    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;
    let n2 = c.recv_type(type_url::ENDPOINT).await;
    assert_eq!(sotw_names(&n2), set([REVIEWS]));
    c.nack(&n1, &[REVIEWS], &v0.version_info, "test rejects the first update").await;
    c.ack(&n2, &[REVIEWS]).await;
    eventually("the ACK of the newer response", || {
        status(&server, 1, ResourceType::Endpoint).filter(|s| s.acked_nonce == n2.nonce)
    })
    .await;

    demo.objects = original;
    demo.publish(&server, &[AWS]).await;
    let back = c.recv_type(type_url::ENDPOINT).await;
    assert_eq!(lb_endpoint_count(&sotw_cla(&back, REVIEWS)), endpoints_v0, "the original content again");
    c.ack(&back, &[REVIEWS]).await;
    c.expect_silence("after the ACK").await;
}

/// A NACK that arrives after the server already sent a newer response (a push racing the client) still
/// counts: the rejection is recorded, and the client is known to hold what it had before.
#[tokio::test]
async fn sotw_nack_racing_a_newer_push_is_recorded() {
    let mut demo = Demo::load();
    let original = demo.objects.clone();
    let server = demo.start().await;
    let mut c = SotwClient::connect(&server, node(1)).await;
    c.subscribe_and_ack(type_url::CLUSTER, &[]).await;
    let names = [REVIEWS, FRONTEND];
    c.subscribe_and_ack(type_url::ENDPOINT, &names).await;

    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;
    let n1 = c.recv_type(type_url::ENDPOINT).await;
    assert_eq!(sotw_names(&n1), set([REVIEWS]));
    demo.drop_endpoint(AWS, "frontend");
    demo.publish(&server, &[AWS]).await;
    let n2 = c.recv_type(type_url::ENDPOINT).await;
    assert_eq!(sotw_names(&n2), set([FRONTEND]));
    // the client answers n1 only now: a NACK carrying the older nonce
    c.nack(&n1, &names, "", "test rejects the reviews update").await;
    c.ack(&n2, &names).await;
    let s = eventually("the NACK of the older response and the ACK of the newer", || {
        status(&server, 1, ResourceType::Endpoint).filter(|s| s.acked_nonce == n2.nonce && s.nacks == 1)
    })
    .await;
    assert_eq!(s.nacks, 1);

    // reviews back to the content the client kept: nothing to send (the client never took the update)
    demo.objects = original;
    demo.publish(&server, &[AWS]).await;
    let back = c.recv_type(type_url::ENDPOINT).await;
    assert_eq!(sotw_names(&back), set([FRONTEND]), "only frontend differs from what the client holds");
    c.ack(&back, &names).await;
    c.expect_silence("after the ACK").await;
}

// ---------------------------------------------------------------------------------------------
// 3. Stale nonce
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sotw_request_with_stale_nonce_is_ignored() {
    let demo = Demo::load();
    let server = demo.start().await;
    let mut c = SotwClient::connect(&server, node(1)).await;
    c.subscribe_and_ack(type_url::CLUSTER, &[]).await;

    c.request(type_url::ENDPOINT, &[REVIEWS], "", "").await;
    let first = c.recv_type(type_url::ENDPOINT).await;
    assert_eq!(sotw_names(&first), set([REVIEWS]));
    // ACK while adding a name: a newer response follows.
    c.request(type_url::ENDPOINT, &[REVIEWS, FRONTEND], &first.version_info, &first.nonce).await;
    let second = c.recv_type(type_url::ENDPOINT).await;
    assert!(sotw_names(&second).contains(FRONTEND), "{:?}", sotw_names(&second));
    assert_ne!(second.nonce, first.nonce);

    // A request answering the older response, with a changed list, is stale: ignored.
    let all = [REVIEWS, FRONTEND, RATINGS_HTTP];
    c.request(type_url::ENDPOINT, &all, &first.version_info, &first.nonce).await;
    c.expect_silence("a request with a stale nonce").await;

    // The same change with the latest nonce is answered, which also shows that the stale request did
    // not change the subscription (an unchanged list would draw no response).
    c.request(type_url::ENDPOINT, &all, &second.version_info, &second.nonce).await;
    let third = c.recv_type(type_url::ENDPOINT).await;
    assert!(sotw_names(&third).contains(RATINGS_HTTP), "{:?}", sotw_names(&third));
    c.ack(&third, &all).await;
    c.expect_silence("after the ACK").await;
}

// ---------------------------------------------------------------------------------------------
// 4. Unsubscribe
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sotw_empty_resource_list_unsubscribes_named_eds() {
    let mut demo = Demo::load();
    let server = demo.start().await;
    let mut c = SotwClient::connect(&server, node(1)).await;
    c.subscribe_and_ack(type_url::CLUSTER, &[]).await;
    let eds = c.subscribe_and_ack(type_url::ENDPOINT, &[REVIEWS]).await;
    assert_eq!(sotw_names(&eds), set([REVIEWS]));
    // A witness that stays subscribed: it proves the change reached the streams.
    let mut witness = SotwClient::connect(&server, node(2)).await;
    witness.subscribe_and_ack(type_url::CLUSTER, &[]).await;
    witness.subscribe_and_ack(type_url::ENDPOINT, &[REVIEWS]).await;

    c.request(type_url::ENDPOINT, &[], &eds.version_info, &eds.nonce).await;
    c.expect_silence("unsubscribing").await;
    eventually("the unsubscription to be recorded", || {
        status(&server, 1, ResourceType::Endpoint).filter(|s| s.subscribed_names == 0 && !s.wildcard)
    })
    .await;

    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;
    let seen = witness.recv_type(type_url::ENDPOINT).await;
    assert_eq!(sotw_names(&seen), set([REVIEWS]));
    c.expect_silence("an endpoint change after unsubscribing").await;
}

#[tokio::test]
async fn delta_unsubscribe_stops_updates() {
    let mut demo = Demo::load();
    let server = demo.start().await;
    let mut c = DeltaClient::connect(&server, node(1)).await;
    c.subscribe_and_ack(type_url::CLUSTER, &[]).await;
    let eds = c.subscribe_and_ack(type_url::ENDPOINT, &[REVIEWS, FRONTEND]).await;
    assert_eq!(delta_names(&eds), set([REVIEWS, FRONTEND]));
    let mut witness = DeltaClient::connect(&server, node(2)).await;
    witness.subscribe_and_ack(type_url::CLUSTER, &[]).await;
    witness.subscribe_and_ack(type_url::ENDPOINT, &[REVIEWS]).await;

    c.unsubscribe(type_url::ENDPOINT, &[REVIEWS]).await;
    c.expect_silence("unsubscribing").await;
    eventually("the unsubscription to be recorded", || {
        status(&server, 1, ResourceType::Endpoint).filter(|s| s.subscribed_names == 1)
    })
    .await;

    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;
    let seen = witness.recv_type(type_url::ENDPOINT).await;
    assert_eq!(delta_names(&seen), set([REVIEWS]));
    c.expect_silence("an endpoint change after unsubscribing").await;
}

// ---------------------------------------------------------------------------------------------
// 5. Delta subscriptions, pushes and removals
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn delta_subscriptions_pushes_and_removals() {
    let mut demo = Demo::load();
    let server = demo.start().await;
    let mut c = DeltaClient::connect(&server, node(1)).await;

    c.subscribe(type_url::CLUSTER, &[]).await;
    let cds = c.recv_type(type_url::CLUSTER).await;
    let clusters = delta_names(&cds);
    for name in [REVIEWS, FRONTEND, RATINGS_HTTP, RATINGS_GRPC] {
        assert!(clusters.contains(name), "CDS wildcard carries {name}: {clusters:?}");
    }
    assert!(cds.removed_resources.is_empty());
    assert!(cds.resources.iter().all(|r| !r.version.is_empty()), "Delta resources carry versions");
    c.ack(&cds).await;
    c.expect_silence("after the CDS ACK").await;

    let eds_names = [REVIEWS, FRONTEND, RATINGS_HTTP, RATINGS_GRPC];
    c.subscribe(type_url::ENDPOINT, &eds_names).await;
    let eds = c.recv_type(type_url::ENDPOINT).await;
    assert_eq!(delta_names(&eds), set(eds_names), "EDS answers exactly the named assignments");
    c.ack(&eds).await;
    c.expect_silence("after the EDS ACK").await;

    // An endpoints-only change: one EDS response with only the changed assignment.
    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;
    let update = c.recv_type(type_url::ENDPOINT).await;
    assert_eq!(delta_names(&update), set([REVIEWS]));
    assert!(update.removed_resources.is_empty());
    assert_ne!(delta_versions(&update)[REVIEWS], delta_versions(&eds)[REVIEWS]);
    c.ack(&update).await;
    c.expect_silence("after an endpoints-only change").await;

    // ratings goes away in both clusters: its clusters and assignments are removed.
    demo.remove_service(AWS, "ratings");
    demo.remove_service(AZURE, "ratings");
    demo.publish(&server, &[AWS, AZURE]).await;
    let gone = set([RATINGS_HTTP, RATINGS_GRPC]);
    let mut removed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let done = |removed: &BTreeMap<String, BTreeSet<String>>| {
        [type_url::CLUSTER, type_url::ENDPOINT].iter().all(|t| removed.get(*t).is_some_and(|r| r == &gone))
    };
    while !done(&removed) {
        let r = c.recv().await;
        assert!(
            r.type_url == type_url::CLUSTER || r.type_url == type_url::ENDPOINT,
            "only the subscribed types: got {}",
            r.type_url
        );
        // (Should both clusters' syncs land in separate pushes, ratings' assignment may first shrink.)
        for name in delta_names(&r) {
            assert!(
                r.type_url == type_url::ENDPOINT && gone.contains(&name),
                "removing ratings sends no other resource: {} {name}",
                r.type_url
            );
        }
        removed.entry(r.type_url.clone()).or_default().extend(delta_removed(&r));
        c.ack(&r).await;
    }
    c.expect_silence("after the removal").await;
}

// ---------------------------------------------------------------------------------------------
// 6. Delta reconnect
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn delta_reconnect_with_initial_resource_versions_sends_only_changes() {
    let mut demo = Demo::load();
    let server = demo.start().await;
    let names = [REVIEWS, FRONTEND];
    let (held_cds, held_eds) = {
        let mut c = DeltaClient::connect(&server, node(1)).await;
        let cds = c.subscribe_and_ack(type_url::CLUSTER, &[]).await;
        let eds = c.subscribe_and_ack(type_url::ENDPOINT, &names).await;
        assert_eq!(delta_names(&eds), set(names));
        (delta_versions(&cds), delta_versions(&eds))
    };
    eventually("the first stream to go away", || server.connections.is_empty().then_some(())).await;

    // While disconnected, reviews' endpoints change (EDS only).
    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;

    let mut c = DeltaClient::connect(&server, node(1)).await;
    c.send(DeltaDiscoveryRequest {
        type_url: type_url::CLUSTER.into(),
        initial_resource_versions: held_cds.clone().into_iter().collect(),
        ..Default::default()
    })
    .await;
    let cds = c.recv_type(type_url::CLUSTER).await;
    assert!(cds.resources.is_empty(), "every cluster is unchanged: {:?}", delta_names(&cds));
    assert!(cds.removed_resources.is_empty(), "nothing was removed: {:?}", cds.removed_resources);
    c.ack(&cds).await;

    c.send(DeltaDiscoveryRequest {
        type_url: type_url::ENDPOINT.into(),
        resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
        initial_resource_versions: held_eds.clone().into_iter().collect(),
        ..Default::default()
    })
    .await;
    let eds = c.recv_type(type_url::ENDPOINT).await;
    assert_eq!(delta_names(&eds), set([REVIEWS]), "only the changed assignment is sent");
    assert_ne!(delta_versions(&eds)[REVIEWS], held_eds[REVIEWS]);
    assert!(eds.removed_resources.is_empty());
    c.ack(&eds).await;
    c.expect_silence("after the reconnect").await;
}

// ---------------------------------------------------------------------------------------------
// 7. An endpoint change reaches only the proxies subscribed to it, only as EDS
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sotw_endpoint_change_reaches_only_subscribed_proxies_as_eds() {
    let mut demo = Demo::load();
    let server = demo.start().await;
    let mut a = SotwClient::connect(&server, node(1)).await;
    let mut b = SotwClient::connect(&server, node(2)).await;
    for (c, eds) in [(&mut a, REVIEWS), (&mut b, FRONTEND)] {
        c.subscribe_and_ack(type_url::CLUSTER, &[]).await;
        c.subscribe_and_ack(type_url::LISTENER, &[]).await;
        let r = c.subscribe_and_ack(type_url::ENDPOINT, &[eds]).await;
        assert_eq!(sotw_names(&r), set([eds]));
    }
    a.expect_silence("A after subscribing").await;
    b.expect_silence("B after subscribing").await;

    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;
    let update = a.recv_type(type_url::ENDPOINT).await;
    assert_eq!(sotw_names(&update), set([REVIEWS]));
    a.ack(&update, &[REVIEWS]).await;
    a.expect_silence("A after the endpoint change").await;
    b.expect_silence("B (not subscribed to reviews) after the endpoint change").await;
}

#[tokio::test]
async fn delta_endpoint_change_reaches_only_subscribed_proxies_as_eds() {
    let mut demo = Demo::load();
    let server = demo.start().await;
    let mut a = DeltaClient::connect(&server, node(1)).await;
    let mut b = DeltaClient::connect(&server, node(2)).await;
    for (c, eds) in [(&mut a, REVIEWS), (&mut b, FRONTEND)] {
        c.subscribe_and_ack(type_url::CLUSTER, &[]).await;
        c.subscribe_and_ack(type_url::LISTENER, &[]).await;
        let r = c.subscribe_and_ack(type_url::ENDPOINT, &[eds]).await;
        assert_eq!(delta_names(&r), set([eds]));
    }
    a.expect_silence("A after subscribing").await;
    b.expect_silence("B after subscribing").await;

    demo.drop_endpoint(AWS, "reviews");
    demo.publish(&server, &[AWS]).await;
    let update = a.recv_type(type_url::ENDPOINT).await;
    assert_eq!(delta_names(&update), set([REVIEWS]));
    assert!(update.removed_resources.is_empty());
    a.ack(&update).await;
    a.expect_silence("A after the endpoint change").await;
    b.expect_silence("B (not subscribed to reviews) after the endpoint change").await;
}

// ---------------------------------------------------------------------------------------------
// 8. Invalid nodes
// ---------------------------------------------------------------------------------------------

fn cds_request(node: Option<Node>) -> DiscoveryRequest {
    DiscoveryRequest { node, type_url: type_url::CLUSTER.into(), ..Default::default() }
}

fn delta_cds_request(node: Option<Node>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest { node, type_url: type_url::CLUSTER.into(), ..Default::default() }
}

fn bad_node() -> Node {
    Node { id: "not-a-node-id".into(), ..node(1) }
}

fn assert_invalid_node_id(status: &Status) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("not-a-node-id"), "the message names the node id: {status:?}");
    assert!(status.message().contains("parts"), "the message says what is wrong: {status:?}");
}

fn assert_missing_node(status: &Status) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("node"), "the message says the node is missing: {status:?}");
}

#[tokio::test]
async fn sotw_invalid_or_missing_node_fails_the_stream() {
    let demo = Demo::load();
    let server = demo.start().await;

    let (_tx, opened) = open_sotw(&server, Some(cds_request(Some(bad_node())))).await;
    assert_invalid_node_id(&expect_failure(opened).await);

    let (_tx, opened) = open_sotw(&server, Some(cds_request(None))).await;
    assert_missing_node(&expect_failure(opened).await);

    assert!(server.connections.is_empty(), "refused streams are not registered");
}

#[tokio::test]
async fn delta_invalid_or_missing_node_fails_the_stream() {
    let demo = Demo::load();
    let server = demo.start().await;

    let (_tx, opened) = open_delta(&server, Some(delta_cds_request(Some(bad_node())))).await;
    assert_invalid_node_id(&expect_failure(opened).await);

    let (_tx, opened) = open_delta(&server, Some(delta_cds_request(None))).await;
    assert_missing_node(&expect_failure(opened).await);

    assert!(server.connections.is_empty(), "refused streams are not registered");
}

// ---------------------------------------------------------------------------------------------
// 9. Unknown type URLs
// ---------------------------------------------------------------------------------------------

const UNKNOWN_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

#[tokio::test]
async fn sotw_unknown_type_gets_an_empty_response_and_the_stream_continues() {
    let demo = Demo::load();
    let server = demo.start().await;
    let mut c = SotwClient::connect(&server, node(1)).await;

    c.request(UNKNOWN_TYPE, &["default"], "", "").await;
    let r = c.recv_type(UNKNOWN_TYPE).await;
    assert!(r.resources.is_empty(), "an empty response");
    c.ack(&r, &["default"]).await;
    c.expect_silence("an ACK of the empty response (answering it would never end)").await;

    c.request(type_url::CLUSTER, &[], "", "").await;
    let cds = c.recv_type(type_url::CLUSTER).await;
    assert!(sotw_names(&cds).contains(REVIEWS));
    c.ack(&cds, &[]).await;
    c.expect_silence("after the CDS ACK").await;
}

#[tokio::test]
async fn delta_unknown_type_is_ignored_and_the_stream_continues() {
    let demo = Demo::load();
    let server = demo.start().await;
    let mut c = DeltaClient::connect(&server, node(1)).await;

    c.subscribe(UNKNOWN_TYPE, &["default"]).await;
    c.expect_silence("an unknown type").await;

    c.subscribe(type_url::CLUSTER, &[]).await;
    let cds = c.recv_type(type_url::CLUSTER).await;
    assert!(delta_names(&cds).contains(REVIEWS));
    c.ack(&cds).await;
    c.expect_silence("after the CDS ACK").await;
}

// ---------------------------------------------------------------------------------------------
// 10. Deterministic versions
// ---------------------------------------------------------------------------------------------

/// (CDS name -> version, EDS name -> version) a Delta client with `node(1)` gets (EDS: wildcard).
async fn delta_versions_of(server: &TestServer) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut c = DeltaClient::connect(server, node(1)).await;
    let cds = c.subscribe_and_ack(type_url::CLUSTER, &[]).await;
    let eds = c.subscribe_and_ack(type_url::ENDPOINT, &[]).await;
    (delta_versions(&cds), delta_versions(&eds))
}

/// (CDS version, EDS version, the resources' bytes) a SotW client with `node(1)` gets.
async fn sotw_state_of(server: &TestServer, eds: &[&str]) -> (String, String, Vec<Vec<u8>>) {
    let mut c = SotwClient::connect(server, node(1)).await;
    let cds = c.subscribe_and_ack(type_url::CLUSTER, &[]).await;
    let eds = c.subscribe_and_ack(type_url::ENDPOINT, eds).await;
    let mut bodies: Vec<Vec<u8>> = cds.resources.iter().chain(&eds.resources).map(|a| a.value.clone()).collect();
    bodies.sort();
    (cds.version_info, eds.version_info, bodies)
}

#[tokio::test]
async fn versions_are_deterministic_across_servers() {
    let demo = Demo::load();
    let one = demo.start().await;
    let two = demo.start().await;

    let (cds1, eds1) = delta_versions_of(&one).await;
    let (cds2, eds2) = delta_versions_of(&two).await;
    assert!(cds1.contains_key(REVIEWS) && eds1.contains_key(REVIEWS), "{cds1:?} {eds1:?}");
    assert_eq!(cds1, cds2, "CDS versions");
    assert_eq!(eds1, eds2, "EDS versions");

    let names = [REVIEWS, FRONTEND, RATINGS_HTTP, RATINGS_GRPC];
    let sotw1 = sotw_state_of(&one, &names).await;
    let sotw2 = sotw_state_of(&two, &names).await;
    assert_eq!(sotw1, sotw2, "SotW versions and resources");
}

// ---------------------------------------------------------------------------------------------
// 11. api_listeners for proxyless gRPC
// ---------------------------------------------------------------------------------------------

fn listeners(r: &DiscoveryResponse) -> Vec<Listener> {
    r.resources.iter().map(|a| Listener::decode(&a.value[..]).expect("Listener")).collect()
}

#[tokio::test]
async fn sotw_api_listeners_only_by_name() {
    let demo = Demo::load();
    let server = demo.start().await;

    let mut grpc = SotwClient::connect(&server, grpc_node(1)).await;
    let lds = grpc.subscribe_and_ack(type_url::LISTENER, &[REVIEWS_API]).await;
    let got = listeners(&lds);
    assert_eq!(got.len(), 1, "exactly the named listener: {:?}", sotw_names(&lds));
    assert_eq!(got[0].name, REVIEWS_API);
    assert!(got[0].api_listener.as_ref().is_some_and(|a| a.api_listener.is_some()), "an api_listener");
    grpc.expect_silence("after the LDS ACK").await;

    let mut envoy = SotwClient::connect(&server, node(2)).await;
    let lds = envoy.subscribe_and_ack(type_url::LISTENER, &[]).await;
    let got = listeners(&lds);
    assert!(!got.is_empty(), "a sidecar has listeners");
    for l in &got {
        assert!(l.api_listener.is_none(), "wildcard LDS carries no api_listener: {}", l.name);
    }
    assert!(!sotw_names(&lds).contains(REVIEWS_API));
}

#[tokio::test]
async fn delta_api_listeners_only_by_name() {
    let demo = Demo::load();
    let server = demo.start().await;

    let mut grpc = DeltaClient::connect(&server, grpc_node(1)).await;
    let lds = grpc.subscribe_and_ack(type_url::LISTENER, &[REVIEWS_API]).await;
    assert_eq!(delta_names(&lds), set([REVIEWS_API]));
    let l = Listener::decode(&lds.resources[0].resource.as_ref().expect("body").value[..]).expect("Listener");
    assert!(l.api_listener.is_some(), "an api_listener");
    grpc.expect_silence("after the LDS ACK").await;

    let mut envoy = DeltaClient::connect(&server, node(2)).await;
    let lds = envoy.subscribe_and_ack(type_url::LISTENER, &[]).await;
    assert!(!lds.resources.is_empty(), "a sidecar has listeners");
    for r in &lds.resources {
        let l = Listener::decode(&r.resource.as_ref().expect("body").value[..]).expect("Listener");
        assert!(l.api_listener.is_none(), "wildcard LDS carries no api_listener: {}", l.name);
    }
}
