//! What meshfed's tests and fuzz targets share (not part of the product):
//!
//! - [`server`]: meshfed in process ([`meshfed::app::App`] on a loopback port) and editable copies of the demo;
//! - [`ads`]: the scripted ADS client (SotW and Delta) the tests drive streams with;
//! - [`kube_standin`]: a Kubernetes API stand-in speaking list/watch on a loopback port;
//! - [`tls_client`]: TLS client configurations and gRPC channels for meshfed's TLS listeners;
//! - [`fuzz`]: the fuzz targets' entry points (used by `fuzz/` and `tests/fuzz_smoke.rs`);
//! - [`process`] (re-exported at the top): `meshfed serve` and real Envoys as child processes, their
//!   bootstraps and admin APIs, a test CA, HTTP backends and clients, bounded polling.
//!
//! Everything is bounded: every wait has a timeout, every child process is killed (and reaped) when its
//! guard is dropped, also when a test panics. All traffic stays on loopback.

pub mod ads;
pub mod fuzz;
pub mod kube_standin;
pub mod process;
pub mod server;
pub mod tls_client;

pub use process::*;
