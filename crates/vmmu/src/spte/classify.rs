//! What the CPU decides for one entry of the MMU's tables, per format: the software page walker
//! asks this, and tests use it to show that MMIO SPTEs really trap.
//!
//! | format | not present | misconfigured / reserved (exit) | otherwise |
//! |---|---|---|---|
//! | EPT | `RWX = 000` (whatever else is set) | EPT misconfiguration: `W` without `R` (`010`, `110`); memory type 2, 3 or 7 in a leaf; a reserved bit | present |
//! | NPT | `P = 0` (whatever else is set) | #NPF with `PFERR_RSVD`: a reserved bit | present |
//!
//! Reserved bits (KVM's `shadow_zero_check`, `reset_rsvds_bits_mask_ept` and the long-mode
//! `__reset_rsvds_bits_mask`):
//!
//! | level | EPT | NPT |
//! |---|---|---|
//! | all | PA bits `phys_bits..=51` | PA bits `phys_bits..=51` except the SEV C-bit |
//! | 5, 4 | bit 7 (no pages this big), bits 3..=6 | bit 7, bit 8 (AMD) |
//! | 3, 2 table | bits 3..=6 | none |
//! | 3 leaf (1 GiB) | bits 12..=29 | bits 13..=29 (bit 12 is PAT) |
//! | 2 leaf (2 MiB) | bits 12..=20 | bits 13..=20 |
//! | 1 | none (bit 7 ignored) | none (bit 7 is PAT) |
//!
//! Bits 52..=62 are ignored in both formats; bit 63 is EPT's suppress-#VE and NPT's NX
//! (EFER.NXE is assumed set), never reserved. The CPU is assumed to support execute-only EPT
//! entries (`100` is present, executable, not readable).

use super::format::{BIT_63, BIT_LARGE, BIT_W, EPT_MT_SHIFT, EPT_R, EPT_RWX, EPT_X, NPT_P, NPT_U};
use super::{genmask, SpteFormat};
use crate::types::{Access, Level, Pfn};
use core::fmt;

/// The CPU's verdict on one entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HwEntry {
    /// Not present: an EPT violation or a #NPF without RSVD.
    NotPresent,
    /// Present and well formed.
    Present {
        /// Whether the entry maps a page (level 1, or bit 7 at level 2/3).
        leaf: bool,
        /// The frame the entry points at (a page, or a lower table).
        pfn: Pfn,
        /// What the entry allows beyond reading, as `ACC_*` bits: WRITE, EXEC, and USER (always
        /// set for EPT, which has no user bit).
        perms: Access,
        /// Whether reads are allowed: always for NPT; EPT's R bit (false for execute-only).
        readable: bool,
    },
    /// The entry cannot be used: an EPT misconfiguration, or a #NPF with `PFERR_RSVD`. This is
    /// the exit an MMIO SPTE is built to cause.
    Misconfig(RsvdReason),
}

/// The CPU's verdict on a PAE page-directory-pointer entry (one of the four a PAE CR3 names,
/// loaded with CR3 rather than walked per access).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PdpteEntry {
    /// Not present: an access under it is a not-present #PF.
    NotPresent,
    /// Present with reserved bits set (`bits`): the CPU refuses the CR3 load (#GP) or the VM
    /// entry, so no access can run under it at all.
    Reserved {
        /// The reserved bits that are set.
        bits: u64,
    },
    /// Present: the page directory in frame `table`. A PDPTE grants no rights of its own.
    Present {
        /// The page directory's frame.
        table: Pfn,
    },
}

