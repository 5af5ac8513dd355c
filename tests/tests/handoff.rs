//! cpr-transfer between cpr-vmm processes on the real `/dev/kvm`: chains, faults, rollback.
//!
//! Runs on kvm_pvm (here) and on hardware-assisted KVM alike; the guest is the CPL3 test guest.
#![allow(clippy::tests_outside_test_module)] // integration tests: every test is at the top level

use std::collections::HashSet;
use std::time::Duration;

use cpr_proto::control::RunState;
use cpr_tests::{Chain, check_heartbeats, heartbeats, is_stopped, require_kvm, wait_until};

/// Hands the guest on `n` times, every VMM started with `vmm_args`, checking continuity after
/// each handoff. Returns the handoff reports.
fn chain(vcpus: &str, n: usize, vmm_args: &[&str]) -> Vec<cpr_proto::control::HandoffReport> {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = vec!["--memory", "1G", "--vcpus", vcpus];
    args.extend_from_slice(vmm_args);
    let mut chain = Chain::start(dir.path(), &args, &[]);
    let first = chain.status().test_guest.expect("test guest");
    let mut counter = chain.wait_progress(first.counter);
    for generation in 1..=n {
        let mut req = chain.request();
        req.extra_args.extend(vmm_args.iter().map(|a| (*a).to_string()));
        chain.hand_off(&req).unwrap_or_else(|e| panic!("handoff {generation}: {e}"));
        let st = chain.status();
        assert_eq!(st.state, RunState::Running);
        assert_eq!(st.generation, generation as u64);
        let tg = st.test_guest.expect("test guest");
        assert!(
            tg.counter >= counter,
            "handoff {generation}: counter went back from {counter:#x} to {:#x}",
            tg.counter
        );
        assert_eq!(tg.fail, 0, "handoff {generation}: guest self-check failed");
        assert_eq!(tg.pattern_sum, first.pattern_sum, "handoff {generation}: pattern checksum changed");
        counter = chain.wait_progress(tg.counter);
    }
    let seq = heartbeats(&chain.serial).last().map_or(0, |h| h.seq);
    assert!(wait_until(Duration::from_secs(20), || heartbeats(&chain.serial).last().map_or(0, |h| h.seq) >= seq + 2));
    let hbs = heartbeats(&chain.serial);
    check_heartbeats(&hbs).expect("heartbeat sequence continuous across all handoffs");
    let pids: HashSet<u32> = chain.pids.iter().copied().collect();
    assert_eq!(pids.len(), n + 1, "every generation is a new process");
    let downtimes: Vec<u64> = chain.reports.iter().map(|r| r.downtime_ns()).collect();
    assert!(downtimes.iter().all(|d| *d > 0), "every handoff reports a downtime");
    chain.reports.clone()
}

fn host_cpus() -> u8 {
    std::thread::available_parallelism().map_or(1, |n| u8::try_from(n.get()).unwrap_or(u8::MAX))
}

/// Checks that every handoff of `reports` saved its vCPUs on `save` threads and restored them
/// on `restore`.
fn assert_threads(reports: &[cpr_proto::control::HandoffReport], save: u8, restore: u8) {
    for (i, r) in reports.iter().enumerate() {
        assert_eq!((r.save_threads, r.restore_threads), (save, restore), "handoff {}: save and restore threads", i + 1);
    }
}

#[test]
fn chain_of_200_handoffs_one_vcpu() {
    assert_threads(&chain("1", 200, &[]), 1, 1);
}

/// Four vCPUs, each VMM choosing who does the per-vCPU work: the vCPU threads where the host has
/// more CPUs than 4, vCPU 0's thread alone where it has not (this 2-CPU machine).
#[test]
fn chain_of_200_handoffs_four_vcpus() {
    let reports = chain("4", 200, &[]);
    if host_cpus() > 4 { assert_threads(&reports, 4, 4) } else { assert_threads(&reports, 1, 1) }
}

/// The spread path forced on (it is the default only with more CPUs than vCPUs): each old vCPU
/// saves itself as it parks, and min(CPUs, 3) new vCPU threads share the restore, here 2: vCPU 0's
/// thread restores vCPUs 0 and 2 and the VM-wide state, vCPU 1's thread restores vCPU 1.
#[test]
fn chain_of_100_handoffs_three_vcpus_saved_and_restored_on_their_threads() {
    let reports = chain("3", 100, &["--vcpu-state-threads", "spread"]);
    assert_threads(&reports, 3, host_cpus().min(3));
}

