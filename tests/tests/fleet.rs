//! The Ansible rollout (`ansible/rolling-upgrade.yml`, collection `cprd.fleet`) across three
//! real-systemd hosts: systemd-nspawn containers (systemd 254, sshd) in a network namespace this
//! test creates, which `ansible-playbook` (Debian's ansible-core) reaches over ssh on loopback.
//! Each host runs cprd 0.2.0 with two cpr-vmm test guests on the host's `/dev/kvm`.
#![allow(clippy::tests_outside_test_module)] // integration tests: every test is at the top level

use std::path::{Path, PathBuf};
use std::process::Command;

use cpr_tests::container::{Container, built_package as package};
use cpr_tests::linux_guest::NetNs;
use cpr_tests::require_kvm;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// 0.2.1 with a cpr-vmm that is no VMM at all: cprd refuses to hand any guest to it.
fn broken_package(good: &Path, dir: &Path) -> PathBuf {
    let tree = dir.join("broken");
    let run = |cmd: &mut Command| {
        let o = cmd.output().expect("dpkg-deb");
        assert!(o.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    run(Command::new("dpkg-deb").arg("-R").arg(good).arg(&tree));
    cpr_tests::write_executable(
        &tree.join("usr/libexec/cprd/cpr-vmm"),
        "#!/bin/sh\necho 'cpr-vmm: this build is broken' >&2\nexit 1\n",
    );
    let deb = dir.join("cprd_0.2.1-broken_amd64.deb");
    run(Command::new("dpkg-deb").args(["--root-owner-group", "-b"]).arg(&tree).arg(&deb));
    deb
}

/// Installs 0.2.0 on `c` and starts two test guests.
fn provision(c: &Container, v1: &Path) {
    c.sh(&format!("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {}", v1.display()));
    c.sh("printf 'memory = \"64M\"\\n' > /etc/cprd/vms/a.toml && cp /etc/cprd/vms/a.toml /etc/cprd/vms/b.toml");
    c.sh("cprctl reload && cprctl start a && cprctl start b");
}

/// `(version, [generation of a, of b])` on `c`.
fn fleet_state(c: &Container) -> (String, Vec<u64>) {
    let version = c.sh("cprctl --version").trim().to_string();
    let generations = ["a", "b"]
        .iter()
        .map(|vm| {
            let st = c.status(vm);
            assert_eq!(st["state"], "running", "{vm}: {st}");
            st["generation"].as_u64().unwrap_or(u64::MAX)
        })
        .collect();
    (version, generations)
}

/// The rollout, two hosts a batch, upgrades the first host (both guests on the new cpr-vmm, live),
/// fails the second, whose package carries a broken cpr-vmm (cprd refuses it, the guests stay
/// where they were), and so never starts the next batch: the third host is untouched. Each host
/// it reached has its report.
#[test]
fn the_rolling_upgrade_stops_at_the_first_host_that_did_not_move_every_vm() {
    require_kvm();
    let (v1, v2) = (package("0.2.0"), package("0.2.1"));
    let scratch = tempfile::Builder::new().prefix("cprd-fleet").tempdir_in("/var/tmp").expect("tempdir");
    let broken = broken_package(&v2, scratch.path());
    let key = scratch.path().join("id_ed25519");
    let o = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", ""])
        .arg("-f")
        .arg(&key)
        .output()
        .expect("ssh-keygen");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
    let net = NetNs::create("fleet");
    assert!(net.ip(&["link", "set", "lo", "up"]));
    let pkgs = v1.parent().expect("dir").to_path_buf();
    let hosts: Vec<(String, u16, Container)> = (1..=3u16)
        .map(|i| {
            let port = 2200 + i;
            (format!("fleet{i}"), port, Container::boot_fleet_host(&net.path(), port, &public, &[&pkgs]))
        })
        .collect();
    for (_, _, c) in &hosts {
        provision(c, &v1);
    }
    let before: Vec<_> = hosts.iter().map(|(_, _, c)| fleet_state(c)).collect();
    for (version, generations) in &before {
        assert!(version.contains("0.2.0") && generations == &[0, 0], "{version} {generations:?}");
    }

    let inventory = scratch.path().join("inventory");
    let mut text = String::from("[cprd_hosts]\n");
    for (name, port, _) in &hosts {
        let deb = if name == "fleet2" { &broken } else { &v2 };
        text.push_str(&format!("{name} ansible_port={port} cprd_package={}\n", deb.display()));
    }
    text.push_str(&format!(
        "\n[cprd_hosts:vars]\nansible_host=127.0.0.1\nansible_user=root\nansible_ssh_private_key_file={}\n\
         ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'\n",
        key.display()
    ));
    std::fs::write(&inventory, text).expect("inventory");
    let reports = scratch.path().join("reports");
    std::fs::create_dir(&reports).expect("mkdir");
    let ansible = repo().join("ansible");
    let out = Command::new("ip")
        .args(["netns", "exec", &net.name, "ansible-playbook", "-i"])
        .arg(&inventory)
        .arg("rolling-upgrade.yml")
        .arg("-e")
        .arg(format!("cprd_report_dir={}", reports.display()))
        // Two hosts a batch: fleet1 and fleet2, then fleet3. A batch where every host failed
        // ends a play anyway; one where only some did ends it only by `max_fail_percentage: 0`.
        .args(["-e", "cprd_batch=2"])
        .current_dir(&ansible)
        .env("ANSIBLE_CONFIG", ansible.join("ansible.cfg"))
        .env("ANSIBLE_COLLECTIONS_PATH", ansible.join("collections"))
        .env("ANSIBLE_LOCAL_TEMP", scratch.path().join("ansible-tmp"))
        .env("ANSIBLE_SSH_CONTROL_PATH_DIR", scratch.path().join("cp"))
        .env("ANSIBLE_FORCE_COLOR", "0")
        .output()
        .expect("ansible-playbook");
    let log = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "the rollout went through a broken host:\n{log}");

    let report = |host: &str| -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(reports.join(format!("{host}.json"))).ok()?;
        Some(serde_json::from_str(&text).expect("report JSON"))
    };
    // fleet1: upgraded, both guests on a new VMM, with their downtime in the report.
    let (_, _, c1) = &hosts[0];
    let (version, generations) = fleet_state(c1);
    assert!(version.contains("0.2.1") && generations == [1, 1], "fleet1: {version} {generations:?}\n{log}");
    let r1 = report("fleet1").unwrap_or_else(|| panic!("no report of fleet1:\n{log}"));
    assert_eq!(r1["problems"], serde_json::json!([]), "{r1}");
    let rows = r1["vms"].as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{r1}");
    assert!(
        rows.iter()
            .all(|r| r["result"] == "upgraded" && r["to_generation"] == 1 && r["downtime_usec"].as_u64() > Some(0)),
        "{r1}"
    );
    c1.guests_continuous(&["a", "b"]);
    // fleet2: the package went in, cprd refused its cpr-vmm: every guest where it was, reported.
    let (_, _, c2) = &hosts[1];
    let (_, generations) = fleet_state(c2);
    assert_eq!(generations, [0, 0], "fleet2\n{log}");
    let r2 = report("fleet2").unwrap_or_else(|| panic!("no report of fleet2:\n{log}"));
    let problems = r2["problems"].as_array().map_or(0, Vec::len);
    assert_eq!(problems, 2, "{r2}");
    assert!(r2["vms"].as_array().is_some_and(|rows| rows.iter().all(|r| r["result"] == "not-upgraded")), "{r2}");
    assert!(log.contains("fleet2: a: still on generation 0"), "the failure names the host and VM:\n{log}");
    c2.guests_continuous(&["a", "b"]);
    // fleet3: never reached.
    let (_, _, c3) = &hosts[2];
    assert_eq!(fleet_state(c3), before[2], "fleet3 was touched\n{log}");
    assert!(report("fleet3").is_none(), "fleet3 has a report:\n{log}");
    assert_eq!(c3.exec(&["test", "-e", "/var/tmp/cprd-upgrade.deb"]).status.code(), Some(1), "fleet3 got the package");
    c3.guests_continuous(&["a", "b"]);
}
