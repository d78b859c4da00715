//! gRPC's HTTP/2 headers: the request head read from an HPACK block and checked as RFC 9113 §8.2–§8.3
//! requires, and the response headers and trailers written as HPACK literals (no dynamic table: nothing
//! to keep per connection).
//!
//! A request's header block is malformed ([`HeaderError::Malformed`], a stream error PROTOCOL_ERROR) when
//! a field name is not a lower-case token, a value holds NUL, CR, LF or another control character or
//! starts or ends with white space, a pseudo-header is unknown, repeated or follows a regular field,
//! `:method`, `:scheme` or `:path` is missing (CONNECT: `:authority` without `:scheme` and `:path`),
//! a connection-specific field is present (`connection`, `keep-alive`, `proxy-connection`,
//! `transfer-encoding`, `upgrade`), `te` is anything but `trailers`, or `content-length` is not one
//! number. Trailers are held to the same field rules and may carry no pseudo-header at all. The checks
//! run once per header block, on the bytes HPACK hands out: no allocation.

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
    /// the request's `content-length`: its DATA must add up to it (RFC 9113 §8.1.1)
    pub content_length: Option<u64>,
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
    /// a connection error COMPRESSION_ERROR: the decoder's table is no longer the client's
    #[error("header block does not decode: {0:?}")]
    Hpack(loona_hpack::decoder::DecoderError),
    #[error("header list larger than {0} bytes")]
    TooLarge(usize),
    /// a malformed request or trailers (RFC 9113 §8.1.1): a stream error PROTOCOL_ERROR
    #[error("malformed header block: {0}")]
    Malformed(&'static str),
}

/// Bytes allowed in a field name: the lower-case `tchar`s of RFC 9110 §5.6.2 (no upper case, no colon,
/// no control character, space or byte above 0x7e).
const NAME_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || matches!(
                c,
                b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~'
            );
        b += 1;
    }
    t
};

/// Bytes allowed in a field value (RFC 9110 §5.5: visible characters, obs-text, space and tab).
const VALUE_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = b == 0x09 || (b >= 0x20 && b != 0x7f);
        b += 1;
    }
    t
};

fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name.iter().all(|&b| NAME_BYTE[b as usize])
}

fn valid_value(value: &[u8]) -> bool {
    let ws = |b: &u8| *b == b' ' || *b == b'\t';
    !value.first().is_some_and(ws) && !value.last().is_some_and(ws) && value.iter().all(|&b| VALUE_BYTE[b as usize])
}

/// Fields HTTP/2 forbids: they describe the connection, which is HTTP/2's own (RFC 9113 §8.2.2).
fn connection_specific(name: &[u8]) -> bool {
    matches!(name, b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding" | b"upgrade")
}

/// The checks that apply to every field of a request or of its trailers.
fn check_regular(name: &[u8], value: &[u8]) -> Result<(), &'static str> {
    if !valid_name(name) {
        return Err("a field name that is not a lower-case token");
    }
    if !valid_value(value) {
        return Err("a field value with a control character or surrounding white space");
    }
    if connection_specific(name) {
        return Err("a connection-specific header field");
    }
    if name == b"te" && !value.eq_ignore_ascii_case(b"trailers") {
        return Err("te other than \"trailers\"");
    }
    Ok(())
}

/// `content-length`: one decimal number.
fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() { n.checked_mul(10)?.checked_add(u64::from(b - b'0')) } else { None }
    })
}

// the request pseudo-headers (RFC 9113 §8.3.1), as bits of a set
const METHOD: u8 = 1;
const SCHEME: u8 = 2;
const AUTHORITY: u8 = 4;
const PATH: u8 = 8;

