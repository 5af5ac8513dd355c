//! The QEMU command line of one VM. Every generation gets the same arguments (cpr-transfer
//! needs an identical machine), and the file descriptors cprd holds arrive at fixed numbers:
//! guest RAM at [`MEMORY_FD`], the QMP listening socket at [`QMP_FD`], cprd's end-point of the
//! serial console at [`SERIAL_FD`], kernel and initramfs at [`KERNEL_FD`] and [`INITRD_FD`],
//! tap devices from [`TAP_FD_BASE`] on and disk images from [`DISK_FD_BASE`] on.

use std::path::{Path, PathBuf};

/// Guest RAM: cprd's memfd, mapped shared through `/proc/self/fd/3`.
pub const MEMORY_FD: i32 = 3;
/// The QMP socket, listening (created and bound by cprd).
pub const QMP_FD: i32 = 4;
/// QEMU's end of the serial console's socket pair (cprd holds the other end).
pub const SERIAL_FD: i32 = 5;
/// The kernel image, opened by cprd, read through `/proc/self/fd/7` (fd 6 is cprd's own, see
/// cprd's `CONSOLE_KEEP_FD`).
pub const KERNEL_FD: i32 = 7;
/// The initramfs, opened by cprd, read through `/proc/self/fd/8`.
pub const INITRD_FD: i32 = 8;
/// The cpr channel's listening socket, created and bound by cprd, for a new QEMU that takes an
/// fd-type cpr channel (QEMU >= 10.1; found by the pre-flight probe, see `crate::probe`).
pub const CPR_CHANNEL_FD: i32 = 9;
/// The first tap device; NIC `i` is at `TAP_FD_BASE + i`.
pub const TAP_FD_BASE: i32 = 10;
/// The first disk image descriptor, opened by cprd. Disk `i` is fd set `i + 1`, holding a
/// read-only descriptor and, unless the disk is read-only, a read-write one (QEMU's block layer
/// opens an image read-only first and for writing when a writer needs it; it takes the
/// descriptor of the set whose access mode matches). The sets' descriptors lie one after the
/// other from here, in disk order: see [`VmSpec::disk_fds`].
pub const DISK_FD_BASE: i32 = 40;

/// QEMU's own seccomp filter, for a boxed QEMU: on, and everything it can deny denied (obsolete
/// calls, setuid and friends, fork/exec, and scheduler/affinity changes).
pub const SECCOMP: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The same filter for a boxed QEMU whose guest is handed over by `cpr-exec`: there the old
/// QEMU execs the new binary itself, so `spawn` (fork and exec) stays allowed.
pub const SECCOMP_EXEC: &str = "on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny";

/// Whether a VM started with `args` may hand its guest over by `cpr-exec`: its QEMU's seccomp
/// filter (if any) lets it exec. Read from the arguments, which every generation keeps.
pub fn args_allow_exec(args: &[String]) -> bool {
    !args.windows(2).any(|w| w[0] == "-sandbox" && w[1].split(',').any(|o| o == "spawn=deny"))
}

/// The command a QEMU execs in a `cpr-exec` handoff: `program` (the new binary, as the running
/// QEMU can reach it), the VM's arguments unchanged, and the state file to load, after which
/// the guest runs by itself (there is no old QEMU to go back to, so nothing waits for a commit).
pub fn exec_command(program: &str, args: &[String], state: &Path) -> Vec<String> {
    let mut c = Vec::with_capacity(args.len() + 3);
    c.push(program.to_string());
    c.extend_from_slice(args);
    c.extend(["-incoming".to_string(), format!("file:{}", state.display())]);
    c
}

/// One network card, backed by a tap device cprd opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    /// QEMU device model (`virtio-net-pci`, `e1000`, ...).
    pub model: String,
    /// MAC address.
    pub mac: String,
}

/// One disk image. cprd opens it and hands QEMU the descriptor in an fd set (`-add-fd`), which
/// QEMU opens as `/dev/fdset/N`: a boxed QEMU cannot open host paths. (The incoming QEMU opens
/// it inactive, so image locking lets both generations have it open; nothing writes between
/// pause and resume.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Image path.
    pub path: PathBuf,
    /// Image format (`raw`, `qcow2`).
    pub format: String,
    /// Read-only.
    pub readonly: bool,
}