/// Which rule made an entry misconfigured (the first one found).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum RsvdReason {
    /// EPT: writable but not readable (`XWR` = `010` or `110`).
    WriteWithoutRead {
        /// The entry's low three bits.
        xwr: u8,
    },
    /// EPT leaf: memory type 2, 3 or 7.
    BadMemType {
        /// The memory-type field, bits 5:3.
        memtype: u8,
    },
    /// A physical-address bit at or above MAXPHYADDR.
    PhysAddrBit {
        /// The lowest such bit set.
        bit: u8,
        /// The host MAXPHYADDR.
        phys_bits: u8,
    },
    /// The page-size bit at a level that cannot map a page.
    HugeBitAtLevel {
        /// The level (4 or 5).
        level: u8,
    },
    /// Another bit that must be zero at this level.
    ReservedBit {
        /// The lowest such bit set.
        bit: u8,
        /// The level of the entry.
        level: u8,
    },
}

impl fmt::Display for RsvdReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RsvdReason::WriteWithoutRead { xwr } => {
                write!(f, "EPT entry is writable but not readable (XWR={xwr:03b})")
            }
            RsvdReason::BadMemType { memtype } => {
                write!(f, "EPT leaf has invalid memory type {memtype}")
            }
            RsvdReason::PhysAddrBit { bit, phys_bits } => {
                write!(f, "physical-address bit {bit} is set but MAXPHYADDR is {phys_bits}")
            }
            RsvdReason::HugeBitAtLevel { level } => {
                write!(f, "page-size bit set at level {level}, which cannot map a page")
            }
            RsvdReason::ReservedBit { bit, level } => {
                write!(f, "reserved bit {bit} set in a level-{level} entry")
            }
        }
    }
}

/// The lowest set bit of a non-zero mask, as a bit number.
#[inline]
const fn low_bit(m: u64) -> u8 {
    m.trailing_zeros() as u8
}

impl SpteFormat {
    /// The reserved-bit rule `spte` breaks at `level`, if any (KVM's `is_rsvd_spte` with the
    /// TDP `shadow_zero_check`, including EPT's `bad_mt_xwr`). Pure bit check: it does not look
    /// at presence ([`Self::classify`] does).
    #[inline]
    pub fn has_reserved_bits(&self, spte: u64, level: Level) -> Option<RsvdReason> {
        // Fast accept for what every walk reads above its leaf: a table entry (no large bit)
        // above 4 KiB. These are exactly the rules of `reserved_bits_rule` for that case (no
        // memory type there, no huge-bit rule, `other` as in its match), as one mask test, so
        // a clean entry costs a few instructions (the MMIO fast path reads three of them).
        let lv = level.get();
        if lv > 1 && spte & BIT_LARGE == 0 {
            let (other, bad_xwr) = if self.is_ept() {
                (genmask(6, 3), matches!(spte & EPT_RWX, 0b010 | 0b110))
            } else {
                (if lv >= 4 { 1 << 8 } else { 0 }, false)
            };
            if !bad_xwr && spte & (self.reserved_pa_mask() | other) == 0 {
                return None;
            }
        }
        self.reserved_bits_rule(spte, level)
    }

    /// The full check behind [`Self::has_reserved_bits`].
    #[inline(never)]
    fn reserved_bits_rule(&self, spte: u64, level: Level) -> Option<RsvdReason> {
        let lv = level.get();
        let large = spte & BIT_LARGE != 0;
        if self.is_ept() {
            let xwr = (spte & EPT_RWX) as u8;
            if xwr == 0b010 || xwr == 0b110 {
                return Some(RsvdReason::WriteWithoutRead { xwr });
            }
            let maps_page = lv == 1 || (large && lv <= self.max_leaf_level().get());
            let memtype = ((spte >> EPT_MT_SHIFT) & 7) as u8;
            if maps_page && matches!(memtype, 2 | 3 | 7) {
                return Some(RsvdReason::BadMemType { memtype });
            }
        }
        let pa = spte & self.reserved_pa_mask();
        if pa != 0 {
            return Some(RsvdReason::PhysAddrBit { bit: low_bit(pa), phys_bits: self.phys_bits() });
        }
        if lv > self.max_leaf_level().get() && large {
            return Some(RsvdReason::HugeBitAtLevel { level: lv });
        }
        // Level is 1..=5 by construction; levels above 3 are tables only.
        let other = match (self.is_ept(), lv, large) {
            (_, 1, _) => 0,
            (true, 2 | 3, true) if lv == 3 => genmask(29, 12),
            (true, 2 | 3, true) => genmask(20, 12),
            (true, _, _) => genmask(6, 3),
            (false, 2 | 3, true) if lv == 3 => genmask(29, 13),
            (false, 2 | 3, true) => genmask(20, 13),
            (false, 2 | 3, false) => 0,
            (false, _, _) => 1 << 8,
        };
        let hit = spte & other;
        if hit != 0 {
            return Some(RsvdReason::ReservedBit { bit: low_bit(hit), level: lv });
        }
        None
    }

