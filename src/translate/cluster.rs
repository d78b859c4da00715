//! CDS: one EDS cluster per service port (`outbound|PORT||FQDN` on sidecars, `outbound_.PORT_._.FQDN` on
//! east-west gateways) and one per port and subset of the DestinationRule the proxy sees
//! (`outbound|PORT|SUBSET|FQDN`, `outbound_.PORT_.SUBSET_.FQDN`), shaped by the traffic policy (the
//! subset's merged over the rule's) and Istio's mTLS; the inbound clusters of a sidecar's own workload;
//! and Istio's special clusters.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, OutlierDetection as PbOutlierDetection,
    circuit_breakers::Thresholds,
    cluster::{
        ClusterDiscoveryType, CommonLbConfig, DiscoveryType, EdsClusterConfig, LbPolicy,
        common_lb_config::{LocalityConfigSpecifier, LocalityWeightedLbConfig},
    },
};
use envoy_types::pb::envoy::config::core::v3::{Http2ProtocolOptions, Metadata};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, LocalityLbEndpoints};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions,
    http_protocol_options::{ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig},
};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{ListValue, Value, value::Kind};

use super::util::{ads_config_source, any, duration, string_value, struct_of, u32v};
use super::{
    BLACKHOLE_CLUSTER, ClusterScope, Context, InboundScope, Named, PASSTHROUGH_CLUSTER, inbound_cluster_name, sni_name,
};
use crate::model::{Protocol, Service, ServicePort};
use crate::policy::{ConsolidatedRule, EffectivePolicy, OutlierDetection, Subset};
use crate::proxy::{ProxyKind, TlsSupport};
use crate::registry::Registry;

/// Istio's default connect timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Istio's outlier detection translation: success-rate ejection off (enforcing_success_rate 0),
/// consecutive 5xx / gateway errors enforced at 100% when set, local-origin errors split when asked,
/// and healthy_panic_threshold = minHealthPercent (returned separately: it lives in common_lb_config).
pub fn outlier_detection(od: &OutlierDetection) -> (PbOutlierDetection, Percent) {
    let enforce = |v: u32| u32v(if v > 0 { 100 } else { 0 });
    let mut pb = PbOutlierDetection { enforcing_success_rate: Some(u32v(0)), ..Default::default() };
    if let Some(v) = od.consecutive_5xx_errors {
        pb.consecutive_5xx = Some(u32v(v));
        pb.enforcing_consecutive_5xx = Some(enforce(v));
    }
    if let Some(v) = od.consecutive_gateway_errors {
        pb.consecutive_gateway_failure = Some(u32v(v));
        pb.enforcing_consecutive_gateway_failure = Some(enforce(v));
    }
    pb.interval = od.interval.map(duration);
    pb.base_ejection_time = od.base_ejection_time.map(duration);
    pb.max_ejection_percent = od.max_ejection_percent.map(u32v);
    if od.split_external_local_origin_errors {
        pb.split_external_local_origin_errors = true;
        if let Some(v) = od.consecutive_local_origin_failures.filter(|v| *v > 0) {
            pb.consecutive_local_origin_failure = Some(u32v(v));
            pb.enforcing_consecutive_local_origin_failure = Some(u32v(100));
        }
        pb.enforcing_local_origin_success_rate = Some(u32v(0));
    }
    (pb, Percent { value: od.min_health_percent as f64 })
}

