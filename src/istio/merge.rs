//! What istiod does with a MERGE patch: which clusters it matches, and how the value is merged into
//! them; and [`preview`], which shows a proxy's clusters (as `istioctl proxy-config cluster -o json` or a
//! config dump prints them) after the wiring's MERGE patches (`meshfed istio --preview FILE`).
//!
//! **Matching** (istiod's `clusterMatch`, `pilot/pkg/networking/core/envoyfilter/cluster_patch.go`):
//! `match.cluster.name` must equal the cluster's name; otherwise the name is parsed as
//! `DIRECTION|PORT|SUBSET|HOST`, or `DIRECTION_.PORT_.SUBSET_.HOST` for names starting `outbound_` /
//! `inbound_` (istiod's `ParseSubsetKey`), and each of `service`, `portNumber`, `subset` that is set must
//! equal the parsed part. An empty `subset` is not a condition: `{service, portNumber}` matches the
//! service port's cluster *and every subset cluster of it* (`outbound|9080|v1|...`), and on gateways the
//! SNI-named clusters (`outbound_.9080_._....`) too.
//!
//! **Merging** (istiod's `pkg/proto/merge`, a copy of Go's `proto.Merge` with one exception), done here
//! on [`DynamicMessage`]s of the descriptor pool: for every field *set* in the patch (a scalar without
//! presence counts as set when it is not its default; message, `optional` and oneof fields when present):
//! - a scalar, enum, string or bytes field replaces the cluster's;
//! - a message field is merged recursively into the cluster's (created empty if absent); setting a
//!   member of a oneof clears the oneof's other member first, so `api_config_source` replaces istiod's
//!   `ads: {}` in `eds_config.config_source_specifier`;
//! - except `google.protobuf.Duration`, which replaces the cluster's whole (the exception: Go's merge
//!   would merge seconds and nanos separately);
//! - a repeated field's elements are appended (MERGE; `MERGE_AND_REPLACE_LIST` is not used by meshfed);
//! - a map field's entries replace the cluster's entries of the same key (not merged);
//! - `Any` is an ordinary message (`type_url`, `value`): its fields replace the cluster's.
//!
//! istiod treats a patch carrying `transport_socket` specially (merged into the matching
//! `transport_socket_matches` entry); meshfed's patches carry none, so that path is not modelled.

use prost_reflect::{DynamicMessage, Kind, ReflectMessage, SerializeOptions, Value as PValue};
use serde_json::Value;

use super::envoy_filter::{CLUSTER_MESSAGE, PatchContext, check_value};
use super::error::Error;

const CLUSTER_TYPE_URL: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const CLUSTERS_DUMP_TYPE_URL: &str = "type.googleapis.com/envoy.admin.v3.ClustersConfigDump";

/// Merges `src` into `dst` as istiod merges an EnvoyFilter value (see the module documentation).
pub fn merge(dst: &mut DynamicMessage, src: &DynamicMessage) -> Result<(), Error> {
    let (d, s) = (dst.descriptor(), src.descriptor());
    if d.full_name() != s.full_name() {
        return Err(Error::Merge(format!("cannot merge a {} into a {}", s.full_name(), d.full_name())));
    }
    merge_message(dst, src);
    Ok(())
}

fn merge_message(dst: &mut DynamicMessage, src: &DynamicMessage) {
    for (field, value) in src.fields() {
        match value {
            PValue::List(items) => {
                if let PValue::List(list) = dst.get_field_mut(&field) {
                    list.extend(items.iter().cloned());
                }
            }
            PValue::Map(entries) => {
                if let PValue::Map(map) = dst.get_field_mut(&field) {
                    for (k, v) in entries {
                        map.insert(k.clone(), v.clone());
                    }
                }
            }
            PValue::Message(m) => {
                let replace = matches!(field.kind(), Kind::Message(d) if d.full_name() == "google.protobuf.Duration");
                if replace {
                    dst.set_field(&field, value.clone());
                } else if let PValue::Message(target) = dst.get_field_mut(&field) {
                    merge_message(target, m);
                }
            }
            _ => dst.set_field(&field, value.clone()),
        }
    }
}

