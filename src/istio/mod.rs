//! `meshfed istio`: the Istio objects that wire meshfed in *beside istiod*. istiod keeps configuring the
//! proxies (CDS, LDS, RDS, every Istio API); meshfed serves only the EDS of selected services. An
//! EnvoyFilter per namespace (or one mesh-wide, in the root namespace) does it with patches on clusters,
//! per proxy context (`SIDECAR_OUTBOUND`, `GATEWAY`):
//!
//! - **ADD** the `meshfed-xds` cluster: HTTP/2 to meshfed's Service, Istio mTLS with the proxy's own SDS
//!   certificates (`default`, `ROOTCA` from Istio's agent over `sds-grpc`), meshfed's certificate checked
//!   for its SPIFFE identity ([`envoy_filter::meshfed_cluster`]);
//! - **MERGE** into each selected service port's outbound clusters (`match.cluster: {service,
//!   portNumber}`: the port's cluster and its subset clusters, which meshfed serves too, see [`merge`]) an
//!   EDS config source of their own: `api_config_source` on `meshfed-xds`, Delta by default (Envoy
//!   accepts a CDS-added cluster there; state of the world needs it static), with a finite
//!   `initial_fetch_timeout` so that a proxy
//!   that cannot reach meshfed still starts (istiod writes `0s`, wait forever, and a MERGE keeps what it
//!   does not set); `common_lb_config.locality_weighted_lb_config` where meshfed's own CDS would set it
//!   (a `distribute` rule, or `failover` with outlier detection: meshfed's locality weights then take
//!   effect); and outlier detection where the service port's DestinationRule gives none but the mesh
//!   config's `defaults.outlierDetection` asks for it (istiod does not know meshfed's mesh defaults),
//!   with a warning naming the service.
//!
//! The bootstrap-override form (`--static-cluster`) puts `meshfed-xds` in a ConfigMap for Istio's
//! `sidecar.istio.io/bootstrapOverride` instead (a static cluster, required for `--sotw`); its
//! EnvoyFilters then select the workloads labelled for it.
//!
//! Every patch value is parsed as its Envoy proto before anything is printed
//! ([`envoy_filter::check_objects`]); `--apply` writes the objects with server-side apply ([`apply`]).
//! The services come from the mesh config's sources, read once ([`inventory`]).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::cluster::common_lb_config::LocalityConfigSpecifier;
use serde_json::Value;

use crate::mesh_config::MeshConfig;
use crate::model::{Protocol, Service, ServiceKey, ServicePort};
use crate::policy::{EffectivePolicy, MeshDefaults};
use crate::proxy::ProxyKind;
use crate::proxy::TlsSupport;
use crate::translate::{self, ClusterScope};

pub mod apply;
pub mod envoy_filter;
mod error;
pub mod inventory;
pub mod merge;
pub mod select;

pub use envoy_filter::{ClusterMatch, EdsApi, MergeExtras, MeshfedXds, PatchContext};
pub use error::Error;
pub use inventory::Inventory;
pub use select::{LabelSelector, Selection};

/// Default address of meshfed's xDS TLS port, as proxies in the mesh reach it.
pub const DEFAULT_MESHFED_ADDRESS: &str = "meshfed.istio-system.svc.cluster.local:15012";
/// Default name of the EnvoyFilters (the ConfigMaps add `-bootstrap`).
pub const DEFAULT_NAME: &str = "meshfed-eds";
/// Istio's root namespace: EnvoyFilters there without a workloadSelector apply to every proxy.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
/// The workload label the EnvoyFilters of the bootstrap-override form select.
pub const DEFAULT_STATIC_WORKLOAD_LABEL: &str = "meshfed.io/static-xds=true";

/// Where the EnvoyFilters go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scope {
    /// one EnvoyFilter in each client namespace (`--namespace`; default: the selected services' namespaces)
    Namespace,
    /// one EnvoyFilter in the root namespace, without a workloadSelector: every proxy of the mesh
    Mesh,
}

