//! What share of a cluster's traffic each region's localities get by their EDS weights (the traffic
//! split as a proxy receives it): the priority-0 localities' `load_balancing_weight` summed per region.
//!
//! - [`region_weights`] / [`region_shares`] read a `ClusterLoadAssignment` (what meshfed sent an
//!   [`AdsClient`]); [`envoy_region_weights`] reads the EDS a real Envoy holds (its config dump);
//!   [`percent`] is one region's exact share of such weights.
//! - [`eds_until`] / [`eds_until_shares`] receive an [`AdsClient`]'s responses (ACKing them) until a
//!   cluster's shares are as wanted; [`eds_stays`] checks that they do not change.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use meshfed::type_url;

use crate::ads::AdsClient;
use crate::envoy::Envoy;

/// Region -> percent of the priority-0 locality weight, rounded (regions without weight left out).
pub type RegionShares = BTreeMap<String, u32>;

/// Region -> summed weight of its priority-0 localities (regions without weight left out).
pub type RegionWeights = BTreeMap<String, u32>;

/// The priority-0 locality weight of `cla` per region (in the demo: us-east-1 is aws-use1, westeurope
/// azure-weu).
pub fn region_weights(cla: &ClusterLoadAssignment) -> RegionWeights {
    sum_weights(cla.endpoints.iter().map(|l| {
        let region = l.locality.as_ref().map(|l| l.region.as_str()).unwrap_or_default();
        (l.priority, region, l.load_balancing_weight.map(|w| w.value).unwrap_or(0))
    }))
}

/// [`region_weights`] in percent of their sum, rounded (the region shares of a split).
pub fn region_shares(cla: &ClusterLoadAssignment) -> RegionShares {
    rounded_percent(&region_weights(cla))
}

/// `want` as [`RegionShares`] (regions at 0 left out, as [`region_shares`] leaves them out).
pub fn shares_of(want: &[(&str, u32)]) -> RegionShares {
    want.iter().filter(|(_, s)| *s > 0).map(|(r, s)| (r.to_string(), *s)).collect()
}

/// The exact percent of `weights` that `region` has (0 without weights).
pub fn percent(weights: &RegionWeights, region: &str) -> f64 {
    let total: u64 = weights.values().map(|w| u64::from(*w)).sum();
    if total == 0 { 0.0 } else { 100.0 * f64::from(weights.get(region).copied().unwrap_or(0)) / total as f64 }
}

fn sum_weights<'a>(localities: impl Iterator<Item = (u32, &'a str, u32)>) -> RegionWeights {
    let mut weights = RegionWeights::new();
    for (_, region, weight) in localities.filter(|(priority, _, weight)| *priority == 0 && *weight > 0) {
        *weights.entry(region.to_string()).or_default() += weight;
    }
    weights
}

fn rounded_percent(weights: &RegionWeights) -> RegionShares {
    let total: u32 = weights.values().sum();
    weights.iter().map(|(r, w)| (r.clone(), (w * 100 + total / 2).checked_div(total).unwrap_or(0))).collect()
}

