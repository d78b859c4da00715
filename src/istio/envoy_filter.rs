//! The objects of the wiring, as JSON values (serialized as YAML by [`to_yaml`]): the EnvoyFilter
//! `configPatches` and their Envoy values, and the bootstrap-override ConfigMap; and [`check_objects`],
//! which parses every patch value as its Envoy proto (through the descriptor pool, unknown fields denied)
//! so that meshfed never prints a value Envoy or istiod would refuse to parse.
//!
//! The values are written by hand, in the proto3 JSON form an operator would write (snake_case field
//! names, `@type` on `Any`), rather than produced from prost types: the check is then a real check of
//! what is printed.

use std::time::Duration;

use prost_reflect::{DeserializeOptions, DynamicMessage};
use serde_json::{Map, Value, json};

use super::error::Error;
use crate::descriptors;

/// apiVersion of the EnvoyFilter objects.
pub const ENVOY_FILTER_API_VERSION: &str = "networking.istio.io/v1alpha3";
/// The cluster through which proxies reach meshfed's EDS.
pub const MESHFED_XDS_CLUSTER: &str = "meshfed-xds";
/// The label on every object meshfed prints (roll back: delete what carries it).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "meshfed";
/// The pod annotation that names a ConfigMap whose `custom_bootstrap.json` Istio's agent passes to Envoy
/// (`--config-yaml`: merged into the generated bootstrap).
pub const BOOTSTRAP_OVERRIDE_ANNOTATION: &str = "sidecar.istio.io/bootstrapOverride";
/// The ConfigMap key Istio's injection mounts for [`BOOTSTRAP_OVERRIDE_ANNOTATION`].
pub const CUSTOM_BOOTSTRAP_KEY: &str = "custom_bootstrap.json";
/// The cluster of Istio agent's SDS server in an Istio proxy's bootstrap.
pub const SDS_CLUSTER: &str = "sds-grpc";
/// The message every `applyTo: CLUSTER` patch value is.
pub const CLUSTER_MESSAGE: &str = "envoy.config.cluster.v3.Cluster";
/// The message of `custom_bootstrap.json`.
pub const BOOTSTRAP_MESSAGE: &str = "envoy.config.bootstrap.v3.Bootstrap";

const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const UPSTREAM_TLS_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// The proxy context of a patch (`match.context`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum PatchContext {
    /// sidecars' outbound clusters (`SIDECAR_OUTBOUND`)
    Sidecar,
    /// gateways' clusters (`GATEWAY`): ingress and egress gateways
    Gateway,
}

impl PatchContext {
    /// Istio's name of the context.
    pub fn as_istio(self) -> &'static str {
        match self {
            PatchContext::Sidecar => "SIDECAR_OUTBOUND",
            PatchContext::Gateway => "GATEWAY",
        }
    }
}

/// Which xDS API proxies use for meshfed's EDS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EdsApi {
    /// `DELTA_GRPC`: Envoy accepts it with `meshfed-xds` added by CDS (the EnvoyFilter's ADD)
    Delta,
    /// `GRPC` (state of the world): Envoy requires `meshfed-xds` to be a static (bootstrap) cluster
    Sotw,
}

impl EdsApi {
    fn api_type(self) -> &'static str {
        match self {
            EdsApi::Delta => "DELTA_GRPC",
            EdsApi::Sotw => "GRPC",
        }
    }
}

/// Where proxies reach meshfed, and what they check of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshfedXds {
    /// a DNS name (STRICT_DNS cluster) or an IP address (STATIC)
    pub host: String,
    pub port: u16,
    /// whether `host` is an IP address
    pub is_ip: bool,
    /// the URI SAN meshfed's certificate must carry (its SPIFFE identity)
    pub san: String,
    /// SNI sent to meshfed (None: none)
    pub sni: Option<String>,
}

/// What a MERGE patch sets besides the EDS config source.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MergeExtras {
    /// set `common_lb_config.locality_weighted_lb_config` (meshfed's locality weights take effect)
    pub locality_weighted: bool,
    /// `outlier_detection` and `common_lb_config.healthy_panic_threshold` (proto3 JSON), from the mesh
    /// config's defaults, for a port no DestinationRule gives outlier detection
    pub outlier_detection: Option<(Value, Value)>,
}

/// How a MERGE patch finds its clusters (`match.cluster`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterMatch {
    /// `{service, portNumber}`: the service port's cluster and all its subset clusters
    Service { fqdn: String, port: u16 },
    /// `{name}`: exactly this cluster
    Name(String),
}

