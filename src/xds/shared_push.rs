//! One push's update, worked out once for every stream it is the same for.
//!
//! A push that changes many names (a drain step, or a cloud lost: every service's assignment
//! changes) finds most streams in the same place: their client holds exactly its scope's map of the
//! previous generation (`synced`, see [`super::type_state`]), through the same subscription. For all
//! of them the resources to send, the names to remove, what the client held of each (kept to roll
//! back on NACK), how the SotW version moves and the encoded resource entries are the same. The first
//! such stream works them out and leaves them here; the others take them: such a push costs each of
//! them an O(1) update of its state and the write of one shared block, not a lookup, a compare and a
//! copy per changed name.
//!
//! Only what the newest generation's pushes worked out is kept (until the next push), at most
//! [`MAX_ENTRIES`] updates and [`BUDGET`] bytes of encoded entries; beyond that a stream works its update
//! out for itself, as every stream did before.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use super::codec::Batch;
use super::connections::Flavor;
use super::subscription::NameSet;
use super::type_state::{Inflight, TypeState, entry_hash, lookup_all, wants};
use crate::cache::Resources;
use crate::type_url::ResourceType;

/// A push that changes one name (an endpoint change) takes each stream's own path, which is as cheap for
/// one name; from two names on, the update is worked out once.
pub(super) const MIN_CHANGED: usize = 2;
/// Updates kept for one generation.
pub(super) const MAX_ENTRIES: usize = 256;
/// Encoded bytes kept for one generation (an S-sized drain step: ~0.7 MB per scope and flavor).
pub(super) const BUDGET: usize = 32 << 20;

/// What a push does to a synced stream of a given scope and subscription.
#[derive(Debug)]
pub(super) enum Outcome {
    /// nothing it covers changed: it holds the new map as it is
    Unchanged,
    /// send this; then it holds the new map
    Send(Update),
}

#[derive(Debug)]
pub(super) struct Update {
    /// the resources to send, encoded for the stream's flavor
    pub(super) batch: Arc<Batch>,
    /// Delta: the names the client drops
    pub(super) removed: Vec<Arc<str>>,
    /// what the client held of each name sent or removed
    pub(super) inflight: Inflight,
    /// how the xor of the held entries' hashes (the SotW version) changes
    pub(super) hash_delta: u64,
}

/// Works out what a push from `held` (the scope's map the client holds exactly) to `current` does to a
/// client subscribed to `names` (and everything if `wildcard`), looking at the `changed` names only
/// (every name whose resource differs between the two maps is among them). None: after it the client
/// would not hold `current` exactly (a name it does not subscribe to appeared, or SotW cannot remove
/// one): the stream's own path handles that.
pub(super) fn work_out(
    flavor: Flavor,
    names: &NameSet,
    wildcard: bool,
    held: &Resources,
    current: &Resources,
    changed: &BTreeSet<Arc<str>>,
) -> Option<Outcome> {
    let now = lookup_all(current, changed.iter());
    let before = lookup_all(held, changed.iter());
    let (mut send, mut removed, mut inflight) = (Vec::new(), Vec::new(), Vec::new());
    let mut hash_delta = 0u64;
    for ((name, r), h) in changed.iter().zip(now).zip(before) {
        match r {
            Some(r) if wants(names, wildcard, name, Some(r)) => {
                if h.is_none_or(|h| h.version != r.version) {
                    hash_delta ^= entry_hash(name, &r.version);
                    if let Some(h) = h {
                        hash_delta ^= entry_hash(name, &h.version);
                    }
                    send.push(r.clone());
                    inflight.push((name.clone(), h.cloned()));
                }
            }
            // in the scope but not subscribed: the client will not hold the scope's map
            Some(_) => return None,
            None => {
                if let Some(h) = h {
                    // SotW cannot remove one resource of a type that is not its full state
                    if flavor == Flavor::Sotw {
                        return None;
                    }
                    hash_delta ^= entry_hash(name, &h.version);
                    removed.push(name.clone());
                    inflight.push((name.clone(), Some(h.clone())));
                }
            }
        }
    }
    if send.is_empty() && removed.is_empty() {
        return Some(Outcome::Unchanged);
    }
    let batch = match flavor {
        Flavor::Sotw => Batch::sotw(send),
        Flavor::Delta => Batch::delta(send),
    };
    Some(Outcome::Send(Update { batch: Arc::new(batch), removed, inflight: Arc::new(inflight), hash_delta }))
}

