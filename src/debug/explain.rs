//! `/debug/explain`: the priority each locality of a proxy's EDS has for it, and the rule behind it (same
//! zone, same region, failover target, failoverPriority, a cluster demoted as unreachable, a fenced
//! network, ...), read from what meshfed serves the proxy.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::SystemTime;

use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use serde::Serialize;

use super::time::rfc3339;
use crate::cache::Snapshot;
use crate::model::Locality;
use crate::source::ClusterHealth;
use crate::translate::endpoint::{compact_priorities, lb_priority};
use crate::type_url::ResourceType;
use crate::xds::connections::Connection;

// ---------------------------------------------------------------------------------------------
// Explain: each locality's priority for a proxy, and why
// ---------------------------------------------------------------------------------------------

/// Why a locality has its priority for a proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// same region and zone as the proxy
    SameZone,
    /// same region, another zone
    SameRegion,
    /// another region
    OtherRegion,
    /// another region that a failover rule names for the proxy's region
    FailoverTarget,
    /// another region, after the failover target
    AfterFailoverTarget,
    /// failoverPriority: endpoints whose labels match the proxy's come first
    FailoverPriority,
    /// demoted because the endpoints' cluster is unreachable
    DemotedUnreachable,
    /// last resort because every east-west gateway address of the endpoints' network is down
    FencedNetwork,
    /// no priorities: the proxy has no locality, or locality failover is off
    NoPriorities,
    /// a policy meshfed cannot explain from the proxy's locality alone
    Policy,
    /// the traffic policy's split for the proxy's region: weighted by share, or last resort at share 0
    TrafficSplit,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExplainEndpoint {
    pub address: String,
    pub port: u32,
    pub health: String,
    /// the Kubernetes cluster the endpoint is in (for a gateway: the gateway's cluster)
    pub cluster: Option<String>,
    /// set when the endpoint is an east-west gateway standing for the remote endpoints
    pub via_gateway: Option<String>,
    pub weight: u32,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExplainLocality {
    pub locality: Locality,
    pub priority: u32,
    pub weight: Option<u32>,
    pub clusters: Vec<String>,
    pub endpoints: Vec<ExplainEndpoint>,
    pub rule: Rule,
    pub reason: String,
    /// the fenced network the locality's gateway endpoints stand for, if any
    #[serde(skip)]
    pub fenced_network: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExplainCluster {
    /// the Envoy cluster (`outbound|PORT||FQDN`)
    pub name: String,
    pub service: Option<String>,
    pub port: Option<u16>,
    /// localities by priority
    pub localities: Vec<ExplainLocality>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explain {
    pub proxy: String,
    pub node_id: String,
    pub proxy_type: &'static str,
    pub cluster_id: Option<String>,
    pub network: String,
    pub locality: Locality,
    /// whether the EDS carries priorities other than 0
    pub priorities_in_use: bool,
    pub summary: String,
    pub clusters: Vec<ExplainCluster>,
}

fn same_locality(a: &Locality, b: &Locality) -> bool {
    a.region == b.region && a.zone == b.zone && a.subzone == b.subzone
}

fn health_name(h: i32) -> String {
    use envoy_types::pb::envoy::config::core::v3::HealthStatus;
    HealthStatus::try_from(h).map(|h| h.as_str_name().to_string()).unwrap_or_else(|_| h.to_string())
}

/// Where endpoint addresses are: workload endpoints by address, gateways by address and port.
struct AddressBook {
    workloads: HashMap<IpAddr, String>,
    gateways: HashMap<(String, u32), (String, String)>,
    /// the clusters with endpoints in each locality
    localities: HashMap<Locality, std::collections::BTreeSet<String>>,
    /// the networks the gateway probes fenced
    fenced: std::collections::BTreeSet<String>,
}

impl AddressBook {
    fn new(snapshot: &Snapshot) -> AddressBook {
        let mut workloads = HashMap::new();
        let mut localities: HashMap<Locality, std::collections::BTreeSet<String>> = HashMap::new();
        for s in snapshot.services.values() {
            for e in &s.endpoints {
                workloads.entry(e.address).or_insert_with(|| e.cluster.to_string());
                localities.entry(e.locality.clone()).or_default().insert(e.cluster.to_string());
            }
        }
        let gateways = snapshot
            .gateways
            .iter()
            .map(|g| ((g.address.to_string(), u32::from(g.port)), (g.cluster.to_string(), g.network.to_string())))
            .collect();
        let fenced = snapshot.gateway_verdict.fenced.iter().map(|n| n.to_string()).collect();
        AddressBook { workloads, gateways, localities, fenced }
    }
}

/// Explains the priorities in the ClusterLoadAssignments `proxy` is served: the priorities are read
/// from its EDS; the reasons derive from its locality as istiod's rules do (see
/// [`crate::translate::endpoint::lb_priority`]). Where the priorities in the EDS differ from what the
/// locality alone gives, a policy made them: failover (another region ranked before the others),
/// failoverPriority (one locality at several priorities), a demoted unreachable cluster, or "policy".
pub fn explain(conn: &Connection, snapshot: &Snapshot, health: &ClusterHealth) -> Explain {
    let proxy_loc = conn.view().endpoints.locality.clone();
    let book = AddressBook::new(snapshot);
    let demoted = health.demoted(SystemTime::now());
    let unreachable: HashMap<String, SystemTime> = health
        .list()
        .into_iter()
        .filter(|c| demoted.contains(&c.id))
        .filter_map(|c| c.unreachable_since.map(|t| (c.id.to_string(), t)))
        .collect();
    let mut out_clusters = Vec::new();
    let mut priorities_in_use = false;
    for r in super::config_dump::served(conn, snapshot, ResourceType::Endpoint) {
        let Some(cla) = super::config_dump::decode_resource::<ClusterLoadAssignment>(&r) else { continue };
        let mut explained = explain_cla(&proxy_loc, &cla, &book, &unreachable);
        if let Some(shares) =
            explained.service.as_deref().and_then(|fqdn| snapshot.context.traffic.shares(fqdn, &proxy_loc.region))
        {
            explain_split(&mut explained, shares);
        }
        priorities_in_use |= explained.localities.iter().any(|l| l.priority > 0);
        out_clusters.push(explained);
    }
    let p = &conn.proxy;
    let summary = if proxy_loc.is_empty() {
        "the proxy has no locality: every locality has priority 0".to_string()
    } else if !priorities_in_use {
        "every locality has priority 0: locality failover is off (istiod assigns failover priorities only \
         with outlierDetection), or all endpoints are in one locality"
            .to_string()
    } else {
        format!(
            "priorities relative to the proxy's locality {}/{}{}: 0 is used first; a higher priority takes \
             traffic when the lower ones are unhealthy",
            proxy_loc.region,
            proxy_loc.zone,
            if proxy_loc.subzone.is_empty() { String::new() } else { format!("/{}", proxy_loc.subzone) }
        )
    };
    Explain {
        proxy: p.key.to_string(),
        node_id: p.id.to_string(),
        proxy_type: p.kind.as_str(),
        cluster_id: p.cluster_id.as_ref().map(|c| c.to_string()),
        network: conn.view().endpoints.network.to_string(),
        locality: proxy_loc,
        priorities_in_use,
        summary,
        clusters: out_clusters,
    }
}

fn explain_cla(
    proxy_loc: &Locality,
    cla: &ClusterLoadAssignment,
    book: &AddressBook,
    unreachable: &HashMap<String, SystemTime>,
) -> ExplainCluster {
    let parsed = crate::translate::parse_outbound_cluster_name(&cla.cluster_name);
    let mut localities: Vec<ExplainLocality> = cla
        .endpoints
        .iter()
        .map(|l| {
            let loc = l.locality.as_ref().map(|x| Locality::new(&x.region, &x.zone, &x.sub_zone)).unwrap_or_default();
            let endpoints: Vec<ExplainEndpoint> = l
                .lb_endpoints
                .iter()
                .map(|e| {
                    let sa = match &e.host_identifier {
                        Some(HostIdentifier::Endpoint(ep)) => ep.address.as_ref().and_then(|a| match &a.address {
                            Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(sa)) => {
                                Some(sa)
                            }
                            _ => None,
                        }),
                        _ => None,
                    };
                    let address = sa.map(|s| s.address.clone()).unwrap_or_default();
                    let port = match sa.and_then(|s| s.port_specifier.as_ref()) {
                        Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p)) => {
                            *p
                        }
                        _ => 0,
                    };
                    let gateway = book.gateways.get(&(address.clone(), port));
                    let cluster = match gateway {
                        Some((c, _)) => Some(c.clone()),
                        None => address.parse::<IpAddr>().ok().and_then(|ip| book.workloads.get(&ip).cloned()),
                    };
                    ExplainEndpoint {
                        address,
                        port,
                        health: health_name(e.health_status),
                        cluster,
                        via_gateway: gateway.map(|(_, network)| format!("east-west gateway of network {network}")),
                        weight: e.load_balancing_weight.map(|w| w.value).unwrap_or(1),
                    }
                })
                .collect();
            let mut clusters: Vec<String> = endpoints.iter().filter_map(|e| e.cluster.clone()).collect();
            clusters.sort();
            clusters.dedup();
            if clusters.is_empty() {
                clusters = book.localities.get(&loc).map(|c| c.iter().cloned().collect()).unwrap_or_default();
            }
            let fenced_network = l.lb_endpoints.iter().find_map(|e| {
                let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else { return None };
                let Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(sa)) =
                    ep.address.as_ref().and_then(|a| a.address.as_ref())
                else {
                    return None;
                };
                let Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(port)) =
                    sa.port_specifier
                else {
                    return None;
                };
                let (_, network) = book.gateways.get(&(sa.address.clone(), port))?;
                book.fenced.contains(network).then(|| network.clone())
            });
            ExplainLocality {
                locality: loc,
                priority: l.priority,
                weight: l.load_balancing_weight.map(|w| w.value),
                clusters,
                endpoints,
                rule: Rule::Policy,
                reason: String::new(),
                fenced_network,
            }
        })
        .collect();
    assign_reasons(proxy_loc, &mut localities, unreachable);
    for l in localities.iter_mut() {
        let endpoints: u32 = l.endpoints.iter().map(|e| e.weight).sum();
        if let Some(w) = l.weight.filter(|w| *w != endpoints) {
            l.reason.push_str(&format!(
                "; weight {w} (not its {endpoints} endpoint weight) comes from a localityLbSetting distribute rule"
            ));
        }
    }
    localities.sort_by(|a, b| a.priority.cmp(&b.priority).then_with(|| a.locality.cmp(&b.locality)));
    ExplainCluster {
        name: cla.cluster_name.clone(),
        service: parsed.map(|(_, _, fqdn)| fqdn.to_string()),
        port: parsed.map(|(port, _, _)| port),
        localities,
    }
}

