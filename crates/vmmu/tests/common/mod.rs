//! Shared helpers of the core's integration tests: a VM on the test host, and a vCPU "access"
//! loop that does what the software machine does (enter guest mode, walk like the hardware, exit
//! on a fault, handle it, retry).
#![allow(dead_code)]

pub mod shadow;

use std::sync::Arc;
use vmmu::fault::{EmulateSource, FaultError, FaultOutcome, PfErr};
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::spte::FormatKind;
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, Gpa, Level, Pfn};

/// Host addresses of test RAM start here; frame = hva >> 12 (identity).
pub const RAM_HVA: u64 = 0x4000_0000;

pub fn vm(format: FormatKind) -> (Vm<TestHost>, Arc<TestHost>) {
    vm_with(VmConfig::new(format, 46).unwrap())
}

pub fn vm_with(cfg: VmConfig) -> (Vm<TestHost>, Arc<TestHost>) {
    vm_on(cfg, TestHost::new(test_frames()))
}

/// Table frames of the hosts of [`vm_with`] and [`vm_on`]: fewer under Miri, where each is 512
/// atomics and the interpreter pays for every one.
#[allow(dead_code)]
pub fn test_frames() -> usize {
    if cfg!(miri) {
        16
    } else {
        512
    }
}

/// [`vm_with`] on a host of the caller's (e.g. [`TestHost::new_type_stable`]).
#[allow(dead_code)]
pub fn vm_on(cfg: VmConfig, host: TestHost) -> (Vm<TestHost>, Arc<TestHost>) {
    let host = Arc::new(host);
    // 1 GiB of host RAM, identity hva -> pfn, mapped with 2 MiB pages where aligned.
    host.map(RAM_HVA, 1 << 30, RAM_HVA >> 12, Level::L2M, true);
    (Vm::new(cfg, host.clone()).unwrap(), host)
}

pub fn region(slot: u32, gpa: u64, size: u64, hva: u64, flags: u32) -> UserspaceMemoryRegion {
    UserspaceMemoryRegion::new(slot, flags, gpa, size, hva)
}

/// What one guest access ended as.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Seen {
    Ram(Pfn),
    Mmio(EmulateSource),
}

/// Runs one guest access to completion like the machine does. Returns the outcomes of every
/// fault on the way, and what the access saw.
pub fn access(
    vcpu: &mut Vcpu<TestHost>,
    gpa: u64,
    write: bool,
) -> Result<(Seen, Vec<FaultOutcome>), FaultError> {
    let need = if write { Access::WRITE } else { Access::NONE };
    let mut faults = Vec::new();
    for _ in 0..1000 {
        vcpu.service_requests().expect("root");
        let walk = match vcpu.enter_guest() {
            Ok(g) => g.walk(Gpa(gpa), need),
            Err(_) => continue,
        };
        let o = match walk {
            HwWalk::Translated { pfn, .. } => return Ok((Seen::Ram(pfn), faults)),
            HwWalk::Violation { present, .. } => {
                if is_npt(vcpu) {
                    let mut e = if write { PfErr::WRITE } else { 0 };
                    if present {
                        e |= PfErr::PRESENT;
                    }
                    vcpu.handle_npf(Gpa(gpa), PfErr(e))?
                } else {
                    vcpu.handle_ept_violation(
                        Gpa(gpa),
                        if write { vmmu::FaultAccess::WRITE } else { vmmu::FaultAccess::READ },
                    )?
                }
            }
            HwWalk::Misconfig { .. } => {
                if is_npt(vcpu) {
                    let e = PfErr::RSVD | if write { PfErr::WRITE } else { 0 };
                    vcpu.handle_npf(Gpa(gpa), PfErr(e))?
                } else {
                    vcpu.handle_ept_misconfig(Gpa(gpa))?
                }
            }
            HwWalk::Broken { dump } => panic!("broken walk {dump:?}"),
        };
        faults.push(o);
        if let FaultOutcome::Emulate { source, .. } = o {
            return Ok((Seen::Mmio(source), faults));
        }
    }
    panic!("access to {gpa:#x} did not complete: {faults:?}");
}

fn is_npt(v: &Vcpu<TestHost>) -> bool {
    !v.format().is_ept()
}

