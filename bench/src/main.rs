//! `cpr-bench`: handoff downtime, guest-seen gap and post-resume cost, on the real `/dev/kvm`.
//!
//! Reproduce: `cargo build --release --workspace && target/release/cpr-bench [--handoffs N]`.

use std::time::Duration;

use clap::Parser;

mod floor;
use cpr_bench::{Summary, summarize, tsc_ticks_per_us};
use cpr_proto::control::HandoffReport;
use cpr_tests::{Chain, wait_until};

/// Handoff benchmarks for cpr-vmm.
#[derive(Debug, Parser)]
struct Args {
    /// Handoffs per configuration.
    #[arg(long, default_value_t = 100)]
    handoffs: usize,
    /// Samples of each part of the floor.
    #[arg(long, default_value_t = 1000)]
    floor_samples: usize,
    /// Instead: only the floor, its parts and the pre-fault path of this host.
    #[arg(long)]
    floor: bool,
    /// Instead: the network's view of a QEMU upgrade: the longest gap in a steady stream of
    /// small TCP messages echoed by the guest, per RAM size (--gap-ram), --hops upgrades each.
    #[arg(long)]
    network_gap: bool,
    /// Instead: what one of the switchover's tunings saves (`warm-up`, `spin`, `parallel`), or
    /// this build against another (`build`, with --baseline-vmm). One chain per vCPU count of
    /// --vcpus (256 MiB), handed over --handoffs times with and as many without it, alternating.
    #[arg(long, value_enum)]
    ab: Option<Tuning>,
    /// For `--ab build`: the other build's cpr-vmm, run in the "no" blocks.
    #[arg(long)]
    baseline_vmm: Option<std::path::PathBuf>,
    /// RAM sizes for --network-gap.
    #[arg(long, value_delimiter = ',', default_value = "256M,4G")]
    gap_ram: Vec<String>,
    /// RAM sizes for the downtime table (1 vCPU each).
    #[arg(long, value_delimiter = ',', default_value = "256M,1G,4G,16G")]
    ram: Vec<String>,
    /// vCPU counts for the downtime table (1 GiB each).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    vcpus: Vec<String>,
    /// RAM sizes for the post-resume table.
    #[arg(long, value_delimiter = ',', default_value = "256M,1G")]
    touch_ram: Vec<String>,
    /// Instead: compare cprd-driven upgrades (D-Bus) with bare handoffs, and time UpgradeAll.
    #[arg(long)]
    daemon: bool,
    /// VMs for the UpgradeAll measurement (with --daemon).
    #[arg(long, default_value_t = 50)]
    vms: usize,
    /// Instead: cprd restarts under real systemd (container): control-plane gap, guest pause.
    #[arg(long)]
    systemd: bool,
    /// Restarts to measure (with --systemd).
    #[arg(long, default_value_t = 10)]
    restarts: usize,
    /// Instead: QEMU (TCG, probe guest), cprd-driven cpr-transfer vs hand-driven QMP
    /// cpr-transfer vs precopy migration, per RAM size.
    #[arg(long)]
    qemu: bool,
    /// RAM sizes for --qemu.
    #[arg(long, value_delimiter = ',', default_value = "256M,1G,4G")]
    qemu_ram: Vec<String>,
    /// Hops per driver and RAM size (with --qemu).
    #[arg(long, default_value_t = 10)]
    hops: usize,
    /// Instead: a Linux guest under cpr-vmm and one under QEMU with accel=kvm, both on
    /// hardware-style KVM (the L1 test machine: Debian's kvm_amd on TCG-emulated SVM), upgraded
    /// in turn through cprd; prints the downtime of each and their ratio.
    #[arg(long)]
    linux: bool,
    /// Upgrades of each VM (with --linux).
    #[arg(long, default_value_t = 20)]
    upgrades: usize,
    /// vCPUs of each Linux guest (with --linux).
    #[arg(long, default_value_t = 1)]
    linux_vcpus: u8,
    /// Instead: what the VMM's box and seccomp cost: three cprds in one run (before issue 15,
    /// seccomp only, box and seccomp), lone upgrades (--handoffs, interleaved) and
    /// UpgradeAll(--vms) (rotated).
    #[arg(long)]
    sandbox_cost: bool,
    /// UpgradeAll rounds of each cprd (with --sandbox-cost).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Instead: real QEMU versions in a Debian 13 container with systemd (cprd's .deb, built
    /// first with `packaging/build`): same-version upgrades on QEMU 10.0, the 10.0 -> 11.1 jump
    /// by `apt-get install` (every VM once), then on QEMU 11.1 the fd-type and the path cpr
    /// channel; downtime and wall time per upgrade.
    #[arg(long)]
    qemu_versions: bool,
    /// VMs (each moved once by the 10.0 -> 11.1 jump), with --qemu-versions.
    #[arg(long, default_value_t = 4)]
    jump_vms: usize,
    /// Instead: a soak, N chained upgrades (default 1000) of one VM of each backend (a cpr-vmm
    /// test guest on /dev/kvm, a QEMU TCG Linux guest) through cprd; prints cprd's descriptors,
    /// RSS and threads and the VMM processes every 100 upgrades, with the downtimes of each 100.
    #[arg(long, num_args = 0..=1, default_missing_value = "1000")]
    soak: Option<usize>,
    /// Instead: the chaos run, N rounds (default 300) of `cprctl upgrade --all` of --chaos-vms
    /// CPL3 test-guest VMs, killing in turn an old VMM, a new VMM and cprd at a random moment
    /// 0-5 ms into each (`cpr_tests::chaos`; CPRD_CHAOS_SEED replays a run); prints the kills
    /// and the guests lost, and why.
    #[arg(long, num_args = 0..=1, default_missing_value = "300")]
    chaos: Option<usize>,
    /// VMs of the chaos run.
    #[arg(long, default_value_t = 4)]
    chaos_vms: usize,
}

/// One hop of a QEMU guest.
#[derive(Debug, Clone, Copy)]
struct Hop {
    downtime_ms: f64,
    stop_resume_us: f64,
    total_ms: f64,
    guest_gap_ms: f64,
    host_gap_ms: f64,
    wall_ms: f64,
}

/// Probe lines as they arrive from `cprctl console`: (seq, guest gap µs, arrival).
type Arrivals = std::sync::Arc<std::sync::Mutex<Vec<(u64, u64, std::time::Instant)>>>;

/// The longest gaps from probe line `before` (the last one before a hop) to 3 lines after
/// `after` (the last one when the hop returned): guest clock, host arrivals (ms).
fn gaps_around(lines: &Arrivals, before: u64, after: u64) -> (f64, f64) {
    let done =
        wait_until(Duration::from_secs(10), || lines.lock().expect("lock").last().is_some_and(|l| l.0 >= after + 3));
    assert!(done, "the guest went quiet after a hop");
    let all = lines.lock().expect("lock");
    let near: Vec<_> = all.iter().filter(|l| l.0 >= before && l.0 <= after + 3).collect();
    let host = near.windows(2).map(|w| w[1].2.duration_since(w[0].2).as_secs_f64() * 1e3).fold(0.0, f64::max);
    let guest = near.iter().skip(1).map(|l| l.1 as f64 / 1e3).fold(0.0, f64::max);
    (guest, host)
}

/// QEMU's own downtime of upgrade `i` (0-based) of `cprd`'s life, in ms, from the `QMP downtime`
/// line cprd logs for each QEMU upgrade; NaN where there is none.
fn qmp_downtime_ms(cprd: &cpr_tests::daemon::Cprd, i: usize) -> f64 {
    cprd.log_text()
        .lines()
        .filter_map(|l| l.split("QMP downtime ").nth(1))
        .nth(i)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(f64::NAN)
}

