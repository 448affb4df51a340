//! A #PF exit under shadow paging (KVM `kvm_mmu_page_fault` with TDP off): the MMIO fast path
//! by guest-virtual address and the slow path, KVM `FNAME(page_fault)`.
//!
//! # Fault flow (KVM `kvm_mmu_page_fault` -> `handle_mmio_page_fault` / `FNAME(page_fault)`)
//! - RSVD fault: the per-vCPU MMIO cache by GVA (page, generation, and the cached guest rights
//!   cover the access: no guest walk), then the lockless shadow walk (an MMIO SPTE of the current
//!   generation -> Emulate and cache; stale -> slow path; a zapped entry -> Retry, never an
//!   error; reserved bits in a present entry -> a genuine misconfiguration).
//! - Slow path, inside a memslot read section: walk the guest's tables (a guest fault goes back
//!   to the guest as [`FaultOutcome::GuestPageFault`], never handled as an MMU fault); a present
//!   write to a table the MMU tracks is emulated at once; faultin the guest-physical frame;
//!   decide the leaf (RAM, or an MMIO SPTE that carries the guest's W/U and the generation);
//!   then, under the shadow lock ([`crate::shadow::ShadowMmu::install_fault`]): make pages
//!   available, the stale check (a special root is stale while a free-obsolete-roots request is
//!   pending, 18c841e1f411), build the shadow and install.
//!
//! # Invariants
//! - The slow path holds one memslot read section from the guest walk to the install, so the
//!   slots it decided with cannot be deleted or moved under it (their update waits for it).
//! - The GVA part of the MMIO cache is filled only for a guest-virtual address (not under a
//!   nested walk, KVM `mmu_is_nested`), and a protection #PF clears the faulting GVA's entry.

use super::fault_path::{count_slow_mmio, readonly_write, retry, FastOutcome};
use super::shadow_path::ShadowVcpu;
use super::{FaultAddr, Vcpu, VcpuMmu, VcpuMmuState, VcpuReaders};
use crate::fault::{
    Backing, EmulateSource, FaultError, FaultOutcome, FaultinStop, Mappable, PageFault, PfErr,
};
use crate::guest::{self, GuestCpu, GuestWalk, PagingMode, WalkError};
use crate::host::{GuestMemory, Host, PreemptPoint};
use crate::mmu_core::CachedWalk;
use crate::shadow::{
    fetch::{FetchOutcome, LeafWant, ShadowFault},
    prefetch::PrefetchCtx,
    ShadowRoot, SlotGuestMemory,
};
use crate::shared::VmShared;
use crate::stats::{RetryCause, VcpuStats};
use crate::types::{Access, FaultAccess, Gfn, Gpa, Gva, Level, Pfn};
use crate::vcpu::mmio_cache::MmioInfoCache;
use crate::vm::MmuKind;

impl<H: Host + GuestMemory> Vcpu<H> {
    /// A #PF exit under shadow paging, with the hardware's error code (KVM `kvm_mmu_page_fault`
    /// with TDP off). An exit handler: call it after leaving guest mode (debug builds assert it;
    /// called in guest mode, its fast path runs as it is and its slow path leaves guest mode
    /// first, as [`Self::enter_guest_mode`] says).
    pub fn handle_page_fault(&mut self, gva: Gva, err: PfErr) -> Result<FaultOutcome, FaultError> {
        debug_assert!(!self.st.in_guest, "an exit handler is called after the VM exit");
        let Vcpu { vm, readers, st, mmu, stats } = self;
        let VcpuMmuState::Shadow(sv) = &*mmu else {
            return Err(FaultError::WrongMmu { wanted: MmuKind::Shadow });
        };
        if err.rsvd() {
            stats.misconfig_exits += 1;
        } else {
            stats.violation_exits += 1;
        }
        // Before any table or cache is consulted: the shadow root covers only what the guest can
        // reach (4 GiB without paging or with PAE, the canonical halves with 4-level paging), and
        // a walk of it for anything else reads the entry of the address with the high bits
        // dropped (an MMIO SPTE there would emulate the wrong gpa).
        if !guest::gva_reachable(sv.cpu.mode, gva) {
            return Err(FaultError::NonCanonical(gva));
        }
        let Some(root) = sv.root.as_ref() else {
            return Ok(retry(stats, RetryCause::NoRoot));
        };
        let mut err = err;
        if err.rsvd() {
            // Only the frame and level of the root, read in place: the fast path copies no
            // `ShadowRoot` (a copy of it cost a store-forwarding stall of about 5 ns per fault).
            let (root_pfn, root_level) = root.hw_root();
            if let Some(o) =
                st.shadow_mmio_fast(vm, readers, stats, sv, (root_pfn, root_level), gva, err)?
            {
                return Ok(o);
            }
            err = PfErr(err.0 & !PfErr::RSVD);
        }
        st.shadow_slow(vm, readers, stats, sv, *root, gva, err)
    }
}

