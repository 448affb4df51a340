//! Shadow paging at the edges of the guest-physical space: a guest whose MAXPHYADDR is above the
//! host's (shadow paging allows it: the memslot limit is 52 bits) maps gpas an MMIO SPTE cannot
//! hold.
#![cfg(not(loom))]

mod common;

use common::shadow::*;
use vmmu::bugs::BugSet;
use vmmu::fault::{EmulateSource, FaultError, PfErr};
use vmmu::guest::GuestCpu;
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::Gpa;

fn long4_52(cr3: u64) -> GuestCpu {
    GuestCpu { maxphyaddr: 52, ..long4(cr3) }
}

/// MMIO at a gpa above the host MAXPHYADDR (46): every access emulates that gpa, never the
/// low gpa its bits below 46 name (which is RAM here). An MMIO SPTE holds only the host's
/// physical-address bits, so such a gfn must not be cached in one (KVM emulates gfns above
/// the host's MAXPHYADDR without installing an SPTE).
#[test]
fn mmio_above_the_host_maxphyaddr_emulates_its_own_gpa() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let high = (1u64 << 50) | 0x20_0000;
    s.map4k(0x4000_0000, high, P | RW | US);
    let mut v = vcpu_in(&vm, long4_52(s.cr3));
    let mut w = vcpu_in(&vm, long4_52(s.cr3));
    let want = Gpa(high + 0x10);
    for vc in [&mut v, &mut w] {
        for _ in 0..3 {
            match access(vc, 0x4000_0010, false) {
                Seen::Mmio(gpa, _) => assert_eq!(gpa, want),
                other => panic!("{other:?}"),
            }
        }
    }
    // A slot up there (the shadow MMU maps up to 2^52): RAM.
    vm.set_memory_region(&UserspaceMemoryRegion::new(1, 0, high, 0x1000, RAM_HVA + 0x300_0000))
        .unwrap();
    assert_eq!(access(&mut v, 0x4000_0010, false), Seen::Ram(ram_pfn(0x300_0000)));
    assert_eq!(access(&mut w, 0x4000_0010, true), Seen::Ram(ram_pfn(0x300_0000)));
    let _ = EmulateSource::SlowPathMmio;
}

/// The last gfn of the shadow MMU's space (2^52 - 4 KiB) as a 1-page slot, and MMIO below it.
#[test]
fn the_last_gfn_of_2_to_the_52() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let top = (1u64 << 52) - 0x1000;
    s.map4k(0x4000_0000, top, P | RW | US);
    s.map4k(0x4000_1000, top - 0x1000, P | RW | US);
    vm.set_memory_region(&UserspaceMemoryRegion::new(1, 0, top, 0x1000, RAM_HVA + 0x300_0000))
        .unwrap();
    let mut v = vcpu_in(&vm, long4_52(s.cr3));
    let mut w = vcpu_in(&vm, long4_52(s.cr3));
    assert_eq!(access(&mut v, 0x4000_0000, true), Seen::Ram(ram_pfn(0x300_0000)));
    for vc in [&mut v, &mut w] {
        for _ in 0..3 {
            match access(vc, 0x4000_1008, false) {
                Seen::Mmio(gpa, _) => assert_eq!(gpa, Gpa(top - 0x1000 + 8)),
                other => panic!("{other:?}"),
            }
        }
    }
    let e = vm.set_memory_region(&UserspaceMemoryRegion::new(2, 0, top, 0x2000, RAM_HVA));
    assert!(e.is_err());
}

