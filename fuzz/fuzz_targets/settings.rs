//! Fuzz target `settings`: see [`cprd_fuzz::targets::settings`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cprd_fuzz::targets::settings(data));
