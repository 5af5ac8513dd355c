//! The box a VMM runs in: an identity of its own, no capabilities, `NoNewPrivs`, and a mount
//! namespace in which the host is read-only and holds nothing of the host's runtime state.
//!
//! Everything happens in the child between `fork` and `exec`, in this order:
//! 1. new mount, IPC and UTS namespaces; every mount private, so nothing propagates back;
//! 2. `/dev` becomes a fresh tmpfs with only the devices the VMM may use bound into it, and
//!    `/run` (cprd's sockets and records, the bus, systemd's sockets), `/home` and `/root` empty
//!    tmpfs, except the directories named as writable, bound back at their own paths;
//! 3. every mount read-only and `nosuid` (`mount_setattr(AT_RECURSIVE)`), then the writable
//!    directories writable again;
//! 4. every capability dropped from the bounding set, the supplementary groups, gid and uid set
//!    (real, effective and saved), the ambient and inheritable sets emptied, `NoNewPrivs` set.
//!
//! The sources of the bind mounts are opened (`O_PATH`) in the new namespace before `/dev` and
//! `/run` are covered, and bound through `/proc/self/fd/N`.
//! The child only makes system calls, on strings built before the fork: nothing allocates.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Devices a VMM may open in its box (KVM is handed over as a descriptor where the VMM takes
/// one; QEMU opens `/dev/kvm` itself).
pub const DEVICES: [&str; 5] = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/dev/kvm"];

/// Host directories a VMM sees as empty.
pub const HIDDEN: [&str; 3] = ["/run", "/home", "/root"];

/// The identity and view of the host one VMM runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// User id (not 0).
    pub uid: u32,
    /// Group id (not 0).
    pub gid: u32,
    /// Supplementary groups (the group of `/dev/kvm`, where a VMM opens it itself).
    pub groups: Vec<u32>,
    /// Host directories the VMM may write to, each bound at a path of its own in the box.
    pub writable: Vec<Writable>,
    /// The lowest nice the VMM may give its own threads and session (`RLIMIT_NICE`), so that it
    /// can weight a handoff's downtime (`crate::sched`) without `CAP_SYS_NICE`; `None`: none.
    /// Only as far as [`nice_limit_reachable`] says (raising the hard limit needs
    /// `CAP_SYS_RESOURCE`).
    pub lowest_nice: Option<i32>,
}

/// linux/capability.h: the capability that raises a hard resource limit.
const CAP_SYS_RESOURCE: u32 = 24;

/// `RLIMIT_NICE` for a lowest nice (the limit n allows nice values down to 20 - n).
fn nice_rlimit(nice: i32) -> libc::rlim_t {
    libc::rlim_t::try_from(20 - nice.clamp(-20, 19)).unwrap_or(0)
}

/// Whether this process can give a child an `RLIMIT_NICE` that allows `nice`: the hard limit
/// allows it already, or this process has `CAP_SYS_RESOURCE` to raise it.
pub fn nice_limit_reachable(nice: i32) -> bool {
    let mut now = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct it is given.
    let hard = if unsafe { libc::getrlimit(libc::RLIMIT_NICE, &raw mut now) } == 0 { now.rlim_max } else { 0 };
    let cap_sys_resource = std::fs::read_to_string("/proc/self/status").ok().is_some_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
    });
    hard >= nice_rlimit(nice) || cap_sys_resource
}

/// A host directory bound, writable, into the box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writable {
    /// The directory on the host.
    pub host: PathBuf,
    /// Where the VMM sees it: below one of the directories the box hides ([`HIDDEN`]), so
    /// that the way to it is created in the box's own tmpfs.
    pub inside: PathBuf,
}

/// A path as a C string.
fn c_path(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::Error::other(format!("{} has a NUL byte", p.display())))
}

/// One bind mount: its source and where it goes.
struct Bind {
    source: CString,
    target: CString,
    /// Directories to create first (each prefix of the target under the tmpfs), or none for a
    /// device (a file is created at the target).
    dirs: Vec<CString>,
    writable: bool,
}

/// The most bind mounts one box has.
const MAX_BINDS: usize = 32;

