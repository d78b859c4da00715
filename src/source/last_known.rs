//! The durable last-known state: meshfed keeps the Kubernetes clusters' last good state in a file
//! (mesh config `lastKnownState`) and, at start, serves it for the clusters it cannot list yet.
//!
//! ## What is kept
//!
//! Per Kubernetes cluster — those the mesh config names (`kubeconfig` or `inCluster`) and those
//! discovered from Istio remote secrets (`remoteSecrets`), with the secret that defined them; manifest
//! directories are on local disk already — the objects its live source last delivered completely — from its first complete [`SourceEvent::Sync`]
//! on, kept current by the later `Upsert`s, `Delete`s and relists — and `observedAt`, when the live
//! source last confirmed them: the last event, or, while the API server answers, the last write. It stops
//! advancing when the source reports the API unreachable ([`SourceEvent::ClusterReachability`]), so
//! the age of a file written during an outage is the age of what it holds.
//!
//! A remote-secret cluster is tracked from its first event on, once [`ClusterHealth`] names its secret
//! (the remote-secret watcher registers it before its watch starts). Its secret's name is kept as
//! `ClusterHealth` last names it, and the cluster leaves the file when its secret goes (it shows
//! `closed`, its objects removed). Nothing else places it: the registry gives a discovered cluster the
//! network of its `istio-system` Namespace's label, which is one of the kept objects, so the restored
//! cluster lands on the network the live one was on.
//!
//! Restored objects are never written back as if freshly observed: a restored cluster keeps the
//! `observedAt` it was loaded with until its live source delivers.
//!
//! The file also keeps the part of the traffic state that outlives a restart ([`crate::traffic::Durable`]),
//! handed over by the app from the push loop's snapshots ([`LastKnown::set_traffic`]) and handed back to
//! the push loop at start ([`LastKnown::restored_traffic`]):
//! - the traffic policy's failover state (per service, the failed-over clusters, since when and since
//!   when healthy again: [`crate::traffic::decide::Failed`]): a restart does not cut a cluster's
//!   `failbackAfter` short;
//! - the drills the push loop aborted (per drill key, target and start: when and why,
//!   [`crate::traffic::drill::Abort`]): a restarted meshfed does not apply an aborted drill again while
//!   the mesh config's `traffic:` still lists it, and reports it aborted with the same time and reason.
//!
//! ## Where it observes
//!
//! Data flows one way. With `lastKnownState` set, [`App::start`](crate::app::App::start) puts a tap
//! between the sources and the push loop: every event the sources send passes through
//! [`LastKnown::observe`] and on to the push loop unchanged, in order. The restored state is queued for
//! the push loop directly, before any source starts, so it never passes the tap (it is not observed as
//! live) and the first snapshot holds it. The tap clears a cluster's restored mark in [`ClusterHealth`]
//! when the cluster's first live `Sync` passes (that `Sync` replaces the restored objects exactly in the
//! registry). A writer task ([`LastKnown::run_writer`]) writes the file at most once per
//! `writeInterval`, only when something changed (or when `observedAt` of a live cluster advanced by
//! [`REFRESH`]), and only clusters whose source reports them synced (a partial state after the ready
//! timeout is served, but not kept).
//!
//! ## At start
//!
//! [`LastKnown::open`] reads the file. A missing file restores nothing; an unreadable or corrupt one, or
//! one of another format version, is reported (path and reason) and ignored. For every cluster the mesh
//! config still names with a Kubernetes source, and every remote-secret cluster the mesh config does not
//! name when it still has `remoteSecrets` in the secret's namespace, whose state is at most `maxAge` old,
//! it returns a `Sync` of the restored objects and marks the cluster `restoredFrom` its `observedAt` in
//! [`ClusterHealth`] (shown by `/debug/clusterz` with its age, exported as
//! `meshfed_cluster_restored_state_age_seconds`); a remote-secret cluster is registered there with its
//! secret first, as the remote-secret watcher would. A restored cluster counts as ready for the readiness
//! wait, and its source does not replace the restored objects with an empty partial state at the ready
//! timeout: it waits for the cluster to answer. Older state is dropped (logged), and restored state that
//! reaches `maxAge` while its cluster still does not answer stops being served then
//! ([`LastKnown::expire_restored`]: the tap sends the cluster an empty `Sync`; its status says why).
//!
//! Restored remote-secret clusters are served whether or not the config cluster answers: while it serves
//! restored state itself, the readiness wait does not wait for the secrets' list. When the list comes,
//! the remote-secret watcher starts the clusters of the listed secrets (a restored one stays restored
//! until its own API answers) and removes a restored cluster that has no secret in it, as a deleted
//! secret's cluster ([`crate::source::kube::remote_secrets`]).
//!
//! ## The file
//!
//! One JSON document, not pretty-printed: a header (`format`, `version` = [`FORMAT_VERSION`],
//! `meshfedVersion`, `writtenAt`) and per cluster its id, `remoteSecret` (`namespace/name`, only for a
//! remote-secret cluster), `observedAt` (RFC 3339) and objects, in the
//! compact forms the registry keeps ([`TopologyObject`]); a DestinationRule is kept as the part of its
//! object that its conversion reads ([`DestinationRuleInfo::source`]) and converted again when
//! restored, so invalid rules round-trip as invalid. It is written atomically: a temporary file in the
//! same directory, fsync, rename over the old one, fsync of the directory. A change of the persisted
//! shapes must bump [`FORMAT_VERSION`] (`a_version_1_document_still_reads` pins the shape), except an
//! optional field that readers without it may ignore: `failover` and `drillAborts` (each absent when
//! empty; a meshfed that does not know them ignores them) and `remoteSecret` were added so, in version 1
//! (a file without them reads as before; a meshfed that does not know `remoteSecret` drops the
//! remote-secret clusters, which its mesh config does not name).
//!
//! The tap keeps a copy of the tracked clusters' objects (shared strings, so mostly the maps); a write
//! takes the objects as they are (copy-on-write) and encodes and writes them on a blocking thread.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::mesh_config::{LastKnownState, MeshConfig};
use crate::model::ClusterId;
use crate::source::{ClusterHealth, SourceEvent, SyncState, format_time};
use crate::topology::{
    DestinationRuleInfo, NamespaceInfo, NodeInfo, ObjectKey, PodInfo, ServiceInfo, SliceInfo, TopologyObject,
};
use crate::traffic::Durable;

