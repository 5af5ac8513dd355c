//! Starting a QEMU with cprd's descriptors at fixed numbers, in its own session.

use std::fs::File;
use std::os::fd::{BorrowedFd, RawFd};
use std::path::Path;
use std::process::{Child, Stdio};

/// Starts `binary args...` with each `(target, fd)` at `target`, stdin on /dev/null and
/// stdout and stderr to `stderr` (else /dev/null), in a new session (signals to cprd's process group never reach it).
pub fn spawn(
    binary: &cpr_spawn::Executable,
    args: &[String],
    fds: &[(RawFd, BorrowedFd<'_>)],
    stderr: Option<File>,
    sandbox: Option<&cpr_spawn::Sandbox>,
) -> std::io::Result<Child> {
    let mut cmd = binary.command();
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null());
    if let Some(out) = stderr.as_ref().and_then(|f| f.try_clone().ok()) {
        cmd.stdout(out);
    }
    cmd.stderr(stderr.map_or_else(Stdio::null, Stdio::from));
    cpr_spawn::place_fds(&mut cmd, fds, true)?;
    if let Some(b) = sandbox {
        b.apply(&mut cmd)?;
    }
    cmd.spawn()
}

/// A listening UNIX socket at `path` (a stale file there is replaced).
pub fn listen_at(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::os::unix::net::UnixListener::bind(path)
}

/// Whether some process listens on the UNIX socket bound at `path` (from /proc/net/unix, so
/// that no connect() consumes the listener's single accept).
pub fn is_listening(path: &Path) -> bool {
    const SO_ACCEPTCON: u64 = 0x10000;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else { return false };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() >= 8 && f[7] == want && u64::from_str_radix(f[3], 16).is_ok_and(|flags| flags & SO_ACCEPTCON != 0)
    })
}
