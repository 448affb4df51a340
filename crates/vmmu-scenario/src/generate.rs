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
//! earlier in the vCPU's current space (its edges and just outside them), else into a small
//! window where most pages are unmapped (page faults). GVAs cover the canonical edges (top of
//! the lower half, top of the address space, just above PML4 entry 256, the 4 GiB top for PAE).
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
//! slot requests. The existing generators' strategies are unchanged (the same seed gives the
//! same files); the new recipe variants are written by the wide flavors only.

use crate::step::{DirtyLogMode, Format, Paging, ACCESS_LIMIT, PAGE_SIZE, RESERVED_BELOW, SPACES};
use proptest::prelude::*;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fmt::Write as _;

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

/// A slot request with everything resolved.
#[derive(Clone, Copy, Debug)]
struct Req {
    id: u16,
    as_id: u16,
    gpa: u64,
    size: u64,
    /// Buffer index and byte offset; `None` for a delete written without `mem=`.
    mem: Option<(usize, u64)>,
    readonly: bool,
    dirty_log: bool,
}

fn pages(bytes: u64) -> u64 {
    bytes.div_ceil(PAGE_SIZE)
}

impl GenScenario {
    fn buf_pages(&self, i: usize) -> u64 {
        pages(self.mems[i % self.mems.len()]).max(1)
    }

    fn resolve_id(id: GenId) -> u16 {
        match id {
            GenId::Small(n) => n % 32,
            GenId::Edge(n) => n,
            GenId::Bad(n) => n.max(32764),
        }
    }

    fn resolve_as(a: GenAs) -> u16 {
        match a {
            GenAs::Zero => 0,
            GenAs::One => 1,
            GenAs::Bad(n) => n.max(2),
        }
    }

    fn resolve_gpa(g: GenGpa) -> u64 {
        match g {
            GenGpa::Grid(k) => GRID_BASE + (k % 32) * GRID_STEP,
            GenGpa::Far(k) => FAR_BASE + (k % 60) * FAR_STEP,
            GenGpa::Top => ACCESS_LIMIT - 0x20_0000,
            GenGpa::Misaligned(k) => GRID_BASE + (k % 32) * GRID_STEP + PAGE_SIZE / 2,
            GenGpa::Wrap => WRAP_GPA,
            GenGpa::Big(k, p) => BIG_BASE + (k % BIG_REGIONS) * HUGE_PAGE + (p % 512) * PAGE_SIZE,
        }
    }

    fn resolve_offset(&self, mem: usize, o: GenOffset) -> u64 {
        let n = self.buf_pages(mem);
        match o {
            GenOffset::Page(k) => (k % n) * PAGE_SIZE,
            GenOffset::Misaligned(k) => (k % n) * PAGE_SIZE + 0x100,
        }
    }

    /// The size for `s` at byte `offset` of buffer `mem`: page-aligned non-zero sizes never
    /// reach past the buffer's end when the offset is page-aligned.
    fn resolve_size(&self, mem: usize, offset: u64, s: GenSize) -> u64 {
        let room = (self.buf_pages(mem) * PAGE_SIZE).saturating_sub(offset).max(PAGE_SIZE);
        match s {
            GenSize::Pages(n) => ((n % 16).max(1) * PAGE_SIZE).min(room),
            GenSize::Whole => room,
            GenSize::Misaligned(n) => (n % 16) * PAGE_SIZE + 16,
            GenSize::Zero => 0,
            GenSize::Huge => HUGE_SIZE,
            GenSize::Big(n) => ((n % BIG_PAGES).max(1) * PAGE_SIZE).min(room),
        }
    }

    fn fresh(&self, s: &GenSlot) -> Req {
        let mem = s.mem % self.mems.len();
        let offset = self.resolve_offset(mem, s.offset);
        let size = self.resolve_size(mem, offset, s.size);
        let gpa = Self::resolve_gpa(s.gpa);
        Req {
            id: Self::resolve_id(s.id),
            as_id: Self::resolve_as(s.as_id),
            // A non-zero slot may not start below 8 MiB; none of the gpa choices does.
            gpa,
            size,
            mem: (size != 0).then_some((mem, offset)),
            readonly: s.readonly,
            dirty_log: s.dirty_log,
        }
    }

    fn derive(&self, old: &Req, change: GenChange) -> Req {
        let mut r = *old;
        match change {
            GenChange::Same => {}
            GenChange::Move(g) => r.gpa = Self::resolve_gpa(g),
            GenChange::Flags { readonly, dirty_log } => {
                r.readonly = readonly;
                r.dirty_log = dirty_log;
            }
            GenChange::Delete => {
                r.size = 0;
                r.mem = None;
                r.readonly = false;
                r.dirty_log = false;
            }
            GenChange::Resize(s) => {
                let (mem, offset) = old.mem.unwrap_or((0, 0));
                r.size = self.resolve_size(mem, offset, s);
                r.mem = Some((mem, offset));
            }
            GenChange::Remap(o) => {
                let (mem, _) = old.mem.unwrap_or((0, 0));
                let offset = self.resolve_offset(mem, o);
                // Keep the size unless it no longer fits behind the new offset.
                let room = (self.buf_pages(mem) * PAGE_SIZE).saturating_sub(offset);
                if r.size % PAGE_SIZE == 0 && r.size > room {
                    r.size = room.max(PAGE_SIZE);
                }
                if r.size == 0 {
                    r.size = PAGE_SIZE;
                }
                r.mem = Some((mem, offset));
            }
        }
        r
    }

    /// A naturally aligned guest address for `at`, inside `[8 MiB, 64 GiB)`; `reqs` are the
    /// earlier requests of non-zero size.
    fn resolve_target(reqs: &[Req], at: GenTarget, w: u64) -> u64 {
        let raw = match at {
            GenTarget::Grid(k, off) => GRID_BASE + (k % 32) * GRID_STEP + off % (2 * GRID_STEP),
            GenTarget::Slot(_, _) if reqs.is_empty() => GRID_BASE,
            GenTarget::Slot(back, place) => {
                let r = reqs[reqs.len() - 1 - back % reqs.len()];
                let size = r.size.clamp(PAGE_SIZE, 1 << 30);
                match place {
                    GenPlace::First => r.gpa,
                    GenPlace::Last => r.gpa.wrapping_add(size - w),
                    GenPlace::Before => r.gpa.wrapping_sub(w),
                    GenPlace::After => r.gpa.wrapping_add(size),
                    GenPlace::Inside(k) => r.gpa.wrapping_add((k * 8) % size),
                    GenPlace::Page(p, off) => {
                        r.gpa.wrapping_add((p % pages(size)) * PAGE_SIZE + off % PAGE_SIZE)
                    }
                    GenPlace::Boundary(j, d) => boundary(r.gpa, j, d),
                }
            }
        };
        let a = raw & !(w - 1);
        if a >= RESERVED_BELOW && a.checked_add(w).is_some_and(|end| end <= ACCESS_LIMIT) {
            a
        } else {
            // Out of range (a wrapping or misplaced slot): somewhere on the grid instead.
            (GRID_BASE + a % (2 * GRID_STEP * 32)) & !(w - 1)
        }
    }

