//! The machine, table-driven (every phase × every event) and under random event sequences.

use proptest::prelude::*;

use crate::machine::{Action, Event, Phase, Sides, run, step};

fn phases() -> Vec<Phase> {
    vec![
        Phase::Starting,
        Phase::Switching,
        Phase::Committed,
        Phase::NewRunning,
        Phase::Done,
        Phase::KillingNew,
        Phase::ResumingOld,
        Phase::RolledBack,
        Phase::NeedsAttention("x".into()),
        Phase::Lost("x".into()),
    ]
}

fn events() -> Vec<Event> {
    let s = || "why".to_string();
    vec![
        Event::MigrateSent,
        Event::NewLoaded,
        Event::NewRunning,
        Event::NewFailed(s()),
        Event::OldFailed(s()),
        Event::Timeout(s()),
        Event::NewDead,
        Event::NewNotConfirmedDead(s()),
        Event::OldResumed,
        Event::OldResumeFailed(s()),
        Event::OldGone,
        Event::Restarted,
        Event::ProbedNewRunning,
        Event::ProbedNewLoaded,
        Event::ProbedNewNotRunning(s()),
        Event::ProbedUnreachable(s()),
        Event::JournalFailed(s()),
    ]
}

fn event_name(e: &Event) -> &'static str {
    match e {
        Event::MigrateSent => "MigrateSent",
        Event::NewLoaded => "NewLoaded",
        Event::NewRunning => "NewRunning",
        Event::NewFailed(_) => "NewFailed",
        Event::OldFailed(_) => "OldFailed",
        Event::Timeout(_) => "Timeout",
        Event::NewDead => "NewDead",
        Event::NewNotConfirmedDead(_) => "NewNotConfirmedDead",
        Event::OldResumed => "OldResumed",
        Event::OldResumeFailed(_) => "OldResumeFailed",
        Event::OldGone => "OldGone",
        Event::Restarted => "Restarted",
        Event::ProbedNewRunning => "ProbedNewRunning",
        Event::ProbedNewLoaded => "ProbedNewLoaded",
        Event::ProbedNewNotRunning(_) => "ProbedNewNotRunning",
        Event::ProbedUnreachable(_) => "ProbedUnreachable",
        Event::JournalFailed(_) => "JournalFailed",
    }
}

use Action::{Commit, EndOld, KillNew, Persist, ProbeNew, ResumeOld};

/// Every transition that changes something: (phase, event, next phase, actions). Every other
/// pair of phase and event must leave the phase as it is and do nothing.
const TABLE: &[(&str, &str, &str, &[Action])] = &[
    ("starting", "MigrateSent", "switching", &[]),
    ("starting", "NewRunning", "needs-attention", &[Persist]),
    ("starting", "ProbedNewRunning", "needs-attention", &[Persist]),
    ("starting", "NewFailed", "killing-new", &[Persist, KillNew]),
    ("starting", "OldFailed", "killing-new", &[Persist, KillNew]),
    ("starting", "OldGone", "killing-new", &[Persist, KillNew]),
    ("starting", "Timeout", "killing-new", &[Persist, KillNew]),
    ("starting", "Restarted", "killing-new", &[Persist, KillNew]),
    ("starting", "JournalFailed", "killing-new", &[Persist, KillNew]),
    ("starting", "ProbedNewNotRunning", "killing-new", &[Persist, KillNew]),
    ("starting", "ProbedUnreachable", "killing-new", &[Persist, KillNew]),
    ("starting", "ProbedNewLoaded", "killing-new", &[Persist, KillNew]),
    ("switching", "NewLoaded", "committed", &[Persist, Commit]),
    ("switching", "NewRunning", "needs-attention", &[Persist]),
    ("switching", "ProbedNewRunning", "needs-attention", &[Persist]),
    ("switching", "NewFailed", "killing-new", &[Persist, KillNew]),
    ("switching", "OldFailed", "killing-new", &[Persist, KillNew]),
    ("switching", "OldGone", "killing-new", &[Persist, KillNew]),
    ("switching", "Timeout", "killing-new", &[Persist, KillNew]),
    ("switching", "Restarted", "killing-new", &[Persist, KillNew]),
    ("switching", "JournalFailed", "killing-new", &[Persist, KillNew]),
    ("switching", "ProbedNewNotRunning", "killing-new", &[Persist, KillNew]),
    ("switching", "ProbedUnreachable", "killing-new", &[Persist, KillNew]),
    ("switching", "ProbedNewLoaded", "killing-new", &[Persist, KillNew]),
    ("committed", "JournalFailed", "killing-new", &[Persist, KillNew]),
    ("committed", "NewRunning", "new-running", &[Persist, EndOld]),
    ("committed", "ProbedNewRunning", "new-running", &[Persist, EndOld]),
    ("committed", "Restarted", "committed", &[ProbeNew]),
    ("committed", "ProbedNewLoaded", "committed", &[Commit]),
    ("committed", "NewFailed", "needs-attention", &[Persist]),
    ("committed", "Timeout", "needs-attention", &[Persist]),
    ("committed", "ProbedUnreachable", "needs-attention", &[Persist]),
    ("committed", "ProbedNewNotRunning", "needs-attention", &[Persist]),
    ("new-running", "OldGone", "done", &[Persist]),
    ("new-running", "OldFailed", "done", &[Persist]),
    ("new-running", "Restarted", "new-running", &[EndOld]),
    ("new-running", "JournalFailed", "new-running", &[EndOld]),
    ("killing-new", "NewDead", "resuming-old", &[Persist, ResumeOld]),
    ("killing-new", "NewNotConfirmedDead", "needs-attention", &[Persist]),
    ("killing-new", "Restarted", "killing-new", &[KillNew]),
    ("killing-new", "JournalFailed", "killing-new", &[KillNew]),
    ("killing-new", "NewRunning", "needs-attention", &[Persist]),
    ("killing-new", "ProbedNewRunning", "needs-attention", &[Persist]),
    ("resuming-old", "OldResumed", "rolled-back", &[Persist]),
    ("resuming-old", "OldResumeFailed", "needs-attention", &[Persist]),
    ("resuming-old", "OldGone", "lost", &[Persist]),
    ("resuming-old", "Restarted", "resuming-old", &[ResumeOld]),
    ("resuming-old", "JournalFailed", "resuming-old", &[ResumeOld]),
];

