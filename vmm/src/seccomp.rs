//! The system calls each thread of cpr-vmm may make, enforced with seccomp (rust-vmm's
//! `seccompiler`) before any guest code runs; anything else kills the whole process (`SIGSYS`).
//!
//! Threads come in three classes, each with its own list below: the main thread (it waits for
//! the VM to end and exits), the control threads (the listener and one thread per connection:
//! requests, handoffs on the old side, descriptors in and out) and the vCPU threads (`KVM_RUN`,
//! device emulation, and on vCPU 0 the switchover and the restore of a handoff). Each thread
//! installs its own filter as it starts; the main thread installs its own after it started all
//! the others, so none inherits the main thread's list.
//!
//! `CPR_VMM_SECCOMP=log` (a diagnostic) logs calls outside a list to the kernel log instead of
//! killing; `off` installs nothing.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use crate::error::{Result, VmmError};

/// Which list a thread runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadClass {
    /// The process's first thread, once the VM runs.
    Main,
    /// The control socket's listener and connection threads.
    Control,
    /// A vCPU thread.
    Vcpu,
}

/// One group of calls with the reason a class needs them.
struct Group {
    #[allow(dead_code)]
    why: &'static str,
    calls: &'static [libc::c_long],
}

/// What every thread needs: memory for the allocator, locks, its own exit, time and signals.
const EVERY_THREAD: &[Group] = &[
    Group {
        why: "the allocator: heap and anonymous mappings, and giving memory back",
        calls: &[
            libc::SYS_brk,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_mprotect,
        ],
    },
    Group {
        why: "locks, condition variables and parking (std's Mutex, Condvar, channels)",
        calls: &[libc::SYS_futex, libc::SYS_sched_yield, libc::SYS_nanosleep, libc::SYS_clock_nanosleep],
    },
    Group {
        why: "time where the vDSO cannot answer, ids for logs and signals",
        calls: &[libc::SYS_clock_gettime, libc::SYS_gettid, libc::SYS_getpid, libc::SYS_getrandom],
    },
    Group {
        why: "signals: the vCPU kick (tgkill), its handler's return, masks around it",
        calls: &[
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigaction,
            libc::SYS_tgkill,
            libc::SYS_sigaltstack,
        ],
    },
    Group {
        why: "writing diagnostics to stderr (cprd's log), closing descriptors, a thread's end",
        calls: &[libc::SYS_write, libc::SYS_writev, libc::SYS_close, libc::SYS_exit, libc::SYS_exit_group],
    },
    Group {
        why: "the handoff's scheduling (sched.rs): EEVDF slices and nice nudges of its own threads, \
              found in /proc/self/task, and its session's autogroup",
        calls: &[
            libc::SYS_sched_getattr,
            libc::SYS_sched_setattr,
            libc::SYS_getpriority,
            libc::SYS_setpriority,
            libc::SYS_sched_getaffinity,
            libc::SYS_getsid,
            libc::SYS_openat,
            libc::SYS_read,
            libc::SYS_getdents64,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_lseek,
            libc::SYS_fcntl,
        ],
    },
];

/// The main thread: it waits for the reason the VM ends, tells the others, and exits.
const MAIN: &[Group] = &[Group {
    why: "removing its control socket file when it bound one by path; reading its autogroup",
    calls: &[libc::SYS_unlink, libc::SYS_unlinkat, libc::SYS_openat, libc::SYS_read, libc::SYS_fcntl],
}];

/// Control threads: requests and replies with descriptors, handoffs on the old side.
const CONTROL: &[Group] = &[
    Group {
        why: "accepting connections, one thread per connection",
        calls: &[
            libc::SYS_accept4,
            libc::SYS_accept,
            libc::SYS_clone3,
            libc::SYS_clone,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_prctl,
        ],
    },
    Group {
        why: "messages with descriptors (SCM_RIGHTS), peer credentials, deadlines on sockets",
        calls: &[
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_read,
            libc::SYS_shutdown,
        ],
    },
    Group {
        why: "descriptors: duplicating and close-on-exec, the size of guest RAM, the build id (its own binary), the autogroup weight",
        calls: &[
            libc::SYS_fcntl,
            libc::SYS_dup,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_lseek,
            libc::SYS_openat,
            libc::SYS_readlink,
            libc::SYS_pread64,
        ],
    },
    Group {
        why: "KVM state for status and the handoff (vCPU and VM ioctls), dirty-page tracking",
        calls: &[libc::SYS_ioctl],
    },
];

