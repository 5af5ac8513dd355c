//! VMMs outside cprd's cgroup: each VMM process is moved into a transient scope
//! (`cprd-vm-<name>-g<generation>.scope` in `cprd.slice`) through systemd's own D-Bus API, so that
//! stopping, restarting or killing cprd never signals a VMM. Without systemd on the bus
//! (development, the private-bus tests) this is skipped and the VMM stays in its own session.

use std::sync::OnceLock;

use zbus::Connection;

/// The bus connection and runtime used to talk to systemd, when systemd is on cprd's bus.
#[derive(Debug)]
pub struct Scopes {
    conn: Connection,
    runtime: tokio::runtime::Handle,
}

static SCOPES: OnceLock<Scopes> = OnceLock::new();

/// Enables scopes if `org.freedesktop.systemd1` is on the bus.
pub async fn init(conn: &Connection) {
    let Ok(dbus) = zbus::fdo::DBusProxy::new(conn).await else { return };
    let Ok(name) = zbus::names::BusName::try_from("org.freedesktop.systemd1") else { return };
    if dbus.name_has_owner(name).await.unwrap_or(false) {
        let _ = SCOPES.set(Scopes { conn: conn.clone(), runtime: tokio::runtime::Handle::current() });
        tracing::info!("systemd is on the bus: every VMM gets a scope of its own in cprd.slice");
    }
}

/// The scope unit name for a VMM. The VM name is escaped as systemd escapes a unit name's parts
/// (`systemd-escape`): of the characters a VM name may have (`A-Z a-z 0-9 - _`), `-` becomes
/// `\x2d`, so that distinct VMs never share a name (`a-b` and `a_b` once both became `a_b`, and
/// the second VMM stayed in cprd's own cgroup, to die with it).
pub fn unit_name(vm: &str, generation: u64) -> String {
    let escaped: String = vm
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' { c.to_string() } else { format!("\\x{:02x}", u32::from(c)) })
        .collect();
    format!("cprd-vm-{escaped}-g{generation}.scope")
}

/// `CPUWeight=` of the scope of a new VMM while its handoff is in flight: the systemd
/// counterpart of [`crate::sched::HANDOFF_NICE`] (10x a VM's default weight of 100), so that a
/// new VMM starting up does not wait behind every busy guest in `cprd.slice`.
pub const HANDOFF_CPU_WEIGHT: u64 = 1000;

/// `CPUWeight=` unset (systemd's "invalid" weight): the slice's default.
const DEFAULT_CPU_WEIGHT: u64 = u64::MAX;

/// Moves `pid` into a new scope for VM `vm`, generation `generation`; with `cpu_weight`, the
/// scope starts with that `CPUWeight=`. Call from a blocking thread. A failure is logged, never
/// fatal: the VMM keeps running in its own session.
pub fn move_to_scope(vm: &str, generation: u64, pid: u32, cpu_weight: Option<u64>) {
    let Some(s) = SCOPES.get() else { return };
    let unit = unit_name(vm, generation);
    let description = format!("cprd VM {vm}, VMM generation {generation}");
    let mut properties: Vec<(&str, zbus::Variant<'_>)> = vec![
        ("PIDs", zbus::Variant::from(vec![pid])),
        ("Slice", zbus::Variant::from("cprd.slice")),
        ("Description", zbus::Variant::from(description.as_str())),
        ("CollectMode", zbus::Variant::from("inactive-or-failed")),
    ];
    if let Some(weight) = cpu_weight {
        properties.push(("CPUWeight", zbus::Variant::from(weight)));
    }
    let aux: Vec<(&str, Vec<(&str, zbus::Variant<'_>)>)> = Vec::new();
    let body = (unit.as_str(), "fail", properties, aux);
    let call = s.conn.call_method(
        Some("org.freedesktop.systemd1"),
        "/org/freedesktop/systemd1",
        Some("org.freedesktop.systemd1.Manager"),
        "StartTransientUnit",
        &body,
    );
    match s.runtime.block_on(call) {
        // StartTransientUnit returns once the start job is queued; systemd moves the process
        // when the job runs. Wait for that, so that "runs in" is true when this returns (a
        // caller checking the VMM's cgroup right after `cprctl start` saw cprd.service's).
        Ok(_) if in_unit_cgroup(pid, &unit, SCOPE_JOB_WAIT) => {
            tracing::info!(CPRD_VM = vm, "VMM pid {pid} runs in {unit}");
        }
        Ok(_) => tracing::warn!(CPRD_VM = vm, "VMM pid {pid} is not in {unit} after {SCOPE_JOB_WAIT:?}"),
        Err(e) => tracing::warn!(CPRD_VM = vm, "cannot move VMM pid {pid} to {unit}: {e}"),
    }
}

/// How long [`move_to_scope`] waits for systemd to run the scope's start job.
const SCOPE_JOB_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits up to `limit` until process `pid`'s cgroup (`/proc/PID/cgroup`, any hierarchy) is the
/// one of `unit`; false if it is not by then or the process is gone.
fn in_unit_cgroup(pid: u32, unit: &str, limit: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
            Ok(cgroups) if cgroups.lines().any(|l| l.ends_with(&format!("/{unit}"))) => return true,
            Ok(_) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(5)),
            _ => return false,
        }
    }
}

/// Puts the scope of VM `vm`, generation `generation` back at the slice's default CPU weight
/// (its VMM now runs the guest). Call from a blocking thread; a failure is logged.
pub fn settle_weight(vm: &str, generation: u64) {
    let Some(s) = SCOPES.get() else { return };
    let unit = unit_name(vm, generation);
    let properties: Vec<(&str, zbus::Variant<'_>)> = vec![("CPUWeight", zbus::Variant::from(DEFAULT_CPU_WEIGHT))];
    let body = (unit.as_str(), true, properties);
    let call = s.conn.call_method(
        Some("org.freedesktop.systemd1"),
        "/org/freedesktop/systemd1",
        Some("org.freedesktop.systemd1.Manager"),
        "SetUnitProperties",
        &body,
    );
    if let Err(e) = s.runtime.block_on(call) {
        tracing::warn!(CPRD_VM = vm, "cannot put {unit} back at the default CPU weight: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct VM names give distinct units, escaped as systemd itself escapes (the real
    /// `systemd-escape`).
    #[test]
    fn unit_names_are_systemd_escaped_and_never_collide() {
        let names = ["a-b", "a_b", "ab", "a--b", "A-1_z"];
        let units: std::collections::BTreeSet<String> = names.iter().map(|n| unit_name(n, 3)).collect();
        assert_eq!(units.len(), names.len(), "{units:?}");
        for name in names {
            let out = std::process::Command::new("systemd-escape").arg(name).output().expect("systemd-escape");
            let escaped = String::from_utf8_lossy(&out.stdout).trim().to_string();
            assert_eq!(unit_name(name, 3), format!("cprd-vm-{escaped}-g3.scope"), "{name}");
        }
    }
}
