//! Translation: (federated registry, proxy view) -> Envoy resources. Pure: no I/O, no clock.
//!
//! Each resource type depends on only part of a proxy's identity — its *scope*. Proxies with equal
//! scopes get identical resources, so the cache translates and encodes once per scope and shares the
//! result: CDS depends on the proxy kind; EDS on kind, network and locality (priorities, split
//! horizon); LDS on kind, interception mode and bind address; RDS on kind and namespace (short names).
//! CDS, EDS and a gateway's LDS also depend on which DestinationRules the proxy sees ([`RuleScope`]):
//! only where some rule makes the proxy's namespace or labels matter ([`ViewKeys`]) do they enter the
//! scope; every other proxy shares the default.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::mesh_config::MeshConfig;
use crate::model::{ClusterId, Gateway, Locality, NetworkId, Service};
use crate::policy::{ConsolidatedRule, EffectivePolicy, MeshDefaults, RuleIndex, Subset};
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
    /// the valid DestinationRules (in the registry's deterministic order), indexed for lookup
    pub rules: Arc<RuleIndex>,
    /// east-west gateways of every network
    pub gateways: Arc<Vec<Gateway>>,
    /// gateway hostnames (AWS ELBs) resolved to addresses, by the gateway resolver
    pub resolved: Arc<BTreeMap<String, Vec<IpAddr>>>,
    /// clusters whose API has been unreachable longer than the grace period: their endpoints go to
    /// a priority below every reachable cluster's
    pub demoted_clusters: Arc<BTreeSet<ClusterId>>,
    /// the gateway probes' verdict (empty when probing is off): a fenced network's endpoints go to last
    /// resort for proxies on other networks; a down gateway address leaves its network's gateway list
    pub gateway_verdict: Arc<crate::liveness::Verdict>,
    /// the traffic policy's decisions ([`crate::traffic::decide`]): per covered service and source
    /// region, each cluster's share (priority-0 locality weights)
    pub traffic: Arc<crate::traffic::Decisions>,
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
            gateway_verdict: Arc::default(),
            traffic: Arc::default(),
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

    /// Takes the registry's DestinationRules (indexing them when they changed) and gateways (cheap:
    /// shared `Arc`s).
    pub fn update_from(&mut self, registry: &Registry) {
        if !Arc::ptr_eq(self.rules.rules(), registry.destination_rules()) {
            self.set_rules(registry.destination_rules().clone());
        }
        if !Arc::ptr_eq(&self.gateways, registry.gateways()) {
            self.gateways = registry.gateways().clone();
        }
    }

    /// Indexes `rules` for lookup ([`RuleIndex`], root namespace [`crate::registry::SYSTEM_NAMESPACE`]).
    pub fn set_rules(&mut self, rules: Arc<Vec<Arc<crate::policy::DestinationRule>>>) {
        self.rules = Arc::new(RuleIndex::new(rules, &self.domain_suffix, crate::registry::SYSTEM_NAMESPACE));
    }

    /// The DestinationRule that applies to `service` for proxies in `scope`.
    pub fn rule_for(&self, scope: &RuleScope, service: &Service) -> Option<&ConsolidatedRule> {
        self.rule_for_host(scope, &service.key.namespace, &service.hostname)
    }

    /// [`Self::rule_for`] by the service's namespace and hostname.
    pub fn rule_for_host(&self, scope: &RuleScope, namespace: &str, hostname: &str) -> Option<&ConsolidatedRule> {
        self.rules.rule_for(scope.namespace.as_deref(), &scope.selected_by, namespace, hostname).map(|r| &**r)
    }

    /// The traffic policy of one service port (DestinationRules over mesh defaults), for proxies that
    /// see the default rules (a namespace no rule mentions).
    pub fn policy(&self, service: &Service, port: u16) -> EffectivePolicy {
        EffectivePolicy::of(self.rule_for(&RuleScope::default(), service), port, None, &self.defaults)
    }

    /// The traffic policy of one port (and subset) of a service under `rule`.
    pub fn policy_with(&self, rule: Option<&ConsolidatedRule>, port: u16, subset: Option<&Subset>) -> EffectivePolicy {
        EffectivePolicy::of(rule, port, subset, &self.defaults)
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
        let mut add_policy = |tp: &crate::policy::TrafficPolicy| {
            let lbs = tp.load_balancer.iter().chain(tp.port_level.iter().filter_map(|p| p.load_balancer.as_ref()));
            for lb in lbs {
                if let Some(l) = &lb.locality_lb {
                    add(l);
                }
            }
        };
        for r in self.rules.iter() {
            let subsets = r.subsets.iter().filter_map(|s| s.traffic_policy.as_ref());
            for tp in r.traffic_policy.iter().chain(subsets) {
                add_policy(tp);
            }
        }
        keys
    }

    /// What proxies' views depend on besides their own identity: the failoverPriority labels, and which
    /// namespaces and workload labels change the DestinationRules a proxy sees (walks the services only
    /// when some rule could make a namespace differ).
    pub fn view_keys(&self, registry: &Registry) -> ViewKeys {
        let services = registry.services().values().map(|s| (&*s.key.namespace, &*s.hostname));
        ViewKeys {
            priority_labels: self.priority_label_keys(),
            rule_namespaces: self.rules.namespaces_that_differ(services),
            workload_selectors: self.rules.workload_selectors().clone(),
        }
    }

    /// The addresses of a gateway: its IP, or what its hostname resolved to (nothing yet: none).
    pub fn gateway_addresses(&self, gateway: &Gateway) -> Vec<IpAddr> {
        match gateway.address.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => self.resolved.get(&*gateway.address).cloned().unwrap_or_default(),
        }
    }
}

