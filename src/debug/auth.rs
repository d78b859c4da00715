//! Who may read the debug surface when it is exposed beyond loopback: a bearer token on every request but
//! the probes, and/or TLS.

use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

/// How the debug server is protected when it is exposed beyond loopback (`meshfed serve` requires one
/// of the two there).
#[derive(Clone, Debug, Default)]
pub struct DebugAccess {
    /// every request but `/healthz` and `/ready` must carry `Authorization: Bearer <token>`
    pub token: Option<Arc<str>>,
    /// serve HTTPS with this configuration
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Requires `Authorization: Bearer <token>` on every path but the probes (`/healthz`, `/ready`); 401
/// otherwise. The comparison takes the same time wherever the tokens differ.
pub fn require_bearer_token(router: Router, token: Arc<str>) -> Router {
    router.layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
        let token = token.clone();
        async move {
            let path = req.uri().path();
            let presented = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            let ok = matches!(path, "/healthz" | "/ready")
                || presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes()));
            if ok {
                next.run(req).await
            } else {
                (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "a bearer token is required\n")
                    .into_response()
            }
        }
    }))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret-token", b"secret-token"));
        assert!(!constant_time_eq(b"secret-token", b"secret-tokeN"));
        assert!(!constant_time_eq(b"secret-token", b"secret-token-longer"));
        assert!(!constant_time_eq(b"secret", b""));
    }
}
