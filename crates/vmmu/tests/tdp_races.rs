//! Faults racing zaps and memslot updates on real threads (issue 4, point 8): vCPU threads with a
//! TLB run accesses while an updater creates, moves and deletes a slot over the same gfns. A
//! logical clock stamps every access and update; afterwards:
//! - once a delete (or move) has returned, no access that starts afterwards reaches the old
//!   backing;
//! - once a create has returned, no access that starts afterwards (and ends before the next
//!   change begins) is emulated;
//! - no walk ever read a freed table page (the test host poisons and counts them).
#![cfg(not(loom))] // std threads and atomics: loom types only work inside a model

mod common;

use common::{region, RAM_HVA};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use vmmu::fault::{FaultOutcome, PfErr};
use vmmu::spte::FormatKind;
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, Gpa, Level, Pfn};

const GPA: u64 = 0x100_0000;
const ROUNDS: u64 = 200;

#[derive(Clone, Copy, Debug)]
enum Seen {
    Ram(Pfn),
    Mmio,
}

/// One access as the machine does it: TLB (gfn -> pfn), walk, exit, fault, retry.
fn access(v: &mut Vcpu<TestHost>, tlb: &mut HashMap<u64, Pfn>, gpa: u64) -> Seen {
    let gfn = gpa >> 12;
    loop {
        if v.service_requests().unwrap().flush_tlb {
            tlb.clear();
        }
        let walk = {
            let Ok(g) = v.enter_guest() else { continue };
            if let Some(pfn) = tlb.get(&gfn) {
                return Seen::Ram(*pfn);
            }
            g.walk(Gpa(gpa), Access::NONE)
        };
        let o = match walk {
            HwWalk::Translated { pfn, .. } => {
                tlb.insert(gfn, pfn);
                return Seen::Ram(pfn);
            }
            HwWalk::Violation { .. } if v.format().is_ept() => {
                v.handle_ept_violation(Gpa(gpa), vmmu::FaultAccess::READ).unwrap()
            }
            HwWalk::Violation { .. } => v.handle_npf(Gpa(gpa), PfErr(0)).unwrap(),
            HwWalk::Misconfig { .. } if v.format().is_ept() => {
                v.handle_ept_misconfig(Gpa(gpa)).unwrap()
            }
            HwWalk::Misconfig { .. } => v.handle_npf(Gpa(gpa), PfErr(PfErr::RSVD)).unwrap(),
            HwWalk::Broken { dump } => panic!("broken walk {dump:?}"),
        };
        if let FaultOutcome::Emulate { .. } = o {
            return Seen::Mmio;
        }
    }
}

/// What the updater did: in round `i`, the slot maps GPA to frame `base + i` during
/// `[created, removed_start]` (stamps of the logical clock).
#[derive(Clone, Copy, Debug)]
struct Round {
    create_end: u64,
    remove_start: u64,
    remove_end: u64,
    pfn: Pfn,
}

