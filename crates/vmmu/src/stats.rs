//! Counters, with KVM's names where KVM has them (facts §7), plus the ones KVM lacks: MMIO SPTE
//! hits, per-vCPU cache hits, stale-generation misses, generation wraps, `zap_all_fast` calls and
//! retries by cause.
//!
//! [`VcpuStats`] is owned by its vCPU thread (plain integers, no atomics on the fault path);
//! [`VmStats`] is shared and uses relaxed atomic counters: they order nothing.

use crate::sync::{AtomicU64, Ordering};

/// Why a fault returned Retry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(usize)]
pub enum RetryCause {
    /// The vCPU has no root loaded (it loads one before re-entering).
    NoRoot = 0,
    /// The root was obsoleted by `zap_all_fast` (facts §4, `is_page_fault_stale` (a)).
    ObsoleteRoot = 1,
    /// A root without a page while a free-obsolete-roots request is pending (§4 (b)).
    PagelessRootReloadPending = 2,
    /// The memslot is being deleted or moved (KVM_MEMSLOT_INVALID, e0c378684b65).
    InvalidSlot = 3,
    /// A host invalidation is in flight for the gfn, or happened since the fault began (§4 (c)).
    HostInvalidation = 4,
    /// Another thread changed the entry first (the compare-and-swap failed), or, under shadow
    /// paging, kept changing the guest's gPTEs under the walk's accessed/dirty update.
    Race = 5,
    /// The lockless walk found a non-MMIO, non-present entry: zapped under the walk (2011 rule).
    ZappedUnderWalk = 6,
    /// The lockless walk found a frozen entry.
    Frozen = 7,
}

impl RetryCause {
    /// Number of causes.
    pub const COUNT: usize = 8;
    /// Every cause, in index order.
    pub const ALL: [RetryCause; Self::COUNT] = [
        RetryCause::NoRoot,
        RetryCause::ObsoleteRoot,
        RetryCause::PagelessRootReloadPending,
        RetryCause::InvalidSlot,
        RetryCause::HostInvalidation,
        RetryCause::Race,
        RetryCause::ZappedUnderWalk,
        RetryCause::Frozen,
    ];
    /// A stable snake_case name.
    pub const fn name(self) -> &'static str {
        match self {
            RetryCause::NoRoot => "no_root",
            RetryCause::ObsoleteRoot => "obsolete_root",
            RetryCause::PagelessRootReloadPending => "pageless_root_reload_pending",
            RetryCause::InvalidSlot => "invalid_slot",
            RetryCause::HostInvalidation => "host_invalidation",
            RetryCause::Race => "race",
            RetryCause::ZappedUnderWalk => "zapped_under_walk",
            RetryCause::Frozen => "frozen",
        }
    }
}

/// Per-vCPU counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuStats {
    /// Faults that reached the page-fault handler proper (KVM `pf_taken`; MMIO SPTE and cache
    /// hits are not counted here, as in KVM).
    pub pf_taken: u64,
    /// Faults fixed by installing an entry (`pf_fixed`).
    pub pf_fixed: u64,
    /// Faults that ended in emulation from the slow path (`pf_emulate`): MMIO and writes to
    /// read-only memslots. Not a write to a write-protected guest table
    /// ([`Self::write_protected_emulations`]): KVM since v6.12 returns RET_PF_WRITE_PROTECTED
    /// for it, which it does not count here.
    pub pf_emulate: u64,
    /// Faults already fixed by someone else (`pf_spurious`).
    pub pf_spurious: u64,
    /// MMIO SPTEs installed (`pf_mmio_spte_created`).
    pub pf_mmio_spte_created: u64,
    /// TLB flushes this vCPU performed (`tlb_flush`).
    pub tlb_flush: u64,
    /// EPT-violation (or not-present #NPF) exits handled.
    pub violation_exits: u64,
    /// EPT-misconfig (or RSVD #NPF) exits handled.
    pub misconfig_exits: u64,
    /// Emulations from an MMIO SPTE hit in the fast path (KVM has no counter).
    pub mmio_spte_hits: u64,
    /// Emulations from a per-vCPU MMIO info cache hit (KVM has no counter).
    pub mmio_cache_hits: u64,
    /// MMIO SPTEs found with a stale generation, sent to the slow path (KVM has no counter).
    pub stale_gen_misses: u64,
    /// Writes to read-only slots, emulated without caching.
    pub readonly_write_emulations: u64,
    /// Faults of the slow path that ended in emulation because no slot covers the gfn (a
    /// no-slot fault that retries instead is not counted).
    pub slow_path_mmio: u64,
    /// Roots loaded (initial and after obsolescence).
    pub root_loads: u64,
    /// Retries, by cause (index: [`RetryCause`] as usize).
    pub retries: [u64; RetryCause::COUNT],
    /// Shadow paging: INVLPGs handled (KVM `invlpg`).
    pub invlpg: u64,
    /// Shadow paging: page faults given back to the guest (KVM `pf_guest`).
    pub pf_guest: u64,
    /// Shadow paging: writes to write-protected guest page tables sent to emulation.
    pub write_protected_emulations: u64,
}

