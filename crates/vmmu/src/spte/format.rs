//! Entry layouts per SPTE format, and the entries the MMU makes (KVM's `spte.h`, `make_spte`,
//! `make_nonleaf_spte`).
//!
//! A [`SpteFormat`] is a format kind plus the host MAXPHYADDR (`phys_bits`, 36..=52); both are
//! validated once in [`SpteFormat::new`], so every method is total. The pfn field of an entry is
//! bits `12..phys_bits`; bits `phys_bits..=51` are reserved (the CPU faults on them, see
//! [`super::classify`]).
//!
//! ## Intel EPT (`FormatKind::Ept`)
//!
//! | bits | leaf (4K PTE, or 2M/1G with bit 7) | non-leaf |
//! |---|---|---|
//! | 0, 1, 2 | R, W, X. `RWX = 000` is not present; `W` without `R` (`010`, `110`) is a misconfiguration | R, W, X (same rules) |
//! | 5:3 | memory type; 2, 3 and 7 are a misconfiguration. KVM makes WB (6) | reserved |
//! | 6 | ignore PAT; KVM sets it with WB (no non-coherent DMA: `vmx_get_mt_mask`) | reserved |
//! | 7 | page size at levels 2, 3; ignored at level 1 | 0 (reserved at levels 4, 5) |
//! | 8, 9 | accessed, dirty | accessed (8); 9 ignored |
//! | 10 | user-execute (MBEC; unused here) | ignored |
//! | 11 | software: **MMU-present** (KVM `SPTE_MMU_PRESENT_MASK`) | same |
//! | 12..phys_bits | pfn (2M leaves: bits 12..=20 reserved; 1G leaves: 12..=29) | table pfn |
//! | phys_bits..=51 | reserved | reserved |
//! | 52..=62 | ignored (software; KVM keeps A/D-tracking and writable bits here) | ignored |
//! | 63 | suppress #VE; KVM sets it in present entries and in the non-present value | same |
//!
//! ## x86 page-table entries as AMD NPT uses them (`FormatKind::Npt`)
//!
//! | bits | leaf | non-leaf |
//! |---|---|---|
//! | 0 | P. `P = 0` is not present whatever else is set | P |
//! | 1, 2 | W, U (every NPT access is a user access) | W, U |
//! | 3, 4 | PWT, PCD | PWT, PCD |
//! | 5, 6 | accessed, dirty | accessed (5); 6 ignored |
//! | 7 | PAT at level 1; page size at levels 2, 3 | 0 (reserved at levels 4, 5) |
//! | 8 | global | ignored at levels 2, 3; reserved at levels 4, 5 (AMD) |
//! | 9, 10 | ignored (software) | ignored |
//! | 11 | software: **MMU-present** | same |
//! | 12..phys_bits | pfn (2M/1G leaves: bit 12 is PAT, 13..=20 resp. 13..=29 reserved) | table pfn |
//! | phys_bits..=51 | reserved | reserved |
//! | 52..=62 | ignored (software) | ignored |
//! | 63 | NX (EFER.NXE assumed set) | NX |
//!
//! ## NPT with an SEV C-bit (`FormatKind::NptSev { c_bit }`)
//!
//! As NPT, with the C-bit (`phys_bits <= c_bit <= 51`, typically 47 or 51) carved out of the
//! reserved range: it is not reserved, is not part of the pfn, and KVM sets it in every present
//! entry it makes (`shadow_me_value`).
//!
//! ## Special values (all formats)
//!
//! | value | bits | meaning |
//! |---|---|---|
//! | [`SpteFormat::NONPRESENT`] | 63 | KVM's `SHADOW_NONPRESENT_VALUE`: an empty entry |
//! | [`SpteFormat::FROZEN`] | 63, 10, 7, 4, 3 (`0x498`) | KVM's `FROZEN_SPTE`: an entry another thread is rewriting; no RWX/P, no pfn, no A/D, not bit 11 |
//! | MMIO SPTE | see [`super::mmio`] | not MMU-present; faults with misconfig (EPT) or RSVD (NPT) |
//!
//! Present entries always have bit 11 set; the non-present, frozen and MMIO values never do.

use super::{genmask, SpteConfigError};
use crate::host::FrameKind;
use crate::types::{Access, Level, Pfn, PAGE_SHIFT};

