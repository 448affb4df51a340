//! A plain memslot table with KVM's update rules, for the reference MMU and for computing what
//! map each step of a memslot schedule leaves in force.
//!
//! It mirrors `KVM_SET_USER_MEMORY_REGION` on one address space: the checks of facts §5.3 in
//! KVM's order (those that apply to a VM without guest_memfd or private memory), then CREATE /
//! DELETE / MOVE / FLAGS_ONLY. It is deliberately simple (a sorted `Vec`, no generations, no
//! invalid-slot step): the real implementation is the core's `memslot` module; this one is the
//! yardstick the machine's tests use.

use crate::seam::SlotRequest;
use vmmu::types::{Gfn, PAGE_OFFSET_MASK, PAGE_SHIFT};

/// User slot ids are below this (x86: 32767 minus 3 internal slots).
pub const USER_MEM_SLOTS: u32 = 32764;
/// The largest slot in pages (`KVM_MEM_MAX_NR_PAGES`).
pub const MAX_NR_PAGES: u64 = (1 << 31) - 1;

/// One memslot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// The slot id (address space 0).
    pub id: u16,
    /// First guest frame.
    pub base_gfn: Gfn,
    /// Pages.
    pub npages: u64,
    /// Host-virtual address of the first page.
    pub userspace_addr: u64,
    /// `KVM_MEM_*` flags.
    pub flags: u32,
}

impl Slot {
    /// Whether `gfn` is in the slot.
    pub fn contains(&self, gfn: Gfn) -> bool {
        gfn.0.wrapping_sub(self.base_gfn.0) < self.npages
    }
    /// Whether the slot is read-only for the guest.
    pub fn readonly(&self) -> bool {
        self.flags & SlotRequest::READONLY != 0
    }
    /// The host-virtual address backing guest address `gpa` (which must be in the slot).
    pub fn hva(&self, gpa: u64) -> u64 {
        self.userspace_addr + (gpa - (self.base_gfn.0 << PAGE_SHIFT))
    }
    fn end_gfn(&self) -> u64 {
        self.base_gfn.0 + self.npages
    }
}

/// The slots of one address space, sorted by `base_gfn`, never overlapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotTable {
    slots: Vec<Slot>,
    max_gfn: u64,
}

impl SlotTable {
    /// An empty table whose slots must end at or below gfn `max_gfn` (KVM x86 with TDP:
    /// `2^(phys_bits - 12)`).
    pub fn new(max_gfn: u64) -> SlotTable {
        SlotTable { slots: Vec::new(), max_gfn }
    }

    /// The slots, sorted by base gfn.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// The slot containing `gfn`. O(log n).
    pub fn lookup(&self, gfn: Gfn) -> Option<&Slot> {
        let i = self.slots.partition_point(|s| s.base_gfn <= gfn);
        self.slots.get(i.checked_sub(1)?).filter(|s| s.contains(gfn))
    }

