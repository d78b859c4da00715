//! Sources of cluster state. Each source turns what it watches into [`SourceEvent`]s for the
//! federated registry; the registry never knows where an object came from.
//!
//! - [`files`]: directories of Kubernetes manifests, watched for edits (the built-in default).
//! - [`kube`]: Kubernetes API servers (kubeconfig files, in-cluster config), watched with kube-rs,
//!   and the clusters discovered from Istio remote secrets in a config cluster
//!   ([`kube::remote_secrets`]).
//!
//! Every source also reports how each of its clusters is doing in the shared [`ClusterHealth`]
//! (sync state, reachability, last event, last error), which the debug surface and metrics read.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;

use crate::model::ClusterId;
use crate::topology::{ObjectKey, TopologyObject};

pub mod files;
pub mod kube;
pub mod last_known;

/// A change to one cluster's objects.
#[derive(Clone, Debug)]
pub enum SourceEvent {
    /// The complete current set of a cluster's objects (a file reload, or a relist). The registry
    /// reconciles exactly: objects not in the set are deleted, unchanged ones touch nothing.
    Sync { cluster: ClusterId, objects: Vec<TopologyObject> },
    /// One object added or changed.
    Upsert { cluster: ClusterId, object: TopologyObject },
    /// One object deleted.
    Delete { cluster: ClusterId, key: ObjectKey },
    /// The cluster's API server became unreachable (`reachable: false`, `since` the first failure) or
    /// reachable again (`reachable: true`, `since` the first success). Its objects are kept either way;
    /// the push loop demotes the endpoints of a cluster unreachable for longer than the grace period.
    ClusterReachability { cluster: ClusterId, reachable: bool, since: SystemTime },
}

impl SourceEvent {
    pub fn cluster(&self) -> &ClusterId {
        match self {
            SourceEvent::Sync { cluster, .. }
            | SourceEvent::Upsert { cluster, .. }
            | SourceEvent::Delete { cluster, .. }
            | SourceEvent::ClusterReachability { cluster, .. } => cluster,
        }
    }
}

// ---- cluster health ----

/// Where a cluster is in getting its state, as istiod's `/debug/clusterz` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncState {
    /// the initial list (or file read) has not completed yet
    Syncing,
    /// the cluster's objects have been read completely at least once
    Synced,
    /// the initial list did not complete within the mesh config's `readyTimeout`: meshfed became ready
    /// without it; it joins when it syncs
    Timeout,
    /// the source of the cluster is gone (remote secret deleted) or gave up; its objects were removed
    Closed,
}

impl SyncState {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::Syncing => "syncing",
            SyncState::Synced => "synced",
            SyncState::Timeout => "timeout",
            SyncState::Closed => "closed",
        }
    }
}

/// How one cluster's source is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    pub id: ClusterId,
    /// where the cluster's objects come from: `manifests DIR`, `kubeconfig FILE`, `in-cluster`,
    /// `remote secret NS/NAME`
    pub source: String,
    /// the remote secret that defines the cluster (`namespace/name`), if any
    pub secret_name: Option<String>,
    #[serde(rename = "syncStatus")]
    pub sync: SyncState,
    /// the cluster's API server has failed every request since then (None: reachable)
    #[serde(serialize_with = "serialize_time")]
    pub unreachable_since: Option<SystemTime>,
    /// when the source last delivered a change or completed a (re)list
    #[serde(serialize_with = "serialize_time")]
    pub last_event: Option<SystemTime>,
    /// the last problem the source met (cleared when it recovers)
    pub last_error: Option<String>,
    /// the cluster's configuration (its remote secret's kubeconfig) changed to something unusable; the
    /// previous one stays in use until it is fixed
    pub config_error: Option<String>,
    /// objects that could not be used, one line each (`Service shop/x: field: reason`); their last good
    /// version, if any, is kept until they are fixed or deleted
    pub object_errors: Vec<String>,
    /// the cluster's objects are the last-known state restored at start, last observed live at this
    /// time; cleared when the live source delivers its first complete state ([`last_known`])
    #[serde(rename = "restoredFrom", serialize_with = "serialize_restored")]
    pub restored_from: Option<SystemTime>,
}

