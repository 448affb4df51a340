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
//! `invalidate_hva_range` (KVM's MMU notifier start and end around the host's change) between
//! memslot updates. Contract: when the change starts, no vCPU uses a translation to a page in
//! the range (the same flush and wait as above), and until the call returns every fault on such
//! a page retries; after it the pages are re-faulted as usual.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};
use serde::Serialize;
use vmmu::memslot::{MemslotError, UserspaceMemoryRegion};
use vmmu::types::{Gpa, Hva, Level, Pfn};

/// A memslot update request, with the fields of KVM's `kvm_userspace_memory_region` (the core's
/// [`UserspaceMemoryRegion`], plus `Serialize` and the machine's helpers).
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

    /// The core's request with the same fields.
    pub const fn region(&self) -> UserspaceMemoryRegion {
        UserspaceMemoryRegion {
            slot: self.slot,
            flags: self.flags,
            guest_phys_addr: self.guest_phys_addr,
            memory_size: self.memory_size,
            userspace_addr: self.userspace_addr,
        }
    }
}

impl From<SlotRequest> for UserspaceMemoryRegion {
    fn from(r: SlotRequest) -> Self {
        r.region()
    }
}

/// The errno a refused memslot request gives (KVM's `KVM_SET_USER_MEMORY_REGION` returns only
/// these three for a VM without guest_memfd). [`Display`](fmt::Display) gives KVM's name
/// (`EINVAL`, ...), as scenario observations print it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Errno {
    /// `EINVAL` (22): a malformed request or one the current slots do not allow.
    Einval,
    /// `EEXIST` (17): the new or moved slot overlaps another.
    Eexist,
    /// `ENOMEM` (12): slot metadata could not be allocated.
    Enomem,
}

impl Errno {
    /// KVM's name: `"EINVAL"`, `"EEXIST"` or `"ENOMEM"`.
    pub const fn name(self) -> &'static str {
        match self {
            Errno::Einval => "EINVAL",
            Errno::Eexist => "EEXIST",
            Errno::Enomem => "ENOMEM",
        }
    }

    /// The Linux x86 value.
    pub const fn value(self) -> i32 {
        match self {
            Errno::Einval => 22,
            Errno::Eexist => 17,
            Errno::Enomem => 12,
        }
    }

    /// The errno of a rule the core's memslot checks name ([`MemslotError::errno_value`]).
    pub const fn of(e: &MemslotError) -> Errno {
        match e.errno_value() {
            17 => Errno::Eexist,
            12 => Errno::Enomem,
            _ => Errno::Einval,
        }
    }
}

impl From<&MemslotError> for Errno {
    fn from(e: &MemslotError) -> Self {
        Errno::of(e)
    }
}

