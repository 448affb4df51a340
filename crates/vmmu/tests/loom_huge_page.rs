//! loom models of the TDP MMU's huge (2 MiB) leaves replacing lower tables, with the real `Vm`,
//! `Vcpu`, `MmuCore`, `TdpMmu`, `Memslots` and `TestHost` through the sync shim. Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p vmmu --release
//! --features historical-bugs --test loom_huge_page` (`scripts/test` does).
//!
//! (a) A fault that finds a lower table where its huge leaf goes (`MapOutcome::TableInTheWay`:
//! here a 4 KiB table holding an MMIO SPTE from before the 2 MiB slot was created) lets go of
//! the shared MMU lock, takes it exclusive, checks again that it is not stale and replaces the
//! table with the huge leaf (`Tdp::replace_table_in_the_way`). Racing it: a host invalidation
//! that remaps one page of the block at 4 KiB, a delete of the slot, a move of the slot, a
//! zap of the block, or dirty logging starting on the slot (there the property also asks that
//! a write made afterwards is in the next `KVM_GET_DIRTY_LOG`: no writable huge leaf decided
//! before logging began outlives its write protection; it fails if the start write-protects
//! nothing).
//!
//! (b) Huge-page recovery when dirty logging stops (`Vm::set_memory_region` without
//! `KVM_MEM_LOG_DIRTY_PAGES`, `Tdp::recover_huge_pages`) racing a write fault in the same
//! block, which may decide 4 KiB (logging on) or find the logged table in its huge leaf's way
//! (logging off); and recovery racing a host invalidation that remaps a page of the block (it
//! fails when a memslot update does not wait for invalidations in flight, checked by hand: the
//! recovered leaf then maps that page to its old frame).
//!
//! (c) Two write faults splitting the same read-only 2 MiB leaf of a logged slot under the
//! shared MMU lock (`Tdp::split_for_fault`): the loser of the exchange gives its table back.
//! Its property is in its doc.
//!
//! Property (harm) of (a) and (b): once both sides are done, an access by the vCPU to each gfn of interest
//! gives the right outcome for the final state (RAM of the frame the host maps there now, or
//! MMIO where no slot is), the racing fault did not fail, and no table page was read after it
//! was freed (`TestHost::use_after_free`). Model (a) with the host invalidation fails when the
//! fault skips its staleness re-check under the exclusive lock
//! (`vmmu::tdp::loom_knobs::SKIP_TABLE_IN_THE_WAY_RECHECK`): the huge leaf then maps the
//! remapped page to the frame the host no longer has there. With a neighbour of the faulting
//! page invalidated, it also fails when that check covers the faulting gfn only instead of the
//! whole block the huge leaf maps (checked by hand in `PageFault::stale`).
#![cfg(loom)]

mod loom_common;

use loom::thread;
use loom_common::model;
use vmmu::fault::FaultOutcome;
use vmmu::memslot::{UserspaceMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
use vmmu::spte::FormatKind;
use vmmu::sync::Arc;
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, AsId, FaultAccess, Gfn, Gpa, Hva, Level, Pfn, SlotId};

/// The 2 MiB block (first gfn) the slot maps, and where a move puts it.
const BLOCK: u64 = 0x200;
const MOVED: u64 = 0x400;
/// The gfn whose MMIO SPTE (from before the slot existed) links the 4 KiB table in the way.
const OLD_MMIO: u64 = BLOCK + 3;
/// The gfn the racing fault is for.
const TARGET: u64 = BLOCK + 5;
/// Host RAM behind the slot: 2 MiB pages, frame = hva >> 12.
const RAM_HVA: u64 = 0x4000_0000;
const BASE_PFN: u64 = RAM_HVA >> 12;
/// The frame the host maps at `TARGET`'s address after the invalidation.
const NEW_PFN: u64 = 0x7_7000;

/// What one guest access ended as.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Seen {
    Ram(Pfn),
    Mmio,
}

/// The 2 MiB slot 0 at gfn `at` backed by `RAM_HVA` (size 0: delete).
fn slot(at: u64, size: u64, flags: u32) -> UserspaceMemoryRegion {
    UserspaceMemoryRegion::new(0, flags, at << 12, size, RAM_HVA)
}

fn gpa(gfn: u64) -> Gpa {
    Gpa(gfn << 12)
}

/// An EPT VM with one vCPU (its root loaded) and one address space on a host with `RAM_HVA`'s
/// 4 MiB mapped with 2 MiB pages.
fn vm() -> (Vm<TestHost>, Arc<TestHost>, Vcpu<TestHost>) {
    vm_for(1)
}

