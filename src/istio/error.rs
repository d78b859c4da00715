//! What can go wrong in `meshfed istio` (one enum for the command's parts).

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line (or [`super::Options`]) cannot work.
    #[error("{0}")]
    Options(String),
    #[error(transparent)]
    MeshConfig(#[from] crate::mesh_config::Error),
    /// A cluster's objects could not be read completely.
    #[error("cluster {cluster}: {reason}")]
    Source { cluster: String, reason: String },
    /// `--host` names no service of the mesh.
    #[error("--host {0:?}: no such service in the mesh (give an FQDN, NAME.NAMESPACE or NAMESPACE/NAME)")]
    UnknownHost(String),
    /// The selection matches no service.
    #[error("no service matches {0}")]
    NothingSelected(String),
    /// A value meshfed rendered does not parse as its Envoy proto (a bug in meshfed, caught before printing).
    #[error("{what}: not a valid {message}: {reason}")]
    PatchValue { what: String, message: String, reason: String },
    #[error("merge: {0}")]
    Merge(String),
    #[error("--preview: {0}")]
    Preview(String),
    #[error("cannot serialize: {0}")]
    Serialize(String),
    #[error("--apply: {object}: {reason}")]
    Apply { object: String, reason: String },
}
