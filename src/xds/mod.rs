//! The ADS server: `StreamAggregatedResources` (SotW) and `DeltaAggregatedResources` (Delta) on one
//! gRPC port. Protocol state lives in [`stream`]; responses are written from shared, pre-encoded
//! resources by [`codec`].

use std::net::SocketAddr;

pub mod codec;
pub mod connections;
pub mod context;
mod delta;
pub mod limits;
pub mod server;
pub mod service;
pub mod session;
mod shared_push;
mod sotw;
pub mod stream;
pub mod subscription;
mod type_state;

pub use context::DebugTypes;
pub use service::{AdsConnection, AdsService, SERVICE_NAME};
pub use shared_push::SharedPushes;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Listener(#[from] server::Error),
}

/// Pending connections the xDS listeners queue (the kernel caps it at `net.core.somaxconn`). A fleet
/// reconnecting at once (a meshfed restart, a failover) would overflow the usual 128, and every refused
/// proxy waits out its back-off.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds an xDS listener on `addr` with a [`LISTEN_BACKLOG`] deep accept queue.
pub fn bind_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves ADS in plaintext on `listener` until `shutdown` resolves, then drains; without connection,
/// stream or rate limits ([`limits::Limits::unlimited`]: tests and benchmarks). `meshfed serve` uses
/// [`server::serve`] with its limits and TLS.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: AdsService,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    let options = server::ServeOptions { limits: limits::Limits::unlimited(), ..Default::default() };
    Ok(server::serve(listener, service, options, shutdown).await?)
}
