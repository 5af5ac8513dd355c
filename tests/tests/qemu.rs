//! cprd driving real QEMU (>= 10.0, cpr-transfer) with a real Linux guest: Debian's stock
//! kernel and the probe initramfs (`tests/src/linux_guest.rs`). `accel=tcg` on the development
//! machines, whose `/dev/kvm` (kvm_pvm) cannot boot a stock kernel; cpr-transfer itself is the
//! same code path with `accel=kvm`.
#![allow(clippy::tests_outside_test_module)] // integration tests: every test is at the top level

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cpr_tests::daemon::{Cprd, PrivateBus, define_vm, kill_vmms, text, write_config};
use cpr_tests::linux_guest::{Echo, NetNs, check_probe, probe_lines, qemu, vm_definition};
use cpr_tests::{wait_until, write_executable};

struct Setup {
    dir: tempfile::TempDir,
    bus: PrivateBus,
    cprd: Cprd,
}

impl Drop for Setup {
    fn drop(&mut self) {
        kill_vmms(&self.cprd.runtime_dir);
    }
}

fn setup(vms: &[(&str, String)], env: &[(&str, &str)]) -> Setup {
    let _ = qemu();
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = PrivateBus::start(dir.path());
    let extra = format!("{}/fake-*", dir.path().display());
    let config = write_config(dir.path(), &["/usr/bin/qemu-system-*", &extra]);
    for (name, body) in vms {
        define_vm(&config, name, body);
    }
    let cprd = Cprd::start_with_env(dir.path(), &bus, &config, env);
    Setup { dir, bus, cprd }
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", text(out));
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

fn console(s: &Setup, vm: &str) -> String {
    std::fs::read_to_string(s.cprd.runtime_dir.join("vms").join(format!("{vm}.console"))).unwrap_or_default()
}

fn last_seq(s: &Setup, vm: &str) -> u64 {
    probe_lines(&console(s, vm)).last().map_or(0, |l| l.seq)
}

/// Starts `vm` and waits until the probe prints.
fn start_and_wait(s: &Setup, vm: &str) {
    let out = s.cprd.cprctl(&["start", vm]);
    assert!(out.status.success(), "start {vm}: {}\n{}", text(&out), s.cprd.log_text());
    assert!(wait_until(Duration::from_secs(90), || last_seq(s, vm) >= 3), "{vm} never printed: {}", console(s, vm));
}

/// Waits until the probe has printed `n` more lines, then checks the whole console.
fn still_running(s: &Setup, vm: &str, n: u64) {
    let seq = last_seq(s, vm);
    assert!(wait_until(Duration::from_secs(30), || last_seq(s, vm) >= seq + n), "{vm} went silent after seq {seq}");
    check_probe(&probe_lines(&console(s, vm))).unwrap_or_else(|e| panic!("{vm}: {e}"));
}

fn status(s: &Setup, vm: &str) -> serde_json::Value {
    json(&s.cprd.cprctl(&["--json", "status", vm]))
}

fn pid_gone(pid: u64) -> bool {
    u32::try_from(pid).is_ok_and(cpr_tests::process_gone)
}

#[test]
fn twenty_chained_upgrades_keep_guest_ram_and_console() {
    let s = setup(&[("lin", vm_definition("256M", ""))], &[]);
    start_and_wait(&s, "lin");
    // A console client attached before the first upgrade.
    let mut client = s.cprd.cprctl_command(&["console", "lin"]).stdout(Stdio::piped()).spawn().expect("cprctl console");
    let seen = Arc::new(Mutex::new(String::new()));
    let reader = {
        let (out, seen) = (client.stdout.take().expect("stdout"), Arc::clone(&seen));
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut s = seen.lock().expect("lock");
                s.push_str(&line);
                s.push('\n');
            }
        })
    };
    assert!(wait_until(Duration::from_secs(20), || !probe_lines(&seen.lock().expect("lock")).is_empty()));
    let first_seq = probe_lines(&seen.lock().expect("lock"))[0].seq;
    let mut pids = vec![status(&s, "lin")["main_pid"].as_u64().expect("pid")];
    for generation in 1..=20 {
        let up = json(&s.cprd.cprctl(&["--json", "upgrade", "lin"]));
        assert_eq!(up["generation"], generation, "{up}");
        pids.push(status(&s, "lin")["main_pid"].as_u64().expect("pid"));
    }
    still_running(&s, "lin", 5);
    let st = status(&s, "lin");
    assert_eq!(st["generation"], 20);
    assert_eq!(st["state"], "running");
    let mut distinct = pids.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 21, "every generation is a new QEMU: {pids:?}");
    for old in &pids[..20] {
        assert!(wait_until(Duration::from_secs(10), || pid_gone(*old)), "old QEMU {old} still runs");
    }
    // The attached client read every line from before the first upgrade to after the last.
    let last = last_seq(&s, "lin");
    assert!(wait_until(Duration::from_secs(10), || probe_lines(&seen.lock().expect("lock"))
        .last()
        .is_some_and(|l| l.seq >= last)));
    let _ = client.kill();
    let _ = client.wait();
    let _ = reader.join();
    let got = probe_lines(&seen.lock().expect("lock"));
    check_probe(&got).unwrap_or_else(|e| panic!("console client: {e}"));
    assert!(got[0].seq <= first_seq && got.last().map_or(0, |l| l.seq) >= last);
    let history = json(&s.cprd.cprctl(&["--json", "history"]));
    let ok = history.as_array().expect("array").iter().filter(|r| r["ok"] == true && r["vm"] == "lin").count();
    assert_eq!(ok, 20, "{history}");
    let out = s.cprd.cprctl(&["stop", "lin"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(wait_until(Duration::from_secs(10), || pid_gone(pids[20])));
}

#[test]
fn tcp_connection_to_the_guest_survives_ten_upgrades() {
    let ns = NetNs::create("tcp");
    let nic = format!("[[nic]]\ntap = \"cprt0\"\nnetns = {:?}\nmodel = \"e1000\"\n", ns.path().display().to_string());
    let s = setup(&[("net", vm_definition("256M", &nic))], &[]);
    start_and_wait(&s, "net");
    assert!(ns.ip(&["addr", "add", "10.0.2.1/24", "dev", "cprt0"]) && ns.ip(&["link", "set", "cprt0", "up"]));
    assert!(
        wait_until(Duration::from_secs(30), || console(&s, "net").contains("ECHO listening")),
        "{}",
        console(&s, "net")
    );
    let mut echo = Echo::connect(&ns);
    echo.check(0);
    for generation in 1..=10 {
        let up = json(&s.cprd.cprctl(&["--json", "upgrade", "net"]));
        assert_eq!(up["generation"], generation);
        echo.check(generation);
    }
    still_running(&s, "net", 3);
    let out = s.cprd.cprctl(&["stop", "net"]);
    assert!(out.status.success(), "{}", text(&out));
    // cprd held the tap: it is gone with the VM.
    assert!(wait_until(Duration::from_secs(10), || !ns.ip(&["link", "show", "cprt0"])), "tap outlived the VM");
}

fn upgrade_fails_and_guest_runs_on(s: &Setup, vm: &str, binary: &str, error: &str) -> String {
    let before = status(s, vm);
    let mut args = vec!["upgrade", vm];
    if !binary.is_empty() {
        args.extend(["--binary", binary]);
    }
    let out = s.cprd.cprctl(&args);
    assert!(!out.status.success(), "upgrade should fail: {}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(error), "expected {error}: {err}");
    eprintln!("refused as expected: {}", err.trim());
    let after = status(s, vm);
    assert_eq!(
        (&after["main_pid"], &after["generation"], &after["state"]),
        (&before["main_pid"], &before["generation"], &serde_json::json!("running"))
    );
    still_running(s, vm, 5);
    err.into_owned()
}

/// Serves QMP on the connected socket at fd 4 as QEMU 9.2.0 would greet.
const FAKE_QEMU_9: &str = r#"#!/usr/bin/python3
import json, socket
c = socket.socket(fileno=4)
f = c.makefile("rw")
f.write(json.dumps({"QMP": {"version": {"qemu": {"major": 9, "minor": 2, "micro": 0}, "package": "fake"}, "capabilities": []}}) + "\n")
f.flush()
for line in f:
    f.write(json.dumps({"return": {}, "id": json.loads(line).get("id")}) + "\n")
    f.flush()
"#;

#[test]
fn a_binary_that_is_not_qemu_10_is_refused_before_anything_changes() {
    let s = setup(&[("lin", vm_definition("128M", ""))], &[]);
    start_and_wait(&s, "lin");
    let fake = s.dir.path().join("fake-qemu");
    write_executable(&fake, "#!/bin/sh\necho 'QEMU emulator version 9.2.0'\nexit 1\n");
    upgrade_fails_and_guest_runs_on(&s, "lin", &fake.display().to_string(), "Incompatible");
    // A process that speaks real QMP but says it is QEMU 9.2 (on the QMP socket cprd hands it).
    let old = s.dir.path().join("fake-qemu9");
    write_executable(&old, FAKE_QEMU_9);
    let err = upgrade_fails_and_guest_runs_on(&s, "lin", &old.display().to_string(), "Incompatible");
    assert!(err.contains("is QEMU 9.2.0; cpr-transfer needs QEMU 10.0 or newer"), "{err}");
    // Still upgradable afterwards.
    assert_eq!(json(&s.cprd.cprctl(&["--json", "upgrade", "lin"]))["generation"], 1);
    still_running(&s, "lin", 3);
}

/// The pre-flight starts a candidate QEMU in the VM's box, as the VM's own uid, never as root: a
/// QEMU that will not start as root is taken. (Before, its probe ran as root and the upgrade was
/// refused: "is not a working QEMU".)
#[test]
fn the_preflight_probes_a_qemu_candidate_in_the_vms_box_not_as_root() {
    let s = setup(&[("lin", vm_definition("128M", ""))], &[]);
    start_and_wait(&s, "lin");
    let path = s.dir.path().join("fake-qemu-not-as-root");
    let script = format!(
        "#!/bin/sh\nif [ \"$(id -u)\" = 0 ]; then echo 'started as root' >&2; exit 3; fi\nexec {} \"$@\"\n",
        qemu().display()
    );
    write_executable(&path, script);
    let up = s.cprd.cprctl(&["--json", "upgrade", "lin", "--binary", &path.display().to_string()]);
    assert_eq!(json(&up)["generation"], 1);
    still_running(&s, "lin", 2);
}

/// Every QEMU generation boots the kernel and initramfs cprd opened when the VM started, as
/// descriptors: with both files deleted from the disk (as a kernel package's removal does), the
/// VM still upgrades, also after a cprd restart without an fd store (cprd takes them back from
/// QEMU). (Before, QEMU opened them by path, and the new QEMU of the first upgrade failed to start.)
#[test]
fn a_qemu_guest_upgrades_after_its_kernel_files_are_deleted() {
    let s = setup(&[], &[]);
    let kernel = s.dir.path().join("vmlinuz");
    let initrd = s.dir.path().join("initrd.img");
    std::fs::copy(cpr_tests::linux_guest::kernel(), &kernel).expect("copy kernel");
    std::fs::copy(cpr_tests::linux_guest::initramfs(), &initrd).expect("copy initramfs");
    let def = vm_definition("128M", "")
        .replace(&cpr_tests::linux_guest::kernel().display().to_string(), &kernel.display().to_string())
        .replace(&cpr_tests::linux_guest::initramfs().display().to_string(), &initrd.display().to_string());
    define_vm(&s.cprd.config_dir, "lin", &def);
    assert!(s.cprd.cprctl(&["reload"]).status.success());
    start_and_wait(&s, "lin");
    let pid = status(&s, "lin")["main_pid"].as_u64().expect("pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(&kernel.display().to_string()),
        "QEMU was given the kernel's path"
    );
    std::fs::remove_file(&kernel).expect("rm kernel");
    std::fs::remove_file(&initrd).expect("rm initramfs");
    assert_eq!(json(&s.cprd.cprctl(&["--json", "upgrade", "lin"]))["generation"], 1);
    still_running(&s, "lin", 2);
    // The machine type pinned at the start, kept by every generation, as status shows it.
    assert_eq!(status(&s, "lin")["machine_type"], "pc-q35-10.0");
    let mut s = s;
    s.cprd.kill9();
    let dir = s.cprd.runtime_dir.parent().expect("dir").to_path_buf();
    let config = s.cprd.config_dir.clone();
    s.cprd = Cprd::start(&dir, &s.bus, &config);
    assert_eq!(json(&s.cprd.cprctl(&["--json", "upgrade", "lin"]))["generation"], 2);
    still_running(&s, "lin", 2);
}

/// A QEMU that cannot load the running one's state is refused in pre-flight, by a trial handoff
/// of an empty VM between the two binaries, with what the new QEMU said, before the guest is
/// touched. Here a wrapper plays a QEMU that reads no CPR state (the real case, QEMU 10.0 after
/// 11.1, is in `tests/tests/versions.rs`). (Before the trial, the guest was paused, the new QEMU
/// died, and the handoff rolled back: `UpgradeFailed`.)
#[test]
fn a_qemu_that_cannot_take_the_guest_is_refused_by_a_trial_before_the_guest_is_touched() {
    let s = setup(&[("lin", vm_definition("128M", ""))], &[]);
    start_and_wait(&s, "lin");
    let before = status(&s, "lin");
    let path = s.dir.path().join("fake-qemu-reads-no-cpr-state");
    let script = format!(
        "#!/bin/sh\ncase \" $* \" in *\" -incoming \"*) echo 'qemu-system-x86_64: vmstate_load_state error -2 (fake)' >&2; \
         exit 1 ;; esac\nexec {} \"$@\"\n",
        qemu().display()
    );
    write_executable(&path, script);
    let out = s.cprd.cprctl(&["upgrade", "lin", "--binary", &path.display().to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("org.cprd1.Error.Incompatible"), "{err}");
    assert!(err.contains("trial handoff") && err.contains("vmstate_load_state error -2 (fake)"), "{err}");
    let after = status(&s, "lin");
    assert_eq!((&after["generation"], &after["main_pid"]), (&before["generation"], &before["main_pid"]));
    still_running(&s, "lin", 2);
}

#[test]
fn new_qemu_killed_right_after_start_rolls_back() {
    let s = setup(&[("lin", vm_definition("128M", ""))], &[("CPRD_FAULT", "qemu-kill-new-after-start")]);
    start_and_wait(&s, "lin");
    upgrade_fails_and_guest_runs_on(&s, "lin", "", "UpgradeFailed");
    upgrade_fails_and_guest_runs_on(&s, "lin", "", "UpgradeFailed");
}

/// A raw disk image for a QEMU VM (attached, not read by the probe: it checks that image
/// locking and block-device hand-over do not get in the way of a handoff or a rollback).
fn disk(dir: &Path) -> String {
    let image = dir.join("disk.raw");
    std::fs::File::create(&image).and_then(|f| f.set_len(16 << 20)).expect("disk image");
    format!("[[disk]]\npath = {:?}\n", image.display().to_string())
}

#[test]
fn new_qemu_killed_after_migrate_rolls_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s =
        setup(&[("lin", vm_definition("128M", &disk(tmp.path())))], &[("CPRD_FAULT", "qemu-kill-new-after-migrate")]);
    start_and_wait(&s, "lin");
    upgrade_fails_and_guest_runs_on(&s, "lin", "", "UpgradeFailed");
    upgrade_fails_and_guest_runs_on(&s, "lin", "", "UpgradeFailed");
}

#[test]
fn one_upgrade_all_moves_a_cpr_vmm_guest_and_a_qemu_guest() {
    cpr_tests::require_kvm();
    let s = setup(&[("lin", vm_definition("128M", "")), ("cpl3", "memory = \"64M\"\n".to_string())], &[]);
    start_and_wait(&s, "lin");
    let out = s.cprd.cprctl(&["start", "cpl3"]);
    assert!(out.status.success(), "{}", text(&out));
    let all = json(&s.cprd.cprctl(&["--json", "upgrade", "--all"]));
    let rows = all.as_array().expect("array");
    assert_eq!(rows.len(), 2, "{all}");
    assert!(rows.iter().all(|r| r["ok"] == true), "{all}");
    assert_eq!(status(&s, "lin")["generation"], 1);
    assert_eq!(status(&s, "cpl3")["generation"], 1);
    still_running(&s, "lin", 3);
    let hb = cpr_tests::heartbeats(&s.cprd.runtime_dir.join("vms/cpl3.console"));
    cpr_tests::check_heartbeats(&hb).expect("cpl3 guest continuous");
}

#[test]
fn a_restarted_cprd_takes_its_qemu_guest_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ns = NetNs::create("re");
    let body = format!(
        "{}[[nic]]\ntap = \"cprr0\"\nnetns = {:?}\nmodel = \"e1000\"\n",
        disk(tmp.path()),
        ns.path().display().to_string()
    );
    let mut s = setup(&[("lin", vm_definition("128M", &body))], &[]);
    start_and_wait(&s, "lin");
    let pid = status(&s, "lin")["main_pid"].clone();
    s.cprd.kill9();
    // The guest runs on without cprd; its console output waits in the socket pair.
    std::thread::sleep(Duration::from_millis(500));
    let config = s.cprd.config_dir.clone();
    let restarted = Cprd::start(s.dir.path(), &s.bus, &config);
    s.cprd = restarted;
    let st = status(&s, "lin");
    assert_eq!((st["state"].as_str(), &st["main_pid"]), (Some("running"), &pid), "{st}");
    // cprd took the memfd, the console and the tap back from QEMU: the console flows again and
    // the next upgrade hands all of them over.
    still_running(&s, "lin", 5);
    assert_eq!(json(&s.cprd.cprctl(&["--json", "upgrade", "lin"]))["generation"], 1);
    still_running(&s, "lin", 5);
    assert!(ns.ip(&["link", "show", "cprr0"]), "the tap device is still there");
}

#[test]
fn a_cprd_that_dies_right_after_a_handoff_is_finished_by_the_next_one() {
    // cprd aborts between the handoff and recording it (fault injection: no real crash can be
    // aimed there); the call fails, the guest runs on in the new QEMU.
    let (s, old, st) = cprd_dies_with("die-after-handoff");
    assert_eq!((st["state"].as_str(), st["generation"].as_u64()), (Some("running"), Some(1)), "{st}");
    assert_ne!(st["main_pid"].as_u64(), Some(old), "{st}");
    assert!(wait_until(Duration::from_secs(10), || pid_gone(old)), "old QEMU {old} still runs");
    still_running(&s, "lin", 5);
    assert_eq!(json(&s.cprd.cprctl(&["--json", "upgrade", "lin"]))["generation"], 2);
    still_running(&s, "lin", 3);
}

/// Runs an upgrade of `lin` under a cprd that aborts right after journaling `phase`, and starts
/// the next cprd. Returns the setup, the QEMU pid before the upgrade, and the status after.
fn cprd_dies_at(phase: &str) -> (Setup, u64, serde_json::Value) {
    cprd_dies_with(&format!("die-at:{phase}"))
}

/// The same with the cprd fault `fault`.
fn cprd_dies_with(fault: &str) -> (Setup, u64, serde_json::Value) {
    let mut s = setup(&[("lin", vm_definition("128M", ""))], &[("CPRD_FAULT", fault)]);
    start_and_wait(&s, "lin");
    let old = status(&s, "lin")["main_pid"].as_u64().expect("pid");
    let out = s.cprd.cprctl(&["upgrade", "lin"]);
    assert!(!out.status.success(), "cprd died during the call: {}", text(&out));
    let _ = s.cprd.child.wait();
    let config = s.cprd.config_dir.clone();
    s.cprd = Cprd::start(s.dir.path(), &s.bus, &config);
    let st = status(&s, "lin");
    (s, old, st)
}

/// cprd killed after the decision is on record but before its `cont` reached the new QEMU: the
/// new QEMU (started with -S) holds the whole state, paused, and has run nothing. The next cprd
/// carries the decision out (`cont`), it does not roll back, and the old QEMU is ended. Before the
/// commit point was cprd's, the new QEMU ran the guest by itself and no record said so.
#[test]
fn a_cprd_that_dies_after_deciding_is_followed_by_one_that_commits() {
    let (s, old, st) = cprd_dies_at("committed");
    assert_eq!((st["state"].as_str(), st["generation"].as_u64()), (Some("running"), Some(1)), "{st}");
    assert_ne!(st["main_pid"].as_u64(), Some(old), "{st}");
    assert!(wait_until(Duration::from_secs(10), || pid_gone(old)), "old QEMU {old} still runs");
    still_running(&s, "lin", 5);
}

/// cprd killed after `migrate` went out but before the decision: the next cprd kills the new
/// QEMU, waits until it is gone, and only then makes the old one run the guest again.
#[test]
fn a_cprd_that_dies_before_deciding_is_followed_by_one_that_rolls_back() {
    let (s, old, st) = cprd_dies_at("switching");
    assert_eq!((st["state"].as_str(), st["generation"].as_u64()), (Some("running"), Some(0)), "{st}");
    assert_eq!(st["main_pid"].as_u64(), Some(old), "the old QEMU runs the guest again: {st}");
    still_running(&s, "lin", 5);
    assert_eq!(json(&s.cprd.cprctl(&["--json", "upgrade", "lin"]))["generation"], 1, "a good upgrade follows");
    still_running(&s, "lin", 3);
}
/// A QEMU that cprd cannot reach once it is started to take a guest over (`-incoming`): its QMP
/// chardev listens at `@QMP@`, a socket only the test uses, instead of on the socket cprd bound and
/// handed it at fd 4. Fd 4 stays open and listening, so cprd's connection goes through and is
/// never greeted: cprd waits for the new QEMU until its handoff timeout. Started any other way
/// (cprd's pre-flight probe), it is QEMU unchanged.
const UNREACHABLE_QEMU: &str = r#"#!/bin/sh
case " $* " in *" -incoming "*) ;; *) exec @QEMU@ "$@" ;; esac
for a in "$@"; do
    shift
    case "$a" in
    socket,id=qmp,fd=4,*) set -- "$@" "socket,id=qmp,path=@QMP@,server=on,wait=off" ;;
    *) set -- "$@" "$a" ;;
    esac
