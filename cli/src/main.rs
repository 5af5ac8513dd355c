//! cprctl, the command-line client of cprd (over D-Bus, `org.cprd1`).
//!
//! Exit codes: 0 ok, 1 other failure, 2 usage, 3 no such VM, 4 invalid argument, 5 not
//! allowed, 6 incompatible, 7 busy, 8 upgrade failed (rolled back), 9 rollback failed,
//! 10 access denied, 11 cannot reach cprd, 12 start failed.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;
use zbus::{Connection, proxy};

#[proxy(interface = "org.cprd1.Manager", default_service = "org.cprd1", default_path = "/org/cprd1")]
trait Manager {
    #[zbus(name = "ListVMs")]
    fn list_vms(&self) -> zbus::Result<Vec<(String, String, String, u64)>>;
    #[zbus(name = "GetVM")]
    fn get_vm(&self, name: &str) -> zbus::Result<zbus::OwnedObjectPath>;
    #[zbus(name = "StartVM")]
    fn start_vm(&self, name: &str) -> zbus::Result<()>;
    #[zbus(name = "StopVM")]
    fn stop_vm(&self, name: &str, force: bool) -> zbus::Result<()>;
    #[zbus(name = "PauseVM")]
    fn pause_vm(&self, name: &str) -> zbus::Result<()>;
    #[zbus(name = "ResumeVM")]
    fn resume_vm(&self, name: &str) -> zbus::Result<()>;
    #[zbus(name = "UpgradeVM")]
    fn upgrade_vm(&self, name: &str, binary: &str) -> zbus::Result<(u64, u64)>;
    #[zbus(name = "UpgradeAll")]
    fn upgrade_all(&self, binary: &str) -> zbus::Result<Vec<(String, bool, u64, String)>>;
    #[zbus(name = "Reload")]
    fn reload(&self) -> zbus::Result<()>;
    #[zbus(name = "GetHistory")]
    fn get_history(&self) -> zbus::Result<Vec<(String, u64, u64, bool, u64, String)>>;
    #[zbus(name = "GetMetrics")]
    fn get_metrics(&self) -> zbus::Result<String>;
    #[zbus(name = "GetUpgrades")]
    #[allow(clippy::type_complexity)]
    fn get_upgrades(&self) -> zbus::Result<Vec<(String, u64, u64, bool, u64, String, String, String)>>;
}

#[proxy(interface = "org.cprd1.VM", default_service = "org.cprd1")]
trait Vm {
    #[zbus(property, name = "State")]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property, name = "Backend")]
    fn backend(&self) -> zbus::Result<String>;
    #[zbus(property, name = "Generation")]
    fn generation(&self) -> zbus::Result<u64>;
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
    #[zbus(property, name = "VMMBinary")]
    fn vmm_binary(&self) -> zbus::Result<String>;
    #[zbus(property, name = "VMMVersion")]
    fn vmm_version(&self) -> zbus::Result<String>;
    #[zbus(property, name = "MemoryBytes")]
    fn memory_bytes(&self) -> zbus::Result<u64>;
    #[zbus(property, name = "VCPUs")]
    fn vcpus(&self) -> zbus::Result<u32>;
    #[zbus(property, name = "LastDowntimeUSec")]
    fn last_downtime_usec(&self) -> zbus::Result<u64>;
    #[zbus(property, name = "ConsoleLog")]
    fn console_log(&self) -> zbus::Result<String>;
    #[zbus(property, name = "StateReason")]
    fn state_reason(&self) -> zbus::Result<String>;
    #[zbus(property, name = "MachineType")]
    fn machine_type(&self) -> zbus::Result<String>;
    #[zbus(property, name = "VMMRelease")]
    fn vmm_release(&self) -> zbus::Result<String>;
    #[zbus(property, name = "UpgradeDue")]
    fn upgrade_due(&self) -> zbus::Result<bool>;
}

