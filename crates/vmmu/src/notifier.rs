//! A VM's side of the host's MMU notifier (KVM `kvm_mmu_notifier_invalidate_range_start` /
//! `_end`): [`crate::vm::Vm::invalidate_hva_range_begin`] zaps what maps a host-address range
//! and makes faults there retry; the [`HvaInvalidation`] it returns ends the invalidation when
//! it is ended or dropped.
//!
//! Invariants: every begin that returned is ended exactly once (the token is the only way to
//! end, is not `Clone`, and ends in `Drop`), so the two counts it raises (the MMU's in-flight
//! count, [`crate::invalidate::Invalidation`], and the VM's `mn_active`, which memslot updates
//! wait on) never fall below the number of invalidations in flight, nor stay raised after an
//! embedder's code between begin and end panics. A begin that unwinds (a host callback that
//! panics) undoes its own counts and returns no token.

use crate::host::Host;
use crate::invalidate::GfnRanges;
use crate::memslot::MemslotsGuard;
use crate::shared::{VmMmu, VmShared};
use crate::sync::{Arc, Ordering};
use crate::types::{AsId, Gfn, Hva, PAGE_SHIFT};

/// A host invalidation in flight (between KVM's `invalidate_range_start` and `_end`), from
/// [`crate::vm::Vm::invalidate_hva_range_begin`]. Faults on the range retry until it ends:
/// by [`HvaInvalidation::end`], or when it is dropped. An MMU notifier keeps it from its start
/// callback to its end callback (it is `Send`).
///
/// The VM's memslot updates wait for every invalidation in flight, so a thread must not update
/// the memslots while it holds one (it would wait for itself). A begin never waits for an
/// update's grace period; see [`crate::vm::Vm::invalidate_hva_range_begin`] for what else a
/// thread holding one may call.
///
/// ```
/// use std::sync::Arc;
/// use vmmu::memslot::UserspaceMemoryRegion;
/// use vmmu::spte::FormatKind;
/// use vmmu::testing::TestHost;
/// use vmmu::vm::{Vm, VmConfig};
/// use vmmu::Hva;
///
/// let host = Arc::new(TestHost::new(16));
/// host.map(0x4000_0000, 1 << 20, 0x4_0000, vmmu::Level::L4K, true);
/// let vm = Vm::new(VmConfig::new(FormatKind::Ept, 46)?, host.clone())?;
/// vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 1 << 20, 0x4000_0000))?;
/// // The host is about to change what backs one page: start ...
/// let inv = vm.invalidate_hva_range_begin(Hva(0x4000_0000), Hva(0x4000_1000));
/// host.map(0x4000_0000, 0x1000, 0x5_0000, vmmu::Level::L4K, true);
/// // ... and end: faults there map the new frame from now on.
/// inv.end();
/// # Ok::<(), vmmu::Error>(())
/// ```
///
/// An end belongs to one begin, and comes once:
/// ```compile_fail,E0382
/// # fn f<H: vmmu::host::Host>(vm: &vmmu::vm::Vm<H>) {
/// let inv = vm.invalidate_hva_range_begin(vmmu::Hva(0), vmmu::Hva(0x1000));
/// inv.end();
/// inv.end(); // use of moved value
/// # }
/// ```
#[must_use = "the invalidation ends when this is dropped: keep it until the host change is done"]
pub struct HvaInvalidation<H: Host> {
    vm: Arc<VmShared<H>>,
}

impl<H: Host> HvaInvalidation<H> {
    /// Ends the invalidation (KVM `invalidate_range_end`): faults on the range map what the
    /// host maps now. The same as dropping it.
    pub fn end(self) {}
}

impl<H: Host> Drop for HvaInvalidation<H> {
    fn drop(&mut self) {
        end_counts(&self.vm, true);
    }
}

