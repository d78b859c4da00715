//! Kubernetes objects as meshfed keeps them: parsed with k8s-openapi types (from YAML files or, later,
//! the API server), validated, and reduced to the few fields the federated registry reads.
//!
//! Every source (the file source, the Kubernetes source) produces [`TopologyObject`]s through
//! [`TopologyObject::from_kube`], so both feed the registry the same way.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service as K8sService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

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
    DestinationRule,
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
    DestinationRule(DestinationRuleInfo),
}

/// An Istio DestinationRule: valid, or the reason it is ignored (reported, never fatal for its file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DestinationRuleInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    #[serde(serialize_with = "serialize_rule")]
    pub rule: Result<Arc<crate::policy::DestinationRule>, crate::policy::Error>,
    /// the object as converted, reduced to what the conversion reads (`apiVersion`, `kind`,
    /// `metadata.name`, `.namespace`, `.creationTimestamp`, `spec`), so that the rule can be converted
    /// again: the last-known state stores it ([`crate::source::last_known`]). None when the object has a
    /// form JSON cannot hold (a YAML mapping with non-string keys).
    #[serde(skip)]
    pub source: Option<Arc<serde_json::Value>>,
}

fn serialize_rule<S: serde::Serializer>(
    rule: &Result<Arc<crate::policy::DestinationRule>, crate::policy::Error>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match rule {
        Ok(r) => r.serialize(s),
        Err(e) => s.serialize_str(&e.to_string()),
    }
}

impl DestinationRuleInfo {
    /// Converts a DestinationRule object (YAML or JSON value). Only a missing name is an error: an invalid
    /// rule is kept as an error so it can be reported while everything else keeps working.
    pub fn from_value(value: serde_yaml::Value) -> Result<DestinationRuleInfo, String> {
        let meta = value.get("metadata");
        let get = |k: &str| meta.and_then(|m| m.get(k)).and_then(serde_yaml::Value::as_str).unwrap_or("");
        let name = get("name");
        if name.is_empty() {
            return Err("DestinationRule: metadata.name is missing".into());
        }
        let namespace = match get("namespace") {
            "" => "default",
            ns => ns,
        };
        let (namespace, name): (Arc<str>, Arc<str>) = (namespace.into(), name.into());
        let source = rule_source(&value).map(Arc::new);
        let rule = crate::policy::DestinationRule::from_value(value).map(Arc::new).map_err(|mut e| {
            e.object = format!("{namespace}/{name}");
            e
        });
        Ok(DestinationRuleInfo { namespace, name, rule, source })
    }
}

/// What of a DestinationRule object its conversion reads, as JSON (see [`DestinationRuleInfo::source`]).
fn rule_source(value: &serde_yaml::Value) -> Option<serde_json::Value> {
    let mut out = serde_json::Map::new();
    for key in ["apiVersion", "kind", "spec"] {
        if let Some(v) = value.get(key) {
            out.insert(key.into(), serde_json::to_value(v).ok()?);
        }
    }
    if let Some(meta) = value.get("metadata") {
        let mut m = serde_json::Map::new();
        for key in ["name", "namespace", "creationTimestamp"] {
            if let Some(v) = meta.get(key) {
                m.insert(key.into(), serde_json::to_value(v).ok()?);
            }
        }
        out.insert("metadata".into(), serde_json::Value::Object(m));
    }
    Some(serde_json::Value::Object(out))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceInfo {
    pub name: Arc<str>,
    /// label `topology.istio.io/network` (on the system namespace it sets the cluster's default network)
    pub network: Option<NetworkId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePortInfo {
    pub name: Arc<str>,
    pub port: u16,
    /// `protocol` (TCP, UDP, SCTP)
    pub protocol: Arc<str>,
    pub app_protocol: Option<Arc<str>>,
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// label `kubernetes.io/service-name`
    pub service: Arc<str>,
    /// ports by name (empty name for an unnamed port)
    pub ports: Vec<(Arc<str>, u16)>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: Arc<str>,
    pub locality: Locality,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
            TopologyObject::DestinationRule(d) => (Kind::DestinationRule, &d.namespace, &d.name),
        };
        ObjectKey { kind, namespace: namespace.clone(), name: name.clone() }
    }
}

static EMPTY: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));

// ---- parsing and conversion ----

/// Errors from parsing manifests or converting Kubernetes objects.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A manifest file could not be used: bad YAML, a field of the wrong type, or an invalid object.
    /// `line` is the absolute line in the file (1-based); for an invalid object, where its document starts.
    #[error("{}: {reason}", display_location(.file, *.line))]
    Parse { file: PathBuf, line: Option<usize>, reason: String },
    /// A well-formed Kubernetes object that meshfed cannot use (missing name, bad address, port out of range...).
    #[error("{kind} {object}: {field}: {reason}")]
    Invalid {
        kind: &'static str,
        /// `namespace/name` (or `name` for cluster-scoped kinds)
        object: String,
        field: String,
        reason: String,
    },
    /// A manifest file could not be read.
    #[error("cannot read {}: {source}", .file.display())]
    Read { file: PathBuf, source: std::io::Error },
}

fn display_location(file: &Path, line: Option<usize>) -> String {
    match line {
        Some(line) => format!("{}:{line}", file.display()),
        None => file.display().to_string(),
    }
}

