//! Generated mesh topologies for benchmarks: `S` (1,000 services x 10 endpoints) and `L` (10,000 x 20),
//! over two clusters (`aws-use1` in us-east-1, `azure-weu` in westeurope) and six zones.
//!
//! Every service exists in both clusters (federated), with its endpoints split between them and spread
//! over the cluster's three zones. Both clusters are on one network (a peered multi-cloud network, as in
//! Istio's multi-primary single-network setup), so every proxy sees every endpoint directly and one
//! endpoint change reaches every proxy; locality priorities still differ per zone (outlier detection is
//! on mesh-wide), so proxies fall into six EDS scopes.
//!
//! The same [`Topology`] drives the in-process registry (as [`SourceEvent`]s) and a file layout for
//! `meshfed serve` (a mesh config and one manifests directory per cluster; EndpointSlices are grouped
//! [`FILE_GROUP`] services per file, so a change rewrites one small file).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{Locality as PbLocality, Node};
use envoy_types::pb::google::protobuf::Struct;

use meshfed::model::{ClusterId, Locality};
use meshfed::proxy::string_value;
use meshfed::source::SourceEvent;
use meshfed::topology::{
    Kind, NamespaceInfo, NodeInfo, ObjectKey, ServiceInfo, ServicePortInfo, SliceEndpoint, SliceInfo, TopologyObject,
};

/// The namespace of every generated service and proxy.
pub const NAMESPACE: &str = "shop";
/// The port of every generated service (HTTP).
pub const PORT: u16 = 8080;
/// The network both clusters are on.
pub const NETWORK: &str = "mesh-net";
/// Services per EndpointSlice file in the file layout.
pub const FILE_GROUP: usize = 10;

/// (cluster id, region, zones)
pub const CLUSTERS: [(&str, &str, [&str; 3]); 2] = [
    ("aws-use1", "us-east-1", ["us-east-1a", "us-east-1b", "us-east-1c"]),
    ("azure-weu", "westeurope", ["westeurope-1", "westeurope-2", "westeurope-3"]),
];

/// A topology size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size {
    pub services: usize,
    /// endpoints per service, over both clusters
    pub endpoints: usize,
}

impl Size {
    pub const S: Size = Size { services: 1_000, endpoints: 10 };
    pub const L: Size = Size { services: 10_000, endpoints: 20 };

    /// `S`, `L`, or `SERVICESxENDPOINTS` (e.g. `50x4`, for smoke runs).
    pub fn parse(s: &str) -> Option<Size> {
        match s {
            "S" | "s" => Some(Size::S),
            "L" | "l" => Some(Size::L),
            _ => {
                let (a, b) = s.split_once('x')?;
                Some(Size { services: a.parse().ok()?, endpoints: b.parse().ok()? })
            }
        }
    }

    pub fn name(&self) -> String {
        match *self {
            Size::S => "S".into(),
            Size::L => "L".into(),
            Size { services, endpoints } => format!("{services}x{endpoints}"),
        }
    }
}

/// One endpoint of a generated slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ep {
    pub ip: Ipv4Addr,
    /// index into the cluster's zones
    pub zone: u8,
    pub ready: bool,
}

/// A change the load generator makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// toggles `ready` of endpoint `ep` of service `svc` in cluster `cluster`
    Flap { svc: usize, cluster: usize, ep: usize },
    /// gives endpoint `ep` a new address (a pod replaced by a rollout)
    Replace { svc: usize, cluster: usize, ep: usize },
    /// adds `n` endpoints to a service in one cluster
    Grow { svc: usize, cluster: usize, n: usize },
    /// adds service `svc` (an index at or past the current end) to both clusters
    AddService { svc: usize },
    /// removes service `svc` from both clusters
    RemoveService { svc: usize },
}

impl Change {
    /// The line of the control protocol (`flap 12 0 3`).
    pub fn to_line(&self) -> String {
        match self {
            Change::Flap { svc, cluster, ep } => format!("flap {svc} {cluster} {ep}"),
            Change::Replace { svc, cluster, ep } => format!("replace {svc} {cluster} {ep}"),
            Change::Grow { svc, cluster, n } => format!("grow {svc} {cluster} {n}"),
            Change::AddService { svc } => format!("add {svc}"),
            Change::RemoveService { svc } => format!("remove {svc}"),
        }
    }

