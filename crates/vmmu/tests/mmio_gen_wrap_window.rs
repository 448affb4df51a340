//! An MMIO SPTE must not be installed in the window of the update that wraps the MMIO generation
//! (after the wrap hook's zap-all, before the final generation is stored): the in-progress
//! generation's counter is the old one, so such an SPTE would carry the old generation's bits,
//! survive the wrap zap, and match again `2^19` generations later, where the gfn has been RAM
//! for a long time (found by a concurrency audit; KVM's `make_mmio_spte` has the same window).
//! The fault paths now emulate without installing an SPTE while the set is in progress.
//!
//! Deterministic: no timing. vCPU B sits in guest mode (holding a table read section), so the wrap
//! hook's `zap_all_fast` -> `reclaim` waits in its table grace period (after the zap and its
//! write-locked section) until B leaves; vCPU A faults on X in exactly that window.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vmmu::fault::{EmulateSource, FaultOutcome};
use vmmu::memslot::{UserspaceMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
use vmmu::spte::FormatKind;
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, AsId, FaultAccess, Gpa};

/// The gfn's address: MMIO first, RAM later.
const X: u64 = 0x70_0000;
const RAM_HVA: u64 = 0x4000_0000;
const DUMMY_HVA: u64 = 0x8000_0000;
const DUMMY_GPA: u64 = 0x1000_0000;

#[test]
fn no_mmio_spte_from_the_wrap_window_matches_after_a_full_cycle() {
    wrap_window(1);
}

/// The default configuration (two address spaces, as x86 with SMM): `2^18` updates.
#[test]
fn the_same_with_two_address_spaces() {
    wrap_window(2);
}

fn wrap_window(nr_as: u16) {
    let host = Arc::new(TestHost::new(64));
    host.map(RAM_HVA, 0x1000, 0x4_0000, vmmu::Level::L4K, true);
    host.map(DUMMY_HVA, 0x1000, 0x5_0000, vmmu::Level::L4K, true);
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.nr_address_spaces = nr_as;
    cfg.max_vcpus = 4;
    // The next update's final generation is 2^19: its wrap hook zaps everything.
    cfg.generation_base = (1 << 19) - u64::from(nr_as);
    let vm = Arc::new(Vm::new(cfg, host.clone()).unwrap());

    // A root nobody uses (vCPU A made it, then switched to a pageless root): the wrap zap retires
    // it, so its `reclaim` has a page to free and waits for a table grace period.
    let mut a = vm.create_vcpu().unwrap();
    a.service_requests().unwrap();
    a.load_pageless_root().unwrap();
    a.service_requests().unwrap();
    // vCPU B in guest mode on a pageless root of its own (so the retired root has no user).
    let mut b = vm.create_vcpu().unwrap();
    b.load_pageless_root().unwrap();
    b.service_requests().unwrap();
    b.enter_guest_mode().expect("B enters guest mode");
    assert_eq!(vm.tdp().expect("a TDP VM").nr_roots(), 3);

    let release_b = Arc::new(AtomicBool::new(false));
    let tb = {
        let release_b = release_b.clone();
        std::thread::spawn(move || {
            while !release_b.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
            b.exit_guest_mode();
            b
        })
    };
    // The update that wraps the MMIO generation: an unrelated slot.
    let tu = {
        let vm = vm.clone();
        std::thread::spawn(move || {
            vm.set_memory_region(&UserspaceMemoryRegion::new(1, 0, DUMMY_GPA, 0x1000, DUMMY_HVA))
                .unwrap();
        })
    };
    // Wait until the wrap zap's reclaim is in its grace period: its nudge kicks B (the zap's
    // free-obsolete-roots request kicked B once before).
    while host.kicks() < 2 {
        std::thread::yield_now();
    }
    let gen = vm.memslots().generation(AsId(0)).unwrap();
    assert!(gen.in_progress(), "setup: the wrap update is still in progress: {gen:?}");
    assert_eq!(
        vm.tdp().expect("a TDP VM").nr_roots(),
        2,
        "setup: the wrap zap retired the unused root"
    );
    // A drops its pageless root (a free-obsolete-roots request is pending) and loads a new,
    // valid root; then an access to X, which has no slot: an MMIO SPTE is installed.
    a.service_requests().unwrap();
    let o = a.handle_ept_violation(Gpa(X), FaultAccess::READ).unwrap();
    assert!(
        matches!(o, FaultOutcome::Emulate { source: EmulateSource::SlowPathMmio, .. }),
        "setup: {o:?}"
    );
    println!("A installed an MMIO SPTE for X under generation {gen:?} (after the wrap zap)");
    release_b.store(true, Ordering::Release);
    tu.join().unwrap();
    let _b = tb.join().unwrap();
    let after = vm.memslots().generation(AsId(0)).unwrap();
    println!("wrap update done: generation {after:?}, wraps {}", vm.stats().mmio_gen_wraps);

    // X becomes RAM. Nothing accesses X from now on; other updates go on (dirty logging of the
    // unrelated slot toggled), none of them zaps, none wraps, until the generation's MMIO bits
    // are those of the generation the SPTE carries.
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, X, 0x1000, RAM_HVA)).unwrap();
    let target = (1u64 << 20) - u64::from(nr_as);
    let mut on = false;
    while vm.memslots().generation(AsId(0)).unwrap().raw() < target {
        on = !on;
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        vm.set_memory_region(&UserspaceMemoryRegion::new(1, flags, DUMMY_GPA, 0x1000, DUMMY_HVA))
            .unwrap();
    }
    let now = vm.memslots().generation(AsId(0)).unwrap();
    println!(
        "generation now {now:?}; X has been RAM (slot 0) for {} updates of its address space",
        (now.raw() - after.raw()) / u64::from(nr_as)
    );
    assert_eq!(vm.stats().mmio_gen_wraps, 1, "no second wrap yet");

    // The guest reads X, which is RAM.
    let work = a.service_requests().unwrap();
    assert!(a.root().is_some_and(|r| !r.is_obsolete()), "A keeps its valid root: {work:?}");
    let walk = a.enter_guest().unwrap().walk(Gpa(X), Access::NONE);
    println!("hardware walk of X: {walk:?}");
    if matches!(walk, HwWalk::Misconfig { .. }) {
        let o = a.handle_ept_misconfig(Gpa(X)).unwrap();
        println!("EPT misconfig exit at X: {o:?}");
        assert!(
            !matches!(o, FaultOutcome::Emulate { .. }),
            "VIOLATION: a read of RAM gpa {X:#x} (slot 0, created {} updates ago) is emulated as \
             MMIO: {o:?}",
            (now.raw() - after.raw()) / u64::from(nr_as)
        );
    }
}
