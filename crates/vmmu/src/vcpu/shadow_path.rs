//! A vCPU under shadow paging (KVM with TDP off): its guest paging state (CR3, mode, PDPTEs), its
//! shadow roots with the previous-root cache, and the entry points the hypervisor calls: the #PF
//! exit ([`Vcpu::handle_page_fault`]), INVLPG, MOV CR3, emulated writes to guest page tables,
//! and the hardware walk by guest-virtual address.
//!
//! # Fault flow (KVM `kvm_mmu_page_fault` -> `handle_mmio_page_fault` / `FNAME(page_fault)`)
//! - RSVD fault: the per-vCPU MMIO cache by GVA (page, generation, and the cached guest rights
//!   cover the access: no guest walk), then the lockless shadow walk (an MMIO SPTE of the current
//!   generation -> Emulate and cache; stale -> slow path; a zapped entry -> Retry, never an
//!   error; reserved bits in a present entry -> a genuine misconfiguration).
//! - Slow path, inside a memslot read section: walk the guest's tables (a guest fault goes back
//!   to the guest as [`FaultOutcome::GuestPageFault`]), faultin the guest-physical frame, then
//!   under the shadow lock: make pages available, the stale check (a special root is stale while
//!   a free-obsolete-roots request is pending, 18c841e1f411), build the shadow and install.
//!
//! # Invariants
//! - Every root change (CR3 load, mode change, reload after a zap) clears the GVA part of the
//!   MMIO cache (the 2026 fix 7f8a4eb426b4: a GVA-keyed entry must not survive a root switch);
//!   INVLPG clears the entry of its page.
//! - The vCPU pins the pages of its current and previous roots; it releases them outside guest
//!   mode.

use super::fault_path::{readonly_write, retry, FastOutcome};
use super::{EntryWork, Vcpu, VcpuMmu};
use crate::bugs::Bug;
use crate::fault::{
    Backing, EmulateSource, FaultError, FaultOutcome, FaultinStop, Mappable, PageFault, PfErr,
};
use crate::guest::{self, GuestCpu, PagingMode, PdptrError, WalkError};
use crate::host::{GuestMemory, Host};
use crate::shadow::{
    fetch::{fetch, FetchOutcome, LeafWant},
    prefetch::PrefetchCtx,
    PrevRoot, ShadowRoot, ShadowRootKind, SlotGuestMemory, ZapBatch,
};
use crate::stats::RetryCause;
use crate::tdp::{hw_walk, CachedWalk, HwWalk};
use crate::types::{Access, Gfn, Gpa, Gva, Level, Pfn};

/// The number of previous roots kept (KVM `KVM_MMU_NUM_PREV_ROOTS`).
pub use crate::shadow::root::NUM_PREV_ROOTS;

/// A shadow vCPU's paging state.
#[derive(Debug)]
pub(crate) struct ShadowVcpu {
    pub(crate) cpu: GuestCpu,
    pub(crate) root: Option<ShadowRoot>,
    /// Most recently used first.
    pub(crate) prev: [Option<PrevRoot>; NUM_PREV_ROOTS],
    /// The addresses this MMU translates are an L2 guest's physical addresses, not virtual
    /// ones (KVM `mmu_is_nested`): the GVA part of the MMIO cache is never filled or used.
    pub(crate) nested: bool,
}

impl ShadowVcpu {
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
            prev: [None; NUM_PREV_ROOTS],
            nested: false,
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
    fn shadow_parts(&mut self) -> Result<(), ShadowError> {
        if self.vm.shadow.is_none() || self.st.shadow.is_none() {
            return Err(ShadowError::NotShadow);
        }
        Ok(())
    }

    /// The guest paging state (shadow VMs).
    pub fn guest_cpu(&self) -> Option<&GuestCpu> {
        self.st.shadow.as_ref().map(|s| &s.cpu)
    }

    /// The kind of the current shadow root, if one is loaded.
    pub fn shadow_root_kind(&self) -> Option<ShadowRootKind> {
        self.st.shadow.as_ref()?.root.as_ref().map(|r| r.kind())
    }

