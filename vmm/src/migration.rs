//! cpr-transfer between two cpr-vmm processes: the guest moves, its RAM stays where it is.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant A as arbiter (cprd / cpr-vmm handoff)
//!     participant O as old VMM
//!     participant N as new VMM (--incoming)
//!     A->>N: spawn with the cpr, main and commit channel fds
//!     A->>O: migrate(cpr, main)
//!     N->>O: cpr: Hello{reads_formats}     (pre-flight; refuse here, guest untouched)
//!     O->>N: cpr: Resources + fds (RAM memfd, serial), CPUID
//!     N->>N: map + pre-fault RAM, create VM, vCPUs, park threads
//!     N->>O: cpr: Ready
//!     Note over O: vCPU 0 thread: pause all, save (downtime starts)
//!     O->>N: main: state stream
//!     O->>A: Migrated(report)   (O waits, paused, for quit or resume)
//!     Note over N: vCPU 0 thread: read, check, restore VM + vCPUs; run nothing
//!     N->>A: commit: Loaded
//!     Note over A: the decision, persisted (cpr-handoff's machine)
//!     A->>N: commit: Commit
//!     Note over N: KVM_RUN (downtime ends)
//!     N->>A: commit: Running(report)
//!     A->>O: quit
//! ```
//! Neither VMM decides: the new VMM runs no guest instruction before it reads `Commit`, and
//! exits without running if the commit channel closes first; the old VMM resumes only when its
//! arbiter says so, which the arbiter's machine allows only while the new VMM never ran and is
//! confirmed dead.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cpr_proto::control::{ErrorKind, HandoffReport, MigrateParams, Response, RunState};
use cpr_proto::cpr::{CPR_PROTOCOL_VERSION, FromArbiter, Hello, Resources, ToArbiter, ToNew, ToOld};
use cpr_proto::state::{
    self, FORMAT_MAJOR, FORMAT_MINOR, I8042State, MachineState, SectionId, SerialState, StateWriter, Timing, VcpuState,
    VmState,
};
use cpr_proto::{monotonic_ns, wire};

use crate::control::{Vmm, error};
use crate::devices::lock;
use crate::error::{Result, VmmError};
use crate::fault;
use crate::memory::GuestRam;
use crate::persist;
use crate::vm::{ExitReason, VmCore, VmParts, spawn_vcpu_threads};

/// Version of every section this build writes.
const SECTION_VERSION: u16 = 1;

/// The guest's state, saved while its vCPUs are stopped.
#[derive(Debug)]
pub struct SavedState {
    machine: MachineState,
    vm: VmState,
    vcpus: Vec<VcpuState>,
    serial: SerialState,
    i8042: I8042State,
    timing: Timing,
    /// How many threads saved the vCPUs.
    save_threads: u8,
}

/// Reads the whole guest state. All vCPUs must be parked. A vCPU's state is the one its thread
/// saved as it parked for this switchover ([`crate::percpu`]); a vCPU that saved none (parked
/// before the switchover asked) is read here.
pub fn save(core: &VmCore, timing: Timing) -> Result<SavedState> {
    let vm = persist::save_vm(&core.vm)?;
    let mut saved = core.work.take_saved();
    let mut vcpus = Vec::with_capacity(core.vcpus.len());
    let mut own_threads = 0u8;
    for (index, vcpu) in core.vcpus.iter().enumerate() {
        match saved.get_mut(index).and_then(Option::take) {
            Some(Ok(state)) => {
                vcpus.push(state);
                own_threads += 1;
            }
            Some(Err(e)) => return Err(VmmError::Internal(format!("vCPU {index}: {e}"))),
            None => vcpus.push(persist::save_vcpu(&lock(vcpu), u8::try_from(index).unwrap_or(0), &core.caps)?),
        }
    }
    // vCPU 0's thread saved every vCPU that did not save itself.
    let rest = u8::from(usize::from(own_threads) < core.vcpus.len());
    let mut state = saved_state(core, vm, vcpus, timing);
    state.save_threads = own_threads + rest;
    Ok(state)
}