impl Error {
    /// The file the error is about, when it is about a file.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Error::Parse { file, .. } | Error::Read { file, .. } => Some(file),
            Error::Invalid { .. } => None,
        }
    }

    /// The (absolute, 1-based) line the error is about, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            Error::Parse { line, .. } => *line,
            _ => None,
        }
    }
}

/// A Kubernetes object type meshfed reads, convertible into a [`TopologyObject`].
pub trait KubeObject: serde::de::DeserializeOwned {
    /// The object's kind, e.g. `EndpointSlice`.
    const KIND: &'static str;
    /// Converts the object; `Ok(None)` when meshfed has no use for it (e.g. an FQDN EndpointSlice).
    fn to_topology(&self) -> Result<Option<TopologyObject>, Error>;
}

impl KubeObject for Namespace {
    const KIND: &'static str = "Namespace";
    fn to_topology(&self) -> Result<Option<TopologyObject>, Error> {
        from_namespace(self).map(Some)
    }
}

impl KubeObject for K8sService {
    const KIND: &'static str = "Service";
    fn to_topology(&self) -> Result<Option<TopologyObject>, Error> {
        from_service(self).map(Some)
    }
}

impl KubeObject for EndpointSlice {
    const KIND: &'static str = "EndpointSlice";
    fn to_topology(&self) -> Result<Option<TopologyObject>, Error> {
        from_endpoint_slice(self)
    }
}

impl KubeObject for Node {
    const KIND: &'static str = "Node";
    fn to_topology(&self) -> Result<Option<TopologyObject>, Error> {
        from_node(self).map(Some)
    }
}

impl KubeObject for Pod {
    const KIND: &'static str = "Pod";
    fn to_topology(&self) -> Result<Option<TopologyObject>, Error> {
        from_pod(self).map(Some)
    }
}

impl TopologyObject {
    /// Converts any Kubernetes object meshfed reads; `Ok(None)` when it has no use for this one.
    pub fn from_kube<K: KubeObject>(obj: &K) -> Result<Option<TopologyObject>, Error> {
        obj.to_topology()
    }
}

/// Validated identity of an object while converting it, for error messages.
struct Ident<'a> {
    kind: &'static str,
    namespace: Option<&'a str>,
    name: &'a str,
}

impl Ident<'_> {
    fn object(&self) -> String {
        let name = if self.name.is_empty() { "<no name>" } else { self.name };
        match self.namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_string(),
        }
    }

    fn invalid(&self, field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Invalid { kind: self.kind, object: self.object(), field: field.into(), reason: reason.into() }
    }
}

/// Reads the identity of an object; `namespaced` objects without a namespace are in `default`, as with
/// `kubectl apply`.
fn ident<'a>(kind: &'static str, meta: &'a ObjectMeta, namespaced: bool) -> Result<Ident<'a>, Error> {
    let namespace = namespaced.then(|| meta.namespace.as_deref().filter(|ns| !ns.is_empty()).unwrap_or("default"));
    let id = Ident { kind, namespace, name: meta.name.as_deref().unwrap_or("") };
    if id.name.is_empty() {
        return Err(id.invalid("metadata.name", "is required"));
    }
    Ok(id)
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref().and_then(|l| l.get(key)).map(String::as_str)
}

fn network_label(meta: &ObjectMeta) -> Option<NetworkId> {
    label(meta, labels::NETWORK).filter(|n| !n.is_empty()).map(NetworkId::new)
}

fn port_number(id: &Ident<'_>, field: &str, n: i32) -> Result<u16, Error> {
    match u16::try_from(n) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(id.invalid(field, format!("port {n} is out of range (1-65535)"))),
    }
}

/// `v1 Namespace`
pub fn from_namespace(ns: &Namespace) -> Result<TopologyObject, Error> {
    let id = ident("Namespace", &ns.metadata, false)?;
    Ok(TopologyObject::Namespace(NamespaceInfo { name: id.name.into(), network: network_label(&ns.metadata) }))
}

/// `v1 Service`
pub fn from_service(svc: &K8sService) -> Result<TopologyObject, Error> {
    let meta = &svc.metadata;
    let id = ident("Service", meta, true)?;
    let spec = svc.spec.as_ref();
    let mut ports = Vec::new();
    for (i, p) in spec.and_then(|s| s.ports.as_deref()).unwrap_or_default().iter().enumerate() {
        let port = port_number(&id, &format!("spec.ports[{i}].port"), p.port)?;
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => Some(port_number(&id, &format!("spec.ports[{i}].nodePort"), n)?),
        };
        ports.push(ServicePortInfo {
            name: p.name.as_deref().unwrap_or("").into(),
            port,
            protocol: p.protocol.as_deref().filter(|s| !s.is_empty()).unwrap_or("TCP").into(),
            app_protocol: p.app_protocol.as_deref().map(Arc::from),
            node_port,
        });
    }
    let gateway_port = match label(meta, labels::GATEWAY_PORT) {
        None => None,
        Some(v) => match v.trim().parse::<u16>() {
            Ok(p) if p != 0 => Some(p),
            _ => {
                let field = format!("metadata.labels[\"{}\"]", labels::GATEWAY_PORT);
                return Err(id.invalid(field, format!("{v:?} is not a port number (1-65535)")));
            }
        },
    };
    let load_balancer_ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default()
        .iter()
        .filter_map(|ing| {
            ing.ip.as_deref().filter(|s| !s.is_empty()).or(ing.hostname.as_deref().filter(|s| !s.is_empty()))
        })
        .map(Arc::from)
        .collect();
    Ok(TopologyObject::Service(ServiceInfo {
        namespace: id.namespace.unwrap_or("default").into(),
        name: id.name.into(),
        ports,
        network: network_label(meta),
        gateway_port,
        service_type: spec.and_then(|s| s.type_.as_deref()).filter(|s| !s.is_empty()).unwrap_or("ClusterIP").into(),
        external_ips: spec
            .and_then(|s| s.external_ips.as_deref())
            .unwrap_or_default()
            .iter()
            .map(|s| s.as_str().into())
            .collect(),
        load_balancer_ingress,
    }))
}

