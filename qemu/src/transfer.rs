//! One cpr-transfer handoff, as QEMU's docs/devel/migration/CPR.rst lays it down, driven by
//! cpr-handoff's state machine: the new QEMU is started (by the caller) with the old one's
//! arguments plus [`crate::cmdline::incoming_args`], which include `-S`; once its cpr socket
//! listens, the old QEMU gets `migrate-set-parameters mode=cpr-transfer` and `migrate` with both
//! channels. The old QEMU ends in `postmigrate`, the new one in `paused`: `-S` keeps it from
//! running the guest when the migration completes (QEMU 10.0 and later).
//!
//! The commit point is the arbiter's: once the new QEMU is `paused` with the whole state, the
//! decision is persisted and cprd sends `cont` to the new QEMU. Before it, every failure kills the
//! new QEMU, waits until it is reaped, and only then makes the old one run the guest again
//! (`migrate_cancel` and `cont` as needed; `cont` works from `postmigrate`). After it, the old
//! QEMU is told to quit and is never resumed.

use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use cpr_handoff::{Event as HandoffEvent, HandoffRecord, Journal, Phase, Sides, run};

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
    /// The cpr channel's socket path, as the old QEMU connects to it.
    pub cpr: &'a Path,
    /// Whether the cpr socket was bound and listens before the new QEMU started (an fd-type
    /// cpr channel): then `migrate` goes out at once; else the new QEMU binds it and the
    /// arbiter waits for it to listen.
    pub cpr_listens: bool,
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

/// How a handoff failed, and where the machine left it.
#[derive(Debug)]
pub struct TransferError {
    /// [`Phase::RolledBack`] (the old QEMU runs the guest), [`Phase::NeedsAttention`] (both
    /// were left as they are) or [`Phase::Lost`].
    pub phase: Phase,
    /// What went wrong first, and how it ended.
    pub reason: String,
}

impl std::fmt::Display for TransferError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for TransferError {}

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

/// Both QEMUs of a handoff, as the machine's actions reach them.
struct Live<'a> {
    old: &'a mut Qmp,
    new_child: &'a mut Child,
    new: Option<Qmp>,
    record: HandoffRecord,
    journal: &'a mut dyn Journal,
    timeout: Duration,
    failures: Vec<String>,
    /// The old QEMU's `query-migrate`, read before it is told to quit.
    old_info: Value,
}