impl VcpuStats {
    /// RSVD faults resolved by the MMIO fast path: per-vCPU MMIO cache hits plus MMIO SPTE hits.
    /// Derived, not counted, so the fast path updates one counter less. Not KVM's `pf_fast`,
    /// which counts `fast_page_fault` (lockless fixes of write-protected or access-tracked
    /// SPTEs, not modelled); KVM counts MMIO hits nowhere (facts §7).
    pub fn mmio_fast_hits(&self) -> u64 {
        self.mmio_cache_hits + self.mmio_spte_hits
    }

    /// Total retries.
    pub fn retries_total(&self) -> u64 {
        self.retries.iter().sum()
    }
    /// Adds `other` into `self` (for VM-wide totals).
    pub fn accumulate(&mut self, o: &VcpuStats) {
        self.pf_taken += o.pf_taken;
        self.pf_fixed += o.pf_fixed;
        self.pf_emulate += o.pf_emulate;
        self.pf_spurious += o.pf_spurious;
        self.pf_mmio_spte_created += o.pf_mmio_spte_created;
        self.tlb_flush += o.tlb_flush;
        self.violation_exits += o.violation_exits;
        self.misconfig_exits += o.misconfig_exits;
        self.mmio_spte_hits += o.mmio_spte_hits;
        self.mmio_cache_hits += o.mmio_cache_hits;
        self.stale_gen_misses += o.stale_gen_misses;
        self.readonly_write_emulations += o.readonly_write_emulations;
        self.slow_path_mmio += o.slow_path_mmio;
        self.root_loads += o.root_loads;
        self.invlpg += o.invlpg;
        self.pf_guest += o.pf_guest;
        self.write_protected_emulations += o.write_protected_emulations;
        for (a, b) in self.retries.iter_mut().zip(o.retries.iter()) {
            *a += b;
        }
    }
}

/// A relaxed counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Subtracts `n`.
    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }
    /// The current value.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Stripes of a [`StripedCounter`] (a power of two).
pub const STRIPES: usize = 8;
const _: () = assert!(STRIPES.is_power_of_two());

/// One stripe, on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Stripe(AtomicU64);

/// A counter that many vCPUs change at once on their fault paths (present leaves): kept in
/// cache-line stripes, so that vCPUs faulting at the same time do not bounce one line between
/// their CPUs. A fault counts in its vCPU's own stripe ([`StripeKey::Vcpu`]: one per vCPU up to
/// [`STRIPES`] vCPUs); other changes (zaps, under the exclusive MMU lock) in a stripe chosen by a
/// hash of the gfn's 2 MiB region. Stripes wrap; their sum is the value.
#[derive(Debug, Default)]
pub struct StripedCounter([Stripe; STRIPES]);

