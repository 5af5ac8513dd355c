//! A trial handoff between two QEMU binaries, before any running guest is touched.
//!
//! Whether a QEMU can take a guest from another is QEMU's own call, made when it loads the CPR
//! state and the device state: QEMU 10.0, for one, cannot read the CPR state of QEMU 11.1 and
//! exits with `vmstate_load_state error -2`, after the old QEMU has paused its guest. So before a
//! handoff between two different builds, cprd hands a throw-away VM from the old binary to the
//! new one the same way: the VM's machine type, accelerator and CPU model, 16 MiB of RAM and no
//! devices, started with `-S` and never run. If the new QEMU does not end up holding it
//! `paused`, the upgrade is refused with what the new QEMU said. It covers the CPR state and the
//! machine's and CPU's device state, not the state of the VM's own cards and disks.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::qmp::Qmp;
use crate::spawn::Questioned;

/// What the throw-away VM is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrialVm {
    /// Versioned machine type.
    pub machine: String,
    /// Accelerator (`kvm`, `tcg`).
    pub accel: String,
    /// CPU model (`None`: QEMU's default for the accelerator, as the VM's own command line).
    pub cpu: Option<String>,
}

impl TrialVm {
    /// The command line both sides share.
    fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "-machine",
            &format!("{},accel={},aux-ram-share=on,memory-backend=trial-ram", self.machine, self.accel),
            "-object",
            "memory-backend-memfd,id=trial-ram,size=16M,share=on",
            "-m",
            "16M",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        a.extend(crate::spawn::question_args());
        if let Some(cpu) = &self.cpu {
            a.extend(["-cpu".to_string(), cpu.clone()]);
        }
        a
    }
}

/// Where the trial's two channels meet: a directory as cprd sees it, and as the QEMUs (in
/// their box) see it.
#[derive(Debug, Clone)]
pub struct Meeting {
    /// The directory on the host.
    pub host: PathBuf,
    /// The same directory inside the QEMUs' box (equal to `host` without one).
    pub inside: PathBuf,
}

/// What `side` printed last, for an error message.
fn said(side: &Questioned) -> String {
    side.last_line().unwrap_or_else(|| "nothing".into())
}

/// Hands a throw-away VM from `old` to `new` with cpr-transfer (see the module's comment);
/// `Err` carries why the new QEMU did not take it. Both run in `sandbox` when given and their
/// channels meet in `meeting` (writable by them); what they print goes to files in `scratch`,
/// which cprd opens for them.
pub fn trial(
    old: &cpr_spawn::Executable,
    new: &cpr_spawn::Executable,
    vm: &TrialVm,
    meeting: &Meeting,
    scratch: &Path,
    sandbox: Option<&cpr_spawn::Sandbox>,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let id = format!("{}-{}", std::process::id(), crate::transfer::unique());
    let (main, cpr) =
        (meeting.inside.join(format!("trial-{id}-main.sock")), meeting.inside.join(format!("trial-{id}-cpr.sock")));
    let cleanup =
        [meeting.host.join(format!("trial-{id}-main.sock")), meeting.host.join(format!("trial-{id}-cpr.sock"))];
    let result = (|| {
        let args = vm.args();
        let (source, qmp) = Questioned::start(old, &args, scratch.join(format!("trial-{id}-old.log")), sandbox)?;
        let mut source_qmp = Qmp::negotiate(qmp, left())
            .map_err(|e| format!("the running QEMU's binary did not start a trial VM: {e} ({})", said(&source)))?;
        source_qmp.execute("cont", None).map_err(|e| format!("cont on the trial VM: {e}"))?;
        let mut incoming = args.clone();
        incoming.extend(crate::cmdline::incoming_args(&main, crate::cmdline::CprChannel::Path(&cpr)));
        let (mut target, qmp) =
            Questioned::start(new, &incoming, scratch.join(format!("trial-{id}-new.log")), sandbox)?;
        while !crate::spawn::is_listening(&cpr) {
            if let Some(status) = target.exited() {
                return Err(format!("it exited ({status}) before listening for the cpr channel: {}", said(&target)));
            }
            if Instant::now() > deadline {
                return Err(format!("it did not listen for the cpr channel within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        source_qmp
            .execute("migrate-set-parameters", Some(json!({ "mode": "cpr-transfer" })))
            .map_err(|e| format!("the running QEMU's binary refused mode cpr-transfer: {e}"))?;
        source_qmp
            .execute("migrate", Some(crate::cmdline::migrate_channels(&main, &cpr)))
            .map_err(|e| format!("the running QEMU's binary refused migrate: {e}"))?;
        // The new QEMU's monitor comes up once it has read the CPR state.
        let mut target_qmp = match Qmp::negotiate(qmp, left()) {
            Ok(q) => q,
            Err(e) => {
                target.wait_exit(Duration::from_secs(1));
                return Err(format!("it did not take the CPR state ({e}): {}", said(&target)));
            }
        };
        loop {
            match target_qmp.status() {
                Ok(s) if s == "paused" => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(format!("it did not take the state ({e}): {}", said(&target))),
            }
            if let Ok(info) = source_qmp.execute("query-migrate", None) {
                let status = info.get("status").and_then(Value::as_str).unwrap_or_default();
                if matches!(status, "failed" | "cancelled") {
                    let why = info.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                    return Err(format!("the migration {status}: {why}; it said: {}", said(&target)));
                }
            }
            if Instant::now() > deadline {
                return Err(format!("it did not load the state within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    })();
    for path in cleanup {
        let _ = std::fs::remove_file(path);
    }
    result
}
