//! Domain value types: guest/host addresses, frame numbers, slot and address-space ids, and the
//! memslot [`Generation`].
//!
//! Invariants this module owns:
//! - every address/frame newtype is a plain `u64` wrapper; conversions between addresses and
//!   frame numbers use [`PAGE_SHIFT`] and never lose the page offset silently
//!   ([`Gpa::gfn`] drops it by definition, [`Gpa::page_offset`] returns it);
//! - a [`Generation`] keeps the update-in-progress flag in bit 63 and the counter in bits 0..=62;
//!   address space `i` of a VM with `n` address spaces only ever holds generations `g` with
//!   `g % n == i` (the counter starts at `i` and advances by `n`), so generations are unique across
//!   address spaces, which the per-vCPU last-used-slot cache relies on (facts §2.2, §5.1);
//! - only the low [`Generation::MMIO_GEN_BITS`] bits of a generation are stored in an MMIO SPTE,
//!   never the in-progress flag (facts §1.1).

use core::fmt;

/// log2 of the base page size.
pub const PAGE_SHIFT: u32 = 12;
/// The base page size (4 KiB).
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Mask of the offset within a base page.
pub const PAGE_OFFSET_MASK: u64 = PAGE_SIZE - 1;

macro_rules! addr_newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw value.
            #[inline]
            pub const fn raw(self) -> u64 {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

addr_newtype!(
    /// A guest-physical address.
    Gpa
);
addr_newtype!(
    /// A guest frame number: a guest-physical address shifted right by [`PAGE_SHIFT`].
    Gfn
);
addr_newtype!(
    /// A guest-virtual address: what a guest instruction uses, translated by the guest's own
    /// page tables (under shadow paging the MMU walks them; KVM's `gva_t`).
    Gva
);
addr_newtype!(
    /// A host-virtual address (KVM's `userspace_addr`).
    Hva
);
addr_newtype!(
    /// A host (physical) frame number, as stored in an SPTE's address field.
    Pfn
);

impl Gpa {
    /// The frame this address lies in.
    #[inline]
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0 >> PAGE_SHIFT)
    }
    /// The offset within the base page.
    #[inline]
    pub const fn page_offset(self) -> u64 {
        self.0 & PAGE_OFFSET_MASK
    }
    /// Whether the address is page aligned.
    #[inline]
    pub const fn is_page_aligned(self) -> bool {
        self.page_offset() == 0
    }
}

impl Gfn {
    /// The guest-physical address of the first byte of the frame.
    #[inline]
    pub const fn gpa(self) -> Gpa {
        Gpa(self.0 << PAGE_SHIFT)
    }
    /// `self + n` frames, or `None` on overflow.
    #[inline]
    pub const fn checked_add(self, n: u64) -> Option<Gfn> {
        match self.0.checked_add(n) {
            Some(v) => Some(Gfn(v)),
            None => None,
        }
    }
}

impl Gva {
    /// The address with its page offset cleared (KVM: `gva & PAGE_MASK`).
    #[inline]
    pub const fn page_base(self) -> Gva {
        Gva(self.0 & !PAGE_OFFSET_MASK)
    }
    /// The offset within the base page.
    #[inline]
    pub const fn page_offset(self) -> u64 {
        self.0 & PAGE_OFFSET_MASK
    }
}

impl Hva {
    /// Whether the address is page aligned.
    #[inline]
    pub const fn is_page_aligned(self) -> bool {
        self.0 & PAGE_OFFSET_MASK == 0
    }
}

impl Pfn {
    /// The host-physical address of the first byte of the frame.
    #[inline]
    pub const fn hpa(self) -> u64 {
        self.0 << PAGE_SHIFT
    }
}

/// A memslot id within one address space (the low 16 bits of KVM's `slot` field).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
#[repr(transparent)]
pub struct SlotId(pub u16);

