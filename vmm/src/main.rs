//! The `cpr-vmm` binary: boot a guest, receive one (`--incoming`), or hand one over (`handoff`).

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, mpsc};

use clap::{Args, Parser, Subcommand};

use cpr_handoff::cpr_vmm::{HandoffRequest, hand_off};
use cpr_handoff::{NoJournal, Phase};
use cpr_proto::control::RunState;
use cpr_vmm::boot::{GuestSpec, load_guest};
use cpr_vmm::control::{Vmm, bind_control, serve};
use cpr_vmm::error::{ExitCode, Result, VmmError};
use cpr_vmm::memory::{GuestRam, create_memfd, parse_size};
use cpr_vmm::vm::{ExitReason, VmCore, VmParts, check_vcpus, open_kvm, spawn_vcpu_threads};

/// The version `--version` prints: the package's (`CPRD_BUILD_STAMP`, set by packaging/build),
/// else the crate's. Packages of different versions thus carry binaries with different build ids.
const VERSION: &str = match option_env!("CPRD_BUILD_STAMP") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// cprd's minimal KVM VMM.
#[derive(Debug, Parser)]
#[command(name = "cpr-vmm", version = VERSION, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Hand the guest of a running cpr-vmm to a new cpr-vmm process (the arbiter, without cprd).
    Handoff(HandoffArgs),
}

#[derive(Debug, Args)]
struct HandoffArgs {
    /// Control socket of the running VMM.
    #[arg(long)]
    control: PathBuf,
    /// Control socket for the new VMM.
    #[arg(long)]
    new_control: PathBuf,
    /// The new VMM binary (default: this binary).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Timeout of each wait on the new VMM, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Also record the state stream of this handoff in FILE (for `--describe-state`).
    #[arg(long, value_name = "FILE")]
    dump_state: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Control socket path (UNIX SOCK_SEQPACKET).
    #[arg(long, conflicts_with = "control_fd")]
    control: Option<PathBuf>,
    /// The control socket as an inherited listening descriptor (bound by whoever started us).
    #[arg(long)]
    control_fd: Option<i32>,
    /// `/dev/kvm` as an inherited descriptor (default: open `/dev/kvm`).
    #[arg(long)]
    kvm_fd: Option<i32>,
    /// Guest RAM to create, e.g. 1G or 256M.
    #[arg(long, conflicts_with = "memory_fd")]
    memory: Option<String>,
    /// Guest RAM as an inherited memfd (its size is the guest's RAM).
    #[arg(long)]
    memory_fd: Option<i32>,
    /// Number of vCPUs (1 to 8).
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Linux kernel (bzImage or vmlinux ELF).
    #[arg(long, conflicts_with = "guest_elf")]
    kernel: Option<PathBuf>,
    /// Initramfs for the Linux kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, requires = "kernel", default_value = "console=ttyS0 reboot=k panic=1")]
    cmdline: String,
    /// A static long-mode ELF to run at CPL3 (default: the built-in test guest).
    #[arg(long)]
    guest_elf: Option<PathBuf>,
    /// Flags for a CPL3 guest (passed in rsi).
    #[arg(long, default_value_t = 0)]
    guest_flags: u64,
    /// Test guest: sweep all of RAM, one page per iteration.
    #[arg(long)]
    touch: bool,
    /// File the serial console is appended to (default: standard output).
    #[arg(long, conflicts_with = "serial_fd")]
    serial_out: Option<PathBuf>,
    /// The serial console's output as an inherited descriptor.
    #[arg(long)]
    serial_fd: Option<i32>,
    /// Receive a running guest from an old VMM over --cpr-fd and --main-fd.
    #[arg(long, requires_all = ["cpr_fd", "main_fd", "commit_fd"])]
    incoming: bool,
    /// Inherited fd of the cpr channel (SOCK_SEQPACKET).
    #[arg(long)]
    cpr_fd: Option<i32>,
    /// Inherited fd of the main channel (SOCK_STREAM).
    #[arg(long)]
    main_fd: Option<i32>,
    /// Inherited fd of the commit channel to the arbiter (SOCK_SEQPACKET).
    #[arg(long)]
    commit_fd: Option<i32>,
    /// Also write the received state stream to this file.
    #[arg(long, hide = true)]
    dump_state: Option<PathBuf>,
    /// Incoming: do not pre-fault guest RAM before the switchover (for benchmarks only).
    #[arg(long, hide = true)]
    no_prefault: bool,
    /// Do not warm either side's switchover code before the guest stops (for benchmarks only).
    #[arg(long, hide = true)]
    no_warm_up: bool,
    /// Incoming: sleep, instead of spinning, while waiting inside the downtime (for benchmarks only).
    #[arg(long, hide = true)]
    no_spin: bool,
    /// Whether a handoff's per-vCPU work is spread over the vCPU threads (for tests and
    /// benchmarks only).
    #[arg(long, hide = true, value_enum, default_value_t = cpr_vmm::percpu::VcpuStateThreads::Auto)]
    vcpu_state_threads: cpr_vmm::percpu::VcpuStateThreads,
    /// Print a saved state stream human-readably and exit.
    #[arg(long, value_name = "FILE")]
    describe_state: Option<PathBuf>,
    /// Print the state format versions this binary writes and reads, and exit.
    #[arg(long)]
    state_formats: bool,
}

