//! The VM-wide machinery both MMUs share (KVM's `struct kvm_arch` MMU fields that do not depend
//! on the shape of the tables): the host, the configuration, the vCPUs' mode and request words
//! with their indices, remote TLB flushes and requests, the table SRCU and the table epoch, table
//! pages (allocation, deferred freeing after a grace period), the host-invalidation state and the
//! VM-wide counters. [`crate::tdp`] (tables keyed by guest-physical address) and
//! [`crate::shadow`] (tables that shadow the guest's) build on it; each takes its [`MmuCore`]
//! as an argument, or through [`crate::tdp::Tdp`], and never holds one of its own.
//!
//! # Invariants (the rules of [`crate::tdp`] that are about table pages, kept here)
//! - A table page is freed only after a `table_srcu` grace period that began after nothing
//!   linked it any more (`MmuCore::defer_free` then `MmuCore::reclaim`); the table epoch is
//!   bumped before such pages are queued, so no vCPU's leaf-table cache reads them again.
//! - `MmuCore::reclaim` runs with no MMU lock held and outside any table read section.
//! - The invalidation state ([`crate::invalidate`]) begins and ends under the VM's MMU lock held
//!   exclusive (`MmuCore::begin_invalidation`, `MmuCore::end_invalidation`), whichever MMU owns
//!   that lock (`lock.rs`).

mod change;
mod free_queue;
mod lock;
mod walk;

pub(crate) use change::FlushNeed;
pub(crate) use free_queue::{FreeQueue, Promised, Unlinked};
pub(crate) use lock::{MmuLock, MmuRead, MmuWrite, TablesExclusive};
pub use walk::{hw_walk, hw_walk_leaf_table, tdp_need, HwWalk, LocklessWalk};
pub(crate) use walk::{CachedWalk, LeafTableCache};

/// Switches for loom models that must fail when a step of the lock-free leaf-table cache hit
/// (`walk.rs`) is removed.
#[cfg(loom)]
pub mod loom_knobs {
    /// Skips the second table-epoch load of a type-stable leaf-table cache hit: the hit then
    /// answers from a table that may have been freed and reused since the first load.
    pub static SKIP_EPOCH_RECHECK: core::sync::atomic::AtomicBool =
        core::sync::atomic::AtomicBool::new(false);
    /// Makes that hit's entry load `Relaxed` (it is `Acquire`): the second epoch load may then
    /// miss the bump that preceded the free of a frame whose reuse the entry load saw.
    pub static RELAXED_ENTRY_LOAD: core::sync::atomic::AtomicBool =
        core::sync::atomic::AtomicBool::new(false);
}

use crate::bugs::BugSet;
use crate::host::{Host, TableEntries};
use crate::invalidate::GfnRanges;
use crate::invalidate::Invalidation;
use crate::requests::{Request, VcpuState};
use crate::spte::{MmioSpteCodec, SpteFormat};
use crate::srcu::{ReaderId, Srcu};
use crate::stats::VmStats;
use crate::sync::{Arc, Mutex};
use crate::types::{Access, AsId, Generation, Gfn, Level, Pfn};
use alloc::boxed::Box;
use alloc::vec::Vec;

/// Static configuration of one VM's MMU, of either kind; the fields for one kind only say so.
#[derive(Clone, Copy, Debug)]
pub struct MmuConfig {
    /// The SPTE format.
    pub format: SpteFormat,
    /// The VM's MMIO SPTE codec (per-VM value, facts §1.4).
    pub codec: MmioSpteCodec,
    /// TDP only: the level of the TDP roots, 4, or 5 for 5-level paging (a shadow root's level
    /// follows the guest's paging mode). Checked for both kinds when the VM is built.
    pub root_level: Level,
    /// The highest gfn an MMIO SPTE may be installed for (KVM `kvm_mmu_max_gfn`); at most
    /// [`MmioSpteCodec::max_gfn`], the highest the codec can hold.
    pub max_gfn: Gfn,
    /// Delete/move zap everything (KVM's `KVM_X86_QUIRK_SLOT_ZAP_ALL`) instead of only the slot.
    pub slot_zap_all: bool,
    /// Re-injected historical bugs (empty normally).
    pub bugs: BugSet,
    /// The most vCPUs the VM may create.
    pub max_vcpus: usize,
    /// TDP only: prefetch neighbour leaves after a 4 KiB RAM fault as KVM's legacy direct MMU
    /// does (`direct_pte_prefetch`, `Tdp::prefetch_direct`); KVM's TDP MMU does not.
    pub direct_prefetch: bool,
    /// Shadow paging only: an MMIO fault installs its MMIO SPTE only where the shadow path to it
    /// exists already, and builds no shadow page and recycles none for it
    /// ([`crate::vm::VmConfig::shadow_mmio_path_only`]).
    pub shadow_mmio_path_only: bool,
}

