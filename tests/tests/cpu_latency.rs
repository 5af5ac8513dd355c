//! The arbiter's CPU latency request (PM QoS) around a handoff, on the real `/dev/kvm` (kvm_pvm
//! here, any KVM elsewhere) and the real `/dev/cpu_dma_latency`. Alone in its test binary: the
//! request is process-wide, and no other handoff may run in this process meanwhile.
#![allow(clippy::tests_outside_test_module)] // integration tests: every test is at the top level

use cpr_spawn::sched::CPU_LATENCY_DEVICE;
use cpr_tests::{Chain, require_kvm};

/// How many of this process's descriptors are open on the CPU latency device.
fn held_here() -> usize {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else { return 0 };
    fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.as_os_str() == CPU_LATENCY_DEVICE)
        .count()
}

/// The kernel's current CPU latency target in µs (the lowest of every request held).
fn target_us() -> i32 {
    let bytes = std::fs::read(CPU_LATENCY_DEVICE).expect("read the CPU latency device");
    i32::from_ne_bytes(bytes.get(..4).and_then(|b| b.try_into().ok()).expect("4 bytes"))
}

/// While a handoff runs, its arbiter holds a 0 µs CPU latency request (idle CPUs poll, so a
/// wake-up inside the downtime does not wait for an idle state's exit); when it returns, the
/// request is gone. With `hold_cpu_latency` off, none is taken.
#[test]
fn the_arbiter_keeps_the_cpus_out_of_idle_states_during_a_handoff_only() {
    require_kvm();
    assert!(std::path::Path::new(CPU_LATENCY_DEVICE).exists(), "{CPU_LATENCY_DEVICE} is missing");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut chain = Chain::start(dir.path(), &["--memory", "256M", "--vcpus", "1"], &[]);
    assert_eq!(held_here(), 0, "no request before the handoff");
    for hold in [true, false] {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut req = chain.request();
        req.hold_cpu_latency = hold;
        req.spawned = Some(tx);
        // Looked at when the arbiter has started the new VMM, in the middle of the handoff.
        let during = std::thread::spawn(move || {
            rx.recv().expect("new VMM pid");
            (held_here(), target_us())
        });
        chain.hand_off(&req).expect("handoff");
        let (held, target) = during.join().expect("observer");
        if hold {
            assert_eq!(held, 1, "the arbiter holds one request during the handoff");
            assert_eq!(target, 0, "the CPU latency target is 0 us during the handoff");
        } else {
            assert_eq!(held, 0, "no request when the caller turned it off");
        }
        assert_eq!(held_here(), 0, "the request is gone once the handoff returned");
    }
}
