//! loom models of the MMU's fault paths racing memslot updates and zaps, with the real code
//! (`Vm`, `Vcpu`, `MmuCore`, `TdpMmu`, `Memslots`, `TestHost`) through the sync shim. Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p vmmu --release
//! --features historical-bugs --test loom_mmu` (`scripts/test` does).
//!
//! Each model is a function of the injected bugs. `*_holds` runs it with no bug and must pass;
//! `*_catches_*` (feature `historical-bugs`) runs it with one bug and asserts that loom finds an
//! interleaving where the model's property fails (a panic whose message contains
//! `VIOLATION`; any other panic is re-raised). `*_invariant_test_*` does the same for a bug
//! that cannot cause harm in this design (why: its doc in `src/bugs.rs`): the model checks the
//! fix's invariant, not an access. `tests/bugs_caught.rs` runs a deterministic check per bug
//! (`tests/catchers`).
//!
//! Sizes are tiny on purpose: one vCPU, one address space, EPT, a test host with 8-12 table
//! frames, at most two updates per model; the preemption bound is `LOOM_MAX_PREEMPTIONS`
//! (2 when unset). Every model runs in well under a second in release.
#![cfg(loom)]

mod loom_common;

use loom_common::model;

use loom::sync::atomic::AtomicBool;
use loom::thread;
use std::panic::catch_unwind;
use vmmu::bugs::BugSet;
use vmmu::fault::{EmulateSource, FaultOutcome};
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::spte::FormatKind;
use vmmu::sync::{Arc, Ordering};
use vmmu::tdp::{hw_walk, HwWalk};
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, AsId, FaultAccess, Generation, Gfn, Gpa, Level};

/// The gfn the models fight over, and a neighbour in the same last-level table.
const X: u64 = 0x1234;
const Y: u64 = X + 1;
/// Host RAM: one page at this host address, frame = hva >> 12.
const RAM_HVA: u64 = 0x4000_0000;

fn vm_with(bugs: BugSet, frames: usize, generation_base: u64) -> (Vm<TestHost>, Arc<TestHost>) {
    vm_on(bugs, TestHost::new(frames), 1, generation_base)
}

/// An EPT VM with one address space and `max_vcpus` vCPUs on `host`, with the host RAM page
/// mapped.
fn vm_on(
    bugs: BugSet,
    host: TestHost,
    max_vcpus: usize,
    generation_base: u64,
) -> (Vm<TestHost>, Arc<TestHost>) {
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.max_vcpus = max_vcpus;
    cfg.nr_address_spaces = 1;
    cfg.generation_base = generation_base;
    cfg.bugs = bugs;
    let host = Arc::new(host);
    host.map(RAM_HVA, 0x1000, RAM_HVA >> 12, Level::L4K, true);
    (Vm::new(cfg, host.clone()).unwrap(), host)
}

fn vm(bugs: BugSet) -> (Vm<TestHost>, Arc<TestHost>) {
    vm_with(bugs, 8, 0)
}

/// A one-page slot 0 at gfn `gfn` backed by the host RAM page (size 0: delete).
fn slot_at(gfn: u64, pages: u64) -> UserspaceMemoryRegion {
    UserspaceMemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: gfn << 12,
        memory_size: pages << 12,
        userspace_addr: RAM_HVA,
    }
}

fn gpa(gfn: u64) -> Gpa {
    Gpa(gfn << 12)
}

/// A vCPU with its root loaded.
fn vcpu(vm: &Vm<TestHost>) -> Vcpu<TestHost> {
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    v
}

/// Whether running `m(bugs)` makes loom report a property violation. Other panics (a model
/// that cannot run, loom's own limits) are re-raised, so they cannot pass for a catch.
#[allow(dead_code)]
fn violation(m: fn(BugSet), bugs: BugSet) -> bool {
    loom_common::violation(|| m(bugs))
}

/// What one guest access ended as.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Seen {
    Ram,
    Mmio(EmulateSource),
}

