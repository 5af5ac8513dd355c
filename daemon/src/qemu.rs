//! The QEMU backend: QEMU >= 10.0 handed over with cpr-transfer (mechanics in `cpr-qemu`).
//!
//! cprd creates and holds, per VM: the guest-RAM memfd (QEMU maps it through
//! `/proc/self/fd/3`), both ends of the serial console's socket pair (QEMU's end goes to every
//! generation; cprd's end is pumped into the console log that `cprctl console` follows), and
//! the tap devices (one fd each, handed to every generation, so guest connections survive).
//! Each generation gets its own QMP listening socket, bound by cprd before QEMU starts.
//!
//! All of them live in systemd's fd store too (`vm-NAME-mem`, `vm-NAME-qemu-serial`,
//! `vm-NAME-cprd-serial`, `vm-NAME-tapN`), and a re-executing cprd hands them to its new image.
//! A cprd restarted without an fd store takes them from the running QEMU with pidfd_getfd(2),
//! cprd's own console end included: every QEMU generation is handed it at [`CONSOLE_KEEP_FD`]
//! for exactly this purpose and never uses it.

use cpr_spawn::Executable;
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use cpr_handoff::{HandoffRecord, Journal, Phase, VmmRef};
use cpr_qemu::cmdline::{self, DiskSpec, NicSpec, VmSpec};
use cpr_qemu::qmp::Qmp;
use cpr_qemu::transfer::{self, Fault, Transfer};

use crate::backend::{Current, UpgradeError, UpgradeRequest, Upgraded, VmmBackend};
use crate::config::{CprChannelChoice, CprMode, GuestDef, NicDef, VmDef};
use crate::engine::VmRecord;
use crate::error::CprdError;

/// Where each QEMU generation keeps a copy of cprd's end of the console socket pair, unused by
/// QEMU, so that a cprd restarted without systemd's fd store can take it back.
pub const CONSOLE_KEEP_FD: RawFd = 6;

/// Timeout of a QEMU start (TCG guests start slowly on busy hosts).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What cprd holds for one running QEMU VM.
#[derive(Debug)]
struct Held {
    /// The command line the VM started with; every generation gets it unchanged.
    args: Vec<String>,
    memfd: OwnedFd,
    serial_qemu: OwnedFd,
    serial_cprd: OwnedFd,
    taps: Vec<OwnedFd>,
    disks: Vec<OwnedFd>,
    /// A boxed VM's channel directory, removed when the VM is gone.
    chan: Option<PathBuf>,
    /// Kernel and initramfs as opened at the VM's start, at their fixed numbers (none for a VM
    /// started by a cprd that passed them by path).
    boot: Vec<(RawFd, OwnedFd)>,
}

/// Fd-store name of QEMU's end of a VM's console socket pair.
fn qemu_serial_name(vm: &str) -> String {
    format!("vm-{vm}-qemu-serial")
}

/// Fd-store name of cprd's end of a VM's console socket pair.
fn cprd_serial_name(vm: &str) -> String {
    format!("vm-{vm}-cprd-serial")
}

/// Fd-store name of a VM's tap device `i`.
fn tap_name(vm: &str, i: usize) -> String {
    format!("vm-{vm}-tap{i}")
}

/// Fd-store name of a VM's boot file at descriptor `fd` (kernel or initramfs).
fn boot_name(vm: &str, fd: RawFd) -> String {
    if fd == cmdline::KERNEL_FD { format!("vm-{vm}-kernel") } else { format!("vm-{vm}-initrd") }
}

/// The descriptors a command line reads boot files from (kernel first).
fn boot_fds_of(args: &[String]) -> Vec<RawFd> {
    [cmdline::KERNEL_FD, cmdline::INITRD_FD]
        .into_iter()
        .filter(|fd| args.iter().any(|a| *a == format!("/proc/self/fd/{fd}")))
        .collect()
}

/// Fd-store name of a VM's disk image `i`.
fn disk_name(vm: &str, i: usize) -> String {
    format!("vm-{vm}-disk{i}")
}

/// Where a boxed QEMU sees its VM's channel directory: the host path itself under `/run`
/// (cprd's runtime directory there), else the host path below `/run/cprd-vm` (the box hides
/// `/run` and rebuilds the way). Either way it is the host path's own, so the paths in
/// `/proc/net/unix` of two VMs never coincide.
fn channel_dir_inside(host: &Path) -> PathBuf {
    if host.starts_with("/run") {
        host.to_path_buf()
    } else {
        Path::new("/run/cprd-vm").join(host.strip_prefix("/").unwrap_or(host))
    }
}

/// Binds and listens on the cpr channel's socket at `path` (as cprd sees it) for a new QEMU
/// that takes it as a descriptor; the old QEMU connects to it by path, so a boxed one's uid
/// owns it.
fn listen_for_old(path: &Path, uid: Option<u32>) -> Result<std::os::unix::net::UnixListener, String> {
    let listener =
        cpr_qemu::spawn::listen_at(path).map_err(|e| format!("cannot bind the cpr channel {}: {e}", path.display()))?;
    if let Some(uid) = uid {
        nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(uid)), Some(nix::unistd::Gid::from_raw(uid)))
            .map_err(|e| format!("cannot hand the cpr channel {} to uid {uid}: {e}", path.display()))?;
    }
    Ok(listener)
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Where a boxed VM's channel directory is, under cprd's `vms` directory `dir`.
fn channel_dir_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.chan"))
}