done
exec @QEMU@ "$@"
"#;

/// The run state of the QEMU whose monitor listens at `qmp` (`query-status` on a connection of its
/// own), or `None` while it cannot be asked.
fn qmp_status(qmp: &Path) -> Option<String> {
    let stream = std::os::unix::net::UnixStream::connect(qmp).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut writer = stream.try_clone().ok()?;
    writer.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-status\"}\n").ok()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let msg: serde_json::Value = serde_json::from_str(&line).ok()?;
        if let Some(state) = msg.pointer("/return/status").and_then(serde_json::Value::as_str) {
            return Some(state.to_string());
        }
    }
}

/// An upgrade of `lin` to [`UNREACHABLE_QEMU`], caught while cprd waits for the new QEMU.
struct Unreachable {
    /// The running `cprctl upgrade` (stderr piped).
    upgrade: std::process::Child,
    /// The new QEMU's monitor (the test's).
    qmp: std::path::PathBuf,
    /// Every run state the new QEMU reported there.
    seen: std::collections::BTreeSet<String>,
    /// Probe lines the guest printed in two seconds once the new QEMU had the whole state, while
    /// cprd had decided nothing (the old QEMU was stopped): a guest that runs then runs in a QEMU
    /// nobody committed to.
    undecided_lines: u64,
}

