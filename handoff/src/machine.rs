//! The handoff as data: phases, events, actions and one pure [`step`] function.
//!
//! ```text
//! Starting ──MigrateSent──▶ Switching ──NewLoaded──▶ Committed ──NewRunning──▶ NewRunning ──OldGone──▶ Done
//!    │                          │        [Persist, Commit]  │      [Persist, EndOld]
//!    │ failure, timeout,        │ failure, timeout,         │ failure, timeout, probe says no
//!    │                          │                           │ (probe: loaded, not running → Commit again)
//!    │ restart                  │ restart                   ▼
//!    └──────────────┬───────────┘                      NeedsAttention (kill nothing, resume nothing)
//!                   ▼ [Persist, KillNew]
//!              KillingNew ──NewDead──▶ ResumingOld ──OldResumed──▶ RolledBack
//!                   │      [Persist,       │ OldGone ──▶ Lost
//!                   │       ResumeOld]     │ OldResumeFailed ──▶ NeedsAttention
//!                   └ NewNotConfirmedDead ──▶ NeedsAttention
//! ```
//!
//! The commit point is the move to [`Phase::Committed`]: decided once, by the arbiter that
//! drives this machine, and persisted ([`Action::Persist`]) before [`Action::Commit`] is carried
//! out. The new VMM runs no guest instruction before it receives the commit, so before it a
//! rollback is always safe (the new VMM is killed and confirmed dead first); after it nobody ever
//! resumes the old VMM, and a failure means "finish forward" or, where the new VMM cannot be
//! confirmed, "ask a human" ([`Phase::NeedsAttention`]), never "kill whatever is there".

use serde::{Deserialize, Serialize};

/// Where a handoff stands. Persisted (in [`crate::HandoffRecord`]) before every action that
/// cannot be undone, so that a restarted arbiter resumes from the same point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", content = "reason", rename_all = "kebab-case")]
pub enum Phase {
    /// The new VMM is being started and prepared; the old one runs the guest.
    Starting,
    /// The old VMM was told to hand the guest over: it may have paused it; the new VMM has run
    /// nothing.
    Switching,
    /// Decided: the new VMM runs the guest from here on, the old one never again.
    Committed,
    /// The new VMM runs the guest; the old one, which holds a stale copy, is being ended.
    NewRunning,
    /// The new VMM runs the guest; the old one was ended. Terminal.
    Done,
    /// Rollback: the new VMM, which never ran the guest, is being killed.
    KillingNew,
    /// Rollback: the new VMM is confirmed dead; the old one is being resumed.
    ResumingOld,
    /// The old VMM runs the guest again. Terminal.
    RolledBack,
    /// Neither side can be confirmed: both are left as they are, and a human decides. Terminal.
    NeedsAttention(String),
    /// No VMM holds the guest any more (the old VMM died before the new one had the state).
    /// Terminal.
    Lost(String),
}

impl Phase {
    /// Whether the handoff is over (nothing more will happen without a human).
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Done | Self::RolledBack | Self::NeedsAttention(_) | Self::Lost(_))
    }

    /// Whether the commit was decided (the old VMM must never run the guest again).
    pub fn is_committed(&self) -> bool {
        matches!(self, Self::Committed | Self::NewRunning | Self::Done)
    }

    /// A short name for logs and the bus.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Switching => "switching",
            Self::Committed => "committed",
            Self::NewRunning => "new-running",
            Self::Done => "done",
            Self::KillingNew => "killing-new",
            Self::ResumingOld => "resuming-old",
            Self::RolledBack => "rolled-back",
            Self::NeedsAttention(_) => "needs-attention",
            Self::Lost(_) => "lost",
        }
    }
}

