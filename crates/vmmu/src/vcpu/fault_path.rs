//! The fault path of one vCPU (KVM `kvm_mmu_page_fault` -> `handle_mmio_page_fault` /
//! `kvm_tdp_page_fault`): the fast path for RSVD faults, then the slow path on the fault record:
//! faultin, the stale check and the map under the shared MMU lock, and the outcome.
//!
//! Everything here runs on the vCPU's thread, outside guest mode. The fast path (per-vCPU cache,
//! then the lockless walk) reads the published generation and enters only the table read
//! section, and not even that for a leaf-table cache hit on a type-stable host (`mmu_core` walk
//! module); the slow path runs inside one memslot read section.
//!
//! Hot-path contract: the per-vCPU cache hit, the MMIO SPTE fast path and the uncached slow
//! path's "no slot" decision take no lock (the one lock of the fault path, `mmu_lock`, is taken
//! only to install an SPTE) and allocate nothing (`tests/hot_path_alloc.rs` counts allocations
//! over 10,000 calls of each; `vmmu bench --only mmio` measures what they cost).

use super::TdpVcpu;
use super::{VcpuMmu, VcpuReaders};
use crate::bugs::Bug;
use crate::fault::{
    Backing, EmulateSource, FaultError, FaultOutcome, FaultinStop, Mappable, PageFault,
};
use crate::host::Host;
use crate::memslot::MemslotSet;
use crate::mmu_core::{CachedWalk, LocklessWalk};
use crate::shared::VmShared;
use crate::spte::SpteFormat;
use crate::stats::{RetryCause, StripeKey, VcpuStats};
use crate::tdp::root::Root;
use crate::tdp::RootRef;
use crate::tdp::{LeafSpec, MapOutcome};
use crate::types::{Access, Generation, Gpa, Level};

/// What [`VcpuMmu::mmio_cache_probe`] found.
pub(super) enum CacheProbe {
    /// A hit: emulate.
    Hit(FaultOutcome),
    /// A miss, at this generation.
    Miss(Generation),
}

/// The fast path's own result (KVM adds `RET_PF_INVALID`: "take the slow path").
pub(super) enum FastOutcome {
    Done(FaultOutcome),
    Invalid,
}

/// Counts a per-vCPU MMIO cache hit at `gpa` and returns its outcome (both MMUs).
#[inline(always)]
pub(super) fn cache_hit(stats: &mut VcpuStats, gpa: Gpa, access: Access) -> FaultOutcome {
    stats.mmio_cache_hits += 1;
    FaultOutcome::Emulate { gpa, access, source: EmulateSource::VcpuCacheHit }
}

/// Counts a no-slot fault of the slow path that ends in emulation (KVM `pf_emulate` counts the
/// RET_PF_EMULATE result, so a no-slot fault that retries after all is not counted).
#[inline]
pub(super) fn count_slow_mmio(stats: &mut VcpuStats) {
    stats.slow_path_mmio += 1;
    stats.pf_emulate += 1;
}

/// Counts a retry by its cause and returns it (both MMUs' fault paths).
pub(super) fn retry(stats: &mut VcpuStats, cause: RetryCause) -> FaultOutcome {
    stats.retries[cause as usize] += 1;
    FaultOutcome::Retry(cause)
}

/// A write to a read-only slot (KVM's `KVM_PFN_ERR_RO_FAULT`), counted: the access is emulated,
/// and never cached as MMIO (reads of that gfn are RAM).
pub(super) fn readonly_write(stats: &mut VcpuStats, gpa: Gpa, access: Access) -> FaultOutcome {
    stats.readonly_write_emulations += 1;
    stats.pf_emulate += 1;
    FaultOutcome::Emulate { gpa, access, source: EmulateSource::ReadOnlyWrite }
}

/// Dirty logging (KVM `make_spte`, which marks before the SPTE is installed): a fault that
/// will map its page writable marks the page first, under the same MMU lock hold as the map
/// (the caller holds it), so the bit is set before any vCPU can write through the leaf. A
/// collection's GET reads the bitmap without the MMU lock: had the mark come after the install,
/// another vCPU could write through the new leaf and finish, the GET run, and only then the mark
/// land, so the GET that had to report that write would not (a lost dirty page; the soak of
/// `vmmu run --dirty-log initially-set --guest-paging` found it). A map that then installs
/// nothing (another vCPU's leaf serves, a lost race) leaves a spurious mark, as in KVM: an extra
/// page copied, never a lost one. The CLEAR that protects pages holds the lock exclusive, so it
/// cannot run between the mark and the install.
fn mark_before_map(set: &MemslotSet, fault: &PageFault, backing: &Backing) {
    if let Backing::Ram { slot, writable: true, .. } = *backing {
        set.mark_page_dirty(&slot, fault.gfn);
    }
}