/// The reasons of a traffic split ([`crate::traffic`]): each locality's clusters with their share and why.
fn explain_split(cluster: &mut ExplainCluster, shares: &crate::traffic::decide::RegionShares) {
    for l in cluster.localities.iter_mut() {
        let named: Vec<String> = l
            .clusters
            .iter()
            .filter_map(|c| shares.get(&crate::model::ClusterId::new(c)).map(|s| (c, s)))
            .map(|(c, s)| format!("{c} {:.1}% ({})", s.share, s.reason))
            .collect();
        if named.is_empty() {
            l.reason.push_str("; not in the traffic split for the proxy's region: after it");
            continue;
        }
        let zero =
            l.clusters.iter().all(|c| shares.get(&crate::model::ClusterId::new(c)).is_some_and(|s| s.share <= 0.0));
        l.rule = Rule::TrafficSplit;
        l.reason = if zero {
            format!("traffic split, share 0: last resort: {}", named.join("; "))
        } else {
            format!("traffic split: locality weight by share: {}", named.join("; "))
        };
    }
}

fn locality_text(l: &Locality) -> String {
    let mut s = format!("{}/{}", l.region, l.zone);
    if !l.subzone.is_empty() {
        s.push('/');
        s.push_str(&l.subzone);
    }
    s
}

