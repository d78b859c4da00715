//! Mesh-wide problems that translation works around silently if nobody says anything: failover that
//! cannot take effect, networks that cannot be reached, endpoints that are left out, DestinationRule
//! fields meshfed does not apply. Pure, like the rest of translation; the push loop logs changes and the
//! debug surface shows the current list.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::Context;
use crate::model::{NetworkId, TlsMode};
use crate::registry::Registry;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Warning {
    /// a short stable kind: `failover-without-outlier-detection`, `network-without-gateway`,
    /// `endpoints-without-mtls`, `gateway-unresolved`, `invalid-destination-rule`,
    /// `destination-rule-field-not-applied`, `destination-rule-duplicate-subset`
    pub kind: &'static str,
    /// what it is about (a service, a rule, a network)
    pub subject: String,
    pub message: String,
}

pub fn warnings(ctx: &Context, registry: &Registry) -> Vec<Warning> {
    let mut out = BTreeSet::new();
    let d = &ctx.defaults;
    if d.locality_lb.is_enabled()
        && (!d.locality_lb.failover.is_empty() || !d.locality_lb.failover_priority.is_empty())
        && d.outlier_detection.is_none()
    {
        out.insert(Warning {
            kind: "failover-without-outlier-detection",
            subject: "mesh config defaults".into(),
            message: "the default localityLbSetting has failover rules but there is no default outlierDetection: \
                      failover does not take effect for services without a DestinationRule that sets one"
                .into(),
        });
    }
    for s in registry.services().values() {
        // (as proxies in a namespace no rule mentions see the rules)
        let rule = ctx.rule_for(&super::RuleScope::default(), s);
        let subsets = rule.map(|r| r.subsets.as_slice()).unwrap_or_default();
        for p in &s.ports {
            for subset in std::iter::once(None).chain(subsets.iter().map(Some)) {
                let policy = ctx.policy_with(rule, p.port, subset);
                if let Some((rule, _)) = &policy.rule
                    && policy.failover_without_outlier_detection()
                {
                    let what = match subset {
                        Some(subset) => format!("{}:{} subset {}", s.hostname, p.port, subset.name),
                        None => format!("{}:{}", s.hostname, p.port),
                    };
                    out.insert(Warning {
                        kind: "failover-without-outlier-detection",
                        subject: format!("DestinationRule {rule}"),
                        message: format!(
                            "{what}: failover is configured but outlierDetection is not: Envoy never ejects a \
                             failing locality, so failover does not take effect (add outlierDetection)"
                        ),
                    });
                }
            }
        }
    }
    for rule in ctx.rules.iter() {
        for path in &rule.not_applied {
            out.insert(Warning {
                kind: "destination-rule-field-not-applied",
                subject: format!("DestinationRule {}/{}", rule.namespace, rule.name),
                message: format!(
                    "{path} is not applied by meshfed (it applies localityLbSetting and outlierDetection, per \
                     port and per subset, subsets, exportTo and workloadSelector); the rest of the rule is"
                ),
            });
        }
    }
    for (rule, what) in ctx.rules.duplicate_subsets() {
        out.insert(Warning {
            kind: "destination-rule-duplicate-subset",
            subject: format!("DestinationRule {rule}"),
            message: what.clone(),
        });
    }
    // Networks: which have endpoints, which have a usable gateway.
    let mut endpoints_by_network: BTreeMap<&NetworkId, (usize, usize)> = BTreeMap::new();
    for s in registry.services().values() {
        for e in &s.endpoints {
            let entry = endpoints_by_network.entry(&e.network).or_default();
            entry.0 += 1;
            if e.tls_mode() != TlsMode::Istio {
                entry.1 += 1;
            }
        }
    }
    let gateway_networks: BTreeSet<&NetworkId> =
        ctx.gateways.iter().filter(|g| !ctx.gateway_addresses(g).is_empty()).map(|g| &g.network).collect();
    for g in ctx.gateways.iter().filter(|g| ctx.gateway_addresses(g).is_empty()) {
        out.insert(Warning {
            kind: "gateway-unresolved",
            subject: format!("gateway {} ({})", g.service, g.cluster),
            message: format!("hostname {} of network {}'s gateway does not resolve (yet)", g.address, g.network),
        });
    }
    let networks: Vec<&NetworkId> = endpoints_by_network.keys().filter(|n| !n.is_empty()).copied().collect();
    if networks.len() > 1 {
        for (network, (count, plaintext)) in &endpoints_by_network {
            if network.is_empty() {
                continue;
            }
            if !gateway_networks.contains(network) {
                out.insert(Warning {
                    kind: "network-without-gateway",
                    subject: format!("network {network}"),
                    message: format!(
                        "{count} endpoints on network {network} but no east-west gateway (a Service labelled \
                         topology.istio.io/network={network} with a load balancer address): proxies on other \
                         networks cannot reach them, so they are left out of those proxies' EDS"
                    ),
                });
            }
            if *plaintext > 0 {
                out.insert(Warning {
                    kind: "endpoints-without-mtls",
                    subject: format!("network {network}"),
                    message: format!(
                        "{plaintext} endpoints on network {network} have no sidecar (pod label \
                         security.istio.io/tlsMode=istio): only proxies on {network} can reach them"
                    ),
                });
            }
        }
    }
    for e in registry.policy_errors() {
        out.insert(Warning { kind: "invalid-destination-rule", subject: "DestinationRule".into(), message: e });
    }
    out.into_iter().collect()
}
