//! The short chaos run in CI (`cpr_tests::chaos`): 12 rounds of `cprctl upgrade --all` of three
//! CPL3 test-guest VMs on the real `/dev/kvm`, killing in turn an old VMM, a new VMM and cprd at
//! a random moment 0–5 ms into each. No guest may be lost but by killing the VMM that ran it,
//! and no VM may be left with two VMMs. `cpr-bench --chaos N` is the long run
//! (`docs/benchmarks.md`); `CPRD_CHAOS_SEED` replays a run.
#![allow(clippy::tests_outside_test_module)] // integration tests: every test is at the top level

use cpr_tests::chaos;

#[test]
fn killing_an_old_vmm_a_new_vmm_or_cprd_mid_upgrade_loses_no_guest_by_cprds_fault() {
    cpr_tests::require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = chaos::seed();
    eprintln!("chaos seed {seed} (CPRD_CHAOS_SEED={seed} replays it)");
    let report = chaos::run(dir.path(), 3, 12, seed, |line| eprintln!("{line}"));
    let table = chaos::render(&report, 3, seed);
    eprintln!("{table}");
    assert!(report.defects.is_empty(), "guests lost by cprd's fault:\n{table}");
    for target in [chaos::Target::OldVmm, chaos::Target::NewVmm, chaos::Target::Cprd] {
        assert!(report.kills.get(&target).copied().unwrap_or(0) > 0, "no {} was ever killed:\n{table}", target.name());
    }
    assert!(report.alive >= 3 * 12 - report.lost_allowed.len(), "{table}");
}
