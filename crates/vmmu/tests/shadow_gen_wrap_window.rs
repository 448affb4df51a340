//! The shadow MMU's side of `mmio_gen_wrap_window.rs`: a fault in the window of the update that
//! wraps the MMIO generation (after the wrap zap, before the final generation is stored) must not
//! install an MMIO SPTE. Such an SPTE would carry the old generation's bits (the in-progress
//! generation's counter is the old one), survive the wrap zap, and match again `2^19`
//! generations later (`2^18` updates per address space with two), when the guest-physical page
//! behind the GVA has been RAM for a long time: the guest's read of RAM would be emulated as
//! MMIO. The shadow fault path emulates without installing while the set is in progress.
//!
//! Deterministic and single-threaded: the vCPU's fault runs inside the update, at the
//! `MmioWrapZapped` probe point (`Vm::set_memory_region_probed`).
#![cfg(not(loom))]

mod common;

use common::shadow::*;
use std::cell::RefCell;
use vmmu::fault::EmulateSource;
use vmmu::memslot::{UserspaceMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
use vmmu::vm::UpdateProbe;
use vmmu::{AsId, Gpa};

/// The GVA the guest maps to `X`.
const GVA: u64 = 0x7000_0000;
/// A guest-physical page with no slot first (MMIO), RAM later.
const X: u64 = MMIO_GPA + 0x5000;
/// Where slot 2 (the RAM that later backs `X`) lives in the host: inside the test host's RAM.
const X_HVA: u64 = RAM_HVA + RAM_SIZE - 0x1000;
/// An unrelated slot whose flag toggles are the updates that advance the generation.
const DUMMY_GPA: u64 = 0x2_0000_0000;
const DUMMY_HVA: u64 = RAM_HVA + RAM_SIZE - 0x2000;

fn dummy(flags: u32) -> UserspaceMemoryRegion {
    UserspaceMemoryRegion::new(1, flags, DUMMY_GPA, 0x1000, DUMMY_HVA)
}

#[test]
fn no_shadow_mmio_spte_from_the_wrap_window_matches_after_a_full_cycle() {
    wrap_window(1);
}

#[test]
fn the_same_with_two_address_spaces() {
    wrap_window(2);
}

fn wrap_window(nr_as: u16) {
    // `shadow_vm_with` creates slot 0 (one update); the update after that one wraps.
    let (vm, host, next) = shadow_vm_with(|cfg| {
        cfg.nr_address_spaces = nr_as;
        cfg.generation_base = (1 << 19) - 2 * u64::from(nr_as);
    });
    let s = Space::new(&host, &next);
    s.map4k(GVA, X, P | RW | US);
    let v = RefCell::new(vcpu_in(&vm, long4(s.cr3)));
    // The vCPU has a root before the wrap (the wrap zap makes it obsolete).
    assert_eq!(access(&mut v.borrow_mut(), GVA, false), mmio_seen());
    let installed = std::cell::Cell::new(None);
    vm.set_memory_region_probed(&dummy(0), &|p| {
        if p == UpdateProbe::MmioWrapZapped {
            let gen = vm.memslots().generation(AsId(0)).unwrap();
            assert!(gen.in_progress(), "setup: the wrap update is in progress: {gen:?}");
            // The vCPU drops its obsolete root, loads a new one and faults on the GVA, whose
            // guest PTE names X, which has no slot.
            installed.set(Some(access(&mut v.borrow_mut(), GVA, false)));
        }
    })
    .unwrap();
    assert_eq!(installed.get(), Some(mmio_seen()), "setup: the vCPU faulted in the window");
    assert_eq!(vm.stats().mmio_gen_wraps, 1, "setup: the update wrapped");
    let after = vm.memslots().generation(AsId(0)).unwrap();

    // X becomes RAM (a create zaps nothing: it relies on the generation); nothing touches the
    // GVA while the generation goes round, with no second wrap.
    vm.set_memory_region(&UserspaceMemoryRegion::new(2, 0, X, 0x1000, X_HVA)).unwrap();
    let target = (1u64 << 20) - u64::from(nr_as);
    let mut on = false;
    while vm.memslots().generation(AsId(0)).unwrap().raw() < target {
        on = !on;
        vm.set_memory_region(&dummy(if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })).unwrap();
    }
    assert_eq!(vm.stats().mmio_gen_wraps, 1, "no second wrap yet");
    let now = vm.memslots().generation(AsId(0)).unwrap();

    // The guest reads the GVA, whose page has been RAM for `2^19 / nr_as` updates.
    let seen = access(&mut v.borrow_mut(), GVA, false);
    assert_eq!(
        seen,
        Seen::Ram(ram_pfn(X_HVA - RAM_HVA)),
        "VIOLATION: a read of gva {GVA:#x} -> gpa {X:#x} (RAM, slot 2, created {} updates ago) \
         is not served from its RAM",
        (now.raw() - after.raw()) / u64::from(nr_as)
    );
}

fn mmio_seen() -> Seen {
    Seen::Mmio(Gpa(X), EmulateSource::SlowPathMmio)
}
