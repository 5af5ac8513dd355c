//! A handoff's per-vCPU work, done by each vCPU's own thread, all at once: the old side's vCPUs
//! save their own state as they park for the switchover, the new side's restore their own before
//! they first park. Every vCPU ioctl then runs on the thread that owns the vCPU (no vCPU is
//! loaded on another CPU for it), and the vCPUs' share of the downtime no longer grows with their
//! number where the host has a CPU for each.
//!
//! vCPU 0's thread still does the VM-wide parts (kvmclock, irqchips, PIT, devices), at the same
//! time as the others do their vCPUs, and its own vCPU. KVM's ordering needs nothing more: the
//! vCPU states and the VM-wide ones are distinct, and both the TSC offsets and kvmclock are only
//! read at each vCPU's next entry (`KVM_REQ_CLOCK_UPDATE`), after all of them are in place. Within
//! one vCPU, `persist::restore_vcpu` keeps QEMU's order (TSC offset, then the TSC deadline).

use std::sync::{Condvar, Mutex, PoisonError};

use cpr_proto::state::VcpuState;

/// What one vCPU's restore gave: the MSRs the host refused, or why it failed.
pub type Restored = std::result::Result<Vec<u32>, String>;

#[derive(Debug)]
struct Slots<S> {
    /// Old side: the vCPUs save their state when they park (a switchover's pause).
    save_on_park: bool,
    /// Old side: each vCPU's saved state, or why it could not be read.
    saved: Vec<Option<std::result::Result<S, String>>>,
    /// New side: the vCPUs wait for a state to restore before they first park.
    restore_expected: bool,
    /// New side: the state each vCPU restores (taken by it).
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
                restore_expected: false,
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

    /// New side, before the vCPU threads start: vCPUs 1.. wait for a state before they first
    /// park.
    pub fn expect_restore(&self) {
        self.slots().restore_expected = true;
    }

    /// New side, on vCPU 0's thread: the states of vCPUs 1.., for their threads to restore.
    pub fn post_restore(&self, states: impl IntoIterator<Item = (usize, S)>) {
        let mut s = self.slots();
        for (index, state) in states {
            if let Some(slot) = s.to_restore.get_mut(index) {
                *slot = Some(state);
            }
        }
        drop(s);
        self.changed.notify_all();
    }

    /// New side: no state is coming; vCPUs 1.. stop waiting for one.
    pub fn abandon(&self) {
        self.slots().abandoned = true;
        self.changed.notify_all();
    }

    /// New side, on vCPU `index`'s thread (not 0) before it first parks: the state to restore,
    /// once vCPU 0 posted it; `None` when no restore is due or the handoff was abandoned.
    pub fn wait_restore(&self, index: usize) -> Option<S> {
        let mut s = self.slots();
        if !s.restore_expected {
            return None;
        }
        loop {
            if let Some(state) = s.to_restore.get_mut(index).and_then(Option::take) {
                return Some(state);
            }
            if s.abandoned {
                return None;
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

    /// New side, on vCPU 0's thread: waits until vCPUs `from..to` have restored; what each gave.
    pub fn wait_restored(&self, from: usize, to: usize) -> Vec<(usize, Restored)> {
        let mut s = self.slots();
        while !(from..to).all(|i| s.restored.get(i).is_some_and(Option::is_some)) {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s.restore_expected = false;
        (from..to).filter_map(|i| s.restored.get_mut(i).and_then(Option::take).map(|r| (i, r))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The new side: vCPU 0 posts the states, the others take each their own and report, vCPU 0
    /// collects every report; an abandoned handoff lets a waiting vCPU go.
    #[test]
    fn each_vcpu_restores_its_own_state_and_vcpu_0_collects_them() {
        let work = std::sync::Arc::new(VcpuWork::<u8>::new(3));
        work.expect_restore();
        let threads: Vec<_> = (1..3)
            .map(|i| {
                let work = std::sync::Arc::clone(&work);
                std::thread::spawn(move || {
                    let s = work.wait_restore(i).expect("a state");
                    work.put_restored(i, Ok(vec![u32::from(s)]));
                })
            })
            .collect();
        work.post_restore([(1, 1u8), (2, 2u8)]);
        let got = work.wait_restored(1, 3);
        assert_eq!(got, vec![(1, Ok(vec![1])), (2, Ok(vec![2]))]);
        threads.into_iter().for_each(|t| t.join().expect("thread"));

        let work = std::sync::Arc::new(VcpuWork::<u8>::new(2));
        work.expect_restore();
        let waiter = {
            let work = std::sync::Arc::clone(&work);
            std::thread::spawn(move || work.wait_restore(1))
        };
        work.abandon();
        assert!(waiter.join().expect("thread").is_none());
        assert!(VcpuWork::<u8>::new(2).wait_restore(1).is_none(), "no restore expected: no wait");
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
