//! The VMM's lifecycle and its control socket (UNIX `SOCK_SEQPACKET`, one request per datagram).

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cpr_proto::control::{ControlError, Description, ErrorKind, HandoffReport, Request, Response, RunState, VmmStatus};
use cpr_proto::wire;

use crate::devices::lock;
use crate::error::{Result, VmmError};
use crate::vm::{ExitReason, VmCore};

/// The package version of this binary.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A running VMM: the VM plus its lifecycle state.
#[derive(Debug)]
pub struct Vmm {
    /// The VM.
    pub core: Arc<VmCore>,
    /// Lifecycle state; every request takes this lock, so requests are serialised.
    pub state: Mutex<RunState>,
    /// Timings of the handoff that brought the guest here.
    pub incoming: Mutex<Option<HandoffReport>>,
}

/// A content hash of the running binary, cached (tells two builds of one version apart).
pub fn build_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| cpr_proto::build_id_of(std::path::Path::new("/proc/self/exe")).unwrap_or_default()).clone()
}

/// What this binary is and which state formats it speaks.
pub fn describe() -> Description {
    Description {
        version: VERSION.to_string(),
        build_id: build_id(),
        writes_format: cpr_proto::state::FORMAT_MAJOR,
        reads_formats: crate::fault::reads_formats(),
        pid: crate::fault::claimed_pid(),
    }
}

/// An error answer.
pub fn error(kind: ErrorKind, message: impl Into<String>, guest_paused: bool) -> Response {
    Response::Error(ControlError { kind, message: message.into(), guest_paused })
}

impl Vmm {
    /// Wraps a VM in the given state.
    pub fn new(core: Arc<VmCore>, state: RunState) -> Arc<Self> {
        Arc::new(Self { core, state: Mutex::new(state), incoming: Mutex::new(None) })
    }

    /// Current status.
    pub fn status(&self) -> VmmStatus {
        let state = *lock(&self.state);
        VmmStatus {
            state,
            vcpus: self.core.vcpu_count(),
            memory_bytes: self.core.ram.bytes(),
            generation: self.core.generation(),
            test_guest: self.core.test_guest_status(),
            incoming: *lock(&self.incoming),
        }
    }

    /// Handles one request; `fds` are the fds that came with it. Returns the answer, the fds to
    /// attach to it, and a reason to end the process, acted on only after the answer was sent.
    pub fn handle(&self, request: Request, fds: Vec<OwnedFd>) -> (Response, Vec<OwnedFd>, Option<ExitReason>) {
        match request {
            Request::GetMemoryFd => match self.core.ram.file().as_fd().try_clone_to_owned() {
                Ok(fd) => (Response::Ok, vec![fd], None),
                Err(e) => {
                    (error(ErrorKind::Internal, format!("cannot dup the guest-RAM fd: {e}"), false), vec![], None)
                }
            },
            Request::Stop => {
                let st = lock(&self.state);
                if *st == RunState::Migrating {
                    return (
                        error(ErrorKind::InvalidState, "a handoff is in flight; stop refused", false),
                        vec![],
                        None,
                    );
                }
                self.core.coord.request_exit();
                (Response::Ok, vec![], Some(ExitReason::Stopped))
            }
            Request::Quit => {
                let st = lock(&self.state);
                if *st != RunState::StateSent {
                    let msg = "quit is only for a VMM whose guest was handed off";
                    return (error(ErrorKind::InvalidState, msg, false), vec![], None);
                }
                (Response::Ok, vec![], Some(ExitReason::HandedOff))
            }
            other => (self.handle_in_place(other, fds), vec![], None),
        }
    }

