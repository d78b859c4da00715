//! Traffic control (the mesh config's `traffic:` section): active-active splits of a service's traffic
//! between clusters by source region, failover of a cluster whose healthy endpoints fall below a
//! threshold (and failback after a delay), and drains that ramp a cluster's share down.
//!
//! - [`policy`]: the `traffic:` model and its validation against the mesh's clusters;
//! - [`decide`]: pure: policy, per-cluster health of a service, `now` and the previous failover state ->
//!   the share each cluster gets per source region, why, and when that changes next;
//! - [`lb`]: Envoy's load-balancing math (priority load with the overprovisioning factor, locality
//!   weights times availability), to predict what Envoy does with an assignment (`/debug/whatif`);
//! - [`drill`]: drills' aborts and reports; [`health`]: the global DNS health from the decision.
//!
//! Where the policy in force comes from and how operators change it (the file, the `TrafficPolicy`
//! custom resource, `meshfed traffic`) is [`crate::traffic_policy`]'s.
//!
//! Translation ([`crate::translate::endpoint`]) turns the decisions into priority-0 locality weights; the
//! push loop ([`crate::push`]) owns the policy and the failover state and re-decides on registry changes
//! and at the next change time.

pub mod decide;
pub mod drill;
pub mod health;
pub mod lb;
pub mod policy;

pub use decide::{Decision, Decisions, FailoverState, ServiceHealth};
pub use policy::TrafficPolicy;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use crate::model::{ClusterId, Health, Service};

/// The push loop's traffic state, as the debug surface reads it.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    #[serde(skip)]
    pub policy: TrafficPolicy,
    /// hostname -> its failed-over clusters
    pub failover: BTreeMap<Arc<str>, FailoverState>,
    /// when the decisions change next by themselves (a ramp step, an expiry, a failback)
    #[serde(serialize_with = "ser_opt_time")]
    pub next_change: Option<SystemTime>,
    /// the clusters an active drain names (by id, or by a region of their endpoints), as decided in the
    /// same push as the services: cluster -> capacity in percent and why ([`health`] reads it)
    pub drained: BTreeMap<ClusterId, Drained>,
    /// the drills (drains with `drill:`), active, aborted or ended, by [`drill::key`]; an aborted drill's
    /// drain no longer applies although the mesh config still lists it
    /// (not serialized: the debug surface shows them with each step's ACKs, `/debug/drillz`)
    #[serde(skip)]
    pub drills: BTreeMap<String, drill::Report>,
    /// aborts restored from the last-known state ([`Durable::drill_aborts`]) whose drill the policy in
    /// force does not list (yet: in custom-resource mode the file's policy serves until the object is
    /// read). Kept for the next restart until `maxDrainDuration` after the abort, by when that drill has
    /// expired anyway (not serialized)
    #[serde(skip)]
    pub restored_aborts: BTreeMap<String, drill::Abort>,
}

impl Status {
    /// What of this state a restart must not lose ([`Durable`]): the failover state and the drills'
    /// aborts.
    pub fn durable(&self) -> Durable {
        Durable {
            failover: self.failover.clone(),
            drill_aborts: self
                .restored_aborts
                .iter()
                .map(|(key, a)| (key.clone(), a.clone()))
                .chain(self.drills.iter().filter_map(|(key, r)| Some((key.clone(), r.aborted.clone()?))))
                .collect(),
        }
    }
}

/// The part of the push loop's traffic state that outlives a restart: kept in the last-known state file
/// (mesh config `lastKnownState`, [`crate::source::last_known`]) and handed back to the push loop at
/// start ([`crate::push::start`]). A cluster failed over stays away until its `failbackAfter` has passed
/// since it was healthy again, and a drill aborted by the push loop does not apply again (with the file's
/// `traffic:`, which meshfed does not edit; the `TrafficPolicy` custom resource records an abort in the
/// object as well, [`crate::traffic_policy::abort_record`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Durable {
    /// hostname -> its failed-over clusters ([`Status::failover`])
    pub failover: BTreeMap<Arc<str>, FailoverState>,
    /// the aborted drills' aborts, by [`drill::key`] (target and start)
    pub drill_aborts: BTreeMap<String, drill::Abort>,
}

