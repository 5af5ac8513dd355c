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
//! Where machined has a varlink socket (systemd >= 256) cprd registers there; from systemd 261
//! on, with a `controlAddress`: the VM's `io.systemd.MachineInstance` socket
//! ([`crate::machine_instance`]), so that machinectl's verbs reach cprd. Older machineds get the
//! D-Bus `RegisterMachineWithNetwork` (systemd 254), or a registration without the address.
//!
//! Without machined on the bus (it is in systemd-container, which a host may not have), or with
//! a bus that does not let cprd call it, cprd works as before and says so once in the journal.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use zbus::{Connection, OwnedObjectPath, proxy};

use crate::engine::{Engine, Event, VmState};
use crate::machine_instance::{InstanceServer, socket_path};

/// machined's varlink socket.
const MACHINED_VARLINK: &str = "/run/systemd/machine/io.systemd.Machine";

/// machined's `io.systemd.Machine` over varlink, as far as cprd uses it.
#[allow(clippy::too_many_arguments, reason = "Register's parameters are machined's, one argument each")]
mod registry {
    /// A process as systemd's varlink interfaces name one.
    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    pub(super) struct ProcessId {
        /// The pid.
        pub(super) pid: u32,
        /// The inode of a pidfd of it (pidfs), which machined checks against its own pidfd: a
        /// leader named this way cannot be a recycled pid.
        #[serde(rename = "pidfdId", skip_serializing_if = "Option::is_none", default)]
        pub(super) pidfd_id: Option<u64>,
    }

    /// The errors of `io.systemd.Machine` that `Register` may send.
    #[derive(Debug, Clone, PartialEq, zlink::ReplyError)]
    #[zlink(interface = "io.systemd.Machine")]
    pub(super) enum RegistryError {
        /// A machine of that name exists.
        MachineExists,
        /// No machine of that name exists.
        NoSuchMachine,
    }

    /// The client's side.
    #[zlink::proxy("io.systemd.Machine")]
    pub(super) trait MachineRegistry {
        /// Registers a machine whose leader already runs in a unit of its own (`allocateUnit`
        /// false), with `controlAddress` where given.
        async fn register(
            &mut self,
            name: &str,
            service: Option<&str>,
            class: &str,
            #[zlink(rename = "leaderProcessId")] leader_process_id: Option<ProcessId>,
            #[zlink(rename = "ifIndices")] if_indices: Option<&[i32]>,
            #[zlink(rename = "controlAddress")] control_address: Option<&str>,
            #[zlink(rename = "allocateUnit")] allocate_unit: Option<bool>,
        ) -> zlink::Result<Result<(), RegistryError>>;
    }
}
use registry::{MachineRegistry, ProcessId};

/// How a registration over varlink ended.
#[derive(Debug)]
enum VarlinkRegistration {
    /// Registered.
    Done,
    /// This machined does not know `controlAddress` (systemd < 261).
    NoControlAddress,
    /// This machined has no `Register` over varlink (systemd < 256).
    NoRegister,
    /// Failed; why.
    Failed(String),
}

/// The inode number of a pidfd of `pid` (unique per process on pidfs, Linux >= 6.9), by which
/// machined's varlink `Register` tells the leader from a process that reused its pid.
fn pidfd_id(pid: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let pidfd = crate::fdstore::pidfd_open(pid)?;
    std::fs::File::from(pidfd).metadata().ok().map(|m| m.ino())
}

