//! The TDP MMU: second-level page tables of atomic SPTEs (EPT or NPT format), their roots, the
//! lockless walk, installation by compare-and-swap, zapping and dirty-log protection. Mirrors
//! KVM's `mmu/tdp_mmu.c` with the locking of facts §6.
//!
//! # Shape
//! [`TdpMmu`] is what a TDP VM owns beyond the VM-wide [`MmuCore`] (remote TLB flushes, deferred
//! freeing, the vCPU words, the table SRCU: `crate::mmu_core`): the MMU lock with the root list it
//! guards. [`Tdp`] pairs the two, and the operations here (root management, map, zap, dirty, the
//! walk of `Tdp::entry_for_tests` with feature `testing`) are its methods. The SPTE change
//! (`mmu_core/change.rs`) and the lockless walks (`mmu_core/walk.rs`) are the core's: the shadow
//! MMU's tables use them too; the walks' public types are re-exported here, where TDP embedders
//! have always found them.
//!
//! # Locking and lifetime rules (the contract every function here keeps)
//! 1. Every SPTE *change* happens under the MMU lock (`mmu_lock`, `mmu_core/lock.rs`: a
//!    reader-writer lock whose shared side a vCPU's fault takes as a mark on its own cache line):
//!    faults hold it shared and change entries only with compare-and-swap (a lost race is `Retry`),
//!    except the rare fault whose huge leaf replaces a lower table, which takes it exclusive;
//!    zaps, `zap_all_fast`, host invalidations, dirty-log protection, huge-page recovery and root
//!    creation hold it exclusive.
//! 2. Lockless *readers* (the fast MMIO path, and the hardware walker of a vCPU in guest mode)
//!    hold a read section of `table_srcu`, one reader record per vCPU.
//! 3. A table page unlinked by a zap is freed only after a `table_srcu` grace period, and the
//!    grace period is waited for *after* the MMU lock is released (a vCPU in the slow path may be
//!    waiting for the lock, and it must not be inside a table read section while it does).
//! 4. A zap that removed present leaves or unlinked a table flushes remote TLBs before it
//!    returns (and before the pages it unlinked are freed): every vCPU has acknowledged the flush
//!    or was outside guest mode and handles the request before it enters again
//!    ([`crate::requests`]). A vCPU's TLB and paging-structure caches therefore never hold a
//!    freed table (`mmu_core/change.rs`).
//! 5. A table page's entries are initialised (to the non-present value) before the page is linked;
//!    linking is a compare-and-swap with Release semantics and walkers load entries with Acquire,
//!    so a walker that sees the link sees initialised entries.

mod dirty;
mod map;
mod range;
pub mod root;
mod zap;

/// Switches for loom models that must fail when a step of a lock-free argument (or of a
/// re-check after a lock is dropped) is removed.
#[cfg(loom)]
pub mod loom_knobs {
    /// Skips the staleness check a fault makes again under the exclusive lock before it
    /// replaces a table in the way of its huge leaf (`vcpu/fault_path.rs`): the fault then
    /// installs what it decided before it let go of the shared lock.
    pub static SKIP_TABLE_IN_THE_WAY_RECHECK: core::sync::atomic::AtomicBool =
        core::sync::atomic::AtomicBool::new(false);
}

use crate::invalidate::GfnRanges;
pub use crate::invalidate::Invalidation;
use crate::mmu_core::MmuError;
pub use crate::mmu_core::{hw_walk, hw_walk_leaf_table, tdp_need, HwWalk, LocklessWalk};
pub use crate::spte::SpteDump;
pub use map::{LeafSpec, MapOutcome};

use crate::host::Host;
pub(crate) use crate::mmu_core::AckWait;
use crate::mmu_core::MmuCore;
pub(crate) use crate::mmu_core::{MmuLock, MmuRead, MmuWrite};
use crate::requests::Request;
use crate::types::AsId;
use alloc::vec::Vec;
use root::{Root, RootKind};

pub(crate) use zap::ZapScope;

/// The TDP root list (KVM `tdp_mmu_roots`).
pub(crate) type RootList = Vec<RootRef>;

/// A shared handle to a [`Root`] (the root list holds one, each vCPU using the root another),
/// allocated fallibly, so that loading a root reports a full heap.
pub type RootRef = crate::heap::TryArc<Root>;