/// Starts that upgrade, waits until the new QEMU holds the whole guest state (its monitor answers
/// with another state than `inmigrate`), then counts the probe lines of the next two seconds.
/// Checks that cprd still waits for the new QEMU then.
fn upgrade_to_an_unreachable_qemu(s: &Setup) -> Unreachable {
    // The new QEMU runs in the VM's box, where the one place it may create a socket is the VM's
    // channel directory; the box shows that directory at the host path below /run/cprd-vm.
    let chan = s.cprd.runtime_dir.join("vms").join("lin.chan");
    let qmp = chan.join("test-qmp.sock");
    let inside = Path::new("/run/cprd-vm").join(qmp.strip_prefix("/").expect("absolute"));
    let binary = s.dir.path().join("fake-unreachable-qemu");
    let script = UNREACHABLE_QEMU
        .replace("@QMP@", &inside.display().to_string())
        .replace("@QEMU@", &qemu().display().to_string());
    write_executable(&binary, script);
    let binary = binary.display().to_string();
    let mut upgrade = s
        .cprd
        .cprctl_command(&["upgrade", "lin", "--binary", &binary])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cprctl upgrade");
    let mut seen = std::collections::BTreeSet::new();
    let loaded = wait_until(Duration::from_secs(60), || {
        let state = qmp_status(&qmp);
        let loaded = state.as_deref().is_some_and(|st| st != "inmigrate");
        seen.extend(state);
        loaded
    });
    assert!(loaded, "the new QEMU never had the guest's state: {seen:?}\n{}", s.cprd.log_text());
    // What the guest printed before the old QEMU stopped it is in the console log by now.
    std::thread::sleep(Duration::from_millis(500));
    let from = last_seq(s, "lin");
    std::thread::sleep(Duration::from_secs(2));
    seen.extend(qmp_status(&qmp));
    let undecided_lines = last_seq(s, "lin").saturating_sub(from);
    assert!(
        upgrade.try_wait().expect("cprctl upgrade").is_none(),
        "cprd, which cannot reach the new QEMU, should still wait for it (handoff timeout 15 s; a slow host?)"
    );
    Unreachable { upgrade, qmp, seen, undecided_lines }
}

