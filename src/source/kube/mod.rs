//! The Kubernetes source: each cluster's objects come from its API server, watched with kube-rs.
//!
//! Per cluster, one task runs a [`watcher`] per kind meshfed reads (Namespaces, Services,
//! EndpointSlices, Pods that are not Failed, Nodes, and Istio DestinationRules when that CRD is
//! installed), plus a reachability probe (`GET /version`). Objects are converted with the same
//! converters as manifest files ([`TopologyObject::from_kube`]) and only their compact forms are kept
//! (the full objects, managedFields and all, are dropped at once), in a reflector-like store per kind.
//! What reaches the registry (the same channel the file source uses):
//!
//! - a [`SourceEvent::Sync`] of all the cluster's objects once every kind has been listed, and again
//!   whenever one kind is relisted (after a 410 Gone, or when the API comes back): the registry then
//!   reconciles exactly, so objects deleted meanwhile go and nothing is duplicated;
//! - [`SourceEvent::Upsert`] / [`SourceEvent::Delete`] for watch events in between;
//! - [`SourceEvent::ClusterReachability`] when the API server stops or starts answering. The objects are
//!   kept: an unreachable cluster's last-known endpoints keep being served, and the push loop demotes them
//!   after the grace period.
//!
//! An object that cannot be converted (a malformed or invalid one) is reported in [`ClusterHealth`]
//! (`objectErrors`) and its last good version, if any, is kept; the rest of the cluster is unaffected.
//!
//! ## Backoff and recovery
//!
//! kube-rs's default backoff resets on every `Ok` item, and a failing initial list emits an `Ok(Init)`
//! before each attempt, so an unreachable cluster would be retried about once a second forever. Here each
//! kind's watcher waits [`WATCH_BACKOFF`] after an error: 1 s doubling to 30 s, ±20% jitter, reset only
//! when a list completes (`InitDone`). While any request fails, the cluster's probe asks `GET /version`
//! with [`PROBE_BACKOFF`] (0.5 s doubling to 5 s, ±20%); the first answer wakes every waiting watcher at
//! once. So after an API server comes back, meshfed retries within at most [`MAX_RECOVERY_DELAY`]
//! (6 s) whatever the outage's length, and then reconciles with one watch (replaying what changed) or
//! one relist; healthy clusters are probed every [`PROBE_INTERVAL`].
//!
//! ## Parts, by job
//!
//! - `backoff.rs`: retry timing: [`BackoffPolicy`], [`Backoff`], and the delays named above.
//! - `kinds.rs`: the watched kinds ([`WatchedKind`]) and the conversion of their objects.
//! - `watch_guard.rs`: the client layer that notices watch streams cut short ([`WatchCuts`]).
//! - `client.rs`: how an API server is reached ([`ClientSpec`]), what a kubeconfig may not do
//!   ([`check_kubeconfig`]: exec and auth-provider users, local files in remote secrets), and
//!   [`build_client`] (with the watch guard).
//! - `cluster.rs`: the cluster loop: one cluster's watch pipeline and its health reporting
//!   ([`ClusterWatch`], [`KubeOptions`]).
//! - [`remote_secrets`]: clusters discovered from Istio remote secrets in a config cluster, each
//!   watched by the cluster loop.
//! - this file: [`start`], the Kubernetes sources of a whole mesh config ([`KubeSource`]): the
//!   clusters of the mesh config, and the remote-secret watcher.
//!
//! Each part uses only parts listed before it, and none uses this file, which re-exports their public
//! items: there is no import circle (`scripts/module-graph.py --level folder source/kube` checks it).
//! In particular the remote-secret watcher starts cluster watches but does not know `start`, which
//! spawns it: `start` -> `remote_secrets` -> `cluster` -> `client`.
//!
//! [`watcher`]: kube::runtime::watcher()
//! [`TopologyObject::from_kube`]: crate::topology::TopologyObject::from_kube

use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use tracing::warn;

use crate::mesh_config::MeshConfig;
use crate::model::ClusterId;
use crate::source::{ClusterHealth, SourceEvent, SyncState};

mod backoff;
mod client;
mod cluster;
mod kinds;
pub mod remote_secrets;
mod watch_guard;

