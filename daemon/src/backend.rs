//! VMM backends: how cprd starts, upgrades, stops and re-attaches one kind of VMM. The engine
//! owns policy and bookkeeping; a backend owns the mechanics of its VMM. `cpr-vmm` is built;
//! QEMU (issue 6) plugs in here behind the same trait.

use cpr_spawn::Executable;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use cpr_handoff::cpr_vmm::{HandoffRequest, hand_off};
use cpr_handoff::{HandoffRecord, Journal, Phase};
use cpr_proto::client::ControlClient;
use cpr_proto::control::{Request, Response, RunState};
use cpr_proto::state::StateFormats;

use crate::config::{BackendKind, GuestDef, VmDef};
use crate::engine::VmRecord;
use crate::error::CprdError;

/// One upgrade for a backend to carry out.
pub struct UpgradeRequest<'a> {
    /// The VM.
    pub name: &'a str,
    /// Its definition.
    pub def: &'a VmDef,
    /// The running VMM.
    pub record: &'a VmRecord,
    /// The new binary (already allowed and pre-flighted).
    pub binary: &'a Executable,
    /// Control socket for the new VMM.
    pub new_control: PathBuf,
    /// Timeout of each wait on the new VMM.
    pub timeout_ms: u64,
    /// Where the new VMM's stderr goes.
    pub log: PathBuf,
    /// Told the new VMM's pid as soon as it exists.
    pub on_spawn: Sender<u32>,
    /// Where the handoff's record is persisted before every step that cannot be undone.
    pub journal: &'a mut dyn Journal,
    /// The uid the new VMM's box runs as (`None`: no box).
    pub uid: Option<u32>,
}

impl std::fmt::Debug for UpgradeRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpgradeRequest").field("name", &self.name).field("binary", &self.binary).finish_non_exhaustive()
    }
}

/// A completed upgrade.
#[derive(Debug)]
pub struct Upgraded {
    /// The guest's generation now.
    pub generation: u64,
    /// The new VMM process (`None`: the same process runs the guest, exec'd into the new
    /// binary, and keeps its control socket).
    pub child: Option<Child>,
    /// Host-stamped downtime.
    pub downtime_usec: u64,
    /// The new VMM's build id.
    pub version: String,
    /// The new VMM's release in words (see [`crate::engine::VmRecord::vmm_release`]).
    pub release: String,
}

/// How an upgrade failed.
#[derive(Debug)]
pub enum UpgradeError {
    /// The old VMM runs the guest (it never stopped, or it resumed).
    RolledBack(String),
    /// Neither VMM could be confirmed: both were left as they are (the new one, if it may be
    /// alive, is handed back so that it is reaped).
    NeedsAttention(String, Option<Child>),
    /// No VMM holds the guest any more.
    Lost(String),
}

impl UpgradeError {
    /// Where a failed handoff ended, as the machine says it.
    pub fn from_phase(phase: &Phase, reason: String, child: Option<Child>) -> Self {
        match phase {
            Phase::RolledBack => Self::RolledBack(reason),
            Phase::Lost(_) => Self::Lost(reason),
            _ => Self::NeedsAttention(reason, child),
        }
    }
}

/// The VMM that runs a guest now, as a pre-flight sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Current {
    /// Its pid.
    pub pid: u32,
    /// The VM's uid, when its VMMs run boxed.
    pub uid: Option<u32>,
}