/// Writes `/proc/self/fd/N` with its NUL into `buf` (no allocation: this runs in the child).
fn fd_path(buf: &mut [u8; 32], fd: RawFd) -> *const libc::c_char {
    let prefix = b"/proc/self/fd/";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 12];
    let mut n = fd.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[prefix.len() + i] = digits[len - 1 - i];
    }
    buf[prefix.len() + len] = 0;
    buf.as_ptr().cast()
}

/// Everything the child needs, prepared in the parent.
struct Plan {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    hidden: Vec<CString>,
    binds: Vec<Bind>,
    dev: CString,
    root: CString,
    tmpfs: CString,
    dev_options: CString,
    hidden_options: CString,
    fd_link: (CString, CString),
    last_cap: libc::c_ulong,
    nice_limit: Option<libc::rlimit>,
}

/// `mount_setattr(2)`'s argument (linux/mount.h).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const AT_RECURSIVE: libc::c_int = 0x8000;

/// `capset(2)`'s header and data (linux/capability.h, version 3: two 32-bit words per set).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Turns a negative return into the error `errno` stands for (no allocation: this runs in the
/// child).
fn check(rc: libc::c_long) -> std::io::Result<()> {
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

impl Plan {
    /// Runs in the child between fork and exec: system calls only, on prepared strings.
    ///
    /// # Safety
    /// Only call between fork and exec (it changes the calling process's namespaces and ids).
    unsafe fn enter(&self) -> std::io::Result<()> {
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: every pointer is a NUL-terminated string or a struct owned by `self` or this
        // frame, alive for the call; the calls only affect this (child) process.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS).into())?;
            check(libc::mount(null, self.root.as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, null.cast()).into())?;
            // The sources, opened in this namespace before anything covers them (a descriptor
            // opened before the unshare names a mount of the old namespace, which cannot be
            // bound here); close-on-exec, so the VMM never sees them.
            let mut sources = [-1 as RawFd; MAX_BINDS];
            for (slot, b) in sources.iter_mut().zip(&self.binds) {
                *slot = libc::open(b.source.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
                check((*slot).into())?;
            }
            // /dev: a fresh tmpfs with the allowed devices bound in.
            check(
                libc::mount(
                    self.tmpfs.as_ptr(),
                    self.dev.as_ptr(),
                    self.tmpfs.as_ptr(),
                    libc::MS_NOSUID | libc::MS_NOEXEC,
                    self.dev_options.as_ptr().cast(),
                )
                .into(),
            )?;
            check(libc::symlink(self.fd_link.0.as_ptr(), self.fd_link.1.as_ptr()).into())?;
            for h in &self.hidden {
                check(
                    libc::mount(
                        self.tmpfs.as_ptr(),
                        h.as_ptr(),
                        self.tmpfs.as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        self.hidden_options.as_ptr().cast(),
                    )
                    .into(),
                )?;
            }
            // The way to a writable directory must be traversable by the VMM whatever umask the
            // parent runs with (cprd's is 077); the VMM gets the parent's umask back.
            let umask = libc::umask(0o022);
            let mut via = [0u8; 32];
            for (b, source) in self.binds.iter().zip(sources) {
                for d in &b.dirs {
                    if libc::mkdir(d.as_ptr(), 0o755) < 0 && *libc::__errno_location() != libc::EEXIST {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if b.dirs.is_empty() {
                    let fd = libc::open(b.target.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o600);
                    check(fd.into())?;
                    libc::close(fd);
                }
                let via = fd_path(&mut via, source);
                check(libc::mount(via, b.target.as_ptr(), null, libc::MS_BIND, null.cast()).into())?;
                libc::close(source);
            }
            libc::umask(umask);
            // Everything read-only and nosuid, then the writable directories writable again.
            let ro = MountAttr {
                attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID,
                attr_clr: 0,
                propagation: 0,
                userns_fd: 0,
            };
            check(libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                self.root.as_ptr(),
                AT_RECURSIVE,
                &raw const ro,
                std::mem::size_of::<MountAttr>(),
            ))?;
            let rw = MountAttr { attr_set: 0, attr_clr: MOUNT_ATTR_RDONLY, propagation: 0, userns_fd: 0 };
            for b in self.binds.iter().filter(|b| b.writable) {
                check(libc::syscall(
                    libc::SYS_mount_setattr,
                    libc::AT_FDCWD,
                    b.target.as_ptr(),
                    0,
                    &raw const rw,
                    std::mem::size_of::<MountAttr>(),
                ))?;
            }
            check(libc::chdir(self.root.as_ptr()).into())?;
            if let Some(limit) = &self.nice_limit {
                check(libc::setrlimit(libc::RLIMIT_NICE, limit).into())?;
            }
            // No capability can come back: bounding set emptied while we still may.
            for cap in 0..=self.last_cap {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && *libc::__errno_location() != libc::EINVAL {
                    return Err(std::io::Error::last_os_error());
                }
            }
            check(libc::setgroups(self.groups.len(), self.groups.as_ptr()).into())?;
            check(libc::setresgid(self.gid, self.gid, self.gid).into())?;
            check(libc::setresuid(self.uid, self.uid, self.uid).into())?;
            check(libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0).into())?;
            let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
            let data = [CapData { effective: 0, permitted: 0, inheritable: 0 }; 2];
            check(libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into())?;
        }
        Ok(())
    }
}

/// Every prefix of `target` below `top` (`/run/a/b` under `/run`: `/run/a`, `/run/a/b`).
fn prefixes_below(top: &Path, target: &Path) -> std::io::Result<Vec<CString>> {
    let rest = target.strip_prefix(top).map_err(|_| std::io::Error::other("not below"))?;
    let mut here = top.to_path_buf();
    let mut out = Vec::new();
    for part in rest.components() {
        here.push(part);
        out.push(c_path(&here)?);
    }
    Ok(out)
}

impl Sandbox {
    /// Arranges for the child that `cmd` starts to enter this box just before it executes
    /// (after every earlier `pre_exec` step, such as [`crate::place_fds`]). Checks and opens
    /// everything it can in this process first, so a bad plan fails here with its reason.
    pub fn apply(&self, cmd: &mut Command) -> std::io::Result<()> {
        if self.uid == 0 || self.gid == 0 {
            return Err(std::io::Error::other("a VMM's sandbox identity must not be root"));
        }
        let mut binds = Vec::new();
        for dev in DEVICES.iter().map(Path::new).filter(|d| d.exists()) {
            binds.push(Bind { source: c_path(dev)?, target: c_path(dev)?, dirs: Vec::new(), writable: true });
        }
        for w in &self.writable {
            let inside = &w.inside;
            let Some(top) = HIDDEN.iter().map(Path::new).find(|h| inside.starts_with(h) && inside != h) else {
                return Err(std::io::Error::other(format!(
                    "{} is not below a directory the sandbox hides ({})",
                    inside.display(),
                    HIDDEN.join(", ")
                )));
            };
            if !w.host.is_dir() {
                return Err(std::io::Error::other(format!("{} is not a directory", w.host.display())));
            }
            binds.push(Bind {
                source: c_path(&w.host)?,
                target: c_path(inside)?,
                dirs: prefixes_below(top, inside)?,
                writable: true,
            });
        }
        if binds.len() > MAX_BINDS {
            return Err(std::io::Error::other(format!("at most {MAX_BINDS} bind mounts")));
        }
        let hidden = HIDDEN
            .iter()
            .map(Path::new)
            .filter(|h| std::fs::symlink_metadata(h).is_ok_and(|m| m.is_dir()))
            .map(c_path)
            .collect::<std::io::Result<Vec<_>>>()?;
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(63);
        let plan = Plan {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
            hidden,
            binds,
            dev: c_path(Path::new("/dev"))?,
            root: c_path(Path::new("/"))?,
            tmpfs: c_path(Path::new("tmpfs"))?,
            dev_options: c_path(Path::new("mode=0755,size=64k"))?,
            hidden_options: c_path(Path::new("mode=0755,size=1m"))?,
            fd_link: (c_path(Path::new("/proc/self/fd"))?, c_path(Path::new("/dev/fd"))?),
            last_cap,
            nice_limit: self.lowest_nice.filter(|n| nice_limit_reachable(*n)).map(|nice| {
                let n = nice_rlimit(nice);
                libc::rlimit { rlim_cur: n, rlim_max: n }
            }),
        };
        // SAFETY: `enter` only makes system calls on what `plan` holds; the closure owns `plan`.
        unsafe {
            cmd.pre_exec(move || plan.enter());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn root_as_the_identity_is_refused() {
        let s = Sandbox { uid: 0, gid: 5, groups: vec![], writable: vec![], lowest_nice: None };
        assert!(s.apply(&mut Command::new("true")).is_err());
    }

    #[test]
    fn a_boxed_child_has_its_identity_no_capabilities_and_a_read_only_host() {
        if !root() {
            eprintln!("skipped: needs root");
            assert!(std::env::var_os("CI").is_none(), "CI runs as root");
            return;
        }
        let host = tempfile::tempdir().expect("tempdir");
        let writable = host.path().join("vm");
        std::fs::create_dir(&writable).expect("mkdir");
        nix::unistd::chown(&writable, Some(nix::unistd::Uid::from_raw(4_000_123)), None).expect("chown");
        let inside = PathBuf::from("/run/cprd-vm/x");
        let s = Sandbox {
            uid: 4_000_123,
            gid: 4_000_124,
            groups: vec![4_000_125],
            writable: vec![Writable { host: writable.clone(), inside: inside.clone() }],
            lowest_nice: Some(-10),
        };
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(format!(
            "id -u; id -g; id -G; grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs)' /proc/self/status; \
             ls -A /run | tr '\\n' ' '; echo; ls -A /dev | tr '\\n' ' '; echo; \
             touch /etc/cprd-sandbox-probe 2>/dev/null && echo wrote-etc || echo etc-read-only; \
             touch {w}/ok && echo wrote-own || echo own-read-only; echo x >/dev/null && echo null-ok; \
             touch {h}/no 2>/dev/null && echo wrote-host-path || echo host-path-read-only; \
             renice -n -10 -p $$ >/dev/null 2>&1 && echo nice-10-ok; renice -n -11 -p $$ >/dev/null 2>&1 || echo nice-11-refused",
            w = inside.display(),
            h = host.path().display()
        ));
        s.apply(&mut cmd).expect("apply");
        // cprd runs with umask 077: the way to the writable directory is still traversable.
        // SAFETY: umask only swaps this process's mask (restored below).
        let before = unsafe { libc::umask(0o077) };
        let out = cmd.output().expect("run");
        // SAFETY: as above.
        unsafe { libc::umask(before) };
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(&lines[..3], ["4000123", "4000124", "4000124 4000125"], "{text}");
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert!(text.contains(&format!("{set}:\t0000000000000000")), "{set} empty:\n{text}");
        }
        assert!(text.contains("NoNewPrivs:\t1"), "{text}");
        assert_eq!(lines[9].trim(), "cprd-vm", "/run holds only the way to the writable directory");
        let dev: Vec<&str> = lines[10].split_whitespace().collect();
        assert!(dev.iter().all(|d| ["null", "zero", "urandom", "random", "kvm", "fd"].contains(d)), "{dev:?}");
        for said in ["etc-read-only", "wrote-own", "null-ok", "host-path-read-only", "nice-11-refused"] {
            assert!(text.contains(said), "{said}:\n{text}");
        }
        // Where this host lets the limit be given, the box may go down to nice -10 and no further.
        assert_eq!(text.contains("nice-10-ok"), nice_limit_reachable(-10), "{text}");
        assert!(writable.join("ok").exists());
        assert!(!Path::new("/etc/cprd-sandbox-probe").exists());
    }

    #[test]
    fn an_opened_script_runs_in_the_box() {
        if !root() {
            eprintln!("skipped: needs root");
            assert!(std::env::var_os("CI").is_none(), "CI runs as root");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let p = d.path().join("vmm");
        std::fs::write(&p, "#!/bin/sh\nid -u\n").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let exe = crate::Executable::open_trusted(&p).expect("trusted");
        let mut cmd = exe.command();
        Sandbox { uid: 4_000_200, gid: 4_000_200, groups: vec![], writable: vec![], lowest_nice: None }
            .apply(&mut cmd)
            .expect("apply");
        let out = cmd.output().expect("run");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "4000200\n", "{}", String::from_utf8_lossy(&out.stderr));
    }
}
