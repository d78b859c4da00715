//! The file source: each cluster's objects come from a directory of Kubernetes manifests (YAML, as
//! `kubectl get -o yaml` prints them), watched for edits.
//!
//! Every `*.yaml` / `*.yml` file under a cluster's directory (recursively; hidden files and directories
//! skipped) is parsed with [`topology::parse_manifests`]; the cluster's objects are the union of all its
//! files' objects, sent as one [`SourceEvent::Sync`] whenever that union changes.
//!
//! A file that fails to parse keeps contributing its last good objects (nothing if it never parsed) and is
//! listed in [`FileSourceHandle::errors`] until it parses again. A missing directory is reported the same
//! way, contributes nothing, and is picked up when it appears.
//!
//! Watching runs on a dedicated thread (file reads are blocking); bursts of events (editors write several)
//! are coalesced: a cluster is re-read once nothing has happened for [`QUIET`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use serde::Serialize;
use tokio::sync::{mpsc::UnboundedSender, oneshot, watch};
use tracing::{debug, info, warn};

use crate::mesh_config::{ClusterSource, MeshConfig};
use crate::model::ClusterId;
use crate::source::{ClusterHealth, SourceEvent, SyncState};
use crate::topology::{self, ObjectKey, TopologyObject};

/// Re-read after this long without a new file event.
pub const QUIET: Duration = Duration::from_millis(50);
/// Re-read at the latest this long after the first event of a burst, even if events keep coming.
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// How often missing cluster directories are looked for again.
pub const RETRY_MISSING: Duration = Duration::from_secs(1);
/// Directory depth limit (guards against symlink loops).
const MAX_DEPTH: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A cluster's manifests directory cannot be read (missing, not a directory, no permission).
    #[error("cannot read manifests directory {}: {source}", .dir.display())]
    Dir { cluster: ClusterId, dir: PathBuf, source: io::Error },
    /// Two files define the same object; the later one (by path) is used.
    #[error("{} defines {kind:?} {object} again (also in {}); using this one", .file.display(), .first.display())]
    Duplicate { cluster: ClusterId, kind: topology::Kind, object: String, file: PathBuf, first: PathBuf },
    /// The file system watcher could not be created or could not watch a directory.
    #[error("cannot watch {}: {source}", .path.as_deref().map(|p| p.display().to_string()).unwrap_or_default())]
    Watch { path: Option<PathBuf>, source: notify::Error },
    /// The watcher thread could not be started.
    #[error("cannot start the file source thread: {0}")]
    Spawn(io::Error),
    /// The receiver of source events is gone.
    #[error("the source event receiver is closed")]
    Closed,
}

/// A problem the file source currently has, as shown by the debug surface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourceError {
    pub cluster: ClusterId,
    /// the file (or directory) concerned
    pub path: PathBuf,
    /// the line in `path`, when known
    pub line: Option<usize>,
    /// the complete message (it names the file and line)
    pub message: String,
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cluster {}: {}", self.cluster, self.message)
    }
}

/// A running file source. Dropping it stops watching.
pub struct FileSourceHandle {
    errors: watch::Receiver<Vec<SourceError>>,
    control: mpsc::Sender<Msg>,
}

impl FileSourceHandle {
    /// The current problems (unparseable files, missing directories, duplicate objects), one line each.
    pub fn errors(&self) -> Vec<String> {
        self.errors.borrow().iter().map(ToString::to_string).collect()
    }

    /// The current problems, structured.
    pub fn source_errors(&self) -> Vec<SourceError> {
        self.errors.borrow().clone()
    }

    /// Watches the current problems (the receiver sees every change of the list).
    pub fn subscribe_errors(&self) -> watch::Receiver<Vec<SourceError>> {
        self.errors.clone()
    }
}

impl Drop for FileSourceHandle {
    fn drop(&mut self) {
        // the thread may already be gone (receiver closed): nothing to do then
        let _ = self.control.send(Msg::Stop);
    }
}

enum Msg {
    Fs(notify::Result<notify::Event>),
    Stop,
}

/// Starts the file source for every cluster of `config` whose objects come from manifests: reads them all
/// and sends one [`SourceEvent::Sync`] per cluster on `tx` before returning, then watches the directories
/// (on a thread of its own) and sends a new `Sync` for a cluster whenever its objects change.
///
/// A cluster whose directory is missing is synced empty and reported in [`FileSourceHandle::errors`]; it is
/// not an error here. Errors: the watcher cannot be created, or `tx` is closed.
pub async fn run(config: &MeshConfig, tx: UnboundedSender<SourceEvent>) -> Result<FileSourceHandle, Error> {
    run_with_health(config, tx, ClusterHealth::default()).await
}

