//! Child processes and the small things every process test needs: [`ChildGuard`] (a child killed and
//! reaped when dropped, its logs printed when a test fails), [`run_command`], loopback ports and
//! addresses, bounded polling ([`wait_until`] / [`poll_until`] / [`eventually`]) and atomic file writes.
//!
//! Everything here is bounded: every wait has a timeout, every child process is killed (and reaped) when
//! its guard is dropped, also when a test panics. The runners built on it: [`crate::meshfed`] (`meshfed
//! serve`) and [`crate::envoy`] (real Envoys).

use std::fmt::Write as _;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

/// Cap of the start of a child process (until it is ready).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Cap of a short-lived command (`meshfed bootstrap`).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between two attempts of [`wait_until`] / [`poll_until`].
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// At most this much of each log file is printed when a test fails.
const LOG_TAIL_BYTES: usize = 64 * 1024;

// ---- paths and ports ----

/// The workspace's top directory (where `.venv` and `examples/` are).
pub fn workspace_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("the workspace directory")
}

/// The Python interpreter with the packages of `tests/python/requirements.txt`: `$MESHFED_PYTHON`, else
/// `<workspace>/.venv/bin/python`. A missing interpreter fails the test (it never skips).
pub fn python_path() -> PathBuf {
    let (path, origin) = match std::env::var_os("MESHFED_PYTHON") {
        Some(p) => (PathBuf::from(p), "$MESHFED_PYTHON"),
        None => (workspace_dir().join(".venv/bin/python"), "the default location"),
    };
    assert!(
        path.is_file(),
        "Python not found at {} ({origin}): run the setup in README.md or scripts/test-all.sh (they create \
         .venv and install tests/python/requirements.txt into it), or set MESHFED_PYTHON",
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

/// Checks `f` every 10 ms (it reads in-process state, cheaply) until it returns `Some` (-> that value);
/// fails the test (panics, naming `what`) after `timeout`.
pub async fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
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
