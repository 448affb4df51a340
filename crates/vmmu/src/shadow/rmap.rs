//! The shadow MMU's reverse map (KVM `rmap`, shadow facts §4.1): for each (address space, gfn)
//! that some leaf SPTE maps, those leaves as (shadow page, index).
//!
//! KVM keeps one rmap head per gfn in per-memslot arrays, found by index. Here the heads live in
//! one hash table keyed by address space and gfn: a lookup, an add and a removal cost O(1) like
//! KVM's, and the memory held follows what is mapped (no array per slot sized by the slot, which
//! a guest with large slots and a small page limit would pay for nothing). A range query costs
//! O(min(range, entries)), and O(range) when the heap cannot hold the list of a long range's
//! mapped gfns ([`Rmap::gfns_in`]).
//!
//! Invariants:
//! - no head is empty: the removal that empties a head drops it from the table;
//! - a head's entries keep their insertion order (KVM's `pte_list` order does not matter for
//!   correctness; a fixed order keeps zaps deterministic);
//! - the memory held stays proportional to what is mapped now: a head's list and the table itself
//!   give memory back once a quarter used ([`retain_shrinking`], [`Rmap::remove`]).
//!
//! Everything here runs under the shadow MMU's lock: [`super::pages::ShadowState`] owns the map.

use super::keymap::{gfn_key, shrink_sparse, KeyMap, AS_SHIFT, GFN_MASK};
use super::pages::{HeapExhausted, SpId};
use crate::types::{AsId, Gfn};
use alloc::vec::Vec;

/// The leaf SPTEs that map one gfn, as (page, index) (KVM's rmap head: one SPTE held in place,
/// a list only for a gfn mapped more than once). Most gfns are mapped by one leaf, which then
/// costs no allocation of its own. Never empty: the last removal drops the head from the map.
#[derive(Clone, Debug)]
pub(super) enum RmapHead {
    One(SpId, u16),
    /// Two or more entries (boxed: the head stays 16 bytes, half of what an inline `Vec` would
    /// make every entry of the map take, for one more allocation on the rare gfn mapped twice).
    #[allow(clippy::box_collection)]
    Many(alloc::boxed::Box<Vec<(SpId, u16)>>),
}

// The map's entries stay small: an 8-byte key and a 16-byte head.
const _: () = assert!(core::mem::size_of::<RmapHead>() == 16);

/// `Vec::retain`, then gives memory back once at most a quarter of the capacity is used (lists
/// of up to [`KEPT_CAPACITY`] slots keep them), so a list that was long once does not keep its
/// peak while short: what the shadow MMU holds stays proportional to what it maps now (the heap
/// bound of `tests/shadow_heap_bound.rs`), whatever the guest mapped before. Halving at a
/// quarter keeps pushes and removals amortised O(1).
pub(super) fn retain_shrinking<T>(list: &mut Vec<T>, keep: impl FnMut(&T) -> bool) {
    list.retain(keep);
    if list.capacity() > KEPT_CAPACITY.max(4 * list.len()) {
        // Fallibly (`shrink_to` ends in the allocator's error handler if the allocator refuses):
        // out of heap, the list keeps its capacity.
        let mut smaller = Vec::new();
        if smaller.try_reserve_exact(KEPT_CAPACITY.max(2 * list.len())).is_ok() {
            smaller.append(list);
            *list = smaller;
        }
    }
}

/// The capacity [`retain_shrinking`] leaves to a short list, so a hash bucket or a page's
/// parent list that empties and fills again does not free and allocate each time.
pub(super) const KEPT_CAPACITY: usize = 8;

