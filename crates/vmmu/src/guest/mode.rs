//! The guest CPU state a walk depends on: the paging mode (with the PAE PDPTRs loaded at CR3
//! load), CR3, CR0.WP, EFER.NX, the guest MAXPHYADDR and whether its CPUID has 1 GiB pages
//! (KVM's `cpu_role` plus `mmu->pdptrs` and `guest_can_use(X86_FEATURE_GBPAGES)`).
//!
//! Invariants this module owns:
//! - in PAE mode the PDPTEs are read from memory only by [`load_pdptrs`], at CR3 load (KVM's
//!   `load_pdptrs` from `kvm_set_cr3`); a walk uses [`PagingMode::Pae`]'s copy and never re-reads
//!   them, so a guest write to its PDPT takes effect at the next CR3 load, as on hardware;
//! - [`load_pdptrs`] refuses a present PDPTE with a reserved bit ([`pte::pdpte_rsvd_mask`]), so
//!   PDPTRs that came from it have none and a walk only checks their P bit. PDPTRs written into a
//!   `PagingMode::Pae` by hand are trusted the same way.

use super::pte;
use super::walk::GuestPteMemory;
use crate::types::Gpa;

/// The guest's paging mode.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PagingMode {
    /// CR0.PG = 0: guest-virtual is guest-physical.
    NonPaging,
    /// 32-bit PAE paging (CR4.PAE, no EFER.LMA): a PDPTE from `pdptrs[gva[31:30]]`, then a PD and
    /// a PT. `pdptrs` as [`load_pdptrs`] returned them at the last CR3 load.
    Pae {
        /// The four PDPTEs loaded at CR3 load.
        pdptrs: [u64; 4],
    },
    /// x86-64 4-level paging (EFER.LMA, no CR4.LA57).
    Long4,
}

/// The guest CPU state a walk reads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct GuestCpu {
    /// The paging mode.
    pub mode: PagingMode,
    /// CR3: the PML4 address (4-level, bits 51:12) or the PDPT address (PAE, bits 31:5). Unused
    /// without paging.
    pub cr3: u64,
    /// CR0.WP: supervisor writes honour RW.
    pub cr0_wp: bool,
    /// EFER.NX: the NX bit is honoured (reserved otherwise).
    pub efer_nx: bool,
    /// The guest's MAXPHYADDR (CPUID 0x80000008 EAX bits 7:0), 36..=52 on real CPUs.
    pub maxphyaddr: u8,
    /// The guest's CPUID has 1 GiB pages (`CPUID.80000001H:EDX.Page1GB`, QEMU's `pdpe1gb`):
    /// with 4-level paging a PDPTE with PS maps a 1 GiB page; without, PS there is reserved
    /// (a #PF with RSVD). PAE has no 1 GiB pages either way.
    pub gbpages: bool,
}

impl GuestCpu {
    /// A 64-bit OS's usual CPU: x86-64 4-level paging from the PML4 at `cr3`, with CR0.WP and
    /// EFER.NX on, and the guest MAXPHYADDR `maxphyaddr`; without 1 GiB pages (QEMU's default
    /// CPU models lack them; set [`Self::gbpages`] for one that has them).
    pub const fn long4(cr3: u64, maxphyaddr: u8) -> GuestCpu {
        GuestCpu {
            mode: PagingMode::Long4,
            cr3,
            cr0_wp: true,
            efer_nx: true,
            maxphyaddr,
            gbpages: false,
        }
    }

    /// The largest page this guest's tables can map: 1 GiB with 4-level paging and
    /// [`Self::gbpages`], else 2 MiB (PAE, 4-level without 1 GiB pages; without paging the
    /// 4 KiB "page" of an address is the answer, but 2 MiB is a safe bound). A cache that only
    /// knows a gva's leaf lies somewhere in its guest page uses this size for INVLPG.
    pub const fn largest_page_level(&self) -> crate::types::Level {
        match (self.mode, self.gbpages) {
            (PagingMode::Long4, true) => crate::types::Level::L1G,
            _ => crate::types::Level::L2M,
        }
    }

