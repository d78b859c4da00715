//! Just enough protobuf wire format for the load client: it reads xDS responses field by field (without
//! building `DiscoveryResponse`s) and writes requests from pre-encoded parts, so that the client spends as
//! little CPU as possible on its side of the 2 cores.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, decode_varint, encode_key, encode_varint};

/// One field of a message: its number and, for length-delimited fields, the bytes (a cheap slice of the
/// message); varints carry their value in `varint`.
#[derive(Debug)]
pub struct Field {
    pub number: u32,
    pub bytes: Bytes,
    pub varint: u64,
}

/// Iterates the top-level fields of an encoded message. Stops at the first malformed field.
pub struct Fields {
    buf: Bytes,
}

pub fn fields(buf: Bytes) -> Fields {
    Fields { buf }
}

impl Iterator for Fields {
    type Item = Field;

    fn next(&mut self) -> Option<Field> {
        if !self.buf.has_remaining() {
            return None;
        }
        let key = decode_varint(&mut self.buf).ok()?;
        let number = (key >> 3) as u32;
        match key & 7 {
            0 => {
                let varint = decode_varint(&mut self.buf).ok()?;
                Some(Field { number, bytes: Bytes::new(), varint })
            }
            1 => {
                if self.buf.remaining() < 8 {
                    return None;
                }
                self.buf.advance(8);
                Some(Field { number, bytes: Bytes::new(), varint: 0 })
            }
            2 => {
                let len = decode_varint(&mut self.buf).ok()? as usize;
                if self.buf.remaining() < len {
                    self.buf.clear();
                    return None;
                }
                Some(Field { number, bytes: self.buf.split_to(len), varint: 0 })
            }
            5 => {
                if self.buf.remaining() < 4 {
                    return None;
                }
                self.buf.advance(4);
                Some(Field { number, bytes: Bytes::new(), varint: 0 })
            }
            _ => {
                self.buf.clear();
                None
            }
        }
    }
}

/// The first length-delimited field `number` of a message, as text (empty if absent or not UTF-8).
pub fn string_field(msg: &Bytes, number: u32) -> String {
    fields(msg.clone())
        .find(|f| f.number == number)
        .and_then(|f| String::from_utf8(f.bytes.to_vec()).ok())
        .unwrap_or_default()
}

/// Appends a length-delimited field.
pub fn put_bytes(buf: &mut BytesMut, number: u32, b: &[u8]) {
    encode_key(number, WireType::LengthDelimited, buf);
    encode_varint(b.len() as u64, buf);
    buf.put_slice(b);
}

/// A repeated string field, pre-encoded (e.g. a SotW resource name list shared by many proxies).
pub fn encode_names<'a>(number: u32, names: impl IntoIterator<Item = &'a str>) -> Bytes {
    let mut b = BytesMut::new();
    for n in names {
        put_bytes(&mut b, number, n.as_bytes());
    }
    b.freeze()
}

/// The 5-byte gRPC message header (uncompressed).
pub fn grpc_header(len: usize) -> [u8; 5] {
    let l = (len as u32).to_be_bytes();
    [0, l[0], l[1], l[2], l[3]]
}

/// Reassembles gRPC messages from the chunks of an HTTP/2 body.
#[derive(Default)]
pub struct GrpcReader {
    buf: BytesMut,
}

impl GrpcReader {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete message, if there is one. Err: a compressed message (never requested).
    pub fn next_message(&mut self) -> Result<Option<Bytes>, &'static str> {
        if self.buf.len() < 5 {
            // do not keep a large buffer per stream between (rare) large messages
            if self.buf.is_empty() && self.buf.capacity() > 64 * 1024 {
                self.buf = BytesMut::new();
            }
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err("compressed gRPC message");
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if self.buf.len() < 5 + len {
            self.buf.reserve(5 + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(5);
        Ok(Some(self.buf.split_to(len).freeze()))
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
    use envoy_types::pb::google::protobuf::Any;
    use prost::Message;

    use super::*;

    #[test]
    fn reads_fields_and_merges_pre_encoded_names() {
        let r = DiscoveryResponse {
            version_info: "v".into(),
            nonce: "3".into(),
            resources: vec![Any { type_url: "t".into(), value: vec![1, 2, 3] }],
            ..Default::default()
        };
        let b = Bytes::from(r.encode_to_vec());
        let fs: Vec<Field> = fields(b.clone()).collect();
        assert_eq!(fs.len(), 3);
        assert_eq!(string_field(&b, 5), "3");
        let mut req =
            BytesMut::from(&DiscoveryRequest { version_info: "v".into(), ..Default::default() }.encode_to_vec()[..]);
        req.extend_from_slice(&encode_names(3, ["a", "b"]));
        let d = DiscoveryRequest::decode(&req[..]).unwrap();
        assert_eq!(d.resource_names, ["a", "b"]);
        assert_eq!(d.version_info, "v");
    }

    #[test]
    fn reassembles_grpc_messages() {
        let mut r = GrpcReader::default();
        let mut framed = grpc_header(3).to_vec();
        framed.extend_from_slice(b"abc");
        framed.extend_from_slice(&grpc_header(0));
        r.push(&framed[..4]);
        assert_eq!(r.next_message().unwrap(), None);
        r.push(&framed[4..]);
        assert_eq!(&r.next_message().unwrap().unwrap()[..], b"abc");
        assert_eq!(&r.next_message().unwrap().unwrap()[..], b"");
        assert_eq!(r.next_message().unwrap(), None);
    }
}