/// The mechanics of one kind of VMM.
pub trait VmmBackend: std::fmt::Debug + Send + Sync {
    /// Asks a candidate binary whether it can take over the guest that `current` runs; touches
    /// nothing. The binary runs boxed as the VM's uid when it has one.
    fn preflight(&self, binary: &Executable, def: &VmDef, scratch: &Path, current: &Current) -> Result<(), CprdError>;
    /// Starts a VMM for `def` with its files under `dir`, boxed in as `uid` if given; returns
    /// its record, the guest-RAM memfd cprd keeps, and the process.
    fn start(
        &self,
        def: &VmDef,
        binary: &Executable,
        dir: &Path,
        uid: Option<u32>,
    ) -> Result<(VmRecord, OwnedFd, Child), CprdError>;
    /// Hands the guest to a new VMM of `req.binary`, rolling back on failure.
    fn upgrade(&self, req: UpgradeRequest<'_>) -> Result<Upgraded, UpgradeError>;
    /// Stops the VMM (asks it, or kills it with `force`) and waits until it is gone.
    fn stop(&self, record: &VmRecord, force: bool);
    /// Takes a running VMM back after a cprd restart: refreshes `record`, returns the memfd.
    /// `stored_memfd` and `stored` are what systemd's fd store (or the image before a re-exec)
    /// handed back; a backend takes the entries it pushed.
    fn reattach(
        &self,
        name: &str,
        def: &VmDef,
        record: &mut VmRecord,
        stored_memfd: Option<&OwnedFd>,
        stored: &mut std::collections::HashMap<String, OwnedFd>,
    ) -> Result<OwnedFd, String>;
    /// Makes a VMM that holds the paused guest run it again (an operator's decision on a VM that
    /// needs attention, or the end of an operator's pause).
    fn resume(&self, name: &str, record: &VmRecord) -> Result<(), String>;
    /// Stops every vCPU of the guest, which the VMM keeps holding (an operator's pause).
    fn pause(&self, record: &VmRecord) -> Result<(), String>;
    /// Drops whatever the backend holds for a VM whose VMM is gone.
    fn forget(&self, _name: &str) {}
    /// Finishes or rolls back a handoff that a dead cprd left in flight, from its record, by
    /// driving the handoff machine from where it stood. Returns the phase it ended in.
    fn recover(&self, handoff: HandoffRecord, journal: &mut dyn Journal, timeout_ms: u64) -> Phase;
}

/// Which backend serves which kind of VM definition (the engine's tests put a fake one in).
pub type Backends = fn(BackendKind) -> Result<&'static dyn VmmBackend, CprdError>;

/// The backend for a VM definition's `backend`.
pub fn for_kind(kind: BackendKind) -> Result<&'static dyn VmmBackend, CprdError> {
    match kind {
        BackendKind::CprVmm => Ok(&CprVmm),
        BackendKind::Qemu => Ok(&*crate::qemu::QEMU),
    }
}

/// Where a first cpr-vmm finds its control listener (guest RAM is at 3).
const FD_CONTROL: i32 = 4;
/// `/dev/kvm`.
const FD_KVM: i32 = 5;
/// The VMM's end of the console pipe (see [`crate::console`]).
const FD_SERIAL: i32 = 6;
/// The kernel image, read through `/proc/self/fd/7`.
const FD_KERNEL: i32 = 7;
/// The initramfs.
const FD_INITRD: i32 = 8;

/// cprd's own VMM, driven over its control socket.
#[derive(Debug)]
pub struct CprVmm;

impl VmmBackend for CprVmm {
    fn preflight(
        &self,
        binary: &Executable,
        _def: &VmDef,
        _scratch: &Path,
        current: &Current,
    ) -> Result<(), CprdError> {
        preflight(binary, current)
    }

