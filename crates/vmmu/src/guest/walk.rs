//! The guest page-table walker of the shadow MMU (KVM's `FNAME(walk_addr_generic)` for 64-bit
//! gPTEs; facts §2): translates a guest-virtual address through the guest's own tables in guest
//! memory, checks present, reserved and permission bits, sets accessed/dirty bits, and either
//! returns the translation with what the shadow MMU needs ([`GuestWalk`]) or the #PF the guest
//! must receive ([`GuestPageFault`]), which the caller injects: a guest fault is never an MMU
//! error.
//!
//! Invariants this module owns:
//! - the walk reads each level's gPTE once per attempt and decides on that value; the A/D update
//!   is a `cmpxchg` against it, and a lost race restarts the whole walk (KVM's `retry_walk`), so
//!   what is returned was consistent in guest memory at some point of the last attempt;
//! - the error code is KVM's: 0 (not present, unbacked table), `RSVD|P`, or `P` (permission),
//!   then `|W|U` from the access and `|FETCH` for a fetch when EFER.NX (facts §2.4);
//! - `pte_access` of a non-write access lacks W unless the leaf is dirty (`protect_clean_gpte`),
//!   so the first write through a shadow of a clean gPTE faults and sets D;
//! - a walk allocates nothing and takes no lock (it runs on the uncached MMIO path); it holds no
//!   state between calls.
//!
//! Where we differ from KVM, and why:
//! - a non-canonical GVA (4-level) or a GVA above 4 GiB (PAE, or no paging) is
//!   [`WalkError::NonCanonical`] ([`gva_reachable`]):
//!   on hardware that is #GP before any walk; KVM's walker never sees one (the exit or the
//!   emulator has checked), a library caller might;
//! - a walk that loses the A/D `cmpxchg` race [`MAX_RESTARTS`] times in a row gives up with
//!   [`WalkError::Contended`] instead of looping forever as KVM does: a guest that rewrites a gPTE
//!   in a tight loop cannot livelock the caller, which re-runs the access (the shadow MMU answers
//!   `Retry`: the vCPU re-enters the guest and faults again). It never returns a translation
//!   whose A/D bits are not in guest memory: a writable mapping of a gPTE whose D bit is clear
//!   would let the guest write a page its OS believes clean;
//! - PAE: KVM's walker starts at level 2 (`walker.max_level` = 2); here the PDPTE is reported at
//!   index 2 of the per-level arrays and `max_level` is 3 (its A bit is never set: bit 5 of a
//!   PDPTE is reserved);
//! - no SMEP, SMAP, protection keys, 5-level or 32-bit (non-PAE) paging, no nested (L2→L1) GPA
//!   translation. 1 GiB guest pages only where the guest's CPUID has them
//!   ([`GuestCpu::gbpages`]; else PS in a PDPTE is reserved, see [`super::pte`]).

use super::mode::{GuestCpu, PagingMode};
use super::pte::{self, RsvdMasks, TableFormat};
use crate::fault::PfErr;
use crate::types::{Access, FaultAccess, Gfn, Gpa, Gva, Level, PAGE_SHIFT};

/// Guest memory as the walker sees it (the shadow MMU implements this over memslots + host).
pub trait GuestPteMemory {
    /// Reads the 8-byte gPTE at `gpa` (8-aligned). `None`: no visible memslot backs it (or the
    /// host cannot read it).
    fn read_gpte(&self, gpa: Gpa) -> Option<u64>;
    /// Atomically replaces the gPTE at `gpa` if it still equals `old`. `Ok(true)` swapped,
    /// `Ok(false)` lost the race (the walker restarts), `Err(NotWritable)` the table lies in
    /// read-only memory (A/D update skipped, as KVM does for read-only memslots),
    /// `Err(Unreadable)` nothing there.
    fn cmpxchg_gpte(&self, gpa: Gpa, old: u64, new: u64) -> Result<bool, GpteWriteError>;
}

/// Why [`GuestPteMemory::cmpxchg_gpte`] could not write.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum GpteWriteError {
    /// The table lies in read-only memory (a read-only memslot): the walker skips the update.
    #[error("the guest page table is in read-only memory")]
    NotWritable,
    /// Nothing readable there any more: the walker reports a not-present #PF (KVM: `-EFAULT`
    /// from `__try_cmpxchg_user`, `goto error` with error code 0).
    #[error("the guest page table is not backed")]
    Unreadable,
}

/// Lost A/D `cmpxchg` races after which [`walk`] gives up with [`WalkError::Contended`].
pub const MAX_RESTARTS: u32 = 16;

/// A successful walk (KVM's `struct guest_walker`). Per-level arrays are indexed `level - 1`;
/// entries for levels not walked are zero ([`Gfn`]`(0)`, `0`, [`Gpa`]`(0)`, [`Access::NONE`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct GuestWalk {
    /// The frame of the translated address (for a 2 MiB leaf: its base frame plus the 4 KiB index
    /// of the address within it).
    pub gfn: Gfn,
    /// The full translated address, page offset included.
    pub gpa: Gpa,
    /// The guest leaf level: [`Level::L4K`], [`Level::L2M`], or [`Level::L1G`] for a 4-level
    /// guest with 1 GiB pages. Without paging: [`Level::L2M`], the largest page KVM's non-paging
    /// (direct) MMU maps for such a guest.
    pub level: Level,
    /// The effective `ACC_*` rights of the leaf: W and U ANDed along the walk, X unless some
    /// level has NX; W removed for a non-write access when the leaf is not dirty.
    /// [`Access::ALL`] without paging.
    pub pte_access: Access,
    /// The rights accumulated above each level, not counting that level's own gPTE (KVM's
    /// `walker.pt_access`; the role access of the shadow page for the table at that level).
    pub pt_access: [Access; 5],
    /// The gfn of the guest table read at each level. PAE: index 2 is the PDPT's frame
    /// (`cr3 >> 12`), though the PDPT is 32 bytes, not a page.
    pub table_gfns: [Gfn; 5],
    /// The gPTE used at each level, after this walk's A/D updates (PAE: index 2 is the loaded
    /// PDPTE).
    pub ptes: [u64; 5],
    /// Where each gPTE was read (PAE: index 2 is where the PDPTE was loaded from).
    pub pte_gpas: [Gpa; 5],
    /// The root level walked: [`Level::L4`] for 4-level, [`Level::L1G`] (3) for PAE; without
    /// paging, [`Level::L2M`] like `level` (no table is read).
    pub max_level: Level,
}

