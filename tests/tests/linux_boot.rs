//! Booting Debian's stock kernel under cpr-vmm. Needs hardware-assisted KVM (VMX/SVM): on
//! `kvm_pvm` a stock kernel cannot boot, so this test says `skipped: needs hardware-assisted KVM`.
#![allow(clippy::tests_outside_test_module)] // integration tests: every test is at the top level

use std::time::Duration;

use cpr_tests::{code, hardware_kvm, run_vmm};

#[test]
fn debian_kernel_boots_to_its_panic_and_resets_cleanly() {
    if !hardware_kvm() {
        println!("skipped: needs hardware-assisted KVM");
        return;
    }
    let kernel = std::env::var("CPRD_TEST_KERNEL").expect("CPRD_TEST_KERNEL (scripts/setup-host fetches it)");
    let dir = tempfile::tempdir().expect("tempdir");
    let serial = dir.path().join("serial").to_string_lossy().into_owned();
    // No root file system: the kernel boots, panics, and panic=1 + reboot=k reset it through the
    // i8042, which cpr-vmm turns into a clean exit.
    let args = [
        "--memory",
        "512M",
        "--vcpus",
        "2",
        "--kernel",
        &kernel,
        "--cmdline",
        "console=ttyS0 reboot=k panic=1",
        "--serial-out",
        &serial,
    ];
    let (status, err) = run_vmm(&args, None, Duration::from_secs(120));
    let out = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(code(status), 0, "stderr: {err}\nserial:\n{out}");
    assert!(out.contains("Linux version"), "serial:\n{out}");
    assert!(out.contains("smpboot") || out.contains("Brought up"), "second CPU not brought up:\n{out}");
}
