//! A lock-free summary of the shadow MMU's write tracking above the last level, for the fault
//! path's early check (KVM `kvm_gfn_is_write_tracked`, which reads the memslot's
//! `gfn_write_track` counts with `READ_ONCE` and no lock): a fixed array of counters, each the
//! number of upper-level shadow pages whose gfn hashes to it, in either address space (tracking
//! is by gfn across address spaces: `ShadowState::is_write_tracked`).
//!
//! Invariants:
//! - a counter changes only under the shadow lock, in the critical section that changes the
//!   exact count in `ShadowState` (`account_shadowed` / `unaccount_shadowed`), by the same amount:
//!   each counter is the sum of the exact counts whose keys hash to it;
//! - so a zero counter means that no key hashing to it was tracked when the last critical section
//!   that changed it ended, and a non-zero counter may be a collision (the caller then asks the
//!   exact map under the lock).
//!
//! Concurrency contract: readers load with `Relaxed` and hold no lock (updates use `Release`
//! only because every store in `shadow/` does, which `tests/sync_shim_audit.rs` checks for table
//! memory; nothing here needs it). A reader may see a counter a moment old and call a gfn
//! untracked that a concurrent fault is shadowing right now; that is KVM's race too and harmless:
//! the fault re-checks under the shadow lock before it installs a writable leaf (`fetch`, which
//! write-protects the leaf and emulates the write), so the check only decides whether the early
//! exit is taken, never whether a tracked table becomes writable.

use crate::sync::{AtomicU32, Ordering};
use crate::types::Gfn;
use alloc::boxed::Box;

/// log2 of the number of counters: 4096 (16 KiB per shadow-paging VM) keeps collisions rare for
/// a few hundred upper-level guest tables; loom models use a handful.
#[cfg(not(loom))]
const BITS: u32 = 12;
#[cfg(loom)]
const BITS: u32 = 2;

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct UpperTrackSummary {
    counts: Box<[AtomicU32]>,
}

impl UpperTrackSummary {
    pub(crate) fn new() -> Self {
        UpperTrackSummary { counts: (0..1usize << BITS).map(|_| AtomicU32::new(0)).collect() }
    }

    fn counter(&self, gfn: Gfn) -> &AtomicU32 {
        let key = gfn.raw();
        // Fibonacci hashing: the top bits of the product mix every bit of the key.
        let i = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - BITS)) as usize;
        &self.counts[i]
    }

    /// One more upper-level page shadows `gfn`. Only `ShadowState` calls this, from a `&mut self`
    /// method next to its exact count: the exclusive borrow of the state is the proof that the
    /// shadow lock is held (rule 1 of `crate::shadow`).
    pub(crate) fn add(&self, gfn: Gfn) {
        self.counter(gfn).fetch_add(1, Ordering::Release);
    }

    /// One fewer (after an [`Self::add`] of the same key), called as [`Self::add`] is.
    pub(crate) fn remove(&self, gfn: Gfn) {
        let prev = self.counter(gfn).fetch_sub(1, Ordering::Release);
        debug_assert!(prev > 0, "write-track summary underflow for {gfn:?}");
    }

    /// Whether an upper-level page may shadow `gfn`: `false` is exact as of the last shadow
    /// lock section (see the concurrency contract); `true` may be a collision.
    #[inline]
    pub(crate) fn may_be_tracked(&self, gfn: Gfn) -> bool {
        self.counter(gfn).load(Ordering::Relaxed) != 0
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_tracked_exactly_while_its_adds_outnumber_its_removes() {
        let s = UpperTrackSummary::new();
        let (a, b) = (Gfn(0x1234), Gfn(0x1235));
        assert!(!s.may_be_tracked(a));
        s.add(a);
        s.add(a);
        assert!(s.may_be_tracked(a));
        s.remove(a);
        assert!(s.may_be_tracked(a), "one page still shadows it");
        s.remove(a);
        assert!(!s.may_be_tracked(a));
        // A neighbour lands on another counter (no collision here).
        s.add(a);
        assert!(!s.may_be_tracked(b));
    }

    #[test]
    fn a_page_table_tree_of_a_few_hundred_tables_leaves_most_counters_empty() {
        // 512 tables at consecutive frames (a guest allocating its page tables together): the
        // hash spreads them, so an untracked neighbour frame mostly finds a zero counter.
        let s = UpperTrackSummary::new();
        for g in 0x8000..0x8200 {
            s.add(Gfn(g));
        }
        let false_positives = (0x9000..0xa000).filter(|&g| s.may_be_tracked(Gfn(g))).count();
        assert!(false_positives < 4096 / 4, "{false_positives} of 4096 untracked frames collide");
    }
}
