//! EDS: one ClusterLoadAssignment per outbound cluster (service port, and subset of the DestinationRule
//! the proxy sees: the endpoints whose pod labels match), endpoints grouped by locality, with locality
//! weights and failover priorities relative to the proxy's locality, as istiod assigns them.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{
    Address, HealthStatus, Locality as PbLocality, Metadata, SocketAddress, address, socket_address::PortSpecifier,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as PbEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
};

use super::util::{string_value, struct_of, u32v};
use super::{Context, EndpointScope, Named};
use crate::model::{ClusterId, Endpoint, Health, Locality, NetworkId, Service, ServicePort, TlsMode};
use crate::policy::{ConsolidatedRule, Distribute, EffectivePolicy, Failover, Subset};
use crate::proxy::{ProxyKind, TlsSupport};
use crate::topology::labels;

/// Istio's priority of endpoints in `endpoint` locality for a proxy in `proxy`:
/// 0 same region/zone/subzone, 1 same region/zone, 2 same region, 3 other region.
pub fn lb_priority(proxy: &Locality, endpoint: &Locality) -> u32 {
    if proxy.region == endpoint.region {
        if proxy.zone == endpoint.zone {
            if proxy.subzone == endpoint.subzone {
                return 0;
            }
            return 1;
        }
        return 2;
    }
    3
}

/// Renumbers priorities so that they are contiguous from 0, keeping their order (Envoy requires it).
pub fn compact_priorities(priorities: &mut [u32]) {
    let mut distinct: Vec<u32> = priorities.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    for p in priorities.iter_mut() {
        *p = distinct.binary_search(p).unwrap_or(0) as u32;
    }
}

fn health_status(h: Health) -> HealthStatus {
    match h {
        Health::Healthy => HealthStatus::Healthy,
        Health::Unhealthy => HealthStatus::Unhealthy,
        Health::Draining => HealthStatus::Draining,
    }
}

fn socket_address(ip: std::net::IpAddr, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(port as u32)),
            ..Default::default()
        })),
    }
}

/// `istio.workload` metadata: `name;namespace;canonical-service;canonical-revision;cluster`.
fn endpoint_metadata(ep: &Endpoint) -> Option<Metadata> {
    let mut filter_metadata = std::collections::HashMap::new();
    if let Some(w) = &ep.workload {
        let canonical = w
            .labels
            .get("service.istio.io/canonical-name")
            .or_else(|| w.labels.get("app.kubernetes.io/name"))
            .or_else(|| w.labels.get("app"))
            .map(String::as_str)
            .unwrap_or(&w.name);
        let revision = w
            .labels
            .get("service.istio.io/canonical-revision")
            .or_else(|| w.labels.get("app.kubernetes.io/version"))
            .or_else(|| w.labels.get("version"))
            .map(String::as_str)
            .unwrap_or("latest");
        let workload = format!("{};{};{};{};{}", w.name, w.namespace, canonical, revision, ep.cluster);
        filter_metadata.insert("istio".to_string(), struct_of(&[("workload", string_value(&workload))]));
    }
    if ep.tls_mode() == TlsMode::Istio {
        filter_metadata
            .insert("envoy.transport_socket_match".to_string(), struct_of(&[("tlsMode", string_value("istio"))]));
    }
    (!filter_metadata.is_empty()).then(|| Metadata { filter_metadata, ..Default::default() })
}

/// Does `locality` match a localityLbSetting pattern (`region[/zone[/subzone]]`, `*` matching anything)?
pub fn locality_matches(locality: &Locality, pattern: &str) -> bool {
    let parts = [&*locality.region, &*locality.zone, &*locality.subzone];
    pattern.split('/').zip(parts).all(|(p, l)| p == "*" || p == l)
}

/// Istio's priority with `failover` rules: an endpoint in another region that is not the failover
/// target of the proxy's region goes after the target (4 instead of 3).
pub fn failover_priority(proxy: &Locality, endpoint: &Locality, failover: &[Failover]) -> u32 {
    let p = lb_priority(proxy, endpoint);
    if p == 3
        && let Some(rule) = failover.iter().find(|f| *f.from == *proxy.region)
        && *rule.to != *endpoint.region
    {
        return 4;
    }
    p
}

/// The value of a label for the failoverPriority comparison: topology labels come from where the
/// proxy or endpoint is, others from its labels.
fn topology_label<'a>(
    key: &str,
    network: &'a NetworkId,
    locality: &'a Locality,
    cluster: Option<&'a ClusterId>,
) -> Option<Option<&'a str>> {
    Some(match key {
        labels::NETWORK => Some(network.as_str()),
        labels::REGION => Some(&*locality.region),
        labels::ZONE => Some(&*locality.zone),
        labels::SUBZONE => Some(&*locality.subzone),
        super::CLUSTER_LABEL => cluster.map(|c| c.as_str()),
        _ => return None,
    })
}

/// istiod's failoverPriority: the number of labels, in order, on which the endpoint does *not* match the
/// proxy, counting from the first mismatch (0: matches all). An entry `key=value` matches endpoints whose
/// label has that value, whatever the proxy's.
pub fn label_priority(priority_labels: &[String], scope: &EndpointScope, ep: &Endpoint) -> u32 {
    let mut matched = 0;
    for entry in priority_labels {
        let (key, fixed) = match entry.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (entry.as_str(), None),
        };
        let ep_value = match topology_label(key, &ep.network, &ep.locality, Some(&ep.cluster)) {
            Some(v) => v,
            None => ep.workload.as_ref().and_then(|w| w.labels.get(key)).map(String::as_str),
        };
        let want = match fixed {
            Some(v) => Some(v),
            None => match topology_label(key, &scope.network, &scope.locality, scope.cluster_id.as_ref()) {
                Some(v) => v,
                None => scope.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()),
            },
        };
        if want.is_some() && want == ep_value {
            matched += 1;
        } else {
            break;
        }
    }
    (priority_labels.len() - matched) as u32
}

/// Priority of an endpoint for proxies in `scope` under `policy` (before compaction).
fn endpoint_priority(ctx: &Context, scope: &EndpointScope, policy: &EffectivePolicy, ep: &Endpoint) -> u32 {
    let mut p = 0;
    if policy.failover_active() && !scope.locality.is_empty() {
        let lb = &policy.locality_lb;
        p = failover_priority(&scope.locality, &ep.locality, &lb.failover);
        if !lb.failover_priority.is_empty() {
            p += 5 * label_priority(&lb.failover_priority, scope, ep);
        }
    }
    // A cluster whose API has been unreachable past the grace period: after every reachable cluster. A
    // network whose gateways are all down: last resort for proxies on other networks (its own proxies
    // keep their local endpoints).
    let fenced = !same_network(scope, ep) && ctx.gateway_verdict.fenced.contains(&ep.network);
    if ctx.demoted_clusters.contains(&ep.cluster) || fenced {
        p += DEMOTED;
    }
    p
}

/// Priority offset of endpoints in demoted clusters and fenced networks (compacted away afterwards).
const DEMOTED: u32 = 1 << 16;

/// Priority offset of the endpoints of a cluster a traffic split gives no share (last resort).
const LAST_RESORT: u32 = 1 << 20;

/// Priority of an endpoint under a traffic split ([`crate::traffic`]) for the proxy's region: the
/// clusters with a share at 0 (their localities weighted by share), the clusters the split does not name
/// after them at their usual priorities, the clusters at share 0 last (or left out: None) — and a
/// cluster demoted as unreachable or fenced stays after the others.
fn split_priority(
    ctx: &Context,
    scope: &EndpointScope,
    policy: &EffectivePolicy,
    shares: &crate::traffic::decide::RegionShares,
    ep: &Endpoint,
) -> Option<u32> {
    let usual = endpoint_priority(ctx, scope, policy, ep);
    match shares.get(&ep.cluster) {
        Some(s) if s.share > 0.0 => Some(if usual >= DEMOTED { usual + 1 } else { 0 }),
        Some(_) => ctx.traffic.last_resort.then_some(LAST_RESORT + usual),
        None => Some(usual + 1),
    }
}

/// Locality weight per percent of share (a share of 100% is a weight of 100,000 in all).
const SPLIT_WEIGHT_SCALE: f64 = 1000.0;

/// Is an endpoint on the proxy's network? (An unset network on either side counts as the same.)
fn same_network(scope: &EndpointScope, ep: &Endpoint) -> bool {
    scope.network.is_empty() || ep.network.is_empty() || scope.network == ep.network
}

fn lb_endpoint(
    address: std::net::IpAddr,
    port: u16,
    health: Health,
    weight: u32,
    metadata: Option<Metadata>,
) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(HostIdentifier::Endpoint(PbEndpoint {
            address: Some(socket_address(address, port)),
            ..Default::default()
        })),
        health_status: health_status(health) as i32,
        metadata,
        load_balancing_weight: Some(u32v(weight)),
    }
}

