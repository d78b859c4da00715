//! HTTP/2 frames (RFC 9113 §4, §6): the 9-byte header, the payloads a gRPC server reads, and the few
//! frames it writes. Parsing is pure: bytes in, a [`Frame`] or a [`FrameError`] out.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const HEADER_LEN: usize = 9;
/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// SETTINGS_MAX_FRAME_SIZE's default and least value.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 16_384;
/// SETTINGS_INITIAL_WINDOW_SIZE's default (also every connection's initial window).
pub const DEFAULT_WINDOW: u32 = 65_535;
/// Largest flow-control window.
pub const MAX_WINDOW: i64 = (1 << 31) - 1;

pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

/// HTTP/2 error codes (RFC 9113 §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Reason {
    NoError = 0x0,
    ProtocolError = 0x1,
    InternalError = 0x2,
    FlowControlError = 0x3,
    StreamClosed = 0x5,
    FrameSizeError = 0x6,
    RefusedStream = 0x7,
    Cancel = 0x8,
    CompressionError = 0x9,
    EnhanceYourCalm = 0xb,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::NoError => "NO_ERROR",
            Reason::ProtocolError => "PROTOCOL_ERROR",
            Reason::InternalError => "INTERNAL_ERROR",
            Reason::FlowControlError => "FLOW_CONTROL_ERROR",
            Reason::StreamClosed => "STREAM_CLOSED",
            Reason::FrameSizeError => "FRAME_SIZE_ERROR",
            Reason::RefusedStream => "REFUSED_STREAM",
            Reason::Cancel => "CANCEL",
            Reason::CompressionError => "COMPRESSION_ERROR",
            Reason::EnhanceYourCalm => "ENHANCE_YOUR_CALM",
        }
    }
}

/// A SETTINGS parameter (RFC 9113 §6.5.2).
pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// The fixed header of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    /// Reads a header from the first [`HEADER_LEN`] bytes of `b` (None if fewer).
    pub fn parse(b: &[u8]) -> Option<Head> {
        let h: &[u8; HEADER_LEN] = b.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Head {
            len: u32::from_be_bytes([0, h[0], h[1], h[2]]),
            kind: h[3],
            flags: h[4],
            stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
        })
    }

    pub fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }

    pub fn encode(&self, out: &mut impl BufMut) {
        debug_assert!(self.len < 1 << 24);
        out.put_slice(&self.len.to_be_bytes()[1..]);
        out.put_u8(self.kind);
        out.put_u8(self.flags);
        out.put_u32(self.stream & 0x7fff_ffff);
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        self.encode(&mut &mut b[..]);
        b
    }
}

/// Why a frame cannot be used: a connection error with this code (RFC 9113 §5.4.1).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {what}", reason.name())]
pub struct FrameError {
    pub reason: Reason,
    pub what: &'static str,
}

fn err(reason: Reason, what: &'static str) -> FrameError {
    FrameError { reason, what }
}

/// A frame as the server reads it. Payloads are slices of the read buffer (no copy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// `flow_len` counts toward flow control (the whole payload, padding included)
    Data {
        stream: u32,
        data: Bytes,
        end_stream: bool,
        flow_len: u32,
    },
    /// the start of a header block (more may follow in CONTINUATION frames unless `end_headers`);
    /// `depends_on_itself`: its priority fields make the stream depend on itself, a stream error
    /// (RFC 7540 §5.3.1) once the block is decoded
    Headers {
        stream: u32,
        block: Bytes,
        end_stream: bool,
        end_headers: bool,
        depends_on_itself: bool,
    },
    Continuation {
        stream: u32,
        block: Bytes,
        end_headers: bool,
    },
    Priority {
        stream: u32,
        depends_on: u32,
    },
    RstStream {
        stream: u32,
        code: u32,
    },
    Settings {
        ack: bool,
        params: Vec<(u16, u32)>,
    },
    PushPromise,
    Ping {
        ack: bool,
        payload: [u8; 8],
    },
    GoAway {
        last_stream: u32,
        code: u32,
    },
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    /// a frame type this server does not know: ignored (RFC 9113 §4.1)
    Unknown,
}

