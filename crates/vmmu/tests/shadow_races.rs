//! Orderings under concurrency in the shadow MMU, made deterministic with the core's preemption
//! hook (`vmmu::testing::preempt`): a vCPU's fault is parked at `PreemptPoint::FaultDecided`
//! (its guest walk done, its leaf decided, the shadow lock not yet taken) and another vCPU, the
//! shrinker or a zap-all acts there. Each test names the re-check KVM makes after taking
//! `mmu_lock` (or after write-protecting) that the ordering needs, and shows that the fault does
//! not install what it decided from the state before the racer acted.
//!
//! - Write protection against a fault that maps a page writable (shadow facts §4.1, §4.2): the
//!   tracked state of the leaf's gfn is read under the lock, not at the decision.
//! - The leaf's own gPTE changed (its D bit cleared) under a write fault (§3.2 `gpte_changed`).
//! - Prefetch reads its neighbour gPTEs under the lock, after the leaf's table is protected
//!   (`FNAME(pte_prefetch)`), so a neighbour rewritten in the window is taken at its new value.
//! - Recycling and the fast zap-all in the window (§3.1, §6.3, §7): the fault rebuilds below a
//!   zapped path or retries on its obsolete root, and nothing stays linked below a zapped page.
//! - A memslot create in the window of an MMIO decision (companion §2, shadow facts §9): the
//!   MMIO SPTE and the GVA cache entry carry the generation the fault read, which the create's
//!   final generation stales.
#![cfg(not(loom))]

mod common;

use common::shadow::*;
use std::cell::RefCell;
use std::rc::Rc;
use vmmu::bugs::BugSet;
use vmmu::fault::{EmulateSource, FaultOutcome, PfErr};
use vmmu::host::{HostAccess, PreemptPoint};
use vmmu::stats::RetryCause;
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::{Gpa, Gva};

const A: u64 = 0x4000_0000;
const B: u64 = 0x6000_0000;
const AC: u64 = 0x20;
const DT: u64 = 0x40;

/// vCPU 0 (root loaded) and vCPU 1 of `vm` in `s`, vCPU 1 shared with a racer. With
/// `table_shadowed`, vCPU 1 first reads `A + 64 KiB` (which the test maps to 0x20_8000, outside
/// A's prefetch group), so the guest table holding A's gPTE is shadowed before the race.
fn two_vcpus(
    vm: &vmmu::vm::Vm<TestHost>,
    s: &Space,
    table_shadowed: bool,
) -> (Vcpu<TestHost>, Rc<RefCell<Vcpu<TestHost>>>) {
    let mut v0 = vcpu_in(vm, long4(s.cr3));
    let v1 = Rc::new(RefCell::new(vcpu_in(vm, long4(s.cr3))));
    if table_shadowed {
        let seen = access(&mut v1.borrow_mut(), A + 0x1_0000, false);
        assert_eq!(seen, Seen::Ram(ram_pfn(0x20_8000)));
    }
    v0.service_requests().unwrap();
    (v0, v1)
}

/// The frame the hardware reads `gva` from right now, without a fault (`None`: it faults).
fn mapped_pfn(v: &mut Vcpu<TestHost>, gva: u64) -> Option<vmmu::Pfn> {
    match hw(v, gva, false) {
        HwWalk::Translated { pfn, .. } => Some(pfn),
        _ => None,
    }
}

/// Makes the host map `n` pages from host address `hva` writable already (only such pages are
/// prefetched: a fast write-GUP that never faults).
fn host_written(host: &TestHost, hva: u64, n: u64) {
    for i in 0..n {
        vmmu::host::HostMemory::translate(host, vmmu::Hva(hva + i * 0x1000), HostAccess::Write)
            .unwrap();
    }
}

