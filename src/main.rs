//! The meshfed command line: `serve` runs the control plane, `bootstrap` prints an Envoy bootstrap.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use meshfed::app::{App, DebugListener, Listen, Options, Sources, XdsListener};
use meshfed::bootstrap::{self, BootstrapOptions};
use meshfed::mesh_config::MeshConfig;
use meshfed::proxy::InterceptionMode;
use meshfed::xds::server::ServeOptions;
use tracing::{error, info, warn};

/// jemalloc returns memory freed after connection bursts to the system (see `meshfed::heap`).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
/// jemalloc's options ([`meshfed::heap::MALLOC_CONF`]), read by jemalloc at its start.
#[cfg(feature = "jemalloc")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8] = meshfed::heap::MALLOC_CONF;

#[derive(Parser)]
#[command(name = "meshfed", version, about = "xDS control plane for Istio meshes spanning clouds")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane (with no mesh config: the built-in two-clouds demo).
    Serve(ServeArgs),
    /// Print an Envoy bootstrap (YAML) that points Envoy at meshfed over ADS.
    Bootstrap(BootstrapArgs),
    /// Print (or --apply) the Istio objects that wire meshfed's EDS in beside istiod.
    Istio(meshfed::istio::IstioArgs),
    /// Traffic control: drain / undrain a cluster in the mesh config file (applied live by meshfed
    /// serve), and read a running meshfed's traffic status and what-if predictions.
    Traffic(meshfed::traffic_policy::cli::TrafficArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Mesh config file (YAML). Default: the built-in demo, examples/two-clouds/mesh.yaml.
    #[arg(long, env = "MESHFED_MESH_CONFIG")]
    mesh_config: Option<PathBuf>,
    /// Address of the plaintext ADS gRPC server (no authentication; see --no-plaintext-xds).
    #[arg(long, default_value = "0.0.0.0:15010")]
    xds_address: SocketAddr,
    /// Do not serve plaintext ADS on --xds-address (only TLS, on --xds-tls-address).
    #[arg(long)]
    no_plaintext_xds: bool,
    /// Address of the TLS ADS gRPC server, served when --xds-tls-cert/--xds-tls-key are given.
    #[arg(long, default_value = "0.0.0.0:15012")]
    xds_tls_address: SocketAddr,
    /// PEM certificate chain of the TLS ADS server (reloaded when the file changes).
    #[arg(long, requires = "xds_tls_key")]
    xds_tls_cert: Option<PathBuf>,
    /// PEM private key of the TLS ADS server (reloaded when the file changes).
    #[arg(long, requires = "xds_tls_cert")]
    xds_tls_key: Option<PathBuf>,
    /// PEM CA bundle: require client certificates it issued (mTLS). A client's SPIFFE identity
    /// (spiffe://TRUST_DOMAIN/ns/NS/sa/SA) must then match the namespace of its node id.
    #[arg(long, requires = "xds_tls_cert")]
    xds_client_ca: Option<PathBuf>,
    /// How often the TLS certificate and key files are checked for changes.
    #[arg(long, default_value = "5s", value_parser = parse_duration_arg)]
    tls_reload_interval: Duration,
    /// At start, how long to wait for the xDS TLS files (--xds-tls-cert, --xds-tls-key, --xds-client-ca)
    /// to appear: istio-agent in meshfed's pod writes the mesh certificate shortly after it starts. 0: do
    /// not wait. Files that exist but do not parse are an error at once.
    #[arg(long, default_value = "120s", value_parser = parse_duration_arg)]
    tls_wait: Duration,
    /// Largest xDS request accepted, in bytes; larger ones end their stream with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = meshfed::xds::limits::DEFAULT_MAX_MESSAGE_SIZE)]
    max_message_size: usize,
    /// xDS connections served at once (per listener); streams of further connections get
    /// RESOURCE_EXHAUSTED. 0: no limit.
    #[arg(long, default_value_t = meshfed::xds::limits::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Concurrent streams per xDS connection, advertised as HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS and
    /// enforced: one ADS stream per proxy, or beside istiod one EDS stream per federated service. 0: no limit.
    #[arg(long, default_value_t = meshfed::xds::limits::DEFAULT_MAX_STREAMS_PER_CONNECTION)]
    max_streams_per_connection: u32,
    /// Sustained xDS requests per second per stream of a connection (a connection with n streams may
    /// send n times as many); a request over it (and --max-request-burst) ends its stream with
    /// RESOURCE_EXHAUSTED. 0: no limit.
    #[arg(long, default_value_t = meshfed::xds::limits::DEFAULT_REQUEST_RATE)]
    max_request_rate: u32,
    /// Requests per stream a connection may send at once above --max-request-rate.
    #[arg(long, default_value_t = meshfed::xds::limits::DEFAULT_REQUEST_BURST)]
    max_request_burst: u32,
    /// On SIGTERM: how long connections get to close after GOAWAY before meshfed exits.
    #[arg(long, default_value = "10s", value_parser = parse_duration_arg)]
    drain_timeout: Duration,
    /// An xDS connection quiet this long gets an HTTP/2 PING (istiod's --keepaliveInterval). 0s: never.
    #[arg(long, default_value = "30s", value_parser = parse_duration_arg)]
    keepalive_interval: Duration,
    /// A PING not answered this long closes the connection (istiod's --keepaliveTimeout).
    #[arg(long, default_value = "10s", value_parser = parse_duration_arg)]
    keepalive_timeout: Duration,
    /// Address of the debug HTTP server (/healthz, /ready, /debug/...).
    #[arg(long, default_value = "127.0.0.1:15014")]
    debug_address: SocketAddr,
    /// Serve only `GET /global/health?cluster=ID[&host=FQDN]` here, without a token, for global DNS
    /// health checks (Route 53, Azure Traffic Manager): 200 while the cluster should receive traffic.
    #[arg(long)]
    global_health_address: Option<SocketAddr>,
    /// Allow the debug server on a non-loopback address; it then needs --debug-tls-cert/--debug-tls-key
    /// or --debug-token-file (or both).
    #[arg(long)]
    debug_expose: bool,
    /// PEM certificate chain: serve the debug server over HTTPS (reloaded when the file changes).
    #[arg(long, requires = "debug_tls_key")]
    debug_tls_cert: Option<PathBuf>,
    /// PEM private key of the debug server.
    #[arg(long, requires = "debug_tls_cert")]
    debug_tls_key: Option<PathBuf>,
    /// File holding a bearer token every debug request (but /healthz and /ready) must present
    /// (`Authorization: Bearer TOKEN`).
    #[arg(long)]
    debug_token_file: Option<PathBuf>,
    /// Accept kubeconfigs (files and remote secrets) whose users run a command (`exec`, e.g. `aws eks
    /// get-token`, `kubelogin`) or an `auth-provider` plugin; refused by default, as in Istio. Same as
    /// `allowExecAuth: true` in the mesh config.
    #[arg(long)]
    allow_exec_auth: bool,
}

