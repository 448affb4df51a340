//! `Vcpu::unprotect_gfn` (KVM `kvm_mmu_unprotect_gfn_and_retry`) where a shadow page of the
//! frame is special: a PAE page directory the special root pins, the root frame itself, a table
//! another vCPU translates through from guest mode, a table in a dirty-logged slot, a table whose
//! entry was cached as MMIO by two vCPUs. In each the guest's untracked edit after the unprotect
//! must be what the next access sees (review 57d; the basic case is in `shadow_mmu.rs`).
#![cfg(not(loom))]
mod common;
use common::shadow::*;
use vmmu::bugs::BugSet;
use vmmu::fault::EmulateSource;
use vmmu::guest::{GuestCpu, PagingMode};
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::{Gpa, Gva};

/// The guest stores through gva `at` into the guest table entry at `entry_gpa`: the store traps
/// (the table is shadowed), the hypervisor unprotects the table's frame and re-enters, and the
/// retried store either goes through untrapped (to the table's frame) or traps again (the
/// store's own translation walks the table), in which case the hypervisor emulates it. The
/// guest's entry then holds `new_entry`. Returns what the retried store saw.
fn store_after_unprotect(
    v: &mut vmmu::vcpu::Vcpu<vmmu::testing::TestHost>,
    host: &vmmu::testing::TestHost,
    at: u64,
    entry_gpa: u64,
    new_entry: u64,
) -> Seen {
    let trapped = Seen::Mmio(Gpa(entry_gpa), EmulateSource::WriteProtected);
    assert_eq!(access(v, at, true), trapped);
    assert_eq!(v.unprotect_gfn(Gpa(entry_gpa).gfn()), Ok(true));
    let retried = access(v, at, true);
    host.write_u64(RAM_HVA + entry_gpa, new_entry);
    if retried == trapped {
        v.track_write(Gpa(entry_gpa), 8).unwrap();
    } else {
        assert_eq!(retried, Seen::Ram(ram_pfn(entry_gpa & !0xfff)));
    }
    retried
}

/// PAE: the PD of PDPTE 0 (pinned by the special root) is unprotected; the guest rewrites a PDE
/// untrapped (or emulated if it traps again); the access must follow the guest's tables.
#[test]
fn a_pae_page_directory_the_special_root_pins_is_unprotected() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let t = || alloc_table(&next);
    let (pdpt, pd, pt, pd1, pt1, pt3) = (t(), t(), t(), t(), t(), t());
    host.write_u64(RAM_HVA + pdpt, pd | P);
    host.write_u64(RAM_HVA + pdpt + 8, pd1 | P);
    host.write_u64(RAM_HVA + pd + 8 * 2, pt | P | RW | US);
    host.write_u64(RAM_HVA + pt + 8 * 3, 0x20_0000 | P | RW | US);
    // gva 0x4000_0000 (PDPTE 1) maps the PD frame.
    host.write_u64(RAM_HVA + pd1, pt1 | P | RW | US);
    host.write_u64(RAM_HVA + pt1, pd | P | RW | US);
    host.write_u64(RAM_HVA + pt3 + 8 * 3, 0x30_0000 | P | RW | US);
    let mut v = vm.create_vcpu().unwrap();
    v.set_guest_cpu(GuestCpu { mode: PagingMode::Pae { pdptrs: [0; 4] }, ..long4(0) }).unwrap();
    v.load_cr3(pdpt).unwrap();
    assert_eq!(access(&mut v, 0x40_3000, false), Seen::Ram(ram_pfn(0x20_0000)));
    let retried =
        store_after_unprotect(&mut v, &host, 0x4000_0000 + 8 * 2, pd + 16, pt3 | P | RW | US);
    v.invlpg(Gva(0x40_3000)).unwrap();
    assert_eq!(
        access(&mut v, 0x40_3000, false),
        Seen::Ram(ram_pfn(0x30_0000)),
        "retried {retried:?}"
    );
}

/// Two vCPUs share a space; vCPU 1 is in guest mode with a shadow path through the PT that
/// vCPU 0 unprotects: it must be made to flush before it walks again, and its walk must not
/// translate through the zapped page.
#[test]
fn another_vcpu_in_guest_mode_stops_translating_through_the_unprotected_table() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let pte_gpa = map_with_own_table(&s, 0x20_0000);
    let table_gpa = pte_gpa & !0xfff;
    let mut v0 = vcpu_in(&vm, long4(s.cr3));
    let mut v1 = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v0, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(access(&mut v1, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    let at = 0x5000_0000 + (pte_gpa & 0xfff);
    assert_eq!(access(&mut v0, at, true), Seen::Mmio(Gpa(pte_gpa), EmulateSource::WriteProtected));
    v1.service_requests().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        v1.enter_guest_mode().unwrap();
        tx.send(()).unwrap();
        let start = std::time::Instant::now();
        while !v1.requests_pending() {
            assert!(start.elapsed().as_secs() < 10, "never asked to leave");
            std::hint::spin_loop();
        }
        // The kick: the hardware leaves guest mode; what does the shadow say now?
        let w = v1.walk_gva(Gva(0x4000_0000), vmmu::Access::USER);
        v1.exit_guest_mode();
        (v1, w)
    });
    rx.recv().unwrap();
    assert_eq!(v0.unprotect_gfn(Gpa(pte_gpa).gfn()), Ok(true));
    let (mut v1, w) = h.join().unwrap();
    assert!(!matches!(w, vmmu::tdp::HwWalk::Translated { .. }), "{w:?}");
    assert_eq!(access(&mut v0, at, true), Seen::Ram(ram_pfn(table_gpa)));
    host.write_u64(RAM_HVA + pte_gpa, 0x30_0000 | P | RW | US);
    v0.invlpg(Gva(0x4000_0000)).unwrap();
    v1.invlpg(Gva(0x4000_0000)).unwrap();
    assert_eq!(access(&mut v1, 0x4000_0000, false), Seen::Ram(ram_pfn(0x30_0000)));
    assert_eq!(access(&mut v0, 0x4000_0000, false), Seen::Ram(ram_pfn(0x30_0000)));
}

