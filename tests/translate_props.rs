//! Property tests of EDS translation (`meshfed::translate::endpoint::load_assignment`) over random
//! registries: one service whose endpoints are spread over random networks (with 0-4 east-west gateway
//! addresses each), localities, health states and mTLS capability, seen by random proxies (sidecar or
//! gateway, with or without mesh certificates, anywhere) under random mesh-wide locality policies
//! (failover, failoverPriority, distribute, disabled, with or without outlier detection).
//!
//! For every case:
//! - every locality and every endpoint has a weight > 0;
//! - priorities are contiguous from 0;
//! - split horizon loses and duplicates nothing: each endpoint of the proxy's network that should be sent
//!   is there exactly once; for each other network, its gateway addresses' weights add up to exactly the
//!   number of healthy mTLS-capable endpoints there (however many addresses the gateway has: no network
//!   gets more share than its endpoints would have had); networks the proxy cannot reach contribute
//!   nothing; a locality holding only gateway endpoints weighs what they weigh, and holds each address
//!   once; in a priority, the localities reached through the same networks' gateways are one (Envoy keeps
//!   one host per address and priority);
//! - DestinationRule subsets (`v1`, `v2` by the pod label `version`, and `all` without labels) hold
//!   exactly their pods' endpoints under the same invariants (the gateway of another network weighs the
//!   subset's endpoints there), and the subset without labels is the port's assignment under another name;
//! - translation is deterministic: the same input translated twice (different hash-map seeds) encodes to
//!   the same bytes and the same version.
//!
//! `PROPTEST_CASES` sets the number of cases (default 256).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{address, socket_address::PortSpecifier};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint::HostIdentifier};
use meshfed::cache::Resource;
use meshfed::model::{
    ClusterId, Endpoint, Gateway, Health, Locality, NetworkId, Protocol, Service, ServiceKey, ServicePort, TlsMode,
    Workload,
};
use meshfed::policy::{DestinationRule, Distribute, Failover, LocalityLbSetting, MeshDefaults, OutlierDetection};
use meshfed::proxy::{ProxyKind, TlsSupport};
use meshfed::translate::endpoint::{in_subset, load_assignment, port_load_assignment};
use meshfed::translate::{Context, EndpointScope, Named, cluster_name};
use proptest::prelude::*;

const NETWORKS: [&str; 3] = ["net-a", "net-b", "net-c"];
const REGIONS: [&str; 3] = ["us-east-1", "westeurope", "ap-south-1"];
const ZONES: [&str; 2] = ["z1", "z2"];
const SUBZONES: [&str; 2] = ["", "s1"];
const PORT: u16 = 9080;
const GATEWAY_PORT: u16 = 15443;

#[derive(Clone, Debug)]
struct Ep {
    network: usize,
    locality: (usize, usize, usize),
    health: Health,
    mtls: bool,
    has_port: bool,
    version: &'static str,
}

#[derive(Clone, Debug)]
struct Case {
    endpoints: Vec<Ep>,
    /// gateway addresses per network
    gateways: [usize; 3],
    proxy_kind: ProxyKind,
    proxy_tls: TlsSupport,
    proxy_network: usize,
    proxy_locality: Option<(usize, usize, usize)>,
    send_unhealthy: bool,
    defaults: MeshDefaults,
}

fn locality((r, z, s): (usize, usize, usize)) -> Locality {
    Locality::new(REGIONS[r], ZONES[z], SUBZONES[s])
}

fn ep_strategy() -> impl Strategy<Value = Ep> {
    (
        0..3usize,
        (0..3usize, 0..2usize, 0..2usize),
        prop_oneof![6 => Just(Health::Healthy), 1 => Just(Health::Unhealthy), 1 => Just(Health::Draining)],
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.9),
        prop_oneof![Just("v1"), Just("v2")],
    )
        .prop_map(|(network, locality, health, mtls, has_port, version)| Ep {
            network,
            locality,
            health,
            mtls,
            has_port,
            version,
        })
}

fn region_pattern() -> impl Strategy<Value = String> {
    prop_oneof![
        (0..3usize).prop_map(|r| REGIONS[r].to_string()),
        (0..3usize, 0..2usize).prop_map(|(r, z)| format!("{}/{}", REGIONS[r], ZONES[z])),
        (0..3usize).prop_map(|r| format!("{}/*", REGIONS[r])),
        Just("*".to_string()),
    ]
}

