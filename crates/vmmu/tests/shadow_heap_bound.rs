//! The shadow MMU's heap is bounded by its page limit, not by what the guest touches: a shadow
//! #PF allocates its bookkeeping (shadow pages, reverse map, write tracking) from the global
//! allocator, infallibly (crate doc, "Using the core without std"), so a hypervisor with a fixed
//! heap must know how much the guest can make it take. KVM's `n_max_mmu_pages`
//! (`Vm::set_nr_mmu_pages`) caps the shadow pages; each page holds at most 512 SPTEs, so the
//! reverse map and the per-page records are capped with it. This test has a guest map and touch
//! ever more memory through ever more guest page tables, far past the limit, and measures the
//! live heap of the whole process (a counting global allocator; this binary's tests run one at
//! a time, under `ONE_AT_A_TIME`).
//!
//! What it shows: past the limit the heap stops growing (touching four times as much leaves it
//! where touching once left it, within slack), and its high-water mark stays under
//! [`PER_PAGE_BOUND`] per allowed page, the figure the crate doc gives. Without recycling (the
//! limit ignored) the heap grows with every guest table touched and both checks fail. And what
//! the guest unmaps is given back: a frame's reverse-map list that was long once shrinks with
//! it (without that, the second test holds 1.3 MB against a 0.6 MB bound).
#![cfg(not(loom))]

mod common;

use common::shadow::{access, long4, shadow_vm_with, vcpu_in, Seen, Space, P, RAM_HVA, RW, US};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::{Gpa, Level};

struct Counting;

/// Bytes allocated and not yet freed, by every thread.
static LIVE: AtomicI64 = AtomicI64::new(0);
/// The highest `LIVE` since the last [`reset_peak`].
static PEAK: AtomicI64 = AtomicI64::new(0);

