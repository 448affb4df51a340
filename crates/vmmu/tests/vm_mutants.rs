//! Behaviour of the embedder API (`vmmu::vm::Vm`: memslot updates with the MMU's hooks, dirty
//! logging's start and stop, host invalidations) that mutation testing
//! (`cargo mutants --file crates/vmmu/src/vm.rs`) found no test pinning: each test here fails with
//! the mutant its doc names applied, and shows what a guest, a VMM or a host would see (a fault, a
//! translation, a KVM counter, an answer of the API), not an internal flag.
#![cfg(not(loom))] // std threads and atomics: loom types only work inside a model

mod common;

use common::{access, park_once_at, region, update_published, vm, vm_with, Seen, RAM_HVA};
use vmmu::fault::FaultOutcome;
use vmmu::memslot::{KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use vmmu::spte::FormatKind;
use vmmu::stats::RetryCause;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{MmuKind, VmConfig};
use vmmu::{FaultAccess, Gpa, Hva, Pfn};

const LOG: u32 = KVM_MEM_LOG_DIRTY_PAGES;

/// The memslots view reports the VM's address spaces: 1 normally, 2 with SMM (an embedder sizes
/// its per-address-space state from it). Kills `MemslotsView::nr_address_spaces` -> 0 and -> 1.
#[test]
fn the_memslots_view_reports_the_address_spaces() {
    let (one, _h) = vm(FormatKind::Ept);
    assert_eq!(one.memslots().nr_address_spaces(), 1);
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.nr_address_spaces = 2;
    let (smm, _h) = vm_with(cfg);
    assert_eq!(smm.memslots().nr_address_spaces(), 2);
    // An address space the VM does not have has no generation, and asking is no panic.
    assert!(one.memslots().generation(vmmu::AsId(1)).is_none());
    assert!(smm.memslots().generation(vmmu::AsId(1)).is_some());
    assert!(smm.memslots().generation(vmmu::AsId(u16::MAX)).is_none());
}

/// The memslots view's generation (KVM's `kvm_memslots(kvm)->generation`) moves on with every
/// update of its address space, and not with a refused one. Kills `MemslotsView::generation` -> `Default::default()`, which the
/// other tests caught only by hanging (`common::update_published` waits for the generation to
/// move).
#[test]
fn the_memslots_view_generation_moves_with_each_update() {
    let (vm, _h) = vm(FormatKind::Ept);
    let g0 = vm.memslots().generation(vmmu::AsId(0)).unwrap();
    vm.set_memory_region(&region(1, 0x10_0000, 0x1000, RAM_HVA, 0)).unwrap();
    let g1 = vm.memslots().generation(vmmu::AsId(0)).unwrap();
    assert_ne!(g1, g0, "a create moves the generation on");
    vm.set_memory_region(&region(2, 0x10_0000, 0x1000, RAM_HVA, 0)).unwrap_err();
    assert_eq!(vm.memslots().generation(vmmu::AsId(0)).unwrap(), g1, "a refused update does not");
    vm.set_memory_region(&region(1, 0, 0, 0, 0)).unwrap();
    let g2 = vm.memslots().generation(vmmu::AsId(0)).unwrap();
    assert!(g2 != g1 && g2 != g0, "a delete moves it on again");
}

/// A VM reports the MMU it was built with. Kills `Vm::mmu_kind` -> `Default::default()` (TDP),
/// which only the random sequences of `api_sequences` caught, when they happened to build a
/// shadow-paging VM.
#[test]
fn a_vm_reports_its_mmu() {
    assert_eq!(vm(FormatKind::Ept).0.mmu_kind(), MmuKind::Tdp);
    let (shadow, _h) = vm_with(VmConfig::shadow(46).unwrap());
    assert_eq!(shadow.mmu_kind(), MmuKind::Shadow);
    assert!(shadow.shadow_mmu().is_some());
}

/// A memslot update that waits for a vCPU's read section (a fault in progress) waits with the
/// host's wait policy (`Sched::relax`, which the test host counts), as the MMU's flush waits do:
/// a host whose vCPU threads only make progress when a waiter relaxes (the software machine's
/// hand-off) would otherwise spin forever. Kills `MmuHooks::relax` -> `()`.
#[test]
fn a_memslot_update_waits_for_readers_with_the_hosts_policy() {
    use std::sync::mpsc;
    use vmmu::host::PreemptPoint;
    let (vm, host) = vm(FormatKind::Ept);
    let mut v = vm.create_vcpu().unwrap();
    let (decided_tx, decided_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let vcpu = std::thread::spawn(move || {
        // Parks the vCPU inside its first fault (in the memslot read section).
        park_once_at(PreemptPoint::FaultDecided, decided_tx, go_rx);
        let seen = access(&mut v, 0x10_0000, false).unwrap().0;
        vmmu::testing::preempt::on_this_thread(None);
        seen
    });
    decided_rx.recv().unwrap();
    let before = host.relaxes();
    let updater = update_published(&vm, region(0, 0x10_0000, 0x1000, RAM_HVA, 0));
    // The update now waits for the parked fault; with the host's policy it relaxes at once. The
    // deadline only ends the loop under a mutant that never relaxes (generous: a loaded CI
    // machine may not run the updater's thread for a while).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while host.relaxes() == before && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
    let relaxed = host.relaxes() > before;
    go_tx.send(()).unwrap();
    let _ = vcpu.join().unwrap();
    updater.join().unwrap();
    assert!(relaxed, "the update waited for the reader without the host's wait policy");
}

/// Stopping dirty logging leaves the slot's writable leaves writable (KVM's
/// `kvm_mmu_slot_apply_flags` write-protects only when logging starts): a page written while the
/// slot logged, and not taken by a GET, is written again without a fault. Kills, in
/// `Vm::set_memory_region`'s flags-only handling, `flags & LOG != 0` -> `== 0` and `flags & LOG`
/// -> `flags | LOG` (in the code's earlier form, `FlagsOnly && flags & LOG != 0` -> `||` too),
/// under which the stop write-protected the slot and every write faulted again.
#[test]
fn stopping_dirty_logging_keeps_written_pages_writable() {
    let (vm, _h) = vm(FormatKind::Ept);
    // 16 pages: no 2 MiB leaf to recover when logging stops.
    vm.set_memory_region(&region(1, 0x10_0000, 0x1_0000, RAM_HVA, LOG)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    let (seen, faults) = access(&mut v, 0x10_3000, true).unwrap();
    assert_eq!((seen, faults.len()), (Seen::Ram(Pfn((RAM_HVA >> 12) + 3)), 1));
    vm.set_memory_region(&region(1, 0x10_0000, 0x1_0000, RAM_HVA, 0)).unwrap();
    let flushes = vm.stats().remote_tlb_flush_requests;
    let (_, faults) = access(&mut v, 0x10_3000, true).unwrap();
    assert_eq!(faults.len(), 0, "the stop of logging write-protected the page: {faults:?}");
    assert_eq!(vm.stats().remote_tlb_flush_requests, flushes);
}

/// A read-only slot keeps its 4 KiB leaves when dirty logging stops on it: KVM's
/// `kvm_mmu_slot_apply_flags` returns early for a read-only slot and recovers huge pages only for
/// a writable one (the `pages_4k`/`pages_2m` counters are KVM's). Kills, in
/// `Vm::set_memory_region`'s flags-only handling, `FlagsOnly && flags & RO == 0` -> `||` and
/// `flags & RO == 0` -> `!= 0` (in the code's earlier form, both `&&` of `FlagsOnly && flags &
/// (LOG | RO) == 0 && shadow.is_none()` -> `||`), under which the read-only slot's 512 leaves
/// became one 2 MiB leaf.
#[test]
fn stopping_dirty_logging_on_a_read_only_slot_recovers_no_huge_page() {
    let (vm, _h) = vm(FormatKind::Ept);
    let ro = KVM_MEM_READONLY;
    // 2 MiB-aligned slot and host range: without logging, one 2 MiB leaf could map it.
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, ro | LOG)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    for p in 0..512u64 {
        access(&mut v, 0x20_0000 + (p << 12), false).unwrap();
    }
    assert_eq!((vm.stats().pages_2m, vm.stats().pages_4k), (0, 512), "logging maps 4 KiB");
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, ro)).unwrap();
    assert_eq!((vm.stats().pages_2m, vm.stats().pages_4k), (0, 512), "read-only: kept as is");
    // The control: the same slot writable recovers its 2 MiB leaf when logging stops.
    vm.set_memory_region(&region(1, 0, 0, 0, 0)).unwrap();
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, LOG)).unwrap();
    for p in 0..512u64 {
        access(&mut v, 0x20_0000 + (p << 12), false).unwrap();
    }
    assert_eq!((vm.stats().pages_2m, vm.stats().pages_4k), (0, 512));
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, 0)).unwrap();
    assert_eq!((vm.stats().pages_2m, vm.stats().pages_4k), (1, 0), "writable: recovered");
}

