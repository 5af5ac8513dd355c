//! Fuzz target `wire_message`: see [`cprd_fuzz::targets::wire_message`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cprd_fuzz::targets::wire_message(data));
