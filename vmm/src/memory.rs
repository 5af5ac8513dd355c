//! Guest RAM: a sealed memfd mapped `MAP_SHARED`, so that another process can map the same pages.
//!
//! Layout: RAM below 3 GiB sits at guest-physical 0; anything above continues at 4 GiB, leaving
//! [3 GiB, 4 GiB) free for the in-kernel IOAPIC (0xfec00000) and local APIC (0xfee00000).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::error::{Result, VmmError};

/// Start of the MMIO hole.
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// End of the MMIO hole, where RAM above 3 GiB resumes.
pub const HIGH_RAM_START: u64 = 4 << 30;
pub use cpr_proto::memory::{MAX_MEMORY_BYTES, MIN_MEMORY_BYTES, parse_size};

/// A range of guest RAM: where it sits in the guest and where in the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Offset in the memfd.
    pub file_offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The guest-RAM ranges for `bytes` of RAM.
pub fn ram_ranges(bytes: u64) -> Vec<RamRange> {
    let low = bytes.min(MMIO_HOLE_START);
    let mut ranges = vec![RamRange { guest_addr: 0, file_offset: 0, len: low }];
    if bytes > low {
        ranges.push(RamRange { guest_addr: HIGH_RAM_START, file_offset: low, len: bytes - low });
    }
    ranges
}

/// One past the highest guest-physical RAM address.
pub fn ram_top(bytes: u64) -> u64 {
    ram_ranges(bytes).last().map_or(0, |r| r.guest_addr + r.len)
}

/// Guest RAM backed by a memfd.
#[derive(Debug)]
pub struct GuestRam {
    file: File,
    bytes: u64,
    mem: GuestMemoryMmap,
}

fn check_size(bytes: u64) -> Result<()> {
    cpr_proto::memory::check_size(bytes).map_err(VmmError::Config)
}

/// Seals a memfd against shrinking and growing, and against further seal changes.
pub fn seal(fd: impl AsFd) -> Result<()> {
    cpr_proto::memory::seal(fd).map_err(VmmError::Memory)
}

/// Creates a sealed memfd of `bytes`.
pub fn create_memfd(bytes: u64) -> Result<OwnedFd> {
    check_size(bytes)?;
    cpr_proto::memory::create_memfd(bytes).map_err(VmmError::Memory)
}

impl GuestRam {
    /// Maps guest RAM from `fd`. With `bytes`, the fd must hold at least that much; without, its size is used.
    pub fn from_fd(fd: OwnedFd, bytes: Option<u64>) -> Result<Self> {
        let file = File::from(fd);
        let meta = file
            .metadata()
            .map_err(|e| VmmError::Memory(format!("cannot stat guest-RAM fd {}: {e}", file.as_raw_fd())))?;
        let size = meta.len();
        let bytes = bytes.unwrap_or(size);
        if size < bytes {
            return Err(VmmError::Memory(format!(
                "guest-RAM memfd holds {size} bytes, less than the {bytes} bytes of guest memory"
            )));
        }
        check_size(bytes)?;
        seal(&file)?;
        let mut regions = Vec::new();
        for r in ram_ranges(bytes) {
            let dup = file.try_clone().map_err(|e| VmmError::Memory(format!("cannot dup guest-RAM fd: {e}")))?;
            let len = usize::try_from(r.len).map_err(|_| VmmError::Config("memory size too large".into()))?;
            let region = MmapRegion::from_file(FileOffset::new(dup, r.file_offset), len)
                .map_err(|e| VmmError::Memory(format!("cannot map guest RAM: {e}")))?;
            let region = GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
                .ok_or_else(|| VmmError::Memory("guest RAM region overflows the address space".into()))?;
            regions.push(region);
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| VmmError::Memory(format!("cannot build guest memory map: {e}")))?;
        Ok(Self { file, bytes, mem })
    }

