//! One HTTP/2 connection of the gRPC server, driven by one task.
//!
//! The connection reads frames, hands each stream's request messages to the stream's future, polls
//! those futures itself (so a stream and its connection never wake each other across tasks), frames
//! their responses within the flow-control windows and writes them, vectored, with the resources'
//! shared bytes as they are. Per connection it keeps: the HPACK decoder's table, the frame being read,
//! what is waiting to be written, and per stream its windows and the message being assembled or
//! written. An idle connection holds no read or write buffer.
//!
//! Bounds: a frame is at most [`Config::max_frame_size`]; a header block at most
//! [`Config::max_header_list_size`]; a request message at most [`Config::max_message_size`] (refused from
//! its length prefix); unread request messages of a stream at most about one stream window (the window
//! is credited only while the stream's future keeps up); queued output at most [`WRITE_HIGH`] beyond one
//! frame per stream — above it the connection stops reading, so a client that does not read cannot make
//! the server queue answers (PING, SETTINGS) without end.
//!
//! Strictness (RFC 9113): a malformed request — see [`headers`] for what its header block may not hold,
//! or DATA that does not add up to its `content-length` — and a stream that depends on itself are stream
//! errors PROTOCOL_ERROR; DATA or HEADERS on a closed stream is a stream error STREAM_CLOSED (§5.1, §6.1),
//! except on a stream this server reset lately, whose frames the client may have sent before it saw the
//! RST_STREAM (they are dropped). A stream error resets that stream only. A stream opened beyond
//! [`Config::max_concurrent_streams`] is refused (REFUSED_STREAM: not processed, the client may retry it,
//! §5.1.2, §8.7) and reported to [`Handler::refused`]. Every stream error this server sends counts, with
//! the client's own resets, toward [`MAX_RESETS`]: a client cannot make the server reset streams without
//! end either.

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::frame::{self, Frame, Head, Reason, flag, kind, setting};
use super::headers::{self, RequestHead};
use super::stream::{Messages, RecvError, Responses, Shared, SharedRef, lock};

/// Output queued beyond this stops reading and framing until the socket takes it.
pub const WRITE_HIGH: usize = 256 * 1024;
/// The read buffer's size while data arrives: small enough for the allocator's fast (thread-cached)
/// size classes; a larger frame gets a buffer of its size.
const READ_SIZE: usize = 8 * 1024;
/// Pieces of output smaller than this are copied together; larger ones are written as they are.
const COPY_MAX: usize = 1024;
/// IoSlices per vectored write.
const MAX_IOVECS: usize = 64;
/// How long the futures of a closing connection get to finish.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Streams a client may reset, or make the server reset by a stream error, within [`RESET_WINDOW`]
/// (CVE-2023-44487 "rapid reset", CVE-2025-8671 "MadeYouReset").
pub const MAX_RESETS: u32 = 500;
const RESET_WINDOW: Duration = Duration::from_secs(10);

/// How a connection serves.
#[derive(Clone, Debug)]
pub struct Config {
    /// SETTINGS_MAX_CONCURRENT_STREAMS, and the streams served at once: a stream opened beyond it is
    /// refused (0: not limited)
    pub max_concurrent_streams: u32,
    /// largest request message
    pub max_message_size: usize,
    /// receive window of each stream
    pub stream_window: u32,
    /// receive window of the connection
    pub connection_window: u32,
    /// largest frame the client may send (SETTINGS_MAX_FRAME_SIZE)
    pub max_frame_size: u32,
    /// largest header list (SETTINGS_MAX_HEADER_LIST_SIZE), also the largest encoded header block
    pub max_header_list_size: u32,
    /// a PING after this long without hearing from the client; the connection closes if nothing
    /// arrives within `keepalive_timeout` after it
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_concurrent_streams: 0,
            max_message_size: 4 * 1024 * 1024,
            stream_window: 1024 * 1024,
            connection_window: 2 * 1024 * 1024,
            max_frame_size: 64 * 1024,
            max_header_list_size: 16 * 1024,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// A stream's work, run by the connection's task until the stream ends.
pub type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What serves the streams of one connection.
pub trait Handler: Send + 'static {
    /// Opens a stream with these request headers: Ok(its future), or a status answered as a
    /// trailers-only response.
    fn open(
        &mut self,
        head: RequestHead,
        messages: Messages,
        responses: Responses,
    ) -> Result<StreamFuture, tonic::Status>;

    /// A stream the client opened beyond [`Config::max_concurrent_streams`] was refused (RST_STREAM
    /// REFUSED_STREAM) without reaching [`Handler::open`]. Nothing by default.
    fn refused(&mut self) {}
}

/// Why a connection ended other than by the client closing it cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP/2 {}: {what}", reason.name())]
    Protocol { reason: Reason, what: String },
    #[error("no answer to a keepalive PING within {0:?}")]
    KeepaliveTimeout(Duration),
}