impl Live<'_> {
    fn new_failed(&mut self, why: String) -> HandoffEvent {
        let how = exited(self.new_child).map(|s| format!(" (the new QEMU exited: {s})")).unwrap_or_default();
        HandoffEvent::NewFailed(format!("{why}{how}"))
    }

    /// The forward path up to the new QEMU holding the whole state, paused.
    fn forward(
        &mut self,
        new_qmp: &Path,
        (main, cpr, cpr_listens): (&Path, &Path, bool),
        fault: Option<Fault>,
    ) -> HandoffEvent {
        let deadline = Instant::now() + self.timeout;
        let timeout = self.timeout;
        // 1. The new QEMU binds its cpr socket early, then blocks reading it (unless the socket
        //    it was handed listens already).
        while !cpr_listens && !crate::spawn::is_listening(cpr) {
            if let Some(s) = exited(self.new_child) {
                return HandoffEvent::NewFailed(format!(
                    "the new QEMU exited ({s}) before listening for the cpr channel"
                ));
            }
            if Instant::now() > deadline {
                return HandoffEvent::Timeout(format!(
                    "the new QEMU did not listen on its cpr socket within {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        if fault == Some(Fault::KillNewAfterStart) {
            kill(self.new_child);
        }
        // 2. The old QEMU sends its CPR state (fds included), waits for the new one to hang up on
        //    the cpr channel, stops the guest and streams device state over the main channel.
        let _ = self.old.take_events();
        if let Err(e) = self.old.execute("migrate-set-parameters", Some(json!({ "mode": "cpr-transfer" }))) {
            return HandoffEvent::OldFailed(format!("the old QEMU refused mode cpr-transfer: {e}"));
        }
        if let Err(e) = self.old.execute("migrate", Some(crate::cmdline::migrate_channels(main, cpr))) {
            return HandoffEvent::OldFailed(format!("the old QEMU refused migrate: {e}"));
        }
        if let Err(e) = self.persist(&Phase::Switching) {
            return HandoffEvent::JournalFailed(e);
        }
        if fault == Some(Fault::KillNewAfterMigrate) {
            kill(self.new_child);
        }
        // 3. The new QEMU's monitor comes up once it has read the cpr channel. Negotiating now,
        //    while the main channel still streams, lets its RESUME event reach us later.
        let mut new = match Qmp::connect(new_qmp, deadline.saturating_duration_since(Instant::now())) {
            Ok(q) => q,
            Err(e) => return self.new_failed(format!("no QMP from the new QEMU ({e})")),
        };
        // 4. Wait for the new QEMU to hold the whole state: `paused` (with -S it never runs by
        //    itself). The old side's `completed` comes about a millisecond earlier and is not
        //    enough; its failure is watched now and then.
        let mut round = 0u32;
        let event = loop {
            match new.status() {
                Ok(s) if s == "paused" => break HandoffEvent::NewLoaded,
                Ok(s) if s == "running" => break HandoffEvent::NewRunning,
                Ok(_) => {}
                Err(e) => break self.new_failed(format!("query-status on the new QEMU: {e}")),
            }
            round += 1;
            if round.is_multiple_of(16) {
                match migration_status(self.old) {
                    Ok((status, info)) if matches!(status.as_str(), "failed" | "cancelled") => {
                        let why = info.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                        break self.new_failed(format!("migration {status}: {why}"));
                    }
                    Ok(_) => {}
                    Err(e) => break HandoffEvent::OldFailed(format!("query-migrate on the old QEMU: {e}")),
                }
            }
            if Instant::now() > deadline {
                break HandoffEvent::Timeout(format!("the new QEMU did not load the state within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        self.new = Some(new);
        event
    }
}

impl Sides for Live<'_> {
    fn observe(&mut self, event: &HandoffEvent) {
        self.failures.extend(event.failure().map(str::to_string));
    }

    fn persist(&mut self, phase: &Phase) -> Result<(), String> {
        self.record.phase = phase.clone();
        self.journal.write(&self.record)
    }

    fn commit(&mut self) -> HandoffEvent {
        let Some(new) = self.new.as_mut() else {
            return HandoffEvent::NewFailed("no QMP connection to the new QEMU".into());
        };
        match new.execute("cont", None).and_then(|_| new.status()) {
            Ok(s) if s == "running" => HandoffEvent::NewRunning,
            Ok(s) => HandoffEvent::NewFailed(format!("the new QEMU is {s} after cont")),
            Err(e) => HandoffEvent::NewFailed(format!("cont on the new QEMU: {e}")),
        }
    }

    fn kill_new(&mut self) -> HandoffEvent {
        self.new = None;
        let _ = self.new_child.kill();
        match self.new_child.wait() {
            Ok(_) => HandoffEvent::NewDead,
            Err(e) => HandoffEvent::NewNotConfirmedDead(format!("cannot reap the new QEMU: {e}")),
        }
    }

    fn resume_old(&mut self) -> HandoffEvent {
        match resume_old(self.old) {
            Ok(()) => HandoffEvent::OldResumed,
            Err(e) if cpr_handoff::process::is_gone(self.record.old.pid) => {
                self.failures.push(e);
                HandoffEvent::OldGone
            }
            Err(e) => HandoffEvent::OldResumeFailed(format!("the old QEMU did not resume: {e}")),
        }
    }

    fn end_old(&mut self) -> HandoffEvent {
        self.old_info = migration_status(self.old).map(|(_, info)| info).unwrap_or(Value::Null);
        let _ = self.old.execute("quit", None);
        HandoffEvent::OldGone
    }

    fn probe_new(&mut self) -> HandoffEvent {
        probe(&self.record)
    }
}

/// Asks a new QEMU whether it runs the guest of `record`.
fn probe(record: &HandoffRecord) -> HandoffEvent {
    match Qmp::connect(&record.new.control, Duration::from_secs(5)) {
        Ok(mut q) => match q.status() {
            Ok(s) if s == "running" => HandoffEvent::ProbedNewRunning,
            // With -S a new QEMU is `paused` only once the incoming migration has completed.
            Ok(s) if s == "paused" => HandoffEvent::ProbedNewLoaded,
            Ok(s) => HandoffEvent::ProbedNewNotRunning(format!("the new QEMU is {s}")),
            Err(e) => HandoffEvent::ProbedUnreachable(format!("query-status: {e}")),
        },
        Err(e) if cpr_handoff::process::is_gone(record.new.pid) => {
            HandoffEvent::ProbedNewNotRunning(format!("the new QEMU is gone ({e})"))
        }
        Err(e) => HandoffEvent::ProbedUnreachable(format!("QMP: {e}")),
    }
}

/// Carries out one handoff; see the module documentation. `record` has both QEMUs' pids and
/// QMP sockets; it is persisted in `journal` before every step that cannot be undone.
pub fn transfer(t: Transfer<'_>, record: HandoffRecord, journal: &mut dyn Journal) -> Result<Report, TransferError> {
    let Transfer { old, new_child, new_qmp, main, cpr, cpr_listens, timeout, fault } = t;
    let sent = Instant::now();
    let mut live =
        Live { old, new_child, new: None, record, journal, timeout, failures: Vec::new(), old_info: Value::Null };
    let mut phase = Phase::Starting;
    let first = match live.persist(&Phase::Starting) {
        Err(e) => HandoffEvent::JournalFailed(e),
        Ok(()) => {
            let event = live.forward(new_qmp, (main, cpr, cpr_listens), fault);
            if live.record.phase == Phase::Switching {
                phase = cpr_handoff::step(&Phase::Starting, &HandoffEvent::MigrateSent).0;
            }
            event
        }
    };
    let end = run(phase, first, &mut live);
    let reason = live.failures.first().cloned().unwrap_or_default();
    if end != Phase::Done {
        let reason = match &end {
            Phase::RolledBack => format!("{reason} (rolled back: the old QEMU runs the guest)"),
            Phase::NeedsAttention(why) | Phase::Lost(why) => format!("{reason}; {why}"),
            other => format!("{reason}; the handoff stopped at {}", other.name()),
        };
        return Err(TransferError { phase: end, reason });
    }
    let Some(mut new) = live.new.take() else {
        return Err(TransferError { phase: end, reason: "no QMP connection to the new QEMU".into() });
    };
    let migrate_to_running_us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
    let num = |k: &str| live.old_info.get(k).and_then(Value::as_u64).unwrap_or(0);
    let (downtime_ms, total_ms) = (num("downtime"), num("total-time"));
    let stop = live.old.take_events().into_iter().find(|e| e.name == "STOP").map(|e| e.timestamp_us);
    let resume = new.take_events().into_iter().find(|e| e.name == "RESUME").map(|e| e.timestamp_us);
    let stop_to_resume_us = stop.zip(resume).map(|(s, r)| r.saturating_sub(s));
    Ok(Report { new, downtime_ms, total_ms, stop_to_resume_us, migrate_to_running_us })
}

/// Finishes or rolls back a handoff that a dead arbiter left in flight, from its persisted
/// record. The new QEMU is not the caller's child: it is killed and confirmed dead through a
/// pidfd. Returns the phase it ended in.
pub fn recover(record: HandoffRecord, journal: &mut dyn Journal) -> Phase {
    struct Recovered<'a> {
        record: HandoffRecord,
        journal: &'a mut dyn Journal,
    }
    impl Sides for Recovered<'_> {
        fn persist(&mut self, phase: &Phase) -> Result<(), String> {
            self.record.phase = phase.clone();
            self.journal.write(&self.record)
        }
        fn commit(&mut self) -> HandoffEvent {
            let ran = Qmp::connect(&self.record.new.control, Duration::from_secs(5))
                .map_err(|e| e.to_string())
                .and_then(|mut q| q.execute("cont", None).and_then(|_| q.status()).map_err(|e| e.to_string()));
            match ran {
                Ok(s) if s == "running" => HandoffEvent::NewRunning,
                Ok(s) => HandoffEvent::NewFailed(format!("the new QEMU is {s} after cont")),
                Err(e) => HandoffEvent::NewFailed(format!("cont on the new QEMU: {e}")),
            }
        }
        fn kill_new(&mut self) -> HandoffEvent {
            match cpr_handoff::process::kill_and_confirm(self.record.new.pid, Duration::from_secs(10)) {
                Ok(()) => HandoffEvent::NewDead,
                Err(e) => HandoffEvent::NewNotConfirmedDead(e),
            }
        }
        fn resume_old(&mut self) -> HandoffEvent {
            let resumed = Qmp::connect(&self.record.old.control, Duration::from_secs(5))
                .map_err(|e| e.to_string())
                .and_then(|mut q| resume_old(&mut q));
            match resumed {
                Ok(()) => HandoffEvent::OldResumed,
                Err(_) if cpr_handoff::process::is_gone(self.record.old.pid) => HandoffEvent::OldGone,
                Err(e) => HandoffEvent::OldResumeFailed(e),
            }
        }
        fn end_old(&mut self) -> HandoffEvent {
            if let Ok(mut q) = Qmp::connect(&self.record.old.control, Duration::from_secs(5)) {
                let _ = q.execute("quit", None);
            }
            if cpr_handoff::process::is_gone(self.record.old.pid)
                || cpr_handoff::process::kill_and_confirm(self.record.old.pid, Duration::from_secs(10)).is_ok()
            {
                HandoffEvent::OldGone
            } else {
                HandoffEvent::OldFailed("the old QEMU did not quit".into())
            }
        }
        fn probe_new(&mut self) -> HandoffEvent {
            probe(&self.record)
        }
    }
    let phase = record.phase.clone();
    run(phase, HandoffEvent::Restarted, &mut Recovered { record, journal })
}
