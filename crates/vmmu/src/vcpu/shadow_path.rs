//! A vCPU under shadow paging (KVM with TDP off): its guest paging state (CR3, mode, PDPTEs), its
//! shadow roots with the previous-root cache, and the entry points the hypervisor calls besides
//! the #PF exit (`super::shadow_fault`): INVLPG, MOV CR3, emulated writes to guest page tables,
//! and the hardware walk by guest-virtual address.
//!
//! # Invariants
//! - Every root change (CR3 load, mode change, reload after a zap) clears the GVA part of the
//!   MMIO cache (the 2026 fix 7f8a4eb426b4: a GVA-keyed entry must not survive a root switch);
//!   INVLPG clears the entry of its page.
//! - Loading a special root clears the vCPU's leaf-table cache (the fast MMIO path's, keyed by
//!   root frame): every special root of the vCPU is built in its one `pae_root` frame.
//! - The vCPU pins the pages of its current and previous roots; it releases them outside guest
//!   mode.

use super::mmio_cache::MmioInfoCache;
use super::{EntryWork, Vcpu, VcpuMmu, VcpuMmuState, VcpuReaders};
use crate::bugs::Bug;
use crate::guest::{self, GuestCpu, PagingMode, PdptrError};
use crate::host::{GuestMemory, Host};
use crate::mmu_core::{hw_walk, HwWalk};
use crate::mmu_core::{MmuCore, MmuError};
use crate::shadow::root::PrevRoots;
use crate::shadow::{
    NewPageError, PrevRoot, ShadowMmu, ShadowRoot, ShadowRootKind, SlotGuestMemory,
};
use crate::shared::VmShared;
use crate::stats::VcpuStats;
use crate::types::{Access, Gfn, Gpa, Gva, Pfn};

/// The number of previous roots kept (KVM `KVM_MMU_NUM_PREV_ROOTS`).
pub use crate::shadow::root::NUM_PREV_ROOTS;

/// A shadow vCPU's paging state.
#[derive(Debug)]
pub(crate) struct ShadowVcpu {
    pub(crate) cpu: GuestCpu,
    pub(crate) root: Option<ShadowRoot>,
    /// Most recently used first.
    pub(crate) prev: PrevRoots,
    /// What the addresses of this vCPU's faults are: with [`FaultAddr::NestedGpa`] the GVA
    /// part of the MMIO cache is never filled or used.
    pub(crate) fault_addr: FaultAddr,
    /// The frame every special root of this vCPU lives in (KVM `mmu->pae_root`): allocated
    /// when the vCPU first needs a special root, freed when it drops (`shadow/root.rs`).
    pub(crate) pae_root: Option<Pfn>,
}

/// What the addresses a shadow vCPU's faults carry are.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum FaultAddr {
    /// Guest-virtual addresses of the guest whose tables the MMU shadows (the default).
    #[default]
    Gva,
    /// An L2 guest's physical addresses, which L1's tables translate (KVM `mmu_is_nested`):
    /// not an address the per-vCPU MMIO cache may key an entry by (the Feb 2019 patch:
    /// `mmio_gva = 0` refuses every GVA hit).
    NestedGpa,
}

impl ShadowVcpu {
    /// Drops the current root and every previous root (KVM `kvm_mmu_unload`) and clears the GVA
    /// part of the MMIO cache `cache`. `shadow` is the shadow MMU of this vCPU's VM, `core` its
    /// core. The caller is outside guest mode.
    pub(crate) fn unload<H: Host>(
        &mut self,
        core: &MmuCore<H>,
        shadow: &ShadowMmu,
        cache: &mut MmioInfoCache,
    ) {
        let current = self.root.take();
        let prev = self.prev.take_where(|_| true);
        cache.clear_gva();
        if current.is_some() || prev.iter().any(Option::is_some) {
            shadow.free_roots(core, current.into_iter().chain(prev.into_iter().flatten()));
        }
    }

    /// A vCPU without paging yet and without a root.
    pub(crate) fn new() -> Self {
        ShadowVcpu {
            cpu: GuestCpu {
                mode: PagingMode::NonPaging,
                cr3: 0,
                cr0_wp: true,
                efer_nx: true,
                maxphyaddr: 46,
                gbpages: false,
            },
            root: None,
            prev: PrevRoots::default(),
            fault_addr: FaultAddr::Gva,
            pae_root: None,
        }
    }
}