    pub fn parse(line: &str) -> Option<Change> {
        let mut it = line.split_whitespace();
        let verb = it.next()?;
        let mut n = || it.next().and_then(|s| s.parse::<usize>().ok());
        Some(match verb {
            "flap" => Change::Flap { svc: n()?, cluster: n()?, ep: n()? },
            "replace" => Change::Replace { svc: n()?, cluster: n()?, ep: n()? },
            "grow" => Change::Grow { svc: n()?, cluster: n()?, n: n()? },
            "add" => Change::AddService { svc: n()? },
            "remove" => Change::RemoveService { svc: n()? },
            _ => return None,
        })
    }
}

/// A generated mesh and its current state.
#[derive(Clone, Debug)]
pub struct Topology {
    pub size: Size,
    /// per service: present?, and per cluster its endpoints
    services: Vec<Option<[Vec<Ep>; 2]>>,
    /// next address index per cluster
    next_ip: [u32; 2],
}

fn ep_ip(cluster: usize, n: u32) -> Ipv4Addr {
    // aws: 10.0.0.0/10, azure: 10.64.0.0/10
    let base = u32::from(Ipv4Addr::new(10, if cluster == 0 { 0 } else { 64 }, 0, 1));
    Ipv4Addr::from(base + n)
}

/// The EDS cluster name (and CLA name) of service `svc`.
pub fn cluster_name(svc: usize) -> String {
    format!("outbound|{PORT}||{}.{NAMESPACE}.svc.cluster.local", service_name(svc))
}

pub fn service_name(svc: usize) -> String {
    format!("svc-{svc:05}")
}

fn slice_name(svc: usize, cluster: usize) -> String {
    format!("{}-{}", service_name(svc), if cluster == 0 { "aws" } else { "az" })
}

fn node_name(cluster: usize, zone: usize) -> String {
    format!("{}-node-{}", CLUSTERS[cluster].0, CLUSTERS[cluster].2[zone])
}

impl Topology {
    pub fn new(size: Size) -> Topology {
        let mut t = Topology { size, services: Vec::with_capacity(size.services), next_ip: [0, 0] };
        for svc in 0..size.services {
            t.add(svc);
        }
        t
    }

    fn add(&mut self, svc: usize) {
        if self.services.len() <= svc {
            self.services.resize(svc + 1, None);
        }
        let mut eps: [Vec<Ep>; 2] = Default::default();
        for j in 0..self.size.endpoints {
            let c = j % 2;
            let n = self.next_ip[c];
            self.next_ip[c] += 1;
            eps[c].push(Ep { ip: ep_ip(c, n), zone: ((svc + j / 2) % 3) as u8, ready: true });
        }
        self.services[svc] = Some(eps);
    }

    /// The number of service slots (present or removed).
    pub fn slots(&self) -> usize {
        self.services.len()
    }

    pub fn is_present(&self, svc: usize) -> bool {
        self.services.get(svc).is_some_and(Option::is_some)
    }

    /// Endpoints of a service in a cluster.
    pub fn endpoints(&self, svc: usize, cluster: usize) -> &[Ep] {
        self.services.get(svc).and_then(|s| s.as_ref()).map(|s| &s[cluster][..]).unwrap_or(&[])
    }

    pub fn mesh_config_yaml(&self, manifests: Option<&Path>, quiet: &str, max: &str) -> String {
        let mut s = String::from("domainSuffix: cluster.local\nclusters:\n");
        for (id, _, _) in CLUSTERS {
            let dir = manifests.map(|m| m.join(id)).unwrap_or_else(|| PathBuf::from(id));
            let _ = writeln!(s, "  - id: {id}\n    network: {NETWORK}\n    manifests: {}", dir.display());
        }
        let _ = writeln!(s, "debounce:\n  quiet: {quiet}\n  max: {max}");
        s.push_str(
            "defaults:\n  outlierDetection:\n    consecutive5xxErrors: 5\n    interval: 10s\n    baseEjectionTime: 30s\n",
        );
        s
    }

    fn service_object(&self, svc: usize) -> TopologyObject {
        TopologyObject::Service(ServiceInfo {
            namespace: NAMESPACE.into(),
            name: service_name(svc).into(),
            ports: vec![ServicePortInfo {
                name: "http".into(),
                port: PORT,
                protocol: "TCP".into(),
                app_protocol: None,
                node_port: None,
            }],
            network: None,
            gateway_port: None,
            service_type: "ClusterIP".into(),
            external_ips: Vec::new(),
            load_balancer_ingress: Vec::new(),
        })
    }

