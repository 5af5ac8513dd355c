//! cprd's VMs as systemd-machined machines (class `vm`, service `cprd`), so that `machinectl
//! list` and `machinectl status NAME` show them, as they show libvirt's domains.
//!
//! machined knows a machine by its leader process and the unit that process runs in, and drops
//! the machine when that unit goes away. A handoff replaces both: the new VMM runs in a scope of
//! its own generation (`cprd-vm-NAME-gN.scope`, see [`crate::scope`]) and the old VMM's scope
//! ends with it. No leader survives a handoff (cprd itself is not one: machined would then show
//! cprd's cgroup as the machine's and `machinectl terminate` would end cprd), so cprd
//! re-registers the machine right after each commit, with the new VMM as leader.
//!
//! One task does it all, by reconciling rather than by hooking each path: on every change of a
//! VM it reads the VM's state from the engine and makes machined agree. A running VM is
//! registered with its VMM as leader; a stopped or failed one is unregistered; a VM in between
//! (starting, upgrading, needing attention) is left as it is, so the machine stays listed while
//! a handoff is in flight. Only machines whose service is `cprd` are ever unregistered: a
//! machine of the same name that another manager registered is left alone (and the VM is not
//! listed, with a warning).
//!
//! Without machined on the bus (it is in systemd-container, which a host may not have), or with
//! a bus that does not let cprd call it, cprd works as before and says so once in the journal.

use std::collections::HashSet;
use std::sync::Arc;

use zbus::{Connection, OwnedObjectPath, proxy};

use crate::engine::{Engine, Event, VmState};

/// The service name cprd registers its machines under, and the only one it unregisters.
pub const SERVICE: &str = "cprd";

/// The machine class of every cprd VM.
pub const CLASS: &str = "vm";

#[proxy(
    interface = "org.freedesktop.machine1.Manager",
    default_service = "org.freedesktop.machine1",
    default_path = "/org/freedesktop/machine1"
)]
trait MachineManager {
    /// The object of machine `name`.
    fn get_machine(&self, name: &str) -> zbus::Result<OwnedObjectPath>;

    /// Registers a machine whose leader already runs in a unit of its own.
    #[allow(clippy::too_many_arguments)]
    fn register_machine_with_network(
        &self,
        name: &str,
        id: &[u8],
        service: &str,
        class: &str,
        leader: u32,
        root_directory: &str,
        ifindices: &[i32],
    ) -> zbus::Result<OwnedObjectPath>;

    /// Drops a machine without touching its processes (unlike `TerminateMachine`).
    fn unregister_machine(&self, name: &str) -> zbus::Result<()>;
}

#[proxy(interface = "org.freedesktop.machine1.Machine", default_service = "org.freedesktop.machine1")]
trait Machine {
    /// The machine's leader process.
    #[zbus(property)]
    fn leader(&self) -> zbus::Result<u32>;

    /// The manager that registered the machine.
    #[zbus(property)]
    fn service(&self) -> zbus::Result<String>;
}

/// What machined should know of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    /// Registered, with this leader and these network interfaces (host indices).
    Registered {
        /// The VMM that runs the guest.
        leader: u32,
        /// The interface indices of the VM's taps in the host's network namespace.
        ifindices: Vec<i32>,
    },
    /// Not registered: nothing of the VM runs.
    Absent,
    /// Left as it is: the VM is between two settled states.
    Unchanged,
}

/// What machined should know of a VM in `state` whose VMM is `main_pid`.
pub fn wanted(state: VmState, main_pid: u32, ifindices: Vec<i32>) -> Wanted {
    match state {
        VmState::Running | VmState::Paused | VmState::Orphaned if main_pid != 0 => {
            Wanted::Registered { leader: main_pid, ifindices }
        }
        VmState::Stopped | VmState::Stopping | VmState::Failed | VmState::Quarantined => Wanted::Absent,
        _ => Wanted::Unchanged,
    }
}

