//! A host whose table pages are really freed: `free_table` drops the page's heap allocation, and
//! `type_stable_tables` keeps its default (`false`). Every other host of the tests (the test
//! host, the embedder audit's, the simulator's) keeps freed pages readable for its own life, so
//! a walk that read a table page after its grace period would go unnoticed there. Here it reads
//! freed heap memory: under AddressSanitizer (`scripts/sanitizers`) that is a
//! heap-use-after-free report; without it, the test checks that every page comes back.
//!
//! vCPU threads make RAM and MMIO accesses (hardware walks of the tables, EPT violations,
//! misconfigs through the lockless fast path; under shadow paging, guest page faults and RSVD
//! faults through the lockless shadow walk) while another thread deletes and re-creates a slot,
//! invalidates host ranges, obsoletes the roots and shrinks the shadow pages: the zaps that
//! unlink and free tables.
//!
//! Which reader the tests aim at. The hardware walk (`GuestMode::walk`, `walk_gva`) runs in
//! guest mode, and every zap that frees a table flushes remote TLBs first, which waits for each
//! vCPU in guest mode to leave it: that flush alone keeps the hardware walk off freed pages. The
//! reader only the grace period protects is the fast MMIO path's lockless walk (TDP: an EPT
//! misconfig; shadow paging: an RSVD #PF, KVM `walk_shadow_page_lockless_begin/end`), which runs
//! after the exit inside a table read section: `walk_lockless_to_mmio` / `walk_lockless` from
//! the root, or a hit in the vCPU's leaf-table cache (`cached_mmio_spte`). Both tests hold that
//! walk open: around each such exit the vCPU thread holds its first four table lookups
//! (`HELD_LOOKUPS`: a lookup of a live page waits up to `HOLD` for that page to be freed before
//! it returns its address), as a walker preempted between finding a table and reading it.
//! Without the hold that window is a few instructions, and the churn's frees seldom land in it.
//!
//! Power, checked by hand: with the grace period in `MmuCore::reclaim` removed (its
//! `table_srcu.synchronize_nudging` call; both MMUs queue freed pages there through
//! `defer_free`), ASan reports a heap-use-after-free in every run, each within 0.5 s: TDP 10 of
//! 10, shadow 10 of 10 (read in `walk_lockless_to_mmio` or `cached_mmio_spte` under
//! `shadow_mmio_fast`, of a page `ShadowMmu::zap_all_fast` freed; with the churn reduced to the
//! shrinker, 5 of 5, freed by `ShadowMmu::shrink`). Before the hold: TDP 7 of 10, shadow 1 of
//! 10. With the grace period both are clean under ASan, and take 2 s each.
#![cfg(not(loom))]

use std::cell::Cell;
use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64 as StdAtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vmmu::fault::{FaultOutcome, PfErr};
use vmmu::guest::GuestCpu;
use vmmu::host::{
    FrameAllocator, GuestMemory, HostAccess, HostFault, HostMemory, HostPage, Sched, TableEntries,
};
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::spte::FormatKind;
use vmmu::sync::{Arc, AtomicU64};
use vmmu::tdp::HwWalk;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, FaultAccess, Gpa, Gva, Hva, Level, Pfn};

const RAM_BASE_PFN: u64 = 0x1000;
const POOL_BASE_PFN: u64 = 0x8_0000;
const RAM_HVA: u64 = 0x7f00_0000_0000;
const RAM_BYTES: u64 = 4 << 20;
/// The most table pages alive at once.
const MAX_TABLES: usize = 512;
/// How long a held lockless reader waits for the page it found to be freed ([`HELD_LOOKUPS`]).
const HOLD: Duration = Duration::from_micros(200);

thread_local! {
    /// Table lookups this thread still holds: while non-zero, each lookup of a live page waits
    /// (at most [`HOLD`]) for that page to be freed before it returns the page's address, as a
    /// lockless reader preempted between finding a table and reading it. A free that did not
    /// wait for the reader's grace period lands in that window, and the reader then reads freed
    /// memory. With the grace period, nothing can be freed while the reader is in its section,
    /// so each held lookup waits the whole [`HOLD`].
    static HELD_LOOKUPS: Cell<u32> = const { Cell::new(0) };
}

