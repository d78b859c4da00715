//! Canonical (deterministic) protobuf encoding of Envoy resources.
//!
//! prost encodes `map<..>` fields from a `std::collections::HashMap`, whose iteration order is random per
//! process, so the same resource can encode to different bytes in two meshfed processes (and so get two
//! versions). [`canonicalize`] rewrites encoded bytes so that every map field's entries appear sorted by key,
//! recursively: inside nested messages, inside map values and inside `google.protobuf.Any` values whose
//! type URL names a message in [`crate::descriptors::pool`].
//!
//! The rewrite is a single walk over the wire format driven by the message descriptors:
//! - all entries of a map field (they may be scattered) are emitted together where the first one was, sorted
//!   by key (strings and bytes by their bytes, numbers by value); a key that occurs more than once keeps only
//!   its last entry (protobuf's last-one-wins); an entry's key and value are written as prost writes them
//!   (default key or value left out, unknown fields inside an entry dropped);
//! - `google.protobuf.Any` is written `type_url` then `value`, with `value` canonicalized when its type
//!   resolves and copied as it is when it does not;
//! - message fields are walked into; a message type that can contain neither a map nor an `Any`, however
//!   deep, is copied as it is without being walked;
//! - everything else (scalars, strings, packed repeated fields, unknown fields) is copied as it is.
//!
//! Decoding the canonical bytes gives a message equal to decoding the input. Groups (wire types 3 and 4)
//! are rejected. Bytes that are copied without being walked are not validated.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::LazyLock;

use bytes::Bytes;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use prost_reflect::{DescriptorPool, Kind, MessageDescriptor};

use crate::descriptors;

const ANY: &str = "google.protobuf.Any";
/// Nesting (messages, map entries and `Any` values together) deeper than this is rejected. prost's own
/// decoder stops at 100 nested messages, not counting those inside `Any` values.
const MAX_DEPTH: u32 = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("unknown message type {0}")]
    UnknownMessage(String),
    #[error("malformed {message}: {reason}")]
    Malformed { message: String, reason: &'static str },
    #[error("malformed {message}: field {field} has wire type {wire_type}, expected {expected}")]
    WireType { message: String, field: u32, wire_type: u8, expected: u8 },
    #[error("messages nested deeper than {MAX_DEPTH} at {0}")]
    TooDeep(String),
}

/// The canonical encoding of `bytes`, an encoded `message_full_name` (e.g. `envoy.config.cluster.v3.Cluster`)
/// from [`descriptors::pool`].
pub fn canonicalize(message_full_name: &str, bytes: &[u8]) -> Result<Vec<u8>, Error> {
    let desc = descriptors::pool()
        .get_message_by_name(message_full_name)
        .ok_or_else(|| Error::UnknownMessage(message_full_name.to_owned()))?;
    canonicalize_message(&desc, bytes)
}

/// The canonical encoding of `bytes`, an encoded `desc`. `Any` values resolve in `desc`'s pool; a descriptor
/// from [`descriptors::pool`] is fastest (its types that need no rewriting are known in advance).
pub fn canonicalize_message(desc: &MessageDescriptor, bytes: &[u8]) -> Result<Vec<u8>, Error> {
    let walker = Walker::new(desc.parent_pool());
    let mut out = Vec::with_capacity(bytes.len());
    walker.message(desc, bytes, &mut out, 0)?;
    Ok(out)
}

/// The canonical encoding of `msg` itself. Falls back to prost's encoding (logged) if the canonicalizer
/// rejects it, which a message prost encoded only does past [`MAX_DEPTH`] levels of nesting.
pub fn encode_canonical<M: Message + Name>(msg: &M) -> Vec<u8> {
    let raw = msg.encode_to_vec();
    let Some(desc) = descriptors::pool().get_message_by_name(&M::full_name()) else {
        return raw;
    };
    match canonicalize_message(&desc, &raw) {
        Ok(canonical) => canonical,
        Err(err) => {
            tracing::error!(error = %err, message = %M::full_name(), "cannot canonicalize; using prost's encoding");
            raw
        }
    }
}

/// `envoy_types::util::pack_any` with a canonical `value`: use it for `Any`s nested in other messages
/// (`typed_config`, `typed_per_filter_config`, ...) so that the messages built are deterministic too.
pub fn pack_any_canonical<M: Message + Name>(msg: &M) -> Any {
    Any { type_url: M::type_url(), value: encode_canonical(msg) }
}

/// The canonical encoding of `google.protobuf.Any { type_url: M::type_url(), value: msg }`, as
/// `envoy_types::util::pack_any` would build it. Falls back to prost's encoding like [`encode_canonical`].
pub fn encode_any_canonical<M: Message + Name>(msg: &M) -> Bytes {
    let any = Any { type_url: M::type_url(), value: msg.encode_to_vec() };
    let raw = any.encode_to_vec();
    match canonicalize(ANY, &raw) {
        Ok(canonical) => Bytes::from(canonical),
        Err(err) => {
            tracing::error!(error = %err, type_url = %any.type_url, "cannot canonicalize; using prost's encoding");
            Bytes::from(raw)
        }
    }
}

/// What the walker needs to know about a message type.
#[derive(Clone, Copy, Debug)]
struct Info {
    /// the type has a map field itself
    has_map: bool,
    /// the type is `Any`, has a map field, or has a message field (however deep) of such a type
    needs_walk: bool,
}

/// [`Info`] for every message in [`descriptors::pool`], by full name.
static POOL_INFO: LazyLock<HashMap<Box<str>, Info>> = LazyLock::new(|| compute_info(descriptors::pool()));

