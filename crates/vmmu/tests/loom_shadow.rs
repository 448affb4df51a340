//! loom models of the shadow-paging MMU (issue 13 point 11), with the real `Vm`, `Vcpu` and
//! `ShadowMmu` through the sync shim, guest page tables written into the test host's guest RAM,
//! and two threads: a vCPU and the VM side.
//!
//! 1. **The lockless shadow walk against zapping** (`lockless_walk_vs_*`): a vCPU handles an
//!    RSVD #PF on a GVA whose MMIO SPTE exists (its GVA cache entry dropped, so the fault takes
//!    the lockless walk) while the shrinker (`shrink_shadow_pages`, the same `zap_oldest` as
//!    recycling over the page limit) or `zap_all_fast` zaps the pages under it. Property: the
//!    fault's outcome is Emulate (at the MMIO address) or Retry, never an error (a zapped page is
//!    not a misconfiguration), no walk read a freed table page (`use_after_free() == 0`), and a
//!    later access is emulated as MMIO again. After the fault the vCPU re-enters guest mode
//!    (when no request is pending) and the hardware walks the shadow during the zap: it sees
//!    the MMIO SPTE or a cleared entry, and reads no freed page either (the zap's grace period
//!    kicks it out). The model must see both sides of the race (the lockless walk hits the MMIO
//!    SPTE; it finds the entry zapped) and a hardware walk. Catches `zapped-spte-is-misconfig`
//!    (with the shrinker and with `zap_all_fast`). A third variant deletes the slot that holds the
//!    guest's tables without the zap-all quirk (`zap_memslot`): the fault may also end in a
//!    guest #PF (the tables are gone) or, while the delete is in progress, on the slow path
//!    (emulated at the same device address), and afterwards nothing translates through them.
//! 2. **The special-root staleness check against zap-all** (`special_root_fault_vs_zap_all`): a
//!    PAE guest (special root: no shadow page of its own) faults on a RAM GVA, then retries the
//!    access (servicing its requests: the reload), while `zap_all_fast` runs. Property: the
//!    fault's outcome is Fixed, Spurious or Retry; once both are done, and again after one more
//!    access, no zapped page keeps a present entry and no live page is linked from a zapped or
//!    freed one (`Vm::stale_shadow_entries_for_tests`); both accesses translate to the right
//!    frame; no freed table was read. The model must see both the
//!    fault installing before the bump and the fault retrying on the pending reload request.
//!    `no-stale-root-check` does no harm here (the property holds: the fault builds below the
//!    zapped level-2 page, and the vCPU's release of the root zaps that page again before it
//!    is freed): a test pins that last line of defence down.
//! 3. **The GVA cache against a memslot create** (`gva_cache_vs_slot_create`): a vCPU has a GVA
//!    cached as MMIO (its first access was emulated on the slow path: the per-vCPU cache holds
//!    gva -> gfn, and an MMIO SPTE exists) while another thread creates a slot at that gfn.
//!    Property: an access that begins after the create returned reaches RAM (the new slot's
//!    frame), never an MMIO emulation from the cache or from the MMIO SPTE. The model must see
//!    racing accesses answered by the cache and by the new slot, and one that began after the
//!    create. Catches `vcpu-cache-without-gen`.
//!
//! Bounded: a 16-frame host, one guest page, one vCPU whose racing part is one fault and one
//! hardware walk (model 1), one fault and one access (model 2) or two accesses (model 3), one
//! VM-side operation, preemption bound 2 (`LOOM_MAX_PREEMPTIONS`). Each model runs in seconds.
#![cfg(loom)]

mod loom_common;

use loom_common::model;

use loom::sync::atomic::AtomicBool;
use loom::thread;
use std::collections::BTreeSet;
#[cfg(feature = "historical-bugs")]
use vmmu::bugs::Bug;
use vmmu::bugs::BugSet;
use vmmu::fault::{EmulateSource, FaultOutcome, PfErr};
use vmmu::guest::{GuestCpu, PagingMode};
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::sync::{Arc, Ordering};
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, Gpa, Gva, Level, Pfn};