/// A proto3 JSON duration (`15s`, `0.500s`).
pub fn duration_json(d: Duration) -> String {
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        return format!("{}s", d.as_secs());
    }
    let mut frac = format!("{nanos:09}");
    while frac.len() > 3 && frac.ends_with("000") {
        frac.truncate(frac.len() - 3);
    }
    format!("{}.{frac}s", d.as_secs())
}

/// The config source of Istio's SDS secrets `default` and `ROOTCA`, as istiod writes it
/// (`pkg/model/authentication.go`): gRPC to the agent's `sds-grpc` cluster, waiting for the secret.
pub fn sds_config_source() -> Value {
    json!({
        "api_config_source": {
            "api_type": "GRPC",
            "set_node_on_first_message_only": true,
            "transport_api_version": "V3",
            "grpc_services": [{ "envoy_grpc": { "cluster_name": SDS_CLUSTER } }]
        },
        "resource_api_version": "V3",
        "initial_fetch_timeout": "0s"
    })
}

/// The `meshfed-xds` cluster: HTTP/2 to meshfed, Istio mTLS with the proxy's own SDS certificates
/// (`default`, `ROOTCA`), meshfed's certificate checked for its SPIFFE identity.
pub fn meshfed_cluster(x: &MeshfedXds) -> Value {
    let sds = sds_config_source();
    let mut tls = json!({
        "@type": UPSTREAM_TLS_TYPE,
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificate_sds_secret_configs": [{ "name": "default", "sds_config": sds.clone() }],
            "combined_validation_context": {
                "default_validation_context": {
                    "match_typed_subject_alt_names": [{ "san_type": "URI", "matcher": { "exact": x.san } }]
                },
                "validation_context_sds_secret_config": { "name": "ROOTCA", "sds_config": sds }
            }
        }
    });
    if let Some(sni) = &x.sni {
        tls["sni"] = json!(sni);
    }
    let mut cluster = json!({
        "name": MESHFED_XDS_CLUSTER,
        "type": if x.is_ip { "STATIC" } else { "STRICT_DNS" },
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": MESHFED_XDS_CLUSTER,
            "endpoints": [{
                "lb_endpoints": [{
                    "endpoint": { "address": { "socket_address": { "address": x.host, "port_value": x.port } } }
                }]
            }]
        },
        // every EDS cluster wired to meshfed is one concurrent gRPC stream on this cluster: Envoy's
        // default limit of 1024 requests would cap them (Istio's xds-grpc cluster sets the same)
        "circuit_breakers": {
            "thresholds": [
                { "priority": "DEFAULT", "max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000 },
                { "priority": "HIGH", "max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000 }
            ]
        },
        "typed_extension_protocol_options": {
            HTTP_PROTOCOL_OPTIONS: {
                "@type": format!("type.googleapis.com/{HTTP_PROTOCOL_OPTIONS}"),
                "explicit_http_config": {
                    "http2_protocol_options": { "connection_keepalive": { "interval": "30s", "timeout": "10s" } }
                }
            }
        },
        "upstream_connection_options": {
            "tcp_keepalive": { "keepalive_time": 300, "keepalive_interval": 30, "keepalive_probes": 3 }
        },
        "transport_socket": { "name": "envoy.transport_sockets.tls", "typed_config": tls }
    });
    if !x.is_ip {
        cluster["dns_lookup_family"] = json!("V4_PREFERRED");
    }
    cluster
}

/// `eds_cluster_config.eds_config`: meshfed's EDS over its own gRPC stream per cluster, on `meshfed-xds`.
pub fn eds_config(api: EdsApi, initial_fetch_timeout: Duration) -> Value {
    json!({
        "api_config_source": {
            "api_type": api.api_type(),
            "transport_api_version": "V3",
            "grpc_services": [{ "envoy_grpc": { "cluster_name": MESHFED_XDS_CLUSTER } }],
            "set_node_on_first_message_only": true
        },
        "resource_api_version": "V3",
        "initial_fetch_timeout": duration_json(initial_fetch_timeout)
    })
}

