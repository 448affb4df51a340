//! Shadow pages and everything that indexes them (KVM `struct kvm_mmu_page`, the page hash,
//! `active_mmu_pages`, the rmap and write tracking; shadow facts §1, §4.1, §7): creation and
//! lookup by `(gfn, role)`, parent links, leaf SPTEs with their reverse map, write protection of
//! shadowed guest tables, and zapping in two steps (prepare, then commit after a flush).
//!
//! Everything here runs under the shadow MMU's lock (`&mut ShadowState` is the proof). SPTEs
//! live in host table frames that lockless readers (the hardware walk of a vCPU in guest mode, the
//! fast MMIO path) read with Acquire loads, so every change is a Release store, and a page's
//! frame is freed only after (1) no SPTE links it any more, (2) remote TLBs were flushed and
//! (3) a table-SRCU grace period ([`crate::tdp`] rules 3-4, done by the caller after unlocking).
//!
//! Invariants:
//! - a live page is in the slab, in its hash bucket and in the active list (oldest first) unless
//!   it was zapped while a root (`role.invalid`): then it is only in the slab, until its last
//!   root user drops it; a prepared page no root pins is in the slab and on the state's list of
//!   prepared pages (`ZapBatch`, through `next_zapped`) until the next commit takes it out;
//! - every page in the slab holds one promise of room in the core's free queue, which its
//!   commit uses to queue its frame (`mmu_core/free_queue.rs`): a zap allocates nothing;
//! - every present leaf SPTE is in the rmap of the gfn it maps, under the key it was added with
//!   (the gfn is stored per SPTE, never recomputed), and no gfn has more than
//!   `RMAP_RECYCLE_THRESHOLD + 1` of them (KVM's rmap recycling);
//! - while a valid indirect page shadows guest frame `g` (`tracked[g] > 0`), no leaf SPTE maps
//!   `g` writable (write protection, shadow facts §4.1; there are no unsync pages);
//! - `parents` of a page lists exactly the SPTEs that link it.

use super::keymap::{shrink_sparse, track_key, KeyMap};
use super::rmap::{retain_shrinking, Rmap};
use super::role::SpRole;
use super::write_track::UpperTrackSummary;
use super::ShadowStats;
use crate::host::Host;
use crate::mmu_core::{FlushNeed, MmuCore};
use crate::spte::SpteFormat;
use crate::sync::Arc;
use crate::types::{AsId, Gfn, Level, Pfn};
use alloc::vec::Vec;

/// The global allocator had nothing for the shadow MMU's bookkeeping: a fault reports it
/// ([`crate::fault::FaultError::OutOfHeap`]) with nothing half made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HeapExhausted;

impl From<alloc::collections::TryReserveError> for HeapExhausted {
    fn from(_: alloc::collections::TryReserveError) -> Self {
        HeapExhausted
    }
}

impl From<hashbrown::TryReserveError> for HeapExhausted {
    fn from(_: hashbrown::TryReserveError) -> Self {
        HeapExhausted
    }
}

/// Why [`ShadowState::get_page`] made no page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NewPageError {
    /// The host had no frame for its SPTEs.
    NoFrame,
    /// The global allocator had nothing for its bookkeeping.
    NoHeap,
}

/// The lists a new page starts with, allocated by `ShadowState::reserve_new_page`.
struct NewPageLists {
    /// Room for one parent link.
    parents: Vec<(SpId, u16)>,
    /// At level 1, the 512 leaf gfns; else empty.
    leaf_gfns: Vec<u64>,
}

/// Index of a shadow page in the slab. Stable while the page lives (a root pins it).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub(crate) struct SpId(pub(crate) u32);

/// KVM `KVM_MMU_HASH_SHIFT`: 4096 buckets.
const HASH_BUCKETS: usize = 1 << 12;

/// One shadow page (KVM `struct kvm_mmu_page`).
#[derive(Debug)]
pub(crate) struct ShadowPage {
    /// Indirect: the guest table frame shadowed; direct: the first frame of the linear range.
    pub(crate) gfn: Gfn,
    pub(crate) role: SpRole,
    /// The frame of the page's 512 SPTEs.
    pub(crate) spt: Pfn,
    /// The SPTEs that link this page: (parent page, index).
    pub(crate) parents: Vec<(SpId, u16)>,
    /// vCPU roots (current or previous, or an entry of a special root) pinning the page.
    pub(crate) root_count: u32,
    /// `mmu_valid_gen` at creation; another value means obsolete.
    pub(crate) valid_gen: u8,
    /// Emulated writes to the shadowed table since the page was last used.
    pub(crate) flood: u8,
    /// The next older and the next newer page in the active list (KVM's `link` in
    /// `active_mmu_pages`, intrusive so that making a page allocates nothing there).
    older: Option<SpId>,
    newer: Option<SpId>,
    /// While the page waits in the prepared pages' list for a commit: the next page there
    /// (intrusive, so that a zap allocates nothing).
    next_zapped: Option<SpId>,
    /// Level-1 pages: the gfn each leaf SPTE maps (KVM `shadowed_translation`).
    leaf_gfns: Vec<u64>,
}