/// A boxed VM's channel directory on the host (the main and cpr sockets of its handoffs), made
/// if missing: owned by the VMMs' uid, mode 0700.
fn channel_dir(dir: &Path, name: &str, uid: u32) -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let chan = channel_dir_path(dir, name);
    match std::fs::DirBuilder::new().mode(0o700).create(&chan) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", chan.display())),
    }
    let id = Some(nix::unistd::Uid::from_raw(uid));
    nix::unistd::chown(&chan, id, Some(nix::unistd::Gid::from_raw(uid)))
        .map_err(|e| format!("cannot hand {} to uid {uid}: {e}", chan.display()))?;
    Ok(chan)
}

/// The box of a VM's QEMU: its uid, its channel directory writable, and `/dev/kvm`'s group when
/// it runs on KVM.
fn qemu_box(dir: &Path, name: &str, uid: u32, args: &[String]) -> Result<cpr_spawn::Sandbox, String> {
    let host = channel_dir(dir, name, uid)?;
    let writable = vec![cpr_spawn::Writable { inside: channel_dir_inside(&host), host }];
    let kvm = args.iter().any(|a| a.contains("accel=kvm"));
    Ok(crate::sandbox::vmm_box(uid, writable, kvm))
}

impl Held {
    /// Keeps the console ends and taps in systemd's fd store (and cprd's own list, which a
    /// re-executed image gets), so a restarted cprd takes them back from there.
    fn push_to_store(&self, vm: &str) {
        crate::fdstore::push(&qemu_serial_name(vm), self.serial_qemu.as_fd());
        crate::fdstore::push(&cprd_serial_name(vm), self.serial_cprd.as_fd());
        for (i, tap) in self.taps.iter().enumerate() {
            crate::fdstore::push(&tap_name(vm, i), tap.as_fd());
        }
        for (i, disk) in self.disks.iter().enumerate() {
            crate::fdstore::push(&disk_name(vm, i), disk.as_fd());
        }
        for (n, file) in &self.boot {
            crate::fdstore::push(&boot_name(vm, *n), file.as_fd());
        }
    }

    /// Removes them from the store.
    fn remove_from_store(&self, vm: &str) {
        crate::fdstore::remove(&qemu_serial_name(vm));
        crate::fdstore::remove(&cprd_serial_name(vm));
        for i in 0..self.disks.len() {
            crate::fdstore::remove(&disk_name(vm, i));
        }
        for i in 0..self.taps.len() {
            crate::fdstore::remove(&tap_name(vm, i));
        }
        for (n, _) in &self.boot {
            crate::fdstore::remove(&boot_name(vm, *n));
        }
    }

    /// The descriptors every generation gets, at their fixed numbers (QMP's is added by the caller).
    fn fds(&self) -> Vec<(RawFd, BorrowedFd<'_>)> {
        let mut v = vec![
            (cmdline::MEMORY_FD, self.memfd.as_fd()),
            (cmdline::SERIAL_FD, self.serial_qemu.as_fd()),
            (CONSOLE_KEEP_FD, self.serial_cprd.as_fd()),
        ];
        for (i, tap) in self.taps.iter().enumerate() {
            v.push((cmdline::TAP_FD_BASE + RawFd::try_from(i).unwrap_or(0), tap.as_fd()));
        }
        for (i, disk) in self.disks.iter().enumerate() {
            v.push((cmdline::DISK_FD_BASE + RawFd::try_from(i).unwrap_or(0), disk.as_fd()));
        }
        v.extend(self.boot.iter().map(|(n, file)| (*n, file.as_fd())));
        v
    }
}

/// The QEMU backend.
#[derive(Debug, Default)]
pub struct Qemu {
    held: Mutex<HashMap<String, Held>>,
    /// What the pre-flight found each binary (path, build id and machine) to be.
    probed: Mutex<Vec<(PathBuf, String, cpr_qemu::probe::ProbeReport)>>,
    /// Pairs of builds (and machine, accelerator, CPU) a trial handoff went through.
    trialed: Mutex<Vec<String>>,
}

