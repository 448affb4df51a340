//! Version 2 guest paging in the parser (`shared/design/scenarios.md`, "Version 2: guest
//! paging"): `vm paging=`, the `map` / `unmap` / `cr3` steps, and the GVA of `read` / `write`.
//!
//! Rules (each a parse error naming the line and the column of the word that is wrong):
//! - `map`, `unmap` and `cr3` need `paging=4level` or `paging=pae`;
//! - with paging on an access names `gva=` (`gpa=` is an error); with paging off it names `gpa=`
//!   (`gva=` is an error);
//! - a GVA (an access, or the whole page of a `map`/`unmap`) is canonical (4level: bits 63..47
//!   equal; pae: below 4 GiB), at or above 8 MiB, and outside PML4 entry 256
//!   (`0xffff800000000000..=0xffff807fffffffff`);
//! - `map`: `space` 0..=7 (default 0), `size` 4K or 2M (default 4K; any spelling of those two
//!   sizes), `gva` and `gpa` aligned to the size, `gpa` at or above 8 MiB, `gpa + size` at most
//!   64 GiB, flags `readonly`, `supervisor`, `reserved` (each at most once);
//! - page sizes do not mix in one 2 MiB region of one space: a 4K `map` inside a live 2M
//!   mapping, or a 2M `map` over live 4K mappings, is an error. Mapping a mapped page again with
//!   the same size replaces it; an `unmap` clears the entry of its size if a table holds it,
//!   else writes nothing (the guest clears an entry that is already clear, or that no table
//!   holds): a 4K `unmap` inside a live 2M mapping changes nothing (no page table holds a 4K
//!   entry there), and a 2M `unmap` of a region with live 4K mappings clears the page-directory
//!   entry that links their page table, so all of them go (the backends invalidate every page of
//!   the region on every vCPU, so this is seen from the next step whatever the MMU);
//! - `cr3 VCPU space=S`: `VCPU` below `vcpus`, `space` required, 0..=7;
//! - the file's maps hold at most [`crate::MAP_TABLES`] guest page tables at once ([`MapTables`]
//!   counts them as the backends allocate them).
//!
//! `format=shadow` is accepted with `paging=off` too: KVM with TDP off runs a non-paging guest
//! on its identity-mapped "nonpaging" shadow MMU.

use super::{
    choice, number, positional, ranged, size, Fields, LineResult, ParseErrorKind, Parser, Word,
};
use crate::step::{
    Cr3Op, MapFlags, MapOp, Op, PageSize, Paging, UnmapOp, ACCESS_LIMIT, RESERVED_BELOW, SPACES,
};
use std::collections::{BTreeSet, HashMap};

/// PML4 entry 256, which some hosts reserve for the hypervisor.
const HOLE: std::ops::RangeInclusive<u64> = 0xffff_8000_0000_0000..=0xffff_807f_ffff_ffff;
/// The size of a region where page sizes may not mix.
const REGION: u64 = 2 << 20;

/// What is live in one 2 MiB region of one page-table space.
#[derive(Debug)]
enum Region {
    /// A 2M mapping.
    Huge,
    /// The 4K mappings live in it (never empty: an empty region is removed).
    Small(BTreeSet<u64>),
}

/// The live guest mappings, per space and 2 MiB region, as the file has made them so far, and
/// the page tables they hold.
#[derive(Debug, Default)]
pub(super) struct Live {
    regions: HashMap<(u8, u64), Region>,
    tables: MapTables,
}

/// One guest page table a `map` creates, as the backends allocate them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Table {
    /// 4level: the page-directory-pointer table of a PML4 entry other than 0 (`space`, gva
    /// bits 47..39).
    Pdpt(u8, u64),
    /// 4level: the page directory of a PDPT entry outside the first GiB (`space`, gva bits
    /// 47..30).
    Pd(u8, u64),
    /// The page table of a 2 MiB region (`space`, gva bits 47..21).
    Pt(u8, u64),
}

/// The guest page tables the file's `map` steps hold ([`crate::MAP_TABLES`]). Every space has
/// its root and the tables of its first GiB (4level: PDPT 0 and PD 0; pae: the four page
/// directories) from the start; a `map` creates what its entry needs below them, a 2M `map` or
/// `unmap` unlinks its region's page table (the backends write the region's page-directory
/// entry) and frees it if no entry in it is live (the backends reuse it), and nothing else frees
/// a table. One unlinked while it held live 4K mappings (a 2M `unmap`) stays held for good: the
/// backends never reuse a table with entries in it.
#[derive(Debug, Default)]
struct MapTables {
    live: std::collections::HashSet<Table>,
    /// Page tables unlinked while they held live entries.
    kept: usize,
}

impl MapTables {
    /// The tables the entry of a `size` page at `gva` in `space` lies under (those not the
    /// space's own from the start).
    fn path(paging: Paging, space: u8, gva: u64, size: PageSize) -> impl Iterator<Item = Table> {
        let va = gva & ((1 << 48) - 1);
        let four = paging == Paging::Level4;
        let pdpt = (four && va >> 39 != 0).then_some(Table::Pdpt(space, va >> 39));
        let pd = (four && va >> 30 != 0).then_some(Table::Pd(space, va >> 30));
        let pt = (size == PageSize::Size4K).then_some(Table::Pt(space, va >> 21));
        pdpt.into_iter().chain(pd).chain(pt)
    }

