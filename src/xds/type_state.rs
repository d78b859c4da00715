//! What one stream tracks per resource type: the subscription (wildcard and/or names), what the client
//! holds (name -> resource/version; optimistic while a response is in flight, rolled back on NACK), the
//! versions it rejected (never re-sent until their content changes) and the responses awaiting an answer.
//!
//! While a client holds exactly its scope's resources, what it holds is the snapshot's own persistent map
//! (`synced`), shared by every such stream and checked per push in O(changed names).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use super::subscription::{self, NameSet};
use crate::cache::{Resource, Resources};

/// At most this many Delta responses are tracked awaiting ACK per type; older ones count as ACKed.
pub(super) const MAX_PENDING: usize = 16;
/// SotW responses kept until answered: a NACK that races newer pushes is still recorded. Fewer than
/// Delta keeps, since every full-state SotW response holds the type's whole state.
pub(super) const MAX_PENDING_SOTW: usize = 4;

/// What the client holds of one resource: the resource sent, or (for a version a Delta client reported
/// on reconnect, `initial_resource_versions`) a stand-in with that version ([`Resource::reported`]).
pub(super) type Held = Arc<Resource>;

/// The entries of `map` for `names`, in the names' order (None where absent). A push that changes many
/// names makes every stream look each up, and an ordered-map lookup compares the name with many keys
/// sharing long prefixes (`outbound|9080||…`): when the names are many (and ascending, as a
/// `BTreeSet` and a map's keys are), one ordered walk of the map beside them replaces the lookups. Names
/// out of order are looked up one by one from there on.
pub(super) fn lookup_all<'a, 'n>(
    map: &'a Resources,
    names: impl ExactSizeIterator<Item = &'n Arc<str>>,
) -> Vec<Option<&'a Held>> {
    let mut out = Vec::with_capacity(names.len());
    // (a lookup costs about log2(map) comparisons per name, the walk about 1 + map/names)
    if names.len().saturating_mul(16) < map.len() {
        out.extend(names.map(|n| map.get(n)));
        return out;
    }
    let mut walk = map.iter().peekable();
    let mut prev: Option<&Arc<str>> = None;
    let mut ordered = true;
    for n in names {
        ordered &= prev.is_none_or(|p| p <= n);
        prev = Some(n);
        if !ordered {
            out.push(map.get(n));
            continue;
        }
        while walk.next_if(|(k, _)| ***k < **n).is_some() {}
        out.push(walk.peek().filter(|(k, _)| ***k == **n).map(|(_, v)| *v));
    }
    out
}

/// Does a subscription to `names` (and to every resource if `wildcard`) cover `name` (`r`: what the
/// scope has of it)?
pub(super) fn wants(names: &NameSet, wildcard: bool, name: &str, r: Option<&Resource>) -> bool {
    names.contains(name) || (wildcard && r.is_none_or(|r| r.wildcard))
}

pub(super) fn entry_hash(name: &str, version: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes()) ^ xxhash_rust::xxh3::xxh3_64(version.as_bytes()).rotate_left(1)
}

/// A response in flight: what each name held before it, to roll back on NACK (shared by the streams
/// that sent the same update, [`super::shared_push`]; copied only when a NACK changes it).
pub(super) type Inflight = Arc<Vec<(Arc<str>, Option<Held>)>>;

/// The capacity that [`TypeState::dirty`] and [`TypeState::rejected`] keep when they are emptied (a few names).
const NAMES_KEPT: usize = 16;

