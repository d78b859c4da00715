//! Istio node ids, `TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN` (for example
//! `sidecar~10.1.2.3~reviews-v1-abc.shop~shop.svc.cluster.local`): parsing and strict validation.
//!
//! A proxy names itself with its node id on every xDS stream ([`crate::proxy`] reads it), and
//! `meshfed bootstrap` checks the id it writes into a bootstrap ([`crate::bootstrap`]). Uses nothing
//! else of meshfed.

use std::net::IpAddr;

/// Proxy types accepted in a node id.
pub const PROXY_TYPES: &[&str] = &["sidecar", "router"];

const NODE_ID_FORM: &str = "TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a valid node id; `reason` says which part is wrong and how.
    #[error("invalid node id {id:?}: {reason} (expected {NODE_ID_FORM})")]
    Invalid { id: String, reason: String },
}

/// The parts of a validated Istio node id `TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeIdParts {
    /// `sidecar` or `router`
    pub proxy_type: String,
    pub ip: IpAddr,
    pub pod: String,
    pub namespace: String,
    /// the DNS domain after `NAMESPACE.svc.`, e.g. `cluster.local`
    pub domain: String,
}

impl NodeIdParts {
    /// `POD.NAMESPACE`, the third part of the node id (Envoy's `node.cluster` in the bootstrap).
    pub fn pod_dot_namespace(&self) -> String {
        format!("{}.{}", self.pod, self.namespace)
    }
}

/// Parses and strictly validates an Istio node id.
///
/// Requirements: exactly four `~`-separated, non-empty parts; TYPE one of [`PROXY_TYPES`]; IP a valid
/// IPv4 or IPv6 address (no brackets, no zone); the third part `POD.NAMESPACE` with POD a DNS-1123
/// subdomain and NAMESPACE a DNS-1123 label; the fourth part `NAMESPACE.svc.DOMAIN` with the same
/// NAMESPACE and DOMAIN a DNS-1123 subdomain.
pub fn parse_node_id(id: &str) -> Result<NodeIdParts, Error> {
    let err = |reason: String| Error::Invalid { id: id.to_string(), reason };

    let parts: Vec<&str> = id.split('~').collect();
    if parts.len() != 4 {
        return Err(err(format!("has {} `~`-separated parts, expected 4", parts.len())));
    }
    const NAMES: [&str; 4] = ["proxy type", "IP address", "POD.NAMESPACE", "NAMESPACE.svc.DOMAIN"];
    for (i, (part, name)) in parts.iter().zip(NAMES).enumerate() {
        if part.is_empty() {
            return Err(err(format!("part {} ({name}) is empty", i + 1)));
        }
    }
    let (proxy_type, ip, pod_ns, ns_domain) = (parts[0], parts[1], parts[2], parts[3]);

    if !PROXY_TYPES.contains(&proxy_type) {
        return Err(err(format!("unknown proxy type {proxy_type:?} (expected one of {})", PROXY_TYPES.join(", "))));
    }

    let ip: IpAddr = ip.parse().map_err(|_| err(format!("{ip:?} is not a valid IP address")))?;

    // The namespace is a DNS label (no dots) but the pod name may contain dots: split on the last one.
    let Some((pod, namespace)) = pod_ns.rsplit_once('.') else {
        return Err(err(format!("third part {pod_ns:?} is not POD.NAMESPACE (no `.`)")));
    };
    if pod.is_empty() {
        return Err(err(format!("third part {pod_ns:?} has an empty pod name")));
    }
    if namespace.is_empty() {
        return Err(err(format!("third part {pod_ns:?} has an empty namespace")));
    }
    if !is_dns1123_subdomain(pod) {
        return Err(err(format!(
            "pod name {pod:?} is not a valid DNS-1123 subdomain (lowercase letters, digits, `-` and `.`)"
        )));
    }
    if !is_dns1123_label(namespace) {
        return Err(err(format!(
            "namespace {namespace:?} is not a valid DNS-1123 label (at most 63 lowercase letters, digits and `-`)"
        )));
    }

    let (ns4, rest) = ns_domain.split_once('.').unwrap_or((ns_domain, ""));
    if ns4 != namespace {
        return Err(err(format!(
            "namespace {namespace:?} in the third part does not match namespace {ns4:?} \
             at the start of the fourth part {ns_domain:?}"
        )));
    }
    let Some(domain) = rest.strip_prefix("svc.") else {
        return Err(err(format!("fourth part {ns_domain:?} is not {namespace}.svc.DOMAIN")));
    };
    if !is_dns1123_subdomain(domain) {
        return Err(err(format!("DNS domain {domain:?} in the fourth part is not a valid DNS-1123 subdomain")));
    }

    Ok(NodeIdParts {
        proxy_type: proxy_type.to_string(),
        ip,
        pod: pod.to_string(),
        namespace: namespace.to_string(),
        domain: domain.to_string(),
    })
}