/// Decodes a request's header block with the connection's HPACK decoder and checks it (see the module
/// docs). Every block must be decoded (even of a refused stream) to keep the decoder's table in step
/// with the client's; a list over `max_list_size` is [`HeaderError::TooLarge`] whatever else is wrong.
pub fn decode_request(
    decoder: &mut loona_hpack::Decoder<'static>,
    block: &[u8],
    max_list_size: usize,
) -> Result<RequestHead, HeaderError> {
    let mut head = RequestHead::default();
    let mut size = 0usize;
    let mut seen = 0u8;
    let mut regular = false;
    let mut malformed: Option<&'static str> = None;
    decoder
        .decode_with_cb(block, |name, value| {
            // RFC 9113 §6.5.2: a header's size is its name, its value and 32 bytes
            size = size.saturating_add(name.len() + value.len() + 32);
            if size > max_list_size || malformed.is_some() {
                return;
            }
            let text = || String::from_utf8_lossy(&value).into_owned();
            if name.first() == Some(&b':') {
                let bit = match &*name {
                    b":method" => METHOD,
                    b":scheme" => SCHEME,
                    b":authority" => AUTHORITY,
                    b":path" => PATH,
                    _ => {
                        malformed = Some("an unknown pseudo-header");
                        return;
                    }
                };
                if regular {
                    malformed = Some("a pseudo-header after a regular header field");
                } else if seen & bit != 0 {
                    malformed = Some("a repeated pseudo-header");
                } else if !valid_value(&value) {
                    malformed = Some("a pseudo-header value with a control character or surrounding white space");
                }
                seen |= bit;
                match bit {
                    METHOD => head.method = text(),
                    PATH => head.path = text(),
                    _ => {}
                }
                return;
            }
            regular = true;
            if let Err(why) = check_regular(&name, &value) {
                malformed = Some(why);
                return;
            }
            match &*name {
                b"content-type" => head.content_type = Some(text()),
                b"grpc-encoding" => head.grpc_encoding = Some(text()),
                b"user-agent" => head.user_agent = Some(text()),
                b"content-length" => match (content_length(&value), head.content_length) {
                    (Some(n), None) => head.content_length = Some(n),
                    (Some(n), Some(m)) if n == m => {}
                    _ => malformed = Some("content-length is not one number"),
                },
                _ => {}
            }
        })
        .map_err(HeaderError::Hpack)?;
    if size > max_list_size {
        return Err(HeaderError::TooLarge(max_list_size));
    }
    if let Some(why) = malformed {
        return Err(HeaderError::Malformed(why));
    }
    if seen & METHOD == 0 {
        return Err(HeaderError::Malformed("no :method"));
    }
    if head.method == "CONNECT" {
        // RFC 9113 §8.5: the target is :authority alone
        if seen & (SCHEME | PATH) != 0 || seen & AUTHORITY == 0 {
            return Err(HeaderError::Malformed("CONNECT without :authority, or with :scheme or :path"));
        }
    } else if seen & (SCHEME | PATH) != SCHEME | PATH {
        return Err(HeaderError::Malformed("no :scheme or no :path"));
    } else if head.path.is_empty() {
        return Err(HeaderError::Malformed("an empty :path"));
    }
    Ok(head)
}

/// Decodes a request's trailers (their content is not needed) and checks them: the field rules of a
/// request, and no pseudo-header (RFC 9113 §8.1).
pub fn decode_trailers(decoder: &mut loona_hpack::Decoder<'static>, block: &[u8]) -> Result<(), HeaderError> {
    let mut malformed: Option<&'static str> = None;
    decoder
        .decode_with_cb(block, |name, value| {
            if malformed.is_some() {
                return;
            }
            if name.first() == Some(&b':') {
                malformed = Some("a pseudo-header in trailers");
            } else if let Err(why) = check_regular(&name, &value) {
                malformed = Some(why);
            }
        })
        .map_err(HeaderError::Hpack)?;
    match malformed {
        Some(why) => Err(HeaderError::Malformed(why)),
        None => Ok(()),
    }
}

