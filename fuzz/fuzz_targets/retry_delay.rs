#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keypool_core::fuzzing::pool::retry_delay(data));
