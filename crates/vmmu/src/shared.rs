//! The state a VM and its vCPUs share (KVM's `struct kvm` for the parts this crate covers): the
//! memslots with their generation protocol, the MMU, the MMIO caching policy and the VMM's
//! serialisation. [`crate::vm::Vm`] is the handle embedders hold; each [`crate::vcpu::Vcpu`]
//! keeps an `Arc` of this. Below both in the module graph, so neither imports the other.

use crate::bugs::BugSet;
use crate::host::Host;
use crate::memslot::Memslots;
use crate::spte::MmioCachingPolicy;
use crate::srcu::ReaderId;
use crate::tdp::TdpMmu;

/// The state shared by a VM and its vCPUs.
pub(crate) struct VmShared<H: Host> {
    pub(crate) memslots: Memslots,
    pub(crate) mmu: TdpMmu<H>,
    /// The shadow MMU, for a VM with shadow paging ([`crate::vm::MmuKind::Shadow`]); then
    /// `mmu` has no roots and serves as the VM-wide machinery (see [`crate::shadow`]).
    pub(crate) shadow: Option<crate::shadow::ShadowMmu>,
    pub(crate) policy: MmioCachingPolicy,
    pub(crate) bugs: BugSet,
    /// Serialises memslot updates, `zap_all_fast` and the start of host invalidations (KVM's
    /// `slots_lock` and `mn_invalidate_lock` roles for what this VM object does).
    /// It holds the VMM's own memslot reader (host invalidations map host addresses to gfns).
    pub(crate) vmm_lock: crate::sync::Mutex<ReaderId>,
    /// Host invalidations begun and not ended (KVM `mn_active_invalidate_count`). A memslot update
    /// waits for it to reach 0 under `vmm_lock`, so an invalidation's gfn ranges, computed from
    /// the memslots when it began, stay right until it ends (a slot cannot move meanwhile).
    pub(crate) mn_active: crate::sync::AtomicU32,
}