    /// Records a `map`, or says it needs a table past [`crate::MAP_TABLES`].
    fn map(&mut self, paging: Paging, space: u8, gva: u64, size: PageSize) -> Result<(), usize> {
        let new: Vec<Table> =
            Self::path(paging, space, gva, size).filter(|t| !self.live.contains(t)).collect();
        if self.live.len() + self.kept + new.len() > crate::step::MAP_TABLES {
            return Err(crate::step::MAP_TABLES);
        }
        self.live.extend(new);
        if size == PageSize::Size2M {
            // The parser refuses a 2M map over live 4K mappings: the table holds none.
            self.unlink_pt(space, gva, false);
        }
        Ok(())
    }

    /// A 2M `map` or `unmap` writes the region's page-directory entry: its page table, if it
    /// had one, is unlinked, and free unless it `held` live entries.
    fn unlink_pt(&mut self, space: u8, gva: u64, held: bool) {
        let linked = self.live.remove(&Table::Pt(space, (gva & ((1 << 48) - 1)) >> 21));
        if linked && held {
            self.kept += 1;
        }
    }
}

/// `paging=` on the `vm` line.
pub(super) fn paging_choice(w: Word<'_>) -> LineResult<Paging> {
    match w.text {
        "off" => Ok(Paging::Off),
        "4level" => Ok(Paging::Level4),
        "pae" => Ok(Paging::Pae),
        _ => Err(choice(w, "paging", "off, 4level or pae")),
    }
}

/// The column of the `key=` word whose value is `v`.
fn key_col(key: &str, v: Word<'_>) -> u32 {
    v.col.saturating_sub(u32::try_from(key.len() + 1).unwrap_or(0))
}

fn page_size(w: Word<'_>) -> LineResult<PageSize> {
    match size(w)? {
        0x1000 => Ok(PageSize::Size4K),
        0x20_0000 => Ok(PageSize::Size2M),
        _ => Err(choice(w, "size", "4K or 2M")),
    }
}

fn space(w: Word<'_>) -> LineResult<u8> {
    ranged(w, "space", 0, u64::from(SPACES - 1), "0..=7")
}

impl Parser {
    /// With paging off a step that needs it is an error at its keyword.
    fn need_paging(&self, step: &'static str, kw: Word<'_>) -> LineResult<()> {
        if self.vm.paging == Paging::Off {
            return Err((kw.col, ParseErrorKind::NeedsPaging { step }));
        }
        Ok(())
    }

