//! The chaos run: rounds of `cprctl upgrade --all` during which one process is killed with
//! SIGKILL at a random moment 0–5 ms after the upgrade started: in turn an old VMM, a new VMM
//! (each of a VM picked at random) and cprd itself, which is then restarted. After each round
//! every guest is checked: its VMM alive, its counter advancing, its self-check clean.
//!
//! A guest may be lost only when the process killed was the VMM running it at that moment: the
//! old VMM before the commit, the new VMM after it. Every other loss is cprd's fault, counted as
//! a defect. So is a VM left with two live VMMs (the old one still alive after a commit).
//! Used by `tests/tests/chaos.rs` (a short run in CI) and `cpr-bench --chaos N` (the long run).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::daemon::{Cprd, PrivateBus, define_vm, kill_vmms, test_guest_counter, text, vmm_control, write_config};
use crate::wait_until;

/// Which process a round kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// The VMM running a VM when the round began.
    OldVmm,
    /// The VMM a VM's handoff started.
    NewVmm,
    /// cprd.
    Cprd,
}

impl Target {
    /// The target's name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::OldVmm => "old VMM",
            Self::NewVmm => "new VMM",
            Self::Cprd => "cprd",
        }
    }
}

/// A guest that did not survive a round.
#[derive(Debug, Clone)]
pub struct Loss {
    /// The round.
    pub round: usize,
    /// The VM.
    pub vm: String,
    /// What was killed in that round.
    pub killed: Target,
    /// Why it counts as allowed or as a defect.
    pub why: String,
}

/// What a chaos run saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Rounds run.
    pub rounds: usize,
    /// Kills per target.
    pub kills: BTreeMap<Target, usize>,
    /// Rounds whose target had no process to kill when its moment came (a new VMM that was
    /// already gone or not yet started).
    pub missed: usize,
    /// Guest-rounds checked alive.
    pub alive: usize,
    /// Guests lost because the VMM running them was the one killed.
    pub lost_allowed: Vec<Loss>,
    /// Guests lost otherwise, and VMs left with two VMMs: cprd's fault.
    pub defects: Vec<Loss>,
}

/// The seed of a run: `CPRD_CHAOS_SEED` when set (to replay a run), else the clock's.
pub fn seed() -> u64 {
    std::env::var("CPRD_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() ^ u64::from(d.subsec_nanos()) << 20)
    })
}

