//! cprd, the host daemon that owns VMs and upgrades their VMM live.

use cprd::{VERSION, control, dbus, engine, fdstore, files, machined, reexec, sched, scope};
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;

/// cprd: keeps VMs running while their VMM is upgraded under them.
#[derive(Debug, Parser)]
#[command(name = "cprd", version = VERSION, about)]
struct Cli {
    /// Bus address to use instead of the system bus (also DBUS_SYSTEM_BUS_ADDRESS).
    #[arg(long)]
    bus_address: Option<String>,
    /// Use the session bus (development).
    #[arg(long)]
    user: bool,
    /// Configuration directory (the operator's).
    #[arg(long, default_value = "/etc/cprd")]
    config_dir: PathBuf,
    /// The distribution's defaults: `DIR/config.d/*.toml`, read before the configuration
    /// directory.
    #[arg(long, default_value = "/usr/lib/cprd")]
    vendor_config_dir: PathBuf,
    /// Write the man page cprd.8 into DIR and exit (for packaging).
    #[arg(long, hide = true, value_name = "DIR")]
    generate_man: Option<PathBuf>,
    /// Runtime directory (control sockets, records, console logs).
    #[arg(long, default_value = "/run/cprd")]
    runtime_dir: PathBuf,
}

fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("CPRD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let journald =
        std::path::Path::new("/run/systemd/journal/socket").exists() && std::env::var_os("CPRD_STDERR").is_none();
    let registry = tracing_subscriber::registry().with(filter);
    if journald && let Ok(layer) = tracing_journald::layer() {
        registry.with(layer.with_syslog_identifier("cprd".into()).with_field_prefix(None)).init();
        return;
    }
    registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false)).init();
}

