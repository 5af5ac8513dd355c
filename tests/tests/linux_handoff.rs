//! Handing running Linux guests from one cpr-vmm process to another, on hardware-style KVM: in the
//! L1 test machine (Debian's `kvm_amd` on TCG-emulated AMD SVM, `cpr_tests::l1`), since this
//! machine's own `/dev/kvm` (`kvm_pvm`) cannot boot Linux. The guest's probe tells whether it
//! noticed: same boot, no hole in its sequence, its clock without a jump beyond the pause, its
//! local timer ticking on, and no lockup, stall or clocksource complaint in its kernel log.
#![allow(clippy::tests_outside_test_module)] // integration tests: every test is at the top level

use std::time::Duration;

use cpr_tests::l1;
use cpr_tests::linux_guest::{ProbeLine, check_probe, check_timer_ticks, probe_lines};

/// The L2 command line (see linux_boot.rs): fast boot under nested SVM, kernel warnings on the
/// console (a clocksource-watchdog complaint is a warning), the probe every 100 ms.
const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 loglevel=5 initcall_blacklist=cmos_init,i8042_init pci=off \
                       irqaffinity=0 probe_ms=100";

/// Kernel log lines that say a guest suffered from a handoff.
const TROUBLE: [&str; 8] = [
    "soft lockup",
    "rcu_sched self-detected stall",
    "rcu: INFO",
    "timekeeping watchdog",
    "Marking clocksource",
    "blocked for more than",
    "hard LOCKUP",
    "Call Trace",
];

/// Shell functions for the L1 scripts: `lines` (probe lines on the guest's console so far),
/// `alive` (a cpr-vmm runs), `now` (L1's uptime, s), `wait_lines N` (until the console has N
/// probe lines, no VMM is left, or 120 s have passed).
const SCRIPT_HELPERS: &str = r#"lines() { n=$(grep -c '^PROBE boot' /tmp/l2.console 2>/dev/null); echo "${n:-0}"; }
alive() { [ -n "$(pidof cpr-vmm)" ]; }
now() { cut -d. -f1 /proc/uptime; }
wait_lines() { end=$(($(now) + 120)); while [ "$(now)" -lt $end ] && alive && [ "$(lines)" -lt "$1" ]; do sleep 0.2; done; }"#;

/// What every Linux handoff test requires of the guest's console: one boot, the probe's sequence
/// without a hole and its RAM unchanged, and no [`TROUBLE`] in the kernel log.
fn check_guest(run: &l1::L1Run, lines: &[ProbeLine]) {
    check_probe(lines).unwrap_or_else(|e| panic!("{e}\n{}", run.dump()));
    for trouble in TROUBLE {
        assert!(!run.second_console.contains(trouble), "the guest's kernel says {trouble:?}\n{}", run.dump());
    }
}

/// The L1 script: boots a guest of `vcpus` vCPUs, waits for its probe, hands it over `hops`
/// times (`cpr-vmm handoff`, the bare arbiter), lets it run on, and puts its console on the
/// second serial port.
fn chain_script(vcpus: u8, hops: u32) -> String {
    format!(
        r#"{SCRIPT_HELPERS}
cpr-vmm --control /run/vm.0.sock --memory 256M --vcpus {vcpus} --kernel /l2/vmlinux --initrd /l2/guest.cpio.gz \
    --cmdline '{CMDLINE}' --serial-out /tmp/l2.console 2>/tmp/vmm.err &
wait_lines 10
echo "BOOTED lines=$(lines)"
g=0
while [ $g -lt {hops} ] && alive; do
    n=$(lines)
    # To a file: the new VMM it starts inherits the descriptor and keeps it open.
    timeout 120 cpr-vmm handoff --control /run/vm.$g.sock --new-control /run/vm.$((g + 1)).sock >/tmp/handoff 2>&1
    echo "HANDOFF $((g + 1)) rc=$? at_line=$n $(cat /tmp/handoff)"
    g=$((g + 1))
    wait_lines $((n + 3))
done
n=$(lines)
wait_lines $((n + 20))
echo "END lines=$(lines)"
cat /tmp/l2.console >/dev/ttyS1
sed 's/^/VMM-STDERR: /' /tmp/vmm.err
for p in $(pidof cpr-vmm); do kill $p; done
"#
    )
}

