//! Errors of the VMM and the process exit code of each class (after Firecracker's `FcExitCode`).

use std::path::PathBuf;

/// Process exit codes; each failure class has its own, so callers can tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// Clean exit: `stop`, `quit` after a handoff, or the guest reset itself.
    Ok = 0,
    /// An unexpected internal failure.
    Internal = 1,
    /// Bad command line (clap's own usage errors also use 2).
    Usage = 2,
    /// A bad machine configuration (vCPU count, memory size).
    BadConfig = 10,
    /// The guest image (kernel, initramfs, ELF) is missing or unusable.
    GuestImage = 11,
    /// The guest-RAM fd is unusable (unreadable, too small, not shareable).
    Memory = 12,
    /// `/dev/kvm` is missing, or KVM refused a request.
    Kvm = 13,
    /// The control socket could not be created.
    ControlSocket = 14,
    /// The test guest detected a broken invariant (its fail port was written).
    GuestSelfCheck = 20,
    /// The guest crashed (triple fault, KVM internal error, failed entry).
    GuestCrashed = 21,
    /// Incoming handoff: the old side aborted, or the channel closed before the state arrived.
    IncomingAborted = 30,
    /// Incoming handoff: the state stream was refused (corrupt, incompatible).
    StateRejected = 31,
    /// Incoming handoff: restoring the state into KVM failed.
    RestoreFailed = 32,
    /// The standalone handoff tool failed; the guest stayed with the old VMM.
    HandoffFailed = 40,
    /// The standalone handoff tool could not roll back; the guest may be lost.
    RollbackFailed = 41,
}

/// Everything that can go wrong in the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// Kernel, initramfs or ELF problem.
    #[error("{0}")]
    GuestImage(String),
    /// Guest RAM problem.
    #[error("{0}")]
    Memory(String),
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (is the kvm module loaded and are you allowed to use it?)")]
    NoKvm(String),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {err}")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The errno.
        err: kvm_ioctls::Error,
    },
    /// The control socket could not be set up.
    #[error("cannot create control socket {path}: {err}")]
    ControlSocket {
        /// Its path.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// The incoming handoff did not get its state.
    #[error("incoming handoff aborted: {0}")]
    IncomingAborted(String),
    /// The incoming state was refused.
    #[error("state rejected: {0}")]
    StateRejected(String),
    /// Restoring the state failed.
    #[error("restore failed: {0}")]
    Restore(String),
    /// The standalone handoff failed (guest kept by the old VMM).
    #[error("handoff failed: {0}")]
    Handoff(String),
    /// The standalone handoff could not roll back.
    #[error("handoff failed and rollback failed: {0}")]
    Rollback(String),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl VmmError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::Config(_) => ExitCode::BadConfig,
            Self::GuestImage(_) => ExitCode::GuestImage,
            Self::Memory(_) => ExitCode::Memory,
            Self::NoKvm(_) | Self::Kvm { .. } => ExitCode::Kvm,
            Self::ControlSocket { .. } => ExitCode::ControlSocket,
            Self::IncomingAborted(_) => ExitCode::IncomingAborted,
            Self::StateRejected(_) => ExitCode::StateRejected,
            Self::Restore(_) => ExitCode::RestoreFailed,
            Self::Handoff(_) => ExitCode::HandoffFailed,
            Self::Rollback(_) => ExitCode::RollbackFailed,
            Self::Internal(_) => ExitCode::Internal,
        }
    }
}

/// Wraps a KVM ioctl error with the name of the operation.
pub fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |err| VmmError::Kvm { what, err }
}

/// Result type of the VMM.
pub type Result<T> = std::result::Result<T, VmmError>;
