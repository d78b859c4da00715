//! The built-in two-clouds demo as tests use it:
//!
//! - copies on disk ([`copy_demo`], [`copy_demo_single_network`]) that tests edit (see [`crate::slices`])
//!   and serve, each test on its own loopback octet;
//! - the demo in memory as the sources would send it: [`files_events`] (a copy's manifest directories
//!   read by the file source), [`demo_events`] (the built-in files parsed, no disk);
//! - [`Demo`]: a copy's objects edited in memory (an endpoint dropped, a service removed) and published to
//!   an in-process server ([`TestServer`]) as source events.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshfed::mesh_config::{ClusterSource, MeshConfig};
use meshfed::model::ClusterId;
use meshfed::source::SourceEvent;
use meshfed::topology::{self, SliceInfo, TopologyObject};

use crate::server::TestServer;

/// Copies the built-in demo into `dir`, replacing every loopback address `127.0.X.Y` by
/// `127.<octet>.X.Y`, so that tests running at the same time use disjoint addresses. Returns the
/// path of the copied mesh config.
pub fn copy_demo(dir: &Path, octet: u8) -> PathBuf {
    write_demo(dir, |text| remap_loopback(text, octet))
}

/// Like [`copy_demo`], but with both clouds on one network (`aws-net`): every endpoint is reachable
/// directly, without east-west gateways or mesh mTLS (tests that run plain backends use this).
pub fn copy_demo_single_network(dir: &Path, octet: u8) -> PathBuf {
    write_demo(dir, |text| remap_loopback(text, octet).replace("azure-net", "aws-net"))
}

fn write_demo(dir: &Path, adjust: impl Fn(&str) -> String) -> PathBuf {
    for (path, text) in meshfed::demo::DEMO_FILES {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().expect("has parent")).expect("create demo dir");
        std::fs::write(&p, adjust(text)).expect("write demo file");
    }
    dir.join("mesh.yaml")
}

/// Replaces `127.0.` by `127.<octet>.` in addresses.
pub fn remap_loopback(text: &str, octet: u8) -> String {
    text.replace("127.0.", &format!("127.{octet}."))
}

/// The initial state of every manifests directory of `mesh`, as the file source would send it.
///
/// # Panics
/// When a cluster is not a manifests directory or a file does not parse.
pub fn files_events(mesh: &MeshConfig) -> Vec<SourceEvent> {
    let mut initial = Vec::new();
    for c in &mesh.clusters {
        let ClusterSource::Manifests(dir) = &c.source else {
            panic!("cluster {} is not a manifests directory", c.id);
        };
        let (objects, errors) = meshfed::source::files::load_cluster_dir(dir);
        assert!(errors.is_empty(), "demo files must parse: {errors:?}");
        initial.push(SourceEvent::Sync { cluster: c.id.clone(), objects });
    }
    initial
}

/// The demo topology in memory, without touching the disk: its mesh config and one `Sync` event per
/// cluster.
pub fn demo_events() -> (MeshConfig, Vec<SourceEvent>) {
    let base = Path::new("/meshfed-demo");
    let mesh_text = meshfed::demo::DEMO_FILES
        .iter()
        .find(|(p, _)| *p == "mesh.yaml")
        .map(|(_, t)| *t)
        .expect("the demo has a mesh.yaml");
    let mesh = MeshConfig::parse(mesh_text, base).expect("the demo's mesh config parses");
    let mut events = Vec::new();
    for c in &mesh.clusters {
        let ClusterSource::Manifests(dir) = &c.source else { continue };
        let mut objects = BTreeMap::new();
        for (path, text) in meshfed::demo::DEMO_FILES {
            let p = base.join(path);
            if p.starts_with(dir) && (path.ends_with(".yaml") || path.ends_with(".yml")) {
                let objs = topology::parse_manifests(text, &p).expect("the demo's manifests parse");
                objects.extend(objs.into_iter().map(|o| (o.key(), o)));
            }
        }
        events.push(SourceEvent::Sync { cluster: c.id.clone(), objects: objects.into_values().collect() });
    }
    (mesh, events)
}

/// A copy of the two-clouds demo (on 127.0.0.0/16) whose objects a test edits in memory and sends to an
/// in-process server as source events.
///
/// # Panics
/// Its methods panic (fail the test) on what a test gets wrong: an unknown cluster or service, nothing
/// left to drop, a push loop that is gone.
pub struct Demo {
    _dir: tempfile::TempDir,
    pub mesh: MeshConfig,
    /// cluster id -> its objects, as the file source read them
    pub objects: BTreeMap<String, Vec<TopologyObject>>,
    /// bound of starting a server and of waiting for a push (default [`crate::ads::TIMEOUT`])
    pub timeout: Duration,
}