fn inherited_fd(fd: i32, what: &str) -> Result<OwnedFd> {
    let bad = |why: String| match what {
        "memory" => VmmError::Memory(format!("--memory-fd {fd}: {why}")),
        _ => VmmError::IncomingAborted(format!("--{what}-fd {fd}: {why}")),
    };
    if fd < 3 {
        return Err(bad("must not be a standard stream".into()));
    }
    // SAFETY: F_GETFD only queries the fd table; an unopened number fails with EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(bad(format!("not an open fd ({})", std::io::Error::last_os_error())));
    }
    // SAFETY: `fd` is open (checked above) and inherited for us alone; we take it over.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::fcntl::fcntl(&owned, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
        .map_err(|e| bad(e.to_string()))?;
    Ok(owned)
}

/// The control socket's listener: inherited (`--control-fd`) or bound here (`--control`).
fn control_listener(a: &RunArgs) -> Result<Option<OwnedFd>> {
    match (a.control_fd, &a.control) {
        (Some(fd), _) => inherited_fd(fd, "control").map(Some),
        (None, Some(p)) => bind_control(p).map(Some),
        (None, None) => Ok(None),
    }
}

fn serial_out(path: Option<&PathBuf>, fd: Option<i32>) -> Result<File> {
    if let Some(fd) = fd {
        return inherited_fd(fd, "serial").map(File::from);
    }
    match path {
        Some(p) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| VmmError::Config(format!("cannot open serial output {}: {e}", p.display()))),
        None => {
            std::io::stdout().lock().try_clone_fd().map_err(|e| VmmError::Internal(format!("cannot dup stdout: {e}")))
        }
    }
}

trait TryCloneFd {
    fn try_clone_fd(&self) -> std::io::Result<File>;
}

impl TryCloneFd for std::io::StdoutLock<'_> {
    fn try_clone_fd(&self) -> std::io::Result<File> {
        use std::os::fd::AsFd;
        Ok(File::from(self.as_fd().try_clone_to_owned()?))
    }
}

/// Extra flags for a CPL3 guest from the environment, for tests that start cpr-vmm through cprd
/// (which passes no `--guest-flags`): `4` is the test guest's console flood.
const GUEST_FLAGS_ENV: &str = "CPR_VMM_TEST_GUEST_FLAGS";

fn guest_spec(a: &RunArgs) -> GuestSpec {
    let from_env = std::env::var(GUEST_FLAGS_ENV).ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let flags = a.guest_flags | from_env | if a.touch { cpr_testguest::FLAG_TOUCH } else { 0 };
    match (&a.kernel, &a.guest_elf) {
        (Some(kernel), _) => GuestSpec::Linux(cpr_vmm::linux_boot::LinuxGuest {
            kernel: kernel.clone(),
            initrd: a.initrd.clone(),
            cmdline: a.cmdline.clone(),
        }),
        (None, Some(path)) => GuestSpec::Elf { path: path.clone(), flags },
        (None, None) => GuestSpec::TestGuest { flags },
    }
}

/// Boots a fresh guest. Returns the VMM and the receiver of the exit reason.
fn boot(a: &RunArgs) -> Result<(Arc<Vmm>, mpsc::Receiver<ExitReason>)> {
    let vcpus = check_vcpus(a.vcpus)?;
    let spec = guest_spec(a);
    spec.check()?;
    let ram = match (a.memory_fd, &a.memory) {
        (Some(fd), _) => GuestRam::from_fd(inherited_fd(fd, "memory")?, None)?,
        (None, size) => {
            let bytes = parse_size(size.as_deref().unwrap_or("256M")).map_err(VmmError::Config)?;
            GuestRam::from_fd(create_memfd(bytes)?, None)?
        }
    };
    if spec.kind() != cpr_proto::state::GuestKind::Linux && ram.bytes() < cpr_testguest::MIN_RAM_BYTES {
        return Err(VmmError::Memory("the test guest needs at least 16 MiB of RAM".into()));
    }
    let listener = control_listener(a)?;
    let kvm_handle = open_kvm(a.kvm_fd.map(|fd| inherited_fd(fd, "kvm")).transpose()?)?;
    let (tx, rx) = mpsc::channel();
    let parts = VmParts {
        ram,
        vcpus,
        cpuid: None,
        serial_out: serial_out(a.serial_out.as_ref(), a.serial_fd)?,
        guest_kind: spec.kind(),
        generation: 0,
    };
    let core = VmCore::create(kvm_handle, parts, tx)?;
    load_guest(&core, &spec)?;
    cpr_vmm::seccomp::prepare()?;
    let vmm = Vmm::new(Arc::clone(&core), RunState::Running);
    spawn_vcpu_threads(&core)?;
    if let Some(l) = listener {
        serve(Arc::clone(&vmm), l)?;
    }
    // Every other thread runs; none inherits this one's list.
    cpr_vmm::seccomp::install(cpr_vmm::seccomp::ThreadClass::Main)?;
    core.coord.resume();
    Ok((vmm, rx))
}

