//! `meshfed bootstrap`: renders the Envoy bootstrap that points a proxy at meshfed's ADS server, after
//! validating its inputs (the node id with [`crate::node_id`]).
//!
//! The bootstrap is built as a [`serde_json::Value`] and serialized with `serde_yaml`, so every
//! user-supplied string (node id, labels, locality, ...) is quoted correctly whatever it contains.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Map, Value, json};

use crate::model::Locality;
use crate::node_id::is_dns1123_subdomain;

// at their paths from before node ids moved to `crate::node_id` and the interception mode to
// `crate::proxy` (the CLI, the fuzz targets and the xDS streams name them here)
use crate::node_id::parse_node_id;
use crate::proxy::{InterceptionMode, RouterMode};

/// The Istio version meshfed reports in node metadata (`ISTIO_VERSION`).
pub const ISTIO_VERSION: &str = "1.24.0-meshfed";
/// Default address of meshfed's ADS server.
pub const DEFAULT_XDS_ADDRESS: &str = "127.0.0.1:15010";
/// Default Envoy admin port (bound on 127.0.0.1).
pub const DEFAULT_ADMIN_PORT: u16 = 15000;
/// Name of the static cluster that carries ADS.
pub const XDS_CLUSTER: &str = "xds-grpc";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    NodeId(#[from] crate::node_id::Error),
    #[error("invalid xDS address {address:?}: {reason} (expected HOST:PORT)")]
    XdsAddress { address: String, reason: String },
    #[error("invalid locality {locality:?}: {reason} (expected REGION[/ZONE[/SUBZONE]])")]
    Locality { locality: String, reason: String },
    #[error("invalid {what}: {reason}")]
    Metadata { what: &'static str, reason: String },
    #[error("cannot serialize the bootstrap: {0}")]
    Serialize(#[from] serde_yaml::Error),
    #[error("xDS TLS: {0}")]
    XdsTls(String),
}

/// Everything `meshfed bootstrap` needs to render an Envoy bootstrap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapOptions {
    /// Istio node id, e.g. `sidecar~127.0.50.1~client-0.shop~shop.svc.cluster.local`
    pub node_id: String,
    /// HOST:PORT of meshfed's ADS server (IPv6 literals in brackets), default [`DEFAULT_XDS_ADDRESS`]
    pub xds_address: String,
    /// use `DELTA_GRPC` instead of `GRPC` (state of the world)
    pub delta: bool,
    /// admin listens on 127.0.0.1:admin_port, default [`DEFAULT_ADMIN_PORT`]
    pub admin_port: u16,
    /// node metadata `CLUSTER_ID`
    pub cluster_id: Option<String>,
    /// node metadata `NETWORK`
    pub network: Option<String>,
    /// `REGION[/ZONE[/SUBZONE]]`, rendered as `node.locality`
    pub locality: Option<String>,
    /// node metadata `INTERCEPTION_MODE`
    pub interception_mode: InterceptionMode,
    /// node metadata `ROUTER_MODE` (router node ids only): `sni-dnat` for an east-west gateway; unset or
    /// `standard`, an ingress gateway
    pub router_mode: Option<RouterMode>,
    /// node metadata `LABELS`
    pub labels: BTreeMap<String, String>,
    /// mesh certificates as files, served to Envoy as the static secrets `default` and `ROOTCA` (what
    /// Istio's agent would serve over SDS); None: no mesh mTLS (`MESHFED_TLS: none`)
    pub tls: Option<TlsFiles>,
    /// where the workload listens for inbound traffic (node metadata `MESHFED_INBOUND_ADDRESS`)
    pub inbound_address: Option<IpAddr>,
    /// TLS to meshfed's xDS server (None: plaintext)
    pub xds_tls: Option<XdsTls>,
}

/// TLS from Envoy to meshfed's xDS server: an `UpstreamTlsContext` on the `xds-grpc` cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsTls {
    /// PEM CA bundle that issued meshfed's server certificate
    pub ca: std::path::PathBuf,
    /// PEM certificate chain and key Envoy presents (mTLS), when meshfed requires client certificates
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// SNI, and the DNS name meshfed's certificate must carry; default: the xDS address's host name
    /// (for an IP address: no SNI, and the certificate must carry the IP)
    pub sni: Option<String>,
}

