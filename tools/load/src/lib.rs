//! The load generator and benchmark harness (`meshfed-load`): see BENCHMARKS.md.
//!
//! - [`topo`]: generated topologies (sizes S and L over two clouds and six zones), as source events or
//!   as files for `meshfed serve`, and the load proxies' Istio node ids.
//! - [`client`]: Envoy-like ADS streams (SotW and Delta) that ACK every response and record per-proxy
//!   receive times and bytes per type.
//! - [`eds`]: per-type EDS proxies (beside istiod): one connection per proxy, one `StreamEndpoints` or
//!   `DeltaEndpoints` stream per federated service on it.
//! - [`server`]: meshfed's pipeline in a process of its own, driven over a loopback control socket.
//! - [`floor`]: a minimal ADS server that only writes pre-encoded responses (the floor).
//! - [`bench`]: the scenarios (rows a1..e3) and their results.
//! - [`procfs`]: server and client memory and CPU from /proc.
//! - [`wire`]: the bit of protobuf wire format the client needs.
//!
//! Not used by the server itself.

pub mod bench;
pub mod client;
pub mod eds;
pub mod floor;
pub mod procfs;
pub mod server;
pub mod topo;
pub mod wire;
