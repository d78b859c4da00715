//! Beside istiod, the xDS protocol as Envoy speaks it to meshfed: per-type EDS streams
//! (`EndpointDiscoveryService/StreamEndpoints` and `/DeltaEndpoints`), one per cluster whose EDS an
//! EnvoyFilter points at meshfed, all on one HTTP/2 connection with the same node; and istioctl's `adsc`
//! client, which sets a nonce on its first request. Against an in-process meshfed fed the two-clouds demo
//! ([`Demo`]), spoken by the testkit's scripted client ([`AdsClient`] on [`Service::Endpoints`] or ADS).
//!
//! Waits are bounded by [`TIMEOUT`]; [`QUIET`] is how long a test listens to check that nothing arrives
//! (a bound, never a timing assertion: a slow machine can only make such a check weaker).

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use meshfed::proxy::string_value;
use meshfed::topology::TopologyObject;
use meshfed::type_url;
use meshfed::xds::connections::XdsService;
use meshfed_testkit::ads::{self, AdsClient, Error, Flavor, Request, Response, Service};
use meshfed_testkit::demo::Demo;
use meshfed_testkit::fixtures::lb_endpoint_count;
use meshfed_testkit::server::TestServer;
use tonic::Code;
use tonic::transport::Channel;

const TIMEOUT: Duration = Duration::from_secs(20);
const QUIET: Duration = Duration::from_millis(400);

const REVIEWS: &str = "outbound|9080||reviews.shop.svc.cluster.local";
const RATINGS: &str = "outbound|9080||ratings.shop.svc.cluster.local";
const FRONTEND: &str = "outbound|8080||frontend.shop.svc.cluster.local";
/// a service meshfed does not know (an EnvoyFilter selecting the wrong hosts)
const UNKNOWN: &str = "outbound|80||nobody.elsewhere.svc.cluster.local";

async fn eventually<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    meshfed_testkit::eventually(TIMEOUT, what, f).await
}

/// The demo, loaded, and a server started on it (its waits bounded by [`TIMEOUT`]).
async fn demo_and_server() -> (Demo, TestServer) {
    let demo = Demo::load().with_timeout(TIMEOUT);
    let server = demo.start().await;
    (demo, server)
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
    let id = format!("sidecar~10.0.0.{n}~client-{n}.shop~shop.svc.cluster.local");
    Node {
        cluster: "client.shop".into(),
        user_agent_name: "envoy".into(),
        ..meshfed_testkit::fixtures::node(&id, &meta, Some(("us-east-1", "us-east-1a")))
    }
}

async fn channel(server: &TestServer) -> Channel {
    ads::channel(server.xds_addr).await.expect("connect")
}

/// A per-type EDS stream (`StreamEndpoints` or `DeltaEndpoints`) on `channel` as `node`, its steps
/// bounded by [`TIMEOUT`] and [`QUIET`].
async fn eds_stream(channel: &Channel, flavor: Flavor, node: &Node) -> AdsClient {
    AdsClient::open_service(channel.clone(), Service::Endpoints, flavor, Some(node.clone()))
        .await
        .expect("the EDS service is served")
        .with_timeouts(TIMEOUT, QUIET)
}

/// A SotW `StreamEndpoints` stream asking for `names`, as Envoy opens one for an EDS cluster.
async fn sotw_eds(channel: &Channel, node: &Node, names: &[&str]) -> AdsClient {
    let mut s = eds_stream(channel, Flavor::Sotw, node).await;
    s.subscribe(type_url::ENDPOINT, names).await.expect("the request is sent");
    s
}

