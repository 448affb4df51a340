//! loom models of a fault racing a host invalidation (KVM's MMU notifier:
//! `invalidate_range_start`, the host changing what backs the range, `invalidate_range_end`;
//! facts §4 `mmu_invalidate_retry_gfn`), with the real `Vm`, `Vcpu`, `MmuCore`, `TdpMmu`, `ShadowMmu` and
//! `TestHost` through the sync shim. Run with `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom
//! cargo test -p vmmu --release --features historical-bugs --test loom_invalidate`
//! (`scripts/test` does).
//!
//! A vCPU takes one not-present fault on a RAM page while the VM side invalidates that page's
//! host address, maps another frame there, and ends the invalidation. The fault samples the
//! invalidation sequence, translates the host address, and installs under the MMU lock after
//! checking that no invalidation of the page is in flight and that the sequence has not moved.
//! Under the TDP MMU the invalidation's begin and end and the fault's check share the MMU lock;
//! under the shadow MMU the fault checks under the shadow lock, which the begin and end do not
//! take (only the unmap between them does), so there only the orderings of `Invalidation` and
//! the unmap's shadow-lock hold keep the check right.
//!
//! A third model races a memslot move with two host invalidations of the slot's range
//! (`memslot_move_vs_host_invalidations`).
//!
//! Property: the fault ends as Fixed or Retry, and once both sides are done an access reaches the
//! new frame: no leaf of the frame the host no longer maps there survives. Removing the sequence
//! comparison of `Invalidation::retry_range` fails the first two models; the shadow model also
//! fails when `Invalidation::end` lowers the in-flight count before it bumps the sequence, and
//! when `Vm::invalidate_hva_range_begin` unmaps the shadow leaves before it begins the
//! invalidation.
#![cfg(loom)]

mod loom_common;

use loom::thread;
use loom_common::model;
use vmmu::fault::{FaultOutcome, PfErr};
use vmmu::guest::GuestCpu;
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::spte::FormatKind;
use vmmu::sync::Arc;
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, FaultAccess, Gpa, Gva, Hva, Level, Pfn};

const RAM_HVA: u64 = 0x4000_0000;
/// The frame the host maps at the invalidated address afterwards.
const NEW_PFN: u64 = 0x7_7000;

/// The VM side: invalidate one host page, map `NEW_PFN` there, end the invalidation.
fn remap(vm: &Vm<TestHost>, host: &TestHost, hva: u64) {
    let inv = vm.invalidate_hva_range_begin(Hva(hva), Hva(hva + 0x1000));
    host.map_over(hva, 0x1000, NEW_PFN, Level::L4K, true);
    inv.end();
}

fn check_outcome(o: Result<FaultOutcome, vmmu::fault::FaultError>) {
    assert!(
        matches!(o, Ok(FaultOutcome::Fixed | FaultOutcome::Retry(_))),
        "VIOLATION: the racing fault ended as {o:?}"
    );
}

/// The hardware walk of `v` (TDP: a gpa; shadow: a user read of a gva) after servicing its
/// requests, faulting until it translates.
fn translate(v: &mut Vcpu<TestHost>, shadow: bool, addr: u64) -> Pfn {
    for _ in 0..4 {
        v.service_requests().unwrap();
        if v.enter_guest_mode().is_err() {
            continue;
        }
        let walk = if shadow {
            v.walk_gva(Gva(addr), Access::USER)
        } else {
            v.walk(Gpa(addr), Access::NONE)
        };
        v.exit_guest_mode();
        match walk {
            HwWalk::Translated { pfn, .. } => return pfn,
            HwWalk::Violation { present, .. } => {
                let o = if shadow {
                    let err = PfErr::USER | if present { PfErr::PRESENT } else { 0 };
                    v.handle_page_fault(Gva(addr), PfErr(err))
                } else {
                    v.handle_ept_violation(Gpa(addr), FaultAccess::READ)
                };
                o.unwrap();
            }
            w => panic!("walk of {addr:#x}: {w:?}"),
        }
    }
    panic!("{addr:#x} did not translate");
}

/// A TDP VM (EPT, one vCPU, one address space) whose slot 0 maps one RAM page at `gpa`.
fn tdp_vm(gpa: u64) -> (Arc<TestHost>, Vm<TestHost>) {
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.max_vcpus = 1;
    cfg.nr_address_spaces = 1;
    let host = Arc::new(TestHost::new(8));
    host.map(RAM_HVA, 0x1000, RAM_HVA >> 12, Level::L4K, true);
    let vm = Vm::new(cfg, host.clone()).unwrap();
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, gpa, 0x1000, RAM_HVA)).unwrap();
    (host, vm)
}

