//! The printer of a recipe: [`GenScenario::text`] resolves the recipe's indices against what
//! exists at each step (buffers, earlier slot requests, the vCPUs' page-table spaces and what
//! they map) and writes a scenario file that keeps every promise of the parent module's doc.

use super::{
    GenAs, GenChange, GenCount, GenFirst, GenGpa, GenGva, GenId, GenLogSlot, GenMap, GenMapGpa,
    GenOffset, GenPlace, GenScenario, GenSize, GenSlot, GenStep, GenTarget, GenWidth, BIG_BASE,
    BIG_PAGES, BIG_REGIONS, EDGES_4LEVEL, EDGES_PAE, FAR_BASE, FAR_STEP, GRID_BASE, GRID_STEP,
    GVA_BASE, HOLE_BASE, HUGE_PAGE, HUGE_SIZE, WRAP_GPA,
};
use crate::step::{Paging, ACCESS_LIMIT, PAGE_SIZE, RESERVED_BELOW, SPACES};
use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

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

impl Req {
    /// A delete of slot `id` in address space `as_id`, written without `mem=`.
    fn delete(id: u16, as_id: u16) -> Req {
        Req { id, as_id, gpa: GRID_BASE, size: 0, mem: None, readonly: false, dirty_log: false }
    }
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
                        None => Req::delete(1, 0),
                    };
                    slot_line(&mut t, &r);
                    reqs.push(r);
                    if r.size != 0 {
                        sized.push(r);
                    }
                }
                GenStep::Delete(id, a) => {
                    slot_line(&mut t, &Req::delete(Self::resolve_id(*id), Self::resolve_as(*a)));
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
        flags_end(
            t,
            &[(m.readonly, "readonly"), (m.supervisor, "supervisor"), (m.reserved, "reserved")],
        );
        self.maps.push((space, gva, if m.huge { HUGE_PAGE } else { PAGE_SIZE }));
    }

    /// Unmaps a page of the size asked: a 2M unmap of a region of 4K pages clears the
    /// page-directory entry above all of them, and a 4K unmap inside a 2M page clears nothing
    /// (no page table holds such an entry; the 2M page stays).
    fn unmap(&mut self, t: &mut String, space: u8, g: GenGva, huge: bool) {
        let gva = self.gva(g);
        let key = (space, gva & !(HUGE_PAGE - 1));
        match self.live.get_mut(&key) {
            Some(Live::Huge) if !huge => Self::unmap_line(t, space, gva, false),
            Some(Live::Small(pages)) if !huge => {
                pages.remove(&gva);
                if pages.is_empty() {
                    self.live.remove(&key);
                }
                Self::unmap_line(t, space, gva, false);
            }
            Some(_) => {
                Self::unmap_line(t, space, key.1, true);
                self.live.remove(&key);
            }
            None => Self::unmap_line(t, space, if huge { key.1 } else { gva }, huge),
        }
    }

    /// Whether `(space, gva, size)` of [`Guest::maps`] is still mapped (no unmap or a map of the
    /// other page size took it away since).
    fn is_live(&self, (space, gva, size): (u8, u64, u64)) -> bool {
        match self.live.get(&(space, gva & !(HUGE_PAGE - 1))) {
            Some(Live::Huge) => size == HUGE_PAGE,
            Some(Live::Small(pages)) => size == PAGE_SIZE && pages.contains(&gva),
            None => false,
        }
    }

    /// A GVA for an access of `w` bytes by `vcpu`: near a page mapped earlier (one still mapped
    /// in the vCPU's space if there is one, else one it mapped, else any), else in the window at
    /// `GVA_BASE`.
    fn target(&self, vcpu: u32, at: GenTarget, w: u64) -> u64 {
        let space = self.cr3[vcpu as usize];
        // Pages still mapped in the vCPU's space first (most accesses then translate, to RAM or
        // MMIO), else any page it mapped, else any page of any space.
        let mut maps: Vec<_> =
            self.maps.iter().filter(|m| m.0 == space && self.is_live(**m)).collect();
        if maps.is_empty() {
            maps = self.maps.iter().filter(|m| m.0 == space).collect();
        }
        if maps.is_empty() {
            maps = self.maps.iter().collect();
        }
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
    flags_end(t, &[(r.readonly, "readonly"), (r.dirty_log, "dirty_log")]);
}

/// Ends a `slot` or `map` line: ` flags=` with the names whose flag is on, in order (nothing
/// when none is), then the newline.
fn flags_end(t: &mut String, flags: &[(bool, &str)]) {
    let on: Vec<&str> = flags.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect();
    if !on.is_empty() {
        let _ = write!(t, " flags={}", on.join(","));
    }
    t.push('\n');
}
