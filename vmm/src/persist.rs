//! Saving and restoring KVM state for a handoff: per vCPU and per VM, in QEMU's restore order.
//!
//! `save_*` only reads; nothing here changes the old side's state, so an aborted handoff can
//! simply resume it. `restore_*` is only ever called in a new process, before its first run.

use kvm_bindings::{
    KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_VCPU_TSC_CTRL,
    KVM_VCPU_TSC_OFFSET, Msrs, kvm_device_attr, kvm_fpu, kvm_irqchip, kvm_msr_entry,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use cpr_proto::state::{FpuState, VcpuState, VmState};

use crate::error::{Result, VmmError, kvm};

mod nr {
    #![allow(missing_docs)]
    use kvm_bindings::kvm_device_attr;
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, kvm_bindings::KVMIO, 0xe1, kvm_device_attr);
    vmm_sys_util::ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, kvm_bindings::KVMIO, 0xe2, kvm_device_attr);
    vmm_sys_util::ioctl_iow_nr!(KVM_HAS_DEVICE_ATTR, kvm_bindings::KVMIO, 0xe3, kvm_device_attr);
}
use nr::{KVM_GET_DEVICE_ATTR, KVM_HAS_DEVICE_ATTR, KVM_SET_DEVICE_ATTR};

/// A vCPU device-attribute ioctl (kvm-ioctls offers these on x86 only for VM devices).
fn vcpu_attr_ioctl(
    vcpu: &VcpuFd,
    request: libc::c_ulong,
    attr: &kvm_device_attr,
) -> std::result::Result<(), kvm_ioctls::Error> {
    // SAFETY: the three KVM_*_DEVICE_ATTR ioctls read `attr` and at most read or write one u64
    // at `attr.addr`, which the callers point at a live local.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vcpu, request, attr) };
    if rc == 0 { Ok(()) } else { Err(kvm_ioctls::Error::last()) }
}

/// What the host's KVM offers, probed once per process.
#[derive(Debug, Clone)]
pub struct HostCaps {
    /// `KVM_GET_XSAVE` works.
    pub xsave: bool,
    /// `KVM_GET_XCRS` works.
    pub xcrs: bool,
    /// `KVM_VCPU_TSC_OFFSET` can be read and written.
    pub tsc_offset: bool,
    /// MSRs of the index list that this vCPU can read.
    pub msrs: Vec<u32>,
    /// `KVM_CAP_SYNC_REGS` covers regs, sregs and events: they travel through `kvm_run` at the
    /// pause's last exit and at the first entry, saving three vCPU ioctls on each side (each
    /// costs several microseconds on `kvm_pvm`).
    pub sync_regs: bool,
}

/// The `kvm_run` sync-register fields used for handoffs.
pub const SYNC_REGS_ALL: u64 =
    (kvm_bindings::KVM_SYNC_X86_REGS | kvm_bindings::KVM_SYNC_X86_SREGS | kvm_bindings::KVM_SYNC_X86_EVENTS) as u64;

fn tsc_attr(value: &mut u64) -> kvm_device_attr {
    kvm_device_attr {
        flags: 0,
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        addr: std::ptr::from_mut(value) as u64,
    }
}

/// Probes the host's capabilities with a vCPU of the VM.
pub fn probe(kvm_handle: &Kvm, vcpu: &VcpuFd) -> Result<HostCaps> {
    let xsave = kvm_handle.check_extension(kvm_ioctls::Cap::Xsave) && vcpu.get_xsave().is_ok();
    let xcrs = kvm_handle.check_extension(kvm_ioctls::Cap::Xcrs) && vcpu.get_xcrs().is_ok();
    let mut probe_value = 0u64;
    let tsc_offset = vcpu_attr_ioctl(vcpu, KVM_HAS_DEVICE_ATTR(), &tsc_attr(&mut probe_value)).is_ok();
    let list = kvm_handle.get_msr_index_list().map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut msrs = Vec::new();
    for &index in list.as_slice() {
        let mut one = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }])
            .map_err(|e| VmmError::Internal(format!("MSR buffer: {e:?}")))?;
        if matches!(vcpu.get_msrs(&mut one), Ok(1)) {
            msrs.push(index);
        }
    }
    let sync = u64::try_from(kvm_handle.check_extension_int(kvm_ioctls::Cap::SyncRegs)).unwrap_or(0);
    let sync_regs = sync & SYNC_REGS_ALL == SYNC_REGS_ALL;
    Ok(HostCaps { xsave, xcrs, tsc_offset, msrs, sync_regs })
}

