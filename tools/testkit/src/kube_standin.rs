//! Test support: a Kubernetes API server stand-in speaking the list/watch protocol kube-rs uses, on a
//! loopback port. Used by the integration tests (`tests/kube_source.rs`) and benchmarks; never by the
//! server itself.
//!
//! What it serves (GET, and the apply PATCH of `meshfed istio --apply` on ConfigMaps and EnvoyFilters), for
//! the kinds meshfed reads plus Secrets, ConfigMaps and `networking.istio.io/v1alpha3` EnvoyFilters:
//!
//! - `/api/v1/{namespaces,nodes,services,pods,secrets}`, `/api/v1/namespaces/NS/{services,pods,secrets}`,
//!   `/apis/discovery.k8s.io/v1[/namespaces/NS]/endpointslices`,
//!   `/apis/networking.istio.io/v1[/namespaces/NS]/destinationrules` (404 while [`KubeStandin::set_absent`]
//!   says the CRD is not installed);
//! - **list**: `?limit=N&continue=TOKEN` pages over a consistent snapshot, `metadata.resourceVersion` of
//!   the list, `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`) and
//!   `fieldSelector` (`path=v`, `path==v`, `path!=v` on dotted paths such as `status.phase`);
//! - **watch**: `?watch=true&resourceVersion=N&timeoutSeconds=S&allowWatchBookmarks=true` streams
//!   newline-delimited `WatchEvent`s: the history after `N` then live changes (ADDED / MODIFIED /
//!   DELETED; with selectors an object that starts or stops matching is ADDED / DELETED, as the real
//!   API does), BOOKMARKs (with `kind` and `apiVersion`) every [`BOOKMARK_INTERVAL`], and an ERROR event
//!   with a `Status` of code 410 when `N` is older than the retained history ([`KubeStandin::compact`]) or
//!   when [`KubeStandin::expire_watches`] is called;
//! - `/version`, `/api`, `/apis`;
//! - **server-side apply**: `PATCH .../namespaces/NS/PLURAL/NAME` with `application/apply-patch+yaml` (see
//!   `apply_patch`: one field manager, no field merging; a `metadata.resourceVersion` in the body must be
//!   the stored one, else 409 Conflict);
//! - `meshfed.io/v1alpha1` TrafficPolicies (meshfed's custom resource), listed, watched and applied.
//!
//! Objects are plain JSON (`serde_json::Value`, so tests can also store malformed ones); every change gets
//! the next resource version of one server-wide counter, like etcd's. [`KubeStandin::stop`] closes the
//! port and every connection (clients see their watches end and connections refused);
//! [`KubeStandin::restart`] serves the same objects on the same port again, with whatever was changed
//! meanwhile. Knobs: a bearer token to require, a status every request fails with, a delay before each
//! answer, watch streams cut short ([`KubeStandin::set_watch_cut`]: mid-way through an event line, or
//! between lines, the connection dropping without the terminating chunk); [`KubeStandin::requests`] logs
//! what was asked.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

/// How often open watches get a BOOKMARK.
pub const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// Live changes buffered per watch before it is ended with 410 (as a slow real watcher would be).
const LIVE_BUFFER: usize = 16 * 1024;
/// Continue tokens kept (the oldest are forgotten: a client using one gets 410 Expired).
const MAX_CONTINUE_TOKENS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("object has no {0}")]
    Missing(&'static str),
    #[error("the stand-in does not serve {api_version} {kind}")]
    UnknownKind { api_version: String, kind: String },
}

/// How [`KubeStandin::set_watch_cut`] cuts watch streams. Either way the connection drops without the
/// chunked body's terminating chunk (the client sees the body fail, not end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchCut {
    /// the first half of the next event line is sent (a truncated JSON object, no newline), then the
    /// connection drops
    MidLine,
    /// the connection drops before the next event line
    Abort,
}

/// What a watch stream carries: event lines, or the error that cuts it.
type WatchChunk = Result<Bytes, std::io::Error>;

/// A kind the stand-in serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceDef {
    /// API group, empty for the core group
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
}

impl ResourceDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_string() } else { format!("{}/{}", self.group, self.version) }
    }
}