/// PEM files of a workload's mesh identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_chain: std::path::PathBuf,
    pub private_key: std::path::PathBuf,
    pub root_cert: std::path::PathBuf,
}

impl BootstrapOptions {
    /// Options with every default for `node_id`.
    pub fn new(node_id: impl Into<String>) -> Self {
        BootstrapOptions {
            node_id: node_id.into(),
            xds_address: DEFAULT_XDS_ADDRESS.to_string(),
            delta: false,
            admin_port: DEFAULT_ADMIN_PORT,
            cluster_id: None,
            network: None,
            locality: None,
            interception_mode: InterceptionMode::default(),
            router_mode: None,
            labels: BTreeMap::new(),
            tls: None,
            inbound_address: None,
            xds_tls: None,
        }
    }
}

/// Parses `REGION[/ZONE[/SUBZONE]]`: one to three non-empty parts without whitespace or control
/// characters. Missing parts are empty in the result.
pub fn parse_locality(s: &str) -> Result<Locality, Error> {
    let err = |reason: String| Error::Locality { locality: s.to_string(), reason };
    let parts: Vec<&str> = s.split('/').collect();
    if parts.len() > 3 {
        return Err(err(format!("has {} `/`-separated parts, at most 3 allowed", parts.len())));
    }
    const NAMES: [&str; 3] = ["region", "zone", "subzone"];
    for (part, name) in parts.iter().zip(NAMES) {
        if part.is_empty() {
            return Err(err(format!("{name} is empty")));
        }
        if part.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err(format!("{name} {part:?} contains whitespace or control characters")));
        }
    }
    let get = |i: usize| parts.get(i).copied().unwrap_or("");
    Ok(Locality::new(get(0), get(1), get(2)))
}

/// Where the ADS server is, as the `xds-grpc` cluster needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsAddress {
    /// an IP literal (without brackets) or a DNS name
    pub host: String,
    pub port: u16,
    /// `Some` when `host` is an IP literal (cluster type STATIC), `None` for a name (STRICT_DNS)
    pub ip: Option<IpAddr>,
}

/// Parses `HOST:PORT`: HOST an IPv4 address, a bracketed IPv6 address (`[::1]:15010`) or a DNS
/// name; PORT a non-zero decimal port.
pub fn parse_xds_address(s: &str) -> Result<XdsAddress, Error> {
    let err = |reason: &str| Error::XdsAddress { address: s.to_string(), reason: reason.to_string() };
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(err("no `:PORT`"));
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("port is not a number"));
    }
    let port: u16 = port.parse().map_err(|_| err("port is out of range"))?;
    if port == 0 {
        return Err(err("port 0"));
    }
    if host.is_empty() {
        return Err(err("empty host"));
    }
    if let Some(inner) = host.strip_prefix('[') {
        let Some(inner) = inner.strip_suffix(']') else {
            return Err(err("unterminated `[` in host"));
        };
        let ip: std::net::Ipv6Addr = inner.parse().map_err(|_| err("bracketed host is not an IPv6 address"))?;
        return Ok(XdsAddress { host: inner.to_string(), port, ip: Some(IpAddr::V6(ip)) });
    }
    if host.contains(':') {
        return Err(err("IPv6 addresses must be in brackets, e.g. [::1]:15010"));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(XdsAddress { host: host.to_string(), port, ip: Some(ip) });
    }
    if !is_dns_name(host) {
        return Err(err("host is neither an IP address nor a valid DNS name"));
    }
    Ok(XdsAddress { host: host.to_string(), port, ip: None })
}

/// Renders the Envoy bootstrap as YAML.
pub fn render(opts: &BootstrapOptions) -> Result<String, Error> {
    let Value::Object(mut top) = render_json(opts)? else { unreachable!("the bootstrap is an object") };
    // serde_json sorts keys; put the top-level sections in reading order (node first).
    let mut ordered = serde_yaml::Mapping::new();
    for key in TOP_LEVEL_ORDER {
        if let Some(v) = top.remove(*key) {
            ordered.insert(serde_yaml::Value::from(*key), serde_yaml::to_value(v)?);
        }
    }
    for (key, v) in top {
        ordered.insert(serde_yaml::Value::from(key), serde_yaml::to_value(v)?);
    }
    Ok(serde_yaml::to_string(&ordered)?)
}

const TOP_LEVEL_ORDER: &[&str] =
    &["node", "dynamic_resources", "static_resources", "admin", "layered_runtime", "overload_manager"];

