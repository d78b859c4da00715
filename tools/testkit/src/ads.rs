//! The scripted ADS client of the tests: one [`AdsClient`] speaks SotW and Delta with one API, over
//! loopback (plaintext, or any tonic `Channel`, e.g. TLS from [`crate::tls_client`]), on ADS or on the
//! per-type EDS service ([`Service`]).
//!
//! - [`AdsClient::subscribe`] / [`AdsClient::unsubscribe`] change a type's subscription as Envoy does
//!   (SotW: the whole list again, with the last accepted version and the latest nonce; Delta: the names
//!   added or removed, and on a stream's first request of a type the versions the client holds as
//!   `initial_resource_versions`);
//! - [`AdsClient::recv`] gives a flavor-neutral [`Response`] (type, version, nonce, resources by name with
//!   their versions and bytes, removed names), checked for well-formedness;
//! - [`AdsClient::ack`] / [`AdsClient::nack`] answer a response ([`AdsClient::ack_subscribing`]: an ACK
//!   that also subscribes to more names); what a client ACKs is what it holds
//!   ([`Held`]), which [`AdsClient::holding`] carries to a new stream (a Delta reconnect);
//! - [`AdsClient::send`] sends any [`Request`] as it is: the escape hatch for protocol edge cases (stale
//!   nonces, missing nodes, raw fields).
//!
//! The node goes with the first request of a stream only, as Envoy sends it. Every step is bounded (by
//! [`TIMEOUT`] unless [`AdsClient::with_timeouts`] says otherwise); failures are [`Error`]s, never panics.
//!
//! Built on it: [`fetch_all`] (everything a proxy is served, subscribing as Envoy does), [`delta_reconnect`]
//! and [`hold_subscription`] (a session following pushes). [`flavor_tests!`](crate::flavor_tests) makes
//! one test body into a SotW and a Delta test.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster::ClusterDiscoveryType, cluster::DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::{ControlPlane, Node};
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter::ConfigType};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use meshfed::type_url::{self, ResourceType};
use prost::Message;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use crate::fixtures::{resource_name, sidecar_node};

pub use meshfed::xds::connections::Flavor;

/// Default cap of each step of a client (connecting, sending, waiting for a response).
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// Default time a client listens to check that nothing arrives (a bound, not a timing assertion).
pub const QUIET: Duration = Duration::from_millis(500);
/// The order Envoy subscribes in: clusters, then their endpoints, listeners, then their routes.
pub const TYPES: [&str; 4] = [type_url::CLUSTER, type_url::ENDPOINT, type_url::LISTENER, type_url::ROUTE];
/// Responses larger than this do not decode (large topologies answer with a few MiB).
const MAX_MESSAGE: usize = 256 << 20;

/// What goes wrong with a scripted ADS stream.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: tonic::transport::Error },
    #[error("the stream failed: {0}")]
    Status(#[from] Status),
    #[error("the server ended the stream")]
    Ended,
    #[error("the request stream is closed")]
    Closed,
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("a malformed {type_url} response: {reason}")]
    Malformed { type_url: String, reason: String },
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: String, got: String },
}

impl Error {
    /// The status the server ended (or refused) the stream with, if that is what happened.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Error::Status(s) => Some(s),
            _ => None,
        }
    }
}

/// The error detail of a NACK: `INVALID_ARGUMENT` with `message` (as Envoy reports a rejected update).
pub fn nack_status(message: impl Into<String>) -> RpcStatus {
    RpcStatus { code: Code::InvalidArgument as i32, message: message.into(), details: Vec::new() }
}

// ---------------------------------------------------------------------------------------------
// Requests and responses, whatever the flavor
// ---------------------------------------------------------------------------------------------

/// A request in either flavor's terms; [`Request::sotw`] and [`Request::delta`] leave out the fields the
/// flavor does not have.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request {
    pub type_url: String,
    pub node: Option<Node>,
    /// SotW `resource_names` (the whole subscription); Delta `resource_names_subscribe`
    pub names: Vec<String>,
    /// Delta `resource_names_unsubscribe`
    pub unsubscribe: Vec<String>,
    /// Delta `initial_resource_versions`
    pub initial_versions: HashMap<String, String>,
    /// SotW `version_info` (the version last accepted)
    pub version: String,
    pub nonce: String,
    /// the NACK's error detail
    pub error: Option<RpcStatus>,
}

