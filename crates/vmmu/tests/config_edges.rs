//! Configuration edges through the public API: every MAXPHYADDR 36..=52 with EPT and NPT, the
//! last gfn of the guest-physical space, 1-page slots, MMIO next to them, deletes and zaps near
//! the top, dirty logging, and odd call orders of the vCPU entry points.
#![cfg(not(loom))]

mod common;

use common::{access, region, vm_with, Seen, RAM_HVA};
use vmmu::fault::{EmulateSource, FaultOutcome};
use vmmu::memslot::KVM_MEM_LOG_DIRTY_PAGES;
use vmmu::spte::FormatKind;
use vmmu::vm::VmConfig;
use vmmu::{AsId, Gfn, Gpa, Pfn, SlotId};

const FORMATS: [FormatKind; 2] = [FormatKind::Ept, FormatKind::Npt];

fn is_mmio(s: Seen) -> bool {
    matches!(s, Seen::Mmio(_))
}

/// A 1-page slot at the last gfn, a 2 MiB slot just below it, MMIO between and above them:
/// every access translates to the right frame or emulates, for every MAXPHYADDR and format.
#[test]
fn the_top_of_the_guest_physical_space_maps_and_emulates() {
    top_of_the_space(false);
}

/// The same on a type-stable host: the fast path's leaf-table cache answers without a read
/// section.
#[test]
fn the_top_of_the_guest_physical_space_on_a_type_stable_host() {
    top_of_the_space(true);
}

/// The same on hosts with the L1TF bug: MMIO SPTEs force 5 bits below the L1D width to 1 and
/// move the gpa's bits there 5 bits up.
#[test]
fn the_top_of_the_guest_physical_space_with_l1tf() {
    top_of_the_space_on(false, true, false);
}

/// The same with MMIO caching disallowed by the user, and with the memslot generation a few
/// updates before the MMIO generation wraps.
#[test]
fn the_top_of_the_guest_physical_space_uncached_and_near_the_wrap() {
    top_of_the_space_with(false, false, false, |cfg| cfg.mmio_caching = false);
    top_of_the_space_with(false, false, false, |cfg| cfg.generation_base = (1 << 19) - 4);
}

/// The same with 5-level tables at every MAXPHYADDR (KVM may use them below 49 bits too).
#[test]
fn the_top_of_the_guest_physical_space_with_5_levels_everywhere() {
    top_of_the_space_on(false, false, true);
}

fn top_of_the_space(type_stable: bool) {
    top_of_the_space_on(type_stable, false, false);
}

fn top_of_the_space_on(type_stable: bool, l1tf: bool, five: bool) {
    top_of_the_space_with(type_stable, l1tf, five, |_| {});
}

