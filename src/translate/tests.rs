//! Translation over the two-clouds demo loaded into a [`Registry`]: names, EDS localities and
//! priorities, listeners, routes, determinism of the encoded resources, and removals.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{address, socket_address::PortSpecifier};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint::HostIdentifier};
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, route::Action, route_action::ClusterSpecifier};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use prost::Message;

use super::*;
use crate::cache::Resource;
use crate::mesh_config::MeshConfig;
use crate::model::{ClusterId, Locality, ServiceKey};
use crate::proxy::{ClientKind, InterceptionMode, Proxy, ProxyKind};
use crate::registry::Registry;
use crate::source::SourceEvent;
use crate::topology::{Kind, TopologyObject};

const AWS: &str = "aws-use1";
const AZURE: &str = "azure-weu";
const BIND: &str = "127.0.50.1";

fn demo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/two-clouds")
}

fn demo_mesh() -> MeshConfig {
    MeshConfig::load(&demo_dir().join("mesh.yaml")).expect("the demo mesh config is valid")
}

fn demo_objects(cluster: &str) -> Vec<TopologyObject> {
    let (objects, errors) = crate::source::files::load_cluster_dir(&demo_dir().join(cluster));
    assert!(errors.is_empty(), "demo files must parse: {errors:?}");
    objects
}

fn demo_object(cluster: &str, kind: Kind, name: &str) -> TopologyObject {
    demo_objects(cluster)
        .into_iter()
        .find(|o| o.key().kind == kind && &*o.key().name == name)
        .unwrap_or_else(|| panic!("no {kind:?} {name} in {cluster}"))
}

fn sync(cluster: &str) -> SourceEvent {
    SourceEvent::Sync { cluster: ClusterId::new(cluster), objects: demo_objects(cluster) }
}

/// The demo's registry (clusters applied in `order`) and translation context.
fn demo_in(order: &[&str]) -> (Context, Registry) {
    let mesh = demo_mesh();
    let mut registry = Registry::new(&mesh);
    for c in order {
        registry.apply(sync(c));
    }
    (Context::from_mesh(&mesh).with_registry(&registry), registry)
}

fn demo() -> (Context, Registry) {
    demo_in(&[AWS, AZURE])
}

fn proxy(namespace: &str, cluster: &str, locality: &str, interception: InterceptionMode) -> Proxy {
    Proxy {
        id: format!("sidecar~{BIND}~client.{namespace}~{namespace}.svc.cluster.local").into(),
        key: format!("client.{namespace}").into(),
        kind: ProxyKind::Sidecar,
        client: ClientKind::Envoy,
        ip: BIND.parse().expect("valid IP"),
        pod: "client".into(),
        namespace: namespace.into(),
        cluster_id: Some(ClusterId::new(cluster)),
        network: NetworkId::default(),
        locality: Locality::parse(locality),
        interception,
        istio_version: "1.26.1".into(),
        labels: BTreeMap::new(),
        tls: TlsSupport::Static,
        inbound_address: "127.0.0.1".parse().expect("valid IP"),
    }
}

fn aws_view(registry: &Registry) -> View {
    View::of(&proxy("shop", AWS, "us-east-1/us-east-1a", InterceptionMode::None), registry)
}

fn fqdn(name: &str) -> String {
    ServiceKey::new("shop", name).fqdn("cluster.local")
}

const GATEWAY: &str = "istio-eastwestgateway.istio-system.svc.cluster.local";

/// Every (service FQDN, port) of the demo, in registry order.
fn demo_service_ports() -> Vec<(String, u16)> {
    vec![
        (GATEWAY.into(), 15021),
        (GATEWAY.into(), 15443),
        (fqdn("frontend"), 8080),
        (fqdn("ratings"), 9080),
        (fqdn("ratings"), 9091),
        (fqdn("reviews"), 9080),
    ]
}

fn names<T>(items: &[Named<T>]) -> Vec<&str> {
    items.iter().map(|n| n.name.as_str()).collect()
}

fn all_load_assignments(ctx: &Context, scope: &EndpointScope, r: &Registry) -> Vec<Named<ClusterLoadAssignment>> {
    r.services().values().flat_map(|s| endpoint::service_load_assignments(ctx, scope, s)).collect()
}

fn load_assignment(ctx: &Context, scope: &EndpointScope, r: &Registry, name: &str) -> ClusterLoadAssignment {
    all_load_assignments(ctx, scope, r)
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no load assignment {name}"))
        .resource
}

/// (zone, priority, locality weight, endpoint count) per locality.
fn localities(cla: &ClusterLoadAssignment) -> Vec<(String, u32, u32, usize)> {
    cla.endpoints
        .iter()
        .map(|l| {
            let loc = l.locality.as_ref().expect("locality set");
            let weight = l.load_balancing_weight.expect("every locality has a weight").value;
            (loc.zone.clone(), l.priority, weight, l.lb_endpoints.len())
        })
        .collect()
}

/// `ip:port` of every endpoint of an assignment, in order.
fn endpoint_addresses(cla: &ClusterLoadAssignment) -> Vec<String> {
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .map(|e| {
            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else { panic!("an endpoint") };
            let Some(address::Address::SocketAddress(sa)) = ep.address.as_ref().and_then(|a| a.address.as_ref()) else {
                panic!("a socket address")
            };
            let Some(PortSpecifier::PortValue(port)) = sa.port_specifier else { panic!("a port") };
            format!("{}:{port}", sa.address)
        })
        .collect()
}

fn zones(expect: &[(&str, u32, u32, usize)]) -> Vec<(String, u32, u32, usize)> {
    expect.iter().map(|(z, p, w, n)| (z.to_string(), *p, *w, *n)).collect()
}

fn listener<'a>(ls: &'a [Named<Listener>], name: &str) -> &'a Named<Listener> {
    ls.iter().find(|l| l.name == name).unwrap_or_else(|| panic!("no listener {name}: {:?}", names(ls)))
}

fn typed_config(l: &Listener) -> &envoy_types::pb::google::protobuf::Any {
    let f = &l.filter_chains[0].filters[0];
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else { panic!("typed config") };
    any
}

fn hcm_of(l: &Listener) -> HttpConnectionManager {
    let any = typed_config(l);
    assert_eq!(
        any.type_url,
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    );
    HttpConnectionManager::decode(any.value.as_slice()).expect("an HCM")
}

fn rds_name(hcm: &HttpConnectionManager) -> &str {
    let Some(RouteSpecifier::Rds(rds)) = &hcm.route_specifier else { panic!("RDS") };
    &rds.route_config_name
}

fn tcp_proxy_cluster(l: &Listener) -> String {
    let any = typed_config(l);
    assert_eq!(any.type_url, "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy");
    let tp = TcpProxy::decode(any.value.as_slice()).expect("a TcpProxy");
    let Some(tcp_proxy::ClusterSpecifier::Cluster(c)) = tp.cluster_specifier else { panic!("a cluster") };
    c
}

fn socket_of(l: &Listener) -> (String, u32) {
    let Some(address::Address::SocketAddress(sa)) = l.address.as_ref().and_then(|a| a.address.as_ref()) else {
        panic!("a socket address")
    };
    let Some(PortSpecifier::PortValue(port)) = sa.port_specifier else { panic!("a port") };
    (sa.address.clone(), port)
}

