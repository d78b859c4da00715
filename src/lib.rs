//! meshfed: an xDS control plane that federates Kubernetes clusters across clouds into one Istio mesh.
//!
//! Data flows one way:
//! sources ([`source`]) -> federated registry ([`registry`]) -> translation ([`translate`], pure)
//! -> cache ([`cache`], encoded once, shared) -> xDS streams ([`xds`]). The push loop ([`push`]) drives
//! the middle; the debug surface ([`debug`]) reads the same state.

pub mod app;
pub mod bootstrap;
pub mod cache;
pub mod canonical;
pub mod config_watch;
pub mod debug;
pub mod demo;
pub mod descriptors;
pub mod duration;
pub mod gateway_dns;
pub mod global_health;
pub mod grpc;
pub mod heap;
pub mod istio;
pub mod liveness;
pub mod mesh_config;
pub mod metrics;
pub mod model;
pub mod node_id;
pub mod policy;
pub mod proxy;
pub mod push;
pub mod registry;
pub mod source;
pub mod tls;
pub mod topology;
pub mod traffic;
pub mod traffic_policy;
pub mod translate;
pub mod type_url;
pub mod xds;
