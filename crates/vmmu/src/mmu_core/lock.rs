//! The MMU lock (KVM `mmu_lock`): a reader-writer lock over what the MMU that owns it guards
//! with it (the TDP MMU: its root list; the shadow MMU: nothing but the host-invalidation state
//! of the core, its pages being under the shadow lock), whose shared side a vCPU's fault takes
//! without writing any line another CPU uses.
//!
//! KVM's `mmu_lock` is an rwlock: every fault's read lock and unlock are two atomic
//! read-modify-writes on one word that every vCPU shares, which bounces that line between the
//! CPUs of vCPUs faulting at once. Here a vCPU marks its shared hold in its own
//! [`VcpuState`] (a line only it writes), and a writer (a zap, root management) announces itself
//! and waits for the marks to clear:
//!
//! - vCPU, shared: `mark.store(1)`, the reader fence, then `writer.load()`; if no writer, it
//!   holds the lock. Otherwise it clears its mark and takes the reader-writer lock's shared side
//!   (which waits for the writer). Release: `mark.store(0, Release)`.
//! - writer: takes the reader-writer lock exclusive (excluding other writers and the lock's own
//!   readers), `writer.store(1)`, the writer fence, then waits until every vCPU's mark reads 0
//!   (`Acquire`). Release: `writer.store(0, Release)`, then the lock.
//!
//! Why it excludes: the two `SeqCst` fences are a store-buffering pair. (Full fences on both sides:
//! a vCPU's fence stays on its own CPU, which is all the fast side is for, while an asymmetric pair
//! would make every zap pay a process-wide barrier; measured, no gain on faults and a worse
//! memslot-update tail.) If the vCPU's load of `writer` missed the writer's store, then the
//! writer's load of the mark (after its fence) sees the vCPU's mark, and it waits for the vCPU's
//! Release store of 0, which orders the vCPU's whole hold before the writer's. If the vCPU saw the
//! writer, it does not hold the fast side at all. Code that is not a vCPU's fault (root loading,
//! reports, tests) takes the reader-writer lock's shared side, as before.

use crate::requests::VcpuState;
use crate::sync::{AtomicU32, Ordering, Relax, RwLock, RwLockReadGuard, RwLockWriteGuard};
use core::ops::{Deref, DerefMut};

/// The MMU lock: what it guards (`T`) behind a reader-writer lock, and the writer's
/// announcement.
pub(crate) struct MmuLock<T> {
    rw: RwLock<T>,
    /// A writer holds or is taking the lock (vCPUs then use the reader-writer lock's shared side).
    writer: AtomicU32,
}

/// Proof that the MMU lock is held shared (a fault), passed to what needs it.
pub(crate) enum MmuRead<'a, T> {
    /// A vCPU's mark in its own state (the fast side).
    Vcpu(&'a VcpuState),
    /// The reader-writer lock's shared side (held for its release on drop).
    Lock(#[allow(dead_code)] RwLockReadGuard<'a, T>),
}

impl<T> Drop for MmuRead<'_, T> {
    fn drop(&mut self) {
        if let MmuRead::Vcpu(state) = self {
            // Release: the hold's reads and SPTE changes happen before a writer that reads 0.
            state.mmu_mark().store(0, Ordering::Release);
        }
    }
}

/// Proof that the MMU lock is held exclusive (a zap, root management); it also gives what the
/// lock guards.
pub(crate) struct MmuWrite<'a, T> {
    // Field order: the announcement is withdrawn (Drop below) before the guard is released.
    writer: &'a AtomicU32,
    guard: RwLockWriteGuard<'a, T>,
}

impl<T> Deref for MmuWrite<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for MmuWrite<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

impl<T> Drop for MmuWrite<'_, T> {
    fn drop(&mut self) {
        // Release: what the writer did happens before a vCPU that reads 0 and holds the fast side.
        self.writer.store(0, Ordering::Release);
    }
}

/// Proof that no other thread changes the entries of the tables the holder reaches: the TDP MMU's
/// lock held exclusive (an [`MmuWrite`] of its root list), or the shadow MMU's state, which is
/// reachable only through the shadow lock's guard. Plain stores into table entries
/// (`MmuCore::set_spte_locked`) take one.
pub(crate) trait TablesExclusive {}

impl TablesExclusive for MmuWrite<'_, crate::tdp::RootList> {}

impl<T> MmuLock<T> {
    /// The lock, guarding `value`.
    pub(crate) fn new(value: T) -> Self {
        MmuLock { rw: RwLock::new(value), writer: AtomicU32::new(0) }
    }

    /// The shared side for code that is not a vCPU's fault.
    pub(crate) fn read(&self, relax: &impl Relax) -> RwLockReadGuard<'_, T> {
        self.rw.read_with(relax)
    }

    /// The shared side for vCPU `state`'s fault (module doc).
    pub(crate) fn read_vcpu<'a>(
        &'a self,
        state: &'a VcpuState,
        relax: &impl Relax,
    ) -> MmuRead<'a, T> {
        let mark = state.mmu_mark();
        // One hold per vCPU at a time: the mark is 0 or 1, so a nested hold's release would end
        // the outer one while it still reads tables (no path nests; debug builds check it).
        debug_assert_eq!(
            mark.load(Ordering::Relaxed),
            0,
            "a vCPU took the MMU lock's fast side twice"
        );
        mark.store(1, Ordering::Relaxed);
        crate::sync::fence(Ordering::SeqCst);
        // Acquire: a writer that just left published its changes with its Release store of 0.
        if self.writer.load(Ordering::Acquire) == 0 {
            return MmuRead::Vcpu(state);
        }
        mark.store(0, Ordering::Release);
        MmuRead::Lock(self.rw.read_with(relax))
    }

    /// The exclusive side (module doc). `vcpus`: every vCPU state of the VM, claimed or not (a
    /// vCPU claimed while the writer scans still sees the announcement or is seen).
    pub(crate) fn write<'a>(&'a self, vcpus: &[VcpuState], relax: &impl Relax) -> MmuWrite<'a, T> {
        let guard = self.rw.write_with(relax);
        self.writer.store(1, Ordering::Relaxed);
        crate::sync::fence(Ordering::SeqCst);
        for v in vcpus {
            // Acquire: pairs with the vCPU's Release store of 0 when its hold ends.
            while v.mmu_mark().load(Ordering::Acquire) != 0 {
                relax.relax();
            }
        }
        MmuWrite { writer: &self.writer, guard }
    }
}