    /// The address field of an access: `gpa=` with paging off, `gva=` with paging on.
    pub(super) fn access_addr<'a>(&self, f: &Fields<'a>) -> LineResult<Word<'a>> {
        let (want, other) =
            if self.vm.paging == Paging::Off { ("gpa", "gva") } else { ("gva", "gpa") };
        if let Some(w) = f.get(other) {
            let kind = ParseErrorKind::WrongAddressField {
                field: other,
                expected: want,
                paging: self.vm.paging,
            };
            return Err((key_col(other, w), kind));
        }
        f.need(want)
    }

    /// Checks a guest-virtual range `[gva, gva + len)` (aligned to `len`, so inside one page of
    /// either size) against the GVA rules.
    pub(super) fn check_gva(&self, w: Word<'_>, gva: u64, len: u64) -> LineResult<()> {
        let canonical = match self.vm.paging {
            Paging::Pae => gva.checked_add(len).is_some_and(|end| end <= 1 << 32),
            // Bits 63..47 equal: the value sign-extended from bit 47 is itself.
            _ => (((gva << 16) as i64) >> 16) as u64 == gva,
        };
        if !canonical {
            return Err((w.col, ParseErrorKind::NonCanonical { gva, paging: self.vm.paging }));
        }
        if gva < RESERVED_BELOW {
            return Err((
                w.col,
                ParseErrorKind::Reserved(format!(
                    "the guest-virtual address {gva:#x} (below 8 MiB)"
                )),
            ));
        }
        if HOLE.contains(&gva) {
            return Err((
                w.col,
                ParseErrorKind::Reserved(format!(
                    "the guest-virtual address {gva:#x} (PML4 entry 256, {:#x}..={:#x})",
                    HOLE.start(),
                    HOLE.end()
                )),
            ));
        }
        Ok(())
    }

    /// `space=` (default 0), `gva=` aligned to `size=` (default 4K) and a good GVA.
    fn page<'a>(&self, f: &Fields<'a>) -> LineResult<(u8, Word<'a>, u64, PageSize)> {
        let space = f.get("space").map(space).transpose()?.unwrap_or(0);
        let gw = f.need("gva")?;
        let gva = number(gw)?;
        let size = f.get("size").map(page_size).transpose()?.unwrap_or_default();
        if gva % size.bytes() != 0 {
            return Err((gw.col, ParseErrorKind::PageMisaligned { field: "gva", addr: gva, size }));
        }
        self.check_gva(gw, gva, size.bytes())?;
        Ok((space, gw, gva, size))
    }

    /// Records a `map` (`unmap: false`) or an `unmap` of the page at `gva` in `space`, or says
    /// why a `map`'s size mixes with what is live in its 2 MiB region. `Ok(true)`: a 2M `unmap`
    /// that unmaps live 4K mappings (it unlinks their page table).
    fn track(
        &mut self,
        gw: Word<'_>,
        space: u8,
        gva: u64,
        size: PageSize,
        unmap: bool,
    ) -> LineResult<bool> {
        let key = (space, gva & !(REGION - 1));
        let mixed = |live| (gw.col, ParseErrorKind::MixedPageSizes { space, gva, size, live });
        match (self.pt.regions.get_mut(&key), size) {
            // No page table holds a 4K entry under a 2M page: the guest writes nothing.
            (Some(Region::Huge), PageSize::Size4K) if unmap => {}
            (Some(Region::Huge), PageSize::Size4K) => return Err(mixed(PageSize::Size2M)),
            (Some(Region::Small(_)), PageSize::Size2M) if unmap => {
                self.pt.regions.remove(&key);
                return Ok(true);
            }
            (Some(Region::Small(_)), PageSize::Size2M) => return Err(mixed(PageSize::Size4K)),
            (Some(Region::Small(pages)), PageSize::Size4K) if unmap => {
                pages.remove(&gva);
                if pages.is_empty() {
                    self.pt.regions.remove(&key);
                }
            }
            (Some(Region::Small(pages)), PageSize::Size4K) => {
                pages.insert(gva);
            }
            (_, PageSize::Size2M) if unmap => {
                self.pt.regions.remove(&key);
            }
            (_, PageSize::Size2M) => {
                self.pt.regions.insert(key, Region::Huge);
            }
            (None, PageSize::Size4K) if !unmap => {
                self.pt.regions.insert(key, Region::Small(BTreeSet::from([gva])));
            }
            (None, PageSize::Size4K) => {}
        }
        Ok(false)
    }

    /// `map [space=S] gva=ADDR gpa=ADDR [size=4K|2M] [flags=FLAG[,FLAG]]`.
    pub(super) fn map_line(&mut self, kw: Word<'_>, rest: &[Word<'_>]) -> LineResult<Op> {
        self.need_paging("map", kw)?;
        let f = Fields::new(
            "map",
            kw.col,
            rest,
            &["space", "gva", "gpa", "size", "flags"],
            "space, gva, gpa, size, flags",
        )?;
        let (space, gw, gva, size) = self.page(&f)?;
        let pw = f.need("gpa")?;
        let gpa = number(pw)?;
        if gpa % size.bytes() != 0 {
            return Err((pw.col, ParseErrorKind::PageMisaligned { field: "gpa", addr: gpa, size }));
        }
        if gpa < RESERVED_BELOW {
            return Err((
                pw.col,
                ParseErrorKind::Reserved(format!("a mapping of gpa {gpa:#x} (below 8 MiB)")),
            ));
        }
        if gpa.checked_add(size.bytes()).is_none_or(|end| end > ACCESS_LIMIT) {
            return Err((pw.col, ParseErrorKind::PageTooHigh { gpa, size }));
        }
        let mut flags = MapFlags::default();
        if let Some(w) = f.get("flags") {
            let mut col = w.col;
            for flag in w.text.split(',') {
                let seen = match flag {
                    "readonly" => std::mem::replace(&mut flags.readonly, true),
                    "supervisor" => std::mem::replace(&mut flags.supervisor, true),
                    "reserved" => std::mem::replace(&mut flags.reserved, true),
                    _ => {
                        let fw = Word { text: flag, col };
                        return Err(choice(fw, "flags", "readonly, supervisor and/or reserved"));
                    }
                };
                if seen {
                    return Err((col, ParseErrorKind::RepeatedFlag(flag.into())));
                }
                col += u32::try_from(flag.chars().count() + 1).unwrap_or(0);
            }
        }
        self.track(gw, space, gva, size, false)?;
        self.pt
            .tables
            .map(self.vm.paging, space, gva, size)
            .map_err(|limit| (kw.col, ParseErrorKind::TooManyTables { limit }))?;
        Ok(Op::Map(MapOp { space, gva, gpa, size, flags }))
    }

    /// `unmap [space=S] gva=ADDR [size=4K|2M]`.
    pub(super) fn unmap_line(&mut self, kw: Word<'_>, rest: &[Word<'_>]) -> LineResult<Op> {
        self.need_paging("unmap", kw)?;
        let f = Fields::new("unmap", kw.col, rest, &["space", "gva", "size"], "space, gva, size")?;
        let (space, gw, gva, size) = self.page(&f)?;
        let held = self.track(gw, space, gva, size, true)?;
        if size == PageSize::Size2M {
            self.pt.tables.unlink_pt(space, gva, held);
        }
        Ok(Op::Unmap(UnmapOp { space, gva, size }))
    }

    /// `cr3 VCPU space=S`.
    pub(super) fn cr3_line(&mut self, kw: Word<'_>, rest: &[Word<'_>]) -> LineResult<Op> {
        self.need_paging("cr3", kw)?;
        let (vw, fields) = positional("cr3", kw, rest, "a VCPU index")?;
        let f = Fields::new("cr3", kw.col, fields, &["space"], "space")?;
        let vcpu = self.vcpu(vw)?;
        let space = space(f.need("space")?)?;
        Ok(Op::Cr3(Cr3Op { vcpu, space }))
    }
}

