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
//!   install an MMIO SPTE if caching is on, the gfn is in range and no update is in progress
//!   (`MmuConfig::noslot_mmio_spte`), Emulate; a write to a
//!   read-only slot -> Emulate, never cached; RAM -> translate the host address and install the
//!   leaf under the shared MMU lock after the staleness checks of §4.
//!
//! # Generations used
//! `check_mmio_spte` and the per-vCPU cache compare against the generation of the vCPU's own
//! address space. KVM's cache helpers read address space 0 (`kvm_memslots`); with generations
//! unique across address spaces, using the vCPU's own is never weaker, and right for a vCPU in SMM.
//!
//! # Shape
//! [`Vcpu`] holds the VM's shared state (`Arc<VmShared>`), its SRCU reader records
//! (`VcpuReaders`: memslot and table), its own MMU state (`VcpuMmu`: caches, guest mode), the
//! state of its VM's kind of MMU (`VcpuMmuState`: a TDP vCPU's root, or a shadow vCPU's guest
//! paging state and shadow roots) and its counters, as five fields, so a fault borrows the
//! shared state, a read section borrows the reader records and a path holds its kind's state
//! while the fault mutates the vCPU's own, without aliasing tricks. The fault path itself is in
//! `fault_path.rs`: entry point -> fast path -> [`crate::fault::PageFault`] faultin -> stale
//! check and map under the MMU lock.
//!
//! # Invariant
//! A vCPU's `VcpuMmuState` is of its VM's kind of MMU ([`crate::vm::MmuKind`]): `Vcpu::new`
//! chooses it from the VM's, and nothing changes it. A path matches the state once; its VM's
//! MMU of the same kind comes from `VmShared::tdp_for` or `VmShared::shadow_for`, the only
//! places that name the impossible mixed case. An embedder calling an entry point of the other
//! kind gets its error ([`FaultError::WrongMmu`], [`MmuError::NotTdp`],
//! [`ShadowError::NotShadow`]); a hardware walk of the other kind is a not-present violation,
//! whose exit handler answers `WrongMmu`.

mod fault_path;
pub mod mmio_cache;
mod shadow_fault;
mod shadow_path;

pub use shadow_path::{FaultAddr, ShadowError, NUM_PREV_ROOTS};

use crate::fault::{FaultError, FaultOutcome, PageFault, PfErr};
use crate::host::Host;
use crate::memslot::SlotCache;
use crate::mmu_core::MmuError;
use crate::mmu_core::{hw_walk, tdp_need, HwWalk};
use crate::requests::{Request, Requests, VcpuState};
use crate::shadow::ShadowMmu;
use crate::shared::{VmMmu, VmShared};
use crate::srcu::{ReadGuard, ReaderId};
use crate::stats::VcpuStats;
use crate::sync::Arc;
use crate::tdp::root::RootKind;
use crate::tdp::RootRef;
use crate::tdp::Tdp;
use crate::types::{Access, AsId, FaultAccess, Gpa, Level, Pfn};
use crate::vm::MmuKind;
use mmio_cache::MmioInfoCache;

/// What the vCPU's owner must do before entering the guest, after [`Vcpu::service_requests`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct EntryWork {
    /// Flush the vCPU's TLB (a flush request, or a new root).
    pub flush_tlb: bool,
}

