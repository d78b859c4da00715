//! The evidence about east-west gateways, as a pure state machine: probe results in, per-address state
//! and per-network verdicts out. No I/O, no clock (the caller passes `now`).
//!
//! An address becomes down after `failure_threshold` failed probes in a row, and up again after
//! `success_threshold` successful probes in a row once `hold_down` has passed since it went down
//! (hysteresis: a flapping gateway does not move traffic back and forth). An address with no verdict
//! yet counts as up. A network is fenced when it has gateway addresses and all of them are down.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::mesh_config::GatewayProbes;
use crate::model::NetworkId;

/// What one probe of an address found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeResult {
    pub ok: bool,
    /// when the probe ended (wall clock, for display)
    #[serde(skip)]
    pub at: SystemTime,
    /// why it failed
    pub error: Option<String>,
}

impl ProbeResult {
    pub fn success(at: SystemTime) -> ProbeResult {
        ProbeResult { ok: true, at, error: None }
    }

    pub fn failure(at: SystemTime, error: impl Into<String>) -> ProbeResult {
        ProbeResult { ok: false, at, error: Some(error.into()) }
    }
}

/// An address's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressState {
    /// not probed enough yet to decide (counts as up)
    Unknown,
    Up,
    Down,
}

/// What is known about one gateway address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressEvidence {
    pub state: AddressState,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    pub last: Option<ProbeResult>,
    /// when it last went down (monotonic; the hold-down counts from here)
    pub down_since: Option<Instant>,
    /// the same instant on the wall clock (for display)
    pub down_since_wall: Option<SystemTime>,
}

impl Default for AddressEvidence {
    fn default() -> Self {
        AddressEvidence {
            state: AddressState::Unknown,
            consecutive_failures: 0,
            consecutive_successes: 0,
            last: None,
            down_since: None,
            down_since_wall: None,
        }
    }
}

impl AddressEvidence {
    pub fn is_down(&self) -> bool {
        self.state == AddressState::Down
    }
}

/// The thresholds of the state machine (from [`GatewayProbes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub failure: u32,
    pub success: u32,
    pub hold_down: Duration,
}

impl From<&GatewayProbes> for Thresholds {
    fn from(g: &GatewayProbes) -> Self {
        Thresholds { failure: g.failure_threshold.max(1), success: g.success_threshold.max(1), hold_down: g.hold_down }
    }
}

/// What translation needs from the evidence: the addresses that are down and the networks fenced.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// per network, its gateway addresses (ip, port) that are down (networks without one: absent)
    pub down: BTreeMap<NetworkId, BTreeSet<SocketAddr>>,
    /// networks whose gateway addresses are all down
    pub fenced: BTreeSet<NetworkId>,
    /// networks with at least one gateway address that is not down (probing on and reachable)
    pub reachable: BTreeSet<NetworkId>,
}

impl Verdict {
    /// The networks whose verdict differs between `self` and `other`: fenced or reachable flipped, or
    /// one of their addresses changed state.
    pub fn networks_changed(&self, other: &Verdict) -> BTreeSet<NetworkId> {
        let mut out: BTreeSet<NetworkId> = self.fenced.symmetric_difference(&other.fenced).cloned().collect();
        out.extend(self.reachable.symmetric_difference(&other.reachable).cloned());
        for n in self.down.keys().chain(other.down.keys()) {
            if self.down.get(n) != other.down.get(n) {
                out.insert(n.clone());
            }
        }
        out
    }

    /// Is this address of `network`'s gateways down?
    pub fn is_down(&self, network: &NetworkId, address: SocketAddr) -> bool {
        self.down.get(network).is_some_and(|d| d.contains(&address))
    }
}

/// The evidence about every network's gateway addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Evidence {
    networks: BTreeMap<NetworkId, BTreeMap<SocketAddr, AddressEvidence>>,
}

impl Evidence {
    /// Sets which addresses each network's gateways have: new ones start unknown, gone ones are forgotten.
    pub fn set_targets(&mut self, targets: &BTreeMap<NetworkId, BTreeSet<SocketAddr>>) {
        self.networks.retain(|n, _| targets.contains_key(n));
        for (network, addresses) in targets {
            let known = self.networks.entry(network.clone()).or_default();
            known.retain(|a, _| addresses.contains(a));
            for a in addresses {
                known.entry(*a).or_default();
            }
        }
    }

    /// Records one probe of `address` (of every network that has it) at `now`; returns true if the
    /// address's state changed.
    pub fn record(&mut self, address: SocketAddr, result: ProbeResult, now: Instant, t: Thresholds) -> bool {
        let mut changed = false;
        for addresses in self.networks.values_mut() {
            if let Some(e) = addresses.get_mut(&address) {
                changed |= step(e, result.clone(), now, t);
            }
        }
        changed
    }

    /// The networks with gateway address `address`.
    pub fn networks_of(&self, address: &SocketAddr) -> Vec<NetworkId> {
        self.networks.iter().filter(|(_, a)| a.contains_key(address)).map(|(n, _)| n.clone()).collect()
    }