fn top_of_the_space_with(type_stable: bool, l1tf: bool, five: bool, tweak: fn(&mut VmConfig)) {
    let configs: Vec<(u8, Option<u8>)> = if l1tf {
        (36u8..=52).flat_map(|b| [(b, Some(b)), (b, Some(46.max(b))), (b, Some(52))]).collect()
    } else {
        (36u8..=52).map(|b| (b, None)).collect()
    };
    for (bits, cache) in configs {
        let mut formats = FORMATS.to_vec();
        if bits <= 51 {
            formats.extend([FormatKind::NptSev { c_bit: bits }, FormatKind::NptSev { c_bit: 51 }]);
        }
        for f in formats {
            let mut cfg = VmConfig::new(f, bits).unwrap();
            if five {
                cfg.root_level = vmmu::Level::L5;
            }
            tweak(&mut cfg);
            if let Some(c) = cache {
                cfg.host_cpu = cfg.host_cpu.with_l1tf(c).unwrap();
            }
            let n = common::test_frames();
            let host = if type_stable {
                vmmu::testing::TestHost::new_type_stable(n)
            } else {
                vmmu::testing::TestHost::new(n)
            };
            let (vm, h) = common::vm_on(cfg, host);
            let top = (1u64 << bits) - 0x1000;
            let huge = (1u64 << bits) - 0x40_0000;
            vm.set_memory_region(&region(0, top, 0x1000, RAM_HVA, 0)).unwrap();
            vm.set_memory_region(&region(1, huge, 0x20_0000, RAM_HVA + 0x20_0000, 0)).unwrap();
            // One past the top: KVM's max gfn check (EINVAL).
            let e = vm.set_memory_region(&region(2, top + 0x1000 - 0x2000, 0x2000, RAM_HVA, 0));
            assert!(e.is_err(), "{bits} {f:?}: overlapping the top slot");
            let e = vm.set_memory_region(&region(2, 1u64 << bits, 0x1000, RAM_HVA, 0));
            assert_eq!(e.unwrap_err().errno().to_string(), "EINVAL", "{bits} {f:?}");
            let mut v = vm.create_vcpu().unwrap();
            let mut w = vm.create_vcpu().unwrap();
            let ctx = format!("{bits} {cache:?} {f:?}");
            assert_eq!(
                access(&mut v, top + 8, true).unwrap().0,
                Seen::Ram(Pfn(RAM_HVA >> 12)),
                "{ctx}"
            );
            assert_eq!(
                access(&mut w, top, false).unwrap().0,
                Seen::Ram(Pfn(RAM_HVA >> 12)),
                "{ctx}"
            );
            let (s, _) = access(&mut v, huge + 0x1_2345, false).unwrap();
            assert_eq!(s, Seen::Ram(Pfn(((RAM_HVA + 0x20_0000) >> 12) + 0x12)), "{ctx}");
            // MMIO at the gfn below the top slot, and at the other end of the space.
            for gpa in [top - 0x1000, huge - 0x1000, 0, 0xfee0_0000 & ((1u64 << bits) - 1)] {
                let (s, _) = access(&mut v, gpa, false).unwrap();
                assert!(is_mmio(s), "{ctx} {gpa:#x}: {s:?}");
                let (s, _) = access(&mut v, gpa, false).unwrap();
                assert!(is_mmio(s), "{ctx} {gpa:#x}: {s:?}");
                let (s, _) = access(&mut w, gpa, true).unwrap();
                assert!(is_mmio(s), "{ctx} {gpa:#x}: {s:?}");
            }
            // The MMIO SPTE keeps the gfn: a cached hit emulates the right page.
            let o = w.handle_npf_or_misconfig(top - 0x1000);
            if let Some(FaultOutcome::Emulate { gpa, .. }) = o {
                assert_eq!(gpa, Gpa(top - 0x1000), "{ctx}");
            }
            // A vCPU with an empty cache hits the MMIO SPTE and caches the gfn it decodes.
            let mut x = vm.create_vcpu().unwrap();
            x.service_requests().unwrap();
            let o = x.handle_npf_or_misconfig(top - 0x1000);
            if vm.mmio_caching_enabled() {
                assert!(
                    matches!(
                        o,
                        Some(FaultOutcome::Emulate { source: EmulateSource::MmioSpteHit, .. })
                    ),
                    "{ctx}: {o:?}"
                );
                assert_eq!(
                    x.mmio_cache().entry().map(|e| e.0),
                    Some(Gfn((top >> 12) - 1)),
                    "{ctx}"
                );
            }
            drop(x);
            // Delete the top slot: its gfn becomes MMIO; the huge slot's frames stay right.
            vm.set_memory_region(&region(0, top, 0, 0, 0)).unwrap();
            let (s, _) = access(&mut v, top, false).unwrap();
            assert!(is_mmio(s), "{ctx}: deleted top slot still maps: {s:?}");
            let (s, _) = access(&mut w, top, true).unwrap();
            assert!(is_mmio(s), "{ctx}: deleted top slot still maps: {s:?}");
            // Created again, with another frame: the stale MMIO decision goes.
            vm.set_memory_region(&region(0, top, 0x1000, RAM_HVA + 0x1000, 0)).unwrap();
            let want = Seen::Ram(Pfn((RAM_HVA >> 12) + 1));
            assert_eq!(access(&mut v, top, false).unwrap().0, want, "{ctx}");
            assert_eq!(access(&mut w, top, true).unwrap().0, want, "{ctx}");
            // Dirty logging on the top slot.
            vm.set_memory_region(&region(
                0,
                top,
                0x1000,
                RAM_HVA + 0x1000,
                KVM_MEM_LOG_DIRTY_PAGES,
            ))
            .unwrap();
            assert_eq!(access(&mut v, top, true).unwrap().0, want, "{ctx}");
            let log = vm.get_dirty_log(AsId(0), SlotId(0)).unwrap();
            assert_eq!(log, vec![1], "{ctx}");
            assert_eq!(access(&mut v, top, true).unwrap().0, want, "{ctx}");
            assert_eq!(vm.get_dirty_log(AsId(0), SlotId(0)).unwrap(), vec![1], "{ctx}");
            // A zap of the last gfns, and of a range ending at the top.
            vm.zap_gfn_range_for_tests(AsId(0), Gfn(top >> 12), Gfn((1u64 << bits) >> 12));
            vm.zap_gfn_range_for_tests(AsId(0), Gfn(0), Gfn(u64::MAX >> 12));
            assert_eq!(access(&mut v, top, false).unwrap().0, want, "{ctx}");
            let (s, _) = access(&mut w, huge, false).unwrap();
            assert_eq!(s, Seen::Ram(Pfn((RAM_HVA + 0x20_0000) >> 12)), "{ctx}");
            drop((v, w));
            vm.zap_all_fast();
            vm.reclaim();
            assert_eq!(h.use_after_free(), 0, "{ctx}");
        }
    }
}