/// What both tests of an unreachable new QEMU require once it is over: no probe line while nobody
/// had committed, the old QEMU (`before`) running the guest again, whole, and the new QEMU never
/// `running` but `paused` with the whole state. `context` goes into the rollback's message.
fn assert_ran_nowhere_and_rolled_back(
    s: &Setup,
    before: &serde_json::Value,
    undecided_lines: u64,
    seen: &std::collections::BTreeSet<String>,
    context: &str,
) {
    assert!(
        undecided_lines <= 1,
        "the guest printed {undecided_lines} probe lines in a new QEMU nobody had committed to (it reported \
         {seen:?}), and then the old QEMU was resumed from the pause: the guest ran in two places"
    );
    let after = status(s, "lin");
    assert_eq!(
        (&after["state"], &after["generation"], &after["main_pid"]),
        (&serde_json::json!("running"), &before["generation"], &before["main_pid"]),
        "the old QEMU runs the guest again: {context}"
    );
    still_running(s, "lin", 25);
    assert!(
        !seen.contains("running") && seen.contains("paused"),
        "the new QEMU held the whole state, paused, and ran nothing: {seen:?}"
    );
}

/// Issue 13's QEMU hole: the incoming QEMU ran the guest by itself as soon as the migration
/// completed, while cprd, which had not seen it run, could still give up on it, kill it and `cont`
/// the old QEMU over RAM the new one had been changing. Here cprd cannot reach the new QEMU's
/// monitor, so it waits for it until its handoff timeout (15 s) and rolls back. Until then no
/// QEMU may run the guest (the new one holds the state paused: -S, and cprd's `cont` is the
/// commit), and the guest comes out of the rollback whole, in the old QEMU. (On e6c560d the new
/// QEMU runs the guest for the whole timeout, then the old one is resumed from the pause.)
#[test]
fn a_new_qemu_that_cprd_cannot_reach_runs_nothing_and_the_old_one_resumes_the_guest_whole() {
    let s = setup(&[("lin", vm_definition("128M", ""))], &[]);
    start_and_wait(&s, "lin");
    let before = status(&s, "lin");
    let mut caught = upgrade_to_an_unreachable_qemu(&s);
    // cprd gives up on the new QEMU at its handoff timeout, kills it and resumes the old one.
    let ended = wait_until(Duration::from_secs(120), || {
        caught.seen.extend(qmp_status(&caught.qmp));
        caught.upgrade.try_wait().ok().flatten().is_some()
    });
    assert!(ended, "the upgrade never ended\n{}", s.cprd.log_text());
    let out = caught.upgrade.wait_with_output().expect("cprctl upgrade");
    assert!(!out.status.success() && text(&out).contains("UpgradeFailed"), "{}", text(&out));
    assert_ran_nowhere_and_rolled_back(&s, &before, caught.undecided_lines, &caught.seen, &text(&out));
}