/// Runs the reconciler until the engine's event stream ends. Returns at once, after one line in
/// the journal, when machined is neither running nor activatable on `conn`'s bus.
pub async fn run(conn: Connection, engine: Arc<Engine>) {
    let manager = match reach(&conn).await {
        Ok(manager) => manager,
        Err(why) => {
            tracing::info!(
                "systemd-machined is not reachable on the bus ({why}): cprd's VMs are not registered as machines"
            );
            return;
        }
    };
    let mut events = engine.subscribe();
    let mut r = Reconciler { conn, manager, engine, warned: HashSet::new(), failed: HashSet::new() };
    r.all().await;
    loop {
        // A VM whose last attempt failed is tried again after a while, even if nothing changes.
        let event = if r.failed.is_empty() {
            events.recv().await
        } else {
            match tokio::time::timeout(RETRY_AFTER, events.recv()).await {
                Ok(event) => event,
                Err(_) => {
                    for name in std::mem::take(&mut r.failed) {
                        r.one(&name).await;
                    }
                    continue;
                }
            }
        };
        match event {
            Ok(Event::VmChanged(name)) => r.one(&name).await,
            Ok(Event::UpgradeFinished(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => r.all().await,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// How long after a failed attempt a VM is tried again.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// machined's manager, once a first call has reached it (and activated it if need be): a bus
/// may list machined as activatable yet deny cprd its calls, or have no systemd to start it.
async fn reach(conn: &Connection) -> Result<MachineManagerProxy<'static>, String> {
    let manager = MachineManagerProxy::new(conn).await.map_err(|e| e.to_string())?;
    match manager.inner().call_method("ListMachines", &()).await {
        Ok(_) => Ok(manager),
        Err(e) => Err(first_line(&e)),
    }
}

/// A bus error cut to its first clause (a denial quotes the whole rule it matched).
fn first_line(e: &zbus::Error) -> String {
    let text = e.to_string();
    let first = text.split([';', '\n']).next().unwrap_or_default();
    first.chars().take(200).collect()
}

struct Reconciler {
    conn: Connection,
    manager: MachineManagerProxy<'static>,
    engine: Arc<Engine>,
    /// VMs already warned about (once each until they succeed).
    warned: HashSet<String>,
    /// VMs whose last attempt failed, to be tried again.
    failed: HashSet<String>,
}

/// What machined has registered under a name.
enum Registered {
    /// Nothing.
    Nothing,
    /// A machine of cprd's, with this leader.
    Ours(u32),
    /// A machine another manager registered.
    Theirs(String),
}

impl Reconciler {
    async fn all(&mut self) {
        let engine = Arc::clone(&self.engine);
        let names = tokio::task::spawn_blocking(move || engine.names()).await.unwrap_or_default();
        for name in names {
            self.one(&name).await;
        }
    }

    async fn one(&mut self, name: &str) {
        let engine = Arc::clone(&self.engine);
        let vm = name.to_string();
        let Ok(wanted) = tokio::task::spawn_blocking(move || engine.machine_wanted(&vm)).await else { return };
        let result = match &wanted {
            Wanted::Registered { leader, ifindices } => self.register(name, *leader, ifindices).await,
            Wanted::Absent => self.unregister(name).await,
            Wanted::Unchanged => Ok(()),
        };
        match result {
            Ok(()) if wanted != Wanted::Unchanged => {
                self.warned.remove(name);
                self.failed.remove(name);
            }
            Ok(()) => {}
            Err(why) => {
                self.failed.insert(name.to_string());
                if self.warned.insert(name.to_string()) {
                    tracing::warn!(CPRD_VM = name, "systemd-machined: {why}");
                }
            }
        }
    }

    async fn registered(&self, name: &str) -> Result<Registered, String> {
        let path = match self.manager.get_machine(name).await {
            Ok(path) => path,
            Err(zbus::Error::MethodError(e, _, _)) if e.as_str() == "org.freedesktop.machine1.NoSuchMachine" => {
                return Ok(Registered::Nothing);
            }
            Err(e) => return Err(format!("cannot look up machine {name}: {e}")),
        };
        let machine = MachineProxy::builder(&self.conn)
            .path(path)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(|e| e.to_string())?;
        // machined drops a machine whose unit ended (the old VMM's scope, after a handoff) at any
        // moment, also between the look-up and these reads: then it is gone, as if never found.
        let service = match machine.service().await {
            Ok(service) => service,
            Err(e) if gone(&e) => return Ok(Registered::Nothing),
            Err(e) => return Err(format!("machine {name}: {e}")),
        };
        if service != SERVICE {
            return Ok(Registered::Theirs(service));
        }
        match machine.leader().await {
            Ok(leader) => Ok(Registered::Ours(leader)),
            Err(e) if gone(&e) => Ok(Registered::Nothing),
            Err(e) => Err(format!("machine {name}: {e}")),
        }
    }

    async fn register(&self, name: &str, leader: u32, ifindices: &[i32]) -> Result<(), String> {
        // machined takes the leader's unit for the machine's, and stops that unit when it drops
        // the machine (`machinectl terminate` too): a VMM left in cprd.service is never a leader.
        if !in_own_scope(leader) {
            return Err(format!("VMM pid {leader} of VM {name} is not in a scope of its own: not registered"));
        }
        match self.registered(name).await? {
            Registered::Ours(now) if now == leader => return Ok(()),
            Registered::Ours(_) => self.drop_machine(name).await?,
            Registered::Theirs(service) => {
                return Err(format!("a machine named {name} is registered by {service:?}: VM {name} is not listed"));
            }
            Registered::Nothing => {}
        }
        self.manager
            .register_machine_with_network(name, &[], SERVICE, CLASS, leader, "", ifindices)
            .await
            .map_err(|e| format!("cannot register VM {name} (leader {leader}): {e}"))?;
        tracing::info!(CPRD_VM = name, "VM {name} registered with systemd-machined, leader {leader}");
        Ok(())
    }

    async fn unregister(&self, name: &str) -> Result<(), String> {
        if let Registered::Ours(_) = self.registered(name).await? {
            self.drop_machine(name).await?;
            tracing::info!(CPRD_VM = name, "VM {name} unregistered from systemd-machined");
        }
        Ok(())
    }

    async fn drop_machine(&self, name: &str) -> Result<(), String> {
        match self.manager.unregister_machine(name).await {
            Ok(()) => Ok(()),
            // Gone meanwhile (machined dropped it with its unit): as wanted.
            Err(zbus::Error::MethodError(e, _, _)) if e.as_str() == "org.freedesktop.machine1.NoSuchMachine" => Ok(()),
            Err(e) => Err(format!("cannot unregister machine {name}: {e}")),
        }
    }
}

/// Whether a property read failed because the machine's object is gone.
fn gone(e: &zbus::Error) -> bool {
    match e {
        zbus::Error::FDO(e) => {
            matches!(**e, zbus::fdo::Error::UnknownObject(_) | zbus::fdo::Error::UnknownInterface(_))
        }
        zbus::Error::MethodError(name, _, _) => matches!(
            name.as_str(),
            "org.freedesktop.DBus.Error.UnknownObject" | "org.freedesktop.DBus.Error.UnknownInterface"
        ),
        _ => false,
    }
}

/// Whether process `pid` runs in a `cprd-vm-*.scope` of its own (any cgroup hierarchy).
fn in_own_scope(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|cgroups| {
        cgroups
            .lines()
            .any(|l| l.rsplit('/').next().is_some_and(|u| u.starts_with("cprd-vm-") && u.ends_with(".scope")))
    })
}

/// The interface indices, in cprd's network namespace, of `taps` (those created in another
/// namespace are left out: machined would read their indices as the host's).
pub fn host_ifindices<'a>(taps: impl Iterator<Item = &'a crate::config::NicDef>) -> Vec<i32> {
    taps.filter(|nic| nic.netns.is_none())
        .filter_map(|nic| nix::net::if_::if_nametoindex(nic.tap.as_str()).ok())
        .filter_map(|index| i32::try_from(index).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A running, paused or orphaned VM is a machine, led by its VMM; a VM with nothing running is
    /// none; a VM in between is left as machined has it (so a handoff in flight keeps it listed).
    #[test]
    fn a_vm_is_a_machine_exactly_while_a_vmm_runs_its_guest() {
        let led = |pid| Wanted::Registered { leader: pid, ifindices: vec![3] };
        assert_eq!(wanted(VmState::Running, 42, vec![3]), led(42));
        assert_eq!(wanted(VmState::Orphaned, 43, vec![3]), led(43));
        assert_eq!(wanted(VmState::Paused, 44, vec![3]), led(44));
        assert_eq!(wanted(VmState::Running, 0, vec![]), Wanted::Unchanged);
        for gone in [VmState::Stopped, VmState::Stopping, VmState::Failed, VmState::Quarantined] {
            assert_eq!(wanted(gone, 42, vec![]), Wanted::Absent, "{gone:?}");
        }
        for between in [VmState::Starting, VmState::Upgrading, VmState::NeedsAttention] {
            assert_eq!(wanted(between, 42, vec![]), Wanted::Unchanged, "{between:?}");
        }
    }

    /// Only taps in cprd's own namespace count, by their real index (`lo` stands in for a tap).
    #[test]
    fn interfaces_are_given_by_host_index() {
        let nic = |tap: &str, netns: Option<&str>| crate::config::NicDef {
            tap: tap.into(),
            netns: netns.map(Into::into),
            model: "virtio-net-pci".into(),
            mac: None,
        };
        let nics = [nic("lo", None), nic("lo", Some("/run/netns/x")), nic("no-such-if0", None)];
        assert_eq!(host_ifindices(nics.iter()), vec![1]);
    }
}