/// What the MERGE patches match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Subsets {
    /// `{service, portNumber}`: the port's cluster and its subset clusters (`outbound|9080|v1|...`),
    /// whose endpoints then come from meshfed too
    Include,
    /// `{name: outbound|PORT||FQDN}`: only the port's own cluster; subset clusters stay on istiod
    Exclude,
}

/// `meshfed istio`'s command line.
#[derive(Clone, Debug, clap::Args)]
pub struct IstioArgs {
    /// Mesh config file (YAML). Default: the built-in demo, examples/two-clouds/mesh.yaml.
    #[arg(long, env = "MESHFED_MESH_CONFIG")]
    pub mesh_config: Option<PathBuf>,
    /// Wire every service of the mesh (the other filters still apply).
    #[arg(long)]
    pub all: bool,
    /// Wire the services of these namespaces (repeatable or comma-separated).
    #[arg(long = "service-namespace", value_delimiter = ',')]
    pub service_namespaces: Vec<String>,
    /// Wire these services: FQDN (reviews.shop.svc.cluster.local), NAME.NAMESPACE or NAMESPACE/NAME
    /// (repeatable or comma-separated).
    #[arg(long = "host", value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// Wire the services whose Service object (in any cluster) matches this label selector, e.g.
    /// meshfed.io/federate=true. Filters combine: a service must pass each one given.
    #[arg(long, short = 'l')]
    pub selector: Option<String>,
    /// Proxy contexts to patch: sidecar (SIDECAR_OUTBOUND), gateway (GATEWAY: ingress/egress gateways).
    #[arg(long = "context", value_enum, value_delimiter = ',', default_value = "sidecar")]
    pub contexts: Vec<PatchContext>,
    /// namespace: an EnvoyFilter in each client namespace; mesh: one in the root namespace for every proxy.
    #[arg(long, value_enum, default_value = "namespace")]
    pub scope: Scope,
    /// The client namespaces: whose proxies get their EDS from meshfed (--scope namespace), and where the
    /// bootstrap ConfigMaps go (--static-cluster). Default: the selected services' namespaces.
    #[arg(long = "namespace", short = 'n', value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Istio's root namespace (--scope mesh).
    #[arg(long, default_value = DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
    /// Name of the EnvoyFilters (the bootstrap ConfigMaps are NAME-bootstrap).
    #[arg(long, default_value = DEFAULT_NAME)]
    pub name: String,
    /// meshfed's xDS TLS address as proxies reach it, HOST:PORT.
    #[arg(long, default_value = DEFAULT_MESHFED_ADDRESS)]
    pub meshfed_address: String,
    /// The SPIFFE identity meshfed's certificate must carry.
    /// Default: spiffe://TRUST_DOMAIN/ns/istio-system/sa/meshfed (trustDomain of the mesh config).
    #[arg(long)]
    pub meshfed_san: Option<String>,
    /// SNI sent to meshfed. Default: the host of --meshfed-address (none for an IP address).
    #[arg(long)]
    pub meshfed_sni: Option<String>,
    /// How long a proxy waits for meshfed's first answer per cluster before it uses the cluster without
    /// endpoints (istiod's 0s would block the proxy's start while meshfed is unreachable).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub initial_fetch_timeout: Duration,
    /// State-of-the-world EDS (api_type GRPC) instead of Delta: Envoy then requires meshfed-xds to be a
    /// static cluster, so this needs --static-cluster.
    #[arg(long, requires = "static_cluster")]
    pub sotw: bool,
    /// Bootstrap-override form: meshfed-xds as a static cluster in a ConfigMap per client namespace (pods
    /// annotated sidecar.istio.io/bootstrapOverride: NAME-bootstrap), and EnvoyFilters that select the
    /// workloads labelled --static-workload-label.
    #[arg(long)]
    pub static_cluster: bool,
    /// The workload label (KEY=VALUE) the EnvoyFilters of the bootstrap-override form select.
    #[arg(long, default_value = DEFAULT_STATIC_WORKLOAD_LABEL, value_parser = parse_label)]
    pub static_workload_label: (String, String),
    /// include: MERGE by service and port (subset clusters too); exclude: by the exact cluster name.
    #[arg(long, value_enum, default_value = "include")]
    pub subsets: Subsets,
    /// Print the clusters of this file (`istioctl proxy-config cluster POD -o json`, or a config dump) as
    /// istiod would render them with the EnvoyFilters (the first --context), instead of the objects.
    #[arg(long, conflicts_with = "apply")]
    pub preview: Option<PathBuf>,
    /// Also write the objects to the config cluster (server-side apply, field manager "meshfed").
    #[arg(long)]
    pub apply: bool,
    /// Kubeconfig of the config cluster for --apply (default: in-cluster service account).
    #[arg(long, requires = "apply")]
    pub kubeconfig: Option<PathBuf>,
    /// Context of --kubeconfig (default: its current context).
    #[arg(long, requires = "kubeconfig")]
    pub kube_context: Option<String>,
    /// Accept kubeconfigs of the mesh config's clusters whose users run a command (as `serve`).
    #[arg(long)]
    pub allow_exec_auth: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration such as 15s or 500ms"))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Everything [`plan`] needs besides the inventory.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    pub selection: Selection,
    pub contexts: Vec<PatchContext>,
    pub scope: Scope,
    /// client namespaces (empty: the selected services' namespaces)
    pub namespaces: Vec<String>,
    pub root_namespace: String,
    pub name: String,
    pub xds: MeshfedXds,
    pub api: EdsApi,
    pub initial_fetch_timeout: Duration,
    pub static_cluster: bool,
    pub static_workload_label: (String, String),
    pub subsets: Subsets,
}

