#![no_main]
//! meshfed::fuzz::node (see src/fuzz.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshfed::fuzz::node(data));
