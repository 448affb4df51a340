//! The shadow-paging MMU end to end on the test host (issue 13): guest page tables written into
//! guest RAM, the hardware walk by guest-virtual address, the #PF exit, MMIO under shadow paging
//! (the GVA-keyed cache and MMIO SPTEs), write protection of guest tables, INVLPG, CR3 switches
//! through previous roots, PAE special roots and recycling.
#![cfg(not(loom))]

mod common;

use common::shadow::*;
use std::sync::Arc;
use vmmu::bugs::BugSet;
use vmmu::fault::{EmulateSource, FaultOutcome, PfErr};
use vmmu::guest::{GuestCpu, PagingMode};
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::shadow::ShadowRootKind;
use vmmu::stats::RetryCause;
use vmmu::testing::TestHost;
use vmmu::vcpu::{FaultAddr, Vcpu};
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Gpa, Gva, Level};

#[test]
fn guest_translations_and_guest_page_faults_with_error_codes() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, 0x20_0000, P | RW | US);
    s.map4k(0x4000_1000, 0x20_1000, P | US); // read-only
    s.map4k(0x4000_2000, 0x20_2000, P | RW); // supervisor
    s.map2m(0x8000_0000, 0x40_0000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x4000_0008, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(access(&mut v, 0x4000_0008, true), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(access(&mut v, 0x4000_1000, false), Seen::Ram(ram_pfn(0x20_1000)));
    assert_eq!(access(&mut v, 0x4000_1000, true), Seen::GuestPf(0x7), "read-only: P|W|U");
    assert_eq!(access(&mut v, 0x4000_2000, false), Seen::GuestPf(0x5), "supervisor: P|U");
    assert_eq!(access(&mut v, 0x4000_3000, false), Seen::GuestPf(0x4), "not present: U");
    // A 2 MiB guest page is shadowed with 4 KiB leaves of a direct page.
    assert_eq!(access(&mut v, 0x8012_3456, false), Seen::Ram(ram_pfn(0x52_3000)));
    assert_eq!(v.shadow_root_kind(), Some(ShadowRootKind::Page));
    assert!(v.stats.pf_guest >= 3);
    // The walker set the accessed and dirty bits in guest memory.
    let pte = s.read(s.entry_gpa(0x4000_0000, 1));
    assert_eq!(pte & 0x60, 0x60, "A and D set: {pte:#x}");
}

#[test]
fn mmio_is_cached_by_gva_and_in_mmio_sptes_and_never_trusted_after_a_slot_appears() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, MMIO_GPA, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    let gpa = Gpa(MMIO_GPA + 0x10);
    assert_eq!(access(&mut v, 0x4000_0010, false), Seen::Mmio(gpa, EmulateSource::SlowPathMmio));
    assert_eq!(access(&mut v, 0x4000_0010, false), Seen::Mmio(gpa, EmulateSource::VcpuCacheHit));
    // The GVA cache kept the guest's rights: a write is allowed (W set, dirty after the read?
    // the read left W out: protect_clean_gpte), so the cache does not answer it.
    let w = access(&mut v, 0x4000_0010, true);
    assert!(matches!(w, Seen::Mmio(g, _) if g == gpa), "{w:?}");
    // Another vCPU has no cache entry: it hits the MMIO SPTE through the lockless walk.
    let mut v2 = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v2, 0x4000_0010, false), Seen::Mmio(gpa, EmulateSource::MmioSpteHit));
    // A slot appears at the MMIO address: neither the cache nor the SPTE may answer.
    vm.set_memory_region(&UserspaceMemoryRegion::new(1, 0, MMIO_GPA, 0x1000, RAM_HVA + 0x300_0000))
        .unwrap();
    assert_eq!(access(&mut v, 0x4000_0010, false), Seen::Ram(ram_pfn(0x300_0000)));
    assert_eq!(access(&mut v2, 0x4000_0010, false), Seen::Ram(ram_pfn(0x300_0000)));
}

/// A shadow VM whose vCPU translates GVA 0x4000_0000 to RAM at 0x20_0000 through a table it also
/// maps as data ([`map_with_own_table`]): the VM, its host, the vCPU and the gPTE's gpa.
fn own_table_translating() -> (Vm<TestHost>, Arc<TestHost>, Vcpu<TestHost>, u64) {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let pte_gpa = map_with_own_table(&s, 0x20_0000);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    (vm, host, v, pte_gpa)
}

#[test]
fn a_guest_write_to_its_page_table_is_write_protected_and_tracked() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let pte_gpa = map_with_own_table(&s, MMIO_GPA);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert!(matches!(access(&mut v, 0x4000_0000, false), Seen::Mmio(..)));
    // Writing the table through its mapping exits for emulation: the table is shadowed.
    let at = 0x5000_0000 + (pte_gpa & 0xfff);
    assert_eq!(
        access(&mut v, at, true),
        Seen::Mmio(Gpa(pte_gpa), EmulateSource::WriteProtected),
        "a shadowed guest table must not be writable"
    );
    // The hypervisor emulates it: the GVA now maps RAM (the 2011 case: MMIO, then RAM).
    host.write_u64(RAM_HVA + pte_gpa, 0x20_0000 | P | RW | US);
    v.track_write(Gpa(pte_gpa), 8).unwrap();
    v.invlpg(Gva(0x4000_0000)).unwrap();
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    let st = vm.shadow_mmu().unwrap().stats.snapshot();
    assert!(st.mmu_pte_write >= 1, "{st:?}");
}

/// KVM since v6.4 (`kvm_mmu_invalidate_addr`): INVLPG syncs the SPTE only in unsync shadow
/// pages. This MMU has none (every shadowed guest table is write-protected), so INVLPG keeps
/// the synced leaf, and the next access through it translates with no fault (a fault would map a
/// written page writable again and dirty it in a logged slot, which KVM does not).
#[test]
fn invlpg_keeps_a_synced_shadow_leaf() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, 0x20_0000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    v.invlpg(Gva(0x4000_0000)).unwrap();
    v.service_requests().unwrap();
    v.enter_guest_mode().unwrap();
    let walk = v.walk_gva(Gva(0x4000_0000), vmmu::Access::USER);
    v.exit_guest_mode();
    assert!(
        matches!(walk, vmmu::tdp::HwWalk::Translated { pfn, .. } if pfn == ram_pfn(0x20_0000)),
        "the shadow leaf is gone after INVLPG: {walk:?}"
    );
}

/// KVM `FNAME(pte_prefetch)`: a fault also maps the not-present neighbours in the 8-aligned
/// group of its guest PTEs, in order, while they are present and accessed and their host pages
/// are mapped writable already (a dirty gPTE: writable); the first that is not ends it.
#[test]
fn a_fault_prefetches_accessed_neighbours_up_to_the_first_it_cannot() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    for i in 0..4 {
        s.map4k(0x4000_0000 + i * 0x1000, 0x20_0000 + i * 0x1000, P | RW | US);
    }
    let mut v = vcpu_in(&vm, long4(s.cr3));
    // Pages 1 and 3: written by the guest (gPTEs accessed and dirty, host pages written).
    assert_eq!(access(&mut v, 0x4000_1000, true), Seen::Ram(ram_pfn(0x20_1000)));
    assert_eq!(access(&mut v, 0x4000_3000, true), Seen::Ram(ram_pfn(0x20_3000)));
    // Every SPTE goes (delete, create again); the gPTEs keep their A/D bits.
    let region = |size| UserspaceMemoryRegion::new(0, 0, 0, size, RAM_HVA);
    vm.set_memory_region(&region(0)).unwrap();
    vm.set_memory_region(&region(RAM_SIZE)).unwrap();
    assert!(matches!(hw(&mut v, 0x4000_1000, false), vmmu::tdp::HwWalk::Violation { .. }));
    // A read of page 0 prefetches page 1 writable and stops at page 2 (never accessed).
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    let w = hw(&mut v, 0x4000_1000, true);
    assert!(
        matches!(w, vmmu::tdp::HwWalk::Translated { pfn, .. } if pfn == ram_pfn(0x20_1000)),
        "page 1 not prefetched writable: {w:?}"
    );
    for gva in [0x4000_2000, 0x4000_3000] {
        let w = hw(&mut v, gva, false);
        assert!(matches!(w, vmmu::tdp::HwWalk::Violation { .. }), "{gva:#x}: {w:?}");
    }
}

