//! Harness for the system tests: finds the built binaries, starts and cleans up VMM processes
//! (by PID, never by name), and reads what the guests print.
//!
//! Which `/dev/kvm` a test needs is said where it matters: every test here runs on the
//! development machines' `kvm_pvm` (CPL3 test guest) as well as on hardware-assisted KVM,
//! except those that boot Linux under cpr-vmm, which need hardware-assisted KVM and say so.

use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use cpr_proto::client::ControlClient;
use cpr_proto::control::{Request, Response, VmmStatus};
use cpr_testguest::Heartbeat;

/// The directory holding the workspace's built binaries (`target/<profile>`), found from the
/// running executable (a test in `target/<profile>/deps/`, or a tool in `target/<profile>/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable directory");
    if dir.ends_with("deps") { dir.parent().unwrap_or(dir).to_path_buf() } else { dir.to_path_buf() }
}

/// Path of a workspace binary; the test command builds them first (`cargo build --workspace`).
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace` before the tests", path.display());
    path
}

/// The directory of the previous release's binaries (`cprd`, `cprctl`, `cpr-vmm`), built from
/// its commit and cached by `scripts/previous-release` (which `scripts/setup-host` runs).
pub fn previous_release_bin_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/previous-release");
        let out = Command::new(script).output().expect("run scripts/previous-release");
        assert!(out.status.success(), "scripts/previous-release failed: {}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

/// Whether this run is CI, where a missing environment is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether `/dev/kvm` is hardware-assisted (VMX/SVM) rather than `kvm_pvm`.
pub fn hardware_kvm() -> bool {
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    (module("kvm_intel") || module("kvm_amd")) && !module("kvm_pvm")
}

/// Asserts that `/dev/kvm` is usable (every test of this crate runs guests on it).
pub fn require_kvm() {
    assert!(Path::new("/dev/kvm").exists(), "/dev/kvm is missing: these tests run real guests and cannot be skipped");
}

/// Writes `contents` to `path` as an executable (mode 0755): a test's fake or wrapper binary.
pub fn write_executable(path: &Path, contents: impl AsRef<[u8]>) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// The heartbeat lines in a serial output file.
pub fn heartbeats(serial: &Path) -> Vec<Heartbeat> {
    Heartbeat::all_in(&std::fs::read_to_string(serial).unwrap_or_default())
}

/// Checks that heartbeats are numbered 1, 2, 3, … with no gap or repeat, with one checksum and
/// a counter that grows; returns a description of the first violation.
pub fn check_heartbeats(hbs: &[Heartbeat]) -> Result<(), String> {
    let first = hbs.first().ok_or("no heartbeat at all")?;
    for (i, w) in hbs.windows(2).enumerate() {
        if w[1].seq != w[0].seq + 1 {
            return Err(format!("heartbeat {} follows {} (line {})", w[1].seq, w[0].seq, i + 2));
        }
        if w[1].counter <= w[0].counter {
            return Err(format!("counter went from {:#x} to {:#x}", w[0].counter, w[1].counter));
        }
        if w[1].pattern_sum != first.pattern_sum {
            return Err(format!("pattern checksum changed at heartbeat {}", w[1].seq));
        }
    }
    if first.seq != 1 {
        return Err(format!("first heartbeat is {} (the counter was reset or lines were lost)", first.seq));
    }
    Ok(())
}

/// A cpr-vmm process started by a test, killed and reaped on drop.
#[derive(Debug)]
pub struct VmmProcess {
    /// The process (a child of the test).
    pub child: Child,
    /// Its control socket.
    pub control: PathBuf,
    /// Its serial output file.
    pub serial: PathBuf,
    /// Its stderr file.
    pub stderr: PathBuf,
}

impl VmmProcess {
    /// Starts `cpr-vmm` with `args` plus `--control` and `--serial-out` in `dir`, and waits for
    /// its control socket.
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> Self {
        Self::start_with_env(dir, name, args, &[])
    }

    /// [`VmmProcess::start`] with extra environment variables (fault injection).
    pub fn start_with_env(dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_program(&bin("cpr-vmm"), dir, name, args, env)
    }

    /// [`VmmProcess::start_with_env`] of the cpr-vmm binary at `program` (another release's).
    pub fn start_program(program: &Path, dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let control = dir.join(format!("{name}.sock"));
        let serial = dir.join(format!("{name}.serial"));
        let stderr = dir.join(format!("{name}.stderr"));
        let child = Command::new(program)
            .args(args)
            .arg("--control")
            .arg(&control)
            .arg("--serial-out")
            .arg(&serial)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start cpr-vmm");
        let mut p = Self { child, control, serial, stderr };
        // Up means listening: the socket file appears at bind(), a moment before listen().
        let listening = |p: &Self| ControlClient::connect(&p.control).is_ok();
        let up = wait_until(Duration::from_secs(20), || listening(&p) || p.child.try_wait().ok().flatten().is_some());
        assert!(up && listening(&p), "cpr-vmm did not come up: {}", p.stderr_text());
        p
    }

    /// What the process wrote to stderr.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// One control request.
    pub fn call(&self, request: &Request) -> Response {
        let client = ControlClient::connect(&self.control).expect("connect to control socket");
        client.call(request, &[]).expect("control call")
    }

    /// The VMM's status.
    pub fn status(&self) -> VmmStatus {
        match self.call(&Request::Status) {
            Response::Status(s) => s,
            other => panic!("status answered {other:?}"),
        }
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < end, "cpr-vmm pid {} did not exit within {timeout:?}", self.child.id());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `cpr-vmm` to completion with `args`, optionally with `fd` placed at fd 3.
pub fn run_vmm(args: &[&str], fd3: Option<&dyn AsRawFd>, timeout: Duration) -> (ExitStatus, String) {
    let mut cmd = Command::new(bin("cpr-vmm"));
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    if let Some(fd) = fd3 {
        let raw = fd.as_raw_fd();
        // SAFETY: dup2 between fork and exec is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                // dup2 onto itself keeps FD_CLOEXEC, so clear it explicitly in that case.
                let rc = if raw == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(raw, 3) };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().expect("start cpr-vmm");
    let end = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cpr-vmm {args:?} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    (status, err)
}

/// The exit code, or a description of the signal that ended the process.
pub fn code(status: ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// A guest handed from VMM process to VMM process; every generation is a child of the test.
#[derive(Debug)]
pub struct Chain {
    /// The directory holding sockets, serial output and stderr files.
    pub dir: PathBuf,
    /// The VMM process currently running the guest.
    pub current: Child,
    /// Its control socket.
    pub control: PathBuf,
    /// The serial output all generations append to.
    pub serial: PathBuf,
    /// PIDs of every generation, in order.
    pub pids: Vec<u32>,
    /// Reports of the completed handoffs.
    pub reports: Vec<cpr_proto::control::HandoffReport>,
}

impl Chain {
    /// Boots generation 0 in `dir` with `args` (and `env` for fault injection).
    pub fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_program(&bin("cpr-vmm"), dir, args, env)
    }

    /// [`Chain::start`] with generation 0 run by the cpr-vmm binary at `program`.
    pub fn start_program(program: &Path, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut first = VmmProcess::start_program(program, dir, "vm", args, env);
        assert!(wait_until(Duration::from_secs(20), || first.status().test_guest.is_some()), "guest never initialised");
        let child = std::mem::replace(&mut first.child, Command::new("true").spawn().expect("placeholder"));
        let control = first.control.clone();
        let serial = first.serial.clone();
        let _ = first.child.wait();
        std::mem::forget(first);
        Self { dir: dir.to_path_buf(), pids: vec![child.id()], current: child, control, serial, reports: Vec::new() }
    }

    /// A request for the next handoff, to be adjusted by the caller.
    pub fn request(&self) -> cpr_handoff::cpr_vmm::HandoffRequest {
        let generation = self.pids.len();
        let mut req = cpr_handoff::cpr_vmm::HandoffRequest::new(
            self.control.clone(),
            self.dir.join(format!("vm.{generation}.sock")),
            bin("cpr-vmm"),
        );
        req.stderr = Some(self.dir.join(format!("vm.{generation}.stderr")));
        req
    }

    /// Performs `req`; on success the new process becomes current and the old one is reaped.
    pub fn hand_off(&mut self, req: &cpr_handoff::cpr_vmm::HandoffRequest) -> Result<(), String> {
        self.try_hand_off(req).map_err(|f| f.reason)
    }

    /// Like [`Chain::hand_off`], with the phase a failed handoff ended in.
    pub fn try_hand_off(
        &mut self,
        req: &cpr_handoff::cpr_vmm::HandoffRequest,
    ) -> Result<(), cpr_handoff::cpr_vmm::HandoffFailure> {
        let generation = self.pids.len() as u64 - 1;
        let out = cpr_handoff::cpr_vmm::hand_off(req, &mut cpr_handoff::NoJournal, generation)?;
        let mut old = std::mem::replace(&mut self.current, out.child);
        let exited = wait_until(Duration::from_secs(10), || old.try_wait().ok().flatten().is_some());
        assert!(exited, "old VMM pid {} did not exit after quit", old.id());
        self.pids.push(self.current.id());
        self.control = req.new_control.clone();
        self.reports.push(out.report);
        Ok(())
    }

    /// Status of the current VMM.
    pub fn status(&self) -> VmmStatus {
        match self.call(&Request::Status) {
            Response::Status(s) => s,
            other => panic!("status answered {other:?}"),
        }
    }

    /// One request to the current VMM, on a connection of its own.
    pub fn call(&self, request: &Request) -> Response {
        let client = ControlClient::connect(&self.control).expect("connect to control socket");
        client.call(request, &[]).expect("control request")
    }

    /// Waits until the guest's counter passes `counter` (it runs), and returns the new value.
    pub fn wait_progress(&self, counter: u64) -> u64 {
        let mut now = 0;
        let moved = wait_until(Duration::from_secs(10), || {
            now = self.status().test_guest.map_or(0, |t| t.counter);
            now > counter
        });
        assert!(moved, "guest counter stuck at {now:#x} (was {counter:#x})");
        now
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        if self.current.try_wait().ok().flatten().is_none() {
            let _ = self.current.kill();
            let _ = self.current.wait();
        }
    }
}

/// The state letter of process `pid` in /proc (`R`, `S`, `T`, `Z`, …), if it exists.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next())
}

/// Whether process `pid` is a zombie (exited, not reaped: state `Z` in /proc).
pub fn is_zombie(pid: u32) -> bool {
    proc_state(pid) == Some('Z')
}

/// Whether process `pid` has exited: gone from /proc, or a zombie not reaped yet.
pub fn process_gone(pid: u32) -> bool {
    matches!(proc_state(pid), None | Some('Z'))
}

/// The thread ids of process `pid`, which must exist.
fn live_thread_ids(pid: u32) -> Vec<u32> {
    let tids = cpr_vmm::sched::thread_ids(pid);
    assert!(!tids.is_empty(), "process {pid} has no threads in /proc (gone?)");
    tids
}

/// The EEVDF slice of every thread of process `pid`, in nanoseconds (`se.slice` in /proc).
pub fn thread_slices(pid: u32) -> Vec<u64> {
    live_thread_ids(pid).into_iter().map(|tid| cpr_vmm::sched::thread_slice_ns(pid, tid).expect("se.slice")).collect()
}

/// The nice value of every thread of process `pid` (field 19 of each thread's `stat`).
pub fn thread_nices(pid: u32) -> Vec<i64> {
    live_thread_ids(pid)
        .into_iter()
        .map(|tid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).expect("stat");
            let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            after_comm.split_whitespace().nth(16).and_then(|n| n.parse().ok()).expect("nice field")
        })
        .collect()
}

/// Whether process `pid` is stopped (state `T` in /proc).
pub fn is_stopped(pid: u32) -> bool {
    proc_state(pid) == Some('T')
}
/// Private bus and cprd helpers.
pub mod chaos;
/// Real systemd in a container.
pub mod container;
pub mod daemon;
/// The L1 test machine: hardware-style KVM on TCG-emulated AMD SVM.
pub mod l1;
pub mod linux_guest;
