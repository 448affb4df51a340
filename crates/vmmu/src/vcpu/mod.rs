//! A vCPU's MMU side: its current root, requests, per-vCPU MMIO info cache and last-used slot,
//! guest-mode periods, and the fault entry points (facts §3): EPT violation, EPT misconfiguration
//! and #NPF (with or without RSVD).
//!
//! # Fault flow
//! - RSVD faults (EPT misconfig, #NPF with RSVD) first take the **fast path** (KVM
//!   `handle_mmio_page_fault`, §3.4): per-vCPU cache hit -> Emulate; else a lockless walk: reserved
//!   bits above the leaf -> a genuine misconfiguration error; an MMIO SPTE of the current
//!   generation with no update in progress -> fill the cache, Emulate; an MMIO SPTE of a stale
//!   generation -> the slow path; anything else (zapped meanwhile, frozen) -> Retry. It takes no
//!   lock and allocates nothing.
//! - The **slow path** (KVM `kvm_tdp_mmu_page_fault`, §3.6) runs inside a memslot read section:
//!   invalid slot -> Retry; no slot -> fill the cache (not while an update is in progress), then
//!   install an MMIO SPTE if caching is on and the gfn is in range, Emulate; a write to a
//!   read-only slot -> Emulate, never cached; RAM -> translate the host address and install the
//!   leaf under the shared MMU lock after the staleness checks of §4.
//!
//! # Generations used
//! `check_mmio_spte` and the per-vCPU cache compare against the generation of the vCPU's own
//! address space. KVM's cache helpers read address space 0 (`kvm_memslots`); with generations
//! unique across address spaces, using the vCPU's own is never weaker, and right for a vCPU in SMM.

pub mod mmio_cache;
pub mod requests;

use crate::bugs::Bug;
use crate::fault::{EmulateSource, FaultError, FaultOutcome, PfErr};
use crate::host::Host;
use crate::memslot::{MemslotSet, SlotCache};
use crate::spte::SpteFormat;
use crate::srcu::{ReadGuard, ReaderId};
use crate::stats::{RetryCause, VcpuStats};
use crate::sync::Arc;
use crate::tdp::root::{Root, RootKind};
use crate::tdp::{hw_walk, HwWalk, LeafSpec, LocklessWalk, MapOutcome, TdpError};
use crate::types::{Access, AsId, FaultAccess, Generation, Gfn, Gpa, Level, Pfn};
use crate::vm::VmInner;
use mmio_cache::MmioInfoCache;
use requests::{Request, Requests, VcpuState};

/// The fast path's own result (KVM adds `RET_PF_INVALID`: "take the slow path").
enum FastOutcome {
    Done(FaultOutcome),
    Invalid,
}

/// What the vCPU's owner must do before entering the guest, after [`Vcpu::service_requests`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct EntryWork {
    /// Flush the vCPU's TLB (a flush request, or a new root).
    pub flush_tlb: bool,
}

/// One vCPU of a [`crate::vm::Vm`]. Owned by the thread that runs it.
pub struct Vcpu<H: Host> {
    vm: Arc<VmInner<H>>,
    index: usize,
    memslot_reader: ReaderId,
    table_reader: ReaderId,
    as_id: AsId,
    root: Option<Arc<Root>>,
    mmio_cache: MmioInfoCache,
    slot_cache: SlotCache,
    /// In guest mode through [`Vcpu::enter_guest_mode`] (holding a raw table read section).
    in_guest: bool,
    /// This vCPU's counters.
    pub stats: VcpuStats,
}

impl<H: Host> Vcpu<H> {
    pub(crate) fn new(vm: Arc<VmInner<H>>) -> Result<Self, TdpError> {
        let (index, table_reader) = vm.mmu.add_vcpu()?;
        let memslot_reader = match vm.memslots.register_reader() {
            Ok(r) => r,
            Err(_) => {
                vm.mmu.remove_vcpu(index, table_reader);
                return Err(TdpError::TooManyVcpus(vm.mmu.cfg.max_vcpus));
            }
        };
        Ok(Vcpu {
            vm,
            index,
            memslot_reader,
            table_reader,
            as_id: AsId(0),
            root: None,
            mmio_cache: MmioInfoCache::new(),
            slot_cache: SlotCache::default(),
            in_guest: false,
            stats: VcpuStats::default(),
        })
    }