fn route_config<'a>(rs: &'a [Named<RouteConfiguration>], name: &str) -> &'a RouteConfiguration {
    &rs.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("no route {name}: {:?}", names(rs))).resource
}

// ---- CDS ----

#[test]
fn cluster_names_for_every_service_port() {
    let (ctx, r) = demo();
    let view = aws_view(&r);
    let cs = cluster::clusters(&ctx, &view.clusters, &r);
    let mut expect = vec![BLACKHOLE_CLUSTER.to_string(), PASSTHROUGH_CLUSTER.to_string()];
    expect.extend(demo_service_ports().iter().map(|(h, p)| format!("outbound|{p}||{h}")));
    // the reviews DestinationRule's subsets, after the port's own cluster
    expect.extend(["v1", "v2"].map(|s| format!("outbound|9080|{s}|{}", fqdn("reviews"))));
    assert_eq!(names(&cs), expect);
    assert!(cs.iter().all(|c| c.wildcard));
    for c in cs.iter().filter(|c| c.name.starts_with("outbound|")) {
        let (port, subset, host) = parse_outbound_cluster_name(&c.name).expect("parses");
        assert_eq!(outbound_cluster_name(port, subset, host), c.name);
        let eds = c.resource.eds_cluster_config.as_ref().expect("an EDS cluster");
        assert_eq!(eds.service_name, c.name);
        assert!(c.resource.outlier_detection.is_some(), "the demo sets default outlier detection");
    }
    // gRPC ports get HTTP/2 upstreams; HTTP/1 ports do not.
    let grpc: &Cluster = &cs.iter().find(|c| c.name == format!("outbound|9091||{}", fqdn("ratings"))).unwrap().resource;
    assert!(!grpc.typed_extension_protocol_options.is_empty());
    let http: &Cluster = &cs.iter().find(|c| c.name == format!("outbound|9080||{}", fqdn("ratings"))).unwrap().resource;
    assert!(http.typed_extension_protocol_options.is_empty());
}

/// `filter_metadata.istio` of a cluster: its string fields.
fn istio_strings(c: &Cluster) -> BTreeMap<String, String> {
    use envoy_types::pb::google::protobuf::value::Kind as V;
    let md = c.metadata.as_ref().expect("metadata");
    md.filter_metadata["istio"]
        .fields
        .iter()
        .filter_map(|(k, v)| match &v.kind {
            Some(V::StringValue(s)) => Some((k.clone(), s.clone())),
            _ => None,
        })
        .collect()
}

/// The SNI of a cluster's `tlsMode: istio` transport socket.
fn istio_sni(c: &Cluster) -> String {
    use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
    let m = &c.transport_socket_matches[0];
    let Some(ConfigType::TypedConfig(any)) = &m.transport_socket.as_ref().expect("a socket").config_type else {
        panic!("typed config")
    };
    UpstreamTlsContext::decode(any.value.as_slice()).expect("an UpstreamTlsContext").sni
}

#[test]
fn subset_clusters_carry_the_subsets_merged_policy_sni_and_metadata() {
    let (ctx, r) = demo();
    let view = aws_view(&r);
    let cs = cluster::clusters(&ctx, &view.clusters, &r);
    let get = |name: String| cs.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no {name}")).resource.clone();
    let base = get(format!("outbound|9080||{}", fqdn("reviews")));
    let v1 = get(format!("outbound|9080|v1|{}", fqdn("reviews")));
    let v2 = get(format!("outbound|9080|v2|{}", fqdn("reviews")));
    // v1 has no policy of its own: the rule's; v2 overrides outlierDetection, keeps the rule's failover
    let c5xx = |c: &Cluster| c.outlier_detection.as_ref().and_then(|o| o.consecutive_5xx).map(|v| v.value);
    assert_eq!((c5xx(&base), c5xx(&v1), c5xx(&v2)), (Some(3), Some(3), Some(1)));
    for c in [&base, &v1, &v2] {
        let common = c.common_lb_config.as_ref().expect("common lb config");
        assert!(common.locality_config_specifier.is_some(), "{}: failover weighting", c.name);
    }
    let config = "/apis/networking.istio.io/v1/namespaces/shop/destination-rule/reviews";
    assert_eq!(istio_strings(&v2).get("config").map(String::as_str), Some(config));
    assert_eq!(istio_strings(&v2).get("subset").map(String::as_str), Some("v2"));
    assert_eq!(istio_strings(&base).get("subset"), None);
    // mTLS to a subset uses its SNI (what an east-west gateway routes by)
    assert_eq!(istio_sni(&base), format!("outbound_.9080_._.{}", fqdn("reviews")));
    assert_eq!(istio_sni(&v2), format!("outbound_.9080_.v2_.{}", fqdn("reviews")));
}

// ---- EDS ----

#[test]
fn eds_from_aws_zone_prefers_its_zone_then_its_region() {
    let (ctx, r) = demo();
    let view = aws_view(&r);
    assert_eq!(view.endpoints.network, NetworkId::new("aws-net"), "network from the proxy's cluster");
    assert_eq!(view.endpoints.locality, Locality::new("us-east-1", "us-east-1a", ""));
    // Azure is another network: its endpoints are reached through azure-net's east-west gateway, in
    // their priority, weighted by the endpoints it stands for. Envoy keeps one host per address and
    // priority, so Azure's two zones are one locality (their region) with one gateway endpoint.
    let expect = zones(&[("us-east-1a", 0, 2, 2), ("us-east-1b", 1, 2, 2), ("", 2, 4, 1)]);
    let all = all_load_assignments(&ctx, &view.endpoints, &r);
    for (host, port) in demo_service_ports().into_iter().filter(|(h, _)| h != GATEWAY) {
        let name = outbound_cluster_name(port, "", &host);
        let cla = &all.iter().find(|c| c.name == name).expect("an assignment per cluster").resource;
        assert_eq!(cla.cluster_name, name);
        if name == format!("outbound|9080||{}", fqdn("ratings")) {
            // The ratings DestinationRule distributes its HTTP port 80/20 across the clouds: no priorities.
            assert_eq!(
                localities(cla),
                zones(&[("us-east-1a", 0, 40, 2), ("us-east-1b", 0, 40, 2), ("", 0, 20, 1)]),
                "{name}"
            );
        } else {
            assert_eq!(localities(cla), expect, "{name}");
        }
    }
    let reviews = load_assignment(&ctx, &view.endpoints, &r, &format!("outbound|9080||{}", fqdn("reviews")));
    assert_eq!(
        endpoint_addresses(&reviews),
        ["127.0.1.21:9080", "127.0.1.22:9080", "127.0.2.21:9080", "127.0.2.22:9080", "127.0.20.1:15443"]
    );
    let regions: BTreeSet<&str> =
        reviews.endpoints.iter().map(|l| l.locality.as_ref().unwrap().region.as_str()).collect();
    assert_eq!(regions, BTreeSet::from(["us-east-1", "westeurope"]));
    // The gRPC port's endpoints use the gRPC target port (the gateway its own).
    let grpc = load_assignment(&ctx, &view.endpoints, &r, &format!("outbound|9091||{}", fqdn("ratings")));
    let addrs = endpoint_addresses(&grpc);
    assert!(addrs.iter().all(|a| a.ends_with(":9091") || a == "127.0.20.1:15443"), "{addrs:?}");
    assert_eq!(addrs.len(), 5);
    // The east-west gateway Service itself: the local pod directly, Azure's through Azure's gateway.
    let gw = load_assignment(&ctx, &view.endpoints, &r, &format!("outbound|15443||{GATEWAY}"));
    assert_eq!(localities(&gw), zones(&[("us-east-1a", 0, 1, 1), ("westeurope-1", 1, 1, 1)]));
}

