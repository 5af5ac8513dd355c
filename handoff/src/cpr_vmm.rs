//! The arbiter of a handoff between two cpr-vmm processes, driving [`crate::machine`].
//!
//! It creates the three channels (`cpr` between the VMMs, `main` for the state, `commit` between
//! itself and the new VMM), starts the new VMM with its ends at fds 3, 4 and 5, tells the old VMM
//! to migrate, and waits for the new VMM's `Loaded`. Then it decides: the decision is persisted
//! (for cprd, in its journal), `Commit` goes to the new VMM, which only then runs the guest, and
//! the old VMM is told to quit. Any failure before the decision kills the new VMM, confirms it
//! dead, and resumes the old one.

use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

use cpr_proto::client::ControlClient;
use cpr_proto::control::{HandoffReport, MigrateParams, Request, Response, RunState};
use cpr_proto::cpr::{FromArbiter, ToArbiter};
use cpr_proto::wire::{self, WireError};

use crate::machine::{Event, Phase, Sides, run, step};
use crate::process;
use crate::{HandoffRecord, Journal, VmmRef};

/// Fd number of the cpr channel in the new VMM.
pub const CPR_FD: i32 = 3;
/// Fd number of the main channel in the new VMM.
pub const MAIN_FD: i32 = 4;
/// Fd number of the commit channel in the new VMM.
pub const COMMIT_FD: i32 = 5;
/// Fd number of a boxed new VMM's control listener (bound by the arbiter).
pub const CONTROL_FD: i32 = 6;
/// Fd number of `/dev/kvm` in a boxed new VMM (opened by the arbiter).
pub const KVM_FD: i32 = 7;

/// How long a killed VMM may take to be confirmed dead.
const KILL_CONFIRM: Duration = Duration::from_secs(10);

/// After the commit, how long the old VMM has to answer (its `migrate` report, then `Quit`)
/// before it is killed. Not the handoff timeout: the guest runs in the new VMM by then, the old
/// one only exits, at the lowest weight (nice 19), and on a loaded host it may not run for
/// seconds. The caller's reply must not wait for that (a `cprctl upgrade` once took 15 s, the
/// test configuration's handoff timeout, to return after a 66 ms handoff).
pub const OLD_VMM_ANSWER_GRACE: Duration = Duration::from_secs(1);

/// One handoff to perform.
#[derive(Debug, Clone)]
pub struct HandoffRequest {
    /// The VM's name (for the handoff record).
    pub vm: String,
    /// Control socket of the running (old) VMM.
    pub old_control: PathBuf,
    /// The old VMM's pid, if the caller knows it (else it is asked).
    pub old_pid: Option<u32>,
    /// Control socket the new VMM will listen on.
    pub new_control: PathBuf,
    /// The new VMM binary.
    pub binary: PathBuf,
    /// The new VMM binary opened and checked (cprd's allow-list): run as that open file instead
    /// of by `binary`'s path, so that what runs is what was checked.
    pub executable: Option<cpr_spawn::Executable>,
    /// Timeout of each wait on a VMM, in milliseconds.
    pub timeout_ms: u64,
    /// Extra environment for the new VMM (fault injection in tests).
    pub env: Vec<(String, String)>,
    /// Where the new VMM's stderr goes (inherited when `None`).
    pub stderr: Option<PathBuf>,
    /// Extra arguments for the new VMM.
    pub extra_args: Vec<String>,
    /// Told the new VMM's pid as soon as it is started (tests use it to inject faults).
    pub spawned: Option<std::sync::mpsc::Sender<u32>>,
    /// Start the new VMM in a session of its own, so that signals to the caller's process
    /// group (a daemon being stopped) never reach it.
    pub new_session: bool,
    /// Bind the new VMM's control socket and open `/dev/kvm` here and hand both over
    /// (`--control-fd`, `--kvm-fd`) instead of letting it bind and open them by path.
    pub hand_over_fds: bool,
    /// Run the new VMM in this box (implies `hand_over_fds`: the box lets it reach neither).
    pub sandbox: Option<cpr_spawn::Sandbox>,
    /// More descriptors for the new VMM, at these numbers (above [`KVM_FD`]); their arguments,
    /// if any, go in `extra_args`.
    pub extra_fds: Vec<(RawFd, std::sync::Arc<OwnedFd>)>,
    /// Hold the CPUs out of idle states while the handoff runs
    /// ([`cpr_spawn::sched::CpuLatencyHold`]; on by default, off only to measure it).
    pub hold_cpu_latency: bool,
}

