//! The xDS wire: responses written from pre-encoded resources, SotW requests read without copying their
//! resource names.
//!
//! Each resource is encoded once (as `google.protobuf.Any` bytes in the cache) and shared by every
//! stream. A response is written as a gRPC message made of chunks ([`ResponseBody`]): the few envelope
//! fields are gathered into small buffers and every resource of [`SHARE_MIN`] bytes or more is passed as
//! its shared bytes, so no stream re-encodes a resource or keeps a buffer as large as the largest
//! response it sent (tonic's stock encoder copies each response into a per-stream buffer that keeps its
//! capacity). The wire format is exactly what prost produces for `DiscoveryResponse` /
//! `DeltaDiscoveryResponse` (tested against prost decoding).
//!
//! Every SotW ACK repeats the whole subscription (Envoy: a thousand EDS names, ~45 KB). [`SotwRequest`]
//! reads the other fields and only fingerprints the names in place; they are decoded into strings only
//! when the fingerprint differs from the stream's.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use prost::Message;
use prost::encoding::{
    DecodeContext, WireType, decode_key, decode_varint, encode_key, encode_varint, encoded_len_varint,
};
use tokio::sync::mpsc;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http;

use crate::cache::Resource;

/// A SotW `DiscoveryResponse` made of shared resources.
#[derive(Clone, Debug)]
pub struct SotwResponse {
    pub version_info: String,
    pub type_url: &'static str,
    pub nonce: String,
    pub resources: Vec<Arc<Resource>>,
}

/// A `DeltaDiscoveryResponse` made of shared resources.
#[derive(Clone, Debug)]
pub struct DeltaResponse {
    pub system_version_info: String,
    pub type_url: &'static str,
    pub nonce: String,
    pub resources: Vec<Arc<Resource>>,
    pub removed_resources: Vec<Arc<str>>,
}

/// Either kind of response, or a response built by prost for types outside the cache (debug types).
#[derive(Clone, Debug)]
pub enum Response {
    Sotw(SotwResponse),
    Delta(DeltaResponse),
    /// already-encoded message bytes
    Raw(Bytes),
}

fn len_field(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + encoded_len_varint(len as u64) + len
}

fn str_len(tag: u32, s: &str) -> usize {
    if s.is_empty() { 0 } else { len_field(tag, s.len()) }
}

/// Where a response's bytes go: copied into one buffer, or gathered into shared chunks.
trait Sink {
    /// a few bytes of envelope (keys, lengths, short strings)
    fn put(&mut self, b: &[u8]);
    /// a resource's shared encoding
    fn put_shared(&mut self, b: &Bytes);

    fn put_header(&mut self, tag: u32, len: usize) {
        let mut h = [0u8; 15];
        let mut w = &mut h[..];
        encode_key(tag, WireType::LengthDelimited, &mut w);
        encode_varint(len as u64, &mut w);
        let n = 15 - w.len();
        self.put(&h[..n]);
    }

    fn put_str(&mut self, tag: u32, s: &str) {
        if !s.is_empty() {
            self.put_header(tag, s.len());
            self.put(s.as_bytes());
        }
    }
}

struct Copy<'a, B>(&'a mut B);

impl<B: BufMut> Sink for Copy<'_, B> {
    fn put(&mut self, b: &[u8]) {
        self.0.put_slice(b);
    }
    fn put_shared(&mut self, b: &Bytes) {
        self.0.put_slice(b);
    }
}

/// Resources this large are written as their shared bytes; smaller ones are copied into a chunk.
pub const SHARE_MIN: usize = 2 * 1024;
/// Largest chunk of gathered small pieces.
const CHUNK: usize = 16 * 1024;

struct Chunks<'a> {
    cur: BytesMut,
    out: &'a mut VecDeque<Bytes>,
}

impl Chunks<'_> {
    fn flush(&mut self) {
        if !self.cur.is_empty() {
            self.out.push_back(self.cur.split().freeze());
        }
    }
}

impl Sink for Chunks<'_> {
    fn put(&mut self, b: &[u8]) {
        if self.cur.len() + b.len() > CHUNK {
            self.flush();
        }
        if self.cur.capacity() - self.cur.len() < b.len() {
            self.cur.reserve(CHUNK.max(b.len()));
        }
        self.cur.put_slice(b);
    }
    fn put_shared(&mut self, b: &Bytes) {
        if b.len() >= SHARE_MIN {
            self.flush();
            self.out.push_back(b.clone());
        } else {
            self.put(b);
        }
    }
}

