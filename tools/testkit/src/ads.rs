//! Scripted ADS clients for the integration tests (in process, over loopback): they subscribe the way
//! Envoy does (clusters, then the endpoints of the EDS clusters; listeners, then the route configs their
//! HTTP connection managers name), ACK every response, and report what they received.
//!
//! - [`sotw_all`]: one SotW fetch of everything, per type: version_info and name -> resource bytes;
//! - [`delta_versions`] / [`delta_reconnect`]: a Delta client's versions, and a reconnect that reports
//!   them as `initial_resource_versions`;
//! - [`hold_subscription`]: a SotW or Delta client that gets its first response (bounded by [`TIMEOUT`])
//!   and then keeps following pushes for a while.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster::ClusterDiscoveryType, cluster::DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Struct;
use meshfed::proxy::string_value;
use meshfed::type_url;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Cap of each step of a scripted client.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`delta_reconnect`] listens for responses beyond the first of each type.
pub const QUIET: Duration = Duration::from_millis(500);
/// The order a client subscribes in (as Envoy does: clusters, then their endpoints, listeners, routes).
pub const TYPES: [&str; 4] = [type_url::CLUSTER, type_url::ENDPOINT, type_url::LISTENER, type_url::ROUTE];

async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(TIMEOUT, fut).await.map_err(|_| anyhow!("timed out after {TIMEOUT:?}: {what}"))
}

pub fn client_node(id: &str) -> Node {
    let meta = [("CLUSTER_ID", "aws-use1"), ("NETWORK", "aws-net"), ("INTERCEPTION_MODE", "NONE")];
    Node {
        id: id.into(),
        metadata: Some(Struct { fields: meta.iter().map(|(k, v)| (k.to_string(), string_value(v))).collect() }),
        ..Default::default()
    }
}

pub async fn client(addr: SocketAddr) -> Result<AggregatedDiscoveryServiceClient<tonic::transport::Channel>> {
    let channel =
        bounded("connecting", tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect()).await??;
    Ok(AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20))
}

/// The names a client subscribes to for `t` after receiving `held` (CDS and LDS: wildcard).
pub fn names_to_subscribe(t: &str, held: &BTreeMap<&'static str, BTreeMap<String, Vec<u8>>>) -> Vec<String> {
    let mut names = Vec::new();
    if t == type_url::ENDPOINT {
        for body in held.get(type_url::CLUSTER).into_iter().flat_map(|m| m.values()) {
            if let Ok(c) = Cluster::decode(body.as_slice())
                && c.cluster_discovery_type == Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32))
            {
                names.push(c.name);
            }
        }
    } else if t == type_url::ROUTE {
        for body in held.get(type_url::LISTENER).into_iter().flat_map(|m| m.values()) {
            let Ok(l) = Listener::decode(body.as_slice()) else { continue };
            let hcms = l
                .filter_chains
                .iter()
                .flat_map(|fc| fc.filters.iter())
                .filter_map(|f| match &f.config_type {
                    Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(a)) => {
                        Some(a.clone())
                    }
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

/// Everything meshfed serves `node_id` over SotW: per type, the version_info and name -> resource bytes.
pub async fn sotw_all(
    addr: SocketAddr,
    node_id: &str,
) -> Result<BTreeMap<&'static str, (String, BTreeMap<String, Vec<u8>>)>> {
    let mut client = client(addr).await?;
    let (tx, rx) = mpsc::channel(16);
    let mut responses =
        bounded("SotW stream", client.stream_aggregated_resources(ReceiverStream::new(rx))).await??.into_inner();
    let mut out = BTreeMap::new();
    let mut held: BTreeMap<&'static str, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    for (i, t) in TYPES.into_iter().enumerate() {
        let names = names_to_subscribe(t, &held);
        tx.send(DiscoveryRequest {
            node: (i == 0).then(|| client_node(node_id)),
            type_url: t.into(),
            resource_names: names,
            ..Default::default()
        })
        .await?;
        let r: DiscoveryResponse = loop {
            let r = bounded("a SotW response", responses.message()).await??.ok_or_else(|| anyhow!("stream ended"))?;
            // ACK everything, keep what was asked for
            tx.send(DiscoveryRequest {
                type_url: r.type_url.clone(),
                version_info: r.version_info.clone(),
                response_nonce: r.nonce.clone(),
                resource_names: names_to_subscribe(type_static(&r.type_url), &held),
                ..Default::default()
            })
            .await?;
            if r.type_url == t {
                break r;
            }
        };
        let mut by_name = BTreeMap::new();
        for any in &r.resources {
            by_name.insert(resource_name(t, &any.value)?, any.value.clone());
        }
        held.insert(t, by_name.clone());
        out.insert(t, (r.version_info, by_name));
    }
    Ok(out)
}

pub fn type_static(t: &str) -> &'static str {
    TYPES.into_iter().find(|x| *x == t).unwrap_or("")
}