/// Runs `f` with up to `n` of this thread's table lookups held ([`HELD_LOOKUPS`]).
fn holding_lookups<T>(n: u32, f: impl FnOnce() -> T) -> T {
    HELD_LOOKUPS.set(n);
    let r = f();
    HELD_LOOKUPS.set(0);
    r
}

struct FreeingHost {
    /// Live table pages by frame number, each its own heap allocation (a page's address does
    /// not change while it is in the map, whatever the map does).
    tables: Mutex<HashMap<u64, Box<TableEntries>>>,
    next: StdAtomicU64,
    freed: StdAtomicU64,
    /// Guest RAM as 8-byte words (the shadow MMU reads the guest's tables from it).
    ram: Box<[StdAtomicU64]>,
}

impl FreeingHost {
    fn new() -> Arc<Self> {
        Arc::new(FreeingHost {
            tables: Mutex::new(HashMap::new()),
            next: StdAtomicU64::new(0),
            freed: StdAtomicU64::new(0),
            ram: (0..RAM_BYTES / 8).map(|_| StdAtomicU64::new(0)).collect(),
        })
    }

    fn word(&self, hva: Hva) -> Result<&StdAtomicU64, HostFault> {
        let off = hva.raw().checked_sub(RAM_HVA).ok_or(HostFault::Unmapped(hva))?;
        self.ram.get((off / 8) as usize).ok_or(HostFault::Unmapped(hva))
    }

    /// Writes guest-physical `gpa` (slot 0 maps gpa 0 at `RAM_HVA`).
    fn write_gpa(&self, gpa: u64, val: u64) {
        self.ram[(gpa / 8) as usize].store(val, Ordering::SeqCst);
    }

    fn live(&self) -> usize {
        self.tables.lock().unwrap().len()
    }

    /// Waits until table page `pfn` is freed, or [`HOLD`] passes.
    fn hold_until_freed(&self, pfn: Pfn) {
        let until = Instant::now() + HOLD;
        while Instant::now() < until && self.tables.lock().unwrap().contains_key(&pfn.raw()) {
            std::thread::yield_now();
        }
    }
}

// SAFETY: a page is a boxed `TableEntries`, initialised before `alloc_table` returns, handed out
// under a frame number never used before, and freed only by `free_table`; `table` returns a
// pointer to a live page only, valid until that page's `free_table` (the box does not move).
// Table frames are above the RAM frames `translate` names, so the guest never maps one.
// `type_stable_tables` keeps its default, `false`: nothing is promised after `free_table`.
unsafe impl FrameAllocator for FreeingHost {
    fn alloc_table(&self, init: u64) -> Option<Pfn> {
        let mut tables = self.tables.lock().unwrap();
        if tables.len() >= MAX_TABLES {
            return None;
        }
        let pfn = POOL_BASE_PFN + self.next.fetch_add(1, Ordering::Relaxed);
        tables.insert(pfn, Box::new(std::array::from_fn(|_| AtomicU64::new(init))));
        Some(Pfn(pfn))
    }

    unsafe fn free_table(&self, pfn: Pfn) {
        let page = self.tables.lock().unwrap().remove(&pfn.raw());
        assert!(page.is_some(), "free of {pfn:?}, not a live table");
        self.freed.fetch_add(1, Ordering::Relaxed);
        // The page's memory goes back to the heap here.
        drop(page);
    }

    fn table(&self, pfn: Pfn) -> Option<NonNull<TableEntries>> {
        let page = self.tables.lock().unwrap().get(&pfn.raw()).map(|page| NonNull::from(&**page));
        // Widens the window between finding a page and reading it (a walker preempted there):
        // a free that did not wait for the walker's grace period lands in it.
        if page.is_some() {
            let held = HELD_LOOKUPS.get();
            if held > 0 {
                HELD_LOOKUPS.set(held - 1);
                self.hold_until_freed(pfn);
            } else if self.next.load(Ordering::Relaxed) % 8 == 0 {
                std::thread::yield_now();
            }
        }
        page
    }
}

impl HostMemory for FreeingHost {
    fn translate(&self, hva: Hva, _access: HostAccess) -> Result<HostPage, HostFault> {
        let off = hva.raw().checked_sub(RAM_HVA).filter(|&o| o < RAM_BYTES);
        let Some(off) = off else { return Err(HostFault::Unmapped(hva)) };
        Ok(HostPage { pfn: Pfn(RAM_BASE_PFN + (off >> 12)), writable: true, level: Level::L4K })
    }
}