#[test]
fn every_phase_and_every_event_as_the_table_says() {
    let mut used = vec![false; TABLE.len()];
    for phase in phases() {
        for event in events() {
            let (to, actions) = step(&phase, &event);
            let row = TABLE.iter().position(|(p, e, _, _)| *p == phase.name() && *e == event_name(&event));
            match row {
                Some(i) => {
                    used[i] = true;
                    let (_, _, want, want_actions) = TABLE[i];
                    assert_eq!(to.name(), want, "{} + {}", phase.name(), event_name(&event));
                    assert_eq!(actions, want_actions, "{} + {}", phase.name(), event_name(&event));
                }
                None => {
                    assert_eq!(to, phase, "{} + {} must change nothing", phase.name(), event_name(&event));
                    assert!(actions.is_empty(), "{} + {} must do nothing", phase.name(), event_name(&event));
                }
            }
        }
    }
    assert!(used.iter().all(|u| *u), "every row of the table names a real phase and event");
}

#[test]
fn terminal_phases_never_move() {
    for phase in phases().into_iter().filter(Phase::is_terminal) {
        for event in events() {
            assert_eq!(step(&phase, &event), (phase.clone(), Vec::new()));
        }
    }
}

#[test]
fn phases_survive_the_journal_format() {
    for phase in phases() {
        let json = serde_json::to_string(&phase).expect("encode");
        let back: Phase = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, phase);
    }
    assert_eq!(serde_json::to_string(&Phase::Committed).expect("encode"), r#"{"phase":"committed"}"#);
}

/// What the world looks like to an observer of the actions the machine asked for.
#[derive(Debug, Default)]
struct World {
    committed: bool,
    new_confirmed_running: bool,
    kill_pending: bool,
    new_confirmed_dead: bool,
    resume_sent: bool,
    old_resumed: bool,
    old_gone: bool,
}

/// Checks one action the machine asked for, as it is carried out, against what the world knows.
fn carry_out(world: &mut World, action: Action) -> Result<(), String> {
    match action {
        Action::Commit => {
            if world.kill_pending || world.resume_sent {
                return Err("commit after a rollback began".into());
            }
            world.committed = true;
        }
        Action::KillNew => {
            if world.committed {
                return Err("killed the new VMM after the commit".into());
            }
            world.kill_pending = true;
            world.new_confirmed_dead = false;
        }
        Action::ResumeOld => {
            if world.committed {
                return Err("resumed the old VMM after the commit".into());
            }
            if !world.new_confirmed_dead {
                return Err("resumed the old VMM while the new one was not confirmed dead".into());
            }
            world.resume_sent = true;
        }
        Action::EndOld => {
            if !world.new_confirmed_running {
                return Err("ended the old VMM while the new one was not confirmed running".into());
            }
        }
        Action::Persist | Action::ProbeNew => {}
    }
    Ok(())
}