#[test]
fn tdp_fault_vs_host_invalidation() {
    const GPA: u64 = 0x0123_4000;
    model(|| {
        let (host, vm) = tdp_vm(GPA);
        let mut v = vm.create_vcpu().unwrap();
        v.service_requests().unwrap();
        let t = thread::spawn(move || {
            let o = v.handle_ept_violation(Gpa(GPA), FaultAccess::READ);
            (v, o)
        });
        remap(&vm, &host, RAM_HVA);
        let (mut v, o) = t.join().unwrap();
        check_outcome(o);
        let pfn = translate(&mut v, false, GPA);
        assert_eq!(pfn, Pfn(NEW_PFN), "VIOLATION: a leaf of the old frame survived");
        assert_eq!(host.use_after_free(), 0);
    });
}

#[test]
fn shadow_fault_vs_host_invalidation() {
    /// The guest page the GVA maps.
    const DATA_GPA: u64 = 0x8000;
    const GVA: u64 = 0x4000_0000;
    model(|| {
        let host = Arc::new(TestHost::new(16));
        host.map(RAM_HVA, 0x1_0000, RAM_HVA >> 12, Level::L4K, true);
        let mut cfg = VmConfig::shadow(46).unwrap();
        cfg.max_vcpus = 1;
        let vm = Vm::new(cfg, host.clone()).unwrap();
        vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 0x1_0000, RAM_HVA)).unwrap();
        // 4-level guest tables at gpa 0x1000..0x4000 mapping GVA to DATA_GPA, user, writable.
        for (gpa, e) in
            [(0x1000, 0x2000), (0x2000 + 8, 0x3000), (0x3000, 0x4000), (0x4000, DATA_GPA)]
        {
            host.write_u64(RAM_HVA + gpa, e | 0b111);
        }
        let mut v = vm.create_vcpu().unwrap();
        v.set_guest_cpu(GuestCpu::long4(0x1000, 46)).unwrap();
        v.service_requests().unwrap();
        let t = thread::spawn(move || {
            let o = v.handle_page_fault(Gva(GVA), PfErr(PfErr::USER));
            (v, o)
        });
        remap(&vm, &host, RAM_HVA + DATA_GPA);
        let (mut v, o) = t.join().unwrap();
        check_outcome(o);
        let pfn = translate(&mut v, true, GVA);
        assert_eq!(pfn, Pfn(NEW_PFN), "VIOLATION: a leaf of the old frame survived");
        assert_eq!(host.use_after_free(), 0);
    });
}

/// A memslot move racing host invalidations of the slot's host range (KVM: the swap waits for
/// `mn_active_invalidate_count` to reach 0, and `invalidate_range_start` never waits for the
/// swap). Properties: no update publishes while an invalidation is in flight, so what the
/// invalidation mapped its range to stays the memslots' until it ends (the gfn's host address
/// reads the same before and after a second begin); a second begin while the update waits for
/// the first does not wait for the update (it deadlocked when the waiting update held the lock
/// a begin takes: embed45 finding 1); and the move lands once both end.
#[test]
fn memslot_move_vs_host_invalidations() {
    use vmmu::{AsId, Gfn};
    const OLD: u64 = 0x0123_4000;
    const NEW: u64 = 0x0567_8000;
    model(|| {
        let (_host, vm) = tdp_vm(OLD);
        let mover = vm.clone();
        let t = thread::spawn(move || {
            mover
                .set_memory_region(&UserspaceMemoryRegion::new(0, 0, NEW, 0x1000, RAM_HVA))
                .unwrap();
        });
        let old = Gfn(OLD >> 12);
        let first = vm.invalidate_hva_range_begin(Hva(RAM_HVA), Hva(RAM_HVA + 0x1000));
        let before = vm.gfn_to_hva(AsId(0), old);
        let second = vm.invalidate_hva_range_begin(Hva(RAM_HVA), Hva(RAM_HVA + 0x1000));
        let after = vm.gfn_to_hva(AsId(0), old);
        assert_eq!(before, after, "VIOLATION: the memslots changed under an invalidation");
        second.end();
        first.end();
        t.join().unwrap();
        assert_eq!(vm.gfn_to_hva(AsId(0), Gfn(NEW >> 12)), Some(Hva(RAM_HVA)));
        assert_eq!(vm.gfn_to_hva(AsId(0), old), None);
    });
}
