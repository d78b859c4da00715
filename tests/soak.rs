//! Soak: the meshfed binary under endpoint churn while scripted ADS clients (half SotW, half Delta)
//! connect, follow pushes for a while, and reconnect, for `MESHFED_SOAK_SECS` (default 60 s, as CI runs
//! it; `scripts/soak.sh` runs 10 minutes). Then every client leaves and the churn stops, and:
//!
//! - no client saw an error (every stream got its responses, none was ended by the server) and no proxy
//!   NACKed anything;
//! - meshfed's connections return to none (`/debug/adsz`), its open file descriptors to their baseline;
//! - its resident memory returns to within 10 % of the baseline measured after the same warm-up.
//!
//! The baseline is taken after a warm-up round of the same load, so allocator arenas and caches are at
//! their working size; memory is read from `/proc/PID/status` (VmRSS). Bounded everywhere: the soak loop
//! by its duration, every wait by [`SETTLE`].

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use support::ads::hold_subscription;
use support::{Meshfed, poll_until, start_meshfed};
use tokio::time::Instant;

const OCTET: u8 = 120;
/// Clients connected at any time.
const CLIENTS: usize = 40;
/// Bound on every wait for meshfed to settle.
const SETTLE: Duration = Duration::from_secs(60);
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
}

/// Runs churn and client sessions until `until`. Every session connects, follows pushes for 1-3 s,
/// and leaves.
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
                let end = (Instant::now() + hold).min(until);
                let delta = (c + round as usize) % 2 == 1;
                let pod = format!("soak-{c}-{round}");
                let ns = if c % 5 == 0 { "istio-system" } else { "shop" };
                let kind = if ns == "istio-system" { "router" } else { "sidecar" };
                let node = format!("{kind}~127.{OCTET}.50.{}~{pod}.{ns}~{ns}.svc.cluster.local", c + 1);
                match hold_subscription(addr, &node, delta, end).await {
                    Ok(n) if n > 0 => {
                        tally.responses.fetch_add(n, Ordering::Relaxed);
                    }
                    Ok(_) => {
                        eprintln!("{node}: no response in {hold:?}");
                        tally.errors.fetch_add(1, Ordering::Relaxed);
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

/// Waits until meshfed has no connections and has applied the original files again; returns (RSS KiB,
/// open fds) once RSS stops falling.
async fn quiesce(meshfed: &Meshfed, pid: u32) -> Result<(u64, usize)> {
    poll_until(SETTLE, || async {
        let n = connections(meshfed).await?;
        ensure!(n == 0, "{n} connections left");
        Ok(())
    })
    .await?;
    // let the last push and the freed streams settle: the lowest of a few readings
    let mut rss = u64::MAX;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        rss = rss.min(rss_kib(pid)?);
    }
    Ok((rss, open_fds(pid)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "flaky on a loaded 2-core machine (client sessions time out); run with `cargo test --test soak -- --ignored`"]
async fn churn_and_reconnects_leave_no_residue() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = meshfed::testing::copy_demo(dir.path(), OCTET);
    let slices = dir.path().join("aws-use1/endpointslices.yaml");
    let original = std::fs::read_to_string(&slices).unwrap();
    let meshfed = start_meshfed(&mesh).await.expect("meshfed");
    let pid = meshfed.guard.id().expect("running");

    // warm-up: the same load, briefly; then the baseline
    let warm = Arc::new(Tally::default());
    load(&meshfed, &slices, &original, Instant::now() + WARMUP, warm.clone()).await;
    let (base_rss, base_fds) = quiesce(&meshfed, pid).await.expect("meshfed settles after the warm-up");
    eprintln!(
        "baseline: RSS {base_rss} KiB, {base_fds} fds ({} warm-up sessions)",
        warm.sessions.load(Ordering::Relaxed)
    );

    let duration = soak_duration();
    let tally = Arc::new(Tally::default());
    let mut peak = base_rss;
    let sampler = {
        let until = Instant::now() + duration;
        let run = load(&meshfed, &slices, &original, until, tally.clone());
        tokio::pin!(run);
        loop {
            tokio::select! {
                _ = &mut run => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    peak = peak.max(rss_kib(pid).unwrap_or(0));
                }
            }
        }
        peak
    };
    let (sessions, responses, errors) = (
        tally.sessions.load(Ordering::Relaxed),
        tally.responses.load(Ordering::Relaxed),
        tally.errors.load(Ordering::Relaxed),
    );
    eprintln!(
        "soak: {duration:?}, {sessions} sessions, {responses} responses, {errors} errors, peak RSS {sampler} KiB"
    );
    assert_eq!(errors, 0, "client sessions failed");
    assert!(sessions >= CLIENTS as u64, "only {sessions} sessions");
    meshfed.assert_no_nacks().await.unwrap();

    // every connection gone, memory and descriptors back to the baseline
    let limit = base_rss + base_rss / 10;
    let settled = poll_until(SETTLE, || async {
        let (rss, fds) = quiesce(&meshfed, pid).await?;
        ensure!(fds <= base_fds + 2, "{fds} open fds, baseline {base_fds}");
        ensure!(rss <= limit, "RSS {rss} KiB, baseline {base_rss} KiB (+10 % = {limit})");
        Ok((rss, fds))
    })
    .await
    .unwrap_or_else(|e| panic!("meshfed did not return to its baseline: {e:#}"));
    eprintln!("after: RSS {} KiB, {} fds", settled.0, settled.1);
    assert!(meshfed.guard.id().is_some());
}
