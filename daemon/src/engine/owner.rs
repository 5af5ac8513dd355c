//! The owner of cprd's state: one thread holds the VM table, the definitions, the settings and
//! the history, and is the only writer of the runtime records and the fd store's state record.
//! Everyone else (D-Bus handlers, the control socket, reload, reapers, handoff workers) sends it a
//! [`Request`] and waits for the answer. It never waits on a VMM: work that does (starting a VMM,
//! a handoff, a stop) runs on the caller's thread, between a request that claims the VM and one
//! that reports how the work ended. So a slow VMM never blocks calls about other VMs, and every
//! persisted snapshot is written in the order the changes were made.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};

use super::{Event, UpgradeRecord, Vm, VmRecord, VmState, VmView};
use crate::backend;
use crate::config::{Settings, VmDef};
use crate::error::CprdError;

/// Where the owner sends one answer.
pub type Reply<T> = SyncSender<T>;

/// What an operation claimed a VM for; each has its own rule about the states it starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Start its VMM: from stopped or failed (a running VM is a no-op).
    Start,
    /// Stop it: from running, paused, failed, needs-attention or orphaned (a stopped VM is a
    /// no-op).
    Stop,
    /// Pause its guest: from running (a paused VM is a no-op).
    Pause,
    /// Resume the VMM on record: from paused, or from needs-attention once no other VMM that may
    /// hold the guest lives.
    Resume,
    /// Hand it to a new VMM: from running, with a VMM on record.
    Upgrade,
}

/// What a claim hands the operation.
#[derive(Debug)]
#[expect(clippy::large_enum_variant, reason = "one message per operation, moved once: a box would buy nothing")]
pub enum Claim {
    /// Nothing to do (starting a running VM, stopping a stopped one).
    AlreadyDone,
    /// The VM is the operation's until it reports back.
    Claimed {
        /// The state it was in.
        was: VmState,
        /// Its definition (an orphan's last one).
        def: Box<VmDef>,
        /// Its running VMM, if any.
        record: Option<VmRecord>,
        /// Other VMMs that may hold the guest, taken from the VM (stop ends them).
        others: Vec<u32>,
        /// The uid the VM's next VMM's box runs as (start with the sandbox on; upgrade of a boxed
        /// VM).
        uid: Option<u32>,
    },
}

/// How a handoff a worker ran ended.
#[derive(Debug)]
pub enum HandoffEnd {
    /// The new VMM runs the guest; its record.
    Committed(VmRecord),
    /// The old VMM runs the guest again.
    RolledBack(String),
    /// Rolled back to an old VMM that has exited since: no VMM is left.
    RolledBackToAGoneVmm(String),
    /// No VMM holds the guest any more.
    Lost(String),
    /// Neither VMM could be confirmed; another VMM (the new one) may hold the guest.
    NeedsAttention(String, Option<u32>),
}

/// Why re-attach did not take a VM back.
#[derive(Debug)]
#[expect(clippy::large_enum_variant, reason = "one message per VM at start, moved once: a box would buy nothing")]
pub enum NotReattached {
    /// Nothing of use was left: the VM is stopped.
    Nothing,
    /// A VMM may hold the guest: kept, with its record and another VMM, in needs-attention.
    Attention {
        /// Why.
        why: String,
        /// The VMM on record.
        record: VmRecord,
        /// Another VMM that may hold the guest.
        other_pid: Option<u32>,
    },
}

/// What became of a reload's finding that a VM's configured VMM binary changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// The VM runs: the reload upgrades it now.
    Running,
    /// Its guest does not run (paused, being resumed or re-attached, needing attention): marked
    /// in its record, it is upgraded as soon as its guest runs.
    Marked,
    /// In another operation (starting, upgrading, stopping): the reload reports it as not moved.
    Busy(VmState),
    /// No VMM on record; or a mark was taken back.
    Nothing,
}