/// One guest access as the machine does it (service requests, enter guest mode, walk like the
/// hardware, exit, handle the fault), retried a few times. Used only sequentially.
fn access(v: &mut Vcpu<TestHost>, gfn: u64) -> Seen {
    for _ in 0..8 {
        v.service_requests().unwrap();
        let walk = match v.enter_guest() {
            Ok(g) => g.walk(gpa(gfn), Access::NONE),
            Err(_) => continue,
        };
        let o = match walk {
            HwWalk::Translated { .. } => return Seen::Ram,
            HwWalk::Violation { .. } => v.handle_ept_violation(gpa(gfn), FaultAccess::READ),
            HwWalk::Misconfig { .. } => v.handle_ept_misconfig(gpa(gfn)),
            HwWalk::Broken { dump } => panic!("broken walk {dump:?}"),
        };
        if let FaultOutcome::Emulate { source, .. } = o.unwrap() {
            return Seen::Mmio(source);
        }
    }
    panic!("access to gfn {gfn:#x} did not complete");
}

// ---------------------------------------------------------------------------------------------
// (a) A vCPU decides "MMIO" for a gfn while a memslot over it is created (the 2014 corrupt-MMIO
// race, ee3d1570b586, and the generation checks of 56f17dd3fbc4 / f8f559422b6c).
//
// Property: the racing fault ends as Emulate (it used the old set), Fixed (the new one) or
// Retry; and once the create has returned, an access to the gfn reaches RAM: neither the MMIO
// SPTE nor the per-vCPU cache entry made from the old set may hit any more. KVM's create zaps
// nothing, so only the generation protects this.
//
// Note: the real fault path reads the memslot set once and takes the generation from that set,
// so `no-second-increment` cannot mix "decision from the old set" with "generation of the new
// one" here; `loom_memslot.rs` catches that bug with a reader that reads the set twice, as
// KVM's `kvm_memslots()` callers did.
// ---------------------------------------------------------------------------------------------

fn create_over_mmio(bugs: BugSet) {
    model(move || {
        let (vm, _host) = vm(bugs);
        let mut v = vcpu(&vm);
        let t = thread::spawn(move || {
            let o = v.handle_ept_violation(gpa(X), FaultAccess::READ);
            (v, o)
        });
        vm.set_memory_region(&slot_at(X, 1)).unwrap();
        let (mut v, o) = t.join().unwrap();
        assert!(
            matches!(
                o,
                Ok(FaultOutcome::Emulate { .. } | FaultOutcome::Fixed | FaultOutcome::Retry(_))
            ),
            "VIOLATION: racing fault ended as {o:?}"
        );
        let seen = access(&mut v, X);
        assert_eq!(seen, Seen::Ram, "VIOLATION: after the create returned, gfn {X:#x} is {seen:?}");
    });
}

#[test]
fn create_over_mmio_holds() {
    create_over_mmio(BugSet::NONE);
}

#[cfg(feature = "historical-bugs")]
#[test]
fn create_over_mmio_catches_mmio_spte_ignores_gen() {
    let b = BugSet::only(vmmu::bugs::Bug::MmioSpteIgnoresGen);
    assert!(violation(create_over_mmio, b), "missed mmio-spte-ignores-gen");
}

#[cfg(feature = "historical-bugs")]
#[test]
fn create_over_mmio_catches_vcpu_cache_without_gen() {
    let b = BugSet::only(vmmu::bugs::Bug::VcpuCacheWithoutGen);
    assert!(violation(create_over_mmio, b), "missed vcpu-cache-without-gen");
}

// ---------------------------------------------------------------------------------------------
// (a2) One vCPU's accesses stay in order across a create: once it reached the new slot's RAM at
// X, its next access to Y in the same new slot must not be answered as MMIO from the old slots
// (the MMIO SPTE or the per-vCPU cache entry Y got before the create). In KVM the generation
// the fast paths compare lives in the set the vCPU reaches; vmmu's fast paths read a mirror of
// it, which must say "in progress" before the new set is reachable (found by an audit: it was
// stored just after, so the vCPU could read the old final generation in between).
// ---------------------------------------------------------------------------------------------