/// A plain endpoint at `addr` (static clusters).
pub fn static_endpoint(addr: std::net::SocketAddr) -> LbEndpoint {
    lb_endpoint(addr.ip(), addr.port(), Health::Healthy, 1, None)
}

fn tls_istio_metadata() -> Metadata {
    Metadata {
        filter_metadata: std::collections::HashMap::from([(
            "envoy.transport_socket_match".to_string(),
            struct_of(&[("tlsMode", string_value("istio"))]),
        )]),
        ..Default::default()
    }
}

/// The ClusterLoadAssignment of one service port, for proxies in `scope`.
pub fn load_assignment(
    ctx: &Context,
    scope: &EndpointScope,
    service: &Service,
    port: &ServicePort,
) -> ClusterLoadAssignment {
    port_load_assignment(ctx, scope, service, port, ctx.rule_for(&scope.rules, service), None)
}

/// Does an endpoint belong to `subset` (its pod's labels include the subset's)? An endpoint without a
/// known pod has no labels.
pub fn in_subset(subset: &Subset, ep: &Endpoint) -> bool {
    match &ep.workload {
        Some(w) => subset.matches(&w.labels),
        None => subset.labels.is_empty(),
    }
}

/// The ClusterLoadAssignment of one service port, or of one subset of it (of `rule`, the DestinationRule
/// `scope` sees for the service): the subset's endpoints only, under the subset's policy. A subset no
/// endpoint matches has an assignment without endpoints.
///
/// Endpoints on the proxy's network are sent as they are. Endpoints on another network are reachable
/// only through that network's east-west gateway, over mTLS: they are replaced by one endpoint per
/// gateway address, in the same locality and priority, weighted by the number of endpoints it stands
/// for (split between several gateways); endpoints that cannot do mTLS, and networks without a gateway,
/// are left out (and reported by [`super::diagnostics`]). Gateways themselves only get their own
/// network's endpoints (gateway endpoints stand for the subset's endpoints only).
pub fn port_load_assignment(
    ctx: &Context,
    scope: &EndpointScope,
    service: &Service,
    port: &ServicePort,
    rule: Option<&ConsolidatedRule>,
    subset: Option<&Subset>,
) -> ClusterLoadAssignment {
    let cluster_name = super::cluster_name(scope.kind, port.port, subset.map_or("", |s| &*s.name), &service.hostname);
    let policy = ctx.policy_with(rule, port.port, subset);
    // (priority, locality) -> endpoints
    let mut groups: BTreeMap<(u32, &Locality), Vec<LbEndpoint>> = BTreeMap::new();
    // (priority, locality, network) -> how many remote endpoints the gateway stands for
    let mut remote: BTreeMap<(u32, &Locality, &NetworkId), u32> = BTreeMap::new();
    let reach_other_networks = scope.kind != ProxyKind::Router && scope.tls != TlsSupport::None;
    // the groups holding endpoints of the proxy's own network (the others hold only gateways)
    let mut has_local: std::collections::BTreeSet<(u32, &Locality)> = std::collections::BTreeSet::new();
    // a traffic split for the proxy's region (sidecars: gateways forward their own network's endpoints)
    let split = match scope.kind {
        ProxyKind::Sidecar | ProxyKind::Ingress => ctx.traffic.shares(&service.hostname, &scope.locality.region),
        ProxyKind::Router => None,
    };
    // the endpoints sent, with their priority before compaction and whether they are local
    let mut sent: Vec<(&Endpoint, u16, u32, bool)> = Vec::with_capacity(service.endpoints.len());
    for ep in &service.endpoints {
        if ep.health != Health::Healthy && !ctx.send_unhealthy_endpoints {
            continue;
        }
        if subset.is_some_and(|s| !in_subset(s, ep)) {
            continue;
        }
        let Some(target_port) = ep.port_for(&port.name) else { continue };
        let priority = match split {
            None => endpoint_priority(ctx, scope, &policy, ep),
            Some(shares) => match split_priority(ctx, scope, &policy, shares, ep) {
                Some(p) => p,
                None => continue,
            },
        };
        let local = same_network(scope, ep);
        if local || (reach_other_networks && ep.tls_mode() == TlsMode::Istio && ep.health == Health::Healthy) {
            sent.push((ep, target_port, priority, local));
        }
    }
    // under a split: each cluster's share spread over its priority-0 endpoints, summed per locality
    let mut split_weights: BTreeMap<&Locality, f64> = BTreeMap::new();
    if let Some(shares) = split {
        let mut at_zero: BTreeMap<&ClusterId, u32> = BTreeMap::new();
        for (ep, _, p, _) in &sent {
            if *p == 0 {
                *at_zero.entry(&ep.cluster).or_default() += 1;
            }
        }
        for (ep, _, p, _) in &sent {
            if *p == 0 {
                let share = shares.get(&ep.cluster).map_or(0.0, |s| s.share);
                *split_weights.entry(&ep.locality).or_default() += share / at_zero[&ep.cluster] as f64;
            }
        }
    }
    for (ep, target_port, priority, local) in sent {
        if local {
            has_local.insert((priority, &ep.locality));
            groups.entry((priority, &ep.locality)).or_default().push(lb_endpoint(
                ep.address,
                target_port,
                ep.health,
                1,
                endpoint_metadata(ep),
            ));
        } else {
            *remote.entry((priority, &ep.locality, &ep.network)).or_default() += 1;
        }
    }
    // (priority, network) -> the gateway address the next remote locality's split starts at, so that the
    // localities of a priority use the addresses in turn (see `gateway_split`)
    let mut cursor: BTreeMap<(u32, &NetworkId), usize> = BTreeMap::new();
    // (priority, locality) -> every gateway address its gateway endpoints may use (the key under which
    // `merge_gateway_localities` merges gateway-only localities)
    let mut gateway_sets: BTreeMap<(u32, &Locality), std::collections::BTreeSet<(std::net::IpAddr, u16)>> =
        BTreeMap::new();
    for ((priority, locality, network), count) in remote {
        let all: Vec<(std::net::IpAddr, u16)> = ctx
            .gateways
            .iter()
            .filter(|g| g.network == *network)
            .flat_map(|g| ctx.gateway_addresses(g).into_iter().map(move |a| (a, g.port)))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        // the addresses the probes found down leave the list (the others carry the network's weight);
        // all down: the network is fenced (last resort), through every address
        let up: Vec<(std::net::IpAddr, u16)> = all
            .iter()
            .copied()
            .filter(|(ip, port)| !ctx.gateway_verdict.is_down(network, std::net::SocketAddr::new(*ip, *port)))
            .collect();
        let addresses = if up.is_empty() { all } else { up };
        if addresses.is_empty() {
            continue;
        }
        let start = cursor.entry((priority, network)).or_default();
        let weights = gateway_split(count, addresses.len(), *start);
        *start = (*start + count as usize) % addresses.len();
        gateway_sets.entry((priority, locality)).or_default().extend(addresses.iter().copied());
        for ((address, gw_port), weight) in addresses.into_iter().zip(weights) {
            if weight == 0 {
                continue;
            }
            groups.entry((priority, locality)).or_default().push(lb_endpoint(
                address,
                gw_port,
                Health::Healthy,
                weight,
                Some(tls_istio_metadata()),
            ));
        }
    }
    let mut localities: Vec<(u32, &Locality, Vec<LbEndpoint>)> =
        groups.into_iter().map(|((p, l), eps)| (p, l, eps)).collect();
    // gateway-only localities: the gateway addresses they may use (merged by those, see below)
    let gateway_only: Vec<Option<Vec<String>>> = localities
        .iter()
        .map(|(p, l, _)| {
            (!has_local.contains(&(*p, *l))).then(|| {
                let set = gateway_sets.get(&(*p, *l)).into_iter().flatten();
                set.map(|(a, port)| format!("{a}:{port}")).collect()
            })
        })
        .collect();
    let mut priorities: Vec<u32> = localities.iter().map(|(p, _, _)| *p).collect();
    compact_priorities(&mut priorities);
    let mut weights: Vec<u32> = localities
        .iter()
        .map(|(_, _, eps)| eps.iter().map(|e| e.load_balancing_weight.as_ref().map_or(1, |w| w.value)).sum())
        .collect();
    if split.is_some() {
        // the split's localities (priority 0 before compaction) weighted by share; a split replaces
        // `distribute`
        for ((p, l, _), w) in localities.iter().zip(weights.iter_mut()) {
            if *p == 0 {
                let share = split_weights.get(*l).copied().unwrap_or(0.0);
                *w = ((share * SPLIT_WEIGHT_SCALE).round() as u32).max(1);
            }
        }
    } else if policy.distribute_active() {
        distribute(&policy.locality_lb.distribute, &scope.locality, &localities, &mut weights);
    }
    localities.iter_mut().zip(&priorities).for_each(|(l, p)| l.0 = *p);
    let (endpoints, gateway_only): (Vec<LocalityLbEndpoints>, Vec<Option<Vec<String>>>) = localities
        .into_iter()
        .zip(weights)
        .zip(gateway_only)
        // a locality with no weight under `distribute` gets no traffic: Envoy needs weights >= 1
        .filter(|((_, w), _)| *w > 0)
        .map(|(((priority, loc, lb_endpoints), weight), gateway_only)| {
            let l = LocalityLbEndpoints {
                locality: Some(PbLocality {
                    region: loc.region.to_string(),
                    zone: loc.zone.to_string(),
                    sub_zone: loc.subzone.to_string(),
                }),
                // Always set: gRPC ignores localities without a weight.
                load_balancing_weight: Some(u32v(weight)),
                lb_endpoints,
                priority,
                ..Default::default()
            };
            (l, gateway_only)
        })
        .unzip();
    let endpoints = merge_gateway_localities(endpoints, &gateway_only);
    ClusterLoadAssignment { cluster_name, endpoints, ..Default::default() }
}