    fn start(
        &self,
        def: &VmDef,
        binary: &Executable,
        dir: &Path,
        uid: Option<u32>,
    ) -> Result<(VmRecord, OwnedFd, Child), CprdError> {
        let control = dir.join(format!("{}.0.sock", def.name));
        let console = def.console_log.clone().unwrap_or_else(|| dir.join(format!("{}.console", def.name)));
        let log = dir.join(format!("{}.log", def.name));
        let failed = |what: String| move |e: std::io::Error| CprdError::StartFailed(format!("{what}: {e}"));
        // Everything the VMM needs from the host arrives as a descriptor, so that a boxed VMM
        // opens no host path: guest RAM, its control listener, /dev/kvm, the console (a pipe
        // whose other end cprd pumps into the capped log), the kernel and initramfs.
        let memfd = cpr_proto::memory::create_memfd(def.memory_bytes)
            .map_err(|e| CprdError::StartFailed(format!("cannot create guest RAM for {}: {e}", def.name)))?;
        let listener = cpr_proto::client::seqpacket_listen(&control)
            .map_err(failed(format!("cannot bind {}", control.display())))?;
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(failed("cannot open /dev/kvm".into()))?;
        let (serial, serial_cprd) = crate::console::pipe().map_err(failed("cannot create the console pipe".into()))?;
        let mut handed: Vec<(i32, OwnedFd)> =
            vec![(3, memfd.try_clone().map_err(failed("cannot share guest RAM".into()))?)];
        handed.push((FD_CONTROL, listener));
        handed.push((FD_KVM, kvm.into()));
        handed.push((FD_SERIAL, serial));
        handed.push((
            crate::console::VMM_KEEP_FD,
            serial_cprd.try_clone().map_err(failed("cannot share the console pipe".into()))?,
        ));
        let mut cmd = binary.command();
        cmd.arg("--memory-fd").arg("3").arg("--vcpus").arg(def.vcpus.to_string());
        match &def.guest {
            GuestDef::TestGuest { flags: 0 } => {}
            GuestDef::TestGuest { flags } => {
                cmd.arg("--guest-flags").arg(flags.to_string());
            }
            GuestDef::Elf { path, flags } => {
                let image = std::fs::File::open(path).map_err(failed(format!("cannot open {}", path.display())))?;
                handed.push((FD_KERNEL, image.into()));
                cmd.arg("--guest-elf").arg(format!("/proc/self/fd/{FD_KERNEL}"));
                cmd.arg("--guest-flags").arg(flags.to_string());
            }
            GuestDef::Linux { kernel, initrd, cmdline } => {
                let image = |p: &Path| std::fs::File::open(p).map_err(failed(format!("cannot open {}", p.display())));
                handed.push((FD_KERNEL, image(kernel)?.into()));
                cmd.arg("--kernel").arg(format!("/proc/self/fd/{FD_KERNEL}")).arg("--cmdline").arg(cmdline);
                if let Some(i) = initrd {
                    handed.push((FD_INITRD, image(i)?.into()));
                    cmd.arg("--initrd").arg(format!("/proc/self/fd/{FD_INITRD}"));
                }
            }
        }
        cmd.arg("--control-fd").arg(FD_CONTROL.to_string());
        cmd.arg("--kvm-fd").arg(FD_KVM.to_string()).arg("--serial-fd").arg(FD_SERIAL.to_string());
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| CprdError::StartFailed(format!("cannot open {}: {e}", log.display())))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(logf);
        // A new session, so that signals to cprd's process group never reach the VMM.
        let fds: Vec<_> = handed.iter().map(|(n, fd)| (*n, fd.as_fd())).collect();
        cpr_spawn::place_fds(&mut cmd, &fds, true)
            .map_err(|e| CprdError::StartFailed(format!("cannot hand its descriptors to the VMM: {e}")))?;
        if let Some(uid) = uid {
            crate::sandbox::vmm_box(uid, Vec::new(), false)
                .apply(&mut cmd)
                .map_err(failed("cannot box the VMM in".into()))?;
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| CprdError::StartFailed(format!("cannot start {}: {e}", binary.path().display())))?;
        drop(handed);
        crate::console::pump(&def.name, &serial_cprd, &console);
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = loop {
            if let Ok(c) = ControlClient::connect(&control) {
                break c;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let last = tail.lines().last().unwrap_or("").to_string();
                return Err(CprdError::StartFailed(format!("the VMM exited at start ({status}): {last}")));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CprdError::StartFailed("the VMM did not open its control socket within 20 s".into()));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let (version, release) = match client.call(&Request::Describe, &[]) {
            Ok(Response::Describe(d)) => (d.build_id, d.version),
            _ => (String::new(), String::new()),
        };
        let record = VmRecord {
            format: crate::engine::RECORD_FORMAT,
            generation: 0,
            main_pid: child.id(),
            control,
            vmm_binary: binary.path().to_path_buf(),
            vmm_version: version,
            last_downtime_usec: 0,
            console,
            launch_args: Vec::new(),
            vmm_uid: uid,
            vmm_release: release,
            paused: false,
            upgrade_on_resume: false,
        };
        // Kept once the VM runs (a VMM that failed to start takes its pipe along).
        crate::fdstore::push(&crate::console::store_name(&def.name), serial_cprd.as_fd());
        Ok((record, memfd, child))
    }