/// The kind of entry format the MMU builds.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum FormatKind {
    /// Intel EPT (KVM with `enable_ept`).
    Ept,
    /// x86-64 page-table entries as AMD NPT uses them (KVM with `npt_enabled`).
    Npt,
    /// NPT on a host with memory encryption: the C-bit position is not reserved and is set in
    /// present entries.
    NptSev {
        /// Position of the C-bit (CPUID 0x8000001F `EBX[5:0]`), in `phys_bits..=51`.
        c_bit: u8,
    },
}

/// An SPTE format: a [`FormatKind`] and the host MAXPHYADDR, validated.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SpteFormat {
    kind: FormatKind,
    phys_bits: u8,
    /// [`Self::addr_mask`], computed once: walks use it at every level.
    addr_mask: u64,
    /// [`Self::reserved_pa_mask`], computed once: walks check it at every level.
    rsvd_pa_mask: u64,
}

// Bits shared by both formats.
pub(crate) const BIT_W: u64 = 1 << 1;
pub(crate) const BIT_LARGE: u64 = 1 << 7;
pub(crate) const BIT_63: u64 = 1 << 63;

// EPT bits.
pub(crate) const EPT_R: u64 = 1 << 0;
pub(crate) const EPT_X: u64 = 1 << 2;
pub(crate) const EPT_RWX: u64 = 0x7;
pub(crate) const EPT_MT_SHIFT: u32 = 3;
/// EPT memory type write-back.
pub(crate) const EPT_MT_WB: u64 = 6;
/// EPT memory type uncacheable.
pub(crate) const EPT_MT_UC: u64 = 0;
/// EPT leaf: ignore the guest's PAT (the EPT memory type alone decides).
pub(crate) const EPT_IPAT: u64 = 1 << 6;
const EPT_A: u64 = 1 << 8;
const EPT_D: u64 = 1 << 9;

// NPT bits.
pub(crate) const NPT_P: u64 = 1 << 0;
pub(crate) const NPT_U: u64 = 1 << 2;
const NPT_A: u64 = 1 << 5;
const NPT_D: u64 = 1 << 6;

impl SpteFormat {
    /// KVM's `SHADOW_NONPRESENT_VALUE` on x86-64: an empty entry (suppress-#VE set for EPT,
    /// NX set for NPT, nothing the CPU treats as present).
    pub const NONPRESENT: u64 = 1 << 63;
    /// KVM's `FROZEN_SPTE` (2024 value): the placeholder a thread writes while it rewrites an
    /// entry under the shared lock. Not present, no pfn, no A/D bits, not MMU-present.
    pub const FROZEN: u64 = (1 << 63) | 0x498;
    /// KVM's `SPTE_MMU_PRESENT_MASK`: set in every entry the MMU considers present.
    pub const MMU_PRESENT: u64 = 1 << 11;

    /// A format of `kind` for a host with MAXPHYADDR `phys_bits`.
    ///
    /// Fails when `phys_bits` is outside 36..=52, or the SEV C-bit is outside `phys_bits..=51`.
    pub fn new(kind: FormatKind, phys_bits: u8) -> Result<Self, SpteConfigError> {
        if !(36..=52).contains(&phys_bits) {
            return Err(SpteConfigError::PhysBitsOutOfRange { phys_bits });
        }
        if let FormatKind::NptSev { c_bit } = kind {
            if c_bit < phys_bits || c_bit > 51 {
                return Err(SpteConfigError::CBitOutOfRange { c_bit, phys_bits });
            }
        }
        let c_bit = match kind {
            FormatKind::NptSev { c_bit } => 1 << c_bit,
            _ => 0,
        };
        Ok(SpteFormat {
            kind,
            phys_bits,
            addr_mask: genmask(phys_bits as u32 - 1, PAGE_SHIFT),
            rsvd_pa_mask: genmask(51, phys_bits as u32) & !c_bit,
        })
    }

    /// The format kind.
    #[inline]
    pub const fn kind(&self) -> FormatKind {
        self.kind
    }

    /// The host MAXPHYADDR this format was built for.
    #[inline]
    pub const fn phys_bits(&self) -> u8 {
        self.phys_bits
    }

    /// Whether this is an EPT format.
    #[inline]
    pub const fn is_ept(&self) -> bool {
        matches!(self.kind, FormatKind::Ept)
    }

    /// The largest level that can map a page: 1 GiB in every format here.
    #[inline]
    pub const fn max_leaf_level(&self) -> Level {
        Level::L1G
    }

    /// Whether frame `pfn` fits the pfn field (`12..phys_bits`). A host frame that does not
    /// cannot be mapped: masked into the field, it would name another frame.
    #[inline]
    pub const fn holds_pfn(&self, pfn: Pfn) -> bool {
        pfn.raw() >> (self.phys_bits - 12) == 0
    }