/// The version `--version` prints: the package's (`CPRD_BUILD_STAMP`, set by packaging/build),
/// else the crate's. Packages of different versions thus carry binaries with different build ids.
const VERSION: &str = match option_env!("CPRD_BUILD_STAMP") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// cprctl: list, start, stop and upgrade the VMs that cprd owns.
#[derive(Debug, Parser)]
#[command(name = "cprctl", version = VERSION, about)]
struct Cli {
    /// Bus address (default: DBUS_SYSTEM_BUS_ADDRESS, then the system bus).
    #[arg(long, global = true)]
    address: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List VMs.
    List,
    /// Show one VM.
    Status {
        /// VM name.
        name: String,
    },
    /// Start a VM.
    Start {
        /// VM name.
        name: String,
    },
    /// Stop a VM.
    Stop {
        /// VM name.
        name: String,
        /// Kill the VMM instead of asking it to stop.
        #[arg(long)]
        force: bool,
    },
    /// Pause a running VM's guest (its VMM keeps it; `resume` runs it again).
    Pause {
        /// VM name.
        name: String,
    },
    /// Run a paused VM's guest again; or make the VMM of a VM that needs attention run its
    /// guest again (an operator's decision: the guest is as it was when the handoff paused it).
    Resume {
        /// VM name.
        name: String,
    },
    /// Hand a VM (or all, with --all) to a new VMM process, live.
    Upgrade {
        /// VM name.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Upgrade every running VM.
        #[arg(long)]
        all: bool,
        /// The VMM binary (default: the configured one).
        #[arg(long, default_value = "")]
        binary: String,
    },
    /// Past upgrades with their downtimes.
    History,
    /// Print cprd's metrics (Prometheus text format), or write them atomically into a file (for
    /// node_exporter's textfile collector: `--output /var/lib/prometheus/node-exporter/cprd.prom`).
    Metrics {
        /// Write into this file (through a temporary file and a rename) instead of printing.
        #[arg(long)]
        output: Option<std::path::PathBuf>,
    },
    /// Re-read cprd's configuration.
    Reload,
    /// Ask cprd's control socket whether cprd answers (starts it where cprd.socket is enabled).
    Ping {
        /// The control socket.
        #[arg(long, default_value = "/run/cprd/cprd.sock")]
        socket: std::path::PathBuf,
    },
    /// Print a VM's serial console and follow it (read-only).
    Console {
        /// VM name.
        name: String,
    },
    /// Write cprctl's man page and shell completions into DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Output directory.
        dir: std::path::PathBuf,
    },
}

/// Writes `DIR/cprctl.1` and completions for bash, zsh and fish.
fn generate_docs(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let cmd = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    std::fs::write(dir.join("cprctl.1"), page)?;
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "cprctl", dir)?;
    }
    Ok(())
}

/// Maps a D-Bus error to cprctl's exit code.
fn exit_code(e: &zbus::Error) -> u8 {
    let name = match e {
        zbus::Error::MethodError(name, _, _) => name.as_str().to_string(),
        zbus::Error::FDO(f) => match **f {
            zbus::fdo::Error::AccessDenied(_) => "org.freedesktop.DBus.Error.AccessDenied".into(),
            zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_) => "unreachable".into(),
            _ => String::new(),
        },
        zbus::Error::InputOutput(_) | zbus::Error::Address(_) | zbus::Error::Handshake(_) => "unreachable".into(),
        _ => String::new(),
    };
    match name.rsplit('.').next().unwrap_or("") {
        "NoSuchVM" => 3,
        "InvalidArgument" => 4,
        "NotAllowed" => 5,
        "Incompatible" => 6,
        "Busy" => 7,
        "UpgradeFailed" => 8,
        "RollbackFailed" => 9,
        "AccessDenied" => 10,
        "unreachable" | "ServiceUnknown" | "NameHasNoOwner" => 11,
        "StartFailed" => 12,
        _ => 1,
    }
}

