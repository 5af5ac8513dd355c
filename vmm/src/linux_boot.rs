//! Booting Linux through the 64-bit boot protocol (Documentation/arch/x86/boot.rst): kernel,
//! initramfs, command line, zero page with the e820 map, MP table, identity page tables and a GDT
//! with `__BOOT_CS` = 0x10 and `__BOOT_DS` = 0x18. For hosts with hardware-assisted KVM.
//!
//! Guest-physical layout:
//! ```text
//! 0x500    GDT: null, null, code64 (0x10), data (0x18), TSS (0x20)
//! 0x7000   zero page (boot_params)
//! 0x8ff0   boot stack top
//! 0x9000   PML4, 0xa000 PDPT, 0xb000..0xf000 four page directories (first 4 GiB, 2 MiB pages)
//! 0x20000  command line (NUL-terminated)
//! 0x9fc00  MP table (EBDA, reserved in e820)
//! 0x100000 kernel; the initramfs sits page-aligned at the top of low RAM
//! ```

use std::fs::File;
use std::path::PathBuf;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::cpl3::flat_segment;
use crate::memory::{HIGH_RAM_START, MMIO_HOLE_START};
use crate::mptable;

/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Guest-physical address of the zero page.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Top of the boot stack.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Guest-physical address of the PML4.
pub const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
/// Guest-physical address of the command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line accepted when the kernel does not say (protocol < 2.06).
pub const DEFAULT_CMDLINE_MAX: u32 = 2048;
/// Where the kernel is loaded.
pub const KERNEL_ADDR: u64 = 0x10_0000;
/// End of conventional memory below the EBDA.
pub const EBDA_START: u64 = 0x9_fc00;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const LOADER_UNDEFINED: u8 = 0xff;
const LOADFLAGS_LOADED_HIGH: u8 = 0x01;
const LOADFLAGS_CAN_USE_HEAP: u8 = 0x80;
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// What to boot.
#[derive(Debug, Clone)]
pub struct LinuxGuest {
    /// bzImage or vmlinux ELF.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

/// Where the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxEntry {
    /// 64-bit entry point.
    pub rip: u64,
    /// Zero page address, passed in `rsi`.
    pub boot_params_addr: u64,
}

/// Why the kernel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    /// The kernel file could not be opened.
    #[error("cannot open kernel image {path}: {err}")]
    OpenKernel {
        /// Its path.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// Neither loader accepted the file.
    #[error("kernel image {path} is neither an ELF vmlinux nor a bzImage ({detail})")]
    NotAKernel {
        /// Its path.
        path: PathBuf,
        /// What the bzImage loader said.
        detail: String,
    },
    /// The initramfs could not be read.
    #[error("cannot read initramfs {path}: {err}")]
    ReadInitrd {
        /// Its path.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// The initramfs does not fit.
    #[error("initramfs {path} ({size} bytes) does not fit between the kernel end {kernel_end:#x} and {limit:#x}")]
    InitrdTooLarge {
        /// Its path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Where the kernel ends.
        kernel_end: u64,
        /// The highest address it may reach.
        limit: u64,
    },
    /// The command line is too long.
    #[error("command line is {len} bytes, longer than the kernel's limit of {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// The MP table could not be written.
    #[error("cannot build the MP table: {0}")]
    Mptable(#[from] mptable::MptableError),
    /// A write to guest memory failed.
    #[error("cannot write {what} into guest memory: {err}")]
    Memory {
        /// What.
        what: &'static str,
        /// Why.
        err: String,
    },
}

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// 1 = RAM, 2 = reserved.
    pub kind: u32,
}

/// The e820 map for `ram_bytes` of guest RAM laid out as in [`crate::memory::ram_ranges`].
pub fn e820_map(ram_bytes: u64) -> Vec<E820Entry> {
    let low_end = ram_bytes.min(MMIO_HOLE_START);
    let mut map = vec![
        E820Entry { addr: 0, size: EBDA_START, kind: E820_RAM },
        E820Entry { addr: EBDA_START, size: KERNEL_ADDR - EBDA_START, kind: E820_RESERVED },
        E820Entry { addr: KERNEL_ADDR, size: low_end - KERNEL_ADDR, kind: E820_RAM },
    ];
    if ram_bytes > low_end {
        map.push(E820Entry { addr: HIGH_RAM_START, size: ram_bytes - low_end, kind: E820_RAM });
    }
    map
}

/// Inputs of the zero page.
#[derive(Debug, Clone, Copy)]
pub struct BootParamsInput {
    /// The kernel's own setup header (bzImage), if any.
    pub header: Option<setup_header>,
    /// Command line length without the NUL.
    pub cmdline_len: u32,
    /// Initramfs placement (address, size).
    pub initrd: Option<(u32, u32)>,
    /// Guest RAM.
    pub ram_bytes: u64,
}

/// Builds the zero page: the kernel's header (or a minimal one), loader type, load flags,
/// command line pointer and size, initramfs, e820 map.
pub fn build_boot_params(input: &BootParamsInput) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = input.header {
        params.hdr = hdr;
    }
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.loadflags |= LOADFLAGS_LOADED_HIGH | LOADFLAGS_CAN_USE_HEAP;
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_ADDR).unwrap_or(0);
    // cmdline_size is the kernel's to state (boot.rst: "read"); only without a header is it ours.
    if input.header.is_none() {
        params.hdr.cmdline_size = input.cmdline_len + 1;
    }
    if let Some((addr, size)) = input.initrd {
        params.hdr.ramdisk_image = addr;
        params.hdr.ramdisk_size = size;
    }
    let map = e820_map(input.ram_bytes);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind };
    }
    params.e820_entries = u8::try_from(map.len()).unwrap_or(0);
    params
}