fn new_then_old(bugs: BugSet) {
    model(move || {
        let (vm, host) = vm(bugs);
        host.map(RAM_HVA + 0x1000, 0x1000, (RAM_HVA >> 12) + 1, Level::L4K, true);
        let mut v = vcpu(&vm);
        assert_eq!(access(&mut v, Y), Seen::Mmio(EmulateSource::SlowPathMmio), "setup");
        let t = thread::spawn(move || {
            let x = access(&mut v, X);
            let y = (x == Seen::Ram).then(|| access(&mut v, Y));
            (v, x, y)
        });
        let two_pages = UserspaceMemoryRegion { memory_size: 0x2000, ..slot_at(X, 1) };
        vm.set_memory_region(&two_pages).unwrap();
        let (_v, x, y) = t.join().unwrap();
        assert!(
            !matches!((x, y), (Seen::Ram, Some(Seen::Mmio(_)))),
            "VIOLATION: gfn {X:#x} reached the new slot's RAM, then gfn {Y:#x} of the same slot \
             was emulated as MMIO ({y:?})"
        );
    });
}

#[test]
fn new_then_old_holds() {
    new_then_old(BugSet::NONE);
}

// ---------------------------------------------------------------------------------------------
// (b) The per-vCPU MMIO cache fills while an update is in progress (2019, ddfd1730fd82 "Do not
// cache MMIO accesses while memslots are in flux").
//
// Property: the per-vCPU cache never holds an entry tagged with an in-progress generation, the
// invariant the fix introduced. (Here the tag is the full 64-bit generation of the set the
// decision was made on, so such an entry could not hit after the window closes; KVM's rule is
// still that nothing decided inside the window is cached, and this model checks exactly that.)
// ---------------------------------------------------------------------------------------------

fn cache_fill_during_update(bugs: BugSet) {
    model(move || {
        let (vm, _host) = vm(bugs);
        let mut v = vcpu(&vm);
        let t = thread::spawn(move || {
            let o = v.handle_ept_violation(gpa(X), FaultAccess::READ);
            (v, o)
        });
        // An unrelated create: gfn X stays MMIO throughout.
        vm.set_memory_region(&slot_at(0x10, 1)).unwrap();
        let (v, o) = t.join().unwrap();
        assert!(matches!(o, Ok(FaultOutcome::Emulate { .. })), "VIOLATION: fault ended as {o:?}");
        if let Some(g) = v.mmio_cache().generation() {
            assert!(!g.in_progress(), "VIOLATION: cached MMIO info under in-progress {g:?}");
        }
    });
}

#[test]
fn cache_fill_during_update_holds() {
    cache_fill_during_update(BugSet::NONE);
}

/// An invariant test, not a catcher: `cache-while-in-progress` cannot cause harm in this design
/// (`src/bugs.rs`), so this checks that the fix's invariant breaks with the bug.
#[cfg(feature = "historical-bugs")]
#[test]
fn cache_fill_during_update_invariant_test_breaks_with_cache_while_in_progress() {
    let b = BugSet::only(vmmu::bugs::Bug::CacheWhileInProgress);
    assert!(violation(cache_fill_during_update, b), "missed cache-while-in-progress");
}

// ---------------------------------------------------------------------------------------------
// (c) The lockless MMIO walk races a zap of its table (the 2011 MMIO series, ce88decffd17:
// "SPTE zapped/changed concurrently: let the CPU fault again").
//
// Property: a misconfiguration exit on an MMIO SPTE whose last-level table is being zapped and
// freed ends as Emulate (the walk saw the SPTE) or Retry (it saw the zapped entry), never as an
// error; and no walk reads a freed table page (the grace period before freeing; the test host
// counts lookups of freed frames).
// ---------------------------------------------------------------------------------------------

