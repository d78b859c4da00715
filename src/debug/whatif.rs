//! `/debug/whatif`: the share of a proxy's requests to a service that each cluster and locality
//! receives now, and under a hypothesis (a cluster drained to 0, a cluster lost), computed with Envoy's
//! own load-balancing math ([`crate::traffic::lb`]) from the assignment meshfed serves the proxy (now) or
//! would serve it (the hypothesis: the traffic decision and the translation done again).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::cache::Snapshot;
use crate::model::{ClusterId, NetworkId, Service};
use crate::traffic::decide::RegionShares;
use crate::traffic::policy::{Drain, DrainTarget};
use crate::translate::{ClusterScope, Context, EndpointScope};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no service with hostname {0:?}")]
    UnknownService(String),
    #[error("service {service} has no port {port}")]
    UnknownPort { service: String, port: u16 },
    #[error("{what}: no cluster {id:?} in the mesh")]
    UnknownCluster { what: &'static str, id: String },
}

/// A hypothesis.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hypothesis {
    /// a cluster drained to 0 (a drain without ramp, now)
    pub drain: Option<ClusterId>,
    /// a cluster lost (its endpoints gone)
    pub down: Option<ClusterId>,
}

impl Hypothesis {
    pub fn is_empty(&self) -> bool {
        self.drain.is_none() && self.down.is_none()
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(c) = &self.drain {
            parts.push(format!("cluster {c} drained to 0"));
        }
        if let Some(c) = &self.down {
            parts.push(format!("cluster {c} lost"));
        }
        parts.join(", ")
    }
}

/// One locality's share.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalityPrediction {
    pub locality: String,
    pub priority: u32,
    pub weight: u32,
    /// percent of the requests
    pub share: f64,
    /// the clusters its hosts stand for, with their part of `share`
    pub by_cluster: BTreeMap<String, f64>,
}

/// Shares of the requests, in percent.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Prediction {
    pub by_cluster: BTreeMap<String, f64>,
    pub localities: Vec<LocalityPrediction>,
    /// the traffic decision for the proxy's region, with each cluster's reason (None: no split applies)
    pub decision: Option<RegionShares>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WhatIf {
    pub host: String,
    /// the Envoy cluster (`outbound|PORT||FQDN`)
    pub cluster: String,
    pub source_region: String,
    pub network: String,
    /// the cluster has `locality_weighted_lb_config` (locality weights count)
    pub locality_weighted: bool,
    pub now: Prediction,
    /// the hypothesis, in words (None: none asked)
    pub hypothesis: Option<String>,
    pub what_if: Option<Prediction>,
    /// what the prediction leaves out, what the decision ignored
    pub notes: Vec<String>,
}

