//! The shadow-paging MMU (KVM with TDP off: `mmu.c` legacy paths and `paging_tmpl.h`; shadow
//! facts): the MMU shadows the guest's own page tables, so the hardware walks SPTEs keyed by
//! guest-virtual address. It shares with the TDP MMU everything that is not about the shape of
//! the tables (the [`MmuCore`], which every function here takes as `core`: vCPU request words,
//! remote TLB flushes, the table SRCU and deferred frees, the host-invalidation sequence, the SPTE
//! format and the MMIO SPTE codec), and the memslot generation protocol, the caching policy and
//! the per-vCPU MMIO info cache with the rest of the VM.
//!
//! # Locking and lifetime rules
//! 1. All shadow bookkeeping and every SPTE change happen under the shadow lock (KVM takes
//!    `mmu_lock` for write on every shadow path); holding `&mut ShadowState` is the proof.
//! 2. Lockless readers (the hardware walk of a vCPU in guest mode, the fast MMIO path) hold a
//!    table-SRCU read section; a zapped page's SPTEs are cleared before its frame is queued, the
//!    frame is freed only after remote TLBs were flushed and a grace period passed (the
//!    [`crate::tdp`] rules 3-4). A lockless walk that meets a cleared entry returns Retry.
//! 3. Lock order: the shadow lock is taken after `vmm_lock`, after the memslots' slots lock (a
//!    memslot update's hooks zap under it) and after `mn_lock` (a host invalidation's begin
//!    unmaps under it), and only once this MMU's `mmu_lock` (the invalidations' lock) is
//!    released; no grace period is waited for while it is held (`reclaim` runs after it is
//!    released).
//! 4. A vCPU root pins its shadow page (`root_count`); a pinned page that is zapped becomes
//!    invalid and its vCPUs are asked to reload (`FreeObsoleteRoots`) in the same critical
//!    section, so a fault that holds the lock either sees the request or completes before it.
//!    The last root to let go of an invalid page zaps it again before it is freed (KVM
//!    `mmu_free_root_page`), so nothing stays linked from a freed page.
//!
//! Not modelled: unsync shadow pages (every shadowed guest table stays write-protected, which
//! the facts allow), 32-bit non-PAE guests (quadrants), huge SPTEs (guest 2 MiB and 1 GiB pages
//! are mapped with direct pages of 4 KiB leaves), nested (guest-mode) roots and SMEP/SMAP.
//! CR0.WP=0 is modelled as KVM does it: a supervisor write to a page the guest maps read-only
//! gets a writable, supervisor-only SPTE (`vcpu::shadow_fault`), since the hardware always runs
//! with CR0.WP=1.

mod dirty;
pub(crate) mod fetch;
mod guest_mem;
mod keymap;
mod pages;
pub(crate) mod prefetch;
mod rmap;
pub mod role;
pub(crate) mod root;
mod track;
mod write_track;

pub use guest_mem::SlotGuestMemory;
pub use root::ShadowRootKind;

pub(crate) use dirty::ShadowProtect;
pub(crate) use pages::{NewPageError, ShadowPage, ShadowState};
pub(crate) use root::{PrevRoot, ShadowRoot};

/// Not one shadow page is free under the page limit, even after recycling: every page is
/// pinned by a root (KVM `make_mmu_pages_available`'s `-ENOSPC`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct PageLimitReached {
    /// The limit in force.
    pub(crate) limit: usize,
}

use crate::fault::{Backing, PageFault};
use crate::guest::GuestPteMemory;
use crate::host::Host;
use crate::invalidate::GfnRanges;
use crate::mmu_core::{MmuCore, MmuLock};
use crate::requests::Request;
use crate::stats::Counter;
use crate::sync::{Arc, Mutex, MutexGuard};
use crate::types::{AsId, Gfn};

/// KVM `KVM_MIN_FREE_MMU_PAGES`.
pub const MIN_FREE_PAGES: usize = 5;
/// KVM `KVM_REFILL_PAGES`.
pub const REFILL_PAGES: usize = 25;
/// KVM `KVM_MIN_ALLOC_MMU_PAGES`: the smallest page limit.
pub const MIN_ALLOC_PAGES: usize = 64;
/// KVM `KVM_PERMILLE_MMU_PAGES`: the default page limit is this many per thousand memslot pages.
pub const PERMILLE_MMU_PAGES: u64 = 20;