/// [`vm`] with room for `max_vcpus` vCPUs.
fn vm_for(max_vcpus: usize) -> (Vm<TestHost>, Arc<TestHost>, Vcpu<TestHost>) {
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.max_vcpus = max_vcpus;
    cfg.nr_address_spaces = 1;
    let host = Arc::new(TestHost::new(8));
    host.map(RAM_HVA, 0x40_0000, BASE_PFN, Level::L2M, true);
    let vm = Vm::new(cfg, host.clone()).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    (vm, host, v)
}

/// One guest access as the machine does it (service requests, enter guest mode, walk like the
/// hardware, exit, handle the fault), retried a few times. Used only sequentially.
fn access(v: &mut Vcpu<TestHost>, gfn: u64, write: bool) -> Seen {
    let (walk_access, fault_access) = match write {
        true => (Access::WRITE, FaultAccess::WRITE),
        false => (Access::NONE, FaultAccess::READ),
    };
    for _ in 0..8 {
        v.service_requests().unwrap();
        let walk = match v.enter_guest() {
            Ok(g) => g.walk(gpa(gfn), walk_access),
            Err(_) => continue,
        };
        let o = match walk {
            HwWalk::Translated { pfn, .. } => return Seen::Ram(pfn),
            HwWalk::Violation { .. } => v.handle_ept_violation(gpa(gfn), fault_access),
            HwWalk::Misconfig { .. } => v.handle_ept_misconfig(gpa(gfn)),
            HwWalk::Broken { dump } => panic!("VIOLATION: broken walk of {gfn:#x}: {dump:?}"),
        };
        if let FaultOutcome::Emulate { .. } = o.unwrap() {
            return Seen::Mmio;
        }
    }
    panic!("access to gfn {gfn:#x} did not complete");
}

fn expect(v: &mut Vcpu<TestHost>, gfn: u64, want: Seen, what: &str) {
    let seen = access(v, gfn, false);
    assert_eq!(seen, want, "VIOLATION: after {what}, gfn {gfn:#x} is {seen:?}, not {want:?}");
}

/// The knob `SKIP_TABLE_IN_THE_WAY_RECHECK` is process-wide: every test here holds this lock,
/// so none runs while the test that sets the knob has it on.
static KNOB: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn knob_lock() -> std::sync::MutexGuard<'static, ()> {
    KNOB.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// (a) A fault replacing the table in its huge leaf's way, against a change of the block.
// ---------------------------------------------------------------------------------------------

/// What the other thread does to the block while the vCPU faults.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Racer {
    /// A host invalidation of page `page` of the block (`TARGET`'s, or a neighbour's), which
    /// the host remaps to `NEW_PFN` (splitting its 2 MiB page) before the end.
    Invalidate { page: u64 },
    /// `KVM_SET_USER_MEMORY_REGION` deleting the slot.
    Delete,
    /// Moving the slot to `MOVED`.
    Move,
    /// A zap of the block (as a host invalidation without a remap, or the shrinker).
    Zap,
    /// Dirty logging starting on the slot (which write-protects its mappings).
    StartLogging,
}