/// The value of a MERGE patch into an outbound cluster of istiod.
pub fn merge_value(api: EdsApi, initial_fetch_timeout: Duration, extras: &MergeExtras) -> Value {
    let mut value = json!({ "eds_cluster_config": { "eds_config": eds_config(api, initial_fetch_timeout) } });
    let mut common = Map::new();
    if extras.locality_weighted {
        common.insert("locality_weighted_lb_config".into(), json!({}));
    }
    if let Some((outlier, panic)) = &extras.outlier_detection {
        value["outlier_detection"] = outlier.clone();
        common.insert("healthy_panic_threshold".into(), panic.clone());
    }
    if !common.is_empty() {
        value["common_lb_config"] = Value::Object(common);
    }
    value
}

/// One `configPatches` entry on clusters.
pub fn config_patch(context: PatchContext, operation: &str, cluster: Option<&ClusterMatch>, value: Value) -> Value {
    let mut m = json!({ "context": context.as_istio() });
    match cluster {
        Some(ClusterMatch::Service { fqdn, port }) => m["cluster"] = json!({ "service": fqdn, "portNumber": port }),
        Some(ClusterMatch::Name(name)) => m["cluster"] = json!({ "name": name }),
        None => {}
    }
    json!({ "applyTo": "CLUSTER", "match": m, "patch": { "operation": operation, "value": value } })
}

fn metadata(name: &str, namespace: &str) -> Value {
    json!({ "name": name, "namespace": namespace, "labels": { MANAGED_BY_LABEL: MANAGED_BY } })
}

/// An EnvoyFilter; `workload_labels`: its workloadSelector (None: every proxy of its namespace, or of the
/// mesh in the root namespace).
pub fn envoy_filter(
    name: &str,
    namespace: &str,
    workload_labels: Option<&(String, String)>,
    patches: Vec<Value>,
) -> Value {
    let mut spec = json!({ "configPatches": patches });
    if let Some((k, v)) = workload_labels {
        spec["workloadSelector"] = json!({ "labels": { k: v } });
    }
    json!({ "apiVersion": ENVOY_FILTER_API_VERSION, "kind": "EnvoyFilter", "metadata": metadata(name, namespace), "spec": spec })
}

/// The bootstrap-override ConfigMap: `custom_bootstrap.json` adds `cluster` as a static cluster.
pub fn bootstrap_config_map(name: &str, namespace: &str, cluster: &Value) -> Result<Value, Error> {
    let bootstrap = json!({ "static_resources": { "clusters": [cluster] } });
    let text = serde_json::to_string_pretty(&bootstrap).map_err(|e| Error::Serialize(e.to_string()))?;
    Ok(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(name, namespace),
        "data": { CUSTOM_BOOTSTRAP_KEY: text + "\n" }
    }))
}

/// Parses `value` as the Envoy message `message` (proto3 JSON, unknown fields refused). `what` names the
/// value in the error.
pub fn check_value(what: &str, message: &str, value: &Value) -> Result<DynamicMessage, Error> {
    let err = |reason: String| Error::PatchValue { what: what.to_string(), message: message.to_string(), reason };
    let desc = descriptors::pool()
        .get_message_by_name(message)
        .ok_or_else(|| err("the descriptor pool does not know this message".into()))?;
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    DynamicMessage::deserialize_with_options(desc, value.clone(), &options).map_err(|e| err(e.to_string()))
}

fn object_name(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap_or("object");
    let ns = object["metadata"]["namespace"].as_str().unwrap_or("");
    let name = object["metadata"]["name"].as_str().unwrap_or("<no name>");
    format!("{kind} {ns}/{name}")
}

/// A short description of a patch for errors: operation, context, and what it matches or adds.
fn describe_patch(patch: &Value) -> String {
    let op = patch["patch"]["operation"].as_str().unwrap_or("?");
    let ctx = patch["match"]["context"].as_str().unwrap_or("ANY");
    let cluster = &patch["match"]["cluster"];
    let target = if let Some(name) = cluster["name"].as_str() {
        name.to_string()
    } else if let Some(svc) = cluster["service"].as_str() {
        format!("{svc}:{}", cluster["portNumber"])
    } else {
        patch["patch"]["value"]["name"].as_str().unwrap_or("?").to_string()
    };
    format!("{op} {ctx} {target}")
}

