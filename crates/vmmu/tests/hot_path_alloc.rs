//! The MMIO hot paths allocate nothing (issue 17 point 8): after warm-up, the per-vCPU cache hit,
//! the fast path (lockless walk, MMIO SPTE hit) and, with caching off, the slow path's MMIO
//! decision run many times without one heap allocation; under shadow paging too, the RSVD #PF's
//! GVA-cache hit and its lockless shadow walk to an MMIO SPTE. A counting global allocator in
//! this test binary counts the allocations of the thread that measures, while it measures (the
//! test harness's own thread may allocate at any time: when it first blocks waiting for the
//! test, which on a loaded machine can fall inside a measured loop). What the paths cost is
//! measured by `vmmu bench --only mmio`, not here.
#![cfg(not(loom))]

mod common;

use common::{region, test_frames, vm_on, RAM_HVA};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use vmmu::fault::{EmulateSource, FaultOutcome, PfErr};
use vmmu::spte::FormatKind;
use vmmu::testing::TestHost;
use vmmu::vm::VmConfig;
use vmmu::{FaultAccess, Gpa, Gva};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Whether this thread's allocations are counted (const-initialised, no destructor: reading
    /// it allocates nothing).
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

/// Counts an allocation of a thread that measures.
fn note() {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn source(o: Result<FaultOutcome, vmmu::fault::FaultError>) -> EmulateSource {
    match o {
        Ok(FaultOutcome::Emulate { source, .. }) => source,
        other => panic!("expected an emulation, got {other:?}"),
    }
}

/// Allocations made by `f` on this thread, run `n` times.
fn allocations(n: usize, mut f: impl FnMut()) -> u64 {
    let before = ALLOCS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    for _ in 0..n {
        f();
    }
    COUNTING.with(|c| c.set(false));
    ALLOCS.load(Ordering::Relaxed) - before
}

#[test]
fn mmio_hot_paths_allocate_nothing() {
    // Caching on with both hosts: a type-stable one answers the leaf-table cache hit without a
    // table read section, the other inside one.
    for (caching, type_stable) in [(true, false), (true, true), (false, false)] {
        let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
        cfg.mmio_caching = caching;
        let host = match type_stable {
            true => TestHost::new_type_stable(test_frames()),
            false => TestHost::new(test_frames()),
        };
        let (vm, _host) = vm_on(cfg, host);
        vm.set_memory_region(&region(0, 0, 0x20_0000, RAM_HVA, 0)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        v.service_requests().unwrap();
        // One gfn more than the per-vCPU cache holds, 16 KiB apart (all in one entry of the
        // direct-mapped cache), cycled: every misconfig walks.
        let n = vmmu::vcpu::mmio_cache::ENTRIES as u64 + 1;
        let gpas: Vec<Gpa> = (0..n).map(|i| Gpa(0x1_0000_0000 + i * 0x4000)).collect();
        for &g in &gpas {
            let o = v.handle_ept_violation(g, FaultAccess::READ);
            assert_eq!(source(o), EmulateSource::SlowPathMmio);
        }
        if caching {
            // The cache holds the last gfns filled; starting at the first one, every call misses.
            let mut i = gpas.len() - 1;
            let fast = allocations(10_000, || {
                i = (i + 1) % gpas.len();
                let o = v.handle_ept_misconfig(gpas[i]);
                assert_eq!(source(o), EmulateSource::MmioSpteHit);
            });
            assert_eq!(fast, 0, "the MMIO SPTE fast path allocated");
            let hit = allocations(10_000, || {
                let o = v.handle_ept_misconfig(gpas[0]);
                assert!(matches!(
                    source(o),
                    EmulateSource::VcpuCacheHit | EmulateSource::MmioSpteHit
                ));
            });
            assert_eq!(hit, 0, "the per-vCPU cache hit allocated");
        } else {
            let mut i = 0;
            let slow = allocations(10_000, || {
                i = (i + 1) % gpas.len();
                let o = v.handle_ept_violation(gpas[i], FaultAccess::READ);
                assert_eq!(source(o), EmulateSource::SlowPathMmio);
            });
            assert_eq!(slow, 0, "the uncached slow path allocated");
        }
    }
    // Shadow paging, a guest without paging (GVA = GPA): an RSVD #PF on an MMIO GVA answered
    // from the GVA part of the per-vCPU cache, then from the MMIO SPTE the lockless walk of the
    // shadow tables finds (KVM `handle_mmio_page_fault`).
    let (vm, _host) = vm_on(VmConfig::shadow(46).unwrap(), TestHost::new(test_frames()));
    vm.set_memory_region(&region(0, 0, 0x20_0000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    // One page more than the cache holds, 16 KiB apart: all in one entry (`slot_of`).
    let n = vmmu::vcpu::mmio_cache::ENTRIES as u64 + 1;
    let gvas: Vec<Gva> = (0..n).map(|i| Gva(0x8000_0000 + i * 0x4000)).collect();
    for &g in &gvas {
        let o = v.handle_page_fault(g, PfErr(0));
        assert_eq!(source(o), EmulateSource::SlowPathMmio);
    }
    let rsvd = PfErr(PfErr::RSVD | PfErr::PRESENT);
    let mut i = gvas.len() - 1;
    let walk = allocations(10_000, || {
        i = (i + 1) % gvas.len();
        let o = v.handle_page_fault(gvas[i], rsvd);
        assert_eq!(source(o), EmulateSource::MmioSpteHit);
    });
    assert_eq!(walk, 0, "the lockless shadow walk to an MMIO SPTE allocated");
    let hit = allocations(10_000, || {
        let o = v.handle_page_fault(gvas[0], rsvd);
        assert!(matches!(source(o), EmulateSource::VcpuCacheHit | EmulateSource::MmioSpteHit));
    });
    assert_eq!(hit, 0, "the GVA-cache hit allocated");
}
