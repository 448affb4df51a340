//! Table pages waiting for a grace period before they go back to the host (rule 3): the room
//! promised for them, so that zapping a shadow page needs no heap, and the list a TDP zap keeps
//! of the tables it unlinked until its flush is done, which an unwind cannot lose
//! ([`Unlinked`]; the TDP MMU's recovery of huge pages, optional work, promises its room in
//! bulk and skips what it cannot promise).
//!
//! A retired TDP root goes as one entry, a *tree*: its tables stay linked below it, and the
//! reclaimer frees the root and every table it still links once the grace period is over, as
//! KVM frees each of a root's tables from its own RCU callback (its `rcu_head` lives in the
//! page: nothing to allocate). So the zaps of whole roots (`zap_all_fast`, a root's last user)
//! list nothing, and each TDP root promises its tree's place when it is made. A table that a
//! TDP fault's huge leaf detached goes the same way, as a tree whose place the fault promised
//! before it took the MMU lock.
//!
//! KVM's zaps allocate nothing (its lists are intrusive), so a zap cannot fail and neither can
//! the fault that recycles pages to make room. Here the queue is a buffer on the heap, and each
//! shadow page (and each vCPU's PAE root frame) reserves its place in it when it is made, where
//! running out of heap can still be reported ([`FreeQueue::promise`]); queuing it later, in a
//! zap, then allocates nothing ([`Promised::push`]).
//!
//! # Invariants
//! - `frames.capacity() - frames.len() >= promised`, and `promised` is the number of frames
//!   that hold a promise and are not queued yet (the live shadow pages, the vCPUs' PAE roots).
//! - `trees.capacity() - trees.len() >= promised_trees`, the TDP roots made and not queued yet
//!   (and, for the moment between its promise and its queuing, a table a fault detaches).
//! - A tree's tables are reachable only from its top once it is queued (the root left the root
//!   list under the exclusive MMU lock, with no user; the detached table was replaced by a
//!   huge leaf under that lock), so nothing changes them until the reclaimer walks them.
//! - Only a reclaimer removes frames, and reclaimers take turns (`MmuCore::reclaiming`): each
//!   frees the first `n` frames, those queued before its grace period began, while others
//!   append behind them. The buffer keeps its capacity (a reclaimer that took the whole buffer
//!   would leave a queue without the promised room).

use crate::types::{Level, Pfn};
use alloc::collections::{TryReserveError, VecDeque};
use alloc::vec::Vec;

/// The queue of unlinked table frames (inside `MmuCore::free_queue`'s mutex).
#[derive(Debug, Default)]
pub(crate) struct FreeQueue {
    /// Unlinked frames, oldest first. A ring buffer: a reclaimer takes its frames from the
    /// front in chunks, and a `Vec` moved the rest of the queue down at every chunk (a reclaim
    /// quadratic in the queue's length).
    pub(super) frames: VecDeque<Pfn>,
    /// Frames that will be queued with [`Promised::push`] and have room reserved (module
    /// invariant).
    promised: usize,
    /// Retired TDP roots, oldest first: each root frame with its level, to be freed with every
    /// table it still links (module doc).
    pub(super) trees: VecDeque<(Pfn, Level)>,
    /// TDP roots made and not retired yet (and tables a fault is detaching), each with room
    /// reserved in `trees`.
    promised_trees: usize,
}

impl FreeQueue {
    /// Reserves room for one more frame to be queued later without allocating.
    pub(crate) fn promise(&mut self) -> Result<(), TryReserveError> {
        self.frames.try_reserve(self.promised + 1)?;
        self.promised += 1;
        Ok(())
    }

    /// Reserves room for `n` more frames to be queued later without allocating.
    pub(crate) fn promise_many(&mut self, n: usize) -> Result<(), TryReserveError> {
        self.frames.try_reserve(self.promised + n)?;
        self.promised += n;
        Ok(())
    }

