//! Scenario format v2 guest paging on the software machine (issue 14): the same steps under every
//! MMU (EPT and NPT with the two-dimensional walk, shadow paging) with caching on and off give
//! the same observations, and the ones the architecture prescribes.

use vmmu_scenario::{
    run_collect, Cr3Op, Format, MapFlags, MapOp, MemDecl, MemId, MemRef, Observation, Op, PageSize,
    Paging, ReadExit, ReadOp, Scenario, SlotFlags, SlotOp, Step, UnmapOp, VmConfig, Width,
    WriteExit, WriteOp,
};
use vmmu_sim::scenario::SimBackend;

const RAM_GPA: u64 = 0x1000_0000;
const MMIO_GPA: u64 = 0x2_0000_0000;
const X: u64 = 0x4000_0000;

struct Builder {
    steps: Vec<Step>,
    mems: Vec<MemDecl>,
}

impl Builder {
    fn op(&mut self, op: Op) -> u32 {
        let n = self.steps.len() as u32 + 1;
        self.steps.push(Step { number: n, line: n, op });
        n
    }
    fn mem(&mut self, name: &str, size: u64) {
        let d = MemDecl { name: name.into(), size };
        self.mems.push(d.clone());
        self.op(Op::Mem(MemId(self.mems.len() - 1), d));
    }
    fn slot(&mut self, id: u16, gpa: u64, size: u64, readonly: bool) -> u32 {
        let mem = (size > 0).then(|| MemRef { mem: MemId(0), name: "ram".into(), offset: 0 });
        self.op(Op::Slot(SlotOp {
            id,
            as_id: 0,
            gpa,
            size,
            mem,
            flags: SlotFlags { readonly, dirty_log: false },
        }))
    }
    fn map(&mut self, space: u8, gva: u64, gpa: u64, size: PageSize, flags: MapFlags) {
        self.op(Op::Map(MapOp { space, gva, gpa, size, flags }));
    }
    fn unmap(&mut self, gva: u64) {
        self.op(Op::Unmap(UnmapOp { space: 0, gva, size: PageSize::Size4K }));
    }
    fn read(&mut self, vcpu: u32, gva: u64) -> u32 {
        self.op(Op::Read(ReadOp { vcpu, gpa: gva, width: Width::W8 }))
    }
    fn write(&mut self, vcpu: u32, gva: u64, value: u64) -> u32 {
        self.op(Op::Write(WriteOp { vcpu, gpa: gva, width: Width::W8, value }))
    }
}

