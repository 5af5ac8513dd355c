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
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.sh("systemctl status cprd --no-pager; journalctl -b --no-pager | tail -40")
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"vm1\""));
    assert!(becomes_active(&c), "{}", c.sh("systemctl status cprd --no-pager; true"));
    let out = c.exec(&["cprctl", "start", "vm1"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.sh("journalctl -u cprd --no-pager | tail -20")
    );
}

/// Whether cprd.service reaches `active` within 10 s. A call that starts cprd (through its
/// socket or its bus name) can be answered a moment before cprd sends `READY=1`, while the unit
/// still says `activating`.
fn becomes_active(c: &Container) -> bool {
    cpr_tests::wait_until(std::time::Duration::from_secs(10), || {
        c.exec(&["systemctl", "is-active", "cprd"]).stdout == b"active\n"
    })
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
    // `a-b` and `a_b`: distinct VMs whose scopes once had the same name (the second VMM then
    // stayed in cprd.service's cgroup and died with cprd).
    let vms = [("a-b", "memory = \"64M\"\n"), ("a_b", "memory = \"64M\"\n"), ("c", "memory = \"64M\"\nvcpus = 2\n")];
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
        assert!(cg.contains("cprd.slice/cprd-vm-"), "VMM {pid} is in {cg}\ncprd's journal:\n{}", c.journal());
        assert!(!cg.contains("cprd.service"), "VMM {pid} is in {cg}\ncprd's journal:\n{}", c.journal());
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
    c.sh("cprctl upgrade a-b");
    let b = list(&c).as_array().and_then(|l| l.iter().find(|v| v["name"] == "a-b").cloned()).expect("a-b");
    assert_eq!(b["generation"], 1);
    let cg = c.sh(&format!("cat /proc/{}/cgroup", b["main_pid"]));
    assert!(cg.contains("cprd-vm-a\\x2db-g1.scope"), "{cg}");
    // The upgrade record is in the journal with its fields.
    let j = c.sh("journalctl CPRD_VM=a-b -o json --no-pager");
    assert!(
        j.contains("\"CPRD_UPGRADE_ID\"")
            && j.contains("\"CPRD_DOWNTIME_USEC\"")
            && j.contains("\"CPRD_RESULT\":\"ok\""),
        "{j}"
    );
}

#[test]
fn systemctl_reload_moves_every_vm_to_a_replaced_vmm_binary_before_it_returns() {
    require_kvm();
    let vms = [("a", "memory = \"64M\"\n"), ("b", "memory = \"64M\"\n")];
    let c = Container::boot(&vms);
    c.sh("systemctl start cprd");
    for (vm, _) in vms {
        c.sh(&format!("cprctl start {vm}"));
    }
    let before = c.sh("cprctl --json status a");
    // A rebuilt cpr-vmm lands on disk (new inode, new content), as a package upgrade does.
    c.sh("cp /usr/libexec/cprd/cpr-vmm /tmp/new && printf rebuilt >> /tmp/new && chmod 755 /tmp/new && mv /tmp/new /usr/libexec/cprd/cpr-vmm");
    c.sh("systemctl reload cprd");
    // No waiting: reload returned only once the work was done.
    for (vm, _) in vms {
        let st: serde_json::Value = serde_json::from_str(&c.sh(&format!("cprctl --json status {vm}"))).expect("JSON");
        assert_eq!(st["generation"], 1, "{vm} is on the new binary when reload returns");
        assert_eq!(st["state"], "running");
        heartbeats_ok(&c, vm);
    }
    let before: serde_json::Value = serde_json::from_str(&before).expect("JSON");
    let after: serde_json::Value = serde_json::from_str(&c.sh("cprctl --json status a")).expect("JSON");
    assert_ne!(before["vmm_version"], after["vmm_version"], "VMMVersion (build id) changed");
    assert_ne!(before["main_pid"], after["main_pid"]);
    let status = c.sh("systemctl show -p StatusText --value cprd");
    assert!(status.contains("upgraded 2 VMs"), "{status}");
}

