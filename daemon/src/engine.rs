//! The engine: owns every VM (its memfd, its VMM process, its runtime record) and carries out
//! requests. D-Bus is a thin adapter over it. Blocking work (process start, handoffs) runs on
//! the caller's blocking thread; the VM table is locked only for short, non-blocking updates.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::backend;
use crate::config::{self, Settings, VmDef};
use crate::error::CprdError;

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

/// The engine.
#[derive(Debug)]
pub struct Engine {
    vendor_dir: Option<PathBuf>,
    config_dir: PathBuf,
    runtime_dir: PathBuf,
    settings: RwLock<Settings>,
    defs: RwLock<BTreeMap<String, VmDef>>,
    vms: Mutex<BTreeMap<String, Vm>>,
    history: Mutex<Vec<UpgradeRecord>>,
    events: tokio::sync::broadcast::Sender<Event>,
    /// Held across a snapshot of the records and its writing, so that writes land in order and
    /// an older snapshot never overwrites a newer one.
    persisting: Mutex<()>,
    /// The backends (the real ones, or a fake one in the engine's tests).
    backends: backend::Backends,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_usec() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(0))
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

/// The content id of a binary, as cpr-vmm reports its own (`Describe.build_id`). Remembered
/// per (path, inode, size, mtime): hashing a QEMU binary reads tens of MiB, and pre-flight,
/// records and reloads ask for it on every upgrade. Packages replace binaries by rename (a new
/// inode), so an upgraded binary is always hashed anew.
pub fn binary_build_id(path: &Path) -> Option<String> {
    type Key = (PathBuf, u64, u64, i64, i64);
    static KNOWN: Mutex<Vec<(Key, String)>> = Mutex::new(Vec::new());
    let m = std::fs::metadata(path).ok()?;
    let key: Key = (path.to_path_buf(), m.ino(), m.size(), m.mtime(), m.mtime_nsec());
    if let Some((_, id)) = lock(&KNOWN).iter().find(|(k, _)| *k == key) {
        return Some(id.clone());
    }
    let id = cpr_proto::build_id_of(path)?;
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
        // One unreadable VM file does not keep cprd (and every other VM) down: it is quarantined.
        let (defs, bad) = config::load_vms_each(&settings.vms_dir);
        let mut vms: BTreeMap<String, Vm> = defs.keys().map(|n| (n.clone(), Vm::stopped())).collect();
        for (name, e) in bad {
            tracing::error!(CPRD_VM = name, "VM {name} quarantined: {e}");
            vms.insert(name, Vm { state: VmState::Quarantined, attention: Some(e.to_string()), ..Vm::stopped() });
        }
        let _ = std::fs::create_dir_all(runtime_dir.join("vms"));
        let (events, _) = tokio::sync::broadcast::channel(1024);
        Ok(Arc::new(Self {
            vendor_dir,
            config_dir,
            runtime_dir,
            settings: RwLock::new(settings),
            defs: RwLock::new(defs),
            vms: Mutex::new(vms),
            history: Mutex::new(Vec::new()),
            events,
            persisting: Mutex::new(()),
            backends,
        }))
    }

    /// Subscribes to events.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn emit(&self, e: Event) {
        let _ = self.events.send(e);
    }

    fn settings(&self) -> Settings {
        self.settings.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn def(&self, name: &str) -> Result<VmDef, CprdError> {
        if let Some(def) = self.defs.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(name) {
            return Ok(def.clone());
        }
        match lock(&self.vms).get(name) {
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

    /// Names of all defined VMs.
    pub fn names(&self) -> Vec<String> {
        lock(&self.vms).keys().cloned().collect()
    }

    /// A snapshot of one VM.
    pub fn view(&self, name: &str) -> Result<VmView, CprdError> {
        // A quarantined VM has no definition to show; it is listed with its state alone.
        let def = match self.def(name) {
            Ok(def) => Some(def),
            Err(CprdError::InvalidArgument(_)) => None,
            Err(e) => return Err(e),
        };
        let vms = lock(&self.vms);
        let vm = vms.get(name).ok_or_else(|| CprdError::NoSuchVM(format!("no VM named {name:?}")))?;
        let r = vm.record.clone();
        Ok(VmView {
            name: name.to_string(),
            state: vm.state,
            backend: def.as_ref().map_or_else(String::new, |d| d.backend.as_str().to_string()),
            generation: r.as_ref().map_or(0, |r| r.generation),
            main_pid: r.as_ref().map_or(0, |r| r.main_pid),
            vmm_binary: r.as_ref().map_or_else(String::new, |r| r.vmm_binary.display().to_string()),
            vmm_version: r.as_ref().map_or_else(String::new, |r| r.vmm_version.clone()),
            memory_bytes: def.as_ref().map_or(0, |d| d.memory_bytes),
            vcpus: def.as_ref().map_or(0, |d| d.vcpus),
            last_downtime_usec: r.as_ref().map_or(0, |r| r.last_downtime_usec),
            console: r.as_ref().map_or_else(String::new, |r| r.console.display().to_string()),
            state_reason: vm.attention.clone().unwrap_or_default(),
        })
    }

    /// Snapshots of all VMs.
    pub fn list(&self) -> Vec<VmView> {
        self.names().iter().filter_map(|n| self.view(n).ok()).collect()
    }

    /// Past upgrades, oldest first.
    pub fn history(&self) -> Vec<UpgradeRecord> {
        lock(&self.history).clone()
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.runtime_dir.join("vms").join(format!("{name}.json"))
    }

    /// Writes a VM's runtime record to `/run/cprd` and every record to the fd store's state memfd.
    fn persist(&self, name: &str) {
        let _order = lock(&self.persisting);
        let (record, all): (Option<VmRecord>, BTreeMap<String, VmRecord>) = {
            let vms = lock(&self.vms);
            let all = vms.iter().filter_map(|(n, v)| v.record.clone().map(|r| (n.clone(), r))).collect();
            (vms.get(name).and_then(|v| v.record.clone()), all)
        };
        match record {
            Some(r) => write_atomic(&self.record_path(name), &serde_json::to_vec_pretty(&r).unwrap_or_default()),
            None => {
                let _ = std::fs::remove_file(self.record_path(name));
            }
        }
        crate::fdstore::push_state(&serde_json::to_vec(&all).unwrap_or_default());
    }

    fn set_state(&self, name: &str, state: VmState) {
        if let Some(vm) = lock(&self.vms).get_mut(name) {
            vm.state = state;
        }
        self.emit(Event::VmChanged(name.to_string()));
    }

    /// Claims a VM for a mutating operation: it must be in one of `from`; it moves to `to`.
    fn claim(&self, name: &str, from: &[VmState], to: VmState) -> Result<VmState, CprdError> {
        self.def(name)?;
        let mut vms = lock(&self.vms);
        let vm = vms.get_mut(name).ok_or_else(|| CprdError::NoSuchVM(format!("no VM named {name:?}")))?;
        if let (false, Some(why)) = (from.contains(&vm.state), &vm.attention) {
            return Err(CprdError::Busy(format!(
                "VM {name} needs attention ({why}); stop it to end every VMM it may have"
            )));
        }
        if !from.contains(&vm.state) {
            return Err(CprdError::Busy(format!("VM {name} is {}; try again when it is not", vm.state.as_str())));
        }
        let was = vm.state;
        vm.state = to;
        drop(vms);
        self.emit(Event::VmChanged(name.to_string()));
        Ok(was)
    }

    /// Checks a VMM binary against the allow-list: a match, a regular file owned by root, not
    /// group- or world-writable.
    pub fn check_binary(&self, binary: &Path) -> Result<(), CprdError> {
        let settings = self.settings();
        let text = binary.to_string_lossy();
        if !binary.is_absolute() || !settings.allowed_vmm.iter().any(|p| p.matches(&text)) {
            let allowed: Vec<&str> = settings.allowed_vmm.iter().map(glob::Pattern::as_str).collect();
            return Err(CprdError::NotAllowed(format!(
                "{text} is not in the VMM allow-list {allowed:?} (vmm.allowed in {}/cprd.toml)",
                self.config_dir.display()
            )));
        }
        let meta = std::fs::metadata(binary).map_err(|e| CprdError::NotAllowed(format!("{text}: {e}")))?;
        if !meta.is_file() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
            return Err(CprdError::NotAllowed(format!(
                "{text} must be a regular file owned by root and not writable by group or others (mode {:o}, uid {})",
                meta.mode() & 0o7777,
                meta.uid()
            )));
        }
        Ok(())
    }

    /// The binary a VM runs when its definition names none: per backend, from the settings.
    fn default_binary(&self, def: &VmDef) -> PathBuf {
        let settings = self.settings();
        match def.backend {
            config::BackendKind::CprVmm => settings.default_vmm,
            config::BackendKind::Qemu => settings.default_qemu,
        }
    }

    fn binary_for(&self, def: &VmDef, requested: &str) -> Result<PathBuf, CprdError> {
        let binary = if requested.is_empty() {
            def.vmm_binary.clone().unwrap_or_else(|| self.default_binary(def))
        } else {
            PathBuf::from(requested)
        };
        self.check_binary(&binary)?;
        Ok(binary)
    }

    /// Starts a VM. Starting a running VM is a successful no-op.
    pub fn start(self: &Arc<Self>, name: &str) -> Result<(), CprdError> {
        let def = self.def(name)?;
        if self.view(name)?.state == VmState::Running {
            return Ok(());
        }
        let binary = self.binary_for(&def, "")?;
        self.claim(name, &[VmState::Stopped, VmState::Failed], VmState::Starting)?;
        let dir = self.runtime_dir.join("vms");
        match (self.backends)(def.backend).and_then(|b| b.start(&def, &binary, &dir)) {
            Ok((record, memfd, child)) => {
                crate::scope::move_to_scope(name, record.generation, record.main_pid, None);
                let pid = self.adopt(name, record, memfd);
                self.supervise_child(name, child);
                tracing::info!(CPRD_VM = name, "started VM {name} (VMM pid {pid})");
                self.emit(Event::VmChanged(name.to_string()));
                Ok(())
            }
            Err(e) => {
                self.set_state(name, VmState::Stopped);
                Err(e)
            }
        }
    }

    /// Reaps a VMM that is our child, and notices when it dies.
    fn supervise_child(self: &Arc<Self>, name: &str, mut child: Child) {
        let engine = Arc::clone(self);
        let name = name.to_string();
        let _ = std::thread::Builder::new().name(format!("reap-{name}")).spawn(move || {
            let pid = child.id();
            let status = child.wait();
            engine.vmm_exited(&name, pid, &format!("{status:?}"));
        });
    }

    /// Notices when a VMM that is not our child (re-attached after a restart) dies.
    /// (The pidfd kept in systemd's fd store is used when it is for this `pid`.)
    fn supervise_pid(self: &Arc<Self>, name: &str, pid: u32, stored: Option<OwnedFd>) {
        let engine = Arc::clone(self);
        let name = name.to_string();
        let stored = stored.filter(|fd| crate::fdstore::pidfd_pid(fd) == Some(pid));
        let _ = std::thread::Builder::new().name(format!("watch-{name}")).spawn(move || {
            let Some(pidfd) = stored.or_else(|| crate::fdstore::pidfd_open(pid)) else {
                engine.vmm_exited(&name, pid, "gone before it could be watched");
                return;
            };
            let mut fds = [nix::poll::PollFd::new(pidfd.as_fd(), nix::poll::PollFlags::POLLIN)];
            while matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE), Err(nix::Error::EINTR)) {}
            // After a re-exec the VMMs cprd started are still its children: reap this one (a
            // VMM that is not cprd's child is reaped by its own parent; then this is ECHILD).
            // SAFETY: waitid with P_PIDFD takes the pidfd as the id and fills a siginfo_t.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `pidfd` is open for the call's duration and `info` is writable.
            let _ = unsafe {
                libc::waitid(
                    libc::P_PIDFD,
                    u32::try_from(pidfd.as_raw_fd()).unwrap_or(0),
                    &raw mut info,
                    libc::WEXITED | libc::WNOHANG,
                )
            };
            engine.vmm_exited(&name, pid, "exited");
        });
    }

    fn vmm_exited(&self, name: &str, pid: u32, how: &str) {
        let mut vms = lock(&self.vms);
        let Some(vm) = vms.get_mut(name) else { return };
        if vm.other_pids.contains(&pid) {
            vm.other_pids.retain(|p| *p != pid);
            tracing::warn!(CPRD_VM = name, "a second VMM of {name} (pid {pid}) exited: {how}");
            return;
        }
        let current = vm.record.as_ref().is_some_and(|r| r.main_pid == pid);
        // An older generation quitting after its handoff, or the old VMM of a handoff in flight
        // (the upgrade decides what its exit means, and owns the record until it returns).
        if !current || vm.state == VmState::Upgrading {
            return;
        }
        let expected = vm.state == VmState::Stopping;
        vm.state = if expected { VmState::Stopped } else { VmState::Failed };
        vm.record = None;
        vm.memfd = None;
        drop(vms);
        if let Ok(b) = self.def(name).and_then(|d| (self.backends)(d.backend)) {
            b.forget(name);
        }
        // The guest is gone: its memory must not outlive it in the fd store.
        crate::fdstore::remove(&crate::fdstore::mem_name(name));
        crate::fdstore::remove(&crate::fdstore::pid_name(name));
        if !expected {
            tracing::error!(CPRD_VM = name, "VMM of {name} (pid {pid}) died unexpectedly: {how}");
        }
        self.persist(name);
        self.emit(Event::VmChanged(name.to_string()));
    }

    /// Stops a VM: asks its VMM to stop, or kills it with `force`. Stopping a stopped VM is a no-op.
    pub fn stop(&self, name: &str, force: bool) -> Result<(), CprdError> {
        let v = self.view(name)?;
        if v.state == VmState::Stopped {
            return Ok(());
        }
        let def_backend = self.def(name)?.backend;
        let was = self.claim(
            name,
            &[VmState::Running, VmState::Failed, VmState::NeedsAttention, VmState::Orphaned],
            VmState::Stopping,
        )?;
        // A VM that needs attention may have two VMMs, neither of which answers for sure: end both.
        let force = force || was == VmState::NeedsAttention;
        let others = lock(&self.vms).get_mut(name).map(|vm| std::mem::take(&mut vm.other_pids)).unwrap_or_default();
        for pid in others {
            backend::end_process(pid, false);
        }
        let record = lock(&self.vms).get(name).and_then(|vm| vm.record.clone());
        let Some(record) = record else {
            self.set_state(name, VmState::Stopped);
            return Ok(());
        };
        if let Ok(b) = (self.backends)(def_backend) {
            b.stop(&record, force);
            b.forget(name);
        }
        if let Some(vm) = lock(&self.vms).get_mut(name) {
            vm.state = VmState::Stopped;
            vm.record = None;
            vm.memfd = None;
            vm.attention = None;
        }
        self.journal(name).remove();
        {
            // An orphaned VM leaves the table once it is stopped.
            let mut vms = lock(&self.vms);
            if vms.get(name).is_some_and(|vm| vm.orphan_def.is_some()) {
                vms.remove(name);
            }
        }
        crate::fdstore::remove(&crate::fdstore::mem_name(name));
        crate::fdstore::remove(&crate::fdstore::pid_name(name));
        self.persist(name);
        tracing::info!(CPRD_VM = name, "stopped VM {name}");
        self.emit(Event::VmChanged(name.to_string()));
        Ok(())
    }

    /// Makes the VMM on record run the guest again, for a VM that needs attention: an operator's
    /// decision (the guest it holds is as it was at the pause). Refused while another VMM that may
    /// hold the guest lives.
    pub fn resume(self: &Arc<Self>, name: &str) -> Result<(), CprdError> {
        let def = self.def(name)?;
        let others: Vec<u32> = lock(&self.vms)
            .get(name)
            .map(|vm| vm.other_pids.iter().copied().filter(|p| !cpr_handoff::process::is_gone(*p)).collect())
            .unwrap_or_default();
        if let Some(pid) = others.first() {
            return Err(CprdError::Busy(format!(
                "another VMM of {name} (pid {pid}) may run the guest; it must be gone before the old one resumes"
            )));
        }
        self.claim(name, &[VmState::NeedsAttention], VmState::Starting)?;
        let record = lock(&self.vms).get(name).and_then(|vm| vm.record.clone());
        let resumed = match &record {
            Some(r) => {
                (self.backends)(def.backend).map_err(|e| e.to_string()).and_then(|b| b.resume(r)).map(|()| r.main_pid)
            }
            None => Err("no VMM on record".to_string()),
        };
        match resumed {
            Ok(pid) => {
                if let Some(vm) = lock(&self.vms).get_mut(name) {
                    vm.state = VmState::Running;
                    vm.attention = None;
                    vm.other_pids.clear();
                }
                self.journal(name).remove();
                self.supervise_pid(name, pid, None);
                self.persist(name);
                tracing::warn!(CPRD_VM = name, "VM {name} resumed in its VMM (pid {pid}) by an operator");
                self.emit(Event::VmChanged(name.to_string()));
                Ok(())
            }
            Err(why) => {
                self.set_state(name, VmState::NeedsAttention);
                Err(CprdError::InvalidArgument(format!("VM {name} was not resumed: {why}")))
            }
        }
    }

    /// Hands a running VM to a new VMM process of `binary` (empty: the configured one).
    /// Returns (downtime µs, new generation).
    pub fn upgrade(self: &Arc<Self>, name: &str, binary: &str) -> Result<(u64, u64), CprdError> {
        let def = self.def(name)?;
        let binary = self.binary_for(&def, binary)?;
        let backend = (self.backends)(def.backend)?;
        if let Err(e) = backend.preflight(&binary, &def, &self.runtime_dir.join("vms")) {
            // Refused before anything was touched; still an upgrade attempt for the history.
            if self.view(name).is_ok_and(|v| v.state == VmState::Running) {
                return self.finish_upgrade(name, now_usec(), Err(e));
            }
            return Err(e);
        }
        self.claim(name, &[VmState::Running], VmState::Upgrading)?;
        let record = lock(&self.vms).get(name).and_then(|vm| vm.record.clone());
        let Some(mut record) = record else {
            self.set_state(name, VmState::Running);
            return Err(CprdError::InvalidArgument(format!("VM {name} has no running VMM")));
        };
        let generation = record.generation + 1;
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
        let id = now_usec();
        let mut journal = self.journal(name);
        let req = backend::UpgradeRequest {
            name,
            record: &record,
            binary: &binary,
            new_control: new_control.clone(),
            timeout_ms: self.settings().handoff_timeout_ms,
            log: self.runtime_dir.join("vms").join(format!("{name}.log")),
            on_spawn: tx,
            journal: &mut journal,
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
        let runs_in = result.as_ref().map_or(record.main_pid, |up| up.child.id());
        crate::sched::set_session_nice(runs_in, 0);
        if result.is_ok() {
            crate::scope::settle_weight(name, generation);
        }
        let outcome = match result {
            Ok(up) => {
                let old_control = std::mem::replace(&mut record.control, new_control);
                let _ = std::fs::remove_file(old_control);
                record.generation = up.generation;
                record.main_pid = up.child.id();
                record.vmm_binary = binary;
                record.vmm_version = up.version;
                record.last_downtime_usec = up.downtime_usec;
                let generation = record.generation;
                if let Some(vm) = lock(&self.vms).get_mut(name) {
                    vm.record = Some(record);
                    vm.state = VmState::Running;
                }
                crate::fdstore::push_pidfd(name, up.child.id());
                self.supervise_child(name, up.child);
                Ok((up.downtime_usec, generation))
            }
            Err(backend::UpgradeError::RolledBack(m)) if cpr_handoff::process::is_gone(record.main_pid) => {
                // Rolled back to a VMM that has died since (it died while the VM was upgrading,
                // when its exit was the handoff's to interpret): the VM has no VMM.
                self.set_exited(name);
                Err(CprdError::UpgradeFailed(format!(
                    "upgrade of {name} failed and its VMM (pid {}) has exited: {m}",
                    record.main_pid
                )))
            }
            Err(backend::UpgradeError::RolledBack(m)) => {
                if let Some(vm) = lock(&self.vms).get_mut(name) {
                    vm.record = Some(record.clone());
                    vm.state = VmState::Running;
                }
                Err(CprdError::UpgradeFailed(format!(
                    "upgrade of {name} failed; the guest runs on in the old VMM: {m}"
                )))
            }
            Err(backend::UpgradeError::Lost(m)) => {
                self.set_exited(name);
                Err(CprdError::RollbackFailed(format!("upgrade of {name} failed and no VMM holds the guest: {m}")))
            }
            Err(backend::UpgradeError::NeedsAttention(m, child)) => {
                let other = child.as_ref().map(Child::id);
                self.needs_attention(name, &m, other);
                if let Some(child) = child {
                    self.supervise_child(name, child);
                }
                Err(CprdError::RollbackFailed(format!("upgrade of {name} needs attention: {m}")))
            }
        };
        if !self.view(name).is_ok_and(|v| v.state == VmState::NeedsAttention) {
            journal.remove();
        }
        self.persist(name);
        self.finish_upgrade(name, id, outcome)
    }

    /// The journal of VM `name`'s handoffs.
    fn journal(&self, name: &str) -> CprdJournal {
        CprdJournal { file: cpr_handoff::FileJournal::new(&self.runtime_dir.join("vms"), name) }
    }

    /// Marks a VM whose VMM is gone: nothing is left to keep.
    fn set_exited(&self, name: &str) {
        if let Some(vm) = lock(&self.vms).get_mut(name) {
            vm.state = VmState::Failed;
            vm.record = None;
            vm.memfd = None;
            vm.other_pids.clear();
        }
        if let Ok(b) = self.def(name).and_then(|d| (self.backends)(d.backend)) {
            b.forget(name);
        }
        crate::fdstore::remove(&crate::fdstore::mem_name(name));
        crate::fdstore::remove(&crate::fdstore::pid_name(name));
    }

    /// Puts a VM in [`VmState::NeedsAttention`], says why in the journal, and remembers another
    /// VMM that may hold the guest.
    fn needs_attention(&self, name: &str, why: &str, other: Option<u32>) {
        if let Some(vm) = lock(&self.vms).get_mut(name) {
            vm.state = VmState::NeedsAttention;
            vm.attention = Some(why.to_string());
            vm.other_pids.extend(other);
        }
        tracing::error!(CPRD_VM = name, "VM {name} needs attention: {why}");
        self.emit(Event::VmChanged(name.to_string()));
    }

    /// Logs an upgrade's outcome, adds it to the history and signals it.
    fn finish_upgrade(
        &self,
        name: &str,
        id: u64,
        outcome: Result<(u64, u64), CprdError>,
    ) -> Result<(u64, u64), CprdError> {
        let rec = UpgradeRecord {
            id,
            vm: name.to_string(),
            time_usec: now_usec(),
            generation: self.view(name).map_or(0, |v| v.generation),
            ok: outcome.is_ok(),
            downtime_usec: outcome.as_ref().map_or(0, |(d, _)| *d),
            error: outcome.as_ref().err().map_or_else(String::new, ToString::to_string),
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
        lock(&self.history).push(rec.clone());
        self.emit(Event::UpgradeFinished(rec));
        self.emit(Event::VmChanged(name.to_string()));
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
    /// VM whose configured VMM binary changed on disk (content id) to that binary. Returns the
    /// upgrade results.
    pub fn reload(self: &Arc<Self>) -> Result<Vec<(String, bool, u64, String)>, CprdError> {
        let settings =
            config::load_layered(self.vendor_dir.as_deref(), &self.config_dir).map_err(|e| self.bad_config(e))?;
        let defs = config::load_vms(&settings.vms_dir).map_err(|e| self.bad_config(e))?;
        {
            let old_defs = self.defs.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            let mut vms = lock(&self.vms);
            for name in defs.keys() {
                let vm = vms.entry(name.clone()).or_insert(Vm::stopped());
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
            vms.retain(|n, vm| defs.contains_key(n) || vm.record.is_some());
            // A VM whose file is gone but whose VMM runs stays listed and stoppable.
            for (name, vm) in vms.iter_mut().filter(|(n, _)| !defs.contains_key(*n)) {
                if vm.orphan_def.is_none() {
                    vm.orphan_def = old_defs.get(name).cloned();
                }
                if vm.state == VmState::Running {
                    vm.state = VmState::Orphaned;
                    tracing::warn!(
                        CPRD_VM = name,
                        "the definition of {name} is gone; it runs on, orphaned, until stopped"
                    );
                }
            }
        }
        *self.settings.write().unwrap_or_else(std::sync::PoisonError::into_inner) = settings;
        *self.defs.write().unwrap_or_else(std::sync::PoisonError::into_inner) = defs;
        tracing::info!("configuration reloaded");
        let mut results = Vec::new();
        for v in self.list().into_iter().filter(|v| v.state == VmState::Running) {
            let Ok(def) = self.def(&v.name) else { continue };
            let configured = def.vmm_binary.clone().unwrap_or_else(|| self.default_binary(&def));
            if binary_build_id(&configured).is_some_and(|id| id != v.vmm_version) {
                results.push(match self.upgrade(&v.name, "") {
                    Ok((d, _)) => (v.name, true, d, String::new()),
                    Err(e) => (v.name, false, 0, e.to_string()),
                });
            }
        }
        Ok(results)
    }

    fn bad_config(&self, e: config::ConfigError) -> CprdError {
        tracing::error!("configuration not reloaded, keeping the last good one: {e}");
        CprdError::InvalidArgument(format!("{e}; the last good configuration stays in effect"))
    }

    /// Starts every VM marked `autostart` that is not running.
    pub fn autostart(self: &Arc<Self>) {
        let defs: Vec<VmDef> =
            self.defs.read().unwrap_or_else(std::sync::PoisonError::into_inner).values().cloned().collect();
        for def in defs.into_iter().filter(|d| d.autostart) {
            if let Err(e) = self.start(&def.name) {
                tracing::error!(CPRD_VM = def.name, "autostart of {} failed: {e}", def.name);
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
        let mut pending = Vec::with_capacity(records.len());
        for (name, record, path) in records {
            if let Some(vm) = lock(&self.vms).get_mut(&name)
                && vm.state != VmState::Quarantined
            {
                vm.state = VmState::Starting;
            }
            let fds = own.remove(&name).unwrap_or_default();
            pending.push(PendingVm { name, record, path, fds });
        }
        pending
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
        {
            let memfd = fds.remove(&crate::fdstore::mem_name(&name));
            let pidfd = fds.remove(&crate::fdstore::pid_name(&name));
            match self.reattach_one(&name, record, memfd, pidfd, &mut fds) {
                Ok(pid) => tracing::info!(CPRD_VM = name, "re-attached VM {name} (VMM pid {pid})"),
                Err(ReattachError::Unusable(why)) => self.quarantine(&name, path.as_deref(), &why),
                Err(ReattachError::Attention(a)) => {
                    let a = *a;
                    // A VMM that may hold the guest is never dropped: the VM stays listed with
                    // its record, so that a human can stop it, and nothing is killed.
                    if let Some(vm) = lock(&self.vms).get_mut(&name) {
                        vm.record = Some(a.record);
                    }
                    self.needs_attention(&name, &a.why, a.other_pid.filter(|p| *p != 0));
                    self.persist(&name);
                }
            }
        }
        // Not re-attached: back to where it stood before (unless something above decided).
        if let Some(vm) = lock(&self.vms).get_mut(&name)
            && vm.state == VmState::Starting
        {
            vm.state = VmState::Stopped;
        }
        self.emit(Event::VmChanged(name.clone()));
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
        let pid = self.adopt(name, record, memfd);
        // A cprd that died mid-handoff may have left this VMM weighted for it.
        crate::sched::set_session_nice(pid, 0);
        self.supervise_pid(name, pid, stored_pidfd);
        Ok(pid)
    }

    /// Takes a running VMM into the VM table (record, memfd, state running) and persists its
    /// record; returns its pid.
    fn adopt(&self, name: &str, record: VmRecord, memfd: OwnedFd) -> u32 {
        crate::fdstore::push(&crate::fdstore::mem_name(name), memfd.as_fd());
        crate::fdstore::push_pidfd(name, record.main_pid);
        let pid = record.main_pid;
        if let Some(vm) = lock(&self.vms).get_mut(name) {
            vm.record = Some(record);
            vm.memfd = Some(memfd);
            vm.state = VmState::Running;
        }
        self.persist(name);
        pid
    }

    /// Short status line for systemd.
    pub fn status_line(&self) -> String {
        let running = self.list().iter().filter(|v| v.state == VmState::Running).count();
        let last = lock(&self.history).last().map(|r| format!(", last upgrade {} us", r.downtime_usec));
        format!("{running} VMs running{}", last.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests;