/// Starts a guest, lets a handoff with `new_env` fail, and checks that the old VMM runs on.
fn fault_case(old_env: &[(&str, &str)], new_env: &[(&str, &str)], kill_at_stop: bool, timeout_ms: u64) -> String {
    fault_case_inspecting(old_env, new_env, kill_at_stop, timeout_ms, |_| Ok(()))
}

/// [`fault_case`], with `inspect` run on the new VMM's pid where it stopped (before the kill).
fn fault_case_inspecting(
    old_env: &[(&str, &str)],
    new_env: &[(&str, &str)],
    kill_at_stop: bool,
    timeout_ms: u64,
    inspect: impl FnOnce(u32) -> Result<(), String> + Send + 'static,
) -> String {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut chain = Chain::start(dir.path(), &["--memory", "256M", "--vcpus", "2"], old_env);
    let before = chain.status().test_guest.expect("test guest");
    let (tx, rx) = std::sync::mpsc::channel();
    let mut req = chain.request();
    req.env = new_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    req.timeout_ms = timeout_ms;
    req.spawned = Some(tx);
    let killer = std::thread::spawn(move || {
        let pid = rx.recv().expect("new VMM pid");
        let mut inspected = Ok(());
        if kill_at_stop {
            assert!(wait_until(Duration::from_secs(30), || is_stopped(pid)), "new VMM never reached the fault point");
            inspected = inspect(pid);
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
                nix::sys::signal::Signal::SIGKILL,
            )
            .expect("SIGKILL the new VMM");
        }
        inspected
    });
    let err = chain.hand_off(&req).expect_err("the handoff must fail");
    if let Err(e) = killer.join().expect("killer thread") {
        panic!("at the fault point: {e}");
    }
    let st = chain.status();
    assert_eq!(st.state, RunState::Running, "old VMM runs the guest again: {err}");
    assert_eq!(st.generation, 0);
    let tg = st.test_guest.expect("test guest");
    assert!(tg.counter >= before.counter);
    assert_eq!(tg.fail, 0);
    chain.wait_progress(tg.counter);
    // Nothing was lost: a clean handoff afterwards works and the heartbeats stay continuous.
    let mut clean = chain.request();
    clean.new_control = dir.path().join("vm.retry.sock");
    if old_env.is_empty() {
        chain.hand_off(&clean).expect("a clean handoff after the failed one");
        assert_eq!(chain.status().generation, 1);
    }
    let seq = heartbeats(&chain.serial).last().map_or(0, |h| h.seq);
    assert!(wait_until(Duration::from_secs(20), || heartbeats(&chain.serial).last().map_or(0, |h| h.seq) > seq));
    if let Err(e) = check_heartbeats(&heartbeats(&chain.serial)) {
        panic!("heartbeats not continuous: {e}\n{}", std::fs::read_to_string(&chain.serial).unwrap_or_default());
    }
    err
}

fn stall(point: &str) -> [(&'static str, String); 1] {
    [("CPR_VMM_FAULT", format!("stall:{point}"))]
}

fn env<'a>(pairs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn new_side_killed_before_ready() {
    let e = stall("before-ready");
    let err = fault_case(&[], &env(&e), true, 5000);
    assert!(err.contains("went away while waiting for the new VMM to get ready"), "{err}");
    assert!(err.contains("the guest kept running here"), "{err}");
}

/// When the new VMM says `Ready` (the old one then stops the guest), its set-up is over: the
/// control thread runs and every thread has its seccomp filter. Installing a filter costs the
/// kernel a few hundred microseconds of CPU; the control and main threads did it after `Ready`,
/// inside the downtime, until this test.
#[test]
fn new_side_has_set_up_every_thread_when_it_says_ready() {
    let e = stall("after-ready");
    let err = fault_case_inspecting(&[], &env(&e), true, 5000, |pid| {
        let mut threads = Vec::new();
        for tid in cpr_spawn::sched::thread_ids(pid) {
            let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
            let field = |name: &str| {
                status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("?").to_string()
            };
            threads.push((field("Name:"), field("Seccomp:")));
        }
        if !threads.iter().any(|(name, _)| name == "control") {
            return Err(format!("no control thread yet: {threads:?}"));
        }
        if threads.iter().any(|(_, mode)| mode != "2") {
            return Err(format!("threads without their seccomp filter (mode 2): {threads:?}"));
        }
        Ok(())
    });
    assert!(err.contains("rolled back") || err.contains("went away"), "{err}");
}

