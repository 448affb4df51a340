//! The seam between the machine and an MMU: what a vCPU asks of its MMU, and what the MMU tells
//! the report.
//!
//! The machine is generic over [`GuestMmu`]. The vCPU loop calls, in this order:
//! `enter_guest`, then per access: `poll_tlb_flush` (flush its TLB on `true`), a TLB lookup, on a
//! miss `translate` (retrying through the poll point on [`Translation::Retry`]), the access; and
//! `exit_guest` around every exit to userspace and at the end of each batch. The device manager
//! calls `set_memory_region` concurrently.
//!
//! Contract an implementation must keep for the oracle to pass: when `set_memory_region` returns,
//! every vCPU that could use a translation of the old map has either been outside guest mode or
//! has been told to flush its TLB (`poll_tlb_flush` returned `true` to it) and has acknowledged
//! by reaching its next poll. This is KVM's `kvm_make_all_cpus_request(.., KVM_REQ_TLB_FLUSH)`
//! with its wait: a vCPU that is in guest mode is waited for, one outside is not, and it must
//! poll its requests after entering guest mode.
//!
//! Host invalidations (`--stress-paths`): the device manager may also call
//! `invalidate_hva_range_begin`/`_end` (KVM's MMU notifier) between memslot updates. Contract:
//! when `begin` returns, no vCPU uses a translation to a page in the range (the same flush and
//! wait as above), and until `end` is called every fault on such a page retries; after `end` the
//! pages are re-faulted as usual.

use serde::Serialize;
use std::collections::BTreeMap;
use vmmu::types::{Gpa, Hva, Level, Pfn};

/// A memslot update request, with the fields of KVM's `kvm_userspace_memory_region`.
/// (To be replaced by the core's `vmmu::memslot` request type.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct SlotRequest {
    /// `(as_id << 16) | id`.
    pub slot: u32,
    /// `KVM_MEM_*` flags.
    pub flags: u32,
    /// First guest-physical address.
    pub guest_phys_addr: u64,
    /// Size in bytes; 0 deletes the slot.
    pub memory_size: u64,
    /// Host-virtual address of the backing memory.
    pub userspace_addr: u64,
}

impl SlotRequest {
    /// `KVM_MEM_LOG_DIRTY_PAGES`.
    pub const LOG_DIRTY_PAGES: u32 = 1 << 0;
    /// `KVM_MEM_READONLY`.
    pub const READONLY: u32 = 1 << 1;

    /// A request deleting `slot`.
    pub const fn delete(slot: u32) -> SlotRequest {
        SlotRequest { slot, flags: 0, guest_phys_addr: 0, memory_size: 0, userspace_addr: 0 }
    }
}

/// What the MMU resolves a vCPU's TLB miss to (after the walk and any fault handling).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Translation {
    /// Guest RAM. `pfn` is the frame of the 4 KiB page containing the address (for a huge leaf:
    /// the leaf's base frame plus the page's index in it); `level` is the leaf's level.
    Ram {
        /// The frame of the accessed 4 KiB page.
        pfn: Pfn,
        /// Whether writes may use this translation (the vCPU re-translates a write otherwise).
        writable: bool,
        /// The level of the leaf that maps it.
        level: Level,
    },
    /// Emulated MMIO: the access goes to the bus (KVM: `RET_PF_EMULATE`). Also a write to a
    /// read-only slot.
    Mmio,
    /// Try again (KVM: `RET_PF_RETRY`): the vCPU goes back through its request poll first.
    Retry,
    /// The VM cannot go on with this access (KVM: `KVM_RUN` fails, e.g. `-EFAULT`).
    Error(String),
}

/// Exit counts by kind, from the MMU's point of view.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MmuExits {
    /// EPT violations / NPT not-present or permission faults handled.
    pub violation: u64,
    /// EPT misconfigurations / NPT faults with RSVD set (MMIO SPTE candidates).
    pub misconfig: u64,
    /// Of those, MMIO SPTEs that matched the current generation: fast-path MMIO.
    pub mmio_spte_hit: u64,
    /// MMIO resolved from the per-vCPU MMIO info cache.
    pub mmio_cache_hit: u64,
    /// MMIO resolved by the slow path (memslot lookup; may create an MMIO SPTE).
    pub mmio_slow_path: u64,
}

