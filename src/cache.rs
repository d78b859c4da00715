//! The resource cache: what each scope of proxies should have, encoded once and shared.
//!
//! A [`Snapshot`] is immutable and published through a `watch` channel: the push loop builds the next
//! one while streams read the current one, and a slow stream simply reads a newer snapshot when it
//! gets to it (it can never block the publisher). Resource maps are persistent (`imbl`), so a new
//! snapshot that changes one ClusterLoadAssignment shares everything else with the previous one.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use prost::{Message, Name};

use crate::registry::ClusterSummary;
use crate::translate::{ClusterScope, EndpointScope, InboundScope, ListenerScope, Named, RouteScope, View};
use crate::type_url::ResourceType;

/// One resource, encoded once (as a canonical `google.protobuf.Any`) with a content-derived version.
#[derive(Debug, PartialEq, Eq)]
pub struct Resource {
    pub name: Arc<str>,
    /// hex of a 64-bit hash of `body`: equal content gives equal versions, in every process
    pub version: Arc<str>,
    /// the encoded `google.protobuf.Any`
    pub body: Bytes,
    /// included in wildcard subscriptions (false for gRPC api_listeners and their routes)
    pub wildcard: bool,
}

impl Resource {
    pub fn encode<M: Message + Name>(named: Named<M>) -> Arc<Resource> {
        let body = crate::canonical::encode_any_canonical(&named.resource);
        let version = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&body));
        Arc::new(Resource { name: named.name.into(), version: version.into(), body, wildcard: named.wildcard })
    }

    /// A stand-in for a resource a client reports it holds (Delta `initial_resource_versions`): only its
    /// name and version are known.
    pub fn reported(name: &str, version: &str) -> Arc<Resource> {
        Arc::new(Resource { name: name.into(), version: version.into(), body: Bytes::new(), wildcard: false })
    }
}

/// The resources of one type for one scope, by name (ordered, so iteration is deterministic).
pub type Resources = imbl::OrdMap<Arc<str>, Arc<Resource>>;

/// Which resources of one type changed since the previous snapshot (changed, added or removed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangedNames(pub BTreeSet<Arc<str>>);

/// What changed between a snapshot and the one before it.
#[derive(Clone, Debug, Default)]
pub struct Changes {
    /// per resource type (indexed by [`ResourceType::index`]); None: nothing of that type changed
    pub by_type: [Option<ChangedNames>; 4],
    /// a short description of the cause, for logs and the debug surface
    pub trigger: String,
    /// when the push loop first saw the change (None for snapshots published because a proxy
    /// attached); the start of the convergence time the metrics report
    pub seen: Option<Instant>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.by_type.iter().all(|c| c.as_ref().is_none_or(|c| c.0.is_empty()))
    }

    pub fn get(&self, t: ResourceType) -> Option<&ChangedNames> {
        self.by_type[t.index()].as_ref()
    }

    pub fn add(&mut self, t: ResourceType, names: impl IntoIterator<Item = Arc<str>>) {
        let set = self.by_type[t.index()].get_or_insert_with(ChangedNames::default);
        set.0.extend(names);
    }
}

/// Everything the xDS streams and the debug surface read, at one generation.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub generation: u64,
    pub clusters: imbl::HashMap<ClusterScope, Resources>,
    /// per sidecar workload: its inbound clusters (merged into its CDS)
    pub inbound_clusters: imbl::HashMap<InboundScope, Resources>,
    pub endpoints: imbl::HashMap<EndpointScope, Resources>,
    pub listeners: imbl::HashMap<ListenerScope, Resources>,
    pub routes: imbl::HashMap<RouteScope, Resources>,
    /// sidecars' gRPC api_listeners, the same for every listener scope (merged into a sidecar's LDS)
    pub api_listeners: Resources,
    /// what changed from `generation - 1`
    pub changes: Arc<Changes>,
    /// the changes of the last [`RECENT_CHANGES`] generations, oldest first, this one's last: a stream
    /// a few generations behind diffs only what they changed
    pub recent: Arc<Vec<(u64, Arc<Changes>)>>,
    /// the federated services this snapshot was built from (O(1) to clone)
    pub services: imbl::OrdMap<crate::model::ServiceKey, Arc<crate::model::Service>>,
    pub gateways: Arc<Vec<crate::model::Gateway>>,
    /// every network's east-west gateway addresses, hostnames resolved (what the gateway probes probe)
    pub gateway_addresses: Arc<GatewayAddresses>,
    /// the gateway probes' verdict translation used (down gateway addresses, fenced networks)
    pub gateway_verdict: Arc<crate::liveness::Verdict>,
    pub clusters_summary: Arc<Vec<ClusterSummary>>,
    /// what views depend on besides the proxy (the labels failoverPriority rules use, the namespaces and
    /// labels DestinationRules make matter): a proxy re-attaches when they change
    pub view_keys: Arc<crate::translate::ViewKeys>,
    /// the translation context of this generation (what-if translates again under a hypothesis)
    pub context: Arc<crate::translate::Context>,
    /// the traffic policy and its failover state ([`crate::traffic`])
    pub traffic: Arc<crate::traffic::Status>,
}

/// Per network, its east-west gateways' (address, port)s.
pub type GatewayAddresses =
    std::collections::BTreeMap<crate::model::NetworkId, std::collections::BTreeSet<std::net::SocketAddr>>;

/// Generations whose changes a snapshot keeps ([`Snapshot::recent`]).
pub const RECENT_CHANGES: usize = 16;

impl Snapshot {
    /// The changes from generation `from` to this one, when all of them are kept (None otherwise).
    pub fn changes_since(&self, from: u64) -> Option<Vec<Arc<Changes>>> {
        if from >= self.generation {
            return Some(Vec::new());
        }
        let need = (self.generation - from) as usize;
        let kept: Vec<Arc<Changes>> =
            self.recent.iter().filter(|(g, _)| *g > from && *g <= self.generation).map(|(_, c)| c.clone()).collect();
        (kept.len() == need).then_some(kept)
    }