    fn upgrade(&self, req: UpgradeRequest<'_>) -> Result<Upgraded, UpgradeError> {
        let mut h =
            HandoffRequest::new(req.record.control.clone(), req.new_control.clone(), req.binary.path().to_path_buf());
        h.executable = Some(req.binary.clone());
        h.vm = req.name.to_string();
        h.old_pid = Some(req.record.main_pid);
        h.timeout_ms = req.timeout_ms;
        h.new_session = true;
        h.stderr = Some(req.log);
        h.spawned = Some(req.on_spawn);
        h.hand_over_fds = true;
        if let Some(end) = crate::fdstore::get(&crate::console::store_name(req.name)) {
            h.extra_fds.push((crate::console::VMM_KEEP_FD, std::sync::Arc::new(end)));
        }
        h.sandbox = req.uid.map(|uid| crate::sandbox::vmm_box(uid, Vec::new(), false));
        match hand_off(&h, req.journal, req.record.generation) {
            Ok(out) => {
                // The new VMM runs the very file cprd opened and checked, whose build id cprd
                // knows; asking the VMM would make it hash its binary now.
                let described =
                    ControlClient::connect(&req.new_control).ok().and_then(|c| match c.call(&Request::Describe, &[]) {
                        Ok(Response::Describe(d)) => Some(d),
                        _ => None,
                    });
                let version = crate::engine::executable_build_id(req.binary)
                    .or_else(|| described.as_ref().map(|d| d.build_id.clone()))
                    .unwrap_or_default();
                Ok(Upgraded {
                    generation: out.report.generation,
                    downtime_usec: out.report.downtime_ns() / 1000,
                    child: Some(out.child),
                    version,
                    release: described.map(|d| d.version).unwrap_or_default(),
                })
            }
            Err(f) => Err(UpgradeError::from_phase(&f.phase, f.reason, f.child)),
        }
    }

    fn stop(&self, record: &VmRecord, force: bool) {
        let graceful = !force
            && ControlClient::connect(&record.control)
                .is_ok_and(|c| matches!(c.call(&Request::Stop, &[]), Ok(Response::Ok)));
        end_process(record.main_pid, graceful);
    }

    fn forget(&self, name: &str) {
        crate::fdstore::remove(&crate::console::store_name(name));
    }

    fn reattach(
        &self,
        name: &str,
        _def: &VmDef,
        record: &mut VmRecord,
        stored_memfd: Option<&OwnedFd>,
        stored: &mut std::collections::HashMap<String, OwnedFd>,
    ) -> Result<OwnedFd, String> {
        let client = ControlClient::connect(&record.control).map_err(|e| format!("control socket: {e}"))?;
        // Which process answers is what the kernel says, not what the VMM says of itself.
        cpr_proto::wire::pass_credentials(client.socket()).map_err(|e| format!("SO_PASSCRED: {e}"))?;
        let (describe, sender) = match client.call_with_fds(&Request::Describe, &[]) {
            Ok(r) => match (r.msg, r.sender) {
                (Response::Describe(d), Some(sender)) => (d, sender),
                (other, _) => return Err(format!("describe answered {other:?} (or without credentials)")),
            },
            Err(e) => return Err(format!("describe: {e}")),
        };
        let (pid, uid) = sender;
        if describe.pid != pid {
            return Err(format!(
                "the VMM at {} says it is pid {}, the kernel says {pid}",
                record.control.display(),
                describe.pid
            ));
        }
        if record.vmm_uid.is_some_and(|u| u != uid) {
            return Err(format!(
                "pid {pid} at {} runs as uid {uid}, not the VM's {:?}",
                record.control.display(),
                record.vmm_uid
            ));
        }
        let status = match client.call(&Request::Status, &[]) {
            Ok(Response::Status(s)) => s,
            other => return Err(format!("status answered {other:?}")),
        };
        let memfd = match client.call_with_fds(&Request::GetMemoryFd, &[]) {
            Ok(r) if matches!(r.msg, Response::Ok) => r.fds.into_iter().next().ok_or("no memfd came back")?,
            other => return Err(format!("memory fd request answered {other:?}")),
        };
        // Adopt only the VMM that runs this guest: the generation on record, the memfd cprd
        // kept, and a guest that runs (not one that was handed off, or waits for a state).
        if status.generation != record.generation {
            return Err(format!(
                "the VMM at {} (pid {}) runs generation {}, the record says {}",
                record.control.display(),
                describe.pid,
                status.generation,
                record.generation
            ));
        }
        if !matches!(status.state, RunState::Running | RunState::Paused) {
            return Err(format!("the VMM (pid {}) is {:?}, not running the guest", describe.pid, status.state));
        }
        if let Some(stored) = stored_memfd
            && !crate::engine::same_open_file(stored, &memfd)
        {
            return Err(format!("the VMM (pid {}) maps another memfd than the guest's RAM cprd keeps", describe.pid));
        }
        record.main_pid = pid;
        // The VMM says whether its guest is paused (a cprd that died between pausing it and
        // recording so left the record behind).
        record.paused = status.state == RunState::Paused;
        record.vmm_version = describe.build_id;
        record.vmm_release = describe.version;
        reattach_console(name, &client, record, stored);
        Ok(memfd)
    }