impl MmuConfig {
    /// The MMIO SPTE a fault that found no memslot for `gfn` under generation `gen` installs
    /// (KVM `kvm_handle_noslot_fault` -> `mark_mmio_spte`), with the guest's `access`; `None`
    /// when it makes none and the access is emulated from the slow path: caching is off, the
    /// gfn is above [`MmuConfig::max_gfn`], or a memslot update is in progress. (KVM makes one
    /// then, a miss until the generation comes round again; one made in the window of the
    /// update that wraps the generation, after its zap-all and before its final store, carries
    /// the old generation's bits, survives the wrap's zap and would match 2^19 updates later,
    /// when the gfn may long be RAM: `tests/mmio_gen_wrap_window.rs`,
    /// `tests/shadow_gen_wrap_window.rs`. It costs a slow path only during an update's grace
    /// period.) Both MMUs' fault paths decide here.
    #[inline]
    pub(crate) fn noslot_mmio_spte(
        &self,
        gfn: Gfn,
        gen: Generation,
        access: Access,
    ) -> Option<u64> {
        (self.codec.enabled() && !gen.in_progress() && gfn <= self.max_gfn)
            .then(|| self.codec.make(gfn, gen, access))
    }
}

/// Pages the vCPU-side paths let wait before they pay for a grace period.
const RECLAIM_BATCH: usize = 64;

/// Why a VM's MMU could not be set up, a vCPU added or moved, or an operation done (either
/// kind of MMU; [`Self::NotTdp`] is the one that only a shadow-paging VM gives).
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum MmuError {
    /// The root level must be 4 or 5.
    #[error("root level {0} is not supported: use 4 or 5")]
    BadRootLevel(u8),
    /// All vCPU slots are taken.
    #[error("the VM already has {0} vCPU(s), the most its VmConfig::max_vcpus allows")]
    TooManyVcpus(usize),
    /// The host had no frame for a page table (or only one the VM's SPTEs cannot name: see
    /// `VmStats::tables_refused`).
    #[error(
        "the host has no usable frame for a page table (KVM: -ENOMEM); if the VM's \
         `tables_refused` stat is not zero, the host's frames lie beyond the VM's phys_bits"
    )]
    OutOfMemory,
    /// Shadow paging: the host gave no table frame below 4 GiB for the special root of a guest
    /// without paging or with PAE paging, whose address a 32-bit CR3 holds (KVM allocates
    /// `pae_root` with `__GFP_DMA32`). A vCPU starts with paging off, so such a host cannot
    /// boot a guest under shadow paging.
    #[error(
        "the host gave no table frame below 4 GiB for the shadow root of a guest without paging \
         or with PAE paging (a vCPU starts with paging off); implement \
         FrameAllocator::alloc_table_below_4g to hand out frames below 4 GiB, or keep some of \
         the table pool there"
    )]
    NoTableBelow4G,
    /// The global allocator had nothing for the bookkeeping of a new root: a shadow root's
    /// shadow pages (or the vCPU's PAE root frame), or a TDP root's record, its place on the
    /// root list or its place in the queue of pages to free; nothing was half made, and the
    /// call succeeds once memory is back (KVM: `-ENOMEM` from `mmu_topup_memory_caches`).
    #[error(
        "the heap has no room for the MMU's bookkeeping of a new root (KVM: -ENOMEM); \
         free memory and enter again: nothing was half made"
    )]
    OutOfHeap,
    /// Shadow paging: no root could be built, the shadow page limit being reached with every
    /// page pinned by a vCPU root (KVM: `-ENOSPC` from `KVM_RUN`).
    #[error(
        "no shadow root can be built: the shadow page limit of {0} pages is reached and vCPU \
         roots pin every page (KVM: -ENOSPC); raise it with Vm::set_nr_mmu_pages"
    )]
    ShadowPageLimit(usize),
    /// A TDP-only operation on a shadow-paging VM.
    #[error("this operation needs a TDP VM; the VM uses shadow paging")]
    NotTdp,
    /// A vCPU was asked to run in an address space the VM does not have.
    #[error("address space {as_id} does not exist: this VM has {nr} address space(s)")]
    NoSuchAddressSpace {
        /// The address space asked for.
        as_id: u16,
        /// The VM's number of address spaces.
        nr: u16,
    },
}

