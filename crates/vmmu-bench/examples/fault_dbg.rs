use std::sync::Arc;
use vmmu::{FaultAccess, Gpa};
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu_sim::host::{HostConfig, SimHost};
fn main() {
    let host = Arc::new(SimHost::new(HostConfig { phys_bits: 46, max_frames: 1 << 20 }).unwrap());
    let buf = host.add_buffer("ram", 256 << 20).unwrap();
    if std::env::args().count() > 1 { buf.fill_words(|o| o); }
    let mut c = vmmu::vm::VmConfig::new(vmmu::spte::FormatKind::Ept, 46).unwrap();
    c.max_vcpus = 1;
    let vm = vmmu::vm::Vm::new(c, host.clone()).unwrap();
    for (gpa, off, size) in [(1u64 << 32, 4096u64, (254u64) << 20), (2u64 << 32, 0, 256 << 20)] {
        vm.set_memory_region(&UserspaceMemoryRegion { slot: (gpa >> 32) as u32, flags: 0, guest_phys_addr: gpa, memory_size: size, userspace_addr: buf.hva().raw() + off }).unwrap();
    }
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    for g in [1u64 << 32, (1 << 32) + 4096, 2 << 32, (2 << 32) + (2 << 20)] {
        println!("{g:#x}: {:?}", v.handle_ept_violation(Gpa(g), FaultAccess::WRITE));
        println!("{g:#x}: {:?}", v.handle_ept_violation(Gpa(g), FaultAccess::WRITE));
    }
    vm.set_memory_region(&UserspaceMemoryRegion { slot: 1, flags: 0, guest_phys_addr: 1 << 32, memory_size: 0, userspace_addr: 0 }).unwrap();
    vm.reclaim();
    vm.set_memory_region(&UserspaceMemoryRegion { slot: 1, flags: 0, guest_phys_addr: 1 << 32, memory_size: 254 << 20, userspace_addr: buf.hva().raw() + 4096 }).unwrap();
    println!("pending {}", v.requests_pending());
    v.service_requests().unwrap();
    for g in [1u64 << 32, (1 << 32) + 4096] {
        println!("{g:#x}: {:?}", v.handle_ept_violation(Gpa(g), FaultAccess::WRITE));
    }
    println!("{:?}", v.stats);
}
