//! Entry points for fuzzing: each takes arbitrary bytes, feeds them to one of meshfed's parsers or to the
//! xDS protocol state machine, and checks invariants; none may panic on any input. The cargo-fuzz targets
//! in `fuzz/` (libFuzzer, coverage-guided) and the stable-Rust smoke runner `tests/fuzz_smoke.rs`
//! (deterministic mutations of seed inputs) both call these. See SECURITY.md for what runs where.
//!
//! | target | what |
//! |---|---|
//! | [`node`] | a `DiscoveryRequest` (protobuf) -> [`Proxy::from_node`]; node ids -> [`parse_node_id`] |
//! | [`mesh_config`] | YAML -> [`MeshConfig::parse`] |
//! | [`topology`] | YAML manifests -> [`topology::parse_manifests`] |
//! | [`destination_rule`] | YAML -> [`DestinationRule::from_yaml`] |
//! | [`kube_object`] | JSON -> k8s-openapi objects -> `topology::from_*` |
//! | [`XdsHarness::sotw`] / [`XdsHarness::delta`] | a sequence of requests (and pushes) on one ADS stream |
//! | [`grpc_connection`] | HTTP/2 frames (well-formed and not) and raw bytes into one connection of the gRPC transport |

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind as ValueKind};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use tokio::sync::mpsc;

use meshfed::mesh_config::MeshConfig;
use meshfed::node_id::parse_node_id;
use meshfed::policy::DestinationRule;
use meshfed::proxy::Proxy;
use meshfed::push::PushHandle;
use meshfed::source::SourceEvent;
use meshfed::tls::{PeerAuth, SpiffeId};
use meshfed::topology::{self, TopologyObject};
use meshfed::xds::codec::Response;
use meshfed::xds::connections::{Connections, Flavor};
use meshfed::xds::limits::{ConnState, Limits};
use meshfed::xds::stream::{Stream, StreamContext};

use crate::ads::{Request, nack_status};
use crate::demo::demo_events;
use crate::fixtures::resource_name;

/// Reads structure out of fuzz bytes; past the end every read gives zeros, so any input is complete.
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    pub fn bool(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    /// A number in `0..n` (0 if `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let v = u16::from_le_bytes([self.byte(), self.byte()]) as usize;
        v % n
    }

    pub fn pick<'b, T>(&mut self, items: &'b [T]) -> &'b T {
        &items[self.below(items.len())]
    }

    /// Up to `max` raw bytes, as a (lossy) string.
    pub fn string(&mut self, max: usize) -> String {
        let len = self.below(max + 1);
        let start = self.pos.min(self.data.len());
        let end = (start + len).min(self.data.len());
        self.pos += len;
        String::from_utf8_lossy(&self.data[start..end]).into_owned()
    }
}

fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Parsers
// ---------------------------------------------------------------------------------------------

/// Node ids and node metadata: the bytes as a protobuf `DiscoveryRequest` (and `DeltaDiscoveryRequest`)
/// whose node is parsed, and as a node id string.
pub fn node(data: &[u8]) {
    if let Ok(req) = DiscoveryRequest::decode(data) {
        // decoding is stable: what decodes re-encodes to something that decodes to the same
        let again = DiscoveryRequest::decode(req.encode_to_vec().as_slice()).expect("re-encoded request decodes");
        assert_eq!(again, req);
        check_proxy(req.node.as_ref());
    }
    if let Ok(req) = DeltaDiscoveryRequest::decode(data) {
        check_proxy(req.node.as_ref());
    }
    let id = text(data);
    if let Ok(parts) = parse_node_id(&id) {
        assert!(id.contains(&format!("~{}~{}.svc.{}", parts.pod_dot_namespace(), parts.namespace, parts.domain)));
        assert!(meshfed::node_id::PROXY_TYPES.contains(&parts.proxy_type.as_str()));
    }
    // the same bytes as node metadata around a valid id
    let mut input = Input::new(data);
    let node = structured_node(&mut input);
    check_proxy(Some(&node));
}

fn check_proxy(node: Option<&Node>) {
    let Ok(p) = Proxy::from_node(node) else { return };
    let parts = parse_node_id(&p.id).expect("an accepted node id parses");
    assert_eq!(*p.namespace, parts.namespace);
    assert_eq!(*p.key, format!("{}.{}", parts.pod, parts.namespace));
    assert!(!p.namespace.is_empty() && !p.pod.is_empty());
}