fn locality_lb_strategy() -> impl Strategy<Value = LocalityLbSetting> {
    let failover = prop::collection::vec(
        (0..3usize, 0..3usize).prop_map(|(a, b)| Failover { from: REGIONS[a].into(), to: REGIONS[b].into() }),
        0..3,
    );
    let failover_priority = prop::collection::vec(
        prop_oneof![
            Just("topology.istio.io/network".to_string()),
            Just("topology.kubernetes.io/region".to_string()),
            Just("topology.kubernetes.io/zone".to_string()),
            Just("version".to_string()),
            Just("version=v2".to_string()),
        ],
        0..3,
    );
    let distribute = prop::collection::vec(
        (region_pattern(), prop::collection::btree_map(region_pattern(), 1..100u32, 1..4))
            .prop_map(|(from, to)| Distribute { from, to }),
        0..2,
    );
    (
        prop_oneof![Just(None), Just(Some(true)), Just(Some(false))],
        failover,
        failover_priority,
        prop_oneof![3 => Just(Vec::new()), 1 => distribute],
    )
        .prop_map(|(enabled, failover, failover_priority, distribute)| LocalityLbSetting {
            enabled,
            distribute,
            failover,
            failover_priority,
        })
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(ep_strategy(), 0..40),
        [0..5usize, 0..5usize, 0..5usize],
        prop_oneof![4 => Just(ProxyKind::Sidecar), 1 => Just(ProxyKind::Router)],
        prop_oneof![Just(TlsSupport::None), Just(TlsSupport::Static), Just(TlsSupport::Agent)],
        0..3usize,
        prop::option::weighted(0.9, (0..3usize, 0..2usize, 0..2usize)),
        prop::bool::weighted(0.2),
        prop::option::weighted(0.7, Just(OutlierDetection::default())),
        locality_lb_strategy(),
    )
        .prop_map(
            |(endpoints, gateways, proxy_kind, proxy_tls, proxy_network, proxy_locality, send_unhealthy, od, lb)| {
                Case {
                    endpoints,
                    gateways: [gateways[0], gateways[1], gateways[2]],
                    proxy_kind,
                    proxy_tls,
                    proxy_network,
                    proxy_locality,
                    send_unhealthy,
                    defaults: MeshDefaults { outlier_detection: od, locality_lb: lb },
                }
            },
        )
}

fn endpoint_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250) as u8 + 1))
}

fn gateway_ip(network: usize, i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, (network * 10 + i + 1) as u8))
}

/// Builds the translation input of a case (fresh maps each time).
fn input(case: &Case) -> (Context, EndpointScope, Service) {
    let mut endpoints: Vec<Endpoint> = case
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| Endpoint {
            address: endpoint_ip(i),
            ports: vec![(if e.has_port { "http" } else { "metrics" }.into(), if e.has_port { 8080 } else { 15090 })],
            cluster: ClusterId::new(format!("cluster-{}", NETWORKS[e.network])),
            network: NetworkId::new(NETWORKS[e.network]),
            locality: locality(e.locality),
            health: e.health,
            workload: Some(Arc::new(Workload {
                name: format!("reviews-{i}").into(),
                namespace: "shop".into(),
                service_account: "default".into(),
                labels: Arc::new(BTreeMap::from([("version".to_string(), e.version.to_string())])),
                tls_mode: if e.mtls { TlsMode::Istio } else { TlsMode::Disabled },
            })),
        })
        .collect();
    endpoints.sort_by(|a, b| (a.cluster.as_str(), a.address).cmp(&(b.cluster.as_str(), b.address)));
    let service = Service {
        key: ServiceKey::new("shop", "reviews"),
        hostname: "reviews.shop.svc.cluster.local".into(),
        ports: vec![ServicePort { name: "http".into(), port: PORT, protocol: Protocol::Http }],
        clusters: NETWORKS.iter().map(|n| ClusterId::new(format!("cluster-{n}"))).collect(),
        endpoints,
    };
    let gateways = (0..3)
        .flat_map(|n| {
            (0..case.gateways[n]).map(move |i| Gateway {
                network: NetworkId::new(NETWORKS[n]),
                cluster: ClusterId::new(format!("cluster-{}", NETWORKS[n])),
                address: gateway_ip(n, i).to_string().into(),
                port: GATEWAY_PORT,
                service: "istio-system/istio-eastwestgateway".into(),
            })
        })
        .collect();
    let mut ctx = Context {
        send_unhealthy_endpoints: case.send_unhealthy,
        defaults: case.defaults.clone(),
        gateways: Arc::new(gateways),
        ..Context::default()
    };
    // subsets only: the policy stays the mesh defaults'
    let rule = DestinationRule::from_yaml(
        "metadata: {name: reviews, namespace: shop}\nspec:\n  host: reviews\n  subsets:\n  - name: v1\n    labels: {version: v1}\n  - name: v2\n    labels: {version: v2}\n  - name: all\n",
    )
    .expect("a valid rule");
    ctx.set_rules(Arc::new(vec![Arc::new(rule)]));
    let scope = EndpointScope {
        kind: case.proxy_kind,
        network: NetworkId::new(NETWORKS[case.proxy_network]),
        locality: case.proxy_locality.map(locality).unwrap_or_default(),
        cluster_id: None,
        labels: vec![("version".into(), "v1".into())],
        tls: if case.proxy_kind == ProxyKind::Router { TlsSupport::None } else { case.proxy_tls },
        rules: Default::default(),
    };
    (ctx, scope, service)
}

