//! One memslot set of one address space (KVM's `struct kvm_memslots`): the slots indexed by base
//! gfn, by id and by host range, and the set's generation.
//!
//! Invariants:
//! - slots in a set never overlap in guest-physical space (their host ranges may: aliases);
//!   `by_id`, `by_gfn` and `by_hva` hold the same slots (`by_id` and `by_gfn` equal copies);
//! - the maps change only through `MemslotSet::replace`, whose contract is that no reader can
//!   reach the set (it is unpublished and a grace period has passed since it last was, or it was
//!   never published), and only the slots-lock holder calls it;
//! - the generation is an atomic because its final store (facts §2.2) races readers that already
//!   hold the published set.
//!
//! Lookups allocate nothing and take no lock: `find` is two searches and a read in the gfn index
//! (`gfn_index`: a B+tree of height two), `iter_range` the same plus a walk, `get` (by id) one
//! read of the id table (`id_table`), `for_each_in_hva_range` an interval-tree query
//! (`O(log n + k)`). All include `KVM_MEMSLOT_INVALID` slots; the caller decides (a fault on an
//! invalid slot retries).

use super::cache::SlotCache;
use super::gfn_index::{GfnIndex, GfnRoom};
use super::hva_index::{HvaIndex, HvaRoom};
use super::id_table::{IdEntry, IdRoom, IdTable};
use super::slot::Memslot;
use crate::dirty::DirtyBitmap;
use crate::heap::TryArc;
use crate::sync::{AtomicU64, Ordering, UnsafeCell};
use crate::types::{Generation, Gfn, Hva, SlotId};

/// The slot maps of a set.
#[derive(Default, Debug)]
struct SlotMaps {
    /// Slots by base gfn.
    by_gfn: GfnIndex,
    /// Slots and the dirty bitmaps of those that log, by slot id.
    by_id: IdTable,
    /// Slot ids by host range (KVM `hva_tree`).
    by_hva: HvaIndex,
}

/// Room for one more slot in a set's indexes ([`MemslotSet::room_for`]): `None` when the set
/// has it already (no parts to move around).
pub(crate) struct SetRoom(Option<alloc::boxed::Box<RoomParts>>);

/// What a [`SetRoom`] hands over.
struct RoomParts {
    gfn: GfnRoom,
    id: IdRoom,
    hva: HvaRoom,
}

impl SetRoom {
    /// No room to hand over.
    const NONE: SetRoom = SetRoom(None);

    /// About what a room takes at most, for the `ENOMEM` message: a block of each index and a
    /// page of the id table (their vectors' growth aside).
    pub(crate) const BYTES: u64 =
        (GfnIndex::BLOCK_BYTES + HvaIndex::BLOCK_BYTES + IdTable::PAGE_BYTES) as u64;
}

/// The slots of `from` (slots by base gfn from the last one at or below `start`) that meet
/// `[start, end)`.
fn in_range<'a>(
    from: impl Iterator<Item = &'a Memslot> + 'a,
    start: Gfn,
    end: Gfn,
) -> impl Iterator<Item = &'a Memslot> + 'a {
    let (start, end) = (start.0, end.0);
    // Only the first slot can begin at or below `start`; it counts if it reaches past it.
    from.skip_while(move |s| s.base_gfn().0 <= start && s.end_gfn().0 <= start)
        .take_while(move |s| start < end && s.base_gfn().0 < end)
}

/// A slot's host range `[start, end)`.
fn hva_range(s: &Memslot) -> (u64, u64) {
    (s.userspace_addr().raw(), s.end_hva().raw())
}

/// A memslot set: what a reader sees of one address space.
pub struct MemslotSet {
    generation: AtomicU64,
    maps: UnsafeCell<SlotMaps>,
}

// SAFETY: the maps are mutated only by `replace`, whose caller guarantees that no other thread
// can reach the set meanwhile (the double-buffer protocol of `Memslots`, documented there); all
// other access is shared reads. The generation is an atomic.
unsafe impl Sync for MemslotSet {}

impl core::fmt::Debug for MemslotSet {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MemslotSet")
            .field("generation", &self.generation())
            .field("len", &self.len())
            .finish()
    }
}

