//! What meshfed serves a proxy, as Envoy's admin `envoy.admin.v3.ConfigDump` (istiod's
//! `/debug/config_dump`), and the istioctl-style debug types answered over ADS
//! (`istio.io/debug/syncz`, `istio.io/debug/config_dump`).
//!
//! The resources of a dump are those of the current snapshot for the proxy's view that its
//! subscription covers (wildcard, or named): what meshfed serves it now, as istiod's dump is what
//! istiod would generate for it now. Sections come in istiod's order: bootstrap (the node), clusters,
//! endpoints (only when asked for), listeners, scoped routes (empty), routes, secrets (none: meshfed
//! serves no SDS), ECDS (empty). JSON is proto3 JSON with Envoy's (proto) field names and `@type` on
//! every `Any`, produced through the descriptor pool, so every nested `Any` resolves or the dump fails.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::admin::v3::{
    BootstrapConfigDump, ClustersConfigDump, ConfigDump, EcdsConfigDump, EndpointsConfigDump, ListenersConfigDump,
    RoutesConfigDump, ScopedRoutesConfigDump, SecretsConfigDump, UpdateFailureState, clusters_config_dump,
    endpoints_config_dump, listeners_config_dump, routes_config_dump,
};
use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use envoy_types::pb::envoy::config::core::v3::{Locality as PbLocality, Node};
use envoy_types::pb::envoy::service::status::v3::{ClientConfig, ConfigStatus, client_config::GenericXdsConfig};
use envoy_types::pb::google::protobuf::{Any, ListValue, Struct, Timestamp, Value, value::Kind};
use prost::{Message, Name};
use prost_reflect::{DynamicMessage, SerializeOptions};

use crate::cache::{Resource, Snapshot};
use crate::push::PushHandle;
use crate::type_url::ResourceType;
use crate::type_url::{TYPE_DEBUG_CONFIG_DUMP, TYPE_DEBUG_SYNCZ};
use crate::xds::connections::{ConfigState, Connection, Connections, TypeStatus};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} is not in the descriptor pool")]
    UnknownMessage(String),
    #[error("the config dump does not decode with the descriptor pool: {0}")]
    Reflect(#[from] prost::DecodeError),
    #[error("the config dump does not convert to JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// `google.protobuf.Any` of a message.
pub fn any_of<M: Message + Name>(m: &M) -> Any {
    Any { type_url: M::type_url(), value: m.encode_to_vec() }
}

/// A cached resource's `Any` (None if the cache holds something that does not decode, which cannot
/// happen for what meshfed encodes).
pub fn resource_any(r: &Resource) -> Option<Any> {
    Any::decode(&r.body[..]).ok()
}

/// A cached resource decoded as `M`.
pub fn decode_resource<M: Message + Default>(r: &Resource) -> Option<M> {
    M::decode(&resource_any(r)?.value[..]).ok()
}

/// The resources of type `t` that `conn` is served from `snapshot`: those of its view that its
/// subscription covers (nothing if it has not subscribed to the type).
pub fn served(conn: &Connection, snapshot: &Snapshot, t: ResourceType) -> Vec<Arc<Resource>> {
    let status = conn.status();
    let st = &status[t.index()];
    if !st.subscribed {
        return Vec::new();
    }
    let Some(resources) = snapshot.resources(&conn.view(), t) else { return Vec::new() };
    resources.values().filter(|r| (st.wildcard && r.wildcard) || st.names.contains(&r.name)).cloned().collect()
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

fn string_value(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.to_string())) }
}