/// Why a shadow-paging request of the hypervisor failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum ShadowError {
    /// The VM uses the TDP MMU.
    #[error("this VM uses the TDP MMU, not shadow paging")]
    NotShadow,
    /// MOV CR3 in PAE mode found a bad PDPTE: the guest gets #GP.
    #[error("loading the PAE PDPTEs failed (#GP for the guest): {0}")]
    Pdptrs(#[from] PdptrError),
    /// MOV CR3 with a bit set at or above the guest's MAXPHYADDR (KVM `kvm_set_cr3` refuses it
    /// with `kvm_vcpu_is_legal_cr3`): the guest gets #GP and keeps its CR3.
    #[error("CR3 {cr3:#x} sets bits at or above MAXPHYADDR {maxphyaddr} (#GP for the guest)")]
    IllegalCr3 {
        /// The value the guest tried to load.
        cr3: u64,
        /// The guest's MAXPHYADDR.
        maxphyaddr: u8,
    },
}

impl<H: Host> Vcpu<H> {
    /// This vCPU's shadow state; [`ShadowError::NotShadow`] on a vCPU of a TDP VM (an embedder
    /// calling a shadow-paging entry point there).
    fn shadow_vcpu(&mut self) -> Result<&mut ShadowVcpu, ShadowError> {
        match &mut self.mmu {
            VcpuMmuState::Shadow(sv) => Ok(sv),
            VcpuMmuState::Tdp(_) => Err(ShadowError::NotShadow),
        }
    }

    /// The guest paging state (shadow VMs).
    pub fn guest_cpu(&self) -> Option<&GuestCpu> {
        match &self.mmu {
            VcpuMmuState::Shadow(sv) => Some(&sv.cpu),
            VcpuMmuState::Tdp(_) => None,
        }
    }

    /// The kind of the current shadow root, if one is loaded.
    pub fn shadow_root_kind(&self) -> Option<ShadowRootKind> {
        match &self.mmu {
            VcpuMmuState::Shadow(sv) => sv.root.as_ref().map(|r| r.kind()),
            VcpuMmuState::Tdp(_) => None,
        }
    }
}

