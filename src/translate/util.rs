//! Small constructors for protobuf well-known types.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, config_source::ConfigSourceSpecifier,
};
use envoy_types::pb::google::protobuf::{self as pbw, Any};
use prost::{Message, Name};

pub fn duration(d: Duration) -> pbw::Duration {
    pbw::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

pub fn u32v(v: u32) -> pbw::UInt32Value {
    pbw::UInt32Value { value: v }
}

pub fn any<M: Message + Name>(m: &M) -> Any {
    Any { type_url: M::type_url(), value: m.encode_to_vec() }
}

/// `{ads: {}, resource_api_version: V3}`
pub fn ads_config_source() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

pub fn string_value(s: &str) -> pbw::Value {
    pbw::Value { kind: Some(pbw::value::Kind::StringValue(s.to_string())) }
}

pub fn struct_of(fields: &[(&str, pbw::Value)]) -> pbw::Struct {
    pbw::Struct { fields: fields.iter().map(|(k, v)| (k.to_string(), v.clone())).collect() }
}

pub fn boolv(v: bool) -> pbw::BoolValue {
    pbw::BoolValue { value: v }
}
