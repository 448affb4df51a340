//! Memory safety of the KVM backends' safe public API (a soundness audit's findings): a slot
//! request built in code, which the scenario parser would refuse, cannot make the guest store
//! into this process's memory. Each test passes (printing why) when `/dev/kvm` is not usable.
mod common;

use common::kvm;
use vmmu_kvm::replay::TraceVm;
use vmmu_kvm::KvmBackend;
use vmmu_scenario::{
    Backend, MemDecl, MemId, MemRef, ReservedUse, Scenario, SlotFlags, SlotOp, Start, VmConfig,
    Width, WriteOp,
};

/// A slot over the backend's MMIO sync address (where its code stores one byte after every
/// access) or under one of its own slot ids is refused before KVM sees it: otherwise the sync
/// store of the next access would land wherever the slot's host range points (a Rust `Box`).
#[test]
fn slots_over_the_backends_own_ranges_or_ids_are_refused() {
    if !kvm() {
        return;
    }
    let scenario = Scenario { vm: VmConfig::default(), mems: Vec::new(), steps: Vec::new() };
    let Ok(Start::Run(mut m)) = KvmBackend.start(&scenario) else { panic!("KVM is usable") };
    m.mem(MemId(0), &MemDecl { name: "a".into(), size: 0x3000 }).unwrap();
    let at = |offset: u64| Some(MemRef { mem: MemId(0), name: "a".into(), offset });
    let flags = SlotFlags::default();
    let legit = SlotOp { id: 1, as_id: 0, gpa: 0x100_0000, size: 0x3000, mem: at(0), flags };
    m.slot(&legit).unwrap();
    let sync = vmmu_kvm::code::SYNC_GPA;
    for (op, want) in [
        (SlotOp { id: 2, gpa: sync, size: 0x1000, ..legit.clone() }, ReservedUse::Below(sync)),
        (SlotOp { id: 2, gpa: 0, size: 0x1000, ..legit.clone() }, ReservedUse::Below(0)),
        (SlotOp { id: 32760, size: 0, mem: None, ..legit.clone() }, ReservedUse::SlotId(32760)),
        (SlotOp { id: 32761, gpa: 0x200_0000, ..legit.clone() }, ReservedUse::SlotId(32761)),
    ] {
        let err = m.slot(&op).expect_err("refused").to_string();
        assert!(err.contains(&want.to_string()), "{op:?}: {err}");
    }
    // The backend still runs: the write is checked, and its sync store is an MMIO exit.
    m.write(&WriteOp { vcpu: 0, gpa: 0x100_0042, width: Width::W1, value: 7 }).unwrap();
}

/// `TraceVm::set_region` with a host range in none of the VM's unions (a caller outside the
/// replay): refused with EFAULT, so the guest cannot store into this process's memory (a Rust
/// `Box`) through it; a shape KVM refuses anyway still gets KVM's own errno.
#[test]
fn trace_vm_refuses_a_host_range_outside_its_unions() {
    if !kvm() {
        return;
    }
    const GPA: u64 = 0x4000_0000;
    let base = TraceVm::place([(0u16, GPA, 0x1000u64)], []).unwrap();
    let own = TraceVm::own_slot([(0u16, 1u16)]).unwrap();
    let mut vm = TraceVm::new(&[], 1, base, own, Vec::new()).unwrap();
    let victim: Box<[u64]> = vec![0u64; 3 * 512].into_boxed_slice();
    let page = (victim.as_ptr() as u64 + 4095) & !4095;
    let index = ((page - victim.as_ptr() as u64) / 8) as usize;
    assert_eq!(vm.set_region(1, 0, GPA, 0x1000, page), Err("EFAULT".to_string()));
    let _ = vm.access(GPA, 8, Some(0xdead_beef_cafe_f00d), 0);
    assert_eq!(std::hint::black_box(&victim)[index], 0, "the guest stored into a Box");
    // Misaligned: KVM's answer, not the replay's.
    assert_eq!(vm.set_region(1, 0, GPA, 0x1000, page + 8), Err("EINVAL".to_string()));
    // A delete maps nothing and goes to KVM as recorded (slot 1 does not exist: KVM's EINVAL).
    assert_eq!(vm.set_region(1, 0, GPA, 0, page), Err("EINVAL".to_string()));
}

/// `BenchVm` (a code-quality audit's findings): a dirty-logged slot's id cannot be deleted or
/// made again through `set_region`, since the size the VM recorded for it sizes the bitmap
/// `KVM_GET_DIRTY_LOG` writes (re-made larger, the GET overflowed the heap); and dropping the VM
/// while the caller still holds its busy vCPU's watch stops and joins that vCPU before the
/// buffers go (the vCPU used to go on running, over memory the process had unmapped).
#[test]
fn bench_vm_keeps_its_logged_slots_and_joins_its_busy_vcpu_when_dropped() {
    if !kvm() {
        return;
    }
    use vmmu_kvm::bench::BenchVm;
    let mut vm = BenchVm::new().unwrap();
    const GPA: u64 = 4 << 30;
    vm.add_logged_slot(5, GPA, 4096).unwrap();
    assert_eq!(vm.set_region(5, 0, GPA, 0, 0), Err("EPERM".to_string()));
    assert_eq!(vm.set_region(5, 1, GPA, 2 << 20, 0), Err("EPERM".to_string()));
    assert_eq!(vm.get_dirty_log(5).map(|w| w.len()), Ok(1));
    let busy = vm.start_busy(None).expect("the vCPU is free");
    let t = std::time::Instant::now();
    while busy.adds() == 0 && !busy.finished() && t.elapsed().as_secs() < 20 {
        std::thread::yield_now();
    }
    assert!(busy.adds() > 0 && !busy.finished(), "the busy vCPU runs");
    drop(vm);
    assert!(busy.finished(), "the VM's drop stopped and joined its busy vCPU");
}
