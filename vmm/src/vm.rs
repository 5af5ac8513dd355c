//! One VM: KVM objects, guest RAM, devices and vCPU threads, and its boot-time set-up.

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_cpuid_entry2, kvm_pit_config};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use cpr_proto::control::TestGuestStatus;
use cpr_proto::state::GuestKind;

use crate::devices::{COM1_IRQ, Devices, IrqLine, lock};
use crate::error::{Result, VmmError, kvm};
use crate::memory::GuestRam;
use crate::persist::{HostCaps, probe};
use crate::vcpu::{Coordinator, install_kick_handler, vcpu_thread};

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = cpr_proto::control::CPR_VMM_MAX_VCPUS;
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Why the VMM process ends.
#[derive(Debug)]
pub enum ExitReason {
    /// `stop` was requested.
    Stopped,
    /// `quit` after a completed handoff.
    HandedOff,
    /// The guest reset itself (i8042 or KVM system event).
    GuestReset,
    /// The test guest's self-check failed with this code.
    GuestSelfCheck(u8),
    /// The guest crashed.
    GuestCrashed(String),
    /// A fatal VMM error (for instance, an incoming handoff that failed).
    Fatal(VmmError),
}

/// A job run by vCPU 0's thread (the switchover on the old side, the restore on the new side),
/// so that the critical path of a handoff has no thread hop for a 1-vCPU guest.
pub type VcpuJob = Box<dyn FnOnce(&VmCore) + Send>;

/// Everything a running VM consists of, shared by its threads.
pub struct VmCore {
    /// The KVM system handle.
    pub kvm: Kvm,
    /// The VM.
    pub vm: VmFd,
    /// Guest RAM.
    pub ram: GuestRam,
    /// The vCPUs, each locked by its thread while it runs.
    pub vcpus: Vec<Mutex<VcpuFd>>,
    /// Host capabilities and the readable MSR list.
    pub caps: HostCaps,
    /// Port-I/O devices.
    pub devices: Devices,
    /// Pause/resume of the vCPU threads.
    pub coord: Coordinator,
    /// The CPUID every vCPU got (before per-vCPU APIC id patching).
    pub base_cpuid: Vec<kvm_cpuid_entry2>,
    /// What kind of guest runs.
    pub guest_kind: GuestKind,
    /// Handoffs this guest has been through.
    pub generation: AtomicU64,
    /// Job for vCPU 0 at its next pause.
    pub switchover: Mutex<Option<VcpuJob>>,
    /// Job for vCPU 0 before its first run.
    pub incoming: Mutex<Option<VcpuJob>>,
    /// A handoff's per-vCPU work, spread over the vCPU threads.
    pub work: crate::percpu::VcpuWork,
    /// Old side: the buffer the state stream is encoded into, written once by the warm-up so
    /// that the switchover's encode finds its pages in place.
    pub stream_buffer: Mutex<Vec<u8>>,
    /// New side, until the restore: what each vCPU holds, as the warm-up wrote it before any
    /// vCPU ran (see `persist::restore_vcpu`).
    pub holds: Mutex<Vec<Option<cpr_proto::state::VcpuState>>>,
    exit_tx: Mutex<Sender<ExitReason>>,
}

impl std::fmt::Debug for VmCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmCore")
            .field("vcpus", &self.vcpus.len())
            .field("memory_bytes", &self.ram.bytes())
            .field("guest_kind", &self.guest_kind)
            .finish_non_exhaustive()
    }
}

/// Checks a vCPU count.
pub fn check_vcpus(vcpus: u32) -> Result<u8> {
    match u8::try_from(vcpus) {
        Ok(n) if (1..=MAX_VCPUS).contains(&n) => Ok(n),
        _ => Err(VmmError::Config(format!("{vcpus} vCPUs requested; cpr-vmm supports 1 to {MAX_VCPUS}"))),
    }
}

/// Opens `/dev/kvm`.
pub fn open_kvm(handed: Option<OwnedFd>) -> Result<Kvm> {
    let Some(fd) = handed else { return Kvm::new().map_err(|e| VmmError::NoKvm(e.to_string())) };
    // SAFETY: `fd` is an open descriptor this process owns; it is checked to be KVM right after.
    let kvm = unsafe { Kvm::from_raw_fd(fd.into_raw_fd()) };
    match kvm.get_api_version() {
        12 => Ok(kvm),
        v => Err(VmmError::NoKvm(format!("the handed KVM descriptor is not /dev/kvm (API version {v})"))),
    }
}

