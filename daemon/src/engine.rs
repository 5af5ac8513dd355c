//! The engine: every VM (its memfd, its VMM process, its runtime record) and the requests that act
//! on them. D-Bus is a thin adapter over it. The VM table has one owner ([`owner`], a thread of
//! its own) that every change goes through, in order; blocking work (starting a VMM, a handoff, a
//! stop) runs on the caller's thread between a claim of the VM and a report of how it ended.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::backend;
use crate::config::{self, Settings, VmDef};
use crate::error::CprdError;

mod owner;

/// cprd's handoff journal: one file per VM under the runtime directory, which outlives cprd
/// (`RuntimeDirectoryPreserve=yes`) and is read back at start before anything else is done.
#[derive(Debug)]
pub struct CprdJournal {
    file: cpr_handoff::FileJournal,
}

impl CprdJournal {
    fn read(&self) -> Result<Option<cpr_handoff::HandoffRecord>, String> {
        self.file.read()
    }

    fn remove(&mut self) {
        self.file.remove();
    }
}

impl cpr_handoff::Journal for CprdJournal {
    fn write(&mut self, record: &cpr_handoff::HandoffRecord) -> Result<(), String> {
        self.file.write(record)?;
        // Fault injection for tests: cprd dies right after persisting a phase, a point a real
        // crash cannot be aimed at (e.g. `die-at:committed`: the decision is on record, the
        // commit not yet sent). The restarted cprd must finish from the record.
        static DIE_AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let die_at = DIE_AT.get_or_init(|| {
            std::env::var("CPRD_FAULT").ok().and_then(|f| f.strip_prefix("die-at:").map(str::to_string))
        });
        if die_at.as_deref() == Some(record.phase.name()) {
            tracing::error!("fault injection: dying at handoff phase {}", record.phase.name());
            std::process::abort();
        }
        Ok(())
    }
}

/// How many handoffs `UpgradeAll` runs at once.
pub const UPGRADE_ALL_PARALLEL: usize = 16;

/// A VM's lifecycle state as shown on D-Bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Defined, not running.
    Stopped,
    /// Its VMM is starting.
    Starting,
    /// Running.
    Running,
    /// Its VMM holds the guest with every vCPU stopped, on an operator's request (`PauseVM`,
    /// `machinectl pause`) until `ResumeVM`; kept so across cprd restarts. Not upgraded while
    /// paused.
    Paused,
    /// A handoff to a new VMM is in flight.
    Upgrading,
    /// Being stopped.
    Stopping,
    /// Its VMM exited (or the guest was lost in a handoff): nothing is left to keep.
    Failed,
    /// Its definition file was removed (and reloaded) while its VMM ran: it stays listed, with
    /// the definition it ran with, until it is stopped.
    Orphaned,
    /// Its definition file cannot be read (the error says why): nothing runs; fix the file and
    /// reload.
    Quarantined,
    /// A VMM may hold the guest but cprd could not confirm which one runs it (a handoff that
    /// could not be finished or rolled back, or a VMM that did not answer at re-attach): both are
    /// kept, nothing is killed; `StopVM` ends them, `StartVM` refuses.
    NeedsAttention,
}

impl VmState {
    /// The name used on D-Bus.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Upgrading => "upgrading",
            Self::Stopping => "stopping",
            Self::Failed => "failed",
            Self::NeedsAttention => "needs-attention",
            Self::Orphaned => "orphaned",
            Self::Quarantined => "quarantined",
        }
    }
}

/// What cprd keeps about a VM whose VMM runs (persisted under the runtime directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The record's format ([`RECORD_FORMAT`]; 0 in records of cprds before it had one, which
    /// this format reads alike). A cprd adopts records of its own format or older; a VM whose
    /// record is newer needs attention, with the reason, and its VMM is kept.
    #[serde(default)]
    pub format: u32,
    /// Handoffs so far.
    pub generation: u64,
    /// The VMM's pid.
    pub main_pid: u32,
    /// Its control socket.
    pub control: PathBuf,
    /// Its binary.
    pub vmm_binary: PathBuf,
    /// Its build id.
    pub vmm_version: String,
    /// Downtime of the last upgrade.
    pub last_downtime_usec: u64,
    /// Where the serial console is logged.
    pub console: PathBuf,
    /// The VMM's command line arguments where every generation must get the same (QEMU).
    #[serde(default)]
    pub launch_args: Vec<String>,
    /// The uid (and gid) the VMM's box runs as; `None`: not boxed in (sandbox turned off, or
    /// started by a cprd before the sandbox).
    #[serde(default)]
    pub vmm_uid: Option<u32>,
    /// The VMM's release in words (`11.1.3 (Debian 1:11.1.3+ds-1~bpo13+1)` for a QEMU, the
    /// package version for a cpr-vmm); empty where a cprd before it started the VMM.
    #[serde(default)]
    pub vmm_release: String,
    /// The guest is paused on an operator's request ([`VmState::Paused`]); written only when
    /// true, so the records of running VMs are as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// A reload found the configured VMM binary of this VM changed while its guest did not run
    /// (paused, being resumed or re-attached, needing attention): it is handed to that binary as
    /// soon as the guest runs (a paused guest is never run to be upgraded). Written only when true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub upgrade_on_resume: bool,
}

/// The format of the runtime records this cprd writes (`/run/cprd/vms/NAME.json` and the fd
/// store's state record). New fields come with defaults and keep the format; a change an older
/// cprd would misread bumps it. Golden files of each format are in `tests/golden/`.
pub const RECORD_FORMAT: u32 = 1;

impl VmRecord {
    /// Checks that this cprd reads the record's format.
    pub fn check_format(&self) -> Result<(), String> {
        if self.format > RECORD_FORMAT {
            return Err(format!(
                "record format {} is newer than this cprd's {RECORD_FORMAT} (written by a newer cprd)",
                self.format
            ));
        }
        Ok(())
    }
}