fn table_in_the_way(racer: Racer) {
    model(move || {
        let (vm, host, mut v) = vm();
        // The MMIO SPTE links a 4 KiB table in the block; the slot created after it makes the
        // block 2 MiB RAM, so the next fault in it finds that table where its leaf goes.
        assert_eq!(access(&mut v, OLD_MMIO, false), Seen::Mmio, "setup");
        vm.set_memory_region(&slot(BLOCK, 0x20_0000, 0)).unwrap();
        let t = thread::spawn(move || {
            let o = v.handle_ept_violation(gpa(TARGET), FaultAccess::READ);
            (v, o)
        });
        match racer {
            Racer::Invalidate { page } => {
                let hva = RAM_HVA + (page << 12);
                let inv = vm.invalidate_hva_range_begin(Hva(hva), Hva(hva + 0x1000));
                host.map_over(hva, 0x1000, NEW_PFN, Level::L4K, true);
                inv.end();
            }
            Racer::Delete => {
                vm.set_memory_region(&slot(BLOCK, 0, 0)).unwrap();
            }
            Racer::Move => {
                vm.set_memory_region(&slot(MOVED, 0x20_0000, 0)).unwrap();
            }
            Racer::Zap => vm.zap_gfn_range_for_tests(AsId(0), Gfn(BLOCK), Gfn(BLOCK + 512)),
            Racer::StartLogging => {
                vm.set_memory_region(&slot(BLOCK, 0x20_0000, KVM_MEM_LOG_DIRTY_PAGES)).unwrap();
            }
        }
        let (mut v, o) = t.join().unwrap();
        let gone = matches!(racer, Racer::Delete | Racer::Move);
        assert!(
            matches!(o, Ok(FaultOutcome::Fixed | FaultOutcome::Retry(_) | FaultOutcome::Spurious))
                || (gone && matches!(o, Ok(FaultOutcome::Emulate { .. }))),
            "VIOLATION: the fault racing {racer:?} ended as {o:?}"
        );
        let what = format!("{racer:?}");
        let ram = |page: u64| Seen::Ram(Pfn(BASE_PFN + page));
        match racer {
            Racer::Invalidate { page } => {
                for p in [3, 5, 6] {
                    let want = if p == page { Seen::Ram(Pfn(NEW_PFN)) } else { ram(p) };
                    expect(&mut v, BLOCK + p, want, &what);
                }
            }
            Racer::Delete => {
                expect(&mut v, TARGET, Seen::Mmio, &what);
                expect(&mut v, OLD_MMIO, Seen::Mmio, &what);
            }
            Racer::Move => {
                expect(&mut v, TARGET, Seen::Mmio, &what);
                expect(&mut v, MOVED + 5, ram(5), &what);
            }
            Racer::Zap => {
                expect(&mut v, TARGET, ram(5), &what);
                expect(&mut v, OLD_MMIO, ram(3), &what);
            }
            Racer::StartLogging => {
                expect(&mut v, TARGET, ram(5), &what);
                // A write made now must be in the next collection: no writable leaf the fault
                // made from the set before logging began may let it through without a fault.
                vm.get_dirty_log(AsId(0), SlotId(0)).unwrap();
                assert_eq!(access(&mut v, TARGET, true), ram(5), "VIOLATION: write to {TARGET:#x}");
                let log = vm.get_dirty_log(AsId(0), SlotId(0)).unwrap();
                assert!(
                    log[0] & (1 << (TARGET - BLOCK)) != 0,
                    "VIOLATION: a write to {TARGET:#x} after logging started is in no \
                     collection ({log:?})"
                );
            }
        }
        drop(v);
        vm.reclaim();
        assert_eq!(host.use_after_free(), 0, "VIOLATION: a table page was read after its free");
    });
}

#[test]
fn table_in_the_way_vs_host_invalidation() {
    let _k = knob_lock();
    table_in_the_way(Racer::Invalidate { page: TARGET - BLOCK });
}

/// The invalidated page is not the faulting one but in the block the huge leaf would map: the
/// staleness check covers the whole block (`PageFault::stale`).
#[test]
fn table_in_the_way_vs_host_invalidation_of_a_neighbour() {
    let _k = knob_lock();
    table_in_the_way(Racer::Invalidate { page: 6 });
}

#[test]
fn table_in_the_way_vs_delete() {
    let _k = knob_lock();
    table_in_the_way(Racer::Delete);
}

#[test]
fn table_in_the_way_vs_move() {
    let _k = knob_lock();
    table_in_the_way(Racer::Move);
}

#[test]
fn table_in_the_way_vs_zap() {
    let _k = knob_lock();
    table_in_the_way(Racer::Zap);
}

#[test]
fn table_in_the_way_vs_start_of_dirty_logging() {
    let _k = knob_lock();
    table_in_the_way(Racer::StartLogging);
}

/// A second vCPU in guest mode walks through the table in the way (to `OLD_MMIO`'s page) while
/// the fault replaces it and then frees it after a grace period: the walk reads no freed page
/// and translates to no frame but the page's own. (The grace period is not all that keeps the
/// walk off the freed page: the replacement's remote TLB flush waits for w's acknowledgement,
/// i.e. for w to leave guest mode, before the table is queued; with the grace period removed
/// the model still passes.)
#[test]
fn table_in_the_way_vs_hardware_walk() {
    let _k = knob_lock();
    model(|| {
        let (vm, host, mut v) = vm_for(2);
        let mut w = vm.create_vcpu().unwrap();
        assert_eq!(access(&mut v, OLD_MMIO, false), Seen::Mmio, "setup");
        vm.set_memory_region(&slot(BLOCK, 0x20_0000, 0)).unwrap();
        w.service_requests().unwrap();
        let t = {
            let vm = vm.clone();
            thread::spawn(move || {
                let o = v.handle_ept_violation(gpa(TARGET), FaultAccess::READ);
                vm.reclaim();
                (v, o)
            })
        };
        // One guest-mode period of w (unless a request is pending: then it does not enter).
        let walk = w.enter_guest().ok().map(|g| g.walk(gpa(OLD_MMIO), Access::NONE));
        let (mut v, o) = t.join().unwrap();
        assert!(
            matches!(o, Ok(FaultOutcome::Fixed | FaultOutcome::Retry(_) | FaultOutcome::Spurious)),
            "VIOLATION: the fault racing a hardware walk ended as {o:?}"
        );
        assert_eq!(host.use_after_free(), 0, "VIOLATION: the walk read a freed table page");
        match walk {
            None | Some(HwWalk::Violation { .. } | HwWalk::Misconfig { .. }) => {}
            Some(HwWalk::Translated { pfn, .. }) => {
                assert_eq!(pfn, Pfn(BASE_PFN + 3), "VIOLATION: w's walk of {OLD_MMIO:#x}")
            }
            Some(w) => panic!("VIOLATION: w's walk of {OLD_MMIO:#x} is {w:?}"),
        }
        let ram = |page: u64| Seen::Ram(Pfn(BASE_PFN + page));
        expect(&mut v, OLD_MMIO, ram(3), "the replacement");
        expect(&mut w, OLD_MMIO, ram(3), "the replacement");
        expect(&mut w, TARGET, ram(5), "the replacement");
        drop((v, w));
        vm.reclaim();
        assert_eq!(host.use_after_free(), 0, "VIOLATION: a table page was read after its free");
    });
}

