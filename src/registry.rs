//! The federated registry: every cluster's objects, merged into one view of services and endpoints.
//!
//! Sources apply [`SourceEvent`]s; each application returns a [`RegistryChange`] naming the services it
//! touched and whether only their endpoints changed (an EDS-only push) or their shape did (ports,
//! existence: clusters, listeners and routes too). The federated view is a persistent map, so taking a
//! snapshot for translation or for the debug surface costs O(1).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::mesh_config::MeshConfig;
use crate::model::{
    ClusterId, Endpoint, Gateway, Health, Locality, NetworkId, Protocol, Service, ServiceKey, ServicePort, TlsMode,
    Workload,
};
use crate::policy::DestinationRule;
use crate::source::SourceEvent;
use crate::topology::{
    self, DestinationRuleInfo, Kind, NamespaceInfo, NodeInfo, ObjectKey, PodInfo, ServiceInfo, SliceInfo,
    TopologyObject,
};

/// Istio's default east-west gateway port (mTLS auto-passthrough).
pub const DEFAULT_GATEWAY_PORT: u16 = 15443;

/// The namespace whose `topology.istio.io/network` label sets a cluster's default network.
pub const SYSTEM_NAMESPACE: &str = "istio-system";

/// How a service changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum ChangeKind {
    /// only its endpoints changed: clusters, listeners and routes are unaffected
    Endpoints,
    /// it appeared, disappeared, or its ports changed
    Shape,
}

/// What one or more applied events changed. Merging changes keeps the strongest kind per service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistryChange {
    pub services: BTreeMap<ServiceKey, ChangeKind>,
    /// the set of east-west gateways changed
    pub gateways: bool,
    /// DestinationRules changed (every service's policy may have changed)
    pub policies: bool,
}

impl RegistryChange {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && !self.gateways && !self.policies
    }

    pub fn merge(&mut self, other: RegistryChange) {
        for (k, v) in other.services {
            let e = self.services.entry(k).or_insert(v);
            *e = (*e).max(v);
        }
        self.gateways |= other.gateways;
        self.policies |= other.policies;
    }

    /// true when anything beyond endpoints changed (clusters, listeners or routes must be rebuilt)
    pub fn has_shape_change(&self) -> bool {
        self.gateways || self.policies || self.services.values().any(|k| *k == ChangeKind::Shape)
    }
}

/// (namespace, name) of a namespaced object.
type NsName = (Arc<str>, Arc<str>);

/// One cluster's objects, in the compact forms of [`crate::topology`].
#[derive(Clone, Debug, Default)]
struct ClusterState {
    /// network from the mesh config; the system namespace's label and pod labels override it
    configured_network: NetworkId,
    namespaces: BTreeMap<Arc<str>, NamespaceInfo>,
    services: BTreeMap<(Arc<str>, Arc<str>), ServiceInfo>,
    slices: BTreeMap<(Arc<str>, Arc<str>), SliceInfo>,
    nodes: BTreeMap<Arc<str>, NodeInfo>,
    pods: BTreeMap<(Arc<str>, Arc<str>), PodInfo>,
    /// the cluster's API server has been unreachable since then (None: reachable)
    unreachable_since: Option<std::time::SystemTime>,
    destination_rules: BTreeMap<NsName, DestinationRuleInfo>,
    /// (namespace, service) -> slice names
    slices_by_service: BTreeMap<NsName, BTreeSet<Arc<str>>>,
    /// node name -> services with endpoints on it (with a reference count)
    node_refs: BTreeMap<Arc<str>, BTreeMap<ServiceKey, usize>>,
    /// (namespace, pod) -> services with endpoints backed by it (with a reference count)
    pod_refs: BTreeMap<(Arc<str>, Arc<str>), BTreeMap<ServiceKey, usize>>,
}

impl ClusterState {
    fn network(&self) -> NetworkId {
        self.namespaces
            .get(SYSTEM_NAMESPACE)
            .and_then(|n| n.network.clone())
            .unwrap_or_else(|| self.configured_network.clone())
    }

    fn get(&self, key: &ObjectKey) -> Option<TopologyObject> {
        let nk = (key.namespace.clone(), key.name.clone());
        match key.kind {
            Kind::Namespace => self.namespaces.get(&key.name).cloned().map(TopologyObject::Namespace),
            Kind::Service => self.services.get(&nk).cloned().map(TopologyObject::Service),
            Kind::EndpointSlice => self.slices.get(&nk).cloned().map(TopologyObject::EndpointSlice),
            Kind::Node => self.nodes.get(&key.name).cloned().map(TopologyObject::Node),
            Kind::Pod => self.pods.get(&nk).cloned().map(TopologyObject::Pod),
            Kind::DestinationRule => self.destination_rules.get(&nk).cloned().map(TopologyObject::DestinationRule),
        }
    }

    fn keys(&self) -> Vec<ObjectKey> {
        let e: Arc<str> = Arc::from("");
        let mut out = Vec::new();
        out.extend(self.namespaces.keys().map(|n| ObjectKey {
            kind: Kind::Namespace,
            namespace: e.clone(),
            name: n.clone(),
        }));
        out.extend(self.nodes.keys().map(|n| ObjectKey { kind: Kind::Node, namespace: e.clone(), name: n.clone() }));
        let nk = |kind, (ns, n): &(Arc<str>, Arc<str>)| ObjectKey { kind, namespace: ns.clone(), name: n.clone() };
        out.extend(self.services.keys().map(|k| nk(Kind::Service, k)));
        out.extend(self.slices.keys().map(|k| nk(Kind::EndpointSlice, k)));
        out.extend(self.pods.keys().map(|k| nk(Kind::Pod, k)));
        out.extend(self.destination_rules.keys().map(|k| nk(Kind::DestinationRule, k)));
        out
    }

    fn index_slice(&mut self, slice: &SliceInfo, add: bool) {
        let svc = ServiceKey { namespace: slice.namespace.clone(), name: slice.service.clone() };
        let names = self.slices_by_service.entry((slice.namespace.clone(), slice.service.clone())).or_default();
        if add {
            names.insert(slice.name.clone());
        } else {
            names.remove(&slice.name);
            if names.is_empty() {
                self.slices_by_service.remove(&(slice.namespace.clone(), slice.service.clone()));
            }
        }
        fn bump<K: Ord + Clone>(map: &mut BTreeMap<K, BTreeMap<ServiceKey, usize>>, k: K, svc: &ServiceKey, add: bool) {
            let m = map.entry(k.clone()).or_default();
            if add {
                *m.entry(svc.clone()).or_default() += 1;
            } else if let Some(c) = m.get_mut(svc) {
                *c -= 1;
                if *c == 0 {
                    m.remove(svc);
                }
            }
            if m.is_empty() {
                map.remove(&k);
            }
        }
        for ep in &slice.endpoints {
            if let Some(node) = &ep.node_name {
                bump(&mut self.node_refs, node.clone(), &svc, add);
            }
            if let Some(pod) = &ep.pod {
                bump(&mut self.pod_refs, (slice.namespace.clone(), pod.clone()), &svc, add);
            }
        }
    }

