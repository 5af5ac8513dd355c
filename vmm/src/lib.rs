//! cpr-vmm: cprd's own minimal KVM VMM.
//!
//! It runs a guest from a memfd it is handed (or creates), and hands a running guest to a new
//! cpr-vmm process without copying its RAM (cpr-transfer, see [`migration`]).
//!
//! Threads: one per vCPU ([`vcpu`]), one control thread per control connection ([`control`]),
//! and the main thread, which waits for the reason to exit. The boot path is
//! [`memory`] → [`vm::VmCore::create`] → [`boot::load_guest`] → [`vm::spawn_vcpu_threads`].

pub mod boot;
pub mod control;
pub mod cpl3;
pub mod devices;
pub mod error;
pub mod fault;
pub mod linux_boot;
pub mod memory;
pub mod migration;
pub mod mptable;
pub mod percpu;
pub mod persist;
pub mod prefault;
pub mod seccomp;
pub mod vcpu;
pub mod vm;

/// The CPU share of a handoff's work, shared with cprd (see [`cpr_spawn::sched`]).
pub use cpr_spawn::sched;
