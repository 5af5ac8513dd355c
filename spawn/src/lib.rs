//! Starting a child process with descriptors at fixed numbers.
//!
//! cprd hands a new cpr-vmm its guest RAM at fd 3, the arbiter hands a new VMM both channel ends
//! at fds 3 and 4, and cprd hands QEMU everything it holds at the numbers its command line
//! names. All of it happens between `fork` and `exec`, where only async-signal-safe calls are
//! allowed and a mistake overwrites a descriptor silently, so it is written once, here.

pub mod exec;
pub mod sandbox;
pub mod sched;

pub use exec::{Executable, UntrustedPath};
pub use sandbox::{Sandbox, Writable};

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The most descriptors one child can be handed.
pub const MAX_FDS: usize = 64;

/// Arranges for the child that `cmd` starts to find each `(target, fd)` at descriptor number
/// `target`, inheritable across `exec`, and, with `new_session`, to lead a session of its own (so
/// that signals to the parent's process group never reach it). The parent's descriptors are
/// untouched. Every other descriptor is closed in the child at `exec`, whether or not the parent
/// marked it close-on-exec (one left inheritable by mistake, say by a failed re-exec, must not
/// carry one guest's RAM into another guest's VMM); the one exception is the descriptor the
/// program is executed from (`/proc/self/fd/N`, see [`Executable::command`]), which keeps the
/// inheritability it has (a script's interpreter opens it after the `exec`).
pub fn place_fds(cmd: &mut Command, fds: &[(RawFd, BorrowedFd<'_>)], new_session: bool) -> std::io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(std::io::Error::other(format!("at most {MAX_FDS} descriptors can be handed to a child")));
    }
    if let Some((bad, _)) = fds.iter().find(|(target, _)| *target < 3) {
        return Err(std::io::Error::other(format!("fd {bad} is stdio; hand stdio with Command's own methods")));
    }
    if let Some((bad, _)) = fds.iter().find(|(target, _)| *target >= exec::EXEC_FD_FLOOR) {
        return Err(std::io::Error::other(format!(
            "fd {bad} is at or above {}, where an Executable keeps its file",
            exec::EXEC_FD_FLOOR
        )));
    }
    let plan: Vec<(RawFd, RawFd)> = fds.iter().map(|(target, fd)| (*target, fd.as_raw_fd())).collect();
    // Copies go above every target, so that placing one target never overwrites a source (or a
    // copy) still to be placed, however the parent's numbers fall.
    let scratch_from = plan.iter().map(|(target, _)| *target).max().unwrap_or(2) + 1;
    let program_fd: Option<RawFd> =
        cmd.get_program().to_str().and_then(|p| p.strip_prefix("/proc/self/fd/")).and_then(|n| n.parse().ok());
    // SAFETY: the closure runs between fork and exec. It only calls async-signal-safe functions
    // (setsid, fcntl, dup2, close, close_range) on numbers computed before the fork, and does
    // not allocate.
    unsafe {
        cmd.pre_exec(move || {
            if new_session {
                libc::setsid();
            }
            // Everything from 3 up is close-on-exec first; the placed targets below are made
            // inheritable one by one.
            let program_flags = program_fd.map(|fd| libc::fcntl(fd, libc::F_GETFD));
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let (Some(fd), Some(flags)) = (program_fd, program_flags)
                && flags >= 0
                && libc::fcntl(fd, libc::F_SETFD, flags) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let mut copies = [0 as RawFd; MAX_FDS];
            for (copy, (_, source)) in copies.iter_mut().zip(&plan) {
                *copy = libc::fcntl(*source, libc::F_DUPFD_CLOEXEC, scratch_from);
                if *copy < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (copy, (target, _)) in copies.iter().zip(&plan) {
                // dup2 clears close-on-exec on the target.
                if libc::dup2(*copy, *target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(*copy);
            }
            Ok(())
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    use super::*;

    fn file_with(text: &str) -> std::fs::File {
        let mut f = tempfile::tempfile().expect("tempfile");
        f.write_all(text.as_bytes()).expect("write");
        f
    }

    /// `fd` duplicated at exactly `number` in this process.
    fn at(fd: &std::fs::File, number: RawFd) -> OwnedFd {
        // SAFETY: dup2 onto a number this test owns (far above anything the harness opens).
        let rc = unsafe { libc::dup2(fd.as_raw_fd(), number) };
        assert_eq!(rc, number, "dup2");
        // SAFETY: `number` is now an open descriptor owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(number) }
    }

    #[test]
    fn sources_sitting_on_each_others_targets_land_swapped() {
        let (a, b) = (at(&file_with("a"), 200), at(&file_with("b"), 201));
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "cat /proc/self/fd/200 /proc/self/fd/201; test -e /proc/self/fd/202 || echo none"]);
        place_fds(&mut cmd, &[(201, a.as_fd()), (200, b.as_fd())], false).expect("plan");
        let out = cmd.output().expect("run");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "banone\n");
        // The parent's descriptors are unchanged.
        assert_eq!(
            std::fs::read_link("/proc/self/fd/200").ok(),
            std::fs::read_link(format!("/proc/self/fd/{}", a.as_raw_fd())).ok()
        );
    }

    #[test]
    fn a_source_already_at_its_target_stays_and_becomes_inheritable() {
        let f = file_with("same");
        let fd = at(&f, 210);
        // SAFETY: fcntl on an fd this test owns.
        unsafe { libc::fcntl(210, libc::F_SETFD, libc::FD_CLOEXEC) };
        let mut cmd = Command::new("cat");
        cmd.arg("/proc/self/fd/210");
        place_fds(&mut cmd, &[(210, fd.as_fd())], false).expect("plan");
        assert_eq!(cmd.output().expect("run").stdout, b"same");
    }

    /// A descriptor the parent left inheritable (as a failed re-exec once did with every guest's
    /// memfd) does not reach the child; only the placed ones do.
    #[test]
    fn a_descriptor_left_inheritable_by_mistake_does_not_reach_the_child() {
        let stray = at(&file_with("stray"), 220);
        // SAFETY: fcntl on an fd this test owns: inheritable, by mistake.
        unsafe { libc::fcntl(220, libc::F_SETFD, 0) };
        let given = file_with("given");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "cat /proc/self/fd/5; test -e /proc/self/fd/220 && echo leaked || echo closed"]);
        place_fds(&mut cmd, &[(5, given.as_fd())], false).expect("plan");
        let out = cmd.output().expect("run");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "givenclosed\n");
        drop(stray);
    }

    /// A script run from its open file keeps that file across the `exec` (its interpreter opens
    /// `/proc/self/fd/N`), and nothing else.
    #[test]
    fn a_script_executed_from_its_descriptor_still_runs() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\necho ran\n").expect("write");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let exe = Executable::open_trusted(&script).expect("trusted");
        let mut cmd = exe.command();
        place_fds(&mut cmd, &[], false).expect("plan");
        let out = cmd.output().expect("run");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ran\n", "{}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn new_session_makes_the_child_a_session_leader() {
        for (new_session, leader) in [(true, "yes"), (false, "no")] {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", "set -- $(cat /proc/$$/stat); [ \"$6\" = \"$$\" ] && echo yes || echo no"]);
            place_fds(&mut cmd, &[], new_session).expect("plan");
            let out = cmd.output().expect("run");
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), leader, "new_session = {new_session}");
        }
    }

    #[test]
    fn stdio_targets_and_too_many_fds_are_refused() {
        let f = file_with("x");
        let mut cmd = Command::new("true");
        assert!(place_fds(&mut cmd, &[(1, f.as_fd())], false).is_err());
        let many: Vec<(RawFd, BorrowedFd<'_>)> = (10..).take(MAX_FDS + 1).map(|target| (target, f.as_fd())).collect();
        assert!(place_fds(&mut cmd, &many, false).is_err());
    }
}