fn compute_info(pool: &DescriptorPool) -> HashMap<Box<str>, Info> {
    let messages: Vec<MessageDescriptor> = pool.all_messages().collect();
    let index: HashMap<&str, usize> = messages.iter().enumerate().map(|(i, m)| (m.full_name(), i)).collect();
    // parents[i]: messages with a field of type i
    let mut parents: Vec<Vec<usize>> = vec![Vec::new(); messages.len()];
    let mut has_map = vec![false; messages.len()];
    let mut needs_walk = vec![false; messages.len()];
    let mut queue = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        has_map[i] = message.fields().any(|f| f.is_map());
        if has_map[i] || message.full_name() == ANY {
            needs_walk[i] = true;
            queue.push(i);
        }
        for field in message.fields() {
            if let Kind::Message(child) = field.kind()
                && let Some(&c) = index.get(child.full_name())
            {
                parents[c].push(i);
            }
        }
    }
    while let Some(i) = queue.pop() {
        for &p in &parents[i] {
            if !needs_walk[p] {
                needs_walk[p] = true;
                queue.push(p);
            }
        }
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| (Box::from(m.full_name()), Info { has_map: has_map[i], needs_walk: needs_walk[i] }))
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wire {
    Varint = 0,
    I64 = 1,
    Len = 2,
    I32 = 5,
}

/// One field occurrence on the wire.
#[derive(Clone, Copy, Debug)]
struct FieldRef<'a> {
    number: u32,
    wire: Wire,
    /// tag and payload, as on the wire
    raw: &'a [u8],
    /// varint: its bytes; fixed: its 4 or 8 bytes; length-delimited: the content without the length
    payload: &'a [u8],
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn next_field(&mut self) -> Result<Option<FieldRef<'a>>, &'static str> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let start = self.pos;
        let tag = u32::try_from(self.varint()?).map_err(|_| "tag out of range")?;
        let number = tag >> 3;
        if number == 0 {
            return Err("field number 0");
        }
        let wire = match tag & 7 {
            0 => Wire::Varint,
            1 => Wire::I64,
            2 => Wire::Len,
            5 => Wire::I32,
            3 | 4 => return Err("groups are not supported"),
            _ => return Err("invalid wire type"),
        };
        let payload = match wire {
            Wire::Varint => {
                let begin = self.pos;
                self.varint()?;
                &self.buf[begin..self.pos]
            }
            Wire::I64 => self.take(8)?,
            Wire::I32 => self.take(4)?,
            Wire::Len => {
                let len = usize::try_from(self.varint()?).map_err(|_| "length out of range")?;
                self.take(len)?
            }
        };
        Ok(Some(FieldRef { number, wire, raw: &self.buf[start..self.pos], payload }))
    }

    fn varint(&mut self) -> Result<u64, &'static str> {
        let mut value = 0u64;
        for i in 0..10 {
            let Some(&byte) = self.buf.get(self.pos) else {
                return Err("truncated varint");
            };
            self.pos += 1;
            if i == 9 && byte > 1 {
                return Err("varint overflows 64 bits");
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err("varint overflows 64 bits")
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.buf.len()).ok_or("truncated field")?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }
}

/// Decodes a varint already checked by [`Reader`].
fn varint_value(bytes: &[u8]) -> u64 {
    bytes.iter().take(10).enumerate().fold(0, |acc, (i, b)| acc | (u64::from(b & 0x7f) << (7 * i)))
}

fn varint_into(mut value: u64, buf: &mut [u8; 10]) -> usize {
    let mut n = 0;
    while value >= 0x80 {
        buf[n] = (value as u8) | 0x80;
        value >>= 7;
        n += 1;
    }
    buf[n] = value as u8;
    n + 1
}

fn put_varint(value: u64, out: &mut Vec<u8>) {
    let mut buf = [0u8; 10];
    let n = varint_into(value, &mut buf);
    out.extend_from_slice(&buf[..n]);
}

fn varint_len(value: u64) -> usize {
    varint_into(value, &mut [0u8; 10])
}

fn put_tag(number: u32, wire: Wire, out: &mut Vec<u8>) {
    put_varint((u64::from(number) << 3) | wire as u64, out);
}

fn put_len_field(number: u32, content: &[u8], out: &mut Vec<u8>) {
    put_tag(number, Wire::Len, out);
    put_varint(content.len() as u64, out);
    out.extend_from_slice(content);
}

/// Writes a length prefix and then what `write` appends to `out`. `hint` (the input's length) sizes the
/// prefix up front; the content moves only if its length needs a prefix of another size.
fn put_len_with<F>(out: &mut Vec<u8>, hint: usize, write: F) -> Result<(), Error>
where
    F: FnOnce(&mut Vec<u8>) -> Result<(), Error>,
{
    let reserved = varint_len(hint as u64);
    let len_at = out.len();
    out.resize(len_at + reserved, 0);
    let start = out.len();
    write(out)?;
    let mut prefix = [0u8; 10];
    let n = varint_into((out.len() - start) as u64, &mut prefix);
    if n == reserved {
        out[len_at..start].copy_from_slice(&prefix[..n]);
    } else {
        out.splice(len_at..start, prefix[..n].iter().copied());
    }
    Ok(())
}

fn wire_for(kind: &Kind) -> Wire {
    match kind {
        Kind::Double | Kind::Fixed64 | Kind::Sfixed64 => Wire::I64,
        Kind::Float | Kind::Fixed32 | Kind::Sfixed32 => Wire::I32,
        Kind::String | Kind::Bytes | Kind::Message(_) => Wire::Len,
        Kind::Int32
        | Kind::Int64
        | Kind::Uint32
        | Kind::Uint64
        | Kind::Sint32
        | Kind::Sint64
        | Kind::Bool
        | Kind::Enum(_) => Wire::Varint,
    }
}