    /// The reserved-bit rule a present PAE PDE or PTE `spte` at `level` breaks beyond
    /// [`Self::has_reserved_bits`], for the tables under a PAE root (the shadow MMU's tables for
    /// a PAE guest, which the CPU walks in PAE paging): there bits 62:MAXPHYADDR are reserved
    /// (Intel SDM tables 4-8 to 4-11, AMD APM legacy-mode PAE), where 4-level paging ignores
    /// 62:52; bits 51:MAXPHYADDR are the format's own rule. KVM keeps its software bits of
    /// non-EPT SPTEs below bit 12 for this reason. A not-present entry breaks no rule here.
    #[inline]
    pub fn pae_reserved_bits(&self, spte: u64, level: Level) -> Option<RsvdReason> {
        const PAE_HIGH: u64 = genmask(62, 52);
        if self.is_ept() || spte & NPT_P == 0 || spte & PAE_HIGH == 0 {
            return None;
        }
        Some(RsvdReason::ReservedBit { bit: low_bit(spte & PAE_HIGH), level: level.get() })
    }

    /// How the CPU reads `e` as a PAE PDPTE (Intel SDM "PAE paging", the PDPTE registers; AMD
    /// APM "legacy PAE mode"): bit 0 present; bits 2:1, 8:5 and 63:MAXPHYADDR reserved (the SEV
    /// C-bit is an address bit, not reserved); bits 11:9 ignored. The shadow MMU's x86 formats
    /// only (EPT has no PAE roots).
    pub fn classify_pdpte(&self, e: u64) -> PdpteEntry {
        if e & NPT_P == 0 {
            return PdpteEntry::NotPresent;
        }
        let reserved = genmask(2, 1) | genmask(8, 5) | genmask(63, 52) | self.reserved_pa_mask();
        match e & reserved {
            0 => PdpteEntry::Present { table: self.pfn(e) },
            bits => PdpteEntry::Reserved { bits },
        }
    }