/// Which stripe of a [`StripedCounter`] a change goes to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum StripeKey {
    /// A vCPU's fault: the vCPU's own stripe (index modulo [`STRIPES`]).
    Vcpu(usize),
    /// Anything else: the stripe of the gfn's 2 MiB region (Fibonacci hashing of the region,
    /// so that runs of regions spread over all stripes).
    Gfn(u64),
}

impl StripedCounter {
    #[inline]
    fn stripe(&self, key: StripeKey) -> &AtomicU64 {
        let i = match key {
            StripeKey::Vcpu(index) => index % STRIPES,
            StripeKey::Gfn(gfn) => crate::hash::bucket(gfn >> 9, STRIPES),
        };
        &self.0[i].0
    }
    /// Adds `n` in the stripe `key` selects.
    #[inline]
    pub fn add_at(&self, key: StripeKey, n: u64) {
        self.stripe(key).fetch_add(n, Ordering::Relaxed);
    }
    /// Subtracts `n` in the stripe `key` selects.
    #[inline]
    pub fn sub_at(&self, key: StripeKey, n: u64) {
        self.stripe(key).fetch_sub(n, Ordering::Relaxed);
    }
    /// The current value: the sum of the stripes.
    pub fn get(&self) -> u64 {
        self.0.iter().fold(0u64, |acc, s| acc.wrapping_add(s.0.load(Ordering::Relaxed)))
    }
}

/// VM-wide counters.
#[derive(Debug, Default)]
pub struct VmStats {
    /// Remote TLB flushes that had to kick a vCPU in guest mode (`remote_tlb_flush`: KVM counts
    /// one when `kvm_make_all_cpus_request` sent an IPI).
    pub remote_tlb_flush: Counter,
    /// Remote TLB flushes asked for (`remote_tlb_flush_requests`: one per
    /// `kvm_flush_remote_tlbs`, whoever was running).
    pub remote_tlb_flush_requests: Counter,
    /// Shadow pages zapped (`mmu_shadow_zapped`; the shadow MMU's pages only, as KVM's TDP MMU
    /// counts none of its tables here).
    pub mmu_shadow_zapped: Counter,
    /// TDP MMU table pages zaps unlinked, and the tables below retired roots, counted when the
    /// reclaimer frees them with their root (not a KVM stat: KVM's TDP MMU only traces them).
    pub tdp_tables_zapped: Counter,
    /// Present 4 KiB leaves (`pages_4k`).
    pub pages_4k: StripedCounter,
    /// Present 2 MiB leaves (`pages_2m`).
    pub pages_2m: StripedCounter,
    /// Present 1 GiB leaves (`pages_1g`).
    pub pages_1g: StripedCounter,
    /// `zap_all_fast` calls (KVM has a tracepoint only).
    pub zap_all_fast: Counter,
    /// Range zaps (memslot delete/move, host invalidation).
    pub zap_range: Counter,
    /// MMIO-generation wraps seen by the `memslots_updated` hook.
    pub mmio_gen_wraps: Counter,
    /// Table pages allocated.
    pub tables_allocated: Counter,
    /// Table pages freed after a grace period.
    pub tables_freed: Counter,
    /// Table frames the host handed out that the VM's SPTEs cannot name (beyond its
    /// `phys_bits`, or at or above 4 GiB for a PAE root), given back unused: each failed its
    /// allocation as out-of-memory. Non-zero means the host's allocator and the VM's
    /// `phys_bits` do not match.
    pub tables_refused: Counter,
    /// Pages a dirty-log collection took and write-protected again (KVM counts them down in
    /// `dirty_pages`).
    pub dirty_log_protected: Counter,
}

