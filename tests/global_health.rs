//! Global DNS health (`--global-health-address`, [`meshfed::global_health`]) on the in-process app with
//! the demo mesh (aws-use1 on aws-net, azure-weu on azure-net): `/global/health` follows the traffic
//! decision within the push that changes it (a drain to 0 and back), a fenced network answers 503, an
//! API server that does not answer while its gateways are up does not, and nothing but
//! `GET /global/health` is served.

use meshfed_testkit as support;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use meshfed::app::{App, DebugListener, Listen, Options};
use meshfed::mesh_config::MeshConfig;
use meshfed::model::{ClusterId, NetworkId};
use meshfed::source::SourceEvent;
use meshfed::traffic::TrafficPolicy;
use serde_json::Value;
use support::http_get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RATINGS: &str = "ratings.shop.svc.cluster.local";

async fn start() -> (App, tempfile::TempDir) {
    let dir = tempfile::Builder::new().prefix("meshfed-global-health-").tempdir().unwrap();
    let mesh_path = support::server::copy_demo(dir.path(), 94);
    let mesh = MeshConfig::load(&mesh_path).unwrap();
    let mut options = Options::in_process(mesh.clone(), support::server::files_events(&mesh));
    options.global_health = Some(Listen::loopback());
    options.debug = Some(DebugListener { listen: Listen::loopback(), access: Default::default(), demo: false });
    let app = tokio::time::timeout(Duration::from_secs(20), App::start(options)).await.unwrap().unwrap();
    (app, dir)
}

async fn health(addr: SocketAddr, query: &str) -> (u16, Value) {
    let (status, body) = http_get(addr, "meshfed", &format!("/global/health?{query}")).await.unwrap();
    let json: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{query}: {e}: {body:?}"));
    (status, json)
}

fn policy(drains: &str) -> TrafficPolicy {
    let expires = meshfed::traffic::decide::time_str(SystemTime::now() + Duration::from_secs(3600));
    let yaml = format!(
        "policies:\n  - hosts: [{RATINGS}]\ndrains: [{}]\n",
        drains.replace("EXPIRES", &format!("'{expires}'"))
    );
    let ids = [ClusterId::new("aws-use1"), ClusterId::new("azure-weu")];
    TrafficPolicy::parse(&serde_yaml::from_str(&yaml).unwrap(), &ids, SystemTime::now()).unwrap()
}

/// Runs `f` on the push loop and waits for the push it causes.
async fn pushed(app: &App, f: impl FnOnce()) {
    let before = app.push.snapshot().generation;
    f();
    tokio::time::timeout(Duration::from_secs(10), app.wait_generation_after(before)).await.expect("a push");
}

