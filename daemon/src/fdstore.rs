//! systemd's file descriptor store: cprd keeps each guest's memfd and its own state record there,
//! so a restarted cprd gets them back from systemd (`LISTEN_FDS` / `LISTEN_FDNAMES`) even if
//! `/run/cprd` is gone. Without systemd (`NOTIFY_SOCKET` unset) every call is a no-op.
//!
//! Names: `cprd-state` (a sealed memfd holding every VM's runtime record as JSON) and
//! `vm-<name>-mem` (the guest-RAM memfd). A replacement is pushed only after the old entry of
//! the same name was removed (`FDSTOREREMOVE=1`), and with `FDPOLL=0`.

use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use sd_notify::NotifyState;

/// Name of the state record.
pub const STATE: &str = "cprd-state";

/// Name of a VM's guest-RAM memfd.
pub fn mem_name(vm: &str) -> String {
    format!("vm-{vm}-mem")
}

/// Name of the pidfd of a VM's current VMM.
pub fn pid_name(vm: &str) -> String {
    format!("vm-{vm}-pidfd")
}

/// A pidfd for `pid`.
pub fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let raw = i32::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = i32::try_from(unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) }).ok()?;
    // SAFETY: `fd` was just returned by pidfd_open and is ours.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The pid a pidfd refers to (from /proc/self/fdinfo), if the process still exists.
pub fn pidfd_pid(fd: &OwnedFd) -> Option<u32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", std::os::fd::AsRawFd::as_raw_fd(fd))).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|p| p.trim().parse::<i64>().ok())
        .and_then(|p| u32::try_from(p).ok())
}

/// Stores a pidfd for the VM's current VMM `pid`.
pub fn push_pidfd(vm: &str, pid: u32) {
    if let Some(fd) = active().then(|| pidfd_open(pid)).flatten() {
        push(&pid_name(vm), fd.as_fd());
    }
}

fn active() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// cprd's own copy of every entry it pushed, by name: what a re-executed image gets handed
/// (systemd passes the store only at start), whether or not systemd keeps a store.
static HELD: std::sync::Mutex<std::collections::BTreeMap<String, OwnedFd>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn held() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<String, OwnedFd>> {
    HELD.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Environment variable carrying `name=fd;...` of the held entries into a re-executed image.
pub const REEXEC_FDS_ENV: &str = "CPRD_HELD_FDS";

/// Clears close-on-exec on every held entry and describes them for [`REEXEC_FDS_ENV`].
pub fn keep_across_exec() -> String {
    held()
        .iter()
        .filter(|(_, fd)| nix::fcntl::fcntl(*fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty())).is_ok())
        .map(|(name, fd)| format!("{name}={}", std::os::fd::AsRawFd::as_raw_fd(fd)))
        .collect::<Vec<_>>()
        .join(";")
}

/// Undoes [`keep_across_exec`] after an exec that failed: every held fd is close-on-exec again.
pub fn close_on_exec_again() {
    for fd in held().values() {
        let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    }
}

/// Takes the entries a re-executing image handed over (see [`keep_across_exec`]).
pub fn take_from_previous_image() -> HashMap<String, OwnedFd> {
    let Ok(list) = std::env::var(REEXEC_FDS_ENV) else { return HashMap::new() };
    list.split(';')
        .filter_map(|e| e.split_once('='))
        .filter_map(|(name, raw)| Some((name.to_string(), raw.parse::<i32>().ok()?)))
        .filter(|(_, raw)| *raw > 2)
        .map(|(name, raw)| {
            // SAFETY: the image before the exec left this fd open for this image alone.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let _ = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
            (name, fd)
        })
        .collect()
}

/// Stores `fd` under `name`, replacing an older entry of that name.
pub fn push(name: &str, fd: BorrowedFd<'_>) {
    if name != STATE
        && let Ok(copy) = fd.try_clone_to_owned()
    {
        held().insert(name.to_string(), copy);
    }
    if !active() {
        return;
    }
    remove_from_systemd(name);
    let r = sd_notify::notify_with_fds(
        &[NotifyState::FdStore, NotifyState::FdName(name), NotifyState::Custom("FDPOLL=0")],
        &[fd],
    );
    if let Err(e) = r {
        tracing::warn!("cannot push {name} to the fd store: {e}");
    }
}

/// A copy of the entry `name`, if cprd holds one.
pub fn get(name: &str) -> Option<OwnedFd> {
    held().get(name).and_then(|fd| fd.try_clone().ok())
}

/// A copy of descriptor `target` of process `pid` (pidfd_getfd(2)).
pub fn fd_of_process(pid: u32, target: std::os::fd::RawFd) -> Result<OwnedFd, String> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let pidfd = pidfd_open(pid).ok_or_else(|| format!("pid {pid} is gone"))?;
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    let fd = i32::try_from(fd).unwrap_or(-1);
    if fd < 0 {
        return Err(format!("cannot take fd {target} of pid {pid}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by pidfd_getfd and is ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Removes the entry `name` from the store.
pub fn remove(name: &str) {
    held().remove(name);
    remove_from_systemd(name);
}

fn remove_from_systemd(name: &str) {
    if active() {
        let _ = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]);
    }
}

/// Takes the fds systemd passed at start, by name (the order is not stable).
pub fn take() -> HashMap<String, OwnedFd> {
    let Ok(fds) = sd_notify::listen_fds_with_names() else { return HashMap::new() };
    fds.map(|(raw, name)| {
        // SAFETY: systemd passed `raw` to this process for us alone (LISTEN_PID matched).
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let _ = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
        (name, fd)
    })
    .collect()
}

/// Stores `bytes` as the state record, in a sealed memfd.
pub fn push_state(bytes: &[u8]) {
    if !active() {
        return;
    }
    let made = (|| -> std::io::Result<OwnedFd> {
        let fd = nix::sys::memfd::memfd_create(
            c"cprd-state",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let mut f = std::fs::File::from(fd);
        f.write_all(bytes)?;
        let seals = nix::fcntl::SealFlag::F_SEAL_WRITE
            | nix::fcntl::SealFlag::F_SEAL_GROW
            | nix::fcntl::SealFlag::F_SEAL_SHRINK
            | nix::fcntl::SealFlag::F_SEAL_SEAL;
        nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_ADD_SEALS(seals))?;
        Ok(OwnedFd::from(f))
    })();
    match made {
        Ok(fd) => push(STATE, fd.as_fd()),
        Err(e) => tracing::warn!("cannot build the state record memfd: {e}"),
    }
}

/// Reads a state record memfd.
pub fn read_state(fd: OwnedFd) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::from(fd);
    f.rewind()?;
    let mut out = Vec::new();
    f.read_to_end(&mut out)?;
    Ok(out)
}