/// The saved state around `vm` and `vcpus`: the devices and the machine facts, for the next
/// generation.
fn saved_state(core: &VmCore, vm: VmState, vcpus: Vec<VcpuState>, timing: Timing) -> SavedState {
    let (serial, i8042) = core.devices.save();
    let machine = MachineState {
        memory_bytes: core.ram.bytes(),
        vcpus: core.vcpu_count(),
        generation: core.generation() + 1,
        guest: core.guest_kind.clone(),
    };
    SavedState { machine, vm, vcpus, serial, i8042, timing, save_threads: 1 }
}

/// Whether this process warms its half of the switchover before the guest stops.
static WARM_UP: AtomicBool = AtomicBool::new(true);

/// Turns the warm-ups off (`cpr-vmm --no-warm-up`): only for benchmarks that measure them.
pub fn disable_warm_up() {
    WARM_UP.store(false, Ordering::Relaxed);
}

/// Whether the new side spins, instead of sleeping, in its two waits inside the downtime (for
/// the state, see [`wait_for_state`], and for the arbiter's `Commit`), each for at most
/// [`wire::SWITCHOVER_SPIN`].
static SPIN: AtomicBool = AtomicBool::new(true);

/// Turns the spinning waits off (`cpr-vmm --no-spin`): only for benchmarks that measure them.
pub fn disable_spin() {
    SPIN.store(false, Ordering::Relaxed);
}

/// Waits until the state starts to arrive on `main`: asleep until the old side says `Pausing`
/// on `cpr` (or the state comes first, from an old side that never says it), then spinning if
/// `spare_cpu`: if the host has a CPU more than the guest has vCPUs, so that the spin takes no
/// CPU from the old VM's vCPU threads, which must run to stop.
///
/// Measured on 2 CPUs (`docs/benchmarks.md`): asleep, the new VMM paid 28–32 µs for its wake-up
/// inside the downtime; spinning, 12–16 µs, but with 4 and 8 vCPUs the pause took 30 % longer.
/// Spinning from `Ready` on (before `Pausing` existed) made a 2-vCPU pause 1.4 ms.
fn wait_for_state(cpr: std::os::fd::BorrowedFd<'_>, main: std::os::fd::BorrowedFd<'_>, spare_cpu: bool) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    loop {
        let mut fds = [PollFd::new(cpr, PollFlags::POLLIN), PollFd::new(main, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::Error::EINTR) => continue,
            Err(_) => return,
            Ok(_) => {}
        }
        if fds[1].any().unwrap_or(true) {
            return;
        }
        // `Pausing`, or the old side went away (the read of the state then says so).
        if let Ok(r) = wire::recv::<ToNew>(cpr, Some(Duration::ZERO))
            && r.msg != ToNew::Pausing
        {
            continue;
        }
        if spare_cpu {
            spin_on(main);
        }
        return;
    }
}

/// Spins on `sock` for a while where this process spins (see [`SPIN`]).
fn spin_on(sock: std::os::fd::BorrowedFd<'_>) {
    if SPIN.load(Ordering::Relaxed) {
        wire::spin_until_readable(sock, wire::SWITCHOVER_SPIN);
    }
}

/// The new side's warm-up, on vCPU 0's thread before `Ready`: the whole restore path once, on
/// this VM's own fresh state (save, encode, decode, restore it onto itself).
///
/// A new VMM runs its decode and restore code exactly once, during the downtime. Run cold, that
/// code paid for its first page faults, cache misses and the kernel's first pass through each
/// ioctl: measured here, the first decode of a 1-vCPU stream took 50–126 µs, a second one
/// 9–17 µs. Every write here is undone by the real restore, which sets every field again before
/// any vCPU runs (none has run yet).
fn warm_up_incoming(core: &VmCore) -> Result<()> {
    let saved = save(core, Timing::default())?;
    let decoded = decode(&encode(&saved, FORMAT_MAJOR, None)).map_err(|e| VmmError::Internal(e.to_string()))?;
    persist::restore_vm(&core.vm, &decoded.vm)?;
    for (vcpu, s) in core.vcpus.iter().zip(&decoded.vcpus) {
        persist::restore_vcpu(&mut lock(vcpu), s, &core.caps, None)?;
    }
    // What each vCPU holds now, until the real restore: parts equal to it need no write.
    *lock(&core.holds) = decoded.vcpus.into_iter().map(Some).collect();
    Ok(())
}