/// A request to the owner of cprd's state.
#[derive(Debug)]
pub enum Request {
    /// A VM's definition (an orphan's last one).
    Def { name: String, reply: Reply<Result<VmDef, CprdError>> },
    /// The settings in effect.
    Settings { reply: Reply<Settings> },
    /// A snapshot of one VM.
    View { name: String, reply: Reply<Result<VmView, CprdError>> },
    /// Snapshots of every VM, in name order.
    List { reply: Reply<Vec<VmView>> },
    /// Past upgrades, oldest first.
    History { reply: Reply<Vec<UpgradeRecord>> },
    /// cprd's metrics in the Prometheus text format.
    Metrics { reply: Reply<String> },
    /// Claims a VM for an operation.
    Claim { name: String, purpose: Purpose, reply: Reply<Result<Claim, CprdError>> },
    /// An operation that claimed a VM changed nothing: it goes back to `state`.
    Release { name: String, state: VmState },
    /// A VMM runs the VM's guest: its record and memfd are kept and persisted.
    Adopt { name: String, record: VmRecord, memfd: OwnedFd, reply: Reply<()> },
    /// A VMM cprd watched has exited.
    VmmExited { name: String, pid: u32, how: String },
    /// A stop finished: every VMM of the VM is gone.
    Stopped { name: String, reply: Reply<()> },
    /// An operator's resume ended (`Ok`: the VMM on record runs the guest again).
    Resumed { name: String, result: Result<(), String>, reply: Reply<()> },
    /// An operator's pause ended (`Ok`: the VMM on record holds the guest paused).
    Paused { name: String, result: Result<(), String>, reply: Reply<()> },
    /// A reload compared a VM's VMM with its configured binary (`due`: they differ): a running VM
    /// is the reload's to upgrade; a paused one (or one being resumed, re-attached, or needing
    /// attention) is marked, persisted, to be upgraded as soon as its guest runs; `due` false
    /// takes a mark back.
    MarkUpgradeDue { name: String, due: bool, reply: Reply<Due> },
    /// A handoff ended; the answer is the upgrade's result.
    HandoffEnded { name: String, end: HandoffEnd, reply: Reply<Result<(u64, u64), CprdError>> },
    /// An upgrade attempt ended (`id`: when it began): logged, kept in the history, signalled.
    UpgradeEnded {
        name: String,
        id: u64,
        outcome: Result<(u64, u64), CprdError>,
        releases: (String, String),
        reply: Reply<()>,
    },
    /// A reload read a new configuration.
    Configure { settings: Box<Settings>, defs: BTreeMap<String, VmDef>, reply: Reply<()> },
    /// VMs a previous cprd left running: held in `starting` until re-attach decides.
    AwaitReattach { names: Vec<String>, reply: Reply<()> },
    /// Re-attach of a VM ended without adopting a VMM.
    NotReattached { name: String, why: NotReattached, reply: Reply<()> },
    /// The record and other VMMs the owner holds for a VM (for the engine's tests).
    #[cfg(test)]
    Inspect { name: String, reply: Reply<Option<(Option<VmRecord>, Vec<u32>)>> },
}

/// The state the owner holds.
#[derive(Debug)]
pub struct Table {
    /// For messages that point at the configuration.
    pub config_dir: PathBuf,
    /// Runtime records and handoff journals live in `runtime_dir/vms`.
    pub runtime_dir: PathBuf,
    /// The settings in effect.
    pub settings: Settings,
    /// The VM definitions in effect.
    pub defs: BTreeMap<String, VmDef>,
    /// Every VM cprd knows of.
    pub vms: BTreeMap<String, Vm>,
    /// Past upgrades.
    pub history: Vec<UpgradeRecord>,
    /// Where changes are announced.
    pub events: tokio::sync::broadcast::Sender<Event>,
    /// The backends (for what they hold per VM).
    pub backends: backend::Backends,
    /// The counters behind `cprctl metrics`.
    pub metrics: crate::metrics::Metrics,
    /// VMs a previous cprd left running, until re-attach adopts them or gives up.
    pub reattaching: std::collections::BTreeSet<String>,
}

/// Serves requests until every sender is gone.
pub fn serve(mut table: Table, requests: Receiver<Request>) {
    while let Ok(request) = requests.recv() {
        table.handle(request);
    }
}