fn address_of(e: &envoy_types::pb::envoy::config::endpoint::v3::LbEndpoint) -> Option<IpAddr> {
    let Some(HostIdentifier::Endpoint(pe)) = &e.host_identifier else { return None };
    match pe.address.as_ref()?.address.as_ref()? {
        address::Address::SocketAddress(sa) => {
            let _ = matches!(sa.port_specifier, Some(PortSpecifier::PortValue(_)));
            sa.address.parse().ok()
        }
        _ => None,
    }
}

fn check(case: &Case) -> Result<(), TestCaseError> {
    let (ctx, scope, service) = input(case);
    let cla: ClusterLoadAssignment = load_assignment(&ctx, &scope, &service, &service.ports[0]);
    check_assignment(case, &ctx, &scope, &service, &cla, &|_| true)?;

    // every subset: its own endpoints only, under the same invariants
    let rule = ctx.rule_for(&scope.rules, &service).expect("the rule applies");
    prop_assert_eq!(rule.subsets.len(), 3);
    for subset in &rule.subsets {
        let sub = port_load_assignment(&ctx, &scope, &service, &service.ports[0], Some(rule), Some(subset));
        prop_assert_eq!(&sub.cluster_name, &cluster_name(scope.kind, PORT, &subset.name, &service.hostname));
        check_assignment(case, &ctx, &scope, &service, &sub, &|e| in_subset(subset, e))?;
        if subset.labels.is_empty() {
            let renamed = ClusterLoadAssignment { cluster_name: cla.cluster_name.clone(), ..sub };
            prop_assert_eq!(&renamed, &cla, "a subset without labels holds what the port does");
        }
    }

    // deterministic: a second translation from freshly built input encodes identically
    let (ctx2, scope2, service2) = input(case);
    let again = load_assignment(&ctx2, &scope2, &service2, &service2.ports[0]);
    let a = Resource::encode(Named::new(cla.cluster_name.clone(), cla));
    let b = Resource::encode(Named::new(again.cluster_name.clone(), again));
    prop_assert_eq!(&a.version, &b.version);
    prop_assert!(a.body == b.body, "the same input encoded differently");
    Ok(())
}