impl ShadowPage {
    /// Whether the page shadows a guest table (has guest PTEs).
    pub(crate) fn has_gptes(&self) -> bool {
        !self.role.direct()
    }
}

/// What `prepare_zap` and friends leave for the next commit ([`ShadowState::commit_zap`]), in
/// the state itself, not on a caller's stack: a host callback that unwinds between a prepare
/// and its commit (a panicking `alloc_table`, `read_u64` or `preempt_point`) leaves the owed
/// flush and the prepared pages to the next commit under the lock (every fault, root load, zap
/// and host invalidation commits; the VM's drop zaps everything), instead of losing the flush a
/// vCPU's TLB needs and the pages' frames. KVM keeps a zap-all's prepared pages VM-wide too
/// (`kvm->arch.zapped_obsolete_pages`).
#[derive(Default, Debug)]
struct ZapBatch {
    /// Prepared pages no root pins, freed by the commit: the first and the last of a list that
    /// runs through the pages' `next_zapped` (KVM's `invalid_list`, intrusive as KVM's is: a
    /// zap needs no heap, so neither does a fault that recycles pages to make room).
    first: Option<SpId>,
    last: Option<SpId>,
    /// A present SPTE was cleared: remote TLBs must be flushed before anything is freed.
    flush: bool,
    /// Invalid pages whose last root user let go (`put_root`): KVM's `mmu_free_root_page` runs
    /// `kvm_mmu_prepare_zap_page` on each again, which counts `mmu_shadow_zapped` a second
    /// time; the commit counts them the same way.
    released_invalid: u64,
}

/// KVM `RMAP_RECYCLE_THRESHOLD`: a leaf added for a gfn that more than this many leaves map
/// already zaps every leaf of the gfn (`__rmap_add`, with `pte_list_add`'s count of the entries
/// before the new one). Seen on this host's KVM: 1002 GVAs mapping one page zap at the 1002nd.
pub(crate) const RMAP_RECYCLE_THRESHOLD: usize = 1000;

/// The shadow MMU's bookkeeping, guarded by its lock.
pub(crate) struct ShadowState {
    slab: Vec<Option<ShadowPage>>,
    free_ids: Vec<SpId>,
    buckets: Vec<Vec<SpId>>,
    /// `active_mmu_pages`: its oldest and newest page (the list runs through the pages'
    /// `older` and `newer`).
    oldest_active: Option<SpId>,
    newest_active: Option<SpId>,
    /// Frame number -> the page whose SPTEs it holds.
    by_pfn: KeyMap<SpId>,
    /// (address space, gfn) -> the leaf SPTEs mapping it: (page, index).
    rmap: Rmap,
    /// gfn -> valid indirect pages shadowing that guest frame, in either address space: write
    /// tracking is by gfn across address spaces, as KVM's `for_each_gfn_valid_sp_with_gptes`
    /// loops (which track writes and unsync pages) ignore `role.smm`. Both spaces usually map
    /// the same RAM at a gfn (SMRAM aside), so a table that one space shadows must trap writes
    /// made through the other's mappings too, and a trapped write must reach both spaces'
    /// shadows; where the spaces map different memory at a gfn, that costs a spurious trap or
    /// zap, never a stale translation.
    tracked: KeyMap<u32>,
    /// The same for pages above level 1 only (KVM `gfn_write_track`: `account_shadowed` adds a
    /// write-track reference for a non-leaf table; a last-level one is only write-protected,
    /// since in KVM it may go unsync).
    tracked_upper: KeyMap<u32>,
    /// The lock-free summary of `tracked_upper` (changed with it, in the same sections).
    upper_summary: Arc<UpperTrackSummary>,
    /// KVM `kvm->arch.mmu_valid_gen`.
    pub(crate) valid_gen: u8,
    /// KVM `n_used_mmu_pages`: pages made and not yet prepared for freeing (a zapped page still
    /// pinned by a root counts until its last root lets go).
    pub(crate) n_used: usize,
    /// KVM `n_max_mmu_pages`.
    pub(crate) n_max: usize,
    /// KVM `n_requested_mmu_pages != 0`: the limit was set by `KVM_SET_NR_MMU_PAGES` (or the
    /// VM's configuration), so memslot changes no longer recompute it.
    pub(crate) n_requested: bool,
    /// Prepared pages and the owed flush, until the next commit.
    zap: ZapBatch,
}

/// Reachable only through the shadow lock's guard (`ShadowMmu::lock`): whoever holds it is the
/// one thread that changes shadow table entries.
impl crate::mmu_core::TablesExclusive for ShadowState {}

impl ShadowState {
    pub(crate) fn new(n_max: usize, upper_summary: Arc<UpperTrackSummary>) -> Self {
        ShadowState {
            slab: Vec::new(),
            free_ids: Vec::new(),
            buckets: (0..HASH_BUCKETS).map(|_| Vec::new()).collect(),
            oldest_active: None,
            newest_active: None,
            by_pfn: KeyMap::default(),
            rmap: Rmap::new(),
            tracked: KeyMap::default(),
            tracked_upper: KeyMap::default(),
            upper_summary,
            valid_gen: 0,
            n_used: 0,
            n_max,
            n_requested: false,
            zap: ZapBatch::default(),
        }
    }

