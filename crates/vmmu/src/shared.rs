//! The state a VM and its vCPUs share (KVM's `struct kvm` for the parts this crate covers): the
//! memslots with their generation protocol, the MMU core and the MMU of the VM's kind, the MMIO
//! caching policy and the VMM's serialisation. [`crate::vm::Vm`] is the handle embedders hold; each
//! [`crate::vcpu::Vcpu`] keeps an `Arc` of this. Below both in the module graph: it holds what both
//! need, so neither reaches into the other's fields.

use crate::bugs::BugSet;
use crate::host::Host;
use crate::invalidate::GfnRanges;
use crate::memslot::Memslots;
use crate::mmu_core::MmuCore;
use crate::shadow::ShadowMmu;
use crate::spte::MmioCachingPolicy;
use crate::srcu::ReaderId;
use crate::tdp::{Tdp, TdpMmu};

/// The state shared by a VM and its vCPUs.
pub(crate) struct VmShared<H: Host> {
    pub(crate) memslots: Memslots,
    /// What both MMUs use: host, configuration, vCPU words, flushes, table pages.
    pub(crate) core: MmuCore<H>,
    /// The MMU that maps the VM, chosen when it is built ([`crate::vm::VmConfig::mmu`]).
    pub(crate) mmu: VmMmu,
    pub(crate) policy: MmioCachingPolicy,
    pub(crate) bugs: BugSet,
    /// Serialises memslot updates, `zap_all_fast` and the dirty-log calls (KVM's `slots_lock`
    /// role for what this VM object does). It holds the VMM's own memslot reader.
    pub(crate) vmm_lock: crate::sync::Mutex<ReaderId>,
    /// KVM's `mn_invalidate_lock`: a host invalidation's begin counts itself in `mn_active` and
    /// maps its host range to gfns under it; a memslot update holds it (after `vmm_lock`) from
    /// reading `mn_active` as 0 to the end of a publication, never across a grace period, so no
    /// update publishes while an invalidation is in flight and a begin never waits for vCPUs'
    /// read sections. Before its first publication an update waits for invalidations to end
    /// holding neither lock. It holds the notifier's memslot reader.
    pub(crate) mn_lock: crate::sync::Mutex<ReaderId>,
    /// The memslot reader of [`crate::vm::Vm::gfn_to_hva`]: held only for one lookup's read
    /// section, never while waiting for anything, so a lookup never waits for a memslot update
    /// (which holds `vmm_lock` while it waits for the read sections of faults to end).
    pub(crate) lookup_reader: crate::sync::Mutex<ReaderId>,
    /// Host invalidations begun and not ended (KVM `mn_active_invalidate_count`). A memslot update
    /// publishes only once it reads 0 under `mn_lock`, so an invalidation's gfn ranges, computed
    /// from the memslots when it began, stay right until it ends (a slot cannot move meanwhile).
    /// Raised under `mn_lock`; lowered without it (an end).
    pub(crate) mn_active: crate::sync::AtomicU32,
}

/// The MMU of a VM: the kind is fixed when the VM is built, so every "which MMU" question is a
/// match on this.
// One per VM, inside the VM's `Arc`: the size difference costs nothing, and a boxed shadow MMU
// would cost a pointer chase on every shadow fault.
#[allow(clippy::large_enum_variant)]
pub(crate) enum VmMmu {
    /// Two-dimensional paging ([`crate::vm::MmuKind::Tdp`]).
    Tdp(TdpMmu),
    /// Shadow paging ([`crate::vm::MmuKind::Shadow`]).
    Shadow(ShadowMmu),
}

impl VmMmu {
    /// KVM `kvm_mmu_zap_all_fast` on the MMU that maps the VM. Callers hold `vmm_lock`.
    pub(crate) fn zap_all_fast<H: Host>(&self, core: &MmuCore<H>) {
        match self {
            VmMmu::Tdp(tdp) => Tdp { core, tdp }.zap_all_fast(),
            VmMmu::Shadow(shadow) => shadow.zap_all_fast(core),
        }
    }

    /// Host invalidation start for `ranges` (faults there retry from now on), with the TDP
    /// MMU's zap of them in the same critical section; the shadow MMU drops its leaves after
    /// this returns ([`crate::notifier`]).
    pub(crate) fn invalidate_begin<H: Host>(
        &self,
        core: &MmuCore<H>,
        ranges: &(impl GfnRanges + ?Sized),
    ) {
        match self {
            VmMmu::Tdp(tdp) => Tdp { core, tdp }.invalidate_begin(ranges),
            VmMmu::Shadow(shadow) => shadow.invalidate_begin(core, ranges),
        }
    }

    /// Host invalidation end (KVM `invalidate_range_end`).
    pub(crate) fn invalidate_end<H: Host>(&self, core: &MmuCore<H>) {
        match self {
            VmMmu::Tdp(tdp) => Tdp { core, tdp }.invalidate_end(),
            VmMmu::Shadow(shadow) => shadow.invalidate_end(core),
        }
    }
}

impl<H: Host> VmShared<H> {
    /// The TDP MMU at work, for a TDP VM.
    #[inline]
    pub(crate) fn tdp(&self) -> Option<Tdp<'_, H>> {
        match &self.mmu {
            VmMmu::Tdp(tdp) => Some(Tdp { core: &self.core, tdp }),
            VmMmu::Shadow(_) => None,
        }
    }

    /// The shadow MMU, for a shadow-paging VM.
    #[inline]
    pub(crate) fn shadow(&self) -> Option<&ShadowMmu> {
        match &self.mmu {
            VmMmu::Shadow(shadow) => Some(shadow),
            VmMmu::Tdp(_) => None,
        }
    }
}

impl<H: Host> Drop for VmShared<H> {
    /// The last handle is gone (KVM `kvm_destroy_vm` -> `kvm_mmu_uninit_vm`): every table page
    /// the MMU still holds goes back to the host. Valid TDP roots stay on the root list when their
    /// last vCPU drops them (for the next vCPU to load), shadow pages stay until recycled or
    /// zapped, and pages wait in the deferred-free queue until the next reclaim: without this, a
    /// host that creates and destroys VMs would lose those frames for good. No vCPU, guest-mode
    /// period or host invalidation is left (each holds this `Arc`), so the zap waits for nobody
    /// and the grace period ends at once.
    fn drop(&mut self) {
        self.mmu.zap_all_fast(&self.core);
        self.core.reclaim();
    }
}
