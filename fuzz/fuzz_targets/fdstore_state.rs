//! Fuzz target `fdstore_state`: see [`cprd_fuzz::targets::fdstore_state`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cprd_fuzz::targets::fdstore_state(data));
