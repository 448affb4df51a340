//! Guest paging (`paging=4level`, scenario format version 2) on real `/dev/kvm`: the guest edits
//! its own page tables at CPL0, invalidates with INVLPG on every vCPU, loads CR3 itself, and its
//! #PF handler reports CR2 and the error code. The scenarios are built in code (they restate
//! the v2 corpus scenarios of the same names); each test passes (printing why) when `/dev/kvm`
//! is not usable.
use vmmu_kvm::KvmBackend;
use vmmu_scenario::{
    run_collect, Cr3Op, HostReadOp, HostWriteOp, MapFlags, MapOp, MemDecl, MemId, MemRef,
    Observation, Op, PageSize, Paging, ReadExit, ReadOp, Scenario, SlotFlags, SlotOp, Step,
    UnmapOp, VmConfig, Width, WriteExit, WriteOp,
};

fn kvm() -> bool {
    match vmmu_kvm::probe() {
        Ok(_) => true,
        Err(why) => {
            println!("skipped: {why}");
            false
        }
    }
}

/// A scenario under construction: one step per call, numbered like lines of a file.
struct S(Scenario);

const RO: MapFlags = MapFlags { readonly: true, supervisor: false, reserved: false };
const SUP: MapFlags = MapFlags { readonly: false, supervisor: true, reserved: false };
const RSV: MapFlags = MapFlags { readonly: false, supervisor: false, reserved: true };
const RW: MapFlags = MapFlags { readonly: false, supervisor: false, reserved: false };

impl S {
    fn new(vcpus: u32) -> S {
        let vm = VmConfig { vcpus, paging: Paging::Level4, ..VmConfig::default() };
        let mut s = S(Scenario { vm, mems: Vec::new(), steps: Vec::new() });
        s.op(Op::Vm(vm));
        s
    }
    fn op(&mut self, op: Op) -> &mut S {
        let n = self.0.steps.len() as u32 + 1;
        self.0.steps.push(Step { number: n, line: n, op });
        self
    }
    fn mem(&mut self, name: &str, size: u64) -> &mut S {
        let id = MemId(self.0.mems.len());
        let decl = MemDecl { name: name.into(), size };
        self.0.mems.push(decl.clone());
        self.op(Op::Mem(id, decl))
    }
    fn at(&self, mem: usize, offset: u64) -> MemRef {
        MemRef { mem: MemId(mem), name: self.0.mems[mem].name.clone(), offset }
    }
    fn slot(&mut self, id: u16, gpa: u64, size: u64, mem: usize) -> &mut S {
        let m = self.at(mem, 0);
        let flags = SlotFlags::default();
        self.op(Op::Slot(SlotOp { id, as_id: 0, gpa, size, mem: Some(m), flags }))
    }
    fn map(&mut self, space: u8, gva: u64, gpa: u64, size: PageSize, flags: MapFlags) -> &mut S {
        self.op(Op::Map(MapOp { space, gva, gpa, size, flags }))
    }
    fn unmap(&mut self, space: u8, gva: u64, size: PageSize) -> &mut S {
        self.op(Op::Unmap(UnmapOp { space, gva, size }))
    }
    fn cr3(&mut self, vcpu: u32, space: u8) -> &mut S {
        self.op(Op::Cr3(Cr3Op { vcpu, space }))
    }
    fn read(&mut self, vcpu: u32, gva: u64) -> &mut S {
        self.op(Op::Read(ReadOp { vcpu, gpa: gva, width: Width::W8 }))
    }
    fn write(&mut self, vcpu: u32, gva: u64, value: u64) -> &mut S {
        self.op(Op::Write(WriteOp { vcpu, gpa: gva, width: Width::W8, value }))
    }
    fn host_write(&mut self, mem: usize, offset: u64, value: u64) -> &mut S {
        let at = self.at(mem, offset);
        self.op(Op::HostWrite(HostWriteOp { at, width: Width::W8, value }))
    }
    fn host_read(&mut self, mem: usize, offset: u64) -> &mut S {
        let at = self.at(mem, offset);
        self.op(Op::HostRead(HostReadOp { at, width: Width::W8 }))
    }
    fn mmio_reply(&mut self, v: u64) -> &mut S {
        self.op(Op::MmioReply(v))
    }
    /// Runs on KVM; the observations as JSON lines.
    fn run(&self) -> Vec<String> {
        let out = run_collect(&KvmBackend, &self.0).unwrap_or_else(|(partial, e)| {
            panic!("{e}\nafter: {:#?}", partial.iter().map(ToString::to_string).collect::<Vec<_>>())
        });
        out.iter().map(ToString::to_string).collect()
    }
}

fn read_ok(step: u32, value: u64) -> String {
    Observation::Read { step, exit: ReadExit::None { value } }.to_string()
}
fn read_pf(step: u32, gva: u64, error: u64) -> String {
    Observation::Read { step, exit: ReadExit::PageFault { gva, error } }.to_string()
}
fn read_mmio(step: u32, gpa: u64, value: u64) -> String {
    Observation::Read { step, exit: ReadExit::Mmio { gpa, len: 8, value } }.to_string()
}
fn write_ok(step: u32) -> String {
    Observation::Write { step, exit: WriteExit::None }.to_string()
}
fn write_pf(step: u32, gva: u64, error: u64) -> String {
    Observation::Write { step, exit: WriteExit::PageFault { gva, error } }.to_string()
}
fn write_mmio(step: u32, gpa: u64, data: u64) -> String {
    Observation::Write { step, exit: WriteExit::Mmio { gpa, len: 8, data } }.to_string()
}
fn slot_ok(step: u32) -> String {
    format!("{{\"step\":{step},\"op\":\"slot\",\"result\":\"ok\"}}")
}
fn host_read(step: u32, value: u64) -> String {
    Observation::HostRead { step, value }.to_string()
}

const K4: PageSize = PageSize::Size4K;
const M2: PageSize = PageSize::Size2M;
const GVA: u64 = 0x4000_0000;
const RAM: u64 = 0x1_0000_0000;

/// paging_map_read_write: a 4 KiB page of RAM at a GVA in a new PML4/PDPT/PD region: the write
/// lands in the buffer, the read sees the host's value; an unmapped GVA faults not-present.
#[test]
fn paging_map_read_write() {
    if !kvm() {
        return;
    }
    let gva = 0x7f12_3456_7000;
    let out = S::new(1)
        .mem("ram", 8192) // 2
        .slot(1, RAM, 8192, 0) // 3
        .read(0, gva) // 4: not mapped yet
        .map(0, gva, RAM + 0x1000, K4, RW) // 5
        .write(0, gva + 8, 0x1122_3344_5566_7788) // 6
        .host_read(0, 0x1008) // 7
        .host_write(0, 0x1010, 0xabcd) // 8
        .read(0, gva + 0x10) // 9
        .write(0, gva + 0x1000, 1) // 10: the next page is not mapped
        .run();
    assert_eq!(
        out,
        [
            slot_ok(3),
            read_pf(4, gva, 0x4),
            write_ok(6),
            host_read(7, 0x1122_3344_5566_7788),
            read_ok(9, 0xabcd),
            write_pf(10, gva + 0x1000, 0x6),
        ]
    );
}
