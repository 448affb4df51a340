//! The guest's page tables as the shadow MMU reads them: guest-physical addresses resolved
//! through one memslot set (the fault's, read inside its memslot read section) to host-virtual
//! addresses, then read or updated through the host ([`crate::host::GuestMemory`]).
//!
//! Invariant: a table in no visible slot (none, or one being deleted or moved) is unreadable,
//! so the walk reports a not-present fault (KVM: `kvm_vcpu_gfn_to_hva` gives an error); a table
//! in a read-only slot is readable but its A/D bits are not written (shadow facts §2.2); a table
//! whose A/D bits the walker did set is marked dirty in its slot's dirty log (KVM
//! `FNAME(update_accessed_dirty_bits)`: `kvm_vcpu_mark_page_dirty` of the table's gfn), so a
//! migration sends the table again.

use crate::guest::{GpteWriteError, GuestPteMemory};
use crate::host::GuestMemory;
use crate::memslot::{Memslot, MemslotSet};
use crate::types::{Gpa, Hva};
use core::cell::Cell;

/// Guest memory through one memslot set and a host.
pub struct SlotGuestMemory<'a, M: GuestMemory + ?Sized> {
    set: &'a MemslotSet,
    host: &'a M,
    /// The visible slot the last lookup found (of `set`, so valid as long as `self`): a fault
    /// reads a dozen or more gPTEs (the walk, the re-check before install, the prefetch group),
    /// nearly always from one slot.
    last: Cell<Option<&'a Memslot>>,
}

impl<'a, M: GuestMemory + ?Sized> SlotGuestMemory<'a, M> {
    /// Guest memory as `set` maps it onto `host`.
    pub fn new(set: &'a MemslotSet, host: &'a M) -> Self {
        SlotGuestMemory { set, host, last: Cell::new(None) }
    }

    /// The host address of `gpa` and the visible slot that maps it, if any.
    fn resolve(&self, gpa: Gpa) -> Option<(Hva, &'a Memslot)> {
        let gfn = gpa.gfn();
        let slot = self.set.find_visible_near(gfn, self.last.get())?;
        self.last.set(Some(slot));
        let hva = slot.hva_of(gfn).raw() + gpa.page_offset();
        Some((Hva(hva), slot))
    }
}

impl<M: GuestMemory + ?Sized> GuestPteMemory for SlotGuestMemory<'_, M> {
    fn read_gpte(&self, gpa: Gpa) -> Option<u64> {
        let (hva, _) = self.resolve(gpa)?;
        self.host.read_u64(hva).ok()
    }

    fn cmpxchg_gpte(&self, gpa: Gpa, old: u64, new: u64) -> Result<bool, GpteWriteError> {
        let (hva, slot) = self.resolve(gpa).ok_or(GpteWriteError::Unreadable)?;
        if slot.is_readonly() {
            return Err(GpteWriteError::NotWritable);
        }
        let swapped =
            self.host.cmpxchg_u64(hva, old, new).map_err(|_| GpteWriteError::Unreadable)?;
        if swapped {
            self.set.mark_page_dirty(slot, gpa.gfn());
        }
        Ok(swapped)
    }
}
