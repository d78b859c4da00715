//! HTTP/1.1 on loopback: [`http_get`] / [`http_get_with`], a tiny client (one request per connection,
//! bounded by [`HTTP_TIMEOUT`]), and [`Backend`], an in-process server answering 200 with its own address (or a given
//! reply) as the body, counting what it answered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Cap of one HTTP exchange (connect, request, whole response).
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// One HTTP/1.1 GET (`Connection: close`) to `addr` with the given Host header, bounded by
/// [`HTTP_TIMEOUT`]: (status, body).
pub async fn http_get(addr: SocketAddr, host: &str, path: &str) -> Result<(u16, String)> {
    tokio::time::timeout(HTTP_TIMEOUT, http_get_unbounded(addr, host, path))
        .await
        .map_err(|_| anyhow!("GET http://{addr}{path} (Host {host}): no complete response within {HTTP_TIMEOUT:?}"))?
        .with_context(|| format!("GET http://{addr}{path} (Host {host})"))
}

/// [`http_get`] with more header lines (`extra`: complete lines, each ending in CRLF).
pub async fn http_get_with(addr: SocketAddr, host: &str, path: &str, extra: &str) -> Result<(u16, String)> {
    tokio::time::timeout(HTTP_TIMEOUT, http_get_unbounded_with(addr, host, path, extra))
        .await
        .map_err(|_| anyhow!("GET http://{addr}{path} (Host {host}): no complete response within {HTTP_TIMEOUT:?}"))?
        .with_context(|| format!("GET http://{addr}{path} (Host {host})"))
}

async fn http_get_unbounded(addr: SocketAddr, host: &str, path: &str) -> Result<(u16, String)> {
    http_get_unbounded_with(addr, host, path, "").await
}

async fn http_get_unbounded_with(addr: SocketAddr, host: &str, path: &str, extra: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: meshfed-test\r\n{extra}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    parse_response(&raw)
}

/// Parses a complete HTTP/1.1 response (Content-Length, chunked, or until the end).
fn parse_response(raw: &[u8]) -> Result<(u16, String)> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("incomplete response ({} bytes): {:?}", raw.len(), String::from_utf8_lossy(raw)))?;
    let head = std::str::from_utf8(&raw[..end])?;
    let body = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            content_length = Some(value.parse::<usize>()?);
        } else if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        }
    }
    let body = if chunked {
        decode_chunked(body)?
    } else if let Some(n) = content_length {
        if body.len() < n {
            bail!("truncated body: {} of {n} bytes", body.len());
        }
        body[..n].to_vec()
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn decode_chunked(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").ok_or_else(|| anyhow!("bad chunked body"))?;
        let size_text = std::str::from_utf8(&data[..eol])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// An in-process HTTP/1.1 server bound on one address: it answers every request with 200 and its own
/// address (e.g. `127.61.1.21:9080`), or the reply it was given, as the body, on keep-alive
/// connections. Dropping it stops it (listener and open connections).
pub struct Backend {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    /// Binds `addr` and serves on the current Tokio runtime, answering with its address.
    pub async fn start(addr: SocketAddr) -> Result<Backend> {
        Backend::start_with_reply(addr, &addr.to_string()).await
    }

    /// Binds `addr` and serves on the current Tokio runtime, answering with `reply` (e.g. the identity
    /// of the workload it stands for, when a sidecar in front of it owns the workload's address).
    pub async fn start_with_reply(addr: SocketAddr, reply: &str) -> Result<Backend> {
        let listener = TcpListener::bind(addr).await.with_context(|| format!("backend: binding {addr}"))?;
        let hits = Arc::new(AtomicU64::new(0));
        let body: Arc<str> = reply.into();
        let counter = hits.clone();
        let task =
            tokio::spawn(accept_loop(listener, move |stream| serve_connection(stream, body.clone(), counter.clone())));
        Ok(Backend { addr, hits, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves every connection `listener` accepts with `serve`, until the task running it is aborted: the
/// connections live in a set this future owns, so aborting it closes them too. An accept error (e.g. out
/// of file descriptors) is retried after a pause, never spun on.
pub async fn accept_loop<F, Fut>(listener: TcpListener, mut serve: F)
where
    F: FnMut(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                connections.spawn(serve(stream));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Starts a [`Backend`] on each address.
pub async fn start_backends(addrs: impl IntoIterator<Item = SocketAddr>) -> Result<Vec<Backend>> {
    let mut out = Vec::new();
    for addr in addrs {
        out.push(Backend::start(addr).await?);
    }
    Ok(out)
}

async fn serve_connection(stream: TcpStream, body: Arc<str>, hits: Arc<AtomicU64>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        // request head
        let mut head_bytes = 0usize;
        let mut content_length = 0usize;
        let mut close = false;
        let mut first = true;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head_bytes += n,
            }
            if head_bytes > 64 * 1024 {
                return;
            }
            let line = line.trim_end();
            if first {
                first = false;
                close = line.ends_with("HTTP/1.0");
                continue;
            }
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_ascii_lowercase());
                match name.as_str() {
                    "content-length" => content_length = value.parse().unwrap_or(0),
                    "connection" if value.contains("close") => close = true,
                    // not needed by the tests: answer, then close
                    "transfer-encoding" => close = true,
                    _ => {}
                }
            }
        }
        // request body (skipped)
        if content_length > 0 {
            let mut rest = (&mut reader).take(content_length as u64);
            if tokio::io::copy(&mut rest, &mut tokio::io::sink()).await.is_err() {
                return;
            }
        }
        hits.fetch_add(1, Ordering::Relaxed);
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-backend: {body}\r\n{}\r\n{body}",
            body.len(),
            if close { "connection: close\r\n" } else { "" },
        );
        if write.write_all(response.as_bytes()).await.is_err() || close {
            return;
        }
    }
}
