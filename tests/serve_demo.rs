//! `meshfed serve` without `--mesh-config` serves the built-in demo and says so loudly: a warning in its
//! log, the first entry of `/debug/warnings` (which the web UI shows as a banner on top) and a banner on
//! `/debug`, so a mis-mounted mesh config in production is never silently the demo. With a mesh config,
//! none of that.

use meshfed_testkit as support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{ChildGuard, free_port, http_get, meshfed_path};

/// Starts `meshfed serve` with `args` on free loopback ports; returns it once `/ready` answers, with its
/// debug address.
async fn serve(args: &[&str]) -> (ChildGuard, std::net::SocketAddr) {
    let (xds, debug) = (free_port(), free_port());
    let mut cmd = Command::new(meshfed_path());
    cmd.arg("serve")
        .args(["--xds-address", &format!("127.0.0.1:{xds}"), "--debug-address", &format!("127.0.0.1:{debug}")])
        .args(args)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .env_remove("MESHFED_MESH_CONFIG");
    let mut guard = ChildGuard::spawn("meshfed-demo", &mut cmd).expect("spawning meshfed");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{debug}").parse().unwrap();
    let deadline = Instant::now() + support::START_TIMEOUT;
    loop {
        if let Some(status) = guard.try_exited() {
            panic!("meshfed exited ({status})\n{}", guard.log_tail());
        }
        if matches!(http_get(addr, "127.0.0.1", "/ready").await, Ok((200, _))) {
            return (guard, addr);
        }
        assert!(Instant::now() < deadline, "meshfed not ready\n{}", guard.log_tail());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_built_in_demo_is_announced_everywhere() {
    let (guard, debug) = serve(&[]).await;
    let log = guard.stderr() + &guard.stdout();
    assert!(log.contains("SERVING THE BUILT-IN DEMO"), "{log}");
    let (status, body) = http_get(debug, "127.0.0.1", "/debug/warnings").await.unwrap();
    assert_eq!(status, 200);
    let warnings: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(warnings[0]["kind"], "built-in-demo", "{warnings}");
    let (_, page) = http_get(debug, "127.0.0.1", "/debug").await.unwrap();
    assert!(page.contains("class=\"banner\"") && page.contains("BUILT-IN DEMO"), "{page}");
}

#[tokio::test]
async fn a_mesh_config_is_not_announced_as_the_demo() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = meshfed_testkit::server::copy_demo(dir.path(), 0);
    let (guard, debug) = serve(&["--mesh-config", mesh.to_str().unwrap()]).await;
    let (_, body) = http_get(debug, "127.0.0.1", "/debug/warnings").await.unwrap();
    let warnings: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(warnings.as_array().unwrap().iter().all(|w| w["kind"] != "built-in-demo"), "{warnings}");
    let (_, page) = http_get(debug, "127.0.0.1", "/debug").await.unwrap();
    assert!(!page.contains("BUILT-IN DEMO"), "{page}");
    let log = guard.stderr() + &guard.stdout();
    assert!(!log.contains("BUILT-IN DEMO"), "{log}");
}
