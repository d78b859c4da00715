//! Shared support for the integration tests that run meshfed and real Envoys as child processes.
//!
//! Use it with `mod support;` from a test file. Everything here is bounded: every wait has a timeout,
//! every child process is killed (and reaped) when its guard is dropped, also when a test panics, and
//! the logs of the children are printed when a test fails. All traffic stays on loopback.
//!
//! - [`start_meshfed`]: `meshfed serve` on free loopback ports, once `/ready` answers 200.
//! - [`bootstrap`] + [`start_envoy`]: an Envoy configured by `meshfed bootstrap`, once its admin
//!   `/ready` says LIVE. The Envoy binary is `$MESHFED_ENVOY`, else `<crate>/.venv/bin/envoy`; a
//!   missing binary fails the test (the README's setup installs it), it never skips.
//! - [`bootstrap_with`]: `meshfed bootstrap` with every option ([`BootstrapSpec`]: TLS identity,
//!   inbound address, router node ids...).
//! - [`TestCa`]: a mesh CA made by the test (rcgen) issuing SPIFFE workload certificates as PEM files.
//! - [`Backend`]: an in-process HTTP/1.1 server answering 200 with its own address (or a given reply)
//!   as the body.
//! - [`http_get`]: a tiny HTTP/1.1 client (one request per connection).
//! - [`wait_until`] / [`poll_until`]: polling with a cap.
//!
//! Set `MESHFED_TEST_LOG` to change meshfed's `RUST_LOG` (default `info`), and
//! `MESHFED_ENVOY_LOG_LEVEL` / `MESHFED_ENVOY_COMPONENT_LOG_LEVEL` to change Envoy's logging (default
//! `info`; e.g. `upstream:debug,config:debug`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Cap of the start of a child process (until it is ready).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Cap of one HTTP exchange (connect, request, whole response).
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Cap of a short-lived command (`meshfed bootstrap`).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between two attempts of [`wait_until`] / [`poll_until`].
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// At most this much of each log file is printed when a test fails.
const LOG_TAIL_BYTES: usize = 64 * 1024;

// ---- binaries and ports ----

/// The meshfed binary Cargo built beside this test binary (`target/<profile>/meshfed`; Cargo builds a
/// package's binaries before its integration tests), or `$MESHFED_BIN`.
pub fn meshfed_path() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHFED_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/meshfed
    let dir = exe.parent().and_then(|d| if d.ends_with("deps") { d.parent() } else { Some(d) }).expect("a directory");
    let path = dir.join(format!("meshfed{}", std::env::consts::EXE_SUFFIX));
    assert!(path.is_file(), "meshfed binary not found at {} (build it: cargo build)", path.display());
    path
}

/// The workspace's top directory (where `.venv` and `examples/` are).
pub fn workspace_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("the workspace directory")
}

/// The Envoy binary: `$MESHFED_ENVOY`, else `<crate>/.venv/bin/envoy`. Panics (fails the test) if it is
/// missing: the tests never skip silently.
pub fn envoy_path() -> PathBuf {
    let (path, origin) = match std::env::var_os("MESHFED_ENVOY") {
        Some(p) => (PathBuf::from(p), "$MESHFED_ENVOY"),
        None => (workspace_dir().join(".venv/bin/envoy"), "the default location"),
    };
    assert!(
        path.is_file(),
        "Envoy not found at {} ({origin}): run the setup in README.md (it installs Envoy 1.40 into .venv), \
         or set MESHFED_ENVOY to an Envoy binary",
        path.display()
    );
    path
}

/// A TCP port that was free on 127.0.0.1 a moment ago (the kernel picks it; it is released at once, so
/// a process started next can bind it). Callers that can retry on a bind error should do so.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

/// `127.<a>.<b>.<c>`
pub fn ip4(a: u8, b: u8, c: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, a, b, c))
}

/// `127.<a>.<b>.<c>:<port>`
pub fn addr4(a: u8, b: u8, c: u8, port: u16) -> SocketAddr {
    SocketAddr::new(ip4(a, b, c), port)
}

// ---- child processes ----

