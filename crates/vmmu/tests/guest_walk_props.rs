//! Property test of the guest page-table walker (`vmmu::guest::walk`) against a deliberately
//! simple reference model written here from the architectural rules (facts
//! `kvm-shadow-mmu-facts.md` §2, Intel SDM "4-level paging" and "PAE paging"): a recursive walk
//! over a HashMap-backed memory whose tables are random and may alias each other (an entry may
//! point at any table frame, itself included, or at an unbacked frame), with random present, RW,
//! US, NX, PS, A, D and reserved bits, random CR0.WP, EFER.NX, MAXPHYADDR, 1 GiB pages in the
//! guest's CPUID or not, and access.
//!
//! For 4-level and PAE paging it compares: non-canonical or not, the #PF error code, or the
//! translation (gpa, gfn, level), `pte_access` and `pt_access`; and guest memory afterwards
//! (A on every level used, D on the leaf of a write, nothing written by a faulting walk). For PAE
//! it also compares the PDPTE load (`load_pdptrs`) with the model's reserved-bit rule.
#![cfg(not(loom))] // std threads and atomics: loom types only work inside a model

use proptest::prelude::*;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use vmmu::guest::{
    load_pdptrs, walk, GpteWriteError, GuestCpu, GuestPteMemory, PagingMode, WalkError,
};
use vmmu::{Access, FaultAccess, Gpa, Gva};

/// Table frames that hold random entries (backed); frame 7 is referenced but never backed.
const FRAMES: [u64; 6] = [1, 2, 3, 4, 5, 6];
const UNBACKED_FRAME: u64 = 7;
/// Entry indices populated in every table frame (and the only ones a GVA uses). 0..=3 and
/// 508..=511 also hold the PAE PDPTs at CR3 offsets 0 and 0xfe0.
const INDICES: [u64; 8] = [0, 1, 2, 3, 508, 509, 510, 511];

// ---- memory --------------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
struct Mem {
    words: RefCell<HashMap<u64, u64>>,
    backed: HashSet<u64>,
}

impl Mem {
    fn get(&self, gpa: u64) -> Option<u64> {
        self.backed
            .contains(&(gpa >> 12))
            .then(|| self.words.borrow().get(&gpa).copied().unwrap_or(0))
    }
    fn snapshot(&self) -> HashMap<u64, u64> {
        self.words.borrow().clone()
    }
}

impl GuestPteMemory for Mem {
    fn read_gpte(&self, gpa: Gpa) -> Option<u64> {
        self.get(gpa.0)
    }
    fn cmpxchg_gpte(&self, gpa: Gpa, old: u64, new: u64) -> Result<bool, GpteWriteError> {
        let Some(cur) = self.get(gpa.0) else { return Err(GpteWriteError::Unreadable) };
        if cur != old {
            return Ok(false);
        }
        self.words.borrow_mut().insert(gpa.0, new);
        Ok(true)
    }
}

// ---- random tables -------------------------------------------------------------------------

/// One random gPTE, materialised for a MAXPHYADDR by [`Spec::value`].
#[derive(Clone, Copy, Debug)]
struct Spec {
    present: bool,
    rw: bool,
    us: bool,
    nx: bool,
    ps: bool,
    a: bool,
    d: bool,
    /// 0..=5: a table frame of FRAMES; 6: the unbacked frame; 7: a 2 MiB-aligned page; 8: any
    /// frame below MAXPHYADDR.
    addr_kind: u8,
    addr_pick: u64,
    /// A bit that may be reserved (or ignored) somewhere.
    extra: Option<u8>,
}

fn spec() -> impl Strategy<Value = Spec> {
    let extra = prop_oneof![
        14 => Just(None),
        1 => prop::sample::select(vec![1u8, 2, 5, 6, 7, 8, 13, 20, 35, 36, 39, 45, 51, 52, 55, 62, 63])
            .prop_map(Some),
    ];
    (
        prop::bool::weighted(0.95),
        prop::bool::weighted(0.7),
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.15),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![30 => 0u8..6, 1 => Just(6u8), 1 => Just(7u8), 1 => Just(8u8)],
        any::<u64>(),
        extra,
    )
        .prop_map(|(present, rw, us, nx, ps, a, d, addr_kind, addr_pick, extra)| Spec {
            present,
            rw,
            us,
            nx,
            ps,
            a,
            d,
            addr_kind,
            addr_pick,
            extra,
        })
}