fn get_tsc_offset(vcpu: &VcpuFd) -> Result<u64> {
    let mut value = 0u64;
    vcpu_attr_ioctl(vcpu, KVM_GET_DEVICE_ATTR(), &tsc_attr(&mut value))
        .map_err(kvm("KVM_GET_DEVICE_ATTR(TSC_OFFSET)"))?;
    Ok(value)
}

fn fpu_to_state(f: &kvm_fpu) -> FpuState {
    FpuState {
        fpr: f.fpr.to_vec(),
        fcw: f.fcw,
        fsw: f.fsw,
        ftwx: f.ftwx,
        last_opcode: f.last_opcode,
        last_ip: f.last_ip,
        last_dp: f.last_dp,
        xmm: f.xmm.to_vec(),
        mxcsr: f.mxcsr,
    }
}

fn state_to_fpu(s: &FpuState) -> Result<kvm_fpu> {
    let mut f = kvm_fpu {
        fcw: s.fcw,
        fsw: s.fsw,
        ftwx: s.ftwx,
        last_opcode: s.last_opcode,
        last_ip: s.last_ip,
        last_dp: s.last_dp,
        mxcsr: s.mxcsr,
        ..Default::default()
    };
    if s.fpr.len() != f.fpr.len() || s.xmm.len() != f.xmm.len() {
        return Err(VmmError::StateRejected("FPU state has the wrong number of registers".into()));
    }
    f.fpr.copy_from_slice(&s.fpr);
    f.xmm.copy_from_slice(&s.xmm);
    Ok(f)
}

/// Reads the MSRs in `indices`, skipping any the kernel refuses (GET_MSRS stops at the first).
fn get_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut start = 0;
    while start < indices.len() {
        let entries: Vec<kvm_msr_entry> =
            indices[start..].iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| VmmError::Internal(format!("MSR buffer: {e:?}")))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        start += n + 1;
    }
    Ok(out)
}

/// Writes MSRs, skipping entries the kernel refuses; returns the indices that were skipped.
fn set_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<Vec<u32>> {
    let mut skipped = Vec::new();
    let mut start = 0;
    while start < entries.len() {
        let msrs =
            Msrs::from_entries(&entries[start..]).map_err(|e| VmmError::Restore(format!("MSR buffer: {e:?}")))?;
        let n = vcpu.set_msrs(&msrs).map_err(|e| VmmError::Restore(format!("KVM_SET_MSRS: {e}")))?;
        if start + n < entries.len() {
            skipped.push(entries[start + n].index);
        }
        start += n + 1;
    }
    Ok(skipped)
}

/// Saves one vCPU. The vCPU must be stopped with no I/O pending; with `caps.sync_regs`, its last
/// `KVM_RUN` must have had the sync-register fields requested (the pause path does that).
pub fn save_vcpu(vcpu: &VcpuFd, index: u8, caps: &HostCaps) -> Result<VcpuState> {
    let (regs, sregs, events) = if caps.sync_regs {
        let s = vcpu.sync_regs();
        (s.regs, s.sregs, s.events)
    } else {
        (
            vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        )
    };
    let (xsave, fpu) = if caps.xsave {
        (Some(vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?), None)
    } else {
        (None, Some(fpu_to_state(&vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?)))
    };
    Ok(VcpuState {
        index,
        regs,
        sregs,
        xsave,
        fpu,
        xcrs: if caps.xcrs { Some(vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?) } else { None },
        msrs: get_msrs(vcpu, &caps.msrs)?,
        lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
        mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
        events,
        debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
        tsc_offset: if caps.tsc_offset { Some(get_tsc_offset(vcpu)?) } else { None },
    })
}

fn restore_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Restore(format!("{what}: {e}"))
}

