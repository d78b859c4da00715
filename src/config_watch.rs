//! The live mesh config: `meshfed serve --mesh-config FILE` watches the file and applies an edit
//! without a restart.
//!
//! The file's directory is watched (notify; an editor's write-and-rename and a Kubernetes ConfigMap's
//! `..data` symlink swap both show up there) and the file is also read every [`POLL_INTERVAL`] in case
//! an event was missed; events are debounced ([`QUIET`], at most [`MAX_DELAY`]). A content that did not
//! change is not parsed again.
//!
//! A new content is parsed and validated as at start ([`MeshConfig::load`]):
//! - invalid: logged with the file, the field and the reason, reported on `/debug/warnings` (kind
//!   `mesh-config`) and in `meshfed_mesh_config_reload_errors_total` /
//!   `meshfed_mesh_config_last_reload_success`; the last good config keeps serving;
//! - valid: what can change live is applied ([`decide`]): `traffic` (to the push loop, which keeps the
//!   start of drains it already had), `defaults` and `sendUnhealthyEndpoints`. Every other field that
//!   changed (clusters, remoteSecrets, lastKnownState, gatewayProbes, debounce, ...) is reported as
//!   "changed; takes effect at restart" (kind `mesh-config-restart`) and its running value stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher as _};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::mesh_config::MeshConfig;
use crate::push::{LiveSettings, PushHandle};
use crate::traffic::TrafficPolicy;
use crate::traffic_policy::owner::TrafficOwner;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("watching the mesh config's directory {path}: {source}")]
    Watch { path: PathBuf, source: notify::Error },
    #[error(transparent)]
    Config(#[from] crate::mesh_config::Error),
}

/// A burst of file events ends after this long without another.
pub const QUIET: Duration = Duration::from_millis(150);
/// A reload happens at the latest this long after the first event of a burst.
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// The file is read this often even without events (a missed event, an unwatchable mount).
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The mesh config fields a reload applies while meshfed runs.
pub const LIVE_FIELDS: [&str; 3] = ["traffic", "defaults", "sendUnhealthyEndpoints"];

/// What a valid new mesh config changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reload {
    /// the new traffic policy (None: unchanged)
    pub traffic: Option<TrafficPolicy>,
    /// new `defaults` / `sendUnhealthyEndpoints` (None: unchanged)
    pub settings: Option<LiveSettings>,
    /// the fields that differ from the running config and take effect at restart only (the running values
    /// stay)
    pub restart: Vec<&'static str>,
}

/// Decides what `new` changes: live fields against `applied` (the last good config applied), the
/// others against `started` (the config meshfed started with, whose values keep running).
pub fn decide(started: &MeshConfig, applied: &MeshConfig, new: &MeshConfig) -> Reload {
    let mut out = Reload::default();
    if new.traffic != applied.traffic {
        out.traffic = Some(new.traffic.clone());
    }
    if new.defaults != applied.defaults || new.send_unhealthy_endpoints != applied.send_unhealthy_endpoints {
        out.settings = Some(LiveSettings {
            defaults: new.defaults.clone(),
            send_unhealthy_endpoints: new.send_unhealthy_endpoints,
        });
    }
    let (s, n) = (started, new);
    for (field, changed) in [
        ("clusters", s.clusters != n.clusters),
        ("remoteSecrets", s.remote_secrets != n.remote_secrets),
        ("lastKnownState", s.last_known_state != n.last_known_state),
        ("gatewayProbes", s.gateway_probes != n.gateway_probes),
        ("debounce", s.debounce != n.debounce),
        ("domainSuffix", s.domain_suffix != n.domain_suffix),
        ("trustDomain", s.trust_domain != n.trust_domain),
        ("readyTimeout", s.ready_timeout != n.ready_timeout),
        ("unreachableGracePeriod", s.unreachable_grace_period != n.unreachable_grace_period),
        ("allowExecAuth", s.allow_exec_auth != n.allow_exec_auth),
        ("trafficPolicy", s.traffic_policy != n.traffic_policy),
    ] {
        if changed {
            out.restart.push(field);
        }
    }
    out
}

/// The watcher's state, as the debug surface shows it.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub path: PathBuf,
    /// the last reload's error (file, field, reason): the last good config keeps serving
    pub error: Option<String>,
    /// fields changed in the file that take effect at restart
    pub restart_pending: Vec<&'static str>,
    #[serde(serialize_with = "ser_opt_time")]
    pub last_success: Option<SystemTime>,
    #[serde(serialize_with = "ser_opt_time")]
    pub last_error: Option<SystemTime>,
}

