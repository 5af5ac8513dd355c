//! Real systemd as PID 1 in a `systemd-nspawn` container over a Debian 12 rootfs with systemd 254
//! (built once by `scripts/container-rootfs`, cached as a tarball), with this build's binaries,
//! units and bus files installed, `/dev/kvm` bound in. Commands run inside with `nsenter`.
//! The container is powered off and its files removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::{bin, wait_until};

/// A booted container.
#[derive(Debug)]
pub struct Container {
    _dir: tempfile::TempDir,
    /// Its root directory on the host.
    pub root: PathBuf,
    nspawn: Child,
    /// PID (host view) of the container's systemd.
    pub leader: u32,
    /// Dropped after `nspawn` (fields drop in order): removed once the container is gone.
    _cgroup: OwnCgroup,
}

/// A cgroup of one container's own, made under this process's cgroup in each hierarchy that
/// nspawn builds a container's tree in (the named `systemd` one and the unified one). Without it
/// every container of a test process shares one tree, and their systemd instances create, kill
/// and remove each other's unit cgroups.
#[derive(Debug)]
struct OwnCgroup {
    dirs: Vec<PathBuf>,
}

impl OwnCgroup {
    fn create(name: &str) -> Self {
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
        // Where the unified hierarchy is mounted: beside the v1 ones (hybrid) or as the root.
        let unified = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.join("cgroup.controllers").exists());
        let mut dirs = Vec::new();
        for line in own.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
                continue;
            };
            let base = match (id, controllers, unified) {
                (_, "name=systemd", _) => Path::new("/sys/fs/cgroup/systemd"),
                ("0", "", Some(unified)) => unified,
                _ => continue,
            };
            let dir = base.join(path.trim_start_matches('/')).join(name);
            match std::fs::create_dir(&dir) {
                // Left by a process of the same PID that died before it removed its containers'.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                other => other.unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display())),
            }
            dirs.push(dir);
        }
        assert!(!dirs.is_empty(), "no systemd or unified cgroup hierarchy in {own}");
        Self { dirs }
    }

    /// Their `cgroup.procs` files, `:`-separated.
    fn procs_files(&self) -> String {
        let files: Vec<String> = self.dirs.iter().map(|d| d.join("cgroup.procs").display().to_string()).collect();
        files.join(":")
    }
}