#[derive(Clone, Debug)]
pub(super) struct TypeState {
    pub(super) wildcard: bool,
    /// the names subscribed, shared with every stream subscribed to the same names
    pub(super) names: Arc<NameSet>,
    /// what the client holds, by name. A persistent map: while the client holds exactly what its scope
    /// has, this is the snapshot's own map (`synced`), shared by every such stream.
    pub(super) held: Resources,
    /// xor of entry hashes of `held`: an order-independent, content-derived SotW version
    pub(super) held_hash: u64,
    /// `held` equals (is) the scope's map of this snapshot generation
    pub(super) synced: Option<u64>,
    pub(super) rejected: HashMap<Arc<str>, Arc<str>>,
    /// names to send again at the next push even if unchanged (EDS after its cluster changed)
    pub(super) dirty: HashSet<Arc<str>>,
    /// every unanswered response (nonce, what it carried), oldest first (at most [`MAX_PENDING_SOTW`] /
    /// [`MAX_PENDING`])
    pub(super) pending: VecDeque<(String, Inflight)>,
    /// SotW: the nonce of the latest response sent (kept after its ACK: later requests carry it too)
    pub(super) last_nonce: Option<String>,
    /// SotW: fingerprint of the last requested name list (see [`SotwRequest::names_fingerprint`])
    pub(super) names_fingerprint: u64,
    /// the client ACKed a response of this type
    pub(super) acked: bool,
    /// names subscribed that meshfed does not serve (see `Stream::refresh_missing`)
    pub(super) missing: Vec<Arc<str>>,
}

impl TypeState {
    pub(super) fn new() -> Self {
        TypeState {
            wildcard: false,
            names: subscription::empty(),
            held: Resources::new(),
            held_hash: 0,
            synced: None,
            rejected: HashMap::new(),
            dirty: HashSet::new(),
            pending: VecDeque::new(),
            last_nonce: None,
            names_fingerprint: 0,
            acked: false,
            missing: Vec::new(),
        }
    }

    /// Empties `dirty`, letting go of its table once it is large: a changed cluster marks its
    /// assignment dirty, so a policy change that touches every cluster fills it with every EDS name
    /// (~35 KB per stream at 1,000), and a cleared set would keep that table for the stream's life.
    pub(super) fn clear_dirty(&mut self) {
        if self.dirty.capacity() > NAMES_KEPT {
            self.dirty = HashSet::new();
        } else {
            self.dirty.clear();
        }
    }

    /// A rejected version is remembered so that it is not sent again; once another version of the name
    /// is sent (its content changed) or the name is removed, the record is moot. Kept, it would stop the
    /// name from being sent should its content come back to the rejected one, and it keeps the stream
    /// off the shared pushes ([`super::shared_push`]).
    fn forget_rejections(&mut self, sent: &[Arc<Resource>], removed: &[Arc<str>]) {
        if self.rejected.is_empty() {
            return;
        }
        for r in sent {
            if self.rejected.get(&r.name).is_some_and(|v| *v != r.version) {
                self.rejected.remove(&r.name);
            }
        }
        for n in removed {
            self.rejected.remove(n);
        }
        if self.rejected.is_empty() && self.rejected.capacity() > NAMES_KEPT {
            self.rejected = HashMap::new();
        }
    }

    pub(super) fn wants(&self, name: &str, r: Option<&Resource>) -> bool {
        wants(&self.names, self.wildcard, name, r)
    }

    pub(super) fn set_held(&mut self, name: Arc<str>, held: Option<Held>) -> Option<Held> {
        self.synced = None;
        let old = match held {
            Some(h) => {
                self.held_hash ^= entry_hash(&name, &h.version);
                self.held.insert(name.clone(), h)
            }
            None => self.held.remove(&name),
        };
        if let Some(o) = &old {
            self.held_hash ^= entry_hash(&name, &o.version);
        }
        old
    }

    pub(super) fn sotw_version(&self) -> String {
        format!("{:016x}", self.held_hash)
    }

    /// Is `r` something to send: different from what the client holds (or to be sent again), and not a
    /// version it rejected?
    pub(super) fn needs(&self, r: &Resource) -> bool {
        self.needs_given(r, self.held.get(&r.name))
    }

    /// [`Self::needs`] with what the client holds of `r`'s name looked up already.
    pub(super) fn needs_given(&self, r: &Resource, held: Option<&Held>) -> bool {
        (self.dirty.contains(&r.name) || held.is_none_or(|h| h.version != r.version))
            && self.rejected.get(&r.name).is_none_or(|v| *v != r.version)
    }