/// Guest tables and pages spread over two memslots, alternating level by level and page by
/// page: every gPTE read and every prefetch run must find its own slot (a fault's view of guest
/// memory and a prefetch keep the last slot they found, and must not use it for a gpa outside
/// it). Slot 1 aliases the upper half of slot 0's host memory at a gpa above 4 GiB, so a gpa
/// resolved through the wrong slot lands on another host page (or none) and the translation
/// shows it.
#[test]
fn guest_tables_and_pages_alternating_between_slots_translate_through_each_own_slot() {
    const A_D: u64 = 0x60;
    const SLOT1_GPA: u64 = 0x1_8000_0000;
    const SLOT1_OFF: u64 = 32 << 20;
    let (vm, host, _next) = shadow_vm(BugSet::NONE);
    let alias = UserspaceMemoryRegion::new(1, 0, SLOT1_GPA, 32 << 20, RAM_HVA + SLOT1_OFF);
    vm.set_memory_region(&alias).unwrap();
    // The host address and frame behind a gpa of either slot.
    let hva = |gpa: u64| {
        if gpa >= SLOT1_GPA {
            RAM_HVA + SLOT1_OFF + (gpa - SLOT1_GPA)
        } else {
            RAM_HVA + gpa
        }
    };
    let pfn = |gpa: u64| vmmu::Pfn(hva(gpa) >> 12);
    let entry = |table: u64, idx: u64, target: u64| {
        host.write_u64(hva(table + idx * 8), target | P | RW | US | A_D);
    };
    // PML4 in slot 0 -> PDPT in slot 1 -> PD in slot 0 -> PT in slot 1.
    let (pml4, pdpt, pd, pt) = (0x80_0000, SLOT1_GPA + 0x80_0000, 0x80_1000, SLOT1_GPA + 0x80_1000);
    let gva = 0x4000_0000u64;
    entry(pml4, 0, pdpt);
    entry(pdpt, 1, pd);
    entry(pd, 0, pt);
    // Eight pages, even ones in slot 0, odd ones in slot 1: a prefetch group of runs of one.
    let page = |i: u64| {
        if i % 2 == 0 {
            0x20_0000 + i * 0x1000
        } else {
            SLOT1_GPA + 0x20_0000 + i * 0x1000
        }
    };
    for i in 0..8 {
        entry(pt, i, page(i));
    }
    let mut v = vcpu_in(&vm, long4(pml4));
    // A write to each page, a fault each (the host maps a page for prefetching only once
    // written, as `get_user_pages_fast_only` finds only pages already mapped).
    for i in (0..8).rev() {
        assert_eq!(access(&mut v, gva + i * 0x1000, true), Seen::Ram(pfn(page(i))), "page {i}");
    }
    // With every leaf gone, one read faults and prefetches the other seven, each from its own
    // slot.
    vm.zap_all_fast();
    assert_eq!(access(&mut v, gva, false), Seen::Ram(pfn(page(0))));
    for i in 1..8 {
        let w = hw(&mut v, gva + i * 0x1000, true);
        assert!(
            matches!(w, vmmu::tdp::HwWalk::Translated { pfn: p, .. } if p == pfn(page(i))),
            "page {i} (gpa {:#x}) not prefetched from its slot: {w:?}",
            page(i)
        );
    }
}

#[test]
fn cr3_switches_reuse_previous_roots_and_clear_the_gva_cache() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let a = Space::new(&host, &next);
    let b = Space::new(&host, &next);
    a.map4k(0x4000_0000, 0x20_0000, P | RW | US);
    b.map4k(0x4000_0000, MMIO_GPA, P | RW | US);
    let mut v = vcpu_in(&vm, long4(a.cr3));
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    v.load_cr3(b.cr3).unwrap();
    assert!(matches!(access(&mut v, 0x4000_0000, false), Seen::Mmio(..)));
    assert!(matches!(
        access(&mut v, 0x4000_0000, false),
        Seen::Mmio(_, EmulateSource::VcpuCacheHit)
    ));
    let misses = vm.shadow_mmu().unwrap().stats.mmu_cache_miss.get();
    let loads = v.stats.root_loads;
    v.load_cr3(a.cr3).unwrap();
    // Space A maps the GVA to RAM: the GVA-keyed MMIO entry of space B must not answer.
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(vm.shadow_mmu().unwrap().stats.mmu_cache_miss.get(), misses, "A's root reused");
    assert_eq!(v.stats.root_loads, loads, "a previous root, not a new one");
}

/// A PAE guest's tables: a PDPT (32-byte aligned) whose first PDPTE links a PD, whose entry 2
/// links a PT, whose entry 3 maps GVA 0x40_3000 to RAM at 0x20_0000. Returns (pdpt, pd, pt).
fn pae_tables(host: &TestHost, next: &std::cell::Cell<u64>) -> (u64, u64, u64) {
    let table = || {
        let t = next.get();
        next.set(t + 0x1000);
        t
    };
    let (pdpt, pd, pt) = (table(), table(), table());
    host.write_u64(RAM_HVA + pdpt, pd | P);
    host.write_u64(RAM_HVA + pd + 8 * 2, pt | P | RW | US); // gva 0x40_0000..
    host.write_u64(RAM_HVA + pt + 8 * 3, 0x20_0000 | P | RW | US); // gva 0x40_3000
    (pdpt, pd, pt)
}

