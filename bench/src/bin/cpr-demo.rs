//! The demo: boot the test guest under cpr-vmm, upgrade its VMM live ten times, print the downtime.

use std::time::Duration;

use cpr_tests::{Chain, check_heartbeats, heartbeats, wait_until};

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

fn run() -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    println!("booting the test guest under cpr-vmm (1 vCPU, 1 GiB of RAM in a sealed memfd) on /dev/kvm");
    let mut chain = Chain::start(dir.path(), &["--memory", "1G", "--vcpus", "1"], &[]);
    wait_until(Duration::from_secs(10), || heartbeats(&chain.serial).len() >= 3);
    for hb in heartbeats(&chain.serial).iter().take(3) {
        println!("  guest heartbeat {}: counter {:#x}, checksum {:#x}", hb.seq, hb.counter, hb.pattern_sum);
    }
    let mut downtimes = Vec::new();
    for i in 1..=10 {
        let old_pid = chain.current.id();
        chain.hand_off(&chain.request())?;
        let r = *chain.reports.last().ok_or("no report")?;
        let st = chain.status();
        let tg = st.test_guest.ok_or("no guest status")?;
        if tg.fail != 0 {
            return Err(format!("guest self-check failed after upgrade {i}"));
        }
        let us = r.downtime_ns() as f64 / 1000.0;
        downtimes.push(us);
        println!(
            "upgrade {i:2}: VMM pid {old_pid} -> {} (generation {}), downtime {us:.0} us, guest counter {:#x}",
            r.new_pid, st.generation, tg.counter
        );
        if std::env::var_os("CPR_DEMO_BREAKDOWN").is_some() {
            let d = |a: u64, b: u64| b.saturating_sub(a) / 1000;
            println!(
                "    pause {} us, save+send {} us, transfer+decode {} us, restore {} us",
                d(r.pause_requested_ns, r.paused_ns),
                d(r.paused_ns, r.state_sent_ns),
                d(r.state_sent_ns, r.state_received_ns),
                d(r.state_received_ns, r.resumed_ns)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let seq = heartbeats(&chain.serial).last().map_or(0, |h| h.seq);
    wait_until(Duration::from_secs(10), || heartbeats(&chain.serial).last().map_or(0, |h| h.seq) > seq);
    let hbs = heartbeats(&chain.serial);
    check_heartbeats(&hbs).map_err(|e| format!("guest output not continuous: {e}"))?;
    println!("guest: {} heartbeats, numbered 1..{} without a gap, pattern checksum unchanged", hbs.len(), hbs.len());
    let s = cpr_bench::summarize(&downtimes);
    Ok(format!("demo: 10 upgrades ok, downtime median {:.0} us, p99 {:.0} us", s.median, s.p99))
}
