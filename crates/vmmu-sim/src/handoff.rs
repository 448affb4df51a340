//! Handing the CPU back to a thread that waits for a vCPU: the machine's side of the MMU's wait
//! loops ([`vmmu::host::Sched::relax`]), so that a memslot update does not wait milliseconds for
//! a vCPU that left its read section microseconds after it got a CPU.
//!
//! # Why
//! A memslot update's grace period waits for every vCPU inside a read section that began before
//! it (a fault's memslot lookup; guest mode, for table pages); a remote flush waits for every vCPU
//! in guest mode to poll. With two vCPU threads busy on two CPUs, the updater that wakes for its
//! request takes the CPU of one of them, often a vCPU inside such a section, and then waits for
//! it. Its wait turn yields (`sched_yield`), the vCPU gets the CPU back and leaves the section
//! at once, but the updater only runs again when that vCPU's time slice ends: Linux's EEVDF
//! scheduler charges every `sched_yield` a slice of virtual runtime, so the yielder is the last
//! to be picked. Traced with `sched_switch` events on this 2-CPU VM: one yield of the updater,
//! then the vCPU ran 4.9 ms; default-run update latency p99 2-5 ms.
//!
//! KVM's vCPUs do not hold up an update this way: a vCPU thread that is scheduled out leaves
//! guest mode (`kvm_sched_out`), so a remote flush never waits for a preempted vCPU, and its
//! SRCU sections cover only exits. The machine's vCPUs do the equivalent by hand: between two
//! accesses, a vCPU that sees a waiter announced here *gives way*: it leaves guest mode (closing
//! its table read section), yields its CPU once, and enters again ([`crate::HwVcpu::give_way`]).
//! The yield charges the vCPU, not the waiter, so the waiter runs next.
//!
//! # Invariants
//! The count is the number of threads inside [`Handoff::wait_turn`] (an [`Announcement`] is
//! live for each). It is a hint: a vCPU that reads a stale value yields once for nothing or
//! not at all, and nothing's correctness depends on it (the MMU's protocols wait on their own
//! atomics). Relaxed throughout; the line is written only by waiters, which are rare, so the
//! vCPUs' load per access hits their own cache.

use std::sync::atomic::{AtomicU32, Ordering};

/// The waiters of one host (module doc).
#[derive(Debug, Default)]
pub struct Handoff {
    waiting: AtomicU32,
}

/// A waiter's presence, from [`Handoff::announce`] until dropped.
#[derive(Debug)]
#[must_use = "the announcement ends when it is dropped"]
pub struct Announcement<'a>(&'a Handoff);

impl Drop for Announcement<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Handoff {
    /// No waiters.
    pub const fn new() -> Handoff {
        Handoff { waiting: AtomicU32::new(0) }
    }

    /// Counts the caller as waiting until the announcement drops.
    pub fn announce(&self) -> Announcement<'_> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Announcement(self)
    }

    /// One turn of a wait loop: announce, give the CPU away, withdraw.
    pub fn wait_turn(&self) {
        let _present = self.announce();
        std::thread::yield_now();
    }

    /// Whether some thread is waiting (a hint, module doc). One relaxed load.
    #[inline(always)]
    pub fn someone_waits(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_count_waiters_until_dropped() {
        let h = Handoff::new();
        assert!(!h.someone_waits());
        let a = h.announce();
        let b = h.announce();
        assert!(h.someone_waits());
        drop(a);
        assert!(h.someone_waits());
        drop(b);
        assert!(!h.someone_waits());
        h.wait_turn();
        assert!(!h.someone_waits(), "a wait turn withdraws its announcement");
    }
}