impl Spec {
    fn value(&self, maxphy: u8) -> u64 {
        // Most PS entries get a 2 MiB-aligned address, so 2 MiB leaves are common; one in four
        // a 1 GiB-aligned one, for 1 GiB leaves.
        let kind = match self.addr_pick & 3 {
            _ if !self.ps => self.addr_kind,
            0 => self.addr_kind,
            1 => 9,
            _ => 7,
        };
        let addr = match kind {
            0..=5 => FRAMES[usize::from(self.addr_kind)] << 12,
            6 => UNBACKED_FRAME << 12,
            7 => (self.addr_pick << 21) & ((1u64 << maxphy) - 1),
            9 => ((self.addr_pick >> 2) << 30) & ((1u64 << maxphy) - 1),
            _ => (self.addr_pick << 12) & ((1u64 << maxphy) - 1),
        };
        let mut v = addr;
        for (on, bit) in [
            (self.present, 0),
            (self.rw, 1),
            (self.us, 2),
            (self.a, 5),
            (self.d, 6),
            (self.ps, 7),
            (self.nx, 63),
        ] {
            if on {
                v |= 1 << bit;
            }
        }
        if let Some(b) = self.extra {
            v |= 1 << b;
        }
        v
    }
}

/// A PAE PDPTE: mostly valid (present, pointing at a table frame), sometimes not present or
/// with a bit that is reserved in a PDPTE (or an ignored one: 9, 11).
#[derive(Clone, Copy, Debug)]
struct PdpteSpec {
    present: bool,
    frame: usize,
    extra: Option<u8>,
}

fn pdpte_spec() -> impl Strategy<Value = PdpteSpec> {
    let extra = prop_oneof![
        12 => Just(None),
        1 => prop::sample::select(vec![1u8, 2, 3, 4, 5, 6, 7, 8, 9, 11, 36, 45, 51, 52, 62, 63])
            .prop_map(Some),
    ];
    (prop::bool::weighted(0.9), 0..FRAMES.len() + 1, extra)
        .prop_map(|(present, frame, extra)| PdpteSpec { present, frame, extra })
}

impl PdpteSpec {
    fn value(&self) -> u64 {
        let frame = FRAMES.get(self.frame).copied().unwrap_or(UNBACKED_FRAME);
        let mut v = frame << 12;
        if self.present {
            v |= 1;
        }
        if let Some(b) = self.extra {
            v |= 1 << b;
        }
        v
    }
}

#[derive(Clone, Debug)]
struct Case {
    pae: bool,
    /// The guest's CPUID has 1 GiB pages.
    gbpages: bool,
    maxphy: u8,
    wp: bool,
    nx: bool,
    write: bool,
    exec: bool,
    user: bool,
    /// Entry index per level for the GVA (levels 4..1; PAE uses [1] & 3 for the PDPT index).
    idx: [usize; 4],
    offset: u64,
    /// Flip one of bits 63:47 (4-level) / set a bit above 31 (PAE).
    non_canonical: Option<u8>,
    /// PDPT at CR3 offset 0 or 0xfe0 of frame 1 (PAE).
    cr3_high: bool,
    entries: Vec<Spec>,
    /// PAE: the four PDPTEs written over the random entries at CR3.
    pdptes: [PdpteSpec; 4],
}

fn case() -> impl Strategy<Value = Case> {
    (
        (any::<bool>(), any::<bool>()),
        prop::sample::select(vec![36u8, 39, 46, 52]),
        any::<bool>(),
        any::<bool>(),
        0u8..3, // read, write, fetch
        any::<bool>(),
        prop::array::uniform4(0usize..INDICES.len()),
        0u64..4096,
        prop_oneof![9 => Just(None), 1 => (32u8..64).prop_map(Some)],
        any::<bool>(),
        prop::collection::vec(spec(), FRAMES.len() * INDICES.len()),
        prop::array::uniform4(pdpte_spec()),
    )
        .prop_map(
            |(
                (pae, gbpages),
                maxphy,
                wp,
                nx,
                kind,
                user,
                idx,
                offset,
                nc,
                cr3_high,
                entries,
                pdptes,
            )| Case {
                pae,
                gbpages,
                maxphy,
                wp,
                nx,
                write: kind == 1,
                exec: kind == 2,
                user,
                idx,
                offset,
                non_canonical: nc,
                cr3_high,
                entries,
                pdptes,
            },
        )
}

