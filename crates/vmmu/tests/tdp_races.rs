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

    let mut vcpu_threads = Vec::new();
    for _ in 0..2 {
        let mut v = vm.create_vcpu().unwrap();
        let (clock, stop) = (clock.clone(), stop.clone());
        vcpu_threads.push(std::thread::spawn(move || {
            let mut tlb = HashMap::new();
            let mut log = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let t0 = clock.fetch_add(1, Ordering::SeqCst);
                let seen = access(&mut v, &mut tlb, GPA + 0x10);
                let t1 = clock.fetch_add(1, Ordering::SeqCst);
                log.push((t0, t1, seen));
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