/// Removes the padding of a PADDED frame's payload.
fn unpad(head: &Head, mut payload: Bytes) -> Result<Bytes, FrameError> {
    if !head.has(flag::PADDED) {
        return Ok(payload);
    }
    if payload.is_empty() {
        return Err(err(Reason::FrameSizeError, "padded frame without a pad length"));
    }
    let pad = payload.get_u8() as usize;
    if pad > payload.len() {
        return Err(err(Reason::ProtocolError, "padding longer than the frame"));
    }
    payload.truncate(payload.len() - pad);
    Ok(payload)
}

/// Parses one frame's payload (`payload.len() == head.len`).
pub fn parse(head: Head, payload: Bytes) -> Result<Frame, FrameError> {
    let stream = head.stream;
    let need_stream = |what| if stream == 0 { Err(err(Reason::ProtocolError, what)) } else { Ok(()) };
    let need_conn = |what| if stream != 0 { Err(err(Reason::ProtocolError, what)) } else { Ok(()) };
    Ok(match head.kind {
        kind::DATA => {
            need_stream("DATA on stream 0")?;
            let flow_len = head.len;
            let data = unpad(&head, payload)?;
            Frame::Data { stream, data, end_stream: head.has(flag::END_STREAM), flow_len }
        }
        kind::HEADERS => {
            need_stream("HEADERS on stream 0")?;
            let mut block = unpad(&head, payload)?;
            let mut depends_on_itself = false;
            if head.has(flag::PRIORITY) {
                if block.len() < 5 {
                    return Err(err(Reason::FrameSizeError, "HEADERS priority fields truncated"));
                }
                let depends_on = u32::from_be_bytes([block[0], block[1], block[2], block[3]]) & 0x7fff_ffff;
                depends_on_itself = depends_on == stream;
                block.advance(5);
            }
            Frame::Headers {
                stream,
                block,
                end_stream: head.has(flag::END_STREAM),
                end_headers: head.has(flag::END_HEADERS),
                depends_on_itself,
            }
        }
        kind::CONTINUATION => {
            need_stream("CONTINUATION on stream 0")?;
            Frame::Continuation { stream, block: payload, end_headers: head.has(flag::END_HEADERS) }
        }
        kind::PRIORITY => {
            need_stream("PRIORITY on stream 0")?;
            if payload.len() != 5 {
                return Err(err(Reason::FrameSizeError, "PRIORITY is not 5 bytes"));
            }
            let depends_on = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff;
            Frame::Priority { stream, depends_on }
        }
        kind::RST_STREAM => {
            need_stream("RST_STREAM on stream 0")?;
            if payload.len() != 4 {
                return Err(err(Reason::FrameSizeError, "RST_STREAM is not 4 bytes"));
            }
            Frame::RstStream { stream, code: u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) }
        }
        kind::SETTINGS => {
            need_conn("SETTINGS on a stream")?;
            let ack = head.has(flag::ACK);
            if ack && !payload.is_empty() {
                return Err(err(Reason::FrameSizeError, "SETTINGS ACK with a payload"));
            }
            if !payload.len().is_multiple_of(6) {
                return Err(err(Reason::FrameSizeError, "SETTINGS length not a multiple of 6"));
            }
            let params = payload
                .chunks_exact(6)
                .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32::from_be_bytes([c[2], c[3], c[4], c[5]])))
                .collect();
            Frame::Settings { ack, params }
        }
        kind::PUSH_PROMISE => Frame::PushPromise,
        kind::PING => {
            need_conn("PING on a stream")?;
            let payload: [u8; 8] =
                payload[..].try_into().map_err(|_| err(Reason::FrameSizeError, "PING is not 8 bytes"))?;
            Frame::Ping { ack: head.has(flag::ACK), payload }
        }
        kind::GOAWAY => {
            need_conn("GOAWAY on a stream")?;
            if payload.len() < 8 {
                return Err(err(Reason::FrameSizeError, "GOAWAY shorter than 8 bytes"));
            }
            Frame::GoAway {
                last_stream: u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff,
                code: u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]),
            }
        }
        kind::WINDOW_UPDATE => {
            if payload.len() != 4 {
                return Err(err(Reason::FrameSizeError, "WINDOW_UPDATE is not 4 bytes"));
            }
            let increment = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff;
            Frame::WindowUpdate { stream, increment }
        }
        _ => Frame::Unknown,
    })
}