fn max_thresholds() -> CircuitBreakers {
    let max = Some(u32v(u32::MAX));
    CircuitBreakers {
        thresholds: vec![Thresholds {
            max_connections: max,
            max_pending_requests: max,
            max_requests: max,
            max_retries: max,
            track_remaining: true,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn http2_options() -> HashMap<String, envoy_types::pb::google::protobuf::Any> {
    let opts = HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default())),
        })),
        ..Default::default()
    };
    HashMap::from([("envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(), any(&opts))])
}

/// `metadata.filter_metadata.istio` as istiod writes it: the services (and the DestinationRule that
/// shaped the cluster, which istioctl reads from `config`, and the subset of a subset cluster).
fn istio_metadata(service: &Service, policy: &EffectivePolicy, subset: Option<&Subset>) -> Metadata {
    let svc = struct_of(&[
        ("host", string_value(&service.hostname)),
        ("name", string_value(&service.key.name)),
        ("namespace", string_value(&service.key.namespace)),
    ]);
    let services =
        Value { kind: Some(Kind::ListValue(ListValue { values: vec![Value { kind: Some(Kind::StructValue(svc)) }] })) };
    let mut fields = vec![("services", services)];
    if let Some((_, path)) = &policy.rule {
        fields.push(("config", string_value(path)));
    }
    if let Some(s) = subset {
        fields.push(("subset", string_value(&s.name)));
    }
    Metadata { filter_metadata: HashMap::from([("istio".to_string(), struct_of(&fields))]), ..Default::default() }
}

/// The SPIFFE identities of a service's workloads (what its mTLS peers must present).
pub fn service_identities(ctx: &Context, service: &Service) -> Vec<String> {
    let accounts: BTreeSet<(&str, &str)> = service
        .endpoints
        .iter()
        .filter_map(|e| e.workload.as_ref())
        .map(|w| (&*w.namespace, &*w.service_account))
        .collect();
    accounts.into_iter().map(|(ns, sa)| super::tls::spiffe_id(&ctx.trust_domain, ns, sa)).collect()
}

/// The outbound cluster of one service port, for proxies in `scope`.
pub fn outbound_cluster(ctx: &Context, scope: &ClusterScope, service: &Service, port: &ServicePort) -> Cluster {
    port_cluster(ctx, scope, service, port, ctx.rule_for(&scope.rules, service), None)
}

/// The cluster of one service port, or of one subset of it (of `rule`, the DestinationRule `scope` sees
/// for the service).
pub fn port_cluster(
    ctx: &Context,
    scope: &ClusterScope,
    service: &Service,
    port: &ServicePort,
    rule: Option<&ConsolidatedRule>,
    subset: Option<&Subset>,
) -> Cluster {
    let subset_name = subset.map_or("", |s| &*s.name);
    let name = super::cluster_name(scope.kind, port.port, subset_name, &service.hostname);
    let policy = ctx.policy_with(rule, port.port, subset);
    let mut cluster = Cluster {
        name: name.clone(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig { eds_config: Some(ads_config_source()), service_name: name }),
        connect_timeout: Some(duration(CONNECT_TIMEOUT)),
        lb_policy: LbPolicy::RoundRobin as i32,
        circuit_breakers: Some(max_thresholds()),
        metadata: Some(istio_metadata(service, &policy, subset)),
        ..Default::default()
    };
    if scope.kind == ProxyKind::Router {
        // An east-west gateway passes the client's mTLS through: bytes in, bytes out.
        return cluster;
    }
    if matches!(port.protocol, Protocol::Http2 | Protocol::Grpc) {
        cluster.typed_extension_protocol_options = http2_options();
    }
    let mut common = CommonLbConfig::default();
    let mut set_common = false;
    if let Some(od) = &policy.outlier_detection {
        let (pb, panic) = outlier_detection(od);
        cluster.outlier_detection = Some(pb);
        common.healthy_panic_threshold = Some(panic);
        set_common = true;
    }
    // a traffic split is a set of locality weights
    let split = ctx.traffic.services.contains_key(&service.hostname);
    if policy.distribute_active() || (policy.failover_active() && !policy.locality_lb.failover.is_empty()) || split {
        common.locality_config_specifier =
            Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(LocalityWeightedLbConfig {}));
        set_common = true;
    }
    if set_common {
        cluster.common_lb_config = Some(common);
    }
    if scope.tls != TlsSupport::None {
        cluster.transport_socket_matches = super::tls::outbound_socket_matches(
            scope.tls,
            &sni_name(port.port, subset_name, &service.hostname),
            &service_identities(ctx, service),
        );
    }
    cluster
}

/// The clusters of every port of a service: the port's, then one per subset of the DestinationRule the
/// proxies in `scope` see for it.
pub fn service_clusters<'a>(
    ctx: &'a Context,
    scope: &'a ClusterScope,
    service: &'a Service,
) -> impl Iterator<Item = Named<Cluster>> + 'a {
    let rule = ctx.rule_for(&scope.rules, service);
    let subsets = rule.map(|r| r.subsets.as_slice()).unwrap_or_default();
    service.ports.iter().flat_map(move |p| {
        std::iter::once(None).chain(subsets.iter().map(Some)).map(move |subset| {
            let c = port_cluster(ctx, scope, service, p, rule, subset);
            Named::new(c.name.clone(), c)
        })
    })
}

/// BlackHoleCluster (no endpoints) and PassthroughCluster (original destination), as Istio defines them.
pub fn special_clusters() -> Vec<Named<Cluster>> {
    let blackhole = Cluster {
        name: BLACKHOLE_CLUSTER.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(duration(CONNECT_TIMEOUT)),
        ..Default::default()
    };
    let passthrough = Cluster {
        name: PASSTHROUGH_CLUSTER.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::OriginalDst as i32)),
        connect_timeout: Some(duration(CONNECT_TIMEOUT)),
        lb_policy: LbPolicy::ClusterProvided as i32,
        circuit_breakers: Some(max_thresholds()),
        ..Default::default()
    };
    vec![Named::new(BLACKHOLE_CLUSTER, blackhole), Named::new(PASSTHROUGH_CLUSTER, passthrough)]
}

