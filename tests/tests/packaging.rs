//! The .deb of `packaging/build`, installed and upgraded with apt in a container running real
//! systemd 254 and QEMU 10 (the rootfs `scripts/container-rootfs` builds with WITH_QEMU=1).
//! `scripts/test` builds the packages first: version 0.2.0 and, with a re-stamped cpr-vmm and
//! cprd, 0.2.1.
#![allow(clippy::tests_outside_test_module)] // integration tests: every test is at the top level

use std::path::{Path, PathBuf};
use std::time::Duration;

use cpr_tests::container::{Container, built_package as package};
use cpr_tests::linux_guest::{check_probe, initramfs, kernel, probe_lines};
use cpr_tests::wait_until;

fn guests_continuous(c: &Container) {
    c.guests_continuous(&["a", "b"]);
    let q = c.console("q");
    let text = || std::fs::read_to_string(&q).unwrap_or_default();
    let seq = probe_lines(&text()).last().map_or(0, |l| l.seq);
    assert!(wait_until(Duration::from_secs(30), || probe_lines(&text()).last().is_some_and(|l| l.seq > seq + 2)));
    check_probe(&probe_lines(&text())).unwrap_or_else(|e| panic!("q: {e}"));
}

/// A package that puts a new binary at QEMU's path: the real QEMU with one byte appended (it
/// runs the same, its build id differs), as a QEMU security update would; with `broken`, a
/// script that is no QEMU at all.
fn qemu_update_package(c: &Container, dir: &Path, broken: bool) -> PathBuf {
    let version = if broken { "2.0" } else { "1.0" };
    let tree = dir.join(format!("qemu-update-{version}"));
    std::fs::create_dir_all(tree.join("DEBIAN")).expect("mkdir");
    std::fs::create_dir_all(tree.join("usr/bin")).expect("mkdir");
    std::fs::write(
        tree.join("DEBIAN/control"),
        format!(
        "Package: cprd-test-qemu-update\nVersion: {version}\nArchitecture: amd64\nMaintainer: cprd tests <t@example.invalid>\n\
         Description: test: a new binary at /usr/bin/qemu-system-x86_64\n"
        ),
    )
    .expect("control");
    let mut qemu = std::fs::read(c.root.join("usr/bin/qemu-system-x86_64")).expect("container's QEMU");
    qemu.push(0);
    if broken {
        qemu = b"#!/bin/sh\necho 'not QEMU' >&2\nexit 1\n".to_vec();
    }
    let bin = tree.join("usr/bin/qemu-system-x86_64");
    std::fs::write(&bin, qemu).expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let deb = dir.join(format!("cprd-test-qemu-update_{version}_amd64.deb"));
    let o = std::process::Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&tree)
        .arg(&deb)
        .output()
        .expect("dpkg-deb");
    assert!(o.status.success(), "dpkg-deb: {}", String::from_utf8_lossy(&o.stderr));
    deb
}