    fn recover(&self, handoff: HandoffRecord, journal: &mut dyn Journal, timeout_ms: u64) -> Phase {
        cpr_handoff::cpr_vmm::recover(handoff, journal, Duration::from_millis(timeout_ms)).0
    }

    fn pause(&self, record: &VmRecord) -> Result<(), String> {
        let client = ControlClient::connect(&record.control).map_err(|e| format!("control socket: {e}"))?;
        match client.call(&Request::Pause, &[]) {
            Ok(Response::Ok) => Ok(()),
            other => Err(format!("pause answered {other:?}")),
        }
    }

    fn resume(&self, name: &str, record: &VmRecord) -> Result<(), String> {
        let client = ControlClient::connect(&record.control).map_err(|e| format!("control socket: {e}"))?;
        match client.call(&Request::Resume, &[]) {
            Ok(Response::Ok) => {}
            other => return Err(format!("resume answered {other:?}")),
        }
        // A VM that needed attention since cprd's start was never re-attached: its console
        // neither.
        reattach_console(name, &client, record, &mut std::collections::HashMap::new());
        Ok(())
    }
}

/// Reads a re-attached or resumed VMM's console again (unless a pump reads it already): from cprd's
/// end of the pipe kept in the fd store or still held, else
/// the copy the VMM holds at [`crate::console::VMM_KEEP_FD`] (nothing lost either way: the pipe
/// buffered what came meanwhile), else from a new pipe whose other end the VMM is handed
/// (`set-console`; output of the time between is lost, and a VMM older than that request keeps
/// writing where it did).
fn reattach_console(
    name: &str,
    client: &ControlClient,
    record: &VmRecord,
    stored: &mut std::collections::HashMap<String, OwnedFd>,
) {
    let key = crate::console::store_name(name);
    let is_pipe = |fd: &OwnedFd| nix::sys::stat::fstat(fd).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFIFO);
    let kept = || match crate::fdstore::fd_of_process(record.main_pid, crate::console::VMM_KEEP_FD) {
        Ok(fd) if is_pipe(&fd) => Some(fd),
        Ok(_) => {
            tracing::warn!(CPRD_VM = name, "fd {} of the VMM is not a pipe", crate::console::VMM_KEEP_FD);
            None
        }
        Err(e) => {
            tracing::info!(CPRD_VM = name, "the VMM holds no console end for cprd ({e}); handing it a new console");
            None
        }
    };
    let cprd_end = match stored.remove(&key).or_else(|| crate::fdstore::get(&key)).or_else(kept) {
        Some(fd) => fd,
        None => {
            let (vmm_end, cprd_end) = match crate::console::pipe() {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(CPRD_VM = name, "cannot create a console pipe: {e}; console not logged");
                    return;
                }
            };
            match client.call(&Request::SetConsole, &[vmm_end.as_fd()]) {
                Ok(Response::Ok) => {}
                other => {
                    tracing::warn!(
                        CPRD_VM = name,
                        "the VMM did not take a new console ({other:?}); console not logged"
                    );
                    return;
                }
            }
            cprd_end
        }
    };
    // Held again (and stored again under systemd), for the next upgrade and re-exec.
    crate::fdstore::push(&key, cprd_end.as_fd());
    crate::console::pump(name, &cprd_end, &record.console);
}

