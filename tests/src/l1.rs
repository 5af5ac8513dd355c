//! The L1 test machine: hardware-style KVM on TCG-emulated AMD SVM. A QEMU TCG VM (`-cpu EPYC`,
//! which has SVM with nested paging) boots Debian's stock kernel, whose unmodified `kvm_amd`
//! gives a `/dev/kvm` on the normal SVM code path; inside it, `cpr-vmm` boots real Linux guests
//! (L2), which this machine's own `/dev/kvm` (`kvm_pvm`) cannot. Each run boots L1 once with an
//! initramfs built by `tests/l1/build-initramfs` (busybox, the kvm-amd modules, the L2 kernels and
//! probe initramfs, this build's binaries, and the test's script as `/l1/run.sh`), lets the script
//! run, and returns both consoles: L1's (the script's output) and a second serial port, which the
//! script may give a guest (`/dev/ttyS1`). One emulated CPU: L1 and everything in it run on one
//! host thread.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::linux_guest::{cache_dir, qemu};

/// What one L1 run left.
#[derive(Debug)]
pub struct L1Run {
    /// L1's console: the script's output, then `L1-DONE rc=N`.
    pub console: String,
    /// The second serial port (`/dev/ttyS1` in L1).
    pub second_console: String,
    /// The script's exit code (`None`: L1 never said, it was killed at the timeout or crashed).
    pub rc: Option<i32>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
    /// What the L1 QEMU printed on its stderr.
    pub qemu_stderr: String,
}

impl L1Run {
    /// Everything, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "L1 ran {:.1} s, rc {:?}\n--- L1 console ---\n{}\n--- second console (tail) ---\n{}\n--- QEMU ---\n{}",
            self.elapsed.as_secs_f64(),
            self.rc,
            self.console,
            tail(&self.second_console, 60),
            self.qemu_stderr
        )
    }

    /// The value of `KEY=` on the first line of L1's console that starts with `prefix`.
    pub fn value(&self, prefix: &str, key: &str) -> Option<String> {
        let line = self.console.lines().find(|l| l.starts_with(prefix))?;
        line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))).map(str::to_string)
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Kills a QEMU this harness started (by its pid) if the run ends early.
struct Guard(Option<std::process::Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Boots L1 with `script` as `/l1/run.sh` and the workspace binaries `binaries` in `/bin`, and
/// waits until it powers off (or `timeout`, when it is killed).
pub fn run(script: &str, binaries: &[&str], timeout: Duration) -> L1Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let script_path = dir.path().join("run.sh");
    std::fs::write(&script_path, script).expect("write run.sh");
    let initrd = dir.path().join("l1.cpio.gz");
    let builder = Path::new(env!("CARGO_MANIFEST_DIR")).join("l1/build-initramfs");
    let bins: Vec<PathBuf> = binaries.iter().map(|b| crate::bin(b)).collect();
    let out = Command::new(&builder)
        .arg(&initrd)
        .arg(&script_path)
        .args(&bins)
        .env("CPRD_CACHE", cache_dir())
        .output()
        .expect("run tests/l1/build-initramfs");
    assert!(out.status.success(), "tests/l1/build-initramfs failed: {}", String::from_utf8_lossy(&out.stderr));
    let console = dir.path().join("console");
    let second = dir.path().join("second");
    let kernel = cache_dir().join("kernel/vmlinuz");
    let started = Instant::now();
    let child = Command::new(qemu())
        .args(["-accel", "tcg", "-M", "pc", "-cpu", "EPYC", "-smp", "1", "-m", "2G"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", second.display()))
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("qemu-stderr")).expect("qemu-stderr"))
        .spawn()
        .expect("start the L1 QEMU");
    let mut guard = Guard(Some(child));
    // Past the timeout the guard kills it: `rc` then stays `None`.
    let _ = crate::wait_until(timeout, || guard.0.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some()));
    drop(guard);
    let console = String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).replace('\r', "");
    let second_console = String::from_utf8_lossy(&std::fs::read(&second).unwrap_or_default()).replace('\r', "");
    let rc = console.lines().find_map(|l| l.strip_prefix("L1-DONE rc=")).and_then(|n| n.trim().parse().ok());
    let qemu_stderr = std::fs::read_to_string(dir.path().join("qemu-stderr")).unwrap_or_default();
    L1Run { console, second_console, rc, elapsed: started.elapsed(), qemu_stderr }
}
