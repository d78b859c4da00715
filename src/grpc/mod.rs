//! gRPC over HTTP/2, server side, as the xDS streams need it: long-lived bidirectional streams whose
//! responses are made of pre-encoded, shared resources.
//!
//! One task per connection reads and writes the socket and runs the connection's stream futures
//! ([`conn`]); a stream sees its requests as whole messages and queues its responses as chunks of shared
//! bytes ([`stream`]). Frames ([`frame`]) and headers ([`headers`], HPACK by `loona-hpack`) follow
//! RFC 9113 / RFC 7541 and gRPC's HTTP/2 protocol document. Compared with a general HTTP/2 stack
//! (hyper/h2 under tonic), a response goes from the stream to the socket without a task switch, a copy
//! of the shared resources, or a per-stream encoding buffer, and an idle connection holds no buffers.
//!
//! Clients tested against it: Envoy 1.40, gRPC C-core (Python), tonic/h2, and raw frames.

pub mod conn;
pub mod frame;
pub mod headers;
pub mod stream;
#[cfg(test)]
mod tests;

pub use conn::{Config, ConnError, Handler, StreamFuture, serve};
pub use headers::RequestHead;
pub use stream::{Closed, Message, Messages, RecvError, Responses};
