//! What a stream is given and where it writes: its connection (identity, limits), the listener's drain
//! signal, the answers to istioctl's debug types ([`DebugTypes`]), and its [`Outbox`].

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tonic::Status;
use tracing::{debug, warn};

use super::codec::Response;
use super::limits::ConnInfo;
use crate::grpc;
use crate::proxy::Proxy;
use crate::tls::PeerAuth;

/// Outcome of processing, when the stream must end.
pub type StreamResult = Result<(), Status>;

/// What the xDS streams answer to istioctl's debug types ([`crate::type_url::TYPE_DEBUG_SYNCZ`],
/// [`crate::type_url::TYPE_DEBUG_CONFIG_DUMP`]). The debug surface implements it and the application hands
/// it to [`super::AdsService::with_debug`]; the streams decide who may see what (a workload identity sees
/// only its own namespace's proxies) and know nothing of how the answers are made.
pub trait DebugTypes: Send + Sync + std::fmt::Debug {
    /// The resources (name, body) answering `type_url` for the requested `names`; empty when there are none.
    fn resources(&self, type_url: &str, names: &[String]) -> Vec<(String, envoy_types::pb::google::protobuf::Any)>;
}

/// What a stream knows of its connection and listener.
#[derive(Clone, Debug, Default)]
pub struct StreamContext {
    /// None outside a listener (in-process use)
    pub conn: Option<ConnInfo>,
    /// this stream's place under the connection's stream limit
    pub slot: Option<std::sync::Arc<super::limits::StreamSlot>>,
    /// becomes true when the listener drains
    pub drain: Option<watch::Receiver<bool>>,
    /// answers istioctl's debug types
    pub debug: Option<Arc<dyn DebugTypes>>,
}

impl StreamContext {
    pub(super) fn peer(&self) -> &PeerAuth {
        self.conn.as_ref().map(|c| &c.0.peer).unwrap_or(&PeerAuth::Anonymous)
    }

    /// With mTLS, a proxy may only ask for the config of its own namespace: the namespace of its node
    /// id must be the one of its certificate's SPIFFE identity.
    pub(super) fn check_identity(&self, proxy: &Proxy) -> StreamResult {
        match self.peer() {
            PeerAuth::Anonymous => Ok(()),
            PeerAuth::Unusable(reason) => Err(Status::permission_denied(format!("meshfed: {reason}"))),
            PeerAuth::Workload(id) if id.namespace == *proxy.namespace => Ok(()),
            PeerAuth::Workload(id) => Err(Status::permission_denied(format!(
                "meshfed: identity {id} may not ask for the config of namespace {:?} (node id {})",
                &*proxy.namespace, proxy.id
            ))),
        }
    }

    /// Who may read istioctl's debug types over xDS (as istiod with `ENABLE_DEBUG_ENDPOINT_AUTH`): a
    /// workload identity of the system namespace sees every proxy, any other workload identity only the
    /// proxies of its namespace (`Ok(Some(ns))`). A caller without an identity is served only on a loopback
    /// connection (`istioctl` through `kubectl port-forward`, or in-process), else PERMISSION_DENIED.
    pub(super) fn debug_scope(&self) -> Result<Option<&str>, Status> {
        match self.peer() {
            PeerAuth::Workload(id) if id.namespace != crate::registry::SYSTEM_NAMESPACE => Ok(Some(&id.namespace)),
            PeerAuth::Workload(_) => Ok(None),
            PeerAuth::Unusable(reason) => Err(Status::permission_denied(format!("meshfed: {reason}"))),
            PeerAuth::Anonymous => {
                let remote = self.conn.as_ref().and_then(|c| c.0.remote);
                if remote.is_none_or(|a| a.ip().is_loopback()) {
                    Ok(None)
                } else {
                    Err(Status::permission_denied(
                        "meshfed: istio.io/debug/* over xDS needs an authenticated caller (a mesh certificate on \
                         the mTLS port) or a loopback connection",
                    ))
                }
            }
        }
    }

    /// Takes a request token from the connection's rate limit.
    pub(super) fn admit_request(&self) -> StreamResult {
        match &self.conn {
            Some(c) => c.0.take_request_token(),
            None => Ok(()),
        }
    }
}

