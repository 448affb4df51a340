//! Guest page-table entries (gPTEs) of 64-bit-format paging (4-level and PAE): the bit layout,
//! the address mask for a guest MAXPHYADDR, and the reserved-bit masks per level (KVM's
//! `guest_rsvd_check.rsvd_bits_mask[large][level - 1]`, built by `__reset_rsvds_bits_mask`;
//! facts §2.3).
//!
//! This module only encodes: which bits mean what and which are reserved. The walk policy (what a
//! reserved bit or a missing right does to the walk) lives in [`mod@super::walk`].
//!
//! Invariants this module owns:
//! - a leaf is recognised only after its reserved bits were checked: [`is_last_gpte`] looks at PS
//!   at every level above 1, and [`RsvdMasks`] makes PS reserved wherever it cannot mean a page
//!   (PML4E, 4-level PDPTE), so a walk never stops at a level it cannot map;
//! - 1 GiB guest pages exist only for a guest whose CPUID has them (`GuestCpu::gbpages`,
//!   [`RsvdMasks::with_1g_pages`]): there PS in a 4-level PDPTE maps a 1 GiB page and bits 29:13
//!   of such a PDPTE are reserved; elsewhere PS in a PDPTE is a reserved bit (KVM's
//!   `gbpages_bit_rsvd`);
//! - the masks are Intel's: AMD also reserves bit 8 of non-leaf PML4Es and PDPTEs
//!   (`nonleaf_bit8_rsvd`), which is not modelled;
//! - PAE reserves the physical-address bits from MAXPHYADDR up to bit 62, 4-level paging only up
//!   to bit 51 (bits 62:52 are ignored there); bit 63 (NX) is reserved in both when EFER.NX = 0.

use super::mode::GuestCpu;
use crate::types::{Access, Level};

/// Present.
pub const P: u64 = 1 << 0;
/// Read/write: writes allowed (subject to CR0.WP for supervisor writes).
pub const RW: u64 = 1 << 1;
/// User/supervisor: user-mode accesses allowed.
pub const US: u64 = 1 << 2;
/// Page-level write-through.
pub const PWT: u64 = 1 << 3;
/// Page-level cache disable.
pub const PCD: u64 = 1 << 4;
/// Accessed: set by the walker on every level it used.
pub const A: u64 = 1 << 5;
/// Dirty: set by the walker on the leaf of a write.
pub const D: u64 = 1 << 6;
/// Page size: the entry maps a page (at level 2; at level 3 with 1 GiB pages; reserved above,
/// see the module doc).
pub const PS: u64 = 1 << 7;
/// Global (leaf only).
pub const G: u64 = 1 << 8;
/// No-execute (meaningful when EFER.NX = 1, reserved otherwise).
pub const NX: u64 = 1 << 63;

/// Bits `lo..=hi` set (KVM's `rsvd_bits`); empty when `lo > hi`.
#[inline]
pub const fn rsvd_bits(lo: u32, hi: u32) -> u64 {
    if lo > hi || hi > 63 {
        0
    } else {
        (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
    }
}

/// The frame-address bits of a gPTE for a guest with `maxphyaddr` physical-address bits: bits
/// `maxphyaddr-1..=12` (at most 51..=12). A table or 4 KiB page address is `pte & addr_mask(..)`.
#[inline]
pub const fn addr_mask(maxphyaddr: u8) -> u64 {
    let top = if maxphyaddr > 52 { 52 } else { maxphyaddr as u32 };
    rsvd_bits(12, top.saturating_sub(1))
}

/// The reserved bits of a present PAE PDPTE: bit 63, bits `maxphyaddr..=62`, bits 8:5 and 2:1
/// (`pdptr_rsvd_bits`; a load that finds one is #GP on MOV CR3).
#[inline]
pub const fn pdpte_rsvd_mask(maxphyaddr: u8) -> u64 {
    rsvd_bits(maxphyaddr as u32, 63) | rsvd_bits(5, 8) | rsvd_bits(1, 2)
}

/// The rights one gPTE grants as `ACC_*` bits (KVM's `FNAME(gpte_access)`): W from RW, U from US,
/// X unless NX. A walk ANDs these along the path.
#[inline]
pub const fn gpte_access(pte: u64) -> Access {
    let mut b = 0u8;
    if pte & RW != 0 {
        b |= Access::WRITE.bits();
    }
    if pte & US != 0 {
        b |= Access::USER.bits();
    }
    if pte & NX == 0 {
        b |= Access::EXEC.bits();
    }
    Access::from_bits(b)
}

/// Whether the (present, reserved-bit-clean) gPTE at `level` maps a page (KVM's
/// `FNAME(is_last_gpte)`): always at level 1, where bit 7 is PAT; PS above.
#[inline]
pub const fn is_last_gpte(level: Level, pte: u64) -> bool {
    level.get() == 1 || pte & PS != 0
}

/// Which 64-bit-format paging the masks are for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TableFormat {
    /// x86-64 4-level paging (PML4E, PDPTE, PDE, PTE).
    Long4,
    /// 32-bit PAE paging: PDE and PTE here; the PDPTEs have their own mask
    /// ([`pdpte_rsvd_mask`]), checked when CR3 is loaded.
    Pae,
}

