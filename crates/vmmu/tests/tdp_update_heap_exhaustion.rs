//! A TDP VM's side of its memslot updates and host invalidations out of heap at every
//! allocation in turn: dirty logging turned on (the slot's leaves write-protected) and off (its
//! huge mappings recovered, which is optional work, skipped out of heap as KVM skips what it
//! cannot recover), creates, deletes and moves (whose zap unlinks the tables inside the slot,
//! more than KVM's zap of the leaves: out of heap the tables stay linked, emptied), and host
//! invalidations (leaves only); each answers `ENOMEM` or completes, never an abort, and the
//! guest then reaches its pages as before. The zaps of whole roots (`slot_zap_all`, an MMIO
//! generation wrap, `zap_all_fast`, the VM's drop) likewise.
//!
//! The global allocator here fails every allocation of this thread after the first `granted`
//! while a thread-local switch is on (`common/failing_heap.rs`).
#![cfg(not(loom))]

mod common;

#[path = "common/failing_heap.rs"]
mod failing_heap;

use failing_heap::{heap_for, without_heap, Failing};
use vmmu::memslot::{MemslotError, UserspaceMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
use vmmu::tdp::HwWalk;
use vmmu::Access;

#[global_allocator]
static HEAP: Failing = Failing;

#[test]
fn tdp_vm_logging_on_and_off_and_creates_out_of_heap_at_every_allocation() {
    use vmmu::spte::FormatKind;
    for format in [FormatKind::Ept, FormatKind::Npt] {
        let (vm, _host) = common::vm(format);
        let ram = |flags| common::region(0, 0, 64 << 20, common::RAM_HVA, flags);
        vm.set_memory_region(&ram(0)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        let gpas = || (0..32u64).map(|i| i << 20);
        // Each access reaches its own frame (RAM_HVA + gpa), and writes once logging is on.
        let mut check = |write: bool| {
            for gpa in gpas() {
                let (seen, _) = common::access(&mut v, gpa, write).unwrap();
                let frame = vmmu::Pfn((common::RAM_HVA + gpa) >> 12);
                assert_eq!(seen, common::Seen::Ram(frame), "{format:?} {gpa:#x}");
            }
        };
        check(true);
        let run = |what: &str, r: &UserspaceMemoryRegion, undo: &UserspaceMemoryRegion| {
            let mut enomem = 0;
            for granted in 0..10_000 {
                let (out, failed) = heap_for(granted, || vm.set_memory_region(r));
                assert_eq!(vm.core().free_queue_promises(), 0, "{format:?} {what} {granted}");
                match out {
                    Err(MemslotError::OutOfMemory { .. }) => {
                        assert!(failed > 0, "{format:?} {what} {granted}");
                        enomem += 1;
                    }
                    Err(e) => panic!("{format:?} {what} {granted}: {e}"),
                    Ok(_) if failed == 0 => return enomem,
                    Ok(_) => {
                        vm.set_memory_region(undo).unwrap();
                    }
                }
            }
            panic!("{format:?} {what}: no end to its allocations");
        };
        let enomem = run("logging on", &ram(KVM_MEM_LOG_DIRTY_PAGES), &ram(0));
        assert!(enomem > 0, "{format:?}: logging on needed no heap: the test proves nothing");
        check(true);
        // Off out of heap: the 2 MiB blocks the writes dirtied stay mapped by 4 KiB leaves
        // when the recovery cannot list the tables it would detach.
        let (out, failed) = heap_for(0, || vm.set_memory_region(&ram(0)));
        assert!(out.is_ok() && failed > 0, "{format:?}: {out:?}, {failed} refused");
        check(false);
        vm.set_memory_region(&ram(KVM_MEM_LOG_DIRTY_PAGES)).unwrap();
        check(true);
        run("logging off", &ram(0), &ram(KVM_MEM_LOG_DIRTY_PAGES));
        check(true);
        for i in 1..8u64 {
            let gpa = (64 + 2 * i) << 20;
            let slot = common::region(i as u32, gpa, 2 << 20, common::RAM_HVA + gpa, 0);
            let gone = common::region(i as u32, gpa, 0, common::RAM_HVA + gpa, 0);
            run("create", &slot, &gone);
            common::access(&mut v, gpa, true).unwrap();
        }
    }
}

/// A TDP VM's memslot deletes and moves out of heap at every allocation in turn: the zap drops
/// every leaf of the old place (the guest's access there exits as MMIO), unlinking the tables
/// inside it only where it can list them; no table frame is lost (all are freed by the VM's
/// drop). Before, the zap listed the tables on the heap infallibly: out of heap, an abort.
#[test]
fn tdp_vm_deletes_and_moves_out_of_heap_at_every_allocation() {
    use vmmu::spte::FormatKind;
    for format in [FormatKind::Ept, FormatKind::Npt] {
        let (vm, host) = common::vm(format);
        let (gpa, size) = (1u64 << 30, 8u64 << 20);
        // A host address 4 KiB off the guest's 2 MiB alignment: no huge leaf, so the slot's
        // 2 MiB blocks are mapped by last-level tables that lie inside it.
        let hva = common::RAM_HVA + (256 << 20) + 4096;
        let slot = |at: u64, size: u64| common::region(1, at, size, hva, 0);
        vm.set_memory_region(&slot(gpa, size)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        // Pages across the slot, written: 4 KiB leaves under each of its four last-level tables.
        let touch = |v: &mut vmmu::vcpu::Vcpu<vmmu::testing::TestHost>, at: u64| {
            for i in 0..16u64 {
                let (seen, _) = common::access(v, at + i * (512 << 10), true).unwrap();
                let frame = vmmu::Pfn((hva + i * (512 << 10)) >> 12);
                assert_eq!(seen, common::Seen::Ram(frame), "{format:?} {i}");
            }
        };
        let gone = |v: &mut vmmu::vcpu::Vcpu<vmmu::testing::TestHost>, at: u64| {
            for i in 0..16u64 {
                let (seen, _) = common::access(v, at + i * (512 << 10), false).unwrap();
                assert!(matches!(seen, common::Seen::Mmio(_)), "{format:?} {i}: {seen:?}");
            }
        };
        for (what, to) in [("delete", None), ("move", Some(gpa + (1 << 30)))] {
            let mut refused = 0;
            for granted in 0..10_000 {
                touch(&mut v, gpa);
                let r = match to {
                    None => slot(gpa, 0),
                    Some(at) => slot(at, size),
                };
                let (out, failed) = heap_for(granted, || vm.set_memory_region(&r));
                // Every promise of room in the free queue was kept or given back.
                assert_eq!(vm.core().free_queue_promises(), 0, "{format:?} {what} {granted}");
                match out {
                    Ok(_) => gone(&mut v, gpa),
                    Err(MemslotError::OutOfMemory { .. }) if failed > 0 => {
                        touch(&mut v, gpa);
                        continue;
                    }
                    Err(e) => panic!("{format:?} {what} {granted}: {e}"),
                }
                if let Some(at) = to {
                    touch(&mut v, at);
                    vm.set_memory_region(&slot(at, 0)).unwrap();
                }
                vm.set_memory_region(&slot(gpa, size)).unwrap();
                refused += failed;
                if failed == 0 {
                    break;
                }
            }
            assert!(refused > 0, "{format:?} {what}: no allocation was refused");
        }
        drop(v);
        drop(vm);
        assert_eq!(host.tables_in_use(), 0, "{format:?}: table frames lost");
    }
}

/// A host invalidation on a TDP VM, EPT and NPT, zaps leaves only (its tables stay
/// linked, as KVM's `kvm_unmap_gfn_range` leaves them), so it needs no heap either. Before, the
/// begin listed the slot's gfn range on the heap: out of heap, the process aborted.
#[test]
fn host_invalidations_on_a_tdp_vm_without_heap() {
    use vmmu::spte::FormatKind;
    for format in [FormatKind::Ept, FormatKind::Npt] {
        let (vm, _host) = common::vm(format);
        vm.set_memory_region(&common::region(0, 0, 64 << 20, common::RAM_HVA, 0)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        // 32 pages 1 MiB apart: the first half in the invalidated 16 MiB.
        let gpas = || (0..32u64).map(|i| i << 20);
        for gpa in gpas() {
            common::access(&mut v, gpa, true).unwrap();
        }
        let (inv, _) = without_heap(|| {
            vm.invalidate_hva_range_begin(
                vmmu::Hva(common::RAM_HVA),
                vmmu::Hva(common::RAM_HVA + (16 << 20)),
            )
        });
        v.service_requests().unwrap();
        let g = v.enter_guest().unwrap();
        for gpa in gpas() {
            let walk = g.walk(vmmu::Gpa(gpa), Access::WRITE);
            let zapped = matches!(walk, HwWalk::Violation { present: false, .. });
            assert_eq!(zapped, gpa < 16 << 20, "{format:?} {gpa:#x}: {walk:?}");
        }
        drop(g);
        let ((), failed) = without_heap(|| inv.end());
        assert_eq!(failed, 0);
        for gpa in gpas() {
            let (seen, _) = common::access(&mut v, gpa, false).unwrap();
            assert_eq!(seen, common::Seen::Ram(vmmu::Pfn((common::RAM_HVA + gpa) >> 12)));
        }
    }
}

/// Memslot creates, with and without dirty logging, on a TDP VM, out of heap at every
/// allocation in turn: each fails with `ENOMEM` and leaves no slot (the guest's access exits as
/// MMIO), or completes (the access reaches RAM); never an abort. Slot ids across the id table's
/// pages and both address spaces, then 150 more slots, enough for the sets' indexes to grow and
/// split their blocks. Before, the sets' indexes grew infallibly in the middle of the update
/// (between its publications), and a logged slot's shared bitmap handle (`Arc::new`) and its
/// entry in the table of bitmaps were infallible too.
#[test]
fn memslot_creates_out_of_heap_at_every_allocation() {
    use vmmu::memslot::{MemslotError, KVM_MEM_LOG_DIRTY_PAGES};
    use vmmu::spte::FormatKind;
    let mut cfg = vmmu::vm::VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.nr_address_spaces = 2;
    let (vm, _host) = common::vm_with(cfg);
    let mut v = vm.create_vcpu().unwrap();
    let (mut refused, mut enomem) = (0, 0);
    let smm = 1 << 16;
    let ids = [(1, 0), (2, 1), (63, 0), (62, 1), (64, 1), (65, 0), (200, 0), (201, 1)];
    let ids = ids.into_iter().chain([(32000, 1), (32001, 0), (smm | 5, 0), (smm | 6, 1)]);
    let many = (300u32..450).map(|id| (id, 2));
    for (i, (id, kind)) in ids.chain(many).enumerate() {
        let flags = if kind == 1 { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        // 2 MiB apart, reversed for the many so that each goes in front of the others.
        let gpa = if kind == 2 { (1000 - i as u64) << 21 } else { (i as u64) << 21 };
        let hva = common::RAM_HVA + (gpa & ((1 << 30) - 1));
        let size = if kind == 2 { 4096 } else { 2 << 20 };
        let r = common::region(id, gpa, size, hva, flags);
        let smm = id >> 16 != 0;
        let mut granted = 0;
        loop {
            let (out, failed) = heap_for(granted, || vm.set_memory_region(&r));
            refused += failed;
            let seen = (!smm).then(|| common::access(&mut v, gpa, false).unwrap().0);
            match out {
                Err(MemslotError::OutOfMemory { .. }) => {
                    enomem += 1;
                    assert!(failed > 0, "{id} {granted}: ENOMEM with nothing refused");
                    assert!(matches!(seen, None | Some(common::Seen::Mmio(_))), "{seen:?}");
                }
                Ok(_) => {
                    let ram = common::Seen::Ram(vmmu::Pfn(hva >> 12));
                    assert!(seen.is_none_or(|s| s == ram), "{id} {granted}: {seen:?}");
                    if failed == 0 {
                        break;
                    }
                    vm.set_memory_region(&common::region(id, gpa, 0, hva, flags)).unwrap();
                }
                Err(e) => panic!("{id} {granted}: {e}"),
            }
            granted += 1;
            assert!(granted < 100, "{id}: no end to its allocations");
        }
    }
    eprintln!("{refused} allocations refused, {enomem} updates answered ENOMEM");
    assert!(enomem > 0, "no update ran out of heap: the test proves nothing");
}

/// The TDP zaps of whole roots out of heap: a delete and a move with `slot_zap_all` (KVM's
/// default quirk: every root obsoleted and zapped) at every allocation in turn, a
/// `zap_all_fast` with no heap at all while the vCPU holds its root, a create whose update wraps
/// the MMIO generation (which zaps every root in its middle), and the VM's drop. A root no vCPU
/// uses goes whole, with the tables it links, and a root in use keeps the tables it cannot list
/// until its last user drops it: nothing to allocate, no frame lost. Before, each of these
/// listed every table it unlinked on the heap: out of heap, an abort.
#[test]
fn tdp_zaps_of_whole_roots_out_of_heap() {
    use vmmu::spte::FormatKind;
    for format in [FormatKind::Ept, FormatKind::Npt] {
        let mut cfg = vmmu::vm::VmConfig::new(format, 46).unwrap();
        cfg.slot_zap_all = true;
        // A few updates before the MMIO generation wraps.
        cfg.generation_base = (1 << 19) - 40;
        let (vm, host) = common::vm_with(cfg);
        let ram = common::region(0, 0, 64 << 20, common::RAM_HVA, 0);
        vm.set_memory_region(&ram).unwrap();
        let (gpa, size, hva) = (1u64 << 30, 8u64 << 20, common::RAM_HVA + (256 << 20) + 4096);
        let slot = |at: u64, size: u64| common::region(1, at, size, hva, 0);
        vm.set_memory_region(&slot(gpa, size)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        // RAM pages 1 MiB apart and pages across slot 1 (4 KiB leaves: its host address is
        // off the 2 MiB alignment), each reaching its own frame.
        // Every root on the list holds the promise of its tree's place in the free queue, and
        // every retired root kept it.
        let promises_kept = |vm: &vmmu::vm::Vm<vmmu::testing::TestHost>| {
            let roots = vm.tdp().expect("a TDP VM").nr_roots();
            assert_eq!(vm.core().free_queue_tree_promises(), roots, "{format:?}");
        };
        let ram_ok = |v: &mut vmmu::vcpu::Vcpu<vmmu::testing::TestHost>| {
            for i in 0..32u64 {
                let (seen, _) = common::access(v, i << 20, true).unwrap();
                let frame = vmmu::Pfn((common::RAM_HVA + (i << 20)) >> 12);
                assert_eq!(seen, common::Seen::Ram(frame), "{format:?} ram {i}");
            }
        };
        let slot_at = |v: &mut vmmu::vcpu::Vcpu<vmmu::testing::TestHost>, at: u64, there: bool| {
            for i in 0..16u64 {
                let (seen, _) = common::access(v, at + i * (512 << 10), there).unwrap();
                if there {
                    let frame = vmmu::Pfn((hva + i * (512 << 10)) >> 12);
                    assert_eq!(seen, common::Seen::Ram(frame), "{format:?} {at:#x} {i}");
                } else {
                    assert!(matches!(seen, common::Seen::Mmio(_)), "{format:?} {i}: {seen:?}");
                }
            }
        };
        ram_ok(&mut v);
        slot_at(&mut v, gpa, true);
        // Creates (2 MiB apart) out of heap at every allocation until one wraps the MMIO
        // generation: its update zaps every root between its publications.
        let mut i = 0u64;
        while vm.stats().mmio_gen_wraps == 0 {
            let at = (3 << 30) + (i << 21);
            let r = common::region(10 + i as u32, at, 2 << 20, common::RAM_HVA + (i << 21), 0);
            let mut granted = 0;
            while let (Err(e), _) = heap_for(granted, || vm.set_memory_region(&r)) {
                assert!(matches!(e, MemslotError::OutOfMemory { .. }), "{format:?} {i}: {e}");
                granted += 1;
                assert!(granted < 100, "{format:?} {i}: no end to its allocations");
            }
            ram_ok(&mut v);
            promises_kept(&vm);
            i += 1;
            assert!(i < 64, "{format:?}: no wrap");
        }
        let zaps = vm.stats().zap_all_fast;
        for (what, to) in [("delete", None), ("move", Some(gpa + (1 << 30)))] {
            let mut refused = 0;
            for granted in 0..10_000 {
                let r = match to {
                    None => slot(gpa, 0),
                    Some(at) => slot(at, size),
                };
                let (out, failed) = heap_for(granted, || vm.set_memory_region(&r));
                refused += failed;
                match out {
                    Ok(_) => slot_at(&mut v, gpa, false),
                    Err(MemslotError::OutOfMemory { .. }) if failed > 0 => {
                        slot_at(&mut v, gpa, true);
                        continue;
                    }
                    Err(e) => panic!("{format:?} {what} {granted}: {e}"),
                }
                ram_ok(&mut v);
                if let Some(at) = to {
                    slot_at(&mut v, at, true);
                    vm.set_memory_region(&slot(at, 0)).unwrap();
                }
                vm.set_memory_region(&slot(gpa, size)).unwrap();
                slot_at(&mut v, gpa, true);
                if failed == 0 {
                    break;
                }
            }
            assert!(refused > 0, "{format:?} {what}: no allocation was refused");
            promises_kept(&vm);
        }
        assert!(vm.stats().zap_all_fast > zaps, "{format:?}: the updates zapped no root");
        // With no heap at all, while the vCPU holds its root (so the zap cannot list the tables
        // it would unlink from it, and keeps them linked, emptied).
        let (_, failed) = without_heap(|| vm.zap_all_fast());
        assert!(failed > 0, "{format:?}: the zap was refused no room: the test proves nothing");
        let before = host.tables_in_use();
        ram_ok(&mut v); // the vCPU drops its obsolete root, with its tables, and builds a new one
        slot_at(&mut v, gpa, true);
        vm.reclaim();
        assert!(host.tables_in_use() < before + 2, "{format:?}: the old root's tables stayed");
        promises_kept(&vm);
        drop(v);
        let ((), failed) = without_heap(|| drop(vm));
        assert_eq!(failed, 0, "{format:?}: the VM's drop asked the heap");
        assert_eq!(host.tables_in_use(), 0, "{format:?}: table frames lost");
    }
}

/// A fault whose huge leaf replaces a lower table (the host now maps the block huge) detaches
/// that table and the tables below it; they go to the free queue as one tree, whose place the
/// fault promises before it changes anything. Out of heap for that place, the fault answers
/// `OutOfHeap` with nothing changed; with the place at hand it allocates nothing, the guest
/// reaches the huge leaf's frames, and the reclaimer frees every detached table.
#[test]
fn a_huge_leaf_over_tables_out_of_heap() {
    use vmmu::fault::FaultError;
    use vmmu::spte::FormatKind;
    use vmmu::testing::TestHost;
    use vmmu::{Gpa, Level, Pfn};
    for format in [FormatKind::Ept, FormatKind::Npt] {
        let host = TestHost::new(common::test_frames());
        // 1 GiB of host RAM in one 1 GiB page.
        host.map(common::RAM_HVA, 1 << 30, common::RAM_HVA >> 12, Level::L1G, true);
        let (vm, _host) = common::vm_on(vmmu::vm::VmConfig::new(format, 46).unwrap(), host);
        let mut v = vm.create_vcpu().unwrap();
        // No slot yet: the read leaves an MMIO SPTE in a 4 KiB table, below a 2 MiB table, in
        // the first GiB.
        let (seen, _) = common::access(&mut v, 0x20_3000, false).unwrap();
        assert!(matches!(seen, common::Seen::Mmio(_)), "{format:?}: {seen:?}");
        vm.set_memory_region(&common::region(0, 0, 1 << 30, common::RAM_HVA, 0)).unwrap();
        let before = vm.stats();
        let promises = vm.core().free_queue_tree_promises();
        let frame = |gpa: u64| Pfn((common::RAM_HVA + gpa) >> 12);

        // A read's violation, as the hardware reports it (not through `common::access`, which
        // lists the faults on the heap; a read, as the test host notes written pages there).
        let violation = |v: &mut vmmu::vcpu::Vcpu<TestHost>, gpa: u64| match format {
            FormatKind::Ept => v.handle_ept_violation(Gpa(gpa), vmmu::FaultAccess::READ),
            _ => v.handle_npf(Gpa(gpa), vmmu::fault::PfErr(0)),
        };
        v.service_requests().unwrap();
        let used = vm.core().use_up_tree_room();
        let (out, _) = without_heap(|| violation(&mut v, 0x4000));
        assert_eq!(out, Err(FaultError::OutOfHeap(Gpa(0x4000))), "{format:?}");
        vm.core().give_back_tree_room(used);
        let after = vm.stats();
        assert_eq!(vm.core().free_queue_tree_promises(), promises, "{format:?}: promise kept");
        assert_eq!(
            (after.pages_1g, after.tdp_tables_zapped, after.tables_freed),
            (before.pages_1g, before.tdp_tables_zapped, before.tables_freed),
            "{format:?}: nothing changed"
        );

        let (out, failed) = without_heap(|| violation(&mut v, 0x4000));
        assert_eq!(out, Ok(vmmu::fault::FaultOutcome::Fixed), "{format:?}");
        assert_eq!(failed, 0, "{format:?}: the fault needed the heap");
        assert_eq!(vm.core().free_queue_tree_promises(), promises, "{format:?}");
        for gpa in [0x4000, 0x20_3000, 0x3fff_f000] {
            let (seen, faults) = common::access(&mut v, gpa, true).unwrap();
            assert_eq!((seen, faults.len()), (common::Seen::Ram(frame(gpa)), 0), "{format:?}");
        }
        vm.reclaim();
        let after = vm.stats();
        assert_eq!(after.pages_1g, before.pages_1g + 1, "{format:?}");
        assert_eq!(after.tdp_tables_zapped, before.tdp_tables_zapped + 2, "{format:?}");
        assert_eq!(after.tables_freed, before.tables_freed + 2, "{format:?}: both tables freed");
    }
}

/// Loading a TDP root (the first `service_requests`, and the reload after `zap_all_fast` made
/// the vCPU's root obsolete) out of heap at every allocation in turn: `MmuError::OutOfHeap` with
/// nothing made (no root on the list, no table frame kept, the free queue's promises as many as
/// the roots), then a load with heap and the guest reaching its pages. Before, the root's record
/// and the root list's growth were infallible allocations: out of heap, an abort.
#[test]
fn tdp_root_loads_out_of_heap_at_every_allocation() {
    use vmmu::mmu_core::MmuError;
    use vmmu::spte::FormatKind;
    for format in [FormatKind::Ept, FormatKind::Npt] {
        let (vm, host) = common::vm(format);
        vm.set_memory_region(&common::region(0, 0, 64 << 20, common::RAM_HVA, 0)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        let tdp = || vm.tdp().expect("a TDP VM");
        for load in ["first load", "reload after zap_all_fast"] {
            let mut refused = 0;
            for granted in 0..100 {
                let (roots, tables) = (tdp().nr_roots(), host.tables_in_use());
                let (out, failed) = heap_for(granted, || v.service_requests().map(|_| ()));
                match out {
                    Err(MmuError::OutOfHeap) => {
                        assert!(failed > 0, "{format:?} {load} {granted}");
                        refused += 1;
                        assert!(v.root().is_none(), "{format:?} {load} {granted}: a root");
                        assert!(tdp().nr_roots() <= roots, "{format:?} {load}: a root was made");
                        assert!(host.tables_in_use() <= tables, "{format:?} {load}: frame kept");
                        assert_eq!(vm.core().free_queue_tree_promises(), tdp().nr_roots());
                    }
                    Ok(()) if failed == 0 => break,
                    out => panic!("{format:?} {load} {granted}: {out:?}, {failed} refused"),
                }
            }
            assert!(refused > 0, "{format:?} {load}: no allocation was refused");
            assert!(v.root().is_some_and(|r| !r.is_obsolete()), "{format:?} {load}");
            assert_eq!(vm.core().free_queue_tree_promises(), tdp().nr_roots(), "{format:?}");
            for i in 0..32u64 {
                let (seen, _) = common::access(&mut v, i << 20, true).unwrap();
                let frame = vmmu::Pfn((common::RAM_HVA + (i << 20)) >> 12);
                assert_eq!(seen, common::Seen::Ram(frame), "{format:?} {load} {i}");
            }
            vm.zap_all_fast();
        }
        drop(v);
        drop(vm);
        assert_eq!(host.tables_in_use(), 0, "{format:?}: table frames lost");
    }
}
