//! A host that misbehaves through safe trait methods: callbacks that panic (`Sched::kick`,
//! `Sched::relax`) and answers that disagree (`HostMemory::mapping_level` against `translate`),
//! and a stale slot copy passed to the safe memslot API. None may leave the VM hung for good or
//! the guest mapped onto frames the host never named (session 38's API audit; each test failed
//! before its fix).
#![cfg(not(loom))]

mod common;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use vmmu::fault::FaultOutcome;
use vmmu::host::HostAccess;
use vmmu::host::{FrameAllocator, HostFault, HostMemory, HostPage, Sched, TableEntries};
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::spte::FormatKind;
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, FaultAccess, Gpa, Hva, Level, Pfn};

const RAM_HVA: u64 = 0x4000_0000;

thread_local! {
    /// The next `Sched::relax` on this thread panics.
    static RELAX_PANICS: Cell<bool> = const { Cell::new(false) };
    /// The next `Sched::kick` on this thread panics.
    static KICK_PANICS: Cell<bool> = const { Cell::new(false) };
}

/// The test host, whose `Sched::relax` and `Sched::kick` panic once when the calling thread
/// asked for it: a host callback that unwinds out of the MMU (a watchdog in a wait loop that
/// gives up, an IPI that fails). Both are safe trait methods.
struct PanickyHost {
    host: TestHost,
}

common::test_host_frames!(PanickyHost);

impl HostMemory for PanickyHost {
    fn translate(&self, hva: Hva, access: HostAccess) -> Result<HostPage, HostFault> {
        self.host.translate(hva, access)
    }
}

impl Sched for PanickyHost {
    fn kick(&self, vcpu_index: usize) {
        if KICK_PANICS.with(|p| p.replace(false)) {
            panic!("the host's kick of vCPU {vcpu_index} failed");
        }
        self.host.kick(vcpu_index);
    }
    fn relax(&self) {
        if RELAX_PANICS.with(|p| p.replace(false)) {
            panic!("the host's wait policy gave up (a watchdog)");
        }
        self.host.relax();
    }
}

fn panicky_vm(format: FormatKind) -> (Vm<PanickyHost>, Arc<PanickyHost>) {
    let host = Arc::new(PanickyHost { host: TestHost::new(256) });
    host.host.map(RAM_HVA, 16 << 20, RAM_HVA >> 12, Level::L4K, true);
    let vm = Vm::new(VmConfig::new(format, 46).unwrap(), host.clone()).unwrap();
    (vm, host)
}

/// Runs `f` on a new thread; `Some(result)` if it finished within `secs` seconds, `None` if it
/// still runs (a hang: the thread is left behind).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs)).ok()
}

/// One TDP access to `gpa` on `v` until it translates (or `None` after 32 tries).
fn tdp_read<H: vmmu::host::Host>(v: &mut Vcpu<H>, gpa: u64) -> Option<Pfn> {
    for _ in 0..32 {
        v.service_requests().ok()?;
        let walk = match v.enter_guest() {
            Ok(g) => g.walk(Gpa(gpa), Access::NONE),
            Err(_) => continue,
        };
        match walk {
            HwWalk::Translated { pfn, .. } => return Some(pfn),
            HwWalk::Violation { .. } => {
                let _ = v.handle_ept_violation(Gpa(gpa), FaultAccess::READ).ok()?;
            }
            _ => return None,
        }
    }
    None
}

