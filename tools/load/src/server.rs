//! The servers the load generator measures, each meant to run in a process of its own (so that /proc
//! shows the server's memory and CPU alone):
//!
//! - [`serve_meshfed`]: meshfed's real pipeline (push loop, cache, ADS server — [`meshfed::app::App`])
//!   on a generated topology; changes arrive over a loopback control socket and enter the registry as
//!   source events, as the file or Kubernetes sources would send them.
//! - [`super::floor::serve_floor`]: the floor, a minimal ADS server writing pre-encoded responses.
//!
//! Both print one line `READY xds=ADDR control=ADDR` on stdout once they serve, then answer one line per
//! control command: a [`Change`] (`flap 3 0 1`, ...) -> `ok`; `stats` -> a JSON object.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::topo::{Change, Size, Topology};
use meshfed::mesh_config::MeshConfig;

/// What a server does with control commands.
pub trait ControlHandler: Send {
    /// Applies a change; returns when its events are handed to the server.
    fn change(&mut self, change: &Change);
    /// A JSON object with whatever the server can say about itself.
    fn stats(&mut self) -> serde_json::Value;
    /// Sets a traffic policy splitting the first `services` services (0: every service) 50/50 between the
    /// clouds, with the second cloud drained to `capacity` % (`drain CAPACITY SERVICES`); servers without
    /// traffic control say so.
    fn drain(&mut self, _capacity: u32, _services: usize) -> Result<(), String> {
        Err("this server has no traffic control".into())
    }
}

/// Serves the control protocol on `listener` (one client at a time) until the process ends.
pub async fn serve_control(listener: TcpListener, mut handler: impl ControlHandler) -> Result<()> {
    loop {
        let (sock, _) = listener.accept().await?;
        let _ = sock.set_nodelay(true);
        let (r, mut w) = sock.into_split();
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let reply = match line.trim() {
                "stats" => handler.stats().to_string(),
                "ping" => "pong".to_string(),
                l if l.starts_with("drain ") => {
                    let mut args = l["drain ".len()..].split_whitespace().map(str::parse::<usize>);
                    match (args.next(), args.next().unwrap_or(Ok(0))) {
                        (Some(Ok(capacity)), Ok(services)) => match handler.drain(capacity as u32, services) {
                            Ok(()) => "ok".to_string(),
                            Err(e) => format!("error: {e}"),
                        },
                        _ => format!("error: bad drain command {l:?}"),
                    }
                }
                l => match Change::parse(l) {
                    Some(c) => {
                        handler.change(&c);
                        "ok".to_string()
                    }
                    None => format!("error: unknown command {l:?}"),
                },
            };
            if w.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                break;
            }
        }
    }
}

/// The client side of the control protocol.
pub struct ControlClient {
    lines: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl ControlClient {
    pub async fn connect(addr: SocketAddr) -> Result<ControlClient> {
        let sock = TcpStream::connect(addr).await.with_context(|| format!("control connect {addr}"))?;
        let _ = sock.set_nodelay(true);
        let (r, w) = sock.into_split();
        Ok(ControlClient { lines: BufReader::new(r).lines(), w })
    }

    /// Sends one command and returns the reply line.
    pub async fn call(&mut self, line: &str) -> Result<String> {
        self.w.write_all(format!("{line}\n").as_bytes()).await?;
        let reply = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
            .await
            .context("control reply timed out")??
            .context("control connection closed")?;
        if let Some(e) = reply.strip_prefix("error: ") {
            anyhow::bail!("control: {e}");
        }
        Ok(reply)
    }
}

/// The mesh config of a generated topology served without files (`manifests` directories are never read).
pub fn mesh_config(topology: &Topology, quiet: &str, max: &str) -> Result<MeshConfig> {
    let yaml = topology.mesh_config_yaml(Some(Path::new("/nonexistent-meshfed-load")), quiet, max);
    Ok(MeshConfig::parse(&yaml, Path::new("/"))?)
}

struct MeshfedControl {
    topology: Topology,
    server: meshfed::app::App,
}

impl ControlHandler for MeshfedControl {
    fn change(&mut self, change: &Change) {
        for e in self.topology.apply(change) {
            let _ = self.server.events.send(e);
        }
    }