    /// The scenario file.
    pub fn text(&self) -> String {
        let mut t = String::new();
        let vm = &self.vm;
        let _ = write!(t, "vm vcpus={}", vm.vcpus);
        if vm.address_spaces != 1 {
            let _ = write!(t, " address_spaces={}", vm.address_spaces);
        }
        if let Some(c) = vm.mmio_caching {
            let _ = write!(t, " mmio_caching={}", if c { "on" } else { "off" });
        }
        if let Some(f) = vm.format {
            let _ = write!(t, " format={f}");
        }
        if let Some(p) = vm.phys_bits {
            let _ = write!(t, " phys_bits={p}");
        }
        if let Some(p) = vm.paging {
            let _ = write!(t, " paging={p}");
        }
        if let Some(d) = vm.dirty_log {
            let _ = write!(t, " dirty_log={d}");
        }
        t.push('\n');
        for (i, size) in self.mems.iter().enumerate() {
            let _ = writeln!(t, "mem m{i} size={size:#x}");
        }
        let mut reqs: Vec<Req> = Vec::new();
        let mut sized: Vec<Req> = Vec::new();
        let vcpus = vm.vcpus.max(1);
        let mut guest = vm.paging.filter(|p| *p != Paging::Off).map(|p| Guest::new(p, vcpus));
        for step in &self.steps {
            match step {
                GenStep::Slot(s) => {
                    let r = self.fresh(s);
                    slot_line(&mut t, &r);
                    reqs.push(r);
                    if r.size != 0 {
                        sized.push(r);
                    }
                }
                GenStep::Reuse(i, change) => {
                    let back = reqs.len().checked_sub(1 + i % reqs.len().max(1));
                    let r = match back.and_then(|b| reqs.get(b)) {
                        Some(old) => self.derive(old, *change),
                        None => Req {
                            id: 1,
                            as_id: 0,
                            gpa: GRID_BASE,
                            size: 0,
                            mem: None,
                            readonly: false,
                            dirty_log: false,
                        },
                    };
                    slot_line(&mut t, &r);
                    reqs.push(r);
                    if r.size != 0 {
                        sized.push(r);
                    }
                }
                GenStep::Delete(id, a) => {
                    let r = Req {
                        id: Self::resolve_id(*id),
                        as_id: Self::resolve_as(*a),
                        gpa: GRID_BASE,
                        size: 0,
                        mem: None,
                        readonly: false,
                        dirty_log: false,
                    };
                    slot_line(&mut t, &r);
                }
                GenStep::Read { vcpu, at, width } => {
                    let w = width_bytes(*width);
                    let vcpu = vcpu % vcpus;
                    let (field, addr) = match &guest {
                        Some(g) => ("gva", g.target(vcpu, *at, w)),
                        None => ("gpa", Self::resolve_target(&sized, *at, w)),
                    };
                    let _ = writeln!(t, "read {vcpu} {field}={addr:#x} size={w}");
                }
                GenStep::Write { vcpu, at, width, value } => {
                    let w = width_bytes(*width);
                    let vcpu = vcpu % vcpus;
                    let (field, addr) = match &guest {
                        Some(g) => ("gva", g.target(vcpu, *at, w)),
                        None => ("gpa", Self::resolve_target(&sized, *at, w)),
                    };
                    let v = value & mask(w);
                    let _ = writeln!(t, "write {vcpu} {field}={addr:#x} size={w} value={v:#x}");
                }
                // Paging steps print nothing without paging (the V1 flavor never makes them).
                GenStep::Map(m) => {
                    if let Some(g) = &mut guest {
                        let gpa = resolve_map_gpa(&sized, m.gpa, m.huge);
                        g.map(&mut t, m, gpa);
                    }
                }
                GenStep::Unmap { space, gva, huge } => {
                    if let Some(g) = &mut guest {
                        g.unmap(&mut t, space % SPACES, *gva, *huge);
                    }
                }
                GenStep::Cr3 { vcpu, space } => {
                    if let Some(g) = &mut guest {
                        let (vcpu, space) = (vcpu % vcpus, space % SPACES);
                        g.cr3[vcpu as usize] = space;
                        let _ = writeln!(t, "cr3 {vcpu} space={space}");
                    }
                }
                GenStep::HostWrite(m, off, width, value) => {
                    let (m, off, w) = self.host_place(*m, *off, *width);
                    let v = value & mask(w);
                    let _ = writeln!(t, "host-write m{m}+{off:#x} size={w} value={v:#x}");
                }
                GenStep::HostRead(m, off, width) => {
                    let (m, off, w) = self.host_place(*m, *off, *width);
                    let _ = writeln!(t, "host-read m{m}+{off:#x} size={w}");
                }
                GenStep::MmioReply(v) => {
                    let _ = writeln!(t, "mmio-reply value={v:#x}");
                }
                GenStep::DirtyLog(which) => {
                    let (id, as_id, _) = Self::log_slot(&reqs, *which);
                    log_line(&mut t, "dirty-log", id, as_id);
                    t.push('\n');
                }
                GenStep::ClearDirtyLog(which, first, count) => {
                    let (id, as_id, npages) = Self::log_slot(&reqs, *which);
                    let first = match first {
                        GenFirst::Aligned(k) => 64 * (k % 4),
                        GenFirst::Misaligned(k) => 64 * (k % 4) + 1,
                        GenFirst::Far(k) => 64 * (k % 32),
                    };
                    let count = match count {
                        GenCount::Words(k) => 64 * (k % 3),
                        GenCount::ToEnd => {
                            u32::try_from(npages.saturating_sub(first)).unwrap_or(u32::MAX)
                        }
                        GenCount::Pages(n) => n % 200,
                        GenCount::ManyWords(k) => 64 * (k % 32),
                    };
                    log_line(&mut t, "clear-dirty-log", id, as_id);
                    let _ = writeln!(t, " first={first:#x} count={count}");
                }
            }
        }
        t
    }

    /// The id, address space and pages of the slot a dirty-log step names.
    fn log_slot(reqs: &[Req], which: GenLogSlot) -> (u16, u16, u64) {
        match which {
            GenLogSlot::Recent(i) => {
                let logged: Vec<&Req> =
                    reqs.iter().filter(|r| r.dirty_log && r.size != 0).collect();
                let pick = if logged.is_empty() {
                    reqs.len().checked_sub(1 + i % reqs.len().max(1)).and_then(|b| reqs.get(b))
                } else {
                    logged.get(logged.len() - 1 - i % logged.len()).copied()
                };
                match pick {
                    Some(r) => (r.id, r.as_id, r.size / PAGE_SIZE),
                    None => (1, 0, 0),
                }
            }
            GenLogSlot::Id(id, a) => (Self::resolve_id(id), Self::resolve_as(a), 0),
        }
    }

    fn host_place(&self, m: usize, off: u64, width: GenWidth) -> (usize, u64, u64) {
        let m = m % self.mems.len();
        let w = width_bytes(width);
        let off = (off % (self.buf_pages(m) * PAGE_SIZE)) & !(w - 1);
        (m, off, w)
    }
}

/// The gpa of a `map` (aligned to the page size, in `[8 MiB, 64 GiB)`).
fn resolve_map_gpa(sized: &[Req], g: GenMapGpa, huge: bool) -> u64 {
    let size = if huge { HUGE_PAGE } else { PAGE_SIZE };
    let grid = |k: u64| GRID_BASE + (k % 32) * GRID_STEP;
    let raw = match g {
        GenMapGpa::Slot(_, _) if sized.is_empty() => GRID_BASE,
        GenMapGpa::Slot(back, p) => {
            let r = sized[sized.len() - 1 - back % sized.len()];
            r.gpa.wrapping_add((p % pages(r.size).clamp(1, 16)) * PAGE_SIZE)
        }
        GenMapGpa::Grid(k) => grid(k),
        GenMapGpa::Hole(k) => HOLE_BASE + (k % 8) * HUGE_PAGE,
        GenMapGpa::Top => ACCESS_LIMIT - size,
        GenMapGpa::Low => RESERVED_BELOW,
        GenMapGpa::SlotPage(_, _) if sized.is_empty() => GRID_BASE,
        GenMapGpa::SlotPage(back, p) => {
            let r = sized[sized.len() - 1 - back % sized.len()];
            r.gpa.wrapping_add((p % pages(r.size).clamp(1, BIG_PAGES)) * PAGE_SIZE)
        }
    };
    let a = raw & !(size - 1);
    if a >= RESERVED_BELOW && a.checked_add(size).is_some_and(|end| end <= ACCESS_LIMIT) {
        a
    } else {
        // A slot out of range (misplaced or wrapping): the grid instead.
        GRID_BASE
    }
}

/// What is live in one 2 MiB region of one space (as the parser tracks it).
#[derive(Debug)]
enum Live {
    Huge,
    Small(BTreeSet<u64>),
}

/// The guest's page tables as the printed file has made them, to aim accesses and to keep
/// page sizes from mixing.
struct Guest {
    paging: Paging,
    /// Per (space, 2 MiB region).
    live: HashMap<(u8, u64), Live>,
    /// Every page mapped so far, in order: (space, gva, size).
    maps: Vec<(u8, u64, u64)>,
    /// Each vCPU's space.
    cr3: Vec<u8>,
}