/// A host callback that panics inside `invalidate_hva_range_begin` (here the kick of the remote
/// flush after the zap) used to leave the count of invalidations in flight and the MMU's
/// in-progress count raised: every later memslot update spun forever waiting for it, and every
/// fault in the range retried forever. The begin now undoes itself when it unwinds.
#[test]
fn a_panic_in_invalidate_begin_leaves_no_invalidation_in_flight() {
    let (vm, _host) = panicky_vm(FormatKind::Ept);
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 1 << 20, RAM_HVA)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    assert!(tdp_read(&mut v, 0x2000).is_some(), "setup: a leaf to zap");
    // The vCPU is in guest mode: the invalidation's flush must kick it, and the kick panics.
    v.enter_guest_mode().unwrap();
    KICK_PANICS.with(|p| p.set(true));
    let begin = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // Never returns: the begin unwinds, so there is no invalidation to end.
        drop(vm.invalidate_hva_range_begin(Hva(RAM_HVA), Hva(RAM_HVA + (1 << 20))));
    }));
    KICK_PANICS.with(|p| p.set(false));
    assert!(begin.is_err(), "setup: the kick panicked inside the begin");
    v.exit_guest_mode();

    // A fault in the range completes: no invalidation is left in flight.
    assert!(tdp_read(&mut v, 0x2000).is_some(), "a fault in the range retries forever");

    // Any later memslot update (here a create far from the range) never returns.
    let vm2 = vm.clone();
    let done = within(5, move || {
        vm2.set_memory_region(&UserspaceMemoryRegion::new(1, 0, 1 << 30, 0x1000, RAM_HVA))
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    assert!(
        done.is_some(),
        "a memslot update after a begin that panicked hangs forever (mn_active stays 1)"
    );
}

/// `Sched::relax` that panics while a writer of the MMU lock waits for readers to drain used to
/// unwind with the lock's writer bit set and no guard to clear it: every later taker of the
/// lock (`get_root`, `nr_roots`, every zap) spun forever. The claim is now undone on unwind.
#[test]
fn a_panic_in_relax_while_a_writer_drains_readers_frees_the_mmu_lock() {
    let (vm, _host) = panicky_vm(FormatKind::Ept);
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 1 << 20, RAM_HVA)).unwrap();
    // A reader of the MMU lock, as `get_root` and `nr_roots` are: it takes the shared side
    // over and over.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (vm, stop) = (vm.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::hint::black_box(vm.tdp().expect("a TDP VM").nr_roots());
            }
        })
    };
    // A writer whose relax panics: it panics only if it had to wait for the reader to leave.
    let mut panicked = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        RELAX_PANICS.with(|p| p.set(true));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vm.zap_all_fast()));
        RELAX_PANICS.with(|p| p.set(false));
        if r.is_err() {
            panicked = true;
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    assert!(panicked, "setup: the writer never had to wait for the reader");
    // The reader thread is stuck in the lock's shared side, and so is anyone else.
    let vm2 = vm.clone();
    let roots = within(5, move || vm2.tdp().expect("a TDP VM").nr_roots());
    let vm3 = vm.clone();
    let root_load = within(5, move || {
        let mut v = vm3.create_vcpu().unwrap();
        v.service_requests().map(|_| ()).map_err(|e| e.to_string())
    });
    let reader_done = within(5, move || reader.join().is_ok());
    assert!(
        roots.is_some() && root_load.is_some() && reader_done.is_some(),
        "after a relax panic in the writer's drain the MMU lock is held forever: nr_roots \
         returned: {}, root load returned: {}, the reader left: {}",
        roots.is_some(),
        root_load.is_some(),
        reader_done.is_some()
    );
}

/// A host whose 4 KiB pages of one 2 MiB block are not contiguous frames (even page `k` at
/// frame 0x40000 + k, odd page `k` at 0x80001 + k, so not even at its place in a block), but whose `mapping_level` (a safe method) says
/// the block is one 2 MiB host page: `translate` and `mapping_level` disagree, as a buggy
/// embedder's can.
struct ScatteredHost {
    host: TestHost,
}

common::test_host_frames!(ScatteredHost);

impl ScatteredHost {
    fn frame_of(hva: Hva) -> Option<Pfn> {
        let k = hva.raw().checked_sub(RAM_HVA)? >> 12;
        (k < 512).then(|| Pfn(if k % 2 == 0 { 0x40000 + k } else { 0x80001 + k }))
    }
}

impl HostMemory for ScatteredHost {
    fn translate(&self, hva: Hva, _access: HostAccess) -> Result<HostPage, HostFault> {
        let pfn = Self::frame_of(hva).ok_or(HostFault::Unmapped(hva))?;
        Ok(HostPage { pfn, writable: true, level: Level::L4K })
    }
    fn mapping_level(&self, hva: Hva) -> Option<Level> {
        Self::frame_of(hva).map(|_| Level::L2M)
    }
}

impl Sched for ScatteredHost {}