/// The prediction for proxies in `scope` (and `clusters`, for the cluster's LB settings) of `host`'s
/// port `port` (default: its first), now and under `hypothesis`.
pub fn whatif(
    snapshot: &Snapshot,
    scope: &EndpointScope,
    clusters: &ClusterScope,
    host: &str,
    port: Option<u16>,
    hypothesis: &Hypothesis,
    now: SystemTime,
) -> Result<WhatIf, Error> {
    let service =
        snapshot.services.values().find(|s| &*s.hostname == host).ok_or_else(|| Error::UnknownService(host.into()))?;
    let port = match port {
        None => service.ports.first(),
        Some(p) => service.ports.iter().find(|sp| sp.port == p),
    }
    .ok_or_else(|| Error::UnknownPort { service: host.into(), port: port.unwrap_or(0) })?;
    for (what, id) in [("drain", &hypothesis.drain), ("down", &hypothesis.down)] {
        if let Some(id) = id
            && !snapshot.clusters_summary.iter().any(|c| c.id == *id)
        {
            return Err(Error::UnknownCluster { what, id: id.to_string() });
        }
    }
    let ctx = &snapshot.context;
    let rule = ctx.rule_for(&scope.rules, service);
    let cluster = crate::translate::cluster::port_cluster(ctx, clusters, service, port, rule, None);
    let locality_weighted = cluster.common_lb_config.as_ref().is_some_and(|c| c.locality_config_specifier.is_some());
    let mut notes = vec![
        "Envoy's panic mode, outlier ejections and connection reuse are not modelled; shares are of requests"
            .to_string(),
    ];
    notes.extend(ctx.traffic.services.get(host).into_iter().flat_map(|d| d.notes.iter().cloned()));
    let now_prediction = predict(ctx, scope, service, port, locality_weighted);
    let what_if = if hypothesis.is_empty() {
        None
    } else {
        let mut svc = (**service).clone();
        if let Some(down) = &hypothesis.down {
            svc.endpoints.retain(|e| e.cluster != *down);
        }
        let mut policy = snapshot.traffic.policy.clone();
        if let Some(drain) = &hypothesis.drain {
            if policy.policy_for(host).is_none() {
                notes.push(format!("no traffic policy covers {host}: a drain changes nothing for it"));
            }
            policy.drains.push(Drain {
                target: DrainTarget::Cluster(drain.clone()),
                capacity: 0,
                ramp: None,
                start: Some(now),
                expires: now + Duration::from_secs(3600),
                reason: "what-if".into(),
                drill: None,
            });
        }
        let all = crate::traffic::decide_all(&policy, [], [&svc], now, &snapshot.traffic.failover);
        let mut decisions = (*ctx.traffic).clone();
        match all.decisions.services.get(host) {
            Some(d) => {
                decisions.services.insert(svc.hostname.clone(), d.clone());
            }
            None => {
                decisions.services.remove(host);
            }
        }
        let hctx = Context { traffic: Arc::new(decisions), ..(**ctx).clone() };
        Some(predict(&hctx, scope, &svc, port, locality_weighted))
    };
    Ok(WhatIf {
        host: host.into(),
        cluster: cluster.name,
        source_region: scope.locality.region.to_string(),
        network: scope.network.to_string(),
        locality_weighted,
        now: now_prediction,
        hypothesis: (!hypothesis.is_empty()).then(|| hypothesis.describe()),
        what_if,
        notes,
    })
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The shares Envoy gives the assignment `ctx` translates for `scope`.
fn predict(
    ctx: &Context,
    scope: &EndpointScope,
    service: &Service,
    port: &crate::model::ServicePort,
    locality_weighted: bool,
) -> Prediction {
    let rule = ctx.rule_for(&scope.rules, service);
    let cla = crate::translate::endpoint::port_load_assignment(ctx, scope, service, port, rule, None);
    let localities = crate::traffic::lb::localities(&cla);
    let shares = crate::traffic::lb::shares(&localities, locality_weighted, crate::traffic::lb::OVERPROVISIONING);
    // who a host stands for: a workload's cluster; a gateway's: the service's clusters on its network
    let mut workloads: BTreeMap<IpAddr, ClusterId> = BTreeMap::new();
    let mut on_network: BTreeMap<&NetworkId, BTreeMap<ClusterId, u32>> = BTreeMap::new();
    for e in &service.endpoints {
        workloads.insert(e.address, e.cluster.clone());
        *on_network.entry(&e.network).or_default().entry(e.cluster.clone()).or_default() += 1;
    }
    let mut gateways: BTreeMap<String, &NetworkId> = BTreeMap::new();
    for g in ctx.gateways.iter() {
        for ip in ctx.gateway_addresses(g) {
            gateways.insert(format!("{ip}:{}", g.port), &g.network);
        }
    }
    let mut by_cluster: BTreeMap<String, f64> = BTreeMap::new();
    let mut out = Vec::new();
    for (l, s) in localities.iter().zip(&shares) {
        let mut lc: BTreeMap<String, f64> = BTreeMap::new();
        for (address, share) in &s.hosts {
            let ip = address.rsplit_once(':').and_then(|(ip, _)| ip.parse::<IpAddr>().ok());
            if let Some(network) = gateways.get(address).filter(|_| ip.is_none_or(|ip| !workloads.contains_key(&ip))) {
                let members = on_network.get(network).cloned().unwrap_or_default();
                let total: u32 = members.values().sum();
                for (c, n) in members {
                    *lc.entry(c.to_string()).or_default() += 100.0 * share * n as f64 / total.max(1) as f64;
                }
            } else {
                let c = ip.and_then(|ip| workloads.get(&ip)).map_or_else(|| "unknown".to_string(), |c| c.to_string());
                *lc.entry(c).or_default() += 100.0 * share;
            }
        }
        for (c, v) in &lc {
            *by_cluster.entry(c.clone()).or_default() += v;
        }
        out.push(LocalityPrediction {
            locality: l.locality.to_string(),
            priority: l.priority,
            weight: l.weight,
            share: round(100.0 * s.share),
            by_cluster: lc.into_iter().map(|(c, v)| (c, round(v))).collect(),
        });
    }
    // every cluster with endpoints of the service appears, 0 if it gets nothing
    for e in &service.endpoints {
        by_cluster.entry(e.cluster.to_string()).or_default();
    }
    Prediction {
        by_cluster: by_cluster.into_iter().map(|(c, v)| (c, round(v))).collect(),
        localities: out,
        decision: ctx.traffic.shares(&service.hostname, &scope.locality.region).cloned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Locality;
    use crate::proxy::{ProxyKind, TlsSupport};

    /// The demo with a traffic policy: reviews from us-east-1 70/30 between aws-use1 and azure-weu.
    fn demo_snapshot(traffic: &str) -> (Arc<Snapshot>, tempfile::TempDir) {
        let (_pusher, rx, dir) = crate::push::demo_pusher(traffic);
        let s = rx.borrow().clone();
        (s, dir)
    }

    fn scopes(region: &str, network: &str) -> (EndpointScope, ClusterScope) {
        (
            EndpointScope {
                kind: ProxyKind::Sidecar,
                network: NetworkId::new(network),
                locality: Locality::parse(&format!("{region}/{region}a")),
                cluster_id: None,
                labels: vec![],
                tls: TlsSupport::Agent,
                rules: Default::default(),
            },
            ClusterScope { kind: ProxyKind::Sidecar, tls: TlsSupport::Agent, rules: Default::default() },
        )
    }

    const SPLIT: &str = "traffic:\n  policies:\n    - hosts: [reviews.shop.svc.cluster.local]\n      split:\n        us-east-1: {aws-use1: 70, azure-weu: 30}\n";

    #[test]
    fn the_split_now_and_with_a_cluster_drained_or_lost() {
        let (snap, _dir) = demo_snapshot(SPLIT);
        let (scope, clusters) = scopes("us-east-1", "aws-net");
        let host = "reviews.shop.svc.cluster.local";
        let w = whatif(&snap, &scope, &clusters, host, None, &Hypothesis::default(), SystemTime::now()).unwrap();
        assert!(w.locality_weighted);
        assert_eq!(w.now.by_cluster["aws-use1"].round(), 70.0, "{w:#?}");
        assert_eq!(w.now.by_cluster["azure-weu"].round(), 30.0, "{w:#?}");
        let total: f64 = w.now.localities.iter().map(|l| l.share).sum();
        assert!((total - 100.0).abs() < 0.1, "{w:#?}");
        assert!(w.now.decision.as_ref().unwrap()[&ClusterId::new("aws-use1")].reason.contains("split 70%"));
        assert!(w.what_if.is_none());
        for h in [
            Hypothesis { drain: Some(ClusterId::new("azure-weu")), down: None },
            Hypothesis { drain: None, down: Some(ClusterId::new("azure-weu")) },
        ] {
            let w = whatif(&snap, &scope, &clusters, host, None, &h, SystemTime::now()).unwrap();
            let wi = w.what_if.unwrap();
            assert_eq!(wi.by_cluster["aws-use1"], 100.0, "{h:?}: {wi:#?}");
            assert_eq!(wi.by_cluster.get("azure-weu").copied().unwrap_or(0.0), 0.0, "{h:?}");
            assert_eq!(w.now.by_cluster["aws-use1"].round(), 70.0, "now is unchanged");
        }
        // another region: no split, the usual priorities (all local)
        let (scope, clusters) = scopes("westeurope", "azure-net");
        let w = whatif(&snap, &scope, &clusters, host, None, &Hypothesis::default(), SystemTime::now()).unwrap();
        assert!(w.now.decision.is_none());
        assert_eq!(w.now.by_cluster["azure-weu"], 100.0, "{w:#?}");
    }

    #[test]
    fn unknown_names_are_errors() {
        let (snap, _dir) = demo_snapshot(SPLIT);
        let (scope, clusters) = scopes("us-east-1", "aws-net");
        let now = SystemTime::now();
        let none = Hypothesis::default();
        assert!(matches!(whatif(&snap, &scope, &clusters, "nope", None, &none, now), Err(Error::UnknownService(_))));
        let host = "reviews.shop.svc.cluster.local";
        assert!(matches!(whatif(&snap, &scope, &clusters, host, Some(1), &none, now), Err(Error::UnknownPort { .. })));
        let h = Hypothesis { drain: Some(ClusterId::new("gcp")), down: None };
        assert!(matches!(whatif(&snap, &scope, &clusters, host, None, &h, now), Err(Error::UnknownCluster { .. })));
    }
}