#[cfg(test)]
mod tests {
    use crate::parse::{parse, ParseErrorKind};
    use crate::step::{
        Cr3Op, Format, MapFlags, MapOp, Op, PageSize, Paging, ReadOp, UnmapOp, Width, WriteOp,
    };

    fn err(text: &str) -> (u32, u32, ParseErrorKind) {
        match parse(text) {
            Ok(s) => panic!("parsed: {s:?}"),
            Err(e) => (e.line, e.column, e.kind),
        }
    }

    const L4: &str = "vm vcpus=2 paging=4level\n";
    const PAE: &str = "vm vcpus=2 paging=pae format=shadow\n";

    fn reserved(k: &ParseErrorKind) -> bool {
        matches!(k, ParseErrorKind::Reserved(_))
    }

    #[test]
    fn vm_paging_and_shadow_format() {
        let s = parse("vm paging=4level format=shadow\n").unwrap();
        assert_eq!((s.vm.paging, s.vm.format), (Paging::Level4, Format::Shadow));
        assert_eq!(parse("vm paging=pae\n").unwrap().vm.paging, Paging::Pae);
        assert_eq!(parse("vm paging=off\n").unwrap().vm.paging, Paging::Off);
        // format=shadow without guest paging: KVM's nonpaging shadow MMU.
        let s = parse("vm format=shadow\nread 0 gpa=0x10000000 size=4\n").unwrap();
        assert_eq!((s.vm.paging, s.vm.format), (Paging::Off, Format::Shadow));
        assert_eq!(
            err("vm paging=on\n"),
            (
                1,
                11,
                ParseErrorKind::BadChoice {
                    field: "paging",
                    value: "on".into(),
                    allowed: "off, 4level or pae"
                }
            )
        );
        assert!(matches!(
            err("vm paging=4level paging=pae\n"),
            (1, 18, ParseErrorKind::RepeatedField(_))
        ));
    }

    #[test]
    fn paging_steps_need_paging() {
        for (line, step) in [
            ("map gva=0x40000000 gpa=0x10000000", "map"),
            ("unmap gva=0x40000000", "unmap"),
            ("  cr3 0 space=1", "cr3"),
        ] {
            let col = if step == "cr3" { 3 } else { 1 };
            assert_eq!(
                err(&format!("vm\n{line}\n")),
                (2, col, ParseErrorKind::NeedsPaging { step })
            );
            assert_eq!(err(&format!("{line}\n")), (1, col, ParseErrorKind::NeedsPaging { step }));
            assert_eq!(
                err(&format!("vm paging=off\n{line}\n")),
                (2, col, ParseErrorKind::NeedsPaging { step })
            );
        }
    }

    #[test]
    fn accesses_name_the_right_address_field() {
        assert_eq!(
            err("vm\nread 0 gva=0x10000000 size=4\n"),
            (
                2,
                8,
                ParseErrorKind::WrongAddressField {
                    field: "gva",
                    expected: "gpa",
                    paging: Paging::Off
                }
            )
        );
        assert_eq!(
            err(&format!("{L4}write 1 size=4 gpa=0x10000000 value=1\n")),
            (
                2,
                16,
                ParseErrorKind::WrongAddressField {
                    field: "gpa",
                    expected: "gva",
                    paging: Paging::Level4
                }
            )
        );
        // Both given: the wrong one is named.
        assert!(matches!(
            err(&format!("{PAE}read 0 gva=0x10000000 gpa=0x10000000 size=4\n")),
            (2, 23, ParseErrorKind::WrongAddressField { field: "gpa", .. })
        ));
        assert!(matches!(
            err(&format!("{L4}read 0 size=4\n")),
            (2, 1, ParseErrorKind::MissingField { step: "read", field: "gva" })
        ));
        let s = parse(&format!(
            "{L4}read 1 gva=0x40000008 size=8\nwrite 0 gva=0xffffffffffffff00 size=2 value=0xbeef\n"
        ))
        .unwrap();
        assert_eq!(s.steps[1].op, Op::Read(ReadOp { vcpu: 1, gpa: 0x4000_0008, width: Width::W8 }));
        assert_eq!(
            s.steps[2].op,
            Op::Write(WriteOp {
                vcpu: 0,
                gpa: 0xffff_ffff_ffff_ff00,
                width: Width::W2,
                value: 0xbeef
            })
        );
    }

    #[test]
    fn gva_accesses_keep_width_alignment_and_vcpu_rules() {
        assert!(matches!(
            err(&format!("{L4}read 0 gva=0x40000004 size=8\n")),
            (2, 12, ParseErrorKind::Misaligned { addr: 0x4000_0004, width: 8 })
        ));
        assert!(matches!(
            err(&format!("{L4}read 0 gva=0x40000000 size=3\n")),
            (2, 28, ParseErrorKind::BadWidth(_))
        ));
        assert!(matches!(
            err(&format!("{L4}read 2 gva=0x40000000 size=4\n")),
            (2, 6, ParseErrorKind::NoSuchVcpu { vcpu: 2, vcpus: 2 })
        ));
        assert!(matches!(
            err(&format!("{L4}write 0 gva=0x40000000 size=1 value=0x100\n")),
            (2, 37, ParseErrorKind::ValueTooWide { .. })
        ));
        // No 64 GiB limit on a GVA.
        assert!(parse(&format!("{L4}read 0 gva=0x7ffffffffff8 size=8\n")).is_ok());
        assert!(parse(&format!("{L4}read 0 gva=0x1000000000 size=8\n")).is_ok());
    }