/// The same hole in recovery: cprd is killed while it waits for a new QEMU that already holds the
/// whole state. The next cprd used to find the old QEMU's migration `completed`, fail to see the
/// new one run (its monitor is out of reach), SIGKILL it without waiting for it to die and `cont`
/// the old one, over RAM the new one had been running the guest on since the migration completed.
/// Now it rolls back from its journal (`switching`: before any decision): the new QEMU, paused by
/// -S, ran nothing; it is killed and confirmed dead, then the old one resumes the guest whole.
#[test]
fn a_cprd_killed_while_an_unreachable_new_qemu_holds_the_state_is_followed_by_a_whole_rollback() {
    let mut s = setup(&[("lin", vm_definition("128M", ""))], &[]);
    start_and_wait(&s, "lin");
    let before = status(&s, "lin");
    let mut caught = upgrade_to_an_unreachable_qemu(&s);
    s.cprd.kill9();
    let _ = caught.upgrade.wait();
    let config = s.cprd.config_dir.clone();
    s.cprd = Cprd::start(s.dir.path(), &s.bus, &config);
    assert!(wait_until(Duration::from_secs(10), || qmp_status(&caught.qmp).is_none()), "the new QEMU is gone");
    assert_ran_nowhere_and_rolled_back(&s, &before, caught.undecided_lines, &caught.seen, &s.cprd.log_text());
}