/// The ports on which the workload at `ip` serves some service: (endpoint port, protocol), sorted.
pub fn inbound_ports(registry: &Registry, ip: std::net::IpAddr) -> Vec<(u16, Protocol)> {
    let mut ports = std::collections::BTreeMap::new();
    for s in registry.services().values() {
        for ep in s.endpoints.iter().filter(|e| e.address == ip) {
            for sp in &s.ports {
                if let Some(p) = ep.port_for(&sp.name) {
                    ports.entry(p).or_insert(sp.protocol);
                }
            }
        }
    }
    ports.into_iter().collect()
}

/// `inbound|PORT||`: the local workload, where an inbound listener forwards what it decrypted.
pub fn inbound_cluster(port: u16, app: SocketAddr) -> Cluster {
    let name = inbound_cluster_name(port);
    Cluster {
        name: name.clone(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(duration(CONNECT_TIMEOUT)),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name,
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![super::endpoint::static_endpoint(app)],
                ..Default::default()
            }],
            ..Default::default()
        }),
        circuit_breakers: Some(max_thresholds()),
        ..Default::default()
    }
}

/// Every outbound (and special) cluster for proxies in `scope`.
pub fn clusters(ctx: &Context, scope: &ClusterScope, registry: &Registry) -> Vec<Named<Cluster>> {
    let mut out = special_clusters();
    for service in registry.services().values() {
        out.extend(service_clusters(ctx, scope, service));
    }
    out
}

