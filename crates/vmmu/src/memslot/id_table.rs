//! The slots of one memslot set by slot id (KVM's `id_hash`), with each logging slot's dirty
//! bitmap: `id_to_memslot` in `O(1)`, for every update (which reads the old slot), every host
//! invalidation (which maps the ids an hva query finds to slots) and every dirty-log call.
//!
//! Layout: a directory of pages of [`PAGE`] entries, indexed by `id / PAGE`; a page exists only
//! while one of its ids is in use, so a VM with a few slots holds a page or two, and one with
//! KVM's 32764 holds 512 (48 bytes an entry). The directory grows to the highest page in use
//! and never shrinks (at most 1024 pointers for `u16` ids).
//!
//! A page that empties is kept as the one spare, the next page to be needed: a slot deleted
//! and created again (a VMM's remap) allocates nothing. An insert given room
//! ([`IdTable::room`], made fallibly before a memslot update publishes anything) allocates
//! nothing either.
//!
//! Invariants: `used[p]` is the number of `Some` entries of page `p`, and a page is allocated
//! iff that number is non-zero; the spare page has no entry. Each entry's slot has that id. Only `MemslotSet::replace` edits
//! the table, on a set no reader can reach; lookups take `&self` and allocate nothing.

use super::slot::Memslot;
use crate::dirty::DirtyBitmap;
use crate::heap::TryArc;
use alloc::boxed::Box;
use alloc::vec::Vec;

/// Entries a page holds.
const PAGE: usize = 64;

/// One slot and, if it logs, its dirty bitmap (KVM `memslot->dirty_bitmap`).
#[derive(Clone, Debug)]
pub(crate) struct IdEntry {
    pub(crate) slot: Memslot,
    pub(crate) dirty: Option<TryArc<DirtyBitmap>>,
}

type Page = [Option<IdEntry>; PAGE];

/// Slots by id (see the module doc).
#[derive(Default, Debug)]
pub(crate) struct IdTable {
    pages: Vec<Option<Box<Page>>>,
    used: Vec<u8>,
    spare: Option<Box<Page>>,
}

/// The page and position of `id`.
#[inline]
fn split(id: u16) -> (usize, usize) {
    (usize::from(id) / PAGE, usize::from(id) % PAGE)
}

/// What an insert of one id into an [`IdTable`] needs from the heap, made ahead of time
/// ([`IdTable::room`]) and handed over without allocating ([`IdTable::take_room`]).
pub(crate) struct IdRoom {
    page: Option<Box<Page>>,
    pages: Option<Vec<Option<Box<Page>>>>,
    used: Option<Vec<u8>>,
}

impl IdTable {
    /// Bytes of a page of entries.
    pub(crate) const PAGE_BYTES: usize = core::mem::size_of::<Page>();

    /// What an insert of slot `id` needs that the table lacks, allocated fallibly (`None`: the
    /// heap has no room). Changes nothing: a reader may be reading the table meanwhile.
    pub(crate) fn room(&self, id: u16) -> Option<IdRoom> {
        let (more, page_ready) = self.wants(id);
        let page = match page_ready {
            true => None,
            false => Some(crate::heap::try_box([const { None }; PAGE])?),
        };
        Some(IdRoom {
            page,
            pages: crate::heap::vec_room(&self.pages, more)?,
            used: crate::heap::vec_room(&self.used, more)?,
        })
    }

    /// Whether an insert of slot `id` allocates nothing already (then [`Self::room`] would make
    /// nothing).
    pub(crate) fn has_room(&self, id: u16) -> bool {
        use crate::heap::has_vec_room;
        let (more, page_ready) = self.wants(id);
        page_ready && has_vec_room(&self.pages, more) && has_vec_room(&self.used, more)
    }

    /// What an insert of slot `id` needs: how many more entries the page vectors get, and
    /// whether a page is there for it (its own or the spare).
    fn wants(&self, id: u16) -> (usize, bool) {
        let (p, _) = split(id);
        let more = (p + 1).saturating_sub(self.pages.len());
        (more, self.pages.get(p).is_some_and(Option::is_some) || self.spare.is_some())
    }

    /// Takes `room` in: the insert it was made for allocates nothing. Allocates nothing.
    pub(crate) fn take_room(&mut self, room: IdRoom) {
        if self.spare.is_none() {
            self.spare = room.page;
        }
        crate::heap::take_vec_room(&mut self.pages, room.pages);
        crate::heap::take_vec_room(&mut self.used, room.used);
    }

    /// The entry of slot `id`, if it exists.
    #[inline]
    pub(crate) fn get(&self, id: u16) -> Option<&IdEntry> {
        let (p, i) = split(id);
        self.pages.get(p)?.as_ref()?[i].as_ref()
    }

    /// Sets the entry of `e.slot`'s id; returns the one it replaced, if any.
    pub(crate) fn insert(&mut self, e: IdEntry) -> Option<IdEntry> {
        let (p, i) = split(e.slot.id().0);
        if self.pages.len() <= p {
            self.pages.resize_with(p + 1, || None);
            self.used.resize(p + 1, 0);
        }
        let spare = &mut self.spare;
        let page = self.pages[p].get_or_insert_with(|| {
            spare.take().unwrap_or_else(|| Box::new([const { None }; PAGE]))
        });
        let prev = page[i].replace(e);
        if prev.is_none() {
            self.used[p] += 1;
        }
        prev
    }