impl Drop for OwnCgroup {
    /// Removes the cgroups, leaves first. A container's last processes may still be exiting (its
    /// nspawn was killed): each removal is retried for up to 10 s, and one that still fails is
    /// reported, not ignored.
    fn drop(&mut self) {
        fn remove_tree(dir: &Path) -> std::io::Result<()> {
            for entry in std::fs::read_dir(dir)?.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&entry.path())?;
                }
            }
            match std::fs::remove_dir(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        for dir in &self.dirs {
            let mut last = Ok(());
            let removed = wait_until(Duration::from_secs(10), || {
                last = remove_tree(dir);
                last.is_ok()
            });
            if !removed {
                eprintln!("container cgroup {} is left behind: {last:?}", dir.display());
            }
        }
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn install(root: &Path, from: &Path, to: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let dest = root.join(to.trim_start_matches('/'));
    std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
    std::fs::copy(from, &dest).unwrap_or_else(|e| panic!("install {} -> {}: {e}", from.display(), dest.display()));
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn write(root: &Path, to: &str, text: &str) {
    let dest = root.join(to.trim_start_matches('/'));
    std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
    std::fs::write(dest, text).expect("write");
}

/// The .deb of cprd `version` that `packaging/build` left in `target/packages` (or
/// `$CPRD_PACKAGES`).
pub fn built_package(version: &str) -> PathBuf {
    let dir = std::env::var("CPRD_PACKAGES").map_or_else(|_| repo().join("target/packages"), PathBuf::from);
    let deb = dir.join(format!("cprd_{version}_amd64.deb"));
    assert!(
        deb.exists(),
        "{} is missing: run `packaging/build --version {version}` (scripts/test does)",
        deb.display()
    );
    deb.canonicalize().expect("package path")
}

/// Unpacks the rootfs `scripts/container-rootfs` builds (with `env`) into a fresh directory.
fn unpack(env: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    let out = Command::new(repo().join("scripts/container-rootfs"))
        .envs(env.iter().copied())
        .output()
        .expect("container-rootfs");
    assert!(out.status.success(), "rootfs: {}", String::from_utf8_lossy(&out.stderr));
    let tarball = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dir = tempfile::Builder::new().prefix("cprd-ct").tempdir_in("/var/tmp").expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("mkdir root");
    let st = Command::new("tar").arg("-C").arg(&root).args(["--zstd", "-xpf", &tarball]).status().expect("tar");
    assert!(st.success(), "extracting {tarball}");
    use std::os::unix::fs::PermissionsExt;
    for d in [dir.path(), root.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    (dir, root)
}

impl Container {
    /// Boots a fresh container with cprd installed (not started) and `vms` defined
    /// (name, TOML body).
    pub fn boot(vms: &[(&str, &str)]) -> Self {
        Self::boot_with("254", vms, &[])
    }

    /// [`Container::boot`] with systemd `sd_version` ("254" or "252" over Debian 12, "262" over
    /// Debian sid: that one runs only on a unified cgroup hierarchy, which nspawn sets up for it
    /// with `SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`) and extra files from the repository installed
    /// (repo-relative source, absolute destination).
    pub fn boot_with(sd_version: &str, vms: &[(&str, &str)], extra: &[(&str, &str)]) -> Self {
        let sid = sd_version == "262";
        let (dir, root) = if sid { unpack(&[("DIST", "sid")]) } else { unpack(&[("SD_VERSION", sd_version)]) };
        install(&root, &bin("cprd"), "/usr/libexec/cprd/cprd", 0o755);
        install(&root, &bin("cpr-vmm"), "/usr/libexec/cprd/cpr-vmm", 0o755);
        install(&root, &bin("cprctl"), "/usr/bin/cprctl", 0o755);
        let units = repo().join("units");
        install(&root, &units.join("cprd.service"), "/etc/systemd/system/cprd.service", 0o644);
        install(&root, &units.join("cprd.slice"), "/etc/systemd/system/cprd.slice", 0o644);
        install(&root, &units.join("cprd.socket"), "/etc/systemd/system/cprd.socket", 0o644);
        install(&root, &units.join("dbus/org.cprd1.conf"), "/etc/dbus-1/system.d/org.cprd1.conf", 0o644);
        install(
            &root,
            &units.join("dbus/system-services/org.cprd1.service"),
            "/usr/share/dbus-1/system-services/org.cprd1.service",
            0o644,
        );
        install(&root, &units.join("tmpfiles.d/cprd.conf"), "/usr/lib/tmpfiles.d/cprd.conf", 0o644);
        install(&root, &units.join("sysusers.d/cprd.conf"), "/usr/lib/sysusers.d/cprd.conf", 0o644);
        write(
            &root,
            "/etc/cprd/cprd.toml",
            "[vmm]\nallowed = [\"/usr/libexec/cprd/*\"]\ndefault = \"/usr/libexec/cprd/cpr-vmm\"\n",
        );
        for (from, to) in extra {
            install(&root, &repo().join(from), to, 0o644);
        }
        for (name, body) in vms {
            write(&root, &format!("/etc/cprd/vms/{name}.toml"), body);
        }
        if sid {
            Self::start_in(dir, root, &[], &[("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")])
        } else {
            Self::start(dir, root, &[])
        }
    }

    /// Boots a container with systemd 254 and QEMU >= 10.0 and nothing of cprd's: for
    /// installing its packages. `binds` are host paths bound read-only at the same paths.
    pub fn boot_for_packages(binds: &[&Path]) -> Self {
        let (dir, root) = unpack(&[("WITH_QEMU", "1")]);
        let binds: Vec<String> = binds.iter().map(|p| format!("--bind-ro={}", p.display())).collect();
        Self::start(dir, root, &binds)
    }

    /// Boots a Debian 13 container (systemd 257, QEMU 10.0 installed, QEMU 11.1 from
    /// trixie-backports downloaded) with nothing of cprd's: for the version-jump tests. `binds`
    /// as for [`Container::boot_for_packages`]; `extra_args` go to `systemd-nspawn`.
    pub fn boot_trixie_for_packages(binds: &[&Path], extra_args: &[&str]) -> Self {
        let (dir, root) = unpack(&[("DIST", "trixie")]);
        let mut args: Vec<String> = binds.iter().map(|p| format!("--bind-ro={}", p.display())).collect();
        args.extend(extra_args.iter().map(ToString::to_string));
        Self::start(dir, root, &args)
    }

    /// Boots a host of the Ansible rollout's fleet: systemd 254 with sshd, which lets root in by
    /// `authorized_key` on 127.0.0.1:`ssh_port` of the network namespace at `netns` (the
    /// container joins it), Python for Ansible's modules, nothing of cprd's. `binds` as for
    /// [`Container::boot_for_packages`].
    pub fn boot_fleet_host(netns: &Path, ssh_port: u16, authorized_key: &str, binds: &[&Path]) -> Self {
        let (dir, root) = unpack(&[("FLEET", "1")]);
        write(
            &root,
            "/etc/ssh/sshd_config.d/cprd-test.conf",
            &format!("Port {ssh_port}\nListenAddress 127.0.0.1\nPermitRootLogin prohibit-password\n"),
        );
        write(&root, "/root/.ssh/authorized_keys", authorized_key);
        let mut args: Vec<String> = binds.iter().map(|p| format!("--bind-ro={}", p.display())).collect();
        args.push(format!("--network-namespace-path={}", netns.display()));
        Self::start(dir, root, &args)
    }

    fn start(dir: tempfile::TempDir, root: PathBuf, extra_args: &[String]) -> Self {
        Self::start_in(dir, root, extra_args, &[])
    }

    /// [`Container::start`] with `env` set for `systemd-nspawn`.
    fn start_in(dir: tempfile::TempDir, root: PathBuf, extra_args: &[String], env: &[(&str, &str)]) -> Self {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!("cprd{}x{}", std::process::id(), COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        let log = std::fs::File::create(dir.path().join("nspawn.log")).expect("log");
        let cgroup = OwnCgroup::create(&name);
        // `--keep-unit` builds the container's cgroup tree under the cgroup nspawn starts in: a
        // shell moves itself into this container's own cgroup, then becomes nspawn (same PID).
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            r#"IFS=:; for f in $CPRD_TEST_CGROUP_PROCS; do echo $$ > "$f" || exit 1; done; exec systemd-nspawn "$@""#,
            "sh",
        ])
        .env("CPRD_TEST_CGROUP_PROCS", cgroup.procs_files())
        .arg("-D")
        .arg(&root)
        .args(["-b", "-M", &name, "--register=no", "--keep-unit", "--console=pipe", "--bind=/dev/kvm"])
        .args(extra_args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
        cpr_spawn::place_fds(&mut cmd, &[], true).expect("a session of its own");
        let nspawn = cmd.spawn().expect("systemd-nspawn");
        running().push(nspawn.id());
        // The container's PID 1 is a child of nspawn whose command is `systemd` (nspawn briefly
        // has an intermediate child first).
        let mut leader = 0u32;
        let found = wait_until(Duration::from_secs(20), || {
            let children = std::fs::read_to_string(format!("/proc/{}/task/{}/children", nspawn.id(), nspawn.id()))
                .unwrap_or_default();
            leader = children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .find(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "systemd"))
                .unwrap_or(0);
            leader != 0
        });
        let mut c = Self { _dir: dir, root, nspawn, leader, _cgroup: cgroup };
        assert!(found, "the container did not start: {}", c.log());
        let up = wait_until(Duration::from_secs(60), || {
            let o = c.exec(&["systemctl", "is-system-running"]);
            let s = String::from_utf8_lossy(&o.stdout);
            s.trim() == "running" || s.trim() == "degraded"
        });
        assert!(up, "systemd did not finish booting: {}", c.log());
        let _ = &mut c;
        c
    }

    /// The container's console log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.parent().expect("dir").join("nspawn.log")).unwrap_or_default()
    }

    /// Runs a command inside the container.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("nsenter").args(["-t", &self.leader.to_string(), "-a"]).args(args).output().expect("nsenter")
    }

    /// Where VM `vm`'s console log is, seen from the host.
    pub fn console(&self, vm: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root/run/cprd/vms/{vm}.console", self.leader))
    }

    /// `cprctl --json status VM` inside the container.
    pub fn status(&self, vm: &str) -> serde_json::Value {
        serde_json::from_str(&self.sh(&format!("cprctl --json status {vm}"))).expect("status json")
    }

    /// Checks that the test guests `vms` run on in the container: each prints two more heartbeats
    /// within 20 s, and its console shows no gap ([`crate::check_heartbeats`]).
    pub fn guests_continuous(&self, vms: &[&str]) {
        for vm in vms {
            let path = self.console(vm);
            let seq = crate::heartbeats(&path).last().map_or(0, |h| h.seq);
            let more = crate::wait_until(Duration::from_secs(20), || {
                crate::heartbeats(&path).last().is_some_and(|h| h.seq > seq + 1)
            });
            assert!(more, "{vm}: no new heartbeats");
            crate::check_heartbeats(&crate::heartbeats(&path)).unwrap_or_else(|e| panic!("{vm}: {e}"));
        }
    }

    /// The end of cprd's journal, for failure messages.
    pub fn journal(&self) -> String {
        String::from_utf8_lossy(&self.exec(&["journalctl", "-u", "cprd", "--no-pager", "-n", "80"]).stdout).into_owned()
    }

    /// Writes `/etc/cprd/vms/NAME.toml` in the container (through its root directory on the host;
    /// the bind-mounted kernel and initramfs have the same paths inside as outside, so a
    /// [`crate::linux_guest::vm_definition`] serves as it is).
    pub fn define_vm(&self, name: &str, body: &str) {
        let path = self.root.join("etc/cprd/vms").join(format!("{name}.toml"));
        std::fs::write(&path, body).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// cprd's whole journal in the container, for counting what it did.
    pub fn full_journal(&self) -> String {
        String::from_utf8_lossy(&self.exec(&["journalctl", "-u", "cprd", "--no-pager"]).stdout).into_owned()
    }

    /// Runs a shell command line inside the container and returns its stdout; panics on failure,
    /// with the end of the container's journal (a failure once came with no clue but "the
    /// control process exited with error code").
    pub fn sh(&self, line: &str) -> String {
        let o = self.exec(&["sh", "-c", line]);
        if !o.status.success() {
            let journal = self.exec(&["journalctl", "-b", "--no-pager", "-n", "60"]);
            panic!(
                "`{line}` failed: {}\n{}\nthe container's journal:\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
                String::from_utf8_lossy(&journal.stdout)
            );
        }
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.nspawn.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let done = wait_until(Duration::from_secs(15), || self.nspawn.try_wait().ok().flatten().is_some());
        if !done {
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
        running().retain(|p| *p != self.nspawn.id());
    }
}

/// The `systemd-nspawn` processes of the containers this process runs.
fn running() -> std::sync::MutexGuard<'static, Vec<u32>> {
    static RUNNING: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());
    RUNNING.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// For a program built with `panic = "abort"` (the benchmarks): a panic ends the containers it
/// started (SIGTERM to `systemd-nspawn`, which shuts the container down with everything in it)
/// before the process aborts, since no `Drop` runs then. A container left behind keeps its
/// guests running (a bench once left four TCG guests burning both CPUs for an hour). Not for
/// tests: they unwind, and a hook would end other tests' containers too.
pub fn end_containers_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        let pids: Vec<u32> = running().clone();
        for pid in pids {
            let raw = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0));
            let _ = nix::sys::signal::kill(raw, nix::sys::signal::Signal::SIGTERM);
            let exited = || {
                let status = nix::sys::wait::waitpid(raw, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
                !matches!(status, Ok(nix::sys::wait::WaitStatus::StillAlive))
            };
            let gone = wait_until(Duration::from_secs(15), exited);
            if !gone {
                let _ = nix::sys::signal::kill(raw, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }));
}
