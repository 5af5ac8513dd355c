//! The engine with a fake backend: no KVM, no bus. The fake's "VMMs" are real processes
//! (`sleep`), so that supervision, reaping and stopping are real; what a handoff returns is
//! scripted (a fake, named as such: these outcomes are produced for real by the system tests).

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use cpr_handoff::{HandoffRecord, Journal, Phase};

use super::*;
use crate::backend::{UpgradeError, UpgradeRequest, Upgraded, VmmBackend};
use crate::config::{BackendKind, VmDef};

/// What the fake's next upgrade (or recovery) does.
#[derive(Debug)]
enum Script {
    Upgrade,
    RollBack,
    /// Rolled back, but the old VMM died meanwhile.
    RollBackToADeadVmm,
    NeedsAttention,
    Lose,
    /// Upgrades once the sender of this channel sends (or goes away): a handoff that takes long.
    Hold(std::sync::mpsc::Receiver<()>),
}

#[derive(Debug, Default)]
struct Fake {
    script: Mutex<VecDeque<Script>>,
    recovery: Mutex<Option<Phase>>,
}

static FAKE: std::sync::LazyLock<Fake> = std::sync::LazyLock::new(Fake::default);
/// The tests share the fake; they take turns.
static TURN: Mutex<()> = Mutex::new(());

fn fake_backends(_kind: BackendKind) -> Result<&'static dyn VmmBackend, CprdError> {
    Ok(&*FAKE)
}

fn vmm_process() -> Child {
    Command::new("sleep").arg("600").stdin(Stdio::null()).spawn().expect("sleep")
}

fn kill(pid: u32) {
    crate::backend::end_process(pid, false);
}

impl VmmBackend for Fake {
    fn preflight(
        &self,
        _binary: &cpr_spawn::Executable,
        _def: &VmDef,
        _scratch: &Path,
        _current: &crate::backend::Current,
    ) -> Result<(), CprdError> {
        Ok(())
    }

    fn start(
        &self,
        def: &VmDef,
        binary: &cpr_spawn::Executable,
        dir: &Path,
        _uid: Option<u32>,
    ) -> Result<(VmRecord, OwnedFd, Child), CprdError> {
        let memfd = cpr_proto::memory::create_memfd(def.memory_bytes).map_err(CprdError::StartFailed)?;
        let child = vmm_process();
        let record = VmRecord {
            format: crate::engine::RECORD_FORMAT,
            generation: 0,
            main_pid: child.id(),
            control: dir.join(format!("{}.0.sock", def.name)),
            vmm_binary: binary.path().to_path_buf(),
            vmm_version: "fake".into(),
            last_downtime_usec: 0,
            console: dir.join(format!("{}.console", def.name)),
            launch_args: Vec::new(),
            vmm_uid: None,
            vmm_release: "fake 1".into(),
            paused: false,
            upgrade_on_resume: false,
        };
        Ok((record, memfd, child))
    }

    fn upgrade(&self, req: UpgradeRequest<'_>) -> Result<Upgraded, UpgradeError> {
        let next = lock(&self.script).pop_front().unwrap_or(Script::Upgrade);
        match next {
            Script::Hold(until) => {
                let _ = until.recv();
                lock(&self.script).push_front(Script::Upgrade);
                self.upgrade(req)
            }
            Script::Upgrade => {
                let child = vmm_process();
                let _ = req.on_spawn.send(child.id());
                kill(req.record.main_pid);
                Ok(Upgraded {
                    generation: req.record.generation + 1,
                    child: Some(child),
                    downtime_usec: 100,
                    version: "fake".into(),
                    release: "fake 2".into(),
                })
            }
            Script::RollBack => Err(UpgradeError::RolledBack("the new VMM refused the state".into())),
            Script::RollBackToADeadVmm => {
                kill(req.record.main_pid);
                Err(UpgradeError::RolledBack("the new VMM went away".into()))
            }
            Script::NeedsAttention => {
                Err(UpgradeError::NeedsAttention("the new VMM did not report running".into(), Some(vmm_process())))
            }
            Script::Lose => {
                kill(req.record.main_pid);
                Err(UpgradeError::Lost("the old VMM died before the state was whole".into()))
            }
        }
    }

