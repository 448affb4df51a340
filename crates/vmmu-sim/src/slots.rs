//! A plain memslot table for the reference MMU and for computing what map each step of a
//! memslot schedule leaves in force.
//!
//! One copy of KVM's rules: every request goes through the core's
//! [`vmmu::memslot::Memslots::set_memory_region`] (KVM's checks in KVM's order, with no MMU
//! hooks), and the table mirrors the change the core made (create, delete, move, flags only) in a
//! sorted `Vec` that is cheap to clone and compare. It models one address space (as_id 1 is
//! refused, as by a VM without SMM).

use crate::seam::SlotRequest;
use core::fmt;
use vmmu::memslot::{MemslotChange, MemslotError, Memslots, MemslotsConfig, NoHooks};
use vmmu::types::{Gfn, SlotId, PAGE_SHIFT};

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
    fn request(&self) -> SlotRequest {
        SlotRequest {
            slot: u32::from(self.id),
            flags: self.flags,
            guest_phys_addr: self.base_gfn.0 << PAGE_SHIFT,
            memory_size: self.npages << PAGE_SHIFT,
            userspace_addr: self.userspace_addr,
        }
    }
}

/// The slots of one address space, sorted by `base_gfn`, never overlapping, with the core's
/// memslots as the judge of every request.
pub struct SlotTable {
    slots: Vec<Slot>,
    phys_bits: u8,
    rules: Memslots,
}

impl SlotTable {
    /// An empty table for an MMU that maps guest-physical addresses below `2^phys_bits` (KVM x86
    /// with TDP: the host MAXPHYADDR; clamped to the core's 13..=64).
    pub fn new(phys_bits: u8) -> SlotTable {
        let phys_bits = phys_bits.clamp(13, 64);
        let rules = Memslots::new(MemslotsConfig {
            nr_address_spaces: 1,
            max_gpa_bits: phys_bits,
            max_readers: 1,
            ..MemslotsConfig::default()
        });
        SlotTable { slots: Vec::new(), phys_bits, rules }
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

    /// Applies `r` with KVM's checks (the core's); the error names the rule broken.
    pub fn apply(&mut self, r: &SlotRequest) -> Result<(), MemslotError> {
        let change = self.rules.set_memory_region(&r.region(), &NoHooks)?;
        let (_, SlotId(id)) = SlotId::split(r.slot);
        let new = Slot {
            id,
            base_gfn: Gfn(r.guest_phys_addr >> PAGE_SHIFT),
            npages: r.memory_size >> PAGE_SHIFT,
            userspace_addr: r.userspace_addr,
            flags: r.flags,
        };
        match change {
            MemslotChange::NoOp => {}
            MemslotChange::FlagsOnly => {
                if let Some(s) = self.slots.iter_mut().find(|s| s.id == id) {
                    s.flags = new.flags;
                }
            }
            MemslotChange::Delete => self.slots.retain(|s| s.id != id),
            MemslotChange::Create | MemslotChange::Move => {
                self.slots.retain(|s| s.id != id);
                let at = self.slots.partition_point(|s| s.base_gfn < new.base_gfn);
                self.slots.insert(at, new);
            }
        }
        Ok(())
    }
}

impl Clone for SlotTable {
    /// The same slots, judged by fresh core memslots that hold them too (created in gfn order:
    /// slots never overlap, so every create is accepted).
    fn clone(&self) -> SlotTable {
        let mut t = SlotTable::new(self.phys_bits);
        for s in &self.slots {
            let r = s.request();
            let accepted = t.apply(&r);
            debug_assert_eq!(accepted, Ok(()), "re-creating {r:?}");
        }
        t
    }
}

impl PartialEq for SlotTable {
    fn eq(&self, o: &SlotTable) -> bool {
        self.slots == o.slots && self.phys_bits == o.phys_bits
    }
}

impl Eq for SlotTable {}

impl fmt::Debug for SlotTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotTable")
            .field("slots", &self.slots)
            .field("phys_bits", &self.phys_bits)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seam::Errno;
    use vmmu::memslot::KVM_USER_MEM_SLOTS;

    fn req(slot: u32, gpa: u64, size: u64, uaddr: u64, flags: u32) -> SlotRequest {
        SlotRequest { slot, flags, guest_phys_addr: gpa, memory_size: size, userspace_addr: uaddr }
    }

    #[test]
    fn create_lookup_move_delete() {
        let mut t = SlotTable::new(36);
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
        let mut t = SlotTable::new(36);
        t.apply(&req(1, 0x10_0000, 0x2000, 0x7000_0000, 0)).expect("create");
        let cases = [
            (req(u32::from(KVM_USER_MEM_SLOTS), 0x40_0000, 0x1000, 0x1000, 0), "EINVAL"),
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
            assert_eq!(t.apply(&r).map_err(|e| Errno::of(&e).name()), Err(want), "{r:?}");
        }
        assert_eq!(t.slots().len(), 1, "failed requests change nothing");
        t.apply(&req(1, 0x10_0000, 0x2000, 0x7000_0000, SlotRequest::LOG_DIRTY_PAGES))
            .expect("flags only");
        assert_eq!(t.slots()[0].flags, SlotRequest::LOG_DIRTY_PAGES);
    }

    #[test]
    fn a_clone_judges_like_the_original() {
        let mut t = SlotTable::new(36);
        t.apply(&req(1, 0x10_0000, 0x2000, 0x7000_0000, SlotRequest::LOG_DIRTY_PAGES))
            .expect("create");
        let mut c = t.clone();
        assert_eq!(c, t);
        let overlap = c.apply(&req(2, 0x10_1000, 0x1000, 0x1000, 0));
        assert_eq!(overlap.map_err(|e| Errno::of(&e)), Err(Errno::Eexist));
        c.apply(&SlotRequest::delete(1)).expect("delete in the clone");
        assert_ne!(c, t);
        assert_eq!(t.slots().len(), 1, "the original keeps its slot");
    }
}
