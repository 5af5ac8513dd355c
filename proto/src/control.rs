//! The control protocol of a VMM process: one request, one response, on a UNIX
//! `SOCK_SEQPACKET` socket (see [`crate::wire`]).
//!
//! The daemon (or the standalone `cpr-vmm handoff` tool) is the client. A handoff is driven
//! through it: [`Request::Migrate`] carries the `cpr` and `main` channel fds to the old VMM,
//! which answers only when the handoff has ended one way or the other (see [`crate::cpr`]).

use serde::{Deserialize, Serialize};

/// Most vCPUs a cpr-vmm guest may have (QEMU guests are not bound by it).
pub const CPR_VMM_MAX_VCPUS: u8 = 8;

/// A request to a VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum Request {
    /// Binary version, build id and the state formats it writes and reads.
    Describe,
    /// Lifecycle state, guest facts and the last handoff's timings.
    Status,
    /// Stop all vCPUs (state kept). Idempotent.
    Pause,
    /// Run the vCPUs again after [`Request::Pause`] or a failed migration. Idempotent.
    Resume,
    /// Stop the guest and exit the process.
    Stop,
    /// Hand the guest to a new VMM. Two fds must be attached: the `cpr` channel (seqpacket)
    /// and the `main` channel (stream), in that order.
    Migrate(MigrateParams),
    /// After the state was sent (and the arbiter committed to the new VMM), exit. Refused in
    /// any other state.
    Quit,
    /// Send back a duplicate of the guest-RAM memfd (answer `Ok` with the fd attached); a
    /// restarted daemon uses it to take the guest's memory back into its own hands.
    GetMemoryFd,
    /// Write the serial console to the fd attached from now on, closing the one before: a
    /// daemon restarted without its end of the console socket (no fd store) hands a new one.
    /// A VMM older than this request answers it with an error and keeps its console.
    SetConsole,
}

/// Parameters of a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateParams {
    /// How long each wait on the new side may take (hello, ready), in milliseconds.
    pub timeout_ms: u64,
}

/// A VMM's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "kebab-case")]
pub enum Response {
    /// The request was carried out.
    Ok,
    /// Answer to [`Request::Describe`].
    Describe(Description),
    /// Answer to [`Request::Status`].
    Status(VmmStatus),
    /// Answer to a successful [`Request::Migrate`]: the state went out, the guest is paused, and
    /// the old VMM waits for `quit` or `resume` ([`RunState::StateSent`]).
    Migrated(HandoffReport),
    /// The request failed; nothing changed unless the error says so.
    Error(ControlError),
}

/// Who a VMM is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Description {
    /// Package version of the binary.
    pub version: String,
    /// Content hash of the running binary, so two builds of one version are told apart.
    pub build_id: String,
    /// The state format version this binary writes.
    pub writes_format: u16,
    /// The state format major versions this binary reads.
    pub reads_formats: Vec<u16>,
    /// Process id.
    pub pid: u32,
}

/// A VMM's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Waiting for state from an old VMM.
    Incoming,
    /// The guest runs.
    Running,
    /// Paused on request.
    Paused,
    /// A handoff is in flight.
    Migrating,
    /// A handoff failed after the guest was paused; waiting for the arbiter's `resume`.
    MigrationFailed,
    /// The state went to the new VMM; the guest is paused here and this VMM waits for its
    /// arbiter's decision: `quit` after the commit (the new VMM runs the guest), `resume` after a
    /// rollback (the new VMM is dead and never ran it). It never decides by itself.
    StateSent,
}

/// Answer to [`Request::Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmmStatus {
    /// Lifecycle state.
    pub state: RunState,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// How many handoffs this guest has been through (0 for the VMM that booted it).
    pub generation: u64,
    /// What the test guest reports about itself, when the guest is the test guest.
    pub test_guest: Option<TestGuestStatus>,
    /// Timings of the handoff that brought the guest into this process, if any.
    pub incoming: Option<HandoffReport>,
}

