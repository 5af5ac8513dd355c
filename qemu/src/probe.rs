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

/// Starts `binary` with no machine, asks it over QMP, and stops it. `scratch` is a directory
/// for the probe's QMP socket.
pub fn probe(
    binary: &cpr_spawn::Executable,
    machine: &str,
    scratch: &Path,
    timeout: Duration,
) -> Result<ProbeReport, ProbeError> {
    let name = binary.path().display().to_string();
    let not_qemu = |why: String| ProbeError::NotQemu(name.clone(), why);
    let sock = scratch.join(format!("probe-{}-{}.sock", std::process::id(), crate::transfer::unique()));
    let listener =
        crate::spawn::listen_at(&sock).map_err(|e| not_qemu(format!("cannot bind {}: {e}", sock.display())))?;
    let args: Vec<String> = [
        "-machine",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-S",
        "-chardev",
        &format!("socket,id=qmp,fd={},server=on,wait=off", crate::cmdline::QMP_FD),
        "-mon",
        "chardev=qmp,mode=control",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let output = scratch.join(format!("probe-{}-{}.out", std::process::id(), crate::transfer::unique()));
    let out_file = std::fs::File::create(&output).ok();
    let child = crate::spawn::spawn(binary, &args, &[(crate::cmdline::QMP_FD, listener.as_fd())], out_file, None);
    drop(listener);
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
        let deadline = Instant::now() + timeout;
        let mut qmp = loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(not_qemu(format!("it exited ({status}) instead of serving QMP{}", said())));
            }
            match std::os::unix::net::UnixStream::connect(&sock) {
                Ok(s) => match Qmp::negotiate(s, deadline.saturating_duration_since(Instant::now())) {
                    Ok(q) => break q,
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
                },
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(not_qemu(format!("no QMP within {timeout:?}: {e}"))),
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
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&output);
    result
}