// ---- writing ----

/// SETTINGS with these parameters.
pub fn settings(out: &mut BytesMut, params: &[(u16, u32)]) {
    Head { len: (params.len() * 6) as u32, kind: kind::SETTINGS, flags: 0, stream: 0 }.encode(out);
    for (id, value) in params {
        out.put_u16(*id);
        out.put_u32(*value);
    }
}

pub fn settings_ack(out: &mut BytesMut) {
    Head { len: 0, kind: kind::SETTINGS, flags: flag::ACK, stream: 0 }.encode(out);
}

pub fn ping(out: &mut BytesMut, ack: bool, payload: [u8; 8]) {
    Head { len: 8, kind: kind::PING, flags: if ack { flag::ACK } else { 0 }, stream: 0 }.encode(out);
    out.put_slice(&payload);
}

pub fn window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    Head { len: 4, kind: kind::WINDOW_UPDATE, flags: 0, stream }.encode(out);
    out.put_u32(increment & 0x7fff_ffff);
}

pub fn rst_stream(out: &mut BytesMut, stream: u32, reason: Reason) {
    Head { len: 4, kind: kind::RST_STREAM, flags: 0, stream }.encode(out);
    out.put_u32(reason as u32);
}

pub fn goaway(out: &mut BytesMut, last_stream: u32, reason: Reason, debug: &[u8]) {
    let debug = &debug[..debug.len().min(256)];
    Head { len: 8 + debug.len() as u32, kind: kind::GOAWAY, flags: 0, stream: 0 }.encode(out);
    out.put_u32(last_stream & 0x7fff_ffff);
    out.put_u32(reason as u32);
    out.put_slice(debug);
}

