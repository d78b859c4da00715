//! The traffic policy as a custom resource (mesh config `trafficPolicy`), end to end: the Kubernetes API
//! stand-in is the config cluster (a kubeconfig cluster of the mesh config) holding the
//! `meshfed.io/v1alpha1` TrafficPolicy `istio-system/default`; two `meshfed serve` replicas watch it and
//! serve the demo's two clouds to an AWS sidecar in us-east-1 (the testkit's ADS client on each):
//!
//! - the object's split (60/40) replaces the file's `traffic:` (70/30) on both replicas;
//! - `meshfed traffic drain --kubeconfig` drains azure-weu in the object: both replicas give it no
//!   share; `undrain`: both back to 60/40;
//! - an invalid object (shares adding up to 90) written directly: both keep the last good policy and
//!   `/debug/warnings` (kind `traffic-policy`) names the object and the field; the CLI refuses to edit
//!   it (the object stays as it is);
//! - a drill in progress in the object (a ramp half-way through its first step): both replicas at that
//!   step; a replica restarted during it comes up at the same step of the same drill;
//! - the object deleted: the file's `traffic:` is in force again.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use meshfed::type_url;
use meshfed_testkit::ads::{AdsClient, Flavor};
use meshfed_testkit::eds_shares::{RegionShares, eds_stays, eds_until_shares, region_shares, shares_of};
use meshfed_testkit::fixtures::AWS_SIDECAR;
use meshfed_testkit::kube_standin::KubeStandin;
use meshfed_testkit::meshfed::{Meshfed, MeshfedOptions, meshfed_path, start_meshfed, start_meshfed_with};
use serde_json::json;

const OCTET: u8 = 137;
const RATINGS: &str = "outbound|9080||ratings.shop.svc.cluster.local";
const TIMEOUT: Duration = Duration::from_secs(20);
const QUIET: Duration = Duration::from_millis(400);
const API_VERSION: &str = "meshfed.io/v1alpha1";

/// The file's split (in force while there is no object).
const FILE_SPLIT: &str = "traffic:\n  policies:\n    - hosts: [ratings.shop.svc.cluster.local]\n      split:\n        us-east-1: {aws-use1: 70, azure-weu: 30}\n        westeurope: {azure-weu: 70, aws-use1: 30}\n";

fn split(us_east_aws: u32, us_east_azure: u32) -> serde_json::Value {
    json!({"policies": [{
        "hosts": ["ratings.shop.svc.cluster.local"],
        "split": {
            "us-east-1": {"aws-use1": us_east_aws, "azure-weu": us_east_azure},
            "westeurope": {"azure-weu": 70, "aws-use1": 30},
        },
    }]})
}

fn object(spec: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": "TrafficPolicy",
        "metadata": {"name": "default", "namespace": "istio-system"},
        "spec": spec,
    })
}

/// An AWS sidecar in us-east-1 on `m`, subscribed to ratings' endpoints.
async fn sidecar(m: &Meshfed, n: u8) -> Result<(AdsClient, RegionShares)> {
    let id = format!("sidecar~127.{OCTET}.50.{n}~client-{n}.shop~shop.svc.cluster.local");
    let node = meshfed_testkit::fixtures::node(&id, &AWS_SIDECAR, Some(("us-east-1", "us-east-1a")));
    let mut c = AdsClient::connect(m.xds_address(), Flavor::Sotw, node).await?.with_timeouts(TIMEOUT, QUIET);
    c.subscribe_and_ack::<&str>(type_url::CLUSTER, &[]).await?;
    let eds = c.subscribe_and_ack(type_url::ENDPOINT, &[RATINGS]).await?;
    let s = region_shares(&eds.decode::<ClusterLoadAssignment>(RATINGS)?);
    Ok((c, s))
}

/// `meshfed traffic ARGS` (not blocking the runtime the API stand-in runs on), bounded.
async fn traffic_cmd(args: &[&str]) -> Result<std::process::Output> {
    let mut cmd = tokio::process::Command::new(meshfed_path());
    cmd.arg("traffic").args(args).kill_on_drop(true);
    Ok(tokio::time::timeout(TIMEOUT, cmd.output()).await.context("meshfed traffic timed out")??)
}

async fn warning_of(m: &Meshfed) -> Result<Option<serde_json::Value>> {
    let w = m.debug_json("/debug/warnings").await?;
    Ok(w.as_array().into_iter().flatten().find(|w| w["kind"] == "traffic-policy").cloned())
}