/// Registers machine `name` with machined over its varlink socket.
async fn register_over_varlink(
    name: &str,
    leader: u32,
    ifindices: &[i32],
    control: Option<&Path>,
) -> VarlinkRegistration {
    let mut conn = match zlink::tokio::unix::connect(MACHINED_VARLINK).await {
        Ok(conn) => conn,
        Err(e) => return VarlinkRegistration::Failed(format!("cannot connect to {MACHINED_VARLINK}: {e}")),
    };
    let control = control.and_then(Path::to_str);
    let reply = conn
        .register(
            name,
            Some(SERVICE),
            CLASS,
            Some(ProcessId { pid: leader, pidfd_id: pidfd_id(leader) }),
            (!ifindices.is_empty()).then_some(ifindices),
            control,
            Some(false),
        )
        .await;
    match reply {
        Ok(Ok(())) => VarlinkRegistration::Done,
        Err(zlink::Error::VarlinkService(e))
            if control.is_some()
                && matches!(&*e, zlink::varlink_service::Error::InvalidParameter { parameter } if parameter == "controlAddress") =>
        {
            VarlinkRegistration::NoControlAddress
        }
        Err(zlink::Error::VarlinkService(e)) if matches!(&*e, zlink::varlink_service::Error::MethodNotFound { .. }) => {
            VarlinkRegistration::NoRegister
        }
        Ok(Err(e)) => VarlinkRegistration::Failed(format!("{e:?}")),
        Err(e) => VarlinkRegistration::Failed(e.to_string()),
    }
}

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
pub async fn run(conn: Connection, engine: Arc<Engine>, runtime_dir: PathBuf) {
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
    // machined's varlink socket (systemd >= 256) takes a controlAddress from systemd 261 on;
    // whether this one does shows at the first registration.
    let varlink = Path::new(MACHINED_VARLINK).exists();
    let mut r = Reconciler {
        conn,
        manager,
        engine,
        runtime_dir,
        varlink,
        control: varlink,
        servers: HashMap::new(),
        warned: HashSet::new(),
        failed: HashSet::new(),
    };
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
    runtime_dir: PathBuf,
    /// Machines are registered over machined's varlink socket (it has one, with `Register`).
    varlink: bool,
    /// Machines get a `controlAddress` (machined takes one; true until it refuses one).
    control: bool,
    /// The `io.systemd.MachineInstance` servers of registered VMs.
    servers: HashMap<String, InstanceServer>,
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

    async fn register(&mut self, name: &str, leader: u32, ifindices: &[i32]) -> Result<(), String> {
        // machined takes the leader's unit for the machine's, and stops that unit when it drops
        // the machine (`machinectl terminate` too): a VMM left in cprd.service is never a leader.
        if !in_own_scope(leader) {
            return Err(format!("VMM pid {leader} of VM {name} is not in a scope of its own: not registered"));
        }
        // The control socket is served before machined hears of it, and also for a machine a
        // previous cprd registered (its address is the same).
        let control = if self.control { Some(self.serve(name)?) } else { None };
        match self.registered(name).await? {
            Registered::Ours(now) if now == leader => return Ok(()),
            Registered::Ours(_) => self.drop_machine(name).await?,
            Registered::Theirs(service) => {
                return Err(format!("a machine named {name} is registered by {service:?}: VM {name} is not listed"));
            }
            Registered::Nothing => {}
        }
        let mut outcome = VarlinkRegistration::NoRegister;
        if self.varlink {
            outcome = register_over_varlink(name, leader, ifindices, control.as_deref()).await;
            if let VarlinkRegistration::NoControlAddress = outcome {
                tracing::info!(
                    "systemd-machined takes no controlAddress (systemd < 261): machinectl's verbs do not reach cprd"
                );
                self.control = false;
                self.stop_servers();
                outcome = register_over_varlink(name, leader, ifindices, None).await;
            }
        }
        let how = match outcome {
            VarlinkRegistration::Done if self.control => "over varlink, with a control socket",
            VarlinkRegistration::Done => "over varlink",
            VarlinkRegistration::NoControlAddress => return Err("machined refused the registration".into()),
            VarlinkRegistration::Failed(why) => {
                return Err(format!("cannot register VM {name} (leader {leader}): {why}"));
            }
            VarlinkRegistration::NoRegister => {
                if self.varlink {
                    self.varlink = false;
                    self.control = false;
                    self.stop_servers();
                }
                self.manager
                    .register_machine_with_network(name, &[], SERVICE, CLASS, leader, "", ifindices)
                    .await
                    .map_err(|e| format!("cannot register VM {name} (leader {leader}): {e}"))?;
                "over D-Bus"
            }
        };
        tracing::info!(CPRD_VM = name, "VM {name} registered with systemd-machined {how}, leader {leader}");
        Ok(())
    }

    /// Serves VM `name`'s `io.systemd.MachineInstance` socket (if it is not yet); its path.
    fn serve(&mut self, name: &str) -> Result<PathBuf, String> {
        if let Some(server) = self.servers.get(name) {
            return Ok(server.path().to_path_buf());
        }
        let path = socket_path(&self.runtime_dir, name);
        let server = InstanceServer::start(Arc::clone(&self.engine), self.conn.clone(), name, path.clone())
            .map_err(|e| format!("cannot serve {}: {e}", path.display()))?;
        self.servers.insert(name.to_string(), server);
        Ok(path)
    }

    async fn unregister(&mut self, name: &str) -> Result<(), String> {
        if let Registered::Ours(_) = self.registered(name).await? {
            self.drop_machine(name).await?;
            tracing::info!(CPRD_VM = name, "VM {name} unregistered from systemd-machined");
        }
        if let Some(server) = self.servers.remove(name) {
            stop_server(server);
        }
        Ok(())
    }

    /// Stops every control socket's server (machined takes no control address after all).
    fn stop_servers(&mut self) {
        for (_, server) in self.servers.drain() {
            stop_server(server);
        }
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

/// Stops a control socket's server from a thread of its own: it may be answering the call that
/// stopped the VM, and is given a moment to.
fn stop_server(server: InstanceServer) {
    drop(tokio::task::spawn_blocking(move || drop(server)));
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
