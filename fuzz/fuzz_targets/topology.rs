#![no_main]
//! meshfed::fuzz::topology (see src/fuzz.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshfed::fuzz::topology(data));