/// A #PF for the guest: the faulting address (CR2) and the architectural error code.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[error("guest #PF at {addr} (error code {:#x})", error_code.0)]
pub struct GuestPageFault {
    /// The guest-virtual address (CR2).
    pub addr: Gva,
    /// P, W, U, RSVD, FETCH as the CPU would report them.
    pub error_code: PfErr,
}

/// Why a walk gave no translation.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum WalkError {
    /// The guest gets a #PF.
    #[error(transparent)]
    PageFault(#[from] GuestPageFault),
    /// The address is not canonical (4-level: bits 63:47 not all equal; PAE or no paging:
    /// above 4 GiB):
    /// architecturally #GP, never a #PF.
    #[error("non-canonical guest address {0}")]
    NonCanonical(Gva),
    /// The accessed/dirty update lost [`MAX_RESTARTS`] races in a row (another vCPU kept
    /// rewriting the gPTEs): nothing was decided and guest memory lacks the A/D bits this access
    /// needs. Re-run the access, as hardware re-walks; the shadow MMU answers `Retry`.
    #[error("guest page tables at {0} kept changing under the walk; re-run the access")]
    Contended(Gva),
}

/// Walks the guest's tables for an `access` to `gva` (see the module doc for the rules).
///
/// ```
/// use core::cell::RefCell;
/// use vmmu::guest::{walk, GpteWriteError, GuestCpu, GuestPteMemory, PagingMode, WalkError};
/// use vmmu::{Access, FaultAccess, Gpa, Gva, Level};
///
/// /// Guest memory: a few gPTEs at fixed addresses.
/// struct Mem(RefCell<Vec<(u64, u64)>>);
/// impl GuestPteMemory for Mem {
///     fn read_gpte(&self, gpa: Gpa) -> Option<u64> {
///         self.0.borrow().iter().find(|e| e.0 == gpa.0).map(|e| e.1)
///     }
///     fn cmpxchg_gpte(&self, gpa: Gpa, old: u64, new: u64) -> Result<bool, GpteWriteError> {
///         let mut m = self.0.borrow_mut();
///         let e = m.iter_mut().find(|e| e.0 == gpa.0).ok_or(GpteWriteError::Unreadable)?;
///         let swapped = e.1 == old;
///         if swapped {
///             e.1 = new;
///         }
///         Ok(swapped)
///     }
/// }
///
/// // PML4 at 0x1000, PDPT at 0x2000, a 2 MiB page at 0x4000_0000 (present, writable, user).
/// let mem = Mem(RefCell::new(vec![(0x1000, 0x2000 | 0x7), (0x2000, 0x3000 | 0x7), (0x3000, 0x4000_0000 | 0x87)]));
/// let cpu = GuestCpu::long4(0x1000, 40);
///
/// let w = walk(&cpu, &mem, Gva(0x12_3456), FaultAccess::READ).unwrap();
/// assert_eq!((w.gpa, w.level), (Gpa(0x4012_3456), Level::L2M));
/// // The page is clean: a read's rights lack W, so the first write faults in the shadow and sets D.
/// assert!(!w.pte_access.contains(Access::WRITE));
/// assert_eq!(mem.read_gpte(Gpa(0x3000)), Some(0x4000_0000 | 0x87 | 0x20), "A set, D not");
///
/// // Nothing mapped at 1 GiB: a not-present #PF for the guest (error code W for a write).
/// match walk(&cpu, &mem, Gva(1 << 30), FaultAccess::WRITE) {
///     Err(WalkError::PageFault(f)) => assert_eq!(f.error_code.0, 0b10),
///     other => panic!("{other:?}"),
/// }
/// ```
pub fn walk(
    cpu: &GuestCpu,
    mem: &impl GuestPteMemory,
    gva: Gva,
    access: FaultAccess,
) -> Result<GuestWalk, WalkError> {
    if !gva_reachable(cpu.mode, gva) {
        return Err(WalkError::NonCanonical(gva));
    }
    let root = match cpu.mode {
        PagingMode::NonPaging => return Ok(nonpaging(gva)),
        PagingMode::Pae { pdptrs } => Root::Pae(pdptrs),
        PagingMode::Long4 => Root::Long4,
    };
    let walker = Walker { cpu, masks: root.masks(cpu), root, gva, access };
    let mut restarts = 0;
    loop {
        let mut w = walker.walk_once(mem)?;
        match walker.update_accessed_dirty(mem, &mut w) {
            AdOutcome::Done => return Ok(w),
            AdOutcome::Unreadable => return Err(walker.fault(0).into()),
            AdOutcome::Raced => {
                restarts += 1;
                if restarts >= MAX_RESTARTS {
                    return Err(WalkError::Contended(gva));
                }
            }
        }
    }
}

