//! Shadow-MMU behaviours that mutation testing (`cargo mutants` on `src/shadow`, `src/guest` and
//! `src/dirty`) found unpinned: each test names the mutant it kills and shows the harm as the
//! guest would see it (a wrong translation, a write that escapes the dirty log, a guest table
//! write the MMU does not see), not as an internal flag.
#![cfg(not(loom))]

mod common;

use common::shadow::*;
use std::collections::HashMap;
use vmmu::bugs::BugSet;
use vmmu::fault::{FaultOutcome, PfErr};
use vmmu::memslot::{UserspaceMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::Vm;
use vmmu::{Access, AsId, Gva, Pfn, SlotId};

/// A logged slot's guest-physical base, its host address and the GVA the tests map it at.
const LOG_GPA: u64 = 0x1_0020_0000;
const LOG_HVA: u64 = RAM_HVA + 0x100_0000;
const LOG_GVA: u64 = 0x5000_0000;

fn log_region(flags: u32) -> UserspaceMemoryRegion {
    UserspaceMemoryRegion::new(7, flags, LOG_GPA, 0x4000, LOG_HVA)
}

/// The logged slot's dirty pages (auto mode: collected, cleared and re-protected).
fn dirty(vm: &Vm<TestHost>) -> Vec<u64> {
    vmmu::dirty::pages_of(&vm.get_dirty_log(AsId(0), SlotId(7)).unwrap()).collect()
}

/// A shadow vCPU with a TLB, as the hardware has: translations (with their write right) stay
/// cached across accesses until a flush request empties the TLB, so an MMU that forgets to
/// flush after taking a right away is caught by the next access through the stale entry.
struct TlbVcpu {
    v: Vcpu<TestHost>,
    tlb: HashMap<u64, (Pfn, bool)>,
}

impl TlbVcpu {
    fn new(vm: &Vm<TestHost>, cr3: u64) -> Self {
        TlbVcpu { v: vcpu_in(vm, long4(cr3)), tlb: HashMap::new() }
    }

    /// One user access to `gva` to completion, through the TLB first.
    fn access(&mut self, gva: u64, write: bool) -> Seen {
        let need = if write { Access::WRITE.union(Access::USER) } else { Access::USER };
        for _ in 0..50 {
            if self.v.service_requests().unwrap().flush_tlb {
                self.tlb.clear();
            }
            if let Some(&(pfn, w)) = self.tlb.get(&(gva >> 12)) {
                if w || !write {
                    return Seen::Ram(pfn);
                }
            }
            if self.v.enter_guest_mode().is_err() {
                continue;
            }
            let walk = self.v.walk_gva(Gva(gva), need);
            self.v.exit_guest_mode();
            let user_write = PfErr::USER | if write { PfErr::WRITE } else { 0 };
            let err = match walk {
                HwWalk::Translated { pfn, perms, .. } => {
                    self.tlb.insert(gva >> 12, (pfn, perms.contains(Access::WRITE)));
                    return Seen::Ram(pfn);
                }
                HwWalk::Violation { present, .. } => {
                    user_write | if present { PfErr::PRESENT } else { 0 }
                }
                HwWalk::Misconfig { .. } => user_write | PfErr::RSVD | PfErr::PRESENT,
                HwWalk::Broken { dump } => panic!("broken walk {dump:?}"),
            };
            match self.v.handle_page_fault(Gva(gva), PfErr(err)).unwrap() {
                FaultOutcome::Fixed | FaultOutcome::Spurious | FaultOutcome::Retry(_) => {}
                FaultOutcome::Emulate { gpa, source, .. } => return Seen::Mmio(gpa, source),
                FaultOutcome::GuestPageFault { error_code, .. } => {
                    return Seen::GuestPf(error_code.0)
                }
            }
        }
        panic!("access to {gva:#x} did not complete");
    }
}

/// Logging starts on a slot whose pages the guest already wrote through writable shadow leaves
/// (cached in its TLB): the leaves must lose their write right (KVM
/// `kvm_mmu_slot_gfn_write_protect` through the rmap) and the TLBs be flushed, else later writes
/// go through them without a fault and the page never reaches the dirty log.
/// Kills `shadow/dirty.rs`: `ShadowMmu::write_protect_gfn_range` replaced with `()`, and its
/// `batch.flush |=` replaced with `&=` (no flush).
#[test]
fn starting_dirty_logging_write_protects_leaves_that_were_writable() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    vm.set_memory_region(&log_region(0)).unwrap();
    for i in 0..4 {
        s.map4k(LOG_GVA + i * 0x1000, LOG_GPA + i * 0x1000, P | RW | US);
    }
    let mut v = TlbVcpu::new(&vm, s.cr3);
    for i in 0..4 {
        assert!(matches!(v.access(LOG_GVA + i * 0x1000, true), Seen::Ram(_)));
    }
    vm.set_memory_region(&log_region(KVM_MEM_LOG_DIRTY_PAGES)).unwrap();
    assert_eq!(dirty(&vm), Vec::<u64>::new(), "nothing written since logging started");
    assert!(matches!(v.access(LOG_GVA + 0x2008, true), Seen::Ram(_)));
    assert_eq!(dirty(&vm), vec![2], "the write after logging started is logged");
}
