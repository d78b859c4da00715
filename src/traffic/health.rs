//! Global DNS health: should a cluster (and, with a host, one service in it) receive traffic? Read from
//! what the push loop decided for the EDS in the same push (the traffic decisions, the per-cluster
//! drains, the gateway verdict), never computed apart, so DNS and the proxies agree. Pure: the debug-free
//! `/global/health` endpoint ([`crate::global_health`]) and the `meshfed_global_health` metric ask it.
//!
//! A cluster is healthy unless:
//! - its network is fenced: every east-west gateway of it failed the gateway probes (an API server that
//!   does not answer alone does not make it unhealthy: with gateways up it keeps serving);
//! - a drain names it (by id, or a region of its endpoints) and its capacity reached 0 (a drain still
//!   ramping down keeps it healthy);
//! - a traffic policy covers at least one service with endpoints in it, and it lost its share of every
//!   one of them: drained to 0 for it, failed over (below `minHealthy`), or without healthy endpoints.
//!
//! With a host (a service's FQDN), the cluster is healthy for it unless its network is fenced, or:
//! - covered by a policy: the decision gives it none of the service's traffic (drained to 0, failed
//!   over, no healthy endpoints of the service, or none at all there);
//! - not covered: the cluster is drained to 0, or has no healthy endpoint of the service.

use std::collections::BTreeSet;

use serde::Serialize;

use super::{Decisions, Status};
use crate::model::{ClusterId, NetworkId, Service};

/// The answer for one cluster (and host).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Answer {
    pub cluster: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub healthy: bool,
    pub reason: String,
    /// the cluster, or the host, is not known (not an answer about health)
    #[serde(skip)]
    pub unknown: bool,
}

/// What the decision reads: the push loop's state as one snapshot holds it.
#[derive(Clone, Copy, Debug)]
pub struct State<'a> {
    /// every cluster of the mesh with its network
    pub clusters: &'a [(ClusterId, NetworkId)],
    /// networks whose gateways all failed the probes
    pub fenced: &'a BTreeSet<NetworkId>,
    pub decisions: &'a Decisions,
    pub status: &'a Status,
}

fn answer(cluster: &str, host: Option<&str>, healthy: bool, reason: impl Into<String>) -> Answer {
    Answer { cluster: cluster.into(), host: host.map(Into::into), healthy, reason: reason.into(), unknown: false }
}

fn unknown(cluster: &str, host: Option<&str>, reason: String) -> Answer {
    Answer { unknown: true, ..answer(cluster, host, false, reason) }
}

