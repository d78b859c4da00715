//! `meshfed-load`: the load generator and benchmark harness. See BENCHMARKS.md and the library of this crate.
//!
//! - `meshfed-load bench ...`: runs a scenario against a server it starts as a child process and prints
//!   `RESULT {json}` lines.
//! - `meshfed-load serve|floor ...`: the server processes `bench` starts (meshfed's pipeline, the floor).
//! - `meshfed-load gen --size S DIR`: writes a generated topology as a mesh config and manifests.

use anyhow::Result;
use clap::{Parser, Subcommand};
use meshfed_load::bench::{self, BenchArgs};
use meshfed_load::topo::{Size, Topology};

/// The same allocator as `meshfed serve` (the benchmark server runs in this binary).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
/// jemalloc's options ([`meshfed::heap::MALLOC_CONF`]), read by jemalloc at its start.
#[cfg(feature = "jemalloc")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8] = meshfed::heap::MALLOC_CONF;

#[derive(Parser)]
#[command(name = "meshfed-load", about = "load generator and benchmarks for meshfed")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run benchmark steps against a server started for the run.
    Bench(Box<BenchArgs>),
    /// meshfed's pipeline on a generated topology, changes over a control socket (started by `bench`).
    Serve {
        #[arg(long, default_value = "S", value_parser = parse_size)]
        size: Size,
        #[arg(long, default_value = "0ms")]
        debounce_quiet: String,
        #[arg(long, default_value = "0ms")]
        debounce_max: String,
        /// the xDS listener's limits
        #[arg(long, value_enum, default_value = "unlimited")]
        limits: bench::ServerLimits,
        /// seconds a keepalive PING may go unanswered before the connection is closed (meshfed's default:
        /// 10, istiod's)
        #[arg(long, default_value_t = 10)]
        keepalive_timeout: u64,
    },
    /// The floor server (started by `bench`).
    Floor {
        #[arg(long, default_value = "S", value_parser = parse_size)]
        size: Size,
        /// write responses as chunks referencing the shared resource bytes (not through tonic's encoder)
        #[arg(long)]
        zero_copy: bool,
        /// seconds a keepalive PING may go unanswered (as `serve --keepalive-timeout`)
        #[arg(long, default_value_t = 10)]
        keepalive_timeout: u64,
    },
    /// Write a generated topology (mesh.yaml and manifests) to DIR.
    Gen {
        #[arg(long, default_value = "S", value_parser = parse_size)]
        size: Size,
        #[arg(long, default_value = "100ms")]
        debounce_quiet: String,
        #[arg(long, default_value = "1s")]
        debounce_max: String,
        dir: std::path::PathBuf,
    },
}

fn parse_size(s: &str) -> Result<Size, String> {
    Size::parse(s).ok_or_else(|| format!("{s:?}: expected S, L or SERVICESxENDPOINTS"))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Bench(args) => {
            eprintln!("meshfed-load: {}", bench::environment());
            rt.block_on(bench::run(*args))?;
        }
        Command::Serve { size, debounce_quiet, debounce_max, limits, keepalive_timeout } => {
            let limits = meshfed::xds::limits::Limits {
                keepalive_timeout: std::time::Duration::from_secs(keepalive_timeout.max(1)),
                ..limits.limits()
            };
            rt.block_on(meshfed_load::server::serve_meshfed(size, &debounce_quiet, &debounce_max, limits))?
        }
        Command::Floor { size, zero_copy, keepalive_timeout } => {
            let keepalive_timeout = std::time::Duration::from_secs(keepalive_timeout.max(1));
            rt.block_on(meshfed_load::floor::serve_floor(size, zero_copy, keepalive_timeout))?
        }
        Command::Gen { size, debounce_quiet, debounce_max, dir } => {
            let mesh = Topology::new(size).write_files(&dir, &debounce_quiet, &debounce_max)?;
            println!("{}", mesh.display());
        }
    }
    Ok(())
}
