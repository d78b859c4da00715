//! Traffic policy: Istio DestinationRules (networking.istio.io v1 / v1beta1 / v1alpha3) and the
//! mesh-wide defaults, validated as istiod validates them and resolved per service port.
//!
//! Only what shapes cross-cluster traffic is modelled: `trafficPolicy.loadBalancer.localityLbSetting`,
//! `trafficPolicy.outlierDetection`, and their `portLevelSettings` overrides. Other fields of a rule are
//! accepted and ignored.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::parse_duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("DestinationRule {object}: {field}: {reason}")]
pub struct Error {
    /// `namespace/name`
    pub object: String,
    /// the offending field, as a path (`spec.trafficPolicy.outlierDetection.interval`)
    pub field: String,
    pub reason: String,
}

/// Istio's outlierDetection. Unset fields keep Envoy's defaults, which are Istio's documented defaults
/// (consecutive5xxErrors 5, interval 10s, baseEjectionTime 30s, maxEjectionPercent 10).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub consecutive_local_origin_failures: Option<u32>,
    pub split_external_local_origin_errors: bool,
    pub interval: Option<Duration>,
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_percent: Option<u32>,
    /// Istio sets Envoy's healthy_panic_threshold to this (default 0: panic mode off)
    pub min_health_percent: u32,
}

/// A `distribute` entry: traffic from localities matching `from` is split over `to` by weight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Distribute {
    pub from: String,
    pub to: BTreeMap<String, u32>,
}

/// A `failover` entry: when a proxy's region is `from`, the next priority after its region is `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Failover {
    pub from: String,
    pub to: String,
}

/// Istio's localityLbSetting.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LocalityLbSetting {
    /// None: enabled (Istio's default)
    pub enabled: Option<bool>,
    pub distribute: Vec<Distribute>,
    pub failover: Vec<Failover>,
    pub failover_priority: Vec<String>,
}

impl LocalityLbSetting {
    pub fn is_enabled(&self) -> bool {
        self.enabled != Some(false)
    }
}

/// Policy for one port (`portLevelSettings`), overriding the rule's top level field by field.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PortPolicy {
    pub port: u16,
    pub locality_lb: Option<LocalityLbSetting>,
    pub outlier_detection: Option<OutlierDetection>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TrafficPolicy {
    pub locality_lb: Option<LocalityLbSetting>,
    pub outlier_detection: Option<OutlierDetection>,
    pub port_level: Vec<PortPolicy>,
}

/// A validated DestinationRule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DestinationRule {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// as written: an FQDN, a short name (relative to the rule's namespace) or a `*.` wildcard
    pub host: String,
    pub traffic_policy: TrafficPolicy,
}

impl DestinationRule {
    /// Istio's config path, written to cluster metadata `filter_metadata.istio.config`.
    pub fn config_path(&self) -> String {
        format!("/apis/networking.istio.io/v1/namespaces/{}/destination-rule/{}", self.namespace, self.name)
    }

    /// The rule's host as an FQDN (short names resolve in the rule's namespace).
    pub fn fqdn_host(&self, domain_suffix: &str) -> String {
        if self.host.starts_with('*') || self.host.contains('.') {
            self.host.clone()
        } else {
            format!("{}.{}.svc.{}", self.host, self.namespace, domain_suffix)
        }
    }

    /// How well the rule's host matches `fqdn`: None when it does not; longer is more specific.
    pub fn host_match(&self, fqdn: &str, domain_suffix: &str) -> Option<usize> {
        let host = self.fqdn_host(domain_suffix);
        if host == fqdn {
            return Some(usize::MAX);
        }
        if host == "*" {
            return Some(0);
        }
        let suffix = host.strip_prefix('*')?;
        fqdn.ends_with(suffix).then_some(suffix.len())
    }

    /// The policy for one port: the port-level settings override the top level, field by field.
    pub fn for_port(&self, port: u16) -> (Option<&LocalityLbSetting>, Option<&OutlierDetection>) {
        let top = &self.traffic_policy;
        match top.port_level.iter().find(|p| p.port == port) {
            Some(p) => (
                p.locality_lb.as_ref().or(top.locality_lb.as_ref()),
                p.outlier_detection.as_ref().or(top.outlier_detection.as_ref()),
            ),
            None => (top.locality_lb.as_ref(), top.outlier_detection.as_ref()),
        }
    }
}