impl GuestMemory for FreeingHost {
    fn read_u64(&self, hva: Hva) -> Result<u64, HostFault> {
        Ok(self.word(hva)?.load(Ordering::SeqCst))
    }

    fn cmpxchg_u64(&self, hva: Hva, old: u64, new: u64) -> Result<bool, HostFault> {
        Ok(self.word(hva)?.compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst).is_ok())
    }
}

impl Sched for FreeingHost {}

fn ram_slot(slot: u32, gpa: u64, size: u64) -> UserspaceMemoryRegion {
    UserspaceMemoryRegion::new(slot, 0, gpa, size, RAM_HVA + gpa)
}

/// One access as an embedder's loop makes it, until it translates or is emulated (or the
/// deadline passes: the caller stops then).
fn access(v: &mut Vcpu<FreeingHost>, gpa: u64, write: bool, until: Instant) {
    let need = if write { Access::WRITE } else { Access::NONE };
    let fa = if write { FaultAccess::WRITE } else { FaultAccess::READ };
    while Instant::now() < until {
        v.service_requests().expect("a root");
        let walk = match v.enter_guest() {
            Ok(g) => g.walk(Gpa(gpa), need),
            Err(_) => continue,
        };
        let o = match walk {
            HwWalk::Translated { .. } => return,
            HwWalk::Violation { .. } => v.handle_ept_violation(Gpa(gpa), fa),
            // The lockless walk of the fast MMIO path, held as in `shadow_access`.
            HwWalk::Misconfig { .. } => holding_lookups(4, || v.handle_ept_misconfig(Gpa(gpa))),
            HwWalk::Broken { dump } => panic!("broken tables: {dump}"),
        };
        match o {
            Ok(FaultOutcome::Emulate { .. }) => return,
            // Out of table pages for a moment, or a retry: try again.
            _ => std::thread::yield_now(),
        }
    }
}

