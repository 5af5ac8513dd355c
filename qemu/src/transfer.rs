//! One cpr-transfer handoff, as QEMU's docs/devel/migration/CPR.rst lays it down: the new
//! QEMU is started (by the caller) with the old one's arguments plus [`crate::cmdline::incoming_args`];
//! once its cpr socket listens, the old QEMU gets `migrate-set-parameters mode=cpr-transfer`
//! and `migrate` with both channels, before any monitor command goes to the new QEMU. The old
//! QEMU ends in `postmigrate`, the new one resumes the guest by itself.
//!
//! The commit point is the new QEMU reporting `running`. Before it, every failure (the new
//! QEMU dies, times out, or QEMU refuses) ends with the new QEMU killed and the old one running
//! the guest again (`migrate_cancel` and `cont` as needed).

use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::qmp::Qmp;

/// A process-unique number for scratch names.
pub fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Faults a test can inject at points no real crash can be aimed at. The kills are real
/// SIGKILLs of the real new QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Kill the new QEMU as soon as its cpr socket listens, before `migrate`.
    KillNewAfterStart,
    /// Kill the new QEMU right after `migrate` was accepted by the old one.
    KillNewAfterMigrate,
}

/// One handoff to carry out.
#[derive(Debug)]
pub struct Transfer<'a> {
    /// Negotiated QMP connection to the running QEMU.
    pub old: &'a mut Qmp,
    /// The new QEMU, just started with the incoming options.
    pub new_child: &'a mut Child,
    /// The new QEMU's QMP listening socket.
    pub new_qmp: &'a Path,
    /// The main migration channel's socket path (bound by the new QEMU).
    pub main: &'a Path,
    /// The cpr channel's socket path (bound by the new QEMU).
    pub cpr: &'a Path,
    /// Limit of each wait.
    pub timeout: Duration,
    /// Injected fault, for tests.
    pub fault: Option<Fault>,
}

/// A completed handoff.
#[derive(Debug)]
pub struct Report {
    /// Negotiated QMP connection to the new QEMU, now running the guest.
    pub new: Qmp,
    /// QEMU's own downtime figure (`query-migrate`), ms.
    pub downtime_ms: u64,
    /// QEMU's total migration time, ms.
    pub total_ms: u64,
    /// Old QEMU's STOP event to the new one's RESUME event, µs (when both were seen).
    pub stop_to_resume_us: Option<u64>,
    /// From `migrate` sent to the new QEMU seen running, µs (host clock).
    pub migrate_to_running_us: u64,
}

/// How a handoff failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The old QEMU runs the guest again; the new one is gone.
    #[error("{0}")]
    RolledBack(String),
    /// The old QEMU could not be made to run the guest again.
    #[error("{0}")]
    RollbackFailed(String),
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn exited(child: &mut Child) -> Option<String> {
    child.try_wait().ok().flatten().map(|s| s.to_string())
}

fn migration_status(qmp: &mut Qmp) -> Result<(String, Value), String> {
    let info = qmp.execute("query-migrate", None).map_err(|e| e.to_string())?;
    let status = info.get("status").and_then(Value::as_str).unwrap_or("none").to_string();
    Ok((status, info))
}