/// [`run`], reporting each cluster's status (synced, last event, a missing directory) in `health`.
/// Clusters of `config` with another source are left to their own source.
pub async fn run_with_health(
    config: &MeshConfig,
    tx: UnboundedSender<SourceEvent>,
    health: ClusterHealth,
) -> Result<FileSourceHandle, Error> {
    let clusters: Vec<(ClusterId, PathBuf)> = config
        .clusters
        .iter()
        .filter_map(|c| match &c.source {
            ClusterSource::Manifests(dir) => Some((c.id.clone(), dir.clone())),
            _ => None,
        })
        .collect();
    for (id, dir) in &clusters {
        health.register(id, format!("manifests:{}", dir.display()), None);
    }
    let (control, control_rx) = mpsc::channel();
    let (errors_tx, errors_rx) = watch::channel(Vec::new());
    let (ready_tx, ready_rx) = oneshot::channel();
    let events = control.clone();
    std::thread::Builder::new()
        .name("meshfed-files".into())
        .spawn(move || {
            let handler = move |res| {
                let _ = events.send(Msg::Fs(res));
            };
            let mut source = match notify::recommended_watcher(handler) {
                Ok(watcher) => Source::new(clusters, watcher, tx, errors_tx, health),
                Err(source) => {
                    let _ = ready_tx.send(Err(Error::Watch { path: None, source }));
                    return;
                }
            };
            match source.start() {
                Ok(()) => {
                    let _ = ready_tx.send(Ok(()));
                    source.run(control_rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(Error::Spawn)?;
    // the thread always answers, unless it panicked: report that as a closed source
    ready_rx.await.map_err(|_| Error::Closed)??;
    Ok(FileSourceHandle { errors: errors_rx, control })
}

/// Reads every manifest file under `dir` (see [`manifest_files`]) and returns the union of their objects,
/// sorted by key (an object defined twice: the later file wins), and every error met on the way.
pub fn load_cluster_dir(dir: &Path) -> (Vec<TopologyObject>, Vec<topology::Error>) {
    let mut errors = Vec::new();
    let files = match manifest_files(dir) {
        Ok((files, unreadable)) => {
            errors.extend(unreadable.into_iter().map(|(file, source)| topology::Error::Read { file, source }));
            files
        }
        Err(source) => {
            errors.push(topology::Error::Read { file: dir.into(), source });
            return (Vec::new(), errors);
        }
    };
    let mut objects = BTreeMap::new();
    for file in files {
        match topology::parse_file(&file) {
            Ok(objs) => objects.extend(objs.into_iter().map(|o| (o.key(), o))),
            Err(e) => errors.push(e),
        }
    }
    (objects.into_values().collect(), errors)
}

/// The manifest files (`*.yaml`, `*.yml`) under `dir`, recursively, sorted by path. Hidden files and
/// directories (`.name`, including Kubernetes ConfigMap mounts' `..data`) are skipped; symbolic links are
/// followed. Errors: `dir` cannot be read; subdirectories that cannot be read are returned beside the list.
#[allow(clippy::type_complexity)]
pub fn manifest_files(dir: &Path) -> io::Result<(Vec<PathBuf>, Vec<(PathBuf, io::Error)>)> {
    let meta = std::fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(io::ErrorKind::NotADirectory, "not a directory"));
    }
    let mut files = Vec::new();
    let mut unreadable = Vec::new();
    walk(dir, 0, &mut files, &mut unreadable)?;
    files.sort();
    Ok((files, unreadable))
}

fn walk(dir: &Path, depth: usize, files: &mut Vec<PathBuf>, bad: &mut Vec<(PathBuf, io::Error)>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if is_hidden(&entry.file_name()) {
            continue;
        }
        // follows symbolic links; a dangling link is skipped
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if meta.is_dir() {
            if depth + 1 >= MAX_DEPTH {
                continue;
            }
            if let Err(e) = walk(&path, depth + 1, files, bad) {
                bad.push((path, e));
            }
        } else if meta.is_file() && is_manifest_name(&path) {
            files.push(path);
        }
    }
    Ok(())
}

fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

fn is_manifest_name(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

// ---- the watching side ----

/// What is known of one manifest file.
struct FileState {
    /// its last good objects
    objects: Vec<TopologyObject>,
    /// why its current content is not used
    error: Option<topology::Error>,
    /// (modified, length) when last read: a change triggers a re-read even without an event for the file
    stamp: Option<(SystemTime, u64)>,
}

struct ClusterState {
    id: ClusterId,
    /// the configured directory
    configured: PathBuf,
    /// the directory as watched and read (canonical once it has been seen)
    dir: PathBuf,
    watched: bool,
    dir_error: Option<Error>,
    files: BTreeMap<PathBuf, FileState>,
    unreadable: Vec<(PathBuf, io::Error)>,
    duplicates: Vec<Error>,
    /// the objects last sent (None: nothing sent yet)
    sent: Option<Vec<TopologyObject>>,
}

/// What a burst of file events asks to re-read.
#[derive(Default)]
struct Pending {
    /// clusters to re-read entirely
    full: BTreeSet<usize>,
    /// files to re-read, by cluster
    files: BTreeMap<usize, BTreeSet<PathBuf>>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.full.is_empty() && self.files.is_empty()
    }
}

struct Source {
    clusters: Vec<ClusterState>,
    watcher: RecommendedWatcher,
    tx: UnboundedSender<SourceEvent>,
    errors: watch::Sender<Vec<SourceError>>,
    health: ClusterHealth,
}

impl Source {
    fn new(
        clusters: Vec<(ClusterId, PathBuf)>,
        watcher: RecommendedWatcher,
        tx: UnboundedSender<SourceEvent>,
        errors: watch::Sender<Vec<SourceError>>,
        health: ClusterHealth,
    ) -> Self {
        let clusters = clusters
            .into_iter()
            .map(|(id, dir)| ClusterState {
                id,
                configured: dir.clone(),
                dir,
                watched: false,
                dir_error: None,
                files: BTreeMap::new(),
                unreadable: Vec::new(),
                duplicates: Vec::new(),
                sent: None,
            })
            .collect();
        Self { clusters, watcher, tx, errors, health }
    }

    /// Watches every directory, then reads and syncs every cluster. Watching first: an edit made while
    /// reading is seen again afterwards.
    fn start(&mut self) -> Result<(), Error> {
        for i in 0..self.clusters.len() {
            self.try_watch(i);
        }
        for i in 0..self.clusters.len() {
            self.reload(i, true, &BTreeSet::new())?;
        }
        self.publish_errors();
        Ok(())
    }

    /// Starts watching a cluster's directory if it exists (if not, [`Self::reload`] records why).
    fn try_watch(&mut self, i: usize) {
        let c = &mut self.clusters[i];
        let Ok(dir) = std::fs::canonicalize(&c.configured) else { return };
        c.dir = dir;
        match self.watcher.watch(&c.dir, RecursiveMode::Recursive) {
            Ok(()) => {
                debug!(cluster = %c.id, dir = %c.dir.display(), "watching manifests");
                c.watched = true;
                if matches!(c.dir_error, Some(Error::Watch { .. })) {
                    c.dir_error = None;
                }
            }
            Err(source) => {
                // still read it (it may just be unwatchable, e.g. too many inotify watches); retried later
                let e = Error::Watch { path: Some(c.dir.clone()), source };
                if !matches!(&c.dir_error, Some(old) if old.to_string() == e.to_string()) {
                    warn!(cluster = %c.id, "{e}");
                }
                c.dir_error = Some(e);
            }
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            let mut pending = Pending::default();
            match rx.recv_timeout(RETRY_MISSING) {
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(Msg::Fs(res)) => self.note(res, &mut pending),
                Err(RecvTimeoutError::Timeout) => {}
            }
            // coalesce the burst
            if !pending.is_empty() {
                let deadline = Instant::now() + MAX_DELAY;
                loop {
                    let wait = QUIET.min(deadline.saturating_duration_since(Instant::now()));
                    match rx.recv_timeout(wait) {
                        Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                        Ok(Msg::Fs(res)) => self.note(res, &mut pending),
                        Err(RecvTimeoutError::Timeout) => break,
                    }
                }
            }
            // directories that were missing (or could not be watched) and may have appeared
            for i in 0..self.clusters.len() {
                if !self.clusters[i].watched && self.clusters[i].configured.exists() {
                    self.try_watch(i);
                    if self.clusters[i].watched {
                        info!(cluster = %self.clusters[i].id, dir = %self.clusters[i].dir.display(), "manifests directory appeared");
                        pending.full.insert(i);
                    }
                }
            }
            for i in 0..self.clusters.len() {
                let full = pending.full.contains(&i);
                let files = pending.files.remove(&i).unwrap_or_default();
                if (full || !files.is_empty()) && self.reload(i, full, &files).is_err() {
                    return; // nobody listens any more
                }
            }
            self.publish_errors();
            if self.tx.is_closed() {
                return;
            }
        }
    }

    /// Records what a file event asks to re-read.
    fn note(&self, res: notify::Result<notify::Event>, pending: &mut Pending) {
        let event = match res {
            Ok(event) => event,
            Err(e) => {
                warn!("file watcher error, re-reading every cluster: {e}");
                pending.full.extend(0..self.clusters.len());
                return;
            }
        };
        if event.need_rescan() {
            pending.full.extend(0..self.clusters.len());
            return;
        }
        // Opening and closing a file without writing it (including our own reads) changes nothing.
        if matches!(
            event.kind,
            notify::EventKind::Access(notify::event::AccessKind::Open(_) | notify::event::AccessKind::Read)
                | notify::EventKind::Access(notify::event::AccessKind::Close(notify::event::AccessMode::Read))
                | notify::EventKind::Access(notify::event::AccessKind::Any)
        ) {
            return;
        }
        for path in &event.paths {
            for (i, c) in self.clusters.iter().enumerate() {
                let Ok(rel) = path.strip_prefix(&c.dir) else { continue };
                if rel.as_os_str().is_empty() {
                    pending.full.insert(i); // the directory itself
                    continue;
                }
                let hidden = rel.components().any(|p| is_hidden(p.as_os_str()));
                if !hidden && is_manifest_name(path) {
                    pending.files.entry(i).or_default().insert(path.clone());
                    continue;
                }
                // a directory or symbolic link (e.g. a ConfigMap mount's `..data` swap), or something removed
                // that held known files: re-read all; anything else (editor swap files...) is irrelevant
                let relevant = match std::fs::symlink_metadata(path) {
                    Ok(m) => m.is_dir() || m.file_type().is_symlink(),
                    Err(_) => c.files.keys().any(|f| f.starts_with(path)),
                };
                if relevant {
                    pending.full.insert(i);
                }
            }
        }
    }

    /// Re-reads cluster `i` (all its files when `full`, else the `changed` ones and those whose size or
    /// time changed) and sends a Sync if its objects changed. Err: the event receiver is closed.
    fn reload(&mut self, i: usize, full: bool, changed: &BTreeSet<PathBuf>) -> Result<(), Error> {
        let c = &mut self.clusters[i];
        let started = Instant::now();
        match manifest_files(&c.dir) {
            Ok((listed, unreadable)) => {
                if matches!(c.dir_error, Some(Error::Dir { .. })) {
                    c.dir_error = None;
                }
                for (path, e) in &unreadable {
                    warn!(cluster = %c.id, dir = %path.display(), "cannot read directory: {e}");
                }
                c.unreadable = unreadable;
                let listed: BTreeSet<PathBuf> = listed.into_iter().collect();
                c.files.retain(|path, _| listed.contains(path));
                for path in listed {
                    let stamp = std::fs::metadata(&path).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
                    let known = c.files.get(&path);
                    let stale =
                        full || changed.contains(&path) || known.is_none_or(|f| f.stamp != stamp || stamp.is_none());
                    if stale {
                        read_file(&c.id, &path, stamp, &mut c.files);
                    }
                }
            }
            Err(source) => {
                if c.watched {
                    // the directory went away: its files with it; watch it again when it is back
                    let _ = self.watcher.unwatch(&c.dir);
                    c.watched = false;
                }
                let e = Error::Dir { cluster: c.id.clone(), dir: c.configured.clone(), source };
                if !matches!(&c.dir_error, Some(old) if old.to_string() == e.to_string()) {
                    warn!(cluster = %c.id, "{e}");
                }
                c.dir_error = Some(e);
                c.files.clear();
                c.unreadable.clear();
            }
        }
        // the union, sorted by key; a later file overrides an earlier one
        let mut merged: BTreeMap<ObjectKey, (TopologyObject, &Path)> = BTreeMap::new();
        let mut duplicates = Vec::new();
        for (path, f) in &c.files {
            for o in &f.objects {
                let key = o.key();
                if let Some((_, first)) = merged.get(&key) {
                    let object = if key.namespace.is_empty() {
                        key.name.to_string()
                    } else {
                        format!("{}/{}", key.namespace, key.name)
                    };
                    duplicates.push(Error::Duplicate {
                        cluster: c.id.clone(),
                        kind: key.kind,
                        object,
                        file: path.clone(),
                        first: first.to_path_buf(),
                    });
                }
                merged.insert(key, (o.clone(), path));
            }
        }
        c.duplicates = duplicates;
        let objects: Vec<TopologyObject> = merged.into_values().map(|(o, _)| o).collect();
        let dir_error = c.dir_error.as_ref().map(ToString::to_string);
        let changed = c.sent.as_ref() != Some(&objects);
        self.health.update(&c.id, |s| {
            s.sync = SyncState::Synced;
            s.last_error = dir_error;
            if changed {
                s.last_event = Some(SystemTime::now());
            }
        });
        if !changed {
            debug!(cluster = %c.id, "manifests re-read, no change");
            return Ok(());
        }
        info!(cluster = %c.id, objects = objects.len(), elapsed = ?started.elapsed(), "manifests changed, syncing cluster");
        c.sent = Some(objects.clone());
        self.tx.send(SourceEvent::Sync { cluster: c.id.clone(), objects }).map_err(|_| Error::Closed)
    }

    fn publish_errors(&self) {
        let mut list = Vec::new();
        for c in &self.clusters {
            if let Some(e) = &c.dir_error {
                let path = match e {
                    Error::Watch { path: Some(p), .. } => p.clone(),
                    _ => c.configured.clone(),
                };
                list.push(SourceError { cluster: c.id.clone(), path, line: None, message: e.to_string() });
            }
            for (path, e) in &c.unreadable {
                let message = format!("cannot read directory {}: {e}", path.display());
                list.push(SourceError { cluster: c.id.clone(), path: path.clone(), line: None, message });
            }
            for (path, f) in &c.files {
                if let Some(e) = &f.error {
                    let message = e.to_string();
                    list.push(SourceError { cluster: c.id.clone(), path: path.clone(), line: e.line(), message });
                }
            }
            for e in &c.duplicates {
                if let Error::Duplicate { file, .. } = e {
                    list.push(SourceError {
                        cluster: c.id.clone(),
                        path: file.clone(),
                        line: None,
                        message: e.to_string(),
                    });
                }
            }
        }
        self.errors.send_if_modified(|current| {
            if *current == list {
                false
            } else {
                *current = list;
                true
            }
        });
    }
}

/// Re-reads one file into `files`: new objects on success; on failure the previous objects stay and the
/// error is recorded. A file gone since it was listed is forgotten.
fn read_file(
    cluster: &ClusterId,
    path: &Path,
    stamp: Option<(SystemTime, u64)>,
    files: &mut BTreeMap<PathBuf, FileState>,
) {
    match topology::parse_file(path) {
        Ok(objects) => {
            if files.get(path).is_some_and(|f| f.error.is_some()) {
                info!(cluster = %cluster, file = %path.display(), "manifest file parses again");
            }
            files.insert(path.to_path_buf(), FileState { objects, error: None, stamp });
        }
        Err(topology::Error::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            files.remove(path);
        }
        Err(e) => {
            warn!(cluster = %cluster, file = %path.display(), line = ?e.line(), "{e}; keeping the file's previous objects");
            let f = files.entry(path.to_path_buf()).or_insert(FileState { objects: Vec::new(), error: None, stamp });
            f.error = Some(e);
            f.stamp = stamp;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    use super::*;
    use crate::mesh_config::ClusterConfig;
    use crate::model::NetworkId;
    use crate::topology::Kind;

    const WAIT: Duration = Duration::from_secs(5);

    fn node(name: &str, zone: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    topology.kubernetes.io/region: r\n    topology.kubernetes.io/zone: {zone}\n"
        )
    }

    fn config(clusters: &[(&str, &Path)]) -> MeshConfig {
        let mut cfg = MeshConfig::parse("clusters: []\n", Path::new(".")).expect("minimal mesh config");
        cfg.clusters = clusters
            .iter()
            .map(|(id, dir)| ClusterConfig {
                id: ClusterId::new(id),
                network: NetworkId::new("net"),
                source: ClusterSource::Manifests(dir.to_path_buf()),
            })
            .collect();
        cfg
    }

    fn names(objects: &[TopologyObject]) -> Vec<String> {
        objects.iter().map(|o| o.key().name.to_string()).collect()
    }

    /// The next Sync (for any cluster), within [`WAIT`].
    async fn next_sync(rx: &mut UnboundedReceiver<SourceEvent>) -> (String, Vec<TopologyObject>) {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(SourceEvent::Sync { cluster, objects })) => (cluster.to_string(), objects),
            Ok(other) => panic!("expected a Sync, got {other:?}"),
            Err(_) => panic!("no Sync within {WAIT:?}"),
        }
    }

    /// Waits until the error list satisfies `pred`.
    async fn wait_errors(handle: &FileSourceHandle, pred: impl Fn(&[SourceError]) -> bool) -> Vec<SourceError> {
        let mut rx = handle.subscribe_errors();
        let res = tokio::time::timeout(WAIT, async {
            loop {
                let current = rx.borrow_and_update().clone();
                if pred(&current) {
                    return current;
                }
                if rx.changed().await.is_err() {
                    panic!("file source stopped");
                }
            }
        })
        .await;
        match res {
            Ok(errors) => errors,
            Err(_) => panic!("error list not as expected within {WAIT:?}: {:?}", handle.errors()),
        }
    }

    /// Replaces a file's content the way most editors do (write a temporary file, rename it over).
    fn replace(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp~");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[tokio::test]
    async fn initial_sync_for_every_cluster() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(a.join("sub")).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("nodes.yaml"), format!("{}---\n{}", node("n2", "z2"), node("n1", "z1"))).unwrap();
        std::fs::write(a.join("sub/more.yml"), node("n0", "z0")).unwrap();
        std::fs::write(a.join("ignored.txt"), node("x", "z")).unwrap();
        std::fs::write(a.join(".hidden.yaml"), node("y", "z")).unwrap();
        std::fs::write(b.join("n.yaml"), node("m1", "z1")).unwrap();
        let (tx, mut rx) = unbounded_channel();
        let handle = run(&config(&[("a", &a), ("b", &b)]), tx).await.unwrap();
        // sent before run returned
        let Ok(SourceEvent::Sync { cluster, objects }) = rx.try_recv() else { panic!("no initial sync") };
        assert_eq!(cluster.as_str(), "a");
        assert_eq!(names(&objects), vec!["n0", "n1", "n2"], "sorted, from every yaml file");
        let Ok(SourceEvent::Sync { cluster, objects }) = rx.try_recv() else { panic!("no initial sync") };
        assert_eq!((cluster.as_str(), names(&objects)), ("b", vec!["m1".to_string()]));
        assert!(handle.errors().is_empty(), "{:?}", handle.errors());
    }

    #[tokio::test]
    async fn edit_broken_fixed_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        std::fs::create_dir(&dir).unwrap();
        let (f1, f2) = (dir.join("one.yaml"), dir.join("two.yaml"));
        std::fs::write(&f1, node("n1", "z1")).unwrap();
        std::fs::write(&f2, node("n2", "z2")).unwrap();
        let (tx, mut rx) = unbounded_channel();
        let handle = run(&config(&[("c", &dir)]), tx).await.unwrap();
        assert_eq!(names(&next_sync(&mut rx).await.1), vec!["n1", "n2"]);

        // an edit in place
        std::fs::write(&f1, format!("{}---\n{}", node("n1", "z1"), node("n3", "z3"))).unwrap();
        assert_eq!(names(&next_sync(&mut rx).await.1), vec!["n1", "n2", "n3"]);

        // broken (bad indentation on line 8 of the file): the previous objects stay, the error names file and line
        replace(&f1, &format!("{}---\napiVersion: v1\nkind: Node\n metadata: {{}}\n", node("n1", "z1")));
        let errors = wait_errors(&handle, |e| !e.is_empty()).await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, Some(11), "{errors:?}");
        let msg = handle.errors().remove(0);
        assert!(msg.starts_with("cluster c: "), "{msg}");
        assert!(msg.contains("one.yaml:11: "), "{msg}");
        assert!(rx.try_recv().is_err(), "objects unchanged: no Sync");

        // fixed: the error clears and the new objects are synced
        replace(&f1, &node("n4", "z4"));
        assert_eq!(names(&next_sync(&mut rx).await.1), vec!["n2", "n4"]);
        wait_errors(&handle, |e| e.is_empty()).await;

        // deleted: its objects go
        std::fs::remove_file(&f1).unwrap();
        assert_eq!(names(&next_sync(&mut rx).await.1), vec!["n2"]);

        // a new file in a new subdirectory
        std::fs::create_dir(dir.join("more")).unwrap();
        std::fs::write(dir.join("more/three.yaml"), node("n5", "z5")).unwrap();
        assert_eq!(names(&next_sync(&mut rx).await.1), vec!["n2", "n5"]);
    }

    #[tokio::test]
    async fn a_file_that_never_parsed_contributes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("bad.yaml"), "apiVersion: v1\nkind: Node\nmetadata:\n  name: [\n").unwrap();
        std::fs::write(tmp.path().join("good.yaml"), node("n1", "z1")).unwrap();
        let (tx, mut rx) = unbounded_channel();
        let handle = run(&config(&[("c", tmp.path())]), tx).await.unwrap();
        assert_eq!(names(&next_sync(&mut rx).await.1), vec!["n1"]);
        let errors = handle.source_errors();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].path.ends_with("bad.yaml") && errors[0].line.is_some(), "{errors:?}");
    }

    #[tokio::test]
    async fn only_changed_clusters_are_synced() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        std::fs::write(a.join("n.yaml"), node("a1", "z")).unwrap();
        std::fs::write(b.join("n.yaml"), node("b1", "z")).unwrap();
        let (tx, mut rx) = unbounded_channel();
        let _handle = run(&config(&[("a", &a), ("b", &b)]), tx).await.unwrap();
        next_sync(&mut rx).await;
        next_sync(&mut rx).await;
        // rewriting a's file with the same objects (plus a comment) changes nothing; then b changes
        std::fs::write(a.join("n.yaml"), format!("# touched\n{}", node("a1", "z"))).unwrap();
        std::fs::write(a.join("notes.txt"), "not a manifest").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        std::fs::write(b.join("n.yaml"), node("b2", "z")).unwrap();
        let (cluster, objects) = next_sync(&mut rx).await;
        assert_eq!((cluster.as_str(), names(&objects)), ("b", vec!["b2".to_string()]));
    }

    #[tokio::test]
    async fn missing_directory_is_reported_and_picked_up_later() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, missing) = (tmp.path().join("a"), tmp.path().join("later"));
        std::fs::create_dir(&a).unwrap();
        std::fs::write(a.join("n.yaml"), node("a1", "z")).unwrap();
        let (tx, mut rx) = unbounded_channel();
        let handle = run(&config(&[("later", &missing), ("a", &a)]), tx).await.unwrap();
        let (cluster, objects) = next_sync(&mut rx).await;
        assert_eq!((cluster.as_str(), objects.len()), ("later", 0));
        let (cluster, objects) = next_sync(&mut rx).await;
        assert_eq!((cluster.as_str(), names(&objects)), ("a", vec!["a1".to_string()]));
        let errors = handle.errors();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("cluster later: cannot read manifests directory "), "{errors:?}");
        assert!(errors[0].contains("later"), "{errors:?}");

        // it appears (with a file written before it is renamed into place)
        let staging = tmp.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("n.yaml"), node("l1", "z")).unwrap();
        std::fs::rename(&staging, &missing).unwrap();
        let (cluster, objects) = next_sync(&mut rx).await;
        assert_eq!((cluster.as_str(), names(&objects)), ("later", vec!["l1".to_string()]));
        wait_errors(&handle, |e| e.is_empty()).await;
        // and is watched
        std::fs::write(missing.join("n2.yaml"), node("l2", "z")).unwrap();
        let (cluster, objects) = next_sync(&mut rx).await;
        assert_eq!((cluster.as_str(), names(&objects)), ("later", vec!["l1".to_string(), "l2".to_string()]));
    }

    #[tokio::test]
    async fn duplicate_objects_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("1.yaml"), node("n", "z1")).unwrap();
        std::fs::write(tmp.path().join("2.yaml"), node("n", "z2")).unwrap();
        let (tx, mut rx) = unbounded_channel();
        let handle = run(&config(&[("c", tmp.path())]), tx).await.unwrap();
        let objects = next_sync(&mut rx).await.1;
        let [TopologyObject::Node(n)] = objects.as_slice() else { panic!("{objects:?}") };
        assert_eq!(&*n.locality.zone, "z2", "the later file wins");
        let errors = handle.errors();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("2.yaml defines Node n again (also in "), "{errors:?}");
    }

    #[tokio::test]
    async fn dropping_the_handle_stops_watching() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("n.yaml"), node("n1", "z")).unwrap();
        let (tx, mut rx) = unbounded_channel();
        let handle = run(&config(&[("c", tmp.path())]), tx).await.unwrap();
        next_sync(&mut rx).await;
        drop(handle);
        // the thread drops the sender when it stops
        assert!(matches!(tokio::time::timeout(WAIT, rx.recv()).await, Ok(None)));
    }

    // ---- the built-in demo ----

    fn example() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/two-clouds")
    }

    #[test]
    fn example_mesh_config_parses() {
        let cfg = MeshConfig::load(&example().join("mesh.yaml")).unwrap();
        assert_eq!(cfg.domain_suffix, "cluster.local");
        let ids: Vec<(&str, &str)> = cfg.clusters.iter().map(|c| (c.id.as_str(), c.network.as_str())).collect();
        assert_eq!(ids, vec![("aws-use1", "aws-net"), ("azure-weu", "azure-net")]);
        for c in &cfg.clusters {
            let ClusterSource::Manifests(dir) = &c.source else { panic!("the demo's clusters are manifests") };
            assert_eq!(dir, &example().join(c.id.as_str()));
            assert!(dir.is_dir(), "{}", dir.display());
        }
        assert_eq!(cfg.debounce.quiet, Duration::from_millis(100));
        assert_eq!(cfg.debounce.max, Duration::from_secs(1));
        let od = cfg.defaults.outlier_detection.expect("outlier detection defaults");
        assert_eq!((od.consecutive_5xx_errors, od.max_ejection_percent), (Some(5), Some(100)));
        assert_eq!(cfg.defaults.locality_lb.failover.len(), 2);
        assert_eq!(
            (od.interval, od.base_ejection_time),
            (Some(Duration::from_secs(10)), Some(Duration::from_secs(30)))
        );
    }

    #[test]
    fn example_clusters_load_without_errors() {
        let clusters = [
            ("aws-use1", "aws-net", "127.0.10.1", "127.0.10.2", ["us-east-1a", "us-east-1b"], ["127.0.1", "127.0.2"]),
            (
                "azure-weu",
                "azure-net",
                "127.0.20.1",
                "127.0.20.2",
                ["westeurope-1", "westeurope-2"],
                ["127.0.3", "127.0.4"],
            ),
        ];
        for (id, network, lb, gw_pod, zones, prefixes) in clusters {
            let (objects, errors) = load_cluster_dir(&example().join(id));
            assert!(
                errors.is_empty(),
                "{id}: {}",
                errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
            );
            let count = |kind: Kind| objects.iter().filter(|o| o.key().kind == kind).count();
            assert_eq!(
                [
                    count(Kind::Namespace),
                    count(Kind::Node),
                    count(Kind::Service),
                    count(Kind::EndpointSlice),
                    count(Kind::Pod)
                ],
                [2, 2, 4, 4, 13],
                "{id}"
            );

            let mut node_zone = BTreeMap::new();
            let mut pods = BTreeMap::new();
            for o in &objects {
                match o {
                    TopologyObject::Namespace(ns) if &*ns.name == "istio-system" => {
                        assert_eq!(ns.network, Some(NetworkId::new(network)))
                    }
                    TopologyObject::Node(n) => {
                        node_zone.insert(n.name.clone(), n.locality.zone.clone());
                    }
                    TopologyObject::Pod(p) => {
                        // workloads run Istio sidecars; the east-west gateway pod does not need the label
                        if !p.name.starts_with("istio-eastwestgateway") {
                            assert_eq!(
                                p.labels.get(topology::labels::TLS_MODE).map(String::as_str),
                                Some("istio"),
                                "{id}: {}",
                                p.name
                            );
                        }
                        assert!(!p.failed);
                        pods.insert((p.namespace.clone(), p.name.clone()), p.clone());
                    }
                    _ => {}
                }
            }
            assert_eq!(node_zone.values().map(|z| z.to_string()).collect::<Vec<_>>(), zones.to_vec(), "{id}");

            // three shop services, identical in both clusters
            let services: Vec<_> = objects
                .iter()
                .filter_map(|o| match o {
                    TopologyObject::Service(s) if &*s.namespace == "shop" => Some(s),
                    _ => None,
                })
                .collect();
            let ports: Vec<(String, Vec<(String, u16)>)> = services
                .iter()
                .map(|s| (s.name.to_string(), s.ports.iter().map(|p| (p.name.to_string(), p.port)).collect()))
                .collect();
            assert_eq!(
                ports,
                vec![
                    ("frontend".into(), vec![("http".into(), 8080)]),
                    ("ratings".into(), vec![("http".into(), 9080), ("grpc".into(), 9091)]),
                    ("reviews".into(), vec![("http".into(), 9080)]),
                ],
                "{id}"
            );
            let ratings = services.iter().find(|s| &*s.name == "ratings").unwrap();
            assert_eq!(ratings.ports[1].app_protocol.as_deref(), Some("grpc"));

            // one gateway service per cluster
            let gateways: Vec<_> = objects
                .iter()
                .filter_map(|o| match o {
                    TopologyObject::Service(s) if s.network.is_some() => Some(s),
                    _ => None,
                })
                .collect();
            assert_eq!(gateways.len(), 1, "{id}");
            let gw = gateways[0];
            assert_eq!(
                (&*gw.namespace, &*gw.name, &*gw.service_type),
                ("istio-system", "istio-eastwestgateway", "LoadBalancer")
            );
            assert_eq!(gw.network, Some(NetworkId::new(network)));
            assert_eq!(gw.load_balancer_ingress, vec![Arc::<str>::from(lb)]);
            assert!(gw.ports.iter().any(|p| &*p.name == "tls" && p.port == 15443), "{id}");

            // every shop service: 2 ready endpoints per zone, each a pod of that service on its zone's node
            let octets = [("frontend", 1), ("reviews", 2), ("ratings", 3)];
            for o in &objects {
                let TopologyObject::EndpointSlice(s) = o else { continue };
                if &*s.namespace == "istio-system" {
                    assert_eq!(&*s.service, "istio-eastwestgateway");
                    assert_eq!(s.endpoints.len(), 1);
                    assert_eq!(s.endpoints[0].addresses, vec![gw_pod.parse::<std::net::IpAddr>().unwrap()]);
                    assert_eq!(s.endpoints[0].zone.as_deref(), Some(zones[0]));
                    continue;
                }
                let svc = services.iter().find(|x| x.name == s.service).expect("slice of a known service");
                let svc_ports: Vec<(Arc<str>, u16)> = svc.ports.iter().map(|p| (p.name.clone(), p.port)).collect();
                assert_eq!(s.ports, svc_ports, "{id}: {}", s.name);
                let tens = octets.iter().find(|(n, _)| *n == &*s.service).unwrap().1;
                let mut expected = Vec::new();
                for (zone, prefix) in zones.iter().zip(prefixes) {
                    for n in 1..=2 {
                        expected.push((format!("{prefix}.{}", tens * 10 + n), zone.to_string()));
                    }
                }
                let got: Vec<(String, String)> = s
                    .endpoints
                    .iter()
                    .map(|e| (e.addresses[0].to_string(), e.zone.as_deref().unwrap_or("").to_string()))
                    .collect();
                assert_eq!(got, expected, "{id}: {}", s.name);
                for e in &s.endpoints {
                    assert_eq!((e.ready, e.serving, e.terminating), (Some(true), Some(true), Some(false)));
                    let pod = e.pod.as_ref().expect("targetRef to a pod");
                    let p = pods.get(&(s.namespace.clone(), pod.clone())).expect("the pod exists");
                    assert_eq!(p.labels.get("app").map(String::as_str), Some(&*s.service));
                    // the second reviews pod of each zone runs v2 (the demo's DestinationRule subsets)
                    let v2 = &*s.service == "reviews" && e.addresses[0].to_string().ends_with(".22");
                    let version = if v2 { "v2" } else { "v1" };
                    assert_eq!(p.labels.get("version").map(String::as_str), Some(version), "{id}: {pod}");
                    assert!(pod.starts_with(&format!("{}-{version}-", s.service)), "{id}: {pod}");
                    assert_eq!(&*p.service_account, &*s.service);
                    assert_eq!(p.node_name, e.node_name);
                    let node = e.node_name.as_ref().expect("node name");
                    assert_eq!(node_zone.get(node).map(|z| &**z), e.zone.as_deref(), "{id}: {pod}");
                }
            }
        }
    }

    #[tokio::test]
    async fn example_runs() {
        let cfg = MeshConfig::load(&example().join("mesh.yaml")).unwrap();
        let (tx, mut rx) = unbounded_channel();
        let handle = run(&cfg, tx).await.unwrap();
        for id in ["aws-use1", "azure-weu"] {
            let (cluster, objects) = next_sync(&mut rx).await;
            assert_eq!(cluster, id);
            // 25 Kubernetes objects per cluster; the AWS cluster also holds the demo's 2 DestinationRules
            assert_eq!(objects.len(), if id == "aws-use1" { 27 } else { 25 });
        }
        assert!(handle.errors().is_empty(), "{:?}", handle.errors());
    }
}
