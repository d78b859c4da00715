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
use crate::source::SourceEvent;
use crate::topology::{
    self, Kind, NamespaceInfo, NodeInfo, ObjectKey, PodInfo, ServiceInfo, SliceInfo, TopologyObject,
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
}

impl RegistryChange {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && !self.gateways
    }

    pub fn merge(&mut self, other: RegistryChange) {
        for (k, v) in other.services {
            let e = self.services.entry(k).or_insert(v);
            *e = (*e).max(v);
        }
        self.gateways |= other.gateways;
    }

    /// true when anything beyond endpoints changed (clusters, listeners or routes must be rebuilt)
    pub fn has_shape_change(&self) -> bool {
        self.gateways || self.services.values().any(|k| *k == ChangeKind::Shape)
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
                if self.services.iter().any(|(_, s)| s.network.is_some()) {
                    touched.gateways = true; // gateway addresses may come from nodes (NodePort)
                }
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
}

impl Registry {
    pub fn new(mesh: &MeshConfig) -> Registry {
        let mut r = Registry {
            domain_suffix: mesh.domain_suffix.as_str().into(),
            clusters: BTreeMap::new(),
            services: imbl::OrdMap::new(),
            gateways: Arc::new(Vec::new()),
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

    /// A cluster's default network, if the cluster is known.
    pub fn cluster_network(&self, id: &ClusterId) -> Option<NetworkId> {
        self.clusters.get(id).map(|c| c.network())
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
