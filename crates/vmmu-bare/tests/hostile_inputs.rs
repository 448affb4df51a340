//! Guest- and VMM-controlled values at the edges, through the entry points a bare-metal
//! hypervisor calls: none may panic (a panic on `x86_64-unknown-none` halts the machine).
use vmmu::fault::PfErr;
use vmmu::guest::GuestCpu;
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::spte::FormatKind;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{AsId, FaultAccess, Gfn, Gpa, Gva, Hva, SlotId};
use vmmu_bare::host::RAM_HVA;
use vmmu_bare::run;

const EDGES: [u64; 6] = [0, 0xfff, 1 << 46, 1 << 52, u64::MAX - 4095, u64::MAX];

#[test]
fn tdp_entry_points_take_any_value() {
    for format in [FormatKind::Ept, FormatKind::Npt] {
        let host = run::new_host();
        let mut cfg = VmConfig::new(format, 46).unwrap();
        cfg.user_va_limit = u64::MAX;
        let vm = Vm::new(cfg, host).unwrap();
        vm.set_memory_region(&UserspaceMemoryRegion::new(0, 1, 0, 2 << 20, RAM_HVA)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        v.service_requests().unwrap();
        for &x in &EDGES {
            let _ = v.handle_ept_violation(Gpa(x), FaultAccess::WRITE);
            let _ = v.handle_ept_misconfig(Gpa(x));
            let _ = v.handle_npf(Gpa(x), PfErr(u64::MAX));
            let _ = v.handle_npf(Gpa(x), PfErr(0));
            v.mark_page_dirty(Gpa(x));
            let _ = vm.gfn_to_hva(AsId(0), Gfn(x));
            let _ = vm.gfn_to_hva(AsId(u16::MAX), Gfn(x));
            let _ = vm.get_dirty_log(AsId(u16::MAX), SlotId(u16::MAX));
            let _ = vm.clear_dirty_log_all(AsId(0), SlotId(0), x, u32::MAX);
            let _ = vm.clear_dirty_log(AsId(0), SlotId(0), x & !63, 64, &[]);
            let r = UserspaceMemoryRegion::new(x as u32, x as u32, x, x, x);
            let _ = vm.set_memory_region(&r);
            let r = UserspaceMemoryRegion::new(1, 0, x & !0xfff, 4096, x & !0xfff);
            let _ = vm.set_memory_region(&r);
            let _ = vm.set_memory_region(&UserspaceMemoryRegion::new(1, 0, 0, 0, 0));
            let inv = vm.invalidate_hva_range_begin(Hva(x), Hva(x.wrapping_add(4096)));
            drop(inv);
            let _ = vm.invalidate_hva_range_begin(Hva(u64::MAX), Hva(0));
        }
        let _ = v.set_as_id(AsId(7));
        let _ = vm.set_nr_mmu_pages(usize::MAX);
        let _ = v.service_requests();
    }
}

#[test]
fn shadow_entry_points_take_any_value() {
    let host = run::new_host();
    let mut cfg = VmConfig::shadow(46).unwrap();
    cfg.user_va_limit = u64::MAX;
    let vm = Vm::new(cfg, host.clone()).unwrap();
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 1, 0, 4 << 20, RAM_HVA)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    // Garbage guest tables: every word of the first pages set.
    for off in (0..0x8000).step_by(8) {
        host.write_ram(off, u64::MAX - off);
    }
    for &x in &EDGES {
        let _ = v.set_guest_cpu(GuestCpu::long4(x, 52));
        let _ = v.set_guest_cpu(GuestCpu { maxphyaddr: x as u8, ..GuestCpu::long4(x, 46) });
        let _ = v.load_cr3(x);
        let _ = v.load_cr3(0x1000);
        let _ = v.service_requests();
        for &y in &EDGES {
            let _ = v.handle_page_fault(Gva(y), PfErr(x));
            let _ = v.invlpg(Gva(y));
            let _ = v.track_write(Gpa(y), x as u32);
            let _ = v.track_write(Gpa(y), 8);
        }
        if let Ok(g) = v.enter_guest() {
            let _ = g.walk_gva(Gva(x), vmmu::Access::ALL);
        }
    }
}
