//! Message framing on UNIX `SOCK_SEQPACKET` sockets: one datagram is one message, encoded as
//! JSON, with up to [`MAX_FDS`] file descriptors attached as `SCM_RIGHTS`.
//!
//! Seqpacket keeps message boundaries and reports a peer that went away as end-of-file, which
//! is exactly what a handoff needs to tell "the other side died" from "no message yet".

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::cmsg_space;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest message accepted on a control or cpr socket.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Most fds one message may carry.
pub const MAX_FDS: usize = 16;

/// Why a message could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed its end (or died) before a message arrived.
    #[error("the peer closed the connection")]
    Closed,
    /// Nothing arrived within the allowed time.
    #[error("no message within {0:?}")]
    Timeout(Duration),
    /// A system call on the socket failed.
    #[error("socket error: {0}")]
    Io(#[from] nix::Error),
    /// The message did not decode as the expected type.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The message was larger than [`MAX_MESSAGE_BYTES`] or carried more than [`MAX_FDS`] fds.
    #[error("message too large or carrying too many fds")]
    TooLarge,
}

/// A received message together with the fds that came with it, in sending order.
#[derive(Debug)]
pub struct Received<T> {
    /// The decoded message.
    pub msg: T,
    /// The fds attached to it.
    pub fds: Vec<OwnedFd>,
    /// Who sent it, as the kernel stamps it (pid, uid), when the receiving socket has
    /// `SO_PASSCRED` on ([`pass_credentials`]): not what the sender says about itself.
    pub sender: Option<(u32, u32)>,
}

/// Turns on `SO_PASSCRED` for `sock`: every message received on it afterwards carries the
/// sending process's pid and uid, stamped by the kernel ([`Received::sender`]).
pub fn pass_credentials(sock: BorrowedFd<'_>) -> std::io::Result<()> {
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::PassCred, &true).map_err(std::io::Error::from)
}

/// Encodes `msg` as the bytes of one datagram: JSON, at most [`MAX_MESSAGE_BYTES`].
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let bytes = serde_json::to_vec(msg).map_err(|e| WireError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge);
    }
    Ok(bytes)
}

/// Decodes the bytes of one received datagram as a `T`: the one decoder every control, cpr and
/// commit message goes through ([`recv`] and the fuzz target `wire_message`).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge);
    }
    serde_json::from_slice(bytes)
        .map_err(|e| WireError::Malformed(crate::text::excerpt(&e.to_string(), MAX_ERROR_TEXT)))
}

/// The longest text of a [`WireError::Malformed`] about a received message (serde's messages
/// quote the offending value, which the peer chose).
pub const MAX_ERROR_TEXT: usize = 300;

/// Sends `msg` as one datagram on `sock`, with `fds` attached.
pub fn send<T: Serialize>(sock: BorrowedFd<'_>, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<(), WireError> {
    let bytes = encode(msg)?;
    if fds.len() > MAX_FDS {
        return Err(WireError::TooLarge);
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsgs = if raw.is_empty() { vec![] } else { vec![ControlMessage::ScmRights(&raw)] };
    let iov = [IoSlice::new(&bytes)];
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(nix::Error::EINTR) => continue,
            Err(nix::Error::EPIPE | nix::Error::ECONNRESET) => return Err(WireError::Closed),
            Err(e) => return Err(WireError::Io(e)),
        }
    }
}

/// Waits until `sock` is readable (or hung up), for at most `timeout` (`None`: forever).
pub fn wait_readable(sock: BorrowedFd<'_>, timeout: Option<Duration>) -> Result<(), WireError> {
    let Some(limit) = timeout else { return Ok(()) };
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(sock, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) if left.is_zero() => return Err(WireError::Timeout(limit)),
            Ok(0) => continue,
            Ok(_) => return Ok(()),
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(WireError::Io(e)),
        }
    }
}

/// How long a wait on a handoff's critical path spins before it sleeps: far longer than the
/// arbiter takes to decide, short enough that a stuck arbiter costs little CPU.
pub const SWITCHOVER_SPIN: Duration = Duration::from_millis(2);

/// Polls `sock` without sleeping until it is readable (or hung up), for at most `limit`; true
/// if it is. For a wait on a handoff's critical path: a reader that sleeps pays for its wake-up
/// (measured here: the new VMM's wait for `Commit` took 35 µs asleep, 13 µs spinning, with 2 and
/// 4 vCPUs), one that spins pays a CPU for at most `limit`.
pub fn spin_until_readable(sock: BorrowedFd<'_>, limit: Duration) -> bool {
    let start = std::time::Instant::now();
    loop {
        let mut fds = [PollFd::new(sock, PollFlags::POLLIN)];
        if matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        // Any other thread that wants this CPU goes first: a plain spin held back the very
        // thread it waited for when both landed on one CPU (downtime p99 4.5 ms, a scheduler
        // slice, against 0.9 ms).
        std::thread::yield_now();
    }
}

