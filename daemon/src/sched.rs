//! cprd's own CPU share. The weighting of each handoff is [`cpr_spawn::sched`]'s (whoever spawns
//! the new VMM raises it: the arbiter, or the QEMU backend; the old VMM raises itself at the
//! pause, a new cpr-vmm settles when it runs the guest); cprd adds the part only it can do: its
//! own weight, and putting a VMM back at a VM's share when a handoff ends or when a cprd that
//! died mid-handoff adopts it.

use cpr_spawn::sched::write_autogroup_nice;
pub use cpr_spawn::sched::{HANDOFF_NICE, set_session_nice};

/// Weights cprd's autogroup like a handoff, so that cprd's part of every handoff (and its D-Bus
/// service) does not wait behind the guests. Only when cprd leads its session, as a service
/// manager starts it (systemd does; so do the tests and the demo): cprd never raises the
/// session of whoever ran it by hand, nor leaves that session (Ctrl-C still reaches it).
pub fn weight_own_session() {
    let me = std::process::id();
    if !cpr_spawn::sched::leads_own_session(me) {
        tracing::debug!("cprd does not lead its session; its CPU share stays that of its starter's session");
        return;
    }
    if !write_autogroup_nice(me, HANDOFF_NICE) {
        tracing::debug!("cannot weight cprd's autogroup (no autogroups, or no CAP_SYS_NICE)");
    }
}
