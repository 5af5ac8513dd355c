//! Every bad input gives one clear error line and its own exit code, never a panic.
#![allow(clippy::tests_outside_test_module)] // integration tests: every test is at the top level

use std::time::Duration;

use cpr_tests::{code, require_kvm, run_vmm};

fn expect_error(args: &[&str], exit: i32, message: &str) {
    let (status, err) = run_vmm(args, None, Duration::from_secs(30));
    assert_eq!(code(status), exit, "args {args:?}: stderr: {err}");
    assert!(err.contains(message), "args {args:?}: expected {message:?} in: {err}");
    assert_eq!(err.trim().lines().count(), 1, "exactly one error line: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn zero_vcpus() {
    expect_error(&["--memory", "64M", "--vcpus", "0"], 10, "0 vCPUs requested; cpr-vmm supports 1 to 8");
}

#[test]
fn three_hundred_vcpus() {
    expect_error(&["--memory", "64M", "--vcpus", "300"], 10, "300 vCPUs requested; cpr-vmm supports 1 to 8");
}

#[test]
fn missing_kernel() {
    expect_error(
        &["--memory", "64M", "--kernel", "/nonexistent/vmlinuz"],
        11,
        "cannot open /nonexistent/vmlinuz: No such file or directory",
    );
}

#[test]
fn missing_guest_elf() {
    expect_error(&["--memory", "64M", "--guest-elf", "/nonexistent/guest.elf"], 11, "cannot open guest ELF");
}

#[test]
fn bad_memory_size() {
    expect_error(&["--memory", "lots"], 10, "\"lots\" is not a size");
    expect_error(&["--memory", "1M"], 10, "guest memory of 1048576 bytes is not supported");
}

#[test]
fn memory_fd_that_is_not_open() {
    expect_error(&["--memory-fd", "57"], 12, "--memory-fd 57: not an open fd");
}

#[test]
fn memory_fd_that_cannot_be_sealed() {
    let file = tempfile::tempfile().expect("tempfile");
    file.set_len(64 << 20).expect("size");
    let (status, err) = run_vmm(&["--memory-fd", "3"], Some(&file), Duration::from_secs(30));
    assert_eq!(code(status), 12, "{err}");
    assert!(err.contains("cannot be sealed (is it a memfd?)"), "{err}");
}

#[test]
fn memfd_too_small() {
    let fd = nix::sys::memfd::memfd_create(c"small", nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING).expect("memfd");
    nix::unistd::ftruncate(&fd, 8 << 20).expect("size");
    let (status, err) = run_vmm(&["--memory-fd", "3"], Some(&fd), Duration::from_secs(30));
    assert_eq!(code(status), 10, "{err}");
    assert!(err.contains("guest memory of 8388608 bytes is not supported"), "{err}");
}

#[test]
fn memfd_writable_but_unreadable() {
    // A write-only fd to a memfd: mapping it shared for the guest must fail cleanly.
    let fd = nix::sys::memfd::memfd_create(c"wo", nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING).expect("memfd");
    nix::unistd::ftruncate(&fd, 64 << 20).expect("size");
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    let wo = std::fs::OpenOptions::new().write(true).open(path).expect("reopen write-only");
    let (status, err) = run_vmm(&["--memory-fd", "3"], Some(&wo), Duration::from_secs(30));
    assert_eq!(code(status), 12, "{err}");
    assert!(err.contains("cannot map guest RAM"), "{err}");
}

#[test]
fn no_dev_kvm() {
    require_kvm();
    // A private mount namespace whose /dev is an empty tmpfs: /dev/kvm really is absent there.
    let vmm = cpr_tests::bin("cpr-vmm");
    let script = format!("mount -t tmpfs none /dev && exec {} --memory 64M", vmm.display());
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(13), "{err}");
    assert!(err.contains("cannot open /dev/kvm"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
