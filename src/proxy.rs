//! A connected proxy as meshfed sees it: identity from the Istio node id ([`crate::node_id`]),
//! placement from node metadata, and what its config depends on: how traffic reaches it
//! ([`InterceptionMode`]) and how it gets mesh certificates ([`TlsSupport`]).
//!
//! Translation reads proxies; this module uses neither translation nor the bootstrap renderer.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind as ValueKind};
use serde::Serialize;

use crate::model::{ClusterId, Locality, NetworkId};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("the first request on a stream must carry a node")]
    MissingNode,
    #[error("{reason}")]
    InvalidNodeId { id: String, reason: String },
    #[error("invalid node metadata {key}: {reason}")]
    InvalidMetadata { key: &'static str, reason: String },
    /// An interception mode given by name (`meshfed bootstrap --interception-mode`) is not one.
    #[error("invalid interception mode {0:?} (expected NONE or REDIRECT)")]
    InterceptionMode(String),
}

/// What a proxy is, from the Istio node type (the first part of the node id) and, for `router` nodes,
/// the router mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyKind {
    /// an application sidecar (or a proxyless gRPC client, which uses the same id form)
    Sidecar,
    /// an east-west gateway: node type `router` with node metadata `ROUTER_MODE: sni-dnat` or a
    /// `REQUESTED_NETWORK_VIEW`, as Istio deploys them; it passes mTLS through by SNI to its own
    /// network's endpoints
    Router,
    /// any other `router`: an ingress (or egress) gateway, Istio's `ROUTER_MODE: standard` (its
    /// default). Its clusters and endpoints are a sidecar's outbound ones (every network, through the
    /// east-west gateways, under the traffic policy's decisions); standalone, its listeners are the
    /// sidecar's outbound listeners bound on its address.
    Ingress,
}

impl ProxyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyKind::Sidecar => "sidecar",
            ProxyKind::Router => "router",
            ProxyKind::Ingress => "ingress",
        }
    }

    /// Every kind, for counts.
    pub const ALL: [ProxyKind; 3] = [ProxyKind::Sidecar, ProxyKind::Router, ProxyKind::Ingress];

    /// The kind of a node: its type (`router` or anything else: a sidecar) and, for routers, node
    /// metadata `ROUTER_MODE` ([`RouterMode`], default standard) and `REQUESTED_NETWORK_VIEW`.
    pub fn of_node(node_type: &str, router_mode: Option<&str>, network_view: Option<&str>) -> Result<Self, Error> {
        if node_type != "router" {
            return Ok(ProxyKind::Sidecar);
        }
        let mode = match router_mode {
            None => RouterMode::Standard,
            Some(m) => RouterMode::from_str(m)?,
        };
        Ok(match mode {
            RouterMode::SniDnat => ProxyKind::Router,
            RouterMode::Standard if network_view.is_some() => ProxyKind::Router,
            RouterMode::Standard => ProxyKind::Ingress,
        })
    }
}

/// Istio's router modes (node metadata `ROUTER_MODE`, from `ISTIO_META_ROUTER_MODE`): `sni-dnat` on
/// east-west gateways, `standard` (the default) on ingress and egress gateways.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RouterMode {
    #[value(name = "standard")]
    Standard,
    #[value(name = "sni-dnat")]
    SniDnat,
}

impl RouterMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RouterMode::Standard => "standard",
            RouterMode::SniDnat => "sni-dnat",
        }
    }
}

impl FromStr for RouterMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "standard" => Ok(RouterMode::Standard),
            "sni-dnat" => Ok(RouterMode::SniDnat),
            other => Err(Error::InvalidMetadata {
                key: "ROUTER_MODE",
                reason: format!("{other:?} is not sni-dnat or standard"),
            }),
        }
    }
}

/// How inbound/outbound traffic reaches the proxy (node metadata `INTERCEPTION_MODE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum, serde::Serialize)]
pub enum InterceptionMode {
    /// No traffic capture: outbound listeners bind on the proxy IP.
    #[default]
    #[value(name = "NONE", alias = "none")]
    None,
    /// iptables REDIRECT capture.
    #[value(name = "REDIRECT", alias = "redirect")]
    Redirect,
}

impl InterceptionMode {
    pub fn as_str(self) -> &'static str {
        match self {
            InterceptionMode::None => "NONE",
            InterceptionMode::Redirect => "REDIRECT",
        }
    }
}

impl fmt::Display for InterceptionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for InterceptionMode {
    type Err = Error;

    /// Case-insensitive `NONE` / `REDIRECT`.
    fn from_str(s: &str) -> Result<Self, Error> {
        if s.eq_ignore_ascii_case("NONE") {
            Ok(InterceptionMode::None)
        } else if s.eq_ignore_ascii_case("REDIRECT") {
            Ok(InterceptionMode::Redirect)
        } else {
            Err(Error::InterceptionMode(s.to_string()))
        }
    }
}

