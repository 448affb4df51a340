//! The machine on the real MMU: [`RealMmu`] implements the [`GuestMmu`] seam with a
//! [`vmmu::vm::Vm`] on the machine's [`SimHost`]. A TLB miss is what the hardware does: the
//! vCPU, in guest mode, walks the second-level tables ([`vmmu::tdp::hw_walk`]); a violation or a
//! misconfiguration/RSVD fault is a VM exit to the MMU's entry point for that exit kind; the
//! outcome decides what the access sees (RAM after a retry, or MMIO emulation).
//!
//! Guest mode here is KVM's: while a vCPU is in it, remote TLB flushes wait for it to notice the
//! request (it polls between accesses, as an IPI would interrupt it) and leave.

use crate::host::SimHost;
pub use crate::mmio_timing::MmioTiming;
use crate::mmio_timing::{elapsed_ns, Sampler};
use crate::seam::{
    AccessKind, GuestMmu, MmioCachingState, MmuCounters, MmuExits, MmuStats, SlotRequest,
    Translation,
};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use vmmu::bugs::BugSet;
use vmmu::dirty::DirtyLogMode;
use vmmu::fault::{FaultOutcome, PfErr};
use vmmu::memslot::MemslotError;
use vmmu::spte::FormatKind;
use vmmu::stats::{RetryCause, VcpuStats};
use vmmu::tdp::{hw_walk, hw_walk_leaf_table, tdp_need, HwWalk};
use vmmu::types::Hva;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig, VmError};
use vmmu::{Access, AsId, FaultAccess, Gfn, Gpa, Level, Pfn, SlotId};

/// How to build the real MMU for a machine.
#[derive(Clone, Copy, Debug)]
pub struct RealMmuConfig {
    /// The SPTE format.
    pub format: FormatKind,
    /// Host MAXPHYADDR.
    pub phys_bits: u8,
    /// The user's wish for MMIO caching.
    pub mmio_caching: bool,
    /// vCPUs the VM must hold.
    pub vcpus: usize,
    /// First memslot generation (e.g. near the MMIO wrap for churn runs).
    pub generation_base: u64,
    /// Delete/move zaps everything.
    pub slot_zap_all: bool,
    /// Injected historical bugs.
    pub bugs: BugSet,
    /// TDP formats: prefetch as KVM's legacy direct MMU ([`VmConfig::tdp_prefetch`]).
    pub tdp_prefetch: bool,
    /// Shadow paging: MMIO faults build no shadow page ([`VmConfig::shadow_mmio_path_only`]).
    pub shadow_mmio_path_only: bool,
    /// Shadow paging: the page limit as `KVM_SET_NR_MMU_PAGES` sets it
    /// ([`VmConfig::shadow_max_pages`]); `None`: KVM's default, 2% of the memslots' pages (64 at
    /// least), recomputed as they change.
    pub shadow_pages: Option<usize>,
}

/// The real MMU behind the seam.
pub struct RealMmu {
    vm: Vm<SimHost>,
    /// Counters of vCPUs that have finished (each adds its own when dropped).
    totals: Arc<Mutex<VcpuStats>>,
    timing: Arc<Mutex<MmioTiming>>,
    /// Memslot requests in flight through [`GuestMmu::set_memory_region`]: a fault meanwhile
    /// may retry until the request is done (an invalid slot), however long a loaded host makes
    /// it, as KVM's faults wait. Relaxed: a hint for a vCPU's retry policy
    /// ([`RealMmu::slot_update_in_flight`]), nothing a verdict reads.
    slot_updates: AtomicU32,
    /// Whether the shadow page limit was set (`KVM_SET_NR_MMU_PAGES`), not KVM's default.
    shadow_pages_set: bool,
}

/// Counts a memslot request in [`RealMmu::slot_updates`] until dropped (also when the request
/// panics, so that no vCPU waits for it for ever).
struct SlotUpdate<'a>(&'a AtomicU32);

impl<'a> SlotUpdate<'a> {
    fn begin(count: &'a AtomicU32) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        SlotUpdate(count)
    }
}