async fn run(
    cli: Cli,
    mut stored: std::collections::HashMap<String, std::os::fd::OwnedFd>,
    reexeced: bool,
) -> Result<(), String> {
    // The signal handlers come first. SIGHUP's default action ends the process: a `systemctl
    // reload` during start-up would have killed cprd; and systemd >= 262 refuses a notify-reload
    // service whose main process has no SIGHUP handler when it says READY=1 (it checks, and
    // cprd once set its handlers up only after that).
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map_err(|e| e.to_string())?;
    let vendor = Some(cli.vendor_config_dir.clone());
    let engine =
        engine::Engine::new(vendor, cli.config_dir.clone(), cli.runtime_dir.clone()).map_err(|e| e.to_string())?;
    let control = control::listener(&mut stored, &cli.runtime_dir)
        .map_err(|e| format!("cannot open the control socket in {}: {e}", cli.runtime_dir.display()))?;
    // What a previous cprd left is read now; the VMMs are asked only once the bus name is taken.
    let pending = engine.pending_reattach(&mut stored);
    let builder = match (&cli.bus_address, cli.user) {
        (Some(a), _) => zbus::connection::Builder::address(a.as_str()),
        (None, true) => zbus::connection::Builder::session(),
        (None, false) => match std::env::var("DBUS_SYSTEM_BUS_ADDRESS") {
            Ok(a) => zbus::connection::Builder::address(a.as_str()),
            Err(_) => zbus::connection::Builder::system(),
        },
    };
    let conn = builder
        .serve_at(dbus::MANAGER_PATH, dbus::Manager { engine: Arc::clone(&engine) })
        .name("org.cprd1")
        .build()
        .await
        .map_err(|e| format!("cannot own org.cprd1 on the bus: {e}"))?;
    dbus::register_vms(&conn, &engine).await.map_err(|e| e.to_string())?;
    control::serve(Arc::clone(&engine), control);
    scope::init(&conn).await;
    tokio::spawn(dbus::forward_events(conn.clone(), Arc::clone(&engine)));
    {
        // Every call to a VMM has a deadline, and the VMs are taken back in parallel: a VMM that
        // does not answer makes its VM `needs-attention`; the others come up.
        let e = Arc::clone(&engine);
        tokio::task::spawn_blocking(move || e.reattach(pending, stored)).await.map_err(|e| e.to_string())?;
        let e = Arc::clone(&engine);
        tokio::task::spawn_blocking(move || e.autostart()).await.map_err(|e| e.to_string())?;
    }
    // Registered with machined once every VM has been taken back, and after each change.
    tokio::spawn(machined::run(conn.clone(), Arc::clone(&engine), cli.runtime_dir.clone()));
    if reexeced {
        // Re-executed in the middle of a reload: finish it; that says READY=1.
        tracing::info!("cprd {} re-executed; finishing the reload", VERSION);
        let _ = dbus::finish_reload(&conn, &engine).await;
    } else {
        let status = format!("STATUS={}", engine.status_line());
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Custom(&status)]);
    }
    tracing::info!("cprd {} ready: {}", VERSION, engine.status_line());
    {
        // A VM a reload marked while its guest did not run, whose guest runs now (cprd ended
        // between its resume and the handoff): moved in the background, after READY.
        let e = Arc::clone(&engine);
        tokio::task::spawn_blocking(move || {
            for v in e.list().into_iter().filter(|v| v.upgrade_due) {
                e.run_due_upgrade(&v.name);
            }
        });
    }
    if let Some(interval) = sd_notify::watchdog_enabled() {
        let period = interval / 2;
        tokio::spawn(async move {
            loop {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                tokio::time::sleep(period).await;
            }
        });
    }
    let lost = bus_lost(&conn);
    tokio::pin!(lost);
    loop {
        tokio::select! {
            why = &mut lost => {
                // The VMs are untouched; the service manager restarts cprd, which re-attaches.
                return Err(format!("lost the bus connection ({why}); exiting so that cprd is restarted"));
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            // systemd's Type=notify-reload (and `kill -HUP`) ask for a reload with SIGHUP.
            _ = hup.recv() => {
                let _ = dbus::reload(&conn, &engine, true).await;
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    // Give the name up first: calls from now on queue at the bus (D-Bus activation) for the next
    // cprd instead of reaching one that is going away; calls already here are answered.
    control::STOPPING.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = conn.release_name("org.cprd1").await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    // What the control socket accepted is answered before the process goes.
    let _ = tokio::task::spawn_blocking(|| control::wait_until_answered(std::time::Duration::from_secs(2))).await;
    // VMMs run in their own sessions and keep running; the next cprd re-attaches them.
    tracing::info!("cprd stopping; {} keep running", engine.status_line());
    Ok(())
}

/// Resolves once the bus connection is gone: the bus daemon exited, or dropped cprd (as it does
/// after a message above its size limit). A cprd off the bus would run on, deaf to every call.
async fn bus_lost(conn: &zbus::Connection) -> String {
    use futures_util::StreamExt;
    let mut messages = zbus::MessageStream::from(conn);
    while let Some(message) = messages.next().await {
        if let Err(e) = message {
            return e.to_string();
        }
    }
    "the bus closed the connection".into()
}

fn main() -> std::process::ExitCode {
    // First: nothing cprd or its VMMs create is readable by others unless given a mode.
    files::set_umask();
    let cli = Cli::parse();
    if let Some(dir) = &cli.generate_man {
        use clap::CommandFactory;
        let mut page = Vec::new();
        let written = clap_mangen::Man::new(Cli::command())
            .section("8")
            .render(&mut page)
            .and_then(|()| std::fs::create_dir_all(dir))
            .and_then(|()| std::fs::write(dir.join("cprd.8"), page));
        if let Err(e) = written {
            eprintln!("cprd: cannot write the man page into {}: {e}", dir.display());
            return std::process::ExitCode::FAILURE;
        }
        return std::process::ExitCode::SUCCESS;
    }
    init_logging();
    // Still single-threaded: take what systemd passed, then clear the variables that described
    // it, so that a re-executed image does not take the same fd numbers again.
    let mut stored = fdstore::take();
    // After a re-exec, systemd passes nothing: the previous image handed its held fds over.
    stored.extend(fdstore::take_from_previous_image());
    let reexeced = std::env::var_os(reexec::ENV).is_some();
    if let Some(raw) = std::env::var(reexec::CONTROL_FD_ENV).ok().and_then(|v| v.parse::<i32>().ok()) {
        // SAFETY: the image before the re-exec left this listening socket open for us alone.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        let _ = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
        stored.insert(control::FD_NAME.to_string(), fd);
    }
    for var in
        ["LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID", reexec::ENV, reexec::CONTROL_FD_ENV, fdstore::REEXEC_FDS_ENV]
    {
        // SAFETY: no other thread exists yet, so nothing reads the environment concurrently.
        unsafe { std::env::remove_var(var) };
    }
    reexec::remember();
    sched::weight_own_session();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cprd: error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli, stored, reexeced)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("cprd: error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