    /// Drops the current root and every previous root (KVM `kvm_mmu_unload`) and clears the GVA
    /// part of the MMIO cache. The caller is outside guest mode.
    pub(crate) fn shadow_unload(&mut self) {
        let (Some(shadow), Some(sv)) = (self.vm.shadow.as_ref(), self.st.shadow.as_mut()) else {
            return;
        };
        let roots = sv
            .root
            .take()
            .into_iter()
            .chain(sv.prev.iter_mut().filter_map(Option::take).map(ShadowRoot::from))
            .collect::<alloc::vec::Vec<_>>();
        self.st.mmio_cache.clear_gva();
        if !roots.is_empty() {
            shadow.free_roots(&self.vm.mmu, roots);
        }
    }

    /// The shadow part of [`Self::service_requests`]: drop obsolete roots on request (a special
    /// root always counts as obsolete), and load a root if none is loaded.
    pub(crate) fn shadow_service(
        &mut self,
        free_obsolete: bool,
        work: &mut EntryWork,
    ) -> Result<(), crate::tdp::TdpError> {
        let (Some(shadow), Some(sv)) = (self.vm.shadow.as_ref(), self.st.shadow.as_mut()) else {
            return Ok(());
        };
        let core = &self.vm.mmu;
        if free_obsolete {
            let mut drop = alloc::vec::Vec::new();
            {
                let st = shadow.lock(core);
                if sv.root.as_ref().is_some_and(|r| r.is_obsolete(&st)) {
                    drop.extend(sv.root.take());
                }
                for p in sv.prev.iter_mut() {
                    if p.is_some_and(|p| st.is_obsolete(p.sp)) {
                        if let Some(p) = p.take() {
                            drop.push(ShadowRoot::from(p));
                        }
                    }
                }
            }
            if !drop.is_empty() {
                self.st.mmio_cache.clear_gva();
                shadow.free_roots(core, drop);
            }
        }
        let sv = self.st.shadow.as_mut().ok_or(crate::tdp::TdpError::OutOfMemory)?;
        if sv.root.is_none() {
            let mut batch = ZapBatch::default();
            let root = {
                let mut st = shadow.lock(core);
                shadow.make_pages_available(core, &mut st, &mut batch);
                let r = ShadowRoot::alloc(
                    core,
                    &shadow.stats,
                    &mut st,
                    &sv.cpu,
                    self.st.as_id,
                    &mut batch,
                );
                st.commit_zap(core, &shadow.stats, &mut batch);
                r
            };
            core.reclaim_batched();
            sv.root = Some(root.ok_or(crate::tdp::TdpError::OutOfMemory)?);
            // KVM `kvm_mmu_load` clears the GVA cache (7f8a4eb426b4).
            if !self.vm.bugs.has(Bug::GvaCacheSurvivesRootSwitch) {
                self.st.mmio_cache.clear_gva();
            }
            self.stats.root_loads += 1;
            work.flush_tlb = true;
        }
        Ok(())
    }

    /// The frame and level the hardware walks from under shadow paging.
    pub(crate) fn shadow_hw_root(&self) -> Option<(Pfn, Level)> {
        self.st.shadow.as_ref()?.root.as_ref().map(|r| r.hw_root())
    }

    /// The hardware walk for a TLB miss on `gva` (shadow paging), in guest mode entered with
    /// [`Self::enter_guest_mode`]. A 4-level guest walks a 4-level shadow; a PAE guest (or one
    /// without paging) walks its special root from the PDPTE level.
    ///
    /// # Panics
    /// Outside guest mode, as [`Self::walk`]. On a vCPU of a TDP VM, whose hardware walks gpas
    /// ([`Self::walk`]).
    pub fn walk_gva(&self, gva: Gva, need: Access) -> HwWalk {
        assert!(self.st.in_guest, "the hardware walks only in guest mode");
        let Some((pfn, level)) = self.shadow_hw_root() else {
            // In guest mode a shadow vCPU always has its root (entering needs one, and whatever
            // drops it leaves guest mode first): this is a TDP vCPU.
            panic!(
                "Vcpu::walk_gva is the shadow-paging hardware walk; a TDP vCPU walks gpas (walk)"
            );
        };
        if !super::shadow_reaches(level, gva) {
            // Outside the shadow root: `handle_page_fault` reports it as #GP.
            return super::unreachable_walk();
        }
        let mmu = &self.vm.mmu;
        // SAFETY: in guest mode the vCPU holds its table read section and keeps its current
        // root (which pins its shadow pages): nothing reachable from it is freed meanwhile.
        unsafe { hw_walk(&mmu.cfg.format, &*mmu.host, pfn, level, Gfn(gva.raw() >> 12), need) }
    }