/// A misconfiguration exit on `target` (one of the MMIO gfns `X..=X + ENTRIES`) raced against a
/// zap of their 2 MiB, which unlinks and frees the level-1 table; `warm` first takes X's fast
/// path once, so the vCPU's leaf-table cache holds that table when `target` faults.
fn misconfig_vs_zap(bugs: BugSet, warm: bool, target: u64) {
    model(move || {
        let (vm, host) = vm(bugs);
        let mut v = vcpu(&vm);
        for g in X..=X + vmmu::vcpu::mmio_cache::ENTRIES as u64 {
            // MMIO SPTEs for X and the next gfns, one more than the per-vCPU cache holds: X +
            // ENTRIES takes X's entry of the direct-mapped cache, so X needs the walk.
            let o = v.handle_ept_violation(gpa(g), FaultAccess::READ).unwrap();
            assert!(matches!(o, FaultOutcome::Emulate { .. }), "setup: {o:?}");
        }
        if warm {
            // X's fast path walks and keeps the level-1 table; it takes back its entry of the
            // per-vCPU cache from X + ENTRIES, which then needs the walk.
            let o = v.handle_ept_misconfig(gpa(X)).unwrap();
            assert!(
                matches!(o, FaultOutcome::Emulate { source: EmulateSource::MmioSpteHit, .. }),
                "setup: {o:?}"
            );
        }
        let t = thread::spawn(move || v.handle_ept_misconfig(gpa(target)));
        // Zap the whole 2 MiB region: the last-level table is unlinked and freed.
        let base = X & !511;
        vm.zap_gfn_range_for_tests(AsId(0), Gfn(base), Gfn(base + 512));
        let o = t.join().unwrap();
        assert!(
            matches!(o, Ok(FaultOutcome::Emulate { .. } | FaultOutcome::Retry(_))),
            "VIOLATION: a walk racing a zap ended as {o:?}"
        );
        vm.reclaim();
        assert_eq!(host.use_after_free(), 0, "VIOLATION: a walk read a freed table page");
    });
}

fn walk_vs_zap(bugs: BugSet) {
    misconfig_vs_zap(bugs, false, X);
}

#[test]
fn walk_vs_zap_holds() {
    walk_vs_zap(BugSet::NONE);
}

#[cfg(feature = "historical-bugs")]
#[test]
fn walk_vs_zap_catches_zapped_spte_is_misconfig() {
    let b = BugSet::only(vmmu::bugs::Bug::ZappedSpteIsMisconfig);
    assert!(violation(walk_vs_zap, b), "missed zapped-spte-is-misconfig");
}

// ---------------------------------------------------------------------------------------------
// (c2) The fast path's leaf-table cache (issue 17, `mmu_core/walk.rs`) races a zap that unlinks and
// frees the cached table.
//
// Property: the fault ends as Emulate or Retry, and its read of the cached table never touches
// a freed page (debug and loom builds look the frame up on every hit; the test host counts a
// lookup of a freed frame). Caught: `leaf-cache-ignores-epoch` (the hit skips the epoch compare
// and reads the table after the zap freed it).
// ---------------------------------------------------------------------------------------------

fn leaf_cache_vs_zap(bugs: BugSet) {
    misconfig_vs_zap(bugs, true, X + vmmu::vcpu::mmio_cache::ENTRIES as u64);
}

#[test]
fn leaf_cache_vs_zap_holds() {
    leaf_cache_vs_zap(BugSet::NONE);
}

#[cfg(feature = "historical-bugs")]
#[test]
fn leaf_cache_vs_zap_catches_leaf_cache_ignores_epoch() {
    let b = BugSet::only(vmmu::bugs::Bug::LeafCacheIgnoresEpoch);
    assert!(violation(leaf_cache_vs_zap, b), "missed leaf-cache-ignores-epoch");
}

// ---------------------------------------------------------------------------------------------
// (c3) The same hit on a type-stable host (`FrameAllocator::type_stable_tables`), which takes
// no table read section: a sequence check of the table epoch around the entry read instead
// (`mmu_core/walk.rs`, "Type-stable hosts"). The zap unlinks and frees the cached table (its grace
// period does not wait for the hit), and a second vCPU's fault in the next 2 MiB reuses the
// frame for a new level-1 table holding an MMIO SPTE at the index the hit reads.
//
// Property: the racing fault ends as Emulate or Retry, and it fills the vCPU's MMIO cache for
// its own gfn only. Afterwards the vCPU's first access of the other 2 MiB's gfn must not be a
// per-vCPU cache hit: that vCPU never faulted there, so such a hit is a decision read from the
// reused frame, a table of another 2 MiB (a wrong translation). Caught: the hit without its
// second epoch load (`vmmu::mmu_core::loom_knobs::SKIP_EPOCH_RECHECK`), and `leaf-cache-ignores-epoch`.
// ---------------------------------------------------------------------------------------------

