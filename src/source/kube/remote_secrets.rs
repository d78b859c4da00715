//! Clusters discovered from Istio remote secrets: Secrets labelled `istio/multiCluster=true` in meshfed's
//! namespace of the config cluster (mesh config `remoteSecrets`), each data key a cluster id and its
//! value a kubeconfig (as `istioctl create-remote-secret` writes them).
//!
//! The secrets are watched; at runtime:
//! - a new cluster id starts a [`ClusterWatch`] for that cluster;
//! - a changed kubeconfig restarts the cluster's watches (the new watch's first sync reconciles its
//!   objects exactly; until then the last-known ones stay). A kubeconfig that cannot be used is reported
//!   (`lastError`) and the previous watch, if any, keeps running;
//! - a deleted secret (or key) stops the watch and removes the cluster's objects at once (an empty
//!   [`SourceEvent::Sync`]); the cluster shows as `closed`.
//!
//! A cluster restored at start from the last-known state ([`crate::source::last_known`]; registered in
//! [`ClusterHealth`] with its secret and `restoredFrom`) is served before the secrets are listed. Once
//! they are, one that is in them is started like any other (its restored objects stay until its own API
//! answers: its first live Sync replaces them), and one that is not is removed as a deleted secret's
//! cluster is.
//!
//! Kubeconfigs from secrets may not run commands or auth plugins unless allowed (`allowExecAuth`), nor
//! name local files. Ids of clusters configured statically in the mesh config are ignored (the config
//! cluster's own secret, as istiod does). When the same id is in two secrets, the first secret by name
//! wins and the other is reported.
//!
//! A part of the Kubernetes source that sits above the cluster loop: it uses the client (to reach the
//! config cluster, and to check the kubeconfigs of secrets), the retry timing, and the cluster loop (a
//! [`ClusterWatch`] per cluster); [`super::start`] spawns it when the mesh config has `remoteSecrets`.
//! Nothing here uses `start`, so the dependency goes one way: `start` -> remote secrets -> cluster
//! loop -> client.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::time::SystemTime;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::config::Kubeconfig;
use kube::runtime::watcher;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::backoff::{Backoff, WATCH_BACKOFF};
use super::client::{ClientSpec, build_client, check_kubeconfig};
use super::cluster::{ClusterWatch, KubeOptions};
use crate::model::ClusterId;
use crate::source::{ClusterHealth, SourceEvent, SyncState};

/// The label that marks a remote secret.
pub const MULTICLUSTER_LABEL: &str = "istio/multiCluster";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A secret's value is not a usable kubeconfig.
    #[error("remote secret {secret}, cluster {cluster}: {reason}")]
    Kubeconfig { secret: String, cluster: ClusterId, reason: String },
    /// A Secret object could not be read.
    #[error("remote secret {secret}: {reason}")]
    Secret { secret: String, reason: String },
}

/// A running watch of the remote secrets and of the clusters they define. Dropping it stops them all.
pub struct RemoteSecretsWatch {
    task: JoinHandle<()>,
    listed: watch::Receiver<bool>,
}

impl RemoteSecretsWatch {
    /// Watches the remote secrets in `namespace` of the cluster reached through `config`; clusters whose
    /// id is in `static_ids` are ignored.
    pub fn spawn(
        config: ClientSpec,
        namespace: String,
        static_ids: BTreeSet<ClusterId>,
        options: KubeOptions,
        tx: UnboundedSender<SourceEvent>,
        health: ClusterHealth,
    ) -> RemoteSecretsWatch {
        let (listed_tx, listed) = watch::channel(false);
        let state = Secrets {
            namespace,
            static_ids,
            options,
            tx,
            health,
            secrets: BTreeMap::new(),
            running: BTreeMap::new(),
            listed: listed_tx,
        };
        RemoteSecretsWatch { task: tokio::spawn(state.run(config)), listed }
    }

    /// Becomes true once the secrets have been listed (and their clusters started).
    pub fn listed(&self) -> watch::Receiver<bool> {
        self.listed.clone()
    }
}

impl Drop for RemoteSecretsWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One cluster started from a secret.
struct Running {
    secret: String,
    /// the kubeconfig last seen for it (applied, or refused)
    kubeconfig: Vec<u8>,
    /// None: its kubeconfig was never usable
    watch: Option<ClusterWatch>,
}

