//! cprd under real systemd (PID 1 in a systemd-nspawn container, systemd 254), with real
//! cpr-vmm guests on the host's `/dev/kvm` bound into the container.
#![allow(clippy::tests_outside_test_module)] // integration tests: every test is at the top level

use cpr_tests::container::Container;
use cpr_tests::require_kvm;

#[test]
fn first_cprctl_call_starts_cprd_through_dbus_activation() {
    require_kvm();
    let c = Container::boot(&[("vm1", "memory = \"64M\"\n")]);
    assert_eq!(c.exec(&["systemctl", "is-active", "cprd"]).stdout, b"inactive\n");
    let out = c.exec(&["cprctl", "--json", "list"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"vm1\""));
    assert_eq!(c.sh("systemctl is-active cprd").trim(), "active");
    let out = c.exec(&["cprctl", "start", "vm1"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.sh("journalctl -u cprd --no-pager | tail -20")
    );
}

fn list(c: &Container) -> serde_json::Value {
    let out = c.exec(&["cprctl", "--json", "list"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn heartbeats_ok(c: &Container, vm: &str) {
    let path = format!("/run/cprd/vms/{vm}.console");
    let read = || cpr_testguest::Heartbeat::all_in(&c.sh(&format!("cat {path}")));
    let seq = read().last().map_or(0, |h| h.seq);
    assert!(
        cpr_tests::wait_until(std::time::Duration::from_secs(20), || read().last().map_or(0, |h| h.seq) > seq + 1),
        "{vm}: no new heartbeats"
    );
    cpr_tests::check_heartbeats(&read()).unwrap_or_else(|e| panic!("{vm}: {e}"));
}

#[test]
fn restarts_kills_and_stop_start_of_cprd_leave_every_guest_running() {
    require_kvm();
    let vms = [("a", "memory = \"64M\"\n"), ("b", "memory = \"64M\"\n"), ("c", "memory = \"64M\"\nvcpus = 2\n")];
    let c = Container::boot(&vms);
    c.sh("systemctl enable cprd 2>/dev/null; systemctl start cprd");
    for (vm, _) in vms {
        c.sh(&format!("cprctl start {vm}"));
    }
    let before = list(&c);
    let pids: Vec<u64> = before.as_array().expect("array").iter().filter_map(|v| v["main_pid"].as_u64()).collect();
    assert_eq!(pids.len(), 3);
    // Every VMM sits in its own scope in cprd.slice, not in cprd.service's cgroup.
    for pid in &pids {
        let cg = c.sh(&format!("cat /proc/{pid}/cgroup"));
        assert!(cg.contains("cprd.slice/cprd-vm-"), "VMM {pid} is in {cg}");
        assert!(!cg.contains("cprd.service"), "VMM {pid} is in {cg}");
    }
    assert!(c.sh("systemctl list-units --no-legend 'cprd-vm-*.scope'").lines().count() >= 3);
    for action in
        ["systemctl restart cprd", "systemctl kill -s KILL cprd; sleep 1", "systemctl stop cprd; systemctl start cprd"]
    {
        c.sh(action);
        let ok = cpr_tests::wait_until(std::time::Duration::from_secs(20), || {
            c.exec(&["cprctl", "--json", "list"]).status.success()
        });
        assert!(ok, "cprd did not come back after `{action}`: {}", c.sh("journalctl -u cprd --no-pager | tail -20"));
        assert_eq!(list(&c), before, "after `{action}`: same VMs, PIDs, generations and states");
        for (vm, _) in vms {
            heartbeats_ok(&c, vm);
        }
    }
    // And an upgrade still works, with the new VMM in a scope of its own.
    c.sh("cprctl upgrade b");
    let b = list(&c).as_array().and_then(|l| l.iter().find(|v| v["name"] == "b").cloned()).expect("b");
    assert_eq!(b["generation"], 1);
    let cg = c.sh(&format!("cat /proc/{}/cgroup", b["main_pid"]));
    assert!(cg.contains("cprd-vm-b-g1.scope"), "{cg}");
    // The upgrade record is in the journal with its fields.
    let j = c.sh("journalctl CPRD_VM=b -o json --no-pager");
    assert!(
        j.contains("\"CPRD_UPGRADE_ID\"")
            && j.contains("\"CPRD_DOWNTIME_USEC\"")
            && j.contains("\"CPRD_RESULT\":\"ok\""),
        "{j}"
    );
}
