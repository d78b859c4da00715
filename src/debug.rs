//! The debug HTTP surface (default 127.0.0.1:15014): health, readiness, and views of the same state
//! the xDS streams read.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde_json::json;

use crate::push::PushHandle;
use crate::xds::connections::Connections;

#[derive(Clone)]
pub struct DebugState {
    pub push: PushHandle,
    pub connections: Arc<Connections>,
    /// current source errors (e.g. a topology file that does not parse)
    pub source_errors: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
}

pub fn router(state: DebugState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/debug/registryz", get(registryz))
        .route("/debug/adsz", get(adsz))
        .route("/debug/source_errors", get(source_errors))
        .with_state(state)
}

async fn ready(State(s): State<DebugState>) -> impl IntoResponse {
    if s.push.is_ready() { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") }
}

async fn registryz(State(s): State<DebugState>) -> impl IntoResponse {
    let snap = s.push.snapshot();
    let services: Vec<_> = snap.services.values().map(|s| &**s).collect();
    Json(
        json!({ "generation": snap.generation, "clusters": &*snap.clusters_summary, "services": services, "gateways": &*snap.gateways }),
    )
}

async fn adsz(State(s): State<DebugState>) -> impl IntoResponse {
    let conns: Vec<_> = s
        .connections
        .list()
        .iter()
        .map(|c| {
            json!({
                "id": c.id,
                "proxy": &*c.proxy.id,
                "key": &*c.proxy.key,
                "flavor": c.flavor.as_str(),
                "types": crate::type_url::ResourceType::ALL.iter().zip(c.status()).map(|(t, st)| (t.short(), st)).collect::<std::collections::BTreeMap<_, _>>(),
            })
        })
        .collect();
    Json(json!({ "connections": conns }))
}

async fn source_errors(State(s): State<DebugState>) -> impl IntoResponse {
    Json((s.source_errors)())
}

/// Serves the debug surface on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: DebugState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}