fn race(format: FormatKind, slot_zap_all: bool, bugs: vmmu::bugs::BugSet) -> Vec<String> {
    let mut cfg = VmConfig::new(format, 46).unwrap();
    cfg.slot_zap_all = slot_zap_all;
    cfg.max_vcpus = 2;
    cfg.bugs = bugs;
    let host = Arc::new(TestHost::new(256));
    host.map(RAM_HVA, 1 << 30, RAM_HVA >> 12, Level::L2M, true);
    let vm = Vm::new(cfg, host.clone()).unwrap();
    let clock = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let accesses = Arc::new(AtomicU64::new(0));

    let mut vcpu_threads = Vec::new();
    for _ in 0..2 {
        let mut v = vm.create_vcpu().unwrap();
        let (clock, stop, done) = (clock.clone(), stop.clone(), accesses.clone());
        vcpu_threads.push(std::thread::spawn(move || {
            let mut tlb = HashMap::new();
            let mut log = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let t0 = clock.fetch_add(1, Ordering::SeqCst);
                let seen = access(&mut v, &mut tlb, GPA + 0x10);
                let t1 = clock.fetch_add(1, Ordering::SeqCst);
                log.push((t0, t1, seen));
                done.fetch_add(1, Ordering::Relaxed);
            }
            log
        }));
    }

    let mut rounds = Vec::new();
    for i in 0..ROUNDS {
        // Each round uses other host frames, so a stale translation shows a wrong frame.
        let hva = RAM_HVA + (i % 64) * 0x1000;
        vm.set_memory_region(&region(7, GPA, 0x1000, hva, 0)).unwrap();
        let create_end = clock.fetch_add(1, Ordering::SeqCst);
        // Let the vCPUs see (and cache) this state, even on a loaded 2-core machine.
        std::thread::sleep(std::time::Duration::from_micros(200));
        let remove_start = clock.fetch_add(1, Ordering::SeqCst);
        if i % 3 == 2 {
            // Move away instead of delete, then delete at the new place.
            vm.set_memory_region(&region(7, GPA + 0x10_0000, 0x1000, hva, 0)).unwrap();
            vm.set_memory_region(&region(7, 0, 0, 0, 0)).unwrap();
        } else {
            vm.set_memory_region(&region(7, 0, 0, 0, 0)).unwrap();
        }
        let remove_end = clock.fetch_add(1, Ordering::SeqCst);
        rounds.push(Round { create_end, remove_start, remove_end, pfn: Pfn(hva >> 12) });
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
    // On a loaded machine the vCPU threads may have had little CPU: give them some more (the
    // slot stays deleted meanwhile), within a bound.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while accesses.load(Ordering::Relaxed) < 200 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    stop.store(true, Ordering::Release);
    let logs: Vec<_> = vcpu_threads.into_iter().map(|t| t.join().unwrap()).collect();

    let mut checked = 0;
    let mut violations = Vec::new();
    for log in &logs {
        for &(t0, t1, seen) in log {
            checked += 1;
            let ok = match seen {
                // The frame must be that of a round whose slot could exist at some instant of
                // [t0, t1]: its create began before t1 and its removal ended after t0.
                Seen::Ram(pfn) => rounds.iter().enumerate().any(|(i, r)| {
                    let began = if i == 0 { 0 } else { rounds[i - 1].remove_end };
                    r.pfn == pfn && began < t1 && r.remove_end > t0
                }),
                // Emulated: not allowed when the whole access lies where the slot surely existed.
                Seen::Mmio => !rounds.iter().any(|r| t0 > r.create_end && t1 < r.remove_start),
            };
            if !ok {
                violations.push(format!("[{t0},{t1}] saw {seen:?}"));
            }
        }
    }
    assert!(checked > 100, "too few accesses checked: {checked}");
    vm.reclaim();
    assert_eq!(host.use_after_free(), 0, "a walk read a freed table page");
    violations
}

use vmmu::bugs::BugSet;

#[test]
fn ept_faults_race_creates_moves_and_deletes() {
    let v = race(FormatKind::Ept, false, BugSet::NONE);
    assert!(v.is_empty(), "{} violations, first: {:?}", v.len(), v.first());
}

#[test]
fn npt_faults_race_creates_moves_and_deletes() {
    let v = race(FormatKind::Npt, false, BugSet::NONE);
    assert!(v.is_empty(), "{} violations, first: {:?}", v.len(), v.first());
}

#[test]
fn faults_race_slot_zap_all() {
    let v = race(FormatKind::Ept, true, BugSet::NONE);
    assert!(v.is_empty(), "{} violations, first: {:?}", v.len(), v.first());
}

/// The checker has teeth: without the remote TLB flush a vCPU keeps using a deleted slot's frame.
#[cfg(feature = "historical-bugs")]
#[test]
fn race_catches_no_tlb_flush_on_zap() {
    let bug = BugSet::only(vmmu::bugs::Bug::NoTlbFlushOnZap);
    let caught = (0..10).any(|_| !race(FormatKind::Ept, false, bug).is_empty());
    assert!(caught, "no-tlb-flush-on-zap went unnoticed in 10 runs");
}

