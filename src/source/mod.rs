//! Sources of cluster state. Each source turns what it watches into [`SourceEvent`]s for the
//! federated registry; the registry never knows where an object came from.

use crate::model::ClusterId;
use crate::topology::{ObjectKey, TopologyObject};

pub mod files;

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
}

impl SourceEvent {
    pub fn cluster(&self) -> &ClusterId {
        match self {
            SourceEvent::Sync { cluster, .. }
            | SourceEvent::Upsert { cluster, .. }
            | SourceEvent::Delete { cluster, .. } => cluster,
        }
    }
}
