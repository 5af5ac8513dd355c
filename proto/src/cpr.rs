//! The `cpr` channel: the messages between the old VMM (O) and the new VMM (N) during a handoff.
//!
//! ```text
//!   N -> O  Hello { reads_formats }        pre-flight: O refuses if its format is not listed
//!   O -> N  Resources { .. } + fds         RAM memfd, serial backend, CPUID, vCPU count
//!   N -> O  Ready                           N mapped + pre-faulted RAM, created VM + vCPUs
//!   O       pause vCPUs, save               (downtime starts)
//!   O -> N  (main channel) the state stream, see crate::state
//!   N -> O  Running { report }             N restored; sent just before its vCPUs enter KVM_RUN
//!   N -> O  Rejected { reason }            N refused the state and exits without running
//! ```
//! Commit point: `Running` is sent before N's first guest instruction. If O sees the channel
//! close without `Running`, N has not run the guest, and O may be resumed once N is known dead.
//! Once O has seen `Running` it never runs the guest again.

use serde::{Deserialize, Serialize};

use crate::control::HandoffReport;

/// Version of this channel protocol; both sides must speak the same one.
pub const CPR_PROTOCOL_VERSION: u32 = 1;

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
    /// The guest is restored and about to run here; the old side must never run it again.
    Running(HandoffReport),
    /// The state was refused; the new side exits without running the guest.
    Rejected {
        /// What was wrong with it.
        reason: String,
    },
}