const RAM_HVA: u64 = 0x4000_0000;
/// Guest RAM (slot 0): 16 pages from gpa 0.
const RAM_SIZE: u64 = 0x1_0000;
/// Host memory for the slot model 3 creates.
const NEW_HVA: u64 = 0x8000_0000;
/// A guest-physical page no slot covers (until model 3 creates one).
const MMIO_GPA: u64 = 0x10_0000;
/// The guest RAM page the PAE guest maps.
const DATA_GPA: u64 = 0x8000;
/// The 4-level guest's GVA: PML4 index 0, PDPT index 1, PD and PT index 0.
const GVA: u64 = 0x4000_0000;
/// The PAE guest's GVA: PDPTE 0, PDE 2, PTE 3.
const PAE_GVA: u64 = 0x40_3000;

/// Rounds an [`access`] may take. A round ends early without a fault when guest entry finds a
/// request posted after the round serviced them; the requests come from a finite set (a zap-all's
/// free-obsolete-roots request, the TLB flushes that its commit and the vCPU's own release of
/// its obsolete root post), so a bounded number of rounds completes every access. With
/// `LOOM_MAX_PREEMPTIONS=4` a model reached four rounds (three failed entries and a fixed fault)
/// before its read, which four rounds did not allow.
const ACCESS_ROUNDS: usize = 8;

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;

fn ram_pfn(gpa: u64) -> Pfn {
    Pfn((RAM_HVA + gpa) >> 12)
}

fn write_gpte(host: &TestHost, gpa: u64, value: u64) {
    host.write_u64(RAM_HVA + gpa, value);
}

/// A shadow VM on a 16-frame host with one RAM slot at gpa 0.
fn shadow_vm(bugs: BugSet) -> (Vm<TestHost>, Arc<TestHost>) {
    let host = Arc::new(TestHost::new(16));
    host.map(RAM_HVA, RAM_SIZE, RAM_HVA >> 12, Level::L4K, true);
    host.map(NEW_HVA, 0x1000, NEW_HVA >> 12, Level::L4K, true);
    let mut cfg = VmConfig::shadow(46).unwrap();
    cfg.max_vcpus = 1;
    cfg.bugs = bugs;
    let vm = Vm::new(cfg, host.clone()).unwrap();
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, RAM_SIZE, RAM_HVA)).unwrap();
    (vm, host)
}

/// 4-level guest tables (PML4 at gpa 0x1000, then 0x2000, 0x3000, 0x4000) mapping [`GVA`] to
/// `leaf_gpa`, user and writable. Returns CR3.
fn long4_tables(host: &TestHost, leaf_gpa: u64) -> u64 {
    write_gpte(host, 0x1000, 0x2000 | P | RW | US);
    write_gpte(host, 0x2000 + 8, 0x3000 | P | RW | US);
    write_gpte(host, 0x3000, 0x4000 | P | RW | US);
    write_gpte(host, 0x4000, leaf_gpa | P | RW | US);
    0x1000
}

fn long4_vcpu(vm: &Vm<TestHost>, cr3: u64) -> Vcpu<TestHost> {
    let mut v = vm.create_vcpu().unwrap();
    let cpu = GuestCpu::long4(cr3, 46);
    v.set_guest_cpu(cpu).unwrap();
    v
}