impl VcpuMmu {
    /// Leaves guest mode if the vCPU is in it (`Vcpu::exit_guest_mode`): clears the mode bit and
    /// closes the guest-mode table read section. A load and a branch outside guest mode.
    #[inline]
    pub(super) fn leave_guest_mode<H: Host>(&mut self, vm: &VmShared<H>, readers: &VcpuReaders) {
        if !self.in_guest {
            return;
        }
        self.in_guest = false;
        let mmu = &vm.core;
        mmu.vcpus[self.index].exit_guest_mode();
        // SAFETY: `in_guest` was set by `Vcpu::enter_guest_mode`, which opened the section on
        // this reader, and nothing else closes it.
        unsafe { mmu.table_srcu.read_unlock_raw(&readers.table) };
    }

    /// The per-vCPU MMIO cache lookup of an RSVD fault at `gpa` (KVM `mmio_info_in_cache`, the
    /// first step of `handle_mmio_page_fault`), inline in the exit handler so that a hit does
    /// not pay for the fault path's frame. On a miss the caller goes on with
    /// [`Self::ept_misconfig_after_cache_miss`] and the generation read here.
    #[inline(always)]
    pub(super) fn mmio_cache_probe<H: Host>(
        &self,
        vm: &VmShared<H>,
        stats: &mut VcpuStats,
        gpa: Gpa,
    ) -> CacheProbe {
        // Read without a memslot read section, as `page_fault` explains.
        let gen = vm.memslots.generation(self.as_id);
        match self.mmio_cache.lookup_gpa(gpa.gfn(), gen, vm.bugs) {
            Some(access) => CacheProbe::Hit(cache_hit(stats, gpa, access)),
            None => CacheProbe::Miss(gen),
        }
    }

    /// KVM `kvm_mmu_page_fault` on a TDP vCPU (`tv`) whose root `root` is loaded.
    pub(super) fn page_fault<H: Host>(
        &mut self,
        vm: &VmShared<H>,
        readers: &VcpuReaders,
        stats: &mut VcpuStats,
        (tv, root): (&TdpVcpu, &RootRef),
        fault: PageFault,
    ) -> Result<FaultOutcome, FaultError> {
        if fault.rsvd() {
            // The fast path compares generations and reads no memslot map, so it reads the
            // published generation without a memslot read section: a generation is one atomic
            // word, and every set's generation only grows (in-progress values never match).
            // An update racing this check is concurrent with the access, which may then see
            // either side of it, as with a section; one that returned before the access began
            // is visible through the Acquire loads of `generation`.
            let gen = vm.memslots.generation(self.as_id);
            match self
                .handle_mmio_page_fault::<H, true>(vm, readers, stats, root, gen, fault.addr)?
            {
                FastOutcome::Done(o) => return Ok(o),
                FastOutcome::Invalid => {}
            }
        }
        self.memslot_slow_path(vm, readers, stats, (tv, root), fault)
    }

    /// An EPT misconfiguration at `gpa` whose per-vCPU cache lookup ([`Self::mmio_cache_probe`],
    /// with a root loaded) missed at generation `gen`: the rest of `page_fault`. Out of line, so
    /// the probe's caller keeps a small frame.
    #[inline(never)]
    pub(super) fn ept_misconfig_after_cache_miss<H: Host>(
        &mut self,
        vm: &VmShared<H>,
        readers: &VcpuReaders,
        stats: &mut VcpuStats,
        (tv, root): (&TdpVcpu, &RootRef),
        gen: Generation,
        gpa: Gpa,
    ) -> Result<FaultOutcome, FaultError> {
        match self.handle_mmio_page_fault::<H, false>(vm, readers, stats, root, gen, gpa)? {
            FastOutcome::Done(o) => Ok(o),
            FastOutcome::Invalid => {
                self.ept_misconfig_slow_path(vm, readers, stats, (tv, root), gpa)
            }
        }
    }