/// One vCPU of a [`crate::vm::Vm`]. Owned by the thread that runs it.
///
/// The loop a hypervisor runs around it: service requests, enter guest mode, let the hardware
/// walk (here [`GuestMode::walk`]), and on an exit call the entry point for it.
///
/// ```
/// use std::sync::Arc;
/// use vmmu::fault::{EmulateSource, FaultOutcome};
/// use vmmu::memslot::UserspaceMemoryRegion;
/// use vmmu::spte::FormatKind;
/// use vmmu::tdp::HwWalk;
/// use vmmu::testing::TestHost;
/// use vmmu::vm::{Vm, VmConfig};
/// use vmmu::{Access, FaultAccess, Gpa};
///
/// let host = Arc::new(TestHost::new(16));
/// host.map(0x4000_0000, 1 << 20, 0x4_0000, vmmu::Level::L4K, true);
/// let vm = Vm::new(VmConfig::new(FormatKind::Ept, 46)?, host)?;
/// vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 1 << 20, 0x4000_0000))?;
/// let mut vcpu = vm.create_vcpu()?;
/// vcpu.service_requests()?; // loads a root
///
/// // RAM: the first walk misses (EPT violation), the fault maps it, the next walk translates.
/// let walk = vcpu.enter_guest().unwrap().walk(Gpa(0x2000), Access::NONE);
/// assert!(matches!(walk, HwWalk::Violation { .. }));
/// assert_eq!(vcpu.handle_ept_violation(Gpa(0x2000), FaultAccess::READ)?, FaultOutcome::Fixed);
/// let walk = vcpu.enter_guest().unwrap().walk(Gpa(0x2000), Access::NONE);
/// assert!(matches!(walk, HwWalk::Translated { .. }));
///
/// // MMIO: no slot. The slow path emulates and installs an MMIO SPTE; the next access traps as
/// // an EPT misconfiguration and the fast path answers from the per-vCPU cache.
/// let o = vcpu.handle_ept_violation(Gpa(0xfee0_0000), FaultAccess::READ)?;
/// assert!(matches!(o, FaultOutcome::Emulate { source: EmulateSource::SlowPathMmio, .. }));
/// let walk = vcpu.enter_guest().unwrap().walk(Gpa(0xfee0_0000), Access::NONE);
/// assert!(matches!(walk, HwWalk::Misconfig { .. }));
/// let o = vcpu.handle_ept_misconfig(Gpa(0xfee0_0000))?;
/// assert!(matches!(o, FaultOutcome::Emulate { source: EmulateSource::VcpuCacheHit, .. }));
/// # Ok::<(), vmmu::Error>(())
/// ```
// Two cache lines of alignment: an embedder may keep its vCPUs side by side (a `Vec<Vcpu>`), and
// each vCPU's thread writes its counters and caches on every fault; unaligned, the end of one
// vCPU and the start of the next could share a line that both CPUs then bounce.
#[repr(align(128))]
pub struct Vcpu<H: Host> {
    vm: Arc<VmShared<H>>,
    readers: VcpuReaders,
    st: VcpuMmu,
    /// The state of the VM's kind of MMU, fixed at creation. Apart from [`VcpuMmu`] so a path
    /// can hold its kind's state (its root, or its shadow state) while it mutates the rest.
    mmu: VcpuMmuState,
    /// This vCPU's counters.
    pub stats: VcpuStats,
}

/// A vCPU's SRCU reader records: its memslot reads and its table walks (its own, or the
/// hardware's in guest mode). Apart from [`VcpuMmu`] so a read section can borrow them while the
/// fault path mutates the rest.
pub(crate) struct VcpuReaders {
    memslot: ReaderId,
    table: ReaderId,
}

/// A vCPU's own MMU state that does not depend on the kind of MMU (KVM: the `kvm_vcpu_arch`
/// MMU fields).
pub(crate) struct VcpuMmu {
    index: usize,
    as_id: AsId,
    mmio_cache: MmioInfoCache,
    /// The last level-1 table of the fast path's lockless walks (`mmu_core/walk.rs`).
    leaf_tables: crate::mmu_core::LeafTableCache,
    slot_cache: SlotCache,
    /// In guest mode through [`Vcpu::enter_guest_mode`] (holding a raw table read section).
    in_guest: bool,
    /// A [`GuestMode`] guard was made and has not been dropped: set by [`Vcpu::enter_guest`],
    /// cleared by the guard's drop. Still set when the vCPU is used again, the guard was
    /// forgotten ([`Vcpu::exit_guest_mode`]).
    guard_open: bool,
}

/// The part of a vCPU's MMU state that depends on its VM's kind of MMU. Chosen by
/// [`Vcpu::new`] from the VM's [`VmMmu`] and never changed, so a vCPU's state is always of its
/// VM's kind ([`VmShared::tdp_for`], [`VmShared::shadow_for`]).
// One per vCPU, next to its caches: boxing the shadow state would cost a pointer chase on every
// shadow fault's fast path.
#[allow(clippy::large_enum_variant)]
pub(crate) enum VcpuMmuState {
    /// A vCPU of a TDP VM.
    Tdp(TdpVcpu),
    /// A vCPU of a shadow-paging VM: the guest's paging state and the shadow roots.
    Shadow(shadow_path::ShadowVcpu),
}

/// A TDP vCPU's own state: its current root, loaded by [`Vcpu::service_requests`].
pub(crate) struct TdpVcpu {
    root: Option<RootRef>,
}