    #[test]
    fn gva_must_be_canonical() {
        for bad in ["0x800000000000", "0xffff7ffffffff000", "0x8000000000000000"] {
            let (l, c, k) = err(&format!("{L4}read 0 gva={bad} size=4\n"));
            assert_eq!((l, c), (2, 12), "{bad}");
            assert!(
                matches!(k, ParseErrorKind::NonCanonical { paging: Paging::Level4, .. }),
                "{bad}: {k:?}"
            );
        }
        for bad in ["0x100000000", "0xffffffff00000000"] {
            let (_, c, k) = err(&format!("{PAE}read 0 gva={bad} size=4\n"));
            assert_eq!(c, 12);
            assert!(matches!(k, ParseErrorKind::NonCanonical { paging: Paging::Pae, .. }), "{bad}");
        }
        assert!(parse(&format!("{PAE}read 0 gva=0xfffffff8 size=8\n")).is_ok());
        // The whole page of a map must be canonical too.
        assert!(matches!(
            err(&format!("{PAE}map gva=0x100000000 gpa=0x10000000\n")),
            (2, 9, ParseErrorKind::NonCanonical { gva: 0x1_0000_0000, paging: Paging::Pae })
        ));
        assert!(matches!(
            err(&format!("{L4}map gva=0xffff7fffffe00000 gpa=0x10000000 size=2M\n")),
            (2, 9, ParseErrorKind::NonCanonical { .. })
        ));
        assert!(parse(&format!("{PAE}map gva=0xffe00000 gpa=0x10000000 size=2M\n")).is_ok());
        assert!(parse(&format!("{L4}map gva=0x7fffffe00000 gpa=0x10000000 size=2M\n")).is_ok());
        assert!(parse(&format!("{L4}map gva=0xffffffffffe00000 gpa=0x10000000 size=2M\n")).is_ok());
    }

    #[test]
    fn gva_reserved_ranges() {
        // Below 8 MiB.
        let (l, c, k) = err(&format!("{L4}read 0 gva=0x7ffff8 size=8\n"));
        assert_eq!((l, c), (2, 12));
        assert!(reserved(&k), "{k:?}");
        assert!(parse(&format!("{L4}read 0 gva=0x800000 size=8\n")).is_ok());
        let (_, c, k) = err(&format!("{PAE}map gva=0x600000 gpa=0x10000000 size=2M\n"));
        assert_eq!(c, 9);
        assert!(reserved(&k));
        let (_, c, k) = err(&format!("{L4}unmap gva=0x7ff000\n"));
        assert_eq!(c, 11);
        assert!(reserved(&k));
        // PML4 entry 256.
        for bad in ["0xffff800000000000", "0xffff807ffffffff8"] {
            let (_, c, k) = err(&format!("{L4}write 0 gva={bad} size=8 value=0\n"));
            assert_eq!(c, 13);
            assert!(reserved(&k), "{bad}: {k:?}");
        }
        let (_, c, k) =
            err(&format!("{L4}map space=3 gva=0xffff807fffe00000 gpa=0x10000000 size=2M\n"));
        assert_eq!(c, 17);
        assert!(reserved(&k));
        assert!(parse(&format!("{L4}read 0 gva=0xffff808000000000 size=8\n")).is_ok());
        assert!(parse(&format!("{L4}read 0 gva=0xffff7ffffffffff8 size=8\n")).is_err());
    }

    #[test]
    fn map_fields_and_defaults() {
        let s = parse(&format!(
            "{L4}map gva=0x40000000 gpa=0x10000000\n\
             map space=7 gva=0x40200000 gpa=0x800000 size=2M flags=reserved,readonly,supervisor\n\
             map gpa=0xfffe00000 size=0x200000 gva=0x40400000 space=1\n\
             map gva=0x40001000 gpa=0xffffff000 size=4096 flags=supervisor\n"
        ))
        .unwrap();
        let m = |space, gva, gpa, size, flags| Op::Map(MapOp { space, gva, gpa, size, flags });
        assert_eq!(
            s.steps[1].op,
            m(0, 0x4000_0000, 0x1000_0000, PageSize::Size4K, MapFlags::default())
        );
        assert_eq!(
            s.steps[2].op,
            m(
                7,
                0x4020_0000,
                0x80_0000,
                PageSize::Size2M,
                MapFlags { readonly: true, supervisor: true, reserved: true }
            )
        );
        assert_eq!(
            s.steps[3].op,
            m(1, 0x4040_0000, 0xf_ffe0_0000, PageSize::Size2M, MapFlags::default())
        );
        assert_eq!(
            s.steps[4].op,
            m(
                0,
                0x4000_1000,
                0xf_ffff_f000,
                PageSize::Size4K,
                MapFlags { supervisor: true, ..MapFlags::default() }
            )
        );
        assert!(matches!(
            err(&format!("{L4}map gpa=0x10000000\n")),
            (2, 1, ParseErrorKind::MissingField { step: "map", field: "gva" })
        ));
        assert!(matches!(
            err(&format!("{L4}map gva=0x40000000\n")),
            (2, 1, ParseErrorKind::MissingField { step: "map", field: "gpa" })
        ));
        assert!(matches!(
            err(&format!("{L4}map gva=0x40000000 gpa=0x10000000 value=1\n")),
            (2, 35, ParseErrorKind::UnknownField { step: "map", .. })
        ));
        assert!(matches!(
            err(&format!("{L4}map 0 gva=0x40000000 gpa=0x10000000\n")),
            (2, 5, ParseErrorKind::UnexpectedWord(_))
        ));
    }