impl ShadowVcpu {
    /// The shadow part of [`Vcpu::service_requests`] for the vCPU whose state is `self` and
    /// `st`, of VM `vm`: drop obsolete roots on request (a special root always counts as
    /// obsolete), and load a root if none is loaded.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn service<H: Host>(
        &mut self,
        vm: &VmShared<H>,
        readers: &VcpuReaders,
        st: &mut VcpuMmu,
        stats: &mut VcpuStats,
        free_obsolete: bool,
        work: &mut EntryWork,
    ) -> Result<(), MmuError> {
        let sv = self;
        let shadow = vm.shadow_for(sv);
        let core = &vm.core;
        if free_obsolete {
            let (current, prev) = {
                let st = shadow.lock(core);
                let current = match &sv.root {
                    Some(r) if r.is_obsolete(&st) => sv.root.take(),
                    _ => None,
                };
                (current, sv.prev.take_where(|p| st.is_obsolete(p.sp)))
            };
            if current.is_some() || prev.iter().any(Option::is_some) {
                st.mmio_cache.clear_gva();
                shadow.free_roots(core, current.into_iter().chain(prev.into_iter().flatten()));
            }
        }
        if sv.root.is_none() {
            let as_id = st.as_id;
            // The guest tables the root shadows are looked up in the memslots as they are
            // while the root is built: a delete or move of their slot waits for this section,
            // then zaps what was built (KVM reads them under SRCU too).
            let guard = vm.memslots.read(&readers.memslot);
            let set = guard.set(as_id);
            // The guest walk's own test (`SlotGuestMemory`), so a fault finds an entry 0 only
            // for a table that became visible since the build.
            let visible = |gfn: Gfn| set.find_visible_near(gfn, None).is_some();
            // KVM allocates `pae_root` with the vCPU; here it comes with the first special root
            // (a host without frames below 4 GiB still runs 4-level guests, whose CR3 outside
            // guest memory then gets a root page instead of the empty special root), and stays.
            // Its frame gets its room in the free queue first, so the vCPU's drop needs no heap.
            if sv.pae_root.is_none() && ShadowRoot::is_special_for(&sv.cpu, &visible) {
                // Promised after the host's allocation, which may unwind (a promise made
                // before it would outlive the unwind with no frame behind it).
                match core.alloc_table_below_4g() {
                    Some(pfn) if core.free_queue().promise().is_ok() => sv.pae_root = Some(pfn),
                    Some(pfn) => {
                        core.free_unpublished_table(pfn);
                        return Err(MmuError::OutOfHeap);
                    }
                    None if sv.cpu.mode == PagingMode::Long4 => {}
                    None => return Err(MmuError::NoTableBelow4G),
                }
            }
            let root = {
                let mut st = shadow.lock(core);
                let r = match shadow.make_pages_available(core, &mut st) {
                    Err(full) => {
                        shadow.stats.page_limit_failures.add(1);
                        Err(MmuError::ShadowPageLimit(full.limit))
                    }
                    Ok(()) => ShadowRoot::alloc(
                        core,
                        &shadow.stats,
                        &mut st,
                        &sv.cpu,
                        as_id,
                        sv.pae_root,
                        &visible,
                    )
                    .map_err(|why| match why {
                        NewPageError::NoFrame => MmuError::OutOfMemory,
                        NewPageError::NoHeap => MmuError::OutOfHeap,
                    }),
                };
                st.commit_zap(core, &shadow.stats);
                r
            };
            drop(guard);
            core.reclaim_batched();
            let root = root?;
            if root.kind() == ShadowRootKind::Special {
                // The vCPU's `pae_root` frame now links other level-2 pages than it did when
                // the fast path's leaf-table cache, keyed by that frame, was filled.
                st.leaf_tables.clear();
            }
            sv.root = Some(root);
            // KVM `kvm_mmu_load` clears the GVA cache (7f8a4eb426b4).
            if !vm.bugs.has(Bug::GvaCacheSurvivesRootSwitch) {
                st.mmio_cache.clear_gva();
            }
            stats.root_loads += 1;
            work.flush_tlb = true;
        }
        Ok(())
    }
}

impl<H: Host> Vcpu<H> {
    /// The hardware walk for a TLB miss on `gva` (shadow paging), in guest mode entered with
    /// [`Self::enter_guest_mode`]. A 4-level guest walks a 4-level shadow; a PAE guest (or one
    /// without paging) walks its special root from the PDPTE level.
    ///
    /// On a vCPU of a TDP VM, whose hardware walks gpas ([`Self::walk`]), every walk is a
    /// not-present violation, whose exit handler ([`Self::handle_page_fault`]) answers
    /// [`crate::fault::FaultError::WrongMmu`].
    ///
    /// # Panics
    /// Outside guest mode, as [`Self::walk`].
    pub fn walk_gva(&self, gva: Gva, need: Access) -> HwWalk {
        assert!(self.st.in_guest, "the hardware walks only in guest mode");
        // In guest mode a shadow vCPU always has its root (entering needs one, and whatever
        // drops it leaves guest mode first): no root here is a TDP vCPU.
        let VcpuMmuState::Shadow(ShadowVcpu { root: Some(root), .. }) = &self.mmu else {
            return super::unreachable_walk();
        };
        let (pfn, level) = root.hw_root();
        if !super::shadow_reaches(level, gva) {
            // Outside the shadow root: `handle_page_fault` reports it as #GP.
            return super::unreachable_walk();
        }
        let mmu = &self.vm.core;
        // SAFETY: in guest mode the vCPU holds its table read section and keeps its current
        // root (which pins its shadow pages): nothing reachable from it is freed meanwhile.
        unsafe { hw_walk(&mmu.cfg.format, &*mmu.host, pfn, level, Gfn(gva.raw() >> 12), need) }
    }