pub use backoff::{
    ABSENT_CRD_RECHECK, Backoff, BackoffPolicy, MAX_RECOVERY_DELAY, PROBE_BACKOFF, PROBE_INTERVAL, PROBE_TIMEOUT,
    WATCH_BACKOFF,
};
pub use client::{CONNECT_TIMEOUT, ClientSpec, Error, build_client, check_kubeconfig};
pub use cluster::{ClusterWatch, KubeOptions};
pub use kinds::WatchedKind;
pub use watch_guard::WatchCuts;

use remote_secrets::RemoteSecretsWatch;

/// The Kubernetes sources of a mesh config: every cluster with a `kubeconfig` or `inCluster` source,
/// and the clusters of the remote secrets. Dropping it stops every watch.
pub struct KubeSource {
    clusters: Vec<ClusterWatch>,
    /// the remote-secret watcher and its config cluster
    secrets: Option<(RemoteSecretsWatch, ClusterId)>,
    health: ClusterHealth,
}

/// Starts watching every Kubernetes cluster of `mesh` (see [`KubeSource`]); returns at once.
pub fn start(
    mesh: &MeshConfig,
    options: KubeOptions,
    tx: UnboundedSender<SourceEvent>,
    health: ClusterHealth,
) -> KubeSource {
    let mut clusters = Vec::new();
    for c in &mesh.clusters {
        let Some(spec) = ClientSpec::from_source(&c.source) else { continue };
        health.register(&c.id, c.source.describe(), None);
        clusters.push(ClusterWatch::spawn(c.id.clone(), spec, options.clone(), tx.clone(), health.clone()));
    }
    let secrets = mesh.remote_secrets.as_ref().and_then(|rs| {
        let config = mesh.clusters.iter().find(|c| c.id == rs.config_cluster)?;
        let spec = ClientSpec::from_source(&config.source)?;
        let static_ids = mesh.clusters.iter().map(|c| c.id.clone()).collect();
        let watch = RemoteSecretsWatch::spawn(
            spec,
            rs.namespace.clone(),
            static_ids,
            options.clone(),
            tx.clone(),
            health.clone(),
        );
        Some((watch, rs.config_cluster.clone()))
    });
    KubeSource { clusters, secrets, health }
}