/// `discovery.k8s.io/v1 EndpointSlice`. `Ok(None)` for slices that do not hold IP addresses (`FQDN`).
pub fn from_endpoint_slice(slice: &EndpointSlice) -> Result<Option<TopologyObject>, Error> {
    let meta = &slice.metadata;
    let id = ident("EndpointSlice", meta, true)?;
    match slice.address_type.as_str() {
        "IPv4" | "IPv6" => {}
        "" => return Err(id.invalid("addressType", "is required")),
        _ => return Ok(None),
    }
    let service = match label(meta, labels::SERVICE_NAME) {
        Some(s) if !s.is_empty() => s,
        _ => {
            let field = format!("metadata.labels[\"{}\"]", labels::SERVICE_NAME);
            return Err(id.invalid(field, "is required (the slice's Service)"));
        }
    };
    let mut ports = Vec::new();
    for (i, p) in slice.ports.as_deref().unwrap_or_default().iter().enumerate() {
        // a port without a number means "all ports": nothing to route to by port
        let Some(n) = p.port else { continue };
        ports.push((Arc::from(p.name.as_deref().unwrap_or("")), port_number(&id, &format!("ports[{i}].port"), n)?));
    }
    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let mut addresses = Vec::with_capacity(ep.addresses.len());
        for (j, a) in ep.addresses.iter().enumerate() {
            let ip = a.trim().parse::<IpAddr>().map_err(|_| {
                id.invalid(format!("endpoints[{i}].addresses[{j}]"), format!("{a:?} is not an IP address"))
            })?;
            addresses.push(ip);
        }
        let cond = ep.conditions.as_ref();
        let pod = ep
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| r.name.as_deref())
            .filter(|n| !n.is_empty())
            .map(Arc::from);
        endpoints.push(SliceEndpoint {
            addresses,
            ready: cond.and_then(|c| c.ready),
            serving: cond.and_then(|c| c.serving),
            terminating: cond.and_then(|c| c.terminating),
            node_name: ep.node_name.as_deref().filter(|n| !n.is_empty()).map(Arc::from),
            zone: ep.zone.as_deref().filter(|z| !z.is_empty()).map(Arc::from),
            pod,
        });
    }
    Ok(Some(TopologyObject::EndpointSlice(SliceInfo {
        namespace: id.namespace.unwrap_or("default").into(),
        name: id.name.into(),
        service: service.into(),
        ports,
        endpoints,
    })))
}

/// `v1 Node`
pub fn from_node(node: &Node) -> Result<TopologyObject, Error> {
    let meta = &node.metadata;
    let id = ident("Node", meta, false)?;
    let get = |key| label(meta, key).unwrap_or("");
    Ok(TopologyObject::Node(NodeInfo {
        name: id.name.into(),
        locality: Locality::new(get(labels::REGION), get(labels::ZONE), get(labels::SUBZONE)),
    }))
}

/// `v1 Pod`
pub fn from_pod(pod: &Pod) -> Result<TopologyObject, Error> {
    let meta = &pod.metadata;
    let id = ident("Pod", meta, true)?;
    let spec = pod.spec.as_ref();
    let service_account = spec
        .and_then(|s| s.service_account_name.as_deref().or(s.service_account.as_deref()))
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    Ok(TopologyObject::Pod(PodInfo {
        namespace: id.namespace.unwrap_or("default").into(),
        name: id.name.into(),
        labels: Arc::new(meta.labels.clone().unwrap_or_default()),
        service_account: service_account.into(),
        node_name: spec.and_then(|s| s.node_name.as_deref()).filter(|n| !n.is_empty()).map(Arc::from),
        network: network_label(meta),
        failed: pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed"),
    }))
}

/// Reads and parses one manifest file (see [`parse_manifests`]).
pub fn parse_file(path: &Path) -> Result<Vec<TopologyObject>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read { file: path.into(), source })?;
    parse_manifests(&text, path)
}

