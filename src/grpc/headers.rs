//! gRPC's HTTP/2 headers: the request head read from an HPACK block, and the response headers and
//! trailers written as HPACK literals (no dynamic table: nothing to keep per connection).

use bytes::{BufMut, BytesMut};

/// Largest dynamic table a client may use for the headers it sends (SETTINGS_HEADER_TABLE_SIZE's
/// default; the decoder refuses a larger size update).
pub const HEADER_TABLE_SIZE: usize = 4096;

/// What the server reads of a request's headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub path: String,
    pub content_type: Option<String>,
    pub grpc_encoding: Option<String>,
    pub user_agent: Option<String>,
}

impl RequestHead {
    /// Is this a gRPC request (`content-type: application/grpc` or `application/grpc+…`)?
    pub fn is_grpc(&self) -> bool {
        self.content_type.as_deref().is_some_and(|c| {
            c == "application/grpc" || c.starts_with("application/grpc+") || c.starts_with("application/grpc;")
        })
    }
}

/// Why a header block cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("header block does not decode: {0:?}")]
    Hpack(loona_hpack::decoder::DecoderError),
    #[error("header list larger than {0} bytes")]
    TooLarge(usize),
}

/// Decodes a request's header block with the connection's HPACK decoder. Every block must be decoded
/// (even of a refused stream) to keep the decoder's table in step with the client's.
pub fn decode_request(
    decoder: &mut loona_hpack::Decoder<'static>,
    block: &[u8],
    max_list_size: usize,
) -> Result<RequestHead, HeaderError> {
    let mut head = RequestHead::default();
    let mut size = 0usize;
    decoder
        .decode_with_cb(block, |name, value| {
            // RFC 9113 §6.5.2: a header's size is its name, its value and 32 bytes
            size = size.saturating_add(name.len() + value.len() + 32);
            if size > max_list_size {
                return;
            }
            let text = || String::from_utf8_lossy(&value).into_owned();
            match &*name {
                b":method" => head.method = text(),
                b":path" => head.path = text(),
                b"content-type" => head.content_type = Some(text()),
                b"grpc-encoding" => head.grpc_encoding = Some(text()),
                b"user-agent" => head.user_agent = Some(text()),
                _ => {}
            }
        })
        .map_err(HeaderError::Hpack)?;
    if size > max_list_size {
        return Err(HeaderError::TooLarge(max_list_size));
    }
    Ok(head)
}

/// Decodes a header block whose content is not needed (trailers of a request), keeping the table in step.
pub fn skip(decoder: &mut loona_hpack::Decoder<'static>, block: &[u8]) -> Result<(), HeaderError> {
    decoder.decode_with_cb(block, |_, _| {}).map_err(HeaderError::Hpack)
}

