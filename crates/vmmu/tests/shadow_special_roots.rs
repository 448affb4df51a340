//! Special roots (a PAE guest's, or one without paging): they have no shadow page of their own
//! and every special root of a vCPU lives in the vCPU's one `pae_root` frame, rewritten in
//! place at each load. What was keyed by that frame must not outlive the root that filled it.
#![cfg(not(loom))]

mod common;

use common::shadow::*;
use std::cell::Cell;
use vmmu::bugs::BugSet;
use vmmu::fault::EmulateSource;
use vmmu::guest::{GuestCpu, PagingMode};
use vmmu::testing::TestHost;
use vmmu::{Gpa, Gva};

/// A PAE table tree (PDPT -> PD -> PT) mapping `gva`, in the first GiB, to `target`; returns
/// the PDPT's address (the CR3).
fn pae_space(host: &TestHost, next: &Cell<u64>, gva: u64, target: u64) -> u64 {
    let (pdpt, pd, pt) = (alloc_table(next), alloc_table(next), alloc_table(next));
    host.write_u64(RAM_HVA + pdpt, pd | P);
    host.write_u64(RAM_HVA + pd + 8 * ((gva >> 21) & 511), pt | P | RW | US);
    host.write_u64(RAM_HVA + pt + 8 * ((gva >> 12) & 511), target | P | RW | US);
    pdpt
}

fn pae() -> GuestCpu {
    GuestCpu { mode: PagingMode::Pae { pdptrs: [0; 4] }, ..long4(0) }
}

/// Two PAE address spaces map one GVA to two device pages. The fast MMIO path's leaf-table
/// cache is keyed by the root frame; after a CR3 switch the new special root is in the same
/// frame, so an entry the old space filled would answer the RSVD fault with the old space's
/// MMIO SPTE: an exit at the other device's address.
#[test]
fn after_a_pae_cr3_switch_an_mmio_exit_names_the_new_spaces_device() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    const GVA: u64 = 0x40_3000;
    let (m1, m2) = (MMIO_GPA, MMIO_GPA + 0x5000);
    let a = pae_space(&host, &next, GVA, m1);
    let b = pae_space(&host, &next, GVA, m2);
    let mut v = vm.create_vcpu().unwrap();
    v.set_guest_cpu(pae()).unwrap();
    for _ in 0..2 {
        for (cr3, dev) in [(a, m1), (b, m2)] {
            v.load_cr3(cr3).unwrap();
            let first = access(&mut v, GVA, false);
            assert!(matches!(first, Seen::Mmio(g, _) if g == Gpa(dev)), "{first:?}");
            // Drop the GVA from the MMIO cache: the next access goes through the MMIO SPTE.
            v.invlpg(Gva(GVA)).unwrap();
            assert_eq!(
                access(&mut v, GVA, false),
                Seen::Mmio(Gpa(dev), EmulateSource::MmioSpteHit),
                "space at {cr3:#x} maps {GVA:#x} to {dev:#x}"
            );
        }
    }
}

/// The same through a mode change: a guest without paging (identity, direct pages) and then a
/// PAE guest, both in the `pae_root` frame.
#[test]
fn after_paging_is_turned_on_an_mmio_exit_names_the_translated_device() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    // Without paging GVA = GPA: MMIO_GPA lies above 4 GiB, out of reach; use a device below it
    // that the PAE space maps elsewhere. GPA 0xc000_0000 has no slot.
    const LOW_DEV: u64 = 0xc000_0000;
    let pdpt = {
        let (pdpt, pd, pt) = (alloc_table(&next), alloc_table(&next), alloc_table(&next));
        // GVA 0xc000_0000 (PDPTE 3) -> MMIO_GPA.
        host.write_u64(RAM_HVA + pdpt + 24, pd | P);
        host.write_u64(RAM_HVA + pd, pt | P | RW | US);
        host.write_u64(RAM_HVA + pt, MMIO_GPA | P | RW | US);
        pdpt
    };
    let mut v = vm.create_vcpu().unwrap();
    let off = GuestCpu { mode: PagingMode::NonPaging, ..long4(0) };
    v.set_guest_cpu(off).unwrap();
    assert!(matches!(access(&mut v, LOW_DEV, false), Seen::Mmio(g, _) if g == Gpa(LOW_DEV)));
    v.invlpg(Gva(LOW_DEV)).unwrap();
    assert_eq!(
        access(&mut v, LOW_DEV, false),
        Seen::Mmio(Gpa(LOW_DEV), EmulateSource::MmioSpteHit)
    );
    v.set_guest_cpu(pae()).unwrap();
    v.load_cr3(pdpt).unwrap();
    let first = access(&mut v, LOW_DEV, false);
    assert!(matches!(first, Seen::Mmio(g, _) if g == Gpa(MMIO_GPA)), "{first:?}");
    v.invlpg(Gva(LOW_DEV)).unwrap();
    assert_eq!(
        access(&mut v, LOW_DEV, false),
        Seen::Mmio(Gpa(MMIO_GPA), EmulateSource::MmioSpteHit)
    );
}