/// The mesh-wide defaults (mesh config `defaults`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MeshDefaults {
    pub outlier_detection: Option<OutlierDetection>,
    pub locality_lb: LocalityLbSetting,
}

/// What applies to one service port after DestinationRules and mesh defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EffectivePolicy {
    pub locality_lb: LocalityLbSetting,
    pub outlier_detection: Option<OutlierDetection>,
    /// the rule that shaped it (`namespace/name`) and its config path
    pub rule: Option<(Arc<str>, String)>,
}

impl EffectivePolicy {
    /// Failover (priorities beyond the proxy's own locality) takes effect only with outlier detection,
    /// as in istiod: without it Envoy would never move traffic away from a failing locality.
    pub fn failover_active(&self) -> bool {
        self.locality_lb.is_enabled() && self.locality_lb.distribute.is_empty() && self.outlier_detection.is_some()
    }

    /// A failover policy is configured but inert for lack of outlier detection (istio#48084).
    pub fn failover_without_outlier_detection(&self) -> bool {
        self.locality_lb.is_enabled()
            && (!self.locality_lb.failover.is_empty() || !self.locality_lb.failover_priority.is_empty())
            && self.outlier_detection.is_none()
    }

    pub fn distribute_active(&self) -> bool {
        self.locality_lb.is_enabled() && !self.locality_lb.distribute.is_empty()
    }
}

/// Chooses the rule for a service and resolves the policy of one of its ports.
///
/// Among rules whose host matches the service: an exact host beats a wildcard, a longer wildcard a
/// shorter one, a rule in the service's namespace one elsewhere; remaining ties go to the first rule in
/// `rules` order (callers pass them sorted by cluster, namespace, name, so the choice is deterministic).
pub fn resolve<'a>(
    rules: impl IntoIterator<Item = &'a DestinationRule>,
    fqdn: &str,
    service_namespace: &str,
    port: u16,
    defaults: &MeshDefaults,
    domain_suffix: &str,
) -> EffectivePolicy {
    let mut best: Option<((usize, bool), &DestinationRule)> = None;
    for r in rules {
        let Some(m) = r.host_match(fqdn, domain_suffix) else { continue };
        let rank = (m, &*r.namespace == service_namespace);
        if best.as_ref().is_none_or(|(b, _)| rank > *b) {
            best = Some((rank, r));
        }
    }
    let Some((_, rule)) = best else {
        return EffectivePolicy {
            locality_lb: defaults.locality_lb.clone(),
            outlier_detection: defaults.outlier_detection.clone(),
            rule: None,
        };
    };
    let (lb, od) = rule.for_port(port);
    EffectivePolicy {
        locality_lb: lb.cloned().unwrap_or_else(|| defaults.locality_lb.clone()),
        outlier_detection: od.cloned().or_else(|| defaults.outlier_detection.clone()),
        rule: Some((format!("{}/{}", rule.namespace, rule.name).into(), rule.config_path())),
    }
}

// ---------------- parsing and validation ----------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRule {
    metadata: RawMeta,
    spec: RawSpec,
}