/// What views depend on that the push loop computes from the rules and the registry (see
/// [`Context::view_keys`]); a proxy's view is rebuilt when they change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ViewKeys {
    /// the label keys failoverPriority rules use (a proxy's EDS scope carries its values of these)
    pub priority_labels: BTreeSet<String>,
    /// namespaces whose proxies see other DestinationRules than proxies in a namespace no rule mentions
    pub rule_namespaces: BTreeSet<Arc<str>>,
    /// DestinationRules with a workloadSelector, by namespace: (`namespace/name`, matchLabels)
    pub workload_selectors: crate::policy::WorkloadSelectors,
}

impl ViewKeys {
    /// Which DestinationRules a proxy in `namespace` with `labels` sees: its namespace only where it
    /// matters, and the workloadSelector rules whose labels it has.
    pub fn rule_scope(&self, namespace: &Arc<str>, labels: &BTreeMap<String, String>) -> RuleScope {
        let selected_by: Vec<Arc<str>> = self
            .workload_selectors
            .get(namespace)
            .into_iter()
            .flatten()
            .filter(|(_, selector)| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .map(|(rule, _)| rule.clone())
            .collect();
        let namespace =
            (!selected_by.is_empty() || self.rule_namespaces.contains(namespace)).then(|| namespace.clone());
        RuleScope { namespace, selected_by }
    }
}

/// Which DestinationRules a proxy sees (istiod's lookup for the proxy's namespace and labels).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RuleScope {
    /// the proxy's namespace, when some rule makes it matter (None: as a namespace no rule mentions)
    pub namespace: Option<Arc<str>>,
    /// the workloadSelector rules (`namespace/name`) that select the proxy
    pub selected_by: Vec<Arc<str>>,
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
    /// the DestinationRules the proxies see (their subsets are clusters too)
    pub rules: RuleScope,
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
    /// the DestinationRules the proxies see (policies, subsets)
    pub rules: RuleScope,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ListenerScope {
    pub kind: ProxyKind,
    pub interception: InterceptionMode,
    /// the address outbound listeners bind to (interception NONE), else None
    pub bind: Option<IpAddr>,
    pub tls: TlsSupport,
    pub inbound: Option<InboundScope>,
    /// gateways: the DestinationRules they see (a filter chain per subset); default for sidecars, whose
    /// listeners do not depend on them
    pub rules: RuleScope,
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
        let ctx =
            Context { domain_suffix: registry.domain_suffix().into(), ..Context::default() }.with_registry(registry);
        View::with_network(proxy, network, &ctx.view_keys(registry))
    }

    /// The view of a proxy whose network is already resolved; `keys`: what else views depend on (the
    /// labels failoverPriority rules use, the namespaces and labels DestinationRules make matter).
    ///
    /// An ingress gateway's config is a sidecar's outbound config (the same scopes, shared with the
    /// sidecars beside it): no inbound side, and its listeners bound on its own address, as there is no
    /// traffic capture on a gateway.
    pub fn with_network(proxy: &Proxy, network: NetworkId, keys: &ViewKeys) -> View {
        let (kind, tls, interception) = match proxy.kind {
            // east-west gateways pass TLS through; they need no certificates of their own
            ProxyKind::Router => (ProxyKind::Router, TlsSupport::None, proxy.interception),
            ProxyKind::Sidecar => (ProxyKind::Sidecar, proxy.tls, proxy.interception),
            ProxyKind::Ingress => (ProxyKind::Sidecar, proxy.tls, InterceptionMode::None),
        };
        let inbound = (proxy.kind == ProxyKind::Sidecar && tls != TlsSupport::None)
            .then_some(InboundScope { ip: proxy.ip, app: proxy.inbound_address });
        let label_keys = &keys.priority_labels;
        let labels =
            proxy.labels.iter().filter(|(k, _)| label_keys.contains(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        let rules = keys.rule_scope(&proxy.namespace, &proxy.labels);
        View {
            clusters: ClusterScope { kind, tls, rules: rules.clone() },
            inbound: inbound.clone(),
            endpoints: EndpointScope {
                kind,
                network,
                locality: proxy.locality.clone(),
                // only a failoverPriority on the cluster label needs it (it would split scopes otherwise)
                cluster_id: proxy.cluster_id.clone().filter(|_| label_keys.contains(CLUSTER_LABEL)),
                labels,
                tls,
                rules: rules.clone(),
            },
            listeners: ListenerScope {
                kind,
                interception,
                bind: (interception == InterceptionMode::None).then_some(proxy.ip),
                tls,
                inbound,
                rules: if kind == ProxyKind::Router { rules } else { RuleScope::default() },
            },
            routes: RouteScope { kind, namespace: proxy.namespace.clone() },
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

/// The name of a proxy's cluster for a service port (`subset` empty) or one of its subsets: SNI-named
/// on gateways, Istio's outbound name on sidecars.
pub fn cluster_name(kind: ProxyKind, port: u16, subset: &str, fqdn: &str) -> String {
    match kind {
        ProxyKind::Sidecar | ProxyKind::Ingress => outbound_cluster_name(port, subset, fqdn),
        ProxyKind::Router => sni_name(port, subset, fqdn),
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