    /// An EPT misconfiguration the fast path did not decide (a stale MMIO generation): the slow
    /// path. Out of line and cold, so that the fast path neither builds the fault record nor
    /// reserves the slow path's frame (measured: `vmmu bench --only mmio`).
    #[cold]
    #[inline(never)]
    fn ept_misconfig_slow_path<H: Host>(
        &mut self,
        vm: &VmShared<H>,
        readers: &VcpuReaders,
        stats: &mut VcpuStats,
        tdp_root: (&TdpVcpu, &RootRef),
        gpa: Gpa,
    ) -> Result<FaultOutcome, FaultError> {
        let fault = PageFault::tdp(gpa, crate::fault::PfErr(crate::fault::PfErr::RSVD));
        self.memslot_slow_path(vm, readers, stats, tdp_root, fault)
    }

    /// The slow path inside one memslot read section.
    #[inline(always)]
    fn memslot_slow_path<H: Host>(
        &mut self,
        vm: &VmShared<H>,
        readers: &VcpuReaders,
        stats: &mut VcpuStats,
        tdp_root: (&TdpVcpu, &RootRef),
        mut fault: PageFault,
    ) -> Result<FaultOutcome, FaultError> {
        // The slow path may wait for every vCPU in guest mode (a remote flush) or for a grace
        // period: a handler called in guest mode (a misuse debug builds assert against) would
        // wait for its own vCPU forever, so it leaves guest mode first.
        self.leave_guest_mode(vm, readers);
        let guard = vm.memslots.read(&readers.memslot);
        let set = guard.set(self.as_id);
        stats.pf_taken += 1;
        self.tdp_page_fault(vm, stats, tdp_root, set, &mut fault)
    }

    /// KVM `check_mmio_spte`: no hit while an update is in progress; else the SPTE's generation
    /// bits must equal the low bits of the current generation.
    #[inline]
    pub(super) fn check_mmio_spte<H: Host>(vm: &VmShared<H>, spte: u64, gen: Generation) -> bool {
        if vm.bugs.has(Bug::MmioSpteIgnoresGen) {
            return true;
        }
        if gen.in_progress() {
            return false;
        }
        vm.core.cfg.codec.generation_bits(spte) == gen.mmio_bits()
    }

    /// The fast path for RSVD faults (KVM `handle_mmio_page_fault`). No lock, no allocation.
    fn handle_mmio_page_fault<H: Host, const CHECK_CACHE: bool>(
        &mut self,
        vm: &VmShared<H>,
        readers: &VcpuReaders,
        stats: &mut VcpuStats,
        root: &Root,
        gen: Generation,
        gpa: Gpa,
    ) -> Result<FastOutcome, FaultError> {
        let bugs = vm.bugs;
        let gfn = gpa.gfn();
        if CHECK_CACHE {
            if let Some(access) = self.mmio_cache.lookup_gpa(gfn, gen, bugs) {
                return Ok(FastOutcome::Done(cache_hit(stats, gpa, access)));
            }
        }
        let (root_pfn, root_level) = (root.pfn(), root.level());
        if !super::tdp_reaches(root_level, gpa) {
            // No SPTE maps a gpa above what the root decodes (it is above every memslot and the
            // max gfn): the walk would read the entries of the gpa with its high bits dropped
            // and report that page's MMIO SPTE. The slow path emulates it.
            return Ok(FastOutcome::Invalid);
        }
        let walk = vm.core.walk_mmio_fast(
            &mut self.leaf_tables,
            &readers.table,
            root_pfn,
            root_level,
            gfn,
        );
        let leaf = match walk {
            CachedWalk::Mmio(leaf) => leaf,
            CachedWalk::Walked(w) => return Self::not_mmio(stats, bugs, gpa, w),
        };
        let codec = vm.core.cfg.codec;
        if !Self::check_mmio_spte(vm, leaf, gen) {
            stats.stale_gen_misses += 1;
            return Ok(FastOutcome::Invalid);
        }
        let access = codec.access(leaf);
        self.mmio_cache.fill(0, codec.gfn(leaf), access, gen, bugs);
        stats.mmio_spte_hits += 1;
        Ok(FastOutcome::Done(FaultOutcome::Emulate {
            gpa,
            access,
            source: EmulateSource::MmioSpteHit,
        }))
    }