impl KubeSource {
    /// Whether there is any Kubernetes cluster or remote secret source.
    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty() && self.secrets.is_none()
    }

    /// Waits until the remote secrets are listed and every Kubernetes cluster known by then has synced (or
    /// was closed, or serves restored last-known state), at most `timeout`. The remote secrets' list is not
    /// waited for when the config cluster serves restored last-known state (the remote-secret clusters
    /// restored with it stand for the list until it comes). Clusters still syncing then are marked
    /// [`SyncState::Timeout`] (they join when they sync) and returned.
    pub async fn wait_ready(&self, timeout: Duration) -> Vec<ClusterId> {
        let deadline = tokio::time::Instant::now() + timeout;
        if let Some((secrets, config_cluster)) = &self.secrets
            && self.health.get(config_cluster).is_none_or(|s| s.restored_from.is_none())
        {
            let mut listed = secrets.listed();
            let _ = tokio::time::timeout_at(deadline, listed.wait_for(|l| *l)).await;
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        // a cluster serving restored last-known state is ready: meshfed serves what it restored at once
        let pending = |s: &super::ClusterStatus| {
            !s.source.starts_with("manifests:") && s.sync == SyncState::Syncing && s.restored_from.is_none()
        };
        self.health.wait_for(remaining, |list| !list.iter().any(pending)).await;
        let mut timed_out = Vec::new();
        for s in self.health.list() {
            if pending(&s) {
                warn!(cluster = %s.id, timeout = ?timeout, "initial list not complete within readyTimeout; ready without it, it joins when it syncs");
                self.health.update(&s.id, |st| {
                    if st.sync == SyncState::Syncing {
                        st.sync = SyncState::Timeout;
                    }
                });
                timed_out.push(s.id);
            }
        }
        timed_out
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::SystemTime;

    use kube::api::DynamicObject;

    use super::*;
    use crate::mesh_config::ClusterSource;

    #[test]
    fn mesh_config_kubernetes_sources() {
        let text = "clusters:\n  - id: config\n    network: n1\n    inCluster: true\n  - id: aws\n    network: n2\n    kubeconfig: kc/aws.yaml\n    context: prod\nremoteSecrets:\n  configCluster: config\nreadyTimeout: 5s\nunreachableGracePeriod: 2m\nallowExecAuth: true\n";
        let cfg = MeshConfig::parse(text, Path::new("/etc/meshfed")).expect("valid");
        assert_eq!(cfg.clusters[0].source, ClusterSource::InCluster);
        assert_eq!(
            cfg.clusters[1].source,
            ClusterSource::Kubeconfig { path: "/etc/meshfed/kc/aws.yaml".into(), context: Some("prod".into()) }
        );
        let rs = cfg.remote_secrets.as_ref().expect("remote secrets");
        assert_eq!((rs.config_cluster.as_str(), rs.namespace.as_str()), ("config", "istio-system"));
        assert_eq!(cfg.ready_timeout, Duration::from_secs(5));
        assert_eq!(cfg.unreachable_grace_period, Duration::from_secs(120));
        assert!(cfg.allow_exec_auth);

        let defaults = MeshConfig::parse("clusters: []\n", Path::new(".")).unwrap();
        assert_eq!(
            (defaults.ready_timeout, defaults.unreachable_grace_period),
            (Duration::from_secs(30), Duration::from_secs(60))
        );
        assert!(!defaults.allow_exec_auth && defaults.remote_secrets.is_none());

        for (bad, why) in [
            ("clusters:\n  - id: a\n    network: n\n    manifests: a\n    inCluster: true\n", "more than one source"),
            (
                "clusters:\n  - id: a\n    network: n\n    manifests: a\n    context: x\n",
                "`context` needs `kubeconfig`",
            ),
            (
                "clusters:\n  - id: a\n    network: n\n    manifests: a\nremoteSecrets:\n  configCluster: a\n",
                "must have a Kubernetes source",
            ),
            ("clusters: []\nremoteSecrets:\n  configCluster: x\n", "not a listed cluster"),
            ("clusters: []\nreadyTimeout: soon\n", "readyTimeout"),
        ] {
            let e = MeshConfig::parse(bad, Path::new(".")).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    fn dynamic(value: serde_json::Value) -> DynamicObject {
        serde_json::from_value(value).expect("a Kubernetes object")
    }

    #[test]
    fn reachability_drives_demotion_in_the_push_loop() {
        use crate::push::Pusher;
        let mesh = MeshConfig::parse(
            "clusters:\n  - id: a\n    network: n\n    manifests: a\nunreachableGracePeriod: 60s\n",
            Path::new("/nonexistent"),
        )
        .unwrap();
        let (mut pusher, _rx) = Pusher::new(&mesh);
        let a = ClusterId::new("a");
        let svc = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "reviews", "namespace": "shop", "labels": {"app": "reviews"}},
            "spec": {
                "type": "ClusterIP",
                "ports": [{"name": "http", "port": 9080, "protocol": "TCP", "targetPort": 9080}],
                "selector": {"app": "reviews"},
            },
        });
        let slice = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "reviews-a", "namespace": "shop", "labels": {"kubernetes.io/service-name": "reviews"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}],
            "endpoints": [{
                "addresses": ["10.0.0.1"],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": "n1",
            }],
        });
        let objects = vec![
            WatchedKind::Service.convert(&dynamic(svc)).unwrap().unwrap(),
            WatchedKind::EndpointSlice.convert(&dynamic(slice)).unwrap().unwrap(),
        ];
        pusher.apply(SourceEvent::Sync { cluster: a.clone(), objects });
        let t0 = SystemTime::now();
        pusher.apply(SourceEvent::ClusterReachability { cluster: a.clone(), reachable: false, since: t0 });
        assert!(pusher.refresh_demoted(t0 + Duration::from_secs(30)).is_empty(), "within the grace period");
        assert!(pusher.next_demotion().is_some());
        let change = pusher.refresh_demoted(t0 + Duration::from_secs(61));
        assert_eq!(change.services.len(), 1, "{change:?}");
        assert!(pusher.context().demoted_clusters.contains(&a));
        assert!(pusher.next_demotion().is_none(), "already demoted");
        pusher.apply(SourceEvent::ClusterReachability {
            cluster: a.clone(),
            reachable: true,
            since: SystemTime::now(),
        });
        let change = pusher.refresh_demoted(SystemTime::now());
        assert_eq!(change.services.len(), 1);
        assert!(pusher.context().demoted_clusters.is_empty());
    }
}
