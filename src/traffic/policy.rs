//! The `traffic:` section of the mesh config, parsed and validated:
//!
//! ```yaml
//! traffic:
//!   lastResort: true                 # a cluster at share 0 keeps its endpoints at a last priority
//!   maxDrainDuration: 7d             # a drain's expiry is at most this far ahead
//!   policies:
//!     - hosts: ["*.shop.svc.cluster.local"]        # default: every service
//!       split:                                       # per source region: share per cluster (sums to 100)
//!         us-east-1:  {aws-use1: 70, azure-weu: 30}
//!         westeurope: {azure-weu: 70, aws-use1: 30}
//!       failover: {minHealthy: 50, failbackAfter: 2m}
//!   drains:
//!     - cluster: azure-weu           # or region: westeurope
//!       capacity: 0                  # % of its normal share, 0..100
//!       ramp: {step: 25, every: 30s}
//!       start: "2026-12-05T10:00:00Z" # optional: default when meshfed first saw the drain
//!       expires: "2026-12-06T00:00:00Z"
//!       reason: DR drill
//!       drill: {abortBelowHealthy: 50} # optional: a drill (aborts by itself, see traffic::drill); meshfed
//!                                      # adds `aborted: {at, reason}` to a TrafficPolicy's drill it aborted
//! ```
//!
//! Errors name the field path (`traffic.drains[0].capacity: ...`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::duration::parse_duration;
use crate::model::ClusterId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Error {
    /// the field's path, e.g. `traffic.drains[0].capacity`
    pub field: String,
    pub reason: String,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error { field: field.into(), reason: reason.into() }
}

/// Default of `maxDrainDuration`.
pub const DEFAULT_MAX_DRAIN_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The validated `traffic:` section (default: no policy, no drain).
#[derive(Clone, Debug, PartialEq)]
pub struct TrafficPolicy {
    /// in order: a service takes the first policy whose hosts match it
    pub policies: Vec<SplitPolicy>,
    pub drains: Vec<Drain>,
    /// a cluster whose share is 0 keeps its endpoints at a last-resort priority (else they are left out)
    pub last_resort: bool,
    pub max_drain_duration: Duration,
}

impl Default for TrafficPolicy {
    fn default() -> Self {
        TrafficPolicy {
            policies: Vec::new(),
            drains: Vec::new(),
            last_resort: true,
            max_drain_duration: DEFAULT_MAX_DRAIN_DURATION,
        }
    }
}

/// One entry of `policies`.
#[derive(Clone, Debug, PartialEq)]
pub struct SplitPolicy {
    /// host patterns: an FQDN, `*.SUFFIX`, or `*`; empty: every service
    pub hosts: Vec<String>,
    /// source region -> cluster -> share in percent (each row sums to 100)
    pub split: BTreeMap<Arc<str>, BTreeMap<ClusterId, u32>>,
    pub failover: Option<Failover>,
}

/// `failover`: a cluster below `min_healthy` percent of its endpoints healthy loses its share until it
/// has been at or above it for `failback_after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failover {
    pub min_healthy: u32,
    pub failback_after: Duration,
}

/// What a drain applies to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DrainTarget {
    Cluster(ClusterId),
    Region(Arc<str>),
}

impl std::fmt::Display for DrainTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DrainTarget::Cluster(c) => write!(f, "cluster {c}"),
            DrainTarget::Region(r) => write!(f, "region {r}"),
        }
    }
}

/// `ramp`: capacity decreases from 100 by `step` every `every`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ramp {
    pub step: u32,
    pub every: Duration,
}

/// One entry of `drains`.
#[derive(Clone, Debug, PartialEq)]
pub struct Drain {
    pub target: DrainTarget,
    /// percent of the target's normal share, 0..=100
    pub capacity: u32,
    pub ramp: Option<Ramp>,
    /// when the ramp starts (None: when the push loop first sees the drain, see [`TrafficPolicy::stamp`])
    pub start: Option<SystemTime>,
    pub expires: SystemTime,
    pub reason: String,
    /// a drill ([`super::drill`]): aborts by itself when a cluster taking the drained traffic falls below
    /// `abortBelowHealthy` percent healthy
    pub drill: Option<Drill>,
}

