//! CDS: one EDS cluster per service port (`outbound|PORT||FQDN`), plus Istio's special clusters.

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, OutlierDetection as PbOutlierDetection,
    circuit_breakers::Thresholds,
    cluster::{ClusterDiscoveryType, CommonLbConfig, DiscoveryType, EdsClusterConfig, LbPolicy},
};
use envoy_types::pb::envoy::config::core::v3::{Http2ProtocolOptions, Metadata};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions,
    http_protocol_options::{ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig},
};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{ListValue, Value, value::Kind};

use super::util::{ads_config_source, any, duration, string_value, struct_of, u32v};
use super::{BLACKHOLE_CLUSTER, ClusterScope, Context, Named, PASSTHROUGH_CLUSTER, outbound_cluster_name};
use crate::mesh_config::OutlierDetection;
use crate::model::{Protocol, Service, ServicePort};
use crate::registry::Registry;

/// Istio's default connect timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Istio's outlier detection translation: enforcing_success_rate 0 (success-rate ejection off),
/// gateway failures counted but not enforced, healthy_panic_threshold = minHealthPercent.
pub fn outlier_detection(od: &OutlierDetection) -> (PbOutlierDetection, Percent) {
    let pb = PbOutlierDetection {
        consecutive_5xx: Some(u32v(od.consecutive_5xx_errors)),
        enforcing_consecutive_5xx: Some(u32v(if od.consecutive_5xx_errors > 0 { 100 } else { 0 })),
        interval: Some(duration(od.interval.unwrap_or(Duration::from_secs(10)))),
        base_ejection_time: Some(duration(od.base_ejection_time.unwrap_or(Duration::from_secs(30)))),
        max_ejection_percent: Some(u32v(od.max_ejection_percent)),
        enforcing_success_rate: Some(u32v(0)),
        enforcing_consecutive_gateway_failure: Some(u32v(0)),
        ..Default::default()
    };
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

/// `metadata.filter_metadata.istio.services` as istiod writes it (istioctl reads it).
fn service_metadata(service: &Service) -> Metadata {
    let svc = struct_of(&[
        ("host", string_value(&service.hostname)),
        ("name", string_value(&service.key.name)),
        ("namespace", string_value(&service.key.namespace)),
    ]);
    let services =
        Value { kind: Some(Kind::ListValue(ListValue { values: vec![Value { kind: Some(Kind::StructValue(svc)) }] })) };
    Metadata {
        filter_metadata: HashMap::from([("istio".to_string(), struct_of(&[("services", services)]))]),
        ..Default::default()
    }
}

/// The outbound cluster of one service port.
pub fn outbound_cluster(ctx: &Context, service: &Service, port: &ServicePort) -> Cluster {
    let name = outbound_cluster_name(port.port, "", &service.hostname);
    let mut cluster = Cluster {
        name: name.clone(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig { eds_config: Some(ads_config_source()), service_name: name }),
        connect_timeout: Some(duration(CONNECT_TIMEOUT)),
        lb_policy: LbPolicy::RoundRobin as i32,
        circuit_breakers: Some(max_thresholds()),
        metadata: Some(service_metadata(service)),
        ..Default::default()
    };
    if matches!(port.protocol, Protocol::Http2 | Protocol::Grpc) {
        cluster.typed_extension_protocol_options = http2_options();
    }
    if let Some(od) = &ctx.default_outlier_detection {
        let (pb, panic) = outlier_detection(od);
        cluster.outlier_detection = Some(pb);
        cluster.common_lb_config = Some(CommonLbConfig { healthy_panic_threshold: Some(panic), ..Default::default() });
    }
    cluster
}

/// The clusters of every port of a service.
pub fn service_clusters(ctx: &Context, service: &Service) -> impl Iterator<Item = Named<Cluster>> {
    service.ports.iter().map(move |p| {
        let c = outbound_cluster(ctx, service, p);
        Named::new(c.name.clone(), c)
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

/// Every cluster for proxies in `scope`.
pub fn clusters(ctx: &Context, _scope: &ClusterScope, registry: &Registry) -> Vec<Named<Cluster>> {
    let mut out = special_clusters();
    for service in registry.services().values() {
        out.extend(service_clusters(ctx, service));
    }
    out
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
        Context {
            domain_suffix: "cluster.local".into(),
            send_unhealthy_endpoints: false,
            default_outlier_detection: None,
        }
    }

    #[test]
    fn one_eds_cluster_per_port_with_istio_names() {
        let s = svc(&[("http", 9080, Protocol::Http), ("grpc", 9091, Protocol::Grpc)]);
        let cs: Vec<_> = service_clusters(&ctx(), &s).collect();
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
    }

    #[test]
    fn outlier_detection_as_istio_translates_it() {
        let mut ctx = ctx();
        ctx.default_outlier_detection = Some(OutlierDetection {
            consecutive_5xx_errors: 3,
            interval: Some(Duration::from_secs(1)),
            base_ejection_time: Some(Duration::from_secs(15)),
            max_ejection_percent: 100,
            min_health_percent: 0,
        });
        let s = svc(&[("http", 9080, Protocol::Http)]);
        let c = outbound_cluster(&ctx, &s, &s.ports[0]);
        let od = c.outlier_detection.unwrap();
        assert_eq!(od.consecutive_5xx.unwrap().value, 3);
        assert_eq!(od.enforcing_success_rate.unwrap().value, 0);
        assert_eq!(od.interval.unwrap().seconds, 1);
        assert_eq!(od.base_ejection_time.unwrap().seconds, 15);
        assert_eq!(od.max_ejection_percent.unwrap().value, 100);
        assert_eq!(c.common_lb_config.unwrap().healthy_panic_threshold.unwrap().value, 0.0);
    }

    #[test]
    fn special_clusters_present() {
        let names: Vec<_> = special_clusters().into_iter().map(|c| c.name).collect();
        assert_eq!(names, [BLACKHOLE_CLUSTER, PASSTHROUGH_CLUSTER]);
    }
}
