//! Canonical (deterministic) protobuf encoding of Envoy resources.
//!
//! prost encodes `map<..>` fields from a `std::collections::HashMap`, whose iteration order is random per
//! process, so the same resource can encode to different bytes in two meshfed processes (and so get two
//! versions). [`canonicalize`] rewrites encoded bytes so that every map field's entries appear sorted by key,
//! recursively: inside nested messages, inside map values and inside `google.protobuf.Any` values whose
//! type URL names a message in [`crate::descriptors::pool`].
//!
//! The rewrite is a single walk over the wire format, driven by a plan compiled once from the descriptors:
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
//! Decoding the canonical bytes gives a message equal to decoding the input, except that `Any` values
//! hold their canonical bytes (equal once unpacked). Canonicalizing is idempotent. Groups (wire types 3 and
//! 4) are rejected. Bytes copied without being walked are not validated.

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
    let schema: &Schema = &SCHEMA;
    let message = schema.index(message_full_name).ok_or_else(|| Error::UnknownMessage(message_full_name.to_owned()))?;
    schema.canonicalize(message, bytes)
}

/// The canonical encoding of `bytes`, an encoded `desc`; `Any` values resolve in `desc`'s pool. Fast for a
/// descriptor from [`descriptors::pool`]; for any other pool the plan is compiled on every call.
pub fn canonicalize_message(desc: &MessageDescriptor, bytes: &[u8]) -> Result<Vec<u8>, Error> {
    if desc.parent_pool() == descriptors::pool() {
        return canonicalize(desc.full_name(), bytes);
    }
    let schema = Schema::compile(desc.parent_pool());
    let message = schema.index(desc.full_name()).ok_or_else(|| Error::UnknownMessage(desc.full_name().to_owned()))?;
    schema.canonicalize(message, bytes)
}

