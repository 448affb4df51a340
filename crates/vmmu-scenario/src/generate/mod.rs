//! Random scenario files for differential tests (feature `generate`).
//!
//! [`scenario`] is a proptest [`Strategy`] for a [`GenScenario`]: an abstract recipe whose
//! [`GenScenario::text`] is always a valid scenario file (it parses, and no backend can fail on
//! it). The recipe names things by *index* (the n-th buffer, the n-th earlier slot request, the
//! n-th vCPU, all taken modulo what exists) and the printer resolves them while it walks the
//! steps, so every shrink proptest tries (dropping steps, shrinking fields) still prints a valid
//! file: a shrunk failure is printed as the minimal scenario file (the [`fmt::Debug`] of a
//! [`GenScenario`] is its text).
//!
//! What the printer guarantees, besides the parser's own rules (no reserved slot ids, no slot of
//! non-zero size below 8 MiB, accesses in `[8 MiB, 64 GiB)`, aligned, values that fit):
//! - **every slot request KVM could accept is backed by its buffer**: a request with a
//!   page-aligned buffer offset and a page-aligned non-zero size never reaches past the end of
//!   its buffer (misaligned ones are refused by KVM before anything else), so a guest access
//!   through any accepted slot stays inside a scenario buffer;
//! - slots stay below 2^37, so no host or `phys_bits >= 46` limit on the guest-physical address
//!   width decides a request; `phys_bits` is 46, 48 or 52;
//! - invalid requests are common on purpose: misaligned addresses, sizes and buffer offsets,
//!   overlaps (slots sit on a small grid), bad slot ids and address spaces, wrapping ranges, too
//!   many pages, read-only toggles, size and buffer changes of existing slots, deletes of
//!   missing slots;
//! - dirty logging (version 2): `vm dirty_log=` in either mode, `dirty-log` and `clear-dirty-log`
//!   mostly on a recent slot request (so on logged slots often), with KVM's alignment rules
//!   broken on purpose now and then (misaligned first page, odd counts, ranges past the end).
//!
//! [`scenario`] writes files without guest paging: version 1 steps plus version 2's dirty
//! logging (above), the only version 2 feature it uses.
//! [`scenario_for`] with [`Flavor::Paging`] (or [`paging_scenario`]) writes version 2 files with
//! guest paging: `paging=4level` or `pae`, `format=` any of `ept`, `npt`, `shadow`, the same slot
//! churn, and `map`/`unmap`/`cr3` steps in up to 8 page-table spaces, 4K and 2M guest pages with
//! `readonly`/`supervisor`/`reserved` flags, mapping slot pages, grid addresses, likely MMIO
//! holes, 8 MiB and the top of the 64 GiB range; accesses go by GVA, mostly near a page mapped
//! earlier in the vCPU's current space and still mapped there (its edges and just outside them),
//! else into a small window where most pages are unmapped (page faults). A paging file opens
//! with a slot request and a map of one of its pages in space 0, where every vCPU starts. GVAs
//! cover the canonical edges (top of the lower half, top of the address space, just above PML4
//! entry 256, the 4 GiB top for PAE).
//! The printer never mixes page sizes in a 2 MiB region: before a `map` whose size differs from
//! what is live there it prints the `unmap`s that clear the region, and an `unmap` takes the
//! size of what is mapped (a 2M `unmap` of a region of 4K pages unmaps each of them).
//!
//! The version 1 and paging generators keep slots small (at most 16 pages) and accesses near
//! their edges. [`Flavor::Wide`] ([`wide_scenario`]) and [`Flavor::WidePaging`]
//! ([`wide_paging_scenario`]) mix those steps with what they never produce: buffers of 2 MiB,
//! 2 MiB plus or minus a page, 4 and 6 MiB; slots of up to 6 MiB (512, 511, 513, 1024 pages or
//! any) at 2 MiB boundaries or one, 256 or 511 pages past one, over a 16 MiB range that holds
//! the small slots' grid, at buffer offsets of 0, 2 MiB, one page, 511 pages or any (so the
//! host address is 2 MiB-aligned with the gpa or not); accesses at any page of a slot (pages
//! the guest never touched) and within 16 bytes of its 2 MiB boundaries; dirty logging toggled
//! on live slots, `dirty-log` twice as often, `clear-dirty-log` up to page 1984 with counts of
//! up to 31 words; host writes anywhere in the large buffers; with paging, 4K and 2M guest pages
//! over any page of a large slot, GVAs anywhere in a 2 MiB region, all 8 spaces and more `cr3`
//! switches between memslot and dirty-log steps. Each wide file opens with one or two large
//! slot requests (with paging, then a map of a page of the first in space 0). The recipe
//! variants of large buffers and slots are written by the wide flavors only.
//!
//! Its parts: `strategy` draws recipes, `printer` turns one into a file ([`GenScenario::text`]).
//!
//! [`Strategy`]: proptest::strategy::Strategy

