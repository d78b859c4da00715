//! The deployment manifests in `manifests/`: valid against the Kubernetes 1.33 schemas (offline, with the
//! PyPI package `kubernetes-validate`, which ships them; installed into `.venv` by the README's setup),
//! meshfed parses its own ConfigMap's mesh config, and the RBAC rules grant list/watch on exactly the
//! kinds the Kubernetes source reads.
//!
//! `kubernetes-validate` is `$MESHFED_KUBERNETES_VALIDATE`, else `<crate>/.venv/bin/kubernetes-validate`;
//! a missing one fails the test (it never skips).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use meshfed::mesh_config::{ClusterSource, MeshConfig};
use meshfed::source::kube::WatchedKind;
use serde_yaml::Value;

const KUBERNETES_VERSION: &str = "1.33.0";

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests")
}

fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(manifests_dir())
        .expect("manifests/ exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Every object of every manifest file.
fn objects() -> Vec<Value> {
    let mut out = Vec::new();
    for f in manifest_files() {
        let text = std::fs::read_to_string(&f).expect("readable manifest");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = <Value as serde::Deserialize>::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if !v.is_null() {
                out.push(v);
            }
        }
    }
    out
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} in manifests/"))
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let tool = match std::env::var_os("MESHFED_KUBERNETES_VALIDATE") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/kubernetes-validate"),
    };
    assert!(
        tool.is_file(),
        "{} not found: run the setup in README.md (it installs tests/python/requirements.txt into .venv)",
        tool.display()
    );
    let files = manifest_files();
    assert!(files.len() >= 7, "{files:?}");
    let out = Command::new(&tool)
        .args(["--kubernetes-version", KUBERNETES_VERSION, "--strict"])
        .args(&files)
        .output()
        .expect("kubernetes-validate runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    // every object was checked (nothing skipped as unknown)
    let passed = text.lines().filter(|l| l.contains(" passed for resource ")).count();
    assert_eq!(passed, objects().len(), "{text}");
}

#[test]
fn meshfed_parses_its_configmap() {
    let objects = objects();
    let cm = find(&objects, "ConfigMap", "meshfed-mesh");
    let text = cm["data"]["mesh.yaml"].as_str().expect("data.mesh.yaml");
    let mesh = MeshConfig::parse(text, Path::new("/etc/meshfed")).expect("the ConfigMap's mesh config is valid");
    assert_eq!(mesh.clusters.len(), 1);
    assert_eq!(mesh.clusters[0].source, ClusterSource::InCluster);
    let rs = mesh.remote_secrets.as_ref().expect("remote secrets");
    assert_eq!((rs.config_cluster.as_str(), rs.namespace.as_str()), ("aws-use1", "istio-system"));
    assert_eq!(mesh.ready_timeout, std::time::Duration::from_secs(30));

    // the Deployment mounts it where its args say, and exposes the debug port it probes
    let deploy = find(&objects, "Deployment", "meshfed");
    assert_eq!(deploy["spec"]["replicas"].as_u64(), Some(2));
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = c["args"].as_sequence().expect("args").iter().filter_map(Value::as_str).collect();
    assert!(args.contains(&"--mesh-config=/etc/meshfed/mesh.yaml"), "{args:?}");
    assert!(args.contains(&"--debug-address=0.0.0.0:15014") && args.contains(&"--debug-expose"), "{args:?}");
    assert_eq!(c["volumeMounts"][0]["mountPath"].as_str(), Some("/etc/meshfed"));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/ready"));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    assert_eq!(deploy["spec"]["template"]["spec"]["serviceAccountName"].as_str(), Some("meshfed"));
}

/// (apiGroup, resource, verbs) of every rule.
fn rules(role: &Value) -> BTreeSet<(String, String, Vec<String>)> {
    let mut out = BTreeSet::new();
    for r in role["rules"].as_sequence().expect("rules") {
        let verbs: Vec<String> =
            r["verbs"].as_sequence().expect("verbs").iter().filter_map(|v| v.as_str().map(str::to_string)).collect();
        for g in r["apiGroups"].as_sequence().expect("apiGroups") {
            for res in r["resources"].as_sequence().expect("resources") {
                out.insert((g.as_str().unwrap_or("").into(), res.as_str().unwrap_or("").into(), verbs.clone()));
            }
        }
    }
    out
}

#[test]
fn rbac_grants_list_watch_on_exactly_what_is_read() {
    let read: BTreeSet<(String, String, Vec<String>)> = WatchedKind::ALL
        .iter()
        .map(|k| {
            let ar = k.api_resource();
            (ar.group, ar.plural, vec!["list".to_string(), "watch".to_string()])
        })
        .collect();
    let objects = objects();
    assert_eq!(rules(find(&objects, "ClusterRole", "meshfed-config")), read);
    assert_eq!(rules(find(&objects, "ClusterRole", "meshfed-reader")), read);
    let secrets = find(&objects, "Role", "meshfed-remote-secrets");
    assert_eq!(secrets["metadata"]["namespace"].as_str(), Some("istio-system"));
    assert_eq!(rules(secrets), [("".into(), "secrets".into(), vec!["list".into(), "watch".into()])].into());
    for o in &objects {
        let verbs =
            o["rules"].as_sequence().into_iter().flatten().flat_map(|r| r["verbs"].as_sequence().into_iter().flatten());
        for v in verbs {
            assert!(matches!(v.as_str(), Some("list" | "watch")), "only list/watch: {o:?}");
        }
    }
}