/// An address-space id (KVM's `as_id`: 0 normal, 1 SMM on x86), the high 16 bits of `slot`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
#[repr(transparent)]
pub struct AsId(pub u16);

impl SlotId {
    /// Splits KVM's 32-bit `slot` field into `(as_id, id)`: `slot = (as_id << 16) | id`.
    #[inline]
    pub const fn split(slot: u32) -> (AsId, SlotId) {
        (AsId((slot >> 16) as u16), SlotId(slot as u16))
    }
    /// Joins `(as_id, id)` back into KVM's `slot` field.
    #[inline]
    pub const fn join(as_id: AsId, id: SlotId) -> u32 {
        ((as_id.0 as u32) << 16) | id.0 as u32
    }
}

/// A memslot-set generation (KVM's `kvm_memslots::generation`).
///
/// Bit 63 is the update-in-progress flag (`KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS`); bits 0..=62
/// count updates. Treated as never wrapping as a whole (2^63 updates); only its low
/// [`Self::MMIO_GEN_BITS`] bits, as stored in MMIO SPTEs, wrap.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct Generation(u64);

impl Generation {
    /// The update-in-progress flag, bit 63.
    pub const UPDATE_IN_PROGRESS: u64 = 1 << 63;
    /// Number of generation bits an MMIO SPTE stores.
    pub const MMIO_GEN_BITS: u32 = 19;
    /// Mask of the generation bits an MMIO SPTE stores.
    pub const MMIO_GEN_MASK: u64 = (1 << Self::MMIO_GEN_BITS) - 1;

    /// A generation from its raw value (flag included).
    #[inline]
    pub const fn from_raw(raw: u64) -> Self {
        Generation(raw)
    }
    /// The raw value, flag included: what a full-width comparison uses.
    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }
    /// The first generation of address space `as_id` (KVM: `generation = as_id`).
    #[inline]
    pub const fn initial(as_id: AsId) -> Self {
        Generation(as_id.0 as u64)
    }
    /// Whether the update-in-progress flag is set.
    #[inline]
    pub const fn in_progress(self) -> bool {
        self.0 & Self::UPDATE_IN_PROGRESS != 0
    }
    /// This generation with the update-in-progress flag set (step 1 of a swap).
    #[inline]
    pub const fn mark_in_progress(self) -> Self {
        Generation(self.0 | Self::UPDATE_IN_PROGRESS)
    }
    /// This generation with the flag cleared.
    #[inline]
    pub const fn counter(self) -> u64 {
        self.0 & !Self::UPDATE_IN_PROGRESS
    }
    /// The final generation after a swap: flag cleared, counter advanced by the number of address
    /// spaces (the "second increment", facts §2.2). Keeps `counter % nr_as` unchanged.
    #[inline]
    pub const fn next_final(self, nr_as: u16) -> Self {
        Generation(self.counter() + nr_as as u64)
    }
    /// The bits an MMIO SPTE stores: the low 19 bits of the counter; the flag is dropped.
    #[inline]
    pub const fn mmio_bits(self) -> u64 {
        self.0 & Self::MMIO_GEN_MASK
    }
    /// Whether this (final) generation wraps the MMIO generation: its MMIO bits, with the
    /// address-space modifier stripped, are zero (facts §2.4, `kvm_mmu_invalidate_mmio_sptes`).
    /// `nr_as` must be a power of two (1 or 2), as in KVM.
    #[inline]
    pub const fn is_mmio_wrap(self, nr_as: u16) -> bool {
        debug_assert!(nr_as.is_power_of_two());
        self.mmio_bits() & !((nr_as as u64) - 1) == 0
    }
}

impl fmt::Debug for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.in_progress() {
            write!(f, "Generation({}+IN_PROGRESS)", self.counter())
        } else {
            write!(f, "Generation({})", self.counter())
        }
    }
}