impl Options {
    /// The options of the command line, with the mesh config's trust domain for the default SAN.
    pub fn from_args(args: &IstioArgs, mesh: &MeshConfig) -> Result<Options, Error> {
        let address = crate::bootstrap::parse_xds_address(&args.meshfed_address)
            .map_err(|e| Error::Options(format!("--meshfed-address: {e}")))?;
        let selector = args.selector.as_deref().map(str::parse).transpose()?;
        let is_ip = address.ip.is_some();
        let sni = args.meshfed_sni.clone().or_else(|| (!is_ip).then(|| address.host.clone()));
        Ok(Options {
            selection: Selection {
                all: args.all,
                namespaces: args.service_namespaces.clone(),
                hosts: args.hosts.clone(),
                selector,
            },
            contexts: args.contexts.clone(),
            scope: args.scope,
            namespaces: args.namespaces.clone(),
            root_namespace: args.root_namespace.clone(),
            name: args.name.clone(),
            xds: MeshfedXds {
                host: address.host,
                port: address.port,
                is_ip,
                san: args.meshfed_san.clone().unwrap_or_else(|| {
                    translate::tls::spiffe_id(&mesh.trust_domain, DEFAULT_ROOT_NAMESPACE, "meshfed")
                }),
                sni,
            },
            api: if args.sotw { EdsApi::Sotw } else { EdsApi::Delta },
            initial_fetch_timeout: args.initial_fetch_timeout,
            static_cluster: args.static_cluster,
            static_workload_label: args.static_workload_label.clone(),
            subsets: args.subsets,
        })
    }

