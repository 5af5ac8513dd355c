//! Fuzz target `runtime_record`: see [`cprd_fuzz::targets::runtime_record`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cprd_fuzz::targets::runtime_record(data));
