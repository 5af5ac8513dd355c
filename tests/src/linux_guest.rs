//! The Linux test guest for the QEMU tests: Debian's stock kernel (extracted by
//! `scripts/setup-host`, never installed) and an initramfs built here from busybox-static, the
//! probe (`tests/guest/probe.c`) and the kernel's e1000 module. Under QEMU with `accel=tcg` on
//! the development machines (their `/dev/kvm` cannot boot a stock kernel); the same guest runs
//! under `accel=kvm` on hardware-assisted hosts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The cache directory of `scripts/setup-host`.
pub fn cache_dir() -> PathBuf {
    PathBuf::from(std::env::var("CPRD_CACHE").unwrap_or_else(|_| "/var/cache/cprd-ci".into()))
}

/// The guest kernel (`CPRD_TEST_KERNEL`, else the cached stock Debian kernel).
pub fn kernel() -> PathBuf {
    let k = std::env::var("CPRD_TEST_KERNEL").map_or_else(|_| cache_dir().join("kernel/vmlinuz"), PathBuf::from);
    assert!(k.exists(), "{} is missing: run scripts/setup-host", k.display());
    k
}

/// The probe initramfs, built once per test process into the target directory.
pub fn initramfs() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = crate::bin_dir().join(format!("probe-initramfs-{}.cpio.gz", std::process::id()));
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build-initramfs");
            let ko = cache_dir().join("kernel/e1000.ko");
            assert!(ko.exists(), "{} is missing: run scripts/setup-host", ko.display());
            let o = Command::new(script).arg(&out).arg(&ko).output().expect("run build-initramfs");
            assert!(o.status.success(), "build-initramfs failed: {}", String::from_utf8_lossy(&o.stderr));
            out
        })
        .clone()
}

/// QEMU's binary for the tests.
pub fn qemu() -> PathBuf {
    let q = PathBuf::from("/usr/bin/qemu-system-x86_64");
    assert!(q.exists(), "{} is missing: run scripts/setup-host (QEMU >= 10.0 from bookworm-backports)", q.display());
    q
}

/// A VM definition (`vms/NAME.toml` body) for the probe guest under QEMU with TCG.
pub fn vm_definition(memory: &str, extra: &str) -> String {
    format!(
        "backend = \"qemu\"\nmemory = {memory:?}\naccel = \"tcg\"\nkernel = {:?}\ninitrd = {:?}\n\
         cmdline = \"console=ttyS0 quiet panic=-1 probe_mib=8\"\n{extra}",
        kernel().display().to_string(),
        initramfs().display().to_string()
    )
}

/// One line of the probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeLine {
    /// The guest's boot id.
    pub boot: String,
    /// Sequence number (one per 20 ms of guest time).
    pub seq: u64,
    /// The longest gap the guest saw on its own clock so far, µs.
    pub maxgap_us: u64,
    /// The gap since the previous line on the guest's clock, µs.
    pub gap_us: u64,
    /// Checksum of the probe's RAM region.
    pub sum: String,
    /// The guest's uptime (CLOCK_MONOTONIC), ms.
    pub up_ms: u64,
    /// Local timer interrupts the guest has taken, all CPUs (`None` from an older probe).
    pub timer_irqs: Option<u64>,
}

/// Parses the probe's periodic lines out of console text.
pub fn probe_lines(text: &str) -> Vec<ProbeLine> {
    // Only complete lines: the console log is read while the guest may be half-way through one.
    let complete = text.rfind('\n').map_or("", |end| &text[..end + 1]);
    split_kernel_messages(complete).0.lines().filter_map(probe_line).collect()
}

/// The length of a kernel log timestamp (`[   12.345678] `) at the start of `s`, if there is one.
fn timestamp_len(s: &str) -> Option<usize> {
    let inner = s.strip_prefix('[')?;
    let end = inner.find("] ")?;
    let (secs, frac) = inner[..end].trim_start().split_once('.')?;
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    (digits(secs) && digits(frac)).then_some(end + 3)
}

/// Separates the kernel's messages from the rest of console text: `(the rest, the messages)`.
/// The kernel prints a message (`[ seconds] text\n`) to the serial console whole, under the
/// port's lock, but it may land in the middle of a line that user space is writing through
/// the tty; the rest of that line follows it. Both are put back together here.
pub fn split_kernel_messages(text: &str) -> (String, Vec<String>) {
    let mut rest = String::with_capacity(text.len());
    let mut messages = Vec::new();
    let mut s = text;
    while let Some(at) = s.find('[') {
        rest.push_str(&s[..at]);
        let from = &s[at..];
        match (timestamp_len(from), from.find('\n')) {
            (Some(_), Some(nl)) => {
                messages.push(from[..nl].trim_end_matches('\r').to_string());
                s = &from[nl + 1..];
            }
            _ => {
                rest.push('[');
                s = &from[1..];
            }
        }
    }
    rest.push_str(s);
    (rest, messages)
}