impl From<MemslotError> for Errno {
    fn from(e: MemslotError) -> Self {
        Errno::of(&e)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a guest access does to memory, as the hardware walk checks it: the scenario format's
/// access kind, so the machine, its TLB and the scenario backends pass one type. (No `Fetch`: the
/// machine's TLB caches no execute permission and no workload fetches instructions.)
pub use vmmu_scenario::AccessKind;

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
    /// The fault was handled (KVM: `RET_PF_FIXED`, or a spurious fault): the vCPU re-enters and
    /// walks again, as after [`Translation::Retry`], but nothing was retried, so the vCPU's
    /// retry count leaves it out (under TDP it counted every fixed fault, under shadow paging
    /// only retries).
    Fixed,
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

/// A vCPU's [`MmuExits`] as its thread last published them (after each batch of accesses), for
/// a sampler on another thread. Relaxed: a sampler wants recent counts, not a consistent cut.
/// On a cache line of its own, so vCPUs publishing side by side do not share one.
#[repr(align(128))]
#[derive(Debug, Default)]
pub struct LiveExits([AtomicU64; 5]);

impl LiveExits {
    /// Publishes `e` (the vCPU's counts so far).
    pub fn store(&self, e: &MmuExits) {
        let v = [e.violation, e.misconfig, e.mmio_spte_hit, e.mmio_cache_hit, e.mmio_slow_path];
        for (a, v) in self.0.iter().zip(v) {
            a.store(v, Ordering::Relaxed);
        }
    }

    /// The counts last published.
    pub fn load(&self) -> MmuExits {
        let l = |i: usize| self.0[i].load(Ordering::Relaxed);
        MmuExits {
            violation: l(0),
            misconfig: l(1),
            mmio_spte_hit: l(2),
            mmio_cache_hit: l(3),
            mmio_slow_path: l(4),
        }
    }

    /// Adds the counts last published to `e` (a sum over vCPUs).
    pub fn add_to(&self, e: &mut MmuExits) {
        let l = self.load();
        e.violation += l.violation;
        e.misconfig += l.misconfig;
        e.mmio_spte_hit += l.mmio_spte_hit;
        e.mmio_cache_hit += l.mmio_cache_hit;
        e.mmio_slow_path += l.mmio_slow_path;
    }
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

/// The real MMU's counters beyond [`MmuStats`]' common ones (the core's `VcpuStats` and
/// `VmStats` names, and the time the machine spent resolving MMIO). The report prints them as
/// `mmu.extra` (JSON keys = field names; fields in alphabetical order, as the report has always
/// listed them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MmuCounters {
    /// RSVD faults the MMIO fast path decided: per-vCPU MMIO cache hits plus MMIO SPTE hits.
    /// KVM counts these nowhere (facts §7); its `pf_fast` counts `fast_page_fault`, which this
    /// MMU does not have.
    pub mmio_fast_hits: u64,
    /// Timed `translate` calls that ended as MMIO but were left out as outliers (longer than
    /// [`crate::mmio_timing::OUTLIER_NS`]: the thread was descheduled).
    pub mmio_timed_outliers: u64,
    /// Nanoseconds spent in the timed `translate` calls that ended as MMIO, retries included
    /// (one call in [`crate::mmio_timing::TIME_ONE_IN`] is timed).
    pub mmio_translate_ns: u64,
    /// `translate` calls that ended as MMIO.
    pub mmio_translations: u64,
    /// How many of them were timed (outliers not included).
    pub mmio_translations_timed: u64,
    /// Shadow pages recycled because the VM was over its page limit (KVM `mmu_recycled`; 0
    /// under TDP).
    pub mmu_recycled: u64,
    /// Shadow pages zapped (KVM `mmu_shadow_zapped`; 0 under TDP, as in KVM).
    pub mmu_shadow_zapped: u64,
    /// 1 GiB leaves present (KVM `pages_1g`).
    pub pages_1g: u64,
    /// 2 MiB leaves present (KVM `pages_2m`).
    pub pages_2m: u64,
    /// 4 KiB leaves present (KVM `pages_4k`).
    pub pages_4k: u64,
    /// KVM `pf_emulate`.
    pub pf_emulate: u64,
    /// KVM `pf_fixed`.
    pub pf_fixed: u64,
    /// KVM `pf_spurious`.
    pub pf_spurious: u64,
    /// KVM `pf_taken`.
    pub pf_taken: u64,
    /// Writes to read-only slots emulated.
    pub readonly_write_emulations: u64,
    /// Remote TLB flushes performed (KVM `remote_tlb_flush`).
    pub remote_tlb_flush: u64,
    /// Retries: a frozen entry under the lockless walk.
    pub retry_frozen: u64,
    /// Retries: a host invalidation in flight.
    pub retry_host_invalidation: u64,
    /// Retries: the slot is being deleted or moved.
    pub retry_invalid_slot: u64,
    /// Retries: no root loaded.
    pub retry_no_root: u64,
    /// Retries: the root was obsoleted.
    pub retry_obsolete_root: u64,
    /// Retries: a pageless root with a reload pending.
    pub retry_pageless_root_reload_pending: u64,
    /// Retries: another thread changed the entry first.
    pub retry_race: u64,
    /// Retries: the entry was zapped under the lockless walk.
    pub retry_zapped_under_walk: u64,
    /// Roots loaded.
    pub root_loads: u64,
    /// Faults and root loads the shadow MMU refused at its page limit, every page pinned by a
    /// root (KVM `-ENOSPC`; not a KVM stat; 0 under TDP).
    pub shadow_page_limit_failures: u64,
    /// MMIO SPTEs with a stale generation.
    pub stale_gen_misses: u64,
    /// Page-table pages allocated.
    pub tables_allocated: u64,
    /// Page-table pages freed.
    pub tables_freed: u64,
    /// Page-table frames the host handed out beyond the VM's phys_bits, refused (non-zero: the
    /// host's allocator does not fit the VM).
    pub tables_refused: u64,
    /// TDP table pages zaps unlinked (not a KVM stat).
    pub tdp_tables_zapped: u64,
    /// TLB flushes the vCPUs performed (KVM `tlb_flush`).
    pub vcpu_tlb_flushes: u64,
}

impl MmuCounters {
    /// Every counter with its name (the JSON key), in field order.
    pub fn named(&self) -> [(&'static str, u64); 32] {
        [
            ("mmio_fast_hits", self.mmio_fast_hits),
            ("mmio_timed_outliers", self.mmio_timed_outliers),
            ("mmio_translate_ns", self.mmio_translate_ns),
            ("mmio_translations", self.mmio_translations),
            ("mmio_translations_timed", self.mmio_translations_timed),
            ("mmu_recycled", self.mmu_recycled),
            ("mmu_shadow_zapped", self.mmu_shadow_zapped),
            ("pages_1g", self.pages_1g),
            ("pages_2m", self.pages_2m),
            ("pages_4k", self.pages_4k),
            ("pf_emulate", self.pf_emulate),
            ("pf_fixed", self.pf_fixed),
            ("pf_spurious", self.pf_spurious),
            ("pf_taken", self.pf_taken),
            ("readonly_write_emulations", self.readonly_write_emulations),
            ("remote_tlb_flush", self.remote_tlb_flush),
            ("retry_frozen", self.retry_frozen),
            ("retry_host_invalidation", self.retry_host_invalidation),
            ("retry_invalid_slot", self.retry_invalid_slot),
            ("retry_no_root", self.retry_no_root),
            ("retry_obsolete_root", self.retry_obsolete_root),
            ("retry_pageless_root_reload_pending", self.retry_pageless_root_reload_pending),
            ("retry_race", self.retry_race),
            ("retry_zapped_under_walk", self.retry_zapped_under_walk),
            ("root_loads", self.root_loads),
            ("shadow_page_limit_failures", self.shadow_page_limit_failures),
            ("stale_gen_misses", self.stale_gen_misses),
            ("tables_allocated", self.tables_allocated),
            ("tables_freed", self.tables_freed),
            ("tables_refused", self.tables_refused),
            ("tdp_tables_zapped", self.tdp_tables_zapped),
            ("vcpu_tlb_flushes", self.vcpu_tlb_flushes),
        ]
    }

    /// The average MMIO resolution time in nanoseconds (0 with no MMIO).
    pub fn mmio_ns_per_translation(&self) -> f64 {
        if self.mmio_translations_timed == 0 {
            0.0
        } else {
            self.mmio_translate_ns as f64 / self.mmio_translations_timed as f64
        }
    }
}

/// The MMU's counters for the report, filled by the MMU (the machine never interprets them
/// beyond copying). The real MMU's own counters are in `counters`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MmuStats {
    /// Exits by kind.
    pub exits: MmuExits,
    /// MMIO SPTEs installed.
    pub mmio_sptes_created: u64,
    /// TDP range zaps (a memslot delete or move, a host invalidation): calls, not SPTEs; the
    /// shadow MMU zaps through its reverse map and counts in `mmu_shadow_zapped` instead.
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
    /// The real MMU's counters; `None` for an MMU that has none (the reference MMUs).
    pub counters: Option<MmuCounters>,
}

/// The MMU as the machine drives it. See the module doc for the call order and the flush
/// contract.
pub trait GuestMmu: Send + Sync {
    /// Per-vCPU MMU state, owned by the vCPU's thread.
    type Vcpu: Send;

    /// The state of vCPU `index` (0-based); called once per vCPU before the run.
    fn create_vcpu(&self, index: usize) -> Self::Vcpu;

    /// `KVM_SET_USER_MEMORY_REGION`. The error names the KVM rule the request broke; its errno
    /// is [`Errno::of`] it (`EINVAL`, `EEXIST`, ...).
    fn set_memory_region(&self, request: &SlotRequest) -> Result<(), MemslotError>;

    /// Resolves a TLB miss of `vcpu` at `gpa` for a read or a write.
    fn translate(&self, vcpu: &mut Self::Vcpu, gpa: Gpa, access: AccessKind) -> Translation;

    /// The vCPU enters guest mode (KVM: `vcpu->mode = IN_GUEST_MODE` followed by a full barrier,
    /// then the request check happens at the next `poll_tlb_flush`).
    fn enter_guest(&self, _vcpu: &mut Self::Vcpu) {}

    /// Counts one access resolved as MMIO outside [`GuestMmu::translate`] (through the shadow
    /// MMU's GVA entry points), with its resolution time in nanoseconds if it was timed.
    fn record_mmio_time(&self, _vcpu: &mut Self::Vcpu, _nanos: Option<u64>) {}

    /// The core vCPU of a shadow-paging MMU (its guest-virtual entry points), or `None` if this
    /// MMU does not shadow guest page tables.
    fn shadow_vcpu<'v>(
        &self,
        _vcpu: &'v mut Self::Vcpu,
    ) -> Option<&'v mut vmmu::vcpu::Vcpu<crate::host::SimHost>> {
        None
    }

