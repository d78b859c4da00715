//! Validates `meshfed bootstrap` output with a real Envoy (`envoy --mode validate`).
//!
//! The Envoy binary is `$MESHFED_ENVOY`, else `<crate>/.venv/bin/envoy` (installed by the README's
//! setup). A missing Envoy fails the tests: they never skip silently.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use meshfed::bootstrap::{self, BootstrapOptions};
use meshfed::proxy::InterceptionMode;

const NODE_ID: &str = "sidecar~127.0.50.1~client-0.shop~shop.svc.cluster.local";
const TIMEOUT: Duration = Duration::from_secs(60);

fn envoy_binary() -> PathBuf {
    let (path, origin) = match std::env::var_os("MESHFED_ENVOY") {
        Some(p) => (PathBuf::from(p), "$MESHFED_ENVOY"),
        None => (PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy"), "the default location"),
    };
    assert!(
        path.is_file(),
        "Envoy not found at {} ({origin}): run the setup in README.md (it installs Envoy 1.40 into .venv), \
         or set MESHFED_ENVOY to an Envoy binary",
        path.display()
    );
    path
}

struct Outcome {
    success: bool,
    stdout: String,
    stderr: String,
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for `child`, killing it (and failing the test) after [`TIMEOUT`].
fn wait_bounded(mut child: Child) -> Outcome {
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for envoy") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "envoy --mode validate did not finish within {TIMEOUT:?}; killed it\nstderr:\n{}",
                stderr.join().unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    Outcome { success: status.success(), stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

/// Runs `envoy --mode validate` on `yaml`.
fn envoy_validate(yaml: &str) -> Outcome {
    let envoy = envoy_binary();
    // Envoy picks the parser from the extension.
    let mut file = tempfile::Builder::new().prefix("meshfed-bootstrap-").suffix(".yaml").tempfile().unwrap();
    file.write_all(yaml.as_bytes()).unwrap();
    file.flush().unwrap();
    let child = Command::new(&envoy)
        .args(["--mode", "validate", "--use-dynamic-base-id", "--log-level", "warning", "-c"])
        .arg(file.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", envoy.display()));
    wait_bounded(child)
}

/// Renders `opts` and asserts Envoy accepts the bootstrap without warnings.
fn assert_valid(opts: &BootstrapOptions) {
    let yaml = bootstrap::render(opts).expect("render");
    let out = envoy_validate(&yaml);
    assert!(
        out.success && out.stdout.contains("OK"),
        "envoy rejected the bootstrap\nstdout:\n{}\nstderr:\n{}\nbootstrap:\n{yaml}",
        out.stdout,
        out.stderr
    );
    let complaints: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| {
            l.contains("[warning]")
                || l.contains("[error]")
                || l.contains("[critical]")
                || l.to_ascii_lowercase().contains("deprecated")
        })
        .collect();
    assert!(
        complaints.is_empty(),
        "envoy complained about the bootstrap:\n{}\nbootstrap:\n{yaml}",
        complaints.join("\n")
    );
}

#[test]
fn sotw_bootstrap_validates() {
    let opts = BootstrapOptions::new(NODE_ID);
    assert!(!opts.delta);
    assert_valid(&opts);
}

#[test]
fn delta_bootstrap_validates() {
    let mut opts = BootstrapOptions::new(NODE_ID);
    opts.delta = true;
    assert_valid(&opts);
}

#[test]
fn fully_optioned_bootstrap_validates() {
    for delta in [false, true] {
        let mut opts =
            BootstrapOptions::new("router~fd00::50:1~ingress-7f9c.istio-system~istio-system.svc.example.com");
        opts.delta = delta;
        opts.xds_address = "meshfed.meshfed-system.svc:15012".into();
        opts.admin_port = 19000;
        opts.cluster_id = Some("aws-use1".into());
        opts.network = Some("aws-net".into());
        opts.locality = Some("us-east-1/use1-az1/rack-7".into());
        opts.interception_mode = InterceptionMode::Redirect;
        opts.labels.insert("app".into(), "ingress".into());
        opts.labels.insert("tricky: key".into(), "x: y\n- z # 'q' \"dq\" {a: [b]} ~ *r &s !t".into());
        assert_valid(&opts);

        opts.xds_address = "[::1]:15010".into();
        assert_valid(&opts);
    }
}

/// The harness must be able to fail: Envoy rejects an unknown bootstrap field.
#[test]
fn envoy_rejects_a_broken_bootstrap() {
    let mut value = bootstrap::render_json(&BootstrapOptions::new(NODE_ID)).unwrap();
    value["dynamic_resources"]["ads_config"]["no_such_field"] = serde_json::json!(true);
    let out = envoy_validate(&serde_yaml::to_string(&value).unwrap());
    assert!(!out.success, "envoy accepted a bootstrap with an unknown field\nstdout:\n{}", out.stdout);
}
