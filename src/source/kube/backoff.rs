//! Retry timing of the Kubernetes source: exponential backoff with jitter ([`BackoffPolicy`] and its
//! state, [`Backoff`]) and the delays of watches and reachability probes. How they combine after an
//! outage is told in the [module doc of the source](super#backoff-and-recovery).
//!
//! Used by the watch guard, the cluster loop and the remote-secret watcher; uses nothing else of the
//! source.

use std::time::{Duration, SystemTime};

/// Backoff of a kind's watcher after an error (reset when a list completes).
pub const WATCH_BACKOFF: BackoffPolicy =
    BackoffPolicy { initial: Duration::from_secs(1), max: Duration::from_secs(30), jitter: 0.2 };
/// Backoff of the reachability probe while the API server does not answer.
pub const PROBE_BACKOFF: BackoffPolicy =
    BackoffPolicy { initial: Duration::from_millis(500), max: Duration::from_secs(5), jitter: 0.2 };
/// Probe interval while the API server answers.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// Cap of one probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest meshfed waits, after a cluster's API server answers again, before retrying its watches:
/// the probe's largest delay with jitter.
pub const MAX_RECOVERY_DELAY: Duration = Duration::from_secs(6);
/// How often a DestinationRule CRD that is not installed is looked for again.
pub const ABSENT_CRD_RECHECK: Duration = Duration::from_secs(30);

/// Exponential backoff: `initial` doubling up to `max`, each delay scaled by a random factor in
/// `1 ± jitter`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub jitter: f64,
}

impl BackoffPolicy {
    /// The largest delay this policy can produce.
    pub fn max_delay(&self) -> Duration {
        self.max.mul_f64(1.0 + self.jitter)
    }
}

/// The state of a [`BackoffPolicy`].
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: BackoffPolicy,
    current: Option<Duration>,
    rng: u64,
}

impl Backoff {
    pub fn new(policy: BackoffPolicy) -> Backoff {
        // a different jitter sequence per instance (no need for a cryptographic source)
        static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQUENCE.fetch_add(0x9e37_79b9_7f4a_7c15, std::sync::atomic::Ordering::Relaxed);
        let seed = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        Backoff { policy, current: None, rng: (seed ^ n) | 1 }
    }

    /// The next delay (the un-jittered delay doubles each time, up to the policy's max).
    pub fn next_delay(&mut self) -> Duration {
        let base = match self.current {
            None => self.policy.initial,
            Some(c) => (c * 2).min(self.policy.max),
        };
        self.current = Some(base);
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
        base.mul_f64(1.0 + self.policy.jitter * (2.0 * r - 1.0))
    }

    /// Back to the initial delay.
    pub fn reset(&mut self) {
        self.current = None;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter_and_resets() {
        let mut b = Backoff::new(WATCH_BACKOFF);
        let bounds = |base: f64| (base * 0.8 - 1e-9, base * 1.2 + 1e-9);
        for base in [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0] {
            let d = b.next_delay().as_secs_f64();
            let (lo, hi) = bounds(base);
            assert!((lo..=hi).contains(&d), "{d} not within {base} ±20%");
        }
        b.reset();
        let d = b.next_delay().as_secs_f64();
        assert!((0.8..=1.2).contains(&d), "{d}");
        assert!(PROBE_BACKOFF.max_delay() <= MAX_RECOVERY_DELAY);
        // jitter differs between instances (not every delay equal)
        let delays: BTreeSet<u128> = (0..8).map(|_| Backoff::new(WATCH_BACKOFF).next_delay().as_nanos()).collect();
        assert!(delays.len() > 1);
    }
}