/// Everything that shapes a VM's QEMU command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// VM name (QEMU's `-name`).
    pub name: String,
    /// Versioned machine type, e.g. `pc-q35-10.0` (never an alias that moves between QEMUs).
    pub machine: String,
    /// Accelerator: `kvm` or `tcg`.
    pub accel: String,
    /// CPU model (`None`: `host` with KVM, QEMU's default with TCG).
    pub cpu: Option<String>,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Kernel image (cprd opens it; QEMU reads the descriptor at [`KERNEL_FD`]).
    pub kernel: PathBuf,
    /// Initramfs (the same, at [`INITRD_FD`]).
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Network cards.
    pub nics: Vec<NicSpec>,
    /// Disks.
    pub disks: Vec<DiskSpec>,
    /// Turn QEMU's own seccomp filter on ([`SECCOMP`]).
    pub seccomp: bool,
    /// The guest is handed over by `cpr-exec` ([`SECCOMP_EXEC`] when the filter is on).
    pub cpr_exec: bool,
}

impl VmSpec {
    /// The `-cpu` value: the one named, else `host` with KVM, else none (QEMU's default).
    pub fn cpu_arg(&self) -> Option<String> {
        match (&self.cpu, self.accel.as_str()) {
            (Some(cpu), _) => Some(cpu.clone()),
            (None, "kvm") => Some("host".into()),
            (None, _) => None,
        }
    }

    /// The access modes of the disk descriptors, in the order they lie from [`DISK_FD_BASE`]:
    /// (disk index, read-write).
    pub fn disk_fds(&self) -> Vec<(usize, bool)> {
        let mut v = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            v.push((i, false));
            if !d.readonly {
                v.push((i, true));
            }
        }
        v
    }

    /// The arguments every generation of this VM's QEMU is started with.
    pub fn args(&self) -> Vec<String> {
        let mib = self.memory_bytes >> 20;
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("{},debug-threads=on", self.name),
            "-machine".into(),
            format!("{},accel={},aux-ram-share=on,memory-backend=ram0", self.machine, self.accel),
            "-object".into(),
            format!("memory-backend-file,id=ram0,size={mib}M,share=on,mem-path=/proc/self/fd/{MEMORY_FD}"),
            "-m".into(),
            format!("{mib}M"),
            "-smp".into(),
            self.vcpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-chardev".into(),
            format!("socket,id=qmp,fd={QMP_FD},server=on,wait=off"),
            // Not `-mon chardev=qmp,mode=control`: QEMU 11.1 calls `-mon` deprecated, and
            // `-object monitor-qmp` does not exist in 10.0; this form is quiet in both.
            "-qmp".into(),
            "chardev:qmp".into(),
            "-chardev".into(),
            format!("socket,id=serial0,fd={SERIAL_FD}"),
            "-serial".into(),
            "chardev:serial0".into(),
        ];
        if let Some(cpu) = self.cpu_arg() {
            a.extend(["-cpu".into(), cpu]);
        }
        for (i, nic) in self.nics.iter().enumerate() {
            a.push("-netdev".into());
            a.push(format!("tap,id=net{i},fd={}", TAP_FD_BASE + i32::try_from(i).unwrap_or(0)));
            a.push("-device".into());
            a.push(format!("{},netdev=net{i},mac={}", nic.model, nic.mac));
        }
        for (n, (i, rw)) in self.disk_fds().into_iter().enumerate() {
            let fd = DISK_FD_BASE + i32::try_from(n).unwrap_or(0);
            let mode = if rw { "rw" } else { "ro" };
            a.extend(["-add-fd".into(), format!("fd={fd},set={},opaque=disk{i}-{mode}", i + 1)]);
        }
        for (i, d) in self.disks.iter().enumerate() {
            let set = i + 1;
            a.push("-drive".into());
            a.push(format!(
                "if=virtio,id=disk{i},file=/dev/fdset/{set},file.locking=off,format={},readonly={}",
                d.format,
                if d.readonly { "on" } else { "off" }
            ));
        }
        if self.seccomp {
            a.extend(["-sandbox".into(), if self.cpr_exec { SECCOMP_EXEC } else { SECCOMP }.into()]);
        }
        // The files cprd opened when the VM started, whatever their paths name since (a kernel
        // package may have replaced or removed them): every generation boots the same bytes.
        a.push("-kernel".into());
        a.push(format!("/proc/self/fd/{KERNEL_FD}"));
        if self.initrd.is_some() {
            a.push("-initrd".into());
            a.push(format!("/proc/self/fd/{INITRD_FD}"));
        }
        a.push("-append".into());
        a.push(self.cmdline.clone());
        a
    }
}