impl Guest {
    fn new(paging: Paging, vcpus: u32) -> Self {
        Guest { paging, live: HashMap::new(), maps: Vec::new(), cr3: vec![0; vcpus as usize] }
    }

    /// A 4K-aligned GVA for `g`.
    fn gva(&self, g: GenGva) -> u64 {
        match g {
            GenGva::Near(r, p) => GVA_BASE + (r % 4) * HUGE_PAGE + (p % 16) * PAGE_SIZE,
            GenGva::Edge(e, p) => {
                let edges = if self.paging == Paging::Pae { &EDGES_PAE } else { &EDGES_4LEVEL };
                edges[e % edges.len()] + (p % 4) * PAGE_SIZE
            }
            GenGva::Wide(r, p) => GVA_BASE + (r % 4) * HUGE_PAGE + (p % 512) * PAGE_SIZE,
        }
    }

    /// Whether `[gva, gva + len)` is a GVA the parser accepts (`len` divides the alignment).
    fn valid(&self, gva: u64, len: u64) -> bool {
        let canonical = match self.paging {
            Paging::Pae => gva.checked_add(len).is_some_and(|end| end <= 1 << 32),
            _ => gva.checked_add(len).is_some() && (((gva << 16) as i64) >> 16) as u64 == gva,
        };
        canonical
            && gva >= RESERVED_BELOW
            && !(0xffff_8000_0000_0000..0xffff_8080_0000_0000).contains(&gva)
    }

    fn unmap_line(t: &mut String, space: u8, gva: u64, huge: bool) {
        let _ =
            writeln!(t, "unmap space={space} gva={gva:#x} size={}", if huge { "2M" } else { "4K" });
    }

    /// Prints the unmaps that clear region `key` of what `huge` would mix with.
    fn clear_for(&mut self, t: &mut String, key: (u8, u64), huge: bool) {
        match self.live.get(&key) {
            Some(Live::Huge) if !huge => {
                Self::unmap_line(t, key.0, key.1, true);
                self.live.remove(&key);
            }
            Some(Live::Small(pages)) if huge => {
                for &p in pages {
                    Self::unmap_line(t, key.0, p, false);
                }
                self.live.remove(&key);
            }
            _ => {}
        }
    }

    fn map(&mut self, t: &mut String, m: &GenMap, gpa: u64) {
        let space = m.space % SPACES;
        let mut gva = self.gva(m.gva);
        let key = (space, gva & !(HUGE_PAGE - 1));
        self.clear_for(t, key, m.huge);
        let size = if m.huge {
            gva = key.1;
            self.live.insert(key, Live::Huge);
            "2M"
        } else {
            match self.live.entry(key).or_insert_with(|| Live::Small(BTreeSet::new())) {
                Live::Small(pages) => {
                    pages.insert(gva);
                }
                Live::Huge => unreachable!("cleared above"),
            }
            "4K"
        };
        let _ = write!(t, "map space={space} gva={gva:#x} gpa={gpa:#x} size={size}");
        let flags: Vec<&str> =
            [(m.readonly, "readonly"), (m.supervisor, "supervisor"), (m.reserved, "reserved")]
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, n)| *n)
                .collect();
        if !flags.is_empty() {
            let _ = write!(t, " flags={}", flags.join(","));
        }
        t.push('\n');
        self.maps.push((space, gva, if m.huge { HUGE_PAGE } else { PAGE_SIZE }));
    }

    /// Unmaps with the size of what is live (a 2M unmap of 4K pages unmaps each of them).
    fn unmap(&mut self, t: &mut String, space: u8, g: GenGva, huge: bool) {
        let gva = self.gva(g);
        let key = (space, gva & !(HUGE_PAGE - 1));
        match self.live.get_mut(&key) {
            Some(Live::Huge) => {
                Self::unmap_line(t, space, key.1, true);
                self.live.remove(&key);
            }
            Some(Live::Small(pages)) if !huge => {
                pages.remove(&gva);
                if pages.is_empty() {
                    self.live.remove(&key);
                }
                Self::unmap_line(t, space, gva, false);
            }
            Some(Live::Small(_)) => self.clear_for(t, key, true),
            None => Self::unmap_line(t, space, if huge { key.1 } else { gva }, huge),
        }
    }

    /// A GVA for an access of `w` bytes by `vcpu`: near a page mapped earlier (in the vCPU's
    /// space if it has any), else in the window at `GVA_BASE`.
    fn target(&self, vcpu: u32, at: GenTarget, w: u64) -> u64 {
        let space = self.cr3[vcpu as usize];
        let mine: Vec<_> = self.maps.iter().filter(|m| m.0 == space).collect();
        let maps: Vec<_> = if mine.is_empty() { self.maps.iter().collect() } else { mine };
        let window = |k: u64, off: u64| GVA_BASE + (k % 32) * GRID_STEP + off % (2 * GRID_STEP);
        let (raw, base) = match at {
            GenTarget::Grid(k, off) => (window(k, off), GVA_BASE),
            GenTarget::Slot(_, _) if maps.is_empty() => (GVA_BASE, GVA_BASE),
            GenTarget::Slot(back, place) => {
                let &(_, gva, size) = maps[maps.len() - 1 - back % maps.len()];
                let a = match place {
                    GenPlace::First => gva,
                    GenPlace::Last => gva.wrapping_add(size - w),
                    GenPlace::Before => gva.wrapping_sub(w),
                    GenPlace::After => gva.wrapping_add(size),
                    GenPlace::Inside(k) => gva.wrapping_add((k * 8) % size),
                    GenPlace::Page(p, off) => {
                        gva.wrapping_add((p % pages(size)) * PAGE_SIZE + off % PAGE_SIZE)
                    }
                    GenPlace::Boundary(j, d) => boundary(gva, j, d),
                };
                (a, gva)
            }
        };
        let a = raw & !(w - 1);
        if self.valid(a, w) {
            a
        } else {
            base
        }
    }
}

/// `d % 32 - 16` bytes from the `(j % 3)`-th 2 MiB boundary strictly above `start`.
fn boundary(start: u64, j: u64, d: u64) -> u64 {
    let first = (start | (HUGE_PAGE - 1)).wrapping_add(1);
    first.wrapping_add((j % 3) * HUGE_PAGE).wrapping_add(d % 32).wrapping_sub(16)
}

fn width_bytes(w: GenWidth) -> u64 {
    match w.0 {
        0..=1 => 1,
        2..=3 => 2,
        4..=7 => 4,
        _ => 8,
    }
}

fn mask(w: u64) -> u64 {
    if w >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * w)) - 1
    }
}

/// `KEYWORD ID[ as=A]`, without the newline.
fn log_line(t: &mut String, keyword: &str, id: u16, as_id: u16) {
    let _ = write!(t, "{keyword} {id}");
    if as_id != 0 {
        let _ = write!(t, " as={as_id}");
    }
}

fn slot_line(t: &mut String, r: &Req) {
    let _ = write!(t, "slot {}", r.id);
    if r.as_id != 0 {
        let _ = write!(t, " as={}", r.as_id);
    }
    let _ = write!(t, " gpa={:#x} size={:#x}", r.gpa, r.size);
    if let Some((m, off)) = r.mem {
        let _ = write!(t, " mem=m{m}");
        if off != 0 {
            let _ = write!(t, "+{off:#x}");
        }
    }
    let flags: Vec<&str> = [(r.readonly, "readonly"), (r.dirty_log, "dirty_log")]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
    if !flags.is_empty() {
        let _ = write!(t, " flags={}", flags.join(","));
    }
    t.push('\n');
}

fn gen_vm() -> impl Strategy<Value = GenVm> {
    (
        1u32..=4,
        prop_oneof![6 => Just(1u8), 1 => Just(2u8)],
        proptest::option::of(any::<bool>()),
        proptest::option::of(prop_oneof![Just(Format::Ept), Just(Format::Npt)]),
        proptest::option::of(prop_oneof![Just(46u8), Just(48u8), Just(52u8)]),
        proptest::option::of(prop_oneof![Just(DirtyLogMode::Auto), Just(DirtyLogMode::Manual)]),
    )
        .prop_map(|(vcpus, address_spaces, mmio_caching, format, phys_bits, dirty_log)| {
            GenVm {
                vcpus,
                address_spaces,
                mmio_caching,
                format,
                phys_bits,
                paging: None,
                dirty_log,
            }
        })
}

