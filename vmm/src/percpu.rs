//! A handoff's per-vCPU work, spread over the vCPU threads.
//!
//! - **Old side:** every vCPU thread saves its own vCPU as it parks for the switchover, right
//!   after its last exit. The threads have to run to stop anyway, so this costs no extra wake-up,
//!   and the saves of different vCPUs run at once on as many CPUs as the host gives them. vCPU 0
//!   then adds the VM-wide parts and collects them (a vCPU parked before the switchover asked is
//!   read by vCPU 0, as before).
//! - **New side:** the restore is shared by `W` workers, `W` = the host's CPUs or the guest's
//!   vCPUs, whichever is fewer: worker `w` is vCPU `w`'s thread and restores vCPUs `w`, `w + W`,
//!   `w + 2W`… vCPU 0's thread also does the VM-wide parts (kvmclock, irqchips, PIT, devices) and
//!   collects every result before `Loaded`. With a CPU for every vCPU thread, each restores its
//!   own; on 2 CPUs, two threads share the vCPUs and only one is woken.
//!
//! KVM's ordering needs nothing more. The vCPU states and the VM-wide ones are distinct, and both
//! the TSC offsets and kvmclock are only read at each vCPU's next entry (`KVM_REQ_CLOCK_UPDATE`),
//! after all of them are in place: no vCPU enters before `Commit`. Within one vCPU,
//! `persist::restore_vcpu` keeps QEMU's order (the TSC offset, then the TSC deadline).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};

use cpr_proto::state::VcpuState;

/// Who does a handoff's per-vCPU work (`cpr-vmm --vcpu-state-threads`, hidden: for tests and
/// benchmarks only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[repr(u8)]
pub enum VcpuStateThreads {
    /// The vCPU threads, where the guest has more than one vCPU and the host more CPUs than
    /// that: every vCPU thread then has a CPU, and one is left for the rest (the other VMM, the
    /// arbiter). Measured on 2 CPUs, spreading 2–8 vCPUs gained nothing and made the new side's
    /// restore 7–22 % slower: the worker waits to be scheduled, and each vCPU it restores was
    /// last loaded on another CPU. With one vCPU there is nothing to spread, and vCPU 0 saving
    /// itself before it parks measured 0–8 % slower than saving in the switchover.
    Auto,
    /// vCPU 0's thread saves and restores every vCPU, one after the other.
    Serial,
    /// The vCPU threads, whatever the host (tests of the spread path on hosts with few CPUs,
    /// benchmarks).
    Spread,
}

static SPREAD: AtomicU8 = AtomicU8::new(VcpuStateThreads::Auto as u8);

/// Sets who does this process's side of the per-vCPU work.
pub fn set_vcpu_state_threads(threads: VcpuStateThreads) {
    SPREAD.store(threads as u8, Ordering::Relaxed);
}

fn host_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// Whether this process spreads the per-vCPU work of a guest with `vcpus` vCPUs.
pub fn spreads(vcpus: usize) -> bool {
    match SPREAD.load(Ordering::Relaxed) {
        x if x == VcpuStateThreads::Serial as u8 => false,
        x if x == VcpuStateThreads::Spread as u8 => true,
        _ => vcpus > 1 && host_cpus() > vcpus,
    }
}

/// How many threads share the new side's restore of `vcpus` vCPUs: the host's CPUs or the
/// vCPUs, whichever is fewer, where this process spreads; otherwise 1.
pub fn restore_workers(vcpus: usize) -> usize {
    if spreads(vcpus) { host_cpus().min(vcpus).max(1) } else { 1 }
}

/// What one vCPU's restore gave: the MSRs the host refused, or why it failed.
pub type Restored = crate::error::Result<Vec<u32>>;