    #[test]
    fn map_space_size_and_flags_are_checked() {
        assert!(matches!(
            err(&format!("{L4}map space=8 gva=0x40000000 gpa=0x10000000\n")),
            (2, 11, ParseErrorKind::OutOfRange { field: "space", .. })
        ));
        assert!(matches!(
            err(&format!("{L4}map gva=0x40000000 gpa=0x10000000 size=1G\n")),
            (2, 40, ParseErrorKind::BadChoice { field: "size", .. })
        ));
        assert!(matches!(
            err(&format!("{L4}map gva=0x40000000 gpa=0x10000000 size=4k\n")),
            (2, 40, ParseErrorKind::BadNumber { .. })
        ));
        assert!(matches!(
            err(&format!("{L4}map gva=0x40000000 gpa=0x10000000 flags=readonly,user\n")),
            (2, 50, ParseErrorKind::BadChoice { field: "flags", .. })
        ));
        assert!(matches!(
            err(&format!("{L4}map gva=0x40000000 gpa=0x10000000 flags=reserved,reserved\n")),
            (2, 50, ParseErrorKind::RepeatedFlag(_))
        ));
    }

    #[test]
    fn map_addresses_are_aligned_and_in_range() {
        assert_eq!(
            err(&format!("{L4}map gva=0x40001000 gpa=0x10000000 size=2M\n")),
            (
                2,
                9,
                ParseErrorKind::PageMisaligned {
                    field: "gva",
                    addr: 0x4000_1000,
                    size: PageSize::Size2M
                }
            )
        );
        assert_eq!(
            err(&format!("{L4}map gva=0x40000000 gpa=0x10000800\n")),
            (
                2,
                24,
                ParseErrorKind::PageMisaligned {
                    field: "gpa",
                    addr: 0x1000_0800,
                    size: PageSize::Size4K
                }
            )
        );
        assert!(matches!(
            err(&format!("{L4}map gva=0x40000000 gpa=0x10001000 size=2M\n")),
            (2, 24, ParseErrorKind::PageMisaligned { field: "gpa", .. })
        ));
        let (_, c, k) = err(&format!("{L4}map gva=0x40000000 gpa=0x7ff000\n"));
        assert_eq!(c, 24);
        assert!(reserved(&k), "{k:?}");
        assert_eq!(
            err(&format!("{L4}map gva=0x40000000 gpa=0x1000000000\n")),
            (2, 24, ParseErrorKind::PageTooHigh { gpa: 0x10_0000_0000, size: PageSize::Size4K })
        );
        assert!(matches!(
            err(&format!("{L4}map gva=0x40000000 gpa=0xffffffffffe00000 size=2M\n")),
            (2, 24, ParseErrorKind::PageTooHigh { .. })
        ));
        assert!(parse(&format!("{L4}map gva=0x40000000 gpa=0xfff000\n")).is_ok());
        // A page that ends exactly at 64 GiB lies below it.
        assert!(parse(&format!("{L4}map gva=0x40000000 gpa=0xfffe00000 size=2M\n")).is_ok());
        let e = parse(&format!("{L4}map gva=0x40000000 gpa=0x1000000000\n")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2, column 24: a 4K page at gpa 0x1000000000 ends past 64 GiB (its last byte is \
             at or above 0x1000000000): the backends map guest memory below 64 GiB only"
        );
    }

