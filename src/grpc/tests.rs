//! The transport against a real HTTP/2 client (the `h2` crate, as tonic uses it) and against raw frames
//! for what a well-behaved client never sends.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, oneshot};

use super::frame::{self, Frame, Head, Reason, flag, kind, setting};
use super::*;

const PATH: &str = "/test.Echo/Echo";
const TIMEOUT: Duration = Duration::from_secs(10);

/// A gRPC message of `payload`, as one chunk.
fn message(payload: &[u8]) -> Message {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(0);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    [b.freeze()].into()
}

/// Echoes every request; a request `big N` is answered with N bytes (a pattern) in chunks of shared
/// bytes; `fail` ends the stream with status 9. What happens is reported on `events`.
struct Echo {
    events: mpsc::UnboundedSender<String>,
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

impl Handler for Echo {
    fn open(
        &mut self,
        head: RequestHead,
        mut messages: Messages,
        mut responses: Responses,
    ) -> Result<StreamFuture, tonic::Status> {
        if head.path != PATH {
            return Err(tonic::Status::unimplemented(format!("unknown method {}", head.path)));
        }
        let events = self.events.clone();
        Ok(Box::pin(async move {
            loop {
                match messages.message().await {
                    Ok(Some(m)) => {
                        let text = String::from_utf8_lossy(&m).to_string();
                        let reply = if let Some(n) = text.strip_prefix("big ") {
                            let body = Bytes::from(pattern(n.parse().unwrap()));
                            let mut prefix = BytesMut::new();
                            prefix.put_u8(0);
                            prefix.put_u32(body.len() as u32);
                            // in several shared chunks
                            let mut chunks: Message = [prefix.freeze()].into();
                            let mut rest = body;
                            while !rest.is_empty() {
                                chunks.push_back(rest.split_to(rest.len().min(10_000)));
                            }
                            chunks
                        } else if text == "fail" {
                            responses.finish(9, "failed as asked: 100%");
                            let _ = events.send("failed".into());
                            return;
                        } else {
                            message(&m)
                        };
                        if responses.send(reply).await.is_err() {
                            let _ = events.send("send failed".into());
                            return;
                        }
                    }
                    Ok(None) => {
                        let _ = events.send("end".into());
                        responses.finish(0, "");
                        return;
                    }
                    Err(e) => {
                        let _ = events.send(format!("error: {e}"));
                        if let RecvError::TooLarge { .. } = e {
                            responses.finish(8, &e.to_string());
                        }
                        return;
                    }
                }
            }
        }))
    }
}

struct Server {
    events: mpsc::UnboundedReceiver<String>,
    shutdown: Option<oneshot::Sender<()>>,
    done: oneshot::Receiver<Result<(), ConnError>>,
}

fn start(config: Config) -> (DuplexStream, Server) {
    let (client, server) = tokio::io::duplex(1 << 20);
    let (events_tx, events) = mpsc::unbounded_channel();
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let (done_tx, done) = oneshot::channel();
    tokio::spawn(async move {
        let r = serve(server, Echo { events: events_tx }, Arc::new(config), async move {
            let _ = shutdown_rx.await;
        })
        .await;
        let _ = done_tx.send(r);
    });
    (client, Server { events, shutdown: Some(shutdown_tx), done })
}

impl Server {
    async fn event(&mut self) -> String {
        tokio::time::timeout(TIMEOUT, self.events.recv()).await.expect("an event in time").expect("server alive")
    }
}

async fn h2_client(io: DuplexStream, window: u32) -> h2::client::SendRequest<Bytes> {
    let (client, conn) =
        h2::client::Builder::new().initial_window_size(window).handshake(io).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

fn request(path: &str) -> http::Request<()> {
    http::Request::post(format!("http://test{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// Reads gRPC messages from `body` until it ends; returns them and the trailers' grpc-status.
async fn read_all(mut body: h2::RecvStream) -> (Vec<Bytes>, Option<String>) {
    let mut buf = BytesMut::new();
    while let Some(chunk) = tokio::time::timeout(TIMEOUT, body.data()).await.expect("data in time") {
        let chunk = chunk.expect("data");
        body.flow_control().release_capacity(chunk.len()).unwrap();
        buf.extend_from_slice(&chunk);
    }
    let trailers = tokio::time::timeout(TIMEOUT, body.trailers()).await.expect("trailers in time").expect("trailers");
    (split_messages(buf.freeze()), trailers.and_then(|t| t.get("grpc-status").map(|v| v.to_str().unwrap().to_string())))
}

fn split_messages(mut b: Bytes) -> Vec<Bytes> {
    let mut out = Vec::new();
    while b.len() >= 5 {
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        b.advance(5);
        out.push(b.split_to(len));
    }
    assert!(b.is_empty(), "a partial message at the end");
    out
}

#[tokio::test]
async fn messages_round_trip_with_a_real_h2_client() {
    let (io, mut server) = start(Config::default());
    let mut client = h2_client(io, 65_535).await;
    let (resp, mut send) = client.send_request(request(PATH), false).unwrap();
    // three messages in one DATA frame, then one message split over three frames
    let mut three = BytesMut::new();
    for m in ["a", "bb", "ccc"] {
        three.extend_from_slice(&message(m.as_bytes())[0]);
    }
    send.send_data(three.freeze(), false).unwrap();
    let split = message(&[7u8; 100]).pop_front().unwrap();
    send.send_data(split.slice(..3), false).unwrap();
    send.send_data(split.slice(3..50), false).unwrap();
    send.send_data(split.slice(50..), true).unwrap();
    let resp = tokio::time::timeout(TIMEOUT, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let (msgs, status) = read_all(resp.into_body()).await;
    assert_eq!(msgs, [&b"a"[..], b"bb", b"ccc", &[7u8; 100]]);
    assert_eq!(status.as_deref(), Some("0"));
    assert_eq!(server.event().await, "end");
}

#[tokio::test]
async fn a_large_response_follows_the_client_window() {
    let (io, _server) = start(Config::default());
    // the client's windows are the default 64 KiB: the server must wait for WINDOW_UPDATEs
    let mut client = h2_client(io, 65_535).await;
    let (resp, mut send) = client.send_request(request(PATH), false).unwrap();
    send.send_data(message(b"big 3000000").pop_front().unwrap(), false).unwrap();
    send.send_data(message(b"x").pop_front().unwrap(), true).unwrap();
    let resp = tokio::time::timeout(TIMEOUT, resp).await.unwrap().unwrap();
    let (msgs, status) = read_all(resp.into_body()).await;
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0].len(), 3_000_000);
    assert!(msgs[0][..] == pattern(3_000_000)[..], "the large message arrives intact");
    assert_eq!(&msgs[1][..], b"x");
    assert_eq!(status.as_deref(), Some("0"));
}

#[tokio::test]
async fn refusals_and_errors_are_grpc_statuses() {
    let (io, mut server) = start(Config { max_message_size: 1000, ..Config::default() });
    let mut client = h2_client(io, 65_535).await;
    // an unknown method: a trailers-only response
    let (resp, _send) = client.send_request(request("/test.Echo/Nope"), true).unwrap();
    let resp = tokio::time::timeout(TIMEOUT, resp).await.unwrap().unwrap();
    assert_eq!(resp.headers()["grpc-status"], "12");
    assert!(resp.headers()["grpc-message"].to_str().unwrap().contains("unknown method"));
    // a status from the stream, percent-encoded
    let (resp, mut send) = client.send_request(request(PATH), false).unwrap();
    send.send_data(message(b"fail").pop_front().unwrap(), false).unwrap();
    let resp = tokio::time::timeout(TIMEOUT, resp).await.unwrap().unwrap();
    let mut body = resp.into_body();
    assert!(tokio::time::timeout(TIMEOUT, body.data()).await.unwrap().is_none());
    let trailers = body.trailers().await.unwrap().unwrap();
    assert_eq!(trailers["grpc-status"], "9");
    assert_eq!(trailers["grpc-message"], "failed as asked: 100%25");
    assert_eq!(server.event().await, "failed");
    // a message over the limit is refused from its length prefix
    let (resp, mut send) = client.send_request(request(PATH), false).unwrap();
    let mut prefix = BytesMut::new();
    prefix.put_u8(0);
    prefix.put_u32(5000);
    send.send_data(prefix.freeze(), false).unwrap();
    let resp = tokio::time::timeout(TIMEOUT, resp).await.unwrap().unwrap();
    let (_, status) = read_all(resp.into_body()).await;
    assert_eq!(status.as_deref(), Some("8"));
    assert!(server.event().await.contains("larger than the limit of 1000"));
    // not gRPC
    let req = http::Request::post(format!("http://test{PATH}")).header("content-type", "text/plain").body(()).unwrap();
    let (resp, _send) = client.send_request(req, true).unwrap();
    assert_eq!(tokio::time::timeout(TIMEOUT, resp).await.unwrap().unwrap().status(), 415);
    // the connection still serves
    let (resp, mut send) = client.send_request(request(PATH), false).unwrap();
    send.send_data(message(b"still here").pop_front().unwrap(), true).unwrap();
    let (msgs, _) = read_all(tokio::time::timeout(TIMEOUT, resp).await.unwrap().unwrap().into_body()).await;
    assert_eq!(msgs, [&b"still here"[..]]);
}

#[tokio::test]
async fn a_client_reset_reaches_the_stream() {
    let (io, mut server) = start(Config::default());
    let mut client = h2_client(io, 65_535).await;
    let (resp, mut send) = client.send_request(request(PATH), false).unwrap();
    send.send_data(message(b"hello").pop_front().unwrap(), false).unwrap();
    let resp = tokio::time::timeout(TIMEOUT, resp).await.unwrap().unwrap();
    let mut body = resp.into_body();
    assert!(tokio::time::timeout(TIMEOUT, body.data()).await.unwrap().is_some());
    send.send_reset(h2::Reason::CANCEL);
    assert_eq!(server.event().await, "error: the client reset the stream");
}

#[tokio::test]
async fn the_connection_ends_with_its_client() {
    let (io, mut server) = start(Config::default());
    let mut client = h2_client(io, 65_535).await;
    let (resp, mut send) = client.send_request(request(PATH), false).unwrap();
    send.send_data(message(b"hello").pop_front().unwrap(), false).unwrap();
    let _resp = tokio::time::timeout(TIMEOUT, resp).await.unwrap().unwrap();
    drop(client);
    drop(send);
    drop(_resp);
    // the h2 connection task closes the socket when every handle is gone
    let event = server.event().await;
    assert!(event.starts_with("error: ") || event == "end", "{event}");
    let done = tokio::time::timeout(TIMEOUT, &mut server.done).await.unwrap().unwrap();
    assert!(done.is_ok() || matches!(done, Err(ConnError::Io(_))), "{done:?}");
}

#[tokio::test]
async fn shutdown_sends_goaway_and_lets_streams_finish() {
    let (io, mut server) = start(Config::default());
    let mut client = h2_client(io, 65_535).await;
    let (resp, mut send) = client.send_request(request(PATH), false).unwrap();
    send.send_data(message(b"one").pop_front().unwrap(), false).unwrap();
    let resp = tokio::time::timeout(TIMEOUT, resp).await.unwrap().unwrap();
    let mut body = resp.into_body();
    assert!(tokio::time::timeout(TIMEOUT, body.data()).await.unwrap().is_some());
    server.shutdown.take().unwrap().send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // the open stream goes on until it ends
    send.send_data(message(b"two").pop_front().unwrap(), true).unwrap();
    let (msgs, status) = read_all(body).await;
    assert_eq!(msgs, [&b"two"[..]]);
    assert_eq!(status.as_deref(), Some("0"));
    // and then the connection ends
    tokio::time::timeout(TIMEOUT, &mut server.done).await.unwrap().unwrap().unwrap();
}

// ---- raw frames ----

struct Raw {
    io: DuplexStream,
    buf: BytesMut,
}

impl Raw {
    async fn connect(io: DuplexStream) -> Raw {
        let mut raw = Raw { io, buf: BytesMut::new() };
        raw.io.write_all(frame::PREFACE).await.unwrap();
        let mut b = BytesMut::new();
        frame::settings(&mut b, &[]);
        raw.send(&b).await;
        raw
    }

    async fn send(&mut self, b: &[u8]) {
        self.io.write_all(b).await.unwrap();
    }

    async fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut b = BytesMut::new();
        Head { len: payload.len() as u32, kind, flags, stream }.encode(&mut b);
        b.extend_from_slice(payload);
        self.send(&b).await;
    }

    /// The next frame from the server; None when the connection closed.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(h) = Head::parse(&self.buf)
                && self.buf.len() >= frame::HEADER_LEN + h.len as usize
            {
                self.buf.advance(frame::HEADER_LEN);
                let payload = self.buf.split_to(h.len as usize).freeze();
                return Some(frame::parse(h, payload).unwrap());
            }
            let n =
                tokio::time::timeout(TIMEOUT, self.io.read_buf(&mut self.buf)).await.expect("server answers").ok()?;
            if n == 0 {
                return None;
            }
        }
    }

    /// Frames until one matches `f` (None if the connection closed first).
    async fn until(&mut self, f: impl Fn(&Frame) -> bool) -> Option<Frame> {
        while let Some(fr) = self.next().await {
            if f(&fr) {
                return Some(fr);
            }
        }
        None
    }

    /// The GOAWAY the server ends with, and that the connection then closes.
    async fn goaway(&mut self) -> u32 {
        let Some(Frame::GoAway { code, .. }) = self.until(|f| matches!(f, Frame::GoAway { .. })).await else {
            panic!("no GOAWAY")
        };
        assert!(self.until(|_| false).await.is_none(), "the connection closes after GOAWAY");
        code
    }
}

fn request_block(path: &str) -> Vec<u8> {
    let mut enc = loona_hpack::Encoder::new();
    let headers: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.as_bytes()),
        (b":authority", b"test"),
        (b"content-type", b"application/grpc"),
    ];
    enc.encode(headers.iter().copied())
}