/// A HEADERS frame carrying a whole (small) header block.
pub fn headers(out: &mut BytesMut, stream: u32, block: &[u8], end_stream: bool) {
    let flags = flag::END_HEADERS | if end_stream { flag::END_STREAM } else { 0 };
    Head { len: block.len() as u32, kind: kind::HEADERS, flags, stream }.encode(out);
    out.put_slice(block);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> (Head, Bytes) {
        (Head { len: payload.len() as u32, kind, flags, stream }, Bytes::copy_from_slice(payload))
    }

    fn parsed(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Result<Frame, FrameError> {
        let (h, p) = frame(kind, flags, stream, payload);
        parse(h, p)
    }

    #[test]
    fn head_round_trips() {
        let h = Head { len: 0x12_3456, kind: kind::HEADERS, flags: flag::END_HEADERS, stream: 0x7fff_fffe };
        assert_eq!(Head::parse(&h.to_bytes()), Some(h));
        // the reserved bit is ignored
        let mut b = h.to_bytes();
        b[5] |= 0x80;
        assert_eq!(Head::parse(&b).unwrap().stream, 0x7fff_fffe);
        assert_eq!(Head::parse(&b[..8]), None);
    }

    #[test]
    fn data_padding_is_removed_and_counted() {
        let f = parsed(kind::DATA, flag::PADDED | flag::END_STREAM, 1, &[2, b'h', b'i', 0, 0]).unwrap();
        assert_eq!(f, Frame::Data { stream: 1, data: Bytes::from_static(b"hi"), end_stream: true, flow_len: 5 });
        assert_eq!(parsed(kind::DATA, flag::PADDED, 1, &[5, b'h']).unwrap_err().reason, Reason::ProtocolError);
        assert_eq!(parsed(kind::DATA, flag::PADDED, 1, &[]).unwrap_err().reason, Reason::FrameSizeError);
        assert_eq!(parsed(kind::DATA, 0, 0, b"x").unwrap_err().reason, Reason::ProtocolError);
    }

    #[test]
    fn headers_priority_and_padding() {
        let payload = [1, 0, 0, 0, 3, 16, b'a', b'b', 0];
        let f = parsed(kind::HEADERS, flag::PADDED | flag::PRIORITY | flag::END_HEADERS, 5, &payload).unwrap();
        assert_eq!(
            f,
            Frame::Headers {
                stream: 5,
                block: Bytes::from_static(b"ab"),
                end_stream: false,
                end_headers: true,
                depends_on_itself: false
            }
        );
        // depending on itself: the block is still read (it must be decoded), the stream is in error
        let payload = [0x80, 0, 0, 5, 16, b'a'];
        assert_eq!(
            parsed(kind::HEADERS, flag::PRIORITY, 5, &payload).unwrap(),
            Frame::Headers {
                stream: 5,
                block: Bytes::from_static(b"a"),
                end_stream: false,
                end_headers: false,
                depends_on_itself: true
            }
        );
        assert_eq!(parsed(kind::HEADERS, flag::PRIORITY, 5, &[0, 0]).unwrap_err().reason, Reason::FrameSizeError);
    }

    #[test]
    fn control_frames() {
        let f = parsed(kind::SETTINGS, 0, 0, &[0, 4, 0, 0, 1, 0, 0, 5, 0, 0, 64, 0]).unwrap();
        assert_eq!(f, Frame::Settings { ack: false, params: vec![(4, 256), (5, 16384)] });
        assert_eq!(parsed(kind::SETTINGS, 0, 0, &[0; 5]).unwrap_err().reason, Reason::FrameSizeError);
        assert_eq!(parsed(kind::SETTINGS, flag::ACK, 0, &[0; 6]).unwrap_err().reason, Reason::FrameSizeError);
        assert_eq!(parsed(kind::SETTINGS, 0, 1, &[]).unwrap_err().reason, Reason::ProtocolError);
        assert_eq!(parsed(kind::PING, flag::ACK, 0, &[1; 8]).unwrap(), Frame::Ping { ack: true, payload: [1; 8] });
        assert_eq!(parsed(kind::PING, 0, 0, &[1; 7]).unwrap_err().reason, Reason::FrameSizeError);
        assert_eq!(
            parsed(kind::GOAWAY, 0, 0, &[0, 0, 0, 7, 0, 0, 0, 2, b'x']).unwrap(),
            Frame::GoAway { last_stream: 7, code: 2 }
        );
        assert_eq!(
            parsed(kind::WINDOW_UPDATE, 0, 3, &[0x80, 0, 1, 0]).unwrap(),
            Frame::WindowUpdate { stream: 3, increment: 256 }
        );
        assert_eq!(parsed(kind::RST_STREAM, 0, 3, &[0, 0, 0, 8]).unwrap(), Frame::RstStream { stream: 3, code: 8 });
        assert_eq!(parsed(kind::RST_STREAM, 0, 0, &[0, 0, 0, 8]).unwrap_err().reason, Reason::ProtocolError);
        assert_eq!(parsed(0x42, 0, 9, b"whatever").unwrap(), Frame::Unknown);
    }

    #[test]
    fn written_frames_parse_back() {
        let mut out = BytesMut::new();
        settings(&mut out, &[(setting::INITIAL_WINDOW_SIZE, 1 << 20)]);
        ping(&mut out, true, [7; 8]);
        window_update(&mut out, 0, 1000);
        rst_stream(&mut out, 3, Reason::Cancel);
        goaway(&mut out, 9, Reason::NoError, b"bye");
        headers(&mut out, 1, b"\x88", true);
        let mut buf = out.freeze();
        let mut frames = Vec::new();
        while !buf.is_empty() {
            let h = Head::parse(&buf).unwrap();
            buf.advance(HEADER_LEN);
            frames.push(parse(h, buf.split_to(h.len as usize)).unwrap());
        }
        assert_eq!(
            frames,
            [
                Frame::Settings { ack: false, params: vec![(setting::INITIAL_WINDOW_SIZE, 1 << 20)] },
                Frame::Ping { ack: true, payload: [7; 8] },
                Frame::WindowUpdate { stream: 0, increment: 1000 },
                Frame::RstStream { stream: 3, code: Reason::Cancel as u32 },
                Frame::GoAway { last_stream: 9, code: 0 },
                Frame::Headers {
                    stream: 1,
                    block: Bytes::from_static(b"\x88"),
                    end_stream: true,
                    end_headers: true,
                    depends_on_itself: false
                },
            ]
        );
    }
}