impl MemslotSet {
    /// An empty set with generation `gen`.
    pub(crate) fn new(gen: Generation) -> Self {
        MemslotSet {
            generation: AtomicU64::new(gen.raw()),
            maps: UnsafeCell::new(SlotMaps::default()),
        }
    }

    #[inline]
    fn maps(&self) -> &SlotMaps {
        // SAFETY: `&self` is reachable only inside a read section of the owning `Memslots` or by
        // the slots-lock holder; `replace` (the only writer) is called only on a set no reader
        // can reach and by the lock holder, who does not hold a reference from here across it.
        self.maps.with(|p| unsafe { &*p })
    }

    /// The set's generation. Acquire: pairs with the Release store of the final generation.
    #[inline]
    pub fn generation(&self) -> Generation {
        Generation::from_raw(self.generation.load(Ordering::Acquire))
    }

    /// Stores the generation (the updater's in-progress and final stores).
    #[inline]
    pub(crate) fn store_generation(&self, gen: Generation, order: Ordering) {
        self.generation.store(gen.raw(), order);
    }

    /// The slot holding `gfn`, if any (KVM `search_memslots`); invalid slots included.
    #[inline]
    pub fn find(&self, gfn: Gfn) -> Option<&Memslot> {
        self.maps().by_gfn.last_at_or_below(gfn.0).filter(|s| s.contains(gfn))
    }