impl VcpuMmu {
    /// KVM `handle_mmio_page_fault` under shadow paging. `None`: take the slow path. No lock,
    /// no allocation: the GVA-cache lookup, then a lockless walk of the shadow tables inside a
    /// table read section (`tests/hot_path_alloc.rs`; cost: `vmmu bench --only shadow`).
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn shadow_mmio_fast<H: Host>(
        &mut self,
        vm: &VmShared<H>,
        readers: &VcpuReaders,
        stats: &mut VcpuStats,
        sv: &ShadowVcpu,
        (pfn, level): (Pfn, Level),
        gva: Gva,
        err: PfErr,
    ) -> Result<Option<FaultOutcome>, FaultError> {
        let st = self;
        let bugs = vm.bugs;
        let codec = vm.core.cfg.codec;
        let gen = vm.memslots.generation(st.as_id);
        let fa = err.access();
        if fa.exec {
            // Neither the cache nor an MMIO SPTE records X (KVM's MMIO access mask is W|U), so
            // neither can answer a fetch: the guest walk decides it (a #PF with FETCH from an
            // NX page), as KVM's emulator fetches the instruction through a full guest walk.
            return Ok(None);
        }
        let mut need = fa.required().intersect(Access::WRITE.union(Access::USER));
        if fa.write && !fa.user && !sv.cpu.cr0_wp {
            // KVM's `permission_fault` on the cached rights: with CR0.WP=0 a supervisor write
            // needs no W.
            need = Access::from_bits(need.bits() & !Access::WRITE.bits());
        }
        // A nested walk caches no GVA (KVM: `mmio_gva = 0` for `mmu_is_nested`).
        let nested = sv.fault_addr == FaultAddr::NestedGpa;
        let cache_gva = if nested { 0 } else { gva.raw() };
        if let Some((gfn, access)) = st.mmio_cache.lookup_gva(cache_gva, gen, bugs) {
            if access.contains(need) {
                let gpa = Gpa(gfn.gpa().raw() | gva.page_offset());
                return Ok(Some(super::fault_path::cache_hit(stats, gpa, access)));
            }
        }
        let page = Gfn(gva.raw() >> 12);
        let walk = vm.core.walk_mmio_fast(&mut st.leaf_tables, &readers.table, pfn, level, page);
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
        let guest_page = sv.cpu.largest_page_level();
        st.mmio_cache.fill_guest_page(cache_gva, guest_page, gfn, access, gen, bugs);
        stats.mmio_spte_hits += 1;
        let gpa = Gpa(gfn.gpa().raw() | gva.page_offset());
        Ok(Some(FaultOutcome::Emulate { gpa, access, source: EmulateSource::MmioSpteHit }))
    }

