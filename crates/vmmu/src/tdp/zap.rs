//! Zapping: removing entries so the next access faults again (KVM `tdp_mmu_zap_leafs`,
//! `kvm_tdp_mmu_zap_invalidated_roots`). Runs under the exclusive MMU lock (rule 1 of
//! [`crate::tdp`]); unlinked table pages are collected for freeing after a grace period (rule 3);
//! the caller flushes remote TLBs when a present leaf was removed or a table unlinked (rule 4).
//!
//! MMIO SPTEs inside a zapped range are cleared as well when their whole table goes, but a zap of
//! a partial range leaves MMIO SPTEs of other gfns alone: they are guarded by the memslot
//! generation, not by reachability (KVM's comment in `tdp_mmu_zap_leafs`).

use super::map::{LeafSpec, MapOutcome};
use super::range::entries_meeting;
use super::root::Root;
use super::{MmuWrite, RootList, Tdp};
use crate::fault::PageFault;
use crate::host::Host;
use crate::mmu_core::FlushNeed;
use crate::mmu_core::Unlinked;
use crate::spte::SpteFormat;
use crate::sync::{AtomicU64, Ordering};
use crate::types::{AsId, Gfn, Level, Pfn};

/// The page-size bit of a huge leaf (bit 7 in both EPT and NPT formats).
const BIT_LARGE: u64 = 1 << 7;
use alloc::vec::Vec;

/// What a range zap removes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ZapScope {
    /// Present leaves only; every table stays linked (KVM `tdp_mmu_zap_leafs`, what the MMU
    /// notifier's `kvm_unmap_gfn_range` does): a host invalidation changes what frames back the
    /// gfns, not which tables map them, and keeps the MMIO SPTEs of its range (they are guarded
    /// by the generation).
    Leaves,
    /// Leaves, MMIO SPTEs, and the tables entirely inside the range (unlinked, flushed, freed
    /// after a grace period): memslot delete and move, whose gfns may stay unmapped for long.
    /// Out of heap, a table the zap cannot list stays linked, emptied ([`OptionalUnlink`]).
    Tables,
    /// Leaves and MMIO SPTEs; every table stays linked: the zap of a whole root, or of a table
    /// a fault's huge leaf detached, whose tables go with it as one tree
    /// (`MmuCore::queue_tree`), so the zap lists nothing.
    Contents,
}

/// The table a fault's huge leaf replaced ([`Tdp::replace_table_in_the_way`]), with every table
/// it still links.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Detached {
    /// The detached table's frame.
    pub(crate) table: Pfn,
    /// Its level.
    pub(crate) level: Level,
    /// Whether the replacement needs a remote TLB flush (a present leaf went, or the link did,
    /// which paging-structure caches may hold).
    pub(crate) flush: bool,
}

/// Where a zap lists the tables it unlinks, to be freed after a grace period.
pub(crate) trait TableList {
    /// Lists `pfn`, a table the caller is about to unlink; `false` if it cannot, and then the
    /// caller leaves it linked (and every table above it: an unlinked table must take none of
    /// its tables with it unlisted).
    fn try_list(&mut self, pfn: Pfn) -> bool;
    /// How many tables this list refused so far.
    fn refused(&self) -> usize;
}

/// Every table listed: a zap that must unlink what it meets and promised the room beforehand
/// (the recovery of a huge page, `recover_in_table`).
impl TableList for Vec<Pfn> {
    fn try_list(&mut self, pfn: Pfn) -> bool {
        self.push(pfn);
        true
    }
    fn refused(&self) -> usize {
        0
    }
}

/// No list: for [`ZapScope::Contents`], which unlinks nothing.
struct NoList;

impl TableList for NoList {
    fn try_list(&mut self, _pfn: Pfn) -> bool {
        debug_assert!(false, "a zap of a whole tree's contents unlinks no table");
        false
    }
    fn refused(&self) -> usize {
        0
    }
}