/// Runs `vcpu(index, its vCPU, stop, deadline)` on two vCPU threads of `vm` while this thread
/// churns for 2 s (slot 1 deleted and created again, a host invalidation, `zap_all_fast`, and
/// with `shrink` the shadow shrinker), then checks that table pages were freed meanwhile and that
/// every one comes back with the VM.
fn churn_under_vcpus(
    vm: Vm<FreeingHost>,
    host: &FreeingHost,
    shrink: bool,
    vcpu: fn(u64, Vcpu<FreeingHost>, &AtomicBool, Instant),
) {
    let stop = Arc::new(AtomicBool::new(false));
    let until = Instant::now() + Duration::from_secs(20);
    let vcpus: Vec<_> = (0..2u64)
        .map(|t| {
            let v = vm.create_vcpu().unwrap();
            let stop = stop.clone();
            std::thread::spawn(move || vcpu(t, v, &stop, until))
        })
        .collect();
    let t0 = Instant::now();
    let mut round = 0u64;
    while t0.elapsed() < Duration::from_secs(2) {
        match round % 5 {
            0 => {
                vm.set_memory_region(&ram_slot(1, 2 << 20, 0)).unwrap();
                vm.set_memory_region(&ram_slot(1, 2 << 20, 2 << 20)).unwrap();
            }
            1 => drop(vm.invalidate_hva_range_begin(Hva(RAM_HVA), Hva(RAM_HVA + (1 << 20)))),
            2 => vm.zap_all_fast(),
            3 if shrink => {
                vm.shrink_shadow_pages(usize::MAX);
            }
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
        round += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for v in vcpus {
        v.join().unwrap();
    }
    assert!(host.freed.load(Ordering::Relaxed) > 0, "no table page was freed: nothing tested");
    drop(vm);
    assert_eq!(host.live(), 0, "every table page came back when the VM went");
}

#[test]
fn tables_freed_under_walks_and_zaps_are_never_read_after_their_grace_period() {
    let host = FreeingHost::new();
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.max_vcpus = 2;
    let vm = Vm::new(cfg, host.clone()).unwrap();
    vm.set_memory_region(&ram_slot(0, 0, 2 << 20)).unwrap();
    vm.set_memory_region(&ram_slot(1, 2 << 20, 2 << 20)).unwrap();
    churn_under_vcpus(vm, &host, false, |t, mut v, stop, until| {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            // RAM in both slots (slot 1 comes and goes: MMIO while it is away), and device MMIO
            // with no slot.
            let gpa = ((i * 7 + t) % 1024) << 12;
            access(&mut v, gpa, i % 3 == 0, until);
            access(&mut v, 0xfee0_0000 + (i % 4) * 0x1000, false, until);
            i += 1;
        }
    });
}

/// One guest access under shadow paging, until it translates, is emulated (MMIO) or the
/// deadline passes.
fn shadow_access(v: &mut Vcpu<FreeingHost>, gva: u64, write: bool, until: Instant) {
    let need = if write { Access::WRITE } else { Access::NONE };
    let err = if write { PfErr(PfErr::WRITE) } else { PfErr(0) };
    while Instant::now() < until {
        v.service_requests().expect("a root");
        let walk = match v.enter_guest() {
            Ok(g) => g.walk_gva(Gva(gva), need),
            Err(_) => continue,
        };
        let o = match walk {
            HwWalk::Translated { .. } => return,
            HwWalk::Violation { present, .. } => {
                let e = if present { PfErr(err.0 | PfErr::PRESENT) } else { err };
                v.handle_page_fault(Gva(gva), e)
            }
            // The lockless shadow walk of the fast MMIO path: a full walk looks up four
            // tables, a leaf-table cache hit (debug builds) its one.
            HwWalk::Misconfig { .. } => {
                holding_lookups(4, || v.handle_page_fault(Gva(gva), PfErr(err.0 | PfErr::RSVD)))
            }
            HwWalk::Broken { dump } => panic!("broken tables: {dump}"),
        };
        match o {
            Ok(FaultOutcome::Emulate { .. }) => return,
            Ok(FaultOutcome::GuestPageFault { .. }) => panic!("guest #PF at {gva:#x}"),
            _ => std::thread::yield_now(),
        }
    }
}

#[test]
fn shadow_pages_freed_under_walks_and_zaps_are_never_read_after_their_grace_period() {
    const P: u64 = 1;
    const RW: u64 = 2;
    const US: u64 = 4;
    let host = FreeingHost::new();
    // 4-level guest tables in slot 0: PML4 0x1000, PDPT 0x2000, PD 0x3000. GVA 0x40_0000 +
    // 4 KiB * i (PT 0x4000) maps gpa 0x10_0000 + 4 KiB * i in slot 0 for i < 256, and gpa
    // 0x20_0000 + 4 KiB * (i - 256) in slot 1 (RAM or MMIO, as slot 1 comes and goes) for the
    // rest; GVA 0x60_0000 + 4 KiB * i (PT 0x5000) maps a device with no slot.
    host.write_gpa(0x1000, 0x2000 | P | RW | US);
    host.write_gpa(0x2000, 0x3000 | P | RW | US);
    host.write_gpa(0x3000 + 2 * 8, 0x4000 | P | RW | US);
    host.write_gpa(0x3000 + 3 * 8, 0x5000 | P | RW | US);
    for i in 0..512u64 {
        host.write_gpa(0x4000 + i * 8, (0x10_0000 + (i << 12)) | P | RW | US);
        host.write_gpa(0x5000 + i * 8, (0xfee0_0000 + ((i % 4) << 12)) | P | RW | US);
    }
    let mut cfg = VmConfig::shadow(46).unwrap();
    cfg.max_vcpus = 2;
    let vm = Vm::new(cfg, host.clone()).unwrap();
    vm.set_memory_region(&ram_slot(0, 0, 2 << 20)).unwrap();
    vm.set_memory_region(&ram_slot(1, 2 << 20, 2 << 20)).unwrap();
    churn_under_vcpus(vm, &host, true, |t, mut v, stop, until| {
        v.set_guest_cpu(GuestCpu::long4(0, 46)).unwrap();
        v.load_cr3(0x1000).unwrap();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let gva = 0x40_0000 + ((i * 5 + t) % 512) * 0x1000;
            shadow_access(&mut v, gva, i % 4 == 0, until);
            shadow_access(&mut v, 0x60_0000 + (i % 8) * 0x1000, false, until);
            if i % 64 == 0 {
                v.load_cr3(0x1000).unwrap();
            }
            i += 1;
        }
    });
}
