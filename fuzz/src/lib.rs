//! The checks behind cprd's fuzz targets, one per parser of input cprd does not control.
//!
//! Each function in [`targets`] takes the fuzzer's bytes, feeds them to the parser exactly as
//! cprd or a VMM does, and asserts more than "no panic":
//! - a rejected input yields the parser's typed error, with a bounded message (no echo of
//!   unbounded input into a log line or a D-Bus reply);
//! - an accepted input survives decode → encode → decode unchanged, where an encoder exists;
//! - decoding allocates no more than the documented limits ([`cpr_proto::state::MAX_STATE_BYTES`]
//!   for a state stream, [`cpr_proto::wire::MAX_MESSAGE_BYTES`] for a message), measured by the
//!   counting allocator of this crate ([`allocations_of`]).
//!
//! The fuzz binaries (`fuzz_targets/`, built by `cargo fuzz`) call these functions; so does the
//! replay test (`tests/corpus.rs`), which runs every committed corpus input and every crash the
//! fuzzer found through them in the normal test suite.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub mod targets;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, counting each thread's live heap bytes, their peak, and the largest
/// single allocation.
#[derive(Debug)]
pub struct CountingAlloc;

fn note_alloc(size: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(size);
        live.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    });
}

fn note_free(size: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(size)));
}

// SAFETY: every call is forwarded to `System` unchanged; the bookkeeping only touches
// thread-local counters and never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: the caller's contract for `alloc` is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        // SAFETY: `ptr` came from `System` with `layout`, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_free(layout.size());
        note_alloc(new_size);
        // SAFETY: as for `dealloc` and `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

/// What a call allocated on its thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocations {
    /// The highest live heap, in bytes above what was live when the call began.
    pub peak: usize,
    /// The largest single allocation, in bytes.
    pub largest: usize,
}

/// Runs `f` and reports what it allocated on this thread.
pub fn allocations_of<R>(f: impl FnOnce() -> R) -> (R, Allocations) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    LARGEST.with(|l| l.set(0));
    let result = f();
    let peak = PEAK.with(Cell::get).saturating_sub(start);
    let largest = LARGEST.with(Cell::get);
    (result, Allocations { peak, largest })
}

/// Asserts that `usage` stays within `limit` bytes, naming `what`.
pub fn assert_within(what: &str, usage: Allocations, limit: usize) {
    assert!(
        usage.largest <= limit && usage.peak <= limit,
        "{what}: allocated {} bytes at once and {} at the peak, above the limit of {limit}",
        usage.largest,
        usage.peak
    );
}

/// The longest error message a parser may produce for input from a peer it does not trust: its
/// errors go into journal lines and D-Bus replies, so they quote at most a bounded excerpt.
pub const MAX_ERROR_TEXT: usize = 1024;

/// Asserts that an error's text is non-empty and bounded.
pub fn assert_error_text(what: &str, text: &str) {
    assert!(!text.is_empty(), "{what}: an error without words");
    assert!(text.len() <= MAX_ERROR_TEXT, "{what}: an error message of {} bytes: {:.200}…", text.len(), text);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counting_allocator_sees_what_a_call_allocates() {
        let (v, usage) = allocations_of(|| vec![0u8; 100_000]);
        assert_eq!(v.len(), 100_000);
        assert!(usage.largest >= 100_000 && usage.peak >= 100_000, "{usage:?}");
        let ((), usage) = allocations_of(|| ());
        assert_eq!(usage, Allocations { peak: 0, largest: 0 });
    }
}