/// Serves one connection until the client closes it, an error ends it, or — after `shutdown` resolves
/// (GOAWAY sent, no new streams) — its streams end.
pub async fn serve<IO, H>(
    io: IO,
    handler: H,
    config: Arc<Config>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ConnError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
{
    let mut conn = Conn::new(io, handler, config, Box::pin(shutdown));
    std::future::poll_fn(|cx| conn.poll(cx)).await
}

/// The connection's side of one stream.
struct StreamState {
    id: u32,
    /// the stream's work, until it completes (polled with the connection's context: its wake-ups wake
    /// the connection's task)
    fut: Option<StreamFuture>,
    shared: SharedRef,
    send_window: i64,
    recv_window: i64,
    /// received bytes not yet credited: held back while the stream's future lags behind
    uncredited: u32,
    /// credited bytes not yet announced in a WINDOW_UPDATE
    credit: u32,
    /// bytes of DATA still to come, when the request declared a `content-length`
    content_length: Option<u64>,
    /// the request message being assembled (prefix included) when it spans frames
    partial: BytesMut,
    /// the length of the message being assembled, once its prefix is read
    expect: Option<usize>,
    /// requests are ignored from now on (a message over the limit)
    discard: bool,
    remote_closed: bool,
    headers_sent: bool,
    /// the response message being written, and how much of it is left
    writing: VecDeque<Bytes>,
    writing_len: usize,
    /// END_STREAM (or RST_STREAM) written: nothing more goes out
    local_closed: bool,
    /// its future completed
    app_done: bool,
}

/// Output waiting for the socket: small pieces gathered in `buf`, large ones queued as they are.
#[derive(Default)]
struct Out {
    buf: BytesMut,
    queue: VecDeque<Bytes>,
    queued: usize,
}

impl Out {
    fn pending(&self) -> usize {
        self.queued + self.buf.len()
    }

    fn push(&mut self, b: Bytes) {
        if b.len() < COPY_MAX {
            self.buf.extend_from_slice(&b);
        } else {
            self.seal();
            self.queued += b.len();
            self.queue.push_back(b);
        }
    }

    fn seal(&mut self) {
        if !self.buf.is_empty() {
            let b = self.buf.split().freeze();
            self.queued += b.len();
            self.queue.push_back(b);
        }
    }

    fn advance(&mut self, mut n: usize) {
        self.queued -= n;
        while n > 0 {
            let front = self.queue.front_mut().expect("wrote more than queued");
            if front.len() <= n {
                n -= front.len();
                self.queue.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }

    fn clear(&mut self) {
        *self = Out::default();
    }
}

/// Streams the server most recently reset (they may still see frames the client sent before the reset).
const RECENT_RESETS: usize = 16;

/// The ids of the last [`RECENT_RESETS`] streams this server reset.
#[derive(Default)]
struct RecentResets {
    ids: [u32; RECENT_RESETS],
    next: usize,
}

impl RecentResets {
    fn add(&mut self, id: u32) {
        self.ids[self.next] = id;
        self.next = (self.next + 1) % RECENT_RESETS;
    }

    fn contains(&self, id: u32) -> bool {
        self.ids.contains(&id)
    }
}

/// A header block continued in CONTINUATION frames.
struct PartialBlock {
    stream: u32,
    end_stream: bool,
    depends_on_itself: bool,
    block: BytesMut,
}

struct Conn<IO, H> {
    io: IO,
    handler: H,
    config: Arc<Config>,
    hpack: loona_hpack::Decoder<'static>,
    rbuf: BytesMut,
    /// bytes of the client preface still to check
    preface: usize,
    got_settings: bool,
    /// a header block continued in CONTINUATION frames
    continuation: Option<PartialBlock>,
    streams: Vec<StreamState>,
    last_stream: u32,
    /// streams this server reset lately
    reset_by_us: RecentResets,
    /// a stream closed while its future runs, and the futures have not run since: a new stream waits
    /// for them (the closed stream's future may hold what the new one needs, e.g. a slot under a limit)
    closed_unpolled: bool,
    /// frames left in the read buffer until the futures have run
    frames_deferred: bool,
    send_window: i64,
    recv_window: i64,
    /// credited connection-level bytes not yet announced
    credit: u32,
    peer_initial_window: i64,
    peer_max_frame: usize,
    out: Out,
    read_closed: bool,
    /// GOAWAY sent for a shutdown: no new streams
    going_away: bool,
    peer_going_away: bool,
    /// the connection is ending: why (None: cleanly)
    ending: Option<Option<ConnError>>,
    /// the socket failed: nothing more is written
    write_failed: bool,
    /// the last write found the socket full
    write_blocked: bool,
    close_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    shutting_down: bool,
    shutdown: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    keepalive: Option<Pin<Box<tokio::time::Sleep>>>,
    /// when the client last showed it is alive: a frame arrived, or it took written data off the socket
    last_heard: Instant,
    ping_sent: Option<Instant>,
    resets: (Instant, u32),
}

impl<IO, H> Conn<IO, H>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
{
    fn new(io: IO, handler: H, config: Arc<Config>, shutdown: Pin<Box<dyn Future<Output = ()> + Send>>) -> Self {
        let mut hpack = loona_hpack::Decoder::new();
        hpack.set_max_allowed_table_size(headers::HEADER_TABLE_SIZE);
        let now = Instant::now();
        let keepalive = config.keepalive_interval.map(|i| Box::pin(tokio::time::sleep(i)));
        let mut conn = Conn {
            io,
            handler,
            hpack,
            rbuf: BytesMut::new(),
            preface: frame::PREFACE.len(),
            got_settings: false,
            continuation: None,
            streams: Vec::new(),
            last_stream: 0,
            reset_by_us: RecentResets::default(),
            closed_unpolled: false,
            frames_deferred: false,
            send_window: i64::from(frame::DEFAULT_WINDOW),
            recv_window: i64::from(config.connection_window.max(frame::DEFAULT_WINDOW)),
            credit: 0,
            peer_initial_window: i64::from(frame::DEFAULT_WINDOW),
            peer_max_frame: frame::DEFAULT_MAX_FRAME_SIZE as usize,
            out: Out::default(),
            read_closed: false,
            going_away: false,
            peer_going_away: false,
            ending: None,
            write_failed: false,
            write_blocked: false,
            close_deadline: None,
            shutting_down: false,
            shutdown: Some(shutdown),
            keepalive,
            last_heard: now,
            ping_sent: None,
            resets: (now, 0),
            config,
        };
        conn.write_preface();
        conn
    }

    /// The server's connection preface: its SETTINGS, and the connection window raised to ours.
    fn write_preface(&mut self) {
        let c = &self.config;
        let mut params = vec![
            (setting::ENABLE_PUSH, 0),
            (setting::INITIAL_WINDOW_SIZE, c.stream_window),
            (setting::MAX_FRAME_SIZE, c.max_frame_size.clamp(frame::DEFAULT_MAX_FRAME_SIZE, (1 << 24) - 1)),
            (setting::MAX_HEADER_LIST_SIZE, c.max_header_list_size),
        ];
        if c.max_concurrent_streams > 0 {
            params.push((setting::MAX_CONCURRENT_STREAMS, c.max_concurrent_streams));
        }
        frame::settings(&mut self.out.buf, &params);
        let extra = c.connection_window.saturating_sub(frame::DEFAULT_WINDOW);
        if extra > 0 {
            frame::window_update(&mut self.out.buf, 0, extra);
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        // the streams' futures are polled when the task was woken (by one of them, or by the socket) and
        // after requests were handed to them
        let mut poll_streams = true;
        loop {
            let mut progress = false;
            if let Some(s) = self.shutdown.as_mut()
                && s.as_mut().poll(cx).is_ready()
            {
                self.shutdown = None;
                self.go_away();
                progress = true;
            }
            self.poll_keepalive(cx);
            if self.ending.is_none() && !self.read_closed && self.out.pending() < WRITE_HIGH {
                match self.poll_read(cx) {
                    Poll::Ready(Ok(0)) => {
                        self.read_closed = true;
                        self.end(None, "the client closed the connection");
                        progress = true;
                    }
                    Poll::Ready(Ok(_)) => {
                        self.last_heard = Instant::now();
                        self.process_frames();
                        progress = true;
                        poll_streams = true;
                    }
                    Poll::Ready(Err(e)) => {
                        self.read_closed = true;
                        self.write_failed = true;
                        self.end(Some(ConnError::Io(e)), "the connection failed");
                        progress = true;
                    }
                    Poll::Pending => {
                        if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
                            // idle: hold no read buffer
                            self.rbuf = BytesMut::new();
                        }
                    }
                }
            }
            if std::mem::take(&mut poll_streams) {
                progress |= self.poll_streams(cx);
            }
            while std::mem::take(&mut self.frames_deferred) {
                // the frames after a new stream's HEADERS, now that the closed streams' futures ran
                self.process_frames();
                self.poll_streams(cx);
                progress = true;
            }
            self.collect();
            match self.poll_write(cx) {
                Poll::Ready(Ok(true)) => {
                    // the socket took data after it was full: the client is reading (a client reading
                    // a long response is alive although it is not heard: the connection does not read
                    // while its output is over WRITE_HIGH)
                    if std::mem::take(&mut self.write_blocked) {
                        self.last_heard = Instant::now();
                    }
                    progress = true;
                }
                Poll::Pending => self.write_blocked = true,
                Poll::Ready(Ok(false)) => {}
                Poll::Ready(Err(e)) => {
                    self.write_failed = true;
                    self.read_closed = true;
                    self.out.clear();
                    self.end(Some(ConnError::Io(e)), "the connection failed");
                    progress = true;
                }
            }
            if let Some(done) = self.poll_done(cx) {
                return done;
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Polls the streams' futures; true if one completed.
    fn poll_streams(&mut self, cx: &mut Context<'_>) -> bool {
        self.closed_unpolled = false;
        let mut completed = false;
        for s in &mut self.streams {
            if let Some(f) = s.fut.as_mut()
                && f.as_mut().poll(cx).is_ready()
            {
                s.fut = None;
                s.app_done = true;
                completed = true;
            }
        }
        completed
    }

    /// Whether the connection is finished: Some(result) once it is (the socket shut down).
    fn poll_done(&mut self, cx: &mut Context<'_>) -> Option<Poll<Result<(), ConnError>>> {
        let idle = self.streams.is_empty();
        let flushed = self.out.pending() == 0 || self.write_failed;
        let finished = match &self.ending {
            Some(_) => {
                flushed && (idle || self.close_deadline.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready()))
            }
            None => (self.going_away || self.peer_going_away) && idle && flushed,
        };
        if !finished {
            return None;
        }
        if !self.write_failed && !self.shutting_down {
            self.shutting_down = true;
        }
        if self.shutting_down && !self.write_failed && Pin::new(&mut self.io).poll_shutdown(cx).is_pending() {
            return Some(Poll::Pending);
        }
        let result = match self.ending.take().flatten() {
            Some(e) => Err(e),
            None => Ok(()),
        };
        self.ending = Some(None);
        Some(Poll::Ready(result))
    }

    // ---------------- lifecycle ----------------

    /// Starts ending the connection: every stream is told, its future gets [`CLOSE_GRACE`] to finish.
    fn end(&mut self, error: Option<ConnError>, why: &'static str) {
        if self.ending.is_some() {
            return;
        }
        self.ending = Some(error);
        for s in &mut self.streams {
            lock(&s.shared).close(RecvError::Closed(why));
            s.local_closed = true;
        }
        self.close_deadline = Some(Box::pin(tokio::time::sleep(CLOSE_GRACE)));
    }

    /// A connection error: GOAWAY with `reason`, then the connection ends.
    fn fail(&mut self, reason: Reason, what: impl Into<String>) {
        if self.ending.is_some() {
            return;
        }
        let what = what.into();
        debug!(reason = reason.name(), what, "HTTP/2 connection error");
        frame::goaway(&mut self.out.buf, self.last_stream, reason, what.as_bytes());
        self.end(Some(ConnError::Protocol { reason, what }), "HTTP/2 protocol error");
    }

    /// Graceful shutdown: GOAWAY, no new streams; the connection ends when its streams have.
    fn go_away(&mut self) {
        if self.going_away || self.ending.is_some() {
            return;
        }
        self.going_away = true;
        frame::goaway(&mut self.out.buf, self.last_stream, Reason::NoError, b"shutting down");
    }

    fn poll_keepalive(&mut self, cx: &mut Context<'_>) {
        let Some(interval) = self.config.keepalive_interval else { return };
        let timeout = self.config.keepalive_timeout;
        loop {
            let Some(timer) = self.keepalive.as_mut() else { return };
            if timer.as_mut().poll(cx).is_pending() {
                return;
            }
            let now = Instant::now();
            let next = match self.ping_sent {
                Some(at) if self.last_heard <= at => {
                    if now.duration_since(at) >= timeout {
                        self.keepalive = None;
                        self.out.clear();
                        self.write_failed = true;
                        self.end(Some(ConnError::KeepaliveTimeout(timeout)), "keepalive timeout");
                        return;
                    }
                    at + timeout
                }
                _ => {
                    self.ping_sent = None;
                    if now.duration_since(self.last_heard) >= interval {
                        frame::ping(&mut self.out.buf, false, *b"meshfed!");
                        self.ping_sent = Some(now);
                        now + timeout
                    } else {
                        self.last_heard + interval
                    }
                }
            };
            if let Some(t) = self.keepalive.as_mut() {
                t.as_mut().reset(next.into());
            }
        }
    }

    // ---------------- reading ----------------

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        // room for the rest of the frame being read, or a buffer's worth
        let want = Head::parse(&self.rbuf)
            .map(|h| frame::HEADER_LEN + h.len as usize)
            .unwrap_or(0)
            .saturating_sub(self.rbuf.len())
            .max(READ_SIZE / 8);
        if self.rbuf.capacity() - self.rbuf.len() < want {
            self.rbuf.reserve(want.max(READ_SIZE.saturating_sub(self.rbuf.len())));
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf)
    }

    fn process_frames(&mut self) {
        while self.ending.is_none() {
            if self.preface > 0 {
                let at = frame::PREFACE.len() - self.preface;
                let n = self.preface.min(self.rbuf.len());
                if self.rbuf[..n] != frame::PREFACE[at..at + n] {
                    self.fail(Reason::ProtocolError, "not an HTTP/2 connection preface (gRPC needs HTTP/2)");
                    return;
                }
                self.rbuf.advance(n);
                self.preface -= n;
                if self.preface > 0 {
                    return;
                }
            }
            let Some(head) = Head::parse(&self.rbuf) else { return };
            if head.len > self.config.max_frame_size.max(frame::DEFAULT_MAX_FRAME_SIZE) {
                self.fail(Reason::FrameSizeError, format!("frame of {} bytes", head.len));
                return;
            }
            if self.rbuf.len() < frame::HEADER_LEN + head.len as usize {
                return;
            }
            if self.closed_unpolled && head.kind == kind::HEADERS && head.stream > self.last_stream {
                // a new stream: after the futures of the streams closed since they last ran
                self.frames_deferred = true;
                return;
            }
            self.rbuf.advance(frame::HEADER_LEN);
            let payload = self.rbuf.split_to(head.len as usize).freeze();
            if !self.got_settings {
                if head.kind != kind::SETTINGS || head.has(flag::ACK) {
                    self.fail(Reason::ProtocolError, "the first frame is not SETTINGS");
                    return;
                }
                self.got_settings = true;
            }
            if let Some(partial) = &self.continuation
                && (head.kind != kind::CONTINUATION || head.stream != partial.stream)
            {
                self.fail(Reason::ProtocolError, "a header block was interrupted");
                return;
            }
            match frame::parse(head, payload) {
                Ok(f) => self.on_frame(f),
                Err(e) => self.fail(e.reason, e.what),
            }
        }
    }

    fn stream_index(&self, id: u32) -> Option<usize> {
        self.streams.iter().position(|s| s.id == id)
    }

    fn on_frame(&mut self, f: Frame) {
        match f {
            Frame::Data { stream, data, end_stream, flow_len } => self.on_data(stream, data, end_stream, flow_len),
            Frame::Headers { stream, block, end_stream, end_headers, depends_on_itself } => {
                if end_headers {
                    self.on_header_block(stream, &block, end_stream, depends_on_itself);
                } else {
                    let mut b = BytesMut::with_capacity(block.len() * 2);
                    b.extend_from_slice(&block);
                    self.continuation = Some(PartialBlock { stream, end_stream, depends_on_itself, block: b });
                    self.check_block_size();
                }
            }
            Frame::Continuation { block, end_headers, .. } => {
                let Some(mut partial) = self.continuation.take() else {
                    self.fail(Reason::ProtocolError, "CONTINUATION without HEADERS");
                    return;
                };
                partial.block.extend_from_slice(&block);
                if end_headers {
                    self.on_header_block(partial.stream, &partial.block, partial.end_stream, partial.depends_on_itself);
                } else {
                    self.continuation = Some(partial);
                    self.check_block_size();
                }
            }
            Frame::Priority { stream, depends_on } => {
                // RFC 7540 §5.3.1 (the priority scheme RFC 9113 deprecates): a stream error
                if depends_on == stream {
                    self.stream_error(stream, Reason::ProtocolError);
                }
            }
            Frame::Unknown => {}
            Frame::RstStream { stream, code } => self.on_reset(stream, code),
            Frame::Settings { ack, params } => {
                if !ack {
                    self.on_settings(&params);
                }
            }
            Frame::PushPromise => self.fail(Reason::ProtocolError, "PUSH_PROMISE from a client"),
            Frame::Ping { ack, payload } => {
                if ack {
                    self.ping_sent = None;
                } else {
                    frame::ping(&mut self.out.buf, true, payload);
                }
            }
            Frame::GoAway { code, .. } => {
                self.peer_going_away = true;
                if code != 0 {
                    debug!(code, "client sent GOAWAY with an error");
                }
            }
            Frame::WindowUpdate { stream, increment } => self.on_window_update(stream, increment),
        }
    }

    fn check_block_size(&mut self) {
        if self.continuation.as_ref().is_some_and(|p| p.block.len() > self.config.max_header_list_size as usize) {
            self.fail(Reason::EnhanceYourCalm, "header block too large");
        }
    }

    fn on_settings(&mut self, params: &[(u16, u32)]) {
        for &(id, value) in params {
            match id {
                setting::ENABLE_PUSH if value > 1 => {
                    return self.fail(Reason::ProtocolError, "SETTINGS_ENABLE_PUSH not 0 or 1");
                }
                setting::INITIAL_WINDOW_SIZE => {
                    if i64::from(value) > frame::MAX_WINDOW {
                        return self.fail(Reason::FlowControlError, "SETTINGS_INITIAL_WINDOW_SIZE too large");
                    }
                    let delta = i64::from(value) - self.peer_initial_window;
                    self.peer_initial_window = i64::from(value);
                    for s in &mut self.streams {
                        s.send_window += delta;
                        if s.send_window > frame::MAX_WINDOW {
                            return self.fail(Reason::FlowControlError, "a stream window grew too large");
                        }
                    }
                }
                setting::MAX_FRAME_SIZE => {
                    if !(frame::DEFAULT_MAX_FRAME_SIZE..1 << 24).contains(&value) {
                        return self.fail(Reason::ProtocolError, "SETTINGS_MAX_FRAME_SIZE out of range");
                    }
                    self.peer_max_frame = value as usize;
                }
                // our header blocks use no dynamic table; the rest does not concern a server
                _ => {}
            }
        }
        frame::settings_ack(&mut self.out.buf);
    }

    fn on_window_update(&mut self, stream: u32, increment: u32) {
        if stream == 0 {
            if increment == 0 {
                return self.fail(Reason::ProtocolError, "WINDOW_UPDATE of 0 on the connection");
            }
            self.send_window += i64::from(increment);
            if self.send_window > frame::MAX_WINDOW {
                self.fail(Reason::FlowControlError, "connection window grew too large");
            }
            return;
        }
        if stream > self.last_stream {
            return self.fail(Reason::ProtocolError, "WINDOW_UPDATE on an idle stream");
        }
        // on a closed stream it may come after our END_STREAM or RST_STREAM: ignored
        let Some(i) = self.stream_index(stream).filter(|&i| !self.streams[i].local_closed) else { return };
        if increment == 0 {
            return self.stream_error(stream, Reason::ProtocolError);
        }
        let s = &mut self.streams[i];
        s.send_window += i64::from(increment);
        if s.send_window > frame::MAX_WINDOW {
            self.stream_error(stream, Reason::FlowControlError);
        }
    }

    fn on_reset(&mut self, stream: u32, code: u32) {
        if stream > self.last_stream {
            return self.fail(Reason::ProtocolError, "RST_STREAM on an idle stream");
        }
        if !self.count_reset() {
            return;
        }
        if let Some(i) = self.stream_index(stream) {
            if code != Reason::NoError as u32 || !self.streams[i].remote_closed {
                debug!(stream, code, "client reset a stream");
            }
            self.close_stream(i);
        }
    }

    /// Counts a reset, the client's or one it provoked: false (and the connection fails) over
    /// [`MAX_RESETS`] within [`RESET_WINDOW`].
    fn count_reset(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.resets.0) > RESET_WINDOW {
            self.resets = (now, 0);
        }
        self.resets.1 += 1;
        if self.resets.1 > MAX_RESETS {
            self.fail(Reason::EnhanceYourCalm, "too many streams reset");
            return false;
        }
        true
    }

    /// Closes both sides of a stream at once (a reset); its future is told.
    fn close_stream(&mut self, i: usize) {
        let s = &mut self.streams[i];
        lock(&s.shared).close(RecvError::Reset);
        s.local_closed = true;
        s.remote_closed = true;
        s.partial = BytesMut::new();
        if s.fut.is_some() {
            self.closed_unpolled = true;
        }
    }

    /// Writes RST_STREAM, and remembers that this server reset the stream.
    fn write_reset(&mut self, stream: u32, reason: Reason) {
        frame::rst_stream(&mut self.out.buf, stream, reason);
        self.reset_by_us.add(stream);
    }

    /// A stream error (RFC 9113 §5.4.2): RST_STREAM with `reason` on this stream only (its future, if it
    /// has one, is told), counted toward [`MAX_RESETS`].
    fn stream_error(&mut self, stream: u32, reason: Reason) {
        debug!(stream, reason = reason.name(), "HTTP/2 stream error");
        if let Some(i) = self.stream_index(stream) {
            self.close_stream(i);
        }
        self.write_reset(stream, reason);
        self.count_reset();
    }

    /// DATA or HEADERS on a closed stream: dropped if this server reset the stream lately (the client
    /// sent them before it saw the reset), otherwise a stream error STREAM_CLOSED (RFC 9113 §5.1, §6.1).
    /// Ids below the newest stream that were never opened are closed too (§5.1.1), and treated alike.
    fn on_closed_stream(&mut self, stream: u32) {
        if !self.reset_by_us.contains(stream) {
            self.stream_error(stream, Reason::StreamClosed);
        }
    }

    fn on_data(&mut self, stream: u32, data: Bytes, end_stream: bool, flow_len: u32) {
        self.recv_window -= i64::from(flow_len);
        if self.recv_window < 0 {
            return self.fail(Reason::FlowControlError, "more data than the connection window");
        }
        let open = self.stream_index(stream).filter(|&i| !self.streams[i].remote_closed);
        let Some(i) = open else {
            if stream > self.last_stream || stream.is_multiple_of(2) {
                return self.fail(Reason::ProtocolError, "DATA on an idle stream");
            }
            // the data of a closed stream is dropped (and credited)
            self.credit += flow_len;
            return self.on_closed_stream(stream);
        };
        let max = self.config.max_message_size;
        let s = &mut self.streams[i];
        s.recv_window -= i64::from(flow_len);
        if s.recv_window < 0 {
            self.credit += flow_len;
            return self.stream_error(stream, Reason::FlowControlError);
        }
        if let Some(left) = s.content_length {
            // RFC 9113 §8.1.1: the DATA must add up to the content-length
            match left.checked_sub(data.len() as u64) {
                Some(rest) if rest == 0 || !end_stream => s.content_length = Some(rest),
                _ => {
                    self.credit += flow_len;
                    return self.stream_error(stream, Reason::ProtocolError);
                }
            }
        }
        // padding, and data that is dropped, is credited at once
        let mut credited = flow_len - data.len() as u32;
        if s.discard {
            credited = flow_len;
        } else if let Err(e) = assemble(s, data, max) {
            s.discard = true;
            s.partial = BytesMut::new();
            lock(&s.shared).end(Err(e));
        }
        s.uncredited += flow_len - credited;
        s.credit += credited;
        self.credit += credited;
        if end_stream {
            s.remote_closed = true;
            let end = if s.partial.is_empty() { Ok(()) } else { Err(RecvError::Truncated) };
            s.partial = BytesMut::new();
            lock(&s.shared).end(end);
        }
    }

    fn on_header_block(&mut self, stream: u32, block: &[u8], end_stream: bool, depends_on_itself: bool) {
        if let Some(i) = self.stream_index(stream) {
            // trailers of a request
            let checked = headers::decode_trailers(&mut self.hpack, block);
            if let Err(e @ headers::HeaderError::Hpack(_)) = checked {
                return self.fail(Reason::CompressionError, e.to_string());
            }
            let s = &mut self.streams[i];
            if s.remote_closed {
                return self.on_closed_stream(stream);
            }
            // RFC 9113 §8.1: trailers end the request; their fields are checked as the request's were, and
            // the DATA before them must add up to the content-length
            if !end_stream || depends_on_itself || checked.is_err() || s.content_length.is_some_and(|n| n != 0) {
                if let Err(e) = checked {
                    debug!(stream, error = %e, "malformed trailers");
                }
                return self.stream_error(stream, Reason::ProtocolError);
            }
            s.remote_closed = true;
            let end = if s.partial.is_empty() { Ok(()) } else { Err(RecvError::Truncated) };
            lock(&s.shared).end(end);
            return;
        }
        if stream.is_multiple_of(2) {
            return self.fail(Reason::ProtocolError, "HEADERS on a server-initiated stream id");
        }
        if stream <= self.last_stream {
            if let Err(e) = headers::skip(&mut self.hpack, block) {
                return self.fail(Reason::CompressionError, e.to_string());
            }
            return self.on_closed_stream(stream);
        }
        self.last_stream = stream;
        let head = match headers::decode_request(&mut self.hpack, block, self.config.max_header_list_size as usize) {
            Ok(h) => Ok(h),
            Err(headers::HeaderError::TooLarge(n)) => Err(n),
            Err(headers::HeaderError::Malformed(why)) => {
                debug!(stream, why, "malformed request");
                return self.stream_error(stream, Reason::ProtocolError);
            }
            Err(e @ headers::HeaderError::Hpack(_)) => return self.fail(Reason::CompressionError, e.to_string()),
        };
        let declared_content = head.as_ref().ok().and_then(|h| h.content_length).is_some_and(|n| n > 0);
        if depends_on_itself || (end_stream && declared_content) {
            return self.stream_error(stream, Reason::ProtocolError);
        }
        if self.going_away || self.ending.is_some() {
            return self.write_reset(stream, Reason::RefusedStream);
        }
        let max = self.config.max_concurrent_streams;
        if max > 0 && self.streams.iter().filter(|s| !(s.local_closed && s.remote_closed)).count() >= max as usize {
            // RFC 9113 §5.1.2: over the advertised limit; REFUSED_STREAM says it was not processed, so the
            // client may retry it (§8.7), as one that has not yet seen the SETTINGS should
            self.write_reset(stream, Reason::RefusedStream);
            self.handler.refused();
            return;
        }
        let answer_only = |conn: &mut Self, block: &dyn Fn(&mut BytesMut)| {
            let mut b = BytesMut::new();
            block(&mut b);
            frame::headers(&mut conn.out.buf, stream, &b, true);
            if !end_stream {
                conn.write_reset(stream, Reason::NoError);
            }
        };
        let head = match head {
            Ok(h) => h,
            Err(n) => {
                let msg = format!("request headers larger than {n} bytes");
                return answer_only(self, &|b| headers::trailers_only(b, tonic::Code::ResourceExhausted as i32, &msg));
            }
        };
        if head.method != "POST" {
            return answer_only(self, &|b| headers::http_status(b, 405));
        }
        if !head.is_grpc() {
            return answer_only(self, &|b| headers::http_status(b, 415));
        }
        let content_length = head.content_length;
        let shared: SharedRef = Arc::new(Mutex::new(Shared::default()));
        match self.handler.open(head, Messages::new(shared.clone()), Responses::new(shared.clone())) {
            Err(status) => {
                let (code, msg) = (status.code() as i32, status.message().to_string());
                answer_only(self, &|b| headers::trailers_only(b, code, &msg));
            }
            Ok(fut) => {
                if end_stream {
                    lock(&shared).end(Ok(()));
                }
                self.streams.push(StreamState {
                    id: stream,
                    fut: Some(fut),
                    shared,
                    send_window: self.peer_initial_window,
                    recv_window: i64::from(self.config.stream_window),
                    uncredited: 0,
                    credit: 0,
                    content_length,
                    partial: BytesMut::new(),
                    expect: None,
                    discard: false,
                    remote_closed: end_stream,
                    headers_sent: false,
                    writing: VecDeque::new(),
                    writing_len: 0,
                    local_closed: false,
                    app_done: false,
                });
            }
        }
    }

    // ---------------- writing ----------------

    /// Credits windows, frames what the streams queued, writes trailers, forgets finished streams.
    fn collect(&mut self) {
        let stream_window = self.config.stream_window;
        let mut i = 0;
        while i < self.streams.len() {
            let s = &mut self.streams[i];
            let shared_ref = s.shared.clone();
            let mut shared = lock(&shared_ref);
            // flow control: credit what arrived while the stream's future keeps up
            if s.uncredited > 0 && shared.inbound_bytes <= (stream_window / 2) as usize {
                s.credit += s.uncredited;
                self.credit += s.uncredited;
                s.uncredited = 0;
            }
            if s.credit > 0 && s.credit >= stream_window / 2 && !s.remote_closed && !s.local_closed {
                frame::window_update(&mut self.out.buf, s.id, s.credit);
                s.recv_window += i64::from(s.credit);
                s.credit = 0;
            }
            if !s.local_closed {
                if !s.headers_sent {
                    // the response headers go out at once, as a gRPC client's call completes on them
                    let mut b = BytesMut::with_capacity(32);
                    headers::response(&mut b);
                    frame::headers(&mut self.out.buf, s.id, &b, false);
                    s.headers_sent = true;
                }
                loop {
                    if s.writing_len == 0 {
                        match shared.take_outbound() {
                            Some(m) => {
                                s.writing_len = m.iter().map(Bytes::len).sum();
                                s.writing = m;
                                if s.writing_len == 0 {
                                    continue;
                                }
                            }
                            None => break,
                        }
                    }
                    let room = s.send_window.min(self.send_window).min(self.peer_max_frame as i64);
                    if room <= 0 || self.out.pending() >= WRITE_HIGH {
                        break;
                    }
                    let n = (room as usize).min(s.writing_len);
                    write_data(&mut self.out, s, n);
                    self.send_window -= n as i64;
                }
                if s.writing_len == 0 && shared.outbound.is_empty() {
                    let finished = shared.finished.take().or_else(|| s.app_done.then(|| (0, String::new())));
                    if let Some((code, msg)) = finished {
                        let mut b = BytesMut::with_capacity(64 + msg.len());
                        if s.headers_sent {
                            headers::trailers(&mut b, code, &msg);
                        } else {
                            headers::trailers_only(&mut b, code, &msg);
                        }
                        frame::headers(&mut self.out.buf, s.id, &b, true);
                        if !s.remote_closed {
                            // the request side is not needed any more (RFC 9113 §8.1)
                            frame::rst_stream(&mut self.out.buf, s.id, Reason::NoError);
                            self.reset_by_us.add(s.id);
                            s.remote_closed = true;
                        }
                        s.local_closed = true;
                        shared.closed = true;
                        if s.fut.is_some() {
                            self.closed_unpolled = true;
                        }
                    }
                }
            }
            drop(shared);
            if s.local_closed && s.app_done {
                self.streams.swap_remove(i);
            } else {
                i += 1;
            }
        }
        if self.credit > 0 && self.credit >= self.config.connection_window / 2 && self.ending.is_none() {
            frame::window_update(&mut self.out.buf, 0, self.credit);
            self.recv_window += i64::from(self.credit);
            self.credit = 0;
        }
    }

    /// Writes what is queued; Ok(true) if anything was written.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<bool>> {
        if self.write_failed {
            self.out.clear();
            return Poll::Ready(Ok(false));
        }
        self.out.seal();
        let mut wrote = false;
        while !self.out.queue.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let n = self
                .out
                .queue
                .iter()
                .take(MAX_IOVECS)
                .zip(slices.iter_mut())
                .map(|(b, s)| *s = IoSlice::new(b))
                .count();
            let written = match Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..n]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(w)) => w,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return if wrote { Poll::Ready(Ok(true)) } else { Poll::Pending },
            };
            self.out.advance(written);
            wrote = true;
        }
        if wrote {
            if let Poll::Ready(Err(e)) = Pin::new(&mut self.io).poll_flush(cx) {
                return Poll::Ready(Err(e));
            }
            // idle again: hold no write buffers
            if self.out.buf.capacity() > 4 * COPY_MAX {
                self.out.buf = BytesMut::new();
            }
            if self.out.queue.capacity() > 16 {
                self.out.queue = VecDeque::new();
            }
        }
        Poll::Ready(Ok(wrote))
    }
}