/// The local APIC timer's deadline in TSC-deadline mode.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Restores one vCPU, in QEMU's order with the TSC offset last. Returns MSRs the host refused.
/// With `caps.sync_regs`, regs, sregs and events are written to `kvm_run` and applied by KVM at
/// the vCPU's first `KVM_RUN`.
///
/// `holds`, where known, is what the vCPU holds now: the state the new side's warm-up wrote to
/// it, before it ever ran. Parts equal to it are not written again (the XCRs, the MP state, the
/// debug registers, a TSC deadline of 0): a write of the value KVM already holds changes
/// nothing, and each vCPU ioctl costs 5–8 µs on `kvm_pvm`. The FPU, the MSRs, the LAPIC and the
/// TSC offset are always written.
pub fn restore_vcpu(vcpu: &mut VcpuFd, s: &VcpuState, caps: &HostCaps, holds: Option<&VcpuState>) -> Result<Vec<u32>> {
    if caps.sync_regs {
        let sync = vcpu.sync_regs_mut();
        sync.regs = s.regs;
        sync.sregs = s.sregs;
        sync.events = s.events;
        vcpu.get_kvm_run().kvm_dirty_regs |= SYNC_REGS_ALL;
    } else {
        vcpu.set_sregs(&s.sregs).map_err(restore_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&s.regs).map_err(restore_err("KVM_SET_REGS"))?;
    }
    match (&s.xsave, &s.fpu) {
        (Some(xsave), _) if caps.xsave => {
            // SAFETY: `xsave` is a complete `kvm_xsave` of the legacy 4 KiB size, which is what
            // KVM_SET_XSAVE reads; it was produced by KVM_GET_XSAVE on a host of this kind.
            unsafe { vcpu.set_xsave(xsave) }.map_err(restore_err("KVM_SET_XSAVE"))?;
        }
        (_, Some(fpu)) => vcpu.set_fpu(&state_to_fpu(fpu)?).map_err(restore_err("KVM_SET_FPU"))?,
        _ => {
            return Err(VmmError::StateRejected("vCPU state has no FPU state this host can load".into()));
        }
    }
    if let (Some(xcrs), true) = (&s.xcrs, caps.xcrs)
        && holds.and_then(|h| h.xcrs.as_ref()) != Some(xcrs)
    {
        vcpu.set_xcrs(xcrs).map_err(restore_err("KVM_SET_XCRS"))?;
    }
    // The TSC-deadline MSR is written last (see below); every other MSR now.
    let (deadline, others): (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) =
        s.msrs.iter().partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    let mut skipped = set_msrs(vcpu, &others)?;
    if holds.map(|h| h.mp_state) != Some(s.mp_state) {
        vcpu.set_mp_state(s.mp_state).map_err(restore_err("KVM_SET_MP_STATE"))?;
    }
    vcpu.set_lapic(&s.lapic).map_err(restore_err("KVM_SET_LAPIC"))?;
    if !caps.sync_regs {
        vcpu.set_vcpu_events(&s.events).map_err(restore_err("KVM_SET_VCPU_EVENTS"))?;
    }
    if holds.map(|h| h.debugregs) != Some(s.debugregs) {
        vcpu.set_debug_regs(&s.debugregs).map_err(restore_err("KVM_SET_DEBUGREGS"))?;
    }
    if let (Some(mut offset), true) = (s.tsc_offset, caps.tsc_offset) {
        vcpu_attr_ioctl(vcpu, KVM_SET_DEVICE_ATTR(), &tsc_attr(&mut offset))
            .map_err(restore_err("KVM_SET_DEVICE_ATTR(TSC_OFFSET)"))?;
    }
    // An armed TSC deadline (the LAPIC timer in TSC-deadline mode, what Linux uses where CPUID
    // offers it) only holds once the LAPIC is in that mode (KVM_SET_LAPIC switching the timer
    // mode clears the deadline) and is read against the guest's TSC, so it goes after both the
    // LAPIC and the TSC offset, as QEMU does (`kvm_put_tscdeadline_msr`). Written before them, it
    // was lost: the guest's next timer interrupt never came, and an idle Linux guest slept for
    // ever after its second or third handoff.
    // A deadline of 0 is no timer armed; the warm-up's vCPU had none either, and KVM_SET_LAPIC
    // can only have cleared one.
    let unarmed = |state: &VcpuState| state.msrs.iter().all(|m| m.index != MSR_IA32_TSC_DEADLINE || m.data == 0);
    if !(unarmed(s) && holds.is_some_and(unarmed)) {
        skipped.extend(set_msrs(vcpu, &deadline)?);
    }
    Ok(skipped)
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Saves the per-VM state.
pub fn save_vm(vm: &VmFd) -> Result<VmState> {
    Ok(VmState {
        clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
    })
}

/// Restores the per-VM state. kvmclock goes back with `KVM_CLOCK_REALTIME` where the old side
/// recorded a realtime stamp, so KVM adds the time that passed during the handoff.
pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<()> {
    let mut clock = s.clock;
    clock.flags &= KVM_CLOCK_REALTIME;
    if vm.set_clock(&clock).is_err() {
        clock.flags = 0;
        vm.set_clock(&clock).map_err(restore_err("KVM_SET_CLOCK"))?;
    }
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(chip).map_err(restore_err("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&s.pit).map_err(restore_err("KVM_SET_PIT2"))?;
    Ok(())
}