impl RmapHead {
    pub(super) fn len(&self) -> usize {
        match self {
            RmapHead::One(..) => 1,
            RmapHead::Many(list) => list.len(),
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (SpId, u16)> + '_ {
        let (one, many) = match self {
            RmapHead::One(id, idx) => (Some((*id, *idx)), &[][..]),
            RmapHead::Many(list) => (None, &list[..]),
        };
        one.into_iter().chain(many.iter().copied())
    }

    /// Adds an entry; a `One` head becomes a list, taken from `spare` if there is one (with
    /// room for two entries, as [`Rmap::reserve`] leaves it), so that nothing is allocated.
    fn push(&mut self, id: SpId, idx: u16, spare: &mut Option<ListBox>) {
        match self {
            RmapHead::One(first, first_idx) => {
                let mut list = spare.take().unwrap_or_default();
                list.clear();
                list.push((*first, *first_idx));
                list.push((id, idx));
                *self = RmapHead::Many(list);
            }
            RmapHead::Many(list) => list.push((id, idx)),
        }
    }

    /// Removes entry (`id`, `idx`); returns whether none is left (the caller drops the head).
    fn remove(&mut self, id: SpId, idx: u16) -> bool {
        match self {
            RmapHead::One(p, i) => *p == id && *i == idx,
            RmapHead::Many(list) => {
                retain_shrinking(list, |&(p, i)| !(p == id && i == idx));
                match list[..] {
                    [] => true,
                    [(p, i)] => {
                        *self = RmapHead::One(p, i);
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

/// A list of a [`RmapHead::Many`].
type ListBox = alloc::boxed::Box<Vec<(SpId, u16)>>;

/// The reverse map: (address space, gfn) -> [`RmapHead`].
pub(super) struct Rmap {
    map: KeyMap<RmapHead>,
    /// A list with room for two entries, made by [`Rmap::reserve`] for the next head that goes
    /// from one entry to two.
    spare: Option<ListBox>,
}

impl Rmap {
    pub(super) fn new() -> Self {
        Rmap { map: KeyMap::default(), spare: None }
    }

    /// Makes room, fallibly, for one [`Rmap::add`] to `gfn` of `as_id`, so that it allocates
    /// nothing even after removals in between (which may shrink the table or a list, or turn
    /// the head back into one entry).
    pub(super) fn reserve(&mut self, as_id: AsId, gfn: Gfn) -> Result<(), HeapExhausted> {
        match self.map.get_mut(&gfn_key(as_id, gfn)) {
            None => self.map.try_reserve(1)?,
            Some(RmapHead::One(..)) => {}
            Some(RmapHead::Many(list)) => list.try_reserve(1)?,
        }
        if self.spare.is_none() {
            let mut list = Vec::new();
            list.try_reserve_exact(2)?;
            self.spare = Some(crate::heap::try_box(list).ok_or(HeapExhausted)?);
        }
        Ok(())
    }

    /// The leaves mapping `gfn` of `as_id`, if any.
    pub(super) fn get(&self, as_id: AsId, gfn: Gfn) -> Option<&RmapHead> {
        self.map.get(&gfn_key(as_id, gfn))
    }

    /// Adds leaf (`id`, `idx`) to `gfn`'s head; returns how many leaves mapped it before (KVM
    /// `pte_list_add`'s count).
    pub(super) fn add(&mut self, as_id: AsId, gfn: Gfn, id: SpId, idx: u16) -> usize {
        match self.map.entry(gfn_key(as_id, gfn)) {
            hashbrown::hash_map::Entry::Vacant(v) => {
                v.insert(RmapHead::One(id, idx));
                0
            }
            hashbrown::hash_map::Entry::Occupied(mut o) => {
                let head = o.get_mut();
                let before = head.len();
                head.push(id, idx, &mut self.spare);
                before
            }
        }
    }

    /// Removes leaf (`id`, `idx`) from `gfn`'s head, dropping the head if it empties, and gives
    /// the table's memory back once at most a quarter of it is used. Nothing if it is not there.
    pub(super) fn remove(&mut self, as_id: AsId, gfn: Gfn, id: SpId, idx: u16) {
        if self.map.get_mut(&gfn_key(as_id, gfn)).is_some_and(|head| head.remove(id, idx)) {
            self.take(as_id, gfn);
        }
    }

    /// Takes `gfn`'s head out of the map (and gives the table's memory back as
    /// [`Self::remove`] does); allocates nothing.
    pub(super) fn take(&mut self, as_id: AsId, gfn: Gfn) -> Option<RmapHead> {
        let head = self.map.remove(&gfn_key(as_id, gfn))?;
        shrink_sparse(&mut self.map);
        Some(head)
    }

    /// The gfns of `[start, end)` of `as_id` a range operation visits, in ascending order:
    /// every gfn some leaf maps, and perhaps unmapped ones, which the caller's per-gfn operation
    /// finds without a head. A short range (no longer than the map) is visited gfn by gfn; a
    /// long one through a sorted list of the map's keys in it, or, if the heap cannot hold that
    /// list, gfn by gfn too: a range operation (a memslot delete's or a host invalidation's zap,
    /// a dirty-log write protection) must not fail, and KVM's own rmap walks visit every gfn
    /// of the range.
    pub(super) fn gfns_in(&self, as_id: AsId, start: Gfn, end: Gfn) -> RangeGfns {
        let (start, end) = (start.raw(), end.raw().max(start.raw()));
        let every = RangeGfns::Every(start..end);
        if end - start <= self.map.len() as u64 {
            return every;
        }
        let in_range =
            |k: &u64| k >> AS_SHIFT == u64::from(as_id.0) && (start..end).contains(&(k & GFN_MASK));
        let n = self.map.keys().filter(|k| in_range(k)).count();
        let mut v = Vec::new();
        if v.try_reserve_exact(n).is_err() {
            return every;
        }
        v.extend(self.map.keys().filter(|k| in_range(k)).map(|&k| Gfn(k & GFN_MASK)));
        v.sort_unstable();
        RangeGfns::Mapped(v.into_iter())
    }
}

/// The gfns a range operation visits ([`Rmap::gfns_in`]), in ascending order. Owns what it
/// lists, so the operation may change the rmap meanwhile.
#[derive(Debug)]
pub(super) enum RangeGfns {
    /// Every gfn of the range.
    Every(core::ops::Range<u64>),
    /// The gfns some leaf mapped when the list was made.
    Mapped(alloc::vec::IntoIter<Gfn>),
}

impl Iterator for RangeGfns {
    type Item = Gfn;

    fn next(&mut self) -> Option<Gfn> {
        match self {
            RangeGfns::Every(r) => r.next().map(Gfn),
            RangeGfns::Mapped(v) => v.next(),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The head holds what a list would, in the same order, and says "empty" exactly when
        /// the list would be (its owner then drops it; it never lives empty).
        #[test]
        fn rmap_head_agrees_with_a_list(ops in proptest::collection::vec(
            (any::<bool>(), 0u32..4, 0u16..3), 1..200)) {
            let mut head: Option<RmapHead> = None;
            let mut model: Vec<(SpId, u16)> = Vec::new();
            for (add, id, idx) in ops {
                let e = (SpId(id), idx);
                if add {
                    match head.as_mut() {
                        // With and without a spare list (what `Rmap::reserve` leaves).
                        Some(h) => {
                            let mut spare = (id % 2 == 1)
                                .then(|| alloc::boxed::Box::new(Vec::with_capacity(2)));
                            h.push(e.0, e.1, &mut spare);
                        }
                        None => head = Some(RmapHead::One(e.0, e.1)),
                    }
                    model.push(e);
                } else if let Some(h) = head.as_mut() {
                    let empty = h.remove(e.0, e.1);
                    model.retain(|&x| x != e);
                    prop_assert_eq!(empty, model.is_empty());
                    if empty {
                        head = None;
                    }
                }
                let seen: Vec<_> = head.iter().flat_map(RmapHead::iter).collect();
                prop_assert_eq!(&seen, &model);
                prop_assert_eq!(head.as_ref().map_or(0, RmapHead::len), model.len());
                prop_assert!(!matches!(&head, Some(RmapHead::Many(l)) if l.len() < 2));
                // A list that shrank gave its memory back (at most 4 slots per entry).
                prop_assert!(!matches!(&head, Some(RmapHead::Many(l))
                    if l.capacity() > KEPT_CAPACITY.max(4 * l.len())));
            }
        }

        /// The map against a model (a sorted map of lists): every head, every range query (short
        /// ranges probe, long ones scan: both in order, never another address space's gfns),
        /// the count `add` returns, and a table that gives memory back as it empties.
        #[test]
        fn rmap_agrees_with_a_sorted_map(ops in proptest::collection::vec(
            (0u8..4, 0u16..2, 0u64..300, 0u32..3, 0u16..3, 0u64..400), 1..400)) {
            let mut rmap = Rmap::new();
            let mut model: alloc::collections::BTreeMap<(u16, u64), Vec<(SpId, u16)>> =
                alloc::collections::BTreeMap::new();
            // Gfns: small, and a few near the memslots' limit.
            let gfn = |g: u64| Gfn(if g >= 290 { (1 << 40) - 1 - (g - 290) } else { g });
            for (op, as_id, g, id, idx, span) in ops {
                let (a, g, e) = (AsId(as_id), gfn(g), (SpId(id), idx));
                match op {
                    0 | 1 => {
                        let list = model.entry((as_id, g.raw())).or_default();
                        prop_assert_eq!(rmap.add(a, g, e.0, e.1), list.len());
                        list.push(e);
                    }
                    2 => {
                        rmap.remove(a, g, e.0, e.1);
                        if let Some(list) = model.get_mut(&(as_id, g.raw())) {
                            list.retain(|&x| x != e);
                            if list.is_empty() {
                                model.remove(&(as_id, g.raw()));
                            }
                        }
                    }
                    _ => {
                        let end = Gfn(g.raw().saturating_add(span).min(1 << 40));
                        let want: Vec<Gfn> = model
                            .range((as_id, g.raw())..(as_id, end.raw()))
                            .map(|(k, _)| Gfn(k.1))
                            .collect();
                        let got: Vec<Gfn> = rmap
                            .gfns_in(a, g, end)
                            .filter(|&x| rmap.get(a, x).is_some())
                            .collect();
                        prop_assert_eq!(got, want);
                    }
                }
                let seen: Vec<_> = rmap.get(a, g).iter().flat_map(|h| h.iter()).collect();
                let want = model.get(&(as_id, g.raw())).cloned().unwrap_or_default();
                prop_assert_eq!(seen, want);
                prop_assert_eq!(rmap.map.len(), model.len());
                prop_assert!(rmap.map.capacity() <= 64usize.max(4 * rmap.map.len()) * 2);
            }
        }
    }

    #[test]
    fn a_long_range_scans_only_its_address_space_and_range() {
        let mut rmap = Rmap::new();
        for g in [1u64, 5, 9, (1 << 40) - 1] {
            rmap.add(AsId(0), Gfn(g), SpId(0), 0);
            rmap.add(AsId(1), Gfn(g + 1), SpId(0), 1);
        }
        let gfns = |a, s, e| rmap.gfns_in(AsId(a), Gfn(s), Gfn(e)).collect::<Vec<_>>();
        // Ranges longer than the map (8 entries): the scan lists the mapped gfns alone.
        assert_eq!(gfns(0, 0, 1 << 40), [1, 5, 9, (1 << 40) - 1].map(Gfn));
        assert_eq!(gfns(1, 0, 1 << 20), [2, 6, 10].map(Gfn));
        assert_eq!(gfns(0, 2, 100), [5, 9].map(Gfn));
        // Short: every gfn, in order, for the caller to probe.
        assert_eq!(gfns(0, 4, 10), (4..10).map(Gfn).collect::<Vec<_>>());
        assert_eq!(gfns(0, 10, 4), []);
    }
}