/// Parks the calling thread once, the first time it reaches `point`: it sends on `reached`, then
/// waits on `go`. Later passes do not stop. Clear the hook with
/// `vmmu::testing::preempt::on_this_thread(None)` when done.
#[allow(dead_code)] // not every test file that includes `common` parks a thread
pub fn park_once_at(
    point: vmmu::host::PreemptPoint,
    reached: std::sync::mpsc::Sender<()>,
    go: std::sync::mpsc::Receiver<()>,
) {
    let mut once = Some((reached, go));
    vmmu::testing::preempt::on_this_thread(Some(Box::new(move |p| {
        if p == point {
            if let Some((reached, go)) = once.take() {
                reached.send(()).unwrap();
                go.recv().unwrap();
            }
        }
    })));
}

/// Starts the memslot update `region` on another thread and returns once its new set is
/// published (address space 0's generation moved on, to the in-progress one): the update then
/// waits for the vCPUs' read sections. Join the handle once they have let it finish.
#[allow(dead_code)] // not every test file that includes `common` races an update
pub fn update_published(
    vm: &Vm<TestHost>,
    region: UserspaceMemoryRegion,
) -> std::thread::JoinHandle<()> {
    let old_gen = vm.memslots().generation(vmmu::AsId(0)).unwrap();
    let updater = {
        let vm = vm.clone();
        std::thread::spawn(move || {
            vm.set_memory_region(&region).unwrap();
        })
    };
    while vm.memslots().generation(vmmu::AsId(0)).unwrap() == old_gen {
        std::thread::yield_now();
    }
    updater
}

/// The 4 KiB SPTE for `gpa` under `root`, if the tables reach it and it is not empty.
pub fn spte_4k(vm: &Vm<TestHost>, root: &vmmu::tdp::root::Root, gpa: u64) -> Option<u64> {
    // SAFETY: single-threaded: the entry is read at once, before anything else runs.
    let e =
        unsafe { vm.tdp().expect("a TDP VM").entry_for_tests(root, Gpa(gpa).gfn(), Level::L4K) }?;
    let v = e.load(std::sync::atomic::Ordering::Acquire);
    (v != vmmu::spte::SpteFormat::NONPRESENT).then_some(v)
}

/// `FrameAllocator` for a wrapper of the test host (its field `host`): every call is the test
/// host's. The wrapper's `translate` must name no table frame of the test host (each wrapper
/// says which frames it names).
#[allow(unused_macros)] // not every test file wraps the test host
macro_rules! test_host_frames {
    ($t:ty) => {
        // SAFETY: every frame call is the test host's, whose `unsafe impl` makes the promises;
        // the guest memory the wrapper's `translate` names is the test host's word map, apart
        // from its table pages, as the test host's own is.
        unsafe impl FrameAllocator for $t {
            fn type_stable_tables(&self) -> bool {
                self.host.type_stable_tables()
            }
            fn alloc_table(&self, init: u64) -> Option<Pfn> {
                self.host.alloc_table(init)
            }
            unsafe fn free_table(&self, pfn: Pfn) {
                // SAFETY: the caller's contract, passed on.
                unsafe { self.host.free_table(pfn) }
            }
            fn table(&self, pfn: Pfn) -> Option<std::ptr::NonNull<TableEntries>> {
                self.host.table(pfn)
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use test_host_frames;

/// Polls `cond` every millisecond for up to `limit`; whether it held (tests that wait for
/// another thread to reach a state, such as a VMM operation blocked in its TLB flush).
pub fn wait_for(limit: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    cond()
}

/// The collection (GET in `mode`, and CLEAR of what it returned in manual mode) on its own
/// thread, on slot 7 of address space 0 (pages 0-3 in manual mode); returns once it has
/// write-protected and waits in its flush for `v1`, in guest mode.
#[allow(dead_code)] // only the dirty-log flush-window tests collect so
pub fn start_collection(
    vm: &Vm<TestHost>,
    v1: &Vcpu<TestHost>,
    mode: vmmu::dirty::DirtyLogMode,
) -> std::thread::JoinHandle<Vec<u64>> {
    let vm_c = vm.clone();
    let collector = std::thread::spawn(move || {
        let words = vm_c.get_dirty_log(vmmu::AsId(0), vmmu::SlotId(7)).unwrap();
        if mode.is_manual() {
            vm_c.clear_dirty_log(vmmu::AsId(0), vmmu::SlotId(7), 0, 4, &words).unwrap();
        }
        words
    });
    assert!(
        wait_for(std::time::Duration::from_secs(5), || v1.requests_pending()),
        "the collection's flush request reached vCPU 1"
    );
    assert!(!collector.is_finished(), "the collection waits for vCPU 1, in guest mode");
    collector
}
