//! Soak: the meshfed binary under endpoint churn while scripted ADS clients (half SotW, half Delta)
//! connect, get their configuration, follow pushes for 1-3 s, and reconnect, for `MESHFED_SOAK_SECS`
//! (default 60 s, as CI runs it; `scripts/soak.sh` runs 10 minutes). Then every client leaves and the
//! churn stops, and:
//!
//! - no client saw an error: every session got its first response (within the scripted clients'
//!   generous bound, see below), no stream was ended by the server, no proxy NACKed anything
//!   (`pilot_total_xds_rejects`), no client was refused by a limit (`meshfed_xds_refused_total`), and
//!   meshfed logged no error;
//! - meshfed's connections return to none (`/debug/adsz`), its tasks (`meshfed_tasks`) to their count
//!   before any client came, and its open file descriptors to their baseline;
//! - its resident memory returns to within 10 % of the baseline measured after a warm-up round of the same
//!   load (so allocator arenas and caches are at their working size); memory is read from
//!   `/proc/PID/status` (VmRSS).
//!
//! The time to a session's first response is not bounded by its hold time: on a loaded 2-core machine a
//! debug build of meshfed can take seconds to translate for 40 new proxies at once (the first round), and
//! that is slowness, not an error. It is bounded by `support::ads::TIMEOUT` and the slowest is reported.
//! Everything is bounded: the soak loop by its duration, every wait by [`SETTLE`].

use meshfed_testkit as support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use support::ads::{Session, hold_subscription};
use support::{Meshfed, poll_until, start_meshfed};
use tokio::time::Instant;

const OCTET: u8 = 120;
/// Clients connected at any time.
const CLIENTS: usize = 40;
/// Bound on every wait for meshfed to settle (more than the 30 s after which meshfed forgets a closed
/// connection's admission timer, see `xds::limits::DEFAULT_ADMISSION_TIMEOUT`).
const SETTLE: Duration = Duration::from_secs(90);
/// Tasks meshfed may have beyond its baseline once quiet (the debug server's connection answering).
const TASK_SLACK: i64 = 4;
const WARMUP: Duration = Duration::from_secs(6);

fn soak_duration() -> Duration {
    let secs = std::env::var("MESHFED_SOAK_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60u64);
    Duration::from_secs(secs)
}

fn proc_status(pid: u32, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line =
        text.lines().find(|l| l.starts_with(field)).ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))?;
    Ok(line.split_whitespace().nth(1).ok_or_else(|| anyhow!("bad line {line:?}"))?.parse()?)
}

fn rss_kib(pid: u32) -> Result<u64> {
    proc_status(pid, "VmRSS:")
}

fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

async fn connections(meshfed: &Meshfed) -> Result<usize> {
    let adsz = meshfed.debug_json("/debug/adsz").await?;
    Ok(adsz["connections"].as_array().map(Vec::len).unwrap_or(0))
}

/// meshfed's `/metrics`: the sum of the samples of `name` (every label set); None if there is none (a
/// labelled family is exported once something was counted in it, e.g. `pilot_total_xds_rejects`).
async fn metric(meshfed: &Meshfed, name: &str) -> Result<Option<i64>> {
    let (status, text) = meshfed.debug_get("/metrics").await?;
    ensure!(status == 200, "/metrics: {status}");
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        if series == name || series.strip_prefix(name).is_some_and(|r| r.starts_with('{')) {
            *sum.get_or_insert(0.0) += value.parse::<f64>()?;
        }
    }
    Ok(sum.map(|v: f64| v as i64))
}

/// A metric meshfed always exports.
async fn exported(meshfed: &Meshfed, name: &str) -> Result<i64> {
    metric(meshfed, name).await?.ok_or_else(|| anyhow!("no {name} in /metrics"))
}

/// meshfed's log lines at level ERROR.
fn logged_errors(meshfed: &Meshfed) -> Vec<String> {
    let log = meshfed.guard.stdout() + &meshfed.guard.stderr();
    log.lines().filter(|l| l.contains(" ERROR ")).map(str::to_string).collect()
}

