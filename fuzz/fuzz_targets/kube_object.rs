#![no_main]
//! meshfed_testkit::fuzz::kube_object (see tools/testkit/src/fuzz.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshfed_testkit::fuzz::kube_object(data));
