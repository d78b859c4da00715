//! What `meshfed istio` selects from: the mesh config's clusters read once, as `serve` reads them —
//! manifest directories with [`crate::source::files::load_cluster_dir`], Kubernetes clusters
//! (`kubeconfig`, `inCluster`) with one paged list per kind that `serve` watches, converted by the same
//! converters — into a federated [`Registry`]. Beside it, what the registry does not keep: each Service
//! object's labels (for `--selector`) and the subsets of DestinationRules (their clusters get the MERGE
//! too, see [`super::Subsets`]).
//!
//! Unlike `serve`, a source error is fatal: a generator that silently skipped a file or an unreachable
//! cluster would print wiring that lacks services. Clusters discovered from Istio remote secrets are not
//! read (only the clusters the mesh config lists); a mesh config with `remoteSecrets` gets a warning.

use std::collections::BTreeMap;
use std::path::Path;

use kube::api::{Api, DynamicObject, ListParams};
use serde::Deserialize;

use super::error::Error;
use crate::mesh_config::{ClusterSource, MeshConfig};
use crate::model::{ClusterId, ServiceKey};
use crate::policy::DestinationRule;
use crate::registry::Registry;
use crate::source::SourceEvent;
use crate::source::kube::{ClientSpec, WatchedKind, build_client};
use crate::topology::TopologyObject;

/// Objects per page of a Kubernetes list (as `serve` lists).
const PAGE_SIZE: u32 = 500;

/// A DestinationRule's subsets (`spec.subsets[].name`), for the hosts it applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubsetRule {
    /// the rule, for host matching (its traffic policy is not read here)
    pub rule: DestinationRule,
    pub subsets: Vec<String>,
}

/// The mesh's services as the mesh config's sources describe them now.
#[derive(Clone, Debug)]
pub struct Inventory {
    pub registry: Registry,
    /// the labels of each Service object, one set per cluster that defines it
    pub service_labels: BTreeMap<ServiceKey, Vec<BTreeMap<String, String>>>,
    /// DestinationRules that define subsets (a rule replicated in several clusters counts once)
    pub subset_rules: Vec<SubsetRule>,
    /// things the reader of the output should know (printed on stderr)
    pub warnings: Vec<String>,
}

/// The part of a raw object the inventory reads beside the registry.
#[derive(Deserialize)]
struct RawObject {
    #[serde(rename = "apiVersion", default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    metadata: RawMeta,
    #[serde(default)]
    spec: Option<serde_yaml::Value>,
    #[serde(default)]
    items: Option<Vec<serde_yaml::Value>>,
}

#[derive(Deserialize, Default)]
struct RawMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

/// What one cluster contributes beside its topology objects.
#[derive(Default)]
struct Extras {
    service_labels: Vec<(ServiceKey, BTreeMap<String, String>)>,
    subset_rules: Vec<SubsetRule>,
}

impl Extras {
    /// Reads a Service's labels or a DestinationRule's subsets from one object (recursing into `List`s).
    fn read(&mut self, value: serde_yaml::Value) {
        let Ok(raw) = serde_yaml::from_value::<RawObject>(value) else { return };
        let namespace = raw.metadata.namespace.filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
        let name = raw.metadata.name.unwrap_or_default();
        match (raw.api_version.as_deref(), raw.kind.as_deref()) {
            (Some("v1"), Some("List")) => {
                for item in raw.items.unwrap_or_default() {
                    self.read(item);
                }
            }
            (Some("v1"), Some("Service")) if !name.is_empty() => {
                self.service_labels.push((ServiceKey::new(&namespace, &name), raw.metadata.labels.unwrap_or_default()));
            }
            (Some(v), Some("DestinationRule")) if v.starts_with("networking.istio.io/") && !name.is_empty() => {
                let spec = raw.spec.unwrap_or_default();
                let host = spec.get("host").and_then(serde_yaml::Value::as_str).unwrap_or_default();
                let subsets: Vec<String> = spec
                    .get("subsets")
                    .and_then(serde_yaml::Value::as_sequence)
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.get("name").and_then(serde_yaml::Value::as_str).map(str::to_string))
                    .collect();
                if !host.is_empty() && !subsets.is_empty() {
                    let rule = DestinationRule::new(&namespace, &name, host);
                    self.subset_rules.push(SubsetRule { rule, subsets });
                }
            }
            _ => {}
        }
    }
}