    /// Refuses options that cannot work (names Kubernetes would reject, SotW without a static cluster...).
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |s: String| Err(Error::Options(s));
        if self.selection.is_empty() {
            return bad("select services with --all, --service-namespace NS, --host HOST or --selector LABELS".into());
        }
        if self.contexts.is_empty() {
            return bad("--context: give sidecar, gateway or both".into());
        }
        if self.api == EdsApi::Sotw && !self.static_cluster {
            return bad("--sotw: Envoy accepts a state-of-the-world (GRPC) EDS config source only on a static \
                        cluster; add --static-cluster"
                .into());
        }
        if !is_dns1123_subdomain(&self.name) || self.name.len() > 253 - "-bootstrap".len() {
            return bad(format!("--name {:?} is not a valid object name (a DNS-1123 subdomain)", self.name));
        }
        for ns in self.namespaces.iter().chain([&self.root_namespace]) {
            if !is_dns1123_label(ns) {
                return bad(format!("namespace {ns:?} is not a valid namespace name (a DNS-1123 label)"));
            }
        }
        if self.xds.san.is_empty() {
            return bad("--meshfed-san is empty".into());
        }
        if self.initial_fetch_timeout.is_zero() {
            return bad("--initial-fetch-timeout 0s makes proxies wait for meshfed forever before they start; \
                        give a finite timeout"
                .into());
        }
        let (k, _) = &self.static_workload_label;
        if self.static_cluster && k.is_empty() {
            return bad("--static-workload-label: empty key".into());
        }
        Ok(())
    }
}

fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// One service port the plan wires, and what its MERGE carries.
#[derive(Clone, Debug, PartialEq)]
pub struct WiredPort {
    pub service: ServiceKey,
    pub hostname: Arc<str>,
    pub port: u16,
    pub extras: MergeExtras,
}

impl WiredPort {
    /// `match.cluster` of the port's MERGE.
    pub fn cluster_match(&self, subsets: Subsets) -> ClusterMatch {
        match subsets {
            Subsets::Include => ClusterMatch::Service { fqdn: self.hostname.to_string(), port: self.port },
            Subsets::Exclude => ClusterMatch::Name(translate::outbound_cluster_name(self.port, "", &self.hostname)),
        }
    }
}

/// The objects to print (or apply), checked.
#[derive(Clone, Debug)]
pub struct Plan {
    /// EnvoyFilters (and ConfigMaps of the bootstrap-override form), in print order
    pub objects: Vec<Value>,
    /// the service ports wired, by service and port
    pub ports: Vec<WiredPort>,
    /// how many patch values were parsed as their Envoy proto
    pub checked_values: usize,
    /// what may not do what the reader expects (stderr, `warning:`)
    pub warnings: Vec<String>,
    /// what the reader must do besides applying (stderr, `note:`)
    pub notes: Vec<String>,
}

impl Plan {
    /// The objects as YAML documents, after comment lines saying where they come from and how to roll back.
    pub fn to_yaml(&self, source: &str) -> Result<String, Error> {
        let services: BTreeSet<&ServiceKey> = self.ports.iter().map(|p| &p.service).collect();
        let header = vec![
            format!(
                "meshfed istio: EDS of {} service(s), {} port(s) from meshfed, beside istiod ({source})",
                services.len(),
                self.ports.len()
            ),
            format!(
                "roll back: kubectl delete envoyfilter,configmap -A -l {}={}",
                envoy_filter::MANAGED_BY_LABEL,
                envoy_filter::MANAGED_BY
            ),
        ];
        envoy_filter::to_yaml(&header, &self.objects)
    }
}