    /// The vCPU leaves guest mode (KVM: `vcpu->mode = OUTSIDE_GUEST_MODE`).
    fn exit_guest(&self, _vcpu: &mut Self::Vcpu) {}

    /// Between accesses: handles pending requests; `true` tells the vCPU to flush its TLB before
    /// its next access. Returning is the acknowledgement the flush protocol waits for.
    fn poll_tlb_flush(&self, _vcpu: &mut Self::Vcpu) -> bool {
        false
    }

    /// A host invalidation (KVM `mmu_notifier invalidate_range_start`, then `_end`) of host
    /// addresses `[start, end)` around `during`, the host's change; see the module doc for the
    /// contract. Returns `false` if this MMU does not take host invalidations (the default):
    /// then `during` is not run, and the machine makes none.
    fn invalidate_hva_range(&self, _start: Hva, _end: Hva, _during: &mut dyn FnMut()) -> bool {
        false
    }

    /// Dirty logging: auto, manual protect, or manual protect with "initially set"
    /// (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`). Returns `false` if this MMU has no dirty logging
    /// (the default); the machine then collects nothing.
    fn set_dirty_log_mode(&self, _mode: vmmu::dirty::DirtyLogMode) -> bool {
        false
    }

    /// `KVM_GET_DIRTY_LOG` of `slot` (`(as << 16) | id`): the bitmap (bit `i` = page `i` of the
    /// slot) or the errno name; `None` without dirty logging. Contract: a page the guest wrote
    /// after the previous collection of the slot returned is in the next one (see
    /// `crate::migration`).
    fn get_dirty_log(&self, _slot: u32) -> Option<Result<Vec<u64>, String>> {
        None
    }

