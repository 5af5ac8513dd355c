//! Configuration: `cprd.toml` plus `config.d/*.toml` fragments, merged then validated into
//! [`Settings`]; one TOML file per VM under `vms/` validated into [`VmDef`]. Every error names the
//! file, and where TOML can tell, the line and the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A configuration problem, with the file it is in.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{file}: {message}")]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// What is wrong (TOML's own message includes line, column and key).
    pub message: String,
}

fn err(file: &Path, message: impl Into<String>) -> ConfigError {
    ConfigError { file: file.to_path_buf(), message: message.into() }
}

/// Daemon settings, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Glob patterns a VMM binary must match to be used.
    pub allowed_vmm: Vec<glob::Pattern>,
    /// The cpr-vmm binary used when a VM definition names none.
    pub default_vmm: PathBuf,
    /// The QEMU binary used when a `backend = "qemu"` VM definition names none.
    pub default_qemu: PathBuf,
    /// Timeout of each step of a handoff, in milliseconds.
    pub handoff_timeout_ms: u64,
    /// Where VM definitions live.
    pub vms_dir: PathBuf,
    /// The box every VMM runs in, `None` when the operator turned it off.
    pub sandbox: Option<SandboxSettings>,
    /// How large the console logs may grow.
    pub console: crate::console::ConsoleLimits,
}

/// Where VMM identities come from: each running VM gets a uid (and a gid of the same number)
/// of its own from `first_uid .. first_uid + count`, kept across its upgrades.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxSettings {
    /// The first uid cprd may give a VMM.
    pub first_uid: u32,
    /// How many uids it may give (at most that many VMs run at once).
    pub count: u32,
}

