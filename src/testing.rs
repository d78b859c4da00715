//! Test support: an in-process meshfed (push loop + ADS server on a loopback port) and a copy of the
//! demo that tests can edit. Used by the integration tests and benchmarks; not used by the server.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::mesh_config::MeshConfig;
use crate::push::PushHandle;
use crate::source::SourceEvent;
use crate::xds::connections::Connections;

/// meshfed's pipeline running in this process, serving ADS on 127.0.0.1:<ephemeral>.
pub struct TestServer {
    pub xds_addr: SocketAddr,
    pub push: PushHandle,
    /// feed source events here (as the file or Kubernetes sources would)
    pub events: mpsc::UnboundedSender<SourceEvent>,
    pub connections: Arc<Connections>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// Starts the push loop with `initial` events queued (the first push carries them all), waits
    /// for the first snapshot, then serves ADS.
    pub async fn start(mesh: &MeshConfig, initial: Vec<SourceEvent>) -> TestServer {
        let (events, events_rx) = mpsc::unbounded_channel();
        for e in initial {
            events.send(e).expect("receiver alive");
        }
        let (push, push_task) = crate::push::start(mesh, events_rx);
        let mut snaps = push.subscribe();
        snaps.wait_for(|s| s.generation > 0).await.expect("push loop alive");
        let connections = Arc::new(Connections::default());
        let listener = crate::xds::bind_listener(([127, 0, 0, 1], 0).into()).expect("bind loopback");
        let xds_addr = listener.local_addr().expect("local addr");
        let (shutdown, rx) = watch::channel(false);
        let ads = crate::xds::AdsService::new(push.clone(), connections.clone());
        let mut rx2 = rx.clone();
        let serve_task = tokio::spawn(async move {
            let _ = crate::xds::serve(listener, ads, async move {
                let _ = rx2.wait_for(|v| *v).await;
            })
            .await;
        });
        TestServer { xds_addr, push, events, connections, shutdown, tasks: vec![push_task, serve_task] }
    }

    /// Starts with the demo topology read from `dir` (see [`copy_demo`]).
    pub async fn start_with_files(mesh_path: &Path) -> TestServer {
        let mesh = MeshConfig::load(mesh_path).expect("valid mesh config");
        let mut initial = Vec::new();
        for c in &mesh.clusters {
            let crate::mesh_config::ClusterSource::Manifests(dir) = &c.source else {
                panic!("start_with_files: cluster {} is not a manifests directory", c.id);
            };
            let (objects, errors) = crate::source::files::load_cluster_dir(dir);
            assert!(errors.is_empty(), "demo files must parse: {errors:?}");
            initial.push(SourceEvent::Sync { cluster: c.id.clone(), objects });
        }
        TestServer::start(&mesh, initial).await
    }

    /// Waits until a snapshot newer than `generation` is published; returns its generation.
    pub async fn wait_generation_after(&self, generation: u64) -> u64 {
        let mut rx = self.push.subscribe();
        rx.wait_for(|s| s.generation > generation).await.expect("push loop alive").generation
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Copies the built-in demo into `dir`, replacing every loopback address `127.0.X.Y` by
/// `127.<octet>.X.Y`, so that tests running at the same time use disjoint addresses. Returns the
/// path of the copied mesh config.
pub fn copy_demo(dir: &Path, octet: u8) -> std::path::PathBuf {
    for (path, text) in crate::demo::DEMO_FILES {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().expect("has parent")).expect("create demo dir");
        std::fs::write(&p, remap_loopback(text, octet)).expect("write demo file");
    }
    dir.join("mesh.yaml")
}

/// Like [`copy_demo`], but with both clouds on one network (`aws-net`): every endpoint is reachable
/// directly, without east-west gateways or mesh mTLS (tests that run plain backends use this).
pub fn copy_demo_single_network(dir: &Path, octet: u8) -> std::path::PathBuf {
    for (path, text) in crate::demo::DEMO_FILES {
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