/// Reads the gRPC messages in `data` into the stream's queue; a message spanning frames is assembled
/// in `partial`. Err when a message cannot be accepted.
fn assemble(s: &mut StreamState, mut data: Bytes, max: usize) -> Result<(), RecvError> {
    let mut delivered = Vec::new();
    let result = loop {
        if data.is_empty() {
            break Ok(());
        }
        if s.partial.is_empty() && data.len() >= 5 {
            // fast path: the whole message is in this frame
            let len = message_len(&data[..5], max)?;
            if data.len() >= 5 + len {
                delivered.push(data.slice(5..5 + len));
                data.advance(5 + len);
                continue;
            }
        }
        let need = match s.expect {
            None => 5 - s.partial.len(),
            Some(len) => 5 + len - s.partial.len(),
        };
        let take = need.min(data.len());
        s.partial.extend_from_slice(&data[..take]);
        data.advance(take);
        if s.expect.is_none() && s.partial.len() == 5 {
            let len = message_len(&s.partial[..5], max)?;
            s.expect = Some(len);
            s.partial.reserve(len);
        }
        if let Some(len) = s.expect
            && s.partial.len() == 5 + len
        {
            let mut m = std::mem::take(&mut s.partial).freeze();
            m.advance(5);
            delivered.push(m);
            s.expect = None;
        }
    };
    if !delivered.is_empty() {
        let mut shared = lock(&s.shared);
        for m in delivered {
            shared.deliver(m);
        }
    }
    result
}

/// The length of a message from its 5-byte prefix.
fn message_len(prefix: &[u8], max: usize) -> Result<usize, RecvError> {
    if prefix[0] != 0 {
        return Err(RecvError::Compressed);
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > max {
        return Err(RecvError::TooLarge { len, max });
    }
    Ok(len)
}

/// Frames `n` bytes of the stream's current message as one DATA frame.
fn write_data(out: &mut Out, s: &mut StreamState, n: usize) {
    Head { len: n as u32, kind: kind::DATA, flags: 0, stream: s.id }.encode(&mut out.buf);
    let mut left = n;
    while left > 0 {
        let front = s.writing.front_mut().expect("writing_len counts the chunks");
        if front.len() <= left {
            left -= front.len();
            let b = s.writing.pop_front().expect("front exists");
            out.push(b);
        } else {
            out.push(front.split_to(left));
            left = 0;
        }
    }
    s.writing_len -= n;
    s.send_window -= n as i64;
    if s.writing.is_empty() && s.writing.capacity() > 16 {
        s.writing = VecDeque::new();
    }
}
