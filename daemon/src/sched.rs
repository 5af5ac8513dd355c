//! cprd's own CPU share. The weighting of each handoff is [`cpr_vmm::sched`]'s (the arbiter
//! raises the new VMM, the old VMM raises itself at the pause, the new one settles when it runs
//! the guest); cprd adds the part only it can do: its own session, and putting a VMM back at a
//! VM's share when a handoff ends or a cprd that died mid-handoff adopts it.

use cpr_vmm::sched::write_autogroup_nice;
pub use cpr_vmm::sched::{HANDOFF_NICE, set_session_nice};

/// Gives cprd an autogroup of its own weighted like a handoff, so that cprd's part of every
/// handoff (and its D-Bus service) never waits behind the guests, without raising whatever
/// session started it. Call before any thread starts. Systemd starts services as session
/// leaders already; then only the weight is set.
pub fn own_session() {
    let me = std::process::id();
    if nix::unistd::getsid(None).is_ok_and(|sid| u32::try_from(sid.as_raw()).ok() != Some(me))
        && let Err(e) = nix::unistd::setsid()
    {
        tracing::debug!("cannot start a session of cprd's own ({e}); its autogroup stays as it is");
        return;
    }
    if !write_autogroup_nice(me, HANDOFF_NICE) {
        tracing::debug!("cannot weight cprd's autogroup (no autogroups, or no CAP_SYS_NICE)");
    }
}