use crate::step::{DirtyLogMode, Format, Paging, RESERVED_BELOW};
use std::fmt;

/// Base of the grid most generated slots sit on (256 MiB): slots of up to 16 pages on a 16 KiB
/// grid overlap often.
const GRID_BASE: u64 = 0x1000_0000;
/// Spacing of the grid.
const GRID_STEP: u64 = 0x4000;
/// Start of the far slots (4 GiB), spaced [`FAR_STEP`] apart.
const FAR_BASE: u64 = 0x1_0000_0000;
/// Spacing of far slots (1 GiB), up to the 64 GiB access limit.
const FAR_STEP: u64 = 0x4000_0000;
/// A gpa whose range wraps past 2^64 for every non-zero size.
const WRAP_GPA: u64 = 0xffff_ffff_ffff_f000;
/// A size larger than `KVM_MEM_MAX_NR_PAGES` pages (2^31 - 1).
const HUGE_SIZE: u64 = 1 << 44;
/// Base of the GVA window most generated guest pages sit in (1 GiB; below 4 GiB for PAE).
const GVA_BASE: u64 = 0x4000_0000;
/// A 2 MiB guest page.
const HUGE_PAGE: u64 = 0x20_0000;
/// Where [`GenMapGpa::Hole`] pages go (32 GiB): past the grid, between far slots.
const HOLE_BASE: u64 = 0x8_0000_0000;
/// Base of the 2 MiB regions the wide generators' large slots sit in: 4 MiB below the grid, so
/// region 2 holds the grid and large slots collide with small ones.
const BIG_BASE: u64 = GRID_BASE - 2 * HUGE_PAGE;
/// Number of 2 MiB regions from [`BIG_BASE`] a large slot may start in.
const BIG_REGIONS: u64 = 8;
/// Largest size of a large slot, in pages (6 MiB; also bounded by its buffer).
const BIG_PAGES: u64 = 0x600;
/// Edge GVAs for 4-level paging (2 MiB aligned): PML4 entry 1, 8 MiB, the top 2 MiB of the
/// lower half, the first 2 MiB above PML4 entry 256, the top 2 MiB of the address space.
const EDGES_4LEVEL: [u64; 5] = [
    0x80_0000_0000,
    RESERVED_BELOW,
    0x7fff_ffe0_0000,
    0xffff_8080_0000_0000,
    0xffff_ffff_ffe0_0000,
];
/// Edge GVAs for PAE paging (2 MiB aligned): other PDPTEs, 8 MiB, the top 2 MiB below 4 GiB.
const EDGES_PAE: [u64; 5] = [0x8000_0000, RESERVED_BELOW, 0xc000_0000, 0xffc0_0000, 0xffe0_0000];

/// The `vm` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenVm {
    /// vCPUs, 1..=4.
    pub vcpus: u32,
    /// 1, or 2 (KVM's SMM address space).
    pub address_spaces: u8,
    /// `mmio_caching=` if written.
    pub mmio_caching: Option<bool>,
    /// `format=` if written.
    pub format: Option<Format>,
    /// `phys_bits=` if written (46, 48 or 52).
    pub phys_bits: Option<u8>,
    /// `paging=` if written (version 2: only [`Flavor::Paging`] writes it, never `off`).
    pub paging: Option<Paging>,
    /// `dirty_log=` if written.
    pub dirty_log: Option<DirtyLogMode>,
}

/// Which scenario files the generator writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Flavor {
    /// No guest paging: version 1 steps and version 2's dirty logging (what [`scenario`]
    /// writes).
    #[default]
    V1,
    /// Version 2 with guest paging: `paging=4level|pae`, `map`, `unmap`, `cr3`, GVA accesses.
    Paging,
    /// [`Flavor::V1`]'s steps mixed with large slots (up to 6 MiB, 2 MiB-aligned or not, on
    /// buffers of up to 6 MiB at 2 MiB-aligned or other offsets), accesses at any page of a slot
    /// and around its 2 MiB boundaries, and denser dirty logging (GET, CLEAR far into large
    /// slots, logging toggled on live slots).
    Wide,
    /// [`Flavor::Paging`]'s steps mixed with [`Flavor::Wide`]'s, plus 4K and 2M guest pages
    /// over any page of large slots, GVAs anywhere in a 2 MiB region, all 8 spaces and more
    /// `cr3` switches.
    WidePaging,
}