/// The default first VMM uid: systemd's "unused" range starts at 0x70000000 (1879048192), above
/// the container ranges (0x80000..0x6fffffff) and below the foreign range (0x7ffe0000); see
/// systemd's UIDS-GIDS.md.
pub const DEFAULT_FIRST_UID: u32 = 0x7000_0000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsInput {
    vmm: Option<VmmInput>,
    handoff: Option<HandoffInput>,
    sandbox: Option<SandboxInput>,
    console: Option<ConsoleInput>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsoleInput {
    max_bytes: Option<u64>,
    keep: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SandboxInput {
    enabled: Option<bool>,
    first_uid: Option<u32>,
    count: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmmInput {
    allowed: Option<Vec<String>>,
    default: Option<String>,
    qemu: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HandoffInput {
    timeout_ms: Option<u64>,
}

/// Deep-merges `over` into `base` (tables merge key by key; other values are replaced).
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Reads one settings file: checked on its own (from its text, so errors carry line and key),
/// then returned as a table for merging.
fn parse_table(file: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| err(file, format!("cannot read: {e}")))?;
    table_from_text(file, &text)
}

/// The checks of [`parse_table`] on a file's text.
fn table_from_text(file: &Path, text: &str) -> Result<toml::Table, ConfigError> {
    toml::from_str::<SettingsInput>(text).map_err(|e| err(file, e.to_string().trim_end().to_string()))?;
    text.parse::<toml::Table>().map_err(|e| err(file, e.to_string().trim_end().to_string()))
}

/// Settings from the text of one `DIR/cprd.toml` alone (no vendor defaults, no fragments):
/// what [`load_layered`] makes of a directory holding only that file.
pub fn settings_from_text(dir: &Path, text: &str) -> Result<Settings, ConfigError> {
    let main = dir.join("cprd.toml");
    settings_from_table(dir, &main, table_from_text(&main, text)?)
}

/// `DIR/config.d/*.toml` in name order.
fn fragments(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir.join("config.d")) else { return Vec::new() };
    let mut frags: Vec<PathBuf> =
        rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect();
    frags.sort();
    frags
}

/// Loads the distribution's defaults `VENDOR/config.d/*.toml` (packages ship them under
/// `/usr/lib/cprd`), then the operator's `DIR/cprd.toml` and `DIR/config.d/*.toml` over them.
pub fn load_layered(vendor: Option<&Path>, dir: &Path) -> Result<Settings, ConfigError> {
    let main = dir.join("cprd.toml");
    let mut merged = toml::Table::new();
    let mut files = vendor.map(fragments).unwrap_or_default();
    if main.exists() {
        files.push(main.clone());
    }
    files.extend(fragments(dir));
    for f in &files {
        merge(&mut merged, parse_table(f)?);
    }
    settings_from_table(dir, &main, merged)
}

/// Validates merged settings; errors name `main`, the operator's file.
fn settings_from_table(dir: &Path, main: &Path, merged: toml::Table) -> Result<Settings, ConfigError> {
    let input = SettingsInput::deserialize(toml::Value::Table(merged)).map_err(|e| err(main, e.to_string()))?;
    let vmm = input.vmm.unwrap_or(VmmInput { allowed: None, default: None, qemu: None });
    let default_qemu = PathBuf::from(vmm.qemu.unwrap_or_else(|| "/usr/bin/qemu-system-x86_64".into()));
    let default_vmm = PathBuf::from(vmm.default.unwrap_or_else(|| "/usr/libexec/cprd/cpr-vmm".into()));
    let allowed = vmm.allowed.unwrap_or_else(|| vec!["/usr/libexec/cprd/*".into(), "/usr/bin/qemu-system-*".into()]);
    let mut allowed_vmm = Vec::new();
    for pattern in allowed {
        allowed_vmm.push(
            glob::Pattern::new(&pattern)
                .map_err(|e| err(main, format!("vmm.allowed: {pattern:?} is not a valid glob: {e}")))?,
        );
    }
    let handoff_timeout_ms = input.handoff.and_then(|h| h.timeout_ms).unwrap_or(5000);
    if !(100..=600_000).contains(&handoff_timeout_ms) {
        return Err(err(main, format!("handoff.timeout_ms = {handoff_timeout_ms} is outside 100..=600000")));
    }
    let sandbox = sandbox_settings(input.sandbox).map_err(|m| err(main, m))?;
    let console = console_limits(input.console).map_err(|m| err(main, m))?;
    Ok(Settings {
        allowed_vmm,
        default_vmm,
        default_qemu,
        handoff_timeout_ms,
        vms_dir: dir.join("vms"),
        sandbox,
        console,
    })
}

/// The `[console]` section, checked.
fn console_limits(input: Option<ConsoleInput>) -> Result<crate::console::ConsoleLimits, String> {
    use crate::console::{ConsoleLimits, MAX_KEEP, MIN_MAX_BYTES};
    let defaults = ConsoleLimits::default();
    let Some(input) = input else { return Ok(defaults) };
    let max_bytes = input.max_bytes.unwrap_or(defaults.max_bytes);
    if max_bytes < MIN_MAX_BYTES {
        return Err(format!("console.max_bytes = {max_bytes} is below {MIN_MAX_BYTES}"));
    }
    let keep = input.keep.unwrap_or(defaults.keep);
    if keep > MAX_KEEP {
        return Err(format!("console.keep = {keep} is above {MAX_KEEP}"));
    }
    Ok(ConsoleLimits { max_bytes, keep })
}

/// The `[sandbox]` section, checked: on unless turned off; the uid range above the system's
/// users (1000 and up are people; below 65536 is where distributions allocate) and not wrapping.
fn sandbox_settings(input: Option<SandboxInput>) -> Result<Option<SandboxSettings>, String> {
    let input = input.unwrap_or(SandboxInput { enabled: None, first_uid: None, count: None });
    if input.enabled == Some(false) {
        return Ok(None);
    }
    let first_uid = input.first_uid.unwrap_or(DEFAULT_FIRST_UID);
    let count = input.count.unwrap_or(65536);
    if first_uid < 65536 {
        return Err(format!("sandbox.first_uid = {first_uid} is below 65536, where a system's own users live"));
    }
    if count == 0 || first_uid.checked_add(count).is_none_or(|end| end > 0xffff_fffe) {
        return Err(format!("sandbox: first_uid = {first_uid} with count = {count} is not a range of uids"));
    }
    Ok(Some(SandboxSettings { first_uid, count }))
}

/// Which VMM runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// cprd's own cpr-vmm.
    CprVmm,
    /// QEMU 10.0 or newer, handed over with cpr-transfer.
    Qemu,
}

impl BackendKind {
    /// The name used on D-Bus and in files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CprVmm => "cpr-vmm",
            Self::Qemu => "qemu",
        }
    }
}