/// Makes the old QEMU run the guest again after a failed handoff.
pub fn resume_old(old: &mut Qmp) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut cancelled = false;
    loop {
        let (status, _) = migration_status(old)?;
        if !matches!(status.as_str(), "setup" | "active" | "device" | "wait-unplug" | "pre-switchover" | "cancelling") {
            break;
        }
        if !cancelled {
            let _ = old.execute("migrate_cancel", None);
            cancelled = true;
        }
        if Instant::now() > deadline {
            return Err(format!("the old QEMU's migration stays {status} after migrate_cancel"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let state = old.status().map_err(|e| e.to_string())?;
    if state != "running" {
        old.execute("cont", None).map_err(|e| format!("cont on the old QEMU ({state}): {e}"))?;
    }
    match old.status() {
        Ok(s) if s == "running" => Ok(()),
        Ok(s) => Err(format!("the old QEMU is {s} after cont")),
        Err(e) => Err(e.to_string()),
    }
}

/// Carries out one handoff; see the module documentation.
pub fn transfer(t: Transfer<'_>) -> Result<Report, TransferError> {
    let Transfer { old, new_child, new_qmp, main, cpr, timeout, fault } = t;
    let deadline = Instant::now() + timeout;
    let fail = |old: &mut Qmp, new_child: &mut Child, why: String| -> TransferError {
        kill(new_child);
        match resume_old(old) {
            Ok(()) => TransferError::RolledBack(why),
            Err(e) => TransferError::RollbackFailed(format!("{why}; then the old QEMU did not resume: {e}")),
        }
    };
    // 1. The new QEMU binds its cpr socket early, then blocks reading it.
    while !crate::spawn::is_listening(cpr) {
        if let Some(s) = exited(new_child) {
            return Err(fail(
                old,
                new_child,
                format!("the new QEMU exited ({s}) before listening for the cpr channel"),
            ));
        }
        if Instant::now() > deadline {
            return Err(fail(
                old,
                new_child,
                format!("the new QEMU did not listen on its cpr socket within {timeout:?}"),
            ));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    if fault == Some(Fault::KillNewAfterStart) {
        kill(new_child);
    }
    // 2. The old QEMU sends its CPR state (fds included), waits for the new one to hang up on
    //    the cpr channel, stops the guest and streams device state over the main channel.
    let _ = old.take_events();
    if let Err(e) = old.execute("migrate-set-parameters", Some(json!({ "mode": "cpr-transfer" }))) {
        return Err(fail(old, new_child, format!("the old QEMU refused mode cpr-transfer: {e}")));
    }
    let sent = Instant::now();
    if let Err(e) = old.execute("migrate", Some(crate::cmdline::migrate_channels(main, cpr))) {
        return Err(fail(old, new_child, format!("the old QEMU refused migrate: {e}")));
    }
    if fault == Some(Fault::KillNewAfterMigrate) {
        kill(new_child);
    }
    // 3. The new QEMU's monitor comes up once it has read the cpr channel. Negotiating now, while
    //    the main channel still streams, lets its RESUME event (with QEMU's timestamp) reach us.
    let mut new = match Qmp::connect(new_qmp, deadline.saturating_duration_since(Instant::now())) {
        Ok(q) => q,
        Err(e) => {
            let how = exited(new_child).map(|s| format!(", it exited: {s}")).unwrap_or_default();
            return Err(fail(old, new_child, format!("no QMP from the new QEMU ({e}{how})")));
        }
    };
    // 4. Wait for the old side to finish.
    let info = loop {
        let (status, info) = match migration_status(old) {
            Ok(x) => x,
            Err(e) => return Err(fail(old, new_child, format!("query-migrate on the old QEMU: {e}"))),
        };
        match status.as_str() {
            "completed" => break info,
            "failed" | "cancelled" => {
                let why = info.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given").to_string();
                let how = exited(new_child).map(|s| format!(" (the new QEMU exited: {s})")).unwrap_or_default();
                return Err(fail(old, new_child, format!("migration {status}: {why}{how}")));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(fail(old, new_child, format!("migration still {status} after {timeout:?}")));
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    // 5. The new QEMU resumes the guest by itself when the migration completes.
    loop {
        match new.status() {
            Ok(s) if s == "running" => break,
            Ok(_) => {}
            Err(e) => {
                let how = exited(new_child).map(|s| format!(", it exited: {s}")).unwrap_or_default();
                return Err(fail(old, new_child, format!("query-status on the new QEMU: {e}{how}")));
            }
        }
        if Instant::now() > deadline {
            return Err(fail(old, new_child, format!("the new QEMU did not run the guest within {timeout:?}")));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let migrate_to_running_us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
    let num = |k: &str| info.get(k).and_then(Value::as_u64).unwrap_or(0);
    let (downtime_ms, total_ms) = (num("downtime"), num("total-time"));
    let stop = old.take_events().into_iter().find(|e| e.name == "STOP").map(|e| e.timestamp_us);
    let resume = new.take_events().into_iter().find(|e| e.name == "RESUME").map(|e| e.timestamp_us);
    let stop_to_resume_us = stop.zip(resume).map(|(s, r)| r.saturating_sub(s));
    Ok(Report { new, downtime_ms, total_ms, stop_to_resume_us, migrate_to_running_us })
}
