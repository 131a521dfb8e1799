#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keypool_core::fuzzing::call::call_ops(
    data,
    std::time::Instant::now()
));