impl HandoffRequest {
    /// A request with defaults: 5 s timeouts, inherited stderr, no extras.
    pub fn new(old_control: PathBuf, new_control: PathBuf, binary: PathBuf) -> Self {
        Self {
            vm: String::new(),
            old_control,
            old_pid: None,
            new_control,
            binary,
            executable: None,
            timeout_ms: 5000,
            env: Vec::new(),
            stderr: None,
            extra_args: Vec::new(),
            spawned: None,
            new_session: false,
            hand_over_fds: false,
            sandbox: None,
            extra_fds: Vec::new(),
            hold_cpu_latency: true,
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(1))
    }
}

/// A completed handoff: the new VMM runs the guest, the old one was ended.
#[derive(Debug)]
pub struct HandoffOutcome {
    /// Timings, from both sides.
    pub report: HandoffReport,
    /// The new VMM process (a child of the caller).
    pub child: Child,
}

/// A handoff that did not complete, and where it ended.
#[derive(Debug)]
pub struct HandoffFailure {
    /// [`Phase::RolledBack`] (the old VMM runs the guest), [`Phase::NeedsAttention`] (both VMMs
    /// were left as they are) or [`Phase::Lost`] (no VMM holds the guest).
    pub phase: Phase,
    /// What went wrong first, and how it ended.
    pub reason: String,
    /// The new VMM, when it may still be alive (only with [`Phase::NeedsAttention`]).
    pub child: Option<Child>,
}

impl std::fmt::Display for HandoffFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

fn pair(kind: SockType) -> std::io::Result<(OwnedFd, OwnedFd)> {
    socketpair(AddressFamily::Unix, kind, None, SockFlag::SOCK_CLOEXEC).map_err(std::io::Error::from)
}

/// Starts `binary --incoming` with the three channel ends at fds 3, 4 and 5.
fn spawn_new(req: &HandoffRequest, cpr: &OwnedFd, main: &OwnedFd, commit: &OwnedFd) -> Result<Child, String> {
    let mut cmd = req.executable.as_ref().map_or_else(|| Command::new(&req.binary), cpr_spawn::Executable::command);
    cmd.arg("--incoming")
        .arg("--cpr-fd")
        .arg(CPR_FD.to_string())
        .arg("--main-fd")
        .arg(MAIN_FD.to_string())
        .arg("--commit-fd")
        .arg(COMMIT_FD.to_string());
    // A boxed VMM can neither bind in cprd's directory nor open /dev/kvm: both are handed over.
    let mut boxed = Vec::new();
    if req.hand_over_fds || req.sandbox.is_some() {
        let listener = cpr_proto::client::seqpacket_listen(&req.new_control)
            .map_err(|e| format!("cannot bind {}: {e}", req.new_control.display()))?;
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
        cmd.arg("--control-fd").arg(CONTROL_FD.to_string()).arg("--kvm-fd").arg(KVM_FD.to_string());
        boxed.push((CONTROL_FD, listener));
        boxed.push((KVM_FD, OwnedFd::from(kvm)));
    } else {
        cmd.arg("--control").arg(&req.new_control);
    }
    cmd.args(&req.extra_args);
    for (k, v) in &req.env {
        cmd.env(k, v);
    }
    if let Some(path) = &req.stderr {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        cmd.stderr(f);
    }
    let mut fds = vec![(CPR_FD, cpr.as_fd()), (MAIN_FD, main.as_fd()), (COMMIT_FD, commit.as_fd())];
    fds.extend(boxed.iter().map(|(n, fd)| (*n, fd.as_fd())));
    if let Some((n, _)) = req.extra_fds.iter().find(|(n, _)| *n <= KVM_FD) {
        return Err(format!("fd {n} is one of the handoff's own numbers (3 to {KVM_FD})"));
    }
    fds.extend(req.extra_fds.iter().map(|(n, fd)| (*n, fd.as_fd())));
    cpr_spawn::place_fds(&mut cmd, &fds, req.new_session)
        .map_err(|e| format!("cannot hand the channels to the new VMM: {e}"))?;
    if let Some(sandbox) = &req.sandbox {
        sandbox.apply(&mut cmd).map_err(|e| format!("cannot box the new VMM in: {e}"))?;
    }
    cmd.spawn().map_err(|e| format!("cannot start {}: {e}", req.binary.display()))
}

