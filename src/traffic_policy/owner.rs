//! Which traffic policy is in force: the one owner of the push loop's policy when it can come from
//! two places.
//!
//! - the mesh config file's `traffic:` section ([`crate::config_watch`] hands each valid edit here);
//! - the `TrafficPolicy` custom resource named by `trafficPolicy` in the mesh config
//!   ([`crate::traffic_policy::watch`]).
//!
//! Precedence: while the custom resource exists and its last version that was read was valid, its
//! `spec` is in force and the file's `traffic:` is not (an invalid version keeps the last good one in
//! force). When the object is deleted (or never existed), the file's `traffic:` is in force again.
//! The push loop gets a policy only when the one in force changes.

use std::sync::{Arc, Mutex};

use crate::push::PushHandle;
use crate::traffic::TrafficPolicy;

/// Where the policy in force comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Origin {
    /// the mesh config file's `traffic:` section
    File,
    /// the `TrafficPolicy` custom resource
    CustomResource,
}

#[derive(Debug)]
struct State {
    file: TrafficPolicy,
    custom: Option<TrafficPolicy>,
    /// the policy last handed to the push loop
    applied: TrafficPolicy,
}

/// Decides the policy in force (cheap to clone; clones share the state).
#[derive(Clone)]
pub struct TrafficOwner {
    state: Arc<Mutex<State>>,
    push: PushHandle,
}

impl std::fmt::Debug for TrafficOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrafficOwner").field("origin", &self.origin()).finish()
    }
}

impl TrafficOwner {
    /// `file`: the file's `traffic:` section, the policy the push loop started with.
    pub fn new(push: PushHandle, file: TrafficPolicy) -> TrafficOwner {
        TrafficOwner { state: Arc::new(Mutex::new(State { applied: file.clone(), file, custom: None })), push }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new valid `traffic:` section of the file.
    pub fn set_file(&self, policy: TrafficPolicy) {
        let mut st = self.lock();
        st.file = policy;
        self.apply(&mut st);
    }

    /// The custom resource's valid policy (None: the object does not exist).
    pub fn set_custom(&self, policy: Option<TrafficPolicy>) {
        let mut st = self.lock();
        st.custom = policy;
        self.apply(&mut st);
    }

    pub fn origin(&self) -> Origin {
        if self.lock().custom.is_some() { Origin::CustomResource } else { Origin::File }
    }

    fn apply(&self, st: &mut State) {
        let now = st.custom.as_ref().unwrap_or(&st.file);
        if *now != st.applied {
            st.applied = now.clone();
            self.push.set_traffic_policy(now.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push::Command;

    fn policy(drains: usize) -> TrafficPolicy {
        let text = (0..drains)
            .map(|i| format!("  - {{cluster: c{i}, capacity: 0, expires: \"2999-01-01T00:00:00Z\"}}\n"))
            .collect::<String>();
        let text = if drains == 0 { "{}".to_string() } else { format!("drains:\n{text}") };
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let ids: Vec<_> = (0..3).map(|i| crate::model::ClusterId::new(format!("c{i}"))).collect();
        TrafficPolicy::parse_with(
            &v,
            &ids,
            false,
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(32503680000 - 3600),
        )
        .unwrap()
    }

    fn sent(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Command>) -> Vec<usize> {
        let mut out = Vec::new();
        while let Ok(c) = rx.try_recv() {
            if let Command::TrafficPolicy(p) = c {
                out.push(p.drains.len());
            }
        }
        out
    }

    #[test]
    fn the_custom_resource_replaces_the_file_while_it_exists() {
        let mesh = crate::mesh_config::MeshConfig::parse("clusters: []\n", std::path::Path::new(".")).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let push = crate::push::Pusher::new(&mesh).0.handle_for(tx);
        let owner = TrafficOwner::new(push, policy(1));
        assert_eq!(owner.origin(), Origin::File);
        // the object appears: its policy is in force
        owner.set_custom(Some(policy(2)));
        assert_eq!((sent(&mut rx), owner.origin()), (vec![2], Origin::CustomResource));
        // a file edit while the object exists: not in force
        owner.set_file(policy(0));
        assert_eq!(sent(&mut rx), Vec::<usize>::new());
        // the same object again: nothing sent
        owner.set_custom(Some(policy(2)));
        assert!(sent(&mut rx).is_empty());
        // the object deleted: the file's (latest) section is back
        owner.set_custom(None);
        assert_eq!((sent(&mut rx), owner.origin()), (vec![0], Origin::File));
    }
}