#[test]
fn eds_from_azure_zone_is_the_mirror() {
    let (ctx, r) = demo();
    let view = View::of(&proxy("shop", AZURE, "westeurope/westeurope-1", InterceptionMode::None), &r);
    assert_eq!(view.endpoints.network, NetworkId::new("azure-net"));
    for name in [
        format!("outbound|8080||{}", fqdn("frontend")),
        format!("outbound|9080||{}", fqdn("reviews")),
        format!("outbound|9091||{}", fqdn("ratings")),
    ] {
        let cla = load_assignment(&ctx, &view.endpoints, &r, &name);
        // AWS's two zones, both through aws-net's gateway in one priority: one locality, their region
        assert_eq!(
            localities(&cla),
            zones(&[("westeurope-1", 0, 2, 2), ("westeurope-2", 1, 2, 2), ("", 2, 4, 1)]),
            "{name}"
        );
    }
}

#[test]
fn eds_without_proxy_locality_has_one_priority() {
    let (ctx, r) = demo();
    let view = View::of(&proxy("shop", AWS, "", InterceptionMode::None), &r);
    for c in all_load_assignments(&ctx, &view.endpoints, &r) {
        assert!(c.resource.endpoints.iter().all(|l| l.priority == 0), "{}", c.name);
        assert!(c.resource.endpoints.iter().all(|l| l.load_balancing_weight.is_some()), "{}", c.name);
    }
    let cla = load_assignment(&ctx, &view.endpoints, &r, &format!("outbound|9080||{}", fqdn("reviews")));
    // AWS's two zones, and Azure's two through its gateway (one host per address and priority)
    assert_eq!(localities(&cla), zones(&[("us-east-1a", 0, 2, 2), ("us-east-1b", 0, 2, 2), ("", 0, 4, 1)]));
}

// ---- LDS ----

#[test]
fn listeners_bound_to_the_proxy_ip_without_interception() {
    let (ctx, r) = demo();
    let view = aws_view(&r);
    assert_eq!(view.listeners.bind, Some(BIND.parse().unwrap()));
    let ls = listener::listeners(&ctx, &view.listeners, &r);
    let wildcard: Vec<&str> = ls.iter().filter(|l| l.wildcard).map(|l| l.name.as_str()).collect();
    assert_eq!(
        wildcard,
        ["127.0.50.1_8080", "127.0.50.1_9080", "127.0.50.1_9091", "127.0.50.1_15021", "127.0.50.1_15443"]
    );
    for port in [8080, 9080, 9091] {
        let l = &listener(&ls, &format!("{BIND}_{port}")).resource;
        assert_eq!(socket_of(l), (BIND.to_string(), port));
        assert_eq!(l.bind_to_port, None, "bound: the default");
        let hcm = hcm_of(l);
        assert_eq!(rds_name(&hcm), port.to_string());
        assert_eq!(hcm.stat_prefix, format!("outbound_{BIND}_{port}"));
    }
    // TCP ports served by one service forward to it.
    let l = &listener(&ls, &format!("{BIND}_15443")).resource;
    assert_eq!(tcp_proxy_cluster(l), format!("outbound|15443||{GATEWAY}"));
    assert!(ls.iter().all(|l| l.name != listener::VIRTUAL_OUTBOUND));
}

#[test]
fn listeners_with_redirect_interception() {
    let (ctx, r) = demo();
    let view = View::of(&proxy("shop", AWS, "us-east-1/us-east-1a", InterceptionMode::Redirect), &r);
    assert_eq!(view.listeners.bind, None);
    let ls = listener::listeners(&ctx, &view.listeners, &r);
    let wildcard: Vec<&str> = ls.iter().filter(|l| l.wildcard).map(|l| l.name.as_str()).collect();
    assert_eq!(
        wildcard,
        [
            "0.0.0.0_8080",
            "0.0.0.0_9080",
            "0.0.0.0_9091",
            "0.0.0.0_15021",
            "0.0.0.0_15443",
            "virtualOutbound",
            "virtualInbound"
        ]
    );
    let l = &listener(&ls, "0.0.0.0_9080").resource;
    assert_eq!(socket_of(l), ("0.0.0.0".to_string(), 9080));
    assert_eq!(l.bind_to_port.map(|b| b.value), Some(false));
    assert_eq!(rds_name(&hcm_of(l)), "9080");
    let vo = &listener(&ls, listener::VIRTUAL_OUTBOUND).resource;
    assert_eq!(socket_of(vo), ("0.0.0.0".to_string(), 15001));
    assert_eq!(vo.use_original_dst.map(|b| b.value), Some(true));
    assert_eq!(vo.bind_to_port, None);
    assert_eq!(tcp_proxy_cluster(vo), PASSTHROUGH_CLUSTER);
}

#[test]
fn api_listeners_are_named_fqdn_port_and_not_wildcard() {
    let (ctx, r) = demo();
    let ls = listener::listeners(&ctx, &aws_view(&r).listeners, &r);
    let api: Vec<&Named<Listener>> = ls.iter().filter(|l| l.resource.api_listener.is_some()).collect();
    let expect: Vec<String> = demo_service_ports().iter().map(|(h, p)| format!("{h}:{p}")).collect();
    assert_eq!(api.iter().map(|l| l.name.clone()).collect::<Vec<_>>(), expect);
    for l in api {
        assert!(!l.wildcard, "{}", l.name);
        assert!(l.resource.address.is_none());
        let any = l.resource.api_listener.as_ref().unwrap().api_listener.as_ref().expect("an HCM");
        let hcm = HttpConnectionManager::decode(any.value.as_slice()).expect("an HCM");
        assert_eq!(rds_name(&hcm), l.name);
    }
    // Listener names are unique.
    let all: BTreeSet<&str> = ls.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(all.len(), ls.len());
}

#[test]
fn east_west_gateways_pass_every_service_port_through_by_sni() {
    let (ctx, r) = demo();
    let mut p = proxy("istio-system", AZURE, "westeurope/westeurope-1", InterceptionMode::None);
    p.kind = ProxyKind::Router;
    p.ip = "127.0.20.1".parse().unwrap();
    let view = View::of(&p, &r);
    let ls = listener::listeners(&ctx, &view.listeners, &r);
    assert_eq!(names(&ls), ["127.0.20.1_15443"]);
    let chains: Vec<&str> = ls[0].resource.filter_chains.iter().map(|c| c.name.as_str()).collect();
    assert!(chains.contains(&"outbound_.9080_._.reviews.shop.svc.cluster.local"), "{chains:?}");
    assert!(chains.contains(&"outbound_.9091_._.ratings.shop.svc.cluster.local"), "{chains:?}");
    // its clusters are SNI-named, plaintext (passthrough), with only azure-net's endpoints
    let cs = cluster::clusters(&ctx, &view.clusters, &r);
    let c = cs.iter().find(|c| c.name == "outbound_.9080_._.reviews.shop.svc.cluster.local").expect("SNI cluster");
    assert!(c.resource.transport_socket_matches.is_empty());
    let cla = load_assignment(&ctx, &view.endpoints, &r, "outbound_.9080_._.reviews.shop.svc.cluster.local");
    assert_eq!(endpoint_addresses(&cla), ["127.0.3.21:9080", "127.0.3.22:9080", "127.0.4.21:9080", "127.0.4.22:9080"]);
}