fn incoming(a: &RunArgs) -> Result<(Arc<Vmm>, mpsc::Receiver<ExitReason>)> {
    let cpr = inherited_fd(a.cpr_fd.unwrap_or(-1), "cpr")?;
    let main = inherited_fd(a.main_fd.unwrap_or(-1), "main")?;
    let commit = inherited_fd(a.commit_fd.unwrap_or(-1), "commit")?;
    let listener = control_listener(a)?;
    let kvm = a.kvm_fd.map(|fd| inherited_fd(fd, "kvm")).transpose()?;
    let (tx, rx) = mpsc::channel();
    let options = cpr_vmm::migration::IncomingOptions { dump_state: a.dump_state.clone(), prefault: !a.no_prefault };
    // The control thread and this thread's filter, before the new VMM says ready (see
    // `prepare_incoming`).
    let vmm = cpr_vmm::migration::prepare_incoming(cpr, main, commit, tx, options, kvm, |vmm| {
        if let Some(l) = listener {
            serve(Arc::clone(vmm), l)?;
        }
        cpr_vmm::seccomp::install(cpr_vmm::seccomp::ThreadClass::Main)
    })?;
    Ok((vmm, rx))
}

fn describe_state(path: &PathBuf) -> Result<()> {
    let bytes =
        std::fs::read(path).map_err(|e| VmmError::StateRejected(format!("cannot read {}: {e}", path.display())))?;
    let d =
        cpr_vmm::migration::decode(&bytes).map_err(|e| VmmError::StateRejected(format!("{}: {e}", path.display())))?;
    print!("{}", cpr_vmm::migration::describe(&d, bytes.len()));
    Ok(())
}

fn run(cli: Cli) -> Result<ExitCode> {
    if let Some(Command::Handoff(h)) = cli.command {
        let exe = std::env::current_exe().map_err(|e| VmmError::Internal(format!("current_exe: {e}")))?;
        let mut req = HandoffRequest::new(h.control, h.new_control, h.binary.unwrap_or(exe));
        req.timeout_ms = h.timeout_ms;
        if let Some(path) = h.dump_state {
            req.extra_args = vec!["--dump-state".into(), path.to_string_lossy().into_owned()];
        }
        let generation = cpr_proto::client::ControlClient::connect(&req.old_control)
            .ok()
            .and_then(|c| match c.call(&cpr_proto::control::Request::Status, &[]) {
                Ok(cpr_proto::control::Response::Status(s)) => Some(s.generation),
                _ => None,
            })
            .unwrap_or(0);
        let out = hand_off(&req, &mut NoJournal, generation).map_err(|f| match f.phase {
            Phase::RolledBack => VmmError::Handoff(f.reason),
            _ => VmmError::Rollback(f.reason),
        })?;
        let r = out.report;
        println!(
            "handoff ok: generation {} new pid {} downtime {} us (state {} bytes)",
            r.generation,
            r.new_pid,
            r.downtime_ns() / 1000,
            r.state_bytes
        );
        return Ok(ExitCode::Ok);
    }
    let a = &cli.run;
    if a.state_formats {
        print!("{}", cpr_proto::state::StateFormats::this_build().render());
        return Ok(ExitCode::Ok);
    }
    if let Some(path) = &a.describe_state {
        describe_state(path)?;
        return Ok(ExitCode::Ok);
    }
    if a.no_warm_up {
        cpr_vmm::migration::disable_warm_up();
    }
    if a.no_spin {
        cpr_vmm::migration::disable_spin();
    }
    cpr_vmm::percpu::set_vcpu_state_threads(a.vcpu_state_threads);
    let (vmm, rx) = if a.incoming { incoming(a)? } else { boot(a)? };
    let reason = rx.recv().unwrap_or(ExitReason::Stopped);
    vmm.core.coord.request_exit();
    if let Some(p) = &a.control {
        let _ = std::fs::remove_file(p);
    }
    Ok(match reason {
        ExitReason::Stopped | ExitReason::HandedOff | ExitReason::GuestReset => ExitCode::Ok,
        ExitReason::GuestSelfCheck(code) => {
            eprintln!("cpr-vmm: error: guest self-check failed: {}", vmm.core.guest_failure(code));
            ExitCode::GuestSelfCheck
        }
        ExitReason::GuestCrashed(why) => {
            eprintln!("cpr-vmm: error: guest crashed: {why}");
            ExitCode::GuestCrashed
        }
        ExitReason::Fatal(e) => {
            eprintln!("cpr-vmm: error: {e}");
            e.exit_code()
        }
    })
}

#[allow(clippy::exit)]
fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cpr-vmm: error: {e}");
            e.exit_code()
        }
    };
    std::process::exit(i32::from(code as u8));
}
