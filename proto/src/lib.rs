//! What both sides of a cpr handoff, and the daemon that arbitrates it, agree on.
//!
//! - [`wire`]: datagram framing over UNIX `SOCK_SEQPACKET` sockets, with fds passed as `SCM_RIGHTS`.
//! - [`control`]: the typed messages on a VMM's control socket (`describe`, `status`, `pause`,
//!   `resume`, `stop`, `migrate`, `quit`).
//! - [`cpr`]: the messages on the `cpr` channel between the old and the new VMM during a handoff,
//!   and on the `commit` channel between the arbiter and the new VMM.
//! - [`client`]: a control-socket client with a deadline on every answer.
//! - [`memory`]: guest RAM as a sealed memfd, and the sizes both sides accept.
//! - [`state`]: the versioned, sectioned, checksummed VM-state format carried on the `main` channel.
//! - [`text`]: bounded excerpts of what a peer sent, for error messages and log lines.
//!
//! Nothing here touches KVM: the VMM fills the state sections, this crate frames and checks them.

pub mod client;
pub mod control;
pub mod cpr;
pub mod memory;
pub mod state;
pub mod text;
pub mod wire;

/// CLOCK_MONOTONIC in nanoseconds; the clock every handoff timestamp uses, on both sides.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .unwrap_or_else(|_| nix::sys::time::TimeSpec::new(0, 0));
    let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
    secs * 1_000_000_000 + nanos
}

/// The content id of a binary file: CRC-64/XZ of its bytes, in hex. A VMM reports its own in
/// `Describe.build_id`; cprd computes it for the file on disk to see whether it changed. Both
/// sides must use this one definition.
pub fn build_id_of(path: &std::path::Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let crc = state::checksum(&bytes);
    Some(format!("{crc:016x}"))
}