fn describe(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, Some(msg), _) => format!("{msg} ({name})"),
        other => other.to_string(),
    }
}

async fn connect(address: Option<&str>) -> zbus::Result<Connection> {
    let address = address.map(str::to_string).or_else(|| std::env::var("DBUS_SYSTEM_BUS_ADDRESS").ok());
    match address {
        Some(a) => zbus::connection::Builder::address(a.as_str()).build().await,
        None => Connection::system().await,
    }
}

async fn vm_proxy<'a>(conn: &'a Connection, m: &ManagerProxy<'a>, name: &str) -> zbus::Result<VmProxy<'a>> {
    let path = m.get_vm(name).await?;
    VmProxy::builder(conn).path(path).build().await
}

/// A failed command: its exit code and message.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl From<zbus::Error> for Failure {
    fn from(e: zbus::Error) -> Self {
        Self { code: exit_code(&e), message: describe(&e) }
    }
}

/// Writes `text` into `path` so that a reader never sees half of it: a temporary file in the
/// same directory, world-readable (metrics are not secret; node_exporter runs as its own user),
/// then renamed over `path`.
fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.file_name().ok_or_else(|| std::io::Error::other("not a file name"))?;
    let tmp = path.with_file_name(format!(".{}.{}", name.to_string_lossy(), std::process::id()));
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o644).open(&tmp)?;
    let written = f.write_all(text.as_bytes()).and_then(|()| f.sync_all());
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

