#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mesh_egress::fuzzing::h2_response_against_hyper(data).expect("a runtime")
});