impl TdpVcpu {
    /// The TDP part of [`Vcpu::service_requests`] for the vCPU whose state is `self` and `st`,
    /// of VM `vm`, with request word `state` and its snapshot `pending`: drop the root if it is
    /// obsolete (or pageless) on request, take the flush and kick requests, and load a root if
    /// none is loaded.
    #[allow(clippy::too_many_arguments)]
    fn service<H: Host>(
        &mut self,
        vm: &VmShared<H>,
        st: &mut VcpuMmu,
        stats: &mut VcpuStats,
        state: &VcpuState,
        pending: Requests,
        free_obsolete: bool,
        work: &mut EntryWork,
    ) -> Result<(), MmuError> {
        if free_obsolete {
            // KVM `kvm_mmu_free_obsolete_roots`: pageless roots count as obsolete.
            let stale = self
                .root
                .as_ref()
                .is_some_and(|r| r.kind() == RootKind::Pageless || r.is_obsolete());
            if stale {
                // `Vcpu::drop_root` for a TDP vCPU.
                if let Some(r) = self.root.take() {
                    vm.tdp_for(self).put_root(r);
                }
                st.mmio_cache.clear();
            }
        }
        take_flush_and_kick(state, pending, work);
        if self.root.is_none() {
            self.root = Some(vm.tdp_for(self).get_root(st.as_id)?);
            stats.root_loads += 1;
            work.flush_tlb = true;
        }
        Ok(())
    }
}

/// Clears `r` from request word `state` when the snapshot `pending` holds it; says whether it
/// did.
fn take_request(state: &VcpuState, pending: Requests, r: Request) -> bool {
    let held = pending.has(r);
    if held {
        state.clear(r);
    }
    held
}

/// Clears the TLB-flush and kick requests of the snapshot `pending` from `state`: a flush
/// becomes `work.flush_tlb`; a kick needs nothing more (leaving guest mode was the whole point:
/// the read section it held has ended).
fn take_flush_and_kick(state: &VcpuState, pending: Requests, work: &mut EntryWork) {
    work.flush_tlb |= take_request(state, pending, Request::TlbFlush);
    take_request(state, pending, Request::Kick);
}

impl<H: Host> VmShared<H> {
    /// The TDP MMU of the VM of a vCPU whose state is `_vcpu`: a vCPU's state is of its VM's
    /// kind ([`VcpuMmuState`]), so the VM is a TDP VM.
    #[inline]
    fn tdp_for(&self, _vcpu: &TdpVcpu) -> Tdp<'_, H> {
        match self.tdp() {
            Some(tdp) => tdp,
            None => unreachable!("a TDP vCPU of a shadow-paging VM (Vcpu::new)"),
        }
    }

    /// The shadow MMU of the VM of a vCPU whose state is `_vcpu` (as [`Self::tdp_for`]).
    #[inline]
    pub(crate) fn shadow_for(&self, _vcpu: &shadow_path::ShadowVcpu) -> &ShadowMmu {
        match self.shadow() {
            Some(shadow) => shadow,
            None => unreachable!("a shadow vCPU of a TDP VM (Vcpu::new)"),
        }
    }
}

impl<H: Host> Vcpu<H> {
    pub(crate) fn new(vm: Arc<VmShared<H>>) -> Result<Self, MmuError> {
        let (index, mut table) = vm.core.add_vcpu()?;
        let memslot = match vm.memslots.register_reader() {
            Ok(r) => r,
            Err(_) => {
                vm.core.remove_vcpu(index, &mut table);
                return Err(MmuError::TooManyVcpus(vm.core.cfg.max_vcpus));
            }
        };
        let mmu = match vm.mmu {
            VmMmu::Tdp(_) => VcpuMmuState::Tdp(TdpVcpu { root: None }),
            VmMmu::Shadow(_) => VcpuMmuState::Shadow(shadow_path::ShadowVcpu::new()),
        };
        let st = VcpuMmu {
            index,
            as_id: AsId(0),
            mmio_cache: MmioInfoCache::new(),
            leaf_tables: Default::default(),
            slot_cache: SlotCache::default(),
            in_guest: false,
            guard_open: false,
        };
        let readers = VcpuReaders { memslot, table };
        Ok(Vcpu { vm, readers, st, mmu, stats: VcpuStats::default() })
    }

    /// The vCPU's index in its VM.
    pub fn index(&self) -> usize {
        self.st.index
    }

    /// The address space the vCPU runs in (0; 1 models SMM).
    pub fn as_id(&self) -> AsId {
        self.st.as_id
    }