/// RFC 1123 label as Kubernetes validates it: 1-63 of `[a-z0-9-]`, alphanumeric at both ends.
pub(crate) fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// RFC 1123 subdomain as Kubernetes validates it: at most 253 characters, dot-separated labels.
pub(crate) fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "sidecar~127.0.50.1~client-0.shop~shop.svc.cluster.local";

    fn node_err(id: &str) -> String {
        match parse_node_id(id) {
            Err(e @ Error::Invalid { .. }) => e.to_string(),
            other => panic!("{id:?}: expected a node id error, got {other:?}"),
        }
    }

    #[test]
    fn parses_sidecar_node_id() {
        let p = parse_node_id(ID).unwrap();
        assert_eq!(
            p,
            NodeIdParts {
                proxy_type: "sidecar".into(),
                ip: "127.0.50.1".parse().unwrap(),
                pod: "client-0".into(),
                namespace: "shop".into(),
                domain: "cluster.local".into(),
            }
        );
        assert_eq!(p.pod_dot_namespace(), "client-0.shop");
    }

    #[test]
    fn parses_router_ipv6_and_dotted_pod() {
        let p = parse_node_id("router~::1~a.b~b.svc.cluster.local").unwrap();
        assert_eq!(p.proxy_type, "router");
        assert_eq!(p.ip, "::1".parse::<IpAddr>().unwrap());
        assert_eq!((p.pod.as_str(), p.namespace.as_str(), p.domain.as_str()), ("a", "b", "cluster.local"));

        let p = parse_node_id("sidecar~fd00::10:2~web.v1-abc.prod~prod.svc.example.com").unwrap();
        assert_eq!((p.pod.as_str(), p.namespace.as_str(), p.domain.as_str()), ("web.v1-abc", "prod", "example.com"));
        assert_eq!(p.ip, "fd00::10:2".parse::<IpAddr>().unwrap());

        let p = parse_node_id("sidecar~::1~a.b~b.svc.cluster.local").unwrap();
        assert_eq!(p.proxy_type, "sidecar");
    }

    #[test]
    fn rejects_wrong_part_counts() {
        assert!(node_err("").contains("has 1 `~`-separated parts"));
        assert!(node_err("sidecar~127.0.0.1~a.b").contains("has 3 `~`-separated parts"));
        assert!(node_err(&format!("{ID}~extra")).contains("has 5 `~`-separated parts"));
        assert!(node_err("sidecar~~127.0.0.1~a.b~b.svc.cluster.local").contains("has 5"));
    }

    #[test]
    fn rejects_empty_parts() {
        assert!(node_err("~127.0.0.1~a.b~b.svc.cluster.local").contains("part 1 (proxy type) is empty"));
        assert!(node_err("sidecar~~a.b~b.svc.cluster.local").contains("part 2 (IP address) is empty"));
        assert!(node_err("sidecar~127.0.0.1~~b.svc.cluster.local").contains("part 3 (POD.NAMESPACE) is empty"));
        assert!(node_err("sidecar~127.0.0.1~a.b~").contains("part 4 (NAMESPACE.svc.DOMAIN) is empty"));
        assert!(node_err("~~~").contains("part 1"));
    }

    #[test]
    fn rejects_bad_proxy_type() {
        for t in ["Sidecar", "gateway", "ztunnel", " sidecar"] {
            let e = node_err(&format!("{t}~127.0.0.1~a.b~b.svc.cluster.local"));
            assert!(e.contains("unknown proxy type"), "{e}");
            assert!(e.contains("sidecar, router"), "{e}");
        }
    }

    #[test]
    fn rejects_bad_ips() {
        for ip in ["127.0.0", "127.0.0.256", "localhost", "[::1]", "fe80::1%eth0", "127.0.0.1 ", "010.0.0.1", ":::1"] {
            let e = node_err(&format!("sidecar~{ip}~a.b~b.svc.cluster.local"));
            assert!(e.contains("is not a valid IP address"), "{ip}: {e}");
        }
    }

    #[test]
    fn rejects_bad_pod_namespace() {
        assert!(node_err("sidecar~127.0.0.1~ab~ab.svc.cluster.local").contains("no `.`"));
        assert!(node_err("sidecar~127.0.0.1~.b~b.svc.cluster.local").contains("empty pod name"));
        assert!(node_err("sidecar~127.0.0.1~a.~b.svc.cluster.local").contains("empty namespace"));
        assert!(node_err("sidecar~127.0.0.1~A.b~b.svc.cluster.local").contains("pod name \"A\""));
        assert!(node_err("sidecar~127.0.0.1~a..x.b~b.svc.cluster.local").contains("pod name \"a..x\""));
        assert!(node_err("sidecar~127.0.0.1~a_1.b~b.svc.cluster.local").contains("pod name"));
        assert!(node_err("sidecar~127.0.0.1~a.B~B.svc.cluster.local").contains("namespace \"B\""));
        assert!(node_err("sidecar~127.0.0.1~a.-b~-b.svc.cluster.local").contains("DNS-1123 label"));
        let long = "n".repeat(64);
        assert!(node_err(&format!("sidecar~127.0.0.1~a.{long}~{long}.svc.cluster.local")).contains("DNS-1123 label"));
    }

    #[test]
    fn rejects_mismatched_namespace_and_bad_domain() {
        let e = node_err("sidecar~127.0.0.1~a.shop~bank.svc.cluster.local");
        assert!(e.contains("\"shop\" in the third part does not match namespace \"bank\""), "{e}");
        let e = node_err("sidecar~127.0.0.1~a.shop~shop");
        assert!(e.contains("does not match namespace") || e.contains("is not shop.svc.DOMAIN"), "{e}");
        assert!(node_err("sidecar~127.0.0.1~a.shop~shop.svc").contains("is not shop.svc.DOMAIN"));
        assert!(node_err("sidecar~127.0.0.1~a.shop~shop.cluster.local").contains("is not shop.svc.DOMAIN"));
        assert!(node_err("sidecar~127.0.0.1~a.shop~shop.svc.").contains("DNS domain \"\""));
        assert!(node_err("sidecar~127.0.0.1~a.shop~shop.svc.Cluster.local").contains("DNS domain"));
        assert!(node_err("sidecar~127.0.0.1~a.shop~shop.svc.cluster..local").contains("DNS domain"));
        assert!(node_err("sidecar~127.0.0.1~a.shop~shopx.svc.cluster.local").contains("does not match"));
    }

    #[test]
    fn node_id_error_names_the_expected_form() {
        let e = node_err("sidecar");
        assert!(e.starts_with("invalid node id \"sidecar\": "), "{e}");
        assert!(e.ends_with("(expected TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN)"), "{e}");
    }
}