/// KVM `kvm_mmu_calculate_default_mmu_pages`: the default shadow page limit for memslots
/// holding `nr_pages` pages in all (every address space): 2% of them, at least
/// [`MIN_ALLOC_PAGES`].
pub fn default_max_pages(nr_pages: u64) -> usize {
    let n = nr_pages.saturating_mul(PERMILLE_MMU_PAGES) / 1000;
    usize::try_from(n).unwrap_or(usize::MAX).max(MIN_ALLOC_PAGES)
}
/// KVM `BATCH_ZAP_PAGES`: obsolete pages zapped between two lock breaks of the fast zap-all.
/// Under loom 1, so that models of a few pages still reach a lock break with obsolete pages
/// left to zap (the first batch is prepared before the first break).
pub const BATCH_ZAP_PAGES: usize = if cfg!(loom) { 1 } else { 10 };

/// Shadow-MMU counters (KVM's VM stats of the same names, shadow facts §10).
#[derive(Default, Debug)]
pub struct ShadowStats {
    /// Shadow page lookups that created a page.
    pub mmu_cache_miss: Counter,
    /// Shadow pages zapped (children included). A root zapped while in use counts again when
    /// its last user frees it, as KVM's `mmu_free_root_page` zaps it a second time.
    pub mmu_shadow_zapped: Counter,
    /// Emulated writes to guest memory seen while pages were shadowed.
    pub mmu_pte_write: Counter,
    /// SPTEs of upper-level pages zapped by such writes with a non-zero new gPTE.
    pub mmu_pde_zapped: Counter,
    /// Pages zapped by a misaligned or flooding write.
    pub mmu_flooded: Counter,
    /// Pages zapped to stay under the page limit, or by the shrinker.
    pub mmu_recycled: Counter,
    /// Shadow pages in use (KVM `n_used_mmu_pages`).
    pub shadow_pages: Counter,
    /// Faults and root loads refused because the page limit was reached with every page
    /// pinned by a root (KVM's `-ENOSPC` from `KVM_RUN`; not a KVM stat): a limit too small for
    /// the vCPUs.
    pub page_limit_failures: Counter,
}

/// A snapshot of [`ShadowStats`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ShadowStatsSnapshot {
    /// See [`ShadowStats::mmu_cache_miss`].
    pub mmu_cache_miss: u64,
    /// See [`ShadowStats::mmu_shadow_zapped`].
    pub mmu_shadow_zapped: u64,
    /// See [`ShadowStats::mmu_pte_write`].
    pub mmu_pte_write: u64,
    /// See [`ShadowStats::mmu_pde_zapped`].
    pub mmu_pde_zapped: u64,
    /// See [`ShadowStats::mmu_flooded`].
    pub mmu_flooded: u64,
    /// See [`ShadowStats::mmu_recycled`].
    pub mmu_recycled: u64,
    /// See [`ShadowStats::shadow_pages`].
    pub shadow_pages: u64,
    /// See [`ShadowStats::page_limit_failures`].
    pub page_limit_failures: u64,
}

impl ShadowStats {
    /// The current values.
    pub fn snapshot(&self) -> ShadowStatsSnapshot {
        ShadowStatsSnapshot {
            mmu_cache_miss: self.mmu_cache_miss.get(),
            mmu_shadow_zapped: self.mmu_shadow_zapped.get(),
            mmu_pte_write: self.mmu_pte_write.get(),
            mmu_pde_zapped: self.mmu_pde_zapped.get(),
            mmu_flooded: self.mmu_flooded.get(),
            mmu_recycled: self.mmu_recycled.get(),
            shadow_pages: self.shadow_pages.get(),
            page_limit_failures: self.page_limit_failures.get(),
        }
    }
}

/// One VM's shadow MMU.
pub struct ShadowMmu {
    /// KVM's `mmu_lock` as the host invalidations take it: held exclusive, it serialises the
    /// begin and end of the core's invalidation state ([`crate::invalidate`]). It guards
    /// nothing else: shadow pages and SPTEs are under the shadow lock (`state`, rule 1).
    mmu_lock: MmuLock<()>,
    state: Mutex<ShadowState>,
    /// The lock-free summary of the upper-level write tracking, shared with the state, which
    /// changes it under the lock (`write_track`).
    upper_tracked: Arc<write_track::UpperTrackSummary>,
    /// Counters.
    pub stats: ShadowStats,
}

