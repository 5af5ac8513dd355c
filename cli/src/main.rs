//! cprctl, the command-line client of cprd.
//!
//! Not built yet: it comes with the daemon. Until then this binary only answers `--version`.

use clap::Parser;

/// cprctl: list, start, stop and upgrade the VMs that cprd owns.
#[derive(Debug, Parser)]
#[command(name = "cprctl", version, about)]
struct Cli {}

fn main() -> std::process::ExitCode {
    let _cli = Cli::parse();
    eprintln!("cprctl: error: cprd is not implemented yet; use `cpr-vmm handoff` for standalone handoffs");
    std::process::ExitCode::from(2)
}
