//! EDS: one ClusterLoadAssignment per outbound cluster, endpoints grouped by locality, with locality
//! weights and failover priorities relative to the proxy's locality, as istiod assigns them.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{
    Address, HealthStatus, Locality as PbLocality, Metadata, SocketAddress, address, socket_address::PortSpecifier,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as PbEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
};

use super::util::{string_value, struct_of, u32v};
use super::{Context, EndpointScope, Named, outbound_cluster_name};
use crate::model::{Endpoint, Health, Locality, Service, ServicePort, TlsMode};

/// Istio's priority of endpoints in `endpoint` locality for a proxy in `proxy`:
/// 0 same region/zone/subzone, 1 same region/zone, 2 same region, 3 other region.
pub fn lb_priority(proxy: &Locality, endpoint: &Locality) -> u32 {
    if proxy.region == endpoint.region {
        if proxy.zone == endpoint.zone {
            if proxy.subzone == endpoint.subzone {
                return 0;
            }
            return 1;
        }
        return 2;
    }
    3
}

/// Renumbers priorities so that they are contiguous from 0, keeping their order (Envoy requires it).
pub fn compact_priorities(priorities: &mut [u32]) {
    let mut distinct: Vec<u32> = priorities.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    for p in priorities.iter_mut() {
        *p = distinct.binary_search(p).unwrap_or(0) as u32;
    }
}

fn health_status(h: Health) -> HealthStatus {
    match h {
        Health::Healthy => HealthStatus::Healthy,
        Health::Unhealthy => HealthStatus::Unhealthy,
        Health::Draining => HealthStatus::Draining,
    }
}

fn socket_address(ip: std::net::IpAddr, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(port as u32)),
            ..Default::default()
        })),
    }
}

/// `istio.workload` metadata: `name;namespace;canonical-service;canonical-revision;cluster`.
fn endpoint_metadata(ep: &Endpoint) -> Option<Metadata> {
    let mut filter_metadata = std::collections::HashMap::new();
    if let Some(w) = &ep.workload {
        let canonical = w
            .labels
            .get("service.istio.io/canonical-name")
            .or_else(|| w.labels.get("app.kubernetes.io/name"))
            .or_else(|| w.labels.get("app"))
            .map(String::as_str)
            .unwrap_or(&w.name);
        let revision = w
            .labels
            .get("service.istio.io/canonical-revision")
            .or_else(|| w.labels.get("app.kubernetes.io/version"))
            .or_else(|| w.labels.get("version"))
            .map(String::as_str)
            .unwrap_or("latest");
        let workload = format!("{};{};{};{};{}", w.name, w.namespace, canonical, revision, ep.cluster);
        filter_metadata.insert("istio".to_string(), struct_of(&[("workload", string_value(&workload))]));
    }
    if ep.tls_mode() == TlsMode::Istio {
        filter_metadata
            .insert("envoy.transport_socket_match".to_string(), struct_of(&[("tlsMode", string_value("istio"))]));
    }
    (!filter_metadata.is_empty()).then(|| Metadata { filter_metadata, ..Default::default() })
}

/// Whether failover priorities apply to this service (istiod: only with outlier detection).
fn failover_enabled(ctx: &Context, _service: &Service) -> bool {
    ctx.default_outlier_detection.is_some()
}

/// The ClusterLoadAssignment of one service port, for proxies in `scope`.
pub fn load_assignment(
    ctx: &Context,
    scope: &EndpointScope,
    service: &Service,
    port: &ServicePort,
) -> ClusterLoadAssignment {
    let cluster_name = outbound_cluster_name(port.port, "", &service.hostname);
    // Group by locality, in a deterministic order.
    let mut by_locality: BTreeMap<&Locality, Vec<LbEndpoint>> = BTreeMap::new();
    for ep in &service.endpoints {
        if ep.health != Health::Healthy && !ctx.send_unhealthy_endpoints {
            continue;
        }
        let Some(target_port) = ep.port_for(&port.name) else { continue };
        by_locality.entry(&ep.locality).or_default().push(LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(PbEndpoint {
                address: Some(socket_address(ep.address, target_port)),
                ..Default::default()
            })),
            health_status: health_status(ep.health) as i32,
            metadata: endpoint_metadata(ep),
            load_balancing_weight: Some(u32v(1)),
        });
    }
    let use_priorities = !scope.locality.is_empty() && failover_enabled(ctx, service);
    let mut priorities: Vec<u32> =
        by_locality.keys().map(|loc| if use_priorities { lb_priority(&scope.locality, loc) } else { 0 }).collect();
    compact_priorities(&mut priorities);
    let endpoints = by_locality
        .into_iter()
        .zip(priorities)
        .map(|((loc, lb_endpoints), priority)| LocalityLbEndpoints {
            locality: Some(PbLocality {
                region: loc.region.to_string(),
                zone: loc.zone.to_string(),
                sub_zone: loc.subzone.to_string(),
            }),
            // Always set: gRPC ignores localities without a weight.
            load_balancing_weight: Some(u32v(lb_endpoints.len() as u32)),
            lb_endpoints,
            priority,
            ..Default::default()
        })
        .collect();
    ClusterLoadAssignment { cluster_name, endpoints, ..Default::default() }
}

