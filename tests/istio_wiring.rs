//! `meshfed istio`: the Istio objects that wire meshfed's EDS in beside istiod.
//!
//! - every printed patch value parses as its Envoy proto, and a broken one is refused naming the patch;
//! - services are selected by namespace, host and Service label on the demo topology;
//! - the MERGE, applied with istiod's merge semantics to clusters shaped as istiod renders them
//!   (`tests/fixtures/istiod/`), gives clusters that real Envoy accepts (`--mode validate`), while a
//!   naive JSON merge of the same patch is refused (the negative control);
//! - a live Envoy takes the ADDed `meshfed-xds` cluster from CDS with Delta and refuses it with SotW
//!   (hence `--sotw` needs the bootstrap-override form, which Envoy accepts through `--config-yaml`, as
//!   Istio's agent passes it);
//! - Kubernetes clusters (the API stand-in) give the same objects as the same manifests; `--apply` writes
//!   them with server-side apply.
//!
//! Envoy is `$MESHFED_ENVOY`, else `<crate>/.venv/bin/envoy`; a missing Envoy fails the tests.

use meshfed_testkit as support;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use clap::Parser;
use meshfed::istio::envoy_filter::{
    BOOTSTRAP_MESSAGE, CLUSTER_MESSAGE, CUSTOM_BOOTSTRAP_KEY, check_objects, check_value,
};
use meshfed::istio::{Error, Inventory, IstioArgs, Options, Plan};
use meshfed::mesh_config::MeshConfig;
use serde_json::{Value, json};
use support::{ChildGuard, admin_get, envoy_path, meshfed_path};

const REVIEWS: &str = "reviews.shop.svc.cluster.local";
const RATINGS: &str = "ratings.shop.svc.cluster.local";
const ENVOY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: IstioArgs,
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn demo_mesh() -> PathBuf {
    crate_dir().join("examples/two-clouds/mesh.yaml")
}

fn fixture(name: &str) -> Value {
    let path = crate_dir().join("tests/fixtures/istiod").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("fixture is JSON")
}

/// `meshfed istio ARGV` parsed as the command line parses it (the demo's mesh config unless given).
fn args(argv: &[&str]) -> IstioArgs {
    let mut full = vec!["istio"];
    full.extend_from_slice(argv);
    let mut a = Cli::try_parse_from(full).expect("valid arguments").args;
    if a.mesh_config.is_none() {
        a.mesh_config = Some(demo_mesh());
    }
    a
}

async fn plan_of(argv: &[&str]) -> Result<Plan, Error> {
    let a = args(argv);
    let mesh = MeshConfig::load(a.mesh_config.as_deref().expect("set by args()"))?;
    let options = Options::from_args(&a, &mesh)?;
    let inventory = Inventory::load(&mesh, false).await?;
    meshfed::istio::plan(&inventory, &mesh, &options)
}

/// The wired (service, port) pairs of a plan.
fn wired(plan: &Plan) -> Vec<(String, u16)> {
    plan.ports.iter().map(|p| (p.service.to_string(), p.port)).collect()
}

/// Runs the meshfed binary to completion: (status, stdout, stderr).
fn run_meshfed(argv: &[&str]) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(meshfed_path());
    cmd.args(argv).env("RUST_LOG", "warn");
    let mut guard = ChildGuard::spawn("meshfed-istio", &mut cmd).expect("spawning meshfed");
    let status = guard.wait_exit(support::COMMAND_TIMEOUT).expect("meshfed exits");
    (status, guard.stdout(), guard.stderr())
}

/// The documents of a YAML stream.
fn documents(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).expect("YAML")).expect("JSON-compatible"))
        .filter(|v| !v.is_null())
        .collect()
}

fn patches<'a>(objects: &'a [Value], operation: &str, context: &str) -> Vec<&'a Value> {
    objects
        .iter()
        .filter(|o| o["kind"] == "EnvoyFilter")
        .flat_map(|o| o["spec"]["configPatches"].as_array().expect("configPatches"))
        .filter(|p| p["patch"]["operation"] == operation && p["match"]["context"] == context)
        .collect()
}

/// The value of the MERGE patch of `fqdn:port` (sidecar context) in the first EnvoyFilter.
fn merge_value<'a>(objects: &'a [Value], fqdn: &str, port: u16) -> &'a Value {
    let p = patches(objects, "MERGE", "SIDECAR_OUTBOUND")
        .into_iter()
        .find(|p| p["match"]["cluster"]["service"] == fqdn && p["match"]["cluster"]["portNumber"] == port)
        .unwrap_or_else(|| panic!("no MERGE for {fqdn}:{port}"));
    &p["patch"]["value"]
}

fn add_value(objects: &[Value]) -> Value {
    patches(objects, "ADD", "SIDECAR_OUTBOUND").first().expect("an ADD patch")["patch"]["value"].clone()
}

