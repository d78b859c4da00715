//! Per-type EDS proxies: how an Envoy configured by istiod uses meshfed beside istiod. Each proxy holds one
//! HTTP/2 connection and on it one `StreamEndpoints` (SotW) or `DeltaEndpoints` (Delta) stream per cluster
//! whose EDS comes from meshfed, each stream subscribing that one cluster's ClusterLoadAssignment
//! (`outbound|PORT||FQDN`). Every stream's first request carries the proxy's node (Envoy's
//! `set_node_on_first_message_only`, as the EnvoyFilters of `meshfed istio` set it); every response is
//! ACKed (SotW ACKs repeat the stream's one name).
//!
//! A proxy is ready once every one of its streams ACKed its first response. Hits (change -> ACK) are
//! recorded per proxy in the shared [`Recorder`], as for ADS proxies: one change to one service reaches one
//! stream of each proxy, so a proxy's hit is that stream's ACK. [`Recorder::open`] counts streams here.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use prost::Message;
use tokio::sync::{Notify, Semaphore, watch};

use super::client::{
    AbortOnDrop, ClientOptions, NameList, OpenGuard, ProxyHandle, Recorder, pause_before_retry, wait_stop,
};
use super::wire::{self, GrpcReader};
use meshfed::type_url::ResourceType;

pub const EDS_SOTW_PATH: &str = "/envoy.service.endpoint.v3.EndpointDiscoveryService/StreamEndpoints";
pub const EDS_DELTA_PATH: &str = "/envoy.service.endpoint.v3.EndpointDiscoveryService/DeltaEndpoints";

const EDS: usize = 1; // ResourceType::Endpoint.index()

/// What the streams of one proxy share.
struct ProxyShared {
    index: u32,
    delta: bool,
    rec: Arc<Recorder>,
    started: Instant,
    /// streams that have not ACKed a response yet
    pending: AtomicUsize,
    /// signalled once when `pending` reaches 0
    all_acked: Notify,
}

/// Writes one gRPC message `head ++ tail` as one DATA frame.
fn send(tx: &mut h2::SendStream<Bytes>, head: &[u8], tail: &[u8]) -> Result<(), String> {
    let mut b = BytesMut::with_capacity(5 + head.len() + tail.len());
    b.put_slice(&wire::grpc_header(head.len() + tail.len()));
    b.put_slice(head);
    b.put_slice(tail);
    tx.send_data(b.freeze(), false).map_err(|e| format!("send: {e}"))
}

/// One stream: subscribes `name`, ACKs every response, until the server ends it or an error (the proxy
/// drops it to stop it).
async fn run_stream(
    p: Arc<ProxyShared>,
    send_req: h2::client::SendRequest<Bytes>,
    addr: std::net::SocketAddr,
    first: Bytes,
    name: Arc<NameList>,
) -> Result<(), String> {
    let mut send_req = send_req.ready().await.map_err(|e| format!("h2: {e}"))?;
    let path = if p.delta { EDS_DELTA_PATH } else { EDS_SOTW_PATH };
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
    let (resp, mut tx) = send_req.send_request(req, false).map_err(|e| format!("request: {e}"))?;
    drop(send_req);
    p.rec.open.fetch_add(1, Ordering::SeqCst);
    let _open = OpenGuard(p.rec.clone());
    // the first request: the proxy's node (encoded once per proxy) and this stream's one name
    send(&mut tx, &first, &name.encoded)?;
    let resp = resp.await.map_err(|e| format!("response: {e}"))?;
    if let Some(status) = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok())
        && status != "0"
    {
        let msg = resp.headers().get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or("");
        return Err(format!("grpc-status {status}: {msg}"));
    }
    let mut body = resp.into_body();
    let mut reader = GrpcReader::default();
    let mut acked = false;
    loop {
        match body.data().await {
            None => {
                let trailers = body.trailers().await.ok().flatten();
                let field = |k: &str| {
                    trailers.as_ref().and_then(|t| t.get(k)).and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
                };
                return Err(format!(
                    "EDS stream ended by the server: grpc-status {} {}",
                    field("grpc-status"),
                    field("grpc-message")
                ));
            }
            Some(Err(e)) => return Err(format!("stream: {e}")),
            Some(Ok(c)) => {
                let _ = body.flow_control().release_capacity(c.len());
                reader.push(&c);
                while let Some(m) = reader.next_message()? {
                    on_message(&p, &mut tx, &name, m)?;
                    if !acked {
                        acked = true;
                        if p.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
                            let us = p.started.elapsed().as_micros() as u64;
                            p.rec.set_ready(p.index as usize, us);
                            p.all_acked.notify_one();
                        }
                    }
                }
            }
        }
    }
}