/// A shadow VM whose long-mode guest maps `GVA` to the device page `MMIO_GPA`, and a vCPU that
/// read it once (the slow path installed the MMIO SPTE and cached the GVA). Returns the CR3 too.
fn vcpu_after_an_mmio_read(bugs: BugSet) -> (Vm<TestHost>, Arc<TestHost>, Vcpu<TestHost>, u64) {
    let (vm, host) = shadow_vm(bugs);
    let cr3 = long4_tables(&host, MMIO_GPA);
    let mut v = long4_vcpu(&vm, cr3);
    let mmio = Gpa(MMIO_GPA);
    assert_eq!(access(&mut v, GVA), Seen::Mmio(mmio, EmulateSource::SlowPathMmio), "setup");
    (vm, host, v, cr3)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Seen {
    Ram(Pfn),
    Mmio(Gpa, EmulateSource),
}

/// One user-mode read of `gva`, as the hardware and the hypervisor do it: service requests,
/// walk the shadow in guest mode, exit on a fault and handle it; [`ACCESS_ROUNDS`] rounds at
/// most, each one's outcome kept for the message if none completes.
fn access(v: &mut Vcpu<TestHost>, gva: u64) -> Seen {
    let mut log = Vec::new();
    for _ in 0..ACCESS_ROUNDS {
        v.service_requests().unwrap();
        if v.enter_guest_mode().is_err() {
            log.push("enter failed".to_string());
            continue;
        }
        let walk = v.walk_gva(Gva(gva), Access::USER);
        v.exit_guest_mode();
        let err = match walk {
            HwWalk::Translated { pfn, .. } => return Seen::Ram(pfn),
            HwWalk::Violation { present, .. } => {
                PfErr::USER | if present { PfErr::PRESENT } else { 0 }
            }
            HwWalk::Misconfig { .. } => PfErr::USER | PfErr::RSVD | PfErr::PRESENT,
            HwWalk::Broken { dump } => panic!("broken walk {dump:?}"),
        };
        let o = v.handle_page_fault(Gva(gva), PfErr(err));
        log.push(format!("{err:#x} {o:?}"));
        match o {
            Ok(FaultOutcome::Fixed | FaultOutcome::Spurious | FaultOutcome::Retry(_)) => {}
            Ok(FaultOutcome::Emulate { gpa, source, .. }) => return Seen::Mmio(gpa, source),
            other => panic!("access to {gva:#x}: {other:?}"),
        }
    }
    panic!("access to {gva:#x} did not complete: {log:?}");
}

/// What the executions of one model saw: labels of outcomes, and how many executions ran. Std
/// types, not loom's: they outlive the executions and let a test assert that loom reached the
/// interleavings that matter (a model that never races proves nothing).
#[derive(Clone, Default)]
struct Coverage(std::sync::Arc<std::sync::Mutex<(usize, BTreeSet<String>)>>);

impl Coverage {
    fn execution(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
    }

    fn saw(&self, label: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).1.insert(label);
    }

    /// Asserts that no label seen contains `text`.
    #[cfg(feature = "historical-bugs")]
    fn expect_none(&self, text: &str) {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        assert!(!g.1.iter().any(|l| l.contains(text)), "an execution saw {text}: {:?}", g.1);
    }

    /// Asserts that every label in `want` was seen; returns the number of executions.
    fn expect(&self, want: &[&str]) -> usize {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for w in want {
            assert!(g.1.contains(*w), "no execution saw {w}; saw {:?}", g.1);
        }
        eprintln!("{} executions; outcomes {:?}", g.0, g.1);
        g.0
    }
}

/// What zaps the pages under the walk in model 1.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Zapper {
    /// `shrink_shadow_pages`: the three pages below the pinned root.
    Shrinker,
    /// `zap_all_fast`: every page.
    ZapAllFast,
    /// The delete of the slot holding the guest's tables (and the data page), without the
    /// zap-all quirk: the pages whose gfn the slot holds, the pinned root among them.
    DeleteTablesSlot,
}

