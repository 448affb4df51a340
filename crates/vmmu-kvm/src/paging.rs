//! Guest paging (`paging=4level` and `paging=pae`): the guest's page-table spaces and the
//! host's model of them.
//!
//! The page tables live in guest memory, in a pool of [`POOL_SIZE`] bytes at [`POOL_GPA`]
//! (slot [`POOL_SLOT`] of address space 0, below 8 MiB where scenarios may not go):
//!
//! | gpa | what |
//! |---|---|
//! | `LOW_PT` | the page table of the low 2 MiB, shared by every space (identity, supervisor; the code page user) |
//! | `root(s)` .. `+0x5000` | space `s` (0..8): 4level: PML4, PDPT 0, PD 0 (two pages unused); pae: PDPT, PD 0..3 |
//! | `FIRST_FREE..` | intermediate tables the backend allocates for `map` steps |
//!
//! Every space identity-maps the low 8 MiB: `LOW_PT` for 0..2 MiB, 2 MiB supervisor pages for
//! 2..6 MiB (the pool) and a 2 MiB user page for 6..8 MiB, where no memory is: the sync and
//! report addresses there are MMIO exits. Scenario GVAs start at 8 MiB, so PD 0 entries 4..512
//! and every other PML4/PDPT entry belong to the scenario. With PAE the four PDPTEs (present,
//! no other flags, as PAE requires) and their page directories exist from the start and never
//! change, as in a PAE OS: the CPU loads PDPTEs only with CR3, so `map` creates page tables
//! only.
//!
//! The host writes this initial image before any vCPU runs (as a loader would). Afterwards only
//! the guest changes the tables: [`Tables::map`] and [`Tables::unmap`] return the entry writes
//! (in the order a guest OS makes them: tables top-down, the leaf last) that the guest then
//! performs with its own stores at CPL0, and update the host's model to match. Tables come
//! from the pool zero-filled; a page table that a 2M `map` or `unmap` unlinks (its region's
//! 4K pages were all unmapped, so it is clear: the parser's rule) is reused, last freed first,
//! as the software machine's backend does, so a new table needs no clearing either way. The
//! pool holds at least [`vmmu_scenario::MAP_TABLES`] tables beside the fixed ones, the most a
//! scenario's maps may hold.

use crate::code::SYNC_GPA;
use std::collections::HashMap;
use vmmu_scenario::{AccessKind, MapOp, PageSize, Paging, UnmapOp, SPACES};

/// The slot id of the page-table pool (one of the ids scenarios may not use).
pub const POOL_SLOT: u32 = 32761;
/// Guest-physical address of the page-table pool.
pub const POOL_GPA: u64 = 0x20_0000;
/// Size of the page-table pool (1024 tables).
pub const POOL_SIZE: usize = 0x40_0000;
/// The shared page table of the low 2 MiB.
pub const LOW_PT: u64 = POOL_GPA;
/// The first table [`Tables`] hands out for `map` steps.
pub const FIRST_FREE: u64 = POOL_GPA + 0x1000 * (1 + 5 * SPACES as u64);
/// Where the #PF handler stores CR2 (8 bytes) and then the error code (at `+ 8`): MMIO exits,
/// no slot is there.
pub const REPORT_GPA: u64 = 0x7f_e000;
/// The #PF handler's code (in the backend's own memory).
pub const PF_HANDLER: u64 = 0x8000;

const P: u64 = 1;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PS: u64 = 1 << 7;
/// Guest PTE bit 51: reserved for every MAXPHYADDR below 52.
const RSVD51: u64 = 1 << 51;
const ADDR: u64 = 0x000f_ffff_ffff_f000;
/// Intermediate entries: present, writable, user.
const LINK: u64 = P | RW | US;

// The sync and report addresses lie in the user 2 MiB page of 6..8 MiB, above the pool.
const _: () = assert!(POOL_GPA + POOL_SIZE as u64 <= 0x60_0000);
// Every scenario the parser accepts fits.
const _: () = assert!(
    (POOL_GPA + POOL_SIZE as u64 - FIRST_FREE) / 0x1000 >= vmmu_scenario::MAP_TABLES as u64
);
const _: () = assert!(REPORT_GPA >= 0x60_0000 && SYNC_GPA >= 0x60_0000 && SYNC_GPA < 0x80_0000);

