//! The federated mesh's domain model: what every source feeds and every translator reads.
//!
//! These types are deliberately compact (no Kubernetes object bodies): a federated endpoint is a few
//! dozen bytes plus shared strings, so that memory stays bounded at fleet scale.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The id of one Kubernetes cluster in the mesh (Istio's CLUSTER_ID), e.g. `aws-use1`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ClusterId(pub Arc<str>);

/// An Istio network (label `topology.istio.io/network`), e.g. `aws-net`.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NetworkId(pub Arc<str>);

macro_rules! str_newtype {
    ($t:ident) => {
        impl $t {
            pub fn new(s: impl AsRef<str>) -> Self {
                Self(Arc::from(s.as_ref()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl From<&str> for $t {
            fn from(s: &str) -> Self {
                Self::new(s)
            }
        }
    };
}
str_newtype!(ClusterId);
str_newtype!(NetworkId);

impl NetworkId {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Region / zone / subzone, as Kubernetes and Istio label them. Empty strings mean "unknown".
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Locality {
    pub region: Arc<str>,
    pub zone: Arc<str>,
    pub subzone: Arc<str>,
}

impl Locality {
    pub fn new(region: &str, zone: &str, subzone: &str) -> Self {
        Self { region: region.into(), zone: zone.into(), subzone: subzone.into() }
    }

    /// Parses Istio's `region/zone/subzone` form (missing parts are empty).
    pub fn parse(s: &str) -> Self {
        let mut it = s.splitn(3, '/');
        let region = it.next().unwrap_or("");
        let zone = it.next().unwrap_or("");
        let subzone = it.next().unwrap_or("");
        Self::new(region, zone, subzone)
    }

    pub fn is_empty(&self) -> bool {
        self.region.is_empty() && self.zone.is_empty() && self.subzone.is_empty()
    }
}

impl fmt::Display for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.region, self.zone, self.subzone)
    }
}

/// A Kubernetes service identity: services with the same namespace/name in several clusters are one
/// federated service ("namespace sameness").
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
    /// `name.namespace.svc.<domain_suffix>`
    pub fn fqdn(&self, domain_suffix: &str) -> String {
        format!("{}.{}.svc.{}", self.name, self.namespace, domain_suffix)
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Application protocol of a service port, from `appProtocol` or Istio's port-name prefix convention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
    Tls,
    Https,
    Unsupported,
}

impl Protocol {
    /// Istio's rule: `appProtocol` first, then the port name's prefix (`http-web`, `grpc`, ...).
    pub fn detect(app_protocol: Option<&str>, port_name: &str, k8s_protocol: &str) -> Protocol {
        if !k8s_protocol.is_empty() && !k8s_protocol.eq_ignore_ascii_case("TCP") {
            return Protocol::Unsupported; // UDP / SCTP
        }
        let from = |s: &str| -> Option<Protocol> {
            let p = s.split('-').next().unwrap_or("").to_ascii_lowercase();
            Some(match p.as_str() {
                "http" => Protocol::Http,
                "http2" | "h2c" | "kubernetes.io/h2c" => Protocol::Http2,
                "grpc" | "grpc-web" => Protocol::Grpc,
                "tcp" => Protocol::Tcp,
                "tls" => Protocol::Tls,
                "https" => Protocol::Https,
                _ => return None,
            })
        };
        app_protocol.and_then(from).or_else(|| from(port_name)).unwrap_or(Protocol::Tcp)
    }

    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }
}

/// A port of a (federated) service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ServicePort {
    pub name: Arc<str>,
    pub port: u16,
    pub protocol: Protocol,
}

/// Endpoint health, from EndpointSlice conditions (ready / serving / terminating).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Health {
    /// ready (or ready unset, which Kubernetes defines as ready)
    Healthy,
    /// not ready and not terminating
    Unhealthy,
    /// terminating (whether or not still serving)
    Draining,
}

impl Health {
    /// Maps EndpointSlice conditions the way istiod does. `None` means the condition is unset.
    pub fn from_conditions(ready: Option<bool>, serving: Option<bool>, terminating: Option<bool>) -> Health {
        let _ = serving;
        if terminating == Some(true) {
            Health::Draining
        } else if ready.unwrap_or(true) {
            Health::Healthy
        } else {
            Health::Unhealthy
        }
    }
}

/// Pod labels, shared between all endpoints of the pod.
pub type Labels = Arc<BTreeMap<String, String>>;

/// What is known of the workload behind an endpoint (its Pod), when the EndpointSlice names one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Workload {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub service_account: Arc<str>,
    pub labels: Labels,
    /// `security.istio.io/tlsMode` (istio when the pod runs an Istio sidecar)
    pub tls_mode: TlsMode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    #[default]
    Disabled,
    Istio,
}

/// One federated endpoint: an address in one cluster, with where it runs and whether it is healthy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Endpoint {
    pub address: IpAddr,
    /// EndpointSlice ports by name (the Service port's name; empty for an unnamed single port).
    pub ports: Vec<(Arc<str>, u16)>,
    pub cluster: ClusterId,
    pub network: NetworkId,
    pub locality: Locality,
    pub health: Health,
    pub workload: Option<Arc<Workload>>,
}

impl Endpoint {
    /// The endpoint's port number for a service port, matched by name as kube-proxy does.
    pub fn port_for(&self, service_port_name: &str) -> Option<u16> {
        self.ports.iter().find(|(n, _)| &**n == service_port_name).map(|(_, p)| *p)
    }

    pub fn tls_mode(&self) -> TlsMode {
        self.workload.as_ref().map(|w| w.tls_mode).unwrap_or_default()
    }
}

/// An east-west gateway address for a network: where traffic for that network's endpoints enters it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Gateway {
    pub network: NetworkId,
    pub cluster: ClusterId,
    /// an IP address, or a hostname (AWS ELBs) that is resolved before use
    pub address: Arc<str>,
    pub port: u16,
    /// the gateway Service, `namespace/name`
    pub service: Arc<str>,
}

/// One service merged across clusters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    pub key: ServiceKey,
    pub hostname: Arc<str>,
    /// union of the ports the service has in each cluster, sorted by port number
    pub ports: Vec<ServicePort>,
    /// the clusters that define the Service object
    pub clusters: Vec<ClusterId>,
    /// endpoints from every cluster, in a deterministic order (cluster, address)
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    pub fn port(&self, number: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == number)
    }
}