/// `drill: {abortBelowHealthy: N, aborted: {at, reason}}` of a drain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drill {
    /// percent, 0..=100 (0: never aborts by itself)
    pub abort_below_healthy: u32,
    /// the abort meshfed recorded in the TrafficPolicy (see [`super::abort_record`]): the drill no longer
    /// applies, on every replica and after a restart
    pub aborted: Option<RecordedAbort>,
}

/// `drill.aborted` of a drain: when and why the drill aborted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedAbort {
    pub at: SystemTime,
    pub reason: String,
}

impl Drain {
    /// The capacity in percent at `now` (100 before the start; expired drains are not asked).
    pub fn capacity_at(&self, now: SystemTime) -> u32 {
        let start = self.start.unwrap_or(now);
        match self.ramp {
            None => {
                if now >= start {
                    self.capacity
                } else {
                    100
                }
            }
            Some(_) if now < start => 100,
            Some(r) => {
                let elapsed = now.duration_since(start).unwrap_or_default();
                let steps = (elapsed.as_nanos() / r.every.as_nanos().max(1)) as u64 + 1;
                let down = steps.saturating_mul(r.step as u64).min(100) as u32;
                (100 - down).max(self.capacity)
            }
        }
    }

    /// When the capacity changes next after `now` (the next ramp step), if it does.
    pub fn next_step(&self, now: SystemTime) -> Option<SystemTime> {
        let r = self.ramp?;
        let start = self.start.unwrap_or(now);
        if self.capacity_at(now) <= self.capacity {
            return None;
        }
        if now < start {
            return Some(start);
        }
        let elapsed = now.duration_since(start).unwrap_or_default();
        let n = (elapsed.as_nanos() / r.every.as_nanos().max(1)) as u32 + 1;
        r.every.checked_mul(n).and_then(|d| start.checked_add(d))
    }

    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.expires
    }

    /// The same drain apart from its start (two versions of a policy name the same drain).
    fn same_as(&self, other: &Drain) -> bool {
        self.target == other.target
            && self.capacity == other.capacity
            && self.ramp == other.ramp
            && self.expires == other.expires
            && self.reason == other.reason
            && self.drill.as_ref().map(|d| d.abort_below_healthy) == other.drill.as_ref().map(|d| d.abort_below_healthy)
    }
}

/// A duration as [`parse_duration`] reads it, or in days (`7d`).
pub(crate) fn parse_long_duration(s: &str) -> Option<Duration> {
    match s.trim().strip_suffix('d') {
        Some(days) => {
            let d: f64 = days.parse().ok()?;
            (d.is_finite() && (0.0..=36_500.0).contains(&d)).then(|| Duration::from_secs_f64(d * 86_400.0))
        }
        None => parse_duration(s),
    }
}

/// Does `host` match a policy host pattern (`*`, `*.SUFFIX`, or the exact FQDN)?
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
        None => pattern == host,
    }
}

