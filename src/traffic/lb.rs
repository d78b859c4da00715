//! Envoy's load-balancing math, to predict what share of its requests an Envoy sends to each locality
//! and host of a ClusterLoadAssignment (as `source/common/upstream/load_balancer_impl.cc` computes it):
//!
//! 1. per priority, its health: `min(100, overprovisioning * healthy_hosts / hosts)` (integers, factor
//!    140 by default);
//! 2. the priority load: each priority takes `health * 100 / normalized_total` of what is left, where
//!    `normalized_total = min(100, sum of healths)` (the rounding remainder goes to the first priority
//!    with health);
//! 3. with locality-weighted LB, within a priority a locality is picked in proportion to its effective
//!    weight, `weight * min(1, overprovisioning/100 * healthy/hosts)`; without it, hosts of the priority
//!    are picked across localities;
//! 4. within a locality (or priority), healthy hosts in proportion to their load-balancing weight.
//!
//! Not modelled: panic mode (below `healthy_panic_threshold` Envoy uses every host; meshfed sends only
//! healthy endpoints unless `sendUnhealthyEndpoints`), degraded hosts, outlier ejections in progress.

use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use serde::Serialize;

use crate::model::Locality;

/// Envoy's default overprovisioning factor (percent).
pub const OVERPROVISIONING: u32 = 140;

/// A host of an assignment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LbHost {
    /// `ip:port`
    pub address: String,
    pub weight: u32,
    pub healthy: bool,
}

/// A locality of an assignment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LbLocality {
    pub locality: Locality,
    pub priority: u32,
    pub weight: u32,
    pub hosts: Vec<LbHost>,
}

/// The share of requests one locality receives, and each of its hosts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LocalityShare {
    pub locality: Locality,
    pub priority: u32,
    /// fraction of all requests (0..=1)
    pub share: f64,
    /// (address, fraction of all requests)
    pub hosts: Vec<(String, f64)>,
}

/// The localities and hosts of an assignment. Hosts are healthy unless UNHEALTHY, DRAINING or TIMEOUT
/// (Envoy treats UNKNOWN and HEALTHY as healthy, DEGRADED apart; here as healthy).
pub fn localities(cla: &ClusterLoadAssignment) -> Vec<LbLocality> {
    cla.endpoints
        .iter()
        .map(|l| LbLocality {
            locality: l.locality.as_ref().map(|p| Locality::new(&p.region, &p.zone, &p.sub_zone)).unwrap_or_default(),
            priority: l.priority,
            weight: l.load_balancing_weight.as_ref().map_or(0, |w| w.value),
            hosts: l
                .lb_endpoints
                .iter()
                .map(|e| LbHost {
                    address: address_of(e.host_identifier.as_ref()),
                    weight: e.load_balancing_weight.as_ref().map_or(1, |w| w.value),
                    healthy: !matches!(
                        HealthStatus::try_from(e.health_status),
                        Ok(HealthStatus::Unhealthy | HealthStatus::Draining | HealthStatus::Timeout)
                    ),
                })
                .collect(),
        })
        .collect()
}

fn address_of(h: Option<&HostIdentifier>) -> String {
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address::PortSpecifier};
    let Some(HostIdentifier::Endpoint(e)) = h else { return String::new() };
    match e.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(sa)) => match sa.port_specifier {
            Some(PortSpecifier::PortValue(p)) => format!("{}:{p}", sa.address),
            _ => sa.address.clone(),
        },
        _ => String::new(),
    }
}

/// The priority load in percent (Envoy's `distributeLoad` over the per-priority health).
pub fn priority_load(healths: &[u32]) -> Vec<u32> {
    let normalized: u32 = healths.iter().sum::<u32>().min(100);
    let mut load = vec![0u32; healths.len()];
    if normalized == 0 {
        return load;
    }
    let mut left = 100u32;
    for (i, h) in healths.iter().enumerate() {
        load[i] = left.min(h * 100 / normalized);
        left -= load[i];
    }
    if left > 0
        && let Some(first) = healths.iter().position(|h| *h > 0)
    {
        load[first] += left;
    }
    load
}

