//! cprd on a real private dbus-daemon, running real cpr-vmm guests on `/dev/kvm`.
#![allow(clippy::tests_outside_test_module)] // integration tests: every test is at the top level

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cpr_tests::daemon::{Cprd, PrivateBus, define_vm, kill_vmms, text, write_config};
use cpr_tests::{check_heartbeats, heartbeats, require_kvm, thread_nices, thread_slices, wait_until};

struct Setup {
    _dir: tempfile::TempDir,
    _bus: PrivateBus,
    cprd: Cprd,
}

impl Drop for Setup {
    fn drop(&mut self) {
        kill_vmms(&self.cprd.runtime_dir);
    }
}

fn setup(vms: &[&str], extra_allowed: &[&str]) -> Setup {
    setup_with_timeout(vms, extra_allowed, None)
}

/// Like [`setup`], with `[handoff] timeout_ms` set by the config.d fragment [`TIMEOUT_FRAGMENT`]
/// when given.
fn setup_with_timeout(vms: &[&str], extra_allowed: &[&str], timeout_ms: Option<u64>) -> Setup {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = PrivateBus::start(dir.path());
    let config = write_config(dir.path(), extra_allowed);
    if let Some(ms) = timeout_ms {
        std::fs::create_dir_all(config.join("config.d")).expect("mkdir");
        std::fs::write(config.join(TIMEOUT_FRAGMENT), format!("[handoff]\ntimeout_ms = {ms}\n")).expect("write");
    }
    for vm in vms {
        define_vm(&config, vm, "memory = \"64M\"\nvcpus = 1\n");
    }
    let cprd = Cprd::start(dir.path(), &bus, &config);
    Setup { _dir: dir, _bus: bus, cprd }
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", text(out));
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

fn console_ok(s: &Setup, vm: &str) {
    let path = s.cprd.runtime_dir.join("vms").join(format!("{vm}.console"));
    let seq = heartbeats(&path).last().map_or(0, |h| h.seq);
    assert!(
        wait_until(Duration::from_secs(20), || heartbeats(&path).last().map_or(0, |h| h.seq) > seq + 1),
        "{vm} silent"
    );
    check_heartbeats(&heartbeats(&path)).unwrap_or_else(|e| panic!("{vm}: {e}"));
}

/// The test guest of `vm` runs, as its VMM says (its counter advances): for when cprd is away,
/// and nobody writes the console into its log.
fn guest_runs_in_its_vmm(s: &Setup, vm: &str) {
    let control =
        cpr_tests::daemon::vmm_control(&s.cprd.runtime_dir, vm).expect("a runtime record with a control path");
    let counter = || {
        cpr_tests::daemon::test_guest_counter(&control)
            .unwrap_or_else(|| panic!("{vm}: its VMM does not report its test guest"))
            .0
    };
    let first = counter();
    assert!(wait_until(Duration::from_secs(20), || counter() > first), "{vm}: the guest's counter stays at {first}");
}

/// A program of Debian's Prometheus packages, unpacked into the cache by `scripts/setup-host`.
fn prometheus_tool(name: &str) -> PathBuf {
    let p = cpr_tests::linux_guest::cache_dir().join("prometheus-bin/usr/bin").join(name);
    assert!(p.exists(), "{} is missing: run scripts/setup-host", p.display());
    p
}

/// A node_exporter this test started (textfile collector only, on loopback), killed by PID.
struct NodeExporter(std::process::Child, u16);

impl NodeExporter {
    fn start(textfile_dir: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let child = std::process::Command::new(prometheus_tool("prometheus-node-exporter"))
            .arg("--collector.disable-defaults")
            .arg("--collector.textfile")
            .arg(format!("--collector.textfile.directory={}", textfile_dir.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start node_exporter");
        Self(child, port)
    }

    /// `GET /metrics`, the body.
    fn scrape(&self) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.1)).ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).ok()?;
        reply.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
    }
}

impl Drop for NodeExporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// cprd's metrics count what happened (two upgrades, one rollback), pass `promtool check
/// metrics`, and reach a real node_exporter through its textfile collector: `cprctl metrics
/// --output` writes the file atomically, node_exporter serves the series on loopback. cprd opens
/// no port.
#[test]
fn metrics_count_upgrades_and_rollbacks_and_reach_node_exporter() {
    let (wrappers, s) = setup_with_wrappers(&["vm1", "vm2"]);
    let c = &s.cprd;
    let crash = wrapper(wrappers.path(), "crashes.sh", "kill -SEGV $$");
    for vm in ["vm1", "vm2"] {
        assert!(c.cprctl(&["start", vm]).status.success());
    }
    for _ in 0..2 {
        let out = c.cprctl(&["upgrade", "vm1"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    assert_eq!(c.cprctl(&["upgrade", "vm2", "--binary", &crash]).status.code(), Some(8));
    let out = c.cprctl(&["metrics"]);
    assert!(out.status.success(), "{}", text(&out));
    let metrics = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in [
        "cprd_upgrades_total{backend=\"cpr-vmm\",result=\"ok\"} 2",
        "cprd_upgrades_total{backend=\"cpr-vmm\",result=\"rolled_back\"} 1",
        "cprd_rollbacks_total{backend=\"cpr-vmm\"} 1",
        "cprd_upgrade_downtime_seconds_count{backend=\"cpr-vmm\"} 2",
        "cprd_vms{state=\"running\"} 2",
        "cprd_handoffs_in_flight 0",
        "cprd_starts_total 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "no {line:?} in\n{metrics}");
    }
    assert_eq!(metrics.lines().filter(|l| l.starts_with("cprd_vmm_info{vm=")).count(), 2, "{metrics}");
    // Read-only, like the listing: any local user may read them (the bus policy allows it).
    let anyone = c.busctl(Some(65534), &["call", "org.cprd1", "/org/cprd1", "org.cprd1.Manager", "GetMetrics"]);
    assert!(
        anyone.status.success() && String::from_utf8_lossy(&anyone.stdout).contains("cprd_upgrades_total"),
        "{}",
        text(&anyone)
    );
    let mut promtool = std::process::Command::new(prometheus_tool("promtool"))
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    std::io::Write::write_all(&mut promtool.stdin.take().expect("stdin"), metrics.as_bytes()).expect("feed promtool");
    let checked = promtool.wait_with_output().expect("promtool");
    assert!(checked.status.success(), "promtool check metrics: {}\n{metrics}", text(&checked));
    let textfiles = tempfile::tempdir().expect("tempdir");
    let prom = textfiles.path().join("cprd.prom");
    let out = c.cprctl(&["metrics", "--output", &prom.to_string_lossy()]);
    assert!(out.status.success(), "{}", text(&out));
    let exporter = NodeExporter::start(textfiles.path());
    let mut body = String::new();
    let served = wait_until(Duration::from_secs(20), || {
        body = exporter.scrape().unwrap_or_default();
        body.contains("cprd_upgrades_total{backend=\"cpr-vmm\",result=\"ok\"} 2")
    });
    assert!(served, "node_exporter does not serve cprd's series:\n{body}");
    assert!(body.lines().any(|l| l == "node_textfile_scrape_error 0"), "{body}");
}

/// An operator's own CPL3 guest from a VM definition (`guest_elf`, here an ELF image of the test
/// guest at a path of the operator's): cprd hands the image to the VMM, which runs it and
/// upgrades it like the built-in one; a guest of its own that fails has its raw code reported.
#[test]
fn a_vm_definition_names_a_guest_elf_of_the_operators() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = PrivateBus::start(dir.path());
    let config = write_config(dir.path(), &[]);
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).expect("mkdir");
    std::fs::write(images.join("tg.elf"), cpr_testguest::TEST_GUEST_ELF).expect("write");
    std::fs::write(images.join("fail.elf"), cpr_testguest::FAILCODE_GUEST_ELF).expect("write");
    define_vm(&config, "own", &format!("memory = \"64M\"\nguest_elf = {:?}\n", images.join("tg.elf")));
    define_vm(&config, "failing", &format!("memory = \"64M\"\nguest_elf = {:?}\n", images.join("fail.elf")));
    let cprd = Cprd::start(dir.path(), &bus, &config);
    let s = Setup { _dir: dir, _bus: bus, cprd };
    let out = s.cprd.cprctl(&["start", "own"]);
    assert!(out.status.success(), "{}", text(&out));
    console_ok(&s, "own");
    let out = s.cprd.cprctl(&["upgrade", "own"]);
    assert!(out.status.success(), "{}", text(&out));
    console_ok(&s, "own");
    let _ = s.cprd.cprctl(&["start", "failing"]);
    let log = s.cprd.runtime_dir.join("vms").join("failing.log");
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(20), || said().contains("failure code 3 (0x03) to port 0x11")),
        "the failing guest's VMM log: {}",
        said()
    );
    assert!(!said().contains("pattern"), "{}", said());
}