    /// Records that the client will hold `sent` (entries of `current`) and no longer `removed`; returns
    /// what each held before (to roll back on NACK). `current` is the scope's map at `generation`; `considered` the names the
    /// update looked at (None: all of them). When the client then holds exactly `current`, `held` becomes
    /// `current` itself: O(1), and shared with the snapshot instead of a copy per stream.
    pub(super) fn record(
        &mut self,
        sent: &[Arc<Resource>],
        removed: &[Arc<str>],
        current: &Resources,
        considered: Option<&BTreeSet<Arc<str>>>,
        from: u64,
        generation: u64,
    ) -> Inflight {
        let mut inflight = Vec::with_capacity(sent.len() + removed.len());
        let held_sent = lookup_all(&self.held, sent.iter().map(|r| &r.name));
        inflight.extend(sent.iter().zip(held_sent).map(|(r, h)| (r.name.clone(), h.cloned())));
        inflight.extend(removed.iter().map(|n| (n.clone(), self.held.get(n).cloned())));
        self.clear_dirty();
        self.forget_rejections(sent, removed);
        // The first answer of a type: the client held nothing and gets all of `current` (the responders
        // take `sent` from `current`).
        if considered.is_none() && self.held.is_empty() && removed.is_empty() && sent.len() == current.len() {
            for r in sent {
                self.held_hash ^= entry_hash(&r.name, &r.version);
            }
            self.held = current.clone();
            self.synced = Some(generation);
            return Arc::new(inflight);
        }
        // An update of a client that held the map of generation `from`, considering every name changed
        // since: only those can differ, so checking them says whether it holds the new map.
        if let Some(c) = considered
            && self.synced == Some(from)
        {
            // (a push changes a few names: a map only when there are many)
            let by_name: Option<HashMap<&str, &str>> =
                (sent.len() > 8).then(|| sent.iter().map(|r| (&*r.name, &*r.version)).collect());
            let after = |n: &Arc<str>| -> Option<&str> {
                let found = match &by_name {
                    Some(m) => m.get(&**n).copied(),
                    None => sent.iter().find(|r| r.name == *n).map(|r| &*r.version),
                };
                if let Some(v) = found {
                    return Some(v);
                }
                if removed.contains(n) {
                    return None;
                }
                self.held.get(n).map(|r| &*r.version)
            };
            if c.iter().zip(lookup_all(current, c.iter())).all(|(n, r)| after(n) == r.map(|r| &*r.version)) {
                for (name, prev) in &inflight {
                    if let Some(p) = prev {
                        self.held_hash ^= entry_hash(name, &p.version);
                    }
                }
                for r in sent {
                    self.held_hash ^= entry_hash(&r.name, &r.version);
                }
                self.held = current.clone();
                self.synced = Some(generation);
                return Arc::new(inflight);
            }
        }
        for r in sent {
            self.set_held(r.name.clone(), Some(r.clone()));
        }
        for n in removed {
            self.set_held(n.clone(), None);
        }
        if considered.is_none() {
            self.resync(current, generation);
        }
        Arc::new(inflight)
    }

    /// Shares `current` as `held` if the client holds exactly what it has (O(n): after full evaluations
    /// and subscription changes only).
    pub(super) fn resync(&mut self, current: &Resources, generation: u64) {
        if self.held.len() == current.len()
            && current.iter().all(|(n, r)| self.held.get(n).is_some_and(|h| h.version == r.version))
        {
            self.held = current.clone();
            self.synced = Some(generation);
        } else {
            tracing::trace!(held = self.held.len(), scope = current.len(), "client holds other than its scope");
            self.synced = None;
        }
    }

