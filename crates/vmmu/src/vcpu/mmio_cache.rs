//! The per-vCPU MMIO info cache (KVM: `vcpu->arch.mmio_gva/mmio_access/mmio_gfn/mmio_gen`,
//! facts §3.7): the last addresses the vCPU found to be emulated MMIO, so the next access to one
//! of them needs no table walk at all.
//!
//! KVM keeps one entry; this keeps [`ENTRIES`] (a guest that drives two devices in turn, or a
//! device and its doorbell, would miss a single entry on every access and pay two table walks
//! per exit instead). Each entry behaves as KVM's one does. The cache is direct-mapped: an
//! address lives only in the entry its page number selects (`slot_of`: the GVA's page under
//! shadow paging, else the gfn), so a lookup reads one entry. A miss therefore costs one compare,
//! not a scan, and every MMIO SPTE hit of the fast path pays a miss first (measured by `vmmu
//! bench --only mmio --only shadow`). Neighbouring pages select different entries.
//!
//! Invariants:
//! - an entry is tagged with the full 64-bit memslot generation it was made under, and only ever
//!   hits while the generation is exactly that value (so any memslot update, and any moment of an
//!   update in progress, misses). The generation is that of the vCPU's current address space.
//!   KVM's cache helpers read address space 0's (facts §2.5), so in KVM a vCPU in SMM keeps a
//!   cached MMIO gfn across an SMM slot created over it; here that entry misses, and an entry
//!   made in one address space never hits in the other (their generations never meet);
//! - nothing is filled while an update is in progress (bit 63 set): 2019 fix ddfd1730fd82;
//! - gva 0 and gfn 0 mean "invalid", so they never hit (as in KVM);
//! - [`MmioInfoCache::clear_gva`] clears only the gva parts (KVM `vcpu_clear_mmio_info`): the gfn
//!   parts are guarded by the generation, the gva parts by guest page-table changes;
//! - an entry filled with a gva records the size of the guest page it was translated through
//!   (4 KiB, 2 MiB or 1 GiB; when the size is unknown, the largest page the guest's paging mode
//!   allows, `GuestCpu::largest_page_level`), and INVLPG of any address in that guest page clears
//!   its gva part, as INVLPG drops the TLB entry of the whole page. KVM compares the 4 KiB page
//!   only, so after a guest remaps a 2 MiB page and invalidates it by its base address (as Linux
//!   does), KVM's entry for another 4 KiB page inside it outlives the mapping: with MMIO SPTEs
//!   on, the next RSVD fault there hits it and emulates at the old device address;
//! - a gva page is only ever in the entry `slot_of` its page number, and so in at most one; a
//!   gfn filled without a gva likewise. A gfn filled through GVAs sits in the entry of each GVA
//!   that maps it (aliases), so a lookup by gfn reads every entry once any fill had a gva.
//!
//! Owned by its vCPU thread (`&mut`); no atomics. The generation it compares against is the
//! published memslot generation, read by the caller.

use crate::bugs::{Bug, BugSet};
use crate::types::{Access, Generation, Gfn, Level, PAGE_SHIFT};

/// Entries of the cache.
pub const ENTRIES: usize = 4;

/// The entry a page number (a gva's page number, or a gfn when there is no gva) lives in: its
/// low bits, with bits 8 and 16 up folded in, so that neighbouring pages use different entries
/// and so do the usual device windows that share their low bits (0xfec00, 0xfed00, 0xfee00).
/// Public so that benchmarks and tests can pick addresses that share an entry.
#[inline(always)]
pub fn slot_of(key: u64) -> usize {
    ((key ^ (key >> 8) ^ (key >> 16)) as usize) & (ENTRIES - 1)
}

/// One cached MMIO address (KVM's whole cache).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    gva: u64,
    gfn: u64,
    access: Access,
    /// log2 of the size of the guest page `gva` was translated through (12, 21 or 30).
    span_shift: u8,
    gen: u64,
}

impl Entry {
    const EMPTY: Entry =
        Entry { gva: 0, gfn: 0, access: Access::NONE, span_shift: PAGE_SHIFT as u8, gen: 0 };

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
    /// Some fill had a gva (shadow paging): gfn lookups must then look beyond the gfn's slot.
    gva_filled: bool,
}

impl MmioInfoCache {
    /// An empty cache.
    pub const fn new() -> Self {
        MmioInfoCache { entries: [Entry::EMPTY; ENTRIES], last: 0, gva_filled: false }
    }