/// When dirty logging stops, the TDP MMU puts back huge leaves where the host's `mapping_level`
/// says one huge host page backs the block. It used to build the leaf from the first present
/// leaf's frame rounded down to the block, so a host whose `mapping_level` disagrees with
/// `translate` got the guest mapped onto frames it never named (gfn 1 moved from 0x80002 to
/// 0x80001). Now every present leaf must map its place in one aligned block, or the table stays.
#[test]
fn huge_page_recovery_keeps_frames_a_lying_mapping_level_would_move() {
    use vmmu::memslot::KVM_MEM_LOG_DIRTY_PAGES;
    let host = Arc::new(ScatteredHost { host: TestHost::new(64) });
    let vm = Vm::new(VmConfig::new(FormatKind::Ept, 46).unwrap(), host.clone()).unwrap();
    let logged = UserspaceMemoryRegion::new(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 2 << 20, RAM_HVA);
    vm.set_memory_region(&logged).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    // The guest touches pages 1..4 (page 0 stays unmapped).
    let before: Vec<Pfn> = (1..4).map(|k| tdp_read(&mut v, k << 12).unwrap()).collect();
    let named: Vec<Pfn> =
        (0..4).map(|k| ScatteredHost::frame_of(Hva(RAM_HVA + (k << 12))).unwrap()).collect();
    assert_eq!(before, named[1..], "setup: 4 KiB leaves of the frames the host named");
    // Dirty logging stops: the MMU recovers the 2 MiB mapping.
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 2 << 20, RAM_HVA)).unwrap();
    let after: Vec<Pfn> = (0..4).map(|k| tdp_read(&mut v, k << 12).unwrap()).collect();
    assert_eq!(
        after, named,
        "after dirty logging stopped, gfns translate to frames the host never named for them"
    );
}

/// `MemslotSet::mark_page_dirty` with a copy of a slot from before it moved used to mark the
/// page at the same offset of where the slot is now (gfn 0x205 for 0x105: a page nobody wrote;
/// a debug build panicked). A copy that is not the set's own now marks nothing.
#[test]
fn mark_page_dirty_with_a_stale_slot_copy_marks_nothing() {
    use vmmu::memslot::{Memslots, MemslotsConfig, NoHooks, KVM_MEM_LOG_DIRTY_PAGES};
    use vmmu::{AsId, Gfn, SlotId};
    let m = Memslots::new(MemslotsConfig::default());
    let r = m.register_reader().unwrap();
    let log = KVM_MEM_LOG_DIRTY_PAGES;
    m.set_memory_region(
        &UserspaceMemoryRegion::new(1, log, 0x10_0000, 0x10_000, RAM_HVA),
        &NoHooks,
    )
    .unwrap();
    let stale = *m.read(&r).set(AsId(0)).get(SlotId(1)).unwrap();
    // The slot moves to gfn 0x200.
    m.set_memory_region(
        &UserspaceMemoryRegion::new(1, log, 0x20_0000, 0x10_000, RAM_HVA),
        &NoHooks,
    )
    .unwrap();
    let marked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let g = m.read(&r);
        g.set(AsId(0)).mark_page_dirty(&stale, Gfn(0x105));
    }));
    let dirty = m.read(&r).set(AsId(0)).dirty_bitmap(SlotId(1)).unwrap().snapshot();
    assert!(
        marked.is_ok() && dirty.iter().all(|&w| w == 0),
        "a stale slot copy: panicked: {}, slot 1 now reports dirty words {dirty:x?} (page 5 = \
         gfn 0x205, never written)",
        marked.is_err()
    );
}

/// A host kick that panics in `zap_all_fast`'s request to free obsolete roots used to leave the
/// vCPUs after the kicked one without the request (it was set and kicked one vCPU at a time),
/// with a root made obsolete: their faults retried forever. Every vCPU's request is now set
/// before any kick, as KVM's `kvm_make_all_cpus_request` does.
#[test]
fn a_panicking_kick_leaves_no_vcpu_without_its_free_obsolete_roots_request() {
    let (vm, _host) = panicky_vm(FormatKind::Ept);
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 1 << 20, RAM_HVA)).unwrap();
    let mut v0 = vm.create_vcpu().unwrap();
    let mut v1 = vm.create_vcpu().unwrap();
    assert!(tdp_read(&mut v0, 0x1000).is_some() && tdp_read(&mut v1, 0x1000).is_some());
    v0.enter_guest_mode().unwrap();
    v1.enter_guest_mode().unwrap();
    KICK_PANICS.with(|p| p.set(true));
    let zap = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vm.zap_all_fast()));
    KICK_PANICS.with(|p| p.set(false));
    assert!(zap.is_err(), "setup: the kick of vCPU 0 panicked");
    v0.exit_guest_mode();
    v1.exit_guest_mode();
    // vCPU 0 got its request and recovers.
    assert!(tdp_read(&mut v0, 0x2000).is_some(), "vCPU 0 recovers");
    // vCPU 1 never does.
    let mut outcomes = Vec::new();
    for _ in 0..100 {
        v1.service_requests().unwrap();
        match v1.handle_ept_violation(Gpa(0x3000), FaultAccess::READ) {
            Ok(FaultOutcome::Retry(c)) => outcomes.push(format!("{c:?}")),
            other => {
                outcomes.clear();
                outcomes.push(format!("{other:?}"));
                break;
            }
        }
    }
    assert!(
        outcomes.len() < 100,
        "vCPU 1 retried 100 times: {:?} ... (root obsolete: {:?})",
        &outcomes[..2],
        v1.root().map(|r| r.is_obsolete())
    );
}

