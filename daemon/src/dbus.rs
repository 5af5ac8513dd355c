//! The D-Bus API, `org.cprd1`: thin adapters over the [`Engine`].
//!
//! Reading is for everyone; every mutating method checks that the caller is root or in the
//! `cprd` group (the bus policy says the same; this is the second line of defence).

use std::sync::Arc;

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, interface};

use crate::engine::{Engine, Event};
use crate::error::CprdError;

/// Object path of the manager.
pub const MANAGER_PATH: &str = "/org/cprd1";

/// The object path of a VM: `/org/cprd1/vm/<name>` with every byte outside `[A-Za-z0-9]`
/// written as `_xx` (hex), as systemd escapes unit names.
pub fn vm_path(name: &str) -> String {
    let mut p = String::from("/org/cprd1/vm/");
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() {
            p.push(char::from(b));
        } else {
            p.push_str(&format!("_{b:02x}"));
        }
    }
    p
}

/// Runs blocking engine work off the async executor.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, CprdError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| CprdError::InvalidArgument(format!("internal error: {e}")))
}

/// Checks that the sender may change things: uid 0, or a member of group `cprd`.
async fn authorize(conn: &Connection, header: &Header<'_>) -> Result<(), CprdError> {
    let sender = header.sender().ok_or_else(|| CprdError::AccessDenied("a call without a sender".into()))?;
    let dbus = zbus::fdo::DBusProxy::new(conn).await.map_err(CprdError::ZBus)?;
    let uid = dbus
        .get_connection_unix_user(sender.clone().into())
        .await
        .map_err(|e| CprdError::AccessDenied(format!("cannot identify the caller: {e}")))?;
    let mut subject = std::collections::HashMap::new();
    subject.insert("name", zbus::Variant::from(sender.as_str()));
    if uid == 0 || in_cprd_group(uid) || polkit_allows(conn, ("system-bus-name", subject)).await {
        return Ok(());
    }
    Err(denied(uid))
}

/// Checks that a local process (a caller on another socket than the bus: the varlink sockets of
/// [`crate::machine_instance`]) may change things, by the same rule as [`authorize`]: uid 0, a
/// member of group `cprd`, or polkit's `org.cprd1.manage` for that process.
pub async fn authorize_process(conn: &Connection, uid: u32, pid: u32) -> Result<(), CprdError> {
    if uid == 0 || in_cprd_group(uid) {
        return Ok(());
    }
    // polkit names a process by pid and start time, so that a recycled pid is not mistaken.
    let start_time = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|stat| {
        stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(19)?.parse::<u64>().ok())
    });
    if let Some(start_time) = start_time {
        let mut subject = std::collections::HashMap::new();
        subject.insert("pid", zbus::Variant::from(pid));
        subject.insert("start-time", zbus::Variant::from(start_time));
        subject.insert("uid", zbus::Variant::from(i32::try_from(uid).unwrap_or(-1)));
        if polkit_allows(conn, ("unix-process", subject)).await {
            return Ok(());
        }
    }
    Err(denied(uid))
}

fn denied(uid: u32) -> CprdError {
    CprdError::AccessDenied(format!(
        "uid {uid} may not change VMs; only root, members of group cprd and callers polkit authorizes for org.cprd1.manage may"
    ))
}

/// A polkit subject: its kind and details.
type Subject<'a> = (&'a str, std::collections::HashMap<&'a str, zbus::Variant<'a>>);

/// polkit's `(is_authorized, is_challenge, details)`.
type AuthorizationResult = (bool, bool, std::collections::HashMap<String, String>);

/// Asks polkit, where it runs on this bus, whether `subject` may perform `org.cprd1.manage`.
async fn polkit_allows(conn: &Connection, subject: Subject<'_>) -> bool {
    const POLKIT: &str = "org.freedesktop.PolicyKit1";
    let Ok(dbus) = zbus::fdo::DBusProxy::new(conn).await else { return false };
    let Ok(name) = zbus::names::BusName::try_from(POLKIT) else { return false };
    if !dbus.name_has_owner(name).await.unwrap_or(false) {
        return false;
    }
    let details: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    let reply = conn
        .call_method(
            Some(POLKIT),
            "/org/freedesktop/PolicyKit1/Authority",
            Some("org.freedesktop.PolicyKit1.Authority"),
            "CheckAuthorization",
            &(subject, "org.cprd1.manage", details, 0u32, ""),
        )
        .await;
    let Ok(reply) = reply else { return false };
    let parsed: zbus::Result<AuthorizationResult> = reply.body().deserialize();
    parsed.is_ok_and(|(authorized, _, _)| authorized)
}

