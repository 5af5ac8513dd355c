//! Pre-flight of a candidate QEMU binary, before any running guest is touched: it must start,
//! speak QMP, be version 10.0 or newer (`cpr-transfer`), know the VM's pinned machine type and
//! have that machine's `aux-ram-share` option. It also finds what the binary can do beyond that
//! ([`Features`]) by asking it and trying it, never from its version number.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::qmp::{Qmp, Version};

/// What a QEMU can do beyond cpr-transfer over UNIX-socket channels it binds itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// As the new QEMU, it takes a cpr channel that is a listening socket it inherits
    /// (QEMU >= 10.1), tried out with a real one (see [`takes_fd_cpr_channel`]).
    pub fd_cpr_channel: bool,
    /// It has the `cpr-exec` mode (QEMU >= 10.2): its migration parameters include
    /// `cpr-exec-command`.
    pub cpr_exec: bool,
}

/// What a candidate binary is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// QEMU's version.
    pub version: Version,
    /// QEMU's package string.
    pub package: String,
    /// What it can do.
    pub features: Features,
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
        let mut report =
            ProbeReport { version: qmp.version, package: qmp.package.clone(), features: Features::default() };
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
        report.features.cpr_exec =
            qmp.execute("query-migrate-parameters", None).is_ok_and(|p| p.get("cpr-exec-command").is_some());
        let _ = qmp.execute("quit", None);
        Ok(report)
    })();
    // Time to quit by itself; the drop kills it otherwise.
    qemu.wait_exit(Duration::from_secs(2));
    let mut report = result?;
    report.features.fd_cpr_channel = takes_fd_cpr_channel(binary, scratch, timeout, sandbox);
    Ok(report)
}

/// Tries whether `binary` takes an fd-type cpr channel: starts it (no machine) with a listening
/// socket as its cpr channel, connects to that socket, lets go of cprd's copy of the listener and
/// ends its side of the connection. A QEMU that takes the channel accepts the connection and
/// reads end-of-file (cprd then reads end-of-file too; QEMU exits, "Not a migration stream");
/// one that does not exits without accepting, and the unaccepted connection is reset (QEMU
/// 10.0.2: "bad cpr channel socket type; must be unix"). Anything else counts as no.
pub fn takes_fd_cpr_channel(
    binary: &cpr_spawn::Executable,
    scratch: &Path,
    timeout: Duration,
    sandbox: Option<&cpr_spawn::Sandbox>,
) -> bool {
    use std::io::Read;
    use std::os::fd::AsFd;
    let base = scratch.join(format!("probe-{}-{}", std::process::id(), crate::transfer::unique()));
    let (sock, out) = (base.with_extension("cpr.sock"), base.with_extension("cpr.out"));
    let Ok(listener) = crate::spawn::listen_at(&sock) else { return false };
    let cpr = serde_json::json!({
        "channel-type": "cpr",
        "addr": { "transport": "socket", "type": "fd", "str": crate::cmdline::CPR_CHANNEL_FD.to_string() }
    });
    let args: Vec<String> =
        ["-machine", "none", "-nodefaults", "-no-user-config", "-display", "none", "-incoming", "defer"]
            .iter()
            .map(ToString::to_string)
            .chain(["-incoming".to_string(), cpr.to_string()])
            .collect();
    let spawned = crate::spawn::spawn(
        binary,
        &args,
        &[(crate::cmdline::CPR_CHANNEL_FD, listener.as_fd())],
        std::fs::File::create(&out).ok(),
        sandbox,
    );
    let connected = std::os::unix::net::UnixStream::connect(&sock);
    drop(listener);
    let _ = std::fs::remove_file(&sock);
    let Ok(mut child) = spawned else {
        let _ = std::fs::remove_file(&out);
        return false;
    };
    let takes = connected.is_ok_and(|mut stream| {
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let _ = stream.set_read_timeout(Some(timeout));
        matches!(stream.read(&mut [0u8; 1]), Ok(0))
    });
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&out);
    takes
}