/// Guest access rights, with KVM's `ACC_*` bit values (exec 1, write 2, user 4).
///
/// An MMIO SPTE stores `access & access_mask` (W|U for NPT, nothing for EPT); the exec bit is
/// never stored (facts §1.3).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct Access(u8);

impl Access {
    /// Instruction fetch (KVM `ACC_EXEC_MASK`).
    pub const EXEC: Access = Access(1);
    /// Write (KVM `ACC_WRITE_MASK`).
    pub const WRITE: Access = Access(2);
    /// User-mode (KVM `ACC_USER_MASK`).
    pub const USER: Access = Access(4);
    /// All three (KVM `ACC_ALL`).
    pub const ALL: Access = Access(7);
    /// No rights beyond read.
    pub const NONE: Access = Access(0);

    /// From KVM's `ACC_*` bits; bits above 2 are dropped.
    #[inline]
    pub const fn from_bits(bits: u8) -> Access {
        Access(bits & 7)
    }
    /// KVM's `ACC_*` bits.
    #[inline]
    pub const fn bits(self) -> u8 {
        self.0
    }
    /// Whether every right in `other` is in `self`.
    #[inline]
    pub const fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }
    /// Union.
    #[inline]
    pub const fn union(self, other: Access) -> Access {
        Access(self.0 | other.0)
    }
    /// Intersection.
    #[inline]
    pub const fn intersect(self, other: Access) -> Access {
        Access(self.0 & other.0)
    }
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |b: u8, ch: char| if self.0 & b != 0 { ch } else { '-' };
        write!(f, "Access({}{}{})", c(4, 'u'), c(2, 'w'), c(1, 'x'))
    }
}

/// What a guest access that faulted was trying to do (the PFERR bits that matter here).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct FaultAccess {
    /// A store (PFERR_WRITE).
    pub write: bool,
    /// An instruction fetch (PFERR_FETCH).
    pub exec: bool,
    /// A user-mode access (PFERR_USER).
    pub user: bool,
}

impl FaultAccess {
    /// A data read.
    pub const READ: FaultAccess = FaultAccess { write: false, exec: false, user: false };
    /// A data write.
    pub const WRITE: FaultAccess = FaultAccess { write: true, exec: false, user: false };

    /// The rights this access needs, as `ACC_*` bits (reads need none beyond presence).
    #[inline]
    pub const fn required(self) -> Access {
        let mut b = 0;
        if self.write {
            b |= 2;
        }
        if self.exec {
            b |= 1;
        }
        if self.user {
            b |= 4;
        }
        Access(b)
    }
}

/// A page-table level, KVM's `PG_LEVEL_*`: 1 maps 4 KiB, 2 maps 2 MiB, 3 maps 1 GiB; 4 and 5 are
/// upper levels that never map a page here.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
#[repr(transparent)]
pub struct Level(u8);

impl Level {
    /// 4 KiB pages.
    pub const L4K: Level = Level(1);
    /// 2 MiB pages.
    pub const L2M: Level = Level(2);
    /// 1 GiB pages.
    pub const L1G: Level = Level(3);
    /// The 4-level root (PML4).
    pub const L4: Level = Level(4);
    /// The 5-level root (PML5).
    pub const L5: Level = Level(5);

