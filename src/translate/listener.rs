//! LDS: outbound listeners that carry a sidecar's traffic to services, and api_listeners for
//! proxyless gRPC clients.
//!
//! With interception NONE (no iptables; what `meshfed bootstrap` sets up) each outbound port gets a
//! listener bound on the proxy's IP: an application sends `http://reviews.shop:9080/` to the sidecar's
//! address. With REDIRECT (Istio's iptables capture) listeners are `0.0.0.0_PORT` with
//! bind_to_port=false behind `virtualOutbound` on 15001, exactly as istiod shapes them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use envoy_types::pb::envoy::config::core::v3::{
    Address, SocketAddress, TrafficDirection, address, socket_address::PortSpecifier,
};
use envoy_types::pb::envoy::config::listener::v3::{
    ApiListener, Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager::CodecType,
    http_connection_manager::RouteSpecifier, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};

use super::cluster::inbound_ports;
use super::route::{api_name, http_ports};
use super::tls::{INBOUND_MTLS_ALPN, inbound_transport_socket};
use super::util::{ads_config_source, any, boolv, u32v};
use super::{
    Context, ListenerScope, Named, PASSTHROUGH_CLUSTER, inbound_cluster_name, outbound_cluster_name, sni_name,
};
use crate::model::{Protocol, Service};
use crate::proxy::{ProxyKind, TlsSupport};
use crate::registry::Registry;

pub const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
pub const VIRTUAL_OUTBOUND_PORT: u16 = 15001;
pub const VIRTUAL_INBOUND: &str = "virtualInbound";
pub const VIRTUAL_INBOUND_PORT: u16 = 15006;
/// The east-west gateway's mTLS passthrough port.
pub const GATEWAY_PORT: u16 = 15443;

fn socket(ip: IpAddr, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(port as u32)),
            ..Default::default()
        })),
    }
}

fn router_filter() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(&Router::default()))),
        ..Default::default()
    }
}

/// An HTTP connection manager that takes its routes from RDS `route_name`.
pub fn http_connection_manager(stat_prefix: &str, route_name: &str) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: stat_prefix.into(),
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads_config_source()),
            route_config_name: route_name.into(),
        })),
        http_filters: vec![router_filter()],
        ..Default::default()
    }
}

fn network_filter<M: prost::Message + prost::Name>(name: &str, config: &M) -> Filter {
    Filter { name: name.into(), config_type: Some(filter::ConfigType::TypedConfig(any(config))) }
}

fn hcm_filter(stat_prefix: &str, route_name: &str) -> Filter {
    network_filter("envoy.filters.network.http_connection_manager", &http_connection_manager(stat_prefix, route_name))
}

fn tcp_proxy_filter(stat_prefix: &str, cluster: String) -> Filter {
    let tp = TcpProxy {
        stat_prefix: stat_prefix.into(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster)),
        ..Default::default()
    };
    network_filter("envoy.filters.network.tcp_proxy", &tp)
}

