//! Modes and owners of what cprd creates, whatever the umask it was started with.
//!
//! cprd sets its umask to 077 first thing, so everything it (and every VMM it starts, which
//! inherits the umask) creates is owner-only unless given a mode here: the runtime records, the
//! VMM control and QMP sockets, the handoff channels. What group `cprd` may read gets its mode
//! and group explicitly: the runtime directory (0750) and the console logs (0640).

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The umask cprd runs with (and hands to every VMM).
pub const UMASK: u32 = 0o077;

/// Sets cprd's umask to [`UMASK`].
pub fn set_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(UMASK));
}

/// The gid of group `cprd`, where it exists.
fn cprd_gid() -> Option<nix::unistd::Gid> {
    nix::unistd::Group::from_name("cprd").ok().flatten().map(|g| g.gid)
}

/// Gives `path` mode `mode`, and group `cprd` where that group exists. Failures are logged:
/// the mode only ever gets tighter than the umask left it.
pub fn share_with_group(path: &Path, mode: u32) {
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        tracing::warn!("cannot set mode {mode:o} on {}: {e}", path.display());
    }
    if let Some(gid) = cprd_gid()
        && let Err(e) = nix::unistd::chown(path, None, Some(gid))
    {
        tracing::warn!("cannot give {} to group cprd: {e}", path.display());
    }
}

/// Creates the runtime directory and its `vms` directory: 0750, group `cprd`.
pub fn runtime_dirs(runtime_dir: &Path) {
    let _ = std::fs::create_dir_all(runtime_dir.join("vms"));
    share_with_group(runtime_dir, 0o750);
    share_with_group(&runtime_dir.join("vms"), 0o750);
}

/// Opens (creating) a console log for writing at its end (by offset: `splice` refuses files
/// opened for appending): 0640, group `cprd`.
pub fn open_console_log(path: &Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o640).open(path)?;
    share_with_group(path, 0o640);
    Ok(file)
}
