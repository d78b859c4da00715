//! Translation: (federated registry, proxy view) -> Envoy resources. Pure: no I/O, no clock.
//!
//! Each resource type depends on only part of a proxy's identity — its *scope*. Proxies with equal
//! scopes get identical resources, so the cache translates and encodes once per scope and shares the
//! result: CDS depends on the proxy kind; EDS on kind, network and locality (priorities, split
//! horizon); LDS on kind, interception mode and bind address; RDS on kind and namespace (short names).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::mesh_config::MeshConfig;
use crate::model::{ClusterId, Gateway, Locality, NetworkId, Service};
use crate::policy::{DestinationRule, EffectivePolicy, MeshDefaults};
use crate::proxy::{InterceptionMode, Proxy, ProxyKind, TlsSupport};
use crate::registry::Registry;

pub mod cluster;
pub mod diagnostics;
pub mod endpoint;
pub mod listener;
pub mod route;
#[cfg(test)]
mod tests;
pub mod tls;
mod util;

/// Everything mesh-wide that translation reads besides the services themselves. Kept current by the
/// push loop; translation never does I/O or reads a clock, so these are its only other inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Context {
    pub domain_suffix: Arc<str>,
    /// SPIFFE trust domain of workload identities
    pub trust_domain: Arc<str>,
    pub send_unhealthy_endpoints: bool,
    pub defaults: MeshDefaults,
    /// valid DestinationRules, in the registry's deterministic order
    pub rules: Arc<Vec<Arc<DestinationRule>>>,
    /// east-west gateways of every network
    pub gateways: Arc<Vec<Gateway>>,
    /// gateway hostnames (AWS ELBs) resolved to addresses, by the gateway resolver
    pub resolved: Arc<BTreeMap<String, Vec<IpAddr>>>,
    /// clusters whose API has been unreachable longer than the grace period: their endpoints go to
    /// a priority below every reachable cluster's
    pub demoted_clusters: Arc<BTreeSet<ClusterId>>,
}

impl Default for Context {
    fn default() -> Self {
        Context {
            domain_suffix: "cluster.local".into(),
            trust_domain: "cluster.local".into(),
            send_unhealthy_endpoints: false,
            defaults: MeshDefaults::default(),
            rules: Arc::default(),
            gateways: Arc::default(),
            resolved: Arc::default(),
            demoted_clusters: Arc::default(),
        }
    }
}

impl Context {
    pub fn from_mesh(mesh: &MeshConfig) -> Context {
        Context {
            domain_suffix: mesh.domain_suffix.as_str().into(),
            trust_domain: mesh.trust_domain.as_str().into(),
            send_unhealthy_endpoints: mesh.send_unhealthy_endpoints,
            defaults: mesh.defaults.clone(),
            ..Context::default()
        }
    }

    /// This context with the registry's DestinationRules and gateways.
    pub fn with_registry(mut self, registry: &Registry) -> Context {
        self.update_from(registry);
        self
    }

    /// Takes the registry's DestinationRules and gateways (cheap: shared `Arc`s).
    pub fn update_from(&mut self, registry: &Registry) {
        if !Arc::ptr_eq(&self.rules, registry.destination_rules()) {
            self.rules = registry.destination_rules().clone();
        }
        if !Arc::ptr_eq(&self.gateways, registry.gateways()) {
            self.gateways = registry.gateways().clone();
        }
    }

    /// The traffic policy of one service port (DestinationRules over mesh defaults).
    pub fn policy(&self, service: &Service, port: u16) -> EffectivePolicy {
        crate::policy::resolve(
            self.rules.iter().map(|r| &**r),
            &service.hostname,
            &service.key.namespace,
            port,
            &self.defaults,
            &self.domain_suffix,
        )
    }

    /// The label keys any failoverPriority uses (a proxy's view carries its values of these).
    pub fn priority_label_keys(&self) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        let mut add = |l: &crate::policy::LocalityLbSetting| {
            for k in &l.failover_priority {
                keys.insert(k.split_once('=').map(|(k, _)| k).unwrap_or(k).to_string());
            }
        };
        add(&self.defaults.locality_lb);
        for r in self.rules.iter() {
            if let Some(l) = &r.traffic_policy.locality_lb {
                add(l);
            }
            for p in &r.traffic_policy.port_level {
                if let Some(l) = &p.locality_lb {
                    add(l);
                }
            }
        }
        keys
    }

    /// The addresses of a gateway: its IP, or what its hostname resolved to (nothing yet: none).
    pub fn gateway_addresses(&self, gateway: &Gateway) -> Vec<IpAddr> {
        match gateway.address.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => self.resolved.get(&*gateway.address).cloned().unwrap_or_default(),
        }
    }
}