    /// Switches the vCPU's address space (KVM: entering or leaving SMM): the root changes.
    /// An address space the VM does not have ([`crate::vm::VmConfig::nr_address_spaces`]) is
    /// refused ([`MmuError::NoSuchAddressSpace`]; KVM has no SMM address space without SMM) and
    /// the vCPU stays where it was.
    pub fn set_as_id(&mut self, as_id: AsId) -> Result<(), MmuError> {
        let nr = self.vm.memslots.nr_address_spaces();
        if as_id.0 >= nr {
            return Err(MmuError::NoSuchAddressSpace { as_id: as_id.0, nr });
        }
        self.exit_guest_mode();
        if self.st.as_id != as_id {
            self.st.as_id = as_id;
            self.drop_root();
        }
        Ok(())
    }

    /// The VM's SPTE format (which exits the hardware raises).
    pub fn format(&self) -> crate::spte::SpteFormat {
        self.vm.core.cfg.format
    }

    /// The per-vCPU MMIO info cache (read-only view, for tests and reports).
    pub fn mmio_cache(&self) -> &MmioInfoCache {
        &self.st.mmio_cache
    }

    /// The current TDP root, if loaded (`None` on a vCPU of a shadow-paging VM, whose roots are
    /// shadow pages: [`Self::shadow_root_kind`]).
    pub fn root(&self) -> Option<&RootRef> {
        match &self.mmu {
            VcpuMmuState::Tdp(tv) => tv.root.as_ref(),
            VcpuMmuState::Shadow(_) => None,
        }
    }

    fn state(&self) -> &VcpuState {
        &self.vm.core.vcpus[self.st.index]
    }

    fn drop_root(&mut self) {
        self.unload();
        // A new root: nothing cached under the old one may be trusted (issue 4, point 5).
        self.st.mmio_cache.clear();
    }

    /// Drops the current root, and under shadow paging every previous root too (KVM
    /// `kvm_mmu_unload`). The caller is outside guest mode.
    fn unload(&mut self) {
        let Vcpu { vm, st, mmu, .. } = self;
        match mmu {
            VcpuMmuState::Tdp(tv) => {
                if let Some(r) = tv.root.take() {
                    vm.tdp_for(tv).put_root(r);
                }
            }
            VcpuMmuState::Shadow(sv) => sv.unload(&vm.core, vm.shadow_for(sv), &mut st.mmio_cache),
        }
    }

    /// Handles pending requests and loads a root if none is loaded (KVM: the request checks of
    /// `vcpu_enter_guest` and `kvm_mmu_reload`). Between accesses; in guest mode it leaves it
    /// first.
    pub fn service_requests(&mut self) -> Result<EntryWork, MmuError> {
        self.exit_guest_mode();
        let mut work = EntryWork::default();
        let Vcpu { vm, readers, st, mmu, stats } = self;
        let state = &vm.core.vcpus[st.index];
        let pending = state.pending();
        let free_obsolete = take_request(state, pending, Request::FreeObsoleteRoots);
        match mmu {
            VcpuMmuState::Tdp(tv) => {
                tv.service(vm, st, stats, state, pending, free_obsolete, &mut work)?;
            }
            VcpuMmuState::Shadow(sv) => {
                take_flush_and_kick(state, pending, &mut work);
                sv.service(vm, readers, st, stats, free_obsolete, &mut work)?;
            }
        }
        if work.flush_tlb {
            stats.tlb_flush += 1;
        }
        Ok(work)
    }

    /// Loads a root without a page-tracking state (KVM's special roots), for tests and models of
    /// 18c841e1f411. Replaces the current root. A TDP VM's only: a shadow-paging vCPU is
    /// refused ([`MmuError::NotTdp`]), since the hardware walk would take the TDP root over the
    /// shadow root and fault forever.
    pub fn load_pageless_root(&mut self) -> Result<(), MmuError> {
        let Vcpu { vm, readers, st, mmu, .. } = self;
        let VcpuMmuState::Tdp(tv) = mmu else {
            return Err(MmuError::NotTdp);
        };
        st.leave_guest_mode(vm, readers);
        // `Self::drop_root` for a TDP vCPU.
        if let Some(r) = tv.root.take() {
            vm.tdp_for(tv).put_root(r);
        }
        st.mmio_cache.clear();
        tv.root = Some(vm.tdp_for(tv).make_pageless_root(st.as_id)?);
        // KVM `kvm_mmu_load` flushes the current TLB after every root load ("flushing on alloc
        // also allows KVM to skip the TLB flush when freeing a root"): `put_root` relies on it
        // for the pageless root just dropped, whose translations this vCPU's TLB may still hold
        // (a later host invalidation finds no root mapping the page and flushes nobody).
        self.state().request(Request::TlbFlush);
        Ok(())
    }

