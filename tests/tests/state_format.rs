//! The state format on disk: the committed golden stream of format 1 must load in every build,
//! and the CLI describes streams and formats. No KVM needed.
#![allow(clippy::tests_outside_test_module)] // integration tests: every test is at the top level

use std::path::PathBuf;
use std::time::Duration;

use cpr_tests::{code, run_vmm};

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden/state-format-1.bin")
}

#[test]
fn golden_format_1_stream_loads() {
    let bytes = std::fs::read(golden()).expect("golden file is committed");
    let d = cpr_vmm::migration::decode(&bytes).expect("format 1 must stay readable");
    assert_eq!(d.format, (1, 0));
    assert_eq!(d.machine.vcpus, 2);
    assert_eq!(d.machine.memory_bytes, 64 << 20);
    assert_eq!(d.vcpus.len(), 2);
    for v in &d.vcpus {
        assert_eq!(v.sregs.cs.dpl, 3, "the test guest runs at CPL3");
        assert!(v.xsave.is_some() || v.fpu.is_some());
        assert!(!v.msrs.is_empty());
    }
    assert!(d.timing.is_some());
}

#[test]
fn describe_state_prints_every_section() {
    let path = golden().to_string_lossy().into_owned();
    let out = std::process::Command::new(cpr_tests::bin("cpr-vmm"))
        .args(["--describe-state", &path])
        .output()
        .expect("run cpr-vmm");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for expect in [
        "cpr state format 1.0",
        "machine: 2 vCPUs, 64 MiB RAM",
        "vcpu 0: rip",
        "vcpu 1: rip",
        "serial:",
        "i8042:",
        "timing:",
    ] {
        assert!(text.contains(expect), "missing {expect:?} in:\n{text}");
    }
}

#[test]
fn describe_state_refuses_a_corrupt_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = std::fs::read(golden()).expect("golden");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    let bad = dir.path().join("bad.bin");
    std::fs::write(&bad, &bytes).expect("write");
    let (status, err) = run_vmm(&["--describe-state", &bad.to_string_lossy()], None, Duration::from_secs(10));
    assert_eq!(code(status), 31, "{err}");
    assert!(err.contains("checksum mismatch"), "{err}");
    let (status, err) = run_vmm(&["--describe-state", "/nonexistent.bin"], None, Duration::from_secs(10));
    assert_eq!(code(status), 31, "{err}");
    assert!(err.contains("cannot read /nonexistent.bin"), "{err}");
}

#[test]
fn state_formats_lists_what_is_written_and_read() {
    let out = std::process::Command::new(cpr_tests::bin("cpr-vmm")).arg("--state-formats").output().expect("run");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "writes: 1.0\nreads: 1\n");
}