/// One outbound listener per port: HTTP ports route by Host header through RDS; a TCP port served
/// by exactly one service forwards to it (several TCP services on one port cannot be told apart
/// without original-destination addresses, so they get no listener in NONE mode).
fn outbound_listeners(scope: &ListenerScope, registry: &Registry) -> Vec<Named<Listener>> {
    let (ip, bind) = match scope.bind {
        Some(ip) => (ip, true),
        None => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), false),
    };
    let mut out = Vec::new();
    let http = http_ports(registry);
    let mut tcp: BTreeMap<u16, Vec<&Service>> = BTreeMap::new();
    for s in registry.services().values() {
        for p in s.ports.iter().filter(|p| matches!(p.protocol, Protocol::Tcp | Protocol::Tls | Protocol::Https)) {
            if !http.contains_key(&p.port) {
                tcp.entry(p.port).or_default().push(s);
            }
        }
    }
    let mut ports: Vec<(u16, Option<&Service>)> = http.keys().map(|p| (*p, None)).collect();
    ports.extend(tcp.iter().filter(|(_, s)| s.len() == 1).map(|(p, s)| (*p, Some(s[0]))));
    ports.sort_by_key(|(p, _)| *p);
    // With interception NONE, the workload's own inbound ports share the listener on its address: mTLS
    // from other sidecars (matched by ALPN) is inbound, plaintext from the application is outbound.
    let inbound: BTreeMap<u16, Protocol> = match (&scope.inbound, bind) {
        (Some(i), true) => inbound_ports(registry, i.ip).into_iter().collect(),
        _ => BTreeMap::new(),
    };
    let mut all_ports: Vec<u16> = ports.iter().map(|(p, _)| *p).chain(inbound.keys().copied()).collect();
    all_ports.sort_unstable();
    all_ports.dedup();
    for port in all_ports {
        let name = format!("{ip}_{port}");
        let stat_prefix = format!("outbound_{name}");
        let mut filter_chains = Vec::new();
        let mut listener_filters = Vec::new();
        if inbound.contains_key(&port) {
            filter_chains.push(inbound_chain(scope.tls, port, None));
            listener_filters.push(tls_inspector());
        }
        if let Some((_, tcp_service)) = ports.iter().find(|(p, _)| *p == port) {
            let filter = match tcp_service {
                None => hcm_filter(&stat_prefix, &port.to_string()),
                Some(s) => tcp_proxy_filter(&stat_prefix, outbound_cluster_name(port, "", &s.hostname)),
            };
            filter_chains.push(FilterChain {
                name: format!("outbound-{port}"),
                filters: vec![filter],
                ..Default::default()
            });
        }
        let listener = Listener {
            name: name.clone(),
            address: Some(socket(ip, port)),
            filter_chains,
            listener_filters,
            traffic_direction: TrafficDirection::Outbound as i32,
            bind_to_port: (!bind).then_some(boolv(false)),
            ..Default::default()
        };
        out.push(Named::new(name, listener));
    }
    if !bind {
        let listener = Listener {
            name: VIRTUAL_OUTBOUND.into(),
            address: Some(socket(IpAddr::V4(Ipv4Addr::UNSPECIFIED), VIRTUAL_OUTBOUND_PORT)),
            use_original_dst: Some(boolv(true)),
            filter_chains: vec![FilterChain {
                name: "virtualOutbound-catchall-tcp".into(),
                filters: vec![tcp_proxy_filter(PASSTHROUGH_CLUSTER, PASSTHROUGH_CLUSTER.into())],
                ..Default::default()
            }],
            traffic_direction: TrafficDirection::Outbound as i32,
            ..Default::default()
        };
        out.push(Named::new(VIRTUAL_OUTBOUND, listener));
        if let Some(i) = &scope.inbound {
            out.push(virtual_inbound(scope.tls, &inbound_ports(registry, i.ip)));
        }
    }
    out
}

fn tls_inspector() -> ListenerFilter {
    ListenerFilter {
        name: "envoy.filters.listener.tls_inspector".into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(any(&TlsInspector::default()))),
        ..Default::default()
    }
}