/// Parses every patch value of every object: `applyTo: CLUSTER` values as Envoy `Cluster`s, and the
/// bootstrap overrides of ConfigMaps as `Bootstrap`s. Returns how many values were checked; the first
/// invalid one is an error naming its object and patch.
pub fn check_objects(objects: &[Value]) -> Result<usize, Error> {
    let mut checked = 0;
    for object in objects {
        match object["kind"].as_str() {
            Some("EnvoyFilter") => {
                let patches = object["spec"]["configPatches"].as_array().map(Vec::as_slice).unwrap_or_default();
                for (i, patch) in patches.iter().enumerate() {
                    let what = format!("{} configPatches[{i}] ({})", object_name(object), describe_patch(patch));
                    if patch["applyTo"] != "CLUSTER" {
                        return Err(Error::PatchValue {
                            what,
                            message: CLUSTER_MESSAGE.into(),
                            reason: format!("applyTo is {}, meshfed only patches CLUSTER", patch["applyTo"]),
                        });
                    }
                    check_value(&what, CLUSTER_MESSAGE, &patch["patch"]["value"])?;
                    checked += 1;
                }
            }
            Some("ConfigMap") => {
                if let Some(text) = object["data"][CUSTOM_BOOTSTRAP_KEY].as_str() {
                    let what = format!("{} {CUSTOM_BOOTSTRAP_KEY}", object_name(object));
                    let value: Value = serde_json::from_str(text).map_err(|e| Error::PatchValue {
                        what: what.clone(),
                        message: BOOTSTRAP_MESSAGE.into(),
                        reason: format!("not JSON: {e}"),
                    })?;
                    check_value(&what, BOOTSTRAP_MESSAGE, &value)?;
                    checked += 1;
                }
            }
            _ => {}
        }
    }
    Ok(checked)
}

/// Keys printed first, in this order (the others follow alphabetically): Kubernetes objects read
/// apiVersion, kind, metadata, spec; patches applyTo, match, patch; clusters name first.
const KEY_ORDER: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "namespace",
    "labels",
    "annotations",
    "spec",
    "data",
    "workloadSelector",
    "configPatches",
    "applyTo",
    "match",
    "context",
    "cluster",
    "service",
    "portNumber",
    "patch",
    "operation",
    "value",
    "@type",
    "type",
];

fn ordered(value: &Value) -> Result<serde_yaml::Value, Error> {
    Ok(match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            let rank = |k: &str| KEY_ORDER.iter().position(|o| *o == k).unwrap_or(usize::MAX);
            keys.sort_by(|a, b| (rank(a), *a).cmp(&(rank(b), *b)));
            let mut out = serde_yaml::Mapping::new();
            for k in keys {
                out.insert(serde_yaml::Value::from(k.as_str()), ordered(&map[k])?);
            }
            serde_yaml::Value::Mapping(out)
        }
        Value::Array(items) => serde_yaml::Value::Sequence(items.iter().map(ordered).collect::<Result<_, _>>()?),
        other => serde_yaml::to_value(other).map_err(|e| Error::Serialize(e.to_string()))?,
    })
}