impl ClusterStatus {
    pub fn new(id: ClusterId, source: impl Into<String>) -> ClusterStatus {
        ClusterStatus {
            id,
            source: source.into(),
            secret_name: None,
            sync: SyncState::Syncing,
            unreachable_since: None,
            last_event: None,
            last_error: None,
            config_error: None,
            object_errors: Vec::new(),
            restored_from: None,
        }
    }

    /// Unreachable for at least `grace` at `now` (its endpoints are demoted then).
    pub fn is_demoted(&self, grace: Duration, now: SystemTime) -> bool {
        self.unreachable_since.is_some_and(|since| since + grace <= now)
    }
}

/// RFC 3339 (UTC) text of a time, as the debug surface shows times.
pub fn format_time(t: SystemTime) -> String {
    match jiff::Timestamp::try_from(t) {
        Ok(ts) => ts.to_string(),
        Err(_) => format!("{t:?}"),
    }
}

/// `{observedAt, ageSeconds}` of restored state (the age as of now), or null.
pub fn restored_json(observed_at: Option<SystemTime>, now: SystemTime) -> serde_json::Value {
    match observed_at {
        None => serde_json::Value::Null,
        Some(t) => serde_json::json!({
            "observedAt": format_time(t),
            "ageSeconds": now.duration_since(t).unwrap_or_default().as_secs(),
        }),
    }
}

fn serialize_restored<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    restored_json(*t, SystemTime::now()).serialize(s)
}

fn serialize_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&format_time(*t)),
        None => s.serialize_none(),
    }
}

/// The status of every cluster of every source, shared by the sources (which write it), the debug
/// surface and metrics (which read it). Cheap to clone; every clone is the same registry.
#[derive(Clone, Debug)]
pub struct ClusterHealth {
    inner: Arc<RwLock<BTreeMap<ClusterId, ClusterStatus>>>,
    /// bumped on every change, so readers can wait for a condition
    changed: Arc<watch::Sender<u64>>,
    grace: Duration,
}

impl Default for ClusterHealth {
    fn default() -> Self {
        ClusterHealth::new(DEFAULT_GRACE)
    }
}

/// The default `unreachableGracePeriod`.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);

impl ClusterHealth {
    /// An empty registry; `grace` is the mesh config's `unreachableGracePeriod` (used by [`Self::demoted`]).
    pub fn new(grace: Duration) -> ClusterHealth {
        let (changed, _) = watch::channel(0);
        ClusterHealth { inner: Arc::default(), changed: Arc::new(changed), grace }
    }

    /// The grace period after which an unreachable cluster's endpoints are demoted.
    pub fn grace_period(&self) -> Duration {
        self.grace
    }

    fn write<R>(&self, f: impl FnOnce(&mut BTreeMap<ClusterId, ClusterStatus>) -> R) -> R {
        let r = {
            let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
            f(&mut map)
        };
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        r
    }

    fn read<R>(&self, f: impl FnOnce(&BTreeMap<ClusterId, ClusterStatus>) -> R) -> R {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        f(&map)
    }

    /// Declares a cluster (or re-declares it, resetting its status to syncing from `source`). A restored
    /// mark stays: the restored objects are served until the source syncs.
    pub fn register(&self, id: &ClusterId, source: impl Into<String>, secret_name: Option<String>) {
        let mut status = ClusterStatus::new(id.clone(), source);
        status.secret_name = secret_name;
        self.write(|m| {
            status.restored_from = m.get(id).and_then(|old| old.restored_from);
            m.insert(id.clone(), status)
        });
    }

    /// Changes a cluster's status (a cluster not registered yet is registered with an empty source).
    pub fn update(&self, id: &ClusterId, f: impl FnOnce(&mut ClusterStatus)) {
        self.write(|m| f(m.entry(id.clone()).or_insert_with(|| ClusterStatus::new(id.clone(), ""))));
    }

