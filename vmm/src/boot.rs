//! Boot-time set-up of a fresh guest: load its image and put the vCPUs at its entry point.

use std::path::PathBuf;

use cpr_proto::state::GuestKind;

use crate::cpl3;
use crate::devices::lock;
use crate::error::{Result, VmmError, kvm};
use crate::memory::ram_top;
use crate::vm::VmCore;

/// What to boot.
#[derive(Debug, Clone)]
pub enum GuestSpec {
    /// The built-in test guest, with its flags (see `cpr_testguest::FLAG_TOUCH`).
    TestGuest {
        /// Flags passed in `rsi`.
        flags: u64,
    },
    /// A static long-mode ELF run at CPL3.
    Elf {
        /// Path of the image.
        path: PathBuf,
        /// Flags passed in `rsi`.
        flags: u64,
    },
    /// A Linux kernel through the 64-bit boot protocol.
    Linux(crate::linux_boot::LinuxGuest),
}

impl GuestSpec {
    /// The guest kind recorded in the state.
    pub fn kind(&self) -> GuestKind {
        match self {
            Self::TestGuest { .. } => GuestKind::TestGuest,
            Self::Elf { .. } => GuestKind::Elf,
            Self::Linux(_) => GuestKind::Linux,
        }
    }

    /// Reads the guest image up front, so that a missing file is reported before KVM is touched.
    pub fn check(&self) -> Result<()> {
        match self {
            Self::TestGuest { .. } => Ok(()),
            Self::Elf { path, .. } => std::fs::metadata(path)
                .map(|_| ())
                .map_err(|e| VmmError::GuestImage(format!("cannot open guest ELF {}: {e}", path.display()))),
            Self::Linux(l) => {
                for p in std::iter::once(&l.kernel).chain(l.initrd.as_ref()) {
                    std::fs::metadata(p)
                        .map_err(|e| VmmError::GuestImage(format!("cannot open {}: {e}", p.display())))?;
                }
                Ok(())
            }
        }
    }
}

/// Loads the guest and sets every vCPU's registers for its entry.
pub fn load_guest(core: &VmCore, spec: &GuestSpec) -> Result<()> {
    let mem = core.ram.mem();
    let top = ram_top(core.ram.bytes());
    let (image, flags, what) = match spec {
        GuestSpec::TestGuest { flags } => (cpr_testguest::TEST_GUEST_ELF.to_vec(), *flags, "test guest".to_string()),
        GuestSpec::Elf { path, flags } => {
            let bytes = std::fs::read(path)
                .map_err(|e| VmmError::GuestImage(format!("cannot read guest ELF {}: {e}", path.display())))?;
            (bytes, *flags, path.display().to_string())
        }
        GuestSpec::Linux(linux) => return load_linux(core, linux),
    };
    let entry = cpl3::load_elf(mem, &image, &what)?;
    cpl3::write_tables(mem, top)?;
    for (index, vcpu) in core.vcpus.iter().enumerate() {
        let fd = lock(vcpu);
        let index = u8::try_from(index).unwrap_or(0);
        let mut sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        cpl3::configure_sregs(&mut sregs);
        fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&cpl3::entry_regs(entry, top, flags, index)).map_err(kvm("KVM_SET_REGS"))?;
        fd.set_fpu(&cpl3::reset_fpu()).map_err(kvm("KVM_SET_FPU"))?;
        if index > 0 {
            let runnable = kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE };
            fd.set_mp_state(runnable).map_err(kvm("KVM_SET_MP_STATE"))?;
        }
    }
    Ok(())
}

/// Local APIC LVT0 as ExtINT and LVT1 as NMI, as a PC's BIOS leaves them for Linux.
fn set_lint(fd: &kvm_ioctls::VcpuFd) -> Result<()> {
    const LVT0: usize = 0x350;
    const LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (off, mode) in [(LVT0, MODE_EXTINT), (LVT1, MODE_NMI)] {
        let mut b = [0u8; 4];
        for (i, v) in b.iter_mut().enumerate() {
            *v = lapic.regs[off + i].to_ne_bytes()[0];
        }
        let value = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, v) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = i8::from_ne_bytes([*v]);
        }
    }
    fd.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

fn load_linux(core: &VmCore, linux: &crate::linux_boot::LinuxGuest) -> Result<()> {
    let mem = core.ram.mem();
    let entry = crate::linux_boot::load(mem, core.ram.bytes(), linux, core.vcpu_count())
        .map_err(|e| VmmError::GuestImage(e.to_string()))?;
    for (index, vcpu) in core.vcpus.iter().enumerate() {
        let fd = lock(vcpu);
        set_lint(&fd)?;
        if index == 0 {
            let mut sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
            crate::linux_boot::configure_long_mode(mem, &mut sregs).map_err(|e| VmmError::GuestImage(e.to_string()))?;
            fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
            fd.set_regs(&crate::linux_boot::boot_regs(&entry)).map_err(kvm("KVM_SET_REGS"))?;
            fd.set_fpu(&cpl3::reset_fpu()).map_err(kvm("KVM_SET_FPU"))?;
        }
    }
    Ok(())
}