/// What became of the old VMM's answer to `migrate`.
#[derive(Debug)]
enum OldAnswer {
    /// Not sent, or not read yet.
    Pending,
    /// The state went out; the old VMM waits, paused, for `quit` or `resume`.
    StateSent(HandoffReport),
    /// It failed; whether it had paused the guest.
    Failed(String, bool),
    /// Its control connection closed: it died.
    Gone,
}

/// The live arbiter's hold on both VMMs.
struct Live<'a> {
    req: &'a HandoffRequest,
    journal: &'a mut dyn Journal,
    record: HandoffRecord,
    old: Option<ControlClient>,
    old_answer: OldAnswer,
    migrate_sent: bool,
    commit: Option<OwnedFd>,
    child: Option<Child>,
    report: Option<HandoffReport>,
    /// When `Loaded` was read, and when `Commit` went out (monotonic ns): the commit's parts.
    loaded_seen_ns: u64,
    commit_sent_ns: u64,
    /// Each thing that went wrong, in order, for the caller.
    failures: Vec<String>,
}

impl Live<'_> {
    /// Reads the old VMM's answer to `migrate` if it is not in yet, waiting up to `wait`.
    fn collect_old_answer(&mut self, wait: Duration) {
        if !self.migrate_sent || !matches!(self.old_answer, OldAnswer::Pending) {
            return;
        }
        let Some(old) = &self.old else { return };
        self.old_answer = match old.recv(Some(wait)) {
            Ok(r) => match r.msg {
                Response::Migrated(report) => OldAnswer::StateSent(report),
                Response::Error(e) => OldAnswer::Failed(e.message, e.guest_paused),
                other => OldAnswer::Failed(format!("the old VMM answered migrate with {other:?}"), true),
            },
            Err(WireError::Timeout(_)) => OldAnswer::Pending,
            Err(_) => OldAnswer::Gone,
        };
    }

    /// Waits for the new VMM to report `Loaded`, watching the old VMM's answer at the same time.
    fn wait_loaded(&mut self) -> Event {
        let Some(commit) = self.commit.take() else { return Event::NewFailed("no commit channel".into()) };
        let event = self.wait_loaded_on(&commit);
        self.commit = Some(commit);
        event
    }

    fn wait_loaded_on(&mut self, commit: &OwnedFd) -> Event {
        let deadline = Instant::now() + self.req.timeout() * 3;
        loop {
            // Past the deadline the channels are still looked at once: an answer that is there
            // (the arbiter was held up, not the VMMs) is taken, not thrown away.
            let left = deadline.saturating_duration_since(Instant::now());
            let watch_old = self.migrate_sent && matches!(self.old_answer, OldAnswer::Pending);
            let mut fds = vec![nix::poll::PollFd::new(commit.as_fd(), nix::poll::PollFlags::POLLIN)];
            if let (true, Some(old)) = (watch_old, &self.old) {
                fds.push(nix::poll::PollFd::new(old.socket(), nix::poll::PollFlags::POLLIN));
            }
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
                Ok(0) if left.is_zero() => {
                    return Event::Timeout(format!(
                        "the new VMM did not load the state within {:?}",
                        self.req.timeout() * 3
                    ));
                }
                Ok(0) | Err(nix::Error::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Event::NewFailed(format!("poll: {e}")),
            }
            let new_ready = fds[0].any().unwrap_or(false);
            let old_ready = fds.get(1).and_then(nix::poll::PollFd::any).unwrap_or(false);
            if old_ready {
                self.collect_old_answer(Duration::ZERO);
                if let OldAnswer::Failed(why, _) = &self.old_answer {
                    // The old VMM gave up before the new one had the whole state.
                    return Event::OldFailed(why.clone());
                }
            }
            if new_ready {
                return match wire::recv::<ToArbiter>(commit.as_fd(), Some(Duration::ZERO)) {
                    Ok(r) => match r.msg {
                        ToArbiter::Loaded => {
                            self.loaded_seen_ns = cpr_proto::monotonic_ns();
                            Event::NewLoaded
                        }
                        ToArbiter::Running(_) => Event::NewRunning,
                        ToArbiter::Rejected { reason } => {
                            Event::NewFailed(self.why_new_failed(&format!("the new VMM rejected the state: {reason}")))
                        }
                    },
                    Err(WireError::Timeout(_)) => continue,
                    Err(WireError::Closed) => {
                        Event::NewFailed(self.why_new_failed("the new VMM went away before it had loaded the state"))
                    }
                    Err(e) => Event::NewFailed(format!("the commit channel: {e}")),
                };
            }
        }
    }

    /// The old VMM usually knows best why the new one failed (it saw the cpr channel close at a
    /// precise step); its message is preferred once it comes in.
    fn why_new_failed(&mut self, ours: &str) -> String {
        self.collect_old_answer(self.req.timeout().min(Duration::from_secs(2)));
        match &self.old_answer {
            OldAnswer::Failed(theirs, _) => theirs.clone(),
            _ => ours.to_string(),
        }
    }

    fn old_gone_or(&self, why: String) -> Event {
        if self.record.old.pid == 0 || process::is_gone(self.record.old.pid) {
            Event::OldGone
        } else {
            Event::OldResumeFailed(why)
        }
    }
}