/// A map key or scalar map value, normalized to the value prost decodes (so that equal keys compare equal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scalar<'a> {
    Num(u64),
    Bytes(&'a [u8]),
}

impl<'a> Scalar<'a> {
    /// `field` must have the wire type [`wire_for`] gives for `kind`; `None` is the default value.
    fn read(kind: &Kind, field: Option<&FieldRef<'a>>) -> Self {
        let wire = wire_for(kind);
        let Some(field) = field else {
            return if wire == Wire::Len { Scalar::Bytes(&[]) } else { Scalar::Num(0) };
        };
        match wire {
            Wire::Len => Scalar::Bytes(field.payload),
            Wire::I32 => Scalar::Num(field.payload.iter().rev().fold(0, |acc, &b| (acc << 8) | u64::from(b))),
            Wire::I64 => Scalar::Num(field.payload.iter().rev().fold(0, |acc, &b| (acc << 8) | u64::from(b))),
            Wire::Varint => {
                let v = varint_value(field.payload);
                Scalar::Num(match kind {
                    Kind::Bool => u64::from(v != 0),
                    // prost reads these as the low 32 bits; int32 and enums are written sign-extended
                    Kind::Int32 | Kind::Enum(_) => i64::from(v as u32 as i32) as u64,
                    Kind::Uint32 | Kind::Sint32 => u64::from(v as u32),
                    _ => v,
                })
            }
        }
    }

    fn is_default(&self) -> bool {
        matches!(self, Scalar::Num(0) | Scalar::Bytes([]))
    }

    fn write(&self, number: u32, kind: &Kind, out: &mut Vec<u8>) {
        let wire = wire_for(kind);
        put_tag(number, wire, out);
        match (*self, wire) {
            (Scalar::Bytes(bytes), _) => {
                put_varint(bytes.len() as u64, out);
                out.extend_from_slice(bytes);
            }
            (Scalar::Num(n), Wire::I32) => out.extend_from_slice(&(n as u32).to_le_bytes()),
            (Scalar::Num(n), Wire::I64) => out.extend_from_slice(&n.to_le_bytes()),
            (Scalar::Num(n), _) => put_varint(n, out),
        }
    }
}

fn malformed(desc: &MessageDescriptor, reason: &'static str) -> Error {
    Error::Malformed { message: desc.full_name().to_owned(), reason }
}

fn wire_type_error(desc: &MessageDescriptor, field: &FieldRef<'_>, expected: Wire) -> Error {
    Error::WireType {
        message: desc.full_name().to_owned(),
        field: field.number,
        wire_type: field.wire as u8,
        expected: expected as u8,
    }
}

/// All entries of one map field, in wire order; taken when the field is emitted.
struct MapField<'a> {
    number: u32,
    entries: Option<Vec<&'a [u8]>>,
}

struct Walker<'p> {
    pool: &'p DescriptorPool,
    /// `pool` is [`descriptors::pool`], so [`POOL_INFO`] applies
    known_pool: bool,
}

impl<'p> Walker<'p> {
    fn new(pool: &'p DescriptorPool) -> Self {
        Walker { pool, known_pool: pool == descriptors::pool() }
    }

    fn info(&self, desc: &MessageDescriptor) -> Info {
        if self.known_pool
            && let Some(info) = POOL_INFO.get(desc.full_name())
        {
            return *info;
        }
        Info { has_map: desc.fields().any(|f| f.is_map()), needs_walk: true }
    }

    fn message(&self, desc: &MessageDescriptor, input: &[u8], out: &mut Vec<u8>, depth: u32) -> Result<(), Error> {
        if depth > MAX_DEPTH {
            return Err(Error::TooDeep(desc.full_name().to_owned()));
        }
        if desc.full_name() == ANY {
            return self.any(desc, input, out, depth);
        }
        let mut maps = if self.info(desc).has_map { collect_maps(desc, input)? } else { Vec::new() };
        let mut reader = Reader::new(input);
        while let Some(field) = reader.next_field().map_err(|reason| malformed(desc, reason))? {
            let Some(fd) = desc.get_field(field.number) else {
                out.extend_from_slice(field.raw);
                continue;
            };
            if fd.is_map() {
                // collect_maps checked the wire type and holds every entry; emit them at the first one
                if let Some(entries) = maps.iter_mut().find(|m| m.number == field.number).and_then(|m| m.entries.take())
                {
                    self.map(desc, &fd, entries, out, depth)?;
                }
                continue;
            }
            match fd.kind() {
                Kind::Message(sub) => {
                    if field.wire != Wire::Len {
                        return Err(wire_type_error(desc, &field, Wire::Len));
                    }
                    if self.info(&sub).needs_walk {
                        put_tag(field.number, Wire::Len, out);
                        put_len_with(out, field.payload.len(), |out| {
                            self.message(&sub, field.payload, out, depth + 1)
                        })?;
                    } else {
                        out.extend_from_slice(field.raw);
                    }
                }
                _ => out.extend_from_slice(field.raw),
            }
        }
        Ok(())
    }

