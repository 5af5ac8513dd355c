//! Pre-flight of a candidate QEMU binary, before any running guest is touched: it must start,
//! speak QMP, be version 10.0 or newer (`cpr-transfer`), know the VM's pinned machine type and
//! have that machine's `aux-ram-share` option.

use std::path::Path;
use std::time::Duration;

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
    let mut args = vec!["-machine".to_string(), "none".to_string()];
    args.extend(crate::spawn::question_args());
    let output = scratch.join(format!("probe-{}-{}.out", std::process::id(), crate::transfer::unique()));
    let (mut qemu, monitor) = crate::spawn::Questioned::start(binary, &args, output, sandbox).map_err(not_qemu)?;
    let said = |q: &crate::spawn::Questioned| q.last_line().map(|l| format!("; it said: {l}")).unwrap_or_default();
    let result = (|| {
        let mut qmp = match Qmp::negotiate(monitor, timeout) {
            Ok(q) => q,
            Err(e) => {
                let how =
                    qemu.wait_exit(Duration::from_secs(1)).map(|s| format!(", it exited ({s})")).unwrap_or_default();
                return Err(not_qemu(format!("{e}{how}{}", said(&qemu))));
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
    // Time to quit by itself; the drop kills it otherwise.
    qemu.wait_exit(Duration::from_secs(2));
    result
}