/// Reads one response, ACKs it and records it (bytes, resources, watched names).
fn on_message(p: &ProxyShared, tx: &mut h2::SendStream<Bytes>, name: &NameList, msg: Bytes) -> Result<(), String> {
    let mut version = Bytes::new();
    let mut nonce = Bytes::new();
    // (name, the resource's `Any` bytes)
    let mut items: Vec<(Bytes, Bytes)> = Vec::new();
    for f in wire::fields(msg.clone()) {
        match f.number {
            1 if !p.delta => version = f.bytes,
            2 if p.delta => {
                let (mut n, mut any) = (Bytes::new(), Bytes::new());
                for g in wire::fields(f.bytes) {
                    match g.number {
                        3 => n = g.bytes,
                        2 => any = g.bytes,
                        _ => {}
                    }
                }
                items.push((n, any));
            }
            2 => {
                let value = wire::fields(f.bytes.clone()).find(|g| g.number == 2).map(|g| g.bytes).unwrap_or_default();
                let n = wire::fields(value).find(|g| g.number == 1).map(|g| g.bytes).unwrap_or_default();
                items.push((n, f.bytes));
            }
            5 => nonce = f.bytes,
            _ => {}
        }
    }
    let stats = &p.rec.stats[p.index as usize];
    stats.bytes[EDS].fetch_add(msg.len() as u64, Ordering::Relaxed);
    stats.responses[EDS].fetch_add(1, Ordering::Relaxed);
    stats.resources[EDS].fetch_add(items.len() as u64, Ordering::Relaxed);
    let text = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
    let type_url = ResourceType::Endpoint.type_url().to_string();
    if p.delta {
        let ack = DeltaDiscoveryRequest { type_url, response_nonce: text(&nonce), ..Default::default() };
        send(tx, &ack.encode_to_vec(), &[])?;
    } else {
        let ack = DiscoveryRequest {
            version_info: text(&version),
            type_url,
            response_nonce: text(&nonce),
            ..Default::default()
        };
        send(tx, &ack.encode_to_vec(), &name.encoded)?;
    }
    if let Some(w) = p.rec.watch_for(p.index) {
        let watched: Vec<(Arc<str>, u64)> = items
            .iter()
            .filter_map(|(n, any)| {
                let n = w.names.get(std::str::from_utf8(n).ok()?)?;
                Some((n.clone(), xxhash_rust::xxh3::xxh3_64(any)))
            })
            .collect();
        p.rec.record_hits(p.index, &w, watched);
    }
    Ok(())
}

/// The first request of every stream of a proxy, without its name: the node and the type.
fn first_request(node: Node, delta: bool) -> Bytes {
    let type_url = ResourceType::Endpoint.type_url().to_string();
    let v = if delta {
        DeltaDiscoveryRequest { node: Some(node), type_url, ..Default::default() }.encode_to_vec()
    } else {
        DiscoveryRequest { node: Some(node), type_url, ..Default::default() }.encode_to_vec()
    };
    Bytes::from(v)
}