impl Response {
    pub fn encoded_len(&self) -> usize {
        match self {
            Response::Sotw(r) => {
                str_len(1, &r.version_info)
                    + r.resources.iter().map(|x| len_field(2, x.body.len())).sum::<usize>()
                    + str_len(4, r.type_url)
                    + str_len(5, &r.nonce)
            }
            Response::Delta(r) => {
                str_len(1, &r.system_version_info)
                    + r.resources.iter().map(|x| len_field(2, delta_resource_len(x))).sum::<usize>()
                    + str_len(4, r.type_url)
                    + str_len(5, &r.nonce)
                    + r.removed_resources.iter().map(|n| len_field(6, n.len())).sum::<usize>()
            }
            Response::Raw(b) => b.len(),
        }
    }

    fn write(&self, sink: &mut impl Sink) {
        match self {
            Response::Sotw(r) => {
                sink.put_str(1, &r.version_info);
                for x in &r.resources {
                    sink.put_header(2, x.body.len());
                    sink.put_shared(&x.body);
                }
                sink.put_str(4, r.type_url);
                sink.put_str(5, &r.nonce);
            }
            Response::Delta(r) => {
                sink.put_str(1, &r.system_version_info);
                for x in &r.resources {
                    sink.put_header(2, delta_resource_len(x));
                    // envoy.service.discovery.v3.Resource { version = 1, resource = 2, name = 3 }
                    sink.put_str(1, &x.version);
                    sink.put_header(2, x.body.len());
                    sink.put_shared(&x.body);
                    sink.put_str(3, &x.name);
                }
                sink.put_str(4, r.type_url);
                sink.put_str(5, &r.nonce);
                // every removed name is written, an empty one too (a repeated field keeps empty entries)
                for n in &r.removed_resources {
                    sink.put_header(6, n.len());
                    sink.put(n.as_bytes());
                }
            }
            Response::Raw(b) => sink.put_shared(b),
        }
    }

    pub fn encode(&self, buf: &mut impl BufMut) {
        self.write(&mut Copy(buf));
    }

    pub fn encode_to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode(&mut v);
        v
    }

    /// The response as one gRPC message (uncompressed), in chunks that share the resources' bytes.
    pub fn grpc_chunks(&self, out: &mut VecDeque<Bytes>) {
        let mut c = Chunks { cur: BytesMut::new(), out };
        let mut prefix = [0u8; 5];
        prefix[1..].copy_from_slice(&(self.encoded_len() as u32).to_be_bytes());
        c.put(&prefix);
        self.write(&mut c);
        c.flush();
    }
}

fn delta_resource_len(r: &Resource) -> usize {
    str_len(1, &r.version) + len_field(2, r.body.len()) + str_len(3, &r.name)
}

/// The response body of one ADS stream: the responses the stream sends, as gRPC messages written in
/// shared chunks ([`Response::grpc_chunks`]), then the `grpc-status` trailers. Nothing but the chunks of
/// the response being written is kept; h2 polls it only as fast as the client's flow control allows.
pub struct ResponseBody {
    rx: mpsc::Receiver<Result<Response, Status>>,
    pending: VecDeque<Bytes>,
    done: bool,
}

impl ResponseBody {
    pub fn new(rx: mpsc::Receiver<Result<Response, Status>>) -> ResponseBody {
        ResponseBody { rx, pending: VecDeque::new(), done: false }
    }

    /// `http::Response` for a gRPC stream with this body.
    pub fn into_http(self) -> http::Response<tonic::body::Body> {
        let mut resp = http::Response::new(tonic::body::Body::new(self));
        resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
        resp
    }
}

fn trailers(status: &Status) -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    if status.add_header(&mut t).is_err() {
        t.insert("grpc-status", (status.code() as i32).into());
    }
    t
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if let Some(c) = this.pending.pop_front() {
                if this.pending.is_empty() && this.pending.capacity() > 64 {
                    this.pending = VecDeque::new();
                }
                return Poll::Ready(Some(Ok(http_body::Frame::data(c))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(r))) => r.grpc_chunks(&mut this.pending),
                Poll::Ready(Some(Err(status))) => {
                    this.done = true;
                    return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers(&status)))));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers(&Status::ok(""))))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_empty()
    }
}