    fn handle_in_place(&self, request: Request, fds: Vec<OwnedFd>) -> Response {
        match request {
            Request::Stop | Request::Quit | Request::GetMemoryFd => {
                error(ErrorKind::Internal, "handled elsewhere", false)
            }
            Request::Describe => Response::Describe(describe()),
            Request::Status => Response::Status(self.status()),
            Request::Pause => {
                let mut st = lock(&self.state);
                match *st {
                    RunState::Running | RunState::Paused => {
                        self.core.coord.pause();
                        *st = RunState::Paused;
                        Response::Ok
                    }
                    other => error(ErrorKind::InvalidState, format!("cannot pause a VM that is {other:?}"), false),
                }
            }
            Request::Resume => {
                let mut st = lock(&self.state);
                match *st {
                    // After `StateSent` only the arbiter sends `resume`, and only once the new
                    // VMM is confirmed dead before any commit (cpr-handoff's machine).
                    RunState::Running | RunState::Paused | RunState::MigrationFailed | RunState::StateSent => {
                        self.core.coord.resume();
                        crate::sched::settle_self();
                        *st = RunState::Running;
                        Response::Ok
                    }
                    other => error(ErrorKind::InvalidState, format!("cannot resume a VM that is {other:?}"), false),
                }
            }
            Request::Migrate(params) => crate::migration::migrate_out(self, &params, fds),
            Request::SetConsole => match fds.into_iter().next() {
                Some(fd) => {
                    self.core.devices.set_serial_out(File::from(fd));
                    Response::Ok
                }
                None => error(ErrorKind::BadRequest, "set-console needs the console fd attached", false),
            },
        }
    }
}

/// Binds the control socket at `path` (replacing a stale socket file left by a dead process).
pub fn bind_control(path: &Path) -> Result<OwnedFd> {
    cpr_proto::client::seqpacket_listen(path).map_err(|err| VmmError::ControlSocket { path: path.to_path_buf(), err })
}

pub use cpr_proto::client::{ControlClient, seqpacket_connect};

/// Whether a peer with `uid` may use the control socket: root (cprd) or this VMM's own user
/// (whoever started it by hand). Whatever the socket file's mode says, nobody else gets in.
fn peer_allowed(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// Serves the control socket on a background thread; one thread per connection. Each connection's
/// peer is checked with `SO_PEERCRED` first (see [`peer_allowed`]). Returns once the thread has
/// installed its seccomp filter: the kernel translates a filter as it installs it, a few hundred
/// microseconds of CPU that a new VMM must spend before `Ready`, not in the downtime.
pub fn serve(vmm: Arc<Vmm>, listener: OwnedFd) -> Result<()> {
    let listener = UnixListener::from(listener);
    let (installed_tx, installed_rx) = std::sync::mpsc::sync_channel::<Result<()>>(1);
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            // Connection threads inherit this filter.
            let installed = crate::seccomp::install(crate::seccomp::ThreadClass::Control);
            let failed = installed.is_err();
            let _ = installed_tx.send(installed);
            if failed {
                return;
            }
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let peer = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials);
                if let Some(uid) = peer.as_ref().map_or(Some(u32::MAX), |c| Some(c.uid()).filter(|u| !peer_allowed(*u)))
                {
                    let why = format!("uid {uid} may not use this VMM's control socket");
                    let _ = wire::send(conn.as_fd(), &error(ErrorKind::Forbidden, why, false), &[]);
                    continue;
                }
                let vmm = Arc::clone(&vmm);
                let _ = std::thread::Builder::new().name("control-conn".into()).spawn(move || {
                    let fd = OwnedFd::from(conn);
                    loop {
                        let received = match wire::recv::<Request>(fd.as_fd(), None) {
                            Ok(r) => r,
                            Err(wire::WireError::Malformed(m)) => {
                                let _ = wire::send(fd.as_fd(), &error(ErrorKind::BadRequest, m, false), &[]);
                                continue;
                            }
                            Err(_) => break,
                        };
                        let (response, out_fds, exit) = vmm.handle(received.msg, received.fds);
                        let borrowed: Vec<_> = out_fds.iter().map(AsFd::as_fd).collect();
                        if matches!(exit, Some(crate::vm::ExitReason::HandedOff)) {
                            // An old VMM too starved to answer `Quit` (a loaded host, nice 19).
                            crate::fault::stall_point("before-quit-answer");
                        }
                        let sent = wire::send(fd.as_fd(), &response, &borrowed);
                        if let Some(reason) = exit {
                            if matches!(reason, crate::vm::ExitReason::HandedOff) {
                                crate::fault::stall_point("after-quit");
                            }
                            vmm.core.exit(reason);
                        }
                        if sent.is_err() {
                            break;
                        }
                    }
                });
            }
        })
        .map_err(|e| VmmError::Internal(format!("cannot start control thread: {e}")))?;
    installed_rx.recv().map_err(|_| VmmError::Internal("the control thread ended before its seccomp filter".into()))?
}