/// The namespace of a proxy named `POD.NS` or by its full node id.
pub(super) fn proxy_namespace(name: &str) -> Option<String> {
    if name.contains('~') {
        crate::node_id::parse_node_id(name).ok().map(|p| p.namespace)
    } else {
        name.rsplit_once('.').map(|(_, ns)| ns.to_string())
    }
}

/// How a stream whose requests fail to arrive ends: a request over the size limit is refused with
/// RESOURCE_EXHAUSTED, a compressed one with INTERNAL (compression was not negotiated); anything else is
/// the client going away.
pub(super) fn request_error(e: grpc::RecvError) -> StreamResult {
    match e {
        grpc::RecvError::TooLarge { .. } => {
            warn!(error = %e, "request over the message size limit");
            crate::metrics::global().record_refusal(crate::metrics::Refusal::MessageSize);
            Err(Status::resource_exhausted(format!("meshfed: {e}")))
        }
        grpc::RecvError::Compressed => Err(Status::internal(format!("meshfed: {e}"))),
        _ => {
            debug!(error = %e, "stream ended by the client");
            Ok(())
        }
    }
}

/// Where a stream's responses go: the gRPC stream, or (in-process drivers such as the fuzz targets) a
/// channel.
#[derive(Debug)]
pub enum Outbox {
    Grpc(grpc::Responses),
    Channel(mpsc::Sender<Result<Response, Status>>),
}

impl Outbox {
    pub(super) async fn send(&mut self, response: Response) -> StreamResult {
        let gone = || Status::cancelled("client went away");
        match self {
            Outbox::Grpc(r) => {
                let mut chunks = std::collections::VecDeque::new();
                response.grpc_chunks(&mut chunks);
                r.send(chunks).await.map_err(|_| gone())
            }
            Outbox::Channel(tx) => tx.send(Ok(response)).await.map_err(|_| gone()),
        }
    }

    /// Ends the stream with `status`.
    pub(super) async fn finish(&mut self, status: Status) {
        match self {
            Outbox::Grpc(r) => r.finish(status.code() as i32, status.message()),
            Outbox::Channel(tx) => {
                if status.code() != tonic::Code::Ok {
                    let _ = tx.send(Err(status)).await;
                }
            }
        }
    }
}

/// Resolves when the listener drains (never without a drain signal).
pub(super) async fn drained(drain: &mut Option<watch::Receiver<bool>>) {
    match drain {
        Some(rx) => {
            let _ = rx.wait_for(|d| *d).await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::tls::SpiffeId;
    use crate::xds::limits::{ConnState, Limits};

    fn context(remote: Option<&str>, peer: PeerAuth) -> StreamContext {
        let remote = remote.map(|r| r.parse().unwrap());
        let state = ConnState::new(remote, peer, true, Arc::new(Limits::default()), Arc::default());
        StreamContext { conn: Some(ConnInfo(Arc::new(state))), ..Default::default() }
    }

    fn workload(ns: &str) -> PeerAuth {
        PeerAuth::Workload(SpiffeId::parse(&format!("spiffe://cluster.local/ns/{ns}/sa/x")).unwrap())
    }

    #[test]
    fn debug_types_need_an_identity_or_loopback() {
        // istio-system sees everything; another namespace only itself
        assert_eq!(context(Some("10.0.0.1:5000"), workload("istio-system")).debug_scope().unwrap(), None);
        assert_eq!(context(Some("10.0.0.1:5000"), workload("shop")).debug_scope().unwrap(), Some("shop"));
        // without an identity: loopback (port-forward, in-process) only
        assert_eq!(context(Some("127.0.0.1:5000"), PeerAuth::Anonymous).debug_scope().unwrap(), None);
        assert_eq!(context(Some("[::1]:5000"), PeerAuth::Anonymous).debug_scope().unwrap(), None);
        assert_eq!(StreamContext::default().debug_scope().unwrap(), None);
        let denied = context(Some("10.0.0.1:5000"), PeerAuth::Anonymous).debug_scope().unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("authenticated"), "{}", denied.message());
        let unusable = context(Some("10.0.0.1:5000"), PeerAuth::Unusable("no SPIFFE id".into()));
        assert_eq!(unusable.debug_scope().unwrap_err().code(), tonic::Code::PermissionDenied);
    }
}