/// Whether MMIO SPTEs are in use, and why (KVM: `enable_mmio_caching` after
/// `kvm_mmu_set_mmio_spte_mask`'s checks).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MmioCachingState {
    /// Whether MMIO caching is in effect.
    pub effective: bool,
    /// Why: e.g. "requested", "disabled by --mmio-caching off", "no reserved bits with phys_bits 52".
    pub reason: String,
}

/// The MMU's counters for the report, filled by the MMU (the machine never interprets them
/// beyond copying). Unknown or MMU-specific counters go into `extra`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MmuStats {
    /// Exits by kind.
    pub exits: MmuExits,
    /// MMIO SPTEs installed.
    pub mmio_sptes_created: u64,
    /// SPTE zaps (any reason).
    pub zaps: u64,
    /// `zap_all_fast` calls (root invalidations).
    pub zap_all_fast: u64,
    /// Faults that returned "retry".
    pub retries: u64,
    /// Remote TLB flush requests sent.
    pub tlb_flush_requests: u64,
    /// The final memslot generation (address space 0).
    pub generation: u64,
    /// MMIO generation wraps handled.
    pub generation_wraps: u64,
    /// Anything else, by name.
    pub extra: BTreeMap<String, u64>,
}

/// The MMU as the machine drives it. See the module doc for the call order and the flush
/// contract.
pub trait GuestMmu: Send + Sync {
    /// Per-vCPU MMU state, owned by the vCPU's thread.
    type Vcpu: Send;

    /// The state of vCPU `index` (0-based); called once per vCPU before the run.
    fn create_vcpu(&self, index: usize) -> Self::Vcpu;

    /// `KVM_SET_USER_MEMORY_REGION`. The error is KVM's errno name (`"EINVAL"`, `"EEXIST"`, ...).
    fn set_memory_region(&self, request: &SlotRequest) -> Result<(), String>;

    /// Resolves a TLB miss of `vcpu` at `gpa` for a read or a write.
    fn translate(&self, vcpu: &mut Self::Vcpu, gpa: Gpa, write: bool) -> Translation;

    /// The vCPU enters guest mode (KVM: `vcpu->mode = IN_GUEST_MODE` followed by a full barrier,
    /// then the request check happens at the next `poll_tlb_flush`).
    fn enter_guest(&self, _vcpu: &mut Self::Vcpu) {}

    /// The vCPU leaves guest mode (KVM: `vcpu->mode = OUTSIDE_GUEST_MODE`).
    fn exit_guest(&self, _vcpu: &mut Self::Vcpu) {}

    /// Between accesses: handles pending requests; `true` tells the vCPU to flush its TLB before
    /// its next access. Returning is the acknowledgement the flush protocol waits for.
    fn poll_tlb_flush(&self, _vcpu: &mut Self::Vcpu) -> bool {
        false
    }

    /// Host invalidation start (KVM `mmu_notifier invalidate_range_start`) for host addresses
    /// `[start, end)`; see the module doc for the contract. Returns `false` if this MMU does not
    /// take host invalidations (the default), and then the machine makes none.
    fn invalidate_hva_range_begin(&self, _start: Hva, _end: Hva) -> bool {
        false
    }

    /// Host invalidation end: pairs with one `invalidate_hva_range_begin` that returned `true`.
    fn invalidate_hva_range_end(&self) {}

    /// The current memslot generation of address space 0 (raw: KVM's update-in-progress flag,
    /// bit 63, included); 0 if the MMU has none.
    fn generation(&self) -> u64 {
        self.stats().generation
    }

    /// A snapshot of the MMU's counters.
    fn stats(&self) -> MmuStats {
        MmuStats::default()
    }

    /// Whether MMIO caching is in effect and why.
    fn mmio_caching(&self) -> MmioCachingState {
        MmioCachingState { effective: false, reason: "this MMU does not cache MMIO".into() }
    }
}