/// The node as meshfed knows it (the metadata istiod reads).
fn node(conn: &Connection) -> Node {
    let p = &conn.proxy;
    let mut fields = std::collections::HashMap::new();
    if let Some(c) = &p.cluster_id {
        fields.insert("CLUSTER_ID".to_string(), string_value(c.as_str()));
    }
    if !conn.view().endpoints.network.is_empty() {
        fields.insert("NETWORK".to_string(), string_value(conn.view().endpoints.network.as_str()));
    }
    fields.insert("NAMESPACE".to_string(), string_value(&p.namespace));
    if !p.istio_version.is_empty() {
        fields.insert("ISTIO_VERSION".to_string(), string_value(&p.istio_version));
    }
    fields.insert("INTERCEPTION_MODE".to_string(), string_value(p.interception.as_str()));
    if !p.labels.is_empty() {
        let labels = p.labels.iter().map(|(k, v)| (k.clone(), string_value(v))).collect();
        fields.insert("LABELS".to_string(), Value { kind: Some(Kind::StructValue(Struct { fields: labels })) });
    }
    fields.insert(
        "INSTANCE_IPS".to_string(),
        Value { kind: Some(Kind::ListValue(ListValue { values: vec![string_value(&p.ip.to_string())] })) },
    );
    Node {
        id: p.id.to_string(),
        cluster: format!("{}.{}", p.pod, p.namespace),
        metadata: Some(Struct { fields }),
        locality: (!p.locality.is_empty()).then(|| PbLocality {
            region: p.locality.region.to_string(),
            zone: p.locality.zone.to_string(),
            sub_zone: p.locality.subzone.to_string(),
        }),
        ..Default::default()
    }
}