#[derive(Deserialize)]
struct RawMeta {
    name: Option<String>,
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSpec {
    host: Option<String>,
    #[serde(default)]
    traffic_policy: Option<RawTrafficPolicy>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawTrafficPolicy {
    #[serde(default)]
    load_balancer: Option<RawLoadBalancer>,
    #[serde(default)]
    outlier_detection: Option<RawOutlier>,
    #[serde(default)]
    port_level_settings: Vec<RawPortSettings>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPortSettings {
    port: Option<RawPort>,
    #[serde(default)]
    load_balancer: Option<RawLoadBalancer>,
    #[serde(default)]
    outlier_detection: Option<RawOutlier>,
}

#[derive(Deserialize)]
struct RawPort {
    number: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLoadBalancer {
    #[serde(default)]
    locality_lb_setting: Option<RawLocalityLb>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawLocalityLb {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    distribute: Vec<RawDistribute>,
    #[serde(default)]
    failover: Vec<RawFailover>,
    #[serde(default)]
    failover_priority: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDistribute {
    from: String,
    #[serde(default)]
    to: BTreeMap<String, i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailover {
    from: String,
    to: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawOutlier {
    #[serde(default)]
    consecutive_errors: Option<i64>,
    #[serde(default, rename = "consecutive5xxErrors")]
    consecutive_5xx_errors: Option<i64>,
    #[serde(default)]
    consecutive_gateway_errors: Option<i64>,
    #[serde(default)]
    consecutive_local_origin_failures: Option<i64>,
    #[serde(default)]
    split_external_local_origin_errors: bool,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    base_ejection_time: Option<String>,
    #[serde(default)]
    max_ejection_percent: Option<i64>,
    #[serde(default)]
    min_health_percent: Option<i64>,
}

struct Ctx<'a> {
    object: &'a str,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error { object: self.object.to_string(), field: field.into(), reason: reason.into() }
    }
}

fn u32_field(ctx: &Ctx<'_>, field: &str, v: Option<i64>, max: i64) -> Result<Option<u32>, Error> {
    match v {
        None => Ok(None),
        Some(v) if (0..=max).contains(&v) => Ok(Some(v as u32)),
        Some(v) => Err(ctx.err(field, format!("{v} is out of range 0..={max}"))),
    }
}

fn duration_field(ctx: &Ctx<'_>, field: &str, v: Option<&str>) -> Result<Option<Duration>, Error> {
    let Some(s) = v else { return Ok(None) };
    let d = parse_duration(s).ok_or_else(|| ctx.err(field, format!("{s:?} is not a duration (e.g. 10s, 500ms)")))?;
    if d < Duration::from_millis(1) {
        return Err(ctx.err(field, "must be at least 1ms"));
    }
    Ok(Some(d))
}

fn outlier(ctx: &Ctx<'_>, path: &str, raw: RawOutlier) -> Result<OutlierDetection, Error> {
    let f = |name: &str| format!("{path}.{name}");
    let mut od = OutlierDetection {
        consecutive_5xx_errors: u32_field(
            ctx,
            &f("consecutive5xxErrors"),
            raw.consecutive_5xx_errors,
            u32::MAX as i64,
        )?,
        consecutive_gateway_errors: u32_field(
            ctx,
            &f("consecutiveGatewayErrors"),
            raw.consecutive_gateway_errors,
            u32::MAX as i64,
        )?,
        consecutive_local_origin_failures: u32_field(
            ctx,
            &f("consecutiveLocalOriginFailures"),
            raw.consecutive_local_origin_failures,
            u32::MAX as i64,
        )?,
        split_external_local_origin_errors: raw.split_external_local_origin_errors,
        interval: duration_field(ctx, &f("interval"), raw.interval.as_deref())?,
        base_ejection_time: duration_field(ctx, &f("baseEjectionTime"), raw.base_ejection_time.as_deref())?,
        max_ejection_percent: u32_field(ctx, &f("maxEjectionPercent"), raw.max_ejection_percent, 100)?,
        min_health_percent: u32_field(ctx, &f("minHealthPercent"), raw.min_health_percent, 100)?.unwrap_or(0),
    };
    // The deprecated consecutiveErrors counts 5xx when consecutive5xxErrors is not set.
    if od.consecutive_5xx_errors.is_none() {
        od.consecutive_5xx_errors = u32_field(ctx, &f("consecutiveErrors"), raw.consecutive_errors, u32::MAX as i64)?;
    }
    if od.consecutive_local_origin_failures.is_some() && !od.split_external_local_origin_errors {
        return Err(ctx.err(f("consecutiveLocalOriginFailures"), "requires splitExternalLocalOriginErrors: true"));
    }
    Ok(od)
}

fn valid_locality_pattern(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    if parts.is_empty() || parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
        return false;
    }
    // `*` may only be the last part
    parts.iter().enumerate().all(|(i, p)| !p.contains('*') || (*p == "*" && i == parts.len() - 1))
}

fn locality_lb(ctx: &Ctx<'_>, path: &str, raw: RawLocalityLb) -> Result<LocalityLbSetting, Error> {
    if !raw.distribute.is_empty() && (!raw.failover.is_empty() || !raw.failover_priority.is_empty()) {
        return Err(ctx.err(path, "distribute and failover/failoverPriority are mutually exclusive"));
    }
    let mut distribute = Vec::new();
    for (i, d) in raw.distribute.into_iter().enumerate() {
        let p = format!("{path}.distribute[{i}]");
        if !valid_locality_pattern(&d.from) {
            return Err(
                ctx.err(format!("{p}.from"), format!("{:?} is not REGION[/ZONE[/SUBZONE]] (with * last)", d.from))
            );
        }
        let mut to = BTreeMap::new();
        let mut sum = 0i64;
        for (loc, w) in d.to {
            if !valid_locality_pattern(&loc) {
                return Err(ctx.err(format!("{p}.to"), format!("{loc:?} is not REGION[/ZONE[/SUBZONE]] (with * last)")));
            }
            if !(0..=100).contains(&w) {
                return Err(ctx.err(format!("{p}.to[{loc}]"), format!("weight {w} is out of range 0..=100")));
            }
            sum += w;
            to.insert(loc, w as u32);
        }
        if sum != 100 {
            return Err(ctx.err(format!("{p}.to"), format!("weights must add up to 100, they add up to {sum}")));
        }
        distribute.push(Distribute { from: d.from, to });
    }
    let mut failover = Vec::new();
    for (i, f) in raw.failover.into_iter().enumerate() {
        let p = format!("{path}.failover[{i}]");
        if f.from.is_empty() || f.from.contains('/') || f.to.is_empty() || f.to.contains('/') {
            return Err(ctx.err(p, "failover from/to must be regions (no zones)"));
        }
        if f.from == f.to {
            return Err(ctx.err(p, format!("from and to are the same region {:?}", f.from)));
        }
        failover.push(Failover { from: f.from, to: f.to });
    }
    for (i, l) in raw.failover_priority.iter().enumerate() {
        if l.trim_start_matches('=').is_empty() {
            return Err(ctx.err(format!("{path}.failoverPriority[{i}]"), "empty label"));
        }
    }
    Ok(LocalityLbSetting { enabled: raw.enabled, distribute, failover, failover_priority: raw.failover_priority })
}

impl DestinationRule {
    /// Parses and validates a DestinationRule object (any serde representation of the YAML/JSON).
    pub fn from_value<'de, D: serde::Deserializer<'de>>(value: D) -> Result<DestinationRule, Error> {
        let raw: RawRule = serde_path_to_error::deserialize(value).map_err(|e| Error {
            object: "<unknown>".into(),
            field: e.path().to_string(),
            reason: e.inner().to_string(),
        })?;
        let name = raw.metadata.name.filter(|n| !n.is_empty());
        let namespace = raw.metadata.namespace.filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
        let object = format!("{namespace}/{}", name.as_deref().unwrap_or("<unnamed>"));
        let ctx = Ctx { object: &object };
        let Some(name) = name else { return Err(ctx.err("metadata.name", "missing")) };
        let host = raw.spec.host.filter(|h| !h.is_empty()).ok_or_else(|| ctx.err("spec.host", "missing"))?;
        let tp = raw.spec.traffic_policy.unwrap_or_default();
        let base = "spec.trafficPolicy";
        let mut traffic_policy = TrafficPolicy {
            locality_lb: match tp.load_balancer.and_then(|l| l.locality_lb_setting) {
                Some(l) => Some(locality_lb(&ctx, &format!("{base}.loadBalancer.localityLbSetting"), l)?),
                None => None,
            },
            outlier_detection: match tp.outlier_detection {
                Some(o) => Some(outlier(&ctx, &format!("{base}.outlierDetection"), o)?),
                None => None,
            },
            port_level: Vec::new(),
        };
        for (i, p) in tp.port_level_settings.into_iter().enumerate() {
            let path = format!("{base}.portLevelSettings[{i}]");
            let number =
                p.port.and_then(|p| p.number).ok_or_else(|| ctx.err(format!("{path}.port.number"), "missing"))?;
            if !(1..=65535).contains(&number) {
                return Err(ctx.err(format!("{path}.port.number"), format!("{number} is not a port")));
            }
            let port = number as u16;
            if traffic_policy.port_level.iter().any(|x| x.port == port) {
                return Err(ctx.err(format!("{path}.port.number"), format!("port {port} is listed twice")));
            }
            traffic_policy.port_level.push(PortPolicy {
                port,
                locality_lb: match p.load_balancer.and_then(|l| l.locality_lb_setting) {
                    Some(l) => Some(locality_lb(&ctx, &format!("{path}.loadBalancer.localityLbSetting"), l)?),
                    None => None,
                },
                outlier_detection: match p.outlier_detection {
                    Some(o) => Some(outlier(&ctx, &format!("{path}.outlierDetection"), o)?),
                    None => None,
                },
            });
        }
        Ok(DestinationRule { namespace: namespace.into(), name: name.into(), host, traffic_policy })
    }

    pub fn from_yaml(text: &str) -> Result<DestinationRule, Error> {
        DestinationRule::from_value(serde_yaml::Deserializer::from_str(text))
    }
}

/// Parses the mesh config's `defaults.outlierDetection` (same fields as a DestinationRule's).
pub fn parse_outlier_value(value: &serde_yaml::Value, path: &str) -> Result<OutlierDetection, Error> {
    let raw: RawOutlier = serde_path_to_error::deserialize(value.clone()).map_err(|e| Error {
        object: "mesh config".into(),
        field: format!("{path}.{}", e.path()),
        reason: e.inner().to_string(),
    })?;
    outlier(&Ctx { object: "mesh config" }, path, raw)
}

/// Parses the mesh config's `defaults.localityLbSetting`.
pub fn parse_locality_lb_value(value: &serde_yaml::Value, path: &str) -> Result<LocalityLbSetting, Error> {
    let raw: RawLocalityLb = serde_path_to_error::deserialize(value.clone()).map_err(|e| Error {
        object: "mesh config".into(),
        field: format!("{path}.{}", e.path()),
        reason: e.inner().to_string(),
    })?;
    locality_lb(&Ctx { object: "mesh config" }, path, raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: shop
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 100}
    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting:
        enabled: true
        failover:
          - from: us-east-1
            to: westeurope
    outlierDetection:
      consecutive5xxErrors: 3
      consecutiveGatewayErrors: 2
      consecutiveLocalOriginFailures: 4
      splitExternalLocalOriginErrors: true
      interval: 1s
      baseEjectionTime: 15s
      maxEjectionPercent: 100
      minHealthPercent: 20
    portLevelSettings:
      - port: {number: 9091}
        outlierDetection:
          consecutive5xxErrors: 7
  subsets:
    - name: v1
      labels: {version: v1}
"#;

    #[test]
    fn parses_every_outlier_field_and_port_overrides() {
        let r = DestinationRule::from_yaml(FULL).unwrap();
        assert_eq!(&*r.namespace, "shop");
        assert_eq!(r.fqdn_host("cluster.local"), "reviews.shop.svc.cluster.local");
        let od = r.traffic_policy.outlier_detection.as_ref().unwrap();
        assert_eq!(
            *od,
            OutlierDetection {
                consecutive_5xx_errors: Some(3),
                consecutive_gateway_errors: Some(2),
                consecutive_local_origin_failures: Some(4),
                split_external_local_origin_errors: true,
                interval: Some(Duration::from_secs(1)),
                base_ejection_time: Some(Duration::from_secs(15)),
                max_ejection_percent: Some(100),
                min_health_percent: 20,
            }
        );
        let (lb, od) = r.for_port(9091);
        assert_eq!(od.unwrap().consecutive_5xx_errors, Some(7));
        assert_eq!(lb.unwrap().failover, vec![Failover { from: "us-east-1".into(), to: "westeurope".into() }]);
        let (_, od) = r.for_port(9080);
        assert_eq!(od.unwrap().consecutive_5xx_errors, Some(3));
        assert_eq!(r.config_path(), "/apis/networking.istio.io/v1/namespaces/shop/destination-rule/reviews");
    }

    fn err(yaml_spec: &str) -> Error {
        let text = format!("metadata: {{name: bad, namespace: shop}}\nspec:\n{yaml_spec}");
        DestinationRule::from_yaml(&text).unwrap_err()
    }

    #[test]
    fn invalid_rules_name_object_field_and_reason() {
        let e = err("  host: reviews\n  trafficPolicy:\n    outlierDetection:\n      interval: soon\n");
        assert_eq!(e.object, "shop/bad");
        assert_eq!(e.field, "spec.trafficPolicy.outlierDetection.interval");
        assert!(e.reason.contains("not a duration"), "{e}");

        let e = err("  host: reviews\n  trafficPolicy:\n    outlierDetection:\n      maxEjectionPercent: 150\n");
        assert_eq!(e.field, "spec.trafficPolicy.outlierDetection.maxEjectionPercent");

        let e = err(
            "  host: r\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n        distribute:\n          - from: us-east-1/*\n            to: {\"us-east-1/*\": 70, \"westeurope/*\": 20}\n",
        );
        assert!(e.reason.contains("add up to 100"), "{e}");

        let e = err(
            "  host: r\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n        distribute: [{from: a, to: {a: 100}}]\n        failover: [{from: a, to: b}]\n",
        );
        assert!(e.reason.contains("mutually exclusive"), "{e}");

        let e = err(
            "  host: r\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n        failover: [{from: a, to: a}]\n",
        );
        assert!(e.reason.contains("same region"), "{e}");

        let e = err("  trafficPolicy: {}\n");
        assert_eq!(e.field, "spec.host");

        let e = err("  host: r\n  trafficPolicy:\n    portLevelSettings:\n      - port: {number: 0}\n");
        assert_eq!(e.field, "spec.trafficPolicy.portLevelSettings[0].port.number");

        let e = err("  host: r\n  trafficPolicy:\n    outlierDetection:\n      consecutive5xxErrors: many\n");
        assert!(e.field.contains("consecutive5xxErrors"), "{e}");

        let e = err("  host: r\n  trafficPolicy:\n    outlierDetection:\n      consecutiveLocalOriginFailures: 3\n");
        assert!(e.reason.contains("splitExternalLocalOriginErrors"), "{e}");
    }

    #[test]
    fn resolution_prefers_exact_then_namespace_then_defaults() {
        let mk = |ns: &str, name: &str, host: &str, c5xx: u32| DestinationRule {
            namespace: ns.into(),
            name: name.into(),
            host: host.into(),
            traffic_policy: TrafficPolicy {
                outlier_detection: Some(OutlierDetection { consecutive_5xx_errors: Some(c5xx), ..Default::default() }),
                ..Default::default()
            },
        };
        let defaults = MeshDefaults {
            outlier_detection: Some(OutlierDetection { consecutive_5xx_errors: Some(1), ..Default::default() }),
            locality_lb: LocalityLbSetting {
                failover: vec![Failover { from: "us-east-1".into(), to: "westeurope".into() }],
                ..Default::default()
            },
        };
        let fqdn = "reviews.shop.svc.cluster.local";
        let rules = [mk("shop", "wild", "*.shop.svc.cluster.local", 2), mk("other", "exact", fqdn, 3)];
        let p = resolve(&rules, fqdn, "shop", 9080, &defaults, "cluster.local");
        assert_eq!(p.outlier_detection.unwrap().consecutive_5xx_errors, Some(3));
        assert_eq!(&*p.rule.unwrap().0, "other/exact");
        // the DR does not set localityLbSetting: the mesh default applies
        let p = resolve(&rules, fqdn, "shop", 9080, &defaults, "cluster.local");
        assert_eq!(p.locality_lb.failover.len(), 1);
        assert!(p.failover_active());
        let p = resolve(&rules[..1], "ratings.shop.svc.cluster.local", "shop", 9080, &defaults, "cluster.local");
        assert_eq!(p.outlier_detection.unwrap().consecutive_5xx_errors, Some(2));
        let p = resolve(&rules, "x.other.svc.cluster.local", "other", 80, &defaults, "cluster.local");
        assert!(p.rule.is_none());
        assert_eq!(p.outlier_detection.unwrap().consecutive_5xx_errors, Some(1));
    }

    #[test]
    fn failover_needs_outlier_detection() {
        let p = EffectivePolicy {
            locality_lb: LocalityLbSetting {
                failover: vec![Failover { from: "a".into(), to: "b".into() }],
                ..Default::default()
            },
            outlier_detection: None,
            rule: None,
        };
        assert!(!p.failover_active());
        assert!(p.failover_without_outlier_detection());
    }
}
