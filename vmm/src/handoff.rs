//! The standalone arbiter of a handoff (`cpr-vmm handoff`): what cprd does, without cprd.
//!
//! It creates both channels, starts the new VMM with its ends as inherited fds, tells the old
//! VMM to migrate, and enforces the rollback rule: the old VMM is resumed only after the new
//! one is known dead (killed and reaped).

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

use cpr_proto::control::{HandoffReport, MigrateParams, Request, Response};

use crate::control::ControlClient;
use crate::error::{Result, VmmError};

/// Fd number of the cpr channel in the new VMM.
pub const CPR_FD: i32 = 3;
/// Fd number of the main channel in the new VMM.
pub const MAIN_FD: i32 = 4;

/// One handoff to perform.
#[derive(Debug, Clone)]
pub struct HandoffRequest {
    /// Control socket of the running (old) VMM.
    pub old_control: PathBuf,
    /// Control socket the new VMM will listen on.
    pub new_control: PathBuf,
    /// The new VMM binary.
    pub binary: PathBuf,
    /// Timeout of each wait on the new side, in milliseconds.
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
}

impl HandoffRequest {
    /// A request with defaults: 5 s timeouts, inherited stderr, no extras.
    pub fn new(old_control: PathBuf, new_control: PathBuf, binary: PathBuf) -> Self {
        Self {
            old_control,
            new_control,
            binary,
            timeout_ms: 5000,
            env: Vec::new(),
            stderr: None,
            extra_args: Vec::new(),
            spawned: None,
            new_session: false,
        }
    }
}

/// A completed handoff.
#[derive(Debug)]
pub struct HandoffOutcome {
    /// Timings, from both sides.
    pub report: HandoffReport,
    /// The new VMM process (a child of the caller).
    pub child: Child,
}

/// Starts `binary --incoming` with the two channel ends at fds 3 and 4.
fn spawn_new(req: &HandoffRequest, cpr: &OwnedFd, main: &OwnedFd) -> Result<Child> {
    let mut cmd = Command::new(&req.binary);
    cmd.arg("--incoming")
        .arg("--cpr-fd")
        .arg(CPR_FD.to_string())
        .arg("--main-fd")
        .arg(MAIN_FD.to_string())
        .arg("--control")
        .arg(&req.new_control)
        .args(&req.extra_args);
    for (k, v) in &req.env {
        cmd.env(k, v);
    }
    if let Some(path) = &req.stderr {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| VmmError::Handoff(format!("cannot open {}: {e}", path.display())))?;
        cmd.stderr(f);
    }
    cpr_spawn::place_fds(&mut cmd, &[(CPR_FD, cpr.as_fd()), (MAIN_FD, main.as_fd())], req.new_session)
        .map_err(|e| VmmError::Handoff(format!("cannot hand the channels to the new VMM: {e}")))?;
    cmd.spawn().map_err(|e| VmmError::Handoff(format!("cannot start {}: {e}", req.binary.display())))
}

fn pair(kind: SockType) -> Result<(OwnedFd, OwnedFd)> {
    socketpair(AddressFamily::Unix, kind, None, SockFlag::SOCK_CLOEXEC)
        .map_err(|e| VmmError::Handoff(format!("socketpair: {e}")))
}

/// Kills the new VMM and waits until it is gone: only then may the old one resume.
fn ensure_dead(child: &mut Child) -> std::io::Result<()> {
    let _ = child.kill();
    child.wait().map(|_| ())
}

/// Performs one handoff. On failure the old VMM runs the guest again (or never stopped).
pub fn hand_off(req: &HandoffRequest) -> Result<HandoffOutcome> {
    let old = ControlClient::connect(&req.old_control)
        .map_err(|e| VmmError::Handoff(format!("cannot connect to {}: {e}", req.old_control.display())))?;
    let (cpr_old, cpr_new) = pair(SockType::SeqPacket)?;
    let (main_old, main_new) = pair(SockType::Stream)?;
    let mut child = spawn_new(req, &cpr_new, &main_new)?;
    if req.new_session {
        // Its start-up is the handoff's work; it settles to a VM's share when it runs the guest.
        crate::sched::set_session_nice(child.id(), crate::sched::HANDOFF_NICE);
    }
    drop((cpr_new, main_new));
    if let Some(tx) = &req.spawned {
        let _ = tx.send(child.id());
    }
    let migrate = Request::Migrate(MigrateParams { timeout_ms: req.timeout_ms });
    let answer = old.call(&migrate, &[cpr_old.as_fd(), main_old.as_fd()]);
    drop((cpr_old, main_old));
    match answer {
        Ok(Response::Migrated(report)) => {
            let _ = old.call(&Request::Quit, &[]);
            Ok(HandoffOutcome { report, child })
        }
        Ok(Response::Error(e)) => {
            ensure_dead(&mut child).map_err(|k| VmmError::Rollback(format!("{e}; cannot reap the new VMM: {k}")))?;
            if e.guest_paused {
                match old.call(&Request::Resume, &[]) {
                    Ok(Response::Ok) => {}
                    other => {
                        return Err(VmmError::Rollback(format!("{e}; resuming the old VMM failed: {other:?}")));
                    }
                }
                return Err(VmmError::Handoff(format!("{e} (rolled back: the old VMM resumed the guest)")));
            }
            Err(VmmError::Handoff(e.message))
        }
        Ok(other) => {
            let _ = ensure_dead(&mut child);
            Err(VmmError::Handoff(format!("unexpected answer to migrate: {other:?}")))
        }
        Err(e) => {
            let _ = ensure_dead(&mut child);
            Err(VmmError::Rollback(format!("lost the old VMM's control connection: {e}")))
        }
    }
}

/// The control socket path for generation `generation` next to `base` (`vm.sock` → `vm.3.sock`).
pub fn next_control_path(base: &Path, generation: u64) -> PathBuf {
    let stem = base.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = stem.split('.').next().unwrap_or("vmm").to_string();
    base.with_file_name(format!("{stem}.{generation}.sock"))
}