/// Writes `bytes` to `path` atomically (temporary file + rename). Failures are logged, never fatal:
/// a full /run must not kill a VM.
fn write_atomic(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        tracing::warn!("cannot write runtime record {}: {e} (the VM keeps running)", path.display());
    }
}

/// Sends an answer; a requester that went away takes none, which is not the owner's concern.
fn answer<T>(reply: Reply<T>, value: T) {
    let _ = reply.send(value);
}

impl Table {
    fn handle(&mut self, request: Request) {
        match request {
            Request::Def { name, reply } => answer(reply, self.def(&name)),
            Request::Settings { reply } => answer(reply, self.settings.clone()),
            Request::View { name, reply } => answer(reply, self.view(&name)),
            Request::List { reply } => answer(reply, self.views()),
            Request::History { reply } => answer(reply, self.history.clone()),
            Request::Metrics { reply } => answer(reply, self.metrics.render(&self.views())),
            Request::Claim { name, purpose, reply } => answer(reply, self.claim(&name, purpose)),
            Request::Release { name, state } => self.set_state(&name, state),
            Request::Adopt { name, record, memfd, reply } => {
                self.adopt(&name, record, memfd);
                answer(reply, ());
            }
            Request::VmmExited { name, pid, how } => self.vmm_exited(&name, pid, &how),
            Request::Stopped { name, reply } => {
                self.stopped(&name);
                answer(reply, ());
            }
            Request::Resumed { name, result, reply } => {
                self.resumed(&name, result);
                answer(reply, ());
            }
            Request::MarkUpgradeDue { name, due, reply } => {
                let answer_ = self.mark_upgrade_due(&name, due);
                answer(reply, answer_);
            }
            Request::Paused { name, result, reply } => {
                self.paused(&name, result);
                answer(reply, ());
            }
            Request::HandoffEnded { name, end, reply } => answer(reply, self.handoff_ended(&name, end)),
            Request::UpgradeEnded { name, id, outcome, releases, reply } => {
                self.upgrade_ended(&name, id, outcome, releases);
                answer(reply, ());
            }
            Request::Configure { settings, defs, reply } => {
                self.configure(*settings, defs);
                answer(reply, ());
            }
            Request::AwaitReattach { names, reply } => {
                for name in names {
                    if let Some(vm) = self.vms.get_mut(&name)
                        && vm.state != VmState::Quarantined
                    {
                        vm.state = VmState::Starting;
                        self.reattaching.insert(name);
                    }
                }
                answer(reply, ());
            }
            Request::NotReattached { name, why, reply } => {
                self.not_reattached(&name, why);
                answer(reply, ());
            }
            #[cfg(test)]
            Request::Inspect { name, reply } => {
                answer(reply, self.vms.get(&name).map(|vm| (vm.record.clone(), vm.other_pids.clone())));
            }
        }
    }

    fn emit(&self, name: &str) {
        let _ = self.events.send(Event::VmChanged(name.to_string()));
    }

    fn def(&self, name: &str) -> Result<VmDef, CprdError> {
        if let Some(def) = self.defs.get(name) {
            return Ok(def.clone());
        }
        match self.vms.get(name) {
            Some(Vm { orphan_def: Some(def), .. }) => Ok(def.clone()),
            Some(Vm { state: VmState::Quarantined, attention: Some(why), .. }) => Err(CprdError::InvalidArgument(
                format!("the definition of VM {name} cannot be read: {why}; fix it and reload"),
            )),
            _ => Err(CprdError::NoSuchVM(format!(
                "no VM named {name:?} is defined (see {}/vms)",
                self.config_dir.display()
            ))),
        }
    }

    /// Snapshots of every VM, in name order.
    fn views(&self) -> Vec<VmView> {
        self.vms.keys().filter_map(|n| self.view(n).ok()).collect()
    }