    fn map(
        &self,
        desc: &MessageDescriptor,
        fd: &prost_reflect::FieldDescriptor,
        entries: Vec<&[u8]>,
        out: &mut Vec<u8>,
        depth: u32,
    ) -> Result<(), Error> {
        let Kind::Message(entry) = fd.kind() else {
            return Err(malformed(desc, "map field without an entry message"));
        };
        let (Some(key_fd), Some(value_fd)) = (entry.get_field(1), entry.get_field(2)) else {
            return Err(malformed(&entry, "map entry without key or value field"));
        };
        let (key_kind, value_kind) = (key_fd.kind(), value_fd.kind());
        let mut scratch = Vec::new();
        let mut items: Vec<(Scalar<'_>, Range<usize>)> = Vec::with_capacity(entries.len());
        for payload in entries {
            let start = scratch.len();
            let key = self.map_entry(&entry, &key_kind, &value_kind, payload, &mut scratch, depth + 1)?;
            items.push((key, start..scratch.len()));
        }
        // stable: entries with equal keys stay in wire order, and the last of each run wins
        items.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (key, range)) in items.iter().enumerate() {
            if items.get(i + 1).is_some_and(|next| next.0 == *key) {
                continue;
            }
            put_len_field(fd.number(), &scratch[range.clone()], out);
        }
        Ok(())
    }

    /// Writes the canonical content of one map entry to `out` and returns its key.
    fn map_entry<'a>(
        &self,
        entry: &MessageDescriptor,
        key_kind: &Kind,
        value_kind: &Kind,
        input: &'a [u8],
        out: &mut Vec<u8>,
        depth: u32,
    ) -> Result<Scalar<'a>, Error> {
        if depth > MAX_DEPTH {
            return Err(Error::TooDeep(entry.full_name().to_owned()));
        }
        let (key_wire, value_wire) = (wire_for(key_kind), wire_for(value_kind));
        let mut key = None;
        let mut value = None;
        // a message value given more than once is merged, as its encodings concatenated
        let mut value_parts: Vec<&[u8]> = Vec::new();
        let mut reader = Reader::new(input);
        while let Some(field) = reader.next_field().map_err(|reason| malformed(entry, reason))? {
            match field.number {
                1 if field.wire != key_wire => return Err(wire_type_error(entry, &field, key_wire)),
                1 => key = Some(field),
                2 if field.wire != value_wire => return Err(wire_type_error(entry, &field, value_wire)),
                2 => {
                    value = Some(field);
                    value_parts.push(field.payload);
                }
                // prost ignores unknown fields in map entries
                _ => {}
            }
        }
        let key = Scalar::read(key_kind, key.as_ref());
        if !key.is_default() {
            key.write(1, key_kind, out);
        }
        match value_kind {
            Kind::Message(value_desc) => {
                let merged;
                let content = match value_parts.as_slice() {
                    [] => return Ok(key),
                    [one] => *one,
                    parts => {
                        merged = parts.concat();
                        merged.as_slice()
                    }
                };
                let mark = out.len();
                put_tag(2, Wire::Len, out);
                if self.info(value_desc).needs_walk {
                    put_len_with(out, content.len(), |out| self.message(value_desc, content, out, depth + 1))?;
                } else {
                    put_varint(content.len() as u64, out);
                    out.extend_from_slice(content);
                }
                // an empty message value decodes like an absent one; prost leaves it out
                if out.len() == mark + 2 {
                    out.truncate(mark);
                }
            }
            _ => {
                let value = Scalar::read(value_kind, value.as_ref());
                if !value.is_default() {
                    value.write(2, value_kind, out);
                }
            }
        }
        Ok(key)
    }

    fn any(&self, desc: &MessageDescriptor, input: &[u8], out: &mut Vec<u8>, depth: u32) -> Result<(), Error> {
        let mut type_url: &[u8] = &[];
        let mut value: &[u8] = &[];
        let mut others = false;
        let mut reader = Reader::new(input);
        while let Some(field) = reader.next_field().map_err(|reason| malformed(desc, reason))? {
            match field.number {
                1 | 2 if field.wire != Wire::Len => return Err(wire_type_error(desc, &field, Wire::Len)),
                1 => type_url = field.payload,
                2 => value = field.payload,
                _ => others = true,
            }
        }
        if !type_url.is_empty() {
            put_len_field(1, type_url, out);
        }
        if !value.is_empty() {
            let target = std::str::from_utf8(type_url)
                .ok()
                .and_then(|url| self.pool.get_message_by_name(descriptors::type_url_message_name(url)))
                .filter(|target| self.info(target).needs_walk);
            match target {
                Some(target) => {
                    let mark = out.len();
                    put_tag(2, Wire::Len, out);
                    put_len_with(out, value.len(), |out| self.message(&target, value, out, depth + 1))?;
                    if out.len() == mark + 2 {
                        out.truncate(mark);
                    }
                }
                None => put_len_field(2, value, out),
            }
        }
        if others {
            // not part of Any as prost knows it; kept in their order after the known fields
            let mut reader = Reader::new(input);
            while let Some(field) = reader.next_field().map_err(|reason| malformed(desc, reason))? {
                if field.number > 2 {
                    out.extend_from_slice(field.raw);
                }
            }
        }
        Ok(())
    }
}