/// New side: restores vCPU `index` of `core` (what it holds is known only once).
pub fn restore_vcpu_of(core: &VmCore, index: usize, state: &VcpuState) -> Result<Vec<u32>> {
    let holds = lock(&core.holds).get_mut(index).and_then(Option::take);
    persist::restore_vcpu(&mut lock(&core.vcpus[index]), state, &core.caps, holds.as_ref())
}

/// The old side's warm-up, while the new VMM gets ready and the guest still runs: the encoder
/// once over a stream shaped like the real one (vCPU state cannot be read while the vCPUs run,
/// so their sections hold defaults with the real MSR list).
fn warm_up_outgoing(core: &VmCore) {
    let Ok(vm) = persist::save_vm(&core.vm) else { return };
    let vcpus = (0..core.vcpu_count())
        .map(|index| VcpuState {
            index,
            xsave: core.caps.xsave.then(Default::default),
            xcrs: core.caps.xcrs.then(Default::default),
            msrs: core
                .caps
                .msrs
                .iter()
                .map(|&index| kvm_bindings::kvm_msr_entry { index, ..Default::default() })
                .collect(),
            ..Default::default()
        })
        .collect();
    let buffer = std::mem::take(&mut *lock(&core.stream_buffer));
    let stream = encode_into(&saved_state(core, vm, vcpus, Timing::default()), FORMAT_MAJOR, None, buffer);
    // Kept, its pages in place, for the switchover's encode.
    *lock(&core.stream_buffer) = stream;
}

/// Encodes saved state as a stream of format `major`, optionally with one extra raw section.
pub fn encode(s: &SavedState, major: u16, extra: Option<(u16, bool)>) -> Vec<u8> {
    encode_into(s, major, extra, Vec::with_capacity(64 * 1024))
}

/// [`encode`] into `buffer` (emptied first, its capacity kept).
fn encode_into(s: &SavedState, major: u16, extra: Option<(u16, bool)>, buffer: Vec<u8>) -> Vec<u8> {
    let mut w = StateWriter::reusing(buffer, major, FORMAT_MINOR);
    w.add(SectionId::Machine, SECTION_VERSION, true, &s.machine);
    w.add(SectionId::Vm, SECTION_VERSION, true, &s.vm);
    for v in &s.vcpus {
        w.add(SectionId::Vcpu, SECTION_VERSION, true, v);
    }
    w.add(SectionId::Serial, SECTION_VERSION, true, &s.serial);
    w.add(SectionId::I8042, SECTION_VERSION, true, &s.i8042);
    w.add(SectionId::Timing, SECTION_VERSION, false, &s.timing);
    if let Some((id, mandatory)) = extra {
        w.add_raw(id, 1, mandatory, b"section from the future");
    }
    w.finish()
}

/// A decoded state stream, every section typed.
#[derive(Debug)]
pub struct DecodedState {
    /// Machine facts.
    pub machine: MachineState,
    /// Per-VM KVM state.
    pub vm: VmState,
    /// Per-vCPU state, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The UART.
    pub serial: SerialState,
    /// The i8042.
    pub i8042: I8042State,
    /// Timing, if the stream had it.
    pub timing: Option<Timing>,
    /// Format version of the stream.
    pub format: (u16, u16),
    /// Optional sections that were skipped.
    pub skipped: Vec<(u16, u16)>,
}

/// Checks and decodes a state stream into typed sections.
pub fn decode(bytes: &[u8]) -> std::result::Result<DecodedState, state::StateError> {
    let parsed = state::decode(bytes)?;
    let machine: MachineState = parsed.first(SectionId::Machine)?.decode()?;
    let mut vcpus: Vec<VcpuState> =
        parsed.all(SectionId::Vcpu).map(|s| s.decode()).collect::<std::result::Result<_, _>>()?;
    vcpus.sort_by_key(|v| v.index);
    if vcpus.len() != usize::from(machine.vcpus) || vcpus.iter().enumerate().any(|(i, v)| usize::from(v.index) != i) {
        return Err(state::StateError::BadSection {
            index: 0,
            reason: format!("{} vCPU sections for a {}-vCPU machine", vcpus.len(), machine.vcpus),
        });
    }
    Ok(DecodedState {
        vm: parsed.first(SectionId::Vm)?.decode()?,
        serial: parsed.first(SectionId::Serial)?.decode()?,
        i8042: parsed.first(SectionId::I8042)?.decode()?,
        timing: parsed.first(SectionId::Timing).ok().map(|s| s.decode()).transpose()?,
        machine,
        vcpus,
        format: (parsed.major, parsed.minor),
        skipped: parsed.skipped,
    })
}