    /// Records that `gfn` (reached through `gva`, 0 under TDP) is MMIO with `access`, under
    /// generation `gen` (KVM `vcpu_cache_mmio_info`), in the entry the gva's page (or, without
    /// a gva, the gfn) selects, replacing what it held. Does nothing while an update is in
    /// progress. Returns whether it cached. The size of the guest page behind `gva` is taken to
    /// be 1 GiB (the largest a guest leaf can be), so INVLPG anywhere in that 1 GiB region
    /// clears it; [`Self::fill_guest_page`] names the size (or a tighter bound) when the caller
    /// knows it.
    #[inline]
    pub fn fill(
        &mut self,
        gva: u64,
        gfn: Gfn,
        access: Access,
        gen: Generation,
        bugs: BugSet,
    ) -> bool {
        self.fill_guest_page(gva, Level::L1G, gfn, access, gen, bugs)
    }

    /// [`Self::fill`] for a `gva` that the guest's tables map with a leaf at `guest_level`
    /// (4 KiB, 2 MiB or 1 GiB): INVLPG of any address in that guest page clears the entry.
    #[inline]
    pub fn fill_guest_page(
        &mut self,
        gva: u64,
        guest_level: Level,
        gfn: Gfn,
        access: Access,
        gen: Generation,
        bugs: BugSet,
    ) -> bool {
        if gen.in_progress() && !bugs.has(Bug::CacheWhileInProgress) {
            return false;
        }
        let page = gva & !crate::types::PAGE_OFFSET_MASK;
        let slot = if page != 0 {
            self.gva_filled = true;
            slot_of(page >> crate::types::PAGE_SHIFT)
        } else {
            slot_of(gfn.raw())
        };
        // At most 1 GiB (`Level::shift` is 12, 21 or 30 for the guest leaves this cache sees).
        let span_shift = guest_level.shift().min(Level::L1G.shift()) as u8;
        self.entries[slot] =
            Entry { gva: page, gfn: gfn.raw(), access, span_shift, gen: gen.raw() };
        self.last = slot as u8;
        true
    }

    /// The access rights cached for `gfn` if an entry holds it for generation `gen` (KVM
    /// `vcpu_match_mmio_gpa`).
    #[inline]
    pub fn lookup_gpa(&self, gfn: Gfn, gen: Generation, bugs: BugSet) -> Option<Access> {
        let g = gfn.raw();
        let e = &self.entries[slot_of(g)];
        if e.gfn == g && g != 0 && e.gen_ok(gen, bugs) {
            return Some(e.access);
        }
        if !self.gva_filled {
            return None;
        }
        // Filled through GVAs: the gfn may sit in any entry.
        self.entries.iter().find(|e| e.gfn == g && g != 0 && e.gen_ok(gen, bugs)).map(|e| e.access)
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
        let e = &self.entries[slot_of(page >> crate::types::PAGE_SHIFT)];
        page != 0 && e.gva == page && e.gen_ok(gen, bugs)
    }

    /// The gfn and access cached for the page of `gva` under generation `gen` (KVM
    /// `vcpu_match_mmio_gva` and the `mmio_gfn`/`mmio_access` it pairs with): shadow paging's
    /// hit needs no guest walk. The caller checks the access against the cached rights.
    #[inline]
    pub fn lookup_gva(&self, gva: u64, gen: Generation, bugs: BugSet) -> Option<(Gfn, Access)> {
        let page = gva & !crate::types::PAGE_OFFSET_MASK;
        let e = &self.entries[slot_of(page >> crate::types::PAGE_SHIFT)];
        (page != 0 && e.gva == page && e.gfn != 0 && e.gen_ok(gen, bugs))
            .then_some((Gfn(e.gfn), e.access))
    }