/// How a VMM ended (a seccomp kill named as such).
pub fn exit_description(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) if s.signal() == Some(libc::SIGSYS) => {
            "killed by SIGSYS: it made a system call its seccomp filter forbids".to_string()
        }
        Ok(s) => s.to_string(),
        Err(e) => format!("cannot be waited for: {e}"),
    }
}

/// The exit status a `waitid(WEXITED)` that returned `waited` filled into `info`; `None` when it
/// reaped nothing (not our child, or not yet exited).
fn siginfo_exit_status(waited: libc::c_int, info: &libc::siginfo_t) -> Option<std::process::ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    // SAFETY: waitid filled the child fields of `info` (si_pid 0 when it reaped nothing).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if waited != 0 || pid == 0 {
        return None;
    }
    // The raw wait status: exit code in bits 8-15; a signal in bits 0-6, 0x80 for a core dump.
    let raw = match info.si_code {
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_KILLED => status & 0x7f,
        libc::CLD_DUMPED => (status & 0x7f) | 0x80,
        _ => return None,
    };
    Some(std::process::ExitStatus::from_raw(raw))
}

/// What a reload did to the VMs.
#[derive(Debug, Default)]
pub struct ReloadOutcome {
    /// (VM, handed over, downtime µs, error) of each running VM whose configured VMM binary
    /// changed.
    pub upgrades: Vec<(String, bool, u64, String)>,
    /// The VMs whose configured VMM binary changed while their guest did not run (marked): each
    /// is handed to it once its guest runs.
    pub deferred: Vec<String>,
}

/// A VM as the engine holds it.
#[derive(Debug)]
pub struct Vm {
    /// Lifecycle state.
    pub state: VmState,
    /// The running VMM, if any.
    pub record: Option<VmRecord>,
    /// cprd's own reference to the guest-RAM memfd.
    pub memfd: Option<OwnedFd>,
    /// Why the VM needs attention, or why its file was quarantined.
    pub attention: Option<String>,
    /// The definition an orphaned VM ran with (its file is gone).
    pub orphan_def: Option<VmDef>,
    /// VMMs besides the record's that may hold the guest (the new VMM of a handoff that ended
    /// in [`VmState::NeedsAttention`]); stopping the VM ends them too.
    pub other_pids: Vec<u32>,
    /// The uid its VMMs' box runs as, kept from its first boxed start while cprd knows the VM.
    pub uid: Option<u32>,
}

impl Vm {
    fn stopped() -> Self {
        Self {
            state: VmState::Stopped,
            record: None,
            memfd: None,
            attention: None,
            orphan_def: None,
            other_pids: Vec::new(),
            uid: None,
        }
    }
}

/// A snapshot of one VM for readers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmView {
    /// Name.
    pub name: String,
    /// State.
    pub state: VmState,
    /// Backend name.
    pub backend: String,
    /// Generation.
    pub generation: u64,
    /// VMM pid (0 when stopped).
    pub main_pid: u32,
    /// VMM binary.
    pub vmm_binary: String,
    /// VMM build id.
    pub vmm_version: String,
    /// Guest RAM.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Last upgrade's downtime.
    pub last_downtime_usec: u64,
    /// Console log path.
    pub console: String,
    /// Why the VM needs attention, or why its file is quarantined (empty otherwise).
    pub state_reason: String,
    /// The uid its VMMs run as, when they run boxed.
    pub vmm_uid: Option<u32>,
    /// Its VMM's release in words (see [`VmRecord::vmm_release`]).
    pub vmm_release: String,
    /// QEMU only: the machine type its first QEMU started with, which every generation keeps
    /// (empty for cpr-vmm VMs and stopped VMs).
    pub machine_type: String,
    /// A reload found its configured VMM binary changed while its guest did not run: it is handed
    /// to that binary once the guest runs ([`VmRecord::upgrade_on_resume`]).
    pub upgrade_due: bool,
}

/// One upgrade, for `history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRecord {
    /// Upgrade id.
    pub id: u64,
    /// VM name.
    pub vm: String,
    /// Wall-clock time, µs since the epoch.
    pub time_usec: u64,
    /// Generation after the upgrade (unchanged when it failed).
    pub generation: u64,
    /// Whether it succeeded.
    pub ok: bool,
    /// Downtime in µs (0 when it failed).
    pub downtime_usec: u64,
    /// The error, when it failed.
    pub error: String,
    /// The release of the VMM that ran the guest before (see [`VmRecord::vmm_release`]).
    #[serde(default)]
    pub from_release: String,
    /// The release of the VMM that runs it after a successful upgrade (empty when it failed).
    #[serde(default)]
    pub to_release: String,
}

/// Something D-Bus should announce.
#[derive(Debug, Clone)]
pub enum Event {
    /// A VM changed state (or any property).
    VmChanged(String),
    /// An upgrade finished.
    UpgradeFinished(UpgradeRecord),
}

/// A VM a previous cprd left running, to be re-attached: its record, where the record came from
/// (`None`: the fd store), and its own fd-store entries.
#[derive(Debug)]
pub struct PendingVm {
    name: String,
    record: VmRecord,
    path: Option<PathBuf>,
    fds: std::collections::HashMap<String, OwnedFd>,
}

/// A VM that re-attach could not take back, but whose VMMs may hold the guest.
#[derive(Debug)]
pub struct Attention {
    why: String,
    record: VmRecord,
    other_pid: Option<u32>,
}

/// Why a VM was not re-attached.
#[derive(Debug)]
pub enum ReattachError {
    /// Its record is of no use (no definition, the guest is gone): quarantined.
    Unusable(String),
    /// A VMM may hold the guest: kept, in [`VmState::NeedsAttention`].
    Attention(Box<Attention>),
}

impl From<String> for ReattachError {
    fn from(why: String) -> Self {
        Self::Unusable(why)
    }
}

impl From<Attention> for ReattachError {
    fn from(a: Attention) -> Self {
        Self::Attention(Box::new(a))
    }
}