/// A TDP zap unlinks tables and lists their frames for freeing after the remote flush. A kick
/// that panicked in that flush (here inside `invalidate_hva_range_begin`, whose range covers a
/// whole page table) dropped the list: the frames were never freed, not even by the VM's drop.
/// They are now queued as the begin unwinds (every vCPU's flush request was set before any kick,
/// and a table is freed only after a grace period, so nothing reads it freed).
#[test]
fn a_panic_in_a_tdp_zaps_flush_leaks_no_table() {
    let (vm, host) = panicky_vm(FormatKind::Ept);
    // A 2 MiB slot at 2 MiB: its page table is unlinked by a zap of the whole slot.
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 2 << 20, 2 << 20, RAM_HVA)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    assert!(tdp_read(&mut v, (2 << 20) + 0x1000).is_some(), "setup: a table to zap");
    v.enter_guest_mode().unwrap();
    KICK_PANICS.with(|p| p.set(true));
    let delete = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 2 << 20, 0, RAM_HVA)).map(|_| ())
    }));
    KICK_PANICS.with(|p| p.set(false));
    assert!(delete.is_err(), "setup: the kick panicked inside the delete's zap: {delete:?}");
    v.exit_guest_mode();
    drop(v);
    drop(vm);
    assert_eq!(host.host.tables_in_use(), 0, "table frames the unwound zap unlinked were lost");
}

/// A fault whose huge leaf replaces a lower table flushes the remote TLBs before it queues the
/// detached table for freeing; a kick of that flush that panics must not lose the table (a
/// frame the host never gets back), nor let it be freed while another vCPU may still walk it.
/// The detached table is queued on the unwind, with a TLB flush made pending on every vCPU.
#[test]
fn a_panic_in_the_flush_of_a_huge_leaf_over_a_table_loses_no_table() {
    let host = Arc::new(PanickyHost { host: TestHost::new(256) });
    host.host.map(RAM_HVA, 16 << 20, RAM_HVA >> 12, Level::L2M, true);
    let vm = Vm::new(VmConfig::new(FormatKind::Ept, 46).unwrap(), host.clone()).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    let mut w = vm.create_vcpu().unwrap();
    // No slot yet: the read leaves an MMIO SPTE in a 4 KiB table.
    v.service_requests().unwrap();
    let o = v.handle_ept_violation(Gpa(0x20_3000), FaultAccess::READ);
    assert!(matches!(o, Ok(FaultOutcome::Emulate { .. })), "setup: {o:?}");
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 4 << 20, RAM_HVA)).unwrap();
    // w is in guest mode: the replacement's flush must kick it, and the kick panics.
    w.service_requests().unwrap();
    w.enter_guest_mode().unwrap();
    let freed = vm.stats().tables_freed;
    v.service_requests().unwrap();
    KICK_PANICS.with(|p| p.set(true));
    let fault = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        v.handle_ept_violation(Gpa(0x20_5000), FaultAccess::READ)
    }));
    KICK_PANICS.with(|p| p.set(false));
    assert!(fault.is_err(), "setup: the kick panicked inside the fault: {fault:?}");
    assert_eq!(vm.stats().tdp_tables_zapped, 1, "setup: the table was replaced");
    w.exit_guest_mode();
    vm.reclaim();
    assert_eq!(vm.stats().tables_freed, freed + 1, "the detached table was lost");
    let frame = |gpa: u64| Some(Pfn((RAM_HVA + gpa) >> 12));
    assert_eq!(tdp_read(&mut v, 0x20_5000), frame(0x20_5000));
    assert_eq!(tdp_read(&mut w, 0x20_3000), frame(0x20_3000));
    assert_eq!(vm.stats().pages_2m, 1, "the huge leaf stayed");
}
