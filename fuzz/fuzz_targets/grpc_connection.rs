#![no_main]
//! HTTP/2 frames and raw bytes into one connection of the gRPC transport: meshfed_testkit::fuzz::grpc_connection.

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshfed_testkit::fuzz::grpc_connection(data));
