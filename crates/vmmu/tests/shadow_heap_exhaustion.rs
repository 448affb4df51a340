//! A shadow-paging #PF when the global allocator has nothing left: the fault reports
//! [`FaultError::OutOfHeap`] (KVM's `-ENOMEM` from `mmu_topup_memory_caches`), which the
//! hypervisor can turn into an exit to its VMM, instead of ending in the allocator's error
//! handler (an abort; on a bare-metal target a panic). What a failed fault built before it ran
//! out stays consistent: the fault succeeds once memory is back, and nothing stale is reachable.
//!
//! The VMM's side too: a host invalidation, a memslot delete or move, and dirty logging turned
//! on zap or protect what maps the range without needing the heap (TDP VMs:
//! `tdp_update_heap_exhaustion.rs`).
//!
//! The global allocator here fails every allocation the faulting thread makes while a
//! thread-local switch is on (or every one after the first few granted); without fallible
//! allocation the test binary aborts.
#![cfg(not(loom))]

mod common;

use common::shadow::*;
use vmmu::fault::{FaultError, PfErr};
use vmmu::tdp::HwWalk;
use vmmu::{Access, Gva};

#[path = "common/failing_heap.rs"]
mod failing_heap;

use failing_heap::{heap_for, without_heap, Failing};

#[global_allocator]
static HEAP: Failing = Failing;

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

/// The test host records each page a write translation reached (in a set it allocates for):
/// every page of guest RAM is written once with heap, so that faults without heap do not end
/// in the test host's own allocation.
fn written_once(host: &vmmu::testing::TestHost) {
    use vmmu::host::{HostAccess, HostMemory};
    for off in (0..RAM_SIZE).step_by(4096) {
        host.translate(vmmu::Hva(RAM_HVA + off), HostAccess::Write).unwrap();
    }
}

/// The error code of the hardware walk of a user access to `gva` (a write if `write`).
fn fault_err(v: &mut vmmu::vcpu::Vcpu<vmmu::testing::TestHost>, gva: u64, write: bool) -> PfErr {
    let walk = hw(v, gva, write);
    let w = if write { PfErr::WRITE } else { 0 };
    match walk {
        HwWalk::Violation { present, .. } => {
            PfErr(PfErr::USER | w | if present { PfErr::PRESENT } else { 0 })
        }
        HwWalk::Misconfig { .. } => PfErr(PfErr::USER | w | PfErr::RSVD | PfErr::PRESENT),
        other => panic!("{gva:#x}: {other:?}"),
    }
}

/// The fault of an access to `gva` (a write if `write`), taken without heap: it completes or
/// reports `OutOfHeap` (returns `true`) with nothing half made, never anything else.
fn fault_without_heap(
    vm: &vmmu::vm::Vm<vmmu::testing::TestHost>,
    v: &mut vmmu::vcpu::Vcpu<vmmu::testing::TestHost>,
    gva: u64,
    write: bool,
) -> bool {
    let err = fault_err(v, gva, write);
    let (out, failed) = without_heap(|| v.handle_page_fault(Gva(gva), err));
    let reported = match out {
        Err(FaultError::OutOfHeap(_)) => {
            assert!(failed > 0, "{gva:#x}: out of heap with no allocation refused");
            true
        }
        Ok(_) => false,
        other => panic!("{gva:#x}: {other:?}"),
    };
    assert_eq!(vm.stale_shadow_entries_for_tests(), Some(0), "{gva:#x}");
    reported
}

