//! Behaviour that mutation testing (`cargo mutants` on the memslot, SPTE, fault-path, per-vCPU
//! MMIO cache and TDP MMU sources) found no test pinning: each test here fails with the mutant
//! its doc names applied, and shows what a guest or a VMM would see (an errno, a translation, an
//! emulation decision), not an internal flag.
#![cfg(not(loom))] // std threads and atomics: loom types only work inside a model

mod common;

use common::{
    access, park_once_at, region, test_frames, update_published, vm, vm_on, vm_with, Seen, RAM_HVA,
};
use vmmu::dirty::pages_of;
use vmmu::fault::{EmulateSource, FaultOutcome};
use vmmu::memslot::{
    MemslotChange, MemslotError, Memslots, MemslotsConfig, NoHooks, UserspaceMemoryRegion,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use vmmu::spte::FormatKind;
use vmmu::stats::RetryCause;
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, AsId, FaultAccess, Gpa, Hva, Pfn, SlotId};

/// `access_ok(hva, size)` is `size <= limit && hva <= limit - size` (KVM `__access_ok`): a
/// region that fills the whole user range, from address 0 up to the limit exactly, is accepted.
/// Kills `size > user_va_limit` -> `>=` in `check_request`, which refused it (`EINVAL`).
#[test]
fn a_region_filling_the_whole_user_range_passes_access_ok() {
    const LIMIT: u64 = 0x40_0000;
    let m = Memslots::new(MemslotsConfig { user_va_limit: LIMIT, ..Default::default() });
    let whole = UserspaceMemoryRegion::new(0, 0, 0x1000_0000, LIMIT, 0);
    assert_eq!(m.set_memory_region(&whole, &NoHooks), Ok(MemslotChange::Create));
    // One page more is beyond it, from either end.
    let longer = UserspaceMemoryRegion::new(1, 0, 0x2000_0000, LIMIT + 0x1000, 0);
    let shifted = UserspaceMemoryRegion::new(2, 0, 0x3000_0000, LIMIT, 0x1000);
    for r in [longer, shifted] {
        let e = m.set_memory_region(&r, &NoHooks).unwrap_err();
        assert!(matches!(e, MemslotError::HvaRangeNotUser { .. }), "{r:?}: {e:?}");
        assert_eq!(e.errno(), "EINVAL");
    }
}

/// A VM with one address space has no SMM space: asking for the generation of address space 1
/// panics, as documented, instead of answering with a generation no update ever changes (a
/// vCPU using it would keep MMIO decisions across every memslot update). Kills
/// `as_id.0 < nr_address_spaces` -> `<=` in `Memslots::generation`.
#[test]
#[should_panic(expected = "address space 1 does not exist")]
fn the_generation_of_a_missing_address_space_panics() {
    let m = Memslots::new(MemslotsConfig { nr_address_spaces: 1, ..Default::default() });
    let _ = m.generation(vmmu::AsId(0));
    let _ = m.generation(vmmu::AsId(1));
}