    /// The mapped guest memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The memfd.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Guest RAM in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The guest-physical (start, length) ranges whose pages the memfd holds: what
    /// [`GuestRam::prefault`] faults in, in guest addresses.
    pub fn data_guest_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        for range in ram_ranges(self.bytes) {
            for (start, end) in data_extents(&self.file, range.file_offset, range.file_offset + range.len)? {
                out.push((range.guest_addr + (start - range.file_offset), end - start));
            }
        }
        Ok(out)
    }

    /// Faults in, writable, the pages the memfd already holds, and only those: ranges found with
    /// `SEEK_DATA`/`SEEK_HOLE`, then `MADV_POPULATE_WRITE` on our mapping of them. Holes stay holes,
    /// so pre-faulting never makes the guest bigger. Returns the bytes populated.
    pub fn prefault(&self) -> Result<u64> {
        use vm_memory::GuestMemoryBackend;
        let mut populated = 0u64;
        for (range, region) in ram_ranges(self.bytes).iter().zip(self.mem.iter()) {
            let host = region.as_ptr();
            for (start, end) in data_extents(&self.file, range.file_offset, range.file_offset + range.len)? {
                let off = usize::try_from(start - range.file_offset).unwrap_or(usize::MAX);
                let len = usize::try_from(end - start).unwrap_or(0);
                // SAFETY: [off, off + len) lies inside this region's mapping (the extent was
                // clipped to the region's file range), which stays mapped for `self`'s lifetime.
                let addr = unsafe { host.add(off) };
                // SAFETY: madvise on memory we own; MADV_POPULATE_WRITE only faults pages in.
                let rc = unsafe { libc::madvise(addr.cast(), len, libc::MADV_POPULATE_WRITE) };
                if rc != 0 {
                    return Err(VmmError::Memory(format!(
                        "MADV_POPULATE_WRITE failed: {}",
                        std::io::Error::last_os_error()
                    )));
                }
                populated += end - start;
            }
        }
        Ok(populated)
    }
}

/// Gives `vm` the RAM of `ram` as its memory slots, one per [`ram_ranges`] range.
///
/// # Safety
///
/// `ram`'s mapping must outlive `vm`: KVM keeps the host addresses.
pub unsafe fn register_slots(vm: &kvm_ioctls::VmFd, ram: &GuestRam) -> Result<()> {
    use vm_memory::GuestMemoryBackend;
    for (slot, range) in ram_ranges(ram.bytes()).iter().enumerate() {
        let host = ram
            .mem()
            .get_host_address(vm_memory::GuestAddress(range.guest_addr))
            .map_err(|e| VmmError::Memory(format!("guest RAM not mapped: {e}")))?;
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: u32::try_from(slot).unwrap_or(0),
            guest_phys_addr: range.guest_addr,
            memory_size: range.len,
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is backed by `ram`'s mapping, which the caller keeps alive as long
        // as `vm`.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| VmmError::Memory(format!("KVM_SET_USER_MEMORY_REGION: {e}")))?;
    }
    Ok(())
}

/// The [start, end) byte ranges of `file` within [from, to) that hold data.
fn data_extents(file: &File, from: u64, to: u64) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = from;
    while pos < to {
        let start = match seek(file, pos, libc::SEEK_DATA)? {
            Some(s) if s < to => s,
            _ => break,
        };
        let end = seek(file, start, libc::SEEK_HOLE)?.unwrap_or(to).min(to);
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

fn seek(file: &File, pos: u64, whence: libc::c_int) -> Result<Option<u64>> {
    let off = i64::try_from(pos).map_err(|_| VmmError::Memory("offset too large".into()))?;
    // SAFETY: lseek on an fd we own; it only moves the file offset.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(VmmError::Memory(format!("lseek on guest RAM failed: {err}")));
    }
    Ok(u64::try_from(rc).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn ranges_leave_the_mmio_hole_free() {
        assert_eq!(ram_ranges(1 << 30), vec![RamRange { guest_addr: 0, file_offset: 0, len: 1 << 30 }]);
        let r = ram_ranges(6 << 30);
        assert_eq!(r[1], RamRange { guest_addr: 4 << 30, file_offset: 3 << 30, len: 3 << 30 });
        assert_eq!(ram_top(6 << 30), 7 << 30);
    }

    #[test]
    fn prefault_touches_only_pages_that_hold_data() {
        use vm_memory::{Bytes, GuestAddress};
        let ram = GuestRam::from_fd(create_memfd(64 << 20).expect("memfd"), None).expect("map");
        ram.mem().write_obj(1u64, GuestAddress(8 << 20)).expect("write");
        let populated = ram.prefault().expect("prefault");
        assert!((4096..(4 << 20)).contains(&populated), "populated {populated} bytes");
        let blocks = ram.file().metadata().map(|m| std::os::unix::fs::MetadataExt::blocks(&m)).expect("stat");
        assert!(blocks * 512 < (4 << 20), "memfd grew to {} bytes", blocks * 512);
    }

    #[test]
    fn too_small_fd_is_refused() {
        let fd = create_memfd(16 << 20).expect("memfd");
        let err = GuestRam::from_fd(fd, Some(32 << 20)).expect_err("too small");
        assert!(err.to_string().contains("less than"), "{err}");
    }
}
