//! Drills (`meshfed traffic drill`) with `meshfed serve` as a child process and the testkit's ADS client as
//! an AWS sidecar in us-east-1 that ACKs what it gets: a drill on azure-weu ramping 50% every second
//! takes azure-weu's share of ratings away in two steps, each reported on `/debug/drillz` with the time
//! every connected proxy had ACKed its EDS; then every aws-use1 endpoint goes not ready (the cluster taking
//! the drained traffic): the drill aborts by itself in that push, azure-weu's share returns, and the
//! report, `/debug/trafficz` and the metrics say so; `meshfed traffic drill --abort` removes it from the file.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use meshfed::type_url;
use meshfed_testkit::ads::{AdsClient, Flavor};
use meshfed_testkit::eds_shares::{RegionShares, eds_until, region_shares};
use meshfed_testkit::fixtures::{AWS_SIDECAR, RATINGS_SPLIT};
use meshfed_testkit::meshfed::{Meshfed, start_meshfed, traffic_cmd};

const OCTET: u8 = 137;
const RATINGS: &str = "outbound|9080||ratings.shop.svc.cluster.local";
const TIMEOUT: Duration = Duration::from_secs(20);
const QUIET: Duration = Duration::from_millis(400);

/// Polls `/debug/drillz` until its first drill satisfies `ok`.
async fn drill_until(m: &Meshfed, what: &str, ok: impl Fn(&serde_json::Value) -> bool) -> Result<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let v = m.debug_json("/debug/drillz").await?;
        let d = v["drills"][0].clone();
        if ok(&d) {
            return Ok(d);
        }
        ensure!(tokio::time::Instant::now() < deadline, "{what}: /debug/drillz is {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn west(s: &RegionShares) -> u32 {
    s.get("westeurope").copied().unwrap_or(0)
}

#[tokio::test]
async fn a_drill_ramps_reports_its_acked_steps_and_aborts_when_its_receivers_fail() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("meshfed-drills-").tempdir()?;
    let mesh_path = meshfed_testkit::demo::copy_demo(dir.path(), OCTET);
    let mesh_file = mesh_path.to_str().context("utf-8 path")?.to_string();
    let original = std::fs::read_to_string(&mesh_path)?;
    meshfed_testkit::write_atomically(&mesh_path, &format!("{original}{RATINGS_SPLIT}"))?;
    let m = start_meshfed(&mesh_path).await?;
    let id = format!("sidecar~127.{OCTET}.50.1~client-1.shop~shop.svc.cluster.local");
    let node = meshfed_testkit::fixtures::node(&id, &AWS_SIDECAR, Some(("us-east-1", "us-east-1a")));
    let mut c = AdsClient::connect(m.xds_address(), Flavor::Sotw, node).await?.with_timeouts(TIMEOUT, QUIET);
    c.subscribe_and_ack::<&str>(type_url::CLUSTER, &[]).await?;
    let eds = c.subscribe_and_ack(type_url::ENDPOINT, &[RATINGS]).await?;
    assert_eq!(west(&region_shares(&eds.decode::<ClusterLoadAssignment>(RATINGS)?)), 30);

    // the drill: 50% a second down to 0, reverting after 10 minutes, aborting below 50% healthy
    let out = traffic_cmd(&[
        "drill",
        "--cluster",
        "azure-weu",
        "--duration",
        "10m",
        "--ramp-step",
        "50",
        "--ramp-every",
        "1s",
        "--abort-below-healthy",
        "50",
        "--mesh-config",
        &mesh_file,
    ])?;
    assert!(out.contains("azure-weu") && out.contains("/debug/drillz"), "{out}");
    let file = std::fs::read_to_string(&mesh_path)?;
    assert!(file.contains("abortBelowHealthy: 50") && file.contains("start:"), "{file}");
    let seen = eds_until(&mut c, RATINGS, "the drill's last step", |s| west(s) == 0).await?;
    assert!(seen.iter().any(|s| west(s) == 15), "the 50% step first: {seen:?}");
    // both steps reported, each ACKed by the one proxy connected
    let d = drill_until(&m, "two ACKed steps", |d| {
        let steps = d["stepAcks"].as_array().cloned().unwrap_or_default();
        steps.len() == 2 && steps.iter().all(|s| s["acks"]["allAckedAt"].is_string())
    })
    .await?;
    let steps = d["stepAcks"].as_array().context("steps")?;
    assert_eq!((steps[0]["capacity"].as_u64(), steps[1]["capacity"].as_u64()), (Some(50), Some(0)), "{d:#}");
    for s in steps {
        assert_eq!(s["acks"]["proxies"], 1, "{s}");
        assert!(s["acks"]["ackSeconds"].as_f64().is_some_and(|t| (0.0..10.0).contains(&t)), "{s}");
        assert!(s["generation"].as_u64().is_some_and(|g| g > 0), "{s}");
    }
    assert_eq!(d["active"], true, "{d:#}");
    let (_, metrics) = m.debug_get("/metrics").await?;
    assert!(metrics.contains("meshfed_drill_active{cluster=\"azure-weu\"} 1"), "{metrics}");
    assert!(metrics.contains("meshfed_drill_step_ack_seconds{cluster=\"azure-weu\"}"), "{metrics}");

    // every aws-use1 endpoint not ready: the cluster taking azure-weu's traffic is below 50%
    let slices = dir.path().join("aws-use1/endpointslices.yaml");
    let text = std::fs::read_to_string(&slices)?.replace("ready: true", "ready: false");
    meshfed_testkit::write_atomically(&slices, &text)?;
    eds_until(&mut c, RATINGS, "azure-weu's share back", |s| west(s) > 0).await?;
    let d = drill_until(&m, "the abort", |d| d["aborted"].is_object()).await?;
    let reason = d["aborted"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("aws-use1") && reason.contains("abortBelowHealthy 50%"), "{d:#}");
    assert_eq!(d["active"], false);
    let last = d["stepAcks"].as_array().and_then(|s| s.last()).cloned().context("a last step")?;
    assert_eq!(last["capacity"], 100, "the abort is a step back to 100%: {d:#}");
    let trafficz = m.debug_json("/debug/trafficz").await?;
    assert!(trafficz["drills"][0]["aborted"].is_object(), "{trafficz:#}");
    let (_, metrics) = m.debug_get("/metrics").await?;
    assert!(metrics.contains("meshfed_drill_aborts_total{cluster=\"azure-weu\"} 1"), "{metrics}");
    assert!(metrics.contains("meshfed_drill_active{cluster=\"azure-weu\"} 0"), "{metrics}");

    // the operator removes it
    traffic_cmd(&["drill", "--abort", "--cluster", "azure-weu", "--mesh-config", &mesh_file])?;
    let file = std::fs::read_to_string(&mesh_path)?;
    assert!(!file.contains("abortBelowHealthy"), "{file}");
    Ok(())
}