/// A memslot range's zap, whose unlinking of the tables inside the range is optional (KVM's
/// own zaps the leaves alone, `kvm_tdp_mmu_unmap_gfn_range`): a table is listed only with room
/// promised in the list and the free queue ([`Unlinked::try_promise`]); out of heap, it stays
/// linked with its leaves zapped.
pub(crate) struct OptionalUnlink<'a, 'c, H: Host> {
    pages: &'a mut Unlinked<'c, H>,
    refused: usize,
    /// Promised room not used yet: promises are made [`Self::BATCH`] at a time (one lock of
    /// the free queue per batch), and what is left is given back when the list is queued.
    room: usize,
}

impl<'a, 'c, H: Host> OptionalUnlink<'a, 'c, H> {
    /// Tables promised at a time.
    const BATCH: usize = 64;

    pub(crate) fn new(pages: &'a mut Unlinked<'c, H>) -> Self {
        OptionalUnlink { pages, refused: 0, room: 0 }
    }
}

impl<H: Host> TableList for OptionalUnlink<'_, '_, H> {
    fn try_list(&mut self, pfn: Pfn) -> bool {
        if self.room == 0 {
            if self.pages.try_promise(Self::BATCH) {
                self.room = Self::BATCH;
            } else if self.pages.try_promise(1) {
                self.room = 1;
            } else {
                self.refused += 1;
                return false;
            }
        }
        self.room -= 1;
        self.pages.push(pfn);
        true
    }
    fn refused(&self) -> usize {
        self.refused
    }
}