    fn view(&self, name: &str) -> Result<VmView, CprdError> {
        // A quarantined VM has no definition to show; it is listed with its state alone.
        let def = match self.def(name) {
            Ok(def) => Some(def),
            Err(CprdError::InvalidArgument(_)) => None,
            Err(e) => return Err(e),
        };
        let vm = self.vms.get(name).ok_or_else(|| CprdError::NoSuchVM(format!("no VM named {name:?}")))?;
        let r = vm.record.as_ref();
        Ok(VmView {
            name: name.to_string(),
            state: vm.state,
            backend: def.as_ref().map_or_else(String::new, |d| d.backend.as_str().to_string()),
            generation: r.map_or(0, |r| r.generation),
            main_pid: r.map_or(0, |r| r.main_pid),
            vmm_binary: r.map_or_else(String::new, |r| r.vmm_binary.display().to_string()),
            vmm_version: r.map_or_else(String::new, |r| r.vmm_version.clone()),
            memory_bytes: def.as_ref().map_or(0, |d| d.memory_bytes),
            vcpus: def.as_ref().map_or(0, |d| d.vcpus),
            last_downtime_usec: r.map_or(0, |r| r.last_downtime_usec),
            console: r.map_or_else(String::new, |r| r.console.display().to_string()),
            state_reason: vm.attention.clone().unwrap_or_default(),
            vmm_uid: vm.uid,
            vmm_release: r.map_or_else(String::new, |r| r.vmm_release.clone()),
            machine_type: r.map_or_else(String::new, |r| machine_type_of(&r.launch_args)),
            upgrade_due: r.is_some_and(|r| r.upgrade_on_resume),
        })
    }

    fn set_state(&mut self, name: &str, state: VmState) {
        if let Some(vm) = self.vms.get_mut(name) {
            vm.state = state;
        }
        self.emit(name);
    }

    fn claim(&mut self, name: &str, purpose: Purpose) -> Result<Claim, CprdError> {
        let def = self.def(name)?;
        let vm = self.vms.get_mut(name).ok_or_else(|| CprdError::NoSuchVM(format!("no VM named {name:?}")))?;
        let (from, to): (&[VmState], VmState) = match purpose {
            Purpose::Start if vm.state == VmState::Running => return Ok(Claim::AlreadyDone),
            Purpose::Start => (&[VmState::Stopped, VmState::Failed], VmState::Starting),
            Purpose::Stop if vm.state == VmState::Stopped => return Ok(Claim::AlreadyDone),
            Purpose::Stop => (
                &[VmState::Running, VmState::Paused, VmState::Failed, VmState::NeedsAttention, VmState::Orphaned],
                VmState::Stopping,
            ),
            Purpose::Pause if vm.state == VmState::Paused => return Ok(Claim::AlreadyDone),
            // Paused from the claim on: no upgrade or other claim starts meanwhile; a failed
            // pause goes back to running.
            Purpose::Pause => (&[VmState::Running], VmState::Paused),
            Purpose::Resume => (&[VmState::NeedsAttention, VmState::Paused], VmState::Starting),
            Purpose::Upgrade => (&[VmState::Running], VmState::Upgrading),
        };
        if let (false, Some(why), false) = (from.contains(&vm.state), &vm.attention, vm.state == VmState::Failed) {
            return Err(CprdError::Busy(format!(
                "VM {name} needs attention ({why}); stop it to end every VMM it may have"
            )));
        }
        if !from.contains(&vm.state) {
            return Err(CprdError::Busy(format!("VM {name} is {}; try again when it is not", vm.state.as_str())));
        }
        if purpose == Purpose::Resume
            && let Some(pid) = vm.other_pids.iter().copied().find(|p| !cpr_handoff::process::is_gone(*p))
        {
            return Err(CprdError::Busy(format!(
                "another VMM of {name} (pid {pid}) may run the guest; it must be gone before the old one resumes"
            )));
        }
        if purpose == Purpose::Upgrade && vm.record.is_none() {
            return Err(CprdError::InvalidArgument(format!("VM {name} has no running VMM")));
        }
        // A VM keeps the box it started with across upgrades, whatever the setting says now: a
        // boxed QEMU pair must meet where both boxes see the channel, and an unboxed VMM started
        // by an earlier cprd moves into a box at its next start.
        let uid = match (purpose, self.settings.sandbox) {
            (Purpose::Start, Some(range)) => Some(self.vmm_uid(name, range)?),
            (Purpose::Upgrade, _) => self.vms.get(name).and_then(|vm| vm.record.as_ref()).and_then(|r| r.vmm_uid),
            _ => None,
        };
        let Some(vm) = self.vms.get_mut(name) else { return Err(CprdError::NoSuchVM(format!("no VM named {name:?}"))) };
        let was = std::mem::replace(&mut vm.state, to);
        let others = if purpose == Purpose::Stop { std::mem::take(&mut vm.other_pids) } else { Vec::new() };
        let record = vm.record.clone();
        self.emit(name);
        Ok(Claim::Claimed { was, def: Box::new(def), record, others, uid })
    }