/// A child process whose stdout and stderr go to files in a temporary directory of its own. Dropping
/// the guard kills and reaps the process; if the thread is panicking (a failing test), the logs are
/// printed first.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl ChildGuard {
    /// Spawns `cmd` (stdin closed, stdout/stderr to log files) in a new temporary directory.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<ChildGuard> {
        let dir = tempfile::Builder::new().prefix(&format!("meshfed-test-{name}-")).tempdir()?;
        ChildGuard::spawn_in(dir, name, cmd)
    }

    /// Spawns `cmd` with its logs in `dir` (which the guard keeps until it is dropped).
    pub fn spawn_in(dir: tempfile::TempDir, name: &str, cmd: &mut Command) -> Result<ChildGuard> {
        let stdout = dir.path().join(format!("{name}.stdout.log"));
        let stderr = dir.path().join(format!("{name}.stderr.log"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout)?)
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(ChildGuard { name: name.to_string(), child: Some(child), dir, stdout, stderr })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id (None once killed).
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The directory holding the logs (and whatever else the caller put there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The exit status if the process has exited (it is reaped then).
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stdout).unwrap_or_default()).into_owned()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr).unwrap_or_default()).into_owned()
    }

    /// The last [`LOG_TAIL_BYTES`] of stdout and of stderr, labelled, for failure messages.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for (what, path) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let bytes = std::fs::read(path).unwrap_or_default();
            if bytes.is_empty() {
                continue;
            }
            let start = bytes.len().saturating_sub(LOG_TAIL_BYTES);
            let cut = if start > 0 { format!(" (last {LOG_TAIL_BYTES} bytes)") } else { String::new() };
            let _ = writeln!(out, "----- {} {what}{cut} ({}) -----", self.name, path.display());
            out.push_str(&String::from_utf8_lossy(&bytes[start..]));
            if !out.ends_with('\n') {
                out.push('\n');
            }
        }
        if out.is_empty() {
            let _ = writeln!(out, "----- {}: no output -----", self.name);
        }
        out
    }

    /// Prints [`Self::log_tail`] to stderr (which the test harness shows for failing tests).
    pub fn dump_logs(&self) {
        eprintln!("{}", self.log_tail());
    }

    /// Kills and reaps the process (SIGKILL: bounded).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits (polling, bounded by `timeout`) for the process to exit on its own; kills it on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exited() {
                self.child = None;
                return Ok(status);
            }
            if self.child.is_none() {
                bail!("{} was already killed", self.name);
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!("{} did not exit within {timeout:?}; killed it\n{}", self.name, self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        self.kill();
    }
}

/// Runs a short-lived command to completion (bounded by [`COMMAND_TIMEOUT`]) and returns its stdout;
/// fails with its logs if it does not exit successfully.
pub fn run_command(name: &str, cmd: &mut Command) -> Result<String> {
    let mut guard = ChildGuard::spawn(name, cmd)?;
    let status = guard.wait_exit(COMMAND_TIMEOUT)?;
    if !status.success() {
        bail!("{name} failed ({status})\n{}", guard.log_tail());
    }
    Ok(guard.stdout())
}

// ---- meshfed ----

/// A running `meshfed serve`.
pub struct Meshfed {
    pub xds_port: u16,
    pub debug_port: u16,
    pub guard: ChildGuard,
    /// the debug token the requests of [`Meshfed::debug_get`] carry ([`MeshfedOptions::debug_token`])
    pub debug_token: Option<String>,
}

