//! Dirty logging under shadow paging (issue 16 point 2; KVM `kvm_mmu_slot_gfn_write_protect`
//! through the rmap): write protection of a logged slot's pages when logging starts and after
//! each collection, through the reverse map, under the shadow lock. A fault that installs a
//! writable leaf in a logged slot marks the page just before it stores the leaf, under the lock
//! (`shadow/fetch.rs`): no collection sits between the mark and the leaf, and no vCPU writes
//! through the leaf while the bit is clear (`crate::dirty`).

use super::pages::ShadowState;
use super::ShadowMmu;
use crate::dirty::WriteProtect;
use crate::host::Host;
use crate::memslot::Memslot;
use crate::mmu_core::MmuCore;
use crate::sync::MutexGuard;
use crate::types::{AsId, Gfn};

impl ShadowMmu {
    /// Clears the writable bit of every leaf mapping a gfn in `[start, end)` of `as_id`, and
    /// flushes (logging starts on a slot).
    pub(crate) fn write_protect_gfn_range<H: Host>(
        &self,
        core: &MmuCore<H>,
        as_id: AsId,
        start: Gfn,
        end: Gfn,
    ) {
        {
            let mut st = self.lock(core);
            for gfn in st.rmap_gfns(as_id, start, end) {
                let dropped = st.write_protect_gfn(core, as_id, gfn, false);
                st.owe_flush(dropped);
            }
            st.commit_zap(core, &self.stats);
        }
        core.reclaim();
    }
}

/// The shadow MMU as the dirty log's write protector. It protects under the shadow lock and
/// flushes after dropping it, so between the two it counts itself in
/// `MmuCore::unflushed_write_protects` (a table shadowed meanwhile flushes for it).
pub(crate) struct ShadowProtect<'a, H: Host> {
    core: &'a MmuCore<H>,
    shadow: &'a ShadowMmu,
    /// Whether this protector raised `unflushed_write_protects` and owes it a lowering.
    counted: core::cell::Cell<bool>,
}

impl<'a, H: Host> ShadowProtect<'a, H> {
    /// A protector for one dirty-log call.
    pub(crate) fn new(core: &'a MmuCore<H>, shadow: &'a ShadowMmu) -> Self {
        ShadowProtect { core, shadow, counted: core::cell::Cell::new(false) }
    }
}

impl<H: Host> WriteProtect for ShadowProtect<'_, H> {
    type Exclusive<'a>
        = MutexGuard<'a, ShadowState>
    where
        Self: 'a;

    fn lock_exclusive(&self) -> MutexGuard<'_, ShadowState> {
        self.shadow.lock(self.core)
    }

    fn write_protect_masked(
        &self,
        excl: &MutexGuard<'_, ShadowState>,
        slot: &Memslot,
        offset: u64,
        mask: u64,
    ) -> bool {
        let flush = crate::dirty::any_masked_gfn(slot, offset, mask, |gfn| {
            excl.write_protect_gfn(self.core, slot.as_id(), gfn, false)
        });
        self.core.stats.dirty_log_protected.add(mask.count_ones() as u64);
        if flush && !self.counted.replace(true) {
            // Under the shadow lock (`excl`): seen by every shadowing that takes it later.
            self.core.owe_protect_flush();
        }
        flush
    }

    fn flush_remote_tlbs(&self) {
        self.core.flush_remote_tlbs();
        if self.counted.replace(false) {
            self.core.protect_flush_done();
        }
    }

    fn skip_flush(&self) -> bool {
        self.core.cfg.bugs.has(crate::bugs::Bug::DirtyLogNoFlush)
    }
}