#[test]
fn list_calls_every_10ms_see_no_failure_across_5_restarts() {
    require_kvm();
    let c = Container::boot(&[("a", "memory = \"64M\"\n")]);
    c.sh("systemctl start cprd && cprctl start a");
    let client = "i=0; fails=0; while [ ! -e /tmp/stop ]; do \
        busctl call org.cprd1 /org/cprd1 org.cprd1.Manager ListVMs >/dev/null 2>&1 || fails=$((fails+1)); \
        i=$((i+1)); sleep 0.01; done; echo $i $fails > /tmp/result";
    c.sh(&format!("systemd-run --unit=lister sh -c '{client}'"));
    for _ in 0..5 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        c.sh("systemctl restart cprd");
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    c.sh("touch /tmp/stop");
    assert!(cpr_tests::wait_until(std::time::Duration::from_secs(20), || c
        .exec(&["test", "-e", "/tmp/result"])
        .status
        .success()));
    let result = c.sh("cat /tmp/result");
    let mut it = result.split_whitespace().filter_map(|n| n.parse::<u64>().ok());
    let (calls, fails) = (it.next().unwrap_or(0), it.next().unwrap_or(u64::MAX));
    assert!(calls > 50, "only {calls} calls made");
    assert_eq!(fails, 0, "{fails} of {calls} ListVMs calls failed across 5 restarts");
}

/// The harness's own isolation, which every container test relies on: two containers booted at
/// once by one test process must not share a cgroup tree. They did: `--keep-unit` takes the
/// cgroup nspawn runs in, so every container's tree was the host's `/payload`, and one
/// container's systemd removed the `cprd.service` cgroup another had just created for a restart
/// (`Failed to attach to cgroup`, status 219, in CI).
#[test]
fn containers_booted_at_once_each_have_a_cgroup_tree_of_their_own() {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Container::boot(&[]));
        let b = s.spawn(|| Container::boot(&[]));
        (a.join().expect("boot a"), b.join().expect("boot b"))
    });
    // The hierarchy systemd tracks units in: the named v1 one on a hybrid host, else the unified one.
    let tree = |c: &Container| {
        let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", c.leader)).expect("the leader's cgroups");
        let line = |pick: &dyn Fn(&str) -> bool| cgroups.lines().find(|l| pick(l)).map(str::to_owned);
        line(&|l| l.contains(":name=systemd:")).or_else(|| line(&|l| l.starts_with("0::"))).expect("a cgroup line")
    };
    assert_ne!(tree(&a), tree(&b), "the two containers' systemd run in one host cgroup");
    let probe = "d=/sys/fs/cgroup/systemd; [ -d $d ] || d=/sys/fs/cgroup; echo $d/system.slice/probe-of-a.service";
    let probe = a.sh(probe).trim().to_string();
    a.sh(&format!("mkdir {probe}"));
    let seen = b.exec(&["test", "-e", &probe]);
    assert!(!seen.status.success(), "a cgroup made in one container appears in the other");
    a.sh(&format!("rmdir {probe}"));
}

#[test]
fn the_fd_store_alone_brings_every_vm_back() {
    require_kvm();
    let vms = [("a", "memory = \"64M\"\n"), ("b", "memory = \"64M\"\n"), ("c", "memory = \"64M\"\n")];
    let c = Container::boot(&vms);
    // Enabled, so that the stopped unit stays referenced and its fd store is preserved.
    c.sh("systemctl enable --now cprd 2>/dev/null");
    for (vm, _) in vms {
        c.sh(&format!("cprctl start {vm}"));
    }
    let before = list(&c);
    let stored: u32 = c.sh("systemctl show -p NFileDescriptorStore --value cprd").trim().parse().unwrap_or(0);
    assert_eq!(
        stored, 10,
        "three guest memfds, three VMM pidfds, cprd's ends of three console pipes and the state record in the fd store"
    );
    // Stop cprd and take its runtime records away: only the fd store is left to say what runs.
    c.sh("systemctl stop cprd && rm -f /run/cprd/vms/*.json");
    c.sh("systemctl start cprd");
    assert_eq!(list(&c), before, "same VMs, PIDs and generations, from the fd store");
    let j = c.sh("journalctl -u cprd --no-pager -o cat");
    assert!(j.contains("took 3 VM records and 9 fds back from the fd store"), "{j}");
    for (vm, _) in vms {
        heartbeats_ok(&c, vm);
    }
    c.sh("cprctl upgrade a && cprctl stop c");
    let stored: u32 = c.sh("systemctl show -p NFileDescriptorStore --value cprd").trim().parse().unwrap_or(0);
    assert_eq!(
        stored, 7,
        "a stopped VM's fds leave the store (its console's too); an upgraded one's stay (pidfd replaced)"
    );
}

