//! Traffic policy: Istio DestinationRules (networking.istio.io v1 / v1beta1 / v1alpha3) and the
//! mesh-wide defaults, validated as istiod validates them, consolidated and looked up per client as
//! istiod does ([`RuleIndex`]), and resolved per service port and subset ([`EffectivePolicy`]).
//!
//! What meshfed applies: `trafficPolicy.loadBalancer.localityLbSetting`, `trafficPolicy.outlierDetection`,
//! their `portLevelSettings` overrides, `subsets` (their `labels` select endpoints, their own
//! `trafficPolicy` overrides the rule's as istiod merges it), `exportTo` and `workloadSelector`. Every
//! other field (`connectionPool`, `loadBalancer.simple`, `tls`, ..., and fields meshfed does not know)
//! is kept out of the rule and named in [`DestinationRule::not_applied`], so that it is reported instead
//! of being dropped silently; it never makes a rule invalid.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::parse_duration;

/// Istio's default root (config) namespace: its DestinationRules apply mesh-wide, after the client's
/// namespace's and the service's namespace's.
pub const ROOT_NAMESPACE: &str = "istio-system";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("DestinationRule {object}: {field}: {reason}")]
pub struct Error {
    /// `namespace/name`
    pub object: String,
    /// the offending field, as a path (`spec.trafficPolicy.outlierDetection.interval`)
    pub field: String,
    pub reason: String,
}

/// Istio's outlierDetection. Unset fields keep Envoy's defaults, which are Istio's documented defaults
/// (consecutive5xxErrors 5, interval 10s, baseEjectionTime 30s, maxEjectionPercent 10).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub consecutive_local_origin_failures: Option<u32>,
    pub split_external_local_origin_errors: bool,
    pub interval: Option<Duration>,
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_percent: Option<u32>,
    /// Istio sets Envoy's healthy_panic_threshold to this (default 0: panic mode off)
    pub min_health_percent: u32,
}

/// A `distribute` entry: traffic from localities matching `from` is split over `to` by weight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Distribute {
    pub from: String,
    pub to: BTreeMap<String, u32>,
}

/// A `failover` entry: when a proxy's region is `from`, the next priority after its region is `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Failover {
    pub from: String,
    pub to: String,
}

/// Istio's localityLbSetting.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LocalityLbSetting {
    /// None: enabled (Istio's default)
    pub enabled: Option<bool>,
    pub distribute: Vec<Distribute>,
    pub failover: Vec<Failover>,
    pub failover_priority: Vec<String>,
}

impl LocalityLbSetting {
    pub fn is_enabled(&self) -> bool {
        self.enabled != Some(false)
    }
}

/// Istio's `loadBalancer`, of which meshfed applies `localityLbSetting`. Whether it is set at all matters:
/// a subset's `loadBalancer` replaces the rule's whole, as in istiod (its localityLbSetting included).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LoadBalancer {
    pub locality_lb: Option<LocalityLbSetting>,
}

/// Policy for one port (`portLevelSettings`). As in istiod it replaces the level it is part of as a
/// whole: what it does not set takes the defaults, not the top level's value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PortPolicy {
    pub port: u16,
    pub load_balancer: Option<LoadBalancer>,
    pub outlier_detection: Option<OutlierDetection>,
}

/// A `trafficPolicy` (of a rule or of a subset), as far as meshfed applies it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub outlier_detection: Option<OutlierDetection>,
    pub port_level: Vec<PortPolicy>,
}

impl TrafficPolicy {
    /// istiod's `GetPortLevelTrafficPolicy`: the port's settings when the policy has some for `port`
    /// (they replace the top level as a whole), else the top level; and whether they were port-level.
    pub fn at_port(&self, port: u16) -> (PolicyAt<'_>, bool) {
        match self.port_level.iter().find(|p| p.port == port) {
            Some(p) => (
                PolicyAt { load_balancer: p.load_balancer.as_ref(), outlier_detection: p.outlier_detection.as_ref() },
                true,
            ),
            None => (
                PolicyAt {
                    load_balancer: self.load_balancer.as_ref(),
                    outlier_detection: self.outlier_detection.as_ref(),
                },
                false,
            ),
        }
    }
}

/// What a traffic policy sets for one port (before the mesh defaults fill its gaps).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyAt<'a> {
    pub load_balancer: Option<&'a LoadBalancer>,
    pub outlier_detection: Option<&'a OutlierDetection>,
}

impl<'a> PolicyAt<'a> {
    /// istiod's `MergeSubsetTrafficPolicy`: the rule's policy for `port`, overridden by the subset's. A
    /// field the subset's policy sets replaces the rule's (a whole `loadBalancer`, a whole
    /// `outlierDetection`); when the subset has settings for `port`, they replace the rule's as a whole.
    pub fn merged(rule: Option<&'a TrafficPolicy>, subset: Option<&'a TrafficPolicy>, port: u16) -> PolicyAt<'a> {
        let original = rule.map(|r| r.at_port(port).0);
        let Some(subset) = subset else { return original.unwrap_or_default() };
        let (sub, port_level) = subset.at_port(port);
        let Some(mut merged) = original else { return sub };
        if sub.outlier_detection.is_some() || port_level {
            merged.outlier_detection = sub.outlier_detection;
        }
        if sub.load_balancer.is_some() || port_level {
            merged.load_balancer = sub.load_balancer;
        }
        merged
    }
}

/// A DestinationRule subset: the endpoints whose pod labels include `labels`, with a policy of its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Subset {
    pub name: Arc<str>,
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
}

impl Subset {
    /// Does a workload with `labels` belong to the subset? (A subset without labels holds every one.)
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// A validated DestinationRule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DestinationRule {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// as written: an FQDN, a short name (relative to the rule's namespace) or a `*.` wildcard
    pub host: String,
    /// None when the rule has no `trafficPolicy` (it matters when istiod merges rules for one host)
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<Subset>,
    /// `exportTo` as written: `.` (the rule's namespace), `*` (everywhere) or namespace names; empty:
    /// everywhere (the mesh's `defaultDestinationRuleExportTo` is assumed to be `*`)
    pub export_to: Vec<String>,
    /// `workloadSelector.matchLabels`: the rule applies only to the proxies of its namespace with these
    /// labels
    pub workload_selector: Option<BTreeMap<String, String>>,
    /// `metadata.creationTimestamp`: among rules istiod merges, the older one's traffic policy wins
    #[serde(serialize_with = "serialize_timestamp")]
    pub created: Option<jiff::Timestamp>,
    /// the fields of the rule meshfed does not apply, as paths (`spec.trafficPolicy.connectionPool`)
    pub not_applied: Vec<String>,
}

fn serialize_timestamp<S: serde::Serializer>(t: &Option<jiff::Timestamp>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&t.to_string()),
        None => s.serialize_none(),
    }
}

impl DestinationRule {
    /// A rule for `host` that sets nothing (no policy, no subsets, exported everywhere).
    pub fn new(namespace: &str, name: &str, host: &str) -> DestinationRule {
        DestinationRule {
            namespace: namespace.into(),
            name: name.into(),
            host: host.to_string(),
            traffic_policy: None,
            subsets: Vec::new(),
            export_to: Vec::new(),
            workload_selector: None,
            created: None,
            not_applied: Vec::new(),
        }
    }

    /// `namespace/name`
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Istio's config path, written to cluster metadata `filter_metadata.istio.config`.
    pub fn config_path(&self) -> String {
        format!("/apis/networking.istio.io/v1/namespaces/{}/destination-rule/{}", self.namespace, self.name)
    }

    /// The rule's host as an FQDN (short names resolve in the rule's namespace).
    pub fn fqdn_host(&self, domain_suffix: &str) -> String {
        if self.host.starts_with('*') || self.host.contains('.') {
            self.host.clone()
        } else {
            format!("{}.{}.svc.{}", self.host, self.namespace, domain_suffix)
        }
    }

    /// How well the rule's host matches `fqdn`: None when it does not; longer is more specific.
    pub fn host_match(&self, fqdn: &str, domain_suffix: &str) -> Option<usize> {
        let host = self.fqdn_host(domain_suffix);
        if host == fqdn {
            return Some(usize::MAX);
        }
        if host == "*" {
            return Some(0);
        }
        let suffix = host.strip_prefix('*')?;
        fqdn.ends_with(suffix).then_some(suffix.len())
    }

    /// The rule's own policy for one port (no subset), as istiod applies portLevelSettings.
    pub fn for_port(&self, port: u16) -> PolicyAt<'_> {
        PolicyAt::merged(self.traffic_policy.as_ref(), None, port)
    }
}

/// The mesh-wide defaults (mesh config `defaults`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MeshDefaults {
    pub outlier_detection: Option<OutlierDetection>,
    pub locality_lb: LocalityLbSetting,
}

/// What applies to one service port (or one subset of it) after DestinationRules and mesh defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EffectivePolicy {
    pub locality_lb: LocalityLbSetting,
    pub outlier_detection: Option<OutlierDetection>,
    /// the rule that shaped it (`namespace/name`) and its config path
    pub rule: Option<(Arc<str>, Arc<str>)>,
}

impl EffectivePolicy {
    /// The policy of `port` (and `subset`, one of the rule's) under `rule`: the rule's and the subset's
    /// policies merged as istiod merges them, with the mesh defaults where they set nothing.
    pub fn of(
        rule: Option<&ConsolidatedRule>,
        port: u16,
        subset: Option<&Subset>,
        defaults: &MeshDefaults,
    ) -> EffectivePolicy {
        let Some(rule) = rule else {
            return EffectivePolicy {
                locality_lb: defaults.locality_lb.clone(),
                outlier_detection: defaults.outlier_detection.clone(),
                rule: None,
            };
        };
        let at = PolicyAt::merged(rule.traffic_policy.as_ref(), subset.and_then(|s| s.traffic_policy.as_ref()), port);
        EffectivePolicy {
            locality_lb: at
                .load_balancer
                .and_then(|lb| lb.locality_lb.clone())
                .unwrap_or_else(|| defaults.locality_lb.clone()),
            outlier_detection: at.outlier_detection.cloned().or_else(|| defaults.outlier_detection.clone()),
            rule: Some((rule.id.clone(), rule.config_path.clone())),
        }
    }

