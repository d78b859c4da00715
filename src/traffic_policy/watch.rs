//! The traffic policy as a custom resource: mesh config `trafficPolicy: {cluster, namespace, name}`
//! names one `TrafficPolicy` object (`meshfed.io/v1alpha1`, CRD in `manifests/base`) whose `spec` has
//! the shape of the mesh config's `traffic:` section. Every replica watches it, so they all serve one
//! state, and `meshfed traffic drain --kubeconfig ...` edits it ([`crate::traffic_policy::kube_edit`]).
//!
//! - valid object: its policy replaces the file's `traffic:` ([`TrafficOwner`] decides; see
//!   [`crate::traffic_policy::owner`] for the precedence);
//! - invalid object: logged and reported on `/debug/warnings` (kind `traffic-policy`, naming
//!   namespace/name, the field as `spec.…` and the reason); the last good policy stays in force;
//! - object deleted (or absent): the file's `traffic:` is in force again;
//! - API unreachable: the last good policy stays; the watch retries with the source's backoff.

use std::time::SystemTime;

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::watcher;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::mesh_config::TrafficPolicyRef;
use crate::model::ClusterId;
use crate::source::kube::{Backoff, WATCH_BACKOFF};
use crate::source::kube::{ClientSpec, build_client};
use crate::traffic::TrafficPolicy;
use crate::traffic_policy::owner::TrafficOwner;

/// The API group of the custom resource.
pub const GROUP: &str = "meshfed.io";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "TrafficPolicy";
pub const PLURAL: &str = "trafficpolicies";

/// The custom resource's API resource (for dynamic clients).
pub fn api_resource() -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: KIND.into(),
        plural: PLURAL.into(),
    }
}

/// Parses an object's `spec` (absent: an empty policy) as the `traffic:` section; errors name the field
/// as `spec.…`.
pub fn parse_spec(
    spec: Option<&serde_json::Value>,
    clusters: &[ClusterId],
    dynamic_clusters: bool,
    now: SystemTime,
) -> Result<TrafficPolicy, crate::traffic::policy::Error> {
    let value = match spec {
        None | Some(serde_json::Value::Null) => serde_yaml::Value::Mapping(Default::default()),
        Some(v) => serde_yaml::to_value(v)
            .map_err(|e| crate::traffic::policy::Error { field: "spec".into(), reason: e.to_string() })?,
    };
    TrafficPolicy::parse_with(&value, clusters, dynamic_clusters, now).map_err(|mut e| {
        if let Some(rest) = e.field.strip_prefix("traffic") {
            e.field = format!("spec{rest}");
        }
        e
    })
}

/// The watch's state, as the debug surface shows it.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// `cluster/namespace/name`
    pub object: String,
    /// the object exists and its last good version is in force
    pub in_force: bool,
    /// the resourceVersion of the version in force
    pub resource_version: Option<String>,
    /// the last version read was refused (namespace/name, field, reason): the last good one stays
    pub error: Option<String>,
    /// the object cannot be watched now (the last good policy stays)
    pub watch_error: Option<String>,
}

impl Status {
    /// `/debug/warnings` entries (kind `traffic-policy`).
    pub fn warnings(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for e in [&self.error, &self.watch_error].into_iter().flatten() {
            out.push(serde_json::json!({
                "kind": "traffic-policy",
                "subject": self.object,
                "message": format!("{e}; the last good traffic policy keeps serving"),
            }));
        }
        out
    }
}

/// The running watch; stops when dropped.
pub struct TrafficPolicyWatch {
    task: JoinHandle<()>,
    status: watch::Receiver<Status>,
    listed: watch::Receiver<bool>,
}

impl Drop for TrafficPolicyWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TrafficPolicyWatch {
    /// Watches `reference` through `client`; `clusters` (and `dynamic_clusters`, when remote secrets
    /// add clusters) validate the cluster ids a policy names, as for the file's `traffic:`.
    pub fn spawn(
        client: ClientSpec,
        allow_exec_auth: bool,
        reference: TrafficPolicyRef,
        clusters: Vec<ClusterId>,
        dynamic_clusters: bool,
        owner: TrafficOwner,
    ) -> TrafficPolicyWatch {
        let object = format!("{}/{}/{}", reference.cluster, reference.namespace, reference.name);
        let (status_tx, status) = watch::channel(Status { object, ..Default::default() });
        let (listed_tx, listed) = watch::channel(false);
        let w = Watcher { reference, clusters, dynamic_clusters, owner, status: status_tx, listed: listed_tx };
        TrafficPolicyWatch { task: tokio::spawn(w.run(client, allow_exec_auth)), status, listed }
    }

    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Becomes true once the object was first read (found or not).
    pub fn listed(&self) -> watch::Receiver<bool> {
        self.listed.clone()
    }
}

