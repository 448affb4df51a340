//! Host invalidations, like KVM's MMU notifiers (`kvm_mmu_invalidate_begin/end`,
//! `mmu_invalidate_retry_gfn`, facts §4): while the host changes what backs a range of guest
//! frames, faults on that range retry, and a fault that translated a host address before an
//! invalidation finished must not install what it found.
//!
//! State: a sequence count (bumped at every `end`), the number of invalidations in flight, and the
//! union of their gfn ranges (KVM keeps one range too). `begin`/`end` run under the MMU lock
//! exclusive; the fault path reads the state once without the lock as a pre-check (`retry_unsafe`,
//! KVM `mmu_invalidate_retry_gfn_unsafe`) and again under the lock, for the whole block the leaf
//! may map (`retry_range`). All values are `u64`: the v6.1 stable bug came from comparing a
//! sign-extended `int`.
//!
//! Ordering: the fault snapshots `seq` (Acquire) *before* translating the host address; `end`
//! bumps `seq` (Release) after the host change is complete. If the fault's translation could have
//! seen the old backing, then either the range was in flight when it checks under the lock, or
//! `seq` moved: both give Retry.
//!
//! Which lock orders the check against `begin`, `add_range` and `end`:
//! - TDP: all of them run under the MMU lock (`begin`..`end` exclusive, the fault's check shared),
//!   so the check sees the whole state of one moment, and the atomics' own orderings only serve
//!   the unlocked pre-check.
//! - Shadow: `begin`..`end` hold the MMU lock (which guards only this state there), while the
//!   fault checks under the shadow lock. What orders them is the unmap that every begin runs
//!   next (`MmuCore::begin_invalidation`'s zap), which takes the shadow lock *after* `begin`
//!   and `add_range` stored the count and the range: a fault whose shadow-lock hold comes after
//!   the unmap's sees both (the lock's release and acquire), and one whose hold came before
//!   installed a leaf the unmap then drops. At `end`, `seq` is bumped before the count drops
//!   (Release), so a check that sees the count drop (Acquire) sees the new `seq` and retries.
//!   `tests/loom_invalidate.rs` models both orders (and fails when `end` drops the count first,
//!   or when the unmap runs before the begin).

use crate::mmu_core::MmuWrite;
use crate::sync::{AtomicU64, Ordering};
use crate::types::{AsId, Gfn};

/// The gfn ranges of one invalidation, visited one by one: a host range meets any number of
/// memslots, and listing their ranges would take heap, which a host reclaiming memory may not
/// have (KVM's notifier calls its handler per memslot too).
pub(crate) trait GfnRanges {
    /// Calls `f` with each range as (address space, start, end).
    fn for_each(&self, f: &mut dyn FnMut(AsId, Gfn, Gfn));
}

impl GfnRanges for [(AsId, Gfn, Gfn)] {
    fn for_each(&self, f: &mut dyn FnMut(AsId, Gfn, Gfn)) {
        for &(as_id, start, end) in self {
            f(as_id, start, end);
        }
    }
}

/// The invalidation state of one VM.
#[derive(Debug, Default)]
pub struct Invalidation {
    seq: AtomicU64,
    in_progress: AtomicU64,
    start: AtomicU64,
    end: AtomicU64,
}

impl Invalidation {
    pub(crate) fn new() -> Self {
        Invalidation::default()
    }

    /// The sequence count, to snapshot before translating a host address.
    #[inline]
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Whether invalidations are in flight now.
    pub fn in_progress(&self) -> u64 {
        self.in_progress.load(Ordering::Acquire)
    }

    /// Starts an invalidation (KVM `kvm_mmu_invalidate_begin`); its gfn ranges are added with
    /// [`Self::add_range`]. `_excl` proves the MMU lock is held exclusive.
    pub(crate) fn begin<T>(&self, _excl: &MmuWrite<'_, T>) {
        let n = self.in_progress.load(Ordering::Relaxed);
        if n == 0 {
            // Empty range until one is added.
            self.start.store(u64::MAX, Ordering::Relaxed);
            self.end.store(0, Ordering::Relaxed);
        }
        // Release: the empty range goes with the count. The range itself comes with
        // `add_range`; a check ordered after the begin's unmap sees it (module doc), and a check
        // that sees the count before the range sees the empty range, which is what its hold can
        // rely on: the unmap after it drops whatever that fault installs.
        self.in_progress.store(n + 1, Ordering::Release);
    }

