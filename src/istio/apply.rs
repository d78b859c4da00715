//! `meshfed istio --apply`: writes the printed objects to the config cluster with Kubernetes server-side
//! apply (`PATCH` `application/apply-patch+yaml`, field manager `meshfed`, conflicts forced: meshfed owns
//! what it generates). EnvoyFilters go through `networking.istio.io/v1alpha3` as dynamic objects,
//! ConfigMaps through `v1`. Nothing is deleted: objects of an earlier run that this run no longer prints
//! stay (they carry `app.kubernetes.io/managed-by: meshfed`, see the README's roll back).

use std::path::PathBuf;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use serde_json::Value;

use super::error::Error;
use crate::source::kube::{ClientSpec, build_client};

/// The field manager of meshfed's server-side applies.
pub const FIELD_MANAGER: &str = "meshfed";

/// Where `--apply` writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// a kubeconfig file (its current context, or `context`)
    Kubeconfig { path: PathBuf, context: Option<String> },
    /// the cluster meshfed runs in (its pod's service account)
    InCluster,
}

/// One object written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// `Kind namespace/name`
    pub object: String,
    /// its resourceVersion after the apply
    pub resource_version: Option<String>,
}

fn api_resource(object: &Value) -> Result<ApiResource, String> {
    match (object["apiVersion"].as_str(), object["kind"].as_str()) {
        (Some(super::envoy_filter::ENVOY_FILTER_API_VERSION), Some("EnvoyFilter")) => Ok(ApiResource {
            group: "networking.istio.io".into(),
            version: "v1alpha3".into(),
            api_version: super::envoy_filter::ENVOY_FILTER_API_VERSION.into(),
            kind: "EnvoyFilter".into(),
            plural: "envoyfilters".into(),
        }),
        (Some("v1"), Some("ConfigMap")) => Ok(ApiResource::erase::<ConfigMap>(&())),
        (v, k) => Err(format!("meshfed does not apply {} {}", v.unwrap_or("?"), k.unwrap_or("?"))),
    }
}

/// Server-side applies `objects`, in order. The kubeconfig is the operator's own (as `kubectl` uses it),
/// so users that run a command (`exec`, e.g. `aws eks get-token`) are accepted.
pub async fn apply(objects: &[Value], target: &Target) -> Result<Vec<Applied>, Error> {
    let spec = match target {
        Target::Kubeconfig { path, context } => ClientSpec::File { path: path.clone(), context: context.clone() },
        Target::InCluster => ClientSpec::InCluster,
    };
    let client = build_client(&spec, true)
        .await
        .map_err(|e| Error::Apply { object: "(client)".into(), reason: e.to_string() })?;
    let mut applied = Vec::new();
    for object in objects {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
        let what = format!("{} {namespace}/{name}", object["kind"].as_str().unwrap_or("object"));
        let err = |reason: String| Error::Apply { object: what.clone(), reason };
        let ar = api_resource(object).map_err(err)?;
        let dynamic: DynamicObject = serde_json::from_value(object.clone()).map_err(|e| err(e.to_string()))?;
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let result = api.patch(name, &params, &Patch::Apply(&dynamic)).await.map_err(|e| err(e.to_string()))?;
        applied.push(Applied { object: what, resource_version: result.metadata.resource_version });
    }
    Ok(applied)
}