fn ser_opt_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&crate::traffic::decide::time_str(*t)),
        None => s.serialize_none(),
    }
}

impl Status {
    /// `/debug/warnings` entries: the reload error (kind `mesh-config`) and the fields waiting for a
    /// restart (kind `mesh-config-restart`).
    pub fn warnings(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let subject = self.path.display().to_string();
        if let Some(e) = &self.error {
            out.push(serde_json::json!({
                "kind": "mesh-config",
                "subject": subject,
                "message": format!("{e}; the last good mesh config keeps serving"),
            }));
        }
        if !self.restart_pending.is_empty() {
            out.push(serde_json::json!({
                "kind": "mesh-config-restart",
                "subject": subject,
                "message": format!(
                    "{} changed; takes effect at restart (the running values stay)",
                    self.restart_pending.join(", ")
                ),
            }));
        }
        out
    }
}

/// The running watcher: stops when dropped.
pub struct ConfigWatch {
    status: watch::Receiver<Arc<Status>>,
    task: JoinHandle<()>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl std::fmt::Debug for ConfigWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigWatch").field("status", &*self.status.borrow()).finish()
    }
}

impl Drop for ConfigWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ConfigWatch {
    pub fn subscribe(&self) -> watch::Receiver<Arc<Status>> {
        self.status.clone()
    }
}

/// Watches `path`, whose content `started` was loaded from, and hands valid edits to `push` (the
/// `traffic` section to `traffic`, which decides whether it is in force: a `trafficPolicy` custom
/// resource takes precedence). A directory that cannot be watched is logged; the file is still read
/// every [`POLL_INTERVAL`].
pub fn start(path: &Path, started: MeshConfig, push: PushHandle, traffic: TrafficOwner) -> ConfigWatch {
    let (status_tx, status) = watch::channel(Arc::new(Status { path: path.to_path_buf(), ..Default::default() }));
    let (events_tx, events) = mpsc::unbounded_channel();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let watcher = match watch_dir(&dir, events_tx) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!("{e}; reading the mesh config every {POLL_INTERVAL:?} instead");
            None
        }
    };
    let initial = std::fs::read(path).ok();
    crate::metrics::global().mesh_config_last_reload_success.set(1);
    let reloader =
        Reloader { path: path.to_path_buf(), applied: started.clone(), started, last: initial, push, traffic };
    let task = tokio::spawn(reloader.run(events, status_tx));
    info!(config = %path.display(), "watching the mesh config for edits");
    ConfigWatch { status, task, _watcher: watcher }
}

fn watch_dir(dir: &Path, tx: mpsc::UnboundedSender<()>) -> Result<notify::RecommendedWatcher, Error> {
    let werr = |source| Error::Watch { path: dir.to_path_buf(), source };
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(e) = res
            && !matches!(e.kind, notify::EventKind::Access(_))
        {
            let _ = tx.send(());
        }
    })
    .map_err(werr)?;
    watcher.watch(dir, RecursiveMode::NonRecursive).map_err(werr)?;
    Ok(watcher)
}

struct Reloader {
    path: PathBuf,
    started: MeshConfig,
    applied: MeshConfig,
    /// the content last read (None: not readable)
    last: Option<Vec<u8>>,
    push: PushHandle,
    /// decides which traffic policy is in force (the file's, or the custom resource's)
    traffic: TrafficOwner,
}

