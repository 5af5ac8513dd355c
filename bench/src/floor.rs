//! The floor of a cpr-vmm handoff on this host, measured in the same run as the downtimes it
//! bounds: what a 1-vCPU handoff cannot avoid, each part the median of many measurements.
//!
//! - The state: cpr-vmm's own save and restore of the VM-wide state and of one vCPU
//!   (`persist::save_vm`, `save_vcpu`, `restore_vm`, `restore_vcpu`), run on a live vCPU's own
//!   thread (a CPL3 test guest that has run, paused as a handoff pauses it), as a handoff runs
//!   them; each ioctl is also timed on its own, for the breakdown. The restore writes what a
//!   handoff cannot skip: the vCPU already holds the state restored, so the parts a handoff's
//!   restore skips when the warm-up's vCPU holds them too are skipped here as well.
//! - The messages: one round trip on a `SOCK_SEQPACKET` pair (the arbiter's `Loaded` and
//!   `Commit`) and one on a `SOCK_STREAM` pair (the state on the main channel), each after both
//!   sides sat idle, as they do around a handoff.
//! - The wake-up of a parked thread (the new side's vCPU threads, released into `KVM_RUN`).
//!
//! The handoff's other work (its processes being scheduled at all, the copy and check of the
//! state stream, the old side's pause of a running vCPU) is left out: it is what the ratio to
//! the floor shows.

use std::sync::{Arc, mpsc};
use std::time::Instant;

use cpr_bench::summarize;
use cpr_vmm::boot::{GuestSpec, load_guest};
use cpr_vmm::memory::{GuestRam, create_memfd};
use cpr_vmm::persist;
use cpr_vmm::vm::{ExitReason, VmCore, VmParts, open_kvm, spawn_vcpu_threads};

