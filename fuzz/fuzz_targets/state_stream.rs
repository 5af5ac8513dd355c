//! Fuzz target `state_stream`: see [`cprd_fuzz::targets::state_stream`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cprd_fuzz::targets::state_stream(data));
