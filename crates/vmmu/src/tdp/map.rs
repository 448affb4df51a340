//! Installing an entry for a fault (KVM `kvm_tdp_mmu_map`, facts §3.6): walk from the root under
//! the shared MMU lock, link missing tables with compare-and-swap, split a huge leaf above the
//! target that does not serve the access into a table of children with its rights (KVM
//! `tdp_mmu_split_huge_page`; a logged slot's read-only huge leaf keeps its other pages mapped),
//! and install the target entry (a present leaf, or an MMIO SPTE) with compare-and-swap. A lost
//! race is `Retry`, never an error: another vCPU or a zap changed the entry first.
//!
//! Where the fault could map a huge page but a lower table is already linked at that level (one
//! that only holds MMIO SPTEs of an older generation, say, from before a slot was created over
//! them, or one that huge-page recovery left because no leaf was present under it), KVM replaces
//! the table with the huge leaf (`kvm_tdp_mmu_map` goes to the target level whatever the entry
//! holds; `handle_removed_pt` freezes and frees the table under the shared lock). Here tables are
//! unlinked only under the exclusive lock ([`crate::tdp`] rule 1), so the walk stops with
//! [`MapOutcome::TableInTheWay`] and the fault path does the replacement under the exclusive
//! lock ([`Tdp::replace_table_in_the_way`], `zap.rs`), with the same end state as KVM.

use super::dirty::SplitRights;
use super::root::Root;
use super::{MmuRead, RootList, Tdp};
use crate::fault::PageFault;
use crate::host::FrameKind;
use crate::host::Host;
use crate::mmu_core::FlushNeed;
use crate::spte::SpteFormat;
use crate::stats::StripeKey;
use crate::sync::Ordering;
use crate::types::{Access, Gfn, Level, Pfn};

/// What to install at the end of the walk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LeafSpec {
    /// A present leaf for RAM: the frame backing `gfn`'s naturally aligned block at `level`
    /// starts at `base_pfn` (aligned for `level`).
    Ram {
        /// The frame of the first page of the block at `max_level` (aligned to it).
        base_pfn: Pfn,
        /// The largest level the slot and the host allow.
        max_level: Level,
        /// The rights to grant.
        access: Access,
        /// Whether the leaf may be writable.
        writable: bool,
        /// What the host frame is (its EPT memory type).
        kind: FrameKind,
    },
    /// An MMIO SPTE (4 KiB level, like KVM).
    Mmio(u64),
}

/// The result of an installation attempt.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MapOutcome {
    /// A new entry was installed at `level`.
    Installed {
        /// The level of the installed entry.
        level: Level,
    },
    /// The entry already had exactly this value (KVM `RET_PF_SPURIOUS`).
    Spurious,
    /// A present leaf already allows the access: another vCPU fixed the fault first (KVM
    /// `RET_PF_SPURIOUS` from the fast page fault path). The entry was left alone, whatever the
    /// faulting vCPU decided, so a stale decision (e.g. "MMIO" from an older memslot set) never
    /// replaces a translation that other vCPUs may hold.
    PresentLeafAllows,
    /// A compare-and-swap lost a race, or a conflicting leaf was removed: fault again.
    Retry,
    /// A lower table is linked where the fault could map its huge leaf: the caller takes the
    /// MMU lock exclusive and replaces it (`Tdp::replace_table_in_the_way`), as KVM
    /// replaces it under its shared lock.
    TableInTheWay,
    /// No frame for a page table.
    OutOfMemory,
    /// The huge leaf would replace a lower table, and the heap has no room for the detached
    /// table's place in the queue of pages to free (`MmuCore::promise_tree`); nothing was
    /// changed.
    OutOfHeap,
    /// A table frame could not be resolved (internal inconsistency).
    Broken,
}

