//! Faulting the new side's guest RAM in before it says `Loaded`, so that the guest's first
//! touches after the resume do not fault (issue 3 measured about 1.3 µs per re-touched page
//! otherwise). Only pages the memfd holds are touched: holes stay holes.
//!
//! Two ways, chosen at run time:
//! - `KVM_PRE_FAULT_MEMORY` (Linux >= 6.10, `KVM_CAP_PRE_FAULT_MEMORY`): KVM maps the pages into
//!   the guest's stage-2 tables (EPT or NPT) as well as the host's, so not even a KVM page fault
//!   is left for the guest's first touch. Only a TDP MMU has it, that is hardware-assisted KVM;
//! - `MADV_POPULATE_WRITE` on this process's mapping of the memfd: the host's page tables only,
//!   KVM still maps each page at its first guest access. The fallback: `kvm_pvm` (shadow paging,
//!   the machines these tests run on) does not offer the ioctl, so its path cannot be measured
//!   there.

use kvm_bindings::{KVM_CAP_PRE_FAULT_MEMORY, kvm_pre_fault_memory};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::error::Result;
use crate::vm::VmCore;

mod nr {
    #![allow(missing_docs)]
    use kvm_bindings::kvm_pre_fault_memory;
    vmm_sys_util::ioctl_iowr_nr!(KVM_PRE_FAULT_MEMORY, kvm_bindings::KVMIO, 0xd5, kvm_pre_fault_memory);
}

/// How the new side's RAM was faulted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefaultPath {
    /// `KVM_PRE_FAULT_MEMORY`: host and guest page tables.
    PreFaultMemory,
    /// `MADV_POPULATE_WRITE`: the host's page tables.
    PopulateWrite,
}

impl PrefaultPath {
    /// Its name, as the log and the benchmark print it.
    pub fn name(self) -> &'static str {
        match self {
            Self::PreFaultMemory => "KVM_PRE_FAULT_MEMORY",
            Self::PopulateWrite => "MADV_POPULATE_WRITE",
        }
    }
}

/// Whether this host's KVM says it has `KVM_PRE_FAULT_MEMORY`.
pub fn offered(kvm: &Kvm) -> bool {
    kvm.check_extension_raw(libc::c_ulong::from(KVM_CAP_PRE_FAULT_MEMORY)) > 0
}

/// Maps guest-physical `[gpa, gpa + size)` through `vcpu` with `KVM_PRE_FAULT_MEMORY`, going on
/// where the kernel stopped (it may do part of a range per call).
fn pre_fault_range(vcpu: &VcpuFd, gpa: u64, size: u64) -> std::result::Result<(), kvm_ioctls::Error> {
    let mut range = kvm_pre_fault_memory { gpa, size, ..Default::default() };
    while range.size > 0 {
        // SAFETY: KVM_PRE_FAULT_MEMORY reads and updates the `kvm_pre_fault_memory` it is given,
        // a live local of the right size.
        let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(vcpu, nr::KVM_PRE_FAULT_MEMORY(), &mut range) };
        if rc < 0 {
            let e = kvm_ioctls::Error::last();
            if e.errno() != libc::EINTR && e.errno() != libc::EAGAIN {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Faults `core`'s RAM in, the best way this host has: `KVM_PRE_FAULT_MEMORY` through vCPU 0
/// where KVM offers it and it works, else `MADV_POPULATE_WRITE`. Call before any vCPU runs.
/// Returns the path taken and the bytes faulted in.
pub fn prefault(core: &VmCore) -> Result<(PrefaultPath, u64)> {
    if offered(&core.kvm) {
        let ranges = core.ram.data_guest_ranges()?;
        let vcpu = core.vcpus.first().map(|v| v.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if let Some(vcpu) = vcpu {
            let done = ranges.iter().try_for_each(|(gpa, len)| pre_fault_range(&vcpu, *gpa, *len));
            match done {
                Ok(()) => return Ok((PrefaultPath::PreFaultMemory, ranges.iter().map(|(_, len)| len).sum())),
                // Offered, but not for this VM's MMU: the host's page tables are still worth it.
                Err(e) => {
                    eprintln!("cpr-vmm: KVM_PRE_FAULT_MEMORY failed ({e}); pre-faulting with MADV_POPULATE_WRITE")
                }
            }
        }
    }
    Ok((PrefaultPath::PopulateWrite, core.ram.prefault()?))
}

/// The path this host's KVM takes, tried on a throwaway VM with one vCPU and one page of RAM
/// (for the benchmark, which prints it).
pub fn probe(kvm: &Kvm) -> PrefaultPath {
    let works = || -> Option<()> {
        if !offered(kvm) {
            return None;
        }
        let page = crate::memory::create_memfd(4096).ok()?;
        let ram = crate::memory::GuestRam::from_fd(page, Some(4096)).ok()?;
        let vm = kvm.create_vm().ok()?;
        // SAFETY: `ram` was made before `vm` and is dropped after it.
        unsafe { crate::memory::register_slots(&vm, &ram) }.ok()?;
        let vcpu = vm.create_vcpu(0).ok()?;
        pre_fault_range(&vcpu, 0, 4096).ok()
    };
    if works().is_some() { PrefaultPath::PreFaultMemory } else { PrefaultPath::PopulateWrite }
}