    /// A guest with paging off (CR0.PG = 0: real mode, or protected mode without paging, as
    /// firmware runs), guest MAXPHYADDR `maxphyaddr`: its addresses are guest-physical, below
    /// 4 GiB.
    pub const fn non_paging(maxphyaddr: u8) -> GuestCpu {
        GuestCpu {
            mode: PagingMode::NonPaging,
            cr3: 0,
            cr0_wp: true,
            efer_nx: false,
            maxphyaddr,
            gbpages: false,
        }
    }
}

/// Why a PAE CR3 load failed: architecturally #GP(0) on the MOV to CR3 (KVM's `kvm_set_cr3`
/// returns 1 when `load_pdptrs` fails).
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum PdptrError {
    /// The PDPT is not in guest memory a memslot backs.
    #[error("PDPTE {index} at gpa {gpa} cannot be read")]
    Unreadable {
        /// Which PDPTE (0..=3).
        index: usize,
        /// Where it should be.
        gpa: Gpa,
    },
    /// A present PDPTE has reserved bits set.
    #[error("PDPTE {index} = {pdpte:#x} has reserved bits {bits:#x}")]
    Reserved {
        /// Which PDPTE (0..=3).
        index: usize,
        /// Its value.
        pdpte: u64,
        /// The reserved bits it sets.
        bits: u64,
    },
}

/// Loads the four PAE PDPTEs at `cr3 & !0x1f` (the 32-byte-aligned PDPT) for a guest with
/// `maxphyaddr` physical-address bits. A not-present PDPTE may hold anything; a present one must
/// have no bit of [`pte::pdpte_rsvd_mask`]. On error the caller injects #GP and keeps the old
/// CR3 and PDPTRs.
pub fn load_pdptrs(
    mem: &impl GuestPteMemory,
    cr3: u64,
    maxphyaddr: u8,
) -> Result<[u64; 4], PdptrError> {
    let base = cr3 & !0x1f;
    let mut pdptrs = [0u64; 4];
    for (index, slot) in pdptrs.iter_mut().enumerate() {
        let gpa = Gpa(base + 8 * index as u64);
        *slot = mem.read_gpte(gpa).ok_or(PdptrError::Unreadable { index, gpa })?;
    }
    let rsvd = pte::pdpte_rsvd_mask(maxphyaddr);
    for (index, &pdpte) in pdptrs.iter().enumerate() {
        if pdpte & pte::P != 0 && pdpte & rsvd != 0 {
            return Err(PdptrError::Reserved { index, pdpte, bits: pdpte & rsvd });
        }
    }
    Ok(pdptrs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::testmem::GuestMemoryMap;

    const PDPT: u64 = 0x5000 + 0x40;

    fn mem_with(pdptes: [u64; 4]) -> GuestMemoryMap {
        let m = GuestMemoryMap::new();
        for (i, e) in pdptes.iter().enumerate() {
            m.write(Gpa(PDPT + 8 * i as u64), *e);
        }
        m
    }

    #[test]
    fn loads_four_pdptes_from_the_32_byte_aligned_address() {
        let e = [0x1000 | pte::P, 0, 0x3000 | pte::P | pte::PWT | pte::PCD, 0xdead_0000];
        let m = mem_with(e);
        assert_eq!(load_pdptrs(&m, PDPT | 0x1f, 36), Ok(e));
    }

    #[test]
    fn present_pdpte_reserved_bits_are_gp() {
        for bit in [1u32, 2, 5, 6, 7, 8, 36, 62, 63] {
            let bad = 0x1000 | pte::P | (1u64 << bit);
            let m = mem_with([pte::P, 0, bad, 0]);
            assert_eq!(
                load_pdptrs(&m, PDPT, 36),
                Err(PdptrError::Reserved { index: 2, pdpte: bad, bits: 1 << bit }),
                "bit {bit}"
            );
        }
        // MAXPHYADDR 52: bit 51 is an address bit; not-present entries are never checked.
        let m = mem_with([pte::P | (1 << 51), (1 << 63) | 0b110, 0, 0]);
        assert!(load_pdptrs(&m, PDPT, 52).is_ok());
    }

    #[test]
    fn unreadable_pdpt_is_an_error() {
        let m = GuestMemoryMap::new();
        assert_eq!(
            load_pdptrs(&m, PDPT, 36),
            Err(PdptrError::Unreadable { index: 0, gpa: Gpa(PDPT) })
        );
    }
}