/// The gfn the type-stable hit races for, and the gfn at the same index of the next 2 MiB.
const STABLE_TARGET: u64 = X + vmmu::vcpu::mmio_cache::ENTRIES as u64;
const STABLE_REUSER: u64 = STABLE_TARGET + 512;

/// The set-up of the models that race a leaf-table cache hit: vCPU `v` gets MMIO SPTEs for X and
/// its neighbours up to [`STABLE_TARGET`], one more than the per-vCPU cache holds (as in
/// `misconfig_vs_zap`), then X's fast path, which keeps the level-1 table in the leaf-table cache
/// and takes the target's per-vCPU cache entry back to X, so the target's fault needs the hit.
/// Returns `v` and a second vCPU.
fn leaf_cache_warm(vm: &Vm<TestHost>) -> (Vcpu<TestHost>, Vcpu<TestHost>) {
    let mut v = vcpu(vm);
    let other = vcpu(vm);
    for g in X..=STABLE_TARGET {
        let o = v.handle_ept_violation(gpa(g), FaultAccess::READ).unwrap();
        assert!(matches!(o, FaultOutcome::Emulate { .. }), "setup: {o:?}");
    }
    let o = v.handle_ept_misconfig(gpa(X)).unwrap();
    assert!(
        matches!(o, FaultOutcome::Emulate { source: EmulateSource::MmioSpteHit, .. }),
        "setup: {o:?}"
    );
    (v, other)
}

fn type_stable_hit_vs_zap_and_reuse(bugs: BugSet) {
    model(move || {
        let (vm, _host) = vm_on(bugs, TestHost::new_type_stable(8), 2, 0);
        let (mut v, mut other) = leaf_cache_warm(&vm);
        let t = thread::spawn(move || {
            let o = v.handle_ept_misconfig(gpa(STABLE_TARGET));
            (v, o)
        });
        let base = X & !511;
        vm.zap_gfn_range_for_tests(AsId(0), Gfn(base), Gfn(base + 512));
        vm.reclaim();
        // The freed frame is the next one the host hands out: the reuser's level-1 table.
        let o = other.handle_ept_violation(gpa(STABLE_REUSER), FaultAccess::READ).unwrap();
        assert!(matches!(o, FaultOutcome::Emulate { .. }), "reuser: {o:?}");
        let (mut v, o) = t.join().unwrap();
        assert!(
            matches!(o, Ok(FaultOutcome::Emulate { .. } | FaultOutcome::Retry(_))),
            "VIOLATION: a type-stable hit racing a zap ended as {o:?}"
        );
        let o = v.handle_ept_misconfig(gpa(STABLE_REUSER));
        assert!(
            !matches!(o, Ok(FaultOutcome::Emulate { source: EmulateSource::VcpuCacheHit, .. })),
            "VIOLATION: gfn {STABLE_REUSER:#x} answered from a cache entry the fault on \
             {STABLE_TARGET:#x} made from the reused frame ({o:?})"
        );
    });
}

#[test]
fn type_stable_hit_vs_zap_and_reuse_holds() {
    let _k = KNOB.lock().unwrap_or_else(|e| e.into_inner());
    type_stable_hit_vs_zap_and_reuse(BugSet::NONE);
}

/// The knob is process-wide and changes only type-stable hosts: the tests of this model hold
/// this lock, so none runs while another has it on.
static KNOB: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether the model finds a violation with `knob` on.
fn type_stable_violation_with(knob: &std::sync::atomic::AtomicBool) -> bool {
    use std::sync::atomic::Ordering as StdOrdering;
    let _k = KNOB.lock().unwrap_or_else(|e| e.into_inner());
    knob.store(true, StdOrdering::Relaxed);
    let caught = catch_unwind(|| violation(type_stable_hit_vs_zap_and_reuse, BugSet::NONE));
    knob.store(false, StdOrdering::Relaxed);
    caught.unwrap_or_else(|p| std::panic::resume_unwind(p))
}

#[test]
fn type_stable_hit_vs_zap_and_reuse_fails_without_the_epoch_recheck() {
    let caught = type_stable_violation_with(&vmmu::mmu_core::loom_knobs::SKIP_EPOCH_RECHECK);
    assert!(caught, "the model passes without the second epoch load");
}