    /// The visible slot holding `gfn` (not being deleted or moved), trying `near` first: a slot
    /// an earlier call on this same set returned, for a caller whose lookups nearly always stay
    /// in one slot (a fault's gPTE reads, a prefetch group's runs). Unlike
    /// [`Self::find_cached`], no generation check: the hint comes from this set.
    #[inline]
    pub(crate) fn find_visible_near<'a>(
        &'a self,
        gfn: Gfn,
        near: Option<&'a Memslot>,
    ) -> Option<&'a Memslot> {
        match near {
            Some(s) if s.contains(gfn) => Some(s),
            _ => self.find(gfn).filter(|s| !s.is_invalid()),
        }
    }

    /// [`Self::find`] through a per-reader last-used-slot cache validated by the full generation
    /// (KVM `kvm_vcpu_gfn_to_memslot`). Returns a copy of the slot.
    #[inline]
    pub fn find_cached(&self, gfn: Gfn, cache: &mut SlotCache) -> Option<Memslot> {
        let gen = self.generation();
        if let Some(s) = cache.lookup(gen, gfn) {
            return Some(s);
        }
        self.find_and_fill(gen, gfn, cache)
    }

    /// The miss path of [`Self::find_cached`], out of line so that the hit path inlines small.
    #[inline(never)]
    fn find_and_fill(&self, gen: Generation, gfn: Gfn, cache: &mut SlotCache) -> Option<Memslot> {
        let s = self.find(gfn).copied();
        cache.fill(gen, s);
        s
    }

    /// The slot with id `id`, if any (KVM `id_to_memslot`).
    pub fn get(&self, id: SlotId) -> Option<&Memslot> {
        self.maps().by_id.get(id.0).map(|e| &e.slot)
    }

    /// The dirty bitmap of slot `id` of this set, if it logs.
    pub fn dirty_bitmap(&self, id: SlotId) -> Option<&DirtyBitmap> {
        self.maps().by_id.get(id.0)?.dirty.as_deref()
    }

    /// KVM `mark_page_dirty_in_slot`: marks `gfn` in `slot`'s bitmap if the slot logs. `slot`
    /// is a copy from a lookup in this set; a copy that is not (one from an older set, of a slot
    /// that moved since) marks nothing, rather than the page at the same offset of where the
    /// slot is now. No lock, no allocation.
    #[inline]
    pub fn mark_page_dirty(&self, slot: &Memslot, gfn: Gfn) {
        // One lookup by id gives the set's own slot and its bitmap.
        let Some(e) = self.maps().by_id.get(slot.id().0) else { return };
        let own = &e.slot;
        if own.base_gfn() != slot.base_gfn() || !own.dirty_logging() || !own.contains(gfn) {
            return;
        }
        if let Some(b) = e.dirty.as_deref() {
            b.mark(gfn.raw() - own.base_gfn().raw());
        }
    }

    /// KVM `mark_page_dirty`: marks `gfn` in the log of the slot of this set that holds it, if
    /// any and if it logs (a lookup, then [`Self::mark_page_dirty`]).
    pub fn mark_gfn_dirty(&self, gfn: Gfn) {
        if let Some(slot) = self.find(gfn) {
            self.mark_page_dirty(slot, gfn);
        }
    }

    /// The slots meeting `[start, end)`, by base gfn (KVM `kvm_for_each_memslot_in_gfn_range`).
    pub fn iter_range(&self, start: Gfn, end: Gfn) -> impl Iterator<Item = &Memslot> + '_ {
        in_range(self.maps().by_gfn.iter_from(start.0), start, end)
    }

    /// All slots, by base gfn.
    pub fn iter(&self) -> impl Iterator<Item = &Memslot> + '_ {
        self.maps().by_gfn.iter()
    }

    /// The number of slots.
    pub fn len(&self) -> usize {
        self.maps().by_gfn.len()
    }

    /// Whether the set has no slot.
    pub fn is_empty(&self) -> bool {
        self.maps().by_gfn.len() == 0
    }

    /// Calls `f` with every slot whose host range meets `[start, end)`, by host start (KVM
    /// `kvm_for_each_memslot_in_hva_range`); invalid slots included.
    pub fn for_each_in_hva_range(&self, start: Hva, end: Hva, mut f: impl FnMut(&Memslot)) {
        let m = self.maps();
        m.by_hva.overlapping(start.raw(), end.raw(), &mut |id| {
            if let Some(e) = m.by_id.get(id.0) {
                f(&e.slot);
            }
        });
    }

    /// The lowest slot other than `id` meeting `[start, end)` (KVM
    /// `kvm_check_memslot_overlap`).
    /// Its search goes through the gfn index's finger (the place of the set's last edit).
    pub(crate) fn overlapping(&self, id: SlotId, start: Gfn, end: Gfn) -> Option<&Memslot> {
        in_range(self.maps().by_gfn.iter_from_edit(start.0), start, end).find(|s| s.id() != id)
    }

    /// What one [`Self::replace`] that installs `new` needs from the heap (room for one more
    /// slot in each index), allocated fallibly: `None` if the heap has no room. Changes nothing
    /// (a reader may be reading the set). The caller holds the slots lock.
    pub(crate) fn room_for(&self, new: &Memslot) -> Option<SetRoom> {
        if self.has_room_for(new) {
            return Some(SetRoom::NONE);
        }
        let m = self.maps();
        let parts = RoomParts {
            gfn: m.by_gfn.room(*new)?,
            id: m.by_id.room(new.id().0)?,
            hva: m.by_hva.room()?,
        };
        Some(SetRoom(Some(crate::heap::try_box(parts)?)))
    }

    /// Whether a [`Self::replace`] installing `new` allocates nothing already (the common case:
    /// the indexes keep spare blocks and room in their vectors).
    fn has_room_for(&self, new: &Memslot) -> bool {
        let m = self.maps();
        m.by_gfn.has_room() && m.by_id.has_room(new.id().0) && m.by_hva.has_room()
    }

    /// Takes `room` in, so that the next [`Self::replace`] installing the slot it was made for
    /// allocates nothing. Allocates nothing.
    ///
    /// # Safety
    /// As [`Self::replace`]'s.
    pub(crate) unsafe fn take_room(&self, room: SetRoom) {
        let Some(room) = room.0 else { return };
        self.maps.with_mut(|p| {
            // SAFETY: the caller guarantees exclusive access (see above).
            let m = unsafe { &mut *p };
            m.by_gfn.take_room(room.gfn);
            m.by_id.take_room(room.id);
            m.by_hva.take_room(room.hva);
        });
    }

    /// Removes `old` (if any), then inserts `new` (if any) with its dirty bitmap `bitmap` (KVM
    /// `kvm_replace_memslot`). `O(log n)` plus a block shift of at most 64 entries (none for a
    /// flags change, an invalidation or a move past no other slot); no copy of the set. Given
    /// room ([`Self::take_room`]) for the slot `new` installs, allocates nothing.
    ///
    /// # Safety
    /// No other thread may hold a reference into this set's maps: the set is not the published
    /// one of its address space, and a grace period has passed since it last was (or it never
    /// was). The caller holds the slots lock.
    pub(crate) unsafe fn replace(
        &self,
        old: Option<&Memslot>,
        new: Option<Memslot>,
        bitmap: Option<&TryArc<DirtyBitmap>>,
    ) {
        self.maps.with_mut(|p| {
            // SAFETY: the caller guarantees exclusive access (see above).
            let m = unsafe { &mut *p };
            // A move, a flags change and a slot's invalidation keep its id and host range: the
            // host-range index stays as it is (only creates and deletes change it).
            let same_host_range = match (old, new.as_ref()) {
                (Some(o), Some(n)) => o.id() == n.id() && hva_range(o) == hva_range(n),
                _ => false,
            };
            match (old, new) {
                (Some(o), Some(n)) => {
                    // A flags change or an invalidation overwrites the entry in place, and so
                    // does a move that passes no other slot.
                    let prev = m.by_gfn.rebase(o.base_gfn().0, n);
                    debug_assert_eq!(
                        prev.map(|p| p.id()),
                        Some(o.id()),
                        "replace of a missing slot"
                    );
                }
                (Some(o), None) => {
                    let prev = m.by_gfn.remove(o.base_gfn().0);
                    debug_assert_eq!(
                        prev.map(|p| p.id()),
                        Some(o.id()),
                        "replace of a missing slot"
                    );
                }
                (None, Some(n)) => {
                    let prev = m.by_gfn.insert(n);
                    debug_assert!(prev.is_none(), "replace would overlap a slot");
                }
                (None, None) => {}
            }
            if let Some(o) = old {
                if new.is_none_or(|n| n.id() != o.id()) {
                    m.by_id.remove(o.id().0);
                }
                if !same_host_range {
                    let indexed = m.by_hva.remove(o.id(), hva_range(o).0);
                    debug_assert!(indexed, "slot {:?} was not in the host-range index", o.id());
                }
            }
            if let Some(n) = new {
                debug_assert_eq!(n.dirty_logging(), bitmap.is_some(), "a logged slot has a bitmap");
                m.by_id.insert(IdEntry { slot: n, dirty: bitmap.cloned() });
                if !same_host_range {
                    let (hva_start, hva_end) = hva_range(&n);
                    m.by_hva.insert(n.id(), hva_start, hva_end);
                }
            }
            debug_assert_eq!(m.by_hva.len(), m.by_gfn.len(), "every slot in the host-range index");
            debug_assert!(
                new.is_none_or(|n| m.by_gfn.last_at_or_below(n.base_gfn().0) == Some(&n)),
                "the id table and the gfn index hold equal copies"
            );
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::types::{AsId, Hva};

    fn slot(id: u16, base: u64, n: u64) -> Memslot {
        Memslot::new(AsId(0), SlotId(id), Gfn(base), n, Hva(0), 0)
    }

    fn set_of(slots: &[Memslot]) -> MemslotSet {
        let s = MemslotSet::new(Generation::from_raw(0));
        for x in slots {
            // SAFETY: the set is local to this test.
            unsafe { s.replace(None, Some(*x), None) };
        }
        s
    }

    #[test]
    fn find_and_holes() {
        let s = set_of(&[slot(1, 0x10, 0x10), slot(2, 0x30, 1)]);
        assert_eq!(s.find(Gfn(0x10)).map(|x| x.id()), Some(SlotId(1)));
        assert_eq!(s.find(Gfn(0x1f)).map(|x| x.id()), Some(SlotId(1)));
        assert_eq!(s.find(Gfn(0x20)), None);
        assert_eq!(s.find(Gfn(0xf)), None);
        assert_eq!(s.find(Gfn(0x30)).map(|x| x.id()), Some(SlotId(2)));
        assert_eq!(s.find(Gfn(0x31)), None);
        assert_eq!(s.get(SlotId(2)).map(|x| x.base_gfn()), Some(Gfn(0x30)));
        assert!(s.get(SlotId(3)).is_none());
    }

    #[test]
    fn iter_range_includes_a_slot_starting_before() {
        let s = set_of(&[slot(1, 0x10, 0x10), slot(2, 0x30, 4), slot(3, 0x40, 4)]);
        let ids = |a: u64, b: u64| {
            s.iter_range(Gfn(a), Gfn(b)).map(|x| x.id().0).collect::<alloc::vec::Vec<_>>()
        };
        assert_eq!(ids(0x18, 0x31), [1, 2]);
        assert_eq!(ids(0x20, 0x30), [] as [u16; 0]);
        assert_eq!(ids(0x0, 0x100), [1, 2, 3]);
        assert_eq!(ids(0x33, 0x34), [2]);
        assert_eq!(ids(0x34, 0x34), [] as [u16; 0], "empty range");
        assert_eq!(ids(0x40, 0x30), [] as [u16; 0], "reversed range");
        assert_eq!(s.overlapping(SlotId(2), Gfn(0x30), Gfn(0x41)).map(|x| x.id()), Some(SlotId(3)));
        assert_eq!(s.overlapping(SlotId(2), Gfn(0x1f), Gfn(0x34)).map(|x| x.id()), Some(SlotId(1)));
        assert!(s.overlapping(SlotId(2), Gfn(0x20), Gfn(0x40)).is_none());
    }

    #[test]
    fn host_ranges_follow_replace() {
        let at = |id: u16, base: u64, n: u64, hva: u64| {
            Memslot::new(AsId(0), SlotId(id), Gfn(base), n, Hva(hva), 0)
        };
        let s = set_of(&[at(1, 0x10, 4, 0x10_0000), at(2, 0x20, 2, 0x10_2000)]);
        let ids = |a: u64, b: u64| {
            let mut v = alloc::vec::Vec::new();
            s.for_each_in_hva_range(Hva(a), Hva(b), |x| v.push(x.id().0));
            v
        };
        assert_eq!(ids(0x10_3000, 0x10_3001), [1, 2], "an alias over slot 1's last pages");
        assert_eq!(ids(0x10_4000, 0x20_0000), [] as [u16; 0]);
        let old = *s.get(SlotId(1)).unwrap();
        // SAFETY: local set.
        unsafe { s.replace(Some(&old), Some(at(1, 0x10, 4, 0x30_0000)), None) };
        assert_eq!(ids(0x10_0000, 0x10_4000), [2], "slot 1 left its old host range");
        assert_eq!(ids(0x30_3000, 0x30_4000), [1]);
        assert_eq!(ids(0x30_4000, 0x30_5000), [] as [u16; 0], "the end is exclusive");
    }

    #[test]
    fn replace_moves_and_removes() {
        let s = set_of(&[slot(1, 0x10, 4)]);
        let old = *s.get(SlotId(1)).unwrap();
        // SAFETY: local set.
        unsafe { s.replace(Some(&old), Some(slot(1, 0x100, 4)), None) };
        assert_eq!(s.find(Gfn(0x10)), None);
        assert_eq!(s.find(Gfn(0x103)).map(|x| x.id()), Some(SlotId(1)));
        let cur = *s.get(SlotId(1)).unwrap();
        // SAFETY: local set.
        unsafe { s.replace(Some(&cur), None, None) };
        assert!(s.is_empty() && s.get(SlotId(1)).is_none());
    }

    #[test]
    fn cache_is_validated_by_generation() {
        let s = set_of(&[slot(1, 0x10, 4)]);
        let mut c = SlotCache::new();
        assert_eq!(s.find_cached(Gfn(0x11), &mut c).map(|x| x.id()), Some(SlotId(1)));
        assert_eq!((c.hits(), c.misses()), (0, 1));
        assert!(s.find_cached(Gfn(0x12), &mut c).is_some());
        assert_eq!(c.hits(), 1);
        // Same gfn, new generation: the cache must not answer.
        s.store_generation(Generation::from_raw(2), Ordering::Relaxed);
        assert!(s.find_cached(Gfn(0x12), &mut c).is_some());
        assert_eq!((c.hits(), c.misses()), (1, 2));
        // A gfn outside the cached slot is a miss, and a hole is not cached.
        assert!(s.find_cached(Gfn(0x20), &mut c).is_none());
        assert_eq!(c.misses(), 3);
    }
}
