//! The application's side of one gRPC stream: the request messages it reads ([`Messages`]) and the
//! response messages it writes ([`Responses`]), shared with the connection that owns the stream.
//!
//! Both halves are used from the stream's future, which the connection polls on its own task: no
//! cross-task wake-up happens between a stream and its connection. The connection looks at every
//! stream's queues after polling the futures, so a handle used from another task would not be noticed
//! until the connection's task runs for another reason.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

/// Responses a stream may queue beyond the one being written. Small on purpose: a stream that cannot
/// write waits, and when it can, it sends the newest state rather than a backlog.
pub const RESPONSE_QUEUE: usize = 2;

/// Why a stream's requests ended other than by the client half-closing it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    #[error("request of {len} bytes is larger than the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("compressed request, but no compression was negotiated")]
    Compressed,
    #[error("the request stream ended in the middle of a message")]
    Truncated,
    #[error("the client reset the stream")]
    Reset,
    #[error("the connection ended: {0}")]
    Closed(&'static str),
}

/// Why a response could not be queued: the stream or its connection is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the stream is closed")]
pub struct Closed;

/// One response message: a gRPC message (5-byte prefix included) as chunks.
pub type Message = VecDeque<Bytes>;

#[derive(Debug, Default)]
pub(crate) struct Shared {
    // ---- to the application ----
    pub inbound: VecDeque<Bytes>,
    /// bytes of `inbound`
    pub inbound_bytes: usize,
    /// no more requests: Ok when the client half-closed, Err otherwise
    pub end: Option<Result<(), RecvError>>,
    reader: Option<Waker>,
    // ---- from the application ----
    pub outbound: VecDeque<Message>,
    /// the trailers' status (code, message), once the application finished
    pub finished: Option<(i32, String)>,
    writer: Option<Waker>,
    /// nothing more is written: sends fail
    pub closed: bool,
}

impl Shared {
    pub fn deliver(&mut self, message: Bytes) {
        self.inbound_bytes += message.len();
        self.inbound.push_back(message);
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    pub fn end(&mut self, end: Result<(), RecvError>) {
        if self.end.is_none() {
            self.end = Some(end);
        }
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    /// The connection will write nothing more for this stream (reset, or the connection ends).
    pub fn close(&mut self, why: RecvError) {
        self.closed = true;
        self.outbound.clear();
        self.end(Err(why));
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }

    /// The next queued response (and room for the application to queue another).
    pub fn take_outbound(&mut self) -> Option<Message> {
        let m = self.outbound.pop_front()?;
        if let Some(w) = self.writer.take() {
            w.wake();
        }
        Some(m)
    }
}

pub(crate) type SharedRef = Arc<Mutex<Shared>>;

pub(crate) fn lock(s: &SharedRef) -> MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// The request messages of a stream.
#[derive(Debug)]
pub struct Messages {
    shared: SharedRef,
}

impl Messages {
    pub(crate) fn new(shared: SharedRef) -> Messages {
        Messages { shared }
    }

    /// The next request message; `Ok(None)` when the client half-closed the stream.
    pub async fn message(&mut self) -> Result<Option<Bytes>, RecvError> {
        std::future::poll_fn(|cx| self.poll_message(cx)).await
    }

    pub fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, RecvError>> {
        let mut s = lock(&self.shared);
        if let Some(m) = s.inbound.pop_front() {
            s.inbound_bytes -= m.len();
            return Poll::Ready(Ok(Some(m)));
        }
        match &s.end {
            Some(Ok(())) => Poll::Ready(Ok(None)),
            Some(Err(e)) => Poll::Ready(Err(e.clone())),
            None => {
                if !s.reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    s.reader = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

/// The response messages of a stream, ended by [`Responses::finish`] (or, when dropped unfinished, by
/// an OK status once the stream's future completes).
#[derive(Debug)]
pub struct Responses {
    shared: SharedRef,
}

impl Responses {
    pub(crate) fn new(shared: SharedRef) -> Responses {
        Responses { shared }
    }

    /// Queues one response message, waiting while [`RESPONSE_QUEUE`] are queued.
    pub async fn send(&mut self, message: Message) -> Result<(), Closed> {
        let mut message = Some(message);
        std::future::poll_fn(|cx| {
            let mut s = lock(&self.shared);
            if s.closed || s.finished.is_some() {
                return Poll::Ready(Err(Closed));
            }
            if s.outbound.len() >= RESPONSE_QUEUE {
                if !s.writer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    s.writer = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            s.outbound.push_back(message.take().expect("polled after completion"));
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Ends the stream with this gRPC status (after the queued responses).
    pub fn finish(&mut self, code: i32, message: &str) {
        let mut s = lock(&self.shared);
        if s.finished.is_none() {
            s.finished = Some((code, message.to_string()));
        }
    }

    /// Whether the stream can still be written to.
    pub fn is_closed(&self) -> bool {
        lock(&self.shared).closed
    }
}