    fn slice_object(&self, svc: usize, cluster: usize) -> TopologyObject {
        let endpoints = self
            .endpoints(svc, cluster)
            .iter()
            .map(|e| SliceEndpoint {
                addresses: vec![IpAddr::V4(e.ip)],
                ready: Some(e.ready),
                serving: Some(e.ready),
                terminating: Some(false),
                node_name: Some(node_name(cluster, e.zone as usize).into()),
                zone: Some(CLUSTERS[cluster].2[e.zone as usize].into()),
                pod: None,
            })
            .collect();
        TopologyObject::EndpointSlice(SliceInfo {
            namespace: NAMESPACE.into(),
            name: slice_name(svc, cluster).into(),
            service: service_name(svc).into(),
            ports: vec![("http".into(), PORT)],
            endpoints,
        })
    }

    /// Every object of one cluster.
    pub fn objects(&self, cluster: usize) -> Vec<TopologyObject> {
        let mut out = vec![TopologyObject::Namespace(NamespaceInfo { name: NAMESPACE.into(), network: None })];
        let (_, region, zones) = CLUSTERS[cluster];
        for (z, zone) in zones.iter().enumerate() {
            out.push(TopologyObject::Node(NodeInfo {
                name: node_name(cluster, z).into(),
                locality: Locality::new(region, zone, ""),
            }));
        }
        for svc in 0..self.services.len() {
            if self.is_present(svc) {
                out.push(self.service_object(svc));
                out.push(self.slice_object(svc, cluster));
            }
        }
        out
    }

    /// The initial state as one `Sync` event per cluster.
    pub fn initial_events(&self) -> Vec<SourceEvent> {
        (0..2).map(|c| SourceEvent::Sync { cluster: ClusterId::new(CLUSTERS[c].0), objects: self.objects(c) }).collect()
    }

    /// Applies a change; returns the source events that carry it (empty if it does not apply).
    pub fn apply(&mut self, change: &Change) -> Vec<SourceEvent> {
        let cid = |c: usize| ClusterId::new(CLUSTERS[c % 2].0);
        match *change {
            Change::Flap { svc, cluster, ep } | Change::Replace { svc, cluster, ep } => {
                let cluster = cluster % 2;
                let next = self.next_ip[cluster];
                let Some(Some(s)) = self.services.get_mut(svc) else { return Vec::new() };
                let Some(e) = s[cluster].get_mut(ep) else { return Vec::new() };
                if matches!(change, Change::Flap { .. }) {
                    e.ready = !e.ready;
                } else {
                    e.ip = ep_ip(cluster, next);
                    e.ready = true;
                    self.next_ip[cluster] += 1;
                }
                vec![SourceEvent::Upsert { cluster: cid(cluster), object: self.slice_object(svc, cluster) }]
            }
            Change::Grow { svc, cluster, n } => {
                let cluster = cluster % 2;
                let Some(Some(s)) = self.services.get_mut(svc) else { return Vec::new() };
                for _ in 0..n {
                    let k = self.next_ip[cluster];
                    self.next_ip[cluster] += 1;
                    s[cluster].push(Ep { ip: ep_ip(cluster, k), zone: (k % 3) as u8, ready: true });
                }
                vec![SourceEvent::Upsert { cluster: cid(cluster), object: self.slice_object(svc, cluster) }]
            }
            Change::AddService { svc } => {
                if self.is_present(svc) {
                    return Vec::new();
                }
                self.add(svc);
                let mut out = Vec::new();
                for c in 0..2 {
                    out.push(SourceEvent::Upsert { cluster: cid(c), object: self.service_object(svc) });
                    out.push(SourceEvent::Upsert { cluster: cid(c), object: self.slice_object(svc, c) });
                }
                out
            }
            Change::RemoveService { svc } => {
                if !self.is_present(svc) {
                    return Vec::new();
                }
                self.services[svc] = None;
                let mut out = Vec::new();
                for c in 0..2 {
                    for (kind, name) in [(Kind::EndpointSlice, slice_name(svc, c)), (Kind::Service, service_name(svc))]
                    {
                        out.push(SourceEvent::Delete {
                            cluster: cid(c),
                            key: ObjectKey { kind, namespace: NAMESPACE.into(), name: name.into() },
                        });
                    }
                }
                out
            }
        }
    }

    // ---- the file layout ----