/// Where a new QEMU takes the cpr channel from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CprChannel<'a> {
    /// A UNIX socket it binds itself at this path (every QEMU >= 10.0); the arbiter waits for
    /// it to listen before the old QEMU may connect.
    Path(&'a Path),
    /// The listening socket cprd bound, at [`CPR_CHANNEL_FD`] (QEMU >= 10.1): it listens before
    /// the new QEMU even starts, so `migrate` needs no wait. QEMU 10.0.2 refuses it ("bad cpr
    /// channel socket type; must be unix").
    Fd,
}

/// The two `-incoming` options of a new generation: the main channel, a UNIX socket the new
/// QEMU binds at `main`, and the cpr channel. (The main channel cannot be a socket cprd
/// listens on: QEMU takes an fd-type main channel as a connected stream and fails, "Not a
/// migration stream"; handing the old QEMU a connected main channel through `getfd` crashed
/// QEMU 11.1.3. So the old QEMU always connects the main channel by path.)
pub fn incoming_args(main: &Path, cpr: CprChannel<'_>) -> Vec<String> {
    let unix =
        |path: &Path| serde_json::json!({ "transport": "socket", "type": "unix", "path": path.display().to_string() });
    let cpr_addr = match cpr {
        CprChannel::Path(path) => unix(path),
        CprChannel::Fd => serde_json::json!({ "transport": "socket", "type": "fd", "str": CPR_CHANNEL_FD.to_string() }),
    };
    let channel =
        |kind: &str, addr: serde_json::Value| serde_json::json!({ "channel-type": kind, "addr": addr }).to_string();
    // `-S`: the new QEMU stays paused when the migration completes; the arbiter's `cont` is
    // the commit.
    vec!["-incoming".into(), channel("main", unix(main)), "-incoming".into(), channel("cpr", cpr_addr), "-S".into()]
}

