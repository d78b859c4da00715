//! The mesh config file: which clusters form the mesh, where their objects come from, and mesh-wide
//! defaults. YAML, documented in README.md. Relative paths are resolved against the file's directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::model::{ClusterId, NetworkId};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read mesh config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("mesh config {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("mesh config {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The parsed, validated mesh config.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshConfig {
    /// where it was read from (None for built-in / in-memory configs)
    pub path: Option<PathBuf>,
    /// Kubernetes DNS domain suffix, default `cluster.local`
    pub domain_suffix: String,
    pub clusters: Vec<ClusterConfig>,
    pub debounce: Debounce,
    /// Send endpoints that are not ready (as UNHEALTHY / DRAINING). istiod's default is not to.
    pub send_unhealthy_endpoints: bool,
    /// Mesh-wide outlier detection applied to every cluster without its own (None: none).
    pub default_outlier_detection: Option<OutlierDetection>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClusterConfig {
    pub id: ClusterId,
    /// the cluster's default network (a `topology.istio.io/network` label on a Pod overrides it)
    pub network: NetworkId,
    /// where this cluster's Kubernetes objects come from
    pub source: ClusterSource,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ClusterSource {
    /// a directory of Kubernetes manifests (YAML, as `kubectl get -o yaml` prints them), watched for edits
    Manifests(PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Debounce {
    /// push after this long without a new change (Istio's PILOT_DEBOUNCE_AFTER), default 100 ms
    pub quiet: Duration,
    /// push at the latest this long after the first change (PILOT_DEBOUNCE_MAX), default 1 s
    pub max: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Self { quiet: Duration::from_millis(100), max: Duration::from_secs(1) }
    }
}

/// Istio's DestinationRule outlierDetection, with Istio's defaults.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    #[serde(default = "default_5")]
    pub consecutive_5xx_errors: u32,
    #[serde(default, with = "humantime_serde_opt")]
    pub interval: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub base_ejection_time: Option<Duration>,
    #[serde(default = "default_10")]
    pub max_ejection_percent: u32,
    #[serde(default)]
    pub min_health_percent: u32,
}

fn default_5() -> u32 {
    5
}
fn default_10() -> u32 {
    10
}

/// Durations in Istio's form (`10s`, `100ms`, `1m`, `1.5s`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    if !(n.is_finite() && n >= 0.0) {
        return None;
    }
    let secs = match unit {
        "ns" => n / 1e9,
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        match s {
            None => Ok(None),
            Some(s) => super::parse_duration(&s)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom(format!("invalid duration {s:?} (use e.g. 10s, 500ms)"))),
        }
    }
}

// ---- the file format ----

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawMeshConfig {
    #[serde(default)]
    domain_suffix: Option<String>,
    clusters: Vec<RawCluster>,
    #[serde(default)]
    debounce: Option<RawDebounce>,
    #[serde(default)]
    send_unhealthy_endpoints: bool,
    #[serde(default)]
    defaults: Option<RawDefaults>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCluster {
    id: String,
    network: String,
    manifests: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDebounce {
    #[serde(default)]
    quiet: Option<String>,
    #[serde(default)]
    max: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDefaults {
    #[serde(default)]
    outlier_detection: Option<OutlierDetection>,
}

impl MeshConfig {
    /// Reads and validates a mesh config file.
    pub fn load(path: &Path) -> Result<MeshConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.into(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut cfg = Self::parse(&text, base).map_err(|e| match e {
            Error::Parse { reason, .. } => Error::Parse { path: path.into(), reason },
            Error::Invalid { reason, .. } => Error::Invalid { path: path.into(), reason },
            other => other,
        })?;
        cfg.path = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Parses a mesh config from text; relative manifest paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<MeshConfig, Error> {
        let path = PathBuf::from("<mesh config>");
        let raw: RawMeshConfig = serde_yaml::from_str(text).map_err(|e| Error::Parse {
            path: path.clone(),
            reason: match e.location() {
                Some(l) => format!("line {}, column {}: {e}", l.line(), l.column()),
                None => e.to_string(),
            },
        })?;
        let invalid = |reason: String| Error::Invalid { path: path.clone(), reason };
        let mut clusters = Vec::new();
        for c in raw.clusters {
            if c.id.is_empty() {
                return Err(invalid("a cluster has an empty id".into()));
            }
            if clusters.iter().any(|x: &ClusterConfig| x.id.as_str() == c.id) {
                return Err(invalid(format!("cluster {:?} is listed twice", c.id)));
            }
            let source = match c.manifests {
                Some(dir) => ClusterSource::Manifests(if dir.is_absolute() { dir } else { base.join(dir) }),
                None => return Err(invalid(format!("cluster {:?} has no source (set `manifests: DIR`)", c.id))),
            };
            clusters.push(ClusterConfig { id: ClusterId::new(&c.id), network: NetworkId::new(&c.network), source });
        }
        let mut debounce = Debounce::default();
        if let Some(d) = raw.debounce {
            if let Some(q) = d.quiet {
                debounce.quiet =
                    parse_duration(&q).ok_or_else(|| invalid(format!("debounce.quiet: invalid duration {q:?}")))?;
            }
            if let Some(m) = d.max {
                debounce.max =
                    parse_duration(&m).ok_or_else(|| invalid(format!("debounce.max: invalid duration {m:?}")))?;
            }
        }
        Ok(MeshConfig {
            path: None,
            domain_suffix: raw.domain_suffix.unwrap_or_else(|| "cluster.local".into()),
            clusters,
            debounce,
            send_unhealthy_endpoints: raw.send_unhealthy_endpoints,
            default_outlier_detection: raw.defaults.and_then(|d| d.outlier_detection),
        })
    }
}
