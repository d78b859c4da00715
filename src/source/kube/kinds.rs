//! The kinds the Kubernetes source watches ([`WatchedKind`]: Namespaces, Nodes, Services,
//! EndpointSlices, Pods and Istio DestinationRules), how each is listed and watched, and the conversion
//! of their objects, which arrive untyped ([`DynamicObject`]), with the same converters as manifest
//! files ([`TopologyObject::from_kube`]).
//!
//! Uses nothing else of the source; used by the watch guard and the cluster loop.

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher;

use crate::topology::{self, KubeObject, ObjectKey, TopologyObject};

/// A kind meshfed watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WatchedKind {
    Namespace,
    Node,
    Service,
    EndpointSlice,
    Pod,
    DestinationRule,
}

impl WatchedKind {
    pub const ALL: [WatchedKind; 6] = [
        WatchedKind::Namespace,
        WatchedKind::Node,
        WatchedKind::Service,
        WatchedKind::EndpointSlice,
        WatchedKind::Pod,
        WatchedKind::DestinationRule,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WatchedKind::Namespace => "Namespace",
            WatchedKind::Node => "Node",
            WatchedKind::Service => "Service",
            WatchedKind::EndpointSlice => "EndpointSlice",
            WatchedKind::Pod => "Pod",
            WatchedKind::DestinationRule => "DestinationRule",
        }
    }

    fn topology_kind(self) -> topology::Kind {
        match self {
            WatchedKind::Namespace => topology::Kind::Namespace,
            WatchedKind::Node => topology::Kind::Node,
            WatchedKind::Service => topology::Kind::Service,
            WatchedKind::EndpointSlice => topology::Kind::EndpointSlice,
            WatchedKind::Pod => topology::Kind::Pod,
            WatchedKind::DestinationRule => topology::Kind::DestinationRule,
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, WatchedKind::Namespace | WatchedKind::Node)
    }

    pub fn api_resource(self) -> ApiResource {
        match self {
            WatchedKind::Namespace => ApiResource::erase::<Namespace>(&()),
            WatchedKind::Node => ApiResource::erase::<Node>(&()),
            WatchedKind::Service => ApiResource::erase::<Service>(&()),
            WatchedKind::EndpointSlice => ApiResource::erase::<EndpointSlice>(&()),
            WatchedKind::Pod => ApiResource::erase::<Pod>(&()),
            WatchedKind::DestinationRule => ApiResource {
                group: "networking.istio.io".into(),
                version: "v1".into(),
                api_version: "networking.istio.io/v1".into(),
                kind: "DestinationRule".into(),
                plural: "destinationrules".into(),
            },
        }
    }

    /// The watcher configuration: Failed pods are filtered by the API server (istiod ignores them).
    pub fn watcher_config(self) -> watcher::Config {
        match self {
            WatchedKind::Pod => watcher::Config::default().fields("status.phase!=Failed"),
            _ => watcher::Config::default(),
        }
    }

    /// Whether the kind may not be served at all (a CRD that is not installed): a 404 then means "none".
    pub(super) fn optional(self) -> bool {
        self == WatchedKind::DestinationRule
    }

    /// The key of an object from its metadata (for deletes and errors; no conversion).
    pub(super) fn key(self, obj: &DynamicObject) -> Option<ObjectKey> {
        let name = obj.metadata.name.as_deref().filter(|n| !n.is_empty())?;
        let namespace = if self.namespaced() {
            obj.metadata.namespace.as_deref().filter(|n| !n.is_empty()).unwrap_or("default")
        } else {
            ""
        };
        Some(ObjectKey { kind: self.topology_kind(), namespace: namespace.into(), name: name.into() })
    }

    /// Converts an object with the same converters as manifest files. `Ok(None)`: not used.
    pub fn convert(self, obj: &DynamicObject) -> Result<Option<TopologyObject>, String> {
        match self {
            WatchedKind::Namespace => convert_typed::<Namespace>(obj),
            WatchedKind::Node => convert_typed::<Node>(obj),
            WatchedKind::Service => convert_typed::<Service>(obj),
            WatchedKind::EndpointSlice => convert_typed::<EndpointSlice>(obj),
            WatchedKind::Pod => convert_typed::<Pod>(obj),
            WatchedKind::DestinationRule => {
                let mut value = serde_json::to_value(obj).map_err(|e| e.to_string())?;
                if let serde_json::Value::Object(m) = &mut value {
                    m.insert("apiVersion".into(), "networking.istio.io/v1".into());
                    m.insert("kind".into(), "DestinationRule".into());
                }
                let yaml = serde_yaml::to_value(&value).map_err(|e| e.to_string())?;
                topology::DestinationRuleInfo::from_value(yaml).map(|d| Some(TopologyObject::DestinationRule(d)))
            }
        }
    }
}