#[derive(clap::Args)]
struct BootstrapArgs {
    /// Istio node id: TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local (TYPE sidecar or router)
    #[arg(long)]
    node_id: String,
    /// meshfed's ADS address
    #[arg(long, default_value = bootstrap::DEFAULT_XDS_ADDRESS)]
    xds_address: String,
    /// Use Delta xDS (DELTA_GRPC) instead of state-of-the-world (GRPC)
    #[arg(long)]
    delta: bool,
    /// Envoy admin port (on 127.0.0.1)
    #[arg(long, default_value_t = bootstrap::DEFAULT_ADMIN_PORT)]
    admin_port: u16,
    /// Node metadata CLUSTER_ID
    #[arg(long)]
    cluster_id: Option<String>,
    /// Node metadata NETWORK
    #[arg(long)]
    network: Option<String>,
    /// REGION/ZONE[/SUBZONE]
    #[arg(long)]
    locality: Option<String>,
    /// NONE: outbound listeners bind on the node id's IP; REDIRECT: iptables capture, as in Istio
    #[arg(long, value_enum, default_value = "NONE")]
    interception_mode: InterceptionMode,
    /// Router node ids: sni-dnat for an east-west gateway (node metadata ROUTER_MODE, as Istio's
    /// east-west gateways set it); standard (Istio's default when unset) for an ingress gateway
    #[arg(long, value_enum)]
    router_mode: Option<meshfed::proxy::RouterMode>,
    /// Workload labels (node metadata LABELS), KEY=VALUE, repeatable
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// PEM certificate chain of the workload's mesh identity (static secret `default`; with
    /// --tls-key and --tls-root-cert: mesh mTLS as Istio's agent would provide it)
    #[arg(long, requires_all = ["tls_key", "tls_root_cert"])]
    tls_cert: Option<PathBuf>,
    /// PEM private key of the workload's mesh identity
    #[arg(long, requires_all = ["tls_cert", "tls_root_cert"])]
    tls_key: Option<PathBuf>,
    /// PEM root certificate of the mesh (static secret `ROOTCA`)
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_root_cert: Option<PathBuf>,
    /// Where the workload listens for inbound mTLS traffic the sidecar terminates (default 127.0.0.1)
    #[arg(long)]
    inbound_address: Option<std::net::IpAddr>,
    /// PEM CA bundle that issued meshfed's xDS server certificate: connect to meshfed over TLS
    #[arg(long)]
    xds_tls_ca: Option<PathBuf>,
    /// PEM certificate chain Envoy presents to meshfed (mTLS; with --xds-tls-client-key)
    #[arg(long, requires_all = ["xds_tls_ca", "xds_tls_client_key"])]
    xds_tls_client_cert: Option<PathBuf>,
    /// PEM private key of --xds-tls-client-cert
    #[arg(long, requires_all = ["xds_tls_ca", "xds_tls_client_cert"])]
    xds_tls_client_key: Option<PathBuf>,
    /// SNI sent to meshfed, and the DNS name its certificate must carry (default: the --xds-address
    /// host name; for an IP address, no SNI and the certificate must carry that IP)
    #[arg(long, requires = "xds_tls_ca")]
    xds_sni: Option<String>,
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    meshfed::duration::parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration such as 10s or 500ms"))
}