    /// KVM `kvm_vcpu_mark_page_dirty`: the hypervisor wrote guest page `gpa` on this vCPU's
    /// behalf (an emulated instruction's store, a paravirtual structure it updates): marks it in
    /// the dirty log of its slot in the vCPU's address space, if that slot logs. The MMU logs the
    /// writes it makes or lets through itself (faults, the guest walker's A/D bits), and
    /// [`Self::track_write`] the emulated writes it reports; a store the VMM makes through its own
    /// mapping for its own purposes is not the guest's and is not logged (as in KVM).
    pub fn mark_page_dirty(&self, gpa: Gpa) {
        let guard = self.vm.memslots.read(&self.readers.memslot);
        guard.set(self.st.as_id).mark_gfn_dirty(gpa.gfn());
    }

    /// Enters guest mode (KVM: `vcpu->mode = IN_GUEST_MODE` before VM entry). `Err` when
    /// requests are pending or no root is loaded: call [`Self::service_requests`] first. A vCPU
    /// in guest mode through [`Self::enter_guest_mode`] leaves it first (a VM exit), so the
    /// guard's period is the only one: the guard's drop would otherwise mark the vCPU out of
    /// guest mode while the raw period went on (remote flushes would then stop waiting for it).
    pub fn enter_guest(&mut self) -> Result<GuestMode<'_, H>, Requests> {
        self.exit_guest_mode();
        let Some((root_pfn, root_level)) = self.hw_root() else {
            return Err(self.state().pending());
        };
        let Vcpu { vm, readers, st, mmu, .. } = self;
        // The read section first: the hardware walker may reach any table from the root.
        let table_guard = vm.core.table_srcu.read_lock(&readers.table);
        let state = &vm.core.vcpus[st.index];
        state.enter_guest_mode()?;
        let mmu = match mmu {
            VcpuMmuState::Tdp(_) => MmuKind::Tdp,
            VcpuMmuState::Shadow(_) => MmuKind::Shadow,
        };
        st.guard_open = true;
        let open = &mut st.guard_open;
        Ok(GuestMode { vm, state, mmu, root_pfn, root_level, open, _table: table_guard })
    }

    /// Enters guest mode without a guard, for drivers whose guest-mode period spans several calls
    /// (the software machine). Same contract as [`Self::enter_guest`]; leave with
    /// [`Self::exit_guest_mode`]. Entering again while in guest mode does nothing. Methods that
    /// change the vCPU's MMU state (`service_requests`, `set_as_id`, the shadow MMU's CR3,
    /// INVLPG and write-tracking entry points) are VM exits: called in guest mode, they leave it
    /// first. Exit handlers (`handle_*`) must be called after leaving guest mode (debug builds
    /// assert it); called in guest mode, a handler's fast path runs as it is, and its slow path
    /// leaves guest mode before anything that could wait for this vCPU.
    ///
    /// A thread must not update memslots (or zap, flush, or do anything else that waits for the
    /// vCPUs) while a vCPU it drives is in guest mode: the update waits for that vCPU to leave,
    /// which it never does. Leave guest mode first, as a KVM vCPU thread returns from `KVM_RUN`
    /// before its VMM issues an ioctl on the same thread.
    pub fn enter_guest_mode(&mut self) -> Result<(), Requests> {
        if self.st.in_guest {
            return Ok(());
        }
        self.end_forgotten_guest_mode();
        if self.hw_root().is_none() {
            return Err(self.state().pending());
        }
        let mmu = &self.vm.core;
        mmu.table_srcu.read_lock_raw(&self.readers.table);
        if let Err(r) = mmu.vcpus[self.st.index].enter_guest_mode() {
            // SAFETY: opened just above by this thread, no guard exists.
            unsafe { mmu.table_srcu.read_unlock_raw(&self.readers.table) };
            return Err(r);
        }
        self.st.in_guest = true;
        Ok(())
    }

    /// The frame and level the hardware walks from: the TDP root, or the shadow root.
    fn hw_root(&self) -> Option<(Pfn, Level)> {
        match &self.mmu {
            VcpuMmuState::Tdp(tv) => tv.root.as_ref().map(|r| (r.pfn(), r.level())),
            VcpuMmuState::Shadow(sv) => sv.root.as_ref().map(|r| r.hw_root()),
        }
    }

    /// Leaves guest mode entered with [`Self::enter_guest_mode`] (a VM exit). No-op outside it.
    /// It also ends the guest-mode period of a [`GuestMode`] guard that was forgotten
    /// (`core::mem::forget`), whose drop never runs: that period would otherwise hold up every
    /// memslot update, and the vCPU's drop, for good.
    pub fn exit_guest_mode(&mut self) {
        let Vcpu { vm, readers, st, .. } = self;
        st.leave_guest_mode(vm, readers);
        self.end_forgotten_guest_mode();
    }

    /// Ends the guest-mode period of a forgotten [`GuestMode`] guard, if any: closes the read
    /// sections it left open and clears the guest-mode bit. Outside raw guest mode only
    /// ([`Self::exit_guest_mode`], and [`Self::enter_guest_mode`] before it enters); a test of
    /// the vCPU's own flag when there is none.
    #[inline]
    fn end_forgotten_guest_mode(&mut self) {
        if self.st.guard_open {
            self.close_forgotten_sections();
        }
    }

    #[cold]
    fn close_forgotten_sections(&mut self) {
        self.st.guard_open = false;
        let core = &self.vm.core;
        for _ in 0..core.table_srcu.open_sections(&self.readers.table) {
            // SAFETY: the raw guest-mode period is over (`leave_guest_mode` just now), and exit
            // handlers close their sections before they return, so a section still open on
            // this vCPU's table reader is a `GuestMode` guard's. That guard borrows the vCPU
            // mutably, and this method has the vCPU mutably: the guard was forgotten, so its
            // drop (the only other close of that section) never runs.
            unsafe { core.table_srcu.read_unlock_raw(&self.readers.table) };
        }
        let state = &core.vcpus[self.st.index];
        if state.in_guest_mode() {
            state.exit_guest_mode();
        }
    }

    /// Whether the vCPU is in guest mode through [`Self::enter_guest_mode`].
    pub fn in_guest_mode(&self) -> bool {
        self.st.in_guest
    }

    /// Whether requests are pending (cheap; poll it between accesses in guest mode).
    #[inline]
    pub fn requests_pending(&self) -> bool {
        !self.state().pending().is_empty()
    }

    /// The hardware walk for a TLB miss, in guest mode entered with [`Self::enter_guest_mode`].
    /// A `gpa` the root does not reach is a not-present violation (see [`GuestMode::walk`]).
    ///
    /// On a vCPU of a shadow-paging VM, whose hardware walks guest-virtual addresses
    /// ([`Self::walk_gva`]), every walk is a not-present violation, and its exit handler
    /// ([`Self::handle_ept_violation`]) answers [`FaultError::WrongMmu`]: the wrong kind is an
    /// error at the exit, as at every other entry point of the other kind.
    ///
    /// # Panics
    /// Outside guest mode (a caller bug): only guest mode's read section keeps the tables the
    /// walk reads from being freed.
    #[inline]
    pub fn walk(&self, gpa: Gpa, need: Access) -> HwWalk {
        assert!(self.st.in_guest, "the hardware walks only in guest mode");
        // In guest mode a TDP vCPU always has its root (entering needs one, and whatever drops
        // it leaves guest mode first): no root here is a shadow-paging vCPU.
        let VcpuMmuState::Tdp(TdpVcpu { root: Some(root) }) = &self.mmu else {
            return unreachable_walk();
        };
        if !tdp_reaches(root.level(), gpa) {
            return unreachable_walk();
        }
        let mmu = &self.vm.core;
        let (format, gfn) = (&mmu.cfg.format, gpa.gfn());
        // Nested walks: on NPT every guest access is a user access (`tdp_need`).
        // SAFETY: in guest mode (asserted above) the vCPU holds its table read section, opened in
        // `enter_guest_mode`, and `root` is its current root, which it keeps: nothing reachable
        // from it is freed before the section ends (rule 3 of `crate::tdp`).
        unsafe { hw_walk(format, &*mmu.host, root.pfn(), root.level(), gfn, tdp_need(need)) }
    }

    /// EPT violation exit (not present, or present without the right): KVM
    /// `handle_ept_violation` -> `kvm_mmu_page_fault` without RSVD.
    pub fn handle_ept_violation(
        &mut self,
        gpa: Gpa,
        access: FaultAccess,
    ) -> Result<FaultOutcome, FaultError> {
        debug_assert!(!self.st.in_guest, "an exit handler is called after the VM exit");
        self.stats.violation_exits += 1;
        self.page_fault(PageFault::tdp(gpa, PfErr::from_access(access, false)))
    }

    /// EPT misconfiguration exit: KVM `handle_ept_misconfig` -> `kvm_mmu_page_fault(gpa,
    /// PFERR_RSVD)`. The exit carries no access information: it is handled as a read. The
    /// per-vCPU MMIO cache is looked up here, inline: a hit returns without entering the fault
    /// path (2.4 ns less per hit, measured with `vmmu bench --only mmio`).
    pub fn handle_ept_misconfig(&mut self, gpa: Gpa) -> Result<FaultOutcome, FaultError> {
        debug_assert!(!self.st.in_guest, "an exit handler is called after the VM exit");
        self.stats.misconfig_exits += 1;
        let Vcpu { vm, readers, st, mmu, stats } = self;
        let VcpuMmuState::Tdp(tv @ TdpVcpu { root: Some(root) }) = &*mmu else {
            return no_tdp_root(mmu, stats);
        };
        match st.mmio_cache_probe(vm, stats, gpa) {
            fault_path::CacheProbe::Hit(hit) => Ok(hit),
            fault_path::CacheProbe::Miss(gen) => {
                st.ept_misconfig_after_cache_miss(vm, readers, stats, (tv, root), gen, gpa)
            }
        }
    }

    /// #NPF exit with its error code (RSVD set for MMIO SPTEs).
    pub fn handle_npf(&mut self, gpa: Gpa, err: PfErr) -> Result<FaultOutcome, FaultError> {
        debug_assert!(!self.st.in_guest, "an exit handler is called after the VM exit");
        if err.rsvd() {
            self.stats.misconfig_exits += 1;
        } else {
            self.stats.violation_exits += 1;
        }
        self.page_fault(PageFault::tdp(gpa, err))
    }

    /// KVM `kvm_mmu_page_fault`.
    fn page_fault(&mut self, fault: PageFault) -> Result<FaultOutcome, FaultError> {
        // Disjoint borrows: the shared VM state, the reader records, the vCPU's own MMU state,
        // its kind's state (held: the root) and its counters.
        let Vcpu { vm, readers, st, mmu, stats } = self;
        let VcpuMmuState::Tdp(tv @ TdpVcpu { root: Some(root) }) = &*mmu else {
            return no_tdp_root(mmu, stats);
        };
        st.page_fault(vm, readers, stats, (tv, root), fault)
    }
}