#[test]
fn full_lifecycle_through_cprctl_and_busctl() {
    let s = setup(&["vm1"], &[]);
    let c = &s.cprd;
    let monitor = std::process::Command::new("busctl")
        .arg(format!("--address={}", c.address))
        .args(["monitor", "org.cprd1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("busctl monitor");
    let list = json(&c.cprctl(&["--json", "list"]));
    assert_eq!(list[0]["name"], "vm1");
    assert_eq!(list[0]["state"], "stopped");
    // define a second VM while cprd runs: a file plus Reload
    define_vm(&c.config_dir, "vm-2", "memory = \"32M\"\nvcpus = 2\n");
    assert!(c.cprctl(&["reload"]).status.success());
    let vm2 = c.busctl(None, &["get-property", "org.cprd1", "/org/cprd1/vm/vm_2d2", "org.cprd1.VM", "VCPUs"]);
    assert_eq!(String::from_utf8_lossy(&vm2.stdout).trim(), "u 2", "{}", text(&vm2));
    let path = c.busctl(None, &["call", "org.cprd1", "/org/cprd1", "org.cprd1.Manager", "GetVM", "s", "vm-2"]);
    assert_eq!(String::from_utf8_lossy(&path.stdout).trim(), "o \"/org/cprd1/vm/vm_2d2\"", "{}", text(&path));
    assert!(c.cprctl(&["start", "vm1"]).status.success());
    let list = json(&c.cprctl(&["--json", "list"]));
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    let vm1 = list.as_array().and_then(|l| l.iter().find(|v| v["name"] == "vm1")).expect("vm1 listed").clone();
    assert_eq!(vm1["state"], "running");
    assert_eq!(vm1["generation"], 0);
    let pid0 = vm1["main_pid"].as_u64().expect("pid");
    assert!(pid0 > 0);
    let prop = c.busctl(None, &["get-property", "org.cprd1", "/org/cprd1/vm/vm1", "org.cprd1.VM", "State"]);
    assert_eq!(String::from_utf8_lossy(&prop.stdout).trim(), "s \"running\"", "{}", text(&prop));
    let up = c.cprctl(&["upgrade", "vm1"]);
    assert!(up.status.success(), "{}", text(&up));
    let call = c.busctl(None, &["call", "org.cprd1", "/org/cprd1", "org.cprd1.Manager", "UpgradeVM", "ss", "vm1", ""]);
    let reply = String::from_utf8_lossy(&call.stdout).to_string();
    assert!(reply.starts_with("tt ") && reply.trim().ends_with(" 2"), "{}", text(&call));
    let st = json(&c.cprctl(&["--json", "status", "vm1"]));
    assert_eq!(st["generation"], 2);
    assert_ne!(st["main_pid"].as_u64(), Some(pid0), "a new VMM process");
    assert!(st["last_downtime_usec"].as_u64().unwrap_or(0) > 0);
    let hist = json(&c.cprctl(&["--json", "history"]));
    assert_eq!(hist.as_array().map(Vec::len), Some(2));
    assert!(hist[1]["ok"].as_bool().unwrap_or(false));
    // The releases an upgrade went between: this build's cpr-vmm, as it describes itself.
    let release = env!("CARGO_PKG_VERSION");
    assert_eq!(
        (&hist[1]["from_release"], &hist[1]["to_release"]),
        (&serde_json::json!(release), &serde_json::json!(release))
    );
    assert_eq!(st["vmm_release"], release);
    console_ok(&s, "vm1");
    // The pid read before the stop: after it, the status says 0.
    let running_pid = main_pid(&st);
    assert!(c.cprctl(&["stop", "vm1"]).status.success());
    let st = json(&c.cprctl(&["--json", "status", "vm1"]));
    assert_eq!(st["state"], "stopped");
    assert!(
        wait_until(Duration::from_secs(5), || !Path::new(&format!("/proc/{running_pid}")).exists()
            || cpr_tests::is_zombie(running_pid)),
        "the stopped VMM (pid {running_pid}) is gone"
    );
    let mut monitor = monitor;
    let _ = monitor.kill();
    let out = monitor.wait_with_output().expect("monitor output");
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(seen.contains("UpgradeFinished"), "no UpgradeFinished signal seen");
    assert!(seen.contains("VMStateChanged"), "no VMStateChanged signal seen");
    assert!(seen.contains("PropertiesChanged"), "no PropertiesChanged signal seen");
    // machined cannot be reached on the private bus (its policy denies it, no systemd starts
    // it): cprd says so once, and not again for each VM that changed.
    let log = c.log_text();
    assert_eq!(log.matches("systemd-machined is not reachable on the bus").count(), 1, "{log}");
    assert!(!log.contains("systemd-machined:"), "{log}");
}

#[test]
fn nobody_may_read_but_not_change() {
    let s = setup(&["vm1"], &[]);
    let c = &s.cprd;
    let list = c.busctl(Some(65534), &["call", "org.cprd1", "/org/cprd1", "org.cprd1.Manager", "ListVMs"]);
    assert!(list.status.success(), "{}", text(&list));
    let prop = c.busctl(Some(65534), &["get-property", "org.cprd1", "/org/cprd1/vm/vm1", "org.cprd1.VM", "State"]);
    assert!(prop.status.success(), "{}", text(&prop));
    for args in [
        vec!["StartVM", "s", "vm1"],
        vec!["StopVM", "sb", "vm1", "false"],
        vec!["UpgradeVM", "ss", "vm1", ""],
        vec!["UpgradeAll", "s", ""],
        vec!["Reload"],
    ] {
        let mut full = vec!["call", "org.cprd1", "/org/cprd1", "org.cprd1.Manager"];
        full.extend(args.iter().copied());
        let out = c.busctl(Some(65534), &full);
        assert!(!out.status.success(), "{args:?} allowed for uid 65534");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Access denied"), "{args:?}: {}", text(&out));
    }
    let st = json(&c.cprctl(&["--json", "status", "vm1"]));
    assert_eq!(st["state"], "stopped", "nothing changed");
}

#[test]
fn bad_requests_get_named_errors_and_change_nothing() {
    let s = setup(&["vm1"], &["/usr/bin/qemu-system-*"]);
    let c = &s.cprd;
    assert!(c.cprctl(&["start", "vm1"]).status.success());
    let before = json(&c.cprctl(&["--json", "status", "vm1"]));
    // a binary outside the allow-list
    let out = c
        .busctl(None, &["call", "org.cprd1", "/org/cprd1", "org.cprd1.Manager", "UpgradeVM", "ss", "vm1", "/bin/true"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the VMM allow-list"), "{}", text(&out));
    let out = c.cprctl(&["upgrade", "vm1", "--binary", "/bin/true"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    // an unknown VM
    let out = c.cprctl(&["start", "nope"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("org.cprd1.Error.NoSuchVM"), "{}", text(&out));
    // malformed arguments
    let out = c.busctl(None, &["call", "org.cprd1", "/org/cprd1", "org.cprd1.Manager", "UpgradeVM", "s", "vm1"]);
    assert!(!out.status.success(), "{}", text(&out));
    // a QEMU VM whose machine type the installed QEMU lacks: refused at pre-flight, nothing started
    define_vm(
        &c.config_dir,
        "q",
        "backend = \"qemu\"\nmemory = \"64M\"\nkernel = \"/nonexistent\"\nmachine = \"pc-q35-99.0\"\n\
         vmm_binary = \"/usr/bin/qemu-system-x86_64\"\n",
    );
    assert!(c.cprctl(&["reload"]).status.success());
    let out = c.cprctl(&["start", "q"]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no machine type pc-q35-99.0"), "{}", text(&out));
    assert_eq!(json(&c.cprctl(&["--json", "status", "q"]))["state"], "stopped");
    std::fs::remove_file(c.config_dir.join("vms/q.toml")).expect("remove");
    assert!(c.cprctl(&["reload"]).status.success());
    // bad TOML: reload refuses it, names file and line, and keeps the last good configuration
    let bad = c.config_dir.join("vms/broken.toml");
    std::fs::write(&bad, "memory = \"64M\"\n\nvcpus = \"two\"\n").expect("write");
    let out = c.cprctl(&["reload"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.toml") && err.contains("line 3") && err.contains("vcpus"), "{err}");
    assert!(err.contains("last good configuration"), "{err}");
    let after = json(&c.cprctl(&["--json", "status", "vm1"]));
    assert_eq!(before, after, "nothing changed");
    assert_eq!(json(&c.cprctl(&["--json", "list"])).as_array().map(Vec::len), Some(1));
}

/// A wrapper script around cpr-vmm, root-owned and mode 0755, in the allow-list.
fn wrapper(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    let real = cpr_tests::bin("cpr-vmm");
    let script =
        format!("#!/bin/sh\nif [ \"$1\" = --state-formats ]; then exec {} \"$@\"; fi\n{body}\n", real.display());
    std::fs::write(&path, script.replace("REAL", &real.display().to_string())).expect("write wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path.to_string_lossy().into_owned()
}

/// A directory for wrapper scripts and a setup whose allow-list covers it.
fn setup_with_wrappers(vms: &[&str]) -> (tempfile::TempDir, Setup) {
    setup_with_wrappers_and_timeout(vms, None)
}

/// The config.d fragment that sets the handoff timeout (relative to the configuration directory).
const TIMEOUT_FRAGMENT: &str = "config.d/50-timeout.toml";

/// Like [`setup_with_wrappers`], with the handoff timeout of [`setup_with_timeout`].
fn setup_with_wrappers_and_timeout(vms: &[&str], timeout_ms: Option<u64>) -> (tempfile::TempDir, Setup) {
    let wrappers = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(wrappers.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let glob = format!("{}/*", wrappers.path().display());
    let s = setup_with_timeout(vms, &[&glob], timeout_ms);
    (wrappers, s)
}

/// Starts `cprctl upgrade VM --binary BINARY` in the background and waits until the new VMM
/// (found through cprd's runtime record) has stopped itself at its stall point. Returns the
/// running cprctl and the new VMM's pid.
fn upgrade_until_stalled(cprd: &Cprd, vm: &str, binary: &str) -> (std::process::Child, u32) {
    let upgrade = std::process::Command::new(cpr_tests::bin("cprctl"))
        .args(["--address", &cprd.address, "upgrade", vm, "--binary", binary])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("cprctl upgrade");
    let record = cprd.runtime_dir.join("vms").join(format!("{vm}.handoff"));
    let mut new_pid = 0u32;
    let stopped = wait_until(Duration::from_secs(20), || {
        let v: serde_json::Value =
            std::fs::read(&record).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        new_pid = v["new"]["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
        new_pid > 0 && cpr_tests::is_stopped(new_pid)
    });
    assert!(stopped, "the new VMM never reached its stall point");
    (upgrade, new_pid)
}

#[test]
fn failed_upgrades_roll_back_to_the_old_vmm() {
    let (wrappers, s) = setup_with_wrappers(&["vm1"]);
    let c = &s.cprd;
    let crash = wrapper(wrappers.path(), "crashes.sh", "kill -SEGV $$");
    let reject = wrapper(wrappers.path(), "rejects.sh", "CPR_VMM_FAULT=reject-state exec REAL \"$@\"");
    assert!(c.cprctl(&["start", "vm1"]).status.success());
    let before = json(&c.cprctl(&["--json", "status", "vm1"]));
    for (binary, why) in [(&crash, "went away"), (&reject, "rejected the state")] {
        let out = c.cprctl(&["upgrade", "vm1", "--binary", binary]);
        assert_eq!(out.status.code(), Some(8), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("org.cprd1.Error.UpgradeFailed") && err.contains(why), "{err}");
        let st = json(&c.cprctl(&["--json", "status", "vm1"]));
        assert_eq!(st["state"], "running");
        assert_eq!(st["generation"], before["generation"]);
        assert_eq!(st["main_pid"], before["main_pid"]);
    }
    console_ok(&s, "vm1");
    assert!(c.cprctl(&["upgrade", "vm1"]).status.success(), "a good upgrade still works");
}

/// The test guest's counter in `vm`'s VMM, read twice 300 ms apart.
fn counter_moves(s: &Setup, vm: &str) -> (u64, u64) {
    let control = cpr_tests::daemon::vmm_control(&s.cprd.runtime_dir, vm).expect("control socket on record");
    let first = cpr_tests::daemon::test_guest_counter(&control).expect("counter").0;
    std::thread::sleep(Duration::from_millis(300));
    (first, cpr_tests::daemon::test_guest_counter(&control).expect("counter").0)
}

/// `cprctl pause` stops the guest in its VMM (its counter stands still) and `cprctl resume` runs
/// it again; a paused VM is not upgraded (named error, nothing changes), stays paused across a
/// kill -9 of cprd, and stops.
#[test]
fn pause_holds_the_guest_still_across_a_restart_until_resume() {
    let mut s = setup(&["p"], &[]);
    assert!(s.cprd.cprctl(&["start", "p"]).status.success());
    let (a, b) = counter_moves(&s, "p");
    assert!(b > a, "a running guest counts: {a} then {b}");
    let pause = s.cprd.cprctl(&["pause", "p"]);
    assert!(pause.status.success(), "{}", text(&pause));
    let st = json(&s.cprd.cprctl(&["--json", "status", "p"]));
    assert_eq!(st["state"], "paused");
    let (a, b) = counter_moves(&s, "p");
    assert_eq!(a, b, "a paused guest does not run");
    assert!(s.cprd.cprctl(&["pause", "p"]).status.success(), "pausing a paused VM is a no-op");
    let up = s.cprd.cprctl(&["upgrade", "p"]);
    assert!(!up.status.success() && text(&up).contains("is paused"), "{}", text(&up));
    assert_eq!(json(&s.cprd.cprctl(&["--json", "status", "p"])), st, "the refused upgrade changed nothing");
    // Still paused after cprd is killed and restarted: the record and the VMM both say so.
    s.cprd.kill9();
    let dir = s.cprd.runtime_dir.parent().expect("dir").to_path_buf();
    let config = s.cprd.config_dir.clone();
    s.cprd = Cprd::start(&dir, &s._bus, &config);
    assert_eq!(json(&s.cprd.cprctl(&["--json", "status", "p"])), st, "re-attached as it was");
    let (a, b) = counter_moves(&s, "p");
    assert_eq!(a, b, "still paused after the restart");
    let resume = s.cprd.cprctl(&["resume", "p"]);
    assert!(resume.status.success(), "{}", text(&resume));
    assert_eq!(json(&s.cprd.cprctl(&["--json", "status", "p"]))["state"], "running");
    let (a, b) = counter_moves(&s, "p");
    assert!(b > a, "a resumed guest counts again: {a} then {b}");
    let up = s.cprd.cprctl(&["upgrade", "p"]);
    assert!(up.status.success(), "{}", text(&up));
    assert!(s.cprd.cprctl(&["pause", "p"]).status.success());
    let stop = s.cprd.cprctl(&["stop", "p"]);
    assert!(stop.status.success(), "a paused VM stops: {}", text(&stop));
    assert_eq!(json(&s.cprd.cprctl(&["--json", "status", "p"]))["state"], "stopped");
}

/// A configuration in `dir` whose default VMM binary is a copy of cpr-vmm in `dir/bin` (allowed),
/// which a test may replace as a package upgrade would; returns the copy's path and the
/// configuration directory.
fn config_with_a_replaceable_vmm(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let vmm = bin.join("cpr-vmm");
    std::fs::copy(cpr_tests::bin("cpr-vmm"), &vmm).expect("copy cpr-vmm");
    let config = write_config(dir, &[&format!("{}/*", bin.display())]);
    let toml = std::fs::read_to_string(config.join("cprd.toml")).expect("read");
    let toml = toml.replace(
        &format!("default = {:?}", cpr_tests::bin("cpr-vmm").display().to_string()),
        &format!("default = {:?}", vmm.display().to_string()),
    );
    std::fs::write(config.join("cprd.toml"), toml).expect("write");
    (vmm, config)
}

/// A package upgrade replaces the configured VMM binary while a VM is paused: the reload moves the
/// running VMs, and the paused one is never run to be moved (its guest stays still) but is marked
/// (in its record, so across a restart of cprd) and handed to the new binary as soon as it is
/// resumed. It stayed on the old binary for good, with nothing said.
#[test]
fn a_vm_paused_during_a_reload_moves_to_the_changed_binary_when_resumed() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let (vmm, config) = config_with_a_replaceable_vmm(dir.path());
    let bus = PrivateBus::start(dir.path());
    define_vm(&config, "run", "memory = \"64M\"\n");
    define_vm(&config, "still", "memory = \"64M\"\n");
    let cprd = Cprd::start(dir.path(), &bus, &config);
    let mut s = Setup { _dir: dir, _bus: bus, cprd };
    for vm in ["run", "still"] {
        assert!(s.cprd.cprctl(&["start", vm]).status.success());
    }
    assert!(s.cprd.cprctl(&["pause", "still"]).status.success());
    let paused = json(&s.cprd.cprctl(&["--json", "status", "still"]));
    // The package manager's way: a new build renamed over the configured binary.
    let install = |extra: &[u8]| {
        let mut bytes = std::fs::read(cpr_tests::bin("cpr-vmm")).expect("read");
        bytes.extend_from_slice(extra);
        install_by_rename(&vmm, &bytes);
    };
    install(b"\0rebuilt");
    let reload = s.cprd.cprctl(&["reload"]);
    assert!(reload.status.success(), "{}", text(&reload));
    let run = json(&s.cprd.cprctl(&["--json", "status", "run"]));
    assert_eq!(run["generation"], 1, "the running VM moved: {run}");
    let still = json(&s.cprd.cprctl(&["--json", "status", "still"]));
    assert_eq!(still["state"], "paused");
    assert_eq!(still["generation"], paused["generation"], "a paused VM is not run to be moved: {still}");
    assert_eq!(still["upgrade_due"], true, "and its status says it will be: {still}");
    assert_eq!(run["upgrade_due"], false);
    let (a, b) = counter_moves(&s, "still");
    assert_eq!(a, b, "and its guest stayed still");
    assert!(s.cprd.log_text().contains("moves to its changed VMM binary"), "{}", s.cprd.log_text());
    // The mark is in the record: a restart of cprd keeps it.
    s.cprd.kill9();
    let dir = s.cprd.runtime_dir.parent().expect("dir").to_path_buf();
    s.cprd = Cprd::start(&dir, &s._bus, &config);
    assert_eq!(json(&s.cprd.cprctl(&["--json", "status", "still"]))["state"], "paused");
    let resume = s.cprd.cprctl(&["resume", "still"]);
    assert!(resume.status.success(), "{}", text(&resume));
    let still = json(&s.cprd.cprctl(&["--json", "status", "still"]));
    let run = json(&s.cprd.cprctl(&["--json", "status", "run"]));
    assert_eq!(still["state"], "running");
    assert_eq!(still["generation"], 1, "resumed, then handed to the changed binary: {still}");
    assert_eq!(still["vmm_version"], run["vmm_version"], "the same build as the VM the reload moved");
    assert_eq!(still["upgrade_due"], false, "done: {still}");
    let (a, b) = counter_moves(&s, "still");
    assert!(b > a, "the guest runs on the new VMM: {a} then {b}");
    // Done once: another pause and resume is no upgrade.
    assert!(s.cprd.cprctl(&["pause", "still"]).status.success());
    assert!(s.cprd.cprctl(&["resume", "still"]).status.success());
    assert_eq!(json(&s.cprd.cprctl(&["--json", "status", "still"]))["generation"], 1);
    // A mark a later reload finds stale is taken back: build C marks the paused VM, then build B
    // (the one it runs) comes back before it is resumed.
    assert!(s.cprd.cprctl(&["pause", "still"]).status.success());
    install(b"\0build C");
    assert!(s.cprd.cprctl(&["reload"]).status.success());
    assert_eq!(json(&s.cprd.cprctl(&["--json", "status", "still"]))["upgrade_due"], true);
    install(b"\0rebuilt");
    assert!(s.cprd.cprctl(&["reload"]).status.success());
    assert_eq!(json(&s.cprd.cprctl(&["--json", "status", "still"]))["upgrade_due"], false, "the mark taken back");
    assert!(s.cprd.cprctl(&["resume", "still"]).status.success());
    let still = json(&s.cprd.cprctl(&["--json", "status", "still"]));
    assert_eq!(still["generation"], 1, "no move: it runs the configured build already: {still}");
    assert_eq!(json(&s.cprd.cprctl(&["--json", "status", "run"]))["generation"], 3, "run moved to C and back");
}

#[test]
fn kill_9_of_cprd_leaves_vms_running_and_reattaches_them() {
    let names = ["a", "b", "c", "d", "e"];
    let mut s = setup(&names, &[]);
    for n in names {
        assert!(s.cprd.cprctl(&["start", n]).status.success());
    }
    let before = json(&s.cprd.cprctl(&["--json", "list"]));
    s.cprd.kill9();
    for n in names {
        guest_runs_in_its_vmm(&s, n);
    }
    let dir = s.cprd.runtime_dir.parent().expect("dir").to_path_buf();
    let config = s.cprd.config_dir.clone();
    let new = Cprd::start(&dir, &s._bus, &config);
    let after = json(&new.cprctl(&["--json", "list"]));
    assert_eq!(before, after, "same PIDs, generations and states after the restart");
    let up = new.cprctl(&["upgrade", "c"]);
    assert!(up.status.success(), "{}", text(&up));
    assert_eq!(json(&new.cprctl(&["--json", "status", "c"]))["generation"], 1);
    for n in names {
        console_ok(&s, n);
    }
    s.cprd = new;
}

#[test]
fn upgrade_all_over_twenty_vms() {
    let names: Vec<String> = (0..20).map(|i| format!("vm{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let s = setup(&refs, &[]);
    for n in &names {
        assert!(s.cprd.cprctl(&["start", n]).status.success());
    }
    let all = json(&s.cprd.cprctl(&["--json", "upgrade", "--all"]));
    let rows = all.as_array().expect("array");
    assert_eq!(rows.len(), 20);
    for r in rows {
        assert_eq!(r["ok"], true, "{r}");
        assert!(r["downtime_usec"].as_u64().unwrap_or(0) > 0, "{r}");
    }
    for n in &names {
        console_ok(&s, n);
        let st = json(&s.cprd.cprctl(&["--json", "status", n]));
        assert_eq!(st["generation"], 1);
        // The runtime record follows the new VMM (an old VMM quitting must not erase it).
        let record: serde_json::Value = serde_json::from_slice(
            &std::fs::read(s.cprd.runtime_dir.join("vms").join(format!("{n}.json"))).expect("runtime record"),
        )
        .expect("record JSON");
        assert_eq!(record["main_pid"], st["main_pid"], "{n}");
        // cprd names the new VMM's build without asking it (the file it checked and started).
        let binary = record["vmm_binary"].as_str().expect("vmm_binary");
        assert_eq!(
            record["vmm_version"].as_str(),
            cpr_proto::build_id_of(std::path::Path::new(binary)).as_deref(),
            "{n}: build id of {binary}"
        );
    }
    // cprd still holds every guest's memory itself (distinct memfds: cprd keeps a second
    // descriptor of each for the fd store and re-exec hand-over).
    use std::os::unix::fs::MetadataExt;
    let memfds: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{}/fd", s.cprd.child.id()))
        .expect("cprd fds")
        .filter_map(Result::ok)
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("memfd:cpr-vmm-ram")))
        .filter_map(|e| std::fs::metadata(e.path()).ok().map(|m| m.ino()))
        .collect();
    assert_eq!(memfds.len(), 20, "cprd keeps one memfd per VM");
}

#[test]
fn kill_9_of_cprd_mid_upgrade_rolls_back_on_restart() {
    let (wrappers, mut s) = setup_with_wrappers(&["vm1"]);
    let stall = wrapper(wrappers.path(), "stalls.sh", "CPR_VMM_FAULT=stall:after-state exec REAL \"$@\"");
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
    let before = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    // Wait until the new VMM has the state and stopped itself, then kill cprd mid-handoff.
    let (mut upgrade, new_pid) = upgrade_until_stalled(&s.cprd, "vm1", &stall);
    s.cprd.kill9();
    let _ = upgrade.wait();
    let dir = s.cprd.runtime_dir.parent().expect("dir").to_path_buf();
    let config = s.cprd.config_dir.clone();
    let new = Cprd::start(&dir, &s._bus, &config);
    let after = json(&new.cprctl(&["--json", "status", "vm1"]));
    assert_eq!(after["state"], "running");
    assert_eq!(after["generation"], before["generation"], "rolled back, not handed off");
    assert_eq!(after["main_pid"], before["main_pid"], "the old VMM runs the guest again");
    assert!(
        wait_until(Duration::from_secs(5), || !Path::new(&format!("/proc/{new_pid}")).exists()
            || cpr_tests::is_zombie(new_pid)),
        "the stalled new VMM was killed"
    );
    s.cprd = new;
    console_ok(&s, "vm1");
    assert!(s.cprd.cprctl(&["upgrade", "vm1"]).status.success(), "a good upgrade works afterwards");
}

/// The autogroup of `pid` (its name, e.g. `/autogroup-12`) and that group's nice.
fn autogroup(pid: u32) -> (String, i32) {
    let path = format!("/proc/{pid}/autogroup");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e} (kernel without autogroups?)"));
    let words: Vec<&str> = text.split_whitespace().collect();
    match words.as_slice() {
        [group, "nice", nice] => (group.to_string(), nice.parse().unwrap_or_else(|_| panic!("{path}: {text}"))),
        _ => panic!("{path}: unexpected {text:?}"),
    }
}

fn main_pid(status: &serde_json::Value) -> u32 {
    status["main_pid"].as_u64().and_then(|p| u32::try_from(p).ok()).expect("main_pid")
}

#[test]
fn handoffs_run_weighted_and_guests_go_back_to_an_equal_share() {
    let (wrappers, s) = setup_with_wrappers(&["vm1"]);
    let c = &s.cprd;
    let stall = wrapper(wrappers.path(), "stalls.sh", "CPR_VMM_FAULT=stall:after-state exec REAL \"$@\"");
    // cprd, started in a session of its own as a service manager would, weights it.
    let cprd_pid = c.child.id();
    let (cprd_group, cprd_nice) = autogroup(cprd_pid);
    assert_eq!(cprd_nice, -10, "cprd's autogroup is weighted");
    assert!(c.cprctl(&["start", "vm1"]).status.success());
    let old_pid = main_pid(&json(&c.cprctl(&["--json", "status", "vm1"])));
    let (old_group, old_nice) = autogroup(old_pid);
    assert_ne!(old_group, cprd_group, "a VMM has an autogroup of its own");
    assert_eq!(old_nice, 0, "a running guest gets a VM's share");
    // A handoff in flight: the new VMM stops itself once it holds the state; the guest is paused.
    let (mut upgrade, new_pid) = upgrade_until_stalled(c, "vm1", &stall);
    let (new_group, new_nice) = autogroup(new_pid);
    assert_ne!(new_group, cprd_group);
    assert_ne!(new_group, old_group);
    assert_eq!(new_nice, -10, "the new VMM is weighted while the handoff is in flight");
    assert_eq!(autogroup(old_pid).1, -10, "the old VMM weights itself from the pause (its guest is stopped)");
    let short = cpr_vmm::sched::HANDOFF_SLICE_NS;
    let (old_slices, new_slices) = (thread_slices(old_pid), thread_slices(new_pid));
    assert!(old_slices.iter().all(|s| *s == short), "old VMM slices in the downtime: {old_slices:?}");
    assert!(new_slices.iter().all(|s| *s == short), "new VMM slices in the downtime: {new_slices:?}");
    // The slices were set with a momentary nice nudge; every thread's nice ends where it was.
    for pid in [old_pid, new_pid] {
        let nices = thread_nices(pid);
        assert!(nices.iter().all(|n| *n == 0), "thread nices of {pid}: {nices:?}");
    }
    // The new VMM dies: rolled back, the old VMM resumes the guest with a VM's share again.
    // SAFETY: kill of the stalled VMM this test made cprd start, by pid.
    assert_eq!(unsafe { libc::kill(new_pid.cast_signed(), libc::SIGKILL) }, 0);
    let status = upgrade.wait().expect("cprctl upgrade");
    assert_eq!(status.code(), Some(8), "UpgradeFailed");
    assert_eq!(autogroup(old_pid).1, 0);
    // cprd never changes its own slices: its main thread shows the kernel's default.
    let default = cpr_vmm::sched::thread_slice_ns(cprd_pid, cprd_pid).expect("cprd's slice");
    assert_ne!(default, short);
    let old_slices = thread_slices(old_pid);
    assert!(old_slices.iter().all(|s| *s == default), "old VMM slices after the rollback: {old_slices:?}");
    // A good handoff: the guest's new VMM is back at a VM's share once it runs the guest.
    assert!(c.cprctl(&["upgrade", "vm1"]).status.success());
    let now = json(&c.cprctl(&["--json", "status", "vm1"]));
    let pid = main_pid(&now);
    assert_ne!(pid, old_pid);
    let (group, nice) = autogroup(pid);
    assert_ne!(group, cprd_group);
    assert_eq!(nice, 0, "the new VMM runs the guest with a VM's share");
    let slices = thread_slices(pid);
    assert!(slices.iter().all(|s| *s == default), "the guest runs with default slices: {slices:?}");
    assert_eq!(autogroup(cprd_pid).1, -10);
    console_ok(&s, "vm1");
}

/// An old VMM kept the handoff's weight (autogroup nice -10) through its exit, about nine times
/// the weight of the new VMM now running the guest, for its whole teardown (unmapping guest
/// RAM, destroying its KVM VM) on CPUs they share. Now the arbiter puts it at the lowest weight
/// (nice 19) before it asks it to quit. The old VMM here stops itself right after
/// answering `Quit` (fault injection), so its weight can be read while it exits.
#[test]
fn an_old_vmm_exits_at_the_lowest_weight_once_the_new_one_runs_the_guest() {
    let (wrappers, s) = setup_with_wrappers(&["vm1"]);
    let c = &s.cprd;
    let stalls = wrapper(wrappers.path(), "stalls-at-quit.sh", "CPR_VMM_FAULT=stall:after-quit exec REAL \"$@\"");
    assert!(c.cprctl(&["start", "vm1"]).status.success());
    assert!(c.cprctl(&["upgrade", "vm1", "--binary", &stalls]).status.success(), "{}", c.log_text());
    let old_pid = main_pid(&json(&c.cprctl(&["--json", "status", "vm1"])));
    let out = c.cprctl(&["upgrade", "vm1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(wait_until(Duration::from_secs(10), || cpr_tests::is_stopped(old_pid)), "the old VMM stopped at its exit");
    let new_pid = main_pid(&json(&c.cprctl(&["--json", "status", "vm1"])));
    assert_eq!(autogroup(old_pid).1, cpr_spawn::sched::EXIT_NICE, "the old VMM exits at the lowest weight");
    assert_eq!(autogroup(new_pid).1, 0, "the guest's VMM has a VM's share");
    // SAFETY: kill of the stopped old VMM this test made cprd start, by pid.
    assert_eq!(unsafe { libc::kill(old_pid.cast_signed(), libc::SIGKILL) }, 0);
    console_ok(&s, "vm1");
}

/// An old VMM that never answers `Quit` after the commit (fault injection: it stops itself
/// before its answer, as a VMM starved at nice 19 on a loaded host does not run): the caller's
/// reply does not wait for it up to the handoff timeout (60 s here; a `cprctl upgrade` once took
/// the test configuration's 15 s after a 66 ms handoff). The arbiter waits
/// `OLD_VMM_ANSWER_GRACE`, then kills it, which is safe once the new VMM runs the guest.
#[test]
fn an_old_vmm_that_does_not_answer_quit_does_not_hold_the_upgrades_reply() {
    let (wrappers, s) = setup_with_wrappers_and_timeout(&["vm1"], Some(60_000));
    let c = &s.cprd;
    let mute = wrapper(wrappers.path(), "mute-at-quit.sh", "CPR_VMM_FAULT=stall:before-quit-answer exec REAL \"$@\"");
    assert!(c.cprctl(&["start", "vm1"]).status.success());
    assert!(c.cprctl(&["upgrade", "vm1", "--binary", &mute]).status.success(), "{}", c.log_text());
    let old_pid = main_pid(&json(&c.cprctl(&["--json", "status", "vm1"])));
    let started = std::time::Instant::now();
    let out = c.cprctl(&["upgrade", "vm1"]);
    let took = started.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        took < Duration::from_secs(30),
        "the reply waited {took:?} for an old VMM that does not answer (handoff timeout 60 s)"
    );
    assert!(wait_until(Duration::from_secs(10), || cpr_tests::process_gone(old_pid)), "the mute old VMM was killed");
    console_ok(&s, "vm1");
}

/// Stands where systemd would: drains cprd's sd_notify datagrams as they come (a sender blocks
/// when the receiver's queue is full, as it would with a stuck service manager).
struct NotifyReceiver {
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    taken: usize,
}

impl NotifyReceiver {
    fn bind(path: &Path) -> Self {
        let sock = std::os::unix::net::UnixDatagram::bind(path).expect("notify socket");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&seen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                sink.lock().expect("lock").push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
        Self { seen, taken: 0 }
    }
}

/// The datagrams received since the last call.
fn notifications(r: &mut NotifyReceiver) -> Vec<String> {
    let all = r.seen.lock().expect("lock");
    let new = all[r.taken..].to_vec();
    r.taken = all.len();
    new
}

#[test]
fn sighup_reload_moves_vms_to_a_changed_binary_between_reloading_and_ready() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let (vmm, config) = config_with_a_replaceable_vmm(dir.path());
    let bus = PrivateBus::start(dir.path());
    define_vm(&config, "vm1", "memory = \"64M\"\n");
    define_vm(&config, "vm2", "memory = \"64M\"\n");
    // The test stands where systemd would: it receives cprd's sd_notify datagrams.
    let notify_path = dir.path().join("notify");
    let mut notify = NotifyReceiver::bind(&notify_path);
    let notify_env = notify_path.to_string_lossy().into_owned();
    let cprd = Cprd::start_with_env(dir.path(), &bus, &config, &[("NOTIFY_SOCKET", &notify_env)]);
    let s = Setup { _dir: dir, _bus: bus, cprd };
    // cprd says READY=1 after it took its bus name (which is all `Cprd::start` waits for).
    let mut at_start = Vec::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            at_start.extend(notifications(&mut notify));
            at_start.iter().any(|m| m.contains("READY=1"))
        }),
        "no READY=1 at start: {at_start:?}"
    );
    for vm in ["vm1", "vm2"] {
        assert!(s.cprd.cprctl(&["start", vm]).status.success());
    }
    let before = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    // A reload with nothing changed upgrades nothing.
    sighup(&s.cprd);
    let mut first = Vec::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            first.extend(notifications(&mut notify));
            first.iter().any(|m| m.contains("upgraded 0 VMs"))
        }),
        "{first:?} alive {:?} log {}",
        s.cprd.cprctl(&["list"]).status,
        s.cprd.log_text()
    );
    // Replace the binary on disk with a different build (new inode, new content), then reload.
    let mut bytes = std::fs::read(cpr_tests::bin("cpr-vmm")).expect("read");
    bytes.extend_from_slice(b"\0rebuilt");
    install_by_rename(&vmm, &bytes);
    sighup(&s.cprd);
    let mut seen = Vec::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            seen.extend(notifications(&mut notify));
            seen.iter().any(|m| m.contains("READY=1") && m.contains("upgraded 2 VMs"))
        }),
        "no READY=1 after the reload: {seen:?}"
    );
    let reloading = seen.iter().position(|m| m.contains("RELOADING=1") && m.contains("MONOTONIC_USEC="));
    let ready = seen.iter().position(|m| m.contains("READY=1") && m.contains("upgraded 2 VMs"));
    assert!(reloading.is_some() && reloading < ready, "RELOADING=1 with MONOTONIC_USEC before READY=1: {seen:?}");
    let after = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    assert_eq!(after["generation"], 1, "moved to the new binary");
    assert_ne!(after["vmm_version"], before["vmm_version"], "the new build id");
    assert_ne!(after["main_pid"], before["main_pid"]);
    console_ok(&s, "vm1");
    console_ok(&s, "vm2");
}

#[test]
fn cprd_dying_right_after_a_handoff_adopts_the_new_vmm_on_restart() {
    let (s, before, after) = cprd_dies_with("die-after-handoff");
    assert_eq!(after["state"], "running");
    assert_eq!(after["generation"], 1, "the handoff had completed: the new VMM is adopted");
    assert_ne!(after["main_pid"], before["main_pid"]);
    assert_eq!(autogroup(main_pid(&after)).1, 0, "the adopted VMM is no longer weighted for its handoff");
    let old = before["main_pid"].as_u64().unwrap_or(0);
    // It exits at nice 19 (its handoff weight) beside busy guests: its teardown may take a while.
    assert!(
        wait_until(Duration::from_secs(30), || !Path::new(&format!("/proc/{old}")).exists()
            || cpr_tests::is_zombie(u32::try_from(old).unwrap_or(0))),
        "the old VMM is gone"
    );
    console_ok(&s, "vm1");
    assert!(s.cprd.cprctl(&["upgrade", "vm1"]).status.success(), "and it can be upgraded again");
}

/// cprd killed between the decision and its report: right after the decision to commit is on
/// record but before the commit went out (`die-at:committed`), and right after the new VMM
/// reported running (`die-at:new-running`). The restarted cprd finishes from its journal: in the
/// first case the new VMM never got the commit and exited, so nobody may resume the old one
/// (it might have run): the VM needs attention and both are kept; in the second the new VMM runs
/// the guest and is adopted. Before the journal, a restarted cprd decided from the old VMM's
/// state alone.
fn cprd_dies_at(phase: &str) -> (Setup, serde_json::Value, serde_json::Value) {
    cprd_dies_with(&format!("die-at:{phase}"))
}

/// Starts vm1 under a cprd that aborts at the fault `fault` during an upgrade, restarts cprd,
/// and returns the setup with vm1's status before the upgrade and after the restart.
fn cprd_dies_with(fault: &str) -> (Setup, serde_json::Value, serde_json::Value) {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = PrivateBus::start(dir.path());
    let config = write_config(dir.path(), &[]);
    define_vm(&config, "vm1", "memory = \"64M\"\n");
    let cprd = Cprd::start_with_env(dir.path(), &bus, &config, &[("CPRD_FAULT", fault)]);
    let mut s = Setup { _dir: dir, _bus: bus, cprd };
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
    let before = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    let out = s.cprd.cprctl(&["upgrade", "vm1"]);
    assert!(!out.status.success(), "cprd died during the call: {}", text(&out));
    assert!(wait_until(Duration::from_secs(10), || s.cprd.child.try_wait().ok().flatten().is_some()), "cprd still up");
    let dir = s.cprd.runtime_dir.parent().expect("dir").to_path_buf();
    let config = s.cprd.config_dir.clone();
    s.cprd = Cprd::start(&dir, &s._bus, &config);
    let after = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    (s, before, after)
}

#[test]
fn cprd_dying_after_the_decision_before_the_commit_leaves_both_vmms_for_a_human() {
    let (s, before, after) = cprd_dies_at("committed");
    assert_eq!(after["state"], "needs-attention", "{after}");
    let reason = after["state_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("the commit was decided"), "the reason is on the bus: {after}");
    assert_eq!(after["main_pid"], before["main_pid"], "the old VMM is kept");
    let old = main_pid(&before);
    assert!(!cpr_tests::process_gone(old), "the old VMM (which holds the paused guest) was not killed");
    let start = s.cprd.cprctl(&["start", "vm1"]);
    assert!(!start.status.success(), "start refuses a VM that needs attention");
    assert!(text(&start).contains("needs attention"), "{}", text(&start));
    assert!(s.cprd.cprctl(&["stop", "vm1"]).status.success(), "stop ends it");
    assert!(wait_until(Duration::from_secs(5), || cpr_tests::process_gone(old)), "the old VMM is gone after stop");
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success(), "and it starts afresh");
}

#[test]
fn cprd_dying_after_the_new_vmm_runs_adopts_it_on_restart() {
    let (s, before, after) = cprd_dies_at("new-running");
    assert_eq!(after["state"], "running", "{after}");
    assert_eq!(after["generation"], 1, "the new VMM is adopted");
    assert_ne!(after["main_pid"], before["main_pid"]);
    let old = main_pid(&before);
    assert!(wait_until(Duration::from_secs(5), || cpr_tests::process_gone(old)), "the old VMM was ended");
    console_ok(&s, "vm1");
    assert!(s.cprd.cprctl(&["upgrade", "vm1"]).status.success(), "and it can be upgraded again");
}

/// Issue 13's holes at start-up: one VM file that cannot be read made cprd exit (every other VM
/// with it); now that VM is quarantined with its error and cprd starts with the others.
#[test]
fn an_unreadable_vm_file_is_quarantined_and_cprd_starts_with_the_others() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = PrivateBus::start(dir.path());
    let config = write_config(dir.path(), &[]);
    define_vm(&config, "good", "memory = \"64M\"\n");
    define_vm(&config, "bad", "memory = [not toml\n");
    let cprd = Cprd::start(dir.path(), &bus, &config);
    let s = Setup { _dir: dir, _bus: bus, cprd };
    let list = json(&s.cprd.cprctl(&["--json", "list"]));
    let state = |n: &str| list.as_array().and_then(|a| a.iter().find(|v| v["name"] == n)).map(|v| v["state"].clone());
    assert_eq!(state("good"), Some(serde_json::json!("stopped")), "{list}");
    assert_eq!(state("bad"), Some(serde_json::json!("quarantined")), "{list}");
    let bad = json(&s.cprd.cprctl(&["--json", "status", "bad"]));
    assert!(bad["state_reason"].as_str().is_some_and(|r| r.contains("bad.toml")), "the error is on the bus: {bad}");
    let start = s.cprd.cprctl(&["start", "bad"]);
    assert!(!start.status.success());
    assert!(text(&start).contains("bad.toml"), "the error names the file: {}", text(&start));
    assert!(s.cprd.cprctl(&["start", "good"]).status.success(), "the others run");
    define_vm(&s.cprd.config_dir, "bad", "memory = \"64M\"\n");
    assert!(s.cprd.cprctl(&["reload"]).status.success());
    assert!(s.cprd.cprctl(&["start", "bad"]).status.success(), "fixed and reloaded, it starts");
}

/// A running VM whose file was removed and the configuration reloaded became invisible and
/// impossible to stop; now it is listed as `orphaned` until it is stopped.
#[test]
fn a_running_vm_whose_file_was_removed_stays_listed_and_stoppable() {
    let s = setup(&["vm1", "vm2"], &[]);
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
    let pid = main_pid(&json(&s.cprd.cprctl(&["--json", "status", "vm1"])));
    std::fs::remove_file(s.cprd.config_dir.join("vms/vm1.toml")).expect("rm vm1.toml");
    std::fs::remove_file(s.cprd.config_dir.join("vms/vm2.toml")).expect("rm vm2.toml");
    assert!(s.cprd.cprctl(&["reload"]).status.success());
    let st = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    assert_eq!(st["state"], "orphaned", "{st}");
    assert_eq!(main_pid(&st), pid);
    assert!(!s.cprd.cprctl(&["status", "vm2"]).status.success(), "a stopped VM whose file is gone is gone");
    console_ok(&s, "vm1");
    assert!(s.cprd.cprctl(&["stop", "vm1"]).status.success(), "an orphan can be stopped");
    assert!(wait_until(Duration::from_secs(5), || cpr_tests::process_gone(pid)), "its VMM is gone");
    assert!(!s.cprd.cprctl(&["status", "vm1"]).status.success(), "and then it leaves the list");
}

/// A VMM that does not answer when cprd starts kept cprd from ever taking its bus name (re-attach
/// asked it with no deadline, before the name); now cprd comes up, the others are re-attached,
/// and that VM needs attention.
#[test]
fn a_hung_vmm_at_cprd_start_needs_attention_and_the_others_come_up() {
    let mut s = setup(&["vm1", "vm2"], &[]);
    for vm in ["vm1", "vm2"] {
        assert!(s.cprd.cprctl(&["start", vm]).status.success());
    }
    let hung = main_pid(&json(&s.cprd.cprctl(&["--json", "status", "vm1"])));
    let fine = main_pid(&json(&s.cprd.cprctl(&["--json", "status", "vm2"])));
    let signal = |pid: u32, sig| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")), sig).expect("signal")
    };
    signal(hung, nix::sys::signal::Signal::SIGSTOP);
    s.cprd.kill9();
    let dir = s.cprd.runtime_dir.parent().expect("dir").to_path_buf();
    let config = s.cprd.config_dir.clone();
    s.cprd = Cprd::start(&dir, &s._bus, &config);
    assert!(
        wait_until(Duration::from_secs(60), || {
            json(&s.cprd.cprctl(&["--json", "status", "vm1"]))["state"] == "needs-attention"
        }),
        "the hung VMM's VM needs attention"
    );
    let st2 = json(&s.cprd.cprctl(&["--json", "status", "vm2"]));
    assert_eq!((st2["state"].as_str(), main_pid(&st2)), (Some("running"), fine), "{st2}");
    assert!(!cpr_tests::process_gone(hung), "the hung VMM, which may hold the guest, was not killed");
    signal(hung, nix::sys::signal::Signal::SIGCONT);
    assert!(s.cprd.cprctl(&["stop", "vm1"]).status.success());
    assert!(wait_until(Duration::from_secs(5), || cpr_tests::process_gone(hung)));
    console_ok(&s, "vm2");
}