    /// What the CPU decides for `spte` found at `level` during a walk.
    pub fn classify(&self, spte: u64, level: Level) -> HwEntry {
        let present = if self.is_ept() { spte & EPT_RWX != 0 } else { spte & NPT_P != 0 };
        if !present {
            return HwEntry::NotPresent;
        }
        if let Some(r) = self.has_reserved_bits(spte, level) {
            return HwEntry::Misconfig(r);
        }
        let leaf = self.is_leaf(spte, level);
        let w = if spte & BIT_W != 0 { Access::WRITE } else { Access::NONE };
        let (x, u, readable) = if self.is_ept() {
            (spte & EPT_X != 0, true, spte & EPT_R != 0)
        } else {
            (spte & BIT_63 == 0, spte & NPT_U != 0, true)
        };
        let mut perms = w;
        if x {
            perms = perms.union(Access::EXEC);
        }
        if u {
            perms = perms.union(Access::USER);
        }
        HwEntry::Present { leaf, pfn: self.pfn(spte), perms, readable }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spte::FormatKind;
    use HwEntry::{Misconfig, NotPresent};
    use RsvdReason::*;

    const L1: Level = Level::L4K;
    const L2: Level = Level::L2M;
    const L3: Level = Level::L1G;
    const L4: Level = Level::L4;
    const L5: Level = Level::L5;

    fn fmt(kind: FormatKind, p: u8) -> SpteFormat {
        SpteFormat::new(kind, p).unwrap()
    }

    fn present(leaf: bool, pfn: u64, perms: Access, readable: bool) -> HwEntry {
        HwEntry::Present { leaf, pfn: Pfn(pfn), perms, readable }
    }

    fn run(f: SpteFormat, cases: &[(&str, u64, Level, HwEntry)]) {
        for &(name, spte, level, want) in cases {
            assert_eq!(f.classify(spte, level), want, "{f:?}: {name} ({spte:#x} at {level:?})");
        }
    }

    /// EPT with 46 physical bits; `WB` = memory type 6 in bits 5:3.
    #[test]
    fn ept_classification_table() {
        let f = fmt(FormatKind::Ept, 46);
        const WB: u64 = 6 << 3;
        const RWX: Access = Access::ALL;
        const RW: Access = Access::WRITE.union(Access::USER);
        let cases = [
            ("zero", 0, L1, NotPresent),
            ("non-present value", SpteFormat::NONPRESENT, L1, NotPresent),
            ("frozen", SpteFormat::FROZEN, L4, NotPresent),
            ("RWX=0 with bad memtype and PA bits", 2 << 3 | 1 << 50, L1, NotPresent),
            ("W only", 0b010 | WB, L1, Misconfig(WriteWithoutRead { xwr: 0b010 })),
            ("WX", 0b110 | WB, L3, Misconfig(WriteWithoutRead { xwr: 0b110 })),
            ("WX table", 0b110, L4, Misconfig(WriteWithoutRead { xwr: 0b110 })),
            (
                "X only",
                0b100 | WB | 0x5000,
                L1,
                present(true, 5, Access::EXEC.union(Access::USER), false),
            ),
            ("memtype 2", 0b111 | 2 << 3, L1, Misconfig(BadMemType { memtype: 2 })),
            ("memtype 3", 0b111 | 3 << 3, L1, Misconfig(BadMemType { memtype: 3 })),
            (
                "memtype 7 on 2M",
                0b111 | 7 << 3 | BIT_LARGE,
                L2,
                Misconfig(BadMemType { memtype: 7 }),
            ),
            ("memtype 0 (UC)", 0b111, L1, present(true, 0, RWX, true)),
            ("memtype 1 (WC)", 0b011 | 1 << 3, L1, present(true, 0, RW, true)),
            ("memtype 4 (WT)", 0b001 | 4 << 3, L1, present(true, 0, Access::USER, true)),
            ("memtype 5 (WP)", 0b001 | 5 << 3, L1, present(true, 0, Access::USER, true)),
            (
                "PA bit 46",
                0b111 | WB | 1 << 46,
                L1,
                Misconfig(PhysAddrBit { bit: 46, phys_bits: 46 }),
            ),
            (
                "PA bit 51",
                0b111 | WB | 1 << 51,
                L1,
                Misconfig(PhysAddrBit { bit: 51, phys_bits: 46 }),
            ),
            ("PA bit 45 is address", 0b111 | WB | 1 << 45, L1, present(true, 1 << 33, RWX, true)),
            (
                "table PA bit 47",
                0b111 | 1 << 47,
                L4,
                Misconfig(PhysAddrBit { bit: 47, phys_bits: 46 }),
            ),
            ("huge bit at L4", 0b111 | BIT_LARGE, L4, Misconfig(HugeBitAtLevel { level: 4 })),
            ("huge bit at L5", 0b111 | BIT_LARGE, L5, Misconfig(HugeBitAtLevel { level: 5 })),
            ("L4 bit 3", 0b111 | 1 << 3, L4, Misconfig(ReservedBit { bit: 3, level: 4 })),
            ("L5 bit 6", 0b111 | 1 << 6, L5, Misconfig(ReservedBit { bit: 6, level: 5 })),
            ("L3 table bit 4", 0b111 | 1 << 4, L3, Misconfig(ReservedBit { bit: 4, level: 3 })),
            ("L2 table bit 6", 0b111 | 1 << 6, L2, Misconfig(ReservedBit { bit: 6, level: 2 })),
            ("L4 table", 0b111 | 1 << 8 | 0x1000, L4, present(false, 1, RWX, true)),
            (
                "1G bit 12",
                0b111 | WB | BIT_LARGE | 1 << 12,
                L3,
                Misconfig(ReservedBit { bit: 12, level: 3 }),
            ),
            (
                "1G bit 29",
                0b111 | WB | BIT_LARGE | 1 << 29,
                L3,
                Misconfig(ReservedBit { bit: 29, level: 3 }),
            ),
            (
                "1G bit 30 ok",
                0b111 | WB | BIT_LARGE | 1 << 30,
                L3,
                present(true, 1 << 18, RWX, true),
            ),
            (
                "2M bit 20",
                0b111 | WB | BIT_LARGE | 1 << 20,
                L2,
                Misconfig(ReservedBit { bit: 20, level: 2 }),
            ),
            (
                "2M bit 21 ok",
                0b111 | WB | BIT_LARGE | 1 << 21,
                L2,
                present(true, 1 << 9, RWX, true),
            ),
            (
                "bit 7 ignored at L1",
                0b111 | WB | BIT_LARGE | 0x3000,
                L1,
                present(true, 3, RWX, true),
            ),
            (
                "SVE and bits 52..62 ignored",
                0b001 | WB | genmask(63, 52),
                L1,
                present(true, 0, Access::USER, true),
            ),
        ];
        run(f, &cases);
        let f52 = fmt(FormatKind::Ept, 52);
        run(
            f52,
            &[(
                "no PA bit reserved at 52",
                0b111 | WB | 1 << 51,
                L1,
                present(true, 1 << 39, RWX, true),
            )],
        );
    }

    /// NPT with 48 physical bits, and NPT+SEV with the C-bit at 47 over 43 physical bits.
    #[test]
    fn npt_classification_table() {
        let f = fmt(FormatKind::Npt, 48);
        const P: u64 = 1;
        const NX: u64 = 1 << 63;
        let rwu = Access::WRITE.union(Access::USER);
        let cases = [
            ("zero", 0, L1, NotPresent),
            ("non-present value", SpteFormat::NONPRESENT, L1, NotPresent),
            ("frozen", SpteFormat::FROZEN, L3, NotPresent),
            ("P=0 with reserved bits", 0x6 | 1 << 51 | BIT_LARGE, L4, NotPresent),
            ("read-only supervisor NX", P | NX | 0x7000, L1, present(true, 7, Access::NONE, true)),
            ("RW user exec", P | 0x6, L1, present(true, 0, Access::ALL, true)),
            ("PA bit 48", P | 1 << 48, L1, Misconfig(PhysAddrBit { bit: 48, phys_bits: 48 })),
            (
                "PA bit 51 (MMIO)",
                P | 0x6 | 1 << 51,
                L2,
                Misconfig(PhysAddrBit { bit: 51, phys_bits: 48 }),
            ),
            ("PA bit 47 is address", P | 1 << 47, L1, present(true, 1 << 35, Access::EXEC, true)),
            ("PS at L4", P | BIT_LARGE, L4, Misconfig(HugeBitAtLevel { level: 4 })),
            ("PS at L5", P | BIT_LARGE, L5, Misconfig(HugeBitAtLevel { level: 5 })),
            ("bit 8 at L4", P | 1 << 8, L4, Misconfig(ReservedBit { bit: 8, level: 4 })),
            (
                "bit 8 at L3 table ok",
                P | 0x6 | 1 << 8 | 0x2000,
                L3,
                present(false, 2, Access::ALL, true),
            ),
            (
                "2M bit 13",
                P | BIT_LARGE | 1 << 13,
                L2,
                Misconfig(ReservedBit { bit: 13, level: 2 }),
            ),
            (
                "2M bit 20",
                P | BIT_LARGE | 1 << 20,
                L2,
                Misconfig(ReservedBit { bit: 20, level: 2 }),
            ),
            (
                "2M bit 12 is PAT",
                P | 0x6 | BIT_LARGE | 1 << 12 | 1 << 21,
                L2,
                present(true, 1 << 9 | 1, Access::ALL, true),
            ),
            (
                "1G bit 29",
                P | BIT_LARGE | 1 << 29,
                L3,
                Misconfig(ReservedBit { bit: 29, level: 3 }),
            ),
            (
                "1G bit 30 ok",
                P | BIT_LARGE | 1 << 30,
                L3,
                present(true, 1 << 18, Access::EXEC, true),
            ),
            (
                "bit 7 is PAT at L1",
                P | 0x2 | BIT_LARGE,
                L1,
                present(true, 0, Access::WRITE.union(Access::EXEC), true),
            ),
            (
                "bits 52..62 ignored",
                P | 0x6 | NX | genmask(62, 52),
                L1,
                present(true, 0, rwu, true),
            ),
        ];
        run(f, &cases);

        let sev = fmt(FormatKind::NptSev { c_bit: 47 }, 43);
        run(
            sev,
            &[
                (
                    "C-bit is not reserved",
                    P | 0x6 | 1 << 47 | 0x1000,
                    L1,
                    present(true, 1, Access::ALL, true),
                ),
                (
                    "bit 43 is reserved",
                    P | 1 << 43 | 1 << 47,
                    L1,
                    Misconfig(PhysAddrBit { bit: 43, phys_bits: 43 }),
                ),
                (
                    "bit 48 is reserved",
                    P | 1 << 48,
                    L1,
                    Misconfig(PhysAddrBit { bit: 48, phys_bits: 43 }),
                ),
            ],
        );
        run(
            fmt(FormatKind::Npt, 52),
            &[(
                "no PA bit reserved at 52",
                P | 1 << 51,
                L1,
                present(true, 1 << 39, Access::EXEC, true),
            )],
        );
    }

    #[test]
    fn made_entries_classify_as_present_with_their_rights() {
        for kind in [FormatKind::Ept, FormatKind::Npt, FormatKind::NptSev { c_bit: 45 }] {
            let f = fmt(kind, 44);
            for level in [L1, L2, L3] {
                let pfn = Pfn(3 * level.pages());
                let leaf = f.make_leaf(pfn, level, Access::ALL, true);
                assert_eq!(f.classify(leaf, level), present(true, pfn.raw(), Access::ALL, true));
                let ro = f.make_leaf(pfn, level, Access::USER, true);
                assert_eq!(f.classify(ro, level), present(true, pfn.raw(), Access::USER, true));
            }
            for level in [L2, L3, L4, L5] {
                let nl = f.make_nonleaf(Pfn(9));
                assert_eq!(f.classify(nl, level), present(false, 9, Access::ALL, true), "{kind:?}");
            }
        }
    }

    /// PAE root entries (the shadow MMU's special roots) are PDPTEs: the ones the MMU makes
    /// load; what a page-table entry carries above them (W, U, A, NX) is reserved there.
    #[test]
    fn pae_root_entries_are_pdptes_the_cpu_loads() {
        for kind in [FormatKind::Npt, FormatKind::NptSev { c_bit: 47 }] {
            let f = fmt(kind, 46);
            let e = f.make_pae_root_entry(Pfn(0x1234));
            assert_eq!(f.classify_pdpte(e), PdpteEntry::Present { table: Pfn(0x1234) }, "{kind:?}");
            assert!(SpteFormat::is_mmu_present(e));
            // A table entry's full rights are reserved bits in a PDPTE.
            let nl = f.make_nonleaf(Pfn(0x1234));
            assert!(matches!(f.classify_pdpte(nl), PdpteEntry::Reserved { .. }), "{kind:?}");
        }
        let f = fmt(FormatKind::Npt, 46);
        let table = NPT_P | 0x5000;
        for (name, e, want) in [
            ("not present, whatever else", SpteFormat::NONPRESENT | 0x1e6, PdpteEntry::NotPresent),
            ("W", table | 1 << 1, PdpteEntry::Reserved { bits: 1 << 1 }),
            ("U", table | 1 << 2, PdpteEntry::Reserved { bits: 1 << 2 }),
            ("A", table | 1 << 5, PdpteEntry::Reserved { bits: 1 << 5 }),
            ("PS", table | 1 << 7, PdpteEntry::Reserved { bits: 1 << 7 }),
            ("NX", table | 1 << 63, PdpteEntry::Reserved { bits: 1 << 63 }),
            ("past MAXPHYADDR", table | 1 << 46, PdpteEntry::Reserved { bits: 1 << 46 }),
            ("bits 52..62", table | 1 << 60, PdpteEntry::Reserved { bits: 1 << 60 }),
            ("PWT, PCD, ignored 11:9", table | 0x18 | 0xe00, PdpteEntry::Present { table: Pfn(5) }),
        ] {
            assert_eq!(f.classify_pdpte(e), want, "{name}");
        }
    }

    #[test]
    fn reasons_read_as_sentences() {
        extern crate alloc;
        use alloc::string::ToString;
        let s = PhysAddrBit { bit: 51, phys_bits: 46 }.to_string();
        assert_eq!(s, "physical-address bit 51 is set but MAXPHYADDR is 46");
        assert!(WriteWithoutRead { xwr: 6 }.to_string().contains("XWR=110"));
    }

    /// The fast accept of `has_reserved_bits` answers exactly as the full rule, for every format
    /// and level, on random entries biased towards clean table entries.
    #[test]
    fn fast_accept_agrees_with_the_full_rule() {
        let formats = [
            fmt(FormatKind::Ept, 36),
            fmt(FormatKind::Ept, 46),
            fmt(FormatKind::Ept, 52),
            fmt(FormatKind::Npt, 40),
            fmt(FormatKind::Npt, 52),
            fmt(FormatKind::NptSev { c_bit: 47 }, 43),
        ];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        // Miri interprets every instruction: a sample there, the full sweep natively.
        let n = if cfg!(miri) { 500 } else { 200_000u32 };
        for i in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Every other entry keeps only a few low bits and an address, like real tables.
            let spte = if i % 2 == 0 { x & (0xfff | (0xff_ffff << 12) | (1 << 63)) } else { x };
            for f in &formats {
                for level in [L1, L2, L3, L4, L5] {
                    assert_eq!(
                        f.has_reserved_bits(spte, level),
                        f.reserved_bits_rule(spte, level),
                        "{f:?} {spte:#x} at {level:?}"
                    );
                }
            }
        }
    }