/// A cluster as a config dump prints it, without the `@type` Envoy refuses in a bootstrap.
fn without_type(mut cluster: Value) -> Value {
    if let Value::Object(m) = &mut cluster {
        m.remove("@type");
    }
    cluster
}

/// `envoy --mode validate` on a JSON bootstrap: (success, stderr+stdout).
fn envoy_validate(bootstrap: &Value) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bootstrap.json");
    std::fs::write(&file, serde_json::to_string_pretty(bootstrap).unwrap()).unwrap();
    let mut cmd = Command::new(envoy_path());
    cmd.args(["--mode", "validate", "--use-dynamic-base-id", "--log-level", "warning", "-c"]).arg(&file);
    let mut guard = ChildGuard::spawn("envoy-validate", &mut cmd).expect("spawning envoy");
    let status = guard.wait_exit(ENVOY_TIMEOUT).expect("envoy --mode validate exits");
    (status.success(), format!("{}{}", guard.stderr(), guard.stdout()))
}

/// Merges the way a naive tool would: JSON objects recursively, everything else replaced (oneofs are not
/// known, so `ads` stays next to `api_config_source`).
fn naive_json_merge(dst: &mut Value, src: &Value) {
    match (dst, src) {
        (Value::Object(d), Value::Object(s)) => {
            for (k, v) in s {
                match d.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => naive_json_merge(existing, v),
                    _ => {
                        d.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (d, s) => *d = s.clone(),
    }
}

// ---- printed values ----

#[test]
fn printed_patch_values_parse_as_envoy_protos() {
    let cases: &[&[&str]] = &[
        &["istio", "--all", "--context", "sidecar,gateway", "--scope", "mesh"],
        &["istio", "--service-namespace", "shop", "--static-cluster", "--sotw", "--namespace", "shop,web"],
        &["istio", "--host", "reviews.shop", "--subsets", "exclude", "--meshfed-address", "10.0.0.7:15012"],
    ];
    let mut total = 0;
    for argv in cases {
        let (status, stdout, stderr) = run_meshfed(argv);
        assert!(status.success(), "{argv:?}: {status}\n{stderr}");
        let objects = documents(&stdout);
        assert!(!objects.is_empty(), "{argv:?}: nothing printed\n{stdout}");
        let mut values = 0;
        for o in &objects {
            for (i, p) in o["spec"]["configPatches"].as_array().into_iter().flatten().enumerate() {
                check_value(&format!("{argv:?} configPatches[{i}]"), CLUSTER_MESSAGE, &p["patch"]["value"])
                    .unwrap_or_else(|e| panic!("{e}"));
                values += 1;
            }
            if let Some(text) = o["data"][CUSTOM_BOOTSTRAP_KEY].as_str() {
                let bootstrap: Value = serde_json::from_str(text).expect("custom_bootstrap.json is JSON");
                check_value("custom bootstrap", BOOTSTRAP_MESSAGE, &bootstrap).unwrap_or_else(|e| panic!("{e}"));
                values += 1;
            }
        }
        assert_eq!(check_objects(&objects).unwrap(), values, "{argv:?}");
        total += values;
    }
    assert!(total > 20, "{total} values checked");

    // the bootstrap-override form: ConfigMaps in the client namespaces, no ADD, filters select the label
    let (_, stdout, stderr) = run_meshfed(cases[1]);
    let objects = documents(&stdout);
    let kinds: Vec<(String, String)> = objects
        .iter()
        .map(|o| (o["kind"].as_str().unwrap().to_string(), o["metadata"]["namespace"].as_str().unwrap().to_string()))
        .collect();
    let expected: Vec<(String, String)> =
        [("ConfigMap", "shop"), ("ConfigMap", "web"), ("EnvoyFilter", "shop"), ("EnvoyFilter", "web")]
            .iter()
            .map(|(k, n)| (k.to_string(), n.to_string()))
            .collect();
    assert_eq!(kinds, expected);
    assert!(patches(&objects, "ADD", "SIDECAR_OUTBOUND").is_empty());
    assert_eq!(objects[2]["spec"]["workloadSelector"], json!({ "labels": { "meshfed.io/static-xds": "true" } }));
    let v = merge_value(&objects, REVIEWS, 9080);
    assert_eq!(v["eds_cluster_config"]["eds_config"]["api_config_source"]["api_type"], "GRPC");
    assert!(
        stderr.contains("note: bootstrap-override form")
            && stderr.contains("sidecar.istio.io/bootstrapOverride: meshfed-eds-bootstrap"),
        "{stderr}"
    );

    // --subsets exclude matches the exact cluster name; an IP address gives a STATIC cluster without SNI
    let (_, stdout, _) = run_meshfed(cases[2]);
    let objects = documents(&stdout);
    let merges = patches(&objects, "MERGE", "SIDECAR_OUTBOUND");
    assert_eq!(merges.len(), 1);
    assert_eq!(merges[0]["match"]["cluster"], json!({ "name": "outbound|9080||reviews.shop.svc.cluster.local" }));
    let add = add_value(&objects);
    assert_eq!(add["type"], "STATIC");
    assert!(add["transport_socket"]["typed_config"].get("sni").is_none(), "{add:#}");
}

#[test]
fn a_broken_patch_value_is_refused_naming_the_patch() {
    let (status, stdout, _) = run_meshfed(&["istio", "--all", "--scope", "mesh"]);
    assert!(status.success());
    let mut objects = documents(&stdout);
    check_objects(&objects).expect("as printed");
    // a misspelt field in the second patch (the first MERGE)
    objects[0]["spec"]["configPatches"][1]["patch"]["value"]["eds_cluster_config"]["eds_config"]["api_config_source"]
        ["api_typ"] = json!("DELTA_GRPC");
    let e = check_objects(&objects).unwrap_err().to_string();
    assert!(e.starts_with("EnvoyFilter istio-system/meshfed-eds configPatches[1] (MERGE SIDECAR_OUTBOUND "), "{e}");
    assert!(e.contains("not a valid envoy.config.cluster.v3.Cluster") && e.contains("api_typ"), "{e}");
    // a value of the wrong type
    let mut objects = documents(&stdout);
    objects[0]["spec"]["configPatches"][0]["patch"]["value"]["connect_timeout"] = json!(10);
    let e = check_objects(&objects).unwrap_err().to_string();
    assert!(e.contains("configPatches[0] (ADD SIDECAR_OUTBOUND meshfed-xds)"), "{e}");
}

// ---- selection ----

#[tokio::test]
async fn selection_by_namespace_host_and_label() {
    let p = plan_of(&["--service-namespace", "shop"]).await.unwrap();
    let shop = vec![
        ("shop/frontend".to_string(), 8080),
        ("shop/ratings".to_string(), 9080),
        ("shop/ratings".to_string(), 9091),
        ("shop/reviews".to_string(), 9080),
    ];
    assert_eq!(wired(&p), shop);
    assert_eq!(p.objects.len(), 1);
    assert_eq!(p.objects[0]["metadata"]["namespace"], "shop");
    // one ADD and one MERGE per port
    assert_eq!(p.objects[0]["spec"]["configPatches"].as_array().unwrap().len(), 5);
    assert_eq!(p.checked_values, 5);

    let p = plan_of(&["--host", "reviews.shop"]).await.unwrap();
    assert_eq!(wired(&p), vec![("shop/reviews".to_string(), 9080)]);
    let p = plan_of(&["--host", "shop/ratings", "--host", "frontend.shop.svc.cluster.local"]).await.unwrap();
    assert_eq!(wired(&p).len(), 3);

    let p = plan_of(&["--selector", "app=reviews"]).await.unwrap();
    assert_eq!(wired(&p), vec![("shop/reviews".to_string(), 9080)]);
    let p = plan_of(&["-l", "app in (reviews,ratings),service!=ratings"]).await.unwrap();
    assert_eq!(wired(&p), vec![("shop/reviews".to_string(), 9080)]);

    // --all: the east-west gateways' Service too, one filter per namespace, in each context
    let p = plan_of(&["--all", "--context", "sidecar,gateway"]).await.unwrap();
    assert!(wired(&p).contains(&("istio-system/istio-eastwestgateway".to_string(), 15443)));
    let namespaces: Vec<&str> = p.objects.iter().map(|o| o["metadata"]["namespace"].as_str().unwrap()).collect();
    assert_eq!(namespaces, ["istio-system", "shop"]);
    assert_eq!(patches(&p.objects, "ADD", "GATEWAY").len(), 2);
    assert!(p.warnings.iter().any(|w| w.contains("--context gateway with --scope namespace")), "{:?}", p.warnings);
    let p = plan_of(&["--all", "--scope", "mesh", "--root-namespace", "mesh-root"]).await.unwrap();
    assert_eq!(p.objects.len(), 1);
    assert_eq!(p.objects[0]["metadata"]["namespace"], "mesh-root");
    assert!(p.objects[0]["spec"].get("workloadSelector").is_none());

    // filters combine; what selects nothing is an error
    assert!(matches!(
        plan_of(&["--service-namespace", "istio-system", "--host", "reviews.shop"]).await,
        Err(Error::NothingSelected(_))
    ));
    assert!(matches!(plan_of(&["--selector", "meshfed.io/federate=true"]).await, Err(Error::NothingSelected(_))));
    assert!(matches!(plan_of(&["--host", "nosuch.shop"]).await, Err(Error::UnknownHost(h)) if h == "nosuch.shop"));
    let e = plan_of(&[]).await.unwrap_err().to_string();
    assert!(e.contains("--all, --service-namespace"), "{e}");
    assert!(matches!(plan_of(&["--selector", "a in (b"]).await, Err(Error::Options(_))));
}

/// A copy of the demo with extra files in a cluster's directory and the mesh config edited.
fn demo_copy(extra: &[(&str, &str)], edit: impl Fn(String) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = crate_dir().join("examples/two-clouds");
    for cluster in ["aws-use1", "azure-weu"] {
        std::fs::create_dir_all(dir.path().join(cluster)).unwrap();
        for entry in std::fs::read_dir(src.join(cluster)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.path().join(cluster).join(entry.file_name())).unwrap();
        }
    }
    for (path, text) in extra {
        std::fs::write(dir.path().join(path), text).unwrap();
    }
    let mesh = std::fs::read_to_string(src.join("mesh.yaml")).unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), edit(mesh)).unwrap();
    dir
}

