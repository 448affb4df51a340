//! The replay's mirror of the slots the core accepted ([`LiveSlots`]), indexed for the replay's
//! own accesses, which look slots up on every probe: by guest-physical address (which slot of
//! address space 0 covers a gpa) and by host buffer (which slots of address space 0 map a host
//! address: the aliases a probe reads back through).
//!
//! Invariants: `by_gpa` and `by_buffer` index exactly the address-space-0 entries of `slots`,
//! under their current gpa and their buffer. Slots of one address space never overlap in gpa
//! (KVM refuses that), so the slot covering a gpa, if any, is the one with the greatest start at
//! or below it. A slot's host range lies in one buffer (a replay buffer is a union of
//! overlapping `uaddr` ranges, `super::memory`), and a slot keeps its `uaddr` for its life (KVM
//! refuses to change it), so only slots of the same buffer can alias each other. A trace with
//! thousands of slots (KVM allows 32764 per address space) is thus looked up in logarithmic
//! time, where a scan of every live slot per probe made a replay cubic in the number of slots.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A slot the core accepted, as far as the replay's own accesses need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Live {
    pub(super) gpa: u64,
    pub(super) size: u64,
    pub(super) hva: u64,
    pub(super) readonly: bool,
    pub(super) dirty_log: bool,
}

impl Live {
    fn covers_gpa(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.size
    }

    fn covers_hva(&self, hva: u64) -> bool {
        hva >= self.hva && hva - self.hva < self.size
    }
}

/// The live slots, by `(address space, slot id)`.
#[derive(Debug, Default)]
pub(super) struct LiveSlots {
    slots: BTreeMap<(u16, u16), (Live, u64)>,
    /// Address space 0: start gpa -> slot id.
    by_gpa: BTreeMap<u64, u16>,
    /// Address space 0: the host buffer (its first host address) -> the ids of the slots in it.
    by_buffer: HashMap<u64, BTreeSet<u16>>,
}

impl LiveSlots {
    /// The slot `key`, if live.
    pub(super) fn get(&self, key: (u16, u16)) -> Option<Live> {
        self.slots.get(&key).map(|&(l, _)| l)
    }

    /// A slot created over host buffer `buffer` (the buffer's first host address).
    pub(super) fn create(&mut self, key: (u16, u16), live: Live, buffer: u64) {
        self.delete(key);
        if key.0 == 0 {
            self.by_gpa.insert(live.gpa, key.1);
            self.by_buffer.entry(buffer).or_default().insert(key.1);
        }
        self.slots.insert(key, (live, buffer));
    }

    /// A slot deleted.
    pub(super) fn delete(&mut self, key: (u16, u16)) {
        let Some((old, buffer)) = self.slots.remove(&key) else { return };
        if key.0 == 0 {
            self.by_gpa.remove(&old.gpa);
            if let Some(ids) = self.by_buffer.get_mut(&buffer) {
                ids.remove(&key.1);
                if ids.is_empty() {
                    self.by_buffer.remove(&buffer);
                }
            }
        }
    }

    /// A slot moved to `gpa` (its size and host range stay), logging as `dirty_log` says.
    pub(super) fn move_to(&mut self, key: (u16, u16), gpa: u64, dirty_log: bool) {
        let Some((l, _)) = self.slots.get_mut(&key) else { return };
        if key.0 == 0 {
            self.by_gpa.remove(&l.gpa);
            self.by_gpa.insert(gpa, key.1);
        }
        l.gpa = gpa;
        l.dirty_log = dirty_log;
    }

    /// A flags-only change of dirty logging.
    pub(super) fn set_dirty_log(&mut self, key: (u16, u16), dirty_log: bool) {
        if let Some((l, _)) = self.slots.get_mut(&key) {
            l.dirty_log = dirty_log;
        }
    }

    /// The live slot of address space 0 that covers `gpa`, with its id.
    pub(super) fn covering(&self, gpa: u64) -> Option<(u16, Live)> {
        let (_, &id) = self.by_gpa.range(..=gpa).next_back()?;
        self.get((0, id)).filter(|l| l.covers_gpa(gpa)).map(|l| (id, l))
    }

    /// The guest-physical addresses, other than `gpa` itself, at which a live slot of address
    /// space 0 maps host address `hva`, which slot `id` of address space 0 maps at `gpa`: the
    /// aliases through which the replay reads back what it wrote at `gpa`, in slot order.
    pub(super) fn aliases(&self, id: u16, hva: u64, gpa: u64) -> Vec<u64> {
        let Some(&(_, buffer)) = self.slots.get(&(0, id)) else { return Vec::new() };
        let Some(ids) = self.by_buffer.get(&buffer) else { return Vec::new() };
        ids.iter()
            .filter_map(|&id| self.get((0, id)))
            .filter(|l| l.covers_hva(hva))
            .map(|l| l.gpa + (hva - l.hva))
            .filter(|&g| g != gpa)
            .collect()
    }

