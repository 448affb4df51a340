//! The one place an SPTE changes (KVM `tdp_mmu_set_spte_atomic` / `tdp_mmu_iter_set_spte` and
//! `handle_changed_spte`): the exchange, the leaf accounting, and the TLB-flush decision.
//!
//! Invariant: no present leaf is dropped or changed, and no table is unlinked, without the caller
//! learning that vCPUs may still translate through the old value ([`FlushNeed::Remote`]): a TLB
//! caches leaves, and the hardware's paging-structure caches keep the entries that link tables
//! (Intel SDM vol. 3 §4.10.3, §28.4), so a CPU may walk an unlinked table, even one holding only
//! MMIO SPTEs or nothing, until it is flushed. KVM flushes on every zap of a shadow-present SPTE,
//! leaf or not, for this reason. A fault that replaced a present
//! leaf flushes before it returns; a zap collects the need and flushes once for its whole range
//! (rule 4 of [`crate::tdp`]). This is what keeps a vCPU from using a frame after the entry that
//! mapped it was overwritten (issue 11, defect 1: a stale "MMIO" decision used to overwrite a RAM
//! leaf another vCPU had in its TLB, and the later delete of the slot found nothing to flush).

use crate::host::Host;
use crate::mmu_core::MmuCore;
use crate::spte::SpteFormat;
use crate::stats::StripeKey;
use crate::sync::{AtomicU64, Ordering};
use crate::types::{Gfn, Level};

/// What an SPTE change requires before the changed mapping can be relied on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[must_use = "a changed present leaf needs a remote TLB flush"]
pub(crate) enum FlushNeed {
    /// No vCPU can hold a translation the change invalidates.
    NotNeeded,
    /// A present leaf was dropped or changed: vCPUs may cache it; flush remote TLBs.
    Remote,
}

impl<H: Host> MmuCore<H> {
    /// Replaces `old` by `new` in `entry` with compare-and-swap, under the shared MMU lock (a
    /// fault of the vCPU `who` names). `Err(())` if the entry no longer holds `old` (another vCPU
    /// or a zap won: retry).
    #[inline]
    pub(crate) fn set_spte_atomic(
        &self,
        entry: &AtomicU64,
        old: u64,
        new: u64,
        level: Level,
        who: StripeKey,
    ) -> Result<FlushNeed, ()> {
        // AcqRel: Release publishes a linked table's initialised entries to walkers that Acquire
        // the link (rule 5); Acquire orders this change after the value it replaced.
        entry.compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire).map_err(|_| ())?;
        Ok(self.handle_changed_spte(old, new, level, who))
    }

    /// Stores `new` over `old` in `entry`; `_excl` proves that nothing else changes entries
    /// meanwhile (the TDP MMU's lock held exclusive, or the shadow MMU's state).
    #[inline]
    pub(crate) fn set_spte_locked(
        &self,
        _excl: &impl super::TablesExclusive,
        entry: &AtomicU64,
        old: u64,
        new: u64,
        level: Level,
        gfn: Gfn,
    ) -> FlushNeed {
        entry.store(new, Ordering::Release);
        self.handle_changed_spte(old, new, level, StripeKey::Gfn(gfn.raw()))
    }

    /// Accounting (in the counters' stripe `who`) and the flush decision for a change, already
    /// made, of an entry at `level` from `old` to `new`.
    fn handle_changed_spte(&self, old: u64, new: u64, level: Level, who: StripeKey) -> FlushNeed {
        if old == new {
            return FlushNeed::NotNeeded;
        }
        let fmt = self.cfg.format;
        let was_leaf = SpteFormat::is_mmu_present(old) && fmt.is_leaf(old, level);
        let is_leaf = SpteFormat::is_mmu_present(new) && fmt.is_leaf(new, level);
        // A leaf that stays a leaf (a right taken or given, A/D bits, a new frame) leaves the
        // count of its level as it is: no pair of atomic updates that cancel.
        if was_leaf && !is_leaf {
            self.account_leaf(old, level, who, -1);
        } else if is_leaf && !was_leaf {
            self.account_leaf(new, level, who, 1);
        }
        if SpteFormat::is_mmu_present(old) && !was_leaf {
            // A table link went or changed (unlinked or replaced). The epoch bump comes after the
            // store, so a leaf-table cache fill that sees it walks after the change (`walk.rs`);
            // paging-structure caches may hold the link, so a flush is needed (module doc).
            self.table_epoch.fetch_add(1, Ordering::Release);
            if self.cfg.bugs.has(crate::bugs::Bug::NoFlushOnTableUnlink) {
                return FlushNeed::NotNeeded;
            }
            return FlushNeed::Remote;
        }
        if !was_leaf {
            // A non-present entry or an MMIO SPTE (which the hardware never caches): filling a
            // hole or linking a table invalidates nothing a TLB or paging-structure cache holds.
            return FlushNeed::NotNeeded;
        }
        // The leaf went, its frame changed, or a bit it had was cleared (write, user, EPT's
        // exec, accessed/dirty): a superset of KVM's `leaf_spte_change_needs_tlb_flush`, which
        // looks at the write right only. x86's NX takes exec away by being set, which this does
        // not look at, as KVM does not: a guest that takes a right away from its own PTE
        // invalidates its TLB itself (INVLPG, a CR3 load). A leaf that only gained rights maps
        // the same frame: a stale TLB entry just faults again.
        if !is_leaf || fmt.pfn(old) != fmt.pfn(new) || (old & !new) != 0 {
            FlushNeed::Remote
        } else {
            FlushNeed::NotNeeded
        }
    }

    /// Keeps `pages_4k/2m/1g` in step with present leaves.
    pub(crate) fn account_leaf(&self, spte: u64, level: Level, who: StripeKey, delta: i64) {
        if !SpteFormat::is_mmu_present(spte) || !self.cfg.format.is_leaf(spte, level) {
            return;
        }
        let c = match level.get() {
            1 => &self.stats.pages_4k,
            2 => &self.stats.pages_2m,
            _ => &self.stats.pages_1g,
        };
        if delta > 0 {
            c.add_at(who, delta as u64);
        } else {
            c.sub_at(who, (-delta) as u64);
        }
    }
}