/// Issue 11, defect 1, on real threads and the real fault path. Each round, with GPA unmapped:
/// vCPU A takes one violation exit for GPA on a slow host (its table lookups take 200 us, which
/// stretches the time between its memslot decision and its installation) while the updater
/// creates a slot at GPA and vCPU B reads GPA until it gets RAM (and caches it in its TLB). A decided "MMIO" from
/// the old memslot set; if its installation replaced B's RAM leaf silently, the later delete finds
/// no present leaf to flush and B reads the deleted slot's frame from its TLB. Returns the
/// rounds where B did.
fn create_window_race(format: FormatKind, rounds: u64) -> Vec<String> {
    use std::sync::Barrier;
    use std::time::Duration;
    let mut cfg = VmConfig::new(format, 46).unwrap();
    cfg.max_vcpus = 2;
    let host = Arc::new(TestHost::new(64));
    host.map(RAM_HVA, 1 << 24, RAM_HVA >> 12, Level::L4K, true);
    let vm = Vm::new(cfg, host.clone()).unwrap();
    assert!(vm.mmio_caching_enabled(), "the race needs MMIO SPTEs");
    // Phases per round: 0 start (A reads, updater creates, B reads to RAM), 1 updater deleted,
    // 2 B read again.
    let barrier = Arc::new(Barrier::new(3));
    let a_started = Arc::new(AtomicU64::new(0));

    let mut va = vm.create_vcpu().unwrap();
    let (bar_a, started, vm_a) = (barrier.clone(), a_started.clone(), vm.clone());
    let thread_a = std::thread::spawn(move || {
        for round in 0..rounds {
            bar_a.wait();
            // One exit, as the hardware raises it: the walk finds GPA unmapped.
            va.service_requests().unwrap();
            let walk = va.enter_guest().map(|g| g.walk(Gpa(GPA), Access::NONE));
            assert!(
                matches!(walk, Ok(HwWalk::Violation { .. })),
                "GPA starts unmapped: {walk:?} root {:?} gen {:?} round {round}",
                va.root(),
                vm_a.memslots().generation(vmmu::AsId(0)).unwrap()
            );
            // Slow from here: the fault decides, then installs 4 table lookups later.
            vmmu::testing::slow::table_lookups_on_this_thread(Duration::from_micros(200));
            started.store(round + 1, Ordering::Release);
            if va.format().is_ept() {
                va.handle_ept_violation(Gpa(GPA), vmmu::FaultAccess::READ).unwrap();
            } else {
                va.handle_npf(Gpa(GPA), PfErr(0)).unwrap();
            }
            vmmu::testing::slow::table_lookups_on_this_thread(Duration::ZERO);
            bar_a.wait(); // created and B cached
            bar_a.wait(); // deleted
            bar_a.wait(); // B read again
        }
    });
    let mut vb = vm.create_vcpu().unwrap();
    let (bar_b, started) = (barrier.clone(), a_started.clone());
    let thread_b = std::thread::spawn(move || {
        let mut tlb = HashMap::new();
        let mut stale = Vec::new();
        for round in 0..rounds {
            bar_b.wait();
            // After A's exit, so A's walk found GPA unmapped.
            while started.load(Ordering::Acquire) != round + 1 {
                std::hint::spin_loop();
            }
            let frame = loop {
                if let Seen::Ram(pfn) = access(&mut vb, &mut tlb, GPA) {
                    break pfn;
                }
                std::thread::yield_now();
            };
            bar_b.wait(); // created and B cached
            bar_b.wait(); // deleted
            if let Seen::Ram(pfn) = access(&mut vb, &mut tlb, GPA) {
                stale.push(format!(
                    "round {round}: B read frame {pfn:?} (slot frame {frame:?}) after the delete"
                ));
            }
            bar_b.wait();
        }
        stale
    });

    for round in 0..rounds {
        barrier.wait();
        // Start the create once A's fault is under way, so A decides from the old set.
        while a_started.load(Ordering::Acquire) != round + 1 {
            assert!(!thread_a.is_finished(), "vCPU A stopped in round {round}");
            std::hint::spin_loop();
        }
        std::thread::sleep(Duration::from_micros(50));
        vm.set_memory_region(&region(3, GPA, 0x1000, RAM_HVA, 0)).unwrap();
        barrier.wait();
        vm.set_memory_region(&region(3, GPA, 0, 0, 0)).unwrap();
        barrier.wait();
        barrier.wait();
        // B's last read left an MMIO SPTE: clear it so A's next exit is a violation again.
        vm.zap_all_fast();
    }
    thread_a.join().unwrap();
    let stale = thread_b.join().unwrap();
    vm.reclaim();
    assert_eq!(host.use_after_free(), 0, "a walk read a freed table page");
    stale
}