async fn metric(app: &App, cluster: &str) -> String {
    let (_, text) = http_get(app.debug_address().unwrap(), "meshfed", "/metrics").await.unwrap();
    let prefix = format!("meshfed_global_health{{cluster=\"{cluster}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("{prefix} in {text}")).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_health_follows_drains_and_fenced_networks() {
    let (app, _dir) = start().await;
    let addr = app.global_health_address().expect("listening");

    let (status, body) = health(addr, "cluster=azure-weu").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["healthy"], true);
    assert_eq!(body["cluster"], "azure-weu");
    let (status, body) = health(addr, &format!("cluster=azure-weu&host={RATINGS}")).await;
    assert_eq!((status, &body["host"]), (200, &Value::from(RATINGS)), "{body}");
    assert_eq!(metric(&app, "azure-weu").await, "1");

    // a drain still ramping keeps it healthy; capacity 0 reached: 503 in the push that decides it
    pushed(&app, || {
        app.push.set_traffic_policy(policy("{cluster: azure-weu, capacity: 50, expires: EXPIRES, reason: DR drill}"))
    })
    .await;
    let (status, body) = health(addr, "cluster=azure-weu").await;
    assert_eq!(status, 200, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("capacity 50%"), "{body}");
    pushed(&app, || {
        app.push.set_traffic_policy(policy("{cluster: azure-weu, capacity: 0, expires: EXPIRES, reason: DR drill}"))
    })
    .await;
    let (status, body) = health(addr, "cluster=azure-weu").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["healthy"], false);
    assert!(body["reason"].as_str().unwrap().contains("DR drill"), "{body}");
    let (status, body) = health(addr, &format!("cluster=azure-weu&host={RATINGS}")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(health(addr, "cluster=aws-use1").await.0, 200);
    assert_eq!(health(addr, &format!("cluster=aws-use1&host={RATINGS}")).await.0, 200);
    assert_eq!(metric(&app, "azure-weu").await, "0");
    assert_eq!(metric(&app, "aws-use1").await, "1");
    // the EDS decided the same: ratings' decision gives azure-weu nothing from any source region
    let snapshot = app.push.snapshot();
    let decision = snapshot.context.traffic.services.get(RATINGS).expect("ratings is covered").clone();
    for region in ["us-east-1", "westeurope", "elsewhere"] {
        let shares = decision.shares(region).unwrap_or_else(|| panic!("{region}: {decision:?}"));
        assert_eq!(shares.get(&ClusterId::new("azure-weu")).map(|s| s.share), Some(0.0), "{region}: {shares:?}");
    }

    // undrained: back to 200 in the next push
    pushed(&app, || app.push.set_traffic_policy(policy(""))).await;
    let (status, body) = health(addr, "cluster=azure-weu").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(metric(&app, "azure-weu").await, "1");

    // API unreachable for an hour, gateways up: still 200
    pushed(&app, || {
        let _ = app.events.send(SourceEvent::ClusterReachability {
            cluster: ClusterId::new("azure-weu"),
            reachable: false,
            since: SystemTime::now() - Duration::from_secs(3600),
        });
    })
    .await;
    let azure_net = NetworkId::new("azure-net");
    let up = meshfed::liveness::Verdict { reachable: [azure_net.clone()].into(), ..Default::default() };
    pushed(&app, || app.push.set_gateway_verdict(up)).await;
    let (status, body) = health(addr, "cluster=azure-weu").await;
    assert_eq!(status, 200, "API unreachable, gateways up: {body}");
    // every gateway down: fenced, 503 (the other cloud stays healthy)
    let fenced = meshfed::liveness::Verdict { fenced: [azure_net].into(), ..Default::default() };
    pushed(&app, || app.push.set_gateway_verdict(fenced)).await;
    let (status, body) = health(addr, "cluster=azure-weu").await;
    assert_eq!(status, 503, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("fenced"), "{body}");
    assert_eq!(health(addr, &format!("cluster=azure-weu&host={RATINGS}")).await.0, 503);
    assert_eq!(health(addr, "cluster=aws-use1").await.0, 200);

    // unknown cluster or host: 404 with a reason
    let (status, body) = health(addr, "cluster=gcp-euw1").await;
    assert_eq!(status, 404, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("unknown cluster"), "{body}");
    let (status, body) = health(addr, "cluster=aws-use1&host=nope.shop.svc.cluster.local").await;
    assert_eq!(status, 404, "{body}");
    // a missing cluster: 400
    assert_eq!(http_get(addr, "meshfed", "/global/health").await.unwrap().0, 400);
    // nothing else is served: no debug page, no metrics
    for path in ["/", "/debug/trafficz", "/metrics", "/global/healthz", "/healthz"] {
        let (status, _) = http_get(addr, "meshfed", path).await.unwrap();
        assert_eq!(status, 404, "{path}");
    }
    // other methods: 405
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /global/health?cluster=aws-use1 HTTP/1.1\r\nHost: meshfed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await.unwrap().unwrap();
    assert!(raw.starts_with(b"HTTP/1.1 405"), "{}", String::from_utf8_lossy(&raw));

    app.shutdown(Duration::from_secs(1)).await;
}