/// The reserved-bit masks of one guest configuration, per level and leaf-ness (KVM's
/// `rsvd_bits_mask[bit 7][level - 1]`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RsvdMasks {
    /// `[bit 7 of the entry][level - 1]`, levels 1..=4.
    masks: [[u64; 4]; 2],
}

impl RsvdMasks {
    /// The masks for `format` with guest `maxphyaddr` and EFER.NX = `efer_nx` (Intel, no 1 GiB
    /// pages: [`Self::with_1g_pages`] adds them; see the module doc).
    pub const fn new(format: TableFormat, maxphyaddr: u8, efer_nx: bool) -> Self {
        let top = match format {
            TableFormat::Long4 => 51,
            TableFormat::Pae => 62,
        };
        let mut high = rsvd_bits(maxphyaddr as u32, top);
        if !efer_nx {
            high |= NX;
        }
        let large_2m = high | rsvd_bits(13, 20);
        let masks = match format {
            TableFormat::Long4 => [
                // bit 7 clear: PTE, PDE (table), PDPTE (table), PML4E
                [high, high, high, high | PS],
                // bit 7 set: PTE (PAT), 2 MiB PDE, PDPTE (PS reserved: no 1 GiB pages; with
                // them a 1 GiB page, whose bits 29:13 are reserved), PML4E
                [high, large_2m, high | PS | rsvd_bits(13, 29), high | PS],
            ],
            // Levels 3 and 4 are never walked through these masks in PAE (the PDPTEs come from
            // the loaded PDPTRs); they reserve everything so a misuse cannot pass.
            TableFormat::Pae => {
                [[high, high, u64::MAX, u64::MAX], [high, large_2m, u64::MAX, u64::MAX]]
            }
        };
        RsvdMasks { masks }
    }

    /// The masks of a guest whose CPUID has 1 GiB pages (`CPUID.80000001H:EDX.Page1GB`): in
    /// 4-level paging PS in a PDPTE maps a 1 GiB page (KVM's `gbpages_bit_rsvd` is 0); PAE has
    /// none (its PDPTEs are not walked through these masks).
    pub const fn with_1g_pages(self) -> Self {
        let mut masks = self.masks;
        if masks[1][2] != u64::MAX {
            masks[1][2] &= !PS;
        }
        RsvdMasks { masks }
    }

    /// The masks of `cpu`'s paging (its MAXPHYADDR, EFER.NX and 1 GiB pages) for `format`.
    pub const fn of(format: TableFormat, cpu: &GuestCpu) -> Self {
        let m = RsvdMasks::new(format, cpu.maxphyaddr, cpu.efer_nx);
        match (format, cpu.gbpages) {
            (TableFormat::Long4, true) => m.with_1g_pages(),
            _ => m,
        }
    }

    /// The reserved bits for `pte` found at `level` (selects the large-page mask by bit 7).
    #[inline]
    pub const fn mask(&self, level: Level, pte: u64) -> u64 {
        let large = ((pte >> 7) & 1) as usize;
        let l = level.get() as usize;
        if l == 0 || l > 4 {
            return u64::MAX;
        }
        self.masks[large][l - 1]
    }