/// The floor's parts, each a median in µs.
#[derive(Debug, Clone, Default)]
pub struct Floor {
    /// `persist::save_vm`: kvmclock, the three irqchips, the PIT.
    pub save_vm: f64,
    /// `persist::save_vcpu` of vCPU 0.
    pub save_vcpu: f64,
    /// `persist::restore_vm`.
    pub restore_vm: f64,
    /// `persist::restore_vcpu` of vCPU 0, without the writes a handoff can skip.
    pub restore_vcpu: f64,
    /// One round trip on a `SOCK_SEQPACKET` pair, both sides idle before.
    pub seqpacket: f64,
    /// One round trip on a `SOCK_STREAM` pair, both sides idle before.
    pub stream: f64,
    /// From a notify to the parked thread running.
    pub wake: f64,
    /// Each ioctl of the save and restore on its own: (name, median µs).
    pub ioctls: Vec<(&'static str, f64)>,
}

impl Floor {
    /// The floor: the sum of the parts.
    pub fn total(&self) -> f64 {
        self.save_vm + self.save_vcpu + self.restore_vm + self.restore_vcpu + self.seqpacket + self.stream + self.wake
    }
}

/// Measures the floor, each part `samples` times.
pub fn measure(samples: usize) -> Floor {
    let mut floor = state_on_a_live_vcpu(samples);
    floor.seqpacket = summarize(&round_trips(samples, nix::sys::socket::SockType::SeqPacket)).median;
    floor.stream = summarize(&round_trips(samples, nix::sys::socket::SockType::Stream)).median;
    floor.wake = summarize(&wake_ups(samples)).median;
    floor
}

/// Times `f` `n` times; the median in µs.
fn median_us<T>(n: usize, mut f: impl FnMut() -> T) -> f64 {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        std::hint::black_box(f());
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    summarize(&samples).median
}

/// A 64 MiB VM for the CPL3 test guest with `vcpus` vCPUs, its serial output thrown away, no
/// guest loaded yet; and the receiver of its exit reason (kept for as long as the VM is used).
fn test_guest_vm(vcpus: u8) -> (Arc<VmCore>, mpsc::Receiver<ExitReason>) {
    let kvm = open_kvm(None).expect("/dev/kvm");
    let ram = GuestRam::from_fd(create_memfd(64 << 20).expect("memfd"), None).expect("guest RAM");
    let serial = std::fs::OpenOptions::new().write(true).open("/dev/null").expect("/dev/null");
    let (exit_tx, exit_rx) = mpsc::channel();
    let guest_kind = GuestSpec::TestGuest { flags: 0 }.kind();
    let parts = VmParts { ram, vcpus, cpuid: None, serial_out: serial, guest_kind, generation: 0 };
    (VmCore::create(kvm, parts, exit_tx).expect("VM"), exit_rx)
}

/// The state's part, on vCPU 0's own thread of a 64 MiB CPL3 test guest that ran for 50 ms.
fn state_on_a_live_vcpu(n: usize) -> Floor {
    let (core, _exit_rx) = test_guest_vm(1);
    load_guest(&core, &GuestSpec::TestGuest { flags: 0 }).expect("test guest");
    spawn_vcpu_threads(&core).expect("vCPU thread");
    core.coord.resume();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let (tx, rx) = mpsc::channel();
    *core.switchover.lock().expect("switchover") = Some(Box::new(move |c: &VmCore| {
        let _ = tx.send(time_state(c, n));
    }));
    // vCPU 0 runs the job at this pause, on its own thread, as a handoff's save runs.
    core.coord.request_pause();
    let floor = rx.recv().expect("the measurement");
    core.coord.request_exit();
    floor
}

/// Runs on vCPU 0's thread with every vCPU parked.
fn time_state(core: &VmCore, n: usize) -> Floor {
    let caps = &core.caps;
    let mut vcpu = core.vcpus[0].lock().expect("vCPU 0");
    let vm_state = persist::save_vm(&core.vm).expect("save_vm");
    let vcpu_state = persist::save_vcpu(&vcpu, 0, caps).expect("save_vcpu");
    let mut floor = Floor {
        save_vm: median_us(n, || std::hint::black_box(persist::save_vm(&core.vm))),
        save_vcpu: median_us(n, || std::hint::black_box(persist::save_vcpu(&vcpu, 0, caps))),
        restore_vm: median_us(n, || std::hint::black_box(persist::restore_vm(&core.vm, &vm_state))),
        ..Floor::default()
    };
    floor.restore_vcpu =
        median_us(n, || std::hint::black_box(persist::restore_vcpu(&mut vcpu, &vcpu_state, caps, Some(&vcpu_state))));
    // One by one, where the handoff makes the ioctl (with sync registers, regs, sregs and events
    // ride in kvm_run and cost no ioctl).
    let mut ioctls: Vec<(&'static str, f64)> = Vec::new();
    if !caps.sync_regs {
        ioctls.push(("KVM_GET_REGS", median_us(n, || std::hint::black_box(vcpu.get_regs()))));
        ioctls.push(("KVM_GET_SREGS", median_us(n, || std::hint::black_box(vcpu.get_sregs()))));
        ioctls.push(("KVM_GET_VCPU_EVENTS", median_us(n, || std::hint::black_box(vcpu.get_vcpu_events()))));
        ioctls.push(("KVM_SET_SREGS", median_us(n, || std::hint::black_box(vcpu.set_sregs(&vcpu_state.sregs)))));
        ioctls.push(("KVM_SET_REGS", median_us(n, || std::hint::black_box(vcpu.set_regs(&vcpu_state.regs)))));
        ioctls.push((
            "KVM_SET_VCPU_EVENTS",
            median_us(n, || std::hint::black_box(vcpu.set_vcpu_events(&vcpu_state.events))),
        ));
    }
    if caps.xsave {
        ioctls.push(("KVM_GET_XSAVE", median_us(n, || std::hint::black_box(vcpu.get_xsave()))));
    } else {
        ioctls.push(("KVM_GET_FPU", median_us(n, || std::hint::black_box(vcpu.get_fpu()))));
    }
    if caps.xcrs {
        ioctls.push(("KVM_GET_XCRS", median_us(n, || std::hint::black_box(vcpu.get_xcrs()))));
    }
    ioctls.push(("KVM_GET_LAPIC", median_us(n, || std::hint::black_box(vcpu.get_lapic()))));
    ioctls.push(("KVM_GET_MP_STATE", median_us(n, || std::hint::black_box(vcpu.get_mp_state()))));
    ioctls.push(("KVM_GET_DEBUGREGS", median_us(n, || std::hint::black_box(vcpu.get_debug_regs()))));
    ioctls.push(("KVM_SET_LAPIC", median_us(n, || std::hint::black_box(vcpu.set_lapic(&vcpu_state.lapic)))));
    ioctls.push(("KVM_SET_MP_STATE", median_us(n, || std::hint::black_box(vcpu.set_mp_state(vcpu_state.mp_state)))));
    ioctls
        .push(("KVM_SET_DEBUGREGS", median_us(n, || std::hint::black_box(vcpu.set_debug_regs(&vcpu_state.debugregs)))));
    ioctls.push(("KVM_GET_CLOCK", median_us(n, || std::hint::black_box(core.vm.get_clock()))));
    ioctls.push(("KVM_GET_PIT2", median_us(n, || std::hint::black_box(core.vm.get_pit2()))));
    ioctls.push(("KVM_SET_PIT2", median_us(n, || std::hint::black_box(core.vm.set_pit2(&vm_state.pit)))));
    ioctls.push((
        "KVM_SET_IRQCHIP (IOAPIC)",
        median_us(n, || std::hint::black_box(core.vm.set_irqchip(&vm_state.ioapic))),
    ));
    floor.ioctls = ioctls;
    floor
}

/// `n` round trips of a small message between this process and an echoing child on a socket
/// pair of `kind`, each after both sides sat idle for 0.5 ms; in µs.
fn round_trips(n: usize, kind: nix::sys::socket::SockType) -> Vec<f64> {
    use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, recv, send, socketpair};
    use std::os::fd::AsRawFd;
    let (ours, theirs) = socketpair(AddressFamily::Unix, kind, None, SockFlag::empty()).expect("socketpair");
    // SAFETY: the child only echoes on its socket and exits; it takes no locks after the fork.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            drop(ours);
            let mut buf = [0u8; 64];
            let fd = theirs.as_raw_fd();
            while let Ok(k) = recv(fd, &mut buf, MsgFlags::empty()) {
                if k == 0 || send(fd, &buf[..k], MsgFlags::empty()).is_err() {
                    break;
                }
            }
            // SAFETY: _exit ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(theirs);
            let fd = ours.as_raw_fd();
            let message = b"{\"msg\":\"commit\"}";
            let mut buf = [0u8; 64];
            let samples = (0..n)
                .map(|_| {
                    std::thread::sleep(std::time::Duration::from_micros(500));
                    let t = Instant::now();
                    let _ = send(fd, message, MsgFlags::empty());
                    // A stream may deliver the echo in pieces.
                    let mut got = 0;
                    while got < message.len() {
                        match recv(fd, &mut buf[got..], MsgFlags::empty()) {
                            Ok(0) | Err(_) => break,
                            Ok(k) => got += k,
                        }
                    }
                    t.elapsed().as_secs_f64() * 1e6
                })
                .collect();
            drop(ours);
            let _ = nix::sys::wait::waitpid(child, None);
            samples
        }
    }
}

