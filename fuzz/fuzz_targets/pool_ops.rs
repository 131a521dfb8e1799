#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keypool_core::fuzzing::pool::pool_ops(
    data,
    std::time::Instant::now()
));
