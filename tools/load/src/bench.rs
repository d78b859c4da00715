//! Benchmark scenarios: start a server process (meshfed, the floor, or `meshfed serve` on files), connect
//! a fleet of load proxies, run steps, and print one `RESULT {json}` line per step.
//!
//! Every wait is bounded; the server child is killed when the run ends (also on error).

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Semaphore;

use super::client::{self, ClientOptions, Hit, NackPlan, ProxyHandle, Recorder};
use super::eds;
use super::procfs;
use super::server::ControlClient;
use super::topo::{self, Change, ProxyIdentity, Size, Topology};

/// Which server a run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ServerKind {
    /// meshfed's pipeline in its own process, changes through the registry (`meshfed-load serve`)
    Meshfed,
    /// the write-only floor server (`meshfed-load floor`)
    Floor,
    /// `meshfed serve` on a generated file topology; a change rewrites one EndpointSlice file
    Files,
    /// the floor writing responses as chunks of the shared resource bytes (no per-stream encode buffer)
    FloorZeroCopy,
}

/// The limits of meshfed's xDS listener in `meshfed-load serve`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ServerLimits {
    /// no connection, stream or rate limit (the ADS rows)
    Unlimited,
    /// those of `meshfed serve` ([`meshfed::xds::limits::Limits::default`]: 1,000 streams per connection,
    /// request rate and burst per stream)
    Default,
}

impl ServerLimits {
    pub fn limits(self) -> meshfed::xds::limits::Limits {
        match self {
            ServerLimits::Unlimited => meshfed::xds::limits::Limits::unlimited(),
            ServerLimits::Default => meshfed::xds::limits::Limits::default(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ServerLimits::Unlimited => "unlimited",
            ServerLimits::Default => "default",
        }
    }
}

/// Options of a `bench` run.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// S, L, or SERVICESxENDPOINTS
    #[arg(long, default_value = "S", value_parser = parse_size)]
    pub size: Size,
    #[arg(long, value_enum, default_value = "meshfed")]
    pub server: ServerKind,
    /// proxies connected before the steps run
    #[arg(long, default_value_t = 1000)]
    pub proxies: usize,
    /// per-type EDS mode (meshfed beside istiod): each proxy opens one connection and this many
    /// `StreamEndpoints` (SotW) / `DeltaEndpoints` (Delta) streams on it, one per service of the
    /// topology (the first N), each subscribing that service's cluster; 0: ADS proxies (CDS, EDS, LDS, RDS
    /// on one stream). Steps: flaps, hold, cold
    #[arg(long, default_value_t = 0)]
    pub eds_streams: usize,
    /// the xDS listener's limits in `meshfed-load serve`
    #[arg(long, value_enum, default_value = "unlimited")]
    pub server_limits: ServerLimits,
    /// fraction of proxies on Delta xDS (the rest SotW)
    #[arg(long, default_value_t = 0.5)]
    pub delta: f64,
    /// MESHFED_TLS of the proxies: none or static
    #[arg(long, default_value = "none")]
    pub tls: String,
    /// connections set up at once while the fleet connects
    #[arg(long, default_value_t = 256)]
    pub connect_parallel: usize,
    /// debounce of the server (`quiet` and `max`); 0ms: none
    #[arg(long, default_value = "0ms")]
    pub debounce_quiet: String,
    #[arg(long, default_value = "0ms")]
    pub debounce_max: String,
    /// comma-separated steps: flaps, rollout, nack, churn, flood, storm, hold, cold, envoy, drain
    #[arg(long, default_value = "flaps")]
    pub steps: String,
    /// flaps: changes measured
    #[arg(long, default_value_t = 100)]
    pub iterations: usize,
    /// rollout: pods replaced
    #[arg(long, default_value_t = 500)]
    pub rollout_pods: usize,
    /// churn / flood / hold: seconds
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// flood: endpoints added
    #[arg(long, default_value_t = 10_000)]
    pub flood_endpoints: usize,
    /// storm: proxies that connect at once
    #[arg(long, default_value_t = 5000)]
    pub storm_proxies: usize,
    /// drain: the services the traffic policy covers (the first N; 0: every service)
    #[arg(long, default_value_t = 0)]
    pub drain_services: usize,
    /// drain: how long a step may take to reach every proxy, seconds (then the next step starts)
    #[arg(long, default_value_t = 10)]
    pub step_wait: u64,
    /// `--server meshfed` and the floors: seconds a keepalive PING may go unanswered before it closes the connection
    /// (meshfed's and istiod's default: 10). A load client that shares the server's cores and decodes
    /// gigabytes per step can fall that far behind, which a fleet of real proxies on their own machines
    /// does not
    #[arg(long, default_value_t = 10)]
    pub server_keepalive_timeout: u64,
    /// cold: pause between one connect's end and the next (more than meshfed's SCOPE_LINGER, 10 s, and
    /// each connect finds nothing translated)
    #[arg(long, default_value_t = 50)]
    pub cold_pause_ms: u64,
    /// storm: an endpoint flap starts this often (ms) while the storm lasts, the previous one ACKed by
    /// every connected proxy first; 0: back to back (100 ms after the previous one's last ACK)
    #[arg(long, default_value_t = 1000)]
    pub storm_flap_interval_ms: u64,
    /// nack: pause after the NACKed change before the next one (0: none, so a NACK may race the next push)
    #[arg(long, default_value_t = 0)]
    pub nack_settle_ms: u64,
    /// envoy: real Envoys to connect (half SotW, half Delta)
    #[arg(long, default_value_t = 3)]
    pub envoys: usize,
    /// envoy: the Envoy binary (default $MESHFED_ENVOY, else .venv/bin/envoy)
    #[arg(long)]
    pub envoy_bin: Option<std::path::PathBuf>,
    /// a label for the results (the row id, e.g. b1)
    #[arg(long, default_value = "")]
    pub label: String,
    /// bound of waiting for the fleet to be ready, seconds
    #[arg(long, default_value_t = 600)]
    pub ready_timeout: u64,
}

fn parse_size(s: &str) -> Result<Size, String> {
    Size::parse(s).ok_or_else(|| format!("{s:?}: expected S, L or SERVICESxENDPOINTS"))
}

// ---- the server process ----

/// A server running as a child process (killed on drop).
pub struct ServerProc {
    child: tokio::process::Child,
    pub pid: u32,
    pub xds: SocketAddr,
    control: Option<ControlClient>,
    files: Option<(tempfile::TempDir, Topology)>,
}

