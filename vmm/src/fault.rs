//! Fault injection for the handoff tests, through the `CPR_VMM_FAULT` environment variable.
//!
//! These are the faults a test cannot produce for real on one host: a byte flipped in transit
//! on a local socket, a truncated stream, a stream from a newer format, a new binary that reads
//! an older format, and a new VMM that stops at an exact point of its restore (so that a test can
//! `SIGKILL` it there, or let the old side's timeout fire). Each is named for what it imitates;
//! nothing else in the VMM changes behaviour. Unset (production), every function is a no-op.
//!
//! Values: `stall:<point>` with point one of `before-ready`, `after-ready`, `after-state`,
//! `during-restore`, `after-loaded` (the new VMM stops itself with `SIGSTOP` there); `forbidden-syscall`
//! (see [`forbidden_syscall`]); `lie-pid:<n>` (see [`claimed_pid`]); `corrupt:<how>` with how one
//! of `flip`, `truncate`, `crc`, `unknown-section`, `major` (the old VMM damages the stream it
//! sends); `reads-format:<n>` (the new VMM claims to read only format major n); `reject-state` (the new VMM
//! refuses the state it receives).

/// The variable that selects a fault.
pub const ENV: &str = "CPR_VMM_FAULT";

fn value() -> Option<String> {
    std::env::var(ENV).ok().filter(|v| !v.is_empty())
}

/// Stops this process with `SIGSTOP` if the fault `stall:<point>` is selected.
pub fn stall_point(point: &str) {
    if value().is_some_and(|v| v.strip_prefix("stall:") == Some(point)) {
        eprintln!("cpr-vmm: fault injection: stopping at {point}");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    }
}

/// With the fault `forbidden-syscall` selected, a vCPU thread makes a call outside its seccomp
/// list a fifth of a second after it first runs the guest (an `execve` of `/bin/true`, what a
/// compromised VMM would try): the filter must kill the process with `SIGSYS`; without one the
/// VMM would become `/bin/true` and exit 0.
pub fn forbidden_syscall() {
    if value().as_deref() != Some("forbidden-syscall") {
        return;
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    eprintln!("cpr-vmm: fault injection: a vCPU thread calls execve");
    let path = c"/bin/true";
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    // SAFETY: NUL-terminated path and NULL-terminated argument and environment arrays.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
}

/// The pid this VMM says it has: its own, or with the fault `lie-pid:<n>` selected, `n` (a VMM
/// taken over by its guest could say anything about itself).
pub fn claimed_pid() -> u32 {
    value().and_then(|v| v.strip_prefix("lie-pid:").and_then(|n| n.parse().ok())).unwrap_or_else(std::process::id)
}

/// Whether the `reject-state` fault is selected: the new VMM refuses every state stream, as a
/// binary with a stricter reader would.
pub fn reject_state() -> bool {
    value().as_deref() == Some("reject-state")
}

/// State format majors this binary says it reads (overridden by `reads-format:<n>`).
pub fn reads_formats() -> Vec<u16> {
    if let Some(n) = value().and_then(|v| v.strip_prefix("reads-format:").and_then(|n| n.parse().ok())) {
        return vec![n];
    }
    cpr_proto::state::READS_FORMATS.to_vec()
}

/// Damages an outgoing state stream if a `corrupt:<how>` fault is selected.
pub fn corrupt_stream(stream: Vec<u8>, rebuild: impl Fn(u16, Option<(u16, bool)>) -> Vec<u8>) -> Vec<u8> {
    let Some(how) = value().and_then(|v| v.strip_prefix("corrupt:").map(str::to_string)) else {
        return stream;
    };
    eprintln!("cpr-vmm: fault injection: corrupting the state stream ({how})");
    let mut s = stream;
    match how.as_str() {
        "flip" => {
            let mid = s.len() / 2;
            s[mid] ^= 0x01;
            s
        }
        "truncate" => {
            s.truncate(s.len() / 2);
            s
        }
        "crc" => {
            let n = s.len();
            s[n - 1] ^= 0xff;
            s
        }
        "unknown-section" => rebuild(cpr_proto::state::FORMAT_MAJOR, Some((0x7777, true))),
        "major" => rebuild(cpr_proto::state::FORMAT_MAJOR + 1, None),
        _ => s,
    }
}