/// How a proxy gets its mesh certificates (node metadata `MESHFED_TLS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum TlsSupport {
    /// no mesh certificates: plaintext only; other networks are unreachable (their gateways need mTLS)
    None,
    /// secrets `default` and `ROOTCA` are static secrets in the bootstrap (`meshfed bootstrap --tls-*`)
    Static,
    /// secrets come over SDS from Istio's agent (cluster `sds-grpc`), as in an Istio sidecar
    Agent,
}

/// Which xDS client this is, as far as it matters for the config it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientKind {
    Envoy,
    /// a proxyless gRPC client: node metadata `GENERATOR=grpc`, or a gRPC library's
    /// `node.user_agent_name` ("gRPC Python", "grpc-java", "grpc-go", "gRPC C-core", ...)
    Grpc,
    /// istioctl and other debug clients (GENERATOR=event)
    Debug,
}

/// A proxy connected over xDS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Proxy {
    /// the full node id
    pub id: Arc<str>,
    /// `<pod>.<namespace>`, the key debug endpoints use
    pub key: Arc<str>,
    pub kind: ProxyKind,
    pub client: ClientKind,
    pub ip: IpAddr,
    pub pod: Arc<str>,
    pub namespace: Arc<str>,
    pub cluster_id: Option<ClusterId>,
    /// NETWORK (or, for east-west gateways, REQUESTED_NETWORK_VIEW); empty when unset — the proxy's
    /// cluster's network is used then
    pub network: NetworkId,
    pub locality: Locality,
    pub interception: InterceptionMode,
    pub istio_version: Arc<str>,
    pub labels: BTreeMap<String, String>,
    /// how the proxy gets mesh certificates (`MESHFED_TLS`: none | static | agent; default agent for
    /// Envoy, as an Istio sidecar has its agent's SDS, and none for proxyless gRPC)
    pub tls: TlsSupport,
    /// where the workload listens, for inbound traffic (`MESHFED_INBOUND_ADDRESS`, default 127.0.0.1)
    pub inbound_address: IpAddr,
}

fn meta_str<'a>(meta: Option<&'a Struct>, key: &str) -> Option<&'a str> {
    match meta?.fields.get(key)?.kind.as_ref()? {
        ValueKind::StringValue(s) if !s.is_empty() => Some(s),
        _ => None,
    }
}

fn meta_labels(meta: Option<&Struct>) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    let Some(v) = meta.and_then(|m| m.fields.get("LABELS")) else { return Ok(out) };
    match &v.kind {
        Some(ValueKind::StructValue(s)) => {
            for (k, v) in &s.fields {
                match &v.kind {
                    Some(ValueKind::StringValue(s)) => {
                        out.insert(k.clone(), s.clone());
                    }
                    _ => {
                        return Err(Error::InvalidMetadata {
                            key: "LABELS",
                            reason: format!("label {k:?} is not a string"),
                        });
                    }
                }
            }
            Ok(out)
        }
        Some(ValueKind::NullValue(_)) | None => Ok(out),
        _ => Err(Error::InvalidMetadata { key: "LABELS", reason: "must be a map of strings".into() }),
    }
}

impl ClientKind {
    /// What a client is, by what its node says: metadata `GENERATOR` (`event`: istioctl and other debug
    /// clients; `grpc`: proxyless gRPC), else `user_agent_name` (gRPC libraries name themselves
    /// "gRPC ..." or "grpc-..."; Envoy says "envoy"). Never by the HTTP `user-agent` of the stream: any
    /// tool built on a gRPC library that presents an Envoy node gets Envoy's configuration.
    pub fn of_node(generator: Option<&str>, user_agent_name: &str) -> ClientKind {
        match generator {
            Some("event") => ClientKind::Debug,
            Some("grpc") => ClientKind::Grpc,
            _ if user_agent_name.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("grpc")) => ClientKind::Grpc,
            _ => ClientKind::Envoy,
        }
    }
}