    fn stop(&self, record: &VmRecord, _force: bool) {
        kill(record.main_pid);
    }

    fn reattach(
        &self,
        _name: &str,
        def: &VmDef,
        record: &mut VmRecord,
        _stored_memfd: Option<&OwnedFd>,
        _stored: &mut std::collections::HashMap<String, OwnedFd>,
    ) -> Result<OwnedFd, String> {
        if cpr_handoff::process::is_gone(record.main_pid) {
            return Err(format!("pid {} is gone", record.main_pid));
        }
        cpr_proto::memory::create_memfd(def.memory_bytes)
    }

    fn resume(&self, _name: &str, record: &VmRecord) -> Result<(), String> {
        if cpr_handoff::process::is_gone(record.main_pid) {
            return Err(format!("pid {} is gone", record.main_pid));
        }
        Ok(())
    }

    fn pause(&self, record: &VmRecord) -> Result<(), String> {
        if cpr_handoff::process::is_gone(record.main_pid) {
            return Err(format!("pid {} is gone", record.main_pid));
        }
        Ok(())
    }

    fn recover(&self, handoff: HandoffRecord, journal: &mut dyn Journal, _timeout_ms: u64) -> Phase {
        let phase = lock(&self.recovery).take().unwrap_or(Phase::RolledBack);
        let _ = journal.write(&HandoffRecord { phase: phase.clone(), ..handoff });
        phase
    }
}

struct Env {
    dir: tempfile::TempDir,
    engine: Arc<Engine>,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for v in self.engine.list() {
            let _ = self.engine.stop(&v.name, true);
        }
    }
}

fn env(vms: &[(&str, &str)]) -> Env {
    let turn = TURN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    lock(&FAKE.script).clear();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("etc");
    std::fs::create_dir_all(config.join("vms")).expect("mkdir");
    std::fs::write(config.join("cprd.toml"), "[vmm]\nallowed = [\"/usr/bin/*\"]\ndefault = \"/usr/bin/sleep\"\n")
        .expect("write cprd.toml");
    for (name, body) in vms {
        std::fs::write(config.join("vms").join(format!("{name}.toml")), body).expect("write vm");
    }
    let engine = Engine::with_backends(None, config, dir.path().join("run"), fake_backends).expect("engine");
    Env { dir, engine, _turn: turn }
}

const VM: &str = "memory = \"16M\"\n";

fn state(e: &Env, name: &str) -> VmState {
    e.engine.view(name).expect("view").state
}

#[test]
fn start_upgrade_stop() {
    let e = env(&[("vm1", VM)]);
    e.engine.start("vm1").expect("start");
    let first = e.engine.view("vm1").expect("view");
    assert_eq!((first.state, first.generation), (VmState::Running, 0));
    let (downtime, generation) = e.engine.upgrade("vm1", "").expect("upgrade");
    assert_eq!((downtime, generation), (100, 1));
    let now = e.engine.view("vm1").expect("view");
    assert_ne!(now.main_pid, first.main_pid);
    // The history says which releases the upgrade went between; the view shows the new one.
    let last = e.engine.history().last().cloned().expect("an upgrade on record");
    assert!(last.ok);
    assert_eq!((last.from_release.as_str(), last.to_release.as_str()), ("fake 1", "fake 2"));
    assert_eq!(now.vmm_release, "fake 2");
    e.engine.stop("vm1", false).expect("stop");
    assert_eq!(state(&e, "vm1"), VmState::Stopped);
    assert!(cpr_handoff::process::is_gone(now.main_pid));
}

#[test]
fn a_rolled_back_upgrade_leaves_the_old_vmm_running() {
    let e = env(&[("vm1", VM)]);
    e.engine.start("vm1").expect("start");
    let pid = e.engine.view("vm1").expect("view").main_pid;
    lock(&FAKE.script).push_back(Script::RollBack);
    let err = e.engine.upgrade("vm1", "").expect_err("rolled back");
    assert!(matches!(err, CprdError::UpgradeFailed(_)), "{err:?}");
    let v = e.engine.view("vm1").expect("view");
    assert_eq!((v.state, v.main_pid, v.generation), (VmState::Running, pid, 0));
    assert!(e.engine.history().last().is_some_and(|r| !r.ok));
}