/// vCPU threads: running the guest, emulating its devices, and on vCPU 0 the switchover (state
/// out over the main channel) and the restore (state in, RAM prefault).
const VCPU: &[Group] = &[
    Group { why: "KVM_RUN and every vCPU/VM state ioctl", calls: &[libc::SYS_ioctl] },
    Group {
        why: "the switchover and restore on vCPU 0: the state stream and the commit messages",
        calls: &[
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_read,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
            libc::SYS_pwrite64,
            libc::SYS_shutdown,
        ],
    },
];

fn groups(class: ThreadClass) -> impl Iterator<Item = &'static Group> {
    let own = match class {
        ThreadClass::Main => MAIN,
        ThreadClass::Control => CONTROL,
        ThreadClass::Vcpu => VCPU,
    };
    EVERY_THREAD.iter().chain(own)
}

/// What a call outside the lists does.
fn mismatch_action() -> Option<SeccompAction> {
    match std::env::var("CPR_VMM_SECCOMP").as_deref() {
        Ok("off") => None,
        Ok("log") => Some(SeccompAction::Log),
        _ => Some(SeccompAction::KillProcess),
    }
}

/// The compiled filter of `class` (compiled once per process).
fn program(class: ThreadClass) -> Result<Option<&'static BpfProgram>> {
    static PROGRAMS: OnceLock<std::result::Result<Option<[BpfProgram; 3]>, String>> = OnceLock::new();
    let compiled = PROGRAMS.get_or_init(|| {
        let Some(mismatch) = mismatch_action() else { return Ok(None) };
        let compile = |class: ThreadClass| -> std::result::Result<BpfProgram, String> {
            let mut rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = BTreeMap::new();
            for call in groups(class).flat_map(|g| g.calls.iter()) {
                rules.insert(*call, Vec::new());
            }
            let filter = SeccompFilter::new(rules, mismatch.clone(), SeccompAction::Allow, TargetArch::x86_64)
                .map_err(|e| e.to_string())?;
            BpfProgram::try_from(filter).map_err(|e| e.to_string())
        };
        Ok(Some([compile(ThreadClass::Main)?, compile(ThreadClass::Control)?, compile(ThreadClass::Vcpu)?]))
    });
    match compiled {
        Ok(None) => Ok(None),
        Ok(Some(p)) => Ok(Some(&p[class as usize])),
        Err(e) => Err(VmmError::Internal(format!("cannot compile the seccomp filters: {e}"))),
    }
}

/// Compiles every class's filter (call before starting threads, so that a thread never fails
/// to install its own for want of memory or a bad list).
pub fn prepare() -> Result<()> {
    program(ThreadClass::Main).map(drop)
}

/// Installs `class`'s filter on the calling thread (and every thread it starts later).
pub fn install(class: ThreadClass) -> Result<()> {
    let Some(p) = program(class)? else { return Ok(()) };
    seccompiler::apply_filter(p)
        .map_err(|e| VmmError::Internal(format!("cannot install the {class:?} seccomp filter: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_compiles_and_no_list_allows_exec_fork_or_ptrace() {
        for class in [ThreadClass::Main, ThreadClass::Control, ThreadClass::Vcpu] {
            let calls: Vec<libc::c_long> = groups(class).flat_map(|g| g.calls.iter().copied()).collect();
            for banned in [libc::SYS_execve, libc::SYS_execveat, libc::SYS_fork, libc::SYS_vfork, libc::SYS_ptrace] {
                assert!(!calls.contains(&banned), "{class:?} allows {banned}");
            }
        }
        prepare().expect("filters compile");
    }
}