    /// Switches the guest's paging mode (KVM `kvm_mmu_reset_context`): every root goes, the GVA
    /// cache is cleared; the next [`Self::service_requests`] builds the new root. A PAE `cpu`
    /// carries PDPTEs already loaded ([`crate::guest::load_pdptrs`]). In guest mode it leaves it first (a VM exit).
    pub fn set_guest_cpu(&mut self, cpu: GuestCpu) -> Result<(), ShadowError> {
        self.exit_guest_mode();
        self.shadow_parts()?;
        self.shadow_unload();
        if let Some(sv) = self.st.shadow.as_mut() {
            sv.cpu = cpu;
        }
        Ok(())
    }

    /// Marks the addresses this vCPU's faults carry as nested guest-physical addresses (an L2
    /// guest's, KVM `mmu_is_nested`) or as guest-virtual ones (the default). Nested: the MMIO
    /// info cache keeps no GVA (the Feb 2019 patch: `mmio_gva = 0` refuses every GVA hit), so an
    /// RSVD fault goes to the MMIO SPTE; the GVA part is cleared now.
    pub fn set_nested_walk(&mut self, nested: bool) -> Result<(), ShadowError> {
        self.exit_guest_mode();
        self.shadow_parts()?;
        if let Some(sv) = self.st.shadow.as_mut() {
            sv.nested = nested;
        }
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
        self.shadow_parts()?;
        self.stats.invlpg += 1;
        self.st.mmio_cache.clear_gva_page(gva.raw());
        if self.vm.shadow.is_none() || self.st.shadow.is_none() {
            return Err(ShadowError::NotShadow);
        }
        Ok(())
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
        self.shadow_parts()?;
        let Vcpu { vm, readers, st, .. } = self;
        let (Some(shadow), Some(sv)) = (vm.shadow.as_ref(), st.shadow.as_mut()) else {
            return Err(ShadowError::NotShadow);
        };
        // KVM `kvm_vcpu_is_legal_cr3`, checked in every mode (the guest has no PCIDE or LAM
        // here, so bit 63 and the LAM bits are reserved too).
        let maxphyaddr = sv.cpu.maxphyaddr;
        if cr3.checked_shr(u32::from(maxphyaddr)).unwrap_or(0) != 0 {
            return Err(ShadowError::IllegalCr3 { cr3, maxphyaddr });
        }
        let core = &vm.mmu;
        let mut release = alloc::vec::Vec::new();
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
                    release.extend(sv.root.take());
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
                    // KVM `fast_pgd_switch`. The slots keep their places: a slot emptied when
                    // its root was freed as obsolete stays empty until the rotation reaches it,
                    // and a miss frees whatever the last slot holds, however recent the others
                    // (`cached_root_find_and_keep_current`). A special current root is freed
                    // first, and without a current root a hit takes its slot out and moves the
                    // later ones up, a miss changes nothing (`cached_root_find_without_current`).
                    let mut cur = match current {
                        Some(ShadowRoot::Page { sp, pfn, cr3 }) => Some(PrevRoot { cr3, sp, pfn }),
                        Some(special) => {
                            release.push(special);
                            None
                        }
                        None => None,
                    };
                    let reused = {
                        let s = shadow.lock(core);
                        let usable = |p: &Option<PrevRoot>| {
                            p.is_some_and(|p| p.cr3 == cr3 && !s.is_obsolete(p.sp))
                        };
                        if cur.is_some() {
                            let mut hit = false;
                            for slot in sv.prev.iter_mut() {
                                core::mem::swap(&mut cur, slot);
                                if usable(&cur) {
                                    hit = true;
                                    break;
                                }
                            }
                            if hit {
                                cur
                            } else {
                                release.extend(cur.map(ShadowRoot::from));
                                None
                            }
                        } else if let Some(i) = sv.prev.iter().position(usable) {
                            let r = sv.prev[i].take();
                            for j in i..NUM_PREV_ROOTS - 1 {
                                sv.prev[j] = sv.prev[j + 1].take();
                            }
                            r
                        } else {
                            None
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
        if !release.is_empty() {
            shadow.free_roots(core, release);
        }
        Ok(EntryWork { flush_tlb: true })
    }

    /// Reports a write the hypervisor emulated to guest RAM at `gpa` of `bytes` bytes (after an
    /// [`EmulateSource::WriteProtected`] exit, or any emulated write), once the bytes are in
    /// guest memory (KVM `emulator_write_phys`, less the copy): the pages written are marked in
    /// their slot's dirty log (`kvm_vcpu_write_guest`; a guest table written in a logged slot
    /// must reach a migration's next pass), and shadow pages of the guest table there drop the
    /// SPTEs the write changed, or are zapped when the write is misaligned or the table is
    /// flooded (KVM `kvm_mmu_track_write`). A write that crosses a page boundary is tracked as
    /// one write per page, as KVM's emulator splits it (`emulator_read_write_onepage`). In
    /// guest mode it leaves it first (a VM exit).
    pub fn track_write(&mut self, gpa: Gpa, bytes: u32) -> Result<(), ShadowError> {
        self.exit_guest_mode();
        self.shadow_parts()?;
        let shadow = self.vm.shadow.as_ref().ok_or(ShadowError::NotShadow)?;
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
                written_gpte(&SlotGuestMemory::new(set, &*self.vm.mmu.host), Gpa(at), piece)
            };
            shadow.track_write(&self.vm.mmu, self.st.as_id, Gpa(at), piece, new_gpte);
            at = piece_end;
        }
        Ok(())
    }

