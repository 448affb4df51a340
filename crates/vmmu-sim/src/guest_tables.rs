//! The scenario backend's guest page tables (scenario format v2): page-table spaces 0..=7 kept in
//! guest memory that the backend reserves below 8 MiB, and the PTE writes a `map` or `unmap`
//! step makes the guest perform.
//!
//! Invariants: tables are allocated from `[TABLES_GPA, TABLES_END)`; a page table that a 2M
//! `map` or `unmap` unlinks is reused by a later `map` when it is clear (its region's 4K pages
//! were all unmapped: the parser's rule), last freed first, as the KVM backend does (a new
//! space's own tables are always new ones: the KVM backend's exist from the start), and no
//! other table is freed;
//! an intermediate entry is always present, writable and user; every value written is returned to
//! the caller as `(gpa, value)` in the order the guest would write it (the caller performs the
//! writes as guest stores, so a shadow MMU sees them); a PAE space gets its four page directories
//! when it is created, so its PDPTEs never change after a CR3 load.

use crate::host::HostBuffer;
use crate::ram::Width;
use std::sync::Arc;
use vmmu_scenario::{AccessKind, MapFlags, PageSize, Paging, SPACES};

/// First guest-physical address of the table area (after the first MiB).
pub const TABLES_GPA: u64 = 0x10_0000;
/// End of the table area (the 8 MiB the backends reserve).
pub const TABLES_END: u64 = 0x80_0000;

use vmmu::guest::pte::{P, PS, RW, US};
/// The reserved bit a `reserved` map sets (bit 51).
const RSVD51: u64 = 1 << 51;
/// The address bits of an entry (MAXPHYADDR 52: what the backends' tables hold).
const ADDR: u64 = vmmu::guest::pte::addr_mask(52);

/// Why a table operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TablesError {
    /// The table area is full.
    #[error("the guest page-table area ({TABLES_GPA:#x}..{TABLES_END:#x}) is full")]
    Full,
    /// A space outside 0..=7.
    #[error("page-table space {0} does not exist (0..=7)")]
    BadSpace(u8),
    /// The host buffer could not be read or written.
    #[error("guest page-table memory: {0}")]
    Memory(String),
}

/// Where a table [`GuestTables::entry_gpa`] creates comes from.
#[derive(Clone, Copy)]
enum Alloc {
    /// A new table (a space's own structure).
    Space,
    /// A freed page table first (a `map`'s).
    Map,
}

/// The guest's page-table spaces.
pub struct GuestTables {
    paging: Paging,
    buf: Arc<HostBuffer>,
    /// The guest-physical address of the buffer's first byte.
    buf_gpa: u64,
    next: u64,
    end: u64,
    /// Page tables a 2M `map` or `unmap` unlinked, clear, to reuse (last freed first).
    free: Vec<u64>,
    roots: [Option<u64>; SPACES as usize],
    /// The guest's own code page, mapped in every space ([`GuestTables::with_code_page`]), and
    /// the page table of the low 2 MiB that maps it (allocated with the first space).
    code: Option<(u64, Option<u64>)>,
}

impl GuestTables {
    /// Tables for `paging` in `buf`, which backs guest-physical `[TABLES_GPA, TABLES_END)`.
    pub fn new(paging: Paging, buf: Arc<HostBuffer>) -> Self {
        Self::in_area(paging, buf, TABLES_GPA, TABLES_GPA, TABLES_END)
    }

    /// Tables allocated from `[start, end)` of `buf`, which backs guest-physical memory from
    /// `buf_gpa` on.
    pub fn in_area(
        paging: Paging,
        buf: Arc<HostBuffer>,
        buf_gpa: u64,
        start: u64,
        end: u64,
    ) -> Self {
        GuestTables {
            paging,
            buf,
            buf_gpa,
            next: start,
            end,
            free: Vec::new(),
            roots: [None; SPACES as usize],
            code: None,
        }
    }

    /// Every space created from now on maps `code` (a page in the first 2 MiB, at the same
    /// guest-virtual address) as the KVM backend's guest maps its access-code page: PML4 entry
    /// 0 (4level) to the space's own first PDPT, its entry 0 to the space's own first page
    /// directory (for PAE: the page directory of PDPTE 0), and that directory's entry 0 to one
    /// page table of the low 2 MiB that all spaces share, where only `code` is present, user,
    /// neither accessed nor dirty. The backend's guest fetches each access's code from that
    /// page, so under shadow paging those tables are shadowed in every space a vCPU runs in,
    /// and a fault on the code page rebuilds a zapped path to the scenario's tables below
    /// them without touching the scenario's pages (`paging_flooded_root_code_path.scn`).
    pub fn with_code_page(mut self, code: u64) -> Self {
        self.code = Some((code, None));
        self
    }