    /// The vCPU's index in its VM.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The address space the vCPU runs in (0; 1 models SMM).
    pub fn as_id(&self) -> AsId {
        self.as_id
    }

    /// Switches the vCPU's address space (KVM: entering or leaving SMM): the root changes.
    pub fn set_as_id(&mut self, as_id: AsId) {
        if self.as_id != as_id {
            self.as_id = as_id;
            self.drop_root();
        }
    }

    /// The VM's SPTE format (which exits the hardware raises).
    pub fn format(&self) -> crate::spte::SpteFormat {
        self.vm.mmu.cfg.format
    }

    /// The per-vCPU MMIO info cache (read-only view, for tests and reports).
    pub fn mmio_cache(&self) -> &MmioInfoCache {
        &self.mmio_cache
    }

    /// The current root, if loaded.
    pub fn root(&self) -> Option<&Arc<Root>> {
        self.root.as_ref()
    }

    fn state(&self) -> &VcpuState {
        &self.vm.mmu.vcpus[self.index]
    }

    fn drop_root(&mut self) {
        if let Some(r) = self.root.take() {
            self.vm.mmu.put_root(r);
        }
        // A new root: nothing cached under the old one may be trusted (issue 4, point 5).
        self.mmio_cache.clear();
    }

    /// Handles pending requests and loads a root if none is loaded (KVM: the request checks of
    /// `vcpu_enter_guest` and `kvm_mmu_reload`). Call outside guest mode, between accesses.
    pub fn service_requests(&mut self) -> Result<EntryWork, TdpError> {
        debug_assert!(!self.in_guest, "requests are serviced outside guest mode");
        let mut work = EntryWork::default();
        let pending = self.state().pending();
        if pending.has(Request::FreeObsoleteRoots) {
            self.state().clear(Request::FreeObsoleteRoots);
            // KVM `kvm_mmu_free_obsolete_roots`: pageless roots count as obsolete.
            let stale = self
                .root
                .as_ref()
                .is_some_and(|r| r.kind() == RootKind::Pageless || r.is_obsolete());
            if stale {
                self.drop_root();
            }
        }
        if pending.has(Request::TlbFlush) {
            self.state().clear(Request::TlbFlush);
            work.flush_tlb = true;
        }
        if pending.has(Request::Kick) {
            // Leaving guest mode was the whole point: the read section it held has ended.
            self.state().clear(Request::Kick);
        }
        if self.root.is_none() {
            self.root = Some(self.vm.mmu.get_root(self.as_id)?);
            self.stats.root_loads += 1;
            work.flush_tlb = true;
        }
        if work.flush_tlb {
            self.stats.tlb_flush += 1;
        }
        Ok(work)
    }

    /// Loads a root without a page-tracking state (KVM's special roots), for tests and models of
    /// 18c841e1f411. Replaces the current root.
    pub fn load_pageless_root(&mut self) -> Result<(), TdpError> {
        self.drop_root();
        self.root = Some(self.vm.mmu.make_pageless_root(self.as_id)?);
        Ok(())
    }