/// `n` wake-ups of a thread parked on a condition variable (as the new side's vCPU threads are
/// until the commit), each after it sat parked for 0.5 ms: from the notify to the thread
/// running, in µs.
fn wake_ups(n: usize) -> Vec<f64> {
    use std::sync::{Condvar, Mutex};
    struct Gate {
        go: Mutex<Option<Instant>>,
        changed: Condvar,
    }
    let gate = Arc::new(Gate { go: Mutex::new(None), changed: Condvar::new() });
    let (tx, rx) = mpsc::channel();
    let waiter = {
        let gate = Arc::clone(&gate);
        std::thread::spawn(move || {
            for _ in 0..n {
                let mut go = gate.go.lock().expect("gate");
                while go.is_none() {
                    go = gate.changed.wait(go).expect("gate");
                }
                let woken = go.take().map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e6);
                drop(go);
                let _ = tx.send(woken);
            }
        })
    };
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        std::thread::sleep(std::time::Duration::from_micros(500));
        *gate.go.lock().expect("gate") = Some(Instant::now());
        gate.changed.notify_one();
        samples.push(rx.recv().expect("woken"));
    }
    let _ = waiter.join();
    samples
}

/// Whether two vCPUs' saves run in parallel on this host: `n` saves of each of two vCPUs, first
/// on one thread one after the other, then on two threads at once (one vCPU each). Returns the
/// two wall times in ms; with two free CPUs and vCPU ioctls that do not serialize, the second
/// is half the first.
pub fn parallel_saves(n: usize) -> (f64, f64) {
    let (core, _exit_rx) = test_guest_vm(2);
    let save = |index: usize| {
        let vcpu = core.vcpus[index].lock().expect("vCPU");
        for _ in 0..n {
            std::hint::black_box(persist::save_vcpu(&vcpu, 0, &core.caps).expect("save_vcpu"));
        }
    };
    // Warm both paths once.
    save(0);
    save(1);
    let t = Instant::now();
    save(0);
    save(1);
    let one_thread = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| save(0));
        s.spawn(|| save(1));
    });
    let two_threads = t.elapsed().as_secs_f64() * 1e3;
    (one_thread, two_threads)
}
