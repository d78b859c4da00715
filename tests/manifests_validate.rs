//! The deployment manifests, as `kubectl kustomize` renders each overlay of `manifests/overlays/`
//! (`tests/rendered/`): valid against the Kubernetes 1.33 schemas (offline, with the PyPI package
//! `kubernetes-validate`, which ships them), custom resources (ServiceMonitor) complete and consistent
//! with what they refer to, meshfed parses each overlay's mesh config and the overlays differ only in
//! what makes each cloud itself, the RBAC rules grant list/watch on exactly the kinds the Kubernetes
//! source reads, the Deployment serves xDS over mTLS only with the pod's mesh certificate, and the
//! NetworkPolicy admits exactly the ports each client needs. The last test runs `meshfed serve` with the
//! Deployment's own arguments.
//!
//! `kubernetes-validate` is `$MESHFED_KUBERNETES_VALIDATE`, else `<crate>/.venv/bin/kubernetes-validate`;
//! kubectl is `$MESHFED_KUBECTL`, else `kubectl` on the PATH. A missing tool fails the test (it never
//! skips).

use meshfed_testkit as support;

mod rendered;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshfed::mesh_config::{ClusterSource, MeshConfig};
use meshfed::source::kube::WatchedKind;
use rendered::{Rendered, overlays};
use serde_yaml::Value;

const KUBERNETES_VERSION: &str = "1.33.0";

fn str_seq(v: &Value) -> Vec<&str> {
    v.as_sequence().into_iter().flatten().filter_map(Value::as_str).collect()
}

#[test]
fn overlays_validate_against_the_kubernetes_schemas() {
    let tool = rendered::venv_tool("MESHFED_KUBERNETES_VALIDATE", "kubernetes-validate");
    let dir = tempfile::tempdir().unwrap();
    let files = rendered::write_renderings(dir.path());
    let (ok, stdout, stderr) = rendered::run(
        "kubernetes-validate",
        Command::new(&tool).args(["--kubernetes-version", KUBERNETES_VERSION, "--strict"]).args(&files),
    );
    let text = format!("{stdout}{stderr}");
    assert!(ok, "kubernetes-validate failed:\n{text}");

    // every built-in object passed; the only ones without a schema are the custom resources
    for (o, file) in overlays().iter().zip(&files) {
        let file = file.display().to_string();
        let passed: BTreeSet<String> = text
            .lines()
            .filter(|l| l.contains(&file))
            .filter_map(|l| l.split(" passed for resource ").nth(1))
            .filter_map(|rest| rest.split(' ').next())
            .map(str::to_string)
            .collect();
        let unknown: BTreeSet<String> = text
            .lines()
            .filter(|l| l.contains(&file))
            .filter_map(|l| l.split("Couldn't find schema for kind ").nth(1))
            .filter_map(|rest| rest.split(' ').next())
            .map(str::to_string)
            .collect();
        let (custom, builtin): (Vec<&Value>, Vec<&Value>) = o.objects.iter().partition(|v| Rendered::is_custom(v));
        let expect_passed: BTreeSet<String> = builtin
            .iter()
            .map(|v| {
                let kind = v["kind"].as_str().expect("kind").to_lowercase();
                format!("{kind}/{}", v["metadata"]["name"].as_str().expect("name"))
            })
            .collect();
        assert_eq!(passed, expect_passed, "overlay {}:\n{text}", o.id);
        assert_eq!(passed.len(), builtin.len(), "overlay {}: a name twice?", o.id);
        let custom_kinds: BTreeSet<String> = custom.iter().map(|v| v["kind"].as_str().unwrap().to_string()).collect();
        assert_eq!(unknown, custom_kinds, "overlay {}:\n{text}", o.id);
        assert!(custom_kinds.contains("ServiceMonitor"), "overlay {}", o.id);
    }
}

/// The Kubernetes schemas do not know custom resources: each has what the API server requires of any
/// object (apiVersion GROUP/VERSION, kind, a name and namespace), a non-empty spec, and nothing but
/// those top-level fields.
#[test]
fn custom_resources_are_complete() {
    for o in overlays() {
        let custom: Vec<&Value> = o.objects.iter().filter(|v| Rendered::is_custom(v)).collect();
        assert!(!custom.is_empty(), "overlay {}", o.id);
        for v in custom {
            let api_version = v["apiVersion"].as_str().expect("apiVersion");
            let (group, version) = api_version.split_once('/').expect("GROUP/VERSION");
            assert!(!group.is_empty() && version.starts_with('v'), "{api_version}");
            assert!(v["kind"].as_str().is_some_and(|k| k.starts_with(char::is_uppercase)), "{v:?}");
            assert!(v["metadata"]["name"].as_str().is_some_and(|n| !n.is_empty()), "{v:?}");
            assert_eq!(v["metadata"]["namespace"].as_str(), Some("istio-system"), "{v:?}");
            assert!(v["spec"].as_mapping().is_some_and(|s| !s.is_empty()), "{v:?}");
            let keys: BTreeSet<&str> = v.as_mapping().unwrap().keys().filter_map(Value::as_str).collect();
            assert_eq!(keys, BTreeSet::from(["apiVersion", "kind", "metadata", "spec"]), "{v:?}");
        }
    }
}