/// What meshfed's CDS translation would set on a sidecar's cluster of this port that the MERGE must add to
/// istiod's: locality weighting (where meshfed's CDS sets it), and outlier detection when it comes from the
/// mesh config's defaults rather than from a DestinationRule (which istiod renders itself).
fn port_extras(ctx: &translate::Context, service: &Service, port: &ServicePort) -> Result<MergeExtras, Error> {
    let scope = ClusterScope { kind: ProxyKind::Sidecar, tls: TlsSupport::None, rules: Default::default() };
    let cluster = translate::cluster::outbound_cluster(ctx, &scope, service, port);
    let common = cluster.common_lb_config.as_ref();
    let locality_weighted = matches!(
        common.and_then(|c| c.locality_config_specifier.as_ref()),
        Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
    );
    // the port's outlier detection as the DestinationRules alone give it (what istiod renders), for the
    // same proxies as `cluster` (those of a namespace no rule mentions)
    let rule = ctx.rule_for(&scope.rules, service);
    let from_rules = EffectivePolicy::of(rule, port.port, None, &MeshDefaults::default()).outlier_detection.is_some();
    let outlier_detection = match (&cluster.outlier_detection, from_rules) {
        (Some(od), false) => {
            // written out even when 0 (proto3 JSON would print `{}`): Istio's panic threshold off
            let panic = common.and_then(|c| c.healthy_panic_threshold.as_ref()).map_or(0.0, |p| p.value);
            Some((proto_json(od)?, serde_json::json!({ "value": panic })))
        }
        _ => None,
    };
    Ok(MergeExtras { locality_weighted, outlier_detection })
}

/// A prost message as proto3 JSON with Envoy's field names (through the descriptor pool).
fn proto_json<M: prost::Message + prost::Name>(message: &M) -> Result<Value, Error> {
    let desc = crate::descriptors::pool()
        .get_message_by_name(&M::full_name())
        .ok_or_else(|| Error::Serialize(format!("{} is not in the descriptor pool", M::full_name())))?;
    let dynamic = prost_reflect::DynamicMessage::decode(desc, message.encode_to_vec().as_slice())
        .map_err(|e| Error::Serialize(e.to_string()))?;
    merge::to_json(&dynamic)
}