/// Disks reach QEMU as descriptors that every generation shares. With QEMU's own image locking
/// on, the second generation refused `cont` after the commit ('Failed to get "write" lock') and
/// the VM needed attention; cprd locks the images itself instead (see `open_disks`).
#[test]
fn upgrades_of_a_qemu_guest_keep_its_disks_and_its_image_lock() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ro = tmp.path().join("ro.raw");
    std::fs::File::create(&ro).and_then(|f| f.set_len(1 << 20)).expect("ro image");
    let body = format!("{}[[disk]]\npath = {:?}\nreadonly = true\n", disk(tmp.path()), ro.display().to_string());
    let s = setup(&[("lin", vm_definition("128M", &body)), ("other", vm_definition("128M", &disk(tmp.path())))], &[]);
    start_and_wait(&s, "lin");
    for generation in 1..=3 {
        assert_eq!(json(&s.cprd.cprctl(&["--json", "upgrade", "lin"]))["generation"], generation);
    }
    still_running(&s, "lin", 3);
    // Another VM with the same writable image does not start; lin runs on.
    let out = s.cprd.cprctl(&["start", "other"]);
    assert!(!out.status.success(), "a second writer of disk.raw started");
    assert!(text(&out).contains("is in use by another VM"), "{}", text(&out));
    still_running(&s, "lin", 2);
}

