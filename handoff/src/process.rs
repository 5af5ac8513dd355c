//! Processes an arbiter must confirm dead or alive, through pidfds where it is not their parent.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::Child;
use std::time::Duration;

/// A pidfd for `pid` (`pidfd_open(2)`), or `None` if the process is gone.
pub fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = i32::try_from(pid).ok().filter(|p| *p > 0)?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: `fd` was just returned by pidfd_open and belongs to nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process behind `pidfd` has exited (a pidfd becomes readable then), waiting up to
/// `timeout`.
pub fn wait_exit(pidfd: &OwnedFd, timeout: Duration) -> bool {
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [nix::poll::PollFd::new(pidfd.as_fd(), nix::poll::PollFlags::POLLIN)];
    loop {
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
            Ok(n) => return n > 0,
            Err(nix::Error::EINTR) => {}
            Err(_) => return false,
        }
    }
}

/// Whether process `pid` is gone (never existed, exited, or a zombie).
pub fn is_gone(pid: u32) -> bool {
    pidfd_open(pid).is_none_or(|fd| wait_exit(&fd, Duration::ZERO))
}

/// Sends SIGKILL to the process behind `pidfd`.
fn kill_pidfd(pidfd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal takes a pidfd, a signal number, a null siginfo and flags.
    let rc = unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), libc::SIGKILL, std::ptr::null::<u8>(), 0)
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Kills process `pid` and waits up to `timeout` until it has exited. Through a pidfd, so a
/// recycled pid is never hit once the pidfd is open. `Ok` once it is confirmed gone.
pub fn kill_and_confirm(pid: u32, timeout: Duration) -> Result<(), String> {
    let Some(pidfd) = pidfd_open(pid) else { return Ok(()) };
    if wait_exit(&pidfd, Duration::ZERO) {
        return Ok(());
    }
    kill_pidfd(&pidfd).map_err(|e| format!("cannot kill pid {pid}: {e}"))?;
    if wait_exit(&pidfd, timeout) {
        Ok(())
    } else {
        Err(format!("pid {pid} did not exit within {timeout:?} of SIGKILL"))
    }
}

/// Kills a child and reaps it: once this returns `Ok`, it is dead.
pub fn kill_child(child: &mut Child) -> Result<(), String> {
    let _ = child.kill();
    child.wait().map(drop).map_err(|e| format!("cannot reap pid {}: {e}", child.id()))
}