    /// `KVM_CLEAR_DIRTY_LOG` of the bits of `bitmap` over pages `[first, first + count)`; `None`
    /// clears every page of the range (no bitmap is built, however large `count`).
    fn clear_dirty_log(
        &self,
        _slot: u32,
        _first: u64,
        _count: u32,
        _bitmap: Option<&[u64]>,
    ) -> Option<Result<(), String>> {
        None
    }

    /// The current memslot generation of address space 0 (raw: KVM's update-in-progress flag,
    /// bit 63, included); 0 if the MMU has none.
    fn generation(&self) -> u64 {
        self.stats().generation
    }

    /// A snapshot of the MMU's counters.
    fn stats(&self) -> MmuStats {
        MmuStats::default()
    }

    /// Which MMU this is: two-dimensional (the default) or shadow paging. The run report names
    /// it, since a shadow MMU's SPTE format is NPT-like and the format alone would not tell.
    fn mmu_kind(&self) -> vmmu::vm::MmuKind {
        vmmu::vm::MmuKind::Tdp
    }

    /// A shadow MMU's page limit (KVM `n_max_mmu_pages`) and whether it was set rather than
    /// KVM's default; `None` for any other MMU.
    fn shadow_pages(&self) -> Option<crate::report::ShadowPagesReport> {
        None
    }

    /// Whether MMIO caching is in effect and why.
    fn mmio_caching(&self) -> MmioCachingState {
        MmioCachingState { effective: false, reason: "this MMU does not cache MMIO".into() }
    }

    /// `vcpu`'s own exit counts so far (for per-interval samples while it runs; [`Self::stats`]
    /// may count a vCPU only once it is gone). All zero for an MMU without per-vCPU counters.
    fn vcpu_exits(&self, _vcpu: &Self::Vcpu) -> MmuExits {
        MmuExits::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmmu::stats::RetryCause;

    #[test]
    fn counters_keep_the_report_keys() {
        let named = MmuCounters::default().named();
        let names: Vec<&str> = named.iter().map(|(k, _)| *k).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted, "alphabetical, as the report listed them by name");
        for c in RetryCause::ALL {
            let key = format!("retry_{}", c.name());
            assert!(names.contains(&key.as_str()), "{key} missing");
        }
        let json = serde_json::to_value(MmuCounters::default()).expect("json");
        let keys: Vec<&str> =
            json.as_object().expect("object").keys().map(String::as_str).collect();
        assert_eq!(keys.len(), names.len());
        assert!(names.iter().all(|n| keys.contains(n)), "the JSON keys are the names");
    }

    #[test]
    fn errno_of_memslot_errors() {
        let overlap = MemslotError::Overlap { as_id: 0, id: 1, other: 2, start: 0, end: 1 };
        assert_eq!(Errno::of(&overlap), Errno::Eexist);
        assert_eq!(Errno::of(&MemslotError::OutOfMemory { bytes: 8 }).to_string(), "ENOMEM");
        let e = MemslotError::DeleteMissingSlot { as_id: 0, id: 3 };
        assert_eq!((Errno::from(e).name(), Errno::from(e).value()), ("EINVAL", 22));
        assert_eq!(Errno::of(&e).name(), e.errno());
    }
}