    /// The uid of `name`'s VMMs: the one it has (a boxed VMM's, kept across upgrades), else the
    /// lowest of the range no other VM holds.
    fn vmm_uid(&mut self, name: &str, range: crate::config::SandboxSettings) -> Result<u32, CprdError> {
        let in_range = |u: &u32| (range.first_uid..range.first_uid + range.count).contains(u);
        let current = self.vms.get(name).and_then(|vm| vm.record.as_ref().and_then(|r| r.vmm_uid).or(vm.uid));
        if let Some(uid) = current.filter(in_range) {
            return Ok(uid);
        }
        let taken: std::collections::BTreeSet<u32> = self
            .vms
            .iter()
            .filter(|(n, _)| n.as_str() != name)
            .flat_map(|(_, vm)| [vm.uid, vm.record.as_ref().and_then(|r| r.vmm_uid)])
            .flatten()
            .collect();
        let uid = (range.first_uid..range.first_uid + range.count)
            .find(|u| !taken.contains(u))
            .ok_or_else(|| CprdError::Busy(format!("all {} VMM uids of the sandbox range are in use", range.count)))?;
        if let Some(vm) = self.vms.get_mut(name) {
            vm.uid = Some(uid);
        }
        Ok(uid)
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.runtime_dir.join("vms").join(format!("{name}.json"))
    }

    /// Writes a VM's runtime record to `/run/cprd` and every record to the fd store's state memfd.
    /// Only the owner writes them, so they land in the order of the changes.
    fn persist(&self, name: &str) {
        match self.vms.get(name).and_then(|vm| vm.record.as_ref()) {
            // A record an older cprd wrote is written in this cprd's format from now on.
            Some(r) if r.format != super::RECORD_FORMAT => {
                let r = VmRecord { format: super::RECORD_FORMAT, ..r.clone() };
                write_atomic(&self.record_path(name), &serde_json::to_vec_pretty(&r).unwrap_or_default());
            }
            Some(r) => write_atomic(&self.record_path(name), &serde_json::to_vec_pretty(r).unwrap_or_default()),
            None => {
                let _ = std::fs::remove_file(self.record_path(name));
            }
        }
        let all: BTreeMap<&String, &VmRecord> =
            self.vms.iter().filter_map(|(n, v)| v.record.as_ref().map(|r| (n, r))).collect();
        crate::fdstore::push_state(&serde_json::to_vec(&all).unwrap_or_default());
    }

    fn journal(&self, name: &str) -> cpr_handoff::FileJournal {
        cpr_handoff::FileJournal::new(&self.runtime_dir.join("vms"), name)
    }

    fn adopt(&mut self, name: &str, record: VmRecord, memfd: OwnedFd) {
        if self.reattaching.remove(name) {
            self.metrics.reattached();
        }
        crate::fdstore::push(&crate::fdstore::mem_name(name), memfd.as_fd());
        crate::fdstore::push_pidfd(name, record.main_pid);
        if let Some(vm) = self.vms.get_mut(name) {
            vm.uid = record.vmm_uid.or(vm.uid);
            vm.attention = None;
            vm.state = if record.paused { VmState::Paused } else { VmState::Running };
            vm.record = Some(record);
            vm.memfd = Some(memfd);
        }
        self.persist(name);
        self.emit(name);
    }

    /// What the backend and the fd store hold for a VM whose guest is gone is dropped.
    fn drop_guest(&mut self, name: &str) {
        if let Ok(b) = self.def(name).and_then(|d| (self.backends)(d.backend)) {
            b.forget(name);
        }
        // The guest is gone: its memory must not outlive it in the fd store.
        crate::fdstore::remove(&crate::fdstore::mem_name(name));
        crate::fdstore::remove(&crate::fdstore::pid_name(name));
    }