/// Parses a file of Kubernetes manifests: YAML documents separated by `---`, each an object or a `v1 List`
/// of objects (as `kubectl get -o yaml` prints them). Kinds meshfed does not read are skipped; the first
/// invalid document fails the whole file. `file` is only used in error messages.
pub fn parse_manifests(text: &str, file: &Path) -> Result<Vec<TopologyObject>, Error> {
    let mut out = Vec::new();
    for doc in split_documents(text) {
        let at = |reason: String, line: usize| Error::Parse { file: file.into(), line: Some(line), reason };
        let yaml_err = |e: serde_yaml::Error| {
            let (line, reason) = locate(&e, doc.first_line);
            Error::Parse { file: file.into(), line: Some(line), reason }
        };
        let Some(head) = serde_yaml::from_str::<Option<TypeMeta>>(&doc.text).map_err(yaml_err)? else {
            continue; // empty document
        };
        let kind = known_kind(&head).map_err(|reason| at(reason, doc.first_line))?;
        let converted = match kind {
            None => continue,
            Some(KnownKind::List) => {
                let list: ListDoc = serde_yaml::from_str(&doc.text).map_err(yaml_err)?;
                convert_list(list.items.unwrap_or_default(), &mut out, "items")
            }
            Some(k) => convert_text(k, &doc.text).map_err(yaml_err)?.map(|o| out.extend(o)).map_err(|e| e.to_string()),
        };
        converted.map_err(|reason| at(reason, doc.first_line))?;
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(expecting = "a Kubernetes object (a mapping with apiVersion and kind)")]
struct TypeMeta {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
}

#[derive(Deserialize)]
struct ListDoc {
    items: Option<Vec<serde_yaml::Value>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KnownKind {
    List,
    Namespace,
    Service,
    EndpointSlice,
    Node,
    Pod,
    DestinationRule,
}

/// Which of the kinds meshfed reads a document is; `Ok(None)` for any other kind.
fn known_kind(head: &TypeMeta) -> Result<Option<KnownKind>, String> {
    let kind = head.kind.as_deref().filter(|k| !k.is_empty()).ok_or("the document has no `kind`")?;
    let api_version =
        head.api_version.as_deref().filter(|v| !v.is_empty()).ok_or_else(|| format!("{kind}: no `apiVersion`"))?;
    Ok(match (api_version, kind) {
        ("v1", "List") => Some(KnownKind::List),
        ("v1", "Namespace") => Some(KnownKind::Namespace),
        ("v1", "Service") => Some(KnownKind::Service),
        ("discovery.k8s.io/v1", "EndpointSlice") => Some(KnownKind::EndpointSlice),
        ("v1", "Node") => Some(KnownKind::Node),
        ("v1", "Pod") => Some(KnownKind::Pod),
        (
            "networking.istio.io/v1" | "networking.istio.io/v1beta1" | "networking.istio.io/v1alpha3",
            "DestinationRule",
        ) => Some(KnownKind::DestinationRule),
        _ => None,
    })
}

/// Deserializes (outer `Err`, with a YAML location) and converts (inner `Err`) one object document.
#[allow(clippy::type_complexity)]
fn convert_text(kind: KnownKind, text: &str) -> Result<Result<Option<TopologyObject>, Error>, serde_yaml::Error> {
    fn go<K: KubeObject>(text: &str) -> Result<Result<Option<TopologyObject>, Error>, serde_yaml::Error> {
        Ok(serde_yaml::from_str::<K>(text)?.to_topology())
    }
    match kind {
        KnownKind::Namespace => go::<Namespace>(text),
        KnownKind::Service => go::<K8sService>(text),
        KnownKind::EndpointSlice => go::<EndpointSlice>(text),
        KnownKind::Node => go::<Node>(text),
        KnownKind::Pod => go::<Pod>(text),
        KnownKind::DestinationRule => {
            let value: serde_yaml::Value = serde_yaml::from_str(text)?;
            Ok(destination_rule(value))
        }
        // handled by the caller
        KnownKind::List => Ok(Ok(None)),
    }
}

/// Converts the items of a `List` (recursively). Errors name the item (`items[3]`), as values parsed from a
/// List have no line numbers.
fn convert_list(items: Vec<serde_yaml::Value>, out: &mut Vec<TopologyObject>, path: &str) -> Result<(), String> {
    for (i, item) in items.into_iter().enumerate() {
        let field = format!("{path}[{i}]");
        let described = || {
            let kind = item.get("kind").and_then(serde_yaml::Value::as_str).unwrap_or("object");
            let meta = item.get("metadata");
            let get = |k: &str| meta.and_then(|m| m.get(k)).and_then(serde_yaml::Value::as_str);
            match (get("namespace"), get("name")) {
                (Some(ns), Some(name)) => format!("{field} ({kind} {ns}/{name})"),
                (None, Some(name)) => format!("{field} ({kind} {name})"),
                _ => field.clone(),
            }
        };
        let head: TypeMeta = serde_yaml::from_value(item.clone()).map_err(|e| format!("{}: {e}", described()))?;
        let Some(kind) = known_kind(&head).map_err(|e| format!("{}: {e}", described()))? else { continue };
        let converted = match kind {
            KnownKind::List => {
                let list: ListDoc = serde_yaml::from_value(item).map_err(|e| format!("{field}: {e}"))?;
                convert_list(list.items.unwrap_or_default(), out, &format!("{field}.items"))?;
                continue;
            }
            KnownKind::Namespace => convert_value::<Namespace>(&item),
            KnownKind::Service => convert_value::<K8sService>(&item),
            KnownKind::EndpointSlice => convert_value::<EndpointSlice>(&item),
            KnownKind::Node => convert_value::<Node>(&item),
            KnownKind::Pod => convert_value::<Pod>(&item),
            KnownKind::DestinationRule => Ok(destination_rule(item.clone())),
        };
        match converted {
            Err(e) => return Err(format!("{}: {e}", described())),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(obj)) => out.extend(obj),
        }
    }
    Ok(())
}

fn destination_rule(value: serde_yaml::Value) -> Result<Option<TopologyObject>, Error> {
    DestinationRuleInfo::from_value(value).map(|d| Some(TopologyObject::DestinationRule(d))).map_err(|reason| {
        Error::Invalid { kind: "DestinationRule", object: String::new(), field: "metadata.name".into(), reason }
    })
}

fn convert_value<K: KubeObject>(
    item: &serde_yaml::Value,
) -> Result<Result<Option<TopologyObject>, Error>, serde_yaml::Error> {
    Ok(K::deserialize(item)?.to_topology())
}

/// One YAML document of a multi-document file, with the (1-based) line of the file it starts on.
struct Document<'a> {
    text: std::borrow::Cow<'a, str>,
    first_line: usize,
}