    /// A table a `map` needs: the last one freed, else a new one (as the KVM backend).
    fn alloc_for_map(&mut self) -> Result<u64, TablesError> {
        match self.free.pop() {
            Some(t) => Ok(t),
            None => self.alloc(),
        }
    }

    fn read(&self, gpa: u64) -> Result<u64, TablesError> {
        self.buf.read(gpa - self.buf_gpa, Width::W8).map_err(|e| TablesError::Memory(e.to_string()))
    }

    /// A table for a space's own structure (its root, the tables of its first GiB): always a
    /// new one, as the KVM backend, whose spaces exist from the start, never builds them from
    /// freed tables.
    fn alloc(&mut self) -> Result<u64, TablesError> {
        if self.next >= self.end {
            return Err(TablesError::Full);
        }
        let t = self.next;
        self.next += 0x1000;
        Ok(t)
    }

    /// The CR3 value of `space`, creating its root (and, for PAE, its four page directories,
    /// whose PDPTE writes go to `writes`).
    pub fn root(&mut self, space: u8, writes: &mut Vec<(u64, u64)>) -> Result<u64, TablesError> {
        let slot = self.roots.get(usize::from(space)).ok_or(TablesError::BadSpace(space))?;
        if let Some(r) = *slot {
            return Ok(r);
        }
        let root = self.alloc()?;
        if self.paging == Paging::Pae {
            for i in 0..4 {
                let pd = self.alloc()?;
                writes.push((root + 8 * i, pd | P));
            }
        }
        self.roots[usize::from(space)] = Some(root);
        if let Some((code, low_pt)) = self.code {
            let low_pt = match low_pt {
                Some(t) => t,
                None => {
                    let t = self.alloc()?;
                    writes.push((t + 8 * ((code >> 12) & 511), code | P | RW | US));
                    self.code = Some((code, Some(t)));
                    t
                }
            };
            let pd0 = self.entry_gpa(space, 0, 2, Alloc::Space, writes)?;
            writes.push((pd0, low_pt | P | RW | US));
        }
        Ok(root)
    }

    /// The gpa of the entry for `gva` at `level` (1: PTE, 2: PDE) in `space`, creating the
    /// tables above it as `alloc` says (their entries go to `writes`; entries already written
    /// earlier in `writes` count as present).
    fn entry_gpa(
        &mut self,
        space: u8,
        gva: u64,
        level: u32,
        alloc: Alloc,
        writes: &mut Vec<(u64, u64)>,
    ) -> Result<u64, TablesError> {
        let root = self.root(space, writes)?;
        let (mut table, top) = match self.paging {
            Paging::Pae => {
                let pdpte = self.value(root + 8 * ((gva >> 30) & 3), writes)?;
                (pdpte & ADDR, 2)
            }
            _ => (root, 4),
        };
        for l in (level + 1..=top).rev() {
            let at = table + 8 * ((gva >> (12 + 9 * (l - 1))) & 511);
            let e = self.value(at, writes)?;
            table = if e & P != 0 {
                e & ADDR
            } else {
                let t = match alloc {
                    Alloc::Space => self.alloc()?,
                    Alloc::Map => self.alloc_for_map()?,
                };
                writes.push((at, t | P | RW | US));
                t
            };
        }
        Ok(table + 8 * ((gva >> (12 + 9 * (level - 1))) & 511))
    }

    /// The entry at `gpa`, counting writes not yet performed.
    fn value(&self, gpa: u64, writes: &[(u64, u64)]) -> Result<u64, TablesError> {
        match writes.iter().rev().find(|(g, _)| *g == gpa) {
            Some(&(_, v)) => Ok(v),
            None => self.read(gpa),
        }
    }

