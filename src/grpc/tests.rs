//! The transport against a real HTTP/2 client (the `h2` crate, as tonic uses it) and against raw frames
//! for what a well-behaved client never sends: one raw-frame test per malformed request and per frame on
//! a closed stream that RFC 9113 makes a stream error, each beside a healthy stream that must go on.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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

    fn refused(&mut self) {
        let _ = self.events.send("refused".into());
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

    /// Sends `frames` and a PING, and returns the codes of the RST_STREAMs on `stream` the server wrote
    /// before its answer to the PING (it handles frames in order), or the code of a GOAWAY.
    async fn resets_before_ping(&mut self, stream: u32, frames: &[u8]) -> Result<Vec<u32>, u32> {
        let mut b = BytesMut::from(frames);
        frame::ping(&mut b, false, *b"barrier!");
        self.send(&b).await;
        let mut codes = Vec::new();
        loop {
            match self.next().await.expect("the connection stays open") {
                Frame::RstStream { stream: s, code } if s == stream => codes.push(code),
                Frame::Ping { ack: true, payload } if &payload == b"barrier!" => return Ok(codes),
                Frame::GoAway { code, .. } => return Err(code),
                _ => {}
            }
        }
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
async fn a_client_ignoring_the_concurrency_limit_has_its_extra_streams_refused() {
    let (io, mut server) = start(Config { max_concurrent_streams: 1, ..Config::default() });
    let mut raw = Raw::connect(io).await;
    let Some(Frame::Settings { ack: false, params }) = raw.next().await else { panic!("SETTINGS first") };
    assert!(params.contains(&(setting::MAX_CONCURRENT_STREAMS, 1)), "the limit is advertised: {params:?}");
    raw.frame(kind::HEADERS, flag::END_HEADERS, 1, &literal_block(&REQUEST)).await;
    raw.frame(kind::HEADERS, flag::END_HEADERS, 3, &literal_block(&REQUEST)).await;
    let got = raw.until(|f| matches!(f, Frame::RstStream { .. })).await;
    assert_eq!(got, Some(Frame::RstStream { stream: 3, code: Reason::RefusedStream as u32 }));
    assert_eq!(server.event().await, "refused", "the handler is told");
    // its DATA, sent before the client saw the refusal, is dropped without another reset
    raw.frame(kind::DATA, 0, 3, &message(b"late")[0]).await;
    assert_eq!(raw.resets_before_ping(3, &[]).await, Ok(vec![]));
    // once stream 1 ends, a stream takes its place
    raw.frame(kind::DATA, flag::END_STREAM, 1, &message(b"one")[0]).await;
    assert!(raw.until(|f| matches!(f, Frame::Headers { stream: 1, end_stream: true, .. })).await.is_some());
    assert_eq!(server.event().await, "end");
    raw.frame(kind::HEADERS, flag::END_HEADERS, 5, &literal_block(&REQUEST)).await;
    raw.frame(kind::DATA, flag::END_STREAM, 5, &message(b"five")[0]).await;
    let Some(Frame::Data { data, .. }) = raw.until(|f| matches!(f, Frame::Data { stream: 5, .. })).await else {
        panic!("stream 5 is not served")
    };
    assert_eq!(&data[5..], b"five");
}

#[tokio::test]
async fn a_real_client_queues_its_streams_over_the_advertised_limit() {
    let (io, mut server) = start(Config { max_concurrent_streams: 2, ..Config::default() });
    let client = h2_client(io, 65_535).await;
    // the client learns the limit from the server's SETTINGS
    tokio::time::timeout(TIMEOUT, async {
        while client.current_max_send_streams() != 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the client takes the advertised limit");
    // five streams at once: two open, three wait in the client
    let mut calls = Vec::new();
    for _ in 0..5 {
        let mut c = client.clone().ready().await.unwrap();
        let (resp, send) = c.send_request(request(PATH), false).unwrap();
        calls.push((tokio::spawn(resp), send));
    }
    let opened = |calls: &[(tokio::task::JoinHandle<_>, _)]| calls.iter().filter(|(r, _)| r.is_finished()).count();
    tokio::time::timeout(TIMEOUT, async {
        while opened(&calls) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("two streams open");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(opened(&calls), 2, "only the advertised number of streams is open");
    // each ends in turn, and the waiting ones take their places: all five are served
    for (i, (resp, mut send)) in calls.into_iter().enumerate() {
        let text = format!("call {i}");
        send.send_data(message(text.as_bytes()).pop_front().unwrap(), true).unwrap();
        let resp = tokio::time::timeout(TIMEOUT, resp).await.expect("opened in time").unwrap().unwrap();
        let (msgs, status) = read_all(resp.into_body()).await;
        assert_eq!(msgs, [text.as_bytes()]);
        assert_eq!(status.as_deref(), Some("0"));
        assert_eq!(server.event().await, "end");
    }
    assert!(server.events.try_recv().is_err(), "no stream was refused");
}

/// Serves at most `max` streams at once, as meshfed's ADS service does under its stream limit: a
/// stream holds its place until its future ends.
struct Slots {
    max: usize,
    live: Arc<AtomicUsize>,
}

struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Handler for Slots {
    fn open(&mut self, _: RequestHead, mut messages: Messages, _: Responses) -> Result<StreamFuture, tonic::Status> {
        if self.live.fetch_add(1, Ordering::SeqCst) >= self.max {
            self.live.fetch_sub(1, Ordering::SeqCst);
            return Err(tonic::Status::resource_exhausted("no slot"));
        }
        let slot = Slot(self.live.clone());
        Ok(Box::pin(async move {
            let _slot = slot;
            while let Ok(Some(_)) = messages.message().await {}
        }))
    }
}

#[tokio::test]
async fn a_stream_reset_by_the_client_frees_its_place_for_the_next_at_once() {
    // The client resets stream 1 and opens stream 3 in one write: the HTTP/2 limit counts stream 1 as
    // closed, and stream 1's future, which holds the handler's slot, ends before stream 3 opens.
    let (client, server_io) = tokio::io::duplex(1 << 20);
    let live = Arc::new(AtomicUsize::new(0));
    let handler = Slots { max: 1, live: live.clone() };
    let config = Config { max_concurrent_streams: 1, ..Config::default() };
    tokio::spawn(serve(server_io, handler, Arc::new(config), std::future::pending()));
    let mut raw = Raw::connect(client).await;
    raw.frame(kind::HEADERS, flag::END_HEADERS, 1, &literal_block(&REQUEST)).await;
    assert!(raw.until(|f| matches!(f, Frame::Headers { stream: 1, .. })).await.is_some());
    let mut b = BytesMut::new();
    frame::rst_stream(&mut b, 1, Reason::Cancel);
    frame::headers(&mut b, 3, &literal_block(&REQUEST), false);
    raw.send(&b).await;
    let got = raw.until(|f| matches!(f, Frame::Headers { stream: 3, .. } | Frame::RstStream { stream: 3, .. })).await;
    assert!(matches!(got, Some(Frame::Headers { end_stream: false, .. })), "stream 3 is opened, not refused: {got:?}");
    assert_eq!(live.load(Ordering::SeqCst), 1);
}

// ---- malformed requests and closed streams: stream errors, one stream at a time ----

/// A gRPC request's fields.
const REQUEST: [(&str, &str); 6] = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", PATH),
    (":authority", "test"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
];

/// A header block of literal fields without indexing (no HPACK table: any name, as written).
fn literal_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, value) in fields {
        assert!(name.len() < 127 && value.len() < 127);
        b.push(0);
        b.push(name.len() as u8);
        b.extend_from_slice(name.as_bytes());
        b.push(value.len() as u8);
        b.extend_from_slice(value.as_bytes());
    }
    b
}

/// The request's fields with `name` left out.
fn request_without(name: &str) -> Vec<(&'static str, &'static str)> {
    REQUEST.iter().filter(|(n, _)| *n != name).copied().collect()
}

/// The request's fields followed by `extra`.
fn request_with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    REQUEST.iter().chain(extra).copied().collect()
}

/// Opens a healthy stream 1, sends what `write` writes (about stream 3), and checks that the server
/// resets stream 3 with `reason` — and nothing else — before it answers a PING sent after those frames;
/// then that stream 1 is still served, on the same connection.
async fn stream_error_beside_a_healthy_stream(reason: Reason, write: impl FnOnce(&mut BytesMut)) {
    let (io, _server) = start(Config::default());
    let mut raw = Raw::connect(io).await;
    raw.frame(kind::HEADERS, flag::END_HEADERS, 1, &literal_block(&REQUEST)).await;
    let mut b = BytesMut::new();
    write(&mut b);
    assert_eq!(raw.resets_before_ping(3, &b).await, Ok(vec![reason as u32]), "stream 3 is reset with {reason:?}");
    raw.frame(kind::DATA, flag::END_STREAM, 1, &message(b"healthy")[0]).await;
    let Some(Frame::Data { data, .. }) = raw.until(|f| matches!(f, Frame::Data { stream: 1, .. })).await else {
        panic!("the healthy stream is not served")
    };
    assert_eq!(&data[5..], b"healthy");
    assert!(raw.until(|f| matches!(f, Frame::Headers { stream: 1, end_stream: true, .. })).await.is_some());
}

/// A request on stream 3 whose header block holds `fields`: malformed, so a stream error PROTOCOL_ERROR.
async fn malformed_request(fields: &[(&str, &str)]) {
    let block = literal_block(fields);
    stream_error_beside_a_healthy_stream(Reason::ProtocolError, |b| frame::headers(b, 3, &block, false)).await;
}

#[tokio::test]
async fn an_upper_case_header_name_is_malformed() {
    malformed_request(&request_with(&[("User-Agent", "grpc-test/1")])).await;
}

#[tokio::test]
async fn an_unknown_pseudo_header_is_malformed() {
    let mut fields = REQUEST.to_vec();
    fields.insert(1, (":protocol", "websocket"));
    malformed_request(&fields).await;
}

#[tokio::test]
async fn a_repeated_pseudo_header_is_malformed() {
    let mut fields = REQUEST.to_vec();
    fields.insert(3, (":path", "/test.Echo/Other"));
    malformed_request(&fields).await;
}

#[tokio::test]
async fn a_request_without_method_path_or_scheme_is_malformed() {
    for name in [":method", ":path", ":scheme"] {
        malformed_request(&request_without(name)).await;
    }
}

#[tokio::test]
async fn a_pseudo_header_after_a_regular_field_is_malformed() {
    let mut fields = request_without(":path");
    fields.push((":path", PATH));
    malformed_request(&fields).await;
}

#[tokio::test]
async fn connection_specific_headers_are_malformed() {
    for field in [
        ("connection", "keep-alive"),
        ("keep-alive", "300"),
        ("proxy-connection", "close"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "h2c"),
    ] {
        malformed_request(&request_with(&[field])).await;
    }
}

#[tokio::test]
async fn te_other_than_trailers_is_malformed() {
    // (every request here carries `te: trailers`, and the healthy stream is served)
    let mut fields = request_without("te");
    fields.push(("te", "trailers, deflate"));
    malformed_request(&fields).await;
}

#[tokio::test]
async fn a_pseudo_header_in_trailers_is_malformed() {
    let (headers, trailers) = (literal_block(&REQUEST), literal_block(&[("x-checksum", "1"), (":path", PATH)]));
    stream_error_beside_a_healthy_stream(Reason::ProtocolError, |b| {
        frame::headers(b, 3, &headers, false);
        Head { len: 10, kind: kind::DATA, flags: 0, stream: 3 }.encode(b);
        b.extend_from_slice(&message(b"trail")[0]);
        frame::headers(b, 3, &trailers, true);
    })
    .await;
}

#[tokio::test]
async fn more_data_than_the_content_length_is_malformed() {
    let block = literal_block(&request_with(&[("content-length", "7")]));
    stream_error_beside_a_healthy_stream(Reason::ProtocolError, |b| {
        frame::headers(b, 3, &block, false);
        // 5 + 3 bytes, then 5 + 4: the second frame goes past the 7 declared
        Head { len: 8, kind: kind::DATA, flags: 0, stream: 3 }.encode(b);
        b.extend_from_slice(&message(b"abc")[0]);
        Head { len: 9, kind: kind::DATA, flags: 0, stream: 3 }.encode(b);
        b.extend_from_slice(&message(b"defg")[0]);
    })
    .await;
}

#[tokio::test]
async fn less_data_than_the_content_length_is_malformed() {
    let block = literal_block(&request_with(&[("content-length", "100")]));
    stream_error_beside_a_healthy_stream(Reason::ProtocolError, |b| {
        frame::headers(b, 3, &block, false);
        Head { len: 8, kind: kind::DATA, flags: flag::END_STREAM, stream: 3 }.encode(b);
        b.extend_from_slice(&message(b"abc")[0]);
    })
    .await;
}

#[tokio::test]
async fn a_content_length_that_adds_up_is_served() {
    let (io, mut server) = start(Config::default());
    let mut raw = Raw::connect(io).await;
    // padding does not count: 5 + 2 bytes of data in a padded frame
    raw.frame(kind::HEADERS, flag::END_HEADERS, 1, &literal_block(&request_with(&[("content-length", "7")]))).await;
    let mut padded = vec![3];
    padded.extend_from_slice(&message(b"ok")[0]);
    padded.extend_from_slice(&[0, 0, 0]);
    raw.frame(kind::DATA, flag::END_STREAM | flag::PADDED, 1, &padded).await;
    assert!(raw.until(|f| matches!(f, Frame::Headers { stream: 1, end_stream: true, .. })).await.is_some());
    assert_eq!(server.event().await, "end");
}

#[tokio::test]
async fn data_on_a_closed_stream_is_stream_closed() {
    let (io, mut server) = start(Config::default());
    let mut raw = Raw::connect(io).await;
    // stream 1 closes both ways: the request ends with its headers, the response with its trailers
    raw.frame(kind::HEADERS, flag::END_HEADERS | flag::END_STREAM, 1, &literal_block(&REQUEST)).await;
    assert!(raw.until(|f| matches!(f, Frame::Headers { stream: 1, end_stream: true, .. })).await.is_some());
    assert_eq!(server.event().await, "end");
    let mut b = BytesMut::new();
    Head { len: 6, kind: kind::DATA, flags: 0, stream: 1 }.encode(&mut b);
    b.extend_from_slice(&message(b"x")[0]);
    assert_eq!(raw.resets_before_ping(1, &b).await, Ok(vec![Reason::StreamClosed as u32]));
    // a stream the client reset is closed as well
    raw.frame(kind::HEADERS, flag::END_HEADERS, 3, &literal_block(&REQUEST)).await;
    raw.frame(kind::RST_STREAM, 0, 3, &(Reason::Cancel as u32).to_be_bytes()).await;
    let mut b = BytesMut::new();
    Head { len: 6, kind: kind::DATA, flags: 0, stream: 3 }.encode(&mut b);
    b.extend_from_slice(&message(b"y")[0]);
    assert_eq!(raw.resets_before_ping(3, &b).await, Ok(vec![Reason::StreamClosed as u32]));
    // and the connection serves on
    raw.frame(kind::HEADERS, flag::END_HEADERS, 5, &literal_block(&REQUEST)).await;
    raw.frame(kind::DATA, flag::END_STREAM, 5, &message(b"five")[0]).await;
    assert!(raw.until(|f| matches!(f, Frame::Data { stream: 5, .. })).await.is_some());
}

#[tokio::test]
async fn headers_on_a_closed_stream_are_stream_closed() {
    let (io, mut server) = start(Config::default());
    let mut raw = Raw::connect(io).await;
    let trailers = literal_block(&[("x-checksum", "1")]);
    // closed both ways
    raw.frame(kind::HEADERS, flag::END_HEADERS | flag::END_STREAM, 1, &literal_block(&REQUEST)).await;
    assert!(raw.until(|f| matches!(f, Frame::Headers { stream: 1, end_stream: true, .. })).await.is_some());
    assert_eq!(server.event().await, "end");
    let mut b = BytesMut::new();
    frame::headers(&mut b, 1, &trailers, true);
    assert_eq!(raw.resets_before_ping(1, &b).await, Ok(vec![Reason::StreamClosed as u32]));
    // half-closed by the client, while the server still answers (its window is full): §5.1 says
    // STREAM_CLOSED for anything but WINDOW_UPDATE, PRIORITY and RST_STREAM
    raw.frame(kind::HEADERS, flag::END_HEADERS, 3, &literal_block(&REQUEST)).await;
    raw.frame(kind::DATA, flag::END_STREAM, 3, &message(b"big 200000")[0]).await;
    assert!(raw.until(|f| matches!(f, Frame::Data { stream: 3, .. })).await.is_some());
    let mut b = BytesMut::new();
    frame::headers(&mut b, 3, &trailers, true);
    assert_eq!(raw.resets_before_ping(3, &b).await, Ok(vec![Reason::StreamClosed as u32]));
    // the connection serves on (stream 3 used up the connection's window)
    let mut b = BytesMut::new();
    frame::window_update(&mut b, 0, 1 << 20);
    raw.send(&b).await;
    raw.frame(kind::HEADERS, flag::END_HEADERS, 5, &literal_block(&REQUEST)).await;
    raw.frame(kind::DATA, flag::END_STREAM, 5, &message(b"five")[0]).await;
    assert!(raw.until(|f| matches!(f, Frame::Data { stream: 5, .. })).await.is_some());
}

#[tokio::test]
async fn a_priority_frame_on_its_own_stream_is_a_stream_error() {
    stream_error_beside_a_healthy_stream(Reason::ProtocolError, |b| {
        frame::headers(b, 3, &literal_block(&REQUEST), false);
        Head { len: 5, kind: kind::PRIORITY, flags: 0, stream: 3 }.encode(b);
        b.extend_from_slice(&[0, 0, 0, 3, 16]);
    })
    .await;
}

#[tokio::test]
async fn a_headers_frame_depending_on_its_own_stream_is_a_stream_error() {
    let block = literal_block(&REQUEST);
    stream_error_beside_a_healthy_stream(Reason::ProtocolError, |b| {
        Head { len: 5 + block.len() as u32, kind: kind::HEADERS, flags: flag::END_HEADERS | flag::PRIORITY, stream: 3 }
            .encode(b);
        b.extend_from_slice(&[0x80, 0, 0, 3, 16]);
        b.extend_from_slice(&block);
    })
    .await;
}

#[tokio::test]
async fn frames_on_a_stream_the_server_reset_are_dropped_quietly() {
    let (io, _server) = start(Config::default());
    let mut raw = Raw::connect(io).await;
    let mut b = BytesMut::new();
    frame::headers(&mut b, 1, &literal_block(&request_with(&[("connection", "close")])), false);
    assert_eq!(raw.resets_before_ping(1, &b).await, Ok(vec![Reason::ProtocolError as u32]));
    // what the client sent before it saw the reset: no second reset, and the connection goes on
    let mut b = BytesMut::new();
    Head { len: 6, kind: kind::DATA, flags: 0, stream: 1 }.encode(&mut b);
    b.extend_from_slice(&message(b"x")[0]);
    frame::headers(&mut b, 1, &literal_block(&[("x-checksum", "1")]), true);
    assert_eq!(raw.resets_before_ping(1, &b).await, Ok(vec![]));
}

#[tokio::test]
async fn stream_errors_count_toward_the_reset_limit() {
    // A client cannot make the server reset streams without end (CVE-2025-8671): past MAX_RESETS the
    // connection ends with ENHANCE_YOUR_CALM.
    let (io, _server) = start(Config::default());
    let mut raw = Raw::connect(io).await;
    let block = literal_block(&request_without(":scheme"));
    let mut b = BytesMut::new();
    for i in 0..=conn::MAX_RESETS {
        frame::headers(&mut b, 1 + 2 * i, &block, false);
    }
    raw.send(&b).await;
    assert_eq!(raw.goaway().await, Reason::EnhanceYourCalm as u32);
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