impl Sides for Live<'_> {
    fn observe(&mut self, event: &Event) {
        self.failures.extend(event.failure().map(str::to_string));
    }

    fn persist(&mut self, phase: &Phase) -> Result<(), String> {
        self.record.phase = phase.clone();
        self.journal.write(&self.record)
    }

    fn commit(&mut self) -> Event {
        let Some(commit) = &self.commit else { return Event::NewFailed("no commit channel".into()) };
        self.commit_sent_ns = cpr_proto::monotonic_ns();
        if let Err(e) = wire::send(commit.as_fd(), &FromArbiter::Commit, &[]) {
            return Event::NewFailed(format!("cannot send the commit: {e}"));
        }
        match wire::recv::<ToArbiter>(commit.as_fd(), Some(self.req.timeout())) {
            Ok(r) => match r.msg {
                ToArbiter::Running(report) => {
                    let (loaded_seen_ns, commit_sent_ns) = (self.loaded_seen_ns, self.commit_sent_ns);
                    self.report = Some(HandoffReport { loaded_seen_ns, commit_sent_ns, ..report });
                    Event::NewRunning
                }
                other => Event::NewFailed(format!("the new VMM answered the commit with {other:?}")),
            },
            Err(WireError::Timeout(d)) => Event::Timeout(format!("the new VMM did not report running within {d:?}")),
            Err(e) => Event::NewFailed(format!("the new VMM went away after the commit: {e}")),
        }
    }

    fn kill_new(&mut self) -> Event {
        // Closing the commit channel alone makes a waiting new VMM exit; the kill makes sure.
        self.commit = None;
        let event = match &mut self.child {
            None => Event::NewDead,
            Some(child) => match process::kill_child(child) {
                Ok(()) => Event::NewDead,
                Err(e) => Event::NewNotConfirmedDead(e),
            },
        };
        if event == Event::NewDead {
            self.child = None;
        }
        event
    }

    fn resume_old(&mut self) -> Event {
        // The old VMM answers `migrate` once it has seen the new one go; only then does it
        // take requests again.
        self.collect_old_answer(self.req.timeout());
        if matches!(self.old_answer, OldAnswer::Gone) {
            return self.old_gone_or("its control connection closed".into());
        }
        let Some(old) = &self.old else {
            return self.old_gone_or("no control connection to it".into());
        };
        match old.call(&Request::Resume, &[]) {
            Ok(Response::Ok) => Event::OldResumed,
            Ok(other) => self.old_gone_or(format!("resume answered {other:?}")),
            Err(e) => self.old_gone_or(format!("resume: {e}")),
        }
    }

    fn end_old(&mut self) -> Event {
        let grace = OLD_VMM_ANSWER_GRACE.min(self.req.timeout());
        self.collect_old_answer(grace);
        if let (OldAnswer::StateSent(theirs), Some(ours)) = (&self.old_answer, &mut self.report) {
            ours.state_sent_ns = theirs.state_sent_ns;
            ours.state_bytes = theirs.state_bytes;
            ours.save_threads = theirs.save_threads;
        }
        if self.req.new_session {
            // The new VMM runs the guest: the old one's exit goes to the back of the queue.
            cpr_spawn::sched::set_session_nice(self.record.old.pid, cpr_spawn::sched::EXIT_NICE);
        }
        let quit = match (&self.old_answer, &self.old) {
            (OldAnswer::Gone, _) | (_, None) => return Event::OldGone,
            (_, Some(old)) => old.send(&Request::Quit, &[]).and_then(|()| old.recv(Some(grace)).map(|r| r.msg)),
        };
        match quit {
            Ok(Response::Ok) | Err(WireError::Closed) => Event::OldGone,
            _ => match process::kill_and_confirm(self.record.old.pid, KILL_CONFIRM) {
                Ok(()) => Event::OldGone,
                Err(e) => Event::OldFailed(format!("the old VMM did not quit: {e}")),
            },
        }
    }

    fn probe_new(&mut self) -> Event {
        probe(&self.record, self.req.timeout())
    }
}