/// Sets `rule` and `reason` of every locality (priorities as in the EDS).
fn assign_reasons(proxy: &Locality, localities: &mut [ExplainLocality], unreachable: &HashMap<String, SystemTime>) {
    let raw: Vec<u32> = localities.iter().map(|l| lb_priority(proxy, &l.locality)).collect();
    let actual: Vec<u32> = localities.iter().map(|l| l.priority).collect();
    let mut expected = raw.clone();
    compact_priorities(&mut expected);
    if actual.iter().all(|p| *p == 0) && (proxy.is_empty() || expected.iter().any(|p| *p != 0)) {
        let reason = if proxy.is_empty() {
            "priority 0: the proxy has no locality, so every locality has the same priority"
        } else {
            "priority 0: no failover priorities for this service (istiod assigns them only with outlierDetection, \
             and not with a distribute rule)"
        };
        for l in localities.iter_mut() {
            l.rule = Rule::NoPriorities;
            l.reason = reason.to_string();
        }
        return;
    }
    let consistent = actual == expected;
    // Other-region localities at more than one priority: a failover rule ranked one region first.
    let other_region: Vec<u32> = raw.iter().zip(&actual).filter(|(r, _)| **r == 3).map(|(_, a)| *a).collect();
    let first_other = other_region.iter().min().copied();
    let failover_split = other_region.iter().any(|a| Some(*a) != first_other);
    for i in 0..localities.len() {
        let l = &localities[i];
        let loc = locality_text(&l.locality);
        let (rule, reason) = if consistent {
            base_reason(raw[i], &loc, proxy)
        } else if localities.iter().enumerate().any(|(j, o)| j != i && same_locality(&o.locality, &l.locality)) {
            (
                Rule::FailoverPriority,
                format!(
                    "failoverPriority: {loc} appears at several priorities; endpoints whose labels match the \
                     proxy's get the lower one"
                ),
            )
        } else if let Some(network) = l.fenced_network.as_ref().filter(|_| actual[i] > expected[i]) {
            (
                Rule::FencedNetwork,
                format!(
                    "fenced: every east-west gateway address of network {network} is down (gateway probes); its \
                     endpoints are the last resort for proxies on other networks"
                ),
            )
        } else if let Some((cluster, since)) = l
            .clusters
            .iter()
            .find_map(|c| unreachable.get(c).map(|t| (c.clone(), *t)))
            .filter(|_| actual[i] > expected[i])
        {
            (
                Rule::DemotedUnreachable,
                format!("demoted: cluster {cluster} has been unreachable since {}", rfc3339(since)),
            )
        } else if raw[i] == 3 && failover_split && Some(actual[i]) == first_other {
            (
                Rule::FailoverTarget,
                format!(
                    "failover target: {} is where a failover rule sends traffic from {} when it has no healthy endpoints",
                    l.locality.region, proxy.region
                ),
            )
        } else if raw[i] == 3 && failover_split {
            (Rule::AfterFailoverTarget, format!("other region ({}), after the failover target", l.locality.region))
        } else if actual[i] == expected[i] {
            base_reason(raw[i], &loc, proxy)
        } else {
            (Rule::Policy, format!("{loc}: priority set by policy"))
        };
        localities[i].rule = rule;
        localities[i].reason = reason;
    }
}