/// The fields of `/proc/PID/status` named `key` (split on whitespace).
fn proc_status(pid: u64, key: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = text.lines().find(|l| l.starts_with(&format!("{key}:"))).unwrap_or("");
    line.split_whitespace().skip(1).map(str::to_string).collect()
}

/// The namespace `kind` of process `pid`, as the kernel names it (`mnt:[4026531841]`).
fn namespace(pid: u64, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).map(|p| p.display().to_string()).unwrap_or_default()
}

/// Checks what a boxed VMM runs with, from the kernel's view of it; returns its uid.
fn check_boxed(vm: &str, pid: u64, cprd_pid: u64) -> u64 {
    let uids = proc_status(pid, "Uid");
    let gids = proc_status(pid, "Gid");
    assert_eq!(uids.len(), 4, "{vm}: Uid line of pid {pid}");
    assert!(uids.iter().all(|u| *u == uids[0]) && uids[0] != "0", "{vm}: real, effective, saved, fs uid {uids:?}");
    assert!(gids.iter().all(|g| *g == uids[0]), "{vm}: gids {gids:?} are the uid's number");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(proc_status(pid, set), ["0000000000000000"], "{vm}: {set}");
    }
    assert_eq!(proc_status(pid, "NoNewPrivs"), ["1"], "{vm}: NoNewPrivs");
    assert_eq!(proc_status(pid, "Seccomp"), ["2"], "{vm}: a seccomp filter");
    for kind in ["mnt", "ipc", "uts"] {
        assert_ne!(namespace(pid, kind), namespace(cprd_pid, kind), "{vm}: a {kind} namespace of its own");
    }
    uids[0].parse().expect("uid")
}

