//! A host invalidation's begin never waits for a memslot update's grace period (KVM:
//! `kvm_swap_active_memslots` drops `mn_invalidate_lock` right after publishing, before
//! `synchronize_srcu`). The grace period waits for vCPUs' memslot read sections, and a vCPU's
//! fault may be inside `HostMemory::translate` waiting for the thread that begins the
//! invalidation: a host that holds its address-space lock across the begin and takes it in
//! `translate` (Linux: `mmap_lock`, munmap and get_user_pages) would deadlock. Found by the
//! race46t audit; the update held `mn_lock` from its wait for invalidations to its end.
#![cfg(not(loom))]

mod common;

use common::{region, RAM_HVA};
use std::cell::Cell;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmmu::host::{
    FrameAllocator, HostAccess, HostFault, HostMemory, HostPage, Sched, TableEntries,
};
use vmmu::spte::FormatKind;
use vmmu::testing::TestHost;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{FaultAccess, Gpa, Hva, Level, Pfn};

thread_local! {
    static PARK: Cell<bool> = const { Cell::new(false) };
}

struct GateHost {
    host: TestHost,
    gate: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
}

common::test_host_frames!(GateHost);

impl HostMemory for GateHost {
    fn translate(&self, hva: Hva, access: HostAccess) -> Result<HostPage, HostFault> {
        if PARK.with(|p| p.replace(false)) {
            if let Some((reached, go)) = self.gate.lock().unwrap().take() {
                reached.send(()).unwrap();
                go.recv().unwrap();
            }
        }
        self.host.translate(hva, access)
    }
}

impl Sched for GateHost {}

/// A vCPU whose EPT violation at `gpa` is parked inside `translate` (in its memslot read
/// section), on its own thread; `go` lets it continue. Slot 1 is RAM at 1 MiB.
struct Parked {
    vm: Vm<GateHost>,
    go: mpsc::Sender<()>,
    vcpu: std::thread::JoinHandle<Result<vmmu::fault::FaultOutcome, vmmu::Error>>,
}

fn parked_vcpu(extra: &[vmmu::memslot::UserspaceMemoryRegion]) -> Parked {
    let host = Arc::new(GateHost { host: TestHost::new(64), gate: Mutex::new(None) });
    host.host.map(RAM_HVA, 16 << 20, RAM_HVA >> 12, Level::L4K, true);
    let vm = Vm::new(VmConfig::new(FormatKind::Ept, 46).unwrap(), host.clone()).unwrap();
    vm.set_memory_region(&region(1, 0x10_0000, 0x10_0000, RAM_HVA, 0)).unwrap();
    for r in extra {
        vm.set_memory_region(r).unwrap();
    }
    let (reached_tx, reached_rx) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    *host.gate.lock().unwrap() = Some((reached_tx, go_rx));
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    let vcpu = std::thread::spawn(move || {
        PARK.with(|p| p.set(true));
        v.handle_ept_violation(Gpa(0x10_5000), FaultAccess::READ).map_err(Into::into)
    });
    reached_rx.recv().unwrap();
    Parked { vm, go, vcpu }
}

/// A vCPU's fault parks inside `translate`; an unrelated create publishes and waits for it; a
/// begin on another thread must return at once.
#[test]
fn a_begin_does_not_wait_for_a_vcpu_read_section_through_a_memslot_update() {
    let Parked { vm, go, vcpu } = parked_vcpu(&[]);
    // A memslot update elsewhere publishes its set, then waits for that section.
    let old = vm.memslots().generation(vmmu::AsId(0)).unwrap();
    let updater = {
        let vm = vm.clone();
        std::thread::spawn(move || {
            vm.set_memory_region(&region(2, 0x80_0000, 0x1000, RAM_HVA + (8 << 20), 0)).unwrap();
        })
    };
    while vm.memslots().generation(vmmu::AsId(0)).unwrap() == old {
        std::thread::yield_now();
    }
    // The host begins an invalidation of an unrelated range (as a munmap would).
    let (done_tx, done_rx) = mpsc::channel();
    let inv_thread = {
        let vm = vm.clone();
        std::thread::spawn(move || {
            let inv = vm.invalidate_hva_range_begin(
                Hva(RAM_HVA + (12 << 20)),
                Hva(RAM_HVA + (12 << 20) + 0x1000),
            );
            done_tx.send(()).unwrap();
            inv.end();
        })
    };
    let returned = done_rx.recv_timeout(Duration::from_secs(3)).is_ok();
    go.send(()).unwrap();
    let o = vcpu.join().unwrap();
    updater.join().unwrap();
    inv_thread.join().unwrap();
    assert!(o.is_ok(), "{o:?}");
    assert!(returned, "the begin waited for the update's grace period (the parked vCPU)");
}

/// A delete publishes twice (the invalid slot, then the set without it). An invalidation that
/// begins during the first swap's grace period (here: while a vCPU's fault holds it up) returns
/// at once, and the second publication waits for it to end: a fault that read the slot before
/// the delete, and one under the invalidation, both retry or finish, and the delete lands.
#[test]
fn an_invalidation_between_a_deletes_two_publications_holds_up_the_second() {
    let slot2 = region(2, 0x80_0000, 0x10_0000, RAM_HVA + (8 << 20), 0);
    let Parked { vm, go, vcpu } = parked_vcpu(&[slot2]);
    let old = vm.memslots().generation(vmmu::AsId(0)).unwrap();
    let (deleted_tx, deleted_rx) = mpsc::channel();
    let updater = {
        let vm = vm.clone();
        std::thread::spawn(move || {
            vm.set_memory_region(&region(2, 0x80_0000, 0, RAM_HVA + (8 << 20), 0)).unwrap();
            deleted_tx.send(()).unwrap();
        })
    };
    // The invalid copy of slot 2 is published; the grace period waits for the parked vCPU.
    while vm.memslots().generation(vmmu::AsId(0)).unwrap() == old {
        std::thread::yield_now();
    }
    let inv = within(3, {
        let vm = vm.clone();
        move || vm.invalidate_hva_range_begin(Hva(RAM_HVA + (8 << 20)), Hva(RAM_HVA + (9 << 20)))
    })
    .expect("the begin waited for the delete's grace period");
    go.send(()).unwrap();
    let o = vcpu.join().unwrap();
    assert!(o.is_ok(), "{o:?}");
    // The second publication waits for the invalidation begun between the two.
    assert!(
        deleted_rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the delete published its final set while an invalidation was in flight"
    );
    inv.end();
    deleted_rx.recv_timeout(Duration::from_secs(10)).expect("the delete lands once it ends");
    updater.join().unwrap();
    assert_eq!(vm.gfn_to_hva(vmmu::AsId(0), vmmu::Gfn(0x800)), None, "slot 2 is gone");
}

/// Runs `f` on a thread; `None` if it does not return within `secs` (the thread is left).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs)).ok()
}
