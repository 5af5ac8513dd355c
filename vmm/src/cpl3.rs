//! Start-up of a static long-mode ELF guest at CPL3 with IOPL=3 (the test guest and
//! `--guest-elf` images).
//!
//! Why CPL3: `/dev/kvm` on the development machines is `kvm_pvm`, which runs user-mode guest
//! code natively but emulates ring-0 code of non-PVM guests. A CPL3 guest with IOPL=3 can still
//! do port I/O (the serial console, the failure port) and `rdtsc`, which is all it needs.
//!
//! Guest-physical layout (below the ELF, which must be linked at or above 2 MiB):
//! ```text
//! 0x1000   GDT: null, code64 DPL3 (0x08), data DPL3 (0x10), 64-bit TSS (0x18)
//! 0x2000   TSS
//! 0x10000  PML4, 0x11000 PDPT, 0x12000.. one page directory per GiB (2 MiB pages, user, writable)
//! 0x1f0000 stack top of vCPU 0 (vCPU n: 0x1f0000 - n * 0x8000)
//! ```
//! Entry registers: `rdi` = one past the top guest-physical RAM address, `rsi` = guest flags,
//! `rdx` = vCPU index; `rflags` = IOPL 3, interrupts off.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Result, VmmError};

const GDT_ADDR: u64 = 0x1000;
const TSS_ADDR: u64 = 0x2000;
const PML4_ADDR: u64 = 0x1_0000;
const PDPT_ADDR: u64 = 0x1_1000;
const PD_ADDR: u64 = 0x1_2000;
/// Page directories fit below 0x52000, so at most 64 GiB is identity-mapped.
const MAX_MAPPED_GIB: u64 = 64;
const STACK_TOP: u64 = 0x1f_0000;
const STACK_PER_VCPU: u64 = 0x8000;
/// Lowest address an ELF segment may use.
pub const MIN_LOAD_ADDR: u64 = 0x20_0000;

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;

const CODE_SELECTOR: u16 = 0x08 | 3;
const DATA_SELECTOR: u16 = 0x10 | 3;
const TSS_SELECTOR: u16 = 0x18;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_IOPL3: u64 = 3 << 12;
const RFLAGS_RESERVED: u64 = 1 << 1;

/// Loads a static ELF into guest memory and returns its entry point.
pub fn load_elf(mem: &GuestMemoryMmap, image: &[u8], what: &str) -> Result<u64> {
    let mut cursor = std::io::Cursor::new(image);
    let loaded = Elf::load(mem, None, &mut cursor, Some(GuestAddress(MIN_LOAD_ADDR)))
        .map_err(|e| VmmError::GuestImage(format!("cannot load guest ELF {what}: {e}")))?;
    Ok(loaded.kernel_load.0)
}

/// TSS limit: the 104-byte TSS, an I/O permission bitmap for ports 0..0x3ff, and its end byte.
const TSS_LIMIT: u64 = 0x68 + 0x400 / 8;

/// Writes the GDT, TSS and identity page tables for RAM up to `ram_top`.
pub fn write_tables(mem: &GuestMemoryMmap, ram_top: u64) -> Result<()> {
    let w = |v: u64, at: u64| {
        mem.write_obj(v, GuestAddress(at))
            .map_err(|e| VmmError::Memory(format!("cannot write boot tables at {at:#x}: {e}")))
    };
    // I/O permission bitmap right after the TSS: ports 0..0x3ff allowed (0 bits), then the
    // terminating 0xff byte. `kvm_pvm` checks it; IOPL alone does not survive its native CPL3 runs.
    mem.write_obj(0x68u16, GuestAddress(TSS_ADDR + 0x66))
        .map_err(|e| VmmError::Memory(format!("cannot write the TSS: {e}")))?;
    mem.write_obj(0xffu8, GuestAddress(TSS_ADDR + TSS_LIMIT))
        .map_err(|e| VmmError::Memory(format!("cannot write the TSS: {e}")))?;
    let tss_low = TSS_LIMIT | ((TSS_ADDR & 0xff_ffff) << 16) | (0x8b << 40) | ((TSS_ADDR >> 24) & 0xff) << 56;
    let gdt = [0u64, 0x00af_fb00_0000_ffff, 0x00cf_f300_0000_ffff, tss_low, TSS_ADDR >> 32];
    for (i, entry) in gdt.iter().enumerate() {
        w(*entry, GDT_ADDR + 8 * i as u64)?;
    }
    let gib = ram_top.div_ceil(1 << 30).clamp(1, MAX_MAPPED_GIB);
    w(PDPT_ADDR | PTE_PRESENT | PTE_WRITE | PTE_USER, PML4_ADDR)?;
    for g in 0..gib {
        let pd = PD_ADDR + g * 0x1000;
        w(pd | PTE_PRESENT | PTE_WRITE | PTE_USER, PDPT_ADDR + 8 * g)?;
        for e in 0..512u64 {
            let page = (g << 30) | (e << 21);
            w(page | PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_HUGE, pd + 8 * e)?;
        }
    }
    Ok(())
}

/// A flat 4 GiB segment: 64-bit code (`code`) or read/write data, at privilege level `dpl`.
pub fn flat_segment(selector: u16, type_: u8, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

/// Fills `sregs` for 64-bit mode at CPL3 with the tables of [`write_tables`].
pub fn configure_sregs(sregs: &mut kvm_sregs) {
    sregs.cs = flat_segment(CODE_SELECTOR, 0xb, true, 3);
    let data = flat_segment(DATA_SELECTOR, 0x3, false, 3);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: u32::try_from(TSS_LIMIT).unwrap_or(0x67),
        selector: TSS_SELECTOR,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 5 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// Entry registers for vCPU `index`.
pub fn entry_regs(entry: u64, ram_top: u64, flags: u64, index: u8) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: STACK_TOP - u64::from(index) * STACK_PER_VCPU,
        rflags: RFLAGS_IOPL3 | RFLAGS_RESERVED,
        rdi: ram_top,
        rsi: flags,
        rdx: u64::from(index),
        ..Default::default()
    }
}

/// The FPU at reset: x87 control word 0x37f, MXCSR 0x1f80.
pub fn reset_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_map_ram_user_writable_with_2mib_pages() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("mem");
        write_tables(&mem, 64 << 20).expect("tables");
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).expect("read");
        assert_eq!(pml4, PDPT_ADDR | 7);
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8 * 3)).expect("read");
        assert_eq!(pde, (3 << 21) | 0x87);
        let code: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 8)).expect("read");
        assert_eq!((code >> 45) & 3, 3, "code segment DPL 3");
        assert_eq!((code >> 53) & 1, 1, "code segment is 64-bit");
    }

    #[test]
    fn test_guest_loads_at_its_link_address() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("mem");
        let entry = load_elf(&mem, cpr_testguest::TEST_GUEST_ELF, "test guest").expect("load");
        assert_eq!(entry, cpr_testguest::TEXT_ADDR);
        let garbage = load_elf(&mem, b"not an elf at all, really not", "garbage").expect_err("garbage");
        assert!(garbage.to_string().contains("cannot load guest ELF garbage"), "{garbage}");
    }
}
