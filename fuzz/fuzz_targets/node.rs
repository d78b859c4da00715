#![no_main]
//! meshfed_testkit::fuzz::node (see tools/testkit/src/fuzz.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshfed_testkit::fuzz::node(data));