/// A SotW `DiscoveryRequest` whose resource names are fingerprinted in place and decoded only on demand.
#[derive(Clone, Debug, Default)]
pub struct SotwRequest {
    /// every field but `resource_names`
    pub head: DiscoveryRequest,
    names: Names,
    /// [`names_fingerprint`] of the names
    pub names_fingerprint: u64,
    pub name_count: usize,
    /// one of the names is `*`
    pub has_star: bool,
}

#[derive(Clone, Debug, Default)]
enum Names {
    #[default]
    None,
    /// the encoded request (names are its field 3)
    Raw(Bytes),
    Decoded(Vec<String>),
}

/// An order-independent fingerprint of a list of resource names (duplicates count once per
/// occurrence; a repeated list in another order gives the same value).
pub fn names_fingerprint<S: AsRef<[u8]>>(names: impl IntoIterator<Item = S>) -> u64 {
    let (count, sum) = names
        .into_iter()
        .fold((0u64, 0u64), |(c, acc), n| (c + 1, acc.wrapping_add(xxhash_rust::xxh3::xxh3_64(n.as_ref()))));
    sum.wrapping_add(count)
}

const NAMES_TAG: u32 = 3;

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Decode(#[from] prost::DecodeError),
    #[error("a resource name runs past the end of the request")]
    Truncated,
    #[error("a resource name is not UTF-8")]
    NotUtf8,
}

impl SotwRequest {
    /// Reads an encoded `DiscoveryRequest`.
    pub fn decode(raw: Bytes) -> Result<SotwRequest, Error> {
        let mut head = DiscoveryRequest::default();
        let mut buf = raw.clone();
        let (mut count, mut sum, mut has_star) = (0usize, 0u64, false);
        while buf.has_remaining() {
            let (tag, wire_type) = decode_key(&mut buf)?;
            if tag == NAMES_TAG && wire_type == WireType::LengthDelimited {
                let len = decode_varint(&mut buf)?;
                if len > buf.remaining() as u64 {
                    return Err(Error::Truncated);
                }
                let name = &buf.chunk()[..len as usize];
                count += 1;
                sum = sum.wrapping_add(xxhash_rust::xxh3::xxh3_64(name));
                has_star |= name == b"*";
                buf.advance(len as usize);
            } else {
                head.merge_field(tag, wire_type, &mut buf, DecodeContext::default())?;
            }
        }
        let names = if count == 0 { Names::None } else { Names::Raw(raw) };
        Ok(SotwRequest { head, names, names_fingerprint: sum.wrapping_add(count as u64), name_count: count, has_star })
    }

    /// The resource names, decoded now. Err: a name is not UTF-8.
    pub fn names(&self) -> Result<Vec<String>, Error> {
        match &self.names {
            Names::None => Ok(Vec::new()),
            Names::Decoded(v) => Ok(v.clone()),
            Names::Raw(raw) => {
                let mut buf = raw.clone();
                let mut out = Vec::with_capacity(self.name_count);
                while buf.has_remaining() {
                    let (tag, wire_type) = decode_key(&mut buf)?;
                    if tag == NAMES_TAG && wire_type == WireType::LengthDelimited {
                        let len = decode_varint(&mut buf)? as usize;
                        let name = buf.chunk().get(..len).ok_or(Error::Truncated)?;
                        let name = std::str::from_utf8(name).map_err(|_| Error::NotUtf8)?;
                        out.push(name.to_string());
                        buf.advance(len);
                    } else {
                        prost::encoding::skip_field(wire_type, tag, &mut buf, DecodeContext::default())?;
                    }
                }
                Ok(out)
            }
        }
    }
}

impl From<DiscoveryRequest> for SotwRequest {
    fn from(mut req: DiscoveryRequest) -> SotwRequest {
        let names = std::mem::take(&mut req.resource_names);
        SotwRequest {
            head: req,
            names_fingerprint: names_fingerprint(&names),
            name_count: names.len(),
            has_star: names.iter().any(|n| n == "*"),
            names: if names.is_empty() { Names::None } else { Names::Decoded(names) },
        }
    }
}

/// Decodes [`SotwRequest`]s (the request side of the SotW stream).
#[derive(Debug, Default)]
pub struct SotwDecoder;

