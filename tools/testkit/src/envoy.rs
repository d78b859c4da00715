//! Real Envoys as child processes: [`bootstrap`] / [`bootstrap_with`] run `meshfed bootstrap` ([`BootstrapSpec`]:
//! TLS identity, inbound address, labels, xDS over TLS...), [`start_envoy`] starts Envoy on the result and
//! returns once its admin `/ready` says LIVE, and [`Envoy`] reads its admin API (`/clusters` as
//! [`HostStatus`] / [`HostDetail`], `/stats`, the `update_rejected` counters, its log's complaints).
//!
//! The Envoy binary is `$MESHFED_ENVOY`, else `<workspace>/.venv/bin/envoy`; a missing binary fails the
//! test (the README's setup installs it), it never skips. Set `MESHFED_ENVOY_LOG_LEVEL` /
//! `MESHFED_ENVOY_COMPONENT_LOG_LEVEL` to change Envoy's logging (default `info`; e.g.
//! `upstream:debug,config:debug`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow, bail};

use crate::ca::MeshIdentity;
use crate::http::http_get;
use crate::meshfed::meshfed_path;
use crate::process::{ChildGuard, POLL_INTERVAL, START_TIMEOUT, run_command, workspace_dir};

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
    /// `--router-mode` (router node ids): `sni-dnat` for east-west gateways, `standard` for ingress
    pub router_mode: Option<&'static str>,
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

    /// The demo's Azure east-west gateway at `ip`: a `router` in Istio's `sni-dnat` mode, cluster
    /// azure-weu, network azure-net, westeurope-1.
    pub fn azure_east_west_gateway(ip: IpAddr, xds_port: u16) -> BootstrapSpec {
        BootstrapSpec {
            cluster_id: Some("azure-weu".into()),
            network: Some("azure-net".into()),
            locality: Some("westeurope/westeurope-1".into()),
            router_mode: Some("sni-dnat"),
            ..BootstrapSpec::new(
                &format!("router~{ip}~istio-eastwestgateway-0.istio-system~istio-system.svc.cluster.local"),
                xds_port,
            )
        }
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
    if let Some(mode) = spec.router_mode {
        cmd.args(["--router-mode", mode]);
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