    /// Applies one upsert or delete; returns the services whose federated view may have changed.
    fn apply(&mut self, key: &ObjectKey, object: Option<TopologyObject>, touched: &mut Touched) {
        let nk = (key.namespace.clone(), key.name.clone());
        match (key.kind, object) {
            (Kind::Namespace, obj) => {
                let new = obj.and_then(|o| if let TopologyObject::Namespace(n) = o { Some(n) } else { None });
                let old_network = self.network();
                let old = match new {
                    Some(n) => self.namespaces.insert(key.name.clone(), n),
                    None => self.namespaces.remove(&key.name),
                };
                if &*key.name == SYSTEM_NAMESPACE && self.network() != old_network {
                    touched.all_in_cluster = true;
                }
                let _ = old;
            }
            (Kind::Service, obj) => {
                let new = obj.and_then(|o| if let TopologyObject::Service(s) = o { Some(s) } else { None });
                let old = match new.clone() {
                    Some(s) => self.services.insert(nk.clone(), s),
                    None => self.services.remove(&nk),
                };
                if old.as_ref().is_some_and(|s| s.network.is_some())
                    || new.as_ref().is_some_and(|s| s.network.is_some())
                {
                    touched.gateways = true;
                }
                touched.services.insert(ServiceKey { namespace: nk.0, name: nk.1 });
            }
            (Kind::EndpointSlice, obj) => {
                let new = obj.and_then(|o| if let TopologyObject::EndpointSlice(s) = o { Some(s) } else { None });
                if let Some(old) = self.slices.remove(&nk) {
                    self.index_slice(&old, false);
                    touched.services.insert(ServiceKey { namespace: old.namespace.clone(), name: old.service.clone() });
                }
                if let Some(s) = new {
                    self.index_slice(&s, true);
                    touched.services.insert(ServiceKey { namespace: s.namespace.clone(), name: s.service.clone() });
                    self.slices.insert(nk, s);
                }
            }
            (Kind::Node, obj) => {
                let new = obj.and_then(|o| if let TopologyObject::Node(n) = o { Some(n) } else { None });
                match new {
                    Some(n) => self.nodes.insert(key.name.clone(), n),
                    None => self.nodes.remove(&key.name),
                };
                if let Some(refs) = self.node_refs.get(&key.name) {
                    touched.services.extend(refs.keys().cloned());
                }
                // Endpoints without a nodeName are placed through their pod's node.
                for (pod_key, _) in self.pods.iter().filter(|(_, p)| p.node_name.as_ref() == Some(&key.name)) {
                    if let Some(refs) = self.pod_refs.get(pod_key) {
                        touched.services.extend(refs.keys().cloned());
                    }
                }
                if self.services.iter().any(|(_, s)| s.network.is_some()) {
                    touched.gateways = true; // gateway addresses may come from nodes (NodePort)
                }
            }
            (Kind::DestinationRule, obj) => {
                let new = obj.and_then(|o| if let TopologyObject::DestinationRule(d) = o { Some(d) } else { None });
                match new {
                    Some(d) => {
                        if let Err(e) = &d.rule {
                            tracing::warn!("{e}; the rule is ignored");
                        }
                        self.destination_rules.insert(nk, d)
                    }
                    None => self.destination_rules.remove(&nk),
                };
                touched.policies = true;
            }
            (Kind::Pod, obj) => {
                let new = obj.and_then(|o| if let TopologyObject::Pod(p) = o { Some(p) } else { None });
                match new {
                    Some(p) => self.pods.insert(nk.clone(), p),
                    None => self.pods.remove(&nk),
                };
                if let Some(refs) = self.pod_refs.get(&nk) {
                    touched.services.extend(refs.keys().cloned());
                }
            }
        }
    }
}

#[derive(Default)]
struct Touched {
    services: BTreeSet<ServiceKey>,
    all_in_cluster: bool,
    gateways: bool,
    policies: bool,
}

/// A summary of one cluster for the debug surface.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterSummary {
    pub id: ClusterId,
    pub network: NetworkId,
    pub namespaces: usize,
    pub services: usize,
    pub endpoint_slices: usize,
    pub nodes: usize,
    pub pods: usize,
}

/// The federated registry. Owned by the push loop; read through cheap snapshots.
#[derive(Clone, Debug)]
pub struct Registry {
    domain_suffix: Arc<str>,
    clusters: BTreeMap<ClusterId, ClusterState>,
    services: imbl::OrdMap<ServiceKey, Arc<Service>>,
    gateways: Arc<Vec<Gateway>>,
    destination_rules: Arc<Vec<Arc<DestinationRule>>>,
}

impl Registry {
    pub fn new(mesh: &MeshConfig) -> Registry {
        let mut r = Registry {
            domain_suffix: mesh.domain_suffix.as_str().into(),
            clusters: BTreeMap::new(),
            services: imbl::OrdMap::new(),
            gateways: Arc::new(Vec::new()),
            destination_rules: Arc::new(Vec::new()),
        };
        for c in &mesh.clusters {
            r.add_cluster(c.id.clone(), c.network.clone());
        }
        r
    }

    /// Declares a cluster and its configured network (a cluster first seen in an event gets no network).
    pub fn add_cluster(&mut self, id: ClusterId, network: NetworkId) {
        self.clusters.entry(id).or_default().configured_network = network;
    }

    /// The clusters whose API server is unreachable, with the time it became so
    /// ([`SourceEvent::ClusterReachability`]).
    pub fn unreachable_clusters(&self) -> BTreeMap<ClusterId, std::time::SystemTime> {
        self.clusters.iter().filter_map(|(id, c)| Some((id.clone(), c.unreachable_since?))).collect()
    }

    pub fn domain_suffix(&self) -> &str {
        &self.domain_suffix
    }

    /// The federated services, by namespace/name. Cloning the map is O(1).
    pub fn services(&self) -> &imbl::OrdMap<ServiceKey, Arc<Service>> {
        &self.services
    }

    pub fn service(&self, key: &ServiceKey) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    /// East-west gateways of every network, sorted.
    pub fn gateways(&self) -> &Arc<Vec<Gateway>> {
        &self.gateways
    }

    /// The valid DestinationRules of every cluster, in a deterministic order (cluster, namespace, name); a
    /// rule with the same namespace/name in several clusters (replicated config) counts once.
    pub fn destination_rules(&self) -> &Arc<Vec<Arc<DestinationRule>>> {
        &self.destination_rules
    }

    /// DestinationRules that are ignored because they are invalid, with the reason.
    pub fn policy_errors(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (cid, c) in &self.clusters {
            for d in c.destination_rules.values() {
                if let Err(e) = &d.rule {
                    out.push(format!("cluster {cid}: {e}"));
                }
            }
        }
        out
    }

