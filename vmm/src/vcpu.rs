//! vCPU threads and the coordinator that pauses and resumes them.
//!
//! Pausing (after the prototype's measured recipe): set the pause flag, then kick each vCPU
//! thread with a real-time signal whose handler sets this thread's `kvm_run.immediate_exit`, so a
//! thread about to enter `KVM_RUN` returns at once and one inside it exits. Before it parks, each
//! thread re-enters `KVM_RUN` once with `immediate_exit = 1`: that completes a pending port or MMIO
//! access (RIP only moves past an `OUT` on the next entry), so the saved registers never replay it.
//!
//! That second entry is skipped where the kick's own exit already left everything in place: an
//! exit with `EINTR` leaves no access pending, and with sync registers the kicker asks KVM, before
//! the kick, to store regs, sregs and events into `kvm_run` at that exit. Whether KVM stored them
//! is read from the stored RFLAGS: the vCPU thread clears its bit 1 (always 1 in a real RFLAGS) in
//! `kvm_run` before each entry, and finds it set only if KVM stored the registers at the exit.
//! This is QEMU's rule too (it re-enters only after an I/O exit). It saves one `KVM_RUN` per vCPU
//! in the pause, 10–20 µs each on `kvm_pvm`.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, Once};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::{PioEffect, lock};
use crate::vm::{ExitReason, VmCore};

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int) {
    // `try_with` never panics; the pointer is this thread's own kvm_run mapping or null.
    let _ = KVM_RUN_PTR.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: `run` is the kvm_run mmap of the vCPU owned by this thread, set by
            // `vcpu_thread` before its first KVM_RUN and valid while the VcpuFd lives (for the
            // whole process). A volatile byte store is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Installs the kick handler once per process (without `SA_RESTART`, so `KVM_RUN` returns `EINTR`).
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point; we then set a handler that
        // only performs an async-signal-safe store.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handle_kick as *const () as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Exit,
}

#[derive(Debug)]
struct CoordState {
    want: Want,
    parked: Vec<bool>,
    threads: Vec<libc::pthread_t>,
    /// Each registered vCPU's `kvm_run` mapping (its address), where the host has sync
    /// registers: the kick asks KVM to store them at the exit it causes.
    sync_runs: Vec<usize>,
}

/// RFLAGS bit 1: always set in a real RFLAGS; cleared in `kvm_run` before an entry, it tells
/// whether KVM stored the registers at the exit.
const RFLAGS_FIXED_BIT: u64 = 1 << 1;

/// Pauses, resumes and stops the vCPU threads of one VM.
#[derive(Debug)]
pub struct Coordinator {
    state: Mutex<CoordState>,
    changed: Condvar,
    pause_flag: AtomicBool,
}

impl Coordinator {
    /// A coordinator for `vcpus` threads, initially paused.
    pub fn new(vcpus: u8) -> Self {
        Self {
            state: Mutex::new(CoordState {
                want: Want::Pause,
                parked: vec![true; usize::from(vcpus)],
                threads: Vec::new(),
                sync_runs: Vec::new(),
            }),
            changed: Condvar::new(),
            pause_flag: AtomicBool::new(true),
        }
    }

    /// Records a vCPU thread so that it can be kicked; `sync_run`: its vCPU's `kvm_run`, where
    /// the host has sync registers.
    pub fn register_thread(&self, thread: libc::pthread_t, sync_run: Option<*mut kvm_run>) {
        let mut st = lock(&self.state);
        st.threads.push(thread);
        st.sync_runs.extend(sync_run.map(|run| run as usize));
    }

