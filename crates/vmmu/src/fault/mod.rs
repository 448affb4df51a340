//! Faults: the record one fault flows through ([`PageFault`], shared by the MMUs), outcomes and
//! errors (KVM's `RET_PF_*` and the negative errnos of `kvm_mmu_page_fault`, facts §3.2-3.3), and
//! the page-fault error code of #NPF.

mod record;
pub(crate) use record::{max_mapping_level, Mappable};

pub use record::{Backing, FaultinStop, PageFault, RootState};

use crate::host::HostFault;
use crate::spte::RsvdReason;
use crate::spte::SpteDump;
use crate::stats::RetryCause;
use crate::types::{Access, Gpa, Hva};

/// Why an access must be emulated (the guest's access goes to the MMIO bus / userspace).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum EmulateSource {
    /// The fast path found an MMIO SPTE of the current generation.
    MmioSpteHit,
    /// The per-vCPU MMIO info cache held the gfn for the current generation.
    VcpuCacheHit,
    /// The slow path found no memslot (and installed an MMIO SPTE if caching is on).
    SlowPathMmio,
    /// A write to a read-only memslot: emulated, never cached as MMIO.
    ReadOnlyWrite,
    /// Shadow paging: a write to a guest page table the MMU shadows (write-protected). Emulate
    /// the write to RAM, then report it with [`crate::vcpu::Vcpu::track_write`].
    WriteProtected,
}

/// What the vCPU does after a fault (KVM `RET_PF_*`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FaultOutcome {
    /// An entry was installed; re-enter the guest (`RET_PF_FIXED`).
    Fixed,
    /// The entry was already right, fixed by someone else (`RET_PF_SPURIOUS`).
    Spurious,
    /// Re-enter the guest and let it fault again (`RET_PF_RETRY`).
    Retry(RetryCause),
    /// Emulate the access (`RET_PF_EMULATE`).
    Emulate {
        /// The guest-physical address accessed.
        gpa: Gpa,
        /// The access rights known for the MMIO page (KVM caches them for GVA permission checks).
        access: Access,
        /// Why.
        source: EmulateSource,
    },
    /// Shadow paging: the guest's own page tables do not allow the access. Inject a #PF with
    /// this error code and CR2 = `addr` into the guest (KVM `kvm_inject_emulated_page_fault`);
    /// it is the guest's fault, not the MMU's.
    GuestPageFault {
        /// The faulting guest-virtual address (CR2).
        addr: crate::types::Gva,
        /// The architectural error code (P, W, U, RSVD, FETCH).
        error_code: PfErr,
    },
}