/// Model 1.
fn lockless_walk_vs_zap(bugs: BugSet, zapper: Zapper) -> Coverage {
    let cov = Coverage::default();
    let c = cov.clone();
    model(move || {
        c.execution();
        let (vm, host, mut v, cr3) = vcpu_after_an_mmio_read(bugs);
        let mmio = Gpa(MMIO_GPA);
        // A MOV CR3 of the same CR3 keeps the root (and its MMIO SPTE) and drops the GVA cache:
        // the next RSVD fault takes the lockless shadow walk.
        v.load_cr3(cr3).unwrap();
        v.service_requests().unwrap();

        let t = thread::spawn(move || {
            let err = PfErr(PfErr::USER | PfErr::RSVD | PfErr::PRESENT);
            let o = v.handle_page_fault(Gva(GVA), err);
            // The guest runs again (no pending request) and the hardware walks the shadow.
            let hw = v.enter_guest_mode().is_ok().then(|| {
                let w = v.walk_gva(Gva(GVA), Access::USER);
                v.exit_guest_mode();
                w
            });
            (v, o, hw)
        });
        match zapper {
            Zapper::ZapAllFast => vm.zap_all_fast(),
            // The 3 pages below the pinned root.
            Zapper::Shrinker => assert_eq!(vm.shrink_shadow_pages(8), 3),
            Zapper::DeleteTablesSlot => {
                vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 0, RAM_HVA)).unwrap();
            }
        }
        let (mut v, o, hw) = t.join().unwrap();
        if hw.is_some() {
            c.saw("hardware walk".into());
        }
        c.saw(match &o {
            Ok(FaultOutcome::Emulate { source, .. }) => format!("Emulate({source:?})"),
            Ok(FaultOutcome::GuestPageFault { .. }) => "GuestPageFault".into(),
            Ok(o) => format!("{o:?}"),
            Err(_) => "Err".into(),
        });
        match o {
            Ok(FaultOutcome::Emulate { gpa, source: EmulateSource::MmioSpteHit, .. })
                if gpa == mmio => {}
            Ok(FaultOutcome::Retry(_)) => {}
            // Once the slot is going, the guest's tables are not readable: a #PF for the guest.
            Ok(FaultOutcome::GuestPageFault { .. }) if zapper == Zapper::DeleteTablesSlot => {}
            // While the delete is in progress the fast path sees the in-progress generation and
            // takes the slow path (KVM: RET_PF_INVALID), whose guest walk still reads the tables
            // from the set it holds: emulated at the same device address.
            Ok(FaultOutcome::Emulate { gpa, source: EmulateSource::SlowPathMmio, .. })
                if gpa == mmio && zapper == Zapper::DeleteTablesSlot => {}
            other => panic!("VIOLATION: the lockless walk under a zap gave {other:?}"),
        }
        assert!(
            matches!(hw, None | Some(HwWalk::Misconfig { .. } | HwWalk::Violation { .. })),
            "the hardware walk during the zap: {hw:?}"
        );
        assert_eq!(host.use_after_free(), 0, "VIOLATION: a walk read a freed table page");
        if zapper == Zapper::DeleteTablesSlot {
            // No slot backs the tables any more: nothing may translate through their shadow
            // pages, and the guest's own walk faults.
            v.service_requests().unwrap();
            if v.enter_guest_mode().is_ok() {
                let w = v.walk_gva(Gva(GVA), Access::USER);
                v.exit_guest_mode();
                assert!(
                    matches!(w, HwWalk::Violation { present: false, .. }),
                    "VIOLATION: a walk through the deleted slot's tables: {w:?}"
                );
            }
            let o = v.handle_page_fault(Gva(GVA), PfErr(PfErr::USER));
            assert!(matches!(o, Ok(FaultOutcome::GuestPageFault { .. })), "after: {o:?}");
        } else {
            let again = access(&mut v, GVA);
            assert!(matches!(again, Seen::Mmio(g, _) if g == mmio), "after the zap: {again:?}");
        }
        assert_eq!(host.use_after_free(), 0, "VIOLATION: a walk read a freed table page");
    });
    cov
}

/// Both sides of the race (the walk before the zap, and after it), and a hardware walk in guest
/// mode during the zap.
const MODEL1_RACE: [&str; 3] = ["Emulate(MmioSpteHit)", "Retry(ZappedUnderWalk)", "hardware walk"];

#[test]
fn lockless_walk_vs_shrinker() {
    lockless_walk_vs_zap(BugSet::NONE, Zapper::Shrinker).expect(&MODEL1_RACE);
}

#[test]
fn lockless_walk_vs_zap_all_fast() {
    lockless_walk_vs_zap(BugSet::NONE, Zapper::ZapAllFast).expect(&MODEL1_RACE);
}

/// The delete of the slot holding the guest's tables, without the zap-all quirk
/// (`ShadowMmu::zap_memslot`): the walk hits the MMIO SPTE before it, finds its page zapped
/// under it (a retry), or after it the guest's walk faults (its tables are gone); a hardware
/// walk runs meanwhile.
#[test]
fn lockless_walk_vs_zap_memslot() {
    lockless_walk_vs_zap(BugSet::NONE, Zapper::DeleteTablesSlot).expect(&[
        "Emulate(MmioSpteHit)",
        "Retry(ZappedUnderWalk)",
        "GuestPageFault",
        "hardware walk",
    ]);
}