/// A TDP exit on a vCPU without a TDP root: on a TDP vCPU whose root is not loaded yet, Retry
/// (it loads one before it enters again); on a shadow-paging vCPU, which never has a TDP root,
/// [`FaultError::WrongMmu`], as retrying would loop forever (the reverse of
/// `handle_page_fault` on a TDP vCPU).
#[cold]
fn no_tdp_root(mmu: &VcpuMmuState, stats: &mut VcpuStats) -> Result<FaultOutcome, FaultError> {
    match mmu {
        VcpuMmuState::Tdp(_) => Ok(fault_path::retry(stats, crate::stats::RetryCause::NoRoot)),
        VcpuMmuState::Shadow(_) => Err(FaultError::WrongMmu { wanted: MmuKind::Tdp }),
    }
}

/// A guest-mode period of one vCPU (between VM entry and VM exit). While it lives the vCPU may
/// use its TLB and walk the tables like the hardware. Dropping it is the VM exit.
pub struct GuestMode<'a, H: Host> {
    vm: &'a Arc<VmShared<H>>,
    state: &'a VcpuState,
    /// Which hardware walk the root is for: gpas (TDP) or gvas (shadow paging).
    mmu: MmuKind,
    root_pfn: Pfn,
    root_level: Level,
    /// The vCPU's `guard_open`, cleared by the drop.
    open: &'a mut bool,
    _table: ReadGuard<'a>,
}

