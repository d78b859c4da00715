//! `meshfed traffic drain | undrain | drill | status | whatif`.
//!
//! `drain` and `undrain` edit the mesh config file ([`super::edit`]); a `meshfed serve` watching it
//! applies the edit without a restart ([`crate::config_watch`]). With `--kubeconfig` they edit the
//! `TrafficPolicy` custom resource the replicas watch instead ([`super::kube_edit`]). `status` and `whatif` read a running
//! meshfed's debug server ([`super::client`]).

use std::path::PathBuf;
use std::time::SystemTime;

use super::{client, edit, kube_edit};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Edit(#[from] edit::Error),
    #[error(transparent)]
    Client(#[from] client::Error),
    #[error(transparent)]
    Kube(#[from] kube_edit::Error),
    #[error("reading the token file {path}: {source}")]
    Token { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Usage(String),
    /// An edit of several TrafficPolicy objects (one per `--context`) that failed on one of them.
    #[error("{failed}: {source}{}", if done.is_empty() { String::new() } else { format!(" (already written: {}; run the command again once the failed one answers, it is idempotent)", done.join(", ")) })]
    Partial { done: Vec<String>, failed: String, source: Box<Error> },
}

/// `meshfed traffic`'s command line.
#[derive(Clone, Debug, clap::Args)]
pub struct TrafficArgs {
    #[command(subcommand)]
    pub command: TrafficCommand,
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum TrafficCommand {
    /// Drain a cluster (or a region): set its drain in the mesh config's `traffic.drains`.
    Drain(DrainArgs),
    /// Remove a cluster's (or a region's) drain from the mesh config.
    Undrain(UndrainArgs),
    /// Run a drill: a drain that ramps, aborts by itself when the clusters taking the traffic fall below
    /// --abort-below-healthy percent healthy, and reverts after --duration (report: /debug/drillz). With
    /// --abort: remove the drill (a manual abort).
    Drill(DrillArgs),
    /// Print a running meshfed's traffic decisions, drains and mesh config reload state (/debug/trafficz).
    Status(StatusArgs),
    /// Print what a running meshfed predicts for a service, now and if a cluster were drained or down
    /// (/debug/whatif).
    Whatif(WhatifArgs),
}

#[derive(Clone, Debug, clap::Args)]
pub struct FileArgs {
    /// The mesh config file to edit (meshfed serve --mesh-config applies the edit without a restart).
    #[arg(long, env = "MESHFED_MESH_CONFIG")]
    pub mesh_config: Option<PathBuf>,
    /// Kubernetes mode: edit the TrafficPolicy custom resource (meshfed.io) that the replicas watch
    /// (mesh config `trafficPolicy`) through this kubeconfig, instead of the mesh config file.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig's context (default: its current context). Repeat it to edit the TrafficPolicy
    /// of every cloud's control plane in one command (each cloud's meshfed reads its own cluster's).
    #[arg(long = "context", requires = "kubeconfig")]
    pub contexts: Vec<String>,
    /// The TrafficPolicy's namespace.
    #[arg(long, default_value = "istio-system")]
    pub namespace: String,
    /// The TrafficPolicy's name.
    #[arg(long, default_value = "default")]
    pub name: String,
}

/// Where `drain` / `undrain` write.
enum Store<'a> {
    File(&'a std::path::Path),
    /// one object per context, edited in turn
    Kube(Vec<kube_edit::ObjectRef>),
}

impl FileArgs {
    fn store(&self) -> Result<Store<'_>, Error> {
        match (&self.kubeconfig, &self.mesh_config) {
            (Some(k), _) => {
                let contexts: Vec<Option<String>> = match self.contexts.as_slice() {
                    [] => vec![None],
                    cs => cs.iter().cloned().map(Some).collect(),
                };
                let objects = contexts.into_iter().map(|context| kube_edit::ObjectRef {
                    kubeconfig: k.clone(),
                    context,
                    namespace: self.namespace.clone(),
                    name: self.name.clone(),
                });
                Ok(Store::Kube(objects.collect()))
            }
            (None, Some(p)) => Ok(Store::File(p)),
            (None, None) => Err(Error::Usage("give --mesh-config FILE or --kubeconfig FILE".into())),
        }
    }
}

impl Store<'_> {
    /// Applies `f` to the drains where they are kept (the mesh config file's `traffic.drains`, or the
    /// TrafficPolicy's `spec.drains`), validated before it is written; returns the place, for the message.
    fn edit_drains(&self, f: impl Fn(&mut Vec<serde_yaml::Value>) -> Result<(), edit::Error>) -> Result<String, Error> {
        match self {
            Store::File(path) => {
                let e = edit::edit_file(path, |text, base| edit::edit(text, base, &f))?;
                note_rewritten(&e);
                Ok(path.display().to_string())
            }
            Store::Kube(objects) => {
                let mut done = Vec::new();
                for object in objects {
                    let place = match &object.context {
                        Some(c) => format!("TrafficPolicy {object} in context {c}"),
                        None => format!("TrafficPolicy {object}"),
                    };
                    match kube_edit::edit_object_blocking(object, &f) {
                        Ok(w) => note_written(&place, &w),
                        Err(e) if objects.len() == 1 => return Err(e.into()),
                        Err(e) => return Err(Error::Partial { done, failed: place, source: Box::new(e.into()) }),
                    }
                    done.push(place);
                }
                Ok(done.join(", "))
            }
        }
    }
}

fn note_written(place: &str, w: &kube_edit::Written) {
    eprintln!(
        "{place} {} (resourceVersion {})",
        if w.created { "created" } else { "updated" },
        w.resource_version.as_deref().unwrap_or("?")
    );
}

#[derive(Clone, Debug, clap::Args)]
#[group(id = "target", required = true, multiple = false)]
pub struct TargetArgs {
    /// The cluster to drain.
    #[arg(long, group = "target")]
    pub cluster: Option<String>,
    /// The source region to drain (every cluster's endpoints there).
    #[arg(long, group = "target")]
    pub region: Option<String>,
}

impl TargetArgs {
    fn target(&self) -> Result<edit::Target, Error> {
        match (&self.cluster, &self.region) {
            (Some(c), None) => Ok(edit::Target::Cluster(c.clone())),
            (None, Some(r)) => Ok(edit::Target::Region(r.clone())),
            _ => Err(Error::Usage("give --cluster or --region".into())),
        }
    }
}

/// The share a drain or a drill leaves its target, and the ramp down to it.
#[derive(Clone, Debug, clap::Args)]
pub struct ShareArgs {
    /// Percent of the target's normal share it keeps (at the end of the ramp, with one), 0..100.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub capacity: i64,
    /// Ramp down: percent removed every --ramp-every (with --ramp-every).
    #[arg(long, requires = "ramp_every", allow_negative_numbers = true)]
    pub ramp_step: Option<i64>,
    /// Ramp down: the time between two steps, e.g. 30s (with --ramp-step).
    #[arg(long, requires = "ramp_step")]
    pub ramp_every: Option<String>,
}

impl ShareArgs {
    /// The ramp (step, every), when both are given.
    fn ramp(&self) -> Option<(i64, String)> {
        self.ramp_step.zip(self.ramp_every.clone())
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct DrainArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub share: ShareArgs,
    /// When the drain ends by itself: an RFC 3339 time or a duration from now (2h, 7d); at most the
    /// policy's maxDrainDuration (default 7d) ahead.
    #[arg(long)]
    pub expires: String,
    /// Why (shown on /debug/trafficz).
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub file: FileArgs,
}

#[derive(Clone, Debug, clap::Args)]
pub struct DrillArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Abort the target's drill now: remove it from the mesh config.
    #[arg(long, conflicts_with_all = ["duration", "ramp_step", "ramp_every", "abort_below_healthy", "reason"])]
    pub abort: bool,
    /// How long the drill lasts (e.g. 10m); it reverts by itself at the end.
    #[arg(long, required_unless_present = "abort")]
    pub duration: Option<String>,
    #[command(flatten)]
    pub share: ShareArgs,
    /// Abort by itself when a cluster taking the drained traffic has fewer than this percent of a
    /// service's endpoints healthy, 0..100 (0: never).
    #[arg(long, default_value_t = 50, allow_negative_numbers = true)]
    pub abort_below_healthy: i64,
    /// Why (shown on /debug/trafficz and /debug/drillz).
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub file: FileArgs,
}

#[derive(Clone, Debug, clap::Args)]
pub struct UndrainArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub file: FileArgs,
}

#[derive(Clone, Debug, clap::Args)]
pub struct DebugArgs {
    /// meshfed's debug address (HOST:PORT; plain HTTP).
    #[arg(long, default_value = "127.0.0.1:15014")]
    pub debug_address: String,
    /// Bearer token of the debug server (--debug-token-file of meshfed serve).
    #[arg(long, env = "MESHFED_DEBUG_TOKEN", conflicts_with = "token_file")]
    pub token: Option<String>,
    /// File holding the bearer token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Print the JSON as meshfed answered it.
    #[arg(long)]
    pub json: bool,
}

impl DebugArgs {
    fn token(&self) -> Result<Option<String>, Error> {
        match (&self.token, &self.token_file) {
            (Some(t), _) => Ok(Some(t.clone())),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_string()))
                .map_err(|source| Error::Token { path: path.clone(), source }),
            (None, None) => Ok(None),
        }
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub debug: DebugArgs,
}