/// Faults on the pages just below and just above a host invalidation in flight map their pages
/// at once; only gfns inside the range retry (KVM `mmu_invalidate_retry_gfn`: `start <= gfn <
/// end`). Kills `gfn < end` -> `<=` in `Invalidation::retry` and `start < end_of_range` /
/// `range_start < end` -> `<=` in `Invalidation::retry_range`, under which a vCPU touching a
/// neighbour of a page the host is changing spun on Retry until the invalidation ended.
#[test]
fn faults_next_to_an_invalidation_in_flight_map_their_pages() {
    let (vm, _h) = vm(FormatKind::Ept);
    // 16 pages: too small for a 2 MiB leaf, so every fault maps (and checks) one 4 KiB page.
    vm.set_memory_region(&region(0, 0x10_0000, 0x1_0000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    let inv = vm.invalidate_hva_range_begin(Hva(RAM_HVA + 0x5000), Hva(RAM_HVA + 0x6000));
    let read = |v: &mut Vcpu<TestHost>, gpa| v.handle_ept_violation(Gpa(gpa), FaultAccess::READ);
    assert_eq!(read(&mut v, 0x10_4000).unwrap(), FaultOutcome::Fixed, "the page below");
    assert_eq!(read(&mut v, 0x10_6000).unwrap(), FaultOutcome::Fixed, "the page above");
    assert_eq!(
        read(&mut v, 0x10_5000).unwrap(),
        FaultOutcome::Retry(RetryCause::HostInvalidation),
        "the page being invalidated"
    );
    inv.end();
    assert_eq!(access(&mut v, 0x10_5000, false).unwrap().0, Seen::Ram(Pfn((RAM_HVA >> 12) + 5)));
}

/// The highest gfn the MMU maps (KVM `kvm_mmu_max_gfn`; 2^34 - 1 with 46 physical bits) still
/// gets an MMIO SPTE, so a second vCPU hits it on the fast path; the gfn above it is emulated
/// without one, every time. Kills `gfn > max_gfn` -> `>=` in the TDP slow path, under which the
/// top page of the guest-physical space never had its MMIO decision cached.
#[test]
fn the_highest_mappable_gfn_gets_an_mmio_spte_and_the_next_does_not() {
    let (vm, _h) = vm(FormatKind::Ept);
    let mut v0 = vm.create_vcpu().unwrap();
    let mut v1 = vm.create_vcpu().unwrap();
    let top = ((1u64 << 34) - 1) << 12;
    assert_eq!(access(&mut v0, top, false).unwrap().0, Seen::Mmio(EmulateSource::SlowPathMmio));
    assert_eq!(access(&mut v1, top, false).unwrap().0, Seen::Mmio(EmulateSource::MmioSpteHit));
    let above = 1u64 << 46;
    assert_eq!(access(&mut v0, above, false).unwrap().0, Seen::Mmio(EmulateSource::SlowPathMmio));
    assert_eq!(access(&mut v1, above, false).unwrap().0, Seen::Mmio(EmulateSource::SlowPathMmio));
}

/// The access an MMIO emulation reports is what the format's MMIO SPTE can hold (KVM
/// `shadow_mmio_access_mask`): none for EPT, W|U for NPT, and the same from the slow path that
/// decided "no slot" as from a later MMIO SPTE hit. Kills `ACC_ALL & access_mask` -> `|` in the
/// TDP slow path, which reported full rights for EPT.
#[test]
fn mmio_emulation_reports_the_formats_mmio_access_on_every_path() {
    let wu = Access::WRITE.union(Access::USER);
    for (f, want) in [(FormatKind::Ept, Access::NONE), (FormatKind::Npt, wu)] {
        let (vm, _h) = vm(f);
        let mut v0 = vm.create_vcpu().unwrap();
        let mut v1 = vm.create_vcpu().unwrap();
        for (v, source) in
            [(&mut v0, EmulateSource::SlowPathMmio), (&mut v1, EmulateSource::MmioSpteHit)]
        {
            let (_, faults) = access(v, 0xfee0_0000, false).unwrap();
            let got = faults.last().copied();
            assert_eq!(
                got,
                Some(FaultOutcome::Emulate { gpa: Gpa(0xfee0_0000), access: want, source }),
                "{f:?}"
            );
        }
    }
}

/// A write fault that gives back the write right a dirty-log GET took (same frame, rights only
/// gained) asks no vCPU to flush its TLB: a stale read-only translation just faults again (KVM
/// `leaf_spte_change_needs_tlb_flush` is false, and the fault path flushes only when it is
/// true). The GET itself, which took the right away, did flush. Kills, in the leaf-change flush
/// decision of `handle_changed_spte`, deleting the `!` of `!is_leaf`, `pfn(old) != pfn(new)` ->
/// `==`, and `(old & !new)` -> `old | !new`, `old ^ !new` or `old & new`: each made this fault
/// a remote TLB flush (KVM's `remote_tlb_flush_requests` stat counted one more).
#[test]
fn regaining_the_write_right_after_a_dirty_log_get_flushes_no_tlb() {
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(1, 0x10_0000, 0x1_0000, RAM_HVA, KVM_MEM_LOG_DIRTY_PAGES))
        .unwrap();
    let mut v = vm.create_vcpu().unwrap();
    access(&mut v, 0x10_3000, true).unwrap();
    let before_get = vm.stats().remote_tlb_flush_requests;
    let pages: Vec<u64> = pages_of(&vm.get_dirty_log(AsId(0), SlotId(1)).unwrap()).collect();
    assert_eq!(pages, [3]);
    let before = vm.stats().remote_tlb_flush_requests;
    assert_eq!(before, before_get + 1, "the GET write-protected a writable leaf: one flush");
    let (seen, faults) = access(&mut v, 0x10_3000, true).unwrap();
    assert_eq!(seen, Seen::Ram(Pfn((RAM_HVA >> 12) + 3)));
    assert_eq!(faults, [FaultOutcome::Fixed], "the write faulted once, on the read-only leaf");
    assert_eq!(vm.stats().remote_tlb_flush_requests, before, "regaining W flushed a TLB");
}

/// Eager splitting at the start of dirty logging gives each 4 KiB child the huge leaf's
/// attributes without the page-size bit (KVM `make_huge_page_split_spte` clears it: at 4 KiB it
/// is NPT's PAT bit), so a write to a split page only adds the write right to its leaf: no
/// remote TLB flush (KVM's `remote_tlb_flush_requests` stat). Kills `1 << 7` -> `1 >> 7` in
/// `BIT_LARGE` of `tdp::dirty`, under which the children kept bit 7 (a PAT memory type on NPT),
/// and the write, dropping it, flushed every vCPU's TLB.
#[test]
fn a_write_to_an_eagerly_split_page_only_adds_the_write_right() {
    for f in [FormatKind::Ept, FormatKind::Npt] {
        let (vm, _h) = vm(f);
        vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, 0)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        access(&mut v, 0x20_0000, true).unwrap();
        assert_eq!(vm.stats().pages_2m, 1, "{f:?}");
        let log = region(1, 0x20_0000, 0x20_0000, RAM_HVA, KVM_MEM_LOG_DIRTY_PAGES);
        vm.set_memory_region(&log).unwrap();
        assert_eq!((vm.stats().pages_2m, vm.stats().pages_4k), (0, 512), "{f:?}: split");
        let before = vm.stats().remote_tlb_flush_requests;
        let (seen, faults) = access(&mut v, 0x20_5000, true).unwrap();
        assert_eq!(seen, Seen::Ram(Pfn((RAM_HVA >> 12) + 5)), "{f:?}");
        assert_eq!(faults, [FaultOutcome::Fixed], "{f:?}: one fault on the read-only child");
        let after = vm.stats().remote_tlb_flush_requests;
        assert_eq!(after, before, "{f:?}: the write changed more than the write right");
    }
}

