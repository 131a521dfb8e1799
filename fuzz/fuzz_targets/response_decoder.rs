#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keypool_async_std::fuzzing::response_decoder(data));