impl ShadowMmu {
    /// A shadow MMU with a limit of `max_pages` shadow pages (at least [`MIN_ALLOC_PAGES`]), as
    /// if `KVM_SET_NR_MMU_PAGES` had set it (memslot changes keep it); `None`: KVM's default
    /// limit, [`MIN_ALLOC_PAGES`] until memslot creations and deletions recompute it
    /// ([`Self::set_default_max_pages`]).
    pub(crate) fn new(max_pages: Option<usize>) -> Self {
        let upper_tracked = Arc::new(write_track::UpperTrackSummary::new());
        let n_max = max_pages.unwrap_or(MIN_ALLOC_PAGES).max(MIN_ALLOC_PAGES);
        let mut st = ShadowState::new(n_max, upper_tracked.clone());
        st.n_requested = max_pages.is_some();
        ShadowMmu {
            mmu_lock: MmuLock::new(()),
            state: Mutex::new(st),
            upper_tracked,
            stats: ShadowStats::default(),
        }
    }

    /// KVM `kvm_gfn_is_write_tracked` without the lock: whether a page above the last level may
    /// shadow `gfn`. `false` lets a present write skip the early page-track check; `true` is
    /// confirmed under the lock ([`ShadowState::is_gfn_write_tracked`]). See `write_track`.
    #[inline]
    pub(crate) fn may_be_gfn_write_tracked(&self, gfn: Gfn) -> bool {
        self.upper_tracked.may_be_tracked(gfn)
    }