    /// The writes of a `map` step.
    pub fn map(
        &mut self,
        space: u8,
        gva: u64,
        gpa: u64,
        size: PageSize,
        flags: MapFlags,
    ) -> Result<Vec<(u64, u64)>, TablesError> {
        let mut writes = Vec::new();
        let (level, ps) = match size {
            PageSize::Size4K => (1, 0),
            PageSize::Size2M => (2, PS),
        };
        let at = self.entry_gpa(space, gva, level, Alloc::Map, &mut writes)?;
        if level == 2 {
            self.unlinked(self.value(at, &writes)?)?;
        }
        // Accessed and dirty from the start, as the KVM backend's guest writes its leaves: a
        // read through a clean leaf would map read-only under shadow paging only, and whether a
        // read dirties a logged page would depend on the MMU.
        let mut pte = gpa | P | ps | vmmu::guest::pte::A | vmmu::guest::pte::D;
        if !flags.readonly {
            pte |= RW;
        }
        if !flags.supervisor {
            pte |= US;
        }
        if flags.reserved {
            pte |= RSVD51;
        }
        writes.push((at, pte));
        Ok(writes)
    }

    /// Writes `writes` into guest memory directly (before any vCPU runs: the boot loader's
    /// tables, which no MMU shadows yet).
    pub fn apply(&self, writes: &[(u64, u64)]) -> Result<(), TablesError> {
        for &(gpa, v) in writes {
            self.buf
                .write(gpa - self.buf_gpa, Width::W8, v)
                .map_err(|e| TablesError::Memory(e.to_string()))?;
        }
        Ok(())
    }

    /// Space 0 maps `[0, limit)` to itself with 2 MiB pages, accessed and dirty (what a 64-bit
    /// guest without paging of its own needs under shadow paging: version-1 scenarios on
    /// `format=shadow`).
    /// Returns the CR3 value.
    pub fn identity_2m(&mut self, limit: u64) -> Result<u64, TablesError> {
        let mut writes = Vec::new();
        let root = self.root(0, &mut writes)?;
        self.apply(&writes)?;
        for gpa in (0..limit).step_by(2 << 20) {
            // Accessed and dirty, as every leaf `map` writes.
            let w = self.map(0, gpa, gpa, PageSize::Size2M, MapFlags::default())?;
            self.apply(&w)?;
        }
        Ok(root)
    }

    /// The writes that make the entry for `gva` at `level` in `space` hold `value` (e.g. a
    /// page-directory entry linking a table shared by several spaces), creating the tables
    /// above it.
    pub fn set_entry(
        &mut self,
        space: u8,
        gva: u64,
        level: u32,
        value: u64,
    ) -> Result<Vec<(u64, u64)>, TablesError> {
        let mut writes = Vec::new();
        let at = self.entry_gpa(space, gva, level, Alloc::Map, &mut writes)?;
        writes.push((at, value));
        Ok(writes)
    }

    /// The entry for `gva` at `level` in `space` as it is in guest memory now, or `None` when
    /// no table holds it (the space, a table above it, or a large page above it).
    pub fn entry(&self, space: u8, gva: u64, level: u32) -> Result<Option<u64>, TablesError> {
        match self.existing_entry_gpa(space, gva, level)? {
            Some(at) => self.read(at).map(Some),
            None => Ok(None),
        }
    }

    /// The guest-physical address a user-mode access of `kind` to `gva` in `space`
    /// would reach, if the guest's tables let it through (present and user at every level,
    /// writable too for a write, no reserved bit 51): what the backend needs to model the host
    /// side of a guest access.
    pub fn user_target(&self, space: u8, gva: u64, kind: AccessKind) -> Option<u64> {
        let root = (*self.roots.get(usize::from(space))?)?;
        let need = match kind {
            AccessKind::Write => P | RW | US,
            AccessKind::Read => P | US,
        };
        let ok = |e: u64| e & need == need && e & RSVD51 == 0;
        let (mut table, top) = self.top_table(root, gva).ok()??;
        for l in (1..=top).rev() {
            let e = self.read(table + 8 * ((gva >> (12 + 9 * (l - 1))) & 511)).ok()?;
            if !ok(e) {
                return None;
            }
            if l == 1 || (l == 2 && e & PS != 0) {
                let span = if l == 2 { 2 << 20 } else { 4 << 10 };
                return Some((e & ADDR & !(span - 1)) | (gva & (span - 1)));
            }
            table = e & ADDR;
        }
        None
    }

    /// Whether a `size` unmap of `gva` in `space` is a 2M one whose page-directory entry links a
    /// page table (so that it unmaps the 4K pages under it).
    pub fn links_table(&self, space: u8, gva: u64, size: PageSize) -> Result<bool, TablesError> {
        if size != PageSize::Size2M {
            return Ok(false);
        }
        Ok(match self.existing_entry_gpa(space, gva, 2)? {
            Some(at) => links_a_table(self.read(at)?),
            None => false,
        })
    }