/// Parses a cluster (proto3 JSON; a top-level `@type` of Cluster, as config dumps print it, is allowed).
pub fn parse_cluster(what: &str, cluster: &Value) -> Result<DynamicMessage, Error> {
    let mut cluster = cluster.clone();
    if let Value::Object(m) = &mut cluster
        && m.get("@type").and_then(Value::as_str) == Some(CLUSTER_TYPE_URL)
    {
        m.remove("@type");
    }
    check_value(what, CLUSTER_MESSAGE, &cluster)
}

/// A message as proto3 JSON with Envoy's (proto) field names.
pub fn to_json(message: &DynamicMessage) -> Result<Value, Error> {
    let options = SerializeOptions::new().use_proto_field_name(true);
    message.serialize_with_options(serde_json::value::Serializer, &options).map_err(|e| Error::Serialize(e.to_string()))
}

/// `cluster` (proto3 JSON) after istiod merges `patch_value` into it.
pub fn merge_json(cluster: &Value, patch_value: &Value) -> Result<Value, Error> {
    let mut dst = parse_cluster("the cluster", cluster)?;
    let src = check_value("the patch value", CLUSTER_MESSAGE, patch_value)?;
    merge(&mut dst, &src)?;
    to_json(&dst)
}

/// istiod's `ParseSubsetKey`: (direction, port, subset, host) of a cluster name; parts it cannot find are
/// empty (port 0).
pub fn parse_subset_key(name: &str) -> (&str, u16, &str, &str) {
    let sep = if name.starts_with("outbound_") || name.starts_with("inbound_") { "_." } else { "|" };
    let Some((direction, rest)) = name.split_once(sep) else { return ("", 0, "", "") };
    let Some((port, rest)) = rest.split_once(sep) else { return (direction, 0, "", "") };
    let port = port.parse().unwrap_or(0);
    let Some((subset, host)) = rest.split_once(sep) else { return (direction, port, "", "") };
    if host.contains(sep) {
        return (direction, port, subset, "");
    }
    (direction, port, subset, host)
}

/// Whether a patch's `match.cluster` (JSON; null: any cluster) matches the outbound cluster `name`, as
/// istiod decides it.
pub fn cluster_matches(cluster_match: &Value, name: &str) -> bool {
    if cluster_match.is_null() {
        return true;
    }
    if let Some(n) = cluster_match["name"].as_str().filter(|n| !n.is_empty()) {
        return n == name;
    }
    let (_, port, subset, host) = parse_subset_key(name);
    if let Some(s) = cluster_match["subset"].as_str().filter(|s| !s.is_empty())
        && s != subset
    {
        return false;
    }
    if let Some(s) = cluster_match["service"].as_str().filter(|s| !s.is_empty())
        && s != host
    {
        return false;
    }
    match cluster_match["portNumber"].as_u64().filter(|p| *p != 0) {
        Some(p) => p == u64::from(port),
        None => true,
    }
}

/// The clusters of `dump`: a JSON array of clusters (`istioctl proxy-config cluster POD -o json`), or an
/// Envoy / istiod config dump (`configs[]` with a `ClustersConfigDump`: its static, active and warming
/// clusters).
pub fn clusters_of(dump: &Value) -> Result<Vec<Value>, Error> {
    if let Some(list) = dump.as_array() {
        return Ok(list.clone());
    }
    let configs = dump["configs"]
        .as_array()
        .ok_or_else(|| Error::Preview("expected a JSON array of clusters or a config dump with `configs`".into()))?;
    let mut out = Vec::new();
    for c in configs.iter().filter(|c| c["@type"] == CLUSTERS_DUMP_TYPE_URL) {
        for section in ["static_clusters", "dynamic_active_clusters", "dynamic_warming_clusters"] {
            for entry in c[section].as_array().into_iter().flatten() {
                out.push(entry["cluster"].clone());
            }
        }
    }
    if out.is_empty() {
        return Err(Error::Preview("the config dump has no clusters".into()));
    }
    Ok(out)
}