impl Case {
    fn memory(&self) -> Mem {
        let mut m = Mem::default();
        for (fi, &f) in FRAMES.iter().enumerate() {
            m.backed.insert(f);
            for (ii, &i) in INDICES.iter().enumerate() {
                let s = &self.entries[fi * INDICES.len() + ii];
                m.words.borrow_mut().insert((f << 12) + 8 * i, s.value(self.maxphy));
            }
        }
        if self.pae {
            for (i, p) in self.pdptes.iter().enumerate() {
                m.words.borrow_mut().insert(self.cr3() + 8 * i as u64, p.value());
            }
        }
        m
    }

    fn gva(&self) -> u64 {
        let i = |l: usize| INDICES[self.idx[l]];
        if self.pae {
            let mut g = ((i(1) & 3) << 30) | (i(2) << 21) | (i(3) << 12) | self.offset;
            if let Some(b) = self.non_canonical {
                g |= 1 << b;
            }
            g
        } else {
            let mut g = (i(0) << 39) | (i(1) << 30) | (i(2) << 21) | (i(3) << 12) | self.offset;
            if g & (1 << 47) != 0 {
                g |= 0xffff << 48;
            }
            if let Some(b) = self.non_canonical {
                g ^= 1 << (b.max(47));
            }
            g
        }
    }

    fn cr3(&self) -> u64 {
        if self.pae {
            0x1000 + if self.cr3_high { 0xfe0 } else { 0 }
        } else {
            0x1000
        }
    }

    fn access(&self) -> FaultAccess {
        FaultAccess { write: self.write, exec: self.exec, user: self.user }
    }
}

// ---- the reference model -------------------------------------------------------------------

fn bit(v: u64, b: u32) -> bool {
    (v >> b) & 1 == 1
}

fn any_bit(v: u64, lo: u32, hi: u32) -> bool {
    (lo..=hi).any(|b| bit(v, b))
}

#[derive(Debug, PartialEq, Eq)]
enum Expect {
    NonCanonical,
    Fault(u64),
    Ok { gpa: u64, level: u8, pte_access: Access, pt_access: Vec<(u8, Access)> },
}

/// The model's walk state: rights so far (U, W, X as "every level allows").
#[derive(Clone, Copy)]
struct Rights {
    u: bool,
    w: bool,
    x: bool,
}

impl Rights {
    fn acc(self) -> Access {
        let mut b = 0;
        if self.x {
            b |= 1;
        }
        if self.w {
            b |= 2;
        }
        if self.u {
            b |= 4;
        }
        Access::from_bits(b)
    }
}

struct Model<'a> {
    c: &'a Case,
    mem: &'a Mem,
    gva: u64,
    /// gPTE addresses used, and the leaf's.
    used: Vec<u64>,
    pt_access: Vec<(u8, Access)>,
}