    /// Widens the in-flight range to cover `[start, end)` (KVM `kvm_mmu_invalidate_range_add`).
    /// `_excl` proves the MMU lock is held exclusive, after [`Self::begin`].
    pub(crate) fn add_range<T>(&self, _excl: &MmuWrite<'_, T>, start: Gfn, end: Gfn) {
        self.start.fetch_min(start.raw(), Ordering::Relaxed);
        self.end.fetch_max(end.raw(), Ordering::Relaxed);
    }

    /// Ends an invalidation. `_excl` proves the MMU lock is held exclusive.
    pub(crate) fn end<T>(&self, _excl: &MmuWrite<'_, T>) {
        // Bump the sequence first, so a fault that sees the count drop also sees the new seq.
        self.seq.fetch_add(1, Ordering::AcqRel);
        let n = self.in_progress.load(Ordering::Relaxed);
        debug_assert!(n > 0, "invalidate end without begin");
        self.in_progress.store(n.saturating_sub(1), Ordering::Release);
    }

    /// KVM `mmu_invalidate_retry_gfn`: whether a fault that snapshotted `seq` must retry for
    /// `gfn`. Under the lock its MMU installs under (TDP: the MMU lock shared; shadow: the shadow
    /// lock; the module doc says why either is enough).
    #[inline]
    pub fn retry(&self, snapshot: u64, gfn: Gfn) -> bool {
        if self.in_progress.load(Ordering::Acquire) != 0 {
            let s = self.start.load(Ordering::Relaxed);
            let e = self.end.load(Ordering::Relaxed);
            if gfn.raw() >= s && gfn.raw() < e {
                return true;
            }
        }
        self.seq.load(Ordering::Acquire) != snapshot
    }

    /// The unlocked pre-check (`_unsafe`): may miss a concurrent change, which the locked check
    /// catches; only used to fail early.
    #[inline]
    pub fn retry_unsafe(&self, snapshot: u64, gfn: Gfn) -> bool {
        self.retry(snapshot, gfn)
    }

    /// [`Self::retry`] for a mapping of the whole block `[start, end)` (a huge page): retry if an
    /// invalidation in flight touches any gfn of it, not only the faulting one. A host changes
    /// part of a huge page only after splitting it (which invalidates the whole block), but the
    /// MMU does not rely on that: a huge leaf installed over a page being invalidated would let
    /// vCPUs use that page until the invalidation ends.
    #[inline]
    pub fn retry_range(&self, snapshot: u64, start: Gfn, end: Gfn) -> bool {
        if self.in_progress.load(Ordering::Acquire) != 0 {
            let s = self.start.load(Ordering::Relaxed);
            let e = self.end.load(Ordering::Relaxed);
            if start.raw() < e && s < end.raw() {
                return true;
            }
        }
        self.seq.load(Ordering::Acquire) != snapshot
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::mmu_core::MmuLock;
    use crate::sync::Spin;

    #[test]
    fn in_flight_range_and_sequence() {
        let lock = MmuLock::new(());
        let x = lock.write(&[], &Spin);
        let i = Invalidation::new();
        let s = i.seq();
        assert!(!i.retry(s, Gfn(5)));
        i.begin(&x);
        i.add_range(&x, Gfn(4), Gfn(8));
        assert!(i.retry(s, Gfn(5)), "in flight and in range");
        assert!(!i.retry(s, Gfn(9)), "in flight, out of range, seq unchanged");
        i.end(&x);
        assert!(i.retry(s, Gfn(9)), "seq moved since the snapshot");
        assert!(!i.retry(i.seq(), Gfn(5)), "a fresh snapshot after the end is fine");
    }

    #[test]
    fn a_block_overlapping_the_range_retries() {
        let lock = MmuLock::new(());
        let x = lock.write(&[], &Spin);
        let i = Invalidation::new();
        let s = i.seq();
        i.begin(&x);
        i.add_range(&x, Gfn(0x205), Gfn(0x206));
        assert!(!i.retry(s, Gfn(0x200)), "the faulting gfn itself is outside");
        assert!(i.retry_range(s, Gfn(0x200), Gfn(0x400)), "its 2 MiB block is not");
        assert!(!i.retry_range(s, Gfn(0x400), Gfn(0x600)), "the next block is fine");
        i.end(&x);
    }

    #[test]
    fn nested_ranges_union() {
        let lock = MmuLock::new(());
        let x = lock.write(&[], &Spin);
        let i = Invalidation::new();
        i.begin(&x);
        i.add_range(&x, Gfn(10), Gfn(20));
        i.begin(&x);
        i.add_range(&x, Gfn(30), Gfn(40));
        let s = i.seq();
        assert!(i.retry(s, Gfn(25)), "the union covers the gap, as KVM's single range does");
        i.end(&x);
        i.end(&x);
        assert_eq!(i.in_progress(), 0);
    }
}