impl Proxy {
    /// Builds a proxy from the node of a stream's first request.
    pub fn from_node(node: Option<&Node>) -> Result<Proxy, Error> {
        let node = node.ok_or(Error::MissingNode)?;
        let nid = crate::node_id::parse_node_id(&node.id)
            .map_err(|e| Error::InvalidNodeId { id: node.id.clone(), reason: e.to_string() })?;
        let meta = node.metadata.as_ref();
        let view = meta_str(meta, "REQUESTED_NETWORK_VIEW");
        let kind = ProxyKind::of_node(&nid.proxy_type, meta_str(meta, "ROUTER_MODE"), view)?;
        let client = ClientKind::of_node(meta_str(meta, "GENERATOR"), &node.user_agent_name);
        let network = match kind {
            ProxyKind::Router => view.or(meta_str(meta, "NETWORK")),
            ProxyKind::Sidecar | ProxyKind::Ingress => meta_str(meta, "NETWORK"),
        };
        let locality = match &node.locality {
            Some(l) => Locality::new(&l.region, &l.zone, &l.sub_zone),
            None => Locality::default(),
        };
        let interception = match meta_str(meta, "INTERCEPTION_MODE") {
            None | Some("REDIRECT") | Some("TPROXY") => InterceptionMode::Redirect,
            Some("NONE") => InterceptionMode::None,
            Some(other) => {
                return Err(Error::InvalidMetadata {
                    key: "INTERCEPTION_MODE",
                    reason: format!("{other:?} is not REDIRECT, TPROXY or NONE"),
                });
            }
        };
        let tls = match meta_str(meta, "MESHFED_TLS") {
            Some("none") => TlsSupport::None,
            Some("static") => TlsSupport::Static,
            Some("agent") => TlsSupport::Agent,
            None if client == ClientKind::Grpc => TlsSupport::None,
            None => TlsSupport::Agent,
            Some(other) => {
                return Err(Error::InvalidMetadata {
                    key: "MESHFED_TLS",
                    reason: format!("{other:?} is not none, static or agent"),
                });
            }
        };
        let inbound_address = match meta_str(meta, "MESHFED_INBOUND_ADDRESS") {
            None => IpAddr::from([127, 0, 0, 1]),
            Some(a) => a.parse().map_err(|_| Error::InvalidMetadata {
                key: "MESHFED_INBOUND_ADDRESS",
                reason: format!("{a:?} is not an IP address"),
            })?,
        };
        Ok(Proxy {
            id: node.id.as_str().into(),
            key: format!("{}.{}", nid.pod, nid.namespace).into(),
            kind,
            client,
            ip: nid.ip,
            pod: nid.pod.into(),
            namespace: nid.namespace.into(),
            cluster_id: meta_str(meta, "CLUSTER_ID").map(ClusterId::new),
            network: network.map(NetworkId::new).unwrap_or_default(),
            locality,
            interception,
            istio_version: meta_str(meta, "ISTIO_VERSION").unwrap_or("").into(),
            labels: meta_labels(meta)?,
            tls,
            inbound_address,
        })
    }
}

