//! Executing exactly the file that was checked.
//!
//! A path names a file only at the moment it is resolved: between a check of
//! `/usr/libexec/cprd/cpr-vmm` and an `execve` of the same path, a symbolic link can be re-pointed,
//! a directory renamed, a file replaced. So a program cprd runs is opened once, by a walk from
//! `/` that follows no symbolic link and checks each directory on the way (root-owned, not
//! writable by group or others, unless it is sticky like `/tmp`) and the file itself (regular,
//! root-owned, executable, not writable by group or others); what runs is then that open file,
//! through `/proc/self/fd/N`, whatever happens to the path afterwards.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// An opened program's descriptor is kept at or above this number, above every target
/// [`crate::place_fds`] accepts, so that placing a child's descriptors never overwrites it.
pub const EXEC_FD_FLOOR: RawFd = 256;

/// Why a path may not be executed.
#[derive(Debug, thiserror::Error)]
pub enum UntrustedPath {
    /// Not an absolute path.
    #[error("not an absolute path")]
    NotAbsolute,
    /// A `.` or `..` component, or an empty one (`//`): the path must be written as it resolves.
    #[error("has a `.`, `..` or empty component: write the path as it resolves")]
    NotCanonical,
    /// A component is a symbolic link.
    #[error("{0} is a symbolic link: name the file it points to")]
    Symlink(PathBuf),
    /// A component is not owned by root.
    #[error("{path} is owned by uid {uid}, not root")]
    NotOwnedByRoot {
        /// The component.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// A component can be changed by others than root.
    #[error("{path} is writable by group or others (mode {mode:o})")]
    Writable {
        /// The component.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A directory on the way is not a directory.
    #[error("{0} is not a directory")]
    NotDirectory(PathBuf),
    /// The file is not a regular, executable file.
    #[error("{0} is not a regular executable file")]
    NotExecutable(PathBuf),
    /// A component could not be opened or examined.
    #[error("{path}: {source}")]
    Io {
        /// The component.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
}

/// A program opened and checked once, run as the open file (see the module's comment).
#[derive(Debug, Clone)]
pub struct Executable {
    path: PathBuf,
    file: Arc<OwnedFd>,
    script: bool,
}

/// `openat(dir, name, flags)` as an owned descriptor.
fn open_at(dir: BorrowedFd<'_>, name: &[u8], flags: libc::c_int) -> std::io::Result<OwnedFd> {
    let name = CString::new(name).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `dir` is a valid descriptor and `name` a NUL-terminated string.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A close-on-exec copy of `file` at or above [`EXEC_FD_FLOOR`], where an `Executable` keeps it.
fn above_floor(file: &File) -> std::io::Result<Arc<OwnedFd>> {
    // SAFETY: F_DUPFD_CLOEXEC on a valid descriptor returns a new one or -1.
    let high = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, EXEC_FD_FLOOR) };
    if high < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fcntl returned a new descriptor that nothing else owns.
    Ok(Arc::new(unsafe { OwnedFd::from_raw_fd(high) }))
}

/// Whether `name` in `dir` is a symbolic link (to explain a refused open).
fn is_symlink_at(dir: BorrowedFd<'_>, name: &[u8]) -> bool {
    let Ok(name) = CString::new(name) else { return false };
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid descriptor, NUL-terminated name, `st` large enough for a stat.
    let rc = unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    // SAFETY: fstatat filled `st` when it returned 0.
    rc == 0 && (unsafe { st.assume_init() }.st_mode & libc::S_IFMT) == libc::S_IFLNK
}

/// Root-owned, and not writable by group or others unless `sticky_ok` and the sticky bit is set.
fn check_owner_and_mode(path: &Path, meta: &std::fs::Metadata, sticky_ok: bool) -> Result<(), UntrustedPath> {
    if meta.uid() != 0 {
        return Err(UntrustedPath::NotOwnedByRoot { path: path.to_path_buf(), uid: meta.uid() });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 && !(sticky_ok && mode & 0o1000 != 0) {
        return Err(UntrustedPath::Writable { path: path.to_path_buf(), mode });
    }
    Ok(())
}

/// Checks that `path` is absolute and written as it resolves: no `.`, `..` or empty component.
pub fn check_written_as_resolved(path: &Path) -> Result<(), UntrustedPath> {
    if !path.is_absolute() {
        return Err(UntrustedPath::NotAbsolute);
    }
    let names = path.as_os_str().as_bytes()[1..].split(|b| *b == b'/');
    if names.into_iter().any(|n| n.is_empty() || n == b"." || n == b"..") {
        return Err(UntrustedPath::NotCanonical);
    }
    Ok(())
}

impl Executable {
    /// Opens `path` for execution after checking it and every directory on its way (see the
    /// module's comment). A sticky directory that others may write to (`/tmp`) is accepted on
    /// the way, because no one but root can rename or remove the root-owned entry in it.
    pub fn open_trusted(path: &Path) -> Result<Self, UntrustedPath> {
        check_written_as_resolved(path)?;
        let names: Vec<&[u8]> = path.as_os_str().as_bytes()[1..].split(|b| *b == b'/').collect();
        let io = |p: &Path| {
            let path = p.to_path_buf();
            move |source| UntrustedPath::Io { path, source }
        };
        let mut here = PathBuf::from("/");
        let mut dir = File::from(
            open_at(
                // SAFETY: AT_FDCWD is a valid dirfd for an absolute path.
                unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) },
                b"/",
                libc::O_PATH | libc::O_DIRECTORY,
            )
            .map_err(io(&here))?,
        );
        let last = names.len() - 1;
        for (i, name) in names.iter().enumerate() {
            // The directory the entry sits in: root-owned, and writable by others only if sticky
            // (then they can neither rename nor remove root's entry in it).
            check_owner_and_mode(&here, &dir.metadata().map_err(io(&here))?, true)?;
            here.push(std::ffi::OsStr::from_bytes(name));
            let flags = if i == last { libc::O_RDONLY | libc::O_NOCTTY } else { libc::O_PATH | libc::O_DIRECTORY };
            let next = open_at(dir.as_fd(), name, flags | libc::O_NOFOLLOW).map_err(|e| {
                if is_symlink_at(dir.as_fd(), name) {
                    UntrustedPath::Symlink(here.clone())
                } else if e.raw_os_error() == Some(libc::ENOTDIR) {
                    UntrustedPath::NotDirectory(here.clone())
                } else {
                    UntrustedPath::Io { path: here.clone(), source: e }
                }
            })?;
            dir = File::from(next);
        }
        let meta = dir.metadata().map_err(io(&here))?;
        if !meta.is_file() || meta.mode() & 0o111 == 0 {
            return Err(UntrustedPath::NotExecutable(here));
        }
        check_owner_and_mode(&here, &meta, false)?;
        let mut magic = [0u8; 2];
        let script = dir.read_at(&mut magic, 0).is_ok_and(|n| n == 2) && magic == *b"#!";
        let file = above_floor(&dir).map_err(|source| UntrustedPath::Io { path: here, source })?;
        Ok(Self { path: path.to_path_buf(), file, script })
    }

    /// The program process `pid` runs, opened through `/proc/PID/exe`: for running a binary
    /// again that cprd checked and started earlier, whatever its path names now (a package
    /// upgrade may have replaced or removed it). The caller vouches for `pid` (a VMM on its
    /// records); no path is checked here.
    pub fn of_process(pid: u32) -> Result<Self, UntrustedPath> {
        let exe = PathBuf::from(format!("/proc/{pid}/exe"));
        let io = |source| UntrustedPath::Io { path: exe.clone(), source };
        let path = std::fs::read_link(&exe).map_err(io)?;
        let file = above_floor(&File::open(&exe).map_err(io)?).map_err(io)?;
        Ok(Self { path, file, script: false })
    }

    /// The path it was opened as (what a status shows, and the child's `argv[0]`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file, for handing it to another process (which can execute it as
    /// `/proc/self/fd/N` without looking its path up again).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.file)
    }