    /// Takes the shadow lock (rule 1), waiting with the host's policy.
    pub(crate) fn lock<'a, H: Host>(&'a self, core: &MmuCore<H>) -> MutexGuard<'a, ShadowState> {
        self.state.lock_with(&core.relax())
    }

    /// Shadow pages in use.
    pub fn pages_in_use(&self) -> usize {
        self.stats.shadow_pages.get() as usize
    }

    /// [`crate::vm::Vm::stale_shadow_entries_for_tests`]: `core` must be the core of this shadow
    /// MMU's own VM, whose host resolves the frames of its pages (another VM's core would read
    /// that VM's frames, which nothing here keeps allocated), so only the VM pairs the two.
    #[cfg(feature = "testing")]
    pub(crate) fn stale_entries_for_tests<H: Host>(&self, core: &MmuCore<H>) -> usize {
        self.lock(core).stale_entries_for_tests(core)
    }

    /// KVM `make_mmu_pages_available`: below [`MIN_FREE_PAGES`] free pages, recycle the oldest
    /// unpinned ones up to [`REFILL_PAGES`] free. `Err` when not one page is free even then
    /// (every page is pinned by a root: KVM `-ENOSPC`). Soft, as KVM's: one free page lets a
    /// fault or root load go on, though it may take up to four.
    pub(crate) fn make_pages_available<H: Host>(
        &self,
        core: &MmuCore<H>,
        st: &mut ShadowState,
    ) -> Result<(), PageLimitReached> {
        let avail = st.n_max.saturating_sub(st.n_used);
        if avail >= MIN_FREE_PAGES {
            return Ok(());
        }
        st.zap_oldest(core, &self.stats, REFILL_PAGES - avail);
        if st.n_used >= st.n_max {
            return Err(PageLimitReached { limit: st.n_max });
        }
        Ok(())
    }

    /// Installs what a fault decided (KVM `FNAME(page_fault)` from `make_mmu_pages_available` to
    /// `fetch`), under the shadow lock: pages are made available first (2abd5287f083), unless an
    /// MMIO leaf builds no page ([`crate::mmu_core::MmuConfig::shadow_mmio_path_only`]); then the
    /// fault's staleness check ([`PageFault::stale`], of `pf` as faultin resolved it to
    /// `backing`) with vCPU `vcpu`'s pending requests read
    /// under the lock (`zap_all_fast` posts its reload inside its critical section, so the fault
    /// sees it or completes first); then [`fetch::fetch`]; then the zaps it collected are
    /// committed. The caller reclaims the freed frames once it has left its memslot read
    /// section.
    pub(crate) fn install_fault<H: Host, M: GuestPteMemory>(
        &self,
        core: &MmuCore<H>,
        vcpu: usize,
        root: &ShadowRoot,
        pf: &PageFault,
        backing: &Backing,
        fault: &fetch::ShadowFault<'_, M>,
    ) -> fetch::FetchOutcome {
        let mut st = self.lock(core);
        let available =
            if matches!(fault.want, fetch::LeafWant::Mmio(_)) && core.cfg.shadow_mmio_path_only {
                Ok(())
            } else {
                self.make_pages_available(core, &mut st)
            };
        let pending = core.vcpus[vcpu].pending();
        let outcome = match pf.stale(backing, root.state(&st), pending, &core.inval, core.cfg.bugs)
        {
            Some(cause) => fetch::FetchOutcome::Retry(cause),
            None if available.is_err() => {
                self.stats.page_limit_failures.add(1);
                fetch::FetchOutcome::PageLimit
            }
            None if root.start(fault.gva).is_none() => {
                // A special root whose entry for this gva is 0 although the guest's walk went
                // through it: the table its PDPTE (or a 4-level CR3) names was outside guest
                // memory when the root was built and is in a memslot now. Rebuild the root
                // (KVM's fetch with the dummy root: request FREE_OBSOLETE_ROOTS and retry).
                core.vcpus[vcpu].request(Request::FreeObsoleteRoots);
                fetch::FetchOutcome::Retry(crate::stats::RetryCause::NoRoot)
            }
            None => fetch::fetch(core, &self.stats, &mut st, root, fault),
        };
        core.host.preempt_point(crate::host::PreemptPoint::FaultInstalled);
        st.commit_zap(core, &self.stats);
        outcome
    }

    /// KVM `KVM_SET_NR_MMU_PAGES`: a new page limit (at least [`MIN_ALLOC_PAGES`]); zaps the
    /// oldest unpinned pages down to it.
    pub(crate) fn set_max_pages<H: Host>(&self, core: &MmuCore<H>, n: usize) {
        self.change_max_pages(core, n, true);
    }

    /// KVM `kvm_arch_commit_memory_region` after a memslot creation or deletion: unless a limit
    /// was requested ([`Self::set_max_pages`]), the limit becomes [`default_max_pages`] of the
    /// memslots' pages (`nr_pages`), zapping the oldest unpinned pages down to it.
    pub(crate) fn set_default_max_pages<H: Host>(&self, core: &MmuCore<H>, nr_pages: u64) {
        self.change_max_pages(core, default_max_pages(nr_pages), false);
    }

    /// KVM `kvm_mmu_change_mmu_pages`; `requested`: from `KVM_SET_NR_MMU_PAGES` (a default
    /// limit is ignored once a limit was requested).
    fn change_max_pages<H: Host>(&self, core: &MmuCore<H>, n: usize, requested: bool) {
        {
            let mut st = self.lock(core);
            if requested {
                st.n_requested = true;
            } else if st.n_requested {
                return;
            }
            // KVM `kvm_mmu_change_mmu_pages`: zap the oldest pages down to the goal; what is
            // still in use then (pages roots pin) becomes the limit. (`n_used` drops a zapped
            // page when its zap is prepared, as KVM unaccounts it, not at the commit.)
            let goal = n.max(MIN_ALLOC_PAGES);
            let over = st.n_used.saturating_sub(goal);
            if over > 0 {
                st.zap_oldest(core, &self.stats, over);
            }
            st.commit_zap(core, &self.stats);
            st.n_max = if over > 0 { st.n_used } else { goal };
        }
        core.reclaim();
    }

    /// The shrinker's entry point (KVM `mmu_shrink_scan` before v6.13): zaps up to `nr` of the
    /// oldest pages no root pins, while vCPUs may be running lockless walks. Returns how many.
    pub(crate) fn shrink<H: Host>(&self, core: &MmuCore<H>, nr: usize) -> usize {
        let n = {
            let mut st = self.lock(core);
            let n = st.zap_oldest(core, &self.stats, nr);
            st.commit_zap(core, &self.stats);
            n
        };
        core.reclaim();
        n
    }

    /// KVM `kvm_mmu_zap_all_fast` for the shadow MMU: a new `mmu_valid_gen` makes every page
    /// obsolete; vCPUs are asked to drop obsolete roots in the same critical section; then the
    /// obsolete pages are zapped oldest first, [`BATCH_ZAP_PAGES`] at a time with the lock
    /// dropped in between and handed to a waiting vCPU if there is one (other vCPUs' faults and
    /// lockless walks go on meanwhile); one flush and one commit at the end.
    ///
    /// The first batch is prepared in the bump's critical section, as KVM's
    /// `kvm_zap_obsolete_pages` breaks the lock only after a batch: a fault at a break then
    /// finds at least a batch of obsolete pages no longer counted against the limit. With a
    /// break between the bump and the first batch, a vCPU's new root and tables came on top of
    /// every obsolete page still counted, and a VM near its limit recycled (zapped current
    /// pages) in the middle of a zap-all (seen as `mmu_recycled` 23 at a limit of 64 with 58
    /// pages in use: `shadow_page_limit.rs`).
    pub(crate) fn zap_all_fast<H: Host>(&self, core: &MmuCore<H>) {
        core.stats.zap_all_fast.add(1);
        let mut st = self.lock(core);
        st.valid_gen = st.valid_gen.wrapping_add(1);
        // Same critical section as the bump (shadow facts §6.3).
        core.request_all(Request::FreeObsoleteRoots, crate::mmu_core::AckWait::NoWait);
        loop {
            // Read at each batch: a zap-all that ran at a lock break made a newer generation.
            let gen = st.valid_gen;
            let obsolete = |sp: &ShadowPage| sp.valid_gen != gen;
            let stats = &self.stats;
            if st.zap_oldest_while(core, stats, BATCH_ZAP_PAGES, obsolete, |_| true) == 0 {
                st.commit_zap(core, &self.stats);
                break;
            }
            // Lock break between batches (KVM `cond_resched_rwlock_write`): when a vCPU waits
            // for the lock, let it in before the next batch. Not a yield of the CPU: with more
            // runnable threads than CPUs, a yield gave the CPU away for a whole time slice at
            // every break, and a slot delete under shadow paging took 2-10 ms (measured,
            // `vmmu run --format shadow`).
            if self.state.contended() {
                drop(st);
                self.state.hand_off();
                st = self.lock(core);
            }
        }
        drop(st);
        core.reclaim();
    }

    /// A memslot delete or move with `KVM_X86_QUIRK_SLOT_ZAP_ALL` off (KVM
    /// `kvm_mmu_zap_memslot`): drops every leaf that maps a gfn of the slot `[start, end)` of
    /// `as_id` (through the rmap), and zaps every valid page whose gfn lies in the slot: the
    /// pages of guest tables there (a table the slot no longer backs must not keep translating,
    /// and its write tracking belongs to the slot) and direct pages that start there. Other
    /// pages, and the MMIO SPTEs anywhere, stay: the update's new generation stales those. The
    /// slot is invalid already (a fault on it retries), so nothing maps it again meanwhile.
    /// One critical section; one flush and one commit.
    pub(crate) fn zap_memslot<H: Host>(
        &self,
        core: &MmuCore<H>,
        as_id: AsId,
        start: Gfn,
        end: Gfn,
    ) {
        {
            let mut st = self.lock(core);
            let dropped = st.unmap_gfn_range(core, as_id, start, end);
            st.owe_flush(dropped);
            st.zap_valid_pages_in(core, &self.stats, (as_id, start, end));
            st.commit_zap(core, &self.stats);
        }
        core.reclaim();
    }

    /// Host invalidation start (KVM `kvm_mmu_notifier_invalidate_range_start`): faults on
    /// `ranges` retry from now on. The leaves are dropped by [`Self::unmap_gfn_ranges`], which
    /// the caller runs next.
    pub(crate) fn invalidate_begin<H: Host>(
        &self,
        core: &MmuCore<H>,
        ranges: &(impl GfnRanges + ?Sized),
    ) {
        core.begin_invalidation(&self.mmu_lock, ranges, |_, _, _, _, _| false);
    }

    /// Host invalidation end (KVM `invalidate_range_end`).
    pub(crate) fn invalidate_end<H: Host>(&self, core: &MmuCore<H>) {
        core.end_invalidation(&self.mmu_lock);
    }

    /// Host invalidation (KVM `kvm_unmap_gfn_range` through the rmap): drops every leaf for
    /// the ranges and flushes. The caller has begun the invalidation (faults on the ranges
    /// retry) before this runs.
    pub(crate) fn unmap_gfn_ranges<H: Host>(
        &self,
        core: &MmuCore<H>,
        ranges: &(impl GfnRanges + ?Sized),
    ) {
        {
            let mut st = self.lock(core);
            ranges.for_each(&mut |as_id, start, end| {
                let dropped = st.unmap_gfn_range(core, as_id, start, end);
                st.owe_flush(dropped);
            });
            st.commit_zap(core, &self.stats);
        }
        core.reclaim();
    }

    /// A vCPU drops its roots (`current` and previous ones); obsolete pages nobody pins any more
    /// are freed (a special root's frame is the vCPU's and stays, emptied). Called by the vCPU
    /// outside guest mode; it reclaims only in batches.
    pub(crate) fn free_roots<H: Host>(
        &self,
        core: &MmuCore<H>,
        roots: impl IntoIterator<Item = ShadowRoot>,
    ) {
        {
            let mut st = self.lock(core);
            for r in roots {
                r.release(core, &mut st);
            }
            st.commit_zap(core, &self.stats);
        }
        core.reclaim_batched();
    }
}