/// Asks a new VMM whether it runs the guest of `record`.
fn probe(record: &HandoffRecord, timeout: Duration) -> Event {
    let client = match ControlClient::connect(&record.new.control) {
        Ok(c) => c.with_timeout(Some(timeout)),
        Err(e) if process::is_gone(record.new.pid) => return Event::ProbedNewNotRunning(format!("it is gone ({e})")),
        Err(e) => return Event::ProbedUnreachable(format!("its control socket: {e}")),
    };
    match client.call(&Request::Status, &[]) {
        Ok(Response::Status(s)) if s.state == RunState::Running && s.generation == record.from_generation + 1 => {
            Event::ProbedNewRunning
        }
        Ok(Response::Status(s)) => {
            Event::ProbedNewNotRunning(format!("it is {:?} at generation {}", s.state, s.generation))
        }
        Ok(other) => Event::ProbedUnreachable(format!("status answered {other:?}")),
        Err(e) => Event::ProbedUnreachable(format!("status: {e}")),
    }
}

/// Performs one handoff, persisting its record in `journal` before every step that cannot be
/// undone. `from_generation` is the guest's generation in the old VMM.
pub fn hand_off(
    req: &HandoffRequest,
    journal: &mut dyn Journal,
    from_generation: u64,
) -> Result<HandoffOutcome, HandoffFailure> {
    // Every wake-up inside the downtime lands on a CPU that polls, from here to the end.
    let _cpu_latency = req.hold_cpu_latency.then(cpr_spawn::sched::CpuLatencyHold::zero);
    let old = ControlClient::connect(&req.old_control).ok().map(|c| c.with_timeout(Some(req.timeout())));
    let old_pid = req.old_pid.or_else(|| {
        old.as_ref().and_then(|c| match c.call(&Request::Describe, &[]) {
            Ok(Response::Describe(d)) => Some(d.pid),
            _ => None,
        })
    });
    let record = HandoffRecord {
        vm: req.vm.clone(),
        phase: Phase::Starting,
        from_generation,
        old: VmmRef { pid: old_pid.unwrap_or(0), control: req.old_control.clone() },
        new: VmmRef { pid: 0, control: req.new_control.clone() },
        binary: req.binary.clone(),
    };
    let connected = old.is_some();
    let mut live = Live {
        req,
        journal,
        record,
        old,
        old_answer: OldAnswer::Pending,
        migrate_sent: false,
        commit: None,
        child: None,
        report: None,
        loaded_seen_ns: 0,
        commit_sent_ns: 0,
        failures: Vec::new(),
    };
    let first = forward(&mut live, connected);
    // Once `migrate` is out, the machine stands at `Switching`.
    let at = if live.migrate_sent { step(&Phase::Starting, &Event::MigrateSent).0 } else { Phase::Starting };
    let end = run(at, first, &mut live);
    finish(live, end)
}