    /// A #PF exit under shadow paging, with the hardware's error code (KVM `kvm_mmu_page_fault`
    /// with TDP off). An exit handler: call it after leaving guest mode (debug builds assert it;
    /// called in guest mode, its fast path runs as it is and its slow path leaves guest mode
    /// first, as [`Self::enter_guest_mode`] says).
    pub fn handle_page_fault(&mut self, gva: Gva, err: PfErr) -> Result<FaultOutcome, FaultError> {
        debug_assert!(!self.st.in_guest, "an exit handler is called after the VM exit");
        if self.vm.shadow.is_none() || self.st.shadow.is_none() {
            return Err(FaultError::WrongMmu { wanted: "shadow-paging" });
        }
        if err.rsvd() {
            self.stats.misconfig_exits += 1;
        } else {
            self.stats.violation_exits += 1;
        }
        // Before any table or cache is consulted: the shadow root covers only what the guest can
        // reach (4 GiB without paging or with PAE, the canonical halves with 4-level paging), and
        // a walk of it for anything else reads the entry of the address with the high bits
        // dropped (an MMIO SPTE there would emulate the wrong gpa).
        if let Some(sv) = self.st.shadow.as_ref() {
            if !guest::gva_reachable(sv.cpu.mode, gva) {
                return Err(FaultError::NonCanonical(gva));
            }
        }
        // Only the frame and level of the root, read in place: the fast path copies no
        // `ShadowRoot` (a copy of it cost a store-forwarding stall of about 5 ns per fault).
        let Some((root_pfn, root_level)) =
            self.st.shadow.as_ref().and_then(|s| s.root.as_ref()).map(ShadowRoot::hw_root)
        else {
            return Ok(retry(&mut self.stats, RetryCause::NoRoot));
        };
        let mut err = err;
        if err.rsvd() {
            if let Some(o) = self.shadow_mmio_fast(root_pfn, root_level, gva, err)? {
                return Ok(o);
            }
            err = PfErr(err.0 & !PfErr::RSVD);
        }
        let Some(root) = self.st.shadow.as_ref().and_then(|s| s.root) else {
            return Ok(retry(&mut self.stats, RetryCause::NoRoot));
        };
        self.shadow_slow(root, gva, err)
    }

