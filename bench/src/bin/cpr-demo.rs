//! The demo: a private D-Bus bus and cprd in a temporary directory (no system changes); one VM
//! running the test guest under cpr-vmm on /dev/kvm; ten live upgrades of its VMM through
//! `cprctl upgrade`; `cprctl history`; the downtime. Everything it starts is stopped at the end.

use std::time::Duration;

use cpr_tests::daemon::{Cprd, PrivateBus, define_vm, kill_vmms, write_config};
use cpr_tests::{check_heartbeats, heartbeats, wait_until};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(line) => {
            println!("{line}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            println!("demo: FAILED: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn show(cmd: &str, out: &std::process::Output) -> Result<String, String> {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(format!("{cmd}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(stdout)
}

fn run() -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    println!("starting a private dbus-daemon and cprd in {}", dir.path().display());
    let bus = PrivateBus::start(dir.path());
    let config = write_config(dir.path(), &[]);
    define_vm(&config, "demo", "memory = \"1G\"\nvcpus = 1\nguest = \"test\"\n");
    let cprd = Cprd::start(dir.path(), &bus, &config);
    let result = upgrades(&cprd);
    let _ = cprd.cprctl(&["stop", "demo"]);
    kill_vmms(&cprd.runtime_dir);
    result
}

fn upgrades(cprd: &Cprd) -> Result<String, String> {
    println!("$ cprctl start demo   (the test guest, 1 vCPU, 1 GiB in a memfd cprd owns)");
    show("cprctl start", &cprd.cprctl(&["start", "demo"]))?;
    let console = cprd.runtime_dir.join("vms/demo.console");
    wait_until(Duration::from_secs(10), || heartbeats(&console).len() >= 3);
    for hb in heartbeats(&console).iter().take(3) {
        println!("  guest heartbeat {}: counter {:#x}, checksum {:#x}", hb.seq, hb.counter, hb.pattern_sum);
    }
    print!("$ cprctl list\n{}", show("cprctl list", &cprd.cprctl(&["list"]))?);
    for _ in 0..10 {
        print!("$ cprctl upgrade demo\n{}", show("cprctl upgrade", &cprd.cprctl(&["upgrade", "demo"]))?);
        std::thread::sleep(Duration::from_millis(100));
    }
    print!("$ cprctl history\n{}", show("cprctl history", &cprd.cprctl(&["history"]))?);
    let seq = heartbeats(&console).last().map_or(0, |h| h.seq);
    wait_until(Duration::from_secs(10), || heartbeats(&console).last().map_or(0, |h| h.seq) > seq);
    let hbs = heartbeats(&console);
    check_heartbeats(&hbs).map_err(|e| format!("guest output not continuous: {e}"))?;
    println!("guest: {} heartbeats, numbered 1..{} without a gap, pattern checksum unchanged", hbs.len(), hbs.len());
    let hist = show("cprctl history", &cprd.cprctl(&["--json", "history"]))?;
    let hist: serde_json::Value = serde_json::from_str(&hist).map_err(|e| e.to_string())?;
    let rows = hist.as_array().ok_or("history is not a list")?;
    if rows.len() != 10 || rows.iter().any(|r| r["ok"] != true) {
        return Err(format!("expected 10 successful upgrades, history says {hist}"));
    }
    let downtimes: Vec<f64> = rows.iter().filter_map(|r| r["downtime_usec"].as_f64()).collect();
    let s = cpr_bench::summarize(&downtimes);
    Ok(format!("demo: 10 upgrades ok, downtime median {:.0} us, p99 {:.0} us", s.median, s.p99))
}
