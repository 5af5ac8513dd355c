//! cprd's QEMU backend mechanics, shared by cprd and the benchmarks.
//!
//! - [`qmp`]: a blocking QMP client (greeting, capabilities, commands, buffered events).
//! - [`cmdline`]: the one QEMU command line of a VM, identical in every generation, with the
//!   file descriptors cprd hands in at fixed numbers.
//! - [`spawn`]: starting a QEMU with those descriptors in place.
//! - [`probe`]: pre-flight of a candidate binary (version, machine type, CPR options).
//! - [`trial`]: a throw-away handoff between two binaries, before a guest is touched.
//! - [`transfer`]: one cpr-transfer handoff from a running QEMU to a freshly started one,
//!   with rollback to the old QEMU on any failure before the new one runs the guest.
//!
//! Why not the `qapi` crate: its newest release (0.15) is generated from a QEMU schema without
//! `cpr-transfer` or migration channels, its closed event enum fails on events newer than that
//! schema, and its handshake panics on EOF. QMP is JSON lines; serde_json does the parsing.

pub mod cmdline;
pub mod exec;
pub mod probe;
pub mod qmp;
pub mod spawn;
pub mod transfer;
pub mod trial;

/// Lowest QEMU version with `cpr-transfer`.
pub const MIN_VERSION: (u64, u64) = (10, 0);