impl<H: Host> GuestMode<'_, H> {
    /// Whether a request arrived (the "IPI"): the vCPU should exit and service it.
    #[inline]
    pub fn requests_pending(&self) -> bool {
        !self.state.pending().is_empty()
    }

    /// The hardware's walk for a TLB miss on `gpa` needing `need`. A `gpa` the root's levels do
    /// not reach (bits above 48 with 4 levels, 57 with 5) is a not-present violation: the exit
    /// goes to the fault path, which emulates it (it is above every memslot), where a walk of
    /// the tables would read the entries of the gpa with the high bits dropped.
    ///
    /// On a vCPU of a shadow-paging VM, whose hardware walks gvas ([`Self::walk_gva`]), every
    /// walk is a not-present violation, whose exit handler answers [`FaultError::WrongMmu`].
    #[inline]
    pub fn walk(&self, gpa: Gpa, need: Access) -> HwWalk {
        if self.mmu != MmuKind::Tdp || !tdp_reaches(self.root_level, gpa) {
            return unreachable_walk();
        }
        // Nested walks: on NPT every guest access is a user access (`tdp_need`).
        self.walk_tables(gpa.gfn(), tdp_need(need))
    }

    /// The walk itself, from the root, of the index bits of `gfn` its levels decode.
    #[inline]
    fn walk_tables(&self, gfn: crate::types::Gfn, need: Access) -> HwWalk {
        let mmu = &self.vm.core;
        // SAFETY: `self` holds the vCPU's table read section (`_table`) for its whole life, and
        // borrows the vCPU, whose current root (`root_pfn`) cannot change meanwhile.
        unsafe { hw_walk(&mmu.cfg.format, &*mmu.host, self.root_pfn, self.root_level, gfn, need) }
    }

    /// The hardware's walk for a TLB miss on guest-virtual `gva` (shadow paging). A `gva` the
    /// shadow root does not cover (non-canonical under a 4-level root, above 4 GiB under the
    /// special root of a PAE or non-paging guest) is a not-present violation, whose exit
    /// [`Vcpu::handle_page_fault`] reports as [`crate::fault::FaultError::NonCanonical`] (#GP).
    ///
    /// On a vCPU of a TDP VM, whose hardware walks gpas ([`Self::walk`]), every walk is a
    /// not-present violation, whose exit handler ([`Vcpu::handle_page_fault`]) answers
    /// [`FaultError::WrongMmu`].
    #[inline]
    pub fn walk_gva(&self, gva: crate::types::Gva, need: Access) -> HwWalk {
        if self.mmu != MmuKind::Shadow || !shadow_reaches(self.root_level, gva) {
            return unreachable_walk();
        }
        self.walk_tables(crate::types::Gfn(gva.raw() >> crate::types::PAGE_SHIFT), need)
    }

    /// The root being walked.
    pub fn root(&self) -> (Pfn, Level) {
        (self.root_pfn, self.root_level)
    }
}

