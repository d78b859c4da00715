//! A real proxyless gRPC client (gRPC Python's xDS resolver and load balancers) against meshfed:
//! LDS api_listener -> RDS -> CDS -> EDS, then locality failover driven by EDS priorities.
//!
//! The Python interpreter is `$MESHFED_PYTHON`, else `<crate>/.venv/bin/python`, with the packages of
//! `tests/python/requirements.txt` (the README's setup installs them; see `meshfed_testkit::python_path`).
//! A missing interpreter fails the test: it never skips silently. Set `GRPC_TRACE=xds_client,xds_resolver
//! GRPC_VERBOSITY=debug` to get gRPC's xDS trace in the failure messages.
//!
//! Addresses: everything lives on 127.71.0.0/16 (octet 71 is reserved for this test): meshfed's xDS
//! and debug servers on 127.71.0.1, the demo's ratings endpoints on 127.71.{1,2,3,4}.{31,32}:9091.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const OCTET: u8 = 71;
/// Bound of every wait in this test.
const TIMEOUT: Duration = Duration::from_secs(30);
const TARGET: &str = "xds:///ratings.shop.svc.cluster.local:9091";
const NODE_ID: &str = "sidecar~127.71.60.1~grpc-client-0.shop~shop.svc.cluster.local";
const RPCS: usize = 20;

const ZONE_A: [&str; 2] = ["127.71.1.31:9091", "127.71.1.32:9091"];
const ZONE_B: [&str; 2] = ["127.71.2.31:9091", "127.71.2.32:9091"];
const WEU: [&str; 4] = ["127.71.3.31:9091", "127.71.3.32:9091", "127.71.4.31:9091", "127.71.4.32:9091"];

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python").join(name)
}

/// A child process, killed (and reaped) on drop. Its stdout arrives line by line on a channel; its
/// stderr is collected for failure messages.
struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command) -> Proc {
        // gRPC honours proxy variables, even for loopback; traffic must stay on loopback.
        for var in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy", "all_proxy", "ALL_PROXY"] {
            cmd.env_remove(var);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let (tx, lines) = channel();
        let stdout = child.stdout.take().expect("piped");
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("piped");
        let sink = stderr.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Proc { name: name.into(), stdin: child.stdin.take(), child, lines, stderr }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The next line of stdout, or a panic after [`TIMEOUT`] or if the process ends first.
    fn line(&self) -> String {
        match self.lines.recv_timeout(TIMEOUT) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                panic!("{}: no output within {TIMEOUT:?}\nstderr:\n{}", self.name, self.stderr())
            }
            Err(RecvTimeoutError::Disconnected) => {
                // give the stderr reader a moment to catch the last words
                thread::sleep(Duration::from_millis(100));
                panic!("{}: exited without the expected output\nstderr:\n{}", self.name, self.stderr())
            }
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        if let Err(e) = writeln!(stdin, "{line}").and_then(|_| stdin.flush()) {
            panic!("{}: cannot write to stdin: {e}\nstderr:\n{}", self.name, self.stderr());
        }
    }

    /// Waits (bounded) for the process to exit; returns whether it succeeded, with its stdout.
    fn wait(mut self) -> (bool, String, String) {
        self.stdin = None;
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not finish within {TIMEOUT:?}\nstderr:\n{}",
                self.name,
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        };
        let mut out = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            out.push(line);
        }
        thread::sleep(Duration::from_millis(50));
        (status.success(), out.join("\n"), self.stderr())
    }

    fn kill(&mut self) {
        self.stdin = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free port on `ip` (the port is released before meshfed binds it; the 127.71/16 range is ours).
fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0)).and_then(|l| l.local_addr()).expect("bind an ephemeral port").port()
}

fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: meshfed\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

struct Meshfed {
    proc: Proc,
    xds: SocketAddr,
}