/// The types whose scopes many proxies share (a stream's map is the scope's own), and whose SotW
/// responses carry only what changed.
pub(super) fn shares(t: ResourceType) -> bool {
    matches!(t, ResourceType::Endpoint | ResourceType::Route)
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    flavor: Flavor,
    t: ResourceType,
    from: u64,
    wildcard: bool,
    /// the subscription's address (the entry keeps it alive, so it names one subscription)
    names: usize,
}

#[derive(Debug)]
struct Entry {
    /// keeps the subscription of the key's address alive
    _names: Arc<NameSet>,
    held: Resources,
    current: Resources,
    /// None: the streams' own path
    outcome: Option<Arc<Outcome>>,
}

#[derive(Debug, Default)]
struct Memo {
    generation: u64,
    entries: HashMap<Key, Vec<Entry>>,
    count: usize,
    bytes: usize,
}

/// What the newest generation's pushes worked out, shared by the streams of one server.
#[derive(Debug, Default)]
pub struct SharedPushes {
    memo: Mutex<Memo>,
}

impl SharedPushes {
    /// What the push from generation `from` to `generation` does to the stream whose type `t` state is
    /// `ts`, its scope's map now being `current` and `changed` the names changed: worked out here once
    /// per scope and subscription. None when the stream is not in the shared case (its client does
    /// not hold the scope's map of `from` exactly, it must send some names again or not send versions
    /// it rejected, or the push changes few names): it takes its own path.
    pub(super) fn outcome(
        &self,
        flavor: Flavor,
        t: ResourceType,
        (from, generation): (u64, u64),
        ts: &TypeState,
        current: &Resources,
        changed: &BTreeSet<Arc<str>>,
    ) -> Option<Arc<Outcome>> {
        if !shares(t)
            || changed.len() < MIN_CHANGED
            || ts.synced != Some(from)
            || !ts.dirty.is_empty()
            || !ts.rejected.is_empty()
        {
            return None;
        }
        let key = Key { flavor, t, from, wildcard: ts.wildcard, names: Arc::as_ptr(&ts.names) as usize };
        let same = |e: &Entry| e.held.ptr_eq(&ts.held) && e.current.ptr_eq(current);
        {
            let mut memo = self.memo.lock().unwrap_or_else(|e| e.into_inner());
            if memo.generation != generation {
                *memo = Memo { generation, ..Memo::default() };
            }
            if let Some(e) = memo.entries.get(&key).and_then(|v| v.iter().find(|e| same(e))) {
                return e.outcome.clone();
            }
        }
        let outcome = work_out(flavor, &ts.names, ts.wildcard, &ts.held, current, changed).map(Arc::new);
        let bytes = match outcome.as_deref() {
            Some(Outcome::Send(u)) => u.batch.encoded_len(),
            _ => 0,
        };
        let mut memo = self.memo.lock().unwrap_or_else(|e| e.into_inner());
        if memo.generation == generation && memo.count < MAX_ENTRIES && memo.bytes + bytes <= BUDGET {
            let entries = memo.entries.entry(key).or_default();
            // (another stream may have worked the same out meanwhile: keep the first)
            if let Some(e) = entries.iter().find(|e| same(e)) {
                return e.outcome.clone();
            }
            entries.push(Entry {
                _names: ts.names.clone(),
                held: ts.held.clone(),
                current: current.clone(),
                outcome: outcome.clone(),
            });
            memo.count += 1;
            memo.bytes += bytes;
        }
        outcome
    }