#[test]
fn apt_installs_upgrades_live_and_purges_cleanly() {
    let (v1, v2) = (package("0.2.0"), package("0.2.1"));
    let scratch = tempfile::Builder::new().prefix("cprd-pkg").tempdir_in("/var/tmp").expect("tempdir");
    let (kernel, initrd) = (kernel(), initramfs());
    let pkgs = v1.parent().expect("dir").to_path_buf();
    let c = Container::boot_for_packages(&[&pkgs, &kernel, &initrd, scratch.path()]);

    // Install: the service is enabled, started and healthy.
    c.sh(&format!("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {}", v1.display()));
    c.sh("systemctl is-active cprd.service && systemctl status cprd.service >/dev/null");
    c.sh("getent group cprd && test -d /run/cprd/vms");
    assert!(c.sh("cprctl --version").contains("0.2.0"));
    // Three VMs: two cpr-vmm test guests, one QEMU guest under TCG.
    c.sh("printf 'memory = \"64M\"\\n' > /etc/cprd/vms/a.toml && cp /etc/cprd/vms/a.toml /etc/cprd/vms/b.toml");
    c.define_vm("q", &cpr_tests::linux_guest::vm_definition("128M", ""));
    c.sh("cprctl reload && cprctl start a && cprctl start b && cprctl start q");
    assert!(wait_until(Duration::from_secs(90), || probe_lines(
        &std::fs::read_to_string(c.console("q")).unwrap_or_default()
    )
    .len()
        > 3));
    guests_continuous(&c);
    let q_pid = c.status("q")["main_pid"].clone();
    let cprd_pid = c.sh("systemctl show -P MainPID cprd.service");

    // Upgrade the package: cprd re-executes in place, both cpr-vmm guests move to the new
    // cpr-vmm, the QEMU guest is untouched.
    c.sh(&format!("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {}", v2.display()));
    assert!(c.sh("cprctl --version").contains("0.2.1"));
    assert_eq!(c.sh("systemctl show -P MainPID cprd.service"), cprd_pid, "cprd was restarted, not reloaded");
    for vm in ["a", "b"] {
        let st = c.status(vm);
        assert_eq!((st["generation"].as_u64(), st["state"].as_str()), (Some(1), Some("running")), "{vm}: {st}");
    }
    let st = c.status("q");
    assert_eq!(
        (&st["generation"], &st["main_pid"]),
        (&serde_json::json!(0), &q_pid),
        "QEMU VM touched: {st}\n{}",
        c.journal()
    );
    guests_continuous(&c);
    let history: serde_json::Value = serde_json::from_str(&c.sh("cprctl --json history")).expect("history");
    let ups: Vec<_> = history.as_array().expect("array").iter().filter(|r| r["ok"] == true).collect();
    assert_eq!(ups.len(), 2, "{history}");
    assert!(ups.iter().all(|r| r["downtime_usec"].as_u64().is_some_and(|d| d > 0)), "{history}");

    // A new binary at QEMU's path fires the trigger: the QEMU guest moves to it, live.
    let update = qemu_update_package(&c, scratch.path(), false);
    c.sh(&format!("dpkg -i --force-overwrite {}", update.display()));
    let st = c.status("q");
    assert_eq!(st["generation"], 1, "the trigger did not upgrade the QEMU VM: {st}\n{}", c.journal());
    guests_continuous(&c);
    // A broken binary at QEMU's path: the transaction still succeeds (c.sh checks the exit
    // status), the VM stays on its QEMU, and the failed upgrade is in the history.
    let q_pid = c.status("q")["main_pid"].clone();
    let broken = qemu_update_package(&c, scratch.path(), true);
    c.sh(&format!("dpkg -i --force-overwrite {}", broken.display()));
    let st = c.status("q");
    assert_eq!(
        (&st["generation"], &st["main_pid"], st["state"].as_str()),
        (&serde_json::json!(1), &q_pid, Some("running")),
        "{st}"
    );
    guests_continuous(&c);
    let history: serde_json::Value = serde_json::from_str(&c.sh("cprctl --json history")).expect("history");
    let last = history.as_array().and_then(|h| h.last()).cloned().unwrap_or_default();
    assert!(
        last["vm"] == "q"
            && last["ok"] == false
            && last["error"].as_str().is_some_and(|e| e.contains("not a working QEMU")),
        "{history}"
    );

    // The packaged metrics timer is on; its service, as hardened as it is, writes cprd's
    // metrics where node_exporter's textfile collector reads them (skipped while that directory
    // is absent).
    assert_eq!(c.sh("systemctl is-enabled cprd-metrics.timer").trim(), "enabled");
    c.sh("mkdir -p /var/lib/prometheus/node-exporter && systemctl start cprd-metrics.service");
    let prom = c.sh("cat /var/lib/prometheus/node-exporter/cprd.prom");
    assert!(
        prom.lines().any(|l| l == "cprd_upgrades_total{backend=\"cpr-vmm\",result=\"ok\"} 2"),
        "{prom}\n{}",
        c.journal()
    );

    // Purge: VMs stopped, service gone, files and state removed, no units left behind.
    let pids: Vec<u64> = ["a", "b", "q"].iter().filter_map(|v| c.status(v)["main_pid"].as_u64()).collect();
    c.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -q cprd");
    for pid in pids {
        let gone = wait_until(Duration::from_secs(10), || {
            c.exec(&["test", "-e", &format!("/proc/{pid}")]).status.code() == Some(1)
        });
        assert!(gone, "VMM {pid} outlived the purge");
    }
    // Units whose files the purge removed stay loaded, inactive, until systemd's garbage
    // collection drops them (the slice once the last VM scope in it is gone): given 10 s.
    let left = || c.sh("systemctl list-units --all --no-legend 'cprd*' | grep -v not-found || true");
    assert!(wait_until(Duration::from_secs(10), || left().trim().is_empty()), "units left: {}", left());
    for path in ["/etc/cprd", "/usr/libexec/cprd", "/usr/bin/cprctl", "/usr/lib/systemd/system/cprd.service"] {
        assert!(c.exec(&["test", "-e", path]).status.code() == Some(1), "{path} survived the purge");
    }
}