    /// Owes a remote TLB flush before the next commit or [`Self::flush_now`] if `needed` (a
    /// present SPTE was cleared, or a guest table write-protected).
    pub(crate) fn owe_flush(&mut self, needed: bool) {
        self.zap.flush |= needed;
    }

    /// Flushes remote TLBs now if a present SPTE was cleared or a guest table write-protected
    /// since the last flush (a fault's path, before it re-reads a gPTE or installs its leaf).
    pub(crate) fn flush_now<H: Host>(&mut self, core: &MmuCore<H>) {
        if self.zap.flush {
            core.flush_remote_tlbs();
            self.zap.flush = false;
        }
    }

    fn bucket(gfn: Gfn) -> usize {
        // KVM `kvm_page_table_hashfn`: hash_64(gfn, 12).
        (gfn.raw().wrapping_mul(0x61c8_8646_80b5_83eb) >> (64 - 12)) as usize
    }

    pub(crate) fn sp(&self, id: SpId) -> &ShadowPage {
        match self.slab.get(id.0 as usize) {
            Some(Some(sp)) => sp,
            _ => unreachable!("shadow page {id:?} is not live"),
        }
    }

    pub(crate) fn sp_mut(&mut self, id: SpId) -> &mut ShadowPage {
        match self.slab.get_mut(id.0 as usize) {
            Some(Some(sp)) => sp,
            _ => unreachable!("shadow page {id:?} is not live"),
        }
    }

    /// The page whose SPTEs live in frame `pfn`, if it is a shadow page (KVM `sptep_to_sp`).
    pub(crate) fn by_pfn(&self, pfn: Pfn) -> Option<SpId> {
        self.by_pfn.get(&pfn.raw()).copied()
    }

    /// Whether `id` is obsolete (made before the last fast zap-all) or was zapped as a root.
    pub(crate) fn is_obsolete(&self, id: SpId) -> bool {
        let sp = self.sp(id);
        sp.role.invalid() || sp.valid_gen != self.valid_gen
    }

    /// Whether a valid page, of either address space, shadows guest frame `gfn` (the SPTEs
    /// mapping it in both must stay read-only: see `tracked`).
    pub(crate) fn is_write_tracked(&self, gfn: Gfn) -> bool {
        self.tracked.get(&track_key(gfn)).is_some_and(|&n| n > 0)
    }

    /// KVM `kvm_gfn_is_write_tracked`: a valid page above level 1, of either address space,
    /// shadows guest frame `gfn`.
    pub(crate) fn is_gfn_write_tracked(&self, gfn: Gfn) -> bool {
        let tracked = self.tracked_upper.get(&track_key(gfn)).is_some_and(|&n| n > 0);
        debug_assert!(!tracked || self.upper_summary.may_be_tracked(gfn));
        tracked
    }

    /// Whether any valid indirect page exists (KVM `indirect_shadow_pages != 0`): `tracked`
    /// holds a frame exactly while such a page shadows it.
    pub(crate) fn has_indirect_pages(&self) -> bool {
        !self.tracked.is_empty()
    }

    /// The first valid page at or after position `from` of `gfn`'s hash bucket, of either
    /// address space, that shadows guest frame `gfn` (an indirect one; KVM
    /// `for_each_gfn_valid_sp_with_gptes`, which ignores `role.smm`), with its position. A zap
    /// of that page takes it out of the bucket (the next one then takes its position); nothing
    /// else changes the bucket under the lock. A walk by position allocates nothing (an
    /// emulated guest write runs it).
    pub(crate) fn next_shadowing(&self, gfn: Gfn, from: usize) -> Option<(usize, SpId)> {
        let bucket = &self.buckets[Self::bucket(gfn)];
        bucket.iter().copied().enumerate().skip(from).find(|&(_, id)| {
            let sp = self.sp(id);
            sp.gfn == gfn && sp.has_gptes() && !sp.role.invalid() && sp.valid_gen == self.valid_gen
        })
    }

    /// Zaps the valid pages of `as_id` whose gfn lies in `[start, end)`, direct or not (KVM
    /// `for_each_gfn_valid_sp` over a memslot's gfns), oldest first. Scans the active list,
    /// which the page limit bounds, rather than the range, which a slot can make huge.
    pub(crate) fn zap_valid_pages_in<H: Host>(
        &mut self,
        core: &MmuCore<H>,
        stats: &ShadowStats,
        (as_id, start, end): (AsId, Gfn, Gfn),
    ) {
        let valid_gen = self.valid_gen;
        let in_slot = |sp: &ShadowPage| {
            (start.raw()..end.raw()).contains(&sp.gfn.raw())
                && sp.role.as_id() == as_id
                && !sp.role.invalid()
                && sp.valid_gen == valid_gen
        };
        self.zap_oldest_while(core, stats, usize::MAX, |_| true, in_slot);
    }

    /// Adds `id` at the newest end of the active list.
    fn activate(&mut self, id: SpId) {
        let newest = self.newest_active;
        {
            let sp = self.sp_mut(id);
            sp.older = newest;
            sp.newer = None;
        }
        match newest {
            Some(n) => self.sp_mut(n).newer = Some(id),
            None => self.oldest_active = Some(id),
        }
        self.newest_active = Some(id);
    }