/// Parses one whole probe line (without its newline), if it is one.
pub fn probe_line(line: &str) -> Option<ProbeLine> {
    let l = line.trim_end_matches('\r');
    let rest = l.strip_prefix("PROBE boot=")?;
    let mut f = rest.split_whitespace();
    let boot = f.next()?.to_string();
    let mut get = |k: &str| f.next().and_then(|x| x.strip_prefix(k)).map(str::to_string);
    let seq = get("seq=")?.parse().ok()?;
    let up_ms = get("up_ms=")?.parse().ok()?;
    let gap_us = get("gap_us=")?.parse().ok()?;
    let maxgap_us = get("maxgap_us=")?.parse().ok()?;
    let sum = get("sum=")?;
    let timer_irqs = get("loc=").and_then(|n| n.parse().ok());
    Some(ProbeLine { boot, seq, maxgap_us, gap_us, sum, up_ms, timer_irqs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_message_printed_into_a_probe_line_is_taken_out_of_it() {
        let text = "[    0.5] early\nPROBE boot=b seq=1 up_ms=1 gap_us=2 maxgap_us=3 sum=ab lo\
                    [   35.123456] hrtimer: interrupt took 5 ns\r\nc=7\nPROBE boot=b seq=2 up_ms=2 gap_us=2 \
                    maxgap_us=3 sum=ab loc=9 [x]\n";
        let (rest, messages) = split_kernel_messages(text);
        assert_eq!(messages, ["[    0.5] early", "[   35.123456] hrtimer: interrupt took 5 ns"]);
        assert!(rest.starts_with("PROBE boot=b seq=1"), "{rest}");
        let lines = probe_lines(text);
        assert_eq!(lines.iter().map(|l| l.timer_irqs).collect::<Vec<_>>(), [Some(7), Some(9)]);
    }

    #[test]
    fn a_line_still_being_written_is_not_read() {
        let line = |seq: u64, sum: &str| format!("PROBE boot=b seq={seq} up_ms=1 gap_us=2 maxgap_us=3 sum={sum}");
        let text = format!("{}\n{}\n{}", line(1, "abcd"), line(2, "abcd"), &line(3, "abcd")[..40]);
        let got = probe_lines(&text);
        assert_eq!(got.iter().map(|l| l.seq).collect::<Vec<_>>(), [1, 2]);
    }
}

/// The lines of console text that are not whole probe lines with every field: kernel messages,
/// and probe lines something was written into or cut out of (for failure messages).
pub fn odd_lines(text: &str) -> Vec<String> {
    let (rest, mut odd) = split_kernel_messages(text);
    odd.extend(rest.lines().filter(|l| probe_line(l).is_none_or(|p| p.timer_irqs.is_none())).map(str::to_string));
    odd
}

/// Checks probe lines: one boot, sequence numbers without a hole, one checksum.
pub fn check_probe(lines: &[ProbeLine]) -> Result<(), String> {
    let first = lines.first().ok_or("no probe lines")?;
    for w in lines.windows(2) {
        if w[1].boot != first.boot {
            return Err(format!("boot id changed: {} then {} (the guest rebooted)", first.boot, w[1].boot));
        }
        if w[1].seq != w[0].seq + 1 {
            return Err(format!("sequence jumps from {} to {}", w[0].seq, w[1].seq));
        }
        if w[1].sum != first.sum {
            return Err(format!("RAM checksum changed at seq {}: {} then {}", w[1].seq, first.sum, w[1].sum));
        }
    }
    Ok(())
}

/// Checks that the guest's local timer ticked between any two probe lines (each line reports
/// the count, and it grows from line to line).
pub fn check_timer_ticks(lines: &[ProbeLine]) -> Result<(), String> {
    if let Some(l) = lines.iter().find(|l| l.timer_irqs.is_none()) {
        return Err(format!("probe line seq={} has no timer count (loc=)", l.seq));
    }
    let ticks: Vec<u64> = lines.iter().filter_map(|l| l.timer_irqs).collect();
    if ticks.windows(2).any(|w| w[1] <= w[0]) {
        return Err(format!("the local timer did not tick between every two lines: {ticks:?}"));
    }
    Ok(())
}

/// A network namespace the test created (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    /// Its name.
    pub name: String,
}

impl NetNs {
    /// Creates `cprdtest-<pid>-<tag>`, replacing one of that name a killed run of the same PID
    /// left behind (nothing else makes that name).
    pub fn create(tag: &str) -> Self {
        let name = format!("cprdtest-{}-{tag}", std::process::id());
        if Path::new("/run/netns").join(&name).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
        let ok = Command::new("ip").args(["netns", "add", &name]).status().is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name} failed");
        Self { name }
    }

    /// Its path, for cprd's `nic.netns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip ...` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> bool {
        Command::new("ip").args(["-n", &self.name]).args(args).status().is_ok_and(|s| s.success())
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it creates stay there).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A TCP connection to the probe guest's echo server (10.0.2.15, port 7), made from inside the
/// network namespace of the guest's tap, whose host side the test addressed 10.0.2.1/24.
#[derive(Debug)]
pub struct Echo(std::net::TcpStream);

impl Echo {
    /// Connects, trying for 20 s while the guest brings its network up.
    pub fn connect(ns: &NetNs) -> Self {
        let conn = ns.run(|| {
            let mut last = None;
            for _ in 0..100 {
                match std::net::TcpStream::connect_timeout(
                    &"10.0.2.15:7".parse().expect("addr"),
                    std::time::Duration::from_secs(2),
                ) {
                    Ok(c) => return c,
                    Err(e) => last = Some(e),
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            panic!("cannot connect to the guest: {last:?}");
        });
        conn.set_read_timeout(Some(std::time::Duration::from_secs(30))).expect("timeout");
        Self(conn)
    }

    /// Sends a line of about 1 KiB numbered `n` and checks that the guest sends it back whole.
    pub fn check(&mut self, n: u32) {
        use std::io::{Read, Write};
        let msg = format!("ping {n} {}\n", "x".repeat(1000));
        self.0.write_all(msg.as_bytes()).expect("send");
        let mut back = vec![0u8; msg.len()];
        self.0.read_exact(&mut back).unwrap_or_else(|e| panic!("echo {n}: {e}"));
        assert_eq!(back, msg.as_bytes(), "echo {n}");
    }
}