#[test]
fn ingress_gateways_get_a_sidecars_outbound_config_bound_on_their_address() {
    let (ctx, r) = demo();
    // an Istio ingress gateway in us-east-1a: node type router, ROUTER_MODE standard, no traffic capture
    // in its metadata (Istio's gateways leave INTERCEPTION_MODE unset: REDIRECT by default)
    let mut p = proxy("istio-system", AWS, "us-east-1/us-east-1a", InterceptionMode::Redirect);
    p.kind = ProxyKind::Ingress;
    p.ip = "127.0.30.1".parse().unwrap();
    let view = View::of(&p, &r);
    // the scopes of a sidecar beside it without interception (shared in the cache), without inbound
    let mut beside = p.clone();
    beside.kind = ProxyKind::Sidecar;
    beside.interception = InterceptionMode::None;
    let sidecar = View::of(&beside, &r);
    assert_eq!(view.clusters, sidecar.clusters);
    assert_eq!(view.endpoints, sidecar.endpoints);
    assert_eq!(view.routes, sidecar.routes);
    assert_eq!(view.inbound, None);
    assert_eq!(view.listeners, ListenerScope { inbound: None, ..sidecar.listeners.clone() });
    assert!(sidecar.inbound.is_some(), "(the sidecar has an inbound side)");
    // outbound listeners on its own address, one per service port; no inbound listener
    let ls = listener::listeners(&ctx, &view.listeners, &r);
    let wildcard: Vec<&str> = ls.iter().filter(|l| l.wildcard).map(|l| l.name.as_str()).collect();
    assert!(!wildcard.is_empty() && wildcard.iter().all(|n| n.starts_with("127.0.30.1_")), "{wildcard:?}");
    assert!(wildcard.contains(&"127.0.30.1_9080"), "{wildcard:?}");
    // Istio's outbound cluster names, with the mesh mTLS transport socket
    let cs = cluster::clusters(&ctx, &view.clusters, &r);
    let reviews = format!("outbound|9080||{}", fqdn("reviews"));
    let c = cs.iter().find(|c| c.name == reviews).expect("outbound cluster");
    assert!(!c.resource.transport_socket_matches.is_empty());
    assert!(cs.iter().all(|c| !c.name.starts_with("inbound|")));
    // split horizon: AWS endpoints as they are, Azure's through azure-net's east-west gateway
    let cla = load_assignment(&ctx, &view.endpoints, &r, &reviews);
    assert_eq!(
        endpoint_addresses(&cla),
        ["127.0.1.21:9080", "127.0.1.22:9080", "127.0.2.21:9080", "127.0.2.22:9080", "127.0.20.1:15443"]
    );
}

// ---- RDS ----

fn vhost_names(rc: &RouteConfiguration) -> Vec<&str> {
    rc.virtual_hosts.iter().map(|v| v.name.as_str()).collect()
}

#[test]
fn port_routes_have_a_virtual_host_per_service() {
    let (ctx, r) = demo();
    let rs = route::routes(&ctx, &aws_view(&r).routes, &r);
    let wildcard: Vec<&str> = rs.iter().filter(|r| r.wildcard).map(|r| r.name.as_str()).collect();
    assert_eq!(wildcard, ["8080", "9080", "9091"], "HTTP ports only");

    let rc = route_config(&rs, "9080");
    assert_eq!(vhost_names(rc), [format!("{}:9080", fqdn("ratings")), format!("{}:9080", fqdn("reviews"))]);
    let mut domains: Vec<&String> = rc.virtual_hosts.iter().flat_map(|v| &v.domains).collect();
    let n = domains.len();
    domains.sort();
    domains.dedup();
    assert_eq!(domains.len(), n, "Envoy rejects duplicate domains");
    let reviews = &rc.virtual_hosts[1];
    for d in [
        "reviews",
        "reviews:9080",
        "reviews.shop",
        "reviews.shop:9080",
        "reviews.shop.svc",
        "reviews.shop.svc.cluster.local",
        "reviews.shop.svc.cluster.local:9080",
    ] {
        assert!(reviews.domains.iter().any(|x| x == d), "{d} in {:?}", reviews.domains);
    }
    let Some(Action::Route(ra)) = &reviews.routes[0].action else { panic!("a route action") };
    assert_eq!(ra.cluster_specifier, Some(ClusterSpecifier::Cluster(format!("outbound|9080||{}", fqdn("reviews")))));

    assert_eq!(vhost_names(route_config(&rs, "8080")), [format!("{}:8080", fqdn("frontend"))]);
    assert_eq!(vhost_names(route_config(&rs, "9091")), [format!("{}:9091", fqdn("ratings"))]);
}

#[test]
fn short_names_only_for_the_proxy_namespace() {
    let (ctx, r) = demo();
    let other = View::of(&proxy("default", AWS, "us-east-1/us-east-1a", InterceptionMode::None), &r);
    let rs = route::routes(&ctx, &other.routes, &r);
    let rc = route_config(&rs, "9080");
    for v in &rc.virtual_hosts {
        assert!(v.domains.iter().all(|d| d.contains('.')), "no short name from another namespace: {:?}", v.domains);
        assert!(v.domains.iter().any(|d| d.ends_with(".shop:9080")));
    }
    // The same registry, viewed from shop: short names.
    let rs = route::routes(&ctx, &aws_view(&r).routes, &r);
    assert!(route_config(&rs, "9080").virtual_hosts.iter().all(|v| v.domains.iter().any(|d| !d.contains('.'))));
}

#[test]
fn api_routes_are_named_fqdn_port() {
    let (ctx, r) = demo();
    let rs = route::routes(&ctx, &aws_view(&r).routes, &r);
    let api: Vec<&Named<RouteConfiguration>> = rs.iter().filter(|r| !r.wildcard).collect();
    let expect: Vec<String> = demo_service_ports().iter().map(|(h, p)| format!("{h}:{p}")).collect();
    assert_eq!(api.iter().map(|r| r.name.clone()).collect::<Vec<_>>(), expect);
    for (r, (host, port)) in api.iter().zip(demo_service_ports()) {
        assert_eq!(r.resource.name, r.name);
        let Some(Action::Route(ra)) = &r.resource.virtual_hosts[0].routes[0].action else { panic!("a route action") };
        assert_eq!(ra.cluster_specifier, Some(ClusterSpecifier::Cluster(outbound_cluster_name(port, "", &host))));
    }
}

// ---- determinism ----

fn views(r: &Registry) -> Vec<View> {
    vec![
        aws_view(r),
        View::of(&proxy("shop", AZURE, "westeurope/westeurope-2", InterceptionMode::Redirect), r),
        View::of(&proxy("default", AWS, "", InterceptionMode::None), r),
    ]
}