/// Issue 13's hole: a VMM that died while its VM was `upgrading` was ignored (its exit was the
/// handoff's to interpret), and a handoff that ended "rolled back" marked the VM running again
/// with the dead pid: `start` was then a no-op. Here the old VMM answers its arbiter (the new VMM
/// went away before it was ready: the guest kept running) and dies before cprd has read the
/// answer; cprd is held stopped meanwhile (SIGSTOP), so both news reach it together.
#[test]
fn a_vmm_that_dies_while_its_vm_is_upgrading_is_not_marked_running_again() {
    let (wrappers, s) = setup_with_wrappers(&["vm1"]);
    let stall = wrapper(wrappers.path(), "stalls.sh", "CPR_VMM_FAULT=stall:before-ready exec REAL \"$@\"");
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
    let old = main_pid(&json(&s.cprd.cprctl(&["--json", "status", "vm1"])));
    let (mut upgrade, new_pid) = upgrade_until_stalled(&s.cprd, "vm1", &stall);
    let signal = |pid: u32, sig| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")), sig).expect("signal")
    };
    let cprd = s.cprd.child.id();
    signal(cprd, nix::sys::signal::Signal::SIGSTOP);
    signal(new_pid, nix::sys::signal::Signal::SIGKILL);
    // The old VMM sees the new one go, answers "the guest kept running here", then dies.
    std::thread::sleep(Duration::from_millis(300));
    signal(old, nix::sys::signal::Signal::SIGKILL);
    assert!(wait_until(Duration::from_secs(5), || cpr_tests::is_zombie(old)), "the old VMM died");
    signal(cprd, nix::sys::signal::Signal::SIGCONT);
    assert!(!upgrade.wait().expect("cprctl upgrade").success(), "the upgrade failed");
    assert!(
        wait_until(Duration::from_secs(5), || {
            json(&s.cprd.cprctl(&["--json", "status", "vm1"]))["state"] == "failed"
        }),
        "the VM whose VMM died is failed, not running: {}",
        json(&s.cprd.cprctl(&["--json", "status", "vm1"]))
    );
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
    let st = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    assert_eq!(st["state"], "running");
    assert!(!cpr_tests::process_gone(main_pid(&st)), "start started a VMM (a fresh guest): {st}");
}

