//! Drills: drains with `drill: {abortBelowHealthy: N}`, pure.
//!
//! - Auto-abort ([`abort_reason`]): while a drill is active, if a cluster that takes the drained traffic
//!   (for a service the policy's split covers: the other clusters of the split with a share above 0 in a
//!   row where the drained cluster has one; for other services: the other clusters with endpoints of
//!   the service) has fewer than N% of that service's endpoints healthy, the drill is aborted: the drain
//!   stops applying at once (as if expired). The push loop cannot edit the mesh config, so it keeps the
//!   aborted state in its traffic [`super::Status`], by the drain's identity (target and start): the file
//!   still lists the drain, aborted, until the operator removes it (`meshfed traffic drill --abort`) or
//!   it expires. The abort outlives a restart ([`super::Durable`]): recorded in the `TrafficPolicy`
//!   custom resource, or kept in the last-known state file.
//! - The report ([`Report`]): each step (the capacity, when its push was published, its generation), the
//!   abort (time, reason) or the end (expired, removed). When every proxy connected at a step's publish
//!   had ACKed its EDS ([`step_acks`]) is read from the connections by the debug surface.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::Serialize;

use super::decide::{ClusterHealth, time_str};
use super::policy::{Drain, DrainTarget, TrafficPolicy};
use crate::model::ClusterId;

/// Ended drills kept in the report.
pub const KEEP_ENDED: usize = 20;

/// A drill's identity: its target and start (`cluster azure-weu @ 2026-12-05T10:00:00Z`).
pub fn key(d: &Drain) -> String {
    format!("{} @ {}", d.target, d.start.map(time_str).unwrap_or_default())
}

/// One drill's report.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub target: String,
    /// the metrics' `cluster` label: the cluster id, or `region:R`
    pub label: String,
    pub reason: String,
    pub abort_below_healthy: u32,
    #[serde(serialize_with = "ser_time")]
    pub start: SystemTime,
    #[serde(serialize_with = "ser_time")]
    pub expires: SystemTime,
    /// (not serialized: the debug surface shows each step with its ACKs, `stepAcks`)
    #[serde(skip)]
    pub steps: Vec<Step>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aborted: Option<Abort>,
    /// how it ended without an abort: `expired` or `removed` (from the mesh config)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended: Option<End>,
}

impl Report {
    pub fn new(d: &Drain, start: SystemTime) -> Report {
        Report {
            target: d.target.to_string(),
            label: match &d.target {
                DrainTarget::Cluster(c) => c.to_string(),
                DrainTarget::Region(r) => format!("region:{r}"),
            },
            reason: d.reason.clone(),
            abort_below_healthy: d.drill.as_ref().map_or(0, |x| x.abort_below_healthy),
            start,
            expires: d.expires,
            steps: Vec::new(),
            aborted: None,
            ended: None,
        }
    }

    /// Neither aborted nor ended.
    pub fn active(&self) -> bool {
        self.aborted.is_none() && self.ended.is_none()
    }

    /// Records the capacity decided at `now` as a step if it differs from the last one (unpublished yet).
    pub fn record(&mut self, capacity: u32, now: SystemTime) {
        if self.steps.last().is_none_or(|s| s.capacity != capacity) {
            self.steps.push(Step { capacity, decided_at: now, generation: 0, published_at: None });
        }
    }

    /// The push of `generation` was published at `now`: the steps decided since carry it.
    pub fn published(&mut self, generation: u64, now: SystemTime) {
        for s in self.steps.iter_mut().filter(|s| s.published_at.is_none()) {
            s.generation = generation;
            s.published_at = Some(now);
        }
    }
}