#[test]
fn reload_re_executes_a_replaced_cprd_binary_in_place() {
    require_kvm();
    let vms = [("a", "memory = \"64M\"\n")];
    let c = Container::boot(&vms);
    c.sh("systemctl start cprd && cprctl start a");
    let before = list(&c);
    let main_pid = c.sh("systemctl show -p MainPID --value cprd");
    let exe = || c.sh(&format!("readlink /proc/{}/exe", main_pid.trim()));
    // A rebuilt cprd lands on disk (new inode, new content): the running image is now "deleted".
    c.sh("cp /usr/libexec/cprd/cprd /tmp/cprd.new && printf rebuilt >> /tmp/cprd.new && chmod 755 /tmp/cprd.new && mv /tmp/cprd.new /usr/libexec/cprd/cprd");
    assert!(exe().contains("(deleted)"), "{}", exe());
    c.sh("systemctl reload cprd");
    assert_eq!(c.sh("systemctl show -p MainPID --value cprd"), main_pid, "same PID after the re-exec");
    assert!(!exe().contains("(deleted)"), "runs the new binary: {}", exe());
    assert_eq!(c.sh("systemctl is-active cprd").trim(), "active");
    assert_eq!(list(&c), before, "the VM was untouched");
    let j = c.sh("journalctl -u cprd --no-pager -o cat");
    assert!(j.contains("re-executing") && j.contains("re-executed; finishing the reload"), "{j}");
    heartbeats_ok(&c, "a");
    // The VMM the old image started is still cprd's child: when it exits, the new image reaps it.
    let vmm = c.sh("cprctl --json status a");
    let vmm: serde_json::Value = serde_json::from_str(&vmm).expect("status JSON");
    let vmm_pid = vmm["main_pid"].as_u64().expect("main_pid");
    c.sh(&format!("kill -9 {vmm_pid}"));
    let reaped = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        c.sh(&format!("test -e /proc/{vmm_pid} && echo present || echo gone")).trim() == "gone"
    });
    assert!(reaped, "the VMM (pid {vmm_pid}) that exited after the re-exec was never reaped (a zombie of cprd)");
}

#[test]
fn socket_activation_starts_cprd_and_holds_calls_across_restarts() {
    require_kvm();
    let c = Container::boot(&[("a", "memory = \"64M\"\n")]);
    c.sh("systemctl enable --now cprd.socket 2>/dev/null");
    assert_eq!(c.exec(&["systemctl", "is-active", "cprd"]).stdout, b"inactive\n");
    let pong = c.sh("cprctl ping");
    assert!(pong.contains("\"pong\""), "{pong}");
    assert!(becomes_active(&c), "started by its socket: {}", c.sh("systemctl status cprd --no-pager; true"));
    let j = c.sh("journalctl -u cprd --no-pager -o cat");
    assert!(j.contains("control socket from systemd (socket activation)"), "{j}");
    c.sh("cprctl start a");
    let client = "n=0; f=0; while [ ! -e /tmp/stop ]; do cprctl ping >/dev/null 2>&1 || f=$((f+1)); n=$((n+1)); sleep 0.01; done; echo $n $f > /tmp/result";
    c.sh(&format!("systemd-run --unit=pinger sh -c '{client}'"));
    for _ in 0..3 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        c.sh("systemctl restart cprd");
    }
    c.sh("touch /tmp/stop");
    assert!(cpr_tests::wait_until(std::time::Duration::from_secs(20), || c
        .exec(&["test", "-e", "/tmp/result"])
        .status
        .success()));
    let r = c.sh("cat /tmp/result");
    let mut it = r.split_whitespace().filter_map(|n| n.parse::<u64>().ok());
    let (n, f) = (it.next().unwrap_or(0), it.next().unwrap_or(u64::MAX));
    assert!(n > 20, "only {n} pings");
    assert_eq!(f, 0, "{f} of {n} pings failed across 3 restarts");
    assert_eq!(list(&c)[0]["state"], "running");
}

