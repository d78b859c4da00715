//! The global DNS health endpoint (`--global-health-address`): `GET /global/health?cluster=ID[&host=FQDN]`
//! answers 200 while that cluster (and that service in it) should receive traffic, 503 otherwise, with
//! `{"cluster":..,"host":..,"healthy":bool,"reason":".."}`; an unknown cluster or host is a 404 with the
//! same body. Route 53 and Azure Traffic Manager health checks point at it (README "Global DNS").
//!
//! It serves nothing else (404; other methods 405), needs no debug token, and answers from the newest
//! published snapshot ([`crate::traffic::health`]): a read of a watch channel, never a wait on the push
//! loop.

use std::collections::HashMap;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::cache::Snapshot;
use crate::model::{ClusterId, NetworkId};
use crate::push::PushHandle;
use crate::traffic::health::{self, Answer};

/// The path health checks ask.
pub const PATH: &str = "/global/health";

/// The answer for `cluster` (and `host`) from `snapshot`.
pub fn answer(snapshot: &Snapshot, cluster: &str, host: Option<&str>) -> Answer {
    let clusters: Vec<(ClusterId, NetworkId)> =
        snapshot.clusters_summary.iter().map(|c| (c.id.clone(), c.network.clone())).collect();
    let state = health::State {
        clusters: &clusters,
        fenced: &snapshot.gateway_verdict.fenced,
        decisions: &snapshot.context.traffic,
        status: &snapshot.traffic,
    };
    health::decide(state, cluster, host, |fqdn| find_service(snapshot, fqdn))
}

/// A service by its FQDN: `NAME.NAMESPACE.…` first, then any service with that hostname.
fn find_service<'a>(snapshot: &'a Snapshot, fqdn: &str) -> Option<&'a crate::model::Service> {
    let mut labels = fqdn.split('.');
    if let (Some(name), Some(namespace)) = (labels.next(), labels.next())
        && let Some(s) = snapshot.services.get(&crate::model::ServiceKey::new(namespace, name))
        && &*s.hostname == fqdn
    {
        return Some(s);
    }
    snapshot.services.values().find(|s| &*s.hostname == fqdn).map(|s| &**s)
}

/// Every cluster's health without host (the `meshfed_global_health` metric).
pub fn all(snapshot: &Snapshot) -> Vec<(String, bool)> {
    snapshot
        .clusters_summary
        .iter()
        .map(|c| {
            let a = answer(snapshot, c.id.as_str(), None);
            (a.cluster, a.healthy)
        })
        .collect()
}

/// The endpoint's router.
pub fn router(push: PushHandle) -> Router {
    Router::new().route(PATH, get(handle)).fallback(not_found).with_state(push)
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response {
    let text = serde_json::to_string(body).unwrap_or_else(|_| "{}".into());
    (status, [(axum::http::header::CONTENT_TYPE, "application/json")], text).into_response()
}

async fn not_found() -> Response {
    json(
        StatusCode::NOT_FOUND,
        &serde_json::json!({"reason": format!("not found: only GET {PATH}?cluster=ID[&host=FQDN]")}),
    )
}

async fn handle(State(push): State<PushHandle>, Query(q): Query<HashMap<String, String>>) -> Response {
    let Some(cluster) = q.get("cluster").filter(|c| !c.is_empty()) else {
        return json(StatusCode::BAD_REQUEST, &serde_json::json!({"reason": "missing ?cluster=ID"}));
    };
    let host = q.get("host").map(|h| h.as_str()).filter(|h| !h.is_empty());
    let snapshot = push.snapshot();
    let a = answer(&snapshot, cluster, host);
    let status = if a.unknown {
        StatusCode::NOT_FOUND
    } else if a.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, &a)
}

/// Serves the endpoint on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    push: PushHandle,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(push)).with_graceful_shutdown(shutdown).await
}