/// What one VM's TDP MMU owns beyond the VM-wide [`MmuCore`]: KVM's `mmu_lock` with the root
/// list it guards. Its operations are on [`Tdp`], which pairs it with its VM's core.
pub struct TdpMmu {
    /// KVM's `mmu_lock`; guards the root list (KVM `tdp_mmu_roots`) and rule 1 above. The list
    /// holds every root a vCPU may walk, pageless ones included, so that every zap (delete/move,
    /// `zap_all_fast`, host invalidations, the wrap zap) reaches every root (issue 11, defect 2).
    pub(crate) mmu_lock: MmuLock<RootList>,
}

impl TdpMmu {
    /// A TDP MMU with no roots yet.
    pub(crate) fn new() -> Self {
        TdpMmu { mmu_lock: MmuLock::new(Vec::new()) }
    }
}

/// A VM's TDP MMU at work: the VM's [`MmuCore`] and its [`TdpMmu`] (from
/// [`crate::vm::Vm::tdp`]). Cheap to copy; it derefs to the core, so the core's configuration,
/// host and counters read through it.
pub struct Tdp<'a, H: Host> {
    pub(crate) core: &'a MmuCore<H>,
    pub(crate) tdp: &'a TdpMmu,
}

impl<H: Host> Clone for Tdp<'_, H> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<H: Host> Copy for Tdp<'_, H> {}

impl<H: Host> core::ops::Deref for Tdp<'_, H> {
    type Target = MmuCore<H>;
    #[inline]
    fn deref(&self) -> &MmuCore<H> {
        self.core
    }
}

impl<'a, H: Host> Tdp<'a, H> {
    /// A valid root for address space `as_id`, made if there is none (KVM
    /// `kvm_tdp_mmu_get_vcpu_root_hpa`). The caller becomes one of its users.
    pub(crate) fn get_root(&self, as_id: AsId) -> Result<RootRef, MmuError> {
        {
            let roots = self.tdp.mmu_lock.read(&self.relax());
            if let Some(r) = roots.iter().find(|r| r.is_shared_valid(as_id)) {
                r.get();
                return Ok(r.clone());
            }
        }
        // The tree's place first, without the MMU lock (the free queue's lock under it makes
        // root loads convoy behind memslot updates); given back, after the MMU lock is dropped,
        // if no root is made here.
        let promise = self.promise_tree()?;
        let mut roots = self.tdp.mmu_lock.write(&self.vcpus, &self.relax());
        if let Some(r) = roots.iter().find(|r| r.is_shared_valid(as_id)) {
            r.get();
            return Ok(r.clone());
        }
        let root = self.new_root(&mut roots, as_id, RootKind::Tdp)?;
        promise.keep();
        Ok(root)
    }

    /// A new root of `kind` on the root list `roots` (whose lock the caller holds exclusive),
    /// with the caller as its one user. Fallible all through: the list's room and the root's
    /// record come from the heap with [`MmuError::OutOfHeap`] on failure, the table frame from
    /// the host with [`MmuError::OutOfMemory`]; on any failure nothing is made.
    fn new_root(
        &self,
        roots: &mut RootList,
        as_id: AsId,
        kind: RootKind,
    ) -> Result<RootRef, MmuError> {
        roots.try_reserve(1).map_err(|_| MmuError::OutOfHeap)?;
        let pfn = self.alloc_table().ok_or(MmuError::OutOfMemory)?;
        let Some(root) = RootRef::try_new(Root::new(pfn, self.cfg.root_level, as_id, kind)) else {
            self.free_unpublished_table(pfn);
            return Err(MmuError::OutOfHeap);
        };
        root.get();
        roots.push(root.clone());
        Ok(root)
    }

    /// A root without a page-tracking state, private to one vCPU (models KVM's special roots).
    /// It joins the root list, so zaps reach what it maps like any other root.
    pub(crate) fn make_pageless_root(&self, as_id: AsId) -> Result<RootRef, MmuError> {
        let promise = self.promise_tree()?;
        let mut roots = self.tdp.mmu_lock.write(&self.vcpus, &self.relax());
        let root = self.new_root(&mut roots, as_id, RootKind::Pageless)?;
        promise.keep();
        Ok(root)
    }