    /// The pfn field: bits `12..phys_bits`.
    #[inline]
    pub const fn addr_mask(&self) -> u64 {
        self.addr_mask
    }

    /// The bits above MAXPHYADDR that the CPU treats as reserved: `phys_bits..=51`, minus the
    /// SEV C-bit. Empty with 52 physical bits.
    #[inline]
    pub const fn reserved_pa_mask(&self) -> u64 {
        self.rsvd_pa_mask
    }

    /// The SEV C-bit as a mask (KVM's `shadow_me_value`), 0 for other formats.
    #[inline]
    pub const fn c_bit_mask(&self) -> u64 {
        match self.kind {
            FormatKind::NptSev { c_bit } => 1 << c_bit,
            _ => 0,
        }
    }

    /// Whether `spte` is MMU-present (bit 11). MMIO, frozen and non-present entries are not.
    #[inline]
    pub const fn is_mmu_present(spte: u64) -> bool {
        spte & Self::MMU_PRESENT != 0
    }

    /// Whether `spte` is the frozen placeholder.
    #[inline]
    pub const fn is_frozen(spte: u64) -> bool {
        spte == Self::FROZEN
    }

    /// An MMU-present pointer to the lower-level table in frame `table`, with full permissions
    /// (KVM's `make_nonleaf_spte`): EPT `RWX | A | SVE`, NPT `P | W | U | A` (+ C-bit).
    #[inline]
    pub fn make_nonleaf(&self, table: Pfn) -> u64 {
        debug_assert!(self.holds_pfn(table), "{table:?} beyond phys_bits");
        let base = Self::MMU_PRESENT | (table.hpa() & self.addr_mask());
        if self.is_ept() {
            base | EPT_RWX | EPT_A | BIT_63
        } else {
            base | NPT_P | BIT_W | NPT_U | NPT_A | self.c_bit_mask()
        }
    }

    /// The entry of a special (PAE) root that links the level-2 table in frame `table` (KVM
    /// `mmu_alloc_shadow_roots`: `pae_root[i] = root | PT_PRESENT_MASK | shadow_me_value`). It is
    /// a PDPTE, which the CPU loads with CR3: no rights and no accessed bit (a PDPTE's bits 2:1,
    /// 8:5 and 63 are reserved, and the CPU refuses a CR3 whose PDPTEs set them), only present,
    /// the address and the SEV C-bit, plus the MMU-present bit (bit 11, which a PDPTE ignores) so
    /// the MMU's own walks see a present entry. The shadow MMU's x86 formats only (not EPT).
    #[inline]
    pub fn make_pae_root_entry(&self, table: Pfn) -> u64 {
        debug_assert!(!self.is_ept(), "a PAE root is the shadow MMU's, whose format is x86's");
        debug_assert!(self.holds_pfn(table), "{table:?} beyond phys_bits");
        NPT_P | Self::MMU_PRESENT | (table.hpa() & self.addr_mask()) | self.c_bit_mask()
    }

    /// What a leaf of this format needs to know of host frame `pfn`: the host's answer
    /// ([`crate::host::HostMemory::frame_kind`]) under EPT, whose leaves carry a memory type;
    /// RAM for the other formats, which carry none (the host is not asked).
    #[inline]
    pub(crate) fn frame_kind_of<M: crate::host::HostMemory + ?Sized>(
        &self,
        host: &M,
        pfn: Pfn,
    ) -> FrameKind {
        if self.is_ept() {
            host.frame_kind(pfn)
        } else {
            FrameKind::Ram
        }
    }

    /// An MMU-present leaf mapping `pfn`, host RAM, at `level`: [`Self::make_frame_leaf`] for
    /// [`FrameKind::Ram`].
    #[inline]
    pub fn make_leaf(&self, pfn: Pfn, level: Level, access: Access, writable: bool) -> u64 {
        self.make_frame_leaf(pfn, FrameKind::Ram, level, access, writable)
    }