pub fn resource_name(t: &str, body: &[u8]) -> Result<String> {
    use envoy_types::pb::envoy::config::{endpoint::v3::ClusterLoadAssignment, route::v3::RouteConfiguration};
    Ok(match t {
        type_url::CLUSTER => Cluster::decode(body)?.name,
        type_url::ENDPOINT => ClusterLoadAssignment::decode(body)?.cluster_name,
        type_url::LISTENER => Listener::decode(body)?.name,
        type_url::ROUTE => RouteConfiguration::decode(body)?.name,
        other => bail!("unexpected type {other}"),
    })
}

pub type Versions = BTreeMap<&'static str, BTreeMap<String, String>>;

/// A Delta client's state after subscribing to everything as Envoy would: per type, name -> version.
pub async fn delta_versions(addr: SocketAddr, node_id: &str) -> Result<Versions> {
    let mut client = client(addr).await?;
    let (tx, rx) = mpsc::channel(16);
    let mut responses =
        bounded("Delta stream", client.delta_aggregated_resources(ReceiverStream::new(rx))).await??.into_inner();
    let mut versions = Versions::new();
    let mut held: BTreeMap<&'static str, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    for (i, t) in TYPES.into_iter().enumerate() {
        tx.send(DeltaDiscoveryRequest {
            node: (i == 0).then(|| client_node(node_id)),
            type_url: t.into(),
            resource_names_subscribe: names_to_subscribe(t, &held),
            ..Default::default()
        })
        .await?;
        loop {
            let r: DeltaDiscoveryResponse =
                bounded("a Delta response", responses.message()).await??.ok_or_else(|| anyhow!("stream ended"))?;
            tx.send(DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            })
            .await?;
            let rt = type_static(&r.type_url);
            for res in &r.resources {
                versions.entry(rt).or_default().insert(res.name.clone(), res.version.clone());
                let body = res.resource.as_ref().map(|a| a.value.clone()).unwrap_or_default();
                held.entry(rt).or_default().insert(res.name.clone(), body);
            }
            for n in &r.removed_resources {
                versions.entry(rt).or_default().remove(n);
                held.entry(rt).or_default().remove(n);
            }
            if rt == t {
                break;
            }
        }
    }
    Ok(versions)
}

