//! The per-reader (per-vCPU) last-used-slot cache (KVM `vcpu->last_used_slot` +
//! `last_used_slot_gen`, facts §5.1).
//!
//! Invariant: the cached slot came from a set whose generation was `gen` when it was looked up,
//! and an answer is given only while the set shows exactly that generation (full 64 bits,
//! in-progress flag included). Address spaces never share a generation value, so switching
//! address space also empties the cache. Plain fields: the cache belongs to one reader.

use super::slot::Memslot;
use crate::types::{Generation, Gfn};

/// A per-reader last-used-slot cache.
#[derive(Clone, Debug)]
pub struct SlotCache {
    gen: u64,
    slot: Option<Memslot>,
    hits: u64,
    misses: u64,
}

impl Default for SlotCache {
    fn default() -> Self {
        Self::new()
    }
}

impl SlotCache {
    /// An empty cache.
    pub const fn new() -> Self {
        SlotCache { gen: u64::MAX, slot: None, hits: 0, misses: 0 }
    }

    /// The cached slot if it is valid for `gen` and holds `gfn`. A generation change empties
    /// the cache.
    #[inline]
    pub(crate) fn lookup(&mut self, gen: Generation, gfn: Gfn) -> Option<Memslot> {
        if self.gen != gen.raw() {
            self.gen = gen.raw();
            self.slot = None;
        }
        match self.slot {
            Some(s) if s.contains(gfn) => {
                self.hits += 1;
                Some(s)
            }
            _ => {
                self.misses += 1;
                None
            }
        }
    }

    /// Records the result of a full lookup made at generation `gen`. A miss keeps the old slot.
    #[inline]
    pub(crate) fn fill(&mut self, gen: Generation, slot: Option<Memslot>) {
        debug_assert_eq!(self.gen, gen.raw(), "fill without lookup at the same generation");
        if slot.is_some() {
            self.slot = slot;
        }
    }

    /// Empties the cache.
    pub fn clear(&mut self) {
        self.slot = None;
    }

    /// Lookups answered from the cache.
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// Lookups that needed a full search.
    pub fn misses(&self) -> u64 {
        self.misses
    }
}