/// Starting dirty logging on a read-only slot changes nothing in its mappings: no guest write
/// can dirty it, and KVM's `kvm_mmu_slot_apply_flags` returns early for a read-only slot (the
/// mutation run found vmmu write-protecting and splitting it: one 2 MiB leaf became 512 4 KiB
/// leaves and every vCPU's TLB was flushed). A writable slot, the control, is split.
#[test]
fn starting_dirty_logging_on_a_read_only_slot_keeps_its_mappings() {
    let (vm, _h) = vm(FormatKind::Ept);
    let ro = KVM_MEM_READONLY;
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, ro)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    access(&mut v, 0x20_0000, false).unwrap();
    assert_eq!((vm.stats().pages_2m, vm.stats().pages_4k), (1, 0), "one 2 MiB leaf");
    let flushes = vm.stats().remote_tlb_flush_requests;
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, ro | LOG)).unwrap();
    assert_eq!((vm.stats().pages_2m, vm.stats().pages_4k), (1, 0), "the leaf stays");
    assert_eq!(vm.stats().remote_tlb_flush_requests, flushes, "nothing to flush");
    let (seen, faults) = access(&mut v, 0x3f_f000, false).unwrap();
    assert_eq!((seen, faults.len()), (Seen::Ram(Pfn((RAM_HVA >> 12) + 0x1ff)), 0));
    // The control: the same slot writable is write-protected and split when logging starts.
    vm.set_memory_region(&region(1, 0, 0, 0, 0)).unwrap();
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, 0)).unwrap();
    access(&mut v, 0x20_0000, false).unwrap();
    assert_eq!((vm.stats().pages_2m, vm.stats().pages_4k), (1, 0));
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, LOG)).unwrap();
    assert_eq!(vm.stats().pages_2m, 0, "writable: split");
}