/// Whether a guest in `mode` can make an access at `gva` at all: canonical with 4-level paging,
/// below 4 GiB with PAE paging or without paging (the linear address is 32 bits wide: CR0.PG=0
/// implies no long mode). Anything else is #GP on hardware, never a page fault; the shadow
/// tables do not cover it either (a PAE or non-paging shadow root spans 4 GiB, a 4-level one the
/// canonical halves), so a walk of them would alias a reachable address.
pub fn gva_reachable(mode: PagingMode, gva: Gva) -> bool {
    match mode {
        PagingMode::NonPaging | PagingMode::Pae { .. } => below_4g(gva),
        PagingMode::Long4 => canonical(gva),
    }
}

/// Whether `gva` is canonical for 4-level paging (bits 63:47 all equal).
#[inline]
pub(crate) fn canonical(gva: Gva) -> bool {
    ((gva.0 << 16) as i64 >> 16) as u64 == gva.0
}

/// Whether `gva` is a 32-bit linear address (no paging, or PAE paging).
#[inline]
pub(crate) fn below_4g(gva: Gva) -> bool {
    gva.0 >> 32 == 0
}

/// Without paging: the identity, every right.
fn nonpaging(gva: Gva) -> GuestWalk {
    GuestWalk {
        gfn: Gfn(gva.0 >> PAGE_SHIFT),
        gpa: Gpa(gva.0),
        level: Level::L2M,
        pte_access: Access::ALL,
        pt_access: [Access::NONE; 5],
        table_gfns: [Gfn(0); 5],
        ptes: [0; 5],
        pte_gpas: [Gpa(0); 5],
        max_level: Level::L2M,
    }
}

/// Where the walk starts.
#[derive(Clone, Copy)]
enum Root {
    Long4,
    Pae([u64; 4]),
}

impl Root {
    fn masks(self, cpu: &GuestCpu) -> RsvdMasks {
        let format = match self {
            Root::Long4 => TableFormat::Long4,
            Root::Pae(_) => TableFormat::Pae,
        };
        RsvdMasks::of(format, cpu)
    }
}

/// The A/D update's result.
enum AdOutcome {
    Done,
    Raced,
    Unreadable,
}

/// One walk's fixed inputs.
struct Walker<'a> {
    cpu: &'a GuestCpu,
    masks: RsvdMasks,
    root: Root,
    gva: Gva,
    access: FaultAccess,
}