/// `hops` cprd-driven upgrades (D-Bus) of a QEMU probe guest with `ram`.
fn cprd_qemu_hops(ram: &str, hops: usize) -> Vec<Hop> {
    use cpr_tests::daemon::{Cprd, PrivateBus, define_vm, kill_vmms, write_config};
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = PrivateBus::start(dir.path());
    let config = write_config(dir.path(), &["/usr/bin/qemu-system-*"]);
    define_vm(&config, "q", &cpr_tests::linux_guest::vm_definition(ram, ""));
    let cprd = Cprd::start(dir.path(), &bus, &config);
    let out = cprd.cprctl(&["start", "q"]);
    assert!(out.status.success(), "start: {}", String::from_utf8_lossy(&out.stderr));
    let mut console =
        cprd.cprctl_command(&["console", "q"]).stdout(std::process::Stdio::piped()).spawn().expect("cprctl console");
    let lines: Arrivals = Arrivals::default();
    {
        let (out, lines) = (console.stdout.take().expect("stdout"), std::sync::Arc::clone(&lines));
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(p) = cpr_tests::linux_guest::probe_line(&line) {
                    lines.lock().expect("lock").push((p.seq, p.gap_us, std::time::Instant::now()));
                }
            }
        });
    }
    assert!(wait_until(Duration::from_secs(120), || lines.lock().expect("lock").len() >= 5), "the guest did not print");
    let mut result = Vec::new();
    for i in 0..hops {
        let before = lines.lock().expect("lock").last().map_or(0, |l| l.0);
        let t = std::time::Instant::now();
        let out = cprd.cprctl(&["--json", "upgrade", "q"]);
        let wall_ms = t.elapsed().as_secs_f64() * 1e3;
        assert!(out.status.success(), "upgrade {i}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let after = lines.lock().expect("lock").last().map_or(0, |l| l.0);
        let (guest_gap_ms, host_gap_ms) = gaps_around(&lines, before, after);
        // cprd logs QEMU's own downtime figure next to the STOP->RESUME it reports on D-Bus.
        let qmp_ms = qmp_downtime_ms(&cprd, i);
        result.push(Hop {
            downtime_ms: qmp_ms,
            stop_resume_us: v["downtime_usec"].as_f64().unwrap_or(f64::NAN),
            total_ms: f64::NAN,
            guest_gap_ms,
            host_gap_ms,
            wall_ms,
        });
    }
    let _ = console.kill();
    let _ = console.wait();
    let _ = cprd.cprctl(&["stop", "q"]);
    kill_vmms(&cprd.runtime_dir);
    result
}

/// The hand-driven baselines of `bench/qmp-baseline.py`: (cpr-transfer hops, precopy hops).
fn baseline_hops(ram: &str, hops: usize) -> (Vec<Hop>, Vec<Hop>) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("qmp-baseline.py");
    let out = std::process::Command::new(script)
        .arg("--kernel")
        .arg(cpr_tests::linux_guest::kernel())
        .arg("--initrd")
        .arg(cpr_tests::linux_guest::initramfs())
        .args(["--memory", ram, "--hops", &hops.to_string()])
        .output()
        .expect("run qmp-baseline.py");
    assert!(out.status.success(), "qmp-baseline.py: {}", String::from_utf8_lossy(&out.stderr));
    let (mut cpr, mut precopy) = (Vec::new(), Vec::new());
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json line");
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let hop = Hop {
            downtime_ms: f("downtime_ms"),
            stop_resume_us: f("stop_resume_us"),
            total_ms: f("total_ms"),
            guest_gap_ms: f("gap_us") / 1e3,
            host_gap_ms: f("host_gap_us") / 1e3,
            wall_ms: f("wall_ms"),
        };
        if v["mode"] == "precopy" { precopy.push(hop) } else { cpr.push(hop) }
    }
    (cpr, precopy)
}

/// Mean of the values that are numbers.
fn mean_of(values: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.filter(|x| !x.is_nan()).collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// cprd-driven vs hand-driven cpr-transfer vs precopy, for each RAM size.
fn qemu_bench(args: &Args) {
    println!("guest: Debian's stock kernel + probe initramfs under QEMU 10 with accel=tcg, 1 vCPU");
    println!("QMP downtime = the old QEMU's query-migrate `downtime` (ms resolution); total = its `total-time`");
    println!(
        "guest gap = longest gap between two 20 ms probe ticks on the guest's clock (TCG stops that clock while paused)"
    );
    println!("host gap = longest gap between probe lines arriving on the host (includes post-resume TCG warm-up)");
    println!("wall = one hop as its driver sees it (cprctl upgrade round trip / the script's migrate..running)");
    println!();
    println!(
        "STOP->RESUME = old QEMU's STOP event to the new QEMU's RESUME event, QMP timestamps (us); cprd reports it as downtime"
    );
    println!();
    println!(
        "| RAM | driver | n | STOP->RESUME us median (min-max) | mean | QMP downtime ms median (min-max) | guest gap ms median | host gap ms median | total ms median | wall ms median |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for ram in &args.qemu_ram {
        let by_cprd = cprd_qemu_hops(ram, args.hops);
        let (by_hand, precopy) = baseline_hops(ram, args.hops);
        for (driver, hops) in [("cprd (D-Bus)", &by_cprd), ("hand QMP script", &by_hand), ("precopy, hand", &precopy)] {
            let col = |f: fn(&Hop) -> f64| summarize(&hops.iter().map(f).filter(|x| !x.is_nan()).collect::<Vec<_>>());
            let (sr, d) = (col(|h| h.stop_resume_us), col(|h| h.downtime_ms));
            let mean = mean_of(hops.iter().map(|h| h.stop_resume_us));
            let total = col(|h| h.total_ms);
            let total = if total.n == 0 { "n/a".to_string() } else { format!("{:.0}", total.median) };
            println!(
                "| {ram} | {driver} | {} | {:.0} ({:.0}-{:.0}) | {mean:.0} | {:.0} ({:.0}-{:.0}) | {:.1} | {:.1} | {total} | {:.1} |",
                sr.n,
                sr.median,
                sr.min,
                sr.max,
                d.median,
                d.min,
                d.max,
                col(|h| h.guest_gap_ms).median,
                col(|h| h.host_gap_ms).median,
                col(|h| h.wall_ms).median
            );
        }
        let sr = |v: &[Hop]| mean_of(v.iter().map(|h| h.stop_resume_us));
        let qmp = |v: &[Hop]| mean_of(v.iter().map(|h| h.downtime_ms));
        ratios.push((ram.clone(), sr(&by_cprd) / sr(&by_hand), qmp(&by_cprd) / qmp(&by_hand)));
    }
    println!();
    for (ram, sr, qmp) in ratios {
        println!("{ram}: cprd-driven / hand-driven: mean STOP->RESUME {sr:.2}, mean QMP downtime {qmp:.2}");
    }
}

/// Control-plane gap and guest-visible pause across `systemctl restart cprd`, under real systemd.
fn systemd_bench(args: &Args, tpu: f64) {
    use cpr_tests::container::Container;
    let c = Container::boot(&[("g", "memory = \"256M\"\n")]);
    c.sh("systemctl start cprd && cprctl start g");
    let client = "while [ ! -e /tmp/stop ]; do \
        if busctl call org.cprd1 /org/cprd1 org.cprd1.Manager ListVMs >/dev/null 2>&1; then date +%s%N >> /tmp/ok; \
        else echo fail >> /tmp/failed; fi; sleep 0.005; done";
    c.sh(&format!("systemd-run --unit=lister sh -c '{client}'"));
    std::thread::sleep(Duration::from_secs(1));
    let mut windows = Vec::new();
    for _ in 0..args.restarts {
        let t0: u64 = c.sh("date +%s%N").trim().parse().unwrap_or(0);
        c.sh("systemctl restart cprd");
        std::thread::sleep(Duration::from_millis(500));
        let t1: u64 = c.sh("date +%s%N").trim().parse().unwrap_or(0);
        windows.push((t0, t1));
    }
    c.sh("touch /tmp/stop");
    std::thread::sleep(Duration::from_millis(200));
    let oks: Vec<u64> = c.sh("cat /tmp/ok").lines().filter_map(|l| l.trim().parse().ok()).collect();
    let failed = c.sh("cat /tmp/failed 2>/dev/null || true").lines().count();
    let gaps: Vec<f64> = windows
        .iter()
        .map(|(t0, t1)| {
            let inside: Vec<u64> =
                oks.iter().copied().filter(|t| *t >= t0.saturating_sub(50_000_000) && *t <= *t1).collect();
            inside.windows(2).map(|w| (w[1] - w[0]) as f64 / 1e6).fold(0.0, f64::max)
        })
        .collect();
    let steady: Vec<f64> = oks.windows(2).take(50).map(|w| (w[1] - w[0]) as f64 / 1e6).collect();
    // Guest: the longest gap between two loop iterations per heartbeat interval, from the console.
    let hbs = cpr_testguest::Heartbeat::all_in(&c.sh("cat /run/cprd/vms/g.console"));
    let guest: Vec<f64> = hbs.iter().skip(1).map(|h| h.max_gap_ticks as f64 / tpu / 1000.0).collect();
    let (g, s, q) = (summarize(&gaps), summarize(&steady), summarize(&guest));
    print_header();
    print_row("ListVMs gap across a restart, ms", &g, 1);
    print_row("ListVMs interval without restart, ms", &s, 1);
    print_row("guest's longest loop gap per heartbeat, whole run, ms", &q, 2);
    println!();
    println!("failed ListVMs calls: {failed} of {}", oks.len() + failed);
    let st = c.sh("cprctl --json status g");
    println!("VM after {} restarts: {st}", args.restarts);
}

/// The header of a `measurement | n | min | median | p99 | max` table.
fn print_header() {
    println!("| measurement | n | min | median | p99 | max |");
    println!("|---|---|---|---|---|---|");
}

/// One row of that table, with `decimals` digits after the point.
fn print_row(label: &str, s: &Summary, decimals: usize) {
    println!("| {label} | {} | {:.d$} | {:.d$} | {:.d$} | {:.d$} |", s.n, s.min, s.median, s.p99, s.max, d = decimals);
}

/// The report's title and the command line that reproduces it.
/// `--linux`: one L1 run (`cpr_tests::l1`) with cprd on a system bus, a Linux probe guest under
/// cpr-vmm and one under QEMU (`accel=kvm`), both running the whole time, upgraded in turn (one
/// of each per round, after each guest printed three more probe lines), so both backends see the
/// same conditions.
fn linux_bench(args: &Args) {
    use cpr_tests::l1;
    let script = format!(
        r#"{helpers}
heartbeat
start_cprd
echo "CPRD UP"
linux_vm cprvmm cpr-vmm {vcpus}
linux_vm qemu qemu {vcpus}
cprctl start cprvmm && cprctl start qemu || echo "START failed"
wait_lines cprvmm 10
wait_lines qemu 10
i=0
while [ $i -lt {upgrades} ]; do
    i=$((i + 1))
    for vm in cprvmm qemu; do
        n=$(lines $vm)
        out=$(timeout 180 cprctl --json upgrade $vm 2>&1) || {{ echo "FAILED $vm $out"; break 2; }}
        echo "UPGRADE $vm $out"
        wait_lines $vm $((n + 3))
        echo "WAITED $vm at=$(cut -d' ' -f1 /proc/uptime) lines=$n..$(lines $vm)"
    done
done
tail -5 /run/cprd/vms/cprvmm.console >/dev/ttyS1
tail -5 /run/cprd/vms/qemu.console >/dev/ttyS1
for vm in cprvmm qemu; do cprctl stop $vm; done
grep 'cpr-transfer of' /tmp/cprd.log | sed 's/^/CPRD-LOG: /'
"#,
        helpers = l1::cprd_helpers(),
        vcpus = args.linux_vcpus,
        upgrades = args.upgrades
    );
    let run = l1::run_with(
        &script,
        &["cprd", "cprctl", "cpr-vmm"],
        &[l1::Extra::Bus, l1::Extra::Qemu],
        Duration::from_secs(600 + 60 * args.upgrades as u64),
    );
    let downtimes = |vm: &str| -> Vec<f64> {
        run.console
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("UPGRADE {vm} ")))
            .filter_map(|j| serde_json::from_str::<serde_json::Value>(j).ok()?["downtime_usec"].as_f64())
            .collect()
    };
    // QEMU's own figure for each cpr-transfer (query-migrate's downtime), as cprd logs it.
    let qemu_own: Vec<f64> = run
        .console
        .lines()
        .filter(|l| l.starts_with("CPRD-LOG: "))
        .filter_map(|l| l.split("QMP downtime ").nth(1)?.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect();
    let cprvmm = summarize(&downtimes("cprvmm"));
    let qemu = summarize(&downtimes("qemu"));
    let own = summarize(&qemu_own);
    assert!(cprvmm.n >= args.upgrades && qemu.n >= args.upgrades, "not every upgrade succeeded:\n{}", run.dump());
    println!(
        "L1: QEMU TCG -cpu EPYC, 1 emulated CPU, Debian's kvm_amd (TCG-emulated SVM with NPT); each guest: Linux {} vCPU, \
         256 MiB, the probe every 100 ms; {} upgrades each through cprd, alternating; L1 ran {:.0} s",
        args.linux_vcpus,
        args.upgrades,
        run.elapsed.as_secs_f64()
    );
    println!(
        "downtime = cprd's figure: the guest's pause to its resume (cpr-vmm: the VMMs' clocks; QEMU: STOP -> RESUME events)"
    );
    println!();
    println!("| backend | n | downtime min us | median | p99 | max |");
    println!("|---|---|---|---|---|---|");
    for (name, s) in [("cpr-vmm", cprvmm), ("QEMU accel=kvm", qemu), ("QEMU accel=kvm, QEMU's own figure", own)] {
        println!("| {name} | {} | {:.0} | {:.0} | {:.0} | {:.0} |", s.n, s.min, s.median, s.p99, s.max);
    }
    println!();
    println!("ratio cpr-vmm / QEMU accel=kvm, median downtime: {:.3}", cprvmm.median / qemu.median);
}

