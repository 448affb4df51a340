//! Table frames the host hands out beyond what the VM's SPTEs can name are refused, never
//! linked.
//!
//! An SPTE keeps bits `12..phys_bits` of a table's address. Before the check a frame above
//! them was linked with its high bits dropped (release builds), so the link named another frame:
//! in the first test the VM's own root, which the guest then mapped writable, and a zap-all
//! freed the live root twice. Now the MMU gives such a frame back, counts it in
//! `tables_refused` and fails the fault as out-of-memory. A PAE special root (32-bit CR3) is
//! refused at or above 4 GiB the same way.
#![cfg(not(loom))]

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vmmu::fault::{FaultError, FaultOutcome};
use vmmu::guest::GuestCpu;
use vmmu::host::HostAccess;
use vmmu::host::{FrameAllocator, HostFault, HostMemory, HostPage, Sched, TableEntries};
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::shadow::ShadowRootKind;
use vmmu::spte::FormatKind;
use vmmu::tdp::HwWalk;
use vmmu::testing::{TestHost, TABLE_PFN_BASE};
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, FaultAccess, Gpa, Hva, Level, Pfn};

/// The second pool's frame numbers start here: 2^52 bytes, beyond every `phys_bits`.
const HIGH: u64 = 1 << 40;

/// Two pools of table frames: `low` at its own numbers, `high` at its numbers plus [`HIGH`].
/// `high_below_4g` makes `alloc_table_below_4g` hand out high frames too.
struct TwoPools {
    low: TestHost,
    high: TestHost,
    use_high: AtomicBool,
    high_below_4g: AtomicBool,
}

impl TwoPools {
    fn new() -> Self {
        TwoPools {
            low: TestHost::new(16),
            high: TestHost::new(16),
            use_high: AtomicBool::new(false),
            high_below_4g: AtomicBool::new(false),
        }
    }

    fn high_frame(&self, init: u64) -> Option<Pfn> {
        Some(Pfn(self.high.alloc_table(init)?.raw() + HIGH))
    }
}

// SAFETY: every clause of the trait's contract holds: the two pools' frame numbers are
// disjoint (the high pool's all have bit 40 set, the low pool's none), each pool is a test host
// (frames stay valid while the host lives), `table` answers `None` for a number neither pool
// handed out, and `free_table` gives a frame back to the pool that handed it out. Frames beyond
// a VM's `phys_bits` are allowed by the contract: the MMU refuses them.
unsafe impl FrameAllocator for TwoPools {
    fn alloc_table(&self, init: u64) -> Option<Pfn> {
        if self.use_high.load(Ordering::Relaxed) {
            self.high_frame(init)
        } else {
            self.low.alloc_table(init)
        }
    }
    fn alloc_table_below_4g(&self, init: u64) -> Option<Pfn> {
        if self.high_below_4g.load(Ordering::Relaxed) {
            self.high_frame(init)
        } else {
            self.low.alloc_table_below_4g(init)
        }
    }
    unsafe fn free_table(&self, pfn: Pfn) {
        // SAFETY: the caller's contract, passed on to the pool that handed the frame out.
        unsafe {
            if pfn.raw() >= HIGH {
                self.high.free_table(Pfn(pfn.raw() - HIGH))
            } else {
                self.low.free_table(pfn)
            }
        }
    }
    fn table(&self, pfn: Pfn) -> Option<NonNull<TableEntries>> {
        if pfn.raw() >= HIGH {
            self.high.table(Pfn(pfn.raw() - HIGH))
        } else {
            self.low.table(pfn)
        }
    }
}

impl HostMemory for TwoPools {
    fn translate(&self, hva: Hva, access: HostAccess) -> Result<HostPage, HostFault> {
        self.low.translate(hva, access)
    }
}

impl Sched for TwoPools {}

const RAM_HVA: u64 = 0x4000_0000;
/// PML4, PDPT, PD and PT index 1 each: a link truncated to the root's frame would lead a walk
/// back into the root's entry 1 at every level.
const GPA: u64 = (1 << 39) | (1 << 30) | (1 << 21) | (1 << 12);

#[test]
fn a_table_frame_beyond_phys_bits_is_refused_not_linked() {
    let host = Arc::new(TwoPools::new());
    host.low.map(RAM_HVA, 1 << 21, RAM_HVA >> 12, Level::L4K, true);
    let vm = Vm::new(VmConfig::new(FormatKind::Ept, 46).unwrap(), host.clone()).unwrap();
    let base = GPA & !((1 << 21) - 1);
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, base, 1 << 21, RAM_HVA)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    let root = v.root().unwrap().pfn();
    assert_eq!(root, Pfn(TABLE_PFN_BASE));

    // The host hands out frames at 2^40: the fault cannot link its first table.
    host.use_high.store(true, Ordering::Relaxed);
    let err = v.handle_ept_violation(Gpa(GPA), FaultAccess::READ).unwrap_err();
    assert!(matches!(err, FaultError::OutOfMemory(Gpa(GPA))), "{err:?}");
    assert!(err.to_string().contains("tables_refused"), "{err}");
    assert_eq!(vm.stats().tables_refused, 1);
    assert_eq!(host.high.tables_in_use(), 0, "the refused frame went back to the host");
    let walk = v.enter_guest().unwrap().walk(Gpa(GPA), Access::WRITE);
    assert!(matches!(walk, HwWalk::Violation { present: false, .. }), "{walk:?}");

    // Frames the VM can name again: the fault maps the guest's RAM, not a table.
    host.use_high.store(false, Ordering::Relaxed);
    assert_eq!(v.handle_ept_violation(Gpa(GPA), FaultAccess::READ).unwrap(), FaultOutcome::Fixed);
    let ram = Pfn((RAM_HVA + (GPA - base)) >> 12);
    match v.enter_guest().unwrap().walk(Gpa(GPA), Access::NONE) {
        HwWalk::Translated { pfn, .. } => assert_eq!(pfn, ram),
        w => panic!("unexpected walk {w:?}"),
    }

    // A zap-all while the vCPU holds its root frees the fault's tables, never the live root
    // (the test host panics on a double free); after the vCPU goes, everything is freed once.
    vm.zap_all_fast();
    assert_eq!(host.low.use_after_free(), 0);
    drop(v);
    vm.zap_all_fast();
    assert_eq!(host.low.use_after_free(), 0);
    assert_eq!(host.low.tables_in_use(), 0);
}

#[test]
fn a_special_root_at_or_above_4g_is_refused() {
    let host = Arc::new(TwoPools::new());
    host.low.map(RAM_HVA, 1 << 21, RAM_HVA >> 12, Level::L4K, true);
    let vm = Vm::new(VmConfig::shadow(46).unwrap(), host.clone()).unwrap();
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 1 << 21, RAM_HVA)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    let cpu = GuestCpu::non_paging(46);
    v.set_guest_cpu(cpu).unwrap();
    // Within phys_bits but above 4 GiB: a 32-bit CR3 cannot hold it.
    host.high_below_4g.store(true, Ordering::Relaxed);
    let err = v.service_requests().unwrap_err();
    assert!(err.to_string().contains("no table frame below 4 GiB"), "{err}");
    assert_eq!(vm.stats().tables_refused, 1);
    assert_eq!(host.high.tables_in_use(), 0, "the refused frame went back to the host");

    host.high_below_4g.store(false, Ordering::Relaxed);
    v.service_requests().unwrap();
    assert_eq!(v.shadow_root_kind(), Some(ShadowRootKind::Special));
    assert_eq!(vm.stats().tables_refused, 1);
}