#[test]
fn pae_guests_use_a_special_root_that_retries_while_a_reload_is_pending() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    // PDPT at a 32-byte aligned address; one PD for the first GiB, one PT.
    let (pdpt, ..) = pae_tables(&host, &next);
    let mut v = vm.create_vcpu().unwrap();
    let cpu = GuestCpu { mode: PagingMode::Pae { pdptrs: [0; 4] }, ..long4(0) };
    v.set_guest_cpu(cpu).unwrap();
    v.load_cr3(pdpt).unwrap();
    assert_eq!(access(&mut v, 0x40_3000, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(v.shadow_root_kind(), Some(ShadowRootKind::Special));
    assert_eq!(access(&mut v, 0x40_4000, false), Seen::GuestPf(0x4));
    // A fast zap-all asks every vCPU to reload: a fault on the special root (no page to mark
    // obsolete) must retry until the vCPU has reloaded (18c841e1f411).
    vm.zap_all_fast();
    let o = v.handle_page_fault(Gva(0x40_3000), PfErr(PfErr::USER)).unwrap();
    assert_eq!(o, FaultOutcome::Retry(RetryCause::PagelessRootReloadPending));
    assert_eq!(access(&mut v, 0x40_3000, false), Seen::Ram(ram_pfn(0x20_0000)));
}

/// With both staleness checks gone (`no-stale-root-check`, KVM before a955cad84cda and
/// 18c841e1f411), a fault after a fast zap-all builds below the level-2 page the special root
/// pins, which the zap emptied and made invalid. The vCPU drops the root before it next enters
/// the guest, and that release zaps the page again, as KVM's `mmu_free_root_page` does: the
/// page built below it is no longer linked from a freed page, and later zaps and accesses work.
#[cfg(feature = "historical-bugs")]
#[test]
fn a_fault_below_a_zapped_special_root_page_is_unlinked_when_the_root_is_dropped() {
    let (vm, host, next) = shadow_vm(BugSet::only(vmmu::bugs::Bug::NoStaleRootCheck));
    let (pdpt, ..) = pae_tables(&host, &next);
    let mut v = vm.create_vcpu().unwrap();
    v.set_guest_cpu(GuestCpu { mode: PagingMode::Pae { pdptrs: [0; 4] }, ..long4(0) }).unwrap();
    v.load_cr3(pdpt).unwrap();
    assert_eq!(access(&mut v, 0x40_3000, false), Seen::Ram(ram_pfn(0x20_0000)));
    vm.zap_all_fast();
    // The bug: no retry, a shadow path is built below the zapped level-2 page.
    let o = v.handle_page_fault(Gva(0x40_3000), PfErr(PfErr::USER)).unwrap();
    assert_eq!(o, FaultOutcome::Fixed);
    // The next access drops the root (the reload request) and builds a new one.
    assert_eq!(access(&mut v, 0x40_3000, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(
        vm.stale_shadow_entries_for_tests().unwrap(),
        0,
        "a shadow page is still linked from a page the vCPU's release freed"
    );
    vm.zap_all_fast();
    assert_eq!(access(&mut v, 0x40_3000, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(vm.stale_shadow_entries_for_tests().unwrap(), 0);
}

/// KVM `kvm_set_cr3` under PAE: a MOV CR3 of the same value whose PDPTEs did not change (a
/// 32-bit OS's TLB flush) keeps the special root; a changed PDPTE, or another CR3, builds it
/// again. Every load clears the GVA part of the MMIO cache (the TLB flush).
#[test]
fn pae_cr3_reload_keeps_the_special_root_only_when_nothing_changed() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let (pdpt, pd, pt) = pae_tables(&host, &next);
    host.write_u64(RAM_HVA + pt + 8 * 4, MMIO_GPA | P | RW | US); // gva 0x40_4000
    let mut v = vm.create_vcpu().unwrap();
    v.set_guest_cpu(GuestCpu { mode: PagingMode::Pae { pdptrs: [0; 4] }, ..long4(0) }).unwrap();
    v.load_cr3(pdpt).unwrap();
    assert_eq!(access(&mut v, 0x40_3000, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(
        access(&mut v, 0x40_4000, false),
        Seen::Mmio(Gpa(MMIO_GPA), EmulateSource::SlowPathMmio)
    );
    let loads = v.stats.root_loads;
    // The same CR3, the same PDPTEs: the root stays, the GVA cache goes (an MMIO SPTE hit).
    v.load_cr3(pdpt).unwrap();
    assert_eq!(access(&mut v, 0x40_3000, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(v.stats.root_loads, loads, "nothing changed: the special root is kept");
    assert_eq!(
        access(&mut v, 0x40_4000, false),
        Seen::Mmio(Gpa(MMIO_GPA), EmulateSource::MmioSpteHit)
    );
    // A PDPTE changed (the guest adds a second PD; PDPTEs are not write-tracked, the reload
    // reads them): the root is built again and sees the new PDPTE.
    let pd2 = next.get();
    next.set(pd2 + 0x1000);
    host.write_u64(RAM_HVA + pdpt + 8, pd2 | P);
    host.write_u64(RAM_HVA + pd2, 0x40_0000 | P | RW | US | PS); // gva 0x4000_0000, 2 MiB
    v.load_cr3(pdpt).unwrap();
    assert_eq!(access(&mut v, 0x4000_1000, false), Seen::Ram(ram_pfn(0x40_1000)));
    assert_eq!(v.stats.root_loads, loads + 1, "changed PDPTEs: a new special root");
    // Another CR3 (the same PDPT 32 bytes on, a copy): a new root too.
    host.write_u64(RAM_HVA + pdpt + 32, pd | P);
    host.write_u64(RAM_HVA + pdpt + 40, pd2 | P);
    v.load_cr3(pdpt + 32).unwrap();
    assert_eq!(access(&mut v, 0x40_3000, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(v.stats.root_loads, loads + 2, "another CR3: a new special root");
}

/// A PAE guest switches CR3 as often as it likes: every special root lives in the vCPU's one
/// PAE root frame, allocated with the vCPU (KVM `mmu->pae_root`), so a CR3 load allocates
/// nothing below 4 GiB. Before, each load took a fresh frame below 4 GiB and gave the old one
/// back only after a grace period, in batches: a guest switching between two page-table trees
/// ran the host out of such frames (here 16) and its next access failed.
#[test]
fn pae_cr3_switches_reuse_the_vcpus_one_pae_root_frame() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let (pdpt, pd, _) = pae_tables(&host, &next);
    // A second PDPT (32 bytes on) over the same PD: another CR3, so another special root.
    host.write_u64(RAM_HVA + pdpt + 32, pd | P);
    let mut v = vm.create_vcpu().unwrap();
    v.set_guest_cpu(GuestCpu { mode: PagingMode::Pae { pdptrs: [0; 4] }, ..long4(0) }).unwrap();
    let switches = 4 * vmmu::testing::LOW_TABLES as u64 + 64;
    for i in 0..switches {
        v.load_cr3(pdpt + 32 * (i % 2)).unwrap();
        assert_eq!(
            access(&mut v, 0x40_3000, false),
            Seen::Ram(ram_pfn(0x20_0000)),
            "access after CR3 switch {i}"
        );
    }
    assert_eq!(v.stats.root_loads, switches, "every switch built a special root");
}

#[test]
fn recycling_keeps_the_page_limit_and_translations_right() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    vm.set_nr_mmu_pages(64).unwrap();
    let s = Space::new(&host, &next);
    // 100 GVAs, each in its own 1 GiB region: each needs its own level-2 and level-1 pages.
    let gvas: Vec<u64> = (0..100u64).map(|i| (i + 1) << 30).collect();
    for (i, &g) in gvas.iter().enumerate() {
        s.map4k(g, 0x20_0000 + ((i as u64) << 12), P | RW | US);
    }
    let mut v = vcpu_in(&vm, long4(s.cr3));
    for round in 0..2 {
        for (i, &g) in gvas.iter().enumerate() {
            let want = Seen::Ram(ram_pfn(0x20_0000 + ((i as u64) << 12)));
            assert_eq!(access(&mut v, g, false), want, "round {round} gva {g:#x}");
        }
    }
    let shadow = vm.shadow_mmu().unwrap();
    let st = shadow.stats.snapshot();
    assert!(st.mmu_recycled > 0, "{st:?}");
    assert!(shadow.pages_in_use() <= 64, "{} pages in use", shadow.pages_in_use());
}

#[test]
fn the_default_page_limit_follows_the_memslots_until_one_is_requested() {
    // KVM `kvm_mmu_calculate_default_mmu_pages` at every memslot creation and deletion: 2% of
    // the pages of all memslots, at least 64; `KVM_SET_NR_MMU_PAGES` fixes it.
    let (vm, host, _next) = shadow_vm(BugSet::NONE);
    let ram_pages = RAM_SIZE >> 12;
    assert_eq!(vm.shadow_max_pages(), Some((ram_pages * 20 / 1000) as usize), "2% of 64 MiB");
    let big_hva = 0x10_0000_0000u64;
    host.map(big_hva, 1 << 30, big_hva >> 12, Level::L4K, true);
    let big = UserspaceMemoryRegion::new(1, 0, 0x1_0000_0000, 1 << 30, big_hva);
    vm.set_memory_region(&big).unwrap();
    let pages = ram_pages + (1 << 18);
    assert_eq!(vm.shadow_max_pages(), Some((pages * 20 / 1000) as usize));
    vm.set_memory_region(&UserspaceMemoryRegion::new(1, 0, 0x1_0000_0000, 0, 0)).unwrap();
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 0, 0)).unwrap();
    assert_eq!(vm.shadow_max_pages(), Some(64), "deletions recompute it; at least 64");
    vm.set_nr_mmu_pages(100).unwrap();
    vm.set_memory_region(&big).unwrap();
    assert_eq!(vm.shadow_max_pages(), Some(100), "a requested limit stays");
    // KVM refuses fewer than 64 pages (EINVAL) and keeps the limit it had.
    let e = vm.set_nr_mmu_pages(63).unwrap_err();
    assert_eq!(e, vmmu::vm::VmError::TooFewShadowPages { requested: 63 });
    assert_eq!(vm.shadow_max_pages(), Some(100), "a refused limit changes nothing");
    let mut cfg = VmConfig::shadow(46).unwrap();
    cfg.shadow_max_pages = Some(0);
    assert!(matches!(
        Vm::new(cfg, host.clone()),
        Err(vmmu::vm::VmError::TooFewShadowPages { requested: 0 })
    ));
    let mut cfg = VmConfig::shadow(46).unwrap();
    cfg.shadow_max_pages = Some(500);
    let vm = Vm::new(cfg, host.clone()).unwrap();
    vm.set_memory_region(&big).unwrap();
    assert_eq!(vm.shadow_max_pages(), Some(500), "a configured limit is a requested one");
}

/// One vCPU maps GVA 0x4000_0000 to MMIO; another saw the MMIO SPTE (an RSVD #PF), then the
/// shrinker zapped the pages before its fault handler walked: returns what that fault ended as,
/// with the VM, its host and the second vCPU.
#[allow(clippy::type_complexity)]
fn rsvd_fault_after_a_shrink(
    bugs: BugSet,
) -> (Result<FaultOutcome, vmmu::fault::FaultError>, Vm<TestHost>, Arc<TestHost>, Vcpu<TestHost>) {
    let (vm, host, next) = shadow_vm(bugs);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, MMIO_GPA, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert!(matches!(access(&mut v, 0x4000_0000, false), Seen::Mmio(..)));
    let mut v2 = vcpu_in(&vm, long4(s.cr3));
    v2.service_requests().unwrap();
    assert!(vm.shrink_shadow_pages(1000) > 0);
    let o =
        v2.handle_page_fault(Gva(0x4000_0000), PfErr(PfErr::USER | PfErr::RSVD | PfErr::PRESENT));
    (o, vm, host, v2)
}

#[test]
fn a_lockless_walk_over_a_shrunk_page_retries_instead_of_reporting_a_misconfiguration() {
    // The walk finds the entry cleared.
    let (o, _vm, host, mut v2) = rsvd_fault_after_a_shrink(BugSet::NONE);
    assert_eq!(o, Ok(FaultOutcome::Retry(RetryCause::ZappedUnderWalk)));
    assert!(matches!(access(&mut v2, 0x4000_0000, false), Seen::Mmio(..)));
    assert_eq!(host.use_after_free(), 0);
}

#[test]
fn tdp_vms_refuse_shadow_entry_points() {
    let host = Arc::new(TestHost::new(16));
    let vm = Vm::new(VmConfig::new(vmmu::spte::FormatKind::Ept, 46).unwrap(), host).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    assert!(v.handle_page_fault(Gva(0x1000), PfErr(0)).is_err());
    assert!(v.invlpg(Gva(0x1000)).is_err());
    assert!(v.unprotect_gfn(vmmu::Gfn(1)).is_err());
    let mut cfg = VmConfig::shadow(46).unwrap();
    cfg.format = vmmu::spte::FormatKind::Ept;
    assert!(Vm::new(cfg, Arc::new(TestHost::new(16))).is_err());
}

/// The 2011 lockless-walk rule under shadow paging, re-injected: with `zapped-spte-is-misconfig`
/// the same shrink-under-walk sequence stops the vCPU with a "misconfiguration" (what KVM's
/// early lockless walk reported for a page another CPU zapped); without it the walk retries.
#[cfg(feature = "historical-bugs")]
#[test]
fn the_zapped_page_as_misconfig_bug_stops_the_vcpu_under_shadow_paging() {
    let (o, ..) = rsvd_fault_after_a_shrink(BugSet::only(vmmu::bugs::Bug::ZappedSpteIsMisconfig));
    assert!(
        matches!(o, Err(vmmu::fault::FaultError::Misconfig { .. })),
        "harm: the vCPU's run fails on a page the shrinker zapped; got {o:?}"
    );
}

/// Nested-style use (the "GVA" is an L2 guest's physical address): the GVA part of the MMIO
/// cache is never used, so a repeated MMIO access hits the MMIO SPTE, not the cache (KVM's Feb
/// 2019 rule); the same access without nesting is a cache hit.
#[test]
fn a_nested_walk_keeps_no_gva_in_the_mmio_cache() {
    for addr in [FaultAddr::Gva, FaultAddr::NestedGpa] {
        let nested = addr == FaultAddr::NestedGpa;
        let (vm, host, next) = shadow_vm(BugSet::NONE);
        let s = Space::new(&host, &next);
        s.map4k(0x4000_0000, MMIO_GPA, P | RW | US);
        let mut v = vcpu_in(&vm, long4(s.cr3));
        v.set_fault_addr(addr).unwrap();
        assert!(matches!(access(&mut v, 0x4000_0000, false), Seen::Mmio(..)));
        let second = access(&mut v, 0x4000_0000, false);
        let want = if nested { EmulateSource::MmioSpteHit } else { EmulateSource::VcpuCacheHit };
        assert_eq!(second, Seen::Mmio(Gpa(MMIO_GPA), want), "nested {nested}");
        let gen = vm.memslots().generation(vmmu::AsId(0)).unwrap();
        let cached = v.mmio_cache().lookup_gva(0x4000_0000, gen, BugSet::NONE).is_some();
        assert_eq!(cached, !nested, "nested {nested}");
    }
}

/// A shadow VM in dirty-log `mode` with logged slot 7: 4 pages at 4 GiB + 2 MiB, mapped
/// writable at GVAs 0x5000_0000... of the returned space.
fn logged_space(mode: vmmu::dirty::DirtyLogMode) -> (Vm<TestHost>, Space) {
    const LOG_GPA: u64 = 0x1_0020_0000;
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    vm.set_dirty_log_mode(mode);
    let s = Space::new(&host, &next);
    let log = vmmu::memslot::KVM_MEM_LOG_DIRTY_PAGES;
    let r = UserspaceMemoryRegion::new(7, log, LOG_GPA, 0x4000, RAM_HVA + 0x100_0000);
    vm.set_memory_region(&r).unwrap();
    for i in 0..4 {
        s.map4k(0x5000_0000 + i * 0x1000, LOG_GPA + i * 0x1000, P | RW | US);
    }
    (vm, s)
}

/// What a GET of slot 7 returns.
fn logged_pages(vm: &Vm<TestHost>) -> Vec<u64> {
    let w = vm.get_dirty_log(vmmu::AsId(0), vmmu::SlotId(7)).unwrap();
    vmmu::dirty::pages_of(&w).collect()
}

/// Dirty logging under shadow paging (issue 16 point 2): a guest write through a GVA marks the
/// page; the collection write-protects it through the reverse map, so the next write faults and
/// marks it again; a read marks nothing.
#[test]
fn shadow_paging_tracks_dirty_pages_through_the_rmap() {
    let (vm, s) = logged_space(vmmu::dirty::DirtyLogMode::Auto);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    let get = logged_pages;
    assert!(matches!(access(&mut v, 0x5000_1000, false), Seen::Ram(_)));
    assert!(matches!(access(&mut v, 0x5000_2000, true), Seen::Ram(_)));
    assert_eq!(get(&vm), vec![2], "only the written page");
    // Re-protected by the collection: the next write (through the cached shadow leaf) faults.
    assert!(matches!(access(&mut v, 0x5000_2008, true), Seen::Ram(_)));
    assert!(matches!(access(&mut v, 0x5000_3000, true), Seen::Ram(_)));
    assert_eq!(get(&vm), vec![2, 3]);
    assert_eq!(get(&vm), Vec::<u64>::new(), "collected and cleared");
}

/// A write fault that only gives a shadow leaf its write right back (after a dirty-log GET took
/// it) asks no vCPU to flush its TLB, as on the TDP MMU (`core_mutants.rs`,
/// `regaining_the_write_right_after_a_dirty_log_get_flushes_no_tlb`): KVM's `mmu_set_spte`
/// updates a present leaf of the same frame in place and flushes only when `mmu_spte_update`
/// took a right away. The MMU used to drop the leaf and flush every vCPU's TLB on each such
/// fault: a remote flush per page written in every dirty-log pass (KVM's
/// `remote_tlb_flush_requests` counted one more per fault), which also emptied the TLBs whose
/// stale writable entries a collection that forgets its flush (`Bug::DirtyLogNoFlush`) leaves,
/// so `vmmu selftest dirty-log-perf --format shadow` could not catch that bug.
#[test]
fn regaining_the_write_right_after_a_collection_flushes_no_tlb() {
    let (vm, s) = logged_space(vmmu::dirty::DirtyLogMode::Auto);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    for i in 0..4 {
        assert!(matches!(access(&mut v, 0x5000_0000 + i * 0x1000, true), Seen::Ram(_)));
    }
    let before_get = vm.stats().remote_tlb_flush_requests;
    assert_eq!(logged_pages(&vm), vec![0, 1, 2, 3]);
    let before = vm.stats().remote_tlb_flush_requests;
    assert_eq!(before, before_get + 1, "the GET write-protected four leaves: one flush");
    for i in 0..4 {
        assert!(matches!(access(&mut v, 0x5000_0008 + i * 0x1000, true), Seen::Ram(_)));
    }
    assert_eq!(vm.stats().remote_tlb_flush_requests, before, "regaining W flushed TLBs");
    assert_eq!(logged_pages(&vm), vec![0, 1, 2, 3], "every write faulted and was logged");
}

/// The shadow MMU marks before it installs, as the TDP MMU does (`tests/dirty_log.rs`,
/// `a_write_through_a_leaf_a_fault_just_installed_is_in_the_get_after_it`): vCPU 0's write fault
/// stops right after it installs the writable shadow leaf (`PreemptPoint::FaultInstalled`, the
/// shadow lock held); there vCPU 1, in the same space, writes through that leaf (its hardware
/// walk of the shadow tables translates writable) and the VMM GETs in manual mode: the page
/// must be in that GET. (With the mark after the install, it was not.)
#[test]
fn a_write_through_a_shadow_leaf_a_fault_just_installed_is_in_the_get_after_it() {
    use vmmu::host::PreemptPoint;
    let (vm, s) = logged_space(vmmu::dirty::DirtyLogMode::Manual);
    let mut v0 = vcpu_in(&vm, long4(s.cr3));
    let mut v1 = vcpu_in(&vm, long4(s.cr3));
    let get = logged_pages;
    // Written, collected and cleared: the leaf is read-only, the bit clear. vCPU 1 has its
    // path to the leaf (a read) so its walk below needs no fault.
    assert!(matches!(access(&mut v0, 0x5000_0000, true), Seen::Ram(_)));
    assert!(matches!(access(&mut v1, 0x5000_0000, false), Seen::Ram(_)));
    assert_eq!(get(&vm), [0]);
    vm.clear_dirty_log_all(vmmu::AsId(0), vmmu::SlotId(7), 0, 4).unwrap();
    assert_eq!(get(&vm), [] as [u64; 0]);
    let seen = Arc::new(std::sync::Mutex::new(None));
    let (racer, out) = (vm.clone(), seen.clone());
    // vCPU 1's pending requests (the CLEAR's flush) are handled now: in the hook vCPU 0's
    // fault holds the shadow lock, which handling them may need.
    v1.service_requests().unwrap();
    let mut v1 = Some(v1);
    vmmu::testing::preempt::on_this_thread(Some(Box::new(move |p| {
        if p != PreemptPoint::FaultInstalled {
            return;
        }
        let Some(mut v) = v1.take() else { return };
        let need = vmmu::Access::WRITE.union(vmmu::Access::USER);
        let wrote = v.enter_guest_mode().is_ok()
            && matches!(v.walk_gva(Gva(0x5000_0000), need), vmmu::tdp::HwWalk::Translated { .. });
        v.exit_guest_mode();
        // Handed back, not dropped here: dropping a vCPU frees its roots under the shadow lock.
        *out.lock().unwrap() = Some((wrote, get(&racer), v));
    })));
    let r = access(&mut v0, 0x5000_0008, true);
    vmmu::testing::preempt::on_this_thread(None);
    assert!(matches!(r, Seen::Ram(_)), "{r:?}");
    let (wrote, got, _v1) = seen.lock().unwrap().take().expect("the fault reached its install");
    assert!(wrote, "vCPU 1 writes through the new shadow leaf");
    assert_eq!(got, [0], "the GET after vCPU 1's write reports the page");
}

/// `VmConfig::shadow_mmio_path_only` (what KVM with MMIO caching off accounts): an MMIO fault
/// builds no shadow page, so a GVA whose path does not exist is emulated every time without an
/// MMIO SPTE; once a RAM access built the path, the MMIO SPTE goes into the existing table.
#[test]
fn mmio_faults_build_no_shadow_pages_with_shadow_mmio_path_only() {
    let (vm, host, next) = shadow_vm_with(|cfg| cfg.shadow_mmio_path_only = true);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, MMIO_GPA, P | RW | US);
    s.map4k(0x4000_1000, 0x20_0000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    let shadow = vm.shadow_mmu().unwrap();
    assert_eq!(
        access(&mut v, 0x4000_0000, false),
        Seen::Mmio(Gpa(MMIO_GPA), EmulateSource::SlowPathMmio)
    );
    let pages = shadow.pages_in_use();
    assert_eq!(pages, 1, "only the root");
    assert_eq!(v.stats.pf_mmio_spte_created, 0);
    // The RAM page next to it builds the path; then the MMIO fault installs its SPTE there.
    assert_eq!(access(&mut v, 0x4000_1000, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(shadow.pages_in_use(), 4, "PDPT, PD and PT pages");
    assert!(matches!(access(&mut v, 0x4000_0000, true), Seen::Mmio(..)));
    assert_eq!(v.stats.pf_mmio_spte_created, 1);
}

#[test]
fn a_root_zapped_while_in_use_counts_zapped_again_when_its_vcpu_frees_it() {
    // KVM: `kvm_zap_obsolete_pages` prepares the zap of a root a vCPU still uses (counting
    // `mmu_shadow_zapped`) and leaves it to the vCPU; its `mmu_free_root_page` prepares the zap
    // again, counting it a second time (/dev/kvm's per-step stats: one more at the vCPU's next
    // fault after a memslot delete).
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, 0x20_0000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    let shadow = vm.shadow_mmu().unwrap();
    let pages = shadow.pages_in_use() as u64;
    assert_eq!(pages, 4, "root, level 3, 2 and 1");
    vm.zap_all_fast();
    assert_eq!(shadow.stats.snapshot().mmu_shadow_zapped, pages);
    assert_eq!(vm.stats().mmu_shadow_zapped, pages);
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(shadow.stats.snapshot().mmu_shadow_zapped, pages + 1, "the root, again");
    assert_eq!(vm.stats().mmu_shadow_zapped, pages + 1);
}

/// A guest 1 GiB page (a guest whose CPUID has them) under shadow paging, as KVM shadows one:
/// the PDPT is shadowed, the 1 GiB below it by direct pages (a level-2 page for the whole GiB,
/// level-1 pages per 2 MiB touched). One guest page from gpa 0 covers the RAM slot (64 MiB,
/// which holds the guest's own tables) and MMIO above it: RAM translates at any offset, the
/// guest's tables stay write-protected through it, MMIO is emulated at the right gpa and cached
/// (SPTE, GVA); INVLPG of any address in the 1 GiB page drops the cached GVA of another 2 MiB of
/// it; the first write sets the PDPTE's D bit; bits 29:13 of it are reserved, and without 1 GiB
/// pages in CPUID so is PS.
#[test]
fn a_guest_1g_page_is_shadowed_by_direct_pages() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    const G: u64 = 0x80_0000_0000; // PML4 index 1, PDPT index 0
    let pdpte = s.entry_gpa(G, 3);
    host.write_u64(RAM_HVA + pdpte, P | RW | US | PS);
    let cpu = GuestCpu { gbpages: true, ..long4(s.cr3) };
    let mut v = vcpu_in(&vm, cpu);
    let pages = vm.shadow_mmu().unwrap().pages_in_use();
    assert_eq!(access(&mut v, G + 0x20_5008, true), Seen::Ram(ram_pfn(0x20_5000)));
    assert_eq!(s.read(pdpte), P | RW | US | PS | (1 << 5) | (1 << 6), "A and D set");
    // Root, shadowed PDPT, the direct level-2 page for the GiB, one direct level-1 page.
    assert_eq!(vm.shadow_mmu().unwrap().pages_in_use(), pages + 4);
    assert_eq!(access(&mut v, G + 0x3ff_f008, false), Seen::Ram(ram_pfn(0x3ff_f000)));
    assert_eq!(
        vm.shadow_mmu().unwrap().pages_in_use(),
        pages + 5,
        "another 2 MiB: one more level-1 page"
    );
    // The guest's PML4 lies inside the GiB: its leaf is read-only, a write is emulated.
    let cr3 = s.cr3;
    assert_eq!(access(&mut v, G + cr3, false), Seen::Ram(ram_pfn(cr3)));
    assert_eq!(access(&mut v, G + cr3, true), Seen::Mmio(Gpa(cr3), EmulateSource::WriteProtected));
    // MMIO above the slot, at both ends of what the GiB maps there.
    for gpa in [RAM_SIZE, 0x3fff_f000] {
        let first = access(&mut v, G + gpa + 8, false);
        assert_eq!(first, Seen::Mmio(Gpa(gpa + 8), EmulateSource::SlowPathMmio));
        let again = access(&mut v, G + gpa + 8, false);
        assert_eq!(again, Seen::Mmio(Gpa(gpa + 8), EmulateSource::VcpuCacheHit));
    }
    // INVLPG of an address of another 2 MiB of the same guest page drops the cached GVA.
    v.invlpg(Gva(G + 0x20_0000)).unwrap();
    let after = access(&mut v, G + 0x3fff_f008, false);
    assert_eq!(after, Seen::Mmio(Gpa(0x3fff_f008), EmulateSource::MmioSpteHit));
    // Reserved bits of a 1 GiB PDPTE, and PS without 1 GiB pages in CPUID.
    let rsvd = PfErr::RSVD | PfErr::PRESENT | PfErr::USER;
    for (value, gbpages) in [(P | RW | US | PS | (1 << 13), true), (P | RW | US | PS, false)] {
        // The guest's store to its (write-protected) PDPT, emulated and reported.
        host.write_u64(RAM_HVA + pdpte, value);
        v.track_write(Gpa(pdpte), 8).unwrap();
        let mut w = vcpu_in(&vm, GuestCpu { gbpages, ..long4(s.cr3) });
        assert_eq!(access(&mut w, G + 0x10_0000, false), Seen::GuestPf(rsvd), "{value:#x}");
    }
}

/// A data slot beside the RAM of [`shadow_vm`]: 2 MiB at gpa `DATA_GPA`.
const DATA_GPA: u64 = 0x2000_0000;
const DATA_HVA: u64 = 0x8000_0000;

fn add_data_slot(vm: &Vm<TestHost>, host: &TestHost) {
    host.map(DATA_HVA, 2 << 20, DATA_HVA >> 12, Level::L4K, true);
    vm.set_memory_region(&UserspaceMemoryRegion::new(1, 0, DATA_GPA, 2 << 20, DATA_HVA)).unwrap();
}

/// With `KVM_X86_QUIRK_SLOT_ZAP_ALL` off (`slot_zap_all: false`, the default here), deleting a
/// slot drops only the leaves mapping its frames: the shadow pages of guest tables elsewhere stay
/// and keep translating, the deleted slot's gfns become MMIO, and an MMIO gfn stays MMIO (its
/// SPTE is stale by generation). With the quirk, every page goes.
#[test]
fn a_delete_without_zap_all_zaps_only_what_the_slot_backs() {
    for zap_all in [false, true] {
        let (vm, host, next) = shadow_vm_with(|cfg| cfg.slot_zap_all = zap_all);
        add_data_slot(&vm, &host);
        let s = Space::new(&host, &next);
        s.map4k(0x4000_0000, 0x20_0000, P | RW | US);
        s.map4k(0x4000_1000, DATA_GPA, P | RW | US);
        s.map4k(0x4000_2000, MMIO_GPA, P | RW | US);
        let mut v = vcpu_in(&vm, long4(s.cr3));
        assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
        assert_eq!(access(&mut v, 0x4000_1000, false), Seen::Ram(vmmu::Pfn(DATA_HVA >> 12)));
        assert!(matches!(access(&mut v, 0x4000_2000, false), Seen::Mmio(..)));
        let shadow = vm.shadow_mmu().unwrap();
        let before = shadow.stats.snapshot();
        vm.set_memory_region(&UserspaceMemoryRegion::new(1, 0, DATA_GPA, 0, 0)).unwrap();
        let zapped = shadow.stats.snapshot().mmu_shadow_zapped - before.mmu_shadow_zapped;
        assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
        assert!(matches!(access(&mut v, 0x4000_1000, false), Seen::Mmio(Gpa(DATA_GPA), _)));
        assert!(matches!(access(&mut v, 0x4000_2000, false), Seen::Mmio(Gpa(MMIO_GPA), _)));
        let after = shadow.stats.snapshot();
        if zap_all {
            assert!(zapped >= 4, "zap-all: every page of the root goes ({zapped})");
            assert!(after.mmu_cache_miss > before.mmu_cache_miss, "pages built again");
        } else {
            assert_eq!(zapped, 0, "no guest table lies in the deleted slot");
            assert_eq!(after.mmu_cache_miss, before.mmu_cache_miss, "no page built again");
        }
    }
}

/// Deleting the slot that holds the guest's page tables without the quirk zaps the shadow pages
/// of those tables: a translation through a table no slot backs any more must not go on
/// (leaving them, the data page, in a slot still there, stayed mapped through them).
#[test]
fn a_delete_of_the_slot_holding_guest_tables_zaps_their_shadow_pages() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    add_data_slot(&vm, &host);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_1000, DATA_GPA, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x4000_1000, false), Seen::Ram(vmmu::Pfn(DATA_HVA >> 12)));
    let shadow = vm.shadow_mmu().unwrap();
    let before = shadow.stats.snapshot().mmu_shadow_zapped;
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 0, RAM_HVA)).unwrap();
    let walk = (0..5)
        .find_map(|_| {
            v.service_requests().unwrap();
            v.enter_guest().ok().map(|g| g.walk_gva(Gva(0x4000_1000), vmmu::Access::USER))
        })
        .expect("the vCPU enters once its requests are served");
    assert!(
        matches!(walk, vmmu::tdp::HwWalk::Violation { present: false, .. }),
        "translated through deleted tables: {walk:?}"
    );
    // The guest's walk reads a table no slot backs: a not-present #PF for the guest (KVM's
    // walker: an error hva is a fault with no P bit).
    let o = v.handle_page_fault(Gva(0x4000_1000), PfErr(PfErr::USER)).unwrap();
    let want = FaultOutcome::GuestPageFault { addr: Gva(0x4000_1000), error_code: PfErr(4) };
    assert_eq!(o, want);
    assert!(shadow.stats.snapshot().mmu_shadow_zapped >= before + 4, "the four table pages");
}

/// The walker's A/D updates dirty the guest tables they change (KVM
/// `FNAME(update_accessed_dirty_bits)`: `kvm_vcpu_mark_page_dirty` of the table's gfn; shadow
/// facts §2.2). Without it a migration copies a table before the update and never sends it again:
/// the destination's guest sees a page it wrote as clean.
#[test]
fn the_walkers_a_d_updates_dirty_the_guest_tables() {
    let host = Arc::new(TestHost::new(2048));
    host.map(RAM_HVA, RAM_SIZE, RAM_HVA >> 12, Level::L4K, true);
    let vm = Vm::new(VmConfig::shadow(46).unwrap(), host.clone()).unwrap();
    let log = vmmu::memslot::KVM_MEM_LOG_DIRTY_PAGES;
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, log, 0, RAM_SIZE, RAM_HVA)).unwrap();
    let next = std::rc::Rc::new(std::cell::Cell::new(TABLES_GPA));
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, 0x20_0000, P | RW | US);
    let tables: Vec<u64> = (1..=4u8).map(|l| s.entry_gpa(0x4000_0000, l) >> 12).collect();
    let mut v = vcpu_in(&vm, long4(s.cr3));
    vm.get_dirty_log(vmmu::AsId(0), vmmu::SlotId(0)).unwrap();
    // A write: A set at four levels and D in the leaf, by the walker's compare-exchange.
    assert_eq!(access(&mut v, 0x4000_0000, true), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(s.read(s.entry_gpa(0x4000_0000, 1)) & 0x60, 0x60, "A and D in the leaf");
    let words = vm.get_dirty_log(vmmu::AsId(0), vmmu::SlotId(0)).unwrap();
    let dirty: Vec<u64> = vmmu::dirty::pages_of(&words).collect();
    assert!(dirty.contains(&(0x20_0000 >> 12)), "the data page: {dirty:x?}");
    for t in tables {
        assert!(dirty.contains(&t), "table gfn {t:#x} updated but not dirty: {dirty:x?}");
    }
    // Nothing left to update: a second write sets no bit and dirties no table.
    vm.get_dirty_log(vmmu::AsId(0), vmmu::SlotId(0)).unwrap();
    assert_eq!(access(&mut v, 0x4000_0000, true), Seen::Ram(ram_pfn(0x20_0000)));
    let words = vm.get_dirty_log(vmmu::AsId(0), vmmu::SlotId(0)).unwrap();
    assert!(vmmu::dirty::pages_of(&words).all(|g| g == 0x20_0000 >> 12));
}

