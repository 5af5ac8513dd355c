//! Pre-flight of a candidate QEMU binary, before any running guest is touched: it must start,
//! speak QMP, be version 10.0 or newer (`cpr-transfer`), know the VM's pinned machine type and
//! have that machine's `aux-ram-share` option.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::qmp::{Qmp, Version};

/// What a candidate binary is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// QEMU's version.
    pub version: Version,
    /// QEMU's package string.
    pub package: String,
}

impl ProbeReport {
    /// One string naming the build (`10.0.2 (Debian 1:10.0.2+ds-2...)`).
    pub fn describe(&self) -> String {
        if self.package.is_empty() { self.version.to_string() } else { format!("{} ({})", self.version, self.package) }
    }
}

/// Why a binary cannot take a guest over.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProbeError {
    /// It did not start or did not speak QMP.
    #[error("{0} is not a working QEMU: {1}")]
    NotQemu(String, String),
    /// It is older than 10.0.
    #[error("{binary} is QEMU {version}; cpr-transfer needs QEMU {}.{} or newer", crate::MIN_VERSION.0, crate::MIN_VERSION.1)]
    TooOld {
        /// The binary.
        binary: String,
        /// Its version.
        version: Version,
    },
    /// It lacks the machine type or one of its options.
    #[error("{0}")]
    Missing(String),
}

/// Starts `binary` with no machine (in `sandbox` when given), asks it over QMP, and stops it.
/// `scratch` is a directory for what it prints.
pub fn probe(
    binary: &cpr_spawn::Executable,
    machine: &str,
    scratch: &Path,
    timeout: Duration,
    sandbox: Option<&cpr_spawn::Sandbox>,
) -> Result<ProbeReport, ProbeError> {
    let name = binary.path().display().to_string();
    let not_qemu = |why: String| ProbeError::NotQemu(name.clone(), why);
    // One connection made before QEMU starts: a client that connects to a listening QMP socket
    // while QEMU is still starting races its monitor's move to the I/O thread (a second greeting,
    // or a hang: fixed upstream after 10.1); a connected socket is never accepted, so never raced.
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| not_qemu(format!("cannot make a socket pair: {e}")))?;
    let args: Vec<String> = [
        "-machine",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-S",
        "-chardev",
        &format!("socket,id=qmp,fd={}", crate::cmdline::QMP_FD),
        "-mon",
        "chardev=qmp,mode=control",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let output = scratch.join(format!("probe-{}-{}.out", std::process::id(), crate::transfer::unique()));
    let out_file = std::fs::File::create(&output).ok();
    let child = crate::spawn::spawn(binary, &args, &[(crate::cmdline::QMP_FD, theirs.as_fd())], out_file, sandbox);
    drop(theirs);
    let said = || {
        let text = std::fs::read_to_string(&output).unwrap_or_default();
        text.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| format!("; it said: {}", l.trim()))
            .unwrap_or_default()
    };
    let mut child = child.map_err(|e| not_qemu(format!("cannot run it: {e}")))?;
    let result = (|| {
        let mut qmp = match Qmp::negotiate(ours, timeout) {
            Ok(q) => q,
            Err(e) => {
                let end = Instant::now() + Duration::from_secs(1);
                let mut exit = None;
                while exit.is_none() && Instant::now() < end {
                    exit = child.try_wait().ok().flatten();
                    std::thread::sleep(Duration::from_millis(10));
                }
                let how = exit.map(|s| format!(", it exited ({s})")).unwrap_or_default();
                return Err(not_qemu(format!("{e}{how}{}", said())));
            }
        };
        let report = ProbeReport { version: qmp.version, package: qmp.package.clone() };
        if (report.version.major, report.version.minor) < crate::MIN_VERSION {
            return Err(ProbeError::TooOld { binary: name.clone(), version: report.version });
        }
        let machines = qmp.execute("query-machines", None).map_err(|e| not_qemu(e.to_string()))?;
        let known = machines
            .as_array()
            .is_some_and(|ms| ms.iter().any(|m| m.get("name").and_then(Value::as_str) == Some(machine)));
        if !known {
            return Err(ProbeError::Missing(format!("{name} has no machine type {machine}")));
        }
        let props = qmp
            .execute("qom-list-properties", Some(json!({ "typename": format!("{machine}-machine") })))
            .map_err(|e| ProbeError::Missing(format!("{name} cannot list the options of {machine}: {e}")))?;
        let has_aux = props
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p.get("name").and_then(Value::as_str) == Some("aux-ram-share")));
        if !has_aux {
            return Err(ProbeError::Missing(format!("{name}: machine {machine} has no aux-ram-share option")));
        }
        let _ = qmp.execute("quit", None);
        Ok(report)
    })();
    let end = Instant::now() + Duration::from_secs(2);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&output);
    result
}
