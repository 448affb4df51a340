//! VM entry points out of heap. `Vm::get_dirty_log`: the bitmap it returns is allocated
//! fallibly, before any bit is taken, so a call that cannot allocate answers `ENOMEM` and loses
//! no dirty page; the next call with heap returns every page written (and, in auto mode,
//! write-protects them again). `Vm::create_vcpu` takes nothing from the heap.
//!
//! The global allocator here fails every allocation of this thread after the first `granted`
//! while a thread-local switch is on (`common/failing_heap.rs`).
#![cfg(not(loom))]

mod common;

#[path = "common/failing_heap.rs"]
mod failing_heap;

use failing_heap::{heap_for, Failing};
use vmmu::dirty::{pages_of, DirtyLogError};
use vmmu::memslot::KVM_MEM_LOG_DIRTY_PAGES;
use vmmu::spte::FormatKind;
use vmmu::{AsId, SlotId};

#[global_allocator]
static HEAP: Failing = Failing;

#[test]
fn get_dirty_log_out_of_heap_answers_enomem_and_loses_no_page() {
    for format in [FormatKind::Ept, FormatKind::Npt] {
        let (vm, _host) = common::vm(format);
        // 64 MiB: a bitmap of 256 words.
        let slot = common::region(3, 0, 64 << 20, common::RAM_HVA, KVM_MEM_LOG_DIRTY_PAGES);
        vm.set_memory_region(&slot).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        let written: Vec<u64> = (0..32u64).map(|i| i * 509).collect();
        for &page in &written {
            common::access(&mut v, page << 12, true).unwrap();
        }
        let (out, failed) = heap_for(0, || vm.get_dirty_log(AsId(0), SlotId(3)));
        assert_eq!(out, Err(DirtyLogError::OutOfHeap { words: 256 }), "{format:?}");
        assert!(failed > 0, "{format:?}: nothing was refused: the test proves nothing");
        assert_eq!(out.unwrap_err().errno(), "ENOMEM");
        // Every allocation in turn: the call fails whole or succeeds whole.
        for granted in 1..4 {
            let (out, failed) = heap_for(granted, || vm.get_dirty_log(AsId(0), SlotId(3)));
            assert!(out.is_ok() && failed == 0, "{format:?} {granted}: {out:?}");
            let pages: Vec<u64> = pages_of(&out.unwrap()).collect();
            assert_eq!(pages, written, "{format:?}: a page written was lost by the failed call");
            // Auto mode cleared and write-protected them: the same writes are logged again.
            for &page in &written {
                common::access(&mut v, page << 12, true).unwrap();
            }
        }
    }
}

/// Creating a vCPU takes nothing from the heap (its records are made with the VM: the SRCU reader
/// slots, the request words, the vCPU index), on either MMU, so a hypervisor may create vCPUs
/// when its heap is full; only the VM's creation allocates.
#[test]
fn a_vcpu_is_created_without_heap() {
    let shadow = vmmu::vm::VmConfig::shadow(46).unwrap();
    for cfg in [ept(), npt(), shadow] {
        let (vm, _host) = common::vm_with(cfg);
        let mut vcpus = Vec::with_capacity(3);
        for _ in 0..3 {
            let (out, failed) = failing_heap::without_heap(|| vm.create_vcpu());
            assert_eq!(failed, 0, "a vCPU's creation asked the heap");
            vcpus.push(out.unwrap());
        }
        let ((), failed) = failing_heap::without_heap(|| drop(vcpus.pop()));
        assert_eq!(failed, 0, "a vCPU's drop asked the heap");
    }
}

fn ept() -> vmmu::vm::VmConfig {
    vmmu::vm::VmConfig::new(FormatKind::Ept, 46).unwrap()
}

fn npt() -> vmmu::vm::VmConfig {
    vmmu::vm::VmConfig::new(FormatKind::Npt, 46).unwrap()
}
