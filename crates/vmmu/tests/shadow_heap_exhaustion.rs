//! A shadow-paging #PF when the global allocator has nothing left: the fault reports
//! [`FaultError::OutOfHeap`] (KVM's `-ENOMEM` from `mmu_topup_memory_caches`), which the
//! hypervisor can turn into an exit to its VMM, instead of ending in the allocator's error
//! handler (an abort; on a bare-metal target a panic). What a failed fault built before it ran
//! out stays consistent: the fault succeeds once memory is back, and nothing stale is reachable.
//!
//! The global allocator here fails every allocation the faulting thread makes while a
//! thread-local switch is on; without fallible allocation the test binary aborts.
#![cfg(not(loom))]

mod common;

use common::shadow::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use vmmu::fault::{FaultError, PfErr};
use vmmu::tdp::HwWalk;
use vmmu::{Access, Gva};

struct Failing;

thread_local! {
    static FAIL: Cell<bool> = const { Cell::new(false) };
    static FAILED: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged, or returns null (an allocation failure,
// which `GlobalAlloc::alloc` may report) while the thread's switch is on.
unsafe impl GlobalAlloc for Failing {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if FAIL.try_with(Cell::get).unwrap_or(false) {
            let _ = FAILED.try_with(|n| n.set(n.get() + 1));
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if FAIL.try_with(Cell::get).unwrap_or(false) {
            let _ = FAILED.try_with(|n| n.set(n.get() + 1));
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static FAILING: Failing = Failing;

/// Runs `f` with every allocation of this thread failing; returns what it returned and how
/// many allocations failed.
fn without_heap<R>(f: impl FnOnce() -> R) -> (R, usize) {
    FAILED.with(|n| n.set(0));
    FAIL.with(|s| s.set(true));
    let r = f();
    FAIL.with(|s| s.set(false));
    (r, FAILED.with(Cell::get))
}

/// The error code of the hardware walk of a user read of `gva`.
fn read_fault(v: &mut vmmu::vcpu::Vcpu<vmmu::testing::TestHost>, gva: u64) -> PfErr {
    v.service_requests().unwrap();
    v.enter_guest_mode().unwrap();
    let walk = v.walk_gva(Gva(gva), Access::USER);
    v.exit_guest_mode();
    match walk {
        HwWalk::Violation { present, .. } => {
            PfErr(PfErr::USER | if present { PfErr::PRESENT } else { 0 })
        }
        HwWalk::Misconfig { .. } => PfErr(PfErr::USER | PfErr::RSVD | PfErr::PRESENT),
        other => panic!("{other:?}"),
    }
}

/// What a fault needs from the heap, and what it must do without it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Needs {
    /// New shadow pages (or a second link to one): the fault must report `OutOfMemory`.
    Heap,
    /// Perhaps nothing (room reserved earlier): either outcome, but never an abort.
    Maybe,
}

#[test]
fn shadow_faults_without_heap_report_out_of_memory_and_leave_nothing_half_made() {
    let (vm, host, next) = shadow_vm_with(|_| {});
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, 0x100_0000, P | RW | US);
    s.map4k(0x4000_1000, 0x100_1000, P | RW | US);
    s.map4k(0x4000_2000, 0x100_0000, P | RW | US);
    s.map4k(0x80_0000_0000, 0x100_2000, P | RW | US);
    s.map4k(0x80_0000_1000, MMIO_GPA, P | RW | US);
    s.map4k(0x4040_0000, 0x100_3000, P | RW | US);
    // Four more PDEs name 0x4000_0000's last-level table: the same guest table under five
    // PDEs, so faults link an existing shadow page again, until its parent list must grow.
    let pt = s.read(s.entry_gpa(0x4000_0000, 2)) & 0x000f_ffff_ffff_f000;
    for gva in [0x4020_0000, 0x4060_0000, 0x4080_0000, 0x40a0_0000] {
        host.write_u64(RAM_HVA + s.entry_gpa(gva, 2), pt | P | RW | US);
    }
    let ram = |gpa: u64| Some(ram_pfn(gpa));
    // The frame an access reaches, `None` for an MMIO exit at MMIO_GPA.
    let reached = |seen: Seen| match seen {
        Seen::Ram(pfn) => Some(pfn),
        Seen::Mmio(gpa, _) if gpa == vmmu::Gpa(MMIO_GPA) => None,
        other => panic!("{other:?}"),
    };
    let cases = [
        (0x4000_0000, Needs::Heap, ram(0x100_0000)), // PDPT, PD and PT pages, and the leaf
        (0x4000_1000, Needs::Maybe, ram(0x100_1000)), // a leaf of a new gfn in the rmap
        (0x4000_2000, Needs::Maybe, ram(0x100_0000)), // a second leaf of a gfn: an rmap list
        (0x80_0000_0000, Needs::Heap, ram(0x100_2000)), // pages from the root down
        (0x80_0000_1000, Needs::Maybe, None),        // an MMIO SPTE under known tables
        (0x4040_0000, Needs::Heap, ram(0x100_3000)), // a new last-level page under a known PD
        // More parent links for a known page: its list had room for four (`Vec`'s first
        // allocation), the fifth needs more.
        (0x4020_0000, Needs::Maybe, ram(0x100_0000)),
        (0x4060_0000, Needs::Maybe, ram(0x100_0000)),
        (0x4080_0000, Needs::Maybe, ram(0x100_0000)),
        (0x40a0_0000, Needs::Heap, ram(0x100_0000)),
    ];
    let mut v = vcpu_in(&vm, long4(s.cr3));
    let mut reported = 0;
    for (gva, needs, seen) in cases {
        let err = read_fault(&mut v, gva);
        let (out, failed) = without_heap(|| v.handle_page_fault(Gva(gva), err));
        eprintln!("{gva:#x}: {out:?} after {failed} failed allocations");
        match out {
            Err(FaultError::OutOfHeap(_)) => {
                assert!(failed > 0, "{gva:#x}: out of memory with no allocation refused");
                reported += 1;
            }
            Ok(_) if needs == Needs::Maybe => {}
            other => panic!("{gva:#x} needs the heap: {other:?}"),
        }
        assert_eq!(vm.stale_shadow_entries_for_tests(), Some(0), "{gva:#x}");
        // Memory back: the access completes as it would have.
        assert_eq!(reached(access(&mut v, gva, false)), seen, "{gva:#x}");
    }
    assert_eq!(reported, 4, "every case that needs the heap reported it");
    for (gva, _, seen) in cases {
        assert_eq!(reached(access(&mut v, gva, false)), seen, "{gva:#x} at the end");
    }
    assert_eq!(vm.stale_shadow_entries_for_tests(), Some(0));
}
