#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keypool_core::fuzzing::sse::sse_roundtrip(data));