/// Builds (and checks) the objects that wire the selected services of `inventory` to meshfed.
pub fn plan(inventory: &Inventory, mesh: &MeshConfig, options: &Options) -> Result<Plan, Error> {
    options.validate()?;
    let registry = &inventory.registry;
    for host in &options.selection.hosts {
        if !registry.services().values().any(|s| Selection::host_names(host, s)) {
            return Err(Error::UnknownHost(host.clone()));
        }
    }
    let no_labels = Vec::new();
    let selected: Vec<Arc<Service>> = registry
        .services()
        .values()
        .filter(|s| options.selection.matches(s, inventory.service_labels.get(&s.key).unwrap_or(&no_labels)))
        .cloned()
        .collect();
    if selected.is_empty() {
        return Err(Error::NothingSelected(describe_selection(&options.selection)));
    }
    let mut ctx = translate::Context::from_mesh(mesh).with_registry(registry);
    // the services a traffic split covers need locality weighting (meshfed's EDS carries the split)
    let traffic = crate::traffic::decide_all(
        &mesh.traffic,
        [],
        registry.services().values().map(|s| &**s),
        std::time::SystemTime::now(),
        &Default::default(),
    );
    ctx.traffic = Arc::new(traffic.decisions);
    let mut warnings = inventory.warnings.clone();
    let mut notes = Vec::new();
    let mut ports = Vec::new();
    for service in &selected {
        for port in &service.ports {
            if port.protocol == Protocol::Unsupported {
                warnings.push(format!(
                    "{} port {} ({}) is not TCP: istiod builds no cluster for it; not wired",
                    service.key, port.port, port.name
                ));
                continue;
            }
            let extras = port_extras(&ctx, service, port)?;
            if extras.outlier_detection.is_some() {
                warnings.push(format!(
                    "{} port {}: no DestinationRule sets outlierDetection, so the EnvoyFilter adds the mesh config's \
                     defaults.outlierDetection (istiod does not know meshfed's mesh defaults; a DestinationRule is \
                     the Istio-native place for it)",
                    service.key, port.port
                ));
            }
            ports.push(WiredPort {
                service: service.key.clone(),
                hostname: service.hostname.clone(),
                port: port.port,
                extras,
            });
        }
        // meshfed serves the subset clusters of the DestinationRules it applies; those of a rule it rejects
        // would find no endpoints there
        let valid: BTreeSet<String> = inventory.registry.destination_rules().iter().map(|r| r.id()).collect();
        let unserved: Vec<(String, String)> =
            inventory.subsets_of(&service.hostname).into_iter().filter(|(_, rule)| !valid.contains(rule)).collect();
        if !unserved.is_empty() && options.subsets == Subsets::Include {
            let names: Vec<String> = unserved.iter().map(|(s, rule)| format!("{s} ({rule})")).collect();
            warnings.push(format!(
                "{}: DestinationRule subsets {}: meshfed rejects their rule (see its invalid-destination-rule \
                 warning), so it does not serve their clusters (outbound|PORT|SUBSET|{}), which the MERGE points at \
                 meshfed; fix the rule, or --subsets exclude leaves them on istiod",
                service.key,
                names.join(", "),
                service.hostname
            ));
        }
    }
    if ports.is_empty() {
        return Err(Error::NothingSelected(format!("{} with a TCP port", describe_selection(&options.selection))));
    }

    let service_namespaces: BTreeSet<String> = selected.iter().map(|s| s.key.namespace.to_string()).collect();
    let client_namespaces: Vec<String> = if options.namespaces.is_empty() {
        service_namespaces.into_iter().collect()
    } else {
        let mut n = options.namespaces.clone();
        n.sort();
        n.dedup();
        n
    };
    let filter_namespaces: Vec<String> = match options.scope {
        Scope::Namespace => client_namespaces.clone(),
        Scope::Mesh => vec![options.root_namespace.clone()],
    };
    if options.scope == Scope::Namespace
        && options.namespaces.is_empty()
        && options.contexts.contains(&PatchContext::Gateway)
    {
        warnings.push(format!(
            "--context gateway with --scope namespace: the EnvoyFilters go to the services' namespaces ({}); \
             ingress gateways usually run elsewhere (istio-system, istio-ingress): name their namespace with \
             --namespace, or use --scope mesh",
            client_namespaces.join(", ")
        ));
    }

    let xds_cluster = envoy_filter::meshfed_cluster(&options.xds);
    let mut patches = Vec::new();
    for context in &options.contexts {
        if !options.static_cluster {
            patches.push(envoy_filter::config_patch(*context, "ADD", None, xds_cluster.clone()));
        }
        for p in &ports {
            let value = envoy_filter::merge_value(options.api, options.initial_fetch_timeout, &p.extras);
            patches.push(envoy_filter::config_patch(*context, "MERGE", Some(&p.cluster_match(options.subsets)), value));
        }
    }
    let selector = options.static_cluster.then_some(&options.static_workload_label);
    let config_map_name = format!("{}-bootstrap", options.name);
    let mut objects = Vec::new();
    if options.static_cluster {
        for ns in &client_namespaces {
            objects.push(envoy_filter::bootstrap_config_map(&config_map_name, ns, &xds_cluster)?);
        }
        let (k, v) = &options.static_workload_label;
        notes.push(format!(
            "bootstrap-override form: the proxies to wire need the pod annotation {}: {config_map_name} (the \
             ConfigMap is in namespaces {}) and the label {k}={v}; the EnvoyFilters select that label, so \
             proxies without the static meshfed-xds cluster are left alone",
            envoy_filter::BOOTSTRAP_OVERRIDE_ANNOTATION,
            client_namespaces.join(", ")
        ));
    }
    for ns in &filter_namespaces {
        objects.push(envoy_filter::envoy_filter(&options.name, ns, selector, patches.clone()));
    }
    let checked_values = envoy_filter::check_objects(&objects)?;
    Ok(Plan { objects, ports, checked_values, warnings, notes })
}