/// Model 2.
fn special_root_fault_vs_zap_all(bugs: BugSet) -> Coverage {
    let cov = Coverage::default();
    let c = cov.clone();
    model(move || {
        c.execution();
        let (vm, host) = shadow_vm(bugs);
        // PDPT at 0x1000 (32-byte aligned), PD at 0x2000, PT at 0x3000.
        write_gpte(&host, 0x1000, 0x2000 | P);
        write_gpte(&host, 0x2000 + 8 * 2, 0x3000 | P | RW | US);
        write_gpte(&host, 0x3000 + 8 * 3, DATA_GPA | P | RW | US);
        let mut v = vm.create_vcpu().unwrap();
        let cpu = GuestCpu {
            mode: PagingMode::Pae { pdptrs: [0; 4] },
            cr3: 0,
            cr0_wp: true,
            efer_nx: true,
            maxphyaddr: 46,
            gbpages: false,
        };
        v.set_guest_cpu(cpu).unwrap();
        v.load_cr3(0x1000).unwrap();
        v.service_requests().unwrap();
        assert_eq!(v.shadow_root_kind(), Some(vmmu::shadow::ShadowRootKind::Special), "setup");

        let t = thread::spawn(move || {
            // The not-present #PF the hardware raised for the GVA.
            let o = v.handle_page_fault(Gva(PAE_GVA), PfErr(PfErr::USER));
            // The guest retries the access (services requests, walks, faults again).
            let next = access(&mut v, PAE_GVA);
            (v, o, next)
        });
        vm.zap_all_fast();
        let (mut v, o, next) = t.join().unwrap();
        c.saw(format!("{o:?}"));
        assert!(
            matches!(o, Ok(FaultOutcome::Fixed | FaultOutcome::Spurious | FaultOutcome::Retry(_))),
            "VIOLATION: the fault gave {o:?}"
        );
        let stale = vm.stale_shadow_entries_for_tests().unwrap();
        assert_eq!(stale, 0, "VIOLATION: {stale} entries reachable through zapped pages");
        let ram = Seen::Ram(ram_pfn(DATA_GPA));
        assert_eq!(next, ram, "VIOLATION: the access during the zap-all saw {next:?}");
        let again = access(&mut v, PAE_GVA);
        assert_eq!(again, ram, "VIOLATION: the access after the zap-all saw {again:?}");
        let stale = vm.stale_shadow_entries_for_tests().unwrap();
        assert_eq!(stale, 0, "VIOLATION: {stale} entries reachable through zapped pages");
        assert_eq!(host.use_after_free(), 0, "VIOLATION: a walk read a freed table page");
    });
    cov
}

#[test]
fn special_root_fault_vs_zap_all_holds() {
    // The fault before the zap-all (installed, then zapped) and after its bump (the reload
    // request is pending: the special-root staleness check retries).
    special_root_fault_vs_zap_all(BugSet::NONE)
        .expect(&["Ok(Fixed)", "Ok(Retry(PagelessRootReloadPending))"]);
}

/// Model 3. `check_after_join`: one more access once both threads are done (off when a test
/// wants the racing accesses alone to catch a bug).
fn gva_cache_vs_slot_create(bugs: BugSet, check_after_join: bool) -> Coverage {
    let cov = Coverage::default();
    let c = cov.clone();
    model(move || {
        c.execution();
        let (vm, host, mut v, _cr3) = vcpu_after_an_mmio_read(bugs);
        let gen = vm.memslots().generation(vmmu::AsId(0)).unwrap();
        assert!(v.mmio_cache().match_gva(GVA, gen, BugSet::NONE), "setup: the GVA is cached");
        let ram = Seen::Ram(Pfn(NEW_HVA >> 12));

        let created = Arc::new(AtomicBool::new(false));
        let t = {
            let created = created.clone();
            let c = c.clone();
            thread::spawn(move || {
                for _ in 0..2 {
                    let after = created.load(Ordering::Acquire);
                    let seen = access(&mut v, GVA);
                    let when = if after { "after" } else { "racing" };
                    c.saw(format!("{when} {seen:?}"));
                    assert!(
                        !after || seen == ram,
                        "VIOLATION: an access that began after the slot create saw {seen:?}"
                    );
                }
                v
            })
        };
        vm.set_memory_region(&UserspaceMemoryRegion::new(1, 0, MMIO_GPA, 0x1000, NEW_HVA)).unwrap();
        created.store(true, Ordering::Release);
        let mut v = t.join().unwrap();
        if check_after_join {
            let seen = access(&mut v, GVA);
            assert_eq!(seen, ram, "VIOLATION: an access after the slot create saw {seen:?}");
        }
        assert_eq!(host.use_after_free(), 0);
    });
    cov
}

#[test]
fn gva_cache_vs_slot_create_holds() {
    // Accesses racing with the create (the cache answers, or the new slot does) and one that
    // began after it.
    let ram = format!("{:?}", Seen::Ram(Pfn(NEW_HVA >> 12)));
    let cached = format!("{:?}", Seen::Mmio(Gpa(MMIO_GPA), EmulateSource::VcpuCacheHit));
    gva_cache_vs_slot_create(BugSet::NONE, true).expect(&[
        &format!("racing {cached}"),
        &format!("racing {ram}"),
        &format!("after {ram}"),
    ]);
}

