//! RDS: per outbound HTTP port, a route configuration named after the port (`"9080"`) with one virtual
//! host per service on that port; and for proxyless gRPC, one route configuration per service port
//! named `FQDN:PORT`.

use std::collections::BTreeMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3::{
    RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
    retry_policy::{RetryHostPredicate, retry_host_predicate},
    route::Action,
    route_action::ClusterSpecifier,
    route_match::PathSpecifier,
};
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;

use super::util::{any, boolv, duration, u32v};
use super::{Context, Named, RouteScope, outbound_cluster_name};
use crate::model::{Service, ServicePort};
use crate::registry::Registry;

/// The name gRPC clients and api_listeners use for a service port: `FQDN:PORT`.
pub fn api_name(service: &Service, port: u16) -> String {
    format!("{}:{}", service.hostname, port)
}

/// Istio's default retry policy for sidecars.
fn default_retry_policy() -> RetryPolicy {
    RetryPolicy {
        retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes".into(),
        num_retries: Some(u32v(2)),
        retry_host_predicate: vec![RetryHostPredicate {
            name: "envoy.retry_host_predicates.previous_hosts".into(),
            config_type: Some(retry_host_predicate::ConfigType::TypedConfig(any(&PreviousHostsPredicate {}))),
        }],
        host_selection_retry_max_attempts: 5,
        retriable_status_codes: vec![503],
        ..Default::default()
    }
}

fn route_to(cluster: String, retries: bool) -> Route {
    Route {
        name: "default".into(),
        r#match: Some(RouteMatch { path_specifier: Some(PathSpecifier::Prefix("/".into())), ..Default::default() }),
        action: Some(Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(cluster)),
            // Istio disables the route timeout by default.
            timeout: retries.then(|| duration(Duration::ZERO)),
            retry_policy: retries.then(default_retry_policy),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The domains a service answers to from a proxy in `namespace`, as istiod generates them.
pub fn domains(service: &Service, port: u16, namespace: &str) -> Vec<String> {
    let name = &*service.key.name;
    let ns = &*service.key.namespace;
    let mut hosts = vec![service.hostname.to_string(), format!("{name}.{ns}.svc"), format!("{name}.{ns}")];
    if ns == namespace {
        hosts.push(name.to_string());
    }
    let mut out = Vec::with_capacity(hosts.len() * 2);
    for h in hosts {
        out.push(format!("{h}:{port}"));
        out.push(h);
    }
    out
}

/// The route configuration for outbound HTTP port `port` (named after the port).
pub fn port_route(port: u16, services: &[(&Service, &ServicePort)], namespace: &str) -> RouteConfiguration {
    let virtual_hosts = services
        .iter()
        .map(|(s, p)| VirtualHost {
            name: api_name(s, p.port),
            domains: domains(s, p.port, namespace),
            routes: vec![route_to(outbound_cluster_name(p.port, "", &s.hostname), true)],
            ..Default::default()
        })
        .collect();
    RouteConfiguration {
        name: port.to_string(),
        virtual_hosts,
        validate_clusters: Some(boolv(false)),
        ..Default::default()
    }
}

/// The route configuration a proxyless gRPC client gets for `FQDN:PORT`.
pub fn api_route(service: &Service, port: &ServicePort) -> RouteConfiguration {
    let name = api_name(service, port.port);
    RouteConfiguration {
        name: name.clone(),
        virtual_hosts: vec![VirtualHost {
            name: name.clone(),
            domains: vec![service.hostname.to_string(), name],
            routes: vec![route_to(outbound_cluster_name(port.port, "", &service.hostname), false)],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// HTTP ports and the services on them, by port.
pub fn http_ports(registry: &Registry) -> BTreeMap<u16, Vec<(&Service, &ServicePort)>> {
    let mut by_port: BTreeMap<u16, Vec<(&Service, &ServicePort)>> = BTreeMap::new();
    for s in registry.services().values() {
        for p in s.ports.iter().filter(|p| p.protocol.is_http()) {
            by_port.entry(p.port).or_default().push((s, p));
        }
    }
    by_port
}

/// Every route configuration for proxies in `scope`.
pub fn routes(_ctx: &Context, scope: &RouteScope, registry: &Registry) -> Vec<Named<RouteConfiguration>> {
    let mut out: Vec<Named<RouteConfiguration>> = http_ports(registry)
        .into_iter()
        .map(|(port, services)| Named::new(port.to_string(), port_route(port, &services, &scope.namespace)))
        .collect();
    for s in registry.services().values() {
        for p in &s.ports {
            let r = api_route(s, p);
            out.push(Named { name: r.name.clone(), resource: r, wildcard: false });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{ClusterId, Protocol, ServiceKey};

    fn svc(ns: &str, name: &str) -> Service {
        let key = ServiceKey::new(ns, name);
        Service {
            hostname: key.fqdn("cluster.local").into(),
            key,
            ports: vec![ServicePort { name: Arc::from("http"), port: 9080, protocol: Protocol::Http }],
            clusters: vec![ClusterId::new("a")],
            endpoints: vec![],
        }
    }

    #[test]
    fn short_names_only_in_the_same_namespace() {
        let s = svc("shop", "reviews");
        let same = domains(&s, 9080, "shop");
        assert!(same.contains(&"reviews".to_string()));
        assert!(same.contains(&"reviews:9080".to_string()));
        assert!(same.contains(&"reviews.shop".to_string()));
        assert!(same.contains(&"reviews.shop.svc.cluster.local:9080".to_string()));
        let other = domains(&s, 9080, "default");
        assert!(!other.contains(&"reviews".to_string()));
        assert!(other.contains(&"reviews.shop:9080".to_string()));
    }

    #[test]
    fn port_route_has_a_virtual_host_per_service_and_unique_domains() {
        let a = svc("shop", "reviews");
        let b = svc("shop", "ratings");
        let c = svc("other", "reviews");
        let r = port_route(9080, &[(&a, &a.ports[0]), (&b, &b.ports[0]), (&c, &c.ports[0])], "shop");
        assert_eq!(r.name, "9080");
        assert_eq!(r.virtual_hosts.len(), 3);
        let mut all: Vec<&String> = r.virtual_hosts.iter().flat_map(|v| &v.domains).collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "Envoy rejects duplicate domains");
        let Some(Action::Route(ra)) = &r.virtual_hosts[0].routes[0].action else { panic!() };
        assert_eq!(
            ra.cluster_specifier,
            Some(ClusterSpecifier::Cluster("outbound|9080||reviews.shop.svc.cluster.local".into()))
        );
    }

    #[test]
    fn api_route_named_fqdn_port() {
        let s = svc("shop", "ratings");
        let r = api_route(&s, &s.ports[0]);
        assert_eq!(r.name, "ratings.shop.svc.cluster.local:9080");
        assert_eq!(
            r.virtual_hosts[0].domains,
            ["ratings.shop.svc.cluster.local", "ratings.shop.svc.cluster.local:9080"]
        );
    }
}
