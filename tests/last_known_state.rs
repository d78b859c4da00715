//! The durable last-known state (mesh config `lastKnownState`), end to end with the meshfed binary and the
//! Kubernetes API stand-in on loopback: meshfed lists a cluster and persists it; it is killed; the API
//! server stops (an outage); meshfed starts again and serves the restored endpoints from its first response
//! on, marked restored with their age (`/debug/clusterz`, metrics), without sitting out `readyTimeout`;
//! the API server comes back with a changed endpoint and the live state replaces the restored one.
//!
//! `a_remote_secret_cluster_is_restored_until_its_secret_goes`: the same for a cluster discovered from an
//! Istio remote secret in the config cluster (the shipped deployment's case): restored during its outage,
//! kept restored once the secrets are listed, removed with its endpoints when its secret is deleted, and
//! removed at the first list when its secret was deleted while meshfed was down.
//!
//! The traffic state kept with it, with the demo's manifest clusters and the file's `traffic:`:
//! `a_failed_over_cluster_stays_away_for_failback_after_across_a_restart` (the failover state) and
//! `an_aborted_drill_does_not_apply_again_across_a_restart` (a drill's abort).

use meshfed_testkit as support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, anyhow, ensure};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use meshfed::source::last_known;
use meshfed::type_url;
use meshfed_testkit::ads::{AdsClient, Flavor};
use meshfed_testkit::eds_shares::{RegionShares, region_shares, shares_of};
use meshfed_testkit::fixtures::{endpoint_addresses, node};
use meshfed_testkit::kube_standin::{KubeStandin, objects};
use meshfed_testkit::meshfed::Meshfed;

/// Cap of each step.
const STEP: Duration = Duration::from_secs(30);
const REVIEWS: &str = "outbound|9080||reviews.shop.svc.cluster.local";
const RATINGS: &str = "outbound|9080||ratings.shop.svc.cluster.local";
const TOKEN: &str = "token-of-meshfed";

fn set_slice(api: &KubeStandin, addresses: &[&str]) -> Result<()> {
    let eps: Vec<(&str, &str)> = addresses.iter().map(|a| (*a, "east-node-1")).collect();
    api.apply(objects::endpoint_slice("shop", "reviews-east", "reviews", ("http", 9080), &eps))?;
    Ok(())
}

fn set(addresses: &[&str]) -> BTreeSet<String> {
    addresses.iter().map(|a| a.to_string()).collect()
}

/// A sidecar client of cluster `east`, subscribed to reviews' endpoints.
async fn eds_client(meshfed: &Meshfed) -> Result<AdsClient> {
    eds_client_with(meshfed, &[("CLUSTER_ID", "east"), ("NETWORK", "net"), ("INTERCEPTION_MODE", "NONE")]).await
}

/// A sidecar client with node metadata `meta`, subscribed to reviews' endpoints.
async fn eds_client_with(meshfed: &Meshfed, meta: &[(&str, &str)]) -> Result<AdsClient> {
    let n = node("sidecar~127.0.0.9~client.shop~shop.svc.cluster.local", meta, None);
    let mut c = AdsClient::connect(meshfed.xds_address(), Flavor::Sotw, n).await?.with_timeouts(STEP, STEP);
    c.subscribe(type_url::ENDPOINT, &[REVIEWS]).await?;
    Ok(c)
}

async fn next_addresses(c: &mut AdsClient) -> Result<BTreeSet<String>> {
    let r = c.recv_type(type_url::ENDPOINT).await?;
    c.ack(&r).await?;
    let cla: ClusterLoadAssignment = r.decode(REVIEWS)?;
    Ok(endpoint_addresses(&cla))
}

/// The stored addresses of cluster `east`'s slice and the state's `observedAt`, if the file holds it.
fn stored(path: &Path) -> Result<Option<(BTreeSet<String>, SystemTime)>> {
    Ok(stored_cluster(path, "east")?.map(|(a, t, _)| (a, t)))
}

/// A cluster's stored slice addresses, `observedAt` and remote secret.
type Stored = (BTreeSet<String>, SystemTime, Option<String>);