/// Applies the MERGE patches of `context` in `objects` (EnvoyFilters, in order) to `clusters`, as istiod
/// would for a proxy that every filter applies to. Returns each cluster (proto3 JSON, normalized through
/// the descriptor pool) with the number of patches merged into it.
pub fn preview(objects: &[Value], context: PatchContext, clusters: &[Value]) -> Result<Vec<(Value, usize)>, Error> {
    let patches: Vec<(&Value, DynamicMessage)> = objects
        .iter()
        .filter(|o| o["kind"] == "EnvoyFilter")
        .flat_map(|o| o["spec"]["configPatches"].as_array().into_iter().flatten())
        .filter(|p| p["patch"]["operation"] == "MERGE" && p["match"]["context"] == context.as_istio())
        .map(|p| Ok((&p["match"]["cluster"], check_value("patch", CLUSTER_MESSAGE, &p["patch"]["value"])?)))
        .collect::<Result<_, Error>>()?;
    let mut out = Vec::new();
    for (i, cluster) in clusters.iter().enumerate() {
        let mut c = parse_cluster(&format!("cluster [{i}]"), cluster)?;
        let name = c.get_field_by_name("name").and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        let mut applied = 0;
        for (m, value) in &patches {
            if cluster_matches(m, &name) {
                merge(&mut c, value)?;
                applied += 1;
            }
        }
        out.push((to_json(&c)?, applied));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NAME: &str = "outbound|9080||reviews.shop.svc.cluster.local";

    fn istiod_cluster() -> Value {
        json!({
            "@type": CLUSTER_TYPE_URL,
            "name": NAME,
            "type": "EDS",
            "eds_cluster_config": {
                "eds_config": { "ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3" },
                "service_name": NAME
            },
            "connect_timeout": "10.500s",
            "lb_policy": "LEAST_REQUEST",
            "common_lb_config": { "zone_aware_lb_config": { "min_cluster_size": "6" } },
            "outlier_detection": { "consecutive_5xx": 3, "interval": "1s" },
            "metadata": { "filter_metadata": { "istio": { "services": [{ "host": "reviews.shop.svc.cluster.local" }] } } },
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": { "http2_protocol_options": { "max_concurrent_streams": 7 } }
                }
            },
            "transport_socket_matches": [{ "name": "tlsMode-istio", "match": { "tlsMode": "istio" } }]
        })
    }

    #[test]
    fn merge_follows_istiod_semantics() {
        let patch = json!({
            "eds_cluster_config": {
                "eds_config": {
                    "api_config_source": {
                        "api_type": "DELTA_GRPC",
                        "transport_api_version": "V3",
                        "grpc_services": [{ "envoy_grpc": { "cluster_name": "meshfed-xds" } }]
                    },
                    "initial_fetch_timeout": "15s",
                    "resource_api_version": "V3"
                }
            },
            // a Duration replaces: 10.5s + 2s is 2s, not 2.5s
            "connect_timeout": "2s",
            // a oneof member replaces the other one
            "common_lb_config": { "locality_weighted_lb_config": {} },
            // a message merges field by field
            "outlier_detection": { "max_ejection_percent": 100 },
            // lists append
            "transport_socket_matches": [{ "name": "extra", "match": {} }],
            // map entries replace (the http2 options' max_concurrent_streams is gone)
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": { "http_protocol_options": {} }
                }
            }
        });
        let merged = merge_json(&istiod_cluster(), &patch).unwrap();
        let eds = &merged["eds_cluster_config"];
        assert_eq!(eds["service_name"], NAME, "kept");
        assert!(eds["eds_config"].get("ads").is_none(), "{merged:#}");
        assert_eq!(eds["eds_config"]["api_config_source"]["api_type"], "DELTA_GRPC");
        assert_eq!(eds["eds_config"]["initial_fetch_timeout"], "15s");
        assert_eq!(merged["connect_timeout"], "2s");
        assert_eq!(merged["common_lb_config"], json!({ "locality_weighted_lb_config": {} }));
        assert_eq!(
            merged["outlier_detection"],
            json!({ "consecutive_5xx": 3, "interval": "1s", "max_ejection_percent": 100 })
        );
        let names: Vec<&str> = merged["transport_socket_matches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["tlsMode-istio", "extra"]);
        let opts =
            &merged["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
        assert_eq!(opts["explicit_http_config"], json!({ "http_protocol_options": {} }));
        assert_eq!(merged["lb_policy"], "LEAST_REQUEST");
        assert_eq!(merged["metadata"], istiod_cluster()["metadata"]);
    }

    #[test]
    fn merge_refuses_different_messages() {
        let pool = crate::descriptors::pool();
        let mut c = DynamicMessage::new(pool.get_message_by_name(CLUSTER_MESSAGE).unwrap());
        let l = DynamicMessage::new(pool.get_message_by_name("envoy.config.listener.v3.Listener").unwrap());
        assert!(merge(&mut c, &l).unwrap_err().to_string().contains("Listener"));
    }

    #[test]
    fn subset_keys_parse_as_istiod_parses_them() {
        assert_eq!(parse_subset_key(NAME), ("outbound", 9080, "", "reviews.shop.svc.cluster.local"));
        assert_eq!(
            parse_subset_key("outbound|9080|v1|r.shop.svc.cluster.local"),
            ("outbound", 9080, "v1", "r.shop.svc.cluster.local")
        );
        assert_eq!(
            parse_subset_key("outbound_.9080_._.r.shop.svc.cluster.local"),
            ("outbound", 9080, "", "r.shop.svc.cluster.local")
        );
        assert_eq!(
            parse_subset_key("outbound_.9080_.v1_.r.shop.svc.cluster.local"),
            ("outbound", 9080, "v1", "r.shop.svc.cluster.local")
        );
        assert_eq!(parse_subset_key("inbound|9080||"), ("inbound", 9080, "", ""));
        assert_eq!(parse_subset_key("BlackHoleCluster"), ("", 0, "", ""));
        assert_eq!(parse_subset_key("outbound|x|a|b|c"), ("outbound", 0, "a", ""));
    }

    #[test]
    fn service_matches_cover_subsets_and_names_do_not() {
        let svc = json!({ "service": "reviews.shop.svc.cluster.local", "portNumber": 9080 });
        for name in [
            NAME,
            "outbound|9080|v1|reviews.shop.svc.cluster.local",
            "outbound|9080|v2|reviews.shop.svc.cluster.local",
            "outbound_.9080_._.reviews.shop.svc.cluster.local",
            "outbound_.9080_.v1_.reviews.shop.svc.cluster.local",
        ] {
            assert!(cluster_matches(&svc, name), "{name}");
        }
        for name in [
            "outbound|9091||reviews.shop.svc.cluster.local",
            "outbound|9080||ratings.shop.svc.cluster.local",
            "outbound|9080||reviews.shop.svc.cluster.local.other",
            "inbound|9080||",
            "BlackHoleCluster",
        ] {
            assert!(!cluster_matches(&svc, name), "{name}");
        }
        let exact = json!({ "name": NAME });
        assert!(cluster_matches(&exact, NAME));
        assert!(!cluster_matches(&exact, "outbound|9080|v1|reviews.shop.svc.cluster.local"));
        let subset = json!({ "service": "reviews.shop.svc.cluster.local", "subset": "v1" });
        assert!(cluster_matches(&subset, "outbound|9091|v1|reviews.shop.svc.cluster.local"));
        assert!(!cluster_matches(&subset, NAME));
        assert!(cluster_matches(&Value::Null, "anything"));
    }

    #[test]
    fn clusters_come_from_lists_and_config_dumps() {
        let c = istiod_cluster();
        assert_eq!(clusters_of(&json!([c.clone()])).unwrap(), vec![c.clone()]);
        let dump = json!({ "configs": [
            { "@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump" },
            { "@type": CLUSTERS_DUMP_TYPE_URL, "static_clusters": [{ "cluster": { "name": "a" } }],
              "dynamic_active_clusters": [{ "cluster": c.clone() }], "dynamic_warming_clusters": [{ "cluster": { "name": "w" } }] }
        ]});
        let got = clusters_of(&dump).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[1], c);
        assert!(clusters_of(&json!({ "configs": [] })).is_err());
        assert!(clusters_of(&json!("x")).is_err());
    }
}