    /// Drops a vCPU's use of `root`. An obsolete (or pageless) root nobody uses any more leaves
    /// the root list, its leaves and MMIO SPTEs zapped, and is queued for freeing with the
    /// tables it links (a tree, `free_queue.rs`): no heap.
    pub(crate) fn put_root(&self, root: RootRef) {
        if root.put() != 0 {
            return;
        }
        // SeqCst fence between the decrement and the `invalid` load, paired with the one in
        // `zap_all_fast` between its `invalidate` stores and its `users` loads: without the pair
        // this is store buffering, and both sides could read the other's old value (this side a
        // valid root, the zap a user), leaving an obsolete root nobody uses on the list, its
        // page never freed until the next `zap_all_fast` (`tests/loom_roots.rs`). With it, at
        // least one side sees the other: the zap retires the root, or this side does below.
        crate::sync::fence(crate::sync::Ordering::SeqCst);
        if root.kind() == RootKind::Tdp && !root.is_obsolete() {
            return; // valid roots stay for the next vCPU that loads one
        }
        let mut roots = self.tdp.mmu_lock.write(&self.vcpus, &self.relax());
        // Obsolete roots gain no users (get_root takes valid ones only, under the lock); a
        // pageless root belongs to the vCPU dropping it.
        debug_assert_eq!(root.users(), 0);
        let before = roots.len();
        roots.retain(|r| !RootRef::ptr_eq(r, &root));
        if roots.len() == before {
            // `zap_all_fast` retired it already (it saw no users): it frees the page.
            return;
        }
        // What a fault built since the root went obsolete (none, unless
        // `Bug::NoStaleRootCheck`), or all a pageless root maps.
        let flush = self.zap_root_contents(&roots, &root);
        let links = self.needs_pending_flush(&roots, &root);
        // Queued after the lock: taking the free queue's lock under the MMU lock made the vCPUs'
        // root reloads convoy behind memslot updates (`vmmu bench --only churn`, zap-all rows).
        // Nothing reaches the root meanwhile (it left the list), and nothing can unwind between.
        drop(roots);
        self.retire_root(&root, links);
        // A pageless root is private to the vCPU dropping it: no other vCPU can hold its
        // translations, and that vCPU flushes its own TLB when it loads its next root.
        self.flush_after_zap(flush && root.kind() == RootKind::Tdp);
    }

    /// Whether retiring `root` must make a TLB flush pending on every vCPU
    /// ([`Self::retire_root`]): a TDP root that still links a table or maps a huge leaf. The
    /// caller holds the MMU lock exclusive (`excl`), and `root` is on the root list or just
    /// left it.
    fn needs_pending_flush(&self, excl: &MmuWrite<'_, RootList>, root: &Root) -> bool {
        root.kind() == RootKind::Tdp && self.links_anything(excl, root)
    }

    /// Queues `root`, which left the root list with no user, for freeing with the tables it
    /// links ([`MmuCore::retire_tree`]). No vCPU walks it any more, but where a TDP root links a
    /// table (`links`, [`Self::needs_pending_flush`]), some vCPU's paging-structure caches may
    /// still hold the link (tagged with the root, which a new root may reuse): a TLB flush is
    /// made pending first. A pageless root is private to one vCPU, which flushes its own TLB
    /// when it loads its next root.
    fn retire_root(&self, root: &Root, links: bool) {
        self.retire_tree(root.pfn(), root.level(), links);
    }

