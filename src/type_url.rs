//! Type URLs meshfed serves, in one place.

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// istioctl asks for the sync status of every proxy with this type URL (over ADS, node metadata
/// `GENERATOR=event`); the answer is one `envoy.service.status.v3.ClientConfig` per proxy.
pub const TYPE_DEBUG_SYNCZ: &str = "istio.io/debug/syncz";
/// istioctl asks for a proxy's config dump with this type URL (resource name `POD.NS`).
pub const TYPE_DEBUG_CONFIG_DUMP: &str = "istio.io/debug/config_dump";

/// Is `type_url` one of istioctl's debug types ([`TYPE_DEBUG_SYNCZ`], [`TYPE_DEBUG_CONFIG_DUMP`])?
pub fn is_debug_type(type_url: &str) -> bool {
    type_url == TYPE_DEBUG_SYNCZ || type_url == TYPE_DEBUG_CONFIG_DUMP
}

/// The resource types of an Envoy xDS stream, in the order Envoy applies them (CDS, EDS, LDS, RDS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum ResourceType {
    Cluster,
    Endpoint,
    Listener,
    Route,
}

impl ResourceType {
    pub const ALL: [ResourceType; 4] =
        [ResourceType::Cluster, ResourceType::Endpoint, ResourceType::Listener, ResourceType::Route];

    pub fn from_type_url(url: &str) -> Option<ResourceType> {
        Some(match url {
            CLUSTER => ResourceType::Cluster,
            ENDPOINT => ResourceType::Endpoint,
            LISTENER => ResourceType::Listener,
            ROUTE => ResourceType::Route,
            _ => return None,
        })
    }

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Cluster => CLUSTER,
            ResourceType::Endpoint => ENDPOINT,
            ResourceType::Listener => LISTENER,
            ResourceType::Route => ROUTE,
        }
    }

    /// Istio's short names (CDS, EDS, ...), used in logs and metrics.
    pub fn short(self) -> &'static str {
        match self {
            ResourceType::Cluster => "CDS",
            ResourceType::Endpoint => "EDS",
            ResourceType::Listener => "LDS",
            ResourceType::Route => "RDS",
        }
    }

    /// In SotW, Listener and Cluster responses carry the complete state; others only what changed.
    pub fn sotw_full_state(self) -> bool {
        matches!(self, ResourceType::Cluster | ResourceType::Listener)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}