    fn vmm_exited(&mut self, name: &str, pid: u32, how: &str) {
        let Some(vm) = self.vms.get_mut(name) else { return };
        if vm.other_pids.contains(&pid) {
            vm.other_pids.retain(|p| *p != pid);
            tracing::warn!(CPRD_VM = name, "a second VMM of {name} (pid {pid}) exited: {how}");
            return;
        }
        let current = vm.record.as_ref().is_some_and(|r| r.main_pid == pid);
        // An older generation quitting after its handoff, or the old VMM of a handoff in flight
        // (the handoff decides what its exit means, and reports how it ended), or a VMM being
        // stopped (the stop reports).
        if !current || matches!(vm.state, VmState::Upgrading | VmState::Stopping) {
            return;
        }
        vm.state = VmState::Failed;
        vm.record = None;
        vm.memfd = None;
        vm.attention = Some(format!("its VMM (pid {pid}) died: {how}"));
        self.drop_guest(name);
        tracing::error!(CPRD_VM = name, "VMM of {name} (pid {pid}) died unexpectedly: {how}");
        self.persist(name);
        self.emit(name);
    }

    fn stopped(&mut self, name: &str) {
        self.drop_guest(name);
        if self.vms.get(name).is_some_and(|vm| vm.orphan_def.is_some()) {
            // An orphaned VM leaves the table once it is stopped.
            self.vms.remove(name);
        } else if let Some(vm) = self.vms.get_mut(name) {
            *vm = Vm::stopped();
        }
        self.journal(name).remove();
        self.persist(name);
        tracing::info!(CPRD_VM = name, "stopped VM {name}");
        self.emit(name);
    }

    fn resumed(&mut self, name: &str, result: Result<(), String>) {
        let Some(vm) = self.vms.get_mut(name) else { return };
        // Only a VM that needs attention has a reason for it; a resume from paused had none.
        let needed_attention = vm.attention.is_some();
        match result {
            Ok(()) => {
                vm.state = VmState::Running;
                vm.attention = None;
                vm.other_pids.clear();
                let pid = vm.record.as_mut().map_or(0, |r| {
                    r.paused = false;
                    r.main_pid
                });
                self.journal(name).remove();
                self.persist(name);
                if needed_attention {
                    tracing::warn!(CPRD_VM = name, "VM {name} resumed in its VMM (pid {pid}) by an operator");
                } else {
                    tracing::info!(CPRD_VM = name, "VM {name} resumed (VMM pid {pid})");
                }
            }
            Err(_) if needed_attention => vm.state = VmState::NeedsAttention,
            Err(_) => vm.state = VmState::Paused,
        }
        self.emit(name);
    }

    fn mark_upgrade_due(&mut self, name: &str, due: bool) -> Due {
        let Some(vm) = self.vms.get_mut(name) else { return Due::Nothing };
        let state = vm.state;
        let Some(record) = vm.record.as_mut() else { return Due::Nothing };
        let (mark, answer) = match (due, state) {
            (false, _) => (false, Due::Nothing),
            (true, VmState::Running) => (false, Due::Running),
            (true, VmState::Paused | VmState::NeedsAttention | VmState::Starting) => (true, Due::Marked),
            (true, busy) => return Due::Busy(busy),
        };
        if record.upgrade_on_resume != mark {
            record.upgrade_on_resume = mark;
            self.persist(name);
            self.emit(name);
        }
        answer
    }

    fn paused(&mut self, name: &str, result: Result<(), String>) {
        let Some(vm) = self.vms.get_mut(name) else { return };
        match (result, vm.record.as_mut()) {
            (Ok(()), Some(record)) => {
                record.paused = true;
                vm.state = VmState::Paused;
                self.persist(name);
                tracing::info!(CPRD_VM = name, "VM {name} paused");
            }
            _ => vm.state = VmState::Running,
        }
        self.emit(name);
    }