    /// Takes `id` out of the active list.
    fn deactivate(&mut self, id: SpId) {
        let (older, newer) = {
            let sp = self.sp_mut(id);
            (sp.older.take(), sp.newer.take())
        };
        match older {
            Some(o) => self.sp_mut(o).newer = newer,
            None => self.oldest_active = newer,
        }
        match newer {
            Some(n) => self.sp_mut(n).older = older,
            None => self.newest_active = older,
        }
    }

    /// Zaps up to `n` pages, oldest first, from the oldest end of the active list while
    /// `keep_going` holds for each page (`take_while`), skipping those `eligible` refuses.
    /// Returns how many it zapped. Reads only the pages it zaps or stops at, not the whole
    /// list: a zap-all walks it in batches of [`super::BATCH_ZAP_PAGES`], and reading every
    /// page at each batch made a memslot delete quadratic in the number of pages. Allocates
    /// nothing (a fault recycles pages through it).
    pub(crate) fn zap_oldest_while<H: Host>(
        &mut self,
        core: &MmuCore<H>,
        stats: &ShadowStats,
        n: usize,
        keep_going: impl Fn(&ShadowPage) -> bool,
        eligible: impl Fn(&ShadowPage) -> bool,
    ) -> usize {
        let mut zapped = 0;
        let mut next = self.oldest_active;
        while let Some(id) = next {
            if zapped == n || !keep_going(self.sp(id)) {
                break;
            }
            // Read before the zap takes `id` out of the list; the zap changes no other page's
            // place in it (it unlinks children, it does not zap them).
            next = self.sp(id).newer;
            if eligible(self.sp(id)) {
                self.prepare_zap(core, stats, id);
                zapped += 1;
            }
        }
        zapped
    }