    /// Applies `r` with KVM's checks; the error is the errno name.
    pub fn apply(&mut self, r: &SlotRequest) -> Result<(), &'static str> {
        let as_id = r.slot >> 16;
        let id = r.slot as u16;
        if u32::from(id) >= USER_MEM_SLOTS {
            return Err("EINVAL");
        }
        if r.flags & !(SlotRequest::LOG_DIRTY_PAGES | SlotRequest::READONLY) != 0 {
            return Err("EINVAL");
        }
        if r.memory_size & PAGE_OFFSET_MASK != 0
            || r.guest_phys_addr & PAGE_OFFSET_MASK != 0
            || r.userspace_addr & PAGE_OFFSET_MASK != 0
        {
            return Err("EINVAL");
        }
        if r.memory_size != 0 && r.userspace_addr.checked_add(r.memory_size).is_none() {
            return Err("EINVAL");
        }
        if as_id != 0 {
            return Err("EINVAL");
        }
        if r.guest_phys_addr.checked_add(r.memory_size).is_none() {
            return Err("EINVAL");
        }
        let npages = r.memory_size >> PAGE_SHIFT;
        if npages > MAX_NR_PAGES {
            return Err("EINVAL");
        }
        let old = self.slots.iter().position(|s| s.id == id);
        if npages == 0 {
            let i = old.ok_or("EINVAL")?;
            self.slots.remove(i);
            return Ok(());
        }
        let new = Slot {
            id,
            base_gfn: Gfn(r.guest_phys_addr >> PAGE_SHIFT),
            npages,
            userspace_addr: r.userspace_addr,
            flags: r.flags,
        };
        if let Some(i) = old {
            let o = self.slots[i];
            if o.userspace_addr != new.userspace_addr
                || o.npages != new.npages
                || o.readonly() != new.readonly()
            {
                return Err("EINVAL");
            }
            if o.base_gfn == new.base_gfn {
                // FLAGS_ONLY or a no-op: nothing the guest can see changes here.
                self.slots[i].flags = new.flags;
                return Ok(());
            }
        }
        if self
            .slots
            .iter()
            .any(|s| s.id != id && s.base_gfn.0 < new.end_gfn() && new.base_gfn.0 < s.end_gfn())
        {
            return Err("EEXIST");
        }
        if new.end_gfn() > self.max_gfn {
            return Err("EINVAL");
        }
        if let Some(i) = old {
            self.slots.remove(i);
        }
        let at = self.slots.partition_point(|s| s.base_gfn < new.base_gfn);
        self.slots.insert(at, new);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(slot: u32, gpa: u64, size: u64, uaddr: u64, flags: u32) -> SlotRequest {
        SlotRequest { slot, flags, guest_phys_addr: gpa, memory_size: size, userspace_addr: uaddr }
    }

    #[test]
    fn create_lookup_move_delete() {
        let mut t = SlotTable::new(1 << 24);
        t.apply(&req(1, 0x10_0000, 0x2000, 0x7000_0000, 0)).expect("create");
        assert_eq!(t.lookup(Gfn(0x101)).map(|s| s.id), Some(1));
        assert_eq!(t.lookup(Gfn(0x102)), None);
        t.apply(&req(1, 0x20_0000, 0x2000, 0x7000_0000, 0)).expect("move");
        assert_eq!(t.lookup(Gfn(0x100)), None);
        assert_eq!(t.lookup(Gfn(0x200)).map(|s| s.hva(0x20_0010)), Some(0x7000_0010));
        t.apply(&SlotRequest::delete(1)).expect("delete");
        assert!(t.slots().is_empty());
    }

    #[test]
    fn errors_follow_kvm() {
        let mut t = SlotTable::new(1 << 24);
        t.apply(&req(1, 0x10_0000, 0x2000, 0x7000_0000, 0)).expect("create");
        let cases = [
            (req(USER_MEM_SLOTS, 0x40_0000, 0x1000, 0x1000, 0), "EINVAL"),
            (req(2, 0x40_0000, 0x1000, 0x1000, 1 << 2), "EINVAL"),
            (req(2, 0x40_0000, 0x1001, 0x1000, 0), "EINVAL"),
            (req(2, 0x40_0800, 0x1000, 0x1000, 0), "EINVAL"),
            (req(2, 0x40_0000, 0x1000, 0x1800, 0), "EINVAL"),
            (req(0x1_0002, 0x40_0000, 0x1000, 0x1000, 0), "EINVAL"),
            (SlotRequest::delete(7), "EINVAL"),
            (req(2, 0x10_1000, 0x1000, 0x1000, 0), "EEXIST"),
            (req(1, 0x10_0000, 0x2000, 0x8000_0000, 0), "EINVAL"),
            (req(1, 0x10_0000, 0x2000, 0x7000_0000, SlotRequest::READONLY), "EINVAL"),
            (req(2, (1 << 36) - 0x1000, 0x2000, 0x1000, 0), "EINVAL"),
        ];
        for (r, want) in cases {
            assert_eq!(t.apply(&r), Err(want), "{r:?}");
        }
        assert_eq!(t.slots().len(), 1, "failed requests change nothing");
        t.apply(&req(1, 0x10_0000, 0x2000, 0x7000_0000, SlotRequest::LOG_DIRTY_PAGES))
            .expect("flags only");
        assert_eq!(t.slots()[0].flags, SlotRequest::LOG_DIRTY_PAGES);
    }
}