#[test]
fn a_rollback_to_a_vmm_that_died_meanwhile_is_not_running() {
    let e = env(&[("vm1", VM)]);
    e.engine.start("vm1").expect("start");
    lock(&FAKE.script).push_back(Script::RollBackToADeadVmm);
    e.engine.upgrade("vm1", "").expect_err("rolled back");
    assert_eq!(state(&e, "vm1"), VmState::Failed);
    e.engine.start("vm1").expect("start is not a no-op");
    let v = e.engine.view("vm1").expect("view");
    assert!(v.state == VmState::Running && !cpr_handoff::process::is_gone(v.main_pid));
}

#[test]
fn a_handoff_that_needs_attention_keeps_both_vmms_until_stopped() {
    let e = env(&[("vm1", VM)]);
    e.engine.start("vm1").expect("start");
    let old = e.engine.view("vm1").expect("view").main_pid;
    lock(&FAKE.script).push_back(Script::NeedsAttention);
    e.engine.upgrade("vm1", "").expect_err("needs attention");
    assert_eq!(state(&e, "vm1"), VmState::NeedsAttention);
    let other = e.engine.inspect("vm1").1;
    assert_eq!(other.len(), 1, "the new VMM is remembered");
    let err = e.engine.start("vm1").expect_err("start refuses");
    assert!(err.to_string().contains("did not report running"), "{err}");
    assert!(e.engine.upgrade("vm1", "").is_err(), "upgrade refuses");
    assert!(!cpr_handoff::process::is_gone(old), "nothing was killed");
    e.engine.stop("vm1", false).expect("stop");
    assert!(cpr_handoff::process::is_gone(old) && cpr_handoff::process::is_gone(other[0]), "stop ends both");
    assert_eq!(state(&e, "vm1"), VmState::Stopped);
}

#[test]
fn a_lost_guest_leaves_a_failed_vm_that_starts_afresh() {
    let e = env(&[("vm1", VM)]);
    e.engine.start("vm1").expect("start");
    lock(&FAKE.script).push_back(Script::Lose);
    assert!(matches!(e.engine.upgrade("vm1", ""), Err(CprdError::RollbackFailed(_))));
    assert_eq!(state(&e, "vm1"), VmState::Failed);
    e.engine.start("vm1").expect("start");
    assert_eq!(state(&e, "vm1"), VmState::Running);
}

#[test]
fn a_vm_whose_file_is_removed_is_orphaned_until_stopped() {
    let e = env(&[("vm1", VM), ("vm2", VM)]);
    e.engine.start("vm1").expect("start");
    std::fs::remove_file(e.dir.path().join("etc/vms/vm1.toml")).expect("rm");
    std::fs::remove_file(e.dir.path().join("etc/vms/vm2.toml")).expect("rm");
    e.engine.reload().expect("reload");
    assert_eq!(state(&e, "vm1"), VmState::Orphaned);
    assert!(matches!(e.engine.view("vm2"), Err(CprdError::NoSuchVM(_))));
    assert!(e.engine.start("vm1").is_err());
    e.engine.stop("vm1", false).expect("stop");
    assert!(matches!(e.engine.view("vm1"), Err(CprdError::NoSuchVM(_))), "gone once stopped");
}

#[test]
fn an_orphan_whose_file_comes_back_is_an_ordinary_vm_again() {
    let e = env(&[("vm1", VM)]);
    e.engine.start("vm1").expect("start");
    let file = e.dir.path().join("etc/vms/vm1.toml");
    std::fs::remove_file(&file).expect("rm");
    e.engine.reload().expect("reload");
    std::fs::write(&file, VM).expect("write");
    e.engine.reload().expect("reload");
    assert_eq!(state(&e, "vm1"), VmState::Running);
    e.engine.upgrade("vm1", "").expect("upgrade");
}

#[test]
fn an_unreadable_file_is_quarantined_and_the_others_load() {
    let e = env(&[("good", VM), ("bad", "memory = [\n")]);
    assert_eq!(state(&e, "bad"), VmState::Quarantined);
    assert_eq!(state(&e, "good"), VmState::Stopped);
    let err = e.engine.start("bad").expect_err("quarantined");
    assert!(err.to_string().contains("bad.toml"), "{err}");
    e.engine.start("good").expect("the others start");
}