#[test]
fn on_systemd_252_reload_blocks_until_every_vm_is_on_the_new_binary() {
    require_kvm();
    let vms = [("a", "memory = \"64M\"\n"), ("b", "memory = \"64M\"\n")];
    let c = Container::boot_with(
        "252",
        &vms,
        &[("units/systemd-252/10-notify.conf", "/etc/systemd/system/cprd.service.d/10-notify.conf")],
    );
    assert!(c.sh("systemctl --version").starts_with("systemd 252"), "{}", c.sh("systemctl --version"));
    c.sh("systemctl start cprd");
    assert_eq!(c.sh("systemctl show -p Type --value cprd").trim(), "notify");
    for (vm, _) in vms {
        c.sh(&format!("cprctl start {vm}"));
    }
    c.sh("cp /usr/libexec/cprd/cpr-vmm /tmp/new && printf rebuilt >> /tmp/new && chmod 755 /tmp/new && mv /tmp/new /usr/libexec/cprd/cpr-vmm");
    c.sh("systemctl reload cprd");
    for (vm, _) in vms {
        let st: serde_json::Value = serde_json::from_str(&c.sh(&format!("cprctl --json status {vm}"))).expect("JSON");
        assert_eq!(st["generation"], 1, "{vm} is on the new binary when reload returns");
        heartbeats_ok(&c, vm);
    }
}

#[test]
fn a_handoff_in_flight_runs_in_a_weighted_scope_and_the_guest_goes_back_to_the_default() {
    require_kvm();
    let c = Container::boot(&[("a", "memory = \"64M\"\n")]);
    c.sh("systemctl start cprd && cprctl start a");
    let weight = |unit: &str| c.sh(&format!("systemctl show -P CPUWeight {unit}")).trim().to_string();
    let unset = weight("cprd-vm-a-g0.scope");
    assert_ne!(unset, "1000", "a running guest's scope has the default weight");
    // A new VMM that stops itself once it holds the state (allow-listed: /usr/libexec/cprd/*).
    c.sh("printf '#!/bin/sh\\nif [ \"$1\" = --state-formats ]; then exec /usr/libexec/cprd/cpr-vmm \"$@\"; fi\\n\
         CPR_VMM_FAULT=stall:after-state exec /usr/libexec/cprd/cpr-vmm \"$@\"\\n' >/usr/libexec/cprd/stalls.sh \
         && chmod 755 /usr/libexec/cprd/stalls.sh");
    c.sh("setsid cprctl upgrade a --binary /usr/libexec/cprd/stalls.sh </dev/null >/dev/null 2>&1 &");
    let in_flight = cpr_tests::wait_until(std::time::Duration::from_secs(20), || {
        c.exec(&["systemctl", "show", "-P", "CPUWeight", "cprd-vm-a-g1.scope"]).stdout == b"1000\n"
    });
    assert!(
        in_flight,
        "the new VMM's scope never had CPUWeight=1000: {}",
        c.sh("journalctl -u cprd --no-pager | tail")
    );
    assert_eq!(weight("cprd-vm-a-g0.scope"), unset, "the old VMM's scope is not raised");
    // The new VMM dies: rolled back to generation 0, whose scope never changed.
    c.sh("systemctl kill -s KILL cprd-vm-a-g1.scope");
    let rolled_back = cpr_tests::wait_until(std::time::Duration::from_secs(20), || {
        let a = list(&c).as_array().and_then(|l| l.first().cloned()).unwrap_or_default();
        a["state"] == "running"
            && a["generation"] == 0
            && c.exec(&["systemctl", "is-active", "cprd-vm-a-g1.scope"]).stdout != b"active\n"
    });
    assert!(rolled_back, "{}", c.sh("cprctl --json list; journalctl -u cprd --no-pager | tail"));
    // A good upgrade: the new scope is weighted while the handoff runs, then back to the default.
    c.sh("cprctl upgrade a");
    assert_eq!(weight("cprd-vm-a-g1.scope"), unset, "the guest runs in a scope of the default weight");
    heartbeats_ok(&c, "a");
}

/// Machine `vm` as `machinectl show` has it (Leader, Class, Service, Unit), or `None` when
/// machined has no such machine.
fn machine(c: &Container, vm: &str) -> Option<[String; 4]> {
    let o = c.exec(&["machinectl", "show", vm, "-p", "Leader", "-p", "Class", "-p", "Service", "-p", "Unit"]);
    if !o.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let get = |key: &str| text.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).unwrap_or_default().to_string();
    Some([get("Leader"), get("Class"), get("Service"), get("Unit")])
}

/// What `machine` says of a cprd VM led by `pid` in the scope of `generation`.
fn cprd_machine(vm_escaped: &str, pid: u64, generation: u64) -> Option<[String; 4]> {
    Some([pid.to_string(), "vm".into(), "cprd".into(), format!("cprd-vm-{vm_escaped}-g{generation}.scope")])
}