/// Something the arbiter learnt, from a VMM or from the clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The old VMM was sent the request to hand the guest over.
    MigrateSent,
    /// The new VMM holds the whole state, checked and restored, and has run nothing.
    NewLoaded,
    /// The new VMM says it runs the guest.
    NewRunning,
    /// The new VMM failed, refused the state, or went away.
    NewFailed(String),
    /// The old VMM failed or went away before the new one had loaded the state.
    OldFailed(String),
    /// A wait on a VMM ran out.
    Timeout(String),
    /// The new VMM is confirmed dead (reaped, or its pidfd says it exited).
    NewDead,
    /// The new VMM could not be confirmed dead.
    NewNotConfirmedDead(String),
    /// The old VMM runs the guest again.
    OldResumed,
    /// The old VMM exists but did not resume the guest.
    OldResumeFailed(String),
    /// The old VMM is gone (it exited, quit, or was ended).
    OldGone,
    /// The arbiter restarted and found this handoff in its journal.
    Restarted,
    /// Recovery: the new VMM says it runs the guest.
    ProbedNewRunning,
    /// Recovery: the new VMM holds the whole state, has run nothing, and can still be told to
    /// run (a QEMU paused by `-S` after the migration completed).
    ProbedNewLoaded,
    /// Recovery: the new VMM does not run the guest (it is gone, or it still waits for a commit
    /// that will never come).
    ProbedNewNotRunning(String),
    /// Recovery: the new VMM cannot be asked.
    ProbedUnreachable(String),
    /// Writing the handoff record failed; the actions after that [`Action::Persist`] were not
    /// carried out.
    JournalFailed(String),
}

impl Event {
    /// What went wrong, for an event that reports a failure.
    pub fn failure(&self) -> Option<&str> {
        match self {
            Self::NewFailed(w)
            | Self::OldFailed(w)
            | Self::Timeout(w)
            | Self::NewNotConfirmedDead(w)
            | Self::OldResumeFailed(w)
            | Self::ProbedNewNotRunning(w)
            | Self::ProbedUnreachable(w)
            | Self::JournalFailed(w) => Some(w),
            _ => None,
        }
    }
}

/// Something the arbiter must do, in the order given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Write the handoff record (with its new phase) before anything after it in the list. On
    /// failure, carry out nothing more and report [`Event::JournalFailed`].
    Persist,
    /// Tell the new VMM to run the guest: the commit, one-way.
    Commit,
    /// Kill the new VMM and wait until it is confirmed dead.
    KillNew,
    /// Make the old VMM run the guest again.
    ResumeOld,
    /// End the old VMM (ask it to quit, else kill it): its copy is stale and must never run.
    EndOld,
    /// Ask the new VMM whether it runs the guest (recovery after a restart).
    ProbeNew,
}

fn rollback() -> (Phase, Vec<Action>) {
    (Phase::KillingNew, vec![Action::Persist, Action::KillNew])
}

fn attention(reason: String) -> (Phase, Vec<Action>) {
    (Phase::NeedsAttention(reason), vec![Action::Persist])
}

