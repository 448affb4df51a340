//! One memslot (KVM's `struct kvm_memory_slot`, without its metadata): a run of guest frames
//! backed by a run of host-virtual pages.
//!
//! Invariants: `npages >= 1` (a slot with no pages does not exist), `base_gfn + npages` does not
//! overflow, and `userspace_addr` is page aligned. The value is `Copy` and small (32 bytes), so
//! a per-vCPU cache holds a copy, not a reference into a set. The dirty bitmap (KVM keeps it in
//! the slot) lives with the slot metadata in [`super::Memslots`], under the slots lock.

use super::region::{KVM_MEMSLOT_INVALID, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use crate::types::{AsId, Gfn, Hva, SlotId, PAGE_SHIFT};

/// A memslot.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Memslot {
    base_gfn: Gfn,
    npages: u64,
    userspace_addr: Hva,
    flags: u32,
    id: SlotId,
    as_id: AsId,
}

impl Memslot {
    /// A slot; the caller has validated the request.
    pub(crate) fn new(
        as_id: AsId,
        id: SlotId,
        base_gfn: Gfn,
        npages: u64,
        userspace_addr: Hva,
        flags: u32,
    ) -> Self {
        debug_assert!(npages >= 1, "a memslot has at least one page");
        debug_assert!(base_gfn.checked_add(npages).is_some());
        debug_assert!(userspace_addr.is_page_aligned());
        Memslot { base_gfn, npages, userspace_addr, flags, id, as_id }
    }

    /// This slot marked `KVM_MEMSLOT_INVALID` (being deleted or moved).
    pub(crate) fn invalidated(mut self) -> Self {
        self.flags |= KVM_MEMSLOT_INVALID;
        self
    }

    /// The slot id within its address space.
    #[inline]
    pub const fn id(&self) -> SlotId {
        self.id
    }
    /// The address space.
    #[inline]
    pub const fn as_id(&self) -> AsId {
        self.as_id
    }
    /// The first guest frame.
    #[inline]
    pub const fn base_gfn(&self) -> Gfn {
        self.base_gfn
    }
    /// The number of 4 KiB pages.
    #[inline]
    pub const fn npages(&self) -> u64 {
        self.npages
    }
    /// One past the last guest frame.
    #[inline]
    pub const fn end_gfn(&self) -> Gfn {
        Gfn(self.base_gfn.0 + self.npages)
    }
    /// Whether `gfn` lies in the slot.
    #[inline]
    pub const fn contains(&self, gfn: Gfn) -> bool {
        gfn.0 >= self.base_gfn.0 && gfn.0 - self.base_gfn.0 < self.npages
    }
    /// The first host-virtual byte.
    #[inline]
    pub const fn userspace_addr(&self) -> Hva {
        self.userspace_addr
    }
    /// One past the last host-virtual byte.
    #[inline]
    pub const fn end_hva(&self) -> Hva {
        Hva(self.userspace_addr.0 + (self.npages << PAGE_SHIFT))
    }
    /// The host-virtual address of `gfn`'s first byte (KVM `__gfn_to_hva_memslot`). `gfn` must
    /// lie in the slot (checked in debug builds).
    #[inline]
    pub const fn hva_of(&self, gfn: Gfn) -> Hva {
        debug_assert!(self.contains(gfn));
        Hva(self.userspace_addr.0 + ((gfn.0 - self.base_gfn.0) << PAGE_SHIFT))
    }
    /// The flags: user `KVM_MEM_*` bits, plus `KVM_MEMSLOT_INVALID` (bit 16) while invalid.
    #[inline]
    pub const fn flags(&self) -> u32 {
        self.flags
    }
    /// The user flags only (bits 0..16).
    #[inline]
    pub const fn user_flags(&self) -> u32 {
        self.flags & 0xffff
    }
    /// Whether guest writes must exit as MMIO (`KVM_MEM_READONLY`).
    #[inline]
    pub const fn is_readonly(&self) -> bool {
        self.flags & KVM_MEM_READONLY != 0
    }
    /// Whether writes are tracked in the dirty bitmap (`KVM_MEM_LOG_DIRTY_PAGES`).
    #[inline]
    pub const fn dirty_logging(&self) -> bool {
        self.flags & KVM_MEM_LOG_DIRTY_PAGES != 0
    }
    /// Whether the slot is being deleted or moved (`KVM_MEMSLOT_INVALID`): a fault on it must
    /// retry, never become MMIO (facts §8 item 9).
    #[inline]
    pub const fn is_invalid(&self) -> bool {
        self.flags & KVM_MEMSLOT_INVALID != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry() {
        let s = Memslot::new(AsId(0), SlotId(3), Gfn(0x100), 0x10, Hva(0x7000_0000), 0);
        assert!(s.contains(Gfn(0x100)) && s.contains(Gfn(0x10f)));
        assert!(!s.contains(Gfn(0xff)) && !s.contains(Gfn(0x110)));
        assert_eq!(s.end_gfn(), Gfn(0x110));
        assert_eq!(s.hva_of(Gfn(0x102)), Hva(0x7000_2000));
        assert!(!s.is_invalid());
        let i = s.invalidated();
        assert!(i.is_invalid() && i.user_flags() == 0);
    }

    #[test]
    fn flags() {
        let s = Memslot::new(AsId(1), SlotId(0), Gfn(0), 1, Hva(0), 3);
        assert!(s.is_readonly() && s.dirty_logging());
    }
}