/// Re-attach adopted whatever VMM answered on the recorded control socket. Now it adopts only
/// the VMM that reports the VM's generation (and maps the memfd cprd keeps): a record that does
/// not match what answers leaves the VM in `needs-attention`, and nothing is killed.
#[test]
fn reattach_adopts_only_the_vmm_that_runs_the_recorded_generation() {
    let mut s = setup(&["vm1"], &[]);
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
    assert!(s.cprd.cprctl(&["upgrade", "vm1"]).status.success());
    let pid = main_pid(&json(&s.cprd.cprctl(&["--json", "status", "vm1"])));
    // The record now names another generation than the VMM at its control socket runs.
    restart_with_record_changed(&mut s, "vm1", |record| {
        assert_eq!(record["generation"], 1);
        record["generation"] = serde_json::json!(0);
    });
    let st = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    assert_eq!(st["state"], "needs-attention", "{st}");
    assert!(!cpr_tests::process_gone(pid), "the VMM that may hold the guest was not killed");
    assert!(s.cprd.cprctl(&["stop", "vm1"]).status.success());
    assert!(wait_until(Duration::from_secs(5), || cpr_tests::process_gone(pid)));
}

/// Kills cprd (its VMMs run on), lets `change` edit `vm`'s runtime record, and starts cprd again
/// (without an fd store it re-attaches from the records).
fn restart_with_record_changed(s: &mut Setup, vm: &str, change: impl FnOnce(&mut serde_json::Value)) {
    s.cprd.kill9();
    let path = s.cprd.runtime_dir.join(format!("vms/{vm}.json"));
    let mut record: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).expect("record")).expect("json");
    change(&mut record);
    std::fs::write(&path, serde_json::to_vec(&record).expect("json")).expect("write record");
    let dir = s.cprd.runtime_dir.parent().expect("dir").to_path_buf();
    let config = s.cprd.config_dir.clone();
    s.cprd = Cprd::start(&dir, &s._bus, &config);
}