/// Whether two open descriptors are the same file (device and inode).
pub fn same_open_file(a: &OwnedFd, b: &OwnedFd) -> bool {
    let id = |fd: &OwnedFd| nix::sys::stat::fstat(fd).ok().map(|st| (st.st_dev, st.st_ino));
    id(a).is_some() && id(a) == id(b)
}

/// The engine: the handle through which everything in cprd acts on VMs. Its state has one owner
/// (a thread of its own, [`owner`]); the engine's methods ask the owner for what they need,
/// do the slow work (starting a VMM, a handoff, a stop) on the caller's thread, and report back.
#[derive(Debug)]
pub struct Engine {
    vendor_dir: Option<PathBuf>,
    config_dir: PathBuf,
    runtime_dir: PathBuf,
    /// The owner of the VM table, the definitions, the settings, the history and persistence.
    owner: std::sync::mpsc::Sender<owner::Request>,
    events: tokio::sync::broadcast::Sender<Event>,
    /// The backends (the real ones, or a fake one in the engine's tests).
    backends: backend::Backends,
    /// The VMMs a thread of this process waits for as their parent ([`Engine::supervise_child`]):
    /// the one that reports how each ended, so no pidfd watcher is added beside it.
    reaped_by_parent: Mutex<std::collections::HashSet<u32>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_usec() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(0))
}

/// The content id of a binary, as cpr-vmm reports its own (`Describe.build_id`). Remembered
/// per (path, inode, size, mtime): hashing a QEMU binary reads tens of MiB, and pre-flight,
/// records and reloads ask for it on every upgrade. Packages replace binaries by rename (a new
/// inode), so an upgraded binary is always hashed anew.
pub fn binary_build_id(path: &Path) -> Option<String> {
    build_id_cached(path, path)
}

/// [`binary_build_id`] of an opened binary: the file it has open, remembered under its path.
pub fn executable_build_id(exe: &cpr_spawn::Executable) -> Option<String> {
    build_id_cached(exe.path(), &exe.proc_path())
}

/// The content id of the file at `read`, remembered under `path`.
fn build_id_cached(path: &Path, read: &Path) -> Option<String> {
    type Key = (PathBuf, u64, u64, i64, i64);
    static KNOWN: Mutex<Vec<(Key, String)>> = Mutex::new(Vec::new());
    let m = std::fs::metadata(read).ok()?;
    let key: Key = (path.to_path_buf(), m.ino(), m.size(), m.mtime(), m.mtime_nsec());
    if let Some((_, id)) = lock(&KNOWN).iter().find(|(k, _)| *k == key) {
        return Some(id.clone());
    }
    let id = cpr_proto::build_id_of(read)?;
    let mut known = lock(&KNOWN);
    known.retain(|(k, _)| k.0 != key.0);
    known.push((key, id.clone()));
    Some(id)
}

impl Engine {
    /// An engine over `config_dir` and `runtime_dir`, with its configuration loaded.
    pub fn new(
        vendor_dir: Option<PathBuf>,
        config_dir: PathBuf,
        runtime_dir: PathBuf,
    ) -> Result<Arc<Self>, config::ConfigError> {
        Self::with_backends(vendor_dir, config_dir, runtime_dir, backend::for_kind)
    }

    /// Like [`Engine::new`], with the backends given.
    pub fn with_backends(
        vendor_dir: Option<PathBuf>,
        config_dir: PathBuf,
        runtime_dir: PathBuf,
        backends: backend::Backends,
    ) -> Result<Arc<Self>, config::ConfigError> {
        let settings = config::load_layered(vendor_dir.as_deref(), &config_dir)?;
        crate::console::set_limits(settings.console);
        // One unreadable VM file does not keep cprd (and every other VM) down: it is quarantined.
        let (defs, bad) = config::load_vms_each(&settings.vms_dir);
        let mut vms: BTreeMap<String, Vm> = defs.keys().map(|n| (n.clone(), Vm::stopped())).collect();
        for (name, e) in bad {
            tracing::error!(CPRD_VM = name, "VM {name} quarantined: {e}");
            vms.insert(name, Vm { state: VmState::Quarantined, attention: Some(e.to_string()), ..Vm::stopped() });
        }
        crate::files::runtime_dirs(&runtime_dir);
        let (events, _) = tokio::sync::broadcast::channel(1024);
        let table = owner::Table {
            config_dir: config_dir.clone(),
            runtime_dir: runtime_dir.clone(),
            settings,
            defs,
            vms,
            history: Vec::new(),
            events: events.clone(),
            backends,
            metrics: crate::metrics::Metrics::new(crate::metrics::count_start(&runtime_dir)),
            reattaching: std::collections::BTreeSet::new(),
        };
        let (requests, inbox) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("cprd-state".into())
            .spawn(move || owner::serve(table, inbox))
            .map_err(|e| config::ConfigError { file: runtime_dir.clone(), message: format!("cannot start: {e}") })?;
        Ok(Arc::new(Self {
            vendor_dir,
            config_dir,
            runtime_dir,
            owner: requests,
            events,
            backends,
            reaped_by_parent: Mutex::new(std::collections::HashSet::new()),
        }))
    }

    /// Sends the owner a request and waits for its answer.
    fn ask<T>(&self, request: impl FnOnce(owner::Reply<T>) -> owner::Request) -> T {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        // The owner lives as long as any engine handle, and a panic anywhere aborts cprd: an
        // owner that does not answer is a bug, not an input.
        #[allow(clippy::expect_used)]
        {
            self.owner.send(request(reply)).expect("the owner of cprd's state is gone");
            answer.recv().expect("the owner of cprd's state did not answer")
        }
    }

    /// Tells the owner something that needs no answer.
    fn tell(&self, request: owner::Request) {
        let _ = self.owner.send(request);
    }