    /// An update that sent nothing: whether the client holds exactly `current` now (the considered
    /// names checked, or all of them).
    pub(super) fn unchanged(
        &mut self,
        current: &Resources,
        considered: Option<&BTreeSet<Arc<str>>>,
        from: u64,
        generation: u64,
    ) {
        self.clear_dirty();
        let Some(c) = considered else { return self.resync(current, generation) };
        let same = |n: &Arc<str>| self.held.get(n).map(|r| &r.version) == current.get(n).map(|r| &r.version);
        if self.synced == Some(from) && c.iter().all(same) {
            self.held = current.clone();
            self.synced = Some(generation);
        } else {
            self.synced = None;
        }
    }

    /// Nothing of this type changed since generation `from`: a synced client holds its scope's new map.
    pub(super) fn advance(&mut self, current: &Resources, from: u64, generation: u64) {
        if self.synced == Some(from) {
            self.held = current.clone();
            self.synced = Some(generation);
        }
    }
}

/// Of a NACKed response (`inflight`, formerly at `pending[i]`), the names that a newer response
/// still in flight carries again. The client's state for those follows the newer response, so they
/// must not be rolled back (that would overwrite what the newer response recorded); instead the newer
/// response takes over what the client kept, in case it is NACKed too. Returns the other names.
pub(super) fn hand_over_superseded(ts: &mut TypeState, i: usize, inflight: Inflight) -> Inflight {
    let mut own = Vec::new();
    for (name, prev) in Arc::unwrap_or_clone(inflight) {
        // (a response shared with other streams is copied for this one when it changes)
        let at = ts
            .pending
            .iter()
            .enumerate()
            .skip(i)
            .find_map(|(k, (_, f))| Some((k, f.iter().position(|(n, _)| *n == name)?)));
        let newer = at.map(|(k, j)| &mut Arc::make_mut(&mut ts.pending[k].1)[j]);
        match newer {
            Some((_, newer_prev)) => {
                // The newer response's predecessor is what the NACKed one sent: the rejected version.
                if let Some(sent) = newer_prev.as_ref()
                    && prev.as_ref().is_none_or(|p| p.version != sent.version)
                {
                    ts.rejected.insert(name.clone(), sent.version.clone());
                }
                *newer_prev = prev;
            }
            None => own.push((name, prev)),
        }
    }
    Arc::new(own)
}