fn in_cprd_group(uid: u32) -> bool {
    let Ok(Some(group)) = nix::unistd::Group::from_name("cprd") else { return false };
    let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else { return false };
    user.gid == group.gid || group.mem.contains(&user.name)
}

/// `org.cprd1.Manager` at `/org/cprd1`.
#[derive(Debug)]
pub struct Manager {
    /// The engine.
    pub engine: Arc<Engine>,
}

/// The longest VMM binary path a caller may pass (PATH_MAX).
pub const MAX_BINARY_ARG: usize = 4096;

/// Checks a VM name from a caller before anything else sees it: 1 to 64 characters of
/// `A-Z a-z 0-9 - _` (the names `vms/NAME.toml` may have). The error quotes none of it, only its
/// length: a reply or a log line never echoes unbounded input (a 7 MiB name quoted with `{:?}`
/// made a reply above the bus's message limit, and the bus dropped cprd).
pub fn checked_name(name: &str) -> Result<(), CprdError> {
    if crate::config::valid_vm_name(name) {
        Ok(())
    } else {
        Err(CprdError::InvalidArgument(format!(
            "a VM name is 1 to 64 characters of A-Z, a-z, 0-9, '-' and '_' (got {} bytes)",
            name.len()
        )))
    }
}

/// Checks a VMM binary argument's length (the allow-list checks the rest).
fn checked_binary(binary: &str) -> Result<(), CprdError> {
    if binary.len() <= MAX_BINARY_ARG && !binary.contains('\0') {
        Ok(())
    } else {
        Err(CprdError::InvalidArgument(format!(
            "a VMM binary is a path of at most {MAX_BINARY_ARG} bytes (got {} bytes)",
            binary.len()
        )))
    }
}

#[interface(name = "org.cprd1.Manager")]
impl Manager {
    /// (name, state, backend, generation) of every VM.
    #[zbus(name = "ListVMs")]
    async fn list_vms(&self) -> Vec<(String, String, String, u64)> {
        self.engine
            .list()
            .into_iter()
            .map(|v| (v.name, v.state.as_str().to_string(), v.backend, v.generation))
            .collect()
    }

    /// The object path of a VM.
    #[zbus(name = "GetVM")]
    async fn get_vm(&self, name: String) -> Result<zbus::OwnedObjectPath, CprdError> {
        checked_name(&name)?;
        self.engine.view(&name)?;
        zbus::OwnedObjectPath::try_from(vm_path(&name))
            .map_err(|e| CprdError::InvalidArgument(format!("{name:?}: {e}")))
    }

    /// Starts a VM.
    #[zbus(name = "StartVM")]
    async fn start_vm(
        &self,
        name: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), CprdError> {
        checked_name(&name)?;
        authorize(conn, &header).await?;
        let e = Arc::clone(&self.engine);
        blocking(move || e.start(&name)).await?
    }

    /// Stops a VM (`force`: kill its VMM).
    #[zbus(name = "StopVM")]
    async fn stop_vm(
        &self,
        name: String,
        force: bool,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), CprdError> {
        checked_name(&name)?;
        authorize(conn, &header).await?;
        let e = Arc::clone(&self.engine);
        blocking(move || e.stop(&name, force)).await?
    }

    /// Pauses a running VM's guest in its VMM (every vCPU stopped, the VMM kept); `ResumeVM` runs
    /// it again. A paused guest is never run to be upgraded (`UpgradeVM` refuses; a reload marks
    /// the VM to be moved once it runs).
    #[zbus(name = "PauseVM")]
    async fn pause_vm(
        &self,
        name: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), CprdError> {
        checked_name(&name)?;
        authorize(conn, &header).await?;
        let e = Arc::clone(&self.engine);
        blocking(move || e.pause(&name)).await?
    }

    /// Runs a paused VM's guest again; or makes the VMM on record of a VM that needs attention
    /// run its guest again (refused while another VMM that may hold the guest lives). A VM a
    /// reload marked meanwhile is then handed to its changed VMM binary before this returns (the
    /// guest runs either way; a failed handoff is in the journal and `GetUpgrades`).
    #[zbus(name = "ResumeVM")]
    async fn resume_vm(
        &self,
        name: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), CprdError> {
        checked_name(&name)?;
        authorize(conn, &header).await?;
        let e = Arc::clone(&self.engine);
        blocking(move || e.resume(&name)).await?
    }

