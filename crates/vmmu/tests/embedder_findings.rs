//! Findings of session 55's outside embedder audit (an engineer who wrote an embedder from the
//! crate's docs): a host without table frames below 4 GiB under shadow paging, a forgotten
//! `GuestMode` guard, a host that answers a write translation with a read-only page, and a VM
//! configured for no vCPU. Each test failed before its fix.
#![cfg(not(loom))]

mod common;

use common::RAM_HVA;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
use vmmu::fault::{FaultError, FaultOutcome};
use vmmu::host::{FrameAllocator, GuestMemory, HostAccess, HostFault, HostMemory, HostPage};
use vmmu::host::{Sched, TableEntries};
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::mmu_core::MmuError;
use vmmu::spte::FormatKind;
use vmmu::testing::TestHost;
use vmmu::vm::{Vm, VmConfig, VmError};
use vmmu::{FaultAccess, Gpa, Hva, Level, Pfn};

/// The test host, with two departures an embedder's host may have: no table frame below 4 GiB,
/// and write translations answered with read-only pages.
struct OddHost {
    host: TestHost,
    none_below_4g: bool,
    read_only_writes: bool,
}

impl OddHost {
    fn new(none_below_4g: bool, read_only_writes: bool) -> Arc<OddHost> {
        let host = TestHost::new(common::test_frames());
        host.map(RAM_HVA, 16 << 20, RAM_HVA >> 12, Level::L4K, true);
        Arc::new(OddHost { host, none_below_4g, read_only_writes })
    }
}

// SAFETY: every frame call is the test host's, whose `unsafe impl` makes the promises; this one
// only refuses some allocations.
unsafe impl FrameAllocator for OddHost {
    fn alloc_table(&self, init: u64) -> Option<Pfn> {
        self.host.alloc_table(init)
    }
    fn alloc_table_below_4g(&self, init: u64) -> Option<Pfn> {
        if self.none_below_4g {
            return None;
        }
        self.host.alloc_table_below_4g(init)
    }
    unsafe fn free_table(&self, pfn: Pfn) {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.host.free_table(pfn) }
    }
    fn table(&self, pfn: Pfn) -> Option<std::ptr::NonNull<TableEntries>> {
        self.host.table(pfn)
    }
}

impl HostMemory for OddHost {
    fn translate(&self, hva: Hva, access: HostAccess) -> Result<HostPage, HostFault> {
        let page = self.host.translate(hva, access)?;
        Ok(HostPage { writable: page.writable && !self.read_only_writes, ..page })
    }
}

impl GuestMemory for OddHost {
    fn read_u64(&self, hva: Hva) -> Result<u64, HostFault> {
        self.host.read_u64(hva)
    }
    fn cmpxchg_u64(&self, hva: Hva, old: u64, new: u64) -> Result<bool, HostFault> {
        self.host.cmpxchg_u64(hva, old, new)
    }
}

impl Sched for OddHost {}

fn ram() -> UserspaceMemoryRegion {
    UserspaceMemoryRegion::new(0, 0, 0, 4 << 20, RAM_HVA)
}

/// A shadow vCPU starts with paging off, whose root is a special root that a 32-bit CR3 names:
/// a host with no table frame below 4 GiB cannot load it. That was `MmuError::OutOfMemory`,
/// whose message blamed an empty pool or phys_bits (with 255 frames free and nothing refused);
/// it is now `NoTableBelow4G`, which names the method to implement.
#[test]
fn a_shadow_vcpu_on_a_host_without_frames_below_4g_says_so() {
    let host = OddHost::new(true, false);
    let vm = Vm::new(VmConfig::shadow(46).unwrap(), host).unwrap();
    vm.set_memory_region(&ram()).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    let e = v.service_requests().expect_err("no special root without a frame below 4 GiB");
    assert_eq!(e, MmuError::NoTableBelow4G);
    assert!(e.to_string().contains("alloc_table_below_4g"), "{e}");
    assert_eq!(vm.stats().tables_refused, 0);
}

/// `core::mem::forget` of a `GuestMode` guard (safe code) left its read section open and the
/// vCPU marked in guest mode: the vCPU's drop panicked in debug builds (a reader given back
/// with a section open) and the VM's last drop waited for that section for ever. The next
/// `exit_guest_mode` (every entry, `service_requests` and the drop call it) now ends it.
#[test]
fn a_forgotten_guest_mode_guard_holds_nothing_up() {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (vm, _host) = common::vm(FormatKind::Ept);
        vm.set_memory_region(&ram()).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        v.service_requests().unwrap();
        std::mem::forget(v.enter_guest().unwrap());
        // The vCPU goes on: a new entry, and a memslot update while it is out of guest mode.
        v.service_requests().unwrap();
        drop(v.enter_guest().unwrap());
        vm.set_memory_region(&UserspaceMemoryRegion::new(1, 0, 1 << 30, 1 << 20, RAM_HVA)).unwrap();
        // Raw guest mode after a forgotten guard (it panicked in debug builds: "entered guest
        // mode twice").
        std::mem::forget(v.enter_guest().unwrap());
        let raw = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            v.enter_guest_mode().unwrap();
            v.exit_guest_mode();
        }));
        assert!(raw.is_ok(), "raw guest mode after a forgotten guard panicked");
        std::mem::forget(v.enter_guest().unwrap());
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(v)));
        // The vCPU's index and reader records went back: a new vCPU can take them.
        let again = vm.create_vcpu().map(drop).map_err(|e| e.to_string());
        drop(vm);
        let _ = tx.send((dropped.is_ok(), again));
    });
    let done = rx.recv_timeout(Duration::from_secs(20));
    assert_eq!(done, Ok((true, Ok(()))), "a forgotten guard hung, panicked or kept the vCPU");
}

/// A host that answers a write translation with a read-only page (its contract: a writable page
/// or `HostFault::Protected`) made the fault install a read-only leaf; the write faulted again,
/// `Spurious`, for ever. It is now the refusal it is: `FaultError::HostFault`.
#[test]
fn a_read_only_page_for_a_write_is_the_hosts_refusal() {
    let host = OddHost::new(false, true);
    let vm = Vm::new(VmConfig::new(FormatKind::Ept, 46).unwrap(), host).unwrap();
    vm.set_memory_region(&ram()).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    let o = v.handle_ept_violation(Gpa(0x1000), FaultAccess::WRITE);
    let hva = Hva(RAM_HVA + 0x1000);
    assert_eq!(
        o,
        Err(FaultError::HostFault { gpa: Gpa(0x1000), hva, fault: HostFault::Protected(hva) })
    );
    // A read is mapped, read-only.
    assert_eq!(v.handle_ept_violation(Gpa(0x1000), FaultAccess::READ), Ok(FaultOutcome::Fixed));
}

/// `max_vcpus: 0` made a VM on which every `create_vcpu` failed; it is refused up front.
#[test]
fn a_vm_for_no_vcpu_is_refused() {
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.max_vcpus = 0;
    let e = Vm::new(cfg, Arc::new(TestHost::new(16))).err().expect("refused");
    assert!(matches!(e, VmError::TooManyVcpus { max_vcpus: 0 }), "{e}");
}