fn assignments(r: &Response) -> Vec<ClusterLoadAssignment> {
    r.decode_all().expect("CLAs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_eds_streams_share_one_proxy_and_see_changes() {
    let (mut demo, server) = demo_and_server().await;
    let channel = channel(&server).await;
    let node = sidecar(1);

    // one stream per federated cluster, as Envoy opens them, all on one connection
    let mut streams = Vec::new();
    for name in [REVIEWS, RATINGS, FRONTEND] {
        let mut s = sotw_eds(&channel, &node, &[name]).await;
        let r = s.recv().await.expect("a response");
        assert_eq!(r.type_url, type_url::ENDPOINT);
        let mut got = assignments(&r);
        assert_eq!(got.len(), 1, "one assignment per single-name stream");
        assert_eq!(got[0].cluster_name, name);
        assert!(lb_endpoint_count(&got[0]) > 0, "{name} has endpoints");
        s.ack(&r).await.unwrap();
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
    let before = lb_endpoint_count(&streams[0].2);
    demo.drop_endpoint("aws-use1", "reviews");
    demo.publish(&server, &["aws-use1"]).await;
    let (_, s, _) = &mut streams[0];
    let r = s.recv().await.expect("a response");
    let got = assignments(&r);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].cluster_name, REVIEWS);
    assert_eq!(lb_endpoint_count(&got[0]), before - 1);
    s.ack(&r).await.unwrap();
    for (name, s, _) in &mut streams[1..] {
        s.expect_silence(&format!("on {name}'s stream when only reviews changed"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    // a stream that ends leaves the proxy with the others
    drop(streams.pop());
    eventually("the stream's line to go", || (conn.stream_status().len() == 2).then_some(())).await;
    drop(streams);
    eventually("the proxy to go", || server.connections.proxies().is_empty().then_some(())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_name_gets_no_invented_assignment_and_is_reported() {
    let (_demo, server) = demo_and_server().await;
    let channel = channel(&server).await;
    let node = sidecar(2);
    let metric_before = unknown_metric();

    // SotW: a resource that does not exist is simply not sent
    let mut s = sotw_eds(&channel, &node, &[UNKNOWN]).await;
    s.expect_silence("for a name meshfed does not serve (no assignment is invented)")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let conn = eventually("the proxy's entry", || server.connections.proxies().first().cloned()).await;
    let missing = eventually("the unknown name in the status", || {
        let st = conn.status()[meshfed::type_url::ResourceType::Endpoint.index()].clone();
        (!st.missing.is_empty()).then_some(st.missing)
    })
    .await;
    assert_eq!(missing.iter().map(|n| &**n).collect::<Vec<_>>(), [UNKNOWN]);
    assert!(unknown_metric() > metric_before, "meshfed_xds_unknown_resources_total counts it");

    // Delta: the protocol's answer for a resource that does not exist is its name in removed_resources
    let mut d = eds_stream(&channel, Flavor::Delta, &node).await;
    d.subscribe(type_url::ENDPOINT, &[REVIEWS, UNKNOWN]).await.unwrap();
    let r = d.recv().await.expect("a delta response");
    assert_eq!(r.resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), [REVIEWS]);
    assert_eq!(r.removed, [UNKNOWN]);
    d.ack(&r).await.unwrap();
    // subscribing to another unknown name later: answered the same way
    let other = "outbound|81||nobody.elsewhere.svc.cluster.local";
    d.subscribe(type_url::ENDPOINT, &[other]).await.unwrap();
    let r = d.recv().await.expect("a delta response");
    assert!(r.resources.is_empty());
    assert_eq!(r.removed, [other]);
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
    let (_demo, server) = demo_and_server().await;
    let channel = channel(&server).await;
    let node = sidecar(3);

    // asking an EDS stream for clusters ends it with INVALID_ARGUMENT
    let first = Request { node: Some(node.clone()), ..Request::new(type_url::CLUSTER) };
    let status = match AdsClient::open_service_with(channel.clone(), Service::Endpoints, Flavor::Sotw, first).await {
        Err(Error::Status(status)) => status,
        Err(other) => panic!("expected the stream to end with a status, got: {other}"),
        Ok(c) => c.with_timeouts(TIMEOUT, QUIET).expect_failure().await.unwrap_or_else(|e| panic!("{e}")),
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("serves"), "{}", status.message());

    // a NACK is recorded on the stream's line, and the rejected version is not sent again
    let mut s = sotw_eds(&channel, &node, &[REVIEWS]).await;
    let r = s.recv().await.expect("a response");
    // (the NACK carries the version last accepted: none)
    s.nack(&r, "test rejects it").await.unwrap();
    let conn = eventually("the NACK in the status", || {
        let c = server.connections.proxies().into_iter().find(|c| c.proxy.id.contains("client-3.shop"))?;
        let nacked = c.stream_status().values().any(|s| s.nacks == 1);
        nacked.then_some(c)
    })
    .await;
    let st = &conn.status()[meshfed::type_url::ResourceType::Endpoint.index()];
    assert_eq!(st.last_error.as_deref(), Some("test rejects it"));
    // the same subscription again: the rejected version is not re-sent
    s.ack(&r).await.unwrap();
    s.expect_silence("(a rejected version is not sent again until it changes)").await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adsc_gets_syncz_on_a_first_request_with_a_nonce() {
    let (_demo, server) = demo_and_server().await;
    let channel = channel(&server).await;
    // a sidecar connects over EDS, so syncz has something to show
    let _eds = sotw_eds(&channel, &sidecar(4), &[REVIEWS]).await;
    eventually("the sidecar", || (!server.connections.proxies().is_empty()).then_some(())).await;

    // istioctl's adsc: GENERATOR=event, a sidecar node id, and a timestamp as the nonce of every
    // request, its first included
    let mut node = sidecar(5);
    node.id = "sidecar~127.0.0.1~istioctl-5.istio-system~istio-system.svc.cluster.local".into();
    node.metadata.as_mut().unwrap().fields.insert("GENERATOR".into(), string_value("event"));
    let first = Request {
        node: Some(node),
        nonce: "2026-12-05 08:00:00.123456789 +0000 UTC m=+0.012345678".into(),
        ..Request::new("istio.io/debug/syncz")
    };
    let mut adsc =
        AdsClient::open_with(channel.clone(), Flavor::Sotw, first).await.expect("ADS").with_timeouts(TIMEOUT, QUIET);
    let r = adsc.recv().await.expect("istioctl's syncz answer");
    assert_eq!(r.type_url, "istio.io/debug/syncz");
    assert!(!r.resources.is_empty(), "syncz lists the connected sidecar");
    let id: serde_json::Value =
        serde_json::from_str(&r.control_plane.expect("control_plane is set").identifier).expect("JSON identifier");
    assert_eq!(id["Component"], "meshfed");
    assert!(id["Info"]["version"].is_string());
    // its next request (a new timestamp nonce) ACKs: no endless exchange
    adsc.send(Request { nonce: r.nonce.clone(), ..Request::new("istio.io/debug/syncz") }).await.unwrap();
    adsc.expect_silence("to an ACK").await.unwrap_or_else(|e| panic!("{e}"));
    // the config dump of the sidecar, asked for with yet another timestamp nonce: the first request of that
    // type on the stream, so it is answered
    let dump = Request {
        nonce: "2026-12-05 08:00:01.5 +0000 UTC m=+1.4".into(),
        ..Request::new("istio.io/debug/config_dump").names(&["client-4.shop"])
    };
    adsc.send(dump).await.unwrap();
    let r = adsc.recv().await.expect("istioctl's config dump answer");
    assert_eq!(r.type_url, "istio.io/debug/config_dump");
    assert_eq!(r.resources.len(), 1, "one ConfigDump for client-4.shop");
    let dump =
        <envoy_types::pb::envoy::admin::v3::ConfigDump as prost::Message>::decode(&r.resources[0].body.value[..])
            .expect("a ConfigDump");
    assert!(!dump.configs.is_empty(), "the dump has sections");
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
    let (mut demo, server) = demo_and_server().await;
    let channel = channel(&server).await;
    let node = sidecar(2);
    let mut streams = Vec::new();
    for (name, host) in [(V1, 21), (V2, 22)] {
        let mut s = sotw_eds(&channel, &node, &[name]).await;
        let r = s.recv().await.expect("a response");
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
        s.ack(&r).await.unwrap();
        streams.push(s);
    }

    // reviews-v1-5f7d8-a1 (127.0.1.21) is relabelled version: v2: it moves from v1 to v2
    let objs = demo.objects.get_mut("aws-use1").expect("aws-use1");
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
    server.events.send(demo.sync_event("aws-use1")).expect("push loop alive");
    let v1 = assignments(&streams[0].recv().await.expect("v1's update"));
    assert_eq!(endpoint_addresses(&v1[0]), [("127.0.2.21".into(), 1), ("127.0.20.1".into(), 2)]);
    let v2 = assignments(&streams[1].recv().await.expect("v2's update"));
    assert_eq!(
        endpoint_addresses(&v2[0]),
        [("127.0.1.21".into(), 1), ("127.0.1.22".into(), 1), ("127.0.2.22".into(), 1), ("127.0.20.1".into(), 2)]
    );
}