/// Every fault of the accesses to `gvas` is taken first without heap: it either completes or
/// reports `OutOfHeap` with nothing half made, and then the access completes with heap back.
/// Returns how many faults reported `OutOfHeap`.
fn fault_without_heap_then_with(
    vm: &vmmu::vm::Vm<vmmu::testing::TestHost>,
    v: &mut vmmu::vcpu::Vcpu<vmmu::testing::TestHost>,
    gvas: impl IntoIterator<Item = u64>,
    write: bool,
) -> usize {
    let mut reported = 0;
    for gva in gvas {
        if matches!(hw(v, gva, write), HwWalk::Translated { .. }) {
            continue;
        }
        reported += usize::from(fault_without_heap(vm, v, gva, write));
        let seen = access(v, gva, write);
        assert!(matches!(seen, Seen::Ram(_) | Seen::Mmio(..)), "{gva:#x}: {seen:?}");
    }
    reported
}

/// One guest frame mapped by more than `RMAP_RECYCLE_THRESHOLD` (1000) leaves: three guest
/// last-level tables whose 512 entries all name it (accessed and dirty, so faults prefetch
/// their neighbours). The leaf that takes the gfn over the threshold drops every leaf of the
/// gfn (KVM's rmap recycling) inside the fault: that must not need the heap either.
#[test]
fn a_gfn_mapped_past_the_rmap_recycle_threshold_without_heap() {
    const A: u64 = 1 << 5;
    const D: u64 = 1 << 6;
    let (vm, host, next) = shadow_vm_with(|_| {});
    let s = Space::new(&host, &next);
    let target = 0x100_0000;
    let base = 0x4000_0000u64;
    for t in 0..3u64 {
        for i in 0..512u64 {
            s.map4k(base + (t << 21) + (i << 12), target, P | RW | US | A | D);
        }
    }
    let mut v = vcpu_in(&vm, long4(s.cr3));
    let gvas = (0..3u64 * 512).map(|i| base + (i << 12));
    fault_without_heap_then_with(&vm, &mut v, gvas, false);
    assert_eq!(vm.stale_shadow_entries_for_tests(), Some(0));
}