/// The `format` field of the file.
pub const FORMAT: &str = "meshfed-last-known-state";
/// The version of the file's format this meshfed reads and writes.
pub const FORMAT_VERSION: u64 = 1;
/// A live cluster whose API server answers has its `observedAt` rewritten at least this often (when
/// nothing else changed): the precision of a restored state's age.
pub const REFRESH: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the last-known state {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the last-known state {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "the last-known state {path} has format version {found} (written by meshfed {written_by}); this meshfed reads version {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u64, written_by: String },
    #[error("cannot write the last-known state {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot encode the last-known state: {0}")]
    Encode(#[from] serde_json::Error),
}

// ---- the file's shapes ----

/// An object as the file holds it (serialized from borrowed objects, read into owned ones).
#[derive(Serialize)]
enum StoredObjectRef<'a> {
    Namespace(&'a NamespaceInfo),
    Service(&'a ServiceInfo),
    EndpointSlice(&'a SliceInfo),
    Node(&'a NodeInfo),
    Pod(&'a PodInfo),
    DestinationRule(&'a serde_json::Value),
}

#[derive(Deserialize)]
enum StoredObject {
    Namespace(NamespaceInfo),
    Service(ServiceInfo),
    EndpointSlice(SliceInfo),
    Node(NodeInfo),
    Pod(PodInfo),
    DestinationRule(serde_json::Value),
}

impl<'a> StoredObjectRef<'a> {
    /// None: a DestinationRule without its source (it cannot be converted again; not kept).
    fn from_object(o: &'a TopologyObject) -> Option<StoredObjectRef<'a>> {
        Some(match o {
            TopologyObject::Namespace(x) => StoredObjectRef::Namespace(x),
            TopologyObject::Service(x) => StoredObjectRef::Service(x),
            TopologyObject::EndpointSlice(x) => StoredObjectRef::EndpointSlice(x),
            TopologyObject::Node(x) => StoredObjectRef::Node(x),
            TopologyObject::Pod(x) => StoredObjectRef::Pod(x),
            TopologyObject::DestinationRule(d) => StoredObjectRef::DestinationRule(d.source.as_deref()?),
        })
    }
}

impl StoredObject {
    fn into_object(self) -> Result<TopologyObject, String> {
        Ok(match self {
            StoredObject::Namespace(x) => TopologyObject::Namespace(x),
            StoredObject::Service(x) => TopologyObject::Service(x),
            StoredObject::EndpointSlice(x) => TopologyObject::EndpointSlice(x),
            StoredObject::Node(x) => TopologyObject::Node(x),
            StoredObject::Pod(x) => TopologyObject::Pod(x),
            StoredObject::DestinationRule(v) => {
                let yaml = serde_yaml::to_value(&v).map_err(|e| format!("DestinationRule: {e}"))?;
                TopologyObject::DestinationRule(DestinationRuleInfo::from_value(yaml)?)
            }
        })
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DocumentRef<'a> {
    format: &'static str,
    version: u64,
    meshfed_version: &'static str,
    written_at: String,
    clusters: Vec<ClusterRef<'a>>,
    /// the traffic policy's failed-over clusters (optional: absent when none, so such a file is byte for
    /// byte what version 1 wrote before)
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    failover: BTreeMap<&'a str, BTreeMap<&'a str, StoredFailed>>,
    /// the drills the push loop aborted, by drill key (optional: absent when none)
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    drill_aborts: BTreeMap<&'a str, StoredAbort>,
}

/// A failed-over cluster of a service ([`crate::traffic::decide::Failed`]), RFC 3339 times.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredFailed {
    since: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    back_since: Option<String>,
}

/// A drill's abort ([`crate::traffic::drill::Abort`]), the time RFC 3339.
#[derive(Serialize, Deserialize)]
struct StoredAbort {
    at: String,
    reason: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ClusterRef<'a> {
    id: &'a str,
    /// a cluster discovered from a remote secret: the secret (`namespace/name`); absent for the clusters the
    /// mesh config names (so a file without remote-secret clusters is byte for byte what version 1 wrote)
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_secret: Option<&'a str>,
    observed_at: String,
    objects: Vec<StoredObjectRef<'a>>,
}

/// The header, read first: a document of another version is refused by its version, whatever its body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    format: Option<String>,
    version: Option<u64>,
    #[serde(default)]
    meshfed_version: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    clusters: Vec<StoredCluster>,
    #[serde(default)]
    failover: BTreeMap<String, BTreeMap<String, StoredFailed>>,
    #[serde(default)]
    drill_aborts: BTreeMap<String, StoredAbort>,
}

/// What a file holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Loaded {
    pub clusters: Vec<ClusterState>,
    /// the failover state and the drills' aborts
    pub traffic: Durable,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredCluster {
    id: String,
    #[serde(default)]
    remote_secret: Option<String>,
    observed_at: String,
    objects: Vec<StoredObject>,
}

/// One cluster's state as read from the file.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterState {
    pub cluster: ClusterId,
    /// the remote secret (`namespace/name`) that defined the cluster; None for a cluster the mesh config
    /// names
    pub remote_secret: Option<String>,
    /// when the live source last confirmed the objects
    pub observed_at: SystemTime,
    pub objects: Vec<TopologyObject>,
}

/// One cluster's state to write.
struct Kept {
    id: ClusterId,
    remote_secret: Option<String>,
    observed_at: SystemTime,
    objects: Objects,
}

/// Encodes the clusters' states (and the traffic state) as the file holds them.
fn encode<'a>(
    clusters: impl IntoIterator<Item = &'a Kept>,
    traffic: &'a Durable,
    now: SystemTime,
) -> Result<Vec<u8>, Error> {
    let failover = traffic
        .failover
        .iter()
        .map(|(host, f)| {
            let clusters = f.iter().map(|(c, failed)| {
                let stored =
                    StoredFailed { since: format_time(failed.since), back_since: failed.back_since.map(format_time) };
                (c.as_str(), stored)
            });
            (&**host, clusters.collect())
        })
        .collect();
    let drill_aborts = traffic
        .drill_aborts
        .iter()
        .map(|(key, a)| (key.as_str(), StoredAbort { at: format_time(a.at), reason: a.reason.clone() }))
        .collect();
    let doc = DocumentRef {
        failover,
        drill_aborts,
        format: FORMAT,
        version: FORMAT_VERSION,
        meshfed_version: env!("CARGO_PKG_VERSION"),
        written_at: format_time(now),
        clusters: clusters
            .into_iter()
            .map(|k| ClusterRef {
                id: k.id.as_str(),
                remote_secret: k.remote_secret.as_deref(),
                observed_at: format_time(k.observed_at),
                objects: k.objects.values().filter_map(StoredObjectRef::from_object).collect(),
            })
            .collect(),
    };
    Ok(serde_json::to_vec(&doc)?)
}

/// Decodes a file's text. Objects that cannot be converted again are dropped (logged); anything else
/// wrong makes the whole file corrupt.
fn decode(path: &Path, bytes: &[u8]) -> Result<Loaded, Error> {
    let corrupt = |reason: String| Error::Corrupt { path: path.to_path_buf(), reason };
    let header: Header = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if header.format.as_deref() != Some(FORMAT) {
        return Err(corrupt(format!("`format` is {:?}, not {FORMAT:?}", header.format.unwrap_or_default())));
    }
    let version = header.version.ok_or_else(|| corrupt("no `version`".into()))?;
    if version != FORMAT_VERSION {
        return Err(Error::Version {
            path: path.to_path_buf(),
            found: version,
            written_by: header.meshfed_version.unwrap_or_else(|| "?".into()),
        });
    }
    // (the error names the field: `drillAborts: invalid type: ...`)
    let doc: Document = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(bytes))
        .map_err(|e| corrupt(e.to_string()))?;
    let mut out = Vec::new();
    for c in doc.clusters {
        let observed_at = c
            .observed_at
            .parse::<jiff::Timestamp>()
            .map(SystemTime::from)
            .map_err(|e| corrupt(format!("cluster {}: observedAt {:?}: {e}", c.id, c.observed_at)))?;
        let mut objects = Vec::with_capacity(c.objects.len());
        for o in c.objects {
            match o.into_object() {
                Ok(o) => objects.push(o),
                Err(reason) => warn!(path = %path.display(), cluster = %c.id, "restored object dropped: {reason}"),
            }
        }
        out.push(ClusterState { cluster: ClusterId::new(&c.id), remote_secret: c.remote_secret, observed_at, objects });
    }
    let time = |host: &str, what: &str, t: &str| {
        t.parse::<jiff::Timestamp>()
            .map(SystemTime::from)
            .map_err(|e| corrupt(format!("failover of {host}: {what} {t:?}: {e}")))
    };
    let mut traffic = Durable::default();
    for (host, clusters) in doc.failover {
        let mut state = crate::traffic::FailoverState::new();
        for (cluster, f) in clusters {
            let since = time(&host, "since", &f.since)?;
            let back_since = f.back_since.as_deref().map(|t| time(&host, "backSince", t)).transpose()?;
            state.insert(ClusterId::new(&cluster), crate::traffic::decide::Failed { since, back_since });
        }
        traffic.failover.insert(host.as_str().into(), state);
    }
    for (key, a) in doc.drill_aborts {
        let at =
            a.at.parse::<jiff::Timestamp>()
                .map(SystemTime::from)
                .map_err(|e| corrupt(format!("drillAborts of {key}: at {:?}: {e}", a.at)))?;
        traffic.drill_aborts.insert(key, crate::traffic::drill::Abort { at, reason: a.reason });
    }
    Ok(Loaded { clusters: out, traffic })
}

/// Reads the file: None when there is none.
pub fn read(path: &Path) -> Result<Option<Loaded>, Error> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(Error::Read { path: path.to_path_buf(), source }),
    };
    decode(path, &bytes).map(Some)
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename, fsync of the
/// directory. On failure the previous file is left whole and the temporary file removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let err = |source| Error::Write { path: path.to_path_buf(), source };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = dir.join(name);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    // the rename is durable once the directory is (best effort: not every file system allows it)
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

// ---- the store ----

/// A cluster's objects by key, shared with a write in progress (copy-on-write).
type Objects = Arc<BTreeMap<ObjectKey, TopologyObject>>;

/// An encoded file and the `observedAt` of each cluster it holds.
struct Due {
    bytes: Vec<u8>,
    observed: BTreeMap<ClusterId, SystemTime>,
}

/// One tracked cluster.
#[derive(Debug, Default)]
struct Tracked {
    /// a cluster discovered from a remote secret: that secret (`namespace/name`), as last known
    remote_secret: Option<String>,
    /// what the live source delivered (after its first Sync in this process)
    live: Option<Live>,
    /// what was restored at start, kept as loaded until the live source's state is kept instead
    restored: Option<(SystemTime, Objects)>,
}

#[derive(Debug)]
struct Live {
    objects: Objects,
    observed_at: SystemTime,
    /// the source last said the API answers
    reachable: bool,
    /// the source reported the cluster synced (its objects are complete): kept from then on
    complete: bool,
}

#[derive(Debug, Default)]
struct State {
    clusters: BTreeMap<ClusterId, Tracked>,
    /// something to write changed since the last write
    dirty: bool,
    /// `observedAt` of each cluster as last written
    written: BTreeMap<ClusterId, SystemTime>,
    /// the last write error (logged once until it changes)
    last_error: Option<String>,
    /// the failover state and the drills' aborts, as last handed over ([`LastKnown::set_traffic`])
    traffic: Durable,
}

/// The last-known state of the mesh's Kubernetes clusters, named and discovered from remote secrets (see
/// the module docs).
#[derive(Debug)]
pub struct LastKnown {
    config: LastKnownState,
    health: ClusterHealth,
    /// every cluster the mesh config names (whatever its source): never a remote-secret cluster
    named: BTreeSet<ClusterId>,
    /// the namespace of the remote secrets (mesh config `remoteSecrets`); None: no remote-secret cluster
    /// is tracked
    remote_namespace: Option<String>,
    state: Mutex<State>,
}

/// How a remote secret is named in [`ClusterHealth`] and the source description (`namespace/name`).
fn remote_source(secret: &str) -> String {
    format!("remote secret {secret}")
}

impl LastKnown {
    /// Reads the file and restores what is fresh enough: returns the store and, per restored cluster, the
    /// `Sync` to queue before any source starts (restored clusters are marked in `health`; a restored
    /// remote-secret cluster is registered there with its secret). Never fails: a file that cannot be used
    /// is logged and ignored.
    pub fn open(
        config: &LastKnownState,
        mesh: &MeshConfig,
        health: &ClusterHealth,
        now: SystemTime,
    ) -> (LastKnown, Vec<SourceEvent>) {
        let named: BTreeSet<ClusterId> = mesh.clusters.iter().map(|c| c.id.clone()).collect();
        let remote_namespace = mesh.remote_secrets.as_ref().map(|rs| rs.namespace.clone());
        let mut state = State::default();
        for c in mesh.clusters.iter().filter(|c| c.source.is_kubernetes()) {
            state.clusters.insert(c.id.clone(), Tracked::default());
        }
        let mut events = Vec::new();
        let loaded = match read(&config.path) {
            Ok(Some(l)) => l,
            Ok(None) => {
                info!(path = %config.path.display(), "no last-known state to restore");
                Loaded::default()
            }
            Err(e) => {
                warn!("{e}; starting without restoring it");
                Loaded::default()
            }
        };
        if !loaded.traffic.failover.is_empty() {
            info!(services = loaded.traffic.failover.len(), "restored the traffic policy's failed-over clusters");
        }
        if !loaded.traffic.drill_aborts.is_empty() {
            info!(drills = ?loaded.traffic.drill_aborts.keys().collect::<Vec<_>>(), "restored the drills' aborts");
        }
        state.traffic = loaded.traffic;
        for c in loaded.clusters {
            let age = now.duration_since(c.observed_at).unwrap_or_default();
            // a cluster the mesh config names is restored as named (even if a remote secret defined it
            // before); one it does not name only as a remote-secret cluster of the same namespace
            let remote = match (&c.remote_secret, &remote_namespace) {
                _ if named.contains(&c.cluster) => None,
                (Some(secret), Some(ns)) if secret.strip_prefix(ns.as_str()).is_some_and(|r| r.starts_with('/')) => {
                    Some(secret.clone())
                }
                _ => {
                    info!(cluster = %c.cluster, remote_secret = ?c.remote_secret, "last-known state of a cluster the mesh config does not name (with a Kubernetes source) nor discovers from remote secrets in its namespace; dropped");
                    continue;
                }
            };
            if remote.is_none() && !state.clusters.contains_key(&c.cluster) {
                info!(cluster = %c.cluster, "last-known state of a cluster the mesh config does not name with a Kubernetes source; dropped");
                continue;
            }
            if age > config.max_age {
                warn!(cluster = %c.cluster, ?age, max_age = ?config.max_age, observed_at = %format_time(c.observed_at), "last-known state older than lastKnownState.maxAge; not restored");
                continue;
            }
            info!(cluster = %c.cluster, remote_secret = ?remote, objects = c.objects.len(), ?age, observed_at = %format_time(c.observed_at), "restored the last-known state; served until the cluster answers");
            if let Some(secret) = &remote {
                health.register(&c.cluster, remote_source(secret), Some(secret.clone()));
            }
            let objects: BTreeMap<ObjectKey, TopologyObject> = c.objects.iter().map(|o| (o.key(), o.clone())).collect();
            health.update(&c.cluster, |s| s.restored_from = Some(c.observed_at));
            state.written.insert(c.cluster.clone(), c.observed_at);
            let entry = state.clusters.entry(c.cluster.clone()).or_default();
            entry.remote_secret = remote;
            entry.restored = Some((c.observed_at, Arc::new(objects)));
            events.push(SourceEvent::Sync { cluster: c.cluster, objects: c.objects });
        }
        // what was dropped (too old, clusters gone) leaves the file at the first write
        state.dirty = true;
        let store = LastKnown {
            config: config.clone(),
            health: health.clone(),
            named,
            remote_namespace,
            state: Mutex::new(state),
        };
        (store, events)
    }

    /// The traffic state read from the file at start (to hand to the push loop before its first push).
    pub fn restored_traffic(&self) -> Durable {
        self.lock().traffic.clone()
    }

    /// The push loop's traffic state now: written with the next write when it changed, so that a
    /// restarted meshfed keeps a failed-over cluster away until its `failbackAfter` has passed and does
    /// not apply an aborted drill again.
    pub fn set_traffic(&self, traffic: &Durable) {
        let mut state = self.lock();
        if state.traffic != *traffic {
            state.traffic = traffic.clone();
            state.dirty = true;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The remote secret of a cluster discovered from one, as [`ClusterHealth`] knows it, while its
    /// secret exists (not `closed`); None for any other cluster.
    fn discovered(&self, id: &ClusterId) -> Option<String> {
        if self.remote_namespace.is_none() || self.named.contains(id) {
            return None;
        }
        self.health.get(id).filter(|s| s.sync != SyncState::Closed)?.secret_name
    }

    /// Sees an event of a live source on its way to the push loop.
    pub fn observe(&self, event: &SourceEvent, now: SystemTime) {
        let mut guard = self.lock();
        let state = &mut *guard;
        if !state.clusters.contains_key(event.cluster()) {
            // a cluster discovered from a remote secret is tracked from its first event on
            let Some(secret) = self.discovered(event.cluster()) else { return };
            let tracked = Tracked { remote_secret: Some(secret), ..Tracked::default() };
            state.clusters.insert(event.cluster().clone(), tracked);
        }
        let Some(entry) = state.clusters.get_mut(event.cluster()) else { return };
        match event {
            SourceEvent::Sync { cluster, objects } => {
                let objects: BTreeMap<ObjectKey, TopologyObject> =
                    objects.iter().map(|o| (o.key(), o.clone())).collect();
                let complete = entry.live.as_ref().is_some_and(|l| l.complete);
                entry.live = Some(Live { objects: Arc::new(objects), observed_at: now, reachable: true, complete });
                state.dirty |= complete;
                if entry.restored.is_some() {
                    // the restored objects are replaced in the registry by this Sync
                    self.health.update(cluster, |s| s.restored_from = None);
                    info!(cluster = %cluster, "the live state replaces the restored last-known state");
                }
            }
            SourceEvent::Upsert { object, .. } => {
                if let Some(live) = &mut entry.live {
                    Arc::make_mut(&mut live.objects).insert(object.key(), object.clone());
                    live.observed_at = now;
                    state.dirty |= live.complete;
                }
            }
            SourceEvent::Delete { key, .. } => {
                if let Some(live) = &mut entry.live {
                    Arc::make_mut(&mut live.objects).remove(key);
                    live.observed_at = now;
                    state.dirty |= live.complete;
                }
            }
            SourceEvent::ClusterReachability { reachable, .. } => {
                if let Some(live) = &mut entry.live {
                    live.reachable = *reachable;
                }
            }
        }
    }

    /// Restored state that reached `maxAge` while its cluster still has not answered: it is no longer
    /// served. Returns those clusters (their restored mark cleared, the reason in their status); the
    /// caller sends each an empty `Sync` so the registry drops the objects.
    pub fn expire_restored(&self, now: SystemTime) -> Vec<ClusterId> {
        let mut state = self.lock();
        let mut expired = Vec::new();
        for (id, entry) in &mut state.clusters {
            let Some((observed_at, _)) = &entry.restored else { continue };
            let served = self.health.get(id).is_some_and(|s| s.restored_from.is_some());
            if !served || observed_at.checked_add(self.config.max_age).is_none_or(|end| end > now) {
                continue;
            }
            let observed_at = *observed_at;
            warn!(cluster = %id, observed_at = %format_time(observed_at), max_age = ?self.config.max_age, "the restored last-known state reached lastKnownState.maxAge before the cluster answered: no longer served");
            self.health.update(id, |s| {
                s.restored_from = None;
                s.last_error = Some(format!(
                    "restored last-known state observed at {} reached lastKnownState.maxAge ({:?}) before the cluster answered: no longer served",
                    format_time(observed_at),
                    self.config.max_age
                ));
            });
            entry.restored = None;
            expired.push(id.clone());
        }
        state.dirty |= !expired.is_empty();
        expired
    }

    /// When restored state still served reaches `maxAge` next (see [`Self::expire_restored`]).
    pub fn next_expiry(&self) -> Option<SystemTime> {
        let state = self.lock();
        state
            .clusters
            .iter()
            .filter(|(id, _)| self.health.get(id).is_some_and(|s| s.restored_from.is_some()))
            .filter_map(|(_, e)| e.restored.as_ref().and_then(|(at, _)| at.checked_add(self.config.max_age)))
            .min()
    }

    /// What to write now, encoded, if anything (see the module docs); `observedAt` of the live clusters
    /// whose API answers advances to `now`.
    fn due(&self, now: SystemTime) -> Result<Option<Due>, Error> {
        let refresh = REFRESH.max(self.config.write_interval);
        let mut guard = self.lock();
        let state = &mut *guard;
        // remote-secret clusters whose secret is gone (closed, its objects removed) are no longer kept; one
        // that is still restored stays (a secret whose kubeconfig cannot be used keeps the restored state)
        let mut gone = Vec::new();
        for (id, entry) in state.clusters.iter_mut().filter(|(_, e)| e.remote_secret.is_some()) {
            match self.health.get(id) {
                Some(s) if s.sync != SyncState::Closed || s.restored_from.is_some() => {
                    if s.secret_name.is_some() && s.secret_name != entry.remote_secret {
                        entry.remote_secret = s.secret_name;
                        state.dirty = true;
                    }
                }
                _ => gone.push(id.clone()),
            }
        }
        for id in gone {
            debug!(cluster = %id, "the remote secret of the cluster is gone: its last-known state leaves the file");
            state.clusters.remove(&id);
            state.written.remove(&id);
            state.dirty = true;
        }
        let mut keep: Vec<Kept> = Vec::new();
        let mut refresh_due = false;
        for (id, entry) in &mut state.clusters {
            let remote_secret = entry.remote_secret.clone();
            if let Some(live) = &mut entry.live {
                if !live.complete && self.health.get(id).is_some_and(|s| s.sync == SyncState::Synced) {
                    live.complete = true;
                    state.dirty = true;
                }
                if live.complete {
                    if live.reachable {
                        live.observed_at = live.observed_at.max(now);
                    }
                    let written = state.written.get(id).copied().unwrap_or(SystemTime::UNIX_EPOCH);
                    refresh_due |= live.observed_at.duration_since(written).unwrap_or_default() >= refresh;
                    entry.restored = None;
                    let (observed_at, objects) = (live.observed_at, live.objects.clone());
                    keep.push(Kept { id: id.clone(), remote_secret, observed_at, objects });
                    continue;
                }
            }
            if let Some((observed_at, objects)) = &entry.restored {
                keep.push(Kept { id: id.clone(), remote_secret, observed_at: *observed_at, objects: objects.clone() });
            }
        }
        if !state.dirty && !refresh_due {
            return Ok(None);
        }
        state.dirty = false;
        let traffic = state.traffic.clone();
        drop(guard);
        let bytes = encode(&keep, &traffic, now)?;
        Ok(Some(Due { bytes, observed: keep.into_iter().map(|k| (k.id, k.observed_at)).collect() }))
    }

    /// Writes the file if something is due (see the module docs). On failure what was due stays due.
    pub fn write_now(&self, now: SystemTime) -> Result<bool, Error> {
        let Some(Due { bytes, observed: written }) = self.due(now)? else { return Ok(false) };
        let result = write_atomic(&self.config.path, &bytes);
        let mut state = self.lock();
        match result {
            Ok(()) => {
                debug!(path = %self.config.path.display(), bytes = bytes.len(), clusters = written.len(), "last-known state written");
                state.written = written;
                state.last_error = None;
                Ok(true)
            }
            Err(e) => {
                state.dirty = true;
                Err(e)
            }
        }
    }

    /// Writes the file every `writeInterval` when something is due, until dropped (the file I/O runs on a
    /// blocking thread). Write errors are logged (once until they change) and retried.
    pub async fn run_writer(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.write_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let store = self.clone();
            let result = tokio::task::spawn_blocking(move || store.write_now(SystemTime::now())).await;
            if let Ok(Err(e)) = result {
                let message = e.to_string();
                let mut state = self.lock();
                if state.last_error.as_ref() != Some(&message) {
                    warn!("{message}; retrying");
                    state.last_error = Some(message);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Locality, NetworkId};
    use crate::topology::{ServicePortInfo, SliceEndpoint};

    const T0: u64 = 1_700_000_000;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn mesh() -> MeshConfig {
        MeshConfig::parse(
            "clusters:\n  - {id: a, network: n, kubeconfig: a.yaml}\n  - {id: b, network: n, inCluster: true}\n  - {id: files, network: n, manifests: m}\n",
            Path::new("/nonexistent"),
        )
        .unwrap()
    }

    fn config(dir: &Path) -> LastKnownState {
        LastKnownState {
            path: dir.join("state/last-known.json"),
            max_age: Duration::from_secs(3600),
            write_interval: Duration::from_millis(10),
        }
    }

    fn slice(name: &str, ip: &str) -> TopologyObject {
        TopologyObject::EndpointSlice(SliceInfo {
            namespace: "shop".into(),
            name: name.into(),
            service: "reviews".into(),
            ports: vec![("http".into(), 9080)],
            endpoints: vec![SliceEndpoint {
                addresses: vec![ip.parse().unwrap()],
                ready: Some(true),
                serving: None,
                terminating: Some(false),
                node_name: Some("n1".into()),
                zone: None,
                pod: Some("reviews-1".into()),
            }],
        })
    }

    fn rule(yaml: &str) -> TopologyObject {
        TopologyObject::DestinationRule(DestinationRuleInfo::from_value(serde_yaml::from_str(yaml).unwrap()).unwrap())
    }

    /// One of each kind, with the optional fields set.
    fn objects() -> Vec<TopologyObject> {
        let labels: crate::model::Labels = Arc::new([("app".to_string(), "reviews".to_string())].into());
        vec![
            TopologyObject::Namespace(NamespaceInfo { name: "shop".into(), network: Some(NetworkId::new("net")) }),
            TopologyObject::Service(ServiceInfo {
                namespace: "shop".into(),
                name: "reviews".into(),
                ports: vec![ServicePortInfo {
                    name: "http".into(),
                    port: 9080,
                    protocol: "TCP".into(),
                    app_protocol: Some("http".into()),
                    node_port: None,
                }],
                network: None,
                gateway_port: Some(15443),
                service_type: "ClusterIP".into(),
                external_ips: vec!["1.2.3.4".into()],
                load_balancer_ingress: vec![],
            }),
            slice("reviews-a", "10.0.0.1"),
            TopologyObject::Node(NodeInfo { name: "n1".into(), locality: Locality::new("r", "z", "") }),
            TopologyObject::Pod(PodInfo {
                namespace: "shop".into(),
                name: "reviews-1".into(),
                labels,
                service_account: "reviews".into(),
                node_name: Some("n1".into()),
                network: None,
                failed: false,
            }),
            rule(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r, namespace: shop, creationTimestamp: '2024-01-02T03:04:05Z', resourceVersion: '7'}\nspec:\n  host: reviews\n  trafficPolicy: {outlierDetection: {consecutive5xxErrors: 3}}\n  subsets: [{name: v1, labels: {version: v1}}]\n",
            ),
            // an invalid rule stays invalid, with the same reason
            rule(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: bad, namespace: shop}\nspec: {host: ''}\n",
            ),
        ]
    }

    fn sync(cluster: &str, objects: Vec<TopologyObject>) -> SourceEvent {
        SourceEvent::Sync { cluster: ClusterId::new(cluster), objects }
    }

    /// A store that saw cluster `a` sync `objects`, synced by its source, written at `now`.
    fn written(cfg: &LastKnownState, objects: Vec<TopologyObject>, now: SystemTime) -> (LastKnown, ClusterHealth) {
        let health = ClusterHealth::default();
        let (store, events) = LastKnown::open(cfg, &mesh(), &health, now);
        assert!(events.is_empty());
        store.observe(&sync("a", objects), now);
        health.update(&ClusterId::new("a"), |s| s.sync = SyncState::Synced);
        assert!(store.write_now(now).unwrap());
        (store, health)
    }

    #[test]
    fn the_failover_state_is_written_when_it_changes_and_restored() {
        use crate::traffic::decide::Failed;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (store, _health) = written(&cfg, vec![slice("s", "10.0.0.1")], at(T0));
        assert!(!std::fs::read_to_string(&cfg.path).unwrap().contains("failover"), "absent while empty");
        let failed = Failed { since: at(T0 + 1), back_since: Some(at(T0 + 5)) };
        let traffic = Durable {
            failover: [("ratings.shop.svc.cluster.local".into(), [(ClusterId::new("b"), failed)].into())].into(),
            ..Durable::default()
        };
        store.set_traffic(&traffic);
        assert!(store.write_now(at(T0 + 6)).unwrap(), "a change of the failover state is due");
        store.set_traffic(&traffic);
        assert!(!store.write_now(at(T0 + 7)).unwrap(), "the same state again: nothing due");
        assert_eq!(read(&cfg.path).unwrap().unwrap().traffic, traffic);
        let (again, _) = LastKnown::open(&cfg, &mesh(), &ClusterHealth::default(), at(T0 + 8));
        assert_eq!(again.restored_traffic(), traffic);
    }

    const DRILL: &str = "cluster azure-weu @ 2023-11-14T22:13:20Z";

    fn aborted(secs: u64, reason: &str) -> Durable {
        let abort = crate::traffic::drill::Abort { at: at(secs), reason: reason.into() };
        Durable { drill_aborts: [(DRILL.to_string(), abort)].into(), ..Durable::default() }
    }

    #[test]
    fn the_drills_aborts_are_written_when_they_change_and_restored() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (store, _health) = written(&cfg, vec![slice("s", "10.0.0.1")], at(T0));
        assert!(!std::fs::read_to_string(&cfg.path).unwrap().contains("drillAborts"), "absent while empty");
        let traffic = aborted(T0 + 60, "aws-use1: 0 of 2 endpoints of ratings healthy");
        store.set_traffic(&traffic);
        assert!(store.write_now(at(T0 + 61)).unwrap(), "an abort is due");
        let text = std::fs::read_to_string(&cfg.path).unwrap();
        assert!(
            text.contains(&format!(
                r#""drillAborts":{{"{DRILL}":{{"at":"2023-11-14T22:14:20Z","reason":"aws-use1: 0 of 2 endpoints"#
            )),
            "{text}"
        );
        assert!(!text.contains("failover"), "{text}");
        store.set_traffic(&traffic);
        assert!(!store.write_now(at(T0 + 62)).unwrap(), "the same aborts again: nothing due");
        // restored with the clusters' state, exactly (time to the nanosecond, reason)
        let precise =
            crate::traffic::drill::Abort { at: at(T0 + 60) + Duration::from_nanos(123_456_789), reason: "r".into() };
        let traffic = Durable { drill_aborts: [(DRILL.to_string(), precise)].into(), ..Durable::default() };
        store.set_traffic(&traffic);
        assert!(store.write_now(at(T0 + 63)).unwrap());
        assert_eq!(read(&cfg.path).unwrap().unwrap().traffic, traffic);
        let health = ClusterHealth::default();
        let (again, events) = LastKnown::open(&cfg, &mesh(), &health, at(T0 + 64));
        assert_eq!((again.restored_traffic(), events.len()), (traffic, 1));
        // the drill gone from the push loop's state: it leaves the file
        again.set_traffic(&Durable::default());
        assert!(again.write_now(at(T0 + 65)).unwrap());
        assert!(!std::fs::read_to_string(&cfg.path).unwrap().contains("drillAborts"));
        assert_eq!(read(&cfg.path).unwrap().unwrap().traffic, Durable::default());
    }

    #[test]
    fn corrupt_drill_aborts_are_reported_by_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        std::fs::create_dir_all(cfg.path.parent().unwrap()).unwrap();
        let head = r#"{"format":"meshfed-last-known-state","version":1,"meshfedVersion":"0.1.0","writtenAt":"2023-11-14T22:13:20Z","clusters":[{"id":"a","observedAt":"2023-11-14T22:13:20Z","objects":[]}]"#;
        for (field, why) in [
            (r#""drillAborts":{"d":{"at":"yesterday","reason":"r"}}"#, r#"drillAborts of d: at "yesterday""#),
            (r#""drillAborts":{"d":{"at":"2023-11-14T22:13:20Z"}}"#, "drillAborts.d: missing field `reason`"),
            (r#""drillAborts":["d"]"#, "drillAborts: invalid type"),
            (r#""drillAborts":{"d":{"at":7,"reason":"r"}}"#, "drillAborts.d.at: invalid type"),
        ] {
            let text = format!("{head},{field}}}");
            std::fs::write(&cfg.path, &text).unwrap();
            let e = read(&cfg.path).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(&cfg.path.display().to_string()), "{text}: {e}");
            // as any corrupt file: nothing restored
            let health = ClusterHealth::default();
            let (store, events) = LastKnown::open(&cfg, &mesh(), &health, at(T0 + 1));
            assert!(events.is_empty() && store.restored_traffic() == Durable::default(), "{text}");
        }
        // a field this meshfed does not know (a later meshfed's optional one) is ignored, as an older
        // meshfed ignores `drillAborts`
        std::fs::write(&cfg.path, format!(r#"{head},"somethingLater":{{"x":[1]}}}}"#)).unwrap();
        let loaded = read(&cfg.path).unwrap().unwrap();
        assert_eq!((loaded.clusters.len(), loaded.traffic), (1, Durable::default()));
    }

    #[test]
    fn round_trip_restores_every_kind_and_marks_the_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        written(&cfg, objects(), at(T0));
        let text = std::fs::read_to_string(&cfg.path).unwrap();
        assert!(!text.contains('\n'), "compact: {text}");
        assert!(text.starts_with("{\"format\":\"meshfed-last-known-state\",\"version\":1,"), "{text}");
        assert!(!text.contains("resourceVersion"), "only what the conversion reads: {text}");

        let health = ClusterHealth::default();
        let (_store, events) = LastKnown::open(&cfg, &mesh(), &health, at(T0 + 600));
        let [SourceEvent::Sync { cluster, objects: restored }] = &events[..] else { panic!("{events:?}") };
        assert_eq!(cluster.as_str(), "a");
        let mut expected = objects();
        expected.sort_by_key(TopologyObject::key);
        assert_eq!(restored, &expected);
        let TopologyObject::DestinationRule(bad) = restored.iter().find(|o| o.key().name.as_ref() == "bad").unwrap()
        else {
            panic!()
        };
        assert!(bad.rule.as_ref().is_err_and(|e| e.to_string().contains("spec.host")), "{:?}", bad.rule);
        let status = health.get(cluster).unwrap();
        assert_eq!(status.restored_from, Some(at(T0)));
        let v = serde_json::to_value(&status).unwrap();
        assert_eq!(v["restoredFrom"]["observedAt"], "2023-11-14T22:13:20Z");
    }

    #[test]
    fn a_version_1_document_still_reads() {
        let text = r#"{"format":"meshfed-last-known-state","version":1,"meshfedVersion":"0.1.0","writtenAt":"2023-11-14T22:13:20Z","clusters":[{"id":"a","observedAt":"2023-11-14T22:13:20Z","objects":[{"Namespace":{"name":"shop","network":null}},{"Service":{"namespace":"shop","name":"reviews","ports":[{"name":"http","port":9080,"protocol":"TCP","app_protocol":null,"node_port":null}],"network":null,"gateway_port":null,"service_type":"ClusterIP","external_ips":[],"load_balancer_ingress":[]}},{"EndpointSlice":{"namespace":"shop","name":"reviews-a","service":"reviews","ports":[["http",9080]],"endpoints":[{"addresses":["10.0.0.1"],"ready":true,"serving":null,"terminating":false,"node_name":"n1","zone":null,"pod":null}]}},{"Node":{"name":"n1","locality":{"region":"r","zone":"z","subzone":""}}},{"Pod":{"namespace":"shop","name":"p","labels":{"app":"reviews"},"service_account":"default","node_name":"n1","network":null,"failed":false}},{"DestinationRule":{"metadata":{"name":"r","namespace":"shop"},"spec":{"host":"reviews"}}}]}]}"#;
        let loaded = decode(Path::new("x"), text.as_bytes()).unwrap();
        assert_eq!(loaded.traffic, Durable::default(), "neither failover nor drillAborts");
        let states = loaded.clusters;
        assert_eq!(states.len(), 1);
        assert_eq!(states[0].observed_at, at(T0));
        assert_eq!(states[0].remote_secret, None, "a cluster without remoteSecret is one the mesh config names");
        let kinds: Vec<crate::topology::Kind> = states[0].objects.iter().map(|o| o.key().kind).collect();
        assert_eq!(kinds.len(), 6, "{kinds:?}");
    }

    /// A mesh that names `a` (the config cluster) and discovers more clusters from remote secrets.
    fn mesh_with_secrets() -> MeshConfig {
        MeshConfig::parse(
            "clusters:\n  - {id: a, network: n, kubeconfig: a.yaml}\n  - {id: files, network: n, manifests: m}\nremoteSecrets: {configCluster: a}\n",
            Path::new("/nonexistent"),
        )
        .unwrap()
    }

    const FAR_SECRET: &str = "istio-system/istio-remote-secret-far";

    /// What cluster `far` (discovered from a remote secret) delivers: its system namespace carries its
    /// network, as istiod reads it.
    fn far_objects() -> Vec<TopologyObject> {
        vec![
            TopologyObject::Namespace(NamespaceInfo {
                name: "istio-system".into(),
                network: Some(NetworkId::new("far-net")),
            }),
            slice("reviews-far", "10.9.0.1"),
        ]
    }

    /// A store of `mesh_with_secrets` that saw `a` and the remote-secret cluster `far` sync, written at `now`.
    fn written_with_far(cfg: &LastKnownState, now: SystemTime) -> (LastKnown, ClusterHealth) {
        let health = ClusterHealth::default();
        let (store, events) = LastKnown::open(cfg, &mesh_with_secrets(), &health, now);
        assert!(events.is_empty());
        // as the remote-secret watcher registers a cluster before its watch sends anything
        let far = ClusterId::new("far");
        health.register(&far, remote_source(FAR_SECRET), Some(FAR_SECRET.into()));
        store.observe(&sync("a", vec![slice("s", "10.0.0.1")]), now);
        store.observe(&sync("far", far_objects()), now);
        for id in ["a", "far"] {
            health.update(&ClusterId::new(id), |s| s.sync = SyncState::Synced);
        }
        assert!(store.write_now(now).unwrap());
        (store, health)
    }

    #[test]
    fn remote_secret_clusters_are_kept_with_their_secret_and_restored() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        written_with_far(&cfg, at(T0));
        let text = std::fs::read_to_string(&cfg.path).unwrap();
        assert!(text.contains(r#"{"id":"a","observedAt":"#), "a named cluster has no remoteSecret: {text}");
        assert!(text.contains(&format!(r#"{{"id":"far","remoteSecret":"{FAR_SECRET}","observedAt":"#)), "{text}");
        let states = read(&cfg.path).unwrap().unwrap().clusters;
        let secrets: Vec<(&str, Option<&str>)> =
            states.iter().map(|s| (s.cluster.as_str(), s.remote_secret.as_deref())).collect();
        assert_eq!(secrets, [("a", None), ("far", Some(FAR_SECRET))]);

        // restarted: both are restored before any source runs; far is registered with its secret, marked
        let mesh = mesh_with_secrets();
        let health = ClusterHealth::default();
        let (_store, events) = LastKnown::open(&cfg, &mesh, &health, at(T0 + 60));
        let restored: Vec<(&str, usize)> = events
            .iter()
            .map(|e| match e {
                SourceEvent::Sync { cluster, objects } => (cluster.as_str(), objects.len()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(restored, [("a", 1), ("far", 2)]);
        let far = ClusterId::new("far");
        let status = health.get(&far).unwrap();
        assert_eq!(
            (status.source.as_str(), status.secret_name.as_deref(), status.sync, status.restored_from),
            ("remote secret istio-system/istio-remote-secret-far", Some(FAR_SECRET), SyncState::Syncing, Some(at(T0)))
        );
        // the registry places the restored cluster as it placed the live one: on its network, from its
        // system namespace
        let mut registry = crate::registry::Registry::new(&mesh);
        for e in events {
            registry.apply(e);
        }
        assert_eq!(registry.cluster_network(&far), Some(NetworkId::new("far-net")));

        // not restored: without remoteSecrets, with remote secrets in another namespace, or too old
        for (text, now) in [
            (
                "clusters:
  - {id: a, network: n, kubeconfig: a.yaml}
",
                T0 + 60,
            ),
            (
                "clusters:
  - {id: a, network: n, kubeconfig: a.yaml}
remoteSecrets: {configCluster: a, namespace: meshfed}
",
                T0 + 60,
            ),
            (
                "clusters:
  - {id: a, network: n, kubeconfig: a.yaml}
remoteSecrets: {configCluster: a}
",
                T0 + 3601,
            ),
        ] {
            let mesh = MeshConfig::parse(text, Path::new("/nonexistent")).unwrap();
            let health = ClusterHealth::default();
            let (_store, events) = LastKnown::open(&cfg, &mesh, &health, at(now));
            assert!(events.iter().all(|e| e.cluster().as_str() != "far"), "{text}");
            assert_eq!(health.get(&far), None, "{text}");
        }
        // the mesh config now names far itself: restored as a named cluster
        let named = MeshConfig::parse(
            "clusters:
  - {id: a, network: n, kubeconfig: a.yaml}
  - {id: far, network: n, inCluster: true}
remoteSecrets: {configCluster: a}
",
            Path::new("/nonexistent"),
        )
        .unwrap();
        let health = ClusterHealth::default();
        let (store, events) = LastKnown::open(&cfg, &named, &health, at(T0 + 60));
        assert_eq!(events.len(), 2);
        assert_eq!(health.get(&far).unwrap().secret_name, None);
        assert!(store.write_now(at(T0 + 60)).unwrap());
        assert!(read(&cfg.path).unwrap().unwrap().clusters.iter().all(|s| s.remote_secret.is_none()));
    }

    #[test]
    fn a_remote_cluster_whose_secret_goes_leaves_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let far = ClusterId::new("far");
        let ids = |path: &Path| -> Vec<(String, Option<String>)> {
            read(path)
                .unwrap()
                .unwrap()
                .clusters
                .into_iter()
                .map(|s| (s.cluster.to_string(), s.remote_secret))
                .collect()
        };

        // live: the secret renamed (the cluster moved to another secret) is kept under its new name; the
        // secret deleted (closed, objects removed) drops the cluster from the file
        let (store, health) = written_with_far(&cfg, at(T0));
        health.register(&far, remote_source("istio-system/renamed"), Some("istio-system/renamed".into()));
        assert!(store.write_now(at(T0 + 1)).unwrap());
        assert_eq!(ids(&cfg.path), [("a".into(), None), ("far".into(), Some("istio-system/renamed".into()))]);
        health.update(&far, |s| s.sync = SyncState::Closed);
        store.observe(&sync("far", vec![]), at(T0 + 2));
        assert!(store.write_now(at(T0 + 2)).unwrap());
        assert_eq!(ids(&cfg.path), [("a".to_string(), None)]);
        // a closed cluster's late events do not bring it back; a new secret for it does
        store.observe(&SourceEvent::Upsert { cluster: far.clone(), object: slice("t", "10.9.0.2") }, at(T0 + 3));
        assert!(!store.write_now(at(T0 + 3)).unwrap());
        health.register(&far, remote_source(FAR_SECRET), Some(FAR_SECRET.into()));
        store.observe(&sync("far", far_objects()), at(T0 + 4));
        health.update(&far, |s| s.sync = SyncState::Synced);
        assert!(store.write_now(at(T0 + 4)).unwrap());
        assert_eq!(ids(&cfg.path), [("a".into(), None), ("far".into(), Some(FAR_SECRET.into()))]);

        // restored: kept while its secret is not listed yet and while its API does not answer; when the
        // list has no secret for it, it is closed (the mark cleared, an empty Sync) and leaves the file
        let health = ClusterHealth::default();
        let (store, events) = LastKnown::open(&cfg, &mesh_with_secrets(), &health, at(T0 + 10));
        assert_eq!(events.len(), 2);
        store.observe(
            &SourceEvent::ClusterReachability { cluster: far.clone(), reachable: false, since: at(T0 + 10) },
            at(T0 + 10),
        );
        assert!(store.write_now(at(T0 + 11)).unwrap());
        let states = read(&cfg.path).unwrap().unwrap().clusters;
        assert_eq!((states[1].cluster.as_str(), states[1].observed_at), ("far", at(T0 + 4)));
        health.update(&far, |s| {
            s.sync = SyncState::Closed;
            s.restored_from = None;
        });
        store.observe(&sync("far", vec![]), at(T0 + 12));
        assert!(store.write_now(at(T0 + 12)).unwrap());
        assert_eq!(ids(&cfg.path), [("a".to_string(), None)]);
    }

    #[test]
    fn another_version_or_a_corrupt_file_restores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        std::fs::create_dir_all(cfg.path.parent().unwrap()).unwrap();
        let health = ClusterHealth::default();
        for (text, why) in [
            (
                r#"{"format":"meshfed-last-known-state","version":2,"meshfedVersion":"9.9.9","clusters":"new shape"}"#,
                "format version 2 (written by meshfed 9.9.9)",
            ),
            (
                r#"{"format":"meshfed-last-known-state","version":1,"meshfedVersion":"0.1.0","writtenAt":"x","clusters":[{"id":"a","observedAt":"x","ob"#,
                "corrupt",
            ),
            ("\u{0}\u{1}garbage", "corrupt"),
            (r#"{"format":"something else","version":1}"#, "not \"meshfed-last-known-state\""),
            (
                r#"{"format":"meshfed-last-known-state","version":1,"clusters":[{"id":"a","observedAt":"yesterday","objects":[]}]}"#,
                "observedAt",
            ),
        ] {
            std::fs::write(&cfg.path, text).unwrap();
            let e = read(&cfg.path).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(&cfg.path.display().to_string()), "{text}: {e}");
            let (_store, events) = LastKnown::open(&cfg, &mesh(), &health, at(T0));
            assert!(events.is_empty(), "{text}");
            assert!(health.list().iter().all(|s| s.restored_from.is_none()));
        }
        // an unreadable path (a directory) is reported too
        let cfg = LastKnownState { path: dir.path().to_path_buf(), ..cfg };
        assert!(matches!(read(&cfg.path), Err(Error::Read { .. })));
        assert!(LastKnown::open(&cfg, &mesh(), &health, at(T0)).1.is_empty());
        // no file: nothing, quietly
        assert_eq!(read(&dir.path().join("absent.json")).unwrap(), None);
    }

    #[test]
    fn state_older_than_max_age_or_of_clusters_gone_is_not_restored() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        written(&cfg, vec![slice("s", "10.0.0.1")], at(T0));
        let health = ClusterHealth::default();
        let (_, events) = LastKnown::open(&cfg, &mesh(), &health, at(T0 + 3600));
        assert_eq!(events.len(), 1, "exactly maxAge old: restored");
        let health = ClusterHealth::default();
        let (store, events) = LastKnown::open(&cfg, &mesh(), &health, at(T0 + 3601));
        assert!(events.is_empty(), "older than maxAge");
        assert_eq!(health.get(&ClusterId::new("a")), None);
        // the dropped state leaves the file at the next write
        assert!(store.write_now(at(T0 + 3601)).unwrap());
        assert_eq!(read(&cfg.path).unwrap().unwrap().clusters, vec![]);

        // a cluster the mesh config no longer names (or names with manifests) is not restored
        written(&cfg, vec![slice("s", "10.0.0.1")], at(T0));
        let only_b = MeshConfig::parse(
            "clusters:\n  - {id: b, network: n, inCluster: true}\n  - {id: a, network: n, manifests: m}\n",
            Path::new("/nonexistent"),
        )
        .unwrap();
        assert!(LastKnown::open(&cfg, &only_b, &ClusterHealth::default(), at(T0 + 1)).1.is_empty());
    }

    #[test]
    fn restored_state_stops_being_served_at_max_age_unless_the_cluster_answered() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        written(&cfg, vec![slice("s", "10.0.0.1")], at(T0));
        let a = ClusterId::new("a");
        let health = ClusterHealth::default();
        let (store, events) = LastKnown::open(&cfg, &mesh(), &health, at(T0 + 600));
        assert_eq!(events.len(), 1);
        assert_eq!(store.next_expiry(), Some(at(T0 + 3600)));
        assert!(store.expire_restored(at(T0 + 3599)).is_empty(), "not yet maxAge old");
        assert_eq!(store.expire_restored(at(T0 + 3600)), vec![a.clone()]);
        let status = health.get(&a).unwrap();
        assert_eq!(status.restored_from, None);
        assert!(status.last_error.as_deref().is_some_and(|e| e.contains("maxAge")), "{status:?}");
        assert_eq!(store.next_expiry(), None);
        assert!(store.expire_restored(at(T0 + 7200)).is_empty(), "once");
        // the expired state leaves the file
        assert!(store.write_now(at(T0 + 3600)).unwrap());
        assert_eq!(read(&cfg.path).unwrap().unwrap().clusters, vec![]);

        // a cluster whose live state replaced the restored one is not expired
        written(&cfg, vec![slice("s", "10.0.0.1")], at(T0));
        let health = ClusterHealth::default();
        let (store, _) = LastKnown::open(&cfg, &mesh(), &health, at(T0 + 600));
        store.observe(&sync("a", vec![slice("s", "10.0.0.2")]), at(T0 + 700));
        assert_eq!(store.next_expiry(), None);
        assert!(store.expire_restored(at(T0 + 7200)).is_empty());
    }

    #[test]
    fn restored_state_is_not_written_back_as_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        written(&cfg, vec![slice("s", "10.0.0.1")], at(T0));
        let a = ClusterId::new("a");

        // restarted during an outage: the source reports the API unreachable, nothing else
        let health = ClusterHealth::default();
        let (store, events) = LastKnown::open(&cfg, &mesh(), &health, at(T0 + 100));
        assert_eq!(events.len(), 1);
        store.observe(
            &SourceEvent::ClusterReachability { cluster: a.clone(), reachable: false, since: at(T0 + 100) },
            at(T0 + 100),
        );
        for t in [T0 + 100, T0 + 200, T0 + 1000] {
            store.write_now(at(t)).unwrap();
            let states = read(&cfg.path).unwrap().unwrap().clusters;
            assert_eq!(states.len(), 1);
            assert_eq!(states[0].observed_at, at(T0), "the restored state keeps its age");
        }
        // the API answers but the source is not synced yet (a partial state after the ready timeout):
        // served, the restored mark clears, but the file keeps the restored state
        store.observe(&sync("a", vec![]), at(T0 + 1100));
        assert_eq!(health.get(&a).unwrap().restored_from, None);
        store.write_now(at(T0 + 1100)).unwrap();
        let states = read(&cfg.path).unwrap().unwrap().clusters;
        assert_eq!((states[0].observed_at, states[0].objects.len()), (at(T0), 1));
        // synced: the live state is kept
        health.update(&a, |s| s.sync = SyncState::Synced);
        store.observe(&SourceEvent::Upsert { cluster: a.clone(), object: slice("t", "10.0.0.2") }, at(T0 + 1200));
        assert!(store.write_now(at(T0 + 1200)).unwrap());
        let states = read(&cfg.path).unwrap().unwrap().clusters;
        assert_eq!(states[0].observed_at, at(T0 + 1200));
        assert_eq!(states[0].objects, vec![slice("t", "10.0.0.2")]);
    }

    #[test]
    fn writes_only_when_something_changed_and_observed_at_stops_during_an_outage() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (store, _health) = written(&cfg, vec![slice("s", "10.0.0.1")], at(T0));
        let a = ClusterId::new("a");
        assert!(!store.write_now(at(T0 + 1)).unwrap(), "nothing changed");
        store.observe(&SourceEvent::Delete { cluster: a.clone(), key: slice("s", "10.9.9.9").key() }, at(T0 + 2));
        assert!(store.write_now(at(T0 + 2)).unwrap());
        assert_eq!(read(&cfg.path).unwrap().unwrap().clusters[0].objects, vec![]);
        // quiet and reachable: observedAt is refreshed every REFRESH
        assert!(!store.write_now(at(T0 + 30)).unwrap());
        assert!(store.write_now(at(T0 + 2 + REFRESH.as_secs())).unwrap());
        assert_eq!(read(&cfg.path).unwrap().unwrap().clusters[0].observed_at, at(T0 + 2 + REFRESH.as_secs()));
        // unreachable: it stops advancing
        let t = T0 + 2 + REFRESH.as_secs();
        store.observe(
            &SourceEvent::ClusterReachability { cluster: a.clone(), reachable: false, since: at(t + 1) },
            at(t + 1),
        );
        assert!(!store.write_now(at(t + 10 * REFRESH.as_secs())).unwrap());
        assert_eq!(read(&cfg.path).unwrap().unwrap().clusters[0].observed_at, at(t));
        // events of clusters that are not tracked are ignored
        store.observe(&sync("files", vec![slice("s", "10.0.0.9")]), at(t));
        store.observe(&sync("remote", vec![slice("s", "10.0.0.9")]), at(t));
        assert!(!store.write_now(at(t + 10 * REFRESH.as_secs())).unwrap());
    }

    #[test]
    fn atomic_write_leaves_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lk.json");
        write_atomic(&path, b"old").unwrap();
        let names = || -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(), vec!["lk.json"], "no temporary file is left");
        // the rename cannot happen (the target became a non-empty directory): the error names the path,
        // and no temporary file is left behind
        let blocked = dir.path().join("blocked.json");
        std::fs::create_dir_all(blocked.join("inside")).unwrap();
        let e = write_atomic(&blocked, b"new").unwrap_err().to_string();
        assert!(e.contains("blocked.json"), "{e}");
        assert_eq!(names(), vec!["blocked.json", "lk.json"]);
        // the temporary file cannot be created (its name is taken by a directory): the old file is whole
        std::fs::create_dir_all(dir.path().join("lk.json.tmp/x")).unwrap();
        assert!(write_atomic(&path, b"new").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        std::fs::remove_dir_all(dir.path().join("lk.json.tmp")).unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }
}