/// The alerting rules name only metrics meshfed exports (the names of its own `/metrics`, all families
/// registered from the start), and each alert has a severity and a summary.
#[test]
fn the_alerts_use_metrics_meshfed_exports() {
    // a registry with a sample in every family (a labelled family shows only once it has one)
    let m = meshfed::metrics::Metrics::new();
    let t = meshfed::type_url::ResourceType::Endpoint;
    m.record_nack(t);
    m.record_unknown_resources(t, 1);
    m.record_response(t, 1, 1, true);
    m.record_push(&[(t, 1)], Duration::from_millis(1), 0);
    m.set_gateway_evidence(&[("net".into(), "10.0.0.1:15443".into(), true)], &[("net".into(), false)]);
    let mut status = meshfed::source::ClusterStatus::new(meshfed::model::ClusterId::new("c"), "test");
    status.restored_from = Some(std::time::SystemTime::now());
    m.refresh(&[], 1, &[status]);
    let exported: BTreeSet<String> = m
        .encode()
        .expect("metrics encode")
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    // Prometheus's own series and functions
    let prometheus: BTreeSet<&str> = ["up", "max", "min", "sum", "by", "increase", "absent"].into();
    for o in overlays() {
        let rule = o.find("PrometheusRule", "meshfed");
        let rules = rule["spec"]["groups"][0]["rules"].as_sequence().expect("rules");
        assert!(rules.len() >= 5, "{rules:?}");
        for r in rules {
            let alert = r["alert"].as_str().expect("alert name");
            assert!(matches!(r["labels"]["severity"].as_str(), Some("warning" | "critical")), "{alert}");
            assert!(r["annotations"]["summary"].as_str().is_some_and(|s| !s.is_empty()), "{alert}");
            let expr = r["expr"].as_str().expect("expr");
            // identifiers outside label matchers, ranges, strings and `by (...)` groupings: metric names,
            // functions and keywords
            let mut outside = String::new();
            let mut rest = expr;
            while let Some(c) = rest.chars().next() {
                let close = match c {
                    '{' => Some('}'),
                    '[' => Some(']'),
                    '"' => Some('"'),
                    _ if rest.starts_with("by (") => Some(')'),
                    _ => None,
                };
                match close {
                    Some(close) => {
                        let from = if c == 'b' { 4 } else { 1 };
                        let end = rest[from..].find(close).map(|i| from + i + 1).expect("balanced");
                        rest = &rest[end..];
                        outside.push(' ');
                    }
                    None => {
                        outside.push(c);
                        rest = &rest[c.len_utf8()..];
                    }
                }
            }
            let names: Vec<&str> = outside
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
                .collect();
            let metrics: Vec<&&str> = names.iter().filter(|n| !prometheus.contains(**n)).collect();
            assert!(!metrics.is_empty() || names.contains(&"up"), "{alert}: no metric in {expr:?}");
            for m in metrics {
                assert!(exported.contains(*m), "{alert}: {m} is not a metric meshfed exports ({exported:?})");
            }
        }
    }
}