impl Drop for SlotUpdate<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The hardware's paging-structure cache of one vCPU (Intel SDM vol. 3 §4.10.3, "PDE cache"):
/// the level-1 tables its walks went through, by the 2 MiB they map, so a TLB miss there reads
/// one entry instead of walking four levels. Like the hardware's, it is emptied by a TLB flush
/// and by a new root; the MMU flushes on every table unlink (`vmmu::tdp`, rule 4), so it never
/// holds a table that was freed. Set-associative (8 sets of 2 ways, by a hash of the 2 MiB), so
/// a lookup costs two compares whether it hits or not: the hardware looks its entries up in
/// parallel, and a longer search would charge the walks that never fill it (those that stop
/// above level 1) for the model's own work.
#[derive(Default)]
struct PagingStructureCache {
    /// `(root frame, gfn >> 9, level-1 table frame)`; set `i` is entries `2i` and `2i + 1`.
    entries: [Option<(Pfn, u64, Pfn)>; 2 * PSC_SETS],
    /// Per set, the way to replace next.
    victim: [u8; PSC_SETS],
}

/// Sets of [`PagingStructureCache`] (16 entries; real PDE caches hold 16 to 32).
const PSC_SETS: usize = 8;

impl PagingStructureCache {
    fn clear(&mut self) {
        *self = Self::default();
    }

    #[inline]
    fn set(region: u64) -> usize {
        vmmu::hash::bucket(region, PSC_SETS)
    }

    #[inline]
    fn lookup(&self, root: Pfn, gfn: Gfn) -> Option<Pfn> {
        let region = gfn.raw() >> 9;
        let i = 2 * Self::set(region);
        self.entries[i..i + 2]
            .iter()
            .flatten()
            .find(|&&(r, reg, _)| r == root && reg == region)
            .map(|&(_, _, table)| table)
    }

    fn fill(&mut self, root: Pfn, gfn: Gfn, table: Pfn) {
        let region = gfn.raw() >> 9;
        let set = Self::set(region);
        let way = usize::from(self.victim[set] & 1);
        self.entries[2 * set + way] = Some((root, region, table));
        self.victim[set] = (way ^ 1) as u8;
    }
}

/// One vCPU of [`RealMmu`].
pub struct RealVcpu {
    vcpu: Vcpu<SimHost>,
    flush_tlb: bool,
    psc: PagingStructureCache,
    totals: Arc<Mutex<VcpuStats>>,
    timing: Arc<Mutex<MmioTiming>>,
    mine: MmioTiming,
    sampler: Sampler,
    /// Why the last entry failed (no root could be loaded: the host had no frame), reported by
    /// the next translation as its error.
    entry_failed: Option<String>,
}

impl RealMmu {
    /// A VM on `host` with one address space.
    pub fn new(host: Arc<SimHost>, cfg: RealMmuConfig) -> Result<Self, VmError> {
        Self::with_address_spaces(host, cfg, 1)
    }

    /// A VM on `host` with `nr_address_spaces` (1, or 2 for an SMM address space).
    pub fn with_address_spaces(
        host: Arc<SimHost>,
        cfg: RealMmuConfig,
        nr_address_spaces: u16,
    ) -> Result<Self, VmError> {
        let mut vc = VmConfig::new(cfg.format, cfg.phys_bits)?;
        vc.tdp_prefetch = cfg.tdp_prefetch;
        Self::build(vc, host, &cfg, nr_address_spaces)
    }

    /// A shadow-paging VM on `host` (x86 page-table SPTEs; `cfg.format` is ignored).
    pub fn shadow(
        host: Arc<SimHost>,
        cfg: RealMmuConfig,
        nr_address_spaces: u16,
    ) -> Result<Self, VmError> {
        let mut vc = VmConfig::shadow(cfg.phys_bits)?;
        vc.shadow_mmio_path_only = cfg.shadow_mmio_path_only;
        vc.shadow_max_pages = cfg.shadow_pages;
        Self::build(vc, host, &cfg, nr_address_spaces)
    }

