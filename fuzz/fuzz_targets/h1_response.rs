#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_egress::fuzzing::h1_response(data));