/// Renders the Envoy bootstrap as a JSON value (what [`render`] serializes).
pub fn render_json(opts: &BootstrapOptions) -> Result<Value, Error> {
    let node_id = parse_node_id(&opts.node_id)?;
    let xds = parse_xds_address(&opts.xds_address)?;
    let locality = opts.locality.as_deref().map(parse_locality).transpose()?;
    let cluster_id = non_empty("CLUSTER_ID", opts.cluster_id.as_deref())?;
    let network = non_empty("NETWORK", opts.network.as_deref())?;
    if opts.labels.keys().any(|k| k.is_empty()) {
        return Err(Error::Metadata { what: "LABELS", reason: "a label has an empty key".to_string() });
    }

    let mut metadata = Map::new();
    metadata.insert("ISTIO_VERSION".into(), json!(ISTIO_VERSION));
    if let Some(cluster_id) = cluster_id {
        metadata.insert("CLUSTER_ID".into(), json!(cluster_id));
    }
    if let Some(network) = network {
        metadata.insert("NETWORK".into(), json!(network));
    }
    metadata.insert("NAMESPACE".into(), json!(node_id.namespace));
    metadata.insert("INSTANCE_IPS".into(), json!(node_id.ip.to_string()));
    metadata.insert("INTERCEPTION_MODE".into(), json!(opts.interception_mode.as_str()));
    if let Some(mode) = opts.router_mode {
        if node_id.proxy_type != "router" {
            return Err(Error::Metadata {
                what: "ROUTER_MODE",
                reason: format!("a router mode is for router node ids, not {:?}", node_id.proxy_type),
            });
        }
        metadata.insert("ROUTER_MODE".into(), json!(mode.as_str()));
    }
    metadata.insert("WORKLOAD_NAME".into(), json!(node_id.pod));
    metadata.insert("MESHFED_TLS".into(), json!(if opts.tls.is_some() { "static" } else { "none" }));
    if let Some(a) = opts.inbound_address {
        metadata.insert("MESHFED_INBOUND_ADDRESS".into(), json!(a.to_string()));
    }
    if !opts.labels.is_empty() {
        metadata.insert("LABELS".into(), json!(opts.labels));
    }

    let mut node = Map::new();
    node.insert("id".into(), json!(opts.node_id));
    node.insert("cluster".into(), json!(node_id.pod_dot_namespace()));
    if let Some(l) = &locality {
        let mut loc = Map::new();
        for (key, value) in [("region", &l.region), ("zone", &l.zone), ("sub_zone", &l.subzone)] {
            if !value.is_empty() {
                loc.insert(key.into(), json!(value.as_ref()));
            }
        }
        node.insert("locality".into(), Value::Object(loc));
    }
    node.insert("metadata".into(), Value::Object(metadata));

    let ads_source = json!({ "ads": {}, "resource_api_version": "V3" });
    let mut xds_cluster = json!({
        "name": XDS_CLUSTER,
        "type": if xds.ip.is_some() { "STATIC" } else { "STRICT_DNS" },
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [{
                "lb_endpoints": [{
                    "endpoint": {
                        "address": { "socket_address": { "address": xds.host, "port_value": xds.port } }
                    }
                }]
            }]
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {
                        "connection_keepalive": { "interval": "30s", "timeout": "10s" }
                    }
                }
            }
        },
        "upstream_connection_options": {
            "tcp_keepalive": { "keepalive_time": 300, "keepalive_interval": 30, "keepalive_probes": 3 }
        }
    });
    if xds.ip.is_none() {
        // only the first family that resolves: a name like `localhost` must not become two endpoints
        xds_cluster["dns_lookup_family"] = json!("V4_PREFERRED");
    }
    if let Some(tls) = &opts.xds_tls {
        xds_cluster["transport_socket"] = xds_transport_socket(tls, &xds)?;
    }

    let mut static_resources = json!({ "clusters": [xds_cluster] });
    if let Some(tls) = &opts.tls {
        let file = |p: &std::path::Path| json!({ "filename": p.to_string_lossy() });
        static_resources["secrets"] = json!([
            {
                "name": "default",
                "tls_certificate": { "certificate_chain": file(&tls.cert_chain), "private_key": file(&tls.private_key) }
            },
            { "name": "ROOTCA", "validation_context": { "trusted_ca": file(&tls.root_cert) } }
        ]);
    }
    Ok(json!({
        "node": node,
        "dynamic_resources": {
            "ads_config": {
                "api_type": if opts.delta { "DELTA_GRPC" } else { "GRPC" },
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{ "envoy_grpc": { "cluster_name": XDS_CLUSTER } }]
            },
            "cds_config": ads_source.clone(),
            "lds_config": ads_source
        },
        "static_resources": static_resources,
        "admin": {
            "address": { "socket_address": { "address": "127.0.0.1", "port_value": opts.admin_port } }
        },
        "layered_runtime": {
            "layers": [
                { "name": "static", "static_layer": {} },
                { "name": "admin", "admin_layer": {} }
            ]
        },
        // An effectively unlimited connection cap, as Istio sets: without any limit Envoy warns at startup.
        "overload_manager": {
            "resource_monitors": [{
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": DOWNSTREAM_CONNECTIONS_TYPE,
                    "max_active_downstream_connections": 2147483647
                }
            }]
        }
    }))
}

