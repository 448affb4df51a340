//! Per-slot metadata that needs memory: the dirty bitmap of a `LOG_DIRTY_PAGES` slot. It is
//! the one allocation whose failure `set_memory_region` reports as `ENOMEM` (facts §5.3): its
//! words, its shared handle ([`TryArc`]) and its entry here are all allocated fallibly.
//!
//! Invariants: a slot has a bitmap iff its `LOG_DIRTY_PAGES` flag is set; `bytes` is the sum of
//! the bitmaps' sizes (allocated ones, including one held by an update in flight) and never
//! exceeds `limit`. Lives under the slots lock.
//!
//! Sizes follow KVM: `ALIGN(npages, 64) / 8` bytes per bitmap, counted twice over
//! (`kvm_alloc_dirty_bitmap` takes a second buffer for `KVM_GET_DIRTY_LOG`; here the second
//! buffer is the `Vec` a collection returns, so the budget stays KVM's).
//!
//! The bitmap itself ([`DirtyBitmap`]) is shared: this table holds one reference for the slots
//! lock holder (dirty-log ioctls, accounting), and each memslot set that holds the slot holds
//! another, for faults that mark pages from inside a read section.

use super::region::MemslotError;
use crate::dirty::DirtyBitmap;
use crate::hash::KeyMap;
use crate::heap::TryArc;

/// Bytes counted for a bitmap of `npages` pages (both of KVM's buffers).
fn counted_bytes(b: &DirtyBitmap) -> u64 {
    SlotMetadata::bitmap_bytes(b.npages())
}

/// The map key of slot `(as_id, id)`.
fn key((as_id, id): (u16, u16)) -> u32 {
    (u32::from(as_id) << 16) | u32::from(id)
}

/// The bitmaps of all slots, by `(as_id, id)`, and their memory budget.
#[derive(Debug)]
pub(crate) struct SlotMetadata {
    /// By [`key`]; room for one more is reserved by each [`Self::alloc_bitmap`], so that
    /// [`Self::install`] cannot run out of heap.
    bitmaps: KeyMap<u32, TryArc<DirtyBitmap>>,
    bytes: u64,
    limit: Option<u64>,
}

impl SlotMetadata {
    pub(crate) fn new(limit: Option<u64>) -> Self {
        SlotMetadata { bitmaps: KeyMap::default(), bytes: 0, limit }
    }

    /// Bytes of a bitmap for `npages` pages.
    pub(crate) fn bitmap_bytes(npages: u64) -> u64 {
        2 * npages.div_ceil(64) * 8
    }

    /// Allocates a zeroed bitmap for `npages` pages, counted against the budget, and room to
    /// install it. Every allocation is fallible: out of heap, `ENOMEM`, as KVM's `kvzalloc`
    /// failure.
    pub(crate) fn alloc_bitmap(
        &mut self,
        npages: u64,
    ) -> Result<TryArc<DirtyBitmap>, MemslotError> {
        let bytes = Self::bitmap_bytes(npages);
        let oom = MemslotError::OutOfMemory { bytes };
        if self.limit.is_some_and(|l| self.bytes.saturating_add(bytes) > l) {
            return Err(oom);
        }
        self.bitmaps.try_reserve(1).map_err(|_| oom)?;
        let b = DirtyBitmap::try_new(npages).ok_or(oom)?;
        let b = TryArc::try_new(b).ok_or(oom)?;
        self.bytes += bytes;
        Ok(b)
    }

    /// Gives back a bitmap that was never installed.
    pub(crate) fn release(&mut self, b: TryArc<DirtyBitmap>) {
        self.bytes -= counted_bytes(&b);
    }

    /// Installs the bitmap of slot `key` (into the room its [`Self::alloc_bitmap`] reserved).
    pub(crate) fn install(&mut self, key: (u16, u16), b: TryArc<DirtyBitmap>) {
        if let Some(old) = self.bitmaps.insert(self::key(key), b) {
            debug_assert!(false, "slot {key:?} already had a bitmap");
            self.release(old);
        }
    }

    /// Frees the bitmap of slot `key`, if it has one.
    pub(crate) fn free(&mut self, key: (u16, u16)) {
        if let Some(b) = self.bitmaps.remove(&self::key(key)) {
            self.release(b);
        }
    }

    /// The size of slot `key`'s bitmap, if it has one.
    pub(crate) fn bitmap_of(&self, key: (u16, u16)) -> Option<u64> {
        self.bitmaps.get(&self::key(key)).map(|b| counted_bytes(b))
    }

    /// The bitmap of slot `key`, if it has one.
    pub(crate) fn get(&self, key: (u16, u16)) -> Option<&TryArc<DirtyBitmap>> {
        self.bitmaps.get(&self::key(key))
    }

    /// Bytes allocated now.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_enforced_and_given_back() {
        let mut m = SlotMetadata::new(Some(64));
        assert_eq!(SlotMetadata::bitmap_bytes(1), 16);
        assert_eq!(SlotMetadata::bitmap_bytes(129), 48);
        let a = m.alloc_bitmap(128).unwrap(); // 32 bytes
        m.install((0, 1), a);
        let b = m.alloc_bitmap(128).unwrap(); // 64 total
        assert_eq!(m.bytes(), 64);
        assert_eq!(m.alloc_bitmap(1).unwrap_err().errno(), "ENOMEM");
        m.release(b);
        m.free((0, 1));
        assert_eq!(m.bytes(), 0);
        assert!(m.bitmap_of((0, 1)).is_none());
    }
}
