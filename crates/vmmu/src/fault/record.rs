//! One page fault as it flows through the MMU (KVM `struct kvm_page_fault`), and the steps of the
//! slow path that do not depend on which MMU maps it: faultin (memslot, host frame, or MMIO) and
//! the staleness check. Shared by the TDP MMU and the shadow MMU.
//!
//! Flow: an entry point builds a [`PageFault`] once -> [`PageFault::faultin`] resolves it against
//! the vCPU's memslot set (inside the caller's memslot read section) into its [`Backing`] or a
//! stop -> under the MMU lock, [`PageFault::stale`] (KVM `is_page_fault_stale`) -> the MMU's
//! map -> the one SPTE-change function (`mmu_core/change.rs`).

use super::{FaultError, PfErr};
use crate::bugs::{Bug, BugSet};
use crate::host::{FrameKind, HostAccess, HostMemory};
use crate::invalidate::Invalidation;
use crate::memslot::{Memslot, MemslotSet, SlotCache};
use crate::requests::{Request, Requests};
use crate::spte::SpteFormat;
use crate::stats::RetryCause;
use crate::types::{FaultAccess, Gfn, Gpa, Level, Pfn};

/// What the MMU can map for a fault: its SPTE format (which host frames fit a leaf) and the
/// largest leaf it makes.
pub(crate) struct Mappable<'a> {
    /// The VM's SPTE format.
    pub format: &'a SpteFormat,
    /// The largest leaf level.
    pub max_level: Level,
}

/// What faultin found backs the faulting gfn (KVM: `fault->slot`, `fault->pfn`,
/// `fault->map_writable`, `fault->max_level`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backing {
    /// RAM of `slot`: the host frame of the first page of the naturally aligned block at
    /// `max_level` around the gfn is `base_pfn`.
    Ram {
        /// The memslot.
        slot: Memslot,
        /// The frame of the block's first page (aligned to `max_level`).
        base_pfn: Pfn,
        /// The largest level the slot and the host allow (KVM `fault->max_level` after
        /// `kvm_mmu_max_mapping_level`).
        max_level: Level,
        /// Whether the mapping may allow writes (KVM `fault->map_writable`).
        writable: bool,
        /// What the host says the frame is (KVM `kvm_is_mmio_pfn(fault->pfn)`).
        kind: FrameKind,
    },
    /// No memslot: emulated MMIO (KVM `kvm_handle_noslot_fault`).
    NoSlot,
}

/// What the stale check needs to know of the root a fault maps into, as each MMU tells it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RootState {
    /// A root with a page that is still valid.
    Valid,
    /// A root with a page that `zap_all_fast` marked obsolete (KVM `is_obsolete_sp`).
    Obsolete,
    /// A root with no page of its own (KVM's special roots): nothing marks it obsolete, so it is
    /// stale exactly while a free-obsolete-roots request is pending for its vCPU.
    NoPage,
}

/// One page fault (KVM `struct kvm_page_fault`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PageFault {
    /// The faulting address (a guest-physical address under TDP).
    pub addr: Gpa,
    /// The architectural error code of the exit (P, W, U, RSVD, FETCH).
    pub error_code: PfErr,
    /// The frame of `addr`.
    pub gfn: Gfn,
    /// What the access needs (from the error code).
    pub access: FaultAccess,
    /// The host-invalidation sequence sampled before the host frame was looked up (KVM
    /// `fault->mmu_seq`); 0 until faultin.
    pub mmu_seq: u64,
}

/// Why faultin ended the fault early.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FaultinStop {
    /// Fault again later.
    Retry(RetryCause),
    /// A write to a read-only memslot: emulate it, and never cache the gfn as MMIO (reads of it
    /// are RAM).
    ReadOnlyWrite,
}

impl PageFault {
    /// A shadow-paging fault on `addr`, the guest-physical address the guest walk of the
    /// faulting GVA gave, with the exit's `error_code` less RSVD (the slow path decides the
    /// mapping afresh, whatever the hardware's reason to exit was).
    pub fn shadow(addr: Gpa, error_code: PfErr) -> Self {
        PageFault::tdp(addr, PfErr(error_code.0 & !PfErr::RSVD))
    }

    /// A TDP fault on `addr` with `error_code`.
    pub fn tdp(addr: Gpa, error_code: PfErr) -> Self {
        PageFault { addr, error_code, gfn: addr.gfn(), access: error_code.access(), mmu_seq: 0 }
    }

    /// Whether the exit reported reserved bits (an MMIO SPTE, or a misconfiguration).
    pub fn rsvd(&self) -> bool {
        self.error_code.rsvd()
    }