/// The debug server's protection when it is exposed (a token and/or TLS), checked before anything starts.
fn debug_access(args: &ServeArgs) -> Result<meshfed::debug::DebugAccess> {
    let mut access = meshfed::debug::DebugAccess::default();
    if let Some(path) = &args.debug_token_file {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("reading the debug token file {}", path.display()))?;
        let token = token.trim();
        if token.len() < 16 {
            bail!("the debug token in {} is shorter than 16 characters", path.display());
        }
        access.token = Some(token.into());
    }
    if let (Some(cert), Some(key)) = (&args.debug_tls_cert, &args.debug_tls_key) {
        let cert = Arc::new(meshfed::tls::ReloadingCert::load(cert, key, meshfed::tls::provider())?);
        meshfed::tls::watch_files(cert.clone(), args.tls_reload_interval, "debug");
        let tls = meshfed::tls::ServerTls { cert, client_ca: None, alpn: vec![b"http/1.1".to_vec()] };
        access.tls = Some(tls.server_config()?);
    }
    if !args.debug_address.ip().is_loopback() {
        if !args.debug_expose {
            bail!(
                "--debug-address {} is not a loopback address; pass --debug-expose (with --debug-tls-cert/--debug-tls-key or --debug-token-file) to bind it",
                args.debug_address
            );
        }
        if access.token.is_none() && access.tls.is_none() {
            bail!(
                "--debug-expose: the debug server on {} needs TLS (--debug-tls-cert/--debug-tls-key) or a bearer token (--debug-token-file)",
                args.debug_address
            );
        }
    }
    Ok(access)
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Waits until every one of `files` exists, at most `limit`, logging what it waits for.
async fn wait_for_files(files: &[&std::path::Path], limit: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut logged = false;
    loop {
        let missing: Vec<&&std::path::Path> = files.iter().filter(|f| !f.exists()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "TLS file {} does not exist (waited {limit:?}, --tls-wait): is the mesh certificate volume mounted, \
                 and does istio-agent write it (OUTPUT_CERTS)?",
                missing[0].display()
            );
        }
        if !logged {
            warn!(file = %missing[0].display(), wait = ?limit, "waiting for the TLS files (istio-agent writes the mesh certificate)");
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    if args.no_plaintext_xds && args.xds_tls_cert.is_none() {
        bail!("--no-plaintext-xds needs --xds-tls-cert and --xds-tls-key: there would be no xDS listener");
    }
    let access = debug_access(&args)?;
    // TLS files are checked before anything starts: a bad certificate, key or CA is fatal at start; files
    // not written yet are waited for (--tls-wait)
    let mut mesh_certificate = None;
    let xds_tls_config = match (&args.xds_tls_cert, &args.xds_tls_key) {
        (Some(cert), Some(key)) => {
            let files: Vec<&std::path::Path> =
                [Some(cert.as_path()), Some(key.as_path()), args.xds_client_ca.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect();
            wait_for_files(&files, args.tls_wait).await?;
            let cert = Arc::new(meshfed::tls::ReloadingCert::load(cert, key, meshfed::tls::provider())?);
            meshfed::tls::watch_files(cert.clone(), args.tls_reload_interval, "xds");
            // the mesh certificate (istio-agent's, OUTPUT_CERTS) also serves the gateway probes' mTLS stage
            mesh_certificate =
                Some(meshfed::tls::MeshCertificate { cert: cert.clone(), root: args.xds_client_ca.clone() });
            let tls =
                meshfed::tls::ServerTls { cert, client_ca: args.xds_client_ca.clone(), alpn: vec![b"h2".to_vec()] };
            Some(tls.server_config()?)
        }
        _ => None,
    };
    if !args.keepalive_interval.is_zero() && args.keepalive_timeout.is_zero() {
        bail!(
            "--keepalive-timeout 0s would close every connection at its first keepalive PING; give it time to answer"
        );
    }
    let limits = meshfed::xds::limits::Limits {
        max_message_size: args.max_message_size,
        max_connections: args.max_connections,
        max_streams_per_connection: args.max_streams_per_connection,
        request_rate: args.max_request_rate,
        request_burst: args.max_request_burst,
        drain_timeout: args.drain_timeout,
        keepalive_interval: args.keepalive_interval,
        keepalive_timeout: args.keepalive_timeout,
        ..Default::default()
    };
    let demo = args.mesh_config.is_none();
    let path = match args.mesh_config {
        Some(p) => p,
        None => {
            let path = meshfed::demo::mesh_config_path(&std::env::temp_dir().join("meshfed-demo"))?;
            tracing::warn!(
                config = %path.display(),
                "NO --mesh-config: SERVING THE BUILT-IN DEMO TOPOLOGY (two clouds on loopback addresses), not your \
                 clusters. In production, mount the mesh config and pass --mesh-config (or MESHFED_MESH_CONFIG)"
            );
            path
        }
    };
    let mesh = MeshConfig::load(&path)?;
    info!(config = %path.display(), clusters = mesh.clusters.len(), "mesh config loaded");
    // the gateway probes' own certificate files, if any, may be written by istio-agent too
    if let Some(m) = mesh.gateway_probes.as_ref().and_then(|g| g.mtls.as_ref()) {
        let files: Vec<&std::path::Path> =
            m.cert.iter().flat_map(|(c, k)| [c.as_path(), k.as_path()]).chain(m.ca.as_deref()).collect();
        wait_for_files(&files, args.tls_wait).await?;
    }

    let mut xds = Vec::new();
    if !args.no_plaintext_xds {
        let options = ServeOptions { limits: limits.clone(), ..Default::default() };
        xds.push(XdsListener { listen: Listen::Address(args.xds_address), options });
    }
    if let Some(config) = xds_tls_config {
        let tls = meshfed::xds::server::TlsOptions { config, trust_domain: mesh.trust_domain.as_str().into() };
        let options = ServeOptions { limits: limits.clone(), tls: Some(tls), ..Default::default() };
        xds.push(XdsListener { listen: Listen::Address(args.xds_tls_address), options });
    }
    let options = Options {
        mesh,
        sources: Sources::Mesh { allow_exec_auth: args.allow_exec_auth },
        xds,
        debug: Some(DebugListener { listen: Listen::Address(args.debug_address), access, demo }),
        gateway_dns_interval: Some(meshfed::gateway_dns::DEFAULT_INTERVAL),
        mesh_certificate,
        global_health: args.global_health_address.map(Listen::Address),
        // edits of the mesh config apply live (not the built-in demo's)
        watch_mesh_config: !demo,
    };
    let app = App::start(options).await?;

    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("interrupted, shutting down"),
        _ = terminate() => info!("terminated, shutting down"),
    }
    // The xDS servers stop accepting, send GOAWAY, end their streams and wait up to --drain-timeout for
    // the connections to close.
    app.shutdown(args.drain_timeout).await;
    Ok(())
}

async fn terminate() {
    #[cfg(unix)]
    {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
            return;
        }
    }
    std::future::pending::<()>().await
}