#[test]
fn table_in_the_way_vs_host_invalidation_fails_without_the_recheck() {
    use std::sync::atomic::Ordering as StdOrdering;
    let _k = knob_lock();
    let knob = &vmmu::tdp::loom_knobs::SKIP_TABLE_IN_THE_WAY_RECHECK;
    knob.store(true, StdOrdering::Relaxed);
    let caught = std::panic::catch_unwind(|| {
        loom_common::violation(|| table_in_the_way(Racer::Invalidate { page: TARGET - BLOCK }))
    });
    knob.store(false, StdOrdering::Relaxed);
    assert!(caught.unwrap_or_else(|p| std::panic::resume_unwind(p)), "the model passes without it");
}

// ---------------------------------------------------------------------------------------------
// (b) Huge-page recovery when dirty logging stops, against a write fault in the block.
// ---------------------------------------------------------------------------------------------

#[test]
fn recovery_vs_write_fault() {
    let _k = knob_lock();
    model(|| {
        let (vm, host, mut v) = vm();
        vm.set_memory_region(&slot(BLOCK, 0x20_0000, KVM_MEM_LOG_DIRTY_PAGES)).unwrap();
        // Logging: a 4 KiB leaf for OLD_MMIO's page, in a 4 KiB table of the block.
        assert_eq!(access(&mut v, OLD_MMIO, true), Seen::Ram(Pfn(BASE_PFN + 3)), "setup");
        let t = thread::spawn(move || {
            let o = v.handle_ept_violation(gpa(TARGET), FaultAccess::WRITE);
            (v, o)
        });
        vm.set_memory_region(&slot(BLOCK, 0x20_0000, 0)).unwrap();
        let (mut v, o) = t.join().unwrap();
        assert!(
            matches!(o, Ok(FaultOutcome::Fixed | FaultOutcome::Retry(_) | FaultOutcome::Spurious)),
            "VIOLATION: the write fault racing the recovery ended as {o:?}"
        );
        let what = "logging stopped";
        for page in [3, 5, 6, 0x1ff] {
            expect(&mut v, BLOCK + page, Seen::Ram(Pfn(BASE_PFN + page)), what);
        }
        let seen = access(&mut v, TARGET, true);
        assert_eq!(seen, Seen::Ram(Pfn(BASE_PFN + 5)), "VIOLATION: a write to {TARGET:#x}");
        drop(v);
        vm.reclaim();
        assert_eq!(host.use_after_free(), 0, "VIOLATION: a table page was read after its free");
    });
}