/// With 8-byte gPTEs a 4-byte write to one half of an entry is widened to the aligned entry
/// before the misaligned check (KVM `mmu_pte_write_fetch_gpte`): only that entry's SPTE goes,
/// the page stays (no `mmu_flooded`), and the next access faults it back in.
#[test]
fn a_four_byte_write_to_a_gpte_half_is_one_entry_not_a_misaligned_write() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let pte = s.map4k(0x4000_0000, 0x20_0000, P | RW | US);
    s.map4k(0x4000_1000, 0x20_1000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(access(&mut v, 0x4000_1000, false), Seen::Ram(ram_pfn(0x20_1000)));
    let shadow = vm.shadow_mmu().unwrap();
    let before = shadow.stats.snapshot();
    // A 4-byte store to the high half of the first gPTE: KVM takes it as that (aligned) entry.
    v.track_write(Gpa(pte + 4), 4).unwrap();
    let after = shadow.stats.snapshot();
    assert_eq!(after.mmu_flooded, before.mmu_flooded, "not misaligned");
    assert_eq!(after.mmu_shadow_zapped, before.mmu_shadow_zapped, "the page stays");
    assert!(matches!(
        hw_walk(&mut v, 0x4000_0000),
        vmmu::tdp::HwWalk::Violation { present: false, .. }
    ));
    assert!(
        matches!(hw_walk(&mut v, 0x4000_1000), vmmu::tdp::HwWalk::Translated { .. }),
        "neighbour"
    );
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
}