/// `cprctl --json status VM`'s (main_pid, generation).
fn pid_and_generation(c: &Container, vm: &str) -> (u64, u64) {
    let st = c.status(vm);
    (st["main_pid"].as_u64().unwrap_or(0), st["generation"].as_u64().unwrap_or(u64::MAX))
}

/// systemd-machined (systemd 254, in the container) lists cprd's VMs as machines of class `vm`
/// led by the VMM that runs each guest: after start, after every one of 5 upgrades (each gives
/// the guest a new VMM in a new scope, and the old scope's end would drop the machine), across
/// a restart of cprd, and not after stop.
#[test]
fn machinectl_lists_cprd_vms_across_upgrades_and_restarts_and_not_after_stop() {
    require_kvm();
    let vms = [("m-1", "memory = \"64M\"\n"), ("m2", "memory = \"64M\"\n")];
    let c = Container::boot(&vms);
    c.sh("systemctl start cprd && cprctl start m-1 && cprctl start m2");
    let listed = |vm: &str, escaped: &str| {
        let mut seen = None;
        let ok = cpr_tests::wait_until(std::time::Duration::from_secs(10), || {
            let (pid, generation) = pid_and_generation(&c, vm);
            seen = machine(&c, vm);
            seen == cprd_machine(escaped, pid, generation)
        });
        assert!(ok, "{vm}: machinectl shows {seen:?}, cprd says {:?}\n{}", pid_and_generation(&c, vm), c.journal());
    };
    listed("m-1", "m\\x2d1");
    listed("m2", "m2");
    let table = c.sh("machinectl list --no-legend");
    for vm in ["m-1", "m2"] {
        assert!(table.lines().any(|l| l.split_whitespace().take(3).eq([vm, "vm", "cprd"])), "{vm} not in:\n{table}");
    }
    let m2 = machine(&c, "m2");
    for round in 1..=5 {
        c.sh("cprctl upgrade m-1");
        assert_eq!(pid_and_generation(&c, "m-1").1, round);
        listed("m-1", "m\\x2d1");
        assert_eq!(machine(&c, "m2"), m2, "m2 is untouched");
    }
    c.sh("systemctl restart cprd");
    assert!(cpr_tests::wait_until(std::time::Duration::from_secs(20), || {
        c.exec(&["cprctl", "--json", "list"]).status.success()
    }));
    listed("m-1", "m\\x2d1");
    assert_eq!(machine(&c, "m2"), m2, "a restart of cprd leaves the machines as they were");
    c.sh("cprctl stop m-1");
    let gone = cpr_tests::wait_until(std::time::Duration::from_secs(10), || machine(&c, "m-1").is_none());
    assert!(gone, "m-1 is still a machine after stop: {:?}\n{}", machine(&c, "m-1"), c.journal());
    let table = c.sh("machinectl list --no-legend");
    assert!(!table.contains("m-1") && table.contains("m2"), "{table}");
    let journal = c.full_journal();
    assert!(
        !journal.contains("systemd-machined is not reachable") && !journal.contains("systemd-machined:"),
        "no warning, no absence: {}",
        journal.lines().filter(|l| l.contains("machine")).collect::<Vec<_>>().join("\n")
    );
}

/// cprd's state of `vm` (`cprctl --json status`).
fn state(c: &Container, vm: &str) -> String {
    c.status(vm)["state"].as_str().unwrap_or_default().to_string()
}

