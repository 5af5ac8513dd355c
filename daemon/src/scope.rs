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

/// The scope unit name for a VMM.
pub fn unit_name(vm: &str, generation: u64) -> String {
    let escaped: String = vm.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("cprd-vm-{escaped}-g{generation}.scope")
}

/// Moves `pid` into a new scope for VM `vm`, generation `generation`. Call from a blocking
/// thread. A failure is logged, never fatal: the VMM keeps running in its own session.
pub fn move_to_scope(vm: &str, generation: u64, pid: u32) {
    let Some(s) = SCOPES.get() else { return };
    let unit = unit_name(vm, generation);
    let description = format!("cprd VM {vm}, VMM generation {generation}");
    let properties: Vec<(&str, zbus::Variant<'_>)> = vec![
        ("PIDs", zbus::Variant::from(vec![pid])),
        ("Slice", zbus::Variant::from("cprd.slice")),
        ("Description", zbus::Variant::from(description.as_str())),
        ("CollectMode", zbus::Variant::from("inactive-or-failed")),
    ];
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
        Ok(_) => tracing::info!(CPRD_VM = vm, "VMM pid {pid} runs in {unit}"),
        Err(e) => tracing::warn!(CPRD_VM = vm, "cannot move VMM pid {pid} to {unit}: {e}"),
    }
}