    /// KVM `FNAME(page_fault)`.
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn shadow_slow<H: Host + GuestMemory>(
        &mut self,
        vm: &VmShared<H>,
        readers: &VcpuReaders,
        stats: &mut VcpuStats,
        sv: &ShadowVcpu,
        root: ShadowRoot,
        gva: Gva,
        err: PfErr,
    ) -> Result<FaultOutcome, FaultError> {
        let st = self;
        // As the TDP slow path (`memslot_slow_path`): never wait for this vCPU's own guest mode.
        st.leave_guest_mode(vm, readers);
        let shadow = vm.shadow_for(sv);
        let core = &vm.core;
        let cpu = sv.cpu;
        // A nested walk caches no GVA (KVM `kvm_handle_noslot_fault`: `mmio_gva = 0`).
        let cache_gva = if sv.fault_addr == FaultAddr::NestedGpa { 0 } else { gva.raw() };
        let guard = vm.memslots.read(&readers.memslot);
        let set = guard.set(st.as_id);
        let gen = set.generation();
        stats.pf_taken += 1;
        let mem = SlotGuestMemory::new(set, &*core.host);
        let access = err.access();
        let mut walk = match guest::walk(&cpu, &mem, gva, access) {
            Ok(w) => w,
            Err(e) => return walk_failed(&mut st.mmio_cache, stats, gva, e),
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
            && shadow.may_be_gfn_write_tracked(walk.gfn)
        {
            let mut s = shadow.lock(core);
            if s.is_gfn_write_tracked(walk.gfn) {
                s.clear_flood_along(core, &root, gva);
                drop(s);
                // What faultin would decide for the slot first: a slot being deleted or moved
                // retries, and a table in a read-only slot is a read-only write (KVM's emulator
                // cannot write it either and exits to userspace as MMIO), never "emulate into
                // RAM".
                match set.find(walk.gfn) {
                    Some(slot) if slot.is_invalid() => {
                        return Ok(retry(stats, RetryCause::InvalidSlot))
                    }
                    Some(slot) if slot.is_readonly() => {
                        return Ok(readonly_write(stats, walk.gpa, access.required()))
                    }
                    _ => return Ok(write_protected(stats, walk.gpa, access)),
                }
            }
        }
        let mut fault = PageFault::shadow(walk.gpa, err);
        let mappable = Mappable { format: &core.cfg.format, max_level: Level::L4K };
        let bugs = vm.bugs;
        let faultin =
            fault.faultin(set, &mut st.slot_cache, &*core.host, &core.inval, mappable, bugs)?;
        let backing = match faultin {
            Ok(backing) => backing,
            Err(FaultinStop::Retry(cause)) => return Ok(retry(stats, cause)),
            Err(FaultinStop::ReadOnlyWrite) => {
                return Ok(readonly_write(stats, walk.gpa, access.required()))
            }
        };
        let mmio_access = walk.pte_access.intersect(Access::WRITE.union(Access::USER));
        let want = match backing {
            Backing::Ram { base_pfn, writable, slot, .. } => {
                wp0_supervisor_write(&mut walk, &cpu, access);
                LeafWant::Ram { pfn: base_pfn, writable, slot }
            }
            Backing::NoSlot => {
                // KVM `kvm_handle_noslot_fault` with the GVA (indirect MMU).
                st.mmio_cache.fill_guest_page(
                    cache_gva,
                    walk.level,
                    walk.gfn,
                    mmio_access,
                    gen,
                    bugs,
                );
                let Some(spte) = core.cfg.noslot_mmio_spte(walk.gfn, gen, mmio_access) else {
                    count_slow_mmio(stats);
                    return Ok(slow_path_mmio(walk.gpa, mmio_access));
                };
                LeafWant::Mmio(spte)
            }
        };
        core.host.preempt_point(PreemptPoint::FaultDecided);
        let decided = ShadowFault {
            gva,
            access,
            walk: &walk,
            nonpaging: matches!(cpu.mode, PagingMode::NonPaging),
            want,
            mem: &mem,
            prefetch: PrefetchCtx { set, cpu: &cpu, inval: &core.inval },
        };
        let outcome = shadow.install_fault(core, st.index, &root, &fault, &backing, &decided);
        drop(guard);
        core.reclaim_batched();
        count_outcome(stats, outcome, &walk, want, mmio_access, access)
    }
}

/// A guest walk that did not translate. A guest #PF goes back to the caller to inject (KVM
/// `kvm_inject_emulated_page_fault`): a protection fault invalidates the address in the current
/// root (`kvm_mmu_invalidate_addr`), which since v6.4 clears the GVA's MMIO cache entry and
/// syncs the SPTE only in an unsync page (none here: every shadowed table is write-protected, so
/// a leaf that let the walk fault already denies the access). The leaf stays: the next access
/// that it allows does not fault (paging_guest_pf_keeps_leaf.scn, /dev/kvm).
fn walk_failed(
    mmio_cache: &mut MmioInfoCache,
    stats: &mut VcpuStats,
    gva: Gva,
    e: WalkError,
) -> Result<FaultOutcome, FaultError> {
    match e {
        WalkError::NonCanonical(a) => Err(FaultError::NonCanonical(a)),
        // Another vCPU kept rewriting the gPTEs under the A/D update: nothing decided, the vCPU
        // re-enters the guest and faults again (KVM loops in `retry_walk` instead).
        WalkError::Contended(_) => Ok(retry(stats, RetryCause::Race)),
        WalkError::PageFault(pf) => {
            if pf.error_code.0 & PfErr::PRESENT != 0 && !pf.error_code.rsvd() {
                mmio_cache.clear_gva_page(gva.raw());
            }
            stats.pf_guest += 1;
            Ok(FaultOutcome::GuestPageFault { addr: pf.addr, error_code: pf.error_code })
        }
    }
}

/// KVM `FNAME(page_fault)` with CR0.WP=0: a supervisor write may write a page the guest maps
/// read-only, but the hardware running the guest has CR0.WP=1, so the SPTE is made writable and
/// supervisor-only (a user access then faults and gets a user SPTE back). For RAM only: an MMIO
/// SPTE would cache the wrong rights.
fn wp0_supervisor_write(walk: &mut GuestWalk, cpu: &GuestCpu, access: FaultAccess) {
    if access.write && !access.user && !cpu.cr0_wp && !walk.pte_access.contains(Access::WRITE) {
        let w_only = Access::from_bits(walk.pte_access.bits() & !Access::USER.bits());
        walk.pte_access = w_only.union(Access::WRITE);
    }
}

/// A write to a guest table the MMU shadows, to be emulated and reported to
/// [`Vcpu::track_write`]. Not `pf_emulate`: KVM since v6.12 returns RET_PF_WRITE_PROTECTED,
/// which `kvm_mmu_do_page_fault` does not count, and handles it after the count.
fn write_protected(stats: &mut VcpuStats, gpa: Gpa, access: FaultAccess) -> FaultOutcome {
    stats.write_protected_emulations += 1;
    FaultOutcome::Emulate { gpa, access: access.required(), source: EmulateSource::WriteProtected }
}

/// An MMIO access the slow path decided, with the guest's W/U rights.
fn slow_path_mmio(gpa: Gpa, mmio_access: Access) -> FaultOutcome {
    FaultOutcome::Emulate { gpa, access: mmio_access, source: EmulateSource::SlowPathMmio }
}

/// What the hypervisor does after [`crate::shadow::ShadowMmu::install_fault`], counted as KVM
/// counts it.
fn count_outcome(
    stats: &mut VcpuStats,
    outcome: FetchOutcome,
    walk: &GuestWalk,
    want: LeafWant,
    mmio_access: Access,
    access: FaultAccess,
) -> Result<FaultOutcome, FaultError> {
    let is_mmio = matches!(want, LeafWant::Mmio(_));
    Ok(match outcome {
        // KVM `mmu_set_spte` counts every no-slot install first, also one that rewrites the
        // value already there.
        FetchOutcome::Installed { .. } | FetchOutcome::Spurious if is_mmio => {
            stats.pf_mmio_spte_created += 1;
            count_slow_mmio(stats);
            slow_path_mmio(walk.gpa, mmio_access)
        }
        FetchOutcome::NoPath if is_mmio => {
            count_slow_mmio(stats);
            slow_path_mmio(walk.gpa, mmio_access)
        }
        FetchOutcome::Installed { .. } => {
            stats.pf_fixed += 1;
            FaultOutcome::Fixed
        }
        FetchOutcome::Spurious => {
            stats.pf_spurious += 1;
            FaultOutcome::Spurious
        }
        FetchOutcome::WriteProtected => write_protected(stats, walk.gpa, access),
        FetchOutcome::Retry(cause) => retry(stats, cause),
        FetchOutcome::NoPath => {
            return Err(FaultError::Internal { gpa: walk.gpa, dump: Default::default() })
        }
        FetchOutcome::OutOfMemory => return Err(FaultError::OutOfMemory(walk.gpa)),
        FetchOutcome::OutOfHeap => return Err(FaultError::OutOfHeap(walk.gpa)),
        FetchOutcome::PageLimit => return Err(FaultError::ShadowPageLimit(walk.gpa)),
    })
}
