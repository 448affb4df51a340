//! loom model of the vCPU request / remote-TLB-flush protocol of `src/requests.rs` (KVM
//! `kvm_flush_remote_tlbs` with `vcpu->mode` and `vcpu->requests`), with the real `Vm`, `Vcpu`,
//! `MmuCore` and `TdpMmu` through the sync shim.
//!
//! Property: after `flush_remote_tlbs` returns (here: also after a zap that removed a present
//! leaf, or the delete of its slot, which must flush), a vCPU that was in guest mode has exited
//! or acknowledged: it never again uses a TLB entry made before the flush while still in the same
//! guest-mode period. The updater raises a `changed` flag, then flushes (or zaps, or deletes the
//! slot), then raises `flushed`. The vCPU fills a one-entry "TLB" from the hardware walk in guest
//! mode, noting whether it already saw `changed` (an entry made after the change is fresh); each
//! guest access through a pre-change entry checks (Acquire) whether the flush has returned:
//! seeing that while still in guest mode, with no request noticed, is the violation. With
//! `--features historical-bugs` the model must catch `no-tlb-flush-on-zap` (the zap returns
//! without flushing) by its harm: after a slot's delete returned, a guest access reads the
//! deleted slot's frame through the TLB.
#![cfg(loom)]

mod loom_common;

use loom_common::model;

use loom::sync::atomic::AtomicBool;
use loom::thread;
use vmmu::bugs::BugSet;
use vmmu::fault::FaultOutcome;
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::spte::FormatKind;
use vmmu::sync::{Arc, Ordering};
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, AsId, FaultAccess, Gfn, Gpa, Level};

const X: u64 = 0x1234;
const RAM_HVA: u64 = 0x4000_0000;

/// What the updater does between `changed` and `flushed`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    /// `flush_remote_tlbs`, called directly.
    Flush,
    /// `zap_gfn_range` removing X's leaf (a real caller of the flush); the slot stays, so a
    /// stale TLB entry still names the right frame.
    Zap,
    /// The delete of X's slot (its zap flushes): a stale TLB entry names the deleted slot's
    /// frame where the guest must find no RAM (the harm).
    Delete,
}

fn tlb_flush(bugs: BugSet, change: Change) {
    model(move || {
        let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
        cfg.max_vcpus = 1;
        cfg.nr_address_spaces = 1;
        cfg.bugs = bugs;
        let host = Arc::new(TestHost::new(8));
        host.map(RAM_HVA, 0x1000, RAM_HVA >> 12, Level::L4K, true);
        let vm = Vm::new(cfg, host).unwrap();
        let slot = UserspaceMemoryRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: X << 12,
            memory_size: 0x1000,
            userspace_addr: RAM_HVA,
        };
        vm.set_memory_region(&slot).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        v.service_requests().unwrap();
        let o = v.handle_ept_violation(Gpa(X << 12), FaultAccess::READ).unwrap();
        assert_eq!(o, FaultOutcome::Fixed, "setup");

        let changed = Arc::new(AtomicBool::new(false));
        let flushed = Arc::new(AtomicBool::new(false));
        let t = {
            let (changed, flushed) = (changed.clone(), flushed.clone());
            thread::spawn(move || {
                // The TLB entry, if any: whether it was made before the change was visible.
                let mut tlb: Option<bool> = None;
                for _ in 0..2 {
                    if v.service_requests().unwrap().flush_tlb {
                        tlb = None;
                    }
                    let Ok(g) = v.enter_guest() else { continue };
                    if tlb.is_none() {
                        let pre_change = !changed.load(Ordering::Acquire);
                        if let HwWalk::Translated { .. } = g.walk(Gpa(X << 12), Access::NONE) {
                            tlb = Some(pre_change);
                        }
                    }
                    // Two guest accesses through the TLB, unless the kick is noticed first.
                    for _ in 0..2 {
                        if tlb != Some(true) || g.requests_pending() {
                            break;
                        }
                        assert!(
                            !flushed.load(Ordering::Acquire),
                            "VIOLATION: a vCPU in guest mode used a stale TLB entry after the \
                             remote TLB flush returned{}",
                            if change == Change::Delete {
                                ": a guest access read the frame of a slot whose delete had \
                                 returned, where it must find no RAM (MMIO)"
                            } else {
                                ""
                            }
                        );
                    }
                    drop(g);
                }
            })
        };
        changed.store(true, Ordering::Release);
        match change {
            Change::Flush => vm.flush_remote_tlbs_for_tests(),
            Change::Zap => vm.zap_gfn_range_for_tests(AsId(0), Gfn(X), Gfn(X + 1)),
            Change::Delete => {
                let mut delete = slot;
                delete.memory_size = 0;
                vm.set_memory_region(&delete).unwrap();
            }
        }
        flushed.store(true, Ordering::Release);
        t.join().unwrap();
    });
}

#[test]
fn loom_tlb_flush_direct() {
    tlb_flush(BugSet::NONE, Change::Flush);
}

#[test]
fn loom_tlb_flush_by_zap() {
    tlb_flush(BugSet::NONE, Change::Zap);
}

#[test]
fn loom_tlb_flush_by_delete() {
    tlb_flush(BugSet::NONE, Change::Delete);
}

/// The model has teeth: without the flush on zap, the vCPU keeps reading a deleted slot's frame
/// through its TLB after the delete returned.
#[cfg(feature = "historical-bugs")]
#[test]
fn loom_tlb_flush_catches_no_tlb_flush_on_zap() {
    let bugs = BugSet::only(vmmu::bugs::Bug::NoTlbFlushOnZap);
    let caught = loom_common::violation(|| tlb_flush(bugs, Change::Delete));
    assert!(caught, "missed no-tlb-flush-on-zap");
}