    /// The settings both MMUs share, then the VM.
    fn build(
        mut vc: VmConfig,
        host: Arc<SimHost>,
        cfg: &RealMmuConfig,
        nr_address_spaces: u16,
    ) -> Result<Self, VmError> {
        vc.nr_address_spaces = nr_address_spaces;
        vc.mmio_caching = cfg.mmio_caching;
        vc.max_vcpus = cfg.vcpus.max(1);
        vc.generation_base = cfg.generation_base;
        vc.slot_zap_all = cfg.slot_zap_all;
        vc.bugs = cfg.bugs;
        Ok(RealMmu {
            vm: Vm::new(vc, host)?,
            totals: Arc::new(Mutex::new(VcpuStats::default())),
            timing: Arc::new(Mutex::new(MmioTiming::default())),
            slot_updates: AtomicU32::new(0),
            shadow_pages_set: cfg.shadow_pages.is_some(),
        })
    }

    /// Whether a memslot request made through [`GuestMmu::set_memory_region`] is in flight: a
    /// vCPU's retries now wait for it and are no livelock (`hw_vcpu::Attempts`).
    pub fn slot_update_in_flight(&self) -> bool {
        self.slot_updates.load(Ordering::Relaxed) != 0
    }

    /// The VM.
    pub fn vm(&self) -> &Vm<SimHost> {
        &self.vm
    }

    /// MMIO resolution time of the vCPUs that have finished, summed.
    pub fn mmio_timing(&self) -> MmioTiming {
        self.timing.lock().map(|t| *t).unwrap_or_default()
    }

    /// The per-vCPU counters of the vCPUs that have finished, summed.
    pub fn vcpu_totals(&self) -> VcpuStats {
        self.totals.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

impl RealVcpu {
    /// The core vCPU (for drivers that use entry points beyond the seam, e.g. shadow paging).
    pub fn vcpu_mut(&mut self) -> &mut Vcpu<SimHost> {
        &mut self.vcpu
    }

    /// Services requests until the vCPU is in guest mode. `Err`: no root could be loaded; the
    /// vCPU stays outside guest mode.
    fn enter(&mut self) -> Result<(), String> {
        loop {
            match self.vcpu.service_requests() {
                Ok(w) => {
                    if w.flush_tlb {
                        // A flush (every table unlink requests one) or a new root.
                        self.psc.clear();
                    }
                    self.flush_tlb |= w.flush_tlb;
                }
                Err(e) => {
                    return Err(format!("vCPU {} cannot load a root: {e}", self.vcpu.index()))
                }
            }
            if self.vcpu.enter_guest_mode().is_ok() {
                return Ok(());
            }
        }
    }
}

impl Drop for RealVcpu {
    fn drop(&mut self) {
        self.vcpu.exit_guest_mode();
        if let Ok(mut t) = self.totals.lock() {
            t.accumulate(&self.vcpu.stats);
        }
        if let Ok(mut t) = self.timing.lock() {
            t.add(&self.mine);
        }
    }
}

impl GuestMmu for RealMmu {
    type Vcpu = RealVcpu;

    fn set_dirty_log_mode(&self, mode: DirtyLogMode) -> bool {
        self.vm.set_dirty_log_mode(mode);
        true
    }

    fn get_dirty_log(&self, slot: u32) -> Option<Result<Vec<u64>, String>> {
        let (as_id, id) = SlotId::split(slot);
        Some(self.vm.get_dirty_log(as_id, id).map_err(|e| e.errno().to_string()))
    }

    fn clear_dirty_log(
        &self,
        slot: u32,
        first: u64,
        count: u32,
        bitmap: Option<&[u64]>,
    ) -> Option<Result<(), String>> {
        let (as_id, id) = SlotId::split(slot);
        let r = match bitmap {
            Some(bitmap) => self.vm.clear_dirty_log(as_id, id, first, count, bitmap),
            None => self.vm.clear_dirty_log_all(as_id, id, first, count),
        };
        Some(r.map_err(|e| e.errno().to_string()))
    }

    fn create_vcpu(&self, index: usize) -> RealVcpu {
        let vcpu = self
            .vm
            .create_vcpu()
            .unwrap_or_else(|e| panic!("vCPU {index} could not be created: {e}"));
        RealVcpu {
            vcpu,
            flush_tlb: true,
            psc: PagingStructureCache::default(),
            totals: self.totals.clone(),
            timing: self.timing.clone(),
            mine: MmioTiming::default(),
            sampler: Sampler::default(),
            entry_failed: None,
        }
    }

    fn set_memory_region(&self, r: &SlotRequest) -> Result<(), MemslotError> {
        let _update = SlotUpdate::begin(&self.slot_updates);
        self.vm.set_memory_region(&r.region()).map(|_| ())
    }

    fn enter_guest(&self, v: &mut RealVcpu) {
        if !v.vcpu.in_guest_mode() {
            v.entry_failed = v.enter().err();
        }
    }

    fn exit_guest(&self, v: &mut RealVcpu) {
        v.vcpu.exit_guest_mode();
    }

    fn record_mmio_time(&self, v: &mut RealVcpu, nanos: Option<u64>) {
        v.mine.record(nanos);
    }

    fn shadow_vcpu<'v>(&self, v: &'v mut RealVcpu) -> Option<&'v mut Vcpu<SimHost>> {
        (self.vm.mmu_kind() == vmmu::vm::MmuKind::Shadow).then_some(&mut v.vcpu)
    }

