//! Per-slot metadata that needs memory: the dirty bitmap of a `LOG_DIRTY_PAGES` slot. It is
//! the one allocation whose failure `set_memory_region` reports as `ENOMEM` (facts §5.3).
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
use crate::sync::Arc;
use alloc::collections::BTreeMap;

/// Bytes counted for a bitmap of `npages` pages (both of KVM's buffers).
fn counted_bytes(b: &DirtyBitmap) -> u64 {
    SlotMetadata::bitmap_bytes(b.npages())
}

/// The bitmaps of all slots, by `(as_id, id)`, and their memory budget.
#[derive(Debug)]
pub(crate) struct SlotMetadata {
    bitmaps: BTreeMap<(u16, u16), Arc<DirtyBitmap>>,
    bytes: u64,
    limit: Option<u64>,
}

impl SlotMetadata {
    pub(crate) fn new(limit: Option<u64>) -> Self {
        SlotMetadata { bitmaps: BTreeMap::new(), bytes: 0, limit }
    }

    /// Bytes of a bitmap for `npages` pages.
    pub(crate) fn bitmap_bytes(npages: u64) -> u64 {
        2 * npages.div_ceil(64) * 8
    }

    /// Allocates a zeroed bitmap for `npages` pages, counted against the budget.
    pub(crate) fn alloc_bitmap(&mut self, npages: u64) -> Result<Arc<DirtyBitmap>, MemslotError> {
        let bytes = Self::bitmap_bytes(npages);
        let oom = MemslotError::OutOfMemory { bytes };
        if self.limit.is_some_and(|l| self.bytes.saturating_add(bytes) > l) {
            return Err(oom);
        }
        let b = DirtyBitmap::try_new(npages).ok_or(oom)?;
        self.bytes += bytes;
        Ok(Arc::new(b))
    }

    /// Gives back a bitmap that was never installed.
    pub(crate) fn release(&mut self, b: Arc<DirtyBitmap>) {
        self.bytes -= counted_bytes(&b);
    }

    /// Installs the bitmap of slot `key`.
    pub(crate) fn install(&mut self, key: (u16, u16), b: Arc<DirtyBitmap>) {
        if let Some(old) = self.bitmaps.insert(key, b) {
            debug_assert!(false, "slot {key:?} already had a bitmap");
            self.release(old);
        }
    }

    /// Frees the bitmap of slot `key`, if it has one.
    pub(crate) fn free(&mut self, key: (u16, u16)) {
        if let Some(b) = self.bitmaps.remove(&key) {
            self.release(b);
        }
    }

    /// The size of slot `key`'s bitmap, if it has one.
    pub(crate) fn bitmap_of(&self, key: (u16, u16)) -> Option<u64> {
        self.bitmaps.get(&key).map(|b| counted_bytes(b))
    }

    /// The bitmap of slot `key`, if it has one.
    pub(crate) fn get(&self, key: (u16, u16)) -> Option<&Arc<DirtyBitmap>> {
        self.bitmaps.get(&key)
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