/// A filter chain that terminates Istio mTLS for `port` and forwards the bytes to the local workload. It
/// matches every ALPN an Istio client offers: `istio-peer-exchange`/`istio` (meshfed's sidecars, and
/// istiod's for TCP) and `istio-http/1.0`, `istio-http/1.1`, `istio-h2` (istiod's for HTTP).
fn inbound_chain(tls: TlsSupport, port: u16, destination_port: Option<u16>) -> FilterChain {
    FilterChain {
        name: format!("inbound-{port}"),
        filter_chain_match: Some(FilterChainMatch {
            destination_port: destination_port.map(|p| u32v(p as u32)),
            transport_protocol: "tls".into(),
            application_protocols: INBOUND_MTLS_ALPN.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        filters: vec![tcp_proxy_filter(&inbound_cluster_name(port), inbound_cluster_name(port))],
        transport_socket: Some(inbound_transport_socket(tls)),
        ..Default::default()
    }
}

/// Istio's `virtualInbound` (iptables capture): 15006, original destination, one mTLS chain per port.
fn virtual_inbound(tls: TlsSupport, ports: &[(u16, Protocol)]) -> Named<Listener> {
    let listener = Listener {
        name: VIRTUAL_INBOUND.into(),
        address: Some(socket(IpAddr::V4(Ipv4Addr::UNSPECIFIED), VIRTUAL_INBOUND_PORT)),
        listener_filters: vec![
            ListenerFilter {
                name: "envoy.filters.listener.original_dst".into(),
                config_type: Some(listener_filter::ConfigType::TypedConfig(any(&OriginalDst::default()))),
                ..Default::default()
            },
            tls_inspector(),
        ],
        filter_chains: ports.iter().map(|(p, _)| inbound_chain(tls, *p, Some(*p))).collect(),
        traffic_direction: TrafficDirection::Inbound as i32,
        ..Default::default()
    };
    Named::new(VIRTUAL_INBOUND, listener)
}

/// An east-west gateway's listener: TLS passed through by SNI (`outbound_.PORT_._.FQDN`, and
/// `outbound_.PORT_.SUBSET_.FQDN` for each subset of the DestinationRule the gateway sees) to the cluster
/// of that name, whose endpoints are the gateway's own network's (Istio's AUTO_PASSTHROUGH).
fn gateway_listener(ctx: &Context, scope: &ListenerScope, registry: &Registry) -> Named<Listener> {
    let ip = scope.bind.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let name = format!("{ip}_{GATEWAY_PORT}");
    let mut filter_chains = Vec::new();
    for s in registry.services().values() {
        let subsets = ctx.rule_for(&scope.rules, s).map(|r| r.subsets.as_slice()).unwrap_or_default();
        for p in &s.ports {
            for subset in std::iter::once("").chain(subsets.iter().map(|x| &*x.name)) {
                let sni = sni_name(p.port, subset, &s.hostname);
                filter_chains.push(FilterChain {
                    name: sni.clone(),
                    filter_chain_match: Some(FilterChainMatch {
                        server_names: vec![sni.clone()],
                        ..Default::default()
                    }),
                    filters: vec![tcp_proxy_filter(&sni, sni.clone())],
                    ..Default::default()
                });
            }
        }
    }
    let listener = Listener {
        name: name.clone(),
        address: Some(socket(ip, GATEWAY_PORT)),
        listener_filters: vec![tls_inspector()],
        filter_chains,
        traffic_direction: TrafficDirection::Inbound as i32,
        ..Default::default()
    };
    Named::new(name, listener)
}

/// `FQDN:PORT` api_listeners for proxyless gRPC clients; never part of a wildcard subscription.
/// A gRPC api_listener per service port (for proxyless clients, which name them; never wildcard).
pub fn api_listeners(registry: &Registry) -> Vec<Named<Listener>> {
    let mut out = Vec::new();
    for s in registry.services().values() {
        for p in &s.ports {
            let name = api_name(s, p.port);
            let hcm = http_connection_manager(&name, &name);
            let listener = Listener {
                name: name.clone(),
                api_listener: Some(ApiListener { api_listener: Some(any(&hcm)) }),
                ..Default::default()
            };
            out.push(Named { name, resource: listener, wildcard: false });
        }
    }
    out
}

/// Every listener for proxies in `scope`.
pub fn listeners(ctx: &Context, scope: &ListenerScope, registry: &Registry) -> Vec<Named<Listener>> {
    let mut out = scope_listeners(ctx, scope, registry);
    if scope.kind != ProxyKind::Router {
        out.extend(api_listeners(registry));
    }
    out
}

/// The listeners that depend on the scope: a sidecar's outbound (and, with interception NONE, inbound)
/// listeners, a gateway's SNI listener. A sidecar's gRPC api_listeners ([`api_listeners`]) are the same
/// for every scope and kept apart, so they are translated and stored once.
pub fn scope_listeners(ctx: &Context, scope: &ListenerScope, registry: &Registry) -> Vec<Named<Listener>> {
    match scope.kind {
        ProxyKind::Sidecar | ProxyKind::Ingress => outbound_listeners(scope, registry),
        // (A listener needs a filter chain: none until there is a service.)
        ProxyKind::Router if registry.services().is_empty() => Vec::new(),
        ProxyKind::Router => vec![gateway_listener(ctx, scope, registry)],
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use prost::Message;

    use super::*;
    use crate::mesh_config::MeshConfig;
    use crate::model::ClusterId;
    use crate::proxy::InterceptionMode;
    use crate::source::SourceEvent;
    use crate::topology::{ServiceInfo, ServicePortInfo, TopologyObject};

    fn ctx() -> Context {
        Context::default()
    }

    /// (port name, port, appProtocol)
    type PortSpec<'a> = (&'a str, u16, Option<&'a str>);

    /// A registry with `services`: (namespace, name, ports).
    fn registry(services: &[(&str, &str, &[PortSpec])]) -> Registry {
        let mesh = MeshConfig::parse("clusters:\n  - id: c1\n    network: n1\n    manifests: c1\n", Path::new("/x"))
            .expect("valid mesh config");
        let mut r = Registry::new(&mesh);
        for (ns, name, ports) in services {
            let info = ServiceInfo {
                namespace: (*ns).into(),
                name: (*name).into(),
                ports: ports
                    .iter()
                    .map(|(n, p, app)| ServicePortInfo {
                        name: (*n).into(),
                        port: *p,
                        // a port named `udp` is a UDP port
                        protocol: if *n == "udp" { "UDP" } else { "TCP" }.into(),
                        app_protocol: app.map(Into::into),
                        node_port: None,
                    })
                    .collect(),
                network: None,
                gateway_port: None,
                service_type: "ClusterIP".into(),
                external_ips: vec![],
                load_balancer_ingress: vec![],
            };
            r.apply(SourceEvent::Upsert { cluster: ClusterId::new("c1"), object: TopologyObject::Service(info) });
        }
        r
    }

    fn scope(kind: ProxyKind, bind: Option<&str>) -> ListenerScope {
        ListenerScope {
            kind,
            interception: if bind.is_some() { InterceptionMode::None } else { InterceptionMode::Redirect },
            bind: bind.map(|b| b.parse().expect("valid IP")),
            tls: TlsSupport::None,
            inbound: None,
            rules: Default::default(),
        }
    }

    fn wildcard_names(ls: &[Named<Listener>]) -> Vec<&str> {
        ls.iter().filter(|l| l.wildcard).map(|l| l.name.as_str()).collect()
    }

    fn first_filter(l: &Listener) -> (&str, &envoy_types::pb::google::protobuf::Any) {
        let f = &l.filter_chains[0].filters[0];
        let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else { panic!("typed config") };
        (&f.name, any)
    }

    fn tcp_cluster(l: &Listener) -> String {
        let (name, any) = first_filter(l);
        assert_eq!(name, "envoy.filters.network.tcp_proxy");
        let tp = TcpProxy::decode(any.value.as_slice()).expect("a TcpProxy");
        let Some(tcp_proxy::ClusterSpecifier::Cluster(c)) = tp.cluster_specifier else { panic!("a cluster") };
        c
    }

    fn rds_name(l: &Listener) -> String {
        let (name, any) = first_filter(l);
        assert_eq!(name, "envoy.filters.network.http_connection_manager");
        let hcm = HttpConnectionManager::decode(any.value.as_slice()).expect("an HCM");
        let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier else { panic!("RDS") };
        rds.route_config_name
    }

    #[test]
    fn tcp_port_of_one_service_forwards_to_it() {
        let r = registry(&[("db", "postgres", &[("tcp-pg", 5432, None)]), ("shop", "web", &[("http", 80, None)])]);
        let ls = listeners(&ctx(), &scope(ProxyKind::Sidecar, Some("127.0.0.7")), &r);
        assert_eq!(wildcard_names(&ls), ["127.0.0.7_80", "127.0.0.7_5432"]);
        assert_eq!(tcp_cluster(&ls[1].resource), "outbound|5432||postgres.db.svc.cluster.local");
        assert_eq!(rds_name(&ls[0].resource), "80");
        assert_eq!(ls[1].resource.traffic_direction, TrafficDirection::Outbound as i32);
    }

    #[test]
    fn tcp_port_shared_by_two_services_gets_no_listener() {
        let r = registry(&[("db", "postgres", &[("tcp", 5432, None)]), ("db", "replica", &[("tls", 5432, None)])]);
        let ls = listeners(&ctx(), &scope(ProxyKind::Sidecar, Some("127.0.0.7")), &r);
        assert!(wildcard_names(&ls).is_empty(), "{:?}", wildcard_names(&ls));
        // REDIRECT: the catch-all passthrough still carries that traffic.
        let ls = listeners(&ctx(), &scope(ProxyKind::Sidecar, None), &r);
        assert_eq!(wildcard_names(&ls), [VIRTUAL_OUTBOUND]);
    }

    #[test]
    fn http_wins_a_port_shared_with_tcp() {
        let r = registry(&[
            ("shop", "reviews", &[("http", 9080, None)]),
            ("shop", "legacy", &[("tcp", 9080, None)]),
            ("shop", "ratings", &[("grpc", 9091, Some("grpc")), ("udp", 9092, None)]),
        ]);
        let ls = listeners(&ctx(), &scope(ProxyKind::Sidecar, None), &r);
        assert_eq!(wildcard_names(&ls), ["0.0.0.0_9080", "0.0.0.0_9091", VIRTUAL_OUTBOUND]);
        assert_eq!(rds_name(&ls[0].resource), "9080");
        assert_eq!(rds_name(&ls[1].resource), "9091");
        assert_eq!(ls[0].resource.bind_to_port.map(|b| b.value), Some(false));
        assert_eq!(ls[2].resource.use_original_dst.map(|b| b.value), Some(true));
        assert_eq!(tcp_cluster(&ls[2].resource), PASSTHROUGH_CLUSTER);
    }

    #[test]
    fn api_listeners_for_every_port_never_wildcard() {
        let r = registry(&[("shop", "ratings", &[("http", 9080, None), ("grpc", 9091, Some("grpc"))])]);
        let ls = listeners(&ctx(), &scope(ProxyKind::Sidecar, Some("127.0.0.7")), &r);
        let api: Vec<&Named<Listener>> = ls.iter().filter(|l| !l.wildcard).collect();
        let names: Vec<&str> = api.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["ratings.shop.svc.cluster.local:9080", "ratings.shop.svc.cluster.local:9091"]);
        for l in api {
            let any = l.resource.api_listener.as_ref().and_then(|a| a.api_listener.as_ref()).expect("api_listener");
            let hcm = HttpConnectionManager::decode(any.value.as_slice()).expect("an HCM");
            let Some(RouteSpecifier::Rds(rds)) = &hcm.route_specifier else { panic!("RDS") };
            assert_eq!(rds.route_config_name, l.name);
            assert!(l.resource.address.is_none() && l.resource.filter_chains.is_empty());
        }
    }

    #[test]
    fn empty_registry_and_routers() {
        let r = registry(&[]);
        assert!(listeners(&ctx(), &scope(ProxyKind::Sidecar, Some("127.0.0.7")), &r).is_empty());
        let names: Vec<String> =
            listeners(&ctx(), &scope(ProxyKind::Sidecar, None), &r).into_iter().map(|l| l.name).collect();
        assert_eq!(names, [VIRTUAL_OUTBOUND]);
        assert!(listeners(&ctx(), &scope(ProxyKind::Router, None), &r).is_empty(), "no service: no chain");
        let r = registry(&[("shop", "reviews", &[("http", 9080, None)])]);
        let ls = listeners(&ctx(), &scope(ProxyKind::Router, None), &r);
        assert_eq!(ls.len(), 1);
        let l = &ls[0].resource;
        assert_eq!(l.name, "0.0.0.0_15443");
        assert_eq!(l.listener_filters[0].name, "envoy.filters.listener.tls_inspector");
        let chain = &l.filter_chains[0];
        let sni = "outbound_.9080_._.reviews.shop.svc.cluster.local";
        assert_eq!(chain.filter_chain_match.as_ref().unwrap().server_names, [sni]);
        assert!(chain.transport_socket.is_none(), "TLS passes through");
        let Some(filter::ConfigType::TypedConfig(any)) = &chain.filters[0].config_type else { panic!() };
        let tp = TcpProxy::decode(any.value.as_slice()).unwrap();
        assert_eq!(tp.cluster_specifier, Some(tcp_proxy::ClusterSpecifier::Cluster(sni.into())));
    }

    #[test]
    fn ipv6_bind_address() {
        let r = registry(&[("shop", "reviews", &[("http", 9080, None)])]);
        let ls = listeners(&ctx(), &scope(ProxyKind::Sidecar, Some("::1")), &r);
        assert_eq!(wildcard_names(&ls), ["::1_9080"]);
        let Some(address::Address::SocketAddress(sa)) =
            ls[0].resource.address.as_ref().and_then(|a| a.address.as_ref())
        else {
            panic!("a socket address")
        };
        assert_eq!((sa.address.as_str(), sa.port_specifier.clone()), ("::1", Some(PortSpecifier::PortValue(9080))));
    }

    #[test]
    fn hcm_uses_rds_and_router_last() {
        let hcm = http_connection_manager("outbound_127.0.0.1_9080", "9080");
        let Some(RouteSpecifier::Rds(rds)) = &hcm.route_specifier else { panic!("expected RDS") };
        assert_eq!(rds.route_config_name, "9080");
        assert_eq!(hcm.http_filters.last().unwrap().name, "envoy.filters.http.router");
    }
}