    fn mmu_kind(&self) -> vmmu::vm::MmuKind {
        self.vm.mmu_kind()
    }

    fn shadow_pages(&self) -> Option<crate::report::ShadowPagesReport> {
        let limit = self.vm.shadow_max_pages()?;
        Some(crate::report::ShadowPagesReport { limit, set: self.shadow_pages_set })
    }

    fn poll_tlb_flush(&self, v: &mut RealVcpu) -> bool {
        if !v.vcpu.in_guest_mode() || v.vcpu.requests_pending() {
            // The "IPI": leave guest mode, handle the requests, come back.
            v.vcpu.exit_guest_mode();
            v.entry_failed = v.enter().err();
        }
        std::mem::take(&mut v.flush_tlb)
    }

    fn translate(&self, v: &mut RealVcpu, gpa: Gpa, access: AccessKind) -> Translation {
        let t0 = v.sampler.start();
        let t = translate(&self.vm, v, gpa, access);
        if t == Translation::Mmio {
            v.mine.record(elapsed_ns(t0));
        }
        t
    }

    fn invalidate_hva_range(&self, start: Hva, end: Hva, during: &mut dyn FnMut()) -> bool {
        let inv = self.vm.invalidate_hva_range_begin(start, end);
        during();
        inv.end();
        true
    }

    fn generation(&self) -> u64 {
        // Address space 0 exists in every VM: never the 0.
        self.vm.memslots().generation(AsId(0)).map_or(0, |g| g.raw())
    }

    fn stats(&self) -> MmuStats {
        stats(self)
    }

    fn vcpu_exits(&self, v: &RealVcpu) -> MmuExits {
        let s = &v.vcpu.stats;
        MmuExits {
            violation: s.violation_exits,
            misconfig: s.misconfig_exits,
            mmio_spte_hit: s.mmio_spte_hits,
            mmio_cache_hit: s.mmio_cache_hits,
            mmio_slow_path: s.slow_path_mmio,
        }
    }

    fn mmio_caching(&self) -> MmioCachingState {
        let p = self.vm.mmio_caching();
        let effective = self.vm.mmio_caching_enabled();
        let reason = match p.reason() {
            Some(r) => r.to_string(),
            None if effective => "enabled".to_string(),
            None => "disabled for this VM".to_string(),
        };
        MmioCachingState { effective, reason }
    }
}