    /// Marks a VM whose VMMs are gone: nothing is left to keep.
    fn set_exited(&mut self, name: &str) {
        if let Some(vm) = self.vms.get_mut(name) {
            vm.state = VmState::Failed;
            vm.record = None;
            vm.memfd = None;
            vm.other_pids.clear();
        }
        self.drop_guest(name);
    }

    /// Puts a VM in [`VmState::NeedsAttention`], says why in the journal, and remembers another
    /// VMM that may hold the guest.
    fn needs_attention(&mut self, name: &str, why: &str, other: Option<u32>) {
        if let Some(vm) = self.vms.get_mut(name) {
            vm.state = VmState::NeedsAttention;
            vm.attention = Some(why.to_string());
            vm.other_pids.extend(other.filter(|p| *p != 0));
        }
        tracing::error!(CPRD_VM = name, "VM {name} needs attention: {why}");
    }

    fn handoff_ended(&mut self, name: &str, end: HandoffEnd) -> Result<(u64, u64), CprdError> {
        let old_pid = self.vms.get(name).and_then(|vm| vm.record.as_ref()).map_or(0, |r| r.main_pid);
        let result = match end {
            HandoffEnd::Committed(record) => {
                crate::fdstore::push_pidfd(name, record.main_pid);
                let done = (record.last_downtime_usec, record.generation);
                if let Some(vm) = self.vms.get_mut(name) {
                    vm.record = Some(record);
                    vm.state = VmState::Running;
                }
                Ok(done)
            }
            HandoffEnd::RolledBack(m) => {
                self.set_state(name, VmState::Running);
                Err(CprdError::UpgradeFailed(format!(
                    "upgrade of {name} failed; the guest runs on in the old VMM: {m}"
                )))
            }
            HandoffEnd::RolledBackToAGoneVmm(m) => {
                // Rolled back to a VMM that has died since (it died while the VM was upgrading,
                // when its exit was the handoff's to interpret): the VM has no VMM.
                self.set_exited(name);
                Err(CprdError::UpgradeFailed(format!(
                    "upgrade of {name} failed and its VMM (pid {old_pid}) has exited: {m}"
                )))
            }
            HandoffEnd::Lost(m) => {
                self.set_exited(name);
                Err(CprdError::RollbackFailed(format!("upgrade of {name} failed and no VMM holds the guest: {m}")))
            }
            HandoffEnd::NeedsAttention(m, other) => {
                self.needs_attention(name, &m, other);
                Err(CprdError::RollbackFailed(format!("upgrade of {name} needs attention: {m}")))
            }
        };
        if !self.vms.get(name).is_some_and(|vm| vm.state == VmState::NeedsAttention) {
            self.journal(name).remove();
        }
        self.persist(name);
        self.emit(name);
        result
    }

    fn upgrade_ended(
        &mut self,
        name: &str,
        id: u64,
        outcome: Result<(u64, u64), CprdError>,
        (from_release, to_release): (String, String),
    ) {
        let rec = UpgradeRecord {
            id,
            vm: name.to_string(),
            time_usec: super::now_usec(),
            generation: self.vms.get(name).and_then(|vm| vm.record.as_ref()).map_or(0, |r| r.generation),
            ok: outcome.is_ok(),
            downtime_usec: outcome.as_ref().map_or(0, |(d, _)| *d),
            error: outcome.as_ref().err().map_or_else(String::new, ToString::to_string),
            from_release,
            to_release,
        };
        tracing::info!(
            CPRD_VM = name,
            CPRD_UPGRADE_ID = rec.id,
            CPRD_DOWNTIME_USEC = rec.downtime_usec,
            CPRD_RESULT = if rec.ok { "ok" } else { "failed" },
            "upgrade of {name}: {}",
            if rec.ok {
                format!("generation {}, downtime {} us", rec.generation, rec.downtime_usec)
            } else {
                rec.error.clone()
            }
        );
        let backend = self.def(name).map(|d| d.backend.as_str().to_string()).unwrap_or_default();
        self.metrics.upgrade_ended(&backend, &outcome);
        self.history.push(rec.clone());
        keep_recent(&mut self.history, HISTORY_KEPT);
        let _ = self.events.send(Event::UpgradeFinished(rec));
        self.emit(name);
    }