/// `ip:port` of an LbEndpoint (empty for other kinds of addresses).
fn endpoint_key(e: &LbEndpoint) -> String {
    let Some(HostIdentifier::Endpoint(pe)) = &e.host_identifier else { return String::new() };
    match pe.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(sa)) => match sa.port_specifier {
            Some(PortSpecifier::PortValue(port)) => format!("{}:{port}", sa.address),
            _ => sa.address.clone(),
        },
        _ => String::new(),
    }
}

/// How `count` remote endpoints are split over `n` gateway addresses (in address order), starting at
/// address `start`: `count / n` each, and one more for the `count % n` addresses from `start` on
/// (wrapping). The weights sum to exactly `count`, so a network's gateway carries the share its endpoints
/// would have had; with fewer endpoints than addresses, only `count` addresses get an entry (weight 1)
/// and the others get 0 (no entry: Envoy needs weights >= 1).
pub fn gateway_split(count: u32, n: usize, start: usize) -> Vec<u32> {
    if n == 0 {
        return Vec::new();
    }
    let (each, extra) = (count / n as u32, (count % n as u32) as usize);
    (0..n).map(|i| each + u32::from((i + n - start % n) % n < extra)).collect()
}

/// Envoy's EDS keeps only the first host of an address within a priority and drops the others, so a
/// gateway standing for remote endpoints in several localities of one priority would carry only the
/// first locality's share (and `distribute` weights would be wrong). Localities of one priority that
/// hold only gateway endpoints of the same gateway addresses (`gateway_only`: the addresses they may
/// use; `None` for localities with endpoints of the proxy's own network) are therefore merged into one:
/// under the locality they have in common (their region when their zones differ), with the sum of their
/// weights and, per gateway address, of their gateway endpoints' weights.
fn merge_gateway_localities(
    localities: Vec<LocalityLbEndpoints>,
    gateway_only: &[Option<Vec<String>>],
) -> Vec<LocalityLbEndpoints> {
    let weight = |w: &Option<envoy_types::pb::google::protobuf::UInt32Value>| w.as_ref().map_or(1, |w| w.value);
    let mut out: Vec<LocalityLbEndpoints> = Vec::with_capacity(localities.len());
    // (priority, gateway addresses) -> index in `out`
    let mut merged_into: BTreeMap<(u32, &[String]), usize> = BTreeMap::new();
    for (l, gateway_only) in localities.into_iter().zip(gateway_only) {
        let Some(addresses) = gateway_only else {
            out.push(l);
            continue;
        };
        let key = (l.priority, addresses.as_slice());
        let Some(&i) = merged_into.get(&key) else {
            merged_into.insert(key, out.len());
            out.push(l);
            continue;
        };
        let m = &mut out[i];
        m.load_balancing_weight =
            Some(u32v(weight(&m.load_balancing_weight).saturating_add(weight(&l.load_balancing_weight))));
        for b in l.lb_endpoints.iter() {
            match m.lb_endpoints.iter_mut().find(|a| endpoint_key(a) == endpoint_key(b)) {
                Some(a) => {
                    a.load_balancing_weight =
                        Some(u32v(weight(&a.load_balancing_weight).saturating_add(weight(&b.load_balancing_weight))))
                }
                None => m.lb_endpoints.push(b.clone()),
            }
        }
        // in the order of the gateway addresses
        m.lb_endpoints.sort_by_key(|e| addresses.iter().position(|a| *a == endpoint_key(e)));
        if let (Some(a), Some(b)) = (m.locality.as_mut(), l.locality.as_ref()) {
            if a.region != b.region {
                a.region.clear();
            }
            if a.region.is_empty() || a.zone != b.zone {
                a.zone.clear();
            }
            if a.zone.is_empty() || a.sub_zone != b.sub_zone {
                a.sub_zone.clear();
            }
        }
    }
    out
}

/// istiod's `distribute`: for the first rule whose `from` matches the proxy, each `to` pattern's weight
/// is shared by the localities it matches (in proportion to their own weight); localities no pattern
/// matches get 0 (and are dropped).
fn distribute(
    rules: &[Distribute],
    proxy: &Locality,
    localities: &[(u32, &Locality, Vec<LbEndpoint>)],
    weights: &mut [u32],
) {
    if proxy.is_empty() {
        return;
    }
    let Some(rule) = rules.iter().find(|d| locality_matches(proxy, &d.from)) else { return };
    let mut unmatched: Vec<bool> = vec![true; localities.len()];
    let original: Vec<u32> = weights.to_vec();
    // More specific patterns claim their localities first (fewer wildcards, more parts).
    let mut patterns: Vec<(&String, &u32)> = rule.to.iter().collect();
    patterns.sort_by_key(|(p, _)| (p.matches('*').count(), std::cmp::Reverse(p.split('/').count()), p.to_string()));
    for (pattern, weight) in patterns {
        let members: Vec<usize> =
            (0..localities.len()).filter(|i| unmatched[*i] && locality_matches(localities[*i].1, pattern)).collect();
        let total: u32 = members.iter().map(|i| original[*i]).sum();
        for i in members {
            unmatched[i] = false;
            let w = (original[i] as f64 * *weight as f64 / total.max(1) as f64).ceil() as u32;
            weights[i] = w;
        }
    }
    for (i, u) in unmatched.iter().enumerate() {
        if *u {
            weights[i] = 0;
        }
    }
}

/// The ClusterLoadAssignments of every port of a service: the port's, then one per subset of the
/// DestinationRule the proxies in `scope` see for it.
pub fn service_load_assignments(
    ctx: &Context,
    scope: &EndpointScope,
    service: &Service,
) -> Vec<Named<ClusterLoadAssignment>> {
    let rule = ctx.rule_for(&scope.rules, service);
    let subsets = rule.map(|r| r.subsets.as_slice()).unwrap_or_default();
    let mut out = Vec::with_capacity(service.ports.len() * (1 + subsets.len()));
    for p in &service.ports {
        for subset in std::iter::once(None).chain(subsets.iter().map(Some)) {
            let cla = port_load_assignment(ctx, scope, service, p, rule, subset);
            out.push(Named::new(cla.cluster_name.clone(), cla));
        }
    }
    out
}