/// A 4-byte store at byte 6 of a gPTE writes bytes 6-7 of it and bytes 0-1 of the next one
/// (present, writable, user, accessed, dirty, frame bits 15:12): a misaligned write, which zaps
/// the page, so that after the guest's INVLPG of the next page the access follows the new
/// gPTE. KVM widens every 4-byte write to its aligned entry and keeps the next entry's SPTE
/// (its unsync last-level pages let the store through untrapped and INVLPG syncs the entry);
/// with no unsync pages that widening left the next SPTE stale for good: a page the guest made
/// not present still translated, a page it moved reached the old frame (review 56a).
#[test]
fn a_four_byte_store_crossing_into_the_next_gpte_is_misaligned() {
    use vmmu::fault::EmulateSource;
    let flags = P | RW | US | (1 << 5) | (1 << 6); // accessed and dirty already
                                                   // The low 16 bits gPTE 1 gets: none (not present), or present, writable, user, accessed,
                                                   // dirty with frame bits 13:12 = 3 (0x213000 instead of 0x210000).
    for (low, expected) in [(0u64, Seen::GuestPf(0x4)), (0x3067, Seen::Ram(ram_pfn(0x21_3000)))] {
        let (vm, host, next) = shadow_vm(BugSet::NONE);
        let s = Space::new(&host, &next);
        let pte0 = s.map4k(0x4000_0000, 0x20_0000, flags);
        let pte1 = s.map4k(0x4000_1000, 0x21_0000, flags);
        assert_eq!(pte1, pte0 + 8);
        // The guest maps its own last-level table at 0x5000_0000 to edit it.
        s.map4k(0x5000_0000, pte0 & !0xfff, flags);
        let mut v = vcpu_in(&vm, long4(s.cr3));
        assert_eq!(access(&mut v, 0x4000_1000, false), Seen::Ram(ram_pfn(0x21_0000)));
        // `mov dword [0x5000_0000 + off + 6], low << 16`: a write to a shadowed table, emulated.
        let at = 0x5000_0000 + (pte0 & 0xfff) + 6;
        let emulated = Seen::Mmio(Gpa(pte0 + 6), EmulateSource::WriteProtected);
        assert_eq!(access(&mut v, at, true), emulated, "{low:#x}");
        host.write_u64(RAM_HVA + pte1, (s.read(pte1) & !0xffff) | low);
        v.track_write(Gpa(pte0 + 6), 4).unwrap();
        v.invlpg(Gva(0x4000_1000)).unwrap();
        assert_eq!(
            access(&mut v, 0x4000_1000, false),
            expected,
            "gPTE 1's low bytes became {low:#x} by an emulated store and the guest invalidated \
             its page: the access must follow the new gPTE, not a stale SPTE"
        );
    }
}