    /// Hands a VM to a new VMM of `binary` (empty: the configured one); (downtime µs, generation).
    #[zbus(name = "UpgradeVM")]
    async fn upgrade_vm(
        &self,
        name: String,
        binary: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(u64, u64), CprdError> {
        checked_name(&name)?;
        checked_binary(&binary)?;
        authorize(conn, &header).await?;
        let e = Arc::clone(&self.engine);
        blocking(move || e.upgrade(&name, &binary)).await?
    }

    /// Upgrades every running VM: (name, ok, downtime µs, error) each.
    #[zbus(name = "UpgradeAll")]
    async fn upgrade_all(
        &self,
        binary: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<(String, bool, u64, String)>, CprdError> {
        checked_binary(&binary)?;
        authorize(conn, &header).await?;
        let e = Arc::clone(&self.engine);
        blocking(move || e.upgrade_all(&binary)).await
    }

    /// Re-reads the configuration and moves VMs whose configured VMM binary changed to it.
    #[zbus(name = "Reload")]
    async fn reload(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), CprdError> {
        authorize(conn, &header).await?;
        reload(conn, &self.engine, false).await.map(|_| ())
    }

    /// Past upgrades with the releases they went between: (vm, time µs since the epoch,
    /// generation, ok, downtime µs, error, release before, release after; empty when unknown or
    /// failed).
    #[zbus(name = "GetUpgrades")]
    async fn get_upgrades(&self) -> Vec<(String, u64, u64, bool, u64, String, String, String)> {
        self.engine
            .history()
            .into_iter()
            .map(|r| (r.vm, r.time_usec, r.generation, r.ok, r.downtime_usec, r.error, r.from_release, r.to_release))
            .collect()
    }

    /// cprd's metrics in the Prometheus text format: upgrades by backend and result, the downtime
    /// histogram, rollbacks, re-attaches, starts, VMs by state, handoffs in flight, each VM's
    /// VMM and cprd's version (`docs/operations.md`). Read-only, like the listing.
    #[zbus(name = "GetMetrics")]
    async fn get_metrics(&self) -> Result<String, CprdError> {
        let e = Arc::clone(&self.engine);
        blocking(move || e.metrics()).await
    }

    /// Past upgrades: (vm, time µs since the epoch, generation, ok, downtime µs, error).
    #[zbus(name = "GetHistory")]
    async fn get_history(&self) -> Vec<(String, u64, u64, bool, u64, String)> {
        self.engine
            .history()
            .into_iter()
            .map(|r| (r.vm, r.time_usec, r.generation, r.ok, r.downtime_usec, r.error))
            .collect()
    }

    /// cprd's version.
    #[zbus(property, name = "Version")]
    async fn version(&self) -> String {
        crate::VERSION.to_string()
    }

    /// A VM changed state.
    #[zbus(signal, name = "VMStateChanged")]
    async fn vm_state_changed(emitter: &SignalEmitter<'_>, name: &str, state: &str) -> zbus::Result<()>;

    /// An upgrade finished.
    #[zbus(signal, name = "UpgradeFinished")]
    async fn upgrade_finished(
        emitter: &SignalEmitter<'_>,
        name: &str,
        ok: bool,
        downtime_usec: u64,
        error: &str,
    ) -> zbus::Result<()>;
}

/// `org.cprd1.VM` at `/org/cprd1/vm/<name>`.
#[derive(Debug)]
pub struct VmObject {
    /// The engine.
    pub engine: Arc<Engine>,
    /// The VM's name.
    pub name: String,
}

impl VmObject {
    fn view(&self) -> zbus::fdo::Result<crate::engine::VmView> {
        self.engine.view(&self.name).map_err(|e| zbus::fdo::Error::UnknownObject(e.to_string()))
    }
}

#[interface(name = "org.cprd1.VM")]
impl VmObject {
    /// Starts the VM.
    async fn start(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), CprdError> {
        authorize(conn, &header).await?;
        let (e, n) = (Arc::clone(&self.engine), self.name.clone());
        blocking(move || e.start(&n)).await?
    }

    /// Stops the VM.
    async fn stop(
        &self,
        force: bool,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), CprdError> {
        authorize(conn, &header).await?;
        let (e, n) = (Arc::clone(&self.engine), self.name.clone());
        blocking(move || e.stop(&n, force)).await?
    }

    /// Upgrades the VM's VMM.
    async fn upgrade(
        &self,
        binary: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(u64, u64), CprdError> {
        authorize(conn, &header).await?;
        let (e, n) = (Arc::clone(&self.engine), self.name.clone());
        blocking(move || e.upgrade(&n, &binary)).await?
    }

    /// Name.
    #[zbus(property, name = "Name")]
    async fn name(&self) -> String {
        self.name.clone()
    }
    /// State.
    #[zbus(property, name = "State")]
    async fn state(&self) -> zbus::fdo::Result<String> {
        Ok(self.view()?.state.as_str().to_string())
    }
    /// Backend.
    #[zbus(property, name = "Backend")]
    async fn backend(&self) -> zbus::fdo::Result<String> {
        Ok(self.view()?.backend)
    }
    /// VMM binary.
    #[zbus(property, name = "VMMBinary")]
    async fn vmm_binary(&self) -> zbus::fdo::Result<String> {
        Ok(self.view()?.vmm_binary)
    }
    /// VMM build id.
    #[zbus(property, name = "VMMVersion")]
    async fn vmm_version(&self) -> zbus::fdo::Result<String> {
        Ok(self.view()?.vmm_version)
    }
    /// VMM pid.
    #[zbus(property, name = "MainPID")]
    async fn main_pid(&self) -> zbus::fdo::Result<u32> {
        Ok(self.view()?.main_pid)
    }
    /// Generation.
    #[zbus(property, name = "Generation")]
    async fn generation(&self) -> zbus::fdo::Result<u64> {
        Ok(self.view()?.generation)
    }
    /// Guest RAM.
    #[zbus(property, name = "MemoryBytes")]
    async fn memory_bytes(&self) -> zbus::fdo::Result<u64> {
        Ok(self.view()?.memory_bytes)
    }
    /// vCPUs.
    #[zbus(property, name = "VCPUs")]
    async fn vcpus(&self) -> zbus::fdo::Result<u32> {
        Ok(u32::from(self.view()?.vcpus))
    }
    /// Last upgrade's downtime.
    #[zbus(property, name = "LastDowntimeUSec")]
    async fn last_downtime_usec(&self) -> zbus::fdo::Result<u64> {
        Ok(self.view()?.last_downtime_usec)
    }
    /// Where the serial console is logged.
    #[zbus(property, name = "ConsoleLog")]
    async fn console_log(&self) -> zbus::fdo::Result<String> {
        Ok(self.view()?.console)
    }
    /// The release of the VMM that runs the guest, in words (`11.1.3 (Debian ...)` for a QEMU,
    /// the package version for a cpr-vmm; empty when a cprd before this one started it).
    #[zbus(property, name = "VMMRelease")]
    async fn vmm_release(&self) -> zbus::fdo::Result<String> {
        Ok(self.view()?.vmm_release)
    }
    /// QEMU VMs: the machine type pinned when the VM started (every generation keeps it; a new
    /// QEMU without it is refused in pre-flight). Empty for cpr-vmm VMs.
    #[zbus(property, name = "MachineType")]
    async fn machine_type(&self) -> zbus::fdo::Result<String> {
        Ok(self.view()?.machine_type)
    }
    /// A reload found the VM's configured VMM binary changed while its guest did not run (paused):
    /// it is handed to that binary as soon as the guest runs again.
    #[zbus(property, name = "UpgradeDue")]
    async fn upgrade_due(&self) -> zbus::fdo::Result<bool> {
        Ok(self.view()?.upgrade_due)
    }
    /// Why the VM is in `needs-attention` or `quarantined` (empty in every other state).
    #[zbus(property, name = "StateReason")]
    async fn state_reason(&self) -> zbus::fdo::Result<String> {
        Ok(self.view()?.state_reason)
    }
}

/// The reload cycle, for `Reload()` and SIGHUP alike: tells systemd `RELOADING=1` (with
/// `MONOTONIC_USEC`, as `Type=notify-reload` requires), re-reads the configuration, moves VMs
/// whose configured VMM binary changed on disk to it, registers new VM objects, then `READY=1`
/// with a STATUS that says what happened.
/// With `reexec`, a changed cprd binary is re-executed first (SIGHUP from `systemctl reload`);
/// over D-Bus it is not, since the caller would lose its reply.
pub async fn reload(
    conn: &Connection,
    engine: &Arc<Engine>,
    reexec: bool,
) -> Result<crate::engine::ReloadOutcome, CprdError> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| i128::from(t.tv_sec()) * 1_000_000 + i128::from(t.tv_nsec()) / 1000)
        .unwrap_or(0);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading, sd_notify::NotifyState::MonotonicUsec(now)]);
    if let Some(path) = crate::reexec::changed().filter(|_| reexec) {
        tracing::info!("cprd's own binary {} changed on disk: re-executing it (same PID)", path.display());
        let err = crate::reexec::exec(&path);
        tracing::error!("cannot re-execute {}: {err}; reloading in place", path.display());
    }
    finish_reload(conn, engine).await
}

