//! A blocking QMP client over a UNIX socket. One command in flight at a time; events that
//! arrive meanwhile are kept, with QEMU's timestamps, until [`Qmp::take_events`].

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use cpr_proto::text::excerpt;
use serde_json::{Value, json};

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket failed.
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU closed the connection.
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// Nothing came back in time.
    #[error("QMP timed out waiting for {0}")]
    Timeout(String),
    /// A line was not the JSON QMP promises.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU answered a command with an error.
    #[error("QEMU refused {command}: {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// One QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Its name (`STOP`, `RESUME`, `MIGRATION`, ...).
    pub name: String,
    /// Its data.
    pub data: Value,
    /// QEMU's timestamp, µs since the epoch.
    pub timestamp_us: u64,
}

/// QEMU's version from the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Major.
    pub major: u64,
    /// Minor.
    pub minor: u64,
    /// Micro.
    pub micro: u64,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The longest QMP message cprd accepts, in bytes (the largest it asks for, `query-machines`, is
/// tens of KiB).
pub const MAX_MESSAGE: usize = 1 << 20;

/// How much of a message QEMU sent an error quotes, in bytes.
const SHOWN_BYTES: usize = 200;

/// A message QEMU sent, as an error quotes it: at most [`SHOWN_BYTES`] of its JSON.
fn shown(msg: &Value) -> String {
    excerpt(&msg.to_string(), SHOWN_BYTES)
}

/// How many greetings one connection may bring before cprd gives up on it.
const MAX_GREETINGS: usize = 3;

/// What came back for a command.
enum Reply {
    /// Its `return` value.
    Return(Value),
    /// Its `error`.
    Error {
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// A greeting: the monitor went back to negotiation mode.
    Greeting,
}

/// A negotiated QMP connection.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Event>,
    next_id: u64,
    /// QEMU's version, from the greeting.
    pub version: Version,
    /// QEMU's package string, from the greeting.
    pub package: String,
}

impl Qmp {
    /// Connects to a QMP socket and negotiates capabilities, waiting at most `timeout` for the
    /// greeting (a new QEMU greets only once its monitor runs).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)?;
        Self::negotiate(stream, timeout)
    }

    /// Negotiates capabilities on a connected stream.
    pub fn negotiate(stream: UnixStream, timeout: Duration) -> Result<Self, QmpError> {
        let writer = stream.try_clone()?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
            next_id: 1,
            version: Version { major: 0, minor: 0, micro: 0 },
            package: String::new(),
        };
        let greeting = qmp.read_message(Instant::now() + timeout, "the QMP greeting")?;
        let v = greeting
            .pointer("/QMP/version/qemu")
            .ok_or_else(|| QmpError::Protocol(format!("not a QMP greeting: {}", shown(&greeting))))?;
        let num = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        qmp.version = Version { major: num("major"), minor: num("minor"), micro: num("micro") };
        qmp.package =
            greeting.pointer("/QMP/version/package").and_then(Value::as_str).unwrap_or_default().trim().to_string();
        qmp.negotiate_capabilities(Instant::now() + timeout)?;
        Ok(qmp)
    }

    /// Leaves capabilities negotiation. QEMU may greet a second time on one connection: a client
    /// that connects while QEMU is still starting races its monitor's move to the monitor I/O
    /// thread (both threads see the connection open; fixed upstream after 10.1), and each greeting
    /// puts the monitor back into negotiation mode. So `qmp_capabilities` is sent again after every
    /// greeting, and "already complete" (class `CommandNotFound`) for a repeat counts as success.
    fn negotiate_capabilities(&mut self, deadline: Instant) -> Result<(), QmpError> {
        for attempt in 0..MAX_GREETINGS {
            let id = self.send("qmp_capabilities", None)?;
            match self.wait_reply(id, deadline, "qmp_capabilities")? {
                Reply::Return(_) => return Ok(()),
                Reply::Greeting => continue,
                Reply::Error { class, .. } if attempt > 0 && class == "CommandNotFound" => return Ok(()),
                Reply::Error { class, desc } => {
                    return Err(QmpError::Command { command: "qmp_capabilities".into(), class, desc });
                }
            }
        }
        Err(QmpError::Protocol(format!("QEMU greeted {MAX_GREETINGS} times on one connection")))
    }

    /// Writes one command tagged with a fresh `id`; returns the id.
    fn send(&mut self, command: &str, arguments: Option<&Value>) -> Result<u64, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a.clone();
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| QmpError::Protocol(e.to_string()))?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes)?;
        Ok(id)
    }

    /// Reads until the reply tagged `id` or a greeting; keeps events and drops replies to
    /// earlier commands (a repeated `qmp_capabilities`).
    fn wait_reply(&mut self, id: u64, deadline: Instant, command: &str) -> Result<Reply, QmpError> {
        loop {
            let msg = self.read_message(deadline, command)?;
            if self.keep_event(&msg) {
                continue;
            }
            if msg.get("QMP").is_some() {
                return Ok(Reply::Greeting);
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                if msg.get("return").is_some() || msg.get("error").is_some() {
                    continue;
                }
                return Err(QmpError::Protocol(format!("unexpected reply to {command}: {}", shown(&msg))));
            }
            if let Some(ret) = msg.get("return") {
                return Ok(Reply::Return(ret.clone()));
            }
            if let Some(err) = msg.get("error") {
                let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
                return Ok(Reply::Error { class: field("class"), desc: field("desc") });
            }
            return Err(QmpError::Protocol(format!("unexpected reply to {command}: {}", shown(&msg))));
        }
    }

    /// Reads one message: a line of at most [`MAX_MESSAGE`] bytes, by `deadline`. Both hold
    /// whatever the peer sends: the deadline is checked after every read, so neither a flood
    /// without a newline nor a trickle of bytes keeps the caller past it.
    fn read_message(&mut self, deadline: Instant, what: &str) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout(what.to_string()));
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            let buf = match self.reader.fill_buf() {
                Ok([]) => return Err(QmpError::Closed),
                Ok(buf) => buf,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let (taken, ended) = buf.iter().position(|b| *b == b'\n').map_or((buf.len(), false), |i| (i + 1, true));
            line.extend_from_slice(&buf[..taken]);
            self.reader.consume(taken);
            if ended {
                break;
            }
            if line.len() > MAX_MESSAGE {
                return Err(QmpError::Protocol(format!(
                    "{what}: a message longer than {MAX_MESSAGE} bytes (QMP messages are one line)"
                )));
            }
        }
        serde_json::from_slice(&line).map_err(|e| {
            let text = String::from_utf8_lossy(&line[..line.len().min(SHOWN_BYTES)]);
            QmpError::Protocol(format!("{e} in \"{}\"", excerpt(text.trim_end(), SHOWN_BYTES)))
        })
    }

    fn keep_event(&mut self, msg: &Value) -> bool {
        let Some(name) = msg.get("event").and_then(Value::as_str) else { return false };
        let ts = msg.get("timestamp");
        let secs = ts.and_then(|t| t.get("seconds")).and_then(Value::as_u64).unwrap_or(0);
        let micros = ts.and_then(|t| t.get("microseconds")).and_then(Value::as_u64).unwrap_or(0);
        self.events.push(Event {
            name: name.to_string(),
            data: msg.get("data").cloned().unwrap_or(Value::Null),
            // QEMU's word, not trusted to fit: a timestamp beyond u64 µs saturates rather than
            // wrapping (a release build) or aborting cprd (overflow checks).
            timestamp_us: secs.saturating_mul(1_000_000).saturating_add(micros),
        });
        true
    }

    /// Runs a command, waiting at most 10 s for its answer.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_timeout(command, arguments, Duration::from_secs(10))
    }

    /// Runs a command and returns its `return` value. Should QEMU greet again meanwhile (see
    /// [`Qmp::negotiate_capabilities`]), the connection is negotiated again and a command the
    /// reset monitor refused is sent once more: refused in negotiation mode, it never ran.
    pub fn execute_timeout(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        for _ in 0..MAX_GREETINGS {
            let id = self.send(command, arguments.as_ref())?;
            let mut greeted = false;
            let reply = loop {
                match self.wait_reply(id, deadline, command)? {
                    Reply::Greeting => greeted = true,
                    Reply::Return(v) => break Ok(v),
                    Reply::Error { class, desc } => break Err((class, desc)),
                }
            };
            if greeted {
                self.negotiate_capabilities(deadline)?;
            }
            match reply {
                Ok(v) => return Ok(v),
                Err((class, _)) if greeted && class == "CommandNotFound" => continue,
                Err((class, desc)) => return Err(QmpError::Command { command: command.to_string(), class, desc }),
            }
        }
        Err(QmpError::Protocol(format!("QEMU greeted {MAX_GREETINGS} times on one connection")))
    }

    /// Runs a command with `fd` passed along it (`SCM_RIGHTS` on the command's first byte), as
    /// `add-fd` and `getfd` take one. Not repeated after a second greeting: the descriptor went
    /// with the first sending.
    pub fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + Duration::from_secs(10);
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| QmpError::Protocol(e.to_string()))?;
        bytes.push(b'\n');
        let fds = [fd.as_raw_fd()];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        let first = [std::io::IoSlice::new(&bytes[..1])];
        nix::sys::socket::sendmsg::<()>(
            self.writer.as_raw_fd(),
            &first,
            &cmsg,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(std::io::Error::from)?;
        self.writer.write_all(&bytes[1..])?;
        match self.wait_reply(id, deadline, command)? {
            Reply::Return(v) => Ok(v),
            Reply::Error { class, desc } => Err(QmpError::Command { command: command.to_string(), class, desc }),
            Reply::Greeting => {
                Err(QmpError::Protocol(format!("QEMU greeted again while {command} carried a descriptor")))
            }
        }
    }

    /// The run state (`running`, `paused`, `postmigrate`, `inmigrate`, ...).
    pub fn status(&mut self) -> Result<String, QmpError> {
        let s = self.execute("query-status", None)?;
        s.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QmpError::Protocol(format!("query-status answered {}", shown(&s))))
    }

    /// Events received so far, oldest first; the buffer is emptied.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Negotiates on one end of a socket pair whose other end `peer` drives; returns the result
    /// and how long it took.
    fn negotiate_with(
        peer: impl FnOnce(UnixStream) + Send + 'static,
        timeout: Duration,
    ) -> (Result<Qmp, QmpError>, Duration) {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let feeder = std::thread::spawn(move || peer(theirs));
        let started = Instant::now();
        let r = Qmp::negotiate(ours, timeout);
        let took = started.elapsed();
        let _ = feeder.join();
        (r, took)
    }

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;

    /// A scripted QEMU monitor on `s` (a mock: the race it plays cannot be produced on demand):
    /// it greets, then answers each command with the lines `answer` gives for (command, id).
    fn scripted_monitor(
        s: UnixStream,
        mut answer: impl FnMut(&str, u64) -> Vec<String> + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut w = s.try_clone().expect("clone");
            let _ = writeln!(w, "{GREETING}");
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { return };
                let v: Value = serde_json::from_str(&line).expect("json");
                let cmd = v["execute"].as_str().unwrap_or_default().to_string();
                let id = v["id"].as_u64().unwrap_or(0);
                for out in answer(&cmd, id) {
                    if writeln!(w, "{out}").is_err() {
                        return;
                    }
                }
                if cmd == "quit" {
                    return;
                }
            }
        })
    }

    /// CI saw QEMU 10.0 greet twice on one connection made while it started (its monitor's move to
    /// the I/O thread races the accept): the second greeting came where the reply to
    /// `qmp_capabilities` was expected and the pre-flight called the binary "not a working QEMU".
    /// Each greeting resets the monitor to negotiation mode, so cprd negotiates again.
    #[test]
    fn a_second_greeting_during_negotiation_is_negotiated_again() {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let mut negotiated = false;
        let peer = scripted_monitor(theirs, move |cmd, id| match cmd {
            "qmp_capabilities" if id == 1 => {
                negotiated = true;
                vec![GREETING.to_string(), format!(r#"{{"return": {{}}, "id": {id}}}"#)]
            }
            "qmp_capabilities" => vec![format!(
                r#"{{"id": {id}, "error": {{"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}}}"#
            )],
            "query-status" if negotiated => vec![format!(r#"{{"return": {{"status": "running"}}, "id": {id}}}"#)],
            _ => vec![format!(r#"{{"return": {{}}, "id": {id}}}"#)],
        });
        let mut qmp = Qmp::negotiate(ours, Duration::from_secs(5)).expect("negotiated despite the second greeting");
        assert_eq!(qmp.version, Version { major: 10, minor: 0, micro: 2 });
        assert_eq!(qmp.status().expect("query-status"), "running");
        let _ = qmp.execute("quit", None);
        peer.join().expect("peer");
    }

    /// The second greeting may come after negotiation: the reset monitor refuses the next command
    /// ("Expecting capabilities negotiation"), which never ran; cprd negotiates and sends it again.
    #[test]
    fn a_command_refused_by_a_monitor_that_greeted_again_is_sent_again() {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let mut in_negotiation = true;
        let mut greeted_again = false;
        let mut runs = 0;
        let peer = scripted_monitor(theirs, move |cmd, id| {
            let ok = format!(r#"{{"return": {{}}, "id": {id}}}"#);
            match cmd {
                "qmp_capabilities" if in_negotiation => {
                    in_negotiation = false;
                    vec![ok]
                }
                "qmp_capabilities" => vec![format!(
                    r#"{{"id": {id}, "error": {{"class": "CommandNotFound", "desc": "already complete"}}}}"#
                )],
                _ if !greeted_again => {
                    greeted_again = true;
                    in_negotiation = true;
                    vec![
                        GREETING.to_string(),
                        format!(
                            r#"{{"id": {id}, "error": {{"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}}}"#
                        ),
                    ]
                }
                "stop" if !in_negotiation => {
                    runs += 1;
                    vec![format!(r#"{{"return": {{"runs": {runs}}}, "id": {id}}}"#)]
                }
                _ => vec![ok],
            }
        });
        let mut qmp = Qmp::negotiate(ours, Duration::from_secs(5)).expect("negotiated");
        let ret = qmp.execute("stop", None).expect("sent again after negotiating again");
        assert_eq!(ret["runs"], 1, "the command ran once: {ret}");
        let _ = qmp.execute("quit", None);
        peer.join().expect("peer");
    }

    /// A command QEMU does not know stays an error when no greeting came between.
    #[test]
    fn an_unknown_command_is_an_error_without_a_second_greeting() {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let peer = scripted_monitor(theirs, move |cmd, id| match cmd {
            "no-such" => vec![format!(
                r#"{{"id": {id}, "error": {{"class": "CommandNotFound", "desc": "The command no-such has not been found"}}}}"#
            )],
            _ => vec![format!(r#"{{"return": {{}}, "id": {id}}}"#)],
        });
        let mut qmp = Qmp::negotiate(ours, Duration::from_secs(5)).expect("negotiated");
        let e = qmp.execute("no-such", None).expect_err("refused");
        assert!(matches!(&e, QmpError::Command { class, .. } if class == "CommandNotFound"), "{e}");
        let _ = qmp.execute("quit", None);
        peer.join().expect("peer");
    }

    /// A peer (a fake QEMU: a real one never does this) that floods bytes without a newline:
    /// refused once the line passes the limit, not buffered without end.
    #[test]
    fn a_message_without_end_is_refused_at_the_limit() {
        let (r, _) = negotiate_with(
            |mut s| {
                let chunk = vec![b'x'; 64 << 10];
                for _ in 0..40 {
                    if s.write_all(&chunk).is_err() {
                        break;
                    }
                }
            },
            Duration::from_secs(20),
        );
        let e = r.expect_err("refused").to_string();
        assert!(e.contains("longer than 1048576 bytes"), "{e}");
    }

    /// A peer that trickles a byte every 5 ms and never ends the line: the deadline holds.
    #[test]
    fn a_trickle_does_not_hold_the_caller_past_its_deadline() {
        let (r, took) = negotiate_with(
            |mut s| {
                for _ in 0..400 {
                    if s.write_all(b"x").is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            },
            Duration::from_millis(300),
        );
        assert!(matches!(r, Err(QmpError::Timeout(_))), "{r:?}");
        assert!(took < Duration::from_millis(1500), "returned after {took:?}");
    }
}