    /// A level from its number, if it is 1..=5.
    #[inline]
    pub const fn new(n: u8) -> Option<Level> {
        if n >= 1 && n <= 5 {
            Some(Level(n))
        } else {
            None
        }
    }
    /// The level number, 1..=5.
    #[inline]
    pub const fn get(self) -> u8 {
        self.0
    }
    /// log2 of the bytes one entry at this level covers: 12, 21, 30, 39, 48.
    #[inline]
    pub const fn shift(self) -> u32 {
        PAGE_SHIFT + 9 * (self.0 as u32 - 1)
    }
    /// Base pages one entry at this level covers.
    #[inline]
    pub const fn pages(self) -> u64 {
        1 << (9 * (self.0 as u32 - 1))
    }
    /// The first gfn of the block of this level that holds `gfn` (KVM `gfn_round_for_level`).
    #[inline]
    pub const fn block_base(self, gfn: Gfn) -> Gfn {
        Gfn(gfn.0 & !(self.pages() - 1))
    }
    /// How many base pages `gfn` lies into the block of this level that holds it.
    #[inline]
    pub const fn offset_in_block(self, gfn: Gfn) -> u64 {
        gfn.0 & (self.pages() - 1)
    }
    /// The index of `gfn` in a table of this level.
    #[inline]
    pub const fn index(self, gfn: Gfn) -> usize {
        ((gfn.0 >> (9 * (self.0 as u32 - 1))) & 511) as usize
    }
    /// The next level down, or `None` at 4 KiB.
    #[inline]
    pub const fn lower(self) -> Option<Level> {
        if self.0 > 1 {
            Some(Level(self.0 - 1))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_the_aligned_run_of_base_pages_one_entry_covers() {
        let gfn = Gfn(0x4_0203);
        assert_eq!(Level::L4K.block_base(gfn), gfn);
        assert_eq!(Level::L4K.offset_in_block(gfn), 0);
        assert_eq!(Level::L2M.block_base(gfn), Gfn(0x4_0200));
        assert_eq!(Level::L2M.offset_in_block(gfn), 3);
        assert_eq!(Level::L1G.block_base(gfn), Gfn(0x4_0000));
        assert_eq!(Level::L1G.offset_in_block(gfn), 0x203);
        let top = Gfn(u64::MAX);
        assert_eq!(Level::L2M.block_base(top).raw() + Level::L2M.offset_in_block(top), u64::MAX);
    }

    #[test]
    fn slot_field_round_trips() {
        for slot in [0u32, 1, 0xffff, 0x1_0000, 0x1_7ffb, 0xffff_ffff] {
            let (a, i) = SlotId::split(slot);
            assert_eq!(SlotId::join(a, i), slot);
        }
        assert_eq!(SlotId::split(0x1_0005), (AsId(1), SlotId(5)));
    }

    #[test]
    fn generation_flag_and_stride() {
        let g = Generation::initial(AsId(1));
        assert_eq!(g.raw(), 1);
        let p = g.mark_in_progress();
        assert!(p.in_progress());
        assert_eq!(p.mmio_bits(), 1, "the flag is never an MMIO bit");
        let f = p.next_final(2);
        assert!(!f.in_progress());
        assert_eq!(f.raw(), 3);
        assert_eq!(f.raw() % 2, 1, "address space 1 keeps odd generations");
    }

    #[test]
    fn mmio_wrap_detection_strips_the_address_space_modifier() {
        assert!(Generation::from_raw(1 << 19).is_mmio_wrap(1));
        assert!(Generation::from_raw((1 << 19) + 1).is_mmio_wrap(2));
        assert!(!Generation::from_raw((1 << 19) + 1).is_mmio_wrap(1));
        assert!(!Generation::from_raw(2).is_mmio_wrap(2));
        assert!(!Generation::from_raw(4).is_mmio_wrap(1));
    }

    #[test]
    fn levels() {
        assert_eq!(Level::L2M.shift(), 21);
        assert_eq!(Level::L1G.pages(), 1 << 18);
        assert_eq!(Level::L4.index(Gfn(2 << 27)), 2);
        assert_eq!(Level::L4K.index(Gfn(0x201)), 1);
        assert_eq!(Level::L4K.lower(), None);
        assert_eq!(Level::new(6), None);
    }

    #[test]
    fn gpa_gfn_conversions() {
        let a = Gpa(0x1234_5678);
        assert_eq!(a.gfn(), Gfn(0x12345));
        assert_eq!(a.page_offset(), 0x678);
        assert_eq!(a.gfn().gpa(), Gpa(0x1234_5000));
        assert_eq!(Gfn(u64::MAX).checked_add(1), None);
    }
}