/// Prometheus scrapes /metrics of the Service's debug port with the token meshfed requires there.
#[test]
fn the_service_monitor_scrapes_the_debug_port_with_the_token() {
    for o in overlays() {
        let monitor = o.find("ServiceMonitor", "meshfed");
        assert_eq!(monitor["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
        let service = o.find("Service", "meshfed");
        let selector = monitor["spec"]["selector"]["matchLabels"].as_mapping().expect("matchLabels");
        for (k, v) in selector {
            assert_eq!(&service["metadata"]["labels"][k], v, "the ServiceMonitor selects the Service");
        }
        assert_eq!(str_seq(&monitor["spec"]["namespaceSelector"]["matchNames"]), ["istio-system"]);
        let endpoints = monitor["spec"]["endpoints"].as_sequence().expect("endpoints");
        assert_eq!(endpoints.len(), 1);
        let e = &endpoints[0];
        let port = e["port"].as_str().expect("port name");
        let service_port = service["spec"]["ports"]
            .as_sequence()
            .and_then(|ps| ps.iter().find(|p| p["name"].as_str() == Some(port)))
            .unwrap_or_else(|| panic!("the Service has no port {port}"));
        assert_eq!(service_port["port"].as_u64(), Some(15014));
        assert_eq!(e["path"].as_str(), Some("/metrics"));

        // the token: the Secret and key meshfed reads (--debug-token-file is that key of that Secret)
        assert_eq!(e["authorization"]["type"].as_str(), Some("Bearer"));
        let secret = e["authorization"]["credentials"]["name"].as_str().expect("credentials.name");
        let key = e["authorization"]["credentials"]["key"].as_str().expect("credentials.key");
        let args = o.args();
        let token_file = args.iter().find_map(|a| a.strip_prefix("--debug-token-file=")).expect("--debug-token-file");
        let (dir, file) = token_file.rsplit_once('/').unwrap();
        assert_eq!(file, key);
        assert_eq!(o.volume_at(dir)["secret"]["secretName"].as_str(), Some(secret));
    }
}

#[test]
fn meshfed_parses_each_overlays_mesh_config() {
    let mut parsed = Vec::new();
    for o in overlays() {
        // the ConfigMap comes from the overlay's configMapGenerator: its name carries a hash of the
        // content, and the Deployment refers to that name
        let cms = o.all("ConfigMap");
        assert_eq!(cms.len(), 1, "overlay {}", o.id);
        let cm = cms[0];
        let name = cm["metadata"]["name"].as_str().unwrap();
        assert!(name.starts_with("meshfed-mesh-") && name.len() > "meshfed-mesh-".len(), "{name}");
        assert_eq!(cm["metadata"]["namespace"].as_str(), Some("istio-system"));
        let args = o.args();
        assert!(args.contains(&"--mesh-config=/etc/meshfed/mesh.yaml"), "{args:?}");
        assert_eq!(o.volume_at("/etc/meshfed")["configMap"]["name"].as_str(), Some(name));

        let text = cm["data"]["mesh.yaml"].as_str().expect("data.mesh.yaml");
        let mesh = MeshConfig::parse(text, Path::new("/etc/meshfed"))
            .unwrap_or_else(|e| panic!("overlay {}: the mesh config is invalid: {e}", o.id));
        assert_eq!(mesh.clusters.len(), 1);
        assert_eq!(mesh.clusters[0].id.as_str(), o.id);
        assert_eq!(mesh.clusters[0].network.as_str(), o.network);
        assert_eq!(mesh.clusters[0].source, ClusterSource::InCluster);
        let rs = mesh.remote_secrets.as_ref().expect("remote secrets");
        assert_eq!((rs.config_cluster.as_str(), rs.namespace.as_str()), (o.id, "istio-system"));
        assert_eq!(mesh.ready_timeout, Duration::from_secs(30));
        // the last-known state is kept on the Deployment's state volume
        let state = mesh.last_known_state.as_ref().expect("lastKnownState on");
        let dir = state.path.parent().and_then(Path::to_str).expect("a directory");
        assert!(o.volume_at(dir)["emptyDir"].is_mapping(), "overlay {}: {dir} is the state volume", o.id);
        assert_eq!(mesh.defaults.locality_lb.failover.len(), 2, "overlay {}: failover between the clouds", o.id);
        // data-plane evidence on, at the defaults (the NetworkPolicy admits the probes' ports)
        assert_eq!(mesh.gateway_probes, Some(Default::default()), "overlay {}: gatewayProbes at the defaults", o.id);
        // the traffic policy every replica of this cloud follows: the TrafficPolicy in its own cluster
        let tp = mesh.traffic_policy.as_ref().expect("trafficPolicy on");
        assert_eq!((tp.cluster.as_str(), tp.namespace.as_str(), tp.name.as_str()), (o.id, "istio-system", "default"));
        parsed.push(mesh);
    }
    // every cloud's meshfed serves the same mesh: the configs differ only in which cluster is local (and
    // so where its TrafficPolicy is)
    let mut same = parsed.iter().cloned().map(|mut m| {
        m.clusters.clear();
        m.remote_secrets = None;
        m.traffic_policy = None;
        m
    });
    let first = same.next().unwrap();
    for other in same {
        assert_eq!(other, first);
    }
}

/// Each overlay runs three replicas in its own cloud's three zones, one per zone, one at a time down.
#[test]
fn each_overlay_spreads_its_replicas_over_its_clouds_zones() {
    for o in overlays() {
        let deploy = o.deployment();
        assert_eq!(deploy["spec"]["replicas"].as_u64(), Some(o.zones.len() as u64), "one replica per zone");
        let pod = &deploy["spec"]["template"]["spec"];
        let terms =
            pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
                .as_sequence()
                .expect("a required node affinity");
        assert_eq!(terms.len(), 1);
        let exprs = terms[0]["matchExpressions"].as_sequence().unwrap();
        assert_eq!(exprs.len(), 1);
        assert_eq!(exprs[0]["key"].as_str(), Some("topology.kubernetes.io/zone"));
        assert_eq!(exprs[0]["operator"].as_str(), Some("In"));
        assert_eq!(str_seq(&exprs[0]["values"]), o.zones, "overlay {}", o.id);

        let spread = pod["topologySpreadConstraints"].as_sequence().expect("topologySpreadConstraints");
        let zone = spread
            .iter()
            .find(|c| c["topologyKey"].as_str() == Some("topology.kubernetes.io/zone"))
            .expect("spread over zones");
        assert_eq!(zone["maxSkew"].as_u64(), Some(1));
        assert_eq!(zone["whenUnsatisfiable"].as_str(), Some("DoNotSchedule"));
        assert_eq!(zone["labelSelector"]["matchLabels"], deploy["spec"]["selector"]["matchLabels"]);

        let pdb = o.find("PodDisruptionBudget", "meshfed");
        assert_eq!(pdb["spec"]["maxUnavailable"].as_u64(), Some(1));
        assert_eq!(pdb["spec"]["selector"], deploy["spec"]["selector"]);
        let resources = &o.container()["resources"];
        assert!(resources["requests"]["cpu"].is_string() && resources["requests"]["memory"].is_string());
        assert!(resources["limits"]["memory"].is_string());
    }
}

/// (apiGroup, resource, verbs) of every rule.
fn rules(role: &Value) -> BTreeSet<(String, String, Vec<String>)> {
    let mut out = BTreeSet::new();
    for r in role["rules"].as_sequence().expect("rules") {
        let verbs: Vec<String> = str_seq(&r["verbs"]).into_iter().map(str::to_string).collect();
        for g in r["apiGroups"].as_sequence().expect("apiGroups") {
            for res in r["resources"].as_sequence().expect("resources") {
                out.insert((g.as_str().unwrap_or("").into(), res.as_str().unwrap_or("").into(), verbs.clone()));
            }
        }
    }
    out
}

#[test]
fn rbac_grants_list_watch_on_exactly_what_is_read() {
    let read: BTreeSet<(String, String, Vec<String>)> = WatchedKind::ALL
        .iter()
        .map(|k| {
            let ar = k.api_resource();
            (ar.group, ar.plural, vec!["list".to_string(), "watch".to_string()])
        })
        .collect();
    for o in overlays() {
        assert_eq!(rules(o.find("ClusterRole", "meshfed-config")), read);
        assert_eq!(rules(o.find("ClusterRole", "meshfed-reader")), read);
        let secrets = o.find("Role", "meshfed-remote-secrets");
        assert_eq!(secrets["metadata"]["namespace"].as_str(), Some("istio-system"));
        assert_eq!(rules(secrets), [("".into(), "secrets".into(), vec!["list".into(), "watch".into()])].into());
        // the TrafficPolicy: read, and patched to record the drills meshfed aborted
        let traffic = o.find("Role", "meshfed-traffic-policy");
        assert_eq!(traffic["metadata"]["namespace"].as_str(), Some("istio-system"));
        assert_eq!(
            rules(traffic),
            [("meshfed.io".into(), "trafficpolicies".into(), vec!["list".into(), "watch".into(), "patch".into()])]
                .into()
        );
        // the operators' role (bound by the site) edits the TrafficPolicy, and nothing else
        let operator = o.find("Role", "meshfed-traffic-operator");
        let verbs: Vec<String> = ["get", "list", "watch", "create", "patch"].map(String::from).to_vec();
        assert_eq!(rules(operator), [("meshfed.io".into(), "trafficpolicies".into(), verbs)].into());
        // everything else only reads (the traffic policy role's patch is checked above)
        let writers = [Some("meshfed-traffic-operator"), Some("meshfed-traffic-policy")];
        for obj in o.objects.iter().filter(|obj| !writers.contains(&obj["metadata"]["name"].as_str())) {
            let verbs = obj["rules"]
                .as_sequence()
                .into_iter()
                .flatten()
                .flat_map(|r| r["verbs"].as_sequence().into_iter().flatten());
            for v in verbs {
                assert!(matches!(v.as_str(), Some("list" | "watch")), "only list/watch: {obj:?}");
            }
        }
        // the bindings bind those roles to meshfed's service accounts
        for (kind, name, sa) in [
            ("ClusterRoleBinding", "meshfed-config", "meshfed"),
            ("RoleBinding", "meshfed-remote-secrets", "meshfed"),
            ("RoleBinding", "meshfed-traffic-policy", "meshfed"),
            ("ClusterRoleBinding", "meshfed-reader", "meshfed-reader"),
        ] {
            let b = o.find(kind, name);
            assert_eq!(b["roleRef"]["name"].as_str(), Some(name));
            let subjects = b["subjects"].as_sequence().unwrap();
            assert_eq!(subjects.len(), 1);
            assert_eq!(subjects[0]["kind"].as_str(), Some("ServiceAccount"));
            assert_eq!(subjects[0]["name"].as_str(), Some(sa));
            assert_eq!(subjects[0]["namespace"].as_str(), Some("istio-system"));
        }
    }
}

/// The mesh certificate's files, where the Istio agent writes them (OUTPUT_CERTS) and meshfed reads
/// them; plaintext xDS off; the Kubernetes token in the meshfed container only.
#[test]
fn the_deployment_serves_xds_over_mtls_with_the_pods_mesh_certificate() {
    for o in overlays() {
        let deploy = o.deployment();
        let template = &deploy["spec"]["template"];
        let labels = &template["metadata"]["labels"];
        let annotations = &template["metadata"]["annotations"];
        assert_eq!(labels["sidecar.istio.io/inject"].as_str(), Some("true"), "the agent is injected");
        // no interception by that sidecar, and the kubelet probes meshfed itself
        assert_eq!(annotations["traffic.sidecar.istio.io/includeInboundPorts"].as_str(), Some(""));
        assert_eq!(annotations["traffic.sidecar.istio.io/includeOutboundIPRanges"].as_str(), Some(""));
        assert_eq!(annotations["sidecar.istio.io/rewriteAppHTTPProbers"].as_str(), Some("false"));

        let proxy_config: Value =
            serde_yaml::from_str(annotations["proxy.istio.io/config"].as_str().expect("proxy.istio.io/config"))
                .expect("proxy.istio.io/config is YAML");
        let out_dir = proxy_config["proxyMetadata"]["OUTPUT_CERTS"].as_str().expect("OUTPUT_CERTS");
        assert_eq!(proxy_config["holdApplicationUntilProxyStarts"].as_bool(), Some(true));
        let user_mounts: Value = serde_json::from_str(
            annotations["sidecar.istio.io/userVolumeMount"].as_str().expect("sidecar.istio.io/userVolumeMount"),
        )
        .map(|j: serde_json::Value| serde_yaml::to_value(j).unwrap())
        .expect("userVolumeMount is JSON");
        let user_mounts = user_mounts.as_sequence().expect("a JSON array");
        assert_eq!(user_mounts.len(), 1);
        assert_eq!(user_mounts[0]["mountPath"].as_str(), Some(out_dir), "the agent writes where it mounts");
        let volume = o.volume_at(out_dir);
        assert_eq!(user_mounts[0]["name"], volume["name"], "the agent and meshfed share one volume");
        assert_eq!(volume["emptyDir"]["medium"].as_str(), Some("Memory"), "the key stays off disk");

        let args = o.args();
        for (flag, file) in
            [("--xds-tls-cert", "cert-chain.pem"), ("--xds-tls-key", "key.pem"), ("--xds-client-ca", "root-cert.pem")]
        {
            assert!(args.contains(&format!("{flag}={out_dir}/{file}").as_str()), "{flag}: {args:?}");
        }
        assert!(args.contains(&"--no-plaintext-xds"), "{args:?}");
        assert!(!args.iter().any(|a| a.starts_with("--xds-address")), "no plaintext address: {args:?}");
        assert!(args.contains(&"--xds-tls-address=0.0.0.0:15012"), "{args:?}");
        assert!(args.contains(&"--debug-address=0.0.0.0:15014") && args.contains(&"--debug-expose"), "{args:?}");
        assert!(args.iter().any(|a| a.starts_with("--debug-token-file=")), "the debug token is required");

        // the mounts meshfed only reads are read-only, and so is the root file system
        let c = o.container();
        for m in c["volumeMounts"].as_sequence().unwrap() {
            if !matches!(m["mountPath"].as_str(), Some("/tmp" | "/var/lib/meshfed")) {
                assert_eq!(m["readOnly"].as_bool(), Some(true), "{m:?}");
            }
        }
        assert!(o.volume_at("/tmp")["emptyDir"].is_mapping());
        assert!(o.volume_at("/var/lib/meshfed")["emptyDir"].is_mapping(), "the last-known state's volume");
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
        assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
        assert_eq!(str_seq(&sc["capabilities"]["drop"]), ["ALL"]);
        let pod = &template["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
        assert!(pod["securityContext"]["runAsUser"].as_u64().is_some_and(|u| u >= 10000));

        // the Kubernetes API token is mounted into the meshfed container alone, where kube-rs looks
        assert_eq!(pod["serviceAccountName"].as_str(), Some("meshfed"));
        assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
        let sources = o.volume_at("/var/run/secrets/kubernetes.io/serviceaccount")["projected"]["sources"]
            .as_sequence()
            .expect("a projected volume");
        let paths: BTreeSet<&str> = sources
            .iter()
            .flat_map(|s| {
                let token = s["serviceAccountToken"]["path"].as_str();
                let items = [&s["configMap"]["items"], &s["downwardAPI"]["items"]]
                    .into_iter()
                    .flat_map(|i| i.as_sequence().into_iter().flatten())
                    .filter_map(|i| i["path"].as_str());
                token.into_iter().chain(items)
            })
            .collect();
        assert_eq!(paths, BTreeSet::from(["token", "ca.crt", "namespace"]));

        // the Service exposes the TLS port (opaque to meshed clients' sidecars) and the debug port
        let service = o.find("Service", "meshfed");
        let ports: BTreeMap<&str, (u64, &str)> = service["spec"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| (p["name"].as_str().unwrap(), (p["port"].as_u64().unwrap(), p["appProtocol"].as_str().unwrap())))
            .collect();
        assert_eq!(
            ports,
            BTreeMap::from([
                ("tcp-xds-tls", (15012, "tcp")),
                ("http-debug", (15014, "http")),
                ("http-global", (15016, "http"))
            ])
        );
    }
}

/// A NetworkPolicy rule: its (port, protocol)s, and its peers, each written as compact JSON.
type PolicyRule = (BTreeSet<(u64, String)>, Vec<String>);

/// The ingress or egress rules of a NetworkPolicy.
fn policy_rules(rules: &Value, peers_key: &str) -> Vec<PolicyRule> {
    rules
        .as_sequence()
        .expect("rules")
        .iter()
        .map(|r| {
            let ports = r["ports"]
                .as_sequence()
                .expect("every rule names its ports")
                .iter()
                .map(|p| (p["port"].as_u64().unwrap(), p["protocol"].as_str().unwrap().to_string()))
                .collect();
            let peers = r[peers_key]
                .as_sequence()
                .expect("every rule names its peers")
                .iter()
                .map(|p| serde_json::to_string(&serde_json::to_value(p).unwrap()).unwrap())
                .collect();
            (ports, peers)
        })
        .collect()
}

fn tcp(ports: &[u64]) -> BTreeSet<(u64, String)> {
    ports.iter().map(|p| (*p, "TCP".to_string())).collect()
}

#[test]
fn the_network_policy_admits_exactly_what_each_client_needs() {
    let ns =
        |name: &str| format!(r#"{{"namespaceSelector":{{"matchLabels":{{"kubernetes.io/metadata.name":"{name}"}}}}}}"#);
    for o in overlays() {
        let np = o.find("NetworkPolicy", "meshfed");
        assert_eq!(np["spec"]["podSelector"], o.deployment()["spec"]["selector"]);
        assert_eq!(str_seq(&np["spec"]["policyTypes"]), ["Ingress", "Egress"]);

        let ingress = policy_rules(&np["spec"]["ingress"], "from");
        let by_port: BTreeMap<u64, &Vec<String>> =
            ingress.iter().map(|(ports, peers)| (ports.iter().next().unwrap().0, peers)).collect();
        assert!(ingress.iter().all(|(ports, _)| ports.len() == 1), "one port per rule: {ingress:?}");
        assert_eq!(by_port.keys().copied().collect::<Vec<_>>(), [15012, 15014, 15016, 15020], "{ingress:?}");
        // xDS: any namespace's pods with a sidecar or a gateway, and namespaces with injection on
        let xds = by_port[&15012];
        assert!(xds.contains(
            &r#"{"namespaceSelector":{},"podSelector":{"matchExpressions":[{"key":"security.istio.io/tlsMode","operator":"Exists"}]}}"#
                .to_string()
        ));
        assert!(xds.contains(
            &r#"{"namespaceSelector":{},"podSelector":{"matchLabels":{"sidecar.istio.io/inject":"true"}}}"#.to_string()
        ));
        assert!(xds.contains(&r#"{"namespaceSelector":{"matchLabels":{"istio-injection":"enabled"}}}"#.to_string()));
        assert!(xds.iter().all(|p| !p.contains("ipBlock")), "{xds:?}");
        // debug and metrics: Prometheus and istio-system only; the agent's metrics: Prometheus only
        assert_eq!(*by_port[&15014], vec![ns("monitoring"), ns("istio-system")]);
        assert_eq!(*by_port[&15020], vec![ns("monitoring")]);
        // global DNS health: the providers' checkers, through the load balancer, from anywhere
        assert_eq!(
            *by_port[&15016],
            vec![r#"{"ipBlock":{"cidr":"0.0.0.0/0"}}"#.to_string(), r#"{"ipBlock":{"cidr":"::/0"}}"#.to_string()]
        );
        // every port the Service offers is admitted
        for p in o.find("Service", "meshfed")["spec"]["ports"].as_sequence().unwrap() {
            assert!(by_port.contains_key(&p["port"].as_u64().unwrap()), "{p:?}");
        }

        let egress = policy_rules(&np["spec"]["egress"], "to");
        let dns = r#"{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"kube-system"}},"podSelector":{"matchLabels":{"k8s-app":"kube-dns"}}}"#;
        let istiod = r#"{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"istio-system"}},"podSelector":{"matchLabels":{"app":"istiod"}}}"#;
        let anywhere =
            vec![r#"{"ipBlock":{"cidr":"0.0.0.0/0"}}"#.to_string(), r#"{"ipBlock":{"cidr":"::/0"}}"#.to_string()];
        let dns_ports: BTreeSet<(u64, String)> = [(53, "UDP".to_string()), (53, "TCP".to_string())].into();
        assert_eq!(
            egress,
            vec![
                (dns_ports, vec![dns.to_string()]),
                (tcp(&[15012]), vec![istiod.to_string()]),
                (tcp(&[443]), anywhere.clone()),
                // gatewayProbes (on in both overlays): the east-west gateways' TLS and status ports
                (tcp(&[15443, 15021]), anywhere)
            ]
        );
    }
}

// ---- meshfed with the Deployment's arguments ----

/// The arguments of the Deployment, with each mounted directory replaced by a directory of the test
/// and the listen addresses by free loopback ports.
fn local_args(o: &Rendered, mounts: &BTreeMap<&str, &Path>, xds: SocketAddr, debug: SocketAddr) -> Vec<String> {
    o.args()
        .iter()
        .map(|a| {
            let mut a = a
                .replace("0.0.0.0:15012", &xds.to_string())
                .replace("0.0.0.0:15014", &debug.to_string())
                .replace("0.0.0.0:15016", "127.0.0.1:0");
            for (mount, local) in mounts {
                a = a.replace(&format!("={mount}/"), &format!("={}/", local.display()));
            }
            a
        })
        .collect()
}

/// Accepts a server certificate that chains to the mesh root, whatever names it has: an Istio workload
/// certificate has no DNS name, only its SPIFFE id (checked after the handshake).
#[derive(Debug)]
struct MeshRootOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for MeshRootOnly {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A TLS connection to `addr` (ALPN h2, as Envoy's gRPC client) trusting `root`, presenting `client` if
/// given. Returns the server's leaf certificate and the first bytes the server sent (its HTTP/2
/// SETTINGS once the handshake is accepted), or the error the connection ended with.
fn xds_tls_exchange(
    addr: SocketAddr,
    root: &Path,
    client: Option<&support::MeshIdentity>,
) -> Result<(Vec<u8>, Vec<u8>), String> {
    let provider = meshfed::tls::provider();
    let mut roots = rustls::RootCertStore::empty();
    for c in meshfed::tls::load_certs(root).unwrap() {
        roots.add(c).unwrap();
    }
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshRootOnly(verifier)));
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some(id) => builder
            .with_client_auth_cert(
                meshfed::tls::load_certs(&id.cert).unwrap(),
                meshfed::tls::load_key(&id.key).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("meshfed.istio-system.svc").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // the HTTP/2 client preface, then whatever the server answers
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let n = tls.read(&mut buf).map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("closed by the server".into());
    }
    let leaf = tls.conn.peer_certificates().expect("the server's certificate")[0].to_vec();
    Ok((leaf, buf[..n].to_vec()))
}

/// An HTTP/1.1 GET on the debug server with an optional bearer token: the status code.
fn debug_status(addr: SocketAddr, path: &str, token: Option<&str>) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.1\r\nHost: meshfed\r\n{auth}Connection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    response.split(' ').nth(1)?.parse().ok()
}

/// `meshfed serve` with the Deployment's own arguments (directories and addresses made local): it
/// refuses to start until the agent has written the certificate, then serves xDS over mTLS only with
/// that certificate, and the debug server answers the probes without the token and /metrics only with
/// it. The only change to the overlay's mesh config: readyTimeout 1 s instead of 30 s (there is no
/// Kubernetes API here).
#[test]
fn meshfed_runs_with_the_deployments_arguments() {
    let o = &overlays()[0];
    let dir = tempfile::tempdir().unwrap();
    let out_certs = dir.path().join("istio-output-certs");
    let config = dir.path().join("mesh-config");
    let token_dir = dir.path().join("debug-token");
    for d in [&out_certs, &config, &token_dir] {
        std::fs::create_dir(d).unwrap();
    }
    let args = o.args();
    let out_dir = args.iter().find_map(|a| a.strip_prefix("--xds-tls-cert=")).unwrap().rsplit_once('/').unwrap().0;
    let token_file = args.iter().find_map(|a| a.strip_prefix("--debug-token-file=")).unwrap();
    let mounts: BTreeMap<&str, &Path> = [
        (out_dir, out_certs.as_path()),
        ("/etc/meshfed", config.as_path()),
        (token_file.rsplit_once('/').unwrap().0, token_dir.as_path()),
    ]
    .into();

    let cm = o.all("ConfigMap")[0];
    let mut mesh: Value = serde_yaml::from_str(cm["data"]["mesh.yaml"].as_str().unwrap()).unwrap();
    mesh["readyTimeout"] = Value::from("1s");
    // the state volume, here
    let state = dir.path().join("state/last-known.json");
    mesh["lastKnownState"]["path"] = Value::from(state.display().to_string());
    std::fs::write(config.join("mesh.yaml"), serde_yaml::to_string(&mesh).unwrap()).unwrap();
    let token = "f0e1d2c3b4a5968778695a4b3c2d1e0f";
    std::fs::write(token_dir.join(token_file.rsplit_once('/').unwrap().1), format!("{token}\n")).unwrap();

    let xds = SocketAddr::from((Ipv4Addr::LOCALHOST, support::free_port()));
    let debug = SocketAddr::from((Ipv4Addr::LOCALHOST, support::free_port()));
    let local = local_args(o, &mounts, xds, debug);
    assert!(local.iter().all(|a| !a.contains("/etc/") && !a.contains("0.0.0.0")), "{local:?}");
    let command = || {
        let mut cmd = Command::new(support::meshfed_path());
        cmd.args(&local).env("RUST_LOG", "info").env("NO_COLOR", "1").env_remove("KUBERNETES_SERVICE_HOST");
        cmd
    };

    // before the agent wrote the certificate: meshfed waits for it (--tls-wait, shortened here), then a
    // clear error naming the file, and an exit (the kubelet restarts the container)
    let mut early = support::ChildGuard::spawn("meshfed-early", command().args(["--tls-wait", "1s"])).unwrap();
    let status = early.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(!status.success());
    let cert_file = out_certs.join("cert-chain.pem");
    assert!(early.stderr().contains("waiting for the TLS files"), "{}", early.log_tail());
    assert!(early.stderr().contains(&cert_file.display().to_string()), "{}", early.log_tail());

    // the agent's files: an Istio workload certificate of meshfed's service account, its key, the root
    let ca = support::TestCa::new(&dir.path().join("ca")).unwrap();
    let spiffe = "spiffe://cluster.local/ns/istio-system/sa/meshfed";
    let own = ca.issue("meshfed", spiffe).unwrap();
    std::fs::copy(&own.cert, &cert_file).unwrap();
    std::fs::copy(&own.key, out_certs.join("key.pem")).unwrap();
    std::fs::copy(ca.root(), out_certs.join("root-cert.pem")).unwrap();

    let meshfed = support::ChildGuard::spawn("meshfed", &mut command()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while debug_status(debug, "/ready", None) != Some(200) {
        assert!(Instant::now() < deadline, "meshfed not ready\n{}", meshfed.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    // the kubelet's probes need no token; Prometheus' scrape does
    assert_eq!(debug_status(debug, "/healthz", None), Some(200));
    assert_eq!(debug_status(debug, "/metrics", None), Some(401));
    assert_eq!(debug_status(debug, "/metrics", Some("not-the-token-at-all")), Some(401));
    assert_eq!(debug_status(debug, "/metrics", Some(token)), Some(200));

    // xDS: TLS with the agent's certificate, client certificates required (an istio-proxy's will do)
    let sidecar = ca.issue("sidecar", "spiffe://cluster.local/ns/shop/sa/default").unwrap();
    let (leaf, first) = xds_tls_exchange(xds, ca.root(), Some(&sidecar)).unwrap_or_else(|e| {
        panic!("an istio-proxy certificate is refused: {e}\n{}", meshfed.log_tail());
    });
    assert_eq!(leaf, meshfed::tls::load_certs(&own.cert).unwrap()[0].to_vec());
    assert_eq!(meshfed::tls::uri_sans(&leaf).unwrap(), [spiffe]);
    assert!(first.len() >= 9 && first[3] == 0x4, "HTTP/2 SETTINGS first: {first:?}");
    let refused = xds_tls_exchange(xds, ca.root(), None);
    assert!(refused.is_err(), "a client without a certificate got {refused:?}");
    let stranger_ca = support::TestCa::new(&dir.path().join("stranger")).unwrap();
    let stranger = stranger_ca.issue("stranger", "spiffe://cluster.local/ns/shop/sa/default").unwrap();
    assert!(xds_tls_exchange(xds, ca.root(), Some(&stranger)).is_err(), "a certificate of another CA");

    // only the TLS listener
    let log = format!("{}{}", meshfed.stdout(), meshfed.stderr());
    assert!(log.contains("xDS server listening") && log.contains("tls=true"), "{log}");
    assert!(!log.contains("tls=false"), "no plaintext listener: {log}");

    // the last-known state file is written on the state volume (nothing listed here: no cluster in it)
    let deadline = Instant::now() + Duration::from_secs(20);
    let states = loop {
        if let Ok(Some(loaded)) = meshfed::source::last_known::read(&state) {
            break loaded.clusters;
        }
        assert!(Instant::now() < deadline, "no last-known state at {}\n{}", state.display(), meshfed.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(states.is_empty(), "{states:?}");
}