/// Every entry of every map field of `desc` in `input`, by field, in wire order.
fn collect_maps<'a>(desc: &MessageDescriptor, input: &'a [u8]) -> Result<Vec<MapField<'a>>, Error> {
    let numbers: Vec<u32> = desc.fields().filter(|f| f.is_map()).map(|f| f.number()).collect();
    let mut maps: Vec<MapField<'a>> = Vec::new();
    let mut reader = Reader::new(input);
    while let Some(field) = reader.next_field().map_err(|reason| malformed(desc, reason))? {
        if !numbers.contains(&field.number) {
            continue;
        }
        if field.wire != Wire::Len {
            return Err(wire_type_error(desc, &field, Wire::Len));
        }
        match maps.iter_mut().find(|m| m.number == field.number) {
            Some(map) => map.entries.get_or_insert_with(Vec::new).push(field.payload),
            None => maps.push(MapField { number: field.number, entries: Some(vec![field.payload]) }),
        }
    }
    Ok(maps)
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::core::v3::{HttpProtocolOptions as CoreHttpProtocolOptions, Metadata};
    use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
    use envoy_types::pb::envoy::config::route::v3::{Route, RouteConfiguration, VirtualHost};
    use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, HttpFilter, http_connection_manager::RouteSpecifier, http_filter,
    };
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
    use envoy_types::pb::google::protobuf::{Duration, ListValue, Struct, Value, value};
    use envoy_types::util::pack_any;
    use prost_reflect::DynamicMessage;

    use super::*;

    const STRUCT: &str = "google.protobuf.Struct";
    const CLUSTER: &str = "envoy.config.cluster.v3.Cluster";
    const LISTENER: &str = "envoy.config.listener.v3.Listener";
    const HCM: &str = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn shuffle<T>(&mut self, items: &mut [T]) {
            for i in (1..items.len()).rev() {
                items.swap(i, self.below(i + 1));
            }
        }
    }

    fn string(s: &str) -> Value {
        Value { kind: Some(value::Kind::StringValue(s.to_owned())) }
    }

    fn number(n: f64) -> Value {
        Value { kind: Some(value::Kind::NumberValue(n)) }
    }

    /// A Struct with the same content every time, its keys inserted in an order chosen by `seed` into
    /// HashMaps with fresh random hashers.
    fn sample_struct(seed: u64) -> Struct {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut keys: Vec<usize> = (0..24).collect();
        rng.shuffle(&mut keys);
        let mut fields = HashMap::new();
        for k in keys {
            let value = match k % 4 {
                0 => string(&format!("value-{k}")),
                1 => number(k as f64),
                2 => Value { kind: Some(value::Kind::BoolValue(k % 3 == 0)) },
                _ => {
                    let mut inner: Vec<usize> = (0..6).collect();
                    rng.shuffle(&mut inner);
                    let inner = inner.into_iter().map(|i| (format!("inner-{i}"), string(&i.to_string()))).collect();
                    let nested = Value { kind: Some(value::Kind::StructValue(Struct { fields: inner })) };
                    Value { kind: Some(value::Kind::ListValue(ListValue { values: vec![nested, number(1.5)] })) }
                }
            };
            fields.insert(format!("key-{k:02}"), value);
        }
        Struct { fields }
    }

    fn istio_metadata(seed: u64) -> Metadata {
        let mut rng = Rng(seed | 1);
        let mut istio = vec![
            ("services", string("reviews.default.svc.cluster.local")),
            ("default_original_port", number(9080.0)),
            ("subset", string("v1")),
            ("config", string("/apis/networking.istio.io/v1/namespaces/default/destination-rule/reviews")),
            ("alpn_override", string("false")),
        ];
        rng.shuffle(&mut istio);
        let istio = Struct { fields: istio.into_iter().map(|(k, v)| (k.to_owned(), v)).collect() };
        let tls_match = Struct { fields: [("tlsMode".to_owned(), string("istio"))].into_iter().collect() };
        let mut filter_metadata =
            vec![("istio".to_owned(), istio), ("envoy.transport_socket_match".to_owned(), tls_match)];
        rng.shuffle(&mut filter_metadata);
        let typed_filter_metadata = [("meshfed".to_owned(), pack_any(sample_struct(seed)))].into_iter().collect();
        Metadata { filter_metadata: filter_metadata.into_iter().collect(), typed_filter_metadata }
    }

    fn sample_cluster(seed: u64) -> Cluster {
        let http_options = HttpProtocolOptions {
            common_http_protocol_options: Some(CoreHttpProtocolOptions {
                idle_timeout: Some(Duration { seconds: 3600, nanos: 0 }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut options = vec![
            ("envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_owned(), pack_any(http_options)),
            ("meshfed.test.struct".to_owned(), pack_any(sample_struct(seed + 1000))),
            ("meshfed.test.empty".to_owned(), pack_any(Struct::default())),
        ];
        Rng(seed | 1).shuffle(&mut options);
        Cluster {
            name: "outbound|9080||reviews.default.svc.cluster.local".to_owned(),
            metadata: Some(istio_metadata(seed)),
            typed_extension_protocol_options: options.into_iter().collect(),
            ..Default::default()
        }
    }

    fn sample_hcm(seed: u64) -> HttpConnectionManager {
        let mut per_filter = vec![
            ("envoy.filters.http.router".to_owned(), pack_any(Router::default())),
            ("meshfed.a".to_owned(), pack_any(sample_struct(seed))),
            ("meshfed.b".to_owned(), pack_any(sample_struct(seed + 7))),
            ("meshfed.c".to_owned(), pack_any(Struct::default())),
        ];
        Rng(seed | 1).shuffle(&mut per_filter);
        let route = Route {
            name: "default".to_owned(),
            typed_per_filter_config: per_filter.into_iter().collect(),
            metadata: Some(istio_metadata(seed + 3)),
            ..Default::default()
        };
        let route_config = RouteConfiguration {
            name: "9080".to_owned(),
            virtual_hosts: vec![VirtualHost {
                name: "reviews.default.svc.cluster.local:9080".to_owned(),
                domains: vec!["reviews".to_owned(), "reviews.default.svc.cluster.local".to_owned()],
                routes: vec![route],
                ..Default::default()
            }],
            ..Default::default()
        };
        HttpConnectionManager {
            stat_prefix: "inbound_0.0.0.0_9080".to_owned(),
            route_specifier: Some(RouteSpecifier::RouteConfig(route_config)),
            http_filters: vec![HttpFilter {
                name: "envoy.filters.http.router".to_owned(),
                config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(Router::default()))),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn sample_listener(seed: u64) -> Listener {
        Listener {
            name: "0.0.0.0_9080".to_owned(),
            metadata: Some(istio_metadata(seed)),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "envoy.filters.network.http_connection_manager".to_owned(),
                    config_type: Some(filter::ConfigType::TypedConfig(pack_any(sample_hcm(seed)))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// The message as JSON, `Any`s unpacked: equal JSON means equal content, whatever the map orders.
    fn json(name: &str, bytes: &[u8]) -> serde_json::Value {
        let desc = descriptors::pool().get_message_by_name(name).expect("known message");
        let message = DynamicMessage::decode(desc, bytes).expect("decodes");
        serde_json::to_value(&message).expect("serializes")
    }

    fn canonical(name: &str, bytes: &[u8]) -> Vec<u8> {
        let out = canonicalize(name, bytes).expect("canonicalizes");
        assert_eq!(canonicalize(name, &out).expect("canonicalizes again"), out, "not idempotent");
        out
    }

    /// Encoded map entries: field `number` entries with a string key and a `google.protobuf.Value` string value.
    fn entry(number: u32, key: &str, val: &str) -> Vec<u8> {
        let mut content = Vec::new();
        put_len_field(1, key.as_bytes(), &mut content);
        put_len_field(2, &string(val).encode_to_vec(), &mut content);
        let mut out = Vec::new();
        put_len_field(number, &content, &mut out);
        out
    }

    /// (field number, payload) of each top-level field.
    fn fields(bytes: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut reader = Reader::new(bytes);
        let mut out = Vec::new();
        while let Some(field) = reader.next_field().expect("well formed") {
            out.push((field.number, field.payload.to_vec()));
        }
        out
    }

    fn struct_keys(bytes: &[u8]) -> Vec<String> {
        fields(bytes)
            .into_iter()
            .map(|(_, entry)| {
                let (number, key) = fields(&entry).into_iter().next().expect("entry has a key");
                assert_eq!(number, 1);
                String::from_utf8(key).expect("utf-8 key")
            })
            .collect()
    }

    #[test]
    fn struct_canonical_encoding_is_deterministic() {
        let reference = sample_struct(0);
        let mut raws = HashSet::new();
        let mut canonicals = HashSet::new();
        for seed in 0..64 {
            let s = sample_struct(seed);
            assert_eq!(s, reference);
            let raw = s.encode_to_vec();
            let out = canonical(STRUCT, &raw);
            assert_eq!(out.len(), raw.len());
            assert_eq!(Struct::decode(out.as_slice()).expect("decodes"), s);
            raws.insert(raw);
            canonicals.insert(out);
        }
        assert!(raws.len() > 1, "prost encodings never differed: the test shows nothing");
        assert_eq!(canonicals.len(), 1);
        let out = canonicals.into_iter().next().expect("one");
        let keys = struct_keys(&out);
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(keys.len(), 24);
    }

    #[test]
    fn map_entries_are_sorted_and_last_duplicate_wins() {
        let raw = [entry(1, "b", "first b"), entry(1, "a", "a"), entry(1, "c", "c"), entry(1, "b", "last b")].concat();
        let out = canonical(STRUCT, &raw);
        assert_eq!(out, [entry(1, "a", "a"), entry(1, "b", "last b"), entry(1, "c", "c")].concat());
        assert_eq!(Struct::decode(out.as_slice()).expect("decodes"), Struct::decode(raw.as_slice()).expect("decodes"));
    }

    #[test]
    fn scattered_map_entries_are_gathered_at_the_first() {
        // Metadata: filter_metadata = 1, typed_filter_metadata = 2; a Struct value here is empty
        let empty_struct_entry = |key: &str| {
            let mut content = Vec::new();
            put_len_field(1, key.as_bytes(), &mut content);
            let mut out = Vec::new();
            put_len_field(1, &content, &mut out);
            out
        };
        let typed = {
            let any = Any { type_url: Struct::type_url(), value: Vec::new() };
            let mut content = Vec::new();
            put_len_field(1, b"t", &mut content);
            put_len_field(2, &any.encode_to_vec(), &mut content);
            let mut out = Vec::new();
            put_len_field(2, &content, &mut out);
            out
        };
        let raw = [empty_struct_entry("z"), typed.clone(), empty_struct_entry("y")].concat();
        let out = canonical("envoy.config.core.v3.Metadata", &raw);
        assert_eq!(out, [empty_struct_entry("y"), empty_struct_entry("z"), typed].concat());
        assert_eq!(
            Metadata::decode(out.as_slice()).expect("decodes"),
            Metadata::decode(raw.as_slice()).expect("decodes")
        );
    }

    #[test]
    fn default_keys_and_values_are_written_as_prost_writes_them() {
        // an entry with an explicit empty key and an explicit empty value message
        let mut content = Vec::new();
        put_len_field(1, b"", &mut content);
        put_len_field(2, b"", &mut content);
        let mut raw = Vec::new();
        put_len_field(1, &content, &mut raw);
        let out = canonical(STRUCT, &raw);
        let expected = Struct { fields: [(String::new(), Value::default())].into_iter().collect() }.encode_to_vec();
        assert_eq!(out, expected);
    }

    #[test]
    fn cluster_canonical_encoding_is_deterministic() {
        let reference_json = json(CLUSTER, &sample_cluster(0).encode_to_vec());
        let mut raws = HashSet::new();
        let mut canonicals = HashSet::new();
        for seed in 0..50 {
            let cluster = sample_cluster(seed);
            let raw = cluster.encode_to_vec();
            let out = canonical(CLUSTER, &raw);
            assert_eq!(json(CLUSTER, &out), reference_json);
            let decoded = Cluster::decode(out.as_slice()).expect("decodes");
            // everything but Any values is equal as decoded; Any values are equal as unpacked (JSON above)
            assert_eq!(decoded.name, cluster.name);
            let metadata = decoded.metadata.as_ref().expect("metadata");
            assert_eq!(metadata.filter_metadata, cluster.metadata.as_ref().expect("metadata").filter_metadata);
            assert_eq!(
                decoded.typed_extension_protocol_options.keys().collect::<HashSet<_>>(),
                cluster.typed_extension_protocol_options.keys().collect::<HashSet<_>>()
            );
            raws.insert(raw);
            canonicals.insert(out);
        }
        assert!(raws.len() > 1, "prost encodings never differed: the test shows nothing");
        assert_eq!(canonicals.len(), 1);
    }

    #[test]
    fn decoding_the_canonical_encoding_gives_the_original_when_its_anys_are_canonical() {
        let mut cluster = sample_cluster(5);
        for any in cluster.typed_extension_protocol_options.values_mut() {
            any.value = canonicalize(descriptors::type_url_message_name(&any.type_url), &any.value).expect("ok");
        }
        let metadata = cluster.metadata.as_mut().expect("metadata");
        metadata.typed_filter_metadata =
            [("meshfed".to_owned(), pack_any_canonical(&sample_struct(5)))].into_iter().collect();
        let out = canonical(CLUSTER, &cluster.encode_to_vec());
        assert_eq!(Cluster::decode(out.as_slice()).expect("decodes"), cluster);
        assert_eq!(out, encode_canonical(&cluster));
    }

    #[test]
    fn listener_with_hcm_in_any_is_canonical_inside_the_any() {
        let reference_json = json(LISTENER, &sample_listener(0).encode_to_vec());
        let mut raws = HashSet::new();
        let mut canonicals = HashSet::new();
        for seed in 0..32 {
            let listener = sample_listener(seed);
            let raw = listener.encode_to_vec();
            let out = canonical(LISTENER, &raw);
            assert_eq!(json(LISTENER, &out), reference_json);
            let decoded = Listener::decode(out.as_slice()).expect("decodes");
            let Some(filter::ConfigType::TypedConfig(any)) = &decoded.filter_chains[0].filters[0].config_type else {
                panic!("typed_config lost");
            };
            assert_eq!(any.type_url, HttpConnectionManager::type_url());
            let hcm = sample_hcm(seed);
            assert_eq!(any.value, canonical(HCM, &hcm.encode_to_vec()), "HCM inside the Any is not canonical");
            let decoded_hcm = HttpConnectionManager::decode(any.value.as_slice()).expect("decodes");
            assert_eq!(decoded_hcm.stat_prefix, hcm.stat_prefix);
            assert_eq!(decoded_hcm.http_filters, hcm.http_filters);
            let Some(RouteSpecifier::RouteConfig(routes)) = &decoded_hcm.route_specifier else {
                panic!("route_config lost");
            };
            let route = &routes.virtual_hosts[0].routes[0];
            assert_eq!(route.typed_per_filter_config.len(), 4);
            for (name, any) in &route.typed_per_filter_config {
                assert_eq!(
                    any.value,
                    canonical(descriptors::type_url_message_name(&any.type_url), &any.value),
                    "{name}"
                );
            }
            raws.insert(raw);
            canonicals.insert(out);
        }
        assert!(raws.len() > 1, "prost encodings never differed: the test shows nothing");
        assert_eq!(canonicals.len(), 1);
    }

    #[test]
    fn encode_any_canonical_packs_a_canonical_value() {
        let mut outs = HashSet::new();
        for seed in 0..16 {
            let hcm = sample_hcm(seed);
            let bytes = encode_any_canonical(&hcm);
            let any = Any::decode(bytes.clone()).expect("decodes");
            assert_eq!(any.type_url, HttpConnectionManager::type_url());
            assert_eq!(any.value, canonical(HCM, &hcm.encode_to_vec()));
            assert_eq!(bytes.as_ref(), pack_any_canonical(&hcm).encode_to_vec().as_slice());
            outs.insert(bytes);
        }
        assert_eq!(outs.len(), 1);
    }

    #[test]
    fn unknown_any_type_is_copied_verbatim() {
        // maps inside (an unsorted Struct) or not protobuf at all: either way left as it is
        let unsorted = [entry(1, "b", "b"), entry(1, "a", "a")].concat();
        for value in [unsorted, vec![0xff, 0xff, 0xff], b"plain text".to_vec()] {
            let any = Any { type_url: "type.googleapis.com/meshfed.test.Unknown".to_owned(), value };
            let raw = any.encode_to_vec();
            assert_eq!(canonical(ANY, &raw), raw);
            let cluster = Cluster {
                name: "c".to_owned(),
                typed_extension_protocol_options: [("x".to_owned(), any.clone())].into_iter().collect(),
                ..Default::default()
            };
            let out = canonical(CLUSTER, &cluster.encode_to_vec());
            assert_eq!(Cluster::decode(out.as_slice()).expect("decodes").typed_extension_protocol_options["x"], any);
        }
    }

    #[test]
    fn any_fields_are_written_type_url_first() {
        let value = [entry(1, "b", "b"), entry(1, "a", "a")].concat();
        let mut raw = Vec::new();
        put_len_field(2, &value, &mut raw);
        put_len_field(1, Struct::type_url().as_bytes(), &mut raw);
        let out = canonical(ANY, &raw);
        let expected = Any { type_url: Struct::type_url(), value: [entry(1, "a", "a"), entry(1, "b", "b")].concat() }
            .encode_to_vec();
        assert_eq!(out, expected);
    }

    #[test]
    fn unknown_fields_are_copied_verbatim() {
        let mut raw = Cluster { name: "c".to_owned(), ..Default::default() }.encode_to_vec();
        // field 9999, varint 7, and field 9998, bytes "xy"
        put_tag(9999, Wire::Varint, &mut raw);
        put_varint(7, &mut raw);
        put_len_field(9998, b"xy", &mut raw);
        assert_eq!(canonical(CLUSTER, &raw), raw);
    }

    #[test]
    fn types_without_maps_or_anys_are_not_walked() {
        let info = |name: &str| POOL_INFO.get(name).copied().expect("known");
        assert!(!info("google.protobuf.Duration").needs_walk);
        assert!(!info("envoy.config.core.v3.Address").needs_walk);
        assert!(info("google.protobuf.Value").needs_walk);
        assert!(info("google.protobuf.ListValue").needs_walk);
        assert!(info("google.protobuf.Struct").has_map);
        assert!(info(CLUSTER).needs_walk);
        assert!(info(LISTENER).needs_walk);
        assert!(info(CLUSTER).has_map);
        assert!(!info("google.protobuf.Value").has_map);
    }

    #[test]
    fn unknown_message_name_is_an_error() {
        assert_eq!(canonicalize("meshfed.NoSuch", &[]), Err(Error::UnknownMessage("meshfed.NoSuch".to_owned())));
    }

    #[test]
    fn groups_and_mismatched_wire_types_are_errors() {
        // field 1 as a start group
        assert!(matches!(canonicalize(STRUCT, &[0x0b, 0x0c]), Err(Error::Malformed { .. })));
        // Struct.fields (a map) as a varint
        assert!(matches!(canonicalize(STRUCT, &[0x08, 0x01]), Err(Error::WireType { field: 1, .. })));
        // Cluster.metadata (field 25, a message) as a varint
        assert!(matches!(canonicalize(CLUSTER, &[0xc8, 0x01, 0x01]), Err(Error::WireType { field: 25, .. })));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let nest = |levels: usize| {
            let mut bytes = Vec::new();
            for _ in 0..levels {
                let mut value = Vec::new();
                put_len_field(5, &bytes, &mut value); // Value.struct_value
                let mut content = Vec::new();
                put_len_field(1, b"k", &mut content);
                put_len_field(2, &value, &mut content);
                bytes.clear();
                put_len_field(1, &content, &mut bytes);
            }
            bytes
        };
        assert!(canonicalize(STRUCT, &nest(30)).is_ok());
        assert!(matches!(canonicalize(STRUCT, &nest(1000)), Err(Error::TooDeep(_))));
    }

    #[test]
    fn truncated_encodings_are_errors() {
        let raw = sample_listener(1).encode_to_vec();
        let out = canonical(LISTENER, &raw);
        let mut boundaries = HashSet::from([0]);
        let mut reader = Reader::new(&out);
        while reader.next_field().expect("well formed").is_some() {
            boundaries.insert(reader.pos);
        }
        for cut in 0..out.len() {
            let result = canonicalize(LISTENER, &out[..cut]);
            assert_eq!(result.is_ok(), boundaries.contains(&cut), "cut at {cut}: {result:?}");
        }
        // cut inside the HCM inside the Any: the Any's value no longer parses
        let hcm = sample_hcm(1).encode_to_vec();
        let any = Any { type_url: HttpConnectionManager::type_url(), value: hcm[..hcm.len() - 1].to_vec() };
        assert!(canonicalize(ANY, &any.encode_to_vec()).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let names = [STRUCT, CLUSTER, LISTENER, HCM, ANY, "envoy.config.core.v3.Metadata", "google.protobuf.Value"];
        let mut rng = Rng(0x5eed);
        let mut ok = 0;
        for round in 0..20_000 {
            let len = rng.below(48);
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let name = names[round % names.len()];
            if let Ok(out) = canonicalize(name, &bytes) {
                ok += 1;
                assert_eq!(canonicalize(name, &out).as_ref(), Ok(&out), "not idempotent for {bytes:?}");
                if name == STRUCT
                    && let Ok(original) = Struct::decode(bytes.as_slice())
                {
                    assert_eq!(Struct::decode(out.as_slice()).expect("decodes"), original, "{bytes:?}");
                }
            }
        }
        assert!(ok > 0);
        // mutations of real encodings reach deeper into the walker
        let valid = [(CLUSTER, sample_cluster(3).encode_to_vec()), (LISTENER, sample_listener(3).encode_to_vec())];
        for round in 0..4_000 {
            let (name, original) = &valid[round % valid.len()];
            let mut bytes = original.clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(bytes.len());
                bytes[at] = rng.next() as u8;
            }
            if let Ok(out) = canonicalize(name, &bytes) {
                assert_eq!(canonicalize(name, &out).as_ref(), Ok(&out), "not idempotent");
            }
        }
    }
}