const UPSTREAM_TLS_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// The `xds-grpc` cluster's TLS: trust `ca`, present the client certificate if any, send SNI, and
/// check that meshfed's certificate names the server (its DNS name, else its IP address): Envoy checks
/// only the chain unless told which names to expect.
fn xds_transport_socket(tls: &XdsTls, xds: &XdsAddress) -> Result<Value, Error> {
    let file = |p: &std::path::Path| json!({ "filename": p.to_string_lossy() });
    let sni = match &tls.sni {
        Some(s) if !is_dns_name(s) => {
            return Err(Error::XdsTls(format!("--xds-sni {s:?} is not a DNS name")));
        }
        Some(s) => Some(s.clone()),
        None if xds.ip.is_none() => Some(xds.host.trim_end_matches('.').to_string()),
        None => None,
    };
    let san = match (&sni, xds.ip) {
        (Some(name), _) => json!({ "san_type": "DNS", "matcher": { "exact": name } }),
        (None, Some(ip)) => json!({ "san_type": "IP_ADDRESS", "matcher": { "exact": ip.to_string() } }),
        (None, None) => return Err(Error::XdsTls("no name to check meshfed's certificate against".into())),
    };
    let mut common = json!({
        "alpn_protocols": ["h2"],
        "validation_context": { "trusted_ca": file(&tls.ca), "match_typed_subject_alt_names": [san] }
    });
    if let Some((cert, key)) = &tls.client_cert {
        common["tls_certificates"] = json!([{ "certificate_chain": file(cert), "private_key": file(key) }]);
    }
    let mut context = json!({ "@type": UPSTREAM_TLS_TYPE, "common_tls_context": common });
    if let Some(sni) = sni {
        context["sni"] = json!(sni);
    }
    Ok(json!({ "name": "envoy.transport_sockets.tls", "typed_config": context }))
}

const DOWNSTREAM_CONNECTIONS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig";

fn non_empty<'a>(what: &'static str, v: Option<&'a str>) -> Result<Option<&'a str>, Error> {
    match v {
        Some("") => Err(Error::Metadata { what, reason: "empty value".to_string() }),
        v => Ok(v),
    }
}

