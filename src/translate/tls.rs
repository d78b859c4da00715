//! Istio's mTLS shapes: upstream TLS to `tlsMode: istio` endpoints (SNI `outbound_.PORT_._.FQDN`, ALPN
//! `istio-peer-exchange`/`istio`, SPIFFE SAN verification) and downstream TLS on inbound listeners,
//! with certificates by the SDS names Istio's agent serves: `default` and `ROOTCA`.

use envoy_types::pb::envoy::config::cluster::v3::cluster::TransportSocketMatch;
use envoy_types::pb::envoy::config::core::v3::{
    ApiConfigSource, ApiVersion, ConfigSource, GrpcService, TransportSocket, api_config_source::ApiType,
    config_source::ConfigSourceSpecifier, grpc_service::EnvoyGrpc, grpc_service::TargetSpecifier,
    transport_socket::ConfigType,
};
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, SubjectAltNameMatcher,
    UpstreamTlsContext, common_tls_context::CombinedCertificateValidationContext,
    common_tls_context::ValidationContextType, subject_alt_name_matcher::SanType,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};

use super::util::{any, boolv, string_value, struct_of};
use crate::proxy::TlsSupport;

/// The certificate secret name Istio's agent serves.
pub const CERT_SECRET: &str = "default";
/// The root CA secret name Istio's agent serves.
pub const ROOT_SECRET: &str = "ROOTCA";
pub use crate::tls::{INBOUND_MTLS_ALPN, ISTIO_ALPN, ISTIO_HTTP_ALPN};
/// The cluster of Istio agent's SDS server in an Istio sidecar's bootstrap.
pub const SDS_CLUSTER: &str = "sds-grpc";

fn sds(name: &str, tls: TlsSupport) -> SdsSecretConfig {
    let sds_config = (tls == TlsSupport::Agent).then(|| ConfigSource {
        config_source_specifier: Some(ConfigSourceSpecifier::ApiConfigSource(ApiConfigSource {
            api_type: ApiType::Grpc as i32,
            transport_api_version: ApiVersion::V3 as i32,
            set_node_on_first_message_only: true,
            grpc_services: vec![GrpcService {
                target_specifier: Some(TargetSpecifier::EnvoyGrpc(EnvoyGrpc {
                    cluster_name: SDS_CLUSTER.into(),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        })),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    });
    SdsSecretConfig { name: name.into(), sds_config }
}

fn common(tls: TlsSupport, alpn: &[&str], sans: &[String]) -> CommonTlsContext {
    let san_matchers = sans
        .iter()
        .map(|san| SubjectAltNameMatcher {
            san_type: SanType::Uri as i32,
            matcher: Some(StringMatcher {
                match_pattern: Some(MatchPattern::Exact(san.clone())),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    CommonTlsContext {
        alpn_protocols: alpn.iter().map(|s| s.to_string()).collect(),
        tls_certificate_sds_secret_configs: vec![sds(CERT_SECRET, tls)],
        validation_context_type: Some(ValidationContextType::CombinedValidationContext(
            CombinedCertificateValidationContext {
                default_validation_context: Some(CertificateValidationContext {
                    match_typed_subject_alt_names: san_matchers,
                    ..Default::default()
                }),
                validation_context_sds_secret_config: Some(sds(ROOT_SECRET, tls)),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// `spiffe://TRUST_DOMAIN/ns/NS/sa/SA`
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// Transport socket matches of an outbound cluster: mTLS to endpoints labelled `tlsMode: istio`
/// (sidecar-injected workloads and east-west gateways), plaintext to the others.
pub fn outbound_socket_matches(tls: TlsSupport, sni: &str, sans: &[String]) -> Vec<TransportSocketMatch> {
    let upstream = UpstreamTlsContext {
        common_tls_context: Some(common(tls, &ISTIO_ALPN, sans)),
        sni: sni.into(),
        ..Default::default()
    };
    vec![
        TransportSocketMatch {
            name: "tlsMode-istio".into(),
            r#match: Some(struct_of(&[("tlsMode", string_value("istio"))])),
            transport_socket: Some(TransportSocket {
                name: "envoy.transport_sockets.tls".into(),
                config_type: Some(ConfigType::TypedConfig(any(&upstream))),
            }),
        },
        TransportSocketMatch {
            name: "tlsMode-disabled".into(),
            r#match: Some(Default::default()),
            transport_socket: Some(TransportSocket {
                name: "envoy.transport_sockets.raw_buffer".into(),
                config_type: Some(ConfigType::TypedConfig(any(&RawBuffer {}))),
            }),
        },
    ]
}

/// The downstream side of Istio mTLS on an inbound listener: client certificates required and
/// verified against `ROOTCA`.
pub fn inbound_transport_socket(tls: TlsSupport) -> TransportSocket {
    let ctx = DownstreamTlsContext {
        common_tls_context: Some(common(tls, &["istio-peer-exchange", "istio", "h2", "http/1.1"], &[])),
        require_client_certificate: Some(boolv(true)),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(ConfigType::TypedConfig(any(&ctx))),
    }
}
