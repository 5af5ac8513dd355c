//! cprd's own control socket (`/run/cprd/cprd.sock`, `SOCK_SEQPACKET`, JSON datagrams as in
//! `cpr_proto::wire`): a read-only endpoint that answers while the bus is busy or cprd is being
//! restarted (with `cprd.socket`, systemd holds the socket and queues connections). Taken from
//! systemd by name (`FileDescriptorName=control`) or bound by cprd itself when started by hand.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;

use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket};
use serde_json::json;

use crate::engine::Engine;

/// The fd name `cprd.socket` gives the control socket.
pub const FD_NAME: &str = "control";

/// The control socket's fd number, kept open across a re-exec (see `reexec`).
pub static RAW_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// The control socket: systemd's (by name) or one cprd binds at `runtime_dir/cprd.sock`.
pub fn listener(stored: &mut HashMap<String, OwnedFd>, runtime_dir: &Path) -> std::io::Result<OwnedFd> {
    if let Some(fd) = stored.remove(FD_NAME) {
        tracing::info!("control socket from systemd (socket activation)");
        RAW_FD.store(std::os::fd::AsRawFd::as_raw_fd(&fd), std::sync::atomic::Ordering::SeqCst);
        return Ok(fd);
    }
    let path = runtime_dir.join("cprd.sock");
    let _ = std::fs::remove_file(&path);
    let fd = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &UnixAddr::new(&path)?)?;
    // Read-only (ping, list), for root and group cprd (it sits in the 0750 runtime directory).
    crate::files::share_with_group(&path, 0o660);
    listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN))?;
    RAW_FD.store(std::os::fd::AsRawFd::as_raw_fd(&fd), std::sync::atomic::Ordering::SeqCst);
    Ok(fd)
}

/// Set when cprd is stopping: no new connection is accepted, so systemd keeps queueing them
/// for the next instance (the listening socket is systemd's as much as ours).
pub static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Connections accepted and not yet done, plus one while the accepting thread runs: a stopping
/// cprd waits for them ([`wait_until_answered`]).
static IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts one unit of [`IN_FLIGHT`] until dropped.
struct InFlight;

impl InFlight {
    fn new() -> Self {
        IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Once [`STOPPING`] is set: waits, at most `limit`, until the accepting thread has stopped and
/// every connection it accepted has been answered and closed. A connection accepted just before
/// the stop was otherwise cut when the process exited 20 ms later, unanswered, if its thread had
/// not run by then (a `cprctl ping` failed across a restart under load: the socket-activation
/// test, in CI).
pub fn wait_until_answered(limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    while IN_FLIGHT.load(std::sync::atomic::Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Serves the control socket on a thread of its own.
pub fn serve(engine: Arc<Engine>, listener: OwnedFd) {
    let listener = UnixListener::from(listener);
    let accepting = InFlight::new();
    let _ = std::thread::Builder::new().name("cprd-control".into()).spawn(move || {
        let _accepting = accepting;
        loop {
            let mut fds = [nix::poll::PollFd::new(listener.as_fd(), nix::poll::PollFlags::POLLIN)];
            let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(20u16));
            if STOPPING.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            if !matches!(ready, Ok(n) if n > 0) {
                continue;
            }
            let Ok((conn, _)) = listener.accept() else { continue };
            let engine = Arc::clone(&engine);
            let answering = InFlight::new();
            let _ = std::thread::Builder::new().name("cprd-control-conn".into()).spawn(move || {
                let _answering = answering;
                let fd = OwnedFd::from(conn);
                while let Ok(req) = cpr_proto::wire::recv::<serde_json::Value>(fd.as_fd(), None) {
                    let answer = match req.msg["request"].as_str() {
                        Some("ping") => json!({"response": "pong", "version": crate::VERSION}),
                        Some("list") => {
                            let vms: Vec<_> = engine
                                .list()
                                .into_iter()
                                .map(|v| {
                                    json!({"name": v.name, "state": v.state.as_str(), "backend": v.backend,
                                    "generation": v.generation, "main_pid": v.main_pid})
                                })
                                .collect();
                            json!({"response": "list", "vms": vms})
                        }
                        _ => json!({"response": "error", "message": "requests: ping, list"}),
                    };
                    if cpr_proto::wire::send(fd.as_fd(), &answer, &[]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}