/// The root table of page-table space `space` (what CR3 holds): a PML4, or a PAE PDPT.
pub fn root(space: u8) -> u64 {
    POOL_GPA + 0x1000 * (1 + 5 * u64::from(space))
}

/// Whether `mode` is PAE (else 4-level).
fn is_pae(mode: Paging) -> bool {
    mode == Paging::Pae
}

/// The level of the root table: 4 (PML4) or 3 (PAE PDPT).
fn top(mode: Paging) -> u32 {
    if is_pae(mode) {
        3
    } else {
        4
    }
}

/// The pool's initial contents for `mode` (`Level4` or `Pae`): `(offset in the pool, bytes)`
/// pieces.
pub fn pool_image(mode: Paging) -> Vec<(u64, Vec<u8>)> {
    let mut pieces = Vec::new();
    // Low 2 MiB: identity, supervisor, except the access-code page, which CPL3 executes.
    let low: Vec<u8> = (0..512u64)
        .flat_map(|i| {
            let gpa = i << 12;
            let us = if gpa == crate::guest::CODE { US } else { 0 };
            (gpa | P | RW | us).to_le_bytes()
        })
        .collect();
    pieces.push((LOW_PT - POOL_GPA, low));
    for s in 0..SPACES {
        let r = root(s);
        let pd = if is_pae(mode) {
            // PDPT -> PD 0..3, present only (RW and US are reserved in PAE PDPTEs).
            let pdpt: Vec<u8> =
                (1..=4u64).flat_map(|i| ((r + 0x1000 * i) | P).to_le_bytes()).collect();
            pieces.push((r - POOL_GPA, pdpt));
            r + 0x1000
        } else {
            pieces.push((r - POOL_GPA, ((r + 0x1000) | LINK).to_le_bytes().to_vec()));
            pieces.push((r + 0x1000 - POOL_GPA, ((r + 0x2000) | LINK).to_le_bytes().to_vec()));
            r + 0x2000
        };
        let mut pd0 = Vec::new();
        pd0.extend_from_slice(&(LOW_PT | LINK).to_le_bytes());
        pd0.extend_from_slice(&((1 << 21) | P | RW | PS).to_le_bytes());
        pd0.extend_from_slice(&((2 << 21) | P | RW | PS).to_le_bytes());
        pd0.extend_from_slice(&((3 << 21) | P | RW | US | PS).to_le_bytes());
        pieces.push((pd - POOL_GPA, pd0));
    }
    pieces
}

/// The pool is full: the scenario maps more distinct regions than the backend has tables for
/// (the parser refuses such a file, so this is a defect of the backend's model).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the page-table pool ({POOL_SIZE:#x} bytes) is exhausted")]
pub struct PoolExhausted;

/// The host's copy of every entry the guest's tables hold (absent = zero).
#[derive(Debug)]
pub struct Tables {
    mode: Paging,
    entries: HashMap<u64, u64>,
    next: u64,
    /// Page tables unlinked by a 2M `map` or `unmap`, clear, to reuse (last freed first).
    free: Vec<u64>,
}

/// Index of `gva` in the table of `level` (4 = PML4 .. 1 = PT).
fn index(gva: u64, level: u32) -> u64 {
    (gva >> (12 + 9 * (level - 1))) & 0x1ff
}

impl Tables {
    /// The model of [`pool_image`]`(mode)`.
    pub fn new(mode: Paging) -> Tables {
        let mut t = Tables { mode, entries: HashMap::new(), next: FIRST_FREE, free: Vec::new() };
        for (off, bytes) in pool_image(mode) {
            for (i, e) in bytes.chunks(8).enumerate() {
                let v = u64::from_le_bytes(e.try_into().unwrap_or([0; 8]));
                if v != 0 {
                    t.entries.insert(POOL_GPA + off + 8 * i as u64, v);
                }
            }
        }
        t
    }

    /// A new table: the last one freed, else the pool's next.
    fn alloc(&mut self) -> Result<u64, PoolExhausted> {
        if let Some(t) = self.free.pop() {
            return Ok(t);
        }
        if self.next + 0x1000 > POOL_GPA + POOL_SIZE as u64 {
            return Err(PoolExhausted);
        }
        let t = self.next;
        self.next += 0x1000;
        Ok(t)
    }