/// Dirty logging on the slot holding the table: the retried (untrapped) write must be logged.
#[test]
fn the_untrapped_write_after_an_unprotect_is_in_the_dirty_log() {
    use vmmu::memslot::KVM_MEM_LOG_DIRTY_PAGES;
    use vmmu::{AsId, SlotId};
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let pte_gpa = map_with_own_table(&s, 0x20_0000);
    let table_gpa = pte_gpa & !0xfff;
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    let logged = UserspaceMemoryRegion::new(0, KVM_MEM_LOG_DIRTY_PAGES, 0, RAM_SIZE, RAM_HVA);
    vm.set_memory_region(&logged).unwrap();
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    let at = 0x5000_0000 + (pte_gpa & 0xfff);
    assert_eq!(access(&mut v, at, true), Seen::Mmio(Gpa(pte_gpa), EmulateSource::WriteProtected));
    let _ = vm.get_dirty_log(AsId(0), SlotId(0)).unwrap();
    assert_eq!(v.unprotect_gfn(Gpa(pte_gpa).gfn()), Ok(true));
    assert_eq!(access(&mut v, at, true), Seen::Ram(ram_pfn(table_gpa)));
    host.write_u64(RAM_HVA + pte_gpa, 0x30_0000 | P | RW | US);
    let dirty: Vec<u64> =
        vmmu::dirty::pages_of(&vm.get_dirty_log(AsId(0), SlotId(0)).unwrap()).collect();
    assert!(
        dirty.contains(&(table_gpa >> 12)),
        "table gfn {:#x} not in {dirty:x?}",
        table_gpa >> 12
    );
    // After the GET the table is write-protected for logging; walking it shadows it again.
    v.invlpg(Gva(0x4000_0000)).unwrap();
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x30_0000)));
    assert_eq!(access(&mut v, at, true), Seen::Mmio(Gpa(pte_gpa), EmulateSource::WriteProtected));
}

/// The root (PML4) frame is unprotected while in use; the guest then rewrites a PML4 entry
/// (untrapped, or emulated on the second trap), and the walk must follow.
#[test]
fn the_root_frame_in_use_is_unprotected() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, 0x20_0000, P | RW | US);
    s.map4k(0x5000_0000, s.cr3, P | RW | US);
    let s2 = Space::new(&host, &next);
    s2.map4k(0x4000_0000, 0x30_0000, P | RW | US);
    let pml4e_new = s2.read(s2.cr3);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    let retried = store_after_unprotect(&mut v, &host, 0x5000_0000, s.cr3, pml4e_new);
    v.invlpg(Gva(0x4000_0000)).unwrap();
    assert_eq!(
        access(&mut v, 0x4000_0000, false),
        Seen::Ram(ram_pfn(0x30_0000)),
        "retried {retried:?}"
    );
}

/// MMIO: the PT maps gva X to MMIO (cached in an MMIO SPTE and the GVA cache); the table is
/// unprotected and the PTE rewritten to RAM untrapped, then INVLPG: RAM must be seen, by the
/// vCPU and another one that had the MMIO SPTE.
#[test]
fn a_gpte_cached_as_mmio_rewritten_to_ram_after_an_unprotect() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let pte_gpa = map_with_own_table(&s, MMIO_GPA);
    s.map4k(0x4000_1000, 0x20_0000, P | RW | US);
    let table_gpa = pte_gpa & !0xfff;
    let mut v0 = vcpu_in(&vm, long4(s.cr3));
    let mut v1 = vcpu_in(&vm, long4(s.cr3));
    for v in [&mut v0, &mut v1] {
        assert!(matches!(access(v, 0x4000_0000, false), Seen::Mmio(Gpa(g), _) if g == MMIO_GPA));
        assert!(matches!(access(v, 0x4000_0000, false), Seen::Mmio(Gpa(g), _) if g == MMIO_GPA));
    }
    let at = 0x5000_0000 + (pte_gpa & 0xfff);
    assert_eq!(access(&mut v0, at, true), Seen::Mmio(Gpa(pte_gpa), EmulateSource::WriteProtected));
    assert_eq!(v0.unprotect_gfn(Gpa(pte_gpa).gfn()), Ok(true));
    assert_eq!(access(&mut v0, at, true), Seen::Ram(ram_pfn(table_gpa)));
    host.write_u64(RAM_HVA + pte_gpa, 0x30_0000 | P | RW | US);
    v0.invlpg(Gva(0x4000_0000)).unwrap();
    v1.invlpg(Gva(0x4000_0000)).unwrap();
    assert_eq!(access(&mut v0, 0x4000_0000, false), Seen::Ram(ram_pfn(0x30_0000)));
    assert_eq!(access(&mut v1, 0x4000_0000, false), Seen::Ram(ram_pfn(0x30_0000)));
}
