//! cprd, the host daemon that owns VMs and upgrades their VMM live.
//!
//! Not built yet: the daemon is the subject of its own issue. Until then this binary only
//! answers `--version`, and says so instead of pretending to run.

use clap::Parser;

/// cprd: keeps VMs running while their VMM is upgraded under them.
#[derive(Debug, Parser)]
#[command(name = "cprd", version, about)]
struct Cli {}

fn main() -> std::process::ExitCode {
    let _cli = Cli::parse();
    eprintln!("cprd: error: the daemon is not implemented yet; use `cpr-vmm handoff` for standalone handoffs");
    std::process::ExitCode::from(2)
}