#[tokio::test]
async fn a_label_on_one_clusters_service_selects_it() {
    let aws = crate_dir().join("examples/two-clouds/aws-use1/services.yaml");
    let labelled = std::fs::read_to_string(aws).unwrap().replace(
        "    app: ratings\n    service: ratings\n",
        "    app: ratings\n    meshfed.io/federate: \"true\"\n    service: ratings\n",
    );
    let dir = demo_copy(&[("aws-use1/services.yaml", &labelled)], |m| m);
    let mesh = dir.path().join("mesh.yaml");
    let p = plan_of(&["--mesh-config", mesh.to_str().unwrap(), "-l", "meshfed.io/federate=true"]).await.unwrap();
    assert_eq!(wired(&p), vec![("shop/ratings".to_string(), 9080), ("shop/ratings".to_string(), 9091)]);
}

// ---- what the MERGE carries ----

#[tokio::test]
async fn merges_carry_eds_locality_weights_and_default_outlier_detection() {
    let p = plan_of(&["--service-namespace", "shop", "--initial-fetch-timeout", "2.5s"]).await.unwrap();
    let extras = |svc: &str, port: u16| {
        p.ports.iter().find(|w| w.service.to_string() == svc && w.port == port).expect("wired").extras.clone()
    };
    // reviews: its DestinationRule has outlier detection (istiod renders it) and failover (meshfed's weights)
    let r = extras("shop/reviews", 9080);
    assert!(r.locality_weighted && r.outlier_detection.is_none(), "{r:?}");
    // ratings 9080: `distribute`; no rule gives outlier detection: the mesh defaults' (5 x 5xx, 10s, 30s, 100%)
    let r = extras("shop/ratings", 9080);
    assert!(r.locality_weighted);
    let (od, panic) = r.outlier_detection.expect("from the mesh defaults");
    assert_eq!(
        od,
        json!({ "consecutive_5xx": 5, "enforcing_consecutive_5xx": 100, "enforcing_success_rate": 0, "interval": "10s", "base_ejection_time": "30s", "max_ejection_percent": 100 })
    );
    assert_eq!(panic, json!({ "value": 0.0 }));
    // ratings 9091: the mesh defaults' failover and outlier detection
    let r = extras("shop/ratings", 9091);
    assert!(r.locality_weighted && r.outlier_detection.is_some());
    for svc in ["shop/frontend port 8080", "shop/ratings port 9080", "shop/ratings port 9091"] {
        assert!(
            p.warnings.iter().any(|w| w.starts_with(svc) && w.contains("defaults.outlierDetection")),
            "{svc}: {:?}",
            p.warnings
        );
    }
    assert!(!p.warnings.iter().any(|w| w.contains("shop/reviews")), "{:?}", p.warnings);

    let v = merge_value(&p.objects, REVIEWS, 9080);
    assert_eq!(
        v["eds_cluster_config"]["eds_config"],
        json!({
            "api_config_source": {
                "api_type": "DELTA_GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{ "envoy_grpc": { "cluster_name": "meshfed-xds" } }],
                "set_node_on_first_message_only": true
            },
            "resource_api_version": "V3",
            "initial_fetch_timeout": "2.500s"
        })
    );
    assert_eq!(v["common_lb_config"], json!({ "locality_weighted_lb_config": {} }));
    assert!(v.get("outlier_detection").is_none());
    let v = merge_value(&p.objects, RATINGS, 9091);
    assert_eq!(
        v["common_lb_config"],
        json!({ "locality_weighted_lb_config": {}, "healthy_panic_threshold": { "value": 0.0 } })
    );
    assert_eq!(v["outlier_detection"]["consecutive_5xx"], 5);

    // without mesh defaults: only what the DestinationRules give
    let dir = demo_copy(&[], |m| m.split("\ndefaults:").next().unwrap().to_string() + "\n");
    let mesh = dir.path().join("mesh.yaml");
    let p = plan_of(&["--mesh-config", mesh.to_str().unwrap(), "--service-namespace", "shop"]).await.unwrap();
    let ratings_9091 = p.ports.iter().find(|w| w.service.to_string() == "shop/ratings" && w.port == 9091).unwrap();
    assert_eq!(ratings_9091.extras, meshfed::istio::MergeExtras::default());
    let v = merge_value(&p.objects, RATINGS, 9091);
    assert!(v.get("common_lb_config").is_none() && v.get("outlier_detection").is_none(), "{v:#}");
    assert!(merge_value(&p.objects, RATINGS, 9080)["common_lb_config"]["locality_weighted_lb_config"].is_object());
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[tokio::test]
async fn only_subsets_meshfed_cannot_serve_are_warned_about() {
    // the demo's reviews rule has subsets v1 and v2, which meshfed serves: no warning
    assert!(!plan_of(&["--host", "reviews.shop"]).await.unwrap().warnings.iter().any(|w| w.contains("subsets")));
    let valid = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: reviews-versions\n  namespace: shop\nspec:\n  host: reviews\n  subsets:\n  - name: v3\n    labels: {version: v3}\n";
    // a rule meshfed rejects (an interval that is not a duration): its subsets' clusters would get no endpoints
    let invalid = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: reviews-broken\n  namespace: shop\nspec:\n  host: reviews\n  trafficPolicy:\n    outlierDetection: {interval: soon}\n  subsets:\n  - name: v4\n    labels: {version: v4}\n  - name: v5\n    labels: {version: v5}\n";
    let dir = demo_copy(&[("azure-weu/subsets.yaml", valid), ("azure-weu/broken.yaml", invalid)], |m| m);
    let mesh = dir.path().join("mesh.yaml");
    let p = plan_of(&["--mesh-config", mesh.to_str().unwrap(), "--host", "reviews.shop"]).await.unwrap();
    let w: Vec<&String> = p.warnings.iter().filter(|w| w.contains("subsets")).collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with(
            "shop/reviews: DestinationRule subsets v4 (shop/reviews-broken), v5 (shop/reviews-broken): meshfed rejects"
        ),
        "{}",
        w[0]
    );
    let p = plan_of(&["--mesh-config", mesh.to_str().unwrap(), "--host", "reviews.shop", "--subsets", "exclude"])
        .await
        .unwrap();
    assert!(!p.warnings.iter().any(|w| w.contains("subsets")), "{:?}", p.warnings);
}