    /// Enters guest mode (KVM: `vcpu->mode = IN_GUEST_MODE` before VM entry). `Err` when
    /// requests are pending or no root is loaded: call [`Self::service_requests`] first.
    pub fn enter_guest(&mut self) -> Result<GuestMode<'_, H>, Requests> {
        let Some(root) = self.root.as_ref() else {
            return Err(self.state().pending());
        };
        let (root_pfn, root_level) = (root.pfn(), root.level());
        // The read section first: the hardware walker may reach any table from the root.
        let table_guard = self.vm.mmu.table_srcu.read_lock(self.table_reader);
        let state = &self.vm.mmu.vcpus[self.index];
        state.enter_guest_mode()?;
        Ok(GuestMode { vm: &self.vm, state, root_pfn, root_level, _table: table_guard })
    }

    /// Enters guest mode without a guard, for drivers whose guest-mode period spans several calls
    /// (the software machine). Same contract as [`Self::enter_guest`]; leave with
    /// [`Self::exit_guest_mode`]. Fault handlers must be called outside guest mode.
    pub fn enter_guest_mode(&mut self) -> Result<(), Requests> {
        debug_assert!(!self.in_guest, "already in guest mode");
        if self.root.is_none() {
            return Err(self.state().pending());
        }
        let mmu = &self.vm.mmu;
        mmu.table_srcu.read_lock_raw(self.table_reader);
        if let Err(r) = mmu.vcpus[self.index].enter_guest_mode() {
            // SAFETY: opened just above by this thread, no guard exists.
            unsafe { mmu.table_srcu.read_unlock_raw(self.table_reader) };
            return Err(r);
        }
        self.in_guest = true;
        Ok(())
    }

    /// Leaves guest mode entered with [`Self::enter_guest_mode`] (a VM exit). No-op outside it.
    pub fn exit_guest_mode(&mut self) {
        if !self.in_guest {
            return;
        }
        self.in_guest = false;
        let mmu = &self.vm.mmu;
        mmu.vcpus[self.index].exit_guest_mode();
        // SAFETY: `in_guest` was set by `enter_guest_mode`, which opened the section.
        unsafe { mmu.table_srcu.read_unlock_raw(self.table_reader) };
    }

    /// Whether the vCPU is in guest mode through [`Self::enter_guest_mode`].
    pub fn in_guest_mode(&self) -> bool {
        self.in_guest
    }

    /// Whether requests are pending (cheap; poll it between accesses in guest mode).
    #[inline]
    pub fn requests_pending(&self) -> bool {
        !self.state().pending().is_empty()
    }

    /// The hardware walk for a TLB miss, in guest mode entered with [`Self::enter_guest_mode`].
    #[inline]
    pub fn walk(&self, gpa: Gpa, need: Access) -> HwWalk {
        assert!(self.in_guest, "the hardware walks only in guest mode");
        let Some(root) = self.root.as_ref() else {
            return HwWalk::Broken { dump: Default::default() };
        };
        let mmu = &self.vm.mmu;
        // SAFETY: in guest mode (asserted above) the vCPU holds its table read section, opened in
        // `enter_guest_mode`, and `root` is its current root, which it keeps: nothing reachable
        // from it is freed before the section ends (rule 3 of `crate::tdp`).
        unsafe { hw_walk(&mmu.cfg.format, &*mmu.host, root.pfn(), root.level(), gpa.gfn(), need) }
    }

    /// EPT violation exit (not present, or present without the right): KVM
    /// `handle_ept_violation` -> `kvm_mmu_page_fault` without RSVD.
    pub fn handle_ept_violation(
        &mut self,
        gpa: Gpa,
        access: FaultAccess,
    ) -> Result<FaultOutcome, FaultError> {
        self.stats.violation_exits += 1;
        self.page_fault(gpa, access, false)
    }

    /// EPT misconfiguration exit: KVM `handle_ept_misconfig` -> `kvm_mmu_page_fault(gpa,
    /// PFERR_RSVD)`. The exit carries no access information: it is handled as a read.
    pub fn handle_ept_misconfig(&mut self, gpa: Gpa) -> Result<FaultOutcome, FaultError> {
        self.stats.misconfig_exits += 1;
        self.page_fault(gpa, FaultAccess::READ, true)
    }

    /// #NPF exit with its error code (RSVD set for MMIO SPTEs).
    pub fn handle_npf(&mut self, gpa: Gpa, err: PfErr) -> Result<FaultOutcome, FaultError> {
        if err.rsvd() {
            self.stats.misconfig_exits += 1;
        } else {
            self.stats.violation_exits += 1;
        }
        self.page_fault(gpa, err.access(), err.rsvd())
    }

    /// KVM `kvm_mmu_page_fault`.
    fn page_fault(
        &mut self,
        gpa: Gpa,
        access: FaultAccess,
        rsvd: bool,
    ) -> Result<FaultOutcome, FaultError> {
        debug_assert!(!self.in_guest, "fault handlers run outside guest mode (after a VM exit)");
        if self.root.is_none() {
            return Ok(self.retry(RetryCause::NoRoot));
        }
        // Not `self.vm.clone()`: an Arc clone and drop are two atomic RMWs on a cache line that
        // every vCPU shares, on every exit (about 14 ns of a 55 ns fast path on the bench host,
        // `vmmu bench --only mmio`).
        // SAFETY: `self.vm` is set once in `new` and never reassigned or moved out while `self`
        // lives, so the Arc it holds keeps the `VmInner` alive for this whole call, and the
        // reference does not outlive the call. `VmInner` is only ever accessed through shared
        // references (its mutable state is behind atomics and locks).
        let vm: &VmInner<H> = unsafe { &*Arc::as_ptr(&self.vm) };
        let guard = vm.memslots.read(self.memslot_reader);
        let set = guard.set(self.as_id);
        if rsvd {
            match self.handle_mmio_page_fault(set, gpa)? {
                FastOutcome::Done(o) => return Ok(o),
                FastOutcome::Invalid => {}
            }
        }
        self.stats.pf_taken += 1;
        self.tdp_page_fault(vm, set, gpa, access)
    }

    fn retry(&mut self, cause: RetryCause) -> FaultOutcome {
        self.stats.retries[cause as usize] += 1;
        FaultOutcome::Retry(cause)
    }

    /// KVM `check_mmio_spte`: no hit while an update is in progress; else the SPTE's generation
    /// bits must equal the low bits of the current generation.
    #[inline]
    fn check_mmio_spte(&self, spte: u64, gen: Generation) -> bool {
        if self.vm.bugs.has(Bug::MmioSpteIgnoresGen) {
            return true;
        }
        if gen.in_progress() {
            return false;
        }
        self.vm.mmu.cfg.codec.generation_bits(spte) == gen.mmio_bits()
    }

    /// The fast path for RSVD faults (KVM `handle_mmio_page_fault`). No lock, no allocation.
    fn handle_mmio_page_fault(
        &mut self,
        set: &MemslotSet,
        gpa: Gpa,
    ) -> Result<FastOutcome, FaultError> {
        let bugs = self.vm.bugs;
        let gen = set.generation();
        let gfn = gpa.gfn();
        if self.mmio_cache.match_gpa(gfn, gen, bugs) {
            self.stats.mmio_cache_hits += 1;
            self.stats.pf_fast += 1;
            let access = self.mmio_cache.entry().map_or(Access::NONE, |(_, a)| a);
            return Ok(FastOutcome::Done(FaultOutcome::Emulate {
                gpa,
                access,
                source: EmulateSource::VcpuCacheHit,
            }));
        }
        let (root_pfn, root_level) = match self.root.as_ref() {
            Some(r) => (r.pfn(), r.level()),
            None => return Ok(FastOutcome::Done(self.retry(RetryCause::NoRoot))),
        };
        let walk = {
            let _t = self.vm.mmu.table_srcu.read_lock(self.table_reader);
            self.vm.mmu.walk_lockless(root_pfn, root_level, gfn)
        };
        let codec = self.vm.mmu.cfg.codec;
        match walk {
            LocklessWalk::Reserved { level, reason, dump } => {
                Err(FaultError::Misconfig { gpa, level: level.get(), reason, dump })
            }
            LocklessWalk::Broken { dump } => Err(FaultError::Internal { gpa, dump }),
            LocklessWalk::Leaf { leaf, level, dump } => {
                if codec.is_mmio(leaf) {
                    if !self.check_mmio_spte(leaf, gen) {
                        self.stats.stale_gen_misses += 1;
                        return Ok(FastOutcome::Invalid);
                    }
                    let access = codec.access(leaf);
                    self.mmio_cache.fill(0, codec.gfn(leaf), access, gen, bugs);
                    self.stats.mmio_spte_hits += 1;
                    self.stats.pf_fast += 1;
                    return Ok(FastOutcome::Done(FaultOutcome::Emulate {
                        gpa,
                        access,
                        source: EmulateSource::MmioSpteHit,
                    }));
                }
                if SpteFormat::is_frozen(leaf) {
                    return Ok(FastOutcome::Done(self.retry(RetryCause::Frozen)));
                }
                if bugs.has(Bug::ZappedSpteIsMisconfig) && !SpteFormat::is_mmu_present(leaf) {
                    // The bug: a concurrently zapped entry is reported as a misconfiguration.
                    return Err(FaultError::Misconfig {
                        gpa,
                        level: level.get(),
                        reason: crate::spte::RsvdReason::ReservedBit { bit: 0, level: level.get() },
                        dump,
                    });
                }
                // Zapped or changed under the walk: "let the CPU fault again on the address".
                Ok(FastOutcome::Done(self.retry(RetryCause::ZappedUnderWalk)))
            }
        }
    }

    /// The slow path (KVM `kvm_tdp_mmu_page_fault`), inside the caller's memslot read section.
    fn tdp_page_fault(
        &mut self,
        vm: &VmInner<H>,
        set: &MemslotSet,
        gpa: Gpa,
        access: FaultAccess,
    ) -> Result<FaultOutcome, FaultError> {
        let mmu = &vm.mmu;
        let bugs = vm.bugs;
        let codec = mmu.cfg.codec;
        let gfn = gpa.gfn();
        let gen = set.generation();
        // Snapshot before translating the host address (see tdp::invalidate).
        let mmu_seq = mmu.inval.seq();
        let mut slot = set.find_cached(gfn, &mut self.slot_cache);
        if slot.as_ref().is_some_and(|s| s.is_invalid()) {
            if !bugs.has(Bug::InvalidSlotAsMmio) {
                return Ok(self.retry(RetryCause::InvalidSlot));
            }
            slot = None; // the bug: a slot being deleted is treated as no slot, i.e. MMIO
        }
        let spec = match &slot {
            Some(s) => {
                if mmu.inval.retry_unsafe(mmu_seq, gfn) {
                    return Ok(self.retry(RetryCause::HostInvalidation));
                }
                if access.write && s.is_readonly() {
                    // KVM_PFN_ERR_RO_FAULT: emulate, and never cache it as MMIO (otherwise
                    // reads of that gfn would look like MMIO too).
                    self.stats.readonly_write_emulations += 1;
                    self.stats.pf_emulate += 1;
                    return Ok(FaultOutcome::Emulate {
                        gpa,
                        access: access.required(),
                        source: EmulateSource::ReadOnlyWrite,
                    });
                }
                let hva = s.hva_of(gfn);
                let hp = mmu
                    .host
                    .translate(hva, access.write)
                    .map_err(|fault| FaultError::HostFault { gpa, hva, fault })?;
                let max_level =
                    max_mapping_level(s, gfn, hp.level, mmu.cfg.format.max_leaf_level());
                let offset = gfn.raw() & (max_level.pages() - 1);
                let writable =
                    !s.is_readonly() && hp.writable && (!s.dirty_logging() || access.write);
                LeafSpec::Ram {
                    base_pfn: Pfn(hp.pfn.raw() - offset),
                    max_level,
                    access: Access::ALL,
                    writable,
                }
            }
            None => {
                // KVM `kvm_handle_noslot_fault`.
                let mmio_access = Access::from_bits(Access::ALL.bits() & codec.access_mask() as u8);
                self.mmio_cache.fill(0, gfn, mmio_access, gen, bugs);
                self.stats.slow_path_mmio += 1;
                self.stats.pf_emulate += 1;
                let emulate = FaultOutcome::Emulate {
                    gpa,
                    access: mmio_access,
                    source: EmulateSource::SlowPathMmio,
                };
                if !codec.enabled() || gfn > mmu.cfg.max_gfn {
                    return Ok(emulate);
                }
                LeafSpec::Mmio(codec.make(gfn, gen, Access::ALL))
            }
        };

        let roots = mmu.mmu_lock.read();
        let Some(root) = self.root.as_ref() else {
            return Ok(self.retry(RetryCause::NoRoot));
        };
        // KVM `is_page_fault_stale` (facts §4).
        if !bugs.has(Bug::NoStaleRootCheck) {
            match root.kind() {
                RootKind::Tdp if root.is_obsolete() => {
                    drop(roots);
                    return Ok(self.retry(RetryCause::ObsoleteRoot));
                }
                RootKind::Pageless if self.state().pending().has(Request::FreeObsoleteRoots) => {
                    drop(roots);
                    return Ok(self.retry(RetryCause::PagelessRootReloadPending));
                }
                _ => {}
            }
        }
        if slot.is_some() && mmu.inval.retry(mmu_seq, gfn) {
            drop(roots);
            return Ok(self.retry(RetryCause::HostInvalidation));
        }
        let outcome = mmu.map_locked(root.pfn(), root.level(), gfn, access, spec);
        drop(roots);
        let is_mmio = matches!(spec, LeafSpec::Mmio(_));
        match outcome {
            MapOutcome::Installed { .. } if is_mmio => {
                self.stats.pf_mmio_spte_created += 1;
                Ok(FaultOutcome::Emulate {
                    gpa,
                    access: Access::from_bits(Access::ALL.bits() & codec.access_mask() as u8),
                    source: EmulateSource::SlowPathMmio,
                })
            }
            // KVM returns EMULATE for an MMIO SPTE even when it was already there.
            MapOutcome::Spurious if is_mmio => Ok(FaultOutcome::Emulate {
                gpa,
                access: Access::from_bits(Access::ALL.bits() & codec.access_mask() as u8),
                source: EmulateSource::SlowPathMmio,
            }),
            MapOutcome::Installed { .. } => {
                self.stats.pf_fixed += 1;
                Ok(FaultOutcome::Fixed)
            }
            // Another vCPU mapped the gfn with rights enough for this access (a RAM leaf from a
            // newer memslot set, while this fault decided from an older one): let the access
            // walk again and use it. Not Emulate, even if this fault thought "MMIO".
            MapOutcome::Spurious | MapOutcome::PresentLeafAllows => {
                self.stats.pf_spurious += 1;
                Ok(FaultOutcome::Spurious)
            }
            MapOutcome::Retry => Ok(self.retry(RetryCause::Race)),
            MapOutcome::OutOfMemory => Err(FaultError::OutOfMemory(gpa)),
            MapOutcome::Broken => Err(FaultError::Internal { gpa, dump: Default::default() }),
        }
    }
}