fn gen_vm_paging() -> impl Strategy<Value = GenVm> {
    (
        gen_vm(),
        prop_oneof![3 => Just(Paging::Level4), 1 => Just(Paging::Pae)],
        proptest::option::of(prop_oneof![
            1 => Just(Format::Ept),
            1 => Just(Format::Npt),
            2 => Just(Format::Shadow)
        ]),
    )
        .prop_map(|(vm, paging, format)| GenVm { paging: Some(paging), format, ..vm })
}

/// Spaces: mostly 0 and 1, sometimes any of the 8.
fn gen_space() -> impl Strategy<Value = u8> {
    prop_oneof![6 => 0u8..2, 1 => 0u8..SPACES]
}

fn gen_gva() -> impl Strategy<Value = GenGva> {
    prop_oneof![
        6 => (0u64..4, 0u64..16).prop_map(|(r, p)| GenGva::Near(r, p)),
        1 => (0usize..5, 0u64..4).prop_map(|(e, p)| GenGva::Edge(e, p)),
    ]
}

fn gen_map_gpa() -> impl Strategy<Value = GenMapGpa> {
    prop_oneof![
        10 => (recent(), 0u64..16).prop_map(|(b, p)| GenMapGpa::Slot(b, p)),
        3 => (0u64..32).prop_map(GenMapGpa::Grid),
        3 => (0u64..8).prop_map(GenMapGpa::Hole),
        1 => Just(GenMapGpa::Top),
        1 => Just(GenMapGpa::Low),
    ]
}

fn gen_map() -> impl Strategy<Value = GenMap> {
    map_from(gen_space(), gen_gva(), gen_map_gpa(), [0.25, 0.15, 0.1, 0.08])
}

/// A `map` step in a space, at a gva, to a gpa from the given strategies, with its size and flags
/// drawn with the probabilities `[huge, readonly, supervisor, reserved]`.
fn map_from(
    space: impl Strategy<Value = u8>,
    gva: impl Strategy<Value = GenGva>,
    gpa: impl Strategy<Value = GenMapGpa>,
    [huge, readonly, supervisor, reserved]: [f64; 4],
) -> impl Strategy<Value = GenMap> {
    let w = proptest::bool::weighted;
    (space, gva, gpa, w(huge), w(readonly), w(supervisor), w(reserved)).prop_map(
        |(space, gva, gpa, huge, readonly, supervisor, reserved)| GenMap {
            space,
            gva,
            gpa,
            huge,
            readonly,
            supervisor,
            reserved,
        },
    )
}

fn gen_step_paging() -> impl Strategy<Value = GenStep> {
    prop_oneof![
        8 => gen_step(),
        6 => gen_map().prop_map(GenStep::Map),
        2 => (gen_space(), gen_gva(), proptest::bool::weighted(0.25))
            .prop_map(|(space, gva, huge)| GenStep::Unmap { space, gva, huge }),
        2 => (0u32..4, gen_space()).prop_map(|(vcpu, space)| GenStep::Cr3 { vcpu, space }),
        3 => (0u32..4, gen_target(), gen_width())
            .prop_map(|(vcpu, at, width)| GenStep::Read { vcpu, at, width }),
        3 => (0u32..4, gen_target(), gen_width(), any::<u64>())
            .prop_map(|(vcpu, at, width, value)| GenStep::Write { vcpu, at, width, value }),
    ]
}

fn gen_id() -> impl Strategy<Value = GenId> {
    prop_oneof![
        28 => (0u16..32).prop_map(GenId::Small),
        1 => prop_oneof![Just(509u16), Just(32759u16)].prop_map(GenId::Edge),
        1 => prop_oneof![Just(32764u16), Just(32767u16), Just(u16::MAX)].prop_map(GenId::Bad),
    ]
}

fn gen_as() -> impl Strategy<Value = GenAs> {
    prop_oneof![
        38 => Just(GenAs::Zero),
        1 => Just(GenAs::One),
        1 => prop_oneof![Just(2u16), Just(u16::MAX)].prop_map(GenAs::Bad),
    ]
}

fn gen_gpa() -> impl Strategy<Value = GenGpa> {
    prop_oneof![
        24 => (0u64..32).prop_map(GenGpa::Grid),
        3 => (0u64..60).prop_map(GenGpa::Far),
        1 => Just(GenGpa::Top),
        1 => (0u64..32).prop_map(GenGpa::Misaligned),
        1 => Just(GenGpa::Wrap),
    ]
}

fn gen_size() -> impl Strategy<Value = GenSize> {
    prop_oneof![
        24 => (1u64..16).prop_map(GenSize::Pages),
        4 => Just(GenSize::Whole),
        1 => (0u64..16).prop_map(GenSize::Misaligned),
        1 => Just(GenSize::Zero),
        1 => Just(GenSize::Huge),
    ]
}

fn gen_offset() -> impl Strategy<Value = GenOffset> {
    prop_oneof![
        29 => (0u64..64).prop_map(GenOffset::Page),
        1 => (0u64..64).prop_map(GenOffset::Misaligned),
    ]
}

fn gen_width() -> impl Strategy<Value = GenWidth> {
    prop_oneof![Just(GenWidth(1)), Just(GenWidth(2)), Just(GenWidth(4)), Just(GenWidth(8))]
}

fn gen_slot() -> impl Strategy<Value = GenSlot> {
    // Read-only in one request of four, dirty logging in one of two.
    slot_from(gen_gpa(), gen_size(), gen_offset(), 2)
}

/// A slot request with any id, address space and buffer, its gpa, size and buffer offset from
/// the given strategies, and its flags from a draw `f` in `0..8`: read-only when
/// `f < readonly_below`, else dirty logging when `f < 6`.
fn slot_from(
    gpa: impl Strategy<Value = GenGpa>,
    size: impl Strategy<Value = GenSize>,
    offset: impl Strategy<Value = GenOffset>,
    readonly_below: u8,
) -> impl Strategy<Value = GenSlot> {
    (gen_id(), gen_as(), gpa, size, 0usize..3, offset, 0u8..8).prop_map(
        move |(id, as_id, gpa, size, mem, offset, f)| GenSlot {
            id,
            as_id,
            gpa,
            size,
            mem,
            offset,
            readonly: f < readonly_below,
            dirty_log: (readonly_below..6).contains(&f),
        },
    )
}

fn gen_change() -> impl Strategy<Value = GenChange> {
    prop_oneof![
        2 => Just(GenChange::Same),
        4 => gen_gpa().prop_map(GenChange::Move),
        3 => any::<(bool, bool)>()
            .prop_map(|(readonly, dirty_log)| GenChange::Flags { readonly, dirty_log }),
        4 => Just(GenChange::Delete),
        1 => gen_size().prop_map(GenChange::Resize),
        1 => gen_offset().prop_map(GenChange::Remap),
    ]
}

/// How far back a step looks for an earlier request: mostly the last two.
fn recent() -> impl Strategy<Value = usize> {
    prop_oneof![3 => 0usize..2, 1 => 0usize..16]
}

fn gen_target() -> impl Strategy<Value = GenTarget> {
    let place = prop_oneof![
        3 => Just(GenPlace::First),
        3 => Just(GenPlace::Last),
        1 => Just(GenPlace::Before),
        1 => Just(GenPlace::After),
        3 => (0u64..4096).prop_map(GenPlace::Inside),
    ];
    prop_oneof![
        5 => (recent(), place).prop_map(|(i, p)| GenTarget::Slot(i, p)),
        1 => (0u64..32, 0u64..0x2_0000).prop_map(|(k, o)| GenTarget::Grid(k, o)),
    ]
}

fn gen_log_slot() -> impl Strategy<Value = GenLogSlot> {
    prop_oneof![
        6 => recent().prop_map(GenLogSlot::Recent),
        1 => (gen_id(), gen_as()).prop_map(|(id, a)| GenLogSlot::Id(id, a)),
    ]
}

