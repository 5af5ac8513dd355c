//! Serial consoles: capped, rotated logs that no guest can grow without end.
//!
//! No VMM writes a log file itself. A cpr-vmm's console is a pipe (a QEMU's a socket pair, see
//! `qemu.rs`): the VMM writes into one end (non-blocking: a console nobody drains drops output,
//! it never stalls a vCPU), and cprd reads the other and appends what it reads to `NAME.console`, rotating it before it
//! passes [`ConsoleLimits::max_bytes`]: `NAME.console` becomes `NAME.console.1`, `.1` becomes
//! `.2`, up to [`ConsoleLimits::keep`] old files, and the oldest is dropped. So a guest's console
//! takes at most `max_bytes × (keep + 1)` on the host, whatever it prints (virtlogd's scheme,
//! whose defaults are 2 MiB × 3).
//!
//! cprd's end lives in systemd's fd store (`vm-NAME-console`), so a restarted cprd goes on
//! reading where the last one stopped. Every cpr-vmm generation also holds a copy of it at
//! [`VMM_KEEP_FD`] and never uses it (as every QEMU does at its own number): while cprd is away
//! the pipe stays open and buffers what the guest prints, and a cprd restarted without an fd
//! store takes its end back from the VMM with pidfd_getfd(2). Only from a VMM that holds none
//! (an older one) does it make a new pair and hand the VMM its end (`set-console`).
//! `cprctl console` follows the file across rotations.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// How large a console log may grow, and how many rotated files are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleLimits {
    /// Largest size of one log file, in bytes.
    pub max_bytes: u64,
    /// Rotated files kept besides the live one (`NAME.console.1` .. `.keep`).
    pub keep: u32,
}

impl Default for ConsoleLimits {
    fn default() -> Self {
        Self { max_bytes: DEFAULT_MAX_BYTES, keep: DEFAULT_KEEP }
    }
}

/// Default size of one console log file: 1 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 20;
/// Default number of rotated files kept.
pub const DEFAULT_KEEP: u32 = 3;
/// The smallest `max_bytes` accepted (one read of the pump must fit in a file).
pub const MIN_MAX_BYTES: u64 = 64 << 10;
/// The most rotated files that may be kept.
pub const MAX_KEEP: u32 = 100;

/// The limits in effect; the configuration sets them, every pump reads them at each write, so a
/// reload applies to running VMs.
static LIMITS: RwLock<ConsoleLimits> = RwLock::new(ConsoleLimits { max_bytes: DEFAULT_MAX_BYTES, keep: DEFAULT_KEEP });

/// Sets the limits in effect.
pub fn set_limits(limits: ConsoleLimits) {
    *LIMITS.write().unwrap_or_else(std::sync::PoisonError::into_inner) = limits;
}

fn limits() -> ConsoleLimits {
    *LIMITS.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where every cpr-vmm generation holds a copy of cprd's end of its console pipe, unused.
pub const VMM_KEEP_FD: std::os::fd::RawFd = 9;

/// Fd-store name of cprd's end of a cpr-vmm VM's console pipe.
pub fn store_name(vm: &str) -> String {
    format!("vm-{vm}-console")
}

/// What a console pipe holds while nobody reads it (cprd restarting): 1 MiB, the default
/// `fs.pipe-max-size`.
const PIPE_BYTES: libc::c_int = 1 << 20;

/// A console pipe: (the VMM's end, written non-blocking; cprd's end). A pipe, not a socket: the
/// guest's serial port writes one byte at a time, and a socket spends a whole buffer (about
/// 1 KiB of its send budget) on each, so it holds only a few hundred bytes while cprd is away; a
/// pipe packs them into its pages.
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::AsRawFd;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))?;
    // SAFETY: F_SETPIPE_SZ on a pipe this function owns; a failure leaves the default size.
    let _ = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
    Ok((write, read))
}

/// `PATH.N`: the N-th rotated file of the log at `path`.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// A console log that rotates itself before it passes its limit.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
}

