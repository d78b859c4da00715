//! The traffic decision, pure: given a service's policy, the health of its endpoints per cluster, `now`
//! and the previous failover state -> per source region the share (percent) of each cluster, why, and
//! when the decision changes next (a ramp step, an expiry, a failback), so the push loop wakes then.
//!
//! Rules, per source region of the policy's `split`:
//! - a cluster with no healthy endpoint of the service, or failed over (below `minHealthy`, or back
//!   above it for less than `failbackAfter`), gets 0;
//! - a drained cluster keeps `capacity`% of its split share (the lowest of the active drains naming it or
//!   its region; expired drains are ignored and reported);
//! - what those lose goes to the other clusters of the row in proportion to their split shares;
//! - when no cluster is left to take it, the drained ones share everything; when every cluster is failed
//!   over, the split stands among those with healthy endpoints; with none, the region gets no decision
//!   (the service's usual priorities apply).
//!
//! A drain acts in every source region, also those the split does not name (a policy without a split:
//! all of them), on the cluster's normal share there, what the proxies send without a split under
//! locality failover: the clusters with healthy endpoints in the proxy's region take all, in proportion
//! to those endpoints (a region without endpoints of the service, [`Decision::other_regions`]: every
//! cluster with healthy endpoints, in proportion to them). The drained cluster keeps `capacity`% of
//! that; what it loses goes to the undrained clusters with healthy endpoints in proportion to their
//! healthy endpoints. Undrained clusters left at 0 stay out of such a row (their usual failover
//! priorities apply after it); `failover` acts only in the split's rows. Without an active drain, a
//! region the split does not name gets no decision.
//!
//! Shares always add up to 100 (property-tested below).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use super::policy::{DrainTarget, SplitPolicy, TrafficPolicy};
use crate::model::ClusterId;

/// The endpoints of one service in one cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterHealth {
    pub total: u32,
    pub healthy: u32,
    /// the regions of the cluster's endpoints (drains by region)
    pub regions: BTreeSet<Arc<str>>,
}

impl ClusterHealth {
    /// Healthy endpoints in percent of all (0 without endpoints).
    pub fn healthy_percent(&self) -> f64 {
        if self.total == 0 { 0.0 } else { 100.0 * self.healthy as f64 / self.total as f64 }
    }
}

/// A service's endpoints per cluster.
pub type ServiceHealth = BTreeMap<ClusterId, ClusterHealth>;

/// A cluster failed over: below `minHealthy` since `since`; `back_since`: at or above it again since then.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Failed {
    #[serde(serialize_with = "ser_time")]
    pub since: SystemTime,
    #[serde(serialize_with = "ser_opt_time")]
    pub back_since: Option<SystemTime>,
}

/// The failed-over clusters of one service.
pub type FailoverState = BTreeMap<ClusterId, Failed>;

/// RFC 3339 (UTC) for explanations.
pub fn time_str(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t).map(|t| t.to_string()).unwrap_or_else(|_| format!("{t:?}"))
}

fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&time_str(*t))
}

fn ser_opt_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&time_str(*t)),
        None => s.serialize_none(),
    }
}

/// One cluster's share for a source region, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Share {
    /// percent of the region's requests
    pub share: f64,
    /// its share in the policy's split
    pub split: u32,
    pub reason: String,
}

/// The shares of one source region (add up to 100).
pub type RegionShares = BTreeMap<ClusterId, Share>;

/// The decision for one service.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// source region -> cluster -> share
    pub by_region: BTreeMap<Arc<str>, RegionShares>,
    /// the shares for proxies in any other source region (a drain acts there too; see the module docs)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_regions: Option<RegionShares>,
    /// each cluster with endpoints of the service: what the decision holds for it in every region
    pub clusters: BTreeMap<ClusterId, ClusterState>,
    /// what was ignored (expired drains) or could not be honoured
    pub notes: Vec<String>,
}

impl Decision {
    /// The shares for proxies in `region`.
    pub fn shares(&self, region: &str) -> Option<&RegionShares> {
        self.by_region.get(region).or(self.other_regions.as_ref())
    }
}

/// One cluster of a service as decided, whatever the source region.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterState {
    pub healthy: u32,
    pub total: u32,
    /// percent of its normal share it keeps (100: not drained)
    pub capacity: u32,
    /// the drain that sets `capacity` (empty: none)
    #[serde(skip_serializing_if = "String::is_empty")]
    pub drain: String,
    /// failed over: below `minHealthy`, or not yet back for `failbackAfter`
    pub failed_over: bool,
}