/// Lowers what a begin raised, in KVM's order: the MMU's sequence and in-progress count first
/// (when `mmu_begun`: the begin got that far), then the count memslot updates wait on.
fn end_counts<H: Host>(vm: &VmShared<H>, mmu_begun: bool) {
    if mmu_begun {
        vm.mmu.invalidate_end(&vm.core);
    }
    let before = vm.mn_active.fetch_sub(1, Ordering::AcqRel);
    debug_assert!(before > 0, "every count lowered here was raised by a begin");
}

impl<H: Host> core::fmt::Debug for HvaInvalidation<H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HvaInvalidation").finish_non_exhaustive()
    }
}

/// Begins a host invalidation of `[start, end)` on `vm` (the doc of
/// [`crate::vm::Vm::invalidate_hva_range_begin`]).
pub(crate) fn begin<H: Host>(vm: &Arc<VmShared<H>>, start: Hva, end: Hva) -> HvaInvalidation<H> {
    let inner = &**vm;
    // KVM's `mn_invalidate_lock`: no memslot update publishes while this is held, and none
    // publishes once the count is raised (an update holds it only to publish, never across a
    // grace period, so this never waits for vCPUs).
    let mn_reader = inner.mn_lock.lock_with(&inner.core.relax());
    inner.mn_active.fetch_add(1, Ordering::AcqRel);
    // If this unwinds (a host callback that panics), the begin is undone: no token is returned
    // to end it, and a count left raised would make every later memslot update wait forever.
    let mut undo = BeginUnwound { vm: inner, mmu_begun: false };
    // The memslots' read section spans the MMU's work, as KVM's SRCU read lock spans its
    // notifier handlers: nothing here waits for a memslot grace period (updates are held off by
    // the lock above anyway), and the MMU's reclaim waits for the table readers only.
    let slots = inner.memslots.read(&mn_reader);
    let ranges =
        HvaRanges { slots: &slots, spaces: inner.memslots.nr_address_spaces(), start, end };
    inner.mmu.invalidate_begin(&inner.core, &ranges);
    undo.mmu_begun = true;
    if let VmMmu::Shadow(shadow) = &inner.mmu {
        // After the begin: faults on the ranges retry from now on, and what faults installed
        // before is dropped here.
        shadow.unmap_gfn_ranges(&inner.core, &ranges);
    }
    drop(slots);
    core::mem::forget(undo);
    HvaInvalidation { vm: vm.clone() }
}

/// The gfn ranges of the slots a host range `[start, end)` meets, in every address space
/// (KVM `kvm_handle_hva_range`): each slot's part of the range, rounded out to whole pages.
struct HvaRanges<'a> {
    slots: &'a MemslotsGuard<'a>,
    spaces: u16,
    start: Hva,
    end: Hva,
}

impl GfnRanges for HvaRanges<'_> {
    fn for_each(&self, f: &mut dyn FnMut(AsId, Gfn, Gfn)) {
        let (start, end) = (self.start.raw(), self.end.raw());
        for as_id in 0..self.spaces {
            self.slots.set(AsId(as_id)).for_each_in_hva_range(self.start, self.end, |s| {
                let s_start = s.userspace_addr().raw();
                let s_end = s.end_hva().raw();
                let lo = start.max(s_start);
                let hi = end.min(s_end);
                if lo < hi {
                    let g0 = s.base_gfn().raw() + ((lo - s_start) >> PAGE_SHIFT);
                    let g1 = s.base_gfn().raw() + ((hi - s_start + 0xfff) >> PAGE_SHIFT);
                    f(AsId(as_id), Gfn(g0), Gfn(g1));
                }
            });
        }
    }
}

/// Undoes [`begin`] if it unwinds ([`end_counts`]: the MMU's count once its begin returned).
struct BeginUnwound<'a, H: Host> {
    vm: &'a VmShared<H>,
    mmu_begun: bool,
}

impl<H: Host> Drop for BeginUnwound<'_, H> {
    fn drop(&mut self) {
        end_counts(self.vm, self.mmu_begun);
    }
}