/// The forward path up to the new VMM's `Loaded` (or the first failure): the event to feed the
/// machine, which is at [`Phase::Starting`] or, once `migrate` is out, [`Phase::Switching`].
fn forward(live: &mut Live<'_>, connected: bool) -> Event {
    let req = live.req;
    if !connected {
        return Event::OldFailed(format!(
            "cannot connect to {}; the old VMM is not answering",
            req.old_control.display()
        ));
    }
    if let Err(e) = live.persist(&Phase::Starting) {
        return Event::JournalFailed(e);
    }
    let channels = pair(SockType::SeqPacket).and_then(|c| Ok((c, pair(SockType::Stream)?, pair(SockType::SeqPacket)?)));
    let ((cpr_old, cpr_new), (main_old, main_new), (commit_ours, commit_new)) = match channels {
        Ok(c) => c,
        Err(e) => return Event::NewFailed(format!("socketpair: {e}")),
    };
    let child = match spawn_new(req, &cpr_new, &main_new, &commit_new) {
        Ok(c) => c,
        Err(e) => return Event::NewFailed(e),
    };
    drop((cpr_new, main_new, commit_new));
    let pid = child.id();
    live.child = Some(child);
    live.commit = Some(commit_ours);
    if req.new_session {
        // Its start-up is the handoff's work; it settles to a VM's share when it runs the guest.
        cpr_spawn::sched::set_session_nice(pid, cpr_spawn::sched::HANDOFF_NICE);
    }
    if let Some(tx) = &req.spawned {
        let _ = tx.send(pid);
    }
    // The new VMM's pid is on record before the old VMM is asked to pause anything.
    live.record.new.pid = pid;
    if let Err(e) = live.persist(&Phase::Starting) {
        return Event::JournalFailed(e);
    }
    if req.new_session && req.sandbox.is_some() {
        // A boxed old VMM may not raise its own weight at the pause (that needs CAP_SYS_NICE):
        // the arbiter does it from outside as it asks for the pause. Whoever runs the guest
        // afterwards goes back to a VM's share (the new VMM by itself, the old one by cprd).
        cpr_spawn::sched::set_session_nice(live.record.old.pid, cpr_spawn::sched::HANDOFF_NICE);
    }
    let migrate = Request::Migrate(MigrateParams { timeout_ms: req.timeout_ms });
    let sent = live.old.as_ref().map(|old| old.send(&migrate, &[cpr_old.as_fd(), main_old.as_fd()]));
    drop((cpr_old, main_old));
    match sent {
        Some(Ok(())) => live.migrate_sent = true,
        Some(Err(e)) => return Event::OldFailed(format!("cannot send migrate to the old VMM: {e}")),
        None => return Event::OldFailed("no control connection to the old VMM".into()),
    }
    live.wait_loaded()
}