/// Every resource of every type for `view`, encoded as the cache encodes them.
fn encode_view(ctx: &Context, view: &View, r: &Registry) -> Vec<Arc<Resource>> {
    let mut out: Vec<Arc<Resource>> = Vec::new();
    out.extend(cluster::clusters(ctx, &view.clusters, r).into_iter().map(Resource::encode));
    out.extend(all_load_assignments(ctx, &view.endpoints, r).into_iter().map(Resource::encode));
    out.extend(listener::listeners(ctx, &view.listeners, r).into_iter().map(Resource::encode));
    out.extend(route::routes(ctx, &view.routes, r).into_iter().map(Resource::encode));
    out
}

#[test]
fn translation_is_deterministic() {
    let (ctx, r1) = demo();
    let (_, r2) = demo_in(&[AZURE, AWS]);
    // one object at a time, Azure first, each cluster's objects in reverse order
    let mesh = demo_mesh();
    let mut r3 = Registry::new(&mesh);
    for c in [AZURE, AWS] {
        for object in demo_objects(c).into_iter().rev() {
            r3.apply(SourceEvent::Upsert { cluster: ClusterId::new(c), object });
        }
    }
    for view in views(&r1) {
        let first = encode_view(&ctx, &view, &r1);
        assert!(first.len() > 20);
        assert_eq!(first, encode_view(&ctx, &view, &r1), "translating twice");
        assert_eq!(first, encode_view(&ctx, &view, &r2), "clusters applied in the other order");
        assert_eq!(first, encode_view(&ctx, &view, &r3), "objects applied one by one, in reverse");
        let versions: Vec<(&str, &str)> = first.iter().map(|x| (&*x.name, &*x.version)).collect();
        let again = encode_view(&ctx, &view, &r2);
        assert_eq!(versions, again.iter().map(|x| (&*x.name, &*x.version)).collect::<Vec<_>>());
    }
    // Different scopes do get different resources.
    let v = views(&r1);
    assert_ne!(encode_view(&ctx, &v[0], &r1), encode_view(&ctx, &v[1], &r1));
}

// ---- removals ----

#[test]
fn removing_an_endpoint_removes_it_from_the_assignment() {
    let (ctx, mut r) = demo();
    let view = aws_view(&r);
    let name = format!("outbound|9080||{}", fqdn("reviews"));
    let ratings = format!("outbound|9080||{}", fqdn("ratings"));
    let ratings_before = Resource::encode(Named::new(&ratings, load_assignment(&ctx, &view.endpoints, &r, &ratings)));

    let TopologyObject::EndpointSlice(mut slice) = demo_object(AWS, Kind::EndpointSlice, "reviews-x7k2p") else {
        panic!("a slice")
    };
    slice.endpoints.retain(|e| e.addresses[0].to_string() != "127.0.1.21");
    r.apply(SourceEvent::Upsert { cluster: ClusterId::new(AWS), object: TopologyObject::EndpointSlice(slice.clone()) });
    let cla = load_assignment(&ctx, &view.endpoints, &r, &name);
    assert!(!endpoint_addresses(&cla).contains(&"127.0.1.21:9080".to_string()));
    assert_eq!(endpoint_addresses(&cla).len(), 4, "3 AWS endpoints, 1 gateway endpoint for Azure");
    assert_eq!(localities(&cla), zones(&[("us-east-1a", 0, 1, 1), ("us-east-1b", 1, 2, 2), ("", 2, 4, 1)]));
    let ratings_after = Resource::encode(Named::new(&ratings, load_assignment(&ctx, &view.endpoints, &r, &ratings)));
    assert_eq!(ratings_before, ratings_after, "other services' assignments are unchanged");

    // Losing the proxy's zone: its locality goes and the priorities close up (same region first).
    slice.endpoints.retain(|e| e.zone.as_deref() != Some("us-east-1a"));
    r.apply(SourceEvent::Upsert { cluster: ClusterId::new(AWS), object: TopologyObject::EndpointSlice(slice) });
    let cla = load_assignment(&ctx, &view.endpoints, &r, &name);
    assert_eq!(localities(&cla), zones(&[("us-east-1b", 0, 2, 2), ("", 1, 4, 1)]));
    // A draining endpoint is not sent either (istiod's default).
    let azure_slice = demo_objects(AZURE)
        .into_iter()
        .find(|o| matches!(o, TopologyObject::EndpointSlice(s) if &*s.service == "reviews"))
        .expect("azure's reviews slice");
    let TopologyObject::EndpointSlice(mut slice) = azure_slice else { panic!("a slice") };
    slice.endpoints[0].ready = Some(false);
    slice.endpoints[0].terminating = Some(true);
    let drained = slice.endpoints[0].addresses[0].to_string();
    r.apply(SourceEvent::Upsert { cluster: ClusterId::new(AZURE), object: TopologyObject::EndpointSlice(slice) });
    let cla = load_assignment(&ctx, &view.endpoints, &r, &name);
    assert!(!endpoint_addresses(&cla).contains(&format!("{drained}:9080")));
    // Through the gateway: its weight drops by the drained endpoint.
    assert_eq!(localities(&cla), zones(&[("us-east-1b", 0, 2, 2), ("", 1, 3, 1)]));
    // From Azure itself the drained endpoint is simply gone.
    let azure = View::of(&proxy("shop", AZURE, "westeurope/westeurope-1", InterceptionMode::None), &r);
    let cla = load_assignment(&ctx, &azure.endpoints, &r, &name);
    assert!(!endpoint_addresses(&cla).contains(&format!("{drained}:9080")));
    assert_eq!(
        endpoint_addresses(&cla).iter().filter(|a| a.starts_with("127.0.3.") || a.starts_with("127.0.4.")).count(),
        3
    );
}

#[test]
fn removing_a_service_removes_its_clusters_routes_and_listeners() {
    let (ctx, mut r) = demo();
    let view = aws_view(&r);
    for c in [AWS, AZURE] {
        let object = demo_object(c, Kind::Service, "reviews");
        r.apply(SourceEvent::Delete { cluster: ClusterId::new(c), key: object.key() });
    }
    assert!(r.service(&ServiceKey::new("shop", "reviews")).is_none());
    let cs = cluster::clusters(&ctx, &view.clusters, &r);
    assert!(cs.iter().all(|c| !c.name.contains("reviews")), "{:?}", names(&cs));
    assert_eq!(cs.len(), 2 + 5, "no reviews subsets either: {:?}", names(&cs));
    assert!(all_load_assignments(&ctx, &view.endpoints, &r).iter().all(|c| !c.name.contains("reviews")));
    let rs = route::routes(&ctx, &view.routes, &r);
    assert_eq!(vhost_names(route_config(&rs, "9080")), [format!("{}:9080", fqdn("ratings"))]);
    assert!(rs.iter().all(|r| !r.name.contains("reviews")));
    let ls = listener::listeners(&ctx, &view.listeners, &r);
    assert!(ls.iter().any(|l| l.name == "127.0.50.1_9080"), "ratings still serves 9080");
    assert!(ls.iter().all(|l| !l.name.contains("reviews")));

    // The last service on a port: its listener and port route go too.
    for c in [AWS, AZURE] {
        let object = demo_object(c, Kind::Service, "frontend");
        r.apply(SourceEvent::Delete { cluster: ClusterId::new(c), key: object.key() });
    }
    let ls = listener::listeners(&ctx, &view.listeners, &r);
    assert!(ls.iter().all(|l| !l.name.ends_with("_8080") && !l.name.contains("frontend")), "{:?}", names(&ls));
    let rs = route::routes(&ctx, &view.routes, &r);
    assert!(rs.iter().all(|r| r.name != "8080" && !r.name.contains("frontend")));
    let cs = cluster::clusters(&ctx, &view.clusters, &r);
    assert!(cs.iter().all(|c| !c.name.contains("frontend")));

    // Defined again in one cluster only: everything is back (endpoints from that cluster).
    r.apply(SourceEvent::Upsert {
        cluster: ClusterId::new(AZURE),
        object: demo_object(AZURE, Kind::Service, "frontend"),
    });
    let ls = listener::listeners(&ctx, &view.listeners, &r);
    assert!(ls.iter().any(|l| l.name == "127.0.50.1_8080"));
    let cla = load_assignment(&ctx, &view.endpoints, &r, &format!("outbound|8080||{}", fqdn("frontend")));
    assert_eq!(localities(&cla), zones(&[("", 0, 4, 1)]), "Azure's two zones through its gateway");
}