/// One VM's MMU core: what both MMUs use (module doc).
pub struct MmuCore<H: Host> {
    pub(crate) host: Arc<H>,
    pub(crate) cfg: MmuConfig,
    /// Read sections of lockless walkers (rule 2).
    pub(crate) table_srcu: Srcu,
    /// The table epoch of the vCPUs' leaf-table caches (`walk.rs`): bumped (Release) after every
    /// change of an entry that linked a table and whenever table pages are queued for freeing,
    /// so before the grace period that frees them. Read (Acquire) by the fast path inside its
    /// table read section. Written only by zaps and faults that replace a table link, so vCPUs
    /// that only read it share its cache line without traffic.
    pub(crate) table_epoch: crate::sync::AtomicU64,
    /// Unlinked table pages waiting for a grace period (rule 3), with the room promised to the
    /// shadow pages (`free_queue.rs`).
    free_queue: Mutex<FreeQueue>,
    /// Held by a reclaimer from its look at the queue to the last frame it frees: reclaimers
    /// take turns, so each frees the frames it saw before its grace period (`free_queue.rs`).
    reclaiming: Mutex<()>,
    /// Host invalidations in flight (KVM's MMU-notifier sequence and range).
    pub(crate) inval: Invalidation,
    /// Mode and request words of the vCPUs, indexed by vCPU index.
    pub(crate) vcpus: Box<[VcpuState]>,
    /// Which vCPU indices are taken (a dropped vCPU gives its index back).
    vcpu_taken: Box<[crate::sync::AtomicBool]>,
    /// One above the highest vCPU index ever taken: requests go to indices below it.
    pub(crate) nr_vcpus: crate::sync::AtomicUsize,
    /// Shadow paging: dirty-log write protections (a collection in auto mode, a clear) that
    /// cleared writable bits under the shadow lock and have not yet completed the remote TLB
    /// flush they owe, which runs after the lock is dropped (as KVM's). Until it completes, a
    /// leaf they made read-only may still be writable in a vCPU's TLB. KVM tells such a leaf by
    /// its MMU-writable bit, which write protection for shadowing clears, flushing
    /// (`mmu_spte_update`: "rmap_write_protect will find a read-only spte, even though the
    /// writable spte might be cached on a CPU's TLB"); the SPTEs here have no such bit, so the
    /// shadowing of a guest table flushes when it finds a read-only leaf of the table's frame
    /// while this is not zero (`ShadowState::account_shadowed`).
    ///
    /// Raised (Relaxed, [`Self::owe_protect_flush`]) by `ShadowProtect::write_protect_masked`
    /// under the shadow lock, before the lock is dropped: a shadowing that takes the lock later
    /// sees it. Lowered (Release, [`Self::protect_flush_done`]) after the flush returned; a
    /// shadowing that loads (Acquire) the lowered value comes after the flush, so no TLB holds
    /// the writable translation any more. A protector that owes a flush and never runs it (an
    /// unwind, or `Bug::DirtyLogNoFlush`) leaves it raised: later shadowings then flush
    /// whenever they find a read-only leaf, which costs, but is safe.
    pub(crate) unflushed_write_protects: crate::sync::AtomicU32,
    /// VM-wide counters.
    pub stats: VmStats,
}

/// The place of a tree in the free queue ([`MmuCore::promise_tree`]): promised before a TDP
/// root is made, or before a fault's huge leaf detaches a lower table. Given back when dropped
/// (no root was made, no table detached, or an unwind); kept by [`Self::keep`] once the root is
/// on the root list, to be used when it retires ([`MmuCore::queue_tree`]), or handed to the
/// detached table by [`Self::hold`].
pub(crate) struct TreePromise<'a, H: Host>(&'a MmuCore<H>);

impl<'a, H: Host> TreePromise<'a, H> {
    /// The root was made: its tree keeps the place.
    pub(crate) fn keep(self) {
        core::mem::forget(self);
    }

    /// The promised place is for `table` at `level`, which a TDP fault's huge leaf just
    /// detached: held until it is queued ([`DetachedTree`]).
    pub(crate) fn hold(self, table: Pfn, level: Level) -> DetachedTree<'a, H> {
        let core = self.0;
        self.keep();
        DetachedTree { core, table, level }
    }
}

/// A table a TDP fault's huge leaf detached, with every table it still links, from the
/// replacement (under the exclusive MMU lock) until it is queued as a tree through its promised
/// place ([`Self::queue`], after the remote TLB flush). Dropped unqueued, by an unwind (a host
/// kick that panics in that flush), it first makes a TLB flush pending on every vCPU (atomics
/// only, no kick), then queues the tree, as [`Unlinked`] does with its frames: nothing is lost,
/// and the tree is freed only after a grace period that no vCPU in guest mode ends before it
/// leaves (and flushes before it enters again).
pub(crate) struct DetachedTree<'a, H: Host> {
    core: &'a MmuCore<H>,
    table: Pfn,
    level: Level,
}

impl<H: Host> DetachedTree<'_, H> {
    /// Queues the tree ([`MmuCore::queue_tree`]) once the replacement's flush is done.
    pub(crate) fn queue(self) {
        self.core.queue_tree(self.table, self.level);
        core::mem::forget(self);
    }
}

impl<H: Host> Drop for DetachedTree<'_, H> {
    fn drop(&mut self) {
        self.core.retire_tree(self.table, self.level, true);
    }
}

impl<H: Host> Drop for TreePromise<'_, H> {
    fn drop(&mut self) {
        self.0.free_queue.lock_with(&self.0.relax()).unpromise_tree();
    }
}

/// Whether [`MmuCore::request_all`] waits for the vCPUs it kicked to acknowledge the request
/// (KVM `KVM_REQUEST_WAIT`): a TLB flush must be done before the caller goes on, a reload
/// request need only be seen before the next entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum AckWait {
    /// Return once every vCPU in guest mode has acknowledged.
    Wait,
    /// Return after the kicks.
    NoWait,
}