    #[test]
    fn page_sizes_do_not_mix_in_a_region() {
        let mixed = |text: &str| match err(&format!("{L4}{text}")) {
            (l, c, ParseErrorKind::MixedPageSizes { size, live, .. }) => (l, c, size, live),
            other => panic!("{other:?}"),
        };
        use PageSize::{Size2M as M, Size4K as K};
        // A 4K map inside a 2M mapping.
        assert_eq!(
            mixed("map gva=0x40000000 gpa=0x10000000 size=2M\nmap gva=0x401ff000 gpa=0x10000000\n"),
            (3, 9, K, M)
        );
        // A 2M map over live 4K mappings.
        assert_eq!(
            mixed("map gva=0x40005000 gpa=0x10000000\nmap gva=0x40000000 gpa=0x10000000 size=2M\n"),
            (3, 9, M, K)
        );
        // ... even when some of them were unmapped.
        assert_eq!(
            mixed(
                "map gva=0x40005000 gpa=0x10000000\nmap gva=0x40006000 gpa=0x10000000\n\
                 unmap gva=0x40005000\nmap gva=0x40000000 gpa=0x10000000 size=2M\n"
            ),
            (5, 9, M, K)
        );
        // An unmap of the other size is no mix: a 4K one inside a 2M mapping clears nothing
        // (the 2M page stays, so a 4K map there is still refused), a 2M one over 4K mappings
        // clears their page-directory entry (all of them go, so a 2M map is then fine).
        assert_eq!(
            mixed(
                "map gva=0x40000000 gpa=0x10000000 size=2M\nunmap gva=0x40001000\n\
                 map gva=0x40001000 gpa=0x10000000\n"
            ),
            (4, 9, K, M)
        );
        let s = parse(&format!(
            "{L4}map gva=0x40001000 gpa=0x10000000\nmap gva=0x40002000 gpa=0x10000000\n\
             unmap gva=0x40000000 size=2M\nmap gva=0x40000000 gpa=0x10000000 size=2M\n"
        ))
        .unwrap();
        assert_eq!(
            s.steps[3].op,
            Op::Unmap(UnmapOp { space: 0, gva: 0x4000_0000, size: PageSize::Size2M })
        );
        // Once all 4K mappings are unmapped a 2M map is fine, and back again.
        let s = parse(&format!(
            "{L4}map gva=0x40005000 gpa=0x10000000\nmap gva=0x40006000 gpa=0x10000000\n\
             unmap gva=0x40005000\nunmap gva=0x40006000 size=4K\n\
             map gva=0x40000000 gpa=0x10000000 size=2M\nunmap gva=0x40000000 size=2M\n\
             map gva=0x40001000 gpa=0x10000000\n"
        ))
        .unwrap();
        assert_eq!(s.steps.len(), 8);
        // Other spaces and other regions are independent.
        assert!(parse(&format!(
            "{L4}map gva=0x40000000 gpa=0x10000000 size=2M\nmap space=1 gva=0x40001000 gpa=0x10000000\n\
             map gva=0x40200000 gpa=0x10000000\nunmap space=2 gva=0x40000000 size=2M\n"
        ))
        .is_ok());
    }

    #[test]
    fn mixing_errors_say_what_to_write_instead() {
        let msg = |text: &str| parse(&format!("{L4}{text}")).unwrap_err().to_string();
        let m =
            msg("map gva=0x40000000 gpa=0x10000000 size=2M\nmap gva=0x40003000 gpa=0x10000000\n");
        assert!(m.contains("unmap gva=0x40000000 size=2M first"), "{m}");
        let m =
            msg("map gva=0x40201000 gpa=0x10000000\nmap gva=0x40200000 gpa=0x10000000 size=2M\n");
        assert!(
            m.contains(
                "unmap its 4K pages first, or all of them with unmap gva=0x40200000 size=2M"
            ),
            "{m}"
        );
    }

    /// `n` 4K maps, each in a 2 MiB region of its own from 8 MiB up (one page table each; a page
    /// directory more for every GiB past the first, a PDPT more for every 512 GiB past the first).
    fn spread_maps(head: &str, n: u64) -> String {
        let mut text = String::from(head);
        for k in 0..n {
            let gva = (4 + k) << 21;
            text.push_str(&format!("map gva={gva:#x} gpa=0x10000000\n"));
        }
        text
    }

    #[test]
    fn maps_hold_at_most_map_tables_guest_page_tables() {
        let limit = crate::MAP_TABLES as u64;
        // 4level: region k (from 4) needs its page table, and a page directory when it is the
        // first of a GiB other than the first: tables(n) = n + ceil((n + 4) / 512) - 1.
        let tables = |n: u64| n + (n + 4).div_ceil(512) - 1;
        let n = (1..).take_while(|&n| tables(n) <= limit).last().unwrap();
        assert_eq!(tables(n), limit, "the last map fits exactly");
        assert!(parse(&spread_maps(L4, n)).is_ok());
        let (line, col, kind) = err(&spread_maps(L4, n + 1));
        assert_eq!((line, col), (u32::try_from(n + 2).unwrap(), 1));
        assert_eq!(kind, ParseErrorKind::TooManyTables { limit: crate::MAP_TABLES });
        assert!(kind.to_string().contains("960"), "{kind}");
        // PAE: its four page directories exist from the start; only page tables count.
        assert!(parse(&spread_maps(PAE, limit)).is_ok());
        assert_eq!(err(&spread_maps(PAE, limit + 1)).2, kind);
        // A new PML4 entry costs a PDPT, a page directory and a page table; a 2M page the
        // first two only.
        let high = "map gva=0x10000000000 gpa=0x10000000\n";
        assert!(parse(&format!("{}{high}", spread_maps(L4, n - 3))).is_ok());
        assert!(parse(&format!("{}{high}", spread_maps(L4, n - 2))).is_err());
        let huge = "map gva=0x10000000000 gpa=0x10000000 size=2M\n";
        assert!(parse(&format!("{}{huge}", spread_maps(L4, n - 2))).is_ok());
        // Maps into tables that exist cost nothing.
        let again = format!("{}map gva=0x801000 gpa=0x10000000\n", spread_maps(L4, n));
        assert!(parse(&again).is_ok());
    }