fn grew(by: i64) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size() as i64);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on as is.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            grew(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Tests of this binary measure the whole process's heap: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Heap per allowed shadow page that the shadow MMU may take, as the crate doc states it: a
/// last-level page's record and its 512 leaves' reverse-map entries, each leaf mapping a frame
/// of its own (measured: 43 KiB per page at both limits below, sizes as `Layout` counts them,
/// without the allocator's own overhead; 40-42 KiB with the reverse map a B-tree, 62-66 KiB
/// before it held a gfn's one leaf in place).
const PER_PAGE_BOUND: i64 = 64 << 10;

/// A shadow page's own record (its 512 leaf gfns, its parents), its leaves apart.
const EMPTY_PAGE_BOUND: i64 = 6 << 10;

/// One leaf's reverse-map entry.
const LEAF_BOUND: i64 = 128;

/// Heap the MMU may take beyond [`PER_PAGE_BOUND`] per page: the page hash's buckets and
/// per-VM records that do not grow with the guest.
const FIXED_BOUND: i64 = 256 << 10;

fn reset_peak() -> i64 {
    let now = LIVE.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

/// Guest RAM the GVAs map, a slot of its own: 1 GiB at 1 GiB, more frames than the largest
/// limit below lets leaves exist at once, so every leaf maps a frame no other leaf maps (each
/// leaf its own reverse-map entry: the worst case).
const DATA_GPA: u64 = 1 << 30;
const DATA_HVA: u64 = 0x1_0000_0000;
const DATA_FRAMES: u64 = 1 << 18;

/// GVAs of the guest's 2 MiB regions: region `r` is `1 GiB + r * 2 MiB`, each mapped by its own
/// guest last-level table, 512 pages to 512 distinct frames of [`DATA_GPA`]'s slot.
fn region_gva(r: u64) -> u64 {
    (1 << 30) + (r << 21)
}

fn frame_gpa(r: u64, i: u64) -> u64 {
    DATA_GPA + (((r * 512 + i) % DATA_FRAMES) << 12)
}

/// The heap the MMU holds, counted over the guest's accesses only (the test host's guest
/// memory is a map of words, which the guest's own table writes grow).
#[derive(Default)]
struct MmuHeap {
    /// Live bytes the accesses so far left allocated.
    held: i64,
    /// The highest `held` reached while they ran.
    peak: i64,
}

/// Maps regions `from..to`, then touches every page of them (a read, and a write of every 8th).
fn touch(
    space: &Space,
    v: &mut vmmu::vcpu::Vcpu<vmmu::testing::TestHost>,
    from: u64,
    to: u64,
    heap: &mut MmuHeap,
) {
    for r in from..to {
        for i in 0..512 {
            space.map4k(region_gva(r) + (i << 12), frame_gpa(r, i), P | RW | US);
        }
    }
    let before = reset_peak();
    for r in from..to {
        for i in 0..512 {
            let gva = region_gva(r) + (i << 12);
            assert!(matches!(access(v, gva, i % 8 == 0), Seen::Ram(_)), "{gva:#x}");
        }
    }
    heap.peak = heap.peak.max(heap.held + PEAK.load(Ordering::Relaxed) - before);
    heap.held += LIVE.load(Ordering::Relaxed) - before;
}

/// One run at limit `n_max`: the MMU's heap peak while the guest touches `regions` regions,
/// and after it touched 3 x `regions` more; and how many pages were recycled.
fn run(n_max: usize, regions: u64) -> (i64, i64, u64) {
    let (vm, host, next) = shadow_vm_with(|cfg| cfg.shadow_max_pages = Some(n_max));
    host.map(DATA_HVA, DATA_FRAMES << 12, DATA_HVA >> 12, Level::L4K, true);
    let data = UserspaceMemoryRegion::new(1, 0, DATA_GPA, DATA_FRAMES << 12, DATA_HVA);
    vm.set_memory_region(&data).expect("the data slot");
    let space = Space::new(&host, &next);
    let mut v = vcpu_in(&vm, long4(space.cr3));
    // Warm up: the root, the vCPU's own records, the first tables of the walk.
    space.map4k(region_gva(0), frame_gpa(0, 0), P | RW | US);
    assert!(matches!(access(&mut v, region_gva(0), false), Seen::Ram(_)));
    let mut heap = MmuHeap::default();
    touch(&space, &mut v, 0, regions, &mut heap);
    let first = heap.peak;
    touch(&space, &mut v, regions, 4 * regions, &mut heap);
    let recycled = vm.shadow_mmu().expect("a shadow VM").stats.snapshot().mmu_recycled;
    (first, heap.peak, recycled)
}

#[test]
fn a_guest_cannot_grow_the_shadow_heap_past_the_page_limit() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for (n_max, regions) in [(64, 128), (256, 512)] {
        let (first, more, recycled) = run(n_max, regions);
        eprintln!(
            "n_max {n_max}: heap peak {first} B touching {regions} tables, {more} B after {} \
             more ({} B per allowed page)",
            3 * regions,
            more / n_max as i64
        );
        let bound = PER_PAGE_BOUND * n_max as i64 + FIXED_BOUND;
        assert!(
            first.max(more) <= bound,
            "n_max {n_max}: the shadow MMU's heap reached {} B, over {bound} B \
             ({PER_PAGE_BOUND} B per allowed page + {FIXED_BOUND} B)",
            first.max(more)
        );
        // Past the limit, touching three times as much again takes (almost) nothing more.
        let slack = FIXED_BOUND + first / 8;
        assert!(
            more <= first + slack,
            "n_max {n_max}: the heap grew with the guest's footprint: peak {first} B over \
             {regions} tables, {more} B over {} more",
            3 * regions
        );
        assert!(
            recycled > 0,
            "n_max {n_max}: {} guest tables and the limit was never reached",
            4 * regions
        );
    }
}

/// What the guest mapped once does not stay on the heap after it unmapped it: 256 last-level
/// tables map 512 frames, each frame from 256 GVAs (its reverse-map list 256 long); the guest
/// then clears the PTEs of all tables but the last two (emulated writes, reported with
/// `track_write`) and the host lowers the page limit to 64 (`KVM_SET_NR_MMU_PAGES`), which
/// zaps the oldest pages, the emptied tables' among them. Each frame is still mapped twice, and
/// the heap the MMU holds must fall to what its pages and leaves need now, not keep each list's
/// old length (2 KiB per frame, 1 MiB in all, over the bound below).
#[test]
fn the_shadow_heap_shrinks_with_what_the_guest_unmaps() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const TABLES: u64 = 256;
    const KEPT: u64 = 2;
    const FRAMES: u64 = 512;
    let (vm, host, next) = shadow_vm_with(|cfg| cfg.shadow_max_pages = Some(1024));
    host.map(DATA_HVA, DATA_FRAMES << 12, DATA_HVA >> 12, Level::L4K, true);
    let data = UserspaceMemoryRegion::new(1, 0, DATA_GPA, DATA_FRAMES << 12, DATA_HVA);
    vm.set_memory_region(&data).expect("the data slot");
    let space = Space::new(&host, &next);
    let mut v = vcpu_in(&vm, long4(space.cr3));
    let gpa = |i: u64| DATA_GPA + ((i % FRAMES) << 12);
    space.map4k(region_gva(0), gpa(0), P | RW | US);
    assert!(matches!(access(&mut v, region_gva(0), false), Seen::Ram(_)));
    let ptes: Vec<Vec<u64>> = (0..TABLES)
        .map(|r| {
            (0..512).map(|i| space.map4k(region_gva(r) + (i << 12), gpa(i), P | RW | US)).collect()
        })
        .collect();
    let before = reset_peak();
    let touch = |v: &mut vmmu::vcpu::Vcpu<vmmu::testing::TestHost>,
                 tables: core::ops::Range<u64>| {
        for r in tables {
            for i in 0..512 {
                let gva = region_gva(r) + (i << 12);
                assert!(matches!(access(v, gva, false), Seen::Ram(_)), "{gva:#x}");
            }
        }
    };
    touch(&mut v, 0..TABLES);
    let full = LIVE.load(Ordering::Relaxed) - before;
    for table in &ptes[..(TABLES - KEPT) as usize] {
        for &pte in table {
            host.write_u64(RAM_HVA + pte, 0);
            v.track_write(Gpa(pte), 8).expect("an emulated guest write");
        }
    }
    vm.set_nr_mmu_pages(64).expect("a valid limit");
    // Touch what is left, so the kept tables' shadow pages and leaves are live.
    touch(&mut v, TABLES - KEPT..TABLES);
    let left = LIVE.load(Ordering::Relaxed) - before;
    let pages = vm.shadow_mmu().expect("a shadow VM").pages_in_use() as i64;
    let leaves = (KEPT * 512) as i64;
    let bound = EMPTY_PAGE_BOUND * pages + LEAF_BOUND * leaves + FIXED_BOUND;
    eprintln!(
        "heap {full} B with {TABLES} tables mapped, {left} B with {KEPT} left ({pages} pages, \
         {leaves} leaves; bound {bound} B)"
    );
    assert!(
        left <= bound,
        "the guest unmapped all but {KEPT} of {TABLES} tables and the shadow MMU still holds \
         {left} B ({full} B before), over {bound} B for its {pages} pages and {leaves} leaves"
    );
}