/// The guest a VM runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestDef {
    /// The built-in CPL3 test guest.
    TestGuest {
        /// Its flags (`guest_flags`, passed in rsi; 0 by default).
        flags: u64,
    },
    /// A static long-mode ELF of the operator's, run at CPL3 (`guest_elf = "/path"`). cprd opens
    /// it and hands the VMM the descriptor; the VMM reports its failure codes raw.
    Elf {
        /// The image.
        path: PathBuf,
        /// Its flags (`guest_flags`, passed in rsi; 0 by default).
        flags: u64,
    },
    /// A Linux kernel.
    Linux {
        /// Kernel image.
        kernel: PathBuf,
        /// Initramfs.
        initrd: Option<PathBuf>,
        /// Command line.
        cmdline: String,
    },
}

/// One VM definition, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDef {
    /// The VM's name (the file stem).
    pub name: String,
    /// Its backend.
    pub backend: BackendKind,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// The guest.
    pub guest: GuestDef,
    /// Where the serial console is logged (default: the runtime directory).
    pub console_log: Option<PathBuf>,
    /// Start when cprd starts.
    pub autostart: bool,
    /// The VMM binary (default: the settings' default).
    pub vmm_binary: Option<PathBuf>,
    /// QEMU only: versioned machine type (never an alias such as `q35`).
    pub machine: String,
    /// QEMU only: accelerator (`kvm`, or `tcg` where no hardware KVM is available).
    pub accel: String,
    /// QEMU only: CPU model (default: `host` with KVM, QEMU's default with TCG).
    pub cpu: Option<String>,
    /// QEMU only: how a new QEMU gets its cpr channel (`cpr_channel = "auto"` or `"path"`).
    pub cpr_channel: CprChannelChoice,
    /// QEMU only: `cpr_mode = "cpr-transfer"` (default) or `"cpr-exec"`.
    pub cpr_mode: CprMode,
    /// QEMU only: network cards on tap devices cprd creates and holds.
    pub nics: Vec<NicDef>,
    /// QEMU only: disks.
    pub disks: Vec<DiskDef>,
}

/// A network card of a QEMU VM: cprd creates the tap device and hands it to every QEMU
/// generation, so connections survive upgrades.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicDef {
    /// Tap device name (created by cprd if it does not exist).
    pub tap: String,
    /// Network namespace to create the tap device in (a path such as `/run/netns/NAME`).
    pub netns: Option<PathBuf>,
    /// QEMU device model.
    #[serde(default = "default_nic_model")]
    pub model: String,
    /// MAC address (default: derived from the VM name and the card's index).
    pub mac: Option<String>,
}

fn default_nic_model() -> String {
    "virtio-net-pci".into()
}

/// A disk of a QEMU VM.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskDef {
    /// Image path.
    pub path: PathBuf,
    /// Image format.
    #[serde(default = "default_disk_format")]
    pub format: String,
    /// Read-only.
    #[serde(default)]
    pub readonly: bool,
}

fn default_disk_format() -> String {
    "raw".into()
}

/// QEMU only: how the new QEMU of a handoff gets its cpr channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CprChannelChoice {
    /// A socket cprd listens on and passes as a descriptor when the new QEMU takes one (found
    /// by its pre-flight; QEMU >= 10.1), else a path the new QEMU binds.
    #[default]
    Auto,
    /// Always a path the new QEMU binds (what QEMU 10.0 needs; for comparison and as a way
    /// out should a QEMU mishandle the other).
    Path,
}

/// QEMU only: how a QEMU VM's guest is handed to a new binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CprMode {
    /// A second QEMU process takes the guest over (QEMU >= 10.0); the old one resumes it if
    /// anything fails before the commit.
    #[default]
    CprTransfer,
    /// The running QEMU execs the new binary (QEMU >= 10.2): same PID and scope, a longer pause,
    /// no way back once exec'd. Used when both binaries have it and the VM was started in this
    /// mode (its QEMU's seccomp filter then allows exec); else cpr-transfer.
    CprExec,
}