/// A plain copy of [`VmStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmStatsSnapshot {
    /// See [`VmStats::remote_tlb_flush`].
    pub remote_tlb_flush: u64,
    /// See [`VmStats::remote_tlb_flush_requests`].
    pub remote_tlb_flush_requests: u64,
    /// See [`VmStats::mmu_shadow_zapped`].
    pub mmu_shadow_zapped: u64,
    /// See [`VmStats::tdp_tables_zapped`].
    pub tdp_tables_zapped: u64,
    /// See [`VmStats::pages_4k`].
    pub pages_4k: u64,
    /// See [`VmStats::pages_2m`].
    pub pages_2m: u64,
    /// See [`VmStats::pages_1g`].
    pub pages_1g: u64,
    /// See [`VmStats::zap_all_fast`].
    pub zap_all_fast: u64,
    /// See [`VmStats::zap_range`].
    pub zap_range: u64,
    /// See [`VmStats::mmio_gen_wraps`].
    pub mmio_gen_wraps: u64,
    /// See [`VmStats::tables_allocated`].
    pub tables_allocated: u64,
    /// See [`VmStats::tables_freed`].
    pub tables_freed: u64,
    /// See [`VmStats::tables_refused`].
    pub tables_refused: u64,
    /// See [`VmStats::dirty_log_protected`].
    pub dirty_log_protected: u64,
}

impl VmStats {
    /// A snapshot of every counter.
    pub fn snapshot(&self) -> VmStatsSnapshot {
        VmStatsSnapshot {
            remote_tlb_flush: self.remote_tlb_flush.get(),
            remote_tlb_flush_requests: self.remote_tlb_flush_requests.get(),
            mmu_shadow_zapped: self.mmu_shadow_zapped.get(),
            tdp_tables_zapped: self.tdp_tables_zapped.get(),
            pages_4k: self.pages_4k.get(),
            pages_2m: self.pages_2m.get(),
            pages_1g: self.pages_1g.get(),
            zap_all_fast: self.zap_all_fast.get(),
            zap_range: self.zap_range.get(),
            mmio_gen_wraps: self.mmio_gen_wraps.get(),
            tables_allocated: self.tables_allocated.get(),
            tables_freed: self.tables_freed.get(),
            tables_refused: self.tables_refused.get(),
            dirty_log_protected: self.dirty_log_protected.get(),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn stripe_of(c: &StripedCounter, gfn: u64) -> usize {
        let p = c.stripe(StripeKey::Gfn(gfn)) as *const AtomicU64;
        c.0.iter().position(|s| core::ptr::eq(&s.0, p)).expect("a stripe")
    }

    /// Two vCPUs faulting through ranges 128 regions (256 MiB) apart, one 2 MiB region per fault
    /// in step: with the region's low bits as the stripe they would share a line on every fault.
    #[test]
    fn faults_in_step_on_ranges_far_apart_use_different_stripes_mostly() {
        let c = StripedCounter::default();
        let (a, b) = (0x10_0000u64, 0x10_0000u64 + (128 << 9));
        let same = (0..1024u64)
            .filter(|i| stripe_of(&c, a + (i << 9)) == stripe_of(&c, b + (i << 9)))
            .count();
        assert!(same < 1024 / 4, "{same} of 1024 faults on one stripe");
        // Every stripe is used, and the sum is the value.
        let used: std::collections::BTreeSet<usize> =
            (0..64u64).map(|i| stripe_of(&c, i << 9)).collect();
        assert_eq!(used.len(), STRIPES);
        for i in 0..64u64 {
            c.add_at(StripeKey::Gfn(i << 9), 2);
        }
        c.sub_at(StripeKey::Gfn(5 << 9), 1);
        assert_eq!(c.get(), 127);
        // Each of the first STRIPES vCPUs has a stripe of its own.
        let own: std::collections::BTreeSet<*const AtomicU64> =
            (0..STRIPES).map(|i| c.stripe(StripeKey::Vcpu(i)) as *const AtomicU64).collect();
        assert_eq!(own.len(), STRIPES);
        c.add_at(StripeKey::Vcpu(3), 5);
        c.sub_at(StripeKey::Gfn(3 << 9), 5);
        assert_eq!(c.get(), 127);
    }
}