/// The stored addresses of `cluster`'s slices, the state's `observedAt` and its remote secret, if the file
/// holds it.
fn stored_cluster(path: &Path, cluster: &str) -> Result<Option<Stored>> {
    let Some(loaded) = last_known::read(path)? else { return Ok(None) };
    let Some(east) = loaded.clusters.iter().find(|s| s.cluster.as_str() == cluster) else { return Ok(None) };
    let mut addresses = BTreeSet::new();
    for o in &east.objects {
        if let meshfed::topology::TopologyObject::EndpointSlice(s) = o {
            addresses.extend(s.endpoints.iter().flat_map(|e| e.addresses.iter().map(|a| a.to_string())));
        }
    }
    Ok(Some((addresses, east.observed_at, east.remote_secret.clone())))
}

async fn clusterz_east(meshfed: &Meshfed) -> Result<serde_json::Value> {
    clusterz(meshfed, "east").await
}

async fn clusterz(meshfed: &Meshfed, id: &str) -> Result<serde_json::Value> {
    let z = meshfed.debug_json("/debug/clusterz").await?;
    z.as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == id))
        .cloned()
        .ok_or_else(|| anyhow!("/debug/clusterz has no cluster {id}: {z}"))
}

/// The value of the metric line that starts with `prefix` (`name{labels} `), if exported.
async fn metric(meshfed: &Meshfed, prefix: &str) -> Result<Option<f64>> {
    let (status, body) = meshfed.debug_get("/metrics").await?;
    ensure!(status == 200, "/metrics: {status}");
    Ok(body.lines().find_map(|l| l.strip_prefix(prefix)).and_then(|v| v.trim().parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_during_an_api_outage_serves_the_restored_state_without_a_gap() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = KubeStandin::start().await?;
    api.set_token(Some(TOKEN));
    let kubeconfig = dir.path().join("east.kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig("east", Some(TOKEN)))?;
    api.apply(objects::namespace("shop", None))?;
    api.apply(objects::node("east-node-1", "r", "z"))?;
    api.apply(objects::service("shop", "reviews", &[("http", 9080)]))?;
    set_slice(&api, &["10.1.0.1", "10.1.0.2"])?;
    let state = dir.path().join("state/last-known.json");
    let mesh_path = dir.path().join("mesh.yaml");
    // readyTimeout is long: a restarted meshfed that waited for the unreachable cluster would not be
    // ready within a step
    let write_mesh = |ready_timeout: &str| {
        std::fs::write(
            &mesh_path,
            format!(
                "clusters:\n  - id: east\n    network: net\n    kubeconfig: {}\nreadyTimeout: {ready_timeout}\nunreachableGracePeriod: 1h\nlastKnownState:\n  path: {}\n  maxAge: 1h\n  writeInterval: 100ms\n",
                kubeconfig.display(),
                state.display()
            ),
        )
    };
    write_mesh("60s")?;

    // 1. live: meshfed lists the cluster and persists it
    let mut first = support::start_meshfed(&mesh_path).await?;
    let mut c = eds_client(&first).await?;
    assert_eq!(next_addresses(&mut c).await?, set(&["10.1.0.1", "10.1.0.2"]));
    let (_, written_at) = support::poll_until(STEP, || async {
        match stored(&state)? {
            Some((a, t)) if a == set(&["10.1.0.1", "10.1.0.2"]) => Ok((a, t)),
            other => Err(anyhow!("not persisted yet: {other:?}")),
        }
    })
    .await
    .context("meshfed persists the listed cluster")?;
    drop(c);
    first.guard.kill();

    // 2. the API server stops answering; 3. meshfed starts again during the outage
    api.stop().await;
    let started = Instant::now();
    let second = support::start_meshfed(&mesh_path).await?;
    ensure!(
        started.elapsed() < Duration::from_secs(20),
        "a restored cluster counts as ready: meshfed did not sit out readyTimeout ({:?})",
        started.elapsed()
    );
    // the first response holds the restored endpoints
    let mut c = eds_client(&second).await?;
    assert_eq!(next_addresses(&mut c).await?, set(&["10.1.0.1", "10.1.0.2"]), "restored, no gap");
    let east = clusterz_east(&second).await?;
    let restored = &east["restoredFrom"];
    ensure!(restored["observedAt"].is_string() && restored["ageSeconds"].as_u64().is_some(), "{east}");
    let observed: jiff::Timestamp = restored["observedAt"].as_str().unwrap_or_default().parse()?;
    assert_eq!(observed.as_second(), jiff::Timestamp::try_from(written_at)?.as_second(), "{east}");
    assert_eq!(east["syncStatus"], "syncing", "{east}");
    assert_eq!(east["endpoints"], 2, "{east}");
    let age = metric(&second, "meshfed_cluster_restored_state_age_seconds{cluster=\"east\"} ").await?;
    ensure!(age.is_some_and(|a| a >= 0.0), "the restored age is exported: {age:?}");
    support::poll_until(STEP, || async {
        let reachable = metric(&second, "meshfed_cluster_api_reachable{cluster=\"east\"} ").await?;
        ensure!(reachable == Some(0.0), "API reachability: {reachable:?}");
        Ok(())
    })
    .await?;
    // the restored state is not written back as fresh while the outage lasts
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (addresses, observed_at) = stored(&state)?.ok_or_else(|| anyhow!("the file still holds east"))?;
    assert_eq!((addresses, observed_at), (set(&["10.1.0.1", "10.1.0.2"]), written_at));
    drop(c);
    drop(second);

    // once more, with a short readyTimeout: when it passes, the unreachable cluster's source does not
    // replace the restored state with the nothing it has listed
    write_mesh("1s")?;
    let third = support::start_meshfed(&mesh_path).await?;
    let mut c = eds_client(&third).await?;
    assert_eq!(next_addresses(&mut c).await?, set(&["10.1.0.1", "10.1.0.2"]), "restored, no gap");
    if let Some(r) = c.recv_within(Duration::from_secs(3)).await? {
        return Err(anyhow!("the restored endpoints changed during the outage: {}", r.summary()));
    }
    let east = clusterz_east(&third).await?;
    ensure!(east["restoredFrom"].is_object() && east["endpoints"] == 2, "{east}");
    let second = third;

    // 4. the API server comes back, with a changed endpoint: the live state replaces the restored one
    set_slice(&api, &["10.1.0.3"])?;
    api.restart().await?;
    let deadline = Instant::now() + STEP;
    loop {
        let addresses = next_addresses(&mut c).await?;
        if addresses == set(&["10.1.0.3"]) {
            break;
        }
        ensure!(Instant::now() < deadline, "the live state replaces the restored one: still {addresses:?}");
    }
    support::poll_until(STEP, || async {
        let east = clusterz_east(&second).await?;
        ensure!(east["restoredFrom"].is_null() && east["syncStatus"] == "synced", "{east}");
        let age = metric(&second, "meshfed_cluster_restored_state_age_seconds{cluster=\"east\"} ").await?;
        ensure!(age.is_none(), "live: no restored age: {age:?}");
        let reachable = metric(&second, "meshfed_cluster_api_reachable{cluster=\"east\"} ").await?;
        ensure!(reachable == Some(1.0), "API reachability: {reachable:?}");
        Ok(())
    })
    .await?;
    support::poll_until(STEP, || async {
        match stored(&state)? {
            Some((a, t)) if a == set(&["10.1.0.3"]) && t > written_at => Ok(()),
            other => Err(anyhow!("the live state is not persisted yet: {other:?}")),
        }
    })
    .await?;
    Ok(())
}

/// Reads EDS responses until reviews' addresses are `want` (each response within a step).
async fn until_addresses(c: &mut AdsClient, want: &BTreeSet<String>, what: &str) -> Result<()> {
    let deadline = Instant::now() + STEP;
    loop {
        let addresses = next_addresses(c).await?;
        if &addresses == want {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{what}: still {addresses:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_secret_cluster_is_restored_until_its_secret_goes() -> Result<()> {
    const SECRET: &str = "istio-remote-secret-azure";
    let dir = tempfile::tempdir()?;
    // the config cluster (named in the mesh config) and the cluster its remote secret names
    let (aws, azure) = (KubeStandin::start().await?, KubeStandin::start().await?);
    for (api, cluster, address) in [(&aws, "aws", "10.1.0.1"), (&azure, "azure", "10.2.0.1")] {
        api.set_token(Some(TOKEN));
        let node_name = format!("{cluster}-node-1");
        api.apply(objects::namespace("shop", None))?;
        api.apply(objects::node(&node_name, cluster, "z"))?;
        api.apply(objects::service("shop", "reviews", &[("http", 9080)]))?;
        api.apply(objects::endpoint_slice(
            "shop",
            &format!("reviews-{cluster}"),
            "reviews",
            ("http", 9080),
            &[(address, &node_name)],
        ))?;
    }
    // azure's network is the label of its istio-system Namespace, as istiod reads it
    azure.apply(objects::namespace("istio-system", Some("azure-net")))?;
    aws.apply(objects::remote_secret("istio-system", SECRET, "azure", &azure.kubeconfig("azure", Some(TOKEN))))?;
    let kubeconfig = dir.path().join("aws.kubeconfig");
    std::fs::write(&kubeconfig, aws.kubeconfig("aws", Some(TOKEN)))?;
    let state = dir.path().join("state/last-known.json");
    let mesh_path = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh_path,
        format!(
            "clusters:\n  - id: aws\n    network: aws-net\n    kubeconfig: {}\nremoteSecrets:\n  configCluster: aws\nreadyTimeout: 60s\nunreachableGracePeriod: 1h\nlastKnownState:\n  path: {}\n  maxAge: 1h\n  writeInterval: 100ms\n",
            kubeconfig.display(),
            state.display()
        ),
    )?;
    // neither NETWORK nor CLUSTER_ID (which would give it aws's network): every network's endpoints are
    // sent as they are
    let meta = [("INTERCEPTION_MODE", "NONE")];
    let both = set(&["10.1.0.1", "10.2.0.1"]);

    // 1. live: meshfed lists both clusters and persists both, azure with its secret
    let mut first = support::start_meshfed(&mesh_path).await?;
    let mut c = eds_client_with(&first, &meta).await?;
    until_addresses(&mut c, &both, "both clusters live").await?;
    let (_, azure_written, _) = support::poll_until(STEP, || async {
        let aws_state = stored_cluster(&state, "aws")?;
        match stored_cluster(&state, "azure")? {
            Some((a, t, secret))
                if a == set(&["10.2.0.1"])
                    && secret.as_deref() == Some("istio-system/istio-remote-secret-azure")
                    && aws_state.as_ref().is_some_and(|(a, _, s)| *a == set(&["10.1.0.1"]) && s.is_none()) =>
            {
                Ok((a, t, secret))
            }
            other => Err(anyhow!("not persisted yet: azure {other:?}, aws {aws_state:?}")),
        }
    })
    .await
    .context("meshfed persists the config cluster and the remote-secret cluster")?;
    drop(c);
    first.guard.kill();
    drop(first);
    // kept for step 4: the state as it was before the secret is deleted
    let before_delete = std::fs::read(&state)?;

    // 2. azure's API server stops answering; meshfed starts again during the outage
    azure.stop().await;
    let started = Instant::now();
    let second = support::start_meshfed(&mesh_path).await?;
    ensure!(
        started.elapsed() < Duration::from_secs(20),
        "a restored remote cluster counts as ready: meshfed did not sit out readyTimeout ({:?})",
        started.elapsed()
    );
    let mut c = eds_client_with(&second, &meta).await?;
    assert_eq!(next_addresses(&mut c).await?, both, "the first response holds azure's restored endpoints");
    let z = clusterz(&second, "azure").await?;
    let observed: jiff::Timestamp = z["restoredFrom"]["observedAt"].as_str().unwrap_or_default().parse()?;
    assert_eq!(observed.as_second(), jiff::Timestamp::try_from(azure_written)?.as_second(), "{z}");
    ensure!(z["secretName"] == "istio-system/istio-remote-secret-azure" && z["endpoints"] == 1, "{z}");
    ensure!(z["network"] == "azure-net", "placed on its network again: {z}");
    // the config cluster answers: the secret is listed, azure's watch runs and finds its API unreachable;
    // azure stays restored (no empty state replaces it)
    support::poll_until(STEP, || async {
        let z = clusterz(&second, "azure").await?;
        ensure!(z["unreachableSince"].is_string() && z["restoredFrom"].is_object() && z["endpoints"] == 1, "{z}");
        Ok(())
    })
    .await
    .context("azure is listed in the secrets and stays restored during its outage")?;
    if let Some(r) = c.recv_within(Duration::from_secs(2)).await? {
        return Err(anyhow!("the restored endpoints changed during the outage: {}", r.summary()));
    }

    // 3. the remote secret is deleted: the restored cluster and its endpoints go, and it leaves the file
    aws.delete("v1", "Secret", "istio-system", SECRET)?;
    until_addresses(&mut c, &set(&["10.1.0.1"]), "azure removed with its secret").await?;
    let z = clusterz(&second, "azure").await?;
    ensure!(z["syncStatus"] == "closed" && z["restoredFrom"].is_null() && z["endpoints"] == 0, "{z}");
    support::poll_until(STEP, || async {
        let azure_state = stored_cluster(&state, "azure")?;
        ensure!(azure_state.is_none() && stored_cluster(&state, "aws")?.is_some(), "azure still kept: {azure_state:?}");
        Ok(())
    })
    .await?;
    drop(c);
    drop(second);

    // 4. the secret was deleted while meshfed was down: the restored cluster goes at the first list
    std::fs::write(&state, &before_delete)?;
    let third = support::start_meshfed(&mesh_path).await?;
    let mut c = eds_client_with(&third, &meta).await?;
    until_addresses(&mut c, &set(&["10.1.0.1"]), "azure removed: no secret in the first list").await?;
    support::poll_until(STEP, || async {
        let z = clusterz(&third, "azure").await?;
        ensure!(z["syncStatus"] == "closed" && z["restoredFrom"].is_null() && z["endpoints"] == 0, "{z}");
        let azure_state = stored_cluster(&state, "azure")?;
        ensure!(azure_state.is_none(), "azure still kept: {azure_state:?}");
        Ok(())
    })
    .await?;
    Ok(())
}

/// The demo (its loopback addresses on octet `octet`) in `dir`, its mesh config with `lastKnownState` (in
/// `dir/state/last-known.json`, written every 100 ms) and then `traffic` (a `traffic:` section): the mesh
/// config's path and the state file's.
fn demo_with_state(dir: &Path, octet: u8, traffic: &str) -> Result<(PathBuf, PathBuf)> {
    let mesh_path = support::demo::copy_demo(dir, octet);
    let state = dir.join("state/last-known.json");
    let text = std::fs::read_to_string(&mesh_path)?;
    std::fs::write(
        &mesh_path,
        format!(
            "{text}\nlastKnownState:\n  path: {}\n  maxAge: 1h\n  writeInterval: 100ms\n{traffic}",
            state.display()
        ),
    )?;
    Ok((mesh_path, state))
}

/// Sidecar `n` of the demo's aws-use1 in us-east-1a (the demo on loopback octet `octet`), subscribed to
/// every cluster and to ratings' endpoints (each ACKed): the client and ratings' region shares in its
/// first EDS response.
async fn ratings_client(m: &Meshfed, octet: u8, n: u8) -> Result<(AdsClient, RegionShares)> {
    let id = format!("sidecar~127.{octet}.50.{n}~client-{n}.shop~shop.svc.cluster.local");
    let node = node(&id, &[("CLUSTER_ID", "aws-use1"), ("NETWORK", "aws-net")], Some(("us-east-1", "us-east-1a")));
    let mut c =
        AdsClient::connect(m.xds_address(), Flavor::Sotw, node).await?.with_timeouts(STEP, Duration::from_millis(400));
    c.subscribe_and_ack::<&str>(type_url::CLUSTER, &[]).await?;
    let eds = c.subscribe_and_ack(type_url::ENDPOINT, &[RATINGS]).await?;
    let shares = region_shares(&eds.decode::<ClusterLoadAssignment>(RATINGS)?);
    Ok((c, shares))
}

/// The traffic policy's failover state is kept in the last-known state too: a cluster failed over (below
/// `minHealthy`) that is healthy again stays away for `failbackAfter` — also when meshfed restarts in
/// between (without the kept state, the restarted replica would give the share back at once: the flap
/// `failbackAfter` is there to prevent), and returns once it has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_over_cluster_stays_away_for_failback_after_across_a_restart() -> Result<()> {
    use meshfed_testkit::eds_shares::eds_until_shares;
    use meshfed_testkit::meshfed::{MeshfedOptions, start_meshfed_with};
    const OCTET: u8 = 139;
    const FAILBACK: u64 = 15;
    let dir = tempfile::Builder::new().prefix("meshfed-failover-kept-").tempdir()?;
    let (mesh_path, state) = demo_with_state(
        dir.path(),
        OCTET,
        &format!(
            "traffic:\n  policies:\n    - hosts: [ratings.shop.svc.cluster.local]\n      split:\n        us-east-1: {{aws-use1: 70, azure-weu: 30}}\n      failover: {{minHealthy: 50, failbackAfter: {FAILBACK}s}}\n"
        ),
    )?;
    let options = MeshfedOptions { ports: Some((support::free_port(), support::free_port())), ..Default::default() };
    let m = start_meshfed_with(&mesh_path, &options).await?;
    let (mut c, first) = ratings_client(&m, OCTET, 1).await?;
    assert_eq!(first, shares_of(&[("us-east-1", 70), ("westeurope", 30)]));
    // azure-weu's endpoints not ready: failed over; ready again: still away (failbackAfter)
    let slices = dir.path().join("azure-weu/endpointslices.yaml");
    let healthy = std::fs::read_to_string(&slices)?;
    support::write_atomically(&slices, &healthy.replace("ready: true", "ready: false"))?;
    eds_until_shares(&mut c, RATINGS, "failed over", &[("us-east-1", 100)]).await?;
    support::write_atomically(&slices, &healthy)?;
    let recovered = Instant::now();
    // the file holds the failover state, healthy again since the edit
    let deadline = Instant::now() + STEP;
    loop {
        let text = std::fs::read_to_string(&state).unwrap_or_default();
        if text.contains("\"failover\"") && text.contains("\"backSince\"") {
            break;
        }
        ensure!(Instant::now() < deadline, "no failover state with backSince in {}: {text}", state.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // restarted before failbackAfter: still away from its first response
    drop(c);
    drop(m);
    let m = start_meshfed_with(&mesh_path, &options).await?;
    let (mut c, first) = ratings_client(&m, OCTET, 2).await?;
    ensure!(
        recovered.elapsed() < Duration::from_secs(FAILBACK),
        "the restart took past failbackAfter: the test proves nothing"
    );
    assert_eq!(first, shares_of(&[("us-east-1", 100)]), "the restarted replica keeps azure-weu away");
    let trafficz = m.debug_json("/debug/trafficz").await?;
    assert!(
        trafficz["status"]["failover"]["ratings.shop.svc.cluster.local"]["azure-weu"]["backSince"].is_string(),
        "{trafficz:#}"
    );

    // failbackAfter after the recovery (not after the restart): the share returns
    eds_until_shares(&mut c, RATINGS, "failed back", &[("us-east-1", 70), ("westeurope", 30)]).await?;
    let back = recovered.elapsed();
    ensure!(back >= Duration::from_secs(FAILBACK), "failed back after {back:?}, before failbackAfter");
    Ok(())
}

/// A drill's abort is kept in the last-known state too: with the file's `traffic:` in force (which
/// meshfed does not edit), a drill that aborted by itself (its receivers below `abortBelowHealthy`) and is
/// still listed in the file, not past its end, does not apply again when meshfed restarts — also with its
/// receivers healthy by then — and the restarted meshfed reports the abort's time and reason. (Without the
/// kept abort, the restarted meshfed would drain the cluster again: the drain that safety aborted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_drill_does_not_apply_again_across_a_restart() -> Result<()> {
    use meshfed_testkit::eds_shares::{eds_stays, eds_until, eds_until_shares};
    use meshfed_testkit::fixtures::RATINGS_SPLIT;
    use meshfed_testkit::meshfed::{MeshfedOptions, start_meshfed_with, traffic_cmd};
    const OCTET: u8 = 141;
    let split = shares_of(&[("us-east-1", 70), ("westeurope", 30)]);
    let dir = tempfile::Builder::new().prefix("meshfed-drill-abort-kept-").tempdir()?;
    let (mesh_path, state) = demo_with_state(dir.path(), OCTET, RATINGS_SPLIT)?;
    let mesh_file = mesh_path.to_str().context("utf-8 path")?.to_string();
    let options = MeshfedOptions { ports: Some((support::free_port(), support::free_port())), ..Default::default() };
    let m = start_meshfed_with(&mesh_path, &options).await?;
    let (mut c, first) = ratings_client(&m, OCTET, 1).await?;
    assert_eq!(first, split);

    // a drill draining azure-weu for 10 minutes, aborting below 50% healthy
    traffic_cmd(&[
        "drill",
        "--cluster",
        "azure-weu",
        "--duration",
        "10m",
        "--abort-below-healthy",
        "50",
        "--mesh-config",
        &mesh_file,
    ])?;
    eds_until_shares(&mut c, RATINGS, "azure-weu drained", &[("us-east-1", 100)]).await?;
    // every aws-use1 endpoint (taking azure-weu's traffic) not ready: the drill aborts by itself
    let slices = dir.path().join("aws-use1/endpointslices.yaml");
    let healthy = std::fs::read_to_string(&slices)?;
    support::write_atomically(&slices, &healthy.replace("ready: true", "ready: false"))?;
    eds_until(&mut c, RATINGS, "azure-weu's share back", |s| s.get("westeurope").is_some_and(|w| *w > 0)).await?;
    let aborted = support::poll_until(STEP, || async {
        let d = m.debug_json("/debug/drillz").await?["drills"][0].clone();
        ensure!(d["aborted"]["at"].is_string() && d["aborted"]["reason"].is_string(), "not aborted: {d:#}");
        Ok(d["aborted"].clone())
    })
    .await
    .context("the drill aborts")?;
    // aws-use1 healthy again: the drill stays aborted (the split, not the drain)
    support::write_atomically(&slices, &healthy)?;
    eds_until_shares(
        &mut c,
        RATINGS,
        "aws-use1 healthy, the drill still aborted",
        &[("us-east-1", 70), ("westeurope", 30)],
    )
    .await?;
    // the file keeps the abort (by the drill's key: target and start)
    let kept = |path: &Path| -> Result<Vec<(String, String, String)>> {
        let traffic = last_known::read(path)?.map(|l| l.traffic).unwrap_or_default();
        Ok(traffic
            .drill_aborts
            .into_iter()
            .map(|(key, a)| (key, meshfed::traffic::decide::time_str(a.at), a.reason))
            .collect())
    };
    let in_file = support::poll_until(STEP, || async {
        let k = kept(&state)?;
        ensure!(k.len() == 1, "not kept yet in {}: {k:?}", state.display());
        Ok(k)
    })
    .await?;
    let (key, at, reason) = in_file[0].clone();
    assert_eq!((Some(at.as_str()), Some(reason.as_str())), (aborted["at"].as_str(), aborted["reason"].as_str()));
    ensure!(key.starts_with("cluster azure-weu @ "), "{key}");
    let file = std::fs::read_to_string(&mesh_path)?;
    ensure!(file.contains("abortBelowHealthy: 50"), "the file still lists the drill: {file}");

    // restarted with the same files, the receivers healthy: the drill is aborted from the first response
    drop(c);
    drop(m);
    let m = start_meshfed_with(&mesh_path, &options).await?;
    let (mut c, first) = ratings_client(&m, OCTET, 2).await?;
    assert_eq!(first, split, "the restarted meshfed does not apply the aborted drill's drain");
    let d = m.debug_json("/debug/drillz").await?["drills"][0].clone();
    assert_eq!(d["aborted"], aborted, "the same abort, time and reason: {d:#}");
    assert_eq!(d["active"], false, "{d:#}");
    let trafficz = m.debug_json("/debug/trafficz").await?;
    ensure!(trafficz["status"]["drained"].as_object().is_some_and(|d| d.is_empty()), "nothing drained: {trafficz:#}");
    eds_stays(&mut c, RATINGS, "the aborted drill stays aborted", Duration::from_secs(1)).await?;
    // and the restarted meshfed keeps it in the file
    assert_eq!(kept(&state)?, in_file);
    Ok(())
}