fn write<M: GuestMemoryBackend>(mem: &M, what: &'static str, bytes: &[u8], at: u64) -> Result<(), LinuxBootError> {
    mem.write_slice(bytes, GuestAddress(at)).map_err(|e| LinuxBootError::Memory { what, err: e.to_string() })
}

/// Loads everything the kernel needs into guest memory and returns its entry.
pub fn load<M: GuestMemoryBackend>(
    mem: &M,
    ram_bytes: u64,
    guest: &LinuxGuest,
    vcpus: u8,
) -> Result<LinuxEntry, LinuxBootError> {
    let open =
        || File::open(&guest.kernel).map_err(|err| LinuxBootError::OpenKernel { path: guest.kernel.clone(), err });
    let mut file = open()?;
    let start = Some(GuestAddress(KERNEL_ADDR));
    let (loaded, rip) = match Elf::load(mem, None, &mut file, start) {
        Ok(l) => {
            let entry = l.kernel_load.0;
            (l, entry)
        }
        Err(linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::InvalidElfMagicNumber)) => {
            let mut file = open()?;
            let l = BzImage::load(mem, None, &mut file, start)
                .map_err(|e| LinuxBootError::NotAKernel { path: guest.kernel.clone(), detail: e.to_string() })?;
            // The 64-bit entry point is 0x200 bytes into the protected-mode kernel.
            let entry = l.kernel_load.0 + 0x200;
            (l, entry)
        }
        Err(e) => return Err(LinuxBootError::NotAKernel { path: guest.kernel.clone(), detail: e.to_string() }),
    };
    let max = loaded
        .setup_header
        .map_or(DEFAULT_CMDLINE_MAX, |h| if h.cmdline_size > 0 { h.cmdline_size - 1 } else { DEFAULT_CMDLINE_MAX });
    let len = guest.cmdline.len();
    if u32::try_from(len).map_or(true, |l| l > max) || guest.cmdline.contains('\0') {
        return Err(LinuxBootError::CmdlineTooLong { len, max });
    }
    let mut cmdline = guest.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    write(mem, "the command line", &cmdline, CMDLINE_ADDR)?;

    let initrd = match &guest.initrd {
        None => None,
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|err| LinuxBootError::ReadInitrd { path: path.clone(), err })?;
            let addr_max = loaded.setup_header.map_or(DEFAULT_INITRD_ADDR_MAX, |h| {
                if h.initrd_addr_max > 0 { u64::from(h.initrd_addr_max) } else { DEFAULT_INITRD_ADDR_MAX }
            });
            let limit = ram_bytes.min(MMIO_HOLE_START).min(addr_max + 1);
            let size = bytes.len() as u64;
            let too_large =
                || LinuxBootError::InitrdTooLarge { path: path.clone(), size, kernel_end: loaded.kernel_end, limit };
            let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
            if addr < loaded.kernel_end {
                return Err(too_large());
            }
            write(mem, "the initramfs", &bytes, addr)?;
            Some((u32::try_from(addr).map_err(|_| too_large())?, u32::try_from(size).map_err(|_| too_large())?))
        }
    };
    mptable::setup_mptable(mem, vcpus)?;
    let params = build_boot_params(&BootParamsInput {
        header: loaded.setup_header,
        cmdline_len: u32::try_from(len).unwrap_or(0),
        initrd,
        ram_bytes,
    });
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| LinuxBootError::Memory { what: "the zero page", err: e.to_string() })?;
    Ok(LinuxEntry { rip, boot_params_addr: ZERO_PAGE_ADDR })
}

