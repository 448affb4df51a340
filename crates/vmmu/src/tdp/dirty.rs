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
use crate::types::Gfn;

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
        let mut flush = false;
        let mut m = mask;
        while m != 0 {
            let bit = m.trailing_zeros() as u64;
            m &= m - 1;
            let index = offset + bit;
            if index < slot.npages() {
                flush |= self.write_protect_gfn(excl, slot, crate::dirty::gfn_of(slot, index));
            }
        }
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