fn gen_first() -> impl Strategy<Value = GenFirst> {
    // Mostly page 0: generated slots are small, so a later 64-page unit is past their end.
    prop_oneof![
        6 => Just(GenFirst::Aligned(0)),
        2 => (1u64..4).prop_map(GenFirst::Aligned),
        1 => (0u64..4).prop_map(GenFirst::Misaligned),
    ]
}

fn gen_count() -> impl Strategy<Value = GenCount> {
    prop_oneof![
        3 => (0u32..3).prop_map(GenCount::Words),
        3 => Just(GenCount::ToEnd),
        1 => (0u32..200).prop_map(GenCount::Pages),
    ]
}

fn gen_step() -> impl Strategy<Value = GenStep> {
    prop_oneof![
        2 => gen_log_slot().prop_map(GenStep::DirtyLog),
        2 => (gen_log_slot(), gen_first(), gen_count())
            .prop_map(|(s, f, c)| GenStep::ClearDirtyLog(s, f, c)),
        6 => gen_slot().prop_map(GenStep::Slot),
        4 => (recent(), gen_change()).prop_map(|(i, c)| GenStep::Reuse(i, c)),
        1 => (gen_id(), gen_as()).prop_map(|(id, a)| GenStep::Delete(id, a)),
        5 => (0u32..4, gen_target(), gen_width())
            .prop_map(|(vcpu, at, width)| GenStep::Read { vcpu, at, width }),
        4 => (0u32..4, gen_target(), gen_width(), any::<u64>())
            .prop_map(|(vcpu, at, width, value)| GenStep::Write { vcpu, at, width, value }),
        1 => (0usize..3, 0u64..0x10_0000, gen_width(), any::<u64>())
            .prop_map(|(m, o, w, v)| GenStep::HostWrite(m, o, w, v)),
        1 => (0usize..3, 0u64..0x10_0000, gen_width())
            .prop_map(|(m, o, w)| GenStep::HostRead(m, o, w)),
        1 => any::<u64>().prop_map(GenStep::MmioReply),
    ]
}

/// Buffer sizes: odd sizes that round up, single pages, a few pages, 2 MiB.
fn gen_mem_size() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(1u64),
        Just(0x1000),
        Just(0x1800),
        Just(0x4000),
        Just(0x1_0000),
        Just(0x20_0000),
    ]
}

/// Random scenarios of up to `max_steps` steps after the `vm` and `mem` lines.
pub fn scenario_with(max_steps: usize) -> impl Strategy<Value = GenScenario> {
    (gen_vm(), proptest::collection::vec(gen_mem_size(), 1..=3), {
        proptest::collection::vec(gen_step(), 0..=max_steps)
    })
        .prop_map(|(vm, mems, steps)| GenScenario { vm, mems, steps })
}

/// Random scenarios of up to 40 steps.
pub fn scenario() -> impl Strategy<Value = GenScenario> {
    scenario_with(40)
}

/// Random scenarios of `flavor` with up to `max_steps` steps after the `vm` and `mem` lines
/// ([`Flavor::V1`] is [`scenario_with`]).
pub fn scenario_for(flavor: Flavor, max_steps: usize) -> BoxedStrategy<GenScenario> {
    match flavor {
        Flavor::V1 => scenario_with(max_steps).boxed(),
        // The paging flavor opens with a slot request, so that maps made before any other slot
        // step have RAM to aim at (and reads through them reach RAM, not only MMIO).
        Flavor::Paging => (
            gen_vm_paging(),
            proptest::collection::vec(gen_mem_size(), 1..=3),
            gen_slot(),
            proptest::collection::vec(gen_step_paging(), 0..=max_steps),
        )
            .prop_map(|(vm, mems, first, steps)| GenScenario {
                vm,
                mems,
                steps: core::iter::once(GenStep::Slot(first)).chain(steps).collect(),
            })
            .boxed(),
        // The wide flavors open with one or two large slot requests, so that most later steps
        // have one to aim at.
        Flavor::Wide => (
            gen_vm(),
            proptest::collection::vec(gen_mem_size_wide(), 1..=3),
            proptest::collection::vec(gen_slot_wide(), 1..=2),
            proptest::collection::vec(gen_step_wide(), 0..=max_steps),
        )
            .prop_map(|(vm, mems, first, steps)| GenScenario {
                vm,
                mems,
                steps: first.into_iter().map(GenStep::Slot).chain(steps).collect(),
            })
            .boxed(),
        Flavor::WidePaging => (
            gen_vm_paging(),
            proptest::collection::vec(gen_mem_size_wide(), 1..=3),
            proptest::collection::vec(gen_slot_wide(), 1..=2),
            proptest::collection::vec(gen_step_paging_wide(), 0..=max_steps),
        )
            .prop_map(|(vm, mems, first, steps)| GenScenario {
                vm,
                mems,
                steps: first.into_iter().map(GenStep::Slot).chain(steps).collect(),
            })
            .boxed(),
    }
}

/// Random [`Flavor::Wide`] scenarios (no guest paging, large slots), of up to 40 steps.
pub fn wide_scenario() -> BoxedStrategy<GenScenario> {
    scenario_for(Flavor::Wide, 40)
}

/// Random [`Flavor::WidePaging`] scenarios (guest paging over large slots), of up to 40 steps.
pub fn wide_paging_scenario() -> BoxedStrategy<GenScenario> {
    scenario_for(Flavor::WidePaging, 40)
}

/// Buffer sizes of the wide generators: 2 MiB and a page more or less, 4 and 6 MiB, and now and
/// then the small ones.
fn gen_mem_size_wide() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => Just(0x20_0000u64),
        2 => Just(0x20_1000),
        1 => Just(0x1f_f000),
        3 => Just(0x40_0000),
        1 => Just(0x60_0000),
        2 => gen_mem_size(),
    ]
}

/// A page within a 2 MiB region: its first, second, middle or last, or any.
fn gen_region_page() -> impl Strategy<Value = u64> {
    prop_oneof![4 => Just(0u64), 1 => Just(1), 1 => Just(256), 1 => Just(511), 2 => 0u64..512]
}

fn gen_gpa_wide() -> impl Strategy<Value = GenGpa> {
    prop_oneof![
        4 => (0u64..BIG_REGIONS, gen_region_page()).prop_map(|(k, p)| GenGpa::Big(k, p)),
        1 => gen_gpa(),
    ]
}

fn gen_size_wide() -> impl Strategy<Value = GenSize> {
    prop_oneof![
        2 => Just(GenSize::Big(512)),
        1 => Just(GenSize::Big(511)),
        1 => Just(GenSize::Big(513)),
        1 => Just(GenSize::Big(1024)),
        3 => (1u64..BIG_PAGES).prop_map(GenSize::Big),
        2 => Just(GenSize::Whole),
        1 => gen_size(),
    ]
}

/// Buffer offsets: 0, 2 MiB, a page or a page short of 2 MiB (the host address then is not
/// 2 MiB-aligned with the gpa), any page, now and then misaligned.
fn gen_offset_wide() -> impl Strategy<Value = GenOffset> {
    prop_oneof![
        4 => Just(GenOffset::Page(0)),
        1 => Just(GenOffset::Page(512)),
        1 => Just(GenOffset::Page(1)),
        1 => Just(GenOffset::Page(511)),
        2 => (0u64..BIG_PAGES).prop_map(GenOffset::Page),
        1 => gen_offset(),
    ]
}

fn gen_slot_wide() -> impl Strategy<Value = GenSlot> {
    // Read-only in one request of eight, dirty logging in five.
    slot_from(gen_gpa_wide(), gen_size_wide(), gen_offset_wide(), 1)
}

fn gen_change_wide() -> impl Strategy<Value = GenChange> {
    prop_oneof![
        1 => Just(GenChange::Same),
        3 => gen_gpa_wide().prop_map(GenChange::Move),
        // Logging toggled on a live slot (read-only kept off: a toggle is refused).
        4 => any::<bool>().prop_map(|dirty_log| GenChange::Flags { readonly: false, dirty_log }),
        2 => Just(GenChange::Delete),
        1 => gen_size_wide().prop_map(GenChange::Resize),
        1 => gen_change(),
    ]
}