/// The largest level `gfn` may be mapped at (KVM `kvm_mmu_max_mapping_level` for TDP): the slot
/// covers the whole aligned block, the host maps it with a page at least that large, gfn and host
/// address are equally aligned, and the slot is not dirty-logged.
fn max_mapping_level(
    slot: &crate::memslot::Memslot,
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
        let block = gfn.raw() & !(pages - 1);
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

/// A guest-mode period of one vCPU (between VM entry and VM exit). While it lives the vCPU may
/// use its TLB and walk the tables like the hardware. Dropping it is the VM exit.
pub struct GuestMode<'a, H: Host> {
    vm: &'a Arc<VmInner<H>>,
    state: &'a VcpuState,
    root_pfn: Pfn,
    root_level: Level,
    _table: ReadGuard<'a>,
}

impl<H: Host> GuestMode<'_, H> {
    /// Whether a request arrived (the "IPI"): the vCPU should exit and service it.
    #[inline]
    pub fn requests_pending(&self) -> bool {
        !self.state.pending().is_empty()
    }

    /// The hardware's walk for a TLB miss on `gpa` needing `need`.
    #[inline]
    pub fn walk(&self, gpa: Gpa, need: Access) -> HwWalk {
        let mmu = &self.vm.mmu;
        // SAFETY: `self` holds the vCPU's table read section (`_table`) for its whole life, and
        // borrows the vCPU, whose current root (`root_pfn`) cannot change meanwhile.
        unsafe {
            hw_walk(&mmu.cfg.format, &*mmu.host, self.root_pfn, self.root_level, gpa.gfn(), need)
        }
    }

    /// The root being walked.
    pub fn root(&self) -> (Pfn, Level) {
        (self.root_pfn, self.root_level)
    }
}

impl<H: Host> Drop for GuestMode<'_, H> {
    fn drop(&mut self) {
        self.state.exit_guest_mode();
    }
}

impl<H: Host> Drop for Vcpu<H> {
    fn drop(&mut self) {
        self.exit_guest_mode();
        if let Some(r) = self.root.take() {
            self.vm.mmu.put_root(r);
        }
        // KVM `kvm_vcpu_destroy`: the index and the reader records go back for the next vCPU.
        self.vm.memslots.unregister_reader(self.memslot_reader);
        self.vm.mmu.remove_vcpu(self.index, self.table_reader);
    }
}