/// The ClusterLoadAssignments of every port of a service.
pub fn service_load_assignments(
    ctx: &Context,
    scope: &EndpointScope,
    service: &Service,
) -> Vec<Named<ClusterLoadAssignment>> {
    service
        .ports
        .iter()
        .map(|p| {
            let cla = load_assignment(ctx, scope, service, p);
            Named::new(cla.cluster_name.clone(), cla)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{ClusterId, NetworkId, Protocol, ServiceKey};
    use crate::proxy::ProxyKind;

    fn loc(s: &str) -> Locality {
        Locality::parse(s)
    }

    #[test]
    fn priority_table_matches_istiod() {
        let proxy = loc("us-east-1/us-east-1a/rack1");
        assert_eq!(lb_priority(&proxy, &loc("us-east-1/us-east-1a/rack1")), 0);
        assert_eq!(lb_priority(&proxy, &loc("us-east-1/us-east-1a/rack2")), 1);
        assert_eq!(lb_priority(&proxy, &loc("us-east-1/us-east-1a")), 1);
        assert_eq!(lb_priority(&proxy, &loc("us-east-1/us-east-1b/rack1")), 2);
        assert_eq!(lb_priority(&proxy, &loc("westeurope/westeurope-1")), 3);
        assert_eq!(lb_priority(&proxy, &Locality::default()), 3);
        // an empty proxy subzone matches only an empty endpoint subzone
        assert_eq!(lb_priority(&loc("r/z"), &loc("r/z")), 0);
        assert_eq!(lb_priority(&loc("r/z"), &loc("r/z/s")), 1);
    }

    #[test]
    fn compaction_keeps_order_and_closes_gaps() {
        let mut p = vec![3, 0, 3, 2];
        compact_priorities(&mut p);
        assert_eq!(p, vec![2, 0, 2, 1]);
        let mut p = vec![1, 3];
        compact_priorities(&mut p);
        assert_eq!(p, vec![0, 1]);
        let mut p: Vec<u32> = vec![];
        compact_priorities(&mut p);
        assert!(p.is_empty());
    }

    fn ep(addr: &str, cluster: &str, locality: &str, health: Health) -> Endpoint {
        Endpoint {
            address: addr.parse().unwrap(),
            ports: vec![(Arc::from("http"), 9080)],
            cluster: ClusterId::new(cluster),
            network: NetworkId::new("n"),
            locality: loc(locality),
            health,
            workload: None,
        }
    }

    fn service(endpoints: Vec<Endpoint>) -> Service {
        let key = ServiceKey::new("shop", "reviews");
        Service {
            hostname: key.fqdn("cluster.local").into(),
            key,
            ports: vec![ServicePort { name: "http".into(), port: 9080, protocol: Protocol::Http }],
            clusters: vec![ClusterId::new("a"), ClusterId::new("b")],
            endpoints,
        }
    }

    fn ctx(outlier: bool) -> Context {
        Context {
            domain_suffix: "cluster.local".into(),
            send_unhealthy_endpoints: false,
            default_outlier_detection: outlier.then_some(crate::mesh_config::OutlierDetection {
                consecutive_5xx_errors: 5,
                interval: None,
                base_ejection_time: None,
                max_ejection_percent: 10,
                min_health_percent: 0,
            }),
        }
    }

    fn scope(locality: &str) -> EndpointScope {
        EndpointScope { kind: ProxyKind::Sidecar, network: NetworkId::new("n"), locality: loc(locality) }
    }

    fn summary(cla: &ClusterLoadAssignment) -> Vec<(String, u32, u32, usize)> {
        cla.endpoints
            .iter()
            .map(|l| {
                let z = l.locality.as_ref().unwrap();
                (
                    format!("{}/{}", z.region, z.zone),
                    l.priority,
                    l.load_balancing_weight.unwrap().value,
                    l.lb_endpoints.len(),
                )
            })
            .collect()
    }

    #[test]
    fn groups_by_locality_with_weights_and_priorities() {
        let s = service(vec![
            ep("127.0.1.21", "a", "us-east-1/us-east-1a", Health::Healthy),
            ep("127.0.1.22", "a", "us-east-1/us-east-1a", Health::Healthy),
            ep("127.0.2.21", "a", "us-east-1/us-east-1b", Health::Healthy),
            ep("127.0.3.21", "b", "westeurope/westeurope-1", Health::Healthy),
            ep("127.0.3.22", "b", "westeurope/westeurope-1", Health::Healthy),
            ep("127.0.3.23", "b", "westeurope/westeurope-1", Health::Healthy),
        ]);
        let cla = load_assignment(&ctx(true), &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        assert_eq!(cla.cluster_name, "outbound|9080||reviews.shop.svc.cluster.local");
        assert_eq!(
            summary(&cla),
            vec![
                ("us-east-1/us-east-1a".into(), 0, 2, 2),
                ("us-east-1/us-east-1b".into(), 1, 1, 1),
                ("westeurope/westeurope-1".into(), 2, 3, 3),
            ]
        );
        // From Azure: its own zone first, then (no same-region other zone) AWS.
        let cla = load_assignment(&ctx(true), &scope("westeurope/westeurope-1"), &s, &s.ports[0]);
        assert_eq!(
            summary(&cla).iter().map(|x| (x.0.clone(), x.1)).collect::<Vec<_>>(),
            vec![
                ("us-east-1/us-east-1a".into(), 1),
                ("us-east-1/us-east-1b".into(), 1),
                ("westeurope/westeurope-1".into(), 0)
            ]
        );
    }

    #[test]
    fn no_priorities_without_outlier_detection_or_proxy_locality() {
        let s = service(vec![
            ep("127.0.1.21", "a", "us-east-1/us-east-1a", Health::Healthy),
            ep("127.0.3.21", "b", "westeurope/westeurope-1", Health::Healthy),
        ]);
        let cla = load_assignment(&ctx(false), &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        assert!(cla.endpoints.iter().all(|l| l.priority == 0));
        let cla = load_assignment(&ctx(true), &scope(""), &s, &s.ports[0]);
        assert!(cla.endpoints.iter().all(|l| l.priority == 0));
    }

    #[test]
    fn health_mapping_and_filtering() {
        let s = service(vec![
            ep("127.0.1.1", "a", "r/z", Health::Healthy),
            ep("127.0.1.2", "a", "r/z", Health::Unhealthy),
            ep("127.0.1.3", "a", "r/z", Health::Draining),
        ]);
        let cla = load_assignment(&ctx(false), &scope("r/z"), &s, &s.ports[0]);
        assert_eq!(cla.endpoints[0].lb_endpoints.len(), 1, "istiod's default sends only healthy endpoints");
        let mut c = ctx(false);
        c.send_unhealthy_endpoints = true;
        let cla = load_assignment(&c, &scope("r/z"), &s, &s.ports[0]);
        let statuses: Vec<i32> = cla.endpoints[0].lb_endpoints.iter().map(|e| e.health_status).collect();
        assert_eq!(
            statuses,
            vec![HealthStatus::Healthy as i32, HealthStatus::Unhealthy as i32, HealthStatus::Draining as i32]
        );
        assert_eq!(Health::from_conditions(None, None, None), Health::Healthy);
        assert_eq!(Health::from_conditions(Some(true), Some(true), Some(false)), Health::Healthy);
        assert_eq!(Health::from_conditions(Some(false), Some(false), Some(false)), Health::Unhealthy);
        assert_eq!(Health::from_conditions(Some(false), Some(true), Some(true)), Health::Draining);
        assert_eq!(Health::from_conditions(Some(false), None, None), Health::Unhealthy);
    }

    #[test]
    fn removed_endpoints_disappear_and_empty_service_keeps_its_assignment() {
        let s = service(vec![ep("127.0.1.1", "a", "r/z", Health::Healthy)]);
        let cla = load_assignment(&ctx(true), &scope("r/z"), &s, &s.ports[0]);
        assert_eq!(cla.endpoints.len(), 1);
        let s = service(vec![]);
        let cla = load_assignment(&ctx(true), &scope("r/z"), &s, &s.ports[0]);
        assert_eq!(cla.cluster_name, "outbound|9080||reviews.shop.svc.cluster.local");
        assert!(cla.endpoints.is_empty());
    }

    #[test]
    fn endpoints_without_the_port_are_skipped() {
        let mut e = ep("127.0.1.1", "a", "r/z", Health::Healthy);
        e.ports = vec![(Arc::from("grpc"), 9091)];
        let s = service(vec![e]);
        let cla = load_assignment(&ctx(true), &scope("r/z"), &s, &s.ports[0]);
        assert!(cla.endpoints.is_empty());
    }
}