fn gen_place_wide() -> impl Strategy<Value = GenPlace> {
    prop_oneof![
        2 => Just(GenPlace::First),
        2 => Just(GenPlace::Last),
        1 => Just(GenPlace::Before),
        1 => Just(GenPlace::After),
        5 => (0u64..BIG_PAGES, 0u64..PAGE_SIZE).prop_map(|(p, o)| GenPlace::Page(p, o)),
        3 => (0u64..3, 0u64..32).prop_map(|(j, d)| GenPlace::Boundary(j, d)),
    ]
}

fn gen_target_wide() -> impl Strategy<Value = GenTarget> {
    prop_oneof![
        6 => (recent(), gen_place_wide()).prop_map(|(i, p)| GenTarget::Slot(i, p)),
        1 => gen_target(),
    ]
}

fn gen_first_wide() -> impl Strategy<Value = GenFirst> {
    prop_oneof![
        3 => Just(GenFirst::Aligned(0)),
        3 => (0u64..32).prop_map(GenFirst::Far),
        1 => gen_first(),
    ]
}

fn gen_count_wide() -> impl Strategy<Value = GenCount> {
    prop_oneof![
        3 => Just(GenCount::ToEnd),
        2 => (1u32..32).prop_map(GenCount::ManyWords),
        1 => gen_count(),
    ]
}

/// Boxed: nesting the composite step strategies unboxed overflows a debug build's stack when a
/// value tree is made.
fn gen_step_wide() -> BoxedStrategy<GenStep> {
    prop_oneof![
        6 => gen_step().boxed(),
        6 => gen_slot_wide().prop_map(GenStep::Slot),
        3 => (recent(), gen_change_wide()).prop_map(|(i, c)| GenStep::Reuse(i, c)),
        4 => (0u32..4, gen_target_wide(), gen_width())
            .prop_map(|(vcpu, at, width)| GenStep::Read { vcpu, at, width }),
        5 => (0u32..4, gen_target_wide(), gen_width(), any::<u64>())
            .prop_map(|(vcpu, at, width, value)| GenStep::Write { vcpu, at, width, value }),
        5 => gen_log_slot().prop_map(GenStep::DirtyLog),
        3 => (gen_log_slot(), gen_first_wide(), gen_count_wide())
            .prop_map(|(s, f, c)| GenStep::ClearDirtyLog(s, f, c)),
        1 => (0usize..3, 0u64..0x60_0000, gen_width(), any::<u64>())
            .prop_map(|(m, o, w, v)| GenStep::HostWrite(m, o, w, v)),
    ]
    .boxed()
}

fn gen_gva_wide() -> impl Strategy<Value = GenGva> {
    prop_oneof![
        3 => (0u64..4, 0u64..512).prop_map(|(r, p)| GenGva::Wide(r, p)),
        2 => gen_gva(),
    ]
}

fn gen_map_wide() -> impl Strategy<Value = GenMap> {
    map_from(
        prop_oneof![1 => gen_space(), 1 => 0u8..SPACES],
        gen_gva_wide(),
        prop_oneof![
            6 => (recent(), 0u64..BIG_PAGES).prop_map(|(b, p)| GenMapGpa::SlotPage(b, p)),
            2 => gen_map_gpa(),
        ],
        [0.4, 0.15, 0.05, 0.03],
    )
}

fn gen_step_paging_wide() -> BoxedStrategy<GenStep> {
    prop_oneof![
        4 => gen_step_paging().boxed(),
        4 => gen_step_wide(),
        5 => gen_map_wide().prop_map(GenStep::Map),
        1 => (0u8..SPACES, gen_gva_wide(), proptest::bool::weighted(0.3))
            .prop_map(|(space, gva, huge)| GenStep::Unmap { space, gva, huge }),
        3 => (0u32..4, 0u8..SPACES).prop_map(|(vcpu, space)| GenStep::Cr3 { vcpu, space }),
        2 => gen_log_slot().prop_map(GenStep::DirtyLog),
        3 => (0u32..4, gen_target_wide(), gen_width())
            .prop_map(|(vcpu, at, width)| GenStep::Read { vcpu, at, width }),
        3 => (0u32..4, gen_target_wide(), gen_width(), any::<u64>())
            .prop_map(|(vcpu, at, width, value)| GenStep::Write { vcpu, at, width, value }),
    ]
    .boxed()
}

