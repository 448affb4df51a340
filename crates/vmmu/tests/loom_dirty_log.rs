//! loom models of dirty logging's promise (`crate::dirty`): a write the guest makes after a
//! collection returned is in a later `KVM_GET_DIRTY_LOG`; the VMM never loses a dirty page. A
//! collection is auto mode's GET (it takes the bitmap and write-protects those pages again) or,
//! in manual mode (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` without "initially set", where GET only
//! reads the bitmap), the `KVM_CLEAR_DIRTY_LOG` that follows the GET (it clears the given bits
//! and write-protects those pages). Either flushes every vCPU's TLB before it returns, if a leaf
//! lost its write right. With the real `Vm`, `Vcpu` and MMU through the sync shim.
//!
//! Setup: a dirty-logged one-page slot; the vCPU's write fault has made the leaf writable and
//! marked the page. From [`Start::Unmapped`] the leaf is then zapped (the page stays marked), so
//! the vCPU's first write faults and its fault races the collection's exclusive hold of the MMU
//! lock. From [`Start::LoggingStartedLive`] ("initially set") the slot did not log at the write
//! fault; logging is turned on after it, which sets the bit and protects nothing, so the CLEAR
//! is the first and only protection of a leaf the vCPU may hold writable. Two threads:
//!
//! - the vCPU runs up to [`ROUNDS`] guest-mode periods. Each services its requests (a TLB flush
//!   empties its TLB) and enters guest mode; if its one-entry "TLB" is empty it fills it from
//!   the hardware walk for a write (only a writable translation is kept); then it makes up to
//!   two guest writes through it, exiting first if it notices a request (the kick). With no
//!   writable translation the write exits and the write fault is handled (which maps the page
//!   writable and marks it), and the write is retried in the next period. A TLB entry outlives
//!   a VM exit (no flush on exit), as on hardware with VPID.
//! - the VMM collects (auto: GET; manual: GET, which must return the page, then CLEAR of what
//!   it returned) and raises `collected` (Release) when the collection returned.
//!
//! Invariant, as the VMM sees it: if a guest write went through the TLB after the vCPU saw
//! `collected` (Acquire), a GET after the vCPU stopped returns the page. Two ways break it: a
//! write through an entry cached before the collection, in the same guest-mode period with no
//! request noticed (the page is write-protected and not marked, and nothing faults: the flush
//! closes this), and a write fault that marks the page before its hold of the lock, so that the
//! collection clears the mark and the fault then maps the page writable unmarked (marking
//! inside the hold closes this). Each model must also see a write after the collection returned
//! through an entry refilled after a write fault (the check is not vacuous) and a write before
//! it.
//!
//! The models: auto mode and manual mode on the TDP MMU (EPT, the hardware walking gpas), and
//! manual mode on the shadow MMU (a 4-level guest whose tables lie in an unlogged slot, the
//! hardware walking the shadow for a gva; write protection through the reverse map under the
//! shadow lock), each from both starts; and "initially set" on both MMUs from
//! [`Start::LoggingStartedLive`]. Auto GET (`dirty::get_log`) and CLEAR
//! (`dirty::clear_log`) each flush after their write protection under the same bug switch: with
//! `--features historical-bugs` the models from [`Start::Writable`] must catch
//! `dirty-log-no-flush` (the collection returns without flushing) as a `VIOLATION`; in manual
//! mode the GET protects nothing, so the catch is the CLEAR's.
//!
//! Checked by hand with temporary edits (not committed), each failing as a `VIOLATION`:
//! `clear_log` without its flush, and `clear_log` without its write protection (bits cleared,
//! leaves left writable), fail both manual models from [`Start::Writable`] (the auto model
//! passes), and the "initially set" models too (`clear_log` without its write protection: both
//! fail); the TDP fault path marking the page before it takes the MMU lock (and not after the
//! install) fails both TDP models from [`Start::Unmapped`]; the shadow fault path marking
//! before it takes the shadow lock fails the shadow model from [`Start::Unmapped`].
//!
//! Bounded: one vCPU, [`ROUNDS`] periods of at most two writes, one collection, preemption bound
//! 2 (`LOOM_MAX_PREEMPTIONS`). Each model runs in about a second or less (release build).
#![cfg(loom)]

mod loom_common;

use loom_common::model;

use loom::sync::atomic::AtomicBool;
use loom::thread;
use std::collections::BTreeSet;
use vmmu::bugs::BugSet;
use vmmu::dirty::DirtyLogMode;
use vmmu::fault::{FaultOutcome, PfErr};
use vmmu::guest::GuestCpu;
use vmmu::memslot::{UserspaceMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
use vmmu::spte::FormatKind;
use vmmu::sync::{Arc, Ordering};
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vcpu::{GuestMode, Vcpu};
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, AsId, FaultAccess, Gfn, Gpa, Gva, Level, SlotId};

