//! loom model of dirty logging's promise (`crate::dirty`): a write the guest makes after a
//! `KVM_GET_DIRTY_LOG` returned is in a later collection. With the real `Vm`, `Vcpu` and
//! `TdpMmu` through the sync shim.
//!
//! Setup: a dirty-logged one-page slot; the vCPU's write fault has made the leaf writable and
//! marked the page. The vCPU thread fills a one-entry "TLB" (with the write right) from the
//! hardware walk in guest mode and writes through it; the VMM collects (auto mode: the page is
//! taken and write-protected again, and TLBs are flushed before the GET returns) and raises
//! `collected`. A write through the TLB entry after the vCPU saw `collected` (Acquire), while it
//! is still in the same guest-mode period with no request noticed, would be lost: the page is
//! write-protected and not marked, and nothing faults. The violation is that loss, as the VMM
//! sees it: a second GET after the vCPU stopped does not return the page that write dirtied.
//! With `--features historical-bugs` the model must catch `dirty-log-no-flush` (the GET returns
//! without flushing).
#![cfg(loom)]

mod loom_common;

use loom_common::model;

use loom::sync::atomic::AtomicBool;
use loom::thread;
use vmmu::bugs::BugSet;
use vmmu::fault::FaultOutcome;
use vmmu::memslot::{UserspaceMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
use vmmu::spte::FormatKind;
use vmmu::sync::{Arc, Ordering};
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, AsId, FaultAccess, Gpa, Level, SlotId};

const X: u64 = 0x1234;
const RAM_HVA: u64 = 0x4000_0000;

fn dirty_log(bugs: BugSet) {
    model(move || {
        let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
        cfg.max_vcpus = 1;
        cfg.nr_address_spaces = 1;
        cfg.bugs = bugs;
        let host = Arc::new(TestHost::new(8));
        host.map(RAM_HVA, 0x1000, RAM_HVA >> 12, Level::L4K, true);
        let vm = Vm::new(cfg, host).unwrap();
        vm.set_memory_region(&UserspaceMemoryRegion {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: X << 12,
            memory_size: 0x1000,
            userspace_addr: RAM_HVA,
        })
        .unwrap();
        let mut v = vm.create_vcpu().unwrap();
        v.service_requests().unwrap();
        let o = v.handle_ept_violation(Gpa(X << 12), FaultAccess::WRITE).unwrap();
        assert_eq!(o, FaultOutcome::Fixed, "setup");

        let collected = Arc::new(AtomicBool::new(false));
        let t = {
            let collected = collected.clone();
            thread::spawn(move || {
                // Whether the TLB holds a writable translation of X.
                let mut tlb = false;
                // Whether a guest write went through it after the vCPU saw the GET return.
                let mut wrote_after_get = false;
                for _ in 0..2 {
                    if v.service_requests().unwrap().flush_tlb {
                        tlb = false;
                    }
                    let Ok(g) = v.enter_guest() else { continue };
                    if !tlb {
                        if let HwWalk::Translated { perms, .. } =
                            g.walk(Gpa(X << 12), Access::WRITE)
                        {
                            tlb = perms.contains(Access::WRITE);
                        }
                    }
                    // Two guest writes through the TLB, unless the kick is noticed first.
                    for _ in 0..2 {
                        if !tlb || g.requests_pending() {
                            break;
                        }
                        wrote_after_get |= collected.load(Ordering::Acquire);
                    }
                    drop(g);
                }
                wrote_after_get
            })
        };
        let first = vm.get_dirty_log(AsId(0), SlotId(0)).unwrap();
        collected.store(true, Ordering::Release);
        let wrote_after_get = t.join().unwrap();
        assert_eq!(first, [1], "the write fault marked the page before the GET");
        let next = vm.get_dirty_log(AsId(0), SlotId(0)).unwrap();
        assert!(
            !wrote_after_get || next == [1],
            "VIOLATION: a guest write made after KVM_GET_DIRTY_LOG returned is in no later \
             collection (next {next:?}): it went through a writable TLB entry of the page the GET \
             write-protected, and nothing faulted: a lost dirty page"
        );
    });
}

#[test]
fn loom_dirty_log_get_flushes_before_it_returns() {
    dirty_log(BugSet::NONE);
}

/// The model has teeth: without the flush after the re-protect, the vCPU keeps writing.
#[cfg(feature = "historical-bugs")]
#[test]
fn loom_dirty_log_catches_dirty_log_no_flush() {
    let bugs = BugSet::only(vmmu::bugs::Bug::DirtyLogNoFlush);
    assert!(loom_common::violation(|| dirty_log(bugs)), "missed dirty-log-no-flush");
}