impl RotatingLog {
    /// Opens (creating, 0640 group `cprd`) the log at `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = crate::files::open_console_log(path)?;
        let size = file.metadata()?.len();
        Ok(Self { path: path.to_path_buf(), file, size })
    }

    /// Appends `bytes`, rotating first if they would take the file past `limits`.
    pub fn append(&mut self, bytes: &[u8], limits: ConsoleLimits) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if self.size > 0 && self.size + bytes.len() as u64 > limits.max_bytes {
            self.rotate(limits.keep)?;
        }
        self.file.write_all_at(bytes, self.size)?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Moves what `pipe` holds (waiting for some) into the file inside the kernel (`splice`),
    /// up to the room `limits` leave, rotating first when there is none. Nothing passes
    /// through cprd's memory, so a cprd that dies here leaves every byte either in the file or
    /// in the pipe. Returns 0 once every writer of the pipe is gone.
    pub fn splice_from(&mut self, pipe: &OwnedFd, limits: ConsoleLimits) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        if self.size >= limits.max_bytes {
            // Rotated only once there is something for the new file (not at the end).
            let mut fds = [nix::poll::PollFd::new(pipe.as_fd(), nix::poll::PollFlags::POLLIN)];
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE)?;
            if !fds[0].revents().is_some_and(|r| r.contains(nix::poll::PollFlags::POLLIN)) {
                return Ok(0);
            }
            self.rotate(limits.keep)?;
        }
        let room = usize::try_from(limits.max_bytes - self.size).unwrap_or(usize::MAX).min(1 << 20);
        let mut offset = libc::loff_t::try_from(self.size).map_err(std::io::Error::other)?;
        // SAFETY: splice from a pipe this function borrows into the file it owns, at an offset
        // it passes by pointer; no memory of this process is read or written.
        let n = unsafe {
            libc::splice(pipe.as_raw_fd(), std::ptr::null_mut(), self.file.as_raw_fd(), &raw mut offset, room, 0)
        };
        let n = usize::try_from(n).map_err(|_| std::io::Error::last_os_error())?;
        self.size += n as u64;
        Ok(n)
    }

    /// Shifts `.N` to `.N+1` (dropping the oldest and any beyond `keep`), the live file to `.1`,
    /// and opens a new live file. With `keep` = 0 the live file is simply started over.
    fn rotate(&mut self, keep: u32) -> std::io::Result<()> {
        // Files beyond `keep` (left while a larger `keep` was configured) go.
        let mut n = keep + 1;
        while n <= MAX_KEEP + 1 && rotated(&self.path, n).exists() {
            std::fs::remove_file(rotated(&self.path, n))?;
            n += 1;
        }
        if keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            // A rename replaces its target: `.keep` (the oldest) is dropped by the first one.
            for i in (1..keep).rev() {
                let from = rotated(&self.path, i);
                if from.exists() {
                    std::fs::rename(&from, rotated(&self.path, i + 1))?;
                }
            }
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
        }
        *self = Self::open(&self.path)?;
        Ok(())
    }
}

