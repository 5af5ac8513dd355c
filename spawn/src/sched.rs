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
//! Inside the downtime (the old VMM from the pause request, the new one from `Ready` until it
//! runs the guest) every thread also gets a short EEVDF slice, [`HANDOFF_SLICE_NS`] (Linux
//! 6.12 and later): a woken thread whose slice is shorter than the running one's preempts it at
//! once, instead of waiting up to a scheduler tick behind a busy guest; and a thread already
//! queued behind one (the old vCPU at the pause request) is re-checked for preemption through a
//! momentary nice nudge (see `set_slice`). A slice changes when a thread runs, not how much CPU
//! it gets.
//!
//! Under systemd each VMM runs in a scope, a cgroup of its own, where autogroups do not apply;
//! writing the autogroup nice is then harmless and without effect. Lowering a nice needs
//! `CAP_SYS_NICE`; without it the raise is skipped and the handoff runs unweighted.

use std::sync::Mutex;

use nix::unistd::{Pid, getsid};

/// Autogroup nice of the work of a handoff (weight 9548, against 1024 for nice 0).
pub const HANDOFF_NICE: i32 = -10;
/// The autogroup nice of an old VMM once the new one runs the guest: what is left for it is
/// its exit (unmapping guest RAM, tearing its KVM VM down), which must not take CPU from the
/// guest it just handed over. Left at [`HANDOFF_NICE`] it had about nine times the weight of
/// the new VMM's vCPUs for the whole teardown, on a CPU they share. (Found while chasing stalls
/// of a 2-vCPU Linux guest on one L1 CPU; those turned out to come from a leaked load on the
/// host, so no effect on them is claimed.)
pub const EXIT_NICE: i32 = 19;

/// EEVDF slice of every thread of a VMM inside a handoff's downtime (the kernel's minimum).
pub const HANDOFF_SLICE_NS: u64 = 100_000;

/// The scheduling attributes of thread `tid` (`sched_getattr`).
fn sched_attr(tid: i32) -> Option<libc::sched_attr> {
    // SAFETY: sched_attr is plain data; the kernel fills at most `size` bytes of it.
    let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
    let size = u32::try_from(std::mem::size_of::<libc::sched_attr>()).ok()?;
    // SAFETY: `attr` is a valid, writable sched_attr of `size` bytes for the call's duration.
    let rc = unsafe { libc::syscall(libc::SYS_sched_getattr, tid, &raw mut attr, size, 0) };
    (rc == 0).then_some(attr)
}

fn sched_setattr(tid: i32, attr: &libc::sched_attr) -> bool {
    // SAFETY: `attr` is a valid sched_attr whose `size` field the kernel filled in.
    unsafe { libc::syscall(libc::SYS_sched_setattr, tid, std::ptr::from_ref(attr), 0) == 0 }
}

/// Sets the EEVDF slice of thread `tid` (0 = the kernel's default), keeping its policy and nice.
/// Only for the fair policies; a real-time or deadline thread is left alone.
///
/// A thread that is runnable but waiting for a CPU (an old VMM's vCPU behind a busy guest at
/// the pause request) gets no earlier turn from a new slice alone: the kernel re-checks
/// preemption for a queued thread when its priority changes, not its slice. So a shorter slice
/// is set with a momentary nudge, one nice step up and straight back (where the caller may raise
/// a nice; otherwise without), which makes that check happen with the short slice in place. The
/// thread's nice ends where it was.
fn set_slice(tid: i32, slice_ns: u64) -> bool {
    let Some(mut attr) = sched_attr(tid) else { return false };
    if !matches!(i32::try_from(attr.sched_policy), Ok(libc::SCHED_OTHER | libc::SCHED_BATCH)) {
        return false;
    }
    attr.sched_flags = 0;
    attr.sched_runtime = slice_ns;
    if slice_ns != 0 && attr.sched_nice > -20 {
        let nudged = libc::sched_attr { sched_nice: attr.sched_nice - 1, ..attr };
        sched_setattr(tid, &nudged);
    }
    sched_setattr(tid, &attr)
}

/// Sets the EEVDF slice of every thread of this process (0 = the kernel's default).
pub fn set_own_slices(slice_ns: u64) {
    for tid in thread_ids(std::process::id()) {
        if let Ok(tid) = i32::try_from(tid) {
            set_slice(tid, slice_ns);
        }
    }
}

/// The thread ids of process `pid` (empty when it is gone).
pub fn thread_ids(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// The EEVDF slice of thread `tid` of process `pid` in nanoseconds, as `/proc` shows it.
pub fn thread_slice_ns(pid: u32, tid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/sched")).ok()?;
    let line = text.lines().find(|l| l.starts_with("se.slice"))?;
    line.split(':').nth(1)?.trim().parse().ok()
}

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

/// Weights this process's own session for a handoff and shortens its threads' slices (the old
/// VMM, at the pause request).
pub fn raise_self() {
    set_own_slices(HANDOFF_SLICE_NS);
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
    set_own_slices(0);
    let me = std::process::id();
    if let Some(nice) = BEFORE_RAISE.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
        write_autogroup_nice(me, nice);
    }
}

/// Readies the new VMM for the downtime: short slices on all its threads (call when they
/// all exist, before `Ready`).
pub fn ready_incoming() {
    set_own_slices(HANDOFF_SLICE_NS);
}

/// Puts the new VMM, once it runs the guest, back to default slices and drops a raised weight
/// of its own session back to a session's default, nice 0. A nice of 0 or above is left alone.
pub fn settle_incoming() {
    set_own_slices(0);
    let me = std::process::id();
    if leads_own_session(me) && autogroup_nice(me).is_some_and(|n| n < 0) {
        write_autogroup_nice(me, 0);
    }
}

/// The kernel's CPU latency request (PM QoS), held by the arbiter while a handoff runs.
pub const CPU_LATENCY_DEVICE: &str = "/dev/cpu_dma_latency";

/// A CPU latency request of 0 µs, held while it lives: idle CPUs poll instead of entering an
/// idle state, so a thread woken on one runs within a microsecond or two instead of after the
/// state's exit latency. A handoff wakes a thread on another CPU at every step inside the
/// downtime (the state, `Loaded`, `Commit`); measured on this machine kind (a VM whose idle
/// CPUs halt), one such wake-up took 31 µs, the arbiter woken by `Loaded` (ftrace). On hardware
/// hosts deep C-states take tens to hundreds of microseconds to leave. The request costs power
/// only for as long as a handoff lasts (tens of milliseconds).
///
/// Needs write access to [`CPU_LATENCY_DEVICE`] (root; cprd's unit allows the device); without it
/// nothing is held and the handoff runs as before.
#[derive(Debug)]
pub struct CpuLatencyHold {
    /// The open device, where it could be written; the request lasts until it is closed.
    _device: Option<std::fs::File>,
}

impl CpuLatencyHold {
    /// Asks for 0 µs of CPU wake-up latency until the hold is dropped (or holds nothing, where
    /// the device cannot be written).
    pub fn zero() -> Self {
        use std::io::Write;
        let device = std::fs::OpenOptions::new()
            .write(true)
            .open(CPU_LATENCY_DEVICE)
            .ok()
            .and_then(|mut f| f.write_all(&0i32.to_ne_bytes()).is_ok().then_some(f));
        Self { _device: device }
    }
}