    /// Removes the entry of slot `id`; returns it, if it existed.
    pub(crate) fn remove(&mut self, id: u16) -> Option<IdEntry> {
        let (p, i) = split(id);
        let prev = self.pages.get_mut(p)?.as_mut()?[i].take()?;
        self.used[p] -= 1;
        if self.used[p] == 0 {
            self.spare = self.pages[p].take();
        }
        Some(prev)
    }

    /// Panics unless the invariants of the module doc hold; returns the number of entries.
    #[cfg(test)]
    pub(crate) fn check(&self) -> usize {
        assert_eq!(self.pages.len(), self.used.len());
        assert!(self.spare.as_ref().is_none_or(|p| p.iter().all(Option::is_none)));
        let mut n = 0;
        for (p, (page, used)) in self.pages.iter().zip(&self.used).enumerate() {
            let Some(page) = page else {
                assert_eq!(*used, 0);
                continue;
            };
            let mut count = 0;
            for (i, e) in page.iter().enumerate() {
                if let Some(e) = e {
                    assert_eq!(usize::from(e.slot.id().0), p * PAGE + i);
                    count += 1;
                }
            }
            assert!(count > 0 && count == usize::from(*used));
            n += count;
        }
        n
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::types::{AsId, Gfn, Hva, SlotId};
    use alloc::collections::BTreeMap;
    use proptest::prelude::*;

    fn entry(id: u16, base: u64) -> IdEntry {
        IdEntry { slot: Memslot::new(AsId(0), SlotId(id), Gfn(base), 1, Hva(0), 0), dirty: None }
    }

    /// Given its room, an insert allocates nothing: a page it needs is the spare, and the page
    /// vectors do not grow (their buffers stay where they were), for ids across many pages.
    #[test]
    fn an_insert_given_room_uses_the_spare_and_keeps_the_buffers() {
        let mut t = IdTable::default();
        for id in [0u16, 63, 64, 5000, 200, 32763, 32700, 1] {
            assert_eq!(t.has_room(id), id == 63 || id == 1, "{id}");
            let room = t.room(id).expect("heap");
            t.take_room(room);
            assert!(t.has_room(id), "{id}");
            let page = t.pages.get(usize::from(id) / PAGE).and_then(|p| p.as_deref());
            let page = page.or(t.spare.as_deref()).map(|p| p as *const Page).expect("a page");
            let bufs = (t.pages.as_ptr(), t.used.as_ptr());
            assert!(t.insert(entry(id, 7)).is_none());
            assert_eq!((t.pages.as_ptr(), t.used.as_ptr()), bufs, "{id}");
            let now = t.pages[usize::from(id) / PAGE].as_deref().map(|p| p as *const Page);
            assert_eq!(now, Some(page), "{id}");
        }
        assert_eq!(t.check(), 8);
    }

    #[test]
    fn pages_come_and_go_with_their_ids() {
        let mut t = IdTable::default();
        assert!(t.get(32763).is_none() && t.remove(32763).is_none());
        assert!(t.insert(entry(32763, 7)).is_none());
        assert_eq!(t.get(32763).map(|e| e.slot.base_gfn()), Some(Gfn(7)));
        assert_eq!(t.insert(entry(32763, 9)).map(|e| e.slot.base_gfn()), Some(Gfn(7)));
        assert_eq!(t.check(), 1);
        assert!(t.get(32762).is_none() && t.get(0).is_none());
        assert_eq!(t.remove(32763).map(|e| e.slot.base_gfn()), Some(Gfn(9)));
        assert_eq!(t.check(), 0);
        assert!(t.pages.iter().all(Option::is_none), "an unused page is freed");
        let spare: *const Page = &**t.spare.as_ref().expect("kept as the spare");
        t.insert(entry(5, 1));
        assert!(t.spare.is_none());
        assert!(core::ptr::eq(&**t.pages[0].as_ref().unwrap(), spare), "the spare is reused");
    }

    proptest! {
        #[test]
        fn agrees_with_a_btreemap(ops in proptest::collection::vec(
            (any::<bool>(), prop_oneof![0u16..200, any::<u16>()], any::<u64>()), 1..400)) {
            let mut t = IdTable::default();
            let mut model = BTreeMap::new();
            for (ins, id, base) in ops {
                if ins {
                    let prev = t.insert(entry(id, base)).map(|e| e.slot.base_gfn().0);
                    prop_assert_eq!(prev, model.insert(id, base));
                } else {
                    let prev = t.remove(id).map(|e| e.slot.base_gfn().0);
                    prop_assert_eq!(prev, model.remove(&id));
                }
                prop_assert_eq!(t.check(), model.len());
                prop_assert_eq!(t.get(id).map(|e| e.slot.base_gfn().0), model.get(&id).copied());
            }
        }
    }
}