/// The hardware walk of `gva` in guest mode, once the vCPU's requests are served.
fn hw_walk(v: &mut Vcpu<TestHost>, gva: u64) -> vmmu::tdp::HwWalk {
    (0..5)
        .find_map(|_| {
            v.service_requests().unwrap();
            v.enter_guest().ok().map(|g| g.walk_gva(Gva(gva), vmmu::Access::USER))
        })
        .expect("the vCPU enters once its requests are served")
}

/// A present write to a frame an upper-level shadow page tracks is emulated right after the
/// guest walk (KVM `page_fault_handle_page_track`): no fetch, so no prefetch of a neighbour that
/// became present meanwhile, and no page-limit refill (the next test).
#[test]
fn a_present_write_to_a_tracked_table_is_emulated_before_fetch() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, 0x20_0000, P | RW | US);
    let pd = s.entry_gpa(0x4000_0000, 2) & !0xfff;
    // GVA 0x5000_0000 maps the page directory as data; its neighbour is not present yet.
    s.map4k(0x5000_0000, pd, P | RW | US);
    let neighbour = s.entry_gpa(0x5000_1000, 1);
    s.map4k(0x4000_2000, 0x20_1000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    // The neighbour's page is one the host maps writable (written once), so a prefetch could map it.
    assert_eq!(access(&mut v, 0x4000_2000, true), Seen::Ram(ram_pfn(0x20_1000)));
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(access(&mut v, 0x5000_0000, false), Seen::Ram(ram_pfn(pd)));
    // The neighbour gPTE becomes present (accessed), written by the guest through the MMU.
    host.write_u64(RAM_HVA + neighbour, 0x20_1000 | P | RW | US | (1 << 5));
    v.track_write(Gpa(neighbour), 8).unwrap();
    assert!(matches!(hw_walk(&mut v, 0x5000_1000), vmmu::tdp::HwWalk::Violation { .. }));
    let emulated = Seen::Mmio(Gpa(pd), EmulateSource::WriteProtected);
    assert_eq!(access(&mut v, 0x5000_0000, true), emulated);
    let after = hw_walk(&mut v, 0x5000_1000);
    assert!(
        matches!(after, vmmu::tdp::HwWalk::Violation { present: false, .. }),
        "the emulated write prefetched a neighbour: {after:?}"
    );
}