/// Moves the console from cprd's end of a pipe (or socket pair) into the log at `log` until every
/// VMM end is closed (the VM is gone), on a thread of its own. A second call for the same pipe
/// while its pump runs does nothing.
pub fn pump(name: &str, cprd_end: &OwnedFd, log: &Path) {
    let Ok(fd) = cprd_end.as_fd().try_clone_to_owned() else { return };
    let Ok(st) = nix::sys::stat::fstat(&fd) else { return };
    let pipe = (st.st_dev, st.st_ino);
    if !pumping().insert(pipe) {
        return;
    }
    let log = log.to_path_buf();
    let vm = name.to_string();
    let spawned = std::thread::Builder::new().name(format!("console-{name}")).spawn(move || {
        let _registered = Pumping(pipe);
        let mut out = match RotatingLog::open(&log) {
            Ok(out) => out,
            Err(e) => {
                tracing::error!(CPRD_VM = vm, "cannot open the console log {}: {e}", log.display());
                return;
            }
        };
        if st.st_mode & libc::S_IFMT == libc::S_IFIFO {
            // A cpr-vmm's pipe: moved in the kernel, nothing in flight in cprd. A log that cannot
            // be written (a full disk) is tried again each second; meanwhile the pipe holds what
            // it can and the VMM drops the rest.
            let mut failing = false;
            loop {
                match out.splice_from(&fd, limits()) {
                    Ok(0) => return,
                    Ok(_) => failing = false,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        if !failing {
                            tracing::warn!(CPRD_VM = vm, "console log {}: {e}; trying again", log.display());
                        }
                        failing = true;
                        std::thread::sleep(std::time::Duration::from_secs(1));
                    }
                }
            }
        }
        // A QEMU's socket: read, then written (a cprd that dies in between loses that read).
        let mut sock = std::fs::File::from(fd);
        let mut buf = vec![0u8; 16 << 10];
        let mut failing = false;
        loop {
            match sock.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => match out.append(&buf[..n], limits()) {
                    Ok(()) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(CPRD_VM = vm, "console log {}: {e}; output dropped", log.display());
                    }
                    Err(_) => {}
                },
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
    if let Err(e) = spawned {
        pumping().remove(&pipe);
        tracing::error!(CPRD_VM = name, "cannot start the console pump: {e}");
    }
}

/// The pipes (device, inode) a pump reads.
static PUMPING: std::sync::Mutex<std::collections::BTreeSet<(u64, u64)>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

fn pumping() -> std::sync::MutexGuard<'static, std::collections::BTreeSet<(u64, u64)>> {
    PUMPING.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A pump's entry in [`PUMPING`], removed when the pump ends.
struct Pumping((u64, u64));

impl Drop for Pumping {
    fn drop(&mut self) {
        pumping().remove(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files of the console log at `path`: the live one, then the rotated ones, newest first.
    fn files_of(log: &Path) -> Vec<PathBuf> {
        std::iter::once(log.to_path_buf())
            .chain((1..=MAX_KEEP).map(|n| rotated(log, n)).take_while(|p| p.exists()))
            .filter(|p| p.exists())
            .collect()
    }

    /// Log files at `path` and their sizes, live first.
    fn sizes(path: &Path) -> Vec<u64> {
        files_of(path).iter().map(|p| std::fs::metadata(p).map_or(0, |m| m.len())).collect()
    }

    #[test]
    fn a_log_rotates_before_it_passes_its_limit_and_keeps_only_its_old_files() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("vm.console");
        let limits = ConsoleLimits { max_bytes: 1000, keep: 2 };
        let mut log = RotatingLog::open(&path).expect("open");
        let mut written = String::new();
        for i in 0..500 {
            let line = format!("line {i:04}\n");
            log.append(line.as_bytes(), limits).expect("append");
            written.push_str(&line);
        }
        let s = sizes(&path);
        assert_eq!(s.len(), 3, "the live file and 2 rotated ones: {s:?}");
        assert!(s.iter().all(|n| *n <= 1000), "{s:?}");
        assert!(!rotated(&path, 3).exists());
        // The files, oldest first, are the end of what was written, whole.
        let kept: String = files_of(&path).iter().rev().map(|p| std::fs::read_to_string(p).expect("read")).collect();
        assert!(written.ends_with(&kept), "kept {} bytes that are not the end of the output", kept.len());
        assert!(kept.len() > 2000, "{}", kept.len());
    }

    /// A smaller `keep` (a reload) drops the files beyond it at the next rotation; `keep = 0`
    /// keeps the live file alone.
    #[test]
    fn a_smaller_keep_drops_the_files_beyond_it() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("vm.console");
        let mut log = RotatingLog::open(&path).expect("open");
        let line = [b'x'; 100];
        for _ in 0..60 {
            log.append(&line, ConsoleLimits { max_bytes: 1000, keep: 3 }).expect("append");
        }
        assert_eq!(sizes(&path).len(), 4);
        for _ in 0..10 {
            log.append(&line, ConsoleLimits { max_bytes: 1000, keep: 1 }).expect("append");
        }
        assert_eq!(files_of(&path).len(), 2, "{:?}", files_of(&path));
        assert!(!rotated(&path, 2).exists() && !rotated(&path, 3).exists());
        for _ in 0..10 {
            log.append(&line, ConsoleLimits { max_bytes: 1000, keep: 0 }).expect("append");
        }
        assert_eq!(files_of(&path), vec![path.clone()]);
    }

    /// What a pipe holds moves into the log inside the kernel, rotated at the same limits.
    #[test]
    fn a_pipe_is_spliced_into_the_log_and_rotated() {
        use std::io::Write;
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("vm.console");
        let (write, read) = pipe().expect("pipe");
        let mut writer = std::fs::File::from(write);
        let mut written = String::new();
        let mut log = RotatingLog::open(&path).expect("open");
        let limits = ConsoleLimits { max_bytes: 1000, keep: 2 };
        for i in 0..500 {
            let line = format!("line {i:04}\n");
            writer.write_all(line.as_bytes()).expect("write");
            written.push_str(&line);
            if i % 50 == 49 {
                while log.splice_from(&read, limits).expect("splice") == 1000 {}
            }
        }
        drop(writer);
        while log.splice_from(&read, limits).expect("splice") > 0 {}
        let s = sizes(&path);
        assert_eq!(s.len(), 3, "{s:?}");
        assert!(s.iter().all(|n| *n <= 1000), "{s:?}");
        let kept: String = files_of(&path).iter().rev().map(|p| std::fs::read_to_string(p).expect("read")).collect();
        assert!(written.ends_with(&kept) && kept.len() > 2000, "{} bytes kept", kept.len());
    }
}