    /// KVM `handle_mmio_page_fault` under shadow paging. `None`: take the slow path.
    #[inline]
    fn shadow_mmio_fast(
        &mut self,
        pfn: Pfn,
        level: Level,
        gva: Gva,
        err: PfErr,
    ) -> Result<Option<FaultOutcome>, FaultError> {
        let Vcpu { vm, readers, st, stats } = self;
        let bugs = vm.bugs;
        let codec = vm.mmu.cfg.codec;
        let gen = vm.memslots.generation(st.as_id);
        let fa = err.access();
        if fa.exec {
            // Neither the cache nor an MMIO SPTE records X (KVM's MMIO access mask is W|U), so
            // neither can answer a fetch: the guest walk decides it (a #PF with FETCH from an
            // NX page), as KVM's emulator fetches the instruction through a full guest walk.
            return Ok(None);
        }
        let mut need = fa.required().intersect(Access::WRITE.union(Access::USER));
        if fa.write && !fa.user && st.shadow.as_ref().is_some_and(|s| !s.cpu.cr0_wp) {
            // KVM's `permission_fault` on the cached rights: with CR0.WP=0 a supervisor write
            // needs no W.
            need = Access::from_bits(need.bits() & !Access::WRITE.bits());
        }
        // A nested walk caches no GVA (KVM: `mmio_gva = 0` for `mmu_is_nested`).
        let cache_gva = if st.shadow.as_ref().is_some_and(|s| s.nested) { 0 } else { gva.raw() };
        if let Some((gfn, access)) = st.mmio_cache.lookup_gva(cache_gva, gen, bugs) {
            if access.contains(need) {
                let gpa = Gpa(gfn.gpa().raw() | gva.page_offset());
                return Ok(Some(super::fault_path::cache_hit(stats, gpa, access)));
            }
        }
        let page = Gfn(gva.raw() >> 12);
        let walk = vm.mmu.walk_mmio_fast(&mut st.leaf_tables, &readers.table, pfn, level, page);
        let leaf = match walk {
            CachedWalk::Mmio(leaf) => leaf,
            CachedWalk::Walked(w) => {
                // Never `Invalid`: only an MMIO SPTE of a stale generation takes the slow path.
                return VcpuMmu::not_mmio(stats, bugs, Gpa(gva.raw()), w).map(|o| match o {
                    FastOutcome::Done(o) => Some(o),
                    FastOutcome::Invalid => None,
                });
            }
        };
        if !VcpuMmu::check_mmio_spte(vm, leaf, gen) {
            stats.stale_gen_misses += 1;
            return Ok(None);
        }
        let gfn = codec.gfn(leaf);
        let access = codec.access(leaf);
        if !access.contains(need) {
            // The guest's rights recorded in the SPTE do not cover the access (a write to a
            // read-only or clean mapping, a user access to a supervisor one): the guest walk
            // decides (a #PF, or new rights after setting the dirty bit), as KVM's emulator does
            // with `permission_fault` on the cached access.
            return Ok(None);
        }
        // The walk of the shadow tables does not say how large the guest's page is: record the
        // largest the guest can map, so INVLPG anywhere in it clears the entry.
        let guest_page = st.shadow.as_ref().map_or(Level::L2M, |s| s.cpu.largest_page_level());
        st.mmio_cache.fill_guest_page(cache_gva, guest_page, gfn, access, gen, bugs);
        stats.mmio_spte_hits += 1;
        let gpa = Gpa(gfn.gpa().raw() | gva.page_offset());
        Ok(Some(FaultOutcome::Emulate { gpa, access, source: EmulateSource::MmioSpteHit }))
    }

