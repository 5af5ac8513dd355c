//! Fuzz target `vm_definition`: see [`cprd_fuzz::targets::vm_definition`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cprd_fuzz::targets::vm_definition(data));