/// Fields read from the test guest's status block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestGuestStatus {
    /// RAM copy of its counter.
    pub counter: u64,
    /// Heartbeats printed.
    pub heartbeats: u64,
    /// Longest gap between iterations since the host last reset it, in TSC ticks.
    pub max_gap_ticks: u64,
    /// Checksum of its pattern region.
    pub pattern_sum: u64,
    /// Its failure code, 0 while healthy.
    pub fail: u64,
    /// Completed RAM sweeps in touch mode.
    pub sweeps: u64,
}

/// Timings of one handoff, all CLOCK_MONOTONIC nanoseconds (same host, same clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffReport {
    /// Old side: the pause of the vCPUs was requested (downtime starts).
    pub pause_requested_ns: u64,
    /// Old side: every vCPU had stopped.
    pub paused_ns: u64,
    /// Old side: the state was written to the `main` channel.
    pub state_sent_ns: u64,
    /// Size of the state stream in bytes.
    pub state_bytes: u64,
    /// New side: state received and decoded.
    pub state_received_ns: u64,
    /// New side: the state was restored and `Loaded` went to the arbiter (0 from a VMM that
    /// predates the arbiter's commit). `resumed_ns - loaded_ns` is the price of the commit.
    #[serde(default)]
    pub loaded_ns: u64,
    /// Arbiter: `Loaded` was read (0 where no arbiter stamped it).
    #[serde(default)]
    pub loaded_seen_ns: u64,
    /// Arbiter: the decision was persisted and `Commit` is being sent.
    #[serde(default)]
    pub commit_sent_ns: u64,
    /// New side: the vCPUs were released into `KVM_RUN` (downtime ends).
    pub resumed_ns: u64,
    /// Old side: how many threads saved the vCPUs (each vCPU's own as it parked, or vCPU 0's
    /// alone; 0 from a VMM that predates the count).
    #[serde(default)]
    pub save_threads: u8,
    /// New side: how many threads shared the restore of the vCPUs (0 from a VMM that predates
    /// the count).
    #[serde(default)]
    pub restore_threads: u8,
    /// New side's process id.
    pub new_pid: u32,
    /// Generation of the guest in the new process.
    pub generation: u64,
}

impl HandoffReport {
    /// Host-stamped downtime: pause request in the old process to `KVM_RUN` in the new one.
    pub fn downtime_ns(&self) -> u64 {
        self.resumed_ns.saturating_sub(self.pause_requested_ns)
    }
}

/// Error classes on the control socket; stable, so that callers can map them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request does not fit the VMM's current state.
    InvalidState,
    /// The request was malformed (missing fds, bad parameters).
    BadRequest,
    /// The new side cannot read the state this side writes; the guest was not paused.
    Incompatible,
    /// The new side failed or went away before it ran the guest; this side holds the guest.
    PeerFailed,
    /// The new side did not answer in time; this side holds the guest.
    Timeout,
    /// Something failed inside this VMM.
    Internal,
    /// The caller may not use this socket (its uid is neither root nor the VMM's own).
    Forbidden,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    /// Error class.
    pub kind: ErrorKind,
    /// A sentence a human can act on.
    pub message: String,
    /// Whether the guest was paused and now waits for `resume` (only after a failed migration).
    pub guest_paused: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_stable_wire_names() {
        let json = serde_json::to_string(&Request::Migrate(MigrateParams { timeout_ms: 5 })).expect("encode");
        assert_eq!(json, r#"{"request":"migrate","timeout_ms":5}"#);
        let back: Request = serde_json::from_str(r#"{"request":"status"}"#).expect("decode");
        assert_eq!(back, Request::Status);
        assert!(serde_json::from_str::<Request>(r#"{"request":"format-disk"}"#).is_err());
    }

    #[test]
    fn downtime_is_resume_minus_pause_request() {
        let r = HandoffReport { pause_requested_ns: 1_000, resumed_ns: 251_000, ..Default::default() };
        assert_eq!(r.downtime_ns(), 250_000);
    }
}