/// Splits a YAML stream into documents on `---` / `...` marker lines, remembering where each starts so that
/// errors can name absolute lines. (serde_yaml's own multi-document iterator cannot be dispatched on `kind`
/// first without losing locations.)
fn split_documents(text: &str) -> Vec<Document<'_>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut docs = Vec::new();
    let mut start = 0; // byte offset of the current document
    let mut first_line = 1;
    let mut prefix: Option<String> = None; // content after a `--- ` marker on the marker line
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let line_no = i + 1;
        let trimmed = line.trim_end_matches(['\n', '\r']);
        let marker = ["---", "..."]
            .into_iter()
            .find(|m| trimmed.strip_prefix(m).is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t'])));
        if let Some(m) = marker {
            let body = &text[start..offset];
            docs.push(Document {
                text: match prefix.take() {
                    Some(p) => std::borrow::Cow::Owned(p + body),
                    None => std::borrow::Cow::Borrowed(body),
                },
                first_line,
            });
            let rest = &trimmed[m.len()..];
            if m == "---" && !rest.trim_start().is_empty() && !rest.trim_start().starts_with('#') {
                // `--- !tag` / `--- {inline}`: the content belongs to the new document; keep its columns
                prefix = Some(format!("{}{rest}\n", " ".repeat(m.len())));
                first_line = line_no;
            } else {
                first_line = line_no + 1;
            }
            start = offset + line.len();
        }
        offset += line.len();
    }
    let body = &text[start..];
    docs.push(Document {
        text: match prefix.take() {
            Some(p) => std::borrow::Cow::Owned(p + body),
            None => std::borrow::Cow::Borrowed(body),
        },
        first_line,
    });
    // `%YAML` / `%TAG` directives only precede a `---`: drop them from the document they would start.
    for doc in &mut docs {
        if doc.text.lines().any(|l| l.starts_with('%')) {
            let cleaned: String =
                doc.text.split_inclusive('\n').map(|l| if l.starts_with('%') { "\n" } else { l }).collect();
            doc.text = std::borrow::Cow::Owned(cleaned);
        }
    }
    docs
}

/// The absolute line of a serde_yaml error and its message, with document-relative positions rewritten.
fn locate(e: &serde_yaml::Error, first_line: usize) -> (usize, String) {
    let msg = e.to_string();
    let Some(loc) = e.location() else {
        return (first_line, msg);
    };
    let line = first_line + loc.line() - 1;
    // the message names its primary position as " at line L column C": say the column only (the line is
    // shown in front), and shift any other (context) position to an absolute line
    let primary = format!(" at line {} column {}", loc.line(), loc.column());
    let msg = match msg.find(&primary) {
        Some(i) => {
            let (before, after) = (&msg[..i], shift_lines(&msg[i + primary.len()..], first_line - 1));
            format!("{before} at column {}{after}", loc.column())
        }
        None => format!("{} (column {})", shift_lines(&msg, first_line - 1), loc.column()),
    };
    (line, msg)
}