/// The logged page's gfn (its slot's only page).
const X: u64 = 0x1234;
const RAM_HVA: u64 = 0x4000_0000;
/// The logged slot's id.
const LOG_SLOT: u16 = 0;
/// Shadow model: guest RAM for the guest's page tables (an unlogged slot from gpa 0).
const TABLES_SIZE: u64 = 0x8000;
/// Shadow model: the gva the guest maps to the logged page (PML4 index 0, PDPT index 1).
const GVA: u64 = 0x4000_0000;
/// Guest-mode periods the vCPU runs: a period cut short by the collection's kick, one whose
/// write faults, and one that writes through the refilled entry.
const ROUNDS: usize = 3;

/// The logged page's leaf when the threads start (the page is marked either way).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Start {
    /// Writable: the vCPU's first writes need no fault.
    Writable,
    /// Zapped after the write fault: the vCPU's first write faults, racing the collection.
    Unmapped,
    /// "Initially set" ([`DirtyLogMode::InitiallySet`]): the slot was mapped writable by a
    /// write fault before it logged; logging was then turned on (every bit set, nothing
    /// write-protected), so the leaf the vCPU starts from was never protected and only the
    /// CLEAR protects it.
    LoggingStartedLive,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mmu {
    /// EPT: the hardware walks the TDP tables for the gpa.
    Tdp,
    /// Shadow paging: the hardware walks the shadow tables for the gva.
    Shadow,
}

impl Mmu {
    /// The hardware walk for a guest write to the logged page.
    fn walk(self, g: &GuestMode<'_, TestHost>) -> HwWalk {
        match self {
            Mmu::Tdp => g.walk(Gpa(X << 12), Access::WRITE),
            Mmu::Shadow => g.walk_gva(Gva(GVA), Access::WRITE.union(Access::USER)),
        }
    }

    /// The exit of a guest write whose walk found no writable leaf (`present`: a permission
    /// fault), handled.
    fn write_fault(self, v: &mut Vcpu<TestHost>, present: bool) -> FaultOutcome {
        let o = match self {
            Mmu::Tdp => v.handle_ept_violation(Gpa(X << 12), FaultAccess::WRITE),
            Mmu::Shadow => {
                let p = if present { PfErr::PRESENT } else { 0 };
                v.handle_page_fault(Gva(GVA), PfErr(PfErr::WRITE | PfErr::USER | p))
            }
        };
        match o {
            Ok(o @ (FaultOutcome::Fixed | FaultOutcome::Spurious | FaultOutcome::Retry(_))) => o,
            other => panic!("the write fault on the logged page gave {other:?}"),
        }
    }
}

