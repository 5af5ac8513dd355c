//! `io.systemd.MachineInstance` for each cprd VM: the varlink socket whose path cprd gives
//! systemd-machined as the machine's `controlAddress` (systemd >= 261), so that `machinectl
//! poweroff|terminate|pause|resume NAME` reach cprd and act through cprd's own paths: the same
//! engine calls, and the same rule for who may call them, as the D-Bus methods
//! ([`crate::dbus::authorize_process`]: root, group `cprd`, or polkit's `org.cprd1.manage`).
//!
//! machinectl connects to the socket itself (machined does not stand between), as whatever user
//! runs it: the socket is open to all (`0666`, like the bus), and every method that changes
//! something checks the caller's credentials from the kernel (`SO_PEERCRED`). `Describe` and
//! `SubscribeEvents` only read, as `GetVM` and the VM's properties do.
//!
//! | method | cprd |
//! |---|---|
//! | `PowerOff` | `StopVM(name, force=false)`: the VMM is asked to stop |
//! | `Terminate` | `StopVM(name, force=true)`: the VMM is killed |
//! | `Pause`, `Resume` | `PauseVM`, `ResumeVM` |
//! | `Describe` | `running` (the guest runs in its VMM) and `status`, cprd's state of the VM |
//! | `SubscribeEvents` | `READY`, then `StateChanged` `{state, generation, mainPid}` on every change |
//! | `Reboot`, `*Storage` | `NotSupported`: cprd has no such path |
//!
//! Each VM's socket is served by a thread of its own (zlink's server is not `Send`), from the
//! moment the VM is registered with machined until it is unregistered.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::Stream;
use serde::{Deserialize, Serialize};
use zlink::connection::socket::FetchPeerCredentials;
use zlink::{Connection, Reply, introspect};

use crate::engine::{Engine, Event, VmState};
use crate::error::CprdError;

/// The directory of the VMs' sockets under cprd's runtime directory.
pub const SOCKET_DIR: &str = "machine";

/// Where VM `vm`'s `io.systemd.MachineInstance` socket is.
pub fn socket_path(runtime_dir: &Path, vm: &str) -> PathBuf {
    runtime_dir.join(SOCKET_DIR).join(format!("{vm}.varlink"))
}

/// The errors of `io.systemd.MachineInstance` cprd sends.
#[derive(Debug, Clone, PartialEq, zlink::ReplyError, introspect::ReplyError)]
#[zlink(interface = "io.systemd.MachineInstance")]
pub enum InstanceError {
    /// cprd has no path for the operation.
    NotSupported,
    /// The VM's VMM could not be reached (the operation's error says why in cprd's journal).
    NotConnected,
}

/// An error of cprd's own: `io.systemd.System` with the errno that says it best (which
/// machinectl prints as text), and cprd's message.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "error", content = "parameters")]
pub enum SystemError {
    /// A failed operation.
    #[serde(rename = "io.systemd.System")]
    System {
        /// The errno.
        errno: i32,
        /// cprd's message.
        message: String,
    },
}

/// What a method that changes something may fail with.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ActionError {
    /// The interface's own.
    Instance(InstanceError),
    /// cprd's.
    System(SystemError),
}

/// The interface description lists the interface's own errors; `io.systemd.System` is systemd's
/// generic error, which any method may send.
impl introspect::ReplyError for ActionError {
    const VARIANTS: &'static [&'static zlink::idl::Error<'static>] =
        <InstanceError as introspect::ReplyError>::VARIANTS;
}

impl From<CprdError> for ActionError {
    fn from(e: CprdError) -> Self {
        let errno = match &e {
            CprdError::NoSuchVM(_) => libc::ENOENT,
            CprdError::AccessDenied(_) => libc::EACCES,
            CprdError::Busy(_) => libc::EBUSY,
            CprdError::InvalidArgument(_) | CprdError::Incompatible(_) => libc::EINVAL,
            CprdError::NotAllowed(_) => libc::EPERM,
            _ => libc::EIO,
        };
        Self::System(SystemError::System { errno, message: e.to_string() })
    }
}

/// `Describe`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, introspect::Type)]
pub struct Description {
    /// The guest's vCPUs run.
    pub running: bool,
    /// cprd's state of the VM (`running`, `paused`, `upgrading`, …, as `GetVM`'s `State`).
    pub status: String,
}

/// One event of `SubscribeEvents`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, introspect::Type)]
pub struct InstanceEvent {
    /// `READY` first, then `StateChanged`.
    pub event: String,
    /// The VM as it is after the change (none for `READY`).
    pub data: Option<EventData>,
}