/// A PAE guest (a special root: its level-2 pages hang from the vCPU's `pae_root` frame), a
/// guest 2 MiB page (direct pages), and several prefetched neighbours.
#[test]
fn pae_and_2m_guest_pages_and_prefetch_without_heap() {
    use vmmu::guest::{GuestCpu, PagingMode};
    const A: u64 = 1 << 5;
    const D: u64 = 1 << 6;
    let (vm, host, next) = shadow_vm_with(|_| {});
    written_once(&host);
    // PAE: PDPT -> PD -> PT, gva 0x40_0000.. mapped 4 KiB, 0x80_0000 by a 2 MiB PDE.
    let (pdpt, pd, pt) = (alloc_table(&next), alloc_table(&next), alloc_table(&next));
    host.write_u64(RAM_HVA + pdpt, pd | P);
    host.write_u64(RAM_HVA + pd + 8 * 2, pt | P | RW | US);
    for i in 0..16u64 {
        host.write_u64(RAM_HVA + pt + 8 * i, (0x100_0000 + (i << 12)) | P | RW | US | A | D);
    }
    host.write_u64(RAM_HVA + pd + 8 * 4, 0x120_0000 | P | RW | US | PS | A | D);
    let mut v = vm.create_vcpu().unwrap();
    v.set_guest_cpu(GuestCpu { mode: PagingMode::Pae { pdptrs: [0; 4] }, ..long4(0) }).unwrap();
    v.load_cr3(pdpt).unwrap();
    let gvas: Vec<u64> = (0..16u64)
        .map(|i| 0x40_0000 + (i << 12))
        .chain((0..16u64).map(|i| 0x80_0000 + (i << 12)))
        .collect();
    fault_without_heap_then_with(&vm, &mut v, gvas.iter().copied(), false);
    fault_without_heap_then_with(&vm, &mut v, gvas.iter().copied(), true);
    // 4-level, 2 MiB guest pages.
    let s = Space::new(&host, &next);
    s.map2m(0x4000_0000, 0x140_0000, P | RW | US | A | D);
    s.map2m(0x4020_0000, 0x160_0000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    let gvas: Vec<u64> = (0..1024u64).step_by(3).map(|i| 0x4000_0000 + (i << 12)).collect();
    fault_without_heap_then_with(&vm, &mut v, gvas.iter().copied(), false);
    fault_without_heap_then_with(&vm, &mut v, gvas.iter().copied(), true);
    assert_eq!(vm.stale_shadow_entries_for_tests(), Some(0));
}

/// Write faults to guest tables the MMU shadows (write-protected leaves, `WriteProtected`
/// emulation), and the emulated writes reported with heap; then dirty logging on.
#[test]
fn writes_to_shadowed_tables_and_dirty_logging_without_heap() {
    use vmmu::memslot::{UserspaceMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
    let (vm, host, next) = shadow_vm_with(|_| {});
    written_once(&host);
    let s = Space::new(&host, &next);
    // The guest maps its own tables: gva 0x5000_0000 + gpa.
    for i in 0..64u64 {
        let gpa = TABLES_GPA + (i << 12);
        s.map4k(0x5000_0000 + gpa, gpa, P | RW | US);
    }
    for i in 0..32u64 {
        s.map4k(0x4000_0000 + (i << 12), 0x100_0000 + (i << 12), P | RW | US);
    }
    let mut v = vcpu_in(&vm, long4(s.cr3));
    let data: Vec<u64> = (0..32u64).map(|i| 0x4000_0000 + (i << 12)).collect();
    fault_without_heap_then_with(&vm, &mut v, data.iter().copied(), false);
    let tables: Vec<u64> = (0..next.get().saturating_sub(TABLES_GPA) >> 12)
        .map(|i| 0x5000_0000 + TABLES_GPA + (i << 12))
        .collect();
    fault_without_heap_then_with(&vm, &mut v, tables.iter().copied(), false);
    fault_without_heap_then_with(&vm, &mut v, tables.iter().copied(), true);
    // Dirty logging on for the RAM slot: write faults on write-protected leaves.
    vm.set_memory_region(&UserspaceMemoryRegion::new(
        0,
        KVM_MEM_LOG_DIRTY_PAGES,
        0,
        RAM_SIZE,
        RAM_HVA,
    ))
    .unwrap();
    fault_without_heap_then_with(&vm, &mut v, data.iter().copied(), false);
    fault_without_heap_then_with(&vm, &mut v, data.iter().copied(), true);
    let _ = host;
    assert_eq!(vm.stale_shadow_entries_for_tests(), Some(0));
}

/// The shadow pages in use, from the VM's shadow counters.
fn pages_in_use(vm: &vmmu::vm::Vm<vmmu::testing::TestHost>) -> usize {
    vm.shadow_mmu().unwrap().pages_in_use()
}

/// The promises of room in the free queue match the frames that will use them: one per live
/// shadow page and per vCPU's PAE root frame (`pae_roots`), so every zap allocates nothing.
fn assert_promises(vm: &vmmu::vm::Vm<vmmu::testing::TestHost>, pae_roots: usize) {
    assert_eq!(vm.core().free_queue_promises(), pages_in_use(vm) + pae_roots);
}

/// A fault at the page limit recycles the oldest pages (KVM `make_mmu_pages_available`), which
/// zaps and commits them and queues their frames, before it makes the pages it needs: all of
/// that without heap. The fault then reports `OutOfHeap` (its new pages need bookkeeping), or
/// completes where it needs no new page; the recycled pages are gone either way.
#[test]
fn recycling_at_the_page_limit_without_heap() {
    let (vm, host, next) = shadow_vm_with(|_| {});
    written_once(&host);
    vm.set_nr_mmu_pages(64).unwrap();
    let s = Space::new(&host, &next);
    // One guest page per 2 MiB region: each region needs its own last-level shadow page, every
    // 1 GiB a directory too.
    let gvas: Vec<u64> = (0..200u64).map(|i| 0x40_0000_0000 + (i << 21)).collect();
    for (i, &gva) in gvas.iter().enumerate() {
        s.map4k(gva, 0x100_0000 + ((i as u64) << 12), P | RW | US);
    }
    let mut v = vcpu_in(&vm, long4(s.cr3));
    let recycled = || vm.shadow_mmu().unwrap().stats.mmu_recycled.get();
    let mut recycled_without_heap = 0;
    let mut reported = 0;
    for &gva in &gvas {
        let before = recycled();
        reported += usize::from(fault_without_heap(&vm, &mut v, gva, false));
        recycled_without_heap += recycled() - before;
        assert!(pages_in_use(&vm) <= 64, "{gva:#x}: {} pages", pages_in_use(&vm));
        assert!(matches!(access(&mut v, gva, false), Seen::Ram(_)), "{gva:#x}");
    }
    assert!(recycled_without_heap > 0, "no fault without heap had to recycle");
    assert!(reported > 0, "no fault without heap needed a new page");
    assert_promises(&vm, 0);
    eprintln!("{recycled_without_heap} pages recycled by faults without heap, {reported} reported");
}

/// A shadow VM with `n` guest address spaces, each mapping gva 0x4000_0000 to a page of its
/// own (space i: gpa 0x100_0000 + i pages), and a vCPU that has loaded each space's CR3 in
/// order and read the page, so that it holds a root for each of the last four (the current
/// one and KVM's three previous ones).
fn vcpu_with_roots(
    n: usize,
) -> (vmmu::vm::Vm<vmmu::testing::TestHost>, vmmu::vcpu::Vcpu<vmmu::testing::TestHost>, Vec<Space>)
{
    let (vm, host, next) = shadow_vm_with(|_| {});
    written_once(&host);
    let spaces: Vec<Space> = (0..n).map(|_| Space::new(&host, &next)).collect();
    for (i, s) in spaces.iter().enumerate() {
        s.map4k(0x4000_0000, 0x100_0000 + ((i as u64) << 12), P | RW | US);
    }
    let mut v = vcpu_in(&vm, long4(spaces[0].cr3));
    for s in &spaces {
        v.load_cr3(s.cr3).unwrap();
        assert!(matches!(access(&mut v, 0x4000_0000, false), Seen::Ram(_)));
    }
    (vm, v, spaces)
}

/// Roots after a zap-all: the vCPU drops its obsolete roots (current and previous, which frees
/// the pages the zap left pinned) and loads a new one. Without heap the drop completes and the
/// load reports `MmuError::OutOfHeap`; with heap back the vCPU runs on.
#[test]
fn root_loads_after_a_zap_all_without_heap() {
    use vmmu::mmu_core::MmuError;
    // Four roots: the current one and three previous ones (KVM's cache of previous roots).
    let (vm, mut v, spaces) = vcpu_with_roots(4);
    vm.zap_all_fast();
    let zapped = vm.shadow_mmu().unwrap().stats.mmu_shadow_zapped.get();
    let (out, failed) = without_heap(|| v.service_requests());
    assert_eq!(out.map(|_| ()), Err(MmuError::OutOfHeap), "after {failed} failed allocations");
    assert!(failed > 0);
    assert!(
        vm.shadow_mmu().unwrap().stats.mmu_shadow_zapped.get() > zapped,
        "the pinned pages were not released"
    );
    assert!(MmuError::OutOfHeap.to_string().contains("heap"));
    assert_eq!(vm.stale_shadow_entries_for_tests(), Some(0));
    // Memory back: the vCPU loads its root and reaches its page.
    // The current space is the last one loaded.
    let last = ram_pfn(0x100_0000 + ((spaces.len() as u64 - 1) << 12));
    assert!(matches!(access(&mut v, 0x4000_0000, false), Seen::Ram(p) if p == last));
    assert_promises(&vm, 0);
}

/// CR3 loads that evict obsolete previous roots, a paging-mode change (which drops every root)
/// and the drop of a PAE vCPU (whose PAE root frame is queued for freeing) need no heap.
#[test]
fn cr3_switches_mode_changes_and_vcpu_drops_without_heap() {
    use vmmu::guest::{GuestCpu, PagingMode};
    let (vm, mut v, spaces) = vcpu_with_roots(5);
    // The previous roots are obsolete now: each load misses and evicts one, whose pages the
    // zap left pinned and the eviction frees.
    vm.zap_all_fast();
    for s in &spaces {
        let (out, failed) = without_heap(|| v.load_cr3(s.cr3));
        assert!(out.is_ok(), "{out:?} after {failed} failed allocations");
        assert_eq!(vm.stale_shadow_entries_for_tests(), Some(0));
    }
    // A paging-mode change unloads every root.
    let (out, failed) =
        without_heap(|| v.set_guest_cpu(GuestCpu { cr0_wp: false, ..long4(spaces[0].cr3) }));
    assert!(out.is_ok(), "{out:?} after {failed} failed allocations");
    assert_eq!(vm.stale_shadow_entries_for_tests(), Some(0));
    assert!(matches!(access(&mut v, 0x4000_0000, false), Seen::Ram(p) if p == ram_pfn(0x100_0000)));
    // A PAE vCPU (its special root lives in its PAE root frame) dropped without heap.
    // A PDPT page of zeros: every PDPTE not present.
    let pdpt = 0x1f0_0000;
    let mut p = vm.create_vcpu().unwrap();
    p.set_guest_cpu(GuestCpu { mode: PagingMode::Pae { pdptrs: [0; 4] }, ..long4(0) }).unwrap();
    p.load_cr3(pdpt).unwrap();
    p.service_requests().unwrap();
    assert_promises(&vm, 1);
    let ((), failed) = without_heap(|| drop(p));
    assert_eq!(failed, 0, "the drop of a PAE vCPU tried to allocate");
    assert_promises(&vm, 0);
    let ((), failed) = without_heap(|| drop(v));
    assert_eq!(failed, 0, "the drop of a vCPU tried to allocate");
    vm.zap_all_fast();
    assert_eq!(pages_in_use(&vm), 0);
    assert_promises(&vm, 0);
}

/// Emulated guest writes to the tables the MMU shadows (`Vcpu::track_write`): a write that
/// drops one SPTE, a misaligned write (zaps the page) and flooding (three writes to an upper-
/// level table zap it) need no heap, nor does unprotecting a table (`Vcpu::unprotect_gfn`).
/// The guest's new entries are used afterwards.
#[test]
fn emulated_writes_to_shadowed_tables_without_heap() {
    let (vm, host, next) = shadow_vm_with(|_| {});
    written_once(&host);
    let s = Space::new(&host, &next);
    let gvas: Vec<u64> = (0..8u64).map(|i| 0x4000_0000 + (i << 12)).collect();
    for (i, &gva) in gvas.iter().enumerate() {
        s.map4k(gva, 0x100_0000 + ((i as u64) << 12), P | RW | US);
    }
    let mut v = vcpu_in(&vm, long4(s.cr3));
    for &gva in &gvas {
        assert!(matches!(access(&mut v, gva, false), Seen::Ram(_)));
    }
    // `val` lands at the aligned entry `gpa & !7`; the write reported is `bytes` at `gpa`.
    let write = |v: &mut vmmu::vcpu::Vcpu<vmmu::testing::TestHost>, gpa: u64, val: u64, bytes| {
        host.write_u64(RAM_HVA + (gpa & !7), val);
        let (out, failed) = without_heap(|| v.track_write(vmmu::Gpa(gpa), bytes));
        assert!(out.is_ok(), "{gpa:#x}: {out:?} after {failed} failed allocations");
        assert_eq!(vm.stale_shadow_entries_for_tests(), Some(0), "{gpa:#x}");
    };
    // An aligned 8-byte write: the leaf for gvas[0] goes; it now maps another frame.
    let pte0 = s.entry_gpa(gvas[0], 1);
    write(&mut v, pte0, 0x110_0000 | P | RW | US, 8);
    assert!(matches!(access(&mut v, gvas[0], false), Seen::Ram(p) if p == ram_pfn(0x110_0000)));
    // A misaligned write (crosses two entries): the last-level page is zapped.
    let pte1 = s.entry_gpa(gvas[1], 1);
    let zapped = vm.shadow_mmu().unwrap().stats.mmu_flooded.get();
    write(&mut v, pte1 + 4, 0x111_0000 | P | RW | US, 8);
    assert!(vm.shadow_mmu().unwrap().stats.mmu_flooded.get() > zapped, "no page was zapped");
    assert!(matches!(access(&mut v, gvas[1], false), Seen::Ram(p) if p == ram_pfn(0x111_0000)));
    // Flooding: three writes to the page directory without it being used in between.
    let pde = s.entry_gpa(0x4020_0000, 2);
    let zapped = vm.shadow_mmu().unwrap().stats.mmu_flooded.get();
    for _ in 0..3 {
        write(&mut v, pde, 0, 8);
    }
    assert!(vm.shadow_mmu().unwrap().stats.mmu_flooded.get() > zapped, "no page was flooded");
    for &gva in &gvas[2..] {
        assert!(matches!(access(&mut v, gva, false), Seen::Ram(_)), "{gva:#x}");
    }
    // Unprotecting the last-level table instead of emulating a write to it (`unprotect_gfn`)
    // zaps its shadow pages without heap; the guest's untracked edit is then seen.
    let pte2 = s.entry_gpa(gvas[2], 1);
    let (out, failed) = without_heap(|| v.unprotect_gfn(vmmu::Gpa(pte2).gfn()));
    assert_eq!(out, Ok(true), "after {failed} failed allocations");
    host.write_u64(RAM_HVA + pte2, 0x112_0000 | P | RW | US);
    assert!(matches!(access(&mut v, gvas[2], false), Seen::Ram(p) if p == ram_pfn(0x112_0000)));
    assert_promises(&vm, 0);
}

/// A second slot of the tests below: 2 MiB of host memory at this address, at guest-physical
/// `SLOT1_GPA`.
const SLOT1_HVA: u64 = 0x8000_0000;
const SLOT1_GPA: u64 = 0x2000_0000;
const SLOT1_SIZE: u64 = 2 << 20;

/// A shadow VM with a second slot, and a vCPU whose guest maps 32 pages of each slot at
/// `0x4000_0000` (RAM) and `0x6000_0000` (the second slot), all accessed once.
fn two_slots_mapped(
    slot_zap_all: bool,
) -> (
    vmmu::vm::Vm<vmmu::testing::TestHost>,
    std::sync::Arc<vmmu::testing::TestHost>,
    vmmu::vcpu::Vcpu<vmmu::testing::TestHost>,
) {
    use vmmu::memslot::UserspaceMemoryRegion;
    let (vm, host, next) = shadow_vm_with(|c| c.slot_zap_all = slot_zap_all);
    host.map(SLOT1_HVA, SLOT1_SIZE, SLOT1_HVA >> 12, vmmu::Level::L4K, true);
    vm.set_memory_region(&UserspaceMemoryRegion::new(1, 0, SLOT1_GPA, SLOT1_SIZE, SLOT1_HVA))
        .unwrap();
    written_once(&host);
    let s = Space::new(&host, &next);
    for i in 0..32u64 {
        s.map4k(0x4000_0000 + (i << 12), 0x100_0000 + (i << 12), P | RW | US);
        s.map4k(0x6000_0000 + (i << 12), SLOT1_GPA + (i << 12), P | RW | US);
    }
    let mut v = vcpu_in(&vm, long4(s.cr3));
    for gva in data_gvas() {
        assert!(matches!(access(&mut v, gva, true), Seen::Ram(_)), "{gva:#x}");
    }
    (vm, host, v)
}

/// The guest pages [`two_slots_mapped`] maps, in both slots.
fn data_gvas() -> impl Iterator<Item = u64> {
    (0..32u64).flat_map(|i| [0x4000_0000 + (i << 12), 0x6000_0000 + (i << 12)])
}

/// A host invalidation (KVM's MMU notifier) is how a host reclaims memory, so it must not need
/// the heap: a host range across both slots begins and ends without heap, drops every leaf that
/// maps it (the slot of 16384 pages is longer than the reverse map, whose list of the range's
/// mapped gfns the heap then cannot hold: the range is walked gfn by gfn) and makes faults there
/// retry until it ends. Before, the begin listed the slots' ranges and the mapped gfns on the
/// heap: out of heap, the process aborted.
#[test]
fn host_invalidations_without_heap() {
    let (vm, _host, mut v) = two_slots_mapped(false);
    let ((inv, end), failed) = without_heap(|| {
        let inv = vm.invalidate_hva_range_begin(vmmu::Hva(RAM_HVA), vmmu::Hva(SLOT1_HVA + 4096));
        let end = vm.invalidate_hva_range_begin(vmmu::Hva(SLOT1_HVA), vmmu::Hva(SLOT1_HVA + 8192));
        (inv, end)
    });
    assert!(failed > 0, "no allocation was refused: the test proves nothing");
    for gva in data_gvas() {
        let walk = hw(&mut v, gva, false);
        // The RAM slot is in the ranges whole, the second slot's first two pages only.
        if gva >= 0x6000_2000 {
            assert!(matches!(walk, HwWalk::Translated { .. }), "{gva:#x}: {walk:?}");
            continue;
        }
        assert!(matches!(walk, HwWalk::Violation { present: false, .. }), "{gva:#x}: {walk:?}");
        let err = read_fault(&mut v, gva);
        let (out, _) = without_heap(|| v.handle_page_fault(Gva(gva), err));
        assert!(matches!(out, Ok(vmmu::fault::FaultOutcome::Retry(_))), "{gva:#x}: {out:?}");
    }
    assert_eq!(vm.stale_shadow_entries_for_tests(), Some(0));
    let ((), failed) = without_heap(|| {
        inv.end();
        drop(end);
    });
    assert_eq!(failed, 0);
    for (i, gva) in data_gvas().enumerate() {
        assert!(matches!(access(&mut v, gva, i % 2 == 0), Seen::Ram(_)), "{gva:#x}");
    }
}

/// A memslot delete or move runs out of heap at every allocation in turn: it either fails with
/// `ENOMEM` and leaves the slot as it was (the guest still reaches its pages), or completes,
/// with every leaf of the old place dropped (the guest reaches nothing there); never an abort.
/// Its shadow zap walks the reverse map, whose list of the slot's mapped gfns needs the heap;
/// with `KVM_X86_QUIRK_SLOT_ZAP_ALL` it zaps every shadow page instead.
#[test]
fn memslot_deletes_and_moves_out_of_heap_at_every_allocation() {
    for slot_zap_all in [false, true] {
        deletes_and_moves_out_of_heap(slot_zap_all);
    }
}

/// [`memslot_deletes_and_moves_out_of_heap_at_every_allocation`] with
/// `KVM_X86_QUIRK_SLOT_ZAP_ALL` on (a delete or move zaps every shadow page) or off.
fn deletes_and_moves_out_of_heap(slot_zap_all: bool) {
    use vmmu::memslot::{MemslotError, UserspaceMemoryRegion};
    let (vm, _host, mut v) = two_slots_mapped(slot_zap_all);
    let slot1 = |gpa| UserspaceMemoryRegion::new(1, 0, gpa, SLOT1_SIZE, SLOT1_HVA);
    let gvas = || (0..32u64).map(|i| 0x6000_0000 + (i << 12));
    let delete = if slot_zap_all { "delete (zap all)" } else { "delete" };
    for (what, region) in [
        (delete, UserspaceMemoryRegion::new(1, 0, SLOT1_GPA, 0, SLOT1_HVA)),
        ("move", slot1(0x3000_0000)),
    ] {
        let mut granted = 0;
        loop {
            let (out, failed) = heap_for(granted, || vm.set_memory_region(&region));
            match out {
                Err(MemslotError::OutOfMemory { .. }) => {
                    assert!(failed > 0, "{what} {granted}: ENOMEM with nothing refused");
                    for gva in gvas() {
                        let seen = access(&mut v, gva, false);
                        assert_eq!(seen, Seen::Ram(ram_pfn_at(SLOT1_HVA, gva)), "{what} {granted}");
                    }
                }
                Ok(_) => {
                    for gva in gvas() {
                        let seen = access(&mut v, gva, false);
                        assert!(matches!(seen, Seen::Mmio(..)), "{what} {granted}: {seen:?}");
                    }
                    assert_eq!(vm.stale_shadow_entries_for_tests(), Some(0), "{what} {granted}");
                    vm.set_memory_region(&slot1(SLOT1_GPA)).unwrap();
                    for gva in gvas() {
                        assert!(matches!(access(&mut v, gva, false), Seen::Ram(_)), "{gva:#x}");
                    }
                    if failed == 0 {
                        break;
                    }
                }
                Err(e) => panic!("{what} {granted}: {e}"),
            }
            granted += 1;
            assert!(granted < 10_000, "{what}: no end to its allocations");
        }
        eprintln!("{what}: {granted} allocations");
    }
}

/// The host frame of the page `gva` maps in the second slot (`0x6000_0000 + i` -> page `i`).
fn ram_pfn_at(hva: u64, gva: u64) -> vmmu::Pfn {
    vmmu::Pfn((hva + (gva - 0x6000_0000)) >> 12)
}

/// Dirty logging turned on for a slot out of heap at every allocation in turn: it fails with
/// `ENOMEM` and the guest still writes through its writable leaves, or it completes and every
/// leaf of the slot is write-protected (a write faults, so it is logged), never an abort.
/// Turning logging on write-protects through the reverse map, whose list of the slot's mapped
/// gfns needs the heap.
#[test]
fn dirty_logging_on_out_of_heap_at_every_allocation() {
    use vmmu::memslot::{MemslotError, UserspaceMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
    let (vm, _host, mut v) = two_slots_mapped(false);
    let ram = |flags| UserspaceMemoryRegion::new(0, flags, 0, RAM_SIZE, RAM_HVA);
    let gvas = || (0..32u64).map(|i| 0x4000_0000 + (i << 12));
    let mut granted = 0;
    loop {
        let (out, failed) =
            heap_for(granted, || vm.set_memory_region(&ram(KVM_MEM_LOG_DIRTY_PAGES)));
        let logging = match out {
            Err(MemslotError::OutOfMemory { .. }) => false,
            Ok(_) => true,
            Err(e) => panic!("{granted}: {e}"),
        };
        for gva in gvas() {
            let walk = hw(&mut v, gva, true);
            let protected = matches!(walk, HwWalk::Violation { present: true, .. });
            assert_eq!(protected, logging, "{granted} {gva:#x}: {walk:?}");
        }
        assert_eq!(vm.stale_shadow_entries_for_tests(), Some(0), "{granted}");
        if logging {
            if failed == 0 {
                break;
            }
            vm.set_memory_region(&ram(0)).unwrap();
            for gva in gvas() {
                assert!(matches!(access(&mut v, gva, true), Seen::Ram(_)), "{gva:#x}");
            }
        }
        granted += 1;
        assert!(granted < 10_000, "no end to its allocations");
    }
}
