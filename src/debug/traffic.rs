//! `/debug/trafficz`'s table of shares: the traffic decisions translation serves
//! ([`crate::translate::Context::traffic`]) as one row per service and source region, one cell per
//! cluster, each with its share, its split share, the decision's reason and why in short (split, drain,
//! failover), for the web UI's traffic page and anyone reading the JSON. Reads the decisions only.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::model::{ClusterId, NetworkId};
use crate::traffic::decide::{ClusterState, Decisions, RegionShares};

/// Why a cluster has its share, in short (the cell's `reason` says it in full).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Why {
    /// the row is the policy's split for this source region
    Split,
    /// no split for this source region: the cluster's normal share under locality failover
    Locality,
    /// an active drain keeps the cluster below 100% of its normal share
    Drain,
    /// failed over (below `minHealthy`, or not yet back for `failbackAfter`)
    Failover,
    /// the cluster has no healthy endpoint of the service
    NoHealthyEndpoints,
    /// more than its split share: it takes what drained or failed-over clusters lose
    TakesOver,
}

/// One cluster's share in one row.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Cell {
    /// percent of the row's requests
    pub share: f64,
    /// its share in the policy's split (0: the row is not the split's)
    pub split: u32,
    pub reason: String,
    pub why: BTreeSet<Why>,
}

/// The shares of one service for proxies in one source region.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    /// the service's hostname
    pub service: String,
    /// the proxies' region (None: every region without a row of its own, see
    /// [`crate::traffic::Decision::other_regions`])
    pub source_region: Option<String>,
    /// cluster -> its share (the clusters of the row only)
    pub shares: BTreeMap<ClusterId, Cell>,
}

/// A cluster that appears in some row, with its network (empty: unknown to the registry).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Column {
    pub cluster: ClusterId,
    pub network: String,
}

/// The table: its columns (every cluster of any row, sorted) and rows (by service, then region; the
/// other-regions row last).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Shares {
    pub columns: Vec<Column>,
    pub rows: Vec<Row>,
}

/// The share table of `decisions`; `networks`: each known cluster's network.
pub fn shares<'a>(decisions: &Decisions, networks: impl IntoIterator<Item = (&'a ClusterId, &'a NetworkId)>) -> Shares {
    let networks: BTreeMap<&ClusterId, &NetworkId> = networks.into_iter().collect();
    let mut columns: BTreeSet<&ClusterId> = BTreeSet::new();
    let mut rows = Vec::new();
    for (host, d) in &decisions.services {
        let regions = d.by_region.iter().map(|(r, s)| (Some(r.to_string()), s));
        for (region, shares) in regions.chain(d.other_regions.iter().map(|s| (None, s))) {
            columns.extend(shares.keys());
            rows.push(Row { service: host.to_string(), source_region: region, shares: cells(shares, &d.clusters) });
        }
    }
    Shares {
        columns: columns
            .into_iter()
            .map(|c| Column { cluster: c.clone(), network: networks.get(c).map(|n| n.to_string()).unwrap_or_default() })
            .collect(),
        rows,
    }
}