/// The `ConfigDump` of what `conn` is served from `snapshot`.
pub fn config_dump(conn: &Connection, snapshot: &Snapshot, include_eds: bool) -> Result<ConfigDump, Error> {
    let status = conn.status();
    let updated = |t: ResourceType| status[t.index()].sent_at.map(timestamp);
    let items = |t: ResourceType| -> Vec<(Arc<Resource>, Any)> {
        served(conn, snapshot, t).into_iter().filter_map(|r| resource_any(&r).map(|a| (r, a))).collect()
    };

    let bootstrap = BootstrapConfigDump {
        bootstrap: Some(Bootstrap { node: Some(node(conn)), ..Default::default() }),
        last_updated: Some(timestamp(conn.connected_at)),
    };
    let clusters = ClustersConfigDump {
        version_info: status[ResourceType::Cluster.index()].sent_version.clone(),
        dynamic_active_clusters: items(ResourceType::Cluster)
            .into_iter()
            .map(|(r, any)| clusters_config_dump::DynamicCluster {
                version_info: r.version.to_string(),
                cluster: Some(any),
                last_updated: updated(ResourceType::Cluster),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let listeners = ListenersConfigDump {
        version_info: status[ResourceType::Listener.index()].sent_version.clone(),
        dynamic_listeners: items(ResourceType::Listener)
            .into_iter()
            .map(|(r, any)| listeners_config_dump::DynamicListener {
                name: r.name.to_string(),
                active_state: Some(listeners_config_dump::DynamicListenerState {
                    version_info: r.version.to_string(),
                    listener: Some(any),
                    last_updated: updated(ResourceType::Listener),
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let routes = RoutesConfigDump {
        dynamic_route_configs: items(ResourceType::Route)
            .into_iter()
            .map(|(r, any)| routes_config_dump::DynamicRouteConfig {
                version_info: r.version.to_string(),
                route_config: Some(any),
                last_updated: updated(ResourceType::Route),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut configs = vec![any_of(&bootstrap), any_of(&clusters)];
    if include_eds {
        let endpoints = EndpointsConfigDump {
            dynamic_endpoint_configs: items(ResourceType::Endpoint)
                .into_iter()
                .map(|(r, any)| endpoints_config_dump::DynamicEndpointConfig {
                    version_info: r.version.to_string(),
                    endpoint_config: Some(any),
                    last_updated: updated(ResourceType::Endpoint),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        configs.push(any_of(&endpoints));
    }
    configs.push(any_of(&listeners));
    configs.push(any_of(&ScopedRoutesConfigDump::default()));
    configs.push(any_of(&routes));
    configs.push(any_of(&SecretsConfigDump::default()));
    configs.push(any_of(&EcdsConfigDump::default()));
    Ok(ConfigDump { configs })
}

/// Proto3 JSON of a `ConfigDump` as Envoy's admin writes it: proto field names, `@type` on every Any.
pub fn to_json(dump: &ConfigDump) -> Result<serde_json::Value, Error> {
    let name = ConfigDump::full_name();
    let desc = crate::descriptors::pool().get_message_by_name(&name).ok_or(Error::UnknownMessage(name))?;
    let msg = DynamicMessage::decode(desc, &dump.encode_to_vec()[..])?;
    let options = SerializeOptions::new().use_proto_field_name(true);
    Ok(msg.serialize_with_options(serde_json::value::Serializer, &options)?)
}

fn config_status(s: &TypeStatus) -> ConfigStatus {
    match ConfigState::of(s) {
        ConfigState::Synced => ConfigStatus::Synced,
        ConfigState::Stale => ConfigStatus::Stale,
        ConfigState::NotSent => ConfigStatus::NotSent,
        ConfigState::Error => ConfigStatus::Error,
    }
}

/// istiod's `istio.io/debug/syncz` resource of one proxy: a `ClientConfig` with its node (id
/// `POD.NS`, metadata CLUSTER_ID, NAMESPACE, ISTIO_VERSION) and one generic xDS config per type.
pub fn client_config(conn: &Connection) -> ClientConfig {
    let p = &conn.proxy;
    let mut fields = std::collections::HashMap::new();
    if let Some(c) = &p.cluster_id {
        fields.insert("CLUSTER_ID".to_string(), string_value(c.as_str()));
    }
    fields.insert("NAMESPACE".to_string(), string_value(&p.namespace));
    fields.insert("ISTIO_VERSION".to_string(), string_value(&p.istio_version));
    let status = conn.status();
    // istiod's order: listeners, routes, endpoints, clusters
    let generic_xds_configs =
        [ResourceType::Listener, ResourceType::Route, ResourceType::Endpoint, ResourceType::Cluster]
            .into_iter()
            .map(|t| {
                let s = &status[t.index()];
                GenericXdsConfig {
                    type_url: t.type_url().to_string(),
                    version_info: s.sent_version.clone(),
                    config_status: config_status(s) as i32,
                    last_updated: s.sent_at.map(timestamp),
                    error_state: s.last_error.as_ref().map(|e| UpdateFailureState {
                        details: e.clone(),
                        version_info: s.sent_version.clone(),
                        last_update_attempt: s.sent_at.map(timestamp),
                        ..Default::default()
                    }),
                    ..Default::default()
                }
            })
            .collect();
    ClientConfig {
        node: Some(Node { id: p.key.to_string(), metadata: Some(Struct { fields }), ..Default::default() }),
        generic_xds_configs,
        ..Default::default()
    }
}

/// The answers to istioctl's debug types over ADS, as the xDS streams ask for them
/// ([`crate::xds::DebugTypes`]): the state read from the connections and the push loop's snapshots.
#[derive(Clone, Debug)]
pub struct AdsDebug {
    pub connections: Arc<Connections>,
    pub push: PushHandle,
}

impl crate::xds::DebugTypes for AdsDebug {
    fn resources(&self, type_url: &str, names: &[String]) -> Vec<(String, Any)> {
        ads_debug_resources(type_url, names, &self.connections, &self.push)
    }
}

/// The resources (name, body) answering a debug type over ADS; empty for other type URLs, for a
/// config dump of a proxy not connected, or a malformed request (not exactly one name).
pub fn ads_debug_resources(
    type_url: &str,
    names: &[String],
    connections: &Connections,
    push: &PushHandle,
) -> Vec<(String, Any)> {
    match type_url {
        TYPE_DEBUG_SYNCZ => {
            connections.proxies().iter().map(|c| (c.proxy.key.to_string(), any_of(&client_config(c)))).collect()
        }
        TYPE_DEBUG_CONFIG_DUMP => {
            let [name] = names else { return Vec::new() };
            let Some(conn) = connections.find_proxy(name) else { return Vec::new() };
            match config_dump(&conn, &push.snapshot(), false) {
                Ok(dump) => vec![(String::new(), any_of(&dump))],
                Err(e) => {
                    tracing::warn!(proxy = %name, error = %e, "config dump over ADS failed");
                    Vec::new()
                }
            }
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh_config::MeshConfig;
    use crate::proxy::Proxy;
    use crate::translate::View;
    use crate::xds::connections::Flavor;

    fn demo_pusher() -> (crate::push::Pusher, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mesh = {
            crate::demo::write_to(dir.path()).unwrap();
            MeshConfig::load(&dir.path().join("mesh.yaml")).unwrap()
        };
        let (mut pusher, _rx) = crate::push::Pusher::new(&mesh);
        for c in &mesh.clusters {
            let crate::mesh_config::ClusterSource::Manifests(d) = &c.source else { continue };
            let (objects, errors) = crate::source::files::load_cluster_dir(d);
            assert!(errors.is_empty(), "{errors:?}");
            pusher.apply(crate::source::SourceEvent::Sync { cluster: c.id.clone(), objects });
        }
        (pusher, dir)
    }

    fn sidecar() -> Proxy {
        let meta = [("CLUSTER_ID", "aws-use1"), ("NETWORK", "aws-net"), ("INTERCEPTION_MODE", "NONE")];
        let node = Node {
            id: "sidecar~127.0.50.1~client-1.shop~shop.svc.cluster.local".into(),
            metadata: Some(Struct { fields: meta.iter().map(|(k, v)| (k.to_string(), string_value(v))).collect() }),
            locality: Some(PbLocality {
                region: "us-east-1".into(),
                zone: "us-east-1a".into(),
                sub_zone: String::new(),
            }),
            ..Default::default()
        };
        Proxy::from_node(Some(&node)).unwrap()
    }

    #[tokio::test]
    async fn dump_has_istiod_sections_and_every_any_resolves() {
        let (mut pusher, _dir) = demo_pusher();
        let proxy = sidecar();
        let view = View::with_network(&proxy, proxy.network.clone(), &Default::default());
        pusher.attach(&view);
        pusher.publish(Default::default());
        let (commands, _) = tokio::sync::mpsc::unbounded_channel();
        let handle = pusher.handle_for(commands);
        let snapshot = handle.snapshot();
        let connections = Arc::new(Connections::default());
        let guard = connections.register(proxy, Flavor::Sotw, crate::xds::connections::XdsService::Ads, view);
        for t in ResourceType::ALL {
            guard.conn.update(t, |s| {
                s.subscribed = true;
                s.wildcard = true;
                s.sent_nonce = "1".into();
                s.acked_nonce = "1".into();
                s.sent_at = Some(SystemTime::now());
            });
        }
        let dump = config_dump(&guard.conn, &snapshot, true).unwrap();
        let types: Vec<&str> = dump.configs.iter().map(|a| a.type_url.rsplit('.').next().unwrap()).collect();
        assert_eq!(
            types,
            [
                "BootstrapConfigDump",
                "ClustersConfigDump",
                "EndpointsConfigDump",
                "ListenersConfigDump",
                "ScopedRoutesConfigDump",
                "RoutesConfigDump",
                "SecretsConfigDump",
                "EcdsConfigDump"
            ]
        );
        let json = to_json(&dump).unwrap();
        let text = json.to_string();
        assert!(text.contains("\"dynamic_active_clusters\""), "proto field names");
        assert!(text.contains("\"@type\":\"type.googleapis.com/envoy.config.cluster.v3.Cluster\""));
        assert!(text.contains("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"));
        assert!(text.contains("outbound|9080||reviews.shop.svc.cluster.local"));
        let without = config_dump(&guard.conn, &snapshot, false).unwrap();
        assert_eq!(without.configs.len(), 7);

        // named subscriptions only
        guard.conn.update(ResourceType::Endpoint, |s| {
            s.wildcard = false;
            s.names = crate::xds::subscription::intern(
                ["outbound|9080||reviews.shop.svc.cluster.local".into()]
                    .into_iter()
                    .collect::<crate::xds::subscription::Names>(),
            );
        });
        assert_eq!(served(&guard.conn, &snapshot, ResourceType::Endpoint).len(), 1);
        guard.conn.update(ResourceType::Route, |s| s.subscribed = false);
        assert!(served(&guard.conn, &snapshot, ResourceType::Route).is_empty());

        // over ADS
        let syncz = ads_debug_resources(TYPE_DEBUG_SYNCZ, &[], &connections, &handle);
        assert_eq!(syncz.len(), 1);
        let cc = ClientConfig::decode(&syncz[0].1.value[..]).unwrap();
        assert_eq!(cc.node.unwrap().id, "client-1.shop");
        assert!(cc.generic_xds_configs.iter().all(|g| g.config_status == ConfigStatus::Synced as i32));
        let dump = ads_debug_resources(TYPE_DEBUG_CONFIG_DUMP, &["client-1.shop".into()], &connections, &handle);
        assert_eq!(dump.len(), 1);
        assert_eq!(dump[0].1.type_url, "type.googleapis.com/envoy.admin.v3.ConfigDump");
        assert!(ads_debug_resources(TYPE_DEBUG_CONFIG_DUMP, &["nobody.shop".into()], &connections, &handle).is_empty());
    }
}