    /// INVLPG of `gva` (KVM `vcpu_clear_mmio_info(vcpu, gva)`): clears the gva part of every
    /// entry whose guest page contains `gva` (the entry of `gva`'s own 4 KiB page, and any entry
    /// filled through the 2 MiB or 1 GiB guest page `gva` lies in; KVM clears only the former,
    /// see the module doc).
    #[inline]
    pub fn clear_gva_page(&mut self, gva: u64) {
        for e in self.entries.iter_mut() {
            let mask = !((1u64 << e.span_shift) - 1);
            if e.gva != 0 && e.gva & mask == gva & mask {
                e.gva = 0;
            }
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
    fn neighbouring_gfns_and_device_windows_hit_together() {
        let mut c = MmioInfoCache::new();
        let gfns = [0x101, 0x102, 0x103, 0x104];
        for g in gfns {
            assert!(c.fill(0, Gfn(g), Access::WRITE, G, BugSet::NONE));
        }
        for g in gfns {
            assert_eq!(c.lookup_gpa(Gfn(g), G, BugSet::NONE), Some(Access::WRITE), "{g:#x}");
        }
        // IOAPIC, HPET and local APIC pages share their low bits, not their entry.
        let mut c = MmioInfoCache::new();
        for g in [0xfec00, 0xfed00, 0xfee00] {
            c.fill(0, Gfn(g), Access::WRITE, G, BugSet::NONE);
        }
        for g in [0xfec00, 0xfed00, 0xfee00] {
            assert!(c.match_gpa(Gfn(g), G, BugSet::NONE), "{g:#x}");
        }
        // Every entry misses under another generation.
        for g in [0xfec00, 0xfed00, 0xfee00] {
            assert!(!c.match_gpa(Gfn(g), Generation::from_raw(42), BugSet::NONE));
        }
    }

    #[test]
    fn a_fill_replaces_what_its_entry_held_and_nothing_else() {
        let mut c = MmioInfoCache::new();
        c.fill(0, Gfn(0x101), Access::WRITE, G, BugSet::NONE);
        c.fill(0, Gfn(0x102), Access::WRITE, G, BugSet::NONE);
        // Refilling a cached gfn updates its entry.
        c.fill(0, Gfn(0x101), Access::USER, G, BugSet::NONE);
        assert_eq!(c.lookup_gpa(Gfn(0x101), G, BugSet::NONE), Some(Access::USER));
        // A gfn that selects the same entry (same low bits) evicts it; the other stays.
        let rival = (0x105..).find(|g| slot_of(*g) == slot_of(0x101)).unwrap();
        c.fill(0, Gfn(rival), Access::NONE, G, BugSet::NONE);
        assert!(!c.match_gpa(Gfn(0x101), G, BugSet::NONE));
        assert!(c.match_gpa(Gfn(rival), G, BugSet::NONE));
        assert!(c.match_gpa(Gfn(0x102), G, BugSet::NONE));
        assert_eq!(c.entry(), Some((Gfn(rival), Access::NONE)));
    }

    #[test]
    fn a_gva_page_is_in_one_entry_and_aliases_of_a_gfn_in_several() {
        let mut c = MmioInfoCache::new();
        // Two GVAs map one MMIO gfn with different guest rights: both hit, each with its own.
        let l = Level::L4K;
        c.fill_guest_page(0x7000_0000, l, Gfn(0x55), Access::USER, G, BugSet::NONE);
        let wu = Access::WRITE.union(Access::USER);
        c.fill_guest_page(0x7000_1000, l, Gfn(0x55), wu, G, BugSet::NONE);
        assert_eq!(c.lookup_gva(0x7000_0010, G, BugSet::NONE), Some((Gfn(0x55), Access::USER)));
        assert_eq!(
            c.lookup_gva(0x7000_1010, G, BugSet::NONE),
            Some((Gfn(0x55), Access::WRITE.union(Access::USER)))
        );
        assert!(c.match_gpa(Gfn(0x55), G, BugSet::NONE), "a gfn lookup reads every entry");
        // The guest remaps the first page to another gfn: the new fill replaces the old one.
        c.fill_guest_page(0x7000_0000, l, Gfn(0x66), Access::USER, G, BugSet::NONE);
        assert_eq!(c.lookup_gva(0x7000_0000, G, BugSet::NONE), Some((Gfn(0x66), Access::USER)));
        // INVLPG of the second page clears its gva part only.
        c.clear_gva_page(0x7000_1ff8);
        assert!(!c.match_gva(0x7000_1000, G, BugSet::NONE));
        assert!(c.match_gva(0x7000_0000, G, BugSet::NONE));
        assert!(c.match_gpa(Gfn(0x55), G, BugSet::NONE));
    }

    #[test]
    fn invlpg_of_a_large_guest_page_clears_every_gva_inside_it() {
        let mut c = MmioInfoCache::new();
        // Two 4 KiB pages inside one 2 MiB guest page, and one 4 KiB guest page next to it.
        c.fill_guest_page(0x2000_3000, Level::L2M, Gfn(0x80003), Access::USER, G, BugSet::NONE);
        c.fill_guest_page(0x2000_5000, Level::L2M, Gfn(0x80005), Access::USER, G, BugSet::NONE);
        c.fill_guest_page(0x2020_0000, Level::L4K, Gfn(0x90000), Access::USER, G, BugSet::NONE);
        // The guest remaps the 2 MiB page and invalidates it by its base address.
        c.clear_gva_page(0x2000_0000);
        assert_eq!(c.lookup_gva(0x2000_3000, G, BugSet::NONE), None);
        assert_eq!(c.lookup_gva(0x2000_5000, G, BugSet::NONE), None);
        assert!(c.match_gva(0x2020_0000, G, BugSet::NONE), "another guest page keeps its entry");
        // A fill whose guest page size is unknown is taken as 2 MiB.
        c.fill(0x2000_7000, Gfn(0x80007), Access::USER, G, BugSet::NONE);
        c.clear_gva_page(0x201f_f000);
        assert!(!c.match_gva(0x2000_7000, G, BugSet::NONE));
        // A 4 KiB guest page is cleared by its own page only.
        c.clear_gva_page(0x2020_1000);
        assert!(c.match_gva(0x2020_0000, G, BugSet::NONE));
        c.clear_gva_page(0x2020_0ff8);
        assert!(!c.match_gva(0x2020_0000, G, BugSet::NONE));
    }

    /// Once a fill had a gva, a gfn lookup reads every entry, and still hits only an entry that
    /// holds that very gfn (never gfn 0) under that very generation: an uncached gfn, or the
    /// cached one under another generation, is no MMIO decision. Kills, in `lookup_gpa`'s scan
    /// `e.gfn == g && g != 0 && e.gen_ok(..)`, each `&&` -> `||`, `==` -> `!=` and `!=` -> `==`.
    #[test]
    fn a_gfn_lookup_after_gva_fills_hits_only_the_gfn_it_holds() {
        let mut c = MmioInfoCache::new();
        let l = Level::L4K;
        c.fill_guest_page(0x7000_0000, l, Gfn(0x55), Access::USER, G, BugSet::NONE);
        c.fill_guest_page(0x7000_1000, l, Gfn(0), Access::USER, G, BugSet::NONE);
        // 0x55 lives in another entry than its gva's: found by the scan.
        assert_ne!(slot_of(0x55), slot_of(0x7_0000));
        assert_eq!(c.lookup_gpa(Gfn(0x55), G, BugSet::NONE), Some(Access::USER));
        assert_eq!(c.lookup_gpa(Gfn(0x66), G, BugSet::NONE), None, "an uncached gfn");
        let other = Generation::from_raw(42);
        assert_eq!(c.lookup_gpa(Gfn(0x55), other, BugSet::NONE), None, "another generation");
        assert_eq!(c.lookup_gpa(Gfn(0), G, BugSet::NONE), None, "gfn 0 is invalid");
    }

    /// Page numbers that differ only from bit 16 up (device windows 256 MiB apart) use
    /// different entries, as the doc of `slot_of` promises: a guest driving them in turn hits
    /// on each. Kills `key >> 16` -> `key << 16` in `slot_of`.
    #[test]
    fn pages_differing_only_from_bit_16_up_hit_together() {
        let mut c = MmioInfoCache::new();
        let gfns = [0x1_0000, 0x2_0000, 0x3_0000];
        for g in gfns {
            assert!(c.fill(0, Gfn(g), Access::WRITE, G, BugSet::NONE));
        }
        for g in gfns {
            assert!(c.match_gpa(Gfn(g), G, BugSet::NONE), "{g:#x}");
        }
    }

    /// `entry` and `generation` report the entry filled last (the models read them), and
    /// nothing for an empty cache.
    #[test]
    fn the_last_fill_is_what_entry_and_generation_report() {
        let mut c = MmioInfoCache::new();
        assert_eq!((c.entry(), c.generation()), (None, None));
        let g2 = Generation::from_raw(44);
        c.fill(0, Gfn(0x101), Access::WRITE, G, BugSet::NONE);
        c.fill(0, Gfn(0x102), Access::USER, g2, BugSet::NONE);
        assert_eq!(c.entry(), Some((Gfn(0x102), Access::USER)));
        assert_eq!(c.generation(), Some(g2));
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