/// The part of a reload after the `RELOADING=1` notice (also what a re-executed cprd finishes).
pub async fn finish_reload(conn: &Connection, engine: &Arc<Engine>) -> Result<crate::engine::ReloadOutcome, CprdError> {
    let e = Arc::clone(engine);
    let result = blocking(move || e.reload()).await.and_then(|r| r);
    let _ = register_vms(conn, engine).await;
    let status = match &result {
        Ok(outcome) => {
            let rows = &outcome.upgrades;
            let ok = rows.iter().filter(|r| r.1).count();
            let failed: Vec<&str> = rows.iter().filter(|r| !r.1).map(|r| r.0.as_str()).collect();
            format!(
                "reloaded; upgraded {ok} VMs to their new VMM binary{}{}; {}",
                if failed.is_empty() { String::new() } else { format!(", failed: {}", failed.join(" ")) },
                if outcome.deferred.is_empty() {
                    String::new()
                } else {
                    format!(", moved once their guest runs: {}", outcome.deferred.join(" "))
                },
                engine.status_line()
            )
        }
        Err(e) => format!("reload failed, last good configuration kept: {e}"),
    };
    let status = format!("STATUS={status}");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Custom(&status)]);
    result
}

/// Registers a VM object for every defined VM that has none yet.
pub async fn register_vms(conn: &Connection, engine: &Arc<Engine>) -> zbus::Result<()> {
    for name in engine.names() {
        let path = vm_path(&name);
        let obj = VmObject { engine: Arc::clone(engine), name };
        // `at` answers false (and changes nothing) where the object exists already.
        conn.object_server().at(path.as_str(), obj).await?;
    }
    Ok(())
}