impl Engine {
    /// The record and the other VMMs the owner holds for a VM.
    fn inspect(&self, name: &str) -> (Option<VmRecord>, Vec<u32>) {
        self.ask(|reply| owner::Request::Inspect { name: name.to_string(), reply }).unwrap_or_default()
    }
}

fn reattach_with_journal(phase: Phase, recovered: Phase) -> (Env, VmRecord, u32) {
    let mut e = env(&[("vm1", VM)]);
    e.engine.start("vm1").expect("start");
    let record = e.engine.inspect("vm1").0.expect("record");
    let new = vmm_process();
    let new_pid = new.id();
    std::mem::forget(new);
    let mut journal = e.engine.journal("vm1");
    journal
        .write(&HandoffRecord {
            vm: "vm1".into(),
            phase,
            from_generation: 0,
            old: cpr_handoff::VmmRef { pid: record.main_pid, control: record.control.clone() },
            new: cpr_handoff::VmmRef { pid: new_pid, control: e.dir.path().join("run/vms/vm1.1.sock") },
            binary: "/bin/sleep".into(),
        })
        .expect("journal");
    *lock(&FAKE.recovery) = Some(recovered);
    // A restarted cprd: a new engine over the same directories.
    let engine =
        Engine::with_backends(None, e.dir.path().join("etc"), e.dir.path().join("run"), fake_backends).expect("engine");
    let mut stored = std::collections::HashMap::new();
    let pending = engine.pending_reattach(&mut stored);
    assert_eq!(engine.view("vm1").expect("view").state, VmState::Starting, "held until re-attached");
    engine.reattach(pending, stored);
    e.engine = engine;
    (e, record, new_pid)
}

#[test]
fn a_handoff_left_committed_is_finished_forward_at_reattach() {
    let (e, before, new_pid) = reattach_with_journal(Phase::Committed, Phase::Done);
    let v = e.engine.view("vm1").expect("view");
    assert_eq!((v.state, v.generation, v.main_pid), (VmState::Running, 1, new_pid));
    assert_ne!(v.main_pid, before.main_pid);
    assert_eq!(e.engine.journal("vm1").read().expect("read"), None, "the journal is cleared");
    kill(before.main_pid);
}

#[test]
fn a_handoff_left_undecidable_needs_attention_at_reattach() {
    let (e, before, new_pid) =
        reattach_with_journal(Phase::Committed, Phase::NeedsAttention("the new VMM does not answer".into()));
    let v = e.engine.view("vm1").expect("view");
    assert_eq!((v.state, v.main_pid), (VmState::NeedsAttention, before.main_pid));
    assert!(!cpr_handoff::process::is_gone(new_pid) && !cpr_handoff::process::is_gone(before.main_pid));
    e.engine.stop("vm1", false).expect("stop");
    assert!(cpr_handoff::process::is_gone(before.main_pid) && cpr_handoff::process::is_gone(new_pid));
}

#[test]
fn resume_of_a_vm_that_needs_attention_waits_until_no_other_vmm_may_run_it() {
    let e = env(&[("vm1", VM)]);
    e.engine.start("vm1").expect("start");
    let old = e.engine.view("vm1").expect("view").main_pid;
    lock(&FAKE.script).push_back(Script::NeedsAttention);
    e.engine.upgrade("vm1", "").expect_err("needs attention");
    let other = e.engine.inspect("vm1").1;
    let err = e.engine.resume("vm1").expect_err("the new VMM still lives");
    assert!(err.to_string().contains(&other[0].to_string()), "{err}");
    kill(other[0]);
    e.engine.resume("vm1").expect("resume");
    let v = e.engine.view("vm1").expect("view");
    assert_eq!((v.state, v.main_pid, v.state_reason.as_str()), (VmState::Running, old, ""));
    assert!(e.engine.resume("vm1").is_err(), "only a VM that needs attention is resumed");
}

