use std::sync::Arc;
use vmmu::{FaultAccess, Gpa};
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu_sim::host::{HostConfig, SimHost};
fn main() {
    let host = Arc::new(SimHost::new(HostConfig { phys_bits: 46, max_frames: 1 << 20 }).unwrap());
    let buf = host.add_buffer("ram", 256 << 20).unwrap();
    buf.fill_words(|o| o);
    let mut c = vmmu::vm::VmConfig::new(vmmu::spte::FormatKind::Ept, 46).unwrap();
    c.max_vcpus = 1;
    let vm = vmmu::vm::Vm::new(c, host.clone()).unwrap();
    vm.set_memory_region(&UserspaceMemoryRegion { slot: 1, flags: 0, guest_phys_addr: 1 << 32, memory_size: 254 << 20, userspace_addr: buf.hva().raw() + 4096 }).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    let t = std::time::Instant::now();
    let mut n = 0;
    for p in 0..(254u64 << 8) {
        if let Ok(vmmu::fault::FaultOutcome::Fixed) = v.handle_ept_violation(Gpa((1 << 32) + p * 4096), FaultAccess::WRITE) { n += 1; }
    }
    println!("{n} faults in {:?}", t.elapsed());
}
