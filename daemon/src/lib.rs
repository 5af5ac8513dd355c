//! cprd as a library: the daemon's parts, for its binary (`main.rs`) and for the fuzz targets
//! in `fuzz/`, which feed its parsers (VM definitions, settings, runtime records, the fd store's
//! state record) inputs they do not control.

pub mod backend;
pub mod config;
pub mod console;
pub mod control;
pub mod dbus;
pub mod engine;
pub mod error;
pub mod fdstore;
pub mod files;
mod machine_instance;
pub mod machined;
pub mod metrics;
pub mod qemu;
pub mod reexec;
pub mod sandbox;
pub mod sched;
pub mod scope;

/// The version `--version` prints: the package's (`CPRD_BUILD_STAMP`, set by packaging/build),
/// else the crate's. Packages of different versions thus carry binaries with different build ids.
pub const VERSION: &str = match option_env!("CPRD_BUILD_STAMP") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};