const NAMESPACES: &[&str] = &["shop", "istio-system", "bank", "default", "Shop", "", "a.b", "shop\u{0}"];
const METADATA_KEYS: &[&str] = &[
    "CLUSTER_ID",
    "NETWORK",
    "REQUESTED_NETWORK_VIEW",
    "INTERCEPTION_MODE",
    "MESHFED_TLS",
    "MESHFED_INBOUND_ADDRESS",
    "GENERATOR",
    "ISTIO_VERSION",
    "LABELS",
];
const METADATA_VALUES: &[&str] = &[
    "aws-use1",
    "azure-weu",
    "aws-net",
    "azure-net",
    "NONE",
    "REDIRECT",
    "TPROXY",
    "static",
    "agent",
    "none",
    "grpc",
    "event",
    "127.0.0.1",
    "::1",
    "not an ip",
    "",
];

/// A node whose id and metadata are built from `input`: mostly valid ids, with fuzzed parts.
pub fn structured_node(input: &mut Input<'_>) -> Node {
    let kind = *input.pick(&["sidecar", "router", "gateway", ""]);
    let ip = *input.pick(&["127.0.50.1", "10.0.0.1", "::1", "fd00::1", "1.2.3", "localhost"]);
    let ns = if input.below(8) == 0 { input.string(12) } else { input.pick(NAMESPACES).to_string() };
    let pod = if input.below(8) == 0 { input.string(12) } else { input.pick(&["client-0", "a.b", "x"]).to_string() };
    let ns2 = if input.below(8) == 0 { input.pick(NAMESPACES).to_string() } else { ns.clone() };
    let id = format!("{kind}~{ip}~{pod}.{ns}~{ns2}.svc.cluster.local");
    let mut fields = BTreeMap::new();
    for _ in 0..input.below(6) {
        let key = input.pick(METADATA_KEYS).to_string();
        let value = match input.below(6) {
            0 => Value { kind: Some(ValueKind::NumberValue(1.5)) },
            1 => Value { kind: Some(ValueKind::BoolValue(true)) },
            2 => Value { kind: None },
            3 => {
                let mut labels = BTreeMap::new();
                labels.insert(input.string(8), meshfed::proxy::string_value(&input.string(8)));
                if input.bool() {
                    labels.insert("x".into(), Value { kind: Some(ValueKind::NumberValue(2.0)) });
                }
                Value { kind: Some(ValueKind::StructValue(Struct { fields: labels.into_iter().collect() })) }
            }
            4 => meshfed::proxy::string_value(&input.string(16)),
            _ => {
                let value: &&str = input.pick(METADATA_VALUES);
                meshfed::proxy::string_value(value)
            }
        };
        fields.insert(key, value);
    }
    let locality = input.bool().then(|| envoy_types::pb::envoy::config::core::v3::Locality {
        region: input.pick(&["us-east-1", "westeurope", ""]).to_string(),
        zone: input.pick(&["us-east-1a", "us-east-1b", "westeurope-1", ""]).to_string(),
        sub_zone: String::new(),
    });
    Node {
        id,
        metadata: Some(Struct { fields: fields.into_iter().collect() }),
        locality,
        user_agent_name: input.pick(&["envoy", "gRPC Python", ""]).to_string(),
        ..Default::default()
    }
}

/// The mesh config file.
pub fn mesh_config(data: &[u8]) {
    if let Ok(cfg) = MeshConfig::parse(&text(data), Path::new("/nonexistent/meshfed-fuzz")) {
        let ids: HashSet<_> = cfg.clusters.iter().map(|c| c.id.clone()).collect();
        assert_eq!(ids.len(), cfg.clusters.len(), "cluster ids are unique");
        assert!(cfg.clusters.iter().all(|c| !c.id.as_str().is_empty()));
    }
}

/// A manifest file (YAML documents, `kind: List`).
pub fn topology(data: &[u8]) {
    if let Ok(objects) = topology::parse_manifests(&text(data), Path::new("fuzz.yaml")) {
        for o in &objects {
            assert!(!o.key().name.is_empty(), "every object has a name: {o:?}");
        }
    }
}

/// A DestinationRule.
pub fn destination_rule(data: &[u8]) {
    let _ = DestinationRule::from_yaml(&text(data));
    if let Ok(v) = serde_yaml::from_str::<serde_yaml::Value>(&text(data)) {
        let _ = topology::DestinationRuleInfo::from_value(v);
    }
}