/// Decodes a header block whose content is not needed (of a stream already closed), keeping the table
/// in step.
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

    /// A block of literal fields, as written (upper case included).
    fn block(fields: &[(&str, &str)]) -> BytesMut {
        let mut out = BytesMut::new();
        for (n, v) in fields {
            literal(&mut out, n, v.as_bytes());
        }
        out
    }

    const REQUEST: [(&str, &str); 6] = [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", "/test.Echo/Echo"),
        (":authority", "xds"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];

    fn decoded(fields: &[(&str, &str)]) -> Result<RequestHead, HeaderError> {
        let mut dec = loona_hpack::Decoder::new();
        decode_request(&mut dec, &block(fields), 16 * 1024)
    }

    fn with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        REQUEST.iter().chain(extra).copied().collect()
    }

    #[test]
    fn malformed_requests_are_told_apart() {
        assert!(decoded(&REQUEST).is_ok());
        let ok = with(&[("content-length", "12"), ("te", "Trailers"), ("x-v", "a\tb \u{e9}")]);
        assert_eq!(decoded(&ok).unwrap().content_length, Some(12));
        let without = |name: &str| REQUEST.iter().filter(|(n, _)| *n != name).copied().collect::<Vec<_>>();
        let mut after_regular = REQUEST.to_vec();
        after_regular.swap(2, 4);
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (with(&[("X-Upper", "1")]), "lower-case token"),
            (with(&[("bad name", "1")]), "lower-case token"),
            (with(&[("na:me", "1")]), "lower-case token"),
            (with(&[("", "1")]), "lower-case token"),
            (with(&[("x", "a\nb")]), "control character"),
            (with(&[("x", "a\0b")]), "control character"),
            (with(&[("x", " a")]), "white space"),
            (with(&[("x", "a\t")]), "white space"),
            (with(&[(":protocol", "websocket")]), "unknown pseudo-header"),
            (with(&[(":status", "200")]), "unknown pseudo-header"),
            ([&REQUEST[..4], &[(":path", "/b")], &REQUEST[4..]].concat(), "repeated"),
            (after_regular, "after a regular"),
            (without(":method"), "no :method"),
            (without(":scheme"), "no :scheme"),
            (without(":path"), "no :path"),
            ([&[(":path", "")], &without(":path")[..]].concat(), "empty :path"),
            (vec![(":method", "CONNECT"), (":scheme", "https"), (":authority", "x:1")], "CONNECT"),
            (with(&[("connection", "close")]), "connection-specific"),
            (with(&[("keep-alive", "5")]), "connection-specific"),
            (with(&[("proxy-connection", "x")]), "connection-specific"),
            (with(&[("transfer-encoding", "chunked")]), "connection-specific"),
            (with(&[("upgrade", "h2c")]), "connection-specific"),
            (with(&[("te", "gzip")]), "te other than"),
            (with(&[("content-length", "1x")]), "not one number"),
            (with(&[("content-length", "")]), "not one number"),
            (with(&[("content-length", "99999999999999999999999")]), "not one number"),
            (with(&[("content-length", "1"), ("content-length", "2")]), "not one number"),
        ];
        for (fields, why) in cases {
            match decoded(&fields) {
                Err(HeaderError::Malformed(m)) => assert!(m.contains(why), "{fields:?}: {m}"),
                other => panic!("{fields:?}: {other:?}"),
            }
        }
        // CONNECT names its target by :authority alone (then meshfed answers 405)
        let connect = decoded(&[(":method", "CONNECT"), (":authority", "x:1")]).unwrap();
        assert_eq!(connect.method, "CONNECT");
        // repeated identical content-lengths are one
        assert!(decoded(&with(&[("content-length", "3"), ("content-length", "3")])).is_ok());
        // too large wins over malformed: the list is not read to its end
        let mut dec = loona_hpack::Decoder::new();
        let big = with(&[("X-Upper", "1")]);
        assert!(matches!(decode_request(&mut dec, &block(&big), 100), Err(HeaderError::TooLarge(100))));
    }

    #[test]
    fn trailers_have_no_pseudo_headers() {
        let mut dec = loona_hpack::Decoder::new();
        assert!(decode_trailers(&mut dec, &block(&[("grpc-status", "0"), ("x-a", "b")])).is_ok());
        for (fields, why) in [
            (vec![("x-a", "b"), (":path", "/x")], "pseudo-header in trailers"),
            (vec![("X-A", "b")], "lower-case token"),
            (vec![("connection", "close")], "connection-specific"),
        ] {
            match decode_trailers(&mut dec, &block(&fields)) {
                Err(HeaderError::Malformed(m)) => assert!(m.contains(why), "{fields:?}: {m}"),
                other => panic!("{fields:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn content_types() {
        let h = |c: &str| RequestHead { content_type: Some(c.into()), ..Default::default() };
        assert!(h("application/grpc+proto").is_grpc());
        assert!(!h("application/json").is_grpc());
        assert!(!RequestHead::default().is_grpc());
    }
}
