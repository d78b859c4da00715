//! An in-process meshfed (the application of [`meshfed::app`] serving ADS on a loopback port) and copies of
//! the demo that tests can edit.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use meshfed::app::{App, Options, XdsListener};
use meshfed::mesh_config::MeshConfig;
use meshfed::push::PushHandle;
use meshfed::source::SourceEvent;
use meshfed::xds::connections::Connections;
use tokio::sync::mpsc;

/// meshfed's pipeline running in this process ([`meshfed::app::App`]), serving ADS on
/// 127.0.0.1:<ephemeral> without limits.
pub struct TestServer {
    pub xds_addr: SocketAddr,
    pub app: App,
    pub push: PushHandle,
    /// feed source events here (as the file or Kubernetes sources would)
    pub events: mpsc::UnboundedSender<SourceEvent>,
    pub connections: Arc<Connections>,
}

impl TestServer {
    /// Starts the push loop with `initial` events queued (the first push carries them all), waits
    /// for the first snapshot, then serves ADS.
    pub async fn start(mesh: &MeshConfig, initial: Vec<SourceEvent>) -> TestServer {
        let mut options = Options::in_process(mesh.clone(), initial);
        options.xds.push(XdsListener::loopback_unlimited());
        TestServer::with_options(options).await
    }

    /// Starts meshfed as `options` say (at least one xDS listener).
    pub async fn with_options(options: Options) -> TestServer {
        let app = App::start(options).await.expect("meshfed starts");
        TestServer {
            xds_addr: app.xds_address(),
            push: app.push.clone(),
            events: app.events.clone(),
            connections: app.connections.clone(),
            app,
        }
    }

    /// Starts with the demo topology read from `dir` (see [`copy_demo`]).
    pub async fn start_with_files(mesh_path: &Path) -> TestServer {
        let mesh = MeshConfig::load(mesh_path).expect("valid mesh config");
        TestServer::start(&mesh, files_events(&mesh)).await
    }

    /// Waits until a snapshot newer than `generation` is published; returns its generation.
    pub async fn wait_generation_after(&self, generation: u64) -> u64 {
        self.app.wait_generation_after(generation).await
    }
}

/// The initial state of every manifests directory of `mesh`, as the file source would send it.
///
/// # Panics
/// When a cluster is not a manifests directory or a file does not parse.
pub fn files_events(mesh: &MeshConfig) -> Vec<SourceEvent> {
    let mut initial = Vec::new();
    for c in &mesh.clusters {
        let meshfed::mesh_config::ClusterSource::Manifests(dir) = &c.source else {
            panic!("cluster {} is not a manifests directory", c.id);
        };
        let (objects, errors) = meshfed::source::files::load_cluster_dir(dir);
        assert!(errors.is_empty(), "demo files must parse: {errors:?}");
        initial.push(SourceEvent::Sync { cluster: c.id.clone(), objects });
    }
    initial
}

/// Copies the built-in demo into `dir`, replacing every loopback address `127.0.X.Y` by
/// `127.<octet>.X.Y`, so that tests running at the same time use disjoint addresses. Returns the
/// path of the copied mesh config.
pub fn copy_demo(dir: &Path, octet: u8) -> std::path::PathBuf {
    for (path, text) in meshfed::demo::DEMO_FILES {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().expect("has parent")).expect("create demo dir");
        std::fs::write(&p, remap_loopback(text, octet)).expect("write demo file");
    }
    dir.join("mesh.yaml")
}

/// Like [`copy_demo`], but with both clouds on one network (`aws-net`): every endpoint is reachable
/// directly, without east-west gateways or mesh mTLS (tests that run plain backends use this).
pub fn copy_demo_single_network(dir: &Path, octet: u8) -> std::path::PathBuf {
    for (path, text) in meshfed::demo::DEMO_FILES {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().expect("has parent")).expect("create demo dir");
        std::fs::write(&p, remap_loopback(text, octet).replace("azure-net", "aws-net")).expect("write demo file");
    }
    dir.join("mesh.yaml")
}

/// Replaces `127.0.` by `127.<octet>.` in addresses.
pub fn remap_loopback(text: &str, octet: u8) -> String {
    text.replace("127.0.", &format!("127.{octet}."))
}