/// The hardware's walk for a TLB miss, through the vCPU's paging-structure cache. In guest mode.
fn hw_walk_cached(vm: &Vm<SimHost>, v: &mut RealVcpu, gpa: Gpa, need: Access) -> HwWalk {
    // Nested walks: on NPT every guest access is a user access (`vmmu::tdp::tdp_need`).
    let need = tdp_need(need);
    let Some((root, root_level)) = v.vcpu.root().map(|r| (r.pfn(), r.level())) else {
        return v.vcpu.walk(gpa, need);
    };
    let mmu = vm.core();
    let fmt = mmu.config().format;
    let host: &SimHost = mmu.host();
    // The walks below rely on the read section of guest mode (`translate` enters it first).
    assert!(v.vcpu.in_guest_mode(), "the hardware walks only in guest mode");
    if let Some(table) = v.psc.lookup(root, gpa.gfn()) {
        // SAFETY: memory first: `SimHost` never gives table memory back while it lives (it is
        // type-stable, `FrameAllocator::type_stable_tables`), and `hw_walk` asks its `table`
        // for every frame, which answers `None` for a frame that is not a live table; so even a
        // stale cached frame is read as valid atomics, never freed memory. Staleness itself is
        // ruled out normally: the cached table was reached from the current root after the last
        // flush `enter` handled, the MMU requests a flush of every vCPU for every table it
        // unlinks before the grace period that frees it (rule 4 of `vmmu::tdp`), and `enter`
        // empties the cache on that flush; so the table is still linked or was unlinked during
        // this guest-mode period, whose read section the grace period waits for. It is not
        // ruled out with `no-flush-on-table-unlink` or `no-tlb-flush-on-zap` re-injected, or
        // when a driver services requests itself through `vcpu_mut` (the flush then does not
        // clear this cache): the walk may then read a reused frame, which is the harm those
        // bugs model, and stays memory-safe by the first point.
        return unsafe { hw_walk(&fmt, host, table, Level::L4K, gpa.gfn(), need) };
    }
    // SAFETY: in guest mode (the read section is open) from the vCPU's current root, which it
    // keeps while in guest mode (what `Vcpu::walk` does). A `RealVcpu` made by another VM's
    // `RealMmu` (`HwVcpu::with_state` takes any) breaks the pairing of root and host; memory
    // safety then rests on the first point above: `SimHost` is type-stable and its `table`
    // answers `None` for a frame that is not one of its live tables.
    let (walk, leaf_table) =
        unsafe { hw_walk_leaf_table(&fmt, host, root, root_level, gpa.gfn(), need) };
    if let Some(table) = leaf_table {
        v.psc.fill(root, gpa.gfn(), table);
    }
    walk
}

/// A TLB miss: the hardware walk in guest mode, and on a fault the exit to the MMU's entry point
/// for that exit kind.
fn translate(vm: &Vm<SimHost>, v: &mut RealVcpu, gpa: Gpa, access: AccessKind) -> Translation {
    let write = access.is_write();
    if let Some(why) = v.entry_failed.take() {
        return Translation::Error(why);
    }
    if !v.vcpu.in_guest_mode() {
        if let Err(why) = v.enter() {
            return Translation::Error(why);
        }
    }
    let need = if write { Access::WRITE } else { Access::NONE };
    let walk = hw_walk_cached(vm, v, gpa, need);
    let ept = v.vcpu.format().is_ept();
    // Anything but a translation is a VM exit.
    let result = match walk {
        HwWalk::Translated { pfn, level, perms } => {
            return Translation::Ram { pfn, writable: perms.contains(Access::WRITE), level };
        }
        HwWalk::Broken { dump } => {
            return Translation::Error(format!(
                "hardware walk of {gpa} hit an unknown frame: {dump}"
            ));
        }
        HwWalk::Violation { present, .. } => {
            v.vcpu.exit_guest_mode();
            if ept {
                let fa = if write { FaultAccess::WRITE } else { FaultAccess::READ };
                v.vcpu.handle_ept_violation(gpa, fa)
            } else {
                let mut e = PfErr::USER | if write { PfErr::WRITE } else { 0 };
                if present {
                    e |= PfErr::PRESENT;
                }
                v.vcpu.handle_npf(gpa, PfErr(e))
            }
        }
        HwWalk::Misconfig { .. } => {
            v.vcpu.exit_guest_mode();
            if ept {
                v.vcpu.handle_ept_misconfig(gpa)
            } else {
                let e = PfErr::RSVD
                    | PfErr::PRESENT
                    | PfErr::USER
                    | if write { PfErr::WRITE } else { 0 };
                v.vcpu.handle_npf(gpa, PfErr(e))
            }
        }
    };
    match result {
        Ok(FaultOutcome::Emulate { .. }) => Translation::Mmio,
        Ok(FaultOutcome::Fixed | FaultOutcome::Spurious) => Translation::Fixed,
        Ok(FaultOutcome::Retry(_)) => Translation::Retry,
        // The machine's VMs are TDP VMs: a guest page fault cannot come out of their entry
        // points.
        Ok(FaultOutcome::GuestPageFault { addr, .. }) => Translation::Error(format!(
            "vCPU {}: guest #PF at {addr} from a TDP VM",
            v.vcpu.index()
        )),
        Err(e) => Translation::Error(format!("vCPU {}: {e}", v.vcpu.index())),
    }
}