/// The machine type cprd pins QEMU VMs to unless a definition names another.
pub const DEFAULT_MACHINE: &str = "pc-q35-10.0";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmInput {
    backend: Option<BackendKind>,
    memory: String,
    vcpus: Option<u32>,
    guest: Option<String>,
    kernel: Option<String>,
    initrd: Option<String>,
    guest_elf: Option<String>,
    guest_flags: Option<u64>,
    cmdline: Option<String>,
    console_log: Option<String>,
    autostart: Option<bool>,
    vmm_binary: Option<String>,
    machine: Option<String>,
    accel: Option<String>,
    cpu: Option<String>,
    cpr_channel: Option<CprChannelChoice>,
    cpr_mode: Option<CprMode>,
    #[serde(default)]
    nic: Vec<NicDef>,
    #[serde(default)]
    disk: Vec<DiskDef>,
}

/// A VM name is a file stem of letters, digits, `-` and `_`, at most 64 bytes.
pub fn valid_vm_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Loads and validates `vms/NAME.toml`.
pub fn load_vm(file: &Path) -> Result<VmDef, ConfigError> {
    let name = vm_name(file)?;
    let text = std::fs::read_to_string(file).map_err(|e| err(file, format!("cannot read: {e}")))?;
    vm_from_text(file, name, &text)
}

/// Validates the text of a VM definition; `file` (`vms/NAME.toml`) names the VM and every error.
pub fn parse_vm(file: &Path, text: &str) -> Result<VmDef, ConfigError> {
    vm_from_text(file, vm_name(file)?, text)
}

/// The VM name of `vms/NAME.toml`, checked.
fn vm_name(file: &Path) -> Result<String, ConfigError> {
    let name = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if !valid_vm_name(&name) {
        return Err(err(file, format!("{name:?} is not a valid VM name (letters, digits, - and _)")));
    }
    Ok(name)
}