/// A guest-virtual page choice (4K aligned; a 2M page takes the 2 MiB region around it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenGva {
    /// `GVA_BASE + (r % 4) * 2 MiB + (p % 16) * 4 KiB`: a few regions, pages that collide.
    Near(u64, u64),
    /// Edge `e` of the paging mode (modulo their number) plus page `p % 4`.
    Edge(usize, u64),
    /// `GVA_BASE + (r % 4) * 2 MiB + (p % 512) * 4 KiB`: any page of the regions of
    /// [`GenGva::Near`] (wide generators only).
    Wide(u64, u64),
}

/// A guest-physical page choice for a `map`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenMapGpa {
    /// Page `p` of the n-th most recent slot request of non-zero size (0 = the last one; a
    /// grid page when there is none, or when the slot's page is out of range).
    Slot(usize, u64),
    /// A grid address, `GRID_BASE + (k % 32) * GRID_STEP` (a slot or a hole).
    Grid(u64),
    /// `HOLE_BASE + (k % 8) * 2 MiB`: most likely MMIO.
    Hole(u64),
    /// The last page below 64 GiB.
    Top,
    /// 8 MiB, the lowest page a map may name.
    Low,
    /// Page `p` (modulo its pages, any of them) of the n-th most recent slot request of
    /// non-zero size (wide generators only).
    SlotPage(usize, u64),
}

/// A `map` step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenMap {
    /// Page-table space (modulo 8).
    pub space: u8,
    /// The page.
    pub gva: GenGva,
    /// What it maps.
    pub gpa: GenMapGpa,
    /// A 2 MiB page (else 4 KiB).
    pub huge: bool,
    /// `readonly`.
    pub readonly: bool,
    /// `supervisor`.
    pub supervisor: bool,
    /// `reserved`.
    pub reserved: bool,
}

/// A slot id choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenId {
    /// A small id, 0..32 (most requests: they collide on purpose).
    Small(u16),
    /// A valid but unusual id (509, 32759).
    Edge(u16),
    /// An id KVM refuses (32764 and up).
    Bad(u16),
}

/// An address-space choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenAs {
    /// Address space 0.
    Zero,
    /// Address space 1 (SMM; invalid unless `address_spaces=2`).
    One,
    /// An address space KVM never has (2 or 0xffff).
    Bad(u16),
}

/// A slot gpa choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenGpa {
    /// `GRID_BASE + k * GRID_STEP`, k < 32.
    Grid(u64),
    /// `FAR_BASE + k * FAR_STEP`, k < 60 (just below 64 GiB at most).
    Far(u64),
    /// 2 MiB below 64 GiB: a slot there may reach past the access limit.
    Top,
    /// A grid address plus half a page (misaligned).
    Misaligned(u64),
    /// Near 2^64: every non-zero size wraps.
    Wrap,
    /// `BIG_BASE + (k % 8) * 2 MiB + (p % 512) * 4 KiB`: a 2 MiB boundary or pages past one
    /// (wide generators only).
    Big(u64, u64),
}

/// A slot size choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenSize {
    /// `n` pages, at most what the buffer has from the offset on.
    Pages(u64),
    /// The rest of the buffer from the offset on.
    Whole,
    /// `n` pages plus 16 bytes (misaligned).
    Misaligned(u64),
    /// 0: a delete.
    Zero,
    /// 2^44 bytes: more pages than KVM allows.
    Huge,
    /// `(n % 1536).max(1)` pages (up to 6 MiB), at most what the buffer has from the offset on
    /// (wide generators only).
    Big(u64),
}

/// A buffer offset choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenOffset {
    /// Page `k` of the buffer (modulo its size).
    Page(u64),
    /// Page `k` plus 256 bytes (misaligned).
    Misaligned(u64),
}

/// A fresh slot request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenSlot {
    /// The id.
    pub id: GenId,
    /// The address space.
    pub as_id: GenAs,
    /// `gpa=`.
    pub gpa: GenGpa,
    /// `size=`.
    pub size: GenSize,
    /// The buffer (index modulo the buffers).
    pub mem: usize,
    /// The offset into it.
    pub offset: GenOffset,
    /// `readonly`.
    pub readonly: bool,
    /// `dirty_log`.
    pub dirty_log: bool,
}

/// What a request derived from an earlier one changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenChange {
    /// Nothing: an identical re-set.
    Same,
    /// The gpa (a move, or a create when the slot is gone).
    Move(GenGpa),
    /// The flags (a read-only toggle is invalid).
    Flags {
        /// `readonly`.
        readonly: bool,
        /// `dirty_log`.
        dirty_log: bool,
    },
    /// Size 0: a delete.
    Delete,
    /// The size (invalid on an existing slot).
    Resize(GenSize),
    /// The buffer offset (invalid on an existing slot).
    Remap(GenOffset),
}