impl<H: Host> Tdp<'_, H> {
    /// Zaps every leaf and MMIO SPTE under `root`, leaving its tables linked (they are freed
    /// with the root, `MmuCore::queue_tree`): needs no heap. Returns whether a flush is needed
    /// (a present leaf removed). `excl` proves the MMU lock is held exclusive.
    pub(crate) fn zap_root_contents(&self, excl: &MmuWrite<'_, RootList>, root: &Root) -> bool {
        self.zap_root(excl, root, ZapScope::Contents, &mut NoList)
    }

    /// Zaps everything under `root`, a root some vCPU still uses: its leaves, MMIO SPTEs and
    /// the tables it can list in `pages` with room promised ([`OptionalUnlink`]); out of heap, a
    /// table stays linked, emptied, and goes with the root when it retires. Returns whether a
    /// flush is needed (a present leaf removed, a table unlinked).
    pub(crate) fn zap_root_tables(
        &self,
        excl: &MmuWrite<'_, RootList>,
        root: &Root,
        pages: &mut OptionalUnlink<'_, '_, H>,
    ) -> bool {
        self.zap_root(excl, root, ZapScope::Tables, pages)
    }

    fn zap_root(
        &self,
        excl: &MmuWrite<'_, RootList>,
        root: &Root,
        scope: ZapScope,
        pages: &mut (impl TableList + ?Sized),
    ) -> bool {
        let end = Gfn(1u64 << (root.level().shift() + 9 - crate::types::PAGE_SHIFT));
        self.zap_table(excl, root.pfn(), root.level(), Gfn(0), Gfn(0), end, scope, pages)
    }

    /// Whether `root` has a present entry: a table linked, or a huge leaf. `_excl` proves the
    /// MMU lock is held exclusive.
    pub(crate) fn links_anything(&self, _excl: &MmuWrite<'_, RootList>, root: &Root) -> bool {
        // SAFETY: `_excl` holds the MMU lock exclusive and `root` was on the root list under
        // that hold (or just left it): nothing frees its page meanwhile.
        let Some(table) = (unsafe { self.table(root.pfn()) }) else {
            debug_assert!(false, "root frame {:?} unknown to the host", root.pfn());
            return false;
        };
        table.iter().any(|e| SpteFormat::is_mmu_present(e.load(Ordering::Acquire)))
    }

    /// Zaps entries for gfns in `[start, end)` under every root of address space `as_id` (valid or
    /// obsolete). Returns whether a flush is needed (a present leaf removed, a table unlinked).
    /// `roots` proves the MMU lock is held exclusive.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn zap_gfn_range_locked(
        &self,
        roots: &MmuWrite<'_, RootList>,
        as_id: AsId,
        start: Gfn,
        end: Gfn,
        scope: ZapScope,
        pages: &mut (impl TableList + ?Sized),
    ) -> bool {
        let mut flush = false;
        for r in roots.iter().filter(|r| r.as_id() == as_id) {
            flush |= self.zap_table(roots, r.pfn(), r.level(), Gfn(0), start, end, scope, pages);
        }
        flush
    }

    /// Zaps `[start, end)` and flushes remote TLBs if needed; frees unlinked tables after a grace
    /// period. The memslot delete/move flush hook uses it. Needs no heap: out of heap, the
    /// tables inside the range stay linked, emptied ([`OptionalUnlink`]).
    pub(crate) fn zap_gfn_range(&self, as_id: AsId, start: Gfn, end: Gfn) {
        self.stats.zap_range.add(1);
        let mut pages = self.unlinked();
        let roots = self.tdp.mmu_lock.write(&self.vcpus, &self.relax());
        let mut list = OptionalUnlink::new(&mut pages);
        let flush =
            self.zap_gfn_range_locked(&roots, as_id, start, end, ZapScope::Tables, &mut list);
        self.flush_after_zap(flush);
        drop(roots);
        pages.queue();
        self.reclaim();
    }

    /// KVM `kvm_mmu_recover_huge_pages` when dirty logging stops on a slot covering
    /// `[start, end)` of `as_id` (KVM v6.13 and later, `recover_huge_pages_range`): every table
    /// linked below a huge-leaf level whose whole block lies in the range, and that
    /// `huge_ok(block start, level)` says one leaf could map (the slot's alignment, the host's
    /// mapping now), is replaced in place by one huge leaf made from the first present leaf
    /// under it (KVM `make_huge_spte`: its rights and attributes, its frame aligned down); a
    /// table with no present leaf stays. The mapping stays present, so an access after logging
    /// stops does not fault. Flushes remote TLBs if a table went; frees the tables after a
    /// grace period.
    pub(crate) fn recover_huge_pages(
        &self,
        as_id: AsId,
        start: Gfn,
        end: Gfn,
        huge_ok: &dyn Fn(Gfn, Level) -> bool,
    ) {
        let mut pages = self.unlinked();
        let roots = self.tdp.mmu_lock.write(&self.vcpus, &self.relax());
        let mut flush = false;
        for r in roots.iter().filter(|r| r.as_id() == as_id) {
            let range = (start, end);
            flush |= self.recover_in_table(
                &roots,
                r.pfn(),
                r.level(),
                Gfn(0),
                range,
                huge_ok,
                &mut pages,
            );
        }
        self.flush_after_zap(flush);
        drop(roots);
        pages.queue();
        self.reclaim();
    }

    /// [`Self::recover_huge_pages`] in table `pfn` (at `level`, covering gfns from `base`).
    #[allow(clippy::too_many_arguments)]
    fn recover_in_table(
        &self,
        excl: &MmuWrite<'_, RootList>,
        pfn: Pfn,
        level: Level,
        base: Gfn,
        (start, end): (Gfn, Gfn),
        huge_ok: &dyn Fn(Gfn, Level) -> bool,
        pages: &mut Unlinked<'_, H>,
    ) -> bool {
        // SAFETY: `excl` holds the MMU lock exclusive and we reached `pfn` from a root on the
        // list; nothing frees a linked page.
        let Some(table) = (unsafe { self.table(pfn) }) else {
            debug_assert!(false, "table frame {pfn:?} unknown to the host");
            return false;
        };
        let Some(lower) = level.lower() else {
            return false;
        };
        let fmt = self.cfg.format;
        let span = level.pages();
        let mut flush = false;
        for e in entries_meeting(table, level, base, start, end) {
            let (entry, lo) = (e.entry, e.lo);
            let old = entry.load(Ordering::Acquire);
            if !SpteFormat::is_mmu_present(old) || fmt.is_leaf(old, level) {
                continue;
            }
            let child = fmt.pfn(old);
            if !(e.inside(start, end) && level <= fmt.max_leaf_level() && huge_ok(lo, level)) {
                flush |=
                    self.recover_in_table(excl, child, lower, lo, (start, end), huge_ok, pages);
                continue;
            }
            // A host invalidation in flight over the block zapped what it maps there, and
            // faults there retry until it ends: a huge leaf made now from the leaves around
            // that range would map it again. Begins and ends take this lock exclusive, so the
            // in-flight range cannot change under this hold. (A memslot update does not keep
            // invalidations out past its first publication, as KVM's does not.)
            if self.inval.retry_range(self.inval.seq(), lo, Gfn(lo.raw() + span)) {
                flush |=
                    self.recover_in_table(excl, child, lower, lo, (start, end), huge_ok, pages);
                continue;
            }
            let Some((small, offset)) = self.first_present_leaf(excl, child, lower) else {
                continue; // nothing to make the huge leaf from (KVM: -ENOENT, skipped)
            };
            // KVM builds the huge leaf from the first leaf's frame rounded down to the block,
            // trusting the host's page tables. The host's `mapping_level` is its promise that
            // the block is backed by aligned contiguous frames; a host that breaks it must not
            // get the guest mapped onto frames it never named, so every present leaf below must
            // map its page's place in one aligned block (else the lower levels are tried).
            let first = fmt.pfn(small).raw().wrapping_sub(offset);
            if first & (span - 1) != 0 || !self.leaves_at_place(excl, child, lower, first) {
                flush |=
                    self.recover_in_table(excl, child, lower, lo, (start, end), huge_ok, pages);
                continue;
            }
            // Recovery is optional work, which KVM skips where it cannot do it: out of heap for
            // the list of the tables it would detach (the child, and below a 1 GiB block up to
            // 512 more), the block stays mapped by its small leaves.
            let below = if lower > Level::L4K { 512 } else { 0 };
            if !pages.try_promise(1 + below) {
                continue;
            }
            let frame = Pfn(first);
            let huge = (small & !fmt.addr_mask()) | BIT_LARGE | (frame.hpa() & fmt.addr_mask());
            // The huge leaf first, then the detached table's entries (KVM `handle_removed_pt`).
            let swap = self.set_spte_locked(excl, entry, old, huge, level, lo);
            flush |= swap == FlushNeed::Remote;
            // Listed in full: the promise above covers the detached table and its tables.
            let list: &mut Vec<Pfn> = pages;
            flush |= self.zap_table(excl, child, lower, lo, lo, e.hi, ZapScope::Tables, list);
            self.stats.tdp_tables_zapped.add(1);
            list.push(child);
        }
        flush
    }

    /// A fault's huge leaf in place of the lower table linked where it goes (after
    /// [`MapOutcome::TableInTheWay`]; KVM `kvm_tdp_mmu_map` at the target level, then
    /// `handle_removed_pt`): walks from `root` to the entry of `fault.gfn` at `spec`'s level; if
    /// a table is still linked there, stores the huge leaf over the link and zaps the leaves and
    /// MMIO SPTEs below the detached table ([`ZapScope::Contents`]: its own tables stay linked
    /// below it, so the zap lists nothing). Returns the outcome and, when it replaced a table,
    /// the [`Detached`] table: the caller flushes remote TLBs under the same hold if needed, then
    /// queues the table as a tree (`MmuCore::queue_tree`), to be freed after a grace period.
    /// `Retry` if the entry changed meanwhile (the fault then maps as usual). `excl` proves the
    /// MMU lock is held exclusive; the caller checked under that hold that the fault is not
    /// stale.
    pub(crate) fn replace_table_in_the_way(
        &self,
        excl: &MmuWrite<'_, RootList>,
        root: &Root,
        fault: &PageFault,
        spec: LeafSpec,
    ) -> (MapOutcome, Option<Detached>) {
        let LeafSpec::Ram { base_pfn, max_level, access, writable, kind } = spec else {
            return (MapOutcome::Retry, None); // MMIO SPTEs are 4 KiB: never in this case
        };
        let fmt = self.cfg.format;
        let (mut pfn, mut level) = (root.pfn(), root.level());
        let (entry, old) = loop {
            // SAFETY: `excl` holds the MMU lock exclusive and we walk from a root the vCPU holds; nothing
            // frees a linked page meanwhile.
            let Some(table) = (unsafe { self.table(pfn) }) else {
                debug_assert!(false, "table frame {pfn:?} unknown to the host");
                return (MapOutcome::Broken, None);
            };
            let entry = &table[level.index(fault.gfn)];
            let old = entry.load(Ordering::Acquire);
            if !SpteFormat::is_mmu_present(old) || fmt.is_leaf(old, level) {
                return (MapOutcome::Retry, None);
            }
            if level == max_level {
                break (entry, old);
            }
            pfn = fmt.pfn(old);
            level = match level.lower() {
                Some(l) if l >= max_level => l,
                _ => return (MapOutcome::Retry, None),
            };
        };
        let Some(lower) = level.lower() else {
            return (MapOutcome::Broken, None);
        };
        let child = fmt.pfn(old);
        let lo = level.block_base(fault.gfn);
        let hi = Gfn(lo.raw() + level.pages());
        let huge = fmt.make_frame_leaf(base_pfn, kind, level, access, writable);
        // The huge leaf first, then the detached table's entries (KVM `handle_removed_pt`).
        let mut flush =
            self.set_spte_locked(excl, entry, old, huge, level, lo) == FlushNeed::Remote;
        flush |= self.zap_table(excl, child, lower, lo, lo, hi, ZapScope::Contents, &mut NoList);
        // The detached table; those below it are counted when the reclaimer frees them.
        self.stats.tdp_tables_zapped.add(1);
        (MapOutcome::Installed { level }, Some(Detached { table: child, level: lower, flush }))
    }

    /// The first present leaf in the table `pfn` (at `level`) or below it, and how many pages
    /// into the table's range it maps.
    fn first_present_leaf(
        &self,
        _excl: &MmuWrite<'_, RootList>,
        pfn: Pfn,
        level: Level,
    ) -> Option<(u64, u64)> {
        // SAFETY: `excl` holds the MMU lock exclusive and reached `pfn` through a
        // linked entry; nothing frees a linked page.
        let table = unsafe { self.table(pfn) }?;
        let fmt = self.cfg.format;
        table.iter().enumerate().find_map(|(i, e)| {
            let spte = e.load(Ordering::Acquire);
            let at = i as u64 * level.pages();
            if !SpteFormat::is_mmu_present(spte) {
                None
            } else if fmt.is_leaf(spte, level) {
                Some((spte, at))
            } else {
                let (leaf, below) =
                    self.first_present_leaf(_excl, fmt.pfn(spte), level.lower()?)?;
                Some((leaf, at + below))
            }
        })
    }

    /// Whether every present leaf under table `pfn` (at `level`) maps the frame at its page's
    /// place in the run of frames from `first`: the leaf `i` pages into the table's range maps
    /// `first + i`. `_excl` proves the MMU lock is held exclusive.
    fn leaves_at_place(
        &self,
        _excl: &MmuWrite<'_, RootList>,
        pfn: Pfn,
        level: Level,
        first: u64,
    ) -> bool {
        // SAFETY: as in `first_present_leaf`.
        let Some(table) = (unsafe { self.table(pfn) }) else { return false };
        let fmt = self.cfg.format;
        table.iter().enumerate().all(|(i, e)| {
            let spte = e.load(Ordering::Acquire);
            let at = first + i as u64 * level.pages();
            if !SpteFormat::is_mmu_present(spte) {
                true
            } else if fmt.is_leaf(spte, level) {
                fmt.pfn(spte).raw() == at
            } else {
                level.lower().is_some_and(|l| self.leaves_at_place(_excl, fmt.pfn(spte), l, at))
            }
        })
    }

    /// Zaps the entries of table `pfn` (at `level`, covering gfns from `base`) that meet
    /// `[start, end)`. With [`ZapScope::Tables`], tables entirely inside the range are unlinked
    /// and their pages collected.
    #[allow(clippy::too_many_arguments)]
    fn zap_table(
        &self,
        excl: &MmuWrite<'_, RootList>,
        pfn: Pfn,
        level: Level,
        base: Gfn,
        start: Gfn,
        end: Gfn,
        scope: ZapScope,
        pages: &mut (impl TableList + ?Sized),
    ) -> bool {
        // SAFETY: `excl` holds the MMU lock exclusive and we reached `pfn` from a root on the
        // list or being retired; nothing frees a linked page.
        let Some(table) = (unsafe { self.table(pfn) }) else {
            debug_assert!(false, "table frame {pfn:?} unknown to the host");
            return false;
        };
        let mut flush = false;
        for e in entries_meeting(table, level, base, start, end) {
            let whole = e.inside(start, end) && scope != ZapScope::Leaves;
            flush |= self.zap_entry(excl, e.entry, level, e.lo, whole, start, end, scope, pages);
        }
        flush
    }

    #[allow(clippy::too_many_arguments)]
    fn zap_entry(
        &self,
        excl: &MmuWrite<'_, RootList>,
        entry: &AtomicU64,
        level: Level,
        lo: Gfn,
        whole: bool,
        start: Gfn,
        end: Gfn,
        scope: ZapScope,
        pages: &mut (impl TableList + ?Sized),
    ) -> bool {
        let fmt = self.cfg.format;
        let old = entry.load(Ordering::Acquire);
        if !SpteFormat::is_mmu_present(old) {
            if whole && old != SpteFormat::NONPRESENT && !SpteFormat::is_frozen(old) {
                // An MMIO SPTE inside the range: clear it too (harmless, keeps tables tidy).
                let none =
                    self.set_spte_locked(excl, entry, old, SpteFormat::NONPRESENT, level, lo);
                debug_assert_eq!(none, FlushNeed::NotNeeded, "an MMIO SPTE is never cached");
            }
            return false;
        }
        if fmt.is_leaf(old, level) {
            // A huge leaf only partly in range is zapped whole: the next fault remaps what stays.
            let flush = self.set_spte_locked(excl, entry, old, SpteFormat::NONPRESENT, level, lo);
            return flush == FlushNeed::Remote;
        }
        let child = fmt.pfn(old);
        let Some(lower) = level.lower() else {
            return false;
        };
        let refused = pages.refused();
        let mut flush = self.zap_table(excl, child, lower, lo, start, end, scope, pages);
        // Unlinked only if every table below went, and it can be listed.
        let unlink = whole && scope == ZapScope::Tables;
        if unlink && pages.refused() == refused && pages.try_list(child) {
            // Unlinking the table: a flush even if nothing below was present, for the
            // paging-structure caches that may hold the link (`mmu_core/change.rs`).
            let unlink = self.set_spte_locked(excl, entry, old, SpteFormat::NONPRESENT, level, lo);
            flush |= unlink == FlushNeed::Remote;
            self.stats.tdp_tables_zapped.add(1);
        }
        flush
    }
}