    fn configure(&mut self, settings: Settings, defs: BTreeMap<String, VmDef>) {
        crate::console::set_limits(settings.console);
        for name in defs.keys() {
            let vm = self.vms.entry(name.clone()).or_insert_with(Vm::stopped);
            match vm.state {
                VmState::Quarantined => *vm = Vm::stopped(),
                // Its file is back: it is an ordinary VM again.
                VmState::Orphaned => {
                    vm.state = VmState::Running;
                    vm.orphan_def = None;
                }
                _ => {}
            }
        }
        self.vms.retain(|n, vm| defs.contains_key(n) || vm.record.is_some());
        // A VM whose file is gone but whose VMM runs stays listed and stoppable.
        for (name, vm) in self.vms.iter_mut().filter(|(n, _)| !defs.contains_key(*n)) {
            if vm.orphan_def.is_none() {
                vm.orphan_def = self.defs.get(name).cloned();
            }
            if vm.state == VmState::Running {
                vm.state = VmState::Orphaned;
                tracing::warn!(CPRD_VM = name, "the definition of {name} is gone; it runs on, orphaned, until stopped");
            }
        }
        self.settings = settings;
        self.defs = defs;
        let names: Vec<String> = self.vms.keys().cloned().collect();
        for name in names {
            self.emit(&name);
        }
        tracing::info!("configuration reloaded");
    }

    fn not_reattached(&mut self, name: &str, why: NotReattached) {
        self.reattaching.remove(name);
        if let NotReattached::Attention { why, record, other_pid } = why {
            // A VMM that may hold the guest is never dropped: the VM stays listed with its record,
            // so that a human can stop it, and nothing is killed.
            if let Some(vm) = self.vms.get_mut(name) {
                vm.record = Some(record);
            }
            self.needs_attention(name, &why, other_pid);
            self.persist(name);
        }
        // Not re-attached: back to where it stood before (unless something above decided).
        if let Some(vm) = self.vms.get_mut(name)
            && vm.state == VmState::Starting
        {
            vm.state = VmState::Stopped;
        }
        self.emit(name);
    }
}

/// The machine type on a QEMU command line (`-machine TYPE,options`), empty if there is none.
fn machine_type_of(args: &[String]) -> String {
    args.iter()
        .zip(args.iter().skip(1))
        .find(|(flag, _)| *flag == "-machine")
        .and_then(|(_, value)| value.split(',').next())
        .unwrap_or_default()
        .to_string()
}

/// Upgrades kept in the history (`GetHistory`, `GetUpgrades`, `cprctl history`); older ones
/// are in the journal (`CPRD_UPGRADE_ID`, `CPRD_RESULT`, ...). Unbounded, the history grew by
/// about 0.4 KiB per upgrade for as long as cprd ran (`cpr-bench --soak`: +748 KiB of RSS over
/// 1800 upgrades).
pub const HISTORY_KEPT: usize = 1000;

/// Drops the oldest entries beyond the `kept` newest.
fn keep_recent(history: &mut Vec<UpgradeRecord>, kept: usize) {
    if history.len() > kept {
        let excess = history.len() - kept;
        history.drain(..excess);
    }
}

#[cfg(test)]
mod history_tests {
    use super::*;

    #[test]
    fn the_history_keeps_only_the_newest_upgrades() {
        let rec = |id: u64| UpgradeRecord {
            id,
            vm: "vm1".into(),
            time_usec: id,
            generation: id,
            ok: true,
            downtime_usec: 1,
            error: String::new(),
            from_release: String::new(),
            to_release: String::new(),
        };
        let mut history: Vec<UpgradeRecord> = Vec::new();
        for id in 1..=HISTORY_KEPT as u64 + 5 {
            history.push(rec(id));
            keep_recent(&mut history, HISTORY_KEPT);
        }
        assert_eq!(history.len(), HISTORY_KEPT);
        assert_eq!((history[0].id, history[HISTORY_KEPT - 1].id), (6, HISTORY_KEPT as u64 + 5));
    }
}