impl Model<'_> {
    fn reserved(&self, level: u8, pte: u64) -> bool {
        let c = self.c;
        let m = u32::from(c.maxphy);
        let phys_top = if c.pae { 62 } else { 51 };
        if m <= phys_top && any_bit(pte, m, phys_top) {
            return true;
        }
        if !c.nx && bit(pte, 63) {
            return true;
        }
        let ps = bit(pte, 7);
        match (c.pae, level) {
            (false, 4) => ps,
            (false, 3) => ps && (!c.gbpages || any_bit(pte, 13, 29)),
            (_, 2) => ps && any_bit(pte, 13, 20),
            _ => false,
        }
    }

    /// Walks the table at `table` for `level` and below (recursively).
    fn step(&mut self, level: u8, table: u64, r: Rights) -> Result<(u64, u8, Rights), u64> {
        let index = (self.gva >> (12 + 9 * u32::from(level - 1))) & 511;
        let at = table + 8 * index;
        let Some(pte) = self.mem.get(at) else { return Err(0) };
        if !bit(pte, 0) {
            return Err(0);
        }
        if self.reserved(level, pte) {
            return Err(8 | 1);
        }
        self.used.push(at);
        self.pt_access.push((level, r.acc()));
        let r = Rights { u: r.u && bit(pte, 2), w: r.w && bit(pte, 1), x: r.x && !bit(pte, 63) };
        if level == 1 || bit(pte, 7) {
            return Ok((pte, level, r));
        }
        let next = pte & ((1u64 << self.c.maxphy) - 1) & !0xfff;
        self.step(level - 1, next, r)
    }

    fn run(&mut self, pdpte: Option<u64>) -> Expect {
        let c = self.c;
        let all = Rights { u: true, w: true, x: true };
        let walked = if c.pae {
            let pdpte = pdpte.unwrap_or(0);
            if !bit(pdpte, 0) {
                Err(0)
            } else {
                self.pt_access.push((3, Access::ALL));
                self.step(2, pdpte & ((1u64 << c.maxphy) - 1) & !0xfff, all)
            }
        } else {
            self.step(4, c.cr3(), all)
        };
        let code = |base: u64| {
            base | if c.write { 2 } else { 0 }
                | if c.user { 4 } else { 0 }
                | if c.exec && c.nx { 16 } else { 0 }
        };
        let (leaf, level, r) = match walked {
            Ok(v) => v,
            Err(base) => return Expect::Fault(code(base)),
        };
        if (c.user && !r.u) || (c.write && !r.w && (c.user || c.wp)) || (c.exec && c.nx && !r.x) {
            return Expect::Fault(code(1));
        }
        let size_bits = 12 + 9 * u32::from(level - 1);
        let base = leaf & ((1u64 << c.maxphy) - 1) & !((1u64 << size_bits) - 1);
        let gpa = base | (self.gva & ((1u64 << size_bits) - 1));
        let dirty = bit(leaf, 6);
        let pte_access = Rights { w: r.w && (c.write || dirty), ..r }.acc();
        Expect::Ok { gpa, level, pte_access, pt_access: self.pt_access.clone() }
    }
}

/// The PDPTE load by the architectural rule: `Err(index)` of the first present PDPTE with a
/// reserved bit (63, MAXPHYADDR..=62, 8:5, 2:1).
fn model_pdptrs(c: &Case, mem: &Mem) -> Result<[u64; 4], usize> {
    let mut out = [0; 4];
    for (i, o) in out.iter_mut().enumerate() {
        *o = mem.get(c.cr3() + 8 * i as u64).unwrap_or(0);
    }
    for (i, &e) in out.iter().enumerate() {
        let rsvd = any_bit(e, u32::from(c.maxphy), 63) || any_bit(e, 5, 8) || any_bit(e, 1, 2);
        if bit(e, 0) && rsvd {
            return Err(i);
        }
    }
    Ok(out)
}

// ---- the property --------------------------------------------------------------------------

/// What a case exercised, for the coverage test.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    PdptrReserved,
    NonCanonical,
    NotPresent,
    Reserved,
    Permission,
    Ok4k,
    Ok2m,
    Ok1g,
    /// A successful walk that wrote A or D bits.
    OkWrote,
}