/// Dirty logging, a 2 MiB guest page and zaps of the whole space, for a slot at the top of
/// 2^52 under shadow paging, in both address spaces of an SMM VM.
#[test]
fn top_slot_dirty_logging_and_zaps_in_both_address_spaces() {
    use std::sync::Arc;
    use vmmu::memslot::KVM_MEM_LOG_DIRTY_PAGES;
    use vmmu::testing::TestHost;
    use vmmu::vm::{Vm, VmConfig};
    use vmmu::{AsId, Gfn, Level, SlotId};
    let host = Arc::new(TestHost::new(2048));
    host.map(RAM_HVA, RAM_SIZE, RAM_HVA >> 12, Level::L4K, true);
    let mut cfg = VmConfig::shadow(46).unwrap();
    cfg.nr_address_spaces = 2;
    let vm = Vm::new(cfg, host.clone()).unwrap();
    let next = std::rc::Rc::new(std::cell::Cell::new(TABLES_GPA));
    let top = (1u64 << 52) - 0x20_0000;
    for as_id in [0u32, 1] {
        vm.set_memory_region(&UserspaceMemoryRegion::new(as_id << 16, 0, 0, 0x80_0000, RAM_HVA))
            .unwrap();
        let flags = KVM_MEM_LOG_DIRTY_PAGES;
        let hva = RAM_HVA + 0x100_0000 + u64::from(as_id) * 0x20_0000;
        vm.set_memory_region(&UserspaceMemoryRegion::new(
            as_id << 16 | 1,
            flags,
            top,
            0x20_0000,
            hva,
        ))
        .unwrap();
    }
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, top + 0x1f_f000, P | RW | US);
    s.map2m(0x4020_0000, top, P | RW | US);
    let mut v = vcpu_in(&vm, long4_52(s.cr3));
    for as_id in [0u16, 1] {
        v.set_as_id(AsId(as_id)).unwrap();
        let base = (0x100_0000 + u64::from(as_id) * 0x20_0000) >> 12;
        assert_eq!(
            access(&mut v, 0x4000_0000, true),
            Seen::Ram(vmmu::Pfn(ram_pfn(0).raw() + base + 0x1ff))
        );
        assert_eq!(
            access(&mut v, 0x4020_3000, true),
            Seen::Ram(vmmu::Pfn(ram_pfn(0).raw() + base + 3))
        );
        let log = vm.get_dirty_log(AsId(as_id), SlotId(1)).unwrap();
        assert_eq!(log[7], 1 << 63, "{as_id}");
        assert_eq!(log[0], 1 << 3, "{as_id}");
        vm.zap_gfn_range_for_tests(AsId(as_id), Gfn(0), Gfn(u64::MAX >> 12));
        assert_eq!(
            access(&mut v, 0x4000_0000, false),
            Seen::Ram(vmmu::Pfn(ram_pfn(0).raw() + base + 0x1ff))
        );
    }
    drop(v);
    assert_eq!(host.use_after_free(), 0);
}

/// TDP-only entry points on a shadow vCPU are refused and leave it working: a pageless TDP
/// root would otherwise shadow the shadow root in the hardware walk (every access faulting
/// forever), and TDP exits have no meaning under shadow paging.
#[test]
fn tdp_entry_points_on_a_shadow_vcpu() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, 0x20_0000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert!(v.load_pageless_root().is_err());
    assert_eq!(access(&mut v, 0x4000_0000, true), Seen::Ram(ram_pfn(0x20_0000)));
    // The guard's walk (the hardware's) uses the shadow root.
    v.service_requests().unwrap();
    let walk = v.enter_guest().unwrap().walk_gva(vmmu::Gva(0x4000_0000), vmmu::Access::USER);
    assert!(
        matches!(walk, vmmu::tdp::HwWalk::Translated { pfn, .. } if pfn == ram_pfn(0x20_0000)),
        "{walk:?}"
    );
    let wrong = |r: Result<_, FaultError>| matches!(r, Err(FaultError::WrongMmu { .. }));
    assert!(wrong(v.handle_ept_violation(Gpa(0x20_0000), vmmu::FaultAccess::READ)));
    assert!(wrong(v.handle_ept_misconfig(Gpa(0x20_0000))));
    assert!(wrong(v.handle_npf(Gpa(0x20_0000), vmmu::fault::PfErr(!0))));
    assert!(wrong(v.handle_npf(Gpa(0x20_0000), vmmu::fault::PfErr(0))));
    assert_eq!(access(&mut v, 0x4000_0000, true), Seen::Ram(ram_pfn(0x20_0000)));
}

