//! This release against the previous one (issue 16), with real processes: the previous release's
//! `cprd`, `cprctl` and `cpr-vmm` are built from its commit by `scripts/previous-release` (cached
//! by commit). cpr-vmm hands a guest to and from the previous release's cpr-vmm; cprd takes over
//! VMs a previous cprd started, by restart and by re-exec, and the previous cprd takes them back
//! (a downgrade).
//!
//! Guests: the CPL3 test guest on the real `/dev/kvm` (kvm_pvm here; hardware-assisted KVM alike).
#![allow(clippy::tests_outside_test_module)] // integration tests: every test is at the top level

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cpr_proto::control::RunState;
use cpr_tests::daemon::{Cprd, PrivateBus, define_vm, kill_vmms, text};
use cpr_tests::{Chain, check_heartbeats, heartbeats, previous_release_bin_dir, require_kvm, wait_until};

/// This build's release (the workspace version).
const THIS_RELEASE: &str = env!("CARGO_PKG_VERSION");

/// The previous release's binary `name`.
fn previous(name: &str) -> PathBuf {
    previous_release_bin_dir().join(name)
}

/// The release a binary says it is (`--version`: `NAME X.Y.Z`).
fn release_of(binary: &Path) -> String {
    let out = std::process::Command::new(binary).arg("--version").output().expect("run --version");
    String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap_or_default().to_string()
}

/// The previous release is another release, and a real one.
fn previous_release() -> String {
    let release = release_of(&previous("cpr-vmm"));
    assert!(!release.is_empty() && release != THIS_RELEASE, "previous release {release:?}, this one {THIS_RELEASE}");
    release
}

#[test]
fn cpr_vmm_hands_a_guest_to_and_from_the_previous_release_twenty_times() {
    require_kvm();
    let before = previous_release();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut chain = Chain::start_program(&previous("cpr-vmm"), dir.path(), &["--memory", "256M", "--vcpus", "2"], &[]);
    let first = chain.status().test_guest.expect("test guest");
    let mut counter = chain.wait_progress(first.counter);
    for generation in 1..=20_u64 {
        let mut req = chain.request();
        // Odd generations run this release, even ones the previous release again.
        req.binary = if generation % 2 == 1 { cpr_tests::bin("cpr-vmm") } else { previous("cpr-vmm") };
        let to = release_of(&req.binary);
        chain.hand_off(&req).unwrap_or_else(|e| panic!("handoff {generation} to {to}: {e}"));
        let st = chain.status();
        assert_eq!((st.state, st.generation), (RunState::Running, generation), "handoff {generation} to {to}");
        let tg = st.test_guest.expect("test guest");
        assert!(tg.counter >= counter, "handoff {generation} to {to}: the guest's counter went back");
        assert_eq!(tg.fail, 0, "handoff {generation} to {to}: the guest's self-check failed");
        assert_eq!(tg.pattern_sum, first.pattern_sum, "handoff {generation} to {to}: its memory changed");
        counter = chain.wait_progress(tg.counter);
    }
    let seq = heartbeats(&chain.serial).last().map_or(0, |h| h.seq);
    assert!(wait_until(Duration::from_secs(20), || heartbeats(&chain.serial).last().map_or(0, |h| h.seq) >= seq + 2));
    check_heartbeats(&heartbeats(&chain.serial)).expect("heartbeats continuous across both releases");
    println!("cpr-vmm {before} <-> {THIS_RELEASE}: 20 handoffs, downtimes (us) {:?}", downtimes(&chain));
}

fn downtimes(chain: &Chain) -> Vec<u64> {
    chain.reports.iter().map(|r| r.downtime_ns() / 1000).collect()
}

/// A private bus, a configuration whose allow-list holds both releases' cpr-vmm (the previous one
/// the default), two VM definitions, and the directory a cprd runs in.
struct Host {
    dir: tempfile::TempDir,
    bus: PrivateBus,
    config: PathBuf,
}

