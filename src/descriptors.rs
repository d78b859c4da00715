//! Protobuf descriptors for every message type envoy-types generates (Envoy v3 APIs, xDS, udpa,
//! validate, the Google well-known types), loaded once from the `FileDescriptorSet` that envoy-types
//! ships and that we vendor as `proto/envoy-types-0.7.7.bin` (see `proto/README.md`).
//!
//! [`crate::canonical`] walks encoded resources with these descriptors; anything that needs to map a
//! `google.protobuf.Any` type URL to a message type uses [`message_for_type_url`].

use std::sync::LazyLock;

use prost_reflect::{DescriptorPool, MessageDescriptor};

/// The vendored descriptor set. Its version must match the `envoy-types` version in Cargo.toml.
const ENVOY_TYPES_DESCRIPTORS: &[u8] = include_bytes!("../proto/envoy-types-0.7.7.bin");

static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| match DescriptorPool::decode(ENVOY_TYPES_DESCRIPTORS) {
    Ok(pool) => pool,
    Err(err) => {
        // The bytes are compiled in and covered by tests, so this is unreachable in a tested build.
        // An empty pool keeps meshfed serving: resources are then encoded as prost encodes them.
        tracing::error!(error = %err, "vendored envoy-types descriptor set does not decode; canonical encoding disabled");
        DescriptorPool::new()
    }
});

/// The descriptor pool for all envoy-types messages, decoded on first use.
pub fn pool() -> &'static DescriptorPool {
    &POOL
}

/// The full message name a type URL names: the part after its last `/`
/// (`type.googleapis.com/envoy.config.cluster.v3.Cluster` → `envoy.config.cluster.v3.Cluster`).
pub fn type_url_message_name(type_url: &str) -> &str {
    type_url.rsplit_once('/').map_or(type_url, |(_, name)| name)
}

/// The descriptor of the message a `google.protobuf.Any` type URL names, if the pool knows it.
pub fn message_for_type_url(type_url: &str) -> Option<MessageDescriptor> {
    pool().get_message_by_name(type_url_message_name(type_url))
}

/// Whether the pool knows the message a type URL names.
pub fn type_url_resolves(type_url: &str) -> bool {
    message_for_type_url(type_url).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPES: &[&str] = &[
        "envoy.config.cluster.v3.Cluster",
        "envoy.config.endpoint.v3.ClusterLoadAssignment",
        "envoy.config.listener.v3.Listener",
        "envoy.config.route.v3.RouteConfiguration",
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "envoy.extensions.filters.http.router.v3.Router",
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
        "envoy.admin.v3.ConfigDump",
        "envoy.service.status.v3.ClientConfig",
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "google.protobuf.Any",
        "google.protobuf.Struct",
    ];

    #[test]
    fn known_type_urls_resolve() {
        for name in TYPES {
            let url = format!("type.googleapis.com/{name}");
            assert!(type_url_resolves(&url), "{url} does not resolve");
            assert_eq!(message_for_type_url(&url).map(|m| m.full_name().to_owned()).as_deref(), Some(*name));
        }
    }

    #[test]
    fn prost_type_urls_resolve() {
        use envoy_types::pb::envoy::config::cluster::v3::Cluster;
        use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
        use prost::Name;
        assert!(type_url_resolves(&Cluster::type_url()));
        assert!(type_url_resolves(&HttpConnectionManager::type_url()));
    }

    #[test]
    fn unknown_type_urls_do_not_resolve() {
        assert!(!type_url_resolves("type.googleapis.com/meshfed.NoSuchMessage"));
        assert!(!type_url_resolves(""));
        assert!(!type_url_resolves("type.googleapis.com/"));
    }

    #[test]
    fn type_url_name_is_after_last_slash() {
        assert_eq!(type_url_message_name("type.googleapis.com/a.B"), "a.B");
        assert_eq!(type_url_message_name("example.com/x/y/a.B"), "a.B");
        assert_eq!(type_url_message_name("a.B"), "a.B");
    }

    #[test]
    fn pool_is_loaded() {
        assert!(pool().all_messages().len() > 1000, "{} messages", pool().all_messages().len());
    }
}