/// Rewrites aws-use1's EndpointSlices with endpoint `i` of `service` ready or not.
fn flap(slices: &Path, original: &str, service: &str, i: usize, ready: bool) -> Result<()> {
    let mut docs: Vec<serde_yaml::Value> = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(original) {
        docs.push(serde::Deserialize::deserialize(doc)?);
    }
    let slice = docs
        .iter_mut()
        .find(|d| d["metadata"]["labels"]["kubernetes.io/service-name"].as_str() == Some(service))
        .ok_or_else(|| anyhow!("no {service} slice"))?;
    let n = slice["endpoints"].as_sequence().map(Vec::len).unwrap_or(0);
    ensure!(n > 0, "{service} has no endpoints");
    slice["endpoints"][i % n]["conditions"]["ready"] = ready.into();
    let text = docs.iter().map(serde_yaml::to_string).collect::<Result<Vec<_>, _>>()?.join("---\n");
    support::write_atomically(slices, &text)
}

#[derive(Default)]
struct Tally {
    sessions: AtomicU64,
    responses: AtomicU64,
    errors: AtomicU64,
    /// the slowest first response, ms
    slowest_first_ms: AtomicU64,
}

/// Runs churn and client sessions until `until`. Every session connects, gets its first response,
/// follows pushes for 1-3 s, and leaves.
async fn load(meshfed: &Meshfed, slices: &Path, original: &str, until: Instant, tally: Arc<Tally>) {
    let addr = meshfed.xds_address();
    let stop = Arc::new(AtomicBool::new(false));
    let churn = tokio::spawn({
        let (slices, original, stop) = (slices.to_path_buf(), original.to_string(), stop.clone());
        async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let service = ["reviews", "ratings", "frontend"][n % 3];
                if let Err(e) = flap(&slices, &original, service, n / 3, n.is_multiple_of(2)) {
                    eprintln!("churn: {e:#}");
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            // back to the original state
            let _ = support::write_atomically(&slices, &original);
        }
    });
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let tally = tally.clone();
        clients.push(tokio::spawn(async move {
            let mut round = 0u64;
            while Instant::now() < until {
                let hold = Duration::from_millis(1000 + (c as u64 * 131 + round * 557) % 2000);
                let delta = (c + round as usize) % 2 == 1;
                let pod = format!("soak-{c}-{round}");
                let ns = if c % 5 == 0 { "istio-system" } else { "shop" };
                let kind = if ns == "istio-system" { "router" } else { "sidecar" };
                let node = format!("{kind}~127.{OCTET}.50.{}~{pod}.{ns}~{ns}.svc.cluster.local", c + 1);
                match hold_subscription(addr, &node, delta, hold).await {
                    Ok(Session { responses, first_response }) => {
                        tally.responses.fetch_add(responses, Ordering::Relaxed);
                        tally.slowest_first_ms.fetch_max(first_response.as_millis() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("{node}: {e:#}");
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tally.sessions.fetch_add(1, Ordering::Relaxed);
                round += 1;
            }
        }));
    }
    for c in clients {
        let _ = c.await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = churn.await;
}

/// What meshfed looks like at rest.
#[derive(Clone, Copy, Debug)]
struct AtRest {
    rss_kib: u64,
    fds: usize,
    tasks: i64,
}

/// Waits until meshfed has no connections; then the lowest RSS of a few readings (the last push and the
/// freed streams settling), its open fds and its tasks.
async fn quiesce(meshfed: &Meshfed, pid: u32) -> Result<AtRest> {
    poll_until(SETTLE, || async {
        let n = connections(meshfed).await?;
        ensure!(n == 0, "{n} connections left");
        Ok(())
    })
    .await?;
    let mut rss = u64::MAX;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        rss = rss.min(rss_kib(pid)?);
    }
    Ok(AtRest { rss_kib: rss, fds: open_fds(pid)?, tasks: exported(meshfed, "meshfed_tasks").await? })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_and_reconnects_leave_no_residue() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = meshfed_testkit::server::copy_demo(dir.path(), OCTET);
    let slices = dir.path().join("aws-use1/endpointslices.yaml");
    let original = std::fs::read_to_string(&slices).unwrap();
    let meshfed = start_meshfed(&mesh).await.expect("meshfed");
    let pid = meshfed.guard.id().expect("running");

    // tasks before any client: the long-lived ones (push loop, sources, listeners, debug server)
    let start = quiesce(&meshfed, pid).await.expect("meshfed at rest after its start");
    // warm-up: the same load, briefly; then the memory baseline
    let warm = Arc::new(Tally::default());
    load(&meshfed, &slices, &original, Instant::now() + WARMUP, warm.clone()).await;
    let base = quiesce(&meshfed, pid).await.expect("meshfed settles after the warm-up");
    eprintln!(
        "baseline: RSS {} KiB, {} fds, {} tasks at start ({} warm-up sessions, {} errors, slowest first response {} ms)",
        base.rss_kib,
        base.fds,
        start.tasks,
        warm.sessions.load(Ordering::Relaxed),
        warm.errors.load(Ordering::Relaxed),
        warm.slowest_first_ms.load(Ordering::Relaxed),
    );

    let duration = soak_duration();
    let tally = Arc::new(Tally::default());
    let mut peak = base.rss_kib;
    let mut peak_tasks = start.tasks;
    {
        let until = Instant::now() + duration;
        let run = load(&meshfed, &slices, &original, until, tally.clone());
        tokio::pin!(run);
        loop {
            tokio::select! {
                _ = &mut run => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    peak = peak.max(rss_kib(pid).unwrap_or(0));
                    peak_tasks = peak_tasks.max(exported(&meshfed, "meshfed_tasks").await.unwrap_or(0));
                }
            }
        }
    }
    let (sessions, responses, errors) = (
        tally.sessions.load(Ordering::Relaxed),
        tally.responses.load(Ordering::Relaxed),
        tally.errors.load(Ordering::Relaxed),
    );
    eprintln!(
        "soak: {duration:?}, {sessions} sessions, {responses} responses, {errors} errors, slowest first response \
         {} ms, peak RSS {peak} KiB, peak tasks {peak_tasks}",
        tally.slowest_first_ms.load(Ordering::Relaxed)
    );
    assert_eq!(errors + warm.errors.load(Ordering::Relaxed), 0, "client sessions failed");
    assert!(sessions >= CLIENTS as u64, "only {sessions} sessions");
    assert_eq!(metric(&meshfed, "pilot_total_xds_rejects").await.unwrap().unwrap_or(0), 0, "NACKs");
    assert_eq!(exported(&meshfed, "meshfed_xds_refused_total").await.unwrap(), 0, "clients refused by a limit");

    // every connection gone; tasks, memory and descriptors back to their baselines
    let limit = base.rss_kib + base.rss_kib / 10;
    let settled = poll_until(SETTLE, || async {
        let now = quiesce(&meshfed, pid).await?;
        ensure!(now.fds <= base.fds + 2, "{} open fds, baseline {}", now.fds, base.fds);
        ensure!(now.tasks <= start.tasks + TASK_SLACK, "{} tasks, {} at start", now.tasks, start.tasks);
        ensure!(now.rss_kib <= limit, "RSS {} KiB, baseline {} KiB (+10 % = {limit})", now.rss_kib, base.rss_kib);
        Ok(now)
    })
    .await
    .unwrap_or_else(|e| panic!("meshfed did not return to its baseline: {e:#}"));
    eprintln!("after: RSS {} KiB, {} fds, {} tasks", settled.rss_kib, settled.fds, settled.tasks);
    let errors = logged_errors(&meshfed);
    assert!(errors.is_empty(), "meshfed logged errors:\n{}", errors.join("\n"));
    assert!(meshfed.guard.id().is_some());
}