impl Request {
    /// A request of `type_url` with nothing else set (an initial wildcard request).
    pub fn new(type_url: &str) -> Request {
        Request { type_url: type_url.into(), ..Request::default() }
    }

    /// With `names` (see [`Request::names`]).
    pub fn names<S: AsRef<str>>(mut self, names: &[S]) -> Request {
        self.names = names.iter().map(|n| n.as_ref().to_string()).collect();
        self
    }

    /// The request as SotW sends it.
    pub fn sotw(self) -> DiscoveryRequest {
        DiscoveryRequest {
            node: self.node,
            type_url: self.type_url,
            version_info: self.version,
            resource_names: self.names,
            response_nonce: self.nonce,
            error_detail: self.error,
            ..Default::default()
        }
    }

    /// The request as Delta sends it.
    pub fn delta(self) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: self.node,
            type_url: self.type_url,
            resource_names_subscribe: self.names,
            resource_names_unsubscribe: self.unsubscribe,
            initial_resource_versions: self.initial_versions,
            response_nonce: self.nonce,
            error_detail: self.error,
            ..Default::default()
        }
    }
}

/// One resource of a [`Response`].
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    /// Delta's `Resource.name`; SotW: read from the resource (empty for a type other than CDS, EDS, LDS
    /// and RDS)
    pub name: String,
    /// Delta's per-resource version (empty in SotW)
    pub version: String,
    /// the resource (its type URL and bytes)
    pub body: Any,
}

/// A response of either flavor. [`AdsClient::recv`] checks that it is well formed: a nonce; for CDS, EDS,
/// LDS and RDS every resource of the response's type and decodable, and (Delta) carrying its body under
/// its own name.
#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    pub flavor: Flavor,
    pub type_url: String,
    /// SotW `version_info`; Delta `system_version_info`
    pub version: String,
    pub nonce: String,
    pub resources: Vec<Resource>,
    /// Delta `removed_resources` (always empty in SotW)
    pub removed: Vec<String>,
    /// who answered (istioctl reads the identifier)
    pub control_plane: Option<ControlPlane>,
}

impl Response {
    /// Reads (and checks) a SotW response.
    pub fn from_sotw(r: DiscoveryResponse) -> Result<Response, Error> {
        let known = ResourceType::from_type_url(&r.type_url).is_some();
        let mut resources = Vec::with_capacity(r.resources.len());
        for body in r.resources {
            let name = if known {
                if body.type_url != r.type_url {
                    return Err(malformed(&r.type_url, format!("a resource of type {}", body.type_url)));
                }
                named(&r.type_url, &body)?
            } else {
                String::new()
            };
            resources.push(Resource { name, version: String::new(), body });
        }
        let response = Response {
            flavor: Flavor::Sotw,
            type_url: r.type_url,
            version: r.version_info,
            nonce: r.nonce,
            resources,
            removed: Vec::new(),
            control_plane: r.control_plane,
        };
        response.checked()
    }

    /// Reads (and checks) a Delta response.
    pub fn from_delta(r: DeltaDiscoveryResponse) -> Result<Response, Error> {
        let known = ResourceType::from_type_url(&r.type_url).is_some();
        let mut resources = Vec::with_capacity(r.resources.len());
        for res in r.resources {
            let Some(body) = res.resource else {
                return Err(malformed(&r.type_url, format!("{} without its body", res.name)));
            };
            if known {
                if body.type_url != r.type_url {
                    return Err(malformed(&r.type_url, format!("{} of type {}", res.name, body.type_url)));
                }
                let name = named(&r.type_url, &body)?;
                if name != res.name {
                    return Err(malformed(&r.type_url, format!("Resource.name {} names {name}", res.name)));
                }
            }
            resources.push(Resource { name: res.name, version: res.version, body });
        }
        let response = Response {
            flavor: Flavor::Delta,
            type_url: r.type_url,
            version: r.system_version_info,
            nonce: r.nonce,
            resources,
            removed: r.removed_resources,
            control_plane: r.control_plane,
        };
        response.checked()
    }

    fn checked(self) -> Result<Response, Error> {
        if self.nonce.is_empty() {
            return Err(malformed(&self.type_url, "no nonce".into()));
        }
        Ok(self)
    }

    /// The names of the resources sent.
    pub fn names(&self) -> BTreeSet<String> {
        self.resources.iter().map(|r| r.name.clone()).collect()
    }

    /// Name -> version of the resources sent (Delta; empty versions in SotW).
    pub fn versions(&self) -> BTreeMap<String, String> {
        self.resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect()
    }