    /// The reserved bits set in `pte` at `level` (zero: none).
    #[inline]
    pub const fn reserved_bits_set(&self, level: Level, pte: u64) -> u64 {
        pte & self.mask(level, pte)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsvd_bits_and_addr_mask() {
        assert_eq!(rsvd_bits(1, 2), 0b110);
        assert_eq!(rsvd_bits(63, 63), NX);
        assert_eq!(rsvd_bits(52, 51), 0);
        assert_eq!(addr_mask(36), 0x0000_000f_ffff_f000);
        assert_eq!(addr_mask(52), 0x000f_ffff_ffff_f000);
    }

    #[test]
    fn gpte_access_inverts_nx() {
        assert_eq!(gpte_access(P), Access::EXEC);
        assert_eq!(gpte_access(P | RW | US), Access::ALL);
        assert_eq!(gpte_access(P | RW | NX), Access::WRITE);
    }

    #[test]
    fn long4_masks() {
        let m = RsvdMasks::new(TableFormat::Long4, 40, true);
        let pa40 = 1u64 << 40;
        for l in [Level::L4K, Level::L2M, Level::L1G, Level::L4] {
            assert_ne!(m.reserved_bits_set(l, P | pa40), 0, "PA bit 40 at level {l:?}");
            assert_eq!(m.reserved_bits_set(l, P | (1 << 39)), 0, "PA bit 39 at level {l:?}");
            assert_eq!(m.reserved_bits_set(l, P | (1 << 52)), 0, "bit 52 is ignored");
            assert_eq!(m.reserved_bits_set(l, P | NX), 0, "NX with EFER.NX");
        }
        assert_eq!(m.reserved_bits_set(Level::L4, P | PS), PS, "PML4E bit 7");
        assert_eq!(m.reserved_bits_set(Level::L1G, P | PS), PS, "no 1 GiB pages");
        assert_eq!(m.reserved_bits_set(Level::L2M, P | PS), 0);
        assert_eq!(m.reserved_bits_set(Level::L2M, P | PS | (1 << 13)), 1 << 13);
        assert_eq!(m.reserved_bits_set(Level::L2M, P | PS | (1 << 20)), 1 << 20);
        assert_eq!(m.reserved_bits_set(Level::L2M, P | PS | (1 << 12)), 0, "PAT");
        assert_eq!(m.reserved_bits_set(Level::L2M, P | (1 << 13)), 0, "a table address");
        assert_eq!(m.reserved_bits_set(Level::L4K, P | PS), 0, "PAT at level 1");
        let no_nx = RsvdMasks::new(TableFormat::Long4, 40, false);
        for l in [Level::L4K, Level::L2M, Level::L1G, Level::L4] {
            assert_eq!(no_nx.reserved_bits_set(l, P | NX), NX);
        }
    }

    /// With 1 GiB pages a PDPTE with PS is a leaf whose bits 29:13 are reserved (bit 12 is PAT);
    /// nothing else changes, and PAE gains nothing.
    #[test]
    fn long4_masks_with_1g_pages() {
        let m = RsvdMasks::new(TableFormat::Long4, 40, true).with_1g_pages();
        assert_eq!(m.reserved_bits_set(Level::L1G, P | PS), 0, "a 1 GiB page");
        assert_eq!(m.reserved_bits_set(Level::L1G, P | PS | (1 << 12)), 0, "PAT");
        assert_eq!(m.reserved_bits_set(Level::L1G, P | PS | (1 << 13)), 1 << 13);
        assert_eq!(m.reserved_bits_set(Level::L1G, P | PS | (1 << 29)), 1 << 29);
        assert_eq!(m.reserved_bits_set(Level::L1G, P | PS | (1 << 30)), 0, "address bit 30");
        assert_eq!(m.reserved_bits_set(Level::L1G, P | (1 << 13)), 0, "a table address");
        assert_eq!(m.reserved_bits_set(Level::L1G, P | PS | (1 << 40)), 1 << 40);
        assert_eq!(m.reserved_bits_set(Level::L4, P | PS), PS, "PML4E bit 7 stays reserved");
        let plain = RsvdMasks::new(TableFormat::Long4, 40, true);
        for l in [Level::L4K, Level::L2M] {
            for pte in [P, P | PS, P | PS | (1 << 13)] {
                assert_eq!(m.mask(l, pte), plain.mask(l, pte), "{l:?} {pte:#x}");
            }
        }
        let pae = RsvdMasks::new(TableFormat::Pae, 36, true);
        assert_eq!(pae.with_1g_pages(), pae);
        let cpu = GuestCpu { gbpages: true, ..GuestCpu::long4(0, 40) };
        assert_eq!(RsvdMasks::of(TableFormat::Long4, &cpu), m);
        assert_eq!(
            RsvdMasks::of(TableFormat::Pae, &cpu),
            RsvdMasks::new(TableFormat::Pae, 40, true)
        );
        let no_1g = GuestCpu { gbpages: false, ..cpu };
        assert_eq!(RsvdMasks::of(TableFormat::Long4, &no_1g), plain);
    }

    #[test]
    fn pae_masks() {
        let m = RsvdMasks::new(TableFormat::Pae, 36, true);
        for l in [Level::L4K, Level::L2M] {
            assert_eq!(m.reserved_bits_set(l, P | (1 << 36)), 1 << 36);
            assert_eq!(m.reserved_bits_set(l, P | (1 << 52)), 1 << 52, "PAE reserves 62:M");
            assert_eq!(m.reserved_bits_set(l, P | (1 << 62)), 1 << 62);
            assert_eq!(m.reserved_bits_set(l, P | NX), 0);
        }
        assert_eq!(m.reserved_bits_set(Level::L2M, P | PS | (1 << 20)), 1 << 20);
        let no_nx = RsvdMasks::new(TableFormat::Pae, 36, false);
        assert_eq!(no_nx.reserved_bits_set(Level::L4K, P | NX), NX);
    }

    #[test]
    fn pdpte_mask() {
        let m = pdpte_rsvd_mask(36);
        for bit in [1, 2, 5, 6, 7, 8, 36, 51, 62, 63] {
            assert_ne!(m & (1 << bit), 0, "bit {bit}");
        }
        for bit in [0, 3, 4, 9, 10, 11, 12, 35] {
            assert_eq!(m & (1 << bit), 0, "bit {bit}");
        }
    }
}