    /// Failover (priorities beyond the proxy's own locality) takes effect only with outlier detection,
    /// as in istiod: without it Envoy would never move traffic away from a failing locality.
    pub fn failover_active(&self) -> bool {
        self.locality_lb.is_enabled() && self.locality_lb.distribute.is_empty() && self.outlier_detection.is_some()
    }

    /// A failover policy is configured but inert for lack of outlier detection (istio#48084).
    pub fn failover_without_outlier_detection(&self) -> bool {
        self.locality_lb.is_enabled()
            && (!self.locality_lb.failover.is_empty() || !self.locality_lb.failover_priority.is_empty())
            && self.outlier_detection.is_none()
    }

    pub fn distribute_active(&self) -> bool {
        self.locality_lb.is_enabled() && !self.locality_lb.distribute.is_empty()
    }
}

/// Resolves the policy of one port of a service for a client in the service's own namespace (what a
/// caller that knows no client means), through a [`RuleIndex`] of `rules`.
pub fn resolve<'a>(
    rules: impl IntoIterator<Item = &'a DestinationRule>,
    fqdn: &str,
    service_namespace: &str,
    port: u16,
    defaults: &MeshDefaults,
    domain_suffix: &str,
) -> EffectivePolicy {
    let rules: Vec<Arc<DestinationRule>> = rules.into_iter().map(|r| Arc::new(r.clone())).collect();
    let index = RuleIndex::new(Arc::new(rules), domain_suffix, ROOT_NAMESPACE);
    let rule = index.rule_for(Some(service_namespace), &[], service_namespace, fqdn);
    EffectivePolicy::of(rule.map(|r| &**r), port, None, defaults)
}

// ---------------- lookup: consolidation and precedence, as istiod ----------------

/// The DestinationRules with a workloadSelector, by namespace: (`namespace/name`, matchLabels).
pub type WorkloadSelectors = BTreeMap<Arc<str>, Vec<(Arc<str>, BTreeMap<String, String>)>>;

/// One or more DestinationRules for the same host, merged as istiod merges them
/// (`mergeDestinationRule`): the first rule's identity, its traffic policy or else the first later
/// rule's that has one, and every rule's subsets (the first of a name wins).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConsolidatedRule {
    /// the first rule, whose identity the clusters carry (and whose workloadSelector selects)
    pub rule: Arc<DestinationRule>,
    /// `namespace/name` of `rule`
    pub id: Arc<str>,
    /// [`DestinationRule::config_path`] of `rule`
    pub config_path: Arc<str>,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<Subset>,
    /// the exportTo set istiod indexes it by (`.` for rules with a workloadSelector)
    pub export_to: BTreeSet<String>,
    /// every rule merged into it, `namespace/name`, first first
    pub from: Vec<Arc<str>>,
}

impl ConsolidatedRule {
    fn new(rule: &Arc<DestinationRule>, export_to: &BTreeSet<String>) -> ConsolidatedRule {
        let id: Arc<str> = rule.id().into();
        ConsolidatedRule {
            rule: rule.clone(),
            id: id.clone(),
            config_path: rule.config_path().into(),
            traffic_policy: rule.traffic_policy.clone(),
            subsets: rule.subsets.clone(),
            export_to: export_to.clone(),
            from: vec![id],
        }
    }

    /// Is it visible to clients in `namespace` from another namespace's exported rules (None: a
    /// namespace no rule names)?
    fn exported_to(&self, namespace: Option<&str>) -> bool {
        self.export_to.is_empty()
            || self.export_to.contains("*")
            || namespace.is_some_and(|n| self.export_to.contains(n))
    }

    /// Do two rules translate the same (identity, policy, subsets)?
    fn same_effect(&self, other: &ConsolidatedRule) -> bool {
        self.id == other.id && self.traffic_policy == other.traffic_policy && self.subsets == other.subsets
    }
}

/// Consolidated rules of one namespace (one of istiod's indexes), by host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct HostRules {
    specific: HashMap<String, Vec<Arc<ConsolidatedRule>>>,
    /// `*...` hosts
    wildcard: BTreeMap<String, Vec<Arc<ConsolidatedRule>>>,
}

impl HostRules {
    fn from_builder(hosts: BTreeMap<String, Vec<ConsolidatedRule>>) -> HostRules {
        let mut out = HostRules::default();
        for (host, rules) in hosts {
            let rules = rules.into_iter().map(Arc::new).collect();
            if host.starts_with('*') {
                out.wildcard.insert(host, rules);
            } else {
                out.specific.insert(host, rules);
            }
        }
        out
    }

    /// istiod's `MostSpecificHostMatch`: the rules of the exact host, else of the longest matching
    /// wildcard.
    fn most_specific(&self, host: &str) -> Option<&[Arc<ConsolidatedRule>]> {
        if let Some(rules) = self.specific.get(host) {
            return Some(rules);
        }
        let mut best: Option<(usize, &Vec<Arc<ConsolidatedRule>>)> = None;
        for (pattern, rules) in &self.wildcard {
            let suffix = &pattern[1..];
            if host.ends_with(suffix) && best.is_none_or(|(len, _)| suffix.len() > len) {
                best = Some((suffix.len(), rules));
            }
        }
        best.map(|(_, rules)| rules.as_slice())
    }
}

/// The DestinationRules of the mesh, indexed as istiod indexes them (`setDestinationRules`) and looked
/// up as istiod looks them up for a client proxy (`PushContext.destinationRule`, then
/// `SidecarScope.DestinationRule`):
///
/// 1. the client's namespace: its rules for the host, exported or not (for a client in the root
///    namespace, the root namespace's private rules);
/// 2. the service's namespace: its rules exported to the client's namespace;
/// 3. the root namespace: its rules exported to the client's namespace.
///
/// The first step that finds rules for the host (the exact host, else the longest wildcard) decides:
/// among its rules, one with a `workloadSelector` matching the client (in the client's namespace), else
/// the one without a selector, else none. Rules of one namespace for one host are merged
/// ([`ConsolidatedRule`]) when their `exportTo` and `workloadSelector` are the same; a rule without a
/// selector is also merged into a rule with one of the same `exportTo` (the selected proxies get its
/// subsets too) and stays a rule of its own (for the others). The oldest rule's policy wins (istiod
/// orders rules with a selector first, then by creation time, name, namespace).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleIndex {
    rules: Arc<Vec<Arc<DestinationRule>>>,
    root_namespace: Arc<str>,
    namespace_local: HashMap<Arc<str>, HostRules>,
    exported: HashMap<Arc<str>, HostRules>,
    root_local: HostRules,
    /// namespaces whose clients may find other rules than a namespace no rule mentions
    candidates: BTreeSet<Arc<str>>,
    /// rules with a workloadSelector by namespace: (`namespace/name`, matchLabels)
    workload_selectors: WorkloadSelectors,
    /// subsets dropped when rules were merged: (rule `namespace/name`, what happened)
    duplicate_subsets: BTreeSet<(Arc<str>, String)>,
}

impl Default for RuleIndex {
    fn default() -> Self {
        RuleIndex::new(Arc::default(), "cluster.local", ROOT_NAMESPACE)
    }
}

/// A namespace's consolidated rules while the index is built: host -> rules.
type PoolBuilder = BTreeMap<String, Vec<ConsolidatedRule>>;

impl RuleIndex {
    /// Indexes `rules` (valid rules; short hosts resolve with `domain_suffix`). `root_namespace` is the
    /// mesh's root namespace.
    pub fn new(rules: Arc<Vec<Arc<DestinationRule>>>, domain_suffix: &str, root_namespace: &str) -> RuleIndex {
        let root: Arc<str> = root_namespace.into();
        let mut sorted: Vec<&Arc<DestinationRule>> = rules.iter().collect();
        sorted.sort_by(|a, b| {
            b.workload_selector
                .is_some()
                .cmp(&a.workload_selector.is_some())
                .then(a.created.cmp(&b.created))
                .then(a.name.cmp(&b.name))
                .then(a.namespace.cmp(&b.namespace))
        });
        let mut local: BTreeMap<Arc<str>, PoolBuilder> = BTreeMap::new();
        let mut exported: BTreeMap<Arc<str>, PoolBuilder> = BTreeMap::new();
        let mut root_local = PoolBuilder::new();
        let mut duplicate_subsets = BTreeSet::new();
        let mut candidates: BTreeSet<Arc<str>> = BTreeSet::new();
        let mut workload_selectors: WorkloadSelectors = BTreeMap::new();
        for rule in sorted {
            let ns = &rule.namespace;
            let host = rule.fqdn_host(domain_suffix);
            // rules with a workloadSelector are never exported to other namespaces
            let export: BTreeSet<String> = match &rule.workload_selector {
                None => rule.export_to.iter().cloned().collect(),
                Some(selector) => {
                    workload_selectors.entry(ns.clone()).or_default().push((rule.id().into(), selector.clone()));
                    BTreeSet::from([".".to_string()])
                }
            };
            candidates.insert(ns.clone());
            candidates.extend(export.iter().filter(|e| *e != "." && *e != "*").map(|e| Arc::from(e.as_str())));
            if export.is_empty() || export.contains("*") || export.contains(".") || export.contains(&**ns) {
                let pool = local.entry(ns.clone()).or_default().entry(host.clone()).or_default();
                merge(pool, rule, &export, &mut duplicate_subsets);
            }
            let private_only = export.len() == 1 && (export.contains(".") || export.contains(&**ns));
            if !private_only {
                let pool = exported.entry(ns.clone()).or_default().entry(host).or_default();
                merge(pool, rule, &export, &mut duplicate_subsets);
            } else if *ns == root {
                merge(root_local.entry(host).or_default(), rule, &export, &mut duplicate_subsets);
            }
        }
        if !rules.is_empty() {
            candidates.insert(root.clone());
        }
        let build = |m: BTreeMap<Arc<str>, PoolBuilder>| -> HashMap<Arc<str>, HostRules> {
            m.into_iter().map(|(ns, hosts)| (ns, HostRules::from_builder(hosts))).collect()
        };
        RuleIndex {
            rules,
            root_namespace: root,
            namespace_local: build(local),
            exported: build(exported),
            root_local: HostRules::from_builder(root_local),
            candidates,
            workload_selectors,
            duplicate_subsets,
        }
    }