fn dup(file: &File) -> std::io::Result<OwnedFd> {
    file.as_fd().try_clone_to_owned()
}

struct SwitchoverOutcome {
    report: HandoffReport,
    result: std::result::Result<(), String>,
}

/// The old side: hands the guest to the new VMM on the other end of the channels in `fds`.
pub fn migrate_out(vmm: &Vmm, params: &MigrateParams, fds: Vec<OwnedFd>) -> Response {
    let was = {
        let mut st = lock(&vmm.state);
        match *st {
            RunState::Running | RunState::Paused => {}
            other => {
                return error(ErrorKind::InvalidState, format!("cannot migrate a VM that is {other:?}"), false);
            }
        }
        let was = *st;
        *st = RunState::Migrating;
        was
    };
    let mut fds = fds.into_iter();
    let (Some(cpr), Some(main)) = (fds.next(), fds.next()) else {
        *lock(&vmm.state) = was;
        return error(ErrorKind::BadRequest, "migrate needs two fds: the cpr channel and the main channel", false);
    };
    let (response, state) = run_outgoing(vmm, params, cpr, main, was);
    *lock(&vmm.state) = state;
    response
}

fn run_outgoing(vmm: &Vmm, params: &MigrateParams, cpr: OwnedFd, main: OwnedFd, was: RunState) -> (Response, RunState) {
    let core = &vmm.core;
    let timeout = Some(Duration::from_millis(params.timeout_ms.max(1)));
    // 1. Pre-flight: the new side must read the format we write. The guest is untouched.
    let hello = match wire::recv::<ToOld>(cpr.as_fd(), timeout) {
        Ok(r) => match r.msg {
            ToOld::Hello(h) => h,
            other => {
                return (error(ErrorKind::PeerFailed, format!("new VMM sent {other:?} before hello"), false), was);
            }
        },
        Err(e) => {
            return (peer_error("waiting for the new VMM's hello", &e, false), was);
        }
    };
    if hello.protocol != CPR_PROTOCOL_VERSION || !hello.reads_formats.contains(&FORMAT_MAJOR) {
        let reason = format!(
            "incompatible: this VMM writes state format {FORMAT_MAJOR} (cpr protocol {CPR_PROTOCOL_VERSION}); \
             the new VMM {} (pid {}) reads formats {:?} (cpr protocol {})",
            hello.version, hello.pid, hello.reads_formats, hello.protocol
        );
        let _ = wire::send(cpr.as_fd(), &ToNew::Abort { reason: reason.clone() }, &[]);
        return (error(ErrorKind::Incompatible, format!("{reason}; the guest was not paused"), false), was);
    }
    // 2. Resources that do not change while the guest runs.
    let ram = match dup(core.ram.file()) {
        Ok(fd) => fd,
        Err(e) => {
            return (error(ErrorKind::Internal, format!("cannot dup guest RAM fd: {e}"), false), was);
        }
    };
    let serial = match core.devices.serial_out_fd() {
        Ok(fd) => fd,
        Err(e) => {
            return (error(ErrorKind::Internal, format!("cannot dup serial fd: {e}"), false), was);
        }
    };
    let resources = ToNew::Resources(Resources {
        fd_names: vec!["ram".into(), "serial-out".into()],
        memory_bytes: core.ram.bytes(),
        vcpus: core.vcpu_count(),
        cpuid: core.base_cpuid.clone(),
        generation: core.generation(),
        guest: core.guest_kind.clone(),
    });
    if let Err(e) = wire::send(cpr.as_fd(), &resources, &[ram.as_fd(), serial.as_fd()]) {
        return (peer_error("sending resources to the new VMM", &e, false), was);
    }
    drop((ram, serial));
    if WARM_UP.load(Ordering::Relaxed) {
        warm_up_outgoing(core);
    }
    match wire::recv::<ToOld>(cpr.as_fd(), timeout) {
        Ok(r) if matches!(r.msg, ToOld::Ready) => {}
        Ok(r) => {
            return (error(ErrorKind::PeerFailed, format!("new VMM sent {:?} instead of ready", r.msg), false), was);
        }
        Err(e) => {
            return (peer_error("waiting for the new VMM to get ready", &e, false), was);
        }
    }
    // The new side may spin for the state from now on; a new side that does not read this
    // any more (an older build) has closed the channel, and that failure changes nothing.
    let _ = wire::send(cpr.as_fd(), &ToNew::Pausing, &[]);
    // 3. Switchover, run by vCPU 0's thread when the guest is running (no thread hop).
    let (tx, rx) = mpsc::channel::<SwitchoverOutcome>();
    let main = Mutex::new(Some(UnixStream::from(main)));
    let job = move |pause_requested_ns: u64, core: &VmCore| {
        let paused_ns = monotonic_ns();
        let mut report = HandoffReport { pause_requested_ns, paused_ns, ..Default::default() };
        let result = (|| {
            let saved = save(core, Timing { pause_requested_ns, paused_ns }).map_err(|e| e.to_string())?;
            let buffer = std::mem::take(&mut *lock(&core.stream_buffer));
            let stream = encode_into(&saved, FORMAT_MAJOR, None, buffer);
            let stream = fault::corrupt_stream(stream, |major, extra| encode(&saved, major, extra));
            report.state_bytes = stream.len() as u64;
            report.save_threads = saved.save_threads;
            let mut sock = lock(&main).take().ok_or("main channel already used")?;
            sock.write_all(&stream).map_err(|e| format!("cannot send the state: {e}"))?;
            let _ = sock.shutdown(std::net::Shutdown::Write);
            report.state_sent_ns = monotonic_ns();
            Ok(())
        })();
        let _ = tx.send(SwitchoverOutcome { report, result });
    };
    // The switchover is the handoff's work, and the guest stops at the pause request.
    crate::sched::raise_self();
    core.reset_test_guest_gap();
    let pause_requested_ns = monotonic_ns();
    if was == RunState::Running {
        *lock(&core.switchover) = Some(Box::new(move |c: &VmCore| job(pause_requested_ns, c)));
        if crate::percpu::spreads(core.vcpus.len()) {
            core.work.save_at_next_park();
        }
        core.coord.request_pause();
    } else {
        job(pause_requested_ns, core);
    }
    let outcome = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(o) => o,
        Err(_) => {
            return (
                error(ErrorKind::Internal, "the vCPU thread did not complete the switchover", true),
                RunState::MigrationFailed,
            );
        }
    };
    if let Err(e) = outcome.result {
        return (
            error(ErrorKind::PeerFailed, format!("{e}; the guest is paused, resume it once the new VMM is dead"), true),
            RunState::MigrationFailed,
        );
    }
    // 4. The state is out. The arbiter decides (commit to the new VMM, or roll back); this VMM
    //    waits for `quit` or `resume`.
    (Response::Migrated(outcome.report), RunState::StateSent)
}