fn print_title(title: &str) {
    let cmd: Vec<String> = std::env::args().collect();
    println!("# {title}\ncommand: {}", cmd.join(" "));
}

/// Resident set size of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// cprd-driven versus bare handoffs in one run, UpgradeAll wall time, cprd's RSS.
fn daemon_bench(args: &Args) {
    use cpr_tests::daemon::{Cprd, PrivateBus, define_vm, kill_vmms, write_config};
    let n = args.handoffs;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut chain = Chain::start(dir.path(), &["--memory", "256M"], &[]);
    let ddir = tempfile::tempdir().expect("tempdir");
    let bus = PrivateBus::start(ddir.path());
    let config = write_config(ddir.path(), &[]);
    define_vm(&config, "one", "memory = \"256M\"\n");
    for i in 0..args.vms {
        define_vm(&config, &format!("m{i:03}"), "memory = \"64M\"\n");
    }
    let cprd = Cprd::start(ddir.path(), &bus, &config);
    assert!(cprd.cprctl(&["start", "one"]).status.success());
    // What one message round trip costs here, in the same conditions (both guests running):
    // the price of the commit (the new VMM's `Loaded` to its arbiter, the arbiter's `Commit`).
    let round_trip = seqpacket_round_trips(1000, false);
    let round_trip_cross = seqpacket_round_trips(1000, true);
    // Interleaved, both guests running: the same conditions for both kinds of handoff.
    let (mut bare, mut via_dbus, mut wall, mut commit) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // The commit's three parts: `Loaded` in transit, the arbiter deciding, `Commit` in transit.
    let (mut loaded_transit, mut deciding, mut commit_transit) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        chain.hand_off(&chain.request()).unwrap_or_else(|e| panic!("bare handoff {i}: {e}"));
        bare.push(chain.reports.last().map_or(0.0, |r| r.downtime_ns() as f64 / 1000.0));
        commit.extend(chain.reports.last().map(|r| r.resumed_ns.saturating_sub(r.loaded_ns) as f64 / 1000.0));
        if let Some(r) = chain.reports.last().filter(|r| r.loaded_seen_ns > 0 && r.commit_sent_ns > 0) {
            let us = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1000.0;
            loaded_transit.push(us(r.loaded_ns, r.loaded_seen_ns));
            deciding.push(us(r.loaded_seen_ns, r.commit_sent_ns));
            commit_transit.push(us(r.commit_sent_ns, r.resumed_ns));
        }
        let t = std::time::Instant::now();
        let out = cprd.cprctl(&["--json", "upgrade", "one"]);
        wall.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(out.status.success(), "upgrade {i}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        via_dbus.push(v["downtime_usec"].as_f64().unwrap_or(0.0));
    }
    drop(chain);
    let _ = cprd.cprctl(&["stop", "one"]);
    for i in 0..args.vms {
        assert!(cprd.cprctl(&["start", &format!("m{i:03}")]).status.success());
    }
    let t = std::time::Instant::now();
    let out = cprd.cprctl(&["--json", "upgrade", "--all"]);
    let all_wall = t.elapsed().as_secs_f64();
    let ok = out.status.success();
    let all_rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let during_all: Vec<f64> =
        all_rows.as_array().into_iter().flatten().filter_map(|r| r["downtime_usec"].as_f64()).collect();
    if !ok {
        let rows = &all_rows;
        for r in rows.as_array().into_iter().flatten().filter(|r| r["ok"] != true) {
            println!("failed: {} {}", r["name"], r["error"]);
            let name = r["name"].as_str().unwrap_or("");
            let log =
                std::fs::read_to_string(cprd.runtime_dir.join("vms").join(format!("{name}.log"))).unwrap_or_default();
            println!("its VMM log:\n{log}");
        }
    }
    let rss = rss_kib(cprd.child.id());
    kill_vmms(&cprd.runtime_dir);
    let (b, d, w) = (summarize(&bare), summarize(&via_dbus), summarize(&wall));
    print_header();
    print_row("bare handoff downtime (cpr-vmm handoff), us", &b, 0);
    print_row("cprd UpgradeVM downtime (D-Bus), us", &d, 0);
    print_row("cprctl upgrade wall time, ms", &w, 1);
    print_row("the commit in a bare handoff (Loaded sent to KVM_RUN), us", &summarize(&commit), 0);
    if !deciding.is_empty() {
        print_row("  of which Loaded in transit (new VMM -> arbiter), us", &summarize(&loaded_transit), 0);
        print_row("  of which the arbiter deciding (Loaded read -> Commit sent), us", &summarize(&deciding), 0);
        print_row("  of which Commit in transit (arbiter -> new VMM), us", &summarize(&commit_transit), 0);
    }
    print_row("one seqpacket round trip between two idle processes, us", &summarize(&round_trip), 0);
    print_row("  the same, the two processes on different CPUs, us", &summarize(&round_trip_cross), 0);
    if !during_all.is_empty() {
        print_row(&format!("downtime of each VM during UpgradeAll({}), us", args.vms), &summarize(&during_all), 0);
    }
    println!();
    println!("cprd-driven / bare median downtime = {:.2}", d.median / b.median);
    println!("UpgradeAll of {} VMs: {all_wall:.2} s wall, {}", args.vms, if ok { "all ok" } else { "FAILURES" });
    println!("cprd RSS with {} VMs: {:.1} MiB", args.vms, rss as f64 / 1024.0);
}