/// A small xorshift generator: reproducible from the seed the run prints.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced, xorshift needs a non-zero state).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next number below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// A VM as the round sees it, from cprd (`cprctl --json status`).
fn status(cprd: &Cprd, vm: &str) -> serde_json::Value {
    let out = cprd.cprctl(&["--json", "status", vm]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// How many upgrades of `vm` cprd's history lists as committed (`ok`).
fn committed_upgrades(cprd: &Cprd, vm: &str) -> usize {
    let out = cprd.cprctl(&["--json", "history"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    rows.iter().filter(|r| r["vm"] == vm && r["ok"] == true).count()
}

fn pid_of(v: &serde_json::Value) -> u32 {
    v["main_pid"].as_u64().and_then(|p| u32::try_from(p).ok()).unwrap_or(0)
}

/// The pid of the new VMM of `vm`'s handoff in progress, from cprd's handoff record.
fn new_vmm_pid(runtime_dir: &Path, vm: &str) -> u32 {
    let record = runtime_dir.join("vms").join(format!("{vm}.handoff"));
    let v: serde_json::Value =
        std::fs::read(&record).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    v["new"]["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).unwrap_or(0)
}

/// Whether `vm`'s guest runs: cprd says running, its VMM's counter advances, no self-check
/// failure. Returns why not.
fn guest_alive(cprd: &Cprd, vm: &str) -> Result<(), String> {
    let st = status(cprd, vm);
    if st["state"] != "running" {
        return Err(format!("cprd says {} ({})", st["state"], st["state_reason"]));
    }
    let Some(control) = vmm_control(&cprd.runtime_dir, vm) else {
        return Err("cprd has no runtime record of it".into());
    };
    let Some((first, fail)) = test_guest_counter(&control) else {
        return Err(format!("its VMM does not answer on {}", control.display()));
    };
    if fail != 0 {
        return Err(format!("the guest's self-check failed with code {fail}"));
    }
    let mut last = first;
    if !wait_until(Duration::from_secs(10), || {
        last = test_guest_counter(&control).map_or(last, |(c, _)| c);
        last > first
    }) {
        return Err(format!("its counter stays at {first}"));
    }
    Ok(())
}

/// Runs `rounds` chaos rounds on `vms` CPL3 test-guest VMs under a cprd of its own in `dir`,
/// printing a line per round through `say`; the seed makes a run reproducible.
pub fn run(dir: &Path, vms: usize, rounds: usize, seed: u64, mut say: impl FnMut(&str)) -> Report {
    let bus = PrivateBus::start(dir);
    let config = write_config(dir, &[]);
    // Short handoff steps: a killed peer is noticed in time for the next round.
    std::fs::create_dir_all(config.join("config.d")).expect("config.d");
    std::fs::write(config.join("config.d/50-chaos.toml"), "[handoff]\ntimeout_ms = 3000\n").expect("fragment");
    let names: Vec<String> = (0..vms).map(|i| format!("chaos{i}")).collect();
    for name in &names {
        define_vm(&config, name, "memory = \"64M\"\nvcpus = 1\n");
    }
    let mut cprd = Cprd::start(dir, &bus, &config);
    for name in &names {
        let out = cprd.cprctl(&["start", name]);
        assert!(out.status.success(), "start {name}: {}", text(&out));
    }
    let mut rng = Rng::new(seed);
    let mut report = Report { rounds, ..Report::default() };
    for round in 1..=rounds {
        let before: BTreeMap<&str, serde_json::Value> = names.iter().map(|n| (n.as_str(), status(&cprd, n))).collect();
        let committed_before: BTreeMap<&str, usize> =
            names.iter().map(|n| (n.as_str(), committed_upgrades(&cprd, n))).collect();
        // The targets take turns (each gets a third of the rounds); the VM and the moment are random.
        let target = [Target::OldVmm, Target::NewVmm, Target::Cprd][(round - 1) % 3];
        let victim = names[usize::try_from(rng.below(names.len() as u64)).unwrap_or(0)].as_str();
        let delay = Duration::from_micros(rng.below(5001));
        let mut upgrade = cprd
            .cprctl_command(&["upgrade", "--all"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("cprctl upgrade --all");
        let started = Instant::now();
        std::thread::sleep(delay);
        let killed_pid = match target {
            Target::OldVmm => pid_of(&before[victim]),
            Target::NewVmm => {
                // The new VMM exists only from its spawn on: wait for it (a little), else miss.
                let mut pid = 0;
                wait_until(Duration::from_millis(500), || {
                    pid = new_vmm_pid(&cprd.runtime_dir, victim);
                    pid != 0 && pid != pid_of(&before[victim])
                });
                pid
            }
            Target::Cprd => cprd.child.id(),
        };
        let at = started.elapsed();
        let hit = match target {
            Target::Cprd => {
                cprd.kill9();
                true
            }
            _ if killed_pid != 0 => {
                let pid = nix::unistd::Pid::from_raw(killed_pid.cast_signed());
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok()
            }
            _ => false,
        };
        if hit {
            *report.kills.entry(target).or_default() += 1;
        } else {
            report.missed += 1;
        }
        let _ = wait_until(Duration::from_secs(60), || upgrade.try_wait().ok().flatten().is_some());
        let _ = upgrade.kill();
        let _ = upgrade.wait();
        if target == Target::Cprd {
            cprd = Cprd::start(dir, &bus, &config);
        }
        // Settled: nothing upgrading or starting.
        wait_until(Duration::from_secs(30), || {
            let out = cprd.cprctl(&["--json", "list"]);
            let t = String::from_utf8_lossy(&out.stdout);
            out.status.success() && !t.contains("\"upgrading\"") && !t.contains("\"starting\"")
        });
        let mut line = format!(
            "round {round}: killed {} of {victim} (pid {killed_pid}) at {} us{}",
            target.name(),
            at.as_micros(),
            if hit { "" } else { " (missed: no such process)" }
        );
        for name in &names {
            let was = &before[name.as_str()];
            let now = status(&cprd, name);
            let committed = now["generation"].as_u64() > was["generation"].as_u64();
            // Two VMMs: the old one still alive after its guest moved on.
            let old_pid = pid_of(was);
            if committed
                && old_pid != pid_of(&now)
                // (it exits at nice 19, its handoff weight: its teardown may take a while)
                && !wait_until(Duration::from_secs(30), || crate::process_gone(old_pid))
            {
                report.defects.push(Loss {
                    round,
                    vm: name.clone(),
                    killed: target,
                    why: format!("its old VMM {old_pid} still runs after the commit"),
                });
            }
            match guest_alive(&cprd, name) {
                Ok(()) => report.alive += 1,
                Err(why) => {
                    let ours = hit && name == victim && target != Target::Cprd;
                    // Which VMM ran the guest when it was killed: the new one once cprd's
                    // history has this round's upgrade of the VM as committed (a lost VM's
                    // record, and with it its generation, is gone).
                    let handed_over = committed_upgrades(&cprd, name) > committed_before[name.as_str()];
                    let ran_it = match target {
                        Target::OldVmm => !handed_over,
                        Target::NewVmm => handed_over,
                        Target::Cprd => false,
                    };
                    let loss = Loss { round, vm: name.clone(), killed: target, why: why.clone() };
                    line.push_str(&format!("; {name} lost: {why}"));
                    if ours && ran_it {
                        report.lost_allowed.push(loss);
                    } else {
                        report.defects.push(loss);
                    }
                    // Back to a running guest for the next round.
                    let _ = cprd.cprctl(&["stop", "--force", name]);
                    let _ = cprd.cprctl(&["stop", name]);
                    let out = cprd.cprctl(&["start", name]);
                    if !out.status.success() {
                        line.push_str(&format!(" (restart failed: {})", text(&out).replace('\n', " ")));
                    }
                }
            }
        }
        say(&line);
    }
    for name in &names {
        let _ = cprd.cprctl(&["stop", name]);
    }
    kill_vmms(&cprd.runtime_dir);
    drop(cprd);
    bus.kill();
    report
}

/// The report as a Markdown table plus the losses, for the test's output and the benchmark.
pub fn render(report: &Report, vms: usize, seed: u64) -> String {
    let mut out = format!(
        "{} rounds of `cprctl upgrade --all` of {vms} VMs (seed {seed}): {} guest-rounds alive, {} missed kills\n\n",
        report.rounds, report.alive, report.missed
    );
    out.push_str("| killed | times | guests lost, allowed (it ran the guest) | guests lost by cprd's fault |\n|---|---|---|---|\n");
    for target in [Target::OldVmm, Target::NewVmm, Target::Cprd] {
        let count = |v: &[Loss]| v.iter().filter(|l| l.killed == target).count();
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            target.name(),
            report.kills.get(&target).copied().unwrap_or(0),
            count(&report.lost_allowed),
            count(&report.defects)
        ));
    }
    for (kind, list) in [("allowed", &report.lost_allowed), ("DEFECT", &report.defects)] {
        for l in list {
            out.push_str(&format!("\n- {kind}: round {} {} ({} killed): {}", l.round, l.vm, l.killed.name(), l.why));
        }
    }
    out
}