/// `policy` as decided: without the drains of the drills `drills` has aborted, or whose abort the
/// policy records.
pub fn effective_policy(policy: &TrafficPolicy, drills: &BTreeMap<String, drill::Report>) -> TrafficPolicy {
    let mut p = policy.clone();
    p.drains.retain(|d| match &d.drill {
        None => true,
        Some(x) => x.aborted.is_none() && drills.get(&drill::key(d)).is_none_or(|r| r.aborted.is_none()),
    });
    p
}

/// A cluster under an active drain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Drained {
    /// percent of its normal share it keeps now
    pub capacity: u32,
    pub reason: String,
}

fn ser_opt_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&decide::time_str(*t)),
        None => s.serialize_none(),
    }
}

/// A service's endpoints per cluster: all, healthy, and their regions.
pub fn service_health(service: &Service) -> ServiceHealth {
    let mut out = ServiceHealth::new();
    for e in &service.endpoints {
        let h = out.entry(e.cluster.clone()).or_default();
        h.total += 1;
        h.healthy += u32::from(e.health == Health::Healthy);
        if !e.locality.region.is_empty() {
            h.regions.insert(e.locality.region.clone());
        }
    }
    out
}

/// Every covered service's decision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct All {
    pub decisions: Decisions,
    pub failover: BTreeMap<Arc<str>, FailoverState>,
    pub next_change: Option<SystemTime>,
    /// the clusters under an active drain ([`Status::drained`])
    pub drained: BTreeMap<ClusterId, Drained>,
}

/// Decides every service `policy` covers (see [`decide::decide`]); `previous`: the failover state by
/// hostname. The drains are also decided per cluster ([`Status::drained`]), with the same rule, whether
/// or not a policy covers a service: `clusters` are the mesh's clusters (a region drain names the
/// clusters with endpoints in that region, of any service).
pub fn decide_all<'a>(
    policy: &TrafficPolicy,
    clusters: impl IntoIterator<Item = ClusterId>,
    services: impl IntoIterator<Item = &'a Service>,
    now: SystemTime,
    previous: &BTreeMap<Arc<str>, FailoverState>,
) -> All {
    let mut all =
        All { decisions: Decisions { last_resort: policy.last_resort, ..Default::default() }, ..Default::default() };
    if policy.is_empty() {
        return all;
    }
    let by_region = policy.drains.iter().any(|d| matches!(d.target, policy::DrainTarget::Region(_)));
    let mut regions: BTreeMap<ClusterId, std::collections::BTreeSet<Arc<str>>> =
        clusters.into_iter().map(|c| (c, Default::default())).collect();
    for s in services {
        if by_region {
            for e in s.endpoints.iter().filter(|e| !e.locality.region.is_empty()) {
                regions.entry(e.cluster.clone()).or_default().insert(e.locality.region.clone());
            }
        }
        let Some(split) = policy.policy_for(&s.hostname) else { continue };
        let empty = FailoverState::new();
        let prev = previous.get(&s.hostname).unwrap_or(&empty);
        let o = decide::decide(policy, split, &service_health(s), now, prev);
        if !o.failover.is_empty() {
            all.failover.insert(s.hostname.clone(), o.failover);
        }
        all.next_change = match (all.next_change, o.next_change) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        all.decisions.services.insert(s.hostname.clone(), Arc::new(o.decision));
    }
    let mut notes = Vec::new();
    let mut next_change = all.next_change;
    let drained = decide::drain_capacity(policy, regions.iter(), now, &mut notes, &mut next_change);
    all.next_change = next_change;
    all.drained = drained
        .into_iter()
        .filter(|(_, (cap, _))| *cap < 100)
        .map(|(c, (capacity, reason))| (c, Drained { capacity, reason }))
        .collect();
    all
}
