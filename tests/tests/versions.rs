//! Upgrades between real QEMU versions (issue 16), the way a distribution delivers them: in a
//! container running Debian 13's systemd 257 with cprd's .deb installed, trixie's QEMU 10.0 is
//! replaced by trixie-backports' QEMU 11.1 with `apt-get install`; the package's dpkg trigger
//! reloads cprd, which moves every QEMU guest to the new binary live, with a TCP connection to the
//! guest open over its tap, its disk and a console client. Then the downgrade. QEMU
//! runs with TCG here (`accel` is one word in the definition; on a host with hardware KVM the
//! same test runs with `kvm`). The rootfs is built once by `scripts/container-rootfs`
//! (`DIST=trixie`), with both QEMUs' packages in apt's cache, so the test needs no network.
#![allow(clippy::tests_outside_test_module)] // integration tests: every test is at the top level

use std::time::Duration;

use cpr_tests::container::{Container, built_package};
use cpr_tests::linux_guest::{Echo, NetNs, check_probe, initramfs, kernel, probe_lines, vm_definition};
use cpr_tests::wait_until;

/// Installed packages and their versions (`name=version` lines, sorted).
fn installed(c: &Container) -> Vec<String> {
    let mut v: Vec<String> = c
        .sh("dpkg-query -W -f='${db:Status-Abbrev} ${Package}=${Version}\\n'")
        .lines()
        .filter_map(|l| l.strip_prefix("ii ").map(|p| p.trim().to_string()))
        .collect();
    v.sort();
    v
}

/// Whether the VM's QEMU holds its disk image open.
fn holds_the_disk(c: &Container, st: &serde_json::Value) -> bool {
    let pid = st["main_pid"].as_u64().unwrap_or(0);
    c.sh(&format!("ls -l /proc/{pid}/fd/ 2>/dev/null || true")).contains("/var/lib/cprd/images/q.img")
}

/// The guest prints on (two more probe lines), and everything it printed is one boot without a
/// hole.
fn guest_continuous(c: &Container, vm: &str) -> u64 {
    let path = c.console(vm);
    let text = || std::fs::read_to_string(&path).unwrap_or_default();
    let seq = probe_lines(&text()).last().map_or(0, |l| l.seq);
    assert!(
        wait_until(Duration::from_secs(60), || probe_lines(&text()).last().is_some_and(|l| l.seq > seq + 2)),
        "{vm} stopped printing at {seq}"
    );
    check_probe(&probe_lines(&text())).unwrap_or_else(|e| panic!("{vm}: {e}"));
    probe_lines(&text()).last().map_or(0, |l| l.seq)
}