fn peer_error(what: &str, e: &wire::WireError, paused: bool) -> Response {
    let tail = if paused {
        "; the guest is paused, resume it once the new VMM is dead"
    } else {
        "; the guest kept running here"
    };
    match e {
        wire::WireError::Timeout(d) => error(ErrorKind::Timeout, format!("timed out after {d:?} {what}{tail}"), paused),
        wire::WireError::Closed => {
            error(ErrorKind::PeerFailed, format!("the new VMM went away while {what}{tail}"), paused)
        }
        other => error(ErrorKind::PeerFailed, format!("{what}: {other}{tail}"), paused),
    }
}

/// How the new side prepares (`cpr-vmm --incoming`).
#[derive(Debug, Clone)]
pub struct IncomingOptions {
    /// Also write the received state stream to this file.
    pub dump_state: Option<std::path::PathBuf>,
    /// Pre-fault guest RAM before `Ready` (off only in benchmarks).
    pub prefault: bool,
}

/// The new side, before the switchover: says hello, takes the resources, builds the VM with
/// pre-faulted RAM and parked vCPUs whose vCPU 0 warms the restore path, then runs
/// `before_ready` (the caller's last set-up: its control thread, its own seccomp filter) and
/// lets vCPU 0 say ready and wait for the state.
///
/// Nothing but vCPU 0 may run in this process once it has said ready: the old side then stops
/// the guest, and any work here takes a CPU from the downtime. Measured: the control and main
/// threads' seccomp filters, installed after `Ready`, took 200–300 µs of CPU each, inside the
/// downtime.
pub fn prepare_incoming(
    cpr: OwnedFd,
    main: OwnedFd,
    commit: OwnedFd,
    exit_tx: mpsc::Sender<ExitReason>,
    options: IncomingOptions,
    kvm: Option<OwnedFd>,
    before_ready: impl FnOnce(&Arc<Vmm>) -> Result<()>,
) -> Result<Arc<Vmm>> {
    let IncomingOptions { dump_state, prefault } = options;
    let hello = ToOld::Hello(Hello {
        protocol: CPR_PROTOCOL_VERSION,
        reads_formats: fault::reads_formats(),
        version: crate::control::VERSION.into(),
        pid: std::process::id(),
    });
    wire::send(cpr.as_fd(), &hello, &[]).map_err(|e| VmmError::IncomingAborted(format!("cannot say hello: {e}")))?;
    let received = wire::recv::<ToNew>(cpr.as_fd(), Some(Duration::from_secs(120)))
        .map_err(|e| VmmError::IncomingAborted(format!("no resources from the old VMM: {e}")))?;
    let res = match received.msg {
        ToNew::Resources(r) => r,
        ToNew::Abort { reason } => {
            return Err(VmmError::IncomingAborted(format!("the old VMM aborted: {reason}")));
        }
        ToNew::Pausing => {
            return Err(VmmError::IncomingAborted("the old VMM sent pausing before the resources".into()));
        }
    };
    let mut named: std::collections::HashMap<String, OwnedFd> =
        res.fd_names.iter().cloned().zip(received.fds).collect();
    let ram_fd =
        named.remove("ram").ok_or_else(|| VmmError::IncomingAborted("resources came without the RAM fd".into()))?;
    let serial = named
        .remove("serial-out")
        .ok_or_else(|| VmmError::IncomingAborted("resources came without the serial fd".into()))?;
    let ram = GuestRam::from_fd(ram_fd, Some(res.memory_bytes))?;
    let kvm_handle = crate::vm::open_kvm(kvm)?;
    let guest_kind = res.guest;
    let parts = VmParts {
        ram,
        vcpus: crate::vm::check_vcpus(u32::from(res.vcpus))?,
        cpuid: Some(res.cpuid),
        serial_out: File::from(serial),
        guest_kind,
        generation: res.generation,
    };
    let core = VmCore::create(kvm_handle, parts, exit_tx)?;
    if prefault {
        // Before the switchover, off the critical path: the VM exists (KVM_PRE_FAULT_MEMORY needs
        // its memory slots and a vCPU), none of its vCPUs has run.
        let (path, bytes) = crate::prefault::prefault(&core)?;
        eprintln!("cpr-vmm: {} MiB of guest RAM pre-faulted with {}", bytes >> 20, path.name());
    }
    let vmm = crate::control::Vmm::new(Arc::clone(&core), RunState::Incoming);
    let job_vmm = Arc::clone(&vmm);
    let (warmed_tx, warmed_rx) = mpsc::channel::<Result<()>>();
    // vCPU 0's thread listens on the cpr channel for the old side's `Pausing`, and spins for
    // the state after it only with a CPU to spare.
    let spare_cpu = std::thread::available_parallelism().map_or(0, std::num::NonZero::get) > core.vcpus.len();
    let job_cpr = cpr.try_clone().map_err(|e| VmmError::Internal(format!("cannot dup the cpr channel: {e}")))?;
    // vCPU threads 1..workers wait for their share of the restore before they first park.
    core.work.expect_restore(crate::percpu::restore_workers(core.vcpus.len()));
    let (go_tx, go_rx) = mpsc::channel::<()>();
    *lock(&core.incoming) = Some(Box::new(move |c: &VmCore| {
        let warmed = if WARM_UP.load(Ordering::Relaxed) { warm_up_incoming(c) } else { Ok(()) };
        let _ = warmed_tx.send(warmed);
        // The main thread has done its last set-up, or gave up (then it drops `go_tx`).
        if go_rx.recv().is_err() {
            return;
        }
        if let Err(e) = say_ready(job_cpr.as_fd()) {
            c.work.abandon();
            c.exit(ExitReason::Fatal(e));
            return;
        }
        wait_for_state(job_cpr.as_fd(), main.as_fd(), spare_cpu);
        if let Err(e) = restore_incoming(c, &job_vmm, &commit, main, dump_state.as_deref()) {
            // No state comes to the workers still waiting for one.
            c.work.abandon();
            if matches!(e, VmmError::StateRejected(_)) {
                let _ = wire::send(commit.as_fd(), &ToArbiter::Rejected { reason: e.to_string() }, &[]);
            }
            c.exit(ExitReason::Fatal(e));
        }
    }));
    spawn_vcpu_threads(&core)?;
    // `Ready` lets the old side stop the guest: the warm-up is over by then.
    match warmed_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(VmmError::IncomingAborted(format!("the warm-up of the restore path failed: {e}"))),
        Err(_) => return Err(VmmError::IncomingAborted("vCPU 0 did not finish the warm-up".into())),
    }
    before_ready(&vmm)?;
    crate::sched::ready_incoming();
    // vCPU 0 says ready (the main thread's filter may not allow it to send any more).
    go_tx.send(()).map_err(|_| VmmError::IncomingAborted("vCPU 0 is gone before ready".into()))?;
    Ok(vmm)
}

