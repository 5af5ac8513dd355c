//! The channels of a handoff between two cpr-vmm processes: `cpr` between the old VMM (O) and
//! the new VMM (N), and `commit` between the arbiter (A: cprd, or `cpr-vmm handoff`) and N.
//!
//! ```text
//!   N -> O  Hello { reads_formats }        pre-flight: O refuses if its format is not listed
//!   O -> N  Resources { .. } + fds         RAM memfd, serial backend, CPUID, vCPU count
//!   N -> O  Ready                           N mapped + pre-faulted RAM, created VM + vCPUs
//!   O -> N  Pausing                         optional: the state follows at once
//!   O       pause vCPUs, save               (downtime starts)
//!   O -> N  (main channel) the state stream, see crate::state
//!   N -> A  Loaded                          N restored and checked the state; it has run nothing
//!   N -> A  Rejected { reason }            N refused the state and exits without running
//!   A -> N  Commit                          the decision: N runs the guest, O never again
//!   N -> A  Running { report }             N's vCPUs are in KVM_RUN (downtime ended)
//! ```
//! The commit point belongs to the arbiter: N runs no guest instruction before it reads
//! `Commit`. If the commit channel closes first (the arbiter died, or gave up), N exits without
//! running the guest. O never decides anything: it answers its arbiter once the state is sent
//! and then waits, paused, for `quit` (after a commit) or `resume` (after a rollback).

use serde::{Deserialize, Serialize};

use crate::control::HandoffReport;

/// Version of this channel protocol; both sides must speak the same one. Version 2 moved the
/// commit from N's `Running` (sent to O as N resumed) to the arbiter's `Commit`.
pub const CPR_PROTOCOL_VERSION: u32 = 2;

/// What the new side says first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`CPR_PROTOCOL_VERSION`] of the new side.
    pub protocol: u32,
    /// State format major versions the new side reads.
    pub reads_formats: Vec<u16>,
    /// Package version of the new side.
    pub version: String,
    /// Process id of the new side.
    pub pid: u32,
}

/// Messages from the old side to the new side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "kebab-case")]
pub enum ToNew {
    /// The guest's resources; fds attached in the order of `fd_names`.
    Resources(Resources),
    /// The handoff is off (pre-flight refused, or the old side gave up); exit without running.
    Abort {
        /// Why.
        reason: String,
    },
    /// Sent just before the old side stops the guest: the state follows within the downtime,
    /// so the new side may now wait for it without sleeping. Optional within protocol 2: an old
    /// side may never send it, and a new side that has closed the cpr channel after `Ready`
    /// never reads it (the old side ignores the failed send).
    Pausing,
}

/// The resources the new VMM needs before the switchover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// Names of the attached fds, in order: `ram`, then optional `serial-out`, `serial-in`.
    pub fd_names: Vec<String>,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The guest's CPUID, exactly as the old side set it (`kvm_cpuid_entry2` records).
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    /// Generation of the guest in the old process.
    pub generation: u64,
    /// What kind of guest runs (decides, e.g., whether the test guest's failure port is watched).
    pub guest: crate::state::GuestKind,
}

/// Messages from the new side to the old side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "kebab-case")]
pub enum ToOld {
    /// Pre-flight information.
    Hello(Hello),
    /// Prepared; the old side may pause the guest.
    Ready,
}

/// Messages from the new VMM to its arbiter, on the commit channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "kebab-case")]
pub enum ToArbiter {
    /// The whole state arrived, checked and restored; the new VMM has run nothing and waits for
    /// [`FromArbiter::Commit`].
    Loaded,
    /// The new VMM runs the guest; the report has both sides' timestamps.
    Running(HandoffReport),
    /// The state was refused; the new VMM exits without running the guest.
    Rejected {
        /// What was wrong with it.
        reason: String,
    },
}

/// Messages from the arbiter to the new VMM, on the commit channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "kebab-case")]
pub enum FromArbiter {
    /// The decision: run the guest. From here on the old VMM never runs it again.
    Commit,
    /// The handoff is off: exit without running the guest.
    Abort {
        /// Why.
        reason: String,
    },
}
