//! Dirty logging in the TDP MMU (KVM `kvm_tdp_mmu_clear_dirty_pt_masked` in its write-protect
//! form, `kvm_mmu_write_protect_pt_masked`): taking the write right away from the leaves that
//! map the pages a collection took, under the exclusive MMU lock, through the one SPTE-change
//! function (`mmu_core/change.rs`), so the flush decision is the usual one.
//!
//! The other half, a write fault marking its page before the shared MMU lock is released, is in
//! the fault path (`vcpu/fault_path.rs`); the contract joining them is in [`crate::dirty`].
//!
//! The split of a huge leaf into a table of its children (`split_huge_leaf`, with the rights
//! [`SplitRights`] says) lives here and also serves the fault path's split of a huge leaf that
//! does not serve its access (`map.rs`), under the shared lock.

use super::range::{entries_meeting, EntryInRange};
use super::{MmuWrite, RootList, Tdp};
use crate::dirty::WriteProtect;
use crate::host::Host;
use crate::memslot::Memslot;
use crate::mmu_core::FlushNeed;
use crate::mmu_core::MmuCore;
use crate::spte::SpteFormat;
use crate::stats::StripeKey;
use crate::sync::Ordering;
use crate::types::{AsId, Gfn, Level, Pfn};

/// The write bit (bit 1 in both EPT and NPT leaves).
const BIT_W: u64 = 1 << 1;
/// The page-size bit of a huge leaf (bit 7 in both formats; PAT in an NPT 4 KiB leaf, which the
/// MMU never sets).
const BIT_LARGE: u64 = 1 << 7;

/// The bits `[a, b)` of a 64-bit mask (`a < b <= 64`).
fn bits(a: u64, b: u64) -> u64 {
    let ones = if b - a == 64 { u64::MAX } else { (1u64 << (b - a)) - 1 };
    ones << a
}

/// The pages a write-protect walk takes the write right from: a gfn range (logging starts on a
/// slot), or the set bits of a 64-page mask (a collection).
#[derive(Clone, Copy)]
enum Pages {
    /// Every gfn in `[start, end)`.
    Range { start: Gfn, end: Gfn },
    /// The gfn `start + i` for every set bit `i` of `mask`.
    Masked { start: Gfn, mask: u64 },
}

impl Pages {
    /// The gfns the set lies within, `[start, end)`.
    fn bounds(self) -> (Gfn, Gfn) {
        match self {
            Pages::Range { start, end } => (start, end),
            Pages::Masked { start, .. } => (start, Gfn(start.raw() + 64)),
        }
    }

    /// The rights the children of a huge leaf the set meets get. A logging start takes the
    /// write right from every page of the range, so the children lose it as they are made (KVM
    /// splits with the parent's rights and then protects the range: the same end). A
    /// collection protects only its mask's pages: the other children keep the parent's rights,
    /// as KVM's split (`kvm_arch_mmu_enable_log_dirty_pt_masked`) leaves them, so a write to a
    /// page whose bit is still set does not fault.
    fn split_rights(self) -> SplitRights {
        match self {
            Pages::Range { .. } => SplitRights::WriteProtected,
            Pages::Masked { .. } => SplitRights::Parent,
        }
    }

    /// Whether a page of the set lies in `[lo, hi)`, a range that meets [`Self::bounds`].
    fn meets(self, lo: Gfn, hi: Gfn) -> bool {
        match self {
            Pages::Range { .. } => true,
            Pages::Masked { start, mask } => {
                let a = lo.raw().max(start.raw()) - start.raw();
                let b = hi.raw().min(start.raw() + 64) - start.raw();
                mask & bits(a, b) != 0
            }
        }
    }
}