/// Adds `by` to every "line N" in a message.
fn shift_lines(msg: &str, by: usize) -> String {
    if by == 0 {
        return msg.to_string();
    }
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find("line ") {
        out.push_str(&rest[..i + 5]);
        rest = &rest[i + 5..];
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        match rest[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + by).to_string()),
            Err(_) => out.push_str(&rest[..digits]),
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<TopologyObject> {
        match parse_manifests(text, Path::new("test.yaml")) {
            Ok(objs) => objs,
            Err(e) => panic!("parse failed: {e}"),
        }
    }

    fn parse_err(text: &str) -> Error {
        match parse_manifests(text, Path::new("shop.yaml")) {
            Ok(objs) => panic!("expected an error, parsed {objs:?}"),
            Err(e) => e,
        }
    }

    const NAMESPACE: &str = r#"apiVersion: v1
kind: Namespace
metadata:
  creationTimestamp: "2025-01-10T09:00:00Z"
  labels:
    kubernetes.io/metadata.name: istio-system
    topology.istio.io/network: aws-net
  name: istio-system
  resourceVersion: "312"
  uid: 0b1f6a52-3c1e-4d2a-9a55-0f2d1c7e6a01
spec:
  finalizers:
  - kubernetes
status:
  phase: Active
"#;

    #[test]
    fn namespace_with_network_label() {
        let objs = parse(NAMESPACE);
        assert_eq!(
            objs,
            vec![TopologyObject::Namespace(NamespaceInfo {
                name: "istio-system".into(),
                network: Some(NetworkId::new("aws-net")),
            })]
        );
        let plain = parse("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n");
        assert_eq!(plain, vec![TopologyObject::Namespace(NamespaceInfo { name: "shop".into(), network: None })]);
    }

    const GATEWAY_SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata:
  labels:
    app: istio-eastwestgateway
    networking.istio.io/gatewayPort: "15443"
    topology.istio.io/network: aws-net
  name: istio-eastwestgateway
  namespace: istio-system
  resourceVersion: "1201"
  uid: 5d0c3b8e-8f0e-4a57-b1e2-3f9a7c2d4e10
spec:
  allocateLoadBalancerNodePorts: true
  clusterIP: 10.100.12.7
  clusterIPs:
  - 10.100.12.7
  externalIPs:
  - 192.0.2.10
  externalTrafficPolicy: Cluster
  internalTrafficPolicy: Cluster
  ipFamilies:
  - IPv4
  ipFamilyPolicy: SingleStack
  ports:
  - name: status-port
    nodePort: 31021
    port: 15021
    protocol: TCP
    targetPort: 15021
  - name: tls
    nodePort: 31443
    port: 15443
    protocol: TCP
    targetPort: 15443
  selector:
    app: istio-eastwestgateway
  sessionAffinity: None
  type: LoadBalancer
status:
  loadBalancer:
    ingress:
    - ip: 127.0.10.1
      ipMode: VIP
    - hostname: a1b2c3.elb.us-east-1.amazonaws.com
"#;

    #[test]
    fn service_gateway() {
        let objs = parse(GATEWAY_SERVICE);
        let [TopologyObject::Service(s)] = objs.as_slice() else { panic!("expected one service: {objs:?}") };
        assert_eq!(&*s.namespace, "istio-system");
        assert_eq!(&*s.name, "istio-eastwestgateway");
        assert_eq!(s.network, Some(NetworkId::new("aws-net")));
        assert_eq!(s.gateway_port, Some(15443));
        assert_eq!(&*s.service_type, "LoadBalancer");
        assert_eq!(s.external_ips, vec![Arc::from("192.0.2.10")]);
        assert_eq!(
            s.load_balancer_ingress,
            vec![Arc::from("127.0.10.1"), Arc::from("a1b2c3.elb.us-east-1.amazonaws.com")]
        );
        assert_eq!(
            s.ports[1],
            ServicePortInfo {
                name: "tls".into(),
                port: 15443,
                protocol: "TCP".into(),
                app_protocol: None,
                node_port: Some(31443)
            }
        );
    }

    #[test]
    fn service_defaults() {
        let objs = parse(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: ratings\nspec:\n  ports:\n  - port: 9080\n  - name: grpc\n    port: 9091\n    appProtocol: grpc\n",
        );
        let [TopologyObject::Service(s)] = objs.as_slice() else { panic!("expected one service: {objs:?}") };
        assert_eq!(&*s.namespace, "default");
        assert_eq!(&*s.service_type, "ClusterIP");
        assert_eq!(s.network, None);
        assert_eq!(s.gateway_port, None);
        assert!(s.external_ips.is_empty() && s.load_balancer_ingress.is_empty());
        assert_eq!(&*s.ports[0].name, "");
        assert_eq!(&*s.ports[0].protocol, "TCP");
        assert_eq!(s.ports[1].app_protocol.as_deref(), Some("grpc"));
        assert_eq!(s.ports[1].node_port, None);
    }

    #[test]
    fn service_bad_gateway_port_label() {
        let text = GATEWAY_SERVICE.replace("\"15443\"", "\"tls\"");
        let msg = parse_err(&text).to_string();
        assert!(msg.starts_with("shop.yaml:1: "), "{msg}");
        assert!(msg.contains("Service istio-system/istio-eastwestgateway"), "{msg}");
        assert!(msg.contains("networking.istio.io/gatewayPort"), "{msg}");
    }

    #[test]
    fn service_port_out_of_range() {
        let msg = parse_err("apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n  namespace: shop\nspec:\n  ports:\n  - port: 70000\n")
            .to_string();
        assert!(msg.contains("Service shop/a: spec.ports[0].port: port 70000 is out of range"), "{msg}");
    }

    const SLICE: &str = r#"addressType: IPv4
apiVersion: discovery.k8s.io/v1
endpoints:
- addresses:
  - 127.0.1.21
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: ip-10-0-1-10.ec2.internal
  targetRef:
    kind: Pod
    name: reviews-v1-5f7d8-a1
    namespace: shop
    uid: 7e4c2f9a-1b3d-4c5e-8f6a-2d1b0c9e8a71
  zone: us-east-1a
- addresses:
  - 127.0.2.21
  conditions:
    ready: false
    terminating: true
  targetRef:
    kind: Node
    name: some-node
- addresses:
  - fd00::21
kind: EndpointSlice
metadata:
  generateName: reviews-
  generation: 3
  labels:
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    kubernetes.io/service-name: reviews
  name: reviews-x7k2p
  namespace: shop
  ownerReferences:
  - apiVersion: v1
    blockOwnerDeletion: true
    controller: true
    kind: Service
    name: reviews
    uid: 3c0d2e1f-4a5b-6c7d-8e9f-0a1b2c3d4e5f
  resourceVersion: "2210"
  uid: 9a8b7c6d-5e4f-3a2b-1c0d-efab12345678
ports:
- name: http
  port: 9080
  protocol: TCP
- name: all
  protocol: TCP
"#;

    #[test]
    fn endpoint_slice() {
        let objs = parse(SLICE);
        let [TopologyObject::EndpointSlice(s)] = objs.as_slice() else { panic!("expected one slice: {objs:?}") };
        assert_eq!((&*s.namespace, &*s.name, &*s.service), ("shop", "reviews-x7k2p", "reviews"));
        assert_eq!(s.ports, vec![(Arc::from("http"), 9080)], "a port without a number is skipped");
        assert_eq!(s.endpoints.len(), 3);
        assert_eq!(
            s.endpoints[0],
            SliceEndpoint {
                addresses: vec!["127.0.1.21".parse().unwrap()],
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
                node_name: Some("ip-10-0-1-10.ec2.internal".into()),
                zone: Some("us-east-1a".into()),
                pod: Some("reviews-v1-5f7d8-a1".into()),
            }
        );
        let e1 = &s.endpoints[1];
        assert_eq!((e1.ready, e1.serving, e1.terminating), (Some(false), None, Some(true)));
        assert_eq!(e1.pod, None, "targetRef to something else than a Pod is ignored");
        assert_eq!(s.endpoints[2].addresses, vec!["fd00::21".parse::<IpAddr>().unwrap()]);
        assert_eq!((s.endpoints[2].ready, s.endpoints[2].node_name.as_ref()), (None, None));
    }

    #[test]
    fn endpoint_slice_fqdn_is_skipped() {
        assert!(parse(&SLICE.replace("addressType: IPv4", "addressType: FQDN")).is_empty());
    }

    #[test]
    fn endpoint_slice_without_service_label() {
        let msg = parse_err(&SLICE.replace("kubernetes.io/service-name: reviews", "app: reviews")).to_string();
        assert!(msg.contains("EndpointSlice shop/reviews-x7k2p"), "{msg}");
        assert!(msg.contains("kubernetes.io/service-name"), "{msg}");
    }

    #[test]
    fn endpoint_slice_invalid_ip() {
        let msg = parse_err(&SLICE.replace("127.0.2.21", "127.0.2.x")).to_string();
        assert!(msg.starts_with("shop.yaml:1: "), "{msg}");
        assert!(msg.contains("EndpointSlice shop/reviews-x7k2p: endpoints[1].addresses[0]"), "{msg}");
        assert!(msg.contains("\"127.0.2.x\" is not an IP address"), "{msg}");
    }

    #[test]
    fn node_locality() {
        let text = r#"apiVersion: v1
kind: Node
metadata:
  labels:
    kubernetes.io/hostname: aks-nodepool1-0
    topology.kubernetes.io/region: westeurope
    topology.kubernetes.io/zone: westeurope-1
  name: aks-nodepool1-0
spec:
  podCIDR: 10.244.0.0/24
status:
  addresses:
  - address: 10.224.0.4
    type: InternalIP
"#;
        assert_eq!(
            parse(text),
            vec![TopologyObject::Node(NodeInfo {
                name: "aks-nodepool1-0".into(),
                locality: Locality::new("westeurope", "westeurope-1", ""),
            })]
        );
        let bare = parse("apiVersion: v1\nkind: Node\nmetadata:\n  name: n\n");
        assert_eq!(bare, vec![TopologyObject::Node(NodeInfo { name: "n".into(), locality: Locality::default() })]);
    }

    const POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  labels:
    app: reviews
    pod-template-hash: 5f7d8
    version: v1
  name: reviews-v1-5f7d8-a1
  namespace: shop
  uid: 7e4c2f9a-1b3d-4c5e-8f6a-2d1b0c9e8a71
spec:
  containers:
  - image: docker.io/istio/examples-bookinfo-reviews-v1:1.20.2
    name: reviews
    ports:
    - containerPort: 9080
      protocol: TCP
  nodeName: ip-10-0-1-10.ec2.internal
  serviceAccount: reviews
  serviceAccountName: reviews
status:
  phase: Running
  podIP: 127.0.1.21
"#;

    #[test]
    fn pod_fields() {
        let objs = parse(POD);
        let [TopologyObject::Pod(p)] = objs.as_slice() else { panic!("expected one pod: {objs:?}") };
        assert_eq!((&*p.namespace, &*p.name, &*p.service_account), ("shop", "reviews-v1-5f7d8-a1", "reviews"));
        assert_eq!(p.labels.get("app").map(String::as_str), Some("reviews"));
        assert_eq!(p.labels.len(), 3);
        assert_eq!(p.node_name.as_deref(), Some("ip-10-0-1-10.ec2.internal"));
        assert_eq!(p.network, None);
        assert!(!p.failed);

        let failed = parse(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: x\n  namespace: shop\n  labels:\n    topology.istio.io/network: n1\nstatus:\n  phase: Failed\n",
        );
        let [TopologyObject::Pod(p)] = failed.as_slice() else { panic!("expected one pod: {failed:?}") };
        assert!(p.failed);
        assert_eq!(&*p.service_account, "default");
        assert_eq!(p.network, Some(NetworkId::new("n1")));
        assert_eq!(p.node_name, None);
    }

    #[test]
    fn kubectl_list() {
        let mut text = String::from("apiVersion: v1\nitems:\n");
        for doc in [NAMESPACE, POD, "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: reviews-v1\n"] {
            for (i, line) in doc.lines().enumerate() {
                text.push_str(if i == 0 { "- " } else { "  " });
                text.push_str(line);
                text.push('\n');
            }
        }
        text.push_str("- apiVersion: v1\n  kind: List\n  items:\n  - apiVersion: v1\n    kind: Node\n    metadata:\n      name: n1\n");
        text.push_str("kind: List\nmetadata:\n  resourceVersion: \"\"\n");
        let objs = parse(&text);
        let kinds: Vec<Kind> = objs.iter().map(|o| o.key().kind).collect();
        assert_eq!(kinds, vec![Kind::Namespace, Kind::Pod, Kind::Node]);

        // an invalid item is named by its index and identity
        let bad = text.replace("podIP: 127.0.1.21", "podIP: [1, 2]");
        let msg = parse_err(&bad).to_string();
        assert!(msg.starts_with("shop.yaml:1: items[1] (Pod shop/reviews-v1-5f7d8-a1): "), "{msg}");
    }

    #[test]
    fn multi_document_error_reports_absolute_line() {
        // a type error in the second document: line 5 of the document, line 20 of the file
        let first = NAMESPACE; // 15 lines
        assert_eq!(first.lines().count(), 15);
        let text = format!(
            "{first}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: reviews\nspec:\n  ports:\n  - port: nine\n"
        );
        let err = parse_err(&text);
        assert_eq!(err.line(), Some(23));
        assert_eq!(err.file(), Some(Path::new("shop.yaml")));
        let msg = err.to_string();
        assert!(msg.starts_with("shop.yaml:23: spec.ports[0].port: invalid type"), "{msg}");
        assert!(!msg.contains("line 8"), "no document-relative line: {msg}");

        // a YAML syntax error in the third document
        let text = format!("{first}---\n# comment\n--- # another\napiVersion: v1\nkind: Pod\nmetadata:\n  name: [x\n");
        let err = parse_err(&text);
        let msg = err.to_string();
        assert!(matches!(err.line(), Some(23 | 24)), "{msg}");
        assert!(msg.starts_with("shop.yaml:2"), "{msg}");

        // an invalid object reports the line its document starts on
        let text = format!("{first}---\napiVersion: v1\nkind: Node\nmetadata:\n  labels: {{}}\n");
        let msg = parse_err(&text).to_string();
        assert_eq!(msg, "shop.yaml:17: Node <no name>: metadata.name: is required");
    }

    #[test]
    fn unknown_kinds_and_empty_documents_are_skipped() {
        let text = format!(
            "---\n# only a comment\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: reviews-v1\nspec:\n  replicas: 2\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  a: b\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: r\n---\n{POD}...\n"
        );
        let objs = parse(&text);
        assert_eq!(objs.len(), 1);
        assert_eq!(objs[0].key().kind, Kind::Pod);
        assert!(parse("").is_empty());
        assert!(parse("\u{feff}# nothing\n---\n---\n").is_empty());
    }

    #[test]
    fn document_without_kind_is_an_error() {
        let msg =
            parse_err("apiVersion: v1\nkind: Node\nmetadata:\n  name: n\n---\napiVersion: v1\nmetadata:\n  name: x\n")
                .to_string();
        assert!(msg.starts_with("shop.yaml:6: "), "{msg}");
        assert!(msg.contains("no `kind`"), "{msg}");
        let msg = parse_err("just a string\n").to_string();
        assert!(msg.starts_with("shop.yaml:1: "), "{msg}");
    }

    #[test]
    fn missing_name_is_an_error() {
        let msg = parse_err("apiVersion: v1\nkind: Pod\nmetadata:\n  namespace: shop\n").to_string();
        assert_eq!(msg, "shop.yaml:1: Pod shop/<no name>: metadata.name: is required");
        let msg = parse_err(&SLICE.replace("name: reviews-x7k2p", "labels2: {}")).to_string();
        assert!(msg.contains("EndpointSlice shop/<no name>: metadata.name: is required"), "{msg}");
    }

    #[test]
    fn from_kube_generic() {
        let pod: Pod = serde_yaml::from_str(POD).unwrap();
        let obj = TopologyObject::from_kube(&pod).unwrap().unwrap();
        assert_eq!(
            obj.key(),
            ObjectKey { kind: Kind::Pod, namespace: "shop".into(), name: "reviews-v1-5f7d8-a1".into() }
        );
        assert_eq!(Some(obj), from_pod(&pod).ok());
    }

    #[test]
    fn destination_rules_are_parsed_and_invalid_ones_kept_as_errors() {
        let text = "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata:\n  name: ok\n  namespace: shop\nspec:\n  host: reviews\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: bad\n  namespace: shop\nspec:\n  host: reviews\n  trafficPolicy:\n    outlierDetection:\n      interval: soon\n";
        let objs = parse_manifests(text, Path::new("dr.yaml")).expect("an invalid rule does not fail the file");
        assert_eq!(objs.len(), 2);
        let TopologyObject::DestinationRule(ok) = &objs[0] else { panic!("a rule") };
        assert!(ok.rule.is_ok());
        let TopologyObject::DestinationRule(bad) = &objs[1] else { panic!("a rule") };
        let err = bad.rule.as_ref().unwrap_err();
        assert_eq!(err.object, "shop/bad");
        assert_eq!(err.field, "spec.trafficPolicy.outlierDetection.interval");
        assert_eq!(objs[1].key().kind, Kind::DestinationRule);
    }
}