struct Watcher {
    reference: TrafficPolicyRef,
    clusters: Vec<ClusterId>,
    dynamic_clusters: bool,
    owner: TrafficOwner,
    status: watch::Sender<Status>,
    listed: watch::Sender<bool>,
}

impl Watcher {
    async fn run(self, spec: ClientSpec, allow_exec_auth: bool) {
        let mut backoff = Backoff::new(WATCH_BACKOFF);
        let client = loop {
            match build_client(&spec, allow_exec_auth).await {
                Ok(c) => break c,
                Err(e) => {
                    self.watch_error(format!("cluster {}: {e}", self.reference.cluster));
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        };
        let api: Api<DynamicObject> = Api::namespaced_with(client, &self.reference.namespace, &api_resource());
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.reference.name));
        let mut stream = watcher(api, config).boxed();
        let mut listing: Option<DynamicObject> = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(watcher::Event::Init) => listing = None,
                Ok(watcher::Event::InitApply(obj)) => {
                    if self.is_ours(&obj) {
                        listing = Some(obj);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    backoff.reset();
                    self.status.send_modify(|s| s.watch_error = None);
                    self.seen(listing.take());
                    self.listed.send_replace(true);
                }
                Ok(watcher::Event::Apply(obj)) => {
                    if self.is_ours(&obj) {
                        self.seen(Some(obj));
                    }
                }
                Ok(watcher::Event::Delete(obj)) => {
                    if self.is_ours(&obj) {
                        self.seen(None);
                    }
                }
                Err(e) => {
                    // the last good policy stays in force
                    self.watch_error(format!("watching {}: {e}", self.status.borrow().object));
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    fn is_ours(&self, obj: &DynamicObject) -> bool {
        obj.metadata.name.as_deref() == Some(self.reference.name.as_str())
    }

    fn watch_error(&self, message: String) {
        let repeated = self.status.borrow().watch_error.as_ref() == Some(&message);
        if !repeated {
            warn!("traffic policy: {message}; the last good traffic policy keeps serving");
        }
        self.status.send_modify(|s| s.watch_error = Some(message));
    }

    /// The object's new version (None: it does not exist).
    fn seen(&self, obj: Option<DynamicObject>) {
        let r = &self.reference;
        let Some(obj) = obj else {
            if self.status.borrow().in_force {
                info!(namespace = %r.namespace, name = %r.name, "TrafficPolicy deleted: the mesh config's traffic: is in force");
            }
            self.owner.set_custom(None);
            self.status.send_modify(|s| {
                s.in_force = false;
                s.resource_version = None;
                s.error = None;
            });
            return;
        };
        let rv = obj.metadata.resource_version.clone();
        match parse_spec(obj.data.get("spec"), &self.clusters, self.dynamic_clusters, SystemTime::now()) {
            Ok(policy) => {
                info!(
                    namespace = %r.namespace,
                    name = %r.name,
                    resource_version = ?rv,
                    policies = policy.policies.len(),
                    drains = policy.drains.len(),
                    "TrafficPolicy applied"
                );
                self.owner.set_custom(Some(policy));
                self.status.send_modify(|s| {
                    s.in_force = true;
                    s.resource_version = rv;
                    s.error = None;
                });
            }
            Err(e) => {
                let message = format!(
                    "TrafficPolicy {}/{} (resourceVersion {}): {e}",
                    r.namespace,
                    r.name,
                    rv.as_deref().unwrap_or("?")
                );
                warn!("{message}; the last good traffic policy keeps serving");
                self.status.send_modify(|s| s.error = Some(message));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_errors_name_the_field_under_spec() {
        let ids = [ClusterId::new("a"), ClusterId::new("b")];
        let now = SystemTime::now();
        let spec = serde_json::json!({"policies": [{"split": {"r1": {"a": 60, "b": 30}}}]});
        let e = parse_spec(Some(&spec), &ids, false, now).unwrap_err();
        assert_eq!(e.field, "spec.policies[0].split.r1");
        assert!(e.reason.contains("90"), "{e}");
        let spec = serde_json::json!({"drains": [{"cluster": "c", "capacity": 0, "expires": "2h"}]});
        assert!(parse_spec(Some(&spec), &ids, false, now).unwrap_err().field.starts_with("spec.drains[0]"));
        // no spec: an empty policy
        assert_eq!(parse_spec(None, &ids, false, now).unwrap(), TrafficPolicy::default());
        let ok = serde_json::json!({"policies": [{"split": {"r1": {"a": 70, "b": 30}}}]});
        assert_eq!(parse_spec(Some(&ok), &ids, false, now).unwrap().policies.len(), 1);
    }
}