/// One cprd of the sandbox benchmark, with its VMs defined: `one` (256 MiB) and `m000`...
struct Variant {
    label: &'static str,
    _dir: tempfile::TempDir,
    _bus: cpr_tests::daemon::PrivateBus,
    cprd: cpr_tests::daemon::Cprd,
}

impl Variant {
    fn start(label: &'static str, boxed: bool, seccomp: bool, vms: usize) -> Self {
        use cpr_tests::daemon::{Cprd, PrivateBus, define_vm, write_config};
        let dir = tempfile::tempdir().expect("tempdir");
        let bus = PrivateBus::start(dir.path());
        let config = write_config(dir.path(), &[]);
        if !boxed {
            std::fs::create_dir_all(config.join("config.d")).expect("config.d");
            std::fs::write(config.join("config.d/50-no-box.toml"), "[sandbox]\nenabled = false\n").expect("write");
        }
        define_vm(&config, "one", "memory = \"256M\"\n");
        for i in 0..vms {
            define_vm(&config, &format!("m{i:03}"), "memory = \"64M\"\n");
        }
        // cpr-vmm's own filters are switched off through the environment its cprd passes on.
        let env: &[(&str, &str)] = if seccomp { &[] } else { &[("CPR_VMM_SECCOMP", "off")] };
        let cprd = Cprd::start_with_env(dir.path(), &bus, &config, env);
        Self { label, _dir: dir, _bus: bus, cprd }
    }

    /// `cprctl ARGS` that must succeed; its JSON output.
    fn call(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cprd.cprctl(args);
        assert!(out.status.success(), "{} {args:?}: {}", self.label, String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    fn each_small_vm(&self, vms: usize, verb: &str) {
        for i in 0..vms {
            self.call(&[verb, &format!("m{i:03}")]);
        }
    }
}

/// The VMM's box, priced: lone-upgrade downtime (interleaved, one VM running in each cprd) and
/// `UpgradeAll(vms)` wall time (the rounds rotate between the cprds, only the measured one's VMs
/// running), in one run: as before issue 15 (no box, no seccomp), with cpr-vmm's seccomp only,
/// and with both.
fn sandbox_bench(args: &Args) {
    let before = Variant::start("before (no box, no seccomp)", false, false, args.vms);
    let seccomp = Variant::start("seccomp only", false, true, args.vms);
    let boxed = Variant::start("boxed + seccomp", true, true, args.vms);
    let variants = [&before, &seccomp, &boxed];
    for v in variants {
        v.call(&["start", "one"]);
    }
    let mut downtime = [Vec::new(), Vec::new(), Vec::new()];
    let mut wall = [Vec::new(), Vec::new(), Vec::new()];
    // Rotate which goes first, so that none always follows another.
    let orders = [[0, 1, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0], [1, 0, 2], [0, 2, 1]];
    for i in 0..args.handoffs {
        for k in orders[i % orders.len()] {
            let t = std::time::Instant::now();
            let up = variants[k].call(&["--json", "upgrade", "one"]);
            wall[k].push(t.elapsed().as_secs_f64() * 1e3);
            downtime[k].push(up["downtime_usec"].as_f64().unwrap_or(0.0));
        }
    }
    let mut all = [Vec::new(), Vec::new(), Vec::new()];
    for v in variants {
        v.call(&["stop", "one"]);
    }
    for round in 0..args.rounds {
        for k in orders[round % orders.len()] {
            let v = variants[k];
            v.each_small_vm(args.vms, "start");
            let t = std::time::Instant::now();
            let rows = v.call(&["--json", "upgrade", "--all"]);
            all[k].push(t.elapsed().as_secs_f64());
            let ok = rows.as_array().is_some_and(|r| r.len() == args.vms && r.iter().all(|r| r["ok"] == true));
            assert!(ok, "{}: UpgradeAll failed: {rows}", v.label);
            v.each_small_vm(args.vms, "stop");
        }
    }
    print_header();
    for (k, v) in variants.iter().enumerate() {
        print_row(&format!("{}: lone upgrade downtime (256 MiB test guest), us", v.label), &summarize(&downtime[k]), 0);
        print_row(&format!("{}: cprctl upgrade wall time, ms", v.label), &summarize(&wall[k]), 1);
        print_row(&format!("{}: UpgradeAll({}) wall time, s", v.label, args.vms), &summarize(&all[k]), 2);
    }
    let ratio = |x: &[Vec<f64>; 3], k: usize| summarize(&x[k]).median / summarize(&x[0]).median;
    println!();
    for (k, v) in variants.iter().enumerate().skip(1) {
        println!(
            "{} / before, median: downtime {:.3}, upgrade wall {:.3}, UpgradeAll wall {:.3}",
            v.label,
            ratio(&downtime, k),
            ratio(&wall, k),
            ratio(&all, k)
        );
    }
    for v in variants {
        cpr_tests::daemon::kill_vmms(&v.cprd.runtime_dir);
    }
}

/// `n` round trips of one small message between this process and a child on a `SOCK_SEQPACKET`
/// pair, each side blocking in `recv`, each after both sides sat idle for 0.5 ms, as the arbiter
/// and the new VMM are around the commit; in µs.
/// With `cross_cpu`, the two sides are pinned to different CPUs (the other side's CPU has gone
/// idle when the message comes, as the arbiter's has while a new VMM restores); else the kernel
/// places them (then usually on one CPU, where a wake-up costs no inter-processor interrupt).
fn seqpacket_round_trips(n: usize, cross_cpu: bool) -> Vec<f64> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use std::os::fd::AsFd;
    let pin = |cpu: usize| {
        let mut set = nix::sched::CpuSet::new();
        if cross_cpu && set.set(cpu).is_ok() {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        }
    };
    let (ours, theirs) =
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::empty()).expect("socketpair");
    // SAFETY: the child only echoes on its socket and exits; no locks are taken after fork.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            drop(ours);
            pin(1);
            let mut buf = [0u8; 64];
            while let Ok(k) = nix::sys::socket::recv(
                std::os::fd::AsRawFd::as_raw_fd(&theirs),
                &mut buf,
                nix::sys::socket::MsgFlags::empty(),
            ) {
                if k == 0
                    || nix::sys::socket::send(
                        std::os::fd::AsRawFd::as_raw_fd(&theirs),
                        &buf[..k],
                        nix::sys::socket::MsgFlags::empty(),
                    )
                    .is_err()
                {
                    break;
                }
            }
            // SAFETY: _exit ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(theirs);
            // Only the measuring thread is pinned, and only while it measures.
            let before = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok();
            pin(0);
            let fd = std::os::fd::AsRawFd::as_raw_fd(&ours.as_fd());
            let mut buf = [0u8; 64];
            let samples = (0..n)
                .map(|_| {
                    // Both sides idle first, as the arbiter is while the new VMM restores.
                    std::thread::sleep(std::time::Duration::from_micros(500));
                    let t = std::time::Instant::now();
                    let _ = nix::sys::socket::send(fd, b"{\"msg\":\"commit\"}", nix::sys::socket::MsgFlags::empty());
                    let _ = nix::sys::socket::recv(fd, &mut buf, nix::sys::socket::MsgFlags::empty());
                    t.elapsed().as_secs_f64() * 1e6
                })
                .collect();
            drop(ours);
            let _ = nix::sys::wait::waitpid(child, None);
            if let Some(set) = before {
                let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
            }
            samples
        }
    }
}

/// Median cost of one vCPU ioctl (`KVM_GET_REGS`) and one system ioctl on this host, in µs:
/// the unit every save and restore step is made of.
fn ioctl_floor() -> (f64, f64) {
    let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("create VM");
    let vcpu = vm.create_vcpu(0).expect("create vCPU");
    let time = |f: &dyn Fn()| {
        let samples: Vec<f64> = (0..2000)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        summarize(&samples).median
    };
    (
        time(&|| {
            let _ = vcpu.get_regs();
        }),
        time(&|| {
            let _ = kvm.get_api_version();
        }),
    )
}

