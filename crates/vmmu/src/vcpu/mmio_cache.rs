//! The per-vCPU MMIO info cache (KVM: `vcpu->arch.mmio_gva/mmio_access/mmio_gfn/mmio_gen`,
//! facts §3.7): the last address the vCPU found to be emulated MMIO, so the next access to it
//! needs no table walk at all.
//!
//! Invariants:
//! - an entry is tagged with the full 64-bit memslot generation it was made under, and only ever
//!   hits while the generation is exactly that value (so any memslot update, and any moment of an
//!   update in progress, misses);
//! - it is never filled while an update is in progress (bit 63 set): 2019 fix ddfd1730fd82;
//! - gva 0 and gfn 0 mean "invalid", so they never hit (as in KVM);
//! - [`MmioInfoCache::clear_gva`] clears only the gva part (KVM `vcpu_clear_mmio_info`): the gfn
//!   part is guarded by the generation, the gva part by guest page-table changes.
//!
//! Owned by its vCPU thread (`&mut`); no atomics. The generation it compares against is read by
//! the caller inside a memslot read section.

use crate::bugs::{Bug, BugSet};
use crate::types::{Access, Generation, Gfn};

/// The cached MMIO info of one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioInfoCache {
    gva: u64,
    gfn: u64,
    access: Access,
    gen: u64,
}

impl MmioInfoCache {
    /// An empty cache.
    pub const fn new() -> Self {
        MmioInfoCache { gva: 0, gfn: 0, access: Access::NONE, gen: 0 }
    }

    /// Records that `gfn` (reached through `gva`, 0 under TDP) is MMIO with `access`, under
    /// generation `gen` (KVM `vcpu_cache_mmio_info`). Does nothing while an update is in progress.
    /// Returns whether it cached.
    #[inline]
    pub fn fill(
        &mut self,
        gva: u64,
        gfn: Gfn,
        access: Access,
        gen: Generation,
        bugs: BugSet,
    ) -> bool {
        if gen.in_progress() && !bugs.has(Bug::CacheWhileInProgress) {
            return false;
        }
        self.gva = gva & !crate::types::PAGE_OFFSET_MASK;
        self.gfn = gfn.raw();
        self.access = access;
        self.gen = gen.raw();
        true
    }

    /// Whether the cache holds `gfn` for generation `gen` (KVM `vcpu_match_mmio_gpa`).
    #[inline]
    pub fn match_gpa(&self, gfn: Gfn, gen: Generation, bugs: BugSet) -> bool {
        let gen_ok = self.gen == gen.raw() || bugs.has(Bug::VcpuCacheWithoutGen);
        gen_ok && self.gfn != 0 && self.gfn == gfn.raw()
    }

    /// Whether the cache holds the page of `gva` for generation `gen` (KVM
    /// `vcpu_match_mmio_gva`); used by shadow paging, where faults carry guest-virtual addresses.
    #[inline]
    pub fn match_gva(&self, gva: u64, gen: Generation, bugs: BugSet) -> bool {
        let gen_ok = self.gen == gen.raw() || bugs.has(Bug::VcpuCacheWithoutGen);
        gen_ok && self.gva != 0 && self.gva == gva & !crate::types::PAGE_OFFSET_MASK
    }

    /// The cached gfn and access, if any gfn is cached.
    pub fn entry(&self) -> Option<(Gfn, Access)> {
        (self.gfn != 0).then_some((Gfn(self.gfn), self.access))
    }

    /// The generation the cached entry was made under, if any gfn is cached (for models: the
    /// 2019 fix ddfd1730fd82 means it is never an in-progress generation).
    pub fn generation(&self) -> Option<Generation> {
        (self.gfn != 0).then_some(Generation::from_raw(self.gen))
    }

    /// Clears the gva part (KVM `vcpu_clear_mmio_info(vcpu, MMIO_GVA_ANY)`).
    #[inline]
    pub fn clear_gva(&mut self) {
        self.gva = 0;
    }

    /// Clears everything (used when the vCPU's root changes: Bonzini 2026 "unconditionally clear
    /// MMIO cache on root rebuild", which issue 4 asks for).
    #[inline]
    pub fn clear(&mut self) {
        *self = MmioInfoCache::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Generation = Generation::from_raw(40);

    #[test]
    fn hit_needs_exact_generation_and_gfn() {
        let mut c = MmioInfoCache::new();
        assert!(c.fill(0, Gfn(0x100), Access::WRITE, G, BugSet::NONE));
        assert!(c.match_gpa(Gfn(0x100), G, BugSet::NONE));
        assert!(!c.match_gpa(Gfn(0x101), G, BugSet::NONE));
        assert!(!c.match_gpa(Gfn(0x100), Generation::from_raw(42), BugSet::NONE));
        assert!(!c.match_gpa(Gfn(0x100), G.mark_in_progress(), BugSet::NONE));
    }

    #[test]
    fn never_filled_while_update_in_progress() {
        let mut c = MmioInfoCache::new();
        assert!(!c.fill(0, Gfn(0x100), Access::NONE, G.mark_in_progress(), BugSet::NONE));
        assert_eq!(c, MmioInfoCache::new());
        // Even if the generation later equals the low bits, nothing hits.
        assert!(!c.match_gpa(Gfn(0x100), G, BugSet::NONE));
    }

    #[test]
    fn gfn_zero_and_gva_zero_never_hit() {
        let mut c = MmioInfoCache::new();
        c.fill(0, Gfn(0), Access::NONE, G, BugSet::NONE);
        assert!(!c.match_gpa(Gfn(0), G, BugSet::NONE));
        assert!(!c.match_gva(0, G, BugSet::NONE));
    }

    #[test]
    fn gva_match_is_per_page_and_clear_gva_keeps_gfn() {
        let mut c = MmioInfoCache::new();
        c.fill(0x7000_1234, Gfn(0x55), Access::USER, G, BugSet::NONE);
        assert!(c.match_gva(0x7000_1ff8, G, BugSet::NONE));
        assert!(!c.match_gva(0x7000_2000, G, BugSet::NONE));
        c.clear_gva();
        assert!(!c.match_gva(0x7000_1ff8, G, BugSet::NONE));
        assert!(c.match_gpa(Gfn(0x55), G, BugSet::NONE));
        c.clear();
        assert!(!c.match_gpa(Gfn(0x55), G, BugSet::NONE));
    }

    #[cfg(feature = "historical-bugs")]
    #[test]
    fn injected_bugs_change_the_answers() {
        let mut c = MmioInfoCache::new();
        let b = BugSet::only(Bug::CacheWhileInProgress);
        assert!(c.fill(0, Gfn(0x100), Access::NONE, G.mark_in_progress(), b));
        let b = BugSet::only(Bug::VcpuCacheWithoutGen);
        c.fill(0, Gfn(0x100), Access::NONE, G, b);
        assert!(c.match_gpa(Gfn(0x100), Generation::from_raw(99), b));
    }
}