/// What the executions of one model saw (std types: they outlive the executions), so that a test
/// can assert that loom reached the interleavings that matter.
#[derive(Clone, Default)]
struct Coverage(std::sync::Arc<std::sync::Mutex<(usize, BTreeSet<&'static str>)>>);

impl Coverage {
    fn execution(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
    }

    fn saw(&self, label: &'static str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).1.insert(label);
    }

    /// Asserts that every label in `want` was seen.
    fn expect(&self, want: &[&str]) {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for w in want {
            assert!(g.1.contains(*w), "no execution saw {w}; saw {:?}", g.1);
        }
        eprintln!("{} executions; saw {:?}", g.0, g.1);
    }
}

const WROTE_BEFORE: &str = "a write before the collection returned";
const WROTE_AFTER: &str = "a write after the collection returned, through an entry refilled after \
                           a write fault";

/// A VM of `mmu` with the logged one-page slot (and, for shadow paging, the guest's tables), in
/// `mode`, and its vCPU after the write fault that made the page writable and marked it; with
/// [`Start::Unmapped`] the page's leaf is zapped then.
fn setup(
    mmu: Mmu,
    mode: DirtyLogMode,
    start: Start,
    bugs: BugSet,
) -> (Vm<TestHost>, Vcpu<TestHost>) {
    let mut cfg = match mmu {
        Mmu::Tdp => VmConfig::new(FormatKind::Ept, 46).unwrap(),
        Mmu::Shadow => VmConfig::shadow(46).unwrap(),
    };
    cfg.max_vcpus = 1;
    cfg.nr_address_spaces = 1;
    cfg.bugs = bugs;
    let host = Arc::new(TestHost::new(16));
    host.map(RAM_HVA, 0x1000, RAM_HVA >> 12, Level::L4K, true);
    let vm = Vm::new(cfg, host.clone()).unwrap();
    vm.set_dirty_log_mode(mode);
    let logged = |flags| UserspaceMemoryRegion {
        slot: u32::from(LOG_SLOT),
        flags,
        guest_phys_addr: X << 12,
        memory_size: 0x1000,
        userspace_addr: RAM_HVA,
    };
    let live = start == Start::LoggingStartedLive;
    vm.set_memory_region(&logged(if live { 0 } else { KVM_MEM_LOG_DIRTY_PAGES })).unwrap();
    if mmu == Mmu::Shadow {
        const TABLES_HVA: u64 = 0x8000_0000;
        host.map(TABLES_HVA, TABLES_SIZE, TABLES_HVA >> 12, Level::L4K, true);
        vm.set_memory_region(&UserspaceMemoryRegion::new(1, 0, 0, TABLES_SIZE, TABLES_HVA))
            .unwrap();
        // PML4 at gpa 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000: GVA -> the logged page.
        const P_RW_US: u64 = 7;
        host.write_u64(TABLES_HVA + 0x1000, 0x2000 | P_RW_US);
        host.write_u64(TABLES_HVA + 0x2000 + 8, 0x3000 | P_RW_US);
        host.write_u64(TABLES_HVA + 0x3000, 0x4000 | P_RW_US);
        host.write_u64(TABLES_HVA + 0x4000, X << 12 | P_RW_US);
    }
    let mut v = vm.create_vcpu().unwrap();
    if mmu == Mmu::Shadow {
        v.set_guest_cpu(GuestCpu::long4(0x1000, 46)).unwrap();
    }
    v.service_requests().unwrap();
    assert_eq!(mmu.write_fault(&mut v, false), FaultOutcome::Fixed, "setup: the write fault");
    if live {
        vm.set_memory_region(&logged(KVM_MEM_LOG_DIRTY_PAGES)).unwrap();
    }
    if start == Start::Unmapped {
        vm.zap_gfn_range_for_tests(AsId(0), Gfn(X), Gfn(X + 1));
    }
    (vm, v)
}

/// The vCPU thread's work (module doc). Returns whether a guest write went through the TLB after
/// the vCPU saw `collected`; records both kinds of write in `c`.
fn vcpu_writes(mmu: Mmu, v: &mut Vcpu<TestHost>, collected: &AtomicBool, c: &Coverage) -> bool {
    // Whether the TLB holds a writable translation of the page.
    let mut tlb = false;
    // Whether a write fault was handled before the TLB entry was filled.
    let (mut faulted, mut refilled) = (false, false);
    let mut wrote_after = false;
    for _ in 0..ROUNDS {
        if v.service_requests().unwrap().flush_tlb {
            tlb = false;
        }
        let exit = {
            let Ok(g) = v.enter_guest() else { continue };
            let mut present = false;
            if !tlb {
                match mmu.walk(&g) {
                    HwWalk::Translated { perms, .. } => {
                        tlb = perms.contains(Access::WRITE);
                        refilled = faulted;
                    }
                    HwWalk::Violation { present: p, .. } => present = p,
                    other => panic!("the hardware walk of the logged page: {other:?}"),
                }
            }
            // Two guest writes through the TLB, unless the kick is noticed first; a write with
            // no writable translation exits for its fault.
            let mut fault = None;
            for _ in 0..2 {
                if g.requests_pending() {
                    break;
                }
                if !tlb {
                    fault = Some(present);
                    break;
                }
                let after = collected.load(Ordering::Acquire);
                match (after, refilled) {
                    (false, _) => c.saw(WROTE_BEFORE),
                    (true, true) => c.saw(WROTE_AFTER),
                    // Only with a missing flush: the entry from before the collection.
                    (true, false) => {}
                }
                wrote_after |= after;
            }
            fault
        };
        if let Some(present) = exit {
            mmu.write_fault(v, present);
            faulted = true;
        }
    }
    wrote_after
}

/// One model: `mmu` in `mode` from `start`, with `bugs`.
fn dirty_log(mmu: Mmu, mode: DirtyLogMode, start: Start, bugs: BugSet) -> Coverage {
    let cov = Coverage::default();
    let c = cov.clone();
    model(move || {
        c.execution();
        let (vm, mut v) = setup(mmu, mode, start, bugs);
        let collected = Arc::new(AtomicBool::new(false));
        let t = {
            let (collected, c) = (collected.clone(), c.clone());
            thread::spawn(move || vcpu_writes(mmu, &mut v, &collected, &c))
        };
        let first = vm.get_dirty_log(AsId(0), SlotId(LOG_SLOT)).unwrap();
        if mode.is_manual() {
            // Manual mode: the GET cleared nothing; the CLEAR of what it returned is the
            // collection.
            vm.clear_dirty_log(AsId(0), SlotId(LOG_SLOT), 0, 1, &first).unwrap();
        }
        collected.store(true, Ordering::Release);
        let wrote_after = t.join().unwrap();
        assert_eq!(first, [1], "the write fault (or \"initially set\") marked the page");
        let next = vm.get_dirty_log(AsId(0), SlotId(LOG_SLOT)).unwrap();
        assert!(
            !wrote_after || next == [1],
            "VIOLATION: a guest write made after the collection ({mmu:?}, {mode:?}, {start:?}) \
             returned is in no later KVM_GET_DIRTY_LOG (next {next:?}): it went through a writable \
             translation of an unmarked page: a lost dirty page"
        );
    });
    cov
}

const BOTH_WRITES: [&str; 2] = [WROTE_BEFORE, WROTE_AFTER];

#[test]
fn loom_dirty_log_get_flushes_before_it_returns() {
    dirty_log(Mmu::Tdp, DirtyLogMode::Auto, Start::Writable, BugSet::NONE).expect(&BOTH_WRITES);
}

#[test]
fn loom_dirty_log_get_vs_write_fault() {
    dirty_log(Mmu::Tdp, DirtyLogMode::Auto, Start::Unmapped, BugSet::NONE).expect(&BOTH_WRITES);
}

#[test]
fn loom_dirty_log_manual_clear_flushes_before_it_returns() {
    dirty_log(Mmu::Tdp, DirtyLogMode::Manual, Start::Writable, BugSet::NONE).expect(&BOTH_WRITES);
}

#[test]
fn loom_dirty_log_manual_clear_vs_write_fault() {
    dirty_log(Mmu::Tdp, DirtyLogMode::Manual, Start::Unmapped, BugSet::NONE).expect(&BOTH_WRITES);
}

#[test]
fn loom_dirty_log_shadow_manual_clear_flushes_before_it_returns() {
    dirty_log(Mmu::Shadow, DirtyLogMode::Manual, Start::Writable, BugSet::NONE)
        .expect(&BOTH_WRITES);
}

#[test]
fn loom_dirty_log_shadow_manual_clear_vs_write_fault() {
    dirty_log(Mmu::Shadow, DirtyLogMode::Manual, Start::Unmapped, BugSet::NONE)
        .expect(&BOTH_WRITES);
}

#[test]
fn loom_dirty_log_initially_set_clear_protects_a_leaf_never_protected() {
    dirty_log(Mmu::Tdp, DirtyLogMode::InitiallySet, Start::LoggingStartedLive, BugSet::NONE)
        .expect(&BOTH_WRITES);
}

#[test]
fn loom_dirty_log_shadow_initially_set_clear_protects_a_leaf_never_protected() {
    dirty_log(Mmu::Shadow, DirtyLogMode::InitiallySet, Start::LoggingStartedLive, BugSet::NONE)
        .expect(&BOTH_WRITES);
}

/// The models have teeth: without the flush after the re-protect, the vCPU keeps writing.
#[cfg(feature = "historical-bugs")]
fn assert_catches_dirty_log_no_flush(mmu: Mmu, mode: DirtyLogMode) {
    let bugs = BugSet::only(vmmu::bugs::Bug::DirtyLogNoFlush);
    let start = match mode {
        DirtyLogMode::InitiallySet => Start::LoggingStartedLive,
        _ => Start::Writable,
    };
    let caught = loom_common::violation(|| {
        dirty_log(mmu, mode, start, bugs);
    });
    assert!(caught, "{mmu:?} {mode:?}: missed dirty-log-no-flush");
}

#[cfg(feature = "historical-bugs")]
#[test]
fn loom_dirty_log_initially_set_catches_dirty_log_no_flush() {
    assert_catches_dirty_log_no_flush(Mmu::Tdp, DirtyLogMode::InitiallySet);
}

#[cfg(feature = "historical-bugs")]
#[test]
fn loom_dirty_log_catches_dirty_log_no_flush() {
    assert_catches_dirty_log_no_flush(Mmu::Tdp, DirtyLogMode::Auto);
}

#[cfg(feature = "historical-bugs")]
#[test]
fn loom_dirty_log_manual_catches_dirty_log_no_flush() {
    assert_catches_dirty_log_no_flush(Mmu::Tdp, DirtyLogMode::Manual);
}

#[cfg(feature = "historical-bugs")]
#[test]
fn loom_dirty_log_shadow_manual_catches_dirty_log_no_flush() {
    assert_catches_dirty_log_no_flush(Mmu::Shadow, DirtyLogMode::Manual);
}
