//! Dirty logging in the TDP MMU (KVM `kvm_tdp_mmu_clear_dirty_pt_masked` in its write-protect
//! form, `kvm_mmu_write_protect_pt_masked`): taking the write right away from the leaves that
//! map the pages a collection took, under the exclusive MMU lock, through the one SPTE-change
//! function (`change.rs`), so the flush decision is the usual one.
//!
//! The other half, a write fault marking its page before the shared MMU lock is released, is in
//! the fault path (`vcpu/fault_path.rs`); the contract joining them is in [`crate::dirty`].

use super::change::FlushNeed;
use super::{MmuWrite, TdpMmu};
use crate::dirty::WriteProtect;
use crate::host::Host;
use crate::memslot::Memslot;
use crate::spte::SpteFormat;
use crate::sync::Ordering;
use crate::types::{AsId, Gfn, Level, Pfn};

/// The write bit (bit 1 in both EPT and NPT leaves).
const BIT_W: u64 = 1 << 1;

impl<H: Host> TdpMmu<H> {
    /// Removes the write right from the leaf mapping `gfn` under every root of the slot's
    /// address space. Returns whether a present leaf lost it.
    fn write_protect_gfn(&self, roots: &MmuWrite<'_>, slot: &Memslot, gfn: Gfn) -> bool {
        let fmt = self.cfg.format;
        let mut flush = false;
        for r in roots.iter().filter(|r| r.as_id() == slot.as_id()) {
            let (mut pfn, mut level) = (r.pfn(), r.level());
            loop {
                // SAFETY: we hold the MMU lock exclusive and reached `pfn` from a root on the
                // list; nothing frees a linked page meanwhile.
                let Some(table) = (unsafe { self.table(pfn) }) else {
                    debug_assert!(false, "table frame {pfn:?} unknown to the host");
                    break;
                };
                let entry = &table[level.index(gfn)];
                let old = entry.load(Ordering::Acquire);
                if !SpteFormat::is_mmu_present(old) {
                    break;
                }
                if fmt.is_leaf(old, level) {
                    if fmt.is_writable(old) {
                        // A huge leaf (mapped before logging began, or racing its start) is
                        // write-protected whole; a write fault then maps the page at 4 KiB.
                        let base = Gfn(gfn.raw() & !(level.pages() - 1));
                        let need = self.set_spte_locked(entry, old, old & !BIT_W, level, base);
                        flush |= need == FlushNeed::Remote;
                    }
                    break;
                }
                pfn = fmt.pfn(old);
                level = match level.lower() {
                    Some(l) => l,
                    None => break,
                };
            }
        }
        flush
    }
}

impl<H: Host> TdpMmu<H> {
    /// KVM `kvm_mmu_slot_remove_write_access` when dirty logging starts on a slot: every leaf
    /// mapping a gfn in `[start, end)` of `as_id` loses its write right (huge leaves whole: a
    /// write fault then maps 4 KiB), and remote TLBs are flushed before this returns if one did.
    /// Mappings stay present, so reads do not fault (and do not dirty pages, as in KVM).
    pub(crate) fn write_protect_gfn_range(&self, as_id: AsId, start: Gfn, end: Gfn) {
        let roots = self.mmu_lock.write(&self.vcpus, &self.relax());
        let mut flush = false;
        for r in roots.iter().filter(|r| r.as_id() == as_id) {
            flush |= self.write_protect_table(r.pfn(), r.level(), Gfn(0), start, end);
        }
        if flush {
            self.flush_remote_tlbs();
        }
    }

    /// Write-protects the leaves of table `pfn` (at `level`, from gfn `base`) that meet
    /// `[start, end)`. The caller holds the MMU lock exclusive.
    fn write_protect_table(&self, pfn: Pfn, level: Level, base: Gfn, start: Gfn, end: Gfn) -> bool {
        // SAFETY: the caller holds the MMU lock exclusive and reached `pfn` from a root on the
        // list; nothing frees a linked page meanwhile.
        let Some(table) = (unsafe { self.table(pfn) }) else {
            debug_assert!(false, "table frame {pfn:?} unknown to the host");
            return false;
        };
        let fmt = self.cfg.format;
        let span = level.pages();
        let first = start.raw().saturating_sub(base.raw()) / span;
        let mut flush = false;
        for (i, entry) in table.iter().enumerate().skip(first as usize) {
            let lo = base.raw() + i as u64 * span;
            if lo >= end.raw() {
                break;
            }
            let old = entry.load(Ordering::Acquire);
            if !SpteFormat::is_mmu_present(old) {
                continue;
            }
            if fmt.is_leaf(old, level) {
                if fmt.is_writable(old) {
                    let need = self.set_spte_locked(entry, old, old & !BIT_W, level, Gfn(lo));
                    flush |= need == FlushNeed::Remote;
                }
            } else if let Some(lower) = level.lower() {
                flush |= self.write_protect_table(fmt.pfn(old), lower, Gfn(lo), start, end);
            }
        }
        flush
    }
}

impl<H: Host> WriteProtect for TdpMmu<H> {
    type Exclusive<'a>
        = MmuWrite<'a>
    where
        H: 'a;

    fn lock_exclusive(&self) -> MmuWrite<'_> {
        self.mmu_lock.write(&self.vcpus, &self.relax())
    }

    fn write_protect_masked(
        &self,
        excl: &MmuWrite<'_>,
        slot: &Memslot,
        offset: u64,
        mask: u64,
    ) -> bool {
        let flush = crate::dirty::any_masked_gfn(slot, offset, mask, |gfn| {
            self.write_protect_gfn(excl, slot, gfn)
        });
        self.stats.dirty_log_protected.add(mask.count_ones() as u64);
        flush
    }

    fn flush_remote_tlbs(&self) {
        TdpMmu::flush_remote_tlbs(self);
    }

    fn skip_flush(&self) -> bool {
        self.cfg.bugs.has(crate::bugs::Bug::DirtyLogNoFlush)
    }
}