/// HPACK integer with an `n`-bit prefix whose other bits are `first` (RFC 7541 §5.1).
fn integer(out: &mut BytesMut, first: u8, n: u8, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.put_u8(first | value as u8);
        return;
    }
    out.put_u8(first | max as u8);
    value -= max;
    while value >= 128 {
        out.put_u8((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.put_u8(value as u8);
}

/// A literal header field without indexing, with a literal name (RFC 7541 §6.2.2), no Huffman coding.
fn literal(out: &mut BytesMut, name: &str, value: &[u8]) {
    out.put_u8(0);
    integer(out, 0, 7, name.len());
    out.put_slice(name.as_bytes());
    integer(out, 0, 7, value.len());
    out.put_slice(value);
}

/// `:status: 200` is entry 8 of the static table.
const STATUS_200: u8 = 0x80 | 8;

/// The response headers of a gRPC stream.
pub fn response(out: &mut BytesMut) {
    out.put_u8(STATUS_200);
    literal(out, "content-type", b"application/grpc");
}

/// Longest `grpc-message` written (the trailers must fit one frame).
const MAX_MESSAGE: usize = 4096;

/// The trailers ending a gRPC stream: `grpc-status` and, when not empty, `grpc-message`
/// (percent-encoded as gRPC requires).
pub fn trailers(out: &mut BytesMut, code: i32, message: &str) {
    literal(out, "grpc-status", code.to_string().as_bytes());
    if !message.is_empty() {
        let mut enc = Vec::with_capacity(message.len());
        for &b in message.as_bytes() {
            if enc.len() >= MAX_MESSAGE {
                break;
            }
            if (0x20..=0x7e).contains(&b) && b != b'%' {
                enc.push(b);
            } else {
                enc.extend_from_slice(format!("%{b:02X}").as_bytes());
            }
        }
        literal(out, "grpc-message", &enc);
    }
}

/// A trailers-only response (RFC: gRPC over HTTP/2): the status with the response headers, one block.
pub fn trailers_only(out: &mut BytesMut, code: i32, message: &str) {
    response(out);
    trailers(out, code, message);
}

/// A plain HTTP error for a request that is not gRPC (e.g. `415` for another content type).
pub fn http_status(out: &mut BytesMut, status: u16) {
    // `:status` is entry 8 of the static table: literal value with an indexed name
    out.put_u8(8);
    let s = status.to_string();
    integer(out, 0, 7, s.len());
    out.put_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(block: &[u8]) -> Vec<(String, String)> {
        let mut d = loona_hpack::Decoder::new();
        d.decode(block)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    #[test]
    fn response_headers_and_trailers_decode() {
        let mut out = BytesMut::new();
        response(&mut out);
        trailers(&mut out, 14, "meshfed is shutting down: reconnect 100% ünïcode\n");
        assert_eq!(
            decode_all(&out),
            [
                (":status".into(), "200".into()),
                ("content-type".into(), "application/grpc".into()),
                ("grpc-status".into(), "14".into()),
                ("grpc-message".into(), "meshfed is shutting down: reconnect 100%25 %C3%BCn%C3%AFcode%0A".into()),
            ]
        );
        let mut out = BytesMut::new();
        http_status(&mut out, 415);
        assert_eq!(decode_all(&out), [(":status".into(), "415".into())]);
    }

    #[test]
    fn long_values_use_multi_byte_lengths() {
        let mut out = BytesMut::new();
        let long = "x".repeat(5000);
        trailers(&mut out, 2, &long);
        let got = decode_all(&out);
        assert_eq!(got[1].1.len(), MAX_MESSAGE);
    }

    #[test]
    fn request_head_is_read_from_an_encoded_block() {
        let mut enc = loona_hpack::Encoder::new();
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"),
            (b":authority", b"xds"),
            (b"content-type", b"application/grpc"),
            (b"user-agent", b"grpc-c++/1.0 envoy"),
            (b"te", b"trailers"),
        ];
        let block = enc.encode(headers.iter().copied());
        let mut dec = loona_hpack::Decoder::new();
        dec.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        let head = decode_request(&mut dec, &block, 16 * 1024).unwrap();
        assert_eq!(head.method, "POST");
        assert!(head.path.ends_with("/StreamAggregatedResources"));
        assert!(head.is_grpc());
        assert_eq!(head.user_agent.as_deref(), Some("grpc-c++/1.0 envoy"));
        // the encoder indexed them: the second block refers to the dynamic table
        let block2 = enc.encode(headers.iter().copied());
        assert!(block2.len() < block.len());
        assert_eq!(decode_request(&mut dec, &block2, 16 * 1024).unwrap(), head);
        // too large a list
        assert!(matches!(decode_request(&mut dec, &block2, 100), Err(HeaderError::TooLarge(100))));
        // garbage
        assert!(matches!(
            decode_request(&mut dec, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff], 100),
            Err(HeaderError::Hpack(_))
        ));
    }

    #[test]
    fn content_types() {
        let h = |c: &str| RequestHead { content_type: Some(c.into()), ..Default::default() };
        assert!(h("application/grpc+proto").is_grpc());
        assert!(!h("application/json").is_grpc());
        assert!(!RequestHead::default().is_grpc());
    }
}
