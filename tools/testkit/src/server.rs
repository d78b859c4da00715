//! An in-process meshfed: [`TestServer`], the application of [`meshfed::app`] serving ADS on a loopback port,
//! fed source events by the test. (The demo's copies, also re-exported here, are in [`crate::demo`].)

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use meshfed::app::{App, Options, XdsListener};
use meshfed::mesh_config::MeshConfig;
use meshfed::push::PushHandle;
use meshfed::source::SourceEvent;
use meshfed::xds::connections::Connections;
use tokio::sync::mpsc;

pub use crate::demo::{copy_demo, copy_demo_single_network, files_events, remap_loopback};

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

    /// Starts with the topology of the manifests directories of the mesh config at `mesh_path` (e.g. a
    /// demo copied by [`copy_demo`]).
    pub async fn start_with_files(mesh_path: &Path) -> TestServer {
        let mesh = MeshConfig::load(mesh_path).expect("valid mesh config");
        TestServer::start(&mesh, files_events(&mesh)).await
    }

    /// Waits until a snapshot newer than `generation` is published; returns its generation.
    pub async fn wait_generation_after(&self, generation: u64) -> u64 {
        self.app.wait_generation_after(generation).await
    }
}