#[tokio::test]
async fn options_that_cannot_work_are_refused() {
    for (argv, reason) in [
        (vec!["--all", "--name", "Bad_Name"], "not a valid object name"),
        (vec!["--all", "--namespace", "shop.x"], "not a valid namespace name"),
        (vec!["--all", "--initial-fetch-timeout", "0s"], "forever"),
        (vec!["--all", "--meshfed-address", "meshfed"], "--meshfed-address"),
    ] {
        let e = plan_of(&argv).await.unwrap_err().to_string();
        assert!(e.contains(reason), "{argv:?}: {e}");
    }
    // --sotw without --static-cluster: refused by the command line already
    assert!(Cli::try_parse_from(["istio", "--all", "--sotw"]).is_err());
    assert!(Cli::try_parse_from(["istio", "--all", "--preview", "x", "--apply"]).is_err());
}

// ---- istiod's merge, checked by real Envoy ----

#[tokio::test]
async fn istiod_clusters_with_the_merge_are_accepted_by_envoy() {
    let p = plan_of(&["--host", "reviews.shop,ratings.shop"]).await.unwrap();
    let reviews = meshfed::istio::merge::merge_json(
        &fixture("reviews-9080.cluster.json"),
        merge_value(&p.objects, REVIEWS, 9080),
    )
    .unwrap();
    let ratings = meshfed::istio::merge::merge_json(
        &fixture("ratings-9091.cluster.json"),
        merge_value(&p.objects, RATINGS, 9091),
    )
    .unwrap();

    // istiod's cluster is kept; its EDS config source is meshfed's
    for (merged, original) in
        [(&reviews, fixture("reviews-9080.cluster.json")), (&ratings, fixture("ratings-9091.cluster.json"))]
    {
        let eds = &merged["eds_cluster_config"];
        assert_eq!(eds["service_name"], original["name"]);
        assert!(eds["eds_config"].get("ads").is_none(), "{merged:#}");
        assert_eq!(
            eds["eds_config"]["api_config_source"]["grpc_services"][0]["envoy_grpc"]["cluster_name"],
            "meshfed-xds"
        );
        assert_eq!(eds["eds_config"]["initial_fetch_timeout"], "15s");
        for key in ["name", "type", "connect_timeout", "lb_policy", "circuit_breakers", "metadata", "alt_stat_name"] {
            assert_eq!(merged[key], original[key], "{key}");
        }
        assert_eq!(merged["transport_socket_matches"].as_array().unwrap().len(), 2);
    }
    // reviews: istiod's outlier detection (from the DestinationRule) untouched
    assert_eq!(reviews["outlier_detection"], fixture("reviews-9080.cluster.json")["outlier_detection"]);
    // ratings 9091: the mesh defaults' outlier detection and locality weighting added
    assert_eq!(ratings["outlier_detection"]["consecutive_5xx"], 5);
    assert_eq!(
        ratings["common_lb_config"],
        json!({ "healthy_panic_threshold": {}, "locality_weighted_lb_config": {} })
    );
    assert_eq!(
        ratings["typed_extension_protocol_options"],
        fixture("ratings-9091.cluster.json")["typed_extension_protocol_options"]
    );

    // real Envoy: istiod's bootstrap (sds-grpc, xds-grpc) + the merged clusters + the ADDed meshfed-xds
    let mut bootstrap = fixture("sidecar-bootstrap.json");
    let clusters = bootstrap["static_resources"]["clusters"].as_array_mut().unwrap();
    clusters.extend([reviews.clone(), ratings.clone(), add_value(&p.objects)]);
    let (ok, log) = envoy_validate(&bootstrap);
    assert!(ok, "Envoy refused the merged clusters:\n{log}");

    // negative control: the same patch merged as plain JSON leaves istiod's `ads` beside meshfed's
    // `api_config_source` in one oneof; Envoy refuses it (so the check above can fail)
    let mut naive = without_type(fixture("reviews-9080.cluster.json"));
    naive_json_merge(&mut naive, merge_value(&p.objects, REVIEWS, 9080));
    let mut bootstrap = fixture("sidecar-bootstrap.json");
    bootstrap["static_resources"]["clusters"].as_array_mut().unwrap().extend([naive, add_value(&p.objects)]);
    let (ok, log) = envoy_validate(&bootstrap);
    assert!(!ok, "Envoy accepted two members of a oneof");
    assert!(log.contains("already") && log.contains("oneof"), "{log}");
}