impl Meshfed {
    pub fn xds_address(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.xds_port))
    }

    pub fn debug_address(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.debug_port))
    }

    /// GET on the debug server (with the debug token, if any): (status, body).
    pub async fn debug_get(&self, path: &str) -> Result<(u16, String)> {
        let auth = self.debug_token.as_ref().map(|t| format!("Authorization: Bearer {t}\r\n"));
        http_get_with(self.debug_address(), "127.0.0.1", path, auth.as_deref().unwrap_or("")).await
    }

    /// GET on the debug server, parsed as JSON; fails on a status other than 200.
    pub async fn debug_json(&self, path: &str) -> Result<serde_json::Value> {
        let (status, body) = self.debug_get(path).await?;
        if status != 200 {
            bail!("meshfed {path}: status {status}: {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("meshfed {path}: not JSON: {body}"))
    }

    /// The `/debug/adsz` entry of the connection of proxy `node_id`, if it is connected.
    pub async fn ads_connection(&self, node_id: &str) -> Result<Option<serde_json::Value>> {
        let adsz = self.debug_json("/debug/adsz").await?;
        let conns = adsz["connections"].as_array().ok_or_else(|| anyhow!("/debug/adsz: no connections: {adsz}"))?;
        Ok(conns.iter().find(|c| c["proxy"].as_str() == Some(node_id)).cloned())
    }
}

impl Meshfed {
    /// Fails if any connected proxy NACKed anything (`/debug/adsz`: `nacks` or `last_error` of some
    /// type); returns the number of connections checked.
    pub async fn assert_no_nacks(&self) -> Result<usize> {
        let adsz = self.debug_json("/debug/adsz").await?;
        let conns = adsz["connections"].as_array().ok_or_else(|| anyhow!("/debug/adsz: no connections: {adsz}"))?;
        for c in conns {
            let types = c["types"].as_object().ok_or_else(|| anyhow!("/debug/adsz: no types in {c}"))?;
            for (t, status) in types {
                if status["nacks"].as_u64().unwrap_or(0) != 0 || !status["last_error"].is_null() {
                    bail!("{} NACKed {t}: {status}", c["proxy"]);
                }
            }
        }
        Ok(conns.len())
    }
}

/// Starts `meshfed serve --mesh-config <mesh_path>` with its xDS and debug servers on free ports of
/// 127.0.0.1 and waits (bounded) until `/ready` answers 200 and the xDS port accepts connections. A
/// port taken in between is retried with other ports.
pub async fn start_meshfed(mesh_path: &Path) -> Result<Meshfed> {
    start_meshfed_with(mesh_path, &MeshfedOptions::default()).await
}

/// How [`start_meshfed_with`] starts meshfed.
#[derive(Clone, Debug, Default)]
pub struct MeshfedOptions {
    /// fixed (xDS, debug) ports, e.g. to restart meshfed on the ports it had; default: free ports
    pub ports: Option<(u16, u16)>,
    /// serve xDS over TLS only, on the xDS port: certificate, key, and the client CA (mTLS) if any
    pub xds_tls: Option<(PathBuf, PathBuf, Option<PathBuf>)>,
    /// more arguments for `meshfed serve`
    pub args: Vec<String>,
    /// require this debug token (`--debug-token-file`); [`Meshfed::debug_get`] presents it
    pub debug_token: Option<String>,
}

/// [`start_meshfed`] with options (fixed ports, TLS, more flags).
pub async fn start_meshfed_with(mesh_path: &Path, options: &MeshfedOptions) -> Result<Meshfed> {
    let mut last_error = None;
    for _attempt in 0..3 {
        let (xds_port, debug_port) = options.ports.unwrap_or_else(|| (free_port(), free_port()));
        if xds_port == debug_port {
            continue;
        }
        let log = std::env::var("MESHFED_TEST_LOG").unwrap_or_else(|_| "info".to_string());
        let mut cmd = Command::new(meshfed_path());
        cmd.arg("serve").arg("--mesh-config").arg(mesh_path);
        match &options.xds_tls {
            None => {
                cmd.arg("--xds-address").arg(format!("127.0.0.1:{xds_port}"));
            }
            Some((cert, key, ca)) => {
                cmd.arg("--no-plaintext-xds")
                    .arg("--xds-tls-address")
                    .arg(format!("127.0.0.1:{xds_port}"))
                    .arg("--xds-tls-cert")
                    .arg(cert)
                    .arg("--xds-tls-key")
                    .arg(key);
                if let Some(ca) = ca {
                    cmd.arg("--xds-client-ca").arg(ca);
                }
            }
        }
        cmd.arg("--debug-address")
            .arg(format!("127.0.0.1:{debug_port}"))
            .args(&options.args)
            .env("RUST_LOG", log)
            .env("NO_COLOR", "1");
        let dir = tempfile::Builder::new().prefix("meshfed-test-").tempdir()?;
        if let Some(token) = &options.debug_token {
            let file = dir.path().join("debug-token");
            std::fs::write(&file, token)?;
            cmd.arg("--debug-token-file").arg(file);
        }
        let guard = ChildGuard::spawn_in(dir, "meshfed", &mut cmd)?;
        let mut meshfed = Meshfed { xds_port, debug_port, guard, debug_token: options.debug_token.clone() };
        let deadline = Instant::now() + START_TIMEOUT;
        let outcome: Result<()> = loop {
            if let Some(status) = meshfed.guard.try_exited() {
                break Err(anyhow!("meshfed exited ({status}) before it was ready\n{}", meshfed.guard.log_tail()));
            }
            let ready = matches!(meshfed.debug_get("/ready").await, Ok((200, _)));
            if ready
                && let Ok(Ok(_)) = tokio::time::timeout(HTTP_TIMEOUT, TcpStream::connect(meshfed.xds_address())).await
            {
                break Ok(());
            }
            if Instant::now() >= deadline {
                break Err(anyhow!("meshfed not ready within {START_TIMEOUT:?}\n{}", meshfed.guard.log_tail()));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        match outcome {
            Ok(()) => return Ok(meshfed),
            Err(e) => {
                let port_taken = meshfed.guard.stderr().contains("binding the");
                meshfed.guard.kill();
                if !port_taken {
                    return Err(e);
                }
                last_error = Some(e);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow!("no free ports for meshfed")))
}

// ---- Envoy ----

/// Runs `meshfed bootstrap` and returns the bootstrap YAML. `admin_port` 0 lets Envoy pick its admin
/// port ([`start_envoy`] finds it). `locality` is `REGION/ZONE[/SUBZONE]`.
pub fn bootstrap(
    node_id: &str,
    xds_port: u16,
    delta: bool,
    admin_port: u16,
    cluster_id: &str,
    network: &str,
    locality: &str,
) -> String {
    bootstrap_with(&BootstrapSpec {
        delta,
        admin_port,
        cluster_id: Some(cluster_id.to_string()),
        network: Some(network.to_string()),
        locality: Some(locality.to_string()),
        ..BootstrapSpec::new(node_id, xds_port)
    })
}

/// The options of `meshfed bootstrap` (see its `--help`); [`BootstrapSpec::new`] sets the defaults.
#[derive(Clone, Debug, Default)]
pub struct BootstrapSpec {
    pub node_id: String,
    /// meshfed's ADS port on 127.0.0.1
    pub xds_port: u16,
    pub delta: bool,
    /// 0: Envoy picks it ([`start_envoy`] finds it)
    pub admin_port: u16,
    pub cluster_id: Option<String>,
    pub network: Option<String>,
    /// `REGION/ZONE[/SUBZONE]`
    pub locality: Option<String>,
    /// the workload's mesh certificates (`--tls-cert/--tls-key/--tls-root-cert`)
    pub tls: Option<MeshIdentity>,
    /// `--inbound-address`: where the workload application listens
    pub inbound_address: Option<IpAddr>,
    /// `--label K=V`
    pub labels: Vec<(String, String)>,
    /// TLS to meshfed's xDS port (`--xds-tls-ca`, `--xds-tls-client-cert/-key` from the identity)
    pub xds_tls: Option<XdsTlsSpec>,
}

/// How Envoy connects to meshfed over TLS.
#[derive(Clone, Debug)]
pub struct XdsTlsSpec {
    /// the CA that issued meshfed's server certificate
    pub ca: PathBuf,
    /// the client certificate Envoy presents (mTLS)
    pub client: Option<MeshIdentity>,
}

impl BootstrapSpec {
    pub fn new(node_id: &str, xds_port: u16) -> BootstrapSpec {
        BootstrapSpec { node_id: node_id.to_string(), xds_port, ..BootstrapSpec::default() }
    }
}

/// Runs `meshfed bootstrap` with `spec` and returns the bootstrap YAML.
pub fn bootstrap_with(spec: &BootstrapSpec) -> String {
    let mut cmd = Command::new(meshfed_path());
    cmd.arg("bootstrap")
        .args(["--node-id", &spec.node_id])
        .args(["--xds-address", &format!("127.0.0.1:{}", spec.xds_port)])
        .args(["--admin-port", &spec.admin_port.to_string()]);
    for (flag, value) in
        [("--cluster-id", &spec.cluster_id), ("--network", &spec.network), ("--locality", &spec.locality)]
    {
        if let Some(v) = value {
            cmd.args([flag, v]);
        }
    }
    if spec.delta {
        cmd.arg("--delta");
    }
    if let Some(id) = &spec.tls {
        cmd.arg("--tls-cert").arg(&id.cert).arg("--tls-key").arg(&id.key).arg("--tls-root-cert").arg(&id.root);
    }
    if let Some(ip) = spec.inbound_address {
        cmd.args(["--inbound-address", &ip.to_string()]);
    }
    for (k, v) in &spec.labels {
        cmd.args(["--label", &format!("{k}={v}")]);
    }
    if let Some(tls) = &spec.xds_tls {
        cmd.arg("--xds-tls-ca").arg(&tls.ca);
        if let Some(id) = &tls.client {
            cmd.arg("--xds-tls-client-cert").arg(&id.cert).arg("--xds-tls-client-key").arg(&id.key);
        }
    }
    run_command("meshfed-bootstrap", &mut cmd).expect("meshfed bootstrap")
}

// ---- mesh certificates ----

/// PEM files of one workload's mesh identity: its certificate, its key, and the mesh root.
#[derive(Clone, Debug)]
pub struct MeshIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub root: PathBuf,
}

/// A mesh CA made by the test (what istiod's CA is in a mesh): a self-signed root that issues workload
/// certificates with a SPIFFE URI SAN (`spiffe://cluster.local/ns/NS/sa/SA`), usable for both client
/// and server authentication, as Istio's workload certificates are. Files go to the given directory.
pub struct TestCa {
    dir: PathBuf,
    root: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// A new root CA; its certificate is written to `<dir>/root-cert.pem`.
    pub fn new(dir: &Path) -> Result<TestCa> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        std::fs::create_dir_all(dir)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::OrganizationName, "meshfed test mesh");
        params.distinguished_name.push(DnType::CommonName, "meshfed test root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key)?;
        let root = dir.join("root-cert.pem");
        std::fs::write(&root, cert.pem())?;
        Ok(TestCa { dir: dir.to_path_buf(), root, issuer: rcgen::Issuer::new(params, key) })
    }

    /// The root certificate (PEM file).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Issues a workload certificate whose only SAN is the URI `spiffe_id`; writes
    /// `<dir>/<name>-cert.pem` and `<dir>/<name>-key.pem`.
    pub fn issue(&self, name: &str, spiffe_id: &str) -> Result<MeshIdentity> {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType};
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::OrganizationName, "meshfed test mesh");
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let identity = MeshIdentity {
            cert: self.dir.join(format!("{name}-cert.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
            root: self.root.clone(),
        };
        std::fs::write(&identity.cert, cert.pem())?;
        std::fs::write(&identity.key, key.serialize_pem())?;
        Ok(identity)
    }

    /// Issues a server certificate for the given DNS names and IP addresses (meshfed's xDS or debug
    /// server); writes `<dir>/<name>-cert.pem` and `<dir>/<name>-key.pem`.
    pub fn issue_server(&self, name: &str, dns: &[&str], ips: &[IpAddr]) -> Result<MeshIdentity> {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType};
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = dns.iter().map(|d| Ok(SanType::DnsName((*d).try_into()?))).collect::<Result<_>>()?;
        params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let identity = MeshIdentity {
            cert: self.dir.join(format!("{name}-cert.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
            root: self.root.clone(),
        };
        std::fs::write(&identity.cert, cert.pem())?;
        std::fs::write(&identity.key, key.serialize_pem())?;
        Ok(identity)
    }
}

/// A running Envoy.
pub struct Envoy {
    pub admin_port: u16,
    pub guard: ChildGuard,
}

/// One upstream host of a cluster as Envoy's admin `/clusters` shows it: `key -> value` of its
/// `<cluster>::<host>::<key>::<value>` lines (`health_flags`, `priority`, `zone`, `rq_total`...).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostStatus(pub BTreeMap<String, String>);

impl HostStatus {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn priority(&self) -> Option<u32> {
        self.get("priority")?.parse().ok()
    }

    pub fn health_flags(&self) -> &str {
        self.get("health_flags").unwrap_or("")
    }

    pub fn is_healthy(&self) -> bool {
        self.health_flags() == "healthy"
    }
}

impl Envoy {
    pub fn admin_address(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.admin_port))
    }

    /// GET on the admin server; fails on a status other than 200.
    pub async fn admin_get(&self, path: &str) -> Result<String> {
        admin_get(self.admin_port, path).await
    }

    /// The hosts of `cluster` (from `/clusters`); empty if Envoy does not know the cluster.
    pub async fn cluster_hosts(&self, cluster: &str) -> Result<BTreeMap<SocketAddr, HostStatus>> {
        Ok(parse_cluster_hosts(&self.admin_get("/clusters").await?, cluster))
    }

    /// Every `*update_rejected` stat: (name, value).
    pub async fn update_rejected_stats(&self) -> Result<Vec<(String, u64)>> {
        let body = self.admin_get("/stats?filter=update_rejected").await?;
        let mut out = Vec::new();
        for line in body.lines().filter(|l| l.contains("update_rejected")) {
            let (name, value) = line.rsplit_once(": ").ok_or_else(|| anyhow!("bad stat line {line:?}"))?;
            let value = value.trim().parse().with_context(|| format!("bad stat line {line:?}"))?;
            out.push((name.to_string(), value));
        }
        Ok(out)
    }

    /// Envoy's log lines at level warning or above (a rejected xDS resource, a closed ADS stream, a
    /// deprecated field... are all logged as warnings).
    pub fn log_complaints(&self) -> Vec<String> {
        self.guard
            .stderr()
            .lines()
            .filter(|l| l.contains("[warning]") || l.contains("[error]") || l.contains("[critical]"))
            .map(str::to_string)
            .collect()
    }

    /// Every counter and gauge whose name contains `filter` (histograms are left out): name -> value.
    pub async fn stats(&self, filter: &str) -> Result<BTreeMap<String, u64>> {
        let body = self.admin_get("/stats").await?;
        let mut out = BTreeMap::new();
        for line in body.lines().filter(|l| l.contains(filter)) {
            let Some((name, value)) = line.rsplit_once(": ") else { continue };
            if let Ok(v) = value.trim().parse() {
                out.insert(name.to_string(), v);
            }
        }
        Ok(out)
    }

    /// The value of the counter or gauge `name` (0 if Envoy does not have it, as it creates some
    /// stats lazily).
    pub async fn stat(&self, name: &str) -> Result<u64> {
        Ok(self.stats(name).await?.get(name).copied().unwrap_or(0))
    }

    /// The hosts of `cluster` from `/clusters?format=json`, one entry per host (unlike
    /// [`Self::cluster_hosts`], the same address in two localities gives two entries).
    pub async fn cluster_host_details(&self, cluster: &str) -> Result<Vec<HostDetail>> {
        let body = self.admin_get("/clusters?format=json").await?;
        parse_cluster_host_details(&body, cluster)
    }

    /// Fails unless Envoy has `update_rejected` stats and all of them are 0.
    pub async fn assert_no_rejected_updates(&self) -> Result<()> {
        let stats = self.update_rejected_stats().await?;
        if stats.is_empty() {
            bail!("Envoy has no update_rejected stats at all");
        }
        let rejected: Vec<_> = stats.iter().filter(|(_, v)| *v != 0).collect();
        if !rejected.is_empty() {
            bail!("Envoy rejected xDS updates: {rejected:?}\n{}", self.guard.log_tail());
        }
        Ok(())
    }
}

/// One upstream host of a cluster as Envoy's admin `/clusters?format=json` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostDetail {
    pub address: SocketAddr,
    pub region: String,
    pub zone: String,
    pub priority: u32,
    pub weight: u32,
    /// `eds_health_status` (HEALTHY, UNHEALTHY, DRAINING...)
    pub eds_health: String,
    /// ejected by outlier detection
    pub failed_outlier_check: bool,
}