fn cells(shares: &RegionShares, clusters: &BTreeMap<ClusterId, ClusterState>) -> BTreeMap<ClusterId, Cell> {
    let reduced = |c: &ClusterId| clusters.get(c).is_some_and(|s| s.capacity < 100 || s.failed_over);
    // a row without a split: the undrained clusters take what the drained ones lose
    let any_reduced = shares.keys().any(reduced);
    shares
        .iter()
        .map(|(c, s)| {
            let mut why = BTreeSet::new();
            why.insert(if s.split > 0 { Why::Split } else { Why::Locality });
            if let Some(state) = clusters.get(c) {
                if state.capacity < 100 {
                    why.insert(Why::Drain);
                }
                if state.failed_over {
                    why.insert(Why::Failover);
                }
                if state.healthy == 0 {
                    why.insert(Why::NoHealthyEndpoints);
                }
            }
            let takes_over =
                if s.split > 0 { s.share > s.split as f64 + 1e-9 } else { any_reduced && !reduced(c) && s.share > 0.0 };
            if takes_over {
                why.insert(Why::TakesOver);
            }
            (c.clone(), Cell { share: s.share, split: s.split, reason: s.reason.clone(), why })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic::decide::{ClusterHealth, ServiceHealth};
    use crate::traffic::policy::TrafficPolicy;
    use serde_json::json;
    use std::time::{Duration, SystemTime};

    fn id(s: &str) -> ClusterId {
        ClusterId::new(s)
    }

    const RATINGS: &str = "ratings.shop.svc.cluster.local";

    /// ratings 70/30 from us-east-1 (no row for westeurope), with `drains` (YAML list items).
    fn decisions(drains: &str, azure_healthy: u32) -> Decisions {
        let yaml = format!(
            "policies:\n  - hosts: [{RATINGS}]\n    split:\n      us-east-1: {{aws: 70, azure: 30}}\n    failover: {{minHealthy: 50}}\ndrains: [{drains}]\n"
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let policy = TrafficPolicy::parse(&serde_yaml::from_str(&yaml).unwrap(), &[id("aws"), id("azure")], now)
            .expect("policy");
        let split = policy.policy_for(RATINGS).expect("covered");
        let mut health = ServiceHealth::new();
        for (c, region, healthy) in [("aws", "us-east-1", 4), ("azure", "westeurope", azure_healthy)] {
            health.insert(
                id(c),
                ClusterHealth { total: 4, healthy, regions: [std::sync::Arc::from(region)].into_iter().collect() },
            );
        }
        let o = crate::traffic::decide::decide(&policy, split, &health, now, &Default::default());
        let mut d = Decisions::default();
        d.services.insert(RATINGS.into(), std::sync::Arc::new(o.decision));
        d
    }

    fn networks() -> Vec<(ClusterId, NetworkId)> {
        vec![(id("aws"), NetworkId::new("aws-net")), (id("azure"), NetworkId::new("azure-net"))]
    }

    fn table(d: &Decisions) -> serde_json::Value {
        let n = networks();
        serde_json::to_value(shares(d, n.iter().map(|(c, n)| (c, n)))).unwrap()
    }

    #[test]
    fn a_split_row_per_service_and_region_with_columns_and_reasons() {
        let t = table(&decisions("", 4));
        assert_eq!(
            t["columns"],
            json!([{"cluster": "aws", "network": "aws-net"}, {"cluster": "azure", "network": "azure-net"}]),
            "{t:#}"
        );
        let rows = t["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 1, "no drain: only the split's region has a row: {t:#}");
        assert_eq!(rows[0]["service"], RATINGS);
        assert_eq!(rows[0]["sourceRegion"], "us-east-1");
        assert_eq!(rows[0]["shares"]["aws"]["share"], 70.0);
        assert_eq!(rows[0]["shares"]["azure"]["share"], 30.0);
        assert_eq!(rows[0]["shares"]["azure"]["split"], 30);
        assert_eq!(rows[0]["shares"]["aws"]["reason"], "split 70%");
        assert_eq!(rows[0]["shares"]["aws"]["why"], json!(["split"]));
    }

    #[test]
    fn a_drain_shows_in_every_row_and_the_other_regions_row_comes_last() {
        let t = table(&decisions(
            "{cluster: azure, capacity: 50, expires: '2027-01-15T09:00:00Z', reason: maintenance}",
            4,
        ));
        let rows = t["rows"].as_array().unwrap();
        // the split's region, the region of the drained cluster's endpoints, every other region
        let regions: Vec<&serde_json::Value> = rows.iter().map(|r| &r["sourceRegion"]).collect();
        assert_eq!(regions, [&json!("us-east-1"), &json!("westeurope"), &serde_json::Value::Null], "{t:#}");
        let split = &rows[0];
        assert_eq!(split["sourceRegion"], "us-east-1");
        assert_eq!(split["shares"]["azure"]["share"], 15.0, "{t:#}");
        assert_eq!(split["shares"]["azure"]["why"], json!(["split", "drain"]));
        assert!(split["shares"]["azure"]["reason"].as_str().unwrap().contains("maintenance"), "{t:#}");
        assert_eq!(split["shares"]["aws"]["share"], 85.0);
        assert_eq!(split["shares"]["aws"]["why"], json!(["split", "takes-over"]));
        // a drain acts in every region, also where there is no split: azure keeps half of its normal share
        let west = &rows[1];
        assert_eq!(west["shares"]["azure"]["share"], 50.0, "{t:#}");
        assert_eq!(west["shares"]["azure"]["why"], json!(["locality", "drain"]));
        assert_eq!(west["shares"]["aws"]["why"], json!(["locality", "takes-over"]));
        let other = &rows[2];
        assert_eq!(other["shares"]["azure"]["why"], json!(["locality", "drain"]));
        let total: f64 = other["shares"].as_object().unwrap().values().map(|c| c["share"].as_f64().unwrap()).sum();
        assert!((total - 100.0).abs() < 1e-6, "{t:#}");
    }

    #[test]
    fn failover_and_unknown_networks_are_said() {
        let d = decisions("", 1);
        let t = serde_json::to_value(shares(&d, std::iter::empty())).unwrap();
        assert_eq!(t["columns"][1], json!({"cluster": "azure", "network": ""}), "{t:#}");
        let azure = &t["rows"][0]["shares"]["azure"];
        assert_eq!(azure["share"], 0.0, "{t:#}");
        assert_eq!(azure["why"], json!(["split", "failover"]));
        assert_eq!(t["rows"][0]["shares"]["aws"]["why"], json!(["split", "takes-over"]));
        assert_eq!(
            serde_json::to_value(shares(&Decisions::default(), std::iter::empty())).unwrap(),
            json!({"columns": [], "rows": []})
        );
    }
}