/// `ping` over cprd's control socket (no D-Bus involved).
fn ping(socket: &std::path::Path) -> Result<(), Failure> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket as mksock};
    use std::os::fd::AsFd;
    let unreachable = |e: String| Failure { code: 11, message: format!("{}: {e}", socket.display()) };
    let fd = mksock(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| unreachable(e.to_string()))?;
    let addr = UnixAddr::new(socket).map_err(|e| unreachable(e.to_string()))?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).map_err(|e| unreachable(e.to_string()))?;
    cpr_proto::wire::send(fd.as_fd(), &json!({"request": "ping"}), &[]).map_err(|e| unreachable(e.to_string()))?;
    let answer = cpr_proto::wire::recv::<serde_json::Value>(fd.as_fd(), Some(std::time::Duration::from_secs(60)))
        .map_err(|e| unreachable(e.to_string()))?;
    println!("{}", answer.msg);
    Ok(())
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if let Cmd::Ping { socket } = &cli.command {
        return ping(socket);
    }
    let conn = connect(cli.address.as_deref()).await?;
    let m = ManagerProxy::new(&conn).await?;
    match cli.command {
        Cmd::List => {
            let vms = m.list_vms().await?;
            let mut rows = Vec::new();
            for (name, state, backend, generation) in vms {
                let vm = vm_proxy(&conn, &m, &name).await?;
                let pid = vm.main_pid().await?;
                let downtime = vm.last_downtime_usec().await?;
                rows.push(json!({"name": name, "state": state, "backend": backend, "generation": generation,
                    "main_pid": pid, "last_downtime_usec": downtime}));
            }
            if cli.json {
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!(
                    "{:<20} {:<10} {:<8} {:>10} {:>8} {:>14}",
                    "NAME", "STATE", "BACKEND", "GENERATION", "PID", "DOWNTIME(us)"
                );
                for r in rows {
                    println!(
                        "{:<20} {:<10} {:<8} {:>10} {:>8} {:>14}",
                        r["name"].as_str().unwrap_or(""),
                        r["state"].as_str().unwrap_or(""),
                        r["backend"].as_str().unwrap_or(""),
                        r["generation"].to_string(),
                        r["main_pid"].to_string(),
                        r["last_downtime_usec"].to_string()
                    );
                }
            }
        }
        Cmd::Status { name } => {
            let vm = vm_proxy(&conn, &m, &name).await?;
            let v = json!({
                "name": name, "state": vm.state().await?, "backend": vm.backend().await?,
                "generation": vm.generation().await?, "main_pid": vm.main_pid().await?,
                "vmm_binary": vm.vmm_binary().await?, "vmm_version": vm.vmm_version().await?,
                "memory_bytes": vm.memory_bytes().await?, "vcpus": vm.vcpus().await?,
                "last_downtime_usec": vm.last_downtime_usec().await?, "console_log": vm.console_log().await?,
                "state_reason": vm.state_reason().await?, "machine_type": vm.machine_type().await?,
                "vmm_release": vm.vmm_release().await.unwrap_or_default(),
                "upgrade_due": vm.upgrade_due().await.unwrap_or_default(),
            });
            if cli.json {
                println!("{v}");
            } else if let Some(map) = v.as_object() {
                for (k, val) in map {
                    println!("{k}: {}", val.as_str().map_or_else(|| val.to_string(), str::to_string));
                }
            }
        }
        Cmd::Start { name } => m.start_vm(&name).await?,
        Cmd::Stop { name, force } => m.stop_vm(&name, force).await?,
        Cmd::Pause { name } => m.pause_vm(&name).await?,
        Cmd::Resume { name } => m.resume_vm(&name).await?,
        Cmd::Upgrade { name: Some(name), all: false, binary } => {
            let (downtime, generation) = m.upgrade_vm(&name, &binary).await?;
            if cli.json {
                println!("{}", json!({"name": name, "downtime_usec": downtime, "generation": generation}));
            } else {
                println!("{name}: upgraded to generation {generation}, downtime {downtime} us");
            }
        }
        Cmd::Upgrade { binary, .. } => {
            let results = m.upgrade_all(&binary).await?;
            let failed = results.iter().filter(|r| !r.1).count();
            if cli.json {
                let rows: Vec<_> = results
                    .iter()
                    .map(|(n, ok, d, e)| json!({"name": n, "ok": ok, "downtime_usec": d, "error": e}))
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                for (n, ok, d, e) in &results {
                    if *ok {
                        println!("{n}: ok, downtime {d} us");
                    } else {
                        println!("{n}: FAILED: {e}");
                    }
                }
                println!("{} VMs upgraded, {failed} failed", results.len() - failed);
            }
            if failed > 0 {
                return Err(Failure { code: 8, message: format!("{failed} of {} upgrades failed", results.len()) });
            }
        }
        Cmd::Metrics { output } => {
            let text = m.get_metrics().await?;
            match output {
                None => print!("{text}"),
                Some(path) => write_atomically(&path, &text)
                    .map_err(|e| Failure { code: 1, message: format!("cannot write {}: {e}", path.display()) })?,
            }
        }
        Cmd::History => {
            // A cprd older than `GetUpgrades` (during a package upgrade) still answers `GetHistory`.
            let h = match m.get_upgrades().await {
                Ok(h) => h,
                Err(_) => m
                    .get_history()
                    .await?
                    .into_iter()
                    .map(|(vm, t, g, ok, d, e)| (vm, t, g, ok, d, e, String::new(), String::new()))
                    .collect(),
            };
            if cli.json {
                let rows: Vec<_> = h
                    .iter()
                    .map(|(vm, t, g, ok, d, e, from, to)| {
                        json!({"vm": vm, "time_usec": t, "generation": g, "ok": ok, "downtime_usec": d, "error": e,
                               "from_release": from, "to_release": to})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                // A release's first word is its version (`11.1.3 (Debian ...)`).
                let short = |r: &str| r.split_whitespace().next().unwrap_or("?").to_string();
                println!(
                    "{:<20} {:>10} {:<6} {:>14}  {:<20}  ERROR",
                    "VM", "GENERATION", "RESULT", "DOWNTIME(us)", "RELEASE"
                );
                for (vm, _t, g, ok, d, e, from, to) in h {
                    let release = match (from.is_empty(), ok) {
                        (true, _) => String::new(),
                        (false, true) => format!("{} -> {}", short(&from), short(&to)),
                        (false, false) => short(&from),
                    };
                    println!("{vm:<20} {g:>10} {:<6} {d:>14}  {release:<20}  {e}", if ok { "ok" } else { "failed" });
                }
            }
        }
        Cmd::Reload => m.reload().await?,
        Cmd::Ping { .. } => {}
        Cmd::GenerateDocs { .. } => {}
        Cmd::Console { name } => {
            let vm = vm_proxy(&conn, &m, &name).await?;
            let path = vm.console_log().await?;
            tokio::task::spawn_blocking(move || follow(std::path::Path::new(&path)))
                .await
                .map_err(|e| Failure { code: 1, message: e.to_string() })?;
        }
    }
    Ok(())
}

/// Prints a console log and then what is appended to it, woken by inotify as soon as cprd
/// writes (with a 1 s fallback poll). It follows the log across cprd's rotations: when the path
/// names a new file, the rest of the old one is printed first (it was complete before the new
/// one was made), then the new one from its start; a truncated file is read from its start.
fn follow(path: &std::path::Path) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let identity = |m: std::fs::Metadata| (m.dev(), m.ino());
    // The directory is watched, not the file: its events cover writes to the live file and
    // the rotation that replaces it.
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).ok();
    let watching = inotify.as_ref().is_some_and(|i| {
        i.add_watch(dir, AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO).is_ok()
    });
    let mut current: Option<std::fs::File> = None;
    let mut buf = vec![0u8; 65536];
    // Prints what `f` holds from its position on; false once stdout is gone.
    let mut drain = |f: &mut std::fs::File| -> bool {
        let len = f.metadata().map_or(0, |m| m.len());
        if f.stream_position().is_ok_and(|pos| len < pos) {
            let _ = f.seek(std::io::SeekFrom::Start(0));
        }
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            if std::io::stdout().write_all(&buf[..n]).is_err() {
                return false;
            }
        }
        std::io::stdout().flush().is_ok()
    };
    loop {
        if current.is_none() {
            current = std::fs::File::open(path).ok();
        }
        if let Some(f) = current.as_mut() {
            if !drain(f) {
                return;
            }
            let mine = f.metadata().ok().map(identity);
            if std::fs::metadata(path).ok().map(identity) != mine {
                // Rotated away: finish the old file, then go on with the next newer one, which
                // is the live file unless the log rotated more than once since the last look.
                if !drain(f) {
                    return;
                }
                current = next_newer(path, mine);
                continue;
            }
        }
        match &inotify {
            Some(i) if watching => {
                let mut fds = [nix::poll::PollFd::new(i.as_fd(), nix::poll::PollFlags::POLLIN)];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16));
                let _ = i.read_events();
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

/// The file of a rotated console log written right after the one with `identity` (device,
/// inode), opened: `PATH.k-1` if that file is `PATH.k` now, else none (then the live file is
/// next). The other file is checked to still be `PATH.k` once the newer one is open, so a
/// rotation in between is not mistaken for its successor.
fn next_newer(path: &std::path::Path, identity: Option<(u64, u64)>) -> Option<std::fs::File> {
    use std::os::unix::fs::MetadataExt;
    let rotated = |n: u32| {
        let mut s = path.as_os_str().to_owned();
        s.push(format!(".{n}"));
        std::path::PathBuf::from(s)
    };
    let at = |n: u32| std::fs::metadata(rotated(n)).ok().map(|m| (m.dev(), m.ino()));
    for _ in 0..10 {
        let k = (1..=100).find(|n| identity.is_some() && at(*n) == identity)?;
        let newer = if k == 1 { std::fs::File::open(path).ok()? } else { std::fs::File::open(rotated(k - 1)).ok()? };
        if at(k) == identity {
            return Some(newer);
        }
    }
    None
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::GenerateDocs { dir } = &cli.command {
        return match generate_docs(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cprctl: error: cannot write {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cprctl: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("cprctl: error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