/// The new side's `Ready`, on vCPU 0's thread: the old side may stop the guest from now on.
fn say_ready(cpr: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    fault::stall_point("before-ready");
    wire::send(cpr, &ToOld::Ready, &[]).map_err(|e| VmmError::IncomingAborted(format!("cannot say ready: {e}")))?;
    fault::stall_point("after-ready");
    Ok(())
}

/// The new side's critical path, on vCPU 0's thread: read, check, restore, report `Loaded`,
/// wait for the arbiter's `Commit`, run.
fn restore_incoming(
    core: &VmCore,
    vmm: &Vmm,
    commit: &OwnedFd,
    main: OwnedFd,
    dump_state: Option<&std::path::Path>,
) -> Result<()> {
    let mut stream = UnixStream::from(main);
    let bytes = state::read_stream(&mut stream).map_err(|e| match e {
        state::StateError::Truncated { got: 0, .. } => {
            VmmError::IncomingAborted("the old VMM closed the main channel".into())
        }
        other => VmmError::StateRejected(other.to_string()),
    })?;
    let state_received_ns = monotonic_ns();
    if let Some(path) = dump_state {
        let _ = std::fs::write(path, &bytes);
    }
    let decoded = decode(&bytes).map_err(|e| VmmError::StateRejected(e.to_string()))?;
    if fault::reject_state() {
        return Err(VmmError::StateRejected("fault injection: this VMM refuses every state".into()));
    }
    if decoded.machine.vcpus != core.vcpu_count() || decoded.machine.memory_bytes != core.ram.bytes() {
        return Err(VmmError::StateRejected(format!(
            "state is for {} vCPUs and {} bytes of RAM; this VM has {} and {}",
            decoded.machine.vcpus,
            decoded.machine.memory_bytes,
            core.vcpu_count(),
            core.ram.bytes()
        )));
    }
    fault::stall_point("after-state");
    // The other workers restore their share of the vCPUs while this thread does the VM-wide
    // parts and its own share (crate::percpu says why the order is free).
    let restore_threads = u8::try_from(core.work.workers()).unwrap_or(u8::MAX);
    let own = core.work.post_restore(decoded.vcpus.into_iter().enumerate());
    persist::restore_vm(&core.vm, &decoded.vm)?;
    core.devices.load(&decoded.serial, &decoded.i8042).map_err(VmmError::Restore)?;
    fault::stall_point("during-restore");
    let mut restored = Vec::with_capacity(core.vcpus.len());
    for (index, s) in own {
        restored.push((index, restore_vcpu_of(core, index, &s)));
    }
    restored.extend(core.work.wait_restored());
    for (index, result) in restored {
        let skipped = result?;
        if !skipped.is_empty() {
            eprintln!("cpr-vmm: vCPU {index}: the host refused MSRs {skipped:x?}; continuing without them");
        }
    }
    core.generation.store(decoded.machine.generation, std::sync::atomic::Ordering::SeqCst);
    let timing = decoded.timing.unwrap_or_default();
    // Everything is in place and nothing has run: the arbiter decides now.
    let loaded_ns = monotonic_ns();
    wire::send(commit.as_fd(), &ToArbiter::Loaded, &[])
        .map_err(|e| VmmError::IncomingAborted(format!("the arbiter went away before the decision: {e}")))?;
    fault::stall_point("after-loaded");
    spin_on(commit.as_fd());
    // No timeout: only the arbiter decides. If it dies or gives up, the channel closes and this
    // VMM exits without having run the guest.
    match wire::recv::<FromArbiter>(commit.as_fd(), None) {
        Ok(r) if r.msg == FromArbiter::Commit => {}
        Ok(r) => return Err(VmmError::IncomingAborted(format!("no commit: the arbiter sent {:?}", r.msg))),
        Err(e) => return Err(VmmError::IncomingAborted(format!("no commit from the arbiter: {e}"))),
    }
    // The state lock is held across the resume, so that whoever heard of the commit (the
    // arbiter) never sees this VMM still `Incoming`.
    let mut state = lock(&vmm.state);
    let report = HandoffReport {
        pause_requested_ns: timing.pause_requested_ns,
        paused_ns: timing.paused_ns,
        state_received_ns,
        loaded_ns,
        resumed_ns: monotonic_ns(),
        new_pid: std::process::id(),
        restore_threads,
        generation: decoded.machine.generation,
        ..Default::default()
    };
    *lock(&vmm.incoming) = Some(report);
    *state = RunState::Running;
    core.coord.resume();
    drop(state);
    // Settled before the arbiter hears of it: whoever learns that this VMM runs the guest sees
    // it at a VM's share already.
    crate::sched::settle_incoming();
    let _ = wire::send(commit.as_fd(), &ToArbiter::Running(report), &[]);
    Ok(())
}

