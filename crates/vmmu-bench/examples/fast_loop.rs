use vmmu::{FaultAccess, Gpa};
fn main() {
    let host = std::sync::Arc::new(vmmu_sim::host::SimHost::new(vmmu_sim::host::HostConfig { phys_bits: 46, max_frames: 1 << 16 }).unwrap());
    let mut c = vmmu::vm::VmConfig::new(vmmu::spte::FormatKind::Ept, 46).unwrap();
    c.max_vcpus = 1;
    let vm = vmmu::vm::Vm::new(c, host).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    let (a, b) = (Gpa(1 << 32), Gpa((1 << 32) + 4096));
    v.handle_ept_violation(a, FaultAccess::READ).unwrap();
    v.handle_ept_violation(b, FaultAccess::READ).unwrap();
    for i in 0..1_000_000u32 {
        std::hint::black_box(v.handle_ept_misconfig(if i & 1 == 0 { a } else { b })).unwrap();
    }
    println!("{}", v.stats.mmio_spte_hits);
}