// ---- inbound mTLS and diagnostics ----

#[test]
fn a_tls_sidecar_terminates_mtls_for_the_ports_its_workload_serves() {
    let (ctx, r) = demo();
    let mut p = proxy("shop", AZURE, "westeurope/westeurope-1", InterceptionMode::None);
    p.ip = "127.0.3.21".parse().unwrap(); // a reviews pod
    p.inbound_address = "127.0.103.21".parse().unwrap();
    let view = View::of(&p, &r);
    let inbound = view.inbound.clone().expect("a TLS sidecar has an inbound side");
    let cs = cluster::inbound_clusters(&inbound, &r);
    assert_eq!(names(&cs), ["inbound|9080||"]);
    let la = cs[0].resource.load_assignment.as_ref().expect("static");
    assert_eq!(endpoint_addresses(la), ["127.0.103.21:9080"]);
    // outbound clusters stay shared: the inbound ones are not part of the cluster scope
    assert!(cluster::clusters(&ctx, &view.clusters, &r).iter().all(|c| !c.name.starts_with("inbound|")));
    let ls = listener::listeners(&ctx, &view.listeners, &r);
    let l = &listener(&ls, "127.0.3.21_9080").resource;
    assert_eq!(l.listener_filters[0].name, "envoy.filters.listener.tls_inspector");
    let chains: Vec<&str> = l.filter_chains.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(chains, ["inbound-9080", "outbound-9080"]);
    let m = l.filter_chains[0].filter_chain_match.as_ref().unwrap();
    assert_eq!(m.transport_protocol, "tls");
    assert_eq!(
        m.application_protocols,
        ["istio-peer-exchange", "istio", "istio-http/1.0", "istio-http/1.1", "istio-h2"],
        "what meshfed's and istiod's sidecars offer"
    );
    assert!(l.filter_chains[0].transport_socket.is_some(), "mTLS terminated here");
    assert!(l.filter_chains[1].filter_chain_match.is_none(), "plaintext from the app: outbound");
    // a proxy that serves nothing has no inbound clusters; one without certificates no inbound side
    let mut client = proxy("shop", AWS, "us-east-1/us-east-1a", InterceptionMode::None);
    assert!(cluster::inbound_clusters(View::of(&client, &r).inbound.as_ref().unwrap(), &r).is_empty());
    client.tls = TlsSupport::None;
    assert!(View::of(&client, &r).inbound.is_none());
}

#[test]
fn diagnostics_name_what_translation_works_around() {
    let (ctx, r) = demo();
    let w = diagnostics::warnings(&ctx, &r);
    assert!(w.is_empty(), "the demo is clean: {w:?}");

    // Azure's gateway goes away: azure-net cannot be reached from aws-net.
    let mut r2 = r.clone();
    let gw = demo_object(AZURE, Kind::Service, "istio-eastwestgateway");
    r2.apply(SourceEvent::Delete { cluster: ClusterId::new(AZURE), key: gw.key() });
    let ctx2 = ctx.clone().with_registry(&r2);
    let w = diagnostics::warnings(&ctx2, &r2);
    assert!(w.iter().any(|w| w.kind == "network-without-gateway" && w.subject == "network azure-net"), "{w:?}");

    // A DestinationRule with failover and no outlier detection; and an invalid one.
    let rules = [
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: frontend, namespace: shop}\nspec:\n  host: frontend\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n        failover: [{from: us-east-1, to: westeurope}]\n",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: broken, namespace: shop}\nspec:\n  host: ratings\n  trafficPolicy:\n    outlierDetection: {interval: soon}\n",
    ];
    let mut r3 = r.clone();
    for text in rules {
        let objs = crate::topology::parse_manifests(text, std::path::Path::new("dr.yaml")).unwrap();
        r3.apply(SourceEvent::Upsert { cluster: ClusterId::new(AWS), object: objs[0].clone() });
    }
    // (without the mesh-wide default outlier detection, which would otherwise fill the rule's gap)
    let mut mesh = demo_mesh();
    mesh.defaults.outlier_detection = None;
    let ctx3 = Context::from_mesh(&mesh).with_registry(&r3);
    let w = diagnostics::warnings(&ctx3, &r3);
    assert!(
        w.iter()
            .any(|w| w.kind == "failover-without-outlier-detection" && w.subject == "DestinationRule shop/frontend"),
        "{w:?}"
    );
    assert!(w.iter().any(|w| w.kind == "invalid-destination-rule" && w.message.contains("shop/broken")), "{w:?}");
    // ... and the invalid rule is ignored: ratings keeps the demo's rule.
    let ratings = r3.service(&ServiceKey::new("shop", "ratings")).unwrap();
    assert_eq!(ctx3.policy(ratings, 9080).rule.map(|r| r.0.to_string()), Some("shop/ratings".into()));
    // The frontend rule has no outlier detection: no priorities for it (failover would not work).
    let view = aws_view(&r3);
    let cla = load_assignment(&ctx3, &view.endpoints, &r3, &format!("outbound|8080||{}", fqdn("frontend")));
    assert!(cla.endpoints.iter().all(|l| l.priority == 0));
}

// ---- DestinationRule subsets ----

fn reviews_subset(subset: &str) -> String {
    format!("outbound|9080|{subset}|{}", fqdn("reviews"))
}

#[test]
fn subset_assignments_hold_only_their_pods_endpoints_with_the_base_priorities() {
    let (ctx, r) = demo();
    let view = aws_view(&r);
    let base = load_assignment(&ctx, &view.endpoints, &r, &format!("outbound|9080||{}", fqdn("reviews")));
    assert_eq!(localities(&base), zones(&[("us-east-1a", 0, 2, 2), ("us-east-1b", 1, 2, 2), ("", 2, 4, 1)]));
    // v1 is the first pod of each zone (.21), v2 the second (.22); Azure's through its gateway, which
    // stands for (is weighted by) the subset's Azure endpoints only
    for (subset, host) in [("v1", 21), ("v2", 22)] {
        let cla = load_assignment(&ctx, &view.endpoints, &r, &reviews_subset(subset));
        assert_eq!(cla.cluster_name, reviews_subset(subset));
        assert_eq!(
            endpoint_addresses(&cla),
            [format!("127.0.1.{host}:9080"), format!("127.0.2.{host}:9080"), "127.0.20.1:15443".into()],
            "{subset}"
        );
        assert_eq!(
            localities(&cla),
            zones(&[("us-east-1a", 0, 1, 1), ("us-east-1b", 1, 1, 1), ("", 2, 2, 1)]),
            "{subset}: the base's priorities"
        );
        let gw = cla.endpoints.iter().find(|l| l.priority == 2).unwrap();
        assert_eq!(gw.lb_endpoints[0].load_balancing_weight.unwrap().value, 2, "{subset}: Azure's 2, not 4");
    }
    // other services have no subsets
    let all = all_load_assignments(&ctx, &view.endpoints, &r);
    let subset_names: Vec<&str> = all.iter().map(|c| c.name.as_str()).filter(|n| !n.contains("||")).collect();
    assert_eq!(subset_names, [reviews_subset("v1"), reviews_subset("v2")]);
}