/// Writes the GDT and identity page tables (first 4 GiB) and fills `sregs` for 64-bit entry at CPL0.
pub fn configure_long_mode<M: GuestMemoryBackend>(mem: &M, sregs: &mut kvm_sregs) -> Result<(), LinuxBootError> {
    let gdt: [u64; 5] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0080_8b00_0000_ffff];
    for (i, e) in gdt.iter().enumerate() {
        write(mem, "the GDT", &e.to_le_bytes(), GDT_ADDR + 8 * i as u64)?;
    }
    write(mem, "the page tables", &(PDPT_ADDR | 0x3).to_le_bytes(), PML4_ADDR)?;
    for g in 0..4u64 {
        let pd = PD_ADDR + g * 0x1000;
        write(mem, "the page tables", &(pd | 0x3).to_le_bytes(), PDPT_ADDR + 8 * g)?;
        let mut table = Vec::with_capacity(4096);
        for e in 0..512u64 {
            table.extend_from_slice(&((g << 30) | (e << 21) | 0x83).to_le_bytes());
        }
        write(mem, "the page tables", &table, pd)?;
    }
    sregs.cs = flat_segment(BOOT_CS, 0xb, true, 0);
    let data = flat_segment(BOOT_DS, 0x3, false, 0);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment { selector: BOOT_TSS, limit: 0xffff, type_: 0xb, present: 1, ..Default::default() };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = u16::try_from(gdt.len() * 8 - 1).unwrap_or(0);
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x8000_0011; // PG | ET | PE
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = 0x20; // PAE
    sregs.efer = 0x500; // LME | LMA
    Ok(())
}