    /// The entry `idx` of page `id`.
    ///
    /// The reference is used under the lock only; the page's frame stays allocated while the
    /// page is in the slab (`commit_zap` queues a frame for freeing only after its page left
    /// the slab, and `reclaim` frees it after a grace period).
    pub(crate) fn entry<'a, H: Host>(
        &self,
        core: &'a MmuCore<H>,
        id: SpId,
        idx: usize,
    ) -> &'a crate::sync::AtomicU64 {
        let pfn = self.sp(id).spt;
        // SAFETY: the page is live (in the slab) and we hold the shadow lock (`&self` is borrowed
        // from its guard): only `commit_zap`, under that lock, queues a frame for freeing, and
        // only once its page left the slab (`MmuCore::table`'s second case); the caller does not
        // keep the reference past the lock.
        match unsafe { core.table(pfn) } {
            Some(t) => &t[idx],
            None => unreachable!("shadow page frame {pfn:?} unknown to the host"),
        }
    }

    /// KVM `kvm_mmu_get_shadow_page`: the valid page for `(gfn, role)`, created if there is none.
    /// Returns it and whether it is new, or why no page could be made (nothing changed then).
    pub(crate) fn get_page<H: Host>(
        &mut self,
        core: &MmuCore<H>,
        stats: &ShadowStats,
        gfn: Gfn,
        role: SpRole,
    ) -> Result<(SpId, bool), NewPageError> {
        let b = Self::bucket(gfn);
        let hit = self.buckets[b].iter().copied().find(|&id| {
            let sp = self.sp(id);
            sp.gfn == gfn && sp.role == role && sp.valid_gen == self.valid_gen
        });
        if let Some(id) = hit {
            self.sp_mut(id).flood = 0;
            return Ok((id, false));
        }
        stats.mmu_cache_miss.add(1);
        let NewPageLists { parents, leaf_gfns } =
            self.reserve_new_page(b, gfn, role).map_err(|HeapExhausted| NewPageError::NoHeap)?;
        let spt = core.alloc_table().ok_or(NewPageError::NoFrame)?;
        // Room in the free queue for the page's frame, so that its zap allocates nothing. Made
        // after the host's `alloc_table`, which may unwind: a promise made before it would
        // outlive the unwind with no page behind it.
        if core.free_queue().promise().is_err() {
            core.free_unpublished_table(spt);
            return Err(NewPageError::NoHeap);
        }
        let sp = ShadowPage {
            gfn,
            role,
            spt,
            parents,
            root_count: 0,
            valid_gen: self.valid_gen,
            flood: 0,
            older: None,
            newer: None,
            next_zapped: None,
            leaf_gfns,
        };
        let has_gptes = sp.has_gptes();
        let id = match self.free_ids.pop() {
            Some(id) => {
                self.slab[id.0 as usize] = Some(sp);
                id
            }
            None => {
                self.slab.push(Some(sp));
                SpId((self.slab.len() - 1) as u32)
            }
        };
        self.buckets[b].push(id);
        self.activate(id);
        self.by_pfn.insert(spt.raw(), id);
        self.n_used += 1;
        stats.shadow_pages.add(1);
        if has_gptes {
            self.account_shadowed(core, gfn, role.level());
        }
        Ok((id, true))
    }

    /// Reserves, fallibly, all the heap a new page for `(gfn, role)` in bucket `b` takes (KVM
    /// tops up its caches before it takes the MMU lock, `mmu_topup_memory_caches`, and fails the
    /// fault with `-ENOMEM`), so that making it, linking it once and accounting it allocate
    /// nothing: a slab slot (and room in `free_ids` for its freeing), room in its bucket, in the
    /// frame index and the write-tracking counts; returns its parent list (room for one link)
    /// and, at level 1, its leaf gfns.
    fn reserve_new_page(
        &mut self,
        b: usize,
        gfn: Gfn,
        role: SpRole,
    ) -> Result<NewPageLists, HeapExhausted> {
        if self.free_ids.is_empty() {
            self.slab.try_reserve(1)?;
            let room = self.slab.len() + 1;
            self.free_ids.try_reserve(room.saturating_sub(self.free_ids.len()))?;
        }
        self.buckets[b].try_reserve(1)?;
        self.by_pfn.try_reserve(1)?;
        if !role.direct() {
            let key = track_key(gfn);
            if !self.tracked.contains_key(&key) {
                self.tracked.try_reserve(1)?;
            }
            if role.level() > Level::L4K && !self.tracked_upper.contains_key(&key) {
                self.tracked_upper.try_reserve(1)?;
            }
        }
        let mut parents = Vec::new();
        parents.try_reserve(1)?;
        let mut leaf_gfns = Vec::new();
        if role.level() == Level::L4K {
            leaf_gfns.try_reserve_exact(512)?;
            leaf_gfns.resize(512, 0);
        }
        Ok(NewPageLists { parents, leaf_gfns })
    }

    /// KVM `account_shadowed`: the guest frame is now shadowed; write-protect every leaf that
    /// maps it, in either address space (see `tracked`).
    fn account_shadowed<H: Host>(&mut self, core: &MmuCore<H>, gfn: Gfn, level: Level) {
        if level > Level::L4K {
            *self.tracked_upper.entry(track_key(gfn)).or_insert(0) += 1;
            self.upper_summary.add(gfn);
        }
        let n = self.tracked.entry(track_key(gfn)).or_insert(0);
        *n += 1;
        if *n == 1 && !core.cfg.bugs.has(crate::bugs::Bug::ShadowTableLeftWritable) {
            // A read-only leaf of the frame may still be writable in a TLB while a dirty-log
            // protection's flush is owed (`MmuCore::unflushed_write_protects`, KVM's
            // MMU-writable bit): then it needs the flush too, before the gPTEs are read.
            let owed = core.unflushed_write_protects.load(crate::sync::Ordering::Acquire) != 0;
            for as_id in [AsId(0), AsId(1)] {
                self.zap.flush |= self.write_protect_gfn(core, as_id, gfn, owed);
            }
        }
    }

    fn unaccount_shadowed(&mut self, gfn: Gfn, level: Level) {
        fn put(map: &mut KeyMap<u32>, key: u64) {
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                    shrink_sparse(map);
                }
            }
        }
        let key = track_key(gfn);
        put(&mut self.tracked, key);
        if level > Level::L4K && self.tracked_upper.contains_key(&key) {
            put(&mut self.tracked_upper, key);
            self.upper_summary.remove(gfn);
        }
    }

    /// KVM `shadow_page_table_clear_flood`: resets the write-flooding count of every page on
    /// the shadow path of `gva` under `root`, down to the first entry that is not present.
    pub(crate) fn clear_flood_along<H: Host>(
        &mut self,
        core: &MmuCore<H>,
        root: &super::root::ShadowRoot,
        gva: crate::types::Gva,
    ) {
        let vgfn = Gfn(gva.raw() >> 12);
        let fmt = core.cfg.format;
        let Some((mut cur, mut level)) = root.start(gva) else { return };
        loop {
            self.sp_mut(cur).flood = 0;
            let e = self.entry(core, cur, level.index(vgfn)).load(crate::sync::Ordering::Acquire);
            if !SpteFormat::is_mmu_present(e) || fmt.is_leaf(e, level) {
                return;
            }
            let (Some(next), Some(lower)) = (self.by_pfn(fmt.pfn(e)), level.lower()) else {
                return;
            };
            cur = next;
            level = lower;
        }
    }

    /// The gfns of `[start, end)` of `as_id` to visit for a range operation: every gfn some
    /// leaf maps, perhaps others ([`super::rmap::Rmap::gfns_in`]); never fails for want of heap.
    pub(super) fn rmap_gfns(&self, as_id: AsId, start: Gfn, end: Gfn) -> super::rmap::RangeGfns {
        self.rmap.gfns_in(as_id, start, end)
    }

    /// Clears the writable bit of every leaf mapping `gfn`. Returns whether a TLB may still
    /// hold a writable translation of it (a flush is needed): one was writable, or
    /// `read_only_unflushed` (a protection whose flush is still owed may have made a read-only
    /// one so; `MmuCore::unflushed_write_protects`) and one is present.
    pub(crate) fn write_protect_gfn<H: Host>(
        &self,
        core: &MmuCore<H>,
        as_id: AsId,
        gfn: Gfn,
        read_only_unflushed: bool,
    ) -> bool {
        let Some(list) = self.rmap.get(as_id, gfn) else { return false };
        let mut flush = false;
        for (id, idx) in list.iter() {
            let e = self.entry(core, id, usize::from(idx));
            let old = e.load(crate::sync::Ordering::Acquire);
            if !SpteFormat::is_mmu_present(old) {
                continue;
            }
            if core.cfg.format.is_writable(old) {
                let new = SpteFormat::without_write(old);
                let need = core.set_spte_locked(self, e, old, new, Level::L4K, gfn);
                flush |= need == FlushNeed::Remote;
            } else {
                flush |= read_only_unflushed;
            }
        }
        flush
    }

    /// Makes SPTE `idx` of page `parent` link `child` (KVM `link_shadow_page`). Fails, with
    /// nothing changed, only if the child's parent list needs room and the heap has none (never
    /// for a new page: [`Self::get_page`] made room for its first link).
    pub(crate) fn link<H: Host>(
        &mut self,
        core: &MmuCore<H>,
        parent: SpId,
        idx: usize,
        child: SpId,
    ) -> Result<(), HeapExhausted> {
        self.sp_mut(child).parents.try_reserve(1)?;
        let child_spt = self.sp(child).spt;
        let level = self.sp(parent).role.level();
        let e = self.entry(core, parent, idx);
        let old = e.load(crate::sync::Ordering::Acquire);
        debug_assert!(!SpteFormat::is_mmu_present(old), "link over a present SPTE");
        let link = core.cfg.format.make_nonleaf(child_spt);
        let _ = core.set_spte_locked(self, e, old, link, level, Gfn(0));
        self.sp_mut(child).parents.push((parent, idx as u16));
        Ok(())
    }

    /// Stores leaf (or MMIO) value `new` for `gfn` at SPTE `idx` of level-1 page `id`, keeping
    /// the rmap in step. Returns whether a present leaf was changed or dropped (flush needed);
    /// fails, with nothing changed, if the rmap needs room for a new leaf and the heap has none.
    pub(crate) fn set_leaf<H: Host>(
        &mut self,
        core: &MmuCore<H>,
        id: SpId,
        idx: usize,
        new: u64,
        gfn: Gfn,
    ) -> Result<bool, HeapExhausted> {
        let as_id = self.sp(id).role.as_id();
        let fmt = core.cfg.format;
        let e = self.entry(core, id, idx);
        let old = e.load(crate::sync::Ordering::Acquire);
        // KVM `mmu_set_spte`: a present leaf remade for the same frame and gfn (a right given or
        // taken, e.g. write access back after dirty-log protection) is updated in place: it
        // stays in the rmap, and needs a flush only if it lost a right or its accessed/dirty
        // bits (`mmu_spte_update`; `handle_changed_spte`). A leaf that only gained rights maps
        // the same frame: a TLB entry of the old value just faults again. Anything else (a leaf
        // of another frame or gfn, an MMIO SPTE) is dropped first, flushed if it was present.
        let same_leaf = SpteFormat::is_mmu_present(old)
            && SpteFormat::is_mmu_present(new)
            && fmt.pfn(old) == fmt.pfn(new)
            && self.sp(id).leaf_gfns[idx] == gfn.raw();
        if same_leaf {
            return Ok(
                core.set_spte_locked(self, e, old, new, Level::L4K, gfn) == FlushNeed::Remote
            );
        }
        if SpteFormat::is_mmu_present(new) {
            self.rmap.reserve(as_id, gfn)?;
        }
        let mut flush = self.drop_spte(core, id, idx);
        let old = e.load(crate::sync::Ordering::Acquire);
        let _ = core.set_spte_locked(self, e, old, new, Level::L4K, gfn);
        if SpteFormat::is_mmu_present(new) {
            self.sp_mut(id).leaf_gfns[idx] = gfn.raw();
            let mapped = self.rmap.add(as_id, gfn, id, idx as u16);
            // KVM `__rmap_add`: every leaf of the gfn goes, the new one too (its access faults
            // again); the caller flushes. (A leaf remade for the same frame, which KVM does
            // not add again, left the list above, so it never counts itself.)
            if mapped > RMAP_RECYCLE_THRESHOLD {
                // Allocates nothing (the fault's leaf is stored already: no failure here).
                self.unmap_gfn(core, as_id, gfn);
                flush = true;
            }
        }
        Ok(flush)
    }

    /// Clears SPTE `idx` of page `id` (KVM `mmu_page_zap_pte`): a leaf leaves the rmap, a link
    /// leaves its child's parent list, an MMIO SPTE just goes. Returns whether the entry was
    /// present (the caller must flush).
    pub(crate) fn drop_spte<H: Host>(&mut self, core: &MmuCore<H>, id: SpId, idx: usize) -> bool {
        let level = self.sp(id).role.level();
        let as_id = self.sp(id).role.as_id();
        let e = self.entry(core, id, idx);
        let old = e.load(crate::sync::Ordering::Acquire);
        if old == SpteFormat::NONPRESENT {
            return false;
        }
        let present = SpteFormat::is_mmu_present(old);
        let fmt = core.cfg.format;
        if present && !fmt.is_leaf(old, level) {
            let child = self.by_pfn(fmt.pfn(old));
            if let Some(c) = child {
                let parents = &mut self.sp_mut(c).parents;
                retain_shrinking(parents, |&(p, i)| !(p == id && usize::from(i) == idx));
            }
            let _ = core.set_spte_locked(self, e, old, SpteFormat::NONPRESENT, level, Gfn(0));
            return true;
        }
        let gfn = if present { Gfn(self.sp(id).leaf_gfns[idx]) } else { Gfn(0) };
        let _ = core.set_spte_locked(self, e, old, SpteFormat::NONPRESENT, level, gfn);
        if present {
            self.rmap.remove(as_id, gfn, id, idx as u16);
        }
        present
    }

    /// Drops every leaf mapping `gfn` of `as_id` (KVM `kvm_zap_rmap`), allocating nothing: the
    /// head leaves the rmap first, so each `drop_spte` finds nothing more to remove there.
    /// Returns whether one was present.
    fn unmap_gfn<H: Host>(&mut self, core: &MmuCore<H>, as_id: AsId, gfn: Gfn) -> bool {
        let Some(head) = self.rmap.take(as_id, gfn) else { return false };
        let mut flush = false;
        for (id, idx) in head.iter() {
            flush |= self.drop_spte(core, id, usize::from(idx));
        }
        flush
    }

    /// Drops every leaf mapping a gfn in `[start, end)` of `as_id` (host invalidation, KVM
    /// `kvm_unmap_gfn_range` through the rmap). Returns whether one was present.
    pub(crate) fn unmap_gfn_range<H: Host>(
        &mut self,
        core: &MmuCore<H>,
        as_id: AsId,
        start: Gfn,
        end: Gfn,
    ) -> bool {
        let mut flush = false;
        for gfn in self.rmap.gfns_in(as_id, start, end) {
            flush |= self.unmap_gfn(core, as_id, gfn);
        }
        flush
    }

    /// KVM `__kvm_mmu_prepare_zap_page`: clears every SPTE of the page and every SPTE linking it;
    /// a page no root pins goes to the prepared list (freed by the next commit), a pinned one
    /// becomes invalid, its vCPUs are asked to drop obsolete roots (in this critical section, so
    /// a fault that holds the lock later sees the request), and its last root user frees it.
    pub(crate) fn prepare_zap<H: Host>(
        &mut self,
        core: &MmuCore<H>,
        stats: &ShadowStats,
        id: SpId,
    ) {
        stats.mmu_shadow_zapped.add(1);
        core.stats.mmu_shadow_zapped.add(1);
        self.unlink_children(core, id);
        let parents = core::mem::take(&mut self.sp_mut(id).parents);
        for (p, i) in parents {
            let level = self.sp(p).role.level();
            let e = self.entry(core, p, usize::from(i));
            let old = e.load(crate::sync::Ordering::Acquire);
            let _ = core.set_spte_locked(self, e, old, SpteFormat::NONPRESENT, level, Gfn(0));
            self.zap.flush = true;
        }
        let (gfn, role, valid_gen, root_count) = {
            let sp = self.sp(id);
            (sp.gfn, sp.role, sp.valid_gen, sp.root_count)
        };
        if role.invalid() {
            return;
        }
        if !role.direct() {
            self.unaccount_shadowed(gfn, role.level());
        }
        self.deactivate(id);
        retain_shrinking(&mut self.buckets[Self::bucket(gfn)], |&x| x != id);
        self.sp_mut(id).role = role.with_invalid();
        if root_count == 0 {
            // KVM `kvm_unaccount_mmu_page` at prepare: the page no longer counts against the
            // limit, though it is freed only at the commit (a zap-all commits once, after lock
            // breaks in which faults check the limit).
            self.n_used -= 1;
            self.add_to_prepared(id);
        } else if valid_gen == self.valid_gen {
            core.request_all(
                crate::requests::Request::FreeObsoleteRoots,
                crate::mmu_core::AckWait::NoWait,
            );
        }
    }

    /// Clears every SPTE of page `id` (KVM `kvm_mmu_page_unlink_children`): leaves leave the
    /// rmap, links leave their child's parent list; a flush is owed if one was present.
    fn unlink_children<H: Host>(&mut self, core: &MmuCore<H>, id: SpId) {
        // Only the entries that hold something go through `drop_spte`: most of a shadow page is
        // not present, and `drop_spte`'s lookups per entry cost more than this scan (a zap-all
        // of a few dozen pages spent most of its time on them).
        let spt = self.sp(id).spt;
        // SAFETY: the page is live (in the slab) and we hold the shadow lock (`&mut self`): only
        // `commit_zap` queues a frame for freeing, once its page left the slab, and it is not
        // called before this function returns (`MmuCore::table`'s second case); the reference
        // is not kept past this function.
        let Some(table) = (unsafe { core.table(spt) }) else {
            unreachable!("shadow page frame {spt:?} unknown to the host")
        };
        for (idx, e) in table.iter().enumerate() {
            if e.load(crate::sync::Ordering::Acquire) != SpteFormat::NONPRESENT {
                self.zap.flush |= self.drop_spte(core, id, idx);
            }
        }
    }

    /// Puts prepared page `id`, which no root pins, at the end of the prepared list.
    fn add_to_prepared(&mut self, id: SpId) {
        debug_assert!(self.sp(id).next_zapped.is_none() && self.zap.last != Some(id), "{id:?}");
        match self.zap.last {
            Some(last) => self.sp_mut(last).next_zapped = Some(id),
            None => self.zap.first = Some(id),
        }
        self.zap.last = Some(id);
    }

    /// KVM `kvm_mmu_commit_zap_page`, first half: flushes remote TLBs if anything present was
    /// cleared, then takes the prepared pages out of the slab and queues their frames for the
    /// grace period (the caller calls `reclaim` after unlocking). Allocates nothing: each
    /// frame's room in the queue was promised when its page was made.
    pub(crate) fn commit_zap<H: Host>(&mut self, core: &MmuCore<H>, stats: &ShadowStats) {
        let again = core::mem::take(&mut self.zap.released_invalid);
        stats.mmu_shadow_zapped.add(again);
        core.stats.mmu_shadow_zapped.add(again);
        if self.zap.flush || self.zap.first.is_some() {
            core.flush_after_zap(true);
            self.zap.flush = false;
        }
        let Some(first) = self.zap.first.take() else { return };
        self.zap.last = None;
        let mut queue = core.queue_promised();
        let mut next = Some(first);
        while let Some(id) = next {
            next = self.sp_mut(id).next_zapped.take();
            queue.push(self.free_page(stats, id));
        }
    }

    /// Takes a zapped, unpinned page out of the slab; returns its frame (to be freed after a
    /// grace period).
    fn free_page(&mut self, stats: &ShadowStats, id: SpId) -> Pfn {
        let Some(sp) = self.slab.get_mut(id.0 as usize).and_then(Option::take) else {
            unreachable!("freeing shadow page {id:?} twice");
        };
        debug_assert!(sp.role.invalid() && sp.root_count == 0, "{sp:?}");
        self.by_pfn.remove(&sp.spt.raw());
        shrink_sparse(&mut self.by_pfn);
        self.free_ids.push(id);
        stats.shadow_pages.sub(1);
        sp.spt
    }

    /// A vCPU root stops pinning `id`. An invalid page nobody pins any more is zapped again and
    /// queued for the commit (KVM `mmu_free_root_page` runs `kvm_mmu_prepare_zap_page` on it):
    /// its zap cleared it, and the staleness check keeps faults from building below it since,
    /// but should anything have been linked there, it is unlinked here rather than left
    /// pointing at a freed page.
    pub(crate) fn put_root<H: Host>(&mut self, core: &MmuCore<H>, id: SpId) {
        let sp = self.sp_mut(id);
        sp.root_count -= 1;
        if sp.root_count == 0 && sp.role.invalid() {
            self.unlink_children(core, id);
            self.n_used -= 1;
            self.add_to_prepared(id);
            self.zap.released_invalid += 1;
        }
    }

    /// Test-only (feature `testing`): entries that zapped shadow pages still make reachable.
    /// Counts (1) MMU-present SPTEs in pages that are still allocated but invalid (zapped while
    /// a root pinned them) or obsolete (made before the last fast zap-all), and (2) parent
    /// links of live pages that come from a freed, invalid or obsolete page, that are listed
    /// twice, or whose SPTE no longer links the page. Both are 0 whenever no zap is in
    /// progress: a zap clears every SPTE of the page and every SPTE linking it, no fault may
    /// install below an invalid page (the staleness check), and the release of an invalid page
    /// clears it again.
    #[cfg(feature = "testing")]
    pub(crate) fn stale_entries_for_tests<H: Host>(&self, core: &MmuCore<H>) -> usize {
        let fmt = core.cfg.format;
        let bad_page = |id: SpId| match self.slab.get(id.0 as usize) {
            Some(Some(sp)) => sp.role.invalid() || sp.valid_gen != self.valid_gen,
            _ => true,
        };
        let mut n = 0;
        for (i, slot) in self.slab.iter().enumerate() {
            let Some(sp) = slot else { continue };
            let id = SpId(i as u32);
            if bad_page(id) {
                n += (0..512)
                    .filter(|&idx| {
                        let e = self.entry(core, id, idx).load(crate::sync::Ordering::Acquire);
                        SpteFormat::is_mmu_present(e)
                    })
                    .count();
            }
            for (k, &(p, idx)) in sp.parents.iter().enumerate() {
                // A link listed twice: one of them was made below a page that was freed since
                // (and whose id a new page reuses).
                if bad_page(p) || sp.parents[..k].contains(&(p, idx)) {
                    n += 1;
                    continue;
                }
                let e = self.entry(core, p, usize::from(idx)).load(crate::sync::Ordering::Acquire);
                if !SpteFormat::is_mmu_present(e) || fmt.pfn(e) != sp.spt {
                    n += 1;
                }
            }
        }
        n
    }

    /// KVM `kvm_mmu_zap_oldest_mmu_pages`: zaps up to `nr` pages that no root pins, oldest
    /// first. Returns how many were zapped (children's parent links are cleared too).
    pub(crate) fn zap_oldest<H: Host>(
        &mut self,
        core: &MmuCore<H>,
        stats: &ShadowStats,
        nr: usize,
    ) -> usize {
        let zapped = self.zap_oldest_while(core, stats, nr, |_| true, |sp| sp.root_count == 0);
        stats.mmu_recycled.add(zapped as u64);
        zapped
    }
}
