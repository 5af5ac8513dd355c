//! CPU share of a handoff, shared by cprd and both VMMs of a handoff.
//!
//! A VMM started by cprd or by the `cpr-vmm handoff` arbiter leads a session of its own. Where
//! tasks sit in the root CPU cgroup (no systemd CPU controller), the kernel gives each session an
//! autogroup, so every VM gets an equal share of the CPU whatever its thread count. Right for a
//! running guest; wrong for a handoff, whose steps would then wait behind every busy guest.
//!
//! So the work of a handoff runs with its autogroup weighted like [`HANDOFF_NICE`]: the arbiter
//! raises the new VMM when it starts it; the old VMM raises itself at the pause request (its
//! vCPUs stop running guest code there) and settles back if it resumes the guest; the new VMM
//! settles to a session's default (nice 0) as soon as it runs the guest. No guest runs raised
//! except for the microseconds around a pause or a resume. Weights are shares, not priorities:
//! a raised group cannot starve anyone, unlike a real-time policy (which wedged a 2-core host
//! in testing).
//!
//! Under systemd each VMM runs in a scope, a cgroup of its own, where autogroups do not apply;
//! writing the autogroup nice is then harmless and without effect. Lowering a nice needs
//! `CAP_SYS_NICE`; without it the raise is skipped and the handoff runs unweighted.

use std::sync::Mutex;

use nix::unistd::{Pid, getsid};

/// Autogroup nice of the work of a handoff (weight 9548, against 1024 for nice 0).
pub const HANDOFF_NICE: i32 = -10;

/// Whether `pid` leads a session other than the caller's: only then is its autogroup its own,
/// and weighting it touches no other process.
pub fn leads_own_session(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else { return false };
    let own = getsid(None).ok();
    getsid(Some(Pid::from_raw(raw)))
        .is_ok_and(|sid| sid.as_raw() == raw && (Some(sid) != own || pid == std::process::id()))
}

/// The autogroup nice of `pid`, where the kernel has autogroups.
pub fn autogroup_nice(pid: u32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/autogroup")).ok()?;
    text.split_whitespace().skip_while(|w| *w != "nice").nth(1)?.parse().ok()
}

/// Writes the autogroup nice of `pid`'s session. Returns whether it was written.
pub fn write_autogroup_nice(pid: u32, nice: i32) -> bool {
    std::fs::write(format!("/proc/{pid}/autogroup"), nice.to_string()).is_ok()
}

/// Sets the autogroup nice of process `pid` if it leads a session of its own (a VMM). Best
/// effort: a process already gone, or a kernel without autogroups, leaves nothing to do.
pub fn set_session_nice(pid: u32, nice: i32) {
    if pid != 0 && leads_own_session(pid) {
        write_autogroup_nice(pid, nice);
    }
}

/// This process's autogroup nice before [`raise_self`], until [`settle_self`].
static BEFORE_RAISE: Mutex<Option<i32>> = Mutex::new(None);

/// Weights this process's own session for a handoff (the old VMM, at the pause request).
pub fn raise_self() {
    let me = std::process::id();
    if !leads_own_session(me) {
        return;
    }
    let mut before = BEFORE_RAISE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if before.is_none()
        && let Some(nice) = autogroup_nice(me)
        && nice > HANDOFF_NICE
        && write_autogroup_nice(me, HANDOFF_NICE)
    {
        *before = Some(nice);
    }
}

/// Puts this process's session back where [`raise_self`] found it (the old VMM resuming its
/// guest after a failed handoff).
pub fn settle_self() {
    let me = std::process::id();
    if let Some(nice) = BEFORE_RAISE.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
        write_autogroup_nice(me, nice);
    }
}

/// Drops a raised weight of this process's own session back to a session's default, nice 0
/// (the new VMM, once it runs the guest). A nice of 0 or above is left alone.
pub fn settle_incoming() {
    let me = std::process::id();
    if leads_own_session(me) && autogroup_nice(me).is_some_and(|n| n < 0) {
        write_autogroup_nice(me, 0);
    }
}