#[test]
fn a_long_handoff_blocks_no_call_about_other_vms() {
    let e = env(&[("vm1", VM), ("vm2", VM)]);
    e.engine.start("vm1").expect("start");
    let (go, until) = std::sync::mpsc::channel();
    lock(&FAKE.script).push_back(Script::Hold(until));
    std::thread::scope(|scope| {
        let upgrading = scope.spawn(|| e.engine.upgrade("vm1", ""));
        while state(&e, "vm1") != VmState::Upgrading {
            std::thread::yield_now();
        }
        // vm1's handoff is held inside its backend; everything else goes on.
        e.engine.start("vm2").expect("start vm2");
        assert_eq!(state(&e, "vm2"), VmState::Running);
        e.engine.stop("vm2", false).expect("stop vm2");
        assert_eq!(e.engine.list().len(), 2);
        let err = e.engine.stop("vm1", false).expect_err("vm1 is the handoff's");
        assert!(matches!(err, CprdError::Busy(_)), "{err:?}");
        go.send(()).expect("release");
        assert_eq!(upgrading.join().expect("join").expect("upgrade").1, 1);
    });
    assert_eq!(state(&e, "vm1"), VmState::Running);
}

#[test]
fn runtime_records_end_as_the_last_change_left_them() {
    let names: Vec<String> = (0..6).map(|i| format!("vm{i}")).collect();
    let defs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), VM)).collect();
    let e = env(&defs);
    for name in &names {
        e.engine.start(name).expect("start");
    }
    for _ in 0..4 {
        assert!(e.engine.upgrade_all("").iter().all(|row| row.1), "every upgrade succeeds");
    }
    // Many handoffs ended at once; each record on disk is the VM's last state, not an older one.
    for name in &names {
        let v = e.engine.view(name).expect("view");
        let path = e.dir.path().join("run/vms").join(format!("{name}.json"));
        let on_disk: VmRecord = serde_json::from_slice(&std::fs::read(path).expect("record")).expect("parse");
        assert_eq!((on_disk.generation, on_disk.main_pid), (v.generation, v.main_pid), "{name}");
        assert_eq!(v.generation, 4);
    }
}

/// Runtime records of every format this cprd reads, as earlier cprds wrote them
/// (`tests/golden/`): the one before records had a format (session 8's, no `format`, no
/// `vmm_release`) and format 1. A record of a newer format is refused with the reason.
#[test]
fn runtime_records_of_every_format_this_cprd_reads_are_read() {
    let old: VmRecord =
        serde_json::from_str(include_str!("../../../tests/golden/runtime-record-0.json")).expect("format 0");
    let one: VmRecord =
        serde_json::from_str(include_str!("../../../tests/golden/runtime-record-1.json")).expect("format 1");
    for r in [&old, &one] {
        r.check_format().expect("readable");
        assert_eq!((r.generation, r.main_pid, r.vmm_uid), (3, 4242, Some(0x7000_0000)));
        assert_eq!(r.launch_args.len(), 4);
    }
    assert_eq!((old.format, old.vmm_release.as_str()), (0, ""));
    assert_eq!((one.format, one.vmm_release.as_str()), (1, "11.1.3 (Debian 1:11.1.3+ds-1~bpo13+1)"));
    // What this build writes reads back the same.
    let written = serde_json::to_string(&one).expect("serialize");
    let again: VmRecord = serde_json::from_str(&written).expect("round trip");
    assert_eq!(serde_json::to_value(&again).ok(), serde_json::to_value(&one).ok());
    let newer = VmRecord { format: crate::engine::RECORD_FORMAT + 1, ..one };
    let e = newer.check_format().expect_err("newer");
    assert!(e.contains("record format 2 is newer than this cprd's 1"), "{e}");
}

/// The fd store's state record (`cprd-state`: every VM's runtime record by name, kept by systemd
/// across a cprd restart) as a format-1 cprd writes it (`tests/golden/fdstore-state-1.json`):
/// read by this one, record by record, as `pending_reattach` reads it.
#[test]
fn the_fd_store_state_record_of_format_1_is_read() {
    let state: BTreeMap<String, VmRecord> =
        serde_json::from_str(include_str!("../../../tests/golden/fdstore-state-1.json")).expect("state record");
    assert_eq!(state.keys().map(String::as_str).collect::<Vec<_>>(), ["q", "vm1"]);
    for r in state.values() {
        r.check_format().expect("readable");
        assert_eq!(r.format, 1);
    }
    assert_eq!((state["vm1"].generation, state["vm1"].vmm_release.as_str()), (20, "0.1.0"));
    assert_eq!(state["q"].vmm_uid, Some(0x7000_0000));
}