impl Walker<'_> {
    /// The #PF with base error code `base` (0, `RSVD|P` or `P`), completed from the access.
    fn fault(&self, base: u64) -> GuestPageFault {
        let mut e = base;
        if self.access.write {
            e |= PfErr::WRITE;
        }
        if self.access.user {
            e |= PfErr::USER;
        }
        if self.access.exec && self.cpu.efer_nx {
            e |= PfErr::FETCH;
        }
        GuestPageFault { addr: self.gva, error_code: PfErr(e) }
    }

    /// One attempt: read every level, check, translate; no memory is written.
    fn walk_once(&self, mem: &impl GuestPteMemory) -> Result<GuestWalk, GuestPageFault> {
        let addr_mask = pte::addr_mask(self.cpu.maxphyaddr);
        let mut w = GuestWalk {
            gfn: Gfn(0),
            gpa: Gpa(0),
            level: Level::L4K,
            pte_access: Access::ALL,
            pt_access: [Access::NONE; 5],
            table_gfns: [Gfn(0); 5],
            ptes: [0; 5],
            pte_gpas: [Gpa(0); 5],
            max_level: Level::L4,
        };
        let (mut level, mut table) = match self.root {
            Root::Long4 => (Level::L4, self.cpu.cr3 & addr_mask),
            Root::Pae(pdptrs) => {
                let index = ((self.gva.0 >> 30) & 3) as usize;
                let pdpt = self.cpu.cr3 & !0x1f;
                let pdpte = pdptrs[index];
                w.max_level = Level::L1G;
                w.table_gfns[2] = Gfn(pdpt >> PAGE_SHIFT);
                w.pte_gpas[2] = Gpa(pdpt + 8 * index as u64);
                if pdpte & pte::P == 0 {
                    return Err(self.fault(0));
                }
                w.ptes[2] = pdpte;
                w.pt_access[2] = Access::ALL;
                (Level::L2M, pdpte & addr_mask)
            }
        };
        let mut acc = Access::ALL;
        let leaf = loop {
            let i = usize::from(level.get() - 1);
            let index = (self.gva.0 >> level.shift()) & 511;
            let gpa = Gpa(table + 8 * index);
            w.table_gfns[i] = Gfn(table >> PAGE_SHIFT);
            w.pte_gpas[i] = gpa;
            let gpte = mem.read_gpte(gpa).ok_or_else(|| self.fault(0))?;
            if gpte & pte::P == 0 {
                return Err(self.fault(0));
            }
            if self.masks.reserved_bits_set(level, gpte) != 0 {
                return Err(self.fault(PfErr::RSVD | PfErr::PRESENT));
            }
            w.ptes[i] = gpte;
            w.pt_access[i] = acc;
            acc = acc.intersect(pte::gpte_access(gpte));
            if pte::is_last_gpte(level, gpte) {
                break gpte;
            }
            table = gpte & addr_mask;
            // Level 1 is always last, so a non-leaf level has one below it.
            level = match level.lower() {
                Some(l) => l,
                None => break gpte,
            };
        };
        if self.permission_fault(acc) {
            return Err(self.fault(PfErr::PRESENT));
        }
        w.level = level;
        let page_mask = (level.pages() - 1) << PAGE_SHIFT;
        let base = leaf & addr_mask & !page_mask;
        w.gpa = Gpa(base | (self.gva.0 & ((level.pages() << PAGE_SHIFT) - 1)));
        w.gfn = w.gpa.gfn();
        w.pte_access = if !self.access.write && leaf & pte::D == 0 {
            Access::from_bits(acc.bits() & !Access::WRITE.bits())
        } else {
            acc
        };
        Ok(w)
    }

    /// KVM's `permission_fault` without SMEP/SMAP/PKU: a user access to a supervisor page, a
    /// write to a read-only page (supervisor writes only with CR0.WP), a fetch from an NX page
    /// (only with EFER.NX; without it NX is reserved and never reaches here).
    fn permission_fault(&self, acc: Access) -> bool {
        let a = self.access;
        (a.user && !acc.contains(Access::USER))
            || (a.write && !acc.contains(Access::WRITE) && (a.user || self.cpu.cr0_wp))
            || (a.exec && self.cpu.efer_nx && !acc.contains(Access::EXEC))
    }

    /// Sets A on every walked level that lacks it (from the root down; not on a PAE PDPTE) and D
    /// on the leaf of a write (KVM's `FNAME(update_accessed_dirty_bits)`).
    fn update_accessed_dirty(&self, mem: &impl GuestPteMemory, w: &mut GuestWalk) -> AdOutcome {
        let top = match self.root {
            Root::Long4 => Level::L4,
            Root::Pae(_) => Level::L2M,
        };
        for l in (w.level.get()..=top.get()).rev() {
            let i = usize::from(l - 1);
            let old = w.ptes[i];
            let mut new = old | pte::A;
            if l == w.level.get() && self.access.write {
                new |= pte::D;
            }
            if new == old {
                continue;
            }
            match mem.cmpxchg_gpte(w.pte_gpas[i], old, new) {
                Ok(true) => w.ptes[i] = new,
                Ok(false) => return AdOutcome::Raced,
                Err(GpteWriteError::NotWritable) => {}
                Err(GpteWriteError::Unreadable) => return AdOutcome::Unreadable,
            }
        }
        AdOutcome::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::load_pdptrs;
    use crate::guest::pte::{A, D, NX, P, PS, RW, US};
    use crate::guest::testmem::GuestMemoryMap;

    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const PT: u64 = 0x4000;
    const PAGE: u64 = 0x10_0000;
    const UPPER: u64 = P | RW | US | A;
    const LEAF: u64 = P | RW | US | A | D;
    /// Indices 1, 2, 3, 4 at levels 4..1, offset 0x123.
    const GVA: Gva = Gva((1 << 39) | (2 << 30) | (3 << 21) | (4 << 12) | 0x123);

    const R: FaultAccess = FaultAccess::READ;
    const W: FaultAccess = FaultAccess::WRITE;
    const UR: FaultAccess = FaultAccess { write: false, exec: false, user: true };
    const UW: FaultAccess = FaultAccess { write: true, exec: false, user: true };
    const X: FaultAccess = FaultAccess { write: false, exec: true, user: false };

    fn cpu() -> GuestCpu {
        GuestCpu::long4(PML4, 40)
    }

    /// Where the gPTE for `GVA` at `level` lives.
    fn slot(level: u8) -> Gpa {
        match level {
            4 => Gpa(PML4 + 8),
            3 => Gpa(PDPT + 16),
            2 => Gpa(PD + 24),
            _ => Gpa(PT + 32),
        }
    }

    /// A 4-level path for `GVA` with the given flag bits per level (`[l1, l2, l3, l4]`).
    fn tables(flags: [u64; 4]) -> GuestMemoryMap {
        let m = GuestMemoryMap::new();
        m.write(slot(4), PDPT | flags[3]);
        m.write(slot(3), PD | flags[2]);
        m.write(slot(2), PT | flags[1]);
        m.write(slot(1), PAGE | flags[0]);
        m
    }

    fn std_tables() -> GuestMemoryMap {
        tables([LEAF, UPPER, UPPER, UPPER])
    }

    fn pf(r: Result<GuestWalk, WalkError>) -> u64 {
        match r {
            Err(WalkError::PageFault(f)) => {
                assert_eq!(f.addr, GVA);
                f.error_code.0
            }
            other => panic!("expected a #PF, got {other:?}"),
        }
    }

    const PRES: u64 = PfErr::PRESENT;
    const WR: u64 = PfErr::WRITE;
    const USR: u64 = PfErr::USER;
    const RSVD: u64 = PfErr::RSVD;
    const FETCH: u64 = PfErr::FETCH;

    #[test]
    fn translates_a_4k_page_and_reports_every_level() {
        let m = std_tables();
        let w = walk(&cpu(), &m, GVA, R).expect("walk");
        assert_eq!(w.gpa, Gpa(PAGE | 0x123));
        assert_eq!(w.gfn, Gfn(PAGE >> 12));
        assert_eq!(w.level, Level::L4K);
        assert_eq!(w.max_level, Level::L4);
        assert_eq!(w.pte_access, Access::ALL);
        let all = Access::ALL;
        assert_eq!(w.pt_access, [all, all, all, all, Access::NONE]);
        assert_eq!(
            w.table_gfns,
            [Gfn(PT >> 12), Gfn(PD >> 12), Gfn(PDPT >> 12), Gfn(PML4 >> 12), Gfn(0)]
        );
        assert_eq!(w.pte_gpas, [slot(1), slot(2), slot(3), slot(4), Gpa(0)]);
        assert_eq!(w.ptes, [PAGE | LEAF, PT | UPPER, PD | UPPER, PDPT | UPPER, 0]);
        assert_eq!(m.cmpxchg_calls(), 0, "A and D already set: nothing to write");
    }

    #[test]
    fn pt_access_is_what_the_levels_above_grant() {
        // PML4E: no W; PDPTE: NX; PDE: no U.
        let m = tables([LEAF, P | RW | A, UPPER | NX, P | US | A]);
        let w = walk(&cpu(), &m, GVA, R).expect("walk");
        let ux = Access::USER.union(Access::EXEC);
        assert_eq!(w.pt_access[3], Access::ALL);
        assert_eq!(w.pt_access[2], ux);
        assert_eq!(w.pt_access[1], Access::USER);
        assert_eq!(w.pt_access[0], Access::NONE);
        assert_eq!(w.pte_access, Access::NONE);
    }

    #[test]
    fn translates_a_2m_page_to_base_plus_index() {
        let m = std_tables();
        m.write(slot(2), 0x4000_0000 | LEAF | PS | (1 << 12)); // bit 12 is PAT
        let w = walk(&cpu(), &m, GVA, R).expect("walk");
        assert_eq!(w.level, Level::L2M);
        assert_eq!(w.gfn, Gfn(0x4_0000 + 4));
        assert_eq!(w.gpa, Gpa(0x4000_0000 + (4 << 12) + 0x123));
        assert_eq!(w.ptes[0], 0, "level 1 not walked");
        assert_eq!(w.table_gfns[0], Gfn(0));
    }

    /// A guest whose CPUID has 1 GiB pages: a PDPTE with PS is the leaf (level 3, the gpa is
    /// its base plus the GVA's low 30 bits, PAT at bit 12), its A and D bits are set, a read of
    /// a clean one takes W away; bits 29:13 of it are reserved; without 1 GiB pages in CPUID
    /// the same PDPTE is a reserved-bit #PF.
    #[test]
    fn translates_a_1g_page_where_cpuid_has_them() {
        let c = GuestCpu { gbpages: true, ..cpu() };
        let base = 0x40_0000_0000u64; // 256 GiB, 1 GiB-aligned, below MAXPHYADDR 40
        let m = std_tables();
        m.write(slot(3), base | P | RW | US | PS | (1 << 12));
        let w = walk(&c, &m, GVA, R).expect("walk");
        assert_eq!(w.level, Level::L1G);
        assert_eq!(w.gpa, Gpa(base + (3 << 21) + (4 << 12) + 0x123));
        assert_eq!(w.gfn, Gfn((base >> 12) + 3 * 512 + 4));
        assert_eq!((w.ptes[1], w.ptes[0]), (0, 0), "levels 2 and 1 not walked");
        assert_eq!(w.pte_access, Access::USER.union(Access::EXEC), "clean: no W on a read");
        assert_eq!(m.read(slot(3)), Some(base | P | RW | US | PS | (1 << 12) | A));
        let w = walk(&c, &m, GVA, UW).expect("walk");
        assert!(w.pte_access.contains(Access::WRITE));
        assert_eq!(m.read(slot(3)), Some(base | P | RW | US | PS | (1 << 12) | A | D));
        for bit in [13, 20, 29] {
            m.write(slot(3), base | LEAF | PS | (1 << bit));
            assert_eq!(pf(walk(&c, &m, GVA, R)), RSVD | PRES, "bit {bit}");
        }
        m.write(slot(3), base | LEAF | PS);
        assert_eq!(pf(walk(&cpu(), &m, GVA, R)), RSVD | PRES, "no 1 GiB pages in CPUID");
        assert_eq!(walk(&c, &m, GVA, R).map(|w| w.level), Ok(Level::L1G));
        let pml4e_ps = std_tables();
        pml4e_ps.write(slot(4), PDPT | UPPER | PS);
        assert_eq!(pf(walk(&c, &pml4e_ps, GVA, R)), RSVD | PRES, "PML4E bit 7 stays reserved");
    }

    #[test]
    fn not_present_at_each_level_is_error_code_0_plus_access() {
        for level in 1..=4u8 {
            let m = std_tables();
            let old = m.read(slot(level)).expect("backed");
            // Reserved bits in a not-present entry do not matter.
            m.write(slot(level), (old & !P) | (1 << 45));
            assert_eq!(pf(walk(&cpu(), &m, GVA, R)), 0, "level {level}");
            assert_eq!(pf(walk(&cpu(), &m, GVA, UW)), WR | USR, "level {level}");
        }
    }

    #[test]
    fn unbacked_table_is_not_present() {
        let m = std_tables();
        m.unback(Gfn(PD >> 12));
        assert_eq!(pf(walk(&cpu(), &m, GVA, W)), WR);
    }

    #[test]
    fn reserved_bits_per_level_are_rsvd_p() {
        let pa_40 = 1u64 << 40; // MAXPHYADDR 40
        let cases: [(u8, u64, &str); 8] = [
            (4, PS, "PML4E bit 7"),
            (4, pa_40, "PML4E PA bit >= MAXPHYADDR"),
            (3, PS, "PDPTE PS: no 1 GiB pages"),
            (3, 1 << 51, "PDPTE PA bit 51"),
            (2, pa_40, "PDE PA bit"),
            (2, PS | (1 << 13), "2 MiB PDE bit 13"),
            (2, PS | (1 << 20), "2 MiB PDE bit 20"),
            (1, pa_40, "PTE PA bit"),
        ];
        for (level, bits, what) in cases {
            let m = std_tables();
            let old = m.read(slot(level)).expect("backed");
            m.write(slot(level), old | bits);
            assert_eq!(pf(walk(&cpu(), &m, GVA, R)), RSVD | PRES, "{what}");
            assert_eq!(pf(walk(&cpu(), &m, GVA, UW)), RSVD | PRES | WR | USR, "{what}");
            assert_eq!(m.cmpxchg_calls(), 0, "{what}: a faulting walk writes nothing");
        }
        // Bits 62:52 are ignored in 4-level paging.
        let m = std_tables();
        m.write(slot(1), PAGE | LEAF | (1 << 52) | (1 << 62));
        assert!(walk(&cpu(), &m, GVA, R).is_ok());
        // MAXPHYADDR 52: bit 51 is an address bit.
        let m = std_tables();
        m.write(slot(1), PAGE | LEAF | (1 << 51));
        let c = GuestCpu { maxphyaddr: 52, ..cpu() };
        assert_eq!(walk(&c, &m, GVA, R).map(|w| w.gpa), Ok(Gpa((1 << 51) | PAGE | 0x123)));
    }

    #[test]
    fn nx_is_reserved_without_efer_nx_at_every_level() {
        let no_nx = GuestCpu { efer_nx: false, ..cpu() };
        for level in 1..=4u8 {
            let m = std_tables();
            let old = m.read(slot(level)).expect("backed");
            m.write(slot(level), old | NX);
            assert_eq!(pf(walk(&no_nx, &m, GVA, R)), RSVD | PRES, "level {level}");
            // Without EFER.NX (and no SMEP) a fetch never reports FETCH.
            assert_eq!(pf(walk(&no_nx, &m, GVA, X)), RSVD | PRES, "level {level}");
            assert!(walk(&cpu(), &m, GVA, R).is_ok(), "level {level}: NX is legal with EFER.NX");
        }
    }

    #[test]
    fn user_access_to_a_supervisor_page() {
        for level in 1..=4u8 {
            let m = std_tables();
            let old = m.read(slot(level)).expect("backed");
            m.write(slot(level), old & !US);
            assert_eq!(pf(walk(&cpu(), &m, GVA, UR)), PRES | USR, "level {level}");
            assert_eq!(pf(walk(&cpu(), &m, GVA, UW)), PRES | WR | USR, "level {level}");
            let w = walk(&cpu(), &m, GVA, R).expect("supervisor read");
            assert!(!w.pte_access.contains(Access::USER));
        }
    }

    #[test]
    fn writes_to_read_only_pages_and_cr0_wp() {
        let no_wp = GuestCpu { cr0_wp: false, ..cpu() };
        for level in 1..=4u8 {
            let m = std_tables();
            let old = m.read(slot(level)).expect("backed");
            m.write(slot(level), old & !RW);
            assert_eq!(pf(walk(&cpu(), &m, GVA, UW)), PRES | WR | USR, "user, WP=1");
            assert_eq!(pf(walk(&no_wp, &m, GVA, UW)), PRES | WR | USR, "user, WP=0");
            assert_eq!(pf(walk(&cpu(), &m, GVA, W)), PRES | WR, "supervisor, WP=1");
            let w = walk(&no_wp, &m, GVA, W).expect("supervisor write ignores RW when WP=0");
            assert!(!w.pte_access.contains(Access::WRITE), "the caller sees the page is R/O");
            assert_ne!(w.ptes[0] & D, 0, "the write dirtied the leaf");
            assert!(walk(&cpu(), &m, GVA, UR).is_ok(), "reads are fine");
        }
    }

    #[test]
    fn fetch_from_an_nx_page() {
        for level in 1..=4u8 {
            let m = std_tables();
            let old = m.read(slot(level)).expect("backed");
            m.write(slot(level), old | NX);
            assert_eq!(pf(walk(&cpu(), &m, GVA, X)), PRES | FETCH, "level {level}");
            let ux = FaultAccess { user: true, ..X };
            assert_eq!(pf(walk(&cpu(), &m, GVA, ux)), PRES | FETCH | USR, "level {level}");
            let w = walk(&cpu(), &m, GVA, R).expect("read");
            assert!(!w.pte_access.contains(Access::EXEC));
        }
        // FETCH rides on every fault kind with EFER.NX, on none without it.
        let m = std_tables();
        m.write(slot(1), 0);
        assert_eq!(pf(walk(&cpu(), &m, GVA, X)), FETCH);
        let no_nx = GuestCpu { efer_nx: false, ..cpu() };
        assert_eq!(pf(walk(&no_nx, &m, GVA, X)), 0);
        // Without EFER.NX every page is executable.
        let w = walk(&no_nx, &std_tables(), GVA, X).expect("fetch");
        assert!(w.pte_access.contains(Access::EXEC));
    }

    #[test]
    fn read_sets_accessed_everywhere_and_no_dirty() {
        let m = tables([P | RW | US, P | RW | US, P | RW | US, P | RW | US]);
        let w = walk(&cpu(), &m, GVA, R).expect("walk");
        for level in 1..=4u8 {
            let e = m.read(slot(level)).expect("backed");
            assert_ne!(e & A, 0, "A at level {level}");
            assert_eq!(e & D, 0, "no D at level {level}");
            assert_eq!(w.ptes[usize::from(level - 1)], e, "ptes hold the updated value");
        }
        assert_eq!(m.swaps(), 4);
        assert!(!w.pte_access.contains(Access::WRITE), "a clean leaf is write-protected");
        assert!(w.pte_access.contains(Access::USER.union(Access::EXEC)));
        // Once dirty, a read keeps W.
        m.write(slot(1), PAGE | LEAF);
        let w = walk(&cpu(), &m, GVA, R).expect("walk");
        assert!(w.pte_access.contains(Access::WRITE));
    }

    #[test]
    fn write_sets_dirty_on_the_leaf_only() {
        let m = tables([P | RW | US, P | RW | US | D, P | RW | US, P | RW | US]);
        let w = walk(&cpu(), &m, GVA, W).expect("walk");
        assert_eq!(m.read(slot(1)), Some(PAGE | LEAF));
        assert_eq!(m.read(slot(3)), Some(PD | UPPER), "no D above the leaf");
        assert_eq!(m.read(slot(2)), Some(PT | UPPER | D), "a D bit already there stays");
        assert_eq!(w.pte_access, Access::ALL);
        // A 2 MiB leaf gets D.
        let m = std_tables();
        m.write(slot(2), 0x4000_0000 | P | RW | PS);
        let w = walk(&cpu(), &m, GVA, W).expect("walk");
        assert_eq!(w.ptes[1], 0x4000_0000 | P | RW | PS | A | D);
        assert_eq!(m.read(slot(1)), Some(PAGE | LEAF), "level 1 untouched");
    }

    #[test]
    fn lost_cmpxchg_restarts_the_walk_with_the_new_entry() {
        let m = tables([P | RW | US, UPPER, UPPER, UPPER]);
        // Another vCPU remaps the page between our read and our A update.
        m.race_next_cmpxchg(slot(1), 0x20_0000 | P | RW | US);
        let w = walk(&cpu(), &m, GVA, R).expect("walk");
        assert_eq!(w.gpa, Gpa(0x20_0000 | 0x123), "the restarted walk uses the new gPTE");
        assert_eq!(m.read(slot(1)), Some(0x20_0000 | P | RW | US | A));
        assert_eq!(m.cmpxchg_calls(), 2);
        // A racer that makes the entry not present turns the restart into a #PF.
        let m = tables([P | RW | US, UPPER, UPPER, UPPER]);
        m.race_next_cmpxchg(slot(1), 0);
        assert_eq!(pf(walk(&cpu(), &m, GVA, R)), 0);
    }

    #[test]
    fn restarts_are_bounded_and_never_return_a_walk_without_its_accessed_dirty_bits() {
        // A racer that flips a software-available bit (9) before each of our cmpxchgs.
        for access in [R, W] {
            let m = tables([P | RW | US, UPPER, UPPER, UPPER]);
            for i in 0..2 * u64::from(MAX_RESTARTS) {
                m.race_next_cmpxchg(slot(1), PAGE | P | RW | US | ((1 - i % 2) << 9));
            }
            // Returning the last attempt gave a write the rights W with D clear in guest memory:
            // the shadow MMU mapped the page writable and the guest's OS saw it clean.
            assert_eq!(walk(&cpu(), &m, GVA, access), Err(WalkError::Contended(GVA)));
            assert_eq!(m.cmpxchg_calls(), u64::from(MAX_RESTARTS));
            assert_eq!(m.read(slot(1)).map(|e| e & (A | D)), Some(0), "the racer won every time");
        }
        // One race fewer and the walk completes, with the bits in memory.
        let m = tables([P | RW | US, UPPER, UPPER, UPPER]);
        for i in 0..u64::from(MAX_RESTARTS) - 1 {
            m.race_next_cmpxchg(slot(1), PAGE | P | RW | US | ((1 - i % 2) << 9));
        }
        let w = walk(&cpu(), &m, GVA, W).expect("walk");
        assert_eq!(w.ptes[0] & (A | D), A | D);
        assert_eq!(m.read(slot(1)).map(|e| e & (A | D)), Some(A | D));
    }

    #[test]
    fn tables_in_read_only_memory_are_not_updated() {
        let m = tables([P | RW | US, P | RW | US, P | RW | US, P | RW | US]);
        m.set_read_only(Gfn(PT >> 12), true);
        m.set_read_only(Gfn(PDPT >> 12), true);
        let w = walk(&cpu(), &m, GVA, W).expect("walk");
        assert_eq!(m.read(slot(1)), Some(PAGE | P | RW | US), "no A/D in ROM");
        assert_eq!(m.read(slot(3)), Some(PD | P | RW | US));
        assert_eq!(m.read(slot(2)), Some(PT | UPPER));
        assert_eq!(m.read(slot(4)), Some(PDPT | UPPER));
        assert_eq!(w.ptes[0], PAGE | P | RW | US, "ptes hold what memory holds");
        assert_eq!(w.pte_access, Access::ALL, "a write keeps W");
    }

    /// Readable, but the A/D write finds nothing there (the slot went away meanwhile).
    struct VanishingOnWrite(GuestMemoryMap);
    impl GuestPteMemory for VanishingOnWrite {
        fn read_gpte(&self, gpa: Gpa) -> Option<u64> {
            self.0.read_gpte(gpa)
        }
        fn cmpxchg_gpte(&self, _: Gpa, _: u64, _: u64) -> Result<bool, GpteWriteError> {
            Err(GpteWriteError::Unreadable)
        }
    }

    #[test]
    fn unwritable_because_unbacked_is_a_not_present_fault() {
        let m = VanishingOnWrite(tables([P | RW | US, UPPER, UPPER, UPPER]));
        assert_eq!(pf(walk(&cpu(), &m, GVA, UW)), WR | USR);
        let m = VanishingOnWrite(std_tables());
        assert!(walk(&cpu(), &m, GVA, UW).is_ok(), "nothing to write, no fault");
    }

    #[test]
    fn non_canonical_addresses_are_not_page_faults() {
        let m = std_tables();
        for bad in [1u64 << 47, 0x8000_0000_0000_0000, 0xffff_7fff_ffff_f000] {
            assert_eq!(walk(&cpu(), &m, Gva(bad), R), Err(WalkError::NonCanonical(Gva(bad))));
        }
        let high = Gva(0xffff_8000_0000_0000);
        assert!(matches!(walk(&cpu(), &m, high, R), Err(WalkError::PageFault(_))));
    }

    #[test]
    fn nonpaging_is_the_identity_with_every_right() {
        let c = GuestCpu { mode: PagingMode::NonPaging, ..cpu() };
        let m = GuestMemoryMap::new();
        let w = walk(&c, &m, Gva(0x1234_5678), UW).expect("walk");
        assert_eq!(w.gpa, Gpa(0x1234_5678));
        assert_eq!(w.gfn, Gfn(0x12345));
        assert_eq!(w.pte_access, Access::ALL);
        assert_eq!(w.level, Level::L2M);
        assert_eq!(m.cmpxchg_calls(), 0);
    }

    // PAE: PDPT at 0x8020 (32-byte aligned), PD 0x3000, PT 0x4000; GVA 0xc060_4123 has PDPT index
    // 3, PD index 3, PT index 4.
    const PAE_PDPT: u64 = 0x8020;
    const PAE_GVA: Gva = Gva((3 << 30) | (3 << 21) | (4 << 12) | 0x123);

    fn pae_setup(pdpte: u64) -> (GuestCpu, GuestMemoryMap) {
        let m = GuestMemoryMap::new();
        m.write(Gpa(PAE_PDPT), P | 0x9000);
        m.write(Gpa(PAE_PDPT + 24), pdpte);
        m.write(Gpa(PD + 24), PT | P | RW | US);
        m.write(Gpa(PT + 32), PAGE | P | RW | US);
        let pdptrs = load_pdptrs(&m, PAE_PDPT, 36).expect("valid PDPTEs");
        let c = GuestCpu {
            mode: PagingMode::Pae { pdptrs },
            cr3: PAE_PDPT,
            cr0_wp: true,
            efer_nx: true,
            maxphyaddr: 36,
            gbpages: true, // PAE has no 1 GiB pages whatever CPUID says
        };
        (c, m)
    }

    #[test]
    fn pae_walk_uses_the_loaded_pdpte_and_never_touches_it() {
        let (c, m) = pae_setup(PD | P);
        let w = walk(&c, &m, PAE_GVA, W).expect("walk");
        assert_eq!(w.gpa, Gpa(PAGE | 0x123));
        assert_eq!(w.max_level, Level::L1G);
        assert_eq!(w.level, Level::L4K);
        assert_eq!(w.ptes[2], PD | P);
        assert_eq!(w.table_gfns[2], Gfn(PAE_PDPT >> 12));
        assert_eq!(w.pte_gpas[2], Gpa(PAE_PDPT + 24));
        assert_eq!(w.table_gfns[1], Gfn(PD >> 12));
        assert_eq!(w.pt_access[2], Access::ALL);
        assert_eq!(w.pt_access[1], Access::ALL, "a PDPTE grants every right");
        assert_eq!(w.pte_access, Access::ALL);
        assert_eq!(m.read(Gpa(PAE_PDPT + 24)), Some(PD | P), "no A on a PDPTE (bit 5 reserved)");
        assert_eq!(m.read(Gpa(PD + 24)), Some(PT | P | RW | US | A));
        assert_eq!(m.read(Gpa(PT + 32)), Some(PAGE | P | RW | US | A | D));
        // A later guest write to the PDPT is not seen until the next CR3 load.
        m.write(Gpa(PAE_PDPT + 24), 0);
        assert!(walk(&c, &m, PAE_GVA, R).is_ok());
    }

    #[test]
    fn pae_not_present_pdpte_and_addresses_above_4g() {
        let (c, m) = pae_setup(PD);
        match walk(&c, &m, PAE_GVA, UW) {
            Err(WalkError::PageFault(f)) => assert_eq!(f.error_code.0, WR | USR),
            other => panic!("{other:?}"),
        }
        let (c, m) = pae_setup(PD | P);
        let high = Gva(1 << 32);
        assert_eq!(walk(&c, &m, high, R), Err(WalkError::NonCanonical(high)));
    }

    #[test]
    fn pae_2m_pages_and_reserved_bits() {
        let (c, m) = pae_setup(PD | P);
        m.write(Gpa(PD + 24), 0x8000_0000 | P | RW | US | PS);
        let w = walk(&c, &m, PAE_GVA, R).expect("walk");
        assert_eq!(w.level, Level::L2M);
        assert_eq!(w.gfn, Gfn(0x8_0000 + 4));
        for (bad, what) in [
            (0x8000_0000 | P | PS | (1 << 14), "2 MiB bit 14"),
            (PT | P | (1 << 36), "PA bit >= MAXPHYADDR"),
            (PT | P | (1 << 55), "PAE reserves bits 62:52 too"),
        ] {
            m.write(Gpa(PD + 24), bad);
            match walk(&c, &m, PAE_GVA, R) {
                Err(WalkError::PageFault(f)) => assert_eq!(f.error_code.0, RSVD | PRES, "{what}"),
                other => panic!("{what}: {other:?}"),
            }
        }
    }
}