fn scenario(paging: Paging, format: Format, caching: bool) -> (Scenario, Vec<(u32, String)>) {
    let mut b = Builder { steps: Vec::new(), mems: Vec::new() };
    let vm = VmConfig {
        vcpus: 2,
        address_spaces: 1,
        mmio_caching: caching,
        format,
        phys_bits: 46,
        paging,
        dirty_log: vmmu_scenario::DirtyLogMode::Auto,
    };
    b.op(Op::Vm(vm));
    b.mem("ram", 4 << 20);
    let mut want = Vec::new();
    let rw = MapFlags::default();
    let s = b.slot(1, RAM_GPA, 4 << 20, false);
    want.push((s, r#""result":"ok""#.to_string()));
    b.map(0, X, RAM_GPA, PageSize::Size4K, rw);
    let s = b.write(0, X + 8, 0x1234);
    want.push((s, r#""exit":"none""#.into()));
    let s = b.read(1, X + 8);
    want.push((s, r#""value":"0x1234""#.into()));
    // MMIO through a GVA: the exit names the translated GPA; twice (the caches answer the second).
    b.map(0, X + 0x1000, MMIO_GPA, PageSize::Size4K, rw);
    for _ in 0..2 {
        let s = b.read(0, X + 0x1010);
        want.push((s, format!(r#""exit":"mmio","gpa":"{:#x}""#, MMIO_GPA + 0x10)));
    }
    // The 2011 case: remap the MMIO GVA to RAM; the next access must be RAM.
    b.map(0, X + 0x1000, RAM_GPA, PageSize::Size4K, rw);
    let s = b.read(0, X + 0x1008);
    want.push((s, r#""value":"0x1234""#.into()));
    // Unmapped: a not-present user fault.
    b.unmap(X);
    let s = b.read(1, X + 8);
    want.push((s, format!(r#""exit":"page-fault","gva":"{:#x}","error":"0x4""#, X + 8)));
    // Read-only, supervisor and reserved-bit entries.
    let ro = MapFlags { readonly: true, ..rw };
    b.map(0, X, RAM_GPA, PageSize::Size4K, ro);
    let s = b.read(0, X + 8);
    want.push((s, r#""value":"0x1234""#.into()));
    let s = b.write(0, X + 8, 1);
    want.push((s, r#""error":"0x7""#.into()));
    b.map(0, X, RAM_GPA, PageSize::Size4K, MapFlags { supervisor: true, ..rw });
    let s = b.read(1, X);
    want.push((s, r#""error":"0x5""#.into()));
    b.map(0, X, RAM_GPA, PageSize::Size4K, MapFlags { reserved: true, ..rw });
    let s = b.read(1, X);
    want.push((s, r#""error":"0xd""#.into()));
    // A 2 MiB guest page over RAM and an MMIO hole past the slot's end.
    b.map(0, 0x8000_0000, RAM_GPA, PageSize::Size2M, rw);
    let s = b.read(0, 0x8000_0008);
    want.push((s, r#""value":"0x1234""#.into()));
    b.map(0, 0x8020_0000, RAM_GPA + (4 << 20), PageSize::Size2M, rw);
    let s = b.read(1, 0x8020_0010);
    want.push((s, format!(r#""exit":"mmio","gpa":"{:#x}""#, RAM_GPA + (4 << 20) + 0x10)));
    // Delete the slot under a mapped GVA: MMIO; create it again: RAM.
    b.map(0, X, RAM_GPA, PageSize::Size4K, rw);
    let s = b.read(0, X + 8);
    want.push((s, r#""value":"0x1234""#.into()));
    b.slot(1, RAM_GPA, 0, false);
    let s = b.read(0, X + 8);
    want.push((s, format!(r#""exit":"mmio","gpa":"{:#x}""#, RAM_GPA + 8)));
    b.slot(1, RAM_GPA, 4 << 20, false);
    let s = b.read(0, X + 8);
    want.push((s, r#""value":"0x1234""#.into()));
    // Two spaces mapping one GVA differently; CR3 switches.
    b.map(1, X, MMIO_GPA, PageSize::Size4K, rw);
    b.op(Op::Cr3(Cr3Op { vcpu: 0, space: 1 }));
    let s = b.read(0, X + 8);
    want.push((s, format!(r#""exit":"mmio","gpa":"{:#x}""#, MMIO_GPA + 8)));
    let s = b.read(1, X + 8);
    want.push((s, r#""value":"0x1234""#.into()));
    b.op(Op::Cr3(Cr3Op { vcpu: 0, space: 0 }));
    let s = b.read(0, X + 8);
    want.push((s, r#""value":"0x1234""#.into()));
    // A read-only slot: reads are RAM, writes exit as MMIO.
    b.slot(1, RAM_GPA, 0, false);
    b.slot(1, RAM_GPA, 4 << 20, true);
    let s = b.write(1, X + 8, 5);
    want.push((s, format!(r#""exit":"mmio","gpa":"{:#x}""#, RAM_GPA + 8)));
    let s = b.read(1, X + 8);
    want.push((s, r#""value":"0x1234""#.into()));
    (Scenario { vm, mems: b.mems, steps: b.steps }, want)
}

fn check(paging: Paging) {
    let mut streams = Vec::new();
    for format in [Format::Ept, Format::Npt, Format::Shadow] {
        for caching in [true, false] {
            let (sc, want) = scenario(paging, format, caching);
            let obs = run_collect(&SimBackend, &sc)
                .unwrap_or_else(|(o, e)| panic!("{format} caching={caching}: {e}\n{o:#?}"));
            let text: Vec<String> = obs.iter().map(Observation::to_string).collect();
            for (step, frag) in &want {
                let line = text
                    .iter()
                    .find(|l| l.starts_with(&format!(r#"{{"step":{step},"#)))
                    .unwrap_or_else(|| {
                        panic!("{format}: no observation for step {step}: {text:#?}")
                    });
                assert!(
                    line.contains(frag.as_str()),
                    "{format} caching={caching}: {line} !~ {frag}"
                );
            }
            streams.push((format, caching, text));
        }
    }
    for (f, c, s) in &streams[1..] {
        assert_eq!(s, &streams[0].2, "{f} caching={c} differs from ept caching=on");
    }
}

#[test]
fn four_level_paging_is_the_same_under_every_mmu() {
    check(Paging::Level4);
}

#[test]
fn pae_paging_is_the_same_under_every_mmu() {
    check(Paging::Pae);
}

#[test]
fn unused_exit_kinds_compile() {
    // Keeps the imports of exit kinds honest for readers of this file.
    let _ = (ReadExit::PageFault { gva: 0, error: 0 }, WriteExit::PageFault { gva: 0, error: 0 });
}

/// The scenario of [`paging_mmio_gen_wrap_own_slots`]: slot 1 (logged) and slot 2 are created,
/// a GVA of slot 1's page 0 is written (its guest PTE becomes dirty) and the log fetched (the
/// page is write-protected again); then slot 2's dirty logging is toggled `toggles` times (one
/// memslot swap each), the GVA read after each of the last two toggles and the log fetched.
fn wrap_scenario(toggles: u64) -> String {
    wrap_scenario_with(
        "vm vcpus=1 paging=4level format=shadow",
        "map gva=0x10000000 gpa=0x40000000\nwrite 0 gva=0x10000000 size=8 value=0x1\n",
        "read 0 gva=0x10000000 size=8",
        toggles,
    )
}

/// [`wrap_scenario`] with another `vm` line, steps that dirty page 0, and read of it.
fn wrap_scenario_with(vm: &str, dirty: &str, read: &str, toggles: u64) -> String {
    let mut s = format!(
        "{vm}\nmem ram size=64K\nmem t size=4K\n\
         slot 1 gpa=0x40000000 size=64K mem=ram flags=dirty_log\n\
         slot 2 gpa=0x50000000 size=4K mem=t\n{dirty}dirty-log 1\n"
    );
    for i in 1..=toggles {
        let flags = if i % 2 == 1 { " flags=dirty_log" } else { "" };
        s.push_str(&format!("slot 2 gpa=0x50000000 size=4K mem=t{flags}\n"));
        if i + 2 > toggles {
            s.push_str(&format!("{read}\ndirty-log 1\n"));
        }
    }
    s
}

/// The pages of each `dirty-log` observation of `text` run on the software machine.
fn logged_pages(text: &str) -> Vec<String> {
    let sc = vmmu_scenario::parse(text).expect("scenario");
    let obs = run_collect(&SimBackend, &sc).unwrap_or_else(|(_, e)| panic!("{e}"));
    let pages = |l: String| l.split(r#""pages":"#).nth(1).unwrap_or("").to_string();
    obs.iter()
        .map(Observation::to_string)
        .filter(|l| l.contains(r#""op":"dirty-log""#))
        .map(pages)
        .collect()
}

/// kvm-mmu-facts.md §2.2, §2.4: with one address space every memslot swap adds 1 to the
/// generation, and the swap that makes its low 19 bits zero zaps every shadow page
/// (`kvm_mmu_invalidate_mmio_sptes`). The zap shows through dirty logging: the read after it
/// faults again and, its guest PTE dirty, maps page 0 writable, which logs it. The backends'
/// own setup counts: the KVM backend of a paging guest makes two swaps (its own slot and its
/// page-table pool), so on the reference KVM (nested, shadow paging, no SMM) the zap comes with
/// the scenario's 2^19 − 2nd swap, the 2^19 − 4th toggle: the log after the toggle before it is
/// empty, the one after it has page 0. The software machine's backend reserved its area as one
/// slot and zapped one toggle later.
#[test]
fn paging_mmio_gen_wrap_own_slots() {
    let got = logged_pages(&wrap_scenario((1 << 19) - 4));
    assert_eq!(got, [r#"["0x0"]}"#, r#"[]}"#, r#"["0x0"]}"#]);
}

/// As [`paging_mmio_gen_wrap_own_slots`] for a version-1 guest on a TDP MMU: the KVM backend
/// makes one swap of its own (its slot, whatever the MMU), so the zap comes with the scenario's
/// 2^19 − 1st swap, the 2^19 − 3rd toggle, and the read after it faults again and logs page 0
/// (on the reference KVM, whose shadow MMU runs the guest on dirty identity pages, as on the
/// software machine's EPT and NPT). The software machine's backend made no swap of its own on a
/// TDP MMU (it has no tables to keep there) and zapped one toggle later.
#[test]
fn version_one_tdp_mmio_gen_wrap_own_slot() {
    for format in ["ept", "npt"] {
        let text = wrap_scenario_with(
            &format!("vm vcpus=1 format={format}"),
            "write 0 gpa=0x40000000 size=8 value=0x1\n",
            "read 0 gpa=0x40000000 size=8",
            (1 << 19) - 3,
        );
        let got = logged_pages(&text);
        assert_eq!(got, [r#"["0x0"]}"#, r#"[]}"#, r#"["0x0"]}"#], "{format}");
    }
}