fn describe_selection(s: &Selection) -> String {
    let mut parts = Vec::new();
    if s.all {
        parts.push("--all".to_string());
    }
    if !s.namespaces.is_empty() {
        parts.push(format!("--service-namespace {}", s.namespaces.join(",")));
    }
    if !s.hosts.is_empty() {
        parts.push(format!("--host {}", s.hosts.join(",")));
    }
    if let Some(sel) = &s.selector {
        parts.push(format!("--selector {sel}"));
    }
    parts.join(" ")
}

/// What `meshfed istio` produced.
#[derive(Clone, Debug)]
pub struct Output {
    /// the objects as YAML (or, with `--preview`, the previewed clusters as JSON)
    pub text: String,
    pub warnings: Vec<String>,
    pub notes: Vec<String>,
    /// the objects `--apply` wrote
    pub applied: Vec<apply::Applied>,
}

/// Runs `meshfed istio`: reads the mesh, plans, checks, and renders (and applies or previews).
pub async fn run(args: &IstioArgs) -> Result<Output, Error> {
    let (path, source) = match &args.mesh_config {
        Some(p) => (p.clone(), format!("mesh config {}", p.display())),
        None => {
            let p = crate::demo::mesh_config_path(&std::env::temp_dir().join("meshfed-demo"))
                .map_err(|e| Error::Options(format!("writing the built-in demo: {e}")))?;
            (p, "the built-in demo".to_string())
        }
    };
    let mesh = MeshConfig::load(&path)?;
    let options = Options::from_args(args, &mesh)?;
    let inventory = Inventory::load(&mesh, args.allow_exec_auth).await?;
    let plan = plan(&inventory, &mesh, &options)?;
    let mut notes = plan.notes.clone();
    if let Some(file) = &args.preview {
        let text = std::fs::read_to_string(file).map_err(|e| Error::Preview(format!("{}: {e}", file.display())))?;
        let dump: Value =
            serde_json::from_str(&text).map_err(|e| Error::Preview(format!("{}: {e}", file.display())))?;
        let clusters = merge::clusters_of(&dump)?;
        let context = options.contexts[0];
        let merged = merge::preview(&plan.objects, context, &clusters)?;
        let patched: Vec<String> = merged
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(c, n)| format!("{} ({n})", c["name"].as_str().unwrap_or("?")))
            .collect();
        notes.push(format!(
            "{} of {} clusters patched ({}): {}",
            patched.len(),
            merged.len(),
            context.as_istio(),
            patched.join(", ")
        ));
        let list: Vec<Value> = merged.into_iter().map(|(c, _)| c).collect();
        let text = serde_json::to_string_pretty(&list).map_err(|e| Error::Serialize(e.to_string()))? + "\n";
        return Ok(Output { text, warnings: plan.warnings, notes, applied: Vec::new() });
    }
    let text = plan.to_yaml(&source)?;
    let applied = if args.apply {
        let target = match &args.kubeconfig {
            Some(path) => apply::Target::Kubeconfig { path: path.clone(), context: args.kube_context.clone() },
            None => apply::Target::InCluster,
        };
        apply::apply(&plan.objects, &target).await?
    } else {
        Vec::new()
    };
    Ok(Output { text, warnings: plan.warnings, notes, applied })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> Options {
        Options {
            selection: Selection { all: true, ..Default::default() },
            contexts: vec![PatchContext::Sidecar],
            scope: Scope::Namespace,
            namespaces: vec![],
            root_namespace: DEFAULT_ROOT_NAMESPACE.into(),
            name: DEFAULT_NAME.into(),
            xds: MeshfedXds {
                host: "meshfed.istio-system.svc.cluster.local".into(),
                port: 15012,
                is_ip: false,
                san: "spiffe://cluster.local/ns/istio-system/sa/meshfed".into(),
                sni: None,
            },
            api: EdsApi::Delta,
            initial_fetch_timeout: Duration::from_secs(15),
            static_cluster: false,
            static_workload_label: ("meshfed.io/static-xds".into(), "true".into()),
            subsets: Subsets::Include,
        }
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(options().validate().is_ok());
        type Edit = Box<dyn Fn(&mut Options)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|o| o.selection = Selection::default()), "select services"),
            (Box::new(|o| o.contexts.clear()), "--context"),
            (Box::new(|o| o.api = EdsApi::Sotw), "add --static-cluster"),
            (Box::new(|o| o.name = "meshfed_eds".into()), "--name"),
            (Box::new(|o| o.name = "a".repeat(250)), "--name"),
            (Box::new(|o| o.namespaces = vec!["Shop".into()]), "\"Shop\""),
            (Box::new(|o| o.root_namespace = "-x".into()), "\"-x\""),
            (Box::new(|o| o.xds.san.clear()), "--meshfed-san"),
            (Box::new(|o| o.initial_fetch_timeout = Duration::ZERO), "forever"),
            (
                Box::new(|o| {
                    o.static_cluster = true;
                    o.static_workload_label.0.clear()
                }),
                "--static-workload-label",
            ),
        ];
        for (edit, reason) in cases {
            let mut o = options();
            edit(&mut o);
            let e = o.validate().unwrap_err().to_string();
            assert!(e.contains(reason), "{reason}: {e}");
        }
        let mut o = options();
        o.api = EdsApi::Sotw;
        o.static_cluster = true;
        assert!(o.validate().is_ok());
    }

    #[test]
    fn merges_match_by_service_or_exact_name() {
        let p = WiredPort {
            service: ServiceKey::new("shop", "reviews"),
            hostname: "reviews.shop.svc.cluster.local".into(),
            port: 9080,
            extras: MergeExtras::default(),
        };
        assert_eq!(
            p.cluster_match(Subsets::Include),
            ClusterMatch::Service { fqdn: "reviews.shop.svc.cluster.local".into(), port: 9080 }
        );
        assert_eq!(
            p.cluster_match(Subsets::Exclude),
            ClusterMatch::Name("outbound|9080||reviews.shop.svc.cluster.local".into())
        );
    }

    /// Beside istiod the CDS is istiod's: the MERGE adds locality weighting to the clusters of services a
    /// traffic split covers (else Envoy would ignore the split's locality weights).
    #[tokio::test]
    async fn a_traffic_split_asks_for_locality_weighting() {
        let dir = tempfile::tempdir().unwrap();
        crate::demo::write_to(dir.path()).unwrap();
        let path = dir.path().join("mesh.yaml");
        let yaml = "clusters:\n  - {id: aws-use1, network: aws-net, manifests: aws-use1}\n  - {id: azure-weu, network: azure-net, manifests: azure-weu}\n\
                    traffic:\n  policies:\n    - hosts: [frontend.shop.svc.cluster.local]\n      split: {us-east-1: {aws-use1: 70, azure-weu: 30}}\n";
        for (traffic, weighted) in [(false, false), (true, true)] {
            let text = if traffic { yaml.to_string() } else { yaml.split("traffic:").next().unwrap().to_string() };
            std::fs::write(&path, text).unwrap();
            let mesh = MeshConfig::load(&path).unwrap();
            let inventory = Inventory::load(&mesh, false).await.unwrap();
            let plan = plan(&inventory, &mesh, &options()).unwrap();
            let frontend = plan.ports.iter().find(|p| &*p.service.name == "frontend").expect("frontend wired");
            assert_eq!(frontend.extras.locality_weighted, weighted, "traffic: {traffic}");
        }
    }

    #[test]
    fn dns_names() {
        for ok in ["shop", "a-b", "a1", "x"] {
            assert!(is_dns1123_label(ok), "{ok}");
        }
        for bad in ["", "Shop", "-a", "a-", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!is_dns1123_label(bad), "{bad}");
        }
        assert!(is_dns1123_subdomain("meshfed.eds-1"));
        assert!(!is_dns1123_subdomain("meshfed..eds"));
    }
}