/// Parses Envoy's `/clusters?format=json`: the hosts of `cluster`.
pub fn parse_cluster_host_details(json: &str, cluster: &str) -> Result<Vec<HostDetail>> {
    let v: serde_json::Value = serde_json::from_str(json).context("/clusters?format=json is not JSON")?;
    let statuses = v["cluster_statuses"].as_array().ok_or_else(|| anyhow!("no cluster_statuses"))?;
    let Some(c) = statuses.iter().find(|c| c["name"].as_str() == Some(cluster)) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for h in c["host_statuses"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let sa = &h["address"]["socket_address"];
        let ip: IpAddr =
            sa["address"].as_str().ok_or_else(|| anyhow!("host without address: {h}"))?.parse().context("host IP")?;
        let port = sa["port_value"].as_u64().ok_or_else(|| anyhow!("host without port: {h}"))? as u16;
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        out.push(HostDetail {
            address: SocketAddr::new(ip, port),
            region: text(&h["locality"]["region"]),
            zone: text(&h["locality"]["zone"]),
            priority: h["priority"].as_u64().unwrap_or(0) as u32,
            weight: h["weight"].as_u64().unwrap_or(0) as u32,
            eds_health: text(&h["health_status"]["eds_health_status"]),
            failed_outlier_check: h["health_status"]["failed_outlier_check"].as_bool().unwrap_or(false),
        });
    }
    Ok(out)
}