/// Runs `racer` once, at the first `FaultDecided` this thread reaches, then `f`; the hook is
/// cleared afterwards.
fn with_racer_at_decision<T>(racer: impl FnOnce() + 'static, f: impl FnOnce() -> T) -> T {
    let mut racer = Some(racer);
    vmmu::testing::preempt::on_this_thread(Some(Box::new(move |p| {
        if p == PreemptPoint::FaultDecided {
            if let Some(r) = racer.take() {
                r();
            }
        }
    })));
    let out = f();
    vmmu::testing::preempt::on_this_thread(None);
    out
}

/// KVM keeps every leaf of a gfn that a valid shadow page shadows read-only (`account_shadowed`
/// write-protects the existing ones; `make_spte` -> `mmu_try_to_unsync_pages` refuses W for new
/// ones, checked under `mmu_lock` when the SPTE is made). Here vCPU 0's write fault on a data
/// page D has decided "RAM, writable" when vCPU 1, in the window before vCPU 0 takes the shadow
/// lock, walks a GVA whose guest PDE uses D as its page table, so D becomes a shadowed table;
/// no leaf of D existed yet for that shadowing to write-protect. vCPU 0's fault must then
/// install D read-only and have the write emulated; a writable leaf would let the guest edit
/// one of its page tables without a trap, and the shadow of that table (vCPU 1's translation of
/// B) would go stale with nothing to correct it.
#[test]
fn a_write_fault_never_maps_writable_a_page_another_vcpu_started_shadowing_meanwhile() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    const D: u64 = 0x20_0000;
    const TARGET: u64 = 0x21_0000;
    s.map4k(A, D, P | RW | US | AC | DT);
    // B's PDE uses D as its page table; D's entry 0 maps TARGET.
    let pde = s.entry_gpa(B, 2);
    host.write_u64(RAM_HVA + pde, D | P | RW | US);
    host.write_u64(RAM_HVA + D, TARGET | P | RW | US);
    let (mut v0, v1) = two_vcpus(&vm, &s, false);
    let v1r = v1.clone();
    let o = with_racer_at_decision(
        move || {
            let seen = access(&mut v1r.borrow_mut(), B, false);
            assert_eq!(seen, Seen::Ram(ram_pfn(TARGET)), "vCPU 1 walks through D as a table");
        },
        || v0.handle_page_fault(Gva(A), PfErr(PfErr::USER | PfErr::WRITE)),
    );
    match o {
        Ok(FaultOutcome::Emulate { gpa, source: EmulateSource::WriteProtected, .. }) => {
            assert_eq!(gpa, Gpa(D));
        }
        other => panic!("the write to a table shadowed meanwhile is emulated, got {other:?}"),
    }
    assert!(
        !matches!(hw(&mut v0, A, true), HwWalk::Translated { .. }),
        "harm: vCPU 0 writes D, a shadowed page table, without a trap"
    );
    assert_eq!(mapped_pfn(&mut v0, A), Some(ram_pfn(D)), "the read-only leaf is there");
    assert_eq!(access(&mut v0, A, true), Seen::Mmio(Gpa(D), EmulateSource::WriteProtected));
    // vCPU 1's translation through D still holds, since every edit of D traps.
    assert_eq!(access(&mut v1.borrow_mut(), B, false), Seen::Ram(ram_pfn(TARGET)));
}

