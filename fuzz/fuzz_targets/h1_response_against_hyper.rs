#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mesh_egress::fuzzing::h1_response_against_hyper(data).expect("a socket pair and a runtime")
});
