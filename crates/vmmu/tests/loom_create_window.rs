//! loom model of the create-window race of issue 11, defect 1, with two vCPUs and the real `Vm`,
//! `Vcpu`, `MmuCore` and `TdpMmu` through the sync shim.
//!
//! A slot is created over gfn X while vCPU A takes one violation exit for X (it may decide
//! "MMIO" from the old memslot set) and vCPU B accesses X until it reaches RAM from the new set
//! and caches the frame in a one-entry TLB. Then the slot is deleted.
//!
//! Property: after the delete returned, B does not use the deleted slot's frame: either its TLB
//! entry was flushed (a flush request reached it), or it never cached one. The fix this checks:
//! a fault never replaces a present leaf that allows its access, and any change of a present leaf
//! asks for a remote flush (`mmu_core/change.rs`), so A's stale "MMIO" cannot hide B's leaf from the
//! delete's zap. Before that fix loom finds the interleaving: A reads the old set, B installs
//! and caches RAM, A overwrites the leaf with an MMIO SPTE, the delete's zap sees no present
//! leaf and flushes nothing.
//!
//! Bounded: one page, EPT, tables for X built before the threads start, B makes at most two
//! accesses, preemption bound 2 (`LOOM_MAX_PREEMPTIONS`).
#![cfg(loom)]

mod loom_common;

use loom_common::model;

use loom::thread;
use vmmu::fault::FaultOutcome;
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::spte::FormatKind;
use vmmu::sync::Arc;
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, FaultAccess, Gpa, Level, Pfn};

const X: u64 = 0x1234;
/// In the same last-level table as X: an access to it builds X's tables before the race.
const Y: u64 = X + 1;
const RAM_HVA: u64 = 0x4000_0000;

fn slot(pages: u64) -> UserspaceMemoryRegion {
    UserspaceMemoryRegion::new(0, 0, X << 12, pages << 12, RAM_HVA)
}

/// One access of `gfn` (bounded retries): the frame if it reached RAM, through the TLB or a
/// walk that it caches.
fn access(v: &mut Vcpu<TestHost>, tlb: &mut Option<Pfn>, gfn: u64) -> Option<Pfn> {
    for _ in 0..3 {
        if v.service_requests().unwrap().flush_tlb {
            *tlb = None;
        }
        let walk = {
            let Ok(g) = v.enter_guest() else { continue };
            if gfn == X && tlb.is_some() {
                return *tlb;
            }
            g.walk(Gpa(gfn << 12), Access::NONE)
        };
        let o = match walk {
            HwWalk::Translated { pfn, .. } => {
                if gfn == X {
                    *tlb = Some(pfn);
                }
                return Some(pfn);
            }
            HwWalk::Violation { .. } => v.handle_ept_violation(Gpa(gfn << 12), FaultAccess::READ),
            HwWalk::Misconfig { .. } => v.handle_ept_misconfig(Gpa(gfn << 12)),
            HwWalk::Broken { dump } => panic!("broken walk {dump:?}"),
        };
        if let FaultOutcome::Emulate { .. } = o.unwrap() {
            return None;
        }
    }
    None
}

#[test]
fn create_window_two_vcpus_holds() {
    model(|| {
        let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
        cfg.max_vcpus = 2;
        let host = Arc::new(TestHost::new(8));
        host.map(RAM_HVA, 0x1000, RAM_HVA >> 12, Level::L4K, true);
        let vm = Vm::new(cfg, host.clone()).unwrap();
        let mut a = vm.create_vcpu().unwrap();
        a.service_requests().unwrap();
        let mut b = vm.create_vcpu().unwrap();
        let mut b_tlb = None;
        assert_eq!(access(&mut b, &mut b_tlb, Y), None, "Y is MMIO: builds X's tables");

        let ta = thread::spawn(move || {
            // The exit the hardware raised for X while it was unmapped.
            let _ = a.handle_ept_violation(Gpa(X << 12), FaultAccess::READ).unwrap();
            a
        });
        let tb = thread::spawn(move || {
            let mut cached = None;
            for _ in 0..2 {
                if let Some(pfn) = access(&mut b, &mut b_tlb, X) {
                    cached = Some(pfn);
                    break;
                }
            }
            (b, b_tlb, cached)
        });
        vm.set_memory_region(&slot(1)).unwrap();
        let _a = ta.join().unwrap();
        let (mut b, mut b_tlb, cached) = tb.join().unwrap();
        vm.set_memory_region(&slot(0)).unwrap();
        if let Some(frame) = cached {
            let seen = access(&mut b, &mut b_tlb, X);
            assert_ne!(
                seen,
                Some(frame),
                "VIOLATION: B used the deleted slot's frame {frame:?} after the delete"
            );
        }
        assert_eq!(host.use_after_free(), 0);
    });
}