    /// The fast accept answers as the full rule on every entry with exactly one bit set (or
    /// none), and on the entries made of exactly the bits its mask test looks at, for every
    /// format and level: such entries are where a slip in its guard or its mask test shows (the
    /// page-size bit alone at level 4 or 5 is `HugeBitAtLevel`; the reserved PA bits with or
    /// without the table-reserved bits are `PhysAddrBit`, never clean).
    #[test]
    fn fast_accept_agrees_with_the_full_rule_on_single_bits() {
        let formats = [
            fmt(FormatKind::Ept, 46),
            fmt(FormatKind::Npt, 48),
            fmt(FormatKind::NptSev { c_bit: 47 }, 43),
        ];
        for f in &formats {
            for level in [L1, L2, L3, L4, L5] {
                let pa = f.reserved_pa_mask();
                let masks = [0, pa, pa | genmask(6, 3), pa | 1 << 8];
                for spte in masks.into_iter().chain((0..64).map(|b| 1u64 << b)) {
                    assert_eq!(
                        f.has_reserved_bits(spte, level),
                        f.reserved_bits_rule(spte, level),
                        "{f:?} {spte:#x} at {level:?}"
                    );
                }
            }
            for level in [L4, L5] {
                let want = Some(HugeBitAtLevel { level: level.get() });
                assert_eq!(f.has_reserved_bits(BIT_LARGE, level), want, "{f:?}");
            }
        }
    }
}