    fn drain(&mut self, capacity: u32, services: usize) -> Result<(), String> {
        let policy = drain_policy(capacity, services, std::time::SystemTime::now()).map_err(|e| e.to_string())?;
        self.server.push.set_traffic_policy(policy);
        Ok(())
    }

    fn stats(&mut self) -> serde_json::Value {
        let metrics = tokio::runtime::Handle::current().metrics();
        serde_json::json!({
            "connections": self.server.connections.len(),
            "tasks": metrics.num_alive_tasks(),
            "generation": self.server.push.snapshot().generation,
            "heap": meshfed::heap::stats(),
            "scopes": scope_counts(&self.server.push.snapshot()),
        })
    }
}

/// Runs meshfed's pipeline on a generated topology of `size` with the given debounce, serving ADS (and the
/// per-type EDS service) on an ephemeral loopback port under `limits`; prints `READY ...` and serves
/// control commands until killed.
pub async fn serve_meshfed(size: Size, quiet: &str, max: &str, limits: meshfed::xds::limits::Limits) -> Result<()> {
    let topology = Topology::new(size);
    let mesh = mesh_config(&topology, quiet, max)?;
    let mut options = meshfed::app::Options::in_process(mesh, topology.initial_events());
    options.xds.push(meshfed::app::XdsListener {
        listen: meshfed::app::Listen::loopback(),
        options: meshfed::xds::server::ServeOptions { limits, ..Default::default() },
    });
    let server = meshfed::app::App::start(options).await?;
    let control = TcpListener::bind("127.0.0.1:0").await?;
    println!("READY xds={} control={}", server.xds_address(), control.local_addr()?);
    serve_control(control, MeshfedControl { topology, server }).await
}

/// Per resource type: the scopes of the latest snapshot and the resources they hold in all.
fn scope_counts(s: &meshfed::cache::Snapshot) -> serde_json::Value {
    fn count<S>(m: &imbl::HashMap<S, meshfed::cache::Resources>) -> serde_json::Value {
        serde_json::json!({ "scopes": m.len(), "resources": m.values().map(|r| r.len()).sum::<usize>() })
    }
    serde_json::json!({
        "clusters": count(&s.clusters),
        "inbound_clusters": count(&s.inbound_clusters),
        "endpoints": count(&s.endpoints),
        "listeners": count(&s.listeners),
        "routes": count(&s.routes),
    })
}

/// The traffic policy of the `drain` step: the first `services` services (0: every service) split 50/50
/// between the two clouds for proxies of either region, the second cloud drained to `capacity` % (an
/// hour's expiry).
pub fn drain_policy(
    capacity: u32,
    services: usize,
    now: std::time::SystemTime,
) -> Result<meshfed::traffic::TrafficPolicy, meshfed::traffic::policy::Error> {
    use super::topo::CLUSTERS;
    let (a, b) = (CLUSTERS[0].0, CLUSTERS[1].0);
    let expires = meshfed::source::format_time(now + Duration::from_secs(3600));
    let hosts = match services {
        0 => String::new(),
        n => format!(
            "hosts: [{}]\n    ",
            (0..n)
                .map(|s| format!("{}.{}.svc.cluster.local", super::topo::service_name(s), super::topo::NAMESPACE))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let yaml = format!(
        "policies:\n  - {hosts}split:\n      {}: {{{a}: 50, {b}: 50}}\n      {}: {{{a}: 50, {b}: 50}}\ndrains:\n  - cluster: {b}\n    capacity: {capacity}\n    expires: \"{expires}\"\n    reason: benchmark\n",
        CLUSTERS[0].1, CLUSTERS[1].1
    );
    let value: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap_or_default();
    let ids: Vec<meshfed::model::ClusterId> = CLUSTERS.iter().map(|c| meshfed::model::ClusterId::new(c.0)).collect();
    meshfed::traffic::TrafficPolicy::parse(&value, &ids, now)
}