/// CPUID.1:ECX bit 24: the local APIC's TSC-deadline timer mode.
const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Tells the guest of the TSC-deadline timer where KVM emulates it (`KVM_CAP_TSC_DEADLINE_TIMER`).
/// KVM before Linux 6.13 does not report it in `KVM_GET_SUPPORTED_CPUID` although it emulates it
/// (QEMU sets it itself); a guest not told calibrates the LAPIC timer against the PIT instead,
/// which under nested SVM failed in one boot of seven and left the guest with no local timer.
fn advertise_tsc_deadline(table: &mut [kvm_cpuid_entry2], emulated: bool) {
    if let Some(leaf1) = table.iter_mut().find(|e| e.function == 1 && e.index == 0).filter(|_| emulated) {
        leaf1.ecx |= CPUID_1_ECX_TSC_DEADLINE;
    }
}

/// CPUID for vCPU `index`: the base table with its APIC id filled in.
fn cpuid_for(base: &[kvm_cpuid_entry2], index: u8) -> Result<kvm_bindings::CpuId> {
    let mut entries = base.to_vec();
    for e in &mut entries {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(index) << 24);
                e.ecx |= 1 << 31; // hypervisor present
            }
            0xb | 0x1f => e.edx = u32::from(index),
            _ => {}
        }
    }
    kvm_bindings::CpuId::from_entries(&entries).map_err(|e| VmmError::Internal(format!("CPUID table: {e:?}")))
}

/// What a new VM is made of.
#[derive(Debug)]
pub struct VmParts {
    /// Guest RAM.
    pub ram: GuestRam,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// CPUID to use (a handoff passes the old side's); `None`: what KVM supports.
    pub cpuid: Option<Vec<kvm_cpuid_entry2>>,
    /// Where the serial console writes.
    pub serial_out: File,
    /// What kind of guest runs.
    pub guest_kind: GuestKind,
    /// Handoffs so far.
    pub generation: u64,
}