/// A fault that cannot be handled: the vCPU stops with this report (KVM: a negative errno out of
/// `KVM_RUN`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum FaultError {
    /// Reserved bits in a present entry above the leaf: a genuine misconfiguration, not MMIO
    /// (KVM: `WARN_ONCE` with the SPTE hierarchy, `-EINVAL`).
    #[error(
        "genuine SPTE misconfiguration at gpa {gpa} (level {level}: {reason:?}); entries: {dump}"
    )]
    Misconfig {
        /// The faulting address.
        gpa: Gpa,
        /// The level of the bad entry.
        level: u8,
        /// The rule it breaks.
        reason: RsvdReason,
        /// Every entry the walk read.
        dump: SpteDump,
    },
    /// The memslot's host address has no usable backing (KVM: `-EFAULT` from `KVM_RUN`).
    #[error("gpa {gpa} is in a memslot but its host address {hva} cannot be used: {fault}")]
    HostFault {
        /// The faulting address.
        gpa: Gpa,
        /// The host address the memslot maps it to.
        hva: Hva,
        /// What the host said.
        fault: HostFault,
    },
    /// The host translated the memslot's address to a frame the SPTE format cannot hold (at or
    /// above 2^`phys_bits`): the VM's `phys_bits` must cover the host's physical memory. Nothing
    /// is mapped (masked into the pfn field the frame would name another one).
    #[error(
        "gpa {gpa}: the host translated {hva} to frame {pfn:?}, beyond the {phys_bits} physical \
         address bits the VM's SPTE format was made for (give the VM the host's MAXPHYADDR)"
    )]
    HostFrameBeyondPhysBits {
        /// The faulting address.
        gpa: Gpa,
        /// The host address the memslot maps it to.
        hva: Hva,
        /// The frame the host named.
        pfn: crate::types::Pfn,
        /// The format's MAXPHYADDR.
        phys_bits: u8,
    },
    /// A shadow-paging entry point was called on a VM whose MMU is TDP (or the reverse).
    #[error("this entry point needs a {wanted} VM")]
    WrongMmu {
        /// The MMU the entry point needs.
        wanted: crate::vm::MmuKind,
    },
    /// A guest-virtual address the guest cannot fault on (non-canonical; above 4 GiB with PAE or
    /// without paging): the CPU raises #GP, never a page fault.
    #[error("guest-virtual address {0} is not canonical for the guest's paging mode (#GP)")]
    NonCanonical(crate::types::Gva),
    /// No frame for a page table (KVM: `-ENOMEM`), or only one the VM's SPTEs cannot name
    /// (counted in `VmStats::tables_refused`).
    #[error(
        "no usable host frame for a page table while handling gpa {0}; if the VM's \
         `tables_refused` stat is not zero, the host's frames lie beyond the VM's phys_bits"
    )]
    OutOfMemory(Gpa),
    /// The global allocator had no memory for the MMU's bookkeeping: under shadow paging a new
    /// shadow page, a parent link, a reverse-map entry (KVM: `-ENOMEM` from
    /// `mmu_topup_memory_caches`); on a TDP VM the place, in the queue of pages to free, of a
    /// lower table that the fault's huge leaf would replace. Nothing was changed: the fault can
    /// be retried once memory is available.
    #[error(
        "the global allocator has no memory for the MMU's bookkeeping while handling gpa {0} \
         (KVM: -ENOMEM); nothing was changed: free memory and let the guest retry the access"
    )]
    OutOfHeap(Gpa),
    /// Shadow paging: the shadow page limit is reached and every shadow page is pinned by a
    /// vCPU root, current or previous, so none can be recycled (KVM: `-ENOSPC` from `KVM_RUN`).
    #[error(
        "no shadow page can be made while handling gpa {0}: the shadow page limit is reached \
         and vCPU roots pin every page (KVM: -ENOSPC); raise it with Vm::set_nr_mmu_pages"
    )]
    ShadowPageLimit(Gpa),
    /// The tables reference a frame the host does not know: a bug in the MMU or its host.
    #[error("internal error: a table frame is unknown to the host at gpa {gpa}; entries: {dump}")]
    Internal {
        /// The faulting address.
        gpa: Gpa,
        /// Every entry read.
        dump: SpteDump,
    },
}

/// A #NPF / #PF error code (PFERR bits: P=0, W=1, U=2, RSVD=3, FETCH=4).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PfErr(pub u64);

impl PfErr {
    /// The entry was present (a permission fault).
    pub const PRESENT: u64 = 1 << 0;
    /// A write.
    pub const WRITE: u64 = 1 << 1;
    /// A user-mode access.
    pub const USER: u64 = 1 << 2;
    /// Reserved bits were set in an entry (MMIO SPTE, or a misconfiguration).
    pub const RSVD: u64 = 1 << 3;
    /// An instruction fetch.
    pub const FETCH: u64 = 1 << 4;

    /// The error code of a fault making `access` (with RSVD when `rsvd`), for exits that report
    /// no error code of their own (an EPT violation's qualification carries the same bits).
    pub const fn from_access(access: crate::types::FaultAccess, rsvd: bool) -> Self {
        let mut e = 0;
        if access.write {
            e |= Self::WRITE;
        }
        if access.exec {
            e |= Self::FETCH;
        }
        if access.user {
            e |= Self::USER;
        }
        if rsvd {
            e |= Self::RSVD;
        }
        PfErr(e)
    }

    /// Whether RSVD is set.
    pub const fn rsvd(self) -> bool {
        self.0 & Self::RSVD != 0
    }
    /// The access the fault was for.
    pub const fn access(self) -> crate::types::FaultAccess {
        crate::types::FaultAccess {
            write: self.0 & Self::WRITE != 0,
            exec: self.0 & Self::FETCH != 0,
            user: self.0 & Self::USER != 0,
        }
    }
}
