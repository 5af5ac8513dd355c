//! cprd's errors. The D-Bus names are part of the API (`org.cprd1.Error.*`); keep them stable.

/// An error of a cprd operation, as callers see it.
#[derive(Debug, Clone, PartialEq, zbus::DBusError)]
#[zbus(prefix = "org.cprd1.Error")]
pub enum CprdError {
    /// Transport-level failure (never produced by cprd itself).
    #[zbus(error)]
    ZBus(zbus::Error),
    /// No VM of that name is defined.
    NoSuchVM(String),
    /// A malformed argument, or a configuration that does not validate.
    InvalidArgument(String),
    /// The VMM binary is not allowed, or the caller may not do this.
    NotAllowed(String),
    /// The new VMM cannot take the guest (state format, version); nothing changed.
    Incompatible(String),
    /// The VM is busy with another operation.
    Busy(String),
    /// The VMM could not be started.
    StartFailed(String),
    /// The upgrade failed and was rolled back: the guest runs on in the old VMM.
    UpgradeFailed(String),
    /// The upgrade failed and the old VMM could not be resumed.
    RollbackFailed(String),
    /// The caller is not allowed to change anything.
    AccessDenied(String),
}