/// The invariants of one assignment `cla`, of the service's endpoints for which `member` holds.
fn check_assignment(
    case: &Case,
    ctx: &Context,
    scope: &EndpointScope,
    service: &Service,
    cla: &ClusterLoadAssignment,
    member: &dyn Fn(&Endpoint) -> bool,
) -> Result<(), TestCaseError> {
    // weights > 0
    for l in &cla.endpoints {
        let w = l.load_balancing_weight.as_ref().map(|w| w.value);
        prop_assert!(w.is_some_and(|w| w > 0), "locality {:?} has weight {w:?}", l.locality);
        for e in &l.lb_endpoints {
            if let Some(w) = &e.load_balancing_weight {
                prop_assert!(w.value > 0, "an endpoint of {:?} has weight 0", l.locality);
            }
        }
    }
    // priorities contiguous from 0
    let priorities: BTreeSet<u32> = cla.endpoints.iter().map(|l| l.priority).collect();
    prop_assert_eq!(priorities.iter().copied().collect::<Vec<_>>(), (0..priorities.len() as u32).collect::<Vec<_>>());

    // split horizon: nothing lost, nothing duplicated (distribute may drop whole localities on purpose)
    let distribute_active = ctx.policy(service, PORT).distribute_active();
    if !distribute_active {
        let mut local_sent: Vec<IpAddr> = Vec::new();
        let mut gateway_weight: BTreeMap<usize, u32> = BTreeMap::new();
        for l in &cla.endpoints {
            for e in &l.lb_endpoints {
                let ip = address_of(e).expect("socket address");
                match (0..3).find(|n| (0..case.gateways[*n]).any(|i| gateway_ip(*n, i) == ip)) {
                    Some(n) => {
                        *gateway_weight.entry(n).or_default() += e.load_balancing_weight.as_ref().map_or(1, |w| w.value)
                    }
                    None => local_sent.push(ip),
                }
            }
        }
        local_sent.sort();
        let mut local_expected: Vec<IpAddr> = service
            .endpoints
            .iter()
            .filter(|e| member(e) && e.network == scope.network && e.port_for("http").is_some())
            .filter(|e| e.health == Health::Healthy || case.send_unhealthy)
            .map(|e| e.address)
            .collect();
        local_expected.sort();
        prop_assert_eq!(&local_sent, &local_expected, "the proxy's own network's endpoints");

        let reach = scope.kind == ProxyKind::Sidecar && scope.tls != TlsSupport::None;
        for (n, name) in NETWORKS.iter().enumerate() {
            if *name == scope.network.as_str() {
                prop_assert!(!gateway_weight.contains_key(&n), "the proxy's own gateway in its EDS");
                continue;
            }
            let eligible = service
                .endpoints
                .iter()
                .filter(|e| member(e) && e.network.as_str() == *name && e.port_for("http").is_some())
                .filter(|e| e.health == Health::Healthy && e.tls_mode() == TlsMode::Istio)
                .count() as u32;
            let gateways = case.gateways[n] as u32;
            let sent = gateway_weight.get(&n).copied().unwrap_or(0);
            if !reach || gateways == 0 || eligible == 0 {
                prop_assert_eq!(sent, 0, "network {} is unreachable or empty, yet has gateway weight", name);
            } else {
                // exactly the endpoints' share, also when a locality has fewer endpoints than the gateway
                // has addresses (weight-1 entries on only that many addresses)
                prop_assert_eq!(
                    sent,
                    eligible,
                    "network {}: {} eligible endpoints behind {} gateway addresses",
                    name,
                    eligible,
                    gateways
                );
            }
        }

        // gateway-only localities: a locality weighs what its gateway endpoints weigh; and localities of one
        // priority reached through the same networks are one (Envoy keeps one host per address and
        // priority: separate localities would share addresses, or, with fewer endpoints than addresses,
        // could not use the same ones)
        let network_of = |ip: IpAddr| (0..3).find(|n| (0..case.gateways[*n]).any(|i| gateway_ip(*n, i) == ip));
        let mut seen: BTreeSet<(u32, BTreeSet<usize>)> = BTreeSet::new();
        for l in
            cla.endpoints.iter().filter(|l| l.lb_endpoints.iter().all(|e| network_of(address_of(e).unwrap()).is_some()))
        {
            let mut sum = 0;
            let mut addresses = BTreeSet::new();
            let mut networks = BTreeSet::new();
            for e in &l.lb_endpoints {
                let ip = address_of(e).unwrap();
                prop_assert!(addresses.insert(ip), "gateway {} twice in {:?}", ip, l.locality);
                networks.extend(network_of(ip));
                sum += e.load_balancing_weight.as_ref().map_or(1, |w| w.value);
            }
            prop_assert_eq!(l.load_balancing_weight.as_ref().map(|w| w.value), Some(sum), "{:?}", l.locality);
            let key = (l.priority, networks);
            prop_assert!(
                !seen.contains(&key),
                "two gateway-only localities in priority {} through networks {:?}",
                key.0,
                key.1
            );
            seen.insert(key);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        // a failing case is printed (minimised); no regression files are written into the tree
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn eds_invariants(case in case_strategy()) {
        check(&case)?;
    }
}
