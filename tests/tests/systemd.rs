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
