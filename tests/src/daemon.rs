//! A private system-type `dbus-daemon` and a `cprd` on it, for daemon tests and the demo.
//! Both are started from the test's own temporary directory and killed by PID on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::{bin, bin_dir, wait_until};

/// A private `dbus-daemon` configured from the stock `/usr/share/dbus-1/system.conf`, with only
/// its listen address, pid file and policy directory changed, and cprd's policy file included.
#[derive(Debug)]
pub struct PrivateBus {
    /// The bus address.
    pub address: String,
    /// The daemon's PID; 0 once it was killed (it is not our child, so its PID may be reused by
    /// then: it must not be signalled again).
    pid: std::sync::atomic::AtomicI32,
}

impl PrivateBus {
    /// Starts the bus in `dir`.
    pub fn start(dir: &Path) -> Self {
        let policy_dir = dir.join("system.d");
        std::fs::create_dir_all(&policy_dir).expect("policy dir");
        let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../units/dbus/org.cprd1.conf");
        std::fs::copy(policy, policy_dir.join("org.cprd1.conf")).expect("copy policy");
        let stock = std::fs::read_to_string("/usr/share/dbus-1/system.conf").expect("stock system.conf");
        let socket = dir.join("bus");
        let conf: String = stock
            .lines()
            .filter(|l| !l.trim_start().starts_with("<user>"))
            .filter(|l| !l.contains("<includedir>/etc/dbus-1/system.d</includedir>"))
            .map(|l| {
                if l.contains("<listen>") {
                    format!("  <listen>unix:path={}</listen>", socket.display())
                } else if l.contains("<pidfile>") {
                    format!("  <pidfile>{}</pidfile>", dir.join("bus.pid").display())
                } else if l.contains("<includedir>system.d</includedir>") {
                    format!("  <includedir>{}</includedir>", policy_dir.display())
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let conf_path = dir.join("bus.conf");
        std::fs::write(&conf_path, conf).expect("bus.conf");
        let out = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf_path.display()))
            .args(["--fork", "--print-address=1", "--print-pid=1"])
            .output()
            .expect("start dbus-daemon");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        let address = lines.next().unwrap_or_default().to_string();
        let pid = lines.next().and_then(|p| p.trim().parse().ok()).unwrap_or(0);
        assert!(out.status.success() && pid > 0, "dbus-daemon failed: {}", String::from_utf8_lossy(&out.stderr));
        // Let other users (the uid 65534 tests) reach the socket.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        Self { address, pid: std::sync::atomic::AtomicI32::new(pid) }
    }

    /// Sends `signal` to the daemon, once at most.
    fn signal_once(&self, signal: nix::sys::signal::Signal) {
        let pid = self.pid.swap(0, std::sync::atomic::Ordering::SeqCst);
        if pid > 0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }
}

impl PrivateBus {
    /// Ends the bus daemon now (SIGKILL), as a crash of the system bus would.
    pub fn kill(&self) {
        self.signal_once(nix::sys::signal::Signal::SIGKILL);
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        self.signal_once(nix::sys::signal::Signal::SIGTERM);
    }
}

/// A cprd process on a private bus with its own config and runtime directories.
#[derive(Debug)]
pub struct Cprd {
    /// The process.
    pub child: Child,
    /// The bus address.
    pub address: String,
    /// Config directory.
    pub config_dir: PathBuf,
    /// Runtime directory.
    pub runtime_dir: PathBuf,
    /// Log file (stderr).
    pub log: PathBuf,
}

/// Writes a cprd configuration allowing this build's binaries and `extra_allowed`.
pub fn write_config(dir: &Path, extra_allowed: &[&str]) -> PathBuf {
    let config_dir = dir.join("etc");
    std::fs::create_dir_all(config_dir.join("vms")).expect("config dir");
    let mut allowed = vec![format!("{}/*", bin_dir().display())];
    allowed.extend(extra_allowed.iter().map(ToString::to_string));
    let allowed: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
    let text = format!(
        "[vmm]\nallowed = [{}]\ndefault = {:?}\n\n[handoff]\ntimeout_ms = 15000\n",
        allowed.join(", "),
        bin("cpr-vmm").display().to_string()
    );
    std::fs::write(config_dir.join("cprd.toml"), text).expect("cprd.toml");
    config_dir
}

/// Writes `vms/NAME.toml`.
pub fn define_vm(config_dir: &Path, name: &str, body: &str) {
    std::fs::write(config_dir.join("vms").join(format!("{name}.toml")), body).expect("vm definition");
}

impl Cprd {
    /// Starts cprd and waits until it owns `org.cprd1`.
    pub fn start(dir: &Path, bus: &PrivateBus, config_dir: &Path) -> Self {
        Self::start_with_env(dir, bus, config_dir, &[])
    }