#[tokio::test]
async fn the_server_preface_and_ping() {
    let (io, _server) = start(Config::default());
    let mut raw = Raw::connect(io).await;
    let Some(Frame::Settings { ack: false, params }) = raw.next().await else { panic!("SETTINGS first") };
    assert!(params.contains(&(setting::INITIAL_WINDOW_SIZE, Config::default().stream_window)));
    raw.frame(kind::PING, 0, 0, b"12345678").await;
    assert_eq!(
        raw.until(|f| matches!(f, Frame::Ping { .. })).await,
        Some(Frame::Ping { ack: true, payload: *b"12345678" })
    );
}

#[tokio::test]
async fn a_header_block_in_continuation_frames_opens_a_stream() {
    let (io, mut server) = start(Config::default());
    let mut raw = Raw::connect(io).await;
    let block = request_block(PATH);
    let (a, b) = block.split_at(block.len() / 2);
    raw.frame(kind::HEADERS, 0, 1, a).await;
    raw.frame(kind::CONTINUATION, flag::END_HEADERS, 1, b).await;
    raw.frame(kind::DATA, flag::END_STREAM, 1, &message(b"hi")[0]).await;
    let got = raw.until(|f| matches!(f, Frame::Data { .. })).await;
    let Some(Frame::Data { data, .. }) = got else { panic!("no answer") };
    assert_eq!(&data[5..], b"hi");
    assert_eq!(server.event().await, "end");
}