/// A Kubernetes object as the API server would send it: the first byte picks the kind, the rest is
/// JSON. Converted both ways meshfed converts objects: from k8s-openapi types (manifest files) and, as
/// the Kubernetes source does, from the watch's `DynamicObject`.
pub fn kube_object(data: &[u8]) {
    if let (Some(&kind), Some(json)) = (data.first(), data.get(1..))
        && let Ok(obj) = serde_json::from_slice::<kube::api::DynamicObject>(json)
    {
        let watched =
            meshfed::source::kube::WatchedKind::ALL[kind as usize % meshfed::source::kube::WatchedKind::ALL.len()];
        if let Ok(Some(o)) = watched.convert(&obj) {
            assert!(!o.key().name.is_empty());
        }
    }
    use k8s_openapi::api::core::v1::{Namespace, Node as K8sNode, Pod, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let Some((&kind, json)) = data.split_first() else { return };
    fn check(r: Result<Option<TopologyObject>, topology::Error>) {
        if let Ok(Some(o)) = r {
            assert!(!o.key().name.is_empty());
        }
    }
    match kind % 6 {
        0 => {
            if let Ok(o) = serde_json::from_slice::<Namespace>(json) {
                check(topology::from_namespace(&o).map(Some));
            }
        }
        1 => {
            if let Ok(o) = serde_json::from_slice::<Service>(json) {
                check(topology::from_service(&o).map(Some));
            }
        }
        2 => {
            if let Ok(o) = serde_json::from_slice::<EndpointSlice>(json) {
                check(topology::from_endpoint_slice(&o));
            }
        }
        3 => {
            if let Ok(o) = serde_json::from_slice::<K8sNode>(json) {
                check(topology::from_node(&o).map(Some));
            }
        }
        4 => {
            if let Ok(o) = serde_json::from_slice::<Pod>(json) {
                check(topology::from_pod(&o).map(Some));
            }
        }
        _ => {
            if let Ok(v) = serde_json::from_slice::<serde_yaml::Value>(json) {
                let _ = topology::DestinationRuleInfo::from_value(v);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------------------------

/// The fuzz targets, by name (as in `fuzz/Cargo.toml`).
pub const TARGETS: &[&str] =
    &["node", "mesh_config", "topology", "destination_rule", "kube_object", "xds_sotw", "xds_delta", "grpc_connection"];

/// Valid inputs of a target to start from: the demo's files and objects, valid nodes and requests.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    let demo = meshfed::demo::DEMO_FILES;
    let yaml_docs = |kind: &str| -> Vec<String> {
        demo.iter()
            .filter(|(p, _)| p.ends_with(".yaml") && *p != "mesh.yaml")
            .flat_map(|(_, t)| t.split("\n---"))
            .filter(|d| d.contains(&format!("kind: {kind}")))
            .map(str::to_string)
            .collect()
    };
    match target {
        "node" => {
            let mut out = Vec::new();
            for i in 0..8u8 {
                let bytes = [i, 0, i, 1, 0, i, 2, 0, 1, 0, 3, 0];
                let mut input = Input::new(&bytes);
                let req = DiscoveryRequest {
                    node: pick_node(&mut input, true),
                    type_url: meshfed::type_url::CLUSTER.into(),
                    ..Default::default()
                };
                out.push(req.encode_to_vec());
            }
            out.push(b"sidecar~127.0.50.1~client-0.shop~shop.svc.cluster.local".to_vec());
            out.push(b"router~::1~eastwest-0.istio-system~istio-system.svc.cluster.local".to_vec());
            out
        }
        "mesh_config" => {
            let mesh = demo.iter().find(|(p, _)| *p == "mesh.yaml").map(|(_, t)| t.as_bytes().to_vec());
            let mut out: Vec<Vec<u8>> = mesh.into_iter().collect();
            out.push(
                b"clusters:\n  - id: a\n    network: n\n    kubeconfig: a.kubeconfig\n    context: c\n  - id: b\n    network: m\n    inCluster: true\nremoteSecrets:\n  configCluster: b\nreadyTimeout: 5s\nunreachableGracePeriod: 1m\ntrustDomain: example.org\ndefaults:\n  localityLbSetting:\n    failover:\n      - from: us-east-1\n        to: westeurope\n".to_vec(),
            );
            out
        }
        "topology" => demo
            .iter()
            .filter(|(p, _)| p.ends_with(".yaml") && *p != "mesh.yaml")
            .map(|(_, t)| t.as_bytes().to_vec())
            .collect(),
        "destination_rule" => {
            let mut out: Vec<Vec<u8>> = yaml_docs("DestinationRule").into_iter().map(String::into_bytes).collect();
            out.push(
                b"apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: r\n  namespace: shop\nspec:\n  host: reviews\n  trafficPolicy:\n    outlierDetection:\n      consecutive5xxErrors: 3\n      interval: 1s\n      baseEjectionTime: 30s\n    loadBalancer:\n      localityLbSetting:\n        enabled: true\n        distribute:\n          - from: us-east-1/*\n            to:\n              \"us-east-1/*\": 80\n              \"westeurope/*\": 20\n    portLevelSettings:\n      - port:\n          number: 9080\n        outlierDetection:\n          consecutive5xxErrors: 1\n".to_vec(),
            );
            out
        }
        "kube_object" => {
            let mut out = Vec::new();
            for (byte, kind) in [(0u8, "Namespace"), (1, "Service"), (2, "EndpointSlice"), (3, "Node"), (4, "Pod")] {
                for doc in yaml_docs(kind) {
                    let Ok(v) = serde_yaml::from_str::<serde_json::Value>(&doc) else { continue };
                    let mut bytes = vec![byte];
                    bytes.extend(serde_json::to_vec(&v).unwrap_or_default());
                    out.push(bytes);
                }
            }
            out
        }
        "grpc_connection" => {
            // valid preface, then: a stream opened, messages, windows, pings, resets, a second stream
            let mut out = vec![
                vec![0, 1, 1, 0, 2, 1, 0, 3, 10, 2, 1, 0, 40, 3, 0, 0, 0, 1, 5, 0, 2, 1, 0, 5, 6, 1, 0, 1, 2, 3, 0, 9],
                vec![0, 1, 1, 1, 2, 1, 1, 0xff, 10, 10, 10, 3, 1, 0, 0x10, 10, 10, 2, 1, 0, 4, 8, 0, 1],
                vec![0, 7, 1, 0, 2, 1, 0, 3, 4, 3, 0, 4, 0, 0, 1, 1, 0, 9, 9, 9, 1, 3, 1],
                vec![1; 40],
                // a stream, then large DATA frames back to back
                vec![0, 0, 0, 0, 1, 0, 0, 0, 0, 11, 0, 7, 0, 9, 0, 200, 0, 8, 0, 100, 0],
            ];
            out.push((0..=255u8).collect());
            out
        }
        "xds_sotw" | "xds_delta" => {
            let mut out = vec![vec![0u8; 64], vec![1u8; 256]];
            out.push((0..=255u8).collect());
            out.push((0..512u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect());
            out
        }
        _ => Vec::new(),
    }
}

/// Runs target `name` on `data` (None: no such target). The xDS targets use `harness`.
pub fn run_target(name: &str, data: &[u8], harness: &XdsHarness) -> Option<()> {
    match name {
        "node" => node(data),
        "mesh_config" => mesh_config(data),
        "topology" => topology(data),
        "destination_rule" => destination_rule(data),
        "kube_object" => kube_object(data),
        "xds_sotw" => harness.sotw(data),
        "xds_delta" => harness.delta(data),
        "grpc_connection" => grpc_connection(data),
        _ => return None,
    }
    Some(())
}

// ---------------------------------------------------------------------------------------------
// The xDS protocol state machine
// ---------------------------------------------------------------------------------------------

/// meshfed's push loop on the demo, on a current-thread runtime, driving one in-process ADS stream per
/// input. Built once per fuzzing process (it takes a few milliseconds per input after that).
pub struct XdsHarness {
    rt: tokio::runtime::Runtime,
    push: PushHandle,
    events: mpsc::UnboundedSender<SourceEvent>,
    connections: Arc<Connections>,
    /// the demo's objects, to replay changes from
    objects: Vec<(meshfed::model::ClusterId, TopologyObject)>,
    /// meshfed in process, without listeners (the streams are driven directly)
    _app: meshfed::app::App,
    /// responses checked, and streams ended by an error status, over every input so far
    pub responses: std::sync::atomic::AtomicU64,
    pub refused: std::sync::atomic::AtomicU64,
}

/// Requests an input may send on one stream.
const MAX_STEPS: usize = 64;

const TYPE_URLS: &[&str] = &[
    meshfed::type_url::CLUSTER,
    meshfed::type_url::ENDPOINT,
    meshfed::type_url::LISTENER,
    meshfed::type_url::ROUTE,
    meshfed::type_url::TYPE_DEBUG_SYNCZ,
    meshfed::type_url::TYPE_DEBUG_CONFIG_DUMP,
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
    "",
];

const SEED_NAMES: &[&str] = &[
    "*",
    "",
    "outbound|9080||reviews.shop.svc.cluster.local",
    "outbound|9091||ratings.shop.svc.cluster.local",
    "9080",
    "8080",
    "reviews.shop.svc.cluster.local:9080",
    "client-0.shop",
    "eastwest-0.istio-system",
];

impl Default for XdsHarness {
    fn default() -> Self {
        Self::new()
    }
}

impl XdsHarness {
    pub fn new() -> XdsHarness {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        let (mut mesh, initial) = demo_events();
        // no debounce: a change is published as soon as it is translated
        mesh.debounce = meshfed::mesh_config::Debounce {
            quiet: std::time::Duration::ZERO,
            max: std::time::Duration::from_millis(1),
        };
        let objects = initial
            .iter()
            .flat_map(|e| match e {
                SourceEvent::Sync { cluster, objects } => {
                    objects.iter().map(|o| (cluster.clone(), o.clone())).collect::<Vec<_>>()
                }
                _ => Vec::new(),
            })
            .collect();
        let app = rt
            .block_on(meshfed::app::App::start(meshfed::app::Options::in_process(mesh, initial)))
            .expect("meshfed starts in process");
        XdsHarness {
            rt,
            push: app.push.clone(),
            events: app.events.clone(),
            connections: app.connections.clone(),
            objects,
            _app: app,
            responses: Default::default(),
            refused: Default::default(),
        }
    }

    /// A SotW stream driven by `data`.
    pub fn sotw(&self, data: &[u8]) {
        self.run(Flavor::Sotw, data)
    }

    /// A Delta stream driven by `data`.
    pub fn delta(&self, data: &[u8]) {
        self.run(Flavor::Delta, data)
    }

    fn run(&self, flavor: Flavor, data: &[u8]) {
        self.rt.block_on(self.drive(flavor, data));
        assert!(self.connections.is_empty(), "a finished stream leaves no connection behind");
    }

    async fn drive(&self, flavor: Flavor, data: &[u8]) {
        let mut input = Input::new(data);
        let peer = match input.below(10) {
            0 | 1 => PeerAuth::Workload(SpiffeId {
                trust_domain: "cluster.local".into(),
                namespace: input.pick(&["shop", "shop", "istio-system", "bank"]).to_string(),
                service_account: "default".into(),
            }),
            2 => PeerAuth::Unusable("fuzz".into()),
            _ => PeerAuth::Anonymous,
        };
        let limits = if input.below(8) == 0 {
            Limits { request_rate: 1, request_burst: 1 + input.below(8) as u32, ..Limits::default() }
        } else {
            Limits::unlimited()
        };
        let debug =
            meshfed::debug::config_dump::AdsDebug { connections: self.connections.clone(), push: self.push.clone() };
        let context = StreamContext {
            conn: Some(ConnState::for_peer(peer, limits)),
            slot: None,
            drain: None,
            debug: Some(Arc::new(debug)),
        };
        let (tx, mut rx) = mpsc::channel(256);
        let mut stream =
            Stream::new(flavor, self.push.clone(), self.connections.clone(), meshfed::xds::stream::Outbox::Channel(tx))
                .with_context(context);
        let mut seen = Seen::default();
        let mut first = true;
        for _ in 0..MAX_STEPS {
            if input.is_empty() {
                break;
            }
            let result = match input.below(10) {
                // a change in the mesh, then the push the stream makes of it
                0 => {
                    self.change(&mut input).await;
                    stream.handle_snapshot().await
                }
                _ => match flavor {
                    Flavor::Sotw => stream.handle_sotw(sotw_request(&mut input, &seen, first)).await,
                    Flavor::Delta => stream.handle_delta(delta_request(&mut input, &seen, first)).await,
                },
            };
            first = false;
            while let Ok(r) = rx.try_recv() {
                seen.check(flavor, r);
            }
            if let Err(status) = result {
                use tonic::Code::*;
                self.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                assert!(
                    matches!(status.code(), InvalidArgument | PermissionDenied | ResourceExhausted | Unavailable),
                    "unexpected status {status:?}"
                );
                break;
            }
        }
        drop(stream);
        while let Ok(r) = rx.try_recv() {
            seen.check(flavor, r);
        }
        self.responses.fetch_add(seen.nonces.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Applies one change to the demo (an object re-sent, changed or deleted) and waits until it is
    /// published.
    async fn change(&self, input: &mut Input<'_>) {
        if self.objects.is_empty() {
            return;
        }
        let (cluster, object) = &self.objects[input.below(self.objects.len())];
        let before = self.push.snapshot().generation;
        let event = match (input.below(3), object) {
            (0, o) => SourceEvent::Delete { cluster: cluster.clone(), key: o.key() },
            (1, TopologyObject::EndpointSlice(s)) => {
                let mut s = s.clone();
                if !s.endpoints.is_empty() {
                    let i = input.below(s.endpoints.len());
                    s.endpoints.remove(i);
                }
                SourceEvent::Upsert { cluster: cluster.clone(), object: TopologyObject::EndpointSlice(s) }
            }
            (_, o) => SourceEvent::Upsert { cluster: cluster.clone(), object: o.clone() },
        };
        if self.events.send(event).is_err() {
            return;
        }
        // a change that changes nothing publishes nothing: bound the wait
        let mut snaps = self.push.subscribe();
        let _ =
            tokio::time::timeout(std::time::Duration::from_millis(50), snaps.wait_for(|s| s.generation > before)).await;
    }
}

/// What a stream sent so far: to build plausible follow-up requests and check invariants.
#[derive(Default)]
struct Seen {
    nonces: Vec<String>,
    names: Vec<String>,
    versions: BTreeMap<String, String>,
    last_nonce: u64,
}

impl Seen {
    fn check(&mut self, flavor: Flavor, r: Result<Response, tonic::Status>) {
        let Ok(r) = r else { return };
        let bytes = r.encode_to_vec();
        assert_eq!(bytes.len(), r.encoded_len(), "the envelope's length is exact");
        let (nonce, names) = match flavor {
            Flavor::Sotw => {
                let d = DiscoveryResponse::decode(bytes.as_slice()).expect("a SotW response decodes");
                let mut names = Vec::new();
                let known = meshfed::type_url::ResourceType::from_type_url(&d.type_url).is_some();
                for any in &d.resources {
                    if known {
                        assert_eq!(any.type_url, d.type_url, "a resource of another type in a response");
                    }
                    if let Ok(Some(name)) = resource_name(&any.type_url, &any.value) {
                        names.push(name);
                    }
                }
                let unique: HashSet<&String> = names.iter().collect();
                assert_eq!(unique.len(), names.len(), "a SotW response names each resource once");
                (d.nonce, names)
            }
            Flavor::Delta => {
                let d = DeltaDiscoveryResponse::decode(bytes.as_slice()).expect("a Delta response decodes");
                let sent: HashSet<&str> = d.resources.iter().map(|r| r.name.as_str()).collect();
                assert_eq!(sent.len(), d.resources.len(), "a Delta response names each resource once");
                for removed in &d.removed_resources {
                    assert!(!sent.contains(removed.as_str()), "{removed} both sent and removed");
                }
                for res in &d.resources {
                    self.versions.insert(res.name.clone(), res.version.clone());
                }
                (d.nonce, d.resources.iter().map(|r| r.name.clone()).collect())
            }
        };
        let n: u64 = nonce.parse().expect("nonces are numbers");
        assert!(n > self.last_nonce, "nonces increase: {n} after {}", self.last_nonce);
        self.last_nonce = n;
        self.nonces.push(nonce);
        for name in names {
            if self.names.len() < 256 && !self.names.contains(&name) {
                self.names.push(name);
            }
        }
    }
}

fn pick_name(input: &mut Input<'_>, seen: &Seen) -> String {
    match input.below(8) {
        0 => input.string(24),
        1..=3 if !seen.names.is_empty() => seen.names[input.below(seen.names.len())].clone(),
        _ => input.pick(SEED_NAMES).to_string(),
    }
}

fn pick_nonce(input: &mut Input<'_>, seen: &Seen) -> String {
    match input.below(6) {
        0 => String::new(),
        1 => input.string(4),
        _ if !seen.nonces.is_empty() => {
            // mostly the latest, sometimes an older (stale) one
            let back = input.below(3).min(seen.nonces.len() - 1);
            seen.nonces[seen.nonces.len() - 1 - back].clone()
        }
        _ => String::new(),
    }
}

fn pick_node(input: &mut Input<'_>, first: bool) -> Option<Node> {
    if !first && input.below(4) != 0 {
        return None;
    }
    if input.below(8) == 0 {
        return structured_node(input).into();
    }
    let ns = *input.pick(&["shop", "shop", "istio-system", "bank"]);
    let kind = if ns == "istio-system" { "router" } else { "sidecar" };
    let meta: &[(&str, &str)] = match input.below(3) {
        0 => &[("CLUSTER_ID", "aws-use1"), ("NETWORK", "aws-net"), ("INTERCEPTION_MODE", "NONE")],
        1 => &[("CLUSTER_ID", "azure-weu"), ("GENERATOR", "grpc")],
        _ => &[("GENERATOR", "event")],
    };
    Some(crate::fixtures::node(&format!("{kind}~127.0.50.1~client-0.{ns}~{ns}.svc.cluster.local"), meta, None))
}

fn pick_error(input: &mut Input<'_>) -> Option<RpcStatus> {
    (input.below(5) == 0).then(|| nack_status(input.string(16)))
}

fn sotw_request(input: &mut Input<'_>, seen: &Seen, first: bool) -> DiscoveryRequest {
    let n = input.below(4);
    Request {
        node: pick_node(input, first),
        type_url: input.pick(TYPE_URLS).to_string(),
        version: if input.bool() { String::new() } else { input.string(16) },
        names: (0..n).map(|_| pick_name(input, seen)).collect(),
        nonce: pick_nonce(input, seen),
        error: pick_error(input),
        ..Request::default()
    }
    .sotw()
}

fn delta_request(input: &mut Input<'_>, seen: &Seen, first: bool) -> DeltaDiscoveryRequest {
    let (subs, unsubs, initial) = (input.below(4), input.below(3), input.below(4));
    let mut initial_versions = std::collections::HashMap::new();
    for _ in 0..initial {
        let name = pick_name(input, seen);
        let version = match seen.versions.get(&name) {
            Some(v) if input.bool() => v.clone(),
            _ => input.string(8),
        };
        initial_versions.insert(name, version);
    }
    Request {
        node: pick_node(input, first),
        type_url: input.pick(TYPE_URLS).to_string(),
        names: (0..subs).map(|_| pick_name(input, seen)).collect(),
        unsubscribe: (0..unsubs).map(|_| pick_name(input, seen)).collect(),
        initial_versions,
        nonce: pick_nonce(input, seen),
        error: pick_error(input),
        ..Request::default()
    }
    .delta()
}

// ---------------------------------------------------------------------------------------------
// The gRPC transport
// ---------------------------------------------------------------------------------------------

/// Echoes every request; a request starting with 0xff is answered with a 100 KB response (flow
/// control), one starting with 0xfe ends the stream with a status.
struct FuzzEcho;

impl meshfed::grpc::Handler for FuzzEcho {
    fn open(
        &mut self,
        head: meshfed::grpc::RequestHead,
        mut messages: meshfed::grpc::Messages,
        mut responses: meshfed::grpc::Responses,
    ) -> Result<meshfed::grpc::StreamFuture, tonic::Status> {
        if head.path.len().is_multiple_of(3) {
            return Err(tonic::Status::unimplemented("no such method"));
        }
        Ok(Box::pin(async move {
            while let Ok(Some(m)) = messages.message().await {
                let body = match m.first() {
                    Some(0xff) => bytes::Bytes::from(vec![7u8; 100_000]),
                    Some(0xfe) => {
                        responses.finish(13, "asked to fail \u{1f4a5}");
                        return;
                    }
                    _ => m,
                };
                let mut prefix = bytes::BytesMut::with_capacity(5);
                bytes::BufMut::put_u8(&mut prefix, 0);
                bytes::BufMut::put_u32(&mut prefix, body.len() as u32);
                if responses.send([prefix.freeze(), body].into()).await.is_err() {
                    return;
                }
            }
            responses.finish(0, "");
        }))
    }
}

static GRPC_RUNTIME: std::sync::LazyLock<tokio::runtime::Runtime> = std::sync::LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime")
});

/// Builds a client's bytes from `data`: mostly well-formed HTTP/2 frames with fuzzed fields (so that the
/// connection gets past its preface and into streams, flow control and messages), some raw bytes.
fn grpc_client_bytes(data: &[u8]) -> Vec<Vec<u8>> {
    use meshfed::grpc::frame::{self, Head, flag, kind};
    let mut input = Input::new(data);
    let mut out = Vec::new();
    let mut cur = bytes::BytesMut::new();
    if input.byte() & 0x0f != 0x0f {
        cur.extend_from_slice(frame::PREFACE);
        frame::settings(&mut cur, &[]);
    }
    let mut hpack = loona_hpack::Encoder::new();
    let stream_ids = [1u32, 3, 5, 2, 0, 7];
    let paths: [&[u8]; 3] = [b"/envoy.service.discovery.v3.AggregatedDiscoveryService/X", b"/test.Echo/Echoes", b"/a"];
    while !input.is_empty() && out.len() < 64 {
        let stream = *input.pick(&stream_ids);
        let flags = input.byte();
        match input.below(13) {
            0 => cur.extend_from_slice(input.string(64).as_bytes()),
            1 | 2 => {
                let method: &[u8] = if input.below(8) == 0 { b"GET" } else { b"POST" };
                let ctype: &[u8] = if input.below(8) == 0 { b"text/plain" } else { b"application/grpc" };
                let path = *input.pick(&paths);
                let headers: Vec<(&[u8], &[u8])> = vec![
                    (b":method", method),
                    (b":scheme", b"http"),
                    (b":path", path),
                    (b"content-type", ctype),
                    (b"te", b"trailers"),
                ];
                let block = hpack.encode(headers.iter().copied());
                let split = input.below(block.len() + 1);
                let first_flags = (flags & (flag::END_STREAM | flag::PADDED | flag::PRIORITY))
                    | if split == block.len() { flag::END_HEADERS } else { 0 };
                let mut payload = Vec::new();
                if first_flags & flag::PADDED != 0 {
                    payload.push(2);
                }
                if first_flags & flag::PRIORITY != 0 {
                    payload.extend_from_slice(&[0, 0, 0, 0, 16]);
                }
                payload.extend_from_slice(&block[..split]);
                if first_flags & flag::PADDED != 0 {
                    payload.extend_from_slice(&[0, 0]);
                }
                Head { len: payload.len() as u32, kind: kind::HEADERS, flags: first_flags, stream }.encode(&mut cur);
                cur.extend_from_slice(&payload);
                if split < block.len() {
                    Head {
                        len: (block.len() - split) as u32,
                        kind: kind::CONTINUATION,
                        flags: flag::END_HEADERS,
                        stream,
                    }
                    .encode(&mut cur);
                    cur.extend_from_slice(&block[split..]);
                }
            }
            3 | 4 => {
                // DATA: gRPC messages, whole or cut, sometimes with a length that lies
                let body = if input.below(12) == 0 {
                    vec![0xff; 9_000 + input.below(56_000)]
                } else {
                    input.string(32).into_bytes()
                };
                let mut msg = vec![if input.below(16) == 0 { 1 } else { 0 }];
                let len = if input.below(8) == 0 { input.below(70_000) as u32 } else { body.len() as u32 };
                msg.extend_from_slice(&len.to_be_bytes());
                msg.extend_from_slice(&body);
                let cut = msg.len() - input.below(msg.len().min(8) + 1);
                let flags = flags & flag::END_STREAM;
                Head { len: cut as u32, kind: kind::DATA, flags, stream }.encode(&mut cur);
                cur.extend_from_slice(&msg[..cut]);
            }
            5 => frame::window_update(&mut cur, stream % 2, (input.below(70_000) as u32) << input.below(16)),
            6 => {
                let params = [
                    (1u16, 4096u32),
                    (3, 1),
                    (4, input.below(1 << 16) as u32),
                    (5, 16_384 + input.below(9) as u32 * 1000),
                    (9, 1),
                ];
                let n = input.below(params.len() + 1);
                frame::settings(&mut cur, &params[..n]);
            }
            7 => frame::ping(&mut cur, flags & 1 == 1, [flags; 8]),
            8 => frame::rst_stream(&mut cur, stream, frame::Reason::Cancel),
            9 => frame::goaway(&mut cur, stream, frame::Reason::NoError, b"fuzz"),
            10 => {
                let len = input.below(40);
                Head { len: len as u32, kind: input.byte() % 12, flags, stream }.encode(&mut cur);
                cur.extend_from_slice(&vec![flags; len]);
            }
            11 => {
                // large frames back to back: the read buffer holds the end of one and part of the next
                for _ in 0..2 + input.below(3) {
                    let len = 8_000 + input.below(57_000);
                    Head { len: len as u32, kind: kind::DATA, flags: 0, stream }.encode(&mut cur);
                    cur.extend_from_slice(&vec![0; len]);
                }
            }
            _ => out.push(std::mem::take(&mut cur).to_vec()),
        }
    }
    out.push(cur.to_vec());
    out
}

/// Feeds a connection of the gRPC transport a client built from `data`, reading whatever it answers,
/// then closes the client's side: the connection must never panic and must end in bounded time.
pub fn grpc_connection(data: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let writes = grpc_client_bytes(data);
    GRPC_RUNTIME.block_on(async {
        let (mut client, server) = tokio::io::duplex(16 * 1024);
        let config = meshfed::grpc::Config {
            max_concurrent_streams: 3,
            max_message_size: 50_000,
            stream_window: 70_000,
            connection_window: 100_000,
            max_frame_size: 65_535,
            max_header_list_size: 2048,
            keepalive_interval: Some(std::time::Duration::from_millis(20)),
            keepalive_timeout: std::time::Duration::from_millis(20),
        };
        let conn = tokio::spawn(meshfed::grpc::serve(server, FuzzEcho, Arc::new(config), std::future::pending()));
        let (mut rd, mut wr) = tokio::io::split(&mut client);
        let reader = async {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        let writer = async {
            for w in writes {
                if wr.write_all(&w).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let _ = wr.shutdown().await;
        };
        let both = async { tokio::join!(reader, writer) };
        // the server answers (or closes) and the connection ends once the client's side is closed
        let ended = tokio::time::timeout(std::time::Duration::from_secs(8), async {
            both.await;
            conn.await
        })
        .await;
        match ended {
            Ok(Ok(_)) => {}
            Ok(Err(join)) => std::panic::resume_unwind(join.into_panic()),
            Err(_) => panic!("the connection did not end after its client closed"),
        }
    });
}
