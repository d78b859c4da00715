#![no_main]
//! meshfed::fuzz::mesh_config (see src/fuzz.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshfed::fuzz::mesh_config(data));