#[test]
fn a_gateway_forwards_each_subset_sni_to_its_own_networks_subset_endpoints() {
    let (ctx, r) = demo();
    let mut p = proxy("istio-system", AZURE, "westeurope/westeurope-1", InterceptionMode::None);
    p.kind = ProxyKind::Router;
    p.ip = "127.0.20.1".parse().unwrap();
    let view = View::of(&p, &r);
    let ls = listener::listeners(&ctx, &view.listeners, &r);
    let chains: Vec<&str> = ls[0].resource.filter_chains.iter().map(|c| c.name.as_str()).collect();
    for subset in ["", "v1", "v2"] {
        let sni = format!("outbound_.9080_.{subset}_.{}", fqdn("reviews"));
        let chain =
            ls[0].resource.filter_chains.iter().find(|c| c.name == sni).unwrap_or_else(|| panic!("{sni}: {chains:?}"));
        assert_eq!(chain.filter_chain_match.as_ref().unwrap().server_names, std::slice::from_ref(&sni));
        let Some(filter::ConfigType::TypedConfig(any)) = &chain.filters[0].config_type else { panic!("typed") };
        let tp = TcpProxy::decode(any.value.as_slice()).unwrap();
        assert_eq!(tp.cluster_specifier, Some(tcp_proxy::ClusterSpecifier::Cluster(sni.clone())));
    }
    assert!(!chains.iter().any(|c| c.contains("_.v1_.ratings")), "ratings has no subsets");
    let server_names: Vec<&String> = ls[0]
        .resource
        .filter_chains
        .iter()
        .flat_map(|c| &c.filter_chain_match.as_ref().unwrap().server_names)
        .collect();
    assert_eq!(server_names.iter().collect::<BTreeSet<_>>().len(), server_names.len(), "Envoy needs unique SNIs");
    let cs = cluster::clusters(&ctx, &view.clusters, &r);
    for (subset, host) in [("v1", 21), ("v2", 22)] {
        let name = format!("outbound_.9080_.{subset}_.{}", fqdn("reviews"));
        let c = cs.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no {name}"));
        assert!(
            c.resource.transport_socket_matches.is_empty() && c.resource.outlier_detection.is_none(),
            "passthrough"
        );
        let cla = load_assignment(&ctx, &view.endpoints, &r, &name);
        assert_eq!(endpoint_addresses(&cla), [format!("127.0.3.{host}:9080"), format!("127.0.4.{host}:9080")]);
    }
}

fn upsert_rule(r: &mut Registry, yaml: &str) {
    let objs = crate::topology::parse_manifests(yaml, Path::new("dr.yaml")).expect("a rule");
    let TopologyObject::DestinationRule(d) = &objs[0] else { panic!("a DestinationRule") };
    assert!(d.rule.is_ok(), "{:?}", d.rule);
    r.apply(SourceEvent::Upsert { cluster: ClusterId::new(AWS), object: objs[0].clone() });
}

#[test]
fn pods_move_between_subsets_with_their_labels_and_an_empty_subset_exists() {
    let (_, mut r) = demo();
    let TopologyObject::Pod(mut pod) = demo_object(AWS, Kind::Pod, "reviews-v1-5f7d8-a1") else { panic!("a pod") };
    let mut labels = (*pod.labels).clone();
    labels.insert("version".into(), "v2".into());
    pod.labels = Arc::new(labels);
    r.apply(SourceEvent::Upsert { cluster: ClusterId::new(AWS), object: TopologyObject::Pod(pod) });
    let ctx = Context::from_mesh(&demo_mesh()).with_registry(&r);
    let view = aws_view(&r);
    let v1 = load_assignment(&ctx, &view.endpoints, &r, &reviews_subset("v1"));
    let v2 = load_assignment(&ctx, &view.endpoints, &r, &reviews_subset("v2"));
    assert_eq!(endpoint_addresses(&v1), ["127.0.2.21:9080", "127.0.20.1:15443"]);
    assert_eq!(endpoint_addresses(&v2), ["127.0.1.21:9080", "127.0.1.22:9080", "127.0.2.22:9080", "127.0.20.1:15443"]);
    assert_eq!(localities(&v1)[0], ("us-east-1b".into(), 0, 1, 1), "no v1 left in the proxy's zone");

    // a subset nothing matches: its cluster and an empty assignment (it exists: the rule defines it)
    upsert_rule(
        &mut r,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: shop}\nspec:\n  host: reviews\n  subsets:\n  - name: v3\n    labels: {version: v3}\n",
    );
    let ctx = Context::from_mesh(&demo_mesh()).with_registry(&r);
    let cs = cluster::clusters(&ctx, &view.clusters, &r);
    assert!(cs.iter().any(|c| c.name == reviews_subset("v3")));
    assert!(!cs.iter().any(|c| c.name == reviews_subset("v1")), "the rule no longer has v1");
    let v3 = load_assignment(&ctx, &view.endpoints, &r, &reviews_subset("v3"));
    assert_eq!(v3.cluster_name, reviews_subset("v3"));
    assert!(v3.endpoints.is_empty());
}

#[test]
fn proxies_share_the_default_rule_scope_unless_a_rule_makes_their_namespace_matter() {
    let (_, mut r) = demo();
    // the demo's rules are in the services' namespace, exported everywhere: one scope for every namespace
    let shop = aws_view(&r);
    let default_ns = View::of(&proxy("default", AWS, "us-east-1/us-east-1a", InterceptionMode::None), &r);
    assert_eq!(shop.clusters, default_ns.clusters);
    assert_eq!(shop.endpoints, default_ns.endpoints);
    assert_eq!(shop.clusters.rules, RuleScope::default());

    // a rule in the client's namespace `frontend`: proxies there see it, before the service's
    upsert_rule(
        &mut r,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews-blue, namespace: frontend}\nspec:\n  host: reviews.shop.svc.cluster.local\n  subsets:\n  - name: blue\n    labels: {version: v1}\n",
    );
    let ctx = Context::from_mesh(&demo_mesh()).with_registry(&r);
    let front = View::of(&proxy("frontend", AWS, "us-east-1/us-east-1a", InterceptionMode::None), &r);
    assert_eq!(front.clusters.rules.namespace.as_deref(), Some("frontend"));
    assert_eq!(front.endpoints.rules, front.clusters.rules);
    let shop = aws_view(&r);
    assert_eq!(shop.clusters.rules, RuleScope::default(), "shop still sees what every other namespace sees");
    let subsets = |view: &View| -> Vec<String> {
        cluster::clusters(&ctx, &view.clusters, &r)
            .into_iter()
            .filter(|c| c.name.contains("reviews") && !c.name.contains("||"))
            .map(|c| c.name)
            .collect()
    };
    assert_eq!(subsets(&front), [reviews_subset("blue")]);
    assert_eq!(subsets(&shop), [reviews_subset("v1"), reviews_subset("v2")]);
    // ... and the frontend rule has no outlier detection of its own: the mesh default (5), not 3
    let base = cluster::clusters(&ctx, &front.clusters, &r)
        .into_iter()
        .find(|c| c.name == format!("outbound|9080||{}", fqdn("reviews")))
        .unwrap();
    assert_eq!(base.resource.outlier_detection.unwrap().consecutive_5xx.unwrap().value, 5);
    let blue = load_assignment(&ctx, &front.endpoints, &r, &reviews_subset("blue"));
    assert_eq!(endpoint_addresses(&blue), ["127.0.1.21:9080", "127.0.2.21:9080", "127.0.20.1:15443"]);
}