    /// The names removed (Delta).
    pub fn removed_names(&self) -> BTreeSet<String> {
        self.removed.iter().cloned().collect()
    }

    /// The resource `name`, if it was sent.
    pub fn get(&self, name: &str) -> Option<&Resource> {
        self.resources.iter().find(|r| r.name == name)
    }

    /// The resource `name` decoded as `M`.
    pub fn decode<M: Message + Default>(&self, name: &str) -> Result<M, Error> {
        let r = self.get(name).ok_or_else(|| malformed(&self.type_url, format!("no {name} in {}", self.summary())))?;
        M::decode(r.body.value.as_slice()).map_err(|e| malformed(&self.type_url, format!("{name}: {e}")))
    }

    /// Every resource decoded as `M`, in the response's order.
    pub fn decode_all<M: Message + Default>(&self) -> Result<Vec<M>, Error> {
        self.resources
            .iter()
            .map(|r| {
                M::decode(r.body.value.as_slice()).map_err(|e| malformed(&self.type_url, format!("{}: {e}", r.name)))
            })
            .collect()
    }

    /// A line for failure messages: type, version, nonce, names, removed names.
    pub fn summary(&self) -> String {
        format!(
            "{} {} response (version {:?}, nonce {:?}) with {:?}, removed {:?}",
            self.flavor.as_str(),
            self.type_url,
            self.version,
            self.nonce,
            self.names(),
            self.removed
        )
    }
}

fn malformed(type_url: &str, reason: String) -> Error {
    Error::Malformed { type_url: type_url.into(), reason }
}

fn named(type_url: &str, body: &Any) -> Result<String, Error> {
    match resource_name(type_url, &body.value) {
        Ok(name) => Ok(name.unwrap_or_default()),
        Err(e) => Err(malformed(type_url, format!("a resource that does not decode: {e}"))),
    }
}

/// SotW sends the complete state of these types in every response (the others: the resources that
/// changed, of those subscribed).
fn full_state(type_url: &str) -> bool {
    type_url == type_url::CLUSTER || type_url == type_url::LISTENER
}

// ---------------------------------------------------------------------------------------------
// What a client holds
// ---------------------------------------------------------------------------------------------

/// One resource a client accepted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeldResource {
    /// its Delta version (empty in SotW)
    pub version: String,
    pub body: Vec<u8>,
}

/// What a client accepted of one type.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeldType {
    /// the version of the last response ACKed (SotW `version_info`, Delta `system_version_info`)
    pub version: String,
    pub resources: BTreeMap<String, HeldResource>,
}

/// What a client accepted, per type: the state it would reconnect with.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Held {
    types: BTreeMap<String, HeldType>,
}

impl Held {
    /// What is held of `type_url`, if the client accepted any response of it.
    pub fn get(&self, type_url: &str) -> Option<&HeldType> {
        self.types.get(type_url)
    }

    /// The names held of `type_url`.
    pub fn names(&self, type_url: &str) -> BTreeSet<String> {
        self.get(type_url).map(|t| t.resources.keys().cloned().collect()).unwrap_or_default()
    }

    /// Name -> version held of `type_url` (Delta).
    pub fn versions(&self, type_url: &str) -> BTreeMap<String, String> {
        self.get(type_url)
            .map(|t| t.resources.iter().map(|(n, r)| (n.clone(), r.version.clone())).collect())
            .unwrap_or_default()
    }

    /// Keeps the resources of `type_url` that `keep` accepts (e.g. a client that stops following some).
    pub fn retain(&mut self, type_url: &str, mut keep: impl FnMut(&str) -> bool) {
        if let Some(t) = self.types.get_mut(type_url) {
            t.resources.retain(|name, _| keep(name));
        }
    }

    /// Takes in an accepted response.
    fn accept(&mut self, r: &Response) {
        let held = self.types.entry(r.type_url.clone()).or_default();
        held.version = r.version.clone();
        if r.flavor == Flavor::Sotw && full_state(&r.type_url) {
            held.resources.clear();
        }
        for res in &r.resources {
            let resource = HeldResource { version: res.version.clone(), body: res.body.value.clone() };
            held.resources.insert(res.name.clone(), resource);
        }
        for name in &r.removed {
            held.resources.remove(name);
        }
    }
}

