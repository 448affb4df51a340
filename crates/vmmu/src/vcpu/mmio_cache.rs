//! The per-vCPU MMIO info cache (KVM: `vcpu->arch.mmio_gva/mmio_access/mmio_gfn/mmio_gen`,
//! facts §3.7): the last addresses the vCPU found to be emulated MMIO, so the next access to one
//! of them needs no table walk at all.
//!
//! KVM keeps one entry; this keeps [`ENTRIES`] (a guest that drives two devices in turn, or a
//! device and its doorbell, would miss a single entry on every access and pay two table walks
//! per exit instead). Each entry behaves as KVM's one does.
//!
//! Invariants:
//! - an entry is tagged with the full 64-bit memslot generation it was made under, and only ever
//!   hits while the generation is exactly that value (so any memslot update, and any moment of an
//!   update in progress, misses);
//! - nothing is filled while an update is in progress (bit 63 set): 2019 fix ddfd1730fd82;
//! - gva 0 and gfn 0 mean "invalid", so they never hit (as in KVM);
//! - [`MmioInfoCache::clear_gva`] clears only the gva parts (KVM `vcpu_clear_mmio_info`): the gfn
//!   parts are guarded by the generation, the gva parts by guest page-table changes;
//! - a gfn is in at most one entry.
//!
//! Owned by its vCPU thread (`&mut`); no atomics. The generation it compares against is the
//! published memslot generation, read by the caller.

use crate::bugs::{Bug, BugSet};
use crate::types::{Access, Generation, Gfn};

/// Entries of the cache.
pub const ENTRIES: usize = 4;

/// One cached MMIO address (KVM's whole cache).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    gva: u64,
    gfn: u64,
    access: Access,
    gen: u64,
}

impl Entry {
    const EMPTY: Entry = Entry { gva: 0, gfn: 0, access: Access::NONE, gen: 0 };

    #[inline]
    fn gen_ok(&self, gen: Generation, bugs: BugSet) -> bool {
        self.gen == gen.raw() || bugs.has(Bug::VcpuCacheWithoutGen)
    }
}

/// The cached MMIO info of one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioInfoCache {
    entries: [Entry; ENTRIES],
    /// The entry filled last.
    last: u8,
}

impl MmioInfoCache {
    /// An empty cache.
    pub const fn new() -> Self {
        MmioInfoCache { entries: [Entry::EMPTY; ENTRIES], last: 0 }
    }