impl<H: Host> Tdp<'_, H> {
    /// Removes the write right from the leaves under table `pfn` (at `level`, from gfn `base`)
    /// that map a page of `pages`: one walk down per call, not one per page (KVM
    /// `kvm_tdp_mmu_clear_dirty_pt_masked` iterates a collection's 64 pages the same way). A
    /// huge leaf the set meets is split, and the leaves of the set's pages lose the write right
    /// (the others keep the parent's rights, [`Pages::split_rights`]): for a collection, one that
    /// "initially set" logging left in place or whose split failed when logging started (KVM
    /// `kvm_arch_mmu_enable_log_dirty_pt_masked`: eager split, then write protection of the huge
    /// pages holding the first and last page of the mask, which may be two); for a logging
    /// start, KVM's eager split. Reads keep hitting and a write to a protected page faults and
    /// is logged at 4 KiB; where no table page can be had the huge leaf is write-protected whole
    /// and a write fault splits it later (`map.rs`). `excl` proves the MMU lock is held
    /// exclusive. Returns whether remote TLBs must be flushed.
    fn write_protect_table(
        &self,
        excl: &MmuWrite<'_, RootList>,
        pfn: Pfn,
        level: Level,
        base: Gfn,
        pages: Pages,
    ) -> bool {
        // SAFETY: `excl` holds the MMU lock exclusive and we reached `pfn` from a root on the
        // list; nothing frees a linked page meanwhile.
        let Some(table) = (unsafe { self.table(pfn) }) else {
            debug_assert!(false, "table frame {pfn:?} unknown to the host");
            return false;
        };
        let fmt = self.cfg.format;
        let (start, end) = pages.bounds();
        let mut flush = false;
        for EntryInRange { entry, lo, hi } in entries_meeting(table, level, base, start, end) {
            if !pages.meets(lo, hi) {
                continue; // no page of the set under this entry
            }
            let old = entry.load(Ordering::Acquire);
            if !SpteFormat::is_mmu_present(old) {
                continue;
            }
            if fmt.is_leaf(old, level) {
                let rights = pages.split_rights();
                if let Some((need, child, lower)) =
                    self.split_in_place(excl, entry, old, level, lo, rights)
                {
                    flush |= need;
                    if lower > Level::L4K || rights == SplitRights::Parent {
                        // A 1 GiB leaf split into 2 MiB leaves: split those the set meets; a
                        // collection's split kept the rights: protect the set's pages in it.
                        flush |= self.write_protect_table(excl, child, lower, lo, pages);
                    }
                } else if fmt.is_writable(old) {
                    let need = self.set_spte_locked(excl, entry, old, old & !BIT_W, level, lo);
                    flush |= need == FlushNeed::Remote;
                }
            } else if let Some(lower) = level.lower() {
                flush |= self.write_protect_table(excl, fmt.pfn(old), lower, lo, pages);
            }
        }
        flush
    }
}

impl<H: Host> Tdp<'_, H> {
    /// KVM `kvm_mmu_slot_apply_flags` when dirty logging starts on a slot, with KVM's default
    /// `eager_page_split`: every huge leaf meeting `[start, end)` of `as_id` is split into 4 KiB
    /// leaves (`kvm_mmu_slot_try_split_huge_pages`), and every leaf mapping a gfn in the range
    /// loses its write right (`kvm_mmu_slot_remove_write_access`); remote TLBs are flushed
    /// before this returns if a leaf changed. Mappings stay present, so reads do not fault (and
    /// do not dirty pages, as in KVM). Where no table page can be had, the huge leaf is
    /// write-protected whole (KVM's split is best effort too); a write fault under it splits it
    /// then into children with its rights (`map.rs`), so its other pages stay mapped read-only.
    pub(crate) fn write_protect_gfn_range(&self, as_id: AsId, start: Gfn, end: Gfn) {
        let roots = self.tdp.mmu_lock.write(&self.vcpus, &self.relax());
        let mut flush = false;
        for r in roots.iter().filter(|r| r.as_id() == as_id) {
            let pages = Pages::Range { start, end };
            flush |= self.write_protect_table(&roots, r.pfn(), r.level(), Gfn(0), pages);
        }
        if flush {
            self.flush_remote_tlbs();
        }
    }
}