#[test]
fn export_to_and_workload_selectors_reach_the_proxies_they_name() {
    let (_, mut r) = demo();
    // the demo's reviews rule, private to shop
    let text = std::fs::read_to_string(demo_dir().join("aws-use1/destinationrules.yaml")).unwrap();
    let private = text.replacen(
        "  host: reviews.shop.svc.cluster.local\n",
        "  host: reviews.shop.svc.cluster.local\n  exportTo: [\".\"]\n",
        1,
    );
    assert_ne!(private, text);
    let objs = crate::topology::parse_manifests(&private, Path::new("dr.yaml")).unwrap();
    r.apply(SourceEvent::Sync {
        cluster: ClusterId::new(AWS),
        objects: demo_objects(AWS).into_iter().filter(|o| o.key().kind != Kind::DestinationRule).chain(objs).collect(),
    });
    let ctx = Context::from_mesh(&demo_mesh()).with_registry(&r);
    let shop = aws_view(&r);
    let other = View::of(&proxy("default", AWS, "us-east-1/us-east-1a", InterceptionMode::None), &r);
    assert_eq!(shop.clusters.rules.namespace.as_deref(), Some("shop"));
    assert_eq!(other.clusters.rules, RuleScope::default());
    let has_v1 =
        |view: &View| cluster::clusters(&ctx, &view.clusters, &r).iter().any(|c| c.name == reviews_subset("v1"));
    assert!(has_v1(&shop));
    assert!(!has_v1(&other), "not exported to default");
    assert!(!all_load_assignments(&ctx, &other.endpoints, &r).iter().any(|c| c.name == reviews_subset("v1")));

    // a workloadSelector rule in shop: only the shop proxies with its labels see it
    upsert_rule(
        &mut r,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: canary, namespace: shop}\nspec:\n  host: reviews\n  workloadSelector: {matchLabels: {app: canary}}\n  subsets:\n  - name: canary\n    labels: {version: v2}\n",
    );
    let ctx = Context::from_mesh(&demo_mesh()).with_registry(&r);
    let mut p = proxy("shop", AWS, "us-east-1/us-east-1a", InterceptionMode::None);
    p.labels = BTreeMap::from([("app".into(), "canary".into()), ("version".into(), "x".into())]);
    let canary = View::of(&p, &r);
    assert_eq!(canary.clusters.rules.selected_by, [Arc::from("shop/canary")]);
    let plain = aws_view(&r);
    assert!(plain.clusters.rules.selected_by.is_empty());
    let names_of = |view: &View| -> Vec<String> {
        cluster::clusters(&ctx, &view.clusters, &r)
            .into_iter()
            .map(|c| c.name)
            .filter(|n| n.contains("reviews"))
            .collect()
    };
    // (the shop-private rule without a selector is merged into the selector rule, as istiod merges them)
    assert_eq!(
        names_of(&canary),
        [
            format!("outbound|9080||{}", fqdn("reviews")),
            reviews_subset("canary"),
            reviews_subset("v1"),
            reviews_subset("v2")
        ]
    );
    let canary_cla = load_assignment(&ctx, &canary.endpoints, &r, &reviews_subset("canary"));
    assert_eq!(endpoint_addresses(&canary_cla), ["127.0.1.22:9080", "127.0.2.22:9080", "127.0.20.1:15443"]);
    assert!(names_of(&plain).contains(&reviews_subset("v1")));
    // a proxy with those labels in another namespace: not selected
    let mut elsewhere = p.clone();
    elsewhere.namespace = "default".into();
    assert_eq!(View::of(&elsewhere, &r).clusters.rules, RuleScope::default());
}

#[test]
fn diagnostics_name_every_destination_rule_field_not_applied() {
    let (_, mut r) = demo();
    upsert_rule(
        &mut r,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: frontend, namespace: shop}\nspec:\n  host: frontend\n  trafficPolicy:\n    connectionPool: {tcp: {maxConnections: 10}}\n    loadBalancer: {simple: LEAST_REQUEST}\n    tls: {mode: ISTIO_MUTUAL}\n  subsets:\n  - name: v1\n    labels: {version: v1}\n    trafficPolicy:\n      loadBalancer:\n        consistentHash: {httpHeaderName: x-user}\n",
    );
    let ctx = Context::from_mesh(&demo_mesh()).with_registry(&r);
    let w = diagnostics::warnings(&ctx, &r);
    let not_applied: Vec<&str> = w
        .iter()
        .filter(|w| w.kind == "destination-rule-field-not-applied" && w.subject == "DestinationRule shop/frontend")
        .map(|w| w.message.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        not_applied,
        [
            "spec.subsets[0].trafficPolicy.loadBalancer.consistentHash",
            "spec.trafficPolicy.connectionPool",
            "spec.trafficPolicy.loadBalancer.simple",
            "spec.trafficPolicy.tls",
        ]
    );
    // the rest of the rule applies: its subset exists
    let view = aws_view(&r);
    assert!(
        cluster::clusters(&ctx, &view.clusters, &r)
            .iter()
            .any(|c| c.name == format!("outbound|8080|v1|{}", fqdn("frontend")))
    );

    // two rules for one host merge; a subset defined by both is the first's, and said so
    upsert_rule(
        &mut r,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews-more, namespace: shop}\nspec:\n  host: reviews\n  subsets:\n  - name: v2\n    labels: {version: two}\n  - name: v3\n    labels: {version: v3}\n",
    );
    let ctx = Context::from_mesh(&demo_mesh()).with_registry(&r);
    let w = diagnostics::warnings(&ctx, &r);
    assert!(
        w.iter().any(|w| w.kind == "destination-rule-duplicate-subset"
            && w.subject == "DestinationRule shop/reviews-more"
            && w.message.contains("subset v2")),
        "{w:?}"
    );
    let names: Vec<String> = cluster::clusters(&ctx, &view.clusters, &r).into_iter().map(|c| c.name).collect();
    for s in ["v1", "v2", "v3"] {
        assert!(names.contains(&reviews_subset(s)), "{s}: {names:?}");
    }
    let v2 = load_assignment(&ctx, &view.endpoints, &r, &reviews_subset("v2"));
    assert_eq!(endpoint_addresses(&v2)[0], "127.0.1.22:9080", "the demo rule's v2 (version: v2)");
}