/// Runs the chain in L1 and checks what the guest saw.
fn chain(vcpus: u8, hops: u32) {
    let run = l1::run(&chain_script(vcpus, hops), &["cpr-vmm"], Duration::from_secs(600));
    assert_eq!(run.rc, Some(0), "{}", run.dump());
    let ok = run.console.lines().filter(|l| l.starts_with("HANDOFF") && l.contains(" rc=0 ")).count();
    assert_eq!(ok, usize::try_from(hops).unwrap_or(0), "every handoff succeeded\n{}", run.dump());
    let lines: Vec<ProbeLine> = probe_lines(&run.second_console);
    assert!(lines.len() > 40, "the probe ran on\n{}", run.dump());
    check_guest(&run, &lines);
    // Its local timer ticks between any two lines, across every handoff.
    check_timer_ticks(&lines).unwrap_or_else(|e| panic!("{e}\n{}", run.dump()));
    // The guest's clock: never backwards, and no gap beyond what a pause here costs (the probe
    // sleeps 100 ms; a handoff on this nested machine pauses the guest for tens of ms).
    let worst = lines.iter().map(|l| l.gap_us).max().unwrap_or(0);
    assert!(lines.windows(2).all(|w| w[1].up_ms >= w[0].up_ms), "the guest's clock went backwards\n{}", run.dump());
    assert!(worst < 2_000_000, "the guest saw a {worst} us gap\n{}", run.dump());
    let downtimes: Vec<u64> = run
        .console
        .lines()
        .filter_map(|l| l.split("downtime ").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    println!(
        "{vcpus} vCPUs, {hops} handoffs: {} probe lines, longest guest gap {worst} us, downtimes (us) {downtimes:?}, L1 run {:.1} s",
        lines.len(),
        run.elapsed.as_secs_f64()
    );
}

#[test]
fn twenty_handoffs_of_a_one_vcpu_linux_guest() {
    chain(1, 20);
}

#[test]
fn twenty_handoffs_of_a_two_vcpu_linux_guest() {
    chain(2, 20);
}

/// Rollback and finishing forward with a Linux guest (the bare arbiter, `cpr-vmm handoff`):
/// the new VMM is killed after it has read the whole state but before the decision, so the old
/// VMM resumes the guest; then a new VMM stops right after it reported `Loaded` (the arbiter has
/// decided and sent `Commit`), is held a second and continued, and takes the guest forward. The
/// guest runs on through both, whole.
#[test]
fn a_linux_guest_runs_on_through_a_rollback_and_a_late_commit() {
    let script = format!(
        r#"{SCRIPT_HELPERS}
# The pid of a cpr-vmm that stopped itself at a stall point (state T), once there is one.
stalled() {{
    end=$(($(now) + 120))
    while [ "$(now)" -lt $end ]; do
        for p in $(pidof cpr-vmm); do
            [ "$(cut -d' ' -f3 /proc/$p/stat 2>/dev/null)" = T ] && {{ echo $p; return; }}
        done
        sleep 0.1
    done
}}
cpr-vmm --control /run/vm.0.sock --memory 256M --vcpus 1 --kernel /l2/vmlinux --initrd /l2/guest.cpio.gz \
    --cmdline '{CMDLINE}' --serial-out /tmp/l2.console 2>/tmp/vmm.err &
old=$!
wait_lines 10
CPR_VMM_FAULT=stall:after-state cpr-vmm handoff --control /run/vm.0.sock --new-control /run/vm.1.sock \
    >/tmp/h1 2>&1 &
arbiter=$!
new=$(stalled)
n=$(lines)
kill -9 $new
wait $arbiter
echo "ROLLBACK rc=$? new=$new old_alive=$(kill -0 $old 2>/dev/null && echo 1 || echo 0) at_line=$n $(tr '\n' ' ' </tmp/h1)"
wait_lines $((n + 10))
CPR_VMM_FAULT=stall:after-loaded cpr-vmm handoff --control /run/vm.0.sock --new-control /run/vm.2.sock \
    >/tmp/h2 2>&1 &
arbiter=$!
new=$(stalled)
n=$(lines)
sleep 1
kill -CONT $new
wait $arbiter
echo "FORWARD rc=$? new=$new new_alive=$(kill -0 $new 2>/dev/null && echo 1 || echo 0) at_line=$n $(tr '\n' ' ' </tmp/h2)"
wait_lines $((n + 10))
sleep 1
echo "END lines=$(lines) old_alive=$(kill -0 $old 2>/dev/null && echo 1 || echo 0)"
cat /tmp/l2.console >/dev/ttyS1
for p in $(pidof cpr-vmm); do kill $p; done
"#
    );
    let run = l1::run(&script, &["cpr-vmm"], Duration::from_secs(600));
    assert_eq!(run.rc, Some(0), "{}", run.dump());
    let rollback = run.console.lines().find(|l| l.starts_with("ROLLBACK")).unwrap_or("");
    assert!(rollback.contains("old_alive=1") && !rollback.contains("rc=0 "), "rolled back\n{}", run.dump());
    let forward = run.console.lines().find(|l| l.starts_with("FORWARD")).unwrap_or("");
    assert!(forward.contains("new_alive=1"), "the new VMM took the guest forward\n{}", run.dump());
    let end = run.console.lines().find(|l| l.starts_with("END")).unwrap_or("");
    assert!(end.contains("old_alive=0"), "the old VMM is gone after the commit\n{}", run.dump());
    let lines = probe_lines(&run.second_console);
    let rollback_at = run.value("ROLLBACK", "at_line").and_then(|n| n.parse::<usize>().ok()).unwrap_or(usize::MAX);
    let forward_at = run.value("FORWARD", "at_line").and_then(|n| n.parse::<usize>().ok()).unwrap_or(usize::MAX);
    assert!(lines.len() >= forward_at + 10 && forward_at >= rollback_at + 10, "the guest ran on\n{}", run.dump());
    check_guest(&run, &lines);
    // The timer counts that can be read grow from line to line. Not every line's can be read
    // here: the second held on purpose before the commit makes the guest's clocksource watchdog
    // note a long readout interval, and that kernel line may land inside a probe line.
    let ticks: Vec<u64> = lines.iter().filter_map(|l| l.timer_irqs).collect();
    assert!(ticks.windows(2).all(|w| w[1] > w[0]), "the local timer stopped: {ticks:?}\n{}", run.dump());
    println!("{rollback}\n{forward}\n{end}\n{} probe lines, L1 run {:.1} s", lines.len(), run.elapsed.as_secs_f64());
}