impl Decoder for SotwDecoder {
    type Item = SotwRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<SotwRequest>, Status> {
        let raw = src.copy_to_bytes(src.remaining());
        SotwRequest::decode(raw).map(Some).map_err(|e| Status::invalid_argument(format!("malformed xDS request: {e}")))
    }
}

/// Encodes [`Response`]s through tonic's encoder (a per-stream buffer), decodes requests of type `Req` with
/// prost. The server writes [`ResponseBody`] instead; this remains for the benchmark floor's comparison.
#[derive(Debug)]
pub struct XdsCodec<Req>(PhantomData<fn() -> Req>);

impl<Req> Default for XdsCodec<Req> {
    fn default() -> Self {
        XdsCodec(PhantomData)
    }
}

impl<Req: Message + Default + Send + 'static> Codec for XdsCodec<Req> {
    type Encode = Response;
    type Decode = Req;
    type Encoder = ResponseEncoder;
    type Decoder = RequestDecoder<Req>;

    fn encoder(&mut self) -> Self::Encoder {
        ResponseEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(PhantomData)
    }
}

#[derive(Debug)]
pub struct ResponseEncoder;

impl Encoder for ResponseEncoder {
    type Item = Response;
    type Error = Status;

    fn encode(&mut self, item: Response, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.encoded_len());
        item.encode(dst);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        // Small initial buffer: large responses grow it only while they are written.
        BufferSettings::new(4 * 1024, 32 * 1024)
    }
}

#[derive(Debug)]
pub struct RequestDecoder<Req>(PhantomData<fn() -> Req>);

impl<Req> Default for RequestDecoder<Req> {
    fn default() -> Self {
        RequestDecoder(PhantomData)
    }
}

impl<Req: Message + Default> Decoder for RequestDecoder<Req> {
    type Item = Req;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Req>, Status> {
        let msg = Req::decode(src.copy_to_bytes(src.remaining()))
            .map_err(|e| Status::invalid_argument(format!("malformed xDS request: {e}")))?;
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse};

    use super::*;
    use crate::translate::Named;

    fn res(name: &str) -> Arc<Resource> {
        Resource::encode(Named::new(name, ClusterLoadAssignment { cluster_name: name.into(), ..Default::default() }))
    }

    #[test]
    fn sotw_envelope_decodes_as_prost() {
        let r = Response::Sotw(SotwResponse {
            version_info: "v1".into(),
            type_url: crate::type_url::ENDPOINT,
            nonce: "7".into(),
            resources: vec![res("a"), res("b")],
        });
        let bytes = r.encode_to_vec();
        assert_eq!(bytes.len(), r.encoded_len());
        let d = DiscoveryResponse::decode(&bytes[..]).unwrap();
        assert_eq!(d.version_info, "v1");
        assert_eq!(d.nonce, "7");
        assert_eq!(d.type_url, crate::type_url::ENDPOINT);
        assert_eq!(d.resources.len(), 2);
        let cla = ClusterLoadAssignment::decode(&d.resources[1].value[..]).unwrap();
        assert_eq!(cla.cluster_name, "b");
    }

    #[test]
    fn delta_envelope_decodes_as_prost() {
        let a = res("a");
        let r = Response::Delta(DeltaResponse {
            system_version_info: String::new(),
            type_url: crate::type_url::ENDPOINT,
            nonce: "1".into(),
            resources: vec![a.clone()],
            removed_resources: vec!["gone".into()],
        });
        let bytes = r.encode_to_vec();
        assert_eq!(bytes.len(), r.encoded_len());
        let d = DeltaDiscoveryResponse::decode(&bytes[..]).unwrap();
        assert_eq!(d.resources[0].name, "a");
        assert_eq!(d.resources[0].version, &*a.version);
        assert_eq!(d.resources[0].resource.as_ref().unwrap().type_url, crate::type_url::ENDPOINT);
        assert_eq!(d.removed_resources, ["gone"]);
    }

    fn big(name: &str) -> Arc<Resource> {
        let endpoints = (0..1000)
            .map(|i| envoy_types::pb::envoy::config::endpoint::v3::LocalityLbEndpoints {
                priority: i,
                ..Default::default()
            })
            .collect();
        Resource::encode(Named::new(
            name,
            ClusterLoadAssignment { cluster_name: name.into(), endpoints, ..Default::default() },
        ))
    }

