//! A `cpr-exec` handoff (QEMU >= 10.2): the running QEMU stops the guest, saves its device state
//! to a file and execs the new binary in its own process, which loads the file and runs the
//! guest. Same PID, same descriptors, same scope.
//!
//! One process throughout: before the exec the old image runs the guest (an exec that fails
//! leaves it so, and it is resumed), after it the new image does. The exec is the commit, decided
//! by QEMU and taken at once; there is nothing for a successor to arbitrate and no second process
//! to kill or resume, so no handoff record is written: a cprd that dies midway finds the same
//! PID running the guest, whichever image it is. What cpr-exec gives up is the way back: a new
//! image that fails after the exec takes the guest with it.
//!
//! The new binary reaches QEMU as the descriptor cprd checked (`add-fd`), and the command execs
//! `/proc/self/fd/N`: QEMU never looks the binary up by path, so what runs is what was checked.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::qmp::{Qmp, QmpError};

/// One `cpr-exec` handoff to carry out.
#[derive(Debug)]
pub struct ExecTransfer<'a> {
    /// Negotiated QMP connection to the running QEMU.
    pub old: &'a mut Qmp,
    /// Its pid (the new image's too).
    pub pid: u32,
    /// Its QMP socket: the exec'd image listens on the same inherited socket.
    pub control: &'a Path,
    /// The new binary, opened and checked by cprd.
    pub binary: &'a cpr_spawn::Executable,
    /// The VM's arguments, unchanged.
    pub args: &'a [String],
    /// The state file, as the QEMU sees it.
    pub state: &'a Path,
    /// Limit of the whole handoff.
    pub timeout: Duration,
}

/// A completed `cpr-exec` handoff.
#[derive(Debug)]
pub struct ExecReport {
    /// Negotiated QMP connection to the new image, running the guest.
    pub new: Qmp,
    /// The old image's STOP to the new image's RESUME, µs (QEMU's event timestamps; when the
    /// RESUME was missed, to the moment cprd saw the guest running).
    pub stop_to_resume_us: Option<u64>,
}

/// How a `cpr-exec` handoff failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExecError {
    /// No exec happened: the old image runs the guest.
    #[error("{0} (rolled back: the old QEMU image runs the guest)")]
    RolledBack(String),
    /// The exec happened and the process is gone: the guest is lost.
    #[error("{0} (the exec happened and the QEMU process is gone: the guest is lost)")]
    Lost(String),
    /// The exec happened and the new image was not seen running the guest in time.
    #[error("{0} (the exec happened; the new image was not seen running the guest)")]
    Unknown(String),
}

/// Microseconds since the epoch, the clock of QEMU's event timestamps.
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Puts the old image back as it was: the descriptor set gone, the mode normal, the guest
/// running.
fn restore(old: &mut Qmp, fdset: Option<u64>) {
    if let Some(set) = fdset {
        let _ = old.execute("remove-fd", Some(json!({ "fdset-id": set })));
    }
    let _ = old.execute("migrate-set-parameters", Some(json!({ "mode": "normal" })));
    if old.status().is_ok_and(|s| s != "running") {
        let _ = old.execute("cont", None);
    }
}

/// Carries out one `cpr-exec` handoff; see the module documentation.
pub fn cpr_exec(t: ExecTransfer<'_>) -> Result<ExecReport, ExecError> {
    let deadline = Instant::now() + t.timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let added =
        t.old.execute_with_fd("add-fd", Some(json!({ "opaque": "cprd-cpr-exec" })), t.binary.as_fd()).map_err(|e| {
            ExecError::RolledBack(format!("the running QEMU did not take the new binary's descriptor: {e}"))
        })?;
    let (Some(fdset), Some(fd)) =
        (added.get("fdset-id").and_then(Value::as_u64), added.get("fd").and_then(Value::as_u64))
    else {
        return Err(ExecError::RolledBack(format!("add-fd answered {added}")));
    };
    let command = crate::cmdline::exec_command(&format!("/proc/self/fd/{fd}"), t.args, t.state);
    let prepared = t
        .old
        .execute("migrate-set-parameters", Some(json!({ "mode": "cpr-exec" })))
        .and_then(|_| t.old.execute("migrate-set-parameters", Some(json!({ "cpr-exec-command": command }))));
    if let Err(e) = prepared {
        restore(t.old, Some(fdset));
        return Err(ExecError::RolledBack(format!("the running QEMU refused mode cpr-exec: {e}")));
    }
    let _ = t.old.take_events();
    if let Err(e) = t.old.execute("migrate", Some(json!({ "uri": format!("file:{}", t.state.display()) }))) {
        restore(t.old, Some(fdset));
        return Err(ExecError::RolledBack(format!("the running QEMU refused migrate: {e}")));
    }
    // Until the connection ends (the old image is gone: the exec) or the migration fails.
    loop {
        match t.old.execute_timeout("query-migrate", None, left().max(Duration::from_millis(1))) {
            Ok(info) => {
                let status = info.get("status").and_then(Value::as_str).unwrap_or_default().to_string();
                if matches!(status.as_str(), "failed" | "cancelled") {
                    let why = info.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given").to_string();
                    restore(t.old, Some(fdset));
                    return Err(ExecError::RolledBack(format!("cpr-exec {status}: {why}")));
                }
            }
            Err(QmpError::Io(_) | QmpError::Closed) => break,
            Err(e) if Instant::now() >= deadline => {
                // Still the old image (it answers), or did it exec just now?
                match t.old.execute_timeout("migrate_cancel", None, Duration::from_secs(1)) {
                    Err(QmpError::Io(_) | QmpError::Closed) => break,
                    _ => {
                        restore(t.old, Some(fdset));
                        return Err(ExecError::RolledBack(format!("the running QEMU did not exec in time ({e})")));
                    }
                }
            }
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let stop = t.old.take_events().into_iter().find(|e| e.name == "STOP").map(|e| e.timestamp_us);
    let gone = || cpr_handoff::process::is_gone(t.pid);
    // The new image: its monitor on the same listening socket, the guest running once loaded.
    let mut new = loop {
        match Qmp::connect(t.control, left().max(Duration::from_millis(1))) {
            Ok(q) => break q,
            Err(e) if gone() => return Err(ExecError::Lost(format!("the new image exited ({e})"))),
            Err(e) if Instant::now() >= deadline => {
                return Err(ExecError::Unknown(format!("no QMP from the new image within {:?}: {e}", t.timeout)));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    };
    let running_at = loop {
        match new.status() {
            Ok(s) if s == "running" => break now_us(),
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            Ok(s) => {
                return Err(ExecError::Unknown(format!("the new image is {s}, not running, after {:?}", t.timeout)));
            }
            Err(e) if gone() => return Err(ExecError::Lost(format!("the new image exited ({e})"))),
            Err(e) => return Err(ExecError::Unknown(format!("query-status on the new image: {e}"))),
        }
    };
    let resume = new.take_events().into_iter().find(|e| e.name == "RESUME").map_or(running_at, |e| e.timestamp_us);
    Ok(ExecReport { new, stop_to_resume_us: stop.map(|s| resume.saturating_sub(s)) })
}