/// A runtime record a newer cprd wrote (a higher `format`) is not guessed at after a restart
/// (a downgrade of cprd): its VM needs attention with the reason, its VMM is kept, and a stop
/// still ends it.
#[test]
fn a_record_of_a_newer_cprd_leaves_its_vm_needing_attention_and_its_vmm_alive() {
    let mut s = setup(&["vm1"], &[]);
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
    let pid = main_pid(&json(&s.cprd.cprctl(&["--json", "status", "vm1"])));
    restart_with_record_changed(&mut s, "vm1", |record| {
        assert_eq!(record["format"], 1, "this cprd writes format 1: {record}");
        record["format"] = serde_json::json!(2);
    });
    let st = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    assert_eq!(st["state"], "needs-attention", "{st}");
    assert!(st["state_reason"].as_str().is_some_and(|r| r.contains("record format 2 is newer")), "{st}");
    assert!(!cpr_tests::process_gone(pid), "the VMM of a record it could not read was killed");
    assert!(s.cprd.cprctl(&["stop", "vm1"]).status.success());
    assert!(wait_until(Duration::from_secs(5), || cpr_tests::process_gone(pid)));
}

/// The pre-flight question to a candidate binary (`--state-formats`) had no deadline: a binary
/// that never answers held the upgrade (and its caller) for ever. Now it is refused in time,
/// killed, and the guest is untouched.
#[test]
fn a_candidate_binary_that_never_answers_its_preflight_is_refused_in_time() {
    let (wrappers, s) = setup_with_wrappers(&["vm1"]);
    let hangs = wrappers.path().join("hangs.sh");
    std::fs::write(&hangs, "#!/bin/sh\nexec sleep 600\n").expect("write");
    std::fs::set_permissions(&hangs, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
    let before = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    let t = std::time::Instant::now();
    let out = s.cprd.cprctl(&["upgrade", "vm1", "--binary", &hangs.to_string_lossy()]);
    assert!(!out.status.success());
    assert!(t.elapsed() < Duration::from_secs(30), "refused in time, not waited for: {:?}", t.elapsed());
    assert!(text(&out).contains("Incompatible") && text(&out).contains("did not say"), "{}", text(&out));
    let st = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    assert_eq!((&st["state"], &st["main_pid"]), (&before["state"], &before["main_pid"]), "untouched");
}

/// Issue 16: whether two builds of cpr-vmm can hand a guest over is decided by the state format
/// the running VMM writes and the majors the candidate reads (both asked, `--state-formats`),
/// not by the format this cprd was built with. A candidate of a later major that no longer reads
/// major 1 is refused before the guest is paused, with both sides named.
#[test]
fn a_candidate_that_does_not_read_the_running_vmms_state_format_is_refused_before_the_pause() {
    let (wrappers, s) = setup_with_wrappers(&["vm1"]);
    let newer = wrappers.path().join("newer-major.sh");
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = --state-formats ]; then printf 'writes: 2.0\\nreads: 2\\n'; exit 0; fi\nexec {} \"$@\"\n",
        cpr_tests::bin("cpr-vmm").display()
    );
    cpr_tests::write_executable(&newer, script);
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
    let before = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    let out = s.cprd.cprctl(&["upgrade", "vm1", "--binary", &newer.to_string_lossy()]);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(said.contains("Incompatible") && said.contains("reads state format majors [2]"), "{said}");
    assert!(said.contains("writes 1.0") && said.contains("nothing was changed"), "{said}");
    let st = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    for key in ["state", "main_pid", "generation", "last_downtime_usec"] {
        assert_eq!(st[key], before[key], "{key} untouched");
    }
    let history = json(&s.cprd.cprctl(&["--json", "history"]));
    let refused = &history[0];
    assert!(refused["ok"] == false && refused["downtime_usec"] == 0, "recorded as refused, no pause: {history}");
}