impl<H: Host> MmuCore<H> {
    /// The core of a VM with configuration `cfg` on `host`, with no vCPU yet.
    pub(crate) fn new(host: Arc<H>, cfg: MmuConfig) -> Result<Self, MmuError> {
        if !(cfg.root_level == Level::L4 || cfg.root_level == Level::L5) {
            return Err(MmuError::BadRootLevel(cfg.root_level.get()));
        }
        let fences = crate::host::Sched::reader_fences(&*host);
        let vcpus = (0..cfg.max_vcpus).map(|_| VcpuState::new()).collect::<Vec<_>>();
        let taken =
            (0..cfg.max_vcpus).map(|_| crate::sync::AtomicBool::new(false)).collect::<Vec<_>>();
        Ok(MmuCore {
            host,
            cfg,
            // One reader record per vCPU, plus one for the VMM's own lockless reads (tests).
            table_srcu: Srcu::with_fences(cfg.max_vcpus + 1, fences),
            free_queue: Mutex::new(FreeQueue::default()),
            reclaiming: Mutex::new(()),
            table_epoch: crate::sync::AtomicU64::new(0),
            inval: Invalidation::new(),
            vcpus: vcpus.into_boxed_slice(),
            vcpu_taken: taken.into_boxed_slice(),
            nr_vcpus: crate::sync::AtomicUsize::new(0),
            unflushed_write_protects: crate::sync::AtomicU32::new(0),
            stats: VmStats::default(),
        })
    }

