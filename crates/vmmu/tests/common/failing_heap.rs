//! A global allocator for the heap-exhaustion tests: it forwards to the system allocator, except
//! while a thread-local switch is on, when every allocation of that thread after the first
//! `granted` fails (returns null, as `GlobalAlloc::alloc` may). A test binary installs it with
//! `#[global_allocator] static HEAP: Failing = Failing;` and includes this file with
//! `#[path = "common/failing_heap.rs"] mod failing_heap;`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The allocator (see the module doc).
pub struct Failing;

thread_local! {
    static FAIL: Cell<bool> = const { Cell::new(false) };
    static FAILED: Cell<usize> = const { Cell::new(0) };
    /// While `FAIL` is on: how many more allocations succeed before they fail.
    static GRANTED: Cell<usize> = const { Cell::new(0) };
}

/// Whether this allocation of the thread fails (and counts it).
fn refuse() -> bool {
    if !FAIL.try_with(Cell::get).unwrap_or(false) {
        return false;
    }
    if GRANTED.try_with(|g| g.replace(g.get().saturating_sub(1))).unwrap_or(0) > 0 {
        return false;
    }
    let _ = FAILED.try_with(|n| n.set(n.get() + 1));
    true
}

// SAFETY: forwards to the system allocator unchanged, or returns null (an allocation failure,
// which `GlobalAlloc::alloc` may report) while the thread's switch is on.
unsafe impl GlobalAlloc for Failing {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if refuse() {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if refuse() {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(p, l, new) }
    }
}

/// Runs `f` with every allocation of this thread failing; returns what it returned and how
/// many allocations failed.
#[allow(dead_code)]
pub fn without_heap<R>(f: impl FnOnce() -> R) -> (R, usize) {
    heap_for(0, f)
}

/// Runs `f` with the first `granted` allocations of this thread succeeding and every later one
/// failing; returns what it returned and how many allocations failed.
pub fn heap_for<R>(granted: usize, f: impl FnOnce() -> R) -> (R, usize) {
    FAILED.with(|n| n.set(0));
    GRANTED.with(|g| g.set(granted));
    FAIL.with(|s| s.set(true));
    let r = f();
    FAIL.with(|s| s.set(false));
    (r, FAILED.with(Cell::get))
}