    /// KVM `kvm_mmu_faultin_pfn` / `__kvm_faultin_pfn`: resolves the gfn against `set` (read
    /// inside the caller's memslot read section): a memslot being deleted or moved -> retry; no
    /// memslot -> [`Backing::NoSlot`]; a write to a read-only slot -> stop, emulate; RAM ->
    /// the host frame, translated after sampling the invalidation sequence. `Ok(Ok(backing))`:
    /// go on to the stale check and the map; `Ok(Err(stop))`: the fault ends here.
    #[inline(always)]
    pub(crate) fn faultin(
        &mut self,
        set: &MemslotSet,
        slot_cache: &mut SlotCache,
        host: &dyn HostMemory,
        inval: &Invalidation,
        mappable: Mappable<'_>,
        bugs: BugSet,
    ) -> Result<Result<Backing, FaultinStop>, FaultError> {
        // Snapshot before translating the host address (see tdp::invalidate).
        self.mmu_seq = inval.seq();
        let mut slot = set.find_cached(self.gfn, slot_cache);
        if slot.as_ref().is_some_and(|s| s.is_invalid()) {
            if !bugs.has(Bug::InvalidSlotAsMmio) {
                return Ok(Err(FaultinStop::Retry(RetryCause::InvalidSlot)));
            }
            slot = None; // the bug: a slot being deleted is treated as no slot, i.e. MMIO
        }
        let Some(s) = slot else {
            return Ok(Ok(Backing::NoSlot));
        };
        if inval.retry_unsafe(self.mmu_seq, self.gfn) {
            return Ok(Err(FaultinStop::Retry(RetryCause::HostInvalidation)));
        }
        if self.access.write && s.is_readonly() {
            // KVM_PFN_ERR_RO_FAULT.
            return Ok(Err(FaultinStop::ReadOnlyWrite));
        }
        let hva = s.hva_of(self.gfn);
        let want = if self.access.write { HostAccess::Write } else { HostAccess::Read };
        let hp = host.translate(hva, want).map_err(|fault| FaultError::HostFault {
            gpa: self.addr,
            hva,
            fault,
        })?;
        if self.access.write && !hp.writable {
            // A write translation answered with a read-only page breaks `HostMemory::translate`'s
            // contract (KVM's `hva_to_pfn` gives a writable page or fails): mapped read-only, the
            // write would fault again for ever. Reported as the refusal it is.
            return Err(FaultError::HostFault {
                gpa: self.addr,
                hva,
                fault: crate::host::HostFault::Protected(hva),
            });
        }
        if !mappable.format.holds_pfn(hp.pfn) {
            let phys_bits = mappable.format.phys_bits();
            return Err(FaultError::HostFrameBeyondPhysBits {
                gpa: self.addr,
                hva,
                pfn: hp.pfn,
                phys_bits,
            });
        }
        let mut max_level = max_mapping_level(&s, self.gfn, hp.level, mappable.max_level);
        if hp.pfn.raw() & (max_level.pages() - 1) != max_level.offset_in_block(self.gfn) {
            // A host page whose frame does not sit at the gfn's place in its block breaks
            // `HostPage::level`'s contract (the block is backed by aligned contiguous frames):
            // map the one frame the host named, not a block of frames it never promised.
            max_level = Level::L4K;
        }
        let offset = max_level.offset_in_block(self.gfn);
        // KVM `make_spte`: the leaf is writable when the host maps the page writable, for a read
        // too (a read never breaks copy-on-write, so the host says writable only for a page
        // already written: `HostPage::writable`); in a dirty-logged slot such a leaf marks the
        // page dirty (the fault path), read or not, as KVM does.
        let writable = !s.is_readonly() && hp.writable;
        let kind = mappable.format.frame_kind_of(host, hp.pfn);
        let base_pfn = Pfn(hp.pfn.raw() - offset);
        Ok(Ok(Backing::Ram { slot: s, base_pfn, max_level, writable, kind }))
    }

    /// KVM `is_page_fault_stale`, under the lock the MMU installs under (the caller holds it:
    /// TDP, the MMU lock shared; shadow, the shadow lock; `invalidate`'s module doc): the root was
    /// obsoleted by `zap_all_fast`, or it has no page and a free-obsolete-roots request is pending
    /// for the vCPU (18c841e1f411), or a host invalidation touched the gfn (the block RAM
    /// `backing` may map) since faultin sampled the sequence.
    pub(crate) fn stale(
        &self,
        backing: &Backing,
        root: RootState,
        pending: Requests,
        inval: &Invalidation,
        bugs: BugSet,
    ) -> Option<RetryCause> {
        if !bugs.has(Bug::NoStaleRootCheck) {
            match root {
                RootState::Obsolete => return Some(RetryCause::ObsoleteRoot),
                RootState::NoPage if pending.has(Request::FreeObsoleteRoots) => {
                    return Some(RetryCause::PagelessRootReloadPending)
                }
                _ => {}
            }
        }
        if let Backing::Ram { max_level, .. } = *backing {
            // The whole block the leaf may map, not only the faulting gfn.
            let start = max_level.block_base(self.gfn);
            let end = Gfn(start.raw() + max_level.pages());
            if inval.retry_range(self.mmu_seq, start, end) {
                return Some(RetryCause::HostInvalidation);
            }
        }
        None
    }
}

/// The largest level `gfn` may be mapped at (KVM `kvm_mmu_max_mapping_level` for TDP): the slot
/// covers the whole aligned block, the host maps it with a page at least that large, gfn and host
/// address are equally aligned, and the slot is not dirty-logged.
#[inline]
pub(crate) fn max_mapping_level(
    slot: &Memslot,
    gfn: Gfn,
    host_level: Level,
    format_max: Level,
) -> Level {
    if slot.dirty_logging() {
        return Level::L4K;
    }
    let mut level = host_level.min(format_max);
    while level > Level::L4K {
        let pages = level.pages();
        let block = level.block_base(gfn).raw();
        let inside = block >= slot.base_gfn().raw()
            && block.checked_add(pages).is_some_and(|e| e <= slot.end_gfn().raw());
        let hva_pfn = slot.userspace_addr().raw() >> crate::types::PAGE_SHIFT;
        let congruent = (hva_pfn.wrapping_sub(slot.base_gfn().raw())) & (pages - 1) == 0;
        if inside && congruent {
            return level;
        }
        level = match level.lower() {
            Some(l) => l,
            None => break,
        };
    }
    Level::L4K
}