impl Inventory {
    /// Reads every cluster of `mesh` once and builds the federated registry. `allow_exec_auth`: accept
    /// kubeconfigs that run commands (also `allowExecAuth` in the mesh config). Kubernetes clusters
    /// must answer within the mesh config's `readyTimeout`.
    pub async fn load(mesh: &MeshConfig, allow_exec_auth: bool) -> Result<Inventory, Error> {
        let mut registry = Registry::new(mesh);
        let mut inventory_extras = Vec::new();
        let mut warnings = Vec::new();
        if let Some(r) = &mesh.remote_secrets {
            warnings.push(format!(
                "remoteSecrets: clusters discovered from the remote secrets in {}/{} are not read by `meshfed istio` \
                 (only the clusters the mesh config lists): services that exist only there cannot be selected",
                r.config_cluster, r.namespace
            ));
        }
        for cluster in &mesh.clusters {
            let (objects, extras) = match &cluster.source {
                ClusterSource::Manifests(dir) => load_manifests(&cluster.id, dir)?,
                source => {
                    let spec = ClientSpec::from_source(source).ok_or_else(|| Error::Source {
                        cluster: cluster.id.to_string(),
                        reason: "no Kubernetes client for this source".into(),
                    })?;
                    let allow_exec = allow_exec_auth || mesh.allow_exec_auth;
                    let timeout = mesh.ready_timeout;
                    match tokio::time::timeout(timeout, list_cluster(&cluster.id, &spec, allow_exec)).await {
                        Ok(result) => result?,
                        Err(_) => {
                            return Err(Error::Source {
                                cluster: cluster.id.to_string(),
                                reason: format!(
                                    "{}: the API server did not answer the lists within readyTimeout ({timeout:?})",
                                    source.describe()
                                ),
                            });
                        }
                    }
                }
            };
            registry.apply(SourceEvent::Sync { cluster: cluster.id.clone(), objects });
            inventory_extras.push(extras);
        }
        let mut service_labels: BTreeMap<ServiceKey, Vec<BTreeMap<String, String>>> = BTreeMap::new();
        let mut subset_rules: Vec<SubsetRule> = Vec::new();
        for extras in inventory_extras {
            for (key, labels) in extras.service_labels {
                service_labels.entry(key).or_default().push(labels);
            }
            for r in extras.subset_rules {
                if !subset_rules.iter().any(|x| x.rule.namespace == r.rule.namespace && x.rule.name == r.rule.name) {
                    subset_rules.push(r);
                }
            }
        }
        Ok(Inventory { registry, service_labels, subset_rules, warnings })
    }

    /// The subsets DestinationRules define for `fqdn` (sorted, deduplicated), with the rules' names.
    pub fn subsets_of(&self, fqdn: &str) -> Vec<(String, String)> {
        let suffix = self.registry.domain_suffix();
        let mut out: Vec<(String, String)> = self
            .subset_rules
            .iter()
            .filter(|r| r.rule.host_match(fqdn, suffix).is_some())
            .flat_map(|r| r.subsets.iter().map(move |s| (s.clone(), format!("{}/{}", r.rule.namespace, r.rule.name))))
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// One manifest directory: its topology objects and extras; any file that cannot be used is an error.
fn load_manifests(cluster: &ClusterId, dir: &Path) -> Result<(Vec<TopologyObject>, Extras), Error> {
    let (objects, errors) = crate::source::files::load_cluster_dir(dir);
    if !errors.is_empty() {
        let list: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        return Err(Error::Source { cluster: cluster.to_string(), reason: list.join("; ") });
    }
    let mut extras = Extras::default();
    let (files, _) = crate::source::files::manifest_files(dir)
        .map_err(|e| Error::Source { cluster: cluster.to_string(), reason: format!("{}: {e}", dir.display()) })?;
    for file in files {
        // the files parsed above (a file that changed since then fails here the same way)
        let text = std::fs::read_to_string(&file)
            .map_err(|e| Error::Source { cluster: cluster.to_string(), reason: format!("{}: {e}", file.display()) })?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).map_err(|e| Error::Source {
                cluster: cluster.to_string(),
                reason: format!("{}: {e}", file.display()),
            })?;
            extras.read(value);
        }
    }
    Ok((objects, extras))
}

/// One Kubernetes cluster: every kind `serve` watches, listed once (paged), converted as `serve` converts.
async fn list_cluster(
    cluster: &ClusterId,
    spec: &ClientSpec,
    allow_exec: bool,
) -> Result<(Vec<TopologyObject>, Extras), Error> {
    let source_err = |reason: String| Error::Source { cluster: cluster.to_string(), reason };
    let client = build_client(spec, allow_exec).await.map_err(|e| source_err(e.to_string()))?;
    let mut objects = Vec::new();
    let mut extras = Extras::default();
    let mut invalid = Vec::new();
    for kind in WatchedKind::ALL {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.api_resource());
        let mut params = ListParams::default().limit(PAGE_SIZE);
        if kind == WatchedKind::Pod {
            params = params.fields("status.phase!=Failed");
        }
        loop {
            let page = match api.list(&params).await {
                Ok(page) => page,
                // the DestinationRule CRD need not be installed
                Err(kube::Error::Api(s)) if s.code == 404 && kind == WatchedKind::DestinationRule => break,
                Err(e) => return Err(source_err(format!("listing {}s: {e}", kind.name()))),
            };
            for obj in &page.items {
                match kind.convert(obj) {
                    Ok(Some(o)) => objects.push(o),
                    Ok(None) => {}
                    Err(reason) => {
                        let name = obj.metadata.name.as_deref().unwrap_or("<no name>");
                        let ns = obj.metadata.namespace.as_deref().map(|n| format!("{n}/")).unwrap_or_default();
                        invalid.push(format!("{} {ns}{name}: {reason}", kind.name()));
                    }
                }
                if matches!(kind, WatchedKind::Service | WatchedKind::DestinationRule) {
                    let api_resource = kind.api_resource();
                    let mut value = serde_json::to_value(obj).map_err(|e| source_err(e.to_string()))?;
                    value["apiVersion"] = api_resource.api_version.into();
                    value["kind"] = api_resource.kind.into();
                    if let Ok(v) = serde_yaml::to_value(&value) {
                        extras.read(v);
                    }
                }
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
    }
    if !invalid.is_empty() {
        return Err(source_err(invalid.join("; ")));
    }
    Ok((objects, extras))
}
