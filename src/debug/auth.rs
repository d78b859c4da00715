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

/// The cookie the web UI keeps the token in once a user entered it (so that links the browser follows,
/// such as a config dump or `/metrics`, carry it too).
pub const TOKEN_COOKIE: &str = "meshfed-debug-token";

/// Paths open without the token: the probes, and the web UI's static files (they hold no data; the page
/// asks for the token when the JSON endpoints answer 401).
const OPEN_PATHS: &[&str] = &["/healthz", "/ready", "/", "/ui/proxy", "/ui/app.js", "/ui/style.css", "/favicon.ico"];

/// Requires the token on every path but [`OPEN_PATHS`]: `Authorization: Bearer <token>` (Prometheus,
/// curl, istioctl) or the [`TOKEN_COOKIE`] cookie (the web UI); 401 otherwise. The comparison takes the
/// same time wherever the tokens differ.
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
            let cookie = req
                .headers()
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|c| c.trim().strip_prefix(TOKEN_COOKIE)?.strip_prefix('='));
            let matches = |p: Option<&str>| p.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes()));
            let ok = OPEN_PATHS.contains(&path) || matches(presented) || matches(cookie);
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