    /// An MMU-present leaf mapping `pfn`, a host frame of `kind`, at `level` (KVM's `make_spte`
    /// for TDP).
    ///
    /// Always readable; writable iff `writable` and `access` has WRITE; executable iff `access`
    /// has EXEC; NPT's U bit iff `access` has USER. EPT leaves get a memory type (KVM
    /// `vmx_get_mt_mask`): RAM write-back with ignore-PAT, device memory uncacheable without it;
    /// and SVE. Huge pages (level > 1) get bit 7. Accessed is set, and dirty when writable.
    /// SEV: C-bit set. `pfn` must fit `phys_bits` and be aligned to the level; `level` must be
    /// at most [`Self::max_leaf_level`] (internal invariants, debug-asserted).
    #[inline]
    pub fn make_frame_leaf(
        &self,
        pfn: Pfn,
        kind: FrameKind,
        level: Level,
        access: Access,
        writable: bool,
    ) -> u64 {
        debug_assert!(level <= self.max_leaf_level(), "{level:?} cannot map a page");
        debug_assert!(self.holds_pfn(pfn), "{pfn:?} beyond phys_bits");
        debug_assert!(pfn.raw() % level.pages() == 0, "{pfn:?} not aligned to {level:?}");
        let w = writable && access.contains(Access::WRITE);
        let x = access.contains(Access::EXEC);
        let mut spte = Self::MMU_PRESENT | (pfn.hpa() & self.addr_mask());
        if level > Level::L4K {
            spte |= BIT_LARGE;
        }
        if self.is_ept() {
            spte |= EPT_R | EPT_A | BIT_63;
            spte |= match kind {
                // KVM `vmx_get_mt_mask` without non-coherent DMA: the guest's PAT cannot make
                // its RAM uncached.
                FrameKind::Ram => (EPT_MT_WB << EPT_MT_SHIFT) | EPT_IPAT,
                // `is_mmio`: UC, the guest's PAT combines (WC stays WC).
                FrameKind::Device => EPT_MT_UC << EPT_MT_SHIFT,
            };
            if w {
                spte |= BIT_W | EPT_D;
            }
            if x {
                spte |= EPT_X;
            }
        } else {
            spte |= NPT_P | NPT_A | self.c_bit_mask();
            if w {
                spte |= BIT_W | NPT_D;
            }
            if !x {
                spte |= BIT_63; // NX
            }
            if access.contains(Access::USER) {
                spte |= NPT_U;
            }
        }
        spte
    }

    /// `spte` without its writable bit (write protection; shadow facts §4.1).
    #[inline]
    pub const fn without_write(spte: u64) -> u64 {
        spte & !BIT_W
    }

    /// Whether bit 7 (page size) is set. Meaningful for levels 2 and 3.
    #[inline]
    pub const fn is_large(&self, spte: u64) -> bool {
        spte & BIT_LARGE != 0
    }

    /// Whether `spte` at `level` maps a page (KVM's `is_last_spte`): level 1, or bit 7 set.
    #[inline]
    pub const fn is_leaf(&self, spte: u64, level: Level) -> bool {
        level.get() == 1 || self.is_large(spte)
    }

    /// The frame in the address field (bits `12..phys_bits`; the C-bit is not part of it).
    #[inline]
    pub const fn pfn(&self, spte: u64) -> Pfn {
        Pfn((spte & self.addr_mask()) >> PAGE_SHIFT)
    }

    /// Whether the entry allows writes (bit 1 in both formats).
    #[inline]
    pub const fn is_writable(&self, spte: u64) -> bool {
        spte & BIT_W != 0
    }

    /// Whether a present leaf `spte` allows `access` (KVM `is_access_allowed`): writes need W,
    /// fetches need X (EPT) or no NX (NPT), user accesses need U (NPT; EPT has no user bit).
    #[inline]
    pub const fn leaf_allows(&self, spte: u64, access: crate::types::FaultAccess) -> bool {
        if access.write && !self.is_writable(spte) {
            return false;
        }
        if self.is_ept() {
            !access.exec || spte & EPT_X != 0
        } else {
            (!access.exec || spte & BIT_63 == 0) && (!access.user || spte & NPT_U != 0)
        }
    }

    /// Whether the accessed bit is set (EPT bit 8, NPT bit 5).
    #[inline]
    pub const fn is_accessed(&self, spte: u64) -> bool {
        spte & if self.is_ept() { EPT_A } else { NPT_A } != 0
    }