/// One step of a drill (also the abort and the end, capacity 100: the traffic returns).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// percent of the target's normal share
    pub capacity: u32,
    #[serde(serialize_with = "ser_time")]
    pub decided_at: SystemTime,
    /// the push that published it (0: not yet)
    pub generation: u64,
    #[serde(serialize_with = "ser_opt_time")]
    pub published_at: Option<SystemTime>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Abort {
    #[serde(serialize_with = "ser_time")]
    pub at: SystemTime,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct End {
    #[serde(serialize_with = "ser_time")]
    pub at: SystemTime,
    /// `expired`, or `removed from the mesh config`
    pub how: String,
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

/// Why the drill `d` aborts now (None: it goes on): a cluster that takes its traffic has fewer than
/// `abortBelowHealthy` percent of a service's endpoints healthy. `services`: hostname -> the service's
/// endpoints per cluster.
pub fn abort_reason<'a>(
    policy: &TrafficPolicy,
    d: &Drain,
    services: impl IntoIterator<Item = (&'a str, &'a BTreeMap<ClusterId, ClusterHealth>)>,
) -> Option<String> {
    let min = d.drill.as_ref()?.abort_below_healthy;
    if min == 0 {
        return None;
    }
    for (host, health) in services {
        let drained: Vec<&ClusterId> = health
            .iter()
            .filter(|(id, h)| match &d.target {
                DrainTarget::Cluster(c) => c == *id,
                DrainTarget::Region(r) => h.regions.contains(r),
            })
            .map(|(id, _)| id)
            .collect();
        if drained.is_empty() {
            continue;
        }
        let receivers: Vec<&ClusterId> = match policy.policy_for(host).filter(|p| !p.split.is_empty()) {
            Some(p) => {
                let mut r: Vec<&ClusterId> = p
                    .split
                    .values()
                    .filter(|row| drained.iter().any(|c| row.get(*c).is_some_and(|s| *s > 0)))
                    .flat_map(|row| row.iter().filter(|(c, s)| **s > 0 && !drained.contains(c)).map(|(c, _)| c))
                    .collect();
                r.sort();
                r.dedup();
                r
            }
            None => health.keys().filter(|c| !drained.contains(c)).collect(),
        };
        for c in receivers {
            let h = health.get(c).cloned().unwrap_or_default();
            let pct = h.healthy_percent();
            if pct < min as f64 {
                return Some(format!(
                    "{c}, taking the drained traffic of {host}, has {}/{} endpoints healthy ({pct:.0}%), below abortBelowHealthy {min}%",
                    h.healthy, h.total
                ));
            }
        }
    }
    None
}

/// One proxy's EDS acknowledgements, as [`step_acks`] reads them.
#[derive(Clone, Debug, Default)]
pub struct ProxyAcks {
    pub proxy: String,
    pub connected_at: Option<SystemTime>,
    /// (generation of the ACKed response, when it was ACKed), oldest first
    pub acked: Vec<(u64, SystemTime)>,
    /// the newest generation the proxy's stream has looked at
    pub seen_generation: u64,
    /// the generation of the newest EDS response sent, and whether it is ACKed
    pub sent_generation: u64,
    pub in_sync: bool,
}

impl ProxyAcks {
    /// When the proxy had EDS at `generation` or later ACKed (None: not yet). A proxy to which that
    /// push sent nothing (its scope did not change) and that holds all it was sent has it at `published`.
    pub fn has(&self, generation: u64, published: SystemTime) -> Option<SystemTime> {
        if let Some((_, at)) = self.acked.iter().find(|(g, _)| *g >= generation) {
            return Some(*at);
        }
        (self.seen_generation >= generation && self.sent_generation < generation && self.in_sync).then_some(published)
    }
}

/// When every proxy connected at the step's publish had ACKed its EDS, or how many (and which) have not yet.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepAcks {
    #[serde(serialize_with = "ser_opt_time")]
    pub all_acked_at: Option<SystemTime>,
    /// publish -> all ACKed, seconds
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_seconds: Option<f64>,
    pub proxies: usize,
    pub pending: Vec<String>,
}

