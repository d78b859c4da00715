#![no_main]
//! meshfed::fuzz::kube_object (see src/fuzz.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshfed::fuzz::kube_object(data));