impl ClusterState {
    /// Why the cluster gets none of the service's traffic from any source region (None: it keeps a
    /// share where it has one). A drain still ramping down (capacity above 0) keeps it.
    pub fn out(&self) -> Option<String> {
        if self.capacity == 0 {
            Some(format!("{}: capacity 0%", self.drain))
        } else if self.failed_over {
            Some("failed over: below minHealthy (or not yet back for failbackAfter)".to_string())
        } else if self.healthy == 0 {
            Some("no healthy endpoints".to_string())
        } else {
            None
        }
    }
}

/// Every service's decision, as translation reads it ([`crate::translate::Context::traffic`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decisions {
    /// hostname -> decision
    pub services: BTreeMap<Arc<str>, Arc<Decision>>,
    /// a cluster at share 0 keeps its endpoints at a last-resort priority
    pub last_resort: bool,
}

impl Decisions {
    /// The shares of `hostname` for proxies in `region` (None: no split or drain applies).
    pub fn shares(&self, hostname: &str, region: &str) -> Option<&RegionShares> {
        self.services.get(hostname)?.shares(region)
    }
}

/// The outcome of [`decide`].
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub decision: Decision,
    pub failover: FailoverState,
    /// when the decision changes next without a change of health (None: not by itself)
    pub next_change: Option<SystemTime>,
}

fn earliest(a: Option<SystemTime>, b: Option<SystemTime>) -> Option<SystemTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Decides the shares of a service that `split` covers (see the module docs).
pub fn decide(
    policy: &TrafficPolicy,
    split: &SplitPolicy,
    health: &ServiceHealth,
    now: SystemTime,
    previous: &FailoverState,
) -> Outcome {
    let mut next_change = None;
    let mut notes = Vec::new();
    // failover: the state per cluster of the service
    let mut failover = FailoverState::new();
    if let Some(f) = split.failover {
        let clusters: BTreeSet<&ClusterId> = split.split.values().flat_map(|row| row.keys()).collect();
        for c in clusters {
            let h = health.get(c).cloned().unwrap_or_default();
            let below = h.healthy_percent() < f.min_healthy as f64;
            match (previous.get(c), below) {
                (None, false) => {}
                (None, true) => {
                    failover.insert(c.clone(), Failed { since: now, back_since: None });
                }
                (Some(p), true) => {
                    failover.insert(c.clone(), Failed { since: p.since, back_since: None });
                }
                (Some(p), false) => {
                    let back = p.back_since.unwrap_or(now);
                    // (a failbackAfter beyond the representable time: never back)
                    let due = back.checked_add(f.failback_after);
                    if due.is_none_or(|due| now < due) {
                        failover.insert(c.clone(), Failed { since: p.since, back_since: Some(back) });
                        next_change = earliest(next_change, due);
                    }
                }
            }
        }
    }
    // drains: the lowest active capacity per cluster
    let capacity =
        drain_capacity(policy, health.iter().map(|(id, h)| (id, &h.regions)), now, &mut notes, &mut next_change);
    let mut by_region = BTreeMap::new();
    for (region, row) in &split.split {
        match region_shares(row, health, &failover, &capacity, split) {
            Some(shares) => {
                by_region.insert(region.clone(), shares);
            }
            None => notes.push(format!(
                "source region {region}: no cluster of the split has healthy endpoints; the usual priorities apply"
            )),
        }
    }
    // a drain acts in every source region: where the split names none, on the cluster's normal share
    let mut other_regions = None;
    if capacity.values().any(|(cap, _)| *cap < 100) {
        let unnamed: BTreeSet<&Arc<str>> =
            health.values().flat_map(|h| h.regions.iter()).filter(|r| !split.split.contains_key(*r)).collect();
        for region in unnamed {
            if let Some(shares) = drained_shares(Some(region), health, &capacity) {
                by_region.insert(region.clone(), shares);
            }
        }
        other_regions = drained_shares(None, health, &capacity);
    }
    let clusters = health
        .iter()
        .map(|(c, h)| {
            let (cap, drain) = capacity.get(c).cloned().unwrap_or((100, String::new()));
            let state = ClusterState {
                healthy: h.healthy,
                total: h.total,
                capacity: cap,
                drain: if cap < 100 { drain } else { String::new() },
                failed_over: failover.contains_key(c),
            };
            (c.clone(), state)
        })
        .collect();
    Outcome { decision: Decision { by_region, other_regions, clusters, notes }, failover, next_change }
}