/// Issue 15's acceptance: every VMM of both backends, and every generation of it, runs as a
/// user of its VM's own (not root, different per VM, the same across upgrades), with no
/// capability in any set, `NoNewPrivs`, a seccomp filter (cpr-vmm's own lists; QEMU's
/// `-sandbox on`) and mount, IPC and UTS namespaces other than cprd's.
#[test]
fn every_vmm_of_both_backends_runs_boxed_as_a_user_of_its_vms_own() {
    cpr_tests::require_kvm();
    let vms = [
        ("lin1", vm_definition("128M", "")),
        ("lin2", vm_definition("128M", "")),
        ("cpl3a", "memory = \"64M\"\n".to_string()),
        ("cpl3b", "memory = \"64M\"\n".to_string()),
    ];
    let s = setup(&vms, &[]);
    start_and_wait(&s, "lin1");
    start_and_wait(&s, "lin2");
    for vm in ["cpl3a", "cpl3b"] {
        assert!(s.cprd.cprctl(&["start", vm]).status.success());
    }
    let cprd_pid = u64::from(s.cprd.child.id());
    let mut first = std::collections::BTreeMap::new();
    for (vm, _) in &vms {
        let pid = status(&s, vm)["main_pid"].as_u64().expect("pid");
        first.insert(*vm, check_boxed(vm, pid, cprd_pid));
    }
    let distinct: std::collections::BTreeSet<u64> = first.values().copied().collect();
    assert_eq!(distinct.len(), vms.len(), "one uid per VM: {first:?}");
    for (vm, _) in &vms {
        assert_eq!(json(&s.cprd.cprctl(&["--json", "upgrade", vm]))["generation"], 1, "{vm}");
        let pid = status(&s, vm)["main_pid"].as_u64().expect("pid");
        assert_eq!(check_boxed(vm, pid, cprd_pid), first[vm], "{vm} keeps its uid across the upgrade");
    }
    still_running(&s, "lin1", 2);
    still_running(&s, "lin2", 2);
    // A stopped QEMU VM leaves no channel directory behind.
    let chan = s.cprd.runtime_dir.join("vms/lin1.chan");
    assert!(chan.is_dir(), "{} is where lin1's handoffs meet", chan.display());
    assert!(s.cprd.cprctl(&["stop", "lin1"]).status.success());
    assert!(wait_until(Duration::from_secs(10), || !chan.exists()), "{} is left after the stop", chan.display());
}

/// What a VMM taken over by its guest could try, done with its very identity and namespaces
/// (`nsenter` into its box, `setpriv` to its uid, no capabilities): it can neither connect to
/// another VM's control socket (nor to its own QMP socket path, which its box does not hold),
/// nor open another VMM's `/proc/PID/mem`, nor write anything on the host but its channel
/// directory.
#[test]
fn a_vmm_reaches_no_other_vms_socket_or_memory() {
    cpr_tests::require_kvm();
    let s = setup(&[("lin", vm_definition("128M", "")), ("cpl3", "memory = \"64M\"\n".to_string())], &[]);
    start_and_wait(&s, "lin");
    assert!(s.cprd.cprctl(&["start", "cpl3"]).status.success());
    let qemu = status(&s, "lin");
    let cpl3 = status(&s, "cpl3");
    let qemu_pid = qemu["main_pid"].as_u64().expect("pid");
    let cpl3_pid = cpl3["main_pid"].as_u64().expect("pid");
    let dir = s.cprd.runtime_dir.join("vms");
    for (pid, other_pid, other_sock) in
        [(qemu_pid, cpl3_pid, dir.join("cpl3.0.sock")), (cpl3_pid, qemu_pid, dir.join("lin.0.sock"))]
    {
        let uid = proc_status(pid, "Uid")[0].clone();
        let probe = format!(
            r#"
import socket
for kind in (socket.SOCK_SEQPACKET, socket.SOCK_STREAM):
    try:
        s = socket.socket(socket.AF_UNIX, kind); s.connect("{sock}"); print("CONNECTED")
    except OSError as e:
        print("refused", e.errno)
try:
    open("/proc/{other}/mem", "rb"); print("OPENED-MEM")
except OSError as e:
    print("mem", e.errno)
try:
    open("/etc/cprd-box-probe", "w"); print("WROTE-ETC")
except OSError as e:
    print("etc", e.errno)
"#,
            sock = other_sock.display(),
            other = other_pid
        );
        let out = std::process::Command::new("nsenter")
            .args(["--target", &pid.to_string(), "--mount", "--ipc", "--uts", "--"])
            .args(["setpriv", "--reuid", &uid, "--regid", &uid, "--clear-groups", "--no-new-privs"])
            .args(["--inh-caps=-all", "--bounding-set=-all", "--", "/usr/bin/python3", "-c", &probe])
            .output()
            .expect("nsenter");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
        assert!(!said.contains("CONNECTED"), "pid {pid} reached {}: {said}", other_sock.display());
        assert!(!said.contains("OPENED-MEM"), "pid {pid} opened /proc/{other_pid}/mem: {said}");
        assert!(!said.contains("WROTE-ETC"), "pid {pid} wrote to /etc: {said}");
        assert_eq!(said.matches("refused").count(), 2, "{said}");
    }
    still_running(&s, "lin", 2);
}