struct Secrets {
    namespace: String,
    static_ids: BTreeSet<ClusterId>,
    options: KubeOptions,
    tx: UnboundedSender<SourceEvent>,
    health: ClusterHealth,
    /// secret name -> cluster id -> kubeconfig
    secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    running: BTreeMap<ClusterId, Running>,
    listed: watch::Sender<bool>,
}

type SecretEvents = Pin<Box<dyn Stream<Item = Result<watcher::Event<DynamicObject>, watcher::Error>> + Send>>;

impl Secrets {
    async fn run(mut self, config: ClientSpec) {
        let mut backoff = Backoff::new(WATCH_BACKOFF);
        let client = loop {
            match build_client(&config, self.options.allow_exec_auth).await {
                Ok(c) => break c,
                Err(e) => {
                    warn!(namespace = %self.namespace, "remote secrets: config cluster: {e}; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        };
        let api: Api<DynamicObject> = Api::namespaced_with(client, &self.namespace, &ApiResource::erase::<Secret>(&()));
        let config = watcher::Config::default().labels(&format!("{MULTICLUSTER_LABEL}=true"));
        let mut stream: SecretEvents = watcher(api, config).boxed();
        let mut listing: Option<BTreeMap<String, BTreeMap<String, Vec<u8>>>> = None;
        let mut last_error: Option<String> = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(watcher::Event::Init) => listing = Some(BTreeMap::new()),
                Ok(watcher::Event::InitApply(obj)) => {
                    if let Some((name, data)) = self.parse(&obj) {
                        listing.get_or_insert_default().insert(name, data);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    backoff.reset();
                    last_error = None;
                    self.secrets = listing.take().unwrap_or_default();
                    self.reconcile();
                    self.listed.send_replace(true);
                }
                Ok(watcher::Event::Apply(obj)) => {
                    if let Some((name, data)) = self.parse(&obj) {
                        self.secrets.insert(name, data);
                        self.reconcile();
                    }
                }
                Ok(watcher::Event::Delete(obj)) => {
                    if let Some(name) = obj.metadata.name.as_ref() {
                        self.secrets.remove(name);
                        self.reconcile();
                    }
                }
                Err(e) => {
                    // the clusters already started keep running
                    let message = e.to_string();
                    if last_error.as_ref() != Some(&message) {
                        warn!(namespace = %self.namespace, "remote secrets watch: {message}");
                    }
                    last_error = Some(message);
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
            if self.tx.is_closed() {
                return;
            }
        }
    }

    /// A secret's name and its data (cluster id -> kubeconfig); None (reported) when it cannot be read:
    /// its previous version, if any, stays in use.
    fn parse(&self, obj: &DynamicObject) -> Option<(String, BTreeMap<String, Vec<u8>>)> {
        let name = obj.metadata.name.clone().filter(|n| !n.is_empty())?;
        let parsed = serde_json::to_value(obj).and_then(|mut v| {
            if let serde_json::Value::Object(m) = &mut v {
                m.insert("apiVersion".into(), "v1".into());
                m.insert("kind".into(), "Secret".into());
            }
            serde_json::from_value::<Secret>(v)
        });
        match parsed {
            Ok(secret) => {
                let data = secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
                Some((name, data))
            }
            Err(e) => {
                let e = Error::Secret { secret: format!("{}/{name}", self.namespace), reason: e.to_string() };
                warn!("{e}; keeping its previous version, if any");
                None
            }
        }
    }

    fn secret_ref(&self, name: &str) -> String {
        format!("{}/{name}", self.namespace)
    }

    /// Starts, restarts and stops cluster watches to match the secrets.
    fn reconcile(&mut self) {
        let mut desired: BTreeMap<ClusterId, (String, Vec<u8>)> = BTreeMap::new();
        for (secret, data) in &self.secrets {
            for (cluster, kubeconfig) in data {
                let id = ClusterId::new(cluster);
                if cluster.is_empty() || self.static_ids.contains(&id) {
                    continue;
                }
                if let Some((first, _)) = desired.get(&id) {
                    warn!(cluster = %id, "remote secret {} defines cluster {id} again (also in {}); ignored", self.secret_ref(secret), self.secret_ref(first));
                    continue;
                }
                desired.insert(id, (secret.clone(), kubeconfig.clone()));
            }
        }
        // gone
        let gone: Vec<ClusterId> = self.running.keys().filter(|id| !desired.contains_key(*id)).cloned().collect();
        for id in gone {
            if let Some(r) = self.running.remove(&id) {
                info!(cluster = %id, secret = %self.secret_ref(&r.secret), "remote secret removed: stopping the cluster's watch and removing its endpoints");
                drop(r.watch);
                self.close(&id);
            }
        }
        // restored at start (last-known state) but in no secret of the list: removed as a deleted secret's
        let restored_only: Vec<(ClusterId, String)> = self
            .health
            .list()
            .into_iter()
            .filter(|s| s.restored_from.is_some() && !self.static_ids.contains(&s.id))
            .filter(|s| !self.running.contains_key(&s.id) && !desired.contains_key(&s.id))
            .filter_map(|s| Some((s.id, s.secret_name?)))
            .collect();
        for (id, secret) in restored_only {
            info!(cluster = %id, secret = %secret, "a cluster restored from the last-known state has no remote secret any more: removing its endpoints");
            self.close(&id);
        }
        // new or changed
        for (id, (secret, kubeconfig)) in desired {
            if let Some(r) = self.running.get(&id)
                && r.kubeconfig == kubeconfig
            {
                continue;
            }
            let secret_ref = self.secret_ref(&secret);
            match self.usable(&secret_ref, &id, &kubeconfig) {
                Ok(kc) => {
                    let restart = self.running.contains_key(&id);
                    info!(cluster = %id, secret = %secret_ref, "{}", if restart { "remote secret changed: restarting the cluster's watch" } else { "cluster added from a remote secret" });
                    // stop the old watch first
                    self.running.remove(&id);
                    self.health.register(&id, format!("remote secret {secret_ref}"), Some(secret_ref.clone()));
                    let spec = ClientSpec::Inline { kubeconfig: Box::new(kc), context: None };
                    let watch = ClusterWatch::spawn(
                        id.clone(),
                        spec,
                        self.options.clone(),
                        self.tx.clone(),
                        self.health.clone(),
                    );
                    self.running.insert(id, Running { secret, kubeconfig, watch: Some(watch) });
                }
                Err(e) => {
                    let message = e.to_string();
                    warn!(cluster = %id, "{message}");
                    match self.running.get_mut(&id) {
                        // keep the previous watch (and the last-known endpoints) running
                        Some(r) => {
                            r.kubeconfig = kubeconfig;
                            r.secret = secret;
                            self.health.update(&id, |s| s.config_error = Some(message));
                        }
                        None => {
                            self.health.register(&id, format!("remote secret {secret_ref}"), Some(secret_ref));
                            self.health.update(&id, |s| {
                                s.sync = SyncState::Closed;
                                s.config_error = Some(message.clone());
                                s.last_error = Some(message);
                            });
                            self.running.insert(id, Running { secret, kubeconfig, watch: None });
                        }
                    }
                }
            }
        }
    }

    /// Removes a cluster whose secret is gone: its objects go at once (an empty Sync), it shows `closed`.
    /// The status first, so that whoever sees the empty Sync (the last-known state's tap) sees it closed.
    fn close(&self, id: &ClusterId) {
        let now = SystemTime::now();
        self.health.update(id, |s| {
            s.sync = SyncState::Closed;
            s.unreachable_since = None;
            s.last_error = None;
            s.config_error = None;
            s.object_errors.clear();
            s.last_event = Some(now);
            s.restored_from = None;
        });
        let _ = self.tx.send(SourceEvent::Sync { cluster: id.clone(), objects: Vec::new() });
        let _ = self.tx.send(SourceEvent::ClusterReachability { cluster: id.clone(), reachable: true, since: now });
    }

    fn usable(&self, secret: &str, id: &ClusterId, kubeconfig: &[u8]) -> Result<Kubeconfig, Error> {
        let err = |reason: String| Error::Kubeconfig { secret: secret.to_string(), cluster: id.clone(), reason };
        let text = std::str::from_utf8(kubeconfig).map_err(|_| err("the kubeconfig is not UTF-8 text".into()))?;
        let kc = Kubeconfig::from_yaml(text).map_err(|e| err(format!("not a kubeconfig: {e}")))?;
        if kc.clusters.is_empty() {
            return Err(err("the kubeconfig has no cluster".into()));
        }
        check_kubeconfig(&kc, self.options.allow_exec_auth, false).map_err(|e| err(e.to_string()))?;
        Ok(kc)
    }
}
