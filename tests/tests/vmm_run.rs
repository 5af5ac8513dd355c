//! cpr-vmm running the CPL3 test guest on the real `/dev/kvm` (kvm_pvm here, any KVM elsewhere).
#![allow(clippy::tests_outside_test_module)] // integration tests: every test is at the top level

use std::time::Duration;

use cpr_proto::control::{Request, Response, RunState};
use cpr_tests::{VmmProcess, check_heartbeats, code, heartbeats, require_kvm, run_vmm, wait_until};

fn runs_for_five_seconds(vcpus: &str) {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let vmm = VmmProcess::start(dir.path(), "vm", &["--memory", "256M", "--vcpus", vcpus]);
    assert!(wait_until(Duration::from_secs(10), || vmm.status().test_guest.is_some()), "guest never initialised");
    let first = vmm.status();
    assert_eq!(first.state, RunState::Running);
    assert_eq!(first.vcpus.to_string(), vcpus);
    std::thread::sleep(Duration::from_secs(5));
    let last = vmm.status();
    let (a, b) = (first.test_guest.expect("test guest status"), last.test_guest.expect("test guest status"));
    assert!(b.counter > a.counter, "counter did not increase: {a:?} -> {b:?}");
    assert_eq!(b.fail, 0, "guest self-check failed");
    let hbs = heartbeats(&vmm.serial);
    assert!(hbs.len() >= 5, "only {} heartbeats in 5 s", hbs.len());
    check_heartbeats(&hbs).expect("heartbeats continuous");
    assert_eq!(hbs[0].pattern_sum, b.pattern_sum, "pattern checksum");
}

#[test]
fn test_guest_runs_with_one_vcpu() {
    runs_for_five_seconds("1");
}

#[test]
fn test_guest_runs_with_four_vcpus() {
    runs_for_five_seconds("4");
}

#[test]
fn pause_stops_the_counter_and_resume_restarts_it() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let vmm = VmmProcess::start(dir.path(), "vm", &["--memory", "64M", "--vcpus", "2"]);
    assert!(wait_until(Duration::from_secs(10), || vmm.status().test_guest.is_some()));
    assert_eq!(vmm.call(&Request::Pause), Response::Ok);
    let counter = || vmm.status().test_guest.expect("status").counter;
    let a = counter();
    std::thread::sleep(Duration::from_millis(200));
    let b = counter();
    assert_eq!(a, b, "counter moved while paused");
    assert_eq!(vmm.status().state, RunState::Paused);
    assert_eq!(vmm.call(&Request::Pause), Response::Ok, "pause is idempotent");
    assert_eq!(vmm.call(&Request::Resume), Response::Ok);
    assert!(wait_until(Duration::from_secs(5), || counter() > b), "counter did not restart");
    assert_eq!(vmm.status().test_guest.expect("status").fail, 0);
}

#[test]
fn stop_ends_the_process_cleanly() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut vmm = VmmProcess::start(dir.path(), "vm", &["--memory", "64M"]);
    assert_eq!(vmm.call(&Request::Stop), Response::Ok);
    let status = vmm.wait_exit(Duration::from_secs(10));
    assert_eq!(code(status), 0, "stderr: {}", vmm.stderr_text());
    assert!(!vmm.control.exists(), "control socket left behind");
}

#[test]
fn quit_is_refused_unless_the_guest_was_handed_off() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let vmm = VmmProcess::start(dir.path(), "vm", &["--memory", "64M"]);
    match vmm.call(&Request::Quit) {
        Response::Error(e) => assert!(e.message.contains("handed off"), "{e:?}"),
        other => panic!("quit answered {other:?}"),
    }
    assert_eq!(vmm.status().state, RunState::Running);
}

/// Runs cpr-vmm on the guest ELF `image` (64 MiB, its console into a file) until it exits;
/// returns how it exited and its standard error.
fn run_guest_elf(image: &[u8]) -> (std::process::ExitStatus, String) {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let elf = dir.path().join("guest.elf");
    std::fs::write(&elf, image).expect("write ELF");
    let elf = elf.to_string_lossy().into_owned();
    let serial = dir.path().join("serial").to_string_lossy().into_owned();
    run_vmm(&["--memory", "64M", "--guest-elf", &elf, "--serial-out", &serial], None, Duration::from_secs(60))
}

#[test]
fn a_broken_guest_invariant_is_reported_with_its_own_exit_code() {
    let (status, err) = run_guest_elf(cpr_testguest::BROKEN_GUEST_ELF);
    assert_eq!(code(status), 20, "stderr: {err}");
    assert!(err.contains("guest self-check failed: register and SSE copies of the counter disagree"), "stderr: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one error line: {err}");
}

#[test]
fn a_guest_of_its_own_has_its_failure_code_reported_raw_not_with_the_test_guests_meaning() {
    let (status, err) = run_guest_elf(cpr_testguest::FAILCODE_GUEST_ELF);
    assert_eq!(code(status), 20, "stderr: {err}");
    assert!(
        err.contains("guest self-check failed: the guest wrote failure code 3 (0x03) to port 0x11"),
        "stderr: {err}"
    );
    assert!(!err.contains("pattern"), "the test guest's meaning of 3 for another guest: {err}");
}

#[test]
fn guest_elf_runs_a_dropped_in_image() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let elf = dir.path().join("guest.elf");
    std::fs::write(&elf, cpr_testguest::TEST_GUEST_ELF).expect("write ELF");
    let elf = elf.to_string_lossy().into_owned();
    let vmm = VmmProcess::start(dir.path(), "vm", &["--memory", "64M", "--guest-elf", &elf]);
    assert!(wait_until(Duration::from_secs(10), || heartbeats(&vmm.serial).len() >= 2));
}