/// The names Envoy subscribes to for `type_url` given what it holds: EDS the EDS clusters' names, RDS the
/// route configs the HTTP connection managers of the listeners name (in listeners and api_listeners);
/// empty (wildcard) for CDS and LDS.
pub fn names_to_subscribe(type_url: &str, held: &Held) -> Vec<String> {
    let bodies = |t: &str| held.get(t).into_iter().flat_map(|h| h.resources.values()).map(|r| r.body.as_slice());
    let mut names = Vec::new();
    if type_url == type_url::ENDPOINT {
        for body in bodies(type_url::CLUSTER) {
            if let Ok(c) = Cluster::decode(body)
                && c.cluster_discovery_type == Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32))
            {
                names.push(c.name);
            }
        }
    } else if type_url == type_url::ROUTE {
        for body in bodies(type_url::LISTENER) {
            let Ok(l) = Listener::decode(body) else { continue };
            let hcms = l
                .filter_chains
                .iter()
                .flat_map(|fc| fc.filters.iter())
                .filter_map(|f| match &f.config_type {
                    Some(ConfigType::TypedConfig(a)) => Some(a.clone()),
                    _ => None,
                })
                .chain(l.api_listener.iter().filter_map(|a| a.api_listener.clone()));
            for any in hcms {
                if any.type_url.ends_with("HttpConnectionManager")
                    && let Ok(hcm) = HttpConnectionManager::decode(any.value.as_slice())
                    && let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier
                {
                    names.push(rds.route_config_name);
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// The type whose subscription follows `type_url`'s resources (EDS after CDS, RDS after LDS).
fn dependent(type_url: &str) -> Option<&'static str> {
    match type_url {
        type_url::CLUSTER => Some(type_url::ENDPOINT),
        type_url::LISTENER => Some(type_url::ROUTE),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/// The gRPC service a stream is opened on: ADS (every type on one stream), or the per-type EDS service
/// (`EndpointDiscoveryService`: `StreamEndpoints` and `DeltaEndpoints`) that Envoys configured by istiod
/// call for the clusters an EnvoyFilter points at meshfed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Service {
    #[default]
    Aggregated,
    Endpoints,
}

enum Requests {
    Sotw(mpsc::Sender<DiscoveryRequest>),
    Delta(mpsc::Sender<DeltaDiscoveryRequest>),
}

enum Responses {
    Sotw(Streaming<DiscoveryResponse>),
    Delta(Streaming<DeltaDiscoveryResponse>),
}

/// A type's subscription on the current stream.
#[derive(Clone, Debug, Default)]
struct Subscription {
    /// the names, in the order they were added (empty: wildcard, for CDS and LDS)
    names: Vec<String>,
    /// the latest nonce received
    nonce: String,
    /// the version last ACKed (SotW)
    accepted: String,
    /// whether a request of this type went out on this stream
    requested: bool,
}

/// A scripted ADS client of either flavor on one stream (see the module docs).
pub struct AdsClient {
    flavor: Flavor,
    requests: Requests,
    responses: Responses,
    /// the node, until the first request takes it
    node: Option<Node>,
    subscriptions: BTreeMap<String, Subscription>,
    held: Held,
    timeout: Duration,
    quiet: Duration,
}

/// A plaintext channel to `addr`, connected (bounded by [`TIMEOUT`]).
pub async fn channel(addr: SocketAddr) -> Result<Channel, Error> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|source| Error::Connect { addr: addr.to_string(), source })?;
    bounded(TIMEOUT, "connecting", endpoint.connect())
        .await?
        .map_err(|source| Error::Connect { addr: addr.to_string(), source })
}

async fn bounded<T>(after: Duration, what: &str, fut: impl Future<Output = T>) -> Result<T, Error> {
    tokio::time::timeout(after, fut).await.map_err(|_| Error::Timeout { what: what.into(), after })
}

impl AdsClient {
    /// Connects to `addr` (plaintext) and opens a stream of `flavor` as `node`.
    pub async fn connect(addr: SocketAddr, flavor: Flavor, node: Node) -> Result<AdsClient, Error> {
        AdsClient::open(channel(addr).await?, flavor, Some(node)).await
    }

    /// Opens an ADS stream of `flavor` on `channel`; `node` goes with the first request (`None`: the
    /// requests carry their own, or none).
    pub async fn open(channel: Channel, flavor: Flavor, node: Option<Node>) -> Result<AdsClient, Error> {
        AdsClient::start(channel, Service::Aggregated, flavor, node, None).await
    }

    /// Opens an ADS stream of `flavor` on `channel` with `first` queued before the call is made (the server
    /// may refuse the stream on it: that status is the error).
    pub async fn open_with(channel: Channel, flavor: Flavor, first: Request) -> Result<AdsClient, Error> {
        AdsClient::start(channel, Service::Aggregated, flavor, None, Some(first)).await
    }

    /// [`AdsClient::open`] on `service`.
    pub async fn open_service(
        channel: Channel,
        service: Service,
        flavor: Flavor,
        node: Option<Node>,
    ) -> Result<AdsClient, Error> {
        AdsClient::start(channel, service, flavor, node, None).await
    }

    /// [`AdsClient::open_with`] on `service`.
    pub async fn open_service_with(
        channel: Channel,
        service: Service,
        flavor: Flavor,
        first: Request,
    ) -> Result<AdsClient, Error> {
        AdsClient::start(channel, service, flavor, None, Some(first)).await
    }

    async fn start(
        channel: Channel,
        service: Service,
        flavor: Flavor,
        node: Option<Node>,
        first: Option<Request>,
    ) -> Result<AdsClient, Error> {
        let ads = || AggregatedDiscoveryServiceClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE);
        let eds = || EndpointDiscoveryServiceClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE);
        let (requests, responses) = match flavor {
            Flavor::Sotw => {
                let (tx, rx) = mpsc::channel(64);
                if let Some(first) = first {
                    tx.send(first.sotw()).await.map_err(|_| Error::Closed)?;
                }
                let rx = ReceiverStream::new(rx);
                let opened = match service {
                    Service::Aggregated => {
                        bounded(TIMEOUT, "the SotW stream to open", ads().stream_aggregated_resources(rx)).await
                    }
                    Service::Endpoints => {
                        bounded(TIMEOUT, "the SotW EDS stream to open", eds().stream_endpoints(rx)).await
                    }
                };
                (Requests::Sotw(tx), Responses::Sotw(opened??.into_inner()))
            }
            Flavor::Delta => {
                let (tx, rx) = mpsc::channel(64);
                if let Some(first) = first {
                    tx.send(first.delta()).await.map_err(|_| Error::Closed)?;
                }
                let rx = ReceiverStream::new(rx);
                let opened = match service {
                    Service::Aggregated => {
                        bounded(TIMEOUT, "the Delta stream to open", ads().delta_aggregated_resources(rx)).await
                    }
                    Service::Endpoints => {
                        bounded(TIMEOUT, "the Delta EDS stream to open", eds().delta_endpoints(rx)).await
                    }
                };
                (Requests::Delta(tx), Responses::Delta(opened??.into_inner()))
            }
        };
        Ok(AdsClient {
            flavor,
            requests,
            responses,
            node,
            subscriptions: BTreeMap::new(),
            held: Held::default(),
            timeout: TIMEOUT,
            quiet: QUIET,
        })
    }

    /// With other bounds: `timeout` for each step, `quiet` for [`Self::expect_silence`].
    pub fn with_timeouts(mut self, timeout: Duration, quiet: Duration) -> AdsClient {
        self.timeout = timeout;
        self.quiet = quiet;
        self
    }

    /// Starts from `held` (what an earlier stream accepted): Delta subscriptions send it as
    /// `initial_resource_versions`.
    pub fn holding(mut self, held: Held) -> AdsClient {
        self.held = held;
        self
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// The bound of each step (see [`Self::with_timeouts`]).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// What this client accepted (ACKed), per type.
    pub fn held(&self) -> &Held {
        &self.held
    }

    /// The names `type_url` is subscribed to (empty: wildcard, or not subscribed).
    pub fn subscribed(&self, type_url: &str) -> Vec<String> {
        self.subscriptions.get(type_url).map(|s| s.names.clone()).unwrap_or_default()
    }

    /// Sends `request` as it is (converted to the stream's flavor), with the node if it is the stream's
    /// first request and carries none.
    pub async fn send(&mut self, mut request: Request) -> Result<(), Error> {
        let node = self.node.take();
        if request.node.is_none() {
            request.node = node;
        }
        self.subscriptions.entry(request.type_url.clone()).or_default().requested = true;
        let sent = match &self.requests {
            Requests::Sotw(tx) => bounded(self.timeout, "sending a request", tx.send(request.sotw())).await?.is_ok(),
            Requests::Delta(tx) => bounded(self.timeout, "sending a request", tx.send(request.delta())).await?.is_ok(),
        };
        if sent { Ok(()) } else { Err(Error::Closed) }
    }

    /// Subscribes `type_url` to `names` as well (no names, on a first request: wildcard). SotW sends the
    /// whole list with the version last accepted and the latest nonce; Delta sends `names`, and on the
    /// stream's first request of the type the versions held as `initial_resource_versions`.
    pub async fn subscribe<S: AsRef<str>>(&mut self, type_url: &str, names: &[S]) -> Result<(), Error> {
        let names: Vec<String> = names.iter().map(|n| n.as_ref().to_string()).collect();
        let sub = self.subscriptions.entry(type_url.to_string()).or_default();
        for n in &names {
            if !sub.names.contains(n) {
                sub.names.push(n.clone());
            }
        }
        let request = match self.flavor {
            Flavor::Sotw => Request {
                names: sub.names.clone(),
                version: sub.accepted.clone(),
                nonce: sub.nonce.clone(),
                ..Request::new(type_url)
            },
            Flavor::Delta => {
                let initial_versions =
                    if sub.requested { HashMap::new() } else { self.held.versions(type_url).into_iter().collect() };
                Request { names, initial_versions, ..Request::new(type_url) }
            }
        };
        self.send(request).await
    }

    /// Unsubscribes `type_url` from `names` (SotW: the list without them, which may be empty; Delta:
    /// `resource_names_unsubscribe`). What is held of them is dropped.
    pub async fn unsubscribe<S: AsRef<str>>(&mut self, type_url: &str, names: &[S]) -> Result<(), Error> {
        let names: Vec<String> = names.iter().map(|n| n.as_ref().to_string()).collect();
        let sub = self.subscriptions.entry(type_url.to_string()).or_default();
        sub.names.retain(|n| !names.contains(n));
        let request = match self.flavor {
            Flavor::Sotw => Request {
                names: sub.names.clone(),
                version: sub.accepted.clone(),
                nonce: sub.nonce.clone(),
                ..Request::new(type_url)
            },
            Flavor::Delta => Request { unsubscribe: names.clone(), ..Request::new(type_url) },
        };
        self.held.retain(type_url, |n| !names.contains(&n.to_string()));
        self.send(request).await
    }

    /// Makes `type_url`'s subscription exactly `names`, as Envoy follows its clusters and listeners: SotW
    /// sends the list when it changed (never an empty list, which would mean something else); Delta sends
    /// what was added and removed, or a first request of the type.
    pub async fn set_subscription(&mut self, type_url: &str, names: &[String]) -> Result<(), Error> {
        let sub = self.subscriptions.get(type_url).cloned().unwrap_or_default();
        match self.flavor {
            Flavor::Sotw => {
                if sub.names != names && !names.is_empty() {
                    self.subscriptions.entry(type_url.to_string()).or_default().names.clear();
                    self.subscribe(type_url, names).await?;
                }
            }
            Flavor::Delta => {
                let add: Vec<&String> = names.iter().filter(|n| !sub.names.contains(n)).collect();
                let remove: Vec<String> = sub.names.iter().filter(|n| !names.contains(n)).cloned().collect();
                if !add.is_empty() || !remove.is_empty() || !sub.requested {
                    let entry = self.subscriptions.entry(type_url.to_string()).or_default();
                    entry.names = names.to_vec();
                    self.held.retain(type_url, |n| !remove.iter().any(|r| r == n));
                    let initial_versions =
                        if sub.requested { HashMap::new() } else { self.held.versions(type_url).into_iter().collect() };
                    let request = Request {
                        names: add.into_iter().cloned().collect(),
                        unsubscribe: remove,
                        initial_versions,
                        ..Request::new(type_url)
                    };
                    self.send(request).await?;
                }
            }
        }
        Ok(())
    }

    /// ACKs `response`: what it carries is now held. SotW repeats the type's subscription.
    pub async fn ack(&mut self, response: &Response) -> Result<(), Error> {
        self.ack_subscribing::<&str>(response, &[]).await
    }

    /// ACKs `response` and, in the same request, subscribes its type to `names` as well (as Envoy answers
    /// a response while the subscription changes): SotW sends the whole list with the response's version
    /// and nonce; Delta the ACK's nonce with `names` as `resource_names_subscribe`.
    pub async fn ack_subscribing<S: AsRef<str>>(&mut self, response: &Response, names: &[S]) -> Result<(), Error> {
        let names: Vec<String> = names.iter().map(|n| n.as_ref().to_string()).collect();
        let sub = self.subscriptions.entry(response.type_url.clone()).or_default();
        for n in &names {
            if !sub.names.contains(n) {
                sub.names.push(n.clone());
            }
        }
        sub.accepted = response.version.clone();
        let request = match self.flavor {
            Flavor::Sotw => Request {
                names: sub.names.clone(),
                version: response.version.clone(),
                nonce: response.nonce.clone(),
                ..Request::new(&response.type_url)
            },
            Flavor::Delta => Request { names, nonce: response.nonce.clone(), ..Request::new(&response.type_url) },
        };
        self.held.accept(response);
        self.send(request).await
    }

    /// NACKs `response` with `message` ([`nack_status`]); nothing of it is held. SotW repeats the type's
    /// subscription with the version last accepted.
    pub async fn nack(&mut self, response: &Response, message: &str) -> Result<(), Error> {
        let sub = self.subscriptions.entry(response.type_url.clone()).or_default();
        let request = Request {
            names: if self.flavor == Flavor::Sotw { sub.names.clone() } else { Vec::new() },
            version: if self.flavor == Flavor::Sotw { sub.accepted.clone() } else { String::new() },
            nonce: response.nonce.clone(),
            error: Some(nack_status(message)),
            ..Request::new(&response.type_url)
        };
        self.send(request).await
    }

    /// The next response (bounded by the client's timeout).
    pub async fn recv(&mut self) -> Result<Response, Error> {
        let timeout = self.timeout;
        self.recv_within(timeout).await?.ok_or(Error::Timeout { what: "a response".into(), after: timeout })
    }

    /// The next response, or `None` if none arrives within `wait`.
    pub async fn recv_within(&mut self, wait: Duration) -> Result<Option<Response>, Error> {
        self.recv_until(Instant::now() + wait).await
    }

    /// The next response, or `None` if none arrives before `deadline`.
    pub async fn recv_until(&mut self, deadline: Instant) -> Result<Option<Response>, Error> {
        let response = match &mut self.responses {
            Responses::Sotw(rx) => match tokio::time::timeout_at(deadline, rx.message()).await {
                Err(_) => return Ok(None),
                Ok(m) => Response::from_sotw(m?.ok_or(Error::Ended)?)?,
            },
            Responses::Delta(rx) => match tokio::time::timeout_at(deadline, rx.message()).await {
                Err(_) => return Ok(None),
                Ok(m) => Response::from_delta(m?.ok_or(Error::Ended)?)?,
            },
        };
        self.subscriptions.entry(response.type_url.clone()).or_default().nonce = response.nonce.clone();
        Ok(Some(response))
    }

    /// The next response, which must be of `type_url`.
    pub async fn recv_type(&mut self, type_url: &str) -> Result<Response, Error> {
        let r = self.recv().await?;
        if r.type_url != type_url {
            return Err(Error::Unexpected { expected: format!("a {type_url} response"), got: r.summary() });
        }
        Ok(r)
    }

    /// The next response of `type_url`, skipping (without answering) responses of other types.
    pub async fn skip_to(&mut self, type_url: &str) -> Result<Response, Error> {
        loop {
            let r = self.recv().await?;
            if r.type_url == type_url {
                return Ok(r);
            }
        }
    }

    /// Subscribes `type_url` to `names`, receives the response and ACKs it.
    pub async fn subscribe_and_ack<S: AsRef<str>>(&mut self, type_url: &str, names: &[S]) -> Result<Response, Error> {
        self.subscribe(type_url, names).await?;
        let r = self.recv_type(type_url).await?;
        self.ack(&r).await?;
        Ok(r)
    }

    /// Checks that no response arrives within the client's quiet time (`context` says when).
    pub async fn expect_silence(&mut self, context: &str) -> Result<(), Error> {
        let quiet = self.quiet;
        match self.recv_within(quiet).await? {
            None => Ok(()),
            Some(r) => Err(Error::Unexpected { expected: format!("no response {context}"), got: r.summary() }),
        }
    }

    /// The status the stream fails with (a response instead is an error).
    pub async fn expect_failure(&mut self) -> Result<Status, Error> {
        match self.recv().await {
            Err(Error::Status(status)) => Ok(status),
            Ok(r) => Err(Error::Unexpected { expected: "the stream to fail".into(), got: r.summary() }),
            Err(other) => Err(other),
        }
    }
}

/// Makes one test body, an `async fn(Flavor)`, into two tests named for their flavor:
/// `flavor_tests!(body => sotw_name, delta_name);` (optionally `-> ReturnType` after the names).
#[macro_export]
macro_rules! flavor_tests {
    ($body:path => $sotw:ident, $delta:ident $(-> $ret:ty)?) => {
        #[tokio::test]
        async fn $sotw() $(-> $ret)? {
            $body($crate::ads::Flavor::Sotw).await
        }

        #[tokio::test]
        async fn $delta() $(-> $ret)? {
            $body($crate::ads::Flavor::Delta).await
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Scripted sessions
// ---------------------------------------------------------------------------------------------

/// Everything meshfed serves `node_id` (an aws-use1 sidecar's metadata) over `flavor`, subscribing as
/// Envoy does ([`TYPES`] in order, EDS and RDS to the names [`names_to_subscribe`] gives) and ACKing every
/// response: what the client holds once each type was answered.
pub async fn fetch_all(addr: SocketAddr, flavor: Flavor, node_id: &str) -> Result<Held, Error> {
    let mut c = AdsClient::connect(addr, flavor, sidecar_node(node_id)).await?;
    for t in TYPES {
        let names = names_to_subscribe(t, c.held());
        c.subscribe(t, &names).await?;
        loop {
            let r = c.recv().await?;
            c.ack(&r).await?;
            if r.type_url == t {
                break;
            }
        }
    }
    Ok(c.held().clone())
}

/// A Delta client reconnecting as `node_id` with `held` (from an earlier stream, maybe another server's):
/// each of [`TYPES`] subscribed (CDS and LDS wildcard, EDS and RDS the names held) with the versions held as
/// `initial_resource_versions`. Returns every response: the first of each type (ACKed), then whatever
/// comes within [`QUIET`].
pub async fn delta_reconnect(addr: SocketAddr, node_id: &str, held: &Held) -> Result<Vec<Response>, Error> {
    let mut c = AdsClient::connect(addr, Flavor::Delta, sidecar_node(node_id)).await?.holding(held.clone());
    let mut out = Vec::new();
    for t in TYPES {
        let names: Vec<String> = if full_state(t) { Vec::new() } else { held.names(t).into_iter().collect() };
        c.subscribe(t, &names).await?;
        let r = c.recv().await?;
        c.ack(&r).await?;
        out.push(r);
    }
    while let Ok(Some(r)) = c.recv_within(QUIET).await {
        out.push(r);
    }
    Ok(out)
}

/// What [`hold_subscription`] saw.
#[derive(Clone, Copy, Debug)]
pub struct Session {
    /// responses received (and ACKed)
    pub responses: u64,
    /// from the start of the session (before connecting) to its first response
    pub first_response: Duration,
}

/// Connects as `node_id` (an aws-use1 sidecar's metadata) over `flavor`, subscribes to clusters and
/// listeners (then to their endpoints and routes, following them as Envoy does), waits for the first
/// response (bounded by [`TIMEOUT`]: a loaded machine may take a while to translate for a new proxy),
/// then follows pushes for `hold`, ACKing every response. Fails on an error status from the server, a
/// stream the server ends, a response that is not well formed, or no response within [`TIMEOUT`].
pub async fn hold_subscription(
    addr: SocketAddr,
    node_id: &str,
    flavor: Flavor,
    hold: Duration,
) -> Result<Session, Error> {
    let start = Instant::now();
    let mut until = start + TIMEOUT;
    let mut first_response = None;
    let mut count = 0u64;
    let mut c = AdsClient::connect(addr, flavor, sidecar_node(node_id)).await?;
    c.subscribe::<&str>(type_url::CLUSTER, &[]).await?;
    c.subscribe::<&str>(type_url::LISTENER, &[]).await?;
    loop {
        let Some(r) = c.recv_until(until).await? else {
            return match first_response {
                Some(first_response) => Ok(Session { responses: count, first_response }),
                None => Err(Error::Timeout { what: "a first response".into(), after: TIMEOUT }),
            };
        };
        count += 1;
        if first_response.is_none() {
            first_response = Some(start.elapsed());
            until = Instant::now() + hold;
        }
        c.ack(&r).await?;
        if let Some(dep) = dependent(&r.type_url) {
            let want = names_to_subscribe(dep, c.held());
            c.set_subscription(dep, &want).await?;
        }
    }
}