    /// The writes of an `unmap` step: the entry cleared, or nothing when no table holds it (the
    /// space, a table above it or the page table under a large page is missing), as the KVM
    /// backend's guest does; an unmap creates no table. (Creating them wrote entries of shadowed
    /// upper-level tables, whose write-flooding counts KVM never saw move:
    /// `paging_unmap_absent_no_writes.scn`.)
    pub fn unmap(
        &mut self,
        space: u8,
        gva: u64,
        size: PageSize,
    ) -> Result<Vec<(u64, u64)>, TablesError> {
        let level = if size == PageSize::Size2M { 2 } else { 1 };
        let Some(at) = self.existing_entry_gpa(space, gva, level)? else {
            return Ok(Vec::new());
        };
        if level == 2 {
            self.unlinked(self.read(at)?)?;
        }
        Ok(vec![(at, 0)])
    }

    /// A page-directory entry that held `old` is being overwritten: a page table it linked is
    /// free if it is clear (a table that still held entries stays out of use rather than be
    /// reused dirty; the parser lets a 2M page replace only a region whose 4K pages are all
    /// unmapped).
    fn unlinked(&mut self, old: u64) -> Result<(), TablesError> {
        if !links_a_table(old) {
            return Ok(());
        }
        let t = old & ADDR;
        for i in 0..512 {
            if self.read(t + 8 * i)? != 0 {
                return Ok(());
            }
        }
        self.free.push(t);
        Ok(())
    }

    /// Where a walk of `gva` from `root` starts: the table and its level (the PML4, level 4; or
    /// with PAE the page directory its PDPTE names, level 2; `None` if that PDPTE is not present).
    fn top_table(&self, root: u64, gva: u64) -> Result<Option<(u64, u32)>, TablesError> {
        Ok(match self.paging {
            Paging::Pae => {
                let pdpte = self.read(root + 8 * ((gva >> 30) & 3))?;
                (pdpte & P != 0).then_some((pdpte & ADDR, 2))
            }
            _ => Some((root, 4)),
        })
    }

    /// The gpa of the entry for `gva` at `level` in `space` if every table above it exists
    /// (present links, no large page above `level`).
    fn existing_entry_gpa(
        &self,
        space: u8,
        gva: u64,
        level: u32,
    ) -> Result<Option<u64>, TablesError> {
        let Some(root) = *self.roots.get(usize::from(space)).ok_or(TablesError::BadSpace(space))?
        else {
            return Ok(None);
        };
        let Some((mut table, top)) = self.top_table(root, gva)? else {
            return Ok(None);
        };
        for l in (level + 1..=top).rev() {
            let e = self.read(table + 8 * ((gva >> (12 + 9 * (l - 1))) & 511))?;
            if e & P == 0 || (l == 2 && e & PS != 0) {
                return Ok(None);
            }
            table = e & ADDR;
        }
        Ok(Some(table + 8 * ((gva >> (12 + 9 * (level - 1))) & 511)))
    }
}