    /// `/proc/self/fd/N`: the open file, for reading it in this process.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// A command that executes the open file, with `argv[0]` set to [`Executable::path`]. Keep
    /// this `Executable` alive until the child is spawned.
    pub fn command(&self) -> Command {
        let fd = self.file.as_raw_fd();
        let mut cmd = Command::new(format!("/proc/self/fd/{fd}"));
        cmd.arg0(&self.path);
        if self.script {
            // A script's interpreter opens `/proc/self/fd/N` after the exec: the descriptor must
            // survive it (in the child only; it stays close-on-exec here).
            // SAFETY: fcntl is async-signal-safe; `fd` is open in the child (inherited).
            unsafe {
                cmd.pre_exec(move || {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A root-owned directory under `/tmp` (sticky, so accepted on the way) for test files.
    fn scratch() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        d
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    }

    #[test]
    fn a_plain_path_opens_and_runs_as_the_opened_file() {
        let d = scratch();
        let p = script(d.path(), "say", "echo first");
        let exe = Executable::open_trusted(&p).expect("trusted");
        assert_eq!(exe.path(), p);
        // Replaced after the check: what runs is still the file that was opened.
        std::fs::remove_file(&p).expect("rm");
        script(d.path(), "say", "echo second");
        let out = exe.command().output().expect("run");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "first\n");
        let elf = Executable::open_trusted(Path::new("/usr/bin/true")).expect("/usr/bin/true");
        assert!(elf.command().status().expect("run").success());
    }

    #[test]
    fn every_unsafe_path_is_refused_with_its_reason() {
        let d = scratch();
        let p = script(d.path(), "vmm", "true");
        let name = |e: UntrustedPath| e.to_string();
        assert!(matches!(Executable::open_trusted(Path::new("vmm")), Err(UntrustedPath::NotAbsolute)));
        for bad in ["/usr/bin/../bin/true", "/usr/bin/./true", "/usr//bin/true", "/usr/bin/true/"] {
            let e = Executable::open_trusted(Path::new(bad)).expect_err(bad);
            assert!(matches!(e, UntrustedPath::NotCanonical), "{bad}: {e}");
        }
        std::os::unix::fs::symlink(&p, d.path().join("link")).expect("symlink");
        let e = Executable::open_trusted(&d.path().join("link")).expect_err("link");
        assert!(matches!(e, UntrustedPath::Symlink(ref l) if *l == d.path().join("link")), "{e}");
        std::fs::create_dir(d.path().join("real")).expect("mkdir");
        script(&d.path().join("real"), "vmm", "true");
        std::os::unix::fs::symlink(d.path().join("real"), d.path().join("dirlink")).expect("symlink");
        let e = Executable::open_trusted(&d.path().join("dirlink/vmm")).expect_err("dir link");
        assert!(matches!(e, UntrustedPath::Symlink(_)), "a link on the way: {e}");
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o775)).expect("chmod");
        let e = Executable::open_trusted(&p).expect_err("group-writable dir");
        assert!(name(e).contains("writable by group or others (mode 775)"));
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o757)).expect("chmod");
        let e = Executable::open_trusted(&p).expect_err("world-writable file");
        assert!(matches!(e, UntrustedPath::Writable { .. }), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = Executable::open_trusted(&p).expect_err("not executable");
        assert!(matches!(e, UntrustedPath::NotExecutable(_)), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        nix::unistd::chown(&p, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
        let e = Executable::open_trusted(&p).expect_err("not root's");
        assert!(matches!(e, UntrustedPath::NotOwnedByRoot { uid: 65534, .. }), "{e}");
        let e = Executable::open_trusted(&d.path().join("vmm/x")).expect_err("a file as a directory");
        assert!(matches!(e, UntrustedPath::NotDirectory(_)), "{e}");
    }
}