/// The operator's way out of that state when they know the new VMM never ran (here it never got
/// the commit and exited): `cprctl resume` makes the old VMM run the paused guest again, and the
/// guest goes on where it stopped.
#[test]
fn an_operator_resumes_the_old_vmm_of_a_vm_that_needs_attention() {
    let (s, before, after) = cprd_dies_at("committed");
    assert_eq!(after["state"], "needs-attention", "{after}");
    let out = s.cprd.cprctl(&["resume", "vm1"]);
    assert!(out.status.success(), "{}", text(&out));
    let st = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    assert_eq!(
        (st["state"].as_str(), &st["main_pid"], &st["generation"]),
        (Some("running"), &before["main_pid"], &before["generation"])
    );
    assert_eq!(st["state_reason"], "");
    console_ok(&s, "vm1");
    assert!(s.cprd.cprctl(&["upgrade", "vm1"]).status.success(), "and it upgrades again");
    assert!(!s.cprd.cprctl(&["resume", "vm1"]).status.success(), "resume is only for a VM that needs attention");
}

/// Issue 13's first hole: the new VMM ran the guest as soon as it had restored it, while the old
/// VMM, whose wait for that news had timed out, told its arbiter to roll back; the arbiter then
/// killed a new VMM that had run the guest and resumed the old one over the changed RAM. Here the
/// new VMM is held in its restore and the arbiter (cprd) is held stopped past the handoff
/// timeout; then the new VMM goes on first. It must not run the guest before cprd decides, and
/// the guest must come out of it whole, in exactly one VMM.
#[test]
fn the_new_vmm_runs_nothing_before_the_arbiter_decides_even_past_every_timeout() {
    let (wrappers, s) = setup_with_wrappers_and_timeout(&["vm1"], Some(500));
    let stall = wrapper(wrappers.path(), "stalls.sh", "CPR_VMM_FAULT=stall:during-restore exec REAL \"$@\"");
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
    let (mut upgrade, new_pid) = upgrade_until_stalled(&s.cprd, "vm1", &stall);
    let signal = |pid: u32, sig| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")), sig).expect("signal")
    };
    let cprd = s.cprd.child.id();
    signal(cprd, nix::sys::signal::Signal::SIGSTOP);
    // Past the old VMM's and the arbiter's timeouts, then the new VMM goes on while cprd is held.
    std::thread::sleep(Duration::from_millis(1500));
    signal(new_pid, nix::sys::signal::Signal::SIGCONT);
    std::thread::sleep(Duration::from_millis(500));
    signal(cprd, nix::sys::signal::Signal::SIGCONT);
    let _ = upgrade.wait();
    let st = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    assert_eq!(st["state"], "running", "{st}");
    // The guest checks itself (a counter kept in a register and in RAM): a VMM resumed over RAM
    // another one changed fails that check and stops; its heartbeats would break off.
    console_ok(&s, "vm1");
    let st = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    assert_eq!(st["state"], "running", "{st}");
}
/// Issue 13's hole in recovery: a cprd restarted in the middle of a handoff watched the old VMM on
/// a clock of its own (3 × the handoff timeout it now had + 1 s) and, once that ran out with the
/// old VMM still waiting for the new one, killed the new VMM and adopted the old one as it was:
/// paused for ever, the guest lost. Here the handoff runs with a long timeout (the old VMM, paused,
/// waits up to 60 s for a new VMM that stopped itself holding the whole state) and cprd is killed
/// and started again with a short one (1 s), as after an operator or a package shortened it. The
/// restarted cprd must not decide by a clock: the handoff never reached its decision, so the new
/// VMM is killed, confirmed dead, and the old one resumed. (On e6c560d the guest falls silent.)
#[test]
fn a_cprd_restarted_with_a_shorter_timeout_mid_upgrade_still_resumes_the_old_vmm() {
    let (wrappers, mut s) = setup_with_wrappers_and_timeout(&["vm1"], Some(60_000));
    let timeout = s.cprd.config_dir.join(TIMEOUT_FRAGMENT);
    let stall = wrapper(wrappers.path(), "stalls.sh", "CPR_VMM_FAULT=stall:after-state exec REAL \"$@\"");
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
    let before = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    // The new VMM holds the state and stopped itself; the old one has paused the guest.
    let (mut upgrade, new_pid) = upgrade_until_stalled(&s.cprd, "vm1", &stall);
    s.cprd.kill9();
    let _ = upgrade.wait();
    std::fs::write(&timeout, "[handoff]\ntimeout_ms = 1000\n").expect("write");
    let dir = s.cprd.runtime_dir.parent().expect("dir").to_path_buf();
    let config = s.cprd.config_dir.clone();
    s.cprd = Cprd::start(&dir, &s._bus, &config);
    let after = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    assert_eq!(after["state"], "running", "{after}");
    assert_eq!(after["generation"], before["generation"], "rolled back, not handed off");
    assert_eq!(after["main_pid"], before["main_pid"], "the old VMM holds the guest");
    assert!(wait_until(Duration::from_secs(5), || cpr_tests::process_gone(new_pid)), "the stalled new VMM was killed");
    // Resumed, not merely adopted: a guest left paused prints nothing.
    let console = s.cprd.runtime_dir.join("vms/vm1.console");
    let seq = heartbeats(&console).last().map_or(0, |h| h.seq);
    assert!(
        wait_until(Duration::from_secs(20), || heartbeats(&console).last().map_or(0, |h| h.seq) > seq + 1),
        "vm1 is silent after heartbeat {seq}: the old VMM holds the guest paused\n{}",
        s.cprd.log_text()
    );
    console_ok(&s, "vm1");
}