/// See [`StepAcks`]; proxies connected after the publish got the step with their first EDS and are not
/// counted, those disconnected since are gone from `proxies`.
pub fn step_acks(step: &Step, proxies: &[ProxyAcks]) -> Option<StepAcks> {
    let published = step.published_at?;
    let counted: Vec<&ProxyAcks> = proxies.iter().filter(|p| p.connected_at.is_none_or(|c| c <= published)).collect();
    let mut latest = published;
    let mut pending = Vec::new();
    for p in &counted {
        match p.has(step.generation, published) {
            Some(at) => latest = latest.max(at),
            None => pending.push(p.proxy.clone()),
        }
    }
    let done = pending.is_empty();
    Some(StepAcks {
        all_acked_at: done.then_some(latest),
        ack_seconds: done.then(|| latest.duration_since(published).unwrap_or_default().as_secs_f64()),
        proxies: counted.len(),
        pending,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    fn policy(yaml: &str) -> TrafficPolicy {
        let ids = [ClusterId::new("aws-use1"), ClusterId::new("azure-weu")];
        TrafficPolicy::parse(&serde_yaml::from_str(yaml).unwrap(), &ids, t(0)).unwrap()
    }

    fn health(aws: (u32, u32), azure: (u32, u32)) -> BTreeMap<ClusterId, ClusterHealth> {
        let h = |(healthy, total): (u32, u32), r: &str| ClusterHealth {
            healthy,
            total,
            regions: [std::sync::Arc::from(r)].into_iter().collect(),
        };
        [(ClusterId::new("aws-use1"), h(aws, "us-east-1")), (ClusterId::new("azure-weu"), h(azure, "westeurope"))]
            .into_iter()
            .collect()
    }

    const SPLIT: &str = "policies: [{split: {us-east-1: {aws-use1: 70, azure-weu: 30}}}]\n";
    const DRILL: &str =
        "drains: [{cluster: azure-weu, drill: {abortBelowHealthy: 50}, expires: '2027-01-16T00:00:00Z'}]";

    #[test]
    fn a_drill_aborts_when_a_receiving_cluster_falls_below_its_threshold() {
        for base in [SPLIT, ""] {
            let p = policy(&format!("{base}{DRILL}"));
            let d = &p.drains[0];
            assert_eq!(d.drill.as_ref().map(|x| x.abort_below_healthy), Some(50));
            let ok = health((2, 4), (0, 4));
            assert_eq!(abort_reason(&p, d, [("a.shop", &ok)]), None, "{base}: 50% is not below 50%");
            let bad = health((1, 4), (4, 4));
            let why = abort_reason(&p, d, [("a.shop", &ok), ("b.shop", &bad)]).expect(base);
            assert!(why.contains("aws-use1") && why.contains("b.shop") && why.contains("25%"), "{why}");
            // the drained cluster's own health does not count
            assert_eq!(abort_reason(&p, d, [("a.shop", &health((4, 4), (0, 4)))]), None);
        }
        // a split row where the receiver has share 0 does not make it a receiver
        let p = policy(&format!("policies: [{{split: {{us-east-1: {{aws-use1: 0, azure-weu: 100}}}}}}]\n{DRILL}"));
        assert_eq!(abort_reason(&p, &p.drains[0], [("a.shop", &health((0, 4), (4, 4)))]), None);
        // a drain without drill, or with threshold 0, never aborts
        let p = policy(&format!("{SPLIT}{}", DRILL.replace("drill: {abortBelowHealthy: 50}, ", "")));
        assert_eq!(abort_reason(&p, &p.drains[0], [("a.shop", &health((0, 4), (4, 4)))]), None);
        let p = policy(&format!("{SPLIT}{}", DRILL.replace("50", "0")));
        assert_eq!(abort_reason(&p, &p.drains[0], [("a.shop", &health((0, 4), (4, 4)))]), None);
    }

    #[test]
    fn steps_are_recorded_once_and_carry_their_push() {
        let p = policy(DRILL);
        let mut r = Report::new(&p.drains[0], t(0));
        r.record(50, t(0));
        r.record(50, t(1));
        r.published(7, t(2));
        r.record(0, t(10));
        r.record(0, t(11));
        assert_eq!(r.steps.len(), 2);
        assert_eq!((r.steps[0].generation, r.steps[0].published_at), (7, Some(t(2))));
        assert_eq!((r.steps[1].generation, r.steps[1].published_at), (0, None));
        r.published(9, t(12));
        assert_eq!(r.steps[1].generation, 9);
        assert_eq!(r.steps[0].generation, 7, "a published step keeps its push");
        assert!(r.active());
    }

    #[test]
    fn a_step_is_all_acked_when_every_proxy_connected_at_its_publish_has_acked_it() {
        let step = Step { capacity: 50, decided_at: t(10), generation: 5, published_at: Some(t(10)) };
        let a = ProxyAcks {
            proxy: "a".into(),
            connected_at: Some(t(0)),
            acked: vec![(4, t(5)), (5, t(12))],
            seen_generation: 5,
            sent_generation: 5,
            in_sync: true,
        };
        let b = ProxyAcks {
            proxy: "b".into(),
            connected_at: Some(t(0)),
            acked: vec![(4, t(5))],
            seen_generation: 5,
            sent_generation: 5,
            in_sync: false,
        };
        // c was sent nothing by that push (its scope did not change) and holds what it was sent
        let c = ProxyAcks { proxy: "c".into(), seen_generation: 5, sent_generation: 3, in_sync: true, ..b.clone() };
        // d connected later: not counted
        let d = ProxyAcks { proxy: "d".into(), connected_at: Some(t(11)), ..b.clone() };
        let s = step_acks(&step, &[a.clone(), b.clone(), c.clone(), d.clone()]).unwrap();
        assert_eq!((s.all_acked_at, s.proxies, s.pending.clone()), (None, 3, vec!["b".to_string()]));
        // b acks generation 6 (a later push): that includes the step
        let b = ProxyAcks { acked: vec![(4, t(5)), (6, t(14))], in_sync: true, ..b };
        let s = step_acks(&step, &[a, b, c, d]).unwrap();
        assert_eq!(s.all_acked_at, Some(t(14)));
        assert_eq!(s.ack_seconds, Some(4.0));
        // an unpublished step has no acks yet
        assert!(step_acks(&Step { published_at: None, ..step }, &[]).is_none());
    }
}