/// KVM `FNAME(fetch)` re-reads the leaf's gPTE (`gpte_changed`) once its table is protected,
/// before `mmu_set_spte`. vCPU 0's write fault on A walked a clean gPTE and set its D bit; in
/// the window before the lock, the guest clears D again on another vCPU (an OS collecting its
/// dirty bits): with a plain store while the page table is not shadowed yet, or an emulated,
/// reported store once it is. The fault must retry, not install a writable leaf for a gPTE
/// that is clean in memory: the guest would then write A while its OS believes A clean.
#[test]
fn a_write_fault_whose_dirty_bit_is_cleared_meanwhile_installs_no_writable_leaf() {
    for table_shadowed in [false, true] {
        let (vm, host, next) = shadow_vm(BugSet::NONE);
        let s = Space::new(&host, &next);
        const DATA: u64 = 0x20_0000;
        let pte = s.map4k(A, DATA, P | RW | US | AC);
        // Entry 16 of the same table, outside A's prefetch group.
        s.map4k(A + 0x1_0000, 0x20_8000, P | RW | US | AC | DT);
        let (mut v0, v1) = two_vcpus(&vm, &s, table_shadowed);
        let (h, v1r) = (host.clone(), v1.clone());
        let o = with_racer_at_decision(
            move || {
                let walked = vmmu::host::GuestMemory::read_u64(&*h, vmmu::Hva(RAM_HVA + pte));
                assert_eq!(walked.unwrap() & DT, DT, "the walk set D");
                h.write_u64(RAM_HVA + pte, DATA | P | RW | US | AC);
                if table_shadowed {
                    v1r.borrow_mut().track_write(Gpa(pte), 8).unwrap();
                }
            },
            || v0.handle_page_fault(Gva(A), PfErr(PfErr::USER | PfErr::WRITE)),
        );
        assert_eq!(o.unwrap(), FaultOutcome::Retry(RetryCause::Race), "shadowed: {table_shadowed}");
        assert!(
            !matches!(hw(&mut v0, A, true), HwWalk::Translated { .. }),
            "harm (shadowed: {table_shadowed}): a writable leaf for a gPTE whose D is clear"
        );
        // The retried write walks again and sets D itself.
        assert_eq!(access(&mut v0, A, true), Seen::Ram(ram_pfn(DATA)));
        assert_eq!(s.read(pte) & DT, DT);
    }
}

/// KVM `FNAME(pte_prefetch)` reads the neighbour gPTEs under `mmu_lock`, after `fetch` shadowed
/// (protected) their table and flushed: a neighbour the guest rewrote before that, with a plain
/// store (table not shadowed yet) or an emulated one (table shadowed, the report dropping the
/// entry), is prefetched at its new value or not at all. And a store whose report comes only
/// after the fault (the emulating vCPU wrote memory, then was preempted before reporting) is
/// corrected by that report. In no case may the neighbour stay mapped to its old frame.
#[test]
fn a_neighbour_gpte_rewritten_while_a_fault_is_in_flight_is_never_prefetched_stale() {
    const OLD: u64 = 0x20_1000;
    const NEW: u64 = 0x22_1000;
    // (table shadowed before the fault, report in the window, report after the fault)
    for (shadowed, report_in_window) in [(false, false), (true, true), (true, false)] {
        let what = format!("shadowed: {shadowed}, report in the window: {report_in_window}");
        let (vm, host, next) = shadow_vm(BugSet::NONE);
        let s = Space::new(&host, &next);
        s.map4k(A, 0x20_0000, P | RW | US | AC | DT);
        let pte1 = s.map4k(A + 0x1000, OLD, P | RW | US | AC | DT);
        s.map4k(A + 0x1_0000, 0x20_8000, P | RW | US | AC | DT);
        host_written(&host, RAM_HVA + 0x20_0000, 2);
        host_written(&host, RAM_HVA + NEW, 1);
        let (mut v0, v1) = two_vcpus(&vm, &s, shadowed);
        let (h, v1r) = (host.clone(), v1.clone());
        let o = with_racer_at_decision(
            move || {
                h.write_u64(RAM_HVA + pte1, NEW | P | RW | US | AC | DT);
                if report_in_window {
                    v1r.borrow_mut().track_write(Gpa(pte1), 8).unwrap();
                }
            },
            || v0.handle_page_fault(Gva(A), PfErr(PfErr::USER)),
        );
        assert_eq!(o.unwrap(), FaultOutcome::Fixed, "{what}");
        let after_fault = mapped_pfn(&mut v0, A + 0x1000);
        assert_ne!(after_fault, Some(ram_pfn(OLD)), "harm ({what}): prefetched the old gPTE");
        assert_eq!(after_fault, Some(ram_pfn(NEW)), "{what}: prefetched at its new value");
        if !report_in_window && shadowed {
            // The emulating vCPU reports its store now: the prefetched entry goes.
            v1.borrow_mut().track_write(Gpa(pte1), 8).unwrap();
            assert_eq!(mapped_pfn(&mut v0, A + 0x1000), None, "{what}: the report drops it");
        }
        assert_eq!(access(&mut v0, A + 0x1000, false), Seen::Ram(ram_pfn(NEW)), "{what}");
    }
}

