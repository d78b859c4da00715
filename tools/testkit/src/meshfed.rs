//! `meshfed serve` as a child process: [`start_meshfed`] / [`start_meshfed_with`] start it on free loopback
//! ports (or given ones, to restart it where it was) and return once `/ready` answers 200 and the xDS port
//! accepts connections; [`Meshfed`] reads its debug server.
//!
//! Set `MESHFED_TEST_LOG` to change meshfed's `RUST_LOG` (default `info`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::net::TcpStream;

use crate::http::{HTTP_TIMEOUT, http_get_with};
use crate::process::{ChildGuard, POLL_INTERVAL, START_TIMEOUT, free_port};

/// Runs `meshfed traffic ARGS` to its end (bounded); its stdout, or an error with its output when it fails.
pub fn traffic_cmd(args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(meshfed_path());
    cmd.arg("traffic").args(args);
    crate::process::run_command("meshfed traffic", &mut cmd)
}

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