/// The one QEMU backend of this process.
pub static QEMU: LazyLock<Qemu> = LazyLock::new(Qemu::default);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The QEMU command line inputs of a VM definition.
pub fn spec_of(def: &VmDef, seccomp: bool) -> Result<VmSpec, CprdError> {
    let GuestDef::Linux { kernel, initrd, cmdline } = &def.guest else {
        return Err(CprdError::InvalidArgument(format!("VM {} has backend qemu but no kernel", def.name)));
    };
    Ok(VmSpec {
        name: def.name.clone(),
        machine: def.machine.clone(),
        accel: def.accel.clone(),
        cpu: def.cpu.clone(),
        memory_bytes: def.memory_bytes,
        vcpus: def.vcpus,
        kernel: kernel.clone(),
        initrd: initrd.clone(),
        cmdline: cmdline.clone(),
        nics: def
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| NicSpec {
                model: n.model.clone(),
                mac: n.mac.clone().unwrap_or_else(|| default_mac(&def.name, i)),
            })
            .collect(),
        disks: def
            .disks
            .iter()
            .map(|d| DiskSpec { path: d.path.clone(), format: d.format.clone(), readonly: d.readonly })
            .collect(),
        seccomp,
        cpr_exec: def.cpr_mode == CprMode::CprExec,
    })
}

/// A locally administered MAC derived from the VM name and the card's index (stable across
/// restarts and upgrades).
fn default_mac(name: &str, index: usize) -> String {
    // FNV-1a: stable across Rust releases, unlike std's hasher.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let b = h.to_le_bytes();
    format!(
        "52:54:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0],
        b[1],
        b[2],
        b[3].wrapping_add(u8::try_from(index % 256).unwrap_or(0))
    )
}

/// The descriptors in a QEMU's fd sets, as (opaque, QEMU's fd number), from `query-fdsets`.
fn fdsets(qmp: &mut Qmp) -> Result<Vec<(String, RawFd)>, String> {
    let sets = qmp.execute("query-fdsets", None).map_err(|e| format!("QMP query-fdsets: {e}"))?;
    let mut out = Vec::new();
    for set in sets.as_array().into_iter().flatten() {
        for fd in set["fds"].as_array().into_iter().flatten() {
            if let (Some(o), Some(n)) = (fd["opaque"].as_str(), fd["fd"].as_i64().and_then(|n| RawFd::try_from(n).ok()))
            {
                out.push((o.to_string(), n));
            }
        }
    }
    Ok(out)
}

/// Opens the disk descriptors of a VM in the order [`VmSpec::disk_fds`] lays them out, and locks
/// each image for the VM: exclusively if it is written, shared if read-only (`flock`). QEMU's own
/// image locking is off (`file.locking=off`): its byte-range locks are per open file, and with
/// the read-only and the read-write descriptor of one set both in use across a handoff the new
/// QEMU refused `cont` with 'Failed to get "write" lock', after the commit. cprd's lock sits on
/// the descriptors every generation shares, so it lives as long as the VM, across handoffs and
/// cprd restarts, and a second VM cannot write an image that one VM uses.
fn open_disks(spec: &VmSpec) -> Result<Vec<OwnedFd>, String> {
    let mut fds = Vec::new();
    for (i, rw) in spec.disk_fds() {
        let disk = &spec.disks[i];
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(rw)
            .open(&disk.path)
            .map_err(|e| format!("cannot open disk {}: {e}", disk.path.display()))?;
        if rw || disk.readonly {
            let how = if rw { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
            // SAFETY: flock on a descriptor this function owns; the lock belongs to its open file.
            if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), how) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(format!("disk {} is in use by another VM or process ({e})", disk.path.display()));
            }
        }
        fds.push(OwnedFd::from(file));
    }
    Ok(fds)
}

/// Opens (creating if needed) the tap device of `nic`, inside its network namespace if it
/// names one. The fd keeps the device alive; the namespace switch is confined to a thread.
fn open_tap(nic: &NicDef) -> Result<OwnedFd, String> {
    let nic = nic.clone();
    std::thread::spawn(move || -> Result<OwnedFd, String> {
        if let Some(ns) = &nic.netns {
            let f = std::fs::File::open(ns).map_err(|e| format!("network namespace {}: {e}", ns.display()))?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("cannot enter network namespace {}: {e}", ns.display()))?;
        }
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| format!("/dev/net/tun: {e}"))?;
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        const IFF_TAP: i16 = 0x0002;
        const IFF_NO_PI: i16 = 0x1000;
        let mut ifr = [0u8; 40];
        ifr[..nic.tap.len()].copy_from_slice(nic.tap.as_bytes());
        ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes), which `ifr` is.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
        if rc < 0 {
            return Err(format!("cannot open tap {}: {}", nic.tap, std::io::Error::last_os_error()));
        }
        Ok(OwnedFd::from(tun))
    })
    .join()
    .map_err(|_| "tap thread panicked".to_string())?
}

fn fault_from_env() -> Option<Fault> {
    // Fault injection for tests (named as such): real SIGKILLs of the real new QEMU, aimed at
    // points a test cannot hit from outside.
    match std::env::var("CPRD_FAULT").as_deref() {
        Ok("qemu-kill-new-after-start") => Some(Fault::KillNewAfterStart),
        Ok("qemu-kill-new-after-migrate") => Some(Fault::KillNewAfterMigrate),
        _ => None,
    }
}

/// The main and cpr sockets of the handoff to `generation` in a boxed VM's channel directory
/// `chan` (as the boxes see it, or as cprd does).
fn channel_sockets(chan: &Path, generation: u64) -> (PathBuf, PathBuf) {
    (chan.join(format!("main.{generation}.sock")), chan.join(format!("cpr.{generation}.sock")))
}

