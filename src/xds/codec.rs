//! A gRPC codec that writes xDS responses from pre-encoded resources.
//!
//! Each resource is encoded once (as `google.protobuf.Any` bytes in the cache) and shared by every
//! stream; a response is assembled by writing the few envelope fields around those bytes, so no
//! stream ever re-encodes a resource. The wire format is exactly what prost would produce for
//! `DiscoveryResponse` / `DeltaDiscoveryResponse` (tested against prost decoding).

use std::marker::PhantomData;
use std::sync::Arc;

use bytes::{Buf, BufMut};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

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
    Raw(bytes::Bytes),
}

fn len_field(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + encoded_len_varint(len as u64) + len
}

fn str_len(tag: u32, s: &str) -> usize {
    if s.is_empty() { 0 } else { len_field(tag, s.len()) }
}

fn put_bytes(buf: &mut impl BufMut, tag: u32, b: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(b.len() as u64, buf);
    buf.put_slice(b);
}

fn put_str(buf: &mut impl BufMut, tag: u32, s: &str) {
    if !s.is_empty() {
        put_bytes(buf, tag, s.as_bytes());
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

    pub fn encode(&self, buf: &mut impl BufMut) {
        match self {
            Response::Sotw(r) => {
                put_str(buf, 1, &r.version_info);
                for x in &r.resources {
                    put_bytes(buf, 2, &x.body);
                }
                put_str(buf, 4, r.type_url);
                put_str(buf, 5, &r.nonce);
            }
            Response::Delta(r) => {
                put_str(buf, 1, &r.system_version_info);
                for x in &r.resources {
                    encode_key(2, WireType::LengthDelimited, buf);
                    encode_varint(delta_resource_len(x) as u64, buf);
                    // envoy.service.discovery.v3.Resource { version = 1, resource = 2, name = 3 }
                    put_str(buf, 1, &x.version);
                    put_bytes(buf, 2, &x.body);
                    put_str(buf, 3, &x.name);
                }
                put_str(buf, 4, r.type_url);
                put_str(buf, 5, &r.nonce);
                for n in &r.removed_resources {
                    put_bytes(buf, 6, n.as_bytes());
                }
            }
            Response::Raw(b) => buf.put_slice(b),
        }
    }

    pub fn encode_to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode(&mut v);
        v
    }
}

fn delta_resource_len(r: &Resource) -> usize {
    str_len(1, &r.version) + len_field(2, r.body.len()) + str_len(3, &r.name)
}

/// Encodes [`Response`]s, decodes requests of type `Req` with prost.
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
}