/// Whether page-directory entry `e` links a page table (present, not a 2 MiB page).
fn links_a_table(e: u64) -> bool {
    e & P != 0 && e & PS == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{HostConfig, SimHost};

    /// Every space maps the code page through its own PML4/PDPT/PD entry 0 and one page table
    /// shared by all spaces, as the KVM backend's guest does; scenario maps in the same GiB go
    /// into the same page directory.
    #[test]
    fn code_page_in_every_space_through_a_shared_page_table() {
        let host = SimHost::new(HostConfig::new(46)).expect("host");
        let buf = host.add_buffer("t", 0x10_0000).expect("buffer");
        let code = TABLES_GPA;
        let mut t =
            GuestTables::in_area(Paging::Level4, buf, TABLES_GPA, code + 0x1000, TABLES_END)
                .with_code_page(code);
        let mut w0 = Vec::new();
        t.root(0, &mut w0).expect("space 0");
        t.apply(&w0).expect("apply");
        let mut w3 = Vec::new();
        t.root(3, &mut w3).expect("space 3");
        t.apply(&w3).expect("apply");
        // Space 0: the low page table (its code entry), PML4 0, PDPT 0, PD 0; space 3 the last
        // three only, its PD entry 0 linking the same page table.
        assert_eq!(w0.len(), 4, "{w0:x?}");
        assert_eq!(w3.len(), 3, "{w3:x?}");
        assert_eq!(w0[3].1, w3[2].1);
        for space in [0, 3] {
            assert_eq!(t.user_target(space, code + 8, AccessKind::Read), Some(code + 8));
            assert_eq!(t.user_target(space, code + 0x1000, AccessKind::Read), None);
        }
        let w = t.map(3, 0x80_0000, 0x4000_0000, PageSize::Size2M, MapFlags::default());
        assert_eq!(w.expect("map").len(), 1, "PD 0 entry 4 of space 3");
    }

    /// A page table that a 2M map or unmap unlinks, clear, serves the next region that needs
    /// one, as in the KVM backend; toggling a region's page size needs no new table.
    #[test]
    fn a_page_table_a_2m_page_unlinks_is_reused_when_clear() {
        let host = SimHost::new(HostConfig::new(46)).expect("host");
        let buf = host.add_buffer("t", 0x10_0000).expect("buffer");
        let end = TABLES_GPA + 0x10_0000;
        let mut t = GuestTables::in_area(Paging::Level4, buf, TABLES_GPA, TABLES_GPA, end);
        let (k4, m2, no) = (PageSize::Size4K, PageSize::Size2M, MapFlags::default());
        let run = |w: Result<Vec<(u64, u64)>, TablesError>, t: &GuestTables| {
            let w = w.expect("tables");
            t.apply(&w).expect("apply");
            w
        };
        let w = run(t.map(0, 0x4000_0000, 0x9000_0000, k4, no), &t);
        let (pd_entry, pt) = w[w.len() - 2];
        let pt = pt & ADDR;
        assert_eq!(w[w.len() - 1].0 & !0xfff, pt, "{w:x?}");
        run(t.unmap(0, 0x4000_0000, k4), &t);
        let w = run(t.map(0, 0x4000_0000, 0x4020_0000, m2, no), &t);
        assert_eq!(w, [(pd_entry, 0x4020_0000 | P | RW | US | PS | 0x60)]);
        let w = run(t.map(0, 0x4040_0000, 0x9000_0000, k4, no), &t);
        assert_eq!(w[0].1 & ADDR, pt, "{w:x?}");
        assert_eq!(t.user_target(0, 0x4040_0008, AccessKind::Read), Some(0x9000_0008));
        run(t.unmap(0, 0x4040_0000, k4), &t);
        run(t.unmap(0, 0x4040_0000, m2), &t);
        let w = run(t.map(0, 0x4060_0000, 0x9000_0000, k4, no), &t);
        assert_eq!(w[0].1 & ADDR, pt);
        // Not reused while it still maps a page.
        run(t.map(0, 0x4060_0000, 0x4020_0000, m2, no), &t);
        let w = run(t.map(0, 0x4080_0000, 0x9000_0000, k4, no), &t);
        assert_ne!(w[0].1 & ADDR, pt);
        let next = t.next;
        for _ in 0..3000 {
            run(t.unmap(0, 0x4080_0000, k4), &t);
            run(t.map(0, 0x4080_0000, 0x4020_0000, m2, no), &t);
            run(t.unmap(0, 0x4080_0000, m2), &t);
            run(t.map(0, 0x4080_0000, 0x9000_0000, k4, no), &t);
        }
        assert_eq!(t.next, next);
    }

    /// An unmap writes the entry only where every table above it exists; it creates none.
    #[test]
    fn unmap_of_an_absent_entry_writes_nothing() {
        let host = SimHost::new(HostConfig::new(46)).expect("host");
        let buf = host.add_buffer("t", 0x10_0000).expect("buffer");
        let mut t = GuestTables::in_area(Paging::Level4, buf, TABLES_GPA, TABLES_GPA, TABLES_END);
        let (gva, k4, m2) = (0x80_0000_0000, PageSize::Size4K, PageSize::Size2M);
        assert!(t.unmap(0, gva, k4).expect("no space yet").is_empty());
        let w = t.map(0, gva, 0x4000_0000, k4, MapFlags::default()).expect("map");
        t.apply(&w).expect("apply");
        assert!(t.unmap(0, gva + (1 << 39), k4).expect("no PDPT").is_empty());
        assert!(t.unmap(0, gva + (2 << 20), k4).expect("no page table").is_empty());
        assert_eq!(t.unmap(0, gva + (2 << 20), m2).expect("PD entry").len(), 1);
        assert_eq!(t.unmap(0, gva, k4).expect("the leaf"), [(w[w.len() - 1].0, 0)]);
    }
}