/// The same early emulation recycles nothing, even with the page limit nearly reached.
#[test]
fn a_present_write_to_a_tracked_table_recycles_no_page() {
    let (vm, host, next) = shadow_vm_with(|cfg| cfg.shadow_max_pages = Some(64));
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, 0x20_0000, P | RW | US);
    let pd = s.entry_gpa(0x4000_0000, 2) & !0xfff;
    s.map4k(0x4000_1000, pd, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x4000_1000, false), Seen::Ram(ram_pfn(pd)));
    let shadow = vm.shadow_mmu().unwrap();
    // 60 of 64 pages in use: fewer free than KVM_MIN_FREE_MMU_PAGES, not yet recycled.
    let mut i = 1u64;
    while shadow.pages_in_use() < 60 {
        let gva = 0x4000_0000 + i * (2 << 20);
        s.map4k(gva, 0x20_0000, P | RW | US);
        assert_eq!(access(&mut v, gva, false), Seen::Ram(ram_pfn(0x20_0000)));
        i += 1;
    }
    assert_eq!(shadow.stats.snapshot().mmu_recycled, 0, "setup");
    let emulated = Seen::Mmio(Gpa(pd), EmulateSource::WriteProtected);
    assert_eq!(access(&mut v, 0x4000_1000, true), emulated);
    assert_eq!(shadow.stats.snapshot().mmu_recycled, 0, "KVM emulates before the refill");
    assert_eq!(shadow.pages_in_use(), 60);
}