#[derive(Clone, Debug, clap::Args)]
#[group(id = "from", required = true, multiple = false)]
pub struct WhatifArgs {
    #[command(flatten)]
    pub debug: DebugArgs,
    /// The service's FQDN.
    #[arg(long)]
    pub host: String,
    /// The service port (default: its first).
    #[arg(long)]
    pub port: Option<u16>,
    /// For this connected proxy (its node id, or POD.NAMESPACE).
    #[arg(long, group = "from")]
    pub proxy: Option<String>,
    /// For a sidecar in this region.
    #[arg(long, group = "from")]
    pub region: Option<String>,
    /// Hypothesis: this cluster drained to 0.
    #[arg(long)]
    pub drain: Option<String>,
    /// Hypothesis: this cluster's endpoints gone.
    #[arg(long)]
    pub down: Option<String>,
}

/// Runs a `meshfed traffic` command; returns what to print on stdout (notes go to stderr).
pub fn run(args: &TrafficArgs) -> Result<String, Error> {
    match &args.command {
        TrafficCommand::Drain(a) => {
            let spec = edit::DrainSpec {
                target: a.target.target()?,
                capacity: a.share.capacity,
                ramp: a.share.ramp(),
                expires: edit::expiry(&a.expires, SystemTime::now())?,
                reason: a.reason.clone(),
            };
            let place = a.file.store()?.edit_drains(|drains| {
                edit::set_drain(drains, &spec);
                Ok(())
            })?;
            Ok(format!("{} drained to {}% until {} in {place}\n", spec.target, spec.capacity, spec.expires))
        }
        TrafficCommand::Undrain(a) => {
            let target = a.target.target()?;
            let place = a.file.store()?.edit_drains(|drains| edit::remove_drain(drains, &target))?;
            Ok(format!("{target}: drain removed from {place}\n"))
        }
        TrafficCommand::Drill(a) => {
            let target = a.target.target()?;
            let store = a.file.store()?;
            if a.abort {
                let place = store.edit_drains(|drains| edit::remove_drill(drains, &target))?;
                return Ok(format!("{target}: drill aborted (removed from {place})\n"));
            }
            let duration = a.duration.as_deref().ok_or_else(|| Error::Usage("give --duration".into()))?;
            let now = SystemTime::now();
            let start = crate::traffic::decide::time_str(now);
            let spec = edit::DrainSpec {
                target,
                capacity: a.share.capacity,
                ramp: a.share.ramp(),
                expires: edit::expiry(duration, now)?,
                reason: Some(a.reason.clone().unwrap_or_else(|| "drill".into())),
            };
            let place = store.edit_drains(|drains| {
                edit::set_drain_with(drains, &spec, edit::drill_fields(&start, a.abort_below_healthy));
                Ok(())
            })?;
            Ok(format!(
                "{}: drill from {start} until {}, down to {}%, aborts below {}% healthy; report: /debug/drillz ({place})\n",
                spec.target, spec.expires, spec.capacity, a.abort_below_healthy
            ))
        }
        TrafficCommand::Status(a) => {
            let v = client::get_json(&a.debug.debug_address, "/debug/trafficz", a.debug.token()?.as_deref())?;
            Ok(if a.debug.json { format!("{v:#}\n") } else { client::format_status(&v) })
        }
        TrafficCommand::Whatif(a) => {
            let mut path = format!("/debug/whatif?host={}", client::encode(&a.host));
            let mut param = |k: &str, v: &Option<String>| {
                if let Some(v) = v {
                    path.push_str(&format!("&{k}={}", client::encode(v)));
                }
            };
            param("proxy", &a.proxy);
            param("region", &a.region);
            param("drain", &a.drain);
            param("down", &a.down);
            param("port", &a.port.map(|p| p.to_string()));
            let v = client::get_json(&a.debug.debug_address, &path, a.debug.token()?.as_deref())?;
            Ok(if a.debug.json { format!("{v:#}\n") } else { client::format_whatif(&v) })
        }
    }
}

fn note_rewritten(e: &edit::Edited) {
    if e.rewritten {
        eprintln!(
            "note: the traffic: block could not be replaced on its own; the whole file was rewritten (its comments are lost)"
        );
    }
}