/// [`parse_vm`] of a VM whose name is checked.
fn vm_from_text(file: &Path, name: String, text: &str) -> Result<VmDef, ConfigError> {
    let input: VmInput = toml::from_str(text).map_err(|e| err(file, e.to_string().trim_end().to_string()))?;
    use cpr_proto::memory::{MAX_MEMORY_BYTES, MIN_MEMORY_BYTES, parse_size};
    let memory_bytes = parse_size(&input.memory).map_err(|e| err(file, format!("memory: {e}")))?;
    if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&memory_bytes) {
        return Err(err(file, format!("memory: {} is outside 16M..1T", input.memory)));
    }
    // The vCPU limit is cpr-vmm's; a QEMU guest may have up to 255.
    let max_vcpus = match input.backend.unwrap_or(BackendKind::CprVmm) {
        BackendKind::CprVmm => cpr_proto::control::CPR_VMM_MAX_VCPUS,
        BackendKind::Qemu => u8::MAX,
    };
    let vcpus = input.vcpus.unwrap_or(1);
    let vcpus = u8::try_from(vcpus)
        .ok()
        .filter(|v| (1..=max_vcpus).contains(v))
        .ok_or_else(|| err(file, format!("vcpus: {vcpus} is outside 1..={max_vcpus}")))?;
    if input.guest_flags.is_some() && input.kernel.is_some() {
        return Err(err(file, "guest_flags: only the test guest and a guest ELF take flags"));
    }
    let flags = input.guest_flags.unwrap_or(0);
    let guest = match (input.guest.as_deref(), input.kernel, input.guest_elf) {
        (Some("test") | None, None, None) => GuestDef::TestGuest { flags },
        (Some("linux") | None, Some(kernel), None) => GuestDef::Linux {
            kernel: PathBuf::from(kernel),
            initrd: input.initrd.map(PathBuf::from),
            cmdline: input.cmdline.unwrap_or_else(|| "console=ttyS0 reboot=k panic=1".into()),
        },
        (Some("elf") | None, None, Some(path)) => {
            if !Path::new(&path).is_absolute() {
                return Err(err(file, format!("guest_elf: {path:?} is not an absolute path")));
            }
            GuestDef::Elf { path: PathBuf::from(path), flags }
        }
        (Some(kind @ ("test" | "linux" | "elf")), _, _) => {
            return Err(err(
                file,
                format!(
                    "guest: {kind:?} takes {}",
                    match kind {
                        "test" => "neither kernel nor guest_elf",
                        "linux" => "kernel = \"/path/to/vmlinuz\" and no guest_elf",
                        _ => "guest_elf = \"/path/to/guest.elf\" and no kernel",
                    }
                ),
            ));
        }
        (Some(other), _, _) => {
            return Err(err(
                file,
                format!(
                    "guest: {other:?} is not a guest kind (\"test\", \"linux\" with kernel = ..., \"elf\" with \
                     guest_elf = ...)"
                ),
            ));
        }
        (None, Some(_), Some(_)) => {
            return Err(err(file, "guest_elf: a VM runs either a Linux kernel or a guest ELF, not both"));
        }
    };
    let backend = input.backend.unwrap_or(BackendKind::CprVmm);
    if backend == BackendKind::CprVmm {
        let qemu_only = [
            ("machine", input.machine.is_some()),
            ("accel", input.accel.is_some()),
            ("cpu", input.cpu.is_some()),
            ("cpr_channel", input.cpr_channel.is_some()),
            ("cpr_mode", input.cpr_mode.is_some()),
            ("nic", !input.nic.is_empty()),
            ("disk", !input.disk.is_empty()),
        ];
        if let Some((key, _)) = qemu_only.iter().find(|(_, set)| *set) {
            return Err(err(file, format!("{key}: only VMs with backend = \"qemu\" take this key")));
        }
    } else if !matches!(guest, GuestDef::Linux { .. }) {
        return Err(err(file, "backend = \"qemu\" runs a Linux guest: set kernel = \"/path/to/vmlinuz\""));
    }
    let accel = input.accel.unwrap_or_else(|| "kvm".into());
    if !matches!(accel.as_str(), "kvm" | "tcg") {
        return Err(err(file, format!("accel: {accel:?} is not \"kvm\" or \"tcg\"")));
    }
    let machine = input.machine.unwrap_or_else(|| DEFAULT_MACHINE.into());
    let versioned = machine.rsplit_once('-').is_some_and(|(_, v)| {
        let parts: Vec<&str> = v.split('.').collect();
        parts.len() == 2 && parts.iter().all(|p| p.parse::<u32>().is_ok())
    });
    if !versioned {
        return Err(err(
            file,
            format!("machine: {machine:?} is an alias; name a versioned type such as {DEFAULT_MACHINE}"),
        ));
    }
    // Values cprd writes into QEMU's comma-separated options: a `,` would add options of its own.
    let word = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    let words = std::iter::once(("machine".to_string(), machine.as_str()))
        .chain(input.nic.iter().enumerate().map(|(i, n)| (format!("nic[{i}].model"), n.model.as_str())))
        .chain(input.disk.iter().enumerate().map(|(i, d)| (format!("disk[{i}].format"), d.format.as_str())));
    for (key, value) in words {
        if !word(value) {
            return Err(err(file, format!("{key}: {value:?} may only have letters, digits, '.', '-' and '_'")));
        }
    }
    for (i, nic) in input.nic.iter().enumerate() {
        if nic.tap.is_empty()
            || nic.tap.len() > 15
            || !nic.tap.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(err(
                file,
                format!("nic[{i}].tap: {:?} is not a valid interface name (1-15 letters, digits, - _)", nic.tap),
            ));
        }
        if let Some(mac) = &nic.mac
            && (mac.len() != 17 || !mac.split(':').all(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok()))
        {
            return Err(err(file, format!("nic[{i}].mac: {mac:?} is not a MAC address like 52:54:00:12:34:56")));
        }
    }
    Ok(VmDef {
        name,
        backend,
        memory_bytes,
        vcpus,
        guest,
        console_log: input.console_log.map(PathBuf::from),
        autostart: input.autostart.unwrap_or(false),
        vmm_binary: input.vmm_binary.map(PathBuf::from),
        machine,
        accel,
        cpu: input.cpu,
        cpr_channel: input.cpr_channel.unwrap_or_default(),
        cpr_mode: input.cpr_mode.unwrap_or_default(),
        nics: input.nic,
        disks: input.disk,
    })
}

/// Loads every `vms/*.toml`; the first bad file fails the whole load (nothing half-applied).
pub fn load_vms(dir: &Path) -> Result<BTreeMap<String, VmDef>, ConfigError> {
    let (defs, bad) = load_vms_each(dir);
    match bad.into_iter().next() {
        Some((_, e)) => Err(e),
        None => Ok(defs),
    }
}