/// A DNS host name for the xDS server: like a DNS-1123 subdomain but case-insensitive, and a
/// trailing dot (fully qualified) is allowed.
fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    is_dns1123_subdomain(&s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "sidecar~127.0.50.1~client-0.shop~shop.svc.cluster.local";

    #[test]
    fn parses_localities() {
        assert_eq!(parse_locality("us-east-1").unwrap(), Locality::new("us-east-1", "", ""));
        assert_eq!(parse_locality("us-east-1/use1-az1").unwrap(), Locality::new("us-east-1", "use1-az1", ""));
        assert_eq!(parse_locality("eastus/eastus-1/rack7").unwrap(), Locality::new("eastus", "eastus-1", "rack7"));
        for bad in ["", "/", "a/", "/b", "a//c", "a/b/c/d", "a/b c", "a/b/"] {
            assert!(matches!(parse_locality(bad), Err(Error::Locality { .. })), "{bad:?}");
        }
        assert!(parse_locality("a/b/c/d").unwrap_err().to_string().contains("at most 3"));
    }

    #[test]
    fn parses_xds_addresses() {
        let a = parse_xds_address("127.0.0.1:15010").unwrap();
        assert_eq!((a.host.as_str(), a.port, a.ip), ("127.0.0.1", 15010, Some("127.0.0.1".parse().unwrap())));
        let a = parse_xds_address("[::1]:15012").unwrap();
        assert_eq!((a.host.as_str(), a.port, a.ip), ("::1", 15012, Some("::1".parse().unwrap())));
        let a = parse_xds_address("meshfed.meshfed-system.svc:15010").unwrap();
        assert_eq!((a.host.as_str(), a.port, a.ip), ("meshfed.meshfed-system.svc", 15010, None));
        assert!(parse_xds_address("Localhost.:1").unwrap().ip.is_none());
        for bad in [
            "",
            "127.0.0.1",
            "127.0.0.1:",
            ":15010",
            "127.0.0.1:abc",
            "127.0.0.1:+1",
            "127.0.0.1:70000",
            "127.0.0.1:0",
            "::1:15010",
            "[::1:15010",
            "[127.0.0.1]:15010",
            "bad host:15010",
            "a_b:15010",
            "-x:1",
        ] {
            assert!(matches!(parse_xds_address(bad), Err(Error::XdsAddress { .. })), "{bad:?}");
        }
    }

    fn rendered(opts: &BootstrapOptions) -> serde_yaml::Value {
        serde_yaml::from_str(&render(opts).unwrap()).unwrap()
    }

    fn s<'a>(v: &'a serde_yaml::Value, path: &[&str]) -> &'a str {
        let mut v = v;
        for p in path {
            v = v.get(p).unwrap_or_else(|| panic!("missing {p} in {path:?}"));
        }
        v.as_str().unwrap_or_else(|| panic!("{path:?} is not a string: {v:?}"))
    }

    #[test]
    fn renders_api_type_for_sotw_and_delta() {
        let mut opts = BootstrapOptions::new(ID);
        let y = rendered(&opts);
        assert_eq!(s(&y, &["dynamic_resources", "ads_config", "api_type"]), "GRPC");
        opts.delta = true;
        let y = rendered(&opts);
        let ads = &y["dynamic_resources"]["ads_config"];
        assert_eq!(s(ads, &["api_type"]), "DELTA_GRPC");
        assert_eq!(s(ads, &["transport_api_version"]), "V3");
        assert_eq!(ads["set_node_on_first_message_only"], serde_yaml::Value::Bool(true));
        assert_eq!(s(&ads["grpc_services"][0], &["envoy_grpc", "cluster_name"]), "xds-grpc");
        for source in ["cds_config", "lds_config"] {
            assert_eq!(s(&y, &["dynamic_resources", source, "resource_api_version"]), "V3");
            assert!(y["dynamic_resources"][source]["ads"].is_mapping());
        }
    }

    #[test]
    fn renders_node_and_metadata() {
        let mut opts = BootstrapOptions::new(ID);
        opts.cluster_id = Some("aws-use1".into());
        opts.network = Some("aws-net".into());
        opts.interception_mode = InterceptionMode::Redirect;
        opts.labels.insert("app".into(), "client".into());
        let y = rendered(&opts);
        let node = &y["node"];
        assert_eq!(s(node, &["id"]), ID);
        assert_eq!(s(node, &["cluster"]), "client-0.shop");
        assert!(node.get("locality").is_none());
        let md = &node["metadata"];
        assert_eq!(s(md, &["ISTIO_VERSION"]), ISTIO_VERSION);
        assert_eq!(s(md, &["CLUSTER_ID"]), "aws-use1");
        assert_eq!(s(md, &["NETWORK"]), "aws-net");
        assert_eq!(s(md, &["NAMESPACE"]), "shop");
        assert_eq!(s(md, &["INSTANCE_IPS"]), "127.0.50.1");
        assert_eq!(s(md, &["INTERCEPTION_MODE"]), "REDIRECT");
        assert_eq!(s(md, &["WORKLOAD_NAME"]), "client-0");
        assert_eq!(s(md, &["LABELS", "app"]), "client");

        let y = rendered(&BootstrapOptions::new(ID));
        let md = &y["node"]["metadata"];
        assert_eq!(s(md, &["INTERCEPTION_MODE"]), "NONE");
        for absent in ["CLUSTER_ID", "NETWORK", "LABELS", "ROUTER_MODE"] {
            assert!(md.get(absent).is_none(), "{absent}");
        }
    }

    #[test]
    fn a_router_mode_is_rendered_for_routers_only() {
        let mut opts =
            BootstrapOptions::new("router~127.0.20.1~eastwest-0.istio-system~istio-system.svc.cluster.local");
        opts.router_mode = Some(RouterMode::SniDnat);
        assert_eq!(s(&rendered(&opts)["node"]["metadata"], &["ROUTER_MODE"]), "sni-dnat");
        let mut sidecar = BootstrapOptions::new(ID);
        sidecar.router_mode = Some(RouterMode::Standard);
        let err = render(&sidecar).unwrap_err().to_string();
        assert!(err.contains("ROUTER_MODE") && err.contains("router node ids"), "{err}");
    }

    #[test]
    fn renders_locality() {
        let mut opts = BootstrapOptions::new(ID);
        opts.locality = Some("us-east-1/use1-az1/rack-7".into());
        let y = rendered(&opts);
        let l = &y["node"]["locality"];
        assert_eq!((s(l, &["region"]), s(l, &["zone"]), s(l, &["sub_zone"])), ("us-east-1", "use1-az1", "rack-7"));

        opts.locality = Some("eastus/eastus-2".into());
        let y = rendered(&opts);
        let l = &y["node"]["locality"];
        assert_eq!((s(l, &["region"]), s(l, &["zone"])), ("eastus", "eastus-2"));
        assert!(l.get("sub_zone").is_none());

        opts.locality = Some("a//c".into());
        assert!(matches!(render(&opts), Err(Error::Locality { .. })));
    }

    #[test]
    fn escapes_special_characters() {
        let mut opts = BootstrapOptions::new(ID);
        let nasty = [
            ("app", "x: y\n- z # not a comment"),
            ("quote\"key'", "'single' \"double\" \\back"),
            ("yes", "no"),
            ("num", "0x10"),
            ("null", "~"),
            ("star", "*anchor &ref !tag"),
            ("braces", "{a: [b]}"),
            ("unicode", "ünï\u{1F600}\t"),
            ("leading space", " v "),
            ("empty", ""),
        ];
        for (k, v) in nasty {
            opts.labels.insert(k.into(), v.into());
        }
        opts.cluster_id = Some("true".into());
        opts.network = Some("net: {evil}".into());
        let y = rendered(&opts);
        let md = &y["node"]["metadata"];
        let labels = md["LABELS"].as_mapping().unwrap();
        assert_eq!(labels.len(), nasty.len());
        for (k, v) in nasty {
            assert_eq!(s(md, &["LABELS", k]), v, "label {k:?}");
        }
        assert_eq!(s(md, &["CLUSTER_ID"]), "true");
        assert_eq!(s(md, &["NETWORK"]), "net: {evil}");
    }

    #[test]
    fn renders_xds_cluster() {
        let y = rendered(&BootstrapOptions::new(ID));
        let c = &y["static_resources"]["clusters"][0];
        assert_eq!(s(c, &["name"]), "xds-grpc");
        assert_eq!(s(c, &["type"]), "STATIC");
        assert_eq!(s(c, &["connect_timeout"]), "1s");
        let sa = &c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
        assert_eq!(s(sa, &["address"]), "127.0.0.1");
        assert_eq!(sa["port_value"].as_u64(), Some(15010));
        let http = &c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
        let h2 = &http["explicit_http_config"]["http2_protocol_options"];
        assert_eq!(s(h2, &["connection_keepalive", "interval"]), "30s");
        assert!(c["upstream_connection_options"]["tcp_keepalive"].is_mapping());
        assert!(c.get("dns_lookup_family").is_none());
        let admin = &y["admin"]["address"]["socket_address"];
        assert_eq!((s(admin, &["address"]), admin["port_value"].as_u64()), ("127.0.0.1", Some(15000)));

        let mut opts = BootstrapOptions::new(ID);
        opts.xds_address = "meshfed.meshfed-system:15012".into();
        opts.admin_port = 19000;
        let y = rendered(&opts);
        let c = &y["static_resources"]["clusters"][0];
        assert_eq!(s(c, &["type"]), "STRICT_DNS");
        let sa = &c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
        assert_eq!(s(sa, &["address"]), "meshfed.meshfed-system");
        assert_eq!(sa["port_value"].as_u64(), Some(15012));
        assert_eq!(y["admin"]["address"]["socket_address"]["port_value"].as_u64(), Some(19000));

        opts.xds_address = "[::1]:15010".into();
        let y = rendered(&opts);
        let c = &y["static_resources"]["clusters"][0];
        assert_eq!(s(c, &["type"]), "STATIC");
        let sa = &c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
        assert_eq!(s(sa, &["address"]), "::1");
    }

    #[test]
    fn render_validates_inputs() {
        let mut opts = BootstrapOptions::new("sidecar~127.0.0.1~a.b~c.svc.cluster.local");
        assert!(matches!(render(&opts), Err(Error::NodeId(_))));
        opts.node_id = ID.into();
        opts.xds_address = "127.0.0.1".into();
        assert!(matches!(render(&opts), Err(Error::XdsAddress { .. })));
        opts.xds_address = DEFAULT_XDS_ADDRESS.into();
        opts.cluster_id = Some(String::new());
        assert!(matches!(render(&opts), Err(Error::Metadata { what: "CLUSTER_ID", .. })));
        opts.cluster_id = None;
        opts.labels.insert(String::new(), "v".into());
        assert!(matches!(render(&opts), Err(Error::Metadata { what: "LABELS", .. })));
    }

    #[test]
    fn renders_xds_tls() {
        let mut opts = BootstrapOptions::new(ID);
        let y = rendered(&opts);
        assert!(y["static_resources"]["clusters"][0].get("transport_socket").is_none(), "plaintext by default");

        opts.xds_address = "meshfed.istio-system.svc:15012".into();
        opts.xds_tls = Some(XdsTls {
            ca: "/etc/certs/root.pem".into(),
            client_cert: Some(("/etc/certs/cert.pem".into(), "/etc/certs/key.pem".into())),
            sni: None,
        });
        let y = rendered(&opts);
        let ts = &y["static_resources"]["clusters"][0]["transport_socket"];
        assert_eq!(s(ts, &["name"]), "envoy.transport_sockets.tls");
        let ctx = &ts["typed_config"];
        assert_eq!(s(ctx, &["@type"]), UPSTREAM_TLS_TYPE);
        assert_eq!(s(ctx, &["sni"]), "meshfed.istio-system.svc");
        let common = &ctx["common_tls_context"];
        assert_eq!(s(&common["alpn_protocols"][0], &[]), "h2");
        assert_eq!(s(common, &["validation_context", "trusted_ca", "filename"]), "/etc/certs/root.pem");
        let san = &common["validation_context"]["match_typed_subject_alt_names"][0];
        assert_eq!((s(san, &["san_type"]), s(san, &["matcher", "exact"])), ("DNS", "meshfed.istio-system.svc"));
        let cert = &common["tls_certificates"][0];
        assert_eq!(s(cert, &["certificate_chain", "filename"]), "/etc/certs/cert.pem");
        assert_eq!(s(cert, &["private_key", "filename"]), "/etc/certs/key.pem");

        // an IP address: no SNI, the certificate must carry the IP; --xds-sni overrides
        opts.xds_address = "127.0.0.1:15012".into();
        opts.xds_tls = Some(XdsTls { ca: "/ca.pem".into(), client_cert: None, sni: None });
        let y = rendered(&opts);
        let ctx = &y["static_resources"]["clusters"][0]["transport_socket"]["typed_config"];
        assert!(ctx.get("sni").is_none());
        assert!(ctx["common_tls_context"].get("tls_certificates").is_none());
        let san = &ctx["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"][0];
        assert_eq!((s(san, &["san_type"]), s(san, &["matcher", "exact"])), ("IP_ADDRESS", "127.0.0.1"));
        opts.xds_tls =
            Some(XdsTls { ca: "/ca.pem".into(), client_cert: None, sni: Some("istiod.istio-system.svc".into()) });
        let y = rendered(&opts);
        let ctx = &y["static_resources"]["clusters"][0]["transport_socket"]["typed_config"];
        assert_eq!(s(ctx, &["sni"]), "istiod.istio-system.svc");
        opts.xds_tls = Some(XdsTls { ca: "/ca.pem".into(), client_cert: None, sni: Some("bad name".into()) });
        assert!(matches!(render(&opts), Err(Error::XdsTls(_))));
    }
}
