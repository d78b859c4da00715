//! The web UI: static files compiled into the binary (no CDN; it works offline) that poll the JSON
//! endpoints of the debug surface.

use axum::Router;
use axum::http::header;
use axum::response::Html;
use axum::routing::get;

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");
const FAVICON_SVG: &str = include_str!("ui/favicon.svg");

/// `router` with the UI's routes: `/`, `/ui/proxy` and `/ui/traffic` (one page; the script renders the
/// view the path names), its script, style and icon.
pub fn routes<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/ui/proxy", get(|| async { Html(INDEX_HTML) }))
        .route("/ui/traffic", get(|| async { Html(INDEX_HTML) }))
        .route("/ui/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS) }))
        .route("/ui/style.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE_CSS) }))
        .route("/favicon.ico", get(|| async { ([(header::CONTENT_TYPE, "image/svg+xml")], FAVICON_SVG) }))
}