#[test]
fn create_window_race_never_leaves_a_vcpu_on_a_deleted_frame() {
    for format in [FormatKind::Ept, FormatKind::Npt] {
        let stale = create_window_race(format, 150);
        assert!(stale.is_empty(), "{format:?}: {} stale rounds, first: {}", stale.len(), stale[0]);
    }
}

/// Issue 11, defect 3: a vCPU that stays in guest mode, spinning on TLB hits and never faulting,
/// must not stall a memslot delete. The delete unlinks a table page, so it waits for a grace
/// period of the table read sections, and a vCPU holds one for its whole guest-mode period: the
/// MMU must kick it out (a request the vCPU sees when it polls, and the host's `Sched`).
#[test]
fn a_vcpu_spinning_in_guest_mode_does_not_stall_a_delete() {
    use std::sync::mpsc;
    use std::time::Duration;
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.max_vcpus = 2;
    let host = Arc::new(TestHost::new(64));
    // 4 KiB host pages: the 2 MiB slot needs a last-level table, which the delete unlinks.
    host.map(RAM_HVA, 1 << 22, RAM_HVA >> 12, Level::L4K, true);
    let vm = Vm::new(cfg, host.clone()).unwrap();
    let gpa = 0x20_0000;
    let mut v = vm.create_vcpu().unwrap();
    // The other vCPU prepares each round from outside guest mode.
    let mut helper = vm.create_vcpu().unwrap();
    let mut helper_tlb = HashMap::new();

    let stop = Arc::new(AtomicBool::new(false));
    let in_guest = Arc::new(AtomicBool::new(false));
    let (stop2, in_guest2) = (stop.clone(), in_guest.clone());
    let vcpu = std::thread::spawn(move || {
        let tlb: HashMap<u64, Pfn> = HashMap::new();
        let mut tlb = tlb;
        let mut exits = 0u64;
        v.service_requests().unwrap();
        while v.enter_guest_mode().is_err() {
            v.service_requests().unwrap();
        }
        in_guest2.store(true, Ordering::Release);
        while !stop2.load(Ordering::Acquire) {
            // Guest accesses that hit the TLB: no walk, no fault, no exit of its own.
            std::hint::black_box(tlb.get(&(gpa >> 12)));
            if v.requests_pending() {
                // The kick lands: exit, handle the requests, enter again at once.
                exits += 1;
                v.exit_guest_mode();
                loop {
                    if v.service_requests().unwrap().flush_tlb {
                        tlb.clear();
                    }
                    if v.enter_guest_mode().is_ok() {
                        break;
                    }
                }
            }
        }
        v.exit_guest_mode();
        exits
    });
    while !in_guest.load(Ordering::Acquire) {
        std::thread::yield_now();
    }
    let (done_tx, done_rx) = mpsc::channel();
    let vm2 = vm.clone();
    std::thread::spawn(move || {
        for _ in 0..ROUNDS {
            // An MMIO SPTE builds a last-level table for the 2 MiB block; the slot created over
            // it zaps nothing, and its delete unlinks that table without removing a present
            // leaf: no remote TLB flush makes the spinning vCPU exit, only the kick does.
            let seen = access(&mut helper, &mut helper_tlb, gpa);
            assert!(matches!(seen, Seen::Mmio), "{seen:?}");
            vm2.set_memory_region(&region(1, gpa, 0x20_0000, RAM_HVA, 0)).unwrap();
            vm2.set_memory_region(&region(1, gpa, 0, 0, 0)).unwrap();
        }
        let _ = done_tx.send(vm2.stats().tables_freed);
    });
    let done = done_rx.recv_timeout(Duration::from_secs(30));
    stop.store(true, Ordering::Release);
    let freed = done.expect("the delete stalled behind a vCPU in guest mode");
    assert!(freed >= ROUNDS, "each delete freed the unlinked table after a grace period");
    let exits = vcpu.join().unwrap();
    assert!(exits >= 1, "the vCPU was made to exit");
    assert!(host.kicks() >= 1, "the host was asked to kick the vCPU");
    vm.reclaim();
    assert_eq!(vm.core().pending_free(), 0);
    assert_eq!(host.use_after_free(), 0);
}