impl Meshfed {
    /// Starts meshfed on free ports of 127.71.0.1; retried if a port was taken in between.
    fn start(mesh_config: &Path) -> Meshfed {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Meshfed::try_start(mesh_config) {
                Ok(mf) => return mf,
                Err(e) => failures.push(e),
            }
        }
        panic!("meshfed did not start:\n{}", failures.join("\n"));
    }

    fn try_start(mesh_config: &Path) -> Result<Meshfed, String> {
        let ip = format!("127.{OCTET}.0.1");
        let xds: SocketAddr = format!("{ip}:{}", free_port(&ip)).parse().unwrap();
        let debug: SocketAddr = format!("{ip}:{}", free_port(&ip)).parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshfed"));
        cmd.arg("serve")
            .arg("--mesh-config")
            .arg(mesh_config)
            .args(["--xds-address", &xds.to_string(), "--debug-address", &debug.to_string()])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let mut proc = Proc::spawn("meshfed", cmd);
        let deadline = Instant::now() + TIMEOUT;
        while http_status(debug, "/ready") != Some(200) {
            if let Some(status) = proc.child.try_wait().expect("try_wait") {
                thread::sleep(Duration::from_millis(100));
                return Err(format!("meshfed exited ({status}) before it was ready\nstderr:\n{}", proc.stderr()));
            }
            assert!(Instant::now() < deadline, "meshfed not ready within {TIMEOUT:?}\nstderr:\n{}", proc.stderr());
            thread::sleep(Duration::from_millis(50));
        }
        Ok(Meshfed { proc, xds })
    }

    /// Fails the test if a client rejected a resource (meshfed logs every NACK at warn level).
    fn assert_no_nack(&self) {
        let log = self.proc.stderr();
        let nacks: Vec<&str> = log.lines().filter(|l| l.contains("NACK")).collect();
        assert!(nacks.is_empty(), "gRPC rejected meshfed's resources:\n{}", nacks.join("\n"));
    }
}

/// Backends for `addrs`, one process (one gRPC server per address); ready when this returns.
fn backends(addrs: &[&str]) -> Proc {
    let mut cmd = Command::new(meshfed_testkit::python_path());
    cmd.arg(script("backend.py")).args(addrs);
    let p = Proc::spawn(&format!("backends {addrs:?}"), cmd);
    let line = p.line();
    assert_eq!(
        line,
        "READY",
        "backends {addrs:?} did not start (are the packages of tests/python/requirements.txt installed?)\nstderr:\n{}",
        p.stderr()
    );
    p
}

