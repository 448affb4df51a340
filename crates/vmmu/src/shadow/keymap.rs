//! Hash maps keyed by one `u64` for the shadow MMU's bookkeeping: the reverse map keyed by
//! (address space, gfn) packed into one word ([`gfn_key`]), the write-tracking counts keyed by
//! gfn alone ([`track_key`]: tracking spans both address spaces), and the page-by-frame index
//! keyed by the frame number. A lookup, an insert and a removal cost
//! O(1); [`shrink_sparse`] gives memory back once a map is at most a quarter full, so what the
//! maps hold follows what the MMU holds now (the heap bound of `tests/shadow_heap_bound.rs`).
//!
//! Everything here runs under the shadow MMU's lock, inside [`super::pages::ShadowState`].

use crate::types::{AsId, Gfn};

/// A map keyed by one `u64`.
pub(super) type KeyMap<V> = crate::hash::KeyMap<u64, V>;

/// Bits of a [`gfn_key`] below the address space: a gfn has at most 40 (52-bit guest-physical
/// addresses, the memslots' limit).
pub(super) const AS_SHIFT: u32 = 48;
/// A [`gfn_key`]'s gfn bits.
pub(super) const GFN_MASK: u64 = (1 << AS_SHIFT) - 1;

/// The key of `gfn` in address space `as_id`.
pub(super) fn gfn_key(as_id: AsId, gfn: Gfn) -> u64 {
    debug_assert!(gfn.raw() >> AS_SHIFT == 0, "gfn {gfn:?} above the memslots' limit");
    (u64::from(as_id.0) << AS_SHIFT) | gfn.raw()
}

/// The key of `gfn` for write tracking, which is by gfn across address spaces
/// (`ShadowState::tracked`).
pub(super) fn track_key(gfn: Gfn) -> u64 {
    debug_assert!(gfn.raw() >> AS_SHIFT == 0, "gfn {gfn:?} above the memslots' limit");
    gfn.raw()
}

/// Entries a map that shrank keeps room for.
const KEPT_ENTRIES: usize = 64;

/// Gives `map`'s memory back once at most a quarter of its capacity is used (down to room for
/// twice its entries, [`KEPT_ENTRIES`] at least): called after removals, amortised O(1).
pub(super) fn shrink_sparse<V>(map: &mut KeyMap<V>) {
    let len = map.len();
    if map.capacity() > KEPT_ENTRIES.max(4 * len) {
        // Fallibly (a smaller table is a new allocation): out of heap, the map stays as it is.
        let mut smaller = KeyMap::default();
        if smaller.try_reserve(KEPT_ENTRIES.max(2 * len)).is_ok() {
            smaller.extend(map.drain());
            *map = smaller;
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_address_spaces_apart_and_gfns_whole() {
        let g = Gfn((1 << 40) - 1);
        assert_ne!(gfn_key(AsId(0), g), gfn_key(AsId(1), g));
        assert_eq!(gfn_key(AsId(1), g) & GFN_MASK, g.raw());
        assert_eq!(gfn_key(AsId(1), g) >> AS_SHIFT, 1);
    }

    #[test]
    fn a_map_that_empties_gives_its_memory_back() {
        let mut m = KeyMap::default();
        for k in 0..10_000u64 {
            m.insert(k << 9, k);
        }
        let full = m.capacity();
        for k in 0..9_990u64 {
            m.remove(&(k << 9));
            shrink_sparse(&mut m);
        }
        assert!(m.capacity() <= 4 * KEPT_ENTRIES && m.capacity() < full / 16, "{}", m.capacity());
        assert!((9_990..10_000u64).all(|k| m.get(&(k << 9)) == Some(&k)));
    }
}