    /// The rules it indexes, in the order it was given them.
    pub fn rules(&self) -> &Arc<Vec<Arc<DestinationRule>>> {
        &self.rules
    }

    /// Iterates over the rules it indexes.
    pub fn iter(&self) -> std::slice::Iter<'_, Arc<DestinationRule>> {
        self.rules.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules with a workloadSelector, by namespace: (`namespace/name`, matchLabels).
    pub fn workload_selectors(&self) -> &WorkloadSelectors {
        &self.workload_selectors
    }

    /// Subsets left out when rules for one host were merged (the first rule's subset of that name wins):
    /// (the rule that lost it, what happened).
    pub fn duplicate_subsets(&self) -> &BTreeSet<(Arc<str>, String)> {
        &self.duplicate_subsets
    }

    /// The rule for the service `host` (in `service_namespace`) seen by a client in `client_namespace`
    /// (None: a namespace no rule mentions, see [`Self::namespaces_that_differ`]) that the
    /// workloadSelector rules `selected_by` (`namespace/name`) select.
    pub fn rule_for(
        &self,
        client_namespace: Option<&str>,
        selected_by: &[Arc<str>],
        service_namespace: &str,
        host: &str,
    ) -> Option<&Arc<ConsolidatedRule>> {
        if self.rules.is_empty() {
            return None;
        }
        let choose = |rules| choose(rules, client_namespace, selected_by);
        // 1. the client's namespace (for the root namespace: its private rules)
        let local = if client_namespace == Some(&*self.root_namespace) {
            self.root_local.most_specific(host)
        } else {
            client_namespace.and_then(|ns| self.namespace_local.get(ns)).and_then(|p| p.most_specific(host))
        };
        if let Some(rules) = local {
            return choose(&mut rules.iter());
        }
        // 2. the service's namespace, 3. the root namespace: rules exported to the client
        for owner in [service_namespace, &*self.root_namespace] {
            if let Some(rules) = self.exported.get(owner).and_then(|p| p.most_specific(host))
                && rules.iter().any(|r| r.exported_to(client_namespace))
            {
                return choose(&mut rules.iter().filter(|r| r.exported_to(client_namespace)));
            }
        }
        None
    }

    /// The namespaces whose clients get another rule than clients in a namespace no rule mentions, for
    /// at least one of `services` (namespace, host): only proxies in these namespaces need the rule
    /// lookup of their own namespace; every other proxy shares the default one.
    pub fn namespaces_that_differ<'a>(
        &self,
        services: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> BTreeSet<Arc<str>> {
        let mut out = BTreeSet::new();
        if self.rules.is_empty() {
            return out;
        }
        let mut remaining: Vec<&Arc<str>> = self.candidates.iter().collect();
        for (ns, host) in services {
            if remaining.is_empty() {
                break;
            }
            let default = self.rule_for(None, &[], ns, host);
            remaining.retain(|c| {
                let theirs = self.rule_for(Some(c), &[], ns, host);
                let same = match (theirs, default) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a.same_effect(b),
                    _ => false,
                };
                if !same {
                    out.insert((*c).clone());
                }
                same
            });
        }
        out
    }
}

/// istiod's `SidecarScope.DestinationRule`: among the rules found for a host, the one with a
/// workloadSelector (of the client's namespace) that selects the client, else the (last) one without a
/// selector.
fn choose<'a>(
    rules: &mut dyn Iterator<Item = &'a Arc<ConsolidatedRule>>,
    client_namespace: Option<&str>,
    selected_by: &[Arc<str>],
) -> Option<&'a Arc<ConsolidatedRule>> {
    let mut catch_all = None;
    for r in rules {
        match &r.rule.workload_selector {
            None => catch_all = Some(r),
            Some(_) if client_namespace == Some(&*r.rule.namespace) && selected_by.contains(&r.id) => return Some(r),
            Some(_) => {}
        }
    }
    catch_all
}

/// istiod's `mergeDestinationRule`: merges `rule` into the consolidated rules of its namespace for its
/// host, or adds it as a rule of its own.
fn merge(
    rules: &mut Vec<ConsolidatedRule>,
    rule: &Arc<DestinationRule>,
    export: &BTreeSet<String>,
    duplicates: &mut BTreeSet<(Arc<str>, String)>,
) {
    let mut separately = true;
    for m in rules.iter_mut() {
        let (new, old) = (rule.workload_selector.as_ref(), m.rule.workload_selector.as_ref());
        let both_with = new.is_some() && old.is_some();
        let both_without = new.is_none() && old.is_none();
        let selectors_match = new.cloned().unwrap_or_default() == old.cloned().unwrap_or_default();
        if *export == m.export_to {
            // one with a selector and one without: merged, and also a rule of its own (else the rule
            // without a selector would not reach the proxies the other does not select: istio/istio#58322,
            // fixed in istiod's enhanced merge)
            separately = !(both_without || (both_with && selectors_match));
        } else if !m.export_to.is_empty() && export.is_superset(&m.export_to) {
            // merged, and also a rule of its own
            separately = true;
        } else {
            separately = true;
            continue;
        }
        if both_with && !selectors_match {
            separately = true;
            continue;
        }
        if both_without || (both_with && selectors_match) {
            separately = false;
        }
        let id: Arc<str> = rule.id().into();
        m.from.push(id.clone());
        for s in &rule.subsets {
            if m.subsets.iter().any(|x| x.name == s.name) {
                duplicates.insert((
                    id.clone(),
                    format!("subset {} is also defined by {} for the same host; {}'s is used", s.name, m.id, m.id),
                ));
            } else {
                m.subsets.push(s.clone());
            }
        }
        if m.traffic_policy.is_none() && rule.traffic_policy.is_some() {
            m.traffic_policy = rule.traffic_policy.clone();
        }
    }
    if separately {
        rules.push(ConsolidatedRule::new(rule, export));
    }
}

// ---------------- parsing and validation ----------------