/// Guest CPU states at the edges: CR3 and PDPTEs at or above 2^52, MAXPHYADDR 0 and 255,
/// nonpaging gvas above 2^52: each access ends as RAM, MMIO, a guest #PF or a typed error.
#[test]
fn odd_guest_cpu_states_do_not_panic() {
    use vmmu::guest::PagingMode;
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, 0x20_0000, P | RW | US);
    let mut v = vm.create_vcpu().unwrap();
    let modes = [
        PagingMode::Long4,
        PagingMode::NonPaging,
        PagingMode::Pae { pdptrs: [u64::MAX; 4] },
        PagingMode::Pae { pdptrs: [((1 << 52) - 0x1000) | 1, 0, 1, s.cr3 | 1] },
    ];
    for mode in modes {
        for cr3 in [s.cr3, u64::MAX, (1 << 52) - 0x1000, 1 << 63] {
            for maxphyaddr in [0u8, 12, 36, 46, 52, 63, 64, 255] {
                let gbpages = maxphyaddr % 2 == 0;
                let cpu = GuestCpu { mode, cr3, cr0_wp: true, efer_nx: false, maxphyaddr, gbpages };
                v.set_guest_cpu(cpu).unwrap();
                let _ = v.load_cr3(cr3);
                for gva in [0x4000_0000u64, 0, !0xfff, 1 << 52, 0xffff_8000_0000_0000] {
                    for write in [false, true] {
                        try_access(&mut v, gva, write);
                    }
                }
            }
        }
    }
}

fn try_access(v: &mut vmmu::vcpu::Vcpu<vmmu::testing::TestHost>, gva: u64, write: bool) {
    use vmmu::fault::{FaultOutcome, PfErr};
    use vmmu::tdp::HwWalk;
    let need = if write { vmmu::Access::WRITE } else { vmmu::Access::NONE };
    for _ in 0..20 {
        if v.service_requests().is_err() {
            return;
        }
        let walk = match v.enter_guest() {
            Ok(g) => g.walk_gva(vmmu::Gva(gva), need),
            Err(_) => continue,
        };
        let err = match walk {
            HwWalk::Translated { .. } => return,
            HwWalk::Violation { present, .. } => {
                (if write { PfErr::WRITE } else { 0 }) | if present { PfErr::PRESENT } else { 0 }
            }
            HwWalk::Misconfig { .. } => PfErr::RSVD | PfErr::PRESENT,
            HwWalk::Broken { dump } => panic!("broken walk {dump:?}"),
        };
        match v.handle_page_fault(vmmu::Gva(gva), PfErr(err)) {
            Ok(FaultOutcome::Fixed | FaultOutcome::Spurious | FaultOutcome::Retry(_)) => {}
            _ => return,
        }
    }
}

/// A #PF exit at a gva the guest cannot reach (above 4 GiB without paging or with PAE,
/// non-canonical with 4-level paging) is #GP ([`FaultError::NonCanonical`]), even with RSVD set
/// and an MMIO SPTE at the address its low bits name. The shadow root covers only the reachable
/// addresses, so the MMIO fast path walked it with the high bits dropped and emulated the other
/// address's gpa (found by `tests/api_sequences.rs`: a non-paging guest's MMIO read at
/// 0x10_0000_2000, then an RSVD exit at 0x80_0000_2000, emulated gpa 0x10_0000_2000).
#[test]
fn an_unreachable_gva_is_gp_not_an_aliased_mmio_hit() {
    use vmmu::fault::{FaultOutcome, PfErr};
    use vmmu::guest::PagingMode;
    use vmmu::Gva;
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let non_canonical =
        |r: Result<FaultOutcome, FaultError>| matches!(r, Err(FaultError::NonCanonical(_)));
    // Without paging: gva = gpa; MMIO_GPA (4 GiB) is itself out of reach, so use a low hole.
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 0, 0)).unwrap();
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 0x10_0000, RAM_HVA)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    let mmio = 0x20_0000u64;
    assert!(matches!(access(&mut v, mmio, false), Seen::Mmio(..)));
    for high in [(1u64 << 32) | mmio, (1 << 39) | mmio, (1 << 63) | mmio] {
        for err in [PfErr::RSVD, 0, PfErr::WRITE | PfErr::RSVD] {
            let r = v.handle_page_fault(Gva(high), PfErr(err));
            assert!(non_canonical(r), "nonpaging {high:#x} err {err:#x}: {r:?}");
        }
    }
    assert!(matches!(access(&mut v, mmio, false), Seen::Mmio(..)), "the low gva still emulates");
    v.service_requests().unwrap();
    let walk = v.enter_guest().unwrap().walk_gva(Gva((1 << 32) | mmio), vmmu::Access::NONE);
    assert!(matches!(walk, vmmu::tdp::HwWalk::Violation { present: false, .. }), "{walk:?}");

    // 4-level paging: the kernel half's first page maps MMIO; its non-canonical twin (bit 47
    // set, bits 63:48 clear) indexes the same shadow entries.
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 0, 0)).unwrap();
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, RAM_SIZE, RAM_HVA)).unwrap();
    let s = Space::new(&host, &next);
    let kernel = 0xffff_8000_0000_0000u64;
    s.map4k(kernel, MMIO_GPA, P | RW);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    let seen = {
        v.service_requests().unwrap();
        v.handle_page_fault(Gva(kernel), PfErr(0)).unwrap()
    };
    assert!(matches!(seen, FaultOutcome::Emulate { .. }), "{seen:?}");
    let twin = kernel & 0x0000_ffff_ffff_ffff;
    // The hardware walk does not read the kernel page's entries for it either.
    v.service_requests().unwrap();
    let walk = v.enter_guest().unwrap().walk_gva(Gva(twin), vmmu::Access::NONE);
    assert!(matches!(walk, vmmu::tdp::HwWalk::Violation { present: false, .. }), "{walk:?}");
    let r = v.handle_page_fault(Gva(twin), PfErr(PfErr::RSVD));
    assert!(non_canonical(r), "non-canonical {twin:#x}: {r:?}");
    assert!(matches!(v.guest_cpu().map(|c| c.mode), Some(PagingMode::Long4)));
}