trait Raw {
    fn handle_npf_or_misconfig(&mut self, gpa: u64) -> Option<FaultOutcome>;
}

impl Raw for vmmu::vcpu::Vcpu<vmmu::testing::TestHost> {
    fn handle_npf_or_misconfig(&mut self, gpa: u64) -> Option<FaultOutcome> {
        let r = if self.format().is_ept() {
            self.handle_ept_misconfig(Gpa(gpa))
        } else {
            self.handle_npf(Gpa(gpa), vmmu::fault::PfErr(vmmu::fault::PfErr::RSVD))
        };
        r.ok()
    }
}

/// Entry points called in odd orders and with odd arguments: typed outcomes, no panic.
#[test]
fn odd_call_orders_do_not_panic() {
    for f in FORMATS {
        let (vm, _h) = vm_with(VmConfig::new(f, 46).unwrap());
        let mut v = vm.create_vcpu().unwrap();
        // Faults before any root is loaded.
        let o = v.handle_ept_violation(Gpa(0x1000), vmmu::FaultAccess::READ).unwrap();
        assert!(matches!(o, FaultOutcome::Retry(_)), "{o:?}");
        let o = v.handle_ept_misconfig(Gpa(0x1000)).unwrap();
        assert!(matches!(o, FaultOutcome::Retry(_)), "{o:?}");
        let o = v.handle_npf(Gpa(0x1000), vmmu::fault::PfErr(!0)).unwrap();
        assert!(matches!(o, FaultOutcome::Retry(_)), "{o:?}");
        // Exit before enter, twice.
        v.exit_guest_mode();
        v.exit_guest_mode();
        v.service_requests().unwrap();
        v.service_requests().unwrap();
        v.enter_guest_mode().unwrap();
        v.enter_guest_mode().unwrap();
        v.service_requests().unwrap();
        v.exit_guest_mode();
        // Extreme addresses and error codes.
        for gpa in [u64::MAX, 1 << 63, 1 << 52, (1 << 52) - 1, 1 << 46, (1 << 46) - 1] {
            let _ = v.handle_ept_violation(Gpa(gpa), vmmu::FaultAccess::WRITE);
            let _ = v.handle_ept_misconfig(Gpa(gpa));
            let _ = v.handle_npf(Gpa(gpa), vmmu::fault::PfErr(!0));
            let _ = v.handle_npf(Gpa(gpa), vmmu::fault::PfErr(0));
            let _ = v.handle_npf(Gpa(gpa), vmmu::fault::PfErr(vmmu::fault::PfErr::RSVD));
        }
        // Shadow entry points on a TDP vCPU: typed errors.
        assert!(v.invlpg(vmmu::Gva(0)).is_err());
        assert!(v.set_fault_addr(vmmu::vcpu::FaultAddr::NestedGpa).is_err());
        // A pageless root, then faults.
        v.load_pageless_root().unwrap();
        let _ = v.handle_ept_violation(Gpa(0x1000), vmmu::FaultAccess::READ);
        v.service_requests().unwrap();
        // Dropping the VM handle while vCPUs live; then the vCPUs go on and drop.
        let mut w = vm.create_vcpu().unwrap();
        drop(vm);
        let _ = access(&mut w, 0x1000, true).unwrap();
        drop(v);
        drop(w);
    }
}

/// The most vCPUs, indexes reused, and more refused with a typed error.
#[test]
fn max_vcpus_and_index_reuse() {
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.max_vcpus = 64;
    let (vm, _h) = vm_with(cfg);
    vm.set_memory_region(&region(0, 0, 0x1000, RAM_HVA, 0)).unwrap();
    let mut vs: Vec<_> = (0..64).map(|_| vm.create_vcpu().unwrap()).collect();
    assert!(vm.create_vcpu().is_err());
    for v in vs.iter_mut() {
        assert_eq!(access(v, 0, true).unwrap().0, Seen::Ram(Pfn(RAM_HVA >> 12)));
    }
    vs.swap_remove(17);
    let mut n = vm.create_vcpu().unwrap();
    assert_eq!(n.index(), 17);
    assert_eq!(access(&mut n, 0, false).unwrap().0, Seen::Ram(Pfn(RAM_HVA >> 12)));
    vm.zap_all_fast();
    for v in vs.iter_mut() {
        assert_eq!(access(v, 0, false).unwrap().0, Seen::Ram(Pfn(RAM_HVA >> 12)));
    }
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.max_vcpus = 0;
    let host = std::sync::Arc::new(vmmu::testing::TestHost::new(8));
    if let Ok(vm) = vmmu::vm::Vm::new(cfg, host) {
        assert!(vm.create_vcpu().is_err());
    }
}