/// The health of `cluster`, and with `host` of that service in it; `service` finds a service by its
/// FQDN (asked only for a host no policy covers).
pub fn decide<'s>(
    state: State<'_>,
    cluster: &str,
    host: Option<&str>,
    service: impl FnOnce(&str) -> Option<&'s Service>,
) -> Answer {
    let Some((id, network)) = state.clusters.iter().find(|(id, _)| id.as_str() == cluster) else {
        return unknown(cluster, host, format!("unknown cluster {cluster:?}"));
    };
    if state.fenced.contains(network) {
        return answer(
            cluster,
            host,
            false,
            format!("network {network} fenced: every east-west gateway failed the probes"),
        );
    }
    let drained = state.status.drained.get(id);
    let drained_to_0 = drained.filter(|d| d.capacity == 0).map(|d| format!("{}: capacity 0%", d.reason));
    let Some(host) = host else {
        if let Some(why) = drained_to_0 {
            return answer(cluster, None, false, why);
        }
        // the covered services with endpoints in the cluster: did it lose its share of every one?
        let mut covered = 0usize;
        let mut first_out = None;
        for (hostname, d) in &state.decisions.services {
            let Some(c) = d.clusters.get(id) else { continue };
            covered += 1;
            match c.out() {
                None => {
                    let ramping = drained.map(|d| format!(" (draining: capacity {}%)", d.capacity)).unwrap_or_default();
                    return answer(cluster, None, true, format!("serving{ramping}"));
                }
                Some(why) => {
                    first_out.get_or_insert_with(|| format!("{hostname}: {why}"));
                }
            }
        }
        return match first_out {
            Some(why) => {
                answer(cluster, None, false, format!("lost its share of every covered service ({covered}), e.g. {why}"))
            }
            None => {
                let ramping = drained.map(|d| format!(" (draining: capacity {}%)", d.capacity)).unwrap_or_default();
                answer(cluster, None, true, format!("serving{ramping}"))
            }
        };
    };
    match state.decisions.services.get(host) {
        Some(d) => match d.clusters.get(id) {
            None => answer(cluster, Some(host), false, format!("no endpoints of {host} in {cluster}")),
            Some(c) => match c.out() {
                Some(why) => answer(cluster, Some(host), false, why),
                None if c.capacity < 100 => {
                    answer(cluster, Some(host), true, format!("serving ({}: capacity {}%)", c.drain, c.capacity))
                }
                None => answer(cluster, Some(host), true, "serving"),
            },
        },
        None => {
            let Some(s) = service(host) else {
                return unknown(cluster, Some(host), format!("unknown host {host:?}"));
            };
            if let Some(why) = drained_to_0 {
                return answer(cluster, Some(host), false, why);
            }
            let healthy = s.endpoints.iter().any(|e| e.cluster == *id && e.health == crate::model::Health::Healthy);
            if healthy {
                answer(cluster, Some(host), true, "serving (no traffic policy covers it)")
            } else {
                answer(cluster, Some(host), false, format!("no healthy endpoints of {host} in {cluster}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::traffic::Drained;
    use crate::traffic::decide::{ClusterState, Decision};

    fn id(s: &str) -> ClusterId {
        ClusterId::new(s)
    }

    fn clusters() -> Vec<(ClusterId, NetworkId)> {
        vec![(id("aws-use1"), NetworkId::new("aws-net")), (id("azure-weu"), NetworkId::new("azure-net"))]
    }

    fn state_of(healthy: u32, capacity: u32, failed_over: bool) -> ClusterState {
        ClusterState {
            healthy,
            total: 2,
            capacity,
            drain: if capacity < 100 { "drain (DR drill)".into() } else { String::new() },
            failed_over,
        }
    }

    /// reviews and ratings covered; azure-weu's state in each.
    fn decisions(reviews: ClusterState, ratings: ClusterState) -> Decisions {
        let d = |azure: ClusterState| {
            Arc::new(Decision {
                clusters: BTreeMap::from([(id("aws-use1"), state_of(2, 100, false)), (id("azure-weu"), azure)]),
                ..Default::default()
            })
        };
        Decisions {
            services: BTreeMap::from([
                (Arc::from("reviews.shop.svc.cluster.local"), d(reviews)),
                (Arc::from("ratings.shop.svc.cluster.local"), d(ratings)),
            ]),
            last_resort: true,
        }
    }

    fn ask(decisions: &Decisions, status: &Status, fenced: &[&str], cluster: &str, host: Option<&str>) -> Answer {
        let fenced: BTreeSet<NetworkId> = fenced.iter().map(NetworkId::new).collect();
        let clusters = clusters();
        let state = State { clusters: &clusters, fenced: &fenced, decisions, status };
        decide(state, cluster, host, |_| None)
    }

    const REVIEWS: Option<&str> = Some("reviews.shop.svc.cluster.local");

    #[test]
    fn healthy_until_drained_to_zero_failed_over_or_fenced() {
        let ok = decisions(state_of(2, 100, false), state_of(2, 100, false));
        let status = Status::default();
        let a = ask(&ok, &status, &[], "azure-weu", None);
        assert!(a.healthy && !a.unknown, "{a:?}");
        assert!(ask(&ok, &status, &[], "azure-weu", REVIEWS).healthy);
        // fenced: unhealthy, with and without host; the other network is not
        let a = ask(&ok, &status, &["azure-net"], "azure-weu", None);
        assert!(!a.healthy && a.reason.contains("fenced"), "{a:?}");
        assert!(!ask(&ok, &status, &["azure-net"], "azure-weu", REVIEWS).healthy);
        assert!(ask(&ok, &status, &["azure-net"], "aws-use1", None).healthy);
        // ramping (capacity 50): still healthy, and says so
        let ramping = decisions(state_of(2, 50, false), state_of(2, 50, false));
        let status = Status {
            drained: BTreeMap::from([(id("azure-weu"), Drained { capacity: 50, reason: "drain (DR drill)".into() })]),
            ..Default::default()
        };
        let a = ask(&ramping, &status, &[], "azure-weu", None);
        assert!(a.healthy && a.reason.contains("capacity 50%"), "{a:?}");
        assert!(ask(&ramping, &status, &[], "azure-weu", REVIEWS).healthy);
        // capacity 0 reached: unhealthy
        let zero = decisions(state_of(2, 0, false), state_of(2, 0, false));
        let status = Status {
            drained: BTreeMap::from([(id("azure-weu"), Drained { capacity: 0, reason: "drain (DR drill)".into() })]),
            ..Default::default()
        };
        let a = ask(&zero, &status, &[], "azure-weu", None);
        assert!(!a.healthy && a.reason.contains("DR drill"), "{a:?}");
        let a = ask(&zero, &status, &[], "azure-weu", REVIEWS);
        assert!(!a.healthy && a.reason.contains("capacity 0%"), "{a:?}");
        assert!(ask(&zero, &status, &[], "aws-use1", None).healthy);
    }

    #[test]
    fn per_host_min_healthy_and_every_covered_service() {
        let status = Status::default();
        // reviews failed over in azure, ratings fine: reviews unhealthy there, the cluster healthy
        let d = decisions(state_of(1, 100, true), state_of(2, 100, false));
        let a = ask(&d, &status, &[], "azure-weu", REVIEWS);
        assert!(!a.healthy && a.reason.contains("minHealthy"), "{a:?}");
        assert!(ask(&d, &status, &[], "azure-weu", Some("ratings.shop.svc.cluster.local")).healthy);
        assert!(ask(&d, &status, &[], "azure-weu", None).healthy);
        // every covered service lost: the cluster is unhealthy
        let d = decisions(state_of(1, 100, true), state_of(0, 100, false));
        let a = ask(&d, &status, &[], "azure-weu", None);
        assert!(!a.healthy && a.reason.contains("every covered service (2)"), "{a:?}");
        assert!(ask(&d, &status, &[], "aws-use1", None).healthy);
    }

    #[test]
    fn unknown_cluster_or_host() {
        let d = decisions(state_of(2, 100, false), state_of(2, 100, false));
        let status = Status::default();
        let a = ask(&d, &status, &[], "gcp-euw1", None);
        assert!(a.unknown && !a.healthy && a.reason.contains("unknown cluster"), "{a:?}");
        let a = ask(&d, &status, &[], "aws-use1", Some("nope.shop.svc.cluster.local"));
        assert!(a.unknown && a.reason.contains("unknown host"), "{a:?}");
    }

    #[test]
    fn an_uncovered_host_needs_healthy_endpoints_and_no_drain_to_zero() {
        use crate::model::{Endpoint, Health};
        let d = Decisions::default();
        let clusters = clusters();
        let fenced = BTreeSet::new();
        let ep = |cluster: &str, health: Health| Endpoint {
            address: "10.0.0.1".parse().unwrap(),
            ports: Vec::new(),
            cluster: id(cluster),
            network: NetworkId::default(),
            locality: Default::default(),
            health,
            workload: None,
        };
        let svc = Service {
            key: crate::model::ServiceKey::new("shop", "cart"),
            hostname: "cart.shop.svc.cluster.local".into(),
            ports: Vec::new(),
            clusters: vec![id("aws-use1"), id("azure-weu")],
            endpoints: vec![ep("aws-use1", Health::Healthy), ep("azure-weu", Health::Unhealthy)],
        };
        let host = Some("cart.shop.svc.cluster.local");
        let status = Status::default();
        let state = State { clusters: &clusters, fenced: &fenced, decisions: &d, status: &status };
        assert!(decide(state, "aws-use1", host, |_| Some(&svc)).healthy);
        let a = decide(state, "azure-weu", host, |_| Some(&svc));
        assert!(!a.healthy && a.reason.contains("no healthy endpoints"), "{a:?}");
        let status = Status {
            drained: BTreeMap::from([(id("aws-use1"), Drained { capacity: 0, reason: "drain (x)".into() })]),
            ..Default::default()
        };
        let state = State { status: &status, ..state };
        assert!(!decide(state, "aws-use1", host, |_| Some(&svc)).healthy);
    }
}