fn check(c: &Case) -> Result<Vec<Kind>, TestCaseError> {
    let mem = c.memory();
    let before = mem.snapshot();
    let gva = c.gva();
    let mode = if c.pae {
        let got = load_pdptrs(&mem, c.cr3(), c.maxphy);
        match (model_pdptrs(c, &mem), got) {
            (Ok(want), Ok(got)) => {
                prop_assert_eq!(want, got);
                PagingMode::Pae { pdptrs: got }
            }
            (Err(i), Err(vmmu::guest::PdptrError::Reserved { index, .. })) => {
                prop_assert_eq!(i, index);
                return Ok(vec![Kind::PdptrReserved]);
            }
            (want, got) => return Err(TestCaseError::fail(format!("pdptrs {want:?} vs {got:?}"))),
        }
    } else {
        PagingMode::Long4
    };
    let cpu = GuestCpu {
        mode,
        cr3: c.cr3(),
        cr0_wp: c.wp,
        efer_nx: c.nx,
        maxphyaddr: c.maxphy,
        gbpages: c.gbpages,
    };

    let mut model = Model { c, mem: &mem, gva, used: Vec::new(), pt_access: Vec::new() };
    let canonical = if c.pae { gva >> 32 == 0 } else { ((gva << 16) as i64 >> 16) as u64 == gva };
    let want = if !canonical {
        Expect::NonCanonical
    } else {
        let pdpte = match mode {
            PagingMode::Pae { pdptrs } => Some(pdptrs[((gva >> 30) & 3) as usize]),
            _ => None,
        };
        model.run(pdpte)
    };

    let got = walk(&cpu, &mem, Gva(gva), c.access());
    let got = match got {
        Err(WalkError::NonCanonical(a)) => {
            prop_assert_eq!(a, Gva(gva));
            Expect::NonCanonical
        }
        Err(WalkError::PageFault(f)) => {
            prop_assert_eq!(f.addr, Gva(gva));
            Expect::Fault(f.error_code.0)
        }
        Err(WalkError::Contended(a)) => {
            return Err(TestCaseError::fail(format!("no racer here, yet the walk of {a} gave up")))
        }
        Ok(w) => {
            prop_assert_eq!(w.gfn.0, w.gpa.0 >> 12);
            let top = if c.pae { 3 } else { 4 };
            prop_assert_eq!(w.max_level.get(), top);
            let pt_access =
                (w.level.get()..=top).rev().map(|l| (l, w.pt_access[usize::from(l - 1)])).collect();
            Expect::Ok { gpa: w.gpa.0, level: w.level.get(), pte_access: w.pte_access, pt_access }
        }
    };
    prop_assert_eq!(&got, &want);

    // Memory afterwards: A on every gPTE used, D on the leaf of a write; nothing else.
    let mut expect_mem = before;
    if matches!(want, Expect::Ok { .. }) {
        for (n, at) in model.used.iter().enumerate() {
            let e = expect_mem.entry(*at).or_insert(0);
            *e |= 1 << 5;
            if c.write && n + 1 == model.used.len() {
                *e |= 1 << 6;
            }
        }
    }
    let wrote = mem.snapshot() != before_walk(c);
    prop_assert_eq!(mem.snapshot(), expect_mem);
    let mut kinds = vec![match want {
        Expect::NonCanonical => Kind::NonCanonical,
        Expect::Fault(e) if e & 8 != 0 => Kind::Reserved,
        Expect::Fault(e) if e & 1 != 0 => Kind::Permission,
        Expect::Fault(_) => Kind::NotPresent,
        Expect::Ok { level: 1, .. } => Kind::Ok4k,
        Expect::Ok { level: 3, .. } => Kind::Ok1g,
        Expect::Ok { .. } => Kind::Ok2m,
    }];
    if wrote {
        kinds.push(Kind::OkWrote);
    }
    Ok(kinds)
}

fn before_walk(c: &Case) -> HashMap<u64, u64> {
    c.memory().snapshot()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn walker_matches_the_reference_model(c in case()) {
        check(&c)?;
    }
}

/// The generator reaches every outcome, in both modes, often enough for the property to mean
/// something (a fixed seed: deterministic).
#[test]
fn random_tables_cover_every_outcome() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let mut seen: HashMap<(bool, Kind), u32> = HashMap::new();
    for _ in 0..1024 {
        let c = case().new_tree(&mut runner).expect("generate").current();
        for k in check(&c).expect("agrees with the model") {
            *seen.entry((c.pae, k)).or_default() += 1;
        }
    }
    println!("outcomes (pae, kind) -> cases: {seen:?}");
    for pae in [false, true] {
        for k in [
            Kind::NonCanonical,
            Kind::NotPresent,
            Kind::Reserved,
            Kind::Permission,
            Kind::Ok4k,
            Kind::Ok2m,
            Kind::OkWrote,
        ] {
            let n = seen.get(&(pae, k)).copied().unwrap_or(0);
            assert!(n >= 5, "pae={pae} {k:?} seen {n} times: {seen:?}");
        }
    }
    assert!(seen.get(&(true, Kind::PdptrReserved)).copied().unwrap_or(0) >= 5, "{seen:?}");
    assert!(seen.get(&(false, Kind::Ok1g)).copied().unwrap_or(0) >= 5, "{seen:?}");
}