fn bootstrap_cmd(args: BootstrapArgs) -> Result<()> {
    let opts = BootstrapOptions {
        node_id: args.node_id,
        xds_address: args.xds_address,
        delta: args.delta,
        admin_port: args.admin_port,
        cluster_id: args.cluster_id,
        network: args.network,
        locality: args.locality,
        interception_mode: args.interception_mode,
        router_mode: args.router_mode,
        labels: args.labels.into_iter().collect::<BTreeMap<_, _>>(),
        tls: match (args.tls_cert, args.tls_key, args.tls_root_cert) {
            (Some(cert_chain), Some(private_key), Some(root_cert)) => {
                Some(bootstrap::TlsFiles { cert_chain, private_key, root_cert })
            }
            _ => None,
        },
        inbound_address: args.inbound_address,
        xds_tls: args.xds_tls_ca.map(|ca| bootstrap::XdsTls {
            ca,
            client_cert: args.xds_tls_client_cert.zip(args.xds_tls_client_key),
            sni: args.xds_sni,
        }),
    };
    print!("{}", bootstrap::render(&opts)?);
    Ok(())
}

fn istio_cmd(args: meshfed::istio::IstioArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let out = runtime.block_on(meshfed::istio::run(&args))?;
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    for n in &out.notes {
        eprintln!("note: {n}");
    }
    for a in &out.applied {
        eprintln!("applied {} (resourceVersion {})", a.object, a.resource_version.as_deref().unwrap_or("?"));
    }
    print!("{}", out.text);
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or_else(|| Cli::parse_from(["meshfed", "serve"]).command.expect("serve")) {
        Command::Bootstrap(args) => bootstrap_cmd(args),
        Command::Istio(args) => istio_cmd(args),
        Command::Traffic(args) => {
            meshfed::traffic_policy::cli::run(&args).map(|out| print!("{out}")).map_err(Into::into)
        }
        Command::Serve(args) => {
            tokio::runtime::Runtime::new().context("starting the runtime").and_then(|rt| rt.block_on(serve(args)))
        }
    };
    if let Err(e) = result {
        error!("{e:#}");
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