/// A non-paging guest's special root that runs out of table frames part way unpins the pages it
/// had linked, so the next zap-all frees them. Before, the pages linked before the failure kept
/// a pin from a root that never came to be: a zap made them invalid but could never free them,
/// and their frames stayed in use for the VM's life.
#[test]
fn a_special_root_short_of_frames_leaves_nothing_pinned() {
    use std::sync::Arc;
    use vmmu::testing::TestHost;
    use vmmu::vm::{Vm, VmConfig};
    use vmmu::Level;
    // The root's own frame comes from the test host's frames below 4 GiB; one per direct page
    // from its `nr_tables`: 1 to 3 frames fail at the 2nd to 4th page.
    for nr_tables in 1..=3 {
        let host = Arc::new(TestHost::new(nr_tables));
        host.map(RAM_HVA, RAM_SIZE, RAM_HVA >> 12, Level::L4K, true);
        let mut cfg = VmConfig::shadow(46).unwrap();
        cfg.slot_zap_all = true;
        let vm = Vm::new(cfg, host.clone()).unwrap();
        vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, RAM_SIZE, RAM_HVA)).unwrap();
        let cpu = GuestCpu::non_paging(46);
        let mut v = vcpu_in(&vm, cpu);
        try_access(&mut v, 0x1000, false);
        // A delete zaps all (KVM's quirk), and every obsolete page goes.
        vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 0, RAM_HVA)).unwrap();
        drop(v);
        let pages = vm.shadow_mmu().expect("shadow").stats.snapshot().shadow_pages;
        assert_eq!(pages, 0, "{nr_tables} frames: shadow pages left pinned");
    }
}