#[tokio::test]
async fn protocol_errors_end_the_connection_with_goaway() {
    // not HTTP/2 at all
    let (mut io, _server) = start(Config::default());
    io.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut raw = Raw { io, buf: BytesMut::new() };
    assert_eq!(raw.goaway().await, Reason::ProtocolError as u32);

    type Write = Box<dyn Fn(&mut BytesMut)>;
    let cases: Vec<(&str, Write, Reason)> = vec![
        (
            "a frame over the size limit",
            Box::new(|b| Head { len: 70_000, kind: kind::DATA, flags: 0, stream: 1 }.encode(b)),
            Reason::FrameSizeError,
        ),
        (
            "DATA on stream 0",
            Box::new(|b| {
                Head { len: 1, kind: kind::DATA, flags: 0, stream: 0 }.encode(b);
                b.put_u8(0);
            }),
            Reason::ProtocolError,
        ),
        (
            "DATA on an idle stream",
            Box::new(|b| {
                Head { len: 1, kind: kind::DATA, flags: 0, stream: 7 }.encode(b);
                b.put_u8(0);
            }),
            Reason::ProtocolError,
        ),
        (
            "a header block that does not decode",
            Box::new(|b| frame::headers(b, 1, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff], false)),
            Reason::CompressionError,
        ),
        (
            "a header block interrupted",
            Box::new(|b| {
                Head { len: 1, kind: kind::HEADERS, flags: 0, stream: 1 }.encode(b);
                b.put_u8(0x82);
                frame::ping(b, false, [0; 8]);
            }),
            Reason::ProtocolError,
        ),
        (
            "a window overflow",
            Box::new(|b| {
                frame::window_update(b, 0, 0x7fff_ffff);
            }),
            Reason::FlowControlError,
        ),
        (
            "PUSH_PROMISE",
            Box::new(|b| Head { len: 0, kind: kind::PUSH_PROMISE, flags: 0, stream: 1 }.encode(b)),
            Reason::ProtocolError,
        ),
        (
            "a header block without end",
            Box::new(|b| {
                for _ in 0..20 {
                    Head { len: 1000, kind: kind::CONTINUATION, flags: 0, stream: 1 }.encode(b);
                    b.put_slice(&[0u8; 1000]);
                }
            }),
            Reason::ProtocolError,
        ),
    ];
    for (what, write, reason) in cases {
        let (io, _server) = start(Config::default());
        let mut raw = Raw::connect(io).await;
        let mut b = BytesMut::new();
        write(&mut b);
        raw.send(&b).await;
        assert_eq!(raw.goaway().await, reason as u32, "{what}");
    }
    // a header block growing without end
    let (io, _server) = start(Config { max_header_list_size: 4096, ..Config::default() });
    let mut raw = Raw::connect(io).await;
    raw.frame(kind::HEADERS, 0, 1, &[0x82]).await;
    for _ in 0..10 {
        raw.frame(kind::CONTINUATION, 0, 1, &[0x82; 1000]).await;
    }
    assert_eq!(raw.goaway().await, Reason::EnhanceYourCalm as u32);
}