#[tokio::test]
async fn preview_shows_the_clusters_istiod_would_render() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("clusters.json");
    let clusters = json!([fixture("reviews-9080.cluster.json"), fixture("ratings-9091.cluster.json")]);
    std::fs::write(&file, clusters.to_string()).unwrap();
    let (status, stdout, stderr) =
        run_meshfed(&["istio", "--host", "reviews.shop", "--preview", file.to_str().unwrap()]);
    assert!(status.success(), "{stderr}");
    let previewed: Vec<Value> = serde_json::from_str(&stdout).expect("a JSON array");
    let p = plan_of(&["--host", "reviews.shop"]).await.unwrap();
    let expected = meshfed::istio::merge::merge_json(
        &fixture("reviews-9080.cluster.json"),
        merge_value(&p.objects, REVIEWS, 9080),
    )
    .unwrap();
    assert_eq!(previewed[0], expected);
    // ratings is not selected: unchanged (normalized through the descriptor pool)
    assert_eq!(previewed[1]["eds_cluster_config"]["eds_config"]["ads"], json!({}));
    assert!(
        stderr.contains(
            "note: 1 of 2 clusters patched (SIDECAR_OUTBOUND): outbound|9080||reviews.shop.svc.cluster.local (1)"
        ),
        "{stderr}"
    );
}

