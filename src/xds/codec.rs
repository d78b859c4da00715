//! The xDS wire: responses written from pre-encoded resources, SotW requests read without copying their
//! resource names.
//!
//! Each resource is encoded once (as `google.protobuf.Any` bytes in the cache) and shared by every
//! stream. A response is written as a gRPC message made of chunks ([`Response::grpc_chunks`]): the few envelope
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
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use prost::Message;
use prost::encoding::{
    DecodeContext, WireType, decode_key, decode_varint, encode_key, encode_varint, encoded_len_varint,
};

use crate::cache::Resource;

/// `DiscoveryResponse.control_plane` (field 6; field 7 of `DeltaDiscoveryResponse`), encoded once per
/// process: `identifier` is the JSON istioctl parses (`IstioControlPlaneInstance`: `Component`, `ID`, and
/// `Info.version`), ID the pod name (`POD_NAME`, else `HOSTNAME`, else "meshfed").
pub fn control_plane() -> &'static [u8] {
    static ENCODED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    ENCODED.get_or_init(|| control_plane_message().encode_to_vec())
}

/// The control plane's identity as the message (for responses prost encodes).
pub fn control_plane_message() -> envoy_types::pb::envoy::config::core::v3::ControlPlane {
    let id = ["POD_NAME", "HOSTNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "meshfed".to_string());
    let identifier = serde_json::json!({
        "Component": "meshfed",
        "ID": id,
        "Info": {"version": env!("CARGO_PKG_VERSION")},
    });
    envoy_types::pb::envoy::config::core::v3::ControlPlane { identifier: identifier.to_string() }
}

const SOTW_CONTROL_PLANE_TAG: u32 = 6;
const DELTA_CONTROL_PLANE_TAG: u32 = 7;

/// A SotW `DiscoveryResponse` made of shared resources.
#[derive(Clone, Debug)]
pub struct SotwResponse {
    pub version_info: String,
    pub type_url: &'static str,
    pub nonce: String,
    pub resources: Payload,
}

/// A `DeltaDiscoveryResponse` made of shared resources.
#[derive(Clone, Debug)]
pub struct DeltaResponse {
    pub system_version_info: String,
    pub type_url: &'static str,
    pub nonce: String,
    pub resources: Payload,
    pub removed_resources: Vec<Arc<str>>,
}

/// The resources a response carries.
#[derive(Clone, Debug)]
pub enum Payload {
    /// chosen for this response: each written from its shared encoding
    Each(Vec<Arc<Resource>>),
    /// the same resources many streams send in one push, their entries encoded once ([`Batch`])
    Batch(Arc<Batch>),
}

impl Payload {
    /// Written from a [`Batch`] (shared by the streams of one push).
    pub fn is_batch(&self) -> bool {
        matches!(self, Payload::Batch(_))
    }

    pub fn resources(&self) -> &[Arc<Resource>] {
        match self {
            Payload::Each(v) => v,
            Payload::Batch(b) => &b.resources,
        }
    }
}

impl From<Vec<Arc<Resource>>> for Payload {
    fn from(v: Vec<Arc<Resource>>) -> Payload {
        Payload::Each(v)
    }
}

/// Resources encoded once as the resource entries of a SotW or a Delta response (field 2 of either:
/// `Any`s, or `Resource`s wrapping them), so that every stream sending them in one push writes the
/// same bytes instead of gathering a copy of its own.
#[derive(Debug)]
pub struct Batch {
    resources: Vec<Arc<Resource>>,
    flavor: BatchFlavor,
    entries: Bytes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BatchFlavor {
    Sotw,
    Delta,
}

impl Batch {
    /// The entries of a SotW response.
    pub fn sotw(resources: Vec<Arc<Resource>>) -> Batch {
        Batch::encode(resources, BatchFlavor::Sotw)
    }

    /// The entries of a Delta response.
    pub fn delta(resources: Vec<Arc<Resource>>) -> Batch {
        Batch::encode(resources, BatchFlavor::Delta)
    }

    fn encode(resources: Vec<Arc<Resource>>, flavor: BatchFlavor) -> Batch {
        let len = match flavor {
            BatchFlavor::Sotw => sotw_entries_len(&resources),
            BatchFlavor::Delta => delta_entries_len(&resources),
        };
        let mut buf = BytesMut::with_capacity(len);
        let mut sink = Copy(&mut buf);
        match flavor {
            BatchFlavor::Sotw => put_sotw_entries(&mut sink, &resources),
            BatchFlavor::Delta => put_delta_entries(&mut sink, &resources),
        }
        Batch { resources, flavor, entries: buf.freeze() }
    }

    pub fn resources(&self) -> &[Arc<Resource>] {
        &self.resources
    }

    /// The encoded entries' size.
    pub fn encoded_len(&self) -> usize {
        self.entries.len()
    }
}

fn sotw_entries_len(resources: &[Arc<Resource>]) -> usize {
    resources.iter().map(|x| len_field(2, x.body.len())).sum()
}

fn delta_entries_len(resources: &[Arc<Resource>]) -> usize {
    resources.iter().map(|x| len_field(2, delta_resource_len(x))).sum()
}

fn put_sotw_entries(sink: &mut impl Sink, resources: &[Arc<Resource>]) {
    for x in resources {
        sink.put_header(2, x.body.len());
        sink.put_shared(&x.body);
    }
}

fn put_delta_entries(sink: &mut impl Sink, resources: &[Arc<Resource>]) {
    for x in resources {
        sink.put_header(2, delta_resource_len(x));
        // envoy.service.discovery.v3.Resource { version = 1, resource = 2, name = 3 }
        sink.put_str(1, &x.version);
        sink.put_header(2, x.body.len());
        sink.put_shared(&x.body);
        sink.put_str(3, &x.name);
    }
}

impl Payload {
    fn sotw_len(&self) -> usize {
        match self {
            Payload::Batch(b) if b.flavor == BatchFlavor::Sotw => b.entries.len(),
            p => sotw_entries_len(p.resources()),
        }
    }

    fn delta_len(&self) -> usize {
        match self {
            Payload::Batch(b) if b.flavor == BatchFlavor::Delta => b.entries.len(),
            p => delta_entries_len(p.resources()),
        }
    }

    fn put_sotw(&self, sink: &mut impl Sink) {
        match self {
            Payload::Batch(b) if b.flavor == BatchFlavor::Sotw => sink.put_shared(&b.entries),
            p => put_sotw_entries(sink, p.resources()),
        }
    }

    fn put_delta(&self, sink: &mut impl Sink) {
        match self {
            Payload::Batch(b) if b.flavor == BatchFlavor::Delta => sink.put_shared(&b.entries),
            p => put_delta_entries(sink, p.resources()),
        }
    }
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
            // (a fresh chunk: the previous one was flushed, or it was sized for a small response)
            self.cur.reserve((CHUNK / 4).max(b.len()));
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
                    + r.resources.sotw_len()
                    + str_len(4, r.type_url)
                    + str_len(5, &r.nonce)
                    + len_field(SOTW_CONTROL_PLANE_TAG, control_plane().len())
            }
            Response::Delta(r) => {
                str_len(1, &r.system_version_info)
                    + r.resources.delta_len()
                    + str_len(4, r.type_url)
                    + str_len(5, &r.nonce)
                    + r.removed_resources.iter().map(|n| len_field(6, n.len())).sum::<usize>()
                    + len_field(DELTA_CONTROL_PLANE_TAG, control_plane().len())
            }
            Response::Raw(b) => b.len(),
        }
    }

    fn write(&self, sink: &mut impl Sink) {
        match self {
            Response::Sotw(r) => {
                sink.put_str(1, &r.version_info);
                r.resources.put_sotw(sink);
                sink.put_str(4, r.type_url);
                sink.put_str(5, &r.nonce);
                sink.put_header(SOTW_CONTROL_PLANE_TAG, control_plane().len());
                sink.put(control_plane());
            }
            Response::Delta(r) => {
                sink.put_str(1, &r.system_version_info);
                r.resources.put_delta(sink);
                sink.put_str(4, r.type_url);
                sink.put_str(5, &r.nonce);
                // every removed name is written, an empty one too (a repeated field keeps empty entries)
                for n in &r.removed_resources {
                    sink.put_header(6, n.len());
                    sink.put(n.as_bytes());
                }
                sink.put_header(DELTA_CONTROL_PLANE_TAG, control_plane().len());
                sink.put(control_plane());
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
        let len = self.encoded_len();
        // a small response is one chunk of its size; a large one is gathered in chunks of at most CHUNK
        let mut c = Chunks { cur: BytesMut::with_capacity((len + 5).min(CHUNK)), out };
        let mut prefix = [0u8; 5];
        prefix[1..].copy_from_slice(&(len as u32).to_be_bytes());
        c.put(&prefix);
        self.write(&mut c);
        c.flush();
    }
}

fn delta_resource_len(r: &Resource) -> usize {
    str_len(1, &r.version) + len_field(2, r.body.len()) + str_len(3, &r.name)
}

/// A SotW `DiscoveryRequest` whose resource names are fingerprinted in place and decoded only on demand.
#[derive(Clone, Debug, Default)]
pub struct SotwRequest {
    /// every field but `resource_names`
    pub head: DiscoveryRequest,
    names: Names,
    /// a hash of the names as encoded, in order ([`encoded_names_fingerprint`]): equal for a request that
    /// repeats the same list
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
/// The key of a `resource_names` entry: field 3, length-delimited.
const NAMES_KEY: u8 = (NAMES_TAG as u8) << 3 | 2;

/// Walks the run of `resource_names` entries at the start of `b`: (bytes they take, how many, whether
/// one is `*`).
fn walk_names(b: &[u8]) -> Result<(usize, usize, bool), Error> {
    let (mut at, mut count, mut star) = (0usize, 0usize, false);
    while b.get(at) == Some(&NAMES_KEY) {
        at += 1;
        let mut len = 0usize;
        let mut shift = 0;
        loop {
            let byte = *b.get(at).ok_or(Error::Truncated)?;
            at += 1;
            if shift > 28 {
                return Err(Error::Truncated);
            }
            len |= usize::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                break;
            }
            shift += 7;
        }
        let name = b.get(at..at + len).ok_or(Error::Truncated)?;
        star |= name == b"*";
        at += len;
        count += 1;
    }
    Ok((at, count, star))
}

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
    /// Reads an encoded `DiscoveryRequest`. The names are only walked: the runs of their encoded entries
    /// are hashed as they are (one pass over the bytes, no allocation).
    pub fn decode(raw: Bytes) -> Result<SotwRequest, Error> {
        let mut head = DiscoveryRequest::default();
        let mut buf = raw.clone();
        let (mut count, mut has_star) = (0usize, false);
        // the runs of name entries, as offsets in `raw`
        let mut runs: Vec<(usize, usize)> = Vec::new();
        while buf.has_remaining() {
            let at = raw.len() - buf.remaining();
            if buf.chunk()[0] == NAMES_KEY {
                // a run of names: walked in place (key, one- or multi-byte length, bytes)
                let (end, n, star) = walk_names(&raw[at..])?;
                count += n;
                has_star |= star;
                runs.push((at, at + end));
                buf.advance(end);
                continue;
            }
            let (tag, wire_type) = decode_key(&mut buf)?;
            head.merge_field(tag, wire_type, &mut buf, DecodeContext::default())?;
        }
        let fingerprint = match runs.as_slice() {
            [] => xxhash_rust::xxh3::xxh3_64(&[]),
            [(a, b)] => xxhash_rust::xxh3::xxh3_64(&raw[*a..*b]),
            more => {
                let mut hasher = xxhash_rust::xxh3::Xxh3::new();
                for (a, b) in more {
                    hasher.update(&raw[*a..*b]);
                }
                hasher.digest()
            }
        };
        let names = if count == 0 { Names::None } else { Names::Raw(raw) };
        Ok(SotwRequest { head, names, names_fingerprint: fingerprint, name_count: count, has_star })
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

/// The fingerprint [`SotwRequest::decode`] computes for these names.
pub fn encoded_names_fingerprint<S: AsRef<str>>(names: &[S]) -> u64 {
    let mut encoded = Vec::new();
    for n in names {
        encode_key(NAMES_TAG, WireType::LengthDelimited, &mut encoded);
        encode_varint(n.as_ref().len() as u64, &mut encoded);
        encoded.extend_from_slice(n.as_ref().as_bytes());
    }
    xxhash_rust::xxh3::xxh3_64(&encoded)
}

impl From<DiscoveryRequest> for SotwRequest {
    fn from(mut req: DiscoveryRequest) -> SotwRequest {
        let names = std::mem::take(&mut req.resource_names);
        SotwRequest {
            head: req,
            names_fingerprint: encoded_names_fingerprint(&names),
            name_count: names.len(),
            has_star: names.iter().any(|n| n == "*"),
            names: if names.is_empty() { Names::None } else { Names::Decoded(names) },
        }
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
            resources: vec![res("a"), res("b")].into(),
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
        // istioctl reads which control plane answered from the identifier's JSON
        let id: serde_json::Value = serde_json::from_str(&d.control_plane.unwrap().identifier).unwrap();
        assert_eq!(id["Component"], "meshfed");
        assert!(id["ID"].as_str().is_some_and(|s| !s.is_empty()));
        assert_eq!(id["Info"]["version"], env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn delta_envelope_decodes_as_prost() {
        let a = res("a");
        let r = Response::Delta(DeltaResponse {
            system_version_info: String::new(),
            type_url: crate::type_url::ENDPOINT,
            nonce: "1".into(),
            resources: vec![a.clone()].into(),
            removed_resources: vec!["gone".into()],
        });
        let bytes = r.encode_to_vec();
        assert_eq!(bytes.len(), r.encoded_len());
        let d = DeltaDiscoveryResponse::decode(&bytes[..]).unwrap();
        assert_eq!(d.resources[0].name, "a");
        assert_eq!(d.resources[0].version, &*a.version);
        assert_eq!(d.resources[0].resource.as_ref().unwrap().type_url, crate::type_url::ENDPOINT);
        assert_eq!(d.removed_resources, ["gone"]);
        assert_eq!(d.control_plane, Some(control_plane_message()));
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
            resources: vec![res("a"), large.clone(), res("b")].into(),
        });
        let delta = Response::Delta(DeltaResponse {
            system_version_info: String::new(),
            type_url: crate::type_url::ENDPOINT,
            nonce: "4".into(),
            resources: vec![large.clone(), res("c")].into(),
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
            resources: vec![large.clone()].into(),
        })
        .grpc_chunks(&mut chunks);
        assert!(chunks.iter().any(|c| c.as_ptr() == large.body.as_ptr() && c.len() == large.body.len()));
    }

    #[test]
    fn a_batch_is_written_as_the_same_message_from_one_shared_block() {
        let (a, large, b) = (res("a"), big("large"), res("b"));
        let each = vec![a.clone(), large.clone(), b.clone()];
        let sotw = |resources: Payload| {
            Response::Sotw(SotwResponse {
                version_info: "v".into(),
                type_url: crate::type_url::ENDPOINT,
                nonce: "3".into(),
                resources,
            })
        };
        let delta = |resources: Payload| {
            Response::Delta(DeltaResponse {
                system_version_info: String::new(),
                type_url: crate::type_url::ENDPOINT,
                nonce: "4".into(),
                resources,
                removed_resources: vec!["gone".into()],
            })
        };
        let sotw_batch = Arc::new(Batch::sotw(each.clone()));
        let delta_batch = Arc::new(Batch::delta(each.clone()));
        for (own, batch) in [
            (sotw(each.clone().into()), sotw(Payload::Batch(sotw_batch.clone()))),
            (delta(each.clone().into()), delta(Payload::Batch(delta_batch.clone()))),
            // a batch made for the other flavor is still written right (each resource again)
            (sotw(each.clone().into()), sotw(Payload::Batch(delta_batch.clone()))),
            (delta(each.clone().into()), delta(Payload::Batch(sotw_batch.clone()))),
        ] {
            assert_eq!(batch.encoded_len(), own.encoded_len());
            assert_eq!(batch.encode_to_vec(), own.encode_to_vec());
            assert_eq!(wire(&batch), wire(&own));
        }
        // every stream writing the batch writes its one block, not a copy
        for (r, block) in [
            (sotw(Payload::Batch(sotw_batch.clone())), &sotw_batch),
            (delta(Payload::Batch(delta_batch.clone())), &delta_batch),
        ] {
            let mut chunks = VecDeque::new();
            r.grpc_chunks(&mut chunks);
            assert!(chunks.iter().any(|c| c.as_ptr() == block.entries.as_ptr() && c.len() == block.encoded_len()));
        }
        assert_eq!(sotw_batch.resources().len(), 3);
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
        assert_eq!(got.names_fingerprint, encoded_names_fingerprint(&req.resource_names));
        // the same list repeated: the same fingerprint, however the other fields change
        let mut ack = req.clone();
        ack.response_nonce = "13".into();
        ack.error_detail = None;
        assert_eq!(SotwRequest::decode(ack.encode_to_vec().into()).unwrap().names_fingerprint, got.names_fingerprint);
        // names interleaved with other fields hash as one list
        let mut split = BytesMut::new();
        for (i, n) in req.resource_names.iter().enumerate() {
            prost::encoding::string::encode(NAMES_TAG, n, &mut split);
            if i == 0 {
                prost::encoding::string::encode(5, &"12".to_string(), &mut split);
            }
        }
        assert_eq!(SotwRequest::decode(split.freeze()).unwrap().names_fingerprint, got.names_fingerprint);
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