#[tokio::test]
async fn streams_over_the_concurrency_limit_are_refused() {
    let (io, _server) = start(Config { max_concurrent_streams: 1, ..Config::default() });
    let mut raw = Raw::connect(io).await;
    let mut enc = loona_hpack::Encoder::new();
    let headers: Vec<(&[u8], &[u8])> =
        vec![(b":method", b"POST"), (b":path", PATH.as_bytes()), (b"content-type", b"application/grpc")];
    let block1 = enc.encode(headers.iter().copied());
    let block3 = enc.encode(headers.iter().copied());
    raw.frame(kind::HEADERS, flag::END_HEADERS, 1, &block1).await;
    raw.frame(kind::HEADERS, flag::END_HEADERS, 3, &block3).await;
    let got = raw.until(|f| matches!(f, Frame::RstStream { .. })).await;
    assert_eq!(got, Some(Frame::RstStream { stream: 3, code: Reason::RefusedStream as u32 }));
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_keepalive_timeout() {
    let config = Config {
        keepalive_interval: Some(Duration::from_millis(50)),
        keepalive_timeout: Duration::from_millis(50),
        ..Config::default()
    };
    // a client that answers PINGs (h2 does) stays
    let (io, mut server) = start(config.clone());
    let _client = h2_client(io, 65_535).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(server.done.try_recv().is_err(), "a live client is kept");
    // one that does not is dropped
    let (io, mut server) = start(config);
    let mut raw = Raw::connect(io).await;
    assert!(raw.until(|f| matches!(f, Frame::Ping { ack: false, .. })).await.is_some(), "the server pings");
    let done = tokio::time::timeout(TIMEOUT, &mut server.done).await.unwrap().unwrap();
    assert!(matches!(done, Err(ConnError::KeepaliveTimeout(_))), "{done:?}");
}

#[tokio::test]
async fn a_client_that_does_not_read_cannot_grow_the_output() {
    // The client floods PINGs and never reads: the server stops reading once its output is over
    // WRITE_HIGH, so the duplex's buffer (the socket) fills and the client's writes block.
    let (client, server_io) = tokio::io::duplex(64 * 1024);
    let (events_tx, _events) = mpsc::unbounded_channel();
    tokio::spawn(serve(server_io, Echo { events: events_tx }, Arc::new(Config::default()), std::future::pending()));
    let mut raw = Raw { io: client, buf: BytesMut::new() };
    raw.send(frame::PREFACE).await;
    let mut b = BytesMut::new();
    frame::settings(&mut b, &[]);
    for _ in 0..1000 {
        frame::ping(&mut b, false, [1; 8]);
    }
    let chunk = b.freeze();
    let mut sent = 0usize;
    let blocked = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            raw.io.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
    })
    .await;
    assert!(blocked.is_err(), "the client's writes block");
    // a PING's answer is as long as the PING: the server took at most its output bound's worth, plus
    // the buffers of both directions and one read
    assert!(sent < conn::WRITE_HIGH + 4 * 64 * 1024, "sent {sent} bytes of PINGs");
}