/// A one-vCPU EPT VM whose vCPU has mapped `GPA` (RAM), with its requests serviced.
fn one_vcpu_mapping_gpa() -> (Vm<TestHost>, Arc<TestHost>, Vcpu<TestHost>) {
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.max_vcpus = 1;
    let host = Arc::new(TestHost::new(64));
    host.map(RAM_HVA, 1 << 22, RAM_HVA >> 12, Level::L4K, true);
    let vm = Vm::new(cfg, host.clone()).unwrap();
    vm.set_memory_region(&region(1, GPA, 0x1000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    let mut tlb = HashMap::new();
    assert!(matches!(access(&mut v, &mut tlb, GPA), Seen::Ram(_)));
    v.service_requests().unwrap();
    (vm, host, v)
}

/// Issue 12 point 3: the MMU waits with the host's policy. A zap's remote flush waits for a vCPU
/// that stays in guest mode 20 ms after it noticed the request; the waiting is done by the test
/// host's `Sched::relax`, which counts its turns.
#[test]
fn the_mmu_waits_with_the_hosts_policy() {
    use std::time::Duration;
    let (vm, host, mut v) = one_vcpu_mapping_gpa();
    v.enter_guest_mode().unwrap();
    let in_guest = Arc::new(AtomicBool::new(true));
    let flag = in_guest.clone();
    let t = std::thread::spawn(move || {
        while !v.requests_pending() {
            std::hint::spin_loop();
        }
        std::thread::sleep(Duration::from_millis(20));
        v.exit_guest_mode();
        flag.store(false, Ordering::Release);
        v
    });
    let before = host.relaxes();
    vm.zap_gfn_range_for_tests(vmmu::AsId(0), vmmu::Gfn(GPA >> 12), vmmu::Gfn((GPA >> 12) + 1));
    assert!(
        !in_guest.load(Ordering::Acquire),
        "the flush returned while the vCPU was in guest mode"
    );
    assert!(host.relaxes() > before, "the flush waited without the host's wait policy");
    drop(t.join().unwrap());
}

/// Misuse of the raw guest-mode calls cannot wedge the MMU: entering twice is one guest-mode
/// period, `service_requests` called in guest mode is a VM exit, and a handler's slow path leaves
/// guest mode before it could wait for its own vCPU (release builds; debug builds assert that
/// handlers run outside guest mode, so this test runs the handler only in release). Before, the
/// second entry nested the table read section and one exit left it open for good.
#[test]
fn a_handler_called_in_guest_mode_leaves_it_and_zaps_still_complete() {
    let (vm, host, mut v) = one_vcpu_mapping_gpa();
    v.enter_guest_mode().unwrap();
    v.enter_guest_mode().unwrap();
    assert!(v.in_guest_mode());
    v.exit_guest_mode();
    assert!(!v.in_guest_mode(), "one exit ends the period however often it was entered");
    // A zap waits for no section of this (idle) vCPU: it returns on this thread.
    vm.zap_gfn_range_for_tests(vmmu::AsId(0), vmmu::Gfn(GPA >> 12), vmmu::Gfn((GPA >> 12) + 1));
    // A fault handler's slow path and `service_requests` called in guest mode leave it first.
    v.service_requests().unwrap();
    if !cfg!(debug_assertions) {
        v.enter_guest_mode().unwrap();
        let o = v.handle_ept_violation(Gpa(GPA), vmmu::FaultAccess::READ).unwrap();
        assert!(matches!(o, FaultOutcome::Fixed | FaultOutcome::Retry(_)), "{o:?}");
        assert!(!v.in_guest_mode());
    }
    v.enter_guest_mode().unwrap();
    v.service_requests().unwrap();
    assert!(!v.in_guest_mode());
    vm.zap_gfn_range_for_tests(vmmu::AsId(0), vmmu::Gfn(GPA >> 12), vmmu::Gfn((GPA >> 12) + 1));
    assert_eq!(host.use_after_free(), 0);
}