    /// A page-directory entry that held `old` is being overwritten: a page table it linked is
    /// free if it is clear (the parser lets a 2M page replace only a region whose 4K pages are
    /// all unmapped; a table that still held entries stays out of use rather than be reused
    /// dirty).
    fn unlinked(&mut self, old: u64) {
        if !links_a_table(old) {
            return;
        }
        let t = old & ADDR;
        if (0..512).all(|i| self.entry(t + 8 * i) == 0) {
            self.free.push(t);
        }
    }

    fn entry(&self, at: u64) -> u64 {
        self.entries.get(&at).copied().unwrap_or(0)
    }

    /// The address of the entry for `gva` at `level`, following present links from the root of
    /// `space`; `None` if a link above is missing (or a large page is there).
    fn slot(&self, space: u8, gva: u64, level: u32) -> Option<u64> {
        let mut table = root(space);
        for l in (level + 1..=top(self.mode)).rev() {
            let e = self.entry(table + 8 * index(gva, l));
            if e & P == 0 || (l == 2 && e & PS != 0) {
                return None;
            }
            table = e & ADDR;
        }
        Some(table + 8 * index(gva, level))
    }

    /// The entry writes that make `op` true, applied to the model: new tables linked top-down
    /// (present, writable, user), then the leaf.
    pub fn map(&mut self, op: &MapOp) -> Result<Vec<(u64, u64)>, PoolExhausted> {
        let leaf_level = match op.size {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
        };
        let mut writes = Vec::new();
        let mut table = root(op.space);
        for l in (leaf_level + 1..=top(self.mode)).rev() {
            let at = table + 8 * index(op.gva, l);
            let e = self.entry(at);
            table = if e & P != 0 && !(l == 2 && e & PS != 0) {
                e & ADDR
            } else {
                let t = self.alloc()?;
                writes.push((at, t | LINK));
                t
            };
        }
        // Accessed and dirty from the start (bits 5 and 6): under shadow paging KVM maps a read
        // through a clean guest leaf read-only, so whether a read dirties a logged page would
        // depend on the MMU; with D set it does as under TDP (the software machine does the same).
        let mut leaf = op.gpa | P | (1 << 5) | (1 << 6);
        if !op.flags.readonly {
            leaf |= RW;
        }
        if !op.flags.supervisor {
            leaf |= US;
        }
        if op.flags.reserved {
            leaf |= RSVD51;
        }
        let at = table + 8 * index(op.gva, leaf_level);
        if leaf_level == 2 {
            leaf |= PS;
            self.unlinked(self.entry(at));
        }
        writes.push((at, leaf));
        for &(at, v) in &writes {
            self.entries.insert(at, v);
        }
        Ok(writes)
    }

    /// Whether `op` is a 2M unmap whose page-directory entry links a page table (so that it
    /// unmaps the 4K pages under it).
    pub fn links_table(&self, op: &UnmapOp) -> bool {
        op.size == PageSize::Size2M
            && self.slot(op.space, op.gva, 2).is_some_and(|at| links_a_table(self.entry(at)))
    }

    /// The entry write that clears the mapping of `op` (none if no table holds that entry),
    /// applied to the model.
    pub fn unmap(&mut self, op: &UnmapOp) -> Vec<(u64, u64)> {
        let level = match op.size {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
        };
        match self.slot(op.space, op.gva, level) {
            Some(at) => {
                if level == 2 {
                    self.unlinked(self.entry(at));
                }
                self.entries.remove(&at);
                vec![(at, 0)]
            }
            None => Vec::new(),
        }
    }

    /// The guest-physical address a CPL3 access of `kind` to `gva` in `space` reaches, or `None`
    /// if the access faults.
    pub fn translate(&self, space: u8, gva: u64, kind: AccessKind) -> Option<u64> {
        let mut table = root(space);
        for l in (1..=top(self.mode)).rev() {
            let e = self.entry(table + 8 * index(gva, l));
            let leaf = l == 1 || (l == 2 && e & PS != 0);
            // PAE PDPTEs have no RW and US bits (they do not restrict).
            let (us, rw) = if l == 3 && is_pae(self.mode) { (US, RW) } else { (e & US, e & RW) };
            if e & P == 0 || us == 0 || e & RSVD51 != 0 || (kind.is_write() && rw == 0) {
                return None;
            }
            if leaf {
                let mask = if l == 2 { (1 << 21) - 1 } else { 0xfff };
                return Some((e & ADDR & !mask) | (gva & mask));
            }
            table = e & ADDR;
        }
        None
    }
}