/// Writes the demo mesh with a `config` cluster (the stand-in, through `kubeconfig`) and
/// `trafficPolicy: {cluster: config}`.
fn write_mesh(dir: &Path, kubeconfig: &Path) -> Result<std::path::PathBuf> {
    let path = meshfed_testkit::demo::copy_demo(dir, OCTET);
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
    let config: serde_yaml::Value = serde_yaml::from_str(&format!(
        "{{id: config, network: config-net, kubeconfig: {}}}",
        kubeconfig.to_str().context("utf-8 path")?
    ))?;
    doc["clusters"].as_sequence_mut().context("clusters")?.push(config);
    doc["trafficPolicy"] = serde_yaml::from_str("{cluster: config}")?;
    doc["traffic"] = serde_yaml::from_str::<serde_yaml::Value>(FILE_SPLIT)?["traffic"].clone();
    std::fs::write(&path, serde_yaml::to_string(&doc)?)?;
    Ok(path)
}

#[tokio::test]
async fn two_replicas_converge_on_the_custom_resource() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("meshfed-traffic-crd-").tempdir()?;
    let api = KubeStandin::start().await?;
    let kubeconfig = dir.path().join("config.kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig("config", None))?;
    let kc = kubeconfig.to_str().context("utf-8 path")?.to_string();
    let mesh_path = write_mesh(dir.path(), &kubeconfig)?;
    api.apply(object(split(60, 40)))?;

    // 1. both replicas serve the object's split, not the file's
    let a = start_meshfed(&mesh_path).await?;
    let b = start_meshfed(&mesh_path).await?;
    let (mut ca, sa) = sidecar(&a, 1).await?;
    let (mut cb, sb) = sidecar(&b, 2).await?;
    assert_eq!(sa, shares_of(&[("us-east-1", 60), ("westeurope", 40)]), "replica a at start");
    assert_eq!(sb, sa, "replica b at start");
    let trafficz = a.debug_json("/debug/trafficz").await?;
    assert_eq!(trafficz["trafficPolicy"]["inForce"], true, "{trafficz}");

    // 2. `meshfed traffic drain --kubeconfig`: azure-weu loses its share on both replicas
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
        "--kubeconfig",
        &kc,
    ])
    .await?;
    ensure!(out.status.success(), "drain: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("azure-weu") && stdout.contains("TrafficPolicy istio-system/default"), "{stdout}");
    let stored = api.get(API_VERSION, "TrafficPolicy", "istio-system", "default").context("the object")?;
    assert_eq!(stored["spec"]["drains"][0]["cluster"], "azure-weu", "{stored}");
    assert_eq!(stored["spec"]["policies"], split(60, 40)["policies"], "the split stays: {stored}");
    eds_until_shares(&mut ca, RATINGS, "replica a, the drain", &[("us-east-1", 100)]).await?;
    eds_until_shares(&mut cb, RATINGS, "replica b, the drain", &[("us-east-1", 100)]).await?;

    // 3. undrain: both back to the split
    let out = traffic_cmd(&["undrain", "--cluster", "azure-weu", "--kubeconfig", &kc]).await?;
    ensure!(out.status.success(), "undrain: {}", String::from_utf8_lossy(&out.stderr));
    eds_until_shares(&mut ca, RATINGS, "replica a, the undrain", &[("us-east-1", 60), ("westeurope", 40)]).await?;
    eds_until_shares(&mut cb, RATINGS, "replica b, the undrain", &[("us-east-1", 60), ("westeurope", 40)]).await?;

    // 4. a bad object written directly: both keep the last good policy and say which field
    api.apply(object(split(60, 30)))?;
    for (m, name) in [(&a, "a"), (&b, "b")] {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let w = loop {
            if let Some(w) = warning_of(m).await? {
                break w;
            }
            ensure!(tokio::time::Instant::now() < deadline, "replica {name}: no traffic-policy warning");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let message = w["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("istio-system/default")
                && message.contains("spec.policies[0].split.us-east-1")
                && message.contains("90")
                && message.contains("last good"),
            "replica {name}: {w}"
        );
    }
    eds_stays(&mut ca, RATINGS, "replica a, the bad object", QUIET * 2).await?;
    eds_stays(&mut cb, RATINGS, "replica b, the bad object", QUIET * 2).await?;
    // the CLI validates the whole result: it refuses to write on top of the bad object
    let before = api.get(API_VERSION, "TrafficPolicy", "istio-system", "default").context("the object")?;
    let out = traffic_cmd(&["drain", "--cluster", "azure-weu", "--expires", "1h", "--kubeconfig", &kc]).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("refused") && stderr.contains("spec.policies[0]"), "{stderr}");
    let after = api.get(API_VERSION, "TrafficPolicy", "istio-system", "default").context("the object")?;
    assert_eq!(before["metadata"]["resourceVersion"], after["metadata"]["resourceVersion"]);

    // 5. fixed, with a drill in progress: azure-weu ramping down 50 points an hour, started half an
    // hour ago (capacity 50%: 40% x 0.5 = 20%): both replicas at that step, the warning gone
    let mut spec = split(60, 40);
    let now = std::time::SystemTime::now();
    let time = meshfed::traffic::decide::time_str;
    spec["drains"] = json!([{
        "cluster": "azure-weu", "capacity": 0, "ramp": {"step": 50, "every": "1h"},
        "start": time(now - Duration::from_secs(1800)), "expires": time(now + Duration::from_secs(7200)),
        "reason": "DR drill", "drill": {"abortBelowHealthy": 10},
    }]);
    api.apply(object(spec))?;
    let mid_drill = [("us-east-1", 80), ("westeurope", 20)];
    eds_until_shares(&mut ca, RATINGS, "replica a, the drill", &mid_drill).await?;
    eds_until_shares(&mut cb, RATINGS, "replica b, the drill", &mid_drill).await?;
    ensure!(warning_of(&a).await?.is_none(), "the warning clears");
    let drill_of = |v: serde_json::Value| v["drills"][0].clone();
    let in_a = drill_of(a.debug_json("/debug/drillz").await?);
    assert_eq!(in_a["stepAcks"][0]["capacity"], 50, "{in_a:#}");

    // 6. replica b restarted during the drill: it resumes it at its step from its first response, the
    // same drill (start) in its report
    let ports = (b.xds_port, b.debug_port);
    drop(cb);
    drop(b);
    let b = start_meshfed_with(&mesh_path, &MeshfedOptions { ports: Some(ports), ..Default::default() }).await?;
    let (_cb, sb) = sidecar(&b, 3).await?;
    assert_eq!(sb, shares_of(&mid_drill), "the restarted replica serves the drill's step at once");
    let in_b = drill_of(b.debug_json("/debug/drillz").await?);
    assert_eq!((&in_b["start"], &in_b["aborted"]), (&in_a["start"], &serde_json::Value::Null), "{in_b:#}");
    assert_eq!(in_b["stepAcks"][0]["capacity"], 50, "{in_b:#}");

    // 7. the object deleted: the file's traffic: is back
    ensure!(api.delete(API_VERSION, "TrafficPolicy", "istio-system", "default")?, "deleted");
    eds_until_shares(&mut ca, RATINGS, "replica a, the object deleted", &[("us-east-1", 70), ("westeurope", 30)])
        .await?;
    Ok(())
}

