//! Beside istiod, the xDS protocol as Envoy speaks it to meshfed: per-type EDS streams
//! (`EndpointDiscoveryService/StreamEndpoints` and `/DeltaEndpoints`), one per cluster whose EDS an
//! EnvoyFilter points at meshfed, all on one HTTP/2 connection with the same node; and istioctl's `adsc`
//! client, which sets a nonce on its first request. Against an in-process meshfed fed the two-clouds demo.
//!
//! Waits are bounded by [`TIMEOUT`]; [`QUIET`] is how long a test listens to check that nothing arrives
//! (a bound, never a timing assertion: a slow machine can only make such a check weaker).

use std::future::Future;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Struct;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use meshfed::mesh_config::{ClusterSource, MeshConfig};
use meshfed::model::ClusterId;
use meshfed::proxy::string_value;
use meshfed::source::SourceEvent;
use meshfed::topology::TopologyObject;
use meshfed::type_url;
use meshfed::xds::connections::XdsService;
use meshfed_testkit::server::{TestServer, copy_demo};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const TIMEOUT: Duration = Duration::from_secs(20);
const QUIET: Duration = Duration::from_millis(400);

const REVIEWS: &str = "outbound|9080||reviews.shop.svc.cluster.local";
const RATINGS: &str = "outbound|9080||ratings.shop.svc.cluster.local";
const FRONTEND: &str = "outbound|8080||frontend.shop.svc.cluster.local";
/// a service meshfed does not know (an EnvoyFilter selecting the wrong hosts)
const UNKNOWN: &str = "outbound|80||nobody.elsewhere.svc.cluster.local";

async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {TIMEOUT:?} waiting for {what}"),
    }
}

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

/// The demo's objects by cluster, to edit and send as source events.
struct Demo {
    _dir: tempfile::TempDir,
    mesh: MeshConfig,
    objects: Vec<(String, Vec<TopologyObject>)>,
}

impl Demo {
    fn load() -> Demo {
        let dir = tempfile::tempdir().expect("tempdir");
        let mesh = MeshConfig::load(&copy_demo(dir.path(), 0)).expect("demo mesh config");
        let objects = mesh
            .clusters
            .iter()
            .map(|c| {
                let ClusterSource::Manifests(path) = &c.source else { panic!("the demo's clusters are manifests") };
                let (objs, errors) = meshfed::source::files::load_cluster_dir(path);
                assert!(errors.is_empty(), "demo files must parse: {errors:?}");
                (c.id.to_string(), objs)
            })
            .collect();
        Demo { _dir: dir, mesh, objects }
    }

    fn event(&self, cluster: &str) -> SourceEvent {
        let objects = self.objects.iter().find(|(c, _)| c == cluster).expect("known cluster").1.clone();
        SourceEvent::Sync { cluster: ClusterId::new(cluster), objects }
    }

    async fn start(&self) -> TestServer {
        let initial = self.objects.iter().map(|(c, _)| self.event(c)).collect();
        bounded("the test server to start", TestServer::start(&self.mesh, initial)).await
    }

    /// Drops one endpoint of `service` in `cluster` and publishes the change.
    async fn drop_endpoint(&mut self, server: &TestServer, cluster: &str, service: &str) {
        let objs = &mut self.objects.iter_mut().find(|(c, _)| c == cluster).expect("known cluster").1;
        let slice = objs
            .iter_mut()
            .find_map(|o| match o {
                TopologyObject::EndpointSlice(s) if &*s.service == service => Some(s),
                _ => None,
            })
            .expect("a slice of the service");
        assert!(slice.endpoints.len() > 1);
        slice.endpoints.pop();
        let before = server.push.snapshot().generation;
        server.events.send(self.event(cluster)).expect("push loop alive");
        let mut rx = server.push.subscribe();
        bounded(
            "the change to be pushed",
            rx.wait_for(|s| s.generation > before && s.changes.trigger != "proxy attached"),
        )
        .await
        .expect("push loop alive");
    }
}

