//! Nodes and resources as the tests build and read them: [`node`] builds an Envoy `Node` (id, string
//! metadata, locality), [`sidecar_node`] the demo's plain aws-use1 sidecar; [`resource_name`] reads the
//! name of a CDS/EDS/LDS/RDS resource from its bytes; [`lb_endpoint_count`] and [`endpoint_addresses`] read
//! a `ClusterLoadAssignment`.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::address::Address;
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint::HostIdentifier};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::Struct;
use meshfed::proxy::string_value;
use meshfed::type_url;
use prost::Message;

/// The metadata of a sidecar in the demo's aws-use1 (network aws-net) without traffic interception.
/// A `traffic:` section splitting ratings 70/30 from us-east-1 (aws-use1/azure-weu) and 30/70 from
/// westeurope, to append to the demo's mesh config.
pub const RATINGS_SPLIT: &str = "traffic:\n  policies:\n    - hosts: [ratings.shop.svc.cluster.local]\n      split:\n        us-east-1: {aws-use1: 70, azure-weu: 30}\n        westeurope: {azure-weu: 70, aws-use1: 30}\n";

pub const AWS_SIDECAR: [(&str, &str); 3] =
    [("CLUSTER_ID", "aws-use1"), ("NETWORK", "aws-net"), ("INTERCEPTION_MODE", "NONE")];

/// A node: `id`, `metadata` as string values, and `locality` as (region, zone) if given.
pub fn node(id: &str, metadata: &[(&str, &str)], locality: Option<(&str, &str)>) -> Node {
    Node {
        id: id.into(),
        metadata: Some(Struct { fields: metadata.iter().map(|(k, v)| (k.to_string(), string_value(v))).collect() }),
        locality: locality.map(|(region, zone)| Locality {
            region: region.into(),
            zone: zone.into(),
            sub_zone: String::new(),
        }),
        ..Default::default()
    }
}

/// A sidecar in the demo's aws-use1 ([`AWS_SIDECAR`]), without a locality.
pub fn sidecar_node(id: &str) -> Node {
    node(id, &AWS_SIDECAR, None)
}

/// The name of a resource of type `type_url` (CDS, EDS, LDS or RDS) from its bytes; `None` for another
/// type.
pub fn resource_name(type_url: &str, body: &[u8]) -> Result<Option<String>, prost::DecodeError> {
    Ok(Some(match type_url {
        type_url::CLUSTER => Cluster::decode(body)?.name,
        type_url::ENDPOINT => ClusterLoadAssignment::decode(body)?.cluster_name,
        type_url::LISTENER => Listener::decode(body)?.name,
        type_url::ROUTE => RouteConfiguration::decode(body)?.name,
        _ => return Ok(None),
    }))
}

/// How many endpoints an assignment has, over all its localities.
pub fn lb_endpoint_count(cla: &ClusterLoadAssignment) -> usize {
    cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum()
}

/// The socket addresses (IPs, without ports) of an assignment's endpoints, over all its localities.
pub fn endpoint_addresses(cla: &ClusterLoadAssignment) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in cla.endpoints.iter().flat_map(|l| &l.lb_endpoints) {
        if let Some(HostIdentifier::Endpoint(pe)) = &e.host_identifier
            && let Some(Address::SocketAddress(sa)) = pe.address.as_ref().and_then(|a| a.address.as_ref())
        {
            out.insert(sa.address.clone());
        }
    }
    out
}