/// Each locality's share of the requests (and its hosts'), as Envoy balances them; `locality_weighted`:
/// the cluster has `locality_weighted_lb_config`.
pub fn shares(localities: &[LbLocality], locality_weighted: bool, overprovisioning: u32) -> Vec<LocalityShare> {
    let priorities = localities.iter().map(|l| l.priority as usize + 1).max().unwrap_or(0);
    let mut healths = vec![0u32; priorities];
    for (p, health) in healths.iter_mut().enumerate() {
        let (mut total, mut healthy) = (0u64, 0u64);
        for l in localities.iter().filter(|l| l.priority as usize == p) {
            total += l.hosts.len() as u64;
            healthy += l.hosts.iter().filter(|h| h.healthy).count() as u64;
        }
        if let Some(h) = (overprovisioning as u64 * healthy).checked_div(total) {
            *health = h.min(100) as u32;
        }
    }
    let load = priority_load(&healths);
    let mut out: Vec<LocalityShare> = localities
        .iter()
        .map(|l| LocalityShare { locality: l.locality.clone(), priority: l.priority, share: 0.0, hosts: Vec::new() })
        .collect();
    for (p, load) in load.iter().enumerate() {
        if *load == 0 {
            continue;
        }
        let p_share = *load as f64 / 100.0;
        let members: Vec<usize> = (0..localities.len()).filter(|i| localities[*i].priority as usize == p).collect();
        // the fraction of the priority's requests each locality gets
        let effective: Vec<f64> = members
            .iter()
            .map(|i| {
                let l = &localities[*i];
                let healthy = l.hosts.iter().filter(|h| h.healthy).count() as f64;
                if l.hosts.is_empty() {
                    return 0.0;
                }
                let ratio = (overprovisioning as f64 / 100.0 * healthy / l.hosts.len() as f64).min(1.0);
                l.weight as f64 * ratio
            })
            .collect();
        let eff_total: f64 = effective.iter().sum();
        if locality_weighted && eff_total > 0.0 {
            for (k, i) in members.iter().enumerate() {
                let l_share = p_share * effective[k] / eff_total;
                let l = &localities[*i];
                let w: f64 = l.hosts.iter().filter(|h| h.healthy).map(|h| h.weight as f64).sum();
                out[*i].share = l_share;
                out[*i].hosts = l
                    .hosts
                    .iter()
                    .map(|h| {
                        let s = if h.healthy && w > 0.0 { l_share * h.weight as f64 / w } else { 0.0 };
                        (h.address.clone(), s)
                    })
                    .collect();
            }
        } else {
            // hosts across the priority's localities, by weight
            let w: f64 = members
                .iter()
                .flat_map(|i| localities[*i].hosts.iter())
                .filter(|h| h.healthy)
                .map(|h| h.weight as f64)
                .sum();
            for i in &members {
                let hosts: Vec<(String, f64)> = localities[*i]
                    .hosts
                    .iter()
                    .map(|h| {
                        let s = if h.healthy && w > 0.0 { p_share * h.weight as f64 / w } else { 0.0 };
                        (h.address.clone(), s)
                    })
                    .collect();
                out[*i].share = hosts.iter().map(|(_, s)| s).sum();
                out[*i].hosts = hosts;
            }
        }
    }
    for (o, l) in out.iter_mut().zip(localities) {
        if o.hosts.is_empty() {
            o.hosts = l.hosts.iter().map(|h| (h.address.clone(), 0.0)).collect();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(region: &str, priority: u32, weight: u32, hosts: &[(&str, u32, bool)]) -> LbLocality {
        LbLocality {
            locality: Locality::new(region, "", ""),
            priority,
            weight,
            hosts: hosts.iter().map(|(a, w, h)| LbHost { address: a.to_string(), weight: *w, healthy: *h }).collect(),
        }
    }

    fn round(x: f64) -> f64 {
        (x * 10_000.0).round() / 10_000.0
    }

    #[test]
    fn priority_load_with_overprovisioning() {
        // Envoy's documented examples (priority levels, overprovisioning 1.4)
        assert_eq!(priority_load(&[100, 100]), vec![100, 0]);
        assert_eq!(priority_load(&[98, 100]), vec![98, 2]); // 70% healthy
        assert_eq!(priority_load(&[70, 100]), vec![70, 30]); // 50% healthy
        assert_eq!(priority_load(&[14, 100]), vec![14, 86]); // 10% healthy
        // not enough health in total: normalised
        assert_eq!(priority_load(&[14, 14]), vec![50, 50]);
        assert_eq!(priority_load(&[0, 0]), vec![0, 0]);
        assert_eq!(priority_load(&[0, 28]), vec![0, 100]);
    }

    #[test]
    fn locality_weights_times_availability() {
        let ls = vec![loc("a", 0, 70, &[("1", 1, true), ("2", 1, true)]), loc("b", 0, 30, &[("3", 1, true)])];
        let s = shares(&ls, true, OVERPROVISIONING);
        assert_eq!((round(s[0].share), round(s[1].share)), (0.7, 0.3));
        assert_eq!(s[0].hosts, vec![("1".into(), 0.35), ("2".into(), 0.35)]);
        // half of a's hosts unhealthy: availability min(1, 1.4 * 0.5) = 0.7 -> 49 : 30
        let ls = vec![loc("a", 0, 70, &[("1", 1, true), ("2", 1, false)]), loc("b", 0, 30, &[("3", 1, true)])];
        let s = shares(&ls, true, OVERPROVISIONING);
        assert_eq!(round(s[0].share), round(49.0 / 79.0));
        assert_eq!(s[0].hosts[1].1, 0.0);
        // without locality weighting: by host weight across the priority
        let s = shares(&ls, false, OVERPROVISIONING);
        assert_eq!((round(s[0].share), round(s[1].share)), (0.5, 0.5));
    }

    #[test]
    fn spill_over_to_the_next_priority() {
        // priority 0: 1 of 4 healthy -> health 35; priority 1 takes 65
        let ls = vec![
            loc("a", 0, 4, &[("1", 1, true), ("2", 1, false), ("3", 1, false), ("4", 1, false)]),
            loc("b", 1, 1, &[("5", 1, true)]),
        ];
        let s = shares(&ls, true, OVERPROVISIONING);
        assert_eq!((round(s[0].share), round(s[1].share)), (0.35, 0.65));
        let total: f64 = s.iter().map(|l| l.share).sum();
        assert!((total - 1.0).abs() < 1e-9);
    }
}
