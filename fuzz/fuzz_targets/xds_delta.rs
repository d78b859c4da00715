#![no_main]
//! A sequence of requests on one ADS stream: meshfed_testkit::fuzz::XdsHarness::delta (see tools/testkit/src/fuzz.rs).

use std::sync::LazyLock;

static HARNESS: LazyLock<meshfed_testkit::fuzz::XdsHarness> = LazyLock::new(meshfed_testkit::fuzz::XdsHarness::new);

libfuzzer_sys::fuzz_target!(|data: &[u8]| HARNESS.delta(data));
