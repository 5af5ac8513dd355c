//! Guest RAM as both sides of a handoff (and cprd, which creates and keeps it) agree on it: a
//! memfd sealed against shrinking and growing, of a size in [`MIN_MEMORY_BYTES`, `MAX_MEMORY_BYTES`]
//! and a multiple of 4 KiB.

use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{FcntlArg, SealFlag, fcntl};

/// Smallest guest RAM accepted.
pub const MIN_MEMORY_BYTES: u64 = 16 << 20;
/// Largest guest RAM accepted.
pub const MAX_MEMORY_BYTES: u64 = 1 << 40;

/// Parses a size like `1G`, `256M`, `512K` or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let not_a_size = || format!("{text:?} is not a size (e.g. 1G, 256M)");
    if !t.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(not_a_size());
    }
    let (digits, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(format!("unknown size suffix in {text:?} (use K, M, G or T)"));
                }
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = digits.parse().map_err(|_| not_a_size())?;
    n.checked_mul(mult).ok_or_else(|| format!("{text:?} is too large"))
}

/// Checks a guest RAM size.
pub fn check_size(bytes: u64) -> Result<(), String> {
    if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&bytes) || !bytes.is_multiple_of(4096) {
        return Err(format!("guest memory of {bytes} bytes is not supported (16 MiB to 1 TiB, a multiple of 4 KiB)"));
    }
    Ok(())
}

/// Seals a memfd against shrinking and growing, and against further seal changes.
pub fn seal(fd: impl AsFd) -> Result<(), String> {
    let current = fcntl(fd.as_fd(), FcntlArg::F_GET_SEALS)
        .map_err(|e| format!("guest-RAM fd cannot be sealed (is it a memfd?): {e}"))?;
    let want = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
    let have = SealFlag::from_bits_truncate(current);
    if have.contains(want) {
        return Ok(());
    }
    if have.contains(SealFlag::F_SEAL_SEAL) {
        if have.contains(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW) {
            return Ok(());
        }
        return Err("guest-RAM memfd is sealed without SHRINK and GROW seals".into());
    }
    fcntl(fd.as_fd(), FcntlArg::F_ADD_SEALS(want)).map_err(|e| format!("cannot seal guest-RAM memfd: {e}"))?;
    Ok(())
}

/// Creates a sealed memfd of `bytes`.
pub fn create_memfd(bytes: u64) -> Result<OwnedFd, String> {
    check_size(bytes)?;
    let fd = nix::sys::memfd::memfd_create(
        c"cpr-vmm-ram",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(|e| format!("memfd_create failed: {e}"))?;
    let len = i64::try_from(bytes).map_err(|_| "memory size too large".to_string())?;
    nix::unistd::ftruncate(&fd, len).map_err(|e| format!("cannot size guest RAM: {e}"))?;
    seal(&fd)?;
    Ok(fd)
}