/// Huge vCPU counts are refused with a typed error, not an overflow or an allocation failure.
#[test]
fn huge_max_vcpus_is_refused() {
    for n in [usize::MAX, usize::MAX - 1, 1 << 40, 1 << 30] {
        let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
        cfg.max_vcpus = n;
        let host = std::sync::Arc::new(vmmu::testing::TestHost::new(8));
        let r = vmmu::vm::Vm::new(cfg, host);
        assert!(r.is_err(), "{n} vCPUs accepted");
    }
}

#[test]
fn kvm_max_vcpus_is_accepted() {
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.max_vcpus = vmmu::vm::KVM_MAX_VCPUS;
    let host = std::sync::Arc::new(vmmu::testing::TestHost::new(8));
    let vm = vmmu::vm::Vm::new(cfg, host).unwrap();
    let v = vm.create_vcpu().unwrap();
    assert_eq!(v.index(), 0);
    cfg.max_vcpus += 1;
    let host = std::sync::Arc::new(vmmu::testing::TestHost::new(8));
    let e = vmmu::vm::Vm::new(cfg, host).err().unwrap();
    assert!(e.to_string().contains("KVM_MAX_VCPUS"), "{e}");
}

/// SMM: two address spaces with different slots at the same gpa; a vCPU switching between them
/// sees each one's RAM and MMIO, for every format and both edges of the space.
#[test]
fn smm_address_spaces_translate_separately() {
    for bits in [36u8, 46, 48, 49, 52] {
        for f in FORMATS {
            let mut cfg = VmConfig::new(f, bits).unwrap();
            cfg.nr_address_spaces = 2;
            let (vm, _h) = vm_with(cfg);
            let top = (1u64 << bits) - 0x1000;
            let ctx = format!("{bits} {f:?}");
            vm.set_memory_region(&region(0, 0, 0x1000, RAM_HVA, 0)).unwrap();
            vm.set_memory_region(&region(1 << 16, 0, 0x1000, RAM_HVA + 0x1000, 0)).unwrap();
            vm.set_memory_region(&region(1 << 16 | 1, top, 0x1000, RAM_HVA + 0x2000, 0)).unwrap();
            let mut v = vm.create_vcpu().unwrap();
            let a = Seen::Ram(Pfn(RAM_HVA >> 12));
            let b = Seen::Ram(Pfn((RAM_HVA >> 12) + 1));
            let c = Seen::Ram(Pfn((RAM_HVA >> 12) + 2));
            for round in 0..3 {
                v.set_as_id(AsId(0)).unwrap();
                assert_eq!(access(&mut v, 0, round == 1).unwrap().0, a, "{ctx}");
                assert!(is_mmio(access(&mut v, top, false).unwrap().0), "{ctx}");
                assert!(is_mmio(access(&mut v, top, false).unwrap().0), "{ctx}");
                v.set_as_id(AsId(1)).unwrap();
                assert_eq!(access(&mut v, 0, round == 2).unwrap().0, b, "{ctx}");
                assert_eq!(access(&mut v, top, false).unwrap().0, c, "{ctx}");
                assert!(is_mmio(access(&mut v, 0x1000, false).unwrap().0), "{ctx}");
                vm.zap_gfn_range_for_tests(AsId(1), Gfn(0), Gfn(1));
            }
            // The SMM slot's delete: AS1 gpa 0 becomes MMIO, AS0 keeps its RAM.
            vm.set_memory_region(&region(1 << 16, 0, 0, 0, 0)).unwrap();
            assert!(is_mmio(access(&mut v, 0, false).unwrap().0), "{ctx}");
            v.set_as_id(AsId(0)).unwrap();
            assert_eq!(access(&mut v, 0, false).unwrap().0, a, "{ctx}");
            assert_eq!(
                vm.get_dirty_log(AsId(2), SlotId(0)).unwrap_err().errno().to_string(),
                "EINVAL"
            );
        }
    }
}