/// A human-readable description of a decoded state stream (`cpr-vmm --describe-state`).
pub fn describe(d: &DecodedState, bytes: usize) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let m = &d.machine;
    let _ = writeln!(s, "cpr state format {}.{}, {bytes} bytes, CRC ok", d.format.0, d.format.1);
    let _ = writeln!(
        s,
        "machine: {} vCPUs, {} MiB RAM, generation {}, guest {:?}",
        m.vcpus,
        m.memory_bytes >> 20,
        m.generation,
        m.guest
    );
    let _ = writeln!(
        s,
        "vm: kvmclock {} ns (flags {:#x}), PIT channel 0 count {}, irqchips: PIC master, PIC slave, IOAPIC (chip {})",
        d.vm.clock.clock, d.vm.clock.flags, d.vm.pit.channels[0].count, d.vm.ioapic.chip_id
    );
    for v in &d.vcpus {
        let _ = writeln!(
            s,
            "vcpu {}: rip {:#x} rsp {:#x} rflags {:#x} cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} cpl {} msrs {} xsave {} tsc_offset {:?} mp_state {}",
            v.index,
            v.regs.rip,
            v.regs.rsp,
            v.regs.rflags,
            v.sregs.cr0,
            v.sregs.cr3,
            v.sregs.cr4,
            v.sregs.efer,
            v.sregs.cs.dpl,
            v.msrs.len(),
            if v.xsave.is_some() { "yes" } else { "no (fpu)" },
            v.tsc_offset,
            v.mp_state.mp_state
        );
    }
    let _ = writeln!(
        s,
        "serial: lcr {:#x} ier {:#x} lsr {:#x} scratch {:#x}, {} bytes of pending input",
        d.serial.line_control,
        d.serial.interrupt_enable,
        d.serial.line_status,
        d.serial.scratch,
        d.serial.in_buffer.len()
    );
    let _ = writeln!(s, "i8042: command byte {:#x}", d.i8042.command_byte);
    if let Some(t) = d.timing {
        let _ = writeln!(s, "timing: pause requested at {} ns, paused at {} ns", t.pause_requested_ns, t.paused_ns);
    }
    for (id, version) in &d.skipped {
        let _ = writeln!(s, "skipped optional section id {id} version {version}");
    }
    s
}