/// Random version 2 scenarios with guest paging, of up to 40 steps.
pub fn paging_scenario() -> BoxedStrategy<GenScenario> {
    scenario_for(Flavor::Paging, 40)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;
    use crate::step::{Op, PageSize, ReadOp, Scenario, WriteOp};
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    use std::collections::BTreeMap;

    fn samples(n: usize) -> Vec<GenScenario> {
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]);
        let mut runner = TestRunner::new_with_rng(Config::default(), rng);
        let s = scenario();
        (0..n).map(|_| s.new_tree(&mut runner).unwrap().current()).collect()
    }

    /// Why KVM refuses a request regardless of what exists (`None`: it depends on the state).
    fn statically_invalid(s: &Scenario, op: &crate::step::SlotOp) -> Option<&'static str> {
        let off = op.mem.as_ref().map_or(0, |m| m.offset);
        if op.id >= 32764 {
            Some("id")
        } else if op.as_id >= u16::from(s.vm.address_spaces) {
            Some("as")
        } else if op.size % PAGE_SIZE != 0 {
            Some("size")
        } else if op.gpa % PAGE_SIZE != 0 {
            Some("gpa")
        } else if off % PAGE_SIZE != 0 {
            Some("offset")
        } else if op.size >= HUGE_SIZE {
            Some("huge")
        } else if op.gpa.checked_add(op.size).is_none() {
            Some("wrap")
        } else {
            None
        }
    }

    proptest! {
        #![proptest_config(Config::with_cases(300))]
        /// Every generated file parses, and every slot KVM could accept is backed by its buffer.
        #[test]
        fn text_parses_and_accepted_slots_are_backed(g in scenario()) {
            let text = g.text();
            let s = parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            for step in &s.steps {
                if let Op::Slot(op) = &step.op {
                    if op.size == 0 || statically_invalid(&s, op).is_some() {
                        continue;
                    }
                    let m = op.mem.as_ref().expect("non-zero slot has mem");
                    let buf = s.mems[m.mem.0].size;
                    prop_assert!(m.offset + op.size <= buf, "line {}: {}", step.line, text);
                }
            }
            // Printing is a function of the recipe.
            prop_assert_eq!(text, g.clone().text());
        }
    }

    proptest! {
        #![proptest_config(Config::with_cases(300))]
        /// Every generated paging file parses, names GVAs, and its canonical text means the same.
        #[test]
        fn paging_text_parses_and_round_trips(g in paging_scenario()) {
            let text = g.text();
            let s = parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            prop_assert!(s.vm.paging != Paging::Off);
            let printed = crate::to_text(&s);
            let again = parse(&printed).map_err(|e| TestCaseError::fail(format!("{e}\n{printed}")))?;
            prop_assert!(s.steps.iter().map(|x| &x.op).eq(again.steps.iter().map(|x| &x.op)));
            prop_assert_eq!(text, g.clone().text());
        }

        /// The version 1 flavor never writes paging.
        #[test]
        fn v1_flavor_has_no_paging(g in scenario_for(Flavor::V1, 40)) {
            let s = parse(&g.text()).map_err(|e| TestCaseError::fail(format!("{e}")))?;
            prop_assert_eq!(s.vm.paging, Paging::Off);
        }
    }

    fn paging_samples(n: usize) -> Vec<GenScenario> {
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[9; 32]);
        let mut runner = TestRunner::new_with_rng(Config::default(), rng);
        let s = paging_scenario();
        (0..n).map(|_| s.new_tree(&mut runner).unwrap().current()).collect()
    }

    #[test]
    fn paging_scenarios_cover_modes_sizes_flags_spaces_and_hit_mappings() {
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        let mut modes: BTreeMap<String, usize> = BTreeMap::new();
        let (mut huge, mut ro, mut sup, mut rsvd, mut other_space, mut high) = (0, 0, 0, 0, 0, 0);
        let (mut hits, mut accesses, mut unmap_huge) = (0usize, 0usize, 0usize);
        // Page tables the backends reuse: unlinked by a 2M map or unmap, taken by a later 4K map.
        let mut reused = 0usize;
        for g in paging_samples(300) {
            let s = parse(&g.text()).unwrap();
            *modes.entry(format!("{} {}", s.vm.paging, s.vm.format)).or_default() += 1;
            // (space, 4K page) -> mapped; a 2M map marks its 512 pages.
            let mut mapped: BTreeMap<(u8, u64), bool> = BTreeMap::new();
            // (space, 2 MiB region) with a page table, and how many freed tables wait.
            let mut pts = std::collections::BTreeSet::new();
            let mut free = 0usize;
            let unlink = |space: u8, gva: u64, pts: &mut std::collections::BTreeSet<_>| {
                usize::from(pts.remove(&(space, gva >> 21)))
            };
            let mut cr3 = vec![0u8; s.vm.vcpus as usize];
            for step in &s.steps {
                *kinds.entry(step.op.keyword()).or_default() += 1;
                let pages = |gva: u64, size: PageSize| {
                    (0..size.bytes() / PAGE_SIZE).map(move |i| gva + i * PAGE_SIZE)
                };
                match &step.op {
                    Op::Map(m) => {
                        huge += usize::from(m.size == PageSize::Size2M);
                        ro += usize::from(m.flags.readonly);
                        sup += usize::from(m.flags.supervisor);
                        rsvd += usize::from(m.flags.reserved);
                        other_space += usize::from(m.space > 1);
                        high += usize::from(m.gva >= 1 << 32);
                        for p in pages(m.gva, m.size) {
                            mapped.insert((m.space, p), true);
                        }
                        if m.size == PageSize::Size2M {
                            free += unlink(m.space, m.gva, &mut pts);
                        } else if pts.insert((m.space, m.gva >> 21)) && free > 0 {
                            free -= 1;
                            reused += 1;
                        }
                    }
                    Op::Unmap(u) => {
                        unmap_huge += usize::from(u.size == PageSize::Size2M);
                        if u.size == PageSize::Size2M {
                            free += unlink(u.space, u.gva, &mut pts);
                        }
                        for p in pages(u.gva, u.size) {
                            mapped.remove(&(u.space, p));
                        }
                    }
                    Op::Cr3(c) => cr3[c.vcpu as usize] = c.space,
                    Op::Read(ReadOp { vcpu, gpa, .. }) | Op::Write(WriteOp { vcpu, gpa, .. }) => {
                        accesses += 1;
                        let key = (cr3[*vcpu as usize], gpa & !(PAGE_SIZE - 1));
                        hits += usize::from(mapped.contains_key(&key));
                    }
                    _ => {}
                }
            }
        }
        for k in ["map", "unmap", "cr3", "read", "write", "slot"] {
            assert!(kinds.get(k).copied().unwrap_or(0) >= 100, "{k}: {kinds:?}");
        }
        for m in ["4level shadow", "4level ept", "4level npt", "pae shadow", "pae ept", "pae npt"] {
            assert!(modes.get(m).copied().unwrap_or(0) >= 5, "{m}: {modes:?}");
        }
        for (what, n) in [
            ("2M maps", huge),
            ("2M unmaps", unmap_huge),
            ("readonly", ro),
            ("supervisor", sup),
            ("reserved", rsvd),
            ("spaces above 1", other_space),
            ("GVAs above 4 GiB", high),
            ("page tables reused", reused),
        ] {
            assert!(n >= 20, "{n} {what}");
        }
        // Accesses hit mapped pages often, and miss them often (page faults).
        assert!(hits * 10 >= accesses * 3, "{hits} of {accesses} accesses hit a mapping");
        assert!(hits * 10 <= accesses * 9, "{hits} of {accesses} accesses hit a mapping");
    }

    #[test]
    fn paging_printer_keeps_page_sizes_apart() {
        let map = |space, gva, gpa, huge| {
            GenStep::Map(GenMap {
                space,
                gva,
                gpa,
                huge,
                readonly: false,
                supervisor: huge,
                reserved: false,
            })
        };
        let g = GenScenario {
            vm: GenVm {
                vcpus: 2,
                address_spaces: 1,
                mmio_caching: None,
                format: Some(Format::Shadow),
                phys_bits: None,
                paging: Some(Paging::Level4),
                dirty_log: None,
            },
            mems: vec![0x1000],
            steps: vec![
                map(0, GenGva::Near(0, 1), GenMapGpa::Grid(0), false),
                map(0, GenGva::Near(0, 2), GenMapGpa::Grid(1), false),
                // 2M over two live 4K pages: both unmapped first.
                map(0, GenGva::Near(0, 5), GenMapGpa::Hole(1), true),
                // 4K inside the 2M page: the 2M page unmapped first.
                map(0, GenGva::Near(0, 3), GenMapGpa::Top, false),
                // A 2M unmap of a region of 4K pages unmaps each.
                GenStep::Unmap { space: 0, gva: GenGva::Near(0, 0), huge: true },
                GenStep::Cr3 { vcpu: 3, space: 9 },
                map(9, GenGva::Edge(2, 1), GenMapGpa::Low, true),
                // An access in vCPU 1's space (1): the last mapping there, its last bytes.
                GenStep::Read {
                    vcpu: 1,
                    at: GenTarget::Slot(0, GenPlace::Last),
                    width: GenWidth(8),
                },
                // Past the top of the lower half: not canonical, so the page's start.
                GenStep::Read {
                    vcpu: 1,
                    at: GenTarget::Slot(0, GenPlace::After),
                    width: GenWidth(1),
                },
                // vCPU 0 is in space 0: the last page mapped there, unmapped since (a fault).
                GenStep::Write {
                    vcpu: 0,
                    at: GenTarget::Slot(0, GenPlace::First),
                    width: GenWidth(2),
                    value: 0x12345,
                },
            ],
        };
        let want = "vm vcpus=2 format=shadow paging=4level\n\
                    mem m0 size=0x1000\n\
                    map space=0 gva=0x40001000 gpa=0x10000000 size=4K\n\
                    map space=0 gva=0x40002000 gpa=0x10004000 size=4K\n\
                    unmap space=0 gva=0x40001000 size=4K\n\
                    unmap space=0 gva=0x40002000 size=4K\n\
                    map space=0 gva=0x40000000 gpa=0x800200000 size=2M flags=supervisor\n\
                    unmap space=0 gva=0x40000000 size=2M\n\
                    map space=0 gva=0x40003000 gpa=0xffffff000 size=4K\n\
                    unmap space=0 gva=0x40003000 size=4K\n\
                    cr3 1 space=1\n\
                    map space=1 gva=0x7fffffe00000 gpa=0x800000 size=2M flags=supervisor\n\
                    read 1 gva=0x7ffffffffff8 size=8\n\
                    read 1 gva=0x7fffffe00000 size=1\n\
                    write 0 gva=0x40003000 size=2 value=0x2345\n";
        assert_eq!(g.text(), want);
        parse(want).unwrap();
    }

    #[test]
    fn reaches_every_op_kind_and_invalid_requests_are_common() {
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        let mut why: BTreeMap<&str, usize> = BTreeMap::new();
        let (mut slots, mut invalid, mut deletes, mut as1) = (0, 0, 0, 0);
        let mut places = [0usize; 4];
        for g in samples(300) {
            let s = parse(&g.text()).unwrap();
            for step in &s.steps {
                *kinds.entry(step.op.keyword()).or_default() += 1;
                match &step.op {
                    Op::Slot(op) => {
                        slots += 1;
                        deletes += usize::from(op.size == 0);
                        as1 += usize::from(op.as_id == 1);
                        if let Some(w) = statically_invalid(&s, op) {
                            invalid += 1;
                            *why.entry(w).or_default() += 1;
                        }
                    }
                    Op::Read(r) => places[usize::from(r.vcpu > 0)] += 1,
                    Op::Write(w) => places[2 + usize::from(w.width.bytes() == 8)] += 1,
                    _ => {}
                }
            }
            for st in &g.steps {
                if let GenStep::Reuse(..) = st {
                    *kinds.entry("reuse").or_default() += 1;
                }
            }
        }
        for k in [
            "vm",
            "mem",
            "slot",
            "read",
            "write",
            "host-write",
            "host-read",
            "mmio-reply",
            "dirty-log",
            "clear-dirty-log",
        ] {
            assert!(kinds.get(k).copied().unwrap_or(0) >= 20, "{k}: {kinds:?}");
        }
        let frac = invalid as f64 / slots as f64;
        assert!((0.1..0.6).contains(&frac), "{invalid} of {slots} requests invalid: {why:?}");
        for w in ["id", "as", "size", "gpa", "offset", "huge", "wrap"] {
            assert!(why.get(w).copied().unwrap_or(0) >= 5, "few `{w}` errors: {why:?}");
        }
        assert!(deletes * 10 >= slots, "{deletes} deletes of {slots}");
        assert!(as1 >= 10, "{as1} requests in address space 1");
        assert!(places.iter().all(|&n| n >= 20), "accesses by vcpu/width: {places:?}");
    }

    #[test]
    fn accesses_hit_slot_edges() {
        // Of the accesses aimed at the first or last bytes of a slot request, many land exactly
        // on an edge of a request printed before them.
        let (mut edge, mut total) = (0, 0);
        for g in samples(100) {
            let s = parse(&g.text()).unwrap();
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for step in &s.steps {
                match &step.op {
                    Op::Slot(op) if op.size > 0 => ranges.push((op.gpa, op.size)),
                    Op::Read(r) => {
                        total += 1;
                        let w = u64::from(r.width.bytes());
                        edge += usize::from(ranges.iter().any(|&(g, n)| {
                            r.gpa == g || r.gpa.wrapping_add(w) == g.wrapping_add(n)
                        }));
                    }
                    _ => {}
                }
            }
        }
        assert!(edge * 4 >= total, "{edge} of {total} reads on a slot edge");
    }

    #[test]
    fn debug_is_the_file_text() {
        let g = GenScenario {
            vm: GenVm {
                vcpus: 2,
                address_spaces: 1,
                mmio_caching: Some(false),
                format: Some(Format::Npt),
                phys_bits: Some(52),
                paging: None,
                dirty_log: Some(DirtyLogMode::Manual),
            },
            mems: vec![0x1800],
            steps: vec![
                GenStep::Slot(GenSlot {
                    id: GenId::Small(9),
                    as_id: GenAs::Zero,
                    gpa: GenGpa::Grid(1),
                    size: GenSize::Pages(5),
                    mem: 0,
                    offset: GenOffset::Page(1),
                    readonly: true,
                    dirty_log: false,
                }),
                GenStep::Read {
                    vcpu: 3,
                    at: GenTarget::Slot(0, GenPlace::Last),
                    width: GenWidth(8),
                },
                GenStep::Reuse(0, GenChange::Delete),
                GenStep::Reuse(5, GenChange::Remap(GenOffset::Page(0))),
                GenStep::DirtyLog(GenLogSlot::Recent(0)),
                GenStep::ClearDirtyLog(
                    GenLogSlot::Recent(1),
                    GenFirst::Aligned(0),
                    GenCount::ToEnd,
                ),
            ],
        };
        let want = "vm vcpus=2 mmio_caching=off format=npt phys_bits=52 dirty_log=manual\n\
                    mem m0 size=0x1800\n\
                    slot 9 gpa=0x10004000 size=0x1000 mem=m0+0x1000 flags=readonly\n\
                    read 1 gpa=0x10004ff8 size=8\n\
                    slot 9 gpa=0x10004000 size=0x0\n\
                    slot 9 gpa=0x10004000 size=0x1000 mem=m0 flags=readonly\n\
                    dirty-log 9\n\
                    clear-dirty-log 9 first=0x0 count=0\n";
        assert_eq!(g.text(), want);
        assert_eq!(format!("{g:?}"), format!("scenario file:\n{want}"));
        parse(want).unwrap();
    }

    fn wide_samples(flavor: Flavor, n: usize) -> Vec<GenScenario> {
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[11; 32]);
        let mut runner = TestRunner::new_with_rng(Config::default(), rng);
        let s = scenario_for(flavor, 40);
        (0..n).map(|_| s.new_tree(&mut runner).unwrap().current()).collect()
    }

    proptest! {
        #![proptest_config(Config::with_cases(200))]
        /// The wide flavors keep the printer's promises: files parse, accepted slots are backed.
        #[test]
        fn wide_text_parses_and_accepted_slots_are_backed(
            g in prop_oneof![scenario_for(Flavor::Wide, 40), scenario_for(Flavor::WidePaging, 40)]
        ) {
            let text = g.text();
            let s = parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            for step in &s.steps {
                if let Op::Slot(op) = &step.op {
                    if op.size == 0 || statically_invalid(&s, op).is_some() {
                        continue;
                    }
                    let m = op.mem.as_ref().expect("non-zero slot has mem");
                    prop_assert!(m.offset + op.size <= s.mems[m.mem.0].size, "{}", text);
                }
            }
            prop_assert_eq!(text, g.clone().text());
        }
    }

    #[test]
    fn wide_scenarios_reach_large_slots_2m_boundaries_far_pages_and_dense_logging() {
        let (mut big, mut big_aligned, mut big_unaligned, mut host_unaligned) = (0, 0, 0, 0);
        let (mut far, mut near_2m, mut far_clear, mut logs, mut toggles) = (0, 0, 0, 0, 0);
        let (mut steps, mut huge_maps_in_big, mut cr3s) = (0usize, 0, 0);
        for flavor in [Flavor::Wide, Flavor::WidePaging] {
            for g in wide_samples(flavor, 300) {
                let s = parse(&g.text()).unwrap();
                let mut live: BTreeMap<u16, (u64, u64, bool)> = BTreeMap::new();
                for step in &s.steps {
                    steps += 1;
                    match &step.op {
                        Op::Slot(op) if statically_invalid(&s, op).is_none() => {
                            if op.size >= HUGE_PAGE {
                                big += 1;
                                if op.gpa % HUGE_PAGE == 0 {
                                    big_aligned += 1;
                                } else {
                                    big_unaligned += 1;
                                }
                                let off = op.mem.as_ref().map_or(0, |m| m.offset);
                                host_unaligned += usize::from(off % HUGE_PAGE != 0);
                            }
                            if let Some(&(_, _, was)) = live.get(&op.id) {
                                toggles += usize::from(op.size != 0 && was != op.flags.dirty_log);
                            }
                            live.insert(op.id, (op.gpa, op.size, op.flags.dirty_log));
                        }
                        Op::Read(ReadOp { gpa, .. }) | Op::Write(WriteOp { gpa, .. }) => {
                            let into = |&(g, n, _): &(u64, u64, bool)| {
                                (g..g.saturating_add(n)).contains(gpa) && gpa - g >= 16 * PAGE_SIZE
                            };
                            far += usize::from(live.values().any(into));
                            let m = gpa % HUGE_PAGE;
                            near_2m += usize::from(!(16..HUGE_PAGE - 16).contains(&m));
                        }
                        Op::ClearDirtyLog(c) => far_clear += usize::from(c.first >= 128),
                        Op::DirtyLog(_) => logs += 1,
                        Op::Map(m) if m.size == PageSize::Size2M => {
                            huge_maps_in_big +=
                                usize::from(live.values().any(|&(g, n, _)| {
                                    n >= HUGE_PAGE && (g..g + n).contains(&m.gpa)
                                }));
                        }
                        Op::Cr3(_) => cr3s += 1,
                        _ => {}
                    }
                }
            }
        }
        for (what, n) in [
            ("slots of 2 MiB or more", big),
            ("2 MiB-aligned large slots", big_aligned),
            ("large slots off 2 MiB alignment", big_unaligned),
            ("large slots at a buffer offset off 2 MiB", host_unaligned),
            ("accesses past page 16 of a slot", far),
            ("accesses within 16 bytes of a 2 MiB boundary", near_2m),
            ("clears from page 128 on", far_clear),
            ("logging toggled on a live slot", toggles),
            ("2M guest maps into a large slot", huge_maps_in_big),
            ("cr3 switches", cr3s),
        ] {
            assert!(n >= 50, "{n} {what}");
        }
        assert!(logs * 12 >= steps, "{logs} dirty-logs in {steps} steps");
    }
}