/// Waits up to 10 s for a VMM that was asked to stop (`asked`) to exit, killing it right away
/// when it was not asked, or when it does not exit in time; then waits until it is gone. Through
/// a pidfd, as the handoff's own kills.
pub fn end_process(pid: u32, asked: bool) {
    const GRACE: Duration = Duration::from_secs(10);
    let Some(pidfd) = cpr_handoff::process::pidfd_open(pid) else { return };
    if asked && cpr_handoff::process::wait_exit(&pidfd, GRACE) {
        return;
    }
    if let Err(e) = cpr_handoff::process::kill_and_confirm(pid, GRACE) {
        tracing::error!("{e}");
    }
}

/// What binaries said about state formats, by path and build id: each build is asked once.
static STATE_FORMATS: Mutex<Vec<((PathBuf, String), StateFormats)>> = Mutex::new(Vec::new());

/// Checks, before anything is touched, that the candidate reads the state format the running
/// VMM writes (both are asked: `--state-formats`), so a format rule, not this cprd's build,
/// decides whether two releases of cpr-vmm can hand a guest over.
fn preflight(binary: &Executable, current: &Current) -> Result<(), CprdError> {
    let candidate = state_formats(binary, current.uid)?;
    let running_binary = Executable::of_process(current.pid).map_err(|e| {
        CprdError::Incompatible(format!("cannot open the running VMM's binary: {e}; nothing was changed"))
    })?;
    let running = state_formats(&running_binary, current.uid)?;
    let (major, minor) = running.writes;
    if !candidate.reads.contains(&major) {
        return Err(CprdError::Incompatible(format!(
            "{} reads state format majors {:?}, but the running VMM ({}) writes {major}.{minor}; nothing was \
             changed",
            binary.path().display(),
            candidate.reads,
            running_binary.path().display()
        )));
    }
    Ok(())
}

/// What `binary` says about state formats (remembered per build).
fn state_formats(binary: &Executable, uid: Option<u32>) -> Result<StateFormats, CprdError> {
    let key = crate::engine::executable_build_id(binary).map(|id| (binary.path().to_path_buf(), id));
    let lock = || STATE_FORMATS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(known) = key.as_ref().and_then(|k| lock().iter().find(|(key, _)| key == k).map(|(_, f)| f.clone())) {
        return Ok(known);
    }
    let formats = ask_state_formats(binary, uid)?;
    if let Some(k) = key {
        lock().push((k, formats.clone()));
    }
    Ok(formats)
}

/// How long a binary may take to say which state formats it reads.
const STATE_FORMATS_TIMEOUT: Duration = Duration::from_secs(5);

fn ask_state_formats(binary: &Executable, uid: Option<u32>) -> Result<StateFormats, CprdError> {
    let cannot_run =
        |e: std::io::Error| CprdError::Incompatible(format!("cannot run {}: {e}", binary.path().display()));
    let mut cmd = binary.command();
    cmd.arg("--state-formats").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    cpr_spawn::place_fds(&mut cmd, &[], true).map_err(cannot_run)?;
    if let Some(uid) = uid {
        crate::sandbox::vmm_box(uid, Vec::new(), false).apply(&mut cmd).map_err(cannot_run)?;
    }
    let mut child = cmd.spawn().map_err(cannot_run)?;
    // A binary that does not answer in time is refused (and killed), never waited for.
    let deadline = Instant::now() + STATE_FORMATS_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CprdError::Incompatible(format!(
                    "{} did not say which state formats it reads within {STATE_FORMATS_TIMEOUT:?}; nothing was changed",
                    binary.path().display()
                )));
            }
        }
    };
    let mut stdout = Vec::new();
    if let Some(out) = child.stdout.take() {
        use std::io::Read;
        let _ = out.take(64 * 1024).read_to_end(&mut stdout);
    }
    let text = String::from_utf8_lossy(&stdout);
    let answer = if status.success() { StateFormats::parse(&text) } else { Err(format!("it exited with {status}")) };
    answer.map_err(|e| {
        CprdError::Incompatible(format!(
            "{} did not say which state formats it reads ({e}; it said {:?}); nothing was changed",
            binary.path().display(),
            text.trim()
        ))
    })
}
