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

use crate::step::{DirtyLogMode, Format, ACCESS_LIMIT, PAGE_SIZE, RESERVED_BELOW};
use proptest::prelude::*;
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
    /// `dirty_log=` if written.
    pub dirty_log: Option<DirtyLogMode>,
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
                    let gpa = Self::resolve_target(&sized, *at, w);
                    let _ = writeln!(t, "read {} gpa={gpa:#x} size={w}", vcpu % vcpus);
                }
                GenStep::Write { vcpu, at, width, value } => {
                    let w = width_bytes(*width);
                    let gpa = Self::resolve_target(&sized, *at, w);
                    let v = value & mask(w);
                    let _ =
                        writeln!(t, "write {} gpa={gpa:#x} size={w} value={v:#x}", vcpu % vcpus);
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
                    };
                    let count = match count {
                        GenCount::Words(k) => 64 * (k % 3),
                        GenCount::ToEnd => {
                            u32::try_from(npages.saturating_sub(first)).unwrap_or(u32::MAX)
                        }
                        GenCount::Pages(n) => n % 200,
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
            GenVm { vcpus, address_spaces, mmio_caching, format, phys_bits, dirty_log }
        })
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
    (gen_id(), gen_as(), gen_gpa(), gen_size(), 0usize..3, gen_offset(), 0u8..8).prop_map(
        |(id, as_id, gpa, size, mem, offset, f)| GenSlot {
            id,
            as_id,
            gpa,
            size,
            mem,
            offset,
            // Read-only in one request of four, dirty logging in one of two.
            readonly: f < 2,
            dirty_log: (2..6).contains(&f),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;
    use crate::step::{Op, Scenario};
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
}