/// What a `StateChanged` event says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, introspect::Type)]
pub struct EventData {
    /// cprd's state of the VM.
    pub state: String,
    /// Its VMM generation.
    pub generation: u64,
    /// Its VMM's pid (0 when none runs).
    #[serde(rename = "mainPid")]
    pub main_pid: u32,
}

/// One VM's `io.systemd.MachineInstance`.
#[derive(Debug)]
struct Instance {
    engine: Arc<Engine>,
    bus: zbus::Connection,
    vm: String,
}

/// What a caller asked for.
#[derive(Debug, Clone, Copy)]
enum Action {
    Stop { force: bool },
    Pause,
    Resume,
}

impl Instance {
    /// Checks the caller on `conn` and runs `action` on the VM.
    async fn act<Sock: zlink::connection::Socket>(
        &self,
        conn: &mut Connection<Sock>,
        action: Action,
    ) -> Result<(), ActionError>
    where
        Sock::ReadHalf: FetchPeerCredentials,
    {
        let (uid, pid) = match conn.peer_credentials().await {
            Ok(c) => (c.unix_user_id().as_raw(), c.process_id().as_raw_nonzero().get().unsigned_abs()),
            Err(e) => return Err(CprdError::AccessDenied(format!("cannot identify the caller: {e}")).into()),
        };
        crate::dbus::authorize_process(&self.bus, uid, pid).await?;
        tracing::info!(CPRD_VM = self.vm, "machinectl (uid {uid}, pid {pid}) asks VM {} to {action:?}", self.vm);
        let engine = Arc::clone(&self.engine);
        let vm = self.vm.clone();
        let done = tokio::task::spawn_blocking(move || match action {
            Action::Stop { force } => engine.stop(&vm, force),
            Action::Pause => engine.pause(&vm),
            Action::Resume => engine.resume(&vm),
        })
        .await;
        match done {
            Ok(result) => result.map_err(ActionError::from),
            Err(_) => Err(ActionError::Instance(InstanceError::NotConnected)),
        }
    }

    fn describe_now(&self) -> Result<Description, ActionError> {
        let view = self.engine.view(&self.vm)?;
        Ok(Description { running: view.state == VmState::Running, status: view.state.as_str().to_string() })
    }
}