    /// Writes the mesh config and both manifests directories under `dir`; returns the mesh config path.
    pub fn write_files(&self, dir: &Path, quiet: &str, max: &str) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let mesh = dir.join("mesh.yaml");
        std::fs::write(&mesh, self.mesh_config_yaml(None, quiet, max))?;
        for (c, (id, _, _)) in CLUSTERS.iter().enumerate() {
            let cdir = dir.join(id);
            std::fs::create_dir_all(cdir.join("slices"))?;
            std::fs::write(cdir.join("base.yaml"), self.render_base(c))?;
            for g in 0..self.services.len().div_ceil(FILE_GROUP) {
                std::fs::write(self.group_path(dir, c, g), self.render_group(c, g))?;
            }
        }
        Ok(mesh)
    }

    /// The file holding the EndpointSlices (and Services) of group `g` of cluster `c`.
    pub fn group_path(&self, dir: &Path, cluster: usize, group: usize) -> PathBuf {
        dir.join(CLUSTERS[cluster].0).join("slices").join(format!("group-{group:05}.yaml"))
    }

    /// Applies a change to the file layout under `dir`: rewrites (atomically: a temporary file renamed
    /// over it) each group file it touches. Returns the files written.
    pub fn apply_to_files(&mut self, dir: &Path, change: &Change) -> std::io::Result<Vec<PathBuf>> {
        let events = self.apply(change);
        let mut groups: Vec<(usize, usize)> = Vec::new();
        let svc = match *change {
            Change::Flap { svc, .. }
            | Change::Replace { svc, .. }
            | Change::Grow { svc, .. }
            | Change::AddService { svc }
            | Change::RemoveService { svc } => svc,
        };
        for e in &events {
            let c = CLUSTERS.iter().position(|(id, _, _)| *id == e.cluster().as_str()).unwrap_or(0);
            if !groups.contains(&(c, svc / FILE_GROUP)) {
                groups.push((c, svc / FILE_GROUP));
            }
        }
        let mut written = Vec::new();
        for (c, g) in groups {
            let path = self.group_path(dir, c, g);
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, self.render_group(c, g))?;
            std::fs::rename(&tmp, &path)?;
            written.push(path);
        }
        Ok(written)
    }

    fn render_base(&self, c: usize) -> String {
        let (_, region, zones) = CLUSTERS[c];
        let mut s = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n");
        for (z, zone) in zones.iter().enumerate() {
            let _ = write!(
                s,
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n  labels:\n    topology.kubernetes.io/region: {region}\n    topology.kubernetes.io/zone: {zone}\n",
                node_name(c, z)
            );
        }
        s
    }

    fn render_group(&self, c: usize, g: usize) -> String {
        let mut s = String::new();
        let end = ((g + 1) * FILE_GROUP).min(self.services.len());
        for svc in g * FILE_GROUP..end {
            if !self.is_present(svc) {
                continue;
            }
            let name = service_name(svc);
            let _ = write!(
                s,
                "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\nspec:\n  ports:\n  - name: http\n    port: {PORT}\n    protocol: TCP\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\nmetadata:\n  name: {}\n  namespace: {NAMESPACE}\n  labels:\n    kubernetes.io/service-name: {name}\nports:\n- name: http\n  port: {PORT}\n  protocol: TCP\nendpoints:\n",
                slice_name(svc, c)
            );
            for e in self.endpoints(svc, c) {
                let _ = write!(
                    s,
                    "- addresses: [\"{}\"]\n  conditions: {{ready: {r}, serving: {r}, terminating: false}}\n  nodeName: {}\n  zone: {}\n",
                    e.ip,
                    node_name(c, e.zone as usize),
                    CLUSTERS[c].2[e.zone as usize],
                    r = e.ready
                );
            }
        }
        s
    }
}

/// How the load generator's proxies present themselves.
#[derive(Clone, Debug)]
pub struct ProxyIdentity {
    /// `none` or `static` (node metadata `MESHFED_TLS`)
    pub tls: &'static str,
    /// node metadata `INTERCEPTION_MODE`: `NONE` (the ADS load proxies: a listener scope per proxy, the
    /// worst case for meshfed) or `REDIRECT` (an istio-injected sidecar, as the per-type EDS proxies)
    pub interception: &'static str,
}

impl Default for ProxyIdentity {
    fn default() -> Self {
        ProxyIdentity { tls: "none", interception: "NONE" }
    }
}

/// The cluster (0 or 1) and zone (0..3) of load proxy `k`.
pub fn proxy_placement(k: usize) -> (usize, usize) {
    (k % 2, (k / 2) % 3)
}