/// The `migrate` arguments that send a guest to a new QEMU listening on `main` and `cpr`.
pub fn migrate_channels(main: &Path, cpr: &Path) -> serde_json::Value {
    let addr = |p: &Path| serde_json::json!({ "transport": "socket", "type": "unix", "path": p.display().to_string() });
    serde_json::json!({ "channels": [
        { "channel-type": "main", "addr": addr(main) },
        { "channel-type": "cpr", "addr": addr(cpr) },
    ]})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            name: "vm1".into(),
            machine: "pc-q35-10.0".into(),
            accel: "tcg".into(),
            cpu: None,
            memory_bytes: 256 << 20,
            vcpus: 2,
            kernel: "/k".into(),
            initrd: Some("/i".into()),
            cmdline: "console=ttyS0".into(),
            nics: vec![NicSpec { model: "e1000".into(), mac: "52:54:00:00:00:01".into() }],
            disks: vec![],
            seccomp: false,
            cpr_exec: false,
        }
    }

    #[test]
    fn guest_ram_is_cprds_memfd_and_shared() {
        let a = spec().args().join(" ");
        assert!(a.contains("memory-backend-file,id=ram0,size=256M,share=on,mem-path=/proc/self/fd/3"), "{a}");
        assert!(a.contains("pc-q35-10.0,accel=tcg,aux-ram-share=on,memory-backend=ram0"), "{a}");
        assert!(a.contains("-netdev tap,id=net0,fd=10 -device e1000,netdev=net0,mac=52:54:00:00:00:01"), "{a}");
        assert!(!a.contains("-cpu"), "TCG keeps QEMU's default CPU: {a}");
    }

    /// Kernel and initramfs reach QEMU as descriptors cprd opened, not by path.
    #[test]
    fn kernel_and_initramfs_are_descriptors() {
        let a = spec().args().join(" ");
        assert!(a.contains("-kernel /proc/self/fd/7 -initrd /proc/self/fd/8 -append console=ttyS0"), "{a}");
        assert!(!a.contains(" /k ") && !a.contains(" /i "), "{a}");
    }

    /// A disk reaches QEMU as a descriptor in an fd set: its path is not on the command line, so
    /// it can add no options (`/img,format=raw,file=/etc/shadow` once could) and a boxed QEMU
    /// needs no access to it.
    #[test]
    fn a_disk_is_a_descriptor_and_its_path_never_reaches_the_command_line() {
        let mut s = spec();
        s.disks.push(DiskSpec {
            path: "/img,readonly=off,file=/etc/shadow".into(),
            format: "raw".into(),
            readonly: true,
        });
        let a = s.args();
        assert!(!a.iter().any(|x| x.contains("/img") || x.contains("shadow")), "{a:?}");
        let joined = a.join(" ");
        assert!(
            joined.contains("-add-fd fd=40,set=1,opaque=disk0-ro -drive if=virtio,id=disk0,file=/dev/fdset/1,file.locking=off,format=raw,readonly=on"),
            "{joined}"
        );
        s.disks.push(DiskSpec { path: "/rw".into(), format: "qcow2".into(), readonly: false });
        let joined = s.args().join(" ");
        assert!(joined.contains("-add-fd fd=41,set=2,opaque=disk1-ro -add-fd fd=42,set=2,opaque=disk1-rw"), "{joined}");
        assert_eq!(s.disk_fds(), [(0, false), (1, false), (1, true)]);
    }

    #[test]
    fn a_boxed_qemu_turns_its_own_seccomp_filter_on() {
        let mut s = spec();
        assert!(!s.args().contains(&"-sandbox".to_string()));
        assert!(args_allow_exec(&s.args()));
        s.seccomp = true;
        let a = s.args().join(" ");
        assert!(a.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"), "{a}");
        assert!(!args_allow_exec(&s.args()), "spawn denied: no cpr-exec");
        s.cpr_exec = true;
        let a = s.args().join(" ");
        assert!(a.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny"), "{a}");
        assert!(args_allow_exec(&s.args()));
    }

    #[test]
    fn a_cpr_exec_command_is_the_vms_arguments_and_the_state_file() {
        let args = spec().args();
        let c = exec_command("/proc/self/fd/33", &args, Path::new("/run/cprd/vms/vm1.chan/exec.1.state"));
        assert_eq!(c[0], "/proc/self/fd/33");
        assert_eq!(&c[1..=args.len()], &args[..]);
        assert_eq!(&c[args.len() + 1..], ["-incoming", "file:/run/cprd/vms/vm1.chan/exec.1.state"]);
        assert!(!c.contains(&"-S".to_string()), "the exec'd QEMU runs the guest as soon as it loaded it");
    }

    #[test]
    fn incoming_names_both_channels_and_does_not_start_the_guest() {
        let a = incoming_args(Path::new("/r/m.sock"), CprChannel::Path(Path::new("/r/c.sock")));
        assert_eq!(a.len(), 5);
        assert_eq!(a[4], "-S", "the arbiter's cont is the commit");
        assert!(a[1].contains("\"channel-type\":\"main\"") && a[1].contains("/r/m.sock"));
        assert!(a[3].contains("\"channel-type\":\"cpr\"") && a[3].contains("/r/c.sock"));
        let a = incoming_args(Path::new("/r/m.sock"), CprChannel::Fd);
        assert!(a[1].contains("/r/m.sock"), "the main channel stays a path: {a:?}");
        assert!(a[3].contains("\"type\":\"fd\"") && a[3].contains("\"str\":\"9\""), "{a:?}");
    }

    #[test]
    fn the_monitor_option_is_one_every_supported_qemu_takes_quietly() {
        let a = spec().args().join(" ");
        assert!(a.contains("-qmp chardev:qmp") && !a.contains("-mon "), "{a}");
    }
}