#[test]
fn new_side_killed_after_ready() {
    let e = stall("after-ready");
    let err = fault_case(&[], &env(&e), true, 5000);
    // After Ready the old VMM pauses and sends the state while the test kills the new one: the
    // kill lands either before the old side's write (a broken pipe) or after it.
    assert!(
        err.contains("the new VMM went away before it had loaded the state")
            || err.contains("cannot send the state: Broken pipe"),
        "{err}"
    );
    assert!(err.contains("rolled back"), "{err}");
}

#[test]
fn new_side_killed_after_receiving_state() {
    let e = stall("after-state");
    let err = fault_case(&[], &env(&e), true, 5000);
    assert!(err.contains("the new VMM went away before it had loaded the state"), "{err}");
    assert!(err.contains("rolled back"), "{err}");
}

#[test]
fn new_side_killed_during_restore() {
    let e = stall("during-restore");
    let err = fault_case(&[], &env(&e), true, 5000);
    assert!(err.contains("the new VMM went away before it had loaded the state"), "{err}");
    assert!(err.contains("rolled back"), "{err}");
}

#[test]
fn new_side_hangs_and_times_out() {
    let e = stall("after-state");
    let err = fault_case(&[], &env(&e), false, 3000);
    assert!(err.contains("the new VMM did not load the state within 9s"), "{err}");
    assert!(err.contains("rolled back"), "{err}");
}

#[test]
fn preflight_mismatch_refuses_without_pausing() {
    let e = [("CPR_VMM_FAULT", "reads-format:0".to_string())];
    let err = fault_case(&[], &env(&e), false, 5000);
    assert!(err.contains("incompatible: this VMM writes state format 1"), "{err}");
    assert!(err.contains("reads formats [0]"), "{err}");
    assert!(err.contains("the guest was not paused"), "{err}");
    assert!(!err.contains("rolled back"), "a refused pre-flight has nothing to roll back: {err}");
}

fn corrupt(how: &str, expect: &str) {
    let e = [("CPR_VMM_FAULT", format!("corrupt:{how}"))];
    let err = fault_case(&env(&e), &[], false, 5000);
    assert!(err.contains("the new VMM rejected the state"), "{how}: {err}");
    assert!(err.contains(expect), "{how}: expected {expect:?} in {err}");
    assert!(err.contains("rolled back"), "{how}: {err}");
}

#[test]
fn corrupt_stream_flipped_byte() {
    corrupt("flip", "checksum mismatch");
}

#[test]
fn corrupt_stream_truncated() {
    corrupt("truncate", "truncated");
}

#[test]
fn corrupt_stream_wrong_crc() {
    corrupt("crc", "checksum mismatch");
}

#[test]
fn corrupt_stream_unknown_mandatory_section() {
    corrupt("unknown-section", "mandatory section id 30583 version 1 is not understood");
}

#[test]
fn corrupt_stream_newer_major_format() {
    corrupt("major", "state format 2.0 is not readable by this build");
}

/// The arbiter weights a new VMM that leads its own session for its start-up; the VMM itself
/// drops back to a session's default share as soon as it runs the guest (no cprd involved).
#[test]
fn a_new_vmm_settles_its_handoff_weight_once_it_runs_the_guest() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut chain = Chain::start(dir.path(), &[], &[]);
    let mut req = chain.request();
    req.new_session = true;
    let (tx, rx) = std::sync::mpsc::channel();
    req.spawned = Some(tx);
    chain.hand_off(&req).expect("handoff");
    let pid = rx.recv().expect("new VMM pid");
    assert_eq!(pid, chain.current.id());
    assert!(cpr_vmm::sched::leads_own_session(pid), "the new VMM has a session of its own");
    assert_eq!(cpr_vmm::sched::autogroup_nice(pid), Some(0), "it runs the guest with a VM's share");
    // ... and with the kernel's default slices (the test's own thread never changed its own).
    let me = std::process::id();
    let default = cpr_vmm::sched::thread_slice_ns(me, me).expect("own slice");
    let slices = cpr_tests::thread_slices(pid);
    assert!(slices.len() > 1, "vCPU and control threads exist");
    assert!(slices.iter().all(|s| *s == default), "{slices:?}");
    chain.wait_progress(chain.status().test_guest.map_or(0, |t| t.counter));
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")), sig).expect("signal");
}