/// Where a sidecar's inbound (mTLS-terminating) listeners are and where they forward.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct InboundScope {
    /// the workload's address: inbound listeners for the ports it serves bind here (interception NONE)
    pub ip: IpAddr,
    /// where the application listens (node metadata `MESHFED_INBOUND_ADDRESS`, default 127.0.0.1)
    pub app: IpAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ClusterScope {
    pub kind: ProxyKind,
    pub tls: TlsSupport,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct EndpointScope {
    pub kind: ProxyKind,
    pub network: NetworkId,
    pub locality: Locality,
    pub cluster_id: Option<ClusterId>,
    /// the proxy's values of the labels failoverPriority rules use
    pub labels: Vec<(String, String)>,
    /// whether the proxy can reach other networks (through their gateways, over mTLS)
    pub tls: TlsSupport,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ListenerScope {
    pub kind: ProxyKind,
    pub interception: InterceptionMode,
    /// the address outbound listeners bind to (interception NONE), else None
    pub bind: Option<IpAddr>,
    pub tls: TlsSupport,
    pub inbound: Option<InboundScope>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RouteScope {
    pub kind: ProxyKind,
    pub namespace: Arc<str>,
}

/// Everything a proxy's resources depend on, one scope per resource type.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct View {
    pub clusters: ClusterScope,
    /// sidecars with mesh certificates: their own inbound clusters (`inbound|PORT||`), kept apart from
    /// the outbound clusters so that those stay shared by every proxy of the same kind
    pub inbound: Option<InboundScope>,
    pub endpoints: EndpointScope,
    pub listeners: ListenerScope,
    pub routes: RouteScope,
}

impl View {
    /// The view of a proxy. Its network is node metadata NETWORK, else its cluster's network.
    pub fn of(proxy: &Proxy, registry: &Registry) -> View {
        let network = if proxy.network.is_empty() {
            proxy.cluster_id.as_ref().and_then(|c| registry.cluster_network(c)).unwrap_or_default()
        } else {
            proxy.network.clone()
        };
        let ctx = Context::default().with_registry(registry);
        View::with_network(proxy, network, &ctx.priority_label_keys())
    }

    /// The view of a proxy whose network is already resolved; `label_keys`: the labels failoverPriority
    /// rules use.
    pub fn with_network(proxy: &Proxy, network: NetworkId, label_keys: &BTreeSet<String>) -> View {
        let tls = match proxy.kind {
            // gateways pass TLS through; they need no certificates of their own
            ProxyKind::Router => TlsSupport::None,
            ProxyKind::Sidecar => proxy.tls,
        };
        let inbound = (proxy.kind == ProxyKind::Sidecar && tls != TlsSupport::None)
            .then_some(InboundScope { ip: proxy.ip, app: proxy.inbound_address });
        let labels =
            proxy.labels.iter().filter(|(k, _)| label_keys.contains(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        View {
            clusters: ClusterScope { kind: proxy.kind, tls },
            inbound: inbound.clone(),
            endpoints: EndpointScope {
                kind: proxy.kind,
                network,
                locality: proxy.locality.clone(),
                // only a failoverPriority on the cluster label needs it (it would split scopes otherwise)
                cluster_id: proxy.cluster_id.clone().filter(|_| label_keys.contains(CLUSTER_LABEL)),
                labels,
                tls,
            },
            listeners: ListenerScope {
                kind: proxy.kind,
                interception: proxy.interception,
                bind: (proxy.interception == InterceptionMode::None).then_some(proxy.ip),
                tls,
                inbound,
            },
            routes: RouteScope { kind: proxy.kind, namespace: proxy.namespace.clone() },
        }
    }
}

/// A translated resource and whether a wildcard subscription includes it (gRPC api_listeners are
/// served only to clients that name them).
#[derive(Clone, Debug, PartialEq)]
pub struct Named<T> {
    pub name: String,
    pub resource: T,
    pub wildcard: bool,
}

impl<T> Named<T> {
    pub fn new(name: impl Into<String>, resource: T) -> Self {
        Named { name: name.into(), resource, wildcard: true }
    }
}

/// `outbound|PORT|SUBSET|FQDN`
pub fn outbound_cluster_name(port: u16, subset: &str, fqdn: &str) -> String {
    format!("outbound|{port}|{subset}|{fqdn}")
}

/// `outbound_.PORT_.SUBSET_.FQDN`: the SNI of mTLS traffic to a service port, and the name of the
/// cluster an east-west gateway forwards it to.
pub fn sni_name(port: u16, subset: &str, fqdn: &str) -> String {
    format!("outbound_.{port}_.{subset}_.{fqdn}")
}

/// The name of a proxy's cluster for a service port: SNI-named on gateways, Istio's outbound name on
/// sidecars.
pub fn cluster_name(kind: ProxyKind, port: u16, fqdn: &str) -> String {
    match kind {
        ProxyKind::Sidecar => outbound_cluster_name(port, "", fqdn),
        ProxyKind::Router => sni_name(port, "", fqdn),
    }
}

/// `inbound|PORT||`
pub fn inbound_cluster_name(port: u16) -> String {
    format!("inbound|{port}||")
}

/// Parses `outbound|PORT|SUBSET|FQDN` into (port, subset, fqdn).
pub fn parse_outbound_cluster_name(name: &str) -> Option<(u16, &str, &str)> {
    let mut it = name.splitn(4, '|');
    if it.next()? != "outbound" {
        return None;
    }
    let port = it.next()?.parse().ok()?;
    let subset = it.next()?;
    let fqdn = it.next()?;
    Some((port, subset, fqdn))
}

/// The topology label of a workload's cluster (usable in failoverPriority).
pub const CLUSTER_LABEL: &str = "topology.istio.io/cluster";

pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