    /// Every network's addresses with their evidence.
    pub fn networks(&self) -> &BTreeMap<NetworkId, BTreeMap<SocketAddr, AddressEvidence>> {
        &self.networks
    }

    /// The addresses to probe (each once).
    pub fn addresses(&self) -> BTreeSet<SocketAddr> {
        self.networks.values().flat_map(|a| a.keys().copied()).collect()
    }

    /// The current verdict.
    pub fn verdict(&self) -> Verdict {
        let mut v = Verdict::default();
        for (network, addresses) in &self.networks {
            let down: BTreeSet<SocketAddr> = addresses.iter().filter(|(_, e)| e.is_down()).map(|(a, _)| *a).collect();
            if !down.is_empty() {
                v.down.insert(network.clone(), down);
            }
            if addresses.is_empty() {
                continue;
            }
            if addresses.values().all(AddressEvidence::is_down) {
                v.fenced.insert(network.clone());
            } else {
                v.reachable.insert(network.clone());
            }
        }
        v
    }
}

/// One step of an address's state machine; returns true if its state changed.
fn step(e: &mut AddressEvidence, result: ProbeResult, now: Instant, t: Thresholds) -> bool {
    let before = e.state;
    if result.ok {
        e.consecutive_successes = e.consecutive_successes.saturating_add(1);
        e.consecutive_failures = 0;
    } else {
        e.consecutive_failures = e.consecutive_failures.saturating_add(1);
        e.consecutive_successes = 0;
    }
    let at = result.at;
    e.last = Some(result);
    match e.state {
        AddressState::Unknown | AddressState::Up => {
            if e.consecutive_failures >= t.failure {
                e.state = AddressState::Down;
                e.down_since = Some(now);
                e.down_since_wall = Some(at);
            } else if e.consecutive_successes >= 1 {
                e.state = AddressState::Up;
            }
        }
        AddressState::Down => {
            let held = e.down_since.is_none_or(|since| now.saturating_duration_since(since) >= t.hold_down);
            if e.consecutive_successes >= t.success && held {
                e.state = AddressState::Up;
                e.down_since = None;
                e.down_since_wall = None;
            }
        }
    }
    e.state != before
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds { failure: 3, success: 2, hold_down: Duration::from_secs(30) };

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn evidence(targets: &[(&str, &[&str])]) -> Evidence {
        let mut e = Evidence::default();
        let t = targets
            .iter()
            .map(|(n, a)| (NetworkId::new(n), a.iter().map(|a| addr(a)).collect::<BTreeSet<_>>()))
            .collect();
        e.set_targets(&t);
        e
    }

    fn ok() -> ProbeResult {
        ProbeResult::success(SystemTime::UNIX_EPOCH)
    }

    fn fail() -> ProbeResult {
        ProbeResult::failure(SystemTime::UNIX_EPOCH, "connection refused")
    }

    fn state(e: &Evidence, n: &str, a: &str) -> AddressState {
        e.networks()[&NetworkId::new(n)][&addr(a)].state
    }

    #[test]
    fn unknown_addresses_count_as_up_and_one_success_makes_them_up() {
        let mut e = evidence(&[("azure-net", &["10.0.0.1:15443"])]);
        assert_eq!(state(&e, "azure-net", "10.0.0.1:15443"), AddressState::Unknown);
        assert!(e.verdict().fenced.is_empty());
        assert!(e.verdict().reachable.contains(&NetworkId::new("azure-net")));
        assert!(e.record(addr("10.0.0.1:15443"), ok(), Instant::now(), T));
        assert_eq!(state(&e, "azure-net", "10.0.0.1:15443"), AddressState::Up);
    }

    #[test]
    fn down_after_exactly_failure_threshold_failures_in_a_row() {
        let a = "10.0.0.1:15443";
        let mut e = evidence(&[("n", &[a])]);
        let now = Instant::now();
        e.record(addr(a), ok(), now, T);
        assert!(!e.record(addr(a), fail(), now, T));
        assert!(!e.record(addr(a), fail(), now, T));
        // a success in between resets the count
        e.record(addr(a), ok(), now, T);
        assert!(!e.record(addr(a), fail(), now, T));
        assert!(!e.record(addr(a), fail(), now, T));
        assert_eq!(state(&e, "n", a), AddressState::Up);
        assert!(e.record(addr(a), fail(), now, T), "third failure in a row");
        assert_eq!(state(&e, "n", a), AddressState::Down);
        let ev = &e.networks()[&NetworkId::new("n")][&addr(a)];
        assert_eq!(ev.consecutive_failures, 3);
        assert_eq!(ev.last.as_ref().unwrap().error.as_deref(), Some("connection refused"));
        assert_eq!(e.verdict().fenced, [NetworkId::new("n")].into());
        assert_eq!(e.verdict().down, [(NetworkId::new("n"), [addr(a)].into())].into());
        // failures go on: no more changes
        assert!(!e.record(addr(a), fail(), now, T));
    }

    #[test]
    fn up_again_needs_success_threshold_and_hold_down() {
        let a = "10.0.0.1:15443";
        let mut e = evidence(&[("n", &[a])]);
        let t0 = Instant::now();
        for _ in 0..3 {
            e.record(addr(a), fail(), t0, T);
        }
        assert_eq!(state(&e, "n", a), AddressState::Down);
        // enough successes, but within the hold-down: still down
        for i in 1..=5 {
            assert!(!e.record(addr(a), ok(), t0 + Duration::from_secs(i), T));
        }
        assert_eq!(state(&e, "n", a), AddressState::Down);
        // hold-down over: the next success (the run of successes goes on) brings it up
        assert!(e.record(addr(a), ok(), t0 + Duration::from_secs(30), T));
        assert_eq!(state(&e, "n", a), AddressState::Up);
        assert!(e.verdict().fenced.is_empty());
    }

    #[test]
    fn after_the_hold_down_the_success_run_must_still_be_long_enough() {
        let a = "10.0.0.1:15443";
        let mut e = evidence(&[("n", &[a])]);
        let t0 = Instant::now();
        for _ in 0..3 {
            e.record(addr(a), fail(), t0, T);
        }
        let late = t0 + Duration::from_secs(60);
        assert!(!e.record(addr(a), ok(), late, T), "one success is not enough");
        assert!(!e.record(addr(a), fail(), late, T), "a failure resets the run (still down)");
        assert!(!e.record(addr(a), ok(), late, T));
        assert!(e.record(addr(a), ok(), late, T), "two in a row after the hold-down");
    }

    #[test]
    fn a_flapping_address_does_not_flap_the_verdict() {
        let a = "10.0.0.1:15443";
        let mut e = evidence(&[("n", &[a])]);
        let t0 = Instant::now();
        let mut changes = 0;
        // alternate failure/success for a long time: never 3 failures in a row, never down
        for i in 0..100 {
            let r = if i % 2 == 0 { fail() } else { ok() };
            changes += usize::from(e.record(addr(a), r, t0 + Duration::from_secs(i), T));
        }
        assert_eq!(changes, 1, "only unknown -> up");
        assert!(e.verdict().down.is_empty());
        // down, then alternating: never two successes in a row, stays down however long
        for i in 0..3 {
            e.record(addr(a), fail(), t0 + Duration::from_secs(100 + i), T);
        }
        for i in 0..100 {
            let r = if i % 2 == 0 { ok() } else { fail() };
            assert!(!e.record(addr(a), r, t0 + Duration::from_secs(200 + i), T));
        }
        assert_eq!(state(&e, "n", a), AddressState::Down);
    }

    #[test]
    fn a_network_is_fenced_only_when_all_its_addresses_are_down_and_one_up_unfences() {
        let (a, b) = ("10.0.0.1:15443", "10.0.0.2:15443");
        let mut e = evidence(&[("azure-net", &[a, b]), ("aws-net", &["10.1.0.1:15443"])]);
        let t0 = Instant::now();
        for _ in 0..3 {
            e.record(addr(a), fail(), t0, T);
        }
        let v = e.verdict();
        assert_eq!(v.down, [(NetworkId::new("azure-net"), [addr(a)].into())].into());
        assert!(v.is_down(&NetworkId::new("azure-net"), addr(a)) && !v.is_down(&NetworkId::new("azure-net"), addr(b)));
        assert!(v.fenced.is_empty(), "b still up");
        assert!(v.reachable.contains(&NetworkId::new("azure-net")));
        for _ in 0..3 {
            e.record(addr(b), fail(), t0, T);
        }
        let fenced = e.verdict();
        assert_eq!(fenced.fenced, [NetworkId::new("azure-net")].into());
        assert!(!fenced.reachable.contains(&NetworkId::new("azure-net")));
        assert!(fenced.reachable.contains(&NetworkId::new("aws-net")), "another network is not affected");
        // one address back (after its hold-down) unfences the network
        let late = t0 + Duration::from_secs(31);
        e.record(addr(b), ok(), late, T);
        e.record(addr(b), ok(), late, T);
        let v = e.verdict();
        assert!(v.fenced.is_empty());
        assert_eq!(v.down, [(NetworkId::new("azure-net"), [addr(a)].into())].into());
        assert_eq!(v.networks_changed(&fenced), [NetworkId::new("azure-net")].into());
        assert!(v.networks_changed(&v).is_empty());
    }

    #[test]
    fn targets_follow_the_gateways() {
        let (a, b) = ("10.0.0.1:15443", "10.0.0.2:15443");
        let mut e = evidence(&[("n", &[a])]);
        let t0 = Instant::now();
        for _ in 0..3 {
            e.record(addr(a), fail(), t0, T);
        }
        // a new address joins: unknown, so the network is no longer fenced; the old one keeps its state
        e.set_targets(&[(NetworkId::new("n"), [addr(a), addr(b)].into())].into());
        assert_eq!(state(&e, "n", a), AddressState::Down);
        assert_eq!(state(&e, "n", b), AddressState::Unknown);
        assert!(e.verdict().fenced.is_empty());
        // the network loses its gateways: forgotten, neither fenced nor reachable
        e.set_targets(&BTreeMap::new());
        assert_eq!(e.verdict(), Verdict::default());
        assert!(e.addresses().is_empty());
    }
}
