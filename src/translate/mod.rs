//! Translation: (federated registry, proxy view) -> Envoy resources. Pure: no I/O, no clock.
//!
//! Each resource type depends on only part of a proxy's identity — its *scope*. Proxies with equal
//! scopes get identical resources, so the cache translates and encodes once per scope and shares the
//! result: CDS depends on the proxy kind; EDS on kind, network and locality (priorities, split
//! horizon); LDS on kind, interception mode and bind address; RDS on kind and namespace (short names).

use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::mesh_config::{MeshConfig, OutlierDetection};
use crate::model::{Locality, NetworkId};
use crate::proxy::{InterceptionMode, Proxy, ProxyKind};
use crate::registry::Registry;

pub mod cluster;
pub mod endpoint;
pub mod listener;
pub mod route;
#[cfg(test)]
mod tests;
mod util;

/// Mesh-wide settings translation reads.
#[derive(Clone, Debug, PartialEq)]
pub struct Context {
    pub domain_suffix: Arc<str>,
    pub send_unhealthy_endpoints: bool,
    pub default_outlier_detection: Option<OutlierDetection>,
}

impl Context {
    pub fn from_mesh(mesh: &MeshConfig) -> Context {
        Context {
            domain_suffix: mesh.domain_suffix.as_str().into(),
            send_unhealthy_endpoints: mesh.send_unhealthy_endpoints,
            default_outlier_detection: mesh.default_outlier_detection.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ClusterScope {
    pub kind: ProxyKind,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct EndpointScope {
    pub kind: ProxyKind,
    pub network: NetworkId,
    pub locality: Locality,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ListenerScope {
    pub kind: ProxyKind,
    pub interception: InterceptionMode,
    /// the address outbound listeners bind to (interception NONE), else None
    pub bind: Option<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RouteScope {
    pub kind: ProxyKind,
    pub namespace: Arc<str>,
}

/// Everything a proxy's resources depend on, one scope per resource type.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct View {
    pub clusters: ClusterScope,
    pub endpoints: EndpointScope,
    pub listeners: ListenerScope,
    pub routes: RouteScope,
}

impl View {
    /// The view of a proxy. Its network is node metadata NETWORK, else its cluster's network.
    pub fn of(proxy: &Proxy, registry: &Registry) -> View {
        let network = if proxy.network.is_empty() {
            proxy.cluster_id.as_ref().and_then(|c| registry.cluster_network(c)).unwrap_or_default()
        } else {
            proxy.network.clone()
        };
        View::with_network(proxy, network)
    }

    /// The view of a proxy whose network is already resolved.
    pub fn with_network(proxy: &Proxy, network: NetworkId) -> View {
        View {
            clusters: ClusterScope { kind: proxy.kind },
            endpoints: EndpointScope { kind: proxy.kind, network, locality: proxy.locality.clone() },
            listeners: ListenerScope {
                kind: proxy.kind,
                interception: proxy.interception,
                bind: (proxy.interception == InterceptionMode::None).then_some(proxy.ip),
            },
            routes: RouteScope { kind: proxy.kind, namespace: proxy.namespace.clone() },
        }
    }
}

/// A translated resource and whether a wildcard subscription includes it (gRPC api_listeners are
/// served only to clients that name them).
#[derive(Clone, Debug, PartialEq)]
pub struct Named<T> {
    pub name: String,
    pub resource: T,
    pub wildcard: bool,
}

impl<T> Named<T> {
    pub fn new(name: impl Into<String>, resource: T) -> Self {
        Named { name: name.into(), resource, wildcard: true }
    }
}

/// `outbound|PORT|SUBSET|FQDN`
pub fn outbound_cluster_name(port: u16, subset: &str, fqdn: &str) -> String {
    format!("outbound|{port}|{subset}|{fqdn}")
}

/// Parses `outbound|PORT|SUBSET|FQDN` into (port, subset, fqdn).
pub fn parse_outbound_cluster_name(name: &str) -> Option<(u16, &str, &str)> {
    let mut it = name.splitn(4, '|');
    if it.next()? != "outbound" {
        return None;
    }
    let port = it.next()?.parse().ok()?;
    let subset = it.next()?;
    let fqdn = it.next()?;
    Some((port, subset, fqdn))
}

pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