/// Builds a `google.protobuf.Value` string (helper for tests and clients).
pub fn string_value(s: &str) -> Value {
    Value { kind: Some(ValueKind::StringValue(s.to_string())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, meta: &[(&str, &str)]) -> Node {
        Node {
            id: id.into(),
            metadata: Some(Struct { fields: meta.iter().map(|(k, v)| (k.to_string(), string_value(v))).collect() }),
            ..Default::default()
        }
    }

    #[test]
    fn parses_sidecar_node() {
        let mut n = node(
            "sidecar~10.1.2.3~reviews-v1-abc.shop~shop.svc.cluster.local",
            &[("CLUSTER_ID", "aws-use1"), ("NETWORK", "aws-net"), ("INTERCEPTION_MODE", "NONE")],
        );
        n.locality = Some(envoy_types::pb::envoy::config::core::v3::Locality {
            region: "us-east-1".into(),
            zone: "us-east-1a".into(),
            sub_zone: String::new(),
        });
        let p = Proxy::from_node(Some(&n)).unwrap();
        assert_eq!(p.kind, ProxyKind::Sidecar);
        assert_eq!(&*p.key, "reviews-v1-abc.shop");
        assert_eq!(&*p.namespace, "shop");
        assert_eq!(p.ip, "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(p.cluster_id, Some(ClusterId::new("aws-use1")));
        assert_eq!(p.network, NetworkId::new("aws-net"));
        assert_eq!(p.locality, Locality::new("us-east-1", "us-east-1a", ""));
        assert_eq!(p.interception, InterceptionMode::None);
        assert_eq!(p.client, ClientKind::Envoy);
    }

    #[test]
    fn router_network_view_wins() {
        let n = node(
            "router~127.0.10.2~eastwest-0.istio-system~istio-system.svc.cluster.local",
            &[("NETWORK", "aws-net"), ("REQUESTED_NETWORK_VIEW", "azure-net")],
        );
        let p = Proxy::from_node(Some(&n)).unwrap();
        assert_eq!(p.kind, ProxyKind::Router);
        assert_eq!(p.network, NetworkId::new("azure-net"));
        assert_eq!(p.interception, InterceptionMode::Redirect);
    }

    #[test]
    fn a_router_is_an_east_west_gateway_by_its_mode_or_network_view_else_an_ingress() {
        let id = "router~127.0.10.2~gw-0.istio-system~istio-system.svc.cluster.local";
        let kind = |meta: &[(&str, &str)]| Proxy::from_node(Some(&node(id, meta))).map(|p| (p.kind, p.network));
        let net = NetworkId::new;
        assert_eq!(
            kind(&[("ROUTER_MODE", "sni-dnat"), ("NETWORK", "aws-net")]),
            Ok((ProxyKind::Router, net("aws-net")))
        );
        assert_eq!(kind(&[("REQUESTED_NETWORK_VIEW", "aws-net")]), Ok((ProxyKind::Router, net("aws-net"))));
        // Istio's default mode is standard: an ingress gateway, on its own NETWORK
        assert_eq!(kind(&[("NETWORK", "aws-net")]), Ok((ProxyKind::Ingress, net("aws-net"))));
        assert_eq!(kind(&[("ROUTER_MODE", "standard")]), Ok((ProxyKind::Ingress, net(""))));
        let bad = kind(&[("ROUTER_MODE", "sni")]).unwrap_err();
        assert_eq!(bad.to_string(), "invalid node metadata ROUTER_MODE: \"sni\" is not sni-dnat or standard");
        // the mode means nothing on a sidecar
        let sidecar = "sidecar~127.0.0.1~c.shop~shop.svc.cluster.local";
        let p = Proxy::from_node(Some(&node(sidecar, &[("ROUTER_MODE", "sni-dnat")]))).unwrap();
        assert_eq!(p.kind, ProxyKind::Sidecar);
    }

    #[test]
    fn a_client_is_what_its_node_says() {
        let id = "sidecar~127.0.0.1~c.shop~shop.svc.cluster.local";
        let client = |meta: &[(&str, &str)], ua: &str| {
            let mut n = node(id, meta);
            n.user_agent_name = ua.into();
            Proxy::from_node(Some(&n)).unwrap().client
        };
        // metadata GENERATOR first
        assert_eq!(client(&[("GENERATOR", "grpc")], ""), ClientKind::Grpc);
        assert_eq!(client(&[("GENERATOR", "grpc")], "envoy"), ClientKind::Grpc);
        assert_eq!(client(&[("GENERATOR", "event")], "gRPC Go"), ClientKind::Debug);
        // then the node's user agent: every gRPC library's name, whatever its case
        for ua in ["gRPC Python", "grpc-java", "grpc-go", "gRPC C-core", "gRPC Go", "grpc-node-js", "GRPC C++"] {
            assert_eq!(client(&[], ua), ClientKind::Grpc, "{ua}");
        }
        // Envoy, and anything else, is Envoy
        for ua in ["envoy", "", "istio-proxy", "gr", "tonic"] {
            assert_eq!(client(&[], ua), ClientKind::Envoy, "{ua:?}");
        }
        assert_eq!(client(&[("GENERATOR", "other")], "envoy"), ClientKind::Envoy);
        // (the stream's HTTP user-agent is not an input at all: `from_node` takes only the node)
        assert_eq!(ClientKind::of_node(None, "envoy"), ClientKind::Envoy);
    }

    #[test]
    fn rejects_bad_node_ids() {
        for id in [
            "",
            "sidecar~1.2.3.4~a.b",
            "gateway~1.2.3.4~a.b~b.svc.cluster.local",
            "sidecar~1.2.3~a.b~b.svc.cluster.local",
        ] {
            let n = node(id, &[]);
            let err = Proxy::from_node(Some(&n)).unwrap_err();
            assert!(matches!(err, Error::InvalidNodeId { .. }), "{id:?}: {err}");
            assert!(err.to_string().contains(id), "the error names the id: {err}");
        }
        assert_eq!(Proxy::from_node(None), Err(Error::MissingNode));
    }

    #[test]
    fn rejects_bad_metadata() {
        let n = node("sidecar~1.2.3.4~a.b~b.svc.cluster.local", &[("INTERCEPTION_MODE", "MAGIC")]);
        assert!(matches!(Proxy::from_node(Some(&n)), Err(Error::InvalidMetadata { .. })));
    }

    #[test]
    fn parses_interception_mode() {
        assert_eq!("NONE".parse::<InterceptionMode>().unwrap(), InterceptionMode::None);
        assert_eq!("redirect".parse::<InterceptionMode>().unwrap(), InterceptionMode::Redirect);
        assert_eq!(
            "TPROXY".parse::<InterceptionMode>().unwrap_err().to_string(),
            "invalid interception mode \"TPROXY\" (expected NONE or REDIRECT)"
        );
        assert_eq!(InterceptionMode::default().to_string(), "NONE");
    }
}