/// Whether a TDP root of `level` levels decodes every bit of `gpa` (48 bits with 4, 57 with 5).
#[inline]
pub(crate) fn tdp_reaches(level: Level, gpa: Gpa) -> bool {
    gpa.raw() >> (crate::types::PAGE_SHIFT + 9 * u32::from(level.get())) == 0
}

/// Whether a shadow root of `level` covers `gva`: a 4-level one the canonical halves, the special
/// root of a PAE or non-paging guest (walked from the PDPTE level) the low 4 GiB; the same rules
/// as [`crate::guest::gva_reachable`], by the root's level instead of the guest's mode.
#[inline]
pub(crate) fn shadow_reaches(level: Level, gva: crate::types::Gva) -> bool {
    match level {
        Level::L4 => crate::guest::walk::canonical(gva),
        _ => crate::guest::walk::below_4g(gva),
    }
}

/// The walk of an address the root does not reach: not present at the root.
#[cold]
pub(crate) fn unreachable_walk() -> HwWalk {
    HwWalk::Violation { present: false, dump: Default::default() }
}

impl<H: Host> Drop for GuestMode<'_, H> {
    fn drop(&mut self) {
        self.state.exit_guest_mode();
        *self.open = false;
    }
}

impl<H: Host> Drop for Vcpu<H> {
    fn drop(&mut self) {
        self.exit_guest_mode();
        self.unload();
        if let VcpuMmuState::Shadow(shadow_path::ShadowVcpu { pae_root: Some(pae_root), .. }) =
            self.mmu
        {
            // Emptied by the unload; nothing else links or walks it (the vCPU is going). Its room
            // in the queue was promised when it was allocated, so a drop needs no heap.
            self.vm.core.queue_promised().push(pae_root);
            self.vm.core.reclaim_batched();
        }
        // KVM `kvm_vcpu_destroy`: the index and the reader records go back for the next vCPU.
        self.vm.memslots.unregister_reader(&mut self.readers.memslot);
        self.vm.core.remove_vcpu(self.st.index, &mut self.readers.table);
    }
}