impl Host {
    fn new() -> Self {
        require_kvm();
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let bus = PrivateBus::start(dir.path());
        let config = dir.path().join("etc");
        std::fs::create_dir_all(config.join("vms")).expect("config dir");
        let allowed =
            [format!("{}/*", cpr_tests::bin_dir().display()), format!("{}/*", previous_release_bin_dir().display())];
        std::fs::write(
            config.join("cprd.toml"),
            format!(
                "[vmm]\nallowed = {allowed:?}\ndefault = {:?}\n\n[handoff]\ntimeout_ms = 15000\n",
                previous("cpr-vmm").display().to_string()
            ),
        )
        .expect("cprd.toml");
        for vm in ["vm1", "vm2"] {
            define_vm(&config, vm, "memory = \"64M\"\nvcpus = 1\n");
        }
        Self { dir, bus, config }
    }

    /// Starts the cprd binary at `program` on this host's directories.
    fn cprd(&self, program: &Path) -> Cprd {
        Cprd::start_program(program, self.dir.path(), &self.bus, &self.config, &[], None)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        kill_vmms(&self.dir.path().join("run"));
    }
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", text(out));
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// The release of the cprd on the bus (its `Version` property).
fn cprd_release(cprd: &Cprd) -> String {
    let out = cprd.busctl(None, &["get-property", "org.cprd1", "/org/cprd1", "org.cprd1.Manager", "Version"]);
    String::from_utf8_lossy(&out.stdout).trim().trim_start_matches("s ").trim_matches('"').to_string()
}

/// `(main_pid, generation)` of each VM, after checking that each runs and its guest is alive.
fn vms_alive(cprd: &Cprd) -> Vec<(u64, u64)> {
    ["vm1", "vm2"]
        .iter()
        .map(|vm| {
            let st = json(&cprd.cprctl(&["--json", "status", vm]));
            assert_eq!(st["state"], "running", "{vm}: {st}\n{}", cprd.log_text());
            let console = cprd.runtime_dir.join("vms").join(format!("{vm}.console"));
            let seq = heartbeats(&console).last().map_or(0, |h| h.seq);
            assert!(
                wait_until(Duration::from_secs(20), || heartbeats(&console).last().map_or(0, |h| h.seq) > seq + 1),
                "{vm}'s guest is silent"
            );
            check_heartbeats(&heartbeats(&console)).unwrap_or_else(|e| panic!("{vm}: {e}"));
            (st["main_pid"].as_u64().unwrap_or(0), st["generation"].as_u64().unwrap_or(0))
        })
        .collect()
}

/// Upgrades `vm` to the cpr-vmm at `binary` through `cprd`; returns the new generation.
fn upgrade(cprd: &Cprd, vm: &str, binary: &Path) -> u64 {
    let out = cprd.cprctl(&["upgrade", vm, "--binary", &binary.to_string_lossy()]);
    assert!(out.status.success(), "upgrade {vm} to {}: {}\n{}", binary.display(), text(&out), cprd.log_text());
    json(&cprd.cprctl(&["--json", "status", vm]))["generation"].as_u64().unwrap_or(0)
}

/// A previous cprd runs two VMs on the previous cpr-vmm; it is killed and this cprd started on
/// the same directories: it re-attaches both from their records (same VMMs, same generations)
/// and upgrades one to this release's cpr-vmm. Then the downgrade: this cprd is killed and the
/// previous one takes both back, and hands the other VM to this release's cpr-vmm itself.
#[test]
fn this_cprd_takes_over_a_previous_cprds_vms_by_restart_and_gives_them_back() {
    let before = previous_release();
    let host = Host::new();
    let mut old = host.cprd(&previous("cprd"));
    assert_eq!(cprd_release(&old), before);
    for vm in ["vm1", "vm2"] {
        assert!(old.cprctl(&["start", vm]).status.success(), "{}", old.log_text());
    }
    let started = vms_alive(&old);
    old.kill9();

    let mut new = host.cprd(&cpr_tests::bin("cprd"));
    assert_eq!(cprd_release(&new), THIS_RELEASE);
    assert_eq!(vms_alive(&new), started, "this cprd took both VMs back as they ran\n{}", new.log_text());
    assert_eq!(upgrade(&new, "vm1", &cpr_tests::bin("cpr-vmm")), 1);
    let st = json(&new.cprctl(&["--json", "status", "vm1"]));
    assert_eq!(st["vmm_release"], THIS_RELEASE, "{st}");
    let upgraded = vms_alive(&new);
    new.kill9();

    let old = host.cprd(&previous("cprd"));
    assert_eq!(cprd_release(&old), before);
    assert_eq!(vms_alive(&old), upgraded, "the previous cprd took both VMs back\n{}", old.log_text());
    assert_eq!(upgrade(&old, "vm2", &cpr_tests::bin("cpr-vmm")), 1);
    assert_eq!(upgrade(&old, "vm1", &previous("cpr-vmm")), 2);
    vms_alive(&old);
}

/// Copies `from` over `to` the way a package manager replaces a file: a new inode renamed into
/// place.
fn install(from: &Path, to: &Path) {
    let staged = to.with_extension("new");
    std::fs::copy(from, &staged).expect("copy");
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&staged, to).expect("rename");
}