/// The lowest capacity of the active drains per target (a cluster, with the regions of its endpoints),
/// with why; notes the expired drains and moves `next_change` to the next ramp step or expiry.
pub fn drain_capacity<'a>(
    policy: &TrafficPolicy,
    clusters: impl IntoIterator<Item = (&'a ClusterId, &'a BTreeSet<Arc<str>>)> + Clone,
    now: SystemTime,
    notes: &mut Vec<String>,
    next_change: &mut Option<SystemTime>,
) -> BTreeMap<ClusterId, (u32, String)> {
    let mut capacity: BTreeMap<ClusterId, (u32, String)> = BTreeMap::new();
    for d in &policy.drains {
        let targets: Vec<&ClusterId> = clusters
            .clone()
            .into_iter()
            .filter(|(id, regions)| match &d.target {
                DrainTarget::Cluster(c) => c == *id,
                DrainTarget::Region(r) => regions.contains(r),
            })
            .map(|(id, _)| id)
            .collect();
        if targets.is_empty() {
            continue;
        }
        if d.expired(now) {
            notes.push(format!("the drain of {} ({}) expired at {}: ignored", d.target, d.reason, time_str(d.expires)));
            continue;
        }
        *next_change = earliest(*next_change, earliest(d.next_step(now), Some(d.expires)));
        let cap = d.capacity_at(now);
        for t in targets {
            let why =
                if d.reason.is_empty() { format!("drain of {}", d.target) } else { format!("drain ({})", d.reason) };
            let e = capacity.entry(t.clone()).or_insert((100, String::new()));
            if cap < e.0 || e.1.is_empty() {
                *e = (cap.min(e.0), why);
            }
        }
    }
    capacity
}

/// The shares of a source region the split does not name (`region`; None: a region without endpoints
/// of the service) under drains. The normal share, what the proxies send without a split under locality
/// failover: the clusters with healthy endpoints in the source region take all, in proportion to those
/// endpoints (none there: every cluster with healthy endpoints, in proportion to them). A drained cluster
/// keeps `capacity`% of its normal share; what it loses goes to the undrained clusters with healthy
/// endpoints in proportion to their healthy endpoints (none left: the drained ones carry all in
/// proportion to what they keep, or, all at 0, their normal shares). Undrained clusters left at 0 are not
/// in the row: they keep their usual (failover) priorities after it. None: no cluster has healthy
/// endpoints.
fn drained_shares(
    region: Option<&Arc<str>>,
    health: &ServiceHealth,
    capacity: &BTreeMap<ClusterId, (u32, String)>,
) -> Option<RegionShares> {
    let alive: Vec<(&ClusterId, &ClusterHealth)> = health.iter().filter(|(_, h)| h.healthy > 0).collect();
    let local: Vec<&(&ClusterId, &ClusterHealth)> =
        alive.iter().filter(|(_, h)| region.is_some_and(|r| h.regions.contains(r))).collect();
    let normal_set: Vec<&(&ClusterId, &ClusterHealth)> = if local.is_empty() { alive.iter().collect() } else { local };
    let normal_total: f64 = normal_set.iter().map(|(_, h)| h.healthy as f64).sum();
    if normal_total <= 0.0 {
        return None;
    }
    let normal = |c: &ClusterId| -> f64 {
        normal_set.iter().find(|(id, _)| *id == c).map_or(0.0, |(_, h)| 100.0 * h.healthy as f64 / normal_total)
    };
    let cap = |c: &ClusterId| capacity.get(c).filter(|(cap, _)| *cap < 100);
    let kept: f64 = alive.iter().filter_map(|(c, _)| cap(c).map(|(k, _)| normal(c) * *k as f64 / 100.0)).sum();
    let lost: f64 = alive.iter().filter_map(|(c, _)| cap(c).map(|(k, _)| normal(c) * (100 - k) as f64 / 100.0)).sum();
    let receivers: f64 = alive.iter().filter(|(c, _)| cap(c).is_none()).map(|(_, h)| h.healthy as f64).sum();
    let mut out = RegionShares::new();
    for (c, h) in &alive {
        let n = normal(c);
        let (share, reason) = match cap(c) {
            Some((k, why)) => {
                let share = if receivers > 0.0 {
                    n * *k as f64 / 100.0
                } else if kept > 0.0 {
                    n * *k as f64 / kept
                } else {
                    n
                };
                let mut reason = format!("{why}: capacity {k}% of its normal share {n:.1}%");
                if receivers <= 0.0 && share > 0.0 {
                    reason.push_str("; no undrained cluster left: the drained ones carry all");
                }
                (share, reason)
            }
            None if receivers > 0.0 => {
                let more = lost * h.healthy as f64 / receivers;
                if n + more <= 0.0 {
                    continue;
                }
                let mut reason = format!("normal share {n:.1}% (no split for this source region)");
                if more > 1e-9 {
                    reason.push_str(&format!(", and {more:.1}% more from the drained clusters (by healthy endpoints)"));
                }
                (n + more, reason)
            }
            None => continue,
        };
        out.insert((*c).clone(), Share { share, split: 0, reason });
    }
    Some(out)
}