/// Recycling and the fast zap-all against a fault in flight (KVM: `make_mmu_pages_available`,
/// then `is_page_fault_stale`, both under `mmu_lock`, 2abd5287f083; `kvm_mmu_zap_all_fast` bumps
/// the generation and posts the reload in one `mmu_lock` section, §6.3). In vCPU 0's window
/// the shrinker zaps every page no root pins (the whole path below the root), or a zap-all
/// makes every page obsolete. The fault then builds a fresh path below its root (shrinker), or
/// retries on its obsolete root (zap-all); either way nothing stays linked below or from a
/// zapped page, and the next access translates through the guest's tables.
#[test]
fn recycling_or_a_zap_all_while_a_fault_is_in_flight_leaves_nothing_linked_below_zapped_pages() {
    for zap_all in [false, true] {
        let (vm, host, next) = shadow_vm(BugSet::NONE);
        let s = Space::new(&host, &next);
        s.map4k(A, 0x20_0000, P | RW | US | AC | DT);
        s.map4k(A + 0x20_0000, 0x20_1000, P | RW | US | AC | DT);
        let mut v0 = vcpu_in(&vm, long4(s.cr3));
        // The root, PDPT and PD are shadowed, with a path to a first leaf.
        assert_eq!(access(&mut v0, A + 0x20_0000, false), Seen::Ram(ram_pfn(0x20_1000)));
        v0.service_requests().unwrap();
        let racer = vm.clone();
        let o = with_racer_at_decision(
            move || {
                if zap_all {
                    racer.zap_all_fast();
                } else {
                    assert!(
                        racer.shrink_shadow_pages(1000) >= 3,
                        "PDPT, PD and the PT of A + 2 MiB"
                    );
                }
            },
            || v0.handle_page_fault(Gva(A), PfErr(PfErr::USER)),
        );
        let want = if zap_all {
            FaultOutcome::Retry(RetryCause::ObsoleteRoot)
        } else {
            FaultOutcome::Fixed
        };
        assert_eq!(o.unwrap(), want, "zap-all: {zap_all}");
        assert_eq!(vm.stale_shadow_entries_for_tests(), Some(0), "zap-all: {zap_all}");
        assert_eq!(access(&mut v0, A, false), Seen::Ram(ram_pfn(0x20_0000)));
        assert_eq!(access(&mut v0, A + 0x20_0000, false), Seen::Ram(ram_pfn(0x20_1000)));
        assert_eq!(vm.stale_shadow_entries_for_tests(), Some(0), "zap-all: {zap_all}");
    }
}