/// The priority-0 locality weight per region of `cluster`'s EDS as `envoy` holds it (from
/// `/config_dump?resource=dynamic_endpoint_configs&include_eds`); fails if Envoy has no EDS for it.
pub async fn envoy_region_weights(envoy: &Envoy, cluster: &str) -> Result<RegionWeights> {
    let body = envoy.admin_get("/config_dump?resource=dynamic_endpoint_configs&include_eds").await?;
    let dump: serde_json::Value = serde_json::from_str(&body)?;
    let configs = dump["configs"].as_array().cloned().unwrap_or_default();
    let assignment = configs
        .iter()
        .map(|c| &c["endpoint_config"])
        .find(|a| a["cluster_name"] == cluster)
        .ok_or_else(|| anyhow!("Envoy holds no EDS for {cluster}"))?;
    let localities = assignment["endpoints"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::with_capacity(localities.len());
    for l in &localities {
        // proto3 JSON: a priority of 0 is left out; the weight (a UInt32Value) is a plain number
        let priority = l["priority"].as_u64().unwrap_or(0);
        let weight = l["load_balancing_weight"].as_u64().or_else(|| l["load_balancing_weight"]["value"].as_u64());
        let region = l["locality"]["region"].as_str().unwrap_or_default();
        let (Ok(priority), Ok(weight)) = (u32::try_from(priority), u32::try_from(weight.unwrap_or(0))) else {
            return Err(anyhow!("{cluster}: a locality out of range: {l}"));
        };
        out.push((priority, region, weight));
    }
    Ok(sum_weights(out.into_iter()))
}

/// Receives responses on `c` (ACKing each) until an EDS response for `cluster` has region shares that
/// satisfy `ok`, within the client's timeout; returns the shares of every EDS response for `cluster`
/// seen, the last one satisfying `ok`. `what` names the wait in the error.
pub async fn eds_until(
    c: &mut AdsClient,
    cluster: &str,
    what: &str,
    ok: impl Fn(&RegionShares) -> bool,
) -> Result<Vec<RegionShares>> {
    let timeout = c.timeout();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let r = c.recv_until(deadline).await?.ok_or_else(|| anyhow!("{what}: not in {timeout:?} (seen {seen:?})"))?;
        c.ack(&r).await?;
        if r.type_url != type_url::ENDPOINT || r.get(cluster).is_none() {
            continue;
        }
        let s = region_shares(&r.decode::<ClusterLoadAssignment>(cluster)?);
        seen.push(s.clone());
        if ok(&s) {
            return Ok(seen);
        }
    }
}

/// [`eds_until`] `cluster`'s region shares are `want` (e.g. `[("us-east-1", 70), ("westeurope", 30)]`);
/// returns them.
pub async fn eds_until_shares(
    c: &mut AdsClient,
    cluster: &str,
    what: &str,
    want: &[(&str, u32)],
) -> Result<RegionShares> {
    let want = shares_of(want);
    let seen = eds_until(c, cluster, &format!("{what}: EDS with shares {want:?}"), |s| *s == want).await?;
    Ok(seen.last().cloned().unwrap_or_default())
}

/// No EDS response for `cluster` on `c` for `quiet` (other responses are ACKed).
pub async fn eds_stays(c: &mut AdsClient, cluster: &str, what: &str, quiet: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + quiet;
    while let Some(r) = c.recv_until(deadline).await? {
        c.ack(&r).await?;
        ensure!(r.type_url != type_url::ENDPOINT || r.get(cluster).is_none(), "{what}: {cluster}'s EDS changed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Locality;
    use envoy_types::pb::envoy::config::endpoint::v3::LocalityLbEndpoints;
    use envoy_types::pb::google::protobuf::UInt32Value;

    fn locality(region: &str, zone: &str, priority: u32, weight: u32) -> LocalityLbEndpoints {
        LocalityLbEndpoints {
            locality: Some(Locality { region: region.into(), zone: zone.into(), sub_zone: String::new() }),
            load_balancing_weight: Some(UInt32Value { value: weight }),
            priority,
            ..Default::default()
        }
    }

    #[test]
    fn shares_sum_the_priority_0_localities_per_region() {
        let cla = ClusterLoadAssignment {
            endpoints: vec![
                locality("us-east-1", "us-east-1a", 0, 463),
                locality("us-east-1", "us-east-1b", 0, 462),
                locality("westeurope", "westeurope-1", 0, 75),
                locality("westeurope", "westeurope-2", 1, 500),
                locality("eastus", "eastus-1", 0, 0),
            ],
            ..Default::default()
        };
        let weights = region_weights(&cla);
        assert_eq!(weights, [("us-east-1".to_string(), 925), ("westeurope".to_string(), 75)].into());
        assert_eq!(region_shares(&cla), shares_of(&[("us-east-1", 93), ("westeurope", 8), ("eastus", 0)]));
        assert_eq!(percent(&weights, "westeurope"), 7.5);
        assert_eq!(percent(&weights, "eastus"), 0.0);
        assert_eq!(percent(&RegionWeights::new(), "westeurope"), 0.0);
    }
}