    /// The host's wait policy, for the MMU's lock and grace-period waits.
    #[inline]
    pub(crate) fn relax(&self) -> crate::host::HostRelax<'_, H> {
        crate::host::HostRelax(&*self.host)
    }

    /// The configuration.
    pub fn config(&self) -> &MmuConfig {
        &self.cfg
    }

    /// The host.
    pub fn host(&self) -> &Arc<H> {
        &self.host
    }

    /// Claims a free vCPU index and a table-SRCU reader record; [`Self::remove_vcpu`] gives
    /// both back.
    pub(crate) fn add_vcpu(&self) -> Result<(usize, ReaderId), MmuError> {
        use crate::sync::Ordering;
        let full = MmuError::TooManyVcpus(self.cfg.max_vcpus);
        let idx = self
            .vcpu_taken
            .iter()
            .position(|t| {
                // Acquire on success: pairs with `remove_vcpu`'s Release, so the index's previous
                // owner is done with its state word and reader record before they are reused.
                t.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok()
            })
            .ok_or(full)?;
        let reader = match self.table_srcu.register() {
            Ok(r) => r,
            Err(_) => {
                self.vcpu_taken[idx].store(false, Ordering::Release);
                return Err(full);
            }
        };
        // A fresh vCPU: nothing pending from the index's previous owner (it has no TLB and no
        // root yet, so nothing a lost request was about applies to it).
        self.vcpus[idx].reset();
        self.nr_vcpus.fetch_max(idx + 1, Ordering::AcqRel);
        Ok((idx, reader))
    }

    /// Gives back vCPU index `idx` and its table reader record (the vCPU was dropped: it is out
    /// of guest mode and has no section open).
    pub(crate) fn remove_vcpu(&self, idx: usize, reader: &mut ReaderId) {
        self.table_srcu.unregister(reader);
        self.vcpu_taken[idx].store(false, crate::sync::Ordering::Release);
    }

    /// The vCPUs created so far (updaters only: `request_all`).
    ///
    /// `nr_vcpus` is read with a read-modify-write (as `wait_ack` reads its word): against
    /// `add_vcpu`'s `fetch_max`, either this read sees the new index (and its vCPU is
    /// requested), or the `fetch_max` comes later in the counter's order and the new vCPU
    /// happens-after whatever the requester did before (a grace period's counter bump), so its
    /// read section does not count as older than the grace period. A plain load allows neither
    /// (`tests/loom_new_vcpu.rs`).
    pub(crate) fn vcpu_states(&self) -> &[VcpuState] {
        let n = self.nr_vcpus.fetch_add(0, crate::sync::Ordering::AcqRel).min(self.vcpus.len());
        &self.vcpus[..n]
    }

    /// The entries of table page `pfn`.
    ///
    /// # Safety
    /// The frame must not be freed (`FrameAllocator::free_table`) while the caller uses the
    /// reference. The MMU's callers ensure it in one of three ways, and keep it for as long as
    /// they use the reference:
    /// - `pfn` was reached from a root the caller holds (its current root, or one in the root
    ///   list) inside a `table_srcu` read section (unlinked pages are freed only after a grace
    ///   period, rule 3), or from a TDP root while the caller holds the MMU lock (TDP tables are
    ///   unlinked only under it, held exclusive);
    /// - `pfn` is the frame of a live shadow page (in the shadow MMU's slab) and the caller holds
    ///   the shadow lock: a shadow page's frame is queued for freeing only by `commit_zap`, after
    ///   the page left the slab, and freed by a later `reclaim`;
    /// - the caller allocated `pfn` and has not published it (nothing else can free it).
    #[inline]
    pub(crate) unsafe fn table(&self, pfn: Pfn) -> Option<&TableEntries> {
        // SAFETY: the allocator's pointer is valid until `free_table(pfn)`, which by the caller's
        // contract cannot happen while the reference is used; entries are atomics, so shared
        // references are sound.
        self.host.table(pfn).map(|p| unsafe { p.as_ref() })
    }

    /// Allocates a table page with every entry non-present.
    ///
    /// `None` when the host has no frame, or handed out one the VM's SPTEs cannot name (beyond
    /// its `phys_bits`): such a frame is given back unused and counted in `tables_refused`, as a
    /// link to it would name another frame (the pfn field keeps bits `12..phys_bits` only).
    pub(crate) fn alloc_table(&self) -> Option<Pfn> {
        let pfn = self.host.alloc_table(SpteFormat::NONPRESENT)?;
        self.accept_table(pfn, self.cfg.format.holds_pfn(pfn))
    }

    /// [`Self::alloc_table`] below 4 GiB (a PAE special root, whose address a 32-bit CR3 holds:
    /// [`crate::host::FrameAllocator::alloc_table_below_4g`]). A frame at or above 4 GiB is
    /// refused as one beyond `phys_bits` is.
    pub(crate) fn alloc_table_below_4g(&self) -> Option<Pfn> {
        let pfn = self.host.alloc_table_below_4g(SpteFormat::NONPRESENT)?;
        self.accept_table(pfn, pfn.raw() < 1 << 20 && self.cfg.format.holds_pfn(pfn))
    }

    /// Counts a newly allocated table frame, or gives it back when it is not `usable`.
    fn accept_table(&self, pfn: Pfn, usable: bool) -> Option<Pfn> {
        if !usable {
            // SAFETY: the host handed `pfn` out just now and nothing names it: no other thread
            // can reach it, and it is freed once.
            unsafe { self.host.free_table(pfn) };
            self.stats.tables_refused.add(1);
            return None;
        }
        self.stats.tables_allocated.add(1);
        Some(pfn)
    }

    /// Frees a table page that was never linked anywhere (lost a compare-and-swap, or a split
    /// table or special root given up before it was published).
    pub(crate) fn free_unpublished_table(&self, pfn: Pfn) {
        // SAFETY: the caller allocated the page and never published it (no entry, root or vCPU
        // names it), so no other thread can reach it, and it frees it once.
        unsafe { self.host.free_table(pfn) };
        self.stats.tables_freed.add(1);
    }

    /// Queues unlinked table pages for freeing after a grace period (rule 3), `promised` of
    /// them through room promised in bulk ([`Unlinked::try_promise`]; promises they did not use
    /// are given back); beyond those it may allocate. Called by [`Unlinked::queue`].
    pub(crate) fn defer_free(&self, pages: &mut Vec<Pfn>, promised: usize) {
        if pages.is_empty() && promised == 0 {
            return;
        }
        if !pages.is_empty() {
            // Before the grace period that frees them: no leaf-table cache hit reads these pages
            // from a section the grace period does not wait for (`walk.rs`).
            self.table_epoch.fetch_add(1, crate::sync::Ordering::Release);
        }
        self.free_queue.lock_with(&self.relax()).append(pages, promised);
    }

    /// An empty list for the table frames a zap unlinks, queued for freeing when it is dropped,
    /// also by an unwind ([`Unlinked`]); a zap queues it explicitly after its flush
    /// ([`Unlinked::queue`]).
    pub(crate) fn unlinked(&self) -> Unlinked<'_, H> {
        Unlinked { core: self, pages: Vec::new(), promised: 0 }
    }

    /// The free queue, locked, to promise room for a frame that will be queued by a zap (a new
    /// shadow page, a vCPU's PAE root): [`FreeQueue::promise`] fails when the heap has no room.
    pub(crate) fn free_queue(&self) -> crate::sync::MutexGuard<'_, FreeQueue> {
        self.free_queue.lock_with(&self.relax())
    }

    /// The free queue, locked, to queue frames whose room was promised (a zap's commit): the
    /// table epoch is bumped first, as [`Self::defer_free`] does, and no push allocates.
    pub(crate) fn queue_promised(&self) -> Promised<'_> {
        self.table_epoch.fetch_add(1, crate::sync::Ordering::Release);
        Promised(self.free_queue.lock_with(&self.relax()))
    }

    /// Frees the queued pages after a `table_srcu` grace period: those queued before it began
    /// (pages queued meanwhile wait for the next reclaim), and the trees of retired TDP roots
    /// queued before it began, each root with every table it still links. Must not be called
    /// with the MMU lock held or from inside a table read section (rule 3). Allocates nothing.
    pub(crate) fn reclaim(&self) {
        // Reclaimers take turns (`free_queue.rs`): only the holder removes entries, so the first
        // `n` frames and `m` trees are still the ones it saw when its grace period ends.
        let _turn = self.reclaiming.lock_with(&self.relax());
        let (n, m) = {
            let q = self.free_queue.lock_with(&self.relax());
            (q.frames.len(), q.trees.len())
        };
        if n == 0 && m == 0 {
            return;
        }
        // A vCPU in guest mode holds a table read section for its whole guest-mode period and
        // leaves it only on an exit: kick every vCPU, or one spinning on TLB hits would stall
        // this grace period, and the memslot update or zap waiting on it, forever (issue 11,
        // defect 3). The kick comes after the grace period began, so the section a kicked vCPU
        // opens when it re-enters is not waited for. The request is a read-modify-write of the
        // vCPU's word, so a vCPU between opening its section and setting IN_GUEST_MODE sees it
        // and does not enter.
        self.table_srcu.synchronize_nudging(&crate::host::HostRelax(&*self.host), || {
            self.request_all(Request::Kick, AckWait::NoWait);
        });
        self.drain_in_chunks(
            n,
            Pfn(0),
            |q| &mut q.frames,
            |pfn| {
                // SAFETY: every queued page came from `alloc_table` and was queued once, after
                // nothing linked it any more (a table by the zap that unlinked it, a shadow page by
                // its commit, a special root by its vCPU), and before the grace period above began
                // (it is among the first `n`, and only this turn's holder removes frames); that grace
                // period has drained every walker that could still read it. The vCPUs' leaf-table
                // caches may still hold its pointer, but the table epoch was bumped before it was
                // queued, so no cache hit reads it again (`walk.rs`; the re-injected
                // `Bug::LeafCacheIgnoresEpoch` needs a host that keeps freed table memory,
                // `Vm::new`).
                unsafe { self.host.free_table(pfn) };
            },
        );
        self.stats.tables_freed.add(n as u64);
        self.drain_in_chunks(
            m,
            (Pfn(0), Level::L4),
            |q| &mut q.trees,
            |(root, level)| {
                // SAFETY: a queued tree is a TDP root that left the root list with no user, or a
                // table a fault's huge leaf detached, under the exclusive MMU lock, queued once and
                // before the grace period above began (among the first `m`); the tables it links
                // are reachable only through it (`free_queue.rs`), so nothing changes or frees
                // them, and the grace period drained every walker that could still read them. The
                // table epoch was bumped before it was queued (`queue_tree`), as for single frames.
                let tables = unsafe { self.free_tree(root, level) };
                self.stats.tables_freed.add(tables);
                self.stats.tdp_tables_zapped.add(tables - 1);
            },
        );
    }

    /// Takes the first `n` entries of the free queue's list `list` and hands each to `free`: in
    /// chunks, each taken under the queue's lock and freed without it, so that the host's frees
    /// do not hold up the commits of zaps, which take that lock under the MMU lock. `blank`
    /// fills the chunk buffer (on the stack: no heap). For [`Self::reclaim`].
    fn drain_in_chunks<T: Copy>(
        &self,
        n: usize,
        blank: T,
        list: impl Fn(&mut FreeQueue) -> &mut alloc::collections::VecDeque<T>,
        mut free: impl FnMut(T),
    ) {
        const CHUNK: usize = 64;
        let mut left = n;
        while left > 0 {
            let k = left.min(CHUNK);
            let mut chunk = [blank; CHUNK];
            {
                let mut q = self.free_queue.lock_with(&self.relax());
                for (slot, e) in chunk.iter_mut().zip(list(&mut q).drain(..k)) {
                    *slot = e;
                }
            }
            chunk[..k].iter().for_each(|&e| free(e));
            left -= k;
        }
    }

    /// Frees the table `pfn` at `level` and every table it links, children first; returns how
    /// many frames it freed. Recursion is as deep as the table levels (at most 5), so no heap.
    ///
    /// # Safety
    /// Nothing may read, change or free `pfn` or a table below it while this runs, or use any of
    /// them after: the caller is the reclaimer with a tree whose grace period ended.
    unsafe fn free_tree(&self, pfn: Pfn, level: Level) -> u64 {
        let mut freed = 0;
        if let Some(lower) = level.lower() {
            // SAFETY: the caller's contract: the frame is not freed before this returns, and
            // nothing else uses it.
            if let Some(table) = unsafe { self.table(pfn) } {
                let fmt = self.cfg.format;
                for e in table.iter() {
                    let spte = e.load(crate::sync::Ordering::Acquire);
                    if SpteFormat::is_mmu_present(spte) && !fmt.is_leaf(spte, level) {
                        // SAFETY: a table linked from this tree: the caller's contract covers it.
                        freed += unsafe { self.free_tree(fmt.pfn(spte), lower) };
                    }
                }
            } else {
                debug_assert!(false, "table frame {pfn:?} unknown to the host");
            }
        }
        // SAFETY: the caller's contract; the entries were read above, and nothing links it.
        unsafe { self.host.free_table(pfn) };
        freed + 1
    }

    /// Queues a tree through the room its promise reserved ([`Self::promise_tree`]): a TDP root
    /// that left the root list with no user, or a table a fault's huge leaf detached, under the
    /// exclusive MMU lock (queued under that hold or right after it). It is freed with every
    /// table it still links after a grace period. Allocates nothing. The table epoch is bumped
    /// first, as [`Self::defer_free`] does.
    pub(crate) fn queue_tree(&self, root: Pfn, level: Level) {
        self.table_epoch.fetch_add(1, crate::sync::Ordering::Release);
        self.free_queue.lock_with(&self.relax()).push_tree(root, level);
    }

    /// Queues a tree ([`Self::queue_tree`]) that some vCPU's paging-structure caches may still
    /// link (`pending_flush`): a TLB flush is made pending on every vCPU first (atomics, no
    /// kick, so nothing can unwind and lose the tree), and each flushes before it enters the
    /// guest again; the grace period that frees the tree ends only after each vCPU in guest
    /// mode has left it.
    pub(crate) fn retire_tree(&self, table: Pfn, level: Level, pending_flush: bool) {
        if pending_flush {
            self.request_all_without_kick(Request::TlbFlush);
        }
        self.queue_tree(table, level);
    }

    /// Promises the place of a tree in the free queue, before a TDP root is made or a fault's
    /// huge leaf detaches a table; [`MmuError::OutOfHeap`] when the heap has no room. The
    /// promise is given back when dropped, unless it is kept ([`TreePromise::keep`],
    /// [`TreePromise::hold`]).
    pub(crate) fn promise_tree(&self) -> Result<TreePromise<'_, H>, MmuError> {
        let mut q = self.free_queue.lock_with(&self.relax());
        q.promise_tree().map_err(|_| MmuError::OutOfHeap)?;
        Ok(TreePromise(self))
    }

    /// [`Self::reclaim`] once enough pages wait (the vCPU-side paths of the shadow MMU: a
    /// grace period per fault would cost more than the pages; they free in batches, and every
    /// zap of the VMM reclaims anyway). Same contract as `reclaim`.
    pub(crate) fn reclaim_batched(&self) {
        if self.free_queue.lock_with(&self.relax()).len() >= RECLAIM_BATCH {
            self.reclaim();
        }
    }

    /// Table pages waiting for a grace period: single pages, and retired TDP roots, each of
    /// which goes with the tables it still links.
    pub fn pending_free(&self) -> usize {
        self.free_queue.lock_with(&self.relax()).len()
    }

    /// Test-only (feature `testing`): frames that hold room in the free queue and are not
    /// queued yet (the live shadow pages and the vCPUs' PAE root frames, `free_queue.rs`).
    #[cfg(feature = "testing")]
    pub fn free_queue_promises(&self) -> usize {
        self.free_queue.lock_with(&self.relax()).promised()
    }

    /// Test-only (feature `testing`): TDP roots made and not retired, each holding the place of
    /// its tree in the free queue (`free_queue.rs`).
    #[cfg(feature = "testing")]
    pub fn free_queue_tree_promises(&self) -> usize {
        self.free_queue.lock_with(&self.relax()).promised_trees()
    }

    /// Test-only (feature `testing`): promises trees while the free queue's list of trees has
    /// room for them without growing; returns how many. With the room used up, the next
    /// promise of a tree needs the heap. [`Self::give_back_tree_room`] undoes it.
    #[cfg(feature = "testing")]
    pub fn use_up_tree_room(&self) -> usize {
        let mut q = self.free_queue.lock_with(&self.relax());
        let mut n = 0;
        // Within the capacity: allocates nothing, cannot fail.
        while q.tree_room() > 0 && q.promise_tree().is_ok() {
            n += 1;
        }
        n
    }

    /// Test-only (feature `testing`): gives back `n` promises of [`Self::use_up_tree_room`].
    #[cfg(feature = "testing")]
    pub fn give_back_tree_room(&self, n: usize) {
        let mut q = self.free_queue.lock_with(&self.relax());
        (0..n).for_each(|_| q.unpromise_tree());
    }

    /// The remote TLB flush that ends a zap (KVM `kvm_flush_remote_tlbs` after the zap, or in
    /// `kvm_mmu_commit_zap_page`): `needed` when the zap removed a present entry some vCPU may
    /// hold a translation through. Every zap of either MMU flushes here, so
    /// [`crate::bugs::Bug::NoTlbFlushOnZap`] undoes them all in this one place.
    pub(crate) fn flush_after_zap(&self, needed: bool) {
        if needed && !self.cfg.bugs.has(crate::bugs::Bug::NoTlbFlushOnZap) {
            self.flush_remote_tlbs();
        }
    }

    /// A dirty-log protection under the shadow lock cleared writable bits and will flush after
    /// dropping the lock ([`Self::unflushed_write_protects`]): called under the shadow lock.
    pub(crate) fn owe_protect_flush(&self) {
        // Relaxed: the shadow lock, held here and by every reader, orders it.
        self.unflushed_write_protects.fetch_add(1, crate::sync::Ordering::Relaxed);
    }

    /// That protection's flush returned.
    pub(crate) fn protect_flush_done(&self) {
        // Release: the flush, done, comes before a shadowing that loads the lowered count.
        self.unflushed_write_protects.fetch_sub(1, crate::sync::Ordering::Release);
    }

    /// Flushes every vCPU's TLB (KVM `kvm_flush_remote_tlbs`): returns when each vCPU has
    /// acknowledged or was outside guest mode (rule 4). Counts as KVM does: one
    /// `remote_tlb_flush_requests` per call, and one `remote_tlb_flush` when some vCPU was in
    /// guest mode and had to be kicked (the others flush at their next entry, unseen).
    pub(crate) fn flush_remote_tlbs(&self) {
        self.stats.remote_tlb_flush_requests.add(1);
        if self.request_all(Request::TlbFlush, AckWait::Wait) {
            self.stats.remote_tlb_flush.add(1);
        }
    }

    /// Makes `r` pending on every vCPU and kicks none (an unwind's clean-up, which must not call
    /// the host again: [`Unlinked`]). A vCPU in guest mode sees it when it next leaves and
    /// enters.
    pub(crate) fn request_all_without_kick(&self, r: Request) {
        for v in self.vcpu_states().iter() {
            v.request(r);
        }
    }

    /// Makes `r` pending on every vCPU and kicks those in guest mode; with [`AckWait::Wait`],
    /// waits for the acknowledgement of each of them (KVM `kvm_make_all_cpus_request`, with or
    /// without `KVM_REQUEST_WAIT`). Returns whether any vCPU was in guest mode (was kicked), as
    /// KVM's does.
    pub(crate) fn request_all(&self, r: Request, wait: AckWait) -> bool {
        // As KVM: every vCPU's request is set before any is kicked, so a kick that fails (a host
        // callback that panics) never leaves a later vCPU without its request, e.g. with a root
        // made obsolete and no request to drop it (its faults would retry forever).
        let mut in_guest = false;
        for v in self.vcpu_states().iter() {
            in_guest |= v.request(r);
        }
        if !in_guest {
            return false;
        }
        let relax = crate::host::HostRelax(&*self.host);
        for (i, v) in self.vcpu_states().iter().enumerate() {
            if v.needs_kick(r) {
                // The "IPI": the vCPU is in guest mode and may not look at its requests soon.
                self.host.kick(i);
                if wait == AckWait::Wait {
                    v.wait_ack(r, &relax);
                }
            }
        }
        true
    }

    /// Host invalidation start (KVM `kvm_mmu_notifier_invalidate_range_start`, for the gfn
    /// ranges a host-address range maps to), under `lock`, the VM's MMU lock, held exclusive:
    /// faults on the ranges retry until [`Self::end_invalidation`]; `zap` drops, in the same
    /// critical section, what the MMU that owns the lock maps for one range (it returns whether
    /// a remote TLB flush is needed and queues the pages it unlinked), and the flush is done
    /// before this returns. If anything here unwinds, the begin is undone.
    pub(crate) fn begin_invalidation<T>(
        &self,
        lock: &MmuLock<T>,
        ranges: &(impl GfnRanges + ?Sized),
        mut zap: impl FnMut(&MmuWrite<'_, T>, AsId, Gfn, Gfn, &mut Vec<Pfn>) -> bool,
    ) {
        let mut pages = self.unlinked();
        // Declared before the lock guard, so an unwind drops the guard first and the undo can
        // take the lock.
        let mut undo = EndIfUnwound { core: self, lock, begun: false };
        let guard = lock.write(&self.vcpus, &self.relax());
        self.inval.begin(&guard);
        undo.begun = true;
        let mut flush = false;
        ranges.for_each(&mut |as_id, start, end| {
            self.inval.add_range(&guard, start, end);
            flush |= zap(&guard, as_id, start, end, &mut pages);
        });
        self.flush_after_zap(flush);
        drop(guard);
        pages.queue();
        self.reclaim();
        core::mem::forget(undo);
    }

    /// Host invalidation end (KVM `invalidate_range_end`), under `lock`, the VM's MMU lock,
    /// held exclusive.
    pub(crate) fn end_invalidation<T>(&self, lock: &MmuLock<T>) {
        let guard = lock.write(&self.vcpus, &self.relax());
        self.inval.end(&guard);
    }
}

/// Ends the invalidation [`MmuCore::begin_invalidation`] counted if the begin unwinds (a host
/// callback that panics in its zap, flush or reclaim): a count left raised would make every
/// fault in the range retry and every memslot update wait, forever.
struct EndIfUnwound<'a, H: Host, T> {
    core: &'a MmuCore<H>,
    lock: &'a MmuLock<T>,
    begun: bool,
}

impl<H: Host, T> Drop for EndIfUnwound<'_, H, T> {
    fn drop(&mut self) {
        if self.begun {
            self.core.end_invalidation(self.lock);
        }
    }
}
