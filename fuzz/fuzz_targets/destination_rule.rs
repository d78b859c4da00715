#![no_main]
//! meshfed::fuzz::destination_rule (see src/fuzz.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshfed::fuzz::destination_rule(data));