    /// The resources of one type a proxy with `view` should have (None if its scope is not attached).
    /// Cheap: resource maps are persistent; a sidecar's few inbound clusters are merged into the shared
    /// outbound ones.
    pub fn resources(&self, view: &View, t: ResourceType) -> Option<Resources> {
        match t {
            ResourceType::Cluster => {
                let outbound = self.clusters.get(&view.clusters)?;
                match view.inbound.as_ref().and_then(|i| self.inbound_clusters.get(i)) {
                    Some(inbound) if !inbound.is_empty() => Some(inbound.clone().union(outbound.clone())),
                    _ => Some(outbound.clone()),
                }
            }
            ResourceType::Endpoint => self.endpoints.get(&view.endpoints).cloned(),
            ResourceType::Listener => {
                let own = self.listeners.get(&view.listeners)?;
                match view.listeners.kind {
                    crate::proxy::ProxyKind::Sidecar | crate::proxy::ProxyKind::Ingress
                        if !self.api_listeners.is_empty() =>
                    {
                        Some(own.clone().union(self.api_listeners.clone()))
                    }
                    _ => Some(own.clone()),
                }
            }
            ResourceType::Route => self.routes.get(&view.routes).cloned(),
        }
    }
}

/// Replaces the resources of `map` with `new`, keeping the existing `Arc` where the version is equal,
/// and returns the names that changed (added, changed or removed).
pub fn replace_all(map: &mut Resources, new: Vec<Arc<Resource>>) -> BTreeSet<Arc<str>> {
    let mut changed = BTreeSet::new();
    let mut next = Resources::new();
    for r in new {
        match map.get(&r.name) {
            Some(old) if old.version == r.version => {
                next.insert(old.name.clone(), old.clone());
            }
            _ => {
                changed.insert(r.name.clone());
                next.insert(r.name.clone(), r);
            }
        }
    }
    for name in map.keys() {
        if !next.contains_key(name) {
            changed.insert(name.clone());
        }
    }
    *map = next;
    changed
}

/// Updates (or removes) individual resources in `map`; returns the names that changed.
pub fn update(map: &mut Resources, upserts: Vec<Arc<Resource>>, removals: &[Arc<str>]) -> BTreeSet<Arc<str>> {
    let mut changed = BTreeSet::new();
    let keep: BTreeSet<&Arc<str>> = upserts.iter().map(|r| &r.name).collect();
    for name in removals {
        if !keep.contains(name) && map.remove(name).is_some() {
            changed.insert(name.clone());
        }
    }
    for r in upserts {
        if map.get(&r.name).is_none_or(|old| old.version != r.version) {
            changed.insert(r.name.clone());
            map.insert(r.name.clone(), r);
        }
    }
    changed
}

/// An assignment `name` with `n` empty localities, encoded (for tests).
#[cfg(test)]
pub(crate) fn test_assignment(name: &str, n: usize) -> Arc<Resource> {
    let c = envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![Default::default(); n],
        ..Default::default()
    };
    Resource::encode(crate::translate::Named::new(name, c))
}

#[cfg(test)]
mod tests {

    use super::*;

    use super::test_assignment as cla;

    #[test]
    fn versions_derive_from_content() {
        assert_eq!(cla("a", 1).version, cla("a", 1).version);
        assert_ne!(cla("a", 1).version, cla("a", 2).version);
        assert_eq!(cla("a", 1).version.len(), 16);
    }

    #[test]
    fn replace_all_reports_added_changed_removed_and_keeps_arcs() {
        let mut m = Resources::new();
        let changed = replace_all(&mut m, vec![cla("a", 1), cla("b", 1)]);
        assert_eq!(changed.len(), 2);
        let a = m.get("a").unwrap().clone();
        let changed = replace_all(&mut m, vec![cla("a", 1), cla("c", 1)]);
        let names: Vec<&str> = changed.iter().map(|s| &**s).collect();
        assert_eq!(names, ["b", "c"]);
        assert!(Arc::ptr_eq(&a, m.get("a").unwrap()), "unchanged resources keep their shared encoding");
    }

    #[test]
    fn changes_since_needs_every_generation_kept() {
        let ch = |n: &str| {
            let mut c = Changes::default();
            c.add(ResourceType::Endpoint, [Arc::from(n)]);
            Arc::new(c)
        };
        let snap = Snapshot {
            generation: 7,
            recent: Arc::new(vec![(5, ch("a")), (6, ch("b")), (7, ch("c"))]),
            ..Default::default()
        };
        let names = |v: Vec<Arc<Changes>>| -> Vec<String> {
            v.iter().flat_map(|c| c.get(ResourceType::Endpoint).unwrap().0.iter().map(|n| n.to_string())).collect()
        };
        assert_eq!(names(snap.changes_since(6).unwrap()), ["c"]);
        assert_eq!(names(snap.changes_since(4).unwrap()), ["a", "b", "c"]);
        assert!(snap.changes_since(3).is_none(), "generation 4's changes are not kept");
        assert!(snap.changes_since(7).unwrap().is_empty());
    }

    #[test]
    fn update_ignores_unchanged_content() {
        let mut m = Resources::new();
        update(&mut m, vec![cla("a", 1)], &[]);
        assert!(update(&mut m, vec![cla("a", 1)], &[]).is_empty());
        assert_eq!(update(&mut m, vec![cla("a", 2)], &[]).len(), 1);
        assert_eq!(update(&mut m, vec![], &["a".into()]).len(), 1);
        assert!(m.is_empty());
    }
}