/// An istiod-managed sidecar in aws-use1, as istiod's bootstrap describes it (the same node it sends
/// meshfed's EDS streams).
fn sidecar(n: u8) -> Node {
    let meta = [
        ("CLUSTER_ID", "aws-use1"),
        ("NETWORK", "aws-net"),
        ("ISTIO_VERSION", "1.28.0"),
        ("NAMESPACE", "shop"),
        ("INTERCEPTION_MODE", "REDIRECT"),
    ];
    Node {
        id: format!("sidecar~10.0.0.{n}~client-{n}.shop~shop.svc.cluster.local"),
        cluster: "client.shop".into(),
        metadata: Some(Struct { fields: meta.iter().map(|(k, v)| (k.to_string(), string_value(v))).collect() }),
        locality: Some(Locality { region: "us-east-1".into(), zone: "us-east-1a".into(), sub_zone: String::new() }),
        user_agent_name: "envoy".into(),
        ..Default::default()
    }
}

async fn channel(server: &TestServer) -> Channel {
    Channel::from_shared(format!("http://{}", server.xds_addr)).unwrap().connect().await.expect("connect")
}

/// One SotW `StreamEndpoints` stream.
struct SotwEds {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl SotwEds {
    /// Opens a stream on `channel` and asks for `names`, as Envoy does for an EDS cluster.
    async fn open(channel: &Channel, node: &Node, names: &[&str]) -> SotwEds {
        let (tx, req_rx) = mpsc::channel(16);
        tx.send(DiscoveryRequest {
            node: Some(node.clone()),
            type_url: type_url::ENDPOINT.into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut client = EndpointDiscoveryServiceClient::new(channel.clone());
        let rx = bounded("StreamEndpoints to open", client.stream_endpoints(ReceiverStream::new(req_rx)))
            .await
            .expect("StreamEndpoints is served")
            .into_inner();
        SotwEds { tx, rx }
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        bounded("an EDS response", self.rx.message()).await.expect("stream open").expect("a response")
    }

    async fn quiet(&mut self) -> bool {
        tokio::time::timeout(QUIET, self.rx.message()).await.is_err()
    }

    async fn ack(&self, r: &DiscoveryResponse, names: &[&str]) {
        self.tx
            .send(DiscoveryRequest {
                version_info: r.version_info.clone(),
                response_nonce: r.nonce.clone(),
                type_url: type_url::ENDPOINT.into(),
                resource_names: names.iter().map(|n| n.to_string()).collect(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

fn assignments(r: &DiscoveryResponse) -> Vec<ClusterLoadAssignment> {
    r.resources.iter().map(|a| ClusterLoadAssignment::decode(&a.value[..]).expect("a CLA")).collect()
}

fn endpoint_count(cla: &ClusterLoadAssignment) -> usize {
    cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_eds_streams_share_one_proxy_and_see_changes() {
    let mut demo = Demo::load();
    let server = demo.start().await;
    let channel = channel(&server).await;
    let node = sidecar(1);

    // one stream per federated cluster, as Envoy opens them, all on one connection
    let mut streams = Vec::new();
    for name in [REVIEWS, RATINGS, FRONTEND] {
        let mut s = SotwEds::open(&channel, &node, &[name]).await;
        let r = s.recv().await;
        assert_eq!(r.type_url, type_url::ENDPOINT);
        let mut got = assignments(&r);
        assert_eq!(got.len(), 1, "one assignment per single-name stream");
        assert_eq!(got[0].cluster_name, name);
        assert!(endpoint_count(&got[0]) > 0, "{name} has endpoints");
        s.ack(&r, &[name]).await;
        streams.push((name, s, got.remove(0)));
    }
    // reviews spans both clouds: both localities, the local one first
    let reviews = &streams[0].2;
    let regions: Vec<(&str, u32)> =
        reviews.endpoints.iter().map(|l| (l.locality.as_ref().unwrap().region.as_str(), l.priority)).collect();
    assert!(regions.iter().any(|(r, p)| *r == "us-east-1" && *p == 0), "local endpoints at priority 0: {regions:?}");
    assert!(regions.iter().any(|(r, p)| *r == "westeurope" && *p > 0), "remote cloud after: {regions:?}");

    // one proxy, shown as an EDS-only client with its three streams, all ACKed
    let conn = eventually("the streams' ACKs", || {
        let proxies = server.connections.proxies();
        let c = proxies.iter().find(|c| c.proxy.id.contains("client-1.shop"))?.clone();
        let streams = c.stream_status();
        (streams.len() == 3 && streams.values().all(|s| !s.sent_nonce.is_empty() && s.acked_nonce == s.sent_nonce))
            .then_some(c)
    })
    .await;
    assert_eq!(server.connections.proxies().len(), 1, "the three streams are one proxy");
    assert_eq!(conn.service, XdsService::Endpoints);
    let syncz = meshfed::debug::syncz_entry(&conn);
    assert_eq!(syncz["service"], "eds");
    assert_eq!(syncz["streams"], 3);
    assert_eq!(syncz["status"]["EDS"], "SYNCED", "{syncz}");
    assert_eq!(syncz["status"]["CDS"], "NOT SENT", "istiod serves the clusters: {syncz}");

    // an endpoint of reviews goes away: only the reviews stream hears of it
    let before = endpoint_count(&streams[0].2);
    demo.drop_endpoint(&server, "aws-use1", "reviews").await;
    let (_, s, _) = &mut streams[0];
    let r = s.recv().await;
    let got = assignments(&r);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].cluster_name, REVIEWS);
    assert_eq!(endpoint_count(&got[0]), before - 1);
    s.ack(&r, &[REVIEWS]).await;
    for (name, s, _) in &mut streams[1..] {
        assert!(s.quiet().await, "{name}'s stream gets nothing when only reviews changed");
    }

    // a stream that ends leaves the proxy with the others
    drop(streams.pop());
    eventually("the stream's line to go", || (conn.stream_status().len() == 2).then_some(())).await;
    drop(streams);
    eventually("the proxy to go", || server.connections.proxies().is_empty().then_some(())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_name_gets_no_invented_assignment_and_is_reported() {
    let demo = Demo::load();
    let server = demo.start().await;
    let channel = channel(&server).await;
    let node = sidecar(2);
    let metric_before = unknown_metric();

    // SotW: a resource that does not exist is simply not sent
    let mut s = SotwEds::open(&channel, &node, &[UNKNOWN]).await;
    assert!(s.quiet().await, "no assignment is invented for a name meshfed does not serve");
    let conn = eventually("the proxy's entry", || server.connections.proxies().first().cloned()).await;
    let missing = eventually("the unknown name in the status", || {
        let st = conn.status()[meshfed::type_url::ResourceType::Endpoint.index()].clone();
        (!st.missing.is_empty()).then_some(st.missing)
    })
    .await;
    assert_eq!(missing.iter().map(|n| &**n).collect::<Vec<_>>(), [UNKNOWN]);
    assert!(unknown_metric() > metric_before, "meshfed_xds_unknown_resources_total counts it");

    // Delta: the protocol's answer for a resource that does not exist is its name in removed_resources
    let (tx, req_rx) = mpsc::channel(16);
    tx.send(DeltaDiscoveryRequest {
        node: Some(node.clone()),
        type_url: type_url::ENDPOINT.into(),
        resource_names_subscribe: vec![REVIEWS.into(), UNKNOWN.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut client = EndpointDiscoveryServiceClient::new(channel.clone());
    let mut rx =
        client.delta_endpoints(ReceiverStream::new(req_rx)).await.expect("DeltaEndpoints is served").into_inner();
    let r: DeltaDiscoveryResponse = bounded("a delta response", rx.message()).await.unwrap().unwrap();
    assert_eq!(r.resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), [REVIEWS]);
    assert_eq!(r.removed_resources, [UNKNOWN]);
    tx.send(DeltaDiscoveryRequest {
        type_url: type_url::ENDPOINT.into(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    // subscribing to another unknown name later: answered the same way
    let other = "outbound|81||nobody.elsewhere.svc.cluster.local";
    tx.send(DeltaDiscoveryRequest {
        type_url: type_url::ENDPOINT.into(),
        resource_names_subscribe: vec![other.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let r: DeltaDiscoveryResponse = bounded("a delta response", rx.message()).await.unwrap().unwrap();
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, [other]);
}

fn unknown_metric() -> f64 {
    let text = meshfed::metrics::global().encode().expect("metrics encode");
    text.lines()
        .filter(|l| l.starts_with("meshfed_xds_unknown_resources_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_type_stream_serves_its_type_only_and_nacks_are_kept() {
    let demo = Demo::load();
    let server = demo.start().await;
    let channel = channel(&server).await;
    let node = sidecar(3);

    // asking an EDS stream for clusters ends it with INVALID_ARGUMENT
    let (tx, req_rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest { node: Some(node.clone()), type_url: type_url::CLUSTER.into(), ..Default::default() })
        .await
        .unwrap();
    let mut client = EndpointDiscoveryServiceClient::new(channel.clone());
    let result = match client.stream_endpoints(ReceiverStream::new(req_rx)).await {
        Err(status) => Err(status),
        Ok(resp) => {
            let mut rx = resp.into_inner();
            bounded("the stream to end", rx.message()).await.map(|_| ())
        }
    };
    let status = result.expect_err("the stream ends");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("serves"), "{}", status.message());

    // a NACK is recorded on the stream's line, and the rejected version is not sent again
    let mut s = SotwEds::open(&channel, &node, &[REVIEWS]).await;
    let r = s.recv().await;
    s.tx.send(DiscoveryRequest {
        version_info: String::new(),
        response_nonce: r.nonce.clone(),
        type_url: type_url::ENDPOINT.into(),
        resource_names: vec![REVIEWS.into()],
        error_detail: Some(RpcStatus { code: 3, message: "test rejects it".into(), details: vec![] }),
        ..Default::default()
    })
    .await
    .unwrap();
    let conn = eventually("the NACK in the status", || {
        let c = server.connections.proxies().into_iter().find(|c| c.proxy.id.contains("client-3.shop"))?;
        let nacked = c.stream_status().values().any(|s| s.nacks == 1);
        nacked.then_some(c)
    })
    .await;
    let st = &conn.status()[meshfed::type_url::ResourceType::Endpoint.index()];
    assert_eq!(st.last_error.as_deref(), Some("test rejects it"));
    // the same subscription again: the rejected version is not re-sent
    s.ack(&r, &[REVIEWS]).await;
    assert!(s.quiet().await, "a rejected version is not sent again until it changes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adsc_gets_syncz_on_a_first_request_with_a_nonce() {
    let demo = Demo::load();
    let server = demo.start().await;
    let channel = channel(&server).await;
    // a sidecar connects over EDS, so syncz has something to show
    let _eds = SotwEds::open(&channel, &sidecar(4), &[REVIEWS]).await;
    eventually("the sidecar", || (!server.connections.proxies().is_empty()).then_some(())).await;

    // istioctl's adsc: GENERATOR=event, a sidecar node id, and a timestamp as the nonce of every
    // request, its first included
    let mut node = sidecar(5);
    node.id = "sidecar~127.0.0.1~istioctl-5.istio-system~istio-system.svc.cluster.local".into();
    node.metadata.as_mut().unwrap().fields.insert("GENERATOR".into(), string_value("event"));
    let (tx, req_rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(node),
        type_url: "istio.io/debug/syncz".into(),
        response_nonce: "2026-12-05 08:00:00.123456789 +0000 UTC m=+0.012345678".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut client = AggregatedDiscoveryServiceClient::new(channel.clone());
    let mut rx = client.stream_aggregated_resources(ReceiverStream::new(req_rx)).await.expect("ADS").into_inner();
    let r = bounded("istioctl's syncz answer", rx.message()).await.expect("open").expect("a response");
    assert_eq!(r.type_url, "istio.io/debug/syncz");
    assert!(!r.resources.is_empty(), "syncz lists the connected sidecar");
    let id: serde_json::Value =
        serde_json::from_str(&r.control_plane.expect("control_plane is set").identifier).expect("JSON identifier");
    assert_eq!(id["Component"], "meshfed");
    assert!(id["Info"]["version"].is_string());
    // its next request (a new timestamp nonce) ACKs: no endless exchange
    tx.send(DiscoveryRequest {
        type_url: "istio.io/debug/syncz".into(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(tokio::time::timeout(QUIET, rx.message()).await.is_err(), "an ACK is not answered");
}

/// The address of each endpoint of an assignment, with its weight.
fn endpoint_addresses(cla: &ClusterLoadAssignment) -> Vec<(String, u32)> {
    use envoy_types::pb::envoy::config::core::v3::address::Address;
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    let mut out: Vec<(String, u32)> = cla
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| {
            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else { return None };
            let Some(Address::SocketAddress(sa)) = ep.address.as_ref()?.address.as_ref() else { return None };
            Some((sa.address.clone(), e.load_balancing_weight.as_ref().map_or(1, |w| w.value)))
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subset_clusters_hold_their_pods_endpoints_and_follow_pod_labels() {
    // istiod's subset clusters of the demo's reviews DestinationRule (v1: the first pod of each zone, .21;
    // v2: the second, .22), each asked for on a stream of its own, as Envoy does
    const V1: &str = "outbound|9080|v1|reviews.shop.svc.cluster.local";
    const V2: &str = "outbound|9080|v2|reviews.shop.svc.cluster.local";
    let mut demo = Demo::load();
    let server = demo.start().await;
    let channel = channel(&server).await;
    let node = sidecar(2);
    let mut streams = Vec::new();
    for (name, host) in [(V1, 21), (V2, 22)] {
        let mut s = SotwEds::open(&channel, &node, &[name]).await;
        let r = s.recv().await;
        let got = assignments(&r);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].cluster_name, name);
        // aws-use1's own pods of the subset, and Azure's through its gateway, weighted by Azure's 2 pods of
        // the subset (not the service's 4)
        assert_eq!(
            endpoint_addresses(&got[0]),
            [(format!("127.0.1.{host}"), 1), (format!("127.0.2.{host}"), 1), ("127.0.20.1".into(), 2)],
            "{name}"
        );
        s.ack(&r, &[name]).await;
        streams.push(s);
    }

    // reviews-v1-5f7d8-a1 (127.0.1.21) is relabelled version: v2: it moves from v1 to v2
    let objs = &mut demo.objects.iter_mut().find(|(c, _)| c == "aws-use1").expect("aws-use1").1;
    let pod = objs
        .iter_mut()
        .find_map(|o| match o {
            TopologyObject::Pod(p) if &*p.name == "reviews-v1-5f7d8-a1" => Some(p),
            _ => None,
        })
        .expect("the pod");
    let mut labels = (*pod.labels).clone();
    labels.insert("version".into(), "v2".into());
    pod.labels = std::sync::Arc::new(labels);
    server.events.send(demo.event("aws-use1")).expect("push loop alive");
    let v1 = assignments(&streams[0].recv().await);
    assert_eq!(endpoint_addresses(&v1[0]), [("127.0.2.21".into(), 1), ("127.0.20.1".into(), 2)]);
    let v2 = assignments(&streams[1].recv().await);
    assert_eq!(
        endpoint_addresses(&v2[0]),
        [("127.0.1.21".into(), 1), ("127.0.1.22".into(), 1), ("127.0.2.22".into(), 1), ("127.0.20.1".into(), 2)]
    );
}