impl<H: Host> Tdp<'_, H> {
    /// Installs `spec` for `fault` under `root` (KVM `kvm_tdp_mmu_map`). `_shared` proves the
    /// MMU lock is held shared; the caller has checked the fault is not stale
    /// ([`crate::fault::PageFault::stale`]) under that same hold. Replacing a present leaf
    /// flushes remote TLBs before returning. `who` is the stripe the leaf counters change in
    /// (the faulting vCPU's own).
    pub(crate) fn map(
        &self,
        _shared: &MmuRead<'_, RootList>,
        root: &Root,
        fault: &PageFault,
        spec: LeafSpec,
        who: StripeKey,
    ) -> MapOutcome {
        let (gfn, access) = (fault.gfn, fault.access);
        let (root_pfn, root_level) = (root.pfn(), root.level());
        let fmt = self.cfg.format;
        let target = match spec {
            LeafSpec::Ram { max_level, .. } => max_level,
            LeafSpec::Mmio(_) => Level::L4K,
        };
        let mut pfn = root_pfn;
        let mut level = root_level;
        loop {
            // SAFETY: we hold the MMU lock shared and walk from a root we hold; unlinking happens
            // only under the exclusive lock, and frees only after a grace period (rule 3).
            let Some(table) = (unsafe { self.table(pfn) }) else {
                debug_assert!(false, "table frame {pfn:?} unknown to the host");
                return MapOutcome::Broken;
            };
            let entry = &table[level.index(gfn)];
            let old = entry.load(Ordering::Acquire);
            if SpteFormat::is_frozen(old) {
                // Only the thread that froze an entry may change it (facts §6).
                return MapOutcome::Retry;
            }
            let present = SpteFormat::is_mmu_present(old);
            if level == target && level > Level::L4K && present && !fmt.is_leaf(old, level) {
                return MapOutcome::TableInTheWay;
            }
            if level <= target && (!present || fmt.is_leaf(old, level)) {
                // Target level reached and no lower table is in the way.
                return self.install_at_target(entry, old, present, level, fault, spec, who);
            }
            pfn = match self.step_down(entry, old, present, level, gfn, access, who) {
                Ok(child) => child,
                Err(outcome) => return outcome,
            };
            level = match level.lower() {
                Some(l) => l,
                None => return MapOutcome::Broken,
            };
        }
    }

    /// The leaf of `spec` for `fault` at `level` in `entry`, which holds `old` (`present` or
    /// not): nothing, a leaf, or an MMIO SPTE (the walk reached the target level with no lower
    /// table in the way).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn install_at_target(
        &self,
        entry: &crate::sync::AtomicU64,
        old: u64,
        present: bool,
        level: Level,
        fault: &PageFault,
        spec: LeafSpec,
        who: StripeKey,
    ) -> MapOutcome {
        let (gfn, access) = (fault.gfn, fault.access);
        let fmt = self.cfg.format;
        let mmio_over_present = matches!(spec, LeafSpec::Mmio(_))
            && self.cfg.bugs.has(crate::bugs::Bug::MmioOverPresentSpte);
        if present && fmt.leaf_allows(old, access) && !mmio_over_present {
            return MapOutcome::PresentLeafAllows;
        }
        let new = match spec {
            LeafSpec::Ram { base_pfn, max_level, access, writable, kind } => {
                // From the start of the host block to this leaf's block.
                let offset = max_level.offset_in_block(gfn) & !(level.pages() - 1);
                fmt.make_frame_leaf(Pfn(base_pfn.raw() + offset), kind, level, access, writable)
            }
            LeafSpec::Mmio(spte) => spte,
        };
        if old == new {
            return MapOutcome::Spurious;
        }
        match self.set_spte_atomic(entry, old, new, level, who) {
            Err(()) => return MapOutcome::Retry,
            Ok(FlushNeed::Remote) if !mmio_over_present => self.flush_remote_tlbs(),
            Ok(FlushNeed::Remote) => {}
            Ok(FlushNeed::NotNeeded) => {}
        }
        MapOutcome::Installed { level }
    }

    /// One level down from `entry` (at `level`, holding `old`, `present` or not) above the
    /// target level: the frame of the table to walk next. A linked table is followed; a huge
    /// leaf that does not serve the access is split; nothing (or an MMIO SPTE, which only exists
    /// at 4 KiB) gets a new table linked.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn step_down(
        &self,
        entry: &crate::sync::AtomicU64,
        old: u64,
        present: bool,
        level: Level,
        gfn: Gfn,
        access: crate::types::FaultAccess,
        who: StripeKey,
    ) -> Result<Pfn, MapOutcome> {
        let fmt = self.cfg.format;
        if present {
            if !fmt.is_leaf(old, level) {
                return Ok(fmt.pfn(old));
            }
            if fmt.leaf_allows(old, access) {
                // A huge leaf that serves the access: whatever this fault decided is older than
                // it (see `PresentLeafAllows`).
                return Err(MapOutcome::PresentLeafAllows);
            }
            // A huge leaf above the target that does not serve the fault (one made read-only
            // for dirty logging, say): split it and go on down (KVM `kvm_tdp_mmu_map`:
            // `tdp_mmu_split_huge_page` under the shared lock). Zapping it instead would unmap
            // its other pages: their next reads would fault and, in a logged slot, map them
            // writable and report them dirty.
            return self.split_for_fault(entry, old, level, gfn, who);
        }
        let Some(child) = self.alloc_table() else {
            return Err(MapOutcome::OutOfMemory);
        };
        let link = fmt.make_nonleaf(child);
        // Release (in the exchange): the child's initialised entries are visible to whoever sees
        // the link. Replacing a non-present entry or an MMIO SPTE needs no flush.
        if self.set_spte_atomic(entry, old, link, level, who).is_err() {
            self.free_unpublished_table(child);
            return Err(MapOutcome::Retry);
        }
        Ok(child)
    }

    /// Replaces the huge leaf `old` in `entry` (at `level`, over `gfn`) by a table of children
    /// with its rights (KVM `tdp_mmu_split_huge_page` from the fault path) with compare-and-swap,
    /// under the shared MMU lock; returns the table. `Retry` if the entry changed meanwhile,
    /// `OutOfMemory` if no table page can be had. The children translate as the parent did, but
    /// the exchange of a present leaf is flushed as any is (`mmu_core/change.rs`; KVM leaves the mix of
    /// old and new translations in TLBs here, which is only correct because the two agree).
    fn split_for_fault(
        &self,
        entry: &crate::sync::AtomicU64,
        old: u64,
        level: Level,
        gfn: Gfn,
        who: StripeKey,
    ) -> Result<Pfn, MapOutcome> {
        let base = level.block_base(gfn);
        let Some((child, lower)) = self.split_huge_leaf(old, level, base, SplitRights::Parent)
        else {
            return Err(MapOutcome::OutOfMemory);
        };
        let link = self.cfg.format.make_nonleaf(child);
        // Release (in the exchange): the children are visible to whoever sees the link.
        match self.set_spte_atomic(entry, old, link, level, who) {
            Ok(flush) => {
                debug_assert_eq!(flush, FlushNeed::Remote, "a present leaf was replaced");
                self.flush_remote_tlbs();
                Ok(child)
            }
            Err(()) => {
                self.discard_split(child, lower, base);
                Err(MapOutcome::Retry)
            }
        }
    }
}