fn paths(dir: &Path, name: &str, generation: u64) -> (PathBuf, PathBuf) {
    (dir.join(format!("{name}.{generation}.main.sock")), dir.join(format!("{name}.{generation}.cpr.sock")))
}

impl Qemu {
    #[allow(clippy::too_many_arguments)] // one call per generation; each argument is different
    fn spawn(
        &self,
        held: &Held,
        binary: &Executable,
        qmp: &Path,
        extra: &[String],
        extra_fds: &[(i32, BorrowedFd<'_>)],
        log: &Path,
        sandbox: Option<&cpr_spawn::Sandbox>,
    ) -> Result<Child, String> {
        let listener = cpr_qemu::spawn::listen_at(qmp).map_err(|e| format!("cannot bind {}: {e}", qmp.display()))?;
        let mut fds = held.fds();
        fds.push((cmdline::QMP_FD, listener.as_fd()));
        fds.extend_from_slice(extra_fds);
        let mut args = held.args.clone();
        args.extend_from_slice(extra);
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
        cpr_qemu::spawn::spawn(binary, &args, &fds, Some(stderr), sandbox)
            .map_err(|e| format!("cannot start {}: {e}", binary.path().display()))
    }

    fn probe(&self, binary: &Executable, machine: &str, scratch: &Path, uid: Option<u32>) -> Result<String, CprdError> {
        let key = crate::engine::executable_build_id(binary).unwrap_or_default();
        if let Some((_, _, r)) =
            lock(&self.probed).iter().find(|(b, k, _)| b == binary.path() && *k == format!("{key}/{machine}"))
        {
            return Ok(r.describe());
        }
        let boxed = uid.map(|uid| crate::sandbox::vmm_box(uid, Vec::new(), false));
        let report = cpr_qemu::probe::probe(binary, machine, scratch, Duration::from_secs(20), boxed.as_ref())
            .map_err(|e| CprdError::Incompatible(format!("{e}; nothing was changed")))?;
        let d = report.describe();
        tracing::info!(
            "QEMU {d} at {}: fd-type cpr channel {}, cpr-exec {}",
            binary.path().display(),
            yes_no(report.features.fd_cpr_channel),
            yes_no(report.features.cpr_exec)
        );
        lock(&self.probed).push((binary.path().to_path_buf(), format!("{key}/{machine}"), report));
        Ok(d)
    }

    /// What the pre-flight found `binary` to be, if it probed it.
    fn probed(&self, binary: &Executable) -> Option<cpr_qemu::probe::ProbeReport> {
        let key = crate::engine::executable_build_id(binary).unwrap_or_default();
        lock(&self.probed)
            .iter()
            .find(|(b, k, _)| b == binary.path() && k.starts_with(&format!("{key}/")))
            .map(|(_, _, r)| r.clone())
    }

    /// What the pre-flight found `binary` to be (`11.1.3 (Debian ...)`), if it probed it.
    fn probed_release(&self, binary: &Executable) -> Option<String> {
        self.probed(binary).map(|r| r.describe())
    }

    /// Hands a throw-away VM from the running QEMU's binary to `binary` (`cpr_qemu::trial`), once
    /// per pair of builds, machine and accelerator: two builds of one QEMU need none.
    fn trial(
        &self,
        binary: &Executable,
        version: &str,
        def: &VmDef,
        scratch: &Path,
        current: &Current,
    ) -> Result<(), CprdError> {
        let Ok(old) = Executable::of_process(current.pid) else {
            // The VMM is gone: the upgrade's claim says so.
            return Ok(());
        };
        let ids = (crate::engine::executable_build_id(&old), crate::engine::executable_build_id(binary));
        let (Some(old_id), Some(new_id)) = ids else { return Ok(()) };
        if old_id == new_id {
            return Ok(());
        }
        let vm = cpr_qemu::trial::TrialVm {
            machine: def.machine.clone(),
            accel: def.accel.clone(),
            cpu: spec_of(def, current.uid.is_some())?.cpu_arg(),
        };
        let key = format!("{old_id}/{new_id}/{}/{}/{:?}", vm.machine, vm.accel, vm.cpu);
        if lock(&self.trialed).contains(&key) {
            return Ok(());
        }
        let (meeting, boxed) = match current.uid {
            Some(uid) => {
                let args = lock(&self.held).get(&def.name).map(|h| h.args.clone()).unwrap_or_default();
                let sandbox = qemu_box(scratch, &def.name, uid, &args).map_err(CprdError::Incompatible)?;
                let host = channel_dir_path(scratch, &def.name);
                (cpr_qemu::trial::Meeting { inside: channel_dir_inside(&host), host }, Some(sandbox))
            }
            None => (cpr_qemu::trial::Meeting { host: scratch.to_path_buf(), inside: scratch.to_path_buf() }, None),
        };
        cpr_qemu::trial::trial(&old, binary, &vm, &meeting, scratch, boxed.as_ref(), Duration::from_secs(30)).map_err(
            |why| {
                CprdError::Incompatible(format!(
                    "{} (QEMU {version}) cannot take a guest from the running {} (a trial handoff of an empty {} VM): {why}; \
                     nothing was changed",
                    binary.path().display(),
                    old.path().display(),
                    vm.machine
                ))
            },
        )?;
        lock(&self.trialed).push(key);
        Ok(())
    }

    /// Why the guest of `req` cannot be handed over by `cpr-exec` (`None`: it can). It takes a
    /// definition that asks for it, a QEMU started so (its seccomp filter lets it exec), and
    /// both binaries having it: otherwise what both support, cpr-transfer.
    fn exec_refusal(&self, req: &UpgradeRequest<'_>) -> Option<String> {
        if req.def.cpr_mode != CprMode::CprExec {
            return Some("not asked for".into());
        }
        let started_so = lock(&self.held).get(req.name).is_some_and(|h| cmdline::args_allow_exec(&h.args));
        if !started_so {
            return Some(
                "its QEMU was started with exec denied by its seccomp filter; a restart in this mode lifts it".into(),
            );
        }
        if !self.probed(req.binary).is_some_and(|r| r.features.cpr_exec) {
            return Some(format!("{} has no cpr-exec", req.binary.path().display()));
        }
        let running = Executable::of_process(req.record.main_pid).ok();
        if !running.as_ref().and_then(|r| self.probed(r)).is_some_and(|r| r.features.cpr_exec) {
            return Some("the running QEMU has no cpr-exec".into());
        }
        None
    }

    /// Hands the guest over by `cpr-exec` (see `cpr_qemu::exec`): the running QEMU saves the
    /// device state into the VM's channel directory (boxed) or cprd's runtime directory and
    /// execs the new binary, which cprd passes as the descriptor it checked.
    fn upgrade_by_exec(
        &self,
        req: UpgradeRequest<'_>,
        generation: u64,
        dir: &Path,
        chan: Option<&cpr_spawn::Writable>,
    ) -> Result<Upgraded, UpgradeError> {
        let name = req.name;
        let file = format!("{name}.{generation}.exec.state");
        let (state, state_host) = match chan {
            Some(w) => (w.inside.join(&file), w.host.join(&file)),
            None => (dir.join(&file), dir.join(&file)),
        };
        let mut old = Qmp::connect(&req.record.control, Duration::from_secs(5))
            .map_err(|e| UpgradeError::RolledBack(format!("cannot reach the running QEMU's QMP: {e}")))?;
        let Some(args) = lock(&self.held).get(name).map(|h| h.args.clone()) else {
            return Err(UpgradeError::RolledBack(format!("cprd holds no descriptors for {name}")));
        };
        let result = cpr_qemu::exec::cpr_exec(cpr_qemu::exec::ExecTransfer {
            old: &mut old,
            pid: req.record.main_pid,
            control: &req.record.control,
            binary: req.binary,
            args: &args,
            state: &state,
            timeout: Duration::from_millis(req.timeout_ms),
        });
        let _ = std::fs::remove_file(&state_host);
        match result {
            Ok(report) => {
                tracing::info!(
                    CPRD_VM = name,
                    "cpr-exec of {name}: pid {} kept, STOP->RESUME {:?} us",
                    req.record.main_pid,
                    report.stop_to_resume_us
                );
                Ok(Upgraded {
                    generation,
                    child: None,
                    downtime_usec: report.stop_to_resume_us.unwrap_or(0),
                    version: crate::engine::executable_build_id(req.binary).unwrap_or_default(),
                    release: self.probed_release(req.binary).unwrap_or_default(),
                })
            }
            Err(e @ cpr_qemu::exec::ExecError::RolledBack(_)) => Err(UpgradeError::RolledBack(e.to_string())),
            Err(e @ cpr_qemu::exec::ExecError::Lost(_)) => Err(UpgradeError::Lost(e.to_string())),
            Err(e @ cpr_qemu::exec::ExecError::Unknown(_)) => Err(UpgradeError::NeedsAttention(e.to_string(), None)),
        }
    }

    /// The runtime record of a VM's first QEMU (`pid` filled in once it runs).
    fn record_for(
        def: &VmDef,
        binary: &Executable,
        control: PathBuf,
        launch_args: Vec<String>,
        dir: &Path,
    ) -> VmRecord {
        VmRecord {
            format: crate::engine::RECORD_FORMAT,
            generation: 0,
            main_pid: 0,
            control,
            vmm_binary: binary.path().to_path_buf(),
            vmm_version: crate::engine::executable_build_id(binary).unwrap_or_default(),
            last_downtime_usec: 0,
            console: def.console_log.clone().unwrap_or_else(|| dir.join(format!("{}.console", def.name))),
            launch_args,
            vmm_uid: None,
            vmm_release: String::new(),
            paused: false,
            upgrade_on_resume: false,
        }
    }
}

impl VmmBackend for Qemu {
    fn preflight(&self, binary: &Executable, def: &VmDef, scratch: &Path, current: &Current) -> Result<(), CprdError> {
        let version = self.probe(binary, &def.machine, scratch, current.uid)?;
        if def.cpr_mode == CprMode::CprExec
            && let Ok(running) = Executable::of_process(current.pid)
        {
            // cpr-exec needs it on both sides: the running binary is asked as well (once per
            // build). One that cannot be asked only means cpr-transfer.
            if let Err(e) = self.probe(&running, &def.machine, scratch, current.uid) {
                tracing::warn!(CPRD_VM = def.name, "cannot ask the running QEMU what it supports: {e}");
            }
        }
        self.trial(binary, &version, def, scratch, current)
    }

    fn start(
        &self,
        def: &VmDef,
        binary: &Executable,
        dir: &Path,
        uid: Option<u32>,
    ) -> Result<(VmRecord, OwnedFd, Child), CprdError> {
        let start_failed = |m: String| CprdError::StartFailed(format!("{}: {m}", def.name));
        let spec = spec_of(def, uid.is_some())?;
        let version = self.probe(binary, &def.machine, dir, uid)?;
        let memfd = cpr_proto::memory::create_memfd(def.memory_bytes)
            .map_err(|e| start_failed(format!("cannot create guest RAM: {e}")))?;
        let (serial_qemu, serial_cprd) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| start_failed(format!("cannot create the console socket pair: {e}")))?;
        let taps = def.nics.iter().map(open_tap).collect::<Result<Vec<_>, _>>().map_err(start_failed)?;
        let disks = open_disks(&spec).map_err(start_failed)?;
        let chan = uid.map(|_| channel_dir_path(dir, &def.name));
        let open = |p: &Path| {
            std::fs::File::open(p)
                .map(OwnedFd::from)
                .map_err(|e| start_failed(format!("cannot open {}: {e}", p.display())))
        };
        let mut boot = vec![(cmdline::KERNEL_FD, open(&spec.kernel)?)];
        if let Some(initrd) = &spec.initrd {
            boot.push((cmdline::INITRD_FD, open(initrd)?));
        }
        let held = Held { args: spec.args(), memfd, serial_qemu, serial_cprd, taps, disks, chan, boot };
        let control = dir.join(format!("{}.0.sock", def.name));
        let log = dir.join(format!("{}.log", def.name));
        let boxed = uid.map(|u| qemu_box(dir, &def.name, u, &held.args)).transpose().map_err(start_failed)?;
        let record = VmRecord {
            vmm_uid: uid,
            vmm_release: version.clone(),
            paused: false,
            ..Self::record_for(def, binary, control.clone(), held.args.clone(), dir)
        };
        crate::console::pump(&def.name, &held.serial_cprd, &record.console);
        let mut child = self.spawn(&held, binary, &control, &[], &[], &log, boxed.as_ref()).map_err(start_failed)?;
        let ready = Qmp::connect(&control, START_TIMEOUT)
            .map_err(|e| e.to_string())
            .and_then(|mut q| q.status().map_err(|e| e.to_string()));
        match ready {
            Ok(s) if s == "running" => {}
            other => {
                let _ = child.kill();
                let _ = child.wait();
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let last = tail.lines().last().unwrap_or("").to_string();
                return Err(start_failed(format!("QEMU did not come up running ({other:?}): {last}")));
            }
        }
        tracing::info!(CPRD_VM = def.name, "QEMU {version} runs {} (pid {})", def.name, child.id());
        let memfd = held.memfd.try_clone().map_err(|e| start_failed(e.to_string()))?;
        held.push_to_store(&def.name);
        lock(&self.held).insert(def.name.clone(), held);
        let record = VmRecord { main_pid: child.id(), ..record };
        Ok((record, memfd, child))
    }

    fn upgrade(&self, req: UpgradeRequest<'_>) -> Result<Upgraded, UpgradeError> {
        let name = req.name.to_string();
        let generation = req.record.generation + 1;
        let dir = req.new_control.parent().map(Path::to_path_buf).unwrap_or_default();
        // A boxed QEMU pair meets in the VM's channel directory, at the path both boxes see it.
        let boxed = match req.uid {
            Some(uid) => {
                let held = lock(&self.held);
                let args = held.get(&name).map(|h| h.args.clone()).unwrap_or_default();
                Some(qemu_box(&dir, &name, uid, &args).map_err(UpgradeError::RolledBack)?)
            }
            None => None,
        };
        let chan = boxed.as_ref().and_then(|b| b.writable.first());
        match self.exec_refusal(&req) {
            None => return self.upgrade_by_exec(req, generation, &dir, chan),
            Some(why) if req.def.cpr_mode == CprMode::CprExec => {
                tracing::warn!(CPRD_VM = name, "cpr-exec of {name} is not possible ({why}): cpr-transfer instead");
            }
            Some(_) => {}
        }
        let (main, cpr) = match chan {
            Some(w) => channel_sockets(&w.inside, generation),
            None => paths(&dir, &name, generation),
        };
        // The sockets as cprd sees them (a boxed pair's are in the channel directory).
        let (main_host, cpr_host) = match chan {
            Some(w) => channel_sockets(&w.host, generation),
            None => (main.clone(), cpr.clone()),
        };
        let mut old = Qmp::connect(&req.record.control, Duration::from_secs(5))
            .map_err(|e| UpgradeError::RolledBack(format!("cannot reach the old QEMU's QMP: {e}")))?;
        // An fd-type cpr channel where the new QEMU takes one (its pre-flight tried it), and
        // the VM's definition does not ask for a path.
        let fd_channel = req.def.cpr_channel == CprChannelChoice::Auto
            && self.probed(req.binary).is_some_and(|r| r.features.fd_cpr_channel);
        let cpr_listener =
            if fd_channel { Some(listen_for_old(&cpr_host, req.uid).map_err(UpgradeError::RolledBack)?) } else { None };
        let mut child = {
            let held = lock(&self.held);
            let Some(h) = held.get(&name) else {
                return Err(UpgradeError::RolledBack(format!("cprd holds no descriptors for {name}")));
            };
            let channel = if fd_channel { cmdline::CprChannel::Fd } else { cmdline::CprChannel::Path(&cpr) };
            let incoming = cmdline::incoming_args(&main, channel);
            let extra: Vec<(i32, BorrowedFd<'_>)> =
                cpr_listener.iter().map(|l| (cmdline::CPR_CHANNEL_FD, l.as_fd())).collect();
            self.spawn(h, req.binary, &req.new_control, &incoming, &extra, &req.log, boxed.as_ref())
                .map_err(UpgradeError::RolledBack)?
        };
        // Only the new QEMU holds the listener now: should it die, the old QEMU's connection
        // is refused instead of waiting in a backlog nobody accepts from.
        drop(cpr_listener);
        // Its start-up is the handoff's work (cprd puts it back at a VM's share afterwards).
        crate::sched::set_session_nice(child.id(), crate::sched::HANDOFF_NICE);
        let _ = req.on_spawn.send(child.id());
        let record = HandoffRecord {
            vm: name.clone(),
            phase: Phase::Starting,
            from_generation: req.record.generation,
            old: VmmRef { pid: req.record.main_pid, control: req.record.control.clone() },
            new: VmmRef { pid: child.id(), control: req.new_control.clone() },
            binary: req.binary.path().to_path_buf(),
        };
        let result = transfer::transfer(
            Transfer {
                old: &mut old,
                new_child: &mut child,
                new_qmp: &req.new_control,
                main: &main,
                cpr: &cpr,
                cpr_listens: fd_channel,
                timeout: Duration::from_millis(req.timeout_ms),
                fault: fault_from_env(),
            },
            record,
            req.journal,
        );
        let _ = std::fs::remove_file(&main_host);
        let _ = std::fs::remove_file(&cpr_host);
        match result {
            Ok(report) => {
                drop(report.new);
                // Its exit must not take CPU from the guest it handed over (see `EXIT_NICE`).
                crate::sched::set_session_nice(req.record.main_pid, cpr_spawn::sched::EXIT_NICE);
                // Its answer is not waited for beyond a grace: the command is in its socket, and
                // a starved old QEMU must not hold the caller's reply (see OLD_VMM_ANSWER_GRACE).
                let _ = old.execute_timeout("quit", None, cpr_handoff::cpr_vmm::OLD_VMM_ANSWER_GRACE);
                // QEMU's STOP (old) to RESUME (new), from QMP timestamps on this host's clock (µs);
                // QEMU's own `downtime` (ms resolution) when an event was missed.
                let downtime_usec = report.stop_to_resume_us.unwrap_or(report.downtime_ms * 1000);
                tracing::info!(
                    CPRD_VM = name,
                    "cpr-transfer of {name} (cpr channel: {}): QMP downtime {} ms, STOP->RESUME {:?} us, total {} ms",
                    if fd_channel { "fd" } else { "path" },
                    report.downtime_ms,
                    report.stop_to_resume_us,
                    report.total_ms
                );
                Ok(Upgraded {
                    generation,
                    child: Some(child),
                    downtime_usec,
                    version: crate::engine::executable_build_id(req.binary).unwrap_or_default(),
                    release: self.probed_release(req.binary).unwrap_or_default(),
                })
            }
            Err(e) => {
                let alive = !matches!(e.phase, Phase::RolledBack | Phase::Lost(_));
                Err(UpgradeError::from_phase(&e.phase, e.reason, alive.then_some(child)))
            }
        }
    }

    fn stop(&self, record: &VmRecord, force: bool) {
        let graceful = !force
            && Qmp::connect(&record.control, Duration::from_secs(5)).is_ok_and(|mut q| q.execute("quit", None).is_ok());
        crate::backend::end_process(record.main_pid, graceful);
        let _ = std::fs::remove_file(&record.control);
    }

    fn forget(&self, name: &str) {
        if let Some(held) = lock(&self.held).remove(name) {
            held.remove_from_store(name);
            // Only stale sockets of its QEMUs are left in it.
            if let Some(chan) = &held.chan
                && let Err(e) = std::fs::remove_dir_all(chan)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(CPRD_VM = name, "cannot remove {}: {e}", chan.display());
            }
        }
    }

    fn reattach(
        &self,
        name: &str,
        def: &VmDef,
        record: &mut VmRecord,
        stored_memfd: Option<&OwnedFd>,
        stored: &mut HashMap<String, OwnedFd>,
    ) -> Result<OwnedFd, String> {
        let mut qmp = Qmp::connect(&record.control, Duration::from_secs(5)).map_err(|e| format!("QMP: {e}"))?;
        let status = qmp.status().map_err(|e| format!("QMP: {e}"))?;
        if status != "running" && status != "paused" {
            return Err(format!("QEMU is {status}"));
        }
        record.paused = status == "paused";
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", record.main_pid)).unwrap_or_default();
        let marker = format!("{name},debug-threads=on");
        if !cmdline.split(|b| *b == 0).any(|arg| arg == marker.as_bytes()) {
            return Err(format!("pid {} is not the QEMU of {name}", record.main_pid));
        }
        let pid = record.main_pid;
        // A boxed QEMU runs as the VM's own uid, which no other VM's VMM has.
        if let Some(want) = record.vmm_uid {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|u| u.split_whitespace().nth(1));
            if uid != Some(want.to_string().as_str()) {
                return Err(format!("pid {pid} runs as uid {uid:?}, not the VM's {want}"));
            }
        }
        // The command line it started with (definition edits apply at the next start).
        let args = if record.launch_args.is_empty() {
            spec_of(def, record.vmm_uid.is_some()).map_err(|e| e.to_string())?.args()
        } else {
            record.launch_args.clone()
        };
        let nics = args.iter().filter(|a| *a == "-netdev").count();
        // QEMU keeps copies of the disk descriptors in its fd sets and closes the ones it was
        // handed; `query-fdsets` says which of its descriptors holds which (by our `opaque`).
        let opaques: Vec<String> = args
            .iter()
            .zip(args.iter().skip(1))
            .filter(|(flag, _)| *flag == "-add-fd")
            .filter_map(|(_, v)| v.split(',').find_map(|kv| kv.strip_prefix("opaque=")).map(str::to_string))
            .collect();
        let in_sets = if opaques.is_empty() { Vec::new() } else { fdsets(&mut qmp)? };
        let mut disks = Vec::new();
        for (j, opaque) in opaques.iter().enumerate() {
            let fd = match stored.remove(&disk_name(name, j)) {
                Some(fd) => fd,
                None => {
                    let Some((_, theirs)) = in_sets.iter().find(|(o, _)| o == opaque) else {
                        return Err(format!("QEMU holds no descriptor for {opaque} in its fd sets"));
                    };
                    crate::fdstore::fd_of_process(pid, *theirs)?
                }
            };
            disks.push(fd);
        }
        // What the fd store (or the image before a re-exec) kept, else a copy from QEMU itself.
        let mut take = |entry: String, target: RawFd| match stored.remove(&entry) {
            Some(fd) => Ok(fd),
            None => crate::fdstore::fd_of_process(pid, target),
        };
        let taps = (0..nics)
            .map(|i| {
                let target = cmdline::TAP_FD_BASE + RawFd::try_from(i).unwrap_or(0);
                take(tap_name(name, i), target)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let memfd = match stored_memfd.map(OwnedFd::try_clone) {
            Some(Ok(fd)) => fd,
            _ => crate::fdstore::fd_of_process(pid, cmdline::MEMORY_FD)?,
        };
        let boot = boot_fds_of(&args)
            .into_iter()
            .map(|n| take(boot_name(name, n), n).map(|fd| (n, fd)))
            .collect::<Result<Vec<_>, _>>()?;
        let held = Held {
            args,
            memfd,
            serial_qemu: take(qemu_serial_name(name), cmdline::SERIAL_FD)?,
            serial_cprd: take(cprd_serial_name(name), CONSOLE_KEEP_FD)?,
            taps,
            disks,
            chan: record.vmm_uid.and(record.control.parent()).map(|dir| channel_dir_path(dir, name)),
            boot,
        };
        held.push_to_store(name);
        crate::console::pump(name, &held.serial_cprd, &record.console);
        let memfd = held.memfd.try_clone().map_err(|e| e.to_string())?;
        lock(&self.held).insert(name.to_string(), held);
        Ok(memfd)
    }

    fn recover(&self, handoff: HandoffRecord, journal: &mut dyn Journal, _timeout_ms: u64) -> Phase {
        transfer::recover(handoff, journal)
    }

    fn pause(&self, record: &VmRecord) -> Result<(), String> {
        let mut qmp = Qmp::connect(&record.control, Duration::from_secs(5)).map_err(|e| format!("QMP: {e}"))?;
        qmp.execute("stop", None).map(drop).map_err(|e| format!("stop: {e}"))
    }

    fn resume(&self, _name: &str, record: &VmRecord) -> Result<(), String> {
        let mut qmp = Qmp::connect(&record.control, Duration::from_secs(5)).map_err(|e| format!("QMP: {e}"))?;
        transfer::resume_old(&mut qmp)
    }
}