/// What meshfed reads of a DestinationRule's spec; anything else is removed before the spec is
/// deserialized and reported ([`DestinationRule::not_applied`]).
enum Shape {
    /// applied as it is (a scalar, a list of strings, a label map)
    Keep,
    Map(&'static [(&'static str, &'static Shape)]),
    List(&'static Shape),
}

const KEEP: Shape = Shape::Keep;
const FROM_TO: Shape = Shape::Map(&[("from", &KEEP), ("to", &KEEP)]);
const LOCALITY_LB: Shape = Shape::Map(&[
    ("enabled", &KEEP),
    ("distribute", &Shape::List(&FROM_TO)),
    ("failover", &Shape::List(&FROM_TO)),
    ("failoverPriority", &KEEP),
]);
const LOAD_BALANCER: Shape = Shape::Map(&[("localityLbSetting", &LOCALITY_LB)]);
const OUTLIER: Shape = Shape::Map(&[
    ("consecutiveErrors", &KEEP),
    ("consecutive5xxErrors", &KEEP),
    ("consecutiveGatewayErrors", &KEEP),
    ("consecutiveLocalOriginFailures", &KEEP),
    ("splitExternalLocalOriginErrors", &KEEP),
    ("interval", &KEEP),
    ("baseEjectionTime", &KEEP),
    ("maxEjectionPercent", &KEEP),
    ("minHealthPercent", &KEEP),
]);
const PORT_POLICY: Shape = Shape::Map(&[
    ("port", &Shape::Map(&[("number", &KEEP)])),
    ("loadBalancer", &LOAD_BALANCER),
    ("outlierDetection", &OUTLIER),
]);
const TRAFFIC_POLICY: Shape = Shape::Map(&[
    ("loadBalancer", &LOAD_BALANCER),
    ("outlierDetection", &OUTLIER),
    ("portLevelSettings", &Shape::List(&PORT_POLICY)),
]);
const SPEC: Shape = Shape::Map(&[
    ("host", &KEEP),
    ("trafficPolicy", &TRAFFIC_POLICY),
    ("subsets", &Shape::List(&Shape::Map(&[("name", &KEEP), ("labels", &KEEP), ("trafficPolicy", &TRAFFIC_POLICY)]))),
    ("exportTo", &KEEP),
    ("workloadSelector", &Shape::Map(&[("matchLabels", &KEEP)])),
]);

/// Removes from `value` what `shape` does not apply, recording each removed field's path in `out`.
/// Values of an unexpected type are left for deserialization to report.
fn prune(value: &mut serde_yaml::Value, shape: &Shape, path: &str, out: &mut Vec<String>) {
    match (shape, value) {
        (Shape::Map(fields), serde_yaml::Value::Mapping(map)) => {
            let mut removed = Vec::new();
            for (key, v) in map.iter_mut() {
                match key.as_str().and_then(|k| fields.iter().find(|(name, _)| *name == k)) {
                    Some((name, shape)) => prune(v, shape, &format!("{path}.{name}"), out),
                    None => {
                        let name = match key.as_str() {
                            Some(k) => k.to_string(),
                            None => serde_yaml::to_string(key).map(|s| s.trim_end().to_string()).unwrap_or_default(),
                        };
                        out.push(format!("{path}.{name}"));
                        removed.push(key.clone());
                    }
                }
            }
            for key in removed {
                map.remove(&key);
            }
        }
        (Shape::List(item), serde_yaml::Value::Sequence(items)) => {
            for (i, v) in items.iter_mut().enumerate() {
                prune(v, item, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRule {
    metadata: RawMeta,
    spec: RawSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMeta {
    name: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    creation_timestamp: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSpec {
    host: Option<String>,
    #[serde(default)]
    traffic_policy: Option<RawTrafficPolicy>,
    #[serde(default)]
    subsets: Option<Vec<RawSubset>>,
    #[serde(default)]
    export_to: Option<Vec<String>>,
    #[serde(default)]
    workload_selector: Option<RawSelector>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSubset {
    name: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    traffic_policy: Option<RawTrafficPolicy>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSelector {
    #[serde(default)]
    match_labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawTrafficPolicy {
    #[serde(default)]
    load_balancer: Option<RawLoadBalancer>,
    #[serde(default)]
    outlier_detection: Option<RawOutlier>,
    #[serde(default)]
    port_level_settings: Option<Vec<RawPortSettings>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPortSettings {
    port: Option<RawPort>,
    #[serde(default)]
    load_balancer: Option<RawLoadBalancer>,
    #[serde(default)]
    outlier_detection: Option<RawOutlier>,
}

#[derive(Deserialize)]
struct RawPort {
    number: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLoadBalancer {
    #[serde(default)]
    locality_lb_setting: Option<RawLocalityLb>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawLocalityLb {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    distribute: Vec<RawDistribute>,
    #[serde(default)]
    failover: Vec<RawFailover>,
    #[serde(default)]
    failover_priority: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDistribute {
    from: String,
    #[serde(default)]
    to: BTreeMap<String, i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailover {
    from: String,
    to: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawOutlier {
    #[serde(default)]
    consecutive_errors: Option<i64>,
    #[serde(default, rename = "consecutive5xxErrors")]
    consecutive_5xx_errors: Option<i64>,
    #[serde(default)]
    consecutive_gateway_errors: Option<i64>,
    #[serde(default)]
    consecutive_local_origin_failures: Option<i64>,
    #[serde(default)]
    split_external_local_origin_errors: bool,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    base_ejection_time: Option<String>,
    #[serde(default)]
    max_ejection_percent: Option<i64>,
    #[serde(default)]
    min_health_percent: Option<i64>,
}

struct Ctx<'a> {
    object: &'a str,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error { object: self.object.to_string(), field: field.into(), reason: reason.into() }
    }
}

fn u32_field(ctx: &Ctx<'_>, field: &str, v: Option<i64>, max: i64) -> Result<Option<u32>, Error> {
    match v {
        None => Ok(None),
        Some(v) if (0..=max).contains(&v) => Ok(Some(v as u32)),
        Some(v) => Err(ctx.err(field, format!("{v} is out of range 0..={max}"))),
    }
}

fn duration_field(ctx: &Ctx<'_>, field: &str, v: Option<&str>) -> Result<Option<Duration>, Error> {
    let Some(s) = v else { return Ok(None) };
    let d = parse_duration(s).ok_or_else(|| ctx.err(field, format!("{s:?} is not a duration (e.g. 10s, 500ms)")))?;
    if d < Duration::from_millis(1) {
        return Err(ctx.err(field, "must be at least 1ms"));
    }
    Ok(Some(d))
}

fn outlier(ctx: &Ctx<'_>, path: &str, raw: RawOutlier) -> Result<OutlierDetection, Error> {
    let f = |name: &str| format!("{path}.{name}");
    let mut od = OutlierDetection {
        consecutive_5xx_errors: u32_field(
            ctx,
            &f("consecutive5xxErrors"),
            raw.consecutive_5xx_errors,
            u32::MAX as i64,
        )?,
        consecutive_gateway_errors: u32_field(
            ctx,
            &f("consecutiveGatewayErrors"),
            raw.consecutive_gateway_errors,
            u32::MAX as i64,
        )?,
        consecutive_local_origin_failures: u32_field(
            ctx,
            &f("consecutiveLocalOriginFailures"),
            raw.consecutive_local_origin_failures,
            u32::MAX as i64,
        )?,
        split_external_local_origin_errors: raw.split_external_local_origin_errors,
        interval: duration_field(ctx, &f("interval"), raw.interval.as_deref())?,
        base_ejection_time: duration_field(ctx, &f("baseEjectionTime"), raw.base_ejection_time.as_deref())?,
        max_ejection_percent: u32_field(ctx, &f("maxEjectionPercent"), raw.max_ejection_percent, 100)?,
        min_health_percent: u32_field(ctx, &f("minHealthPercent"), raw.min_health_percent, 100)?.unwrap_or(0),
    };
    // The deprecated consecutiveErrors counts 5xx when consecutive5xxErrors is not set.
    if od.consecutive_5xx_errors.is_none() {
        od.consecutive_5xx_errors = u32_field(ctx, &f("consecutiveErrors"), raw.consecutive_errors, u32::MAX as i64)?;
    }
    if od.consecutive_local_origin_failures.is_some() && !od.split_external_local_origin_errors {
        return Err(ctx.err(f("consecutiveLocalOriginFailures"), "requires splitExternalLocalOriginErrors: true"));
    }
    Ok(od)
}

fn valid_locality_pattern(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    if parts.is_empty() || parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
        return false;
    }
    // `*` may only be the last part
    parts.iter().enumerate().all(|(i, p)| !p.contains('*') || (*p == "*" && i == parts.len() - 1))
}

fn locality_lb(ctx: &Ctx<'_>, path: &str, raw: RawLocalityLb) -> Result<LocalityLbSetting, Error> {
    if !raw.distribute.is_empty() && (!raw.failover.is_empty() || !raw.failover_priority.is_empty()) {
        return Err(ctx.err(path, "distribute and failover/failoverPriority are mutually exclusive"));
    }
    let mut distribute = Vec::new();
    for (i, d) in raw.distribute.into_iter().enumerate() {
        let p = format!("{path}.distribute[{i}]");
        if !valid_locality_pattern(&d.from) {
            return Err(
                ctx.err(format!("{p}.from"), format!("{:?} is not REGION[/ZONE[/SUBZONE]] (with * last)", d.from))
            );
        }
        let mut to = BTreeMap::new();
        let mut sum = 0i64;
        for (loc, w) in d.to {
            if !valid_locality_pattern(&loc) {
                return Err(ctx.err(format!("{p}.to"), format!("{loc:?} is not REGION[/ZONE[/SUBZONE]] (with * last)")));
            }
            if !(0..=100).contains(&w) {
                return Err(ctx.err(format!("{p}.to[{loc}]"), format!("weight {w} is out of range 0..=100")));
            }
            sum += w;
            to.insert(loc, w as u32);
        }
        if sum != 100 {
            return Err(ctx.err(format!("{p}.to"), format!("weights must add up to 100, they add up to {sum}")));
        }
        distribute.push(Distribute { from: d.from, to });
    }
    let mut failover = Vec::new();
    for (i, f) in raw.failover.into_iter().enumerate() {
        let p = format!("{path}.failover[{i}]");
        if f.from.is_empty() || f.from.contains('/') || f.to.is_empty() || f.to.contains('/') {
            return Err(ctx.err(p, "failover from/to must be regions (no zones)"));
        }
        if f.from == f.to {
            return Err(ctx.err(p, format!("from and to are the same region {:?}", f.from)));
        }
        failover.push(Failover { from: f.from, to: f.to });
    }
    for (i, l) in raw.failover_priority.iter().enumerate() {
        if l.trim_start_matches('=').is_empty() {
            return Err(ctx.err(format!("{path}.failoverPriority[{i}]"), "empty label"));
        }
    }
    Ok(LocalityLbSetting { enabled: raw.enabled, distribute, failover, failover_priority: raw.failover_priority })
}

fn load_balancer(ctx: &Ctx<'_>, path: &str, raw: Option<RawLoadBalancer>) -> Result<Option<LoadBalancer>, Error> {
    let Some(raw) = raw else { return Ok(None) };
    let locality_lb = match raw.locality_lb_setting {
        Some(l) => Some(locality_lb(ctx, &format!("{path}.localityLbSetting"), l)?),
        None => None,
    };
    Ok(Some(LoadBalancer { locality_lb }))
}

fn traffic_policy(ctx: &Ctx<'_>, base: &str, raw: RawTrafficPolicy) -> Result<TrafficPolicy, Error> {
    let mut policy = TrafficPolicy {
        load_balancer: load_balancer(ctx, &format!("{base}.loadBalancer"), raw.load_balancer)?,
        outlier_detection: match raw.outlier_detection {
            Some(o) => Some(outlier(ctx, &format!("{base}.outlierDetection"), o)?),
            None => None,
        },
        port_level: Vec::new(),
    };
    for (i, p) in raw.port_level_settings.unwrap_or_default().into_iter().enumerate() {
        let path = format!("{base}.portLevelSettings[{i}]");
        let number = p.port.and_then(|p| p.number).ok_or_else(|| ctx.err(format!("{path}.port.number"), "missing"))?;
        if !(1..=65535).contains(&number) {
            return Err(ctx.err(format!("{path}.port.number"), format!("{number} is not a port")));
        }
        let port = number as u16;
        if policy.port_level.iter().any(|x| x.port == port) {
            return Err(ctx.err(format!("{path}.port.number"), format!("port {port} is listed twice")));
        }
        policy.port_level.push(PortPolicy {
            port,
            load_balancer: load_balancer(ctx, &format!("{path}.loadBalancer"), p.load_balancer)?,
            outlier_detection: match p.outlier_detection {
                Some(o) => Some(outlier(ctx, &format!("{path}.outlierDetection"), o)?),
                None => None,
            },
        });
    }
    Ok(policy)
}

/// A DNS-1123 label (what a subset name and a namespace name must be).
fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A Kubernetes label name or value part: at most 63 characters, alphanumeric at both ends, `-_.` inside.
fn is_label_part(s: &str, allow_empty: bool) -> bool {
    if s.is_empty() {
        return allow_empty;
    }
    let b = s.as_bytes();
    b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// Validates a label map (`[prefix/]name: value`), as Kubernetes and istiod do.
fn labels(ctx: &Ctx<'_>, path: &str, labels: &BTreeMap<String, String>) -> Result<(), Error> {
    for (k, v) in labels {
        let name = k.rsplit_once('/').map_or(k.as_str(), |(prefix, name)| {
            if prefix.is_empty() || prefix.len() > 253 || !prefix.split('.').all(is_dns1123_label) { "" } else { name }
        });
        if !is_label_part(name, false) {
            return Err(ctx.err(format!("{path}[{k}]"), format!("{k:?} is not a valid label key")));
        }
        if !is_label_part(v, true) {
            return Err(ctx.err(format!("{path}[{k}]"), format!("{v:?} is not a valid label value")));
        }
    }
    Ok(())
}

fn export_to(ctx: &Ctx<'_>, namespace: &str, entries: &[String], selector: bool) -> Result<(), Error> {
    let mut seen = BTreeSet::new();
    for (i, e) in entries.iter().enumerate() {
        let field = format!("spec.exportTo[{i}]");
        if e != "." && e != "*" && !is_dns1123_label(e) {
            return Err(ctx.err(field, format!("{e:?} is not ., * or a namespace name")));
        }
        // `.` is the rule's own namespace
        let key = if e == "." { namespace } else { e.as_str() };
        if !seen.insert(key) {
            return Err(ctx.err(field, format!("{e:?} is listed twice (. is {namespace})")));
        }
    }
    if seen.contains("*") && entries.len() > 1 {
        return Err(ctx.err("spec.exportTo", "* (everywhere) cannot be combined with other entries"));
    }
    if selector && !seen.is_empty() && (seen.len() > 1 || !seen.contains(namespace)) {
        return Err(
            ctx.err("spec.exportTo", "a rule with a workloadSelector can only be exported to its own namespace")
        );
    }
    Ok(())
}

impl DestinationRule {
    /// Parses and validates a DestinationRule object (any serde representation of the YAML/JSON).
    pub fn from_value<'de, D: serde::Deserializer<'de>>(value: D) -> Result<DestinationRule, Error> {
        let unknown = |field: String, reason: String| Error { object: "<unknown>".into(), field, reason };
        let mut value = serde_yaml::Value::deserialize(value).map_err(|e| unknown(String::new(), e.to_string()))?;
        // what meshfed does not apply is removed (and reported), so that it never invalidates the rule
        let mut not_applied = Vec::new();
        if let Some(spec) = value.get_mut("spec") {
            prune(spec, &SPEC, "spec", &mut not_applied);
        }
        let raw: RawRule = serde_path_to_error::deserialize(value)
            .map_err(|e| unknown(e.path().to_string(), e.inner().to_string()))?;
        let name = raw.metadata.name.filter(|n| !n.is_empty());
        let namespace = raw.metadata.namespace.filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
        let object = format!("{namespace}/{}", name.as_deref().unwrap_or("<unnamed>"));
        let ctx = Ctx { object: &object };
        let Some(name) = name else { return Err(ctx.err("metadata.name", "missing")) };
        let spec = raw.spec;
        let host = spec.host.filter(|h| !h.is_empty()).ok_or_else(|| ctx.err("spec.host", "missing"))?;
        let rule_policy = match spec.traffic_policy {
            Some(tp) => Some(traffic_policy(&ctx, "spec.trafficPolicy", tp)?),
            None => None,
        };
        let mut subsets: Vec<Subset> = Vec::new();
        for (i, s) in spec.subsets.unwrap_or_default().into_iter().enumerate() {
            let path = format!("spec.subsets[{i}]");
            let subset_name = s.name.unwrap_or_default();
            if !is_dns1123_label(&subset_name) {
                return Err(ctx.err(
                    format!("{path}.name"),
                    format!("{subset_name:?} is not a valid subset name (a DNS-1123 label)"),
                ));
            }
            if subsets.iter().any(|x| *x.name == *subset_name) {
                return Err(ctx.err(format!("{path}.name"), format!("duplicate subset name {subset_name:?}")));
            }
            let subset_labels = s.labels.unwrap_or_default();
            labels(&ctx, &format!("{path}.labels"), &subset_labels)?;
            let policy = match s.traffic_policy {
                Some(tp) => Some(traffic_policy(&ctx, &format!("{path}.trafficPolicy"), tp)?),
                None => None,
            };
            subsets.push(Subset { name: subset_name.into(), labels: subset_labels, traffic_policy: policy });
        }
        let workload_selector = match spec.workload_selector {
            Some(sel) => {
                let match_labels = sel.match_labels.unwrap_or_default();
                for (k, v) in &match_labels {
                    if k.is_empty() || k.contains('*') || v.contains('*') {
                        return Err(ctx.err(
                            format!("spec.workloadSelector.matchLabels[{k}]"),
                            "empty keys and wildcards are not supported",
                        ));
                    }
                }
                Some(match_labels)
            }
            None => None,
        };
        let export = spec.export_to.unwrap_or_default();
        export_to(&ctx, &namespace, &export, workload_selector.is_some())?;
        let created = raw.metadata.creation_timestamp.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok());
        Ok(DestinationRule {
            namespace: namespace.into(),
            name: name.into(),
            host,
            traffic_policy: rule_policy,
            subsets,
            export_to: export,
            workload_selector,
            created,
            not_applied,
        })
    }

    pub fn from_yaml(text: &str) -> Result<DestinationRule, Error> {
        DestinationRule::from_value(serde_yaml::Deserializer::from_str(text))
    }
}

/// Parses the mesh config's `defaults.outlierDetection` (same fields as a DestinationRule's).
pub fn parse_outlier_value(value: &serde_yaml::Value, path: &str) -> Result<OutlierDetection, Error> {
    let raw: RawOutlier = serde_path_to_error::deserialize(value.clone()).map_err(|e| Error {
        object: "mesh config".into(),
        field: format!("{path}.{}", e.path()),
        reason: e.inner().to_string(),
    })?;
    outlier(&Ctx { object: "mesh config" }, path, raw)
}

/// Parses the mesh config's `defaults.localityLbSetting`.
pub fn parse_locality_lb_value(value: &serde_yaml::Value, path: &str) -> Result<LocalityLbSetting, Error> {
    let raw: RawLocalityLb = serde_path_to_error::deserialize(value.clone()).map_err(|e| Error {
        object: "mesh config".into(),
        field: format!("{path}.{}", e.path()),
        reason: e.inner().to_string(),
    })?;
    locality_lb(&Ctx { object: "mesh config" }, path, raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: shop
  creationTimestamp: "2025-06-02T08:05:00Z"
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 100}
    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting:
        enabled: true
        failover:
          - from: us-east-1
            to: westeurope
    outlierDetection:
      consecutive5xxErrors: 3
      consecutiveGatewayErrors: 2
      consecutiveLocalOriginFailures: 4
      splitExternalLocalOriginErrors: true
      interval: 1s
      baseEjectionTime: 15s
      maxEjectionPercent: 100
      minHealthPercent: 20
    portLevelSettings:
      - port: {number: 9091}
        outlierDetection:
          consecutive5xxErrors: 7
        tls: {mode: ISTIO_MUTUAL}
  subsets:
    - name: v1
      labels: {version: v1}
    - name: v2
      labels: {version: v2, app.kubernetes.io/part-of: shop}
      trafficPolicy:
        loadBalancer:
          consistentHash: {httpHeaderName: x-user}
        outlierDetection: {consecutive5xxErrors: 9}
  exportTo: [".", "frontend"]
"#;

    fn rule(yaml_spec: &str) -> DestinationRule {
        let text = format!("metadata: {{name: r, namespace: shop}}\nspec:\n{yaml_spec}");
        DestinationRule::from_yaml(&text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn parses_every_applied_field_and_names_the_others() {
        let r = DestinationRule::from_yaml(FULL).unwrap();
        assert_eq!(&*r.namespace, "shop");
        assert_eq!(r.fqdn_host("cluster.local"), "reviews.shop.svc.cluster.local");
        assert_eq!(r.created, Some("2025-06-02T08:05:00Z".parse().unwrap()));
        let tp = r.traffic_policy.as_ref().unwrap();
        let od = tp.outlier_detection.as_ref().unwrap();
        assert_eq!(
            *od,
            OutlierDetection {
                consecutive_5xx_errors: Some(3),
                consecutive_gateway_errors: Some(2),
                consecutive_local_origin_failures: Some(4),
                split_external_local_origin_errors: true,
                interval: Some(Duration::from_secs(1)),
                base_ejection_time: Some(Duration::from_secs(15)),
                max_ejection_percent: Some(100),
                min_health_percent: 20,
            }
        );
        let failover = &tp.load_balancer.as_ref().unwrap().locality_lb.as_ref().unwrap().failover;
        assert_eq!(*failover, vec![Failover { from: "us-east-1".into(), to: "westeurope".into() }]);
        // port-level settings replace the top level as a whole (as istiod): no localityLbSetting on 9091
        let at = r.for_port(9091);
        assert_eq!(at.outlier_detection.unwrap().consecutive_5xx_errors, Some(7));
        assert_eq!(at.load_balancer, None);
        let at = r.for_port(9080);
        assert_eq!(at.outlier_detection.unwrap().consecutive_5xx_errors, Some(3));
        assert!(at.load_balancer.unwrap().locality_lb.is_some());
        // subsets
        let names: Vec<&str> = r.subsets.iter().map(|s| &*s.name).collect();
        assert_eq!(names, ["v1", "v2"]);
        assert_eq!(r.subsets[1].labels.len(), 2);
        let v2 = r.subsets[1].traffic_policy.as_ref().unwrap();
        assert_eq!(v2.load_balancer, Some(LoadBalancer { locality_lb: None }), "set, though only consistentHash");
        assert_eq!(r.export_to, [".", "frontend"]);
        assert_eq!(r.workload_selector, None);
        assert_eq!(r.config_path(), "/apis/networking.istio.io/v1/namespaces/shop/destination-rule/reviews");
        // what is not applied is named, with its path, and does not make the rule invalid
        assert_eq!(
            r.not_applied,
            [
                "spec.trafficPolicy.connectionPool",
                "spec.trafficPolicy.loadBalancer.simple",
                "spec.trafficPolicy.portLevelSettings[0].tls",
                "spec.subsets[1].trafficPolicy.loadBalancer.consistentHash",
            ]
        );
    }

    #[test]
    fn unknown_and_unapplied_fields_never_invalidate_a_rule() {
        let r = rule(
            "  host: reviews\n  trafficPolicy:\n    tls: {mode: ISTIO_MUTUAL}\n    tunnel: {protocol: CONNECT, targetHost: x, targetPort: 1}\n    proxyProtocol: {version: V1}\n    retryBudget: {percent: 20}\n    loadBalancer:\n      warmupDurationSecs: 10s\n      localityLbSetting:\n        enabled: true\n        futureField: 1\n    outlierDetection:\n      consecutive5xxErrors: 2\n      typoField: 3\n  subsets:\n  - name: v1\n    labels: {version: v1}\n    extra: x\n    trafficPolicy:\n      connectionPool: {http: {http2MaxRequests: 10}}\n      portLevelSettings:\n      - port: {number: 80, name: http}\n        connectionPool: {}\n  newSpecField: [1, 2]\n",
        );
        // (in the document's order)
        assert_eq!(
            r.not_applied,
            [
                "spec.trafficPolicy.tls",
                "spec.trafficPolicy.tunnel",
                "spec.trafficPolicy.proxyProtocol",
                "spec.trafficPolicy.retryBudget",
                "spec.trafficPolicy.loadBalancer.warmupDurationSecs",
                "spec.trafficPolicy.loadBalancer.localityLbSetting.futureField",
                "spec.trafficPolicy.outlierDetection.typoField",
                "spec.subsets[0].extra",
                "spec.subsets[0].trafficPolicy.connectionPool",
                "spec.subsets[0].trafficPolicy.portLevelSettings[0].port.name",
                "spec.subsets[0].trafficPolicy.portLevelSettings[0].connectionPool",
                "spec.newSpecField",
            ]
        );
        let tp = r.traffic_policy.as_ref().unwrap();
        assert_eq!(tp.outlier_detection.as_ref().unwrap().consecutive_5xx_errors, Some(2), "the rest applies");
        assert_eq!(tp.load_balancer.as_ref().unwrap().locality_lb.as_ref().unwrap().enabled, Some(true));
        // a rule with nothing applied at all still exists (it may define subsets elsewhere merged in)
        let r = rule("  host: reviews\n  trafficPolicy:\n    connectionPool: {}\n");
        assert_eq!(r.traffic_policy, Some(TrafficPolicy::default()), "trafficPolicy is set, though empty");
        assert_eq!(r.not_applied, ["spec.trafficPolicy.connectionPool"]);
        assert_eq!(rule("  host: reviews\n").traffic_policy, None);
    }

    fn err(yaml_spec: &str) -> Error {
        let text = format!("metadata: {{name: bad, namespace: shop}}\nspec:\n{yaml_spec}");
        DestinationRule::from_yaml(&text).unwrap_err()
    }

    #[test]
    fn invalid_rules_name_object_field_and_reason() {
        let e = err("  host: reviews\n  trafficPolicy:\n    outlierDetection:\n      interval: soon\n");
        assert_eq!(e.object, "shop/bad");
        assert_eq!(e.field, "spec.trafficPolicy.outlierDetection.interval");
        assert!(e.reason.contains("not a duration"), "{e}");

        let e = err("  host: reviews\n  trafficPolicy:\n    outlierDetection:\n      maxEjectionPercent: 150\n");
        assert_eq!(e.field, "spec.trafficPolicy.outlierDetection.maxEjectionPercent");

        let e = err(
            "  host: r\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n        distribute:\n          - from: us-east-1/*\n            to: {\"us-east-1/*\": 70, \"westeurope/*\": 20}\n",
        );
        assert!(e.reason.contains("add up to 100"), "{e}");

        let e = err(
            "  host: r\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n        distribute: [{from: a, to: {a: 100}}]\n        failover: [{from: a, to: b}]\n",
        );
        assert!(e.reason.contains("mutually exclusive"), "{e}");

        let e = err(
            "  host: r\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n        failover: [{from: a, to: a}]\n",
        );
        assert!(e.reason.contains("same region"), "{e}");

        let e = err("  trafficPolicy: {}\n");
        assert_eq!(e.field, "spec.host");

        let e = err("  host: r\n  trafficPolicy:\n    portLevelSettings:\n      - port: {number: 0}\n");
        assert_eq!(e.field, "spec.trafficPolicy.portLevelSettings[0].port.number");

        let e = err("  host: r\n  trafficPolicy:\n    outlierDetection:\n      consecutive5xxErrors: many\n");
        assert!(e.field.contains("consecutive5xxErrors"), "{e}");

        let e = err("  host: r\n  trafficPolicy:\n    outlierDetection:\n      consecutiveLocalOriginFailures: 3\n");
        assert!(e.reason.contains("splitExternalLocalOriginErrors"), "{e}");
    }

    #[test]
    fn invalid_subsets_export_to_and_selectors() {
        let e = err("  host: r\n  subsets:\n  - labels: {version: v1}\n");
        assert_eq!((e.field.as_str(), e.reason.contains("subset name")), ("spec.subsets[0].name", true), "{e}");
        let e = err("  host: r\n  subsets:\n  - name: V1\n");
        assert_eq!(e.field, "spec.subsets[0].name");
        let e = err("  host: r\n  subsets:\n  - name: v1\n  - name: v2\n  - name: v1\n");
        assert_eq!(e.field, "spec.subsets[2].name");
        assert!(e.reason.contains("duplicate"), "{e}");
        let e = err("  host: r\n  subsets:\n  - name: v1\n    labels: {\"bad key!\": v1}\n");
        assert_eq!(e.field, "spec.subsets[0].labels[bad key!]");
        let e = err("  host: r\n  subsets:\n  - name: v1\n    labels: {version: \"-v1\"}\n");
        assert!(e.reason.contains("label value"), "{e}");
        let e = err("  host: r\n  subsets:\n  - name: v1\n    labels: {version: 1}\n");
        assert!(e.field.starts_with("spec.subsets[0].labels"), "{e}");
        let e =
            err("  host: r\n  subsets:\n  - name: v1\n    trafficPolicy:\n      outlierDetection: {interval: later}\n");
        assert_eq!(e.field, "spec.subsets[0].trafficPolicy.outlierDetection.interval");

        let e = err("  host: r\n  exportTo: [\"Not A Namespace\"]\n");
        assert_eq!(e.field, "spec.exportTo[0]");
        let e = err("  host: r\n  exportTo: [\".\", shop]\n");
        assert!(e.reason.contains("twice"), "{e}");
        let e = err("  host: r\n  exportTo: [\"*\", other]\n");
        assert!(e.reason.contains("cannot be combined"), "{e}");
        let e = err("  host: r\n  exportTo: [\"~\"]\n");
        assert_eq!(e.field, "spec.exportTo[0]");

        let e = err("  host: r\n  workloadSelector: {matchLabels: {app: client}}\n  exportTo: [\"*\"]\n");
        assert!(e.reason.contains("workloadSelector"), "{e}");
        let e = err("  host: r\n  workloadSelector: {matchLabels: {app: \"*\"}}\n");
        assert_eq!(e.field, "spec.workloadSelector.matchLabels[app]");
        // a selector rule exported to its own namespace is fine
        let r = rule("  host: r\n  workloadSelector: {matchLabels: {app: client}}\n  exportTo: [\".\"]\n");
        assert_eq!(r.workload_selector.unwrap().get("app").map(String::as_str), Some("client"));
    }

    // ---- subset traffic policy, as istiod's MergeSubsetTrafficPolicy ----

    fn od(c5xx: u32) -> OutlierDetection {
        OutlierDetection { consecutive_5xx_errors: Some(c5xx), ..Default::default() }
    }

    fn lb(failover_to: &str) -> LoadBalancer {
        LoadBalancer {
            locality_lb: Some(LocalityLbSetting {
                failover: vec![Failover { from: "us-east-1".into(), to: failover_to.into() }],
                ..Default::default()
            }),
        }
    }

    fn c5xx(at: PolicyAt<'_>) -> Option<u32> {
        at.outlier_detection.and_then(|o| o.consecutive_5xx_errors)
    }

    fn failover_to(at: PolicyAt<'_>) -> Option<&str> {
        Some(&at.load_balancer?.locality_lb.as_ref()?.failover[0].to)
    }

    #[test]
    fn subset_policy_merges_over_the_rules_as_istiod() {
        let rule_tp = TrafficPolicy {
            load_balancer: Some(lb("westeurope")),
            outlier_detection: Some(od(3)),
            port_level: vec![PortPolicy { port: 9091, load_balancer: None, outlier_detection: Some(od(4)) }],
        };
        // no subset policy: the rule's, port-level resolved
        let at = PolicyAt::merged(Some(&rule_tp), None, 9080);
        assert_eq!((c5xx(at), failover_to(at)), (Some(3), Some("westeurope")));
        let at = PolicyAt::merged(Some(&rule_tp), None, 9091);
        assert_eq!((c5xx(at), failover_to(at)), (Some(4), None), "port level replaces the top level");
        // a subset setting outlierDetection only: the rule's load balancer stays
        let sub = TrafficPolicy { outlier_detection: Some(od(9)), ..Default::default() };
        let at = PolicyAt::merged(Some(&rule_tp), Some(&sub), 9080);
        assert_eq!((c5xx(at), failover_to(at)), (Some(9), Some("westeurope")));
        // ... on a port with port-level rule settings: merged over those
        let at = PolicyAt::merged(Some(&rule_tp), Some(&sub), 9091);
        assert_eq!((c5xx(at), failover_to(at)), (Some(9), None));
        // a subset loadBalancer replaces the rule's whole (even one without localityLbSetting)
        let sub = TrafficPolicy { load_balancer: Some(LoadBalancer::default()), ..Default::default() };
        let at = PolicyAt::merged(Some(&rule_tp), Some(&sub), 9080);
        assert_eq!((c5xx(at), failover_to(at)), (Some(3), None));
        let sub = TrafficPolicy { load_balancer: Some(lb("ap-south-1")), ..Default::default() };
        assert_eq!(failover_to(PolicyAt::merged(Some(&rule_tp), Some(&sub), 9080)), Some("ap-south-1"));
        // subset settings for this very port replace everything, unset fields included
        let sub = TrafficPolicy {
            outlier_detection: Some(od(9)),
            port_level: vec![PortPolicy { port: 9080, load_balancer: Some(lb("ap-south-1")), outlier_detection: None }],
            ..Default::default()
        };
        let at = PolicyAt::merged(Some(&rule_tp), Some(&sub), 9080);
        assert_eq!((c5xx(at), failover_to(at)), (None, Some("ap-south-1")));
        let at = PolicyAt::merged(Some(&rule_tp), Some(&sub), 9091);
        assert_eq!((c5xx(at), failover_to(at)), (Some(9), None), "other ports: the subset's top level");
        // no rule policy: the subset's
        let at = PolicyAt::merged(None, Some(&sub), 9091);
        assert_eq!((c5xx(at), failover_to(at)), (Some(9), None));
        assert_eq!(PolicyAt::merged(None, None, 9080), PolicyAt::default());
    }

    #[test]
    fn mesh_defaults_fill_what_rule_and_subset_leave_unset() {
        let defaults =
            MeshDefaults { outlier_detection: Some(od(1)), locality_lb: lb("westeurope").locality_lb.unwrap() };
        let r = Arc::new(rule(
            "  host: reviews\n  trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 3}\n  subsets:\n  - name: v1\n    labels: {version: v1}\n  - name: v2\n    labels: {version: v2}\n    trafficPolicy:\n      loadBalancer:\n        localityLbSetting:\n          failover: [{from: us-east-1, to: ap-south-1}]\n",
        ));
        let c = ConsolidatedRule::new(&r, &BTreeSet::new());
        let base = EffectivePolicy::of(Some(&c), 9080, None, &defaults);
        assert_eq!(base.outlier_detection, Some(od(3)));
        assert_eq!(base.locality_lb.failover[0].to, "westeurope", "the mesh default");
        assert_eq!(base.rule.as_ref().map(|r| &*r.0), Some("shop/r"));
        let v1 = EffectivePolicy::of(Some(&c), 9080, Some(&c.subsets[0]), &defaults);
        assert_eq!(v1, base);
        let v2 = EffectivePolicy::of(Some(&c), 9080, Some(&c.subsets[1]), &defaults);
        assert_eq!(v2.outlier_detection, Some(od(3)));
        assert_eq!(v2.locality_lb.failover[0].to, "ap-south-1");
        let none = EffectivePolicy::of(None, 9080, None, &defaults);
        assert_eq!((none.outlier_detection, none.rule), (Some(od(1)), None));
    }

    #[test]
    fn subset_membership_by_labels() {
        let r = rule("  host: r\n  subsets:\n  - name: v2\n    labels: {version: v2, app: reviews}\n  - name: all\n");
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let v2 = &r.subsets[0];
        assert!(v2.matches(&labels(&[("app", "reviews"), ("version", "v2"), ("pod-template-hash", "x")])));
        assert!(!v2.matches(&labels(&[("app", "reviews"), ("version", "v1")])));
        assert!(!v2.matches(&labels(&[("version", "v2")])), "every label of the subset");
        assert!(!v2.matches(&labels(&[])));
        assert!(r.subsets[1].matches(&labels(&[])), "a subset without labels holds every endpoint");
    }

    // ---- precedence, as istiod ----

    const SUFFIX: &str = "cluster.local";
    const REVIEWS: &str = "reviews.shop.svc.cluster.local";

    /// A rule `ns/name` for `host` whose outlier detection says which rule it is (`c5xx`).
    fn dr(ns: &str, name: &str, host: &str, extra: &str, c5xx: u32) -> Arc<DestinationRule> {
        let text = format!(
            "metadata: {{name: {name}, namespace: {ns}}}\nspec:\n  host: \"{host}\"\n  trafficPolicy:\n    outlierDetection: {{consecutive5xxErrors: {c5xx}}}\n{extra}"
        );
        Arc::new(DestinationRule::from_yaml(&text).unwrap_or_else(|e| panic!("{e}")))
    }

    fn index(rules: Vec<Arc<DestinationRule>>) -> RuleIndex {
        RuleIndex::new(Arc::new(rules), SUFFIX, ROOT_NAMESPACE)
    }

    /// Which rule (by its c5xx) a client in `client` (selected by `selected`) gets for reviews.shop.
    fn seen(index: &RuleIndex, client: Option<&str>, selected: &[&str]) -> Option<u32> {
        let selected: Vec<Arc<str>> = selected.iter().map(|s| Arc::from(*s)).collect();
        let r = index.rule_for(client, &selected, "shop", REVIEWS)?;
        r.traffic_policy.as_ref()?.outlier_detection.as_ref()?.consecutive_5xx_errors
    }

    #[test]
    fn client_namespace_then_service_namespace_then_root() {
        let i = index(vec![
            dr("shop", "svc-ns", "reviews", "", 1),
            dr("istio-system", "root", REVIEWS, "", 2),
            dr("frontend", "client-ns", REVIEWS, "", 3),
        ]);
        assert_eq!(seen(&i, Some("frontend"), &[]), Some(3), "the client's namespace first");
        assert_eq!(seen(&i, Some("other"), &[]), Some(1), "then the service's");
        assert_eq!(seen(&i, None, &[]), Some(1));
        assert_eq!(seen(&i, Some("shop"), &[]), Some(1));
        // a client in the root namespace: the root's private rules first, and this one is exported: as
        // any other client
        assert_eq!(seen(&i, Some("istio-system"), &[]), Some(1));
        // without the service namespace's rule: the root's
        let i = index(vec![dr("istio-system", "root", "*.svc.cluster.local", "", 2)]);
        assert_eq!(seen(&i, Some("other"), &[]), Some(2));
        assert_eq!(seen(&i, None, &[]), Some(2));
        // step order beats host specificity: a wildcard in the client's namespace beats the exact host in
        // the service's namespace
        let i = index(vec![dr("shop", "exact", REVIEWS, "", 1), dr("frontend", "wild", "*.cluster.local", "", 3)]);
        assert_eq!(seen(&i, Some("frontend"), &[]), Some(3));
        // within a namespace, the most specific host
        let i = index(vec![
            dr("shop", "any", "*", "", 1),
            dr("shop", "local", "*.cluster.local", "", 2),
            dr("shop", "shop", "*.shop.svc.cluster.local", "", 3),
        ]);
        assert_eq!(seen(&i, None, &[]), Some(3));
        let i =
            index(vec![dr("shop", "exact", "reviews", "", 4), dr("shop", "shop", "*.shop.svc.cluster.local", "", 3)]);
        assert_eq!(seen(&i, None, &[]), Some(4));
        assert_eq!(index(vec![dr("shop", "x", "ratings", "", 1)]).rule_for(None, &[], "shop", REVIEWS), None);
    }

    #[test]
    fn export_to_limits_who_sees_a_rule() {
        let i = index(vec![
            dr("shop", "private", "reviews", "  exportTo: [\".\"]\n", 1),
            dr("istio-system", "root", REVIEWS, "", 2),
        ]);
        assert_eq!(seen(&i, Some("shop"), &[]), Some(1), "its own namespace sees it");
        assert_eq!(seen(&i, Some("frontend"), &[]), Some(2), "others fall through to the root namespace");
        assert_eq!(seen(&i, None, &[]), Some(2));
        let i = index(vec![dr("shop", "named", "reviews", "  exportTo: [frontend]\n", 1)]);
        assert_eq!(seen(&i, Some("frontend"), &[]), Some(1));
        assert_eq!(seen(&i, Some("shop"), &[]), None, "not exported to its own namespace");
        assert_eq!(seen(&i, Some("other"), &[]), None);
        let i = index(vec![dr("shop", "public", "reviews", "  exportTo: [\"*\"]\n", 1)]);
        assert_eq!(seen(&i, Some("other"), &[]), Some(1));
        // the most specific host of the service's namespace is not exported to the client: istiod does not
        // fall back to a less specific one there, it goes on to the root namespace
        let i = index(vec![
            dr("shop", "exact", "reviews", "  exportTo: [bank]\n", 1),
            dr("shop", "wild", "*.shop.svc.cluster.local", "", 2),
            dr("istio-system", "root", "*", "", 3),
        ]);
        assert_eq!(seen(&i, Some("other"), &[]), Some(3));
        assert_eq!(seen(&i, Some("bank"), &[]), Some(1));
        // (a private rule is not among the exported ones at all: the wildcard applies)
        let i = index(vec![
            dr("shop", "exact", "reviews", "  exportTo: [\".\"]\n", 1),
            dr("shop", "wild", "*.shop.svc.cluster.local", "", 2),
        ]);
        assert_eq!(seen(&i, Some("other"), &[]), Some(2));
        assert_eq!(seen(&i, Some("shop"), &[]), Some(1));
        // a root namespace rule exported to "." applies only in the root namespace
        let i = index(vec![dr("istio-system", "root", "*", "  exportTo: [\".\"]\n", 3)]);
        assert_eq!(seen(&i, Some("other"), &[]), None);
        assert_eq!(seen(&i, Some("istio-system"), &[]), Some(3));
    }

    #[test]
    fn workload_selector_rules_select_in_their_namespace_only() {
        let selector = "  workloadSelector: {matchLabels: {app: canary}}\n";
        let i = index(vec![
            dr("frontend", "canary", REVIEWS, selector, 5),
            dr("frontend", "all", REVIEWS, "", 3),
            dr("shop", "svc", "reviews", "", 1),
        ]);
        assert_eq!(seen(&i, Some("frontend"), &["frontend/canary"]), Some(5));
        assert_eq!(seen(&i, Some("frontend"), &[]), Some(3), "unselected: the namespace's catch-all");
        assert_eq!(seen(&i, Some("other"), &["frontend/canary"]), Some(1), "another namespace: never");
        assert_eq!(i.workload_selectors()["frontend"][0].0.as_ref(), "frontend/canary");
        // a namespace with only a selector rule for the host shadows the service's rule for its unselected
        // proxies (istiod finds rules in the client's namespace and stops there)
        let i = index(vec![dr("frontend", "canary", REVIEWS, selector, 5), dr("shop", "svc", "reviews", "", 1)]);
        assert_eq!(seen(&i, Some("frontend"), &["frontend/canary"]), Some(5));
        assert_eq!(seen(&i, Some("frontend"), &[]), None);
        assert_eq!(seen(&i, None, &[]), Some(1));
        // a selector rule and a catch-all, both private to the namespace: the catch-all is merged into the
        // selector rule (its subsets reach the selected proxies) and also applies to the other proxies
        let canary = "  exportTo: [\".\"]\n  workloadSelector: {matchLabels: {app: canary}}\n  subsets:\n  - name: canary\n    labels: {version: v2}\n";
        let all = "  exportTo: [\".\"]\n  subsets:\n  - name: v1\n    labels: {version: v1}\n";
        let mut sel = (*dr("frontend", "canary", REVIEWS, canary, 5)).clone();
        sel.traffic_policy = None;
        let i = index(vec![dr("frontend", "all", REVIEWS, all, 3), Arc::new(sel)]);
        let selected = i.rule_for(Some("frontend"), &[Arc::from("frontend/canary")], "shop", REVIEWS).unwrap();
        assert_eq!(&*selected.id, "frontend/canary");
        let names: Vec<&str> = selected.subsets.iter().map(|s| &*s.name).collect();
        assert_eq!(names, ["canary", "v1"]);
        assert_eq!(seen(&i, Some("frontend"), &["frontend/canary"]), Some(3), "the catch-all's policy, as it has none");
        let unselected = i.rule_for(Some("frontend"), &[], "shop", REVIEWS).unwrap();
        assert_eq!(&*unselected.id, "frontend/all", "the catch-all is not swallowed by the selector rule");
        assert_eq!(unselected.subsets.len(), 1);
    }

    #[test]
    fn rules_for_one_host_merge_as_istiod() {
        let older = "  subsets:\n  - name: v1\n    labels: {version: v1}\n";
        let newer = "  subsets:\n  - name: v1\n    labels: {version: one}\n  - name: v2\n    labels: {version: v2}\n";
        let mut a = (*dr("shop", "b-older", "reviews", older, 1)).clone();
        a.created = Some("2025-01-01T00:00:00Z".parse().unwrap());
        let mut b = (*dr("shop", "a-newer", REVIEWS, newer, 2)).clone();
        b.created = Some("2025-02-01T00:00:00Z".parse().unwrap());
        let i = index(vec![Arc::new(b.clone()), Arc::new(a.clone())]);
        let r = i.rule_for(None, &[], "shop", REVIEWS).unwrap();
        assert_eq!(&*r.id, "shop/b-older", "the oldest rule first, whatever the order given");
        assert_eq!(r.from, [Arc::from("shop/b-older"), Arc::from("shop/a-newer")]);
        assert_eq!(seen(&i, None, &[]), Some(1), "the first rule's traffic policy");
        let subsets: Vec<(&str, &str)> = r.subsets.iter().map(|s| (&*s.name, s.labels["version"].as_str())).collect();
        assert_eq!(subsets, [("v1", "v1"), ("v2", "v2")], "subsets concatenated, the first of a name kept");
        assert!(
            i.duplicate_subsets().iter().any(|(rule, what)| &**rule == "shop/a-newer" && what.contains("subset v1")),
            "{:?}",
            i.duplicate_subsets()
        );
        // without creation times: by name
        a.created = None;
        b.created = None;
        let i = index(vec![Arc::new(a.clone()), Arc::new(b.clone())]);
        assert_eq!(&*i.rule_for(None, &[], "shop", REVIEWS).unwrap().id, "shop/a-newer");
        // a rule without a traffic policy takes a later rule's
        let mut c = DestinationRule::new("shop", "a-0-subsets-only", "reviews");
        c.subsets = a.subsets.clone();
        let i = index(vec![Arc::new(c), Arc::new(b.clone())]);
        let r = i.rule_for(None, &[], "shop", REVIEWS).unwrap();
        assert_eq!(&*r.id, "shop/a-0-subsets-only");
        assert_eq!(seen(&i, None, &[]), Some(2));
        // other exportTo: kept apart (the one exported to the client applies)
        let mut d = b.clone();
        d.export_to = vec!["frontend".into()];
        d.name = "0-for-frontend".into();
        let i = index(vec![Arc::new(a.clone()), Arc::new(d)]);
        assert_eq!(&*i.rule_for(None, &[], "shop", REVIEWS).unwrap().id, "shop/b-older");
        let r = i.rule_for(Some("frontend"), &[], "shop", REVIEWS).unwrap();
        assert_eq!(r.subsets.len(), 1, "not merged: {r:?}");
    }

    #[test]
    fn only_namespaces_that_see_other_rules_differ() {
        let services = [("shop", REVIEWS), ("shop", "ratings.shop.svc.cluster.local")];
        // the common case: rules in the service's namespace, exported everywhere
        let i = index(vec![dr("shop", "r", "reviews", "", 1), dr("shop", "s", "ratings", "", 2)]);
        assert!(i.namespaces_that_differ(services).is_empty());
        assert!(index(vec![]).namespaces_that_differ(services).is_empty());
        // a private rule: its namespace sees it, the others do not
        let i = index(vec![dr("shop", "r", "reviews", "  exportTo: [\".\"]\n", 1)]);
        assert_eq!(i.namespaces_that_differ(services), BTreeSet::from([Arc::from("shop")]));
        // a rule in a client namespace, and one exported to a named namespace
        let i =
            index(vec![dr("frontend", "mine", REVIEWS, "", 1), dr("shop", "r", "reviews", "  exportTo: [bank]\n", 2)]);
        assert_eq!(i.namespaces_that_differ(services), BTreeSet::from([Arc::from("bank"), Arc::from("frontend")]));
        // ... unless no service is concerned
        assert!(i.namespaces_that_differ([("shop", "ratings.shop.svc.cluster.local")]).is_empty());
        // a selector rule with a catch-all beside it: unselected proxies of the namespace see the default
        let i = index(vec![
            dr("shop", "canary", "reviews", "  workloadSelector: {matchLabels: {app: canary}}\n", 5),
            dr("shop", "r", "reviews", "", 1),
        ]);
        assert!(i.namespaces_that_differ(services).is_empty());
    }

    #[test]
    fn resolve_looks_up_for_the_services_namespace() {
        let defaults = MeshDefaults { outlier_detection: Some(od(1)), ..Default::default() };
        let rules = [
            (*dr("shop", "wild", "*.shop.svc.cluster.local", "", 2)).clone(),
            (*dr("other", "exact", REVIEWS, "", 3)).clone(),
        ];
        // the service's namespace is searched before the root namespace; `other` is neither
        let p = resolve(&rules, REVIEWS, "shop", 9080, &defaults, SUFFIX);
        assert_eq!(p.outlier_detection, Some(od(2)));
        assert_eq!(p.rule.map(|r| r.0.to_string()), Some("shop/wild".into()));
        let p = resolve(&rules, "x.bank.svc.cluster.local", "bank", 80, &defaults, SUFFIX);
        assert!(p.rule.is_none());
        assert_eq!(p.outlier_detection, Some(od(1)));
    }

    #[test]
    fn failover_needs_outlier_detection() {
        let p = EffectivePolicy {
            locality_lb: LocalityLbSetting {
                failover: vec![Failover { from: "a".into(), to: "b".into() }],
                ..Default::default()
            },
            outlier_detection: None,
            rule: None,
        };
        assert!(!p.failover_active());
        assert!(p.failover_without_outlier_detection());
    }
}
