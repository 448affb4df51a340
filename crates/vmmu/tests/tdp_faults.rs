//! The TDP MMU's fault paths, one test per outcome and per emulation source, the two errors, and
//! the zap/flush/obsolete-root machinery (issue 4, point 8). Each test drives a VM on the test
//! host through `common::access`, which walks the tables like the hardware.
#![cfg(not(loom))] // std threads and atomics: loom types only work inside a model

mod catchers;
mod common;

use common::{access, region, vm, vm_with, Seen, RAM_HVA};
use vmmu::fault::{EmulateSource, FaultError, FaultOutcome};
use vmmu::memslot::{KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use vmmu::spte::{FormatKind, SpteFormat};
use vmmu::stats::RetryCause;
use vmmu::vm::VmConfig;
use vmmu::{Gfn, Gpa, Level, Pfn};

const FORMATS: [FormatKind; 3] =
    [FormatKind::Ept, FormatKind::Npt, FormatKind::NptSev { c_bit: 47 }];

#[test]
fn ram_fault_is_fixed_then_translates_then_spurious() {
    for f in FORMATS {
        let (vm, _h) = vm(f);
        vm.set_memory_region(&region(0, 0x10_0000, 0x10_0000, RAM_HVA, 0)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        let (seen, faults) = access(&mut v, 0x10_3008, false).unwrap();
        assert_eq!(seen, Seen::Ram(Pfn((RAM_HVA >> 12) + 3)), "{f:?}");
        assert_eq!(faults, vec![FaultOutcome::Fixed], "{f:?}");
        assert_eq!(v.stats.pf_fixed, 1);
        assert_eq!(v.stats.pf_taken, 1);
        // Second fault on the same gfn (as if another vCPU raced us): already right.
        let o = v.handle_ept_violation(Gpa(0x10_3008), vmmu::FaultAccess::READ).unwrap();
        assert_eq!(o, FaultOutcome::Spurious, "{f:?}");
        assert_eq!(v.stats.pf_spurious, 1);
    }
}

#[test]
fn huge_pages_when_slot_and_host_allow_and_not_with_dirty_logging() {
    let (vm, h) = vm(FormatKind::Ept);
    // 4 MiB slot at 2 MiB-aligned gpa and hva: 2 MiB leaves.
    vm.set_memory_region(&region(0, 0x20_0000, 0x40_0000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    let (seen, _) = access(&mut v, 0x30_0000 + 0x5000, true).unwrap();
    assert_eq!(seen, Seen::Ram(Pfn((RAM_HVA >> 12) + 0x105)));
    assert_eq!(vm.stats().pages_2m, 1);
    assert_eq!(vm.stats().pages_4k, 0);
    // Misaligned gpa vs hva: 4 KiB only.
    vm.set_memory_region(&region(1, 0x100_1000, 0x40_0000, RAM_HVA + 0x80_0000, 0)).unwrap();
    access(&mut v, 0x120_0000, false).unwrap();
    assert_eq!(vm.stats().pages_4k, 1);
    // Dirty logging: 4 KiB; a read of a page nobody wrote maps read-only (the host's zero page,
    // as KVM), the write faults again and upgrades.
    h.set_zero_page_reads(true);
    vm.set_memory_region(&region(
        2,
        0x200_0000,
        0x20_0000,
        RAM_HVA + 0x200_0000,
        KVM_MEM_LOG_DIRTY_PAGES,
    ))
    .unwrap();
    access(&mut v, 0x200_0000, false).unwrap();
    assert_eq!(vm.stats().pages_4k, 2);
    let (_, faults) = access(&mut v, 0x200_0000, true).unwrap();
    assert_eq!(faults, vec![FaultOutcome::Fixed], "write-protected leaf upgraded");
    assert_eq!(vm.stats().pages_2m, 1);
}

#[test]
fn no_slot_installs_an_mmio_spte_then_hits_it_and_the_cache() {
    for f in FORMATS {
        let (vm, _h) = vm(f);
        assert!(vm.mmio_caching_enabled(), "{f:?}");
        let mut v0 = vm.create_vcpu().unwrap();
        let mut v1 = vm.create_vcpu().unwrap();
        let (seen, _) = access(&mut v0, 0xfee0_0000, false).unwrap();
        assert_eq!(seen, Seen::Mmio(EmulateSource::SlowPathMmio), "{f:?}");
        assert_eq!(v0.stats.pf_mmio_spte_created, 1);
        // v1 has an empty cache: the hardware raises a misconfig/RSVD fault on the MMIO SPTE.
        let (seen, faults) = access(&mut v1, 0xfee0_0004, false).unwrap();
        assert_eq!(seen, Seen::Mmio(EmulateSource::MmioSpteHit), "{f:?}");
        assert_eq!(faults.len(), 1);
        assert_eq!(v1.stats.mmio_spte_hits, 1);
        assert_eq!(v1.stats.pf_taken, 0, "an MMIO SPTE hit is not a page fault (KVM)");
        // Now v1's cache holds the gfn.
        let (seen, _) = access(&mut v1, 0xfee0_0008, false).unwrap();
        assert_eq!(seen, Seen::Mmio(EmulateSource::VcpuCacheHit), "{f:?}");
        // v0's cache was filled by the slow path.
        let (seen, _) = access(&mut v0, 0xfee0_0000, false).unwrap();
        assert_eq!(seen, Seen::Mmio(EmulateSource::VcpuCacheHit), "{f:?}");
    }
}

#[test]
fn caching_off_emulates_without_installing() {
    let mut cfg = VmConfig::new(FormatKind::Npt, 46).unwrap();
    cfg.mmio_caching = false;
    let (vm, _h) = vm_with(cfg);
    assert!(!vm.mmio_caching_enabled());
    let mut v = vm.create_vcpu().unwrap();
    for _ in 0..3 {
        let (seen, faults) = access(&mut v, 0xfee0_0000, false).unwrap();
        assert_eq!(seen, Seen::Mmio(EmulateSource::SlowPathMmio));
        assert_eq!(faults.len(), 1);
    }
    assert_eq!(v.stats.pf_mmio_spte_created, 0);
    assert_eq!(v.stats.pf_taken, 3, "every access takes the slow path (a violation each time)");
}

#[test]
fn caching_impossible_with_52_bit_npt_but_fine_with_ept() {
    let (vm, _h) = vm_with(VmConfig::new(FormatKind::Npt, 52).unwrap());
    assert!(!vm.mmio_caching_enabled());
    let mut v = vm.create_vcpu().unwrap();
    let (seen, _) = access(&mut v, 0x1_0000_0000, false).unwrap();
    assert_eq!(seen, Seen::Mmio(EmulateSource::SlowPathMmio));
    assert_eq!(v.stats.pf_mmio_spte_created, 0);
    let (vm, _h) = vm_with(VmConfig::new(FormatKind::Ept, 52).unwrap());
    assert!(vm.mmio_caching_enabled());
}

#[test]
fn write_to_readonly_slot_is_emulated_and_never_cached() {
    for f in FORMATS {
        let (vm, _h) = vm(f);
        vm.set_memory_region(&region(0, 0x10_0000, 0x1000, RAM_HVA, KVM_MEM_READONLY)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        let (seen, _) = access(&mut v, 0x10_0000, true).unwrap();
        assert_eq!(seen, Seen::Mmio(EmulateSource::ReadOnlyWrite), "{f:?}");
        assert_eq!(v.stats.pf_mmio_spte_created, 0, "never an MMIO SPTE");
        assert_eq!(v.mmio_cache().entry(), None, "never in the per-vCPU cache");
        // Reads are RAM.
        let (seen, _) = access(&mut v, 0x10_0000, false).unwrap();
        assert_eq!(seen, Seen::Ram(Pfn(RAM_HVA >> 12)), "{f:?}");
        // A write through the read-only leaf still ends as emulation, not RAM.
        let (seen, _) = access(&mut v, 0x10_0008, true).unwrap();
        assert_eq!(seen, Seen::Mmio(EmulateSource::ReadOnlyWrite), "{f:?}");
    }
}

#[test]
fn create_over_cached_mmio_invalidates_spte_and_cache_by_generation_alone() {
    for f in FORMATS {
        let (vm, _h) = vm(f);
        let mut v = vm.create_vcpu().unwrap();
        access(&mut v, 0x50_0000, false).unwrap();
        let (seen, _) = access(&mut v, 0x50_0000, false).unwrap();
        assert_eq!(seen, Seen::Mmio(EmulateSource::VcpuCacheHit));
        let zaps = vm.stats().zap_range + vm.stats().zap_all_fast;
        vm.set_memory_region(&region(3, 0x50_0000, 0x1000, RAM_HVA, 0)).unwrap();
        assert_eq!(
            vm.stats().zap_range + vm.stats().zap_all_fast,
            zaps,
            "create zaps nothing (KVM)"
        );
        let (seen, faults) = access(&mut v, 0x50_0000, false).unwrap();
        assert_eq!(seen, Seen::Ram(Pfn(RAM_HVA >> 12)), "{f:?}");
        assert_eq!(faults, vec![FaultOutcome::Fixed]);
        assert_eq!(v.stats.stale_gen_misses, 1, "the old MMIO SPTE missed on its generation");
    }
}

#[test]
fn delete_zaps_and_flushes_then_the_gfn_is_mmio() {
    for f in FORMATS {
        let (vm, _h) = vm(f);
        vm.set_memory_region(&region(0, 0x10_0000, 0x2000, RAM_HVA, 0)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        access(&mut v, 0x10_0000, true).unwrap();
        assert_eq!(vm.stats().pages_4k, 1);
        vm.set_memory_region(&region(0, 0x10_0000, 0, 0, 0)).unwrap();
        assert_eq!(vm.stats().pages_4k, 0, "the slot's leaves are gone");
        assert!(vm.stats().remote_tlb_flush_requests >= 1);
        let (seen, _) = access(&mut v, 0x10_0000, false).unwrap();
        assert_eq!(seen, Seen::Mmio(EmulateSource::SlowPathMmio), "{f:?}");
    }
}

#[test]
fn move_leaves_old_gpa_mmio_and_new_gpa_ram() {
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(5, 0x10_0000, 0x1000, RAM_HVA + 0x7000, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    assert_eq!(access(&mut v, 0x10_0000, false).unwrap().0, Seen::Ram(Pfn((RAM_HVA >> 12) + 7)));
    vm.set_memory_region(&region(5, 0x20_0000, 0x1000, RAM_HVA + 0x7000, 0)).unwrap();
    assert_eq!(
        access(&mut v, 0x10_0000, false).unwrap().0,
        Seen::Mmio(EmulateSource::SlowPathMmio)
    );
    assert_eq!(access(&mut v, 0x20_0000, false).unwrap().0, Seen::Ram(Pfn((RAM_HVA >> 12) + 7)));
}

#[test]
fn gfn_beyond_max_is_emulated_without_installing() {
    let (vm, _h) = vm_with(VmConfig::new(FormatKind::Ept, 36).unwrap());
    let mut v = vm.create_vcpu().unwrap();
    // 2^36 is beyond MAXPHYADDR 36; the tables still cover it (48-bit walk).
    let (seen, _) = access(&mut v, 1 << 36, false).unwrap();
    assert_eq!(seen, Seen::Mmio(EmulateSource::SlowPathMmio));
    assert_eq!(v.stats.pf_mmio_spte_created, 0);
}

#[test]
fn fault_without_root_retries() {
    let (vm, _h) = vm(FormatKind::Ept);
    let mut v = vm.create_vcpu().unwrap();
    let o = v.handle_ept_violation(Gpa(0x10_0000), vmmu::FaultAccess::READ).unwrap();
    assert_eq!(o, FaultOutcome::Retry(RetryCause::NoRoot));
}

#[test]
fn zap_all_fast_obsoletes_the_root_faults_retry_until_reload() {
    let (vm, host) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(0, 0x10_0000, 0x1000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    access(&mut v, 0x10_0000, false).unwrap();
    let old_root = v.root().unwrap().pfn();
    vm.zap_all_fast();
    assert!(v.root().unwrap().is_obsolete());
    let o = v.handle_ept_violation(Gpa(0x10_0000), vmmu::FaultAccess::READ).unwrap();
    assert_eq!(o, FaultOutcome::Retry(RetryCause::ObsoleteRoot));
    let work = v.service_requests().unwrap();
    assert!(work.flush_tlb, "a new root means a TLB flush");
    assert_ne!(v.root().unwrap().pfn(), old_root);
    assert_eq!(access(&mut v, 0x10_0000, false).unwrap().0, Seen::Ram(Pfn(RAM_HVA >> 12)));
    // The old root and its tables are freed after a grace period; nothing leaks.
    vm.reclaim();
    assert_eq!(vm.tdp().expect("a TDP VM").nr_roots(), 1);
    assert_eq!(host.use_after_free(), 0);
    let s = vm.stats();
    assert_eq!(host.tables_in_use(), s.tables_allocated - s.tables_freed);
}

/// Evidence for the "No harm in this design" of `cache-while-in-progress` (`src/bugs.rs`): the
/// entry the bug caches during an update is tagged with the in-progress generation of the set
/// the decision was made on, and never hits again once the update is done: after a create over
/// the gfn, an access reaches RAM. Not a catcher: `catchers` has the invariant test.
#[cfg(feature = "historical-bugs")]
#[test]
fn cache_while_in_progress_entry_never_hits_after_its_update() {
    use vmmu::bugs::{Bug, BugSet};
    const X: u64 = 0x70_0000;
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.bugs = BugSet::only(Bug::CacheWhileInProgress);
    let (vm, _h) = vm_with(cfg);
    let mut v = vm.create_vcpu().unwrap();
    catchers::update_with_window(&vm, &region(0, 0x10_0000, 0x1000, RAM_HVA, 0), |p| {
        if let catchers::Point::Updated { .. } = p {
            catchers::step(&mut v, X).unwrap();
            let g = v.mmio_cache().generation().expect("the bug caches");
            assert!(g.in_progress(), "{g:?}");
        }
    });
    assert!(v.mmio_cache().generation().unwrap().in_progress(), "the entry is still there");
    vm.set_memory_region(&region(1, X, 0x1000, RAM_HVA + 0x1000, 0)).unwrap();
    let (seen, _) = access(&mut v, X, false).unwrap();
    assert_eq!(seen, Seen::Ram(Pfn((RAM_HVA >> 12) + 1)));
}

/// Evidence for the "No harm in this design" of `no-stale-root-check` (`src/bugs.rs`): the SPTE
/// the bug installs into a root that `zap_all_fast` obsoleted maps the slot's current frame, and
/// goes when the slot is deleted, although the vCPU has not dropped that root yet (every zap
/// walks obsolete roots still in use). Not a catcher: `catchers` has the invariant test.
#[cfg(feature = "historical-bugs")]
#[test]
fn no_stale_root_check_stray_spte_goes_with_its_slot() {
    use vmmu::bugs::{Bug, BugSet};
    use vmmu::tdp::{hw_walk, HwWalk};
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.bugs = BugSet::only(Bug::NoStaleRootCheck);
    let (vm, host) = vm_with(cfg);
    vm.set_memory_region(&region(0, 0x10_0000, 0x1000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    let root = v.root().unwrap().clone();
    vm.zap_all_fast();
    let o = v.handle_ept_violation(Gpa(0x10_0000), vmmu::FaultAccess::READ).unwrap();
    assert_eq!(o, FaultOutcome::Fixed, "the bug installs into the obsoleted root");
    let fmt = vm.core().config().format;
    // SAFETY: single-threaded; the test keeps `root`, and nothing frees its pages between walks.
    let walk = || unsafe {
        hw_walk(&fmt, &*host, root.pfn(), root.level(), Gfn(0x100), vmmu::Access::NONE)
    };
    assert!(
        matches!(walk(), HwWalk::Translated { pfn, .. } if pfn == Pfn(RAM_HVA >> 12)),
        "the current frame"
    );
    vm.set_memory_region(&region(0, 0x10_0000, 0, 0, 0)).unwrap();
    assert!(matches!(walk(), HwWalk::Violation { .. }), "zapped with its slot: {:?}", walk());
    assert!(v.root().unwrap().is_obsolete(), "while the vCPU still holds the root");
}

#[test]
fn pageless_root_faults_retry_while_reload_pending() {
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(0, 0x10_0000, 0x1000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    v.load_pageless_root().unwrap();
    assert_eq!(
        v.handle_ept_violation(Gpa(0x10_0000), vmmu::FaultAccess::READ).unwrap(),
        FaultOutcome::Fixed
    );
    vm.zap_all_fast();
    assert_eq!(
        v.handle_ept_violation(Gpa(0x10_0000), vmmu::FaultAccess::READ).unwrap(),
        FaultOutcome::Retry(RetryCause::PagelessRootReloadPending)
    );
    v.service_requests().unwrap();
    assert_eq!(v.root().unwrap().kind(), vmmu::tdp::root::RootKind::Tdp);
}

#[test]
fn host_invalidation_in_flight_retries_then_maps() {
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(0, 0x10_0000, 0x4000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    access(&mut v, 0x10_1000, false).unwrap();
    let inv =
        vm.invalidate_hva_range_begin(vmmu::Hva(RAM_HVA + 0x1000), vmmu::Hva(RAM_HVA + 0x2000));
    assert_eq!(vm.stats().pages_4k, 0, "the mapping of the invalidated range is zapped");
    v.service_requests().unwrap();
    let o = v.handle_ept_violation(Gpa(0x10_1000), vmmu::FaultAccess::READ).unwrap();
    assert_eq!(o, FaultOutcome::Retry(RetryCause::HostInvalidation));
    inv.end();
    assert_eq!(access(&mut v, 0x10_1000, false).unwrap().0, Seen::Ram(Pfn((RAM_HVA >> 12) + 1)));
}

/// A host invalidation that begins and ends entirely after a fault translated the host address
/// and before it installs what it found (the fault parked at its preemption point, as a vCPU
/// preempted there) leaves nothing in flight, but the sequence count has moved: the fault must
/// retry (KVM `mmu_invalidate_retry_gfn`: `mmu_invalidate_seq != mmu_seq`), not map the frame
/// the host no longer has at that address. Without the sequence comparison the stale frame is
/// installed and every later access reads it. Pins the sequence comparison under the MMU lock
/// (`Invalidation::retry_range`) and a snapshot taken before the fault decides
/// (`PageFault::faultin`); `tests/shadow_mutants.rs` has the shadow MMU's half.
#[test]
fn a_host_invalidation_between_translation_and_install_makes_the_fault_retry() {
    const NEW_PFN: u64 = 0x7_7000;
    let (vm, h) = vm(FormatKind::Ept);
    // 4 pages: 4 KiB leaves only.
    vm.set_memory_region(&region(0, 0x10_0000, 0x4000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    let (racer, host) = (vm.clone(), h.clone());
    let mut once = true;
    vmmu::testing::preempt::on_this_thread(Some(Box::new(move |_| {
        if std::mem::take(&mut once) {
            let page = (vmmu::Hva(RAM_HVA + 0x1000), vmmu::Hva(RAM_HVA + 0x2000));
            let inv = racer.invalidate_hva_range_begin(page.0, page.1);
            host.map_over(RAM_HVA + 0x1000, 0x1000, NEW_PFN, Level::L4K, true);
            inv.end();
        }
    })));
    let o = v.handle_ept_violation(Gpa(0x10_1000), vmmu::FaultAccess::READ);
    vmmu::testing::preempt::on_this_thread(None);
    assert_eq!(o.unwrap(), FaultOutcome::Retry(RetryCause::HostInvalidation));
    assert_eq!(access(&mut v, 0x10_1000, false).unwrap().0, Seen::Ram(Pfn(NEW_PFN)));
}

/// A frozen entry (KVM `FROZEN_SPTE`: another thread is rewriting it under the shared MMU lock)
/// may be changed only by the thread that froze it (facts §6): a fault's slow path that reaches
/// one (over a present leaf, or over nothing for an MMIO gfn) retries and leaves it frozen;
/// once the freezer writes its value, accesses go on. Kills the frozen check in `Tdp::map`, without which both faults install
/// over the entry (the MMIO one as an emulation with a fresh MMIO SPTE).
#[test]
fn a_slow_path_fault_leaves_a_frozen_entry_to_its_freezer() {
    let (vm, _h) = vm(FormatKind::Ept);
    // One RAM page at gfn 0x100; gfn 0x105 in the same last-level table has no slot.
    vm.set_memory_region(&region(0, 0x10_0000, 0x1000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    access(&mut v, 0x10_0000, false).unwrap();
    let root = v.root().unwrap().clone();
    for (gpa, present) in [(0x10_0000u64, true), (0x10_5000, false)] {
        // SAFETY: single-threaded; no zap runs while `e` is used, and `v` keeps the root.
        let e = unsafe {
            vm.tdp().expect("a TDP VM").entry_for_tests(&root, Gpa(gpa).gfn(), Level::L4K)
        }
        .unwrap();
        let saved = e.swap(SpteFormat::FROZEN, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(SpteFormat::is_mmu_present(saved), present, "{gpa:#x}");
        let o = v.handle_ept_violation(Gpa(gpa), vmmu::FaultAccess::READ).unwrap();
        assert_eq!(o, FaultOutcome::Retry(RetryCause::Race), "{gpa:#x}: a frozen entry");
        assert_eq!(e.load(std::sync::atomic::Ordering::SeqCst), SpteFormat::FROZEN, "{gpa:#x}");
        // The freezer finishes (here: puts back what was there).
        e.store(saved, std::sync::atomic::Ordering::SeqCst);
    }
    assert_eq!(access(&mut v, 0x10_0000, false).unwrap().0, Seen::Ram(Pfn(RAM_HVA >> 12)));
    let (seen, _) = access(&mut v, 0x10_5000, false).unwrap();
    assert_eq!(seen, Seen::Mmio(EmulateSource::SlowPathMmio));
}

/// An invalidation ends when its token is dropped, also when the code between begin and end
/// panics: the end cannot be forgotten, nor called without a begin (the token is the only way
/// to end, and is not `Clone`), so the count memslot updates wait on cannot stay raised or
/// wrap (before, an unpaired end wrapped it in release builds and every later update waited
/// forever; a panic before the end left it raised).
#[test]
fn an_invalidation_ends_when_its_token_goes_even_on_a_panic() {
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(0, 0x10_0000, 0x4000, RAM_HVA, 0)).unwrap();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _inv = vm.invalidate_hva_range_begin(vmmu::Hva(RAM_HVA), vmmu::Hva(RAM_HVA + 0x1000));
        panic!("the host's change failed");
    }));
    assert!(panicked.is_err());
    // A fault in the range completes: the invalidation is over.
    let mut v = vm.create_vcpu().unwrap();
    let (seen, _) = access(&mut v, 0x10_0000, false).unwrap();
    assert_eq!(seen, Seen::Ram(Pfn(RAM_HVA >> 12)));
    // A memslot update waits for invalidations in flight: there is none, so it returns.
    vm.set_memory_region(&region(1, 0x20_0000, 0x1000, RAM_HVA + 0x10_0000, 0)).unwrap();
}

#[test]
fn zapped_under_walk_and_frozen_entries_retry_on_the_fast_path() {
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(0, 0x10_0000, 0x1000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    access(&mut v, 0x10_0000, false).unwrap();
    // A misconfig exit whose entry is now non-present (zapped after the hardware saw it).
    let o = v.handle_ept_misconfig(Gpa(0x10_1000)).unwrap();
    assert_eq!(o, FaultOutcome::Retry(RetryCause::ZappedUnderWalk));
    let root = v.root().unwrap().clone();
    // SAFETY: single-threaded; no zap runs while `e` is used.
    let e = unsafe { vm.tdp().expect("a TDP VM").entry_for_tests(&root, Gfn(0x100), Level::L4K) }
        .unwrap();
    let saved = e.swap(SpteFormat::FROZEN, std::sync::atomic::Ordering::SeqCst);
    let o = v.handle_ept_misconfig(Gpa(0x10_0000)).unwrap();
    assert_eq!(o, FaultOutcome::Retry(RetryCause::Frozen));
    e.store(saved, std::sync::atomic::Ordering::SeqCst);
}

#[test]
fn reserved_bits_above_the_leaf_are_a_genuine_misconfiguration() {
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(0, 0x10_0000, 0x1000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    access(&mut v, 0x10_0000, false).unwrap();
    let root = v.root().unwrap().clone();
    // SAFETY: single-threaded; no zap runs while `e` is used.
    let e = unsafe { vm.tdp().expect("a TDP VM").entry_for_tests(&root, Gfn(0x100), Level::L2M) }
        .unwrap();
    let saved = e.fetch_or(1 << 50, std::sync::atomic::Ordering::SeqCst); // PA bit >= 46
    match v.handle_ept_misconfig(Gpa(0x10_0000)) {
        Err(FaultError::Misconfig { level, dump, .. }) => {
            assert_eq!(level, 2);
            assert_eq!(dump.entries().len(), 3, "dump holds levels 4, 3, 2: {dump}");
        }
        other => panic!("expected a misconfiguration, got {other:?}"),
    }
    e.store(saved, std::sync::atomic::Ordering::SeqCst);
}

#[test]
fn untranslatable_host_address_is_an_error_not_mmio() {
    let (vm, _h) = vm(FormatKind::Npt);
    // Accepted at set time (alignment and range only), reported at fault time.
    vm.set_memory_region(&region(0, 0x10_0000, 0x1000, 0x7000_0000_0000 - 0x1000, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    match access(&mut v, 0x10_0000, false) {
        Err(FaultError::HostFault { gpa, .. }) => assert_eq!(gpa, Gpa(0x10_0000)),
        other => panic!("expected a host fault, got {other:?}"),
    }
    assert_eq!(v.stats.pf_mmio_spte_created, 0);
    assert_eq!(v.mmio_cache().entry(), None);
}

#[test]
fn out_of_table_frames_is_an_error() {
    let (vm, host) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(0, 0x10_0000, 0x1000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    host.set_fail_alloc(true);
    let r = v.handle_ept_violation(Gpa(0x10_0000), vmmu::FaultAccess::READ);
    assert!(matches!(r, Err(FaultError::OutOfMemory(_))), "{r:?}");
}

#[test]
fn mmio_generation_wrap_zaps_everything() {
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.generation_base = (1 << 19) - 4;
    let (vm, _h) = vm_with(cfg);
    let mut v = vm.create_vcpu().unwrap();
    access(&mut v, 0x90_0000, false).unwrap(); // an MMIO SPTE at the pre-wrap generation
    assert_eq!(vm.stats().mmio_gen_wraps, 0);
    for i in 0..4u64 {
        vm.set_memory_region(&region(1, 0x100_0000 + i * 0x1000, 0x1000, RAM_HVA, 0)).unwrap();
        vm.set_memory_region(&region(1, 0, 0, 0, 0)).unwrap();
    }
    assert_eq!(
        vm.stats().mmio_gen_wraps,
        1,
        "{:?}",
        vm.memslots().generation(vmmu::AsId(0)).unwrap()
    );
    assert!(vm.stats().zap_all_fast >= 1);
    // The old MMIO SPTE is gone with the obsolete root: the vCPU reloads and faults afresh.
    let (seen, _) = access(&mut v, 0x90_0000, false).unwrap();
    assert_eq!(seen, Seen::Mmio(EmulateSource::SlowPathMmio));
}

#[test]
fn slot_zap_all_quirk_zaps_every_root() {
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.slot_zap_all = true;
    let (vm, _h) = vm_with(cfg);
    vm.set_memory_region(&region(0, 0x10_0000, 0x1000, RAM_HVA, 0)).unwrap();
    vm.set_memory_region(&region(1, 0x20_0000, 0x1000, RAM_HVA + 0x1000, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    access(&mut v, 0x10_0000, false).unwrap();
    access(&mut v, 0x20_0000, false).unwrap();
    vm.set_memory_region(&region(0, 0x10_0000, 0, 0, 0)).unwrap();
    assert_eq!(vm.stats().zap_all_fast, 1);
    assert_eq!(vm.stats().pages_4k, 0, "the other slot's leaf went too");
}

/// A fault on a slot that is being deleted (marked invalid, first swap done, not yet removed):
/// the fault's outcome, the MMIO SPTEs it made and what it cached.
fn fault_on_a_slot_being_deleted(
    bugs: vmmu::bugs::BugSet,
) -> (Vec<FaultOutcome>, u64, Option<(Gfn, vmmu::Access)>) {
    use std::cell::RefCell;
    use vmmu::vm::UpdateProbe;
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.bugs = bugs;
    let (vm, _h) = vm_with(cfg);
    vm.set_memory_region(&region(0, 0x10_0000, 0x1000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    // A fault while the slot is in flux: its invalid copy is published and zapped.
    let vcpu = RefCell::new(&mut v);
    let seen = RefCell::new(Vec::new());
    vm.set_memory_region_probed(&region(0, 0x10_0000, 0, 0, 0), &|p| {
        if p == UpdateProbe::Flushed {
            let o = vcpu
                .borrow_mut()
                .handle_ept_violation(Gpa(0x10_0000), vmmu::FaultAccess::READ)
                .unwrap();
            seen.borrow_mut().push(o);
        }
    })
    .unwrap();
    let seen = seen.into_inner();
    (seen, v.stats.pf_mmio_spte_created, v.mmio_cache().entry())
}

/// A fault on a slot that is being deleted must retry (e0c378684b65), never decide "MMIO".
#[test]
fn fault_on_a_slot_being_deleted_retries() {
    let (seen, created, cached) = fault_on_a_slot_being_deleted(vmmu::bugs::BugSet::NONE);
    assert_eq!(seen, vec![FaultOutcome::Retry(RetryCause::InvalidSlot)]);
    assert_eq!(created, 0);
    assert_eq!(cached, None, "nothing cached as MMIO for a slot being deleted");
}

/// A move of a slot over part of its own old range: an access to a gpa that is RAM before and
/// after, made while the slot is in flux, retries and then reaches the slot's new frame
/// (`catchers::catch_invalid_slot_as_mmio` says what it checks).
#[test]
fn move_over_its_own_range_retries_then_reaches_ram() {
    let harm = catchers::catch_invalid_slot_as_mmio(vmmu::bugs::BugSet::NONE);
    assert_eq!(harm, None);
}

/// The test above catches `invalid-slot-as-mmio` by its harm: the access made during the move
/// is emulated as MMIO, which is neither the state before the move nor the one after.
#[cfg(feature = "historical-bugs")]
#[test]
fn move_over_its_own_range_catches_invalid_slot_as_mmio() {
    let bugs = vmmu::bugs::BugSet::only(vmmu::bugs::Bug::InvalidSlotAsMmio);
    let harm = catchers::catch_invalid_slot_as_mmio(bugs).expect("invalid-slot-as-mmio missed");
    assert!(harm.seen.contains("emulated as MMIO"), "{harm}");
}

/// An access to an MMIO gfn (SPTE and per-vCPU cache filled), then a create over it, then the
/// same access: it reaches the new RAM (`catchers::catch_stale_mmio_after_create`).
#[test]
fn access_after_create_over_cached_mmio_reaches_ram() {
    assert_eq!(catchers::catch_stale_mmio_after_create(vmmu::bugs::BugSet::NONE), None);
}

/// The test above catches the two generation checks being dropped: the per-vCPU cache
/// (56f17dd3fbc4) or the MMIO SPTE (f8f559422b6c) answers "MMIO" for what is now RAM.
#[cfg(feature = "historical-bugs")]
#[test]
fn access_after_create_over_cached_mmio_catches_missing_generation_checks() {
    use vmmu::bugs::{Bug, BugSet};
    let harm = catchers::catch_stale_mmio_after_create(BugSet::only(Bug::VcpuCacheWithoutGen))
        .expect("vcpu-cache-without-gen missed");
    assert!(harm.seen.contains("VcpuCacheHit"), "{harm}");
    // Without the cache's help (the bug in the SPTE check alone): the access through the
    // per-vCPU cache misses on the generation, and the stale SPTE hits.
    let harm = catchers::catch_stale_mmio_after_create(BugSet::only(Bug::MmioSpteIgnoresGen))
        .expect("mmio-spte-ignores-gen missed");
    assert!(harm.seen.contains("MmioSpteHit"), "{harm}");
}

#[test]
fn five_level_tables_map_and_emulate() {
    let mut cfg = VmConfig::new(FormatKind::Ept, 52).unwrap();
    cfg.root_level = Level::L5;
    let (vm, _h) = vm_with(cfg);
    vm.set_memory_region(&region(0, 0x10_0000, 0x1000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    assert_eq!(access(&mut v, 0x10_0000, false).unwrap().0, Seen::Ram(Pfn(RAM_HVA >> 12)));
    assert_eq!(v.root().unwrap().level(), Level::L5);
    // Above 2^48: only a 5-level walk reaches it; no slot there, so MMIO.
    let (seen, _) = access(&mut v, 1 << 50, false).unwrap();
    assert_eq!(seen, Seen::Mmio(EmulateSource::SlowPathMmio));
    let (seen, _) = access(&mut v, 1 << 50, false).unwrap();
    assert_eq!(seen, Seen::Mmio(EmulateSource::VcpuCacheHit));
}

/// A host with MAXPHYADDR above 48 gets 5-level tables by default: memslots are accepted up to
/// the MAXPHYADDR, and a 4-level walk would reach only 48 bits (gpa 2^51 + x aliased x, so an
/// access above 2^48 found low RAM). A TDP VM asked for 4 levels there is refused.
#[test]
fn a_host_above_48_bits_walks_5_levels_and_refuses_4() {
    for bits in [49, 52] {
        let cfg = VmConfig::new(FormatKind::Ept, bits).unwrap();
        assert_eq!(cfg.root_level, Level::L5, "{bits}");
        let (vm, _h) = vm_with(cfg);
        vm.set_memory_region(&region(0, 0, 0x1000, RAM_HVA, 0)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        assert_eq!(access(&mut v, 0, false).unwrap().0, Seen::Ram(Pfn(RAM_HVA >> 12)));
        let high = 1u64 << (bits - 1);
        let (seen, _) = access(&mut v, high, false).unwrap();
        assert_eq!(seen, Seen::Mmio(EmulateSource::SlowPathMmio), "{bits}: {high:#x} is no slot");
        let mut four = VmConfig::new(FormatKind::Npt, bits).unwrap();
        four.root_level = Level::L4;
        let host = std::sync::Arc::new(vmmu::testing::TestHost::new(8));
        let e = vmmu::vm::Vm::new(four, host).err().expect("4 levels refused");
        assert!(e.to_string().contains("root_level 5"), "{e}");
    }
    assert_eq!(VmConfig::new(FormatKind::Ept, 48).unwrap().root_level, Level::L4);
}

#[test]
fn bad_root_level_is_rejected() {
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.root_level = Level::L2M;
    let host = std::sync::Arc::new(vmmu::testing::TestHost::new(8));
    assert!(vmmu::vm::Vm::new(cfg, host).is_err());
}

/// A memslot update waits for host invalidations in flight (KVM's swap waits for
/// `mn_active_invalidate_count` to drop to 0), so an invalidation's gfn ranges stay right.
#[test]
fn memslot_update_waits_for_host_invalidation_in_flight() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(0, 0x10_0000, 0x1000, RAM_HVA, 0)).unwrap();
    let inv = vm.invalidate_hva_range_begin(vmmu::Hva(RAM_HVA), vmmu::Hva(RAM_HVA + 0x1000));
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let t = {
        let (vm, done) = (vm.clone(), done.clone());
        std::thread::spawn(move || {
            vm.set_memory_region(&region(0, 0x20_0000, 0x1000, RAM_HVA, 0)).unwrap();
            done.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(!done.load(Ordering::SeqCst), "the move went ahead during an invalidation");
    inv.end();
    t.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
}

/// Issue 12 point 3: a dropped vCPU gives back its index and its SRCU reader records, so a VM
/// with room for 2 vCPUs can create and drop 100,000 in a row, and a third live one is refused.
#[test]
fn vcpu_indices_and_reader_records_are_reclaimed() {
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.max_vcpus = 2;
    let (vm, _h) = vm_with(cfg);
    vm.set_memory_region(&region(0, 0x10_0000, 0x1000, RAM_HVA, 0)).unwrap();
    let keep = vm.create_vcpu().unwrap();
    for i in 0..100_000u32 {
        let mut v = vm.create_vcpu().unwrap_or_else(|e| panic!("vCPU {i}: {e}"));
        if i % 10_000 == 0 {
            assert_eq!(access(&mut v, 0x10_0000, false).unwrap().0, Seen::Ram(Pfn(RAM_HVA >> 12)));
        }
    }
    let second = vm.create_vcpu().unwrap();
    assert!(vm.create_vcpu().is_err(), "only 2 vCPUs fit");
    drop((keep, second));
    // Updates still complete: no grace period waits for a record of a dropped vCPU.
    vm.set_memory_region(&region(0, 0x10_0000, 0, 0, 0)).unwrap();
}

/// A host invalidation of one page inside a 2 MiB block: a fault on another page of the block,
/// which the host still reports as a huge page, must not map the whole block (the leaf would
/// cover the page being invalidated); it retries until the invalidation ends.
#[test]
fn a_huge_leaf_is_not_installed_over_a_page_being_invalidated() {
    let (vm, _h) = vm(FormatKind::Ept);
    // RAM_HVA is 2 MiB aligned and the test host maps it with 2 MiB pages.
    vm.set_memory_region(&region(0, 0x20_0000, 0x20_0000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    let inv =
        vm.invalidate_hva_range_begin(vmmu::Hva(RAM_HVA + 0x5000), vmmu::Hva(RAM_HVA + 0x6000));
    let o = v.handle_ept_violation(Gpa(0x20_0000), vmmu::FaultAccess::READ).unwrap();
    assert_eq!(o, FaultOutcome::Retry(RetryCause::HostInvalidation));
    assert_eq!(vm.stats().pages_2m, 0, "no 2 MiB leaf over the page being invalidated");
    inv.end();
    assert_eq!(access(&mut v, 0x20_0000, false).unwrap().0, Seen::Ram(Pfn(RAM_HVA >> 12)));
    assert_eq!(vm.stats().pages_2m, 1);
}

/// `VmConfig::tdp_prefetch` (KVM's legacy direct MMU, `direct_pte_prefetch`): a 4 KiB RAM fault
/// also maps the not-present pages of its 8-aligned group whose host pages are mapped writable
/// already; the TDP MMU proper (the default) maps only the faulting page.
#[test]
fn tdp_prefetch_maps_written_neighbours_of_the_group() {
    for prefetch in [false, true] {
        let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
        cfg.tdp_prefetch = prefetch;
        let (vm, h) = vm_with(cfg);
        h.set_zero_page_reads(true);
        // gpa and hva not 2 MiB-congruent: 4 KiB leaves only.
        let slot = |size| region(0, 0x100_1000, size, RAM_HVA, 0);
        vm.set_memory_region(&slot(0x10_0000)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        // Gfns 0x1009 and 0x100a written (their host pages are now mapped writable).
        access(&mut v, 0x100_9000, true).unwrap();
        access(&mut v, 0x100_a000, true).unwrap();
        vm.set_memory_region(&slot(0)).unwrap();
        vm.set_memory_region(&slot(0x10_0000)).unwrap();
        assert_eq!(vm.stats().pages_4k, 0, "the delete zapped every leaf");
        // Gfn 0x1008 (group 0x1008..0x1010): the run 0x1009..0x1010 gets 0x1009 and 0x100a,
        // then stops at 0x100b (never written). (A run from 0x1000, outside the slot, would get
        // nothing and end the prefetch.)
        access(&mut v, 0x100_8000, false).unwrap();
        let want = if prefetch { 3 } else { 1 };
        assert_eq!(vm.stats().pages_4k, want, "prefetch {prefetch}");
        let (_, faults) = access(&mut v, 0x100_a000, false).unwrap();
        assert_eq!(faults.is_empty(), prefetch, "prefetch {prefetch}: {faults:?}");
        access(&mut v, 0x100_1000, false).unwrap();
        // Gfn 0x1001 (outside the prefetch of its group: the first run starts below the slot).
        assert_eq!(vm.stats().pages_4k, want + 1 + u64::from(!prefetch));
    }
}

/// KVM's `kvm_flush_remote_tlbs` counts one `remote_tlb_flush_requests` per call, however many
/// vCPUs the VM has, and one `remote_tlb_flush` only when a vCPU in guest mode had to be kicked
/// (the others flush at their next entry).
#[test]
fn a_remote_flush_counts_one_request_and_a_flush_only_when_it_kicks() {
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(0, 0x10_0000, 0x2000, RAM_HVA, 0)).unwrap();
    let mut vcpus: Vec<_> = (0..3).map(|_| vm.create_vcpu().unwrap()).collect();
    for v in &mut vcpus {
        v.service_requests().unwrap();
    }
    let s0 = vm.stats();
    vm.flush_remote_tlbs_for_tests();
    let s1 = vm.stats();
    assert_eq!(s1.remote_tlb_flush_requests - s0.remote_tlb_flush_requests, 1, "one per call");
    assert_eq!(s1.remote_tlb_flush - s0.remote_tlb_flush, 0, "nobody was in guest mode");
    for v in &mut vcpus {
        v.service_requests().unwrap();
        assert!(!v.requests_pending());
    }
    // Two of the three in guest mode, each on its own thread leaving it when kicked.
    let (running, _idle) = vcpus.split_at_mut(2);
    for v in running.iter_mut() {
        v.enter_guest_mode().unwrap();
    }
    std::thread::scope(|s| {
        for v in running.iter_mut() {
            s.spawn(move || {
                while !v.requests_pending() {
                    std::hint::spin_loop();
                }
                v.exit_guest_mode();
            });
        }
        vm.flush_remote_tlbs_for_tests();
    });
    let s2 = vm.stats();
    assert_eq!(s2.remote_tlb_flush_requests - s1.remote_tlb_flush_requests, 1, "one per call");
    assert_eq!(s2.remote_tlb_flush - s1.remote_tlb_flush, 1, "it kicked two vCPUs: one flush");
}

/// The guest-mode guard's poll (`GuestMode::requests_pending`, the "IPI" a software vCPU checks
/// between accesses) is clear until another thread posts a request, then set: here a remote TLB
/// flush, which waits for the vCPU to leave guest mode, so a poll that never saw it would hold
/// stale translations and stall the flush. The vCPU then services the flush on its next entry.
#[test]
fn a_vcpu_in_guest_mode_sees_a_request_through_its_guard() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(0, 0x10_0000, 0x2000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    let entered = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (v, entered) = (&mut v, &entered);
        s.spawn(move || {
            let g = v.enter_guest().expect("nothing pending: entry succeeds");
            let before = g.requests_pending();
            // Told before the assert, so a failure cannot leave the other thread waiting.
            entered.store(true, Ordering::SeqCst);
            assert!(!before, "no request was posted yet");
            // A bound, not a timing: the flush below posts at once; the panic drops the guard,
            // which leaves guest mode and lets the flush return.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !g.requests_pending() {
                assert!(Instant::now() < deadline, "the posted flush never showed in guest mode");
                std::hint::spin_loop();
            }
        });
        while !entered.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        vm.flush_remote_tlbs_for_tests();
    });
    assert!(v.requests_pending(), "the flush waits for service outside guest mode");
    assert!(v.service_requests().unwrap().flush_tlb, "the next entry flushes the TLB");
    assert!(!v.requests_pending());
}

/// KVM `kvm_mmu_slot_apply_flags` when dirty logging stops on a writable slot
/// (`kvm_mmu_recover_huge_pages`, v6.13 and later): the 2 MiB mappings logging split come back in
/// place, where the slot's alignment and the host's mapping allow one (the next access does not
/// fault); elsewhere the 4 KiB leaves stay.
#[test]
fn huge_pages_come_back_when_dirty_logging_stops() {
    const LOG: u32 = KVM_MEM_LOG_DIRTY_PAGES;
    // Host memory mapped with 4 KiB pages only, beyond the test host's 1 GiB of 2 MiB pages.
    const SMALL_HVA: u64 = RAM_HVA + (2 << 30);
    for f in FORMATS {
        let (vm, h) = vm(f);
        h.map(SMALL_HVA, 0x40_0000, SMALL_HVA >> 12, Level::L4K, true);
        // Slot 0: 2 MiB-aligned gpa and hva. Slot 1: hva 4 KiB off the gpa's alignment.
        // Slot 2: aligned, but the host maps it with 4 KiB pages.
        let slots = [
            (0, 0x20_0000, RAM_HVA),
            (1, 0x100_0000, RAM_HVA + 0x80_1000),
            (2, 0x200_0000, SMALL_HVA),
        ];
        for (slot, gpa, hva) in slots {
            vm.set_memory_region(&region(slot, gpa, 0x40_0000, hva, 0)).unwrap();
        }
        let mut v = vm.create_vcpu().unwrap();
        for (_, gpa, _) in slots {
            access(&mut v, gpa + 0x10_5000, true).unwrap();
        }
        assert_eq!(vm.stats().pages_2m, 1, "{f:?}: only slot 0 maps 2 MiB");
        for (slot, gpa, hva) in slots {
            vm.set_memory_region(&region(slot, gpa, 0x40_0000, hva, LOG)).unwrap();
            access(&mut v, gpa + 0x10_5000, true).unwrap();
        }
        assert_eq!(vm.stats().pages_2m, 0, "{f:?}: logging maps 4 KiB");
        let logged_4k = vm.stats().pages_4k;
        for (slot, gpa, hva) in slots {
            vm.set_memory_region(&region(slot, gpa, 0x40_0000, hva, 0)).unwrap();
        }
        // Slot 0's split table became one 2 MiB leaf; slots 1 and 2 keep their 4 KiB leaves.
        assert_eq!(vm.stats().pages_4k, logged_4k - 512, "{f:?}");
        assert_eq!(vm.stats().pages_2m, 1, "{f:?}: recovered in place");
        for off in [0x6000, 0x1f_f000, 0x10_5000] {
            let (seen, faults) = access(&mut v, 0x20_0000 + off, false).unwrap();
            assert_eq!(seen, Seen::Ram(Pfn((RAM_HVA + off) >> 12)), "{f:?} {off:#x}");
            assert!(faults.is_empty(), "{f:?} {off:#x}: the huge leaf maps it, {faults:?}");
        }
        // The leaf took the rights of the first 4 KiB leaf under it (read-only since logging
        // began): a write faults once and maps the 2 MiB writable.
        let (seen, _) = access(&mut v, 0x20_0000 + 0x7000, true).unwrap();
        assert_eq!(seen, Seen::Ram(Pfn((RAM_HVA + 0x7000) >> 12)), "{f:?}");
        assert_eq!(vm.stats().pages_2m, 1, "{f:?}");
        let (seen, _) = access(&mut v, 0x100_0000 + 0x10_6000, false).unwrap();
        assert_eq!(seen, Seen::Ram(Pfn(((RAM_HVA + 0x80_1000) >> 12) + 0x106)), "{f:?}");
        let (seen, _) = access(&mut v, 0x200_0000 + 0x10_6000, false).unwrap();
        assert_eq!(seen, Seen::Ram(Pfn((SMALL_HVA >> 12) + 0x106)), "{f:?}");
        assert_eq!(vm.stats().pages_2m, 1, "{f:?}");
    }
}

/// KVM's `kvm_tdp_mmu_map` maps at the target level whatever the entry there holds: a 2 MiB
/// block whose table only holds an MMIO SPTE from before a slot was created over it gets one
/// 2 MiB leaf on the first fault after the create (the table goes, freed after a grace
/// period), not a 4 KiB leaf per fault. The translations are the slot's frames.
#[test]
fn a_huge_leaf_replaces_a_table_of_old_mmio_sptes() {
    for f in FORMATS {
        let (vm, _h) = vm(f);
        let mut v = vm.create_vcpu().unwrap();
        let (seen, _) = access(&mut v, 0x20_3000, false).unwrap();
        assert_eq!(seen, Seen::Mmio(EmulateSource::SlowPathMmio), "{f:?}");
        vm.set_memory_region(&region(0, 0x20_0000, 0x20_0000, RAM_HVA, 0)).unwrap();
        let (seen, faults) = access(&mut v, 0x20_5000, true).unwrap();
        assert_eq!(seen, Seen::Ram(Pfn((RAM_HVA >> 12) + 5)), "{f:?}");
        assert_eq!(faults, vec![FaultOutcome::Fixed], "{f:?}");
        assert_eq!((vm.stats().pages_2m, vm.stats().pages_4k), (1, 0), "{f:?}");
        for off in [0x3000u64, 0x0, 0x1f_f000] {
            let (seen, faults) = access(&mut v, 0x20_0000 + off, true).unwrap();
            assert_eq!(seen, Seen::Ram(Pfn((RAM_HVA + off) >> 12)), "{f:?} {off:#x}");
            assert!(faults.is_empty(), "{f:?} {off:#x}: the huge leaf maps it, {faults:?}");
        }
    }
}

#[test]
fn an_npt_leaf_without_the_user_bit_faults_every_guest_access() {
    // AMD: nested walks treat every guest access as a user access, so an NPT leaf the MMU built
    // without U (a regression: KVM's NPT leaves always carry it) must fault, even for a read
    // the caller asked for with no rights; EPT has no user bit and is unaffected.
    for f in FORMATS {
        let (vm, _h) = vm(f);
        vm.set_memory_region(&region(0, 0x10_0000, 0x10_0000, RAM_HVA, 0)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        access(&mut v, 0x10_3008, false).unwrap();
        let root = v.root().expect("a TDP vCPU has its root").clone();
        // SAFETY: single-threaded, nothing zaps while the reference is used.
        let e =
            unsafe { vm.tdp().expect("a TDP VM").entry_for_tests(&root, Gfn(0x103), Level::L4K) }
                .unwrap();
        let leaf = e.load(std::sync::atomic::Ordering::Acquire);
        let walk = |v: &mut vmmu::vcpu::Vcpu<_>| {
            v.service_requests().unwrap();
            v.enter_guest().unwrap().walk(Gpa(0x10_3008), vmmu::Access::NONE)
        };
        assert!(matches!(walk(&mut v), vmmu::tdp::HwWalk::Translated { .. }), "{f:?}");
        // Bit 2: NPT's U (which the MMU sets), EPT's X.
        assert_ne!(leaf & 1 << 2, 0, "{f:?}: {leaf:#x}");
        e.store(leaf & !(1 << 2), std::sync::atomic::Ordering::Release);
        let w = walk(&mut v);
        if f == FormatKind::Ept {
            // Bit 2 is EPT's X: a data read still translates.
            assert!(matches!(w, vmmu::tdp::HwWalk::Translated { .. }), "{f:?}: {w:?}");
        } else {
            assert!(
                matches!(w, vmmu::tdp::HwWalk::Violation { present: true, .. }),
                "{f:?}: {w:?}"
            );
        }
    }
}

/// A vCPU whose TLB only a flush (`service_requests`' `flush_tlb`) empties: one read of `gpa`;
/// returns whether the TLB answered it.
fn read_through_tlb(
    v: &mut vmmu::vcpu::Vcpu<vmmu::testing::TestHost>,
    tlb: &mut std::collections::HashMap<u64, Pfn>,
    gpa: u64,
) -> bool {
    for _ in 0..100 {
        if v.service_requests().unwrap().flush_tlb {
            tlb.clear();
        }
        if tlb.contains_key(&(gpa >> 12)) {
            return true;
        }
        let walk = match v.enter_guest() {
            Ok(g) => g.walk(Gpa(gpa), vmmu::Access::NONE),
            Err(_) => continue,
        };
        match walk {
            vmmu::tdp::HwWalk::Translated { pfn, .. } => {
                tlb.insert(gpa >> 12, pfn);
                return false;
            }
            vmmu::tdp::HwWalk::Violation { .. } => {
                let o = v.handle_ept_violation(Gpa(gpa), vmmu::FaultAccess::READ).unwrap();
                assert!(!matches!(o, FaultOutcome::Emulate { .. }), "{o:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    panic!("the read of {gpa:#x} made no progress");
}

/// Loading a root flushes the vCPU's TLB (KVM `kvm_mmu_load`), which is what lets the drop of a
/// pageless root skip the flush: after a swap of pageless roots, a host invalidation finds no
/// root mapping the page (so it flushes nobody) and the host may reuse the frame; the vCPU must
/// not translate through its old TLB entry. (Found by a TDP audit: the swap asked for no flush.)
#[test]
fn a_pageless_root_swap_flushes_so_no_tlb_entry_outlives_a_host_invalidation() {
    for swap in [false, true] {
        let (vm, _h) = vm(FormatKind::Ept);
        vm.set_memory_region(&region(1, 0x10_0000, 0x10000, RAM_HVA, 0)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        let mut tlb = std::collections::HashMap::new();
        v.service_requests().unwrap();
        v.load_pageless_root().unwrap();
        assert!(!read_through_tlb(&mut v, &mut tlb, 0x10_3000));
        assert!(read_through_tlb(&mut v, &mut tlb, 0x10_3000), "the TLB holds it");
        if swap {
            v.load_pageless_root().unwrap();
        }
        let inv =
            vm.invalidate_hva_range_begin(vmmu::Hva(RAM_HVA + 0x3000), vmmu::Hva(RAM_HVA + 0x4000));
        inv.end();
        vm.reclaim();
        assert!(
            !read_through_tlb(&mut v, &mut tlb, 0x10_3000),
            "swap {swap}: a TLB entry from a freed root outlived the host invalidation"
        );
    }
}
