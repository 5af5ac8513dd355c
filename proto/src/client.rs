//! A blocking client of a VMM's control socket, with a deadline on every answer: cprd, the
//! standalone arbiter and the tests use it; a VMM that does not answer in time is an error, never
//! a hang.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, socket};

use crate::control::{Request, Response};
use crate::wire;

/// How long a control call waits for its answer unless told otherwise.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects a `SOCK_SEQPACKET` socket to `path`.
pub fn seqpacket_connect(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
    let addr = UnixAddr::new(path)?;
    nix::sys::socket::connect(fd.as_raw_fd(), &addr)?;
    Ok(fd)
}

/// Binds and listens on a control socket at `path`, replacing a stale socket file left by a dead
/// process but never one someone still listens on (`AddrInUse`). The VMM binds its own when
/// started by hand; cprd binds it for a VMM it boxes in and hands over the listener.
pub fn seqpacket_listen(path: &Path) -> std::io::Result<OwnedFd> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() || seqpacket_connect(path).is_ok() {
            return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "another process is listening there"));
        }
        std::fs::remove_file(path)?;
    }
    let fd = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
    let addr = UnixAddr::new(path)?;
    nix::sys::socket::bind(fd.as_raw_fd(), &addr)?;
    nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(16).unwrap_or(nix::sys::socket::Backlog::MAXCONN))?;
    Ok(fd)
}

/// A connection to one VMM's control socket.
#[derive(Debug)]
pub struct ControlClient {
    fd: OwnedFd,
    timeout: Option<Duration>,
}

impl ControlClient {
    /// Connects to the socket at `path`; answers are awaited for [`DEFAULT_CALL_TIMEOUT`].
    pub fn connect(path: &Path) -> std::io::Result<Self> {
        Ok(Self { fd: seqpacket_connect(path)?, timeout: Some(DEFAULT_CALL_TIMEOUT) })
    }

    /// The same connection with another answer deadline (`None`: wait for ever, only for a call
    /// whose answer legitimately takes unbounded time).
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket, for polling it beside others.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Sends a request (with fds) and waits for the answer.
    pub fn call(&self, request: &Request, fds: &[BorrowedFd<'_>]) -> Result<Response, wire::WireError> {
        Ok(self.call_with_fds(request, fds)?.msg)
    }

    /// Like [`ControlClient::call`], also returning the fds attached to the answer.
    pub fn call_with_fds(
        &self,
        request: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<wire::Received<Response>, wire::WireError> {
        self.send(request, fds)?;
        self.recv(self.timeout)
    }

    /// Sends a request without waiting for its answer.
    pub fn send(&self, request: &Request, fds: &[BorrowedFd<'_>]) -> Result<(), wire::WireError> {
        wire::send(self.fd.as_fd(), request, fds)
    }

    /// Waits up to `timeout` for the answer to a request sent with [`ControlClient::send`].
    pub fn recv(&self, timeout: Option<Duration>) -> Result<wire::Received<Response>, wire::WireError> {
        wire::recv::<Response>(self.fd.as_fd(), timeout)
    }
}