    fn kick_all(&self, st: &CoordState) {
        for &run in &st.sync_runs {
            // SAFETY: `run` is the kvm_run mapping of a vCPU of this process, valid while its
            // VcpuFd lives (for the whole process). `kvm_valid_regs` is an aligned u64 that only
            // the vCPU's threads and KVM (which only reads it, at each exit) touch; an atomic
            // store keeps it whole.
            unsafe {
                let field = std::ptr::addr_of_mut!((*(run as *mut kvm_run)).kvm_valid_regs);
                std::sync::atomic::AtomicU64::from_ptr(field).store(crate::persist::SYNC_REGS_ALL, Ordering::SeqCst);
            }
        }
        for &t in &st.threads {
            // SAFETY: `t` is a live thread of this process (vCPU threads are never joined).
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Asks every vCPU to stop, without waiting.
    pub fn request_pause(&self) {
        let mut st = lock(&self.state);
        if st.want == Want::Run {
            st.want = Want::Pause;
        }
        self.pause_flag.store(true, Ordering::SeqCst);
        self.kick_all(&st);
    }

    /// Stops every vCPU and waits until all are parked. Idempotent.
    pub fn pause(&self) {
        self.request_pause();
        self.wait_parked(None);
    }

    /// Waits until every vCPU (except `except`) is parked.
    pub fn wait_parked(&self, except: Option<usize>) {
        let mut st = lock(&self.state);
        while !st.parked.iter().enumerate().all(|(i, p)| *p || Some(i) == except) && st.want != Want::Exit {
            st = self.changed.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Lets every vCPU run. Idempotent; refused (false) once the VM is exiting.
    pub fn resume(&self) -> bool {
        let mut st = lock(&self.state);
        if st.want == Want::Exit {
            return false;
        }
        st.want = Want::Run;
        self.pause_flag.store(false, Ordering::SeqCst);
        self.changed.notify_all();
        true
    }

    /// Stops every vCPU for good.
    pub fn request_exit(&self) {
        let mut st = lock(&self.state);
        st.want = Want::Exit;
        self.pause_flag.store(true, Ordering::SeqCst);
        self.kick_all(&st);
        self.changed.notify_all();
    }

    /// Whether the vCPUs are currently meant to run.
    pub fn is_running(&self) -> bool {
        lock(&self.state).want == Want::Run
    }

    /// Parks vCPU `index` until it may run; false when it must exit instead.
    fn park(&self, index: usize) -> bool {
        let mut st = lock(&self.state);
        st.parked[index] = true;
        self.changed.notify_all();
        while st.want == Want::Pause {
            st = self.changed.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        if st.want == Want::Exit {
            return false;
        }
        st.parked[index] = false;
        true
    }
}

/// Runs vCPU `index` (its seccomp filter already installed by `spawn_vcpu_threads`, before any
/// guest code runs on this thread).
pub fn vcpu_thread(core: &VmCore, index: u8) {
    let i = usize::from(index);
    {
        let mut fd = lock(&core.vcpus[i]);
        let run: *mut kvm_run = fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run));
    }
    if index == 0 {
        let job = lock(&core.incoming).take();
        if let Some(job) = job {
            job(core);
        }
    } else {
        // A new side's worker restores its share of the vCPUs, at the same time as vCPU 0.
        for (k, state) in core.work.wait_restore(i) {
            let restored = crate::migration::restore_vcpu_of(core, k, &state);
            core.work.put_restored(k, restored);
        }
    }
    let mut first_run = true;
    while core.coord.park(i) {
        if std::mem::take(&mut first_run) {
            crate::fault::forbidden_syscall();
        }
        let mut fd = lock(&core.vcpus[i]);
        fd.get_kvm_run().kvm_valid_regs = 0;
        let stop = run_until_paused(core, &mut fd);
        let keep_going = stop != Stop::End;
        // Complete a pending I/O exit so that the registers read later are past it; this last
        // exit also stores regs, sregs and events in kvm_run where the host supports it. Not
        // needed after a kick's exit that stored them already (see the module's notes).
        if stop != Stop::PausedRegsStored {
            if core.caps.sync_regs {
                fd.get_kvm_run().kvm_valid_regs = crate::persist::SYNC_REGS_ALL;
            }
            fd.set_kvm_immediate_exit(1);
            let _ = fd.run();
            fd.set_kvm_immediate_exit(0);
        }
        // A switchover's pause: this vCPU saves its own state now, at the same time as the
        // others (it stays stopped until a resume, which a save does not change).
        if core.work.saving() {
            core.work.put_saved(i, crate::persist::save_vcpu(&fd, index, &core.caps).map_err(|e| e.to_string()));
        }
        fd.get_kvm_run().kvm_valid_regs = 0;
        drop(fd);
        if !keep_going {
            core.coord.request_exit();
            break;
        }
        if index == 0 {
            let job = lock(&core.switchover).take();
            if let Some(job) = job {
                core.coord.wait_parked(Some(0));
                job(core);
            }
        }
    }
}

/// Why [`run_until_paused`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// A pause was requested; the last exit may have left an access pending.
    Paused,
    /// A pause was requested, and the last exit was the kick's, with the registers stored in
    /// `kvm_run` and nothing pending.
    PausedRegsStored,
    /// The VM must end.
    End,
}

/// Runs the vCPU until a pause is requested or the VM must end.
fn run_until_paused(core: &VmCore, fd: &mut VcpuFd) -> Stop {
    let mut kicked_out = false;
    if !run_until_pause_requested(core, fd, &mut kicked_out) {
        return Stop::End;
    }
    let stored = fd.get_kvm_run().kvm_valid_regs == crate::persist::SYNC_REGS_ALL
        && fd.sync_regs().regs.rflags & RFLAGS_FIXED_BIT != 0;
    if kicked_out && stored { Stop::PausedRegsStored } else { Stop::Paused }
}

/// Runs the vCPU until a pause is requested (true) or the VM must end (false); `kicked_out`
/// says whether the last `KVM_RUN` ended with `EINTR` after the sentinel was armed.
fn run_until_pause_requested(core: &VmCore, fd: &mut VcpuFd, kicked_out: &mut bool) -> bool {
    loop {
        fd.set_kvm_immediate_exit(0);
        if core.coord.pause_flag.load(Ordering::SeqCst) {
            return true;
        }
        // The sentinel, unless this entry loads registers from kvm_run (the first after a
        // restore: KVM would load the cleared bit). Only an exit after an armed sentinel counts.
        let armed = fd.get_kvm_run().kvm_dirty_regs & u64::from(kvm_bindings::KVM_SYNC_X86_REGS) == 0;
        if armed {
            fd.sync_regs_mut().regs.rflags &= !RFLAGS_FIXED_BIT;
        }
        let exit = match fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                *kicked_out = armed && e.errno() == libc::EINTR;
                continue;
            }
            Err(e) => return core.exit(ExitReason::GuestCrashed(format!("KVM_RUN failed: {e}"))),
        };
        *kicked_out = false;
        match exit {
            VcpuExit::IoOut(port, data) => match core.devices.pio_write(port, data) {
                PioEffect::None => {}
                PioEffect::Reset => return core.exit(ExitReason::GuestReset),
                PioEffect::GuestFailed(code) => return core.exit(ExitReason::GuestSelfCheck(code)),
            },
            VcpuExit::IoIn(port, data) => core.devices.pio_read(port, data),
            VcpuExit::MmioRead(_, data) => data.fill(0xff),
            VcpuExit::MmioWrite(..) | VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
            VcpuExit::Hlt => std::thread::yield_now(),
            VcpuExit::Shutdown => {
                let at = where_is(fd);
                return core.exit(ExitReason::GuestCrashed(format!("triple fault (shutdown) {at}")));
            }
            VcpuExit::SystemEvent(kind, _) => {
                return core.exit(if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                    ExitReason::GuestReset
                } else {
                    ExitReason::Stopped
                });
            }
            VcpuExit::FailEntry(reason, cpu) => {
                return core.exit(ExitReason::GuestCrashed(format!(
                    "VM entry failed (hardware reason {reason:#x} on cpu {cpu})"
                )));
            }
            other => {
                let what = format!("{other:?}");
                let at = where_is(fd);
                return core.exit(ExitReason::GuestCrashed(format!("unexpected vCPU exit {what} {at}")));
            }
        }
    }
}

/// Where the vCPU stopped, for crash reports.
fn where_is(fd: &VcpuFd) -> String {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "at rip {:#x} rsp {:#x} rflags {:#x} (cs {:#x} cpl {} cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x})",
            r.rip, r.rsp, r.rflags, s.cs.selector, s.cs.dpl, s.cr0, s.cr3, s.cr4, s.efer
        ),
        _ => "at an unknown place".into(),
    }
}