/// Loads every `vms/*.toml` on its own: the definitions that load, and each file that does not
/// (by VM name, the file's stem) with its error, so that one bad file does not stop the others.
pub fn load_vms_each(dir: &Path) -> (BTreeMap<String, VmDef>, Vec<(String, ConfigError)>) {
    let mut defs = BTreeMap::new();
    let mut bad = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return (defs, bad) };
    let mut files: Vec<PathBuf> =
        rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect();
    files.sort();
    for f in files {
        match load_vm(&f) {
            Ok(def) => {
                defs.insert(def.name.clone(), def);
            }
            Err(e) => bad.push((f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(), e)),
        }
    }
    (defs, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) -> PathBuf {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn fragments_merge_over_the_main_file() {
        let d = tempfile::tempdir().expect("tempdir");
        write(d.path(), "cprd.toml", "[vmm]\nallowed = [\"/opt/a/*\"]\ndefault = \"/opt/a/cpr-vmm\"\n");
        write(d.path(), "config.d/50-b.toml", "[handoff]\ntimeout_ms = 2000\n");
        write(d.path(), "config.d/60-c.toml", "[vmm]\nallowed = [\"/opt/c/*\"]\n");
        let s = load_layered(None, d.path()).expect("valid");
        assert_eq!(s.handoff_timeout_ms, 2000);
        assert_eq!(s.allowed_vmm, vec![glob::Pattern::new("/opt/c/*").expect("glob")]);
        assert_eq!(s.default_vmm, PathBuf::from("/opt/a/cpr-vmm"));
    }

    #[test]
    fn operator_configuration_overrides_the_vendor_defaults() {
        let d = tempfile::tempdir().expect("tempdir");
        write(
            d.path(),
            "vendor/config.d/00-defaults.toml",
            "[vmm]\ndefault = \"/usr/libexec/cprd/cpr-vmm\"\n[handoff]\ntimeout_ms = 5000\n",
        );
        write(d.path(), "etc/cprd.toml", "[handoff]\ntimeout_ms = 7000\n");
        let s = load_layered(Some(&d.path().join("vendor")), &d.path().join("etc")).expect("valid");
        assert_eq!((s.handoff_timeout_ms, s.default_vmm.as_path()), (7000, Path::new("/usr/libexec/cprd/cpr-vmm")));
        write(d.path(), "vendor/config.d/10-bad.toml", "[handoff]\ntimeout = 1\n");
        let e = load_layered(Some(&d.path().join("vendor")), &d.path().join("etc")).expect_err("bad vendor file");
        assert!(e.file.ends_with("vendor/config.d/10-bad.toml"), "{e}");
    }

    #[test]
    fn bad_toml_names_file_line_and_key() {
        let d = tempfile::tempdir().expect("tempdir");
        write(d.path(), "cprd.toml", "[vmm]\ndefault = \"/x\"\n");
        let frag = write(d.path(), "config.d/10-bad.toml", "[handoff]\n\ntimeout_msec = 5\n");
        let e = load_layered(None, d.path()).expect_err("unknown key");
        assert_eq!(e.file, frag);
        let text = e.to_string();
        assert!(text.contains("line 3"), "{text}");
        assert!(text.contains("timeout_msec"), "{text}");
        write(d.path(), "config.d/10-bad.toml", "[handoff\n");
        assert!(load_layered(None, d.path()).expect_err("syntax").to_string().contains("line 1"));
    }

    #[test]
    fn the_shipped_configuration_and_examples_validate() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let s = load_layered(None, &root).expect("config/cprd.toml");
        assert_eq!(s.default_qemu, PathBuf::from("/usr/bin/qemu-system-x86_64"));
        assert_eq!(s.sandbox, Some(SandboxSettings { first_uid: DEFAULT_FIRST_UID, count: 65536 }));
        assert_eq!(s.console, crate::console::ConsoleLimits::default());
        let vms = load_vms(&root.join("vms")).expect("config/vms");
        let q = &vms["qemu-example"];
        assert_eq!(
            (q.backend, q.machine.as_str(), q.nics.len(), q.disks.len()),
            (BackendKind::Qemu, DEFAULT_MACHINE, 1, 1)
        );
        assert_eq!(vms["example"].backend, BackendKind::CprVmm);
    }

    #[test]
    fn the_sandbox_is_on_unless_turned_off_and_its_uid_range_is_checked() {
        let d = tempfile::tempdir().expect("tempdir");
        write(d.path(), "cprd.toml", "[vmm]\ndefault = \"/x\"\n");
        assert!(load_layered(None, d.path()).expect("defaults").sandbox.is_some());
        write(d.path(), "cprd.toml", "[console]\nmax_bytes = 1000\n");
        let e = load_layered(None, d.path()).expect_err("too small").to_string();
        assert!(e.contains("console.max_bytes = 1000 is below 65536"), "{e}");
        write(d.path(), "cprd.toml", "[console]\nkeep = 1000\n");
        let e = load_layered(None, d.path()).expect_err("too many").to_string();
        assert!(e.contains("console.keep = 1000 is above 100"), "{e}");
        write(d.path(), "cprd.toml", "[console]\nmax_bytes = 131072\nkeep = 0\n");
        let c = load_layered(None, d.path()).expect("valid").console;
        assert_eq!((c.max_bytes, c.keep), (131072, 0));
        write(d.path(), "cprd.toml", "[sandbox]\nenabled = false\n");
        assert_eq!(load_layered(None, d.path()).expect("off").sandbox, None);
        for (bad, says) in [
            ("first_uid = 1000", "below 65536"),
            ("first_uid = 4294967000\ncount = 1000", "not a range"),
            ("count = 0", "not a range"),
            ("uids = 5", "unknown field"),
        ] {
            write(d.path(), "cprd.toml", &format!("[sandbox]\n{bad}\n"));
            let e = load_layered(None, d.path()).expect_err(bad).to_string();
            assert!(e.contains(says) && e.contains("cprd.toml"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_guest_elf_is_a_guest_kind_of_its_own() {
        let f = Path::new("/etc/cprd/vms/own.toml");
        let def = parse_vm(f, "memory = \"64M\"\nguest_elf = \"/srv/guest.elf\"\nguest_flags = 6\n").expect("valid");
        assert_eq!(def.guest, GuestDef::Elf { path: "/srv/guest.elf".into(), flags: 6 });
        let def = parse_vm(f, "memory = \"64M\"\nguest = \"elf\"\nguest_elf = \"/srv/g\"\n").expect("valid");
        assert_eq!(def.guest, GuestDef::Elf { path: "/srv/g".into(), flags: 0 });
        let def = parse_vm(f, "memory = \"64M\"\nguest_flags = 4\n").expect("valid");
        assert_eq!(def.guest, GuestDef::TestGuest { flags: 4 });
        for (text, says) in [
            ("guest_elf = \"guest.elf\"", "not an absolute path"),
            ("guest_elf = \"/g\"\nkernel = \"/k\"", "either a Linux kernel or a guest ELF"),
            ("guest = \"elf\"", "\"elf\" takes guest_elf = "),
            ("guest = \"test\"\nguest_elf = \"/g\"", "neither kernel nor guest_elf"),
            ("kernel = \"/k\"\nguest_flags = 1", "only the test guest and a guest ELF take flags"),
            ("backend = \"qemu\"\nguest_elf = \"/g\"", "runs a Linux guest"),
        ] {
            let e = parse_vm(f, &format!("memory = \"64M\"\n{text}\n")).expect_err(text);
            assert!(e.to_string().contains(says), "{text}: {e}");
            assert_eq!(e.file, f);
        }
    }

    #[test]
    fn qemu_keys_are_checked() {
        let d = tempfile::tempdir().expect("tempdir");
        let bad = write(d.path(), "vms/a.toml", "memory = \"256M\"\n[[nic]]\ntap = \"t0\"\n");
        assert!(
            load_vm(&bad).expect_err("nic on cpr-vmm").to_string().contains("nic: only VMs with backend = \"qemu\"")
        );
        let bad = write(d.path(), "vms/b.toml", "backend = \"qemu\"\nmemory = \"256M\"\n");
        for (key, body) in [
            ("machine", "machine = \"pc,accel=kvm-q35-10.0\"\n"),
            ("nic[0].model", "[[nic]]\ntap = \"t0\"\nmodel = \"e1000,romfile=/x\"\n"),
            ("disk[0].format", "[[disk]]\npath = \"/d\"\nformat = \"raw,file=/x\"\n"),
        ] {
            let f = write(
                d.path(),
                "vms/comma.toml",
                &format!("backend = \"qemu\"\nmemory = \"256M\"\nkernel = \"/k\"\n{body}"),
            );
            let e = load_vm(&f).expect_err(key).to_string();
            assert!(e.contains(key) && e.contains("may only have letters"), "{key}: {e}");
        }
        assert!(load_vm(&bad).expect_err("no kernel").to_string().contains("set kernel"));
        let bad = write(
            d.path(),
            "vms/c.toml",
            "backend = \"qemu\"\nmemory = \"256M\"\nkernel = \"/k\"\nmachine = \"q35\"\n",
        );
        assert!(load_vm(&bad).expect_err("alias").to_string().contains("is an alias"));
        let bad = write(
            d.path(),
            "vms/d.toml",
            "backend = \"qemu\"\nmemory = \"256M\"\nkernel = \"/k\"\n[[nic]]\ntap = \"much-too-long-name\"\n",
        );
        assert!(load_vm(&bad).expect_err("tap").to_string().contains("nic[0].tap"));
        let bad =
            write(d.path(), "vms/e.toml", "backend = \"qemu\"\nmemory = \"256M\"\nkernel = \"/k\"\naccel = \"hvf\"\n");
        assert!(load_vm(&bad).expect_err("accel").to_string().contains("accel"));
        let ok = write(
            d.path(),
            "vms/f.toml",
            "backend = \"qemu\"\nmemory = \"256M\"\nkernel = \"/k\"\naccel = \"tcg\"\n[[nic]]\ntap = \"t0\"\nmac = \"52:54:00:00:00:01\"\n",
        );
        let def = load_vm(&ok).expect("valid");
        assert_eq!((def.accel.as_str(), def.nics[0].model.as_str()), ("tcg", "virtio-net-pci"));
    }

    #[test]
    fn vm_definitions_are_validated() {
        let d = tempfile::tempdir().expect("tempdir");
        let ok = write(d.path(), "vms/vm1.toml", "memory = \"256M\"\nvcpus = 2\nautostart = true\n");
        let def = load_vm(&ok).expect("valid");
        assert_eq!(
            (def.memory_bytes, def.vcpus, def.guest.clone(), def.autostart),
            (256 << 20, 2, GuestDef::TestGuest { flags: 0 }, true)
        );
        let bad = write(d.path(), "vms/vm2.toml", "memory = \"256M\"\nvcpus = 300\n");
        assert!(load_vm(&bad).expect_err("vcpus").to_string().contains("vcpus: 300"));
        let bad = write(d.path(), "vms/vm3.toml", "memory = \"256M\"\ncolour = \"red\"\n");
        let e = load_vm(&bad).expect_err("unknown key").to_string();
        assert!(e.contains("vm3.toml") && e.contains("line 2") && e.contains("colour"), "{e}");
        assert!(load_vms(&d.path().join("vms")).is_err(), "one bad file fails the load");
    }

    /// How a QEMU guest is handed over is a word from a short list, in QEMU definitions only.
    #[test]
    fn cpr_mode_and_cpr_channel_are_checked() {
        let d = tempfile::tempdir().expect("tempdir");
        let qemu = "backend = \"qemu\"\nmemory = \"256M\"\nkernel = \"/k\"\n";
        let f = write(d.path(), "vms/q.toml", &format!("{qemu}cpr_mode = \"cpr-exec\"\ncpr_channel = \"path\"\n"));
        let def = load_vm(&f).expect("valid");
        assert_eq!((def.cpr_mode, def.cpr_channel), (CprMode::CprExec, CprChannelChoice::Path));
        let f = write(d.path(), "vms/q2.toml", qemu);
        let def = load_vm(&f).expect("valid");
        assert_eq!((def.cpr_mode, def.cpr_channel), (CprMode::CprTransfer, CprChannelChoice::Auto));
        let f = write(d.path(), "vms/q3.toml", &format!("{qemu}cpr_mode = \"exec\"\n"));
        let e = load_vm(&f).expect_err("unknown mode").to_string();
        assert!(e.contains("q3.toml") && e.contains("line 4") && e.contains("cpr-exec"), "{e}");
        let f = write(d.path(), "vms/t.toml", "memory = \"64M\"\ncpr_mode = \"cpr-exec\"\n");
        let e = load_vm(&f).expect_err("test guest").to_string();
        assert!(e.contains("cpr_mode: only VMs with backend = \"qemu\""), "{e}");
    }
}