/// Every kind the stand-in serves.
pub const RESOURCES: &[ResourceDef] = &[
    ResourceDef { group: "", version: "v1", kind: "Namespace", plural: "namespaces", namespaced: false },
    ResourceDef { group: "", version: "v1", kind: "Node", plural: "nodes", namespaced: false },
    ResourceDef { group: "", version: "v1", kind: "Service", plural: "services", namespaced: true },
    ResourceDef { group: "", version: "v1", kind: "Pod", plural: "pods", namespaced: true },
    ResourceDef { group: "", version: "v1", kind: "Secret", plural: "secrets", namespaced: true },
    ResourceDef {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        namespaced: true,
    },
    ResourceDef {
        group: "networking.istio.io",
        version: "v1",
        kind: "DestinationRule",
        plural: "destinationrules",
        namespaced: true,
    },
    // written by `meshfed istio --apply` (see "server-side apply" below)
    ResourceDef { group: "", version: "v1", kind: "ConfigMap", plural: "configmaps", namespaced: true },
    ResourceDef {
        group: "networking.istio.io",
        version: "v1alpha3",
        kind: "EnvoyFilter",
        plural: "envoyfilters",
        namespaced: true,
    },
    // meshfed's traffic policy custom resource (`trafficPolicy` in the mesh config)
    ResourceDef {
        group: "meshfed.io",
        version: "v1alpha1",
        kind: "TrafficPolicy",
        plural: "trafficpolicies",
        namespaced: true,
    },
];

fn resource_for(api_version: &str, kind: &str) -> Option<ResourceDef> {
    RESOURCES.iter().copied().find(|r| r.kind == kind && r.api_version() == api_version)
}

fn resource_by_path(group: &str, version: &str, plural: &str) -> Option<ResourceDef> {
    RESOURCES.iter().copied().find(|r| r.group == group && r.version == version && r.plural == plural)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One change in the history.
#[derive(Debug)]
struct Change {
    rv: u64,
    resource: ResourceDef,
    kind: ChangeType,
    /// the object before (None when added)
    old: Option<Value>,
    /// the object after (for a delete: the object as it was, with the delete's resource version)
    new: Value,
}

type ObjKey = (String, String);

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<ResourceDef, BTreeMap<ObjKey, Value>>,
    history: VecDeque<Arc<Change>>,
    /// changes at or before this resource version are forgotten
    compacted: u64,
    continues: HashMap<String, (u64, Vec<Value>)>,
    continue_order: VecDeque<String>,
    next_token: u64,
    absent: Vec<&'static str>,
    token: Option<String>,
    fail_status: Option<u16>,
    delay: Duration,
    requests: Vec<String>,
}

struct Inner {
    state: Mutex<State>,
    live: broadcast::Sender<Arc<Change>>,
    /// bumped by [`KubeStandin::expire_watches`]
    expire: watch::Sender<u64>,
    /// [`KubeStandin::set_watch_cut`]
    cut: watch::Sender<Option<WatchCut>>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates or replaces an object ([`KubeStandin::apply`]); returns its new resource version and
    /// whether it was created.
    fn store(&self, mut object: Value) -> Result<(u64, bool), Error> {
        let (resource, key) = identify(&object)?;
        if resource.namespaced && key.0.is_empty() {
            object["metadata"]["namespace"] = json!("default");
        }
        let key = if resource.namespaced && key.0.is_empty() { ("default".to_string(), key.1) } else { key };
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if object["metadata"].get("uid").is_none() {
            object["metadata"]["uid"] = json!(format!("uid-{}-{}-{}", resource.plural, key.0, key.1));
        }
        let old = st.objects.entry(resource).or_default().insert(key, object.clone());
        let kind = if old.is_some() { ChangeType::Modified } else { ChangeType::Added };
        self.record(&mut st, Change { rv, resource, kind, old, new: object });
        Ok((rv, kind == ChangeType::Added))
    }

    fn record(&self, st: &mut State, change: Change) {
        let change = Arc::new(change);
        st.history.push_back(change.clone());
        // bounded history, like etcd's compaction
        while st.history.len() > 100_000 {
            if let Some(c) = st.history.pop_front() {
                st.compacted = c.rv;
            }
        }
        // no receiver is fine
        let _ = self.live.send(change);
    }
}