#[derive(Debug)]
struct Slots<S> {
    /// Old side: the vCPUs save their state when they park (a switchover's pause).
    save_on_park: bool,
    /// Old side: each vCPU's saved state, or why it could not be read.
    saved: Vec<Option<std::result::Result<S, String>>>,
    /// New side: how many threads share the restore (vCPU threads `0..workers`); 0 or 1 when
    /// vCPU 0 restores them all.
    workers: usize,
    /// New side: the states to restore, posted at once, each taken by its worker.
    to_restore: Vec<Option<S>>,
    /// New side: what each vCPU's restore gave.
    restored: Vec<Option<Restored>>,
    /// New side: no state is coming (the handoff failed before it was read): stop waiting.
    abandoned: bool,
}

/// The per-vCPU work of a handoff, shared by the vCPU threads (`S`: a vCPU's state).
#[derive(Debug)]
pub struct VcpuWork<S = VcpuState> {
    slots: Mutex<Slots<S>>,
    changed: Condvar,
}

impl<S> VcpuWork<S> {
    /// Work for `vcpus` vCPUs; none is due.
    pub fn new(vcpus: u8) -> Self {
        let n = usize::from(vcpus);
        Self {
            slots: Mutex::new(Slots {
                save_on_park: false,
                saved: (0..n).map(|_| None).collect(),
                workers: 0,
                to_restore: (0..n).map(|_| None).collect(),
                restored: (0..n).map(|_| None).collect(),
                abandoned: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots<S>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Old side, before a switchover's pause: each vCPU is to save its state as it parks.
    pub fn save_at_next_park(&self) {
        let mut s = self.slots();
        s.save_on_park = true;
        s.saved.iter_mut().for_each(|v| *v = None);
    }

    /// Old side, on a vCPU's thread before it parks: whether it is to save its state.
    pub fn saving(&self) -> bool {
        self.slots().save_on_park
    }

    /// Old side: vCPU `index`'s saved state.
    pub fn put_saved(&self, index: usize, state: std::result::Result<S, String>) {
        if let Some(slot) = self.slots().saved.get_mut(index) {
            *slot = Some(state);
        }
    }

    /// Old side, once every vCPU is parked: the states they saved (a vCPU that saved none, for
    /// instance one parked before the switchover asked, gives `None`); saving stops.
    pub fn take_saved(&self) -> Vec<Option<std::result::Result<S, String>>> {
        let mut s = self.slots();
        s.save_on_park = false;
        s.saved.iter_mut().map(Option::take).collect()
    }

    /// New side, before the vCPU threads start: vCPU threads `1..workers` wait for their share
    /// of the states before they first park.
    pub fn expect_restore(&self, workers: usize) {
        self.slots().workers = workers;
    }

    /// New side: how many threads share the restore (1 when vCPU 0's thread does it alone).
    pub fn workers(&self) -> usize {
        self.slots().workers.max(1)
    }

    /// New side: the worker that restores vCPU `index`.
    fn worker_of(workers: usize, index: usize) -> usize {
        index % workers.max(1)
    }

    /// New side, on vCPU 0's thread: every vCPU's state, `(index, state)`. Returns the states
    /// vCPU 0's thread restores itself; the others go to their workers.
    pub fn post_restore(&self, states: impl IntoIterator<Item = (usize, S)>) -> Vec<(usize, S)> {
        let mut s = self.slots();
        let workers = s.workers;
        let mut own = Vec::new();
        for (index, state) in states {
            if Self::worker_of(workers, index) == 0 {
                own.push((index, state));
            } else if let Some(slot) = s.to_restore.get_mut(index) {
                *slot = Some(state);
            }
        }
        drop(s);
        self.changed.notify_all();
        own
    }

    /// New side: no state is coming; the workers stop waiting for one.
    pub fn abandon(&self) {
        self.slots().abandoned = true;
        self.changed.notify_all();
    }

    /// New side, on vCPU thread `worker` (not 0) before it first parks: its share of the
    /// states, `(index, state)`, once vCPU 0 posted them; empty when it is no worker or the
    /// handoff was abandoned.
    pub fn wait_restore(&self, worker: usize) -> Vec<(usize, S)> {
        let mut s = self.slots();
        if worker == 0 || worker >= s.workers {
            return Vec::new();
        }
        let mine: Vec<usize> = (0..s.to_restore.len()).filter(|&i| Self::worker_of(s.workers, i) == worker).collect();
        loop {
            if mine.iter().all(|&i| s.to_restore[i].is_some()) {
                return mine.iter().filter_map(|&i| s.to_restore[i].take().map(|st| (i, st))).collect();
            }
            if s.abandoned {
                return Vec::new();
            }
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// New side: what vCPU `index`'s restore gave.
    pub fn put_restored(&self, index: usize, result: Restored) {
        if let Some(slot) = self.slots().restored.get_mut(index) {
            *slot = Some(result);
        }
        self.changed.notify_all();
    }

    /// New side, on vCPU 0's thread: waits until every vCPU the other workers restore has
    /// been restored; what each gave, by index. The restore is then over.
    pub fn wait_restored(&self) -> Vec<(usize, Restored)> {
        let mut s = self.slots();
        let workers = s.workers;
        let theirs: Vec<usize> = (0..s.restored.len()).filter(|&i| Self::worker_of(workers, i) != 0).collect();
        while !theirs.iter().all(|&i| s.restored[i].is_some()) {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s.workers = 0;
        theirs.into_iter().filter_map(|i| s.restored[i].take().map(|r| (i, r))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The new side with 5 vCPUs and 2 workers: vCPU 0's thread keeps 0, 2 and 4, worker 1
    /// takes 1 and 3 and reports each; vCPU 0 collects them. A thread that is no worker does
    /// not wait; an abandoned handoff lets a waiting worker go.
    #[test]
    fn workers_take_their_share_and_vcpu_0_collects_them() {
        let work = std::sync::Arc::new(VcpuWork::<u8>::new(5));
        work.expect_restore(2);
        assert!(work.wait_restore(2).is_empty(), "vCPU 2's thread is no worker");
        let worker = {
            let work = std::sync::Arc::clone(&work);
            std::thread::spawn(move || {
                let share = work.wait_restore(1);
                for (index, state) in &share {
                    work.put_restored(*index, Ok(vec![u32::from(*state)]));
                }
                share.into_iter().map(|(i, _)| i).collect::<Vec<_>>()
            })
        };
        let own = work.post_restore((0..5).map(|i| (i, u8::try_from(i * 10).unwrap_or(0))));
        assert_eq!(own, vec![(0, 0), (2, 20), (4, 40)]);
        let collected: Vec<(usize, Vec<u32>)> =
            work.wait_restored().into_iter().map(|(i, r)| (i, r.expect("restored"))).collect();
        assert_eq!(collected, vec![(1, vec![10]), (3, vec![30])]);
        assert_eq!(worker.join().expect("worker"), vec![1, 3]);

        let work = std::sync::Arc::new(VcpuWork::<u8>::new(2));
        work.expect_restore(2);
        let waiter = {
            let work = std::sync::Arc::clone(&work);
            std::thread::spawn(move || work.wait_restore(1))
        };
        work.abandon();
        assert!(waiter.join().expect("thread").is_empty());
        assert!(VcpuWork::<u8>::new(2).wait_restore(1).is_empty(), "no restore expected: no wait");
    }

    /// One worker: vCPU 0's thread restores every vCPU and waits for nobody.
    #[test]
    fn one_worker_restores_everything_on_vcpu_0() {
        let work = VcpuWork::<u8>::new(3);
        work.expect_restore(1);
        assert_eq!(work.post_restore([(0, 0), (1, 1), (2, 2)]), vec![(0, 0), (1, 1), (2, 2)]);
        assert!(work.wait_restored().is_empty());
        assert!(work.wait_restore(1).is_empty());
    }

    /// The old side: states are kept only while a switchover asked for them.
    #[test]
    fn saved_states_are_taken_once_and_saving_stops() {
        let work = VcpuWork::<u8>::new(2);
        assert!(!work.saving());
        work.save_at_next_park();
        assert!(work.saving());
        work.put_saved(1, Ok(1));
        let saved = work.take_saved();
        assert_eq!(saved, vec![None, Some(Ok(1))]);
        assert!(!work.saving());
        assert!(work.take_saved().iter().all(Option::is_none));
    }
}