fn bootstrap(xds: SocketAddr) -> String {
    serde_json::json!({
        "xds_servers": [{
            "server_uri": xds.to_string(),
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {
            "id": NODE_ID,
            "metadata": {"CLUSTER_ID": "aws-use1", "NETWORK": "aws-net", "GENERATOR": "grpc"},
            "locality": {"region": "us-east-1", "zone": "us-east-1a"},
        },
    })
    .to_string()
}

fn client(xds: SocketAddr, args: &[&str]) -> Proc {
    let mut cmd = Command::new(meshfed_testkit::python_path());
    cmd.arg(script("xds_client.py"))
        .arg(TARGET)
        .args(args)
        .env_remove("GRPC_XDS_BOOTSTRAP")
        .env("GRPC_XDS_BOOTSTRAP_CONFIG", bootstrap(xds));
    Proc::spawn("xds_client", cmd)
}

type Answers = BTreeMap<String, usize>;

/// A fresh client process (a new xDS subscription) making [`RPCS`] calls.
fn run_client(mf: &Meshfed) -> Answers {
    let (ok, stdout, stderr) = client(mf.xds, &["--count", &RPCS.to_string()]).wait();
    mf.assert_no_nack();
    assert!(ok, "the gRPC client failed\nstderr:\n{stderr}\nmeshfed log:\n{}", mf.proc.stderr());
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("client output {stdout:?}: {e}\nstderr:\n{stderr}"))
}

/// A client process that keeps its channel, so it sees meshfed's pushes on its xDS stream.
struct LongLivedClient(Proc);

impl LongLivedClient {
    fn start(mf: &Meshfed) -> LongLivedClient {
        LongLivedClient(client(mf.xds, &["--interactive", "--deadline", "1"]))
    }

    /// Makes [`RPCS`] calls; returns who answered and the errors.
    fn round(&mut self) -> (Answers, Answers) {
        self.0.send(&RPCS.to_string());
        let line = self.0.line();
        #[derive(serde::Deserialize)]
        struct Round {
            answers: Answers,
            errors: Answers,
        }
        let r: Round = serde_json::from_str(&line).unwrap_or_else(|e| panic!("client output {line:?}: {e}"));
        (r.answers, r.errors)
    }

    /// Runs rounds until one is answered without errors by `expected` backends only; answers in
    /// earlier rounds may also come from `allowed` (the previous state), never from elsewhere. Bounded.
    fn converge(&mut self, mf: &Meshfed, expected: &[&str], allowed: &[&str], what: &str) {
        let deadline = Instant::now() + TIMEOUT;
        let mut history = Vec::new();
        loop {
            let (answers, errors) = self.round();
            mf.assert_no_nack();
            let stray: Vec<&String> =
                answers.keys().filter(|a| !expected.contains(&a.as_str()) && !allowed.contains(&a.as_str())).collect();
            assert!(
                stray.is_empty(),
                "{what}: RPCs reached {stray:?}, expected only {expected:?} (or {allowed:?} before the change)\n\
                 rounds so far: {history:?}\nclient stderr:\n{}",
                self.0.stderr()
            );
            let done = errors.is_empty() && answers.keys().all(|a| expected.contains(&a.as_str()));
            history.push((answers, errors));
            if done {
                eprintln!("{what}: converged; rounds: {history:?}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the long-lived client did not converge to {expected:?} within {TIMEOUT:?}\n\
                 rounds: {history:?}\nclient stderr:\n{}\nmeshfed log:\n{}",
                self.0.stderr(),
                mf.proc.stderr()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

fn assert_only(answers: &Answers, expected: &[&str], what: &str) {
    let total: usize = answers.values().sum();
    assert_eq!(total, RPCS, "{what}: {answers:?}");
    assert!(
        answers.keys().all(|a| expected.contains(&a.as_str())),
        "{what}: expected only {expected:?}, got {answers:?}"
    );
}

/// Marks the ratings endpoints `addrs` of aws-use1 not ready (`ready: false`), writing the file atomically.
fn mark_not_ready(dir: &Path, addrs: &[&str]) {
    let slices = meshfed_testkit::slices::SlicesFile::of_cluster(dir, "aws-use1").expect("aws-use1's EndpointSlices");
    slices
        .edit(|docs| {
            for addr in addrs {
                let endpoint = docs.endpoint_at_mut(addr.parse::<SocketAddr>()?.ip())?;
                anyhow::ensure!(endpoint["conditions"]["ready"].as_bool() == Some(true), "{addr} is ready before");
                endpoint["conditions"]["ready"] = false.into();
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("marking {addrs:?} not ready: {e:#}"));
}

#[test]
fn grpc_client_follows_locality_priorities() {
    meshfed_testkit::python_path(); // fail first, and clearly, without the Python side
    let dir = tempfile::tempdir().expect("temp dir");
    let mesh_config = meshfed_testkit::server::copy_demo_single_network(dir.path(), OCTET);
    let mf = Meshfed::start(&mesh_config);
    let mut zone_a = backends(&ZONE_A);
    let mut zone_b = backends(&ZONE_B);
    let _weu = backends(&WEU);

    // The client is in us-east-1a: priority 0 is its own zone, round robin within it.
    let answers = run_client(&mf);
    assert_only(&answers, &ZONE_A, "client in us-east-1a, all endpoints up");
    assert_eq!(answers.len(), 2, "round robin over both us-east-1a endpoints: {answers:?}");

    let mut long_lived = LongLivedClient::start(&mf);
    long_lived.converge(&mf, &ZONE_A, &[], "long-lived client, all endpoints up");

    // us-east-1a's endpoints are no longer ready (their backends still answer): meshfed pushes the
    // new assignment, where us-east-1b is now priority 0; the other region stays behind it.
    mark_not_ready(dir.path(), &ZONE_A);
    long_lived.converge(&mf, &ZONE_B, &ZONE_A, "us-east-1a not ready (EDS push)");
    zone_a.kill();
    let answers = run_client(&mf);
    assert_only(&answers, &ZONE_B, "fresh client, us-east-1a not ready and down");
    assert_eq!(answers.len(), 2, "round robin over both us-east-1b endpoints: {answers:?}");
    long_lived.converge(&mf, &ZONE_B, &[], "us-east-1a down");

    // us-east-1b goes down without any EDS change: gRPC's priority policy fails over by itself, to
    // the next priority: both westeurope zones (other region, one priority), never back to 1a.
    zone_b.kill();
    long_lived.converge(&mf, &WEU, &ZONE_B, "us-east-1b down, EDS unchanged");
    let answers = run_client(&mf);
    assert_only(&answers, &WEU, "fresh client, us-east-1b down");
    for zone in [&WEU[..2], &WEU[2..]] {
        assert!(answers.keys().any(|a| zone.contains(&a.as_str())), "both westeurope zones get traffic: {answers:?}");
    }

    let (ok, _, stderr) = long_lived.0.wait();
    assert!(ok, "long-lived client failed\nstderr:\n{stderr}");
    mf.assert_no_nack();
}