    fn build_destination_rules(&self) -> Vec<Arc<DestinationRule>> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for c in self.clusters.values() {
            for (k, d) in &c.destination_rules {
                if let Ok(rule) = &d.rule
                    && seen.insert(k.clone())
                {
                    out.push(rule.clone());
                }
            }
        }
        out
    }

    /// A cluster's default network, if the cluster is known.
    pub fn cluster_network(&self, id: &ClusterId) -> Option<NetworkId> {
        self.clusters.get(id).map(|c| c.network())
    }

    /// The clusters' ids.
    pub fn cluster_ids(&self) -> impl Iterator<Item = ClusterId> + '_ {
        self.clusters.keys().cloned()
    }

    pub fn cluster_summaries(&self) -> Vec<ClusterSummary> {
        self.clusters
            .iter()
            .map(|(id, c)| ClusterSummary {
                id: id.clone(),
                network: c.network(),
                namespaces: c.namespaces.len(),
                services: c.services.len(),
                endpoint_slices: c.slices.len(),
                nodes: c.nodes.len(),
                pods: c.pods.len(),
            })
            .collect()
    }

    /// Applies one source event and reports what changed in the federated view.
    pub fn apply(&mut self, event: SourceEvent) -> RegistryChange {
        let cluster_id = event.cluster().clone();
        let state = self.clusters.entry(cluster_id.clone()).or_default();
        let mut touched = Touched::default();
        match event {
            SourceEvent::Upsert { object, .. } => {
                let key = object.key();
                if state.get(&key).as_ref() != Some(&object) {
                    state.apply(&key, Some(object), &mut touched);
                }
            }
            SourceEvent::Delete { key, .. } => {
                if state.get(&key).is_some() {
                    state.apply(&key, None, &mut touched);
                }
            }
            // Recorded only: the push loop decides when an unreachable cluster is demoted (no clock here).
            SourceEvent::ClusterReachability { reachable, since, .. } => {
                state.unreachable_since = (!reachable).then_some(since);
            }
            SourceEvent::Sync { objects, .. } => {
                let mut incoming: BTreeMap<ObjectKey, TopologyObject> = BTreeMap::new();
                for o in objects {
                    incoming.insert(o.key(), o);
                }
                // Namespaces and nodes first so that endpoints resolve against the new ones.
                for key in state.keys() {
                    if !incoming.contains_key(&key) {
                        state.apply(&key, None, &mut touched);
                    }
                }
                for (key, object) in incoming {
                    if state.get(&key).as_ref() != Some(&object) {
                        state.apply(&key, Some(object), &mut touched);
                    }
                }
            }
        }
        let mut keys = touched.services;
        if touched.all_in_cluster {
            keys.extend(state.services.keys().map(|(ns, n)| ServiceKey { namespace: ns.clone(), name: n.clone() }));
            keys.extend(self.services.values().filter(|s| s.clusters.contains(&cluster_id)).map(|s| s.key.clone()));
            touched.gateways = true;
        }
        let mut change = RegistryChange::default();
        for key in keys {
            if let Some(kind) = self.rebuild_service(&key) {
                change.services.insert(key, kind);
            }
        }
        if touched.policies {
            let rules = self.build_destination_rules();
            if rules != *self.destination_rules {
                self.destination_rules = Arc::new(rules);
                change.policies = true;
            }
        }
        if touched.gateways {
            let gateways = Arc::new(self.build_gateways());
            if *gateways != *self.gateways {
                self.gateways = gateways;
                change.gateways = true;
            }
        }
        change
    }

    /// Rebuilds one federated service from every cluster's objects; returns how it changed, if it did.
    fn rebuild_service(&mut self, key: &ServiceKey) -> Option<ChangeKind> {
        let new = self.build_service(key);
        let old = self.services.get(key);
        let kind = match (old, &new) {
            (None, None) => return None,
            (Some(o), Some(n)) if **o == *n => return None,
            (Some(o), Some(n)) if o.ports == n.ports && o.clusters == n.clusters => ChangeKind::Endpoints,
            _ => ChangeKind::Shape,
        };
        match new {
            Some(s) => self.services.insert(key.clone(), Arc::new(s)),
            None => self.services.remove(key),
        };
        Some(kind)
    }

    fn build_service(&self, key: &ServiceKey) -> Option<Service> {
        let nk = (key.namespace.clone(), key.name.clone());
        let mut ports: Vec<ServicePort> = Vec::new();
        let mut clusters = Vec::new();
        let mut endpoints: Vec<Endpoint> = Vec::new();
        for (cid, state) in &self.clusters {
            let Some(info) = state.services.get(&nk) else { continue };
            clusters.push(cid.clone());
            for p in &info.ports {
                if !ports.iter().any(|x| x.port == p.port) {
                    ports.push(ServicePort {
                        name: p.name.clone(),
                        port: p.port,
                        protocol: Protocol::detect(p.app_protocol.as_deref(), &p.name, &p.protocol),
                    });
                }
            }
            let network = state.network();
            let Some(slice_names) = state.slices_by_service.get(&nk) else { continue };
            let mut seen: BTreeMap<IpAddr, usize> = BTreeMap::new();
            for sname in slice_names {
                let Some(slice) = state.slices.get(&(key.namespace.clone(), sname.clone())) else { continue };
                for sep in &slice.endpoints {
                    let pod = sep.pod.as_ref().and_then(|p| state.pods.get(&(slice.namespace.clone(), p.clone())));
                    if pod.is_some_and(|p| p.failed) {
                        continue;
                    }
                    let locality = endpoint_locality(state, sep, pod);
                    let health = Health::from_conditions(sep.ready, sep.serving, sep.terminating);
                    let workload = pod.map(|p| Arc::new(workload_of(p)));
                    let ep_network = pod.and_then(|p| p.network.clone()).unwrap_or_else(|| network.clone());
                    for addr in &sep.addresses {
                        let ep = Endpoint {
                            address: *addr,
                            ports: slice.ports.clone(),
                            cluster: cid.clone(),
                            network: ep_network.clone(),
                            locality: locality.clone(),
                            health,
                            workload: workload.clone(),
                        };
                        // The same address in two slices (during slice migration): keep the healthier one.
                        match seen.get(addr) {
                            Some(&i) if endpoints[i].health <= ep.health => {}
                            Some(&i) => endpoints[i] = ep,
                            None => {
                                seen.insert(*addr, endpoints.len());
                                endpoints.push(ep);
                            }
                        }
                    }
                }
            }
        }
        if clusters.is_empty() {
            return None;
        }
        ports.sort_by_key(|p| p.port);
        endpoints.sort_by(|a, b| (&a.cluster, a.address).cmp(&(&b.cluster, b.address)));
        Some(Service { hostname: key.fqdn(&self.domain_suffix).into(), key: key.clone(), ports, clusters, endpoints })
    }

    fn build_gateways(&self) -> Vec<Gateway> {
        let mut out = Vec::new();
        for (cid, state) in &self.clusters {
            for ((ns, name), svc) in &state.services {
                let Some(network) = &svc.network else { continue };
                let port = svc.gateway_port.unwrap_or(DEFAULT_GATEWAY_PORT);
                let service: Arc<str> = format!("{ns}/{name}").into();
                let mut addresses: Vec<(Arc<str>, u16)> = Vec::new();
                if svc.ports.iter().any(|p| p.port == port) {
                    addresses.extend(svc.load_balancer_ingress.iter().map(|a| (a.clone(), port)));
                    if addresses.is_empty() {
                        addresses.extend(svc.external_ips.iter().map(|a| (a.clone(), port)));
                    }
                }
                if addresses.is_empty()
                    && &*svc.service_type == "NodePort"
                    && let Some(node_port) = svc.ports.iter().find(|p| p.port == port).and_then(|p| p.node_port)
                {
                    // NodePort gateways: istiod uses the nodes' addresses; meshfed's compact Node keeps no
                    // address, so a NodePort gateway needs an externalIP. Reported by the debug surface.
                    let _ = node_port;
                }
                for (address, port) in addresses {
                    out.push(Gateway {
                        network: network.clone(),
                        cluster: cid.clone(),
                        address,
                        port,
                        service: service.clone(),
                    });
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

/// Locality of an endpoint: its Node's labels (through nodeName), else the slice's zone hint; a
/// `topology.istio.io/subzone` label on the pod fills in the subzone.
fn endpoint_locality(state: &ClusterState, sep: &topology::SliceEndpoint, pod: Option<&PodInfo>) -> Locality {
    let node_name = sep.node_name.as_ref().or(pod.and_then(|p| p.node_name.as_ref()));
    let mut loc = match node_name.and_then(|n| state.nodes.get(n)) {
        Some(node) => node.locality.clone(),
        None => Locality { zone: sep.zone.clone().unwrap_or_else(|| Arc::from("")), ..Locality::default() },
    };
    if loc.subzone.is_empty()
        && let Some(sz) = pod.and_then(|p| p.labels.get(topology::labels::SUBZONE))
    {
        loc.subzone = sz.as_str().into();
    }
    loc
}

fn workload_of(pod: &PodInfo) -> Workload {
    Workload {
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        service_account: pod.service_account.clone(),
        labels: pod.labels.clone(),
        tls_mode: match pod.labels.get(topology::labels::TLS_MODE).map(String::as_str) {
            Some("istio") => TlsMode::Istio,
            _ => TlsMode::Disabled,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::topology::{ServicePortInfo, SliceEndpoint};

    const A: &str = "aws-use1";
    const B: &str = "azure-weu";

    const MESH: &str = "clusters:\n  - id: aws-use1\n    network: aws-net\n    manifests: aws-use1\n  - id: azure-weu\n    network: azure-net\n    manifests: azure-weu\n";

    fn registry() -> Registry {
        let mesh = MeshConfig::parse(MESH, Path::new("/nonexistent")).expect("valid mesh config");
        Registry::new(&mesh)
    }

    // ---- compact TopologyObject constructors ----

    fn ns(name: &str, network: Option<&str>) -> TopologyObject {
        TopologyObject::Namespace(NamespaceInfo { name: name.into(), network: network.map(NetworkId::new) })
    }

    fn node(name: &str, locality: &str) -> TopologyObject {
        TopologyObject::Node(NodeInfo { name: name.into(), locality: Locality::parse(locality) })
    }

    fn service_info(namespace: &str, name: &str, ports: &[(&str, u16)]) -> ServiceInfo {
        ServiceInfo {
            namespace: namespace.into(),
            name: name.into(),
            ports: ports
                .iter()
                .map(|(n, p)| ServicePortInfo {
                    name: (*n).into(),
                    port: *p,
                    protocol: "TCP".into(),
                    app_protocol: None,
                    node_port: None,
                })
                .collect(),
            network: None,
            gateway_port: None,
            service_type: "ClusterIP".into(),
            external_ips: vec![],
            load_balancer_ingress: vec![],
        }
    }

    fn svc(name: &str, ports: &[(&str, u16)]) -> TopologyObject {
        TopologyObject::Service(service_info("shop", name, ports))
    }

    /// A ready endpoint, optionally on a node and backed by a pod.
    fn ep(addr: &str, node: Option<&str>, pod: Option<&str>) -> SliceEndpoint {
        SliceEndpoint {
            addresses: vec![addr.parse().expect("valid IP")],
            ready: Some(true),
            serving: Some(true),
            terminating: Some(false),
            node_name: node.map(Arc::from),
            zone: None,
            pod: pod.map(Arc::from),
        }
    }

    fn slice(name: &str, service: &str, ports: &[(&str, u16)], endpoints: Vec<SliceEndpoint>) -> TopologyObject {
        TopologyObject::EndpointSlice(SliceInfo {
            namespace: "shop".into(),
            name: name.into(),
            service: service.into(),
            ports: ports.iter().map(|(n, p)| (Arc::from(*n), *p)).collect(),
            endpoints,
        })
    }

    fn pod(name: &str, node: Option<&str>, labels: &[(&str, &str)]) -> PodInfo {
        let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        PodInfo {
            namespace: "shop".into(),
            name: name.into(),
            network: labels.get(topology::labels::NETWORK).map(NetworkId::new),
            labels: Arc::new(labels),
            service_account: "default".into(),
            node_name: node.map(Arc::from),
            failed: false,
        }
    }

    fn upsert(cluster: &str, object: TopologyObject) -> SourceEvent {
        SourceEvent::Upsert { cluster: ClusterId::new(cluster), object }
    }

    fn delete(cluster: &str, object: &TopologyObject) -> SourceEvent {
        SourceEvent::Delete { cluster: ClusterId::new(cluster), key: object.key() }
    }

    fn sync(cluster: &str, objects: Vec<TopologyObject>) -> SourceEvent {
        SourceEvent::Sync { cluster: ClusterId::new(cluster), objects }
    }

    fn apply_all(r: &mut Registry, events: impl IntoIterator<Item = SourceEvent>) -> RegistryChange {
        let mut change = RegistryChange::default();
        for e in events {
            change.merge(r.apply(e));
        }
        change
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("shop", name)
    }

    fn changed(services: &[(&str, ChangeKind)]) -> BTreeMap<ServiceKey, ChangeKind> {
        services.iter().map(|(n, k)| (key(n), *k)).collect()
    }

    fn endpoints(r: &Registry, name: &str) -> Vec<Endpoint> {
        r.service(&key(name)).map(|s| s.endpoints.clone()).unwrap_or_default()
    }

    fn addresses(r: &Registry, name: &str) -> Vec<String> {
        endpoints(r, name).iter().map(|e| e.address.to_string()).collect()
    }

    fn demo_dir(cluster: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/two-clouds").join(cluster)
    }

    fn demo_objects(cluster: &str) -> Vec<TopologyObject> {
        let (objects, errors) = crate::source::files::load_cluster_dir(&demo_dir(cluster));
        assert!(errors.is_empty(), "demo files must parse: {errors:?}");
        objects
    }

    fn demo_registry() -> Registry {
        let mut r = registry();
        apply_all(&mut r, [sync(A, demo_objects(A)), sync(B, demo_objects(B))]);
        r
    }

    /// The demo object of `kind` named `name` in `cluster`.
    fn demo_object(cluster: &str, kind: Kind, name: &str) -> TopologyObject {
        demo_objects(cluster)
            .into_iter()
            .find(|o| o.key().kind == kind && &*o.key().name == name)
            .unwrap_or_else(|| panic!("no {kind:?} {name} in {cluster}"))
    }

    // ---- merging ----

    #[test]
    fn same_service_in_two_clusters_is_one_federated_service() {
        let mut r = registry();
        apply_all(
            &mut r,
            [
                upsert(A, node("n-a", "us-east-1/us-east-1a")),
                upsert(A, svc("reviews", &[("http", 9080)])),
                upsert(A, slice("reviews-a", "reviews", &[("http", 9080)], vec![ep("127.0.1.21", Some("n-a"), None)])),
                upsert(B, node("n-b", "westeurope/westeurope-1")),
                upsert(B, svc("reviews", &[("http", 9080), ("grpc", 9091)])),
                upsert(B, slice("reviews-b", "reviews", &[("http", 9080)], vec![ep("127.0.3.21", Some("n-b"), None)])),
            ],
        );
        assert_eq!(r.services().len(), 1);
        let s = r.service(&key("reviews")).expect("federated reviews");
        assert_eq!(&*s.hostname, "reviews.shop.svc.cluster.local");
        assert_eq!(s.clusters, vec![ClusterId::new(A), ClusterId::new(B)]);
        let ports: Vec<(&str, u16, Protocol)> = s.ports.iter().map(|p| (&*p.name, p.port, p.protocol)).collect();
        assert_eq!(ports, [("http", 9080, Protocol::Http), ("grpc", 9091, Protocol::Grpc)], "union of ports");
        let eps: Vec<(String, &str, &str, String)> = s
            .endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.cluster.as_str(), e.network.as_str(), e.locality.to_string()))
            .collect();
        assert_eq!(
            eps,
            [
                ("127.0.1.21".to_string(), A, "aws-net", "us-east-1/us-east-1a/".to_string()),
                ("127.0.3.21".to_string(), B, "azure-net", "westeurope/westeurope-1/".to_string()),
            ]
        );
        assert_eq!(s.endpoints[0].ports, vec![(Arc::from("http"), 9080)]);
        assert_eq!(s.endpoints[0].port_for("http"), Some(9080));
    }

    #[test]
    fn endpoints_without_the_service_object_in_their_cluster_are_ignored() {
        let mut r = registry();
        apply_all(
            &mut r,
            [
                upsert(A, svc("reviews", &[("http", 9080)])),
                upsert(B, slice("reviews-b", "reviews", &[("http", 9080)], vec![ep("127.0.3.21", None, None)])),
            ],
        );
        assert!(addresses(&r, "reviews").is_empty());
        let change = r.apply(upsert(B, svc("reviews", &[("http", 9080)])));
        assert_eq!(change.services, changed(&[("reviews", ChangeKind::Shape)]));
        assert_eq!(addresses(&r, "reviews"), ["127.0.3.21"]);
    }

    #[test]
    fn locality_from_node_else_zone_hint_with_subzone_from_pod() {
        let mut r = registry();
        let mut hinted = ep("127.0.1.2", None, None);
        hinted.zone = Some("us-east-1b".into());
        let mut unknown_node = ep("127.0.1.3", Some("gone"), None);
        unknown_node.zone = Some("us-east-1c".into());
        let mut node_wins = ep("127.0.1.5", Some("n1"), None);
        node_wins.zone = Some("ignored".into());
        apply_all(
            &mut r,
            [
                upsert(A, node("n1", "us-east-1/us-east-1a")),
                upsert(A, node("n2", "us-east-1/us-east-1b/rack9")),
                upsert(A, svc("reviews", &[("http", 9080)])),
                upsert(A, TopologyObject::Pod(pod("p-sub", Some("n1"), &[(topology::labels::SUBZONE, "rack1")]))),
                upsert(A, TopologyObject::Pod(pod("p-node", Some("n1"), &[]))),
                upsert(A, TopologyObject::Pod(pod("p-keep", Some("n2"), &[(topology::labels::SUBZONE, "rack1")]))),
                upsert(
                    A,
                    slice(
                        "reviews-a",
                        "reviews",
                        &[("http", 9080)],
                        vec![
                            ep("127.0.1.1", Some("n1"), Some("p-sub")),
                            hinted,
                            unknown_node,
                            ep("127.0.1.4", None, Some("p-node")),
                            node_wins,
                            ep("127.0.1.6", Some("n2"), Some("p-keep")),
                            ep("127.0.1.7", None, None),
                        ],
                    ),
                ),
            ],
        );
        let locs: Vec<(String, String)> =
            endpoints(&r, "reviews").iter().map(|e| (e.address.to_string(), e.locality.to_string())).collect();
        let expect = [
            ("127.0.1.1", "us-east-1/us-east-1a/rack1"), // node, subzone from the pod label
            ("127.0.1.2", "/us-east-1b/"),               // no node: the zone hint
            ("127.0.1.3", "/us-east-1c/"),               // unknown node: the zone hint
            ("127.0.1.4", "us-east-1/us-east-1a/"),      // no nodeName on the slice: the pod's node
            ("127.0.1.5", "us-east-1/us-east-1a/"),      // the node wins over the hint
            ("127.0.1.6", "us-east-1/us-east-1b/rack9"), // the node's subzone wins over the pod label
            ("127.0.1.7", "//"),
        ];
        let expect: Vec<(String, String)> = expect.iter().map(|(a, l)| (a.to_string(), l.to_string())).collect();
        assert_eq!(locs, expect);
    }

    #[test]
    fn network_from_cluster_system_namespace_and_pod_label() {
        let mut r = registry();
        apply_all(
            &mut r,
            [
                upsert(A, svc("reviews", &[("http", 9080)])),
                upsert(A, TopologyObject::Pod(pod("p-net", None, &[(topology::labels::NETWORK, "pod-net")]))),
                upsert(
                    A,
                    slice(
                        "reviews-a",
                        "reviews",
                        &[("http", 9080)],
                        vec![ep("127.0.1.1", None, None), ep("127.0.1.2", None, Some("p-net"))],
                    ),
                ),
            ],
        );
        let networks =
            |r: &Registry| -> Vec<String> { endpoints(r, "reviews").iter().map(|e| e.network.to_string()).collect() };
        assert_eq!(networks(&r), ["aws-net", "pod-net"], "mesh config network; the pod label overrides it");
        assert_eq!(r.cluster_network(&ClusterId::new(A)), Some(NetworkId::new("aws-net")));

        // A network label on another namespace means nothing.
        assert!(r.apply(upsert(A, ns("shop", Some("other-net")))).is_empty());
        assert_eq!(networks(&r), ["aws-net", "pod-net"]);

        // The system namespace's label overrides the mesh config's network for the whole cluster.
        let change = r.apply(upsert(A, ns(SYSTEM_NAMESPACE, Some("aws-net-2"))));
        assert_eq!(change.services, changed(&[("reviews", ChangeKind::Endpoints)]));
        assert_eq!(networks(&r), ["aws-net-2", "pod-net"]);
        assert_eq!(r.cluster_network(&ClusterId::new(A)), Some(NetworkId::new("aws-net-2")));
        assert_eq!(r.cluster_network(&ClusterId::new(B)), Some(NetworkId::new("azure-net")));
        assert_eq!(r.cluster_network(&ClusterId::new("nowhere")), None);

        // An unlabelled system namespace, or none, falls back to the mesh config.
        let change = r.apply(upsert(A, ns(SYSTEM_NAMESPACE, None)));
        assert_eq!(change.services, changed(&[("reviews", ChangeKind::Endpoints)]));
        assert_eq!(networks(&r), ["aws-net", "pod-net"]);
        r.apply(upsert(A, ns(SYSTEM_NAMESPACE, Some("aws-net-2"))));
        r.apply(delete(A, &ns(SYSTEM_NAMESPACE, None)));
        assert_eq!(networks(&r), ["aws-net", "pod-net"]);
    }

    #[test]
    fn health_from_conditions_and_failed_pods_skipped() {
        let mut r = registry();
        let with = |addr: &str, ready, serving, terminating| SliceEndpoint {
            ready,
            serving,
            terminating,
            ..ep(addr, None, None)
        };
        let mut failed = pod("p-failed", None, &[]);
        failed.failed = true;
        apply_all(
            &mut r,
            [
                upsert(A, svc("reviews", &[("http", 9080)])),
                upsert(A, TopologyObject::Pod(failed.clone())),
                upsert(
                    A,
                    slice(
                        "reviews-a",
                        "reviews",
                        &[("http", 9080)],
                        vec![
                            with("127.0.1.1", Some(true), Some(true), Some(false)),
                            with("127.0.1.2", None, None, None),
                            with("127.0.1.3", Some(false), Some(false), Some(false)),
                            with("127.0.1.4", Some(false), Some(true), Some(true)),
                            with("127.0.1.5", Some(false), Some(false), Some(true)),
                            ep("127.0.1.6", None, Some("p-failed")),
                        ],
                    ),
                ),
            ],
        );
        let health: Vec<(String, Health)> =
            endpoints(&r, "reviews").iter().map(|e| (e.address.to_string(), e.health)).collect();
        let expect = [
            ("127.0.1.1", Health::Healthy),
            ("127.0.1.2", Health::Healthy),
            ("127.0.1.3", Health::Unhealthy),
            ("127.0.1.4", Health::Draining),
            ("127.0.1.5", Health::Draining),
        ];
        assert_eq!(health, expect.map(|(a, h)| (a.to_string(), h)), "the Failed pod's endpoint is skipped");

        // The pod recovering brings its endpoint back (an endpoints change of the service it backs).
        failed.failed = false;
        let change = r.apply(upsert(A, TopologyObject::Pod(failed)));
        assert_eq!(change.services, changed(&[("reviews", ChangeKind::Endpoints)]));
        assert!(addresses(&r, "reviews").contains(&"127.0.1.6".to_string()));
    }

    #[test]
    fn duplicate_address_across_slices_keeps_the_healthier() {
        let draining = SliceEndpoint { ready: Some(false), terminating: Some(true), ..ep("127.0.1.1", None, None) };
        let unhealthy = SliceEndpoint { ready: Some(false), ..ep("127.0.1.1", None, None) };
        let healthy = ep("127.0.1.1", None, None);
        for (first, second, expect) in [
            (draining.clone(), healthy.clone(), Health::Healthy),
            (healthy.clone(), draining.clone(), Health::Healthy),
            (unhealthy.clone(), draining.clone(), Health::Unhealthy),
            (draining.clone(), unhealthy.clone(), Health::Unhealthy),
        ] {
            let mut r = registry();
            apply_all(
                &mut r,
                [
                    upsert(A, svc("reviews", &[("http", 9080)])),
                    upsert(
                        A,
                        slice("reviews-1", "reviews", &[("http", 9080)], vec![first, ep("127.0.1.2", None, None)]),
                    ),
                    upsert(A, slice("reviews-2", "reviews", &[("http", 9080)], vec![second])),
                ],
            );
            let eps = endpoints(&r, "reviews");
            assert_eq!(addresses(&r, "reviews"), ["127.0.1.1", "127.0.1.2"], "no duplicate");
            assert_eq!(eps[0].health, expect);
        }
        // The same address in two clusters is two endpoints.
        let mut r = registry();
        apply_all(
            &mut r,
            [
                upsert(A, svc("reviews", &[("http", 9080)])),
                upsert(A, slice("reviews-1", "reviews", &[("http", 9080)], vec![ep("127.0.1.1", None, None)])),
                upsert(B, svc("reviews", &[("http", 9080)])),
                upsert(B, slice("reviews-1", "reviews", &[("http", 9080)], vec![ep("127.0.1.1", None, None)])),
            ],
        );
        let clusters: Vec<String> = endpoints(&r, "reviews").iter().map(|e| e.cluster.to_string()).collect();
        assert_eq!(clusters, [A, B]);
    }

    #[test]
    fn workload_from_pod() {
        let mut r = registry();
        let mut p = pod("reviews-v1-a1", None, &[("app", "reviews"), (topology::labels::TLS_MODE, "istio")]);
        p.service_account = "reviews".into();
        apply_all(
            &mut r,
            [
                upsert(A, svc("reviews", &[("http", 9080)])),
                upsert(A, TopologyObject::Pod(p)),
                upsert(
                    A,
                    slice(
                        "reviews-a",
                        "reviews",
                        &[("http", 9080)],
                        vec![ep("127.0.1.1", None, Some("reviews-v1-a1")), ep("127.0.1.2", None, Some("not-yet"))],
                    ),
                ),
            ],
        );
        let eps = endpoints(&r, "reviews");
        let w = eps[0].workload.as_ref().expect("workload of a known pod");
        assert_eq!((&*w.name, &*w.namespace, &*w.service_account), ("reviews-v1-a1", "shop", "reviews"));
        assert_eq!(w.labels.get("app").map(String::as_str), Some("reviews"));
        assert_eq!(eps[0].tls_mode(), TlsMode::Istio);
        assert_eq!(eps[1].workload, None, "a pod not (yet) known");
        assert_eq!(eps[1].tls_mode(), TlsMode::Disabled);
    }

    // ---- change reporting ----

    #[test]
    fn endpoint_slice_edit_is_an_endpoints_change() {
        let mut r = demo_registry();
        let TopologyObject::EndpointSlice(mut s) = demo_object(A, Kind::EndpointSlice, "reviews-x7k2p") else {
            panic!("a slice")
        };
        s.endpoints[0].ready = Some(false);
        s.endpoints[0].terminating = Some(true);
        let change = r.apply(upsert(A, TopologyObject::EndpointSlice(s.clone())));
        assert_eq!(
            change,
            RegistryChange {
                services: changed(&[("reviews", ChangeKind::Endpoints)]),
                gateways: false,
                policies: false
            }
        );
        assert!(!change.has_shape_change());
        assert_eq!(endpoints(&r, "reviews")[0].health, Health::Draining);

        // Removing an endpoint, and deleting the whole slice, are endpoints changes too.
        s.endpoints.remove(0);
        let change = r.apply(upsert(A, TopologyObject::EndpointSlice(s.clone())));
        assert_eq!(change.services, changed(&[("reviews", ChangeKind::Endpoints)]));
        assert_eq!(endpoints(&r, "reviews").len(), 7);
        let change = r.apply(delete(A, &TopologyObject::EndpointSlice(s)));
        assert_eq!(change.services, changed(&[("reviews", ChangeKind::Endpoints)]));
        assert_eq!(endpoints(&r, "reviews").len(), 4);
        assert!(endpoints(&r, "reviews").iter().all(|e| e.cluster.as_str() == B));
    }

    #[test]
    fn moving_a_slice_to_another_service_touches_both() {
        let mut r = registry();
        apply_all(
            &mut r,
            [
                upsert(A, svc("reviews", &[("http", 9080)])),
                upsert(A, svc("ratings", &[("http", 9080)])),
                upsert(A, slice("s", "reviews", &[("http", 9080)], vec![ep("127.0.1.1", None, None)])),
            ],
        );
        let change = r.apply(upsert(A, slice("s", "ratings", &[("http", 9080)], vec![ep("127.0.1.1", None, None)])));
        assert_eq!(change.services, changed(&[("ratings", ChangeKind::Endpoints), ("reviews", ChangeKind::Endpoints)]));
        assert!(addresses(&r, "reviews").is_empty());
        assert_eq!(addresses(&r, "ratings"), ["127.0.1.1"]);
    }

    #[test]
    fn service_port_change_is_a_shape_change() {
        let mut r = demo_registry();
        let TopologyObject::Service(mut s) = demo_object(B, Kind::Service, "reviews") else { panic!("a service") };
        s.ports.push(ServicePortInfo {
            name: "grpc".into(),
            port: 9091,
            protocol: "TCP".into(),
            app_protocol: Some("grpc".into()),
            node_port: None,
        });
        let change = r.apply(upsert(B, TopologyObject::Service(s.clone())));
        assert_eq!(
            change,
            RegistryChange { services: changed(&[("reviews", ChangeKind::Shape)]), gateways: false, policies: false }
        );
        assert!(change.has_shape_change());
        assert_eq!(r.service(&key("reviews")).unwrap().ports.iter().map(|p| p.port).collect::<Vec<_>>(), [9080, 9091]);

        // An edit that leaves the federated view as it was changes nothing: the port name says grpc too.
        s.ports[1].app_protocol = None;
        assert!(r.apply(upsert(B, TopologyObject::Service(s.clone()))).is_empty());
        assert_eq!(r.service(&key("reviews")).unwrap().ports[1].protocol, Protocol::Grpc, "from the port name");

        // A protocol change (appProtocol wins over the name) is a shape change as well.
        s.ports[1].app_protocol = Some("http".into());
        let change = r.apply(upsert(B, TopologyObject::Service(s)));
        assert_eq!(change.services, changed(&[("reviews", ChangeKind::Shape)]));
        assert_eq!(r.service(&key("reviews")).unwrap().ports[1].protocol, Protocol::Http);
    }

    #[test]
    fn adding_and_removing_a_service_is_a_shape_change() {
        let mut r = registry();
        let reviews = svc("reviews", &[("http", 9080)]);
        let change = r.apply(upsert(A, reviews.clone()));
        assert_eq!(change.services, changed(&[("reviews", ChangeKind::Shape)]));
        assert!(r.service(&key("reviews")).is_some());
        assert!(r.apply(upsert(A, reviews.clone())).is_empty(), "an identical upsert changes nothing");

        let change = r.apply(upsert(B, reviews.clone()));
        assert_eq!(change.services, changed(&[("reviews", ChangeKind::Shape)]), "defined in one more cluster");
        let change = r.apply(delete(B, &reviews));
        assert_eq!(change.services, changed(&[("reviews", ChangeKind::Shape)]));
        assert_eq!(r.service(&key("reviews")).unwrap().clusters, vec![ClusterId::new(A)]);

        let change = r.apply(delete(A, &reviews));
        assert_eq!(change.services, changed(&[("reviews", ChangeKind::Shape)]));
        assert!(r.service(&key("reviews")).is_none());
        assert!(r.services().is_empty());
        assert!(r.apply(delete(A, &reviews)).is_empty(), "deleting an unknown object changes nothing");
    }

    #[test]
    fn node_change_touches_only_services_with_endpoints_on_it() {
        let mut r = demo_registry();
        // In the demo every shop service has endpoints on every node: add one that has not.
        apply_all(
            &mut r,
            [
                upsert(A, node("ip-10-0-9-10.ec2.internal", "us-east-1/us-east-1c")),
                upsert(A, svc("details", &[("http", 9080)])),
                upsert(
                    A,
                    slice(
                        "details-1",
                        "details",
                        &[("http", 9080)],
                        vec![ep("127.0.9.1", Some("ip-10-0-9-10.ec2.internal"), None)],
                    ),
                ),
            ],
        );
        let change = r.apply(upsert(A, node("ip-10-0-9-10.ec2.internal", "us-east-1/us-east-1d")));
        assert_eq!(
            change,
            RegistryChange {
                services: changed(&[("details", ChangeKind::Endpoints)]),
                gateways: false,
                policies: false
            }
        );
        assert_eq!(endpoints(&r, "details")[0].locality, Locality::new("us-east-1", "us-east-1d", ""));

        let change = r.apply(upsert(A, node("ip-10-0-1-10.ec2.internal", "us-east-1/us-east-1f")));
        let mut expect = changed(&[
            ("frontend", ChangeKind::Endpoints),
            ("ratings", ChangeKind::Endpoints),
            ("reviews", ChangeKind::Endpoints),
        ]);
        // the east-west gateway's own endpoint runs there too
        expect.insert(ServiceKey::new(SYSTEM_NAMESPACE, "istio-eastwestgateway"), ChangeKind::Endpoints);
        assert_eq!(change.services, expect);
        assert!(!change.gateways, "gateway addresses do not depend on nodes");
        assert!(endpoints(&r, "reviews").iter().any(|e| &*e.locality.zone == "us-east-1f"));

        // A node nothing runs on, and the same node in another cluster, touch nothing.
        assert!(r.apply(upsert(A, node("idle", "us-east-1/us-east-1a"))).is_empty());
        assert!(r.apply(upsert(B, node("ip-10-0-9-10.ec2.internal", "x/y"))).is_empty());
        // Deleting a node: its endpoints fall back to their zone hint.
        let change = r.apply(delete(A, &node("ip-10-0-9-10.ec2.internal", "")));
        assert_eq!(change.services, changed(&[("details", ChangeKind::Endpoints)]));
        assert_eq!(endpoints(&r, "details")[0].locality, Locality::default());
    }

    #[test]
    fn node_change_reaches_endpoints_placed_through_their_pod() {
        // An endpoint without nodeName takes its node from its pod: relabelling that node must
        // rebuild the service too.
        let mut r = registry();
        apply_all(
            &mut r,
            [
                upsert(A, node("n1", "us-east-1/us-east-1a")),
                upsert(A, node("n2", "us-east-1/us-east-1b")),
                upsert(A, svc("reviews", &[("http", 9080)])),
                upsert(A, svc("ratings", &[("http", 9080)])),
                upsert(A, TopologyObject::Pod(pod("reviews-1", Some("n1"), &[]))),
                upsert(A, TopologyObject::Pod(pod("ratings-1", Some("n2"), &[]))),
                upsert(
                    A,
                    slice("reviews-a", "reviews", &[("http", 9080)], vec![ep("127.0.1.1", None, Some("reviews-1"))]),
                ),
                upsert(
                    A,
                    slice("ratings-a", "ratings", &[("http", 9080)], vec![ep("127.0.1.2", None, Some("ratings-1"))]),
                ),
            ],
        );
        assert_eq!(endpoints(&r, "reviews")[0].locality, Locality::new("us-east-1", "us-east-1a", ""));
        let change = r.apply(upsert(A, node("n1", "us-east-1/us-east-1c")));
        assert_eq!(change.services, changed(&[("reviews", ChangeKind::Endpoints)]));
        assert_eq!(endpoints(&r, "reviews")[0].locality, Locality::new("us-east-1", "us-east-1c", ""));
        assert_eq!(endpoints(&r, "ratings")[0].locality, Locality::new("us-east-1", "us-east-1b", ""));
    }

    #[test]
    fn pod_change_touches_only_services_it_backs() {
        let mut r = demo_registry();
        let TopologyObject::Pod(mut p) = demo_object(A, Kind::Pod, "reviews-v1-5f7d8-a1") else { panic!("a pod") };
        let mut labels = (*p.labels).clone();
        labels.insert("version".into(), "v2".into());
        p.labels = Arc::new(labels);
        let change = r.apply(upsert(A, TopologyObject::Pod(p.clone())));
        assert_eq!(
            change,
            RegistryChange {
                services: changed(&[("reviews", ChangeKind::Endpoints)]),
                gateways: false,
                policies: false
            }
        );
        let eps = endpoints(&r, "reviews");
        let e = eps.iter().find(|e| e.address.to_string() == "127.0.1.21").unwrap();
        assert_eq!(e.workload.as_ref().unwrap().labels.get("version").map(String::as_str), Some("v2"));

        // A pod no endpoint refers to touches nothing; nor does the same pod name in another namespace.
        let stray = pod("stray", Some("ip-10-0-1-10.ec2.internal"), &[("app", "x")]);
        assert!(r.apply(upsert(A, TopologyObject::Pod(stray))).is_empty());
        let other_ns = PodInfo { namespace: "other".into(), ..p.clone() };
        assert!(r.apply(upsert(A, TopologyObject::Pod(other_ns))).is_empty());

        // Pod deletion: the endpoint stays (the slice still lists it), without its workload.
        let change = r.apply(delete(A, &TopologyObject::Pod(p)));
        assert_eq!(change.services, changed(&[("reviews", ChangeKind::Endpoints)]));
        let eps = endpoints(&r, "reviews");
        assert!(eps.iter().find(|e| e.address.to_string() == "127.0.1.21").unwrap().workload.is_none());
    }

    #[test]
    fn identical_sync_is_an_empty_change() {
        let mut r = demo_registry();
        let services = r.services().clone();
        assert!(r.apply(sync(A, demo_objects(A))).is_empty());
        assert!(r.apply(sync(B, demo_objects(B))).is_empty());
        // the same objects in another order
        let mut reversed = demo_objects(A);
        reversed.reverse();
        assert!(r.apply(sync(A, reversed)).is_empty());
        assert_eq!(*r.services(), services);
    }

    #[test]
    fn sync_reconciles_exactly() {
        let fresh = demo_registry();
        let mut r = demo_registry();
        // Drop the reviews slice, one ratings pod and the frontend service from aws-use1.
        let partial: Vec<TopologyObject> = demo_objects(A)
            .into_iter()
            .filter(|o| {
                let k = o.key();
                !matches!(
                    (k.kind, &*k.name),
                    (Kind::EndpointSlice, "reviews-x7k2p")
                        | (Kind::Pod, "ratings-v1-8b4c6-a1")
                        | (Kind::Service, "frontend")
                )
            })
            .collect();
        let change = r.apply(sync(A, partial.clone()));
        assert_eq!(
            change,
            RegistryChange {
                services: changed(&[
                    ("frontend", ChangeKind::Shape),
                    ("ratings", ChangeKind::Endpoints),
                    ("reviews", ChangeKind::Endpoints),
                ]),
                gateways: false,
                policies: false,
            }
        );
        assert_eq!(r.service(&key("frontend")).unwrap().clusters, vec![ClusterId::new(B)]);
        assert!(endpoints(&r, "frontend").iter().all(|e| e.cluster.as_str() == B));
        assert_eq!(endpoints(&r, "reviews").len(), 4);
        let ratings = endpoints(&r, "ratings");
        assert_eq!(ratings.len(), 8, "the pod is gone, its endpoint stays");
        assert!(ratings.iter().find(|e| e.address.to_string() == "127.0.1.31").unwrap().workload.is_none());
        let a = &r.cluster_summaries()[0];
        assert_eq!((a.services, a.endpoint_slices, a.pods), (3, 3, 12));
        assert!(r.apply(sync(A, partial)).is_empty());

        // Syncing the full set again restores exactly the fresh state: nothing duplicated, no stale index.
        let change = r.apply(sync(A, demo_objects(A)));
        assert_eq!(change.services.keys().map(|k| &*k.name).collect::<Vec<_>>(), ["frontend", "ratings", "reviews"]);
        assert_eq!(*r.services(), *fresh.services());
        assert_eq!(r.gateways(), fresh.gateways());
        for id in [A, B] {
            let (x, y) = (&r.clusters[&ClusterId::new(id)], &fresh.clusters[&ClusterId::new(id)]);
            assert_eq!(x.slices_by_service, y.slices_by_service);
            assert_eq!(x.node_refs, y.node_refs);
            assert_eq!(x.pod_refs, y.pod_refs);
            assert_eq!(x.keys(), y.keys());
        }
        for s in r.services().values() {
            let mut addrs: Vec<_> = s.endpoints.iter().map(|e| (&e.cluster, e.address)).collect();
            addrs.dedup();
            assert_eq!(addrs.len(), s.endpoints.len());
        }

        // An empty sync removes the whole cluster's contribution.
        let change = r.apply(sync(A, vec![]));
        assert!(change.gateways);
        assert!(r.services().values().all(|s| s.clusters == [ClusterId::new(B)]));
        assert!(r.services().values().all(|s| s.endpoints.iter().all(|e| e.cluster.as_str() == B)));
        let a = &r.cluster_summaries()[0];
        assert_eq!((a.namespaces, a.services, a.endpoint_slices, a.nodes, a.pods), (0, 0, 0, 0, 0));
        assert!(r.clusters[&ClusterId::new(A)].node_refs.is_empty());
        assert!(r.clusters[&ClusterId::new(A)].pod_refs.is_empty());
        assert!(r.clusters[&ClusterId::new(A)].slices_by_service.is_empty());
    }

    #[test]
    fn demo_topology() {
        let r = demo_registry();
        let names: Vec<String> = r.services().keys().map(|k| k.to_string()).collect();
        assert_eq!(names, ["istio-system/istio-eastwestgateway", "shop/frontend", "shop/ratings", "shop/reviews"]);
        for name in ["frontend", "reviews", "ratings"] {
            let s = r.service(&key(name)).unwrap();
            assert_eq!(s.clusters, [ClusterId::new(A), ClusterId::new(B)]);
            assert_eq!(s.endpoints.len(), 8, "{name}");
            assert!(s.endpoints.iter().all(|e| e.health == Health::Healthy && e.workload.is_some()));
            let mut zones: BTreeMap<String, usize> = BTreeMap::new();
            for e in &s.endpoints {
                let net = if e.cluster.as_str() == A { "aws-net" } else { "azure-net" };
                assert_eq!(e.network.as_str(), net);
                *zones.entry(e.locality.to_string()).or_default() += 1;
            }
            let zones: Vec<(&str, usize)> = zones.iter().map(|(z, n)| (z.as_str(), *n)).collect();
            assert_eq!(
                zones,
                [
                    ("us-east-1/us-east-1a/", 2),
                    ("us-east-1/us-east-1b/", 2),
                    ("westeurope/westeurope-1/", 2),
                    ("westeurope/westeurope-2/", 2)
                ]
            );
        }
        let ratings = r.service(&key("ratings")).unwrap();
        let ports: Vec<(u16, Protocol)> = ratings.ports.iter().map(|p| (p.port, p.protocol)).collect();
        assert_eq!(ports, [(9080, Protocol::Http), (9091, Protocol::Grpc)]);
        let summaries = r.cluster_summaries();
        assert_eq!(summaries.len(), 2);
        assert_eq!((summaries[0].id.as_str(), summaries[0].network.as_str()), (A, "aws-net"));
        assert_eq!((summaries[1].id.as_str(), summaries[1].network.as_str()), (B, "azure-net"));
    }

    // ---- gateways ----

    fn gateway(network: &str) -> ServiceInfo {
        let mut s = service_info(SYSTEM_NAMESPACE, "istio-eastwestgateway", &[("status-port", 15021), ("tls", 15443)]);
        s.network = Some(NetworkId::new(network));
        s.service_type = "LoadBalancer".into();
        s
    }

    fn gateway_list(r: &Registry) -> Vec<(String, String, String, u16)> {
        r.gateways()
            .iter()
            .map(|g| (g.network.to_string(), g.cluster.to_string(), g.address.to_string(), g.port))
            .collect()
    }

    fn gw(network: &str, cluster: &str, address: &str, port: u16) -> (String, String, String, u16) {
        (network.into(), cluster.into(), address.into(), port)
    }

    #[test]
    fn demo_gateways() {
        let r = demo_registry();
        assert_eq!(gateway_list(&r), [gw("aws-net", A, "127.0.10.1", 15443), gw("azure-net", B, "127.0.20.1", 15443)]);
        assert_eq!(&*r.gateways()[0].service, "istio-system/istio-eastwestgateway");
    }

    #[test]
    fn gateway_addresses_and_port() {
        let mut r = registry();
        // Load balancer ingress: IPs and hostnames.
        let mut g = gateway("aws-net");
        g.load_balancer_ingress = vec!["127.0.10.1".into(), "a1b2.elb.us-east-1.amazonaws.com".into()];
        g.external_ips = vec!["192.0.2.10".into()];
        let change = r.apply(upsert(A, TopologyObject::Service(g.clone())));
        assert!(change.gateways);
        assert_eq!(
            gateway_list(&r),
            [gw("aws-net", A, "127.0.10.1", 15443), gw("aws-net", A, "a1b2.elb.us-east-1.amazonaws.com", 15443)]
        );

        // No ingress yet: the external IPs.
        g.load_balancer_ingress.clear();
        assert!(r.apply(upsert(A, TopologyObject::Service(g.clone()))).gateways);
        assert_eq!(gateway_list(&r), [gw("aws-net", A, "192.0.2.10", 15443)]);

        // The gatewayPort label picks the port; it must be one of the service's ports.
        g.gateway_port = Some(15021);
        r.apply(upsert(A, TopologyObject::Service(g.clone())));
        assert_eq!(gateway_list(&r), [gw("aws-net", A, "192.0.2.10", 15021)]);
        g.gateway_port = Some(15444);
        assert!(r.apply(upsert(A, TopologyObject::Service(g.clone()))).gateways);
        assert!(r.gateways().is_empty());
        g.gateway_port = None;
        r.apply(upsert(A, TopologyObject::Service(g.clone())));

        // Without the network label it is not a gateway.
        let mut plain = g.clone();
        plain.network = None;
        assert!(r.apply(upsert(A, TopologyObject::Service(plain.clone()))).gateways);
        assert!(r.gateways().is_empty());
        assert!(!r.apply(upsert(A, TopologyObject::Service(plain.clone()))).gateways);
        let mut plain2 = plain;
        plain2.external_ips.push("192.0.2.11".into());
        assert!(!r.apply(upsert(A, TopologyObject::Service(plain2))).gateways);

        // Another cluster's gateway; then the gateway's service goes and so does its gateway.
        r.apply(upsert(A, TopologyObject::Service(g.clone())));
        let mut g2 = gateway("azure-net");
        g2.load_balancer_ingress = vec!["127.0.20.1".into()];
        r.apply(upsert(B, TopologyObject::Service(g2)));
        assert_eq!(gateway_list(&r), [gw("aws-net", A, "192.0.2.10", 15443), gw("azure-net", B, "127.0.20.1", 15443)]);
        let change = r.apply(delete(A, &TopologyObject::Service(g)));
        assert!(change.gateways);
        assert_eq!(gateway_list(&r), [gw("azure-net", B, "127.0.20.1", 15443)]);
    }

    #[test]
    fn demo_gateway_removed_with_its_service() {
        let mut r = demo_registry();
        let gw_svc = demo_object(B, Kind::Service, "istio-eastwestgateway");
        let change = r.apply(delete(B, &gw_svc));
        assert!(change.gateways);
        assert_eq!(
            change.services,
            BTreeMap::from([(ServiceKey::new(SYSTEM_NAMESPACE, "istio-eastwestgateway"), ChangeKind::Shape)])
        );
        assert_eq!(gateway_list(&r), [gw("aws-net", A, "127.0.10.1", 15443)]);
        // a sync without it keeps it gone
        let objects: Vec<_> = demo_objects(B).into_iter().filter(|o| *o != gw_svc).collect();
        assert!(!r.apply(sync(B, objects)).gateways);
        assert_eq!(r.gateways().len(), 1);
    }

    // ---- determinism ----

    #[test]
    fn endpoint_order_is_deterministic() {
        let objects = |cluster: &str, addrs: &[&str]| {
            vec![
                svc("reviews", &[("http", 9080)]),
                slice(
                    "reviews-2",
                    "reviews",
                    &[("http", 9080)],
                    addrs[2..].iter().map(|a| ep(a, None, None)).collect(),
                ),
                slice(
                    "reviews-1",
                    "reviews",
                    &[("http", 9080)],
                    addrs[..2].iter().map(|a| ep(a, None, None)).collect(),
                ),
            ]
            .into_iter()
            .map(move |o| upsert(cluster, o))
            .collect::<Vec<_>>()
        };
        let a_addrs = ["127.0.1.30", "127.0.1.4", "127.0.1.200", "::1"];
        let b_addrs = ["127.0.0.9", "127.0.3.1", "127.0.0.10"];
        let mut r1 = registry();
        apply_all(&mut r1, objects(A, &a_addrs).into_iter().chain(objects(B, &b_addrs)));
        let mut r2 = registry();
        let mut events: Vec<SourceEvent> = objects(B, &b_addrs).into_iter().chain(objects(A, &a_addrs)).collect();
        events.reverse();
        apply_all(&mut r2, events);
        assert_eq!(*r1.services(), *r2.services());
        let got: Vec<(String, String)> =
            endpoints(&r1, "reviews").iter().map(|e| (e.cluster.to_string(), e.address.to_string())).collect();
        let expect = [
            (A, "127.0.1.4"),
            (A, "127.0.1.30"),
            (A, "127.0.1.200"),
            (A, "::1"),
            (B, "127.0.0.9"),
            (B, "127.0.0.10"),
            (B, "127.0.3.1"),
        ];
        assert_eq!(got, expect.map(|(c, a)| (c.to_string(), a.to_string())));
    }

    #[test]
    fn cluster_order_does_not_matter() {
        let r1 = demo_registry();
        let mut r2 = registry();
        apply_all(&mut r2, [sync(B, demo_objects(B)), sync(A, demo_objects(A))]);
        assert_eq!(*r1.services(), *r2.services());
        assert_eq!(r1.gateways(), r2.gateways());
        // one object at a time, in reverse
        let mut r3 = registry();
        let mut events: Vec<SourceEvent> = demo_objects(A)
            .into_iter()
            .map(|o| upsert(A, o))
            .chain(demo_objects(B).into_iter().map(|o| upsert(B, o)))
            .collect();
        events.reverse();
        apply_all(&mut r3, events);
        assert_eq!(*r1.services(), *r3.services());
        assert_eq!(r1.gateways(), r3.gateways());
    }

    #[test]
    fn change_merge_keeps_the_strongest_kind() {
        let mut c = RegistryChange {
            services: changed(&[("a", ChangeKind::Shape), ("b", ChangeKind::Endpoints)]),
            ..Default::default()
        };
        c.merge(RegistryChange {
            services: changed(&[
                ("a", ChangeKind::Endpoints),
                ("b", ChangeKind::Endpoints),
                ("c", ChangeKind::Endpoints),
            ]),
            gateways: false,
            policies: false,
        });
        assert_eq!(
            c.services,
            changed(&[("a", ChangeKind::Shape), ("b", ChangeKind::Endpoints), ("c", ChangeKind::Endpoints)])
        );
        assert!(c.has_shape_change() && !c.gateways);
        c.merge(RegistryChange { services: BTreeMap::new(), gateways: true, policies: false });
        assert!(c.gateways);
        let only_gw = RegistryChange { services: BTreeMap::new(), gateways: true, policies: false };
        assert!(!only_gw.is_empty() && only_gw.has_shape_change());
        assert!(RegistryChange::default().is_empty());
    }
}