/// A walk of the other MMU kind (a gpa walk on a shadow-paging vCPU, whose hardware walks gvas,
/// or the reverse) is a not-present violation, never a walk of the root's entries as if the
/// address were of the other kind (a silent wrong translation), and the exit handler of that
/// kind answers `WrongMmu`, as every other entry point of the other kind answers an error
/// (review 58b: these walks panicked, while the entry points return errors).
#[test]
fn a_walk_of_the_other_kind_is_a_violation_whose_exit_answers_wrong_mmu() {
    use vmmu::spte::FormatKind;
    use vmmu::tdp::HwWalk;
    use vmmu::vm::MmuKind;
    let not_present = |w: HwWalk| matches!(w, HwWalk::Violation { present: false, .. });
    // A gpa walk on a shadow-paging vCPU, raw and through the guard.
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    v.service_requests().unwrap();
    {
        let g = v.enter_guest().unwrap();
        assert!(not_present(g.walk(Gpa(0x1000), vmmu::Access::USER)));
    }
    v.enter_guest_mode().unwrap();
    assert!(not_present(v.walk(Gpa(0x1000), vmmu::Access::USER)));
    v.exit_guest_mode();
    let e = v.handle_ept_violation(Gpa(0x1000), vmmu::FaultAccess::READ).unwrap_err();
    assert!(matches!(e, FaultError::WrongMmu { wanted: MmuKind::Tdp }), "{e}");
    // A gva walk on a TDP vCPU, raw and through the guard.
    let (vm, _host) = common::vm(FormatKind::Ept);
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    {
        let g = v.enter_guest().unwrap();
        assert!(not_present(g.walk_gva(vmmu::Gva(0x1000), vmmu::Access::USER)));
    }
    v.enter_guest_mode().unwrap();
    assert!(not_present(v.walk_gva(vmmu::Gva(0x1000), vmmu::Access::USER)));
    v.exit_guest_mode();
    let e = v.handle_page_fault(vmmu::Gva(0x1000), PfErr(PfErr::USER)).unwrap_err();
    assert!(matches!(e, FaultError::WrongMmu { wanted: MmuKind::Shadow }), "{e}");
}

/// A guest CR3 that no memslot covers (KVM v6.6: the dummy root): a user read is a
/// not-present guest #PF, not a host error; once a slot covers the tables again the same
/// access translates.
#[test]
fn a_cr3_outside_every_slot_faults_until_a_slot_covers_it() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, 0x20_0000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 0, 0)).unwrap();
    for _ in 0..2 {
        assert_eq!(access(&mut v, 0x4000_0000, false), Seen::GuestPf(PfErr::USER));
        assert_eq!(access(&mut v, 0x4000_0000, true), Seen::GuestPf(PfErr::USER | PfErr::WRITE));
    }
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, RAM_SIZE, RAM_HVA)).unwrap();
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(access(&mut v, 0x4000_0000, true), Seen::Ram(ram_pfn(0x20_0000)));
}

/// A guest page directory in a read-only memslot, also mapped as data: a store to it through
/// that mapping is a write to read-only memory. KVM emulates it (the directory is shadowed, so
/// write-tracked), the emulator's write fails on the read-only slot and exits to userspace as
/// MMIO: a read-only write, as for any page of the slot, never "emulate into RAM" (which would
/// write the slot's backing memory).
#[test]
fn a_store_to_a_shadowed_directory_in_a_read_only_slot_is_a_read_only_write() {
    const RO_GPA: u64 = 0x1_8000_0000;
    const RO_OFF: u64 = 32 << 20;
    const A: u64 = 0x20;
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let ro = UserspaceMemoryRegion::new(
        1,
        vmmu::memslot::KVM_MEM_READONLY,
        RO_GPA,
        2 << 20,
        RAM_HVA + RO_OFF,
    );
    vm.set_memory_region(&ro).unwrap();
    let (pml4, pdpt, pt, pt2) =
        (alloc_table(&next), alloc_table(&next), alloc_table(&next), alloc_table(&next));
    let pd = RO_GPA;
    let w = |gpa: u64, v: u64| host.write_u64(RAM_HVA + gpa, v);
    w(pml4, pdpt | P | RW | US | A);
    w(pdpt + 8, pd | P | RW | US | A);
    host.write_u64(RAM_HVA + RO_OFF, pt | P | RW | US | A); // pd[0]: gva 0x4000_0000..
    host.write_u64(RAM_HVA + RO_OFF + 8, pt2 | P | RW | US | A); // pd[1]: gva 0x4020_0000..
    w(pt, 0x20_0000 | P | RW | US | A);
    w(pt2, pd | P | RW | US | A | 0x40); // gva 0x4020_0000 -> the directory itself, dirty
    let mut v = vcpu_in(&vm, long4(pml4));
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(access(&mut v, 0x4020_0010, false), Seen::Ram(ram_pfn(RO_OFF)));
    assert_eq!(
        access(&mut v, 0x4020_0010, true),
        Seen::Mmio(Gpa(pd + 0x10), EmulateSource::ReadOnlyWrite)
    );
}