/// A PAE guest's special root, and a non-paging guest's, lie below 4 GiB: in PAE paging CR3
/// holds a 32-bit address (KVM allocates `pae_root` with `__GFP_DMA32`), so a root above it
/// could not be loaded; the simulated hardware walk calls such a root `Broken`.
#[test]
fn special_roots_lie_below_4_gib() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let pdpt = alloc_table(&next);
    let pd = alloc_table(&next);
    let pt = alloc_table(&next);
    host.write_u64(RAM_HVA + pdpt, pd | P);
    host.write_u64(RAM_HVA + pd + 8 * 2, pt | P | RW | US);
    host.write_u64(RAM_HVA + pt + 8 * 3, 0x20_0000 | P | RW | US);
    let mut pae = vm.create_vcpu().unwrap();
    pae.set_guest_cpu(GuestCpu { mode: PagingMode::Pae { pdptrs: [0; 4] }, ..long4(0) }).unwrap();
    pae.load_cr3(pdpt).unwrap();
    assert_eq!(access(&mut pae, 0x40_3000, false), Seen::Ram(ram_pfn(0x20_0000)));
    let mut flat = vm.create_vcpu().unwrap();
    flat.set_guest_cpu(GuestCpu { mode: PagingMode::NonPaging, ..long4(0) }).unwrap();
    assert_eq!(access(&mut flat, 0x20_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    for v in [&mut pae, &mut flat] {
        v.service_requests().unwrap();
        let (root, level) = v.enter_guest().unwrap().root();
        assert_eq!(level, Level::L1G);
        assert!(root.raw() < 1 << 20, "a special root at {root:?} is above 4 GiB");
    }
}

/// The default `alloc_table_below_4g`, on a host whose table frames all lie at 4 GiB and up,
/// gives the frame it got back and answers `None` (a PAE root then fails as out of memory).
#[test]
fn the_default_low_table_allocation_refuses_a_high_frame_and_returns_it() {
    use vmmu::host::{FrameAllocator, TableEntries};
    struct HighOnly(TestHost);
    // SAFETY: every required method forwards to the test host, whose contract holds; the
    // provided `alloc_table_below_4g` is the trait's default, the code under test.
    unsafe impl FrameAllocator for HighOnly {
        fn alloc_table(&self, init: u64) -> Option<vmmu::Pfn> {
            self.0.alloc_table(init)
        }
        unsafe fn free_table(&self, pfn: vmmu::Pfn) {
            // SAFETY: the caller's contract, passed on.
            unsafe { self.0.free_table(pfn) }
        }
        fn table(&self, pfn: vmmu::Pfn) -> Option<std::ptr::NonNull<TableEntries>> {
            self.0.table(pfn)
        }
    }
    let h = HighOnly(TestHost::new(1));
    assert_eq!(h.alloc_table_below_4g(0), None);
    assert_eq!(h.0.tables_in_use(), 0, "the high frame went back");
    assert!(h.alloc_table(0).is_some(), "and can be had again");
}

/// A guest write to its own page table in a logged slot is emulated (the table is
/// write-protected); reporting it with `track_write` marks the table page dirty, as KVM's
/// `emulator_write_phys` does through `kvm_vcpu_write_guest`. Without it a migration's next pass
/// would not resend the table, and the destination would translate through the old entry.
#[test]
fn an_emulated_write_to_a_shadowed_table_is_in_the_dirty_log() {
    use vmmu::dirty::pages_of;
    use vmmu::memslot::KVM_MEM_LOG_DIRTY_PAGES;
    use vmmu::{AsId, SlotId};
    let (vm, host, mut v, pte_gpa) = own_table_translating();
    let table_gpa = pte_gpa & !0xfff;
    let logged = UserspaceMemoryRegion::new(0, KVM_MEM_LOG_DIRTY_PAGES, 0, RAM_SIZE, RAM_HVA);
    vm.set_memory_region(&logged).unwrap();
    // Collect once: what the guest walker's A/D updates marked so far goes.
    let _ = vm.get_dirty_log(AsId(0), SlotId(0)).unwrap();
    let at = 0x5000_0000 + (pte_gpa & 0xfff);
    let emulated = Seen::Mmio(Gpa(pte_gpa), EmulateSource::WriteProtected);
    assert_eq!(access(&mut v, at, true), emulated);
    host.write_u64(RAM_HVA + pte_gpa, 0x30_0000 | P | RW | US);
    v.track_write(Gpa(pte_gpa), 8).unwrap();
    let dirty: Vec<u64> = pages_of(&vm.get_dirty_log(AsId(0), SlotId(0)).unwrap()).collect();
    assert!(
        dirty.contains(&(table_gpa >> 12)),
        "table gfn {:#x} not in {dirty:x?}",
        table_gpa >> 12
    );
    // A write of no bytes wrote nothing; one across a page boundary wrote both pages.
    v.track_write(Gpa(0x70_0000), 0).unwrap();
    v.track_write(Gpa(0x71_0ffc), 8).unwrap();
    let dirty: Vec<u64> = pages_of(&vm.get_dirty_log(AsId(0), SlotId(0)).unwrap()).collect();
    assert_eq!(dirty, vec![0x710, 0x711]);
}

/// A guest flush of its whole TLB that is neither INVLPG nor MOV CR3 (CR4.PGE toggled, as
/// Linux's global flush does without INVPCID; INVPCID of all contexts; a paravirtual flush) is
/// KVM's `KVM_REQ_TLB_FLUSH_GUEST`, which with TDP off syncs the roots and so clears the vCPU's
/// MMIO GVA cache (shadow facts §4.4, §5.4). vmmu has no unsync pages to sync; it had no entry
/// point for such a flush either (review 56c), so a vCPU that cached an MMIO GVA kept it after
/// the guest moved the page and flushed: once another vCPU reinstalled the page's MMIO SPTE,
/// the RSVD fault hit the cache and was emulated at the old gpa. `Vcpu::flush_guest_tlb` clears
/// the GVA part, and the access follows the guest's tables.
#[test]
fn a_guest_flush_of_the_whole_tlb_clears_the_mmio_gva_cache() {
    use vmmu::fault::EmulateSource;
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let flags = P | RW | US | (1 << 5) | (1 << 6);
    let pte = s.map4k(0x4000_0000, MMIO_GPA, flags);
    // The guest maps its own last-level table to edit it.
    s.map4k(0x5000_0000, pte & !0xfff, flags);
    let mut v0 = vcpu_in(&vm, long4(s.cr3));
    let mut v1 = vcpu_in(&vm, long4(s.cr3));
    // vCPU 0 reads the MMIO page: the slow path, an MMIO SPTE, the GVA cached with MMIO_GPA.
    let slow = Seen::Mmio(Gpa(MMIO_GPA), EmulateSource::SlowPathMmio);
    assert_eq!(access(&mut v0, 0x4000_0000, false), slow);
    assert!(matches!(access(&mut v0, 0x4000_0000, false), Seen::Mmio(Gpa(MMIO_GPA), _)));
    // vCPU 1 moves the page one page up (a store to the table, emulated and tracked), then
    // invalidates it and reads it there, which puts the page's MMIO SPTE back.
    let at = 0x5000_0000 + (pte & 0xfff);
    assert_eq!(access(&mut v1, at, true), Seen::Mmio(Gpa(pte), EmulateSource::WriteProtected));
    let moved = MMIO_GPA + 0x1000;
    host.write_u64(RAM_HVA + pte, moved | flags);
    v1.track_write(Gpa(pte), 8).unwrap();
    v1.invlpg(Gva(0x4000_0000)).unwrap();
    assert!(matches!(access(&mut v1, 0x4000_0000, false), Seen::Mmio(Gpa(g), _) if g == moved));
    // The guest flushes vCPU 0's whole TLB (a CR4.PGE toggle, trapped under shadow paging).
    let work = v0.flush_guest_tlb().unwrap();
    assert!(work.flush_tlb, "the hypervisor flushes its TLB too");
    let seen = access(&mut v0, 0x4000_0000, false);
    assert!(
        matches!(seen, Seen::Mmio(Gpa(g), _) if g == moved),
        "after the guest's flush of its whole TLB vCPU 0 reached {seen:?}; the guest's tables \
         say {moved:#x} (a stale MMIO GVA cache entry answered)"
    );
}

/// KVM `kvm_mmu_unprotect_gfn_and_retry`: instead of emulating a trapped write to a guest table,
/// the hypervisor unprotects the frame and re-enters the guest. The write then maps the frame
/// writable and goes through untrapped; the table's shadow is gone, so what the guest wrote into
/// it is seen by the next walk through it, which shadows and write-protects the table again.
#[test]
fn an_unprotected_guest_table_takes_the_write_untrapped_and_is_shadowed_again_when_walked() {
    let (vm, host, mut v, pte_gpa) = own_table_translating();
    let table_gpa = pte_gpa & !0xfff;
    let at = 0x5000_0000 + (pte_gpa & 0xfff);
    let trapped = Seen::Mmio(Gpa(pte_gpa), EmulateSource::WriteProtected);
    assert_eq!(access(&mut v, at, true), trapped);
    let zapped = vm.shadow_mmu().unwrap().stats.snapshot().mmu_shadow_zapped;
    assert_eq!(v.unprotect_gfn(Gpa(pte_gpa).gfn()), Ok(true));
    assert!(vm.shadow_mmu().unwrap().stats.snapshot().mmu_shadow_zapped > zapped);
    // Re-executed, the write maps the table's frame writable: no exit.
    assert_eq!(access(&mut v, at, true), Seen::Ram(ram_pfn(table_gpa)));
    // The guest's store, untrapped and not reported: the GVA now maps another page.
    host.write_u64(RAM_HVA + pte_gpa, 0x20_1000 | P | RW | US);
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_1000)));
    // That walk shadowed the table again: the next write to it is trapped.
    assert_eq!(access(&mut v, at, true), trapped);
    // A frame no shadow page shadows: nothing to zap.
    assert_eq!(v.unprotect_gfn(vmmu::Gfn(0x20_1000 >> 12)), Ok(false));
}