    /// Switches the guest's paging mode (KVM `kvm_mmu_reset_context`): every root goes, the GVA
    /// cache is cleared; the next [`Self::service_requests`] builds the new root. A PAE `cpu`
    /// carries PDPTEs already loaded ([`crate::guest::load_pdptrs`]). In guest mode it leaves it
    /// first (a VM exit).
    pub fn set_guest_cpu(&mut self, cpu: GuestCpu) -> Result<(), ShadowError> {
        self.exit_guest_mode();
        let Vcpu { vm, st, mmu, .. } = self;
        let VcpuMmuState::Shadow(sv) = mmu else {
            return Err(ShadowError::NotShadow);
        };
        let shadow = vm.shadow_for(sv);
        sv.unload(&vm.core, shadow, &mut st.mmio_cache);
        sv.cpu = cpu;
        Ok(())
    }

    /// Says what the addresses this vCPU's faults carry are: guest-virtual (the default) or an
    /// L2 guest's physical addresses ([`FaultAddr::NestedGpa`], KVM `mmu_is_nested`). Nested:
    /// the MMIO info cache keeps no GVA, so an RSVD fault goes to the MMIO SPTE; the GVA part is
    /// cleared now.
    pub fn set_fault_addr(&mut self, addr: FaultAddr) -> Result<(), ShadowError> {
        self.exit_guest_mode();
        self.shadow_vcpu()?.fault_addr = addr;
        self.st.mmio_cache.clear_gva();
        Ok(())
    }

    /// INVLPG of `gva` (KVM `kvm_mmu_invlpg` since v6.4, `kvm_mmu_invalidate_addr`): clears the
    /// MMIO cache entry of that page. KVM then syncs the SPTE for `gva` only in unsync shadow
    /// pages; this MMU keeps every shadowed table write-protected (no unsync pages: a guest
    /// table write is trapped and reaches `track_write`, which already dropped what it changed),
    /// so no shadow leaf is dropped. (Before v6.4 `FNAME(invlpg)` zapped the leaf; dropping it
    /// here made the next read through it fault, and a read fault maps a written page writable,
    /// which dirties it in a logged slot where /dev/kvm reports nothing.) The hypervisor also
    /// drops its own TLB entry for `gva`. In guest mode it leaves it first (a VM exit).
    pub fn invlpg(&mut self, gva: Gva) -> Result<(), ShadowError> {
        self.exit_guest_mode();
        self.shadow_vcpu()?;
        self.stats.invlpg += 1;
        self.st.mmio_cache.clear_gva_page(gva.raw());
        Ok(())
    }

    /// A flush of the guest's whole TLB (KVM `KVM_REQ_TLB_FLUSH_GUEST`,
    /// `kvm_vcpu_flush_tlb_guest`): what the hypervisor does when the guest toggles CR4.PGE
    /// (Linux's global flush without INVPCID), runs INVPCID for all contexts or for its current
    /// PCID, or asks for a paravirtual flush; INVLPG and MOV CR3 have their own entry points.
    /// With TDP off KVM syncs the roots, which clears the GVA part of the MMIO cache
    /// (`kvm_mmu_sync_roots`: `vcpu_clear_mmio_info(MMIO_GVA_ANY)`); this MMU has no unsync
    /// pages to sync, and clears it, so that a GVA the guest remapped (a trapped store to its
    /// table) and then flushed this way is translated again rather than answered from the cache
    /// with its old gpa. The hypervisor flushes its own TLB (`flush_tlb`). In guest mode it
    /// leaves it first (a VM exit).
    pub fn flush_guest_tlb(&mut self) -> Result<EntryWork, ShadowError> {
        self.exit_guest_mode();
        self.shadow_vcpu()?;
        self.st.mmio_cache.clear_gva();
        Ok(EntryWork { flush_tlb: true })
    }