/// A PAE PDPTE naming a page directory outside every memslot (a device frame the guest also
/// maps as data): KVM leaves the special root's entry 0 for it (shadow facts 6.1), so no shadow
/// page write-tracks the device and a store to it is a plain MMIO exit. Had the root built a
/// page for it, the store would come back as a write to a shadowed table ("emulate into RAM")
/// at a gpa that has no RAM.
#[test]
fn a_pdpte_naming_a_device_frame_does_not_write_protect_the_device() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    const GVA: u64 = 0x40_3000;
    let pdpt = pae_space(&host, &next, GVA, MMIO_GPA);
    host.write_u64(RAM_HVA + pdpt + 8, MMIO_GPA | P); // PDPTE 1: a "directory" in MMIO
    let mut v = vm.create_vcpu().unwrap();
    v.set_guest_cpu(pae()).unwrap();
    v.load_cr3(pdpt).unwrap();
    let read = access(&mut v, GVA, false);
    assert_eq!(read, Seen::Mmio(Gpa(MMIO_GPA), EmulateSource::SlowPathMmio));
    let write = access(&mut v, GVA, true);
    assert!(
        matches!(write, Seen::Mmio(g, s) if g == Gpa(MMIO_GPA) && s != EmulateSource::WriteProtected),
        "a store to a device page is an MMIO exit, seen {write:?}"
    );
    // Under PDPTE 1 the guest's walk fails at the directory (outside guest memory): a
    // not-present #PF, as KVM's walker gives for an invisible table.
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::GuestPf(vmmu::fault::PfErr::USER));
}

/// The directory a PDPTE names comes into guest memory after the root was built (a slot is
/// created over it): the root's entry for it is 0, and the fault through it rebuilds the root
/// instead of retrying for ever.
#[test]
fn a_pdpte_table_that_comes_into_guest_memory_later_translates() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    const LATE: u64 = 0x2_0000_0000; // a gpa no slot holds yet
    const LATE_HVA: u64 = RAM_HVA + (48 << 20); // inside the test host's RAM buffer
    let pdpt = pae_space(&host, &next, 0x40_3000, MMIO_GPA);
    // PDPTE 1 -> a directory at LATE, which maps GVA 0x4000_0000 through a PT in RAM.
    let pt = alloc_table(&next);
    host.write_u64(RAM_HVA + pdpt + 8, LATE | P);
    host.write_u64(LATE_HVA, pt | P | RW | US);
    host.write_u64(RAM_HVA + pt, 0x20_0000 | P | RW | US);
    let mut v = vm.create_vcpu().unwrap();
    v.set_guest_cpu(pae()).unwrap();
    v.load_cr3(pdpt).unwrap();
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::GuestPf(vmmu::fault::PfErr::USER));
    let late = vmmu::memslot::UserspaceMemoryRegion::new(1, 0, LATE, 2 << 20, LATE_HVA);
    vm.set_memory_region(&late).unwrap();
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
}

/// A 4-level CR3 outside guest memory (KVM v6.6's dummy root): no shadow page shadows it, so a
/// store to that device frame from a vCPU whose tables map it is a plain MMIO exit; once a slot
/// covers the frame the vCPU with that CR3 translates through it.
#[test]
fn a_4level_cr3_outside_guest_memory_does_not_write_protect_the_frame() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    const LATE: u64 = 0x2_0000_0000;
    const LATE_HVA: u64 = RAM_HVA + (48 << 20);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, LATE, P | RW | US); // vCPU w maps the frame as data
    let mut odd = vcpu_in(&vm, long4(LATE)); // vCPU odd's CR3 is that frame
    assert_eq!(access(&mut odd, 0x4000_0000, false), Seen::GuestPf(vmmu::fault::PfErr::USER));
    let mut w = vcpu_in(&vm, long4(s.cr3));
    // A read first: its MMIO SPTE lacks W (the gPTE is clean), so the store takes the slow
    // path with a present error code, where a write-tracked frame would be answered.
    let read = access(&mut w, 0x4000_0000, false);
    assert_eq!(read, Seen::Mmio(Gpa(LATE), EmulateSource::SlowPathMmio));
    let store = access(&mut w, 0x4000_0000, true);
    assert!(
        matches!(store, Seen::Mmio(g, src) if g == Gpa(LATE) && src != EmulateSource::WriteProtected),
        "{store:?}"
    );
    // The frame becomes guest memory holding a PML4: GVA 0x4000_0000 -> RAM 0x20_0000.
    let (pdpt, pd, pt) = (alloc_table(&next), alloc_table(&next), alloc_table(&next));
    host.write_u64(LATE_HVA, pdpt | P | RW | US);
    host.write_u64(RAM_HVA + pdpt + 8, pd | P | RW | US);
    host.write_u64(RAM_HVA + pd, pt | P | RW | US);
    host.write_u64(RAM_HVA + pt, 0x20_0000 | P | RW | US);
    let late = vmmu::memslot::UserspaceMemoryRegion::new(1, 0, LATE, 2 << 20, LATE_HVA);
    vm.set_memory_region(&late).unwrap();
    assert_eq!(access(&mut odd, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
}

/// A 4-level guest whose CR3 lies outside guest memory on a host with no frame left below
/// 4 GiB for the empty special root: it still gets a root (a page, as before special roots had
/// this use), so its accesses are guest page faults, not a failed root load.
#[test]
fn a_4level_cr3_outside_guest_memory_without_low_frames_still_runs() {
    let (vm, host, next) = shadow_vm_with(|c| c.max_vcpus = vmmu::testing::LOW_TABLES + 1);
    let pdpt = pae_space(&host, &next, 0x40_3000, 0x20_0000);
    // Every low frame of the test host goes to a PAE vCPU's special root.
    let mut pae_vcpus = Vec::new();
    for _ in 0..vmmu::testing::LOW_TABLES {
        let mut v = vm.create_vcpu().unwrap();
        v.set_guest_cpu(pae()).unwrap();
        v.load_cr3(pdpt).unwrap();
        assert_eq!(access(&mut v, 0x40_3000, false), Seen::Ram(ram_pfn(0x20_0000)));
        pae_vcpus.push(v);
    }
    let mut odd = vcpu_in(&vm, long4(0x2_0000_0000));
    assert_eq!(access(&mut odd, 0x4000_0000, false), Seen::GuestPf(vmmu::fault::PfErr::USER));
}