    /// The fast path's walk found no MMIO SPTE (both MMUs; `gpa` is the GVA under shadow
    /// paging): a genuine misconfiguration, a host inconsistency, or an entry zapped, frozen or
    /// changed under the walk (Retry, never an error: 2011).
    #[cold]
    pub(super) fn not_mmio(
        stats: &mut VcpuStats,
        bugs: crate::bugs::BugSet,
        gpa: Gpa,
        walk: LocklessWalk,
    ) -> Result<FastOutcome, FaultError> {
        match walk {
            LocklessWalk::Reserved { level, reason, dump } => {
                Err(FaultError::Misconfig { gpa, level: level.get(), reason, dump })
            }
            LocklessWalk::Broken { dump } => Err(FaultError::Internal { gpa, dump }),
            LocklessWalk::Leaf { leaf, level, dump } => {
                if SpteFormat::is_frozen(leaf) {
                    return Ok(FastOutcome::Done(retry(stats, RetryCause::Frozen)));
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
                Ok(FastOutcome::Done(retry(stats, RetryCause::ZappedUnderWalk)))
            }
        }
    }

    /// The slow path (KVM `kvm_tdp_page_fault`), inside the caller's memslot read section:
    /// faultin, then the stale check and the map under the shared MMU lock. Kept out of line
    /// so the fast path's frame stays small (measured: `vmmu bench --only mmio`).
    #[inline(never)]
    fn tdp_page_fault<H: Host>(
        &mut self,
        vm: &VmShared<H>,
        stats: &mut VcpuStats,
        (tv, root): (&TdpVcpu, &RootRef),
        set: &MemslotSet,
        fault: &mut PageFault,
    ) -> Result<FaultOutcome, FaultError> {
        // The core until the MMU lock: the TDP MMU is needed only from there on.
        let core = &vm.core;
        let bugs = vm.bugs;
        let codec = core.cfg.codec;
        let gen = set.generation();
        let gpa = fault.addr;
        let faultin = fault.faultin(
            set,
            &mut self.slot_cache,
            &*core.host,
            &core.inval,
            Mappable { format: &core.cfg.format, max_level: core.cfg.format.max_leaf_level() },
            bugs,
        )?;
        let backing = match faultin {
            Ok(backing) => backing,
            Err(FaultinStop::Retry(cause)) => return Ok(retry(stats, cause)),
            Err(FaultinStop::ReadOnlyWrite) => {
                return Ok(readonly_write(stats, gpa, fault.access.required()))
            }
        };
        let mmio_access = Access::from_bits(Access::ALL.bits() & codec.access_mask() as u8);
        let spec = match backing {
            Backing::Ram { base_pfn, max_level, writable, kind, .. } => {
                LeafSpec::Ram { base_pfn, max_level, access: Access::ALL, writable, kind }
            }
            Backing::NoSlot => {
                // KVM `kvm_handle_noslot_fault`.
                self.mmio_cache.fill(0, fault.gfn, mmio_access, gen, bugs);
                let Some(spte) = core.cfg.noslot_mmio_spte(fault.gfn, gen, Access::ALL) else {
                    count_slow_mmio(stats);
                    return Ok(FaultOutcome::Emulate {
                        gpa,
                        access: mmio_access,
                        source: EmulateSource::SlowPathMmio,
                    });
                };
                LeafSpec::Mmio(spte)
            }
        };

        core.host.preempt_point(crate::host::PreemptPoint::FaultDecided);
        let mmu = vm.tdp_for(tv);
        let shared = mmu.tdp.mmu_lock.read_vcpu(&mmu.vcpus[self.index], &mmu.relax());
        let pending = mmu.vcpus[self.index].pending();
        if let Some(cause) = fault.stale(&backing, root.state(), pending, &mmu.inval, bugs) {
            drop(shared);
            return Ok(retry(stats, cause));
        }
        mark_before_map(set, fault, &backing);
        let mut outcome = mmu.map(&shared, root, fault, spec, StripeKey::Vcpu(self.index));
        mmu.host.preempt_point(crate::host::PreemptPoint::FaultInstalled);
        if outcome == MapOutcome::TableInTheWay {
            drop(shared);
            outcome =
                match self.map_over_table_in_the_way(vm, set, fault, &backing, spec, (tv, root)) {
                    Ok(o) => o,
                    Err(cause) => return Ok(retry(stats, cause)),
                };
        } else {
            if let (MapOutcome::Installed { level: Level::L4K }, Backing::Ram { .. }) =
                (outcome, backing)
            {
                mmu.prefetch_direct(&shared, root, fault.gfn, set, StripeKey::Vcpu(self.index));
            }
            drop(shared);
        }
        count_map_outcome(stats, outcome, matches!(spec, LeafSpec::Mmio(_)), gpa, mmio_access)
    }

    /// The huge leaf of `fault` replaces a lower table (`MapOutcome::TableInTheWay`): under the
    /// exclusive MMU lock, after checking again under that hold that the fault is not stale
    /// (tdp/map.rs). The detached table goes to the free queue as a tree, whose place is promised
    /// before the lock is taken: out of heap, `MapOutcome::OutOfHeap` with nothing changed.
    /// `Err`: the fault is stale, retry it. Rare: kept out of line.
    #[inline(never)]
    fn map_over_table_in_the_way<H: Host>(
        &self,
        vm: &VmShared<H>,
        set: &MemslotSet,
        fault: &PageFault,
        backing: &Backing,
        spec: LeafSpec,
        (tv, root): (&TdpVcpu, &Root),
    ) -> Result<MapOutcome, RetryCause> {
        let mmu = vm.tdp_for(tv);
        mmu.host.preempt_point(crate::host::PreemptPoint::TableInTheWay);
        let Ok(promise) = mmu.promise_tree() else {
            return Ok(MapOutcome::OutOfHeap);
        };
        let excl = mmu.tdp.mmu_lock.write(&mmu.vcpus, &mmu.relax());
        let pending = mmu.vcpus[self.index].pending();
        #[cfg(loom)]
        let recheck = !crate::tdp::loom_knobs::SKIP_TABLE_IN_THE_WAY_RECHECK
            .load(core::sync::atomic::Ordering::Relaxed);
        #[cfg(not(loom))]
        let recheck = true;
        if let Some(cause) =
            fault.stale(backing, root.state(), pending, &mmu.inval, vm.bugs).filter(|_| recheck)
        {
            return Err(cause);
        }
        // Marked again: the collection that may have run since the first mark (it holds the
        // lock exclusive, so not while the shared hold was) may have cleared the bit.
        mark_before_map(set, fault, backing);
        let (outcome, detached) = mmu.replace_table_in_the_way(&excl, root, fault, spec);
        if let Some(d) = detached {
            // Held first: a kick of the flush that unwinds still queues the tree (`DetachedTree`).
            let tree = promise.hold(d.table, d.level);
            mmu.flush_after_zap(d.flush);
            drop(excl);
            tree.queue();
        } else {
            drop(excl);
        }
        mmu.reclaim_batched();
        Ok(outcome)
    }
}

/// What the hypervisor does after a TDP map, counted as KVM counts it.
#[inline]
fn count_map_outcome(
    stats: &mut VcpuStats,
    outcome: MapOutcome,
    is_mmio: bool,
    gpa: Gpa,
    mmio_access: Access,
) -> Result<FaultOutcome, FaultError> {
    let emulate_mmio =
        FaultOutcome::Emulate { gpa, access: mmio_access, source: EmulateSource::SlowPathMmio };
    match outcome {
        // KVM returns EMULATE for an MMIO SPTE, and counts it as created, even when it was
        // already there (`tdp_mmu_map_handle_target_level` tests the new SPTE after its
        // SPURIOUS check).
        MapOutcome::Installed { .. } | MapOutcome::Spurious if is_mmio => {
            stats.pf_mmio_spte_created += 1;
            count_slow_mmio(stats);
            Ok(emulate_mmio)
        }
        MapOutcome::Installed { .. } => {
            stats.pf_fixed += 1;
            Ok(FaultOutcome::Fixed)
        }
        // Another vCPU mapped the gfn with rights enough for this access (a RAM leaf from a
        // newer memslot set, while this fault decided from an older one): let the access
        // walk again and use it. Not Emulate, even if this fault thought "MMIO".
        MapOutcome::Spurious | MapOutcome::PresentLeafAllows => {
            stats.pf_spurious += 1;
            Ok(FaultOutcome::Spurious)
        }
        // TableInTheWay only if the replacement did not happen: fault again.
        MapOutcome::Retry | MapOutcome::TableInTheWay => Ok(retry(stats, RetryCause::Race)),
        MapOutcome::OutOfMemory => Err(FaultError::OutOfMemory(gpa)),
        MapOutcome::OutOfHeap => Err(FaultError::OutOfHeap(gpa)),
        MapOutcome::Broken => Err(FaultError::Internal { gpa, dump: Default::default() }),
    }
}