    /// Whether the dirty bit is set (EPT bit 9, NPT bit 6).
    #[inline]
    pub const fn is_dirty(&self, spte: u64) -> bool {
        spte & if self.is_ept() { EPT_D } else { NPT_D } != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ept(p: u8) -> SpteFormat {
        SpteFormat::new(FormatKind::Ept, p).unwrap()
    }
    fn npt(p: u8) -> SpteFormat {
        SpteFormat::new(FormatKind::Npt, p).unwrap()
    }

    #[test]
    fn validation_rejects_bad_widths_and_c_bits() {
        assert_eq!(
            SpteFormat::new(FormatKind::Ept, 35),
            Err(SpteConfigError::PhysBitsOutOfRange { phys_bits: 35 })
        );
        assert!(SpteFormat::new(FormatKind::Npt, 53).is_err());
        assert!(SpteFormat::new(FormatKind::Npt, 36).is_ok());
        assert!(SpteFormat::new(FormatKind::Npt, 52).is_ok());
        let sev = |c, p| SpteFormat::new(FormatKind::NptSev { c_bit: c }, p);
        assert_eq!(sev(42, 43), Err(SpteConfigError::CBitOutOfRange { c_bit: 42, phys_bits: 43 }));
        assert!(sev(52, 43).is_err());
        assert!(sev(51, 52).is_err(), "no room for a C-bit with 52 physical bits");
        assert!(sev(43, 43).is_ok());
        assert!(sev(51, 43).is_ok());
    }

    #[test]
    fn special_values() {
        assert_eq!(SpteFormat::NONPRESENT, 0x8000_0000_0000_0000);
        assert_eq!(SpteFormat::FROZEN, 0x8000_0000_0000_0498);
        for v in [SpteFormat::NONPRESENT, SpteFormat::FROZEN] {
            assert!(!SpteFormat::is_mmu_present(v));
            assert_eq!(v & 0x7, 0, "no RWX / P bits");
            assert_eq!(v & genmask(51, 12), 0, "no pfn bits");
            assert_eq!(v & (1 << 5 | 1 << 6 | 1 << 8 | 1 << 9), 0, "no A/D bits");
        }
        assert!(SpteFormat::is_frozen(SpteFormat::FROZEN));
        assert!(!SpteFormat::is_frozen(SpteFormat::NONPRESENT));
    }

    #[test]
    fn ept_layouts() {
        let f = ept(46);
        assert_eq!(f.addr_mask(), 0x0000_3FFF_FFFF_F000);
        assert_eq!(f.reserved_pa_mask(), 0x000F_C000_0000_0000);
        let leaf = f.make_leaf(Pfn(0x1234), Level::L4K, Access::ALL, true);
        // SVE | pfn | MMU-present | D | A | IPAT | WB<<3 | X W R
        assert_eq!(leaf, 0x8000_0000_0123_4B77);
        let ro = f.make_leaf(Pfn(0x1234), Level::L4K, Access::USER, true);
        assert_eq!(ro, 0x8000_0000_0123_4971, "no W (access lacks WRITE), no D, no X");
        let huge = f.make_leaf(Pfn(0x200), Level::L2M, Access::ALL, false);
        assert_eq!(huge, 0x8000_0000_0020_09F5, "bit 7, no W, no D");
        let nl = f.make_nonleaf(Pfn(0x55));
        assert_eq!(nl, 0x8000_0000_0005_5907);
        assert!(SpteFormat::is_mmu_present(leaf) && SpteFormat::is_mmu_present(nl));
        assert_eq!(f.pfn(leaf), Pfn(0x1234));
        assert!(f.is_writable(leaf) && !f.is_writable(ro));
        assert!(f.is_accessed(leaf) && f.is_dirty(leaf) && !f.is_dirty(ro));
        assert!(f.is_leaf(huge, Level::L2M) && !f.is_leaf(nl, Level::L2M));
        assert!(f.is_leaf(nl, Level::L4K));
    }

    #[test]
    fn npt_layouts() {
        let f = npt(48);
        let leaf = f.make_leaf(Pfn(0x1234), Level::L4K, Access::ALL, true);
        // pfn | MMU-present | D A | U W P
        assert_eq!(leaf, 0x0000_0000_0123_4867);
        let nx = f.make_leaf(Pfn(0x1234), Level::L4K, Access::WRITE, true);
        assert_eq!(nx, 0x8000_0000_0123_4863, "NX set, U clear");
        let huge = f.make_leaf(Pfn(1 << 18), Level::L1G, Access::ALL, false);
        assert_eq!(huge, 0x0000_0000_4000_08A5);
        assert_eq!(f.make_nonleaf(Pfn(0x55)), 0x0000_0000_0005_5827);
        assert_eq!(f.pfn(huge), Pfn(1 << 18));
        assert!(f.is_accessed(leaf) && f.is_dirty(leaf) && !f.is_dirty(huge));
    }

    #[test]
    fn sev_sets_the_c_bit_and_keeps_it_out_of_the_pfn() {
        let f = SpteFormat::new(FormatKind::NptSev { c_bit: 47 }, 43).unwrap();
        assert_eq!(f.c_bit_mask(), 1 << 47);
        assert_eq!(f.reserved_pa_mask(), genmask(51, 43) & !(1 << 47));
        let leaf = f.make_leaf(Pfn(0x7_FFFF_FFFF >> 4), Level::L4K, Access::ALL, true);
        assert_ne!(leaf & (1 << 47), 0);
        assert_eq!(f.pfn(leaf), Pfn(0x7_FFFF_FFFF >> 4));
        assert_ne!(f.make_nonleaf(Pfn(1)) & (1 << 47), 0);
    }

    #[test]
    fn phys_bits_52_has_no_reserved_pa_bits() {
        assert_eq!(npt(52).reserved_pa_mask(), 0);
        assert_eq!(npt(52).addr_mask(), genmask(51, 12));
        assert_eq!(npt(36).addr_mask(), genmask(35, 12));
    }

    /// KVM `is_access_allowed` on the leaves `make_leaf` builds: a write needs W, a fetch needs
    /// X (EPT) or no NX (NPT), a user access needs U (NPT only: EPT has no user bit); a read
    /// needs nothing beyond presence.
    #[test]
    fn leaf_allows_follows_the_leafs_rights() {
        use crate::types::FaultAccess;
        let acc = |write, exec, user| FaultAccess { write, exec, user };
        let (read, write, fetch) =
            (acc(false, false, false), acc(true, false, false), acc(false, true, false));
        let (uread, ufetch) = (acc(false, false, true), acc(false, true, true));
        for f in [ept(46), npt(48)] {
            let pfn = Pfn(0x1234);
            let all = f.make_leaf(pfn, Level::L4K, Access::ALL, true);
            let ro = f.make_leaf(pfn, Level::L4K, Access::ALL, false);
            let nx = f.make_leaf(pfn, Level::L4K, Access::WRITE.union(Access::USER), true);
            let sup = f.make_leaf(pfn, Level::L4K, Access::WRITE.union(Access::EXEC), true);
            for a in [read, write, fetch, uread, ufetch] {
                assert!(f.leaf_allows(all, a), "{f:?} {a:?}");
            }
            assert!(f.leaf_allows(ro, read) && f.leaf_allows(ro, fetch), "{f:?}");
            assert!(!f.leaf_allows(ro, write), "{f:?}: a write to a read-only leaf");
            assert!(f.leaf_allows(nx, write) && f.leaf_allows(nx, uread), "{f:?}");
            assert!(!f.leaf_allows(nx, fetch) && !f.leaf_allows(nx, ufetch), "{f:?}: fetch, no X");
            assert!(f.leaf_allows(sup, write) && f.leaf_allows(sup, fetch), "{f:?}");
            // EPT has no user bit; NPT's U bit gates user accesses.
            assert_eq!(f.leaf_allows(sup, uread), f.is_ept(), "{f:?}: user read, no U");
            assert_eq!(f.leaf_allows(sup, ufetch), f.is_ept(), "{f:?}: user fetch, no U");
        }
    }

    /// Write protection clears only the W bit: the frame, the other rights, A and D stay.
    #[test]
    fn without_write_clears_only_w() {
        for f in [ept(46), npt(48)] {
            let leaf = f.make_leaf(Pfn(0x1234), Level::L4K, Access::ALL, true);
            let ro = SpteFormat::without_write(leaf);
            assert_eq!(ro, leaf & !0b10, "{f:?}");
            assert!(!f.is_writable(ro) && f.is_dirty(ro) && f.is_accessed(ro), "{f:?}");
            assert_eq!(SpteFormat::without_write(ro), ro, "{f:?}");
        }
    }

    /// The accessed bit is EPT bit 8 and NPT bit 5, read from the entry: an entry without it
    /// (cleared by aging, or empty) is not accessed.
    #[test]
    fn is_accessed_reads_the_formats_a_bit() {
        for (f, a) in [(ept(46), 1u64 << 8), (npt(48), 1 << 5)] {
            let leaf = f.make_leaf(Pfn(0x1234), Level::L4K, Access::ALL, true);
            assert!(f.is_accessed(leaf), "{f:?}");
            assert!(!f.is_accessed(leaf & !a), "{f:?}: A cleared");
            assert!(!f.is_accessed(0) && f.is_accessed(a), "{f:?}");
        }
    }
}