impl TrafficPolicy {
    /// Whether the section sets anything.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty() && self.drains.is_empty()
    }

    /// The policy that covers `host` (the first whose hosts match; empty hosts match every service).
    pub fn policy_for(&self, host: &str) -> Option<&SplitPolicy> {
        self.policies.iter().find(|p| p.hosts.is_empty() || p.hosts.iter().any(|h| host_matches(h, host)))
    }

    /// Every cluster the policy names (in splits and drains).
    pub fn clusters_named(&self) -> std::collections::BTreeSet<ClusterId> {
        let mut out: std::collections::BTreeSet<ClusterId> =
            self.policies.iter().flat_map(|p| p.split.values().flat_map(|row| row.keys().cloned())).collect();
        out.extend(self.drains.iter().filter_map(|d| match &d.target {
            DrainTarget::Cluster(c) => Some(c.clone()),
            DrainTarget::Region(_) => None,
        }));
        out
    }

    /// The clusters the policy names that are not in `known` (the registry's clusters): with remote
    /// secrets they are accepted at parse time and reported at run time.
    pub fn unknown_clusters<'a>(&self, known: impl IntoIterator<Item = &'a ClusterId>) -> Vec<ClusterId> {
        let known: std::collections::BTreeSet<&ClusterId> = known.into_iter().collect();
        self.clusters_named().into_iter().filter(|c| !known.contains(c)).collect()
    }

    /// Gives every drain without a start one: its start in `previous` if that policy had the same drain,
    /// else `now`. The push loop calls it when it takes a new policy, so a ramp starts when the drain is
    /// first seen and an unrelated edit does not restart it.
    pub fn stamp(&mut self, previous: &TrafficPolicy, now: SystemTime) {
        for d in self.drains.iter_mut().filter(|d| d.start.is_none()) {
            let before = previous.drains.iter().find(|p| p.same_as(d)).and_then(|p| p.start);
            d.start = Some(before.unwrap_or(now));
        }
    }

    /// Parses and validates a `traffic:` section: `clusters` are the mesh's cluster ids; `now` bounds the
    /// drains' expiry (`maxDrainDuration` ahead at most).
    pub fn parse(value: &serde_yaml::Value, clusters: &[ClusterId], now: SystemTime) -> Result<TrafficPolicy, Error> {
        Self::parse_with(value, clusters, false, now)
    }

    /// [`TrafficPolicy::parse`]; with `dynamic_clusters` (the mesh discovers clusters from remote
    /// secrets) a cluster id not in `clusters` is accepted: it cannot be checked before the secrets are
    /// read, and the debug surface reports a policy naming a cluster the registry does not know
    /// ([`TrafficPolicy::unknown_clusters`]).
    pub fn parse_with(
        value: &serde_yaml::Value,
        clusters: &[ClusterId],
        dynamic_clusters: bool,
        now: SystemTime,
    ) -> Result<TrafficPolicy, Error> {
        let raw: RawTraffic = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "traffic".to_string() } else { format!("traffic.{path}") };
            err(field, e.into_inner().to_string())
        })?;
        let mut out = TrafficPolicy { last_resort: raw.last_resort.unwrap_or(true), ..TrafficPolicy::default() };
        if let Some(m) = raw.max_drain_duration {
            out.max_drain_duration = parse_long_duration(&m)
                .ok_or_else(|| err("traffic.maxDrainDuration", format!("invalid duration {m:?}")))?;
        }
        let known = |field: &str, id: &str| -> Result<ClusterId, Error> {
            if id.is_empty() {
                return Err(err(field, "an empty cluster id"));
            }
            if dynamic_clusters || clusters.iter().any(|c| c.as_str() == id) {
                Ok(ClusterId::new(id))
            } else {
                let list: Vec<&str> = clusters.iter().map(|c| c.as_str()).collect();
                Err(err(field, format!("unknown cluster {id:?} (the mesh's clusters: {})", list.join(", "))))
            }
        };
        for (i, p) in raw.policies.into_iter().enumerate() {
            let at = format!("traffic.policies[{i}]");
            for (j, h) in p.hosts.iter().enumerate() {
                if h.is_empty() || h.chars().skip(1).any(|c| c == '*') {
                    return Err(err(format!("{at}.hosts[{j}]"), format!("{h:?}: a FQDN, `*.SUFFIX` or `*`")));
                }
            }
            let mut split = BTreeMap::new();
            for (region, row) in p.split {
                let field = format!("{at}.split.{region}");
                if region.is_empty() {
                    return Err(err(format!("{at}.split"), "an empty source region"));
                }
                let mut shares = BTreeMap::new();
                for (cluster, share) in row {
                    let id = known(&format!("{field}.{cluster}"), &cluster)?;
                    if share > 100 {
                        return Err(err(format!("{field}.{cluster}"), format!("{share} is more than 100")));
                    }
                    shares.insert(id, share);
                }
                let sum: u32 = shares.values().sum();
                if sum != 100 {
                    return Err(err(field, format!("the shares add up to {sum}, not 100")));
                }
                split.insert(Arc::from(region.as_str()), shares);
            }
            let failover = match p.failover {
                None => None,
                Some(f) => {
                    let min_healthy = f.min_healthy.unwrap_or(50);
                    if min_healthy > 100 {
                        return Err(err(
                            format!("{at}.failover.minHealthy"),
                            format!("{min_healthy} is more than 100"),
                        ));
                    }
                    let failback_after = match f.failback_after {
                        None => Duration::ZERO,
                        Some(d) => parse_duration(&d).ok_or_else(|| {
                            err(format!("{at}.failover.failbackAfter"), format!("invalid duration {d:?}"))
                        })?,
                    };
                    Some(Failover { min_healthy, failback_after })
                }
            };
            out.policies.push(SplitPolicy { hosts: p.hosts, split, failover });
        }
        for (i, d) in raw.drains.into_iter().enumerate() {
            let at = format!("traffic.drains[{i}]");
            let target = match (d.cluster, d.region) {
                (Some(c), None) => DrainTarget::Cluster(known(&format!("{at}.cluster"), &c)?),
                (None, Some(r)) if !r.is_empty() => DrainTarget::Region(r.as_str().into()),
                (None, Some(_)) => return Err(err(format!("{at}.region"), "empty")),
                (None, None) => return Err(err(&at, "set `cluster` or `region`")),
                (Some(_), Some(_)) => return Err(err(&at, "set `cluster` or `region`, not both")),
            };
            let capacity = match d.capacity {
                None => 0,
                Some(c) if (0..=100).contains(&c) => c as u32,
                Some(c) => return Err(err(format!("{at}.capacity"), format!("{c} is not in 0..100"))),
            };
            let ramp = match d.ramp {
                None => None,
                Some(r) => {
                    let step = r.step.ok_or_else(|| err(format!("{at}.ramp.step"), "missing"))?;
                    if !(1..=100).contains(&step) {
                        return Err(err(format!("{at}.ramp.step"), format!("{step} is not in 1..100")));
                    }
                    let every = r.every.ok_or_else(|| err(format!("{at}.ramp.every"), "missing"))?;
                    let every = parse_duration(&every)
                        .ok_or_else(|| err(format!("{at}.ramp.every"), format!("invalid duration {every:?}")))?;
                    if every.is_zero() {
                        return Err(err(format!("{at}.ramp.every"), "must be more than 0"));
                    }
                    Some(Ramp { step: step as u32, every })
                }
            };
            let time = |field: &str, v: &str| -> Result<SystemTime, Error> {
                let t: jiff::Timestamp = v
                    .parse()
                    .map_err(|e| err(format!("{at}.{field}"), format!("{v:?} is not an RFC 3339 time: {e}")))?;
                Ok(SystemTime::from(t))
            };
            let start = d.start.as_deref().map(|s| time("start", s)).transpose()?;
            let expires = match d.expires.as_deref() {
                None => {
                    return Err(err(
                        format!("{at}.expires"),
                        format!("required (at most maxDrainDuration, {:?}, ahead)", out.max_drain_duration),
                    ));
                }
                Some(e) => time("expires", e)?,
            };
            if now.checked_add(out.max_drain_duration).is_some_and(|limit| expires > limit) {
                return Err(err(
                    format!("{at}.expires"),
                    format!("more than maxDrainDuration ({:?}) ahead", out.max_drain_duration),
                ));
            }
            let drill = match d.drill {
                None => None,
                Some(dr) => {
                    let abort_below_healthy = match dr.abort_below_healthy {
                        None => 0,
                        Some(n) if (0..=100).contains(&n) => n as u32,
                        Some(n) => {
                            return Err(err(format!("{at}.drill.abortBelowHealthy"), format!("{n} is not in 0..100")));
                        }
                    };
                    let aborted = match dr.aborted {
                        None => None,
                        Some(a) => Some(RecordedAbort {
                            at: time(
                                "drill.aborted.at",
                                a.at.as_deref().ok_or_else(|| err(format!("{at}.drill.aborted.at"), "missing"))?,
                            )?,
                            reason: a.reason.unwrap_or_default(),
                        }),
                    };
                    Some(Drill { abort_below_healthy, aborted })
                }
            };
            out.drains.push(Drain {
                target,
                capacity,
                ramp,
                start,
                expires,
                reason: d.reason.unwrap_or_default(),
                drill,
            });
        }
        Ok(out)
    }
}

