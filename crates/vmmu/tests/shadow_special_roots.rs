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