    #[test]
    fn a_2m_map_or_unmap_frees_the_page_table_of_its_region() {
        let n = crate::MAP_TABLES as u64;
        let full = spread_maps(PAE, n);
        let next = format!("map gva={:#x} gpa=0x10000000\n", (4 + n) << 21);
        // Region 4's only page unmapped: its page table is still linked and counted.
        let cleared = format!("{full}unmap gva=0x800000\n");
        assert!(parse(&format!("{cleared}{next}")).is_err());
        for replace in ["map gva=0x800000 gpa=0x10000000 size=2M\n", "unmap gva=0x800000 size=2M\n"]
        {
            assert!(parse(&format!("{cleared}{replace}{next}")).is_ok(), "{replace}");
        }
        // A 2M unmap over a live 4K mapping unlinks its table, which the backends never reuse
        // (entries are left in it): it stays counted, and another table is taken next time.
        let held = format!("{full}unmap gva=0x800000 size=2M\n");
        assert!(parse(&format!("{held}{next}")).is_err());
        let again = format!("{held}map gva=0x800000 gpa=0x10000000\n");
        assert!(parse(&again).is_err(), "the region's new page table is one more");
        // Toggling one region between sizes forever needs one table at a time.
        let mut text = String::from(L4);
        for _ in 0..2000 {
            text.push_str(
                "map gva=0x40000000 gpa=0x40000000\nunmap gva=0x40000000\n\
                 map gva=0x40000000 gpa=0x40200000 size=2M\nunmap gva=0x40000000 size=2M\n",
            );
        }
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn remapping_replaces_and_unmapping_nothing_is_allowed() {
        let s = parse(&format!(
            "{PAE}map gva=0x40000000 gpa=0x10000000 size=2M\n\
             map gva=0x40000000 gpa=0x20000000 size=2M flags=readonly\n\
             map gva=0x40400000 gpa=0x10000000\nmap gva=0x40400000 gpa=0x10001000\n\
             unmap gva=0x50000000\nunmap gva=0x50000000 size=2M\nunmap space=5 gva=0x40400000\n\
             unmap gva=0x40400000\nunmap gva=0x40400000\n"
        ))
        .unwrap();
        assert_eq!(
            s.steps[5].op,
            Op::Unmap(UnmapOp { space: 0, gva: 0x5000_0000, size: PageSize::Size4K })
        );
        assert_eq!(
            s.steps[6].op,
            Op::Unmap(UnmapOp { space: 0, gva: 0x5000_0000, size: PageSize::Size2M })
        );
    }

    #[test]
    fn unmap_fields() {
        assert!(matches!(
            err(&format!("{L4}unmap gva=0x40000800\n")),
            (2, 11, ParseErrorKind::PageMisaligned { field: "gva", .. })
        ));
        assert!(matches!(
            err(&format!("{L4}unmap space=8 gva=0x40000000\n")),
            (2, 13, ParseErrorKind::OutOfRange { field: "space", .. })
        ));
        assert!(matches!(
            err(&format!("{L4}unmap gva=0x40000000 gpa=0x10000000\n")),
            (2, 22, ParseErrorKind::UnknownField { step: "unmap", .. })
        ));
        assert!(matches!(
            err(&format!("{L4}unmap space=1\n")),
            (2, 1, ParseErrorKind::MissingField { step: "unmap", field: "gva" })
        ));
    }

    #[test]
    fn cr3_fields() {
        let s = parse(&format!("{L4}cr3 1 space=7\ncr3 0 space=0\n")).unwrap();
        assert_eq!(s.steps[1].op, Op::Cr3(Cr3Op { vcpu: 1, space: 7 }));
        assert!(matches!(
            err(&format!("{L4}cr3 2 space=1\n")),
            (2, 5, ParseErrorKind::NoSuchVcpu { vcpu: 2, vcpus: 2 })
        ));
        assert!(matches!(
            err(&format!("{L4}cr3 0\n")),
            (2, 1, ParseErrorKind::MissingField { step: "cr3", field: "space" })
        ));
        assert!(matches!(
            err(&format!("{L4}cr3 space=1\n")),
            (2, 1, ParseErrorKind::MissingArgument { step: "cr3", .. })
        ));
        assert!(matches!(
            err(&format!("{L4}cr3 0 space=8\n")),
            (2, 13, ParseErrorKind::OutOfRange { field: "space", .. })
        ));
        assert!(matches!(
            err(&format!("{L4}cr3 0 space=1 gva=0\n")),
            (2, 15, ParseErrorKind::UnknownField { step: "cr3", .. })
        ));
    }

    #[test]
    fn error_messages_name_the_rule() {
        let e = parse(&format!(
            "{L4}map gva=0x40000000 gpa=0x10000000 size=2M\nmap gva=0x40001000 gpa=0x10000000\n"
        ))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 3, column 9: map of a 4K page at gva 0x40001000 in space 0: the 2 MiB region \
             holds live 2M mapping(s); page sizes may not mix in a region (unmap gva=0x40000000 size=2M \
             first)"
        );
        let e = parse("map gva=0x40000000 gpa=0x10000000\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 1, column 1: `map` needs guest paging (`vm paging=4level` or `vm paging=pae`)"
        );
        let e = parse(&format!("{PAE}read 0 gva=0x100000000 size=1\n")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2, column 12: gva 0x100000000 is outside paging=pae's 32-bit address space \
             (below 4 GiB)"
        );
        let e = parse(&format!("{L4}read 0 gva=0x800000000000 size=1\n")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2, column 12: gva 0x800000000000 is not canonical with paging=4level \
             (bits 63..47 must all be equal)"
        );
    }
}