/// Sends SIGHUP to `cprd` and waits until it has re-executed into `release` and finished the
/// reload (it says `cprd RELEASE ready` once more).
fn reload_into(cprd: &Cprd, release: &str) {
    let ready = format!("cprd {release} ready");
    let before = cprd.log_text().matches(&ready).count();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(cprd.child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    let done = wait_until(Duration::from_secs(60), || cprd.log_text().matches(&ready).count() > before);
    assert!(done && cprd_release(cprd) == release, "cprd did not re-execute into {release}: {}", cprd.log_text());
    assert!(cprd.log_text().contains(&format!("cprd {release} re-executed")), "{}", cprd.log_text());
}

/// A previous cprd, its binary replaced by this release's on disk, re-executes on reload (same
/// PID) and keeps both VMs; then the previous binary is put back and this cprd re-executes into it
/// (a downgrade by re-exec): it keeps both VMs, and its reload moves the one this cprd had put on
/// another VMM binary back to the configured one, as a reload does.
#[test]
fn a_previous_cprd_re_executes_into_this_release_and_back_keeping_its_vms() {
    let before = previous_release();
    let host = Host::new();
    let program = host.dir.path().join("cprd");
    install(&previous("cprd"), &program);
    let cprd = host.cprd(&program);
    assert_eq!(cprd_release(&cprd), before);
    for vm in ["vm1", "vm2"] {
        assert!(cprd.cprctl(&["start", vm]).status.success(), "{}", cprd.log_text());
    }
    let started = vms_alive(&cprd);
    let pid = cprd.child.id();

    install(&cpr_tests::bin("cprd"), &program);
    reload_into(&cprd, THIS_RELEASE);
    assert_eq!(cprd.child.id(), pid);
    assert_eq!(vms_alive(&cprd), started, "the re-executed cprd kept both VMs\n{}", cprd.log_text());
    assert_eq!(upgrade(&cprd, "vm1", &cpr_tests::bin("cpr-vmm")), 1);
    let vm1 = json(&cprd.cprctl(&["--json", "status", "vm1"]));
    assert_eq!(vm1["vmm_release"], THIS_RELEASE, "{vm1}");

    install(&previous("cprd"), &program);
    reload_into(&cprd, &before);
    let kept = vms_alive(&cprd);
    assert_eq!(kept[1], started[1], "vm2 kept as it ran\n{}", cprd.log_text());
    assert_eq!(kept[0].1, 2, "vm1 back on the configured VMM by the reload\n{}", cprd.log_text());
    let vm1 = json(&cprd.cprctl(&["--json", "status", "vm1"]));
    assert_eq!(vm1["vmm_release"], before.as_str(), "{vm1}");
}