    /// KVM `FNAME(page_fault)`.
    #[inline(never)]
    fn shadow_slow(
        &mut self,
        root: ShadowRoot,
        gva: Gva,
        err: PfErr,
    ) -> Result<FaultOutcome, FaultError> {
        let Vcpu { vm, readers, st, stats } = self;
        // As the TDP slow path (`memslot_slow_path`): never wait for this vCPU's own guest mode.
        st.leave_guest_mode(vm, readers);
        let (Some(shadow), Some(sv)) = (vm.shadow.as_ref(), st.shadow.as_ref()) else {
            return Err(FaultError::WrongMmu { wanted: "shadow-paging" });
        };
        let core = &vm.mmu;
        let bugs = vm.bugs;
        let codec = core.cfg.codec;
        let cpu = sv.cpu;
        let guard = vm.memslots.read(&readers.memslot);
        let set = guard.set(st.as_id);
        let gen = set.generation();
        stats.pf_taken += 1;
        let mem = SlotGuestMemory::new(set, &*core.host);
        let access = err.access();
        let nonpaging = matches!(cpu.mode, PagingMode::NonPaging);
        let walk = match guest::walk(&cpu, &mem, gva, access) {
            Ok(w) => w,
            Err(WalkError::NonCanonical(a)) => return Err(FaultError::NonCanonical(a)),
            // Another vCPU kept rewriting the gPTEs under the A/D update: nothing decided, the
            // vCPU re-enters the guest and faults again (KVM loops in `retry_walk` instead).
            Err(WalkError::Contended(_)) => return Ok(retry(stats, RetryCause::Race)),
            Err(WalkError::PageFault(pf)) => {
                // KVM `kvm_inject_emulated_page_fault`: a protection fault invalidates the
                // address in the current root (`kvm_mmu_invalidate_addr`), which since v6.4
                // clears the GVA's MMIO cache entry and syncs the SPTE only in an unsync page
                // (none here: every shadowed table is write-protected, so a leaf that let the
                // walk fault already denies the access). The leaf stays: the next access that
                // it allows does not fault (paging_guest_pf_keeps_leaf.scn, /dev/kvm).
                if pf.error_code.0 & PfErr::PRESENT != 0 && !pf.error_code.rsvd() {
                    st.mmio_cache.clear_gva_page(gva.raw());
                }
                stats.pf_guest += 1;
                return Ok(FaultOutcome::GuestPageFault {
                    addr: pf.addr,
                    error_code: pf.error_code,
                });
            }
        };
        // KVM `page_fault_handle_page_track`: a present write to a frame that a table above the
        // last level shadows cannot be fixed by mapping anything; emulate it straight away,
        // with the flood counts on the path reset (`shadow_page_table_clear_flood`), before
        // faultin, the page-limit refill, fetch or prefetch.
        // The lock-free summary answers for most untracked frames (KVM reads its counts without
        // mmu_lock too); a frame it may track is confirmed under the lock.
        if access.write
            && !err.rsvd()
            && err.0 & PfErr::PRESENT != 0
            && shadow.may_be_gfn_write_tracked(st.as_id, walk.gfn)
        {
            let mut s = shadow.lock(core);
            if s.is_gfn_write_tracked(st.as_id, walk.gfn) {
                s.clear_flood_along(core, &root, gva);
                drop(s);
                stats.write_protected_emulations += 1;
                return Ok(FaultOutcome::Emulate {
                    gpa: walk.gpa,
                    access: access.required(),
                    source: EmulateSource::WriteProtected,
                });
            }
        }
        let mut fault = PageFault::tdp(walk.gpa, PfErr(err.0 & !PfErr::RSVD));
        fault.is_tdp = false;
        let mappable = Mappable { format: &core.cfg.format, max_level: Level::L4K };
        let stop =
            fault.faultin(set, &mut st.slot_cache, &*core.host, &core.inval, mappable, bugs)?;
        match stop {
            None => {}
            Some(FaultinStop::Retry(cause)) => return Ok(retry(stats, cause)),
            Some(FaultinStop::ReadOnlyWrite) => {
                return Ok(readonly_write(stats, walk.gpa, access.required()))
            }
        }
        let mmio_access = walk.pte_access.intersect(Access::WRITE.union(Access::USER));
        let mut walk = walk;
        if matches!(fault.backing, Backing::Ram { .. })
            && access.write
            && !access.user
            && !cpu.cr0_wp
            && !walk.pte_access.contains(Access::WRITE)
        {
            // KVM `FNAME(page_fault)`: a supervisor write with CR0.WP=0 may write a page the
            // guest maps read-only, but the hardware running the guest has CR0.WP=1, so the
            // SPTE is made writable and supervisor-only (a user access then faults and gets a
            // user SPTE back). Not for MMIO: that would cache the wrong rights in the SPTE.
            let w_only = Access::from_bits(walk.pte_access.bits() & !Access::USER.bits());
            walk.pte_access = w_only.union(Access::WRITE);
        }
        let want = match fault.backing {
            Backing::Ram { base_pfn, writable, slot, .. } => {
                LeafWant::Ram { pfn: base_pfn, writable, slot }
            }
            Backing::NoSlot => {
                // KVM `kvm_handle_noslot_fault` with the GVA (indirect MMU).
                let cache_gva = if sv.nested { 0 } else { gva.raw() };
                st.mmio_cache.fill_guest_page(
                    cache_gva,
                    walk.level,
                    walk.gfn,
                    mmio_access,
                    gen,
                    bugs,
                );
                // No MMIO SPTE while the set is in progress: see the TDP fault path
                // (`tests/shadow_gen_wrap_window.rs`).
                if !codec.enabled() || gen.in_progress() || walk.gfn > core.cfg.max_gfn {
                    super::fault_path::count_slow_mmio(stats);
                    return Ok(FaultOutcome::Emulate {
                        gpa: walk.gpa,
                        access: mmio_access,
                        source: EmulateSource::SlowPathMmio,
                    });
                }
                LeafWant::Mmio(codec.make(walk.gfn, gen, mmio_access))
            }
            Backing::Unresolved => {
                return Err(FaultError::Internal { gpa: walk.gpa, dump: Default::default() })
            }
        };
        core.host.preempt_point(crate::host::PreemptPoint::FaultDecided);
        let mut batch = ZapBatch::default();
        let outcome = {
            let mut s = shadow.lock(core);
            // 2abd5287f083: make pages available first, then check the root. Not for MMIO when
            // it builds no shadow page (`TdpConfig::shadow_mmio_path_only`).
            if !(matches!(want, LeafWant::Mmio(_)) && core.cfg.shadow_mmio_path_only) {
                shadow.make_pages_available(core, &mut s, &mut batch);
            }
            // Read under the lock: zap_all_fast requests the reload inside its critical section.
            let pending = core.vcpus[st.index].pending();
            let o = match fault.stale(root.state(&s), pending, &core.inval, bugs) {
                Some(cause) => FetchOutcome::Retry(cause),
                None => fetch(
                    core,
                    &shadow.stats,
                    &mut s,
                    &root,
                    &walk,
                    nonpaging,
                    gva,
                    access,
                    want,
                    &mem,
                    &PrefetchCtx { set, cpu: &cpu, inval: &core.inval },
                    &mut batch,
                ),
            };
            core.host.preempt_point(crate::host::PreemptPoint::FaultInstalled);
            s.commit_zap(core, &shadow.stats, &mut batch);
            o
        };
        drop(guard);
        core.reclaim_batched();
        let is_mmio = matches!(want, LeafWant::Mmio(_));
        let emulate_mmio = FaultOutcome::Emulate {
            gpa: walk.gpa,
            access: mmio_access,
            source: EmulateSource::SlowPathMmio,
        };
        Ok(match outcome {
            // KVM `mmu_set_spte` counts every no-slot install first, also one that rewrites
            // the value already there.
            FetchOutcome::Installed { .. } | FetchOutcome::Spurious if is_mmio => {
                stats.pf_mmio_spte_created += 1;
                super::fault_path::count_slow_mmio(stats);
                emulate_mmio
            }
            FetchOutcome::NoPath if is_mmio => {
                super::fault_path::count_slow_mmio(stats);
                emulate_mmio
            }
            FetchOutcome::Installed { .. } => {
                stats.pf_fixed += 1;
                FaultOutcome::Fixed
            }
            FetchOutcome::Spurious => {
                stats.pf_spurious += 1;
                FaultOutcome::Spurious
            }
            FetchOutcome::WriteProtected => {
                // Not `pf_emulate`: KVM since v6.12 returns RET_PF_WRITE_PROTECTED here, which
                // `kvm_mmu_do_page_fault` does not count, and handles it after the count.
                stats.write_protected_emulations += 1;
                FaultOutcome::Emulate {
                    gpa: walk.gpa,
                    access: access.required(),
                    source: EmulateSource::WriteProtected,
                }
            }
            FetchOutcome::Retry(cause) => retry(stats, cause),
            FetchOutcome::NoPath => {
                return Err(FaultError::Internal { gpa: walk.gpa, dump: Default::default() })
            }
            FetchOutcome::OutOfMemory => return Err(FaultError::OutOfMemory(walk.gpa)),
        })
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