    /// Queues `pages`, of which `promised` hold a promise ([`Self::promise_many`]; unused
    /// promises are given back), keeping the rest of the promised room. Allocates only for
    /// frames beyond `promised`, which no zap of the MMUs queues (each promises its frames or
    /// queues a tree).
    pub(super) fn append(&mut self, pages: &mut Vec<Pfn>, promised: usize) {
        debug_assert!(self.promised >= promised, "more promises kept than made");
        self.promised = self.promised.saturating_sub(promised);
        // Room for `promised` frames beyond the remaining promises was reserved: no allocation
        // while `pages` holds no more than that.
        self.frames.reserve(self.promised + pages.len());
        self.frames.extend(pages.drain(..));
    }

    /// Queues a frame that holds a promise: allocates nothing.
    pub(super) fn push_promised(&mut self, pfn: Pfn) {
        debug_assert!(self.promised > 0, "{pfn:?} queued without a promise");
        debug_assert!(self.frames.len() < self.frames.capacity());
        self.promised = self.promised.saturating_sub(1);
        self.frames.push_back(pfn);
    }

    /// Reserves room for the tree of a TDP root being made, queued when the root retires
    /// ([`Self::push_tree`]) without allocating.
    pub(crate) fn promise_tree(&mut self) -> Result<(), TryReserveError> {
        self.trees.try_reserve(self.promised_trees + 1)?;
        self.promised_trees += 1;
        Ok(())
    }

    /// Gives back a tree's promise (the root it was made for could not be made).
    pub(crate) fn unpromise_tree(&mut self) {
        debug_assert!(self.promised_trees > 0, "no tree promised");
        self.promised_trees = self.promised_trees.saturating_sub(1);
    }

    /// Queues the tree of the retired TDP root `pfn` at `level`, whose room was promised:
    /// allocates nothing.
    pub(super) fn push_tree(&mut self, pfn: Pfn, level: Level) {
        debug_assert!(self.promised_trees > 0, "root {pfn:?} retired without a promise");
        debug_assert!(self.trees.len() < self.trees.capacity());
        self.promised_trees = self.promised_trees.saturating_sub(1);
        self.trees.push_back((pfn, level));
    }

    /// Entries queued: frames, and trees (a retired root and its tables count once).
    pub(super) fn len(&self) -> usize {
        self.frames.len() + self.trees.len()
    }

    /// Test-only: the promises not kept yet.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn promised(&self) -> usize {
        self.promised
    }

    /// Test-only: how many more trees can be promised without growing the list.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn tree_room(&self) -> usize {
        self.trees.capacity() - self.trees.len() - self.promised_trees
    }

    /// Test-only: the TDP roots whose tree's place is promised.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn promised_trees(&self) -> usize {
        self.promised_trees
    }
}

/// The queue, locked, for frames whose room was promised (a zap's commit): each push allocates
/// nothing. Made by `MmuCore::queue_promised`, which bumped the table epoch first.
pub(crate) struct Promised<'a>(pub(super) crate::sync::MutexGuard<'a, FreeQueue>);

impl Promised<'_> {
    /// Queues `pfn`, whose room was promised.
    pub(crate) fn push(&mut self, pfn: Pfn) {
        self.0.push_promised(pfn);
    }
}

/// Table frames a zap unlinked, to be queued for freeing once its remote flush is done
/// (`MmuCore::unlinked`; a `Vec` to the zap's code, which queues it explicitly after the
/// flush). Dropped with frames still in it, by an unwind (a host callback that panics in the
/// zap or in its flush's kick), it first makes a TLB flush pending on every vCPU (atomics only,
/// no kick: nothing that can unwind again), then queues them, so no frame is lost: a queued
/// frame is freed only after a grace period in a later reclaim, which a vCPU in guest mode ends
/// only by leaving it, and it flushes its TLB and paging-structure caches before it enters
/// again; queuing bumps the table epoch that the vCPUs' leaf-table caches check.
pub(crate) struct Unlinked<'a, H: crate::host::Host> {
    pub(super) core: &'a super::MmuCore<H>,
    pub(super) pages: Vec<Pfn>,
    /// Room promised in the queue for frames pushed later ([`Self::try_promise`]).
    pub(super) promised: usize,
}