/// A running (or stopped) stand-in API server. Dropping it stops it.
pub struct KubeStandin {
    inner: Arc<Inner>,
    addr: SocketAddr,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl KubeStandin {
    /// Starts serving on 127.0.0.1 on a free port.
    pub async fn start() -> Result<KubeStandin, Error> {
        KubeStandin::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts serving on `addr`.
    pub async fn start_on(addr: SocketAddr) -> Result<KubeStandin, Error> {
        let (live, _) = broadcast::channel(LIVE_BUFFER);
        let (expire, _) = watch::channel(0);
        let (cut, _) = watch::channel(None);
        let inner = Arc::new(Inner { state: Mutex::new(State { rv: 1, ..State::default() }), live, expire, cut });
        let listener = TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind { addr, source })?;
        let task = tokio::spawn(serve(listener, inner.clone()));
        Ok(KubeStandin { inner, addr, server: Mutex::new(Some(task)) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Whether it is serving (not stopped).
    pub fn is_running(&self) -> bool {
        self.server.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops serving: closes the port and every open connection (watches end). Objects are kept and can
    /// still be changed; [`Self::restart`] serves them again.
    pub async fn stop(&self) {
        let task = self.server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// Serves again on the same port (after [`Self::stop`]; a no-op while running).
    pub async fn restart(&self) -> Result<(), Error> {
        if self.is_running() {
            return Ok(());
        }
        let listener = TcpListener::bind(self.addr).await.map_err(|source| Error::Bind { addr: self.addr, source })?;
        let task = tokio::spawn(serve(listener, self.inner.clone()));
        *self.server.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        Ok(())
    }

    // ---- objects ----

    /// Creates or replaces an object (by apiVersion, kind, namespace, name); returns its new resource
    /// version. Namespaced objects without a namespace go to `default`. Only `apiVersion`, `kind` and
    /// `metadata.name` are required: the rest is stored as given (malformed objects included).
    pub fn apply(&self, object: Value) -> Result<u64, Error> {
        self.inner.store(object).map(|(rv, _)| rv)
    }

    /// Creates or replaces a typed object (k8s-openapi types serialize with apiVersion and kind).
    pub fn apply_typed<K: serde::Serialize>(&self, object: &K) -> Result<u64, Error> {
        let value = serde_json::to_value(object).map_err(|_| Error::Missing("JSON form"))?;
        self.apply(value)
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Result<bool, Error> {
        let resource = resource_for(api_version, kind)
            .ok_or_else(|| Error::UnknownKind { api_version: api_version.into(), kind: kind.into() })?;
        let ns = if resource.namespaced && namespace.is_empty() { "default" } else { namespace };
        let key = (if resource.namespaced { ns.to_string() } else { String::new() }, name.to_string());
        let mut st = self.inner.lock();
        let Some(old) = st.objects.get_mut(&resource).and_then(|m| m.remove(&key)) else { return Ok(false) };
        st.rv += 1;
        let rv = st.rv;
        let mut new = old.clone();
        new["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.inner.record(&mut st, Change { rv, resource, kind: ChangeType::Deleted, old: Some(old), new });
        Ok(true)
    }

    /// Deletes the object with the same apiVersion, kind, namespace and name as `object`.
    pub fn delete_like(&self, object: &Value) -> Result<bool, Error> {
        let (resource, (ns, name)) = identify(object)?;
        self.delete(&resource.api_version(), resource.kind, &ns, &name)
    }

    /// The stored object, if any.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let resource = resource_for(api_version, kind)?;
        let ns = if resource.namespaced { if namespace.is_empty() { "default" } else { namespace } } else { "" };
        self.inner.lock().objects.get(&resource)?.get(&(ns.to_string(), name.to_string())).cloned()
    }

    /// Every stored object of a kind.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let Some(resource) = resource_for(api_version, kind) else { return Vec::new() };
        self.inner.lock().objects.get(&resource).map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    /// The current resource version.
    pub fn resource_version(&self) -> u64 {
        self.inner.lock().rv
    }

    // ---- knobs ----

    /// Forgets the history up to now: a watch from an older resource version gets 410 Gone.
    pub fn compact(&self) {
        let mut st = self.inner.lock();
        st.compacted = st.rv;
        st.history.clear();
        st.continues.clear();
        st.continue_order.clear();
    }

    /// Compacts the history and ends every open watch with an ERROR event of code 410 (Gone): clients
    /// must relist.
    pub fn expire_watches(&self) {
        self.compact();
        self.inner.expire.send_modify(|n| *n += 1);
    }

    /// Serves `plural` (e.g. `destinationrules`) as not installed (404), or installed again.
    pub fn set_absent(&self, plural: &str, absent: bool) {
        let mut st = self.inner.lock();
        st.absent.retain(|p| *p != plural);
        if absent && let Some(r) = RESOURCES.iter().find(|r| r.plural == plural) {
            st.absent.push(r.plural);
        }
    }

    /// Requires `Authorization: Bearer TOKEN` (None: anything goes).
    pub fn set_token(&self, token: Option<&str>) {
        self.inner.lock().token = token.map(str::to_string);
    }

    /// Every request fails with this HTTP status (None: normal service).
    pub fn set_failure(&self, status: Option<u16>) {
        self.inner.lock().fail_status = status;
    }

    /// Waits this long before answering each request.
    /// Cuts watch streams (`None`: stops cutting): every open watch is cut at once, and while set, every
    /// new watch is cut before its first event line (lists are answered as usual). With
    /// [`WatchCut::MidLine`] the client receives half of an event line first (the next change or replayed
    /// event, or a BOOKMARK).
    pub fn set_watch_cut(&self, cut: Option<WatchCut>) {
        self.inner.cut.send_replace(cut);
    }

    pub fn set_delay(&self, delay: Duration) {
        self.inner.lock().delay = delay;
    }

    /// Every request so far, as `PATH?QUERY`, in order.
    pub fn requests(&self) -> Vec<String> {
        self.inner.lock().requests.clone()
    }

    /// The requests so far that listed (not watched) `plural`.
    pub fn list_requests(&self, plural: &str) -> usize {
        let suffix = format!("/{plural}");
        self.requests()
            .iter()
            .filter(|r| {
                let (path, query) = r.split_once('?').unwrap_or((r, ""));
                path.ends_with(&suffix) && !query.split('&').any(|p| p == "watch=true" || p == "watch=1")
            })
            .count()
    }

    /// A kubeconfig (YAML) for this server: cluster, user (with `token`, if any) and context all named
    /// `name`, which is the current context.
    pub fn kubeconfig(&self, name: &str, token: Option<&str>) -> String {
        kubeconfig_yaml(name, &self.url(), token)
    }
}

impl Drop for KubeStandin {
    fn drop(&mut self) {
        if let Some(task) = self.server.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

/// A kubeconfig with one cluster, user and context named `name`.
pub fn kubeconfig_yaml(name: &str, server: &str, token: Option<&str>) -> String {
    let user = match token {
        Some(t) => format!("    token: {t}\n"),
        None => "    {}\n".to_string(),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\nusers:\n- name: {name}\n  user:\n{user}contexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\ncurrent-context: {name}\n"
    )
}

fn identify(object: &Value) -> Result<(ResourceDef, ObjKey), Error> {
    let api_version = object["apiVersion"].as_str().ok_or(Error::Missing("apiVersion"))?;
    let kind = object["kind"].as_str().ok_or(Error::Missing("kind"))?;
    let resource = resource_for(api_version, kind)
        .ok_or_else(|| Error::UnknownKind { api_version: api_version.into(), kind: kind.into() })?;
    let name = object["metadata"]["name"].as_str().filter(|n| !n.is_empty()).ok_or(Error::Missing("metadata.name"))?;
    let ns = if resource.namespaced { object["metadata"]["namespace"].as_str().unwrap_or("") } else { "" };
    Ok((resource, (ns.to_string(), name.to_string())))
}

// ---- serving ----

async fn serve(listener: TcpListener, inner: Arc<Inner>) {
    crate::http::accept_loop(listener, move |stream| {
        let inner = inner.clone();
        async move {
            let service = hyper::service::service_fn(move |req| handle(inner.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        }
    })
    .await
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(value.to_string()))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn status_response(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &status_object(code, reason, message),
    )
}

struct Query {
    params: HashMap<String, String>,
}

impl Query {
    fn parse(q: Option<&str>) -> Query {
        let mut params = HashMap::new();
        for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            params.insert(percent_decode(k), percent_decode(v));
        }
        Query { params }
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.params.get(k).map(String::as_str).filter(|v| !v.is_empty())
    }

    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1"))
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%' && i + 3 <= bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()))
            .flatten();
        match (bytes[i], hex) {
            (_, Some(b)) => {
                out.push(b);
                i += 2;
            }
            (b'+', None) => out.push(b' '),
            (b, None) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(inner: Arc<Inner>, req: Request<hyper::body::Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let query_text = req.uri().query().map(str::to_string);
    let (token, fail, delay) = {
        let mut st = inner.lock();
        st.requests.push(match &query_text {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        });
        (st.token.clone(), st.fail_status, st.delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(code) = fail {
        return Ok(status_response(code, "InternalError", "the stand-in was told to fail"));
    }
    if let Some(token) = token {
        let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
        if auth != format!("Bearer {token}") {
            return Ok(status_response(401, "Unauthorized", "Unauthorized"));
        }
    }
    if req.method() == hyper::Method::PATCH {
        return Ok(apply_patch(&inner, req).await);
    }
    if req.method() != hyper::Method::GET {
        return Ok(status_response(405, "MethodNotAllowed", "the stand-in only serves GET and apply PATCH"));
    }
    let query = Query::parse(query_text.as_deref());
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let target = match segments.as_slice() {
        ["version"] => {
            return Ok(json_response(
                StatusCode::OK,
                &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-meshfed-standin", "platform": "linux/amd64"}),
            ));
        }
        ["api"] => return Ok(json_response(StatusCode::OK, &json!({"kind": "APIVersions", "versions": ["v1"]}))),
        ["apis"] => {
            let groups: Vec<Value> =
                [("discovery.k8s.io", "v1"), ("networking.istio.io", "v1"), ("meshfed.io", "v1alpha1")]
                    .iter()
                    .map(|(g, v)| json!({"name": g, "versions": [{"groupVersion": format!("{g}/{v}"), "version": v}]}))
                    .collect();
            return Ok(json_response(
                StatusCode::OK,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            ));
        }
        ["api", "v1", plural] => resource_by_path("", "v1", plural).map(|r| (r, None)),
        ["api", "v1", "namespaces", ns, plural] => resource_by_path("", "v1", plural).map(|r| (r, Some(*ns))),
        ["apis", group, version, plural] => resource_by_path(group, version, plural).map(|r| (r, None)),
        ["apis", group, version, "namespaces", ns, plural] => {
            resource_by_path(group, version, plural).map(|r| (r, Some(*ns)))
        }
        _ => None,
    };
    let Some((resource, namespace)) = target else {
        return Ok(status_response(
            404,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        ));
    };
    if (namespace.is_some() && !resource.namespaced) || inner.lock().absent.contains(&resource.plural) {
        return Ok(status_response(
            404,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        ));
    }
    let filter = match Filter::new(namespace, query.get("labelSelector"), query.get("fieldSelector")) {
        Ok(f) => f,
        Err(e) => return Ok(status_response(400, "BadRequest", &e)),
    };
    if query.flag("watch") {
        Ok(start_watch(inner, resource, filter, &query))
    } else {
        Ok(list(&inner, resource, &filter, &query))
    }
}

// ---- server-side apply (PATCH application/apply-patch+yaml), for `meshfed istio --apply` ----
//
// `PATCH /api/v1/namespaces/NS/PLURAL/NAME` or `/apis/GROUP/VERSION/namespaces/NS/PLURAL/NAME` with
// `?fieldManager=M[&force=true]`: the body (YAML or JSON) must name the same apiVersion, kind, namespace
// and name; the object becomes the applied configuration (one field manager owns everything here: fields
// set by others are not merged, conflicts are not modelled) with `metadata.managedFields` naming `M`.
// 201 with the stored object when it was created, 200 when it replaced one.

async fn apply_patch(inner: &Inner, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = Query::parse(req.uri().query());
    let content_type = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    if content_type != "application/apply-patch+yaml" {
        return status_response(
            415,
            "UnsupportedMediaType",
            &format!("the stand-in only applies (not {content_type:?})"),
        );
    }
    let Some(manager) = query.get("fieldManager").map(str::to_string) else {
        return status_response(400, "BadRequest", "fieldManager is required for apply requests");
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let target = match segments.as_slice() {
        ["api", "v1", "namespaces", ns, plural, name] => resource_by_path("", "v1", plural).map(|r| (r, *ns, *name)),
        ["apis", group, version, "namespaces", ns, plural, name] => {
            resource_by_path(group, version, plural).map(|r| (r, *ns, *name))
        }
        _ => None,
    };
    let Some((resource, ns, name)) = target.filter(|(r, _, _)| r.namespaced) else {
        return status_response(404, "NotFound", &format!("the server could not find the requested resource ({path})"));
    };
    let body = match axum::body::to_bytes(Body::new(req.into_body()), 1 << 20).await {
        Ok(b) => b,
        Err(e) => return status_response(400, "BadRequest", &format!("reading the body: {e}")),
    };
    let mut object: Value = match serde_yaml::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return status_response(400, "BadRequest", &format!("the body is not YAML: {e}")),
    };
    let same = object["apiVersion"] == resource.api_version()
        && object["kind"] == resource.kind
        && object["metadata"]["name"] == name
        && object["metadata"]["namespace"].as_str().is_none_or(|n| n == ns);
    if !same {
        return status_response(400, "BadRequest", "the applied object does not match the request's path");
    }
    object["metadata"]["namespace"] = json!(ns);
    object["metadata"]["managedFields"] =
        json!([{ "manager": manager, "operation": "Apply", "apiVersion": resource.api_version() }]);
    let previous =
        inner.lock().objects.get(&resource).and_then(|m| m.get(&(ns.to_string(), name.to_string())).cloned());
    // a resourceVersion in the applied object is a precondition, as in the real API
    if let Some(rv) = object["metadata"]["resourceVersion"].as_str() {
        let stored = previous.as_ref().and_then(|p| p["metadata"]["resourceVersion"].as_str());
        if stored != Some(rv) {
            return status_response(
                409,
                "Conflict",
                &format!("Operation cannot be fulfilled on {}: the object has been modified", resource.plural),
            );
        }
    }
    if let Some(uid) = previous.as_ref().and_then(|p| p["metadata"].get("uid")) {
        object["metadata"]["uid"] = uid.clone();
    }
    match inner.store(object) {
        Ok((_, created)) => {
            let key = (ns.to_string(), name.to_string());
            let stored = inner.lock().objects.get(&resource).and_then(|m| m.get(&key).cloned());
            let status = if created { StatusCode::CREATED } else { StatusCode::OK };
            json_response(status, &stored.unwrap_or(Value::Null))
        }
        Err(e) => status_response(422, "Invalid", &e.to_string()),
    }
}

fn list(inner: &Inner, resource: ResourceDef, filter: &Filter, query: &Query) -> Response<Body> {
    let mut st = inner.lock();
    let (rv, items) = match query.get("continue") {
        Some(token) => match st.continues.remove(token) {
            Some(snapshot) => snapshot,
            None => return status_response(410, "Expired", "the provided continue parameter is too old"),
        },
        None => {
            let items: Vec<Value> = st
                .objects
                .get(&resource)
                .map(|m| m.values().filter(|o| filter.matches(o)).cloned().collect())
                .unwrap_or_default();
            (st.rv, items)
        }
    };
    let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
    let (page, rest) = match limit {
        Some(l) if items.len() > l => {
            let mut items = items;
            let rest = items.split_off(l);
            (items, Some(rest))
        }
        _ => (items, None),
    };
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(rest) = rest {
        st.next_token += 1;
        let token = format!("standin-{}-{rv}", st.next_token);
        metadata["remainingItemCount"] = json!(rest.len());
        metadata["continue"] = json!(token);
        st.continues.insert(token.clone(), (rv, rest));
        st.continue_order.push_back(token);
        while st.continue_order.len() > MAX_CONTINUE_TOKENS {
            if let Some(old) = st.continue_order.pop_front() {
                st.continues.remove(&old);
            }
        }
    }
    let body = json!({
        "kind": format!("{}List", resource.kind),
        "apiVersion": resource.api_version(),
        "metadata": metadata,
        "items": page,
    });
    json_response(StatusCode::OK, &body)
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// Sends `line` on a watch, or, if `cut` says so, cuts the watch there (see [`WatchCut`]); false when
/// the watch is over.
async fn send_line(tx: &mpsc::Sender<WatchChunk>, line: Bytes, cut: Option<WatchCut>) -> bool {
    let Some(mode) = cut else { return tx.send(Ok(line)).await.is_ok() };
    if mode == WatchCut::MidLine {
        let _ = tx.send(Ok(line.slice(..line.len() / 2))).await;
        // let hyper write that chunk before the body fails (which drops the connection at once)
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ =
        tx.send(Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the stand-in cut the watch"))).await;
    false
}

fn start_watch(inner: Arc<Inner>, resource: ResourceDef, filter: Filter, query: &Query) -> Response<Body> {
    let from = query.get("resourceVersion").map(|v| v.parse::<u64>());
    let timeout = query.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).map(Duration::from_secs);
    let bookmarks = query.flag("allowWatchBookmarks");
    let (tx, rx) = mpsc::channel::<WatchChunk>(64);
    // Under the lock: what to replay, and a live subscription that misses nothing after it.
    let (replay, ended, live, mut last_rv) = {
        let st = inner.lock();
        let live = inner.live.subscribe();
        let mut replay: Vec<Bytes> = Vec::new();
        let mut ended = false;
        let last_rv = st.rv;
        match from {
            Some(Err(_)) => {
                replay.push(event_line("ERROR", &status_object(400, "BadRequest", "invalid resourceVersion")));
                ended = true;
            }
            // no resourceVersion, or 0: the current objects as ADDED, then changes
            None | Some(Ok(0)) => {
                for o in st.objects.get(&resource).into_iter().flat_map(|m| m.values()) {
                    if filter.matches(o) {
                        replay.push(event_line("ADDED", o));
                    }
                }
            }
            Some(Ok(n)) if n < st.compacted => {
                let msg = format!("too old resource version: {n} ({})", st.compacted);
                replay.push(event_line("ERROR", &status_object(410, "Expired", &msg)));
                ended = true;
            }
            Some(Ok(n)) => {
                for c in st.history.iter().filter(|c| c.rv > n && c.resource == resource) {
                    if let Some(line) = filter.event(c) {
                        replay.push(line);
                    }
                }
            }
        }
        (replay, ended, live, last_rv)
    };
    let mut expire = inner.expire.subscribe();
    expire.borrow_and_update();
    let mut cut = inner.cut.subscribe();
    let bookmark_line = move |last_rv: u64| {
        let obj = json!({
            "kind": resource.kind, "apiVersion": resource.api_version(),
            "metadata": {"resourceVersion": last_rv.to_string()},
        });
        event_line("BOOKMARK", &obj)
    };
    tokio::spawn(async move {
        // cut before anything is sent: half a bookmark line (MidLine), or nothing
        if cut.borrow_and_update().is_some() && replay.is_empty() {
            let mode = *cut.borrow();
            send_line(&tx, bookmark_line(last_rv), mode).await;
            return;
        }
        for line in replay {
            let mode = *cut.borrow();
            if !send_line(&tx, line, mode).await {
                return;
            }
        }
        if ended {
            return;
        }
        let mut live = live;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut bookmark = tokio::time::interval(BOOKMARK_INTERVAL);
        bookmark.tick().await;
        loop {
            tokio::select! {
                change = live.recv() => match change {
                    Ok(c) => {
                        if c.rv <= last_rv {
                            continue;
                        }
                        last_rv = c.rv;
                        if c.resource != resource {
                            continue;
                        }
                        if let Some(line) = filter.event(&c) {
                            let mode = *cut.borrow();
                            if !send_line(&tx, line, mode).await {
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(Ok(event_line("ERROR", &status_object(410, "Expired", "watch fell behind")))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = bookmark.tick(), if bookmarks => {
                    // the last change this watch has seen: never ahead of an event not sent yet
                    let mode = *cut.borrow();
                    if !send_line(&tx, bookmark_line(last_rv), mode).await {
                        return;
                    }
                }
                changed = cut.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let mode = *cut.borrow_and_update();
                    if mode.is_some() {
                        send_line(&tx, bookmark_line(last_rv), mode).await;
                        return;
                    }
                }
                _ = expire.changed() => {
                    let _ = tx.send(Ok(event_line("ERROR", &status_object(410, "Expired", "too old resource version (compacted)")))).await;
                    return;
                }
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => return,
                _ = tx.closed() => return,
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

// ---- selectors ----

#[derive(Clone, Debug)]
enum LabelTerm {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Clone, Debug)]
enum FieldTerm {
    Eq(Vec<String>, String),
    Ne(Vec<String>, String),
}

/// What a list or watch request selects.
#[derive(Clone, Debug, Default)]
struct Filter {
    namespace: Option<String>,
    labels: Vec<LabelTerm>,
    fields: Vec<FieldTerm>,
}

impl Filter {
    fn new(namespace: Option<&str>, labels: Option<&str>, fields: Option<&str>) -> Result<Filter, String> {
        Ok(Filter {
            namespace: namespace.map(str::to_string),
            labels: labels.map(parse_label_selector).transpose()?.unwrap_or_default(),
            fields: fields.map(parse_field_selector).transpose()?.unwrap_or_default(),
        })
    }

    fn matches(&self, o: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && o["metadata"]["namespace"].as_str() != Some(ns)
        {
            return false;
        }
        let labels = &o["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|t| match t {
            LabelTerm::Eq(k, v) => label(k) == Some(v),
            LabelTerm::Ne(k, v) => label(k) != Some(v),
            LabelTerm::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelTerm::NotIn(k, vs) => label(k).is_none_or(|l| !vs.iter().any(|v| v == l)),
            LabelTerm::Exists(k) => label(k).is_some(),
            LabelTerm::NotExists(k) => label(k).is_none(),
        });
        let field = |path: &[String]| {
            let mut v = o;
            for p in path {
                v = &v[p.as_str()];
            }
            match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            }
        };
        labels_ok
            && self.fields.iter().all(|t| match t {
                FieldTerm::Eq(p, v) => field(p) == *v,
                FieldTerm::Ne(p, v) => field(p) != *v,
            })
    }

    /// The watch event a change is for a watcher with this filter, if any.
    fn event(&self, c: &Change) -> Option<Bytes> {
        let was = c.old.as_ref().is_some_and(|o| self.matches(o));
        let is = self.matches(&c.new);
        let kind = match (c.kind, was, is) {
            (ChangeType::Deleted, true, _) => "DELETED",
            (ChangeType::Deleted, false, _) => return None,
            (_, false, true) => "ADDED",
            (_, true, true) => "MODIFIED",
            (_, true, false) => "DELETED",
            (_, false, false) => return None,
        };
        Some(event_line(kind, &c.new))
    }
}

/// Splits on commas outside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, ch) in s.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter().map(str::trim).filter(|t| !t.is_empty()).collect()
}

fn parse_set(s: &str) -> Result<Vec<String>, String> {
    let inner = s.trim().strip_prefix('(').and_then(|s| s.strip_suffix(')')).ok_or_else(|| format!("bad set {s:?}"))?;
    Ok(inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect())
}

fn parse_label_selector(s: &str) -> Result<Vec<LabelTerm>, String> {
    split_terms(s)
        .into_iter()
        .map(|t| {
            if let Some((k, v)) = t.split_once("!=") {
                Ok(LabelTerm::Ne(k.trim().into(), v.trim().into()))
            } else if let Some((k, v)) = t.split_once("==") {
                Ok(LabelTerm::Eq(k.trim().into(), v.trim().into()))
            } else if let Some((k, v)) = t.split_once('=') {
                Ok(LabelTerm::Eq(k.trim().into(), v.trim().into()))
            } else if let Some((k, set)) = t.split_once(" notin ") {
                Ok(LabelTerm::NotIn(k.trim().into(), parse_set(set)?))
            } else if let Some((k, set)) = t.split_once(" in ") {
                Ok(LabelTerm::In(k.trim().into(), parse_set(set)?))
            } else if let Some(k) = t.strip_prefix('!') {
                Ok(LabelTerm::NotExists(k.trim().into()))
            } else if t.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)) {
                Ok(LabelTerm::Exists(t.into()))
            } else {
                Err(format!("unable to parse requirement: {t:?}"))
            }
        })
        .collect()
}

fn parse_field_selector(s: &str) -> Result<Vec<FieldTerm>, String> {
    split_terms(s)
        .into_iter()
        .map(|t| {
            let path = |p: &str| p.trim().split('.').map(str::to_string).collect::<Vec<_>>();
            if let Some((k, v)) = t.split_once("!=") {
                Ok(FieldTerm::Ne(path(k), v.trim().into()))
            } else if let Some((k, v)) = t.split_once("==") {
                Ok(FieldTerm::Eq(path(k), v.trim().into()))
            } else if let Some((k, v)) = t.split_once('=') {
                Ok(FieldTerm::Eq(path(k), v.trim().into()))
            } else {
                Err(format!("invalid field selector: {t:?}"))
            }
        })
        .collect()
}

// ---- object builders (plain JSON, as the API serves them) ----

/// Builders of the objects meshfed reads, as JSON values.
pub mod objects {
    use serde_json::{Value, json};

    pub fn namespace(name: &str, network: Option<&str>) -> Value {
        let mut o = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        if let Some(n) = network {
            o["metadata"]["labels"] = json!({"topology.istio.io/network": n});
        }
        o
    }

    pub fn node(name: &str, region: &str, zone: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {
                "topology.kubernetes.io/region": region, "topology.kubernetes.io/zone": zone,
            }},
            "spec": {}, "status": {},
        })
    }

    /// A ClusterIP Service with named TCP ports.
    pub fn service(namespace: &str, name: &str, ports: &[(&str, u16)]) -> Value {
        let ports: Vec<Value> =
            ports.iter().map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP", "targetPort": p})).collect();
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
            "spec": {"type": "ClusterIP", "ports": ports, "selector": {"app": name}},
        })
    }

    /// An IPv4 EndpointSlice of `service` with one port and ready endpoints `(address, node)`.
    pub fn endpoint_slice(
        namespace: &str,
        name: &str,
        service: &str,
        port: (&str, u16),
        endpoints: &[(&str, &str)],
    ) -> Value {
        let endpoints: Vec<Value> = endpoints
            .iter()
            .map(|(addr, node)| {
                json!({
                    "addresses": [addr],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": node,
                })
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": namespace, "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": port.0, "port": port.1, "protocol": "TCP"}],
            "endpoints": endpoints,
        })
    }

    pub fn pod(namespace: &str, name: &str, node: &str, phase: &str, labels: &[(&str, &str)]) -> Value {
        let labels: serde_json::Map<String, Value> =
            labels.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect();
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": node, "serviceAccountName": "default", "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": phase},
        })
    }

    /// An Istio remote secret: data key `cluster` holds `kubeconfig` (base64, as the API serves it).
    pub fn remote_secret(namespace: &str, name: &str, cluster: &str, kubeconfig: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {
                "name": name, "namespace": namespace,
                "labels": {"istio/multiCluster": "true"},
                "annotations": {"networking.istio.io/cluster": cluster},
            },
            "type": "Opaque",
            "data": {cluster: base64(kubeconfig.as_bytes())},
        })
    }

    /// Standard base64 with padding.
    pub fn base64(data: &[u8]) -> String {
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let f = Filter::new(None, Some("istio/multiCluster=true,app in (a, b),!skip"), Some("status.phase!=Failed"))
            .unwrap();
        let o = |labels: Value, phase: &str| json!({"metadata": {"labels": labels}, "status": {"phase": phase}});
        assert!(f.matches(&o(json!({"istio/multiCluster": "true", "app": "a"}), "Running")));
        assert!(!f.matches(&o(json!({"istio/multiCluster": "true", "app": "a"}), "Failed")));
        assert!(!f.matches(&o(json!({"istio/multiCluster": "true", "app": "c"}), "Running")));
        assert!(!f.matches(&o(json!({"istio/multiCluster": "true", "app": "a", "skip": "x"}), "Running")));
        assert!(Filter::new(None, Some("a b c"), None).is_err());
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(objects::base64(b""), "");
        assert_eq!(objects::base64(b"f"), "Zg==");
        assert_eq!(objects::base64(b"fo"), "Zm8=");
        assert_eq!(objects::base64(b"foo"), "Zm9v");
        assert_eq!(objects::base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("status.phase%21%3DFailed"), "status.phase!=Failed");
        assert_eq!(percent_decode("a+b%"), "a b%");
    }
}