impl VmCore {
    /// Creates the VM: irqchip, PIT, memory slots, vCPUs with CPUID, devices. No vCPU runs yet.
    pub fn create(kvm_handle: Kvm, parts: VmParts, exit_tx: Sender<ExitReason>) -> Result<Arc<Self>> {
        let vm = kvm_handle.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
        vm.set_tss_address(TSS_ADDRESS).map_err(kvm("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() })
            .map_err(kvm("KVM_CREATE_PIT2"))?;
        // SAFETY: `parts.ram` moves into the VmCore with `vm`, and lives as long as it.
        unsafe { crate::memory::register_slots(&vm, &parts.ram) }?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Internal(format!("eventfd: {e}")))?;
        vm.register_irqfd(&irq, COM1_IRQ).map_err(kvm("KVM_IRQFD"))?;

        let base_cpuid = match parts.cpuid {
            Some(c) => c,
            None => {
                let mut table = kvm_handle
                    .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                    .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?
                    .as_slice()
                    .to_vec();
                let tsc_deadline = kvm_handle.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
                advertise_tsc_deadline(&mut table, tsc_deadline);
                table
            }
        };
        let mut vcpus = Vec::with_capacity(usize::from(parts.vcpus));
        for index in 0..parts.vcpus {
            let fd = vm.create_vcpu(u64::from(index)).map_err(kvm("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&cpuid_for(&base_cpuid, index)?).map_err(kvm("KVM_SET_CPUID2"))?;
            vcpus.push(fd);
        }
        let caps = probe(&kvm_handle, &vcpus[0])?;
        let fail_port = match parts.guest_kind {
            GuestKind::Linux => None,
            GuestKind::TestGuest | GuestKind::Elf => Some(cpr_testguest::FAIL_PORT),
        };
        let devices = Devices::new(IrqLine(irq), parts.serial_out, fail_port);
        Ok(Arc::new(Self {
            kvm: kvm_handle,
            vm,
            ram: parts.ram,
            coord: Coordinator::new(parts.vcpus),
            work: crate::percpu::VcpuWork::new(parts.vcpus),
            stream_buffer: Mutex::new(Vec::new()),
            holds: Mutex::new(Vec::new()),
            vcpus: vcpus.into_iter().map(Mutex::new).collect(),
            caps,
            devices,
            base_cpuid,
            guest_kind: parts.guest_kind,
            generation: AtomicU64::new(parts.generation),
            switchover: Mutex::new(None),
            incoming: Mutex::new(None),
            exit_tx: Mutex::new(exit_tx),
        }))
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u8 {
        u8::try_from(self.vcpus.len()).unwrap_or(MAX_VCPUS)
    }

    /// Handoffs this guest has been through.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Ends the VM for `reason`; returns false so vCPU loops can `return core.exit(..)`.
    pub fn exit(&self, reason: ExitReason) -> bool {
        let _ = lock(&self.exit_tx).send(reason);
        false
    }

    /// Reads the test guest's status block (None for other guests or before it initialised).
    pub fn test_guest_status(&self) -> Option<TestGuestStatus> {
        use cpr_testguest::{STATUS_ADDR, status};
        if self.guest_kind != GuestKind::TestGuest || !self.carries_test_guest_magic() {
            return None;
        }
        let mem = self.ram.mem();
        let read = |off: u64| mem.read_obj::<u64>(GuestAddress(STATUS_ADDR + off)).unwrap_or(0);
        Some(TestGuestStatus {
            counter: read(status::COUNTER),
            heartbeats: read(status::SEQ),
            max_gap_ticks: read(status::GAP_SINCE_RESET),
            pattern_sum: read(status::PATTERN_SUM),
            fail: read(status::FAIL),
            sweeps: read(status::SWEEPS),
        })
    }

    /// Why the guest gave up, in words, from the code it wrote to its failure port: the test
    /// guest's meanings for the built-in test guest and for an ELF image of it (its status block
    /// carries the test guest's magic); the raw code for any other guest, whose codes only its
    /// author knows.
    pub fn guest_failure(&self, code: u8) -> String {
        let test_guest = match self.guest_kind {
            GuestKind::TestGuest => true,
            GuestKind::Elf => self.carries_test_guest_magic(),
            GuestKind::Linux => false,
        };
        if test_guest {
            cpr_testguest::FailCode::from_port_value(code).to_string()
        } else {
            let port = cpr_testguest::FAIL_PORT;
            format!("the guest wrote failure code {code} (0x{code:02x}) to port 0x{port:x}")
        }
    }

    /// Whether guest RAM holds the test guest's status block (its magic), which the test guest
    /// writes when it starts.
    fn carries_test_guest_magic(&self) -> bool {
        use cpr_testguest::{STATUS_ADDR, status};
        let magic = self.ram.mem().read_obj::<u64>(GuestAddress(STATUS_ADDR + status::MAGIC)).unwrap_or(0);
        magic == status::MAGIC_VALUE
    }

    /// Resets the test guest's "longest gap since reset" record (for measuring a handoff's gap).
    pub fn reset_test_guest_gap(&self) {
        if self.guest_kind == GuestKind::TestGuest {
            let addr = GuestAddress(cpr_testguest::STATUS_ADDR + cpr_testguest::status::GAP_SINCE_RESET);
            let _ = self.ram.mem().write_obj(0u64, addr);
        }
    }
}

/// Starts one thread per vCPU (parked until the coordinator lets them run).
pub fn spawn_vcpu_threads(core: &Arc<VmCore>) -> Result<()> {
    install_kick_handler();
    // Each thread installs its seccomp filter first, and this waits until all have: attaching a
    // filter (the kernel compiles it) costs tens of microseconds, which must not fall into a
    // handoff's downtime when a new thread gets its first turn on a CPU late.
    let (installed, filters) = std::sync::mpsc::channel::<Result<()>>();
    for index in 0..core.vcpu_count() {
        // Where the host has sync registers, the kick asks KVM to store them (see vcpu.rs).
        let sync_run = core
            .caps
            .sync_regs
            .then(|| lock(&core.vcpus[usize::from(index)]).get_kvm_run() as *mut kvm_bindings::kvm_run);
        let c = Arc::clone(core);
        let installed = installed.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let filtered = crate::seccomp::install(crate::seccomp::ThreadClass::Vcpu);
                let ok = filtered.is_ok();
                let _ = installed.send(filtered);
                if ok {
                    vcpu_thread(&c, index);
                }
            })
            .map_err(|e| VmmError::Internal(format!("cannot start vCPU thread: {e}")))?;
        core.coord.register_thread(handle.as_pthread_t(), sync_run);
    }
    drop(installed);
    for _ in 0..core.vcpu_count() {
        filters.recv().map_err(|_| VmmError::Internal("a vCPU thread ended at its start".into()))??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tsc_deadline_timer_is_advertised_only_where_kvm_emulates_it() {
        let leaf = |function: u32, ecx: u32| kvm_cpuid_entry2 { function, ecx, ..Default::default() };
        let mut table = vec![leaf(0, 0), leaf(1, 0x8000_0001)];
        advertise_tsc_deadline(&mut table, false);
        assert_eq!(table[1].ecx, 0x8000_0001);
        advertise_tsc_deadline(&mut table, true);
        assert_eq!((table[0].ecx, table[1].ecx), (0, 0x8100_0001));
    }
}