    /// Forgets a cluster.
    pub fn remove(&self, id: &ClusterId) {
        self.write(|m| m.remove(id));
    }

    pub fn get(&self, id: &ClusterId) -> Option<ClusterStatus> {
        self.read(|m| m.get(id).cloned())
    }

    /// Every cluster's status, by id.
    pub fn list(&self) -> Vec<ClusterStatus> {
        self.read(|m| m.values().cloned().collect())
    }

    /// The clusters unreachable for at least the grace period at `now`.
    pub fn demoted(&self, now: SystemTime) -> Vec<ClusterId> {
        self.read(|m| m.values().filter(|s| s.is_demoted(self.grace, now)).map(|s| s.id.clone()).collect())
    }

    /// Every problem of every cluster, one line each (`cluster ID: ...`), for `/debug/source_errors`.
    pub fn errors(&self) -> Vec<String> {
        self.errors_where(|_| true)
    }

    /// [`Self::errors`] of the clusters for which `pred` holds.
    pub fn errors_where(&self, pred: impl Fn(&ClusterStatus) -> bool) -> Vec<String> {
        self.read(|m| {
            let mut out = Vec::new();
            for s in m.values().filter(|s| pred(s)) {
                for e in s.last_error.iter().chain(&s.config_error) {
                    out.push(format!("cluster {}: {e}", s.id));
                }
                out.extend(s.object_errors.iter().map(|e| format!("cluster {}: {e}", s.id)));
            }
            out
        })
    }

    /// A receiver that sees a new value on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Waits until `pred` holds for the list of statuses, at most `timeout`. Returns whether it held.
    pub async fn wait_for(&self, timeout: Duration, mut pred: impl FnMut(&[ClusterStatus]) -> bool) -> bool {
        let mut rx = self.subscribe();
        tokio::time::timeout(timeout, async {
            loop {
                rx.borrow_and_update();
                if pred(&self.list()) {
                    return;
                }
                if rx.changed().await.is_err() {
                    // the sender lives in self: cannot happen; do not spin
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
        .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_serializes_as_clusterz() {
        let h = ClusterHealth::new(Duration::from_secs(60));
        let id = ClusterId::new("aws-use1");
        h.register(&id, "remote secret istio-system/istio-remote-secret-aws", Some("istio-system/s".into()));
        h.update(&id, |s| {
            s.sync = SyncState::Synced;
            s.unreachable_since = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        });
        let v = serde_json::to_value(h.list()).unwrap();
        assert_eq!(v[0]["id"], "aws-use1");
        assert_eq!(v[0]["secretName"], "istio-system/s");
        assert_eq!(v[0]["syncStatus"], "synced");
        assert_eq!(v[0]["unreachableSince"], "2023-11-14T22:13:20Z");
        assert_eq!(v[0]["lastEvent"], serde_json::Value::Null);
    }

    #[test]
    fn demotion_after_the_grace_period() {
        let h = ClusterHealth::new(Duration::from_secs(60));
        let id = ClusterId::new("c");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        h.update(&id, |s| s.unreachable_since = Some(t0));
        assert!(h.demoted(t0 + Duration::from_secs(59)).is_empty());
        assert_eq!(h.demoted(t0 + Duration::from_secs(60)), vec![id.clone()]);
        h.update(&id, |s| s.unreachable_since = None);
        assert!(h.demoted(t0 + Duration::from_secs(600)).is_empty());
    }

    #[tokio::test]
    async fn wait_for_sees_updates() {
        let h = ClusterHealth::default();
        let id = ClusterId::new("c");
        h.register(&id, "in-cluster", None);
        let h2 = h.clone();
        let id2 = id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            h2.update(&id2, |s| s.sync = SyncState::Synced);
        });
        assert!(h.wait_for(Duration::from_secs(10), |l| l.iter().all(|s| s.sync == SyncState::Synced)).await);
        assert!(!h.wait_for(Duration::from_millis(10), |l| l.is_empty()).await);
        assert_eq!(h.errors(), Vec::<String>::new());
    }
}