/// The names of the assignments [`service_load_assignments`] gives for a service (`namespace`,
/// `hostname`) with `ports`, for proxies in `scope`.
pub fn assignment_names(
    ctx: &Context,
    scope: &EndpointScope,
    namespace: &str,
    hostname: &str,
    ports: &[u16],
) -> Vec<String> {
    let rule = ctx.rule_for_host(&scope.rules, namespace, hostname);
    let subsets = rule.map(|r| r.subsets.as_slice()).unwrap_or_default();
    let mut out = Vec::with_capacity(ports.len() * (1 + subsets.len()));
    for p in ports {
        out.push(super::cluster_name(scope.kind, *p, "", hostname));
        out.extend(subsets.iter().map(|s| super::cluster_name(scope.kind, *p, &s.name, hostname)));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{ClusterId, NetworkId, Protocol, ServiceKey};
    use crate::proxy::ProxyKind;

    fn loc(s: &str) -> Locality {
        Locality::parse(s)
    }

    #[test]
    fn priority_table_matches_istiod() {
        let proxy = loc("us-east-1/us-east-1a/rack1");
        assert_eq!(lb_priority(&proxy, &loc("us-east-1/us-east-1a/rack1")), 0);
        assert_eq!(lb_priority(&proxy, &loc("us-east-1/us-east-1a/rack2")), 1);
        assert_eq!(lb_priority(&proxy, &loc("us-east-1/us-east-1a")), 1);
        assert_eq!(lb_priority(&proxy, &loc("us-east-1/us-east-1b/rack1")), 2);
        assert_eq!(lb_priority(&proxy, &loc("westeurope/westeurope-1")), 3);
        assert_eq!(lb_priority(&proxy, &Locality::default()), 3);
        // an empty proxy subzone matches only an empty endpoint subzone
        assert_eq!(lb_priority(&loc("r/z"), &loc("r/z")), 0);
        assert_eq!(lb_priority(&loc("r/z"), &loc("r/z/s")), 1);
    }

    #[test]
    fn compaction_keeps_order_and_closes_gaps() {
        let mut p = vec![3, 0, 3, 2];
        compact_priorities(&mut p);
        assert_eq!(p, vec![2, 0, 2, 1]);
        let mut p = vec![1, 3];
        compact_priorities(&mut p);
        assert_eq!(p, vec![0, 1]);
        let mut p: Vec<u32> = vec![];
        compact_priorities(&mut p);
        assert!(p.is_empty());
    }

    fn ep(addr: &str, cluster: &str, locality: &str, health: Health) -> Endpoint {
        Endpoint {
            address: addr.parse().unwrap(),
            ports: vec![(Arc::from("http"), 9080)],
            cluster: ClusterId::new(cluster),
            network: NetworkId::new("n"),
            locality: loc(locality),
            health,
            workload: None,
        }
    }

    fn service(endpoints: Vec<Endpoint>) -> Service {
        let key = ServiceKey::new("shop", "reviews");
        Service {
            hostname: key.fqdn("cluster.local").into(),
            key,
            ports: vec![ServicePort { name: "http".into(), port: 9080, protocol: Protocol::Http }],
            clusters: vec![ClusterId::new("a"), ClusterId::new("b")],
            endpoints,
        }
    }

    fn ctx(outlier: bool) -> Context {
        Context {
            defaults: crate::policy::MeshDefaults {
                outlier_detection: outlier.then(crate::policy::OutlierDetection::default),
                ..Default::default()
            },
            ..Context::default()
        }
    }

    fn scope(locality: &str) -> EndpointScope {
        EndpointScope {
            kind: ProxyKind::Sidecar,
            network: NetworkId::new("n"),
            locality: loc(locality),
            cluster_id: None,
            labels: vec![],
            tls: TlsSupport::Static,
            rules: Default::default(),
        }
    }

    fn summary(cla: &ClusterLoadAssignment) -> Vec<(String, u32, u32, usize)> {
        cla.endpoints
            .iter()
            .map(|l| {
                let z = l.locality.as_ref().unwrap();
                (
                    format!("{}/{}", z.region, z.zone),
                    l.priority,
                    l.load_balancing_weight.unwrap().value,
                    l.lb_endpoints.len(),
                )
            })
            .collect()
    }

    #[test]
    fn groups_by_locality_with_weights_and_priorities() {
        let s = service(vec![
            ep("127.0.1.21", "a", "us-east-1/us-east-1a", Health::Healthy),
            ep("127.0.1.22", "a", "us-east-1/us-east-1a", Health::Healthy),
            ep("127.0.2.21", "a", "us-east-1/us-east-1b", Health::Healthy),
            ep("127.0.3.21", "b", "westeurope/westeurope-1", Health::Healthy),
            ep("127.0.3.22", "b", "westeurope/westeurope-1", Health::Healthy),
            ep("127.0.3.23", "b", "westeurope/westeurope-1", Health::Healthy),
        ]);
        let cla = load_assignment(&ctx(true), &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        assert_eq!(cla.cluster_name, "outbound|9080||reviews.shop.svc.cluster.local");
        assert_eq!(
            summary(&cla),
            vec![
                ("us-east-1/us-east-1a".into(), 0, 2, 2),
                ("us-east-1/us-east-1b".into(), 1, 1, 1),
                ("westeurope/westeurope-1".into(), 2, 3, 3),
            ]
        );
        // From Azure: its own zone first, then (no same-region other zone) AWS.
        let cla = load_assignment(&ctx(true), &scope("westeurope/westeurope-1"), &s, &s.ports[0]);
        assert_eq!(
            summary(&cla).iter().map(|x| (x.0.clone(), x.1)).collect::<Vec<_>>(),
            vec![
                ("westeurope/westeurope-1".into(), 0),
                ("us-east-1/us-east-1a".into(), 1),
                ("us-east-1/us-east-1b".into(), 1)
            ]
        );
    }

    #[test]
    fn no_priorities_without_outlier_detection_or_proxy_locality() {
        let s = service(vec![
            ep("127.0.1.21", "a", "us-east-1/us-east-1a", Health::Healthy),
            ep("127.0.3.21", "b", "westeurope/westeurope-1", Health::Healthy),
        ]);
        let cla = load_assignment(&ctx(false), &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        assert!(cla.endpoints.iter().all(|l| l.priority == 0));
        let cla = load_assignment(&ctx(true), &scope(""), &s, &s.ports[0]);
        assert!(cla.endpoints.iter().all(|l| l.priority == 0));
    }

    #[test]
    fn health_mapping_and_filtering() {
        let s = service(vec![
            ep("127.0.1.1", "a", "r/z", Health::Healthy),
            ep("127.0.1.2", "a", "r/z", Health::Unhealthy),
            ep("127.0.1.3", "a", "r/z", Health::Draining),
        ]);
        let cla = load_assignment(&ctx(false), &scope("r/z"), &s, &s.ports[0]);
        assert_eq!(cla.endpoints[0].lb_endpoints.len(), 1, "istiod's default sends only healthy endpoints");
        let mut c = ctx(false);
        c.send_unhealthy_endpoints = true;
        let cla = load_assignment(&c, &scope("r/z"), &s, &s.ports[0]);
        let statuses: Vec<i32> = cla.endpoints[0].lb_endpoints.iter().map(|e| e.health_status).collect();
        assert_eq!(
            statuses,
            vec![HealthStatus::Healthy as i32, HealthStatus::Unhealthy as i32, HealthStatus::Draining as i32]
        );
        assert_eq!(Health::from_conditions(None, None, None), Health::Healthy);
        assert_eq!(Health::from_conditions(Some(true), Some(true), Some(false)), Health::Healthy);
        assert_eq!(Health::from_conditions(Some(false), Some(false), Some(false)), Health::Unhealthy);
        assert_eq!(Health::from_conditions(Some(false), Some(true), Some(true)), Health::Draining);
        assert_eq!(Health::from_conditions(Some(false), None, None), Health::Unhealthy);
    }

    #[test]
    fn removed_endpoints_disappear_and_empty_service_keeps_its_assignment() {
        let s = service(vec![ep("127.0.1.1", "a", "r/z", Health::Healthy)]);
        let cla = load_assignment(&ctx(true), &scope("r/z"), &s, &s.ports[0]);
        assert_eq!(cla.endpoints.len(), 1);
        let s = service(vec![]);
        let cla = load_assignment(&ctx(true), &scope("r/z"), &s, &s.ports[0]);
        assert_eq!(cla.cluster_name, "outbound|9080||reviews.shop.svc.cluster.local");
        assert!(cla.endpoints.is_empty());
    }

    #[test]
    fn endpoints_without_the_port_are_skipped() {
        let mut e = ep("127.0.1.1", "a", "r/z", Health::Healthy);
        e.ports = vec![(Arc::from("grpc"), 9091)];
        let s = service(vec![e]);
        let cla = load_assignment(&ctx(true), &scope("r/z"), &s, &s.ports[0]);
        assert!(cla.endpoints.is_empty());
    }

    // ---- traffic policy ----

    fn with_rule(mut c: Context, yaml: &str) -> Context {
        let rule = crate::policy::DestinationRule::from_yaml(yaml).expect("valid rule");
        c.set_rules(Arc::new(vec![Arc::new(rule)]));
        c
    }

    fn four_zones() -> Service {
        service(vec![
            ep("127.0.1.21", "a", "us-east-1/us-east-1a", Health::Healthy),
            ep("127.0.2.21", "a", "us-east-1/us-east-1b", Health::Healthy),
            ep("127.0.3.21", "b", "westeurope/westeurope-1", Health::Healthy),
            ep("127.0.5.21", "c", "ap-south-1/ap-south-1a", Health::Healthy),
        ])
    }

    fn priorities(cla: &ClusterLoadAssignment) -> Vec<(String, u32)> {
        summary(cla).into_iter().map(|(l, p, _, _)| (l, p)).collect()
    }

    #[test]
    fn failover_rule_orders_other_regions() {
        let c = with_rule(
            ctx(false),
            "metadata: {name: r, namespace: shop}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n        failover: [{from: us-east-1, to: westeurope}]\n    outlierDetection: {consecutive5xxErrors: 3}\n",
        );
        let s = four_zones();
        let cla = load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        let mut p = priorities(&cla);
        p.sort();
        assert_eq!(
            p,
            vec![
                ("ap-south-1/ap-south-1a".into(), 3), // no match, not the failover target: 4, compacted
                ("us-east-1/us-east-1a".into(), 0),
                ("us-east-1/us-east-1b".into(), 1),
                ("westeurope/westeurope-1".into(), 2), // the failover target: 3, compacted
            ]
        );
        // A proxy in a region without a rule: other regions are all 3 (compacted to 1).
        let cla = load_assignment(&c, &scope("ap-south-1/ap-south-1a"), &s, &s.ports[0]);
        let p: BTreeMap<String, u32> = priorities(&cla).into_iter().collect();
        assert_eq!(p["ap-south-1/ap-south-1a"], 0);
        assert_eq!(p["us-east-1/us-east-1a"], 1);
        assert_eq!(p["westeurope/westeurope-1"], 1);
    }

    #[test]
    fn failover_priority_labels_take_precedence() {
        let c = with_rule(
            ctx(true),
            "metadata: {name: r, namespace: shop}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n        failoverPriority: [topology.istio.io/network, topology.kubernetes.io/region]\n    outlierDetection: {}\n",
        );
        let mut s = four_zones();
        // us-east-1b is on another network: the network label mismatches first.
        s.endpoints[1].network = NetworkId::new("other");
        let mut sc = scope("us-east-1/us-east-1a");
        sc.tls = TlsSupport::None; // no gateway substitution in this test
        let cla = load_assignment(&c, &sc, &s, &s.ports[0]);
        let p: BTreeMap<String, u32> = priorities(&cla).into_iter().collect();
        // 1a: labels match (0*5) + same zone (0) = 0; westeurope: network ok, region differs (1*5) + 3 = 8;
        // ap-south: same as westeurope (8); 1b is dropped (other network, no mTLS).
        assert_eq!(p.get("us-east-1/us-east-1a"), Some(&0));
        assert_eq!(p.get("westeurope/westeurope-1"), Some(&1));
        assert_eq!(p.get("ap-south-1/ap-south-1a"), Some(&1));
        assert!(!p.contains_key("us-east-1/us-east-1b"));
    }

    #[test]
    fn label_priority_counts_from_the_first_mismatch() {
        let mut sc = scope("r/z");
        sc.labels = vec![("app".into(), "x".into()), ("version".into(), "v1".into())];
        let mut e = ep("127.0.0.1", "a", "r/z", Health::Healthy);
        let labels: BTreeMap<String, String> =
            [("app".to_string(), "x".to_string()), ("version".to_string(), "v2".to_string())].into();
        e.workload = Some(Arc::new(crate::model::Workload {
            name: "p".into(),
            namespace: "shop".into(),
            service_account: "sa".into(),
            labels: Arc::new(labels),
            tls_mode: TlsMode::Istio,
        }));
        assert_eq!(label_priority(&["app".into(), "version".into()], &sc, &e), 1);
        assert_eq!(label_priority(&["version".into(), "app".into()], &sc, &e), 2);
        assert_eq!(label_priority(&["app".into()], &sc, &e), 0);
        assert_eq!(label_priority(&["version=v2".into()], &sc, &e), 0);
        assert_eq!(label_priority(&["topology.kubernetes.io/region".into()], &sc, &e), 0);
    }

    #[test]
    fn distribute_weights_localities_and_drops_unlisted_ones() {
        let c = with_rule(
            ctx(true),
            "metadata: {name: r, namespace: shop}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n        distribute:\n          - from: us-east-1/*\n            to: {\"us-east-1/*\": 80, \"westeurope/*\": 20}\n",
        );
        let s = four_zones();
        let cla = load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        let got: Vec<(String, u32, u32)> = summary(&cla).into_iter().map(|(l, p, w, _)| (l, p, w)).collect();
        assert_eq!(
            got,
            vec![
                ("us-east-1/us-east-1a".into(), 0, 40),
                ("us-east-1/us-east-1b".into(), 0, 40),
                ("westeurope/westeurope-1".into(), 0, 20),
            ],
            "80 split over the two us-east-1 zones, ap-south-1 dropped, no priorities"
        );
        // A proxy no `from` matches gets the default behaviour (failover is off under distribute).
        let cla = load_assignment(&c, &scope("westeurope/westeurope-1"), &s, &s.ports[0]);
        assert_eq!(cla.endpoints.len(), 4);
        assert!(cla.endpoints.iter().all(|l| l.priority == 0));
    }

    #[test]
    fn locality_patterns() {
        let l = loc("us-east-1/us-east-1a/rack1");
        assert!(locality_matches(&l, "us-east-1"));
        assert!(locality_matches(&l, "us-east-1/*"));
        assert!(locality_matches(&l, "us-east-1/us-east-1a/*"));
        assert!(locality_matches(&l, "*"));
        assert!(!locality_matches(&l, "us-east-1/us-east-1b"));
        assert!(!locality_matches(&l, "westeurope/*"));
    }

    #[test]
    fn demoted_clusters_go_below_reachable_ones() {
        let mut c = ctx(true);
        c.demoted_clusters = Arc::new([ClusterId::new("a")].into());
        let s = four_zones();
        let cla = load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        let p: BTreeMap<String, u32> = priorities(&cla).into_iter().collect();
        let max_reachable = p["westeurope/westeurope-1"].max(p["ap-south-1/ap-south-1a"]);
        assert!(p["us-east-1/us-east-1a"] > max_reachable, "{p:?}");
        assert!(p["us-east-1/us-east-1a"] < p["us-east-1/us-east-1b"], "order kept within demoted: {p:?}");
    }

    // ---- split horizon ----

    fn mtls(mut e: Endpoint, network: &str) -> Endpoint {
        e.network = NetworkId::new(network);
        e.workload = Some(Arc::new(crate::model::Workload {
            name: "p".into(),
            namespace: "shop".into(),
            service_account: "reviews".into(),
            labels: Arc::new(BTreeMap::new()),
            tls_mode: TlsMode::Istio,
        }));
        e
    }

    fn gateway(network: &str, address: &str) -> crate::model::Gateway {
        crate::model::Gateway {
            network: NetworkId::new(network),
            cluster: ClusterId::new("b"),
            address: address.into(),
            port: 15443,
            service: "istio-system/istio-eastwestgateway".into(),
        }
    }

    fn hosts(l: &LocalityLbEndpoints) -> Vec<(String, u32)> {
        l.lb_endpoints
            .iter()
            .map(|e| {
                let Some(HostIdentifier::Endpoint(pe)) = &e.host_identifier else { panic!() };
                let Some(address::Address::SocketAddress(sa)) = pe.address.as_ref().and_then(|a| a.address.clone())
                else {
                    panic!()
                };
                let Some(PortSpecifier::PortValue(port)) = sa.port_specifier else { panic!() };
                (format!("{}:{}", sa.address, port), e.load_balancing_weight.unwrap().value)
            })
            .collect()
    }

    #[test]
    fn remote_network_endpoints_go_through_its_gateway() {
        let mut c = ctx(true);
        c.gateways = Arc::new(vec![gateway("azure", "127.0.20.1")]);
        let s = service(vec![
            mtls(ep("127.0.1.21", "a", "us-east-1/us-east-1a", Health::Healthy), "n"),
            mtls(ep("127.0.3.21", "b", "westeurope/westeurope-1", Health::Healthy), "azure"),
            mtls(ep("127.0.3.22", "b", "westeurope/westeurope-1", Health::Healthy), "azure"),
            mtls(ep("127.0.4.21", "b", "westeurope/westeurope-2", Health::Healthy), "azure"),
        ]);
        let cla = load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        let by_loc: BTreeMap<String, (u32, Vec<(String, u32)>)> = cla
            .endpoints
            .iter()
            .map(|l| {
                let z = l.locality.as_ref().unwrap();
                (format!("{}/{}", z.region, z.zone), (l.priority, hosts(l)))
            })
            .collect();
        assert_eq!(by_loc["us-east-1/us-east-1a"], (0, vec![("127.0.1.21:9080".into(), 1)]));
        // the gateway stands for 2 endpoints in westeurope-1 and 1 in westeurope-2, in their priority; Envoy
        // keeps one host per address and priority, so the two zones are one locality, their region
        assert_eq!(by_loc["westeurope/"], (1, vec![("127.0.20.1:15443".into(), 3)]));
        assert_eq!(by_loc.len(), 2);
        assert_eq!(cla.endpoints.iter().find(|l| l.priority == 1).unwrap().load_balancing_weight.unwrap().value, 3);
        let md = cla.endpoints.iter().find(|l| l.priority == 1).unwrap().lb_endpoints[0].metadata.clone().unwrap();
        assert!(md.filter_metadata.contains_key("envoy.transport_socket_match"), "gateway endpoints use mTLS");
    }

    /// (region/zone, priority, locality weight, hosts)
    type LocalityShape = (String, u32, u32, Vec<(String, u32)>);

    /// The shape of every locality of an assignment.
    fn shape(cla: &ClusterLoadAssignment) -> Vec<LocalityShape> {
        cla.endpoints
            .iter()
            .map(|l| {
                let z = l.locality.as_ref().unwrap();
                (format!("{}/{}", z.region, z.zone), l.priority, l.load_balancing_weight.unwrap().value, hosts(l))
            })
            .collect()
    }

    #[test]
    fn one_gateway_host_per_priority_with_the_weight_of_the_localities_it_stands_for() {
        let gw = || vec![("127.0.20.1:15443".to_string(), 2)];
        let mut c = ctx(true);
        c.gateways = Arc::new(vec![gateway("azure", "127.0.20.1")]);
        let mut eps = vec![
            mtls(ep("127.0.1.21", "a", "us-east-1/us-east-1a", Health::Healthy), "n"),
            mtls(ep("127.0.2.21", "a", "us-east-1/us-east-1b", Health::Healthy), "n"),
        ];
        for (addr, zone) in [("3.21", "1"), ("3.22", "1"), ("4.21", "2"), ("4.22", "2")] {
            eps.push(mtls(
                ep(&format!("127.0.{addr}"), "b", &format!("westeurope/westeurope-{zone}"), Health::Healthy),
                "azure",
            ));
        }
        let s = service(eps);
        // distribute 80/20: each Azure zone gets 10; through the one gateway host, 20 together
        let d = with_rule(
            c.clone(),
            "metadata: {name: r, namespace: shop}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n        distribute:\n          - from: us-east-1/*\n            to: {\"us-east-1/*\": 80, \"westeurope/*\": 20}\n",
        );
        let cla = load_assignment(&d, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        let hosts_of = |a: &str| vec![(a.to_string(), 1)];
        assert_eq!(
            shape(&cla),
            vec![
                ("us-east-1/us-east-1a".into(), 0, 40, hosts_of("127.0.1.21:9080")),
                ("us-east-1/us-east-1b".into(), 0, 40, hosts_of("127.0.2.21:9080")),
                ("westeurope/".into(), 0, 20, vec![("127.0.20.1:15443".into(), 4)]),
            ]
        );
        // failover: merged within a priority only; a zone of its own region stays a locality of its own
        let mut s = s;
        s.endpoints.push(mtls(ep("127.0.5.21", "b", "ap-south-1/ap-south-1a", Health::Healthy), "azure"));
        s.endpoints.retain(|e| e.address.to_string() != "127.0.4.22");
        let c = with_rule(
            c,
            "metadata: {name: r, namespace: shop}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n        failover:\n          - from: us-east-1\n            to: westeurope\n    outlierDetection: {consecutive5xxErrors: 3}\n",
        );
        let cla = load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        assert_eq!(
            shape(&cla),
            vec![
                ("us-east-1/us-east-1a".into(), 0, 1, hosts_of("127.0.1.21:9080")),
                ("us-east-1/us-east-1b".into(), 1, 1, hosts_of("127.0.2.21:9080")),
                ("westeurope/".into(), 2, 3, vec![("127.0.20.1:15443".into(), 3)]),
                ("ap-south-1/ap-south-1a".into(), 3, 1, vec![("127.0.20.1:15443".into(), 1)]),
            ]
        );
        // one remote zone: its locality as it is
        s.endpoints.retain(|e| !e.address.to_string().starts_with("127.0.4.") && e.address.to_string() != "127.0.5.21");
        let cla = load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        assert_eq!(shape(&cla)[2], ("westeurope/westeurope-1".into(), 2, 2, gw()));
    }

    #[test]
    fn several_gateways_share_the_weight() {
        let mut c = ctx(true);
        c.gateways = Arc::new(vec![gateway("azure", "127.0.20.1"), gateway("azure", "127.0.20.2")]);
        let s = service(
            (1..=5)
                .map(|i| mtls(ep(&format!("127.0.3.{i}"), "b", "westeurope/westeurope-1", Health::Healthy), "azure"))
                .collect(),
        );
        let cla = load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        assert_eq!(cla.endpoints.len(), 1);
        assert_eq!(hosts(&cla.endpoints[0]), vec![("127.0.20.1:15443".into(), 3), ("127.0.20.2:15443".into(), 2)]);
        assert_eq!(cla.endpoints[0].load_balancing_weight.unwrap().value, 5);
    }

    /// A verdict of the gateway probes: `down` addresses of `network`, the network `fenced` or not.
    fn verdict(network: &str, down: &[&str], fenced: bool) -> Arc<crate::liveness::Verdict> {
        let n = NetworkId::new(network);
        let mut v = crate::liveness::Verdict::default();
        if !down.is_empty() {
            v.down.insert(n.clone(), down.iter().map(|a| a.parse().unwrap()).collect());
        }
        if fenced {
            v.fenced.insert(n);
        } else {
            v.reachable.insert(n);
        }
        Arc::new(v)
    }

    /// Two networks: `n` (us-east-1, the proxies of `scope`) and `azure` (westeurope, one gateway).
    fn two_networks() -> (Context, Service) {
        let mut c = ctx(true);
        c.gateways = Arc::new(vec![gateway("azure", "127.0.20.1")]);
        let s = service(vec![
            mtls(ep("127.0.1.21", "a", "us-east-1/us-east-1a", Health::Healthy), "n"),
            mtls(ep("127.0.3.21", "b", "westeurope/westeurope-1", Health::Healthy), "azure"),
            mtls(ep("127.0.3.22", "b", "westeurope/westeurope-1", Health::Healthy), "azure"),
        ]);
        (c, s)
    }

    fn azure_scope(locality: &str) -> EndpointScope {
        EndpointScope { network: NetworkId::new("azure"), ..scope(locality) }
    }

    #[test]
    fn a_fenced_network_is_last_resort_for_other_networks_only() {
        let (mut c, s) = two_networks();
        // westeurope is the failover target of us-east-1: before fencing, the Azure gateway comes first
        c = with_rule(
            c,
            "metadata: {name: r, namespace: shop}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n        failover:\n          - from: us-east-1\n            to: westeurope\n    outlierDetection: {consecutive5xxErrors: 3}\n",
        );
        // a third network on the same priority as azure, so "last" is visible
        let mut s = s;
        s.endpoints.push(mtls(ep("127.0.5.21", "c", "westeurope/westeurope-2", Health::Healthy), "gcp"));
        let mut gws = (*c.gateways).clone();
        gws.push(gateway("gcp", "127.0.30.1"));
        c.gateways = Arc::new(gws);
        let before = shape(&load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]));
        c.gateway_verdict = verdict("azure", &["127.0.20.1:15443"], true);
        let after = shape(&load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]));
        let prio = |shape: &[LocalityShape], host: &str| {
            shape.iter().find(|l| l.3.iter().any(|(h, _)| h == host)).map(|l| l.1).unwrap()
        };
        assert_eq!(prio(&before, "127.0.20.1:15443"), prio(&before, "127.0.30.1:15443"), "{before:?}");
        assert!(prio(&after, "127.0.20.1:15443") > prio(&after, "127.0.30.1:15443"), "{after:?}");
        assert!(prio(&after, "127.0.20.1:15443") > prio(&after, "127.0.1.21:9080"), "{after:?}");
        assert_eq!(prio(&after, "127.0.1.21:9080"), 0, "local endpoints keep their priority");
        assert_eq!(
            after.iter().map(|l| l.1).max(),
            Some(prio(&after, "127.0.20.1:15443")),
            "the fenced network is the last priority: {after:?}"
        );
        // still there (last resort, through its gateway), with its weight
        let fenced = after.iter().find(|l| l.3.iter().any(|(h, _)| h == "127.0.20.1:15443")).unwrap();
        assert_eq!(fenced.3, vec![("127.0.20.1:15443".to_string(), 2)]);
        // a proxy inside the fenced network keeps its local endpoints first
        let inside = |c: &Context| shape(&load_assignment(c, &azure_scope("westeurope/westeurope-1"), &s, &s.ports[0]));
        let mut unfenced = c.clone();
        unfenced.gateway_verdict = Arc::default();
        assert_eq!(inside(&c), inside(&unfenced), "nothing changes for the fenced network's own proxies");
        assert_eq!(prio(&inside(&c), "127.0.3.21:9080"), 0);
    }

    #[test]
    fn a_down_gateway_address_leaves_the_list_and_the_others_carry_the_weight() {
        let (mut c, s) = two_networks();
        c.gateways = Arc::new(vec![gateway("azure", "127.0.20.1"), gateway("azure", "127.0.20.2")]);
        let cla = load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        let remote = |cla: &ClusterLoadAssignment| {
            cla.endpoints
                .iter()
                .filter(|l| l.priority > 0 || hosts(l)[0].0.ends_with(":15443"))
                .flat_map(hosts)
                .collect::<Vec<_>>()
        };
        assert_eq!(remote(&cla), vec![("127.0.20.1:15443".into(), 1), ("127.0.20.2:15443".into(), 1)]);
        c.gateway_verdict = verdict("azure", &["127.0.20.1:15443"], false);
        let cla = load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        assert_eq!(remote(&cla), vec![("127.0.20.2:15443".into(), 2)], "the remaining address carries both");
        let p: Vec<u32> = cla.endpoints.iter().map(|l| l.priority).collect();
        let unprobed = load_assignment(&two_networks().0, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        assert_eq!(p, unprobed.endpoints.iter().map(|l| l.priority).collect::<Vec<_>>(), "priorities unchanged");
        // the same address on another network is not affected
        c.gateway_verdict = verdict("gcp", &["127.0.20.1:15443"], false);
        let cla = load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        assert_eq!(remote(&cla).len(), 2);
    }

    #[test]
    fn reachable_networks_keep_their_priorities() {
        // API unreachable but gateways up: the push loop demotes nothing, the verdict says reachable
        let (mut c, s) = two_networks();
        let before = shape(&load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]));
        c.gateway_verdict = verdict("azure", &[], false);
        let after = shape(&load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]));
        assert_eq!(before, after);
    }

    #[test]
    fn gateway_split_sums_to_the_count_and_rotates() {
        assert_eq!(gateway_split(5, 2, 0), vec![3, 2]);
        assert_eq!(gateway_split(5, 2, 1), vec![2, 3]);
        assert_eq!(gateway_split(1, 3, 0), vec![1, 0, 0]);
        assert_eq!(gateway_split(1, 3, 2), vec![0, 0, 1]);
        assert_eq!(gateway_split(2, 3, 2), vec![1, 0, 1]);
        assert_eq!(gateway_split(0, 3, 1), vec![0, 0, 0]);
        assert!(gateway_split(4, 0, 0).is_empty());
        for count in 0..12 {
            for n in 1..6 {
                for start in 0..n {
                    let w = gateway_split(count, n, start);
                    assert_eq!(w.iter().sum::<u32>(), count, "{count} over {n} from {start}");
                    assert!(w.iter().max().unwrap() - w.iter().min().unwrap() <= 1, "{w:?}");
                }
            }
        }
    }

    #[test]
    fn fewer_remote_endpoints_than_gateway_addresses_keep_their_share() {
        let mut c = ctx(false);
        c.gateways = Arc::new(vec![
            gateway("azure", "127.0.20.1"),
            gateway("azure", "127.0.20.2"),
            gateway("azure", "127.0.20.3"),
        ]);
        // one local endpoint, one remote endpoint behind a gateway of 3 addresses: 1:1, not 1:3
        let mut eps = vec![
            mtls(ep("127.0.1.21", "a", "us-east-1/us-east-1a", Health::Healthy), "n"),
            mtls(ep("127.0.3.21", "b", "westeurope/westeurope-1", Health::Healthy), "azure"),
        ];
        let s = service(eps.clone());
        let cla = load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        assert_eq!(
            shape(&cla),
            vec![
                ("us-east-1/us-east-1a".into(), 0, 1, vec![("127.0.1.21:9080".into(), 1)]),
                ("westeurope/westeurope-1".into(), 0, 1, vec![("127.0.20.1:15443".into(), 1)]),
            ]
        );
        // two remote zones of one endpoint each, in one priority: merged, using two of the addresses
        // (one host per address and priority), weight 2 in all
        eps.push(mtls(ep("127.0.4.21", "b", "westeurope/westeurope-2", Health::Healthy), "azure"));
        let s = service(eps.clone());
        let cla = load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        assert_eq!(
            shape(&cla),
            vec![
                ("us-east-1/us-east-1a".into(), 0, 1, vec![("127.0.1.21:9080".into(), 1)]),
                ("westeurope/".into(), 0, 2, vec![("127.0.20.1:15443".into(), 1), ("127.0.20.2:15443".into(), 1)]),
            ]
        );
        // four remote endpoints over three addresses (1 in westeurope-1 on the first; 3 in westeurope-2, one
        // on each): 2 + 1 + 1, still 4 in all
        eps.push(mtls(ep("127.0.4.22", "b", "westeurope/westeurope-2", Health::Healthy), "azure"));
        eps.push(mtls(ep("127.0.4.23", "b", "westeurope/westeurope-2", Health::Healthy), "azure"));
        let s = service(eps);
        let cla = load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        let gw = &shape(&cla)[1];
        assert_eq!((gw.1, gw.2), (0, 4));
        assert_eq!(
            gw.3,
            vec![("127.0.20.1:15443".into(), 2), ("127.0.20.2:15443".into(), 1), ("127.0.20.3:15443".into(), 1)]
        );
    }

    #[test]
    fn hostname_gateways_use_resolved_addresses() {
        let mut c = ctx(true);
        c.gateways = Arc::new(vec![gateway("azure", "elb.example.com")]);
        let s = service(vec![mtls(ep("127.0.3.21", "b", "westeurope/westeurope-1", Health::Healthy), "azure")]);
        let cla = load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        assert!(cla.endpoints.is_empty(), "unresolved: nothing to send");
        c.resolved = Arc::new([("elb.example.com".to_string(), vec!["127.0.20.9".parse().unwrap()])].into());
        let cla = load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        assert_eq!(hosts(&cla.endpoints[0]), vec![("127.0.20.9:15443".into(), 1)]);
    }

    #[test]
    fn no_gateway_or_no_mtls_means_dropped() {
        let mut c = ctx(true);
        let s = service(vec![mtls(ep("127.0.3.21", "b", "westeurope/westeurope-1", Health::Healthy), "azure"), {
            let mut e = ep("127.0.3.22", "b", "westeurope/westeurope-1", Health::Healthy);
            e.network = NetworkId::new("azure");
            e
        }]);
        // no gateway for azure
        let cla = load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        assert!(cla.endpoints.is_empty());
        // a gateway: only the mTLS endpoint is counted
        c.gateways = Arc::new(vec![gateway("azure", "127.0.20.1")]);
        let cla = load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        assert_eq!(hosts(&cla.endpoints[0]), vec![("127.0.20.1:15443".into(), 1)]);
        // a proxy without mesh certificates cannot use the gateway
        let mut sc = scope("us-east-1/us-east-1a");
        sc.tls = TlsSupport::None;
        assert!(load_assignment(&c, &sc, &s, &s.ports[0]).endpoints.is_empty());
    }

    #[test]
    fn gateways_get_only_their_own_network_under_sni_names() {
        let mut c = ctx(true);
        c.gateways = Arc::new(vec![gateway("azure", "127.0.20.1")]);
        let s = service(vec![
            mtls(ep("127.0.1.21", "a", "us-east-1/us-east-1a", Health::Healthy), "aws"),
            mtls(ep("127.0.3.21", "b", "westeurope/westeurope-1", Health::Healthy), "azure"),
        ]);
        let sc = EndpointScope {
            kind: ProxyKind::Router,
            network: NetworkId::new("azure"),
            locality: loc("westeurope/westeurope-1"),
            cluster_id: None,
            labels: vec![],
            tls: TlsSupport::None,
            rules: Default::default(),
        };
        let cla = load_assignment(&c, &sc, &s, &s.ports[0]);
        assert_eq!(cla.cluster_name, "outbound_.9080_._.reviews.shop.svc.cluster.local");
        assert_eq!(cla.endpoints.len(), 1);
        assert_eq!(hosts(&cla.endpoints[0]), vec![("127.0.3.21:9080".into(), 1)]);
    }

    // ---- traffic splits ----

    /// Decisions for reviews from us-east-1: `shares` per cluster.
    fn split_ctx(mut c: Context, shares: &[(&str, f64)], last_resort: bool) -> Context {
        use crate::traffic::decide::{Decision, Share};
        let row = shares
            .iter()
            .map(|(id, share)| (ClusterId::new(id), Share { share: *share, split: 0, reason: "test".into() }))
            .collect();
        let decision = Decision { by_region: BTreeMap::from([(Arc::from("us-east-1"), row)]), ..Default::default() };
        c.traffic = Arc::new(crate::traffic::Decisions {
            services: BTreeMap::from([(Arc::from("reviews.shop.svc.cluster.local"), Arc::new(decision))]),
            last_resort,
        });
        c
    }

    /// aws (cluster a, network n): 2 endpoints in us-east-1a, 1 in us-east-1b; azure (cluster b, network
    /// azure behind one gateway): 2 in westeurope-1; c: 1 endpoint in ap-south-1 (network n).
    fn split_service() -> Service {
        service(vec![
            mtls(ep("127.0.1.21", "a", "us-east-1/us-east-1a", Health::Healthy), "n"),
            mtls(ep("127.0.1.22", "a", "us-east-1/us-east-1a", Health::Healthy), "n"),
            mtls(ep("127.0.2.21", "a", "us-east-1/us-east-1b", Health::Healthy), "n"),
            mtls(ep("127.0.3.21", "b", "westeurope/westeurope-1", Health::Healthy), "azure"),
            mtls(ep("127.0.3.22", "b", "westeurope/westeurope-1", Health::Healthy), "azure"),
            mtls(ep("127.0.5.21", "c", "ap-south-1/ap-south-1a", Health::Healthy), "n"),
        ])
    }

    #[test]
    fn a_split_is_priority_zero_weighted_by_share_through_the_gateway_too() {
        let mut c = ctx(true);
        c.gateways = Arc::new(vec![gateway("azure", "127.0.20.1")]);
        let s = split_service();
        let c = split_ctx(c, &[("a", 70.0), ("b", 30.0)], true);
        let cla = load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        assert_eq!(
            shape(&cla),
            vec![
                // a's 70% over its 3 endpoints: 2/3 in us-east-1a, 1/3 in us-east-1b
                (
                    "us-east-1/us-east-1a".into(),
                    0,
                    46_667,
                    vec![("127.0.1.21:9080".into(), 1), ("127.0.1.22:9080".into(), 1)]
                ),
                ("us-east-1/us-east-1b".into(), 0, 23_333, vec![("127.0.2.21:9080".into(), 1)]),
                // b's 30% on the gateway locality (split horizon: the gateway stands for b's 2 endpoints)
                ("westeurope/westeurope-1".into(), 0, 30_000, vec![("127.0.20.1:15443".into(), 2)]),
                // c, not in the split: after the split, at its usual priority
                ("ap-south-1/ap-south-1a".into(), 1, 1, vec![("127.0.5.21:9080".into(), 1)]),
            ]
        );
        // Envoy's math gives 70/30 to the clusters
        let shares = crate::traffic::lb::shares(&crate::traffic::lb::localities(&cla), true, 140);
        let aws: f64 = shares[..2].iter().map(|l| l.share).sum();
        assert!((aws - 0.7).abs() < 1e-4, "{shares:?}");
        assert_eq!(shares[3].share, 0.0);
    }

    #[test]
    fn a_cluster_at_share_zero_is_last_resort_or_left_out() {
        let mut c = ctx(true);
        c.gateways = Arc::new(vec![gateway("azure", "127.0.20.1")]);
        let s = split_service();
        let last = split_ctx(c.clone(), &[("a", 100.0), ("b", 0.0)], true);
        let cla = load_assignment(&last, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        let sh = shape(&cla);
        assert_eq!(
            sh.iter().map(|l| (l.0.as_str(), l.1)).collect::<Vec<_>>(),
            vec![
                ("us-east-1/us-east-1a", 0),
                ("us-east-1/us-east-1b", 0),
                ("ap-south-1/ap-south-1a", 1),
                ("westeurope/westeurope-1", 2),
            ]
        );
        assert_eq!(sh[0].2 + sh[1].2, 100_000);
        let off = split_ctx(c, &[("a", 100.0), ("b", 0.0)], false);
        let cla = load_assignment(&off, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        assert!(shape(&cla).iter().all(|l| !l.0.starts_with("westeurope")), "{:?}", shape(&cla));
    }

    #[test]
    fn a_split_applies_to_its_region_and_to_sidecars_and_ingress_gateways_only() {
        let mut c = ctx(true);
        c.gateways = Arc::new(vec![gateway("azure", "127.0.20.1")]);
        let s = split_service();
        let plain = load_assignment(&c, &scope("westeurope/westeurope-1"), &s, &s.ports[0]);
        let split = split_ctx(c.clone(), &[("a", 70.0), ("b", 30.0)], true);
        // another source region: the usual assignment, byte for byte
        assert_eq!(load_assignment(&split, &scope("westeurope/westeurope-1"), &s, &s.ports[0]), plain);
        // an ingress gateway in us-east-1: the sidecar's assignment, split
        let ingress = EndpointScope { kind: ProxyKind::Ingress, ..scope("us-east-1/us-east-1a") };
        let sidecar = load_assignment(&split, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
        assert_ne!(sidecar, load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]));
        assert_eq!(load_assignment(&split, &ingress, &s, &s.ports[0]), sidecar);
        // east-west gateways: their own network's endpoints as before
        let router = EndpointScope { kind: ProxyKind::Router, ..scope("us-east-1/us-east-1a") };
        assert_eq!(load_assignment(&split, &router, &s, &s.ports[0]), load_assignment(&c, &router, &s, &s.ports[0]));
        // another service: untouched
        let mut other = s.clone();
        other.hostname = "ratings.shop.svc.cluster.local".into();
        assert_eq!(
            load_assignment(&split, &scope("us-east-1/us-east-1a"), &other, &other.ports[0]),
            load_assignment(&c, &scope("us-east-1/us-east-1a"), &other, &other.ports[0])
        );
    }

    proptest::proptest! {
        /// Whatever the shares and endpoints, Envoy's math on the assignment gives each split cluster its
        /// share (within rounding), a cluster at 0 nothing, and a cluster the split does not name nothing.
        #[test]
        fn envoy_gives_each_cluster_its_share(
            share_a in 0u32..=100,
            zones_a in proptest::collection::vec(1u8..4, 1..3),
            zones_b in proptest::collection::vec(1u8..4, 1..3),
            extra_c in 1u8..3,
            gateways in 1usize..3,
        ) {
            let mut c = ctx(true);
            c.gateways = Arc::new((1..=gateways).map(|i| gateway("azure", &format!("127.0.20.{i}"))).collect());
            let mut eps = Vec::new();
            for (z, n) in zones_a.iter().enumerate() {
                for h in 0..*n {
                    eps.push(mtls(ep(&format!("127.0.1{z}.{}", 10 + h), "a", &format!("us-east-1/us-east-1{z}"), Health::Healthy), "n"));
                }
            }
            for (z, n) in zones_b.iter().enumerate() {
                for h in 0..*n {
                    eps.push(mtls(ep(&format!("127.0.3{z}.{}", 10 + h), "b", &format!("westeurope/westeurope-{z}"), Health::Healthy), "azure"));
                }
            }
            for h in 0..extra_c {
                eps.push(mtls(ep(&format!("127.0.5.{}", 10 + h), "c", "ap-south-1/ap-south-1a", Health::Healthy), "n"));
            }
            let s = service(eps);
            let c = split_ctx(c, &[("a", share_a as f64), ("b", (100 - share_a) as f64)], true);
            let cla = load_assignment(&c, &scope("us-east-1/us-east-1a"), &s, &s.ports[0]);
            let shares = crate::traffic::lb::shares(&crate::traffic::lb::localities(&cla), true, 140);
            let mut by_cluster: BTreeMap<&str, f64> = BTreeMap::new();
            for l in &shares {
                for (addr, share) in &l.hosts {
                    let cluster = if addr.starts_with("127.0.1") { "a" } else if addr.starts_with("127.0.20.") { "b" } else { "c" };
                    *by_cluster.entry(cluster).or_default() += share;
                }
            }
            let got = |c: &str| by_cluster.get(c).copied().unwrap_or(0.0);
            proptest::prop_assert!((got("a") - share_a as f64 / 100.0).abs() < 1e-3, "{by_cluster:?} {:?}", shape(&cla));
            proptest::prop_assert!((got("b") - (100 - share_a) as f64 / 100.0).abs() < 1e-3, "{by_cluster:?} {:?}", shape(&cla));
            proptest::prop_assert_eq!(got("c"), 0.0);
            // Envoy's constraints: contiguous priorities from 0, weights >= 1
            let mut p: Vec<u32> = cla.endpoints.iter().map(|l| l.priority).collect();
            p.dedup();
            proptest::prop_assert!(p.windows(2).all(|w| w[1] >= w[0]) && p.iter().enumerate().all(|(i, x)| *x as usize <= i));
            proptest::prop_assert!(cla.endpoints.iter().all(|l| l.load_balancing_weight.is_some_and(|w| w.value >= 1)));
        }
    }
}
