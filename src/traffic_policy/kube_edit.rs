//! `meshfed traffic drain | undrain --kubeconfig FILE` (Kubernetes mode): edits `spec.drains` of the
//! `TrafficPolicy` custom resource every replica watches ([`crate::traffic_policy::watch`]).
//!
//! The object is read (absent: an empty `spec`), its drains edited with the functions of file mode
//! ([`super::edit`]), the result validated with the parser meshfed uses (a bad edit is refused and the
//! object left as it was), and written back with server-side apply carrying the `resourceVersion` that
//! was read: a concurrent change makes the API answer 409 Conflict, and the edit is made once more on
//! the new version.
//!
//! The CLI does not know the mesh's clusters: a cluster id is not checked here (meshfed reports an
//! object naming a cluster it does not know, and keeps the last good policy).

use std::path::PathBuf;
use std::time::SystemTime;

use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use serde_json::json;

use super::edit;
use crate::source::kube::{ClientSpec, build_client};
use crate::traffic_policy::watch::{GROUP, KIND, VERSION, api_resource, parse_spec};

/// The field manager of the CLI's server-side applies.
pub const FIELD_MANAGER: &str = "meshfed-traffic";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Client(#[from] crate::source::kube::Error),
    #[error("TrafficPolicy {object}: {source}")]
    Api { object: String, source: kube::Error },
    #[error("TrafficPolicy {object}: the edit is refused (the object is unchanged): {source}")]
    Invalid { object: String, source: crate::traffic::policy::Error },
    #[error("TrafficPolicy {object}: {source}")]
    Edit { object: String, source: edit::Error },
    #[error("TrafficPolicy {object}: {reason}")]
    Object { object: String, reason: String },
}

/// The object to edit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRef {
    pub kubeconfig: PathBuf,
    pub context: Option<String>,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What an edit wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// the object did not exist before
    pub created: bool,
    pub resource_version: Option<String>,
}

/// Edits the object's `spec.drains` with `f` (read, edit, validate, apply; once more on a conflict).
pub async fn edit_object(
    target: &ObjectRef,
    f: impl Fn(&mut Vec<serde_yaml::Value>) -> Result<(), edit::Error>,
) -> Result<Written, Error> {
    let spec = ClientSpec::File { path: target.kubeconfig.clone(), context: target.context.clone() };
    // the operator's own kubeconfig, as kubectl uses it: exec users are accepted
    let client = build_client(&spec, true).await?;
    edit_with(client, &target.namespace, &target.name, FIELD_MANAGER, f).await
}

/// [`edit_object`] through `client`, as `field_manager`.
pub async fn edit_with(
    client: kube::Client,
    namespace: &str,
    name: &str,
    field_manager: &str,
    f: impl Fn(&mut Vec<serde_yaml::Value>) -> Result<(), edit::Error>,
) -> Result<Written, Error> {
    let object = format!("{namespace}/{name}");
    let api: Api<DynamicObject> = Api::namespaced_with(client, namespace, &api_resource());
    let api_err = |source| Error::Api { object: object.clone(), source };
    let mut attempt = 0;
    loop {
        attempt += 1;
        // a list by name: an absent object is an empty list, not an error
        let list = api.list(&ListParams::default().fields(&format!("metadata.name={name}"))).await.map_err(api_err)?;
        let current = list.items.into_iter().find(|o| o.metadata.name.as_deref() == Some(name));
        let resource_version = current.as_ref().and_then(|o| o.metadata.resource_version.clone());
        let spec_json = current.as_ref().and_then(|o| o.data.get("spec")).cloned().unwrap_or(json!({}));
        let mut spec: serde_yaml::Value = serde_yaml::to_value(&spec_json)
            .map_err(|e| Error::Object { object: object.clone(), reason: format!("spec: {e}") })?;
        edit::edit_drains(&mut spec, "spec", &f).map_err(|source| Error::Edit { object: object.clone(), source })?;
        let new_spec = serde_json::to_value(&spec)
            .map_err(|e| Error::Object { object: object.clone(), reason: format!("spec: {e}") })?;
        parse_spec(Some(&new_spec), &[], true, SystemTime::now())
            .map_err(|source| Error::Invalid { object: object.clone(), source })?;
        let mut metadata = json!({"name": name, "namespace": namespace});
        if let Some(rv) = &resource_version {
            metadata["resourceVersion"] = json!(rv);
        }
        let body = json!({
            "apiVersion": format!("{GROUP}/{VERSION}"),
            "kind": KIND,
            "metadata": metadata,
            "spec": new_spec,
        });
        let params = PatchParams::apply(field_manager).force();
        match api.patch(name, &params, &Patch::Apply(&body)).await {
            Ok(written) => {
                return Ok(Written { created: current.is_none(), resource_version: written.metadata.resource_version });
            }
            Err(kube::Error::Api(status)) if status.is_conflict() && attempt == 1 => {
                tracing::info!(object = %object, "the TrafficPolicy changed meanwhile; editing its new version");
            }
            Err(e) => return Err(api_err(e)),
        }
    }
}

/// [`edit_object`] from synchronous code (the CLI): on a runtime of its own.
pub fn edit_object_blocking(
    target: &ObjectRef,
    f: impl Fn(&mut Vec<serde_yaml::Value>) -> Result<(), edit::Error>,
) -> Result<Written, Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Object { object: target.to_string(), reason: format!("starting a runtime: {e}") })?;
    rt.block_on(edit_object(target, f))
}