#[test]
fn type_stable_hit_vs_zap_and_reuse_fails_with_a_relaxed_entry_load() {
    let caught = type_stable_violation_with(&vmmu::mmu_core::loom_knobs::RELAXED_ENTRY_LOAD);
    assert!(caught, "the model passes with a Relaxed entry load");
}

#[cfg(feature = "historical-bugs")]
#[test]
fn type_stable_hit_vs_zap_and_reuse_catches_leaf_cache_ignores_epoch() {
    let _k = KNOB.lock().unwrap_or_else(|e| e.into_inner());
    let b = BugSet::only(vmmu::bugs::Bug::LeafCacheIgnoresEpoch);
    assert!(violation(type_stable_hit_vs_zap_and_reuse, b), "missed leaf-cache-ignores-epoch");
}

// ---------------------------------------------------------------------------------------------
// (c4) The harm of a leaf-table cache hit on a table that was unlinked, freed and reused: the
// models above catch `leaf-cache-ignores-epoch` by what the hit read (a freed frame, a cache
// entry for another 2 MiB's gfn), which here answers right by chance (every gfn involved is
// MMIO, and an MMIO SPTE names its own gfn). This one makes the racing gfn RAM first: the zap
// unlinks and frees the cached table, a slot is created at the racing gfn, and a second vCPU's
// fault in the next 2 MiB reuses the frame for a level-1 table with an MMIO SPTE of the new
// generation at the index the hit reads. On both kinds of host (read sections, type-stable).
//
// Property: an exit on the racing gfn that began after the create returned is never emulated
// as MMIO (it is RAM; an emulation is a RAM gfn answered from another 2 MiB's MMIO SPTE).
// ---------------------------------------------------------------------------------------------

fn leaf_cache_hit_vs_reuse_over_new_ram(bugs: BugSet, type_stable: bool) {
    model(move || {
        let host = if type_stable { TestHost::new_type_stable(8) } else { TestHost::new(8) };
        let (vm, _host) = vm_on(bugs, host, 2, 0);
        let (mut v, mut other) = leaf_cache_warm(&vm);
        let created = Arc::new(AtomicBool::new(false));
        let t = {
            let created = created.clone();
            thread::spawn(move || {
                let after = created.load(Ordering::Acquire);
                (after, v.handle_ept_misconfig(gpa(STABLE_TARGET)))
            })
        };
        let base = X & !511;
        vm.zap_gfn_range_for_tests(AsId(0), Gfn(base), Gfn(base + 512));
        vm.reclaim();
        vm.set_memory_region(&slot_at(STABLE_TARGET, 1)).unwrap();
        created.store(true, Ordering::Release);
        // The freed frame is the next one the host hands out: the reuser's level-1 table.
        let o = other.handle_ept_violation(gpa(STABLE_REUSER), FaultAccess::READ).unwrap();
        assert!(matches!(o, FaultOutcome::Emulate { .. }), "reuser: {o:?}");
        let (after, o) = t.join().unwrap();
        assert!(
            matches!(
                o,
                Ok(FaultOutcome::Emulate { .. } | FaultOutcome::Retry(_) | FaultOutcome::Fixed)
            ),
            "VIOLATION: a leaf-table cache hit racing a zap ended as {o:?}"
        );
        assert!(
            !(after && matches!(o, Ok(FaultOutcome::Emulate { .. }))),
            "VIOLATION: an exit on gfn {STABLE_TARGET:#x} that began after the create made it \
             RAM was emulated as MMIO ({o:?}): answered from the MMIO SPTE of gfn \
             {STABLE_REUSER:#x} in the reused frame, another 2 MiB's table"
        );
    });
}

fn leaf_cache_hit_vs_reuse_over_new_ram_sections(bugs: BugSet) {
    leaf_cache_hit_vs_reuse_over_new_ram(bugs, false);
}

fn leaf_cache_hit_vs_reuse_over_new_ram_type_stable(bugs: BugSet) {
    leaf_cache_hit_vs_reuse_over_new_ram(bugs, true);
}