    /// KVM `kvm_mmu_zap_all_fast`: obsolete every root, ask every vCPU to drop obsolete roots,
    /// zap the obsolete roots' leaves, MMIO SPTEs and tables, flush, and free what nobody uses
    /// after a grace period. Needs no heap: a root no vCPU uses goes at once with the tables it
    /// links (a tree, `free_queue.rs`), and from a root still in use each table goes when it can
    /// be listed with room promised ([`zap::OptionalUnlink`]), else it stays linked, emptied,
    /// and goes with the root when its last user drops it. Callers hold the slots lock (the
    /// memslot update path) or otherwise serialise it.
    pub(crate) fn zap_all_fast(&self) {
        self.stats.zap_all_fast.add(1);
        let mut pages = self.unlinked();
        let mut roots = self.tdp.mmu_lock.write(&self.vcpus, &self.relax());
        for r in roots.iter().filter(|r| r.kind() == RootKind::Tdp) {
            // Pageless roots have no page to mark (KVM's special roots): their vCPUs drop them on
            // the request below, and their tables are zapped with everyone else's.
            r.invalidate();
        }
        // Pairs with the fence in `put_root` (its doc): a last user that let go of a root
        // without seeing it invalid is seen by the `users` loads below.
        crate::sync::fence(crate::sync::Ordering::SeqCst);
        // Same critical section as the invalidation (facts §4 step 3).
        self.request_all(Request::FreeObsoleteRoots, AckWait::NoWait);
        let mut flush = false;
        let mut list = zap::OptionalUnlink::new(&mut pages);
        for r in roots.iter() {
            // An obsolete root gains no user (`get_root` takes valid ones), so one with none now
            // is retired below.
            flush |= if r.users() == 0 {
                self.zap_root_contents(&roots, r)
            } else {
                self.zap_root_tables(&roots, r, &mut list)
            };
        }
        // Roots no vCPU uses can go now; the others go when their last user drops them.
        // Under the lock: no heap to keep a root in until it is dropped (rare: a root nobody
        // uses). In list order, as `retain` (which could not lend the guard to the check).
        let mut i = 0;
        while let Some(r) = roots.get(i) {
            if r.users() == 0 {
                self.retire_root(r, self.needs_pending_flush(&roots, r));
                roots.remove(i);
            } else {
                i += 1;
            }
        }
        self.flush_after_zap(flush);
        drop(roots);
        pages.queue();
        self.reclaim();
    }

    /// Host invalidation start (KVM `kvm_mmu_notifier_invalidate_range_start`, for the gfn
    /// ranges a host-address range maps to): faults on the ranges retry until
    /// [`Self::invalidate_end`], and every leaf that maps them is zapped and flushed before this
    /// returns. Tables stay linked ([`ZapScope::Leaves`], as KVM's `kvm_unmap_gfn_range`).
    pub(crate) fn invalidate_begin(&self, ranges: &(impl GfnRanges + ?Sized)) {
        self.core.begin_invalidation(
            &self.tdp.mmu_lock,
            ranges,
            |roots, as_id, start, end, pages| {
                self.zap_gfn_range_locked(roots, as_id, start, end, ZapScope::Leaves, pages)
            },
        );
    }

    /// Host invalidation end (KVM `invalidate_range_end`).
    pub(crate) fn invalidate_end(&self) {
        self.core.end_invalidation(&self.tdp.mmu_lock);
    }

    /// The entry for `gfn` at `level` under `root`, if the tables reach that level: a test hook
    /// for corrupting or freezing entries. Takes the MMU lock shared while it walks. Only with the
    /// `testing` feature.
    ///
    /// # Safety
    /// - `root` is a root of this MMU in use: on its root list, or the current root of one of its
    ///   VM's vCPUs (a `Root` kept alive by a `RootRef` after its vCPU dropped it, or one of
    ///   another VM, names a frame this MMU may have freed, or may free during the walk: pages
    ///   unlinked earlier are freed by `reclaim`, which the MMU lock does not hold off);
    /// - it stays in use, and nothing that may free the returned entry's page (a zap, a root's
    ///   last user dropping it, `zap_all_fast`) runs, while the caller uses the reference.
    #[cfg(feature = "testing")]
    pub unsafe fn entry_for_tests(
        &self,
        root: &Root,
        gfn: crate::types::Gfn,
        level: crate::types::Level,
    ) -> Option<&'a crate::sync::AtomicU64> {
        let _g = self.tdp.mmu_lock.read(&self.relax());
        let mut pfn = root.pfn();
        let mut l = root.level();
        loop {
            // SAFETY: reached from `root`, a root of this MMU in use (the caller's contract),
            // with the MMU lock held shared (`_g`), so no linked page is unlinked, let alone
            // freed, during the walk.
            // The reference returned outlives that hold: its later use is the caller's
            // `# Safety` contract (no zap or root drop that could free the page meanwhile).
            let table = unsafe { self.core.table(pfn) }?;
            let e = &table[l.index(gfn)];
            if l == level {
                return Some(e);
            }
            let v = e.load(crate::sync::Ordering::Acquire);
            if !crate::spte::SpteFormat::is_mmu_present(v) || self.cfg.format.is_leaf(v, l) {
                return None;
            }
            pfn = self.cfg.format.pfn(v);
            l = l.lower()?;
        }
    }

    /// Number of roots on the list (valid and obsolete).
    pub fn nr_roots(&self) -> usize {
        self.tdp.mmu_lock.read(&self.relax()).len()
    }
}