fn finish(mut live: Live<'_>, end: Phase) -> Result<HandoffOutcome, HandoffFailure> {
    let first = live.failures.first().cloned().unwrap_or_default();
    match end {
        Phase::Done => {
            let child = live.child.take();
            match (child, live.report) {
                (Some(child), Some(report)) => Ok(HandoffOutcome { report, child }),
                (child, _) => Err(HandoffFailure {
                    phase: Phase::NeedsAttention("the handoff ended without a report".into()),
                    reason: "the handoff ended without a report".into(),
                    child,
                }),
            }
        }
        Phase::RolledBack => Err(HandoffFailure {
            reason: if matches!(live.old_answer, OldAnswer::Failed(_, false)) {
                // Refused before the pause (pre-flight): there was nothing to roll back.
                first
            } else {
                format!("{first} (rolled back: the old VMM resumed the guest)")
            },
            phase: end,
            child: None,
        }),
        Phase::NeedsAttention(ref why) | Phase::Lost(ref why) => Err(HandoffFailure {
            reason: if first.is_empty() || why.contains(&first) { why.clone() } else { format!("{first}; {why}") },
            child: live.child.take(),
            phase: end,
        }),
        other => Err(HandoffFailure {
            reason: format!("{first}; the handoff stopped at {}", other.name()),
            phase: other,
            child: live.child.take(),
        }),
    }
}

/// The recovering arbiter's hold on both VMMs: a restarted cprd, which has neither the new VMM
/// as a child nor the commit channel (it closed with the previous arbiter, so a new VMM still
/// waiting for the commit exits on its own without running the guest).
struct Recovered<'a> {
    journal: &'a mut dyn Journal,
    record: HandoffRecord,
    timeout: Duration,
}

impl Sides for Recovered<'_> {
    fn persist(&mut self, phase: &Phase) -> Result<(), String> {
        self.record.phase = phase.clone();
        self.journal.write(&self.record)
    }

    fn commit(&mut self) -> Event {
        Event::NewFailed("the commit channel closed with the previous arbiter".into())
    }

    fn kill_new(&mut self) -> Event {
        match process::kill_and_confirm(self.record.new.pid, KILL_CONFIRM) {
            Ok(()) => Event::NewDead,
            Err(e) => Event::NewNotConfirmedDead(e),
        }
    }

    fn resume_old(&mut self) -> Event {
        // The old VMM may still be in `migrate`, about to notice that the new one is gone.
        let deadline = Instant::now() + self.timeout * 3;
        loop {
            let answer = ControlClient::connect(&self.record.old.control).map_err(|e| e.to_string()).and_then(|c| {
                c.with_timeout(Some(self.timeout)).call(&Request::Resume, &[]).map_err(|e| e.to_string())
            });
            match answer {
                Ok(Response::Ok) => return Event::OldResumed,
                _ if process::is_gone(self.record.old.pid) => return Event::OldGone,
                Ok(Response::Error(e)) if Instant::now() < deadline && e.message.contains("Migrating") => {}
                other if Instant::now() >= deadline => return Event::OldResumeFailed(format!("resume: {other:?}")),
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn end_old(&mut self) -> Event {
        let quit = ControlClient::connect(&self.record.old.control)
            .ok()
            .map(|c| c.with_timeout(Some(OLD_VMM_ANSWER_GRACE.min(self.timeout))).call(&Request::Quit, &[]));
        if matches!(quit, Some(Ok(Response::Ok))) || process::is_gone(self.record.old.pid) {
            return Event::OldGone;
        }
        match process::kill_and_confirm(self.record.old.pid, KILL_CONFIRM) {
            Ok(()) => Event::OldGone,
            Err(e) => Event::OldFailed(format!("the old VMM did not quit: {e}")),
        }
    }

    fn probe_new(&mut self) -> Event {
        probe(&self.record, self.timeout)
    }
}

/// Finishes or rolls back a handoff that a dead arbiter left in flight, from its persisted
/// record. Returns the phase it ended in and the updated record.
pub fn recover(record: HandoffRecord, journal: &mut dyn Journal, timeout: Duration) -> (Phase, HandoffRecord) {
    let phase = record.phase.clone();
    let mut sides = Recovered { journal, record, timeout };
    let end = run(phase, Event::Restarted, &mut sides);
    (end, sides.record)
}

/// The control socket path for generation `generation` next to `base` (`vm.sock` → `vm.3.sock`).
pub fn next_control_path(base: &Path, generation: u64) -> PathBuf {
    let stem = base.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = stem.split('.').next().unwrap_or("vmm").to_string();
    base.with_file_name(format!("{stem}.{generation}.sock"))
}