fn base_reason(raw: u32, loc: &str, proxy: &Locality) -> (Rule, String) {
    match raw {
        0 => (Rule::SameZone, format!("same zone: {loc} is the proxy's region and zone")),
        1 => {
            (Rule::SameZone, format!("same zone, other subzone: {loc} (the proxy is in subzone {:?})", &*proxy.subzone))
        }
        2 => (Rule::SameRegion, format!("same region, other zone: {loc} is in the proxy's region {}", proxy.region)),
        _ => (Rule::OtherRegion, format!("other region: {loc} is outside the proxy's region {}", proxy.region)),
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    fn loc(s: &str) -> Locality {
        Locality::parse(s)
    }

    fn l(s: &str, priority: u32, clusters: &[&str]) -> ExplainLocality {
        ExplainLocality {
            locality: loc(s),
            priority,
            weight: Some(1),
            clusters: clusters.iter().map(|c| c.to_string()).collect(),
            endpoints: Vec::new(),
            rule: Rule::Policy,
            reason: String::new(),
            fenced_network: None,
        }
    }

    fn rules(proxy: &str, ls: &mut [ExplainLocality], unreachable: &HashMap<String, SystemTime>) -> Vec<Rule> {
        assign_reasons(&loc(proxy), ls, unreachable);
        ls.iter().map(|l| l.rule).collect()
    }

    #[test]
    fn reasons_follow_the_locality_rules() {
        let mut ls = [
            l("us-east-1/us-east-1a", 0, &["aws"]),
            l("us-east-1/us-east-1b", 1, &["aws"]),
            l("westeurope/westeurope-1", 2, &["azure"]),
        ];
        assert_eq!(
            rules("us-east-1/us-east-1a", &mut ls, &HashMap::new()),
            [Rule::SameZone, Rule::SameRegion, Rule::OtherRegion]
        );
        assert!(ls[2].reason.contains("other region"), "{}", ls[2].reason);
    }

    #[test]
    fn all_zero_priorities_mean_no_failover() {
        let mut ls = [l("us-east-1/us-east-1a", 0, &[]), l("westeurope/westeurope-1", 0, &[])];
        assert_eq!(rules("us-east-1/us-east-1a", &mut ls, &HashMap::new()), [Rule::NoPriorities; 2]);
        let mut ls = [l("us-east-1/us-east-1a", 0, &[]), l("westeurope/westeurope-1", 0, &[])];
        assert_eq!(rules("", &mut ls, &HashMap::new()), [Rule::NoPriorities; 2]);
    }

    #[test]
    fn policies_are_recognised() {
        // failover: westeurope before ap-south-1 for us-east-1
        let mut ls = [
            l("us-east-1/us-east-1a", 0, &[]),
            l("westeurope/westeurope-1", 1, &[]),
            l("ap-south-1/ap-south-1a", 2, &[]),
        ];
        assert_eq!(
            rules("us-east-1/us-east-1a", &mut ls, &HashMap::new()),
            [Rule::SameZone, Rule::FailoverTarget, Rule::AfterFailoverTarget]
        );
        // failoverPriority: one locality at two priorities
        let mut ls = [l("us-east-1/us-east-1a", 0, &[]), l("us-east-1/us-east-1a", 1, &[]), l("westeurope/w1", 2, &[])];
        assert_eq!(rules("us-east-1/us-east-1a", &mut ls, &HashMap::new())[..2], [Rule::FailoverPriority; 2]);
        // a demoted unreachable cluster
        let unreachable: HashMap<String, SystemTime> = [("aws-b".to_string(), UNIX_EPOCH)].into();
        let mut ls = [
            l("us-east-1/us-east-1a", 0, &["aws-a"]),
            l("us-east-1/us-east-1b", 2, &["aws-b"]),
            l("westeurope/w1", 1, &["az"]),
        ];
        let r = rules("us-east-1/us-east-1a", &mut ls, &unreachable);
        assert_eq!(r[1], Rule::DemotedUnreachable);
        assert_eq!(r[2], Rule::Policy);
        // a fenced network: its gateway's locality after another region it would share a priority with
        let mut fenced = l("westeurope/w1", 2, &["az"]);
        fenced.fenced_network = Some("azure-net".into());
        let mut ls = [l("us-east-1/us-east-1a", 0, &["aws-a"]), fenced, l("ap-south-1/ap-south-1a", 1, &["gcp"])];
        let r = rules("us-east-1/us-east-1a", &mut ls, &HashMap::new());
        assert_eq!(r[1], Rule::FencedNetwork);
        assert!(ls[1].reason.contains("network azure-net is down"), "{}", ls[1].reason);
        // fenced but at the priority its locality gives anyway (the last): its locality explains it
        let mut fenced = l("westeurope/w1", 2, &["az"]);
        fenced.fenced_network = Some("azure-net".into());
        let mut ls = [l("us-east-1/us-east-1a", 0, &["aws-a"]), l("us-east-1/us-east-1b", 1, &["aws-a"]), fenced];
        let r = rules("us-east-1/us-east-1a", &mut ls, &HashMap::new());
        assert_eq!(r, [Rule::SameZone, Rule::SameRegion, Rule::OtherRegion]);
    }
}