/// Whether page-directory entry `e` links a page table (present, not a 2 MiB page).
fn links_a_table(e: u64) -> bool {
    e & P != 0 && e & PS == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmmu_scenario::AccessKind::{Read, Write};
    use vmmu_scenario::MapFlags;

    fn map(space: u8, gva: u64, gpa: u64, size: PageSize, flags: MapFlags) -> MapOp {
        MapOp { space, gva, gpa, size, flags }
    }

    #[test]
    fn first_map_links_new_tables_top_down_then_the_leaf() {
        let mut t = Tables::new(Paging::Level4);
        let gva = 0x7f12_3456_7000;
        let w = t.map(&map(2, gva, 0x4000_0000, PageSize::Size4K, MapFlags::default())).unwrap();
        assert_eq!(w.len(), 4, "{w:x?}");
        assert_eq!(w[0], (root(2) + 8 * index(gva, 4), FIRST_FREE | 7));
        assert_eq!(w[1].1, (FIRST_FREE + 0x1000) | 7);
        assert_eq!(w[3].1, 0x4000_0000 | 7 | 0x60, "the leaf is accessed and dirty");
        assert_eq!(t.translate(2, gva + 8, Read), Some(0x4000_0008));
        assert_eq!(t.translate(0, gva, Read), None);
        // A second page in the same 2 MiB region writes only its leaf.
        let w = t.map(&map(2, gva + 0x1000, 0x5000, PageSize::Size4K, MapFlags::default()));
        assert_eq!(w.unwrap().len(), 1);
    }

    #[test]
    fn flags_and_large_pages() {
        let mut t = Tables::new(Paging::Level4);
        let ro = MapFlags { readonly: true, ..MapFlags::default() };
        let w = t.map(&map(0, 0x80_0000, 0x1_0000_0000, PageSize::Size2M, ro)).unwrap();
        // PD 0 exists already: just the leaf, in PD 0 entry 4.
        assert_eq!(w, [(root(0) + 0x2000 + 32, 0x1_0000_0000 | P | US | PS | 0x60)]);
        assert_eq!(t.translate(0, 0x80_1234, Read), Some(0x1_0000_1234));
        assert_eq!(t.translate(0, 0x80_1234, Write), None);
        let sup = MapFlags { supervisor: true, ..MapFlags::default() };
        t.map(&map(0, 0x4000_0000, 0x4000_0000, PageSize::Size4K, sup)).unwrap();
        assert_eq!(t.translate(0, 0x4000_0000, Read), None);
        let rsv = MapFlags { reserved: true, ..MapFlags::default() };
        let w = t.map(&map(1, 0x4000_0000, 0x4000_0000, PageSize::Size4K, rsv)).unwrap();
        assert_eq!(w.last().unwrap().1, 0x4000_0000 | RSVD51 | 7 | 0x60);
        assert_eq!(t.translate(1, 0x4000_0000, Read), None);
    }

    #[test]
    fn unmap_clears_the_leaf_or_writes_nothing() {
        let mut t = Tables::new(Paging::Level4);
        let op = map(0, 0x4000_0000, 0x9000_0000, PageSize::Size4K, MapFlags::default());
        let w = t.map(&op).unwrap();
        let u = t.unmap(&UnmapOp { space: 0, gva: 0x4000_0000, size: PageSize::Size4K });
        assert_eq!(u, [(w.last().unwrap().0, 0)]);
        assert_eq!(t.translate(0, 0x4000_0000, Read), None);
        assert!(t
            .unmap(&UnmapOp { space: 3, gva: 0x4000_0000, size: PageSize::Size4K })
            .is_empty());
        // Remapping reuses the tables.
        assert_eq!(t.map(&op).unwrap().len(), 1);
    }

    #[test]
    fn a_page_table_a_2m_page_unlinks_is_reused_when_clear() {
        let mut t = Tables::new(Paging::Level4);
        let k4 = |gva, gpa| map(0, gva, gpa, PageSize::Size4K, MapFlags::default());
        let m2 = |gva, gpa| map(0, gva, gpa, PageSize::Size2M, MapFlags::default());
        let unmap = |gva, size| UnmapOp { space: 0, gva, size };
        // GiB 1: a page directory, then the region's page table.
        let w = t.map(&k4(0x4000_0000, 0x9000_0000)).unwrap();
        let pt = w[1].1 & ADDR;
        assert_eq!(w.len(), 3, "{w:x?}");
        t.unmap(&unmap(0x4000_0000, PageSize::Size4K));
        // A 2M page over the cleared region unlinks the table; the next region reuses it.
        t.map(&m2(0x4000_0000, 0x4020_0000)).unwrap();
        let w = t.map(&k4(0x4040_0000, 0x9000_0000)).unwrap();
        assert_eq!(w[0].1, pt | LINK, "{w:x?}");
        assert_eq!(t.translate(0, 0x4040_0008, Read), Some(0x9000_0008));
        assert_eq!(t.translate(0, 0x4000_1008, Read), Some(0x4020_1008));
        // A 2M unmap unlinks it too.
        t.unmap(&unmap(0x4040_0000, PageSize::Size4K));
        assert_eq!(t.unmap(&unmap(0x4040_0000, PageSize::Size2M)).len(), 1);
        let w = t.map(&k4(0x4060_0000, 0x9000_0000)).unwrap();
        assert_eq!(w[0].1, pt | LINK);
        // A table that still maps a page is not reused (the parser refuses the 2M map anyway).
        t.map(&m2(0x4060_0000, 0x4020_0000)).unwrap();
        let w = t.map(&k4(0x4080_0000, 0x9000_0000)).unwrap();
        assert_ne!(w[0].1, pt | LINK);
        // Toggling a region between sizes forever needs no new table.
        let next = t.next;
        for _ in 0..3000 {
            t.unmap(&unmap(0x4080_0000, PageSize::Size4K));
            t.map(&m2(0x4080_0000, 0x4020_0000)).unwrap();
            t.unmap(&unmap(0x4080_0000, PageSize::Size2M));
            t.map(&k4(0x4080_0000, 0x9000_0000)).unwrap();
        }
        assert_eq!(t.next, next);
    }

    #[test]
    fn every_space_maps_the_low_8_mib_and_the_pool_fits() {
        for mode in [Paging::Level4, Paging::Pae] {
            let t = Tables::new(mode);
            for s in 0..SPACES {
                // Supervisor: CPL3 cannot reach the tables; the code page and 6..8 MiB are user.
                assert_eq!(t.translate(s, root(s), Read), None);
                assert_eq!(t.translate(s, crate::guest::CODE, Read), Some(crate::guest::CODE));
                assert_eq!(t.translate(s, SYNC_GPA, Write), Some(SYNC_GPA));
            }
        }
        assert!(FIRST_FREE < POOL_GPA + POOL_SIZE as u64);
    }

    #[test]
    fn pae_pdptes_are_fixed_and_maps_create_page_tables_only() {
        let mut t = Tables::new(Paging::Pae);
        let img = pool_image(Paging::Pae);
        let pdpt = &img.iter().find(|(o, _)| *o == root(5) - POOL_GPA).unwrap().1;
        assert_eq!(pdpt.len(), 32);
        assert_eq!(u64::from_le_bytes(pdpt[24..32].try_into().unwrap()), (root(5) + 0x4000) | P);
        let gva = 0xc000_0000;
        let w = t.map(&map(5, gva, 0x2_0000_0000, PageSize::Size4K, MapFlags::default())).unwrap();
        // PD 3 entry 0 links a new page table; then the leaf.
        assert_eq!(w, [(root(5) + 0x4000, FIRST_FREE | 7), (FIRST_FREE, 0x2_0000_0000 | 7 | 0x60)]);
        assert_eq!(t.translate(5, gva + 4, Write), Some(0x2_0000_0004));
        let w = t.map(&map(
            5,
            0x80_0000,
            0x40_0000_0000 - (2 << 20),
            PageSize::Size2M,
            MapFlags::default(),
        ));
        assert_eq!(
            w.unwrap(),
            [(root(5) + 0x1000 + 32, (0x40_0000_0000 - (2 << 20)) | P | RW | US | PS | 0x60)]
        );
    }
}