#[test]
fn leaf_cache_hit_vs_reuse_over_new_ram_holds() {
    let _k = KNOB.lock().unwrap_or_else(|e| e.into_inner());
    leaf_cache_hit_vs_reuse_over_new_ram_sections(BugSet::NONE);
    leaf_cache_hit_vs_reuse_over_new_ram_type_stable(BugSet::NONE);
}

#[cfg(feature = "historical-bugs")]
#[test]
fn leaf_cache_hit_vs_reuse_over_new_ram_catches_leaf_cache_ignores_epoch() {
    let _k = KNOB.lock().unwrap_or_else(|e| e.into_inner());
    let b = BugSet::only(vmmu::bugs::Bug::LeafCacheIgnoresEpoch);
    assert!(
        violation(leaf_cache_hit_vs_reuse_over_new_ram_sections, b),
        "missed leaf-cache-ignores-epoch (host with table read sections)"
    );
    assert!(
        violation(leaf_cache_hit_vs_reuse_over_new_ram_type_stable, b),
        "missed leaf-cache-ignores-epoch (type-stable host)"
    );
}

// ---------------------------------------------------------------------------------------------
// (d) A fault on a root that `zap_all_fast` obsoletes (2021, a955cad84cda "Retry page fault if
// root is invalidated by memslot update"), and on a root without a page (18c841e1f411 "Retry
// page fault if MMU reload is pending and root has no sp").
//
// Property: a fault that begins after `zap_all_fast` returned (and before the vCPU serviced its
// requests) retries; and once both are done, the root maps nothing, TDP or pageless (a fault that
// was in flight did not install into it after it was zapped, and the zap reached it).
// ---------------------------------------------------------------------------------------------

fn fault_vs_zap_all_fast(bugs: BugSet, pageless: bool) {
    model(move || {
        let (vm, host) = vm_with(bugs, 12, 0);
        vm.set_memory_region(&slot_at(X, 1)).unwrap();
        let mut v = vcpu(&vm);
        if pageless {
            v.load_pageless_root().unwrap();
        }
        let root = v.root().unwrap().clone();
        let zapped = Arc::new(AtomicBool::new(false));
        let t = {
            let zapped = zapped.clone();
            thread::spawn(move || {
                let after = zapped.load(Ordering::Acquire);
                let o = v.handle_ept_violation(gpa(X), FaultAccess::READ);
                (v, after, o)
            })
        };
        vm.zap_all_fast();
        zapped.store(true, Ordering::Release);
        let (v, after, o) = t.join().unwrap();
        if after {
            assert!(
                matches!(o, Ok(FaultOutcome::Retry(_))),
                "VIOLATION: a fault after zap_all_fast on its obsoleted root ended as {o:?}"
            );
        } else {
            assert!(
                matches!(o, Ok(FaultOutcome::Fixed | FaultOutcome::Retry(_))),
                "VIOLATION: racing fault ended as {o:?}"
            );
        }
        // Pageless roots too: every zap reaches every root (issue 11, defect 2).
        let fmt = vm.core().config().format;
        // SAFETY: both threads have joined; `v` keeps `root` (and its pages) until dropped below.
        let w = unsafe { hw_walk(&fmt, &*host, root.pfn(), root.level(), Gfn(X), Access::NONE) };
        assert!(
            !matches!(w, HwWalk::Translated { .. }),
            "VIOLATION: the {:?} root maps gfn {X:#x} after zap_all_fast: {w:?}",
            root.kind()
        );
        drop(v);
    });
}

fn fault_vs_zap_all_fast_tdp(bugs: BugSet) {
    fault_vs_zap_all_fast(bugs, false)
}

fn fault_vs_zap_all_fast_pageless(bugs: BugSet) {
    fault_vs_zap_all_fast(bugs, true)
}

#[test]
fn fault_vs_zap_all_fast_holds() {
    fault_vs_zap_all_fast_tdp(BugSet::NONE);
}

#[test]
fn fault_vs_zap_all_fast_pageless_holds() {
    fault_vs_zap_all_fast_pageless(BugSet::NONE);
}