/// The node of load proxy `k`: an Istio sidecar id `sidecar~10.200.x.y~load-k.shop~shop.svc.cluster.local`,
/// spread over both clouds and their zones (node metadata CLUSTER_ID, NETWORK, locality).
pub fn proxy_node(k: usize, identity: &ProxyIdentity) -> Node {
    let (c, z) = proxy_placement(k);
    let (cluster, region, zones) = CLUSTERS[c];
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + k as u32);
    let meta = [
        ("CLUSTER_ID", cluster),
        ("NETWORK", NETWORK),
        ("INTERCEPTION_MODE", identity.interception),
        ("MESHFED_TLS", identity.tls),
        ("ISTIO_VERSION", "1.27.0"),
    ];
    Node {
        id: format!("sidecar~{ip}~load-{k}.{NAMESPACE}~{NAMESPACE}.svc.cluster.local"),
        cluster: format!("load.{NAMESPACE}"),
        metadata: Some(Struct { fields: meta.iter().map(|(k, v)| (k.to_string(), string_value(v))).collect() }),
        locality: Some(PbLocality { region: region.into(), zone: zones[z].into(), sub_zone: String::new() }),
        ..Default::default()
    }
}

/// The names of the CLAs of every present service (what a proxy subscribes to over EDS).
pub fn eds_names(t: &Topology) -> Vec<Arc<str>> {
    (0..t.slots()).filter(|s| t.is_present(*s)).map(|s| Arc::from(cluster_name(s))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_changes() {
        let mut t = Topology::new(Size { services: 4, endpoints: 4 });
        assert_eq!(t.endpoints(0, 0).len(), 2);
        assert_eq!(t.objects(0).len(), 1 + 3 + 4 * 2);
        assert_eq!(t.apply(&Change::Flap { svc: 1, cluster: 1, ep: 0 }).len(), 1);
        assert!(!t.endpoints(1, 1)[0].ready);
        assert!(t.apply(&Change::Flap { svc: 9, cluster: 1, ep: 0 }).is_empty());
        assert_eq!(t.apply(&Change::RemoveService { svc: 2 }).len(), 4);
        assert_eq!(t.apply(&Change::AddService { svc: 2 }).len(), 4);
        let line = Change::Grow { svc: 3, cluster: 0, n: 7 }.to_line();
        assert_eq!(Change::parse(&line), Some(Change::Grow { svc: 3, cluster: 0, n: 7 }));
        assert_eq!(Size::parse("50x4"), Some(Size { services: 50, endpoints: 4 }));
    }

    #[test]
    fn file_layout_parses_to_the_same_objects() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Topology::new(Size { services: 12, endpoints: 4 });
        t.write_files(dir.path(), "0ms", "0ms").unwrap();
        t.apply_to_files(dir.path(), &Change::Flap { svc: 11, cluster: 0, ep: 1 }).unwrap();
        for (c, (id, _, _)) in CLUSTERS.iter().enumerate() {
            let (mut objects, errors) = meshfed::source::files::load_cluster_dir(&dir.path().join(id));
            assert!(errors.is_empty(), "{errors:?}");
            let mut expected = t.objects(c);
            objects.sort_by_key(|o| o.key());
            expected.sort_by_key(|o| o.key());
            assert_eq!(objects.len(), expected.len());
            for (a, b) in objects.iter().zip(&expected) {
                assert_eq!(a.key(), b.key());
                if let (TopologyObject::EndpointSlice(a), TopologyObject::EndpointSlice(b)) = (a, b) {
                    assert_eq!(a.endpoints, b.endpoints);
                }
            }
        }
        let mesh = meshfed::mesh_config::MeshConfig::load(&dir.path().join("mesh.yaml")).unwrap();
        assert_eq!(mesh.clusters.len(), 2);
    }

    #[test]
    fn proxy_nodes_are_valid() {
        for k in [0, 1, 5, 9999] {
            let n = proxy_node(k, &ProxyIdentity::default());
            let p = meshfed::proxy::Proxy::from_node(Some(&n)).unwrap();
            assert_eq!(&*p.namespace, NAMESPACE);
            assert_eq!(p.interception, meshfed::proxy::InterceptionMode::None);
        }
        // the per-type EDS proxies present themselves as istio-injected sidecars
        let n = proxy_node(3, &ProxyIdentity { interception: "REDIRECT", ..Default::default() });
        let p = meshfed::proxy::Proxy::from_node(Some(&n)).unwrap();
        assert_eq!(p.interception, meshfed::proxy::InterceptionMode::Redirect);
    }
}