/// Where a guest access goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenTarget {
    /// Relative to the n-th most recent earlier slot request of non-zero size (0 = the last
    /// one; modulo their number).
    Slot(usize, GenPlace),
    /// A grid address plus `k` bytes (a hole or a slot, whatever is there).
    Grid(u64, u64),
}

/// A place relative to a slot request's range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenPlace {
    /// Its first bytes.
    First,
    /// Its last bytes.
    Last,
    /// Just below it.
    Before,
    /// Just past it.
    After,
    /// `8 * k` bytes in (modulo its size).
    Inside(u64),
    /// Page `p` (modulo its pages) plus `off % 4096` bytes (wide generators only).
    Page(u64, u64),
    /// `d - 16` bytes from the `(j % 3)`-th 2 MiB boundary above its start, in or past it
    /// (wide generators only).
    Boundary(u64, u64),
}

/// Which slot a dirty-log step names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenLogSlot {
    /// The id and address space of the n-th most recent earlier slot request that asked for
    /// dirty logging with a non-zero size (0 = the last one; modulo their number), or of any
    /// request when there is none such (slot 1 when there is none at all).
    Recent(usize),
    /// Any id and address space (often missing or invalid).
    Id(GenId, GenAs),
}

/// `first=` of a `clear-dirty-log`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenFirst {
    /// Page `64 * k`.
    Aligned(u64),
    /// Page `64 * k + 1` (refused).
    Misaligned(u64),
    /// Page `64 * (k % 32)`: far into a large slot (wide generators only).
    Far(u64),
}

/// `count=` of a `clear-dirty-log`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenCount {
    /// `64 * k` pages.
    Words(u32),
    /// From `first` to the end of the slot (the request's pages; 0 if `first` is past it).
    ToEnd,
    /// `n` pages (odd counts: refused unless they end at the slot's end).
    Pages(u32),
    /// `64 * (k % 32)` pages (wide generators only).
    ManyWords(u32),
}

/// An access width choice, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenWidth(pub u8);

/// One generated step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GenStep {
    /// A fresh slot request.
    Slot(GenSlot),
    /// A request derived from the n-th most recent earlier one (0 = the last one; modulo their
    /// number; a delete of slot 1 when there is none).
    Reuse(usize, GenChange),
    /// A delete by id (often of a missing slot).
    Delete(GenId, GenAs),
    /// A guest load.
    Read {
        /// vCPU (modulo the vCPUs).
        vcpu: u32,
        /// Where.
        at: GenTarget,
        /// How wide.
        width: GenWidth,
    },
    /// A guest store.
    Write {
        /// vCPU (modulo the vCPUs).
        vcpu: u32,
        /// Where.
        at: GenTarget,
        /// How wide.
        width: GenWidth,
        /// What (truncated to the width).
        value: u64,
    },
    /// The VMM stores into buffer n at byte `offset` (modulo its size, aligned down).
    HostWrite(usize, u64, GenWidth, u64),
    /// The VMM loads from buffer n.
    HostRead(usize, u64, GenWidth),
    /// The reply of later MMIO reads.
    MmioReply(u64),
    /// A `map` (version 2; printed only with paging).
    Map(GenMap),
    /// An `unmap` of a page in a space (version 2; printed only with paging).
    Unmap {
        /// Page-table space (modulo 8).
        space: u8,
        /// The page.
        gva: GenGva,
        /// A 2 MiB page (else 4 KiB; the printer uses the size of what is mapped).
        huge: bool,
    },
    /// A `cr3` (version 2; printed only with paging).
    Cr3 {
        /// vCPU (modulo the vCPUs).
        vcpu: u32,
        /// Page-table space (modulo 8).
        space: u8,
    },
    /// `dirty-log`.
    DirtyLog(GenLogSlot),
    /// `clear-dirty-log`.
    ClearDirtyLog(GenLogSlot, GenFirst, GenCount),
}

/// A generated scenario: the `vm` line, the buffers (sizes in bytes as written, declared first
/// as `m0`, `m1`, ...) and the steps. Its `Debug` is its [`GenScenario::text`].
#[derive(Clone, PartialEq, Eq)]
pub struct GenScenario {
    /// The `vm` line.
    pub vm: GenVm,
    /// Buffer sizes in bytes as written (at least one buffer).
    pub mems: Vec<u64>,
    /// The steps after the `mem` lines.
    pub steps: Vec<GenStep>,
}

impl fmt::Debug for GenScenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "scenario file:")?;
        f.write_str(&self.text())
    }
}

mod printer;
mod strategy;
#[cfg(test)]
mod tests;

pub use strategy::{
    paging_scenario, scenario, scenario_for, scenario_with, wide_paging_scenario, wide_scenario,
};
