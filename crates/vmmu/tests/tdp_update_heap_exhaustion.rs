//! A TDP VM's side of its memslot updates out of heap at every allocation in turn: dirty logging
//! turned on (the slot's leaves write-protected) and off (its huge mappings recovered, which is
//! optional work, skipped out of heap as KVM skips what it cannot recover), creates, deletes
//! and moves (whose zap unlinks the tables inside the slot, more than KVM's zap of the leaves:
//! out of heap the tables stay linked, emptied); each answers `ENOMEM` or completes, never an
//! abort, and the guest then reaches its pages as before. (A create that wraps the MMIO generation zaps every root in the middle of the update,
//! and that zap still lists the tables it detaches on the heap infallibly: the crate doc says so;
//! this test stays below the wrap.)
//!
//! The global allocator here fails every allocation of this thread after the first `granted`
//! while a thread-local switch is on (`common/failing_heap.rs`).
#![cfg(not(loom))]

mod common;

#[path = "common/failing_heap.rs"]
mod failing_heap;

use failing_heap::{heap_for, Failing};
use vmmu::memslot::{MemslotError, UserspaceMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};

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