fn stats(m: &RealMmu) -> MmuStats {
    let t = m.vcpu_totals();
    let vm = m.vm.stats();
    let timing = m.mmio_timing();
    let retry = |c: RetryCause| t.retries[c as usize];
    MmuStats {
        exits: MmuExits {
            violation: t.violation_exits,
            misconfig: t.misconfig_exits,
            mmio_spte_hit: t.mmio_spte_hits,
            mmio_cache_hit: t.mmio_cache_hits,
            mmio_slow_path: t.slow_path_mmio,
        },
        mmio_sptes_created: t.pf_mmio_spte_created,
        zaps: vm.zap_range,
        zap_all_fast: vm.zap_all_fast,
        retries: t.retries_total(),
        tlb_flush_requests: vm.remote_tlb_flush_requests,
        generation: m.vm.memslots().generation(AsId(0)).map_or(0, |g| g.raw()),
        generation_wraps: vm.mmio_gen_wraps,
        counters: Some(MmuCounters {
            mmio_translate_ns: timing.nanos,
            mmio_fast_hits: t.mmio_fast_hits(),
            mmio_translations: timing.count,
            mmio_translations_timed: timing.timed,
            mmio_timed_outliers: timing.outliers,
            mmu_recycled: m.vm.shadow_mmu().map_or(0, |s| s.stats.snapshot().mmu_recycled),
            shadow_page_limit_failures: m
                .vm
                .shadow_mmu()
                .map_or(0, |s| s.stats.snapshot().page_limit_failures),
            mmu_shadow_zapped: vm.mmu_shadow_zapped,
            tdp_tables_zapped: vm.tdp_tables_zapped,
            pages_1g: vm.pages_1g,
            pages_2m: vm.pages_2m,
            pages_4k: vm.pages_4k,
            pf_emulate: t.pf_emulate,
            pf_fixed: t.pf_fixed,
            pf_spurious: t.pf_spurious,
            pf_taken: t.pf_taken,
            readonly_write_emulations: t.readonly_write_emulations,
            remote_tlb_flush: vm.remote_tlb_flush,
            retry_frozen: retry(RetryCause::Frozen),
            retry_host_invalidation: retry(RetryCause::HostInvalidation),
            retry_invalid_slot: retry(RetryCause::InvalidSlot),
            retry_no_root: retry(RetryCause::NoRoot),
            retry_obsolete_root: retry(RetryCause::ObsoleteRoot),
            retry_pageless_root_reload_pending: retry(RetryCause::PagelessRootReloadPending),
            retry_race: retry(RetryCause::Race),
            retry_zapped_under_walk: retry(RetryCause::ZappedUnderWalk),
            root_loads: t.root_loads,
            stale_gen_misses: t.stale_gen_misses,
            tables_allocated: vm.tables_allocated,
            tables_freed: vm.tables_freed,
            tables_refused: vm.tables_refused,
            vcpu_tlb_flushes: t.tlb_flush,
        }),
    }
}