/// The one place that decides: the next phase and what to do, given where a handoff stands and
/// what just happened. Pure: no I/O, no clock. An event that does not fit the phase changes
/// nothing, except where it proves a broken promise (a new VMM that runs without a commit).
pub fn step(phase: &Phase, event: &Event) -> (Phase, Vec<Action>) {
    use Event as E;
    use Phase as P;
    let unchanged = (phase.clone(), Vec::new());
    match (phase, event) {
        (P::Starting, E::MigrateSent) => (P::Switching, Vec::new()),
        (P::Switching, E::NewLoaded) => (P::Committed, vec![Action::Persist, Action::Commit]),
        (P::Starting | P::Switching, E::NewRunning | E::ProbedNewRunning) => {
            attention("the new VMM reports running without a commit; both VMMs are left as they are".into())
        }
        (
            P::Starting | P::Switching,
            E::NewFailed(_)
            | E::OldFailed(_)
            | E::OldGone
            | E::Timeout(_)
            | E::Restarted
            | E::JournalFailed(_)
            | E::ProbedNewNotRunning(_)
            | E::ProbedNewLoaded
            | E::ProbedUnreachable(_),
        ) => rollback(),
        // The record of the decision could not be written, so the commit was not sent: the new
        // VMM has run nothing, and rolling back is still safe.
        (P::Committed, E::JournalFailed(_)) => rollback(),
        (P::Committed, E::NewRunning | E::ProbedNewRunning) => (P::NewRunning, vec![Action::Persist, Action::EndOld]),
        (P::Committed, E::Restarted) => (P::Committed, vec![Action::ProbeNew]),
        // The decision stands and the new VMM can still carry it out: send the commit again.
        (P::Committed, E::ProbedNewLoaded) => (P::Committed, vec![Action::Commit]),
        (P::Committed, E::NewFailed(why) | E::Timeout(why) | E::ProbedUnreachable(why)) => attention(format!(
            "after the commit the new VMM could not be confirmed running ({why}); the old VMM keeps the guest \
             as it was at the pause and is not resumed, because the new one may have run it"
        )),
        (P::Committed, E::ProbedNewNotRunning(why)) => attention(format!(
            "the commit was decided but the new VMM does not run the guest ({why}); the old VMM keeps the guest \
             as it was at the pause and is not resumed, because the new one may have run it"
        )),
        (P::NewRunning, E::OldGone | E::OldFailed(_)) => (P::Done, vec![Action::Persist]),
        (P::NewRunning, E::Restarted | E::JournalFailed(_)) => (P::NewRunning, vec![Action::EndOld]),
        (P::KillingNew, E::NewDead) => (P::ResumingOld, vec![Action::Persist, Action::ResumeOld]),
        (P::KillingNew, E::NewNotConfirmedDead(why)) => attention(format!(
            "the new VMM could not be confirmed dead ({why}); the old VMM is not resumed while it may still run"
        )),
        // A journal that cannot be written stops nothing that is already decided: the action
        // the failed write came before is carried out all the same.
        (P::KillingNew, E::Restarted | E::JournalFailed(_)) => (P::KillingNew, vec![Action::KillNew]),
        (P::KillingNew, E::NewRunning | E::ProbedNewRunning) => {
            attention("the new VMM reports running without a commit; both VMMs are left as they are".into())
        }
        (P::ResumingOld, E::OldResumed) => (P::RolledBack, vec![Action::Persist]),
        (P::ResumingOld, E::OldResumeFailed(why)) => {
            attention(format!("the old VMM holds the paused guest but did not resume it ({why}); the new VMM is dead"))
        }
        (P::ResumingOld, E::OldGone) => {
            (P::Lost("the old VMM is gone and the new one never had the whole state".into()), vec![Action::Persist])
        }
        (P::ResumingOld, E::Restarted | E::JournalFailed(_)) => (P::ResumingOld, vec![Action::ResumeOld]),
        _ => unchanged,
    }
}

/// Carries out a machine's actions against the real world: one implementation per backend.
/// Every method but `persist` reports what it found as the next event.
pub trait Sides {
    /// Writes the handoff record durably (atomically) before anything else happens.
    fn persist(&mut self, phase: &Phase) -> Result<(), String>;
    /// Sends the commit and waits for the new VMM to say it runs the guest.
    fn commit(&mut self) -> Event;
    /// Kills the new VMM and waits until it is confirmed dead.
    fn kill_new(&mut self) -> Event;
    /// Makes the old VMM run the guest again.
    fn resume_old(&mut self) -> Event;
    /// Ends the old VMM.
    fn end_old(&mut self) -> Event;
    /// Asks the new VMM whether it runs the guest.
    fn probe_new(&mut self) -> Event;
    /// Sees every event as it is fed to the machine (the first one and each action's outcome),
    /// e.g. to keep what went wrong for the caller.
    fn observe(&mut self, _event: &Event) {}
}

/// Feeds `event` to the machine at `phase` and carries out every action that follows, feeding
/// each action's outcome back in, until no action is left. Returns the phase reached.
pub fn run(phase: Phase, event: Event, sides: &mut dyn Sides) -> Phase {
    let mut phase = phase;
    let mut next = Some(event);
    while let Some(event) = next.take() {
        sides.observe(&event);
        let (to, actions) = step(&phase, &event);
        phase = to;
        for action in actions {
            let outcome = match action {
                Action::Persist => match sides.persist(&phase) {
                    Ok(()) => continue,
                    Err(e) => Event::JournalFailed(e),
                },
                Action::Commit => sides.commit(),
                Action::KillNew => sides.kill_new(),
                Action::ResumeOld => sides.resume_old(),
                Action::EndOld => sides.end_old(),
                Action::ProbeNew => sides.probe_new(),
            };
            next = Some(outcome);
            break;
        }
    }
    phase
}