fn region_shares(
    row: &BTreeMap<ClusterId, u32>,
    health: &ServiceHealth,
    failover: &FailoverState,
    capacity: &BTreeMap<ClusterId, (u32, String)>,
    split: &SplitPolicy,
) -> Option<RegionShares> {
    enum Role {
        Out,
        Fixed(f64),
        Receiver,
    }
    let mut roles: BTreeMap<&ClusterId, (Role, String)> = BTreeMap::new();
    for (c, &base) in row {
        let h = health.get(c).cloned().unwrap_or_default();
        let role = if base == 0 {
            (Role::Out, "split share 0".to_string())
        } else if h.healthy == 0 {
            (Role::Out, "no healthy endpoints".to_string())
        } else if let Some(f) = failover.get(c) {
            let min = split.failover.map_or(0, |f| f.min_healthy);
            let why = match f.back_since {
                None => {
                    format!("failover: {:.0}% of its endpoints healthy, below minHealthy {min}%", h.healthy_percent())
                }
                Some(t) => format!(
                    "failover: at or above minHealthy {min}% again since {}, its share returns after failbackAfter",
                    time_str(t)
                ),
            };
            (Role::Out, why)
        } else if let Some((cap, why)) = capacity.get(c).filter(|(cap, _)| *cap < 100) {
            (Role::Fixed(base as f64 * *cap as f64 / 100.0), format!("{why}: capacity {cap}% of split {base}%"))
        } else {
            (Role::Receiver, format!("split {base}%"))
        };
        roles.insert(c, role);
    }
    let receivers: f64 =
        roles.iter().filter(|(_, (r, _))| matches!(r, Role::Receiver)).map(|(c, _)| row[*c] as f64).sum();
    let fixed: f64 = roles.values().map(|(r, _)| if let Role::Fixed(s) = r { *s } else { 0.0 }).sum();
    let mut out = RegionShares::new();
    if receivers > 0.0 {
        let left = 100.0 - fixed;
        for (c, (role, why)) in roles {
            let base = row[c];
            let share = match role {
                Role::Out => 0.0,
                Role::Fixed(s) => s,
                Role::Receiver => left * base as f64 / receivers,
            };
            let reason = if matches!(role, Role::Receiver) && share > base as f64 + 1e-9 {
                format!("{why}, and {:.1}% more from the drained or failed-over clusters", share - base as f64)
            } else {
                why
            };
            out.insert(c.clone(), Share { share, split: base, reason });
        }
    } else if fixed > 0.0 {
        for (c, (role, why)) in roles {
            let share = if let Role::Fixed(s) = role { 100.0 * s / fixed } else { 0.0 };
            let reason =
                if share > 0.0 { format!("{why}; no undrained cluster left: the drained ones carry all") } else { why };
            out.insert(c.clone(), Share { share, split: row[c], reason });
        }
    } else {
        // every cluster failed over or without endpoints: the split stands among those with healthy ones
        let alive: Vec<&ClusterId> = row
            .iter()
            .filter(|(c, b)| **b > 0 && health.get(*c).is_some_and(|h| h.healthy > 0))
            .map(|(c, _)| c)
            .collect();
        let total: f64 = alive.iter().map(|c| row[*c] as f64).sum();
        if total <= 0.0 {
            return None;
        }
        for (c, (_, why)) in roles {
            let share = if alive.contains(&c) { 100.0 * row[c] as f64 / total } else { 0.0 };
            let reason =
                if share > 0.0 { format!("{why}; every cluster is failed over: the split stands") } else { why };
            out.insert(c.clone(), Share { share, split: row[c], reason });
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::traffic::policy::{Drain, Failover, Ramp};

    fn id(s: &str) -> ClusterId {
        ClusterId::new(s)
    }

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn split_70_30(failover: Option<Failover>) -> SplitPolicy {
        SplitPolicy {
            hosts: vec![],
            split: BTreeMap::from([
                (Arc::from("us-east-1"), BTreeMap::from([(id("aws"), 70), (id("azure"), 30)])),
                (Arc::from("westeurope"), BTreeMap::from([(id("azure"), 70), (id("aws"), 30)])),
            ]),
            failover,
        }
    }

    fn health(aws: (u32, u32), azure: (u32, u32)) -> ServiceHealth {
        let h = |(total, healthy): (u32, u32), region: &str| ClusterHealth {
            total,
            healthy,
            regions: BTreeSet::from([Arc::from(region)]),
        };
        BTreeMap::from([(id("aws"), h(aws, "us-east-1")), (id("azure"), h(azure, "westeurope"))])
    }

    fn shares(o: &Outcome, region: &str) -> Vec<(String, f64)> {
        o.decision.by_region[region].iter().map(|(c, s)| (c.to_string(), (s.share * 1000.0).round() / 1000.0)).collect()
    }

    fn drain(target: DrainTarget, capacity: u32, ramp: Option<Ramp>) -> Drain {
        Drain {
            target,
            capacity,
            ramp,
            start: Some(t0()),
            expires: t0() + Duration::from_secs(3600),
            reason: "DR drill".into(),
            drill: None,
        }
    }

    #[test]
    fn the_split_as_configured_when_all_is_well() {
        let o =
            decide(&TrafficPolicy::default(), &split_70_30(None), &health((4, 4), (2, 2)), t0(), &Default::default());
        assert_eq!(shares(&o, "us-east-1"), vec![("aws".into(), 70.0), ("azure".into(), 30.0)]);
        assert_eq!(shares(&o, "westeurope"), vec![("aws".into(), 30.0), ("azure".into(), 70.0)]);
        assert_eq!(o.next_change, None);
        assert_eq!(o.decision.by_region["us-east-1"][&id("aws")].reason, "split 70%");
    }

    #[test]
    fn a_ramped_drain_scales_the_share_and_says_when_it_steps() {
        let policy = TrafficPolicy {
            drains: vec![drain(
                DrainTarget::Cluster(id("azure")),
                0,
                Some(Ramp { step: 50, every: Duration::from_secs(30) }),
            )],
            ..Default::default()
        };
        let h = health((4, 4), (2, 2));
        let o = decide(&policy, &split_70_30(None), &h, t0(), &Default::default());
        assert_eq!(shares(&o, "us-east-1"), vec![("aws".into(), 85.0), ("azure".into(), 15.0)]);
        assert_eq!(shares(&o, "westeurope"), vec![("aws".into(), 65.0), ("azure".into(), 35.0)]);
        assert_eq!(o.next_change, Some(t0() + Duration::from_secs(30)));
        assert!(o.decision.by_region["us-east-1"][&id("azure")].reason.contains("DR drill"));
        let o = decide(&policy, &split_70_30(None), &h, t0() + Duration::from_secs(30), &Default::default());
        assert_eq!(shares(&o, "us-east-1"), vec![("aws".into(), 100.0), ("azure".into(), 0.0)]);
        assert_eq!(o.next_change, Some(t0() + Duration::from_secs(3600)), "then the expiry");
        // expired: ignored, and said
        let o = decide(&policy, &split_70_30(None), &h, t0() + Duration::from_secs(3600), &Default::default());
        assert_eq!(shares(&o, "us-east-1"), vec![("aws".into(), 70.0), ("azure".into(), 30.0)]);
        assert!(o.decision.notes.iter().any(|n| n.contains("expired")), "{:?}", o.decision.notes);
        // by region: the clusters with endpoints there
        let policy = TrafficPolicy {
            drains: vec![drain(DrainTarget::Region("westeurope".into()), 50, None)],
            ..Default::default()
        };
        let o = decide(&policy, &split_70_30(None), &h, t0(), &Default::default());
        assert_eq!(shares(&o, "us-east-1"), vec![("aws".into(), 85.0), ("azure".into(), 15.0)]);
    }

    #[test]
    fn below_min_healthy_loses_the_share_and_fails_back_after_the_delay() {
        let f = Failover { min_healthy: 50, failback_after: Duration::from_secs(120) };
        let p = TrafficPolicy::default();
        let s = split_70_30(Some(f));
        // 1 of 4 healthy: 25% < 50%
        let o = decide(&p, &s, &health((4, 1), (2, 2)), t0(), &Default::default());
        assert_eq!(shares(&o, "us-east-1"), vec![("aws".into(), 0.0), ("azure".into(), 100.0)]);
        assert!(o.decision.by_region["us-east-1"][&id("aws")].reason.contains("below minHealthy 50%"));
        assert_eq!(o.failover[&id("aws")], Failed { since: t0(), back_since: None });
        // healthy again: not yet back
        let t1 = t0() + Duration::from_secs(10);
        let o2 = decide(&p, &s, &health((4, 4), (2, 2)), t1, &o.failover);
        assert_eq!(shares(&o2, "us-east-1"), vec![("aws".into(), 0.0), ("azure".into(), 100.0)]);
        assert_eq!(o2.next_change, Some(t1 + Duration::from_secs(120)));
        // a relapse restarts the wait
        let o3 = decide(&p, &s, &health((4, 1), (2, 2)), t1 + Duration::from_secs(60), &o2.failover);
        assert_eq!(o3.failover[&id("aws")].back_since, None);
        // after failbackAfter: back
        let o4 = decide(&p, &s, &health((4, 4), (2, 2)), t1 + Duration::from_secs(120), &o2.failover);
        assert_eq!(shares(&o4, "us-east-1"), vec![("aws".into(), 70.0), ("azure".into(), 30.0)]);
        assert!(o4.failover.is_empty());
        // exactly at minHealthy is enough
        let o = decide(&p, &s, &health((4, 2), (2, 2)), t0(), &Default::default());
        assert_eq!(shares(&o, "us-east-1"), vec![("aws".into(), 70.0), ("azure".into(), 30.0)]);
    }

    #[test]
    fn nobody_left_to_take_the_share() {
        let f = Failover { min_healthy: 50, failback_after: Duration::ZERO };
        // both below: the split stands
        let o = decide(
            &TrafficPolicy::default(),
            &split_70_30(Some(f)),
            &health((4, 1), (2, 0)),
            t0(),
            &Default::default(),
        );
        assert_eq!(shares(&o, "us-east-1"), vec![("aws".into(), 100.0), ("azure".into(), 0.0)]);
        // nothing healthy: no decision for the region
        let o =
            decide(&TrafficPolicy::default(), &split_70_30(None), &health((4, 0), (2, 0)), t0(), &Default::default());
        assert!(o.decision.by_region.is_empty());
        assert_eq!(o.decision.notes.len(), 2);
        // every cluster drained: the drained ones carry all, in proportion
        let policy = TrafficPolicy {
            drains: vec![
                drain(DrainTarget::Cluster(id("azure")), 50, None),
                drain(DrainTarget::Cluster(id("aws")), 50, None),
            ],
            ..Default::default()
        };
        let o = decide(&policy, &split_70_30(None), &health((4, 4), (2, 2)), t0(), &Default::default());
        assert_eq!(shares(&o, "us-east-1"), vec![("aws".into(), 70.0), ("azure".into(), 30.0)]);
    }

    fn no_split() -> SplitPolicy {
        SplitPolicy { hosts: vec![], split: BTreeMap::new(), failover: None }
    }

    fn row(r: &RegionShares) -> Vec<(String, f64)> {
        r.iter().map(|(c, s)| (c.to_string(), (s.share * 1000.0).round() / 1000.0)).collect()
    }

    #[test]
    fn a_drain_acts_in_every_source_region_without_a_split() {
        let h = health((4, 4), (2, 2));
        let policy =
            TrafficPolicy { drains: vec![drain(DrainTarget::Cluster(id("azure")), 0, None)], ..Default::default() };
        // no split at all: westeurope proxies' normal share is their own region's cluster; drained, it
        // goes to aws
        let o = decide(&policy, &no_split(), &h, t0(), &Default::default());
        assert_eq!(shares(&o, "westeurope"), vec![("aws".into(), 100.0), ("azure".into(), 0.0)]);
        assert!(o.decision.by_region["westeurope"][&id("azure")].reason.contains("normal share 100.0%"));
        assert!(o.decision.by_region["westeurope"][&id("aws")].reason.contains("100.0% more"));
        assert_eq!(shares(&o, "us-east-1"), vec![("aws".into(), 100.0), ("azure".into(), 0.0)]);
        // a region without endpoints of the service: every cluster by healthy endpoints, drained
        let other = o.decision.shares("eastus").expect("any other region");
        assert_eq!(row(other), vec![("aws".into(), 100.0), ("azure".into(), 0.0)]);
        // what the decision holds per cluster
        assert_eq!(o.decision.clusters[&id("azure")].capacity, 0);
        assert!(o.decision.clusters[&id("azure")].out().is_some());
        assert_eq!(o.decision.clusters[&id("aws")].out(), None);
        // a split naming only us-east-1: westeurope still drains
        let mut s = split_70_30(None);
        s.split.remove("westeurope");
        let o = decide(&policy, &s, &h, t0(), &Default::default());
        assert_eq!(shares(&o, "us-east-1"), vec![("aws".into(), 100.0), ("azure".into(), 0.0)]);
        assert_eq!(shares(&o, "westeurope"), vec![("aws".into(), 100.0), ("azure".into(), 0.0)]);
        // capacity 50: half of the normal share
        let policy =
            TrafficPolicy { drains: vec![drain(DrainTarget::Cluster(id("azure")), 50, None)], ..Default::default() };
        let o = decide(&policy, &no_split(), &h, t0(), &Default::default());
        assert_eq!(shares(&o, "westeurope"), vec![("aws".into(), 50.0), ("azure".into(), 50.0)]);
        assert_eq!(shares(&o, "us-east-1"), vec![("aws".into(), 100.0), ("azure".into(), 0.0)]);
        // elsewhere: normal 4:2 by healthy endpoints, azure keeps half of its third
        let other = o.decision.other_regions.as_ref().unwrap();
        assert_eq!(row(other), vec![("aws".into(), 83.333), ("azure".into(), 16.667)]);
        // no drain: no decision outside the split (the usual priorities apply)
        let o = decide(&TrafficPolicy::default(), &no_split(), &h, t0(), &Default::default());
        assert!(o.decision.by_region.is_empty() && o.decision.other_regions.is_none());
        assert_eq!(o.decision.shares("westeurope"), None);
    }

    #[test]
    fn undrained_clusters_without_a_normal_share_keep_their_usual_priorities() {
        // three clusters: gcp has endpoints in europe-west1; drain azure for westeurope proxies: its share
        // goes to aws and gcp by healthy endpoints; us-east-1 proxies: aws stays at 100, gcp not listed
        let mut h = health((4, 4), (2, 2));
        h.insert(
            id("gcp"),
            ClusterHealth { total: 4, healthy: 4, regions: BTreeSet::from([Arc::from("europe-west1")]) },
        );
        let policy =
            TrafficPolicy { drains: vec![drain(DrainTarget::Cluster(id("azure")), 0, None)], ..Default::default() };
        let o = decide(&policy, &no_split(), &h, t0(), &Default::default());
        assert_eq!(shares(&o, "westeurope"), vec![("aws".into(), 50.0), ("azure".into(), 0.0), ("gcp".into(), 50.0)]);
        assert_eq!(shares(&o, "us-east-1"), vec![("aws".into(), 100.0), ("azure".into(), 0.0)]);
        // every cluster drained to 0: the normal shares stand
        let policy = TrafficPolicy {
            drains: vec![
                drain(DrainTarget::Region("westeurope".into()), 0, None),
                drain(DrainTarget::Cluster(id("aws")), 0, None),
                drain(DrainTarget::Cluster(id("gcp")), 0, None),
            ],
            ..Default::default()
        };
        let o = decide(&policy, &no_split(), &h, t0(), &Default::default());
        assert_eq!(shares(&o, "westeurope"), vec![("aws".into(), 0.0), ("azure".into(), 100.0), ("gcp".into(), 0.0)]);
    }

    proptest! {
        #[test]
        fn drained_rows_without_a_split_add_up_to_100(
            healthy in proptest::collection::vec((0u32..6, 0u32..6), 1..5),
            caps in proptest::collection::vec(proptest::option::of(0u32..=100), 5),
            region in 0usize..6,
        ) {
            let regions = ["r0", "r1", "r2", "r3", "r4", "elsewhere"];
            let ids: Vec<ClusterId> = (0..healthy.len()).map(|i| id(&format!("c{i}"))).collect();
            let health: ServiceHealth = ids.iter().zip(&healthy).enumerate().map(|(i, (c, (t, h)))| {
                (c.clone(), ClusterHealth { total: *t, healthy: (*h).min(*t), regions: BTreeSet::from([Arc::from(regions[i % 3])]) })
            }).collect();
            let policy = TrafficPolicy {
                drains: ids.iter().zip(&caps).filter_map(|(c, cap)| cap.map(|cap| drain(DrainTarget::Cluster(c.clone()), cap, None))).collect(),
                ..Default::default()
            };
            let o = decide(&policy, &no_split(), &health, t0(), &Default::default());
            let drained = policy.drains.iter().any(|d| d.capacity < 100);
            match o.decision.shares(regions[region]) {
                Some(r) => {
                    prop_assert!(drained);
                    let sum: f64 = r.values().map(|s| s.share).sum();
                    prop_assert!((sum - 100.0).abs() < 1e-6, "{r:?}");
                    for (c, s) in r {
                        prop_assert!(s.share >= 0.0);
                        if health[c].healthy == 0 { prop_assert_eq!(s.share, 0.0); }
                        prop_assert!(!s.reason.is_empty());
                    }
                    // a drained cluster never gets more than its normal share while an undrained one is left
                    let undrained_alive = ids.iter().zip(&caps).any(|(c, cap)| cap.is_none_or(|k| k == 100) && health[c].healthy > 0);
                    for (c, cap) in ids.iter().zip(&caps) {
                        if let (Some(0), Some(s), true) = (cap, r.get(c), undrained_alive) {
                            prop_assert_eq!(s.share, 0.0);
                        }
                    }
                }
                None => prop_assert!(!drained || health.values().all(|h| h.healthy == 0)),
            }
        }

        #[test]
        fn shares_always_add_up_to_100(
            row in proptest::collection::vec(0u32..=100, 1..5),
            healthy in proptest::collection::vec((0u32..6, 0u32..6), 5),
            caps in proptest::collection::vec(proptest::option::of(0u32..=100), 5),
            min_healthy in proptest::option::of(0u32..=100),
            failed in proptest::collection::vec(any::<bool>(), 5),
        ) {
            // a row that sums to 100: the last cluster takes the rest
            let mut shares = Vec::new();
            let mut left = 100u32;
            for (i, s) in row.iter().enumerate() {
                let s = if i + 1 == row.len() { left } else { (*s).min(left) };
                left -= s;
                shares.push(s);
            }
            let ids: Vec<ClusterId> = (0..shares.len()).map(|i| id(&format!("c{i}"))).collect();
            let split = SplitPolicy {
                hosts: vec![],
                split: BTreeMap::from([(Arc::from("r"), ids.iter().cloned().zip(shares.iter().copied()).collect())]),
                failover: min_healthy.map(|m| Failover { min_healthy: m, failback_after: Duration::from_secs(60) }),
            };
            let health: ServiceHealth = ids.iter().zip(&healthy).map(|(c, (t, h))| {
                (c.clone(), ClusterHealth { total: *t, healthy: (*h).min(*t), regions: BTreeSet::new() })
            }).collect();
            let policy = TrafficPolicy {
                drains: ids.iter().zip(&caps).filter_map(|(c, cap)| cap.map(|cap| drain(DrainTarget::Cluster(c.clone()), cap, None))).collect(),
                ..Default::default()
            };
            let previous: FailoverState = ids.iter().zip(&failed).filter(|(_, f)| **f)
                .map(|(c, _)| (c.clone(), Failed { since: t0(), back_since: Some(t0()) })).collect();
            let o = decide(&policy, &split, &health, t0() + Duration::from_secs(1), &previous);
            match o.decision.by_region.get("r") {
                Some(r) => {
                    let sum: f64 = r.values().map(|s| s.share).sum();
                    prop_assert!((sum - 100.0).abs() < 1e-6, "{r:?}");
                    for (c, s) in r {
                        prop_assert!(s.share >= 0.0);
                        // a cluster without healthy endpoints never gets traffic
                        if health[c].healthy == 0 { prop_assert_eq!(s.share, 0.0); }
                        prop_assert!(!s.reason.is_empty());
                    }
                }
                None => prop_assert!(ids.iter().zip(&shares).all(|(c, s)| *s == 0 || health[c].healthy == 0)),
            }
        }
    }
}
