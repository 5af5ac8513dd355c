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

/// The arguments of a QEMU started only to be asked something (the pre-flight probe, a trial
/// handoff): no devices, paused (`-S`), its monitor on the connected socket at
/// [`crate::cmdline::QMP_FD`] that [`Questioned::start`] hands it. The caller adds `-machine`.
pub fn question_args() -> Vec<String> {
    [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-S",
        "-chardev",
        &format!("socket,id=qmp,fd={}", crate::cmdline::QMP_FD),
        "-qmp",
        "chardev:qmp",
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

/// A QEMU started only to be asked something, its monitor on a socket pair (connected before
/// it starts, so never `accept`ed and never raced: see `Qmp::negotiate`), what it prints in a
/// file. Killed, reaped and its file removed on drop.
#[derive(Debug)]
pub struct Questioned {
    child: Child,
    log: std::path::PathBuf,
}

impl Questioned {
    /// Starts `binary args` (see [`question_args`]) with what it prints going to `log` (left
    /// out if `log` cannot be created); returns it and cprd's end of its monitor.
    pub fn start(
        binary: &cpr_spawn::Executable,
        args: &[String],
        log: std::path::PathBuf,
        sandbox: Option<&cpr_spawn::Sandbox>,
    ) -> Result<(Self, std::os::unix::net::UnixStream), String> {
        use std::os::fd::AsFd;
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(|e| format!("cannot make a socket pair: {e}"))?;
        let out = File::create(&log).ok();
        let child = spawn(binary, args, &[(crate::cmdline::QMP_FD, theirs.as_fd())], out, sandbox)
            .map_err(|e| format!("cannot run {}: {e}", binary.path().display()))?;
        Ok((Self { child, log }, ours))
    }

    /// The last line it printed, for an error message (QEMU's deprecation notices skipped).
    pub fn last_line(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().rev().find(|l| !l.trim().is_empty() && !l.contains("is deprecated")).map(|l| l.trim().to_string())
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let end = std::time::Instant::now() + timeout;
        loop {
            let status = self.exited();
            if status.is_some() || std::time::Instant::now() >= end {
                return status;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

impl Drop for Questioned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
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