/// Connects one proxy and opens one EDS stream per name of `names`; runs until `stop` turns true, a
/// stream fails or the server ends one. `connect_permit` is held until every stream ACKed its first
/// response (to bound concurrent setups).
#[allow(clippy::too_many_arguments)]
pub async fn run_eds_proxy(
    opts: Arc<ClientOptions>,
    rec: Arc<Recorder>,
    index: usize,
    node: Node,
    delta: bool,
    names: Arc<Vec<Arc<NameList>>>,
    mut stop: watch::Receiver<bool>,
    connect_permit: Option<Arc<Semaphore>>,
) {
    let started = Instant::now();
    let mut permit = match &connect_permit {
        Some(s) => s.clone().acquire_owned().await.ok(),
        None => None,
    };
    rec.stats[index].ready_us.store(0, Ordering::Relaxed);
    let result = async {
        if names.is_empty() {
            return Err("no EDS streams to open".to_string());
        }
        let tcp = tokio::select! {
            t = tokio::net::TcpStream::connect(opts.addr) => t.map_err(|e| format!("connect: {e}"))?,
            _ = wait_stop(&mut stop) => return Ok(()),
        };
        let _ = tcp.set_nodelay(true);
        let (send_req, conn) = h2::client::Builder::new()
            .initial_window_size(opts.window)
            .initial_connection_window_size(opts.window)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let _conn = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let shared = Arc::new(ProxyShared {
            index: index as u32,
            delta,
            rec: rec.clone(),
            started,
            pending: AtomicUsize::new(names.len()),
            all_acked: Notify::new(),
        });
        let first = first_request(node, delta);
        // dropped (every stream aborted) when the proxy stops
        let mut streams = tokio::task::JoinSet::new();
        for name in names.iter() {
            streams.spawn(run_stream(shared.clone(), send_req.clone(), opts.addr, first.clone(), name.clone()));
        }
        drop(send_req);
        loop {
            tokio::select! {
                biased;
                _ = wait_stop(&mut stop) => return Ok(()),
                _ = shared.all_acked.notified(), if permit.is_some() => permit = None,
                r = streams.join_next() => return match r {
                    Some(Ok(Err(e))) => Err(e),
                    Some(Err(e)) => Err(format!("EDS stream task: {e}")),
                    Some(Ok(Ok(()))) | None => Err("EDS stream ended".to_string()),
                },
            }
        }
    }
    .await;
    drop(permit);
    rec.clear_ready(index);
    if let Err(e) = result
        && !*stop.borrow()
    {
        rec.error(format!("proxy {index}: {e}"));
    }
}

/// [`run_eds_proxy`], reconnecting after a failure as Envoy does (after 0.5-1 s, at most `retries`
/// times); every failure is still counted in [`Recorder::errors`].
#[allow(clippy::too_many_arguments)]
async fn run_eds_proxy_retrying(
    opts: Arc<ClientOptions>,
    rec: Arc<Recorder>,
    index: usize,
    node: Node,
    delta: bool,
    names: Arc<Vec<Arc<NameList>>>,
    stop: watch::Receiver<bool>,
    connect_permit: Option<Arc<Semaphore>>,
    retries: usize,
) {
    for attempt in 0..=retries {
        run_eds_proxy(
            opts.clone(),
            rec.clone(),
            index,
            node.clone(),
            delta,
            names.clone(),
            stop.clone(),
            connect_permit.clone(),
        )
        .await;
        if !pause_before_retry(&rec, index, attempt, retries, &stop).await {
            return;
        }
    }
}

/// Starts per-type EDS proxy `index` (one connection, one stream per name of `names`) in the background.
pub fn spawn_eds_proxy(
    opts: &Arc<ClientOptions>,
    rec: &Arc<Recorder>,
    index: usize,
    node: Node,
    delta: bool,
    names: Arc<Vec<Arc<NameList>>>,
    connect_permit: Option<Arc<Semaphore>>,
) -> ProxyHandle {
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run_eds_proxy_retrying(
        opts.clone(),
        rec.clone(),
        index,
        node,
        delta,
        names,
        stop_rx,
        connect_permit,
        20,
    ));
    ProxyHandle { stop, task }
}
