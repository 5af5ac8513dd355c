//! Fuzz target `qmp_session`: see [`cprd_fuzz::targets::qmp_session`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cprd_fuzz::targets::qmp_session(data));