/// A read fault, as the exit handler of an EPT violation takes it.
fn read_fault(v: &mut Vcpu<TestHost>, gpa: u64) -> FaultOutcome {
    v.service_requests().unwrap();
    v.handle_ept_violation(Gpa(gpa), FaultAccess::READ).unwrap()
}

/// A host invalidation covering the end of a slot's host range and beyond reaches only that
/// slot's gfns: faults on the next slot in guest-physical space (whose host range is elsewhere)
/// map at once while the invalidation is in flight. Kills, in `Vm::invalidate_hva_range_begin`,
/// `s_end = s_start + (npages << 12)` -> `s_start * ...`, under which the clipped range ran past
/// the slot's last gfn into its neighbour's, and faults there spun on Retry.
#[test]
fn an_invalidation_past_a_slots_end_spares_the_next_slot() {
    let (vm, _h) = vm(FormatKind::Ept);
    // Slot 1: gfns 0x100..0x110 over host [RAM_HVA, +64 KiB); slot 2 right after it in
    // guest-physical space, over host memory 1 MiB further.
    vm.set_memory_region(&region(1, 0x10_0000, 0x1_0000, RAM_HVA, 0)).unwrap();
    vm.set_memory_region(&region(2, 0x11_0000, 0x1_0000, RAM_HVA + 0x10_0000, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    let inv = vm.invalidate_hva_range_begin(Hva(RAM_HVA + 0x8000), Hva(RAM_HVA + 0x2_0000));
    let retry = FaultOutcome::Retry(RetryCause::HostInvalidation);
    assert_eq!(read_fault(&mut v, 0x10_7000), FaultOutcome::Fixed, "below the range");
    assert_eq!(read_fault(&mut v, 0x10_8000), retry, "slot 1, invalidated");
    assert_eq!(read_fault(&mut v, 0x10_f000), retry, "slot 1's last page, invalidated");
    assert_eq!(read_fault(&mut v, 0x11_0000), FaultOutcome::Fixed, "slot 2 is not");
    assert_eq!(read_fault(&mut v, 0x11_f000), FaultOutcome::Fixed, "slot 2 is not");
    inv.end();
    assert_eq!(access(&mut v, 0x10_8000, false).unwrap().0, Seen::Ram(Pfn((RAM_HVA >> 12) + 8)));
}

/// A host invalidation of no bytes, at an address inside a slot that is not page-aligned,
/// invalidates no page: a fault on the page holding that address maps it. Kills, in
/// `Vm::invalidate_hva_range_begin`, `lo < hi` -> `lo <= hi`, under which the empty overlap was
/// rounded out to the whole page and its faults spun on Retry until the invalidation ended.
#[test]
fn an_empty_invalidation_inside_a_page_invalidates_nothing() {
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(1, 0x10_0000, 0x1_0000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    let inv = vm.invalidate_hva_range_begin(Hva(RAM_HVA + 0x5008), Hva(RAM_HVA + 0x5008));
    assert_eq!(read_fault(&mut v, 0x10_5000), FaultOutcome::Fixed);
    inv.end();
}

/// On an L1TF host whose L1D address width (44 bits) is above its MAXPHYADDR (36), a TDP VM
/// emulates a gpa above MAXPHYADDR (the tables still reach it) without installing an MMIO SPTE,
/// although the codec could hold its gfn: KVM's `kvm_mmu_max_gfn` is the host's physical-address
/// width under TDP. Kills, in `Vm::new`, `max_gfn = min(memslots' max_gfn, codec's max_gfn)` ->
/// the codec's alone, under which the fault cached an MMIO SPTE for it. (cargo-mutants generates
/// no mutants inside `Vm::new`; this one was applied by hand.)
#[test]
fn a_gpa_above_maxphyaddr_is_not_cached_even_where_the_l1tf_codec_could_hold_it() {
    use vmmu::fault::EmulateSource;
    use vmmu::spte::HostCpu;
    for format in [FormatKind::Ept, FormatKind::Npt] {
        let mut cfg = VmConfig::new(format, 36).unwrap();
        cfg.host_cpu = HostCpu::new(36).unwrap().with_l1tf(44).unwrap();
        let (vm, _h) = vm_with(cfg);
        assert!(vm.mmio_caching_enabled(), "{format:?}");
        let mut v = vm.create_vcpu().unwrap();
        for _ in 0..2 {
            let (seen, _) = access(&mut v, 1 << 36, false).unwrap();
            assert_eq!(seen, Seen::Mmio(EmulateSource::SlowPathMmio), "{format:?}");
        }
        assert_eq!(v.stats.pf_mmio_spte_created, 0, "{format:?}");
    }
}
