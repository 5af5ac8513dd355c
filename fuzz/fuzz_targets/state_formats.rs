//! Fuzz target `state_formats`: see [`cprd_fuzz::targets::state_formats`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cprd_fuzz::targets::state_formats(data));