// ---- the file format ----

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTraffic {
    #[serde(default)]
    policies: Vec<RawPolicy>,
    #[serde(default)]
    drains: Vec<RawDrain>,
    #[serde(default)]
    last_resort: Option<bool>,
    #[serde(default)]
    max_drain_duration: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    split: BTreeMap<String, BTreeMap<String, u32>>,
    #[serde(default)]
    failover: Option<RawFailover>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawFailover {
    #[serde(default)]
    min_healthy: Option<u32>,
    #[serde(default)]
    failback_after: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDrain {
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    capacity: Option<i64>,
    #[serde(default)]
    ramp: Option<RawRamp>,
    #[serde(default)]
    start: Option<String>,
    #[serde(default)]
    expires: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    drill: Option<RawDrill>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDrill {
    #[serde(default)]
    abort_below_healthy: Option<i64>,
    #[serde(default)]
    aborted: Option<RawAbort>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAbort {
    #[serde(default)]
    at: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRamp {
    #[serde(default)]
    step: Option<i64>,
    #[serde(default)]
    every: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clusters() -> Vec<ClusterId> {
        vec![ClusterId::new("aws-use1"), ClusterId::new("azure-weu")]
    }

    /// 2026-12-05T00:00:00Z
    fn now() -> SystemTime {
        SystemTime::from("2026-12-05T00:00:00Z".parse::<jiff::Timestamp>().unwrap())
    }

    fn parse(yaml: &str) -> Result<TrafficPolicy, Error> {
        TrafficPolicy::parse(&serde_yaml::from_str(yaml).unwrap(), &clusters(), now())
    }

    const ISSUE: &str = r#"
policies:
  - hosts: ["*.shop.svc.cluster.local"]
    split:
      us-east-1:  {aws-use1: 70, azure-weu: 30}
      westeurope: {azure-weu: 70, aws-use1: 30}
    failover:
      minHealthy: 50
      failbackAfter: 2m
drains:
  - cluster: azure-weu
    capacity: 0
    ramp: {step: 25, every: 30s}
    expires: "2026-12-06T00:00:00Z"
    reason: DR drill
"#;

    #[test]
    fn the_issue_example_parses() {
        let p = parse(ISSUE).unwrap();
        assert_eq!(p.policies.len(), 1);
        let s = &p.policies[0];
        assert_eq!(s.split["us-east-1"][&ClusterId::new("aws-use1")], 70);
        assert_eq!(s.failover, Some(Failover { min_healthy: 50, failback_after: Duration::from_secs(120) }));
        let d = &p.drains[0];
        assert_eq!(d.target, DrainTarget::Cluster(ClusterId::new("azure-weu")));
        assert_eq!(d.ramp, Some(Ramp { step: 25, every: Duration::from_secs(30) }));
        assert_eq!(d.expires, now() + Duration::from_secs(86_400));
        assert!(p.last_resort);
        assert!(p.policy_for("reviews.shop.svc.cluster.local").is_some());
        assert!(p.policy_for("reviews.other.svc.cluster.local").is_none());
    }

    #[test]
    fn bad_edits_name_their_field() {
        for (yaml, field, words) in [
            (
                "policies: [{split: {us-east-1: {aws-use1: 70, azure-weu: 20}}}]",
                "traffic.policies[0].split.us-east-1",
                "add up to 90",
            ),
            (
                "policies: [{split: {us-east-1: {aws-use1: 70, gcp: 30}}}]",
                "traffic.policies[0].split.us-east-1.gcp",
                "unknown cluster",
            ),
            (
                "policies: [{split: {us-east-1: {aws-use1: 170}}}]",
                "traffic.policies[0].split.us-east-1.aws-use1",
                "more than 100",
            ),
            ("policies: [{failover: {minHealthy: 101}}]", "traffic.policies[0].failover.minHealthy", "more than 100"),
            ("policies: [{failover: {failbackAfter: soon}}]", "traffic.policies[0].failover.failbackAfter", "invalid"),
            ("policies: [{hosts: ['a.*.b']}]", "traffic.policies[0].hosts[0]", "FQDN"),
            (
                "drains: [{cluster: azure-weu, capacity: -5, expires: '2026-12-05T01:00:00Z'}]",
                "traffic.drains[0].capacity",
                "not in 0..100",
            ),
            (
                "drains: [{cluster: azure-weu, capacity: 101, expires: '2026-12-05T01:00:00Z'}]",
                "traffic.drains[0].capacity",
                "not in 0..100",
            ),
            (
                "drains: [{cluster: gcp, expires: '2026-12-05T01:00:00Z'}]",
                "traffic.drains[0].cluster",
                "unknown cluster",
            ),
            ("drains: [{cluster: azure-weu}]", "traffic.drains[0].expires", "required"),
            (
                "drains: [{cluster: azure-weu, expires: '2027-01-05T00:00:00Z'}]",
                "traffic.drains[0].expires",
                "maxDrainDuration",
            ),
            ("drains: [{cluster: azure-weu, expires: tomorrow}]", "traffic.drains[0].expires", "RFC 3339"),
            (
                "drains: [{cluster: azure-weu, drill: {aborted: {reason: x}}, expires: '2026-12-05T01:00:00Z'}]",
                "traffic.drains[0].drill.aborted.at",
                "missing",
            ),
            (
                "drains: [{cluster: azure-weu, drill: {aborted: {at: soon}}, expires: '2026-12-05T01:00:00Z'}]",
                "traffic.drains[0].drill.aborted.at",
                "RFC 3339",
            ),
            (
                "drains: [{cluster: azure-weu, ramp: {step: 0, every: 1s}, expires: '2026-12-05T01:00:00Z'}]",
                "traffic.drains[0].ramp.step",
                "1..100",
            ),
            (
                "drains: [{cluster: azure-weu, ramp: {step: 10, every: 0s}, expires: '2026-12-05T01:00:00Z'}]",
                "traffic.drains[0].ramp.every",
                "more than 0",
            ),
            ("drains: [{expires: '2026-12-05T01:00:00Z'}]", "traffic.drains[0]", "`cluster` or `region`"),
            (
                "drains: [{cluster: azure-weu, region: westeurope, expires: '2026-12-05T01:00:00Z'}]",
                "traffic.drains[0]",
                "not both",
            ),
            (
                "drains: [{cluster: azure-weu, drill: {abortBelowHealthy: 101}, expires: '2026-12-05T01:00:00Z'}]",
                "traffic.drains[0].drill.abortBelowHealthy",
                "not in 0..100",
            ),
            (
                "drains: [{cluster: azure-weu, drill: {abortBelow: 5}, expires: '2026-12-05T01:00:00Z'}]",
                "traffic.drains[0].drill.abortBelow",
                "unknown field",
            ),
            ("maxDrainDuration: forever", "traffic.maxDrainDuration", "invalid"),
            ("polices: []", "traffic.polices", "unknown field"),
            ("drains: [{cluster: azure-weu, capacty: 5}]", "traffic.drains[0].capacty", "unknown field"),
        ] {
            let e = parse(yaml).expect_err(yaml);
            assert_eq!(e.field, field, "{yaml}: {e}");
            assert!(e.to_string().contains(words), "{yaml}: {e}");
        }
        // durations beyond what a clock holds are no panic
        let far = "policies: [{failover: {failbackAfter: 100000000000000h}}]\nmaxDrainDuration: 100000000000000h\n\
                   drains: [{cluster: azure-weu, ramp: {step: 1, every: 100000000000000h}, expires: '2026-12-05T01:00:00Z'}]";
        let mut p = parse(far).unwrap();
        p.stamp(&TrafficPolicy::default(), now());
        assert_eq!(p.drains[0].capacity_at(now()), 99);
        let _ = p.drains[0].next_step(now());
        // a longer maximum allows a later expiry
        assert!(
            parse("maxDrainDuration: 60d\ndrains: [{cluster: azure-weu, expires: '2027-01-05T00:00:00Z'}]").is_ok()
        );
    }

    #[test]
    fn dynamic_clusters_accept_unknown_ids_and_report_them() {
        let yaml: serde_yaml::Value =
            serde_yaml::from_str("policies: [{split: {us-east-1: {aws-use1: 60, gke-remote: 40}}}]").unwrap();
        let e = TrafficPolicy::parse_with(&yaml, &clusters(), false, now()).unwrap_err();
        assert_eq!(e.field, "traffic.policies[0].split.us-east-1.gke-remote");
        let p = TrafficPolicy::parse_with(&yaml, &clusters(), true, now()).unwrap();
        assert_eq!(p.unknown_clusters(&clusters()), vec![ClusterId::new("gke-remote")]);
        let all = [ClusterId::new("aws-use1"), ClusterId::new("gke-remote")];
        assert!(p.unknown_clusters(&all).is_empty());
        // the other checks still hold
        let bad: serde_yaml::Value =
            serde_yaml::from_str("policies: [{split: {us-east-1: {aws-use1: 60, gke-remote: 30}}}]").unwrap();
        assert!(TrafficPolicy::parse_with(&bad, &clusters(), true, now()).unwrap_err().reason.contains("90"));
    }

    #[test]
    fn a_recorded_abort_is_read_and_does_not_make_another_drain() {
        let yaml = "drains: [{cluster: azure-weu, start: '2026-12-05T00:00:00Z', expires: '2026-12-05T01:00:00Z', \
                    drill: {abortBelowHealthy: 50, aborted: {at: '2026-12-05T00:10:00Z', reason: 'aws-use1 below 50%'}}}]";
        let p = parse(yaml).unwrap();
        let drill = p.drains[0].drill.clone().unwrap();
        assert_eq!(drill.abort_below_healthy, 50);
        let rec = drill.aborted.expect("recorded");
        assert_eq!(rec.reason, "aws-use1 below 50%");
        assert_eq!(rec.at, now() + Duration::from_secs(600));
        // the same drain with and without the record: one drain (the record does not restart it)
        let mut plain = p.drains[0].clone();
        plain.drill.as_mut().unwrap().aborted = None;
        assert!(plain.same_as(&p.drains[0]));
    }

    #[test]
    fn a_ramp_steps_down_to_the_capacity() {
        let mut p = parse(ISSUE).unwrap();
        p.stamp(&TrafficPolicy::default(), now());
        let d = &p.drains[0];
        let at = |s: u64| now() + Duration::from_secs(s);
        assert_eq!(d.capacity_at(at(0)), 75);
        assert_eq!(d.capacity_at(at(29)), 75);
        assert_eq!(d.capacity_at(at(30)), 50);
        assert_eq!(d.capacity_at(at(60)), 25);
        assert_eq!(d.capacity_at(at(90)), 0);
        assert_eq!(d.capacity_at(at(9000)), 0);
        assert_eq!(d.next_step(at(0)), Some(at(30)));
        assert_eq!(d.next_step(at(45)), Some(at(60)));
        assert_eq!(d.next_step(at(90)), None);
        // a start ahead: 100% until then, the first step at the start
        let later = Drain { start: Some(at(100)), ..d.clone() };
        assert_eq!(later.capacity_at(at(99)), 100);
        assert_eq!(later.next_step(at(50)), Some(at(100)));
        assert_eq!(later.capacity_at(at(100)), 75);
        // no ramp: the capacity at once
        let d = Drain { ramp: None, capacity: 40, ..d.clone() };
        assert_eq!(d.capacity_at(at(0)), 40);
        assert_eq!(d.next_step(at(0)), None);
    }

    #[test]
    fn stamping_keeps_the_start_of_an_unchanged_drain() {
        let mut first = parse(ISSUE).unwrap();
        first.stamp(&TrafficPolicy::default(), now());
        let later = now() + Duration::from_secs(45);
        let mut again = parse(ISSUE).unwrap();
        again.stamp(&first, later);
        assert_eq!(again.drains[0].start, Some(now()));
        let mut changed = parse(&ISSUE.replace("capacity: 0", "capacity: 10")).unwrap();
        changed.stamp(&first, later);
        assert_eq!(changed.drains[0].start, Some(later));
    }

    #[test]
    fn host_patterns() {
        assert!(host_matches("*", "a.b"));
        assert!(host_matches("*.shop.svc.cluster.local", "reviews.shop.svc.cluster.local"));
        assert!(!host_matches("*.shop.svc.cluster.local", "shop.svc.cluster.local"));
        assert!(host_matches("reviews.shop.svc.cluster.local", "reviews.shop.svc.cluster.local"));
        assert!(!host_matches("reviews.shop.svc.cluster.local", "ratings.shop.svc.cluster.local"));
    }
}