/// How errors name an object: `Kind namespace/name` (`Kind name` for cluster-wide kinds).
pub(super) fn describe(kind: WatchedKind, key: Option<&ObjectKey>) -> String {
    match key {
        Some(k) if k.namespace.is_empty() => format!("{} {}", kind.name(), k.name),
        Some(k) => format!("{} {}/{}", kind.name(), k.namespace, k.name),
        None => format!("{} <no name>", kind.name()),
    }
}

fn convert_typed<K>(obj: &DynamicObject) -> Result<Option<TopologyObject>, String>
where
    K: KubeObject + k8s_openapi::Resource,
{
    let mut value = serde_json::to_value(obj).map_err(|e| e.to_string())?;
    if let serde_json::Value::Object(m) = &mut value {
        m.insert("apiVersion".into(), <K as k8s_openapi::Resource>::API_VERSION.into());
        m.insert("kind".into(), <K as k8s_openapi::Resource>::KIND.into());
    }
    let typed: K = serde_path_to_error::deserialize(value).map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
    TopologyObject::from_kube(&typed).map_err(|e| match e {
        // the converter's message names the kind and object already
        topology::Error::Invalid { field, reason, .. } => format!("{field}: {reason}"),
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic(value: serde_json::Value) -> DynamicObject {
        serde_json::from_value(value).expect("a Kubernetes object")
    }

    #[test]
    fn conversion_uses_the_file_converters_and_names_bad_objects() {
        let svc = dynamic(serde_json::json!({
            "metadata": {"name": "reviews", "namespace": "shop", "managedFields": [{"manager": "kubectl"}]},
            "spec": {"ports": [{"name": "http", "port": 9080}]},
        }));
        let Ok(Some(TopologyObject::Service(s))) = WatchedKind::Service.convert(&svc) else { panic!("a service") };
        assert_eq!((&*s.namespace, &*s.name, s.ports[0].port), ("shop", "reviews", 9080));

        let bad = dynamic(serde_json::json!({
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": "nine"}]},
        }));
        let e = WatchedKind::Service.convert(&bad).unwrap_err();
        assert!(e.contains("spec.ports[0].port"), "{e}");
        let key = WatchedKind::Service.key(&bad).unwrap();
        assert_eq!(describe(WatchedKind::Service, Some(&key)), "Service shop/reviews");

        let fqdn = dynamic(serde_json::json!({
            "metadata": {"name": "x", "namespace": "shop", "labels": {"kubernetes.io/service-name": "x"}},
            "addressType": "FQDN", "endpoints": [],
        }));
        assert_eq!(WatchedKind::EndpointSlice.convert(&fqdn), Ok(None));

        let node =
            dynamic(serde_json::json!({"metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z"}}}));
        assert_eq!(WatchedKind::Node.key(&node).unwrap().namespace.as_ref(), "");
        assert!(matches!(WatchedKind::Node.convert(&node), Ok(Some(TopologyObject::Node(_)))));

        let dr = dynamic(serde_json::json!({
            "metadata": {"name": "r", "namespace": "shop"},
            "spec": {"host": "reviews", "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 3}}},
        }));
        let Ok(Some(TopologyObject::DestinationRule(d))) = WatchedKind::DestinationRule.convert(&dr) else {
            panic!("a destination rule")
        };
        assert!(d.rule.is_ok(), "{:?}", d.rule);
    }
}