/// The next event, skipping over any this receiver lagged behind on (they are logged, and the
/// state they announced is announced again by the next one): only a closed channel ends it.
pub async fn next_event(rx: &mut tokio::sync::broadcast::Receiver<Event>) -> Option<Event> {
    loop {
        match rx.recv().await {
            Ok(ev) => return Some(ev),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!("{n} D-Bus signals were dropped: the bus was slower than the events");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        }
    }
}

/// Forwards engine events as D-Bus signals and PropertiesChanged, until the engine goes away.
pub async fn forward_events(conn: Connection, engine: Arc<Engine>) {
    let mut rx = engine.subscribe();
    while let Some(ev) = next_event(&mut rx).await {
        let Ok(manager) = SignalEmitter::new(&conn, MANAGER_PATH) else { continue };
        match ev {
            Event::VmChanged(name) => {
                let state = engine.view(&name).map(|v| v.state.as_str().to_string()).unwrap_or_default();
                let _ = Manager::vm_state_changed(&manager, &name, &state).await;
                let path = vm_path(&name);
                if let Ok(iface) = conn.object_server().interface::<_, VmObject>(path.as_str()).await {
                    let em = iface.signal_emitter();
                    let obj = iface.get().await;
                    let _ = obj.state_changed(em).await;
                    let _ = obj.state_reason_changed(em).await;
                    let _ = obj.generation_changed(em).await;
                    let _ = obj.main_p_i_d_changed(em).await;
                    let _ = obj.last_downtime_u_sec_changed(em).await;
                    let _ = obj.v_m_m_binary_changed(em).await;
                    let _ = obj.v_m_m_version_changed(em).await;
                    let _ = obj.upgrade_due_changed(em).await;
                }
            }
            Event::UpgradeFinished(r) => {
                let _ = Manager::upgrade_finished(&manager, &r.vm, r.ok, r.downtime_usec, &r.error).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lagging_signal_receiver_skips_ahead_instead_of_stopping() {
        let (tx, mut rx) = tokio::sync::broadcast::channel(2);
        for i in 0..5 {
            tx.send(Event::VmChanged(format!("vm{i}"))).expect("send");
        }
        // Three events were overwritten before the receiver looked: it goes on with the rest.
        assert!(matches!(next_event(&mut rx).await, Some(Event::VmChanged(n)) if n == "vm3"));
        assert!(matches!(next_event(&mut rx).await, Some(Event::VmChanged(n)) if n == "vm4"));
        tx.send(Event::VmChanged("later".into())).expect("send");
        assert!(matches!(next_event(&mut rx).await, Some(Event::VmChanged(n)) if n == "later"));
        drop(tx);
        assert!(next_event(&mut rx).await.is_none(), "only a closed channel ends it");
    }
}