/// Parses Envoy's text `/clusters` output: the hosts of `cluster`.
pub fn parse_cluster_hosts(text: &str, cluster: &str) -> BTreeMap<SocketAddr, HostStatus> {
    let prefix = format!("{cluster}::");
    let mut hosts: BTreeMap<SocketAddr, HostStatus> = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else { continue };
        let mut parts = rest.splitn(3, "::");
        let (Some(host), Some(key), Some(value)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let Ok(host) = host.parse::<SocketAddr>() else { continue };
        hosts.entry(host).or_default().0.insert(key.to_string(), value.to_string());
    }
    hosts
}

/// Starts Envoy with `bootstrap_yaml` (`--use-dynamic-base-id`, so several can run at once) and waits
/// (bounded) until its admin `/ready` says LIVE, i.e. its initial xDS configuration is applied. The
/// admin port is read from `--admin-address-path`, so the bootstrap may use admin port 0.
pub async fn start_envoy(bootstrap_yaml: &str) -> Result<Envoy> {
    let envoy = envoy_path();
    let dir = tempfile::Builder::new().prefix("meshfed-test-envoy-").tempdir()?;
    // Envoy picks the parser from the extension.
    let config = dir.path().join("bootstrap.yaml");
    std::fs::write(&config, bootstrap_yaml)?;
    let admin_file = dir.path().join("admin-address");
    let level = std::env::var("MESHFED_ENVOY_LOG_LEVEL").unwrap_or_else(|_| "info".to_string());
    let mut cmd = Command::new(&envoy);
    cmd.arg("-c")
        .arg(&config)
        .arg("--use-dynamic-base-id")
        .args(["--concurrency", "2"])
        .args(["--log-level", &level])
        .arg("--admin-address-path")
        .arg(&admin_file);
    if let Ok(components) = std::env::var("MESHFED_ENVOY_COMPONENT_LOG_LEVEL") {
        cmd.args(["--component-log-level", &components]);
    }
    let guard = ChildGuard::spawn_in(dir, "envoy", &mut cmd)?;
    let mut envoy = Envoy { admin_port: 0, guard };
    let deadline = Instant::now() + START_TIMEOUT;
    let mut last = String::from("no admin address yet");
    loop {
        if let Some(status) = envoy.guard.try_exited() {
            bail!(
                "Envoy exited ({status}) before it was LIVE\n{}\nbootstrap:\n{bootstrap_yaml}",
                envoy.guard.log_tail()
            );
        }
        if envoy.admin_port == 0
            && let Ok(text) = std::fs::read_to_string(&admin_file)
            && let Ok(addr) = text.trim().parse::<SocketAddr>()
        {
            envoy.admin_port = addr.port();
        }
        if envoy.admin_port != 0 {
            match http_get(envoy.admin_address(), "127.0.0.1", "/ready").await {
                Ok((200, body)) if body.trim() == "LIVE" => return Ok(envoy),
                Ok((status, body)) => last = format!("/ready: {status} {}", body.trim()),
                Err(e) => last = format!("/ready: {e:#}"),
            }
        }
        if Instant::now() >= deadline {
            bail!("Envoy not LIVE within {START_TIMEOUT:?} (last: {last})\n{}", envoy.guard.log_tail());
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// GET on an Envoy admin server at 127.0.0.1:`admin_port`; fails on a status other than 200.
pub async fn admin_get(admin_port: u16, path: &str) -> Result<String> {
    let (status, body) = http_get(SocketAddr::from((Ipv4Addr::LOCALHOST, admin_port)), "127.0.0.1", path).await?;
    if status != 200 {
        bail!("Envoy admin {path}: status {status}: {body}");
    }
    Ok(body)
}

// ---- HTTP ----

/// One HTTP/1.1 GET (`Connection: close`) to `addr` with the given Host header, bounded by
/// [`HTTP_TIMEOUT`]: (status, body).
pub async fn http_get(addr: SocketAddr, host: &str, path: &str) -> Result<(u16, String)> {
    tokio::time::timeout(HTTP_TIMEOUT, http_get_unbounded(addr, host, path))
        .await
        .map_err(|_| anyhow!("GET http://{addr}{path} (Host {host}): no complete response within {HTTP_TIMEOUT:?}"))?
        .with_context(|| format!("GET http://{addr}{path} (Host {host})"))
}

/// [`http_get`] with more header lines (`extra`: complete lines, each ending in CRLF).
pub async fn http_get_with(addr: SocketAddr, host: &str, path: &str, extra: &str) -> Result<(u16, String)> {
    tokio::time::timeout(HTTP_TIMEOUT, http_get_unbounded_with(addr, host, path, extra))
        .await
        .map_err(|_| anyhow!("GET http://{addr}{path} (Host {host}): no complete response within {HTTP_TIMEOUT:?}"))?
        .with_context(|| format!("GET http://{addr}{path} (Host {host})"))
}

async fn http_get_unbounded(addr: SocketAddr, host: &str, path: &str) -> Result<(u16, String)> {
    http_get_unbounded_with(addr, host, path, "").await
}

async fn http_get_unbounded_with(addr: SocketAddr, host: &str, path: &str, extra: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: meshfed-test\r\n{extra}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    parse_response(&raw)
}

/// Parses a complete HTTP/1.1 response (Content-Length, chunked, or until the end).
fn parse_response(raw: &[u8]) -> Result<(u16, String)> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("incomplete response ({} bytes): {:?}", raw.len(), String::from_utf8_lossy(raw)))?;
    let head = std::str::from_utf8(&raw[..end])?;
    let body = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            content_length = Some(value.parse::<usize>()?);
        } else if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        }
    }
    let body = if chunked {
        decode_chunked(body)?
    } else if let Some(n) = content_length {
        if body.len() < n {
            bail!("truncated body: {} of {n} bytes", body.len());
        }
        body[..n].to_vec()
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn decode_chunked(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").ok_or_else(|| anyhow!("bad chunked body"))?;
        let size_text = std::str::from_utf8(&data[..eol])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// An in-process HTTP/1.1 server bound on one address: it answers every request with 200 and its own
/// address (e.g. `127.61.1.21:9080`), or the reply it was given, as the body, on keep-alive
/// connections. Dropping it stops it (listener and open connections).
pub struct Backend {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    /// Binds `addr` and serves on the current Tokio runtime, answering with its address.
    pub async fn start(addr: SocketAddr) -> Result<Backend> {
        Backend::start_with_reply(addr, &addr.to_string()).await
    }

    /// Binds `addr` and serves on the current Tokio runtime, answering with `reply` (e.g. the identity
    /// of the workload it stands for, when a sidecar in front of it owns the workload's address).
    pub async fn start_with_reply(addr: SocketAddr, reply: &str) -> Result<Backend> {
        let listener = TcpListener::bind(addr).await.with_context(|| format!("backend: binding {addr}"))?;
        let hits = Arc::new(AtomicU64::new(0));
        let body: Arc<str> = reply.into();
        let counter = hits.clone();
        let task = tokio::spawn(async move {
            // The connections live in this set: aborting the accept task drops (closes) them too.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else {
                            // e.g. out of file descriptors: do not spin
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        connections.spawn(serve_connection(stream, body.clone(), counter.clone()));
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Ok(Backend { addr, hits, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a [`Backend`] on each address.
pub async fn start_backends(addrs: impl IntoIterator<Item = SocketAddr>) -> Result<Vec<Backend>> {
    let mut out = Vec::new();
    for addr in addrs {
        out.push(Backend::start(addr).await?);
    }
    Ok(out)
}

async fn serve_connection(stream: TcpStream, body: Arc<str>, hits: Arc<AtomicU64>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        // request head
        let mut head_bytes = 0usize;
        let mut content_length = 0usize;
        let mut close = false;
        let mut first = true;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head_bytes += n,
            }
            if head_bytes > 64 * 1024 {
                return;
            }
            let line = line.trim_end();
            if first {
                first = false;
                close = line.ends_with("HTTP/1.0");
                continue;
            }
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_ascii_lowercase());
                match name.as_str() {
                    "content-length" => content_length = value.parse().unwrap_or(0),
                    "connection" if value.contains("close") => close = true,
                    // not needed by the tests: answer, then close
                    "transfer-encoding" => close = true,
                    _ => {}
                }
            }
        }
        // request body (skipped)
        if content_length > 0 {
            let mut rest = (&mut reader).take(content_length as u64);
            if tokio::io::copy(&mut rest, &mut tokio::io::sink()).await.is_err() {
                return;
            }
        }
        hits.fetch_add(1, Ordering::Relaxed);
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-backend: {body}\r\n{}\r\n{body}",
            body.len(),
            if close { "connection: close\r\n" } else { "" },
        );
        if write.write_all(response.as_bytes()).await.is_err() || close {
            return;
        }
    }
}

// ---- polling ----

/// Calls `check` every [`POLL_INTERVAL`] until it returns true (-> true) or `timeout` has passed
/// (-> false). Each call is itself cut off at the remaining time.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll_until(timeout, || {
        let fut = check();
        async move { if fut.await { Ok(()) } else { Err(anyhow!("condition not met")) } }
    })
    .await
    .is_ok()
}

/// Calls `check` every [`POLL_INTERVAL`] until it returns `Ok` (-> that value) or `timeout` has passed
/// (-> the last error, with the time waited). Each call is itself cut off at the remaining time (at
/// least one second).
pub async fn poll_until<T, F, Fut>(timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let budget = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        let error = match tokio::time::timeout(budget, check()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e,
            Err(_) => anyhow!("attempt cut off after {budget:?}"),
        };
        if Instant::now() >= deadline {
            return Err(error.context(format!("still failing after {:?} ({attempts} attempts)", start.elapsed())));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

// ---- files ----

/// Replaces `path` atomically (a hidden temporary file in the same directory, then a rename), so a
/// file watcher never reads a partial file.
pub fn write_atomically(path: &Path, contents: &str) -> Result<()> {
    let dir = path.parent().ok_or_else(|| anyhow!("{} has no parent", path.display()))?;
    let name = path.file_name().ok_or_else(|| anyhow!("{} has no file name", path.display()))?;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.tmp-{}-{n}", name.to_string_lossy(), std::process::id()));
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}
