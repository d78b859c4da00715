//! Kubernetes objects as meshfed keeps them: parsed with k8s-openapi types (from YAML files or, later,
//! the API server), validated, and reduced to the few fields the federated registry reads.
//!
//! Every source (the file source, the Kubernetes source) produces [`TopologyObject`]s through
//! [`TopologyObject::from_kube`], so both feed the registry the same way.

use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::model::{Labels, Locality, NetworkId};

/// Label keys meshfed reads.
pub mod labels {
    pub const REGION: &str = "topology.kubernetes.io/region";
    pub const ZONE: &str = "topology.kubernetes.io/zone";
    pub const SUBZONE: &str = "topology.istio.io/subzone";
    pub const NETWORK: &str = "topology.istio.io/network";
    pub const GATEWAY_PORT: &str = "networking.istio.io/gatewayPort";
    pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
    pub const TLS_MODE: &str = "security.istio.io/tlsMode";
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    Namespace,
    Service,
    EndpointSlice,
    Node,
    Pod,
}

/// Identifies an object within one cluster. `namespace` is empty for cluster-scoped kinds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum TopologyObject {
    Namespace(NamespaceInfo),
    Service(ServiceInfo),
    EndpointSlice(SliceInfo),
    Node(NodeInfo),
    Pod(PodInfo),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NamespaceInfo {
    pub name: Arc<str>,
    /// label `topology.istio.io/network` (on the system namespace it sets the cluster's default network)
    pub network: Option<NetworkId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub ports: Vec<ServicePortInfo>,
    /// label `topology.istio.io/network`: marks an east-west gateway Service for that network
    pub network: Option<NetworkId>,
    /// label `networking.istio.io/gatewayPort`
    pub gateway_port: Option<u16>,
    /// `spec.type` (ClusterIP, NodePort, LoadBalancer, ExternalName)
    pub service_type: Arc<str>,
    pub external_ips: Vec<Arc<str>>,
    /// `status.loadBalancer.ingress[]`: ip, else hostname
    pub load_balancer_ingress: Vec<Arc<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePortInfo {
    pub name: Arc<str>,
    pub port: u16,
    /// `protocol` (TCP, UDP, SCTP)
    pub protocol: Arc<str>,
    pub app_protocol: Option<Arc<str>>,
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SliceInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// label `kubernetes.io/service-name`
    pub service: Arc<str>,
    /// ports by name (empty name for an unnamed port)
    pub ports: Vec<(Arc<str>, u16)>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<Arc<str>>,
    /// the zone hint (`endpoints[].zone`)
    pub zone: Option<Arc<str>>,
    /// `targetRef` when it is a Pod: the pod's name (in the slice's namespace)
    pub pod: Option<Arc<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    pub name: Arc<str>,
    pub locality: Locality,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub labels: Labels,
    pub service_account: Arc<str>,
    pub node_name: Option<Arc<str>>,
    /// label `topology.istio.io/network`
    pub network: Option<NetworkId>,
    /// `status.phase == Failed` (istiod ignores such pods)
    pub failed: bool,
}

impl TopologyObject {
    pub fn key(&self) -> ObjectKey {
        let (kind, namespace, name): (Kind, &Arc<str>, &Arc<str>) = match self {
            TopologyObject::Namespace(n) => (Kind::Namespace, &*EMPTY, &n.name),
            TopologyObject::Service(s) => (Kind::Service, &s.namespace, &s.name),
            TopologyObject::EndpointSlice(s) => (Kind::EndpointSlice, &s.namespace, &s.name),
            TopologyObject::Node(n) => (Kind::Node, &*EMPTY, &n.name),
            TopologyObject::Pod(p) => (Kind::Pod, &p.namespace, &p.name),
        };
        ObjectKey { kind, namespace: namespace.clone(), name: name.clone() }
    }
}

static EMPTY: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));