/// A vCPU of a VM with one address space cannot be moved to a second one: a typed error, and
/// the vCPU keeps working in address space 0.
#[test]
fn set_as_id_out_of_range_is_refused() {
    for f in FORMATS {
        let (vm, _h) = vm_with(VmConfig::new(f, 46).unwrap());
        vm.set_memory_region(&region(0, 0, 0x1000, RAM_HVA, 0)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        assert!(v.set_as_id(AsId(1)).is_err());
        assert!(v.set_as_id(AsId(u16::MAX)).is_err());
        assert_eq!(v.as_id(), AsId(0));
        assert_eq!(access(&mut v, 0, false).unwrap().0, Seen::Ram(Pfn(RAM_HVA >> 12)));
        // A misconfiguration exit where nothing is mapped: the entry was "zapped under the
        // walk", so the guest faults again.
        let o = v.handle_ept_misconfig(Gpa(0x5000)).unwrap();
        assert!(matches!(o, FaultOutcome::Retry(_)), "{o:?}");
    }
}

/// A full cycle of the 19 MMIO generation bits in either address space after an MMIO SPTE
/// was made: the SPTE must not hit when the low bits come round again (the wrap zap), for
/// both address spaces of an SMM VM and both formats.
#[test]
fn a_full_mmio_generation_cycle_does_not_revive_an_mmio_spte() {
    for f in FORMATS {
        for as_id in [0u16, 1] {
            let mut cfg = VmConfig::new(f, 46).unwrap();
            cfg.nr_address_spaces = 2;
            let (vm, _h) = vm_with(cfg);
            let slot = u32::from(as_id) << 16;
            let mut v = vm.create_vcpu().unwrap();
            let mut w = vm.create_vcpu().unwrap();
            v.set_as_id(AsId(as_id)).unwrap();
            w.set_as_id(AsId(as_id)).unwrap();
            // MMIO at gpa 0x10_0000 in the SPTE, as of generation g.
            assert!(is_mmio(access(&mut v, 0x10_0000, false).unwrap().0));
            let g = vm.memslots().generation(AsId(as_id)).unwrap();
            // A slot there, then flags-only updates until the low bits are g's again.
            vm.set_memory_region(&region(slot, 0x10_0000, 0x1000, RAM_HVA, 0)).unwrap();
            let mut flags = 0;
            while vm.memslots().generation(AsId(as_id)).unwrap().mmio_bits() != g.mmio_bits() {
                flags ^= KVM_MEM_LOG_DIRTY_PAGES;
                vm.set_memory_region(&region(slot, 0x10_0000, 0x1000, RAM_HVA, flags)).unwrap();
            }
            assert!(vm.stats().mmio_gen_wraps >= 1, "{f:?} {as_id}");
            let want = Seen::Ram(Pfn(RAM_HVA >> 12));
            assert_eq!(access(&mut w, 0x10_0000, false).unwrap().0, want, "{f:?} {as_id}");
            assert_eq!(access(&mut v, 0x10_0000, false).unwrap().0, want, "{f:?} {as_id}");
        }
    }
}

/// Dirty-log ioctls with extreme ranges on a slot at the top: KVM's errnos, no overflow.
#[test]
fn dirty_log_extreme_ranges() {
    for f in FORMATS {
        let (vm, _h) = vm_with(VmConfig::new(f, 52).unwrap());
        let top = (1u64 << 52) - 0x40_0000;
        vm.set_memory_region(&region(3, top, 0x40_0000, RAM_HVA, KVM_MEM_LOG_DIRTY_PAGES)).unwrap();
        vm.set_dirty_log_mode(vmmu::dirty::DirtyLogMode::Manual);
        let mut v = vm.create_vcpu().unwrap();
        access(&mut v, top + 0x3f_f000, true).unwrap();
        let log = vm.get_dirty_log(AsId(0), SlotId(3)).unwrap();
        assert_eq!(log.len(), 16);
        assert_eq!(log[15], 1 << 63);
        for (first, count) in [
            (u64::MAX - 63, 64u32),
            (u64::MAX - 63, u32::MAX),
            (0, u32::MAX),
            (960, 64),
            (1024, 0),
            (960, u32::MAX),
            (1 << 63, 64),
        ] {
            let r = vm.clear_dirty_log_all(AsId(0), SlotId(3), first, count);
            let r2 = vm.clear_dirty_log(AsId(0), SlotId(3), first, count, &[u64::MAX; 2]);
            if first == 960 && count == 64 {
                assert!(r.is_ok() && r2.is_ok(), "{first} {count}: {r:?} {r2:?}");
            } else if count != 0 {
                assert!(r.is_err(), "{first} {count}");
            }
        }
        assert!(vm.get_dirty_log(AsId(u16::MAX), SlotId(u16::MAX)).is_err());
        assert!(vm.clear_dirty_log_all(AsId(1), SlotId(3), 0, 64).is_err());
        assert!(vm.clear_dirty_log_all(AsId(0), SlotId(u16::MAX), 0, 64).is_err());
    }
}

/// A slot whose host range ends at the user address limit, unmapped on the host: the fault is
/// a typed error; a slot one page past the limit is EINVAL; host invalidations of the whole
/// address space and of empty or reversed ranges are harmless.
#[test]
fn userspace_addr_at_the_limit() {
    use vmmu::memslot::TASK_SIZE_MAX;
    for f in FORMATS {
        let (vm, _h) = vm_with(VmConfig::new(f, 46).unwrap());
        let hva = TASK_SIZE_MAX - 0x1000;
        vm.set_memory_region(&region(0, 0x1000, 0x1000, hva, 0)).unwrap();
        let e = vm.set_memory_region(&region(1, 0x2000, 0x2000, hva, 0)).unwrap_err();
        assert_eq!(e.errno().to_string(), "EINVAL");
        let e = vm.set_memory_region(&region(1, 0x2000, 0x1000, !0xfff, 0)).unwrap_err();
        assert_eq!(e.errno().to_string(), "EINVAL");
        let mut v = vm.create_vcpu().unwrap();
        assert!(access(&mut v, 0x1000, false).is_err(), "no host page behind the slot");
        assert_eq!(vm.gfn_to_hva(AsId(0), Gfn(1)), Some(vmmu::Hva(hva)));
        assert_eq!(vm.gfn_to_hva(AsId(7), Gfn(1)), None);
        for (s, e) in [(0, u64::MAX), (u64::MAX, 0), (hva, hva), (hva + 0xfff, u64::MAX)] {
            let inv = vm.invalidate_hva_range_begin(vmmu::Hva(s), vmmu::Hva(e));
            inv.end();
        }
        vm.set_memory_region(&region(0, 0x1000, 0, 0, 0)).unwrap();
    }
}

/// A 1 GiB slot at the top of every space, backed by a 1 GiB host page: 1 GiB leaves, split to
/// 4 KiB by dirty logging, zapped with the range that ends at the top.
#[test]
fn one_gib_leaves_at_the_top() {
    for bits in 36u8..=52 {
        for f in FORMATS {
            for five in [false, true] {
                let mut cfg = VmConfig::new(f, bits).unwrap();
                if five {
                    cfg.root_level = vmmu::Level::L5;
                }
                let host = std::sync::Arc::new(vmmu::testing::TestHost::new(64));
                host.map(RAM_HVA, 1 << 30, RAM_HVA >> 12, vmmu::Level::L1G, true);
                let vm = vmmu::vm::Vm::new(cfg, host.clone()).unwrap();
                let ctx = format!("{bits} {f:?} {five}");
                let base = (1u64 << bits) - (1 << 30);
                vm.set_memory_region(&region(0, base, 1 << 30, RAM_HVA, 0)).unwrap();
                let mut v = vm.create_vcpu().unwrap();
                let pfn = |off: u64| Seen::Ram(Pfn((RAM_HVA + off) >> 12));
                for off in [0, 0x1234_5000, (1 << 30) - 0x1000] {
                    assert_eq!(access(&mut v, base + off, true).unwrap().0, pfn(off), "{ctx}");
                }
                assert_eq!(vm.stats().pages_1g, 1, "{ctx}");
                let flags = KVM_MEM_LOG_DIRTY_PAGES;
                vm.set_memory_region(&region(0, base, 1 << 30, RAM_HVA, flags)).unwrap();
                assert_eq!(access(&mut v, base + 0x3000, true).unwrap().0, pfn(0x3000), "{ctx}");
                assert_eq!(access(&mut v, base + 0x5000, false).unwrap().0, pfn(0x5000), "{ctx}");
                let log = vm.get_dirty_log(AsId(0), SlotId(0)).unwrap();
                assert_eq!(log[0] & 0x8, 0x8, "{ctx}");
                vm.zap_gfn_range_for_tests(AsId(0), Gfn(base >> 12), Gfn((1u64 << bits) >> 12));
                let (s, _) = access(&mut v, base + (1 << 30) - 0x1000, false).unwrap();
                assert_eq!(s, pfn((1 << 30) - 0x1000), "{ctx}");
                vm.set_memory_region(&region(0, base, 0, 0, 0)).unwrap();
                assert!(is_mmio(access(&mut v, base + 0x3000, false).unwrap().0), "{ctx}");
                drop(v);
                vm.reclaim();
                assert_eq!(host.use_after_free(), 0, "{ctx}");
            }
        }
    }
}

/// A slot moved to the last gfns and back: MMIO SPTEs and cached MMIO info at the destination
/// never answer for the moved RAM, and the old place becomes MMIO.
#[test]
fn moves_to_the_top_and_back() {
    for bits in [36u8, 40, 46, 48, 49, 51, 52] {
        for f in FORMATS {
            let (vm, _h) = vm_with(VmConfig::new(f, bits).unwrap());
            let ctx = format!("{bits} {f:?}");
            let top = (1u64 << bits) - 0x2000;
            vm.set_memory_region(&region(5, 0x10_0000, 0x2000, RAM_HVA, 0)).unwrap();
            let mut v = vm.create_vcpu().unwrap();
            let mut w = vm.create_vcpu().unwrap();
            let ram = |i: u64| Seen::Ram(Pfn((RAM_HVA >> 12) + i));
            for i in 0..2 {
                assert!(is_mmio(access(&mut v, top + i * 0x1000, false).unwrap().0), "{ctx}");
                assert!(is_mmio(access(&mut w, top + i * 0x1000, false).unwrap().0), "{ctx}");
                assert_eq!(
                    access(&mut w, 0x10_0000 + i * 0x1000, true).unwrap().0,
                    ram(i),
                    "{ctx}"
                );
            }
            vm.set_memory_region(&region(5, top, 0x2000, RAM_HVA, 0)).unwrap();
            for i in 0..2 {
                assert_eq!(access(&mut v, top + i * 0x1000, false).unwrap().0, ram(i), "{ctx}");
                assert_eq!(access(&mut w, top + i * 0x1000, true).unwrap().0, ram(i), "{ctx}");
                assert!(is_mmio(access(&mut w, 0x10_0000 + i * 0x1000, false).unwrap().0), "{ctx}");
            }
            vm.set_memory_region(&region(5, 0x10_0000, 0x2000, RAM_HVA, 0)).unwrap();
            for i in 0..2 {
                assert!(is_mmio(access(&mut v, top + i * 0x1000, false).unwrap().0), "{ctx}");
                assert!(is_mmio(access(&mut w, top + i * 0x1000, true).unwrap().0), "{ctx}");
                assert_eq!(
                    access(&mut v, 0x10_0000 + i * 0x1000, false).unwrap().0,
                    ram(i),
                    "{ctx}"
                );
            }
        }
    }
}

/// A zap of gfns beyond what a 4-level root reaches (2^36 pages) removes nothing below it.
#[test]
fn a_zap_beyond_the_root_reach_does_not_alias() {
    let (vm, _h) = vm_with(VmConfig::new(FormatKind::Ept, 46).unwrap());
    vm.set_memory_region(&region(0, 0, 0x1000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    access(&mut v, 0, false).unwrap();
    let before = vm.stats();
    vm.zap_gfn_range_for_tests(AsId(0), Gfn(1 << 36), Gfn((1 << 36) + 1));
    vm.zap_gfn_range_for_tests(AsId(0), Gfn(1 << 40), Gfn(u64::MAX));
    assert_eq!(vm.stats().pages_4k, before.pages_4k, "a zap above the reach zapped gfn 0");
    let (_, faults) = access(&mut v, 0, false).unwrap();
    assert!(faults.is_empty(), "{faults:?}");
}

/// Unusable configurations are typed errors: address-space counts, generation bases, root
/// levels, MAXPHYADDRs, C-bits, shadow paging with EPT.
#[test]
fn unusable_configurations_are_typed_errors() {
    let build = |tweak: &dyn Fn(&mut VmConfig)| {
        let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
        tweak(&mut cfg);
        let host = std::sync::Arc::new(vmmu::testing::TestHost::new(8));
        vmmu::vm::Vm::new(cfg, host).err()
    };
    assert!(build(&|c| c.nr_address_spaces = 0).is_some());
    assert!(build(&|c| c.nr_address_spaces = 3).is_some());
    assert!(build(&|c| c.nr_address_spaces = u16::MAX).is_some());
    assert!(build(&|c| {
        c.nr_address_spaces = 2;
        c.generation_base = 3;
    })
    .is_some());
    assert!(build(&|c| c.generation_base = 1 << 62).is_some());
    assert!(build(&|c| c.generation_base = u64::MAX).is_some());
    assert!(build(&|c| c.root_level = vmmu::Level::L4K).is_some());
    assert!(build(&|c| c.mmu = vmmu::vm::MmuKind::Shadow).is_some());
    assert!(build(&|c| c.format = FormatKind::NptSev { c_bit: 40 }).is_some());
    assert!(build(&|c| c.format = FormatKind::NptSev { c_bit: 255 }).is_some());
    assert!(build(&|c| c.generation_base = (1 << 62) - 2).is_none());
    for bits in [0u8, 35, 53, 255] {
        assert!(VmConfig::new(FormatKind::Ept, bits).is_err());
        assert!(VmConfig::shadow(bits).is_err());
    }
}

/// A gpa above what the root's levels decode (bit 48 and up with 4 levels, 57 with 5) is not
/// translated through the entries of the gpa its low bits name: the hardware walk reports a
/// not-present violation and the fault path emulates the gpa itself. Before, the walk dropped
/// the high bits and returned the RAM frame of the low gpa (found by `tests/api_sequences.rs`:
/// EPT, MAXPHYADDR 36, a slot at 0x3000, a read of 0x1_0000_0000_5000 read frame 0x40002).
#[test]
fn a_gpa_beyond_the_roots_reach_does_not_alias_a_mapped_one() {
    use vmmu::tdp::HwWalk;
    for (bits, five) in [(36u8, false), (46, false), (46, true), (52, true)] {
        for f in FORMATS {
            let mut cfg = VmConfig::new(f, bits).unwrap();
            if five {
                cfg.root_level = vmmu::Level::L5;
            }
            let (vm, _host) = vm_with(cfg);
            vm.set_memory_region(&region(0, 0x3000, 0x3000, RAM_HVA, 0)).unwrap();
            let mut v = vm.create_vcpu().unwrap();
            let low = 0x5000u64;
            let frame = Pfn((RAM_HVA + 0x2000) >> 12);
            assert_eq!(access(&mut v, low, true).unwrap().0, Seen::Ram(frame));
            let reach = if five { 57 } else { 48 };
            for high in [(1u64 << reach) | low, (1 << 63) | low, !0xfff] {
                v.service_requests().unwrap();
                let walk = v.enter_guest().unwrap().walk(Gpa(high), vmmu::Access::NONE);
                assert!(
                    matches!(walk, HwWalk::Violation { present: false, .. }),
                    "{f:?}/{bits}: walk of {high:#x}: {walk:?}"
                );
                for write in [false, true] {
                    let (seen, _) = access(&mut v, high, write).unwrap();
                    assert!(is_mmio(seen), "{f:?}/{bits}: {high:#x} saw {seen:?}");
                }
                v.enter_guest_mode().unwrap();
                assert!(matches!(v.walk(Gpa(high), vmmu::Access::NONE), HwWalk::Violation { .. }));
                v.exit_guest_mode();
            }
            assert_eq!(access(&mut v, low, false).unwrap().0, Seen::Ram(frame));
        }
    }
}

/// An RSVD exit (EPT misconfiguration, #NPF with RSVD) at a gpa above what the root decodes does
/// not take the MMIO SPTE of the gpa its low bits name: before, the lockless walk dropped the
/// high bits, found the low page's MMIO SPTE and emulated with that SPTE's rights
/// (`MmioSpteHit`). Now the slow path emulates the gpa itself.
#[test]
fn an_rsvd_exit_beyond_the_roots_reach_is_not_a_hit_on_an_aliased_mmio_spte() {
    use vmmu::fault::{FaultOutcome, PfErr};
    for f in FORMATS {
        let (vm, _host) = vm_with(VmConfig::new(f, 36).unwrap());
        let mut v = vm.create_vcpu().unwrap();
        let low = 0x10_0000u64;
        // Twice: the MMIO SPTE is installed (and the vCPU's cache holds the low gfn).
        assert!(is_mmio(access(&mut v, low, false).unwrap().0));
        assert!(is_mmio(access(&mut v, low, false).unwrap().0));
        for high in [(1u64 << 48) | low, (1 << 63) | low] {
            v.service_requests().unwrap();
            let r = match f {
                FormatKind::Ept => v.handle_ept_misconfig(Gpa(high)),
                _ => v.handle_npf(Gpa(high), PfErr(PfErr::RSVD)),
            };
            match r {
                Ok(FaultOutcome::Emulate { gpa, source, .. }) => {
                    assert_eq!(gpa, Gpa(high), "{f:?}");
                    assert_ne!(
                        source,
                        EmulateSource::MmioSpteHit,
                        "{f:?}: {high:#x} hit {low:#x}'s SPTE"
                    );
                }
                other => panic!("{f:?}: RSVD exit at {high:#x}: {other:?}"),
            }
        }
    }
}

/// A host frame beyond the VM's MAXPHYADDR (the embedder gave the VM fewer physical address bits
/// than its host has, or its `translate` returns a bad frame) is refused with an error that says
/// so, under TDP and shadow paging: masked into the SPTE's pfn field it would have named
/// another frame (a release build once mapped the guest onto host frame 0). The frame just below
/// the limit maps.
#[test]
fn a_host_frame_beyond_phys_bits_is_refused_not_masked() {
    use vmmu::FaultAccess;
    const SLOT: u64 = 0x20_0000;
    let beyond = 1u64 << (46 - 12);
    for shadow in [false, true] {
        for (pfn, fits) in [(beyond, false), (!0x1ff_u64, false), (beyond - 0x200, true)] {
            let cfg = if shadow {
                VmConfig::shadow(46).unwrap()
            } else {
                VmConfig::new(FormatKind::Ept, 46).unwrap()
            };
            let (vm, host) = vm_with(cfg);
            host.map_over(RAM_HVA, 0x20_0000, pfn, vmmu::Level::L2M, true);
            vm.set_memory_region(&region(0, SLOT, 0x20_0000, RAM_HVA, 0)).unwrap();
            let mut v = vm.create_vcpu().unwrap();
            v.service_requests().unwrap();
            let gpa = Gpa(SLOT + 0x3000);
            let r = if shadow {
                // Non-paging guest: the GVA is the gpa.
                v.handle_page_fault(vmmu::Gva(gpa.raw()), vmmu::fault::PfErr(0))
            } else {
                v.handle_ept_violation(gpa, FaultAccess::READ)
            };
            if fits {
                assert_eq!(r, Ok(FaultOutcome::Fixed), "shadow {shadow}");
                continue;
            }
            let e = r.expect_err(&format!("shadow {shadow}, pfn {pfn:#x}"));
            assert!(
                matches!(e, vmmu::fault::FaultError::HostFrameBeyondPhysBits { phys_bits: 46, .. }),
                "shadow {shadow}: {e:?}"
            );
            assert!(e.to_string().contains("MAXPHYADDR"), "{e}");
        }
    }
}