impl Reloader {
    async fn run(mut self, mut events: mpsc::UnboundedReceiver<()>, status: watch::Sender<Arc<Status>>) {
        let mut events_open = true;
        loop {
            tokio::select! {
                e = events.recv(), if events_open => {
                    if e.is_none() {
                        events_open = false;
                        continue;
                    }
                    // debounce: until QUIET without an event, MAX_DELAY at most
                    let deadline = tokio::time::Instant::now() + MAX_DELAY;
                    while let Ok(Some(())) = tokio::time::timeout_at(
                        deadline.min(tokio::time::Instant::now() + QUIET),
                        events.recv(),
                    )
                    .await
                    {}
                }
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
            self.check(&status, SystemTime::now());
        }
    }

    /// Reads the file; a new content is parsed, and applied if valid.
    fn check(&mut self, status: &watch::Sender<Arc<Status>>, now: SystemTime) {
        let content = match std::fs::read(&self.path) {
            Ok(c) => c,
            Err(e) => {
                if self.last.is_some() {
                    self.last = None;
                    self.failed(status, format!("cannot read mesh config {}: {e}", self.path.display()), now);
                }
                return;
            }
        };
        if self.last.as_deref() == Some(&content[..]) {
            return;
        }
        self.last = Some(content);
        match MeshConfig::load(&self.path) {
            Err(e) => self.failed(status, e.to_string(), now),
            Ok(new) => {
                let reload = decide(&self.started, &self.applied, &new);
                if let Some(policy) = &reload.traffic {
                    info!(
                        policies = policy.policies.len(),
                        drains = policy.drains.len(),
                        "mesh config: traffic changed"
                    );
                    self.traffic.set_file(policy.clone());
                }
                if let Some(settings) = &reload.settings {
                    self.push.set_live_settings(settings.clone());
                }
                if !reload.restart.is_empty() {
                    warn!(
                        config = %self.path.display(),
                        fields = ?reload.restart,
                        "mesh config changed; takes effect at restart (the running values stay)"
                    );
                }
                info!(config = %self.path.display(), "mesh config reloaded");
                self.applied = new;
                let m = crate::metrics::global();
                m.mesh_config_last_reload_success.set(1);
                status.send_modify(|s| {
                    let s = Arc::make_mut(s);
                    s.error = None;
                    s.restart_pending = reload.restart;
                    s.last_success = Some(now);
                });
            }
        }
    }

    fn failed(&self, status: &watch::Sender<Arc<Status>>, error: String, now: SystemTime) {
        warn!("{error}; the last good mesh config keeps serving");
        let m = crate::metrics::global();
        m.mesh_config_reload_errors.inc();
        m.mesh_config_last_reload_success.set(0);
        status.send_modify(|s| {
            let s = Arc::make_mut(s);
            s.error = Some(error);
            s.last_error = Some(now);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "clusters:\n  - {id: a, network: n1, manifests: a}\n  - {id: b, network: n2, manifests: b}\n";
    const SPLIT: &str = "traffic:\n  policies: [{split: {r1: {a: 70, b: 30}}}]\n";

    fn parse(text: &str) -> MeshConfig {
        MeshConfig::parse(text, Path::new("/etc/meshfed")).unwrap()
    }

    #[test]
    fn traffic_and_settings_are_live_the_rest_waits_for_a_restart() {
        let started = parse(BASE);
        // nothing changed
        assert_eq!(decide(&started, &started, &started), Reload::default());
        // traffic: live
        let split = parse(&format!("{BASE}{SPLIT}"));
        let r = decide(&started, &started, &split);
        assert_eq!(r.traffic.as_ref(), Some(&split.traffic));
        assert!(r.settings.is_none() && r.restart.is_empty());
        // the same split again, once applied: nothing to do
        assert_eq!(decide(&started, &split, &split), Reload::default());
        // back to no traffic section: the default policy
        assert_eq!(decide(&started, &split, &started).traffic, Some(TrafficPolicy::default()));
        // defaults and sendUnhealthyEndpoints: live
        let settings = parse(&format!("{BASE}sendUnhealthyEndpoints: true\n"));
        let r = decide(&started, &started, &settings);
        assert_eq!(r.settings.as_ref().map(|s| s.send_unhealthy_endpoints), Some(true));
        assert!(r.traffic.is_none() && r.restart.is_empty());
        // clusters, debounce, lastKnownState, gatewayProbes: at restart, beside a live change
        let more = parse(&format!(
            "{BASE}  - {{id: c, network: n3, manifests: c}}\ndebounce: {{quiet: 1s}}\nlastKnownState: {{}}\ngatewayProbes: {{}}\n{SPLIT}"
        ));
        let r = decide(&started, &started, &more);
        assert_eq!(r.restart, vec!["clusters", "lastKnownState", "gatewayProbes", "debounce"]);
        assert!(r.traffic.is_some());
        // reverting the file clears them (compared with the config meshfed started with)
        assert!(decide(&started, &more, &started).restart.is_empty());
    }

    fn reloader(
        dir: &Path,
        text: &str,
    ) -> (Reloader, watch::Sender<Arc<Status>>, mpsc::UnboundedReceiver<crate::push::Command>) {
        let path = dir.join("mesh.yaml");
        std::fs::write(&path, text).unwrap();
        let started = MeshConfig::load(&path).unwrap();
        let (tx, commands) = mpsc::unbounded_channel();
        let push = crate::push::Pusher::new(&started).0.handle_for(tx);
        let traffic = TrafficOwner::new(push.clone(), started.traffic.clone());
        let (tx, _) = watch::channel(Arc::new(Status::default()));
        let r = Reloader { last: std::fs::read(&path).ok(), path, applied: started.clone(), started, push, traffic };
        (r, tx, commands)
    }

    /// A Kubernetes ConfigMap mount: `mesh.yaml -> ..data/mesh.yaml`, `..data -> ..2026_...`; an update
    /// writes a new timestamped directory and swaps `..data` by renaming a new symlink over it.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_configmap_symlink_swap_is_applied() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("..v1")).unwrap();
        std::fs::write(d.join("..v1/mesh.yaml"), BASE).unwrap();
        symlink("..v1", d.join("..data")).unwrap();
        symlink("..data/mesh.yaml", d.join("mesh.yaml")).unwrap();
        let path = d.join("mesh.yaml");
        let started = MeshConfig::load(&path).unwrap();
        let (tx, mut commands) = mpsc::unbounded_channel();
        let push = crate::push::Pusher::new(&started).0.handle_for(tx);
        let traffic = TrafficOwner::new(push.clone(), started.traffic.clone());
        let watch = start(&path, started, push, traffic);
        // the update, as the kubelet makes it
        std::fs::create_dir(d.join("..v2")).unwrap();
        std::fs::write(d.join("..v2/mesh.yaml"), format!("{BASE}{SPLIT}")).unwrap();
        symlink("..v2", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        let got = tokio::time::timeout(POLL_INTERVAL * 3, commands.recv()).await.expect("a reload in time");
        assert!(matches!(got, Some(crate::push::Command::TrafficPolicy(p)) if p.policies.len() == 1));
        let status = watch.subscribe().borrow().clone();
        assert!(status.error.is_none() && status.last_success.is_some(), "{status:?}");
    }

    #[test]
    fn a_bad_edit_keeps_the_last_good_config_and_says_where() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, status, mut commands) = reloader(dir.path(), &format!("{BASE}{SPLIT}"));
        let now = SystemTime::now();
        // shares adding up to 90: refused, nothing sent
        std::fs::write(&r.path, format!("{BASE}traffic:\n  policies: [{{split: {{r1: {{a: 60, b: 30}}}}}}]\n"))
            .unwrap();
        r.check(&status, now);
        let e = status.borrow().error.clone().expect("an error");
        assert!(e.contains("mesh.yaml") && e.contains("traffic.policies[0].split.r1") && e.contains("90"), "{e}");
        assert!(commands.try_recv().is_err());
        let w = status.borrow().warnings();
        assert_eq!(w[0]["kind"], "mesh-config");
        // a good edit: the new policy goes to the push loop, the error clears
        std::fs::write(&r.path, format!("{BASE}traffic:\n  policies: [{{split: {{r1: {{a: 50, b: 50}}}}}}]\n"))
            .unwrap();
        r.check(&status, now);
        assert!(status.borrow().error.is_none());
        match commands.try_recv() {
            Ok(crate::push::Command::TrafficPolicy(p)) => {
                assert_eq!(p.policies[0].split["r1"][&crate::model::ClusterId::new("a")], 50)
            }
            other => panic!("expected a traffic policy, got {other:?}"),
        }
        // the same content again: not parsed, nothing sent
        r.check(&status, now);
        assert!(commands.try_recv().is_err());
        // a new cluster: reported, not applied
        std::fs::write(
            &r.path,
            format!("{BASE}  - {{id: c, network: n3, manifests: c}}\ntraffic:\n  policies: [{{split: {{r1: {{a: 50, b: 50}}}}}}]\n"),
        )
        .unwrap();
        r.check(&status, now);
        assert_eq!(status.borrow().restart_pending, vec!["clusters"]);
        assert!(commands.try_recv().is_err());
        assert!(status.borrow().warnings()[0]["message"].as_str().unwrap().contains("takes effect at restart"));
        // a missing file: an error, the last good config stays
        std::fs::remove_file(&r.path).unwrap();
        r.check(&status, now);
        assert!(status.borrow().error.as_deref().unwrap().contains("cannot read"));
        assert!(commands.try_recv().is_err());
    }
}