impl<H: Host> Tdp<'_, H> {
    /// Replaces the huge leaf `old` in `entry` (at `level`, mapping the block at `base`) by a
    /// table of its children with `rights` ([`Self::split_huge_leaf`]). Returns whether remote TLBs
    /// must be flushed (a present leaf was replaced), the table and its level; `None` for a
    /// 4 KiB leaf or when no table page can be had. `excl` proves the MMU lock is held
    /// exclusive.
    fn split_in_place(
        &self,
        excl: &MmuWrite<'_, RootList>,
        entry: &crate::sync::AtomicU64,
        old: u64,
        level: Level,
        base: Gfn,
        rights: SplitRights,
    ) -> Option<(bool, Pfn, Level)> {
        let (child, lower) = self.split_huge_leaf(old, level, base, rights)?;
        let link = self.cfg.format.make_nonleaf(child);
        let need = self.set_spte_locked(excl, entry, old, link, level, base);
        Some((need == FlushNeed::Remote, child, lower))
    }

    /// KVM `make_huge_page_split_spte` for every child: a new, unpublished table at the level
    /// below `level` whose 512 leaves map the frames of the huge leaf `old` (which maps the
    /// block at `base`) with the rights `rights` says, counted in the leaf counters. `None` for
    /// a 4 KiB leaf or when no table page can be had. The caller links the table in place of
    /// `old`, or gives it back with [`Self::discard_split`] if it cannot.
    pub(crate) fn split_huge_leaf(
        &self,
        old: u64,
        level: Level,
        base: Gfn,
        rights: SplitRights,
    ) -> Option<(Pfn, Level)> {
        let lower = level.lower().filter(|_| level > Level::L4K)?;
        let fmt = self.cfg.format;
        let child = self.alloc_table()?;
        // SAFETY: we allocated `child` and have not published it: no other thread can reach it.
        let Some(table) = (unsafe { self.table(child) }) else {
            debug_assert!(false, "table frame {child:?} unknown to the host");
            self.free_unpublished_table(child);
            return None;
        };
        let attrs = match rights {
            SplitRights::WriteProtected => old & !fmt.addr_mask() & !BIT_W,
            SplitRights::Parent => old & !fmt.addr_mask(),
        };
        let attrs = if lower == Level::L4K { attrs & !BIT_LARGE } else { attrs };
        let first = fmt.pfn(old).raw();
        for (i, entry) in table.iter().enumerate() {
            let frame = Pfn(first + i as u64 * lower.pages());
            let spte = attrs | (frame.hpa() & fmt.addr_mask());
            // The link's Release store publishes these. Release here too: the page may be a
            // reused frame that a type-stable leaf-cache hit reads without a section, and every
            // store into table memory after a free must be Release (`mmu_core/walk.rs`).
            entry.store(spte, Ordering::Release);
        }
        self.account_split(table, lower, base, 1);
        Some((child, lower))
    }

    /// Gives back a table [`Self::split_huge_leaf`] made and nobody linked (a compare-and-swap
    /// lost): its leaves leave the counters and the page is freed.
    pub(crate) fn discard_split(&self, child: Pfn, lower: Level, base: Gfn) {
        // SAFETY: the caller made `child` and never published it: no other thread can reach it.
        if let Some(table) = unsafe { self.table(child) } {
            self.account_split(table, lower, base, -1);
        }
        self.free_unpublished_table(child);
    }

    /// Adds `delta` per leaf of a split table (at `lower`, mapping the block at `base`) to the
    /// leaf counters: 2 MiB children of a 1 GiB leaf each in the stripe of its own block, the
    /// 512 children of a 2 MiB leaf in their block's stripe, one update for all.
    fn account_split(
        &self,
        table: &crate::host::TableEntries,
        lower: Level,
        base: Gfn,
        delta: i64,
    ) {
        if lower > Level::L4K {
            for (i, entry) in table.iter().enumerate() {
                let gfn = base.raw() + i as u64 * lower.pages();
                self.account_leaf(entry.load(Ordering::Acquire), lower, StripeKey::Gfn(gfn), delta);
            }
        } else {
            let spte = table[0].load(Ordering::Acquire);
            let n = table.len() as i64 * delta;
            self.account_leaf(spte, lower, StripeKey::Gfn(base.raw()), n);
        }
    }
}

/// The rights the children of a split huge leaf get.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum SplitRights {
    /// The parent's without the write right (dirty logging: a write faults and is logged at
    /// 4 KiB).
    WriteProtected,
    /// Exactly the parent's (KVM `make_huge_page_split_spte`): every child translates as the
    /// parent did, so the split itself changes no translation.
    Parent,
}

impl<H: Host> WriteProtect for Tdp<'_, H> {
    type Exclusive<'a>
        = MmuWrite<'a, RootList>
    where
        Self: 'a;

    fn lock_exclusive(&self) -> MmuWrite<'_, RootList> {
        self.tdp.mmu_lock.write(&self.vcpus, &self.relax())
    }

    fn write_protect_masked(
        &self,
        excl: &MmuWrite<'_, RootList>,
        slot: &Memslot,
        offset: u64,
        mask: u64,
    ) -> bool {
        // Pages past the slot's end are not the slot's: drop their bits. The collections pass
        // none (a slot's bitmap has no bits past its end), so this only keeps a caller's slip
        // from reaching the next slot's leaves.
        let in_slot = match slot.npages().saturating_sub(offset) {
            0 => 0,
            n if n >= 64 => mask,
            n => mask & bits(0, n),
        };
        debug_assert_eq!(in_slot, mask, "a mask with pages past the slot's end");
        let start = crate::dirty::gfn_of(slot, offset);
        let mut flush = false;
        if in_slot != 0 {
            for r in excl.iter().filter(|r| r.as_id() == slot.as_id()) {
                let pages = Pages::Masked { start, mask: in_slot };
                flush |= self.write_protect_table(excl, r.pfn(), r.level(), Gfn(0), pages);
            }
        }
        self.stats.dirty_log_protected.add(mask.count_ones() as u64);
        flush
    }

    fn flush_remote_tlbs(&self) {
        MmuCore::flush_remote_tlbs(self);
    }

    fn skip_flush(&self) -> bool {
        self.cfg.bugs.has(crate::bugs::Bug::DirtyLogNoFlush)
    }
}