/// Runs `m` with one bug and asserts that loom finds a violation (not another failure).
#[cfg(feature = "historical-bugs")]
fn assert_caught(bug: Bug, m: impl FnOnce(BugSet) -> Coverage) {
    let caught = loom_common::violation(|| {
        m(BugSet::only(bug));
    });
    assert!(caught, "the model missed {}", bug.name());
}

/// Model 1 has teeth: a zapped entry reported as a misconfiguration is an error outcome.
#[cfg(feature = "historical-bugs")]
#[test]
fn lockless_walk_vs_shrinker_catches_zapped_spte_is_misconfig() {
    assert_caught(Bug::ZappedSpteIsMisconfig, |b| lockless_walk_vs_zap(b, Zapper::Shrinker));
}

/// The same with `zap_all_fast` zapping the pages.
#[cfg(feature = "historical-bugs")]
#[test]
fn lockless_walk_vs_zap_all_fast_catches_zapped_spte_is_misconfig() {
    assert_caught(Bug::ZappedSpteIsMisconfig, |b| lockless_walk_vs_zap(b, Zapper::ZapAllFast));
}

/// Without the staleness checks (`no-stale-root-check`: neither the fault path's nor
/// `fetch`'s) the property still holds: the fault that comes after the bump builds below the
/// level-2 page the zap-all zapped while the special root pinned it, and the vCPU drops the
/// root before its next access, whose release zaps that page again (KVM `mmu_free_root_page`),
/// so nothing stays linked from a freed page (the bug's "no harm in this design"). This pins
/// that last line of defence down: every fault is fixed, none retried (the interleaving where
/// the fault follows the bump is the one `special_root_fault_vs_zap_all_holds` sees retry).
#[cfg(feature = "historical-bugs")]
#[test]
fn special_root_fault_vs_zap_all_without_the_check_is_unlinked_at_release() {
    let cov = special_root_fault_vs_zap_all(BugSet::only(Bug::NoStaleRootCheck));
    cov.expect(&["Ok(Fixed)"]);
    cov.expect_none("Retry");
}

/// Model 3 has teeth: a cache entry that ignores the generation answers an access that began
/// after the create (found among the racing accesses alone: no access after the join).
#[cfg(feature = "historical-bugs")]
#[test]
fn gva_cache_vs_slot_create_catches_vcpu_cache_without_gen() {
    assert_caught(Bug::VcpuCacheWithoutGen, |b| gva_cache_vs_slot_create(b, false));
}

/// The free queue's reclaimer turns (`MmuCore::reclaim`): a vCPU walks the
/// shadow in guest mode and then reclaims (as `reclaim_batched` does after a fault), while the
/// shrinker zaps the three pages below its pinned root and reclaims too. Property: no walk reads
/// a freed frame, no frame is freed twice (the test host asserts), and once both are done and
/// one more reclaim ran, nothing waits in the queue and only the root's frame is in use.
#[test]
fn two_reclaimers_and_a_guest_mode_walk() {
    let cov = Coverage::default();
    let c = cov.clone();
    model(move || {
        c.execution();
        let (vm, host) = shadow_vm(BugSet::NONE);
        let cr3 = long4_tables(&host, DATA_GPA);
        let mut v = long4_vcpu(&vm, cr3);
        assert_eq!(access(&mut v, GVA), Seen::Ram(ram_pfn(DATA_GPA)), "setup");
        let vm = Arc::new(vm);
        let vm2 = vm.clone();
        let t = thread::spawn(move || {
            let hw = v.enter_guest_mode().is_ok().then(|| {
                let w = v.walk_gva(Gva(GVA), Access::USER);
                v.exit_guest_mode();
                w
            });
            vm2.reclaim();
            (v, hw)
        });
        assert_eq!(vm.shrink_shadow_pages(8), 3);
        let (v, hw) = t.join().unwrap();
        c.saw(match hw {
            Some(HwWalk::Translated { .. }) => "walk translated".into(),
            Some(HwWalk::Violation { .. }) => "walk zapped".into(),
            other => format!("{other:?}"),
        });
        assert_eq!(host.use_after_free(), 0, "VIOLATION: a walk read a freed table page");
        vm.reclaim();
        assert_eq!(vm.core().pending_free(), 0, "VIOLATION: frames left in the queue");
        assert_eq!(host.tables_in_use(), 1, "VIOLATION: frames of zapped pages not freed");
        drop(v);
    });
    cov.expect(&["walk translated", "walk zapped"]);
}