    /// [`Cprd::start`] with extra environment (for instance `NOTIFY_SOCKET`).
    pub fn start_with_env(dir: &Path, bus: &PrivateBus, config_dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_program(&bin("cprd"), dir, bus, config_dir, env, None)
    }

    /// [`Cprd::start_with_env`] from the cprd binary at `program` (a copy a test may replace),
    /// started with `umask` when given (else the test's own).
    pub fn start_program(
        program: &Path,
        dir: &Path,
        bus: &PrivateBus,
        config_dir: &Path,
        env: &[(&str, &str)],
        umask: Option<u32>,
    ) -> Self {
        let runtime_dir = dir.join("run");
        let log = dir.join("cprd.log");
        let mut cmd = Command::new(program);
        cmd.arg("--bus-address")
            .arg(&bus.address)
            .arg("--config-dir")
            .arg(config_dir)
            .arg("--runtime-dir")
            .arg(&runtime_dir)
            .arg("--vendor-config-dir")
            .arg(dir.join("vendor"))
            .env("CPRD_STDERR", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log"));
        if let Some(mask) = umask {
            use std::os::unix::process::CommandExt;
            // SAFETY: umask is async-signal-safe and touches nothing but the child.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask);
                    Ok(())
                });
            }
        }
        // Started as a service manager starts a daemon: leading a session of its own.
        cpr_spawn::place_fds(&mut cmd, &[], true).expect("a session of its own");
        let child = cmd.spawn().expect("start cprd");
        let mut c =
            Self { child, address: bus.address.clone(), config_dir: config_dir.to_path_buf(), runtime_dir, log };
        // Up: on the bus, and done re-attaching what a previous cprd left (those VMs are
        // `starting` until then; cprd takes its bus name first).
        let up = wait_until(Duration::from_secs(30), || {
            c.child.try_wait().ok().flatten().is_some() || {
                let out = c.cprctl(&["--json", "list"]);
                out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("\"starting\"")
            }
        });
        assert!(up && c.child.try_wait().ok().flatten().is_none(), "cprd did not come up: {}", c.log_text());
        c
    }

    /// cprd's log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `cprctl --address <bus> args…`.
    pub fn cprctl(&self, args: &[&str]) -> Output {
        self.cprctl_command(args).output().expect("run cprctl")
    }

    /// `cprctl --address <bus> args…`, not started yet.
    pub fn cprctl_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("cprctl"));
        c.arg("--address").arg(&self.address).args(args);
        c
    }

    /// Runs `busctl --address <bus> args…`, as uid `uid` when given.
    pub fn busctl(&self, uid: Option<u32>, args: &[&str]) -> Output {
        let mut cmd = match uid {
            Some(u) => {
                let mut c = Command::new("setpriv");
                c.args([&format!("--reuid={u}"), &format!("--regid={u}"), "--clear-groups", "busctl"]);
                c
            }
            None => Command::new("busctl"),
        };
        cmd.arg(format!("--address={}", self.address)).args(args).output().expect("run busctl")
    }

    /// Kills cprd with SIGKILL (its VMMs keep running) and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Cprd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Stops, by PID, every VMM whose runtime record is under `runtime_dir` (test cleanup).
pub fn kill_vmms(runtime_dir: &Path) {
    let Ok(rd) = std::fs::read_dir(runtime_dir.join("vms")) else { return };
    for e in rd.filter_map(Result::ok) {
        let Ok(text) = std::fs::read_to_string(e.path()) else { continue };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
        if let Some(pid) = v["main_pid"].as_i64().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// The control socket of `vm`'s VMM, from cprd's runtime record under `runtime_dir`.
pub fn vmm_control(runtime_dir: &Path, vm: &str) -> Option<PathBuf> {
    let record = std::fs::read(runtime_dir.join("vms").join(format!("{vm}.json"))).ok()?;
    let record: serde_json::Value = serde_json::from_slice(&record).ok()?;
    record["control"].as_str().map(PathBuf::from)
}

/// The test guest's counter and failure code, as the VMM at `control` reports them (within 5 s).
pub fn test_guest_counter(control: &Path) -> Option<(u64, u64)> {
    use cpr_proto::control::{Request, Response};
    let client = cpr_proto::client::ControlClient::connect(control).ok()?.with_timeout(Some(Duration::from_secs(5)));
    match client.call(&Request::Status, &[]) {
        Ok(Response::Status(st)) => st.test_guest.map(|t| (t.counter, t.fail)),
        _ => None,
    }
}

/// Output as text, for messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