#[test]
fn a_distro_upgrade_moves_qemu_guests_from_10_0_to_11_1_live_and_back() {
    let deb = built_package(env!("CARGO_PKG_VERSION"));
    let (kernel, initrd) = (kernel(), initramfs());
    let pkgs = deb.parent().expect("dir").to_path_buf();
    // The guest's network card: a tap that cprd creates in a network namespace of the test's,
    // bound into the container (which gets a network of its own and CAP_NET_ADMIN with it).
    let ns = NetNs::create("versions");
    let ns_bind = format!("--bind-ro={}", ns.path().display());
    let c = Container::boot_trixie_for_packages(&[&pkgs, &kernel, &initrd], &["--private-network", &ns_bind]);
    c.sh(&format!("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {}", deb.display()));
    let qemu_version = || c.sh("dpkg-query -W -f='${Version}' qemu-system-x86");
    assert!(qemu_version().starts_with("1:10.0."), "{}", qemu_version());
    c.sh("mkdir -p /var/lib/cprd/images && truncate -s 8M /var/lib/cprd/images/q.img");
    c.define_vm(
        "q",
        &vm_definition(
            "128M",
            &format!(
                "[[disk]]\npath = \"/var/lib/cprd/images/q.img\"\n[[nic]]\ntap = \"cprv0\"\nnetns = {:?}\nmodel = \"e1000\"\n",
                ns.path().display().to_string()
            ),
        ),
    );
    c.sh("cprctl reload && cprctl start q");
    assert!(wait_until(Duration::from_secs(90), || probe_lines(
        &std::fs::read_to_string(c.console("q")).unwrap_or_default()
    )
    .len()
        > 3));
    guest_continuous(&c, "q");
    // A TCP connection to the guest's echo server, open across every step below.
    assert!(ns.ip(&["addr", "add", "10.0.2.1/24", "dev", "cprv0"]) && ns.ip(&["link", "set", "cprv0", "up"]));
    let text = || std::fs::read_to_string(c.console("q")).unwrap_or_default();
    assert!(wait_until(Duration::from_secs(30), || text().contains("ECHO listening")), "{}", text());
    let mut echo = Echo::connect(&ns);
    echo.check(0);
    let before = c.status("q");
    assert!(holds_the_disk(&c, &before), "QEMU 10.0 does not hold the disk image");
    let packages_10 = installed(&c);
    // A console client, started before the upgrade, reads on across it.
    let scratch = tempfile::tempdir().expect("tempdir");
    let followed = scratch.path().join("followed");
    let mut follower = std::process::Command::new("nsenter")
        .args(["-t", &c.leader.to_string(), "-a", "cprctl", "console", "q"])
        .stdout(std::fs::File::create(&followed).expect("followed"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("cprctl console");

    // The distribution's upgrade: QEMU 11.1 from trixie-backports.
    c.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -t trixie-backports qemu-system-x86");
    assert!(qemu_version().starts_with("1:11.1."), "{}", qemu_version());
    let after = c.status("q");
    assert_eq!(
        (after["generation"].as_u64(), after["state"].as_str()),
        (Some(1), Some("running")),
        "the trigger did not move the guest to QEMU 11.1: {after}\n{}",
        c.journal()
    );
    assert_ne!(after["main_pid"], before["main_pid"]);
    assert_eq!(after["machine_type"], before["machine_type"], "the machine type is pinned");
    let seq = guest_continuous(&c, "q");
    assert!(holds_the_disk(&c, &after), "QEMU 11.1 does not hold the disk image");
    let history: serde_json::Value = serde_json::from_str(&c.sh("cprctl --json history")).expect("history");
    let last = history.as_array().and_then(|h| h.last()).cloned().unwrap_or_default();
    assert!(last["ok"] == true && last["downtime_usec"].as_u64().is_some_and(|d| d > 0), "{history}");
    let (from, to) =
        (last["from_release"].as_str().unwrap_or_default(), last["to_release"].as_str().unwrap_or_default());
    assert!(from.starts_with("10.0.") && to.starts_with("11.1."), "{history}");
    assert!(after["vmm_release"].as_str().is_some_and(|r| r.starts_with("11.1.")), "{after}");
    let followed_to =
        || probe_lines(&std::fs::read_to_string(&followed).unwrap_or_default()).last().map_or(0, |l| l.seq);
    let read_on = wait_until(Duration::from_secs(30), || followed_to() >= seq);
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(read_on, "the console client stopped at {} (the guest is at {seq})", followed_to());
    echo.check(1);

    // What the pre-flight found QEMU 11.1 can do (tried, not read from its version), and the
    // fd-type cpr channel it chose for the jump. Then two upgrades on 11.1 itself: the same
    // channel again, and a path one when the VM's definition asks for it.
    let journal = c.journal();
    assert!(journal.contains("fd-type cpr channel yes, cpr-exec yes"), "{journal}");
    assert!(journal.contains("cpr-transfer of q (cpr channel: fd)"), "{journal}");
    c.sh("cprctl upgrade q");
    c.sh("sed -i '1i cpr_channel = \"path\"' /etc/cprd/vms/q.toml && cprctl reload && cprctl upgrade q");
    let journal = c.full_journal();
    assert_eq!(journal.matches("cpr-transfer of q (cpr channel: fd)").count(), 2, "{journal}");
    assert!(journal.contains("cpr-transfer of q (cpr channel: path)"), "{journal}");
    // A VM that asks for cpr-exec but whose QEMU was started with exec denied (its seccomp
    // filter: it started in cpr-transfer mode) is handed over by cpr-transfer, and says why.
    c.sh("sed -i '1i cpr_mode = \"cpr-exec\"' /etc/cprd/vms/q.toml && cprctl reload && cprctl upgrade q");
    assert!(
        c.journal().contains("cpr-exec of q is not possible (its QEMU was started with exec denied"),
        "{}",
        c.journal()
    );
    let after = c.status("q");
    assert_eq!((after["generation"].as_u64(), after["state"].as_str()), (Some(4), Some("running")), "{after}");
    assert_ne!(after["main_pid"], before["main_pid"]);
    guest_continuous(&c, "q");
    assert!(holds_the_disk(&c, &after), "QEMU 11.1 does not hold the disk image");
    echo.check(2);

    // cpr-exec: a VM started in that mode on QEMU 11.1 is handed to the new binary by its own
    // QEMU process, which execs it: same PID across two upgrades, the guest continuous.
    c.define_vm("e", &vm_definition("128M", "cpr_mode = \"cpr-exec\"\n"));
    c.sh("cprctl reload && cprctl start e");
    let e_text = || std::fs::read_to_string(c.console("e")).unwrap_or_default();
    assert!(wait_until(Duration::from_secs(90), || probe_lines(&e_text()).len() > 3), "{}", e_text());
    let e0 = c.status("e");
    // The memfds QEMU holds (guest RAM, the ROMs' and other implicit RAM blocks): (how many
    // descriptors, which objects by inode).
    let ram_fds = |st: &serde_json::Value| {
        let inodes = c.sh(&format!(
            "for f in /proc/{}/fd/*; do case $(readlink $f) in *memfd:*) stat -L -c %i $f;; esac; done",
            st["main_pid"]
        ));
        let all: Vec<&str> = inodes.split_whitespace().collect();
        let objects: std::collections::BTreeSet<String> = all.iter().map(ToString::to_string).collect();
        (all.len(), objects)
    };
    let ram_before = ram_fds(&e0);
    c.sh("cprctl upgrade e && cprctl upgrade e");
    let e2 = c.status("e");
    assert_eq!(
        (e2["generation"].as_u64(), e2["state"].as_str(), &e2["main_pid"]),
        (Some(2), Some("running"), &e0["main_pid"]),
        "cpr-exec keeps the PID: {e0} -> {e2}\n{}",
        c.journal()
    );
    let kept = format!("cpr-exec of e: pid {} kept", e0["main_pid"]);
    assert_eq!(c.full_journal().matches(&kept).count(), 2, "{}", c.journal());
    guest_continuous(&c, "e");
    // The same RAM objects: nothing was copied. QEMU 11.1.3's file-backed guest RAM leaves one
    // more descriptor of it open at each exec (it opens `mem-path` again and keeps the one it
    // preserved for the exec): bounded here so that a change shows (docs/compatibility.md).
    let ram_after = ram_fds(&e2);
    assert_eq!(ram_after.1, ram_before.1, "the same memfds before and after two execs");
    assert!(ram_after.0 <= ram_before.0 + 2, "at most one more descriptor per exec: {ram_before:?} -> {ram_after:?}");
    c.sh("cprctl stop e");

    // The downgrade: every package the upgrade changed, back to its trixie version. QEMU 10.0
    // cannot read QEMU 11.1's CPR state (it exits with `vmstate_load_state error -2`), which
    // cprd's pre-flight finds out with a trial handoff of an empty VM: the upgrade the trigger
    // asks for is refused before the guest is touched, and the guest runs on under 11.1.
    let packages_11 = installed(&c);
    let back: Vec<&str> = packages_10.iter().filter(|p| !packages_11.contains(p)).map(String::as_str).collect();
    assert!(back.iter().any(|p| p.starts_with("qemu-system-x86=1:10.0.")), "{back:?}");
    c.sh(&format!(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends --allow-downgrades {}",
        back.join(" ")
    ));
    assert!(qemu_version().starts_with("1:10.0."), "{}", qemu_version());
    let down = c.status("q");
    assert_eq!(
        (&down["generation"], &down["main_pid"], down["state"].as_str()),
        (&after["generation"], &after["main_pid"], Some("running")),
        "{down}\n{}",
        c.journal()
    );
    let history: serde_json::Value = serde_json::from_str(&c.sh("cprctl --json history")).expect("history");
    let last = history.as_array().and_then(|h| h.last()).cloned().unwrap_or_default();
    let error = last["error"].as_str().unwrap_or_default();
    assert!(
        last["ok"] == false
            && error.contains("org.cprd1.Error.Incompatible")
            && error.contains("trial handoff")
            && error.contains("vmstate_load_state"),
        "{history}"
    );
    assert!(c.journal().contains("fd-type cpr channel no, cpr-exec no"), "QEMU 10.0 was probed: {}", c.journal());
    guest_continuous(&c, "q");
    echo.check(3);
    eprintln!("{}", c.sh("cprctl history"));
}