/// Issue 15's allow-list bypasses, each refused with `NotAllowed` and its reason, and the VM
/// untouched: before, the glob's `*` matched `/`, `..` was never resolved, symbolic links were
/// followed, and parent directories were not checked, so a script outside the allowed directory
/// ran as root. `evil` (outside it) leaves a mark when it runs; it never does.
#[test]
fn the_allow_list_refuses_every_way_around_it() {
    let (d, s) = setup_with_wrappers(&["vm1"]);
    let allowed = d.path();
    let base = tempfile::tempdir().expect("tempdir");
    let mark = base.path().join("evil-ran");
    let outside = base.path().join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    let evil = outside.join("evil");
    let real = cpr_tests::bin("cpr-vmm");
    std::fs::write(&evil, format!("#!/bin/sh\ntouch {}\nexec {} \"$@\"\n", mark.display(), real.display()))
        .expect("write evil");
    std::fs::set_permissions(&evil, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // Inside the allowed directory: a subdirectory, a symbolic link, a file not owned by root.
    std::fs::create_dir(allowed.join("sub")).expect("mkdir");
    std::fs::copy(&evil, allowed.join("sub/evil")).expect("copy");
    std::os::unix::fs::symlink(&evil, allowed.join("link")).expect("symlink");
    std::fs::copy(&evil, allowed.join("not-root")).expect("copy");
    nix::unistd::chown(&allowed.join("not-root"), Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
    let good = wrapper(allowed, "good", "exec REAL \"$@\"");
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
    let before = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    let cases = [
        // `allowed/../BASE/outside/evil`: the script outside, reached from inside the allowed directory.
        (
            format!(
                "{}/../{}/outside/evil",
                allowed.display(),
                base.path().file_name().unwrap_or_default().to_string_lossy()
            ),
            "`..`",
        ),
        (format!("{}/./good", allowed.display()), "`..`"),
        (format!("{}/sub/evil", allowed.display()), "not in the VMM allow-list"),
        (format!("{}/link", allowed.display()), "is a symbolic link"),
        (format!("{}/not-root", allowed.display()), "owned by uid 65534"),
    ];
    for (binary, reason) in &cases {
        let out = s.cprd.cprctl(&["upgrade", "vm1", "--binary", binary]);
        assert_eq!(out.status.code(), Some(5), "{binary} refused as NotAllowed: {}", text(&out));
        assert!(text(&out).contains(reason), "{binary}: the reason names {reason:?}: {}", text(&out));
    }
    // The allowed file itself, in a directory that others may write to (not sticky).
    std::fs::set_permissions(allowed, std::fs::Permissions::from_mode(0o775)).expect("chmod");
    let out = s.cprd.cprctl(&["upgrade", "vm1", "--binary", &good]);
    assert_eq!(out.status.code(), Some(5), "refused: {}", text(&out));
    assert!(text(&out).contains("writable by group or others (mode 775)"), "{}", text(&out));
    std::fs::set_permissions(allowed, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let after = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    assert_eq!(after["generation"], before["generation"], "nothing was upgraded");
    assert_eq!(after["main_pid"], before["main_pid"], "the same VMM runs the guest");
    assert!(!mark.exists(), "the script outside the allow-list never ran");
    // And what is allowed still runs: a wrapper script in the allowed directory, run as the file
    // cprd opened.
    let out = s.cprd.cprctl(&["upgrade", "vm1", "--binary", &good]);
    assert!(out.status.success(), "{}", text(&out));
    console_ok(&s, "vm1");
}

/// A symbolic link flipped between an allowed script and one outside the allow-list while
/// upgrades run: every upgrade either runs the allowed script or is refused; the flipped target
/// never runs (before, cprd checked the path and then executed it by path again).
#[test]
fn a_symlink_flipped_during_upgrades_never_runs_its_target() {
    let (d, s) = setup_with_wrappers(&["vm1"]);
    let allowed = d.path().to_path_buf();
    let base = tempfile::tempdir().expect("tempdir");
    let mark = base.path().join("evil-ran");
    let evil = base.path().join("evil");
    let real = cpr_tests::bin("cpr-vmm");
    std::fs::write(&evil, format!("#!/bin/sh\ntouch {}\nexec {} \"$@\"\n", mark.display(), real.display()))
        .expect("write evil");
    std::fs::set_permissions(&evil, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let good = wrapper(&allowed, "good", "exec REAL \"$@\"");
    let flip = allowed.join("flip");
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let (stop, allowed, good, evil) = (stop.clone(), allowed.clone(), good.clone(), evil.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Atomic swaps by rename: `flip` is the allowed file one moment, a link the next.
                let tmp = allowed.join(format!(".flip{n}"));
                if n.is_multiple_of(2) {
                    let _ = std::fs::hard_link(&good, &tmp);
                } else {
                    let _ = std::os::unix::fs::symlink(&evil, &tmp);
                }
                let _ = std::fs::rename(&tmp, allowed.join("flip"));
                n += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            n
        })
    };
    let (mut ran, mut refused) = (0, 0);
    for _ in 0..12 {
        let out = s.cprd.cprctl(&["upgrade", "vm1", "--binary", &flip.display().to_string()]);
        if out.status.success() {
            ran += 1;
        } else {
            assert_eq!(out.status.code(), Some(5), "refused as NotAllowed, or ran: {}", text(&out));
            refused += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flips = flipper.join().expect("flipper");
    assert!(!mark.exists(), "the link's target ran ({ran} upgrades ran, {refused} refused, {flips} flips)");
    console_ok(&s, "vm1");
    println!("{ran} upgrades ran the allowed file, {refused} were refused, {flips} flips");
}

/// Calls `org.cprd1.Manager.GetVM(name)` on `address` with zbus (a 7 MiB argument does not fit
/// on a command line): the reply, or the error as text.
fn get_vm_raw(address: &str, name: &str) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let conn = zbus::connection::Builder::address(address).build().await.map_err(|e| e.to_string())?;
        conn.call_method(Some("org.cprd1"), "/org/cprd1", Some("org.cprd1.Manager"), "GetVM", &(name,))
            .await
            .map(|m| format!("{:?}", m.body().deserialize::<zbus::OwnedObjectPath>()))
            .map_err(|e| e.to_string())
    })
}

/// Issue 15: one `GetVM` with a 7 MiB name of U+0001 characters (anyone may call `GetVM`) made
/// cprd's `NoSuchVM` reply quote it with `{:?}`, about 42 MiB, above dbus-daemon's 32 MiB limit:
/// the bus dropped cprd, which ran on deaf to every later call. Names are now checked first and
/// never echoed.
#[test]
fn a_huge_vm_name_gets_a_short_error_and_cprd_stays_on_the_bus() {
    let s = setup(&["vm1"], &[]);
    let huge = "\u{1}".repeat(7 << 20);
    let err = get_vm_raw(&s.cprd.address, &huge).expect_err("no such VM");
    assert!(err.contains("org.cprd1.Error.InvalidArgument"), "a named error: {}", &err[..err.len().min(300)]);
    assert!(
        err.len() < 300 && err.contains("got 7340032 bytes"),
        "short, with the length only: {}",
        &err[..err.len().min(300)]
    );
    for bad in ["", "a/b", "../vm1", &"x".repeat(65)] {
        let err = get_vm_raw(&s.cprd.address, bad).expect_err(bad);
        assert!(err.contains("InvalidArgument"), "{bad:?}: {err}");
    }
    assert!(get_vm_raw(&s.cprd.address, "vm1").is_ok(), "and a good name is answered");
    let out = s.cprd.cprctl(&["list"]);
    assert!(out.status.success(), "cprd is still on the bus: {}", text(&out));
}

/// Issue 15: a cprd that lost its bus connection ran on, deaf to every call. Now it exits
/// non-zero so that its service manager restarts it; the VMs are untouched.
#[test]
fn cprd_exits_non_zero_when_the_bus_goes_away_and_vms_run_on() {
    let mut s = setup(&["vm1"], &[]);
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
    let pid = main_pid(&json(&s.cprd.cprctl(&["--json", "status", "vm1"])));
    s._bus.kill();
    let mut status = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            status = s.cprd.child.try_wait().ok().flatten();
            status.is_some()
        }),
        "cprd still runs off the bus: {}",
        s.cprd.log_text()
    );
    assert!(status.is_some_and(|st| !st.success()), "a failure exit: {status:?}");
    assert!(s.cprd.log_text().contains("lost the bus connection"), "{}", s.cprd.log_text());
    assert!(!cpr_tests::process_gone(pid), "the VMM runs on");
}

/// The distinct guest-RAM memfds (by inode) a process holds: `/proc/PID/fd` links to
/// `/memfd:cpr-vmm-ram` (a VMM may hold its own under two numbers).
fn guest_ram_inodes(pid: u32) -> std::collections::BTreeSet<u64> {
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Default::default() };
    dir.filter_map(|e| {
        let path = e.ok()?.path();
        let target = std::fs::read_link(&path).ok()?;
        target
            .to_string_lossy()
            .contains("memfd:cpr-vmm-ram")
            .then(|| std::fs::metadata(&path).ok().map(|m| m.ino()))?
    })
    .collect()
}

/// A cprd started from a copy of this build's binary (which a test may replace on disk), with
/// `vms` defined (64 MiB each); and the copy's path.
fn setup_from_a_cprd_copy(vms: &[&str]) -> (Setup, PathBuf) {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = PrivateBus::start(dir.path());
    let config = write_config(dir.path(), &[]);
    for vm in vms {
        define_vm(&config, vm, "memory = \"64M\"\n");
    }
    let copy = dir.path().join("cprd");
    std::fs::copy(cpr_tests::bin("cprd"), &copy).expect("copy cprd");
    let cprd = Cprd::start_program(&copy, dir.path(), &bus, &config, &[], None);
    (Setup { _dir: dir, _bus: bus, cprd }, copy)
}

/// Replaces the executable at `path` the way a package manager does: `bytes` in a new file (mode
/// 0755) renamed over it.
fn install_by_rename(path: &Path, bytes: &[u8]) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, bytes).expect("write");
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&staged, path).expect("rename");
}

/// Sends SIGHUP to `cprd` (what `systemctl reload` does).
fn sighup(cprd: &Cprd) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(cprd.child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
}

/// Issue 15: a re-exec of cprd (SIGHUP after its binary changed) that failed left every held fd
/// inheritable, so each VMM started afterwards got every other guest's RAM (vm1's memfd in vm2's
/// VMM). Now a failed re-exec makes them close-on-exec again and cprd reloads in place.
#[test]
fn a_failed_re_exec_leaks_no_guest_ram_into_later_vmms() {
    let (s, copy) = setup_from_a_cprd_copy(&["vm1", "vm2"]);
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
    // A "new build" that cannot be executed: its interpreter does not exist.
    install_by_rename(&copy, b"#!/nonexistent/interpreter\n");
    sighup(&s.cprd);
    assert!(
        wait_until(Duration::from_secs(10), || s.cprd.log_text().contains("cannot re-execute")),
        "the re-exec failed and was logged: {}",
        s.cprd.log_text()
    );
    assert!(s.cprd.cprctl(&["start", "vm2"]).status.success(), "cprd runs on: {}", s.cprd.log_text());
    let vm2 = main_pid(&json(&s.cprd.cprctl(&["--json", "status", "vm2"])));
    let ram = guest_ram_inodes(vm2);
    assert_eq!(ram.len(), 1, "vm2's VMM holds its own guest RAM and no other: inodes {ram:?}");
    console_ok(&s, "vm1");
    console_ok(&s, "vm2");
}

/// After a re-exec cprd's VMMs are still its children, and cprd reaps them by pidfd: a VMM killed
/// then is reported with how it ended, as before the re-exec. It was reported as "exited" whatever
/// ended it, so a SIGKILL (the OOM killer's) read like a clean exit.
#[test]
fn a_vmm_killed_after_a_re_exec_of_cprd_is_reported_with_its_signal() {
    let (s, copy) = setup_from_a_cprd_copy(&["vm1"]);
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
    // A "new build": the same program with one byte more (another content id).
    let mut build = std::fs::read(cpr_tests::bin("cprd")).expect("read cprd");
    build.push(0);
    install_by_rename(&copy, &build);
    sighup(&s.cprd);
    assert!(
        wait_until(Duration::from_secs(20), || s.cprd.log_text().matches(" ready: ").count() >= 2),
        "cprd re-executed and finished the reload: {}",
        s.cprd.log_text()
    );
    assert!(s.cprd.log_text().contains("re-executed"), "{}", s.cprd.log_text());
    let vmm = main_pid(&json(&s.cprd.cprctl(&["--json", "status", "vm1"])));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(vmm).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL");
    assert!(
        wait_until(Duration::from_secs(10), || json(&s.cprd.cprctl(&["--json", "status", "vm1"]))["state"] == "failed"),
        "the VM whose VMM was killed is failed"
    );
    let log = s.cprd.log_text();
    let line = log.lines().find(|l| l.contains("died unexpectedly")).unwrap_or_default().to_string();
    assert!(line.contains("SIGKILL"), "the VMM's end is named: {line:?}\n{log}");
    assert!(
        wait_until(Duration::from_secs(5), || !std::path::Path::new(&format!("/proc/{vmm}")).exists()),
        "and it was reaped, not left a zombie"
    );
}

