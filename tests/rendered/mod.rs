//! The deployment overlays of `manifests/overlays/` as `kubectl kustomize` renders them, shared by the
//! tests that check them (`tests/manifests_validate.rs`, `tests/packaging.rs`).
//!
//! kubectl is `$MESHFED_KUBECTL`, else `kubectl` on the PATH (Debian's `kubernetes-client`, which
//! `scripts/test-all.sh` installs; its kustomize is v2.0.3-era, and the overlays are written for it and
//! for every later one). A missing kubectl fails the test, it never skips. Python tools come from
//! `<crate>/.venv/bin` (tests/python/requirements.txt) unless their variable names another binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_yaml::Value;

use crate::support::ChildGuard;

/// The overlays and what each is for: (directory name = Istio cluster id, network, zones).
pub const OVERLAYS: &[(&str, &str, &[&str])] = &[
    ("aws-use1", "aws-net", &["us-east-1a", "us-east-1b", "us-east-1c"]),
    ("azure-weu", "azure-net", &["westeurope-1", "westeurope-2", "westeurope-3"]),
];

/// API groups of the custom resources the manifests ship (the Prometheus Operator's). The Kubernetes
/// schemas do not know them: they are checked structurally instead.
pub const CRD_GROUPS: &[&str] = &["monitoring.coreos.com", "meshfed.io"];

/// How long a tool may run (checkov starts in a few seconds; a cold first run on a busy machine is
/// slower).
const TOOL_TIMEOUT: Duration = Duration::from_secs(180);

/// One overlay, rendered.
pub struct Rendered {
    /// the overlay's directory name, which is also the Istio cluster id it deploys
    pub id: &'static str,
    pub network: &'static str,
    pub zones: &'static [&'static str],
    /// the YAML `kubectl kustomize` printed
    pub yaml: String,
    /// its objects, in order
    pub objects: Vec<Value>,
}

impl Rendered {
    /// The object of `kind` named `name`; fails the test if there is none.
    pub fn find(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .find(|o| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("overlay {}: no {kind} {name}", self.id))
    }

    /// Every object of `kind`.
    pub fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"].as_str() == Some(kind)).collect()
    }

    /// The Deployment `meshfed`.
    pub fn deployment(&self) -> &Value {
        self.find("Deployment", "meshfed")
    }

    /// The container `meshfed` of the Deployment.
    pub fn container(&self) -> &Value {
        self.deployment()["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .and_then(|cs| cs.iter().find(|c| c["name"].as_str() == Some("meshfed")))
            .unwrap_or_else(|| panic!("overlay {}: no container meshfed", self.id))
    }

    /// The meshfed container's arguments.
    pub fn args(&self) -> Vec<&str> {
        self.container()["args"].as_sequence().expect("args").iter().filter_map(Value::as_str).collect()
    }

    /// The pod volume mounted at `path` in the meshfed container.
    pub fn volume_at(&self, path: &str) -> &Value {
        let mount = self.container()["volumeMounts"]
            .as_sequence()
            .and_then(|ms| ms.iter().find(|m| m["mountPath"].as_str() == Some(path)))
            .unwrap_or_else(|| panic!("overlay {}: nothing mounted at {path}", self.id));
        let name = mount["name"].as_str().expect("mount name");
        self.deployment()["spec"]["template"]["spec"]["volumes"]
            .as_sequence()
            .and_then(|vs| vs.iter().find(|v| v["name"].as_str() == Some(name)))
            .unwrap_or_else(|| panic!("overlay {}: no volume {name}", self.id))
    }

    /// Whether the object is a custom resource (its kind comes from a CRD, see [`CRD_GROUPS`]).
    pub fn is_custom(object: &Value) -> bool {
        let api_version = object["apiVersion"].as_str().unwrap_or("");
        CRD_GROUPS.iter().any(|g| api_version.starts_with(&format!("{g}/")))
    }
}

pub fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A tool: `$var` if set, else `default`; fails the test (with how to install it) if it is missing.
pub fn tool(var: &str, default: PathBuf, install: &str) -> PathBuf {
    let (path, origin) = match std::env::var_os(var) {
        Some(p) => (PathBuf::from(p), format!("${var}")),
        None => (default, "the default location".to_string()),
    };
    let found = if path.components().count() == 1 {
        // a bare name: look it up on the PATH
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).map(|d| d.join(&path)).find(|c| c.is_file()))
            .and_then(|c| c)
    } else {
        path.is_file().then(|| path.clone())
    };
    found.unwrap_or_else(|| panic!("{} not found ({origin}): {install}, or set {var}", path.display()))
}

/// A tool of `<crate>/.venv/bin` (installed from tests/python/requirements.txt).
pub fn venv_tool(var: &str, name: &str) -> PathBuf {
    tool(
        var,
        crate_dir().join(".venv/bin").join(name),
        "run the setup in README.md (scripts/test-all.sh installs tests/python/requirements.txt into .venv)",
    )
}

/// kubectl (`$MESHFED_KUBECTL`, else on the PATH).
pub fn kubectl() -> PathBuf {
    tool(
        "MESHFED_KUBECTL",
        PathBuf::from("kubectl"),
        "install Debian's kubernetes-client (apt-get install kubernetes-client; scripts/test-all.sh does)",
    )
}

/// Runs a tool to completion (bounded); returns (success, stdout, stderr). The guard prints the logs
/// if the test fails meanwhile.
pub fn run(name: &str, cmd: &mut Command) -> (bool, String, String) {
    let mut guard = ChildGuard::spawn(name, cmd).unwrap_or_else(|e| panic!("starting {name}: {e:#}"));
    let status = guard.wait_exit(TOOL_TIMEOUT).unwrap_or_else(|e| panic!("{e:#}"));
    (status.success(), guard.stdout(), guard.stderr())
}

/// Every object of a multi-document YAML text (empty documents left out).
pub fn parse_objects(yaml: &str, what: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v = <Value as serde::Deserialize>::deserialize(doc).unwrap_or_else(|e| panic!("{what}: {e}"));
        if !v.is_null() {
            out.push(v);
        }
    }
    out
}

/// `kubectl kustomize manifests/overlays/<id>`.
pub fn render(id: &str) -> String {
    let dir = crate_dir().join("manifests/overlays").join(id);
    let (ok, stdout, stderr) = run("kubectl-kustomize", Command::new(kubectl()).arg("kustomize").arg(&dir));
    assert!(ok, "kubectl kustomize {} failed:\n{stderr}", dir.display());
    stdout
}

/// Every overlay, rendered once per test binary.
pub fn overlays() -> &'static [Rendered] {
    static RENDERED: OnceLock<Vec<Rendered>> = OnceLock::new();
    RENDERED.get_or_init(|| {
        OVERLAYS
            .iter()
            .map(|&(id, network, zones)| {
                let yaml = render(id);
                let objects = parse_objects(&yaml, &format!("kubectl kustomize of overlay {id}"));
                Rendered { id, network, zones, yaml, objects }
            })
            .collect()
    })
}

/// Writes each overlay's rendering to `<dir>/<id>.yaml`; returns the files.
pub fn write_renderings(dir: &Path) -> Vec<PathBuf> {
    overlays()
        .iter()
        .map(|o| {
            let path = dir.join(format!("{}.yaml", o.id));
            std::fs::write(&path, &o.yaml).expect("writing a rendering");
            path
        })
        .collect()
}
