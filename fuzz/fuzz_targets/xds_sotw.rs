#![no_main]
//! A sequence of requests on one ADS stream: meshfed::fuzz::XdsHarness::sotw (see src/fuzz.rs).

use std::sync::LazyLock;

static HARNESS: LazyLock<meshfed::fuzz::XdsHarness> = LazyLock::new(meshfed::fuzz::XdsHarness::new);

libfuzzer_sys::fuzz_target!(|data: &[u8]| HARNESS.sotw(data));