/// Recovery against a host invalidation that remaps page 6 of the block (splitting the host's
/// 2 MiB page): whichever goes first, no 2 MiB leaf maps page 6 to its old frame afterwards
/// (a memslot update publishes only with no invalidation in flight, an invalidation may begin
/// once the flags change is published, recovery skips a block that meets one in flight, and it
/// asks the host's mapping level when it runs).
#[test]
fn recovery_vs_host_invalidation() {
    let _k = knob_lock();
    model(|| {
        let (vm, host, mut v) = vm();
        vm.set_memory_region(&slot(BLOCK, 0x20_0000, KVM_MEM_LOG_DIRTY_PAGES)).unwrap();
        assert_eq!(access(&mut v, OLD_MMIO, true), Seen::Ram(Pfn(BASE_PFN + 3)), "setup");
        let t = {
            let (vm, host) = (vm.clone(), host.clone());
            thread::spawn(move || {
                let hva = RAM_HVA + (6 << 12);
                let inv = vm.invalidate_hva_range_begin(Hva(hva), Hva(hva + 0x1000));
                host.map_over(hva, 0x1000, NEW_PFN, Level::L4K, true);
                inv.end();
            })
        };
        vm.set_memory_region(&slot(BLOCK, 0x20_0000, 0)).unwrap();
        t.join().unwrap();
        let what = "recovery and the invalidation";
        for page in [3, 5, 6] {
            let want = Seen::Ram(Pfn(if page == 6 { NEW_PFN } else { BASE_PFN + page }));
            expect(&mut v, BLOCK + page, want, what);
        }
        drop(v);
        vm.reclaim();
        assert_eq!(host.use_after_free(), 0, "VIOLATION: a table page was read after its free");
    });
}

// ---------------------------------------------------------------------------------------------
// (c) Two write faults splitting the same read-only 2 MiB leaf under the shared MMU lock.
// ---------------------------------------------------------------------------------------------

/// A read-only 2 MiB leaf in a logged slot (logging started when no table page could be had, so
/// the leaf was write-protected whole) takes write faults from two vCPUs at once, at `TARGET`
/// and its neighbour page 6. Each splits the leaf into children with its rights and exchanges
/// its table for the leaf; the one whose exchange loses gives its table back and faults again
/// (`map.rs`, `Tdp::split_for_fault`). Property (harm): both writes then complete and are
/// the only pages in the collection (a read of another page of the block does not fault: had a
/// fault zapped the leaf, the read would map the page writable and report it dirty); the leaf
/// counters and the table pages in use match one split, whichever won (a lost table that was
/// leaked or counted would show there); and no table page was read after its free.
#[test]
fn two_write_faults_split_one_read_only_2m_leaf() {
    let _k = knob_lock();
    let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = lost.clone();
    model(move || {
        let (vm, host, mut a) = vm_for(2);
        let mut b = vm.create_vcpu().unwrap();
        b.service_requests().unwrap();
        vm.set_memory_region(&slot(BLOCK, 0x20_0000, 0)).unwrap();
        assert_eq!(access(&mut a, OLD_MMIO, true), Seen::Ram(Pfn(BASE_PFN + 3)), "setup");
        host.set_fail_alloc(true);
        vm.set_memory_region(&slot(BLOCK, 0x20_0000, KVM_MEM_LOG_DIRTY_PAGES)).unwrap();
        host.set_fail_alloc(false);
        let s = vm.stats();
        assert_eq!((s.pages_2m, s.pages_4k), (1, 0), "setup: the leaf stayed 2 MiB, read-only");
        let (tables, freed) = (host.tables_in_use(), s.tables_freed);
        let t = thread::spawn(move || {
            let o = b.handle_ept_violation(gpa(BLOCK + 6), FaultAccess::WRITE);
            (b, o)
        });
        let oa = a.handle_ept_violation(gpa(TARGET), FaultAccess::WRITE);
        let (mut b, ob) = t.join().unwrap();
        for o in [oa, ob] {
            assert!(
                matches!(o, Ok(FaultOutcome::Fixed | FaultOutcome::Retry(_))),
                "VIOLATION: a write fault splitting the leaf ended as {o:?}"
            );
        }
        if vm.stats().tables_freed > freed {
            lost.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        assert_eq!(access(&mut a, TARGET, true), Seen::Ram(Pfn(BASE_PFN + 5)), "VIOLATION");
        assert_eq!(access(&mut b, BLOCK + 6, true), Seen::Ram(Pfn(BASE_PFN + 6)), "VIOLATION");
        expect(&mut a, BLOCK + 0x1ff, Seen::Ram(Pfn(BASE_PFN + 0x1ff)), "the splits");
        let log = vm.get_dirty_log(AsId(0), SlotId(0)).unwrap();
        assert_eq!(log[..8], [0b110_0000, 0, 0, 0, 0, 0, 0, 0], "VIOLATION: pages dirty");
        let s = vm.stats();
        assert_eq!((s.pages_2m, s.pages_4k), (0, 512), "VIOLATION: the leaf counts");
        assert_eq!(host.tables_in_use(), tables + 1, "VIOLATION: table pages in use");
        drop((a, b));
        vm.reclaim();
        assert_eq!(host.use_after_free(), 0, "VIOLATION: a table page was read after its free");
    });
    assert!(seen.load(std::sync::atomic::Ordering::Relaxed), "no execution lost the exchange");
}