/// Reconnects a Delta client with `versions` as its `initial_resource_versions`: returns every response it
/// gets (the first one of each type, then whatever comes within [`QUIET`]).
pub async fn delta_reconnect(
    addr: SocketAddr,
    node_id: &str,
    versions: &Versions,
) -> Result<Vec<DeltaDiscoveryResponse>> {
    let mut client = client(addr).await?;
    let (tx, rx) = mpsc::channel(16);
    let mut responses =
        bounded("Delta stream", client.delta_aggregated_resources(ReceiverStream::new(rx))).await??.into_inner();
    let mut out = Vec::new();
    for (i, t) in TYPES.into_iter().enumerate() {
        let held = versions.get(t).cloned().unwrap_or_default();
        let wildcard = t == type_url::CLUSTER || t == type_url::LISTENER;
        tx.send(DeltaDiscoveryRequest {
            node: (i == 0).then(|| client_node(node_id)),
            type_url: t.into(),
            resource_names_subscribe: if wildcard { Vec::new() } else { held.keys().cloned().collect() },
            initial_resource_versions: held.into_iter().collect(),
            ..Default::default()
        })
        .await?;
        let r = bounded("a Delta response", responses.message()).await??.ok_or_else(|| anyhow!("stream ended"))?;
        tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await?;
        out.push(r);
    }
    while let Ok(Ok(Some(r))) = tokio::time::timeout(QUIET, responses.message()).await {
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

/// Connects as `node_id` (SotW or Delta), waits for the first response (bounded by [`TIMEOUT`]: a loaded
/// machine may take a while to translate for a new proxy), then follows pushes for `hold`, ACKing every
/// response. Fails on an error status from the server, a stream the server ends, a response that does
/// not decode, or no response within [`TIMEOUT`].
pub async fn hold_subscription(addr: SocketAddr, node_id: &str, delta: bool, hold: Duration) -> Result<Session> {
    let start = tokio::time::Instant::now();
    let mut until = start + TIMEOUT;
    let mut first_response = None;
    let mut client = client(addr).await?;
    let mut held: BTreeMap<&'static str, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    let mut subscribed: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let mut count = 0u64;
    // the session once it ends at its deadline: no response at all is an error
    let ended = |count: u64, first: Option<Duration>| match first {
        Some(first_response) => Ok(Session { responses: count, first_response }),
        None => Err(anyhow!("no response within {TIMEOUT:?}")),
    };
    if delta {
        let (tx, rx) = mpsc::channel(64);
        let mut responses =
            bounded("Delta stream", client.delta_aggregated_resources(ReceiverStream::new(rx))).await??.into_inner();
        for (i, t) in [type_url::CLUSTER, type_url::LISTENER].into_iter().enumerate() {
            let node = (i == 0).then(|| client_node(node_id));
            tx.send(DeltaDiscoveryRequest { node, type_url: t.into(), ..Default::default() }).await?;
        }
        loop {
            let r: DeltaDiscoveryResponse = match tokio::time::timeout_at(until, responses.message()).await {
                Err(_) => return ended(count, first_response),
                Ok(r) => r?.ok_or_else(|| anyhow!("the server ended the stream"))?,
            };
            count += 1;
            if first_response.is_none() {
                first_response = Some(start.elapsed());
                until = tokio::time::Instant::now() + hold;
            }
            let t = type_static(&r.type_url);
            let h = held.entry(t).or_default();
            for res in &r.resources {
                h.insert(res.name.clone(), res.resource.as_ref().map(|a| a.value.clone()).unwrap_or_default());
            }
            for n in &r.removed_resources {
                h.remove(n);
            }
            tx.send(DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce,
                ..Default::default()
            })
            .await?;
            if let Some(dep) = dependent(t) {
                let want = names_to_subscribe(dep, &held);
                let had = subscribed.remove(dep).unwrap_or_default();
                let subscribe: Vec<String> = want.iter().filter(|n| !had.contains(n)).cloned().collect();
                let unsubscribe: Vec<String> = had.iter().filter(|n| !want.contains(n)).cloned().collect();
                if !subscribe.is_empty() || !unsubscribe.is_empty() || !held.contains_key(dep) {
                    tx.send(DeltaDiscoveryRequest {
                        type_url: dep.into(),
                        resource_names_subscribe: subscribe,
                        resource_names_unsubscribe: unsubscribe,
                        ..Default::default()
                    })
                    .await?;
                    held.entry(dep).or_default();
                }
                subscribed.insert(dep, want);
            }
        }
    } else {
        let (tx, rx) = mpsc::channel(64);
        let mut responses =
            bounded("SotW stream", client.stream_aggregated_resources(ReceiverStream::new(rx))).await??.into_inner();
        for (i, t) in [type_url::CLUSTER, type_url::LISTENER].into_iter().enumerate() {
            let node = (i == 0).then(|| client_node(node_id));
            tx.send(DiscoveryRequest { node, type_url: t.into(), ..Default::default() }).await?;
        }
        let mut last: BTreeMap<&'static str, (String, String)> = BTreeMap::new();
        loop {
            let r: DiscoveryResponse = match tokio::time::timeout_at(until, responses.message()).await {
                Err(_) => return ended(count, first_response),
                Ok(r) => r?.ok_or_else(|| anyhow!("the server ended the stream"))?,
            };
            count += 1;
            if first_response.is_none() {
                first_response = Some(start.elapsed());
                until = tokio::time::Instant::now() + hold;
            }
            let t = type_static(&r.type_url);
            let full_state = t == type_url::CLUSTER || t == type_url::LISTENER;
            let h = held.entry(t).or_default();
            if full_state {
                h.clear();
            }
            for any in &r.resources {
                h.insert(resource_name(t, &any.value)?, any.value.clone());
            }
            last.insert(t, (r.version_info.clone(), r.nonce.clone()));
            tx.send(DiscoveryRequest {
                type_url: r.type_url.clone(),
                version_info: r.version_info,
                response_nonce: r.nonce,
                resource_names: subscribed.get(t).cloned().unwrap_or_default(),
                ..Default::default()
            })
            .await?;
            if let Some(dep) = dependent(t) {
                let want = names_to_subscribe(dep, &held);
                if subscribed.get(dep) != Some(&want) && !want.is_empty() {
                    let (version_info, response_nonce) = last.get(dep).cloned().unwrap_or_default();
                    tx.send(DiscoveryRequest {
                        type_url: dep.into(),
                        version_info,
                        response_nonce,
                        resource_names: want.clone(),
                        ..Default::default()
                    })
                    .await?;
                    subscribed.insert(dep, want);
                }
            }
        }
    }
}

/// The type whose subscription follows `t`'s resources (EDS after CDS, RDS after LDS).
fn dependent(t: &str) -> Option<&'static str> {
    match t {
        type_url::CLUSTER => Some(type_url::ENDPOINT),
        type_url::LISTENER => Some(type_url::ROUTE),
        _ => None,
    }
}
