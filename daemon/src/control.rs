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

/// Serves the control socket on a thread of its own.
pub fn serve(engine: Arc<Engine>, listener: OwnedFd) {
    let listener = UnixListener::from(listener);
    let _ = std::thread::Builder::new().name("cprd-control".into()).spawn(move || {
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
            let _ = std::thread::Builder::new().name("cprd-control-conn".into()).spawn(move || {
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