/// Under systemd 262 (Debian sid) machined has the VMs' control sockets (`controlAddress`), so
/// `machinectl pause|resume|poweroff|terminate NAME` act on cprd's VMs through cprd, also after
/// an upgrade gave the guest a new VMM, and only for callers cprd authorizes; `Describe` says
/// what `GetVM`'s state says.
#[test]
fn machinectl_verbs_reach_cprd_through_machined_under_systemd_262() {
    require_kvm();
    let vms = [("v1", "memory = \"64M\"\n"), ("v2", "memory = \"64M\"\n")];
    let c = Container::boot_with("262", &vms, &[]);
    assert!(c.sh("systemctl --version").starts_with("systemd 262"), "{}", c.sh("systemctl --version"));
    let started = c.exec(&["sh", "-c", "systemctl start cprd && cprctl start v1 && cprctl start v2"]);
    assert!(
        started.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&started.stderr),
        c.sh("journalctl -b --no-pager | tail -40")
    );
    let registered = |vm: &str| {
        let mut seen = None;
        let ok = cpr_tests::wait_until(std::time::Duration::from_secs(10), || {
            let (pid, generation) = pid_and_generation(&c, vm);
            seen = machine(&c, vm);
            seen == cprd_machine(vm, pid, generation)
        });
        assert!(ok, "{vm}: machinectl shows {seen:?}\n{}", c.journal());
    };
    registered("v1");
    registered("v2");
    // machined has the control socket cprd serves for the VM.
    let listed =
        c.sh("varlinkctl call /run/systemd/machine/io.systemd.Machine io.systemd.Machine.List '{\"name\":\"v1\"}'");
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("List's JSON");
    assert_eq!(listed["controlAddress"], "/run/cprd/machine/v1.varlink", "{listed}");
    let describe = || -> serde_json::Value {
        let out = c.sh("varlinkctl call /run/cprd/machine/v1.varlink io.systemd.MachineInstance.Describe '{}'");
        serde_json::from_str(&out).expect("Describe's JSON")
    };
    assert_eq!(describe(), serde_json::json!({"running": true, "status": "running"}));
    // An upgrade gives the guest a new VMM: the machine follows it and the verbs still reach it.
    c.sh("cprctl upgrade v1");
    registered("v1");
    c.sh("machinectl pause v1");
    assert_eq!(state(&c, "v1"), "paused");
    assert_eq!(describe(), serde_json::json!({"running": false, "status": "paused"}));
    let console = || cpr_testguest::Heartbeat::all_in(&c.sh("cat /run/cprd/vms/v1.console")).len();
    let beats = console();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(console(), beats, "a paused guest sends no heartbeats");
    // Not anyone's to change: a user outside group cprd is refused by cprd, and nothing changes.
    let refused = c.exec(&["runuser", "-u", "nobody", "--", "machinectl", "resume", "v1"]);
    assert!(!refused.status.success(), "nobody resumed v1: {}", String::from_utf8_lossy(&refused.stdout));
    assert_eq!(state(&c, "v1"), "paused", "{}", String::from_utf8_lossy(&refused.stderr));
    // The socket is in /run/cprd (root and group cprd, as the bus policy allows changes), and
    // cprd checks the caller itself too: a process of uid nobody that reaches it through gid
    // cprd alone is refused by cprd, and may still read.
    let socket = "/run/cprd/machine/v1.varlink";
    let as_nobody_in_cprd = |method: &str| {
        let call = format!(
            "setpriv --reuid=nobody --regid=cprd --clear-groups varlinkctl call {socket} io.systemd.MachineInstance.{method} '{{}}'"
        );
        c.exec(&["sh", "-c", &call])
    };
    let direct = as_nobody_in_cprd("Resume");
    let said = String::from_utf8_lossy(&direct.stderr).into_owned() + &String::from_utf8_lossy(&direct.stdout);
    assert!(!direct.status.success() && said.contains("may not change VMs"), "{said}");
    assert_eq!(state(&c, "v1"), "paused");
    let read = as_nobody_in_cprd("Describe");
    assert!(read.status.success(), "{}", String::from_utf8_lossy(&read.stderr));
    c.sh("machinectl resume v1");
    assert_eq!(state(&c, "v1"), "running");
    heartbeats_ok(&c, "v1");
    // poweroff asks the VMM to stop; terminate kills it. Both leave the VMs stopped, unlisted.
    c.sh("machinectl poweroff v1");
    c.sh("machinectl terminate v2");
    for vm in ["v1", "v2"] {
        let stopped = cpr_tests::wait_until(std::time::Duration::from_secs(10), || {
            state(&c, vm) == "stopped" && machine(&c, vm).is_none()
        });
        assert!(stopped, "{vm} is {} as machine {:?}\n{}", state(&c, vm), machine(&c, vm), c.journal());
    }
    let journal = c.full_journal();
    assert!(journal.contains("asks VM v1 to Stop { force: false }"), "{journal}");
    assert!(journal.contains("asks VM v2 to Stop { force: true }"), "{journal}");
    assert!(!journal.contains("systemd-machined:"), "no warning: {journal}");
}

/// The unit's exposure as `systemd-analyze security` rates it (offline, this host's systemd):
/// at most 5.0 ("OK"). Every systemd test above runs cprd under this very unit.
#[test]
fn the_unit_is_rated_at_most_5_by_systemd_analyze_security() {
    let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../units/cprd.service");
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_default();
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score in:\n{text}{}", String::from_utf8_lossy(&out.stderr)));
    println!("{}", line.trim());
    assert!(score <= 5.0, "cprd.service is rated {score}:\n{text}");
}