impl ServerProc {
    pub async fn start(args: &BenchArgs) -> Result<ServerProc> {
        let exe = std::env::current_exe()?;
        match args.server {
            ServerKind::Meshfed | ServerKind::Floor | ServerKind::FloorZeroCopy => {
                // MESHFED_LOAD_SERVER_WRAPPER: run the server under a profiler (e.g. `heaptrack`)
                let mut cmd = match std::env::var_os("MESHFED_LOAD_SERVER_WRAPPER") {
                    Some(w) => {
                        let mut c = tokio::process::Command::new(w);
                        c.arg(&exe);
                        c
                    }
                    None => tokio::process::Command::new(&exe),
                };
                if args.server == ServerKind::Meshfed {
                    cmd.args(["serve", "--size", &args.size.name(), "--debounce-quiet", &args.debounce_quiet]);
                    cmd.args(["--debounce-max", &args.debounce_max, "--limits", args.server_limits.name()]);
                } else {
                    cmd.args(["floor", "--size", &args.size.name()]);
                    if args.server == ServerKind::FloorZeroCopy {
                        cmd.arg("--zero-copy");
                    }
                }
                cmd.args(["--keepalive-timeout", &args.server_keepalive_timeout.to_string()]);
                cmd.env("RUST_LOG", std::env::var("MESHFED_LOAD_SERVER_LOG").unwrap_or_else(|_| "error".into()));
                cmd.stdout(Stdio::piped()).stdin(Stdio::null()).kill_on_drop(true);
                let mut child = cmd.spawn().context("spawning the server")?;
                let pid = child.id().context("server pid")?;
                let stdout = child.stdout.take().context("server stdout")?;
                let mut lines = BufReader::new(stdout).lines();
                // the first line starting with READY (a wrapper may print its own lines first)
                let ready = async {
                    loop {
                        match lines.next_line().await? {
                            Some(l) if l.starts_with("READY") => return Ok::<_, anyhow::Error>(l),
                            Some(_) => continue,
                            None => anyhow::bail!("server exited before it was ready"),
                        }
                    }
                };
                let line = tokio::time::timeout(Duration::from_secs(600), ready)
                    .await
                    .context("server did not get ready in 600 s")??;
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                let field = |k: &str| -> Result<SocketAddr> {
                    line.split_whitespace()
                        .find_map(|f| f.strip_prefix(k))
                        .and_then(|v| v.parse().ok())
                        .with_context(|| format!("bad READY line {line:?}"))
                };
                let xds = field("xds=")?;
                let control = ControlClient::connect(field("control=")?).await?;
                Ok(ServerProc { child, pid, xds, control: Some(control), files: None })
            }
            ServerKind::Files => {
                let dir = tempfile::Builder::new().prefix("meshfed-load-files-").tempdir()?;
                let topology = Topology::new(args.size);
                let mesh = topology.write_files(dir.path(), &args.debounce_quiet, &args.debounce_max)?;
                let meshfed = exe.with_file_name("meshfed");
                let xds_port = free_port()?;
                let debug_port = free_port()?;
                let mut cmd = tokio::process::Command::new(&meshfed);
                cmd.arg("serve").arg("--mesh-config").arg(&mesh);
                cmd.args(["--xds-address", &format!("127.0.0.1:{xds_port}")]);
                cmd.args(["--debug-address", &format!("127.0.0.1:{debug_port}")]);
                cmd.env("RUST_LOG", std::env::var("MESHFED_LOAD_SERVER_LOG").unwrap_or_else(|_| "error".into()));
                cmd.stdin(Stdio::null()).stdout(Stdio::null()).kill_on_drop(true);
                let child = cmd.spawn().with_context(|| format!("spawning {}", meshfed.display()))?;
                let pid = child.id().context("server pid")?;
                let xds: SocketAddr = format!("127.0.0.1:{xds_port}").parse()?;
                let deadline = Instant::now() + Duration::from_secs(600);
                while tokio::net::TcpStream::connect(xds).await.is_err() {
                    if Instant::now() > deadline {
                        bail!("meshfed serve did not listen on {xds} in 600 s");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(ServerProc { child, pid, xds, control: None, files: Some((dir, topology)) })
            }
        }
    }

    /// Makes a change (through the registry, or by rewriting a file).
    pub async fn change(&mut self, c: &Change) -> Result<()> {
        if let Some(ctl) = &mut self.control {
            ctl.call(&c.to_line()).await?;
        } else if let Some((dir, topology)) = &mut self.files {
            topology.apply_to_files(dir.path(), c)?;
        }
        Ok(())
    }

    /// Sends one control command (`drain 50`) to a server with a control channel.
    pub async fn control_call(&mut self, line: &str) -> Result<String> {
        match &mut self.control {
            Some(ctl) => ctl.call(line).await,
            None => bail!("{line:?}: this server kind has no control channel"),
        }
    }

    /// The server's own figures (connections, alive tasks), when it can tell.
    pub async fn stats(&mut self) -> Value {
        match &mut self.control {
            Some(ctl) => {
                ctl.call("stats").await.ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or(Value::Null)
            }
            None => Value::Null,
        }
    }

    pub fn rss_kb(&self) -> u64 {
        procfs::rss_kb(self.pid)
    }

    pub fn cpu_ns(&self) -> u64 {
        procfs::cpu_ns(self.pid)
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

// ---- the fleet ----

/// The load proxies of a run.
pub struct Fleet {
    pub opts: Arc<ClientOptions>,
    pub rec: Arc<Recorder>,
    pub handles: Vec<Option<ProxyHandle>>,
    identity: ProxyIdentity,
    delta: f64,
    permits: Arc<Semaphore>,
    /// per-type EDS mode: the name each of a proxy's streams subscribes (None: ADS proxies)
    eds: Option<Arc<Vec<Arc<client::NameList>>>>,
}

/// Whether load proxy `k` uses Delta (a fixed pseudo-random choice with the given fraction).
pub fn is_delta(k: usize, fraction: f64) -> bool {
    let h = xxhash_rust::xxh3::xxh3_64(&(k as u64).to_le_bytes());
    ((h % 10_000) as f64) < fraction * 10_000.0
}

impl Fleet {
    pub fn new(addr: SocketAddr, capacity: usize, args: &BenchArgs) -> Fleet {
        let tls = if args.tls == "static" { "static" } else { "none" };
        // per-type EDS proxies are istio-injected sidecars (REDIRECT): the ADS rows keep NONE, a listener
        // scope per proxy (their worst case)
        let interception = if args.eds_streams > 0 { "REDIRECT" } else { "NONE" };
        let identity = ProxyIdentity { tls, interception };
        let eds = (args.eds_streams > 0).then(|| {
            let names = topo::eds_names(&Topology::new(args.size));
            Arc::new(
                names
                    .iter()
                    .take(args.eds_streams)
                    .map(|n| client::intern([bytes::Bytes::copy_from_slice(n.as_bytes())]))
                    .collect(),
            )
        });
        Fleet {
            opts: Arc::new(ClientOptions::new(addr)),
            rec: Recorder::new(capacity),
            handles: (0..capacity).map(|_| None).collect(),
            identity,
            delta: args.delta,
            permits: Arc::new(Semaphore::new(args.connect_parallel.max(1))),
            eds,
        }
    }

    /// Starts proxies `range` (bounded concurrent setups when `limited`).
    pub fn start(&mut self, range: std::ops::Range<usize>, limited: bool) {
        for k in range {
            let node = topo::proxy_node(k, &self.identity);
            let permit = limited.then(|| self.permits.clone());
            let delta = is_delta(k, self.delta);
            self.handles[k] = Some(match &self.eds {
                Some(names) => eds::spawn_eds_proxy(&self.opts, &self.rec, k, node, delta, names.clone(), permit),
                None => client::spawn_proxy(&self.opts, &self.rec, k, node, delta, permit),
            });
        }
    }

    pub async fn stop(&mut self, range: std::ops::Range<usize>) {
        for k in range {
            if let Some(h) = self.handles[k].take() {
                h.stop().await;
            }
        }
    }

    pub fn delta_count(&self, range: std::ops::Range<usize>) -> usize {
        range.filter(|k| is_delta(*k, self.delta)).count()
    }
}

// ---- statistics ----

/// p50, p90, p99 and max of `v` (milliseconds), as JSON.
pub fn percentiles(v: &[f64]) -> Value {
    if v.is_empty() {
        return json!(null);
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| {
        let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
        (s[i] * 1000.0).round() / 1000.0
    };
    json!({"n": s.len(), "p50": p(0.50), "p90": p(0.90), "p99": p(0.99), "max": p(1.0)})
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn type_table(before: [[u64; 3]; 4], after: [[u64; 3]; 4]) -> Value {
    let names = ["cds", "eds", "lds", "rds"];
    let mut m = serde_json::Map::new();
    for (i, n) in names.iter().enumerate() {
        m.insert(
            n.to_string(),
            json!({
                "bytes": after[i][0] - before[i][0],
                "responses": after[i][1] - before[i][1],
                "resources": after[i][2] - before[i][2],
            }),
        );
    }
    Value::Object(m)
}

/// Emits one result line.
pub fn emit(v: &Value) {
    println!("RESULT {v}");
}

// ---- the run ----

/// Runs `args`: server, fleet, steps. Prints `RESULT` lines; returns them.
pub async fn run(args: BenchArgs) -> Result<Vec<Value>> {
    check_args(&args)?;
    let mut server = ServerProc::start(&args).await?;
    let result = run_steps(&args, &mut server).await;
    server.stop().await;
    result
}

/// Steps the per-type EDS mode runs (the others need ADS proxies: CDS, LDS, NACK plans, other services).
const EDS_STEPS: [&str; 3] = ["flaps", "hold", "cold"];

fn check_args(args: &BenchArgs) -> Result<()> {
    if args.eds_streams == 0 {
        return Ok(());
    }
    if args.eds_streams > args.size.services {
        bail!("--eds-streams {} > the topology's {} services", args.eds_streams, args.size.services);
    }
    if args.server == ServerKind::Floor {
        bail!("the stock-tonic floor serves ADS only: use --server floor-zero-copy for --eds-streams");
    }
    for step in args.steps.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if !EDS_STEPS.contains(&step) {
            bail!("step {step:?} is not run with --eds-streams (steps: {})", EDS_STEPS.join(", "));
        }
    }
    Ok(())
}

struct Run<'a> {
    args: &'a BenchArgs,
    server: &'a mut ServerProc,
    fleet: Fleet,
    base: Value,
    /// the server's RSS before any proxy connected
    rss0: u64,
    stats0: Value,
    topology: Topology,
    epoch: u64,
    next_service: usize,
}

async fn run_steps(args: &BenchArgs, server: &mut ServerProc) -> Result<Vec<Value>> {
    let client_pid = std::process::id();
    let extra = if args.steps.contains("storm") { args.storm_proxies } else { 0 };
    let n = args.proxies;
    let mut fleet = Fleet::new(server.xds, n + extra.max(1), args);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = server.rss_kb();
    let stats0 = server.stats().await;
    // A first tenth of the fleet connects and settles (the shared scopes, one per locality, are
    // translated for the first proxies of each), then the rest: the memory the rest adds is what a
    // proxy costs at the margin.
    let first = if n >= 20 { n / 10 } else { 0 };
    let started = Instant::now();
    let client_cpu0 = procfs::cpu_ns(client_pid);
    let server_cpu0 = server.cpu_ns();
    let mut paused = Duration::ZERO;
    let mut at_first: Option<(u64, Value)> = None;
    if first > 0 {
        fleet.start(0..first, true);
        if fleet.rec.wait_ready(first, Duration::from_secs(args.ready_timeout)).await {
            let pause = Instant::now();
            tokio::time::sleep(Duration::from_secs(2)).await;
            at_first = Some((server.rss_kb(), server.stats().await));
            paused = pause.elapsed();
        }
    }
    fleet.start(first..n, true);
    let ready = fleet.rec.wait_ready(n, Duration::from_secs(args.ready_timeout)).await;
    let connect_s = (started.elapsed() - paused).as_secs_f64();
    let server_cpu1 = server.cpu_ns();
    let client_cpu1 = procfs::cpu_ns(client_pid);
    if !ready {
        bail!(
            "only {} of {n} proxies got their full config in {} s (errors {}: {:?})",
            fleet.rec.ready.load(Ordering::SeqCst),
            args.ready_timeout,
            fleet.rec.errors.load(Ordering::Relaxed),
            fleet.rec.last_error()
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = server.rss_kb();
    let stats1 = server.stats().await;
    let heap = |s: &Value| s["heap"]["allocated"].as_f64();
    // per proxy at the margin: what the last nine tenths added, by RSS and by the allocator's live heap
    let (marginal_rss_kb, marginal_heap_kb) = match &at_first {
        Some((rss, stats)) if n > first => {
            let k = (n - first) as f64;
            (Some((rss1 as f64 - *rss as f64) / k), heap(&stats1).zip(heap(stats)).map(|(a, b)| (a - b) / 1024.0 / k))
        }
        _ => (None, None),
    };
    let ready_ms: Vec<f64> = (0..n)
        .map(|k| fleet.rec.stats[k].ready_us.load(Ordering::Relaxed) as f64 / 1000.0)
        .filter(|v| *v > 0.0)
        .collect();
    let base = json!({
        "label": args.label,
        "server": format!("{:?}", args.server).to_lowercase(),
        "size": args.size.name(),
        "proxies": n,
        "delta_proxies": fleet.delta_count(0..n),
        "tls": args.tls,
        "debounce": format!("{}/{}", args.debounce_quiet, args.debounce_max),
    });
    let mut base = base;
    let streams = n * args.eds_streams;
    if args.eds_streams > 0 {
        base["mode"] = json!("per-type-eds");
        base["eds_streams_per_proxy"] = json!(args.eds_streams);
        base["streams"] = json!(streams);
        base["server_limits"] = json!(args.server_limits.name());
    }
    if args.step_wait != 10 {
        base["step_wait_s"] = json!(args.step_wait);
    }
    if args.server_keepalive_timeout != 10 {
        base["server_keepalive_timeout_s"] = json!(args.server_keepalive_timeout);
    }
    let connect = json!({
        "step": "connect",
        "base": base,
        "connect_all_ready_s": (connect_s * 1000.0).round() / 1000.0,
        "ready_ms": percentiles(&ready_ms),
        "server_rss_kb_before": rss0,
        "server_rss_kb_after": rss1,
        "server_kb_per_proxy": if n > 0 { (rss1 as f64 - rss0 as f64) / n as f64 } else { 0.0 },
        "server_kb_per_proxy_marginal": marginal_rss_kb,
        "server_heap_kb_per_proxy_marginal": marginal_heap_kb,
        "server_cpu_s_connect": (server_cpu1 - server_cpu0) as f64 / 1e9,
        "client_cpu_s_connect": (client_cpu1 - client_cpu0) as f64 / 1e9,
        "server_stats_before": stats0.clone(),
        "server_stats_after": stats1,
        "errors": fleet.rec.errors.load(Ordering::Relaxed),
        "retries": fleet.rec.retries.load(Ordering::Relaxed),
        "last_error": fleet.rec.last_error(),
        "totals": type_table([[0; 3]; 4], fleet.rec.totals()),
    });
    let mut connect = connect;
    if streams > 0 {
        // per stream: the same figures divided by the streams instead of the proxies
        let per = args.eds_streams as f64;
        connect["open_streams"] = json!(fleet.rec.open.load(Ordering::SeqCst));
        connect["server_kb_per_stream"] = json!((rss1 as f64 - rss0 as f64) / streams as f64);
        connect["server_kb_per_stream_marginal"] = json!(marginal_rss_kb.map(|v| v / per));
        connect["server_heap_kb_per_stream_marginal"] = json!(marginal_heap_kb.map(|v| v / per));
        connect["server_cpu_us_per_stream_connect"] = json!((server_cpu1 - server_cpu0) as f64 / 1e3 / streams as f64);
    }
    emit(&connect);
    let mut out = vec![connect];
    let mut run = Run {
        args,
        server,
        fleet,
        base,
        rss0,
        stats0,
        topology: Topology::new(args.size),
        epoch: 0,
        next_service: args.size.services,
    };
    for step in args.steps.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let v = match step {
            "flaps" => run.flaps().await?,
            "rollout" => run.rollout().await?,
            "nack" => run.nack().await?,
            "churn" => run.churn().await?,
            "flood" => run.flood().await?,
            "storm" => run.storm().await?,
            "hold" => run.hold().await?,
            "cold" => run.cold().await?,
            "envoy" => run.envoy().await?,
            "drain" => run.drain().await?,
            other => bail!("unknown step {other:?}"),
        };
        emit(&v);
        out.push(v);
    }
    run.fleet.stop(0..run.fleet.handles.len()).await;
    Ok(out)
}

/// Per-proxy latencies (ms) of the hits of one epoch from `t0`: the first ACK per proxy.
fn first_per_proxy(hits: &[Hit], epoch: u64, t0: Instant) -> Vec<f64> {
    let mut best: std::collections::HashMap<u32, Instant> = Default::default();
    for h in hits.iter().filter(|h| h.epoch == epoch) {
        best.entry(h.proxy).and_modify(|t| *t = (*t).min(h.at)).or_insert(h.at);
    }
    best.values().map(|t| ms(t.saturating_duration_since(t0))).collect()
}

impl Run<'_> {
    fn n(&self) -> usize {
        self.args.proxies
    }

    /// The services changes are made to: every service, or in the per-type EDS mode those the proxies
    /// hold a stream for.
    fn flap_services(&self) -> usize {
        match self.args.eds_streams {
            0 => self.args.size.services,
            k => k,
        }
    }

    /// A flap of one endpoint of service `svc` in `cluster`, measured to each proxy's ACK (only proxies
    /// below `below`). Returns (per-proxy ms, proxies missing).
    async fn one_flap(
        &mut self,
        svc: usize,
        cluster: usize,
        below: usize,
        timeout: Duration,
    ) -> Result<(Vec<f64>, usize)> {
        self.epoch += 1;
        let epoch = self.epoch;
        let name: Arc<str> = topo::cluster_name(svc).into();
        self.fleet.rec.watch_below(epoch, [name], below as u32);
        let ep = (epoch as usize / self.args.size.services.max(1)) % self.topology.endpoints(svc, cluster).len().max(1);
        let change = Change::Flap { svc, cluster, ep };
        self.topology.apply(&change);
        let t0 = Instant::now();
        self.server.change(&change).await?;
        self.fleet.rec.wait_hits(below, timeout).await;
        self.fleet.rec.unwatch();
        let hits = self.fleet.rec.take_hits();
        let lat = first_per_proxy(&hits, epoch, t0);
        let missing = below.saturating_sub(lat.len());
        Ok((lat, missing))
    }

    async fn flaps(&mut self) -> Result<Value> {
        let n = self.n();
        let iterations = self.args.iterations;
        let client_pid = std::process::id();
        // the server's idle CPU rate, to take out of the per-update figure
        let idle0 = self.server.cpu_ns();
        let idle_t = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle_rate = (self.server.cpu_ns() - idle0) as f64 / idle_t.elapsed().as_secs_f64();
        let before = self.fleet.rec.totals();
        let cpu0 = self.server.cpu_ns();
        let ccpu0 = procfs::cpu_ns(client_pid);
        let (user0, sys0) = procfs::user_sys_ticks(self.server.pid);
        let t_start = Instant::now();
        let mut all = Vec::new();
        let mut last = Vec::new();
        let mut missing = 0usize;
        for i in 0..iterations {
            let svc = (i * 7919) % self.flap_services();
            let (lat, miss) = self.one_flap(svc, i % 2, n, Duration::from_secs(10)).await?;
            if let Some(m) = lat.iter().cloned().reduce(f64::max) {
                last.push(m);
            }
            all.extend(lat);
            missing += miss;
            // let the last ACKs be handled before the next change (changes are measured one at a time)
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let elapsed = t_start.elapsed().as_secs_f64();
        let cpu = (self.server.cpu_ns() - cpu0) as f64 - idle_rate * elapsed;
        let ccpu = (procfs::cpu_ns(client_pid) - ccpu0) as f64;
        let (user1, sys1) = procfs::user_sys_ticks(self.server.pid);
        let (user, sys) = (user1.saturating_sub(user0), sys1.saturating_sub(sys0));
        let after = self.fleet.rec.totals();
        let updates = (after[1][1] - before[1][1]).max(1);
        let per_type = type_table(before, after);
        let eds_resources_per_response = (after[1][2] - before[1][2]) as f64 / updates as f64;
        Ok(json!({
            "step": "flaps",
            "base": self.base,
            "changes": iterations,
            "change_to_ack_ms_per_proxy": percentiles(&all),
            "change_to_last_ack_ms_per_change": percentiles(&last),
            "missing_acks": missing,
            "proxy_updates": updates,
            "server_cpu_us_per_update": cpu / 1000.0 / updates as f64,
            "server_cpu_ms_per_change": cpu / 1e6 / iterations.max(1) as f64,
            "client_cpu_us_per_update": ccpu / 1000.0 / updates as f64,
            "server_idle_cpu_pct": idle_rate / 1e7,
            // the part of the server's CPU spent in the kernel (socket reads and writes), from
            // /proc/PID/stat's utime and stime
            "server_kernel_cpu_share": if user + sys > 0 { Some(sys as f64 / (user + sys) as f64) } else { None },
            "bytes_by_type": per_type,
            "eds_resources_per_response": eds_resources_per_response,
            "non_eds_bytes": (after[0][0] - before[0][0]) + (after[2][0] - before[2][0]) + (after[3][0] - before[3][0]),
            "server_rss_kb": self.server.rss_kb(),
            "errors": self.fleet.rec.errors.load(Ordering::Relaxed),
            "retries": self.fleet.rec.retries.load(Ordering::Relaxed),
            "last_error": self.fleet.rec.last_error(),
        }))
    }

    /// Drain steps (issue 17's "drain step -> last ACK"): the second cloud's capacity walks 75, 50, 25, 0,
    /// 100 (after an unmeasured 100 that installs the 50/50 split); each step changes the EDS of every
    /// service for every proxy, and is measured from the policy change to each proxy's ACK of one
    /// service's assignment (all of them change in the same push).
    async fn drain(&mut self) -> Result<Value> {
        let n = self.n();
        let watched: Arc<str> = topo::cluster_name(0).into();
        let capacities = [100u32, 75, 50, 25, 0];
        let mut all = Vec::new();
        let mut last = Vec::new();
        let mut missing = 0usize;
        let mut steps_seen = Vec::new();
        let before = self.fleet.rec.totals();
        let cpu0 = self.server.cpu_ns();
        let steps = self.args.iterations.max(1);
        for i in 0..=steps {
            let capacity = capacities[i % capacities.len()];
            self.epoch += 1;
            let epoch = self.epoch;
            self.fleet.rec.watch_below(epoch, [watched.clone()], n as u32);
            let (bytes0, step_cpu0) = (self.fleet.rec.totals(), self.server.cpu_ns());
            let t0 = Instant::now();
            self.server.control_call(&format!("drain {capacity} {}", self.args.drain_services)).await?;
            self.fleet.rec.wait_hits(n, Duration::from_secs(self.args.step_wait)).await;
            self.fleet.rec.unwatch();
            let lat = first_per_proxy(&self.fleet.rec.take_hits(), epoch, t0);
            if i == 0 {
                continue; // installs the split: not a drain step
            }
            let bytes1 = self.fleet.rec.totals();
            let slowest = lat.iter().cloned().reduce(f64::max);
            steps_seen.push(json!({
                "capacity": capacity,
                "last_ack_ms": slowest,
                "acks": lat.len(),
                "server_cpu_ms": (self.server.cpu_ns() - step_cpu0) as f64 / 1e6,
                "mb_by_type": (0..4).map(|t| (bytes1[t][0] - bytes0[t][0]) as f64 / 1e6).collect::<Vec<_>>(),
            }));
            missing += n.saturating_sub(lat.len());
            last.extend(slowest);
            all.extend(lat);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let after = self.fleet.rec.totals();
        let updates = (after[1][1] - before[1][1]).max(1);
        Ok(json!({
            "step": "drain",
            "base": self.base,
            "covered_services": if self.args.drain_services == 0 { self.args.size.services } else { self.args.drain_services },
            "changes": steps,
            "change_to_ack_ms_per_proxy": percentiles(&all),
            "change_to_last_ack_ms_per_change": percentiles(&last),
            "steps": steps_seen,
            "missing_acks": missing,
            "proxy_updates": updates,
            "eds_resources_per_response": (after[1][2] - before[1][2]) as f64 / updates as f64,
            "server_cpu_ms_per_change": (self.server.cpu_ns() - cpu0) as f64 / 1e6 / (steps + 1) as f64,
            "server_rss_kb": self.server.rss_kb(),
            "server_heap_after": self.server.stats().await.get("heap").cloned().unwrap_or(Value::Null),
            "errors": self.fleet.rec.errors.load(Ordering::Relaxed),
            "last_error": self.fleet.rec.last_error(),
        }))
    }

    /// Replaces `rollout_pods` endpoints (pods) of cluster 0, as a rollout does, as fast as the control
    /// channel takes them; then waits for quiet and measures each proxy's last ACK of the services touched
    /// against the last event.
    async fn rollout(&mut self) -> Result<Value> {
        let per = self.topology.endpoints(0, 0).len().max(1);
        let pods = self.args.rollout_pods;
        let services: Vec<usize> = (0..pods.div_ceil(per)).map(|i| (i * 13 + 1) % self.args.size.services).collect();
        self.epoch += 1;
        let epoch = self.epoch;
        self.fleet.rec.watch(epoch, services.iter().map(|s| Arc::from(topo::cluster_name(*s))));
        let cpu0 = self.server.cpu_ns();
        let t_first = Instant::now();
        let mut sent = 0;
        'outer: for s in &services {
            for ep in 0..per {
                if sent == pods {
                    break 'outer;
                }
                let c = Change::Replace { svc: *s, cluster: 0, ep };
                self.topology.apply(&c);
                self.server.change(&c).await?;
                sent += 1;
            }
        }
        let t_last = Instant::now();
        // quiet: no new hit for 1 s (bounded by 120 s)
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut hits: Vec<Hit> = Vec::new();
        loop {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let new = self.fleet.rec.take_hits();
            let quiet = new.is_empty();
            hits.extend(new);
            if quiet || Instant::now() > deadline {
                break;
            }
        }
        self.fleet.rec.unwatch();
        let cpu = (self.server.cpu_ns() - cpu0) as f64 / 1e9;
        // each proxy's final ACK, and whether its final versions agree with its EDS scope's
        let mut last: std::collections::HashMap<u32, Instant> = Default::default();
        let mut finals: std::collections::HashMap<(u32, Arc<str>), (Instant, u64)> = Default::default();
        for h in &hits {
            last.entry(h.proxy).and_modify(|t| *t = (*t).max(h.at)).or_insert(h.at);
            let e = finals.entry((h.proxy, h.name.clone())).or_insert((h.at, h.hash));
            if h.at >= e.0 {
                *e = (h.at, h.hash);
            }
        }
        let mut by_scope: std::collections::HashMap<(usize, usize, Arc<str>), std::collections::HashMap<u64, usize>> =
            Default::default();
        for ((p, name), (_, hash)) in &finals {
            *by_scope
                .entry((topo::proxy_placement(*p as usize).0, topo::proxy_placement(*p as usize).1, name.clone()))
                .or_default()
                .entry(*hash)
                .or_default() += 1;
        }
        let disagreeing: usize =
            by_scope.values().map(|m| m.values().sum::<usize>() - m.values().max().copied().unwrap_or(0)).sum();
        let after_last: Vec<f64> = last.values().map(|t| ms(t.saturating_duration_since(t_last))).collect();
        Ok(json!({
            "step": "rollout",
            "base": self.base,
            "pods": sent,
            "services": services.len(),
            "events_sent_ms": ms(t_last - t_first),
            "final_ack_after_last_event_ms": percentiles(&after_last),
            "proxies_with_updates": last.len(),
            "final_versions_disagreeing_with_scope": disagreeing,
            "server_cpu_s": cpu,
            "server_rss_kb": self.server.rss_kb(),
            "errors": self.fleet.rec.errors.load(Ordering::Relaxed),
            "retries": self.fleet.rec.retries.load(Ordering::Relaxed),
            "last_error": self.fleet.rec.last_error(),
        }))
    }

    /// Every proxy NACKs the next version of one assignment; then other changes (endpoint flaps, a service
    /// added and removed) run; re-sends of the rejected version are counted (expected 0); finally the
    /// assignment's content changes again, and each proxy must get the new version.
    async fn nack(&mut self) -> Result<Value> {
        let n = self.n();
        let target = 0usize;
        let name: Arc<str> = topo::cluster_name(target).into();
        let plan = NackPlan { name: name.clone(), proxies: (0..n as u32).collect(), rejected: Default::default() };
        self.fleet.rec.set_nack_plan(Some(plan));
        let nacks0 = self.fleet.rec.sum(|s| &s.nacks_sent);
        let (lat, miss) = self.one_flap(target, 0, n, Duration::from_secs(10)).await?;
        let nacked = self.fleet.rec.sum(|s| &s.nacks_sent) - nacks0;
        tokio::time::sleep(Duration::from_millis(self.args.nack_settle_ms)).await;
        for i in 0..10 {
            self.one_flap(1 + i * 3, i % 2, n, Duration::from_secs(10)).await?;
        }
        let svc = self.next_service;
        self.next_service += 1;
        for c in [Change::AddService { svc }, Change::RemoveService { svc }] {
            self.topology.apply(&c);
            self.server.change(&c).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        for i in 0..5 {
            self.one_flap(2 + i * 3, i % 2, n, Duration::from_secs(10)).await?;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let resent = self.fleet.rec.sum(|s| &s.rejected_resent);
        // new content for the rejected assignment: every proxy gets it
        self.epoch += 1;
        self.fleet.rec.watch(self.epoch, [name.clone()]);
        let c = Change::Replace { svc: target, cluster: 1, ep: 0 };
        self.topology.apply(&c);
        self.server.change(&c).await?;
        self.fleet.rec.wait_hits(n, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.fleet.rec.unwatch();
        let accepted = self.fleet.rec.sum(|s| &s.accepted_after_nack);
        self.fleet.rec.set_nack_plan(None);
        let _ = self.fleet.rec.take_hits();
        Ok(json!({
            "step": "nack",
            "base": self.base,
            "nack_settle_ms": self.args.nack_settle_ms,
            "nacks_sent": nacked,
            "nack_flap_acks": lat.len(),
            "nack_flap_missing": miss,
            "rejected_version_resent": resent,
            "new_version_accepted_by": accepted,
            "errors": self.fleet.rec.errors.load(Ordering::Relaxed),
            "retries": self.fleet.rec.retries.load(Ordering::Relaxed),
            "last_error": self.fleet.rec.last_error(),
        }))
    }

    /// Changes and reconnects for `duration` s, then every proxy disconnects: server memory and tasks
    /// against the baseline taken before any proxy connected.
    async fn churn(&mut self) -> Result<Value> {
        let n = self.n();
        let base_rss = self.rss0;
        let end = Instant::now() + Duration::from_secs(self.args.duration);
        let mut reconnects = 0usize;
        let mut changes = 0usize;
        let mut round = 0usize;
        let mut peak = self.server.rss_kb();
        while Instant::now() < end {
            round += 1;
            let k0 = (round * 37) % n.max(1);
            let cnt = (n / 20).max(1);
            let range = k0..(k0 + cnt).min(n);
            self.fleet.stop(range.clone()).await;
            self.fleet.start(range.clone(), true);
            reconnects += range.len();
            let c = Change::Flap { svc: (round * 31) % self.args.size.services, cluster: round % 2, ep: 0 };
            self.topology.apply(&c);
            self.server.change(&c).await?;
            changes += 1;
            if round.is_multiple_of(10) {
                let svc = self.next_service;
                self.next_service += 1;
                for c in [Change::AddService { svc }, Change::RemoveService { svc }] {
                    self.topology.apply(&c);
                    self.server.change(&c).await?;
                    changes += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            peak = peak.max(self.server.rss_kb());
        }
        let ready = self.fleet.rec.wait_ready(n, Duration::from_secs(120)).await;
        let with_all = self.server.rss_kb();
        self.fleet.stop(0..n).await;
        // the server notices the disconnects
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut stats = self.server.stats().await;
        while stats.get("connections").and_then(Value::as_u64).unwrap_or(0) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            stats = self.server.stats().await;
        }
        // tasks wind down (e.g. per-connection timers): wait until the count is back near the baseline,
        // at most 60 s, and report how long that took
        let base_tasks = self.stats0.get("tasks").and_then(Value::as_u64).unwrap_or(0);
        let settle = Instant::now();
        let mut stats = self.server.stats().await;
        let end_rss_3s = {
            tokio::time::sleep(Duration::from_secs(3)).await;
            self.server.rss_kb()
        };
        while stats.get("tasks").and_then(Value::as_u64).unwrap_or(0) > base_tasks + 10
            && settle.elapsed() < Duration::from_secs(60)
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
            stats = self.server.stats().await;
        }
        let tasks_settled_s = settle.elapsed().as_secs_f64();
        // the scopes of departed proxies linger (meshfed's SCOPE_LINGER) before they are freed: wait
        // until none is left, at most 60 s
        let scopes_left = |stats: &Value| {
            stats
                .get("scopes")
                .and_then(Value::as_object)
                .map_or(0, |m| m.values().filter_map(|v| v.get("scopes").and_then(Value::as_u64)).sum::<u64>())
        };
        let scopes_wait = Instant::now();
        while scopes_left(&self.server.stats().await) > 0 && scopes_wait.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let scopes_dropped_s = scopes_wait.elapsed().as_secs_f64();
        // the allocator returns freed memory over seconds (jemalloc's decay): wait up to 30 s for RSS to
        // come back within 10 % of the baseline, and report how long it took
        let rss_wait = Instant::now();
        while self.server.rss_kb() as f64 > base_rss as f64 * 1.1 && rss_wait.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let rss_settled_s = rss_wait.elapsed().as_secs_f64();
        let end_rss = self.server.rss_kb();
        let stats = self.server.stats().await;
        // reconnect everyone so later steps have a fleet
        self.fleet.start(0..n, true);
        self.fleet.rec.wait_ready(n, Duration::from_secs(self.args.ready_timeout)).await;
        Ok(json!({
            "step": "churn",
            "base": self.base,
            "seconds": self.args.duration,
            "reconnects": reconnects,
            "changes": changes,
            "all_ready_after_churn": ready,
            "server_rss_kb_baseline": base_rss,
            "server_rss_kb_peak": peak,
            "server_rss_kb_with_all": with_all,
            "server_rss_kb_3s_after_all_disconnected": end_rss_3s,
            "server_rss_kb_after_all_disconnected": end_rss,
            "tasks_settled_after_s": tasks_settled_s,
            "scopes_dropped_after_further_s": scopes_dropped_s,
            "rss_settled_after_s": rss_settled_s,
            "rss_after_vs_baseline": end_rss as f64 / base_rss.max(1) as f64,
            "server_stats_baseline": self.stats0,
            "server_stats_after_all_disconnected": stats,
            "errors": self.fleet.rec.errors.load(Ordering::Relaxed),
            "retries": self.fleet.rec.retries.load(Ordering::Relaxed),
            "last_error": self.fleet.rec.last_error(),
        }))
    }

    /// Cluster 1 gains `flood_endpoints` endpoints over `duration` s (spread over the second half of the
    /// services) while endpoints of cluster 0 flap (first half): flap latency during the flood against
    /// before it.
    async fn flood(&mut self) -> Result<Value> {
        let n = self.n();
        let half = (self.args.size.services / 2).max(1);
        let mut baseline = Vec::new();
        for i in 0..30 {
            let (lat, _) = self.one_flap((i * 17) % half, 0, n, Duration::from_secs(10)).await?;
            baseline.push(lat.into_iter().reduce(f64::max).unwrap_or(0.0));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let total = self.args.flood_endpoints;
        let secs = self.args.duration.max(1);
        let ticks = (secs * 10) as usize; // every 100 ms
        let per_tick = total.div_ceil(ticks).max(1);
        let start = Instant::now();
        let mut added = 0usize;
        let mut during = Vec::new();
        let mut peak = self.server.rss_kb();
        let mut tick = 0usize;
        let mut missing = 0;
        while added < total && start.elapsed() < Duration::from_secs(secs * 3) {
            let due = (start.elapsed().as_millis() / 100) as usize;
            while tick <= due && added < total {
                let svc = half + (tick % (self.args.size.services - half).max(1));
                let c = Change::Grow { svc, cluster: 1, n: per_tick.min(total - added) };
                self.topology.apply(&c);
                self.server.change(&c).await?;
                added += per_tick.min(total - added);
                tick += 1;
            }
            let (lat, miss) = self.one_flap((tick * 17) % half, 0, n, Duration::from_secs(10)).await?;
            missing += miss;
            during.push(lat.into_iter().reduce(f64::max).unwrap_or(0.0));
            peak = peak.max(self.server.rss_kb());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(json!({
            "step": "flood",
            "base": self.base,
            "endpoints_added": added,
            "flood_seconds": start.elapsed().as_secs_f64(),
            "baseline_last_ack_ms": percentiles(&baseline),
            "during_flood_last_ack_ms": percentiles(&during),
            "missing_acks": missing,
            "server_rss_kb_peak": peak,
            "server_alive": procfs::rss_kb(self.server.pid) > 0,
            "errors": self.fleet.rec.errors.load(Ordering::Relaxed),
            "retries": self.fleet.rec.retries.load(Ordering::Relaxed),
            "last_error": self.fleet.rec.last_error(),
        }))
    }

    /// `storm_proxies` more proxies connect at once, while endpoint flaps are measured on the proxies
    /// already connected.
    async fn storm(&mut self) -> Result<Value> {
        let n = self.n();
        let m = self.args.storm_proxies;
        let start = Instant::now();
        let cpu0 = self.server.cpu_ns();
        self.fleet.start(n..n + m, false);
        let mut during = Vec::new();
        let mut last_per_change = Vec::new();
        let mut missing = 0;
        let mut all_ready = None;
        let mut i = 0usize;
        while start.elapsed() < Duration::from_secs(self.args.ready_timeout) {
            if self.fleet.rec.ready.load(Ordering::SeqCst) >= n + m {
                all_ready = Some(start.elapsed().as_secs_f64());
                break;
            }
            i += 1;
            let flap_start = Instant::now();
            let (lat, miss) =
                self.one_flap((i * 7919) % self.args.size.services, i % 2, n, Duration::from_secs(10)).await?;
            missing += miss;
            if let Some(last) = lat.iter().copied().reduce(f64::max) {
                last_per_change.push(last);
            }
            during.extend(lat);
            let interval = Duration::from_millis(self.args.storm_flap_interval_ms);
            tokio::time::sleep(interval.saturating_sub(flap_start.elapsed()).max(Duration::from_millis(100))).await;
        }
        let ready_ms: Vec<f64> = (n..n + m)
            .map(|k| self.fleet.rec.stats[k].ready_us.load(Ordering::Relaxed) as f64 / 1000.0)
            .filter(|v| *v > 0.0)
            .collect();
        let cpu = (self.server.cpu_ns() - cpu0) as f64 / 1e9;
        let v = json!({
            "step": "storm",
            "base": self.base,
            "storm_proxies": m,
            "all_ready_s": all_ready,
            "storm_ready_ms": percentiles(&ready_ms),
            "flaps_during_storm": i,
            "flap_interval_ms": self.args.storm_flap_interval_ms,
            "connected_proxies_change_to_ack_ms": percentiles(&during),
            "connected_proxies_change_to_last_ack_ms_per_change": percentiles(&last_per_change),
            "missing_acks": missing,
            "server_cpu_s": cpu,
            "server_rss_kb": self.server.rss_kb(),
            "errors": self.fleet.rec.errors.load(Ordering::Relaxed),
            "retries": self.fleet.rec.retries.load(Ordering::Relaxed),
            "last_error": self.fleet.rec.last_error(),
        });
        self.fleet.stop(n..n + m).await;
        Ok(v)
    }

    /// Holds the fleet for `duration` s and checks every stream is still open, without errors.
    async fn hold(&mut self) -> Result<Value> {
        let cpu0 = self.server.cpu_ns();
        tokio::time::sleep(Duration::from_secs(self.args.duration)).await;
        Ok(json!({
            "step": "hold",
            "base": self.base,
            "seconds": self.args.duration,
            "open_streams": self.fleet.rec.open.load(Ordering::SeqCst),
            "ready": self.fleet.rec.ready.load(Ordering::SeqCst),
            "server_stats": self.server.stats().await,
            "server_cpu_pct_idle": (self.server.cpu_ns() - cpu0) as f64 / 1e7 / self.args.duration.max(1) as f64,
            "server_rss_kb": self.server.rss_kb(),
            "errors": self.fleet.rec.errors.load(Ordering::Relaxed),
            "retries": self.fleet.rec.retries.load(Ordering::Relaxed),
            "last_error": self.fleet.rec.last_error(),
        }))
    }

    /// Real Envoys (`meshfed bootstrap`) connect; endpoint flaps are timed from the change until each
    /// Envoy's admin reports the new membership of the cluster (`/stats`, `membership_total`).
    async fn envoy(&mut self) -> Result<Value> {
        let exe = std::env::current_exe()?;
        let meshfed = exe.with_file_name("meshfed");
        let envoy_bin = self
            .args
            .envoy_bin
            .clone()
            .or_else(|| std::env::var_os("MESHFED_ENVOY").map(Into::into))
            .unwrap_or_else(|| ".venv/bin/envoy".into());
        let dir = tempfile::Builder::new().prefix("meshfed-load-envoy-").tempdir()?;
        let mut envoys = Vec::new();
        for k in 0..self.args.envoys {
            let (c, z) = topo::proxy_placement(k);
            let (cluster, region, zones) = topo::CLUSTERS[c];
            let admin = free_port()?;
            let mut cmd = tokio::process::Command::new(&meshfed);
            cmd.arg("bootstrap")
                .args(["--node-id", &format!("sidecar~127.0.77.{}~envoy-{k}.shop~shop.svc.cluster.local", k + 1)])
                .args(["--xds-address", &self.server.xds.to_string()])
                .args(["--admin-port", &admin.to_string()])
                .args(["--cluster-id", cluster, "--network", topo::NETWORK])
                .args(["--locality", &format!("{region}/{}", zones[z])]);
            if k % 2 == 1 {
                cmd.arg("--delta");
            }
            let out = cmd.output().await.context("meshfed bootstrap")?;
            if !out.status.success() {
                bail!("meshfed bootstrap failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let cfg = dir.path().join(format!("envoy-{k}.yaml"));
            std::fs::write(&cfg, &out.stdout)?;
            let log = std::fs::File::create(dir.path().join(format!("envoy-{k}.log")))?;
            let child = tokio::process::Command::new(&envoy_bin)
                .arg("-c")
                .arg(&cfg)
                .args(["--concurrency", "1", "--disable-hot-restart", "-l", "warning"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("spawning {}", envoy_bin.display()))?;
            envoys.push((child, admin));
        }
        let probe = 1usize;
        let deadline = Instant::now() + Duration::from_secs(120);
        for (_, admin) in &envoys {
            while envoy_members(*admin, probe).await.is_none() {
                if Instant::now() > deadline {
                    bail!("Envoy (admin {admin}) did not get its config in 120 s (logs in {})", dir.path().display());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let mut per_envoy = Vec::new();
        let mut last = Vec::new();
        let mut timeouts = 0;
        // one admin /stats query's round trip: the resolution of the measurement
        let mut admin_rtt = Vec::new();
        for i in 0..self.args.iterations.min(50) {
            let svc = (i * 7919 + 3) % self.args.size.services;
            let mut before = Vec::new();
            let t_admin = Instant::now();
            for (_, admin) in &envoys {
                before.push(envoy_members(*admin, svc).await);
            }
            admin_rtt.push(ms(t_admin.elapsed()) / envoys.len().max(1) as f64);
            let change = Change::Flap { svc, cluster: i % 2, ep: 0 };
            self.topology.apply(&change);
            let t0 = Instant::now();
            self.server.change(&change).await?;
            let mut done: Vec<Option<f64>> = vec![None; envoys.len()];
            while done.iter().any(Option::is_none) && t0.elapsed() < Duration::from_secs(10) {
                for (j, (_, admin)) in envoys.iter().enumerate() {
                    if done[j].is_none() && envoy_members(*admin, svc).await != before[j] {
                        done[j] = Some(ms(t0.elapsed()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            timeouts += done.iter().filter(|d| d.is_none()).count();
            let got: Vec<f64> = done.into_iter().flatten().collect();
            if let Some(m) = got.iter().cloned().reduce(f64::max) {
                last.push(m);
            }
            per_envoy.extend(got);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (mut c, _) in envoys {
            let _ = c.kill().await;
        }
        Ok(json!({
            "step": "envoy",
            "base": self.base,
            "envoys": self.args.envoys,
            "changes": last.len(),
            "change_to_envoy_admin_ms_per_envoy": percentiles(&per_envoy),
            "change_to_last_envoy_ms_per_change": percentiles(&last),
            "timeouts": timeouts,
            "admin_stats_query_ms": percentiles(&admin_rtt),
            "note": "each Envoy's admin is polled in turn (1 ms apart): a figure includes up to one round of admin queries",
        }))
    }

    /// One more proxy connects, gets its full config, disconnects; `iterations` times (each connect is a
    /// new stream; the first one's scopes may still be translated by other connected proxies).
    async fn cold(&mut self) -> Result<Value> {
        let k = self.fleet.handles.len() - 1;
        let mut times = Vec::new();
        for _ in 0..self.args.iterations {
            self.fleet.start(k..k + 1, false);
            if !self.fleet.rec.wait_ready(self.n() + 1, Duration::from_secs(self.args.ready_timeout)).await {
                bail!(
                    "cold connect: no full config in {} s ({:?})",
                    self.args.ready_timeout,
                    self.fleet.rec.last_error()
                );
            }
            times.push(self.fleet.rec.stats[k].last_ready_us.load(Ordering::Relaxed) as f64 / 1000.0);
            self.fleet.stop(k..k + 1).await;
            tokio::time::sleep(Duration::from_millis(self.args.cold_pause_ms)).await;
        }
        Ok(json!({
            "step": "cold",
            "base": self.base,
            "full_config_acked_ms": percentiles(&times),
            "first_ms": times.first(),
            "errors": self.fleet.rec.errors.load(Ordering::Relaxed),
            "retries": self.fleet.rec.retries.load(Ordering::Relaxed),
            "last_error": self.fleet.rec.last_error(),
        }))
    }
}

/// GET `path` from `127.0.0.1:port` (HTTP/1.1, one request per connection); the body.
async fn http_get(port: u16, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// Envoy's `membership_total` of the cluster of service `svc` (None: not there yet).
async fn envoy_members(admin: u16, svc: usize) -> Option<u64> {
    let filter = format!("{}.{}.svc.cluster.local.membership_total", topo::service_name(svc), topo::NAMESPACE);
    let body = http_get(admin, &format!("/stats?filter={filter}")).await.ok()?;
    body.lines().find_map(|l| l.rsplit_once(": ").and_then(|(_, v)| v.trim().parse().ok()))
}

/// A short machine description and where the binaries are, for reports.
pub fn environment() -> Value {
    json!({ "machine": procfs::machine(), "exe": std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default() })
}