/// Receives one message from `sock`, waiting at most `timeout` (`None`: block).
pub fn recv<T: DeserializeOwned>(sock: BorrowedFd<'_>, timeout: Option<Duration>) -> Result<Received<T>, WireError> {
    wait_readable(sock, timeout)?;
    // The datagram's size first (MSG_PEEK | MSG_TRUNC gives it whole): a buffer of exactly that
    // size, not of the largest message, which on the handoff's critical path would cost page
    // faults for 256 KiB per small message.
    let size = loop {
        match nix::sys::socket::recv(sock.as_raw_fd(), &mut [0u8; 1], MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC) {
            Ok(n) => break n,
            Err(nix::Error::EINTR) => continue,
            Err(nix::Error::ECONNRESET) => return Err(WireError::Closed),
            Err(e) => return Err(WireError::Io(e)),
        }
    };
    let mut buf = vec![0u8; size.clamp(1, MAX_MESSAGE_BYTES + 1)];
    let mut cmsg_buf = cmsg_space!([RawFd; MAX_FDS], libc::ucred);
    let (len, fds, sender, truncated) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg_buf), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(r) => {
                let mut fds = Vec::new();
                let mut sender = None;
                for cmsg in r.cmsgs().map_err(WireError::Io)? {
                    match cmsg {
                        ControlMessageOwned::ScmRights(raw) => {
                            for fd in raw {
                                // SAFETY: the kernel just installed `fd` in our table for this
                                // message; nothing else owns it.
                                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                            }
                        }
                        ControlMessageOwned::ScmCredentials(c) => {
                            sender = u32::try_from(c.pid()).ok().map(|pid| (pid, c.uid()));
                        }
                        _ => {}
                    }
                }
                let truncated = r.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                break (r.bytes, fds, sender, truncated);
            }
            Err(nix::Error::EINTR) => continue,
            Err(nix::Error::ECONNRESET) => return Err(WireError::Closed),
            Err(e) => return Err(WireError::Io(e)),
        }
    };
    if truncated || len > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge);
    }
    if len == 0 {
        return Err(WireError::Closed);
    }
    let msg = decode(&buf[..len])?;
    Ok(Received { msg, fds, sender })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use std::os::fd::AsFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).expect("socketpair")
    }

    #[test]
    fn a_spinning_wait_ends_when_a_message_arrives_or_its_limit_passes() {
        let (a, b) = pair();
        let limit = Duration::from_millis(20);
        let start = std::time::Instant::now();
        assert!(!spin_until_readable(b.as_fd(), limit), "nothing was sent");
        assert!(start.elapsed() >= limit, "gave up after {:?}", start.elapsed());
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            send(a.as_fd(), &7u32, &[]).expect("send");
            a
        });
        assert!(spin_until_readable(b.as_fd(), Duration::from_secs(10)), "the message was missed");
        assert_eq!(recv::<u32>(b.as_fd(), Some(Duration::ZERO)).expect("recv").msg, 7);
        // A hung-up peer ends the wait too: the reader then sees the channel closed.
        drop(sender.join().expect("sender"));
        assert!(spin_until_readable(b.as_fd(), Duration::from_secs(10)), "the hang-up was missed");
    }

    #[test]
    fn the_sender_is_known_only_with_so_passcred_and_is_the_kernels_word() {
        let (a, b) = pair();
        send(a.as_fd(), &"hello", &[]).expect("send");
        let r: Received<String> = recv(b.as_fd(), None).expect("recv");
        assert_eq!(r.sender, None);
        pass_credentials(b.as_fd()).expect("SO_PASSCRED");
        send(a.as_fd(), &"hello", &[]).expect("send");
        let r: Received<String> = recv(b.as_fd(), None).expect("recv");
        assert_eq!(r.sender, Some((std::process::id(), nix::unistd::getuid().as_raw())));
    }

    #[test]
    fn message_and_fds_round_trip() {
        let (a, b) = pair();
        let (x, _y) = pair();
        send(a.as_fd(), &vec![1u32, 2, 3], &[x.as_fd()]).expect("send");
        let got: Received<Vec<u32>> = recv(b.as_fd(), Some(Duration::from_secs(1))).expect("recv");
        assert_eq!(got.msg, vec![1, 2, 3]);
        assert_eq!(got.fds.len(), 1);
    }

    #[test]
    fn closed_peer_and_timeout_are_told_apart() {
        let (a, b) = pair();
        let err = recv::<u32>(b.as_fd(), Some(Duration::from_millis(20))).expect_err("nothing sent");
        assert!(matches!(err, WireError::Timeout(_)));
        drop(a);
        let err = recv::<u32>(b.as_fd(), Some(Duration::from_millis(20))).expect_err("peer gone");
        assert!(matches!(err, WireError::Closed));
    }

    #[test]
    fn malformed_message_is_an_error_not_a_panic() {
        let (a, b) = pair();
        send(a.as_fd(), &"text", &[]).expect("send");
        let err = recv::<u64>(b.as_fd(), None).expect_err("wrong type");
        assert!(matches!(err, WireError::Malformed(_)));
    }
}