/// A drill meshfed aborts by itself is recorded in the object (`drill.aborted`), so the abort outlives
/// the replica: restarted after its receivers are healthy again, it does not apply the drill again.
#[tokio::test]
async fn a_drill_abort_is_recorded_in_the_object_and_outlives_a_restart() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("meshfed-traffic-abort-").tempdir()?;
    let api = KubeStandin::start().await?;
    let kubeconfig = dir.path().join("config.kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig("config", None))?;
    let mesh_path = write_mesh(dir.path(), &kubeconfig)?;
    // a drill holding azure-weu at 50% of its 40%, aborting below 50% healthy receivers
    let mut spec = split(60, 40);
    let now = std::time::SystemTime::now();
    let time = meshfed::traffic::decide::time_str;
    spec["drains"] = json!([{
        "cluster": "azure-weu", "capacity": 50, "start": time(now - Duration::from_secs(60)),
        "expires": time(now + Duration::from_secs(7200)), "reason": "DR drill", "drill": {"abortBelowHealthy": 50},
    }]);
    api.apply(object(spec))?;
    let a = start_meshfed(&mesh_path).await?;
    let (mut c, s) = sidecar(&a, 1).await?;
    assert_eq!(s, shares_of(&[("us-east-1", 80), ("westeurope", 20)]), "the drill at 50%");

    // every aws-use1 endpoint not ready (the cluster taking azure-weu's traffic): the drill aborts, and
    // the abort is written into the object
    let slices = dir.path().join("aws-use1/endpointslices.yaml");
    let healthy = std::fs::read_to_string(&slices)?;
    meshfed_testkit::write_atomically(&slices, &healthy.replace("ready: true", "ready: false"))?;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let recorded = loop {
        let o = api.get(API_VERSION, "TrafficPolicy", "istio-system", "default").context("the object")?;
        if o["spec"]["drains"][0]["drill"]["aborted"].is_object() {
            break o;
        }
        ensure!(tokio::time::Instant::now() < deadline, "the abort was not recorded: {o:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let record = &recorded["spec"]["drains"][0]["drill"]["aborted"];
    assert!(record["reason"].as_str().unwrap_or("").contains("aws-use1"), "{recorded:#}");
    assert_eq!(recorded["spec"]["policies"], split(60, 40)["policies"], "the rest of the spec stays: {recorded:#}");
    assert_eq!(recorded["spec"]["drains"][0]["capacity"], 50, "{recorded:#}");
    let drillz = a.debug_json("/debug/drillz").await?;
    let at_abort = drillz["drills"][0]["aborted"].clone();
    assert_eq!(at_abort["reason"], record["reason"], "{drillz:#}");
    // (aws-use1 has no healthy endpoint: Azure takes all of it)
    eds_until_shares(&mut c, RATINGS, "after the abort", &[("westeurope", 100)]).await?;

    // aws-use1 healthy again, the replica restarted: the drill stays aborted (60/40, not 80/20), with the
    // recorded time and reason
    meshfed_testkit::write_atomically(&slices, &healthy)?;
    let ports = (a.xds_port, a.debug_port);
    drop(c);
    drop(a);
    let a = start_meshfed_with(&mesh_path, &MeshfedOptions { ports: Some(ports), ..Default::default() }).await?;
    let (_c, s) = sidecar(&a, 2).await?;
    assert_eq!(s, shares_of(&[("us-east-1", 60), ("westeurope", 40)]), "the aborted drill is not applied again");
    let drillz = a.debug_json("/debug/drillz").await?;
    assert_eq!(drillz["drills"][0]["aborted"], at_abort, "{drillz:#}");
    Ok(())
}

/// Each cloud's meshfed reads the TrafficPolicy of its own cluster (the shipped overlays): one
/// `meshfed traffic drain` with a `--context` per cloud edits both objects; a cloud whose API does not
/// answer fails the command, naming it and what was already written.
#[tokio::test]
async fn one_command_edits_every_clouds_policy() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("meshfed-traffic-contexts-").tempdir()?;
    let (eks, aks) = (KubeStandin::start().await?, KubeStandin::start().await?);
    let clusters = [("eks", eks.url()), ("aks", aks.url())];
    let mut kc = String::from("apiVersion: v1\nkind: Config\nclusters:\n");
    for (name, url) in &clusters {
        kc.push_str(&format!("- name: {name}\n  cluster:\n    server: {url}\n"));
    }
    kc.push_str("users:\n- name: operator\n  user: {}\ncontexts:\n");
    for (name, _) in &clusters {
        kc.push_str(&format!("- name: {name}\n  context:\n    cluster: {name}\n    user: operator\n"));
    }
    kc.push_str("current-context: eks\n");
    let kubeconfig = dir.path().join("operator.kubeconfig");
    std::fs::write(&kubeconfig, kc)?;
    let kc = kubeconfig.to_str().context("utf-8 path")?.to_string();
    let drain = [
        "drain",
        "--cluster",
        "azure-weu",
        "--capacity",
        "25",
        "--expires",
        "1h",
        "--kubeconfig",
        &kc,
        "--context",
        "eks",
        "--context",
        "aks",
    ];
    let out = traffic_cmd(&drain).await?;
    ensure!(out.status.success(), "drain: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("in context eks") && stdout.contains("in context aks"), "{stdout}");
    for api in [&eks, &aks] {
        let stored = api.get(API_VERSION, "TrafficPolicy", "istio-system", "default").context("the object")?;
        assert_eq!(stored["spec"]["drains"][0]["cluster"], "azure-weu", "{stored}");
        assert_eq!(stored["spec"]["drains"][0]["capacity"], 25, "{stored}");
    }

    // AKS's API gone: the command fails, names the context, and says EKS's object was written
    drop(aks);
    let out = traffic_cmd(&drain).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("in context aks") && stderr.contains("already written: TrafficPolicy"), "{stderr}");
    assert!(stderr.contains("in context eks"), "{stderr}");
    Ok(())
}
