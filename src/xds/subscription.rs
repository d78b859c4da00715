//! Subscribed resource names, interned: streams that subscribe to the same names (a fleet's sidecars
//! ask for the same thousand EDS clusters) share one set instead of keeping a copy each.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use serde::Serialize;

/// The hash of name lookups: foldhash, seeded per process (the names come from clients).
pub type NameHasher = foldhash::fast::RandomState;

/// A set of names, as the streams build them.
pub type Names = HashSet<Arc<str>, NameHasher>;

/// A set of resource names, immutable once interned.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NameSet {
    names: Names,
    /// order-independent fingerprint ([`super::codec::names_fingerprint`])
    fingerprint: u64,
}

impl NameSet {
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<str>> {
        self.names.iter()
    }

    /// A copy of the names, to build a changed set from.
    pub fn to_set(&self) -> Names {
        self.names.clone()
    }

    /// The names in order.
    pub fn sorted(&self) -> Vec<Arc<str>> {
        let mut v: Vec<Arc<str>> = self.names.iter().cloned().collect();
        v.sort_unstable();
        v
    }
}

impl Serialize for NameSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.sorted())
    }
}

/// Interned sets by fingerprint. Entries whose sets are gone are swept as the table grows.
struct Table {
    sets: HashMap<u64, Vec<Weak<NameSet>>>,
    /// entries at the last sweep
    swept_at: usize,
    entries: usize,
}

static TABLE: LazyLock<Mutex<Table>> =
    LazyLock::new(|| Mutex::new(Table { sets: HashMap::new(), swept_at: 0, entries: 0 }));

static EMPTY: LazyLock<Arc<NameSet>> = LazyLock::new(Arc::default);

/// The empty set.
pub fn empty() -> Arc<NameSet> {
    EMPTY.clone()
}

/// The shared set equal to `names`.
pub fn intern(names: Names) -> Arc<NameSet> {
    if names.is_empty() {
        return empty();
    }
    let fingerprint = super::codec::names_fingerprint(names.iter().map(|n| n.as_bytes()));
    let mut table = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    let bucket = table.sets.entry(fingerprint).or_default();
    let before = bucket.len();
    bucket.retain(|w| w.strong_count() > 0);
    let mut found = None;
    for w in bucket.iter() {
        if let Some(s) = w.upgrade()
            && s.names == names
        {
            found = Some(s);
            break;
        }
    }
    let set = match found {
        Some(s) => s,
        None => {
            let s = Arc::new(NameSet { names, fingerprint });
            bucket.push(Arc::downgrade(&s));
            s
        }
    };
    let after = bucket.len();
    table.entries = table.entries + after - before;
    if table.entries > 2 * table.swept_at.max(1024) {
        table.sets.retain(|_, b| {
            b.retain(|w| w.strong_count() > 0);
            !b.is_empty()
        });
        table.entries = table.sets.values().map(Vec::len).sum();
        table.swept_at = table.entries;
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> Names {
        names.iter().map(|n| Arc::from(*n)).collect()
    }

    #[test]
    fn equal_sets_are_shared_and_different_ones_are_not() {
        let a = intern(set(&["x", "y"]));
        let b = intern(set(&["y", "x"]));
        assert!(Arc::ptr_eq(&a, &b));
        let c = intern(set(&["x", "z"]));
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(c.contains("z") && !c.contains("y"));
        assert!(Arc::ptr_eq(&intern(Names::default()), &empty()));
        assert_eq!(serde_json::to_string(&*a).unwrap(), r#"["x","y"]"#);
    }

    #[test]
    fn sets_no_one_holds_are_not_kept() {
        let weak = Arc::downgrade(&intern(set(&["gone-1", "gone-2"])));
        assert!(weak.upgrade().is_none());
        // a new set with the same names is a new one, and works
        let again = intern(set(&["gone-1", "gone-2"]));
        assert_eq!(again.len(), 2);
        // many sets come and go: the table is swept
        for i in 0..5000 {
            let _ = intern(set(&[&format!("churn-{i}")]));
        }
        let table = TABLE.lock().unwrap();
        assert!(table.entries < 5000, "{} entries kept", table.entries);
    }
}