/// The objects as a multi-document YAML stream, each document after `---`, preceded by `header` lines
/// as comments.
pub fn to_yaml(header: &[String], objects: &[Value]) -> Result<String, Error> {
    let mut out = String::new();
    for line in header {
        out.push_str("# ");
        out.push_str(line);
        out.push('\n');
    }
    for object in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&ordered(object)?).map_err(|e| Error::Serialize(e.to_string()))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xds() -> MeshfedXds {
        MeshfedXds {
            host: "meshfed.istio-system.svc.cluster.local".into(),
            port: 15012,
            is_ip: false,
            san: "spiffe://cluster.local/ns/istio-system/sa/meshfed".into(),
            sni: Some("meshfed.istio-system.svc.cluster.local".into()),
        }
    }

    #[test]
    fn durations_in_proto3_json() {
        assert_eq!(duration_json(Duration::from_secs(15)), "15s");
        assert_eq!(duration_json(Duration::ZERO), "0s");
        assert_eq!(duration_json(Duration::from_millis(1500)), "1.500s");
        assert_eq!(duration_json(Duration::from_micros(2)), "0.000002s");
        assert_eq!(duration_json(Duration::from_nanos(7)), "0.000000007s");
    }

    #[test]
    fn every_value_parses_as_its_proto() {
        let cluster = meshfed_cluster(&xds());
        let m = check_value("ADD", CLUSTER_MESSAGE, &cluster).unwrap();
        assert_eq!(m.get_field_by_name("name").unwrap().as_str(), Some(MESHFED_XDS_CLUSTER));
        let extras = MergeExtras {
            locality_weighted: true,
            outlier_detection: Some((json!({ "consecutive_5xx": 5, "interval": "10s" }), json!({ "value": 0 }))),
        };
        for api in [EdsApi::Delta, EdsApi::Sotw] {
            let v = merge_value(api, Duration::from_secs(15), &extras);
            check_value("MERGE", CLUSTER_MESSAGE, &v).unwrap();
            assert_eq!(v["eds_cluster_config"]["eds_config"]["api_config_source"]["api_type"], api.api_type());
        }
        let plain = merge_value(EdsApi::Delta, Duration::from_secs(15), &MergeExtras::default());
        assert!(plain.get("common_lb_config").is_none() && plain.get("outlier_detection").is_none(), "{plain}");
        let cm = bootstrap_config_map("meshfed-eds-bootstrap", "shop", &cluster).unwrap();
        assert_eq!(check_objects(&[cm]).unwrap(), 1);
    }

    #[test]
    fn a_broken_value_is_refused_with_what_and_why() {
        let mut v = merge_value(EdsApi::Delta, Duration::from_secs(15), &MergeExtras::default());
        v["eds_cluster_config"]["eds_confg"] = json!({});
        let e = check_value("EnvoyFilter shop/x configPatches[1]", CLUSTER_MESSAGE, &v).unwrap_err().to_string();
        assert!(e.contains("configPatches[1]") && e.contains(CLUSTER_MESSAGE) && e.contains("eds_confg"), "{e}");

        // a wrong type and an unknown enum value are refused too
        let mut v = merge_value(EdsApi::Delta, Duration::from_secs(15), &MergeExtras::default());
        v["eds_cluster_config"]["eds_config"]["initial_fetch_timeout"] = json!("soon");
        assert!(check_value("x", CLUSTER_MESSAGE, &v).is_err());
        let mut v = meshfed_cluster(&xds());
        v["type"] = json!("EDSS");
        assert!(check_value("x", CLUSTER_MESSAGE, &v).is_err());
        // and an Any of a type the pool does not know
        let mut v = meshfed_cluster(&xds());
        v["transport_socket"]["typed_config"]["@type"] = json!("type.googleapis.com/istio.NoSuchContext");
        assert!(check_value("x", CLUSTER_MESSAGE, &v).is_err());

        let filter = envoy_filter(
            "meshfed-eds",
            "shop",
            None,
            vec![config_patch(
                PatchContext::Sidecar,
                "MERGE",
                Some(&ClusterMatch::Service { fqdn: "reviews.shop.svc.cluster.local".into(), port: 9080 }),
                json!({ "eds_cluster_config": { "service_nme": "x" } }),
            )],
        );
        let e = check_objects(&[filter]).unwrap_err().to_string();
        assert!(
            e.contains("EnvoyFilter shop/meshfed-eds configPatches[0] (MERGE SIDECAR_OUTBOUND reviews.shop.svc.cluster.local:9080)"),
            "{e}"
        );
        let mut cm = bootstrap_config_map("b", "shop", &meshfed_cluster(&xds())).unwrap();
        cm["data"][CUSTOM_BOOTSTRAP_KEY] = json!("{\"static_resources\": {\"clustrs\": []}}");
        let e = check_objects(&[cm]).unwrap_err().to_string();
        assert!(e.contains("ConfigMap shop/b custom_bootstrap.json") && e.contains(BOOTSTRAP_MESSAGE), "{e}");
    }

    #[test]
    fn yaml_reads_in_kubernetes_order() {
        let filter = envoy_filter(
            "meshfed-eds",
            "shop",
            Some(&("meshfed.io/static-xds".into(), "true".into())),
            vec![config_patch(PatchContext::Gateway, "ADD", None, meshfed_cluster(&xds()))],
        );
        let text = to_yaml(&["generated".into()], &[filter]).unwrap();
        assert!(text.starts_with("# generated\n---\napiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata:\n  name: meshfed-eds\n"), "{text}");
        let spec = text.find("\nspec:\n  workloadSelector:").expect("spec with the selector first");
        assert!(text[spec..].contains("  - applyTo: CLUSTER\n    match:\n      context: GATEWAY\n    patch:\n      operation: ADD\n      value:\n        name: meshfed-xds\n        type: STRICT_DNS\n"), "{text}");
        let back: Value = serde_yaml::from_str(text.split("---\n").nth(1).unwrap()).unwrap();
        assert_eq!(back["spec"]["configPatches"][0]["patch"]["value"], meshfed_cluster(&xds()));
    }
}