/// The memslot generation check of an MMIO decision (KVM: the MMIO SPTE and the GVA cache carry
/// the generation the fault read; a memslot update publishes its new set with the generation
/// marked in progress, waits for every reader of the old set, then stores the final one, so an
/// MMIO SPTE or cache entry made from the old set never matches afterwards). vCPU 0's fault on
/// A, which the guest maps to a gpa no slot covers, has decided MMIO (and cached it by GVA)
/// when another thread creates a slot over that gpa: the create publishes its set and waits for
/// vCPU 0's memslot read section, in which vCPU 0 installs its MMIO SPTE. Once the create has
/// returned, the next access to A must reach the new slot's RAM, neither the MMIO SPTE nor the
/// GVA cache answering it as MMIO.
#[test]
fn an_mmio_decision_made_before_a_slot_create_does_not_outlive_it() {
    use vmmu::memslot::UserspaceMemoryRegion;
    const BACKING: u64 = 0x30_0000;
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(A, MMIO_GPA, P | RW | US | AC | DT);
    let mut v0 = vcpu_in(&vm, long4(s.cr3));
    v0.service_requests().unwrap();
    let updater: Rc<RefCell<Option<std::thread::JoinHandle<()>>>> = Rc::default();
    let (vm2, slot) = (vm.clone(), updater.clone());
    let o = with_racer_at_decision(
        move || {
            let racer = vm2.clone();
            *slot.borrow_mut() = Some(std::thread::spawn(move || {
                let r = UserspaceMemoryRegion::new(1, 0, MMIO_GPA, 0x1000, RAM_HVA + BACKING);
                racer.set_memory_region(&r).unwrap();
            }));
            // Until the create has published its set (it then waits for this vCPU).
            while !vm2.memslots().generation(vmmu::AsId(0)).unwrap().in_progress() {
                std::thread::yield_now();
            }
        },
        || v0.handle_page_fault(Gva(A), PfErr(PfErr::USER)),
    );
    match o {
        Ok(FaultOutcome::Emulate { gpa, source: EmulateSource::SlowPathMmio, .. }) => {
            assert_eq!(gpa, Gpa(MMIO_GPA));
        }
        other => panic!("decided MMIO from the set before the create: {other:?}"),
    }
    let handle = updater.borrow_mut().take().expect("the create ran");
    handle.join().unwrap();
    assert_eq!(
        access(&mut v0, A, false),
        Seen::Ram(ram_pfn(BACKING)),
        "harm: an MMIO decision from before the create answered an access after it"
    );
}

/// The same window with a second vCPU (KVM aad885e77496 under concurrency): once the create has
/// published its set (generation in progress), vCPU 1 faults on A and maps it to the new slot's
/// RAM; then vCPU 0, whose MMIO decision came from the set before the create, installs its MMIO
/// SPTE over that leaf (the present leaf is dropped and flushed first, as KVM's `mmu_set_spte`
/// does since 2026) and emulates its own access, which began before the create. Once the create
/// has returned, neither vCPU may see A as MMIO: the MMIO SPTE carries the old generation.
#[test]
fn a_stale_mmio_decision_over_a_leaf_mapped_from_the_new_slot_does_not_hide_it() {
    use vmmu::memslot::UserspaceMemoryRegion;
    const BACKING: u64 = 0x30_0000;
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(A, MMIO_GPA, P | RW | US | AC | DT);
    let (mut v0, v1) = two_vcpus(&vm, &s, false);
    let updater: Rc<RefCell<Option<std::thread::JoinHandle<()>>>> = Rc::default();
    let (vm2, slot, v1r) = (vm.clone(), updater.clone(), v1.clone());
    let o = with_racer_at_decision(
        move || {
            let racer = vm2.clone();
            *slot.borrow_mut() = Some(std::thread::spawn(move || {
                let r = UserspaceMemoryRegion::new(1, 0, MMIO_GPA, 0x1000, RAM_HVA + BACKING);
                racer.set_memory_region(&r).unwrap();
            }));
            while !vm2.memslots().generation(vmmu::AsId(0)).unwrap().in_progress() {
                std::thread::yield_now();
            }
            let seen = access(&mut v1r.borrow_mut(), A, false);
            assert_eq!(seen, Seen::Ram(ram_pfn(BACKING)), "vCPU 1 reads the published set");
        },
        || v0.handle_page_fault(Gva(A), PfErr(PfErr::USER)),
    );
    match o {
        Ok(FaultOutcome::Emulate { gpa, source: EmulateSource::SlowPathMmio, .. }) => {
            assert_eq!(gpa, Gpa(MMIO_GPA));
        }
        other => panic!("decided MMIO from the set before the create: {other:?}"),
    }
    let handle = updater.borrow_mut().take().expect("the create ran");
    handle.join().unwrap();
    let harm = "harm: an MMIO decision from before the create answered an access after it";
    assert_eq!(access(&mut v1.borrow_mut(), A, false), Seen::Ram(ram_pfn(BACKING)), "{harm}");
    assert_eq!(access(&mut v0, A, false), Seen::Ram(ram_pfn(BACKING)), "{harm}");
}