/// The canonical encoding of `msg` itself. A type the pool does not know is encoded by prost. Falls back to
/// prost's encoding (logged) if the canonicalizer rejects the bytes, which for bytes prost wrote happens only
/// past [`MAX_DEPTH`] levels of nesting.
pub fn encode_canonical<M: Message + Name>(msg: &M) -> Vec<u8> {
    let raw = msg.encode_to_vec();
    let schema: &Schema = &SCHEMA;
    let Some(message) = schema.index(&M::full_name()) else {
        return raw;
    };
    match schema.canonicalize(message, &raw) {
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

/// The plan for [`descriptors::pool`], compiled on first use.
static SCHEMA: LazyLock<Schema> = LazyLock::new(|| Schema::compile(descriptors::pool()));

/// How a map key or a scalar map value is read (prost's decoding) and written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScalarKind {
    Bool,
    /// int32 and enums: the low 32 bits, written sign-extended
    Int32,
    /// uint32 and sint32: the low 32 bits
    Uint32,
    /// int64, uint64, sint64
    Varint64,
    /// fixed32, sfixed32, float
    Fixed32,
    /// fixed64, sfixed64, double
    Fixed64,
    /// string, bytes
    Len,
}

impl ScalarKind {
    fn of(kind: &Kind) -> Option<Self> {
        Some(match kind {
            Kind::Bool => ScalarKind::Bool,
            Kind::Int32 | Kind::Enum(_) => ScalarKind::Int32,
            Kind::Uint32 | Kind::Sint32 => ScalarKind::Uint32,
            Kind::Int64 | Kind::Uint64 | Kind::Sint64 => ScalarKind::Varint64,
            Kind::Fixed32 | Kind::Sfixed32 | Kind::Float => ScalarKind::Fixed32,
            Kind::Fixed64 | Kind::Sfixed64 | Kind::Double => ScalarKind::Fixed64,
            Kind::String | Kind::Bytes => ScalarKind::Len,
            Kind::Message(_) => return None,
        })
    }

    fn wire(self) -> Wire {
        match self {
            ScalarKind::Bool | ScalarKind::Int32 | ScalarKind::Uint32 | ScalarKind::Varint64 => Wire::Varint,
            ScalarKind::Fixed32 => Wire::I32,
            ScalarKind::Fixed64 => Wire::I64,
            ScalarKind::Len => Wire::Len,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum MapValue {
    Message(usize),
    Scalar(ScalarKind),
}

impl MapValue {
    fn wire(self) -> Wire {
        match self {
            MapValue::Message(_) => Wire::Len,
            MapValue::Scalar(kind) => kind.wire(),
        }
    }
}

/// What to do with a field; fields without a plan are copied as they are.
#[derive(Clone, Copy, Debug)]
enum FieldPlan {
    /// a message field (singular or repeated): the message at this index in [`Schema::messages`]
    Message(usize),
    Map {
        key: ScalarKind,
        value: MapValue,
    },
}

#[derive(Debug)]
struct MessagePlan {
    name: Box<str>,
    is_any: bool,
    /// the type has a map field itself
    has_map: bool,
    /// the type is `Any`, has a map field, or has a message field (however deep) of such a type
    needs_walk: bool,
    /// message and map fields, by field number
    fields: Vec<(u32, FieldPlan)>,
}

impl MessagePlan {
    fn field(&self, number: u32) -> Option<FieldPlan> {
        self.fields.binary_search_by_key(&number, |&(n, _)| n).ok().map(|i| self.fields[i].1)
    }
}

/// Every message type of a descriptor pool, reduced to what the walker needs.
#[derive(Debug)]
struct Schema {
    messages: Vec<MessagePlan>,
    by_name: HashMap<Box<str>, usize>,
}

impl Schema {
    fn compile(pool: &DescriptorPool) -> Schema {
        let descs: Vec<MessageDescriptor> = pool.all_messages().collect();
        let by_name: HashMap<Box<str>, usize> =
            descs.iter().enumerate().map(|(i, m)| (Box::from(m.full_name()), i)).collect();
        let index = |m: &MessageDescriptor| by_name.get(m.full_name()).copied();
        let mut messages: Vec<MessagePlan> = descs
            .iter()
            .map(|desc| {
                let mut fields: Vec<(u32, FieldPlan)> = desc
                    .fields()
                    .filter_map(|field| {
                        let Kind::Message(sub) = field.kind() else { return None };
                        let plan = match (field.is_map(), sub.get_field(1), sub.get_field(2)) {
                            (true, Some(key), Some(value)) => FieldPlan::Map {
                                key: ScalarKind::of(&key.kind())?,
                                value: match value.kind() {
                                    Kind::Message(value) => MapValue::Message(index(&value)?),
                                    kind => MapValue::Scalar(ScalarKind::of(&kind)?),
                                },
                            },
                            _ => FieldPlan::Message(index(&sub)?),
                        };
                        Some((field.number(), plan))
                    })
                    .collect();
                fields.sort_by_key(|&(number, _)| number);
                let is_any = desc.full_name() == ANY;
                let has_map = fields.iter().any(|(_, plan)| matches!(plan, FieldPlan::Map { .. }));
                MessagePlan { name: Box::from(desc.full_name()), is_any, has_map, needs_walk: false, fields }
            })
            .collect();
        // needs_walk: reachable backwards from the types with a map or that are Any
        let mut parents: Vec<Vec<usize>> = vec![Vec::new(); messages.len()];
        let mut queue = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            if message.is_any || message.has_map {
                queue.push(i);
            }
            for &(_, plan) in &message.fields {
                match plan {
                    FieldPlan::Message(child) | FieldPlan::Map { value: MapValue::Message(child), .. } => {
                        parents[child].push(i)
                    }
                    FieldPlan::Map { value: MapValue::Scalar(_), .. } => {}
                }
            }
        }
        for &i in &queue {
            messages[i].needs_walk = true;
        }
        while let Some(i) = queue.pop() {
            for &parent in &parents[i] {
                if !messages[parent].needs_walk {
                    messages[parent].needs_walk = true;
                    queue.push(parent);
                }
            }
        }
        Schema { messages, by_name }
    }

    fn index(&self, full_name: &str) -> Option<usize> {
        self.by_name.get(full_name).copied()
    }

    fn canonicalize(&self, message: usize, bytes: &[u8]) -> Result<Vec<u8>, Error> {
        let mut out = Vec::with_capacity(bytes.len());
        self.message(message, bytes, &mut out, 0)?;
        Ok(out)
    }

    fn malformed(&self, message: usize, reason: &'static str) -> Error {
        Error::Malformed { message: self.messages[message].name.to_string(), reason }
    }

    fn wire_type_error(&self, message: usize, field: &FieldRef<'_>, expected: Wire) -> Error {
        Error::WireType {
            message: self.messages[message].name.to_string(),
            field: field.number,
            wire_type: field.wire as u8,
            expected: expected as u8,
        }
    }

    fn message(&self, message: usize, input: &[u8], out: &mut Vec<u8>, depth: u32) -> Result<(), Error> {
        let plan = &self.messages[message];
        if depth > MAX_DEPTH {
            return Err(Error::TooDeep(plan.name.to_string()));
        }
        if plan.is_any {
            return self.any(message, input, out, depth);
        }
        let mut maps = if plan.has_map { self.collect_maps(message, input)? } else { Vec::new() };
        let mut reader = Reader::new(input);
        while let Some(field) = reader.next_field().map_err(|reason| self.malformed(message, reason))? {
            match plan.field(field.number) {
                None => out.extend_from_slice(field.raw),
                Some(FieldPlan::Message(sub)) => {
                    if field.wire != Wire::Len {
                        return Err(self.wire_type_error(message, &field, Wire::Len));
                    }
                    if self.messages[sub].needs_walk {
                        put_tag(field.number, Wire::Len, out);
                        put_len_with(out, field.payload.len(), |out| self.message(sub, field.payload, out, depth + 1))?;
                    } else {
                        out.extend_from_slice(field.raw);
                    }
                }
                Some(FieldPlan::Map { key, value }) => {
                    // collect_maps checked the wire type and holds every entry: emit them all at the first
                    if let Some(entries) =
                        maps.iter_mut().find(|m| m.number == field.number).and_then(|m| m.entries.take())
                    {
                        self.map(field.number, key, value, entries, out, depth)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Every entry of every map field of `message` in `input`, by field, in wire order.
    fn collect_maps<'a>(&self, message: usize, input: &'a [u8]) -> Result<Vec<MapField<'a>>, Error> {
        let plan = &self.messages[message];
        let mut maps: Vec<MapField<'a>> = Vec::new();
        let mut reader = Reader::new(input);
        while let Some(field) = reader.next_field().map_err(|reason| self.malformed(message, reason))? {
            if !matches!(plan.field(field.number), Some(FieldPlan::Map { .. })) {
                continue;
            }
            if field.wire != Wire::Len {
                return Err(self.wire_type_error(message, &field, Wire::Len));
            }
            match maps.iter_mut().find(|m| m.number == field.number) {
                Some(map) => map.entries.get_or_insert_with(Vec::new).push(field.payload),
                None => maps.push(MapField { number: field.number, entries: Some(vec![field.payload]) }),
            }
        }
        Ok(maps)
    }

    fn map(
        &self,
        number: u32,
        key: ScalarKind,
        value: MapValue,
        entries: Vec<&[u8]>,
        out: &mut Vec<u8>,
        depth: u32,
    ) -> Result<(), Error> {
        let mut scratch = Vec::with_capacity(entries.iter().map(|e| e.len()).sum());
        let mut items: Vec<(Scalar<'_>, Range<usize>)> = Vec::with_capacity(entries.len());
        for payload in entries {
            let start = scratch.len();
            let entry_key = self.map_entry(key, value, payload, &mut scratch, depth + 1)?;
            items.push((entry_key, start..scratch.len()));
        }
        // stable: entries with equal keys stay in wire order, and the last of each run wins
        items.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (entry_key, range)) in items.iter().enumerate() {
            if items.get(i + 1).is_some_and(|next| next.0 == *entry_key) {
                continue;
            }
            put_len_field(number, &scratch[range.clone()], out);
        }
        Ok(())
    }

    /// Writes the canonical content of one map entry to `out` and returns its key.
    fn map_entry<'a>(
        &self,
        key_kind: ScalarKind,
        value_kind: MapValue,
        input: &'a [u8],
        out: &mut Vec<u8>,
        depth: u32,
    ) -> Result<Scalar<'a>, Error> {
        let entry_error = |reason| Error::Malformed { message: "map entry".to_owned(), reason };
        if depth > MAX_DEPTH {
            return Err(Error::TooDeep("map entry".to_owned()));
        }
        let (key_wire, value_wire) = (key_kind.wire(), value_kind.wire());
        let mut key = None;
        let mut value = None;
        let mut values = 0usize;
        let mut reader = Reader::new(input);
        while let Some(field) = reader.next_field().map_err(entry_error)? {
            match field.number {
                1 if field.wire != key_wire => return Err(entry_error("key has the wrong wire type")),
                1 => key = Some(field),
                2 if field.wire != value_wire => return Err(entry_error("value has the wrong wire type")),
                2 => {
                    value = Some(field);
                    values += 1;
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
            MapValue::Message(sub) => {
                let merged;
                let content = match (value, values) {
                    (None, _) => return Ok(key),
                    (Some(value), 1) => value.payload,
                    // a message value given more than once is merged, as its encodings concatenated
                    _ => {
                        merged = value_parts(input);
                        merged.as_slice()
                    }
                };
                let mark = out.len();
                put_tag(2, Wire::Len, out);
                if self.messages[sub].needs_walk {
                    put_len_with(out, content.len(), |out| self.message(sub, content, out, depth + 1))?;
                } else {
                    put_varint(content.len() as u64, out);
                    out.extend_from_slice(content);
                }
                // an empty message value decodes like an absent one; prost leaves it out
                if out.len() == mark + 2 {
                    out.truncate(mark);
                }
            }
            MapValue::Scalar(kind) => {
                let value = Scalar::read(kind, value.as_ref());
                if !value.is_default() {
                    value.write(2, kind, out);
                }
            }
        }
        Ok(key)
    }

    fn any(&self, message: usize, input: &[u8], out: &mut Vec<u8>, depth: u32) -> Result<(), Error> {
        let mut type_url: &[u8] = &[];
        let mut value: &[u8] = &[];
        let mut others = false;
        let mut reader = Reader::new(input);
        while let Some(field) = reader.next_field().map_err(|reason| self.malformed(message, reason))? {
            match field.number {
                1 | 2 if field.wire != Wire::Len => return Err(self.wire_type_error(message, &field, Wire::Len)),
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
                .and_then(|url| self.index(descriptors::type_url_message_name(url)))
                .filter(|&target| self.messages[target].needs_walk);
            match target {
                Some(target) => {
                    let mark = out.len();
                    put_tag(2, Wire::Len, out);
                    put_len_with(out, value.len(), |out| self.message(target, value, out, depth + 1))?;
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
            while let Some(field) = reader.next_field().map_err(|reason| self.malformed(message, reason))? {
                if field.number > 2 {
                    out.extend_from_slice(field.raw);
                }
            }
        }
        Ok(())
    }
}

/// The contents of all the value fields (2) of a map entry already read once, concatenated.
fn value_parts(entry: &[u8]) -> Vec<u8> {
    let mut parts = Vec::new();
    let mut reader = Reader::new(entry);
    while let Ok(Some(field)) = reader.next_field() {
        if field.number == 2 {
            parts.extend_from_slice(field.payload);
        }
    }
    parts
}

/// All entries of one map field, in wire order; taken when the field is emitted.
struct MapField<'a> {
    number: u32,
    entries: Option<Vec<&'a [u8]>>,
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

/// A map key or scalar map value, normalized to the value prost decodes (so that equal keys compare equal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scalar<'a> {
    Num(u64),
    Bytes(&'a [u8]),
}

impl<'a> Scalar<'a> {
    /// `field` must have `kind`'s wire type; `None` is the default value.
    fn read(kind: ScalarKind, field: Option<&FieldRef<'a>>) -> Self {
        let Some(field) = field else {
            return if kind == ScalarKind::Len { Scalar::Bytes(&[]) } else { Scalar::Num(0) };
        };
        let v = || varint_value(field.payload);
        match kind {
            ScalarKind::Len => Scalar::Bytes(field.payload),
            ScalarKind::Fixed32 | ScalarKind::Fixed64 => {
                Scalar::Num(field.payload.iter().rev().fold(0, |acc, &b| (acc << 8) | u64::from(b)))
            }
            ScalarKind::Bool => Scalar::Num(u64::from(v() != 0)),
            ScalarKind::Int32 => Scalar::Num(i64::from(v() as u32 as i32) as u64),
            ScalarKind::Uint32 => Scalar::Num(u64::from(v() as u32)),
            ScalarKind::Varint64 => Scalar::Num(v()),
        }
    }

    fn is_default(&self) -> bool {
        matches!(self, Scalar::Num(0) | Scalar::Bytes([]))
    }

    fn write(&self, number: u32, kind: ScalarKind, out: &mut Vec<u8>) {
        put_tag(number, kind.wire(), out);
        match (*self, kind) {
            (Scalar::Bytes(bytes), _) => {
                put_varint(bytes.len() as u64, out);
                out.extend_from_slice(bytes);
            }
            (Scalar::Num(n), ScalarKind::Fixed32) => out.extend_from_slice(&(n as u32).to_le_bytes()),
            (Scalar::Num(n), ScalarKind::Fixed64) => out.extend_from_slice(&n.to_le_bytes()),
            (Scalar::Num(n), _) => put_varint(n, out),
        }
    }
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
        let info = |name: &str| &SCHEMA.messages[SCHEMA.index(name).expect("known")];
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
    fn descriptors_from_any_pool_give_the_same_encoding() {
        let raw = sample_listener(2).encode_to_vec();
        let expected = canonical(LISTENER, &raw);
        let ours = descriptors::pool().get_message_by_name(LISTENER).expect("known");
        assert_eq!(canonicalize_message(&ours, &raw).as_ref(), Ok(&expected));
        let other =
            DescriptorPool::decode(include_bytes!("../proto/envoy-types-0.7.7.bin").as_slice()).expect("decodes");
        let theirs = other.get_message_by_name(LISTENER).expect("known");
        assert_eq!(canonicalize_message(&theirs, &raw).as_ref(), Ok(&expected));
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
