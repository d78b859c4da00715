//! The live mesh config ([`meshfed::config_watch`]) with `meshfed serve` as a child process and the
//! testkit's ADS client as an AWS sidecar in us-east-1: a `traffic:` split written into the mesh config
//! while meshfed runs changes ratings' EDS locality weights without a restart; `meshfed traffic drain`
//! on the file takes azure-weu's share away; an invalid edit (shares adding up to 90) leaves the weights
//! as they were and `/debug/warnings` names the field; `meshfed traffic undrain` brings the split back;
//! `meshfed traffic status` prints it all.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use meshfed::type_url;
use meshfed_testkit::ads::{AdsClient, Flavor};
use meshfed_testkit::eds_shares::{eds_until_shares, region_shares};
use meshfed_testkit::fixtures::{AWS_SIDECAR, RATINGS_SPLIT};
use meshfed_testkit::meshfed::{Meshfed, meshfed_path, start_meshfed, traffic_cmd};

const OCTET: u8 = 131;
const RATINGS: &str = "outbound|9080||ratings.shop.svc.cluster.local";
const TIMEOUT: Duration = Duration::from_secs(20);
const QUIET: Duration = Duration::from_millis(400);

async fn warnings_of(m: &Meshfed, kind: &str) -> Result<Vec<serde_json::Value>> {
    let w = m.debug_json("/debug/warnings").await?;
    Ok(w.as_array().into_iter().flatten().filter(|w| w["kind"] == kind).cloned().collect())
}

fn write(path: &Path, text: &str) -> Result<()> {
    meshfed_testkit::write_atomically(path, text)
}

#[tokio::test]
async fn mesh_config_edits_and_the_traffic_cli_change_eds_without_a_restart() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("meshfed-live-config-").tempdir()?;
    let mesh_path = meshfed_testkit::demo::copy_demo(dir.path(), OCTET);
    let mesh_file = mesh_path.to_str().context("utf-8 path")?.to_string();
    let m = start_meshfed(&mesh_path).await?;
    let id = format!("sidecar~127.{OCTET}.50.1~client-1.shop~shop.svc.cluster.local");
    let node = meshfed_testkit::fixtures::node(&id, &AWS_SIDECAR, Some(("us-east-1", "us-east-1a")));
    let mut c = AdsClient::connect(m.xds_address(), Flavor::Sotw, node).await?.with_timeouts(TIMEOUT, QUIET);
    c.subscribe_and_ack::<&str>(type_url::CLUSTER, &[]).await?;
    let eds = c.subscribe_and_ack(type_url::ENDPOINT, &[RATINGS]).await?;
    let before = region_shares(&eds.decode::<ClusterLoadAssignment>(RATINGS)?);
    // no split yet: the localities' usual weights, not 70/30
    assert_ne!(before.get("westeurope"), Some(&30), "{before:?}");

    // 1. a split written into the mesh config: 70/30 without a restart
    let original = std::fs::read_to_string(&mesh_path)?;
    write(&mesh_path, &format!("{original}{RATINGS_SPLIT}"))?;
    eds_until_shares(&mut c, RATINGS, "the split", &[("us-east-1", 70), ("westeurope", 30)]).await?;

    // 2. `meshfed traffic drain` on the file: azure-weu's share goes
    let out = traffic_cmd(&[
        "drain",
        "--cluster",
        "azure-weu",
        "--capacity",
        "0",
        "--expires",
        "1h",
        "--reason",
        "DR drill",
        "--mesh-config",
        &mesh_file,
    ])?;
    assert!(out.contains("azure-weu"), "{out}");
    eds_until_shares(&mut c, RATINGS, "the drain", &[("us-east-1", 100)]).await?;
    let drained = std::fs::read_to_string(&mesh_path)?;
    assert!(drained.starts_with("# meshfed mesh config"), "comments outside traffic: stay:\n{drained}");

    // 3. a bad edit (shares adding up to 90): refused, the last good policy keeps serving
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&drained)?;
    doc["traffic"]["policies"][0]["split"]["us-east-1"]["azure-weu"] = 20.into();
    write(&mesh_path, &serde_yaml::to_string(&doc)?)?;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let warning = loop {
        if let Some(w) = warnings_of(&m, "mesh-config").await?.into_iter().next() {
            break w;
        }
        ensure!(tokio::time::Instant::now() < deadline, "no mesh-config warning after the bad edit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let message = warning["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("traffic.policies[0].split.us-east-1")
            && message.contains("90")
            && message.contains("mesh.yaml"),
        "{warning}"
    );
    c.expect_silence("after the refused edit").await?;
    let trafficz = m.debug_json("/debug/trafficz").await?;
    assert_eq!(trafficz["drains"][0]["reason"], "DR drill", "{trafficz}");
    let (_, metrics) = m.debug_get("/metrics").await?;
    assert!(metrics.contains("meshfed_mesh_config_reload_errors_total 1"), "{metrics}");
    assert!(metrics.contains("meshfed_mesh_config_last_reload_success 0"), "{metrics}");
    // `meshfed traffic status` says so
    let debug = m.debug_address().to_string();
    let status = traffic_cmd(&["status", "--debug-address", &debug])?;
    assert!(status.contains("LAST EDIT REFUSED") && status.contains("DR drill"), "{status}");
    // and refuses a bad drain of its own, leaving the file alone
    write(&mesh_path, &drained)?;
    let bad = std::process::Command::new(meshfed_path())
        .args(["traffic", "drain", "--cluster", "gcp", "--expires", "1h", "--mesh-config", &mesh_file])
        .output()?;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("traffic.drains[1].cluster"), "{bad:?}");
    assert_eq!(std::fs::read_to_string(&mesh_path)?, drained);
    // the good content again: the warning goes, nothing changes
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !warnings_of(&m, "mesh-config").await?.is_empty() {
        ensure!(tokio::time::Instant::now() < deadline, "the mesh-config warning stays after the good content");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.expect_silence("after restoring the same policy").await?;

    // 4. `meshfed traffic undrain`: the split is back
    traffic_cmd(&["undrain", "--cluster", "azure-weu", "--mesh-config", &mesh_file])?;
    eds_until_shares(&mut c, RATINGS, "the undrain", &[("us-east-1", 70), ("westeurope", 30)]).await?;
    let whatif = traffic_cmd(&[
        "whatif",
        "--debug-address",
        &debug,
        "--host",
        "ratings.shop.svc.cluster.local",
        "--region",
        "us-east-1",
        "--drain",
        "azure-weu",
    ])?;
    assert!(whatif.contains("azure-weu") && whatif.contains("What if"), "{whatif}");
    Ok(())
}
