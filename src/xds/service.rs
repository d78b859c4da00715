//! The xDS gRPC services a listener serves, and how each opens its streams: the aggregated
//! `StreamAggregatedResources` (SotW) and `DeltaAggregatedResources` (Delta), and the per-type EDS
//! service `StreamEndpoints` (SotW) and `DeltaEndpoints` (Delta) that Envoys configured by istiod call
//! for the clusters an EnvoyFilter points at meshfed (one stream per cluster, all on one connection).

use std::sync::Arc;

use tonic::Status;

use super::connections::{Connections, Flavor, XdsService};
use super::context::{DebugTypes, StreamContext};
use super::limits::ConnInfo;
use super::shared_push::SharedPushes;
use super::stream::{Outbox, Stream};
use crate::grpc;
use crate::push::PushHandle;

pub const SERVICE_NAME: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const SOTW_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const EDS_SOTW_PATH: &str = "/envoy.service.endpoint.v3.EndpointDiscoveryService/StreamEndpoints";
const EDS_DELTA_PATH: &str = "/envoy.service.endpoint.v3.EndpointDiscoveryService/DeltaEndpoints";

/// The ADS gRPC service.
#[derive(Clone, Debug)]
pub struct AdsService {
    push: PushHandle,
    connections: Arc<Connections>,
    /// answers istioctl's debug types (None: they get empty answers)
    debug: Option<Arc<dyn DebugTypes>>,
    /// becomes true when the listener drains: every stream ends with UNAVAILABLE
    drain: Option<tokio::sync::watch::Receiver<bool>>,
    /// what pushes work out once for all the streams they do the same to
    shared: Arc<SharedPushes>,
}

impl AdsService {
    pub fn new(push: PushHandle, connections: Arc<Connections>) -> AdsService {
        AdsService { push, connections, debug: None, drain: None, shared: Arc::default() }
    }

    /// The service answering istioctl's debug types with `debug`.
    pub fn with_debug(mut self, debug: Arc<dyn DebugTypes>) -> AdsService {
        self.debug = Some(debug);
        self
    }

    /// The service as a listener runs it: with its drain signal.
    pub fn with_drain(mut self, drain: tokio::sync::watch::Receiver<bool>) -> AdsService {
        self.drain = Some(drain);
        self
    }

    /// Per stream: the connection's info (identity, limits; refused over the connection limit) and the
    /// drain signal.
    fn stream_context(&self, conn: Option<&ConnInfo>) -> Result<StreamContext, Status> {
        let slot = match conn {
            Some(c) => {
                c.0.admit()?;
                Some(Arc::new(c.0.open_stream()?))
            }
            None => None,
        };
        Ok(StreamContext { conn: conn.cloned(), slot, drain: self.drain.clone(), debug: self.debug.clone() })
    }

    pub fn connections(&self) -> &Arc<Connections> {
        &self.connections
    }

    /// The service for the streams of one connection.
    pub fn for_connection(&self, conn: Option<ConnInfo>) -> AdsConnection {
        AdsConnection { service: self.clone(), conn }
    }
}

/// The ADS service on one connection: opens its streams.
#[derive(Debug)]
pub struct AdsConnection {
    service: AdsService,
    conn: Option<ConnInfo>,
}

impl grpc::Handler for AdsConnection {
    /// Opens one ADS or per-type EDS stream: refused (a trailers-only response) for an unknown method, over the
    /// connection's stream limit, or with a request compression meshfed does not speak; otherwise a
    /// [`Stream`] runs it.
    fn open(
        &mut self,
        head: grpc::RequestHead,
        messages: grpc::Messages,
        responses: grpc::Responses,
    ) -> Result<grpc::StreamFuture, Status> {
        let (flavor, service) = match head.path.as_str() {
            SOTW_PATH => (Flavor::Sotw, XdsService::Ads),
            DELTA_PATH => (Flavor::Delta, XdsService::Ads),
            EDS_SOTW_PATH => (Flavor::Sotw, XdsService::Endpoints),
            EDS_DELTA_PATH => (Flavor::Delta, XdsService::Endpoints),
            _ => return Err(Status::unimplemented(format!("unknown method {}", head.path))),
        };
        if let Some(enc) = head.grpc_encoding.as_deref()
            && enc != "identity"
        {
            return Err(Status::unimplemented(format!("request compression {enc:?} is not supported")));
        }
        let context = self.service.stream_context(self.conn.as_ref())?;
        let svc = &self.service;
        let stream = Stream::new(flavor, svc.push.clone(), svc.connections.clone(), Outbox::Grpc(responses))
            .with_context(context)
            .sharing(svc.shared.clone())
            .for_service(service);
        Ok(Box::pin(stream.run(messages)))
    }
}