    /// Records that `gfn` (reached through `gva`, 0 under TDP) is MMIO with `access`, under
    /// generation `gen` (KVM `vcpu_cache_mmio_info`): in the entry that holds `gfn` already, else
    /// in the one after the last filled (round robin). Does nothing while an update is in
    /// progress. Returns whether it cached.
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
        // One entry per gfn, and per gva page: a GVA maps one GPA at a time, so a new fill for
        // the same page replaces the old one (KVM keeps a single entry).
        let page = gva & !crate::types::PAGE_OFFSET_MASK;
        let slot = match self
            .entries
            .iter()
            .position(|e| e.gfn == gfn.raw() || (page != 0 && e.gva == page))
        {
            Some(i) => i,
            None => (usize::from(self.last) + 1) % ENTRIES,
        };
        self.entries[slot] = Entry {
            gva: gva & !crate::types::PAGE_OFFSET_MASK,
            gfn: gfn.raw(),
            access,
            gen: gen.raw(),
        };
        self.last = slot as u8;
        true
    }

    /// The access rights cached for `gfn` if an entry holds it for generation `gen` (KVM
    /// `vcpu_match_mmio_gpa`).
    #[inline]
    pub fn lookup_gpa(&self, gfn: Gfn, gen: Generation, bugs: BugSet) -> Option<Access> {
        let g = gfn.raw();
        self.entries
            .iter()
            .find(|e| e.gfn == g && e.gfn != 0 && e.gen_ok(gen, bugs))
            .map(|e| e.access)
    }

    /// Whether an entry holds `gfn` for generation `gen` (KVM `vcpu_match_mmio_gpa`).
    #[inline]
    pub fn match_gpa(&self, gfn: Gfn, gen: Generation, bugs: BugSet) -> bool {
        self.lookup_gpa(gfn, gen, bugs).is_some()
    }

    /// Whether an entry holds the page of `gva` for generation `gen` (KVM
    /// `vcpu_match_mmio_gva`); used by shadow paging, where faults carry guest-virtual addresses.
    #[inline]
    pub fn match_gva(&self, gva: u64, gen: Generation, bugs: BugSet) -> bool {
        let page = gva & !crate::types::PAGE_OFFSET_MASK;
        self.entries.iter().any(|e| e.gva != 0 && e.gva == page && e.gen_ok(gen, bugs))
    }

    /// The gfn and access cached for the page of `gva` under generation `gen` (KVM
    /// `vcpu_match_mmio_gva` and the `mmio_gfn`/`mmio_access` it pairs with): shadow paging's
    /// hit needs no guest walk. The caller checks the access against the cached rights.
    #[inline]
    pub fn lookup_gva(&self, gva: u64, gen: Generation, bugs: BugSet) -> Option<(Gfn, Access)> {
        let page = gva & !crate::types::PAGE_OFFSET_MASK;
        self.entries
            .iter()
            .find(|e| e.gva != 0 && e.gva == page && e.gfn != 0 && e.gen_ok(gen, bugs))
            .map(|e| (Gfn(e.gfn), e.access))
    }

    /// Clears the gva part of the entry for the page of `gva`, if any (KVM
    /// `vcpu_clear_mmio_info(vcpu, gva)` on INVLPG).
    #[inline]
    pub fn clear_gva_page(&mut self, gva: u64) {
        let page = gva & !crate::types::PAGE_OFFSET_MASK;
        for e in self.entries.iter_mut().filter(|e| e.gva == page) {
            e.gva = 0;
        }
    }

    /// The gfn and access filled last, if any.
    pub fn entry(&self) -> Option<(Gfn, Access)> {
        let e = &self.entries[usize::from(self.last)];
        (e.gfn != 0).then_some((Gfn(e.gfn), e.access))
    }

    /// The generation the entry filled last was made under, if any (for models: the 2019 fix
    /// ddfd1730fd82 means it is never an in-progress generation).
    pub fn generation(&self) -> Option<Generation> {
        let e = &self.entries[usize::from(self.last)];
        (e.gfn != 0).then_some(Generation::from_raw(e.gen))
    }

    /// Clears the gva parts (KVM `vcpu_clear_mmio_info(vcpu, MMIO_GVA_ANY)`).
    #[inline]
    pub fn clear_gva(&mut self) {
        for e in self.entries.iter_mut() {
            e.gva = 0;
        }
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

    #[test]
    fn several_gfns_hit_and_the_oldest_goes_first() {
        let mut c = MmioInfoCache::new();
        for g in 1..=ENTRIES as u64 {
            assert!(c.fill(0, Gfn(0x100 + g), Access::WRITE, G, BugSet::NONE));
        }
        for g in 1..=ENTRIES as u64 {
            assert_eq!(c.lookup_gpa(Gfn(0x100 + g), G, BugSet::NONE), Some(Access::WRITE));
        }
        // Refilling a cached gfn reuses its entry; a new gfn evicts the oldest.
        c.fill(0, Gfn(0x101), Access::USER, G, BugSet::NONE);
        assert_eq!(c.lookup_gpa(Gfn(0x101), G, BugSet::NONE), Some(Access::USER));
        c.fill(0, Gfn(0x200), Access::NONE, G, BugSet::NONE);
        assert!(c.match_gpa(Gfn(0x200), G, BugSet::NONE));
        assert!(c.match_gpa(Gfn(0x101), G, BugSet::NONE), "refilled last, so not evicted first");
        assert_eq!(c.entry(), Some((Gfn(0x200), Access::NONE)));
        // Every entry misses under another generation.
        for g in [0x101, 0x103, 0x104, 0x200] {
            assert!(!c.match_gpa(Gfn(g), Generation::from_raw(42), BugSet::NONE));
        }
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