/// A fault that decided "MMIO" from the memslots of before a slot create, and installs only
/// after another vCPU mapped the new slot, leaves that vCPU's leaf alone: the access walks again
/// and reads the slot's RAM (KVM `kvm_tdp_mmu_map` on a present leaf that allows the access is
/// `RET_PF_SPURIOUS`; aad885e77496 never writes an MMIO SPTE over a present leaf). Kills, in
/// `Tdp::map`, `matches!(spec, Mmio) && bugs.has(MmioOverPresentSpte)` -> `||` (the MMIO SPTE
/// replaced the leaf with no flush: A emulated MMIO, and after the delete B still read the
/// deleted slot's frame from its TLB) and deleting the `!` of `&& !mmio_over_present` (the MMIO
/// SPTE replaced the leaf: A emulated MMIO on a gfn backed by RAM).
#[test]
fn a_stale_mmio_decision_never_replaces_a_leaf_another_vcpu_mapped() {
    use std::sync::mpsc;
    use vmmu::host::PreemptPoint;
    const X: u64 = 0x10_0000;
    let frame = Pfn((RAM_HVA >> 12) + 5);
    let (vm, _h) = vm(FormatKind::Ept);
    let mut a = vm.create_vcpu().unwrap();
    let mut b = vm.create_vcpu().unwrap();
    let (decided_tx, decided_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let thread_a = std::thread::spawn(move || {
        // Parks A once, at its first fault's decision ("no slot": MMIO).
        park_once_at(PreemptPoint::FaultDecided, decided_tx, go_rx);
        let seen = access(&mut a, X, false).unwrap().0;
        vmmu::testing::preempt::on_this_thread(None);
        seen
    });
    decided_rx.recv().unwrap();
    // The create's set is published (with its in-progress generation) before it waits for A.
    let updater = update_published(&vm, region(0, X, 0x1000, RAM_HVA + 0x5000, 0));
    // B maps the new slot and keeps the translation in its TLB (it stays in guest mode).
    let mut tlb = None;
    for _ in 0..100 {
        b.service_requests().unwrap();
        let Ok(g) = b.enter_guest() else { continue };
        if let HwWalk::Translated { pfn, .. } = g.walk(Gpa(X), Access::NONE) {
            tlb = Some(pfn);
            break;
        }
        drop(g);
        b.handle_ept_violation(Gpa(X), FaultAccess::READ).unwrap();
    }
    assert_eq!(tlb, Some(frame), "setup: B maps the new slot");
    go_tx.send(()).unwrap();
    assert_eq!(thread_a.join().unwrap(), Seen::Ram(frame), "A's stale MMIO decision won");
    updater.join().unwrap();
    // Deleting the slot must flush B's TLB: its next read of X is MMIO emulation.
    vm.set_memory_region(&region(0, X, 0, 0, 0)).unwrap();
    assert!(b.service_requests().unwrap().flush_tlb, "B kept the deleted slot's frame");
    assert_eq!(access(&mut b, X, false).unwrap().0, Seen::Mmio(EmulateSource::SlowPathMmio));
}

/// A fault whose block could be one 2 MiB leaf, in a 2 MiB whose 4 KiB table is already linked
/// (left by an earlier, smaller slot), maps its own 4 KiB page in that table: the frame at the
/// gfn's offset in the block. Kills `base_pfn + offset` -> `base_pfn - offset` in `Tdp::map`,
/// under which the guest read the frame as far below the block's start as the page is above it.
#[test]
fn a_fault_below_an_existing_4k_table_maps_the_gfns_own_frame() {
    let (vm, _h) = vm(FormatKind::Ept);
    // A 16-page slot: 4 KiB leaves, so the 2 MiB at 0x20_0000 gets a 4 KiB table.
    vm.set_memory_region(&region(0, 0x20_0000, 0x1_0000, RAM_HVA + 0x40_0000, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    assert_eq!(
        access(&mut v, 0x20_3000, false).unwrap().0,
        Seen::Ram(Pfn((RAM_HVA >> 12) + 0x403))
    );
    vm.set_memory_region(&region(0, 0x20_0000, 0, 0, 0)).unwrap();
    // The whole 2 MiB, 2 MiB-aligned on the host.
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA + 0x20_0000, 0)).unwrap();
    for page in [0x5u64, 0x1ff] {
        let want = Pfn((RAM_HVA >> 12) + 0x200 + page);
        assert_eq!(access(&mut v, 0x20_0000 + (page << 12), false).unwrap().0, Seen::Ram(want));
    }
}

/// A TDP VM with prefetch on and one slot at gfn 0x1001 (gfn g at hva `RAM_HVA + (g - 0x1001)`:
/// gpa and hva not 2 MiB-congruent, so 4 KiB leaves only) whose group 0x1008..0x1010 the vCPU
/// wrote (its host pages are mapped writable, so prefetchable), then deleted and created again:
/// no leaf is left.
fn prefetch_vm_after_a_written_group() -> (Vm<TestHost>, std::sync::Arc<TestHost>, Vcpu<TestHost>) {
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.tdp_prefetch = true;
    let (vm, h) = vm_with(cfg);
    h.set_zero_page_reads(true);
    let slot = |size| region(0, 0x100_1000, size, RAM_HVA, 0);
    vm.set_memory_region(&slot(0x10_0000)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    for gfn in 0x1008..0x1010u64 {
        access(&mut v, gfn << 12, true).unwrap();
    }
    vm.set_memory_region(&slot(0)).unwrap();
    vm.set_memory_region(&slot(0x10_0000)).unwrap();
    assert_eq!(vm.stats().pages_4k, 0, "setup: the delete zapped every leaf");
    (vm, h, v)
}

/// The TDP prefetch (`VmConfig::tdp_prefetch`, KVM's legacy `direct_pte_prefetch`) walks every
/// run of its 8-aligned group: a fault on gfn 0x100e maps the run 0x1008..0x100e below it and
/// the one-page run 0x100f above it, so the guest touches the whole group after one fault (KVM's
/// `pages_4k` stat counts the eight leaves). Kills, in `Tdp::prefetch_direct`'s run,
/// `start..start + n` -> `start..start * n` (a one-page run was empty: 0x100f faulted) and
/// `made += 1` -> `made *= 1` (a run that made leaves reported none, which ended the prefetch
/// before the run above the fault).
#[test]
fn tdp_prefetch_maps_the_runs_on_both_sides_of_the_fault() {
    let (vm, _h, mut v) = prefetch_vm_after_a_written_group();
    access(&mut v, 0x100_e000, false).unwrap();
    assert_eq!(vm.stats().pages_4k, 8, "the fault and both runs of its group");
    for gfn in 0x1008..0x1010u64 {
        let (seen, faults) = access(&mut v, gfn << 12, true).unwrap();
        assert_eq!(seen, Seen::Ram(Pfn((RAM_HVA >> 12) + gfn - 0x1001)), "gfn {gfn:#x}");
        assert_eq!(faults, [], "gfn {gfn:#x} was not prefetched");
    }
}

/// On a host whose table memory is type-stable (`TestHost::new_type_stable`, as the software
/// machine's), the fast MMIO path answers from its leaf-table cache without a read section, and
/// the answer is the MMIO SPTE's: an NPT vCPU that did not create the SPTEs gets each page's own
/// MMIO emulation, with the W|U access the SPTE holds, as a hit of the SPTE. Kills
/// `MmuCore::mmio_spte_type_stable` -> `Some(0)` and -> `Some(1)` (the fast path decoded an entry
/// that is no MMIO SPTE: no access rights).
#[test]
fn a_type_stable_leaf_table_hit_answers_with_the_mmio_sptes_access() {
    let (vm, _h) = vm_on(
        VmConfig::new(FormatKind::Npt, 46).unwrap(),
        TestHost::new_type_stable(test_frames()),
    );
    let mut v0 = vm.create_vcpu().unwrap();
    let mut v1 = vm.create_vcpu().unwrap();
    let pages = [0xfee0_0000u64, 0xfee0_1000, 0xfee0_2000];
    for &gpa in &pages {
        assert_eq!(access(&mut v0, gpa, false).unwrap().0, Seen::Mmio(EmulateSource::SlowPathMmio));
    }
    let wu = Access::WRITE.union(Access::USER);
    for &gpa in &pages {
        let (_, faults) = access(&mut v1, gpa, false).unwrap();
        let want =
            FaultOutcome::Emulate { gpa: Gpa(gpa), access: wu, source: EmulateSource::MmioSpteHit };
        assert_eq!(faults, [want], "{gpa:#x}");
    }
}

/// The per-vCPU fault counters (KVM's `pf_taken`, `pf_fixed`, `pf_emulate`,
/// `pf_mmio_spte_created` and this MMU's path counters) count each path once: a RAM fault, a
/// no-slot fault that creates an MMIO SPTE, a per-vCPU cache hit, another vCPU's MMIO SPTE hit,
/// a host-invalidation retry and a write to a read-only slot. Kills `+=` -> `*=` (the counter
/// stayed 0) in `cache_hit` (`mmio_cache_hits`), `count_slow_mmio` (`slow_path_mmio`,
/// `pf_emulate`; and replacing it with `()`), `retry` (`retries`) and `readonly_write`, the
/// read-only-write emulation `tdp_page_fault` calls (`readonly_write_emulations`, `pf_emulate`).
#[test]
fn each_fault_path_counts_once_in_the_vcpus_counters() {
    use vmmu::memslot::KVM_MEM_READONLY;
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(0, 0x10_0000, 0x1_0000, RAM_HVA, 0)).unwrap();
    vm.set_memory_region(&region(1, 0x20_0000, 0x1_0000, RAM_HVA + 0x10_0000, KVM_MEM_READONLY))
        .unwrap();
    let mut v0 = vm.create_vcpu().unwrap();
    let mut v1 = vm.create_vcpu().unwrap();
    let ram = Seen::Ram(Pfn((RAM_HVA >> 12) + 3));
    assert_eq!(access(&mut v0, 0x10_3000, false).unwrap().0, ram);
    let slow = Seen::Mmio(EmulateSource::SlowPathMmio);
    assert_eq!(access(&mut v0, 0xfee0_0000, false).unwrap().0, slow);
    let hit = Seen::Mmio(EmulateSource::VcpuCacheHit);
    assert_eq!(access(&mut v0, 0xfee0_0000, false).unwrap().0, hit);
    let s = &v0.stats;
    assert_eq!((s.pf_taken, s.pf_fixed, s.pf_mmio_spte_created), (2, 1, 1));
    assert_eq!((s.slow_path_mmio, s.pf_emulate, s.mmio_cache_hits), (1, 1, 1));
    let spte_hit = Seen::Mmio(EmulateSource::MmioSpteHit);
    assert_eq!(access(&mut v1, 0xfee0_0000, false).unwrap().0, spte_hit);
    assert_eq!((v1.stats.mmio_spte_hits, v1.stats.pf_emulate), (1, 0));
    // A host invalidation of the RAM page in flight: the fault retries.
    v1.service_requests().unwrap();
    let inv = vm.invalidate_hva_range_begin(Hva(RAM_HVA + 0x5000), Hva(RAM_HVA + 0x6000));
    let o = v1.handle_ept_violation(Gpa(0x10_5000), FaultAccess::READ).unwrap();
    assert_eq!(o, FaultOutcome::Retry(RetryCause::HostInvalidation));
    assert_eq!(v1.stats.retries[RetryCause::HostInvalidation as usize], 1);
    inv.end();
    // A write to the read-only slot is emulated, never cached as MMIO.
    let before = v1.stats.pf_emulate;
    let ro = Seen::Mmio(EmulateSource::ReadOnlyWrite);
    assert_eq!(access(&mut v1, 0x20_0000, true).unwrap().0, ro);
    assert_eq!(v1.stats.readonly_write_emulations, 1);
    assert_eq!(v1.stats.pf_emulate, before + 1);
}

/// Two vCPUs fault on the same no-slot gpa; the second installs the MMIO SPTE while the first is
/// between its decision and its map. The first finds exactly its SPTE there and still emulates
/// (KVM returns `RET_PF_EMULATE` for an MMIO SPTE that was already there, and counts it in
/// `pf_mmio_spte_created`: `tdp_mmu_map_handle_target_level` tests the new SPTE after its
/// SPURIOUS check), without counting a spurious fault. Kills the match guard `is_mmio`
/// of `MapOutcome::Spurious` -> `false` in `count_map_outcome`, under which the vCPU resumed the
/// guest (spurious) and took another exit for the same access.
#[test]
fn a_fault_that_finds_its_mmio_spte_installed_meanwhile_still_emulates() {
    use vmmu::host::PreemptPoint;
    const MMIO: u64 = 0xfee0_0000;
    let (vm, _h) = vm(FormatKind::Ept);
    let v0 = vm.create_vcpu().unwrap();
    let mut v1 = vm.create_vcpu().unwrap();
    v1.service_requests().unwrap();
    // At v1's decision ("no slot"), v0 runs its own fault on the gpa to completion.
    let mut other = Some(v0);
    vmmu::testing::preempt::on_this_thread(Some(Box::new(move |point| {
        if point == PreemptPoint::FaultDecided {
            if let Some(mut v0) = other.take() {
                let seen = access(&mut v0, MMIO, false).unwrap().0;
                assert_eq!(seen, Seen::Mmio(EmulateSource::SlowPathMmio), "setup: v0");
                assert_eq!(v0.stats.pf_mmio_spte_created, 1, "setup: v0 made the SPTE");
            }
        }
    })));
    let o = v1.handle_ept_violation(Gpa(MMIO), FaultAccess::READ);
    vmmu::testing::preempt::on_this_thread(None);
    let want = FaultOutcome::Emulate {
        gpa: Gpa(MMIO),
        access: Access::NONE,
        source: EmulateSource::SlowPathMmio,
    };
    assert_eq!(o.unwrap(), want);
    let s = &v1.stats;
    assert_eq!((s.pf_mmio_spte_created, s.pf_spurious, s.slow_path_mmio), (1, 0, 1));
}

/// A vCPU counts the roots it loads, the TLB flushes it performs (KVM's `tlb_flush` vCPU stat:
/// a new root, or a flush request) on the TDP MMU and on the shadow MMU, and its EPT violation
/// and misconfiguration exits; it reports the address space it runs in once switched to SMM's.
/// Kills `vcpu/mod.rs`: `service_requests`' `tlb_flush += 1` (both MMUs) and `root_loads += 1`
/// (TDP), the exit counts of `handle_ept_violation`, `handle_ept_misconfig` and `handle_npf`, `+=` -> `*=`; and
/// `as_id` replaced with `AsId(0)`.
#[test]
fn a_vcpu_counts_its_exits_root_loads_and_tlb_flushes() {
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.nr_address_spaces = 2;
    let (vm, _h) = vm_with(cfg);
    let mut v = vm.create_vcpu().unwrap();
    assert!(v.service_requests().unwrap().flush_tlb, "a new root");
    assert_eq!((v.stats.root_loads, v.stats.tlb_flush), (1, 1));
    v.set_as_id(AsId(1)).unwrap();
    assert_eq!(v.as_id(), AsId(1));
    assert!(v.service_requests().unwrap().flush_tlb, "SMM's root");
    assert_eq!((v.stats.root_loads, v.stats.tlb_flush), (2, 2));
    vm.flush_remote_tlbs_for_tests();
    assert!(v.service_requests().unwrap().flush_tlb, "a flush request");
    assert_eq!((v.stats.root_loads, v.stats.tlb_flush), (2, 3));
    let mmio = Gpa(0xfee0_0000);
    v.handle_ept_violation(mmio, FaultAccess::READ).unwrap();
    v.handle_ept_misconfig(mmio).unwrap();
    v.handle_ept_misconfig(mmio).unwrap();
    assert_eq!((v.stats.violation_exits, v.stats.misconfig_exits), (1, 2));
    // #NPF: RSVD set is the misconfiguration kind.
    let (npt, _h) = common::vm(FormatKind::Npt);
    let mut v = npt.create_vcpu().unwrap();
    v.service_requests().unwrap();
    use vmmu::fault::PfErr;
    v.handle_npf(mmio, PfErr(0)).unwrap();
    v.handle_npf(mmio, PfErr(PfErr::RSVD | PfErr::PRESENT)).unwrap();
    v.handle_npf(mmio, PfErr(PfErr::RSVD | PfErr::PRESENT)).unwrap();
    assert_eq!((v.stats.violation_exits, v.stats.misconfig_exits), (1, 2));

    let (vm, _host, _next) = common::shadow::shadow_vm(vmmu::bugs::BugSet::NONE);
    let mut v = common::shadow::vcpu_in(&vm, common::shadow::long4(0x10_0000));
    assert!(v.service_requests().unwrap().flush_tlb, "a new shadow root");
    assert_eq!((v.stats.root_loads, v.stats.tlb_flush), (1, 1));
    vm.flush_remote_tlbs_for_tests();
    assert!(v.service_requests().unwrap().flush_tlb, "a flush request");
    assert_eq!((v.stats.root_loads, v.stats.tlb_flush), (1, 2));
}

/// While a host invalidation is in flight the TDP prefetch maps nothing (KVM's
/// `direct_pte_prefetch` runs only outside `mmu_invalidate_in_progress`; the prefetch checks no
/// gfn against the range): a fault next to the page the host is changing maps its own page
/// only, and the page being changed stays unmapped until the end. Kills
/// `Invalidation::in_progress` -> `0`, under which the prefetch of the group mapped the page
/// being invalidated and the vCPU translated it during the host's change.
#[test]
fn no_prefetch_while_a_host_invalidation_is_in_flight() {
    let (vm, _h, mut v) = prefetch_vm_after_a_written_group();
    // The host changes gfn 0x100c's page.
    let hva = RAM_HVA + ((0x100c - 0x1001) << 12);
    v.service_requests().unwrap();
    let inv = vm.invalidate_hva_range_begin(Hva(hva), Hva(hva + 0x1000));
    let o = v.handle_ept_violation(Gpa(0x100_e000), FaultAccess::READ).unwrap();
    assert_eq!(o, FaultOutcome::Fixed, "a neighbour of the page maps");
    assert_eq!(vm.stats().pages_4k, 1, "the fault's own leaf only");
    v.service_requests().unwrap();
    let walk = v.enter_guest().unwrap().walk(Gpa(0x100_c000), Access::NONE);
    assert!(
        !matches!(walk, HwWalk::Translated { .. }),
        "the page being invalidated is mapped: {walk:?}"
    );
    inv.end();
    let want = Seen::Ram(Pfn((RAM_HVA >> 12) + 0x100c - 0x1001));
    assert_eq!(access(&mut v, 0x100_c000, false).unwrap().0, want);
}
