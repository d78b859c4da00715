//! What meshfed's tests and fuzz targets share (not part of the product):
//!
//! - in process: [`server`] (meshfed's [`meshfed::app::App`] on a loopback port), [`ads`] (the one scripted
//!   ADS client, SotW and Delta, and the sessions built on it), [`kube_standin`] (a Kubernetes API
//!   stand-in speaking list/watch on a loopback port), [`tls_client`] (TLS client configurations and gRPC
//!   channels for meshfed's TLS listeners);
//! - fixtures: [`demo`] (copies of the two-clouds demo, the demo as source events, its objects edited in
//!   memory), [`slices`] (a copy's EndpointSlice files edited), [`fixtures`] (nodes, resource names,
//!   ClusterLoadAssignment helpers), [`eds_shares`] (the region shares of a split as EDS weights carry them:
//!   read from an ADS response or a real Envoy, and waited for on an ADS client);
//! - processes (all re-exported at the top, as `support::X`): [`process`] (child processes, ports,
//!   polling, atomic writes), [`meshfed`] (`meshfed serve`), [`envoy`] (real Envoys, their bootstraps and
//!   admin APIs), [`ca`] (a test CA), [`http`] (HTTP backends and a client);
//! - [`fuzz`]: the fuzz targets' entry points (used by `fuzz/` and `tests/fuzz_smoke.rs`).
//!
//! Everything is bounded: every wait has a timeout, every child process is killed (and reaped) when its
//! guard is dropped, also when a test panics. All traffic stays on loopback.

pub mod ads;
pub mod ca;
pub mod demo;
pub mod eds_shares;
pub mod envoy;
pub mod fixtures;
pub mod fuzz;
pub mod http;
pub mod kube_standin;
pub mod meshfed;
pub mod process;
pub mod server;
pub mod slices;
pub mod tls_client;

pub use self::ca::*;
pub use self::envoy::*;
pub use self::http::*;
pub use self::meshfed::*;
pub use self::process::*;