/// An invariant test, not a catcher: `no-stale-root-check` cannot cause harm in this design
/// (`src/bugs.rs`), so this checks that the fix's invariants (a fault retries on an obsoleted
/// root; the obsoleted root maps nothing) break with the bug.
#[cfg(feature = "historical-bugs")]
#[test]
fn fault_vs_zap_all_fast_invariant_test_breaks_with_no_stale_root_check() {
    let b = BugSet::only(vmmu::bugs::Bug::NoStaleRootCheck);
    assert!(violation(fault_vs_zap_all_fast_tdp, b), "missed no-stale-root-check (TDP root)");
    assert!(
        violation(fault_vs_zap_all_fast_pageless, b),
        "missed no-stale-root-check (root without a page)"
    );
}

// ---------------------------------------------------------------------------------------------
// (e) The MMIO-generation wrap hook against a vCPU checking a pre-wrap MMIO SPTE (2019,
// 152482580a1b "Call kvm_arch_memslots_updated() before updating memslots").
//
// Setup: the generation starts at 2^19 - 1, so the next update's final generation, 2^19, has
// MMIO bits 0 and the hook zaps everything. An MMIO SPTE for X with generation bits 0 stands for
// one made 2^19 updates earlier (written through the test hook; making it for real would take
// half a million updates). The update creates RAM over X.
//
// Property: the racing misconfiguration exit on X never hits that pre-wrap SPTE (it matches only
// the post-wrap generation, and the wrap zap must be done before that generation is visible).
// ---------------------------------------------------------------------------------------------

fn wrap_hook_vs_prewrap_spte(bugs: BugSet) {
    model(move || {
        let (vm, _host) = vm_with(bugs, 8, (1 << 19) - 1);
        let mut v = vcpu(&vm);
        let o = v.handle_ept_violation(gpa(X), FaultAccess::READ).unwrap();
        assert!(matches!(o, FaultOutcome::Emulate { .. }), "setup: {o:?}");
        {
            let root = v.root().unwrap();
            let codec = vm.core().config().codec;
            // SAFETY: the entry is used only before the zap this model starts below frees anything.
            let e =
                unsafe { vm.tdp().expect("a TDP VM").entry_for_tests(root, Gfn(X), Level::L4K) }
                    .unwrap();
            e.store(codec.make(Gfn(X), Generation::from_raw(0), Access::ALL), Ordering::Release);
        }
        // Fill the per-vCPU cache with the next gfns (as many as it holds): X + ENTRIES takes
        // X's entry of the direct-mapped cache, so X needs the walk.
        for g in Y..Y + vmmu::vcpu::mmio_cache::ENTRIES as u64 {
            let o = v.handle_ept_violation(gpa(g), FaultAccess::READ).unwrap();
            assert!(matches!(o, FaultOutcome::Emulate { .. }), "setup: {o:?}");
        }
        let t = thread::spawn(move || {
            let o = v.handle_ept_misconfig(gpa(X));
            (v, o)
        });
        vm.set_memory_region(&slot_at(X, 1)).unwrap();
        assert_eq!(vm.stats().mmio_gen_wraps, 1, "setup: the create must wrap");
        let (_v, o) = t.join().unwrap();
        assert!(
            !matches!(o, Ok(FaultOutcome::Emulate { source: EmulateSource::MmioSpteHit, .. })),
            "VIOLATION: a pre-wrap MMIO SPTE hit under the post-wrap generation: {o:?}"
        );
        assert!(o.is_ok(), "VIOLATION: racing exit ended as {o:?}");
    });
}

#[test]
fn wrap_hook_vs_prewrap_spte_holds() {
    wrap_hook_vs_prewrap_spte(BugSet::NONE);
}

#[cfg(feature = "historical-bugs")]
#[test]
fn wrap_hook_vs_prewrap_spte_catches_wrap_hook_after_publish() {
    let b = BugSet::only(vmmu::bugs::Bug::WrapHookAfterPublish);
    assert!(violation(wrap_hook_vs_prewrap_spte, b), "missed wrap-hook-after-publish");
}

#[cfg(feature = "historical-bugs")]
#[test]
fn wrap_hook_vs_prewrap_spte_catches_no_second_increment() {
    let b = BugSet::only(vmmu::bugs::Bug::NoSecondIncrement);
    assert!(violation(wrap_hook_vs_prewrap_spte, b), "missed no-second-increment");
}