// ---- live Envoy: CDS-added meshfed-xds, Delta vs SotW, the bootstrap override ----

/// Starts Envoy on `bootstrap` (admin on a free port) with clusters from a CDS file holding `clusters`,
/// optionally with `--config-yaml OVERRIDE` (what Istio's agent does with a bootstrap override), and
/// waits until CDS has been applied or rejected: (stats `cluster_manager.cds.*`, dynamic cluster names,
/// the Envoy log).
async fn run_with_cds(clusters: &[Value], override_json: Option<&str>) -> (Value, Vec<String>, String) {
    let dir = tempfile::tempdir().unwrap();
    let cds = dir.path().join("cds.json");
    let resources: Vec<Value> = clusters
        .iter()
        .map(|c| {
            let mut c = without_type(c.clone());
            c["@type"] = json!("type.googleapis.com/envoy.config.cluster.v3.Cluster");
            c
        })
        .collect();
    std::fs::write(&cds, json!({ "version_info": "1", "resources": resources }).to_string()).unwrap();
    let mut bootstrap = fixture("sidecar-bootstrap.json");
    bootstrap["dynamic_resources"] =
        json!({ "cds_config": { "path_config_source": { "path": cds }, "resource_api_version": "V3" } });
    bootstrap["admin"]["address"]["socket_address"]["port_value"] = json!(0);
    let config = dir.path().join("bootstrap.json");
    std::fs::write(&config, bootstrap.to_string()).unwrap();
    let admin_file = dir.path().join("admin");
    let mut cmd = Command::new(envoy_path());
    cmd.arg("-c").arg(&config).args(["--use-dynamic-base-id", "--concurrency", "1", "--log-level", "info"]);
    cmd.arg("--admin-address-path").arg(&admin_file);
    if let Some(o) = override_json {
        cmd.args(["--config-yaml", o]);
    }
    let mut envoy = ChildGuard::spawn("envoy-cds", &mut cmd).expect("spawning envoy");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = envoy.try_exited() {
            panic!("Envoy exited ({status})\n{}", envoy.log_tail());
        }
        assert!(Instant::now() < deadline, "CDS not applied within 30s\n{}", envoy.log_tail());
        let port =
            std::fs::read_to_string(&admin_file).ok().and_then(|a| a.trim().parse::<std::net::SocketAddr>().ok());
        if let Some(addr) = port
            && let Ok(text) = admin_get(addr.port(), "/stats?format=json&filter=^cluster_manager\\.cds\\.update_").await
        {
            let stats: Value = serde_json::from_str(&text).expect("JSON stats");
            let get = |name: &str| {
                stats["stats"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|s| s["name"] == name)
                    .and_then(|s| s["value"].as_u64())
                    .unwrap_or(0)
            };
            let (success, rejected) =
                (get("cluster_manager.cds.update_success"), get("cluster_manager.cds.update_rejected"));
            if success + rejected > 0 {
                let dump: Value = serde_json::from_str(
                    &admin_get(addr.port(), "/config_dump?resource=dynamic_active_clusters").await.unwrap(),
                )
                .unwrap();
                let warming: Value = serde_json::from_str(
                    &admin_get(addr.port(), "/config_dump?resource=dynamic_warming_clusters").await.unwrap(),
                )
                .unwrap();
                let mut names: Vec<String> = dump["configs"]
                    .as_array()
                    .into_iter()
                    .chain(warming["configs"].as_array())
                    .flatten()
                    .filter_map(|c| c["cluster"]["name"].as_str().map(str::to_string))
                    .collect();
                names.sort();
                let counts = json!({ "update_success": success, "update_rejected": rejected });
                let log = envoy.stderr() + &envoy.stdout();
                envoy.kill();
                return (counts, names, log);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn envoy_takes_meshfed_xds_from_cds_with_delta_and_needs_it_static_with_sotw() {
    let reviews = fixture("reviews-9080.cluster.json");
    let ratings = fixture("ratings-9091.cluster.json");
    let merged = |p: &Plan| {
        vec![
            meshfed::istio::merge::merge_json(&reviews, merge_value(&p.objects, REVIEWS, 9080)).unwrap(),
            meshfed::istio::merge::merge_json(&ratings, merge_value(&p.objects, RATINGS, 9091)).unwrap(),
        ]
    };
    let expected_names = vec![
        "meshfed-xds".to_string(),
        "outbound|9080||reviews.shop.svc.cluster.local".to_string(),
        "outbound|9091||ratings.shop.svc.cluster.local".to_string(),
    ];

    // Delta (the default): istiod's CDS carries the merged clusters and the ADDed meshfed-xds (after them)
    let delta = plan_of(&["--host", "reviews.shop,ratings.shop"]).await.unwrap();
    let mut clusters = merged(&delta);
    clusters.push(add_value(&delta.objects));
    let (counts, names, log) = run_with_cds(&clusters, None).await;
    assert_eq!(counts, json!({ "update_success": 1, "update_rejected": 0 }), "{log}");
    assert_eq!(names, expected_names);

    // SotW with meshfed-xds from CDS: Envoy rejects the clusters that use it
    let sotw = plan_of(&["--host", "reviews.shop,ratings.shop", "--sotw", "--static-cluster"]).await.unwrap();
    let mut clusters = merged(&sotw);
    clusters.push(add_value(&delta.objects));
    let (counts, _, log) = run_with_cds(&clusters, None).await;
    assert_eq!(counts["update_rejected"], 1, "{log}");
    assert!(log.contains("must have a statically defined non-EDS cluster: 'meshfed-xds'"), "{log}");

    // SotW with the bootstrap override (the ConfigMap's custom_bootstrap.json, passed as --config-yaml):
    // accepted, meshfed-xds static
    let config_map = sotw.objects.iter().find(|o| o["kind"] == "ConfigMap").expect("a bootstrap ConfigMap");
    let override_json = config_map["data"][CUSTOM_BOOTSTRAP_KEY].as_str().unwrap();
    // There is no Istio agent here to serve the SDS secrets `default` and `ROOTCA`: with Istio's 0s a
    // static cluster waits for them forever, and Envoy would never get to CDS. Only here, give up after
    // half a second.
    assert_eq!(override_json.matches("\"initial_fetch_timeout\": \"0s\"").count(), 2, "{override_json}");
    let override_json =
        override_json.replace("\"initial_fetch_timeout\": \"0s\"", "\"initial_fetch_timeout\": \"0.5s\"");
    let (counts, names, log) = run_with_cds(&merged(&sotw), Some(&override_json)).await;
    assert_eq!(counts, json!({ "update_success": 1, "update_rejected": 0 }), "{log}");
    assert_eq!(names, expected_names[1..].to_vec());
}

// ---- Kubernetes clusters and --apply (the API stand-in) ----

/// Loads every object of a manifest directory into the stand-in.
fn load_into(standin: &meshfed_testkit::kube_standin::KubeStandin, dir: &Path) {
    fn add(standin: &meshfed_testkit::kube_standin::KubeStandin, v: Value) {
        if v["kind"] == "List" {
            for item in v["items"].as_array().cloned().unwrap_or_default() {
                add(standin, item);
            }
        } else if !v.is_null() {
            standin.apply(v).expect("a kind the stand-in serves");
        }
    }
    for entry in std::fs::read_dir(dir).unwrap() {
        for doc in documents(&std::fs::read_to_string(entry.unwrap().path()).unwrap()) {
            add(standin, doc);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_clusters_give_the_same_objects_and_apply_writes_them() {
    let standin = meshfed_testkit::kube_standin::KubeStandin::start().await.unwrap();
    load_into(&standin, &crate_dir().join("examples/two-clouds/aws-use1"));
    let dir = demo_copy(&[], |m| m.replace("manifests: aws-use1", "kubeconfig: aws.kubeconfig"));
    std::fs::write(dir.path().join("aws.kubeconfig"), standin.kubeconfig("aws", None)).unwrap();
    let mesh = dir.path().join("mesh.yaml");
    let argv = ["--service-namespace", "shop", "--context", "sidecar,gateway", "--namespace", "shop,istio-ingress"];
    let mut with_mesh = vec!["--mesh-config", mesh.to_str().unwrap()];
    with_mesh.extend(argv);
    let from_kube = plan_of(&with_mesh).await.unwrap();
    let from_files = plan_of(&argv).await.unwrap();
    assert_eq!(from_kube.objects, from_files.objects);
    assert_eq!(from_kube.warnings, from_files.warnings);
    assert!(standin.list_requests("services") >= 1 && standin.list_requests("destinationrules") >= 1);

    // --apply: server-side apply of every printed object
    let kubeconfig = dir.path().join("aws.kubeconfig");
    let mut apply_argv =
        vec!["istio", "--mesh-config", mesh.to_str().unwrap(), "--apply", "--kubeconfig", kubeconfig.to_str().unwrap()];
    apply_argv.extend(argv);
    apply_argv.push("--static-cluster");
    let owned: Vec<String> = apply_argv.iter().map(|s| s.to_string()).collect();
    let run = || {
        let owned = owned.clone();
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
            run_meshfed(&refs)
        })
    };
    let (status, stdout, stderr) = run().await.unwrap();
    assert!(status.success(), "{stderr}");
    let printed = documents(&stdout);
    assert_eq!(printed.len(), 4, "two ConfigMaps and two EnvoyFilters");
    for o in &printed {
        let (api_version, kind) = (o["apiVersion"].as_str().unwrap(), o["kind"].as_str().unwrap());
        let (ns, name) = (o["metadata"]["namespace"].as_str().unwrap(), o["metadata"]["name"].as_str().unwrap());
        let stored =
            standin.get(api_version, kind, ns, name).unwrap_or_else(|| panic!("{kind} {ns}/{name} not applied"));
        assert_eq!(stored["spec"], o["spec"]);
        assert_eq!(stored["data"], o["data"]);
        assert_eq!(stored["metadata"]["labels"], o["metadata"]["labels"]);
        assert_eq!(stored["metadata"]["managedFields"][0]["manager"], "meshfed");
        assert!(stderr.contains(&format!("applied {kind} {ns}/{name} (resourceVersion ")), "{stderr}");
    }
    let before = standin.get("networking.istio.io/v1alpha3", "EnvoyFilter", "shop", "meshfed-eds").unwrap();
    // applying again replaces (same uid, a new resourceVersion); nothing else appears
    let (status, _, stderr) = run().await.unwrap();
    assert!(status.success(), "{stderr}");
    let after = standin.get("networking.istio.io/v1alpha3", "EnvoyFilter", "shop", "meshfed-eds").unwrap();
    assert_eq!(after["metadata"]["uid"], before["metadata"]["uid"]);
    assert_ne!(after["metadata"]["resourceVersion"], before["metadata"]["resourceVersion"]);
    assert_eq!(standin.list("networking.istio.io/v1alpha3", "EnvoyFilter").len(), 2);
    assert_eq!(standin.list("v1", "ConfigMap").len(), 2);

    // an unreachable config cluster is an error naming the object
    let dead = dir.path().join("dead.kubeconfig");
    let url = format!("http://127.0.0.1:{}", support::free_port());
    std::fs::write(&dead, meshfed_testkit::kube_standin::kubeconfig_yaml("dead", &url, None)).unwrap();
    let dead = dead.to_str().unwrap().to_string();
    let (status, _, stderr) = tokio::task::spawn_blocking(move || {
        run_meshfed(&["istio", "--host", "reviews.shop", "--apply", "--kubeconfig", &dead])
    })
    .await
    .unwrap();
    assert!(!status.success());
    assert!(stderr.contains("error: --apply: EnvoyFilter shop/meshfed-eds:"), "{stderr}");
}
