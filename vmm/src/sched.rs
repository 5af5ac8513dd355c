//! CPU weight for a handoff's control path.
//!
//! On an over-committed host every step of a handoff (the new process's start, each message
//! between cprd and the two VMMs, the save and the restore) queues behind guest vCPUs that
//! use their whole share. While a handoff runs, the threads doing it run at [`HANDOFF_NICE`]
//! and get their previous nice back afterwards. A nice value and not a real-time class on
//! purpose: a thread left raised by mistake only gets a larger share, it cannot starve the host
//! (a `SCHED_FIFO` vCPU spinning in guest code would).

/// The nice value of a thread while it works on a handoff.
pub const HANDOFF_NICE: i32 = -20;

/// The calling thread's id.
fn own_tid() -> libc::id_t {
    // SAFETY: gettid has no preconditions; a thread id is never negative.
    unsafe { libc::gettid() }.cast_unsigned()
}

/// Thread ids of a process (`/proc/PID/task`); empty when it is gone.
fn threads_of(pid: u32) -> Vec<libc::id_t> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| dir.flatten().filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok())).collect())
        .unwrap_or_default()
}

fn nice_of(tid: libc::id_t) -> Option<i32> {
    // getpriority can return -1 legitimately: errno tells an error apart.
    nix::errno::Errno::clear();
    // SAFETY: a plain syscall on a thread id; no memory is passed.
    let n = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    (n != -1 || nix::errno::Errno::last_raw() == 0).then_some(n)
}

fn set_nice(tid: libc::id_t, nice: i32) -> bool {
    // SAFETY: a plain syscall on a thread id (Linux applies PRIO_PROCESS to one thread).
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) == 0 }
}

/// The calling thread's nice value (0 when it cannot be read).
pub fn current_nice() -> i32 {
    nice_of(own_tid()).unwrap_or(0)
}

/// Sets the calling thread's nice value.
pub fn set_current_thread_nice(nice: i32) {
    set_nice(own_tid(), nice);
}

/// Threads raised to [`HANDOFF_NICE`]; dropping it gives each its previous nice back.
#[derive(Debug, Default)]
pub struct Raised {
    previous: Vec<(libc::id_t, i32)>,
}

impl Raised {
    /// Raises the calling thread (and, through fork, any process it starts meanwhile).
    pub fn current_thread() -> Self {
        Self::threads([own_tid()])
    }

    /// Raises every thread of process `pid` that exists now.
    pub fn process(pid: u32) -> Self {
        Self::threads(threads_of(pid))
    }

    fn threads(tids: impl IntoIterator<Item = libc::id_t>) -> Self {
        let mut previous = Vec::new();
        for tid in tids {
            // Without CAP_SYS_NICE raising fails: the handoff then just runs at normal weight.
            if let Some(n) = nice_of(tid).filter(|n| *n > HANDOFF_NICE)
                && set_nice(tid, HANDOFF_NICE)
            {
                previous.push((tid, n));
            }
        }
        Self { previous }
    }

    /// Whether any thread was raised (false without CAP_SYS_NICE, or when already raised).
    pub fn is_raised(&self) -> bool {
        !self.previous.is_empty()
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        for (tid, nice) in &self.previous {
            set_nice(*tid, *nice);
        }
    }
}

/// Sets every thread of `pid` to `nice` (a new VMM that inherited a raised nice from the
/// thread that started it goes back to its baseline once the handoff is over).
pub fn set_process_nice(pid: u32, nice: i32) {
    for tid in threads_of(pid) {
        set_nice(tid, nice);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn my_nice() -> i32 {
        nice_of(own_tid()).expect("own nice")
    }

    #[test]
    fn raises_the_thread_and_restores_it() {
        let before = my_nice();
        {
            let r = Raised::current_thread();
            if !r.is_raised() {
                // Not root: raising is refused and nothing changes.
                assert_eq!(my_nice(), before);
                return;
            }
            assert_eq!(my_nice(), HANDOFF_NICE);
        }
        assert_eq!(my_nice(), before);
    }

    #[test]
    fn sets_every_thread_of_a_child() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().expect("sleep");
        let raised = Raised::process(child.id());
        let tids = threads_of(child.id());
        if raised.is_raised() {
            assert!(tids.iter().all(|t| nice_of(*t) == Some(HANDOFF_NICE)));
        }
        drop(raised);
        assert!(tids.iter().all(|t| nice_of(*t) == Some(0)));
        set_process_nice(child.id(), 3);
        assert!(tids.iter().all(|t| nice_of(*t) == Some(3)));
        let _ = child.kill();
        let _ = child.wait();
    }
}