    /// Unprotects the guest frame `gfn` instead of emulating a write to it (KVM
    /// `kvm_mmu_unprotect_gfn_and_retry`): every shadow page of that guest table is zapped, so
    /// the frame is no longer write-tracked, and the hypervisor re-enters the guest to run the
    /// write again, which then faults the frame in writable (and `track_write` is not called:
    /// nothing was emulated). Call it after an [`crate::fault::EmulateSource::WriteProtected`]
    /// exit (its `gpa`'s frame) when the hypervisor's emulator judges the write is not a
    /// page-table update, as KVM's does for an instruction that does not write page tables
    /// (`x86_page_table_writing_insn`: a string store, say): typically a guest that reuses a
    /// freed page-table page as data, which would otherwise trap on every aligned store (this
    /// MMU has no unsync pages, and a last-level table is never flooded). If the frame is a
    /// guest table still in use, the next walk through it shadows and write-protects it again;
    /// so if the write's own translation (or the instruction fetch's) walks through that table,
    /// the retried write traps again (KVM refuses to unprotect then, as it would loop): emulate
    /// the write the second time. `Ok(false)`: no shadow page shadowed the frame (already
    /// unprotected, by another vCPU say); re-entering is still right. Remote TLBs are flushed
    /// before it returns if a present SPTE went. In guest mode it leaves it first (a VM exit).
    pub fn unprotect_gfn(&mut self, gfn: Gfn) -> Result<bool, ShadowError> {
        self.exit_guest_mode();
        let VcpuMmuState::Shadow(sv) = &self.mmu else {
            return Err(ShadowError::NotShadow);
        };
        Ok(self.vm.shadow_for(sv).unprotect_gfn(&self.vm.core, gfn))
    }
}

impl<H: Host + GuestMemory> Vcpu<H> {
    /// MOV CR3 (KVM `kvm_set_cr3` -> `kvm_mmu_new_pgd`): a 4-level guest switches to a cached
    /// previous root for `cr3` if one is usable (KVM keeps 3), else its current root becomes the
    /// most recent previous one and a new root is built on the next entry; a PAE guest reloads
    /// its PDPTEs (a bad one is #GP) and builds its special root again unless CR3 and the
    /// PDPTEs are what they were. A `cr3` with bits at or above the
    /// guest's MAXPHYADDR is #GP ([`ShadowError::IllegalCr3`]); nothing changes then. Either
    /// way the GVA part of the MMIO cache is cleared and the hypervisor flushes its TLB
    /// (`flush_tlb`). In guest mode it leaves it first (a VM exit).
    pub fn load_cr3(&mut self, cr3: u64) -> Result<EntryWork, ShadowError> {
        self.exit_guest_mode();
        let Vcpu { vm, readers, st, mmu, .. } = self;
        let VcpuMmuState::Shadow(sv) = mmu else {
            return Err(ShadowError::NotShadow);
        };
        let shadow = vm.shadow_for(sv);
        // KVM `kvm_vcpu_is_legal_cr3`, checked in every mode (the guest has no PCIDE or LAM
        // here, so bit 63 and the LAM bits are reserved too).
        let maxphyaddr = sv.cpu.maxphyaddr;
        if cr3.checked_shr(u32::from(maxphyaddr)).unwrap_or(0) != 0 {
            return Err(ShadowError::IllegalCr3 { cr3, maxphyaddr });
        }
        let core = &vm.core;
        // The one root this load lets go of, if any (a special current root, or the previous
        // root a cache miss evicts; never both: a special root is not cached).
        let mut release: Option<ShadowRoot> = None;
        match sv.cpu.mode {
            PagingMode::Pae { .. } => {
                let pdptrs = {
                    let guard = vm.memslots.read(&readers.memslot);
                    let mem = SlotGuestMemory::new(guard.set(st.as_id), &*core.host);
                    guest::load_pdptrs(&mem, cr3, sv.cpu.maxphyaddr)?
                };
                // KVM `kvm_set_cr3`: the special root goes when the PDPTEs changed
                // (`load_pdptrs` frees the current root) or CR3 did (`kvm_mmu_new_pgd`, whose
                // fast switch frees a special root); a reload of the same CR3 with the same
                // PDPTEs (a 32-bit OS's TLB flush) keeps it.
                let same = cr3 == sv.cpu.cr3
                    && matches!(sv.cpu.mode, PagingMode::Pae { pdptrs: old } if old == pdptrs);
                sv.cpu.mode = PagingMode::Pae { pdptrs };
                if !same {
                    release = sv.root.take();
                }
            }
            PagingMode::Long4 => {
                let current = sv.root.take();
                if let Some(ShadowRoot::Page { cr3: c, .. }) = current {
                    if c == cr3 {
                        sv.root = current;
                    }
                }
                if sv.root.is_none() {
                    // KVM `fast_pgd_switch` (`PrevRoots`): a special current root is freed
                    // first; a page root is kept in the cache.
                    let cur = match current {
                        Some(ShadowRoot::Page { sp, pfn, cr3 }) => Some(PrevRoot { cr3, sp, pfn }),
                        Some(special) => {
                            release = Some(special);
                            None
                        }
                        None => None,
                    };
                    let reused = {
                        let s = shadow.lock(core);
                        let usable = |p: &PrevRoot| p.cr3 == cr3 && !s.is_obsolete(p.sp);
                        match cur {
                            Some(cur) => match sv.prev.find_and_keep_current(cur, usable) {
                                Ok(hit) => Some(hit),
                                Err(evicted) => {
                                    debug_assert!(release.is_none(), "{release:?}");
                                    release = evicted.map(ShadowRoot::from);
                                    None
                                }
                            },
                            None => sv.prev.find_without_current(usable),
                        }
                    };
                    // KVM `kvm_mmu_new_pgd` after a fast switch hit: the reused root's write-
                    // flooding count starts again (paging_flood_count_prev_root.scn).
                    if let Some(p) = &reused {
                        shadow.lock(core).sp_mut(p.sp).flood = 0;
                    }
                    sv.root = reused.map(ShadowRoot::from);
                }
            }
            PagingMode::NonPaging => {}
        }
        sv.cpu.cr3 = cr3;
        if !vm.bugs.has(Bug::GvaCacheSurvivesRootSwitch) {
            st.mmio_cache.clear_gva();
        }
        if let Some(root) = release {
            shadow.free_roots(core, [root]);
        }
        Ok(EntryWork { flush_tlb: true })
    }

