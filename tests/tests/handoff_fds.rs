//! A handoff arbiter that holds many fds (as cprd does with 50 VMs) must still give the new
//! VMM the right channel ends at fds 3 and 4. Regression test: channel fds numbered 100–103
//! used to be overwritten while being moved into place. Its own test binary, so that no other
//! test opens fds concurrently.
#![allow(clippy::tests_outside_test_module)] // integration tests: every test is at the top level

use std::os::fd::{AsRawFd, OwnedFd};

use cpr_tests::{Chain, require_kvm};

#[test]
fn handoff_works_when_channel_fds_have_high_numbers() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut chain = Chain::start(dir.path(), &["--memory", "64M"], &[]);
    for next_free in 95..=104 {
        // Hold fds until the lowest free number is `next_free`, so the arbiter's socketpairs
        // land right on the numbers it uses.
        let mut held: Vec<OwnedFd> = Vec::new();
        loop {
            let f = std::fs::File::open("/dev/null").expect("open");
            let raw = f.as_raw_fd();
            if raw >= next_free {
                drop(f);
                break;
            }
            held.push(f.into());
        }
        chain.hand_off(&chain.request()).unwrap_or_else(|e| panic!("fds from {next_free}: {e}"));
        drop(held);
    }
    assert_eq!(chain.status().generation, 10);
}