/// Registers at the 64-bit entry: `rip`, `rsi` = zero page, a boot stack, interrupts off.
pub fn boot_regs(entry: &LinuxEntry) -> kvm_regs {
    kvm_regs {
        rip: entry.rip,
        rsi: entry.boot_params_addr,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{ByteValued, GuestMemoryMmap};

    fn mem(bytes: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), bytes)]).expect("guest memory")
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(a)
    }

    #[test]
    fn zero_page_fields_sit_at_the_documented_offsets() {
        let p = build_boot_params(&BootParamsInput {
            header: None,
            cmdline_len: 20,
            initrd: Some((0x0700_0000, 0x1234)),
            ram_bytes: 512 << 20,
        });
        let b = p.as_slice();
        assert_eq!(b.len(), 4096, "the zero page is one page");
        assert_eq!(b[0x1e8], 3, "e820_entries");
        assert_eq!(u16_at(b, 0x1fe), 0xaa55, "boot_flag");
        assert_eq!(u32_at(b, 0x202), 0x5372_6448, "HdrS");
        assert_eq!(b[0x210], 0xff, "type_of_loader");
        assert_eq!(b[0x211] & 0x81, 0x81, "loadflags LOADED_HIGH | CAN_USE_HEAP");
        assert_eq!(u32_at(b, 0x218), 0x0700_0000, "ramdisk_image");
        assert_eq!(u32_at(b, 0x21c), 0x1234, "ramdisk_size");
        assert_eq!(u32_at(b, 0x228), 0x2_0000, "cmd_line_ptr");
        assert_eq!(u32_at(b, 0x238), 21, "cmdline_size includes the NUL");
        // e820_table at 0x2d0, 20 bytes per entry
        assert_eq!((u64_at(b, 0x2d0), u64_at(b, 0x2d8), u32_at(b, 0x2e0)), (0, 0x9fc00, 1));
        assert_eq!((u64_at(b, 0x2e4), u64_at(b, 0x2ec), u32_at(b, 0x2f4)), (0x9fc00, 0x60400, 2));
        assert_eq!((u64_at(b, 0x2f8), u64_at(b, 0x300), u32_at(b, 0x308)), (0x10_0000, (512 << 20) - 0x10_0000, 1));
    }

    #[test]
    fn e820_maps_leave_the_hole_and_do_not_overlap() {
        for (ram, want_high) in [(512u64 << 20, None), (3 << 30, None), (6 << 30, Some((4u64 << 30, 3u64 << 30)))] {
            let map = e820_map(ram);
            for w in map.windows(2) {
                assert!(w[0].addr + w[0].size <= w[1].addr, "{ram}: overlap {w:?}");
            }
            assert!(map.iter().all(|e| e.addr + e.size <= 3 << 30 || e.addr >= 4 << 30), "{ram}: MMIO hole used");
            let ram_total: u64 = map.iter().filter(|e| e.kind == 1).map(|e| e.size).sum();
            assert_eq!(ram_total, ram - (0x10_0000 - 0x9_fc00), "{ram}: all RAM but the reserved low area");
            assert_eq!(map.get(3).map(|e| (e.addr, e.size)), want_high, "{ram}");
        }
    }

    /// A minimal x86-64 ELF executable with one PT_LOAD segment of `code` at 0x100000.
    fn tiny_vmlinux(code: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // 64-bit
        e[5] = 1; // little endian
        e[6] = 1; // version
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        e[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        e[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = 64;
        e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        e[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R X
        e[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // offset
        e[ph + 16..ph + 24].copy_from_slice(&0x10_0000u64.to_le_bytes()); // vaddr
        e[ph + 24..ph + 32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // paddr
        e[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes()); // filesz
        e[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes()); // memsz
        e[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes()); // align
        e.extend_from_slice(code);
        e
    }

    #[test]
    fn load_places_kernel_cmdline_initrd_and_zero_page() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, tiny_vmlinux(&[0xf4; 64])).expect("write kernel");
        let initrd = dir.path().join("initrd");
        let initrd_bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&initrd, &initrd_bytes).expect("write initrd");
        let m = mem(64 << 20);
        let guest = LinuxGuest { kernel, initrd: Some(initrd), cmdline: "console=ttyS0 panic=1".into() };
        let entry = load(&m, 64 << 20, &guest, 2).expect("load");
        assert_eq!(entry, LinuxEntry { rip: 0x10_0000, boot_params_addr: 0x7000 });
        let mut code = [0u8; 4];
        m.read_slice(&mut code, GuestAddress(0x10_0000)).expect("read");
        assert_eq!(code, [0xf4; 4]);
        let mut cmd = vec![0u8; 22];
        m.read_slice(&mut cmd, GuestAddress(CMDLINE_ADDR)).expect("read");
        assert_eq!(&cmd, b"console=ttyS0 panic=1\0");
        let params: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_ADDR)).expect("read");
        let b = params.as_slice();
        assert_eq!(u32_at(b, 0x228), 0x2_0000);
        let (addr, size) = (u32_at(b, 0x218), u32_at(b, 0x21c));
        assert_eq!(size as usize, initrd_bytes.len());
        assert_eq!(addr % 4096, 0, "initramfs page-aligned");
        let mut back = vec![0u8; initrd_bytes.len()];
        m.read_slice(&mut back, GuestAddress(u64::from(addr))).expect("read");
        assert_eq!(back, initrd_bytes, "initramfs copied byte for byte");
        let mut mp = [0u8; 4];
        m.read_slice(&mut mp, GuestAddress(0x9fc00)).expect("read");
        assert_eq!(&mp, b"_MP_");
    }

    #[test]
    fn bad_kernels_and_cmdlines_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = mem(64 << 20);
        let missing = LinuxGuest { kernel: dir.path().join("nope"), initrd: None, cmdline: String::new() };
        let err = load(&m, 64 << 20, &missing, 1).expect_err("missing");
        assert!(err.to_string().starts_with("cannot open kernel image"), "{err}");
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![0x5au8; 8192]).expect("write");
        let err = load(&m, 64 << 20, &LinuxGuest { kernel: junk, initrd: None, cmdline: String::new() }, 1)
            .expect_err("junk");
        assert!(err.to_string().contains("is neither an ELF vmlinux nor a bzImage"), "{err}");
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, tiny_vmlinux(&[0xf4; 16])).expect("write");
        let long = LinuxGuest { kernel, initrd: None, cmdline: "x".repeat(5000) };
        let err = load(&m, 64 << 20, &long, 1).expect_err("long cmdline");
        assert!(
            err.to_string().contains("command line is 5000 bytes, longer than the kernel's limit of 2048"),
            "{err}"
        );
    }

    #[test]
    fn long_mode_tables_and_segments() {
        let m = mem(64 << 20);
        let mut sregs = kvm_sregs::default();
        configure_long_mode(&m, &mut sregs).expect("configure");
        let pml4: u64 = m.read_obj(GuestAddress(PML4_ADDR)).expect("read");
        assert_eq!(pml4, PDPT_ADDR | 3, "present | writable");
        let pde: u64 = m.read_obj(GuestAddress(PD_ADDR + 8 * 5)).expect("read");
        assert_eq!(pde, (5 << 21) | 0x83, "2 MiB page, PS bit");
        let last: u64 = m.read_obj(GuestAddress(PD_ADDR + 3 * 0x1000 + 8 * 511)).expect("read");
        assert_eq!(last & !0xfff, (3 << 30) | (511 << 21), "the fourth GiB is mapped");
        assert_eq!(sregs.cr3, PML4_ADDR);
        assert_eq!(sregs.efer & 0x500, 0x500);
        assert_eq!((sregs.cs.selector, sregs.cs.l, sregs.ds.selector), (0x10, 1, 0x18));
        let code: u64 = m.read_obj(GuestAddress(GDT_ADDR + 0x10)).expect("read");
        assert_eq!((code >> 53) & 1, 1, "GDT entry 0x10 is a 64-bit code segment");
    }

    /// Debian's stock kernel (fetched by scripts/setup-host) through the bzImage path.
    #[test]
    fn debian_bzimage_loads_with_its_own_setup_header() {
        let Some(path) = std::env::var_os("CPRD_TEST_KERNEL").map(PathBuf::from).filter(|p| p.exists()) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CPRD_TEST_KERNEL must point at a kernel in CI (scripts/setup-host fetches it)"
            );
            eprintln!("skipped: CPRD_TEST_KERNEL is not set (run scripts/setup-host)");
            return;
        };
        let m = mem(256 << 20);
        let image = std::fs::read(&path).expect("read kernel");
        let guest = LinuxGuest { kernel: path, initrd: None, cmdline: "console=ttyS0".into() };
        let entry = load(&m, 256 << 20, &guest, 4).expect("a stock bzImage loads");
        assert_eq!(entry.rip, 0x10_0200, "64-bit entry is 0x200 into the protected-mode kernel");
        let params: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_ADDR)).expect("read");
        let b = params.as_slice();
        assert_eq!(u32_at(b, 0x202), 0x5372_6448, "the kernel's own HdrS header");
        assert!(u16_at(b, 0x206) >= 0x020c, "boot protocol 2.12+ (64-bit entry)");
        assert_eq!(b[0x210], 0xff);
        assert_eq!(u32_at(b, 0x238), u32_at(&image, 0x238), "the kernel's own cmdline_size is kept");
        assert_eq!(u32_at(b, 0x230), u32_at(&image, 0x230), "kernel_alignment from the image");
    }
}