/// What the world tells the observer through an event.
fn learn(world: &mut World, event: &Event) {
    match event {
        Event::NewDead if world.kill_pending => world.new_confirmed_dead = true,
        Event::NewRunning | Event::ProbedNewRunning if world.committed => world.new_confirmed_running = true,
        Event::OldResumed if world.resume_sent => world.old_resumed = true,
        Event::OldGone => world.old_gone = true,
        _ => {}
    }
}

/// One thing that happens: an event from a VMM or the clock, or the next journal write failing
/// (a journal failure is not an event of its own: it is what a failed `Persist` reports).
#[derive(Debug, Clone)]
enum Happening {
    Event(Event),
    NextPersistFails,
}

fn any_happening() -> impl Strategy<Value = Happening> {
    let pool: Vec<Event> = events().into_iter().filter(|e| !matches!(e, Event::JournalFailed(_))).collect();
    prop_oneof![
        9 => (0..pool.len()).prop_map(move |i| Happening::Event(pool[i].clone())),
        1 => Just(Happening::NextPersistFails),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    /// Whatever happens, in whatever order: at most one VMM ever runs the guest (nothing resumes
    /// the old VMM once the commit is out, the new one is killed only before it), the decision
    /// is persisted before the commit goes out, the old VMM is resumed only while the new one
    /// never ran and is dead, the old VMM is ended only once the new one is confirmed running,
    /// and no sequence ends with a guest that nobody can run unless the old VMM went away by itself.
    #[test]
    fn invariants_hold_for_any_event_sequence(seq in proptest::collection::vec(any_happening(), 0..48)) {
        let mut phase = Phase::Starting;
        let mut world = World::default();
        let mut persist_fails = false;
        for happening in &seq {
            let mut next = match happening {
                Happening::NextPersistFails => {
                    persist_fails = true;
                    continue;
                }
                Happening::Event(e) => Some(e.clone()),
            };
            while let Some(event) = next.take() {
                learn(&mut world, &event);
                let (to, actions) = step(&phase, &event);
                // A commit sent again from `committed` (recovery) stands on the record already written.
                let decided_before = phase == Phase::Committed;
                if phase.is_committed() && world.committed {
                    prop_assert!(to.is_committed() || matches!(to, Phase::NeedsAttention(_)),
                        "{} went back from a commit to {}", phase.name(), to.name());
                }
                phase = to;
                let mut persisted = false;
                for action in actions {
                    if action == Action::Persist {
                        if persist_fails {
                            persist_fails = false;
                            next = Some(Event::JournalFailed("disk full".into()));
                            break;
                        }
                        persisted = true;
                        continue;
                    }
                    if action == Action::Commit {
                        prop_assert!(persisted || decided_before, "the commit went out before its decision was persisted");
                    }
                    carry_out(&mut world, action).map_err(TestCaseError::fail)?;
                }
            }
        }
        match &phase {
            Phase::Done => prop_assert!(world.committed && world.new_confirmed_running),
            Phase::RolledBack => prop_assert!(!world.committed && world.old_resumed),
            Phase::Lost(_) => prop_assert!(world.old_gone && !world.committed),
            _ => {}
        }
    }
}

/// A scripted world for [`run`]: each action answers the next scripted event.
#[derive(Debug, Default)]
struct Script {
    answers: Vec<Event>,
    done: Vec<&'static str>,
    persisted: Vec<&'static str>,
    fail_persist_at: Option<&'static str>,
}

impl Script {
    fn answer(&mut self, what: &'static str) -> Event {
        self.done.push(what);
        self.answers.remove(0)
    }
}

impl Sides for Script {
    fn persist(&mut self, phase: &Phase) -> Result<(), String> {
        if self.fail_persist_at == Some(phase.name()) {
            self.fail_persist_at = None;
            return Err("disk full".into());
        }
        self.persisted.push(phase.name());
        Ok(())
    }
    fn commit(&mut self) -> Event {
        self.answer("commit")
    }
    fn kill_new(&mut self) -> Event {
        self.answer("kill-new")
    }
    fn resume_old(&mut self) -> Event {
        self.answer("resume-old")
    }
    fn end_old(&mut self) -> Event {
        self.answer("end-old")
    }
    fn probe_new(&mut self) -> Event {
        self.answer("probe-new")
    }
}

#[test]
fn a_good_handoff_persists_the_decision_before_the_commit_and_ends_the_old_vmm() {
    let mut s = Script { answers: vec![Event::NewRunning, Event::OldGone], ..Script::default() };
    let end = run(Phase::Switching, Event::NewLoaded, &mut s);
    assert_eq!(end, Phase::Done);
    assert_eq!(s.done, ["commit", "end-old"]);
    assert_eq!(s.persisted, ["committed", "new-running", "done"]);
}

#[test]
fn a_failed_decision_record_rolls_back_without_sending_the_commit() {
    let mut s = Script {
        answers: vec![Event::NewDead, Event::OldResumed],
        fail_persist_at: Some("committed"),
        ..Script::default()
    };
    let end = run(Phase::Switching, Event::NewLoaded, &mut s);
    assert_eq!(end, Phase::RolledBack);
    assert_eq!(s.done, ["kill-new", "resume-old"], "no commit went out");
}

#[test]
fn a_restart_before_the_decision_kills_the_new_vmm_then_resumes_the_old() {
    let mut s = Script { answers: vec![Event::NewDead, Event::OldResumed], ..Script::default() };
    assert_eq!(run(Phase::Switching, Event::Restarted, &mut s), Phase::RolledBack);
    assert_eq!(s.done, ["kill-new", "resume-old"]);
}

#[test]
fn a_restart_after_the_decision_adopts_a_running_new_vmm_and_kills_nothing() {
    let mut s = Script { answers: vec![Event::ProbedNewRunning, Event::OldGone], ..Script::default() };
    assert_eq!(run(Phase::Committed, Event::Restarted, &mut s), Phase::Done);
    assert_eq!(s.done, ["probe-new", "end-old"]);
}

#[test]
fn a_restart_after_the_decision_commits_a_new_vmm_that_still_waits_for_it() {
    let mut s =
        Script { answers: vec![Event::ProbedNewLoaded, Event::NewRunning, Event::OldGone], ..Script::default() };
    assert_eq!(run(Phase::Committed, Event::Restarted, &mut s), Phase::Done);
    assert_eq!(s.done, ["probe-new", "commit", "end-old"]);
}

#[test]
fn a_restart_after_the_decision_with_a_silent_new_vmm_leaves_both_alone() {
    let mut s = Script { answers: vec![Event::ProbedUnreachable("no answer in 2 s".into())], ..Script::default() };
    let end = run(Phase::Committed, Event::Restarted, &mut s);
    assert!(matches!(end, Phase::NeedsAttention(ref why) if why.contains("no answer in 2 s")), "{end:?}");
    assert_eq!(s.done, ["probe-new"], "neither VMM was killed or resumed");
}

#[test]
fn the_old_vmm_dying_before_the_state_was_whole_loses_the_guest_and_says_so() {
    let mut s = Script { answers: vec![Event::NewDead, Event::OldGone], ..Script::default() };
    let end = run(Phase::Switching, Event::NewFailed("truncated state".into()), &mut s);
    assert!(matches!(end, Phase::Lost(_)), "{end:?}");
}

#[test]
fn file_journal_round_trips_and_replaces_atomically() {
    use crate::{FileJournal, HandoffRecord, Journal, VmmRef};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut j = FileJournal::new(dir.path(), "vm1");
    assert_eq!(j.read().expect("read"), None);
    let mut r = HandoffRecord {
        vm: "vm1".into(),
        phase: Phase::Starting,
        from_generation: 3,
        old: VmmRef { pid: 10, control: "/run/a".into() },
        new: VmmRef::default(),
        binary: "/usr/bin/x".into(),
    };
    j.write(&r).expect("write");
    r.phase = Phase::Committed;
    r.new.pid = 11;
    j.write(&r).expect("write");
    assert_eq!(j.read().expect("read"), Some(r.clone()));
    std::fs::write(j.path(), b"{not json").expect("corrupt");
    assert!(j.read().expect_err("a corrupt record is an error").contains("does not parse"));
    j.remove();
    assert_eq!(j.read().expect("read"), None);
    // A record longer than the padding is still whole, and a shorter one after it too.
    r.binary = std::path::PathBuf::from(format!("/{}", "x".repeat(5000)));
    j.write(&r).expect("write a long record");
    assert_eq!(j.read().expect("read"), Some(r.clone()));
    r.binary = "/usr/bin/y".into();
    j.write(&r).expect("write a short one over it");
    assert_eq!(j.read().expect("read"), Some(r));
}