    fn wire(r: &Response) -> Vec<u8> {
        let mut chunks = VecDeque::new();
        r.grpc_chunks(&mut chunks);
        chunks.iter().flat_map(|c| c.iter().copied()).collect()
    }

    #[test]
    fn chunks_are_the_grpc_message_and_share_large_resources() {
        let large = big("large");
        assert!(large.body.len() >= SHARE_MIN);
        let sotw = Response::Sotw(SotwResponse {
            version_info: "v".into(),
            type_url: crate::type_url::ENDPOINT,
            nonce: "3".into(),
            resources: vec![res("a"), large.clone(), res("b")],
        });
        let delta = Response::Delta(DeltaResponse {
            system_version_info: String::new(),
            type_url: crate::type_url::ENDPOINT,
            nonce: "4".into(),
            resources: vec![large.clone(), res("c")],
            removed_resources: vec!["gone".into(), "".into()],
        });
        for r in [sotw, delta, Response::Raw(Bytes::from_static(b"raw"))] {
            let bytes = wire(&r);
            let body = r.encode_to_vec();
            assert_eq!(bytes[0], 0, "uncompressed");
            assert_eq!(u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize, body.len());
            assert_eq!(&bytes[5..], &body[..]);
        }
        // the large resource is written as the cache's bytes, not a copy
        let mut chunks = VecDeque::new();
        Response::Sotw(SotwResponse {
            version_info: String::new(),
            type_url: crate::type_url::ENDPOINT,
            nonce: "1".into(),
            resources: vec![large.clone()],
        })
        .grpc_chunks(&mut chunks);
        assert!(chunks.iter().any(|c| c.as_ptr() == large.body.as_ptr() && c.len() == large.body.len()));
    }

    #[test]
    fn sotw_request_reads_every_field_and_fingerprints_the_names() {
        let req = DiscoveryRequest {
            version_info: "v9".into(),
            node: Some(envoy_types::pb::envoy::config::core::v3::Node {
                id: "sidecar~1.2.3.4~a.b~b.svc.cluster.local".into(),
                ..Default::default()
            }),
            resource_names: vec!["outbound|80||b.svc".into(), "*".into(), "x".into()],
            type_url: crate::type_url::ENDPOINT.into(),
            response_nonce: "12".into(),
            error_detail: Some(envoy_types::pb::google::rpc::Status {
                code: 3,
                message: "bad".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let got = SotwRequest::decode(req.encode_to_vec().into()).unwrap();
        let mut head = req.clone();
        head.resource_names.clear();
        assert_eq!(got.head, head);
        assert_eq!(got.names().unwrap(), req.resource_names);
        assert_eq!(got.name_count, 3);
        assert!(got.has_star);
        assert_eq!(got.names_fingerprint, names_fingerprint(&req.resource_names));
        // order does not matter; content does
        let mut reordered = req.clone();
        reordered.resource_names.reverse();
        assert_eq!(
            SotwRequest::decode(reordered.encode_to_vec().into()).unwrap().names_fingerprint,
            got.names_fingerprint
        );
        let mut other = req.clone();
        other.resource_names[2] = "y".into();
        assert_ne!(SotwRequest::decode(other.encode_to_vec().into()).unwrap().names_fingerprint, got.names_fingerprint);
        // the same from an already-decoded request
        let from = SotwRequest::from(req.clone());
        assert_eq!((from.names_fingerprint, from.name_count, from.has_star), (got.names_fingerprint, 3, true));
        assert_eq!(from.names().unwrap(), req.resource_names);
        // no names
        let empty = SotwRequest::decode(DiscoveryRequest::default().encode_to_vec().into()).unwrap();
        assert_eq!((empty.name_count, empty.has_star), (0, false));
        assert!(empty.names().unwrap().is_empty());
    }

    #[test]
    fn sotw_request_errors_are_reported() {
        // a name longer than the request
        let truncated = Bytes::from_static(&[0x1a, 0x10, b'a']);
        assert!(matches!(SotwRequest::decode(truncated), Err(Error::Truncated)));
        // a name that is not UTF-8 is found when the names are read
        let bad = SotwRequest::decode(Bytes::from_static(&[0x1a, 0x02, 0xff, 0xfe])).unwrap();
        assert!(matches!(bad.names(), Err(Error::NotUtf8)));
        // another field with a bad wire format
        assert!(SotwRequest::decode(Bytes::from_static(&[0x22, 0x05, b'a'])).is_err());
    }
}