    /// Reports a write the hypervisor emulated to guest RAM at `gpa` of `bytes` bytes (after an
    /// [`crate::fault::EmulateSource::WriteProtected`] exit, or any emulated write), once the bytes
    /// are in guest memory (KVM `emulator_write_phys`, less the copy): the pages written are marked
    /// in their slot's dirty log (`kvm_vcpu_write_guest`; a guest table written in a logged slot
    /// must reach a migration's next pass), and shadow pages of the guest table there drop the
    /// SPTEs the write changed, or are zapped when the write is misaligned or the table is flooded
    /// (KVM `kvm_mmu_track_write`). A write that crosses a page boundary is tracked as one write
    /// per page, as KVM's emulator splits it (`emulator_read_write_onepage`). In guest mode it
    /// leaves it first (a VM exit).
    pub fn track_write(&mut self, gpa: Gpa, bytes: u32) -> Result<(), ShadowError> {
        self.exit_guest_mode();
        let VcpuMmuState::Shadow(sv) = &self.mmu else {
            return Err(ShadowError::NotShadow);
        };
        let shadow = self.vm.shadow_for(sv);
        let end = gpa.raw().saturating_add(u64::from(bytes));
        let mut at = gpa.raw();
        while at < end {
            let page_end = (at | crate::types::PAGE_OFFSET_MASK).saturating_add(1);
            let piece_end = end.min(page_end);
            // At most a page, so it fits.
            let piece = (piece_end - at) as u32;
            let new_gpte = {
                let guard = self.vm.memslots.read(&self.readers.memslot);
                let set = guard.set(self.st.as_id);
                set.mark_gfn_dirty(Gpa(at).gfn());
                written_gpte(&SlotGuestMemory::new(set, &*self.vm.core.host), Gpa(at), piece)
            };
            shadow.track_write(&self.vm.core, Gpa(at), piece, new_gpte);
            at = piece_end;
        }
        Ok(())
    }
}

/// The gPTE a tracked write of `bytes` bytes at `gpa` (within one page) left, as KVM's
/// `mmu_pte_write_fetch_gpte` reads it: for a 4- or 8-byte write the whole aligned 8-byte entry
/// (gPTEs are 8 bytes in every mode shadowed here, so a 4-byte write is half of one), for any
/// other size 0 (KVM reads nothing then; the value only decides whether `mmu_pde_zapped`
/// counts). Unreadable memory reads as 0.
fn written_gpte(mem: &impl guest::GuestPteMemory, gpa: Gpa, bytes: u32) -> u64 {
    match bytes {
        4 | 8 => guest::GuestPteMemory::read_gpte(mem, Gpa(gpa.raw() & !7)).unwrap_or(0),
        _ => 0,
    }
}