impl Demo {
    /// Copies the demo and reads it as the file source does.
    pub fn load() -> Demo {
        let dir = tempfile::tempdir().expect("tempdir");
        let mesh_path = copy_demo(dir.path(), 0);
        let mesh = MeshConfig::load(&mesh_path).expect("demo mesh config");
        let mut objects = BTreeMap::new();
        for event in files_events(&mesh) {
            if let SourceEvent::Sync { cluster, objects: objs } = event {
                objects.insert(cluster.to_string(), objs);
            }
        }
        Demo { _dir: dir, mesh, objects, timeout: crate::ads::TIMEOUT }
    }

    /// With `timeout` as the bound of starting a server and of waiting for a push.
    pub fn with_timeout(mut self, timeout: Duration) -> Demo {
        self.timeout = timeout;
        self
    }

    /// The current objects of `cluster` as a `Sync` event.
    pub fn sync_event(&self, cluster: &str) -> SourceEvent {
        SourceEvent::Sync { cluster: ClusterId::new(cluster), objects: self.objects[cluster].clone() }
    }

    /// An in-process server started on the current objects.
    pub async fn start(&self) -> TestServer {
        let initial = self.objects.keys().map(|c| self.sync_event(c)).collect();
        tokio::time::timeout(self.timeout, TestServer::start(&self.mesh, initial))
            .await
            .unwrap_or_else(|_| panic!("the test server did not start within {:?}", self.timeout))
    }

    /// The EndpointSlice of `service` in `cluster`.
    pub fn slice_mut(&mut self, cluster: &str, service: &str) -> &mut SliceInfo {
        self.objects
            .get_mut(cluster)
            .expect("known cluster")
            .iter_mut()
            .find_map(|o| match o {
                TopologyObject::EndpointSlice(s) if &*s.service == service => Some(s),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{cluster} has an EndpointSlice of {service}"))
    }

    /// Drops one endpoint of `service`'s slice in `cluster` (an endpoints-only change).
    pub fn drop_endpoint(&mut self, cluster: &str, service: &str) {
        let slice = self.slice_mut(cluster, service);
        assert!(slice.endpoints.len() > 1, "{service} in {cluster} has endpoints left to drop");
        slice.endpoints.pop();
    }

    /// Removes `service` (its Service and EndpointSlices) from `cluster`.
    pub fn remove_service(&mut self, cluster: &str, service: &str) {
        let objs = self.objects.get_mut(cluster).expect("known cluster");
        let before = objs.len();
        objs.retain(|o| match o {
            TopologyObject::Service(s) => &*s.name != service,
            TopologyObject::EndpointSlice(s) => &*s.service != service,
            _ => true,
        });
        assert!(objs.len() < before, "{service} was in {cluster}");
    }

    /// Sends the current objects of `clusters` to `server` and waits until the push loop published a
    /// snapshot built from them (a push after the events, not a snapshot published because a proxy
    /// attached).
    pub async fn publish(&self, server: &TestServer, clusters: &[&str]) {
        let before = server.push.snapshot().generation;
        for c in clusters {
            server.events.send(self.sync_event(c)).expect("push loop alive");
        }
        let mut rx = server.push.subscribe();
        let pushed = rx.wait_for(|s| s.generation > before && s.changes.trigger != "proxy attached");
        tokio::time::timeout(self.timeout, pushed)
            .await
            .unwrap_or_else(|_| panic!("the change was not pushed within {:?}", self.timeout))
            .expect("push loop alive");
    }
}

/// Adjusts a demo copied into `dir` for tests that run plain backends for AWS and real sidecars for
/// Azure: the AWS pods lose `security.istio.io/tlsMode` (their backends are plain HTTP servers, so a
/// client talks plaintext to them), and only the first Azure endpoint of each zone and service is kept
/// (`.22` and `.32` are removed: fewer Envoys to run). The slices file is rewritten atomically.
pub fn plain_aws_one_azure_endpoint_per_zone(dir: &Path) -> anyhow::Result<()> {
    let pods = dir.join("aws-use1/pods.yaml");
    let text = std::fs::read_to_string(&pods)?;
    let plain = text.replace("    security.istio.io/tlsMode: istio\n", "");
    anyhow::ensure!(plain != text, "no tlsMode label in {}", pods.display());
    std::fs::write(&pods, plain)?;

    let slices = dir.join("azure-weu/endpointslices.yaml");
    let mut docs = crate::slices::SliceDocs::parse(&std::fs::read_to_string(&slices)?)?;
    let mut removed = 0;
    for doc in &mut docs.0 {
        let Some(endpoints) = doc["endpoints"].as_sequence_mut() else { continue };
        endpoints.retain(|ep| {
            let second = ep["addresses"][0].as_str().is_some_and(|a| a.ends_with(".22") || a.ends_with(".32"));
            removed += usize::from(second);
            !second
        });
    }
    anyhow::ensure!(removed == 4, "expected to remove 4 Azure endpoints, removed {removed}");
    crate::write_atomically(&slices, &docs.to_yaml()?)
}