impl<H: Host> Tdp<'_, H> {
    /// KVM's legacy direct-MMU prefetch (`direct_pte_prefetch`, with `tdp_mmu=N`; the TDP MMU
    /// proper does not prefetch), when [`crate::mmu_core::MmuConfig::direct_prefetch`] asks for it:
    /// after a fault installed a 4 KiB RAM leaf for `gfn` under `root`, the runs of not-present
    /// entries (an MMIO SPTE counts as not present) in the 8-aligned group of its table around it
    /// become writable leaves, by the rules of [`crate::shadow::prefetch`] (a run needs its whole
    /// range in one slot that is neither dirty-logged nor read-only, and gets the leading frames
    /// the host maps writable already; a run that gets none ends the prefetch). Nothing while a
    /// host invalidation is in progress; a lost compare-and-swap ends it too. `_shared` proves the
    /// MMU lock is held shared, the same hold as the fault's map.
    pub(crate) fn prefetch_direct(
        &self,
        _shared: &MmuRead<'_, RootList>,
        root: &Root,
        gfn: crate::types::Gfn,
        set: &crate::memslot::MemslotSet,
        who: StripeKey,
    ) {
        use crate::shadow::prefetch::{direct_runs, run_slot};
        use crate::types::Gfn;
        if !self.cfg.direct_prefetch || self.inval.in_progress() != 0 {
            return;
        }
        let fmt = self.cfg.format;
        let (mut pfn, mut level) = (root.pfn(), root.level());
        // Down to the 4 KiB table that holds the new leaf.
        let table = loop {
            // SAFETY: as in `map`: the MMU lock is held shared and the walk starts at a root we
            // hold; tables are freed only after a grace period.
            let Some(table) = (unsafe { self.table(pfn) }) else { return };
            if level == Level::L4K {
                break table;
            }
            let old = table[level.index(gfn)].load(Ordering::Acquire);
            if !SpteFormat::is_mmu_present(old) || fmt.is_leaf(old, level) {
                return;
            }
            pfn = fmt.pfn(old);
            level = match level.lower() {
                Some(l) => l,
                None => return,
            };
        };
        let present = |g: u64| {
            SpteFormat::is_mmu_present(table[Level::L4K.index(Gfn(g))].load(Ordering::Acquire))
        };
        // One run of `n` gfns from `start` (writable leaves): how many leaves it made.
        let run = |start: u64, n: u64| -> u64 {
            let Some(slot) = run_slot(set, Gfn(start), n, true) else { return 0 };
            let host: &dyn crate::host::HostMemory = &*self.host;
            let mut made = 0;
            for g in start..start + n {
                let frame = host.translate_mapped_writable(slot.hva_of(Gfn(g)));
                let Some(frame) = frame.filter(|&f| fmt.holds_pfn(f)) else {
                    break;
                };
                let entry = &table[Level::L4K.index(Gfn(g))];
                let kind = fmt.frame_kind_of(host, frame);
                let leaf = fmt.make_frame_leaf(frame, kind, Level::L4K, Access::ALL, true);
                let old = entry.load(Ordering::Acquire);
                if SpteFormat::is_mmu_present(old)
                    || SpteFormat::is_frozen(old)
                    || self.set_spte_atomic(entry, old, leaf, Level::L4K, who).is_err()
                {
                    break;
                }
                made += 1;
            }
            made
        };
        direct_runs(gfn.raw(), present, run);
    }
}