/// Runs `args` as uid and gid 65534 with no supplementary groups (`setpriv`).
fn as_nobody(args: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(args)
        .output()
        .expect("setpriv")
}

/// Issue 15: file modes came from the umask. Under umask 000 another user connected to a VMM's
/// control socket (guest RAM as a read-write fd, stop), and under 022 read console logs and
/// records. Now cprd sets its own umask (077, inherited by its VMMs) and gives explicit modes:
/// runtime directories 0750, console logs 0640 and its own read-only control socket 0660 (group
/// cprd where it exists), records and VMM sockets owner-only.
#[test]
fn under_any_umask_another_user_reaches_no_vmm_socket_console_or_record() {
    require_kvm();
    for umask in [0o000, 0o022] {
        let dir = tempfile::tempdir().expect("tempdir");
        let bus = PrivateBus::start(dir.path()); // makes `dir` 0755: others may look inside
        let config = write_config(dir.path(), &[]);
        define_vm(&config, "vm1", "memory = \"64M\"\n");
        let cprd = Cprd::start_program(&cpr_tests::bin("cprd"), dir.path(), &bus, &config, &[], Some(umask));
        let s = Setup { _dir: dir, _bus: bus, cprd };
        assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
        let run = s.cprd.runtime_dir.clone();
        let vms = run.join("vms");
        let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0);
        let files = [
            (run.clone(), 0o750),
            (vms.clone(), 0o750),
            (vms.join("vm1.console"), 0o640),
            (vms.join("vm1.json"), 0o600),
            (vms.join("vm1.0.sock"), 0o700), // a socket is bound 0777 less the umask (077)
            (run.join("cprd.sock"), 0o660),
        ];
        for (path, want) in &files {
            assert_eq!(mode(path), *want, "umask {umask:03o}: {} has mode {:o}", path.display(), mode(path));
        }
        let vmm_socket = vms.join("vm1.0.sock").display().to_string();
        for path in [vms.join("vm1.console"), vms.join("vm1.json")] {
            let out = as_nobody(&["cat", &path.display().to_string()]);
            assert!(!out.status.success(), "umask {umask:03o}: uid 65534 read {}", path.display());
        }
        let out = as_nobody(&[&cpr_tests::bin("cprctl").display().to_string(), "ping", "--socket", &vmm_socket]);
        assert!(!out.status.success(), "umask {umask:03o}: uid 65534 connected to the VMM: {}", text(&out));
        let cprd_socket = run.join("cprd.sock").display().to_string();
        let out = s.cprd.cprctl(&["ping", "--socket", &cprd_socket]);
        assert!(out.status.success(), "root pings cprd's read-only socket: {}", text(&out));
        console_ok(&s, "vm1");
    }
}

/// cpr-vmm's seccomp filters kill it for a call outside its lists, and cprd says so: a VMM whose
/// vCPU thread calls `execve` once it runs the guest (fault injection) dies by `SIGSYS`, and the
/// VM is `failed` with that reason. Without the filter the VMM would have become `/bin/true`.
#[test]
fn a_forbidden_system_call_kills_the_vmm_with_sigsys_and_cprd_says_so() {
    let (wrappers, s) = setup_with_wrappers(&["vm1"]);
    let c = &s.cprd;
    let forbidden = wrapper(wrappers.path(), "forbidden.sh", "CPR_VMM_FAULT=forbidden-syscall exec REAL \"$@\"");
    assert!(c.cprctl(&["start", "vm1"]).status.success());
    let up = json(&c.cprctl(&["--json", "upgrade", "vm1", "--binary", &forbidden]));
    assert_eq!(up["generation"], 1, "{up}");
    let mut st = serde_json::Value::Null;
    let failed = wait_until(Duration::from_secs(20), || {
        st = json(&c.cprctl(&["--json", "status", "vm1"]));
        st["state"] == "failed"
    });
    assert!(failed, "the VMM runs on after a forbidden call: {st}");
    let reason = st["state_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("SIGSYS") && reason.contains("seccomp"), "{st}");
    assert!(c.log_text().contains("killed by SIGSYS"), "{}", c.log_text());
}

/// Re-attach believes the kernel, not the VMM: a VMM that names another process as itself
/// (fault `lie-pid:<n>`, here a `sleep` the test started) is not adopted under that pid after a
/// cprd restart; cprd says what the kernel says instead. (Before, cprd took the pid the VMM
/// reported, and stopping the VM would have killed that process.)
#[test]
fn re_attach_takes_the_vmms_pid_from_the_kernel_not_from_the_vmm() {
    let (wrappers, mut s) = setup_with_wrappers(&["vm1"]);
    let mut bystander = std::process::Command::new("sleep").arg("600").spawn().expect("sleep");
    let liar =
        wrapper(wrappers.path(), "liar.sh", &format!("CPR_VMM_FAULT=lie-pid:{} exec REAL \"$@\"", bystander.id()));
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
    let up = json(&s.cprd.cprctl(&["--json", "upgrade", "vm1", "--binary", &liar]));
    assert_eq!(up["generation"], 1, "{up}");
    let vmm_pid = json(&s.cprd.cprctl(&["--json", "status", "vm1"]))["main_pid"].as_u64().expect("pid");
    s.cprd.kill9();
    let dir = s.cprd.runtime_dir.parent().expect("dir").to_path_buf();
    let config = s.cprd.config_dir.clone();
    s.cprd = Cprd::start(&dir, &s._bus, &config);
    let st = json(&s.cprd.cprctl(&["--json", "status", "vm1"]));
    assert_ne!(st["main_pid"].as_u64(), Some(u64::from(bystander.id())), "cprd adopted the bystander: {st}");
    let reason = st["state_reason"].as_str().unwrap_or_default();
    assert!(reason.contains(&format!("the kernel says {vmm_pid}")), "{st}");
    let _ = s.cprd.cprctl(&["stop", "vm1"]);
    assert!(bystander.try_wait().expect("wait").is_none(), "the bystander was killed");
    let _ = bystander.kill();
    let _ = bystander.wait();
}

/// A guest that floods its serial console fills at most `max_bytes × (keep + 1)` on the host:
/// cprd rotates `NAME.console` into `.1` .. `.keep` and drops the oldest, across an upgrade and a
/// cprd restart without an fd store (which hands the VMM a new console socket). `cprctl console`,
/// started once, follows across every rotation and loses nothing: what the kept files hold at the
/// end is exactly the end of what it printed. (Before, the VMM appended to the log itself, with
/// no limit at all.)
#[test]
fn a_guest_flooding_its_console_fills_at_most_its_capped_rotated_logs() {
    const MAX: u64 = 64 << 10;
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = PrivateBus::start(dir.path());
    let config = write_config(dir.path(), &[]);
    std::fs::create_dir_all(config.join("config.d")).expect("mkdir");
    std::fs::write(config.join("config.d/50-console.toml"), format!("[console]\nmax_bytes = {MAX}\nkeep = 2\n"))
        .expect("write");
    define_vm(&config, "vm1", "memory = \"64M\"\nvcpus = 1\n");
    // The test guest's flood mode: a heartbeat line every 256 iterations.
    let flood = [("CPR_VMM_TEST_GUEST_FLAGS", "4")];
    let cprd = Cprd::start_with_env(dir.path(), &bus, &config, &flood);
    // Its drop kills whatever VMM is left, should an assertion fail.
    let mut s = Setup { _dir: dir, _bus: bus, cprd };
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
    let live = s.cprd.runtime_dir.join("vms/vm1.console");
    let rotated = |n: u32| live.with_file_name(format!("vm1.console.{n}"));
    let followed = s._dir.path().join("followed");
    let mut follower = s
        .cprd
        .cprctl_command(&["console", "vm1"])
        .stdout(std::fs::File::create(&followed).expect("followed"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(KilledOnDrop)
        .expect("cprctl console");
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let mut worst = (0u64, 0usize);
    let mut watch = |until: u64| {
        wait_until(Duration::from_secs(60), || {
            let files = [live.clone(), rotated(1), rotated(2), rotated(3)];
            let biggest = files.iter().map(|p| size(p)).max().unwrap_or(0);
            let count = files.iter().filter(|p| p.exists()).count();
            worst = (worst.0.max(biggest), worst.1.max(count));
            size(&followed) > until
        })
    };
    assert!(watch(2 * MAX), "the follower printed {} bytes", size(&followed));
    let up = json(&s.cprd.cprctl(&["--json", "upgrade", "vm1"]));
    assert_eq!(up["generation"], 1, "{up}");
    assert!(watch(4 * MAX), "the follower printed {} bytes after the upgrade", size(&followed));
    // A cprd without an fd store loses its end of the console socket with its process.
    s.cprd.kill9();
    s.cprd = Cprd::start_with_env(s._dir.path(), &s._bus, &config, &flood);
    assert!(watch(6 * MAX), "the follower printed {} bytes after the cprd restart", size(&followed));
    assert!(worst.0 <= MAX, "a console file grew to {} bytes, above {MAX}", worst.0);
    assert!(worst.1 <= 3, "{} console files at once; keep = 2 allows 3", worst.1);
    assert!(s.cprd.cprctl(&["stop", "vm1"]).status.success());
    // The follower catches up, then its output ends with exactly what the kept files hold.
    let mut last = 0;
    let settled = wait_until(Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_millis(700));
        let now = size(&followed);
        std::mem::replace(&mut last, now) == now
    });
    follower.end();
    assert!(settled, "the follower never caught up");
    let kept: Vec<u8> =
        [rotated(2), rotated(1), live.clone()].iter().flat_map(|p| std::fs::read(p).unwrap_or_default()).collect();
    let printed = std::fs::read(&followed).expect("followed");
    assert!(kept.len() as u64 > 2 * MAX, "only {} bytes kept", kept.len());
    assert!(printed.ends_with(&kept), "the follower's {} bytes do not end with the {} kept", printed.len(), kept.len());
    // The guest's heartbeats in what was followed only ever go up.
    let text = String::from_utf8_lossy(&printed);
    let seqs: Vec<u64> = heartbeats_in(&text);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "heartbeats out of order in the followed console");
    assert!(seqs.len() > 1000, "{} heartbeats", seqs.len());
}

/// A child process the test started, killed (by its PID) and reaped when dropped.
struct KilledOnDrop(std::process::Child);

impl KilledOnDrop {
    fn end(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        self.end();
    }
}

/// The sequence numbers of the heartbeat lines in `text`.
fn heartbeats_in(text: &str) -> Vec<u64> {
    cpr_testguest::Heartbeat::all_in(text).iter().map(|h| h.seq).collect()
}

/// The pre-flight asks a candidate binary in the VM's box, as the VM's own uid, never as root:
/// a candidate that will not answer `--state-formats` as root is taken. (Before, cprd asked as
/// root, and this upgrade was refused: "does not read state format".)
#[test]
fn the_preflight_asks_a_cpr_vmm_candidate_in_the_vms_box_not_as_root() {
    let (wrappers, s) = setup_with_wrappers(&["vm1"]);
    let path = wrappers.path().join("not-as-root.sh");
    let script = format!(
        "#!/bin/sh\nif [ \"$(id -u)\" = 0 ]; then echo 'asked as root' >&2; exit 3; fi\nexec {} \"$@\"\n",
        cpr_tests::bin("cpr-vmm").display()
    );
    cpr_tests::write_executable(&path, script);
    assert!(s.cprd.cprctl(&["start", "vm1"]).status.success());
    let up = s.cprd.cprctl(&["--json", "upgrade", "vm1", "--binary", &path.display().to_string()]);
    assert_eq!(json(&up)["generation"], 1);
    console_ok(&s, "vm1");
}
