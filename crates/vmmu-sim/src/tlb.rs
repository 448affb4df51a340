//! A per-vCPU TLB: guest frame -> host page, for present leaf translations only.
//!
//! Mirrors what the hardware caches from the MMU's tables: the machine inserts an entry only
//! after a walk (or the MMU) produced a present leaf, never for MMIO or a fault; the MMU can only
//! get rid of entries by asking the vCPU to flush everything (KVM: `KVM_REQ_TLB_FLUSH`), which is
//! why a stale entry is exactly what the remote-TLB-flush protocol must prevent.
//!
//! Direct mapped, with 4 KiB entries: a 2 MiB translation fills only the entry of the page
//! accessed (hardware may splinter like this). A write that hits a read-only entry is a miss, so
//! the vCPU walks again and the MMU sees the write fault. Owned by one vCPU thread: no atomics;
//! lookups take no lock and allocate nothing.

use crate::seam::AccessKind;
use serde::Serialize;
use vmmu::types::{Gfn, Level, Pfn};

/// One cached translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbEntry {
    /// The frame backing the guest page.
    pub pfn: Pfn,
    /// Whether writes may use the entry.
    pub writable: bool,
    /// The level of the leaf the translation came from.
    pub level: Level,
}

/// Hit/miss/flush counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TlbStats {
    /// Lookups answered by an entry.
    pub hits: u64,
    /// Lookups that found no usable entry.
    pub misses: u64,
    /// Whole-TLB flushes.
    pub flushes: u64,
    /// Entries inserted.
    pub inserts: u64,
    /// Of those, entries from a leaf larger than 4 KiB (the translation came from a 2 MiB or
    /// 1 GiB leaf).
    pub inserts_huge: u64,
}

impl TlbStats {
    /// Adds `o` into `self`.
    pub fn add(&mut self, o: &TlbStats) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.flushes += o.flushes;
        self.inserts += o.inserts;
        self.inserts_huge += o.inserts_huge;
    }
}

/// A direct-mapped TLB of `2^k` entries.
#[derive(Debug)]
pub struct Tlb {
    tags: Box<[u64]>,
    entries: Box<[Option<TlbEntry>]>,
    mask: u64,
    stats: TlbStats,
}

// SAFETY: the TLB only stores host pointers as values; it never dereferences them. Whoever uses
// an entry's pointer is responsible for its validity (the machine's buffers outlive the run).
unsafe impl Send for Tlb {}

const INVALID: u64 = u64::MAX;

impl Tlb {
    /// A TLB with `entries` slots, rounded up to a power of two (at least 1).
    pub fn new(entries: usize) -> Tlb {
        let n = entries.max(1).next_power_of_two();
        Tlb {
            tags: vec![INVALID; n].into_boxed_slice(),
            entries: vec![None; n].into_boxed_slice(),
            mask: n as u64 - 1,
            stats: TlbStats::default(),
        }
    }

    #[inline]
    fn index(&self, gfn: Gfn) -> usize {
        // Mix the high bits in, so guest regions at large power-of-two distances do not all
        // collide on the same slots.
        ((gfn.0 ^ (gfn.0 >> 9) ^ (gfn.0 >> 18)) & self.mask) as usize
    }

    /// The entry for `gfn` usable for an access of `kind`.
    #[inline]
    pub fn lookup(&mut self, gfn: Gfn, kind: AccessKind) -> Option<TlbEntry> {
        let i = self.index(gfn);
        match self.entries[i] {
            Some(e) if self.tags[i] == gfn.0 && (e.writable || !kind.is_write()) => {
                self.stats.hits += 1;
                Some(e)
            }
            _ => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Caches a present leaf translation of `gfn`, evicting whatever shared its slot.
    #[inline]
    pub fn insert(&mut self, gfn: Gfn, entry: TlbEntry) {
        let i = self.index(gfn);
        self.tags[i] = gfn.0;
        self.entries[i] = Some(entry);
        self.stats.inserts += 1;
        if entry.level != Level::L4K {
            self.stats.inserts_huge += 1;
        }
    }

    /// Drops every entry.
    pub fn flush(&mut self) {
        self.tags.fill(INVALID);
        self.entries.fill(None);
        self.stats.flushes += 1;
    }

    /// Entries currently held.
    pub fn len(&self) -> usize {
        self.entries.iter().filter(|e| e.is_some()).count()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The counters.
    pub fn stats(&self) -> TlbStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AccessKind::{Read, Write};

    fn entry(writable: bool) -> TlbEntry {
        TlbEntry { pfn: Pfn(42), writable, level: Level::L4K }
    }

    #[test]
    fn hit_after_insert_miss_after_flush() {
        let mut t = Tlb::new(64);
        assert!(t.lookup(Gfn(5), Read).is_none());
        t.insert(Gfn(5), entry(true));
        assert_eq!(t.lookup(Gfn(5), Write).map(|e| e.pfn), Some(Pfn(42)));
        assert!(t.lookup(Gfn(6), Read).is_none());
        t.flush();
        assert!(t.is_empty());
        assert!(t.lookup(Gfn(5), Read).is_none());
        assert_eq!(
            t.stats(),
            TlbStats { hits: 1, misses: 3, flushes: 1, inserts: 1, inserts_huge: 0 }
        );
    }

    #[test]
    fn inserts_from_huge_leaves_are_counted_apart() {
        let mut t = Tlb::new(8);
        t.insert(Gfn(1), entry(true));
        t.insert(Gfn(2), TlbEntry { level: Level::L2M, ..entry(true) });
        t.insert(Gfn(3), TlbEntry { level: Level::L2M, ..entry(false) });
        let s = t.stats();
        assert_eq!((s.inserts, s.inserts_huge), (3, 2));
    }

    #[test]
    fn write_to_read_only_entry_misses() {
        let mut t = Tlb::new(8);
        t.insert(Gfn(1), entry(false));
        assert!(t.lookup(Gfn(1), Read).is_some());
        assert!(t.lookup(Gfn(1), Write).is_none());
    }

    #[test]
    fn conflicting_gfns_evict_each_other() {
        let mut t = Tlb::new(1);
        t.insert(Gfn(1), entry(true));
        t.insert(Gfn(2), entry(true));
        assert!(t.lookup(Gfn(1), Read).is_none(), "a tag mismatch is a miss, never a wrong hit");
        assert!(t.lookup(Gfn(2), Read).is_some());
        assert_eq!(t.len(), 1);
    }
}