/// Status of the VMM whose control socket is `path`, if it answers.
fn status_at(path: &std::path::Path) -> Option<cpr_proto::control::VmmStatus> {
    let c = cpr_proto::client::ControlClient::connect(path).ok()?;
    match c.call(&cpr_proto::control::Request::Status, &[]) {
        Ok(cpr_proto::control::Response::Status(s)) => Some(s),
        _ => None,
    }
}

/// Issue 13's hole: the old VMM stalls right after it sent the state, the new VMM goes on to run
/// the guest, then the old VMM dies. Before the commit point moved to the arbiter, the arbiter
/// saw the old VMM's control connection close, killed the new VMM that was running the guest, and
/// reported a failed rollback: the guest was lost. Now the new VMM's `Loaded` decides it.
#[test]
fn the_old_vmm_dying_after_it_sent_the_state_does_not_cost_the_guest() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut chain = Chain::start(dir.path(), &["--memory", "256M", "--vcpus", "2"], &[]);
    let before = chain.status().test_guest.expect("test guest");
    let old_pid = chain.pids[0];
    let (tx, rx) = std::sync::mpsc::channel();
    let mut req = chain.request();
    let e = stall("during-restore");
    req.env = env(&e).iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    req.spawned = Some(tx);
    let new_control = req.new_control.clone();
    let actor = std::thread::spawn(move || {
        let new_pid = rx.recv().expect("new VMM pid");
        assert!(wait_until(Duration::from_secs(30), || is_stopped(new_pid)), "new VMM never reached the fault point");
        // The old VMM has sent the whole state (the new one is restoring it): it stalls now.
        signal(old_pid, nix::sys::signal::Signal::SIGSTOP);
        signal(new_pid, nix::sys::signal::Signal::SIGCONT);
        let runs = wait_until(Duration::from_secs(20), || {
            status_at(&new_control).is_some_and(|s| s.state == RunState::Running)
        });
        signal(old_pid, nix::sys::signal::Signal::SIGKILL);
        runs
    });
    let result = chain.try_hand_off(&req);
    let new_ran = actor.join().expect("actor thread");
    assert!(new_ran, "the new VMM never ran the guest");
    result
        .unwrap_or_else(|f| panic!("the guest runs in the new VMM, yet the handoff ended {:?}: {}", f.phase, f.reason));
    let st = chain.status();
    assert_eq!((st.state, st.generation), (RunState::Running, 1));
    let tg = st.test_guest.expect("test guest");
    assert_eq!(tg.fail, 0, "guest self-check");
    assert!(tg.counter >= before.counter);
    chain.wait_progress(tg.counter);
}

/// The new VMM runs nothing before the commit, and after the commit nothing is rolled back: a
/// new VMM that stalls right after reporting `Loaded`, past the arbiter's timeout, leaves both
/// VMMs as they are (`NeedsAttention`); the old one is never resumed, and the new one runs the
/// guest once it continues. (Before the arbiter owned the commit, the new VMM ran the guest the
/// moment it had restored it, whatever the old side had decided.)
#[test]
fn a_new_vmm_silent_after_the_commit_is_neither_killed_nor_raced_by_the_old_one() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut chain = Chain::start(dir.path(), &["--memory", "256M", "--vcpus", "2"], &[]);
    let old_control = chain.control.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut req = chain.request();
    let e = stall("after-loaded");
    req.env = env(&e).iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    req.timeout_ms = 1000;
    req.spawned = Some(tx);
    let new_control = req.new_control.clone();
    let failure = chain.try_hand_off(&req).expect_err("the new VMM never reported running");
    let new_pid = rx.recv().expect("new VMM pid");
    assert!(matches!(failure.phase, cpr_handoff::Phase::NeedsAttention(_)), "{:?}: {}", failure.phase, failure.reason);
    let mut child = failure.child.expect("the new VMM is handed back alive");
    assert!(is_stopped(new_pid), "the new VMM is still where it stalled");
    let old = status_at(&old_control).expect("the old VMM answers");
    assert_eq!(old.state, RunState::StateSent, "the old VMM holds the paused guest and was not resumed");
    let frozen = old.test_guest.expect("test guest").counter;
    signal(new_pid, nix::sys::signal::Signal::SIGCONT);
    assert!(
        wait_until(Duration::from_secs(20), || {
            status_at(&new_control).is_some_and(|s| {
                s.state == RunState::Running && s.test_guest.is_some_and(|t| t.counter > frozen && t.fail == 0)
            })
        }),
        "the new VMM runs the guest once it continues"
    );
    assert_eq!(status_at(&old_control).expect("old VMM").state, RunState::StateSent);
    let _ = child.kill();
    let _ = child.wait();
}