/// One upgrade seen from the network: the longest gap between two echoes around it (ms), cprd's
/// STOP -> RESUME (µs), QEMU's own downtime figure (ms), and the longest gap in a window as long
/// with no upgrade, just before it (ms): the stream's own jitter, the control.
type NetworkHop = (f64, f64, f64, f64);

/// `hops` cprd-driven upgrades of a QEMU probe guest with `ram` whose e1000 sits on a tap in a
/// network namespace made for it, while a client in that namespace sends a small message every
/// millisecond to the guest's TCP echo server (10.0.2.15:7) and notes when each echo comes back.
fn network_hops(ram: &str, hops: usize) -> Vec<NetworkHop> {
    use cpr_tests::daemon::{Cprd, PrivateBus, define_vm, kill_vmms, write_config};
    use std::io::{BufRead, Write};
    let ns = cpr_tests::linux_guest::NetNs::create("gap");
    let nic = format!("[[nic]]\ntap = \"cprgap0\"\nnetns = {:?}\nmodel = \"e1000\"\n", ns.path().display().to_string());
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = PrivateBus::start(dir.path());
    let config = write_config(dir.path(), &["/usr/bin/qemu-system-*"]);
    define_vm(&config, "q", &cpr_tests::linux_guest::vm_definition(ram, &nic));
    let cprd = Cprd::start(dir.path(), &bus, &config);
    let out = cprd.cprctl(&["start", "q"]);
    assert!(out.status.success(), "start: {}", String::from_utf8_lossy(&out.stderr));
    assert!(ns.ip(&["addr", "add", "10.0.2.1/24", "dev", "cprgap0"]) && ns.ip(&["link", "set", "cprgap0", "up"]));
    let console = cprd.runtime_dir.join("vms/q.console");
    let listening = wait_until(Duration::from_secs(120), || {
        std::fs::read_to_string(&console).is_ok_and(|t| t.contains("ECHO listening"))
    });
    assert!(listening, "the guest's echo server did not start");
    let stream = ns.run(|| {
        for _ in 0..100 {
            if let Ok(c) =
                std::net::TcpStream::connect_timeout(&"10.0.2.15:7".parse().expect("addr"), Duration::from_secs(2))
            {
                return c;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("cannot connect to the guest's echo server");
    });
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let arrivals = std::sync::Arc::new(std::sync::Mutex::new(Vec::<std::time::Instant>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (stream, arrivals) = (stream.try_clone().expect("clone"), std::sync::Arc::clone(&arrivals));
        std::thread::spawn(move || {
            for _ in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
                arrivals.lock().expect("lock").push(std::time::Instant::now());
            }
        })
    };
    let writer = {
        let (mut stream, stop) = (stream.try_clone().expect("clone"), std::sync::Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if stream.write_all(format!("p {n}\n").as_bytes()).is_err() {
                    break;
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    assert!(wait_until(Duration::from_secs(10), || arrivals.lock().expect("lock").len() > 100), "no echoes");
    let longest_gap = |from: std::time::Instant, to: std::time::Instant| {
        let near: Vec<std::time::Instant> =
            arrivals.lock().expect("lock").iter().copied().filter(|t| *t >= from && *t <= to).collect();
        near.windows(2).map(|w| w[1].duration_since(w[0]).as_secs_f64() * 1e3).fold(0.0, f64::max)
    };
    let mut hops_seen = Vec::new();
    let mut window = Duration::from_millis(450);
    for i in 0..hops {
        // The control: a window as long as the last upgrade's, with no upgrade in it.
        let quiet_from = std::time::Instant::now();
        std::thread::sleep(window);
        let quiet = longest_gap(quiet_from, std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(300));
        let from = std::time::Instant::now() - Duration::from_millis(100);
        let out = cprd.cprctl(&["--json", "upgrade", "q"]);
        assert!(out.status.success(), "upgrade {i}: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(300));
        let to = std::time::Instant::now();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        window = to.duration_since(from);
        let gap = longest_gap(from, to);
        let qmp_ms = qmp_downtime_ms(&cprd, i);
        hops_seen.push((gap, v["downtime_usec"].as_f64().unwrap_or(f64::NAN), qmp_ms, quiet));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = writer.join();
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = reader.join();
    let _ = cprd.cprctl(&["stop", "q"]);
    kill_vmms(&cprd.runtime_dir);
    hops_seen
}

/// `--network-gap`: per RAM size, the network's longest gap around each upgrade, next to cprd's
/// STOP -> RESUME and QEMU's own downtime.
fn network_gap_bench(args: &Args) {
    println!(
        "network gap = longest time between two echoes of a message sent every 1 ms (TCP, from the tap's network namespace), from 100 ms before the upgrade to 300 ms after it returned"
    );
    println!("control = the longest gap in a window as long, with no upgrade in it, just before each upgrade");
    println!();
    println!(
        "| RAM | upgrades | network gap median ms | max ms | control median ms | max ms | cprd STOP->RESUME median ms | QEMU downtime median ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for ram in &args.gap_ram {
        let hops = network_hops(ram, args.hops);
        let gap = summarize(&hops.iter().map(|h| h.0).collect::<Vec<_>>());
        let stop_resume = summarize(&hops.iter().map(|h| h.1 / 1e3).collect::<Vec<_>>());
        let qemu = summarize(&hops.iter().map(|h| h.2).collect::<Vec<_>>());
        let quiet = summarize(&hops.iter().map(|h| h.3).collect::<Vec<_>>());
        println!(
            "| {ram} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} |",
            gap.n, gap.median, gap.max, quiet.median, quiet.max, stop_resume.median, qemu.median
        );
    }
    println!();
    println!(
        "command: target/release/cpr-bench --network-gap --gap-ram {} --hops {}",
        args.gap_ram.join(","),
        args.hops
    );
}

/// Prints how the new side pre-faults guest RAM on this host (probed on a throwaway VM).
fn print_prefault_path() {
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let why = if cpr_vmm::prefault::offered(&kvm) {
        "KVM offers KVM_PRE_FAULT_MEMORY"
    } else {
        "KVM does not offer KVM_PRE_FAULT_MEMORY: a TDP MMU (hardware-assisted KVM) has it, kvm_pvm does not"
    };
    println!("the new side pre-faults with {} on this host ({why})", cpr_vmm::prefault::probe(&kvm).name());
}

/// Prints the floor of this run, its parts and the ioctls one by one.
fn print_floor(floor: &floor::Floor) {
    println!(
        "floor (1 vCPU, this run, medians): {:.0} us = save_vm {:.1} + save_vcpu {:.1} + restore_vm {:.1} + \
         restore_vcpu {:.1} + SEQPACKET round trip {:.1} + stream round trip {:.1} + wake of a parked thread {:.1}",
        floor.total(),
        floor.save_vm,
        floor.save_vcpu,
        floor.restore_vm,
        floor.restore_vcpu,
        floor.seqpacket,
        floor.stream,
        floor.wake
    );
    let parts: Vec<String> = floor.ioctls.iter().map(|(name, us)| format!("{name} {us:.1}")).collect();
    println!("ioctls one by one on the live vCPU (median us): {}", parts.join(", "));
}

/// A tuning of the switchover that `--ab` compares with its absence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Tuning {
    /// Both sides run their switchover code once before the guest stops (`--no-warm-up`).
    WarmUp,
    /// The new VMM spins while it waits for the state (after `Pausing`, with a CPU to spare)
    /// and for the arbiter's `Commit` (`--no-spin`).
    Spin,
    /// The per-vCPU work is spread over the vCPU threads: each old vCPU saves itself as it parks,
    /// and the host's CPUs' worth of new vCPU threads share the restore, whatever the host
    /// (`--vcpu-state-threads spread`, against `serial`).
    Parallel,
    /// This build's cpr-vmm against another build's (`--baseline-vmm`).
    Build,
    /// The arbiter holds the CPUs out of idle states during each handoff (a CPU latency request
    /// of 0 µs; `HandoffRequest::hold_cpu_latency`).
    IdleLatency,
}

impl Tuning {
    /// Handoffs per block with one setting. The warm-up and the spreading are also the old VMM's, so the first
    /// handoff of each of its blocks (an old VMM of the other setting) is not counted.
    fn block(self) -> usize {
        match self {
            Self::WarmUp | Self::Parallel | Self::Build => 10,
            Self::Spin | Self::IdleLatency => 1,
        }
    }

    /// Its name on the command line.
    fn name(self) -> &'static str {
        match self {
            Self::WarmUp => "warm-up",
            Self::Spin => "spin",
            Self::Parallel => "parallel",
            Self::Build => "build",
            Self::IdleLatency => "idle-latency",
        }
    }

    /// The request of a handoff with this tuning.
    fn turn_on(self, req: &mut cpr_handoff::cpr_vmm::HandoffRequest) {
        if self == Self::Parallel {
            req.extra_args.extend(["--vcpu-state-threads".into(), "spread".into()]);
        }
    }

    /// The request of a handoff without this tuning.
    fn turn_off(self, req: &mut cpr_handoff::cpr_vmm::HandoffRequest, args: &Args) {
        match self {
            Self::IdleLatency => req.hold_cpu_latency = false,
            Self::Build => {
                if let Some(path) = &args.baseline_vmm {
                    req.binary.clone_from(path);
                }
            }
            Self::WarmUp => req.extra_args.push("--no-warm-up".into()),
            Self::Spin => req.extra_args.push("--no-spin".into()),
            Self::Parallel => req.extra_args.extend(["--vcpu-state-threads".into(), "serial".into()]),
        }
    }
}

/// The A/B of one tuning: in one chain, handoffs with and without it alternate.
fn tuning_ab(args: &Args, tuning: Tuning) {
    println!(
        "| vCPUs | {} | n | downtime median us | p99 | {} |",
        tuning.name(),
        PHASES.map(|(name, _)| name).join(" | ")
    );
    println!("|---|---|---|---|---|{}", "---|".repeat(PHASES.len()));
    let mut ratios = Vec::new();
    for vcpus in &args.vcpus {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut chain = Chain::start(dir.path(), &["--memory", "256M", "--vcpus", vcpus], &[]);
        let mut reports: [Vec<HandoffReport>; 2] = [Vec::new(), Vec::new()];
        let block_len = tuning.block();
        let counted = if block_len > 1 { block_len - 1 } else { 1 };
        let blocks = args.handoffs.div_ceil(counted) * 2;
        for block in 0..blocks {
            let on = block % 2 == 0;
            for i in 0..block_len {
                let mut req = chain.request();
                if on {
                    tuning.turn_on(&mut req);
                } else {
                    tuning.turn_off(&mut req, args);
                }
                chain.hand_off(&req).unwrap_or_else(|e| panic!("handoff {i} of block {block}: {e}"));
                if i > 0 || block_len == 1 {
                    reports[usize::from(!on)].extend(chain.reports.last().copied());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let mut medians = Vec::new();
        for (variant, reports) in ["yes", "no"].iter().zip(&reports) {
            let downtime: Vec<f64> = reports.iter().map(|r| r.downtime_ns() as f64 / 1000.0).collect();
            let summary = summarize(&downtime);
            let cells: Vec<String> = phase_medians(reports).iter().map(|m| format!("{m:.1}")).collect();
            println!(
                "| {vcpus} | {variant} | {} | {:.0} | {:.0} | {} |",
                summary.n,
                summary.median,
                summary.p99,
                cells.join(" | ")
            );
            medians.push(summary.median);
        }
        ratios.push((vcpus.clone(), medians[0] / medians[1]));
    }
    println!();
    for (vcpus, ratio) in ratios {
        println!("{vcpus} vCPU(s): median with {} / without = {ratio:.2}", tuning.name());
    }
    println!();
    println!(
        "command: target/release/cpr-bench --ab {} --handoffs {} --vcpus {}{}",
        tuning.name(),
        args.handoffs,
        args.vcpus.join(","),
        args.baseline_vmm.as_ref().map(|p| format!(" --baseline-vmm {}", p.display())).unwrap_or_default()
    );
}

/// Where each row's downtime goes: the median of each step, from the handoff reports' stamps.
fn print_phases(rows: &[(String, String, Vec<f64>)]) {
    println!();
    println!("where the downtime goes (median us of each step; the steps' medians need not add up to the row's):");
    println!();
    let names: Vec<&str> = PHASES.iter().map(|(name, _)| *name).collect();
    println!("| RAM | vCPUs | {} |", names.join(" | "));
    println!("|---|---|{}", "---|".repeat(names.len()));
    for (ram, vcpus, medians) in rows {
        let cells: Vec<String> = medians.iter().map(|m| format!("{m:.1}")).collect();
        println!("| {ram} | {vcpus} | {} |", cells.join(" | "));
    }
}

/// Prints each configuration's downtime as a ratio to the floor and to the 1-vCPU median of
/// the same RAM size.
fn print_ratios(measured: &[(String, String, Summary)], floor: f64) {
    println!();
    println!("| RAM | vCPUs | median / floor | p99 / floor | median / 1-vCPU median (same RAM) |");
    println!("|---|---|---|---|---|");
    for (ram, vcpus, host) in measured {
        let one = measured.iter().find(|(r, v, _)| r == ram && v == "1").map_or(f64::NAN, |(_, _, s)| s.median);
        println!(
            "| {ram} | {vcpus} | {:.2} | {:.2} | {:.2} |",
            host.median / floor,
            host.p99 / floor,
            host.median / one
        );
    }
}

/// The two stamps of a report that bound one step of the downtime.
type Span = fn(&HandoffReport) -> (u64, u64);

/// The steps of a handoff's downtime, in order, each with the stamps that bound it.
const PHASES: [(&str, Span); 7] = [
    ("pause", |r| (r.pause_requested_ns, r.paused_ns)),
    ("save + send", |r| (r.paused_ns, r.state_sent_ns)),
    ("receive", |r| (r.state_sent_ns, r.state_received_ns)),
    ("decode + restore", |r| (r.state_received_ns, r.loaded_ns)),
    ("Loaded in transit", |r| (r.loaded_ns, r.loaded_seen_ns)),
    ("arbiter decides", |r| (r.loaded_seen_ns, r.commit_sent_ns)),
    ("Commit to KVM_RUN", |r| (r.commit_sent_ns, r.resumed_ns)),
];

/// Median µs of each of [`PHASES`] over `reports`.
fn phase_medians(reports: &[HandoffReport]) -> Vec<f64> {
    PHASES
        .iter()
        .map(|(_, span)| {
            let values: Vec<f64> =
                reports.iter().map(span).map(|(from, to)| to.saturating_sub(from) as f64 / 1000.0).collect();
            summarize(&values).median
        })
        .collect()
}

/// Handoffs per row in each round of [`downtimes`].
const ROUND: usize = 10;

/// Every row's downtime (host), the guest's longest gap and the steps' medians, `n` handoffs
/// each, measured in interleaved rounds: one chain per row, all started first and paused; in
/// each round every row in turn is resumed, handed over [`ROUND`] times and paused again. The
/// host's drift over the run (these machines are shared) then falls on every row alike, and only
/// one guest runs at a time.
fn downtimes(rows: &[(String, String)], n: usize, tpu: f64) -> Vec<(Summary, Summary, Vec<f64>)> {
    use cpr_proto::control::{Request, Response};
    let dirs: Vec<tempfile::TempDir> = rows.iter().map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let mut chains: Vec<Chain> = rows
        .iter()
        .zip(&dirs)
        .map(|((ram, vcpus), dir)| {
            let chain = Chain::start(dir.path(), &["--memory", ram, "--vcpus", vcpus], &[]);
            assert!(matches!(chain.call(&Request::Pause), Response::Ok), "pause");
            chain
        })
        .collect();
    let mut samples: Vec<(Vec<f64>, Vec<f64>, Vec<HandoffReport>)> =
        rows.iter().map(|_| (Vec::new(), Vec::new(), Vec::new())).collect();
    for round in 0..n.div_ceil(ROUND) {
        for (chain, (host, guest, reports)) in chains.iter_mut().zip(&mut samples) {
            assert!(matches!(chain.call(&Request::Resume), Response::Ok), "resume");
            std::thread::sleep(Duration::from_millis(20));
            for i in 0..ROUND.min(n - round * ROUND) {
                chain.hand_off(&chain.request()).unwrap_or_else(|e| panic!("round {round}, handoff {i}: {e}"));
                let r = chain.reports.last().copied().unwrap_or_default();
                reports.push(r);
                host.push(r.downtime_ns() as f64 / 1000.0);
                std::thread::sleep(Duration::from_millis(5));
                let st = chain.status().test_guest.expect("test guest");
                assert_eq!(st.fail, 0, "guest self-check failed");
                guest.push(st.max_gap_ticks as f64 / tpu);
            }
            assert!(matches!(chain.call(&Request::Pause), Response::Ok), "pause");
        }
    }
    samples.iter().map(|(host, guest, reports)| (summarize(host), summarize(guest), phase_medians(reports))).collect()
}

/// Sweep durations (µs) printed by the guest in touch mode.
fn sweeps(serial: &std::path::Path, tpu: f64) -> Vec<f64> {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |e| &text[..e]);
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("SW "))
        .filter_map(|l| l.split(' ').nth(1))
        .filter_map(|t| u64::from_str_radix(t, 16).ok())
        .map(|t| t as f64 / tpu)
        .collect()
}

/// Post-resume slowdown per re-touched page (µs), with or without pre-faulting on the new side.
fn post_resume(ram: &str, prefault: bool, tpu: f64) -> (f64, f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut chain = Chain::start(dir.path(), &["--memory", ram, "--touch"], &[]);
    assert!(wait_until(Duration::from_secs(120), || sweeps(&chain.serial, tpu).len() >= 4), "guest does not sweep");
    let before = sweeps(&chain.serial, tpu);
    let steady = summarize(&before[1..]).median;
    let mut req = chain.request();
    if !prefault {
        req.extra_args = vec!["--no-prefault".into()];
    }
    chain.hand_off(&req).expect("handoff");
    let k = sweeps(&chain.serial, tpu).len();
    assert!(wait_until(Duration::from_secs(300), || sweeps(&chain.serial, tpu).len() >= k + 2), "no sweeps after");
    let after = sweeps(&chain.serial, tpu);
    let extra = after[k] + after[k + 1] - 2.0 * steady;
    let pages = (cpr_vmm::memory::parse_size(ram).unwrap_or(0) - cpr_testguest::TOUCH_START) / 4096;
    (steady / 1000.0, extra / 1000.0, extra / pages as f64)
}

/// `(downtime µs, wall ms)` of `n` upgrades of `vm` in container `c`, one `cprctl upgrade` each.
fn container_upgrades(c: &cpr_tests::container::Container, vm: &str, n: usize) -> Vec<(f64, f64)> {
    (0..n)
        .map(|_| {
            let t = std::time::Instant::now();
            c.sh(&format!("cprctl upgrade {vm}"));
            let wall_ms = t.elapsed().as_secs_f64() * 1000.0;
            (last_downtime_us(c), wall_ms)
        })
        .collect()
}

/// The downtime of the last entry of cprd's history in `c`, µs.
fn last_downtime_us(c: &cpr_tests::container::Container) -> f64 {
    let history: serde_json::Value = serde_json::from_str(&c.sh("cprctl --json history")).unwrap_or_default();
    let last = history.as_array().and_then(|h| h.last()).cloned().unwrap_or_default();
    assert!(last["ok"] == true, "an upgrade failed: {last}");
    last["downtime_usec"].as_f64().unwrap_or(0.0)
}

/// QEMU 10.0 and 11.1 in a Debian 13 container: see `Args::qemu_versions`.
fn versions_bench(args: &Args) {
    use cpr_tests::linux_guest::{initramfs, kernel, probe_lines};
    let deb = cpr_tests::container::built_package(env!("CARGO_PKG_VERSION"));
    let (kernel, initrd) = (kernel(), initramfs());
    let pkgs = deb.parent().expect("dir").to_path_buf();
    let c = cpr_tests::container::Container::boot_trixie_for_packages(&[&pkgs, &kernel, &initrd], &[]);
    c.sh(&format!("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {}", deb.display()));
    let vms: Vec<String> = (0..args.jump_vms.max(1)).map(|i| format!("v{i}")).collect();
    for vm in &vms {
        c.define_vm(vm, &cpr_tests::linux_guest::vm_definition("128M", ""));
    }
    c.sh(&format!("cprctl reload && for v in {}; do cprctl start $v; done", vms.join(" ")));
    for vm in &vms {
        let booted = wait_until(Duration::from_secs(120), || {
            probe_lines(&std::fs::read_to_string(c.console(vm)).unwrap_or_default()).len() > 3
        });
        assert!(booted, "{vm} did not boot");
    }
    let qemu = |c: &cpr_tests::container::Container| c.sh("dpkg-query -W -f='${Version}' qemu-system-x86");
    let old_release = qemu(&c);
    let same_old = container_upgrades(&c, &vms[0], args.hops);
    let before = c.sh("cprctl --json history").matches("\"ok\"").count();
    let t = std::time::Instant::now();
    c.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -t trixie-backports qemu-system-x86");
    let jump_wall_ms = t.elapsed().as_secs_f64() * 1000.0;
    let new_release = qemu(&c);
    let history: serde_json::Value = serde_json::from_str(&c.sh("cprctl --json history")).unwrap_or_default();
    let jumps: Vec<f64> = history.as_array().map_or(&[][..], Vec::as_slice)[before..]
        .iter()
        .filter(|e| e["ok"] == true)
        .filter_map(|e| e["downtime_usec"].as_f64())
        .collect();
    assert_eq!(jumps.len(), vms.len(), "the jump moved every VM: {history}");
    let fd = container_upgrades(&c, &vms[0], args.hops);
    c.sh(&format!("sed -i '1i cpr_channel = \"path\"' /etc/cprd/vms/{}.toml && cprctl reload", vms[0]));
    let path = container_upgrades(&c, &vms[0], args.hops);
    // cpr-exec on 11.1: a VM started in that mode (its QEMU may exec), the same guest.
    c.sh(&format!(
        "sed -e '1i cpr_mode = \"cpr-exec\"' /etc/cprd/vms/{}.toml > /etc/cprd/vms/x.toml && cprctl reload && cprctl start x",
        vms[1 % vms.len()]
    ));
    let booted = wait_until(Duration::from_secs(120), || {
        probe_lines(&std::fs::read_to_string(c.console("x")).unwrap_or_default()).len() > 3
    });
    assert!(booted, "x did not boot");
    let pid = c.status("x")["main_pid"].clone();
    let exec = container_upgrades(&c, "x", args.hops);
    assert_eq!(c.status("x")["main_pid"], pid, "cpr-exec kept the PID");
    let journal = c.full_journal();
    assert_eq!(journal.matches("(cpr channel: fd)").count(), args.hops + vms.len(), "fd channels as expected");
    println!("QEMU {old_release} -> {new_release} (Debian 13 container, systemd 257, accel=tcg, 128 MiB guests)");
    println!("downtime = cprd's STOP -> RESUME (QMP event timestamps) of each upgrade, from `cprctl --json history`");
    println!("wall = one `cprctl upgrade` call, pre-flight (cached after the first) to the old QEMU gone");
    println!();
    println!("| upgrade | cpr channel | n | downtime median us | p99 | max | wall median ms |");
    println!("|---|---|---|---|---|---|---|");
    let row = |what: &str, channel: &str, s: &[(f64, f64)]| {
        let d = summarize(&s.iter().map(|x| x.0).collect::<Vec<_>>());
        let w = summarize(&s.iter().map(|x| x.1).collect::<Vec<_>>());
        println!("| {what} | {channel} | {} | {:.0} | {:.0} | {:.0} | {:.0} |", d.n, d.median, d.p99, d.max, w.median);
        d.median
    };
    let same = row("10.0 -> 10.0", "path", &same_old);
    let jump = row(
        "10.0 -> 11.1 (apt-get install, every VM)",
        "fd",
        &jumps.iter().map(|d| (*d, jump_wall_ms / jumps.len() as f64)).collect::<Vec<_>>(),
    );
    let by_fd = row("11.1 -> 11.1", "fd", &fd);
    let by_path = row("11.1 -> 11.1", "path", &path);
    let by_exec = row("11.1 -> 11.1 by cpr-exec (same PID)", "none", &exec);
    println!();
    println!("ratio 10.0 -> 11.1 / 10.0 -> 10.0, median downtime: {:.2}", jump / same);
    println!("ratio fd / path channel on 11.1, median downtime: {:.2}", by_fd / by_path);
    println!("ratio cpr-exec / cpr-transfer (fd) on 11.1, median downtime: {:.2}", by_exec / by_fd);
    println!("(the jump's wall time is the whole apt-get install divided by the VMs it moved)");
    c.sh(&format!("for v in {} x; do cprctl stop $v; done", vms.join(" ")));
}

/// cprd's open descriptors, RSS (KiB) and threads, and how many of its children run.
fn cprd_footprint(pid: u32) -> (usize, u64, u64, usize) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let children = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
                .filter(|stat| {
                    // The fields after the command (which may hold spaces): state, then the parent.
                    let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
                    let mut f = after.split_whitespace();
                    let state = f.next().unwrap_or("Z");
                    f.next().and_then(|p| p.parse::<u32>().ok()) == Some(pid) && state != "Z"
                })
                .count()
        })
        .unwrap_or(0);
    (fds, field("VmRSS:"), field("Threads:"), children)
}

/// See `Args::soak`. It never panics once cprd runs (a panic aborts here, and would leave cprd
/// and its VMMs running): a failure ends the soak, says why, and everything is stopped.
fn soak_bench(n: usize) {
    use cpr_tests::daemon::{Cprd, PrivateBus, define_vm, kill_vmms, write_config};
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = PrivateBus::start(dir.path());
    let config = write_config(dir.path(), &["/usr/bin/qemu-system-*"]);
    define_vm(&config, "cv", "memory = \"64M\"\n");
    define_vm(&config, "qv", &cpr_tests::linux_guest::vm_definition("128M", ""));
    let cprd = Cprd::start(dir.path(), &bus, &config);
    if let Err(e) = soak(&cprd, n) {
        println!();
        println!("the soak ended early: {e}");
    }
    for vm in ["cv", "qv"] {
        let _ = cprd.cprctl(&["stop", vm]);
    }
    kill_vmms(&cprd.runtime_dir);
    bus.kill();
}

fn soak(cprd: &cpr_tests::daemon::Cprd, n: usize) -> Result<(), String> {
    let pid = cprd.child.id();
    for vm in ["cv", "qv"] {
        let out = cprd.cprctl(&["start", vm]);
        if !out.status.success() {
            return Err(format!("start {vm}: {}", cpr_tests::daemon::text(&out)));
        }
    }
    let console = cprd.runtime_dir.join("vms/qv.console");
    let booted = wait_until(Duration::from_secs(120), || {
        cpr_tests::linux_guest::probe_lines(&std::fs::read_to_string(&console).unwrap_or_default()).len() > 3
    });
    if !booted {
        return Err("the QEMU guest did not boot".into());
    }
    let downtime = |vm: &str| {
        let out = cprd.cprctl(&["--json", "status", vm]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["last_downtime_usec"].as_f64().unwrap_or(0.0)
    };
    println!("{n} chained upgrades of each VM, one after the other: cv (cpr-vmm, CPL3 test guest on /dev/kvm,");
    println!("64 MiB) and qv (QEMU, accel=tcg, Linux probe guest, 128 MiB); cprd as a child of this bench");
    println!();
    println!(
        "| upgrades | cprd fds | cprd RSS KiB | cprd threads | VMM processes | cv downtime median/p99/max us | qv downtime median/p99/max us |"
    );
    println!("|---|---|---|---|---|---|---|");
    let row = |done: usize, cv: &[f64], qv: &[f64]| {
        let (fds, rss, threads, vmms) = cprd_footprint(pid);
        let fmt = |s: Summary| {
            if s.n == 0 { "-".to_string() } else { format!("{:.0} / {:.0} / {:.0}", s.median, s.p99, s.max) }
        };
        println!("| {done} | {fds} | {rss} | {threads} | {vmms} | {} | {} |", fmt(summarize(cv)), fmt(summarize(qv)));
        (fds, rss, threads, vmms)
    };
    let first = row(0, &[], &[]);
    let mut after_100 = first;
    let (mut cv, mut qv) = (Vec::new(), Vec::new());
    for i in 1..=n {
        for (vm, sample) in [("cv", &mut cv), ("qv", &mut qv)] {
            let out = cprd.cprctl(&["upgrade", vm]);
            if !out.status.success() {
                return Err(format!("upgrade {i} of {vm}: {}", cpr_tests::daemon::text(&out)));
            }
            sample.push(downtime(vm));
        }
        if i % 100 == 0 || i == n {
            let now = row(i, &cv, &qv);
            if i == 100 {
                after_100 = now;
            }
            cv.clear();
            qv.clear();
        }
    }
    let last = cprd_footprint(pid);
    println!();
    println!(
        "fds {} -> {}, threads {} -> {}, VMM processes {} -> {}; RSS after the first 100 upgrades {} KiB, at the \
         end {} KiB ({:+} KiB)",
        first.0,
        last.0,
        first.2,
        last.2,
        first.3,
        last.3,
        after_100.1,
        last.1,
        last.1.cast_signed() - after_100.1.cast_signed()
    );
    Ok(())
}

fn main() {
    let args = Args::parse();
    cpr_tests::require_kvm();
    cpr_tests::container::end_containers_on_panic();
    if let Some(rounds) = args.chaos {
        print_title("Chaos: SIGKILL of an old VMM, a new VMM or cprd during upgrades");
        println!();
        let dir = tempfile::tempdir().expect("tempdir");
        let seed = cpr_tests::chaos::seed();
        let report = cpr_tests::chaos::run(dir.path(), args.chaos_vms, rounds, seed, |line| {
            if line.contains("lost") {
                println!("{line}");
            }
        });
        println!();
        println!("{}", cpr_tests::chaos::render(&report, args.chaos_vms, seed));
        println!();
        println!("command: target/release/cpr-bench --chaos {rounds} --chaos-vms {}", args.chaos_vms);
        return;
    }
    if let Some(n) = args.soak {
        print_title("Soak: chained upgrades through cprd, cprd's footprint");
        println!();
        soak_bench(n);
        return;
    }
    if args.qemu_versions {
        print_title("QEMU across real versions and cpr channel kinds (cprd under systemd, Debian 13)");
        println!();
        versions_bench(&args);
        return;
    }
    if args.systemd {
        print_title("cprd restart benchmark (real systemd 254 in systemd-nspawn)");
        println!();
        systemd_bench(&args, tsc_ticks_per_us());
        return;
    }
    if args.linux {
        print_title("Linux guests on hardware-style KVM: cpr-vmm vs QEMU accel=kvm");
        println!();
        linux_bench(&args);
        return;
    }
    if args.network_gap {
        print_title("The network's view of a QEMU upgrade (TCG guest, e1000 on a tap in a network namespace)");
        println!();
        network_gap_bench(&args);
        return;
    }
    if let Some(tuning) = args.ab {
        if tuning == Tuning::Build && args.baseline_vmm.is_none() {
            eprintln!("cpr-bench: --ab build needs --baseline-vmm PATH (the other build's cpr-vmm)");
            return;
        }
        print_title(&format!(
            "A switchover tuning, {}: with and without, in one chain (256 MiB test guest)",
            tuning.name()
        ));
        println!();
        tuning_ab(&args, tuning);
        return;
    }
    if args.qemu {
        print_title("QEMU cpr-transfer benchmark");
        println!();
        qemu_bench(&args);
        return;
    }
    if args.sandbox_cost {
        print_title("What the VMM's box and seccomp cost: three cprds in one run");
        println!();
        sandbox_bench(&args);
        return;
    }
    if args.daemon {
        print_title("cprd upgrade benchmark");
        println!();
        daemon_bench(&args);
        return;
    }
    let tpu = tsc_ticks_per_us();
    let kvm = if cpr_tests::hardware_kvm() { "hardware-assisted KVM" } else { "kvm_pvm (shadow paging)" };
    print_title("cpr-vmm handoff benchmark");
    println!(
        "host: {} CPUs, /dev/kvm = {kvm}, TSC {:.0} MHz",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        tpu
    );
    let (vcpu_us, sys_us) = ioctl_floor();
    println!("ioctl cost: one vCPU ioctl (KVM_GET_REGS) median {vcpu_us:.2} us, one system ioctl {sys_us:.2} us");
    println!();
    let floor = floor::measure(args.floor_samples);
    print_floor(&floor);
    println!();
    let (one_thread, two_threads) = floor::parallel_saves(args.floor_samples);
    println!(
        "two vCPUs saved {} times each: one thread {one_thread:.1} ms, two threads at once {two_threads:.1} ms \
         (two / one = {:.2}; 0.50 where vCPU ioctls run in parallel)",
        args.floor_samples,
        two_threads / one_thread
    );
    println!();
    if args.floor {
        print_prefault_path();
        return;
    }
    println!(
        "downtime = host CLOCK_MONOTONIC, pause request in the old process -> vCPUs released into KVM_RUN in the new one"
    );
    println!(
        "guest gap = longest gap between two guest loop iterations around the handoff, measured by the guest (rdtsc)"
    );
    println!();
    println!("| RAM | vCPUs | n | downtime min us | median | p99 | max | guest gap median us | p99 | max |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut rows: Vec<(String, String)> = args.ram.iter().map(|r| (r.clone(), "1".to_string())).collect();
    rows.extend(args.vcpus.iter().filter(|v| *v != "1").map(|v| ("1G".to_string(), v.clone())));
    let mut medians = Vec::new();
    let mut measured = Vec::new();
    let mut phases = Vec::new();
    for ((ram, vcpus), (host, guest, phase)) in rows.iter().cloned().zip(downtimes(&rows, args.handoffs, tpu)) {
        phases.push((ram.clone(), vcpus.clone(), phase));
        if vcpus == "1" {
            medians.push((ram.clone(), host.median));
        }
        println!(
            "| {ram} | {vcpus} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            host.n, host.min, host.median, host.p99, host.max, guest.median, guest.p99, guest.max
        );
        measured.push((ram, vcpus, host));
    }
    if let (Some(first), Some(last)) = (medians.first(), medians.last()) {
        println!();
        println!("flatness: median downtime {} / {} = {:.2}", last.0, first.0, last.1 / first.1);
    }
    print_ratios(&measured, floor.total());
    print_phases(&phases);
    println!();
    print_prefault_path();
    println!("| RAM | new side pre-faults | steady sweep ms | extra after resume ms | per re-touched page us |");
    println!("|---|---|---|---|---|");
    for ram in &args.touch_ram {
        for prefault in [false, true] {
            let (steady, extra, per_page) = post_resume(ram, prefault, tpu);
            println!("| {ram} | {} | {steady:.1} | {extra:.1} | {per_page:.2} |", if prefault { "yes" } else { "no" });
        }
    }
}