impl<H: crate::host::Host> Unlinked<'_, H> {
    /// Makes room for `n` more frames, in this list and in the queue, so that pushing them and
    /// queuing them allocate nothing; `false` (and nothing promised) if the heap has no room.
    /// For optional work, which is skipped when it would need the heap.
    pub(crate) fn try_promise(&mut self, n: usize) -> bool {
        if self.pages.try_reserve(n).is_err() || self.core.free_queue().promise_many(n).is_err() {
            return false;
        }
        self.promised += n;
        true
    }

    /// Queues the frames for freeing after a grace period ([`super::MmuCore::defer_free`]),
    /// through the room promised for them, and gives back the promises they did not use.
    pub(crate) fn queue(&mut self) {
        self.core.defer_free(&mut self.pages, self.promised);
        self.promised = 0;
    }
}

impl<H: crate::host::Host> core::ops::Deref for Unlinked<'_, H> {
    type Target = Vec<Pfn>;
    fn deref(&self) -> &Vec<Pfn> {
        &self.pages
    }
}

impl<H: crate::host::Host> core::ops::DerefMut for Unlinked<'_, H> {
    fn deref_mut(&mut self) -> &mut Vec<Pfn> {
        &mut self.pages
    }
}

impl<H: crate::host::Host> Drop for Unlinked<'_, H> {
    fn drop(&mut self) {
        if !self.pages.is_empty() {
            self.core.request_all_without_kick(crate::requests::Request::TlbFlush);
        }
        self.queue();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promised_frames_are_queued_without_growing_the_buffer() {
        let mut q = FreeQueue::default();
        for _ in 0..5 {
            q.promise().unwrap();
        }
        let cap = q.frames.capacity();
        // Unpromised frames keep the promised room.
        q.append(&mut alloc::vec![Pfn(100), Pfn(101), Pfn(102)], 0);
        assert!(q.frames.capacity() - q.frames.len() >= 5);
        let cap2 = q.frames.capacity();
        assert!(cap2 >= cap);
        for i in 0..5 {
            q.push_promised(Pfn(i));
        }
        assert_eq!(q.frames.capacity(), cap2, "a promised push reallocated");
        assert_eq!(q.promised(), 0);
        // A reclaim removes from the front; the capacity stays.
        q.frames.drain(..3);
        assert_eq!(q.frames.capacity(), cap2);
        assert_eq!(q.frames, [0, 1, 2, 3, 4].map(Pfn));
    }

    /// Frames queued through promises made in bulk do not grow the buffer, and the promises
    /// they did not use are given back (the other promises keep their room).
    #[test]
    fn bulk_promises_are_kept_and_the_unused_given_back() {
        let mut q = FreeQueue::default();
        q.promise().unwrap();
        q.promise_many(3).unwrap();
        let cap = q.frames.capacity();
        q.append(&mut alloc::vec![Pfn(7), Pfn(8)], 3);
        assert_eq!(q.frames.capacity(), cap, "a promised append reallocated");
        assert_eq!(q.promised(), 1);
        assert!(q.frames.capacity() - q.frames.len() >= 1, "the other promise keeps its room");
        q.push_promised(Pfn(9));
        assert_eq!(q.frames, [7, 8, 9].map(Pfn));
        assert_eq!(q.promised(), 0);
    }

    /// A root's tree is queued through the room its promise reserved, and a promise given back
    /// leaves the others' room.
    #[test]
    fn promised_trees_are_queued_without_growing_the_buffer() {
        let mut q = FreeQueue::default();
        for _ in 0..3 {
            q.promise_tree().unwrap();
        }
        q.unpromise_tree();
        let cap = q.trees.capacity();
        assert!(cap >= 2);
        q.push_tree(Pfn(1), Level::L4);
        q.push_tree(Pfn(2), Level::L5);
        assert_eq!(q.trees.capacity(), cap, "a promised tree reallocated");
        assert_eq!(q.promised_trees(), 0);
        assert_eq!(q.len(), 2);
        assert_eq!(q.trees, [(Pfn(1), Level::L4), (Pfn(2), Level::L5)]);
    }
}