#[zlink::service(interface = "io.systemd.MachineInstance", vendor = "cprd", product = "cprd", version = crate::VERSION)]
impl<Sock> Instance
where
    Sock::ReadHalf: FetchPeerCredentials,
{
    /// Kills the VM's VMM (`StopVM` with force).
    async fn terminate(&self, #[zlink(connection)] conn: &mut Connection<Sock>) -> Result<(), ActionError> {
        self.act(conn, Action::Stop { force: true }).await
    }

    /// Asks the VM's VMM to stop (`StopVM`).
    #[zlink(rename = "PowerOff")]
    async fn power_off(&self, #[zlink(connection)] conn: &mut Connection<Sock>) -> Result<(), ActionError> {
        self.act(conn, Action::Stop { force: false }).await
    }

    /// Not supported: cprd has no reboot.
    async fn reboot(&self) -> Result<(), InstanceError> {
        Err(InstanceError::NotSupported)
    }

    /// Pauses the guest (`PauseVM`).
    async fn pause(&self, #[zlink(connection)] conn: &mut Connection<Sock>) -> Result<(), ActionError> {
        self.act(conn, Action::Pause).await
    }

    /// Runs a paused guest again (`ResumeVM`).
    async fn resume(&self, #[zlink(connection)] conn: &mut Connection<Sock>) -> Result<(), ActionError> {
        self.act(conn, Action::Resume).await
    }

    /// Whether the guest runs, and cprd's state of the VM.
    async fn describe(&self) -> Result<Description, ActionError> {
        self.describe_now()
    }

    /// `READY`, then the VM's state after each change (only these events, whatever `filter`
    /// names; an unknown name filters everything out).
    #[zlink(more, rename = "SubscribeEvents")]
    async fn subscribe_events(
        &self,
        more: bool,
        filter: Option<Vec<String>>,
    ) -> impl Stream<Item = Reply<InstanceEvent>> + Unpin {
        let wanted = move |event: &str| filter.as_ref().is_none_or(|f| f.is_empty() || f.iter().any(|n| n == event));
        let ready = InstanceEvent { event: "READY".into(), data: None };
        let first =
            futures_util::stream::iter(wanted("READY").then(|| Reply::new(Some(ready)).set_continues(Some(more))));
        let engine = Arc::clone(&self.engine);
        let vm = self.vm.clone();
        let rx = self.engine.subscribe();
        let changes = futures_util::stream::unfold(rx, move |mut rx| {
            let engine = Arc::clone(&engine);
            let vm = vm.clone();
            async move {
                loop {
                    match rx.recv().await {
                        Ok(Event::VmChanged(name)) if name == vm => {
                            let view = tokio::task::spawn_blocking(move || engine.view(&vm)).await.ok()?.ok()?;
                            let data = EventData {
                                state: view.state.as_str().into(),
                                generation: view.generation,
                                main_pid: view.main_pid,
                            };
                            let event = InstanceEvent { event: "StateChanged".into(), data: Some(data) };
                            return Some((Reply::new(Some(event)).set_continues(Some(true)), rx));
                        }
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        });
        let wanted_changes = wanted("StateChanged") && more;
        Box::pin(futures_util::StreamExt::chain(
            first,
            futures_util::StreamExt::filter(changes, move |_| std::future::ready(wanted_changes)),
        ))
    }

    /// Not supported: cprd attaches no storage at run time.
    #[zlink(rename = "AddStorage")]
    async fn add_storage(
        &self,
        #[zlink(rename = "fileDescriptorIndex")] file_descriptor_index: i64,
        name: String,
        config: Option<String>,
    ) -> Result<(), InstanceError> {
        let _ = (file_descriptor_index, name, config);
        Err(InstanceError::NotSupported)
    }

    /// Not supported: cprd attaches no storage at run time.
    #[zlink(rename = "RemoveStorage")]
    async fn remove_storage(&self, name: String) -> Result<(), InstanceError> {
        let _ = name;
        Err(InstanceError::NotSupported)
    }

    /// Not supported: cprd attaches no storage at run time.
    #[zlink(rename = "ReplaceStorage")]
    async fn replace_storage(
        &self,
        #[zlink(rename = "fileDescriptorIndex")] file_descriptor_index: i64,
        name: String,
    ) -> Result<(), InstanceError> {
        let _ = (file_descriptor_index, name);
        Err(InstanceError::NotSupported)
    }
}

/// A VM's socket, served until this is dropped (then the socket file is removed).
#[derive(Debug)]
pub struct InstanceServer {
    path: PathBuf,
    /// The socket file's (device, inode): a server that lingers removes its own file only, not
    /// the one a server started after it bound at the same path.
    file: Option<(u64, u64)>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long a server that is told to stop still serves, so that the answer to the call that
/// ended the VM (`PowerOff`) reaches its caller.
const LINGER: std::time::Duration = std::time::Duration::from_millis(500);

impl InstanceServer {
    /// Binds VM `vm`'s socket at `path` (replacing a stale one a previous cprd left) and serves
    /// it on a thread of its own.
    pub fn start(engine: Arc<Engine>, bus: zbus::Connection, vm: &str, path: PathBuf) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        }
        let (bound_tx, bound_rx) = std::sync::mpsc::sync_channel(1);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let instance = Instance { engine, bus, vm: vm.to_string() };
        let socket = path.clone();
        let thread = std::thread::Builder::new().name(format!("varlink-{vm}")).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    let _ = bound_tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                let _ = std::fs::remove_file(&socket);
                let listener = match zlink::tokio::unix::bind(&socket) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = bound_tx.send(Err(std::io::Error::other(e.to_string())));
                        return;
                    }
                };
                let opened = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666));
                let _ = bound_tx.send(opened);
                let server = zlink::Server::new(listener, instance);
                let run = server.run();
                tokio::pin!(run);
                tokio::select! {
                    biased;
                    _ = &mut run => {}
                    _ = stopped => {
                        let _ = tokio::time::timeout(LINGER, &mut run).await;
                    }
                }
            });
        })?;
        let mut server = Self { path, file: None, stop: Some(stop), thread: Some(thread) };
        match bound_rx.recv() {
            Ok(Ok(())) => {
                use std::os::unix::fs::MetadataExt;
                server.file = std::fs::symlink_metadata(&server.path).ok().map(|m| (m.dev(), m.ino()));
                Ok(server)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::other("the server thread ended before binding")),
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for InstanceServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        use std::os::unix::fs::MetadataExt;
        let now = std::fs::symlink_metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        if now.is_some() && now == self.file {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