#[tokio::test]
async fn a_client_slowly_reading_a_long_response_is_not_dropped_by_the_keepalive() {
    // The connection stops reading while its output is over WRITE_HIGH, so it does not hear from the
    // client; a client taking data off the socket is alive all the same. This one never answers PINGs:
    // only its reading keeps it.
    let config = Config {
        keepalive_interval: Some(Duration::from_millis(30)),
        keepalive_timeout: Duration::from_millis(30),
        ..Config::default()
    };
    let (client_io, mut server) = start(config);
    let mut raw = Raw { io: client_io, buf: BytesMut::new() };
    raw.send(frame::PREFACE).await;
    let mut b = BytesMut::new();
    frame::settings(&mut b, &[(setting::INITIAL_WINDOW_SIZE, 0x7fff_ffff)]);
    frame::window_update(&mut b, 0, 0x7fff_ffff - 65_535);
    raw.send(&b).await;
    raw.frame(kind::HEADERS, flag::END_HEADERS, 1, &request_block(PATH)).await;
    raw.frame(kind::DATA, flag::END_STREAM, 1, &message(b"big 3000000")[0]).await;
    let mut data = 0usize;
    let mut chunk = [0u8; 4096];
    let slow = async {
        loop {
            let n = raw.io.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            data += n;
            // about 4 MB/s: the response takes far longer than the keepalive's interval and timeout
            tokio::time::sleep(Duration::from_millis(1)).await;
            if data >= 3_000_000 {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), slow).await.expect("read in time");
    assert!(data >= 3_000_000, "only {data} bytes arrived: the connection was dropped");
    assert_eq!(server.events.recv().await.as_deref(), Some("end"));
}