    /// Subscribes to events.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn settings(&self) -> Settings {
        self.ask(|reply| owner::Request::Settings { reply })
    }

    fn def(&self, name: &str) -> Result<VmDef, CprdError> {
        self.ask(|reply| owner::Request::Def { name: name.to_string(), reply })
    }

    fn claim(&self, name: &str, purpose: owner::Purpose) -> Result<owner::Claim, CprdError> {
        self.ask(|reply| owner::Request::Claim { name: name.to_string(), purpose, reply })
    }

    fn release(&self, name: &str, state: VmState) {
        self.tell(owner::Request::Release { name: name.to_string(), state });
    }

    /// Names of all defined VMs.
    pub fn names(&self) -> Vec<String> {
        self.list().into_iter().map(|v| v.name).collect()
    }

    /// A snapshot of one VM.
    pub fn view(&self, name: &str) -> Result<VmView, CprdError> {
        self.ask(|reply| owner::Request::View { name: name.to_string(), reply })
    }

    /// What systemd-machined should know of VM `name` ([`crate::machined`]): a VM no longer
    /// defined or known is no machine.
    pub fn machine_wanted(&self, name: &str) -> crate::machined::Wanted {
        let Ok(view) = self.view(name) else { return crate::machined::Wanted::Absent };
        let ifindices = self.def(name).map(|d| crate::machined::host_ifindices(d.nics.iter())).unwrap_or_default();
        crate::machined::wanted(view.state, view.main_pid, ifindices)
    }

    /// Snapshots of all VMs.
    pub fn list(&self) -> Vec<VmView> {
        self.ask(|reply| owner::Request::List { reply })
    }

    /// Past upgrades, oldest first.
    pub fn history(&self) -> Vec<UpgradeRecord> {
        self.ask(|reply| owner::Request::History { reply })
    }

    /// cprd's metrics in the Prometheus text format (`docs/operations.md` lists them).
    pub fn metrics(&self) -> String {
        self.ask(|reply| owner::Request::Metrics { reply })
    }

    /// Checks a VMM binary against the allow-list of `settings` and opens it: the path matches a
    /// pattern with no `*` standing for a `/`, and [`cpr_spawn::Executable::open_trusted`]
    /// accepts it (no `.` or `..`, no symbolic link anywhere, the file and every directory on
    /// its way root-owned and not writable by group or others). What runs is the opened file.
    fn check_binary(&self, settings: &Settings, binary: &Path) -> Result<cpr_spawn::Executable, CprdError> {
        let text = binary.to_string_lossy();
        cpr_spawn::exec::check_written_as_resolved(binary)
            .map_err(|e| CprdError::NotAllowed(format!("{text}: {e}")))?;
        let options = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: true,
        };
        if !settings.allowed_vmm.iter().any(|p| p.matches_path_with(binary, options)) {
            let allowed: Vec<&str> = settings.allowed_vmm.iter().map(glob::Pattern::as_str).collect();
            return Err(CprdError::NotAllowed(format!(
                "{text} is not in the VMM allow-list {allowed:?} (vmm.allowed in {}/cprd.toml)",
                self.config_dir.display()
            )));
        }
        cpr_spawn::Executable::open_trusted(binary).map_err(|e| CprdError::NotAllowed(format!("{text}: {e}")))
    }

    /// The binary a VM runs when its definition names none: per backend, from the settings.
    fn default_binary(settings: &Settings, def: &VmDef) -> PathBuf {
        match def.backend {
            config::BackendKind::CprVmm => settings.default_vmm.clone(),
            config::BackendKind::Qemu => settings.default_qemu.clone(),
        }
    }

    /// The binary to run for `def` (`requested`, else the definition's, else the default), checked.
    fn binary_for(
        &self,
        settings: &Settings,
        def: &VmDef,
        requested: &str,
    ) -> Result<cpr_spawn::Executable, CprdError> {
        let binary = if requested.is_empty() {
            def.vmm_binary.clone().unwrap_or_else(|| Self::default_binary(settings, def))
        } else {
            PathBuf::from(requested)
        };
        self.check_binary(settings, &binary)
    }

    /// Starts a VM. Starting a running VM is a successful no-op.
    pub fn start(self: &Arc<Self>, name: &str) -> Result<(), CprdError> {
        let def = self.def(name)?;
        if self.view(name)?.state == VmState::Running {
            return Ok(());
        }
        let binary = self.binary_for(&self.settings(), &def, "")?;
        let owner::Claim::Claimed { def, uid, .. } = self.claim(name, owner::Purpose::Start)? else { return Ok(()) };
        let dir = self.runtime_dir.join("vms");
        match (self.backends)(def.backend).and_then(|b| b.start(&def, &binary, &dir, uid)) {
            Ok((record, memfd, child)) => {
                crate::scope::move_to_scope(name, record.generation, record.main_pid, None);
                let pid = record.main_pid;
                self.adopt(name, record, memfd);
                self.supervise_child(name, child);
                tracing::info!(CPRD_VM = name, "started VM {name} (VMM pid {pid})");
                Ok(())
            }
            Err(e) => {
                self.release(name, VmState::Stopped);
                Err(e)
            }
        }
    }

    /// Takes a running VMM into the VM table (record, memfd, state running); the owner persists it.
    fn adopt(&self, name: &str, record: VmRecord, memfd: OwnedFd) {
        self.ask(|reply| owner::Request::Adopt { name: name.to_string(), record, memfd, reply });
    }

    /// Reaps a VMM that is our child, and tells the owner when it dies and how.
    fn supervise_child(self: &Arc<Self>, name: &str, mut child: Child) {
        let engine = Arc::clone(self);
        let name = name.to_string();
        lock(&self.reaped_by_parent).insert(child.id());
        let _ = std::thread::Builder::new().name(format!("reap-{name}")).spawn(move || {
            let pid = child.id();
            let how = exit_description(child.wait());
            lock(&engine.reaped_by_parent).remove(&pid);
            engine.tell(owner::Request::VmmExited { name, pid, how });
        });
    }

    /// Tells the owner when a VMM that is not our child (re-attached after a restart) dies.
    /// (The pidfd kept in systemd's fd store is used when it is for this `pid`.)
    fn supervise_pid(self: &Arc<Self>, name: &str, pid: u32, stored: Option<OwnedFd>) {
        if lock(&self.reaped_by_parent).contains(&pid) {
            return; // its reaper reports how it ended (a VM that needed attention, resumed)
        }
        let engine = Arc::clone(self);
        let name = name.to_string();
        let stored = stored.filter(|fd| crate::fdstore::pidfd_pid(fd) == Some(pid));
        let _ = std::thread::Builder::new().name(format!("watch-{name}")).spawn(move || {
            let Some(pidfd) = stored.or_else(|| crate::fdstore::pidfd_open(pid)) else {
                engine.tell(owner::Request::VmmExited { name, pid, how: "gone before it could be watched".into() });
                return;
            };
            let mut fds = [nix::poll::PollFd::new(pidfd.as_fd(), nix::poll::PollFlags::POLLIN)];
            while matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE), Err(nix::Error::EINTR)) {}
            // After a re-exec the VMMs cprd started are still its children: reap this one (a
            // VMM that is not cprd's child is reaped by its own parent; then this is ECHILD).
            // SAFETY: waitid with P_PIDFD takes the pidfd as the id and fills a siginfo_t.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `pidfd` is open for the call's duration and `info` is writable.
            let waited = unsafe {
                libc::waitid(
                    libc::P_PIDFD,
                    u32::try_from(pidfd.as_raw_fd()).unwrap_or(0),
                    &raw mut info,
                    libc::WEXITED | libc::WNOHANG,
                )
            };
            let how = match siginfo_exit_status(waited, &info) {
                Some(status) => exit_description(Ok(status)),
                None => "exited; how is unknown (its exit status went to the parent it had since a restart of cprd)"
                    .to_string(),
            };
            engine.tell(owner::Request::VmmExited { name, pid, how });
        });
    }

    /// Stops a VM: asks its VMM to stop, or kills it with `force`. Stopping a stopped VM is a no-op.
    pub fn stop(&self, name: &str, force: bool) -> Result<(), CprdError> {
        let owner::Claim::Claimed { was, def, record, others, .. } = self.claim(name, owner::Purpose::Stop)? else {
            return Ok(());
        };
        // A VM that needs attention may have two VMMs, neither of which answers for sure: end both.
        let force = force || was == VmState::NeedsAttention;
        for pid in others {
            backend::end_process(pid, false);
        }
        if let (Some(record), Ok(b)) = (record, (self.backends)(def.backend)) {
            b.stop(&record, force);
        }
        self.ask(|reply| owner::Request::Stopped { name: name.to_string(), reply });
        Ok(())
    }

    /// Makes the VMM on record run the guest again, for a VM that needs attention: an operator's
    /// decision (the guest it holds is as it was at the pause). Refused while another VMM that may
    /// hold the guest lives.
    pub fn resume(self: &Arc<Self>, name: &str) -> Result<(), CprdError> {
        let owner::Claim::Claimed { was, def, record, .. } = self.claim(name, owner::Purpose::Resume)? else {
            return Ok(());
        };
        let result = match &record {
            Some(r) => (self.backends)(def.backend).map_err(|e| e.to_string()).and_then(|b| b.resume(name, r)),
            None => Err("no VMM on record".to_string()),
        };
        let outcome =
            result.clone().map_err(|why| CprdError::InvalidArgument(format!("VM {name} was not resumed: {why}")));
        self.ask(|reply| owner::Request::Resumed { name: name.to_string(), result, reply });
        // A VM that needed attention had its VMM unwatched; a paused one is watched already.
        if let (Ok(()), Some(r), VmState::NeedsAttention) = (&outcome, &record, was) {
            self.supervise_pid(name, r.main_pid, None);
        }
        // A reload while it did not run found its VMM binary changed: hand it over now that it runs.
        if outcome.is_ok() {
            self.run_due_upgrade(name);
        }
        outcome
    }

    /// Pauses a running VM's guest in its VMM (an operator's request); `resume` runs it again.
    /// Pausing a paused VM is a no-op.
    pub fn pause(self: &Arc<Self>, name: &str) -> Result<(), CprdError> {
        let owner::Claim::Claimed { def, record, .. } = self.claim(name, owner::Purpose::Pause)? else {
            return Ok(());
        };
        let result = match &record {
            Some(r) => (self.backends)(def.backend).map_err(|e| e.to_string()).and_then(|b| b.pause(r)),
            None => Err("no VMM on record".to_string()),
        };
        let outcome =
            result.clone().map_err(|why| CprdError::InvalidArgument(format!("VM {name} was not paused: {why}")));
        self.ask(|reply| owner::Request::Paused { name: name.to_string(), result, reply });
        // A failed pause leaves the guest running; a reload may have marked it meanwhile.
        if outcome.is_err() {
            self.run_due_upgrade(name);
        }
        outcome
    }

    /// Hands a running VM to a new VMM process of `binary` (empty: the configured one).
    /// Returns (downtime µs, new generation).
    pub fn upgrade(self: &Arc<Self>, name: &str, binary: &str) -> Result<(u64, u64), CprdError> {
        let id = now_usec();
        let def = self.def(name)?;
        // One snapshot of the settings for the whole upgrade: allow-list, default binary, timeout.
        let settings = self.settings();
        let binary = self.binary_for(&settings, &def, binary)?;
        let backend = (self.backends)(def.backend)?;
        // Pre-flight of a running VM only (the claim below refuses any other), in the box its
        // VMMs run in: the candidate is asked as the VM's own uid, never as root.
        if let Some(view) = self.view(name).ok().filter(|v| v.state == VmState::Running)
            && let Err(e) = backend.preflight(
                &binary,
                &def,
                &self.runtime_dir.join("vms"),
                &backend::Current { pid: view.main_pid, uid: view.vmm_uid },
            )
        {
            // Refused before anything was touched; still an upgrade attempt for the history.
            return self.upgrade_ended(name, id, Err(e), (view.vmm_release, String::new()));
        }
        let owner::Claim::Claimed { record: Some(mut record), uid, .. } = self.claim(name, owner::Purpose::Upgrade)?
        else {
            return Err(CprdError::InvalidArgument(format!("VM {name} has no running VMM")));
        };
        let generation = record.generation + 1;
        let from_release = record.vmm_release.clone();
        let new_control = self.runtime_dir.join("vms").join(format!("{name}.{generation}.sock"));
        let (tx, rx) = std::sync::mpsc::channel();
        let recorder = {
            let name = name.to_string();
            std::thread::spawn(move || {
                if let Ok(pid) = rx.recv() {
                    crate::scope::move_to_scope(&name, generation, pid, Some(crate::scope::HANDOFF_CPU_WEIGHT));
                }
            })
        };
        let mut journal = self.journal(name);
        let req = backend::UpgradeRequest {
            name,
            def: &def,
            record: &record,
            binary: &binary,
            new_control: new_control.clone(),
            timeout_ms: settings.handoff_timeout_ms,
            log: self.runtime_dir.join("vms").join(format!("{name}.log")),
            on_spawn: tx,
            journal: &mut journal,
            uid,
        };
        let result = backend.upgrade(req);
        let _ = recorder.join();
        if result.is_ok() && std::env::var("CPRD_FAULT").as_deref() == Ok("die-after-handoff") {
            // Fault injection for tests: cprd dies between the handoff and recording it, a point
            // a real crash cannot be aimed at. The restarted cprd must adopt the new VMM.
            tracing::error!("fault injection: dying after the handoff of {name}");
            std::process::abort();
        }
        // The guest runs in one VMM again: it goes back to a VM's share.
        let runs_in = result.as_ref().ok().and_then(|up| up.child.as_ref()).map_or(record.main_pid, Child::id);
        crate::sched::set_session_nice(runs_in, 0);
        if result.as_ref().is_ok_and(|up| up.child.is_some()) {
            crate::scope::settle_weight(name, generation);
        }
        let to_release = result.as_ref().map_or_else(|_| String::new(), |up| up.release.clone());
        let (end, child) = match result {
            Ok(up) => {
                // A new process has a control socket of its own; an exec'd one keeps its.
                if let Some(child) = &up.child {
                    let old_control = std::mem::replace(&mut record.control, new_control);
                    let _ = std::fs::remove_file(old_control);
                    record.main_pid = child.id();
                }
                record.generation = up.generation;
                record.vmm_binary = binary.path().to_path_buf();
                record.vmm_version = up.version;
                record.vmm_release.clone_from(&up.release);
                record.last_downtime_usec = up.downtime_usec;
                record.vmm_uid = uid;
                record.upgrade_on_resume = false;
                (owner::HandoffEnd::Committed(record), up.child)
            }
            Err(backend::UpgradeError::RolledBack(m)) if cpr_handoff::process::is_gone(record.main_pid) => {
                (owner::HandoffEnd::RolledBackToAGoneVmm(m), None)
            }
            Err(backend::UpgradeError::RolledBack(m)) => (owner::HandoffEnd::RolledBack(m), None),
            Err(backend::UpgradeError::Lost(m)) => (owner::HandoffEnd::Lost(m), None),
            Err(backend::UpgradeError::NeedsAttention(m, child)) => {
                (owner::HandoffEnd::NeedsAttention(m, child.as_ref().map(Child::id)), child)
            }
        };
        let outcome = self.ask(|reply| owner::Request::HandoffEnded { name: name.to_string(), end, reply });
        // Watched only once the owner knows it: its exit is then matched against the record.
        if let Some(child) = child {
            self.supervise_child(name, child);
        }
        self.upgrade_ended(name, id, outcome, (from_release, to_release))
    }

    /// The journal of VM `name`'s handoffs.
    fn journal(&self, name: &str) -> CprdJournal {
        CprdJournal { file: cpr_handoff::FileJournal::new(&self.runtime_dir.join("vms"), name) }
    }

    /// Reports an upgrade's outcome to the owner (history, log, signal) and returns it, with the
    /// releases it went (from, to).
    fn upgrade_ended(
        &self,
        name: &str,
        id: u64,
        outcome: Result<(u64, u64), CprdError>,
        releases: (String, String),
    ) -> Result<(u64, u64), CprdError> {
        let reported = outcome.clone();
        self.ask(|reply| owner::Request::UpgradeEnded {
            name: name.to_string(),
            id,
            outcome: reported,
            releases,
            reply,
        });
        outcome
    }

    /// Upgrades every running VM, [`UPGRADE_ALL_PARALLEL`] at a time (each handoff is mostly
    /// waiting for processes to be scheduled, so overlapping them hides that wait). Returns
    /// (name, ok, downtime µs, error) in name order.
    pub fn upgrade_all(self: &Arc<Self>, binary: &str) -> Vec<(String, bool, u64, String)> {
        let running: Vec<String> =
            self.list().into_iter().filter(|v| v.state == VmState::Running).map(|v| v.name).collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results = Mutex::new(Vec::with_capacity(running.len()));
        std::thread::scope(|scope| {
            for _ in 0..UPGRADE_ALL_PARALLEL.min(running.len()) {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Some(name) = running.get(i) else { break };
                        let row = match self.upgrade(name, binary) {
                            Ok((downtime, _)) => (name.clone(), true, downtime, String::new()),
                            Err(e) => (name.clone(), false, 0, e.to_string()),
                        };
                        lock(&results).push(row);
                    }
                });
            }
        });
        let mut rows = results.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        rows.sort();
        rows
    }

    /// Re-reads the configuration (a bad file keeps the last good one), then hands every running
    /// VM whose configured VMM binary changed on disk (content id) to that binary, and marks
    /// every one whose guest does not run (paused) to be handed over once it does.
    pub fn reload(self: &Arc<Self>) -> Result<ReloadOutcome, CprdError> {
        let settings =
            config::load_layered(self.vendor_dir.as_deref(), &self.config_dir).map_err(|e| self.bad_config(e))?;
        let defs = config::load_vms(&settings.vms_dir).map_err(|e| self.bad_config(e))?;
        let settings = Box::new(settings);
        self.ask(|reply| owner::Request::Configure { settings, defs, reply });
        let settings = self.settings();
        let mut outcome = ReloadOutcome::default();
        for v in self.list() {
            let Ok(def) = self.def(&v.name) else { continue };
            let configured = def.vmm_binary.clone().unwrap_or_else(|| Self::default_binary(&settings, &def));
            let due = binary_build_id(&configured).is_some_and(|id| id != v.vmm_version);
            // The owner decides on the VM's state of now, not the list's: a pause or a resume may
            // have moved it since.
            let name = v.name.clone();
            match self.ask(|reply| owner::Request::MarkUpgradeDue { name, due, reply }) {
                owner::Due::Nothing => {}
                owner::Due::Running => outcome.upgrades.push(match self.upgrade(&v.name, "") {
                    Ok((d, _)) => (v.name, true, d, String::new()),
                    Err(e) => (v.name, false, 0, e.to_string()),
                }),
                owner::Due::Marked => {
                    tracing::info!(
                        CPRD_VM = v.name,
                        "VM {} does not run its guest now: it moves to its changed VMM binary {} once it does",
                        v.name,
                        configured.display()
                    );
                    outcome.deferred.push(v.name);
                }
                owner::Due::Busy(state) => {
                    let why = format!("VM {} is {}: not moved to its changed VMM binary", v.name, state.as_str());
                    outcome.upgrades.push((v.name, false, 0, why));
                }
            }
        }
        Ok(outcome)
    }

    /// Hands VM `name` to its configured VMM binary if a reload marked it while its guest did not
    /// run ([`owner::Due::Marked`]) and the guest runs now. A failed handoff takes the mark back
    /// (the guest runs on in its old VMM; the next reload tries again).
    pub fn run_due_upgrade(self: &Arc<Self>, name: &str) {
        if !self.view(name).is_ok_and(|v| v.state == VmState::Running && v.upgrade_due) {
            return;
        }
        match self.upgrade(name, "") {
            Ok((downtime, generation)) => tracing::info!(
                CPRD_VM = name,
                "VM {name} moved to its changed VMM binary now that its guest runs (generation {generation}, downtime {downtime} us)"
            ),
            Err(e) => {
                tracing::warn!(
                    CPRD_VM = name,
                    "VM {name} runs on its old VMM: the due move to its changed VMM binary failed: {e}"
                );
                self.ask(|reply| owner::Request::MarkUpgradeDue { name: name.to_string(), due: false, reply });
            }
        }
    }

    fn bad_config(&self, e: config::ConfigError) -> CprdError {
        tracing::error!("configuration not reloaded, keeping the last good one: {e}");
        CprdError::InvalidArgument(format!("{e}; the last good configuration stays in effect"))
    }

    /// Starts every VM marked `autostart` that is not running.
    pub fn autostart(self: &Arc<Self>) {
        for name in self.names() {
            if !self.def(&name).is_ok_and(|d| d.autostart) {
                continue;
            }
            if let Err(e) = self.start(&name) {
                tracing::error!(CPRD_VM = name, "autostart of {name} failed: {e}");
            }
        }
    }

    /// Reads what a previous cprd left: the VM records (from the fd store's state memfd where
    /// systemd kept one, else from `/run/cprd`), and marks those VMs `starting`, so that nothing
    /// touches them until [`Engine::reattach`] has taken them back. Asks no VMM: this runs before
    /// cprd takes its bus name and must never wait on one.
    pub fn pending_reattach(&self, stored: &mut std::collections::HashMap<String, OwnedFd>) -> Vec<PendingVm> {
        let mut records: Vec<(String, VmRecord, Option<PathBuf>)> = Vec::new();
        let from_store = stored.remove(crate::fdstore::STATE).and_then(|fd| crate::fdstore::read_state(fd).ok());
        if let Some(bytes) = from_store {
            match serde_json::from_slice::<BTreeMap<String, VmRecord>>(&bytes) {
                Ok(map) => records.extend(map.into_iter().map(|(n, r)| (n, r, None))),
                Err(e) => tracing::warn!("the fd store's state record does not parse ({e}); using /run/cprd"),
            }
            tracing::info!("took {} VM records and {} fds back from the fd store", records.len(), stored.len());
        }
        if records.is_empty() {
            let dir = self.runtime_dir.join("vms");
            for entry in std::fs::read_dir(&dir).into_iter().flatten().filter_map(Result::ok) {
                let path = entry.path();
                if path.extension().is_none_or(|e| e != "json") {
                    continue;
                }
                let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                match std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|t| serde_json::from_slice::<VmRecord>(&t).map_err(|e| format!("bad record: {e}")))
                {
                    Ok(r) => records.push((name, r, Some(path))),
                    Err(why) => self.quarantine(&name, Some(&path), &why),
                }
            }
        }
        // Each fd-store entry (`vm-NAME-...`, whatever the backend named the rest) goes to the VM
        // with the longest name it starts with: `vm-a-b-mem` is a-b's, not a's.
        let mut by_length: Vec<&str> = records.iter().map(|(n, _, _)| n.as_str()).collect();
        by_length.sort_by_key(|n| std::cmp::Reverse(n.len()));
        let mut own: BTreeMap<String, std::collections::HashMap<String, OwnedFd>> = BTreeMap::new();
        let keys: Vec<String> = stored.keys().cloned().collect();
        for key in keys {
            if let Some(name) = by_length.iter().find(|n| key.starts_with(&format!("vm-{n}-")))
                && let Some(fd) = stored.remove(&key)
            {
                own.entry((*name).to_string()).or_default().insert(key, fd);
            }
        }
        let names = records.iter().map(|(n, _, _)| n.clone()).collect();
        self.ask(|reply| owner::Request::AwaitReattach { names, reply });
        records
            .into_iter()
            .map(|(name, record, path)| {
                let fds = own.remove(&name).unwrap_or_default();
                PendingVm { name, record, path, fds }
            })
            .collect()
    }

    /// Takes back every VM [`Engine::pending_reattach`] found, all at once (one thread each, so
    /// that a VMM that does not answer costs one deadline, not one per VM): finishes a handoff a
    /// dead cprd left in flight, then adopts the VMM that runs the guest. A VMM that may hold the
    /// guest but cannot be confirmed puts its VM in `needs-attention`; a record of no use is
    /// quarantined. Fds nobody claimed are closed and dropped from the store.
    pub fn reattach(self: &Arc<Self>, pending: Vec<PendingVm>, stored: std::collections::HashMap<String, OwnedFd>) {
        std::thread::scope(|scope| {
            for vm in pending {
                scope.spawn(move || self.reattach_pending(vm));
            }
        });
        for (orphan, _fd) in stored {
            tracing::warn!("fd store entry {orphan} matches no VM; closed");
            crate::fdstore::remove(&orphan);
        }
    }

    fn reattach_pending(self: &Arc<Self>, vm: PendingVm) {
        let PendingVm { name, record, path, mut fds } = vm;
        let memfd = fds.remove(&crate::fdstore::mem_name(&name));
        let pidfd = fds.remove(&crate::fdstore::pid_name(&name));
        let why = match self.reattach_one(&name, record, memfd, pidfd, &mut fds) {
            Ok(pid) => {
                tracing::info!(CPRD_VM = name, "re-attached VM {name} (VMM pid {pid})");
                None
            }
            Err(ReattachError::Unusable(why)) => {
                self.quarantine(&name, path.as_deref(), &why);
                Some(owner::NotReattached::Nothing)
            }
            Err(ReattachError::Attention(a)) => {
                let Attention { why, record, other_pid } = *a;
                Some(owner::NotReattached::Attention { why, record, other_pid })
            }
        };
        if let Some(why) = why {
            self.ask(|reply| owner::Request::NotReattached { name: name.clone(), why, reply });
        }
        for (unused, _fd) in fds {
            tracing::warn!(CPRD_VM = name, "fd store entry {unused} was not taken back; closed");
            crate::fdstore::remove(&unused);
        }
    }

    fn quarantine(&self, name: &str, path: Option<&Path>, why: &str) {
        if let Some(path) = path {
            let q = self.runtime_dir.join("quarantine");
            let _ = std::fs::create_dir_all(&q);
            let _ = std::fs::rename(path, q.join(format!("{name}.json")));
        }
        tracing::warn!(CPRD_VM = name, "cannot re-attach {name}: {why}; record quarantined");
    }

    fn reattach_one(
        self: &Arc<Self>,
        name: &str,
        mut record: VmRecord,
        stored_memfd: Option<OwnedFd>,
        stored_pidfd: Option<OwnedFd>,
        stored: &mut std::collections::HashMap<String, OwnedFd>,
    ) -> Result<u32, ReattachError> {
        // A record a newer cprd wrote may mean more than this one reads: its VMM is kept and
        // the VM needs attention (stop still ends it), rather than being guessed at.
        if let Err(why) = record.check_format() {
            return Err(Attention { why, record, other_pid: None }.into());
        }
        let def = self.def(name).map_err(|e| e.to_string())?;
        let backend = (self.backends)(def.backend).map_err(|e| e.to_string())?;
        // A handoff that a dead cprd left in flight is finished or rolled back first, from its
        // journal, by the same machine that ran it.
        let mut journal = self.journal(name);
        if let Some(handoff) = journal.read()? {
            let phase = if handoff.phase.is_terminal() {
                handoff.phase.clone()
            } else {
                tracing::warn!(CPRD_VM = name, "finishing the handoff of {name} left at {}", handoff.phase.name());
                backend.recover(handoff.clone(), &mut journal, self.settings().handoff_timeout_ms)
            };
            tracing::info!(CPRD_VM = name, "interrupted handoff of {name} ended {}", phase.name());
            match phase {
                cpr_handoff::Phase::Done => {
                    record.control = handoff.new.control.clone();
                    record.main_pid = handoff.new.pid;
                    record.generation = handoff.from_generation + 1;
                    record.vmm_version = binary_build_id(&handoff.binary).unwrap_or_default();
                    record.vmm_binary = handoff.binary;
                    journal.remove();
                }
                cpr_handoff::Phase::RolledBack => journal.remove(),
                cpr_handoff::Phase::Lost(why) => {
                    journal.remove();
                    return Err(format!("the guest was lost in an interrupted handoff: {why}").into());
                }
                other => {
                    let why = match other {
                        cpr_handoff::Phase::NeedsAttention(why) => why,
                        other => format!("the interrupted handoff stopped at {}", other.name()),
                    };
                    return Err(Attention { why, record, other_pid: Some(handoff.new.pid) }.into());
                }
            }
        }
        let from_vmm = match backend.reattach(name, &def, &mut record, stored_memfd.as_ref(), stored) {
            Ok(fd) => fd,
            Err(why) => return Err(Attention { why, record, other_pid: None }.into()),
        };
        let memfd = match stored_memfd {
            Some(m) if same_open_file(&m, &from_vmm) => m,
            _ => from_vmm,
        };
        let pid = record.main_pid;
        self.adopt(name, record, memfd);
        // A cprd that died mid-handoff may have left this VMM weighted for it.
        crate::sched::set_session_nice(pid, 0);
        self.supervise_pid(name, pid, stored_pidfd);
        Ok(pid)
    }

    /// Short status line for systemd.
    pub fn status_line(&self) -> String {
        let running = self.list().iter().filter(|v| v.state == VmState::Running).count();
        let last = self.history().last().map(|r| format!(", last upgrade {} us", r.downtime_usec));
        format!("{running} VMs running{}", last.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests;