    /// Updates and encoded bytes kept (for tests).
    #[cfg(test)]
    pub(super) fn kept(&self) -> (usize, usize) {
        let memo = self.memo.lock().unwrap_or_else(|e| e.into_inner());
        (memo.count, memo.bytes)
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::cache::Resource;
    use crate::xds::subscription;

    use crate::cache::test_assignment as cla;

    fn name(i: usize) -> String {
        format!("outbound|9080||svc-{i:03}.shop.svc.cluster.local")
    }

    /// A client subscribed to `names` that holds `held` exactly (synced at generation 1).
    fn synced(names: &[String], held: &Resources) -> TypeState {
        let mut ts = TypeState::new();
        ts.names = subscription::intern(names.iter().map(|n| Arc::from(n.as_str())).collect());
        let all: Vec<Arc<Resource>> = held.values().cloned().collect();
        ts.record(&all, &[], held, None, 0, 1);
        assert_eq!(ts.synced, Some(1));
        ts
    }

    /// The names whose resources differ between two maps (what a push's changes list).
    fn diff(a: &Resources, b: &Resources) -> BTreeSet<Arc<str>> {
        let version = |m: &Resources, n: &str| m.get(n).map(|x| x.version.clone());
        a.keys().chain(b.keys()).filter(|n| version(a, n) != version(b, n)).cloned().collect()
    }

    /// Scopes of 60 assignments; the next generation changes every third, drops the last two and adds one.
    fn generations() -> (Vec<String>, Resources, Resources) {
        let names: Vec<String> = (0..61).map(name).collect();
        let g1: Resources = names[..60].iter().map(|n| (Arc::from(n.as_str()), cla(n, 1))).collect();
        let mut g2 = g1.clone();
        for n in names.iter().step_by(3).take(20) {
            g2.insert(Arc::from(n.as_str()), cla(n, 2));
        }
        g2.remove(names[58].as_str());
        g2.remove(names[59].as_str());
        g2.insert(Arc::from(names[60].as_str()), cla(&names[60], 1));
        (names, g1, g2)
    }

    #[test]
    fn a_delta_update_is_what_the_streams_own_record_makes_of_it() {
        let (names, g1, g2) = generations();
        let changed = diff(&g1, &g2);
        let ts = synced(&names, &g1);
        let Some(Outcome::Send(u)) = work_out(Flavor::Delta, &ts.names, false, &ts.held, &g2, &changed) else {
            panic!("an update to send")
        };
        let sent: Vec<&str> = u.batch.resources().iter().map(|r| &*r.name).collect();
        let want_sent: Vec<&str> = changed.iter().filter(|n| g2.contains_key(*n)).map(|n| &**n).collect();
        assert_eq!(sent, want_sent, "the changed and the new assignments, in order");
        assert_eq!(u.removed, [Arc::from(names[58].as_str()), Arc::from(names[59].as_str())]);
        // the stream's own record of the same response: what it held before, the version after, synced
        let mut own = ts.clone();
        let inflight = own.record(u.batch.resources(), &u.removed, &g2, Some(&changed), 1, 2);
        assert_eq!(own.synced, Some(2));
        assert_eq!(own.held_hash, ts.held_hash ^ u.hash_delta);
        let key = |f: &Inflight| {
            let mut v: Vec<(String, Option<String>)> =
                f.iter().map(|(n, p)| (n.to_string(), p.as_ref().map(|p| p.version.to_string()))).collect();
            v.sort();
            v
        };
        assert_eq!(key(&u.inflight), key(&inflight));
        assert_eq!(u.inflight.len(), 20 + 1 + 2);
    }

    #[test]
    fn sotw_shares_what_it_can_send_and_leaves_the_rest_to_the_stream() {
        let (names, g1, g2) = generations();
        let ts = synced(&names, &g1);
        // SotW cannot remove one assignment: the stream's own path
        let changed = diff(&g1, &g2);
        assert!(work_out(Flavor::Sotw, &ts.names, false, &ts.held, &g2, &changed).is_none());
        // only changes: shared
        let mut g3 = g1.clone();
        for n in names.iter().take(40) {
            g3.insert(Arc::from(n.as_str()), cla(n, 3));
        }
        let changed = diff(&g1, &g3);
        let Some(Outcome::Send(u)) = work_out(Flavor::Sotw, &ts.names, false, &ts.held, &g3, &changed) else {
            panic!("an update to send")
        };
        assert_eq!(u.batch.resources().len(), 40);
        assert!(u.removed.is_empty());
        let mut own = ts.clone();
        own.record(u.batch.resources(), &[], &g3, Some(&changed), 1, 2);
        assert_eq!((own.synced, own.held_hash), (Some(2), ts.held_hash ^ u.hash_delta));
        // a name the client does not subscribe to appears: it will not hold the scope's map
        let mut g4 = g3.clone();
        g4.insert(Arc::from("outbound|1||other"), cla("outbound|1||other", 1));
        let changed = diff(&g1, &g4);
        assert!(work_out(Flavor::Sotw, &ts.names, false, &ts.held, &g4, &changed).is_none());
        assert!(work_out(Flavor::Delta, &ts.names, false, &ts.held, &g4, &changed).is_none());
        // ... unless it subscribes to everything
        assert!(work_out(Flavor::Delta, &ts.names, true, &ts.held, &g4, &changed).is_some());
        // nothing it covers changed
        let same = g1.clone();
        let changed: BTreeSet<Arc<str>> = g1.keys().cloned().collect();
        assert!(matches!(
            work_out(Flavor::Sotw, &ts.names, false, &ts.held, &same, &changed),
            Some(Outcome::Unchanged)
        ));
    }

    #[test]
    fn streams_alike_share_one_update_and_the_rest_take_their_own_path() {
        let (names, g1, _) = generations();
        let mut g2 = g1.clone();
        for n in names.iter().take(40) {
            g2.insert(Arc::from(n.as_str()), cla(n, 4));
        }
        let changed = diff(&g1, &g2);
        let shared = SharedPushes::default();
        let a = synced(&names, &g1);
        let b = synced(&names, &g1);
        assert!(Arc::ptr_eq(&a.names, &b.names), "interned subscriptions");
        let oa = shared.outcome(Flavor::Delta, ResourceType::Endpoint, (1, 2), &a, &g2, &changed).expect("shared");
        let ob = shared.outcome(Flavor::Delta, ResourceType::Endpoint, (1, 2), &b, &g2, &changed).expect("shared");
        assert!(Arc::ptr_eq(&oa, &ob), "worked out once");
        assert_eq!(shared.kept().0, 1);
        // the other flavor: its own update
        let os = shared.outcome(Flavor::Sotw, ResourceType::Endpoint, (1, 2), &a, &g2, &changed).expect("shared");
        assert!(!Arc::ptr_eq(&oa, &os));
        // not for: a stream that rejected a version, one that must send names again, one not synced, few
        // changes, clusters and listeners (their maps are not a scope's own)
        let mut rejected = synced(&names, &g1);
        rejected.rejected.insert(Arc::from(names[0].as_str()), Arc::from("v"));
        let mut dirty = synced(&names, &g1);
        dirty.dirty.insert(Arc::from(names[0].as_str()));
        let mut behind = synced(&names, &g1);
        behind.synced = None;
        for ts in [&rejected, &dirty, &behind] {
            assert!(shared.outcome(Flavor::Delta, ResourceType::Endpoint, (1, 2), ts, &g2, &changed).is_none());
        }
        let few: BTreeSet<Arc<str>> = changed.iter().take(MIN_CHANGED - 1).cloned().collect();
        assert!(shared.outcome(Flavor::Delta, ResourceType::Endpoint, (1, 2), &a, &g2, &few).is_none());
        assert!(shared.outcome(Flavor::Delta, ResourceType::Cluster, (1, 2), &a, &g2, &changed).is_none());
        // a newer generation forgets the older one's updates
        let mut g3 = g2.clone();
        g3.insert(Arc::from(names[0].as_str()), cla(&names[0], 5));
        let mut c = synced(&names, &g2);
        c.synced = Some(2);
        let all: BTreeSet<Arc<str>> = g2.keys().cloned().collect();
        assert!(shared.outcome(Flavor::Delta, ResourceType::Endpoint, (2, 3), &c, &g3, &all).is_some());
        assert_eq!(shared.kept().0, 1);
    }
}