    /// Up to `max` slots of address space 0 in slot order: all of them if there are no more
    /// than `max`, else `max` starting at slot id `*cursor` (wrapping round), with `*cursor`
    /// moved past the last one taken, so that successive calls take every slot in turn.
    pub(super) fn round(&self, cursor: &mut u16, max: usize) -> Vec<Live> {
        let as0 = self.slots.range((0, 0)..=(0, u16::MAX));
        if self.by_gpa.len() <= max {
            return as0.map(|(_, &(l, _))| l).collect();
        }
        let from = *cursor;
        let taken: Vec<(u16, Live)> = self
            .slots
            .range((0, from)..=(0, u16::MAX))
            .chain(as0.take_while(|(k, _)| k.1 < from))
            .take(max)
            .map(|(k, &(l, _))| (k.1, l))
            .collect();
        if let Some(&(last, _)) = taken.last() {
            *cursor = last.wrapping_add(1);
        }
        taken.into_iter().map(|(_, l)| l).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(gpa: u64, size: u64, hva: u64) -> Live {
        Live { gpa, size, hva, readonly: false, dirty_log: false }
    }

    #[test]
    fn the_aliases_of_a_host_address_are_the_other_slots_of_address_space_0_over_it() {
        let h = 0x7f00_0001_0000;
        let b = h - 0x1000; // the buffer all these slots are in
        let mut s = LiveSlots::default();
        // The probed slot, and a second one over the same buffer.
        s.create((0, 1), live(0x100000, 0x10000, h), b);
        s.create((0, 2), live(0x200000, 0x10000, h), b);
        // Host memory ending right below `h`, and starting right above its first page.
        s.create((0, 3), live(0x300000, 0x1000, h - 0x1000), b);
        s.create((0, 4), live(0x400000, 0x1000, h + 0x1000), b);
        // The SMM twin of the probed slot: the vCPU is not in SMM.
        s.create((1, 1), live(0x100000, 0x10000, h), b);
        assert_eq!(s.aliases(1, h, 0x100000), [0x200000]);
        assert_eq!(s.aliases(1, h + 0x8, 0x100008), [0x200008]);
        assert_eq!(s.aliases(1, h + 0x1008, 0x101008), [0x201008, 0x400008]);
        assert_eq!(s.aliases(4, h + 0x1008, 0x400008), [0x101008, 0x201008]);
        assert_eq!(s.aliases(3, h - 0x8, 0x300ff8), Vec::<u64>::new());
        // A delete takes the slot out of its buffer's aliases, a move changes where it is.
        s.delete((0, 2));
        assert_eq!(s.aliases(1, h + 0x1008, 0x101008), [0x400008]);
        s.move_to((0, 4), 0x500000, false);
        assert_eq!(s.aliases(1, h + 0x1008, 0x101008), [0x500008]);
    }

    #[test]
    fn a_gpa_is_covered_by_the_slot_of_address_space_0_around_it() {
        let mut s = LiveSlots::default();
        s.create((0, 7), live(0x10000, 0x2000, 0x1000_0000), 0x1000_0000);
        s.create((0, 3), live(0x20000, 0x1000, 0x2000_0000), 0x2000_0000);
        s.create((1, 9), live(0x40000, 0x1000, 0x3000_0000), 0x3000_0000);
        let id = |s: &LiveSlots, gpa| s.covering(gpa).map(|(id, _)| id);
        assert_eq!(id(&s, 0xffff), None);
        assert_eq!((id(&s, 0x10000), id(&s, 0x11fff), id(&s, 0x12000)), (Some(7), Some(7), None));
        assert_eq!((id(&s, 0x20000), id(&s, 0x21000)), (Some(3), None));
        assert_eq!(id(&s, 0x40000), None, "address space 1 is not the vCPU's");
        s.move_to((0, 7), 0x30000, true);
        assert_eq!((id(&s, 0x10000), id(&s, 0x31fff)), (None, Some(7)));
        assert_eq!(s.get((0, 7)).map(|l| l.dirty_log), Some(true));
        s.delete((0, 3));
        assert_eq!(id(&s, 0x20000), None);
        // Re-creating a live id replaces it (the core would have refused; the mirror stays right).
        s.create((0, 7), live(0x50000, 0x1000, 0x1000_0000), 0x1000_0000);
        assert_eq!((id(&s, 0x30000), id(&s, 0x50000)), (None, Some(7)));
    }

    #[test]
    fn rounds_take_every_slot_in_turn_when_there_are_more_than_the_cap() {
        let mut s = LiveSlots::default();
        for id in 0..5u16 {
            let gpa = 0x100000 * (u64::from(id) + 1);
            s.create((0, id * 2), live(gpa, 0x1000, gpa), gpa);
        }
        s.create((1, 1), live(0x100000, 0x1000, 0x100000), 0x100000);
        let gpas = |v: Vec<Live>| v.into_iter().map(|l| l.gpa >> 20).collect::<Vec<_>>();
        let mut cursor = 0;
        assert_eq!(gpas(s.round(&mut cursor, 5)), [1, 2, 3, 4, 5], "all when within the cap");
        assert_eq!(cursor, 0);
        assert_eq!(gpas(s.round(&mut cursor, 2)), [1, 2]);
        assert_eq!(gpas(s.round(&mut cursor, 2)), [3, 4]);
        assert_eq!(gpas(s.round(&mut cursor, 2)), [5, 1], "wraps round");
        assert_eq!(gpas(s.round(&mut cursor, 2)), [2, 3]);
        s.delete((0, 6)); // the slot at 4 MiB, next in turn
        assert_eq!(gpas(s.round(&mut cursor, 2)), [5, 1]);
    }
}