/// Undoes a NACKed response: the client kept what it had; the versions it rejected are remembered.
pub(super) fn rollback(ts: &mut TypeState, inflight: Inflight) {
    for (name, prev) in Arc::unwrap_or_clone(inflight).into_iter().rev() {
        if let Some(sent) = ts.held.get(&name).cloned()
            && prev.as_ref().is_none_or(|p| p.version != sent.version)
        {
            ts.rejected.insert(name.clone(), sent.version.clone());
        }
        ts.set_held(name, prev);
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn lookup_all_finds_what_get_finds_walking_or_not() {
        let names: Vec<Arc<str>> = (0..200).map(|i| Arc::from(format!("outbound|9080||svc-{i:04}.load.svc"))).collect();
        let mut map = Resources::new();
        for n in names.iter().step_by(2) {
            map.insert(n.clone(), Resource::reported(n, "v"));
        }
        let get = |ns: &[Arc<str>]| ns.iter().map(|n| map.get(n).map(|r| r.name.clone())).collect::<Vec<_>>();
        let got = |ns: &[Arc<str>]| {
            lookup_all(&map, ns.iter()).into_iter().map(|r| r.map(|r| r.name.clone())).collect::<Vec<_>>()
        };
        // many names, ascending (the walk): present and absent ones, before, inside and after the map
        let mut many: Vec<Arc<str>> = names.clone();
        many.insert(0, Arc::from("a"));
        many.push(Arc::from("zzz"));
        assert_eq!(got(&many), get(&many));
        assert_eq!(got(&many).iter().flatten().count(), 100);
        // few names (lookups)
        let few = vec![names[4].clone(), names[5].clone()];
        assert_eq!(got(&few), get(&few));
        // many, out of order from the middle on: still right
        let mut shuffled = names.clone();
        shuffled[100..].reverse();
        assert_eq!(got(&shuffled), get(&shuffled));
        // none, and an empty map
        assert!(lookup_all(&map, std::iter::empty::<&Arc<str>>()).is_empty());
        assert_eq!(lookup_all(&Resources::new(), many.iter()).iter().flatten().count(), 0);
    }

    use crate::cache::test_assignment as cla;

    fn scope(entries: &[Arc<Resource>]) -> Resources {
        entries.iter().map(|r| (r.name.clone(), r.clone())).collect()
    }

    fn subscribed(names: &[&str]) -> TypeState {
        let mut ts = TypeState::new();
        ts.names = subscription::intern(names.iter().map(|n| Arc::from(*n)).collect());
        ts
    }

    fn hash_of(held: &Resources) -> u64 {
        held.iter().fold(0, |h, (n, r)| h ^ entry_hash(n, &r.version))
    }

    fn set(names: &[&str]) -> BTreeSet<Arc<str>> {
        names.iter().map(|n| Arc::from(*n)).collect()
    }

    #[test]
    fn a_client_holding_its_scope_shares_the_snapshot_map() {
        let (a, b, c) = (cla("a", 1), cla("b", 1), cla("c", 1));
        let g1 = scope(&[a.clone(), b.clone(), c.clone()]);
        let mut ts = subscribed(&["a", "b", "c"]);
        // the initial full answer
        let inflight = ts.record(&[a.clone(), b.clone(), c.clone()], &[], &g1, None, 0, 1);
        assert_eq!(inflight.len(), 3);
        assert_eq!(ts.synced, Some(1));
        assert!(ts.held.ptr_eq(&g1), "held is the snapshot's map itself");
        assert_eq!(ts.held_hash, hash_of(&g1));
        // one assignment changes in the next snapshot: sent, and still shared
        let b2 = cla("b", 2);
        let mut g2 = g1.clone();
        g2.insert(b2.name.clone(), b2.clone());
        let inflight = ts.record(std::slice::from_ref(&b2), &[], &g2, Some(&set(&["b"])), 1, 2);
        assert_eq!(inflight[0].1.as_ref().map(|r| r.version.clone()), Some(b.version.clone()));
        assert_eq!(ts.synced, Some(2));
        assert!(ts.held.ptr_eq(&g2));
        assert_eq!(ts.held_hash, hash_of(&g2));
        // a removal
        let mut g3 = g2.clone();
        g3.remove("c");
        ts.record(&[], &["c".into()], &g3, Some(&set(&["c"])), 2, 3);
        assert!(ts.held.ptr_eq(&g3));
        assert_eq!(ts.held_hash, hash_of(&g3));
        // a snapshot that changes nothing of the type
        let g4 = g3.clone();
        ts.advance(&g4, 3, 4);
        assert_eq!(ts.synced, Some(4));
    }

    #[test]
    fn a_cleared_dirty_set_does_not_keep_a_large_table() {
        // a policy change rewrites every cluster, so every held assignment is marked dirty; once they are
        // sent the set must not keep a table that large for the stream's life (~35 KB per 1,000 names)
        let resources: Vec<Arc<Resource>> = (0..1000).map(|i| cla(&format!("svc-{i:04}"), 1)).collect();
        let g1 = scope(&resources);
        let names: Vec<String> = resources.iter().map(|r| r.name.to_string()).collect();
        let mut ts = subscribed(&names.iter().map(String::as_str).collect::<Vec<_>>());
        ts.record(&resources, &[], &g1, None, 0, 1);
        ts.dirty.extend(resources.iter().map(|r| r.name.clone()));
        assert!(ts.dirty.capacity() >= 1000);
        // the next EDS answer sends them again and empties the set
        ts.record(&resources, &[], &g1, None, 1, 2);
        assert!(ts.dirty.is_empty());
        assert!(ts.dirty.capacity() <= NAMES_KEPT, "capacity {} kept", ts.dirty.capacity());
        // a few dirty names keep their small table (no allocation per push)
        ts.dirty.extend(resources[..3].iter().map(|r| r.name.clone()));
        let small = ts.dirty.capacity();
        ts.clear_dirty();
        assert_eq!(ts.dirty.capacity(), small);
    }

    #[test]
    fn a_client_holding_something_else_keeps_its_own_state() {
        let (a, b) = (cla("a", 1), cla("b", 1));
        let g1 = scope(&[a.clone(), b.clone()]);
        // subscribed to `a` only: it never holds the whole scope
        let mut ts = subscribed(&["a"]);
        ts.record(std::slice::from_ref(&a), &[], &g1, None, 0, 1);
        assert_eq!(ts.synced, None);
        assert_eq!(ts.held.len(), 1);
        // a rejected version is not held: not synced, and the held version stays the old one
        let mut ts = subscribed(&["a", "b"]);
        ts.record(&[a.clone(), b.clone()], &[], &g1, None, 0, 1);
        assert_eq!(ts.synced, Some(1));
        let a2 = cla("a", 2);
        let mut g2 = g1.clone();
        g2.insert(a2.name.clone(), a2.clone());
        ts.rejected.insert(a2.name.clone(), a2.version.clone());
        ts.unchanged(&g2, Some(&set(&["a"])), 1, 2);
        assert_eq!(ts.synced, None);
        assert_eq!(ts.held.get("a").unwrap().version, a.version);
        assert_eq!(ts.held_hash, hash_of(&ts.held));
        // an update that skipped a generation cannot be trusted to be complete
        let mut ts = subscribed(&["a", "b"]);
        ts.record(&[a.clone(), b.clone()], &[], &g1, None, 0, 1);
        ts.record(std::slice::from_ref(&a2), &[], &g2, Some(&set(&["a"])), 4, 5);
        assert_eq!(ts.synced, None);
        assert_eq!(ts.held.get("a").unwrap().version, a2.version);
        // a full evaluation finds it in sync again
        ts.resync(&g2, 5);
        assert!(ts.held.ptr_eq(&g2));
    }

    #[test]
    fn a_nack_rolls_back_out_of_sync_and_reported_versions_resync() {
        let (a, b) = (cla("a", 1), cla("b", 1));
        let g1 = scope(&[a.clone(), b.clone()]);
        let mut ts = subscribed(&["a", "b"]);
        ts.record(&[a.clone(), b.clone()], &[], &g1, None, 0, 1);
        let a2 = cla("a", 2);
        let mut g2 = g1.clone();
        g2.insert(a2.name.clone(), a2.clone());
        let inflight = ts.record(std::slice::from_ref(&a2), &[], &g2, Some(&set(&["a"])), 1, 2);
        assert!(ts.held.ptr_eq(&g2));
        rollback(&mut ts, inflight);
        assert_eq!(ts.synced, None);
        assert_eq!(ts.held.get("a").unwrap().version, a.version);
        assert_eq!(ts.rejected.get("a"), Some(&a2.version));
        assert_eq!(ts.held_hash, hash_of(&ts.held));
        assert!(!ts.needs(&a2), "the rejected version is not sent again");
        // its content changes: sent, and the rejection is forgotten, so the content coming back to the
        // rejected one is sent again too
        let a3 = cla("a", 3);
        let mut g3 = g2.clone();
        g3.insert(a3.name.clone(), a3.clone());
        assert!(ts.needs(&a3));
        ts.record(std::slice::from_ref(&a3), &[], &g3, None, 2, 3);
        assert!(ts.rejected.is_empty(), "{:?}", ts.rejected);
        assert!(ts.needs(&a2));
        // a Delta client reporting exactly the scope's versions is in sync without being sent anything
        let mut ts = subscribed(&["a", "b"]);
        ts.set_held("a".into(), Some(Resource::reported("a", &a.version)));
        ts.set_held("b".into(), Some(Resource::reported("b", &b.version)));
        ts.unchanged(&g1, None, 0, 1);
        assert_eq!(ts.synced, Some(1));
        assert!(ts.held.ptr_eq(&g1));
    }
}
