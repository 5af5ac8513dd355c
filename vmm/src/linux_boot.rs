//! Placeholder until the Linux boot module lands (being written in parallel).
#![allow(missing_docs)]
use std::path::PathBuf;
#[derive(Debug, Clone)]
pub struct LinuxGuest {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}
#[derive(Debug)]
pub struct LinuxEntry {
    pub rip: u64,
    pub boot_params_addr: u64,
}
pub fn load<M>(_: &M, _: u64, _: &LinuxGuest, _: u8) -> Result<LinuxEntry, String> {
    Err("Linux boot not built yet".into())
}
pub fn configure_long_mode<M>(_: &M, _: &mut kvm_bindings::kvm_sregs) -> Result<(), String> {
    Err("no".into())
}
pub fn boot_regs(_: &LinuxEntry) -> kvm_bindings::kvm_regs {
    Default::default()
}
