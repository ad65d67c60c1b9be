#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_egress::fuzzing::grpc_timeout(data));