/// The inbound clusters of the workload at `scope.ip`: one per port it serves.
pub fn inbound_clusters(scope: &InboundScope, registry: &Registry) -> Vec<Named<Cluster>> {
    inbound_ports(registry, scope.ip)
        .into_iter()
        .map(|(port, _)| {
            let c = inbound_cluster(port, SocketAddr::new(scope.app, port));
            Named::new(c.name.clone(), c)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{ClusterId, ServiceKey};

    fn svc(ports: &[(&str, u16, Protocol)]) -> Service {
        let key = ServiceKey::new("shop", "ratings");
        Service {
            hostname: key.fqdn("cluster.local").into(),
            key,
            ports: ports
                .iter()
                .map(|(n, p, proto)| ServicePort { name: Arc::from(*n), port: *p, protocol: *proto })
                .collect(),
            clusters: vec![ClusterId::new("a")],
            endpoints: vec![],
        }
    }

    fn ctx() -> Context {
        Context::default()
    }

    fn sidecar(tls: TlsSupport) -> ClusterScope {
        ClusterScope { kind: ProxyKind::Sidecar, tls, rules: Default::default() }
    }

    #[test]
    fn one_eds_cluster_per_port_with_istio_names() {
        let s = svc(&[("http", 9080, Protocol::Http), ("grpc", 9091, Protocol::Grpc)]);
        let sc = sidecar(TlsSupport::None);
        let cs: Vec<_> = service_clusters(&ctx(), &sc, &s).collect();
        let names: Vec<_> = cs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["outbound|9080||ratings.shop.svc.cluster.local", "outbound|9091||ratings.shop.svc.cluster.local"]
        );
        let c = &cs[0].resource;
        assert_eq!(c.cluster_discovery_type, Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)));
        assert_eq!(c.eds_cluster_config.as_ref().unwrap().service_name, c.name);
        assert!(c.typed_extension_protocol_options.is_empty(), "HTTP/1 port uses HTTP/1 upstream");
        assert!(
            cs[1]
                .resource
                .typed_extension_protocol_options
                .contains_key("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
        );
        assert!(c.outlier_detection.is_none());
        assert!(c.transport_socket_matches.is_empty(), "no mesh certificates: plaintext");
    }

    #[test]
    fn every_outlier_field_as_istio_translates_it() {
        let mut ctx = ctx();
        ctx.defaults.outlier_detection = Some(OutlierDetection {
            consecutive_5xx_errors: Some(3),
            consecutive_gateway_errors: Some(2),
            consecutive_local_origin_failures: Some(4),
            split_external_local_origin_errors: true,
            interval: Some(Duration::from_secs(1)),
            base_ejection_time: Some(Duration::from_secs(15)),
            max_ejection_percent: Some(100),
            min_health_percent: 25,
        });
        let s = svc(&[("http", 9080, Protocol::Http)]);
        let c = outbound_cluster(&ctx, &sidecar(TlsSupport::None), &s, &s.ports[0]);
        let od = c.outlier_detection.unwrap();
        assert_eq!(od.consecutive_5xx.unwrap().value, 3);
        assert_eq!(od.enforcing_consecutive_5xx.unwrap().value, 100);
        assert_eq!(od.consecutive_gateway_failure.unwrap().value, 2);
        assert_eq!(od.enforcing_consecutive_gateway_failure.unwrap().value, 100);
        assert!(od.split_external_local_origin_errors);
        assert_eq!(od.consecutive_local_origin_failure.unwrap().value, 4);
        assert_eq!(od.enforcing_consecutive_local_origin_failure.unwrap().value, 100);
        assert_eq!(od.enforcing_local_origin_success_rate.unwrap().value, 0);
        assert_eq!(od.enforcing_success_rate.unwrap().value, 0);
        assert_eq!(od.interval.unwrap().seconds, 1);
        assert_eq!(od.base_ejection_time.unwrap().seconds, 15);
        assert_eq!(od.max_ejection_percent.unwrap().value, 100);
        assert_eq!(c.common_lb_config.unwrap().healthy_panic_threshold.unwrap().value, 25.0);
    }

    #[test]
    fn unset_outlier_fields_keep_envoy_defaults() {
        let mut ctx = ctx();
        ctx.defaults.outlier_detection = Some(OutlierDetection::default());
        let s = svc(&[("http", 9080, Protocol::Http)]);
        let c = outbound_cluster(&ctx, &sidecar(TlsSupport::None), &s, &s.ports[0]);
        let od = c.outlier_detection.unwrap();
        assert!(od.consecutive_5xx.is_none() && od.interval.is_none() && od.max_ejection_percent.is_none());
        assert_eq!(c.common_lb_config.unwrap().healthy_panic_threshold.unwrap().value, 0.0);
    }

    #[test]
    fn shaping_rule_is_named_and_locality_weighting_enabled() {
        let mut ctx = ctx();
        let rule = crate::policy::DestinationRule::from_yaml(
            "metadata: {name: ratings, namespace: shop}\nspec:\n  host: ratings\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n        distribute: [{from: \"a/*\", to: {\"a/*\": 100}}]\n",
        )
        .unwrap();
        ctx.set_rules(std::sync::Arc::new(vec![std::sync::Arc::new(rule)]));
        let s = svc(&[("http", 9080, Protocol::Http)]);
        let c = outbound_cluster(&ctx, &sidecar(TlsSupport::None), &s, &s.ports[0]);
        let istio = &c.metadata.unwrap().filter_metadata["istio"];
        let Some(Kind::StringValue(config)) = &istio.fields["config"].kind else { panic!("config is a string") };
        assert_eq!(config, "/apis/networking.istio.io/v1/namespaces/shop/destination-rule/ratings");
        assert!(matches!(
            c.common_lb_config.unwrap().locality_config_specifier,
            Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
        ));
    }

    #[test]
    fn mesh_mtls_uses_istio_sni_alpn_and_sds_names() {
        use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
        use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
        use prost::Message;
        for tls in [TlsSupport::Static, TlsSupport::Agent] {
            let s = svc(&[("http", 9080, Protocol::Http)]);
            let c = outbound_cluster(&ctx(), &sidecar(tls), &s, &s.ports[0]);
            assert_eq!(c.transport_socket_matches.len(), 2);
            let m = &c.transport_socket_matches[0];
            assert_eq!(m.r#match.as_ref().unwrap().fields.len(), 1, "matches tlsMode: istio");
            let Some(ConfigType::TypedConfig(any)) = &m.transport_socket.as_ref().unwrap().config_type else {
                panic!()
            };
            let up = UpstreamTlsContext::decode(&any.value[..]).unwrap();
            assert_eq!(up.sni, "outbound_.9080_._.ratings.shop.svc.cluster.local");
            let common = up.common_tls_context.unwrap();
            assert_eq!(common.alpn_protocols, ["istio-peer-exchange", "istio"]);
            assert_eq!(common.tls_certificate_sds_secret_configs[0].name, "default");
            assert_eq!(common.tls_certificate_sds_secret_configs[0].sds_config.is_some(), tls == TlsSupport::Agent);
        }
    }

    #[test]
    fn gateway_clusters_are_sni_named_and_pass_tls_through() {
        let s = svc(&[("http", 9080, Protocol::Http)]);
        let sc = ClusterScope { kind: ProxyKind::Router, tls: TlsSupport::None, rules: Default::default() };
        let c = outbound_cluster(&ctx(), &sc, &s, &s.ports[0]);
        assert_eq!(c.name, "outbound_.9080_._.ratings.shop.svc.cluster.local");
        assert!(c.transport_socket_matches.is_empty() && c.transport_socket.is_none());
    }

    #[test]
    fn special_clusters_present() {
        let names: Vec<_> = special_clusters().into_iter().map(|c| c.name).collect();
        assert_eq!(names, [BLACKHOLE_CLUSTER, PASSTHROUGH_CLUSTER]);
    }
}
