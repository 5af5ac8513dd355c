//! Re-executing cprd's own binary on reload when a newer build was installed: same PID (so
//! systemd's MainPID, the fd store and the VMMs' parentage stay), new code. The new image takes
//! the VMs back exactly as after a restart, then finishes the reload and says READY=1.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Environment variable that tells the new image it was re-executed in the middle of a reload.
pub const ENV: &str = "CPRD_REEXEC";

static STARTED: OnceLock<(PathBuf, Option<String>)> = OnceLock::new();

/// Remembers this binary's path and content id at start.
pub fn remember() {
    if let Ok(path) = std::env::current_exe() {
        let id = crate::engine::binary_build_id(&path);
        let _ = STARTED.set((path, id));
    }
}

/// The binary to re-execute if the one on disk differs from the running one.
pub fn changed() -> Option<PathBuf> {
    let (path, id) = STARTED.get()?;
    let now = crate::engine::binary_build_id(path)?;
    (Some(&now) != id.as_ref()).then(|| path.clone())
}

/// Environment variable carrying the control socket's fd number into the new image.
pub const CONTROL_FD_ENV: &str = "CPRD_CONTROL_FD";

/// Replaces this process image with `path`, same arguments, keeping the control socket open
/// (systemd's listening socket must survive); returns only on failure.
pub fn exec(path: &PathBuf) -> std::io::Error {
    let mut cmd = std::process::Command::new(path);
    cmd.args(std::env::args_os().skip(1)).env(ENV, "reload");
    // Everything cprd holds (guest-RAM memfds, QEMU console ends, tap devices) stays open.
    cmd.env(crate::fdstore::REEXEC_FDS_ENV, crate::fdstore::keep_across_exec());
    let raw = crate::control::RAW_FD.load(std::sync::atomic::Ordering::SeqCst);
    if raw >= 0 {
        // SAFETY: F_SETFD on our own listening socket only clears its close-on-exec flag.
        unsafe { libc::fcntl(raw, libc::F_SETFD, 0) };
        cmd.env(CONTROL_FD_ENV, raw.to_string());
    }
    let err = cmd.exec();
    // Still this image: everything made inheritable for the new one is close-on-exec again, or
    // every VMM started from now on would inherit every guest's RAM.
    crate::fdstore::close_on_exec_again();
    if raw >= 0 {
        // SAFETY: F_SETFD on our own listening socket only sets its close-on-exec flag.
        unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    err
}
